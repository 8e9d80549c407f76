#!/usr/bin/env bash
# Builds every GPU check binary on this machine (x86-64; no GPU or CUDA
# toolkit needed) and copies them, stripped, into carry/ (ignored by git),
# for gpu/check.sh on a GPU machine that has no Rust. carry/ must stay well
# under the 64 MiB a device run may carry (this script fails over 48 MiB).
#
#   bash gpu/build.sh            # then run gpu/check.sh there with carry/
#
# carry/manifest lists "name path-under-the-build-root" for each binary, and
# carry/build_root the absolute path they were built in: binaries that
# compiled a path in (env!("CARGO_BIN_EXE_..."), CARGO_MANIFEST_DIR) find
# their files again because check.sh recreates that root as a link.
#
# The comm-nccl checks are required (a failed build fails this script); the
# other binaries are optional: one that does not build is reported and left
# out, and check.sh reports its steps as NOT BUILT.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
CARRY=$ROOT/carry
rm -rf "$CARRY"
mkdir -p "$CARRY/bin"
: >"$CARRY/manifest"
echo "$ROOT" >"$CARRY/build_root"
export CARGO_TERM_COLOR=never
MISSING=()

install_bin() { # EXE NAME
    local exe=$1 name=$2
    cp "$exe" "$CARRY/bin/$name" || return 1
    strip "$CARRY/bin/$name" 2>/dev/null || true
    echo "$name ${exe#"$ROOT"/}" >>"$CARRY/manifest"
    printf '  %-28s %6s KiB  (from %s)\n' "$name" "$(($(stat -c %s "$CARRY/bin/$name") / 1024))" "${exe#"$ROOT"/}"
}

# add_test PKG TEST NAME [cargo args...]: an integration-test binary.
add_test() {
    local pkg=$1 test=$2 name=$3
    shift 3
    local exe
    # A failed build prints nothing here, and is caught below.
    exe=$(cargo test --release -p "$pkg" --test "$test" "$@" --no-run --message-format=json-render-diagnostics |
        python3 -c '
import json, sys
want = sys.argv[1]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target") or {}
    if m.get("reason") == "compiler-artifact" and t.get("name") == want and "test" in t.get("kind", []) and m.get("executable"):
        print(m["executable"])
' "$test" | tail -n1)
    [ -n "$exe" ] || { echo "build.sh: no executable for $pkg --test $test" >&2; return 1; }
    install_bin "$exe" "$name"
}

# add_example PKG EXAMPLE NAME [cargo args...]
add_example() {
    local pkg=$1 ex=$2 name=$3
    shift 3
    # `|| return`: errexit is off inside a function run by `optional`.
    cargo build --release -p "$pkg" --example "$ex" "$@" || return 1
    install_bin "$ROOT/target/release/examples/$ex" "$name"
}

# add_bin PKG BIN NAME [cargo args...]
add_bin() {
    local pkg=$1 bin=$2 name=$3
    shift 3
    cargo build --release -p "$pkg" --bin "$bin" "$@" || return 1
    install_bin "$ROOT/target/release/$bin" "$name"
}

# optional NAME CMD...: CMD failing leaves NAME out instead of failing.
optional() {
    local name=$1
    shift
    if ! "$@"; then
        echo "build.sh: $name did not build; check.sh will skip its steps" >&2
        MISSING+=("$name")
    fi
}

echo "building GPU checks into $CARRY"
# Required: comm-nccl's GPU tests (the watchdog test among them), its
# benchmark (device permute vs torch, per-call overhead) and the real-library
# check.
add_test comm-nccl gpu comm-nccl-gpu
add_example comm-nccl gpu_bench gpu-bench
add_example comm-nccl check_real_libs check-real-libs

# The main job (parallel-state's Ulysses attention example) on the GPU.
optional main-job add_example parallel-state ulysses_attention main-job --features nccl
# The launcher, and the conformance suite's rank (tcp / shm on CUDA tensors
# staged through the host, several processes sharing the GPU; nccl world 1).
# The suite lives in the `tests` package on main today (a `comm-conformance`
# package would replace it here: package, bin name).
optional distrun add_bin executor distrun distrun
optional conformance-worker add_bin comm-conformance conformance_worker conformance-worker --features builtin,nccl
# comm-perf (benches crate) with the nccl backend; also the torchrun check.
optional comm-perf add_bin benches comm-perf comm-perf --features nccl
# dist-utils' c10d probe: benches/peers/c10d_store_check.py drives it against
# torch's TCPStore and under torchrun (2 and 4 processes).
optional c10d-probe add_example dist-utils c10d_probe c10d-probe
# ---- Hook for later: parallel-state device tests through the group layer
# (no such test target on main yet):
#   optional parallel-state-gpu add_test parallel-state gpu parallel-state-gpu --features nccl

total=$(du -sk "$CARRY" | cut -f1)
echo "carry/: $((total / 1024)) MiB (${total} KiB)"
if [ ${#MISSING[@]} -gt 0 ]; then
    echo "not built: ${MISSING[*]}"
fi
if [ "$total" -gt $((48 * 1024)) ]; then
    echo "build.sh: carry/ is over 48 MiB; a device run carries 64 MiB at most" >&2
    exit 1
fi
