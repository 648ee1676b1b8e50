// samopt.hpp: a header-only C++17 RAII wrapper over the C API (samopt.h).
//
//   samopt::Config config;                 // sam_config_default(), fields as in SamConfig
//   config.rho = 0.05;
//   samopt::Optimizer sam(config);         // throws samopt::Error on a bad config
//   sam.register_host(weights, grads);     // any contiguous container of float (or pointer + length)
//   for (...) {
//       forward_backward();                // gradient at w
//       if (sam.first_step() == samopt::First::Perturbed)   // w -> w + e(w), unless the schedule
//           forward_backward();            // gradient at w + e(w)     says: single-gradient step
//       sam.second_step();                 // w restored (and updated, with a built-in base optimizer)
//   }
//
// Every failing call throws samopt::Error, which carries the SamStatus and samopt's message (which
// names the argument and the value); a failing call changes nothing. Non-fatal outcomes are
// returned: first_step() says whether the step schedule (config.schedule) made this a
// single-gradient step, second_step() whether a non-finite second gradient made samopt skip the
// update.
#ifndef SAMOPT_HPP
#define SAMOPT_HPP

#include <samopt.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace samopt {

/// A failed call: the status and samopt's message for it.
class Error : public std::runtime_error {
public:
    Error(SamStatus status, const std::string &message) : std::runtime_error(message), status_(status) {}
    /// The SamStatus the call returned (negative).
    SamStatus status() const noexcept { return status_; }
    /// sam_status_string of the status, e.g. "invalid argument".
    const char *status_string() const noexcept { return sam_status_string(status_); }

private:
    SamStatus status_;
};

/// Throws Error for a negative status; returns non-negative ones.
inline SamStatus check(SamStatus status) {
    if (static_cast<int32_t>(status) < 0) throw Error(status, sam_last_error());
    return status;
}

/// The library's version, e.g. "0.1.0".
inline const char *version() noexcept { return sam_version(); }

/// The loaded library's ABI version; equal to SAM_ABI_VERSION when it matches this header.
inline uint32_t abi_version() noexcept { return sam_abi_version(); }

/// The GPU adapters wgpu finds, best first (sam_gpu_adapter_count, sam_gpu_adapter_info).
inline std::vector<SamAdapterInfo> gpu_adapters() {
    size_t count = 0;
    check(sam_gpu_adapter_count(&count));
    std::vector<SamAdapterInfo> out(count);
    for (size_t i = 0; i < count; i++) {
        out[i] = SamAdapterInfo{};
        out[i].struct_size = sizeof(SamAdapterInfo);
        check(sam_gpu_adapter_info(i, &out[i]));
    }
    return out;
}

/// sam_config_layout: this library's SamConfig fields (name, offset, size) in declaration order,
/// for code that mirrors the struct elsewhere and wants to check its copy.
inline std::vector<SamConfigField> config_layout() {
    size_t count = 0;
    check(sam_config_layout(nullptr, 0, &count));
    std::vector<SamConfigField> fields(count);
    check(sam_config_layout(fields.data(), fields.size(), &count));
    fields.resize(count);
    return fields;
}

/// Sends samopt's log messages to `callback` (NULL stops them); see sam_set_log_callback.
inline void set_log_callback(SamLogCallback callback, void *user = nullptr) {
    check(sam_set_log_callback(callback, user));
}

/// A SamConfig that starts as sam_config_default() (this header's layout); set its fields
/// directly, e.g. `config.schedule = SAM_SCHEDULE_LOOKSAM; config.schedule_k = 5;`.
struct Config : SamConfig {
    Config() : SamConfig(sam_config_default()) {}
};

/// The element type samopt uses for T: float is SAM_DTYPE_F32. For f16 and bf16 (often stored as
/// uint16_t or a framework's own half type) pass the dtype explicitly.
template <class T>
struct dtype_of {
    static_assert(std::is_same<T, float>::value,
                  "samopt infers SAM_DTYPE_F32 from float only: pass SAM_DTYPE_F16 or SAM_DTYPE_BF16 explicitly");
    static constexpr SamDType value = SAM_DTYPE_F32;
};

/// What a first step did, as the step schedule decided.
enum class First {
    /// A SAM step: the weights are at w + e(w); compute the gradient there, then second_step().
    Perturbed,
    /// A single-gradient step (SAM_STEP_SINGLE_GRADIENT): the weights were not moved; skip the
    /// second forward/backward and call second_step() now.
    SingleGradient,
    /// Loss scaling found inf or NaN in the gradient (SAM_STEP_SKIPPED): nothing moved, the scale
    /// was lowered; skip the second forward/backward and call second_step(), which ends the step.
    Skipped,
};

/// What a second step did.
enum class Step {
    /// Weights restored (and updated by a built-in base optimizer).
    Done,
    /// A non-finite second gradient: weights restored, update and its state skipped
    /// (SAM_STEP_SKIPPED). A loss-scaled loop lowers its scale and goes on.
    Skipped,
};

/// An optimizer handle that destroys itself; movable, not copyable. Calls on one Optimizer may
/// come from any thread (samopt serialises them).
class Optimizer {
public:
    /// sam_create.
    explicit Optimizer(const SamConfig &config = Config()) { check(sam_create(&config, &handle_)); }
    ~Optimizer() { sam_destroy(handle_); }
    Optimizer(const Optimizer &) = delete;
    Optimizer &operator=(const Optimizer &) = delete;
    Optimizer(Optimizer &&other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
    Optimizer &operator=(Optimizer &&other) noexcept {
        if (this != &other) {
            sam_destroy(handle_);
            handle_ = std::exchange(other.handle_, nullptr);
        }
        return *this;
    }

    /// The C handle, for calls this wrapper does not cover.
    SamOptimizer *get() const noexcept { return handle_; }

    /// sam_create_vulkan: an optimizer on the host's own Vulkan device and queue (see
    /// SamVulkanDevice and the synchronisation contract in samopt.h).
    static Optimizer on_vulkan(const SamVulkanDevice &device, const SamConfig &config = Config()) {
        SamOptimizer *handle = nullptr;
        check(sam_create_vulkan(&device, &config, &handle));
        return Optimizer(handle);
    }

    /// sam_register_vulkan: a tensor in the host's VkBuffers (passed as uint64_t, e.g.
    /// `(uint64_t)buffer`), used in place and never freed. Returns the tensor's id.
    uint32_t register_vulkan(uint64_t param_buffer, uint64_t param_offset, uint64_t grad_buffer,
                             uint64_t grad_offset, size_t len, SamDType dtype = SAM_DTYPE_F32) {
        uint32_t id = 0;
        check(sam_register_vulkan(handle_, param_buffer, param_offset, grad_buffer, grad_offset, len, dtype, &id));
        return id;
    }

    /// sam_rebind_vulkan: tensor `id` (from register_vulkan) now lives in these VkBuffer ranges;
    /// its state is kept.
    void rebind_vulkan(uint32_t id, uint64_t param_buffer, uint64_t param_offset, uint64_t grad_buffer,
                       uint64_t grad_offset) {
        check(sam_rebind_vulkan(handle_, id, param_buffer, param_offset, grad_buffer, grad_offset));
    }

    /// sam_register_host: a parameter buffer and its gradient buffer, both owned by the caller
    /// and kept in place for the optimizer's lifetime. Returns the tensor's id.
    uint32_t register_host(void *param, const void *grad, size_t len, SamDType dtype) {
        uint32_t id = 0;
        check(sam_register_host(handle_, param, grad, len, dtype, &id));
        return id;
    }

    /// Typed form: dtype from T (float), or given.
    template <class T>
    uint32_t register_host(T *param, const T *grad, size_t len, SamDType dtype = dtype_of<T>::value) {
        return register_host(static_cast<void *>(param), static_cast<const void *>(grad), len, dtype);
    }

    /// Contiguous containers (std::vector, std::array, ...): the same length, registered whole.
    template <class C, class = decltype(std::data(std::declval<C &>())), class = decltype(std::size(std::declval<C &>()))>
    uint32_t register_host(C &params, const C &grads,
                           SamDType dtype = dtype_of<std::remove_cv_t<std::remove_reference_t<decltype(*std::data(params))>>>::value) {
        if (std::size(params) != std::size(grads))
            throw Error(SAM_ERR_INVALID_ARGUMENT, "samopt::Optimizer::register_host: params and grads differ in size (" +
                                                      std::to_string(std::size(params)) + " and " +
                                                      std::to_string(std::size(grads)) + ")");
        return register_host(static_cast<void *>(std::data(params)), static_cast<const void *>(std::data(grads)),
                             std::size(params), dtype);
    }

    /// sam_register_host_ex with SAM_REGISTER_GRAD_WRITABLE: as register_host, and samopt may write
    /// the gradient buffer (only without a built-in base optimizer: per-shard SAM leaves the mean
    /// of the shards' gradients there, LookSAM its direction on single-gradient steps, for the
    /// caller's optimizer). Returns the id.
    uint32_t register_host_writable(void *param, void *grad, size_t len, SamDType dtype) {
        uint32_t id = 0;
        check(sam_register_host_ex(handle_, param, grad, len, dtype, SAM_REGISTER_GRAD_WRITABLE, &id));
        return id;
    }

    /// Contiguous containers, as register_host, with a writable gradient.
    template <class C, class = decltype(std::data(std::declval<C &>())), class = decltype(std::size(std::declval<C &>()))>
    uint32_t register_host_writable(C &params, C &grads,
                                    SamDType dtype = dtype_of<std::remove_cv_t<std::remove_reference_t<decltype(*std::data(params))>>>::value) {
        if (std::size(params) != std::size(grads))
            throw Error(SAM_ERR_INVALID_ARGUMENT, "samopt::Optimizer::register_host_writable: params and grads differ in size (" +
                                                      std::to_string(std::size(params)) + " and " +
                                                      std::to_string(std::size(grads)) + ")");
        return register_host_writable(static_cast<void *>(std::data(params)), static_cast<void *>(std::data(grads)),
                                      std::size(params), dtype);
    }

    /// sam_rebind_host: tensor `id` (from register_host) now lives at these buffers of the same
    /// length and dtype; its state is kept. For frameworks that reallocate between steps.
    void rebind_host(uint32_t id, void *param, void *grad) { check(sam_rebind_host(handle_, id, param, grad)); }

    /// sam_rebind_hosts: several tensors move at once, all or nothing (one may take over the
    /// address another held: a caching allocator after zero_grad()).
    void rebind_hosts(const std::vector<uint32_t> &ids, const std::vector<void *> &params,
                      const std::vector<void *> &grads) {
        if (ids.size() != params.size() || ids.size() != grads.size())
            throw Error(SAM_ERR_INVALID_ARGUMENT, "samopt::Optimizer::rebind_hosts: ids, params and grads differ in size");
        check(sam_rebind_hosts(handle_, ids.size(), ids.data(), params.data(), grads.data()));
    }

    /// Contiguous containers, as register_host.
    template <class C, class = decltype(std::data(std::declval<C &>())), class = decltype(std::size(std::declval<C &>()))>
    void rebind_host(uint32_t id, C &params, C &grads) {
        if (std::size(params) != std::size(grads))
            throw Error(SAM_ERR_INVALID_ARGUMENT, "samopt::Optimizer::rebind_host: params and grads differ in size (" +
                                                      std::to_string(std::size(params)) + " and " +
                                                      std::to_string(std::size(grads)) + ")");
        rebind_host(id, static_cast<void *>(std::data(params)), static_cast<void *>(std::data(grads)));
    }

    /// sam_first_step: one global norm, then w -> w + e(w) on a SAM step. Returns
    /// First::SingleGradient when the schedule makes this a single-gradient step (nothing moved:
    /// skip the second forward/backward). Throws with SAM_ERR_NON_FINITE (and nothing changed) on
    /// NaN or infinity in a gradient.
    First first_step() { return first_of(check(sam_first_step(handle_))); }

    /// sam_second_step: restore (and update, with a built-in base optimizer).
    Step second_step() { return check(sam_second_step(handle_)) == SAM_STEP_SKIPPED ? Step::Skipped : Step::Done; }

    /// Sharded parameters, step 1 of 2: the squared gradient norm of this worker's own shard.
    double grad_sq_norm_local() {
        double v = 0;
        check(sam_grad_sq_norm_local(handle_, &v));
        return v;
    }

    /// Sharded parameters, step 2 of 2: the ascent with the norm over all shards (the schedule
    /// decides as in first_step()).
    First first_step_with_norm(double global_norm) {
        return first_of(check(sam_first_step_with_norm(handle_, global_norm)));
    }

    /// Installs the host's all-reduce (sum over workers) so that first_step() uses the norm over
    /// all workers' shards, for parameters sharded across workers (not for replicated ones:
    /// average their gradients before first_step()); nullptr removes it. See sam_set_allreduce.
    void set_allreduce(SamAllreduce callback, void *user = nullptr) {
        check(sam_set_allreduce(handle_, callback, user));
    }

    /// m-sharpness in one process: restore w and accumulate this part of the batch's perturbed
    /// gradient; second_step() then applies the mean (written into the gradient buffers). See
    /// sam_accumulate_step.
    void accumulate_step() { check(sam_accumulate_step(handle_)); }

    /// The gradient norm the last first step used.
    double grad_norm() const {
        double n = 0;
        check(sam_grad_norm(handle_, &n));
        return n;
    }

    size_t tensor_count() const {
        size_t n = 0;
        check(sam_tensor_count(handle_, &n));
        return n;
    }

    /// Completed steps, SAM and single-gradient (skipped ones excluded).
    uint64_t step_count() const {
        uint64_t n = 0;
        check(sam_step_count(handle_, &n));
        return n;
    }

    bool perturbed() const {
        bool p = false;
        check(sam_is_perturbed(handle_, &p));
        return p;
    }

    /// SAM_BACKEND_CPU or SAM_BACKEND_GPU (AUTO until the first registration decides).
    SamBackend backend() const {
        SamBackend b = 0;
        check(sam_get_backend(handle_, &b));
        return b;
    }

    /// The base optimizer's learning rate from the next second step on.
    void set_lr(double lr) { check(sam_set_lr(handle_, lr)); }

    double lr() const {
        double v = 0;
        check(sam_get_lr(handle_, &v));
        return v;
    }

    /// rho from the next first step on (a rho schedule); sam_set_rho.
    void set_rho(double rho) { check(sam_set_rho(handle_, rho)); }

    double rho() const {
        double v = 0;
        check(sam_get_rho(handle_, &v));
        return v;
    }

    /// The loss scale to multiply the next loss by (1.0 without loss scaling); sam_get_loss_scale.
    double loss_scale() const {
        double v = 0;
        check(sam_get_loss_scale(handle_, &v));
        return v;
    }

    /// Completed SAM steps (two gradients) and single-gradient steps; sam_schedule_counts.
    std::pair<uint64_t, uint64_t> schedule_counts() const {
        uint64_t sam = 0, single = 0;
        check(sam_schedule_counts(handle_, &sam, &single));
        return {sam, single};
    }

    /// A parameter group with its learning-rate scale and weight decay (NAN: group 0's).
    uint32_t add_group(double lr_scale, double weight_decay = NAN) {
        uint32_t g = 0;
        check(sam_add_group(handle_, lr_scale, weight_decay, &g));
        return g;
    }

    void set_group(uint32_t tensor, uint32_t group) { check(sam_set_tensor_group(handle_, tensor, group)); }

    /// sam_tensor_create: a zeroed parameter/gradient pair owned by the optimizer (on the GPU
    /// backend, on the device).
    uint32_t tensor_create(size_t len, SamDType dtype = SAM_DTYPE_F32) {
        uint32_t id = 0;
        check(sam_tensor_create(handle_, len, dtype, &id));
        return id;
    }

    void tensor_write(uint32_t id, SamTensorPart part, const void *src, size_t len) {
        check(sam_tensor_write(handle_, id, part, src, len));
    }

    void tensor_read(uint32_t id, SamTensorPart part, void *dst, size_t len) {
        check(sam_tensor_read(handle_, id, part, dst, len));
    }

    /// A checkpoint of the optimizer's state (between steps).
    std::vector<uint8_t> save_state() {
        size_t size = 0;
        check(sam_state_size(handle_, &size));
        std::vector<uint8_t> bytes(size);
        check(sam_state_save(handle_, bytes.data(), bytes.size(), nullptr));
        return bytes;
    }

    void load_state(const void *bytes, size_t len) { check(sam_state_load(handle_, bytes, len)); }
    void load_state(const std::vector<uint8_t> &bytes) { load_state(bytes.data(), bytes.size()); }
    void save_state_file(const std::string &path) { check(sam_state_save_file(handle_, path.c_str())); }
    void load_state_file(const std::string &path) { check(sam_state_load_file(handle_, path.c_str())); }

    /// The GPU adapter this optimizer runs on (throws SAM_ERR_UNSUPPORTED on the CPU).
    SamAdapterInfo adapter_info() const {
        SamAdapterInfo info{};
        info.struct_size = sizeof info;
        check(sam_get_adapter_info(handle_, &info));
        return info;
    }

private:
    explicit Optimizer(SamOptimizer *handle) noexcept : handle_(handle) {}
    static First first_of(SamStatus status) {
        if (status == SAM_STEP_SINGLE_GRADIENT) return First::SingleGradient;
        return status == SAM_STEP_SKIPPED ? First::Skipped : First::Perturbed;
    }
    SamOptimizer *handle_ = nullptr;
};

/// sam_vulkan_required_extensions: the device extensions to enable when creating the VkDevice
/// handed to Optimizer::on_vulkan (static strings; `device.device` may still be null).
inline std::vector<const char *> vulkan_required_extensions(const SamVulkanDevice &device) {
    size_t count = 0;
    check(sam_vulkan_required_extensions(&device, nullptr, 0, &count));
    std::vector<const char *> names(count);
    check(sam_vulkan_required_extensions(&device, names.data(), names.size(), &count));
    names.resize(count);
    return names;
}

}  // namespace samopt

#endif  // SAMOPT_HPP
