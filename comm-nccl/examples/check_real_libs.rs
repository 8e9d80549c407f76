//! Checks against the real NCCL and NVRTC libraries that need no GPU
//! (`gpu/check_real_libs.sh` runs it with the libraries of the
//! `nvidia-nccl-cu12` and `nvidia-cuda-nvrtc-cu12` wheels):
//!
//! 1. libnccl loads (`DIST_NCCL_LIBRARY` or the loader path): its version,
//!    a unique id, and a communicator init that fails with a clear NCCL
//!    error (no GPU) or a deadline (a GPU, but no second member), never a
//!    crash;
//! 2. the permute kernels compile with libnvrtc to PTX, and the PTX has
//!    every entry point the launcher loads.
//!
//! Exits non-zero when a check fails.

use std::process::ExitCode;
use std::time::Duration;

use comm_core::Deadline;
use comm_nccl::kernel::{compile_ptx, entry_point_names, ptx_entry_points};
use comm_nccl::{NcclLibrary, RawComm};

fn nccl() -> bool {
    let lib = match NcclLibrary::load() {
        Ok(l) => l,
        Err(e) => {
            println!("nccl: FAILED to load: {e}");
            return false;
        }
    };
    println!(
        "nccl: loaded {} (NCCL {})",
        lib.path().to_string_lossy(),
        lib.version()
    );
    let id = match lib.get_unique_id() {
        Ok(id) => id,
        Err(e) => {
            println!("nccl: FAILED ncclGetUniqueId: {e}");
            return false;
        }
    };
    let nonzero = id.as_bytes().iter().filter(|b| **b != 0).count();
    println!(
        "nccl: ncclGetUniqueId -> 128 bytes ({nonzero} non-zero), first 16: {}",
        comm_core::auth::to_hex(&id.as_bytes()[..16])
    );
    if nonzero == 0 {
        println!("nccl: FAILED: the unique id is all zeros");
        return false;
    }
    let deadline = Deadline::after(Duration::from_secs(10));
    match RawComm::init(lib, &id, 0, 2, &deadline, "check") {
        Ok(_) => {
            println!("nccl: FAILED: a communicator of 2 initialised with one member");
            false
        }
        Err(e) => {
            println!("nccl: ncclCommInitRankConfig (rank 0 of 2) failed cleanly: {e}");
            true
        }
    }
}

fn nvrtc() -> bool {
    let want = entry_point_names();
    let mut ok = true;
    for arch in [None, Some("compute_80"), Some("compute_90")] {
        let t0 = std::time::Instant::now();
        match compile_ptx(arch) {
            Ok(ptx) => {
                let got = ptx_entry_points(&ptx);
                let missing: Vec<_> = want.iter().filter(|w| !got.contains(w)).collect();
                let header: Vec<&str> = ptx
                    .lines()
                    .filter(|l| l.starts_with(".version") || l.starts_with(".target"))
                    .collect();
                let version = header.join(", ");
                println!(
                    "nvrtc ({}): {} bytes of PTX in {:.2?}, {version}, {} entry points{}",
                    arch.unwrap_or("default arch"),
                    ptx.len(),
                    t0.elapsed(),
                    got.len(),
                    if missing.is_empty() {
                        String::new()
                    } else {
                        format!(", MISSING {missing:?}")
                    }
                );
                if arch.is_none() {
                    println!("nvrtc: entry points: {}", got.join(" "));
                }
                if let Ok(path) = std::env::var("DUMP_PTX") {
                    let _ = std::fs::write(format!("{path}.{}", arch.unwrap_or("default")), &ptx);
                }
                ok &= missing.is_empty();
            }
            Err(e) => {
                println!("nvrtc ({}): FAILED: {e}", arch.unwrap_or("default arch"));
                ok = false;
            }
        }
    }
    ok
}

fn main() -> ExitCode {
    let a = nccl();
    let b = nvrtc();
    println!(
        "{}",
        if a && b {
            "check_real_libs: OK"
        } else {
            "check_real_libs: FAILED"
        }
    );
    if a && b {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
