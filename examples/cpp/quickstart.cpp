// The C quickstart through the C++ wrapper: logistic regression on a fixed-seed dataset with 10%
// of its labels flipped, trained with SAM; this time the plugin runs SGD too (fused with the
// restore), with a cosine learning-rate schedule and no weight decay on the bias (a group).
#include <samopt.hpp>

#include <array>
#include <cmath>
#include <cstdio>
#include <vector>

int main() {
    constexpr int N = 512, D = 8, EPOCHS = 60;
    std::vector<std::array<float, D>> xs(N);
    std::vector<float> ys(N);
    unsigned long long state = 42;
    auto next = [&] {
        state = state * 6364136223846793005ULL + 1442695040888963407ULL;
        return static_cast<double>(state >> 11) / 9007199254740992.0;
    };
    for (int i = 0; i < N; i++) {
        float z = 0.3f;
        for (int j = 0; j < D; j++) {
            xs[i][j] = static_cast<float>(next() * 2.0 - 1.0);
            z += (static_cast<float>(j % 3) - 1.0f + 0.25f * static_cast<float>(j) / D) * xs[i][j];
        }
        ys[i] = static_cast<float>((z > 0.0f) != (next() < 0.1));
    }

    std::vector<float> w(D, 0.0f), gw(D), b(1, 0.0f), gb(1);
    auto loss_and_grad = [&](float *accuracy) {
        double loss = 0;
        int correct = 0;
        std::fill(gw.begin(), gw.end(), 0.0f);
        gb[0] = 0.0f;
        for (int i = 0; i < N; i++) {
            float z = b[0];
            for (int j = 0; j < D; j++) z += w[j] * xs[i][j];
            float p = 1.0f / (1.0f + std::exp(-z));
            loss -= ys[i] > 0.5f ? std::log(p + 1e-12) : std::log(1.0 - p + 1e-12);
            correct += (p > 0.5f) == (ys[i] > 0.5f);
            float d = (p - ys[i]) / N;
            for (int j = 0; j < D; j++) gw[j] += d * xs[i][j];
            gb[0] += d;
        }
        if (accuracy) *accuracy = static_cast<float>(correct) / N;
        return loss / N;
    };

    try {
        samopt::Config config;
        config.rho = 0.05;
        config.base = SAM_BASE_SGD;
        config.lr = 0.5;
        config.momentum = 0.9;
        config.weight_decay = 1e-4;
        samopt::Optimizer sam(config);
        sam.register_host(w, gw);
        uint32_t bias = sam.register_host(b, gb);
        sam.set_group(bias, sam.add_group(1.0, 0.0));  // no decay on the bias
        double loss = 0;
        float accuracy = 0;
        for (int epoch = 0; epoch < EPOCHS; epoch++) {
            sam.set_lr(0.25 * (1.0 + std::cos(M_PI * epoch / EPOCHS)));
            loss = loss_and_grad(&accuracy);
            sam.first_step();
            loss_and_grad(nullptr);
            sam.second_step();
        }
        std::printf("samopt %s: loss %.4f, train accuracy %.3f after %d SAM steps\n", samopt::version(), loss,
                    accuracy, static_cast<int>(sam.step_count()));
        if (!(accuracy > 0.8f)) return 1;
        std::printf("ok\n");
        return 0;
    } catch (const samopt::Error &e) {
        std::fprintf(stderr, "samopt error (%s): %s\n", e.status_string(), e.what());
        return 1;
    }
}
