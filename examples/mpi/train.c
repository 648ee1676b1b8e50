/*
 * SAM over MPI in the three data-parallel set-ups, each checked against its single-process
 * equivalent computed in the same program. The model is a logistic regression (16 weights and a
 * bias, one parameter vector theta of P = 17 floats); samopt's built-in SGD (momentum 0.9) steps
 * it. The training set is split evenly across the ranks.
 *
 *   --mode replicated   Every rank holds all the parameters. Each rank computes the gradient on
 *                       its part of the batch and the host all-reduces (averages) it BEFORE
 *                       sam_first_step, so every rank perturbs along the same global-batch
 *                       gradient with the same norm: exact SAM over the global batch, and samopt
 *                       does no communication. The second gradient is all-reduced the same way
 *                       before sam_second_step. Reference: one process, the gradient over the
 *                       whole batch, plain SAM; the perturbed weights of every step and the final
 *                       weights must match it. Weights are bit-identical on every rank.
 *
 *   --mode msharp       Per-worker perturbation (m-sharpness, as the original JAX code across
 *                       accelerators): each rank calls plain sam_first_step on its own local
 *                       gradient, so it perturbs with its own gradient and its own norm; the host
 *                       all-reduces (averages) only the second gradient before sam_second_step.
 *                       Reference: one process cutting the batch into the same parts, with
 *                       sam_first_step / sam_accumulate_step per part and one sam_second_step;
 *                       rank k's perturbed weights must match part k's, and the final weights
 *                       the reference's. Weights are bit-identical on every rank.
 *
 *   --mode sharded      The parameters are split across the ranks (ZeRO / FSDP / tensor parallel):
 *                       rank r owns a disjoint slice of theta and registers only that slice. Each
 *                       rank gathers the full theta (MPI_Allgatherv) for the forward and backward
 *                       pass on its part of the batch; MPI_Reduce_scatter sums the gradients and
 *                       hands each rank the global-batch gradient of its own slice.
 *                       sam_set_allreduce(opt, mpi_sum, NULL) makes sam_first_step sum the
 *                       ranks' squared norms (one double), so every slice is perturbed with the
 *                       true norm over all slices. The perturbed slices are gathered again for
 *                       the second forward and backward pass. Reference: one process with the
 *                       whole parameter vector and plain SAM over the whole batch (the same as for
 *                       replicated); the gathered perturbed and final weights must match it.
 *
 *   --mode sharded-looksam
 *                       As sharded, with a step schedule and loss scaling: LookSAM (SAM every
 *                       third step, the others reuse its orthogonal direction with one gradient)
 *                       and a dynamic loss scale (the host multiplies its gradients by
 *                       sam_get_loss_scale). samopt decides each step from the sums it
 *                       exchanges (two doubles in each step under LookSAM), so every rank takes
 *                       the same kind of step; on a single-gradient step (sam_first_step returns
 *                       SAM_STEP_SINGLE_GRADIENT) the ranks skip the second forward and backward.
 *                       Reference: one process with the same schedule and scale over the whole
 *                       batch.
 *
 * Rank 0 prints one line with the largest differences from the reference; the program exits
 * non-zero when a check fails. (Bit-identical weights on every rank rely on MPI_Allreduce giving
 * every rank the same sum, as the MPI standard advises implementations to do.)
 *
 *   mpicc -std=c11 -Iinclude examples/mpi/train.c -Ltarget/release -lsamopt -lm -o train_mpi
 *   mpirun -np 2 ./train_mpi --mode replicated      (or msharp, sharded, sharded-looksam)
 */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "samopt.h"

/* N splits evenly over 1 to 6, 8, 10, 12, ... ranks; P = D + 1 parameters (w, then the bias). */
enum { N = 960, D = 16, P = D + 1, STEPS = 50 };

/*
 * The tolerance, relative to the largest |weight| of the reference (over every step, for the
 * perturbed weights). The distributed runs and their references do the same float32 arithmetic
 * except for the order of a few sums: the batch gradient is a mean of per-rank means summed by
 * MPI in its own order instead of one mean over the whole batch, the m-sharpness mean of the
 * second gradients is MPI's sum instead of samopt's accumulator, and in sharded mode the squared
 * norm is a sum of per-rank sums. Each changes a value by about one float32 rounding (6e-8
 * relative to the terms summed); this convex, well-conditioned problem does not amplify that over
 * 50 steps: the measured differences are at most 2e-7 on 2 to 6 and 8 ranks (sharded-looksam:
 * 1.2e-6 on 2 to 4 ranks, LookSAM's reused direction carrying the sums' order). 1e-5 leaves a factor
 * of 50 for other MPI reduction orders, while a wrong set-up (no gradient all-reduce before the
 * first step, a rank's local norm for sharded parameters, a global norm for m-sharpness) differed
 * by 2e-3 or more in the final weights when tried on 2 and 4 ranks.
 */
#define TOLERANCE 1e-5

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

/* The mean logistic-loss gradient over samples [lo, hi) at theta (w, b), accumulated in double
 * and rounded once, into g[P]; returns the mean loss. */
static double gradient(const float *theta, int lo, int hi, float *g) {
    double acc[P] = {0}, loss = 0;
    for (int i = lo; i < hi; i++) {
        double z = theta[D];
        for (int j = 0; j < D; j++) z += (double)theta[j] * xs[i][j];
        double p = 1.0 / (1.0 + exp(-z));
        loss -= ys[i] > 0.5f ? log(p + 1e-12) : log(1.0 - p + 1e-12);
        double d = p - ys[i];
        for (int j = 0; j < D; j++) acc[j] += d * xs[i][j];
        acc[D] += d;
    }
    for (int j = 0; j < P; j++) g[j] = (float)(acc[j] / (hi - lo));
    return loss / (hi - lo);
}

/* The host's all-reduce for sam_set_allreduce: sums `count` doubles across the ranks in place. */
static int32_t mpi_sum(double *values, size_t count, void *user) {
    (void)user;
    return MPI_Allreduce(MPI_IN_PLACE, values, (int)count, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD) != MPI_SUCCESS;
}

/* The loss scale the host multiplies its gradients by (1 without loss scaling). */
static float scale_of(SamOptimizer *opt) {
    double s = 1.0;
    CHECK(sam_get_loss_scale(opt, &s));
    return (float)s;
}

/* `n` gradients times the loss scale (a power of two: exact). */
static void scale_grads(float *g, int n, float s) {
    for (int j = 0; j < n; j++) g[j] *= s;
}

/* The mean over the ranks of `n` floats, in place, the same bits on every rank. */
static void average(float *v, int n, int size) {
    MPI_Allreduce(MPI_IN_PLACE, v, n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    for (int j = 0; j < n; j++) v[j] /= (float)size;
}

/* sharded-looksam: LookSAM and a dynamic loss scale in every optimizer, the reference's too. */
static int looksam;

/* One optimizer (SAM, SGD with momentum, CPU) over the `len` parameters at w with gradients at g. */
static SamOptimizer *make_optimizer(float *w, float *g, int len) {
    SamConfig config = sam_config_default();
    if (looksam) {
        config.schedule = SAM_SCHEDULE_LOOKSAM;
        config.schedule_k = 3;
        config.looksam_alpha = 0.7;
        config.loss_scale = 1024.0;
    }
    config.rho = 0.1;
    config.base = SAM_BASE_SGD;
    config.lr = 0.5;
    config.momentum = 0.9;
    config.backend = SAM_BACKEND_CPU;
    config.num_threads = 1;
    SamOptimizer *opt = NULL;
    uint32_t id;
    CHECK(sam_create(&config, &opt));
    CHECK(sam_register_host(opt, w, g, (size_t)len, SAM_DTYPE_F32, &id));
    return opt;
}

/* max |a - b| / max |b| over n floats. */
static double rel_diff(const float *a, const float *b, int n) {
    double worst = 0, scale = 0;
    for (int j = 0; j < n; j++) {
        worst = fmax(worst, fabs((double)a[j] - b[j]));
        scale = fmax(scale, fabs((double)b[j]));
    }
    return worst / scale;
}

/* ---- The single-process references (rank 0) ---- */

/* Plain SAM over the whole batch; perturbed[step] gets w + e(w) of each step. */
static void reference_global_batch(float theta[P], float perturbed[STEPS][P]) {
    float g[P];
    SamOptimizer *opt = make_optimizer(theta, g, P);
    for (int step = 0; step < STEPS; step++) {
        const float s = scale_of(opt);
        gradient(theta, 0, N, g);
        scale_grads(g, P, s);
        SamStatus first = sam_first_step(opt);
        CHECK(first);
        memcpy(perturbed[step], theta, sizeof(float[P]));
        if (first == SAM_OK) { /* a SAM step: the second gradient, at w + e(w) */
            gradient(theta, 0, N, g);
            scale_grads(g, P, s);
        }
        CHECK(sam_second_step(opt));
    }
    sam_destroy(opt);
}

/* m-sharpness in one process: the batch cut into `parts`, each part perturbed with its own
 * gradient and norm, the mean of the parts' perturbed gradients applied; perturbed[k][step] gets
 * part k's w + e_k(w). */
static void reference_msharp(float theta[P], int parts, float perturbed[][STEPS][P]) {
    float g[P];
    SamOptimizer *opt = make_optimizer(theta, g, P);
    const int per = N / parts;
    for (int step = 0; step < STEPS; step++) {
        for (int k = 0; k < parts; k++) {
            gradient(theta, k * per, (k + 1) * per, g); /* part k's gradient at w */
            CHECK(sam_first_step(opt));                  /* w + e_k, part k's own norm */
            memcpy(perturbed[k][step], theta, sizeof(float[P]));
            gradient(theta, k * per, (k + 1) * per, g); /* at w + e_k */
            CHECK(sam_accumulate_step(opt));             /* back to w, g' accumulated */
        }
        CHECK(sam_second_step(opt)); /* SGD with the mean of the parts' g' */
    }
    sam_destroy(opt);
}

/* ---- The distributed runs: the full theta on return (gathered in sharded mode) ---- */

/* Replicated parameters, gradients averaged before the first step. */
static void run_replicated(int rank, int size, float theta[P], float perturbed[STEPS][P]) {
    const int lo = rank * (N / size), hi = lo + N / size;
    float g[P];
    SamOptimizer *opt = make_optimizer(theta, g, P);
    for (int step = 0; step < STEPS; step++) {
        gradient(theta, lo, hi, g);
        average(g, P, size);        /* the global-batch gradient, the same on every rank */
        CHECK(sam_first_step(opt)); /* the same w + e(w) on every rank; no communication */
        memcpy(perturbed[step], theta, sizeof(float[P]));
        gradient(theta, lo, hi, g);
        average(g, P, size);
        CHECK(sam_second_step(opt));
    }
    sam_destroy(opt);
}

/* Per-worker perturbation: only the second gradient is averaged. */
static void run_msharp(int rank, int size, float theta[P], float perturbed[STEPS][P]) {
    const int lo = rank * (N / size), hi = lo + N / size;
    float g[P];
    SamOptimizer *opt = make_optimizer(theta, g, P);
    for (int step = 0; step < STEPS; step++) {
        gradient(theta, lo, hi, g);
        CHECK(sam_first_step(opt)); /* this rank's own gradient and norm */
        memcpy(perturbed[step], theta, sizeof(float[P]));
        gradient(theta, lo, hi, g);
        average(g, P, size);
        CHECK(sam_second_step(opt));
    }
    sam_destroy(opt);
}

/* Sharded parameters: rank r owns theta[displs[r] .. displs[r] + counts[r]). */
typedef struct {
    int rank, size, counts[P], displs[P];
} Shards;

/* The full theta from every rank's slice. */
static void gather(const Shards *sh, const float *slice, float theta[P]) {
    MPI_Allgatherv(slice, sh->counts[sh->rank], MPI_FLOAT, theta, sh->counts, sh->displs, MPI_FLOAT,
                   MPI_COMM_WORLD);
}

/* The global-batch gradient of this rank's slice at theta: the local gradient over the whole
 * vector, summed across the ranks and scattered by slice (ZeRO's reduce-scatter), averaged. */
static void slice_gradient(const Shards *sh, const float theta[P], float *slice_g) {
    const int lo = sh->rank * (N / sh->size), hi = lo + N / sh->size;
    float g[P];
    gradient(theta, lo, hi, g);
    MPI_Reduce_scatter(g, slice_g, sh->counts, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    for (int j = 0; j < sh->counts[sh->rank]; j++) slice_g[j] /= (float)sh->size;
}

static void run_sharded(int rank, int size, float theta[P], float perturbed[STEPS][P]) {
    Shards sh = {.rank = rank, .size = size};
    for (int r = 0, at = 0; r < size; r++) {
        sh.counts[r] = P / size + (r < P % size);
        sh.displs[r] = at;
        at += sh.counts[r];
    }
    const int n = sh.counts[rank];
    float slice[P], slice_g[P]; /* this rank's parameters and their gradient: the first n floats */
    memcpy(slice, theta + sh.displs[rank], (size_t)n * sizeof(float));
    SamOptimizer *opt = make_optimizer(slice, slice_g, n); /* registers this rank's slice only */
    CHECK(sam_set_allreduce(opt, mpi_sum, NULL));          /* sam_first_step: the norm over all slices */
    for (int step = 0; step < STEPS; step++) {
        const float s = scale_of(opt);
        gather(&sh, slice, theta); /* w */
        slice_gradient(&sh, theta, slice_g);
        scale_grads(slice_g, n, s);
        /* This slice -> w + e(w), e with the norm over all slices; or, under a schedule, a
         * single-gradient step that every rank takes alike (decided from the exchanged sums). */
        SamStatus first = sam_first_step(opt);
        CHECK(first);
        gather(&sh, slice, theta); /* w + e(w), or w */
        memcpy(perturbed[step], theta, sizeof(float[P]));
        if (first == SAM_OK) {
            slice_gradient(&sh, theta, slice_g);
            scale_grads(slice_g, n, s);
        }
        CHECK(sam_second_step(opt)); /* this slice restored and stepped */
    }
    gather(&sh, slice, theta);
    sam_destroy(opt);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const char *mode = argc == 3 && !strcmp(argv[1], "--mode") ? argv[2] : "";
    looksam = !strcmp(mode, "sharded-looksam");
    const int replicated = !strcmp(mode, "replicated"), msharp = !strcmp(mode, "msharp"),
              sharded = !strcmp(mode, "sharded") || looksam;
    if (!replicated && !msharp && !sharded) {
        if (rank == 0) fprintf(stderr, "usage: %s --mode replicated|msharp|sharded|sharded-looksam\n", argv[0]);
        MPI_Finalize();
        return 2;
    }
    if (N % size || (sharded && size > P)) {
        if (rank == 0)
            fprintf(stderr, "%d ranks: the %d samples must split evenly; sharded takes at most %d ranks\n", size,
                    N, P);
        MPI_Finalize();
        return 2;
    }
    make_data();

    static float perturbed[STEPS][P];
    float theta[P] = {0};
    if (replicated) run_replicated(rank, size, theta, perturbed);
    if (msharp) run_msharp(rank, size, theta, perturbed);
    if (sharded) run_sharded(rank, size, theta, perturbed);

    /* Every rank holds the same bits (in sharded mode, the same gathered vector). */
    float first[P];
    memcpy(first, theta, sizeof first);
    MPI_Bcast(first, P, MPI_FLOAT, 0, MPI_COMM_WORLD);
    int same = memcmp(first, theta, sizeof first) == 0, all_same = 0;
    MPI_Allreduce(&same, &all_same, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);

    /* msharp: every rank's perturbed weights, which differ, to compare with the reference's parts. */
    float(*all_perturbed)[STEPS][P] = rank == 0 ? malloc((size_t)size * sizeof *all_perturbed) : NULL;
    if (msharp)
        MPI_Gather(perturbed, STEPS * P, MPI_FLOAT, all_perturbed, STEPS * P, MPI_FLOAT, 0, MPI_COMM_WORLD);

    int ok = all_same;
    if (rank == 0) {
        float ref[P] = {0};
        float(*ref_perturbed)[STEPS][P] = malloc((size_t)size * sizeof *ref_perturbed);
        double pert_diff; /* every step's perturbed weights, relative to the largest over the run */
        if (msharp) {
            reference_msharp(ref, size, ref_perturbed);
            pert_diff = rel_diff(&all_perturbed[0][0][0], &ref_perturbed[0][0][0], size * STEPS * P);
        } else {
            reference_global_batch(ref, ref_perturbed[0]);
            pert_diff = rel_diff(&perturbed[0][0], &ref_perturbed[0][0][0], STEPS * P);
        }
        const double final_diff = rel_diff(theta, ref, P);
        const double loss = gradient(theta, 0, N, (float[P]){0});
        printf("%-10s %d ranks, %d steps: loss %.4f, same weights on every rank: %s; relative difference from "
               "%s: perturbed %.2e, final %.2e (tolerance %.0e)\n",
               mode, size, STEPS, loss, all_same ? "yes" : "NO",
               msharp    ? "sam_accumulate_step over the parts"
               : looksam ? "LookSAM (k = 3) with a loss scale over the whole batch"
                         : "plain SAM over the whole batch",
               pert_diff,
               final_diff, TOLERANCE);
        ok = all_same && final_diff < TOLERANCE && pert_diff < TOLERANCE;
        if (!ok) fprintf(stderr, "%s: CHECK FAILED\n", mode);
        free(ref_perturbed);
    }
    free(all_perturbed);
    MPI_Bcast(&ok, 1, MPI_INT, 0, MPI_COMM_WORLD);
    MPI_Finalize();
    return ok ? 0 : 1;
}
