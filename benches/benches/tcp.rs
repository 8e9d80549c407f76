//! Criterion benches of the TCP backend: all_reduce (f32 sum) and all_to_all
//! at 4 KiB, 1 MiB and 16 MiB, for world 2 and 4.
//!
//! The ranks are threads of the bench process (each with its own
//! `TcpCommunicator` and real loopback TCP connections), which criterion
//! needs to drive one measurement loop; production runs one process per rank.
//! For nccl-tests style tables over 8 B..64 MiB use the `comm-perf` binary.
//! Throughput is the per-rank buffer size (algbw); busbw = algbw * 2(n-1)/n
//! for all_reduce and algbw * (n-1)/n for all_to_all.

use std::sync::Arc;
use std::time::Duration;

use benches::threads::MakeComm;
use comm_core::DeviceCommunicator;
use comm_cpu::{TcpCommunicator, TcpOptions};
use criterion::{criterion_group, criterion_main, Criterion};

mod common;

fn bench(c: &mut Criterion) {
    let make: Arc<MakeComm> = Arc::new(|store, rank, world| {
        let mut opts = TcpOptions::with_timeout(Duration::from_secs(60));
        opts.addr = Some(std::net::Ipv4Addr::LOCALHOST.into());
        Ok(Box::new(TcpCommunicator::new(store, rank, world, opts)?)
            as Box<dyn DeviceCommunicator>)
    });
    common::collectives(c, "tcp", make);
}

criterion_group!(benches, bench);
criterion_main!(benches);
