/*
 * samopt quickstart: logistic regression trained with SAM through the C API.
 *
 * The host owns its weights and gradients; samopt perturbs and restores them in place. The base
 * optimizer here is the host's own plain SGD, run after sam_second_step on the gradient taken at
 * the perturbed weights, exactly as the PyTorch reference does it.
 *
 * Build (after `cargo build --release`):
 *   cc -std=c11 -O2 -Iinclude examples/c/quickstart.c -Ltarget/release -lsamopt -lm \
 *      -Wl,-rpath,$PWD/target/release -o quickstart && ./quickstart
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "samopt.h"

enum { N = 512, D = 8, EPOCHS = 60 };

/* Stops with the library's own message when a call fails. */
#define CHECK(call)                                                                          \
    do {                                                                                     \
        SamStatus s_ = (call);                                                               \
        if (s_ != SAM_OK) {                                                                  \
            fprintf(stderr, "%s failed: %s (%s)\n", #call, sam_status_string(s_), sam_last_error()); \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

static float xs[N][D];
static float ys[N];

/* A fixed-seed dataset: labels from a linear rule, 10% of them flipped. */
static void make_data(void) {
    unsigned long long state = 42;
    float true_w[D];
    for (int j = 0; j < D; j++) true_w[j] = (float)(j % 3) - 1.0f + 0.25f * (float)j / D;
    for (int i = 0; i < N; i++) {
        float z = 0.3f;
        for (int j = 0; j < D; j++) {
            state = state * 6364136223846793005ULL + 1442695040888963407ULL;
            xs[i][j] = (float)((double)(state >> 11) / 9007199254740992.0 * 2.0 - 1.0);
            z += true_w[j] * xs[i][j];
        }
        state = state * 6364136223846793005ULL + 1442695040888963407ULL;
        int flip = (state >> 11) % 10 == 0;
        ys[i] = (float)((z > 0.0f) ^ flip);
    }
}

/* Mean logistic loss and its gradient with respect to w and b; returns the loss. */
static float loss_and_grad(const float *w, const float *b, float *gw, float *gb, float *accuracy) {
    double loss = 0.0;
    int correct = 0;
    memset(gw, 0, D * sizeof(float));
    *gb = 0.0f;
    for (int i = 0; i < N; i++) {
        float z = *b;
        for (int j = 0; j < D; j++) z += w[j] * xs[i][j];
        float p = 1.0f / (1.0f + expf(-z));
        loss -= ys[i] > 0.5f ? log(p + 1e-12) : log(1.0 - p + 1e-12);
        correct += (p > 0.5f) == (ys[i] > 0.5f);
        float d = (p - ys[i]) / N;
        for (int j = 0; j < D; j++) gw[j] += d * xs[i][j];
        *gb += d;
    }
    if (accuracy) *accuracy = (float)correct / N;
    return (float)(loss / N);
}

int main(void) {
    printf("samopt %s (ABI %u)\n", sam_version(), sam_abi_version());
    if (sam_abi_version() != SAM_ABI_VERSION) {
        fprintf(stderr, "header ABI %d, library ABI %u\n", SAM_ABI_VERSION, sam_abi_version());
        return 1;
    }
    make_data();

    /* The host's parameters and gradients: it keeps them, samopt works on them in place. */
    float w[D] = {0}, b = 0.0f, gw[D], gb;

    SamConfig config = sam_config_default();
    config.rho = 0.05;
    SamOptimizer *opt = NULL;
    CHECK(sam_create(&config, &opt));
    uint32_t id_w, id_b;
    CHECK(sam_register_host(opt, w, gw, D, SAM_DTYPE_F32, &id_w));
    CHECK(sam_register_host(opt, &b, &gb, 1, SAM_DTYPE_F32, &id_b));

    const float lr = 0.5f;
    float loss = 0.0f, accuracy = 0.0f;
    for (int epoch = 1; epoch <= EPOCHS; epoch++) {
        loss = loss_and_grad(w, &b, gw, &gb, &accuracy); /* gradient at w */
        CHECK(sam_first_step(opt));                       /* w -> w + e(w) */
        loss_and_grad(w, &b, gw, &gb, NULL);              /* gradient at w + e(w) */
        CHECK(sam_second_step(opt));                      /* back to w, bit for bit */
        for (int j = 0; j < D; j++) w[j] -= lr * gw[j];   /* the host's SGD */
        b -= lr * gb;
        if (epoch % 10 == 0 || epoch == 1) {
            double norm = 0.0;
            CHECK(sam_grad_norm(opt, &norm));
            printf("epoch %3d  loss %.4f  train accuracy %.3f  ||g|| %.4f\n", epoch, loss, accuracy, norm);
        }
    }
    sam_destroy(opt);

    /* 10% of labels are flipped, so about 0.9 is the best a linear model can do. */
    if (!(accuracy > 0.8f && loss < 0.6f)) {
        fprintf(stderr, "training did not converge: loss %.4f, accuracy %.3f\n", loss, accuracy);
        return 1;
    }
    printf("ok: loss %.4f, train accuracy %.3f\n", loss, accuracy);
    return 0;
}
