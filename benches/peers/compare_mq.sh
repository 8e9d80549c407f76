#!/usr/bin/env bash
# Side by side: comm-shm's MessageQueue (examples/shm_perf --mq) and vLLM's
# shm_broadcast.MessageQueue (vllm_mq_bench.py), reader PROCESSES on both
# sides, 1 writer + N readers (world = N + 1), sizes 4 B .. 64 MiB (x4),
# pipelined broadcast and round trip; ROUNDS interleaved rounds, best time
# per size; speed-up = vLLM time / our time.
#
#   PYTHON=/path/to/venv/bin/python READERS="1 3" ROUNDS=3 bash benches/peers/compare_mq.sh
#   MIN=4 MAX=1048576 CHRT="chrt -f 10" PAUSE=3 ...   # sizes; shared machine (see compare_mpi.sh)
#
# Needs: pip install vllm (runs without a GPU).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
py="${PYTHON:-python3}"
min="${MIN:-4}"
max="${MAX:-67108864}"
out="${OUT_DIR:-$here/out}"
mkdir -p "$out"
(cd "$root" && cargo build --release -q -p comm-shm --example shm_perf)
shm="$root/target/release/examples/shm_perf"
chrt_cmd=(${CHRT:-})
for n in ${READERS:-1 3}; do
  : > "$out/mq_shm_r$n.txt"
  : > "$out/mq_vllm_r$n.txt"
  for r in $(seq 1 "${ROUNDS:-3}"); do
    timeout 1200 "${chrt_cmd[@]}" "$shm" --mq --readers "$n" -b "$min" -e "$max" >> "$out/mq_shm_r$n.txt"
    sleep "${PAUSE:-0}"
    timeout 1800 "${chrt_cmd[@]}" "$py" "$here/vllm_mq_bench.py" --readers "$n" --min "$min" --max "$max" \
      2>/dev/null | grep -E '^(pipelined|round_trip|#)' >> "$out/mq_vllm_r$n.txt"
    sleep "${PAUSE:-0}"
  done
done
"$py" - "$out" ${READERS:-1 3} <<'PY'
import sys
out, readers = sys.argv[1], sys.argv[2:]
def best(path):
    b = {}
    for line in open(path):
        p = line.split()
        if len(p) >= 3 and p[0] in ("pipelined", "round_trip"):
            k = (p[0], int(p[1]))
            b[k] = min(b.get(k, float(p[2])), float(p[2]))
    return b
print("| world | mode | bytes | comm-shm (us) | vLLM (us) | speed-up |")
print("|---|---|---|---|---|---|")
for n in readers:
    s, v = best(f"{out}/mq_shm_r{n}.txt"), best(f"{out}/mq_vllm_r{n}.txt")
    for mode in ("round_trip", "pipelined"):
        for size in sorted(k[1] for k in s if k[0] == mode):
            if (mode, size) in v:
                a, b = s[(mode, size)], v[(mode, size)]
                label = "round trip (one-way = half)" if mode == "round_trip" else "pipelined"
                print(f"| {int(n) + 1} | {label} | {size} | {a:.2f} | {b:.2f} | {b / a:.1f}x |")
PY
