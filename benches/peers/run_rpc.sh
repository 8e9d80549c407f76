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
    run[k] = v
    if (!(k in best) || v < best[k]) best[k] = v }
  printf "run %d, same-run ratios: round trip %.1fx python; per reader %.2fx memcpy into %d buffers (%.2fx the cached memcpy); fresh buffers %.2fx\n", NR, run["py_rt_us"] / run["rt_us"], run["bcast_ms"] / run["memcpy_ms"] / 4, 4, run["bcast_ms"] / run["memcpy_hot_ms"] / 4, run["bcast_owned_ms"] / run["memcpy_ms"] / 4 }
END {
  printf "best of %d runs:\n", NR
  printf "| case | ours (shm queues) | ours (sockets) | python mp+pickle | shm vs python |\n|---|---|---|---|---|\n"
  printf "| round trip, 1 KiB arg + 1 KiB replies, 4 workers | %.1f us | %.1f us | %.1f us | %.1fx |\n", best["rt_us"], best["rt_sock_us"], best["py_rt_us"], best["py_rt_us"] / best["rt_us"]
  printf "| 16 MiB broadcast, 4 workers, each copying it into its kept buffer | %.2f ms | %.2f ms | %.2f ms | %.1fx |\n", best["bcast_ms"], best["bcast_sock_ms"], best["py_bcast_ms"], best["py_bcast_ms"] / best["bcast_ms"]
  printf "| 16 MiB broadcast, 4 workers, each decoding it into a fresh buffer | %.2f ms | | %.2f ms | %.1fx |\n", best["bcast_owned_ms"], best["py_bcast_ms"], best["py_bcast_ms"] / best["bcast_owned_ms"]
  printf "one 16 MiB memcpy into 4 buffers in turn: %.2f ms; per reader: %.2fx (fresh buffers %.2fx)\n", best["memcpy_ms"], best["bcast_ms"] / best["memcpy_ms"] / 4, best["bcast_owned_ms"] / best["memcpy_ms"] / 4
  printf "one 16 MiB memcpy repeated into one cached buffer: %.2f ms; per reader: %.2fx (fresh buffers %.2fx)\n", best["memcpy_hot_ms"], best["bcast_ms"] / best["memcpy_hot_ms"] / 4, best["bcast_owned_ms"] / best["memcpy_hot_ms"] / 4
}' "$out"
