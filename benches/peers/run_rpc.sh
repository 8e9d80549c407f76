#!/usr/bin/env bash
# Repeats the executor's RPC benchmark (executor/benches/rpc.rs), in which
# each run measures ours (shared-memory queues, then sockets) and the Python
# multiprocessing+pickle peer (mp_rpc.py) back to back, so the runs
# interleave both sides. Prints every run, then the best (lowest) time of
# each column and the ratios of the bests. On a loaded machine use several
# runs: RUNS=8 bash benches/peers/run_rpc.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${RUNS:-5}
cargo bench -q -p executor --bench rpc --no-run
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for i in $(seq 1 "$runs"); do
  line=$(cargo bench -q -p executor --bench rpc 2>/dev/null | grep '^RESULT')
  echo "run $i: ${line#RESULT }"
  echo "${line#RESULT }" >>"$out"
done
awk '
{ for (i = 1; i <= NF; i++) { split($i, kv, "="); k = kv[1]; v = kv[2] + 0;
    if (k == "load") continue;
    if (!(k in best) || v < best[k]) best[k] = v } }
END {
  printf "best of %d runs:\n", NR
  printf "| case | ours (shm queues) | ours (sockets) | python mp+pickle | shm vs python |\n|---|---|---|---|---|\n"
  printf "| round trip, 1 KiB arg + 1 KiB replies, 4 workers | %.1f us | %.1f us | %.1f us | %.1fx |\n", best["rt_us"], best["rt_sock_us"], best["py_rt_us"], best["py_rt_us"] / best["rt_us"]
  printf "| 16 MiB broadcast, 4 workers | %.2f ms | %.2f ms | %.2f ms | %.1fx |\n", best["bcast_ms"], best["bcast_sock_ms"], best["py_bcast_ms"], best["py_bcast_ms"] / best["bcast_ms"]
  printf "one 16 MiB memcpy: %.2f ms; broadcast / memcpy: %.2fx (%.2fx per reader)\n", best["memcpy_ms"], best["bcast_ms"] / best["memcpy_ms"], best["bcast_ms"] / best["memcpy_ms"] / 4
}' "$out"
