//! CPU-only tests of the raw NCCL layer against stub `libnccl.so.2` files
//! that the tests compile with `cc`, and of the watchdog driven by a stub
//! libnccl and a completion tracker the test controls. No GPU, CUDA or NCCL
//! needed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_core::{
    BackendFactory, CallDesc, Collective, CommError, DType, Deadline, Device, ReduceOp, Tensor,
};
use comm_nccl::raw::{
    result_name, version_code, NcclConfig, NcclDataType, NcclLibrary, NcclRedOp, NcclUniqueId,
    RawComm, MIN_VERSION, NCCL_SUCCESS,
};
use comm_nccl::watchdog::{Tracker, Watchdog};
use comm_nccl::{NcclCommunicator, NcclFactory, NcclOptions};

const STUB_C: &str = r#"
#include <stddef.h>
#include <string.h>
#include <unistd.h>
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
static int aborts, destroys, finalizes, polls, config_ok = -1, async_code = 0;
static int dummy;
int stub_aborts(void) { return aborts; }
int stub_destroys(void) { return destroys; }
int stub_finalizes(void) { return finalizes; }
int stub_config_ok(void) { return config_ok; }
void stub_set_async(int code) { async_code = code; }
/* While set, ncclCommGetAsyncError / ncclCommAbort do not return: an NCCL
   call stuck behind a busy driver or device. */
static volatile int block_async, block_abort;
void stub_block_async(int b) { block_async = b; }
void stub_block_abort(int b) { block_abort = b; }
int ncclGetVersion(int* v) { *v = STUB_VERSION; return 0; }
const char* ncclGetErrorString(int r) { return r == 3 ? "internal error - please report this issue to the NCCL developers" : r == 6 ? "remote process exited or there was a network error" : "stub error"; }
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
  while (block_async) usleep(1000);
  polls++;
  *st = (INIT_POLLS < 0 || polls < INIT_POLLS) ? 7 : async_code;
  return 0;
}
int ncclCommFinalize(void* c) { (void)c; finalizes++; return 0; }
int ncclCommDestroy(void* c) { (void)c; destroys++; return 0; }
int ncclCommAbort(void* c) { (void)c; while (block_abort) usleep(1000); aborts++; return 0; }
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
    let back = NcclUniqueId::from_bytes(id.as_bytes()).unwrap();
    assert_eq!(back, id);
    assert!(NcclUniqueId::from_bytes(&want[..100]).is_err());
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
    // A collective through its wrapper.
    // SAFETY: the stub ignores every pointer.
    let r = unsafe {
        lib.all_reduce(
            std::ptr::null(),
            std::ptr::null_mut(),
            4,
            NcclDataType::from(DType::BF16),
            NcclRedOp::from(ReduceOp::Avg),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    let e = r.unwrap_err();
    assert!(e.is_fatal());
    let text = e.to_string();
    assert!(text.contains("NCCL error 3 (ncclInternalError)"), "{text}");
    assert!(text.contains("ncclAllReduce"), "{text}");
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
    assert_eq!(std::mem::size_of::<NcclUniqueId>(), 128);
    assert_eq!(std::mem::size_of::<NcclConfig>(), 48);
    assert_eq!(version_code(2, 18, 0), 21800);
    assert_eq!(version_code(2, 8, 4), 2804);
    assert_eq!(result_name(7), "ncclInProgress");
}

fn leak(p: &Path) -> &'static NcclLibrary {
    Box::leak(Box::new(NcclLibrary::open(p).unwrap()))
}

fn init(lib: &'static NcclLibrary, world: usize) -> RawComm {
    let id = lib.get_unique_id().unwrap();
    RawComm::init(
        lib,
        &id,
        0,
        world,
        &Deadline::after(Duration::from_secs(10)),
        "tp:0",
    )
    .unwrap()
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
    let c = RawComm::init(lib, &id, 1, 2, &d, "test").expect("init settles");
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
    assert!(matches!(c.async_state(), Err(CommError::Aborted(_))));
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
            operation, keys, ..
        }) => {
            assert!(operation.contains("ncclCommInitRankConfig"), "{operation}");
            assert!(operation.contains("tp:0"), "{operation}");
            assert!(
                keys.iter().any(|k| k.contains("members of `tp:0`")),
                "{keys:?}"
            );
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
    let c = init(lib, 1);
    assert_eq!(NCCL_SUCCESS, c.async_state().unwrap());
    drop(c);
    assert_eq!(counter(&p, "stub_aborts"), 1);
}

#[test]
fn abort_is_idempotent_and_closes_the_handle_for_every_user() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = stub(dir.path(), "abort", &[]) else {
        return;
    };
    let c = std::sync::Arc::new(init(leak(&p), 2));
    let other = c.clone();
    // Abort from another thread, as the watchdog does.
    let aborted = std::thread::spawn(move || other.abort()).join().unwrap();
    assert!(aborted);
    assert!(!c.abort(), "a second abort does nothing");
    assert!(matches!(c.with(|_, _| Ok(())), Err(CommError::Aborted(_))));
    drop(c);
    assert_eq!(counter(&p, "stub_aborts"), 1);
}

/// A [`Tracker`] the test drives: `issued` is what a mark covers, `done`
/// what has completed; while `hold_mark` / `hold_reached` are set, marking
/// / querying does not return (a CUDA call stuck in the driver), for at
/// most [`HOLD_LIMIT`] so a failing test ends.
#[derive(Clone, Default)]
struct FakeStream {
    issued: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
    marks: Arc<AtomicU64>,
    hold_mark: Arc<AtomicBool>,
    hold_reached: Arc<AtomicBool>,
    /// Set while a call is held.
    holding: Arc<AtomicBool>,
}

const HOLD_LIMIT: Duration = Duration::from_secs(30);

impl FakeStream {
    fn hold(&self, gate: &AtomicBool) {
        let t0 = Instant::now();
        while gate.load(Ordering::SeqCst) && t0.elapsed() < HOLD_LIMIT {
            self.holding.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
        }
        self.holding.store(false, Ordering::SeqCst);
    }
}

impl Tracker for FakeStream {
    type Mark = u64;
    fn mark(&mut self) -> comm_core::Result<u64> {
        self.hold(&self.hold_mark);
        self.marks.fetch_add(1, Ordering::SeqCst);
        Ok(self.issued.load(Ordering::SeqCst))
    }
    fn reached(&mut self, mark: &u64) -> comm_core::Result<bool> {
        self.hold(&self.hold_reached);
        Ok(self.done.load(Ordering::SeqCst) >= *mark)
    }
}

/// Runs `f`, asserting it returned within 2 s (calls that must not wait for
/// CUDA, NCCL or the watchdog's threads).
fn prompt<R>(what: &str, f: impl FnOnce() -> R) -> R {
    let t0 = Instant::now();
    let r = f();
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "{what} took {:?}: it waited for a blocked call",
        t0.elapsed()
    );
    r
}

fn expect_timeout(e: Option<CommError>, seq: u64) {
    match e {
        Some(CommError::Timeout {
            operation, keys, ..
        }) => {
            assert!(
                operation.contains(&format!("all_reduce #{seq}")),
                "{operation}"
            );
            assert!(
                keys.iter().any(|k| k.contains("members of group `tp:0`")),
                "{keys:?}"
            );
        }
        other => panic!("expected a Timeout, got {other:?}"),
    }
}

fn desc(seq: u64) -> CallDesc {
    CallDesc::new(Collective::AllReduce, seq, DType::F32, 1024).with_reduce(ReduceOp::Sum)
}

/// Polls `cond` until it holds or 10 s pass.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let d = Deadline::after(Duration::from_secs(10));
    while !cond() {
        assert!(!d.expired(), "{what} did not happen within 10 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn watchdog_times_out_work_that_never_completes_and_aborts() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = stub(dir.path(), "wd-hang", &[]) else {
        return;
    };
    let fake = FakeStream::default();
    let w = Watchdog::start(init(leak(&p), 2), "tp:0".into(), 2, fake.clone()).unwrap();
    let t0 = Instant::now();
    fake.issued.store(1, Ordering::SeqCst);
    w.watch(desc(3), Deadline::after(Duration::from_millis(300)));
    eventually("the watchdog timeout", || w.error().is_some());
    assert!(t0.elapsed() >= Duration::from_millis(300));
    match w.error() {
        Some(CommError::Timeout {
            operation,
            keys,
            waited,
            ..
        }) => {
            assert!(operation.contains("all_reduce #3"), "{operation}");
            assert!(
                keys.iter().any(|k| k.contains("members of group `tp:0`")),
                "{keys:?}"
            );
            assert!(waited >= Duration::from_millis(300));
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(w.check().is_err(), "the next call gets the error");
    // The watchdog's thread aborts right after storing the error.
    eventually("the abort", || counter(&p, "stub_aborts") == 1);
    assert!(w.raw().is_closed());
}

#[test]
fn watchdog_retires_completed_work_without_error() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = stub(dir.path(), "wd-ok", &[]) else {
        return;
    };
    let fake = FakeStream::default();
    let w = Watchdog::start(init(leak(&p), 2), "tp:0".into(), 2, fake.clone()).unwrap();
    let deadline = Deadline::after(Duration::from_millis(400));
    for seq in 1..=3 {
        fake.issued.store(seq, Ordering::SeqCst);
        w.watch(desc(seq), deadline);
    }
    eventually("a mark covering the calls", || {
        fake.marks.load(Ordering::SeqCst) > 0
    });
    assert_eq!(w.pending(), 3, "nothing completed yet");
    fake.done.store(3, Ordering::SeqCst);
    eventually("completed calls retired", || w.pending() == 0);
    // Past the calls' deadline: completed work is not a timeout.
    while !deadline.expired() {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(w.error().is_none(), "{:?}", w.error());
    assert_eq!(counter(&p, "stub_aborts"), 0);
}

#[test]
fn watchdog_turns_an_async_nccl_error_into_the_next_calls_error() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = stub(dir.path(), "wd-async", &[]) else {
        return;
    };
    let fake = FakeStream::default();
    let w = Watchdog::start(init(leak(&p), 2), "tp:0".into(), 2, fake.clone()).unwrap();
    // Work is pending (never completes, long deadline), then a peer fails.
    fake.issued.store(1, Ordering::SeqCst);
    w.watch(desc(1), Deadline::after(Duration::from_secs(600)));
    let (_l, set_async) = sym::<unsafe extern "C" fn(i32)>(&p, "stub_set_async");
    // SAFETY: `void stub_set_async(int)` of the stub.
    unsafe { set_async(6) };
    eventually("the asynchronous error", || w.error().is_some());
    match w.check() {
        Err(CommError::Nccl {
            code,
            name,
            message,
        }) => {
            assert_eq!((code, name.as_str()), (6, "ncclRemoteError"));
            assert!(message.contains("remote process exited"), "{message}");
        }
        other => panic!("expected the NCCL error, got {other:?}"),
    }
    eventually("the abort", || counter(&p, "stub_aborts") == 1);
}

#[test]
fn watchdog_sees_async_errors_while_idle() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = stub(dir.path(), "wd-idle", &[]) else {
        return;
    };
    let w = Watchdog::start(init(leak(&p), 2), "tp:0".into(), 2, FakeStream::default()).unwrap();
    let (_l, set_async) = sym::<unsafe extern "C" fn(i32)>(&p, "stub_set_async");
    // SAFETY: `void stub_set_async(int)` of the stub.
    unsafe { set_async(2) };
    eventually("the idle poll", || w.error().is_some());
    assert!(matches!(w.error(), Some(CommError::Nccl { code: 2, .. })));
    eventually("the abort", || counter(&p, "stub_aborts") == 1);
}

/// The GPU failure of the first watchdog (one thread that polled CUDA and
/// then checked deadlines): a completion query that does not return (on
/// the GPU, a CUDA call blocked in the driver) meant no timeout at all.
/// Deadlines now hold whatever the queries do.
#[test]
fn watchdog_deadline_holds_while_completion_queries_block() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = stub(dir.path(), "wd-stuck-query", &[]) else {
        return;
    };
    let fake = FakeStream::default();
    fake.hold_reached.store(true, Ordering::SeqCst);
    let w = Watchdog::start(init(leak(&p), 2), "tp:0".into(), 2, fake.clone()).unwrap();
    let t0 = Instant::now();
    fake.issued.store(1, Ordering::SeqCst);
    prompt("watch", || {
        w.watch(desc(1), Deadline::after(Duration::from_millis(300)))
    });
    eventually("the poller stuck in a query", || {
        fake.holding.load(Ordering::SeqCst)
    });
    eventually("the watchdog timeout", || {
        prompt("error", || w.error()).is_some()
    });
    assert!(t0.elapsed() >= Duration::from_millis(300));
    expect_timeout(w.error(), 1);
    assert!(
        fake.holding.load(Ordering::SeqCst),
        "the query is still stuck"
    );
    eventually("the abort", || counter(&p, "stub_aborts") == 1);
    assert!(prompt("check", || w.check()).is_err());
    fake.hold_reached.store(false, Ordering::SeqCst);
}

/// Marking (a CUDA event record) that does not return holds no lock the
/// calls need: registering, checking and counting stay prompt, and the
/// deadline still holds.
#[test]
fn watchdog_calls_never_wait_for_a_blocked_mark() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = stub(dir.path(), "wd-stuck-mark", &[]) else {
        return;
    };
    let fake = FakeStream::default();
    fake.hold_mark.store(true, Ordering::SeqCst);
    let w = Watchdog::start(init(leak(&p), 2), "tp:0".into(), 2, fake.clone()).unwrap();
    fake.issued.store(1, Ordering::SeqCst);
    w.watch(desc(1), Deadline::after(Duration::from_millis(300)));
    eventually("the poller stuck in a mark", || {
        fake.holding.load(Ordering::SeqCst)
    });
    for seq in 2..=4 {
        prompt("watch", || {
            w.watch(desc(seq), Deadline::after(Duration::from_secs(600)))
        });
    }
    assert_eq!(prompt("pending", || w.pending()), 4);
    eventually("the watchdog timeout", || {
        prompt("error", || w.error()).is_some()
    });
    expect_timeout(w.error(), 1);
    eventually("the abort", || counter(&p, "stub_aborts") == 1);
    fake.hold_mark.store(false, Ordering::SeqCst);
}

/// An NCCL call of the poller that does not return (`ncclCommGetAsyncError`
/// behind a busy driver): the deadline holds, and the abort runs once it
/// returns.
#[test]
fn watchdog_deadline_holds_while_nccl_polls_block() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = stub(dir.path(), "wd-stuck-nccl", &[]) else {
        return;
    };
    let fake = FakeStream::default();
    let w = Watchdog::start(init(leak(&p), 2), "tp:0".into(), 2, fake.clone()).unwrap();
    let (_l, block) = sym::<unsafe extern "C" fn(i32)>(&p, "stub_block_async");
    // SAFETY: `void stub_block_async(int)` of the stub.
    unsafe { block(1) };
    fake.issued.store(1, Ordering::SeqCst);
    w.watch(desc(1), Deadline::after(Duration::from_millis(300)));
    eventually("the watchdog timeout", || {
        prompt("error", || w.error()).is_some()
    });
    expect_timeout(w.error(), 1);
    assert_eq!(
        counter(&p, "stub_aborts"),
        0,
        "the abort waits for the poll"
    );
    // SAFETY: as above.
    unsafe { block(0) };
    eventually("the abort", || counter(&p, "stub_aborts") == 1);
}

/// The front's abort (after a fatal error) returns at once even when
/// `ncclCommAbort` blocks (it frees device memory, which waits for running
/// kernels): the abort runs on the watchdog's thread, and every later use
/// fails at once instead of queueing behind it.
#[test]
fn abort_returns_at_once_while_ncclcommabort_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = stub(dir.path(), "wd-slow-abort", &[]) else {
        return;
    };
    let w = Watchdog::start(init(leak(&p), 2), "tp:0".into(), 2, FakeStream::default()).unwrap();
    let (_l, block) = sym::<unsafe extern "C" fn(i32)>(&p, "stub_block_abort");
    // SAFETY: `void stub_block_abort(int)` of the stub.
    unsafe { block(1) };
    prompt("abort", || {
        w.abort(CommError::Aborted("aborted by the test".into()))
    });
    assert!(matches!(w.error(), Some(CommError::Aborted(m)) if m.contains("by the test")));
    eventually("the abort started", || w.raw().is_closed());
    let r = prompt("a call during the abort", || w.raw().with(|_, _| Ok(())));
    assert!(matches!(r, Err(CommError::Aborted(_))), "{r:?}");
    assert_eq!(counter(&p, "stub_aborts"), 0);
    // SAFETY: as above.
    unsafe { block(0) };
    eventually("the abort", || counter(&p, "stub_aborts") == 1);
    drop(w);
    assert_eq!(counter(&p, "stub_aborts"), 1, "aborted once");
}

#[test]
fn watchdog_makes_no_mark_during_graph_capture() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = stub(dir.path(), "wd-capture", &[]) else {
        return;
    };
    let fake = FakeStream::default();
    let w = Watchdog::start(init(leak(&p), 2), "tp:0".into(), 2, fake.clone()).unwrap();
    w.set_capturing(true);
    fake.issued.store(1, Ordering::SeqCst);
    w.watch(desc(1), Deadline::after(Duration::from_secs(600)));
    // The watchdog keeps polling (async errors) but records nothing.
    let polls = Instant::now();
    while polls.elapsed() < Duration::from_millis(200) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        fake.marks.load(Ordering::SeqCst),
        0,
        "a mark was recorded during capture"
    );
    w.set_capturing(false);
    eventually("a mark after the capture", || {
        fake.marks.load(Ordering::SeqCst) > 0
    });
    fake.done.store(1, Ordering::SeqCst);
    eventually("the call retired", || w.pending() == 0);
    assert!(w.error().is_none());
}

#[test]
fn cuda_absence_is_an_error_not_a_panic() {
    comm_nccl::install();
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
            assert!(comm_nccl::device_uuid(0).is_err());
            let t = Tensor::from_vec1(vec![1f32]);
            assert!(matches!(
                t.to_device(Device::Cuda(0)),
                Err(CommError::BackendUnavailable { .. })
            ));
            let meta = comm_core::TensorMetadata {
                device: Device::Cuda(0),
                dtype: DType::F32,
                shape: vec![2],
            };
            assert!(matches!(
                Tensor::zeros_on(&meta),
                Err(CommError::BackendUnavailable { .. })
            ));
            assert_eq!(comm_core::visible_devices(), 0);
            let f = NcclFactory;
            assert!(matches!(
                f.available(Device::Cuda(0)),
                Err(CommError::BackendUnavailable { .. })
            ));
        }
        Err(e) => panic!("unexpected error kind: {e:?}"),
    }
    assert!(matches!(
        NcclFactory.available(Device::Cpu),
        Err(CommError::BackendUnavailable { .. })
    ));
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
    let r = NcclCommunicator::new(&store, 0, 1, NcclOptions::new(0));
    assert!(
        matches!(r, Err(CommError::BackendUnavailable { .. })),
        "{r:?}"
    );
    let ctx = comm_core::GroupContext::new(Arc::new(store), 0, 1).device(Device::Cuda(0));
    assert!(matches!(
        NcclFactory.create(&ctx),
        Err(CommError::BackendUnavailable { .. })
    ));
}
