#!/usr/bin/env bash
# Every GPU check in one run, in under 6 minutes, on a machine with an NVIDIA
# GPU and possibly no Rust: it runs the binaries gpu/build.sh put in carry/.
#
#   bash gpu/check.sh            # from the repository root, carry/ beside it
#
# Steps, each under `timeout` (the whole run is bounded by CHECK_BUDGET_S,
# default 330 s; a step that would start with under 10 s left is NOT RUN):
#   gpu-model          nvidia-smi: the GPU, driver, memory
#   real-libs          the machine's libnccl / NVRTC load; kernels compile
#   comm-nccl-gpu      world-1 NCCL: every op x dtype against host values,
#                      cudarc buffers through the front, asynchronous calls
#                      and fences, graph capture replayed N times, device
#                      permute bit-exact (DIST_GPU_REQUIRED=1: nothing skips)
#   watchdog           a call whose stream is held by a spin kernel past its
#                      1 s deadline: the Timeout arrives while the stream is
#                      still blocked, the next call is refused at once, the
#                      communicator is aborted (own process)
#   main-job-*         parallel-state's Ulysses attention example: 2 ranks
#                      sharing the GPU (host staging), 1 rank
#   bench              device permute >= 70% of memory bandwidth (torch side
#                      by side) and the per-call cost of NcclCommunicator and
#                      the front over raw NCCL
#   conformance-*      the conformance suite's ranks on CUDA tensors: shm and
#                      tcp with 2-4 processes sharing the GPU (host staging),
#                      shm at 64 MiB, nccl at world 1
#   comm-perf-nccl     comm-perf --backend nccl --device cuda, world 1
#   torch-c10d         benches/peers/c10d_store_check.py: our c10d store
#                      client and server against torch's TCPStore, and
#                      torchrun (--standalone and static, 2 and 4 processes)
#                      starting our rendezvous probe
#   torchrun-*         torchrun --standalone --no-python starting comm-perf
#                      (shm, 2 processes, --check) and the main job (2 and 4
#                      processes on the GPU): our ranks on torchrun's agent
#                      store (skipped without torch)
# Steps whose binary gpu/build.sh did not build print NOT BUILT.
# Exit status: 0 when every step that ran passed (NOT BUILT and SKIPPED are
# listed in the summary, not counted as failures). The log is also written to
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
BUDGET=${CHECK_BUDGET_S:-330}
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
    echo "=== $name (limit ${limit}s, $((SECONDS - START))s into the run) ==="
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

# needs NAME STEP...: true when carry/bin/NAME exists; otherwise records
# each STEP as NOT BUILT.
needs() {
    local bin=$1
    shift
    [ -x "$BIN/$bin" ] && return 0
    local s
    for s in "$@"; do RESULTS+=("$s: NOT BUILT ($bin)"); done
    return 1
}

step gpu-model 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv
step real-libs 60 "$BIN/check-real-libs"
step comm-nccl-gpu 120 "$BIN/comm-nccl-gpu" --test-threads=1 --skip watchdog_times_out_a_blocked_stream
step watchdog 60 "$BIN/comm-nccl-gpu" --test-threads=1 --exact watchdog_times_out_a_blocked_stream --nocapture
# The main job on the GPU: 2 ranks share the one GPU (NCCL refuses that, so
# the group falls back to host staging with one warning), 1 rank alone.
if needs main-job main-job-2-ranks main-job-1-rank; then
    step main-job-2-ranks 90 "$BIN/main-job" --nproc 2 --device cuda --timeout 80
    step main-job-1-rank 60 "$BIN/main-job" --nproc 1 --device cuda --timeout 50
fi
step bench 120 "$BIN/gpu-bench" --torch-script "$ROOT/gpu/torch_permute.py"

# torchrun starting our binaries (issue 10): they join torchrun's agent store.
TORCHRUN=()
if command -v torchrun >/dev/null 2>&1; then
    TORCHRUN=(torchrun)
elif python3 -c 'import torch.distributed.run' >/dev/null 2>&1; then
    TORCHRUN=(python3 -m torch.distributed.run)
fi
TR=(torch-c10d torchrun-comm-perf-shm-2 torchrun-main-job-2 torchrun-main-job-4)
if [ ${#TORCHRUN[@]} -eq 0 ]; then
    for s in "${TR[@]}"; do RESULTS+=("$s: SKIPPED (no torchrun / torch)"); done
else
    if needs comm-perf torchrun-comm-perf-shm-2; then
        step torchrun-comm-perf-shm-2 90 "${TORCHRUN[@]}" --standalone --nproc-per-node 2 --no-python \
            "$BIN/comm-perf" --backend shm --op all_reduce --check
    fi
    if needs main-job torchrun-main-job-2 torchrun-main-job-4; then
        step torchrun-main-job-2 90 "${TORCHRUN[@]}" --standalone --nproc-per-node 2 --no-python \
            "$BIN/main-job" --device cuda
        step torchrun-main-job-4 90 "${TORCHRUN[@]}" --standalone --nproc-per-node 4 --no-python \
            "$BIN/main-job" --device cuda
    fi
    if needs c10d-probe torch-c10d; then
        step torch-c10d 120 python3 "$ROOT/benches/peers/c10d_store_check.py" --probe "$BIN/c10d-probe"
    fi
fi

if needs comm-perf comm-perf-nccl; then
    step comm-perf-nccl 60 "$BIN/comm-perf" --backend nccl --device cuda --nproc 1 \
        --op all_reduce,all_gather,reduce_scatter,broadcast,all_to_all -b 8 -e 64M -f 8 --check --timeout 50
fi

# The conformance suite's ranks on CUDA tensors, started by distrun.
CONF=(conformance-nccl-1 conformance-shm-2 conformance-tcp-3 conformance-shm-4 conformance-shm-2-large)
if needs distrun "${CONF[@]}" && needs conformance-worker "${CONF[@]}"; then
    conf() { # NAME NPROC LIMIT WORKER-ARGS...
        local name=$1 n=$2 limit=$3
        shift 3
        step "$name" "$limit" "$BIN/distrun" --nproc-per-node "$n" --timeout $((limit - 5)) --grace 2 \
            -- "$BIN/conformance-worker" --device cuda "$@"
    }
    conf conformance-nccl-1 1 45 --backend nccl
    conf conformance-shm-2 2 60 --backend shm
    conf conformance-tcp-3 3 75 --backend tcp
    conf conformance-shm-4 4 75 --backend shm
    conf conformance-shm-2-large 2 90 --backend shm --mode large
fi

echo
echo "=== summary ($((SECONDS - START))s) ==="
status=0
for r in "${RESULTS[@]}"; do
    echo "  $r"
    # NOT BUILT / SKIPPED are reported, not failures (build.sh lists what
    # did not build; torch may be absent).
    case $r in *": PASS"* | *": SKIPPED"* | *": NOT BUILT"*) ;; *) status=1 ;; esac
done
exit $status
