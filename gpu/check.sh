#!/usr/bin/env bash
# Every GPU check in one run, in under 8 minutes, on a machine with an NVIDIA
# GPU and possibly no Rust: it runs the binaries gpu/build.sh put in carry/.
#
#   bash gpu/check.sh            # from the repository root, carry/ beside it
#
# Steps (each with a time limit; the whole run is bounded by CHECK_BUDGET_S,
# default 470 s):
#   gpu-model        nvidia-smi: the GPU, driver, memory
#   real-libs        the machine's libnccl / NVRTC load; kernels compile
#   comm-nccl-gpu    world-1 NCCL: every op x dtype against host values,
#                    cudarc buffers through the front, asynchronous calls and
#                    fences, graph capture replayed N times, device permute
#                    bit-exact (DIST_GPU_REQUIRED=1: nothing may skip)
#   watchdog         a call whose stream is blocked past its deadline: the
#                    watchdog aborts and the next call gets the Timeout
#                    (own process)
#   parallel-state-gpu, conformance, main-job, comm-perf: run when build.sh
#                    built them (hooks)
#   bench            device permute >= 70% of memory bandwidth (with torch
#                    side by side) and NcclCommunicator overhead <= 5%
# Exit status: 0 when every step that ran passed. The log is also written to
# $OUT/check.log when OUT is set.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=$ROOT/carry/bin
if [ -n "${OUT:-}" ] && [ -z "${CHECK_LOGGING:-}" ]; then
    mkdir -p "$OUT"
    CHECK_LOGGING=1 exec > >(tee "$OUT/check.log") 2>&1
fi
[ -d "$BIN" ] || { echo "check.sh: no carry/bin (run gpu/build.sh first and carry carry/)"; exit 1; }

# Binaries built elsewhere look for files under the root they were built in.
BUILD_ROOT=$(cat carry/build_root 2>/dev/null || echo /work/main)
if [ "$BUILD_ROOT" != "$ROOT" ] && [ ! -e "$BUILD_ROOT" ]; then
    mkdir -p "$(dirname "$BUILD_ROOT")" && ln -s "$ROOT" "$BUILD_ROOT" && echo "linked $BUILD_ROOT -> $ROOT"
fi
while read -r name rel; do
    [ -n "$rel" ] || continue
    dest=$BUILD_ROOT/$rel
    if [ ! -e "$dest" ]; then
        mkdir -p "$(dirname "$dest")" && ln -s "$BIN/$name" "$dest"
    fi
done <carry/manifest

for d in /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda/lib64 /usr/local/nvidia/lib64; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export DIST_GPU_REQUIRED=1 RUST_BACKTRACE=1 DIST_TIMEOUT_S=${DIST_TIMEOUT_S:-120} PYTHONUNBUFFERED=1
BUDGET=${CHECK_BUDGET_S:-470}
START=$SECONDS
RESULTS=()

# step NAME LIMIT_S CMD...: runs CMD with the smaller of LIMIT_S and what is
# left of the budget; records PASS / FAIL (exit code) / TIMEOUT.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 10 ]; then
        RESULTS+=("$name: NOT RUN (budget spent)")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo
    echo "=== $name (limit ${limit}s) ==="
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    local took=$((SECONDS - t0))
    case $rc in
        0) RESULTS+=("$name: PASS (${took}s)") ;;
        124 | 137) RESULTS+=("$name: TIMEOUT after ${took}s") ;;
        *) RESULTS+=("$name: FAIL (exit $rc, ${took}s)") ;;
    esac
}

have() { [ -x "$BIN/$1" ]; }

step gpu-model 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv
step real-libs 60 "$BIN/check-real-libs"
step comm-nccl-gpu 180 "$BIN/comm-nccl-gpu" --test-threads=1 --skip watchdog_times_out_a_blocked_stream
step watchdog 60 "$BIN/comm-nccl-gpu" --test-threads=1 --exact watchdog_times_out_a_blocked_stream --nocapture
# ---- Hooks (the lead's binaries; see gpu/build.sh):
have parallel-state-gpu && step parallel-state-gpu 120 "$BIN/parallel-state-gpu" --test-threads=1
have conformance && step conformance 120 env DIST_DEVICE=cuda "$BIN/conformance" --test-threads=1
# The main job on the GPU: 2 ranks share the one GPU (NCCL refuses that, so
# the group falls back to host staging with one warning), 1 rank alone.
have main-job && step main-job-2-ranks 120 "$BIN/main-job" --nproc 2 --device cuda --timeout 100
have main-job && step main-job-1-rank 60 "$BIN/main-job" --nproc 1 --device cuda --timeout 50
have comm-perf && step comm-perf 90 "$BIN/comm-perf" --backend nccl --device cuda
step bench 150 "$BIN/gpu-bench" --torch-script "$ROOT/gpu/torch_permute.py"

echo
echo "=== summary ($((SECONDS - START))s) ==="
status=0
for r in "${RESULTS[@]}"; do
    echo "  $r"
    case $r in *": PASS"*) ;; *) status=1 ;; esac
done
exit $status
