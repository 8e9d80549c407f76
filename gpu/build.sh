#!/usr/bin/env bash
# Builds every GPU check binary on this machine (x86-64; no GPU or CUDA
# toolkit needed) and copies them, stripped, into carry/ (ignored by git),
# for gpu/check.sh on a GPU machine that has no Rust. carry/ must stay well
# under the 64 MiB a device run may carry.
#
#   bash gpu/build.sh            # then run gpu/check.sh there with carry/
#
# carry/manifest lists "name path-under-the-build-root" for each binary, and
# carry/build_root the absolute path they were built in: binaries that
# compiled a path in (env!("CARGO_BIN_EXE_..."), CARGO_MANIFEST_DIR) find
# their files again because check.sh recreates that root as a link.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
CARRY=$ROOT/carry
rm -rf "$CARRY"
mkdir -p "$CARRY/bin"
: >"$CARRY/manifest"
echo "$ROOT" >"$CARRY/build_root"
export CARGO_TERM_COLOR=never

install_bin() { # EXE NAME
    local exe=$1 name=$2
    cp "$exe" "$CARRY/bin/$name"
    strip "$CARRY/bin/$name" 2>/dev/null || true
    echo "$name ${exe#"$ROOT"/}" >>"$CARRY/manifest"
    printf '  %-28s %6s KiB  (from %s)\n' "$name" "$(($(stat -c %s "$CARRY/bin/$name") / 1024))" "${exe#"$ROOT"/}"
}

# add_test PKG TEST NAME [cargo args...]: an integration-test binary.
add_test() {
    local pkg=$1 test=$2 name=$3
    shift 3
    local exe
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
    [ -n "$exe" ] || { echo "build.sh: no executable for $pkg --test $test" >&2; exit 1; }
    install_bin "$exe" "$name"
}

# add_example PKG EXAMPLE NAME [cargo args...]
add_example() {
    local pkg=$1 ex=$2 name=$3
    shift 3
    cargo build --release -p "$pkg" --example "$ex" "$@"
    install_bin "$ROOT/target/release/examples/$ex" "$name"
}

# add_bin PKG BIN NAME [cargo args...]
add_bin() {
    local pkg=$1 bin=$2 name=$3
    shift 3
    cargo build --release -p "$pkg" --bin "$bin" "$@"
    install_bin "$ROOT/target/release/$bin" "$name"
}

echo "building GPU checks into $CARRY"
add_test comm-nccl gpu comm-nccl-gpu
add_example comm-nccl gpu_bench gpu-bench
add_example comm-nccl check_real_libs check-real-libs

# ---- Hooks for the lead (names check.sh looks for; adjust as the crates land):
# device all_to_all_4D / all_gather(dim) bit-exact against the host, through
# the group layer:
#   add_test parallel-state gpu parallel-state-gpu --features nccl
# conformance with 2-4 processes sharing the GPU through host staging (shm/tcp
# with CUDA buffers), and its rank binary if it spawns one:
#   add_test tests conformance conformance --features nccl
#   add_bin tests conformance-rank conformance-rank --features nccl
# the main job with --device cuda, and comm-perf on NCCL:
#   add_bin executor distrun distrun --features nccl
#   add_bin benches comm-perf comm-perf --features nccl
add_example parallel-state ulysses_attention main-job --features nccl

total=$(du -sk "$CARRY" | cut -f1)
echo "carry/: $((total / 1024)) MiB"
if [ "$total" -gt $((48 * 1024)) ]; then
    echo "build.sh: carry/ is over 48 MiB; a device run carries 64 MiB at most" >&2
    exit 1
fi
