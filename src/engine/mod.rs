//! The engine: the registry of tensors, the state machine of a SAM step, and the backend.
//!
//! ```text
//!   Idle --first_step--> Perturbed --second_step--> Idle          (a SAM step)
//!   Idle --first_step--> Single    --second_step--> Idle          (a single-gradient step)
//! ```
//!
//! The step schedule ([`Config::schedule`]) decides at each first step, from the global gradient
//! norm, which of the two it is; `schedule` holds its state.
//!
//! Registration happens while idle. Every call checks everything it needs before the first write,
//! so a call that fails leaves the optimizer and the host's buffers as they were.
//!
//! This file holds the types, construction and the choice of backend; `registry` the tensors and
//! groups, `steps` the state machine's steps, `schedule` the step schedule's decisions,
//! `snapshot` the optimizer's side of checkpoints.

use std::collections::BTreeMap;

use crate::backend::{AdapterSummary, PassTimes, Passes};
use crate::config::{Backend, Config};
use crate::cpu::CpuEngine;
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use crate::gpu::GpuEngine;
use crate::math::TensorStep;

mod registry;
mod schedule;
mod snapshot;
mod steps;

use schedule::ScheduleState;

/// Identifies a registered tensor: its index in registration order, from 0.
pub type TensorId = u32;

/// Identifies a parameter group: 0 is the default group, further ones come from
/// [`Optimizer::add_group`].
pub type GroupId = u32;

/// What a successful first step did, as the step schedule decided ([`Config::schedule`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstStep {
    /// A SAM step: the weights are at `w + e(w)`; the host computes the gradient there, then
    /// calls the second step.
    Perturbed,
    /// A single-gradient step: the weights were not moved. The host skips the second
    /// forward/backward and calls the second step now, which applies the base update with the
    /// schedule's direction (C: `SAM_STEP_SINGLE_GRADIENT`).
    SingleGradient,
    /// With loss scaling: a gradient held inf or NaN (the scale overflowed). Nothing moved, the
    /// loss scale was lowered; the host skips the second forward/backward, and the second step
    /// ends the step as skipped (C: `SAM_STEP_SKIPPED`).
    Skipped,
}

/// What a successful second step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecondStep {
    /// The weights were restored; there is no built-in base optimizer, so the host steps.
    Restored,
    /// The weights were restored and the built-in base optimizer updated them.
    Updated,
    /// The second gradient held NaN or infinity: the weights were restored exactly, and the base
    /// update and its state were left untouched, so a loss-scaled loop can lower its scale and
    /// go on (C: `SAM_STEP_SKIPPED`). Without a built-in base optimizer this happens only under
    /// LookSAM, which reduces the second gradient too: the host's optimizer skips the step then.
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
    /// A single-gradient step: at `w` (not perturbed); the second step applies the update.
    Single,
    /// A step the loss scale skipped at its first step (overflow): at `w`; the second step ends
    /// it (or the next first step starts over).
    Skipped,
}

/// The dynamic loss scale's state (see [`crate::LossScale`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ScaleState {
    /// `S` for the next backward pass.
    pub scale: f64,
    /// Consecutive good steps since `S` last changed.
    pub good_steps: u64,
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
    /// samopt may write the gradient (owned tensors, and host tensors registered so).
    grad_writable: bool,
    /// A tensor in host buffers the host registered: the start addresses of its parameter and
    /// gradient ranges (their keys in `Optimizer::ranges`), which a rebind moves.
    host: Option<(usize, usize)>,
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
    /// Completed steps whose second step was not skipped (SAM and single-gradient steps).
    steps: u64,
    /// The current rho ([`Optimizer::set_rho`]); `config.rho` is the configured one.
    rho: f64,
    /// The step schedule's counters and statistics.
    schedule: ScheduleState,
    /// The schedule's state before this step's decision: a skipped step is taken back, so that the
    /// run goes on as if it never happened (the same decisions as a run without it).
    schedule_before: ScheduleState,
    /// This step's global squared ascent norm and (LookSAM) global `||g_v||^2`, from the first
    /// step, for the second.
    step_grad_sq: f64,
    step_gv_sq: Option<f64>,
    /// Loss scaling: the scale's state, and the scale this step's gradients carry (1 without).
    scaler: Option<ScaleState>,
    step_scale: f64,
    groups: Vec<Group>,
    /// The current learning rate (groups scale it).
    lr: f64,
    /// Per-tensor scalars of the update, reused every step.
    tensor_steps: Vec<TensorStep>,
    /// The preconditioned perturbation's per-tensor bias corrections, reused every step.
    precond_bias: Vec<f32>,
    /// The host's all-reduce, for parameters sharded across workers: the first step's squared
    /// norm and (with a base optimizer) the second step's reduction are summed with it.
    allreduce: Option<AllReduce>,
    /// The local squared norm from [`local_sq_norm`](Self::local_sq_norm), for the next
    /// [`first_step_with_norm`](Self::first_step_with_norm).
    local_sum_sq: Option<f64>,
    /// Shards accumulated by [`accumulate_step`](Self::accumulate_step) since the last second step.
    shards: u32,
    /// Test hook: the next backend pass of this kind fails with a device error before it runs.
    fault: Option<Fault>,
}

/// A backend pass a test can make fail ([`Optimizer::inject_fault`]), to check that the engine
/// recovers from a device error in it.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The norm pass of a first step.
    Norm,
    /// The second step's reduction of the second gradient.
    Reduce,
    /// The second step's fused restore + update.
    Update,
}

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
        if config.backend == Backend::Auto {
            // AUTO may never open an adapter, but a choice the user made must exist now.
            crate::gpu::check_choice(config.adapter.as_deref())?;
        }
        let passes: Option<Box<dyn Passes>> = match config.backend {
            Backend::Cpu => Some(Box::new(CpuEngine::new(&config)?)),
            Backend::Gpu => Some(Box::new(GpuEngine::new(&config)?)),
            Backend::Auto => None,
        };
        let (weight_decay, lr, rho) = (config.effective_weight_decay(), config.lr, config.rho);
        let schedule = ScheduleState::new(&config.schedule);
        Ok(Optimizer {
            rho,
            schedule_before: schedule,
            schedule,
            step_grad_sq: 0.0,
            step_gv_sq: None,
            scaler: config.loss_scale.map(|l| ScaleState { scale: l.init, good_steps: 0 }),
            step_scale: 1.0,
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
            precond_bias: Vec::new(),
            allreduce: None,
            local_sum_sq: None,
            shards: 0,
            fault: None,
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

    /// An optimizer whose GPU engine runs on the host's own Vulkan device (see
    /// `sam_create_vulkan` for the contract).
    pub(crate) fn on_vulkan(handles: &crate::gpu::vulkan::VulkanHandles, config: Config) -> Result<Optimizer> {
        Optimizer::on_host_device(config, |config| crate::gpu::vulkan::open(handles, config))
    }

    /// The backend, created on first use under AUTO: the GPU for owned tensors when an adapter
    /// exists, else the CPU.
    fn passes_for(&mut self, owned: bool) -> Result<&mut Box<dyn Passes>> {
        if self.passes.is_none() {
            let passes: Box<dyn Passes> = if owned {
                match GpuEngine::new_auto(&self.config) {
                    Ok(gpu) => {
                        self.backend = Backend::Gpu;
                        Box::new(gpu)
                    }
                    Err(e) => {
                        // Once per handle: each handle decides its backend once.
                        log::warn!("samopt: backend AUTO runs on the CPU: {}", e.message());
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

    /// Test hook: the next backend pass of kind `fault` fails with a device error before it runs,
    /// as a device that rejects the submission would. Not for production use.
    #[doc(hidden)]
    pub fn inject_fault(&mut self, fault: Fault) {
        self.fault = Some(fault);
    }

    /// Test hook: the GPU engine cuts its arenas into windows of at most `bytes` (as an adapter
    /// with that storage-binding limit would), so tests cross window boundaries on any adapter.
    /// No effect on the CPU engine or before the backend exists. Not for production use.
    #[doc(hidden)]
    pub fn limit_gpu_window(&mut self, bytes: u64) {
        if let Some(p) = self.passes.as_mut() {
            p.limit_window(bytes);
        }
    }

    /// The injected device error for a pass of kind `pass`, once.
    fn take_fault(&mut self, pass: Fault) -> Result<()> {
        if self.fault == Some(pass) {
            self.fault = None;
            return Err(Error::new(ErrorKind::Device, format!("injected device error in the {pass:?} pass")));
        }
        Ok(())
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

    /// Number of completed steps, SAM and single-gradient: second steps that were not
    /// [skipped](SecondStep::Skipped). With a built-in base optimizer, the number of updates
    /// applied, as PyTorch counts them.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// With loss scaling, the scale `S` to multiply the next loss by before its backward pass
    /// (`None` without loss scaling). The second step may change it: a host whose own optimizer
    /// unscales (no built-in base) reads it before the second step.
    pub fn loss_scale(&self) -> Option<f64> {
        self.scaler.map(|s| s.scale)
    }

    /// Completed SAM steps (two gradients), of [`steps`](Self::steps).
    pub fn sam_steps(&self) -> u64 {
        self.schedule.sam_steps
    }

    /// Completed single-gradient steps (one gradient), of [`steps`](Self::steps). Gradient
    /// evaluations so far: `2 * sam_steps() + single_steps()`.
    pub fn single_steps(&self) -> u64 {
        self.schedule.single_steps
    }

    /// The L2 norm `||T_w * g||_2` of the last successful first step, over every registered
    /// tensor. Reported for p = infinity too, where the perturbation itself does not use it.
    /// With loss scaling, of the true gradient (the buffers' divided by the scale).
    pub fn grad_norm(&self) -> Option<f64> {
        self.last_norm
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

    fn expect_idle(&self, action: &str) -> Result<()> {
        match self.phase {
            Phase::Idle => Ok(()),
            Phase::Perturbed => {
                Err(Error::state(format!("cannot {action} while the weights are perturbed: call second_step first")))
            }
            Phase::Accumulating => Err(Error::state(format!(
                "cannot {action} between shards: finish the accumulation with second_step first"
            ))),
            Phase::Single => Err(Error::state(format!(
                "cannot {action} during a single-gradient step: call second_step first (the first step \
                 returned single-gradient: the weights were not moved)"
            ))),
            Phase::Skipped => Err(Error::state(format!(
                "cannot {action} during a step the loss scale skipped: call second_step first (or the next \
                 first_step)"
            ))),
        }
    }

    /// A first step (or its norm) may start at `w`: idle, or between shards.
    fn expect_step_start(&self, action: &str) -> Result<()> {
        match self.phase {
            Phase::Perturbed | Phase::Single => self.expect_idle(action),
            Phase::Idle | Phase::Accumulating | Phase::Skipped => Ok(()),
        }
    }
}
