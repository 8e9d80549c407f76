//! Host reduce kernels (`dst = dst op src`) next to a plain copy of the same
//! size, in bytes of `dst` per second.
//!
//! `cargo bench -p comm-core --bench reduce -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;

use comm_core::reduce::reduce_into;
use comm_core::{bf16, f16, DType, HostBuffer, ReduceOp};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const SIZES: [(usize, &str); 3] = [(64 << 10, "64KiB"), (1 << 20, "1MiB"), (16 << 20, "16MiB")];

const KERNELS: [(DType, ReduceOp); 5] = [
    (DType::F32, ReduceOp::Sum),
    (DType::F32, ReduceOp::Max),
    (DType::BF16, ReduceOp::Sum),
    (DType::F16, ReduceOp::Sum),
    (DType::I32, ReduceOp::Sum),
];

/// A 64-byte aligned buffer of `bytes` bytes, every element set to a small
/// non-zero value. Writing every page matters: untouched zeroed pages all map
/// to one physical page and would make reads look faster than memory.
fn filled(bytes: usize, dtype: DType) -> HostBuffer {
    let elem: Vec<u8> = match dtype {
        DType::F32 => 1e-3f32.to_ne_bytes().to_vec(),
        DType::F64 => 1e-3f64.to_ne_bytes().to_vec(),
        DType::F16 => f16::from_f32(1e-3).to_ne_bytes().to_vec(),
        DType::BF16 => bf16::from_f32(1e-3).to_ne_bytes().to_vec(),
        DType::I8 | DType::U8 => vec![1],
        DType::I32 => 1i32.to_ne_bytes().to_vec(),
        DType::I64 => 1i64.to_ne_bytes().to_vec(),
    };
    let mut b = HostBuffer::zeroed(bytes);
    for c in b.as_bytes_mut().chunks_exact_mut(elem.len()) {
        c.copy_from_slice(&elem);
    }
    b
}

fn bench(c: &mut Criterion) {
    for (bytes, label) in SIZES {
        let mut g = c.benchmark_group(format!("reduce/{label}"));
        g.throughput(Throughput::Bytes(bytes as u64));
        for (dtype, op) in KERNELS {
            let mut dst = filled(bytes, dtype);
            let src = filled(bytes, dtype);
            g.bench_function(format!("{dtype}_{op}"), |b| {
                b.iter(|| {
                    reduce_into(
                        black_box(dst.as_bytes_mut()),
                        black_box(src.as_bytes()),
                        dtype,
                        op,
                    )
                    .unwrap()
                })
            });
        }
        let mut dst = filled(bytes, DType::U8);
        let src = filled(bytes, DType::U8);
        g.bench_function("copy", |b| {
            b.iter(|| {
                black_box(dst.as_bytes_mut()).copy_from_slice(black_box(src.as_bytes()));
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
