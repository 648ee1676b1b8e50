//! What every backend implements: the same few passes over the registered tensors, and the types
//! the engine and the backends share (so that `backend` imports no backend).
//!
//! The engine owns the state machine and decides which pass runs when; a backend only moves
//! bytes. Each pass either completes for every tensor or, on error, has written nothing the host
//! can see (the norm pass only reads; the perturbation and restore passes cannot fail once the
//! norm pass has succeeded, except for a device error, which the engine reports as such).

use crate::config::Config;
use crate::dtype::DType;
use crate::error::Result;
use crate::math::{Perturbation, TensorStep, UpdateStep};

/// A parameter and its gradient in host memory, owned by the host.
///
/// The engine checks before building one that both ranges are non-null, aligned for `dtype`,
/// disjoint from each other and from every other registered range.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HostTensor {
    pub param: *mut u8,
    pub grad: *const u8,
    pub len: usize,
    pub dtype: DType,
}

// SAFETY: a HostTensor is a pair of addresses the host promised (at registration) stay valid and
// untouched by others during optimizer calls; the passes write disjoint ranges from each thread.
unsafe impl Send for HostTensor {}
// SAFETY: as above.
unsafe impl Sync for HostTensor {}

/// The result of the norm pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct AscentNorm {
    /// `sum (T_w * g)^2` over every element of every tensor. NaN or infinite exactly when some
    /// gradient element (or, under ASAM, weight element) is; that is the non-finite flag.
    pub sum_sq: f64,
}

/// The result of the second step's reduction over the second gradient `g'`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct SecondNorm {
    /// `||g'||^2` over every tensor; NaN or infinite exactly when some `g'` element is.
    pub sum_sq: f64,
    /// `g . g'` with the first gradient `g` (GSAM only, else 0).
    pub dot: f64,
}

/// Which buffer of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The parameter `w`.
    Param,
    /// The gradient `g`.
    Grad,
}

/// The adapter a GPU engine runs on, as `samopt info` and `sam_get_adapter_info` report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterSummary {
    /// The adapter's name, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// The graphics API: `vulkan`, `metal`, `dx12` or `gl`.
    pub backend: String,
    /// `discrete`, `integrated`, `virtual`, `cpu` or `other`.
    pub device_type: String,
    /// The driver's name and version, where the driver reports them.
    pub driver: String,
    /// The largest storage binding, in bytes: tensors larger than this run in windows.
    pub max_binding_bytes: u64,
    /// The largest buffer, in bytes: the largest tensor the engine can hold.
    pub max_buffer_bytes: u64,
    /// Whether the adapter can time passes with timestamp queries.
    pub timestamps: bool,
}

/// A tensor in the host's own device buffers, registered with
/// [`Optimizer::register_wgpu`](crate::Optimizer::register_wgpu): the passes run on them in place.
#[derive(Clone, Debug)]
pub struct External {
    /// The parameter's buffer.
    pub param: wgpu::Buffer,
    /// Bytes from the start of `param` to the tensor.
    pub param_offset: u64,
    /// The gradient's buffer.
    pub grad: wgpu::Buffer,
    /// Bytes from the start of `grad` to the tensor.
    pub grad_offset: u64,
}

/// The GPU time of each pass of the last step, in nanoseconds, from timestamp queries.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PassTimes {
    /// The norm pass.
    pub norm_ns: f64,
    /// The perturbation pass.
    pub perturb_ns: f64,
    /// The restore pass.
    pub restore_ns: f64,
}

/// The passes of one SAM step.
pub(crate) trait Passes: Send {
    /// Adds a host tensor; it takes part in every later pass. Allocates its backup.
    fn add_host(&mut self, tensor: HostTensor) -> Result<()>;

    /// Allocates a zeroed parameter/gradient pair owned by the backend (host memory on the CPU,
    /// device buffers on the GPU) and adds it as the next tensor.
    fn add_owned(&mut self, len: usize, dtype: DType) -> Result<()>;

    /// The host addresses of an owned tensor's parameter and gradient, where they live in host
    /// memory (the CPU backend); `None` otherwise.
    fn owned_host_ptrs(&self, tensor: usize) -> Option<(*mut u8, *mut u8)>;

    /// Overwrites a part of an owned tensor with `bytes` (exactly the tensor's size).
    fn write_owned(&mut self, tensor: usize, part: Part, bytes: &[u8]) -> Result<()>;

    /// Copies a part of an owned tensor into `out` (exactly the tensor's size).
    fn read_owned(&mut self, tensor: usize, part: Part, out: &mut [u8]) -> Result<()>;

    /// Reads every gradient (and, under ASAM, every weight) once; writes nothing.
    fn ascent_norm(&mut self, config: &Config) -> Result<AscentNorm>;

    /// The preconditioned perturbation: tensor k's `sqrt(1 - beta2^t)` after its `t` updates
    /// (0 before the first: plain SAM for it), for the next norm and perturbation passes.
    fn precondition(&mut self, bias2_sqrt: &[f32], eps: f32);

    /// Saves every weight's bits, then moves it to `w + e(w)`.
    fn perturb(&mut self, perturbation: &Perturbation) -> Result<()>;

    /// Writes back the bits saved by the last `perturb`.
    fn restore(&mut self) -> Result<()>;

    /// Reads the second gradient (and under GSAM the saved first one) once; writes nothing.
    fn second_reduce(&mut self, gsam: bool) -> Result<SecondNorm>;

    /// The restore fused with the base optimizer's update: reads the backup, the second gradient,
    /// (the first gradient under GSAM) and the state; writes the weights and the state.
    /// `tensors[k]` holds tensor k's scalars.
    fn update(&mut self, step: &UpdateStep, tensors: &[TensorStep]) -> Result<()>;

    /// LookSAM on a SAM step, after `second_reduce(true)`: `g_v <- g' - c * g` (f32) from the
    /// second gradient and the first one the perturbation kept, into each tensor's `g_v` state;
    /// returns this backend's `||g_v||^2`. Reads only; writes only `g_v`.
    fn look_store(&mut self, c: f32) -> Result<f64>;

    /// A single-gradient step's base update: `w` read in place (the first step did not move it),
    /// the direction `a * g - b * g_v` (`step.b` is minus LookSAM's reuse coefficient; `g_v` read
    /// only when `with_gv`), the state updated in place.
    fn update_single(&mut self, step: &UpdateStep, tensors: &[TensorStep], with_gv: bool) -> Result<()>;

    /// LookSAM without a built-in base optimizer, on a single-gradient step: `g <- g + c * g_v` in
    /// every gradient buffer (the engine checked that the host registered them writable).
    fn look_direction(&mut self, c: f32) -> Result<()>;

    /// Per-shard SAM: writes back the bits saved by the last `perturb` and adds the (second)
    /// gradient into an f32 accumulator, which `first` starts from zero.
    fn accumulate(&mut self, first: bool) -> Result<()>;

    /// `scale` times the accumulator, rounded to each tensor's dtype: into every gradient buffer
    /// (`into_grads`, for the host's own optimizer; the engine has checked that the host allowed
    /// it), or into a buffer of the backend's that the next `second_reduce` and `update` read in
    /// the gradients' place, so the host's gradient buffers are only read.
    fn write_mean(&mut self, scale: f32, into_grads: bool) -> Result<()>;

    /// Copies the base optimizer's state into `out`, tensor by tensor (the momentum buffer or
    /// Adam's first moment, then the second moment, then LookSAM's `g_v`), `len` f32 each.
    fn export_state(&mut self, out: &mut [f32]) -> Result<()>;

    /// Replaces the base optimizer's state with `data`, laid out as [`Passes::export_state`].
    fn import_state(&mut self, data: &[f32]) -> Result<()>;

    /// Re-points host tensor `tensor` at new buffers of the same length and dtype (the engine has
    /// checked them), keeping its state.
    fn rebind_host(&mut self, tensor: usize, host: HostTensor) -> Result<()>;

    /// Adds a tensor that lives in the host's own device buffers (GPU only): the passes run on
    /// them in place.
    fn add_external(&mut self, _external: External, _len: usize, _dtype: DType) -> Result<()> {
        Err(crate::error::Error::new(
            crate::error::ErrorKind::Unsupported,
            "device buffers need a GPU backend on the same device: create the optimizer with Optimizer::on_wgpu_device",
        ))
    }

    /// Adds a tensor in the host's `VkBuffer`s (a GPU engine on the host's `VkDevice`).
    ///
    /// # Safety
    /// As `GpuEngine::add_vulkan`.
    unsafe fn add_vulkan(&mut self, _param: (u64, u64), _grad: (u64, u64), _len: usize, _dtype: DType) -> Result<()> {
        Err(crate::error::Error::new(
            crate::error::ErrorKind::Unsupported,
            "Vulkan buffers need an optimizer from sam_create_vulkan",
        ))
    }

    /// Re-points the gradients of in-place tensors at other device ranges (GPU only), all or
    /// nothing; the weights stay, so it is allowed between the two steps.
    fn rebind_external_grads(&mut self, _items: Vec<(usize, wgpu::Buffer, u64)>) -> Result<()> {
        Err(crate::error::Error::new(
            crate::error::ErrorKind::Unsupported,
            "device buffers need a GPU backend on the same device",
        ))
    }

    /// Re-points in-place tensors at other device buffers (GPU only), keeping their state; all
    /// or nothing, the overlap checks against the ranges after the call.
    fn rebind_externals(&mut self, _items: Vec<(usize, External)>) -> Result<()> {
        Err(crate::error::Error::new(
            crate::error::ErrorKind::Unsupported,
            "device buffers need a GPU backend on the same device",
        ))
    }

    /// Re-points in-place tensor `tensor` at other `VkBuffer`s (a GPU engine on the host's device).
    ///
    /// # Safety
    /// As `GpuEngine::add_vulkan` for the new buffers.
    unsafe fn rebind_vulkan(&mut self, _tensor: usize, _param: (u64, u64), _grad: (u64, u64)) -> Result<()> {
        Err(crate::error::Error::new(
            crate::error::ErrorKind::Unsupported,
            "Vulkan buffers need an optimizer from sam_create_vulkan",
        ))
    }

    /// Tensors of one cohort (group, and the number of updates applied before it was registered)
    /// share every per-tensor scalar of every step; the GPU packs each cohort on its own.
    fn set_cohort(&mut self, _tensor: usize, _cohort: (u32, u64)) {}

    /// The first tensor (index, element) whose gradient, or under ASAM weight, is not finite.
    /// Only called after `ascent_norm` reported a non-finite sum, to say where.
    fn find_non_finite(&self, adaptive: bool) -> Option<(usize, usize)>;

    /// Threads (CPU) or adapter (GPU), for messages and `samopt info`.
    fn describe(&self) -> String;

    /// The GPU adapter, for a GPU backend.
    fn adapter(&self) -> Option<AdapterSummary> {
        None
    }

    /// Test hook (GPU only): cuts arenas into windows of at most `bytes`, as an adapter with that
    /// storage-binding limit would, so that tests cross window boundaries on any adapter.
    fn limit_window(&mut self, _bytes: u64) {}

    /// Starts timing the passes with timestamp queries (GPU only); `false` when not possible.
    fn enable_timing(&mut self) -> bool {
        false
    }

    /// The pass times of the last step, when timing is enabled.
    fn pass_times(&mut self) -> Option<PassTimes> {
        None
    }

    /// Times a device buffer copy of `bytes` (GPU only), for benchmarks: nanoseconds per repetition
    /// and whether they come from timestamps.
    fn time_copy(&self, _bytes: u64, _reps: usize) -> Result<Vec<(f64, bool)>> {
        Err(crate::error::Error::new(crate::error::ErrorKind::Unsupported, "only a GPU backend times device copies"))
    }
}
