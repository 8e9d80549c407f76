//! The skeleton backend passes the conformance kit, as threads of this
//! test process and as real processes (the kit re-executes this test
//! binary once per rank), in every mode.

use skeleton_backend::SkeletonFactory;

comm_conformance::conformance_tests! { SkeletonFactory;
    basic_threads_world_1: run_threads(1, Basic),
    basic_threads_world_3: run_threads(3, Basic),
    basic_processes_world_2: run_processes(2, Basic),
    mismatch_threads_world_3: run_threads(3, Mismatch),
    mismatch_processes_world_2: run_processes(2, Mismatch),
    failures_threads_world_3: run_threads(3, Failures),
    failures_processes_world_3: run_processes(3, Failures),
    #[ignore = "64 MiB per rank through the store: about 40 s in a debug build"]
    large_threads_world_2: run_threads(2, Large),
}
