#!/usr/bin/env bash
# all_to_all_4d (the Ulysses exchange as one strided all-to-all, both
# directions) against the flat all_to_all of the same bytes on comm-shm,
# ROUNDS interleaved rounds, best time of each per size; ratio = 4d / flat
# (target <= 1.15).
#
#   WORLDS="2 4" ROUNDS=3 bash benches/peers/compare_4d.sh [min] [max]   # default 1M 128M
#   CHRT="chrt -f 10" PAUSE=3 ...   # on a shared machine (see compare_mpi.sh)
#   SHM_PERF=/path/to/shm_perf ...  # a prebuilt binary instead of cargo
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
min="${1:-1M}"
max="${2:-128M}"
out="${OUT_DIR:-$here/out}"
mkdir -p "$out"
# SHM_PERF: a prebuilt shm_perf (benches/peers/many_cores.sh carries one to
# a machine without Rust).
if [ -n "${SHM_PERF:-}" ]; then
  shm="$SHM_PERF"
else
  (cd "$root" && cargo build --release -q -p comm-shm --example shm_perf)
  shm="$root/target/release/examples/shm_perf"
fi
chrt_cmd=(${CHRT:-})
size() { numfmt --from=iec "$1"; }
for w in ${WORLDS:-2 4}; do
  : > "$out/a2a4d_w$w.txt"
  for ((s = $(size "$min"); s <= $(size "$max"); s *= 2)); do
    for r in $(seq 1 "${ROUNDS:-3}"); do
      # shellcheck disable=SC2086
      timeout 600 "${chrt_cmd[@]}" "$shm" --world "$w" --op all_to_all,all_to_all_4d,all_to_all_4d_inv \
        -b "$s" -e "$s" ${SHM_ARGS:-} >> "$out/a2a4d_w$w.txt"
      sleep "${PAUSE:-0}"
    done
  done
done
python3 - "$out" ${WORLDS:-2 4} <<'PY'
import sys
out, worlds = sys.argv[1], sys.argv[2:]
print("| world | size | flat all_to_all (us) | all_to_all_4d (us) | ratio | inverse (us) | ratio |")
print("|---|---|---|---|---|---|---|")
for w in worlds:
    best = {}
    for line in open(f"{out}/a2a4d_w{w}.txt"):
        p = line.split()
        if len(p) < 3 or p[0].startswith("#"):
            continue
        op, n, t = p[0], int(p[1]), float(p[2])
        # 4d sizes are the largest [1, S/P, 24, 128] f32 tensor not above
        # the power of two they were asked for: key them by that size.
        size = 1 << (n - 1).bit_length() if op != "all_to_all" else n
        best[(op, size)] = min(best.get((op, size), t), t)
    for size in sorted({s for (o, s) in best if o == "all_to_all"}):
        f = best[("all_to_all", size)]
        d = best.get(("all_to_all_4d", size))
        i = best.get(("all_to_all_4d_inv", size))
        if d is None or i is None:
            continue
        print(f"| {w} | {size >> 20} MiB | {f:.0f} | {d:.0f} | {d / f:.2f} | {i:.0f} | {i / f:.2f} |")
PY
