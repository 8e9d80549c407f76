#!/usr/bin/env bash
# Side by side: comm-shm (examples/shm_perf, ranks as processes) and Open MPI
# (vader / sm, `--bind-to none`), the same op, for each size ROUNDS
# interleaved runs (ours, MPI, ours, MPI, ...), each reporting the best of 5
# timed batches; prints the best time of each per size as a markdown table
# (speed-up = MPI time / our time; >= 1 means ours is faster).
#
#   bash benches/peers/compare_mpi.sh [op] [min] [max]      # default all_to_all 65536 67108864
#   WORLDS="2 4" ROUNDS=3 CHRT="chrt -f 10" PAUSE=3 bash benches/peers/compare_mpi.sh
#
# On a machine shared with other jobs, run both sides under the same
# real-time priority (CHRT="chrt -f 10", as root) with PAUSE seconds between
# runs: otherwise other processes' load decides the numbers.
#
# Needs: apt-get install -y openmpi-bin libopenmpi-dev
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
op="${1:-all_to_all}"
min="${2:-65536}"
max="${3:-67108864}"
out="${OUT_DIR:-$here/out}"
mkdir -p "$out"
mpicc -O2 -o "$out/mpi_bench" "$here/mpi_bench.c"
if [ -n "${SHM_PERF:-}" ]; then # a prebuilt shm_perf (many_cores.sh)
  shm="$SHM_PERF"
else
  (cd "$root" && cargo build --release -q -p comm-shm --example shm_perf)
  shm="$root/target/release/examples/shm_perf"
fi
btl="self,vader"
if ompi_info --parsable 2>/dev/null | grep -q 'btl:sm:'; then btl="self,sm"; fi
chrt_cmd=(${CHRT:-})
for w in ${WORLDS:-2 4}; do
  : > "$out/shm_${op}_w$w.txt"
  : > "$out/mpi_${op}_w$w.txt"
  for ((s = min; s <= max; s *= 2)); do
    for r in $(seq 1 "${ROUNDS:-3}"); do
      # shellcheck disable=SC2086
      timeout 600 "${chrt_cmd[@]}" "$shm" --world "$w" --op "$op" -b "$s" -e "$s" ${SHM_ARGS:-} \
        >> "$out/shm_${op}_w$w.txt"
      sleep "${PAUSE:-0}"
      timeout 600 "${chrt_cmd[@]}" mpirun --allow-run-as-root --oversubscribe --bind-to none -np "$w" \
        --mca pml ob1 --mca btl "$btl" "$out/mpi_bench" "$op" "$s" "$s" >> "$out/mpi_${op}_w$w.txt"
      sleep "${PAUSE:-0}"
    done
  done
done
python3 - "$out" "$op" ${WORLDS:-2 4} <<'PY'
import sys
out, op, worlds = sys.argv[1], sys.argv[2], sys.argv[3:]
def best(kind, w):
    b = {}
    for line in open(f"{out}/{kind}_{op}_w{w}.txt"):
        p = line.split()
        if len(p) >= 3 and p[0] == op:
            n, t = int(p[1]), float(p[2])
            b[n] = min(b.get(n, t), t)
    return b
print("| op | world | bytes | comm-shm (us) | Open MPI (us) | speed-up |")
print("|---|---|---|---|---|---|")
for w in worlds:
    s, m = best("shm", w), best("mpi", w)
    for n in sorted(set(s) & set(m)):
        print(f"| {op} | {w} | {n} | {s[n]:.1f} | {m[n]:.1f} | {m[n] / s[n]:.2f}x |")
PY
