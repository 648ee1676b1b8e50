// The optimizer's share of a SAM step with LibTorch: samopt::SAM (samopt_torch.hpp, samopt's fused
// CPU engine) beside plain-LibTorch reference SAM written with ATen's multi-tensor (_foreach_*) ops,
// on the parameter layouts of real models (benches/param_layouts.json: ResNet-50, GPT-2 small),
// with and without an SGD momentum base.
//
// One step of each, without the forward/backward passes (which are the same for both, the
// gradients stay fixed):
//   reference: old <- params (_foreach_copy_), norm = ||_foreach_norm(grads)||, params += rho/norm *
//              grads (_foreach_add_), [second forward/backward], params <- old (_foreach_copy_, the
//              exact restore of sam.py), then SGD: bufs = momentum * bufs + grads (_foreach_mul_,
//              _foreach_add_), params -= lr * bufs (or params -= lr * grads without momentum);
//   samopt:    sam.first_step(), [second forward/backward], sam.second_step() (restore and SGD in
//              one pass).
// Same thread count for both (at::set_num_threads and SAMOptions::num_threads), timed in
// alternation in one run (this machine is shared and noisy), the median of each. After the timed
// steps both hold the same weights (checked: largest relative difference below 1e-5), so they did
// the same work.
//
//   bash scripts/libtorch-bench.sh [--threads N] [--reps R] [--layouts resnet50,gpt2_small]
#include <torch/torch.h>

#include <samopt_torch.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

constexpr double kRho = 0.05, kLr = 1e-3;

// The element counts of one model in param_layouts.json: the array after "name":.
static std::vector<int64_t> read_layout(const std::string &path, const std::string &name) {
    std::ifstream file(path);
    if (!file) throw std::runtime_error("cannot read " + path);
    std::stringstream text;
    text << file.rdbuf();
    const std::string s = text.str();
    size_t at = s.find("\"" + name + "\"");
    if (at == std::string::npos) throw std::runtime_error(path + " has no layout " + name);
    at = s.find('[', at);
    const size_t end = s.find(']', at);
    std::vector<int64_t> sizes;
    std::stringstream numbers(s.substr(at + 1, end - at - 1));
    for (std::string n; std::getline(numbers, n, ',');) sizes.push_back(std::stoll(n));
    return sizes;
}

struct Model {
    std::vector<torch::Tensor> params, grads;
};

// Parameters and (fixed) gradients of the given sizes; the same values for every call with the seed.
static Model make_model(const std::vector<int64_t> &sizes, uint64_t seed) {
    torch::manual_seed(seed);
    Model m;
    for (int64_t n : sizes) {
        auto p = torch::randn({n}).requires_grad_(true);
        p.mutable_grad() = torch::randn({n}) * 1e-2;
        m.params.push_back(p);
        m.grads.push_back(p.grad());
    }
    return m;
}

// sam.py's SAM with an SGD base, in ATen's multi-tensor ops.
struct Reference {
    Model &m;
    double momentum;
    std::vector<torch::Tensor> old, bufs;
    std::vector<torch::Tensor> params;  // detached views: in-place updates outside autograd
    Reference(Model &model, double momentum_) : m(model), momentum(momentum_) {
        for (auto &p : m.params) {
            params.push_back(p.detach());
            old.push_back(torch::empty_like(p));
            if (momentum > 0) bufs.push_back(torch::zeros_like(p));
        }
    }
    void step(bool first) {
        at::_foreach_copy_(old, params);
        auto norms = at::_foreach_norm(m.grads, 2);
        double norm = torch::stack(norms).norm(2).item<double>();
        at::_foreach_add_(params, m.grads, kRho / (norm + 1e-12));
        // (the second forward/backward at w + e(w))
        at::_foreach_copy_(params, old);
        if (momentum > 0) {
            if (first) {
                at::_foreach_copy_(bufs, m.grads);  // PyTorch: the first buffer is the gradient
            } else {
                at::_foreach_mul_(bufs, momentum);
                at::_foreach_add_(bufs, m.grads);
            }
            at::_foreach_add_(params, bufs, -kLr);
        } else {
            at::_foreach_add_(params, m.grads, -kLr);
        }
    }
};

static double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

static double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

int main(int argc, char **argv) {
    int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    int reps = 7;
    std::string layouts = "resnet50,gpt2_small", path = "benches/param_layouts.json";
    for (int i = 1; i < argc; i++) {
        if (!std::strcmp(argv[i], "--threads") && i + 1 < argc) {
            threads = std::atoi(argv[++i]);
        } else if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) {
            reps = std::atoi(argv[++i]);
        } else if (!std::strcmp(argv[i], "--layouts") && i + 1 < argc) {
            layouts = argv[++i];
        } else if (!std::strcmp(argv[i], "--layout-file") && i + 1 < argc) {
            path = argv[++i];
        } else {
            std::fprintf(stderr, "usage: %s [--threads N] [--reps R] [--layouts resnet50,gpt2_small] [--layout-file F]\n",
                         argv[0]);
            return 2;
        }
    }
    if (threads < 1 || reps < 1) {
        std::fprintf(stderr, "--threads and --reps must be >= 1\n");
        return 2;
    }
    at::set_num_threads(threads);
    std::printf("samopt %s with LibTorch %s, %d threads each, median of %d alternated steps\n", samopt::version(),
                TORCH_VERSION, threads, reps);
    std::printf("%-11s %8s %9s  %14s  %12s  %7s  %s\n", "layout", "params", "momentum", "_foreach (ms)",
                "samopt (ms)", "ratio", "weights agree");
    bool ok = true;
    std::stringstream names(layouts);
    for (std::string name; std::getline(names, name, ',');) {
        const auto sizes = read_layout(path, name);
        int64_t total = 0;
        for (auto n : sizes) total += n;
        for (double momentum : {0.0, 0.9}) {
            Model a = make_model(sizes, 1), b = make_model(sizes, 1);
            Reference reference(a, momentum);
            samopt::SAM sam(b.params, samopt::SAMOptions(kRho)
                                          .base(samopt::Base::SGD)
                                          .lr(kLr)
                                          .momentum(momentum)
                                          .num_threads(static_cast<uint32_t>(threads)));
            std::vector<double> tr, ts;
            // One untimed step each (first touch of the buffers, samopt's registration), then
            // alternate which goes first.
            for (int r = 0; r <= reps; r++) {
                auto run_reference = [&] {
                    auto t0 = std::chrono::steady_clock::now();
                    reference.step(r == 0);
                    if (r > 0) tr.push_back(seconds_since(t0));
                };
                auto run_samopt = [&] {
                    auto t0 = std::chrono::steady_clock::now();
                    sam.first_step();
                    sam.second_step();
                    if (r > 0) ts.push_back(seconds_since(t0));
                };
                if (r % 2) {
                    run_reference();
                    run_samopt();
                } else {
                    run_samopt();
                    run_reference();
                }
            }
            double worst = 0;
            for (size_t i = 0; i < a.params.size(); i++) {
                double scale = a.params[i].abs().max().item<double>();
                double diff = (a.params[i] - b.params[i]).abs().max().item<double>();
                worst = std::max(worst, diff / std::max(scale, 1e-12));
            }
            double ref_ms = 1e3 * median(tr), sam_ms = 1e3 * median(ts);
            std::printf("%-11s %7.1fM %9.1f  %14.1f  %12.1f  %6.2fx  %s (%.1e)\n", name.c_str(), total / 1e6, momentum,
                        ref_ms, sam_ms, ref_ms / sam_ms, worst < 1e-5 ? "yes" : "NO", worst);
            ok = ok && worst < 1e-5;
        }
    }
    std::printf("ratio: the _foreach reference's time over samopt's (above 1: samopt is faster)\n");
    return ok ? 0 : 1;
}
