//! The criterion loop both backend benches share.

use std::sync::Arc;
use std::time::Duration;

use benches::threads::{Op, ThreadGroup};
use comm_core::BackendFactory;
use criterion::{BenchmarkId, Criterion, Throughput};

/// all_reduce and all_to_all at 4 KiB, 1 MiB and 16 MiB for world 2 and 4;
/// groups are named `{backend}_{op}_w{world}`.
pub fn collectives(c: &mut Criterion, factory: Arc<dyn BackendFactory>) {
    let backend = factory.name().to_string();
    for world in [2usize, 4] {
        let g = ThreadGroup::new(world, factory.clone());
        for (op, name) in [(Op::AllReduce, "all_reduce"), (Op::AllToAll, "all_to_all")] {
            let mut grp = c.benchmark_group(format!("{backend}_{name}_w{world}"));
            grp.sample_size(10)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(2));
            for bytes in [4usize << 10, 1 << 20, 16 << 20] {
                grp.throughput(Throughput::Bytes(bytes as u64));
                grp.bench_with_input(BenchmarkId::from_parameter(bytes), &bytes, |b, &bytes| {
                    b.iter_custom(|iters| g.run(op, bytes, iters).expect("bench iteration"))
                });
            }
            grp.finish();
        }
    }
}
