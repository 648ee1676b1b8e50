/*
 * A program built against the ABI-1 header as it was released (tests/abi/samopt_abi1.h, a frozen
 * copy: never regenerate it) must keep running against every later libsamopt of ABI 1: the
 * structs it passes (SamConfig, SamAdapterInfo) have the sizes of that header, and every call it
 * makes keeps its meaning. Numbers are checked against a double-precision reference written here.
 */
#include "samopt_abi1.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static int passed, failed;

#define CHECK(cond)                                                              \
    do {                                                                         \
        if (cond) {                                                              \
            passed++;                                                            \
        } else {                                                                 \
            failed++;                                                            \
            printf("FAILED %s:%d: %s (%s)\n", __FILE__, __LINE__, #cond, sam_last_error()); \
        }                                                                        \
    } while (0)

#define N 5

int main(void) {
    CHECK(sam_abi_version() == SAM_ABI_VERSION);

    /* The config as this header lays it out, through the by-value default. */
    SamConfig config = sam_config_default();
    CHECK(config.struct_size == sizeof(SamConfig));
    config.backend = SAM_BACKEND_CPU;
    config.base = SAM_BASE_SGD;
    config.lr = 0.1;
    config.momentum = 0.9;
    config.rho = 0.05;
    SamOptimizer *opt = NULL;
    CHECK(sam_create(&config, &opt) == SAM_OK);
    if (!opt) {
        printf("%d passed, %d failed\n", passed, failed);
        return 1;
    }

    float w[N] = {0.5f, -1.0f, 0.25f, 2.0f, -0.75f};
    float g[N];
    double ref_w[N], buf[N];
    for (int i = 0; i < N; i++) ref_w[i] = w[i];
    uint32_t id = 99;
    CHECK(sam_register_host(opt, w, g, N, SAM_DTYPE_F32, &id) == SAM_OK && id == 0);

    /* Three SAM steps on the loss sum((w - 1)^2 / 2): g = w - 1, against double SGD + momentum. */
    for (int step = 0; step < 3; step++) {
        double norm = 0, e[N];
        for (int i = 0; i < N; i++) {
            g[i] = w[i] - 1.0f;
            norm += (double)g[i] * g[i];
        }
        norm = sqrt(norm);
        CHECK(sam_first_step(opt) == SAM_OK);
        for (int i = 0; i < N; i++) {
            e[i] = 0.05 * (ref_w[i] - 1.0) / (norm + 1e-12);
            CHECK(fabs(w[i] - (ref_w[i] + e[i])) < 1e-6);
            g[i] = w[i] - 1.0f; /* the gradient at the perturbed point */
        }
        CHECK(sam_second_step(opt) == SAM_OK);
        for (int i = 0; i < N; i++) {
            double d = ref_w[i] + e[i] - 1.0;
            buf[i] = step == 0 ? d : 0.9 * buf[i] + d;
            ref_w[i] -= 0.1 * buf[i];
            CHECK(fabs(w[i] - ref_w[i]) < 1e-5);
        }
    }
    uint64_t steps = 0;
    CHECK(sam_step_count(opt, &steps) == SAM_OK && steps == 3);

    /* A checkpoint round trip. */
    size_t size = 0, written = 0;
    CHECK(sam_state_size(opt, &size) == SAM_OK && size > 0 && size <= 4096);
    unsigned char state[4096];
    CHECK(sam_state_save(opt, state, sizeof state, &written) == SAM_OK && written == size);
    CHECK(sam_state_load(opt, state, written) == SAM_OK);

    /* Errors keep their numbers and messages. */
    CHECK(sam_first_step(NULL) == SAM_ERR_NULL_POINTER);
    CHECK(sam_second_step(opt) == SAM_ERR_INVALID_STATE);
    CHECK(strstr(sam_last_error(), "sam_second_step") != NULL);
    CHECK(strcmp(sam_status_string(SAM_STEP_SKIPPED), "unknown status") != 0);

    /* The adapter listing fills this header's SamAdapterInfo. */
    size_t adapters = 0;
    CHECK(sam_gpu_adapter_count(&adapters) == SAM_OK);
    if (adapters > 0) {
        SamAdapterInfo info;
        memset(&info, 0, sizeof info);
        info.struct_size = sizeof info;
        CHECK(sam_gpu_adapter_info(0, &info) == SAM_OK && info.name[0] != 0);
    }

    sam_destroy(opt);
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
