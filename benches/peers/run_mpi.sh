#!/usr/bin/env bash
# Open MPI shared-memory collectives on this host, world 2 and 4 (oversubscribed
# where there are fewer cores), f32, 8 B .. 64 MiB.
# Needs: apt-get install -y openmpi-bin libopenmpi-dev
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT_DIR:-$here/out}"
mkdir -p "$out"
mpicc -O2 -o "$out/mpi_bench" "$here/mpi_bench.c"
# shared-memory transport only: self + vader (called `sm` from Open MPI 5)
btl="self,vader"
if ompi_info --parsable 2>/dev/null | grep -q 'btl:sm:'; then btl="self,sm"; fi
for np in ${NPROCS:-2 4}; do
  mpirun --allow-run-as-root --oversubscribe --bind-to none -np "$np" --mca pml ob1 --mca btl "$btl" \
    "$out/mpi_bench" "$@" | tee "$out/mpi_w$np.txt"
done
