/*
 * samopt: Sharpness-Aware Minimization as an embeddable optimizer plugin.
 *
 * One SAM step, with the host's own forward/backward passes:
 *   1. compute the gradient at w into the registered gradient buffers
 *   2. sam_first_step(opt)   -- w <- w + e(w), using one global gradient norm
 *   3. compute the gradient at w + e(w) into the same buffers
 *   4. sam_second_step(opt)  -- w restored bit for bit
 *   5. the base optimizer steps w with that gradient
 *
 * Every function returns SAM_OK (0) or a negative SamStatus; on failure nothing changed and
 * sam_last_error() says which argument was wrong and why.
 */

#ifndef SAMOPT_H
#define SAMOPT_H

/* Generated from src/capi by cbindgen (cbindgen.toml); do not edit by hand. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/**
 * Version of the C ABI: bumped on any incompatible change to a signature or struct layout.
 * Compare `sam_abi_version()` with `SAM_ABI_VERSION` from the header you compiled against.
 *
 * What bumps it: removing or renaming a function, changing a parameter or return type, changing
 * the meaning of a status, constant or field, or reordering or removing a field of a struct.
 * What does not: a new function, a new status or enum value, a new field at the end of
 * `SamConfig` or `SamAdapterInfo` (both carry `struct_size`, and the library accepts every
 * released layout). A bump renames the shared library's SONAME (`libsamopt.so.<ABI>`), so
 * programs linked against the old ABI keep loading the old library.
 */
#define SAM_ABI_VERSION 1

/**
 * The most CPU worker threads an optimizer may ask for ([`Config::threads`]).
 */
#define MAX_THREADS 1024

/**
 * The result of every fallible call. `SAM_OK` is 0, errors are negative, non-fatal outcomes are
 * positive, and a number never changes meaning (retired numbers are not reused).
 */
enum SamStatus
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : int32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
    /**
     * Success.
     */
    SAM_OK = 0,
    /**
     * Not an error: `sam_second_step` found NaN or infinity in the second gradient, restored the
     * weights exactly, and skipped the base update (its state and step count untouched). A
     * loss-scaled loop lowers its scale and goes on; with samopt's own loss scaling
     * (`config.loss_scale`) samopt lowers it, and `sam_first_step` returns this status too when
     * the first gradient overflowed (nothing moved: skip the second forward/backward and call
     * `sam_second_step`, which returns it again). Without a built-in base optimizer only
     * `SAM_SCHEDULE_LOOKSAM` reduces the second gradient and can return it: skip your own
     * optimizer's step then.
     */
    SAM_STEP_SKIPPED = 1,
    /**
     * Not an error: the step schedule made this a single-gradient step (`sam_first_step`). The
     * weights were not moved: skip the second forward/backward and call `sam_second_step` now,
     * which applies the base update with the gradient already in the buffers (and, under
     * LookSAM, the reused direction). Never returned with `SAM_SCHEDULE_EVERY`.
     */
    SAM_STEP_SINGLE_GRADIENT = 2,
    /**
     * A required pointer argument was NULL.
     */
    SAM_ERR_NULL_POINTER = -1,
    /**
     * An argument had a value the call cannot accept; the message names it.
     */
    SAM_ERR_INVALID_ARGUMENT = -2,
    /**
     * The call is not allowed now: a second step before a first step, a first step twice,
     * registering while the weights are perturbed.
     */
    SAM_ERR_INVALID_STATE = -3,
    /**
     * A gradient held NaN or infinity: no parameter was changed. A loss-scaled loop lowers its
     * scale and retries.
     */
    SAM_ERR_NON_FINITE = -4,
    /**
     * Valid, but not supported by this build or backend.
     */
    SAM_ERR_UNSUPPORTED = -5,
    /**
     * The GPU device or driver failed.
     */
    SAM_ERR_DEVICE = -6,
    /**
     * Reading or writing a file or a serialized state failed.
     */
    SAM_ERR_IO = -7,
    /**
     * The optimizer's state could not be allocated.
     */
    SAM_ERR_OUT_OF_MEMORY = -8,
    /**
     * A bug in samopt (a caught panic); please report the message.
     */
    SAM_ERR_INTERNAL = -9,
    /**
     * A callback the host registered (the all-reduce of `sam_set_allreduce`) returned non-zero;
     * nothing was changed.
     */
    SAM_ERR_CALLBACK = -10,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum SamStatus SamStatus;
#else
typedef int32_t SamStatus;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/**
 * An optimizer handle: create with `sam_create`, free with `sam_destroy`.
 */
typedef struct SamOptimizer SamOptimizer;

/**
 * Which engine runs the passes: one of the `SAM_BACKEND_*` values.
 */
typedef uint32_t SamBackend;

/**
 * The base optimizer of the second step: one of the `SAM_BASE_*` values.
 */
typedef uint32_t SamBase;

/**
 * Which steps are SAM steps and which take a single gradient: one of the `SAM_SCHEDULE_*` values
 * (`t` counts the steps from 0, a skipped step taken back as if it never happened; each value cites
 * its paper).
 */
typedef uint32_t SamSchedule;

/**
 * Configuration of an optimizer. Always start from `sam_config_default()` (or
 * `sam_config_init`), which also sets `struct_size`, then change the fields you need.
 */
typedef struct {
    /**
     * `sizeof(SamConfig)` as the caller compiled it; lets the struct grow in later versions
     * without breaking programs built against older headers.
     */
    size_t struct_size;
    /**
     * Radius of the perturbation ball; finite and > 0. Default 0.05 (ASAM: about 2.0).
     */
    double rho;
    /**
     * Added to the gradient norm before dividing by it; finite and >= 0. Default 1e-12.
     */
    double eps;
    /**
     * ASAM's offset in `T_w = |w| + eta`; finite and >= 0. Default 0.0.
     */
    double eta;
    /**
     * The norm of the ball: 2.0 (default) or `INFINITY` (the sign perturbation).
     */
    double norm_p;
    /**
     * Adaptive SAM (ASAM): scale the ascent elementwise by `T_w`. Default false.
     */
    bool adaptive;
    /**
     * A `SAM_BACKEND_*` value. Default `SAM_BACKEND_AUTO`.
     */
    SamBackend backend;
    /**
     * Worker threads of the CPU engine, at most 1024. 0 (default) shares one process-wide pool
     * with a worker per available core among all handles; a number gives this handle its own,
     * whose threads `sam_destroy` joins.
     */
    uint32_t num_threads;
    /**
     * The GPU adapter: its index in the list `samopt info` prints, or a case-insensitive part of
     * its name. NULL (default): the `SAMOPT_ADAPTER` environment variable, else the best adapter
     * (discrete, integrated, virtual, CPU). `WGPU_BACKEND=vulkan|gl|...` limits the APIs searched.
     * Read during `sam_create` only.
     */
    const char *adapter;
    /**
     * A `SAM_BASE_*` value. Default `SAM_BASE_NONE`.
     */
    SamBase base;
    /**
     * Learning rate, >= 0 (1e-3). Change it between steps with `sam_set_lr`.
     */
    double lr;
    /**
     * SGD momentum, >= 0 (0).
     */
    double momentum;
    /**
     * SGD dampening (0).
     */
    double dampening;
    /**
     * SGD Nesterov momentum (false); needs momentum > 0 and dampening 0.
     */
    bool nesterov;
    /**
     * Weight decay of group 0, >= 0. `NAN` (default): PyTorch's default for the base optimizer,
     * 0 for SGD and 1e-2 for AdamW.
     */
    double weight_decay;
    /**
     * AdamW's beta1, in [0, 1) (0.9).
     */
    double beta1;
    /**
     * AdamW's beta2, in [0, 1) (0.999).
     */
    double beta2;
    /**
     * AdamW's epsilon, >= 0 (1e-8).
     */
    double adam_eps;
    /**
     * Clip the second (perturbed) gradient to this global L2 norm before the base update, as
     * `torch.nn.utils.clip_grad_norm_` does; 0 (default) turns clipping off. Needs a built-in base
     * optimizer. (Clipping the first gradient would change nothing: the perturbation divides by
     * its norm.) On a single-gradient step the factor comes from that step's `||g||`.
     */
    double max_grad_norm;
    /**
     * GSAM's alpha: step with `g' - alpha * g_perp`, `g_perp = g - (g.g' / ||g'||^2) g'`, with `g`
     * the first gradient (the first step keeps a copy) and `g'` the second; 0 (default) is plain
     * SAM. Needs a built-in base optimizer. A schedule's single-gradient steps step with `g`.
     */
    double gsam_alpha;
    /**
     * A `SAM_SCHEDULE_*` value: which steps are SAM steps and which single-gradient steps
     * (`sam_first_step` returns `SAM_STEP_SINGLE_GRADIENT` for those). Default
     * `SAM_SCHEDULE_EVERY`.
     */
    SamSchedule schedule;
    /**
     * The period `k >= 1` of `SAM_SCHEDULE_INTERVAL` and `SAM_SCHEDULE_LOOKSAM` (10).
     */
    uint64_t schedule_k;
    /**
     * The probability of a SAM step under `SAM_SCHEDULE_RANDOM`, in [0, 1] (0.5).
     */
    double schedule_p;
    /**
     * The seed of `SAM_SCHEDULE_RANDOM`'s generator (0). The same seed on every worker gives the
     * same decisions everywhere.
     */
    uint64_t schedule_seed;
    /**
     * LookSAM's weight of the reused direction, finite and >= 0 (0.7, the paper's).
     */
    double looksam_alpha;
    /**
     * AE-SAM's forgetting rate of the moving averages, in [0, 1) (0.9, the paper's).
     */
    double aesam_delta;
    /**
     * AE-SAM's threshold coefficient at step 0 (-1.0).
     */
    double aesam_lambda1;
    /**
     * AE-SAM's threshold coefficient from step `aesam_planned_steps` on (1.0).
     */
    double aesam_lambda2;
    /**
     * The steps over which AE-SAM's coefficient moves, usually the planned length of training;
     * required (>= 1) under `SAM_SCHEDULE_AESAM`. Default 0.
     */
    uint64_t aesam_planned_steps;
    /**
     * Loss scaling, as PyTorch's `GradScaler`: the initial scale `S` (finite, > 0; 65536.0 is
     * GradScaler's), or 0 (default) for none. Multiply the loss by `sam_get_loss_scale()` before
     * each backward pass; samopt unscales inside its passes (the perturbation needs no unscale;
     * the base update, clipping and GSAM use `g/S`), and a step with inf or NaN in either gradient
     * is skipped (`SAM_STEP_SKIPPED`, weights exactly restored) and lowers `S`.
     */
    double loss_scale;
    /**
     * `S` is multiplied by this after `loss_scale_interval` consecutive good steps (2.0; 1.0
     * with `loss_scale_backoff` 1.0 keeps the scale fixed).
     */
    double loss_scale_growth;
    /**
     * `S` is multiplied by this at a step with inf or NaN, in (0, 1] (0.5).
     */
    double loss_scale_backoff;
    /**
     * Consecutive good steps before `S` grows, >= 1 (2000).
     */
    uint64_t loss_scale_interval;
    /**
     * f32 master weights for f16 and bf16 tensors (false): samopt keeps an f32 copy of each such
     * weight, the base optimizer updates the copy, and the host's tensor receives it rounded, so
     * updates below half a unit in the last place are not lost. Taken from the weights at a
     * tensor's first update, authoritative afterwards, and in checkpoints. Needs a built-in base.
     */
    bool master_weights;
    /**
     * With `SAM_BASE_ADAMW`: perturb along AdamW's preconditioned gradient,
     * `e = rho P g / ||P g||`, `P = 1 / (sqrt(v_hat) + adam_eps)` (plain SAM for a tensor before
     * its first update), as preconditioned SAM in Functional-SAM (arXiv 2502.02407). False by
     * default. Not with ASAM or `norm_p = INFINITY`.
     */
    bool preconditioned;
} SamConfig;

/**
 * One field of `SamConfig` as this library lays it out: what `sam_config_layout` reports, so
 * that a binding which declares its own copy of the struct (Julia's `SamOpt`, a Python `ctypes`
 * mirror) can check it field by field against the library it loaded instead of trusting a copy.
 */
typedef struct {
    /**
     * The field's name as `samopt.h` spells it (a static NUL-terminated string).
     */
    const char *name;
    /**
     * `offsetof(SamConfig, name)` in bytes.
     */
    size_t offset;
    /**
     * `sizeof` the field in bytes.
     */
    size_t size;
} SamConfigField;

/**
 * Element type of a parameter and its gradient: one of the `SAM_DTYPE_*` values.
 */
typedef uint32_t SamDType;

/**
 * Flags of `sam_register_host_ex`, or-ed together.
 */
typedef uint32_t SamRegisterFlags;

/**
 * Sums `count` doubles at `values` in place across the workers of a data-parallel job (an
 * all-reduce with the sum, e.g. `MPI_Allreduce(MPI_IN_PLACE, values, count, MPI_DOUBLE, MPI_SUM,
 * comm)`); returns 0 on success. Every worker calls it at the same point of the same step.
 */
typedef int32_t (*SamAllreduce)(double *values, size_t count, void *user);

/**
 * The loader's `vkGetInstanceProcAddr`, cast to this type: `(SamVkGetInstanceProcAddr)vkGetInstanceProcAddr`
 * (the same function; its result is declared as a plain pointer here).
 */
typedef const void *(*SamVkGetInstanceProcAddr)(void *instance, const char *name);

/**
 * The host's Vulkan objects, for `sam_create_vulkan` (all of them) and
 * `sam_vulkan_required_extensions` (the instance and physical device). Set `struct_size` to
 * `sizeof(SamVulkanDevice)`.
 */
typedef struct {
    /**
     * `sizeof(SamVulkanDevice)` as the caller compiled it.
     */
    size_t struct_size;
    /**
     * The loader's `vkGetInstanceProcAddr`, cast to `SamVkGetInstanceProcAddr`.
     */
    SamVkGetInstanceProcAddr get_instance_proc_addr;
    /**
     * The host's `VkInstance`, Vulkan 1.1 or later.
     */
    void *instance;
    /**
     * The `apiVersion` the instance was created with.
     */
    uint32_t api_version;
    /**
     * How many instance extensions the host enabled.
     */
    uint32_t instance_extension_count;
    /**
     * Their names.
     */
    const char *const *instance_extensions;
    /**
     * The `VkPhysicalDevice` the device was created from.
     */
    void *physical_device;
    /**
     * The host's `VkDevice` (ignored by `sam_vulkan_required_extensions`).
     */
    void *device;
    /**
     * How many device extensions the host enabled.
     */
    uint32_t device_extension_count;
    /**
     * Their names: a superset of what `sam_vulkan_required_extensions` lists.
     */
    const char *const *device_extensions;
    /**
     * The queue family samopt submits to (it must support compute).
     */
    uint32_t queue_family_index;
    /**
     * The queue within that family.
     */
    uint32_t queue_index;
} SamVulkanDevice;

/**
 * Which buffer of an optimizer-allocated tensor: one of the `SAM_PART_*` values.
 */
typedef uint32_t SamTensorPart;

/**
 * A GPU adapter, as `sam_gpu_adapter_info` and `sam_get_adapter_info` report it. Set
 * `struct_size = sizeof(SamAdapterInfo)` before the call. Strings are NUL-terminated and
 * truncated to fit.
 */
typedef struct {
    /**
     * `sizeof(SamAdapterInfo)` as the caller compiled it.
     */
    size_t struct_size;
    /**
     * The adapter's name, e.g. "NVIDIA H200" or "llvmpipe (LLVM 15.0.6, 256 bits)".
     */
    char name[256];
    /**
     * The graphics API: "vulkan", "metal", "dx12" or "gl".
     */
    char backend[16];
    /**
     * "discrete", "integrated", "virtual", "cpu" or "other".
     */
    char device_type[16];
    /**
     * The driver's name and version, where reported.
     */
    char driver[256];
    /**
     * The largest storage binding in bytes; larger tensors run in windows.
     */
    uint64_t max_binding_bytes;
    /**
     * The largest buffer in bytes: the largest tensor the GPU engine can hold.
     */
    uint64_t max_buffer_bytes;
    /**
     * Whether the adapter can time passes with timestamp queries.
     */
    bool timestamps;
} SamAdapterInfo;

/**
 * A log message's severity, for `sam_set_log_callback`: 1 error, 2 warning, 3 info, 4 debug.
 */
typedef uint32_t SamLogLevel;

/**
 * Receives samopt's log messages (for example that backend AUTO fell back to the CPU).
 * `message` is valid only during the call.
 */
typedef void (*SamLogCallback)(SamLogLevel level, const char *message, void *user);

/**
 * Decided at the first registration: the CPU for host buffers (`sam_register_host`), the GPU
 * for tensors the optimizer allocates (`sam_tensor_create`), or the CPU when no GPU adapter
 * exists (logged once).
 */
#define SAM_BACKEND_AUTO 0

/**
 * The fused multithreaded CPU engine.
 */
#define SAM_BACKEND_CPU 1

/**
 * The wgpu compute engine.
 */
#define SAM_BACKEND_GPU 2

/**
 * IEEE 754 binary32.
 */
#define SAM_DTYPE_F32 0

/**
 * IEEE 754 binary16.
 */
#define SAM_DTYPE_F16 1

/**
 * bfloat16.
 */
#define SAM_DTYPE_BF16 2

/**
 * No base optimizer: `sam_second_step` only restores `w`, and the host runs its own optimizer on
 * the gradient it computed at `w + e(w)`, as the PyTorch reference does.
 */
#define SAM_BASE_NONE 0

/**
 * PyTorch's SGD (lr, momentum, dampening, nesterov, weight_decay), fused with the restore.
 */
#define SAM_BASE_SGD 1

/**
 * PyTorch's AdamW (lr, beta1, beta2, adam_eps, weight_decay), fused with the restore.
 */
#define SAM_BASE_ADAMW 2

/**
 * The parameter `w`.
 */
#define SAM_PART_PARAM 0

/**
 * The gradient `g`.
 */
#define SAM_PART_GRAD 1

/**
 * Every step is a SAM step (the default: plain SAM).
 */
#define SAM_SCHEDULE_EVERY 0

/**
 * SAM when `t mod schedule_k == 0`, else a single-gradient step with the plain gradient
 * (MosaicML Composer's `SAMAlgorithm(interval=k)`).
 */
#define SAM_SCHEDULE_INTERVAL 1

/**
 * SAM with probability `schedule_p`, a Bernoulli trial per step from a SplitMix64 generator
 * seeded with `schedule_seed` (RST / SS-SAM, Zhao et al. 2022, arXiv 2203.09962); else the
 * plain gradient.
 */
#define SAM_SCHEDULE_RANDOM 2

/**
 * LookSAM (Liu et al. 2022, arXiv 2203.02714): SAM when `t mod schedule_k == 0`, keeping the
 * part `g_v` of the perturbed gradient orthogonal to the gradient (one f32 buffer per
 * parameter); other steps use `g + looksam_alpha (||g|| / ||g_v||) g_v`. Not with ASAM or GSAM. Without a built-in base
 * optimizer, every gradient must be registered writable (`SAM_REGISTER_GRAD_WRITABLE`): the
 * single-gradient step leaves that direction in the gradient buffers for the host's optimizer.
 */
#define SAM_SCHEDULE_LOOKSAM 3

/**
 * AE-SAM (Jiang et al. 2023, arXiv 2304.14647): SAM when `||g||^2 >= mu + c_t sqrt(s)` (moving mean `mu` and variance `s` of
 * `||g||^2` with forgetting rate `aesam_delta`, `c_t` linear from `aesam_lambda1` to
 * `aesam_lambda2` over `aesam_planned_steps`), else the plain gradient.
 */
#define SAM_SCHEDULE_AESAM 4

/**
 * samopt may write the gradient buffer. It does so in two cases only, both without a built-in
 * base optimizer: the mean gradient of per-shard SAM, and LookSAM's direction on its
 * single-gradient steps. Without the flag, registered gradients are only read.
 */
#define SAM_REGISTER_GRAD_WRITABLE 1

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/**
 * Fills `*config` with the default configuration for a caller whose `SamConfig` has `size`
 * bytes: pass `sizeof(SamConfig)` (the header's inline `sam_config_default()` does). This is the form that keeps working
 * when `SamConfig` grows: a program built against an older header gets exactly its own layout
 * (never more bytes than it reserved), one built against a newer header gets this library's
 * defaults and zeros in the fields this library does not know (which `sam_create` accepts).
 * Sets `config->struct_size = size`.
 *
 * Fails with `SAM_ERR_NULL_POINTER` (config NULL) or `SAM_ERR_INVALID_ARGUMENT` (`size` is not
 * the size of a released layout and not larger than this library's), writing nothing.
 *
 * # Safety
 * `config` must be NULL or writable for `size` bytes.
 */
SamStatus sam_config_init(SamConfig *config,
                          size_t size);

/**
 * This library's `SamConfig` layout: stores the number of fields in `*out_count` and the first
 * `capacity` of them, in declaration order, in `out_fields` (NULL with `capacity` 0 asks for
 * the count; `sizeof(SamConfig)` is the last field's end rounded up to 8). For bindings that
 * mirror the struct in another language: compare each of your fields' offset and size with the
 * library's, by name, when the library is loaded. A binding built for an older layout sees the
 * fields it knows at the same offsets (fields are only ever appended; see `SAM_ABI_VERSION`).
 *
 * Fails with `SAM_ERR_NULL_POINTER` (`out_count` NULL, or `out_fields` NULL with `capacity` >
 * 0), writing nothing.
 *
 * # Safety
 * `out_fields` must be NULL or writable for `capacity` elements; `out_count` NULL or writable.
 */
SamStatus sam_config_layout(SamConfigField *out_fields, size_t capacity, size_t *out_count);

/**
 * Creates an optimizer from `config` and stores its handle in `*out`.
 *
 * Fails with `SAM_ERR_NULL_POINTER` (config or out NULL), `SAM_ERR_INVALID_ARGUMENT` (a wrong
 * `struct_size`, `rho <= 0` or NaN, `eps < 0`, `eta < 0`, an unknown backend, `norm_p < 1`),
 * `SAM_ERR_UNSUPPORTED` (a `norm_p` other than 2 or infinity, or a backend this build lacks).
 * On failure `*out` is left as it was.
 *
 * # Safety
 * `config` must be NULL or point to a `SamConfig` of at least `config->struct_size` bytes; `out`
 * must be NULL or valid for a write.
 */
SamStatus sam_create(const SamConfig *config, SamOptimizer **out);

/**
 * Frees an optimizer. The host's buffers are not touched (between the two steps they keep the
 * perturbed weights). NULL is a no-op.
 *
 * # Safety
 * `opt` must be NULL or a handle from `sam_create` not yet destroyed, with no call on it running.
 */
void sam_destroy(SamOptimizer *opt);

/**
 * Registers a parameter buffer and its gradient buffer, both owned by the host, and stores the
 * tensor's id (0, 1, 2, ... in registration order) in `*out_id`.
 *
 * At every step the plugin reads `grad` and rewrites `param` in place; it never writes `grad`
 * (see `sam_register_host_ex` for the one opt-in exception). The host keeps both alive and in
 * place for the optimizer's lifetime, writes the gradient between calls, and does not touch
 * either while a call runs.
 *
 * Fails, registering nothing, with `SAM_ERR_NULL_POINTER` (any pointer NULL),
 * `SAM_ERR_INVALID_ARGUMENT` (`len` 0, an unknown `dtype`, a pointer not aligned to the element
 * size, a byte size that overflows, `param` and `grad` overlapping, either overlapping a buffer
 * registered before) or `SAM_ERR_INVALID_STATE` (between a first and a second step).
 *
 * # Safety
 * `param` must be valid for reads and writes, and `grad` for reads, of `len` elements of `dtype`
 * for the optimizer's lifetime; `opt` must be NULL or a live handle; `out_id` NULL or writable.
 */
SamStatus sam_register_host(SamOptimizer *opt,
                            void *param,
                            const void *grad,
                            size_t len,
                            SamDType dtype,
                            uint32_t *out_id);

/**
 * `sam_register_host` with `flags`: `SAM_REGISTER_GRAD_WRITABLE` lets samopt write the gradient
 * buffer too. samopt writes a gradient in one case only: per-shard SAM without a built-in base
 * optimizer (`SAM_BASE_NONE`), whose second step leaves the mean of the shards' gradients there
 * for the host's optimizer (`sam_accumulate_step`). Without the flag, gradients are only read;
 * `flags = 0` is `sam_register_host`.
 *
 * Fails as `sam_register_host`, and with `SAM_ERR_INVALID_ARGUMENT` for an unknown flag bit.
 *
 * # Safety
 * As `sam_register_host`; with `SAM_REGISTER_GRAD_WRITABLE`, `grad` must be valid for writes too.
 */
SamStatus sam_register_host_ex(SamOptimizer *opt,
                               void *param,
                               void *grad,
                               size_t len,
                               SamDType dtype,
                               SamRegisterFlags flags,
                               uint32_t *out_id);

/**
 * Re-points tensor `id`, registered with `sam_register_host` or `sam_register_host_ex`, at new
 * buffers of the same length and dtype, keeping its state (momentum, Adam's moments, LookSAM's
 * `g_v`), group and update count: for frameworks that free and reallocate gradients (or weights)
 * between steps, such as PyTorch's `zero_grad()` with its default `set_to_none=True`. `param`
 * must already hold the tensor's weights. Checked as at registration (NULL, alignment, `param`
 * and `grad` disjoint and disjoint from every other tensor's buffers; the tensor's own old
 * buffers may be reused), and refused between the two steps (`SAM_ERR_INVALID_STATE`) or for a
 * tensor that is not in host buffers (`SAM_ERR_INVALID_ARGUMENT`); a refused call changes
 * nothing. The gradient keeps the writability it was registered with. Cheap (no data moves):
 * call it at every step for every tensor if the addresses change that often. When several
 * tensors move at once (one may land where another was), use `sam_rebind_hosts`.
 *
 * # Safety
 * As `sam_register_host` for the new buffers (and `grad` writable if the tensor was registered
 * with `SAM_REGISTER_GRAD_WRITABLE`); samopt never touches the old buffers again.
 */
SamStatus sam_rebind_host(SamOptimizer *opt, uint32_t id, void *param, void *grad);

/**
 * `sam_rebind_host` for `count` tensors at once, all or nothing: tensor `ids[k]` moves to
 * `params[k]` and `grads[k]`. The new buffers are checked against each other and against the
 * tensors that do not move, so one tensor may take over an address another moving tensor held
 * until now, as a framework's caching allocator hands them out after `zero_grad()`. A refused
 * call (the message names the tensor) changes nothing.
 *
 * # Safety
 * `ids`, `params` and `grads` must be NULL or hold `count` elements; each pair of buffers as for
 * `sam_rebind_host`.
 */
SamStatus sam_rebind_hosts(SamOptimizer *opt,
                           size_t count,
                           const uint32_t *ids,
                           void *const *params,
                           void *const *grads);

/**
 * The ascent (first) step: computes one L2 norm over the gradients of every registered tensor,
 * then moves every parameter to `w + e(w)` and keeps `w` for the restore.
 *
 * Returns `SAM_OK` for a SAM step (compute the gradient at the perturbed weights next), or, when
 * the config's `schedule` makes this a single-gradient step, `SAM_STEP_SINGLE_GRADIENT`
 * (positive, not an error): the weights were not moved; skip the second forward/backward and
 * call `sam_second_step` now. One loop serves every schedule:
 *
 * ```c
 * if (sam_first_step(opt) == SAM_OK) { forward_backward(); }   // the second gradient
 * sam_second_step(opt);                                        // restore + update, or update
 * ```
 *
 * With loss scaling (`config.loss_scale`), a gradient holding NaN or infinity is the scale's
 * overflow: the call returns `SAM_STEP_SKIPPED` (positive), nothing moved, the scale was lowered;
 * skip the second forward/backward and call `sam_second_step`, which ends the step as skipped.
 * Without loss scaling it returns `SAM_ERR_NON_FINITE`, with no parameter touched and no decision
 * taken, when any gradient (under ASAM, any weight) holds NaN or infinity; `SAM_ERR_INVALID_STATE` when called
 * twice without a second step in between, or with no tensor registered.
 *
 * # Safety
 * `opt` must be NULL or a live handle whose registered buffers are valid.
 */
SamStatus sam_first_step(SamOptimizer *opt);

/**
 * The second step: restores every parameter to exactly the bits it had before the first step.
 * With `SAM_BASE_NONE` the host then runs its own optimizer with the gradient it computed at
 * `w + e(w)`; with `SAM_BASE_SGD` or `SAM_BASE_ADAMW` the restore and the base update run as one
 * pass (after one reduction over the second gradient: its norm for `max_grad_norm`, its dot
 * product with the first gradient for GSAM, and a finiteness check).
 *
 * After a single-gradient first step (`SAM_STEP_SINGLE_GRADIENT`) nothing is restored: the
 * built-in base optimizer steps with the gradient in the buffers (LookSAM: plus its reused
 * direction); with `SAM_BASE_NONE` the host's optimizer does (LookSAM leaves its direction in the
 * writable gradient buffers).
 *
 * Returns `SAM_OK`; `SAM_STEP_SKIPPED` (positive, not an error) when a built-in base optimizer
 * (or LookSAM, which reduces the second gradient even without one) finds NaN or infinity in the
 * second gradient: weights restored, no update, state untouched (without a base optimizer, skip
 * your own optimizer's step); `SAM_ERR_INVALID_STATE` without a preceding first step.
 *
 * # Safety
 * `opt` must be NULL or a live handle whose registered buffers are valid.
 */
SamStatus sam_second_step(SamOptimizer *opt);

/**
 * SAM over parameters sharded across workers (ZeRO, FSDP, tensor parallel: each worker
 * registers only its own part of the parameters), with the exchange inside `sam_first_step`:
 * installs the host's all-reduce. From then on `sam_first_step` computes the local squared norm
 * `sum (T_w g)^2` over this worker's tensors, sums it over the workers through `callback` (one
 * double, no gradient copied), and perturbs with the square root: the norm over the whole
 * parameter vector, so the workers together take exactly the single-process SAM step. NULL
 * removes it.
 *
 * The three data-parallel cases:
 * - replicated parameters (plain data parallelism): the host all-reduces (averages) the
 *   gradients before `sam_first_step`, so every worker perturbs identically: exact SAM over the
 *   global batch. No all-reduce is installed here; samopt exchanges nothing.
 * - per-worker perturbation (m-sharpness, as the original JAX code across accelerators): each
 *   worker calls plain `sam_first_step` on its own local gradient, and the host all-reduces only
 *   the second gradient before `sam_second_step`. No all-reduce is installed here either.
 * - sharded parameters: this function (or, without a callback, `sam_grad_sq_norm_local`, the
 *   host's all-reduce, then `sam_first_step_with_norm`).
 *
 * With a built-in base optimizer, `sam_second_step` uses the all-reduce too: it sums the second
 * gradient's squared norm and GSAM's dot product `g.g'` (two doubles), so that clipping, GSAM and
 * the skip of a non-finite step are decided over the whole model, the same on every worker.
 *
 * Step schedules decide from these global sums, so every worker takes the same kind of step
 * (`SAM_SCHEDULE_RANDOM` needs the same `schedule_seed` everywhere). Under
 * `SAM_SCHEDULE_LOOKSAM` the first step sums two doubles (the squared norm and `||g_v||^2`) and
 * every second step sums two, with or without a built-in base (`g.g'` for `g_v`); a
 * single-gradient step's second step joins that exchange too, so the count of collectives never
 * depends on the decision.
 *
 * With an all-reduce installed, every `sam_first_step` call (and, with a built-in base or
 * LookSAM, every `sam_second_step` call) joins the exchange exactly once, whatever fails locally (a non-finite
 * gradient, no tensor, a call in the wrong phase, a device error): that worker contributes NaN
 * and returns its own error, and every other worker refuses the step together (the first step
 * with `SAM_ERR_NON_FINITE`, nothing changed; the second with `SAM_STEP_SKIPPED`, weights
 * restored), so none is left waiting in the collective. The only calls that return before the
 * exchange are caller errors no worker can recover from: a NULL handle, and a call made from
 * inside a callback of the same handle. A callback returning non-zero fails the call with
 * `SAM_ERR_CALLBACK` (a first step changes nothing; a second step ends with the weights restored).
 *
 * The callback runs on the calling thread while samopt works on `opt`: it may call `sam_*` on
 * other handles and `sam_last_error`, but a call on `opt` itself is refused with
 * `SAM_ERR_INVALID_STATE` (it would otherwise wait for itself).
 *
 * # Safety
 * `opt` must be NULL or a live handle; `callback`, when set, must be safe to call with `user`
 * from any thread for as long as it is installed.
 */
SamStatus sam_set_allreduce(SamOptimizer *opt,
                            SamAllreduce callback,
                            void *user);

/**
 * Sharded-parameter SAM across workers, step 1 of 2: stores in `*out` the local squared norm
 * `sum (T_w g)^2` over this worker's tensors (one read of the gradients, nothing written). The
 * host sums it over the workers and passes the square root to `sam_first_step_with_norm`.
 * `SAM_ERR_NON_FINITE` when a local gradient holds NaN or infinity (a host that must keep its
 * all-reduce in step can sum NaN then, so that every worker refuses the step).
 *
 * # Safety
 * `opt` must be NULL or a live handle; `out` NULL or writable.
 */
SamStatus sam_grad_sq_norm_local(SamOptimizer *opt, double *out);

/**
 * Sharded-parameter SAM across workers, step 2 of 2: the ascent (as `sam_first_step`) with the
 * given global norm, the square root of the all-reduced `sam_grad_sq_norm_local` values. A NaN or
 * infinite `global_norm` (some worker's gradient was not finite) returns `SAM_ERR_NON_FINITE`
 * with nothing changed; a negative one, or one whose square is below this worker's own squared
 * norm (the sum includes it; 1e-6 relative allowance for an f32 sum), `SAM_ERR_INVALID_ARGUMENT`.
 * The gradients must not change between `sam_grad_sq_norm_local` and this call: its local norm
 * is reused, so the gradients are read once; without it (or after a registration since), this
 * call runs the local norm pass itself.
 *
 * Returns `SAM_OK` or, as `sam_first_step`, `SAM_STEP_SINGLE_GRADIENT` when the schedule
 * decides (from `global_norm`, so alike on every worker) on a single-gradient step.
 * `SAM_SCHEDULE_LOOKSAM` is refused here (`SAM_ERR_UNSUPPORTED`): it needs global sums this
 * call does not exchange; install `sam_set_allreduce` and call `sam_first_step` instead.
 *
 * # Safety
 * `opt` must be NULL or a live handle whose registered buffers are valid.
 */
SamStatus sam_first_step_with_norm(SamOptimizer *opt, double global_norm);

/**
 * Per-shard SAM in one process (m-sharpness): a host that splits its batch into k shards calls,
 * for each shard,
 *
 * ```text
 * gradient of the shard at w       -> the gradient buffers
 * sam_first_step(opt)                 w -> w + e_k(w), the shard's own perturbation
 * gradient of the shard at w + e_k -> the gradient buffers
 * sam_accumulate_step(opt)            w restored exactly, that gradient added to an accumulator
 * ```
 *
 * and after the last shard `sam_second_step(opt)`, which applies the mean of the k perturbed
 * gradients. With a built-in base optimizer the mean stays in samopt's memory and the gradient
 * buffers are only read. Without one (`SAM_BASE_NONE`), the second step writes the mean into the
 * gradient buffers for the host's optimizer: every tensor must then be registered with
 * `sam_register_host_ex(..., SAM_REGISTER_GRAD_WRITABLE, ...)` (or allocated by samopt), which
 * the first `sam_accumulate_step` checks, refusing with `SAM_ERR_INVALID_STATE` and changing
 * nothing otherwise. The CPU backend runs it; `SAM_ERR_UNSUPPORTED` on the GPU for now and with
 * GSAM. `SAM_ERR_INVALID_STATE` without a preceding first step.
 *
 * # Safety
 * `opt` must be NULL or a live handle whose registered buffers are valid.
 */
SamStatus sam_accumulate_step(SamOptimizer *opt);

/**
 * Stores in `*out` the L2 norm `||T_w * g||_2` (plain `||g||_2` without ASAM) that the last
 * successful first step computed, over every registered tensor. Also computed for
 * `norm_p = INFINITY`, where the perturbation does not use it. With loss scaling, of the true
 * gradient (the buffers' divided by the scale). `SAM_ERR_INVALID_STATE` before the
 * first successful first step.
 *
 * # Safety
 * `opt` must be NULL or a live handle; `out` NULL or writable.
 */
SamStatus sam_grad_norm(const SamOptimizer *opt, double *out);

/**
 * Sets the learning rate of the built-in base optimizer from the next second step on: the hook
 * for a learning-rate schedule, called between steps. Groups scale it. `lr` must be finite and
 * >= 0.
 *
 * # Safety
 * `opt` must be NULL or a live handle.
 */
SamStatus sam_set_lr(SamOptimizer *opt, double lr);

/**
 * Stores the current learning rate in `*out`.
 *
 * # Safety
 * `opt` must be NULL or a live handle; `out` NULL or writable.
 */
SamStatus sam_get_lr(const SamOptimizer *opt, double *out);

/**
 * Sets rho from the next first step on: the hook for a rho schedule (GSAM ties rho to the
 * learning rate), called between steps. `rho` must be finite and > 0. Checkpoints carry it.
 *
 * # Safety
 * `opt` must be NULL or a live handle.
 */
SamStatus sam_set_rho(SamOptimizer *opt, double rho);

/**
 * Stores the current rho in `*out`.
 *
 * # Safety
 * `opt` must be NULL or a live handle; `out` NULL or writable.
 */
SamStatus sam_get_rho(const SamOptimizer *opt, double *out);

/**
 * Stores in `*out` the loss scale `S` to multiply the next loss by before its backward pass
 * (1.0 without loss scaling). `sam_second_step` may change it (growth after good steps, backoff
 * after an overflow): a host that runs its own optimizer (`SAM_BASE_NONE`) reads it before
 * `sam_second_step` and divides its gradients by that value.
 *
 * # Safety
 * `opt` must be NULL or a live handle; `out` NULL or writable.
 */
SamStatus sam_get_loss_scale(const SamOptimizer *opt, double *out);

/**
 * Stores the completed steps of each kind, for logging: SAM steps (two gradients) in
 * `*out_sam_steps` and single-gradient steps in `*out_single_steps`. Their sum is
 * `sam_step_count`; gradient evaluations so far are `2 * sam + single`. Either pointer may be
 * NULL to skip it.
 *
 * # Safety
 * `opt` must be NULL or a live handle; each out pointer NULL or writable.
 */
SamStatus sam_schedule_counts(const SamOptimizer *opt,
                              uint64_t *out_sam_steps,
                              uint64_t *out_single_steps);

/**
 * Adds a parameter group, as PyTorch's `param_groups`, and stores its id in `*out_group`: its
 * tensors step with learning rate `lr * lr_scale` and weight decay `weight_decay` (`NAN`: group
 * 0's, the config's). Group 0 exists from the start and holds every tensor until
 * `sam_set_tensor_group` moves it. The gradient norm stays one norm over all groups. The common
 * use: a group with weight decay 0 for biases and normalisation weights.
 *
 * # Safety
 * `opt` must be NULL or a live handle; `out_group` NULL or writable.
 */
SamStatus sam_add_group(SamOptimizer *opt,
                        double lr_scale,
                        double weight_decay,
                        uint32_t *out_group);

/**
 * Moves tensor `id` into `group` (refused between the two steps).
 *
 * # Safety
 * `opt` must be NULL or a live handle.
 */
SamStatus sam_set_tensor_group(SamOptimizer *opt, uint32_t id, uint32_t group);

/**
 * Stores in `*out` the bytes `sam_state_save` writes now (it grows with registrations).
 *
 * # Safety
 * `opt` must be NULL or a live handle; `out` NULL or writable.
 */
SamStatus sam_state_size(const SamOptimizer *opt, size_t *out);

/**
 * Writes a checkpoint of the optimizer's state into `buf` (`len` bytes, at least
 * `sam_state_size`): step counts, learning rate, groups, and the base optimizer's state
 * (momentum, Adam moments, step counts), with a magic number, a version, fingerprints of the
 * configuration and of the registrations, and a checksum. Stores the bytes written in
 * `*out_written` (which may be NULL). Refused with `SAM_ERR_INVALID_STATE` between the two steps.
 *
 * # Safety
 * `opt` must be NULL or a live handle; `buf` NULL or writable for `len` bytes; `out_written`
 * NULL or writable.
 */
SamStatus sam_state_save(SamOptimizer *opt, void *buf, size_t len, size_t *out_written);

/**
 * Restores a checkpoint from `sam_state_save` (`len` bytes at `buf`) into an optimizer created
 * with the same configuration and the same registrations (count, lengths, dtypes, groups), for
 * example in a resumed job. Resuming gives the same bits as a run that never stopped. A
 * truncated or corrupted checkpoint, one of another version, configuration or layout is refused
 * with `SAM_ERR_IO` and a message saying which, and the optimizer is left exactly as it was.
 * Refused with `SAM_ERR_INVALID_STATE` between the two steps.
 *
 * # Safety
 * `opt` must be NULL or a live handle; `buf` NULL or readable for `len` bytes.
 */
SamStatus sam_state_load(SamOptimizer *opt, const void *buf, size_t len);

/**
 * `sam_state_save` to the file `path`: written to a temporary file beside it, flushed to disk
 * and renamed into place, so a crash mid-write never leaves half a checkpoint under `path`.
 *
 * # Safety
 * `opt` must be NULL or a live handle; `path` NULL or a NUL-terminated string.
 */
SamStatus sam_state_save_file(SamOptimizer *opt, const char *path);

/**
 * `sam_state_load` from the file `path`.
 *
 * # Safety
 * `opt` must be NULL or a live handle; `path` NULL or a NUL-terminated string.
 */
SamStatus sam_state_load_file(SamOptimizer *opt, const char *path);

/**
 * The device extensions the host must enable when it creates the `VkDevice` it hands to
 * `sam_create_vulkan` (from `device->instance` and `device->physical_device`; the device itself
 * may not exist yet). Stores the number in `*out_count` and the first `capacity` names (static
 * strings) in `out_names`, which may be NULL to ask for the count. No instance extension is
 * required beyond Vulkan 1.1; no device feature beyond Vulkan 1.1's is used.
 *
 * # Safety
 * `device` must be NULL or valid (see `SamVulkanDevice`); `out_names` NULL or writable for
 * `capacity` pointers; `out_count` NULL or writable.
 */
SamStatus sam_vulkan_required_extensions(const SamVulkanDevice *device,
                                         const char **out_names,
                                         size_t capacity,
                                         size_t *out_count);

/**
 * Creates an optimizer whose GPU engine runs on the host's own Vulkan device and queue, so that
 * `sam_register_vulkan` can register the host's `VkBuffer`s and the passes run on them in place.
 * samopt never destroys the host's instance, device, queue or buffers.
 *
 * The synchronisation contract:
 * - before a step (`sam_first_step`, `sam_second_step`, ...) the host's writes to the registered
 *   buffers (its gradients, its weights) must be complete on the GPU (e.g. its fence waited);
 * - when a samopt call returns, all the GPU work it submitted is complete, so the host may read
 *   and write the buffers at once;
 * - samopt submits to the given queue only inside its own calls; Vulkan requires the host not
 *   to submit to the same `VkQueue` concurrently (give samopt a queue of its own, or do not use
 *   that queue from another thread while a samopt call runs).
 *
 * Fails with `SAM_ERR_NULL_POINTER`, `SAM_ERR_INVALID_ARGUMENT` (wrong `struct_size`, a required
 * device extension missing from `device->device_extensions`, a queue family that does not exist
 * or lacks compute, a queue index past the family's count), `SAM_ERR_UNSUPPORTED`,
 * `SAM_ERR_DEVICE`.
 *
 * # Safety
 * `device` must describe live Vulkan objects created as documented there; `config` and `out` as
 * in `sam_create`.
 */
SamStatus sam_create_vulkan(const SamVulkanDevice *device,
                            const SamConfig *config,
                            SamOptimizer **out);

/**
 * Registers a tensor in the host's `VkBuffer`s (for an optimizer from `sam_create_vulkan`):
 * `len` elements of `dtype` at byte `param_offset` of `param_buffer` and `grad_offset` of
 * `grad_buffer`. The passes read and write them in place; the host keeps owning them (samopt
 * never frees them) and keeps them alive for the optimizer's lifetime. Both buffers need the
 * `VK_BUFFER_USAGE_STORAGE_BUFFER_BIT` usage, offsets a multiple of the device's
 * `minStorageBufferOffsetAlignment`, and the tensor a multiple of 16 bytes.
 *
 * Fails, registering nothing, with `SAM_ERR_NULL_POINTER` (a `VK_NULL_HANDLE` or `out_id` NULL),
 * `SAM_ERR_INVALID_ARGUMENT` (`len` 0, an unknown dtype, a buffer smaller than `offset + len *
 * size`, a misaligned offset, overlapping ranges), `SAM_ERR_UNSUPPORTED` (not a Vulkan optimizer).
 * Vulkan has no query for a buffer's size, so samopt bounds the range by the buffer's memory
 * requirements (`vkGetBufferMemoryRequirements`): a range that ends inside the alignment padding
 * past the size the host created the buffer with is not caught, and stays the host's to avoid.
 *
 * # Safety
 * `opt` must be NULL or a live handle; the buffers must be live `VkBuffer`s of its device.
 */
SamStatus sam_register_vulkan(SamOptimizer *opt,
                              uint64_t param_buffer,
                              uint64_t param_offset,
                              uint64_t grad_buffer,
                              uint64_t grad_offset,
                              size_t len,
                              SamDType dtype,
                              uint32_t *out_id);

/**
 * Re-points tensor `id`, registered with `sam_register_vulkan`, at other `VkBuffer` ranges of
 * the same size, keeping its state (momentum, Adam's moments, LookSAM's `g_v`, master weights):
 * for engines whose allocator hands out new buffers between steps. The new parameter range must
 * hold the weights. Checked as at registration (its own old ranges excepted); refused between the
 * two steps, or for a tensor not registered with `sam_register_vulkan`; a refused call changes
 * nothing. Nothing is copied; the next pass rebuilds the bindings of this tensor's windows.
 *
 * # Safety
 * As `sam_register_vulkan` for the new buffers.
 */
SamStatus sam_rebind_vulkan(SamOptimizer *opt,
                            uint32_t id,
                            uint64_t param_buffer,
                            uint64_t param_offset,
                            uint64_t grad_buffer,
                            uint64_t grad_offset);

/**
 * Stores the number of registered tensors in `*out`.
 *
 * # Safety
 * `opt` must be NULL or a live handle; `out` NULL or writable.
 */
SamStatus sam_tensor_count(const SamOptimizer *opt, size_t *out);

/**
 * Stores in `*out` the number of completed steps, SAM and single-gradient: second steps that were
 * not skipped (with a built-in base optimizer, the number of updates applied, as PyTorch's
 * optimizer step count). `sam_schedule_counts` splits it by kind.
 *
 * # Safety
 * `opt` must be NULL or a live handle; `out` NULL or writable.
 */
SamStatus sam_step_count(const SamOptimizer *opt, uint64_t *out);

/**
 * Stores in `*out` whether the weights are perturbed (between a first and a second step of a SAM
 * step; false during a single-gradient step, whose weights never move).
 *
 * # Safety
 * `opt` must be NULL or a live handle; `out` NULL or writable.
 */
SamStatus sam_is_perturbed(const SamOptimizer *opt, bool *out);

/**
 * Stores in `*out` the backend that runs this optimizer's passes: `SAM_BACKEND_CPU` or
 * `SAM_BACKEND_GPU`, or `SAM_BACKEND_AUTO` while an AUTO optimizer has no tensor yet (its first
 * registration decides).
 *
 * # Safety
 * `opt` must be NULL or a live handle; `out` NULL or writable.
 */
SamStatus sam_get_backend(const SamOptimizer *opt, SamBackend *out);

/**
 * Allocates a parameter/gradient pair of `len` zeros owned by the optimizer and stores its id in
 * `*out_id`: on the GPU backend both live on the device, with the optimizer's state, and the
 * passes run there with no host copy; on the CPU backend they live in host memory. Under
 * `SAM_BACKEND_AUTO` the first such call (before any `sam_register_host`) picks the GPU, or the
 * CPU when no adapter exists. Fill and read them with `sam_tensor_write` and `sam_tensor_read`.
 *
 * Fails with `SAM_ERR_INVALID_ARGUMENT` (`len` 0, unknown dtype, a size over the device's
 * largest buffer), `SAM_ERR_INVALID_STATE` (between the two steps), `SAM_ERR_DEVICE`.
 *
 * # Safety
 * `opt` must be NULL or a live handle; `out_id` NULL or writable.
 */
SamStatus sam_tensor_create(SamOptimizer *opt, size_t len, SamDType dtype, uint32_t *out_id);

/**
 * Copies `len` elements from `src` into the parameter or gradient (`part`) of tensor `id`, which
 * `sam_tensor_create` allocated; `len` must be the tensor's length and `src` hold its dtype.
 * Writing the parameter between the two steps is overwritten by the restore.
 *
 * # Safety
 * `opt` must be NULL or a live handle; `src` NULL or valid for reads of `len` elements.
 */
SamStatus sam_tensor_write(SamOptimizer *opt,
                           uint32_t id,
                           SamTensorPart part,
                           const void *src,
                           size_t len);

/**
 * Copies the parameter or gradient (`part`) of tensor `id`, which `sam_tensor_create`
 * allocated, into `dst` (`len` elements: the tensor's length). Between the two steps the
 * parameter reads as `w + e(w)`. Waits for the device.
 *
 * # Safety
 * `opt` must be NULL or a live handle; `dst` NULL or valid for writes of `len` elements.
 */
SamStatus sam_tensor_read(SamOptimizer *opt,
                          uint32_t id,
                          SamTensorPart part,
                          void *dst,
                          size_t len);

/**
 * Stores in `*out` how many GPU adapters wgpu finds (honouring `WGPU_BACKEND`). Creating the
 * list can take a moment: it starts the graphics drivers.
 *
 * # Safety
 * `out` must be NULL or writable.
 */
SamStatus sam_gpu_adapter_count(size_t *out);

/**
 * Describes adapter `index` (0 is the one `SAM_BACKEND_GPU` picks without `config.adapter` or
 * `SAMOPT_ADAPTER`).
 *
 * # Safety
 * `out` must be NULL or point to a `SamAdapterInfo` whose `struct_size` is set.
 */
SamStatus sam_gpu_adapter_info(size_t index, SamAdapterInfo *out);

/**
 * Describes the adapter this optimizer's GPU backend runs on; `SAM_ERR_UNSUPPORTED` when the
 * backend is the CPU (or AUTO has not decided yet).
 *
 * # Safety
 * `opt` must be NULL or a live handle; `out` NULL or a `SamAdapterInfo` with `struct_size` set.
 */
SamStatus sam_get_adapter_info(const SamOptimizer *opt, SamAdapterInfo *out);

/**
 * Sends samopt's log messages (errors, warnings such as AUTO's fallback to the CPU) to
 * `callback` with `user`, from any thread; NULL stops them. Without a callback, messages go to
 * standard error when the environment sets `SAMOPT_LOG` (to `error`, `warn`, `info` or `debug`).
 *
 * The callback runs without samopt's logging lock, on the thread of the call that logs: it may
 * call `sam_set_log_callback`, `sam_last_error` and `sam_*` on other handles; a call on the
 * handle whose call is logging is refused with `SAM_ERR_INVALID_STATE`.
 */
SamStatus sam_set_log_callback(SamLogCallback callback, void *user);

/**
 * This thread's message for its last failing call, starting with the function's name, e.g.
 * `"sam_register_host: len = 0: a tensor needs at least one element"`. Empty if no call failed on
 * this thread. Never NULL. The string stays valid until the next failing call on this thread:
 * copy it to keep it.
 */
const char *sam_last_error(void);

/**
 * A static, never-NULL description of a status, e.g. `"invalid argument"`; `"unknown status"`
 * for a number that is not a `SamStatus`.
 */
const char *sam_status_string(int32_t status);

/**
 * The library's version, e.g. `"0.1.0"`: static, never NULL.
 */
const char *sam_version(void);

/**
 * The C ABI version of the loaded library; equal to `SAM_ABI_VERSION` of a compatible header.
 */
uint32_t sam_abi_version(void);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* SAMOPT_H */

/* After the include guard's #endif (cbindgen writes the trailer there): guarded on its own. */
#ifndef SAMOPT_H_CONFIG_DEFAULT
#define SAMOPT_H_CONFIG_DEFAULT

/**
 * The default configuration in this header's `SamConfig` layout, with `struct_size` set:
 * rho 0.05, eps 1e-12, no ASAM, p = 2, backend AUTO, all cores, no base optimizer, every step a
 * SAM step. Start every configuration here: `SamConfig config = sam_config_default();`.
 *
 * Inline, so it fills exactly the layout this program was compiled with (through
 * `sam_config_init`, which cannot fail for `sizeof(SamConfig)`); the library's exported symbol of
 * the same name keeps returning the first released layout, for programs built against that
 * header. Bindings that call the library directly use `sam_config_init`.
 */
static inline SamConfig sam_config_default(void) {
    SamConfig config;
    sam_config_init(&config, sizeof config);
    return config;
}
#endif  /* SAMOPT_H_CONFIG_DEFAULT */
