//! comm-perf and criterion benchmarks for the distributed layer.
