// A LibTorch training loop with samopt through samopt_torch.hpp: an MLP with BatchNorm on generated
// data, trained with samopt::SAM over model->parameters() (samopt perturbs and restores the tensors
// in place, in their own storage).
//
// Three ways of using the class, each checked against a plain-LibTorch implementation of the
// reference SAM (sam.py: one global norm over the parameters' gradient norms,
// e = rho * g / (norm + 1e-12), the old weights copied back, torch::optim::SGD) over 60 steps from
// the same initialisation and batches, with a StepLR schedule on both:
//   closure:  sam.step(closure), samopt's fused SGD (same hyper-parameters), sam.zero_grad() at
//             its default (set_to_none = true): LibTorch frees the gradients and the next backward
//             allocates new ones, which the class follows (sam_rebind_hosts);
//   sam.py:   first_step()/second_step() by hand with a torch::optim::SGD given to the class as its
//             base (stepped after the restore), the model's own zero_grad() between the steps;
//   fused:    first_step()/second_step() by hand, samopt's fused SGD, gradients zeroed in place.
// It prints the largest relative difference of the weights (max |a - b| / max |b| per tensor) and
// fails above 1e-5. BatchNorm's running statistics are updated once per step (by the pass at w):
// sam.keep_running_stats(*model); the example checks them after the first step.
//
// Then the class's other promises: f16 and bf16 tensors (the perturbation against a float64
// reference, the restore bit for bit), a closure that throws at w + e(w) (weights restored, no
// update), tensors not in host memory refused with the reason, and save/load.
//
// --ascent-fraction 0.25 computes the first (ascent) gradient on a quarter of the batch
// (Bahri et al. 2021), cutting SAM's extra cost.
//
// Build and run: bash scripts/libtorch-example.sh [--ascent-fraction F] [--steps N]
#include <torch/torch.h>

#include <samopt_torch.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>
#include <stdexcept>
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

// The reference's second forward pass, at w + e, must leave BatchNorm's running statistics alone.
static void set_bn_momentum(Net &net, double momentum) { net->bn->options.momentum(momentum); }

// The reference allocates every gradient once and zeroes it in place (zero_grad(false)).
static void allocate_grads(Net &net) {
    for (auto &p : net->parameters()) p.mutable_grad() = torch::zeros_like(p);
}

// The same weights and BatchNorm buffers in `to` as in `from`.
static void copy_model(Net &from, Net &to) {
    torch::NoGradGuard guard;
    auto pa = from->parameters(), pb = to->parameters();
    for (size_t i = 0; i < pa.size(); i++) pb[i].copy_(pa[i]);
    auto ba = from->buffers(), bb = to->buffers();
    for (size_t i = 0; i < ba.size(); i++) bb[i].copy_(ba[i]);
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

enum class Mode { Closure, SamPy, Fused };

static const char *mode_name(Mode mode) {
    switch (mode) {
        case Mode::Closure: return "closure (sam.step, fused SGD, zero_grad() frees the gradients)";
        case Mode::SamPy: return "sam.py (first/second_step, torch::optim::SGD base)";
        default: return "fused (first/second_step, samopt's SGD)";
    }
}

static bool run(Mode mode, double ascent_fraction, int steps) {
    const auto batches = make_batches(steps, 64);
    torch::manual_seed(2);
    Net plugin_net, reference_net;
    copy_model(plugin_net, reference_net);  // the same initialisation for both
    allocate_grads(reference_net);
    torch::optim::SGD reference_sgd(reference_net->parameters(), torch::optim::SGDOptions(kLr).momentum(kMomentum));
    torch::optim::StepLR reference_schedule(reference_sgd, 20, 0.5);

    // The optimizer under test: samopt's fused SGD, or torch::optim::SGD stepped by the class.
    torch::optim::SGD host_sgd(plugin_net->parameters(), torch::optim::SGDOptions(kLr).momentum(kMomentum));
    std::unique_ptr<samopt::SAM> sam;
    if (mode == Mode::SamPy) {
        sam = std::make_unique<samopt::SAM>(plugin_net->parameters(), host_sgd, samopt::SAMOptions(kRho));
    } else {
        sam = std::make_unique<samopt::SAM>(
            plugin_net->parameters(),
            samopt::SAMOptions(kRho).base(samopt::Base::SGD).lr(kLr).momentum(kMomentum));
    }
    sam->keep_running_stats(*plugin_net);
    // LibTorch's scheduler on whichever optimizer owns the learning rate.
    torch::optim::StepLR schedule(mode == Mode::SamPy ? static_cast<torch::optim::Optimizer &>(host_sgd) : *sam, 20, 0.5);

    double worst = 0;
    int moved = 0;  // steps at which some gradient's address changed
    std::vector<void *> last_grads;
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
        torch::Tensor loss;
        if (mode == Mode::Closure) {
            // The closure runs twice: at w on the ascent batch, at w + e(w) on the full batch.
            auto closure = [&] {
                sam->zero_grad();
                const Batch &b = sam->engine().perturbed() ? full : ascent;
                auto l = torch::nn::functional::cross_entropy(plugin_net->forward(b.x), b.y);
                l.backward();
                return l;
            };
            loss = sam->step(closure);  // the loss at w
        } else {
            plugin_net->zero_grad(mode == Mode::SamPy);  // sam.py mode: LibTorch's default, set_to_none
            torch::nn::functional::cross_entropy(plugin_net->forward(ascent.x), ascent.y).backward();
            sam->first_step();  // w -> w + e(w), in the tensors' own storage
            plugin_net->zero_grad(mode == Mode::SamPy);
            loss = torch::nn::functional::cross_entropy(plugin_net->forward(full.x), full.y);
            loss.backward();
            sam->second_step();  // back to w, then the SGD update (samopt's, or host_sgd.step())
        }
        schedule.step();
        std::vector<void *> grads;
        for (auto &p : plugin_net->parameters()) grads.push_back(p.grad().defined() ? p.grad().data_ptr() : nullptr);
        moved += !last_grads.empty() && grads != last_grads;
        last_grads = grads;

        if (step == 0) {
            // The running mean moved once, by the first (ascent) pass only.
            double off = (plugin_net->bn->running_mean - expected_mean).abs().max().item<double>();
            std::printf("  BatchNorm running mean after step 1 matches one update (by the ascent pass only): %s (%.2e)\n",
                        off < 1e-5 ? "yes" : "NO", off);
            if (off >= 1e-5) return false;
        }
        reference_step(reference_net, reference_sgd, ascent, full);
        reference_schedule.step();
        worst = std::fmax(worst, largest_relative_difference(plugin_net, reference_net));
        if (step % 20 == 0 || step == steps - 1)
            std::printf("  step %3d  loss %.4f  lr %.4f  largest relative difference so far %.2e\n", step + 1,
                        loss.item<double>(), reference_sgd.param_groups()[0].options().get_lr(), worst);
    }
    if (mode != Mode::Fused)
        std::printf("  gradients at new addresses after %d of %d steps (LibTorch reallocated them), followed\n", moved,
                    steps);
    std::printf("%s, ascent on %.0f%% of each batch, %d steps: largest relative difference %.3e (limit 1e-5)\n",
                mode_name(mode), 100 * ascent_fraction, steps, worst);
    return worst < 1e-5;
}

// f16 and bf16 parameters: the perturbation against float64 (within one unit in the last place of
// the dtype), the restore bit for bit.
static bool check_dtype(torch::ScalarType dtype, const char *name) {
    torch::manual_seed(3);
    auto w = torch::randn({257}).to(dtype).requires_grad_(true);
    auto b = torch::randn({3, 5}).to(dtype).requires_grad_(true);
    samopt::SAM sam({w, b}, samopt::SAMOptions(0.1));
    (w.to(torch::kFloat).sin().sum() + b.to(torch::kFloat).square().sum()).backward();
    auto w0 = w.detach().clone(), b0 = b.detach().clone();
    auto gw = w.grad().to(torch::kFloat64), gb = b.grad().to(torch::kFloat64);
    double norm = std::sqrt(gw.square().sum().item<double>() + gb.square().sum().item<double>());
    sam.first_step();
    double ulp = dtype == torch::kHalf ? std::ldexp(1.0, -10) : std::ldexp(1.0, -7);
    auto off = [&](const torch::Tensor &now, const torch::Tensor &before, const torch::Tensor &g) {
        auto want = before.to(torch::kFloat64) + 0.1 * g / (norm + 1e-12);
        return ((now.detach().to(torch::kFloat64) - want).abs() / (want.abs() * ulp).clamp_min(1e-30)).max().item<double>();
    };
    double worst = std::fmax(off(w, w0, gw), off(b, b0, gb));
    sam.second_step();
    bool exact = torch::equal(w.detach(), w0) && torch::equal(b.detach(), b0);
    std::printf("  %s tensors: perturbation within %.2f ulp of float64, restore bit for bit: %s\n", name, worst,
                exact ? "yes" : "NO");
    return worst <= 1.0 && exact;
}

static bool check_promises() {
    bool ok = check_dtype(torch::kHalf, "float16") && check_dtype(torch::kBFloat16, "bfloat16");

    // A closure that throws at w + e(w): weights restored exactly, no update, no step counted.
    {
        torch::manual_seed(4);
        Net net;
        samopt::SAM sam(net->parameters(), samopt::SAMOptions(kRho).base(samopt::Base::SGD).lr(kLr).momentum(kMomentum));
        auto x = torch::randn({16, 20});
        auto y = torch::randint(0, 4, {16});
        std::vector<torch::Tensor> before;
        for (auto &p : net->parameters()) before.push_back(p.detach().clone());
        bool thrown = false;
        try {
            sam.step([&] {
                if (sam.engine().perturbed()) throw std::runtime_error("out of memory at w + e(w)");
                sam.zero_grad();
                auto l = torch::nn::functional::cross_entropy(net->forward(x), y);
                l.backward();
                return l;
            });
        } catch (const std::runtime_error &) {
            thrown = true;
        }
        bool same = true;
        auto params = net->parameters();
        for (size_t i = 0; i < params.size(); i++) same = same && torch::equal(params[i].detach(), before[i]);
        bool clean = thrown && same && !sam.engine().perturbed() && sam.engine().step_count() == 0;
        std::printf("  a closure throwing at w + e(w): exception passed on, weights restored exactly, no update: %s\n",
                    clean ? "yes" : "NO");
        ok = ok && clean;
    }

    // Tensors outside host memory (here the meta device; CUDA takes the same path) are refused.
    {
        auto meta = torch::empty({4}, torch::TensorOptions().device(torch::kMeta).requires_grad(true));
        std::string message;
        try {
            samopt::SAM sam({meta});
        } catch (const std::invalid_argument &e) {
            message = e.what();
        }
        bool refused = message.find("not in host memory") != std::string::npos &&
                       message.find("CUDA") != std::string::npos && message.find("parameter 0") != std::string::npos;
        std::printf("  a tensor outside host memory refused with the reason: %s\n", refused ? "yes" : "NO");
        if (!refused) std::printf("    message: %s\n", message.c_str());
        ok = ok && refused;
    }

    // A parameter whose dtype changes after the first step (model->to(torch::kHalf)) is refused:
    // samopt's buffers keep the element size they were registered with.
    {
        torch::manual_seed(7);
        auto w = torch::randn({64}).requires_grad_(true);
        samopt::SAM sam({w}, samopt::SAMOptions(kRho));
        auto closure = [&] {
            sam.zero_grad();
            auto l = w.to(torch::kFloat).square().sum();
            l.backward();
            return l;
        };
        sam.step(closure);
        {
            torch::NoGradGuard guard;
            w.set_data(w.to(torch::kHalf));
        }
        auto before = w.detach().clone();
        std::string message;
        try {
            sam.step(closure);
        } catch (const std::invalid_argument &e) {
            message = e.what();
        }
        bool refused = message.find("make a new SAM") != std::string::npos && torch::equal(w.detach(), before) &&
                       !sam.engine().perturbed();
        std::printf("  a parameter whose dtype changed after the first step refused, weights untouched: %s\n",
                    refused ? "yes" : "NO");
        if (!refused) std::printf("    message: %s\n", message.c_str());
        ok = ok && refused;
    }

    // Parameter groups with their own lr and weight decay, group 0 warming up from lr 0 (so the
    // ratio between the groups changes for five steps), against torch::optim::SGD's groups.
    {
        const auto batches = make_batches(20, 64);
        torch::manual_seed(6);
        Net a, b;
        copy_model(a, b);
        auto split = [](Net &net) {
            std::vector<torch::Tensor> first = net->fc1->parameters(), rest = net->bn->parameters();
            for (auto &p : net->fc2->parameters()) rest.push_back(p);
            return std::make_pair(first, rest);
        };
        auto [a1, a2] = split(a);
        auto [b1, b2] = split(b);
        auto defaults = samopt::SAMOptions(kRho).base(samopt::Base::SGD).lr(0.0).momentum(kMomentum);
        std::vector<torch::optim::OptimizerParamGroup> groups;
        groups.emplace_back(a1);
        groups.emplace_back(a2, std::make_unique<samopt::SAMOptions>(
                                    samopt::SAMOptions(defaults).lr(0.02).weight_decay(1e-3)));
        samopt::SAM sam(groups, defaults);
        sam.keep_running_stats(*a);
        std::vector<torch::optim::OptimizerParamGroup> ref_groups;
        ref_groups.emplace_back(b1);
        ref_groups.emplace_back(b2, std::make_unique<torch::optim::SGDOptions>(
                                        torch::optim::SGDOptions(0.02).momentum(kMomentum).weight_decay(1e-3)));
        torch::optim::SGD reference(ref_groups, torch::optim::SGDOptions(0.0).momentum(kMomentum));
        allocate_grads(b);
        double worst = 0;
        for (int step = 0; step < 20; step++) {
            const double warm = std::min(0.05, 0.01 * step);  // group 0: 0, 0.01, ..., 0.05
            sam.param_groups()[0].options().set_lr(warm);
            reference.param_groups()[0].options().set_lr(warm);
            const Batch &batch = batches[step];
            sam.step([&] {
                sam.zero_grad();
                auto l = torch::nn::functional::cross_entropy(a->forward(batch.x), batch.y);
                l.backward();
                return l;
            });
            reference_step(b, reference, batch, batch);
            worst = std::fmax(worst, largest_relative_difference(a, b));
        }
        bool close = worst < 1e-5;
        std::printf("  two parameter groups (lr warming up from 0 in one, weight decay in the other) against "
                    "torch::optim::SGD's groups, 20 steps: largest relative difference %.2e: %s\n",
                    worst, close ? "yes" : "NO");
        ok = ok && close;
    }

    // save/load: a restored optimizer continues exactly as the original (momentum and lr).
    {
        torch::manual_seed(5);
        Net a, b;
        copy_model(a, b);
        auto x = torch::randn({16, 20});
        auto y = torch::randint(0, 4, {16});
        auto options = samopt::SAMOptions(kRho).base(samopt::Base::SGD).lr(kLr).momentum(kMomentum);
        samopt::SAM sa(a->parameters(), options), sb(b->parameters(), options);
        {
            // A checkpoint from before the first step loads too (the tensors are registered for it).
            torch::serialize::OutputArchive early;
            sb.save(early);
            std::ostringstream bytes;
            early.save_to(bytes);
            std::istringstream in(bytes.str());
            torch::serialize::InputArchive back;
            back.load_from(in);
            sb.load(back);
        }
        auto closure = [&](Net &net, samopt::SAM &sam) {
            return [&] {
                sam.zero_grad();
                auto l = torch::nn::functional::cross_entropy(net->forward(x), y);
                l.backward();
                return l;
            };
        };
        for (int i = 0; i < 3; i++) sa.step(closure(a, sa));
        sa.param_groups()[0].options().set_lr(0.02);
        copy_model(a, b);
        std::ostringstream bytes;
        {
            torch::serialize::OutputArchive archive;
            sa.save(archive);
            archive.save_to(bytes);
        }
        std::istringstream in(bytes.str());
        torch::serialize::InputArchive archive;
        archive.load_from(in);
        sb.load(archive);
        for (int i = 0; i < 3; i++) {
            sa.step(closure(a, sa));
            sb.step(closure(b, sb));
        }
        bool equal = sb.param_groups()[0].options().get_lr() == 0.02;
        auto pa = a->parameters(), pb = b->parameters();
        for (size_t i = 0; i < pa.size(); i++) equal = equal && torch::equal(pa[i], pb[i]);
        std::printf("  save/load: the loaded optimizer continues bit for bit (momentum, lr): %s\n", equal ? "yes" : "NO");
        ok = ok && equal;
    }
    return ok;
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
    ok = run(Mode::Closure, ascent_fraction, steps) && ok;
    ok = run(Mode::SamPy, ascent_fraction, steps) && ok;
    ok = run(Mode::Fused, ascent_fraction, steps) && ok;
    std::printf("samopt::SAM's other promises:\n");
    ok = check_promises() && ok;
    std::printf(ok ? "ok\n" : "FAILED\n");
    return ok ? 0 : 1;
}
