//! CPU-only tests of the raw NCCL layer against stub `libnccl.so.2` files
//! that the tests compile with `cc`. No GPU, CUDA or NCCL needed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use comm_core::{CommError, DType, Deadline, ReduceOp};
use comm_nccl::raw::{
    version_code, NcclConfig, NcclDataType, NcclLibrary, NcclRedOp, RawComm, MIN_VERSION,
    NCCL_SUCCESS,
};

const STUB_C: &str = r#"
#include <stddef.h>
#include <string.h>
#ifndef STUB_VERSION
#define STUB_VERSION 21903
#endif
#ifndef FAIL_CODE
#define FAIL_CODE 0
#endif
#ifndef INIT_POLLS
#define INIT_POLLS 0
#endif
typedef struct { char internal[128]; } id_t_;
typedef struct { size_t size; unsigned magic; unsigned version; int blocking; int cga; int minc; int maxc; const char* net; int split; } cfg_t;
static int aborts, destroys, finalizes, polls, config_ok = -1;
static int dummy;
int stub_aborts(void) { return aborts; }
int stub_destroys(void) { return destroys; }
int stub_finalizes(void) { return finalizes; }
int stub_config_ok(void) { return config_ok; }
int ncclGetVersion(int* v) { *v = STUB_VERSION; return 0; }
const char* ncclGetErrorString(int r) { return r == 3 ? "internal error - please report this issue to the NCCL developers" : "stub error"; }
const char* ncclGetLastError(void* c) { (void)c; return "stub detail: transport failed"; }
int ncclGetUniqueId(id_t_* id) { if (FAIL_CODE) return FAIL_CODE; for (int i = 0; i < 128; i++) id->internal[i] = (char)(i * 7 + 1); return 0; }
int ncclCommInitRank(void** c, int n, id_t_ id, int r) { (void)n; (void)id; (void)r; *c = &dummy; return 0; }
int ncclCommInitRankConfig(void** c, int n, id_t_ id, int r, cfg_t* cfg) {
  (void)n; (void)r;
  config_ok = cfg->size == sizeof(cfg_t) && cfg->magic == 0xcafebeefu && cfg->version == 21800u
      && cfg->blocking == 0 && cfg->cga == (int)0x80000000 && cfg->net == NULL
      && id.internal[0] == 1 && id.internal[127] == (char)(127 * 7 + 1);
  *c = &dummy; polls = 0;
  return INIT_POLLS == 0 ? 0 : 7;
}
int ncclCommGetAsyncError(void* c, int* st) {
  (void)c;
  polls++;
  *st = (INIT_POLLS < 0 || polls < INIT_POLLS) ? 7 : 0;
  return 0;
}
int ncclCommFinalize(void* c) { (void)c; finalizes++; return 0; }
int ncclCommDestroy(void* c) { (void)c; destroys++; return 0; }
int ncclCommAbort(void* c) { (void)c; aborts++; return 0; }
int ncclAllReduce(const void* s, void* r, size_t n, int d, int o, void* c, void* st) { (void)s;(void)r;(void)n;(void)d;(void)o;(void)c;(void)st; return FAIL_CODE; }
int ncclAllGather(const void* s, void* r, size_t n, int d, void* c, void* st) { (void)s;(void)r;(void)n;(void)d;(void)c;(void)st; return 0; }
int ncclReduceScatter(const void* s, void* r, size_t n, int d, int o, void* c, void* st) { (void)s;(void)r;(void)n;(void)d;(void)o;(void)c;(void)st; return 0; }
int ncclBroadcast(const void* s, void* r, size_t n, int d, int root, void* c, void* st) { (void)s;(void)r;(void)n;(void)d;(void)root;(void)c;(void)st; return 0; }
int ncclReduce(const void* s, void* r, size_t n, int d, int o, int root, void* c, void* st) { (void)s;(void)r;(void)n;(void)d;(void)o;(void)root;(void)c;(void)st; return 0; }
#ifndef OMIT_SEND
int ncclSend(const void* s, size_t n, int d, int p, void* c, void* st) { (void)s;(void)n;(void)d;(void)p;(void)c;(void)st; return 0; }
#endif
int ncclRecv(void* r, size_t n, int d, int p, void* c, void* st) { (void)r;(void)n;(void)d;(void)p;(void)c;(void)st; return 0; }
int ncclGroupStart(void) { return 0; }
int ncclGroupEnd(void) { return 0; }
"#;

/// Builds a stub with the given `-D` defines; `None` (after printing why)
/// when no C compiler is available.
fn stub(dir: &Path, name: &str, defines: &[&str]) -> Option<PathBuf> {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).unwrap();
    let src = sub.join("stub.c");
    std::fs::write(&src, STUB_C).unwrap();
    let out = sub.join("libnccl.so.2");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let mut cmd = Command::new(&cc);
    cmd.args(["-shared", "-fPIC", "-O0", "-o"])
        .arg(&out)
        .arg(&src);
    for d in defines {
        cmd.arg(format!("-D{d}"));
    }
    match cmd.output() {
        Ok(o) if o.status.success() => Some(out),
        Ok(o) => panic!(
            "building the stub with {cc} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            eprintln!("skipped: no C compiler `{cc}` to build the stub libnccl ({e})");
            None
        }
    }
}

fn expect_unavailable(r: Result<NcclLibrary, CommError>, needle: &str) -> String {
    match r {
        Err(CommError::BackendUnavailable { backend, reason }) => {
            assert_eq!(backend, "nccl");
            assert!(
                reason.contains(needle),
                "reason `{reason}` lacks `{needle}`"
            );
            reason
        }
        other => panic!("expected BackendUnavailable, got {other:?}"),
    }
}

fn sym<T: Copy>(path: &Path, name: &str) -> (libloading::Library, T) {
    // SAFETY: the stub library is ours; the symbol types match the C source.
    unsafe {
        let l = libloading::Library::new(path).unwrap();
        let f = *l.get::<T>(name.as_bytes()).unwrap();
        (l, f)
    }
}

fn counter(path: &Path, name: &str) -> i32 {
    let (_l, f) = sym::<unsafe extern "C" fn() -> i32>(path, name);
    // SAFETY: a C function `int f(void)` of the stub.
    unsafe { f() }
}

#[test]
fn missing_library_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let r = NcclLibrary::open(dir.path().join("no-such-dir/libnccl.so.2"));
    expect_unavailable(r, "cannot load");
}

#[test]
fn stub_resolves_and_reports_version() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = stub(dir.path(), "ok", &[]) else {
        return;
    };
    let lib = NcclLibrary::open(&p).expect("stub opens");
    assert_eq!(lib.version().to_string(), "2.19.3");
    assert_eq!(lib.path(), p.as_os_str());
    assert!(
        lib.api().comm_split.is_none(),
        "the stub has no ncclCommSplit (optional)"
    );
}

#[test]
fn stub_missing_symbol_is_unavailable_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = stub(dir.path(), "nosend", &["OMIT_SEND"]) else {
        return;
    };
    expect_unavailable(NcclLibrary::open(&p), "`ncclSend`");
}

#[test]
fn stub_old_version_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = stub(dir.path(), "old", &["STUB_VERSION=21703"]) else {
        return;
    };
    let reason = expect_unavailable(NcclLibrary::open(&p), "2.17.3");
    assert!(reason.contains(&MIN_VERSION.to_string()), "{reason}");
    // The pre-2.9 encoding decodes too (2.8.4 = 2804).
    let Some(p) = stub(dir.path(), "older", &["STUB_VERSION=2804"]) else {
        return;
    };
    expect_unavailable(NcclLibrary::open(&p), "2.8.4");
}

#[test]
fn stub_unique_id_bytes_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = stub(dir.path(), "uid", &[]) else {
        return;
    };
    let lib = NcclLibrary::open(&p).unwrap();
    let id = lib.get_unique_id().unwrap();
    let want: Vec<u8> = (0..128u32).map(|i| (i * 7 + 1) as u8).collect();
    assert_eq!(id.as_bytes(), &want[..]);
    let back = comm_nccl::raw::NcclUniqueId::from_bytes(id.as_bytes()).unwrap();
    assert_eq!(back, id);
    assert!(comm_nccl::raw::NcclUniqueId::from_bytes(&want[..100]).is_err());
}

#[test]
fn stub_errors_map_to_nccl_error() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = stub(dir.path(), "fail", &["FAIL_CODE=3"]) else {
        return;
    };
    let lib = NcclLibrary::open(&p).unwrap();
    match lib.get_unique_id() {
        Err(CommError::Nccl {
            code,
            name,
            message,
        }) => {
            assert_eq!(code, 3);
            assert_eq!(name, "ncclInternalError");
            assert!(message.contains("ncclGetUniqueId"), "{message}");
            assert!(
                message.contains("internal error - please report"),
                "{message}"
            );
            assert!(
                message.contains("stub detail: transport failed"),
                "{message}"
            );
        }
        other => panic!("expected CommError::Nccl, got {other:?}"),
    }
    // A collective through the symbol table.
    // SAFETY: the stub ignores every pointer.
    let rc = unsafe {
        (lib.api().all_reduce)(
            std::ptr::null(),
            std::ptr::null_mut(),
            4,
            NcclDataType::from(DType::BF16),
            NcclRedOp::from(ReduceOp::Avg),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    let e = lib.check(rc, "ncclAllReduce").unwrap_err();
    assert!(e.is_fatal());
    let text = e.to_string();
    assert!(text.contains("NCCL error 3 (ncclInternalError)"), "{text}");
}

#[test]
fn enum_numbering_matches_nccl() {
    let dts = [
        (DType::I8, 0),
        (DType::U8, 1),
        (DType::I32, 2),
        (DType::I64, 4),
        (DType::F16, 6),
        (DType::F32, 7),
        (DType::F64, 8),
        (DType::BF16, 9),
    ];
    for (d, code) in dts {
        assert_eq!(NcclDataType::from(d) as i32, code, "{d}");
    }
    let ops = [
        (ReduceOp::Sum, 0),
        (ReduceOp::Prod, 1),
        (ReduceOp::Max, 2),
        (ReduceOp::Min, 3),
        (ReduceOp::Avg, 4),
    ];
    for (o, code) in ops {
        assert_eq!(NcclRedOp::from(o) as i32, code, "{o}");
    }
    assert_eq!(std::mem::size_of::<comm_nccl::raw::NcclUniqueId>(), 128);
    assert_eq!(std::mem::size_of::<NcclConfig>(), 48);
    assert_eq!(version_code(2, 18, 0), 21800);
    assert_eq!(version_code(2, 8, 4), 2804);
    assert_eq!(comm_nccl::raw::result_name(7), "ncclInProgress");
}

fn leak(p: &Path) -> &'static NcclLibrary {
    Box::leak(Box::new(NcclLibrary::open(p).unwrap()))
}

#[test]
fn stub_nonblocking_init_polls_until_ready_then_finalizes() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = stub(dir.path(), "init", &["INIT_POLLS=5"]) else {
        return;
    };
    let lib = leak(&p);
    let id = lib.get_unique_id().unwrap();
    let d = Deadline::after(Duration::from_secs(10));
    let mut c = RawComm::init(lib, &id, 1, 2, &d, "test").expect("init settles");
    assert_eq!(
        counter(&p, "stub_config_ok"),
        1,
        "config layout / blocking=0 / id"
    );
    assert!(!c.handle().is_null());
    c.shutdown(&Deadline::after(Duration::from_secs(5)))
        .unwrap();
    assert!(c.is_closed());
    assert_eq!(counter(&p, "stub_finalizes"), 1);
    assert_eq!(counter(&p, "stub_destroys"), 1);
    drop(c);
    assert_eq!(
        counter(&p, "stub_aborts"),
        0,
        "an orderly shutdown does not abort"
    );
}

#[test]
fn stub_member_that_never_joins_times_out_and_aborts() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = stub(dir.path(), "hang", &["INIT_POLLS=-1"]) else {
        return;
    };
    let lib = leak(&p);
    let id = lib.get_unique_id().unwrap();
    let t0 = Instant::now();
    let d = Deadline::after(Duration::from_millis(300));
    match RawComm::init(lib, &id, 0, 4, &d, "tp:0") {
        Err(CommError::Timeout {
            operation, missing, ..
        }) => {
            assert!(operation.contains("ncclCommInitRankConfig"), "{operation}");
            assert!(operation.contains("tp:0"), "{operation}");
            assert!(!missing.is_empty());
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(
        counter(&p, "stub_aborts"),
        1,
        "the half-built communicator is aborted"
    );
    assert_eq!(counter(&p, "stub_destroys"), 0);
}

#[test]
fn stub_dropped_comm_is_aborted_not_leaked() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = stub(dir.path(), "drop", &[]) else {
        return;
    };
    let lib = leak(&p);
    let id = lib.get_unique_id().unwrap();
    let c = RawComm::init(
        lib,
        &id,
        0,
        1,
        &Deadline::after(Duration::from_secs(5)),
        "x",
    )
    .unwrap();
    assert_eq!(NCCL_SUCCESS, c.async_state().unwrap());
    drop(c);
    assert_eq!(counter(&p, "stub_aborts"), 1);
}

#[test]
fn cuda_absence_is_an_error_not_a_panic() {
    // Here (no driver) this is BackendUnavailable; on a GPU machine Ok(n > 0).
    match comm_nccl::cuda_device_count() {
        Ok(n) => {
            assert!(n > 0);
            eprintln!("CUDA present: {n} device(s)");
        }
        Err(CommError::BackendUnavailable { backend, reason }) => {
            assert_eq!(backend, "cuda");
            eprintln!("CUDA unavailable (expected without a GPU): {reason}");
            assert!(comm_nccl::CudaDevice::get(0).is_err());
            assert!(comm_nccl::to_cuda(&comm_core::Tensor::from_vec1(vec![1f32]), 0).is_err());
            let meta = comm_core::TensorMetadata {
                device: comm_core::Device::Cuda(0),
                dtype: DType::F32,
                shape: vec![2],
            };
            assert!(matches!(
                comm_nccl::zeros_cuda(&meta),
                Err(CommError::BackendUnavailable { .. })
            ));
        }
        Err(e) => panic!("unexpected error kind: {e:?}"),
    }
    match comm_nccl::nccl_available() {
        Ok(info) => eprintln!("NCCL available: {info:?}"),
        Err(CommError::BackendUnavailable { backend, reason }) => {
            assert_eq!(backend, "nccl");
            eprintln!("NCCL unavailable: {reason}");
        }
        Err(e) => panic!("unexpected error kind: {e:?}"),
    }
}

#[test]
fn communicator_without_cuda_is_unavailable() {
    if comm_nccl::cuda_device_count().is_ok() {
        eprintln!("skipped: a GPU is present (covered by tests/gpu.rs)");
        return;
    }
    let store = dist_utils::HashStore::new();
    let r = comm_nccl::NcclCommunicator::new(std::sync::Arc::new(store), 0, 1, Default::default());
    assert!(
        matches!(r, Err(CommError::BackendUnavailable { .. })),
        "{r:?}"
    );
}
