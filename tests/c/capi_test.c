/*
 * The C API as a C program sees it: compiled with -std=c11 -Wall -Wextra -Werror -pedantic
 * against include/samopt.h, linked against the cdylib. Checks SAM's first step against a double
 * precision reference written here, the bitwise restore, and the error paths.
 * Prints "N passed, M failed" and exits non-zero on any failure.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "samopt.h"

static int passed, failed;

#define EXPECT(cond, ...)                                              \
    do {                                                               \
        if (cond) {                                                    \
            passed++;                                                  \
        } else {                                                       \
            failed++;                                                  \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                              \
            fprintf(stderr, " [last error: %s]\n", sam_last_error());  \
        }                                                              \
    } while (0)

static uint64_t rng_state = 12345;
static double uniform(void) { /* [-1, 1) */
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(rng_state >> 11) / 4503599627370496.0 - 1.0;
}

enum { NT = 4 };
static const size_t lens[NT] = {1, 3, 1023, (1u << 20) + 7};

/* One first/second step on f32 tensors of awkward sizes, against a double reference. */
static void check_f32_step(int adaptive, int sign) {
    float *w[NT], *g[NT], *saved[NT];
    double sum = 0.0;
    const double rho = adaptive ? 0.5 : 0.05, eta = adaptive ? 0.01 : 0.0, eps = 1e-12;
    for (int k = 0; k < NT; k++) {
        w[k] = malloc(lens[k] * sizeof(float));
        g[k] = malloc(lens[k] * sizeof(float));
        saved[k] = malloc(lens[k] * sizeof(float));
        for (size_t i = 0; i < lens[k]; i++) {
            w[k][i] = (float)uniform();
            g[k][i] = (float)(uniform() * 0.1);
            double t = adaptive ? fabs((double)w[k][i]) + eta : 1.0;
            sum += (t * g[k][i]) * (t * g[k][i]);
        }
        memcpy(saved[k], w[k], lens[k] * sizeof(float));
    }
    const double norm = sqrt(sum);

    SamConfig config = sam_config_default();
    config.rho = rho;
    config.eta = eta;
    config.adaptive = adaptive;
    config.norm_p = sign ? INFINITY : 2.0;
    SamOptimizer *opt = NULL;
    EXPECT(sam_create(&config, &opt) == SAM_OK, "create");
    for (int k = 0; k < NT; k++) {
        uint32_t id = 99;
        EXPECT(sam_register_host(opt, w[k], g[k], lens[k], SAM_DTYPE_F32, &id) == SAM_OK, "register %d", k);
        EXPECT(id == (uint32_t)k, "id %u", id);
    }
    EXPECT(sam_first_step(opt) == SAM_OK, "first step");
    double got_norm = 0.0;
    EXPECT(sam_grad_norm(opt, &got_norm) == SAM_OK, "grad norm");
    EXPECT(fabs(got_norm - norm) <= 1e-9 * norm, "norm %.17g vs reference %.17g", got_norm, norm);

    double worst = 0.0;
    for (int k = 0; k < NT; k++) {
        for (size_t i = 0; i < lens[k]; i++) {
            double w0 = saved[k][i], gi = g[k][i];
            double t = adaptive ? fabs(w0) + eta : 1.0;
            double e = sign ? rho * t * (gi > 0 ? 1.0 : gi < 0 ? -1.0 : 0.0) : rho * t * t * gi / (norm + eps);
            double ref = w0 + e;
            double err = fabs((double)w[k][i] - ref) / (fabs(ref) * 0x1p-24 + (fabs(w0) + fabs(e)) * 0x1p-21 + 1e-45);
            if (err > worst) worst = err;
        }
    }
    EXPECT(worst <= 1.0, "adaptive %d sign %d: worst error %.3f tolerances", adaptive, sign, worst);

    EXPECT(sam_second_step(opt) == SAM_OK, "second step");
    for (int k = 0; k < NT; k++) {
        EXPECT(memcmp(w[k], saved[k], lens[k] * sizeof(float)) == 0, "tensor %d not restored bitwise", k);
        free(w[k]);
        free(g[k]);
        free(saved[k]);
    }
    sam_destroy(opt);
}

/* f16 given as raw bits: 1.0 = 0x3C00, 0.5 = 0x3800, infinity = 0x7C00. */
static void check_f16_and_non_finite(void) {
    uint16_t w[2] = {0x3C00, 0x3C00}; /* 1.0, 1.0 */
    uint16_t g[2] = {0x3800, 0x0000}; /* 0.5, 0.0 */
    SamConfig config = sam_config_default();
    config.rho = 0.5;
    SamOptimizer *opt = NULL;
    uint32_t id;
    EXPECT(sam_create(&config, &opt) == SAM_OK, "create");
    EXPECT(sam_register_host(opt, w, g, 2, SAM_DTYPE_F16, &id) == SAM_OK, "register f16");
    EXPECT(sam_first_step(opt) == SAM_OK, "first step");
    /* ||g|| = 0.5, e = 0.5 * g / 0.5 = g: w = 1.5 (0x3E00), 1.0 */
    EXPECT(w[0] == 0x3E00 && w[1] == 0x3C00, "perturbed f16 bits %04x %04x", w[0], w[1]);
    EXPECT(sam_second_step(opt) == SAM_OK, "second step");
    EXPECT(w[0] == 0x3C00 && w[1] == 0x3C00, "restored f16 bits %04x %04x", w[0], w[1]);

    g[1] = 0x7C00; /* +infinity */
    EXPECT(sam_first_step(opt) == SAM_ERR_NON_FINITE, "infinite gradient");
    EXPECT(strstr(sam_last_error(), "element 1") != NULL, "message names the element: %s", sam_last_error());
    EXPECT(w[0] == 0x3C00 && w[1] == 0x3C00, "weights touched by a failed step");
    bool perturbed = true;
    EXPECT(sam_is_perturbed(opt, &perturbed) == SAM_OK && !perturbed, "still idle");
    sam_destroy(opt);
}

static void check_errors(void) {
    SamOptimizer *opt = NULL;
    SamConfig config = sam_config_default();
    EXPECT(config.struct_size == sizeof(SamConfig), "struct_size %zu", config.struct_size);
    EXPECT(config.rho == 0.05 && config.eps == 1e-12 && config.norm_p == 2.0 && !config.adaptive,
           "defaults");
    EXPECT(sam_create(NULL, &opt) == SAM_ERR_NULL_POINTER, "NULL config");
    EXPECT(strstr(sam_last_error(), "config is NULL") != NULL, "%s", sam_last_error());

    config.rho = -1.0;
    EXPECT(sam_create(&config, &opt) == SAM_ERR_INVALID_ARGUMENT, "negative rho");
    EXPECT(strstr(sam_last_error(), "rho = -1") != NULL, "%s", sam_last_error());
    EXPECT(opt == NULL, "out written on failure");

    config = sam_config_default();
    config.struct_size = sizeof(SamConfig) - 8;
    EXPECT(sam_create(&config, &opt) == SAM_ERR_INVALID_ARGUMENT, "short struct");

    config = sam_config_default();
    EXPECT(sam_create(&config, &opt) == SAM_OK, "create");
    float w[4] = {1, 2, 3, 4}, g[4] = {0};
    uint32_t id = 7;
    EXPECT(sam_register_host(opt, w, g, 0, SAM_DTYPE_F32, &id) == SAM_ERR_INVALID_ARGUMENT, "len 0");
    EXPECT(strstr(sam_last_error(), "len = 0") != NULL, "%s", sam_last_error());
    EXPECT(sam_register_host(opt, w, w, 4, SAM_DTYPE_F32, &id) == SAM_ERR_INVALID_ARGUMENT, "aliasing");
    EXPECT(sam_register_host(opt, w, g, 4, 42, &id) == SAM_ERR_INVALID_ARGUMENT, "dtype 42");
    EXPECT(sam_register_host(opt, NULL, g, 4, SAM_DTYPE_F32, &id) == SAM_ERR_NULL_POINTER, "NULL param");
    EXPECT(id == 7, "out_id written on failure");
    EXPECT(sam_second_step(opt) == SAM_ERR_INVALID_STATE, "second before first");
    EXPECT(sam_first_step(opt) == SAM_ERR_INVALID_STATE, "first with nothing registered");
    size_t count = 99;
    EXPECT(sam_tensor_count(opt, &count) == SAM_OK && count == 0, "count %zu", count);
    sam_destroy(opt);
    sam_destroy(NULL);

    EXPECT(strcmp(sam_status_string(SAM_OK), "ok") == 0, "status string");
    EXPECT(strcmp(sam_status_string(-1000), "unknown status") == 0, "unknown status string");
    EXPECT(sam_abi_version() == SAM_ABI_VERSION, "ABI %u", sam_abi_version());
    EXPECT(strlen(sam_version()) > 0, "version");
}

/* Device tensors on the GPU backend, when wgpu finds an adapter (lavapipe on CI). */
static void check_gpu(void) {
    size_t count = 0;
    EXPECT(sam_gpu_adapter_count(&count) == SAM_OK, "adapter count");
    if (count == 0) {
        /* CI sets SAMOPT_REQUIRE_GPU=1: there a missing adapter is a failure, not a skip. */
        const char *require = getenv("SAMOPT_REQUIRE_GPU");
        EXPECT(!(require && strcmp(require, "1") == 0), "SAMOPT_REQUIRE_GPU=1 but no GPU adapter");
        printf("no GPU adapter: GPU checks skipped\n");
        return;
    }
    SamAdapterInfo info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    EXPECT(sam_gpu_adapter_info(0, &info) == SAM_OK && info.name[0] != 0, "adapter 0");
    EXPECT(sam_gpu_adapter_info(count, &info) == SAM_ERR_INVALID_ARGUMENT, "adapter past the end");

    SamConfig config = sam_config_default();
    config.backend = SAM_BACKEND_GPU;
    config.rho = 0.5;
    SamOptimizer *opt = NULL;
    EXPECT(sam_create(&config, &opt) == SAM_OK, "create on the GPU");
    if (!opt) return;
    uint32_t id = 99;
    const uint16_t w[3] = {0x3C00, 0x4000, 0xC000}; /* f16: 1, 2, -2 */
    const uint16_t g[3] = {0x3800, 0x0000, 0x0000}; /* 0.5, 0, 0 */
    uint16_t out[3] = {0};
    EXPECT(sam_tensor_create(opt, 3, SAM_DTYPE_F16, &id) == SAM_OK && id == 0, "tensor create");
    EXPECT(sam_tensor_write(opt, id, SAM_PART_PARAM, w, 3) == SAM_OK, "write param");
    EXPECT(sam_tensor_write(opt, id, SAM_PART_GRAD, g, 3) == SAM_OK, "write grad");
    EXPECT(sam_first_step(opt) == SAM_OK, "first step");
    EXPECT(sam_tensor_read(opt, id, SAM_PART_PARAM, out, 3) == SAM_OK, "read param");
    /* ||g|| = 0.5, e = 0.5 * g / 0.5 = g: 1.5 (0x3E00), 2, -2 */
    EXPECT(out[0] == 0x3E00 && out[1] == 0x4000 && out[2] == 0xC000, "perturbed %04x %04x %04x", out[0], out[1], out[2]);
    EXPECT(sam_second_step(opt) == SAM_OK, "second step");
    EXPECT(sam_tensor_read(opt, id, SAM_PART_PARAM, out, 3) == SAM_OK && memcmp(out, w, sizeof w) == 0, "restored");
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    EXPECT(sam_get_adapter_info(opt, &info) == SAM_OK, "adapter of the optimizer");
    printf("GPU checks ran on %s (%s, %s)\n", info.name, info.backend, info.device_type);
    sam_destroy(opt);
}

/* Step schedules through C: LookSAM (k = 3, alpha 0.5) with the built-in SGD over 7 steps against
 * a double reference written here; the single-gradient status; the counters; sam_set_rho; and
 * bad schedules refused by name. */
static void check_schedule(void) {
    enum { N = 5, STEPS = 7 };
    float w[N] = {0.5f, -1.0f, 0.25f, 2.0f, -0.75f}, g[N];
    double rw[N], gv[N] = {0};
    int have_gv = 0;
    for (int i = 0; i < N; i++) rw[i] = w[i];
    SamConfig config = sam_config_default();
    config.base = SAM_BASE_SGD;
    config.lr = 0.1;
    config.rho = 0.2;
    config.schedule = SAM_SCHEDULE_LOOKSAM;
    config.schedule_k = 3;
    config.looksam_alpha = 0.5;
    SamOptimizer *opt = NULL;
    EXPECT(sam_create(&config, &opt) == SAM_OK, "create with LookSAM");
    if (!opt) return;
    uint32_t id;
    EXPECT(sam_register_host(opt, w, g, N, SAM_DTYPE_F32, &id) == SAM_OK, "register");
    EXPECT(sam_set_rho(opt, 0.1) == SAM_OK, "set rho");
    double rho = 0;
    EXPECT(sam_get_rho(opt, &rho) == SAM_OK && rho == 0.1, "get rho %g", rho);
    for (int t = 0; t < STEPS; t++) {
        double g1[N], g2[N], n1 = 0, n2 = 0, d12 = 0;
        for (int i = 0; i < N; i++) {
            g1[i] = (float)(0.5 * uniform());
            g2[i] = (float)(0.5 * uniform());
            g[i] = (float)g1[i];
            n1 += g1[i] * g1[i];
        }
        SamStatus first = sam_first_step(opt);
        int sam = t % 3 == 0;
        EXPECT(first == (sam ? SAM_OK : SAM_STEP_SINGLE_GRADIENT), "step %d: first step returned %d", t, (int)first);
        double d[N];
        if (sam) {
            for (int i = 0; i < N; i++) {
                double want = (float)(rw[i] + 0.1 * g1[i] / sqrt(n1));
                EXPECT(fabs(w[i] - want) <= 1e-6, "step %d: perturbed w[%d] = %g, want %g", t, i, w[i], want);
                g[i] = (float)g2[i];
                n2 += g2[i] * g2[i];
                d12 += g1[i] * g2[i];
            }
            (void)n2;
            for (int i = 0; i < N; i++) {
                gv[i] = g2[i] - d12 / n1 * g1[i];
                d[i] = g2[i];
            }
            have_gv = 1;
        } else {
            double nv = 0;
            for (int i = 0; i < N; i++) nv += gv[i] * gv[i];
            for (int i = 0; i < N; i++) d[i] = g1[i] + (have_gv ? 0.5 * sqrt(n1) / sqrt(nv) * gv[i] : 0.0);
        }
        EXPECT(sam_second_step(opt) == SAM_OK, "step %d: second step", t);
        for (int i = 0; i < N; i++) {
            rw[i] = (float)(rw[i] - 0.1 * d[i]);
            EXPECT(fabs(w[i] - rw[i]) <= 1e-6, "step %d: w[%d] = %.9g, reference %.9g", t, i, w[i], rw[i]);
        }
    }
    uint64_t sams = 0, singles = 0, steps = 0;
    EXPECT(sam_schedule_counts(opt, &sams, &singles) == SAM_OK && sams == 3 && singles == 4, "counts %llu %llu",
           (unsigned long long)sams, (unsigned long long)singles);
    EXPECT(sam_step_count(opt, &steps) == SAM_OK && steps == STEPS, "step count");
    EXPECT(sam_set_rho(opt, -1.0) == SAM_ERR_INVALID_ARGUMENT && strstr(sam_last_error(), "rho = -1"), "bad rho");
    sam_destroy(opt);

    /* Bad schedules: refused by name, nothing created. */
    struct {
        SamSchedule schedule;
        uint64_t k;
        double p, alpha;
        const char *needle;
    } bad[] = {
        {SAM_SCHEDULE_INTERVAL, 0, 0.5, 0.7, "config->schedule_k = 0"},
        {SAM_SCHEDULE_RANDOM, 1, 1.5, 0.7, "config->schedule_p = 1.5"},
        {SAM_SCHEDULE_RANDOM, 1, NAN, 0.7, "config->schedule_p = NaN"},
        {SAM_SCHEDULE_LOOKSAM, 2, 0.5, -1.0, "config->looksam_alpha = -1"},
        {SAM_SCHEDULE_AESAM, 1, 0.5, 0.7, "config->aesam_planned_steps = 0"},
        {9, 1, 0.5, 0.7, "config->schedule = 9"},
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        SamConfig c = sam_config_default();
        c.schedule = bad[k].schedule;
        c.schedule_k = bad[k].k;
        c.schedule_p = bad[k].p;
        c.looksam_alpha = bad[k].alpha;
        opt = NULL;
        EXPECT(sam_create(&c, &opt) == SAM_ERR_INVALID_ARGUMENT && opt == NULL &&
                   strstr(sam_last_error(), bad[k].needle) != NULL,
               "bad schedule %zu: %s", k, sam_last_error());
    }
}

/* Rebinding: one handle moves its tensor to new buffers before every step, another never does;
 * weights and optimizer state (compared as checkpoint bytes) end bit for bit the same. */
static void check_rebind(void) {
    enum { N = 33, STEPS = 5 };
    SamConfig config = sam_config_default();
    config.base = SAM_BASE_ADAMW;
    config.lr = 0.01;
    SamOptimizer *still = NULL, *moving = NULL;
    EXPECT(sam_create(&config, &still) == SAM_OK && sam_create(&config, &moving) == SAM_OK, "create");
    if (!still || !moving) return;
    float ws[N], gs[N], wm[2][N], gm[2][N];
    for (int i = 0; i < N; i++) ws[i] = wm[0][i] = (float)uniform();
    uint32_t id;
    EXPECT(sam_register_host(still, ws, gs, N, SAM_DTYPE_F32, &id) == SAM_OK, "register");
    EXPECT(sam_register_host(moving, wm[0], gm[0], N, SAM_DTYPE_F32, &id) == SAM_OK, "register");
    for (int t = 0; t < STEPS; t++) {
        int now = (t + 1) % 2; /* the buffers this step uses */
        memcpy(wm[now], wm[1 - now], sizeof wm[now]);
        EXPECT(sam_rebind_host(moving, id, wm[now], gm[now]) == SAM_OK, "rebind at step %d", t);
        for (int i = 0; i < N; i++) gs[i] = gm[now][i] = (float)(0.1 * uniform());
        EXPECT(sam_first_step(still) == SAM_OK && sam_first_step(moving) == SAM_OK, "first steps");
        for (int i = 0; i < N; i++) gs[i] = gm[now][i] = (float)(0.1 * uniform());
        EXPECT(sam_second_step(still) == SAM_OK && sam_second_step(moving) == SAM_OK, "second steps");
    }
    EXPECT(memcmp(ws, wm[STEPS % 2], sizeof ws) == 0, "weights after rebinding");
    size_t a = 0, b = 0;
    sam_state_size(still, &a);
    sam_state_size(moving, &b);
    unsigned char *sa = malloc(a), *sb = malloc(b);
    EXPECT(a == b && sam_state_save(still, sa, a, NULL) == SAM_OK && sam_state_save(moving, sb, b, NULL) == SAM_OK &&
               memcmp(sa, sb, a) == 0,
           "state after rebinding");
    free(sa);
    free(sb);
    EXPECT(sam_rebind_host(moving, 5, ws, gs) == SAM_ERR_INVALID_ARGUMENT && strstr(sam_last_error(), "id = 5"),
           "unknown id");
    EXPECT(sam_rebind_host(moving, id, NULL, gs) == SAM_ERR_NULL_POINTER, "NULL param");
    sam_destroy(still);
    sam_destroy(moving);
}

/* Loss scaling through C: the host multiplies its gradients by sam_get_loss_scale; an overflow
 * in the first gradient is SAM_STEP_SKIPPED from both steps with nothing moved and the scale
 * halved; the update with scaled gradients equals the update with the true ones (double
 * reference); a bad scale is refused by name. */
static void check_loss_scale(void) {
    SamConfig config = sam_config_default();
    config.base = SAM_BASE_SGD;
    config.lr = 0.5;
    config.loss_scale = 1024.0;
    SamOptimizer *opt = NULL;
    EXPECT(sam_create(&config, &opt) == SAM_OK, "create with a loss scale");
    if (!opt) return;
    float w[3] = {1.0f, -1.0f, 0.5f}, g[3];
    uint32_t id;
    EXPECT(sam_register_host(opt, w, g, 3, SAM_DTYPE_F32, &id) == SAM_OK, "register");
    double s = 0;
    EXPECT(sam_get_loss_scale(opt, &s) == SAM_OK && s == 1024.0, "initial scale %g", s);
    g[0] = INFINITY, g[1] = 0.0f, g[2] = 1.0f;
    EXPECT(sam_first_step(opt) == SAM_STEP_SKIPPED, "an overflow is a skip");
    EXPECT(w[0] == 1.0f && w[1] == -1.0f && w[2] == 0.5f, "nothing moved");
    EXPECT(sam_second_step(opt) == SAM_STEP_SKIPPED, "the second step ends the skipped step");
    EXPECT(sam_get_loss_scale(opt, &s) == SAM_OK && s == 512.0, "backed off to %g", s);
    const float g1[3] = {0.25f, -0.5f, 0.125f}, g2[3] = {0.5f, 0.25f, -0.25f};
    for (int i = 0; i < 3; i++) g[i] = (float)s * g1[i];
    EXPECT(sam_first_step(opt) == SAM_OK, "first step");
    for (int i = 0; i < 3; i++) g[i] = (float)s * g2[i];
    EXPECT(sam_second_step(opt) == SAM_OK, "second step");
    const double w0[3] = {1.0, -1.0, 0.5};
    for (int i = 0; i < 3; i++)
        EXPECT(fabs(w[i] - (w0[i] - 0.5 * g2[i])) < 1e-7, "w[%d] = %g: the update used g/S", i, w[i]);
    sam_destroy(opt);
    config.loss_scale = -1.0;
    opt = NULL;
    EXPECT(sam_create(&config, &opt) == SAM_ERR_INVALID_ARGUMENT && strstr(sam_last_error(), "loss_scale = -1"),
           "bad scale: %s", sam_last_error());
}

/* Master weights through C: bf16 weights of 1.0 take 256 SGD updates of 2^-16 each, below half a
 * unit in the last place (2^-9): lost without master weights, summed to exactly 1 - 2^-8 (bf16
 * 0x3F7F) with them. The preconditioned perturbation needs AdamW. */
static void check_master_weights(void) {
    for (int master = 0; master <= 1; master++) {
        SamConfig config = sam_config_default();
        config.base = SAM_BASE_SGD;
        config.lr = 1.0 / 1024;
        config.master_weights = master;
        SamOptimizer *opt = NULL;
        EXPECT(sam_create(&config, &opt) == SAM_OK, "create, master %d", master);
        if (!opt) return;
        uint16_t w[8], g[8];
        for (int i = 0; i < 8; i++) w[i] = 0x3F80; /* bf16 1.0 */
        uint32_t id;
        EXPECT(sam_register_host(opt, w, g, 8, SAM_DTYPE_BF16, &id) == SAM_OK, "register bf16");
        for (int t = 0; t < 256; t++) {
            for (int i = 0; i < 8; i++) g[i] = 0x3C80; /* 2^-6 */
            EXPECT(sam_first_step(opt) == SAM_OK, "first step");
            EXPECT(sam_second_step(opt) == SAM_OK, "second step");
        }
        uint16_t want = master ? 0x3F7F : 0x3F80;
        EXPECT(w[0] == want && w[7] == want, "master %d: w = %04x, want %04x", master, w[0], want);
        sam_destroy(opt);
    }
    SamConfig config = sam_config_default();
    config.base = SAM_BASE_SGD;
    config.preconditioned = true;
    SamOptimizer *opt = NULL;
    EXPECT(sam_create(&config, &opt) == SAM_ERR_INVALID_ARGUMENT && strstr(sam_last_error(), "preconditioned"),
           "preconditioned needs AdamW: %s", sam_last_error());
    config.base = SAM_BASE_ADAMW;
    EXPECT(sam_create(&config, &opt) == SAM_OK, "preconditioned AdamW");
    sam_destroy(opt);
}

/* sam_config_layout against this C compiler's own layout of SamConfig: every field's name, offset
 * and size, in order. */
static void check_config_layout(void) {
#define FIELD(f) {#f, offsetof(SamConfig, f), sizeof(((SamConfig *)0)->f)}
    static const struct {
        const char *name;
        size_t offset, size;
    } want[] = {
        FIELD(struct_size),
        FIELD(rho),
        FIELD(eps),
        FIELD(eta),
        FIELD(norm_p),
        FIELD(adaptive),
        FIELD(backend),
        FIELD(num_threads),
        FIELD(adapter),
        FIELD(base),
        FIELD(lr),
        FIELD(momentum),
        FIELD(dampening),
        FIELD(nesterov),
        FIELD(weight_decay),
        FIELD(beta1),
        FIELD(beta2),
        FIELD(adam_eps),
        FIELD(max_grad_norm),
        FIELD(gsam_alpha),
        FIELD(schedule),
        FIELD(schedule_k),
        FIELD(schedule_p),
        FIELD(schedule_seed),
        FIELD(looksam_alpha),
        FIELD(aesam_delta),
        FIELD(aesam_lambda1),
        FIELD(aesam_lambda2),
        FIELD(aesam_planned_steps),
        FIELD(loss_scale),
        FIELD(loss_scale_growth),
        FIELD(loss_scale_backoff),
        FIELD(loss_scale_interval),
        FIELD(master_weights),
        FIELD(preconditioned),
    };
#undef FIELD
    const size_t n = sizeof want / sizeof want[0];
    size_t count = 0;
    EXPECT(sam_config_layout(NULL, 0, &count) == SAM_OK && count == n, "count %zu, want %zu", count, n);
    SamConfigField got[64];
    EXPECT(sam_config_layout(got, 64, &count) == SAM_OK && count == n, "count %zu", count);
    for (size_t i = 0; i < n && i < count; i++) {
        EXPECT(strcmp(got[i].name, want[i].name) == 0 && got[i].offset == want[i].offset && got[i].size == want[i].size,
               "field %zu: library %s at %zu (%zu bytes), C %s at %zu (%zu bytes)", i, got[i].name, got[i].offset,
               got[i].size, want[i].name, want[i].offset, want[i].size);
    }
    EXPECT(sam_config_layout(got, 1, NULL) == SAM_ERR_NULL_POINTER, "NULL out_count");
}

int main(void) {
    for (int adaptive = 0; adaptive <= 1; adaptive++)
        for (int sign = 0; sign <= 1; sign++) check_f32_step(adaptive, sign);
    check_f16_and_non_finite();
    check_errors();
    check_config_layout();
    check_schedule();
    check_rebind();
    check_loss_scale();
    check_master_weights();
    check_gpu();
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
