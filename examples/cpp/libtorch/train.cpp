// A LibTorch training loop with samopt: an MLP with BatchNorm on generated data, its parameters'
// data_ptr and gradients' data_ptr registered with the plugin, trained with SAM.
//
// Three modes, each checked against a plain-LibTorch implementation of the reference SAM (sam.py:
// one global norm over the parameters' gradient norms, e = rho * g / (norm + 1e-12), the old
// weights copied back) over 60 steps from the same initialisation and batches:
//   host:  samopt perturbs and restores; the host's torch::optim::SGD steps (as sam.py does);
//   fused: samopt's built-in SGD (same hyper-parameters) steps, fused with its restore;
//   host, zero_grad(): as host, but every step starts with zero_grad() at its default
//          (set_to_none = true), so LibTorch frees the gradients and the next backward allocates
//          new ones; samopt follows with sam_rebind_host before the first step, keeping its state.
// It prints the largest relative difference of the weights (max |a - b| / max |b| per tensor) and
// fails above 1e-5.
//
// It also shows two things users ask about:
//   - BatchNorm's running statistics must not be updated by the second forward pass (at w + e):
//     its momentum is set to 0 for that pass, and the example checks the statistics afterwards;
//   - --ascent-fraction 0.25 computes the first (ascent) gradient on a quarter of the batch
//     (Bahri et al. 2021), cutting SAM's extra cost.
//
// Build and run: bash scripts/libtorch-example.sh [--ascent-fraction F] [--steps N]
#include <torch/torch.h>

#include <samopt.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

struct NetImpl : torch::nn::Module {
    torch::nn::Linear fc1{nullptr}, fc2{nullptr};
    torch::nn::BatchNorm1d bn{nullptr};
    NetImpl() {
        fc1 = register_module("fc1", torch::nn::Linear(20, 64));
        bn = register_module("bn", torch::nn::BatchNorm1d(64));
        fc2 = register_module("fc2", torch::nn::Linear(64, 4));
    }
    torch::Tensor forward(const torch::Tensor &x) { return fc2(torch::relu(bn(fc1(x)))); }
};
TORCH_MODULE(Net);

constexpr double kRho = 0.05, kLr = 0.05, kMomentum = 0.9;

// The second forward pass, at w + e, must leave BatchNorm's running statistics alone.
static void set_bn_momentum(Net &net, double momentum) { net->bn->options.momentum(momentum); }

// Every parameter gets a gradient tensor now, zeroed in place from then on (zero_grad(false)):
// samopt holds its address, so it must never be replaced.
static void allocate_grads(Net &net) {
    for (auto &p : net->parameters()) p.mutable_grad() = torch::zeros_like(p);
}

static double largest_relative_difference(Net &a, Net &b) {
    double worst = 0;
    auto pa = a->parameters(), pb = b->parameters();
    for (size_t i = 0; i < pa.size(); i++) {
        double scale = pb[i].abs().max().item<double>();
        double diff = (pa[i] - pb[i]).abs().max().item<double>();
        worst = std::fmax(worst, diff / std::fmax(scale, 1e-12));
    }
    return worst;
}

struct Batch {
    torch::Tensor x, y;
};

// A fixed teacher labels Gaussian inputs into 4 classes; the same batches feed both models.
static std::vector<Batch> make_batches(int count, int size) {
    torch::manual_seed(1);
    auto teacher = torch::randn({20, 4});
    std::vector<Batch> batches;
    for (int i = 0; i < count; i++) {
        auto x = torch::randn({size, 20});
        batches.push_back({x, x.matmul(teacher).argmax(1)});
    }
    return batches;
}

// The reference SAM step in plain LibTorch, as sam.py does it.
static void reference_step(Net &net, torch::optim::SGD &sgd, const Batch &ascent, const Batch &full) {
    sgd.zero_grad(false);
    torch::nn::functional::cross_entropy(net->forward(ascent.x), ascent.y).backward();
    std::vector<torch::Tensor> old;
    {
        torch::NoGradGuard guard;
        std::vector<torch::Tensor> norms;
        for (auto &p : net->parameters()) norms.push_back(p.grad().norm(2));
        auto grad_norm = torch::stack(norms).norm(2);
        auto scale = kRho / (grad_norm + 1e-12);
        for (auto &p : net->parameters()) {
            old.push_back(p.detach().clone());
            p.add_(p.grad() * scale);
        }
    }
    sgd.zero_grad(false);
    set_bn_momentum(net, 0.0);
    torch::nn::functional::cross_entropy(net->forward(full.x), full.y).backward();
    set_bn_momentum(net, 0.1);
    {
        torch::NoGradGuard guard;
        auto params = net->parameters();
        for (size_t i = 0; i < params.size(); i++) params[i].copy_(old[i]);
    }
    sgd.step();
}

static bool run(bool fused, bool set_to_none, double ascent_fraction, int steps) {
    const auto batches = make_batches(steps, 64);
    torch::manual_seed(2);
    Net plugin_net, reference_net;
    {
        // The same initialisation for both: parameters and BatchNorm's buffers.
        torch::NoGradGuard guard;
        auto pa = plugin_net->parameters(), pb = reference_net->parameters();
        for (size_t i = 0; i < pa.size(); i++) pb[i].copy_(pa[i]);
        auto ba = plugin_net->buffers(), bb = reference_net->buffers();
        for (size_t i = 0; i < ba.size(); i++) bb[i].copy_(ba[i]);
    }
    allocate_grads(plugin_net);
    allocate_grads(reference_net);
    torch::optim::SGD host_sgd(plugin_net->parameters(), torch::optim::SGDOptions(kLr).momentum(kMomentum));
    torch::optim::SGD reference_sgd(reference_net->parameters(), torch::optim::SGDOptions(kLr).momentum(kMomentum));

    samopt::Config config;
    config.rho = kRho;
    config.backend = SAM_BACKEND_CPU;
    if (fused) {
        config.base = SAM_BASE_SGD;
        config.lr = kLr;
        config.momentum = kMomentum;
    }
    samopt::Optimizer sam(config);
    std::vector<float *> registered_grads;  // where samopt last saw each gradient
    for (auto &p : plugin_net->parameters()) {
        sam.register_host(p.data_ptr<float>(), p.grad().data_ptr<float>(), static_cast<size_t>(p.numel()));
        registered_grads.push_back(p.grad().data_ptr<float>());
    }

    double worst = 0;
    int moved = 0;  // steps at which a gradient's address changed
    for (int step = 0; step < steps; step++) {
        const Batch &full = batches[step];
        const int64_t n = std::max<int64_t>(2, static_cast<int64_t>(ascent_fraction * full.x.size(0)));
        const Batch ascent{full.x.slice(0, 0, n), full.y.slice(0, 0, n)};

        torch::Tensor expected_mean;
        if (step == 0) {
            // One update of the running mean by the ascent pass's batch statistics, at w.
            torch::NoGradGuard guard;
            auto batch_mean = plugin_net->fc1->forward(ascent.x).mean(0);
            expected_mean = 0.9 * plugin_net->bn->running_mean + 0.1 * batch_mean;
        }
        if (set_to_none) {
            // PyTorch's default: the gradients are freed, and this backward allocates new ones.
            host_sgd.zero_grad();
            torch::nn::functional::cross_entropy(plugin_net->forward(ascent.x), ascent.y).backward();
            // Re-point samopt at wherever the gradients live now, all tensors in one call: the
            // caching allocator may hand one tensor the address another one had (no data moves).
            std::vector<uint32_t> ids;
            std::vector<void *> params, grads;
            bool any = false;
            for (auto &p : plugin_net->parameters()) {
                float *grad = p.grad().data_ptr<float>();
                any = any || grad != registered_grads[ids.size()];
                registered_grads[ids.size()] = grad;
                ids.push_back(static_cast<uint32_t>(ids.size()));
                params.push_back(p.data_ptr<float>());
                grads.push_back(grad);
            }
            sam.rebind_hosts(ids, params, grads);
            moved += any;
        } else {
            host_sgd.zero_grad(false);
            torch::nn::functional::cross_entropy(plugin_net->forward(ascent.x), ascent.y).backward();
        }
        sam.first_step();  // w -> w + e(w), in the tensors' own storage
        host_sgd.zero_grad(false);
        set_bn_momentum(plugin_net, 0.0);
        auto loss = torch::nn::functional::cross_entropy(plugin_net->forward(full.x), full.y);
        loss.backward();
        set_bn_momentum(plugin_net, 0.1);
        sam.second_step();  // back to w (and, fused, the SGD update)
        if (!fused) host_sgd.step();

        if (step == 0) {
            // The running mean moved once, by the first (ascent) pass only.
            double off = (plugin_net->bn->running_mean - expected_mean).abs().max().item<double>();
            std::printf("  BatchNorm running mean after step 1 matches one update (by the ascent pass only): %s (%.2e)\n",
                        off < 1e-5 ? "yes" : "NO", off);
            if (off >= 1e-5) return false;
        }
        reference_step(reference_net, reference_sgd, ascent, full);
        worst = std::fmax(worst, largest_relative_difference(plugin_net, reference_net));
        if (step % 20 == 0 || step == steps - 1)
            std::printf("  step %3d  loss %.4f  largest relative difference so far %.2e\n", step + 1,
                        loss.item<double>(), worst);
    }
    if (set_to_none)
        std::printf("  zero_grad() freed the gradients: new addresses at %d of %d steps, followed by sam_rebind_hosts\n",
                    moved, steps);
    std::printf("%s mode, ascent on %.0f%% of each batch, %d steps: largest relative difference %.3e (limit 1e-5)\n",
                fused ? "fused (samopt's SGD)" : set_to_none ? "host (torch::optim::SGD), zero_grad()" : "host (torch::optim::SGD)",
                100 * ascent_fraction, steps, worst);
    return worst < 1e-5;
}

int main(int argc, char **argv) {
    double ascent_fraction = 1.0;
    int steps = 60;
    for (int i = 1; i < argc; i++) {
        if (!std::strcmp(argv[i], "--ascent-fraction") && i + 1 < argc) {
            ascent_fraction = std::atof(argv[++i]);
        } else if (!std::strcmp(argv[i], "--steps") && i + 1 < argc) {
            steps = std::atoi(argv[++i]);
        } else {
            std::fprintf(stderr, "usage: %s [--ascent-fraction F in (0, 1]] [--steps N >= 50]\n", argv[0]);
            return 2;
        }
    }
    if (!(ascent_fraction > 0 && ascent_fraction <= 1) || steps < 1) {
        std::fprintf(stderr, "--ascent-fraction must be in (0, 1] and --steps >= 1\n");
        return 2;
    }
    torch::set_num_threads(1);  // deterministic reductions, the same in both models
    std::printf("samopt %s with LibTorch %s\n", samopt::version(), TORCH_VERSION);
    bool ok = true;
    ok = run(false, false, ascent_fraction, steps) && ok;
    ok = run(true, false, ascent_fraction, steps) && ok;
    ok = run(false, true, ascent_fraction, steps) && ok;
    std::printf(ok ? "ok\n" : "FAILED\n");
    return ok ? 0 : 1;
}
