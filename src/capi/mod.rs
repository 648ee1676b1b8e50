//! The C ABI: `include/samopt.h` is generated from this module by cbindgen.
//!
//! This layer only translates and checks: every function runs inside one panic boundary, turns
//! pointers into references through helpers that name the argument when it is NULL, reads enums as
//! plain integers so that an out-of-range value is an error rather than undefined behaviour, and
//! hands the work to [`Optimizer`]. A failing call returns a negative [`SamStatus`], sets this
//! thread's [`sam_last_error`] message and changes nothing.
//!
//! A handle may be used from any thread; calls on one handle are serialised by a lock.

mod ffi;
mod logging;

use std::ffi::{CStr, c_char, c_void};
use std::sync::{Mutex, MutexGuard};

use crate::config::{Backend, BaseOptimizer, Config, Norm};
use crate::dtype::DType;
use crate::engine::{Optimizer, Phase, SecondStep};
use crate::error::{Error, ErrorKind, Result};
use ffi::{arg_ref, boundary, boundary_status, non_null, write_out};

/// Version of the C ABI: bumped on any incompatible change to a signature or struct layout.
/// Compare `sam_abi_version()` with `SAM_ABI_VERSION` from the header you compiled against.
pub const SAM_ABI_VERSION: u32 = 1;

/// The result of every fallible call. `SAM_OK` is 0, errors are negative, non-fatal outcomes are
/// positive, and a number never changes meaning (retired numbers are not reused).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum SamStatus {
    /// Success.
    SAM_OK = 0,
    /// Not an error: `sam_second_step` found NaN or infinity in the second gradient, restored the
    /// weights exactly, and skipped the base update (its state and step count untouched). A
    /// loss-scaled loop lowers its scale and goes on.
    SAM_STEP_SKIPPED = 1,
    /// A required pointer argument was NULL.
    SAM_ERR_NULL_POINTER = -1,
    /// An argument had a value the call cannot accept; the message names it.
    SAM_ERR_INVALID_ARGUMENT = -2,
    /// The call is not allowed now: a second step before a first step, a first step twice,
    /// registering while the weights are perturbed.
    SAM_ERR_INVALID_STATE = -3,
    /// A gradient held NaN or infinity: no parameter was changed. A loss-scaled loop lowers its
    /// scale and retries.
    SAM_ERR_NON_FINITE = -4,
    /// Valid, but not supported by this build or backend.
    SAM_ERR_UNSUPPORTED = -5,
    /// The GPU device or driver failed.
    SAM_ERR_DEVICE = -6,
    /// Reading or writing a file or a serialized state failed.
    SAM_ERR_IO = -7,
    /// The optimizer's state could not be allocated.
    SAM_ERR_OUT_OF_MEMORY = -8,
    /// A bug in samopt (a caught panic); please report the message.
    SAM_ERR_INTERNAL = -9,
    /// A callback the host registered (the all-reduce of `sam_set_allreduce`) returned non-zero;
    /// nothing was changed.
    SAM_ERR_CALLBACK = -10,
}

/// Which engine runs the passes: one of the `SAM_BACKEND_*` values.
pub type SamBackend = u32;
/// Decided at the first registration: the CPU for host buffers (`sam_register_host`), the GPU
/// for tensors the optimizer allocates (`sam_tensor_create`), or the CPU when no GPU adapter
/// exists (logged once).
pub const SAM_BACKEND_AUTO: SamBackend = 0;
/// The fused multithreaded CPU engine.
pub const SAM_BACKEND_CPU: SamBackend = 1;
/// The wgpu compute engine.
pub const SAM_BACKEND_GPU: SamBackend = 2;

/// Element type of a parameter and its gradient: one of the `SAM_DTYPE_*` values.
pub type SamDType = u32;
/// IEEE 754 binary32.
pub const SAM_DTYPE_F32: SamDType = 0;
/// IEEE 754 binary16.
pub const SAM_DTYPE_F16: SamDType = 1;
/// bfloat16.
pub const SAM_DTYPE_BF16: SamDType = 2;

/// The base optimizer of the second step: one of the `SAM_BASE_*` values.
pub type SamBase = u32;
/// No base optimizer: `sam_second_step` only restores `w`, and the host runs its own optimizer on
/// the gradient it computed at `w + e(w)`, as the PyTorch reference does.
pub const SAM_BASE_NONE: SamBase = 0;
/// PyTorch's SGD (lr, momentum, dampening, nesterov, weight_decay), fused with the restore.
pub const SAM_BASE_SGD: SamBase = 1;
/// PyTorch's AdamW (lr, beta1, beta2, adam_eps, weight_decay), fused with the restore.
pub const SAM_BASE_ADAMW: SamBase = 2;

/// Which buffer of an optimizer-allocated tensor: one of the `SAM_PART_*` values.
pub type SamTensorPart = u32;
/// The parameter `w`.
pub const SAM_PART_PARAM: SamTensorPart = 0;
/// The gradient `g`.
pub const SAM_PART_GRAD: SamTensorPart = 1;

/// A GPU adapter, as `sam_gpu_adapter_info` and `sam_get_adapter_info` report it. Set
/// `struct_size = sizeof(SamAdapterInfo)` before the call. Strings are NUL-terminated and
/// truncated to fit.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SamAdapterInfo {
    /// `sizeof(SamAdapterInfo)` as the caller compiled it.
    pub struct_size: usize,
    /// The adapter's name, e.g. "NVIDIA H200" or "llvmpipe (LLVM 15.0.6, 256 bits)".
    pub name: [c_char; 256],
    /// The graphics API: "vulkan", "metal", "dx12" or "gl".
    pub backend: [c_char; 16],
    /// "discrete", "integrated", "virtual", "cpu" or "other".
    pub device_type: [c_char; 16],
    /// The driver's name and version, where reported.
    pub driver: [c_char; 256],
    /// The largest storage binding in bytes; larger tensors run in windows.
    pub max_binding_bytes: u64,
    /// The largest buffer in bytes: the largest tensor the GPU engine can hold.
    pub max_buffer_bytes: u64,
    /// Whether the adapter can time passes with timestamp queries.
    pub timestamps: bool,
}

/// A log message's severity, for `sam_set_log_callback`: 1 error, 2 warning, 3 info, 4 debug.
pub type SamLogLevel = u32;

/// Receives samopt's log messages (for example that backend AUTO fell back to the CPU).
/// `message` is valid only during the call.
pub type SamLogCallback = Option<unsafe extern "C" fn(level: SamLogLevel, message: *const c_char, user: *mut c_void)>;

/// Configuration of an optimizer. Always start from `sam_config_default()`, which also sets
/// `struct_size`, then change the fields you need.
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
    /// Worker threads of the CPU engine; 0 (default) uses every available core.
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
    /// its norm.)
    pub max_grad_norm: f64,
    /// GSAM's alpha: step with `g' - alpha * g_perp`, `g_perp = g - (g.g' / ||g'||^2) g'`, with `g`
    /// the first gradient (the first step keeps a copy) and `g'` the second; 0 (default) is plain
    /// SAM. Needs a built-in base optimizer.
    pub gsam_alpha: f64,
}

/// An optimizer handle: create with `sam_create`, free with `sam_destroy`.
pub struct SamOptimizer {
    inner: Mutex<Optimizer>,
}

impl SamOptimizer {
    fn lock(&self) -> Result<MutexGuard<'_, Optimizer>> {
        self.inner
            .lock()
            .map_err(|_| Error::new(ErrorKind::Internal, "the optimizer is unusable after an earlier internal error"))
    }
}

const CONFIG_SIZES: [usize; 1] = [size_of::<SamConfig>()];

/// Reads a caller's config, honouring its `struct_size`.
///
/// # Safety
/// A non-null `ptr` must point to at least `struct_size` readable bytes.
unsafe fn read_config(ptr: *const SamConfig) -> Result<Config> {
    non_null(ptr, "config")?;
    // Read the size first: an older caller's struct may be shorter than ours.
    // SAFETY: every version of the struct starts with `struct_size`.
    let size = unsafe { ptr.cast::<usize>().read_unaligned() };
    if !CONFIG_SIZES.contains(&size) {
        return Err(Error::invalid(format!(
            "config->struct_size = {size}, but this library knows SamConfig of {} bytes: start from sam_config_default()",
            CONFIG_SIZES[0]
        )));
    }
    let mut c = sam_config_default();
    // SAFETY: `size` bytes are readable (the caller's contract) and fit in `c`.
    unsafe { std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), (&raw mut c).cast::<u8>(), size) };
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
    let config = Config {
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

fn dtype_from_c(dtype: SamDType) -> Result<DType> {
    match dtype {
        SAM_DTYPE_F32 => Ok(DType::F32),
        SAM_DTYPE_F16 => Ok(DType::F16),
        SAM_DTYPE_BF16 => Ok(DType::BF16),
        other => Err(Error::invalid(format!("dtype = {other}: not a SamDType (0 F32, 1 F16, 2 BF16)"))),
    }
}

/// The default configuration: rho 0.05, eps 1e-12, no ASAM (eta 0), p = 2, backend AUTO, all
/// cores, and `struct_size = sizeof(SamConfig)`.
#[unsafe(no_mangle)]
pub extern "C" fn sam_config_default() -> SamConfig {
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
    }
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
        // SAFETY: the caller's contract: a live handle from `sam_create`, freed once.
        drop(unsafe { Box::from_raw(opt) });
        Ok(())
    });
}

/// Registers a parameter buffer and its gradient buffer, both owned by the host, and stores the
/// tensor's id (0, 1, 2, ... in registration order) in `*out_id`.
///
/// At every step the plugin reads `grad` and rewrites `param` in place; the host keeps both alive
/// and in place for the optimizer's lifetime, writes the gradient between calls, and does not
/// touch either while a call runs.
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
    boundary("sam_register_host", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        non_null(param, "param")?;
        non_null(grad, "grad")?;
        non_null(out_id, "out_id")?;
        let dtype = dtype_from_c(dtype)?;
        let mut inner = opt.lock()?;
        // SAFETY: the host's promise about the buffers, passed on.
        let id = unsafe { inner.register_host_raw(param.cast(), grad.cast(), len, dtype) }?;
        // SAFETY: checked non-null above.
        unsafe { write_out(out_id, "out_id", id) }
    })
}

/// The ascent (first) step: computes one L2 norm over the gradients of every registered tensor,
/// then moves every parameter to `w + e(w)` and keeps `w` for the restore.
///
/// Returns `SAM_ERR_NON_FINITE`, with no parameter touched, when any gradient (under ASAM, any
/// weight) holds NaN or infinity; `SAM_ERR_INVALID_STATE` when called twice without a second step
/// in between, or with no tensor registered.
///
/// # Safety
/// `opt` must be NULL or a live handle whose registered buffers are valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_first_step(opt: *mut SamOptimizer) -> SamStatus {
    boundary("sam_first_step", || {
        // SAFETY: the caller's contract.
        unsafe { arg_ref(opt, "opt") }?.lock()?.first_step()
    })
}

/// The second step: restores every parameter to exactly the bits it had before the first step.
/// With `SAM_BASE_NONE` the host then runs its own optimizer with the gradient it computed at
/// `w + e(w)`; with `SAM_BASE_SGD` or `SAM_BASE_ADAMW` the restore and the base update run as one
/// pass (after one reduction over the second gradient: its norm for `max_grad_norm`, its dot
/// product with the first gradient for GSAM, and a finiteness check).
///
/// Returns `SAM_OK`; `SAM_STEP_SKIPPED` (positive, not an error) when a built-in base optimizer
/// finds NaN or infinity in the second gradient: weights restored, no update, state untouched;
/// `SAM_ERR_INVALID_STATE` without a preceding first step.
///
/// # Safety
/// `opt` must be NULL or a live handle whose registered buffers are valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_second_step(opt: *mut SamOptimizer) -> SamStatus {
    boundary_status("sam_second_step", || {
        // SAFETY: the caller's contract.
        Ok(match unsafe { arg_ref(opt, "opt") }?.lock()?.second_step()? {
            SecondStep::Skipped => SamStatus::SAM_STEP_SKIPPED,
            SecondStep::Restored | SecondStep::Updated => SamStatus::SAM_OK,
        })
    })
}

/// Sums `count` doubles at `values` in place across the workers of a data-parallel job (an
/// all-reduce with the sum, e.g. `MPI_Allreduce(MPI_IN_PLACE, values, count, MPI_DOUBLE, MPI_SUM,
/// comm)`); returns 0 on success. Every worker calls it at the same point of the same step.
pub type SamAllreduce = Option<unsafe extern "C" fn(values: *mut f64, count: usize, user: *mut c_void) -> i32>;

/// The host's `user` pointer, handed back to its callback on whichever thread calls.
struct UserPtr(*mut c_void);
// SAFETY: sam_set_allreduce's contract: the callback may be called from any thread with `user`.
unsafe impl Send for UserPtr {}

/// Global-norm SAM across workers, with the exchange inside `sam_first_step`: installs the host's
/// all-reduce. From then on `sam_first_step` computes the local squared norm `sum (T_w g)^2`, sums
/// it over the workers through `callback` (one double, no gradient copied), and perturbs with the
/// square root, so every worker uses the norm over all workers' gradients (over the union of the
/// shards when each worker holds its own part of the parameters). A callback returning non-zero
/// makes `sam_first_step` fail with `SAM_ERR_CALLBACK`, nothing changed. A worker whose own
/// gradient holds NaN or infinity still calls the all-reduce (with NaN), so every worker returns
/// `SAM_ERR_NON_FINITE` for that step and none waits for it. NULL removes it.
///
/// The same without a callback: `sam_grad_sq_norm_local`, the host's all-reduce, then
/// `sam_first_step_with_norm`.
///
/// Per-worker SAM (m-sharpness, as the original JAX code across accelerators) needs none of
/// this: each worker calls plain `sam_first_step` on its own gradient, and the host all-reduces
/// only the second gradient before `sam_second_step`.
///
/// # Safety
/// `opt` must be NULL or a live handle; `callback`, when set, must be safe to call with `user`
/// from any thread for as long as it is installed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_set_allreduce(
    opt: *mut SamOptimizer,
    callback: SamAllreduce,
    user: *mut c_void,
) -> SamStatus {
    boundary("sam_set_allreduce", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        let allreduce = callback.map(|f| {
            let user = UserPtr(user);
            Box::new(move |values: &mut [f64]| {
                let user = &user;
                // SAFETY: the host's contract for its callback.
                match unsafe { f(values.as_mut_ptr(), values.len(), user.0) } {
                    0 => Ok(()),
                    rc => Err(Error::new(ErrorKind::Callback, format!("the host's all-reduce returned {rc}"))),
                }
            }) as crate::engine::AllReduce
        });
        opt.lock()?.set_allreduce(allreduce);
        Ok(())
    })
}

/// Global-norm SAM across workers, step 1 of 2: stores in `*out` the local squared norm
/// `sum (T_w g)^2` over this worker's tensors (one read of the gradients, nothing written). The
/// host sums it over the workers and passes the square root to `sam_first_step_with_norm`.
/// `SAM_ERR_NON_FINITE` when a local gradient holds NaN or infinity (a host that must keep its
/// all-reduce in step can sum NaN then, so that every worker refuses the step).
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_grad_sq_norm_local(opt: *mut SamOptimizer, out: *mut f64) -> SamStatus {
    boundary("sam_grad_sq_norm_local", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        non_null(out, "out")?;
        let v = opt.lock()?.local_sq_norm()?;
        // SAFETY: checked non-null.
        unsafe { write_out(out, "out", v) }
    })
}

/// Global-norm SAM across workers, step 2 of 2: the ascent (as `sam_first_step`) with the given
/// global norm, the square root of the all-reduced `sam_grad_sq_norm_local` values. A NaN or
/// infinite `global_norm` (some worker's gradient was not finite) returns `SAM_ERR_NON_FINITE`
/// with nothing changed; a negative one `SAM_ERR_INVALID_ARGUMENT`. The gradients must not change
/// between `sam_grad_sq_norm_local` and this call: its finiteness check is reused, so the
/// gradients are read once.
///
/// # Safety
/// `opt` must be NULL or a live handle whose registered buffers are valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_first_step_with_norm(opt: *mut SamOptimizer, global_norm: f64) -> SamStatus {
    boundary("sam_first_step_with_norm", || {
        // SAFETY: the caller's contract.
        unsafe { arg_ref(opt, "opt") }?.lock()?.first_step_with_norm(global_norm)
    })
}

/// Per-shard SAM in one process (m-sharpness): a host that splits its batch into k shards calls,
/// for each shard,
///
/// ```text
/// gradient of the shard at w       -> the gradient buffers
/// sam_first_step(opt)                 w -> w + e_k(w), the shard's own perturbation
/// gradient of the shard at w + e_k -> the gradient buffers
/// sam_accumulate_step(opt)            w restored exactly, that gradient added to an accumulator
/// ```
///
/// and after the last shard `sam_second_step(opt)`, which writes the mean of the k perturbed
/// gradients into the gradient buffers and, with a built-in base optimizer, steps with it (without
/// one, the host's optimizer uses it). This is the one case samopt writes the gradient buffers:
/// they must be writable. The CPU backend runs it; `SAM_ERR_UNSUPPORTED` on the GPU for now and
/// with GSAM. `SAM_ERR_INVALID_STATE` without a preceding first step.
///
/// # Safety
/// `opt` must be NULL or a live handle whose registered buffers are valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_accumulate_step(opt: *mut SamOptimizer) -> SamStatus {
    boundary("sam_accumulate_step", || {
        // SAFETY: the caller's contract.
        unsafe { arg_ref(opt, "opt") }?.lock()?.accumulate_step()
    })
}

/// Stores in `*out` the L2 norm `||T_w * g||_2` (plain `||g||_2` without ASAM) that the last
/// successful first step computed, over every registered tensor. Also computed for
/// `norm_p = INFINITY`, where the perturbation does not use it. `SAM_ERR_INVALID_STATE` before the
/// first successful first step.
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_grad_norm(opt: *const SamOptimizer, out: *mut f64) -> SamStatus {
    boundary("sam_grad_norm", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        non_null(out, "out")?;
        let norm = opt.lock()?.grad_norm().ok_or_else(|| Error::state("no first step has succeeded yet"))?;
        // SAFETY: checked non-null above.
        unsafe { write_out(out, "out", norm) }
    })
}

/// Sets the learning rate of the built-in base optimizer from the next second step on: the hook
/// for a learning-rate schedule, called between steps. Groups scale it. `lr` must be finite and
/// >= 0.
///
/// # Safety
/// `opt` must be NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_set_lr(opt: *mut SamOptimizer, lr: f64) -> SamStatus {
    boundary("sam_set_lr", || {
        // SAFETY: the caller's contract.
        unsafe { arg_ref(opt, "opt") }?.lock()?.set_lr(lr)
    })
}

/// Stores the current learning rate in `*out`.
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_get_lr(opt: *const SamOptimizer, out: *mut f64) -> SamStatus {
    boundary("sam_get_lr", || {
        // SAFETY: the caller's contract.
        let lr = unsafe { arg_ref(opt, "opt") }?.lock()?.lr();
        // SAFETY: the caller's contract.
        unsafe { write_out(out, "out", lr) }
    })
}

/// Adds a parameter group, as PyTorch's `param_groups`, and stores its id in `*out_group`: its
/// tensors step with learning rate `lr * lr_scale` and weight decay `weight_decay` (`NAN`: group
/// 0's, the config's). Group 0 exists from the start and holds every tensor until
/// `sam_set_tensor_group` moves it. The gradient norm stays one norm over all groups. The common
/// use: a group with weight decay 0 for biases and normalisation weights.
///
/// # Safety
/// `opt` must be NULL or a live handle; `out_group` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_add_group(
    opt: *mut SamOptimizer,
    lr_scale: f64,
    weight_decay: f64,
    out_group: *mut u32,
) -> SamStatus {
    boundary("sam_add_group", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        non_null(out_group, "out_group")?;
        let group = opt.lock()?.add_group(lr_scale, (!weight_decay.is_nan()).then_some(weight_decay))?;
        // SAFETY: checked non-null.
        unsafe { write_out(out_group, "out_group", group) }
    })
}

/// Moves tensor `id` into `group` (refused between the two steps).
///
/// # Safety
/// `opt` must be NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_set_tensor_group(opt: *mut SamOptimizer, id: u32, group: u32) -> SamStatus {
    boundary("sam_set_tensor_group", || {
        // SAFETY: the caller's contract.
        unsafe { arg_ref(opt, "opt") }?.lock()?.set_group(id, group)
    })
}

/// Stores in `*out` the bytes `sam_state_save` writes now (it grows with registrations).
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_state_size(opt: *const SamOptimizer, out: *mut usize) -> SamStatus {
    boundary("sam_state_size", || {
        // SAFETY: the caller's contract.
        let n = unsafe { arg_ref(opt, "opt") }?.lock()?.state_size();
        // SAFETY: the caller's contract.
        unsafe { write_out(out, "out", n) }
    })
}

/// Writes a checkpoint of the optimizer's state into `buf` (`len` bytes, at least
/// `sam_state_size`): step counts, learning rate, groups, and the base optimizer's state
/// (momentum, Adam moments, step counts), with a magic number, a version, fingerprints of the
/// configuration and of the registrations, and a checksum. Stores the bytes written in
/// `*out_written` (which may be NULL). Refused with `SAM_ERR_INVALID_STATE` between the two steps.
///
/// # Safety
/// `opt` must be NULL or a live handle; `buf` NULL or writable for `len` bytes; `out_written`
/// NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_state_save(
    opt: *mut SamOptimizer,
    buf: *mut c_void,
    len: usize,
    out_written: *mut usize,
) -> SamStatus {
    boundary("sam_state_save", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        non_null(buf, "buf")?;
        // SAFETY: non-null, and writable for `len` bytes by the caller's contract.
        let out = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) };
        let written = opt.lock()?.save_state(out)?;
        if !out_written.is_null() {
            // SAFETY: checked non-null.
            unsafe { out_written.write(written) };
        }
        Ok(())
    })
}

/// Restores a checkpoint from `sam_state_save` (`len` bytes at `buf`) into an optimizer created
/// with the same configuration and the same registrations (count, lengths, dtypes, groups), for
/// example in a resumed job. Resuming gives the same bits as a run that never stopped. A
/// truncated or corrupted checkpoint, one of another version, configuration or layout is refused
/// with `SAM_ERR_IO` and a message saying which, and the optimizer is left exactly as it was.
/// Refused with `SAM_ERR_INVALID_STATE` between the two steps.
///
/// # Safety
/// `opt` must be NULL or a live handle; `buf` NULL or readable for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_state_load(opt: *mut SamOptimizer, buf: *const c_void, len: usize) -> SamStatus {
    boundary("sam_state_load", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        non_null(buf, "buf")?;
        // SAFETY: non-null, and readable for `len` bytes by the caller's contract.
        let bytes = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) };
        opt.lock()?.load_state(bytes)
    })
}

/// A path argument as a `Path`: the bytes as they are on Unix, UTF-8 elsewhere.
///
/// # Safety
/// A non-null `path` must be a NUL-terminated string.
unsafe fn path_arg<'a>(path: *const c_char) -> Result<&'a std::path::Path> {
    non_null(path, "path")?;
    // SAFETY: the caller's contract.
    let c = unsafe { CStr::from_ptr(path) };
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(std::path::Path::new(std::ffi::OsStr::from_bytes(c.to_bytes())))
    }
    #[cfg(not(unix))]
    {
        c.to_str().map(std::path::Path::new).map_err(|_| Error::invalid("path is not UTF-8"))
    }
}

/// `sam_state_save` to the file `path`: written to a temporary file beside it, flushed to disk
/// and renamed into place, so a crash mid-write never leaves half a checkpoint under `path`.
///
/// # Safety
/// `opt` must be NULL or a live handle; `path` NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_state_save_file(opt: *mut SamOptimizer, path: *const c_char) -> SamStatus {
    boundary("sam_state_save_file", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        // SAFETY: the caller's contract.
        let path = unsafe { path_arg(path) }?;
        opt.lock()?.save_state_file(path)
    })
}

/// `sam_state_load` from the file `path`.
///
/// # Safety
/// `opt` must be NULL or a live handle; `path` NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_state_load_file(opt: *mut SamOptimizer, path: *const c_char) -> SamStatus {
    boundary("sam_state_load_file", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        // SAFETY: the caller's contract.
        let path = unsafe { path_arg(path) }?;
        opt.lock()?.load_state_file(path)
    })
}

/// The loader's `vkGetInstanceProcAddr`, cast to this type: `(SamVkGetInstanceProcAddr)vkGetInstanceProcAddr`
/// (the same function; its result is declared as a plain pointer here).
pub type SamVkGetInstanceProcAddr =
    Option<unsafe extern "system" fn(instance: *mut c_void, name: *const c_char) -> *const c_void>;

/// The host's Vulkan objects, for `sam_create_vulkan` (all of them) and
/// `sam_vulkan_required_extensions` (the instance and physical device). Set `struct_size` to
/// `sizeof(SamVulkanDevice)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SamVulkanDevice {
    /// `sizeof(SamVulkanDevice)` as the caller compiled it.
    pub struct_size: usize,
    /// The loader's `vkGetInstanceProcAddr`, cast to `SamVkGetInstanceProcAddr`.
    pub get_instance_proc_addr: SamVkGetInstanceProcAddr,
    /// The host's `VkInstance`, Vulkan 1.1 or later.
    pub instance: *mut c_void,
    /// The `apiVersion` the instance was created with.
    pub api_version: u32,
    /// How many instance extensions the host enabled.
    pub instance_extension_count: u32,
    /// Their names.
    pub instance_extensions: *const *const c_char,
    /// The `VkPhysicalDevice` the device was created from.
    pub physical_device: *mut c_void,
    /// The host's `VkDevice` (ignored by `sam_vulkan_required_extensions`).
    pub device: *mut c_void,
    /// How many device extensions the host enabled.
    pub device_extension_count: u32,
    /// Their names: a superset of what `sam_vulkan_required_extensions` lists.
    pub device_extensions: *const *const c_char,
    /// The queue family samopt submits to (it must support compute).
    pub queue_family_index: u32,
    /// The queue within that family.
    pub queue_index: u32,
}

/// Reads and checks a `SamVulkanDevice`.
///
/// # Safety
/// A non-null `d` must point to a `SamVulkanDevice` with valid extension arrays.
unsafe fn vulkan_handles(d: *const SamVulkanDevice, need_device: bool) -> Result<crate::gpu::vulkan::VulkanHandles> {
    use ash::vk::Handle;
    // SAFETY: the caller's contract.
    let d = unsafe { arg_ref(d, "device") }?;
    if d.struct_size != size_of::<SamVulkanDevice>() {
        return Err(Error::invalid(format!(
            "device->struct_size = {}, but this library knows SamVulkanDevice of {} bytes",
            d.struct_size,
            size_of::<SamVulkanDevice>()
        )));
    }
    let gipa = d
        .get_instance_proc_addr
        .ok_or_else(|| Error::new(ErrorKind::NullPointer, "device->get_instance_proc_addr is NULL"))?;
    non_null(d.instance, "device->instance")?;
    non_null(d.physical_device, "device->physical_device")?;
    if need_device {
        non_null(d.device, "device->device")?;
    }
    // SAFETY: the loader's vkGetInstanceProcAddr: the same signature, its result a function
    // pointer where this type says a plain one.
    let gipa: ash::vk::PFN_vkGetInstanceProcAddr = unsafe { std::mem::transmute(gipa) };
    Ok(crate::gpu::vulkan::VulkanHandles {
        get_instance_proc_addr: gipa,
        instance: ash::vk::Instance::from_raw(d.instance as u64),
        api_version: d.api_version,
        // SAFETY: the caller's contract for the arrays.
        instance_extensions: unsafe {
            crate::gpu::vulkan::names(d.instance_extensions, d.instance_extension_count, "instance_extensions")
        }?,
        physical_device: ash::vk::PhysicalDevice::from_raw(d.physical_device as u64),
        device: ash::vk::Device::from_raw(d.device as u64),
        // SAFETY: as above.
        device_extensions: unsafe {
            crate::gpu::vulkan::names(d.device_extensions, d.device_extension_count, "device_extensions")
        }?,
        queue_family: d.queue_family_index,
        queue_index: d.queue_index,
    })
}

/// The device extensions the host must enable when it creates the `VkDevice` it hands to
/// `sam_create_vulkan` (from `device->instance` and `device->physical_device`; the device itself
/// may not exist yet). Stores the number in `*out_count` and the first `capacity` names (static
/// strings) in `out_names`, which may be NULL to ask for the count. No instance extension is
/// required beyond Vulkan 1.1; no device feature beyond Vulkan 1.1's is used.
///
/// # Safety
/// `device` must be NULL or valid (see `SamVulkanDevice`); `out_names` NULL or writable for
/// `capacity` pointers; `out_count` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_vulkan_required_extensions(
    device: *const SamVulkanDevice,
    out_names: *mut *const c_char,
    capacity: usize,
    out_count: *mut usize,
) -> SamStatus {
    boundary("sam_vulkan_required_extensions", || {
        non_null(out_count, "out_count")?;
        // SAFETY: the caller's contract.
        let handles = unsafe { vulkan_handles(device, false) }?;
        let names = crate::gpu::vulkan::required_device_extensions(&handles)?;
        if !out_names.is_null() {
            for (i, n) in names.iter().take(capacity).enumerate() {
                // SAFETY: writable for `capacity` pointers (the caller's contract).
                unsafe { out_names.add(i).write(n.as_ptr()) };
            }
        }
        // SAFETY: checked non-null.
        unsafe { write_out(out_count, "out_count", names.len()) }
    })
}

/// Creates an optimizer whose GPU engine runs on the host's own Vulkan device and queue, so that
/// `sam_register_vulkan` can register the host's `VkBuffer`s and the passes run on them in place.
/// samopt never destroys the host's instance, device, queue or buffers.
///
/// The synchronisation contract:
/// - before a step (`sam_first_step`, `sam_second_step`, ...) the host's writes to the registered
///   buffers (its gradients, its weights) must be complete on the GPU (e.g. its fence waited);
/// - when a samopt call returns, all the GPU work it submitted is complete, so the host may read
///   and write the buffers at once;
/// - samopt submits to the given queue only inside its own calls; Vulkan requires the host not
///   to submit to the same `VkQueue` concurrently (give samopt a queue of its own, or do not use
///   that queue from another thread while a samopt call runs).
///
/// Fails with `SAM_ERR_NULL_POINTER`, `SAM_ERR_INVALID_ARGUMENT` (wrong `struct_size`, a required
/// device extension missing from `device->device_extensions`, a queue family that does not exist
/// or lacks compute, a queue index past the family's count), `SAM_ERR_UNSUPPORTED`,
/// `SAM_ERR_DEVICE`.
///
/// # Safety
/// `device` must describe live Vulkan objects created as documented there; `config` and `out` as
/// in `sam_create`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_create_vulkan(
    device: *const SamVulkanDevice,
    config: *const SamConfig,
    out: *mut *mut SamOptimizer,
) -> SamStatus {
    boundary("sam_create_vulkan", || {
        logging::install();
        non_null(out, "out")?;
        // SAFETY: the caller's contract.
        let config = unsafe { read_config(config) }?;
        // SAFETY: the caller's contract.
        let handles = unsafe { vulkan_handles(device, true) }?;
        let opt = Optimizer::on_vulkan(&handles, config)?;
        let handle = Box::into_raw(Box::new(SamOptimizer { inner: Mutex::new(opt) }));
        // SAFETY: checked non-null above.
        unsafe { write_out(out, "out", handle) }
    })
}

/// Registers a tensor in the host's `VkBuffer`s (for an optimizer from `sam_create_vulkan`):
/// `len` elements of `dtype` at byte `param_offset` of `param_buffer` and `grad_offset` of
/// `grad_buffer`. The passes read and write them in place; the host keeps owning them (samopt
/// never frees them) and keeps them alive for the optimizer's lifetime. Both buffers need the
/// `VK_BUFFER_USAGE_STORAGE_BUFFER_BIT` usage, offsets a multiple of the device's
/// `minStorageBufferOffsetAlignment`, and the tensor a multiple of 16 bytes.
///
/// Fails, registering nothing, with `SAM_ERR_NULL_POINTER` (a `VK_NULL_HANDLE` or `out_id` NULL),
/// `SAM_ERR_INVALID_ARGUMENT` (`len` 0, an unknown dtype, a buffer smaller than `offset + len *
/// size`, a misaligned offset, overlapping ranges), `SAM_ERR_UNSUPPORTED` (not a Vulkan optimizer).
/// Vulkan has no query for a buffer's size, so samopt bounds the range by the buffer's memory
/// requirements (`vkGetBufferMemoryRequirements`): a range that ends inside the alignment padding
/// past the size the host created the buffer with is not caught, and stays the host's to avoid.
///
/// # Safety
/// `opt` must be NULL or a live handle; the buffers must be live `VkBuffer`s of its device.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sam_register_vulkan(
    opt: *mut SamOptimizer,
    param_buffer: u64,
    param_offset: u64,
    grad_buffer: u64,
    grad_offset: u64,
    len: usize,
    dtype: SamDType,
    out_id: *mut u32,
) -> SamStatus {
    boundary("sam_register_vulkan", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        non_null(out_id, "out_id")?;
        let dtype = dtype_from_c(dtype)?;
        let mut inner = opt.lock()?;
        // SAFETY: the host's contract for its buffers.
        let id =
            unsafe { inner.register_vulkan((param_buffer, param_offset), (grad_buffer, grad_offset), len, dtype) }?;
        // SAFETY: checked non-null.
        unsafe { write_out(out_id, "out_id", id) }
    })
}

/// Stores the number of registered tensors in `*out`.
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_tensor_count(opt: *const SamOptimizer, out: *mut usize) -> SamStatus {
    boundary("sam_tensor_count", || {
        // SAFETY: the caller's contract.
        let n = unsafe { arg_ref(opt, "opt") }?.lock()?.tensor_count();
        // SAFETY: the caller's contract.
        unsafe { write_out(out, "out", n) }
    })
}

/// Stores in `*out` the number of completed SAM steps: second steps that were not skipped (with a
/// built-in base optimizer, the number of updates applied, as PyTorch's optimizer step count).
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_step_count(opt: *const SamOptimizer, out: *mut u64) -> SamStatus {
    boundary("sam_step_count", || {
        // SAFETY: the caller's contract.
        let n = unsafe { arg_ref(opt, "opt") }?.lock()?.steps();
        // SAFETY: the caller's contract.
        unsafe { write_out(out, "out", n) }
    })
}

/// Stores in `*out` whether the weights are perturbed (between a first and a second step).
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_is_perturbed(opt: *const SamOptimizer, out: *mut bool) -> SamStatus {
    boundary("sam_is_perturbed", || {
        // SAFETY: the caller's contract.
        let phase = unsafe { arg_ref(opt, "opt") }?.lock()?.phase();
        // SAFETY: the caller's contract.
        unsafe { write_out(out, "out", phase == Phase::Perturbed) }
    })
}

/// Stores in `*out` the backend that runs this optimizer's passes (`SAM_BACKEND_CPU` or
/// `SAM_BACKEND_GPU`; never AUTO).
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_get_backend(opt: *const SamOptimizer, out: *mut SamBackend) -> SamStatus {
    boundary("sam_get_backend", || {
        // SAFETY: the caller's contract.
        let backend = match unsafe { arg_ref(opt, "opt") }?.lock()?.backend() {
            Backend::Gpu => SAM_BACKEND_GPU,
            Backend::Cpu | Backend::Auto => SAM_BACKEND_CPU,
        };
        // SAFETY: the caller's contract.
        unsafe { write_out(out, "out", backend) }
    })
}

/// Allocates a parameter/gradient pair of `len` zeros owned by the optimizer and stores its id in
/// `*out_id`: on the GPU backend both live on the device, with the optimizer's state, and the
/// passes run there with no host copy; on the CPU backend they live in host memory. Under
/// `SAM_BACKEND_AUTO` the first such call (before any `sam_register_host`) picks the GPU, or the
/// CPU when no adapter exists. Fill and read them with `sam_tensor_write` and `sam_tensor_read`.
///
/// Fails with `SAM_ERR_INVALID_ARGUMENT` (`len` 0, unknown dtype, a size over the device's
/// largest buffer), `SAM_ERR_INVALID_STATE` (between the two steps), `SAM_ERR_DEVICE`.
///
/// # Safety
/// `opt` must be NULL or a live handle; `out_id` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_tensor_create(
    opt: *mut SamOptimizer,
    len: usize,
    dtype: SamDType,
    out_id: *mut u32,
) -> SamStatus {
    boundary("sam_tensor_create", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        non_null(out_id, "out_id")?;
        let dtype = dtype_from_c(dtype)?;
        let id = opt.lock()?.add_zeroed_tensor(len, dtype)?;
        // SAFETY: checked non-null above.
        unsafe { write_out(out_id, "out_id", id) }
    })
}

fn part_from_c(part: SamTensorPart) -> Result<crate::backend::Part> {
    match part {
        SAM_PART_PARAM => Ok(crate::backend::Part::Param),
        SAM_PART_GRAD => Ok(crate::backend::Part::Grad),
        other => Err(Error::invalid(format!("part = {other}: not a SamTensorPart (0 PARAM, 1 GRAD)"))),
    }
}

/// Checks a raw buffer argument for tensor `id` and returns the tensor's element type.
fn check_tensor_buffer(opt: &Optimizer, id: u32, ptr: *const c_void, name: &str, len: usize) -> Result<DType> {
    non_null(ptr, name)?;
    let (n, dtype) = opt
        .tensor(id)
        .ok_or_else(|| Error::invalid(format!("id = {id}: only {} tensors are registered", opt.tensor_count())))?;
    if len != n {
        return Err(Error::invalid(format!("len = {len}: tensor {id} has {n} elements")));
    }
    if !(ptr as usize).is_multiple_of(dtype.size()) {
        return Err(Error::invalid(format!("{name} = {ptr:p} is not aligned to {} bytes", dtype.size())));
    }
    Ok(dtype)
}

/// Copies `len` elements from `src` into the parameter or gradient (`part`) of tensor `id`, which
/// `sam_tensor_create` allocated; `len` must be the tensor's length and `src` hold its dtype.
/// Writing the parameter between the two steps is overwritten by the restore.
///
/// # Safety
/// `opt` must be NULL or a live handle; `src` NULL or valid for reads of `len` elements.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_tensor_write(
    opt: *mut SamOptimizer,
    id: u32,
    part: SamTensorPart,
    src: *const c_void,
    len: usize,
) -> SamStatus {
    boundary("sam_tensor_write", || {
        // SAFETY: the caller's contract.
        let mut inner = unsafe { arg_ref(opt, "opt") }?.lock()?;
        let part = part_from_c(part)?;
        let dtype = check_tensor_buffer(&inner, id, src, "src", len)?;
        // SAFETY: checked non-null and aligned; the caller promises `len` readable elements.
        unsafe {
            match dtype {
                DType::F32 => inner.write_owned_part(id, part, std::slice::from_raw_parts(src.cast::<f32>(), len)),
                DType::F16 => {
                    inner.write_owned_part(id, part, std::slice::from_raw_parts(src.cast::<half::f16>(), len))
                }
                DType::BF16 => {
                    inner.write_owned_part(id, part, std::slice::from_raw_parts(src.cast::<half::bf16>(), len))
                }
            }
        }
    })
}

/// Copies the parameter or gradient (`part`) of tensor `id`, which `sam_tensor_create`
/// allocated, into `dst` (`len` elements: the tensor's length). Between the two steps the
/// parameter reads as `w + e(w)`. Waits for the device.
///
/// # Safety
/// `opt` must be NULL or a live handle; `dst` NULL or valid for writes of `len` elements.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_tensor_read(
    opt: *mut SamOptimizer,
    id: u32,
    part: SamTensorPart,
    dst: *mut c_void,
    len: usize,
) -> SamStatus {
    boundary("sam_tensor_read", || {
        // SAFETY: the caller's contract.
        let mut inner = unsafe { arg_ref(opt, "opt") }?.lock()?;
        let part = part_from_c(part)?;
        let dtype = check_tensor_buffer(&inner, id, dst, "dst", len)?;
        // SAFETY: checked non-null and aligned; the caller promises `len` writable elements.
        unsafe {
            match dtype {
                DType::F32 => inner.read_owned_part(id, part, std::slice::from_raw_parts_mut(dst.cast::<f32>(), len)),
                DType::F16 => {
                    inner.read_owned_part(id, part, std::slice::from_raw_parts_mut(dst.cast::<half::f16>(), len))
                }
                DType::BF16 => {
                    inner.read_owned_part(id, part, std::slice::from_raw_parts_mut(dst.cast::<half::bf16>(), len))
                }
            }
        }
    })
}

fn copy_c_string(dst: &mut [c_char], s: &str) {
    let n = s.len().min(dst.len() - 1);
    for (d, &b) in dst.iter_mut().zip(&s.as_bytes()[..n]) {
        *d = b as c_char;
    }
    dst[n] = 0;
}

/// Fills a caller's `SamAdapterInfo`, honouring its `struct_size`.
///
/// # Safety
/// A non-null `out` must be writable for `out->struct_size` bytes.
unsafe fn write_adapter_info(out: *mut SamAdapterInfo, a: &crate::gpu::AdapterSummary) -> Result<()> {
    non_null(out, "out")?;
    // SAFETY: every version of the struct starts with `struct_size`.
    let size = unsafe { out.cast::<usize>().read_unaligned() };
    if size != size_of::<SamAdapterInfo>() {
        return Err(Error::invalid(format!(
            "out->struct_size = {size}, but this library knows SamAdapterInfo of {} bytes",
            size_of::<SamAdapterInfo>()
        )));
    }
    let mut info = SamAdapterInfo {
        struct_size: size,
        name: [0; 256],
        backend: [0; 16],
        device_type: [0; 16],
        driver: [0; 256],
        max_binding_bytes: a.max_binding_bytes,
        max_buffer_bytes: a.max_buffer_bytes,
        timestamps: a.timestamps,
    };
    copy_c_string(&mut info.name, &a.name);
    copy_c_string(&mut info.backend, &a.backend);
    copy_c_string(&mut info.device_type, &a.device_type);
    copy_c_string(&mut info.driver, &a.driver);
    // SAFETY: checked non-null and of our size.
    unsafe { out.write(info) };
    Ok(())
}

/// Stores in `*out` how many GPU adapters wgpu finds (honouring `WGPU_BACKEND`). Creating the
/// list can take a moment: it starts the graphics drivers.
///
/// # Safety
/// `out` must be NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_gpu_adapter_count(out: *mut usize) -> SamStatus {
    boundary("sam_gpu_adapter_count", || {
        non_null(out, "out")?;
        let n = crate::gpu::adapters().len();
        // SAFETY: checked non-null.
        unsafe { write_out(out, "out", n) }
    })
}

/// Describes adapter `index` (0 is the one `SAM_BACKEND_GPU` picks without `config.adapter` or
/// `SAMOPT_ADAPTER`).
///
/// # Safety
/// `out` must be NULL or point to a `SamAdapterInfo` whose `struct_size` is set.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_gpu_adapter_info(index: usize, out: *mut SamAdapterInfo) -> SamStatus {
    boundary("sam_gpu_adapter_info", || {
        non_null(out, "out")?;
        let list = crate::gpu::adapters();
        let a = list
            .get(index)
            .ok_or_else(|| Error::invalid(format!("index = {index}: wgpu found {} adapters", list.len())))?;
        // SAFETY: the caller's contract.
        unsafe { write_adapter_info(out, a) }
    })
}

/// Describes the adapter this optimizer's GPU backend runs on; `SAM_ERR_UNSUPPORTED` when the
/// backend is the CPU (or AUTO has not decided yet).
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or a `SamAdapterInfo` with `struct_size` set.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_get_adapter_info(opt: *const SamOptimizer, out: *mut SamAdapterInfo) -> SamStatus {
    boundary("sam_get_adapter_info", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        non_null(out, "out")?;
        let inner = opt.lock()?;
        let a = inner.adapter().ok_or_else(|| {
            Error::new(ErrorKind::Unsupported, format!("the backend is {}, not a GPU", inner.backend_description()))
        })?;
        // SAFETY: the caller's contract.
        unsafe { write_adapter_info(out, &a) }
    })
}

/// Sends samopt's log messages (errors, warnings such as AUTO's fallback to the CPU) to
/// `callback` with `user`, from any thread; NULL stops them. Without a callback, messages go to
/// standard error when the environment sets `SAMOPT_LOG` (to `error`, `warn`, `info` or `debug`).
#[unsafe(no_mangle)]
pub extern "C" fn sam_set_log_callback(callback: SamLogCallback, user: *mut c_void) -> SamStatus {
    boundary("sam_set_log_callback", || {
        logging::set_callback(callback, user);
        Ok(())
    })
}

/// This thread's message for its last failing call, starting with the function's name, e.g.
/// `"sam_register_host: len = 0: a tensor needs at least one element"`. Empty if no call failed on
/// this thread. Never NULL. The string stays valid until the next failing call on this thread:
/// copy it to keep it.
#[unsafe(no_mangle)]
pub extern "C" fn sam_last_error() -> *const c_char {
    ffi::last_error_ptr()
}

/// A static, never-NULL description of a status, e.g. `"invalid argument"`; `"unknown status"`
/// for a number that is not a `SamStatus`.
#[unsafe(no_mangle)]
pub extern "C" fn sam_status_string(status: i32) -> *const c_char {
    let s: &'static std::ffi::CStr = match status {
        0 => c"ok",
        1 => c"step skipped: non-finite second gradient",
        -1 => c"null pointer",
        -2 => c"invalid argument",
        -3 => c"invalid state",
        -4 => c"non-finite gradient",
        -5 => c"unsupported",
        -6 => c"device error",
        -7 => c"I/O or format error",
        -8 => c"out of memory",
        -9 => c"internal error",
        -10 => c"host callback failed",
        _ => c"unknown status",
    };
    s.as_ptr()
}

/// The library's version, e.g. `"0.1.0"`: static, never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn sam_version() -> *const c_char {
    const V: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    V.as_ptr().cast()
}

/// The C ABI version of the loaded library; equal to `SAM_ABI_VERSION` of a compatible header.
#[unsafe(no_mangle)]
pub extern "C" fn sam_abi_version() -> u32 {
    SAM_ABI_VERSION
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_strings_cover_every_status() {
        for s in [
            SamStatus::SAM_OK,
            SamStatus::SAM_STEP_SKIPPED,
            SamStatus::SAM_ERR_NULL_POINTER,
            SamStatus::SAM_ERR_INVALID_ARGUMENT,
            SamStatus::SAM_ERR_INVALID_STATE,
            SamStatus::SAM_ERR_NON_FINITE,
            SamStatus::SAM_ERR_UNSUPPORTED,
            SamStatus::SAM_ERR_DEVICE,
            SamStatus::SAM_ERR_IO,
            SamStatus::SAM_ERR_OUT_OF_MEMORY,
            SamStatus::SAM_ERR_INTERNAL,
            SamStatus::SAM_ERR_CALLBACK,
        ] {
            // SAFETY: static NUL-terminated strings.
            let text = unsafe { std::ffi::CStr::from_ptr(sam_status_string(s as i32)) };
            assert_ne!(text.to_str().unwrap(), "unknown status", "{s:?}");
        }
        // SAFETY: as above.
        let text = unsafe { std::ffi::CStr::from_ptr(sam_status_string(12345)) };
        assert_eq!(text.to_str().unwrap(), "unknown status");
    }
}
