/*
 * Data-parallel SAM over MPI: logistic regression whose training set is split across the ranks.
 * Every rank computes its gradients on its own part; samopt's built-in SGD steps the weights.
 *
 *   --mode msharp   per-worker SAM (m-sharpness, as the original JAX code does across
 *                   accelerators): each rank perturbs with its own gradient and its own norm;
 *                   only the second gradient is all-reduced.
 *   --mode global   one global norm: samopt sums the ranks' squared local norms through the
 *                   all-reduce callback (one double per step, no gradient copied), and each rank
 *                   perturbs along its own gradient scaled by that norm; the second gradient is
 *                   all-reduced.
 *
 * It checks that every rank ends with bit-identical weights, and, on rank 0, that a
 * single-process run over the whole training set gives the same result: per-shard SAM
 * (sam_accumulate_step) over the same parts, with each part's own norm (msharp) or the norm over
 * all parts (global: sam_grad_sq_norm_local + sam_first_step_with_norm).
 *
 *   mpicc -std=c11 -Iinclude examples/mpi/train.c -Ltarget/release -lsamopt -lm -o train_mpi
 *   mpirun -np 2 ./train_mpi --mode global
 */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "samopt.h"

enum { N = 1024, D = 16, STEPS = 50 };

#define CHECK(call)                                                                                   \
    do {                                                                                              \
        SamStatus s_ = (call);                                                                        \
        if (s_ < 0) {                                                                                 \
            fprintf(stderr, "%s failed: %s (%s)\n", #call, sam_status_string(s_), sam_last_error()); \
            MPI_Abort(MPI_COMM_WORLD, 1);                                                             \
        }                                                                                             \
    } while (0)

static float xs[N][D], ys[N];

static void make_data(void) {
    unsigned long long state = 7;
    for (int i = 0; i < N; i++) {
        float z = -0.2f;
        for (int j = 0; j < D; j++) {
            state = state * 6364136223846793005ULL + 1442695040888963407ULL;
            xs[i][j] = (float)((double)(state >> 11) / 9007199254740992.0 * 2.0 - 1.0);
            z += (float)((j % 5) - 2) * 0.5f * xs[i][j];
        }
        state = state * 6364136223846793005ULL + 1442695040888963407ULL;
        ys[i] = (float)((z > 0.0f) ^ ((state >> 11) % 8 == 0)); /* 12.5% of labels flipped */
    }
}

/* Mean logistic loss gradient over samples [lo, hi) at (w, b), into (gw, gb); returns the loss. */
static double gradient(const float *w, const float *b, int lo, int hi, float *gw, float *gb) {
    double loss = 0;
    memset(gw, 0, D * sizeof(float));
    *gb = 0;
    for (int i = lo; i < hi; i++) {
        float z = *b;
        for (int j = 0; j < D; j++) z += w[j] * xs[i][j];
        float p = 1.0f / (1.0f + expf(-z));
        loss -= ys[i] > 0.5f ? log(p + 1e-12) : log(1.0 - p + 1e-12);
        float d = (p - ys[i]) / (float)(hi - lo);
        for (int j = 0; j < D; j++) gw[j] += d * xs[i][j];
        *gb += d;
    }
    return loss / (hi - lo);
}

static int32_t mpi_sum(double *values, size_t count, void *user) {
    (void)user;
    return MPI_Allreduce(MPI_IN_PLACE, values, (int)count, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD) == MPI_SUCCESS ? 0 : 1;
}

static SamOptimizer *make_optimizer(float *w, float *gw, float *b, float *gb) {
    SamConfig config = sam_config_default();
    config.rho = 0.1;
    config.base = SAM_BASE_SGD;
    config.lr = 0.5;
    config.momentum = 0.9;
    config.backend = SAM_BACKEND_CPU;
    config.num_threads = 1;
    SamOptimizer *opt = NULL;
    uint32_t id;
    CHECK(sam_create(&config, &opt));
    CHECK(sam_register_host(opt, w, gw, D, SAM_DTYPE_F32, &id));
    CHECK(sam_register_host(opt, b, gb, 1, SAM_DTYPE_F32, &id));
    return opt;
}

/* The single-process run over the whole set, cut into the same `parts` as the ranks. */
static void single_process(int global, int parts, float *w, float *b) {
    float gw[D], gb;
    SamOptimizer *opt = make_optimizer(w, gw, b, &gb);
    const int per = N / parts;
    for (int step = 0; step < STEPS; step++) {
        double norm = 0;
        if (global) { /* the norm over every part's gradient, as the ranks' all-reduce gives it */
            double sum = 0, local;
            for (int k = 0; k < parts; k++) {
                gradient(w, b, k * per, (k + 1) * per, gw, &gb);
                CHECK(sam_grad_sq_norm_local(opt, &local));
                sum += local;
            }
            norm = sqrt(sum);
        }
        for (int k = 0; k < parts; k++) {
            gradient(w, b, k * per, (k + 1) * per, gw, &gb); /* part k's gradient at w */
            CHECK(global ? sam_first_step_with_norm(opt, norm) : sam_first_step(opt));
            gradient(w, b, k * per, (k + 1) * per, gw, &gb); /* at w + e_k */
            CHECK(sam_accumulate_step(opt));                  /* back to w, g' accumulated */
        }
        CHECK(sam_second_step(opt)); /* the mean of the parts' g', SGD */
    }
    sam_destroy(opt);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    int global = 0;
    if (argc == 3 && !strcmp(argv[1], "--mode") && (!strcmp(argv[2], "global") || !strcmp(argv[2], "msharp"))) {
        global = !strcmp(argv[2], "global");
    } else {
        if (rank == 0) fprintf(stderr, "usage: %s --mode msharp|global\n", argv[0]);
        MPI_Finalize();
        return 2;
    }
    if (N % size) {
        if (rank == 0) fprintf(stderr, "the %d samples do not split evenly over %d ranks\n", N, size);
        MPI_Finalize();
        return 2;
    }
    make_data();
    const int lo = rank * (N / size), hi = lo + N / size;

    float w[D] = {0}, b = 0, gw[D], gb;
    SamOptimizer *opt = make_optimizer(w, gw, &b, &gb);
    if (global) CHECK(sam_set_allreduce(opt, mpi_sum, NULL));
    double loss = 0;
    for (int step = 0; step < STEPS; step++) {
        loss = gradient(w, &b, lo, hi, gw, &gb); /* the local gradient at w */
        CHECK(sam_first_step(opt));              /* msharp: local norm; global: all-reduced norm */
        gradient(w, &b, lo, hi, gw, &gb);        /* the local gradient at w + e */
        float g[D + 1];
        memcpy(g, gw, sizeof gw);
        g[D] = gb;
        MPI_Allreduce(MPI_IN_PLACE, g, D + 1, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        for (int j = 0; j <= D; j++) g[j] /= (float)size;
        memcpy(gw, g, sizeof gw);
        gb = g[D];
        CHECK(sam_second_step(opt)); /* restore + SGD on the averaged g', the same on every rank */
    }
    double loss_sum = 0;
    MPI_Allreduce(&loss, &loss_sum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);

    /* Every rank holds the same bits. */
    float mine[D + 1], first[D + 1];
    memcpy(mine, w, sizeof w);
    mine[D] = b;
    memcpy(first, mine, sizeof mine);
    MPI_Bcast(first, D + 1, MPI_FLOAT, 0, MPI_COMM_WORLD);
    int same = memcmp(first, mine, sizeof mine) == 0, all_same = 0;
    MPI_Allreduce(&same, &all_same, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);

    int ok = all_same;
    if (rank == 0) {
        float sw[D] = {0}, sb = 0;
        single_process(global, size, sw, &sb);
        double worst = 0, scale = 0;
        for (int j = 0; j <= D; j++) {
            double a = j < D ? w[j] : b, c = j < D ? sw[j] : sb;
            worst = fmax(worst, fabs(a - c));
            scale = fmax(scale, fabs(c));
        }
        double rel = worst / scale;
        printf("%s mode, %d ranks, %d steps: mean local loss %.4f; weights bit-identical on every rank: %s; "
               "largest difference from the single-process run %.3e (relative to max |w| %.3f)\n",
               global ? "global-norm" : "per-worker (m-sharpness)", size, STEPS, loss_sum / size,
               all_same ? "yes" : "NO", rel, scale);
        ok = all_same && rel < 1e-5;
    }
    MPI_Bcast(&ok, 1, MPI_INT, 0, MPI_COMM_WORLD);
    sam_destroy(opt);
    MPI_Finalize();
    return ok ? 0 : 1;
}
