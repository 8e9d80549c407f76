#!/usr/bin/env bash
# Checks against the REAL NCCL and NVRTC libraries on a machine with no GPU
# (issue 9.6; not part of CI: the wheels are ~400 MB). It downloads the
# nvidia-nccl-cu12 and nvidia-cuda-nvrtc-cu12 wheels into .whl/ (ignored by
# git), unpacks them, and runs comm-nccl's check_real_libs example with
# their libraries:
#   - libnccl.so.2 loads: its version, a unique id, and a communicator init
#     that fails with a clear NCCL error (never a crash);
#   - the permute kernels compile to PTX with that NVRTC, every entry point
#     the launcher loads present.
#
#   bash gpu/check_real_libs.sh
# NCCL_WHEEL / NVRTC_WHEEL override the requirements (e.g. nvidia-nccl-cu13).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
W=$ROOT/.whl
NCCL_WHEEL=${NCCL_WHEEL:-nvidia-nccl-cu12==2.31.2}
NVRTC_WHEEL=${NVRTC_WHEEL:-nvidia-cuda-nvrtc-cu12==12.9.86}
mkdir -p "$W"
for req in "$NCCL_WHEEL" "$NVRTC_WHEEL"; do
    name=${req%%[=<>]*}
    if ! ls "$W"/"${name//-/_}"-*.whl >/dev/null 2>&1; then
        python3 -m pip download -q --no-deps --only-binary=:all: \
            --platform manylinux_2_18_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux_2_12_x86_64 \
            --python-version 3.11 -d "$W" "$req"
    fi
done
rm -rf "$W/x"
for whl in "$W"/*.whl; do
    python3 -m zipfile -e "$whl" "$W/x/"
done
NCCL_LIB=$(find "$W/x" -name 'libnccl.so.2' | head -n1)
NVRTC_DIR=$(dirname "$(find "$W/x" -name 'libnvrtc.so.1*' | head -n1)")
echo "wheels: $(cd "$W" && ls ./*.whl | tr '\n' ' ')"
echo "libnccl: $NCCL_LIB"
echo "libnvrtc: $NVRTC_DIR"
if command -v cargo >/dev/null; then
    cargo build -q --release -p comm-nccl --example check_real_libs
    EXE=$ROOT/target/release/examples/check_real_libs
else
    EXE=$ROOT/carry/bin/check-real-libs
fi
DIST_NCCL_LIBRARY=$NCCL_LIB LD_LIBRARY_PATH="$NVRTC_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$EXE"
