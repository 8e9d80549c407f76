#!/usr/bin/env bash
# Programs of this workspace started by a real torchrun (issue 10, "Done
# when"). Run by hand; needs torch (any CPU build):
#
#   bash benches/peers/torchrun_check.sh
#   TORCHRUN=/path/to/venv/bin/torchrun bash benches/peers/torchrun_check.sh
#
# For 2 and 4 processes and three ways torchrun sets a job up:
#   standalone  --standalone (a c10d rendezvous on a free local port)
#   static      the default rendezvous: --master-addr 127.0.0.1 --master-port P
#   c10d        --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:P
# it runs, with --no-python:
#   comm-perf --backend shm --op all_reduce --check   (results checked)
#   the main job, ulysses_attention (checked against one process)
# Every run prints PASS or FAIL with its command and the lines that show
# the result; the exit status is 1 if any failed. torchrun's agent hosts a
# c10d TCPStore and tells the ranks (TORCHELASTIC_USE_AGENT_STORE=True):
# the ranks must use it through our client of its protocol.
set -uo pipefail
cd "$(dirname "$0")/../.."

TORCHRUN="${TORCHRUN:-torchrun}"
command -v "$TORCHRUN" >/dev/null 2>&1 || {
  echo "torchrun not found (set TORCHRUN=/path/to/torchrun; needs torch)" >&2
  exit 2
}
echo "# $("$TORCHRUN" --help >/dev/null 2>&1 && dirname "$(command -v "$TORCHRUN")")/torchrun," \
  "torch $("$(dirname "$(command -v "$TORCHRUN")")/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo '?')"

cargo build --release -q -p benches --bin comm-perf -p parallel-state --example ulysses_attention || exit 1
PERF=target/release/comm-perf
JOB=target/release/examples/ulysses_attention

failed=0
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# run LABEL CHECK-REGEX COMMAND...: runs the command (bounded), prints the
# lines matching CHECK-REGEX, PASS when it exits 0 and at least one line matched.
run() {
  local label="$1" want="$2"
  shift 2
  echo
  echo "\$ $*"
  local out rc
  out="$(timeout 300 "$@" 2>&1)"
  rc=$?
  printf '%s\n' "$out" | grep -E "$want" | sed 's/^/    /'
  if [ "$rc" = 0 ] && printf '%s\n' "$out" | grep -qE "$want"; then
    echo "PASS $label (exit 0)"
  else
    echo "FAIL $label (exit $rc); last lines:"
    printf '%s\n' "$out" | tail -25 | sed 's/^/    /'
    failed=$((failed + 1))
  fi
}

for n in 2 4; do
  for mode in standalone static c10d; do
    port="$(free_port)"
    case "$mode" in
      standalone) flags=(--standalone) ;;
      static) flags=(--nnodes 1 --master-addr 127.0.0.1 --master-port "$port") ;;
      c10d) flags=(--nnodes 1 --rdzv-backend=c10d --rdzv-endpoint="127.0.0.1:$port") ;;
    esac
    run "comm-perf shm all_reduce --check, torchrun $mode, $n processes" \
      'check|PASS|OK|passed|GB/s|busbw' \
      "$TORCHRUN" "${flags[@]}" --nproc-per-node "$n" --no-python \
      "$PERF" --backend shm --op all_reduce --check
    port="$(free_port)"
    case "$mode" in
      static) flags=(--nnodes 1 --master-addr 127.0.0.1 --master-port "$port") ;;
      c10d) flags=(--nnodes 1 --rdzv-backend=c10d --rdzv-endpoint="127.0.0.1:$port") ;;
    esac
    run "main job, torchrun $mode, $n processes" \
      'sp group|max abs error .* -> OK' \
      "$TORCHRUN" "${flags[@]}" --nproc-per-node "$n" --no-python "$JOB"
  done
done
echo
echo "# $failed failed"
[ "$failed" = 0 ]
