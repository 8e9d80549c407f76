#!/usr/bin/env bash
# Crash trials (issue 15): distrun runs 4 ranks of the main job (shm, tcp)
# or of a collective workload (shm, tcp); at a random moment, set-up
# included, one random rank gets SIGKILL or SIGSTOP. Prints, per workload
# and signal: trials, signals during set-up, hangs, leaked /dev/shm
# segments, leaked processes, how often the rank hit was named, and how
# long the slowest trial took to end after its signal. Exits non-zero if
# any trial hung or leaked, or the rank was named in under 99%.
#
#   bash benches/peers/crash_trials.sh    # 120 signals that hit a running job, release build
#   CRASH_TRIALS=200 CRASH_TIMEOUT_S=5 CRASH_SETUP_PERCENT=100 CRASH_SEED=42 CRASH_VERBOSE=1 \
#     bash benches/peers/crash_trials.sh
#
# The same harness runs 20 trials on the debug build in CI
# (parallel-state/tests/crash_trials.rs).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CRASH_TRIALS="${CRASH_TRIALS:-120}"
export CRASH_TIMEOUT_S="${CRASH_TIMEOUT_S:-5}"
# The programs the trials start, then the harness itself.
cargo build --release -q -p executor --bin distrun -p parallel-state --example ulysses_attention
exec cargo test --release -q -p parallel-state --test crash_trials -- \
  --exact crash_trials_end_clean_and_name_the_rank --nocapture
