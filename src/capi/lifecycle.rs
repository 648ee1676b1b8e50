//! A handle's life: the configuration, `sam_create`, `sam_destroy`, and registering host buffers.

use std::ffi::{CStr, c_char, c_void};
use std::mem::offset_of;
use std::sync::Mutex;

use super::ffi::{arg_ref, boundary, non_null, read_versioned, write_out, write_versioned};
use super::logging;
use super::types::{
    SAM_BACKEND_AUTO, SAM_BACKEND_CPU, SAM_BACKEND_GPU, SAM_BASE_ADAMW, SAM_BASE_NONE, SAM_BASE_SGD,
    SAM_REGISTER_GRAD_WRITABLE, SAM_SCHEDULE_AESAM, SAM_SCHEDULE_EVERY, SAM_SCHEDULE_INTERVAL, SAM_SCHEDULE_LOOKSAM,
    SAM_SCHEDULE_RANDOM, SamBackend, SamBase, SamDType, SamOptimizer, SamRegisterFlags, SamSchedule, SamStatus,
    dtype_from_c,
};
use crate::config::{Backend, BaseOptimizer, Config, LossScale, Norm, Schedule};
use crate::engine::Optimizer;
use crate::error::{Error, Result};

/// Configuration of an optimizer. Always start from `sam_config_default()` (or
/// `sam_config_init`), which also sets `struct_size`, then change the fields you need.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamConfig {
    /// `sizeof(SamConfig)` as the caller compiled it; lets the struct grow in later versions
    /// without breaking programs built against older headers.
    pub struct_size: usize,
    /// Radius of the perturbation ball; finite and > 0. Default 0.05 (ASAM: about 2.0).
    pub rho: f64,
    /// Added to the gradient norm before dividing by it; finite and >= 0. Default 1e-12.
    pub eps: f64,
    /// ASAM's offset in `T_w = |w| + eta`; finite and >= 0. Default 0.0.
    pub eta: f64,
    /// The norm of the ball: 2.0 (default) or `INFINITY` (the sign perturbation).
    pub norm_p: f64,
    /// Adaptive SAM (ASAM): scale the ascent elementwise by `T_w`. Default false.
    pub adaptive: bool,
    /// A `SAM_BACKEND_*` value. Default `SAM_BACKEND_AUTO`.
    pub backend: SamBackend,
    /// Worker threads of the CPU engine, at most 1024. 0 (default) shares one process-wide pool
    /// with a worker per available core among all handles; a number gives this handle its own,
    /// whose threads `sam_destroy` joins.
    pub num_threads: u32,
    /// The GPU adapter: its index in the list `samopt info` prints, or a case-insensitive part of
    /// its name. NULL (default): the `SAMOPT_ADAPTER` environment variable, else the best adapter
    /// (discrete, integrated, virtual, CPU). `WGPU_BACKEND=vulkan|gl|...` limits the APIs searched.
    /// Read during `sam_create` only.
    pub adapter: *const c_char,
    /// A `SAM_BASE_*` value. Default `SAM_BASE_NONE`.
    pub base: SamBase,
    /// Learning rate, >= 0 (1e-3). Change it between steps with `sam_set_lr`.
    pub lr: f64,
    /// SGD momentum, >= 0 (0).
    pub momentum: f64,
    /// SGD dampening (0).
    pub dampening: f64,
    /// SGD Nesterov momentum (false); needs momentum > 0 and dampening 0.
    pub nesterov: bool,
    /// Weight decay of group 0, >= 0. `NAN` (default): PyTorch's default for the base optimizer,
    /// 0 for SGD and 1e-2 for AdamW.
    pub weight_decay: f64,
    /// AdamW's beta1, in [0, 1) (0.9).
    pub beta1: f64,
    /// AdamW's beta2, in [0, 1) (0.999).
    pub beta2: f64,
    /// AdamW's epsilon, >= 0 (1e-8).
    pub adam_eps: f64,
    /// Clip the second (perturbed) gradient to this global L2 norm before the base update, as
    /// `torch.nn.utils.clip_grad_norm_` does; 0 (default) turns clipping off. Needs a built-in base
    /// optimizer. (Clipping the first gradient would change nothing: the perturbation divides by
    /// its norm.) On a single-gradient step the factor comes from that step's `||g||`.
    pub max_grad_norm: f64,
    /// GSAM's alpha: step with `g' - alpha * g_perp`, `g_perp = g - (g.g' / ||g'||^2) g'`, with `g`
    /// the first gradient (the first step keeps a copy) and `g'` the second; 0 (default) is plain
    /// SAM. Needs a built-in base optimizer. A schedule's single-gradient steps step with `g`.
    pub gsam_alpha: f64,

    // ---- Added in samopt 0.2 (the second `SamConfig` layout): step schedules, mixed precision ----
    /// A `SAM_SCHEDULE_*` value: which steps are SAM steps and which single-gradient steps
    /// (`sam_first_step` returns `SAM_STEP_SINGLE_GRADIENT` for those). Default
    /// `SAM_SCHEDULE_EVERY`.
    pub schedule: SamSchedule,
    /// The period `k >= 1` of `SAM_SCHEDULE_INTERVAL` and `SAM_SCHEDULE_LOOKSAM` (10).
    pub schedule_k: u64,
    /// The probability of a SAM step under `SAM_SCHEDULE_RANDOM`, in [0, 1] (0.5).
    pub schedule_p: f64,
    /// The seed of `SAM_SCHEDULE_RANDOM`'s generator (0). The same seed on every worker gives the
    /// same decisions everywhere.
    pub schedule_seed: u64,
    /// LookSAM's weight of the reused direction, finite and >= 0 (0.7, the paper's).
    pub looksam_alpha: f64,
    /// AE-SAM's forgetting rate of the moving averages, in [0, 1) (0.9, the paper's).
    pub aesam_delta: f64,
    /// AE-SAM's threshold coefficient at step 0 (-1.0).
    pub aesam_lambda1: f64,
    /// AE-SAM's threshold coefficient from step `aesam_planned_steps` on (1.0).
    pub aesam_lambda2: f64,
    /// The steps over which AE-SAM's coefficient moves, usually the planned length of training;
    /// required (>= 1) under `SAM_SCHEDULE_AESAM`. Default 0.
    pub aesam_planned_steps: u64,
    /// Loss scaling, as PyTorch's `GradScaler`: the initial scale `S` (finite, > 0; 65536.0 is
    /// GradScaler's), or 0 (default) for none. Multiply the loss by `sam_get_loss_scale()` before
    /// each backward pass; samopt unscales inside its passes (the perturbation needs no unscale;
    /// the base update, clipping and GSAM use `g/S`), and a step with inf or NaN in either gradient
    /// is skipped (`SAM_STEP_SKIPPED`, weights exactly restored) and lowers `S`.
    pub loss_scale: f64,
    /// `S` is multiplied by this after `loss_scale_interval` consecutive good steps (2.0; 1.0
    /// with `loss_scale_backoff` 1.0 keeps the scale fixed).
    pub loss_scale_growth: f64,
    /// `S` is multiplied by this at a step with inf or NaN, in (0, 1] (0.5).
    pub loss_scale_backoff: f64,
    /// Consecutive good steps before `S` grows, >= 1 (2000).
    pub loss_scale_interval: u64,
    /// f32 master weights for f16 and bf16 tensors (false): samopt keeps an f32 copy of each such
    /// weight, the base optimizer updates the copy, and the host's tensor receives it rounded, so
    /// updates below half a unit in the last place are not lost. Taken from the weights at a
    /// tensor's first update, authoritative afterwards, and in checkpoints. Needs a built-in base.
    pub master_weights: bool,
    /// With `SAM_BASE_ADAMW`: perturb along AdamW's preconditioned gradient,
    /// `e = rho P g / ||P g||`, `P = 1 / (sqrt(v_hat) + adam_eps)` (plain SAM for a tensor before
    /// its first update), as preconditioned SAM in Functional-SAM (arXiv 2502.02407). False by
    /// default. Not with ASAM or `norm_p = INFINITY`.
    pub preconditioned: bool,
}

/// The first released `SamConfig` layout (ABI 1, samopt 0.1), which the exported symbol
/// `sam_config_default` returns by value forever: a program built against that header reserved
/// exactly this many bytes for the result. The header hides this type and that symbol behind an
/// inline `sam_config_default()` that fills the header's own layout through `sam_config_init`.
#[doc(hidden)]
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamConfigAbi1 {
    pub struct_size: usize,
    pub rho: f64,
    pub eps: f64,
    pub eta: f64,
    pub norm_p: f64,
    pub adaptive: bool,
    pub backend: SamBackend,
    pub num_threads: u32,
    pub adapter: *const c_char,
    pub base: SamBase,
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    pub max_grad_norm: f64,
    pub gsam_alpha: f64,
}

/// The sizes of every released `SamConfig` layout, oldest first: ABI 1 (samopt 0.1), then
/// today's, which adds the step schedule.
pub(super) const CONFIG_SIZES: [usize; 2] = [size_of::<SamConfigAbi1>(), size_of::<SamConfig>()];

impl Default for SamConfig {
    /// The default configuration in today's layout, as the header's `sam_config_default()` gives
    /// it to C: rho 0.05, eps 1e-12, no ASAM, p = 2, backend AUTO, all cores, no base optimizer,
    /// every step a SAM step, `struct_size = size_of::<SamConfig>()`.
    fn default() -> SamConfig {
        let d = Config::default();
        SamConfig {
            struct_size: size_of::<SamConfig>(),
            rho: d.rho,
            eps: d.eps,
            eta: d.eta,
            norm_p: d.norm.p(),
            adaptive: d.adaptive,
            backend: SAM_BACKEND_AUTO,
            num_threads: 0,
            adapter: std::ptr::null(),
            base: SAM_BASE_NONE,
            lr: d.lr,
            momentum: d.momentum,
            dampening: d.dampening,
            nesterov: d.nesterov,
            weight_decay: f64::NAN,
            beta1: d.beta1,
            beta2: d.beta2,
            adam_eps: d.adam_eps,
            max_grad_norm: 0.0,
            gsam_alpha: 0.0,
            schedule: SAM_SCHEDULE_EVERY,
            schedule_k: 10,
            schedule_p: 0.5,
            schedule_seed: 0,
            looksam_alpha: 0.7,
            aesam_delta: 0.9,
            aesam_lambda1: -1.0,
            aesam_lambda2: 1.0,
            aesam_planned_steps: 0,
            loss_scale: 0.0,
            loss_scale_growth: 2.0,
            loss_scale_backoff: 0.5,
            loss_scale_interval: 2000,
            master_weights: false,
            preconditioned: false,
        }
    }
}

/// Reads a caller's config, honouring its `struct_size` (see [`read_versioned`]).
///
/// # Safety
/// A non-null `ptr` must point to at least `struct_size` readable bytes.
pub(super) unsafe fn read_config(ptr: *const SamConfig) -> Result<Config> {
    let bools = [
        ("adaptive", offset_of!(SamConfig, adaptive)),
        ("nesterov", offset_of!(SamConfig, nesterov)),
        ("master_weights", offset_of!(SamConfig, master_weights)),
        ("preconditioned", offset_of!(SamConfig, preconditioned)),
    ];
    // SAFETY: the caller's contract.
    let c = unsafe { read_versioned(ptr, "config", &CONFIG_SIZES, SamConfig::default(), &bools) }?;
    let backend = match c.backend {
        SAM_BACKEND_AUTO => Backend::Auto,
        SAM_BACKEND_CPU => Backend::Cpu,
        SAM_BACKEND_GPU => Backend::Gpu,
        other => {
            return Err(Error::invalid(format!("config->backend = {other}: not a SamBackend (0 AUTO, 1 CPU, 2 GPU)")));
        }
    };
    let norm = Norm::from_p(c.norm_p).map_err(|e| Error::new(e.kind(), format!("config->{}", e.message())))?;
    let adapter = if c.adapter.is_null() {
        None
    } else {
        // SAFETY: a non-NULL adapter is a NUL-terminated string (the caller's contract).
        let name = unsafe { CStr::from_ptr(c.adapter) };
        Some(name.to_str().map_err(|_| Error::invalid("config->adapter is not UTF-8"))?.to_owned())
    };
    let base = match c.base {
        SAM_BASE_NONE => BaseOptimizer::None,
        SAM_BASE_SGD => BaseOptimizer::Sgd,
        SAM_BASE_ADAMW => BaseOptimizer::AdamW,
        other => {
            return Err(Error::invalid(format!("config->base = {other}: not a SamBase (0 NONE, 1 SGD, 2 ADAMW)")));
        }
    };
    let schedule = match c.schedule {
        SAM_SCHEDULE_EVERY => Schedule::Every,
        SAM_SCHEDULE_INTERVAL => Schedule::Interval { k: c.schedule_k },
        SAM_SCHEDULE_RANDOM => Schedule::Random { p: c.schedule_p, seed: c.schedule_seed },
        SAM_SCHEDULE_LOOKSAM => Schedule::LookSam { k: c.schedule_k, alpha: c.looksam_alpha },
        SAM_SCHEDULE_AESAM => Schedule::AeSam {
            delta: c.aesam_delta,
            lambda1: c.aesam_lambda1,
            lambda2: c.aesam_lambda2,
            planned_steps: c.aesam_planned_steps,
        },
        other => {
            return Err(Error::invalid(format!(
                "config->schedule = {other}: not a SamSchedule (0 EVERY, 1 INTERVAL, 2 RANDOM, 3 LOOKSAM, 4 AESAM)"
            )));
        }
    };
    let loss_scale = (c.loss_scale != 0.0).then_some(LossScale {
        init: c.loss_scale,
        growth_factor: c.loss_scale_growth,
        backoff_factor: c.loss_scale_backoff,
        growth_interval: c.loss_scale_interval,
    });
    let config = Config {
        master_weights: c.master_weights,
        preconditioned: c.preconditioned,
        loss_scale,
        schedule,
        base,
        lr: c.lr,
        momentum: c.momentum,
        dampening: c.dampening,
        nesterov: c.nesterov,
        weight_decay: (!c.weight_decay.is_nan()).then_some(c.weight_decay),
        beta1: c.beta1,
        beta2: c.beta2,
        adam_eps: c.adam_eps,
        max_grad_norm: (c.max_grad_norm != 0.0).then_some(c.max_grad_norm),
        gsam_alpha: (c.gsam_alpha != 0.0).then_some(c.gsam_alpha),
        adapter,
        rho: c.rho,
        eps: c.eps,
        adaptive: c.adaptive,
        eta: c.eta,
        norm,
        backend,
        threads: c.num_threads as usize,
    };
    config.validate().map_err(|e| Error::new(e.kind(), format!("config->{}", e.message())))?;
    Ok(config)
}

/// The default configuration in the first released `SamConfig` layout (ABI 1), for programs
/// built against that header. The header replaces this symbol with an inline function of the same
/// name that fills the header's own layout through `sam_config_init`, so
/// `SamConfig c = sam_config_default();` is right whichever header a program was built against.
/// Bindings that call the symbol directly get the ABI-1 layout: use `sam_config_init`.
#[unsafe(no_mangle)]
pub extern "C" fn sam_config_default() -> SamConfigAbi1 {
    let d = SamConfig::default();
    SamConfigAbi1 {
        struct_size: size_of::<SamConfigAbi1>(),
        rho: d.rho,
        eps: d.eps,
        eta: d.eta,
        norm_p: d.norm_p,
        adaptive: d.adaptive,
        backend: d.backend,
        num_threads: d.num_threads,
        adapter: d.adapter,
        base: d.base,
        lr: d.lr,
        momentum: d.momentum,
        dampening: d.dampening,
        nesterov: d.nesterov,
        weight_decay: d.weight_decay,
        beta1: d.beta1,
        beta2: d.beta2,
        adam_eps: d.adam_eps,
        max_grad_norm: d.max_grad_norm,
        gsam_alpha: d.gsam_alpha,
    }
}

/// Fills `*config` with the default configuration for a caller whose `SamConfig` has `size`
/// bytes: pass `sizeof(SamConfig)` (the header's inline `sam_config_default()` does). This is the form that keeps working
/// when `SamConfig` grows: a program built against an older header gets exactly its own layout
/// (never more bytes than it reserved), one built against a newer header gets this library's
/// defaults and zeros in the fields this library does not know (which `sam_create` accepts).
/// Sets `config->struct_size = size`.
///
/// Fails with `SAM_ERR_NULL_POINTER` (config NULL) or `SAM_ERR_INVALID_ARGUMENT` (`size` is not
/// the size of a released layout and not larger than this library's), writing nothing.
///
/// # Safety
/// `config` must be NULL or writable for `size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_config_init(config: *mut SamConfig, size: usize) -> SamStatus {
    boundary("sam_config_init", || {
        // SAFETY: the caller's contract.
        unsafe { write_versioned(config, "config", size, "size", &CONFIG_SIZES, SamConfig::default()) }
    })
}

/// One field of `SamConfig` as this library lays it out: what `sam_config_layout` reports, so
/// that a binding which declares its own copy of the struct (Julia's `SamOpt`, a Python `ctypes`
/// mirror) can check it field by field against the library it loaded instead of trusting a copy.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SamConfigField {
    /// The field's name as `samopt.h` spells it (a static NUL-terminated string).
    pub name: *const c_char,
    /// `offsetof(SamConfig, name)` in bytes.
    pub offset: usize,
    /// `sizeof` the field in bytes.
    pub size: usize,
}

/// The size of a field, named by a projection (offset_of! has no size counterpart).
fn field_size<T>(_: fn(&SamConfig) -> &T) -> usize {
    size_of::<T>()
}

/// Every field of [`SamConfig`] in declaration order, with its offset and size; a test checks the
/// names against the generated header, so a field added to the struct and not here fails it.
macro_rules! config_fields {
    ($($field:ident),* $(,)?) => {
        [$((concat!(stringify!($field), "\0"), offset_of!(SamConfig, $field), field_size(|c: &SamConfig| &c.$field))),*]
    };
}

fn config_fields() -> [(&'static str, usize, usize); 35] {
    config_fields!(
        struct_size,
        rho,
        eps,
        eta,
        norm_p,
        adaptive,
        backend,
        num_threads,
        adapter,
        base,
        lr,
        momentum,
        dampening,
        nesterov,
        weight_decay,
        beta1,
        beta2,
        adam_eps,
        max_grad_norm,
        gsam_alpha,
        schedule,
        schedule_k,
        schedule_p,
        schedule_seed,
        looksam_alpha,
        aesam_delta,
        aesam_lambda1,
        aesam_lambda2,
        aesam_planned_steps,
        loss_scale,
        loss_scale_growth,
        loss_scale_backoff,
        loss_scale_interval,
        master_weights,
        preconditioned,
    )
}

/// This library's `SamConfig` layout: stores the number of fields in `*out_count` and the first
/// `capacity` of them, in declaration order, in `out_fields` (NULL with `capacity` 0 asks for
/// the count; `sizeof(SamConfig)` is the last field's end rounded up to 8). For bindings that
/// mirror the struct in another language: compare each of your fields' offset and size with the
/// library's, by name, when the library is loaded. A binding built for an older layout sees the
/// fields it knows at the same offsets (fields are only ever appended; see `SAM_ABI_VERSION`).
///
/// Fails with `SAM_ERR_NULL_POINTER` (`out_count` NULL, or `out_fields` NULL with `capacity` >
/// 0), writing nothing.
///
/// # Safety
/// `out_fields` must be NULL or writable for `capacity` elements; `out_count` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_config_layout(
    out_fields: *mut SamConfigField,
    capacity: usize,
    out_count: *mut usize,
) -> SamStatus {
    boundary("sam_config_layout", || {
        non_null(out_count, "out_count")?;
        if capacity > 0 {
            non_null(out_fields, "out_fields")?;
        }
        let fields = config_fields();
        for (i, &(name, offset, size)) in fields.iter().take(capacity).enumerate() {
            let field = SamConfigField { name: name.as_ptr().cast(), offset, size };
            // SAFETY: writable for `capacity` elements (the caller's contract).
            unsafe { out_fields.add(i).write(field) };
        }
        // SAFETY: checked non-null.
        unsafe { write_out(out_count, "out_count", fields.len()) }
    })
}

/// Creates an optimizer from `config` and stores its handle in `*out`.
///
/// Fails with `SAM_ERR_NULL_POINTER` (config or out NULL), `SAM_ERR_INVALID_ARGUMENT` (a wrong
/// `struct_size`, `rho <= 0` or NaN, `eps < 0`, `eta < 0`, an unknown backend, `norm_p < 1`),
/// `SAM_ERR_UNSUPPORTED` (a `norm_p` other than 2 or infinity, or a backend this build lacks).
/// On failure `*out` is left as it was.
///
/// # Safety
/// `config` must be NULL or point to a `SamConfig` of at least `config->struct_size` bytes; `out`
/// must be NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_create(config: *const SamConfig, out: *mut *mut SamOptimizer) -> SamStatus {
    boundary("sam_create", || {
        logging::install();
        non_null(out, "out")?;
        // SAFETY: the caller's contract.
        let config = unsafe { read_config(config) }?;
        let opt = Optimizer::new(config)?;
        let handle = Box::into_raw(Box::new(SamOptimizer { inner: Mutex::new(opt) }));
        // SAFETY: checked non-null above.
        unsafe { write_out(out, "out", handle) }
    })
}

/// Frees an optimizer. The host's buffers are not touched (between the two steps they keep the
/// perturbed weights). NULL is a no-op.
///
/// # Safety
/// `opt` must be NULL or a handle from `sam_create` not yet destroyed, with no call on it running.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_destroy(opt: *mut SamOptimizer) {
    if opt.is_null() {
        return;
    }
    boundary("sam_destroy", || {
        // SAFETY: the caller's contract: a live handle. Inside a callback of a call on this very
        // handle, freeing it would pull the optimizer from under that call: refused (leaked).
        unsafe { &*opt }.lock()?;
        // SAFETY: the caller's contract: a live handle from `sam_create`, freed once.
        drop(unsafe { Box::from_raw(opt) });
        Ok(())
    });
}

/// Registers a parameter buffer and its gradient buffer, both owned by the host, and stores the
/// tensor's id (0, 1, 2, ... in registration order) in `*out_id`.
///
/// At every step the plugin reads `grad` and rewrites `param` in place; it never writes `grad`
/// (see `sam_register_host_ex` for the one opt-in exception). The host keeps both alive and in
/// place for the optimizer's lifetime, writes the gradient between calls, and does not touch
/// either while a call runs.
///
/// Fails, registering nothing, with `SAM_ERR_NULL_POINTER` (any pointer NULL),
/// `SAM_ERR_INVALID_ARGUMENT` (`len` 0, an unknown `dtype`, a pointer not aligned to the element
/// size, a byte size that overflows, `param` and `grad` overlapping, either overlapping a buffer
/// registered before) or `SAM_ERR_INVALID_STATE` (between a first and a second step).
///
/// # Safety
/// `param` must be valid for reads and writes, and `grad` for reads, of `len` elements of `dtype`
/// for the optimizer's lifetime; `opt` must be NULL or a live handle; `out_id` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_register_host(
    opt: *mut SamOptimizer,
    param: *mut c_void,
    grad: *const c_void,
    len: usize,
    dtype: SamDType,
    out_id: *mut u32,
) -> SamStatus {
    // SAFETY: the caller's contract, passed on; flags 0: `grad` is only read.
    boundary("sam_register_host", || unsafe { register_host(opt, param, grad.cast_mut(), len, dtype, 0, out_id) })
}

/// `sam_register_host` with `flags`: `SAM_REGISTER_GRAD_WRITABLE` lets samopt write the gradient
/// buffer too. samopt writes a gradient in one case only: per-shard SAM without a built-in base
/// optimizer (`SAM_BASE_NONE`), whose second step leaves the mean of the shards' gradients there
/// for the host's optimizer (`sam_accumulate_step`). Without the flag, gradients are only read;
/// `flags = 0` is `sam_register_host`.
///
/// Fails as `sam_register_host`, and with `SAM_ERR_INVALID_ARGUMENT` for an unknown flag bit.
///
/// # Safety
/// As `sam_register_host`; with `SAM_REGISTER_GRAD_WRITABLE`, `grad` must be valid for writes too.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_register_host_ex(
    opt: *mut SamOptimizer,
    param: *mut c_void,
    grad: *mut c_void,
    len: usize,
    dtype: SamDType,
    flags: SamRegisterFlags,
    out_id: *mut u32,
) -> SamStatus {
    // SAFETY: the caller's contract, passed on.
    boundary("sam_register_host_ex", || unsafe { register_host(opt, param, grad, len, dtype, flags, out_id) })
}

/// Re-points tensor `id`, registered with `sam_register_host` or `sam_register_host_ex`, at new
/// buffers of the same length and dtype, keeping its state (momentum, Adam's moments, LookSAM's
/// `g_v`), group and update count: for frameworks that free and reallocate gradients (or weights)
/// between steps, such as PyTorch's `zero_grad()` with its default `set_to_none=True`. `param`
/// must already hold the tensor's weights. Checked as at registration (NULL, alignment, `param`
/// and `grad` disjoint and disjoint from every other tensor's buffers; the tensor's own old
/// buffers may be reused), and refused between the two steps (`SAM_ERR_INVALID_STATE`) or for a
/// tensor that is not in host buffers (`SAM_ERR_INVALID_ARGUMENT`); a refused call changes
/// nothing. The gradient keeps the writability it was registered with. Cheap (no data moves):
/// call it at every step for every tensor if the addresses change that often. When several
/// tensors move at once (one may land where another was), use `sam_rebind_hosts`.
///
/// # Safety
/// As `sam_register_host` for the new buffers (and `grad` writable if the tensor was registered
/// with `SAM_REGISTER_GRAD_WRITABLE`); samopt never touches the old buffers again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_rebind_host(
    opt: *mut SamOptimizer,
    id: u32,
    param: *mut c_void,
    grad: *mut c_void,
) -> SamStatus {
    boundary("sam_rebind_host", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        non_null(param, "param")?;
        non_null(grad, "grad")?;
        // SAFETY: the host's promise about the new buffers, passed on.
        unsafe { opt.lock()?.rebind_host_raw(id, param.cast(), grad.cast_const().cast()) }
    })
}

/// `sam_rebind_host` for `count` tensors at once, all or nothing: tensor `ids[k]` moves to
/// `params[k]` and `grads[k]`. The new buffers are checked against each other and against the
/// tensors that do not move, so one tensor may take over an address another moving tensor held
/// until now, as a framework's caching allocator hands them out after `zero_grad()`. A refused
/// call (the message names the tensor) changes nothing.
///
/// # Safety
/// `ids`, `params` and `grads` must be NULL or hold `count` elements; each pair of buffers as for
/// `sam_rebind_host`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_rebind_hosts(
    opt: *mut SamOptimizer,
    count: usize,
    ids: *const u32,
    params: *const *mut c_void,
    grads: *const *mut c_void,
) -> SamStatus {
    boundary("sam_rebind_hosts", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        if count == 0 {
            return Ok(());
        }
        non_null(ids, "ids")?;
        non_null(params, "params")?;
        non_null(grads, "grads")?;
        // SAFETY: the caller's contract: `count` elements each.
        let (ids, params, grads) = unsafe {
            (
                std::slice::from_raw_parts(ids, count),
                std::slice::from_raw_parts(params, count),
                std::slice::from_raw_parts(grads, count),
            )
        };
        let items: Vec<(u32, *mut u8, *const u8)> =
            (0..count).map(|k| (ids[k], params[k].cast::<u8>(), grads[k].cast_const().cast::<u8>())).collect();
        // SAFETY: the host's promise about the new buffers, passed on.
        unsafe { opt.lock()?.rebind_hosts_raw(&items) }
    })
}

/// The body of `sam_register_host` and `sam_register_host_ex`.
///
/// # Safety
/// As `sam_register_host_ex`; `grad` is written only with `SAM_REGISTER_GRAD_WRITABLE`.
unsafe fn register_host(
    opt: *mut SamOptimizer,
    param: *mut c_void,
    grad: *mut c_void,
    len: usize,
    dtype: SamDType,
    flags: SamRegisterFlags,
    out_id: *mut u32,
) -> Result<()> {
    // SAFETY: the caller's contract.
    let opt = unsafe { arg_ref(opt, "opt") }?;
    non_null(param, "param")?;
    non_null(grad, "grad")?;
    non_null(out_id, "out_id")?;
    let dtype = dtype_from_c(dtype)?;
    if flags & !SAM_REGISTER_GRAD_WRITABLE != 0 {
        return Err(Error::invalid(format!(
            "flags = {flags:#x}: unknown bits {:#x} (known: SAM_REGISTER_GRAD_WRITABLE = 1)",
            flags & !SAM_REGISTER_GRAD_WRITABLE
        )));
    }
    let mut inner = opt.lock()?;
    // SAFETY: the host's promise about the buffers, passed on.
    let id = unsafe {
        if flags & SAM_REGISTER_GRAD_WRITABLE != 0 {
            inner.register_host_writable_raw(param.cast(), grad.cast(), len, dtype)
        } else {
            inner.register_host_raw(param.cast(), grad.cast(), len, dtype)
        }
    }?;
    // SAFETY: checked non-null above.
    unsafe { write_out(out_id, "out_id", id) }
}
