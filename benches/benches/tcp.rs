//! Criterion benches of the TCP backend: all_reduce (f32 sum) and all_to_all
//! at 4 KiB, 1 MiB and 16 MiB, for world 2 and 4.
//!
//! The ranks are threads of the bench process (each with its own
//! TCP communicator from `TcpFactory` and real loopback TCP connections), which criterion
//! needs to drive one measurement loop; production runs one process per rank.
//! For nccl-tests style tables over 8 B..64 MiB use the `comm-perf` binary.
//! Throughput is the per-rank buffer size (algbw); busbw = algbw * 2(n-1)/n
//! for all_reduce and algbw * (n-1)/n for all_to_all.

use std::sync::Arc;

use comm_cpu::TcpFactory;
use criterion::{criterion_group, criterion_main, Criterion};

mod common;

fn bench(c: &mut Criterion) {
    common::collectives(c, Arc::new(TcpFactory::default()));
}

criterion_group!(benches, bench);
criterion_main!(benches);
