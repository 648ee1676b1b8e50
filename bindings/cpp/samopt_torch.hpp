// samopt_torch.hpp: SAM for LibTorch models, header-only, as a torch::optim::Optimizer over the
// model's own tensors (samopt.hpp and samopt.h underneath; link libsamopt and LibTorch).
//
//   #include <samopt_torch.hpp>
//   samopt::SAM sam(model->parameters(),
//                   samopt::SAMOptions(/*rho=*/0.05).base(samopt::Base::SGD).lr(0.1).momentum(0.9));
//   sam.keep_running_stats(*model);               // BatchNorm statistics: one update per step
//
//   // The closure form, like torch::optim::LBFGS: the closure runs at w, then at w + e(w).
//   auto loss = sam.step([&] {
//       sam.zero_grad();
//       auto loss = torch::nn::functional::cross_entropy(model->forward(x), y);
//       loss.backward();
//       return loss;
//   });
//
//   // Or the two steps by hand (sam.py's first_step/second_step):
//   loss_fn(model->forward(x), y).backward();
//   if (sam.first_step() == samopt::First::Perturbed) {   // w -> w + e(w)
//       sam.zero_grad();
//       loss_fn(model->forward(x), y).backward();       // the gradient at w + e(w)
//   }
//   sam.second_step();                                  // w restored, then the base update
//
// samopt perturbs and restores the parameters in place, in their own storage (it registers each
// tensor's data_ptr and its gradient's with the C API). The base update is samopt's fused SGD or
// AdamW (Base::SGD, Base::AdamW: PyTorch's semantics, in the same pass as the restore), or any
// torch::optim optimizer given to the constructor (stepped after the restore, as sam.py does), or
// none (Base::None: call your own optimizer after second_step()).
//
// Tensors: f32, f16 and bf16 CPU tensors, dense (contiguous or any non-overlapping dense layout;
// the gradient must have its parameter's strides, as autograd gives it). CUDA (and every non-CPU)
// tensor is refused at construction with the reason. LibTorch may free and reallocate gradients
// (zero_grad() with set_to_none = true, the default): first_step() re-points samopt at wherever
// they are now (sam_rebind_hosts; no data moves), and second_step() reads the gradient wherever
// the second backward left it. Errors throw samopt::Error (from samopt) or std::invalid_argument
// (from this class), naming the parameter; a throwing call leaves the weights as they were.
#ifndef SAMOPT_TORCH_HPP
#define SAMOPT_TORCH_HPP

#include <samopt.hpp>

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace samopt {

/// The base optimizer samopt runs fused with the restore (SamConfig::base).
enum class Base : uint32_t {
    /// None: second_step() only restores; step your own optimizer after it.
    None = SAM_BASE_NONE,
    /// PyTorch's SGD (lr, momentum, dampening, nesterov, weight_decay).
    SGD = SAM_BASE_SGD,
    /// PyTorch's AdamW (lr, betas, adam_eps, weight_decay).
    AdamW = SAM_BASE_ADAMW,
};

/// The options of samopt::SAM, in torch::optim's style: `SAMOptions(0.05).base(Base::SGD).lr(0.1)`.
/// Each field is the SamConfig field of the same name (samopt.h documents its range and meaning).
/// Parameter groups may differ in lr and weight_decay only.
struct SAMOptions : public torch::optim::OptimizerCloneableOptions<SAMOptions> {
    using betas_t = std::tuple<double, double>;
    explicit SAMOptions(double rho = 0.05) : rho_(rho) {}
    /// Radius of the perturbation ball.
    TORCH_ARG(double, rho);
    /// Added to the gradient norm before dividing by it.
    TORCH_ARG(double, eps) = 1e-12;
    /// ASAM: scale the ascent elementwise by |w| + eta.
    TORCH_ARG(bool, adaptive) = false;
    TORCH_ARG(double, eta) = 0.0;
    /// 2 (the L2 ball) or INFINITY (the sign perturbation).
    TORCH_ARG(double, norm_p) = 2.0;
    TORCH_ARG(Base, base) = Base::None;
    /// Learning rate of the fused base optimizer (a param group's own lr overrides it; LibTorch's
    /// learning-rate schedulers change it through get_lr/set_lr).
    TORCH_ARG(double, lr) = 1e-3;
    TORCH_ARG(double, momentum) = 0.0;
    TORCH_ARG(double, dampening) = 0.0;
    TORCH_ARG(bool, nesterov) = false;
    /// NAN: PyTorch's default for the base (0 for SGD, 1e-2 for AdamW).
    TORCH_ARG(double, weight_decay) = NAN;
    TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
    TORCH_ARG(double, adam_eps) = 1e-8;
    /// Clip the second gradient to this global norm before the base update (0: off).
    TORCH_ARG(double, max_grad_norm) = 0.0;
    /// GSAM's alpha (0: plain SAM).
    TORCH_ARG(double, gsam_alpha) = 0.0;
    /// Which steps are SAM steps (SAM_SCHEDULE_*); the others are single-gradient steps.
    TORCH_ARG(SamSchedule, schedule) = SAM_SCHEDULE_EVERY;
    TORCH_ARG(uint64_t, schedule_k) = 10;
    TORCH_ARG(double, schedule_p) = 0.5;
    TORCH_ARG(uint64_t, schedule_seed) = 0;
    TORCH_ARG(double, looksam_alpha) = 0.7;
    /// f32 master copies of f16/bf16 weights (needs a fused base).
    TORCH_ARG(bool, master_weights) = false;
    /// Perturb along AdamW's preconditioned gradient (Base::AdamW).
    TORCH_ARG(bool, preconditioned) = false;
    /// samopt's CPU worker threads (0: one per core, shared by every optimizer of the process).
    TORCH_ARG(uint32_t, num_threads) = 0;

public:  // TORCH_ARG leaves the access private
    double get_lr() const override { return lr(); }
    void set_lr(const double lr) override { this->lr(lr); }

    /// The SamConfig these options describe (CPU engine: LibTorch's CPU tensors are host memory).
    samopt::Config config() const {
        samopt::Config c;
        c.rho = rho_;
        c.eps = eps_;
        c.adaptive = adaptive_;
        c.eta = eta_;
        c.norm_p = norm_p_;
        c.backend = SAM_BACKEND_CPU;
        c.num_threads = num_threads_;
        c.base = static_cast<SamBase>(base_);
        c.lr = lr_;
        c.momentum = momentum_;
        c.dampening = dampening_;
        c.nesterov = nesterov_;
        c.weight_decay = weight_decay_;
        c.beta1 = std::get<0>(betas_);
        c.beta2 = std::get<1>(betas_);
        c.adam_eps = adam_eps_;
        c.max_grad_norm = max_grad_norm_;
        c.gsam_alpha = gsam_alpha_;
        c.schedule = schedule_;
        c.schedule_k = schedule_k_;
        c.schedule_p = schedule_p_;
        c.schedule_seed = schedule_seed_;
        c.looksam_alpha = looksam_alpha_;
        c.master_weights = master_weights_;
        c.preconditioned = preconditioned_;
        return c;
    }
};

/// Sharpness-Aware Minimization over LibTorch tensors, with samopt's CPU engine doing the
/// gradient norm, the perturbation and the restore (and the fused base update) in place.
class SAM : public torch::optim::Optimizer {
public:
    /// SAM over `params` (e.g. `model->parameters()`; tensors with requires_grad false are left
    /// alone) with `options`; the base update is options.base(). Throws std::invalid_argument for
    /// a tensor samopt cannot take (not on the CPU, another dtype, sparse or overlapping), and
    /// samopt::Error for options samopt refuses.
    SAM(std::vector<torch::Tensor> params, const SAMOptions &options = SAMOptions())
        : SAM(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
              options) {}

    /// SAM over parameter groups: a group without options takes `options`; a group's own options
    /// (a SAMOptions) may differ from the others in lr and weight_decay only. Each group's lr is
    /// read at every step, so LibTorch's schedulers, and schedules of your own per group, work.
    SAM(const std::vector<torch::optim::OptimizerParamGroup> &groups, const SAMOptions &options)
        : torch::optim::Optimizer(groups, std::make_unique<SAMOptions>(options)),
          config_(checked_config(options)),
          sam_(config_) {
        // LibTorch's add_param_group replaces options of a type it does not know with a copy of
        // the defaults: give each group its own back.
        for (size_t g = 0; g < groups.size(); g++)
            if (groups[g].has_options()) param_groups_[g].set_options(groups[g].options().clone());
        check_groups();
        if (groups.size() > 0 && groups[0].has_options()) {
            config_ = checked_config(group_options(0));
            sam_ = samopt::Optimizer(config_);
        }
    }

    /// sam.py's form: `base` (any torch::optim optimizer over the same parameters) steps after
    /// every restore, with the second gradient (options.base() must be Base::None). `base` must
    /// outlive this SAM.
    SAM(std::vector<torch::Tensor> params, torch::optim::Optimizer &base, const SAMOptions &options = SAMOptions())
        : SAM(std::move(params), options) {
        if (options.base() != Base::None)
            throw std::invalid_argument("samopt::SAM: a torch::optim base optimizer and options.base() = " +
                                        std::to_string(static_cast<uint32_t>(options.base())) +
                                        " would both update the weights; use one (options.base(Base::None))");
        external_ = &base;
    }

    /// torch::optim's add_param_group, keeping the group's own SAMOptions (LibTorch would replace
    /// them with the defaults). Before the first step only: samopt's set of tensors is fixed then.
    void add_param_group(const torch::optim::OptimizerParamGroup &group) {
        if (!registered_.empty())
            throw std::invalid_argument("samopt::SAM::add_param_group: after the first step samopt's set of tensors "
                                        "is fixed; add every group before it");
        torch::optim::Optimizer::add_param_group(group);
        if (group.has_options()) param_groups_.back().set_options(group.options().clone());
        try {
            check_groups();
        } catch (...) {
            param_groups_.pop_back();
            throw;
        }
    }

    /// Restores BatchNorm's running statistics (every buffer named running_mean, running_var or
    /// num_batches_tracked in `model`'s modules: BatchNorm1d/2d/3d, InstanceNorm with running
    /// statistics, modules of your own that follow the names) after the forward pass at
    /// w + e(w), so each SAM step updates them once, by the pass at w, as one plain step would.
    /// Call once, before the first step.
    void keep_running_stats(torch::nn::Module &model) {
        stats_.clear();
        for (const auto &b : model.named_buffers(/*recurse=*/true)) {
            const std::string &path = b.key();
            const std::string name = path.substr(path.rfind('.') + 1);  // npos + 1 == 0: the whole key
            if (name == "running_mean" || name == "running_var" || name == "num_batches_tracked")
                stats_.push_back({b.value(), torch::Tensor()});
        }
    }

    /// The ascent: one gradient norm over every parameter's gradient, then w -> w + e(w) in place
    /// (unless the schedule makes this a single-gradient step). Registers the tensors on the first
    /// call (their gradients exist from the first backward on), re-points samopt at gradients
    /// LibTorch reallocated since, and takes each group's lr and weight decay. Throws, changing
    /// nothing, for a parameter without a gradient or with one samopt cannot read, a parameter
    /// whose dtype or size changed since the first step, and gradients holding NaN or infinity.
    samopt::First first_step() {
        torch::NoGradGuard no_grad;
        if (perturbed_)
            throw std::invalid_argument("samopt::SAM::first_step: called twice; call second_step() after the "
                                        "gradient at w + e(w)");
        if (registered_.empty()) {
            register_tensors();
        } else {
            follow_moved_tensors();
        }
        place_groups();
        samopt::First first = sam_.first_step();
        if (first == samopt::First::Perturbed) {
            perturbed_ = true;
            try {
                for (auto &s : stats_) s.saved = s.buffer.clone();
            } catch (...) {
                abort_step();
                throw;
            }
        }
        return first;
    }

    /// The restore (bit for bit), then the base update with the gradient at w + e(w): samopt's fused
    /// SGD/AdamW, or the torch::optim optimizer given to the constructor. The gradient is read
    /// wherever the second backward left it (copied into the buffer samopt holds when LibTorch
    /// reallocated it; zero where it was set to none). Returns Step::Skipped when a non-finite
    /// second gradient made samopt skip the update (weights restored, no state touched). A
    /// second gradient samopt cannot read (another shape or dtype), or a group's lr or weight
    /// decay changed since first_step() to a ratio samopt cannot take then, throws after the
    /// weights were restored exactly and with the update skipped.
    samopt::Step second_step() {
        torch::NoGradGuard no_grad;
        std::string error;
        try {
            for (auto &r : registered_) {
                const torch::Tensor &grad = r.param.grad();
                if (!grad.defined()) {
                    r.grad.zero_();  // no gradient: the loss does not depend on it here
                } else if (grad.data_ptr() != r.grad.data_ptr()) {
                    if (grad.sizes() != r.grad.sizes() || grad.scalar_type() != r.grad.scalar_type() || !grad.is_cpu())
                        throw std::invalid_argument(describe(r) + ": its gradient at w + e(w) is " + shape_of(grad) +
                                                    ", not the parameter's");
                    r.grad.copy_(grad);
                }
            }
            sync_lr();
        } catch (const std::exception &e) {
            error = e.what();
        }
        if (!error.empty()) {
            const bool restored = perturbed_;
            if (perturbed_) abort_step();
            throw std::invalid_argument("samopt::SAM::second_step: " + error +
                                        (restored ? " (the weights were restored exactly, the update skipped)" : ""));
        }
        samopt::Step step = sam_.second_step();
        perturbed_ = false;
        restore_stats();
        if (external_ != nullptr && step == samopt::Step::Done) external_->step();
        return step;
    }

    /// One SAM step with a closure that zeroes the gradients, computes the loss, calls
    /// backward() and returns the loss (as torch::optim::LBFGS's): run at w, first_step(), run at
    /// w + e(w) (skipped on a single-gradient step), second_step(). Returns the loss at w. If the
    /// closure throws at w + e(w), the weights are restored exactly, the update is skipped and
    /// the exception propagates.
    torch::Tensor step(LossClosure closure = nullptr) override {
        if (!closure)
            throw std::invalid_argument(
                "samopt::SAM::step needs a closure that computes the loss and its gradients (it runs at w and "
                "at w + e(w)); without one, call first_step() and second_step()");
        torch::Tensor loss;
        {
            torch::AutoGradMode grad_mode(true);
            loss = closure();
        }
        if (first_step() == samopt::First::Perturbed) {
            try {
                torch::AutoGradMode grad_mode(true);
                closure();
            } catch (...) {
                abort_step();
                throw;
            }
        }
        second_step();
        return loss;
    }

    /// Between the two steps, zeroes the gradients in place whatever `set_to_none` says, so the
    /// second backward writes into the buffers samopt holds; otherwise as torch::optim's.
    void zero_grad(bool set_to_none = true) {
        if (!perturbed_) {
            torch::optim::Optimizer::zero_grad(set_to_none);
            return;
        }
        for (auto &r : registered_)
            if (r.param.grad().defined()) r.param.mutable_grad().zero_();
    }

    /// The samopt optimizer underneath (grad_norm(), schedule_counts(), set_rho(), ...).
    samopt::Optimizer &engine() noexcept { return sam_; }

    /// Writes samopt's state (momentum, Adam's moments, the step count, ...), each group's lr,
    /// and how the groups map onto samopt's. Between steps; before the first step it registers
    /// the tensors first (so the checkpoint fits this model).
    void save(torch::serialize::OutputArchive &archive) const override {
        SAM &self = const_cast<SAM &>(*this);  // registering is not a visible change
        if (perturbed_)
            throw std::invalid_argument("samopt::SAM::save: between first_step() and second_step(); save before or after");
        if (self.registered_.empty()) self.register_tensors(/*need_grads=*/false);
        self.place_groups();
        std::vector<uint8_t> bytes = self.sam_.save_state();
        archive.write("samopt_state",
                      torch::from_blob(bytes.data(), {static_cast<int64_t>(bytes.size())}, torch::kUInt8).clone(),
                      /*is_buffer=*/true);
        std::vector<double> lrs, table;
        std::vector<int64_t> group_of;
        for (const auto &g : param_groups_) lrs.push_back(g.options().get_lr());
        for (const auto &g : sam_groups_) table.insert(table.end(), {g.scale, g.weight_decay});
        for (size_t k : group_of_) group_of.push_back(static_cast<int64_t>(k));
        archive.write("samopt_group_lrs", torch::tensor(lrs, torch::kFloat64), /*is_buffer=*/true);
        archive.write("samopt_groups", torch::tensor(table, torch::kFloat64), /*is_buffer=*/true);
        archive.write("samopt_group_of", torch::tensor(group_of, torch::kInt64), /*is_buffer=*/true);
    }

    /// Reads what save() wrote, into a SAM over the same tensors (same groups, shapes and dtypes),
    /// before the first step or between steps. All or nothing: a refused archive changes nothing.
    void load(torch::serialize::InputArchive &archive) override {
        if (perturbed_)
            throw std::invalid_argument("samopt::SAM::load: between first_step() and second_step(); load before or after");
        torch::Tensor state, lrs, table, group_of;
        archive.read("samopt_state", state, /*is_buffer=*/true);
        archive.read("samopt_group_lrs", lrs, /*is_buffer=*/true);
        archive.read("samopt_groups", table, /*is_buffer=*/true);
        archive.read("samopt_group_of", group_of, /*is_buffer=*/true);
        const int64_t groups = static_cast<int64_t>(param_groups_.size());
        if (lrs.numel() != groups || group_of.numel() != groups || table.numel() % 2 != 0 || table.numel() == 0)
            throw std::invalid_argument("samopt::SAM::load: the archive has " + std::to_string(lrs.numel()) +
                                        " parameter groups, this optimizer " + std::to_string(groups));
        // A fresh samopt handle with the saved groups, swapped in only when the state loads.
        std::vector<Registered> all = registered_.empty() ? collect(/*need_grads=*/false) : registered_;
        samopt::Optimizer fresh(config_);
        register_into(fresh, all);
        std::vector<SamGroup> placed{{table[0].item<double>(), table[1].item<double>(), 0}};
        for (int64_t k = 1; k < table.numel() / 2; k++) {
            double scale = table[2 * k].item<double>(), wd = table[2 * k + 1].item<double>();
            placed.push_back({scale, wd, fresh.add_group(scale, wd)});
        }
        std::vector<size_t> owner;
        for (int64_t g = 0; g < groups; g++) {
            int64_t k = group_of[g].item<int64_t>();
            if (k < 0 || k >= static_cast<int64_t>(placed.size()))
                throw std::invalid_argument("samopt::SAM::load: a damaged group table (group " + std::to_string(g) +
                                            " -> " + std::to_string(k) + ")");
            owner.push_back(static_cast<size_t>(k));
        }
        for (size_t t = 0; t < all.size(); t++)
            if (owner[all[t].group] != 0) fresh.set_group(static_cast<uint32_t>(t), placed[owner[all[t].group]].id);
        state = state.contiguous();
        fresh.load_state(state.data_ptr(), static_cast<size_t>(state.numel()));
        sam_ = std::move(fresh);
        registered_ = std::move(all);
        sam_groups_ = std::move(placed);
        group_of_ = std::move(owner);
        last_lr_ = NAN;
        for (int64_t g = 0; g < groups; g++) param_groups_[g].options().set_lr(lrs[g].item<double>());
    }

private:
    struct Registered {
        torch::Tensor param;  // the host's parameter (the same TensorImpl as the model's)
        torch::Tensor grad;   // the gradient samopt reads, kept alive here
        size_t group, index;
        void *param_ptr;      // where samopt last saw the parameter's storage
        torch::ScalarType dtype;  // as registered: samopt's buffers have this element size ...
        int64_t numel;            // ... and this length for good
    };
    // One of samopt's groups: its lr as a multiple of samopt's lr, its weight decay, its id.
    struct SamGroup {
        double scale, weight_decay;
        uint32_t id;
    };
    struct Stat {
        torch::Tensor buffer, saved;
    };

    static samopt::Config checked_config(const SAMOptions &o) {
        if (o.base() == Base::None && o.schedule() == SAM_SCHEDULE_LOOKSAM)
            throw std::invalid_argument(
                "samopt::SAM: schedule SAM_SCHEDULE_LOOKSAM writes its direction into the gradients when samopt "
                "runs no base optimizer; this class registers gradients read-only, so use base(Base::SGD) or "
                "base(Base::AdamW) with LookSAM");
        return o.config();
    }

    static std::string shape_of(const torch::Tensor &t) {
        std::ostringstream s;
        s << t.sizes() << ' ' << t.scalar_type() << " on " << t.device();
        return s.str();
    }

    static std::string describe(size_t group, size_t index, const torch::Tensor &p) {
        return "parameter " + std::to_string(index) + " of group " + std::to_string(group) + " (" + shape_of(p) + ")";
    }
    static std::string describe(const Registered &r) { return describe(r.group, r.index, r.param); }

    static SamDType dtype_of(const torch::Tensor &t) {
        switch (t.scalar_type()) {
            case torch::kFloat: return SAM_DTYPE_F32;
            case torch::kHalf: return SAM_DTYPE_F16;
            case torch::kBFloat16: return SAM_DTYPE_BF16;
            default: return UINT32_MAX;
        }
    }

    static void check_tensor(const torch::Tensor &p, size_t group, size_t index) {
        if (!p.defined()) throw std::invalid_argument("samopt::SAM: parameter " + std::to_string(index) + " of group " +
                                                      std::to_string(group) + " is an undefined tensor");
        if (!p.device().is_cpu())
            throw std::invalid_argument(
                "samopt::SAM: " + describe(group, index, p) +
                " is not in host memory. This class hands samopt the tensors' CPU storage, which its CPU engine "
                "perturbs and restores in place; CUDA memory is not host memory, and samopt's GPU engine runs on "
                "wgpu (Vulkan) devices, which cannot take LibTorch's CUDA allocations. Keep the model on the CPU, "
                "or drive samopt's Vulkan interop (sam_create_vulkan) from a Vulkan engine.");
        if (dtype_of(p) == UINT32_MAX)
            throw std::invalid_argument("samopt::SAM: " + describe(group, index, p) +
                                        ": samopt takes float32, float16 and bfloat16 tensors");
        if (p.is_sparse() || !p.is_non_overlapping_and_dense())
            throw std::invalid_argument("samopt::SAM: " + describe(group, index, p) +
                                        " is not dense (sparse, overlapping or with gaps): samopt steps a flat buffer");
    }

    // Every group's options are SAMOptions agreeing with group 0's but for lr and weight_decay,
    // and every tensor that requires a gradient is one samopt can take.
    void check_groups() const {
        for (size_t g = 0; g < param_groups_.size(); g++) {
            group_options(g);
            const auto &params = param_groups_[g].params();
            for (size_t i = 0; i < params.size(); i++)
                if (!params[i].defined() || params[i].requires_grad()) check_tensor(params[i], g, i);
        }
        check_groups_agree();
    }

    // The gradient must be readable as the same flat buffer: same dtype, shape and strides.
    static void check_grad(const torch::Tensor &p, const torch::Tensor &g, size_t group, size_t index) {
        if (!g.defined())
            throw std::invalid_argument("samopt::SAM::first_step: " + describe(group, index, p) +
                                        " has no gradient: compute the loss's gradient first (every parameter that "
                                        "requires grad needs one; freeze unused ones with requires_grad(false))");
        if (g.is_sparse() || !g.device().is_cpu() || g.scalar_type() != p.scalar_type() || g.sizes() != p.sizes() ||
            g.strides() != p.strides())
            throw std::invalid_argument("samopt::SAM::first_step: " + describe(group, index, p) +
                                        " has a gradient samopt cannot read in place: " + shape_of(g) +
                                        " with strides " + c10::str(g.strides()) + " (it needs the parameter's dtype, "
                                        "shape and strides, dense, on the CPU)");
    }

    // The tensors that require a gradient, in group order, with their gradients (or, for save and
    // load before the first step, zero buffers of our own until the first step rebinds them).
    std::vector<Registered> collect(bool need_grads) const {
        std::vector<Registered> all;
        for (size_t g = 0; g < param_groups_.size(); g++) {
            const auto &params = param_groups_[g].params();
            for (size_t i = 0; i < params.size(); i++) {
                const torch::Tensor &p = params[i];
                if (!p.requires_grad()) continue;
                check_tensor(p, g, i);
                torch::Tensor grad = p.grad();
                if (need_grads || grad.defined()) {
                    check_grad(p, grad, g, i);
                } else {
                    grad = torch::zeros_like(p);
                }
                all.push_back({p, grad, g, i, p.data_ptr(), p.scalar_type(), p.numel()});
            }
        }
        if (all.empty()) throw std::invalid_argument("samopt::SAM: no parameter requires a gradient");
        return all;
    }

    static void register_into(samopt::Optimizer &sam, const std::vector<Registered> &all) {
        for (const auto &r : all)
            sam.register_host(r.param.data_ptr(), r.grad.data_ptr(), static_cast<size_t>(r.numel), dtype_of(r.param));
    }

    // samopt registers one tensor at a time and never unregisters: register into a fresh handle
    // and keep it only when every tensor was taken, so a refusal (overlapping tensors, ...)
    // leaves nothing behind.
    void register_tensors(bool need_grads = true) {
        std::vector<Registered> all = collect(need_grads);
        samopt::Optimizer fresh(config_);
        register_into(fresh, all);
        sam_ = std::move(fresh);
        registered_ = std::move(all);
        sam_groups_ = {{1.0, weight_decay(0), 0}};  // samopt's group 0: the config's (group 0's) decay
        group_of_.assign(param_groups_.size(), 0);
        last_lr_ = NAN;
    }

    void follow_moved_tensors() {
        size_t now = 0;
        for (const auto &group : param_groups_)
            for (const auto &p : group.params()) now += p.requires_grad();
        if (now != registered_.size())
            throw std::invalid_argument("samopt::SAM::first_step: " + std::to_string(now) +
                                        " parameters require gradients, " + std::to_string(registered_.size()) +
                                        " did at the first step; samopt's set of tensors is fixed then (add groups and "
                                        "change requires_grad before the first step)");
        std::vector<uint32_t> ids;
        std::vector<void *> params, grads;
        std::vector<torch::Tensor> keep;
        for (size_t k = 0; k < registered_.size(); k++) {
            Registered &r = registered_[k];
            if (r.param.scalar_type() != r.dtype || r.param.numel() != r.numel)
                throw std::invalid_argument("samopt::SAM::first_step: " + describe(r) + " was " +
                                            c10::toString(r.dtype) + " with " + std::to_string(r.numel) +
                                            " elements at the first step; samopt's buffers keep their dtype and "
                                            "size (make a new SAM after changing the model's dtype or shapes)");
            check_tensor(r.param, r.group, r.index);
            const torch::Tensor grad = r.param.grad();
            check_grad(r.param, grad, r.group, r.index);
            if (grad.data_ptr() != r.grad.data_ptr() || r.param.data_ptr() != r.param_ptr) {
                ids.push_back(static_cast<uint32_t>(k));
                params.push_back(r.param.data_ptr());
                grads.push_back(grad.data_ptr());
            }
            keep.push_back(grad);
        }
        if (!ids.empty()) sam_.rebind_hosts(ids, params, grads);
        // Only now, with samopt pointing at them: hold the new gradients, release the old.
        for (size_t k = 0; k < registered_.size(); k++) {
            registered_[k].grad = keep[k];
            registered_[k].param_ptr = registered_[k].param.data_ptr();
        }
    }

    const SAMOptions &group_options(size_t g) const {
        const auto *o = dynamic_cast<const SAMOptions *>(&param_groups_[g].options());
        if (o == nullptr)
            throw std::invalid_argument("samopt::SAM: parameter group " + std::to_string(g) +
                                        " has options of another optimizer; give it SAMOptions");
        return *o;
    }

    // samopt has one configuration; groups differ in lr and weight_decay only.
    void check_groups_agree() const {
        const samopt::Config a = group_options(0).config();
        for (size_t g = 1; g < param_groups_.size(); g++) {
            const samopt::Config b = group_options(g).config();
            if (!(a.rho == b.rho && a.eps == b.eps && a.adaptive == b.adaptive && a.eta == b.eta &&
                  a.norm_p == b.norm_p && a.base == b.base && a.momentum == b.momentum && a.dampening == b.dampening &&
                  a.nesterov == b.nesterov && a.beta1 == b.beta1 && a.beta2 == b.beta2 && a.adam_eps == b.adam_eps &&
                  a.max_grad_norm == b.max_grad_norm && a.gsam_alpha == b.gsam_alpha && a.schedule == b.schedule &&
                  a.schedule_k == b.schedule_k && a.schedule_p == b.schedule_p &&
                  a.schedule_seed == b.schedule_seed && a.looksam_alpha == b.looksam_alpha &&
                  a.master_weights == b.master_weights && a.preconditioned == b.preconditioned &&
                  a.num_threads == b.num_threads))
                throw std::invalid_argument("samopt::SAM: parameter group " + std::to_string(g) +
                                            "'s options differ from group 0's in more than lr and weight_decay; "
                                            "samopt runs one configuration over all groups");
        }
    }

    // A group's weight decay as a number (NAN in SAMOptions is PyTorch's default for the base).
    double weight_decay(size_t g) const {
        double wd = group_options(g).weight_decay();
        if (std::isnan(wd)) wd = config_.base == SAM_BASE_ADAMW ? 1e-2 : 0.0;
        return wd;
    }

    // samopt's lr and each group's multiple of it: the first non-zero group lr, so that any group
    // (group 0 included) may have lr 0, as a warmup or an annealed schedule gives.
    std::pair<double, std::vector<double>> lr_plan() const {
        double lr = 0;
        for (size_t g = 0; g < param_groups_.size() && lr == 0; g++) lr = group_options(g).lr();
        std::vector<double> scales;
        for (size_t g = 0; g < param_groups_.size(); g++) scales.push_back(lr != 0 ? group_options(g).lr() / lr : 1.0);
        return {lr, scales};
    }

    static bool same(double a, double b) { return a == b || (std::isnan(a) && std::isnan(b)); }

    // Puts each group's tensors in a samopt group with the group's lr multiple and weight decay
    // (samopt's group 0 has multiple 1 and the config's weight decay; others are added the first
    // time a pair is needed and reused after), and sets samopt's lr. Between steps only: samopt
    // moves tensors between groups then. With the base outside samopt there is nothing to do.
    void place_groups() {
        if (config_.base == SAM_BASE_NONE) return;
        auto [lr, scales] = lr_plan();
        for (size_t g = 0; g < param_groups_.size(); g++) {
            const double wd = weight_decay(g);
            const SamGroup &now = sam_groups_[group_of_[g]];
            if (now.scale == scales[g] && same(now.weight_decay, wd)) continue;
            size_t k = 0;
            while (k < sam_groups_.size() && !(sam_groups_[k].scale == scales[g] && same(sam_groups_[k].weight_decay, wd))) k++;
            if (k == sam_groups_.size()) sam_groups_.push_back({scales[g], wd, sam_.add_group(scales[g], wd)});
            for (size_t t = 0; t < registered_.size(); t++)
                if (registered_[t].group == g) sam_.set_group(static_cast<uint32_t>(t), sam_groups_[k].id);
            group_of_[g] = k;
        }
        set_lr(lr);
    }

    // Before the update: samopt's lr from the groups' now. Between the two steps samopt cannot
    // move tensors between its groups, so a changed ratio between groups is refused then.
    void sync_lr() {
        if (config_.base == SAM_BASE_NONE) return;
        auto [lr, scales] = lr_plan();
        for (size_t g = 0; g < param_groups_.size(); g++) {
            const SamGroup &now = sam_groups_[group_of_[g]];
            if (now.scale != scales[g] || !same(now.weight_decay, weight_decay(g)))
                throw std::invalid_argument("group " + std::to_string(g) + "'s lr or weight decay changed between "
                                            "first_step() and second_step() relative to the other groups; change "
                                            "them before first_step()");
        }
        set_lr(lr);
    }

    void set_lr(double lr) {
        if (lr != last_lr_) {
            sam_.set_lr(lr);
            last_lr_ = lr;
        }
    }

    void restore_stats() {
        for (auto &s : stats_) {
            if (s.saved.defined()) s.buffer.copy_(s.saved);
            s.saved = torch::Tensor();
        }
    }

    // Ends a perturbed step without its update: the weights restored exactly, through samopt's
    // own rule for a non-finite second gradient (restore, no update, no optimizer state touched).
    // One element of the gradient samopt reads is NaN for the call and gets its value back after.
    // With Base::None samopt reads no second gradient: it restores and counts the step (its only
    // state then), and the torch::optim base is not stepped.
    void abort_step() noexcept {
        try {
            torch::NoGradGuard no_grad;
            const torch::Tensor &grad = registered_.front().grad;
            torch::Tensor first = torch::from_blob(grad.data_ptr(), {1}, grad.options());  // any dense layout
            torch::Tensor kept = first.clone();
            first.fill_(std::numeric_limits<float>::quiet_NaN());
            sam_.second_step();
            first.copy_(kept);
            restore_stats();
        } catch (...) {
        }
        perturbed_ = false;
    }

    samopt::Config config_;
    samopt::Optimizer sam_;
    std::vector<Registered> registered_;
    std::vector<SamGroup> sam_groups_;  // samopt's groups; [0] is samopt's group 0
    std::vector<size_t> group_of_;      // torch group -> index in sam_groups_
    std::vector<Stat> stats_;
    torch::optim::Optimizer *external_ = nullptr;
    double last_lr_ = NAN;
    bool perturbed_ = false;
};

}  // namespace samopt

#endif  // SAMOPT_TORCH_HPP
