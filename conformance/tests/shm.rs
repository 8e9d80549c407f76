//! The conformance kit over the shared-memory backend (comm-shm's `ShmFactory`):
//! real processes at world sizes 1 to 5 and >= 64 MiB, threads, call
//! mismatches and failures naming the culprit.
use comm_shm::ShmFactory;

comm_conformance::conformance_tests! { ShmFactory::default();
    basic_processes_world_1: run_processes(1, Basic),
    basic_processes_world_2: run_processes(2, Basic),
    basic_processes_world_3: run_processes(3, Basic),
    basic_processes_world_4: run_processes(4, Basic),
    basic_processes_world_5: run_processes(5, Basic),
    large_processes_world_2: run_processes(2, Large),
    basic_threads_world_2: run_threads(2, Basic),
    mismatch_processes_world_3: run_processes(3, Mismatch),
    failures_processes_world_3: run_processes(3, Failures),
    failures_threads_world_2: run_threads(2, Failures),
}
