//! The engine: the registry of tensors, the state machine of a SAM step, and the backend.
//!
//! ```text
//!   Idle --first_step--> Perturbed --second_step--> Idle
//! ```
//!
//! Registration happens while idle. Every call checks everything it needs before the first write,
//! so a call that fails leaves the optimizer and the host's buffers as they were.

use std::collections::BTreeMap;

use crate::backend::{HostTensor, Part, Passes};
use crate::checkpoint::{self, Expected, Snapshot, TensorRecord};
use crate::config::BaseOptimizer;
use crate::config::{Backend, Config};
use crate::cpu::CpuEngine;
use crate::dtype::{DType, Element};
use crate::error::{Error, ErrorKind, Result};
use crate::gpu::{AdapterSummary, GpuEngine, PassTimes};
use crate::math::{Perturbation, TensorStep, UpdateStep};

/// Identifies a registered tensor: its index in registration order, from 0.
pub type TensorId = u32;

/// Identifies a parameter group: 0 is the default group, further ones come from
/// [`Optimizer::add_group`].
pub type GroupId = u32;

/// What a successful second step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecondStep {
    /// The weights were restored; there is no built-in base optimizer, so the host steps.
    Restored,
    /// The weights were restored and the built-in base optimizer updated them.
    Updated,
    /// The second gradient held NaN or infinity: the weights were restored exactly, and the base
    /// update and its state were left untouched, so a loss-scaled loop can lower its scale and
    /// go on (C: `SAM_STEP_SKIPPED`).
    Skipped,
}

/// A parameter group, as PyTorch's `param_groups`: its own learning-rate scale and weight decay.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Group {
    lr_scale: f64,
    weight_decay: f64,
}

/// The phase of a SAM step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// At `w`: ready for registration or a first step.
    Idle,
    /// At `w + e(w)`: the host computes the gradient here, then calls the second step (or, per
    /// shard, [`Optimizer::accumulate_step`]).
    Perturbed,
    /// Per-shard SAM: at `w` again, with perturbed gradients accumulated; the next shard's first
    /// step, or the second step that applies their mean, follows.
    Accumulating,
}

/// An all-reduce over the workers of a data-parallel job: sums `values` in place across them.
pub type AllReduce = Box<dyn FnMut(&mut [f64]) -> Result<()> + Send>;

/// Metadata the engine keeps per tensor.
#[derive(Clone, Copy, Debug)]
struct TensorInfo {
    len: usize,
    dtype: DType,
    /// Allocated by the backend (`add_tensor`), rather than registered host buffers.
    owned: bool,
    group: GroupId,
    /// Base updates applied to this tensor (AdamW's `t` is this plus one at the next update).
    updates: u64,
    /// Base updates the optimizer had applied when this tensor was registered: tensors with the
    /// same group and epoch share every per-tensor scalar.
    epoch: u64,
}

/// A Sharpness-Aware Minimization optimizer over host buffers.
///
/// The host registers its parameter and gradient buffers once, then for every training step:
/// computes the gradient at `w`, calls [`first_step`](Self::first_step) (the weights move to
/// `w + e(w)`), computes the gradient again at the perturbed weights, calls
/// [`second_step`](Self::second_step) (the weights get back exactly the bits of `w`), and runs its
/// base optimizer on the second gradient.
///
/// On the CPU backend an optimizer-allocated tensor is reachable as slices:
///
/// ```
/// use samopt::{Backend, Config, Optimizer};
///
/// let mut sam = Optimizer::new(Config { rho: 0.1, backend: Backend::Cpu, ..Config::default() })?;
/// let id = sam.add_tensor(&[1.0f32, 2.0, 3.0])?;
/// sam.grad_mut::<f32>(id)?.copy_from_slice(&[3.0, 0.0, 4.0]);
/// sam.first_step()?;
/// // ||g|| = 5, so e = 0.1 * g / 5.
/// assert_eq!(sam.param::<f32>(id)?, &[1.0 + 0.06, 2.0, 3.0 + 0.08]);
/// sam.second_step()?;
/// assert_eq!(sam.param::<f32>(id)?, &[1.0, 2.0, 3.0]);
/// # Ok::<(), samopt::Error>(())
/// ```
pub struct Optimizer {
    config: Config,
    /// The backend running the passes; [`Backend::Auto`] until the first registration decides.
    backend: Backend,
    passes: Option<Box<dyn Passes>>,
    phase: Phase,
    tensors: Vec<TensorInfo>,
    /// Every registered host byte range, `start -> (end, tensor)`, to refuse overlaps.
    ranges: BTreeMap<usize, (usize, TensorId)>,
    last_norm: Option<f64>,
    /// The norm of the last second gradient, before clipping.
    last_second_norm: Option<f64>,
    /// Completed SAM steps whose second step was not skipped.
    steps: u64,
    groups: Vec<Group>,
    /// The current learning rate (groups scale it).
    lr: f64,
    /// Per-tensor scalars of the update, reused every step.
    tensor_steps: Vec<TensorStep>,
    /// The host's all-reduce of the squared gradient norm, for global-norm SAM across workers.
    allreduce: Option<AllReduce>,
    /// The local squared norm from [`local_sq_norm`](Self::local_sq_norm), for the next
    /// [`first_step_with_norm`](Self::first_step_with_norm).
    local_sum_sq: Option<f64>,
    /// Shards accumulated by [`accumulate_step`](Self::accumulate_step) since the last second step.
    shards: u32,
}

/// Whether AUTO has already said, once per process, that it fell back to the CPU.
static AUTO_FALLBACK_LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl std::fmt::Debug for Optimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Optimizer")
            .field("config", &self.config)
            .field("backend", &self.backend_description())
            .field("phase", &self.phase)
            .field("tensors", &self.tensors.len())
            .field("last_norm", &self.last_norm)
            .finish()
    }
}

impl Optimizer {
    /// Validates `config` and creates an optimizer with no tensors.
    ///
    /// [`Backend::Gpu`] opens the adapter now and fails with [`ErrorKind::Device`] when there is
    /// none. [`Backend::Auto`] decides at the first registration: the CPU for host buffers, the GPU
    /// for tensors the optimizer allocates ([`add_tensor`](Self::add_tensor)), falling back to the
    /// CPU (and saying so once through the `log` crate) when no adapter is found.
    pub fn new(config: Config) -> Result<Optimizer> {
        config.validate()?;
        let passes: Option<Box<dyn Passes>> = match config.backend {
            Backend::Cpu => Some(Box::new(CpuEngine::new(&config)?)),
            Backend::Gpu => Some(Box::new(GpuEngine::new(&config)?)),
            Backend::Auto => None,
        };
        let (weight_decay, lr) = (config.effective_weight_decay(), config.lr);
        Ok(Optimizer {
            backend: config.backend,
            config,
            passes,
            phase: Phase::Idle,
            tensors: Vec::new(),
            ranges: BTreeMap::new(),
            last_norm: None,
            last_second_norm: None,
            steps: 0,
            groups: vec![Group { lr_scale: 1.0, weight_decay }],
            lr,
            tensor_steps: Vec::new(),
            allreduce: None,
            local_sum_sq: None,
            shards: 0,
        })
    }

    /// An optimizer whose GPU engine runs on the host's own wgpu device and queue, for Rust
    /// engines built on wgpu: register their buffers with [`register_wgpu`](Self::register_wgpu)
    /// and the passes run on them in place. `adapter_info` names the device in messages.
    /// `config.backend` is ignored (the backend is this device). samopt installs no callbacks on
    /// the device; it submits to `queue` inside its calls and waits for its work before returning.
    pub fn on_wgpu_device(
        device: wgpu::Device,
        queue: wgpu::Queue,
        adapter_info: Option<wgpu::AdapterInfo>,
        config: Config,
    ) -> Result<Optimizer> {
        Optimizer::on_host_device(config, |config| GpuEngine::on_device(device, queue, adapter_info, config))
    }

    /// An optimizer on a GPU engine that `open` builds on the host's own device, from the
    /// validated config.
    fn on_host_device(config: Config, open: impl FnOnce(&Config) -> Result<GpuEngine>) -> Result<Optimizer> {
        let config = Config { backend: Backend::Gpu, ..config };
        config.validate()?;
        let engine = open(&config)?;
        // AUTO creates no engine yet; this device's engine takes its place.
        let mut opt = Optimizer::new(Config { backend: Backend::Auto, ..config.clone() })?;
        opt.passes = Some(Box::new(engine));
        opt.backend = Backend::Gpu;
        opt.config = config;
        Ok(opt)
    }

    /// What every new tensor must pass, however it is registered: the optimizer idle, at least
    /// one element, room for another id, a byte size inside the address space (returned).
    fn check_new_tensor(&self, what: &str, len: usize, dtype: DType) -> Result<usize> {
        self.expect_idle(what)?;
        if len == 0 {
            return Err(Error::invalid("len = 0: a tensor needs at least one element"));
        }
        if self.tensors.len() >= TensorId::MAX as usize {
            return Err(Error::invalid(format!("too many tensors: {}", self.tensors.len())));
        }
        len.checked_mul(dtype.size()).filter(|&b| b <= isize::MAX as usize).ok_or_else(|| {
            Error::invalid(format!("len = {len}: {len} elements of {} overflow the address space", dtype.name()))
        })
    }

    /// Registers a tensor in host device buffers: `add` hands them to the backend, which refuses
    /// (`unsupported`) when there is none.
    fn register_in_place(
        &mut self,
        len: usize,
        dtype: DType,
        unsupported: &str,
        add: impl FnOnce(&mut Box<dyn Passes>) -> Result<()>,
    ) -> Result<TensorId> {
        self.check_new_tensor("register a tensor", len, dtype)?;
        add(self.passes.as_mut().ok_or_else(|| Error::new(ErrorKind::Unsupported, unsupported))?)?;
        self.push_tensor(len, dtype, false);
        Ok((self.tensors.len() - 1) as TensorId)
    }

    /// Registers a tensor that lives in the host's wgpu buffers (on the device given to
    /// [`on_wgpu_device`](Self::on_wgpu_device)): `len` elements of `dtype` at byte `param_offset`
    /// of `param` and `grad_offset` of `grad`. The passes read and write them in place; samopt
    /// keeps its backup and state in buffers of its own. Both buffers need the `STORAGE` usage,
    /// offsets a multiple of the device's `min_storage_buffer_offset_alignment`, and the tensor a
    /// multiple of 16 bytes; each is checked, and a failure changes nothing.
    pub fn register_wgpu(
        &mut self,
        param: &wgpu::Buffer,
        param_offset: u64,
        grad: &wgpu::Buffer,
        grad_offset: u64,
        len: usize,
        dtype: DType,
    ) -> Result<TensorId> {
        let external = crate::gpu::External { param: param.clone(), param_offset, grad: grad.clone(), grad_offset };
        self.register_in_place(len, dtype, "register_wgpu needs an optimizer from on_wgpu_device", |passes| {
            passes.add_external(external, len, dtype)
        })
    }

    /// An optimizer whose GPU engine runs on the host's own Vulkan device (see
    /// `sam_create_vulkan` for the contract).
    pub(crate) fn on_vulkan(handles: &crate::gpu::vulkan::VulkanHandles, config: Config) -> Result<Optimizer> {
        Optimizer::on_host_device(config, |config| crate::gpu::vulkan::open(handles, config))
    }

    /// Registers a tensor in the host's `VkBuffer`s (handles and byte offsets).
    ///
    /// # Safety
    /// Both buffers must be live buffers of the optimizer's `VkDevice` with the STORAGE_BUFFER
    /// usage, unused by the host during samopt's calls, for the optimizer's lifetime.
    pub(crate) unsafe fn register_vulkan(
        &mut self,
        param: (u64, u64),
        grad: (u64, u64),
        len: usize,
        dtype: DType,
    ) -> Result<TensorId> {
        self.register_in_place(len, dtype, "Vulkan buffers need an optimizer from sam_create_vulkan", |passes| {
            // SAFETY: the caller's contract, passed on.
            unsafe { passes.add_vulkan(param, grad, len, dtype) }
        })
    }

    /// The backend, created on first use under AUTO: the GPU for owned tensors when an adapter
    /// exists, else the CPU.
    fn passes_for(&mut self, owned: bool) -> Result<&mut Box<dyn Passes>> {
        if self.passes.is_none() {
            let passes: Box<dyn Passes> = if owned {
                match GpuEngine::new(&self.config) {
                    Ok(gpu) => {
                        self.backend = Backend::Gpu;
                        Box::new(gpu)
                    }
                    Err(e) => {
                        if !AUTO_FALLBACK_LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                            log::warn!("samopt: backend AUTO runs on the CPU: {}", e.message());
                        }
                        self.backend = Backend::Cpu;
                        Box::new(CpuEngine::new(&self.config)?)
                    }
                }
            } else {
                self.backend = Backend::Cpu;
                Box::new(CpuEngine::new(&self.config)?)
            };
            self.passes = Some(passes);
        }
        Ok(self.passes.as_mut().expect("set above"))
    }

    fn passes(&mut self) -> Result<&mut Box<dyn Passes>> {
        self.passes
            .as_mut()
            .ok_or_else(|| Error::state("no tensor is registered: register the parameters before the first step"))
    }

    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The backend that runs the passes; [`Backend::Auto`] only before the first registration
    /// of an AUTO optimizer.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A one-line description of the backend, e.g. `cpu (2 threads, Avx2)`.
    pub fn backend_description(&self) -> String {
        self.passes.as_ref().map_or_else(|| "auto (decided at the first registration)".to_owned(), |p| p.describe())
    }

    /// The GPU adapter, when the GPU backend runs the passes.
    pub fn adapter(&self) -> Option<AdapterSummary> {
        self.passes.as_ref().and_then(|p| p.adapter())
    }

    /// The phase of the current step.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Number of registered tensors.
    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// The element count and type of tensor `id`, if it is registered.
    pub fn tensor(&self, id: TensorId) -> Option<(usize, DType)> {
        self.tensors.get(id as usize).map(|t| (t.len, t.dtype))
    }

    /// Number of completed SAM steps: second steps that were not [skipped](SecondStep::Skipped).
    /// With a built-in base optimizer, the number of updates applied, as PyTorch counts them.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The L2 norm `||T_w * g||_2` of the last successful first step, over every registered
    /// tensor. Reported for p = infinity too, where the perturbation itself does not use it.
    pub fn grad_norm(&self) -> Option<f64> {
        self.last_norm
    }

    /// Registers a parameter buffer and its gradient buffer, both owned by the host.
    ///
    /// Checks, and refuses with [`ErrorKind::InvalidArgument`]: NULL or misaligned pointers,
    /// `len == 0`, a byte size or range that overflows, parameter and gradient overlapping each
    /// other or any range registered before (the same buffer twice included). With
    /// [`ErrorKind::InvalidState`]: registering between a first and a second step.
    ///
    /// # Safety
    /// `param` must be valid for reads and writes and `grad` for reads of `len` elements of
    /// `dtype`, for as long as the optimizer lives; the host must not access them while an
    /// optimizer call runs, and writes the gradient only between calls.
    pub unsafe fn register_host_raw(
        &mut self,
        param: *mut u8,
        grad: *const u8,
        len: usize,
        dtype: DType,
    ) -> Result<TensorId> {
        let bytes = self.check_new_tensor("register a tensor", len, dtype)?;
        let p = Self::check_range("param", param as usize, bytes, dtype)?;
        let g = Self::check_range("grad", grad as usize, bytes, dtype)?;
        if p.start < g.end && g.start < p.end {
            return Err(Error::invalid(format!(
                "param = {param:p} and grad = {grad:p} overlap ({bytes} bytes each): they must be separate buffers"
            )));
        }
        for (name, r) in [("param", &p), ("grad", &g)] {
            if let Some(other) = self.overlapping(r) {
                return Err(Error::invalid(format!(
                    "{name} = {:#x} ({bytes} bytes) overlaps a buffer of tensor {other}, registered before",
                    r.start
                )));
            }
        }
        let id = self.tensors.len() as TensorId;
        self.passes_for(false)?.add_host(HostTensor { param, grad, len, dtype })?;
        self.ranges.insert(p.start, (p.end, id));
        self.ranges.insert(g.start, (g.end, id));
        self.push_tensor(len, dtype, false);
        Ok(id)
    }

    /// Typed form of [`register_host_raw`](Self::register_host_raw).
    ///
    /// # Safety
    /// As [`register_host_raw`](Self::register_host_raw).
    pub unsafe fn register_host<T: Element>(&mut self, param: *mut T, grad: *const T, len: usize) -> Result<TensorId> {
        unsafe { self.register_host_raw(param.cast(), grad.cast(), len, T::DTYPE) }
    }

    /// Allocates a parameter/gradient pair of `len` zeros, owned by the optimizer: in host memory
    /// on the CPU backend, on the device on the GPU backend (where the optimizer's state then stays
    /// too). Write and read it with [`write_param`](Self::write_param),
    /// [`write_grad`](Self::write_grad), [`read_param`](Self::read_param); on the CPU also
    /// through slices ([`param`](Self::param), [`grad_mut`](Self::grad_mut)).
    pub fn add_zeroed_tensor(&mut self, len: usize, dtype: DType) -> Result<TensorId> {
        self.check_new_tensor("add a tensor", len, dtype)?;
        self.passes_for(true)?.add_owned(len, dtype)?;
        self.push_tensor(len, dtype, true);
        Ok((self.tensors.len() - 1) as TensorId)
    }

    /// [`add_zeroed_tensor`](Self::add_zeroed_tensor), with the parameter set to `init`.
    pub fn add_tensor<T: Element>(&mut self, init: &[T]) -> Result<TensorId> {
        let id = self.add_zeroed_tensor(init.len(), T::DTYPE)?;
        self.write_param(id, init)?;
        Ok(id)
    }

    /// Checks that `id` is an owned tensor of `T` with `len` elements.
    fn owned_info<T: Element>(&self, id: TensorId, len: Option<usize>) -> Result<TensorInfo> {
        let info = *self.tensors.get(id as usize).filter(|t| t.owned).ok_or_else(|| {
            Error::invalid(format!("id = {id}: not a tensor allocated by the optimizer (add_tensor)"))
        })?;
        if info.dtype != T::DTYPE {
            return Err(Error::invalid(format!(
                "id = {id}: the tensor holds {}, not {}",
                info.dtype.name(),
                T::DTYPE.name()
            )));
        }
        if let Some(len) = len.filter(|&l| l != info.len) {
            return Err(Error::invalid(format!("len = {len}: tensor {id} has {} elements", info.len)));
        }
        Ok(info)
    }

    /// [`write_param`](Self::write_param) or [`write_grad`](Self::write_grad) by `part`.
    pub(crate) fn write_owned_part<T: Element>(&mut self, id: TensorId, part: Part, data: &[T]) -> Result<()> {
        self.write_part(id, part, data)
    }

    /// [`read_param`](Self::read_param) or [`read_grad`](Self::read_grad) by `part`.
    pub(crate) fn read_owned_part<T: Element>(&mut self, id: TensorId, part: Part, out: &mut [T]) -> Result<()> {
        self.read_part(id, part, out)
    }

    fn write_part<T: Element>(&mut self, id: TensorId, part: Part, data: &[T]) -> Result<()> {
        self.owned_info::<T>(id, Some(data.len()))?;
        self.passes()?.write_owned(id as usize, part, bytemuck::cast_slice(data))
    }

    fn read_part<T: Element>(&mut self, id: TensorId, part: Part, out: &mut [T]) -> Result<()> {
        self.owned_info::<T>(id, Some(out.len()))?;
        self.passes()?.read_owned(id as usize, part, bytemuck::cast_slice_mut(out))
    }

    /// Overwrites the parameter of an owned tensor (`data.len()` must be its length). Between the
    /// two steps a write is overwritten by the restore.
    pub fn write_param<T: Element>(&mut self, id: TensorId, data: &[T]) -> Result<()> {
        self.write_part(id, Part::Param, data)
    }

    /// Overwrites the gradient of an owned tensor (`data.len()` must be its length).
    pub fn write_grad<T: Element>(&mut self, id: TensorId, data: &[T]) -> Result<()> {
        self.write_part(id, Part::Grad, data)
    }

    /// Copies the parameter of an owned tensor into `out`: `w`, or `w + e(w)` between the steps.
    pub fn read_param<T: Element>(&mut self, id: TensorId, out: &mut [T]) -> Result<()> {
        self.read_part(id, Part::Param, out)
    }

    /// Copies the gradient of an owned tensor into `out`.
    pub fn read_grad<T: Element>(&mut self, id: TensorId, out: &mut [T]) -> Result<()> {
        self.read_part(id, Part::Grad, out)
    }

    /// Host addresses of an owned tensor that lives in host memory.
    fn host_owned<T: Element>(&self, id: TensorId) -> Result<(TensorInfo, *mut u8, *mut u8)> {
        let info = self.owned_info::<T>(id, None)?;
        let (p, g) = self.passes.as_ref().and_then(|p| p.owned_host_ptrs(id as usize)).ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                format!("id = {id}: the tensor lives on the GPU; use read_param/write_param/write_grad"),
            )
        })?;
        Ok((info, p, g))
    }

    /// The parameter of an owned tensor in host memory (CPU backend): `w`, or `w + e(w)` between
    /// the two steps.
    pub fn param<T: Element>(&self, id: TensorId) -> Result<&[T]> {
        let (info, p, _) = self.host_owned::<T>(id)?;
        // SAFETY: an owned, T-aligned host buffer of `len` elements, alive as long as `self`,
        // written only through `&mut self`.
        Ok(unsafe { std::slice::from_raw_parts(p.cast::<T>(), info.len) })
    }

    /// The parameter of an owned tensor in host memory, for the host's own update.
    pub fn param_mut<T: Element>(&mut self, id: TensorId) -> Result<&mut [T]> {
        let (info, p, _) = self.host_owned::<T>(id)?;
        // SAFETY: as in `param`; `&mut self` makes the borrow exclusive.
        Ok(unsafe { std::slice::from_raw_parts_mut(p.cast::<T>(), info.len) })
    }

    /// The gradient of an owned tensor in host memory, for the host to fill.
    pub fn grad_mut<T: Element>(&mut self, id: TensorId) -> Result<&mut [T]> {
        let (info, _, g) = self.host_owned::<T>(id)?;
        // SAFETY: as in `param_mut`.
        Ok(unsafe { std::slice::from_raw_parts_mut(g.cast::<T>(), info.len) })
    }

    /// Starts timing the GPU passes with timestamp queries, for benchmarks; `false` on the CPU or
    /// when the adapter cannot.
    pub fn enable_pass_timing(&mut self) -> bool {
        self.passes.as_mut().is_some_and(|p| p.enable_timing())
    }

    /// The GPU time of each pass of the last step, once [`enable_pass_timing`](Self::enable_pass_timing)
    /// succeeded.
    pub fn pass_times(&mut self) -> Option<PassTimes> {
        self.passes.as_mut().and_then(|p| p.pass_times())
    }

    /// Times `reps` device buffer-to-buffer copies of `bytes` on the optimizer's GPU, the bandwidth
    /// reference of the benchmarks: nanoseconds per copy, and whether they come from timestamps
    /// (else wall-clock submit-to-completion).
    pub fn time_device_copy(&self, bytes: u64, reps: usize) -> Result<Vec<(f64, bool)>> {
        match &self.passes {
            Some(p) => p.time_copy(bytes, reps),
            None => Err(Error::new(ErrorKind::Unsupported, "no backend yet: register a tensor first")),
        }
    }

    /// The ascent: computes one global norm over every registered gradient, then moves every
    /// parameter to `w + e(w)`, saving `w`.
    ///
    /// A NaN or infinity in any gradient (under ASAM, in any weight too) is found by the norm pass
    /// itself; the call then returns [`ErrorKind::NonFinite`] and no parameter is touched, so a
    /// loss-scaled loop can lower its scale and retry.
    pub fn first_step(&mut self) -> Result<()> {
        if self.allreduce.is_none() {
            let sum_sq = self.checked_local_norm("take a first step")?;
            return self.perturb_with(sum_sq.sqrt());
        }
        // Every worker must reach the exchange, a worker with a bad local gradient too: it sends
        // NaN, so that all of them refuse the step together instead of waiting for it.
        let (local, local_error) = match self.checked_local_norm("take a first step") {
            Ok(v) => (v, None),
            Err(e) if e.kind() == ErrorKind::NonFinite => (f64::NAN, Some(e)),
            Err(e) => return Err(e),
        };
        let mut sum_sq = [local];
        let allreduce = self.allreduce.as_mut().expect("checked above");
        allreduce(&mut sum_sq).map_err(|e| Error::new(ErrorKind::Callback, format!("the all-reduce failed: {e}")))?;
        if let Some(e) = local_error {
            return Err(e);
        }
        if !sum_sq[0].is_finite() {
            return Err(Error::new(
                ErrorKind::NonFinite,
                "the global gradient norm is NaN or infinite: a gradient on another worker holds NaN or infinity; \
                 no parameter was changed",
            ));
        }
        self.perturb_with(sum_sq[0].sqrt())
    }

    /// The local squared norm `sum (T_w g)^2` over this optimizer's tensors: the norm pass, with
    /// its non-finite check (whose error names the tensor and element).
    fn checked_local_norm(&mut self, action: &str) -> Result<f64> {
        self.expect_step_start(action)?;
        if self.tensors.is_empty() {
            return Err(Error::state("no tensor is registered: register the parameters before the first step"));
        }
        self.passes()?;
        let (config, passes) = (&self.config, self.passes.as_mut().expect("checked above"));
        let norm = passes.ascent_norm(config)?;
        if !norm.sum_sq.is_finite() {
            let place = match passes.find_non_finite(config.adaptive) {
                Some((t, e)) => format!("tensor {t}, element {e}"),
                None => "an element".to_owned(),
            };
            let what = if self.config.adaptive { "gradient or weight" } else { "gradient" };
            return Err(Error::new(
                ErrorKind::NonFinite,
                format!("{what} at {place} is NaN or infinite; no parameter was changed"),
            ));
        }
        Ok(norm.sum_sq)
    }

    fn perturb_with(&mut self, norm: f64) -> Result<()> {
        let (config, passes) = (&self.config, self.passes.as_mut().expect("a norm pass ran"));
        passes.perturb(&Perturbation::new(config, norm))?;
        self.last_norm = Some(norm);
        self.local_sum_sq = None;
        self.phase = Phase::Perturbed;
        Ok(())
    }

    /// Global-norm SAM across workers, step 1 of 2: the local squared norm `sum (T_w g)^2` over
    /// this optimizer's tensors (one read of the gradients, nothing written). The host sums it
    /// over the workers with its own engine (MPI, NCCL, Gloo) and passes the square root to
    /// [`first_step_with_norm`](Self::first_step_with_norm). A NaN or infinity in a local gradient
    /// returns [`ErrorKind::NonFinite`]; so that every worker learns it, a host that cannot stop
    /// the all-reduce can sum NaN instead.
    pub fn local_sq_norm(&mut self) -> Result<f64> {
        let v = self.checked_local_norm("compute the local norm")?;
        self.local_sum_sq = Some(v);
        Ok(v)
    }

    /// Global-norm SAM across workers, step 2 of 2: the ascent with the given global norm
    /// (the square root of the all-reduced [`local_sq_norm`](Self::local_sq_norm)s). A NaN or
    /// infinite `global_norm` means a worker's gradient was not finite: [`ErrorKind::NonFinite`],
    /// nothing changed. The gradients must not change between the two calls: the local check of
    /// the first is reused, so the gradients are read once.
    pub fn first_step_with_norm(&mut self, global_norm: f64) -> Result<()> {
        self.expect_step_start("take a first step")?;
        if !global_norm.is_finite() {
            return Err(Error::new(
                ErrorKind::NonFinite,
                format!(
                    "global_norm = {global_norm}: a worker's gradient holds NaN or infinity; no parameter was changed"
                ),
            ));
        }
        if global_norm < 0.0 {
            return Err(Error::invalid(format!("global_norm = {global_norm}: a norm is >= 0")));
        }
        // The local gradients must be finite too: reuse the check of local_sq_norm, else run it.
        match self.local_sum_sq.take() {
            Some(v) if v.is_finite() => {}
            _ => {
                self.checked_local_norm("take a first step")?;
            }
        }
        self.perturb_with(global_norm)
    }

    /// Installs the host's all-reduce: from then on [`first_step`](Self::first_step) sums the
    /// local squared gradient norm across the workers with it and perturbs with the global norm
    /// (one number exchanged, no gradient copied). `None` removes it.
    pub fn set_allreduce(&mut self, allreduce: Option<AllReduce>) {
        self.allreduce = allreduce;
    }

    /// Per-shard SAM (m-sharpness in one process): after the first step on shard k's gradient and
    /// the host's backward pass at the perturbed weights, restores `w` exactly and adds that
    /// perturbed gradient to an accumulator. The next shard's first step follows; after the last
    /// shard, [`second_step`](Self::second_step) writes the mean of the accumulated gradients into
    /// the gradient buffers (the one time samopt writes them) and, with a built-in base optimizer,
    /// steps with it; without one, the host's optimizer uses it.
    pub fn accumulate_step(&mut self) -> Result<()> {
        if self.phase != Phase::Perturbed {
            return Err(Error::state("accumulate_step without a first step: call first_step for the shard first"));
        }
        if self.config.gsam_alpha.is_some() {
            return Err(Error::new(ErrorKind::Unsupported, "per-shard accumulation with GSAM is not supported"));
        }
        self.passes.as_mut().expect("a first step ran").accumulate(self.shards == 0)?;
        self.shards += 1;
        self.phase = Phase::Accumulating;
        Ok(())
    }

    /// Shards accumulated since the last second step.
    pub fn accumulated_shards(&self) -> u32 {
        self.shards
    }

    /// The second step: restores every parameter to exactly the bits it had before the first step
    /// and, with a built-in base optimizer, updates it with the gradient the host computed at the
    /// perturbed point, in the same pass.
    ///
    /// With a base optimizer the second gradient is first reduced (its norm for clipping, its dot
    /// product with the first gradient for GSAM, and a finiteness check); a NaN or infinity there
    /// makes the step [`SecondStep::Skipped`]: restored, no update, state untouched. Without one,
    /// the host runs its own optimizer afterwards.
    pub fn second_step(&mut self) -> Result<SecondStep> {
        match self.phase {
            Phase::Idle => {
                return Err(Error::state("second step without a first step: call first_step before second_step"));
            }
            Phase::Perturbed if self.shards > 0 => {
                return Err(Error::state(format!(
                    "{} shards are accumulated: accumulate the last shard with accumulate_step before second_step",
                    self.shards
                )));
            }
            _ => {}
        }
        let accumulated = self.phase == Phase::Accumulating;
        let config = &self.config;
        let passes = self.passes.as_mut().expect("a first step ran");
        if accumulated {
            // w is restored already; the mean of the shards' perturbed gradients takes g's place.
            passes.write_mean(1.0 / self.shards as f32)?;
            self.shards = 0;
        }
        if config.base == BaseOptimizer::None {
            if !accumulated {
                passes.restore()?;
            }
            self.phase = Phase::Idle;
            self.steps += 1;
            return Ok(SecondStep::Restored);
        }
        let gsam = config.gsam_alpha.is_some();
        let reduced = passes.second_reduce(gsam)?;
        if !reduced.sum_sq.is_finite() {
            passes.restore()?;
            self.phase = Phase::Idle;
            return Ok(SecondStep::Skipped);
        }
        let norm = reduced.sum_sq.sqrt();
        // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1.
        let clip = config.max_grad_norm.map_or(1.0, |m| (m / (norm + 1e-6)).min(1.0));
        // GSAM: c*g' - alpha*(g - (g.g'/||g'||^2) g') = (c + alpha*g.g'/||g'||^2) g' - alpha g;
        // g_perp does not change when g' is scaled, so clipping scales g' alone.
        let (a, b) = match config.gsam_alpha {
            Some(alpha) => {
                let ratio = if reduced.sum_sq > 0.0 { reduced.dot / reduced.sum_sq } else { 0.0 };
                (clip + alpha * ratio, alpha)
            }
            None => (clip, 0.0),
        };
        let step = UpdateStep::new(config, a, b);
        self.tensor_steps.clear();
        for t in &self.tensors {
            let g = self.groups[t.group as usize];
            self.tensor_steps.push(TensorStep::new(config, self.lr * g.lr_scale, g.weight_decay, t.updates + 1));
        }
        passes.update(&step, &self.tensor_steps)?;
        for t in &mut self.tensors {
            t.updates += 1;
        }
        self.last_second_norm = Some(norm);
        self.phase = Phase::Idle;
        self.steps += 1;
        Ok(SecondStep::Updated)
    }

    /// Sets the learning rate of the built-in base optimizer from the next second step on (each
    /// group scales it): the hook for a learning-rate schedule, called between steps.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::invalid(format!("lr = {lr}: must be finite and >= 0")));
        }
        self.lr = lr;
        Ok(())
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// The L2 norm of the last applied second gradient (before clipping); `None` before the first
    /// update or without a base optimizer.
    pub fn second_grad_norm(&self) -> Option<f64> {
        self.last_second_norm
    }

    /// Adds a parameter group with its learning-rate scale (`lr * lr_scale` is its learning rate)
    /// and weight decay (`None`: group 0's). Group 0 holds every tensor until
    /// [`set_group`](Self::set_group) moves it; the gradient norm stays one global norm over all
    /// groups, as in the reference.
    pub fn add_group(&mut self, lr_scale: f64, weight_decay: Option<f64>) -> Result<GroupId> {
        if !(lr_scale.is_finite() && lr_scale >= 0.0) {
            return Err(Error::invalid(format!("lr_scale = {lr_scale}: must be finite and >= 0")));
        }
        let weight_decay = weight_decay.unwrap_or(self.groups[0].weight_decay);
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return Err(Error::invalid(format!("weight_decay = {weight_decay}: must be finite and >= 0")));
        }
        if self.groups.len() >= GroupId::MAX as usize {
            return Err(Error::invalid("too many groups"));
        }
        self.groups.push(Group { lr_scale, weight_decay });
        Ok((self.groups.len() - 1) as GroupId)
    }

    /// Moves tensor `id` into `group`. Between the two steps this is refused.
    pub fn set_group(&mut self, id: TensorId, group: GroupId) -> Result<()> {
        self.expect_idle("change a tensor's group")?;
        if group as usize >= self.groups.len() {
            return Err(Error::invalid(format!("group = {group}: only {} groups exist", self.groups.len())));
        }
        let count = self.tensors.len();
        let t = self
            .tensors
            .get_mut(id as usize)
            .ok_or_else(|| Error::invalid(format!("id = {id}: only {count} tensors are registered")))?;
        t.group = group;
        let cohort = (group, t.epoch);
        if let Some(p) = self.passes.as_mut() {
            p.set_cohort(id as usize, cohort);
        }
        Ok(())
    }

    /// The group of tensor `id`.
    pub fn group(&self, id: TensorId) -> Option<GroupId> {
        self.tensors.get(id as usize).map(|t| t.group)
    }

    fn records(&self) -> Vec<TensorRecord> {
        self.tensors
            .iter()
            .map(|t| TensorRecord {
                len: t.len as u64,
                dtype: t.dtype,
                group: t.group,
                updates: t.updates,
                epoch: t.epoch,
            })
            .collect()
    }

    fn state_len(&self) -> usize {
        self.config.state_per_element() * self.tensors.iter().map(|t| t.len).sum::<usize>()
    }

    /// Bytes [`save_state`](Self::save_state) writes now.
    pub fn state_size(&self) -> usize {
        checkpoint::size(self.groups.len(), self.tensors.len(), self.state_len())
    }

    /// Writes the optimizer's state (step counts, learning rate, groups, per-tensor counters and
    /// the base optimizer's state) into `out`, which must hold at least
    /// [`state_size`](Self::state_size) bytes; returns the bytes written. Refused between the two
    /// steps. See [`checkpoint`] for the format.
    pub fn save_state(&mut self, out: &mut [u8]) -> Result<usize> {
        self.expect_idle("save the state")?;
        let size = self.state_size();
        if out.len() < size {
            return Err(Error::invalid(format!("len = {}: the state needs {size} bytes", out.len())));
        }
        let mut state = vec![0f32; self.state_len()];
        if let Some(p) = self.passes.as_mut() {
            p.export_state(&mut state)?;
        }
        let snapshot = Snapshot {
            steps: self.steps,
            lr: self.lr,
            last_norm: self.last_norm,
            last_second_norm: self.last_second_norm,
            groups: self.groups.iter().map(|g| (g.lr_scale, g.weight_decay)).collect(),
            tensors: self.records(),
            state,
        };
        checkpoint::encode(&snapshot, self.config.fingerprint(), &mut out[..size]);
        Ok(size)
    }

    /// Restores a state written by [`save_state`](Self::save_state) by an optimizer of the same
    /// configuration with the same registrations (count, lengths, dtypes, groups). A truncated or
    /// corrupted checkpoint, another version, configuration or layout is refused with
    /// [`ErrorKind::Io`] and a message that says which, and the optimizer stays as it was.
    /// Refused between the two steps.
    pub fn load_state(&mut self, bytes: &[u8]) -> Result<()> {
        self.expect_idle("load a state")?;
        let records = self.records();
        let want = Expected {
            config_fingerprint: self.config.fingerprint(),
            tensors: &records,
            groups: self.groups.len(),
            state: self.state_len(),
        };
        let s = checkpoint::decode(bytes, &want)?;
        if !s.state.is_empty() {
            // Creates the backend under AUTO (the optimizer has registrations, so it exists).
            self.passes()?.import_state(&s.state)?;
        }
        self.steps = s.steps;
        self.lr = s.lr;
        self.last_norm = s.last_norm;
        self.last_second_norm = s.last_second_norm;
        for (g, &(lr_scale, weight_decay)) in self.groups.iter_mut().zip(&s.groups) {
            *g = Group { lr_scale, weight_decay };
        }
        for (k, (t, r)) in self.tensors.iter_mut().zip(&s.tensors).enumerate() {
            t.updates = r.updates;
            if t.epoch != r.epoch {
                t.epoch = r.epoch;
                if let Some(p) = self.passes.as_mut() {
                    p.set_cohort(k, (t.group, t.epoch));
                }
            }
        }
        Ok(())
    }

    /// [`save_state`](Self::save_state) to a file: written to a temporary file beside it, flushed
    /// to disk and renamed into place, so a crash never leaves half a checkpoint under `path`.
    pub fn save_state_file(&mut self, path: &std::path::Path) -> Result<()> {
        use std::io::Write;
        let mut bytes = vec![0u8; self.state_size()];
        self.save_state(&mut bytes)?;
        let io = |what: &str, e: std::io::Error| Error::new(ErrorKind::Io, format!("{what} {}: {e}", path.display()));
        let name =
            path.file_name().ok_or_else(|| Error::invalid(format!("path = {}: not a file name", path.display())))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("writing", e));
        }
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("renaming the checkpoint into", e));
        }
        // The rename itself reaches the disk with the directory.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// [`load_state`](Self::load_state) from a file.
    pub fn load_state_file(&mut self, path: &std::path::Path) -> Result<()> {
        let bytes =
            std::fs::read(path).map_err(|e| Error::new(ErrorKind::Io, format!("reading {}: {e}", path.display())))?;
        self.load_state(&bytes).map_err(|e| Error::new(e.kind(), format!("{}: {}", path.display(), e.message())))
    }

    fn push_tensor(&mut self, len: usize, dtype: DType, owned: bool) {
        let epoch = self.steps;
        self.tensors.push(TensorInfo { len, dtype, owned, group: 0, updates: 0, epoch });
        let id = self.tensors.len() - 1;
        if let Some(p) = self.passes.as_mut() {
            p.set_cohort(id, (0, epoch));
        }
    }

    fn expect_idle(&self, action: &str) -> Result<()> {
        match self.phase {
            Phase::Idle => Ok(()),
            Phase::Perturbed => {
                Err(Error::state(format!("cannot {action} while the weights are perturbed: call second_step first")))
            }
            Phase::Accumulating => Err(Error::state(format!(
                "cannot {action} between shards: finish the accumulation with second_step first"
            ))),
        }
    }

    /// A first step (or its norm) may start at `w`: idle, or between shards.
    fn expect_step_start(&self, action: &str) -> Result<()> {
        match self.phase {
            Phase::Perturbed => {
                Err(Error::state(format!("cannot {action} while the weights are perturbed: call second_step first")))
            }
            Phase::Idle | Phase::Accumulating => Ok(()),
        }
    }

    fn check_range(name: &str, addr: usize, bytes: usize, dtype: DType) -> Result<std::ops::Range<usize>> {
        if addr == 0 {
            return Err(Error::new(ErrorKind::NullPointer, format!("{name} is NULL")));
        }
        if !addr.is_multiple_of(dtype.size()) {
            return Err(Error::invalid(format!(
                "{name} = {addr:#x} is not aligned to {} bytes, as {} elements need",
                dtype.size(),
                dtype.name()
            )));
        }
        let end = addr.checked_add(bytes).ok_or_else(|| {
            Error::invalid(format!("{name} = {addr:#x} plus {bytes} bytes overflows the address space"))
        })?;
        Ok(addr..end)
    }

    /// The tensor whose registered range overlaps `r`, if any.
    fn overlapping(&self, r: &std::ops::Range<usize>) -> Option<TensorId> {
        // The last range starting before r.end is the only candidate: registered ranges are
        // pairwise disjoint, so earlier ones end before it starts.
        let (_, &(end, id)) = self.ranges.range(..r.end).next_back()?;
        (end > r.start).then_some(id)
    }
}
