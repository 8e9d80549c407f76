#!/usr/bin/env bash
# Side by side: comm-shm (examples/shm_perf, ranks as processes) and Open MPI
# (vader / sm, `--bind-to none`), the same op and sizes, ROUNDS interleaved
# rounds (ours, MPI, ours, MPI, ...); prints the best time of each per size
# as a markdown table (speed-up = MPI time / our time, >= 1 means ours is
# faster).
#
#   bash benches/peers/compare_mpi.sh [op] [min] [max]      # default all_to_all 64K 64M
#   WORLDS="2 4" ROUNDS=3 SHM_ARGS="--single-copy 4M" bash benches/peers/compare_mpi.sh
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
(cd "$root" && cargo build --release -q -p comm-shm --example shm_perf)
shm="$root/target/release/examples/shm_perf"
btl="self,vader"
if ompi_info --parsable 2>/dev/null | grep -q 'btl:sm:'; then btl="self,sm"; fi
for w in ${WORLDS:-2 4}; do
  for r in $(seq 1 "${ROUNDS:-3}"); do
    # shellcheck disable=SC2086
    "$shm" --world "$w" --op "$op" -b "$min" -e "$max" ${SHM_ARGS:-} > "$out/shm_${op}_w${w}_r$r.txt"
    mpirun --allow-run-as-root --oversubscribe --bind-to none -np "$w" --mca pml ob1 \
      --mca btl "$btl" "$out/mpi_bench" "$op" "$min" "$max" > "$out/mpi_${op}_w${w}_r$r.txt"
  done
done
python3 - "$out" "$op" ${WORLDS:-2 4} <<'PY'
import glob, sys
out, op, worlds = sys.argv[1], sys.argv[2], sys.argv[3:]
def best(kind, w):
    b = {}
    for f in glob.glob(f"{out}/{kind}_{op}_w{w}_r*.txt"):
        for line in open(f):
            p = line.split()
            if len(p) >= 3 and p[0] == op:
                n, t = int(p[1]), float(p[2])
                b[n] = min(b.get(n, t), t)
    return b
print(f"| op | world | bytes | comm-shm (us) | Open MPI (us) | speed-up |")
print(f"|---|---|---|---|---|---|")
for w in worlds:
    s, m = best("shm", w), best("mpi", w)
    for n in sorted(set(s) & set(m)):
        print(f"| {op} | {w} | {n} | {s[n]:.1f} | {m[n]:.1f} | {m[n] / s[n]:.2f}x |")
PY
