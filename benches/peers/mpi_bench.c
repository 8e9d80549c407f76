/* Open MPI shared-memory collectives, measured like `comm-perf` and
 * `comm-shm/examples/shm_perf.rs`.
 *
 * Usage: mpi_bench [op|all] [min_bytes] [max_bytes]  (sizes double from min
 * to max; default: the nccl-tests-like list 8 B .. 64 MiB).
 *
 * For each op (all_reduce, all_gather, all_to_all, broadcast) and size
 * (total bytes of the buffer: all_reduce/broadcast the tensor, all_gather the
 * gathered output, all_to_all one rank's input), f32, it prints
 *   op bytes time_us algbw_GBps busbw_GBps
 * where time is the mean per call of the slowest rank in the best of 5 timed
 * batches (robust to other load on the machine), algbw = bytes / time
 * and busbw = algbw * factor (all_reduce 2(W-1)/W, all_gather and all_to_all
 * (W-1)/W, broadcast 1), as in nccl-tests. Build: mpicc -O2 -o mpi_bench mpi_bench.c
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const long DEFAULT_SIZES[] = {8, 64, 512, 4096, 65536, 262144, 1048576, 4194304, 16777216, 67108864};
static long SIZES[64];
static unsigned NSIZES;

static long iters_for(long bytes) {
    long it = 400000000L / (bytes > 1 ? bytes : 1);
    if (it > 20000) it = 20000;
    if (bytes <= 64) it = 20000;
    if (it < 5) it = 5;
    return it;
}

#define BATCHES 5

static void run_op(int o, float *a, float *b, long n, int w, long bytes, long i) {
    switch (o) {
    case 0: MPI_Allreduce(MPI_IN_PLACE, a, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD); break;
    case 1: MPI_Allgather(a, (int)(n / w), MPI_FLOAT, b, (int)(n / w), MPI_FLOAT, MPI_COMM_WORLD); break;
    case 2: MPI_Alltoall(a, (int)(n / w), MPI_FLOAT, b, (int)(n / w), MPI_FLOAT, MPI_COMM_WORLD); break;
    case 3: MPI_Bcast(a, (int)n, MPI_FLOAT, 0, MPI_COMM_WORLD); break;
    }
    if (o == 0 && bytes >= 65536 && (i & 3) == 0) a[0] = 1.0f; /* keep values finite */
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, w;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &w);
    const char *only = argc > 1 && strcmp(argv[1], "all") != 0 ? argv[1] : NULL;
    if (argc > 3) {
        for (long b = atol(argv[2]); b <= atol(argv[3]) && NSIZES < 64; b *= 2) SIZES[NSIZES++] = b;
    } else {
        for (unsigned i = 0; i < sizeof(DEFAULT_SIZES) / sizeof(DEFAULT_SIZES[0]); i++) SIZES[NSIZES++] = DEFAULT_SIZES[i];
    }
    long maxb = SIZES[NSIZES - 1];
    float *a = malloc(maxb), *b = malloc(maxb);
    for (long i = 0; i < maxb / 4; i++) a[i] = (float)(i % 7);
    const char *ops[] = {"all_reduce", "all_gather", "all_to_all", "broadcast"};
    if (rank == 0) printf("# open-mpi world %d\n# op bytes time_us algbw_GBps busbw_GBps\n", w);
    for (int o = 0; o < 4; o++) {
        if (only && strcmp(only, ops[o]) != 0) continue;
        for (unsigned s = 0; s < NSIZES; s++) {
            long bytes = SIZES[s];
            long n = bytes / 4;
            if (o == 1 || o == 2) { if (n % w) n -= n % w; if (n == 0) continue; }
            long it = iters_for(bytes), warm = it / 10 + 2;
            /* BATCHES timed batches after the warm-up; per batch the slowest
             * rank's mean time per call; the best batch is reported (robust
             * to other load on the machine; shm_perf does the same). */
            long per = it / BATCHES > 0 ? it / BATCHES : 1;
            double mx = 1e30;
            for (long i = 0; i < warm; i++) run_op(o, a, b, n, w, bytes, i);
            for (int bt = 0; bt < BATCHES; bt++) {
                MPI_Barrier(MPI_COMM_WORLD);
                double t = MPI_Wtime();
                for (long i = 0; i < per; i++) run_op(o, a, b, n, w, bytes, i);
                double el = (MPI_Wtime() - t) / per, bmx;
                MPI_Allreduce(&el, &bmx, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
                if (bmx < mx) mx = bmx;
            }
            if (rank == 0) {
                double alg = n * 4.0 / mx / 1e9;
                double f = o == 0 ? 2.0 * (w - 1) / w : o == 3 ? 1.0 : (double)(w - 1) / w;
                printf("%s %ld %.2f %.3f %.3f\n", ops[o], n * 4, mx * 1e6, alg, alg * f);
                fflush(stdout);
            }
        }
    }
    free(a); free(b);
    MPI_Finalize();
    return 0;
}
