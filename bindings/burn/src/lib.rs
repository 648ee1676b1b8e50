//! # samopt-burn: Sharpness-Aware Minimization for Burn models, in place on Burn's wgpu backend
//!
//! [Burn](https://burn.dev)'s wgpu backend and samopt run on the same wgpu (30), so samopt's GPU
//! engine can share Burn's device and queue and run its passes (the gradient norm, the
//! perturbation `w + e(w)`, the exact restore and the SGD/AdamW update) on the very buffers of
//! Burn's memory pool that hold a model's parameters and gradients: no copy of the model, no host
//! round trip.
//!
//! ```no_run
//! use burn::prelude::*;
//! use samopt_burn::{Sam, samopt::{BaseOptimizer, Config}};
//!
//! # #[derive(Module, Debug)] struct Net { fc: burn::nn::Linear }
//! # impl Net { fn forward(&self, x: Tensor<2>) -> Tensor<2> { self.fc.forward(x) } }
//! # fn main() -> samopt_burn::Result<()> {
//! let (device, setup) = samopt_burn::init_wgpu()?;     // Burn's wgpu device, shared
//! let device = device.autodiff();
//! let mut model = Net { fc: burn::nn::LinearConfig::new(4, 2).init(&device) };
//! let config = Config { base: BaseOptimizer::Sgd, lr: 0.1, rho: 0.05, ..Config::default() };
//! let mut sam = Sam::new(&device, &setup, config)?;
//! let (x, y) = (Tensor::<2>::ones([8, 4], &device), Tensor::<2>::zeros([8, 2], &device));
//! for _ in 0..10 {
//!     // backward, first step (w -> w + e(w)), backward at w + e(w), second step (restore + SGD)
//!     let step = sam.step(&mut model, |m| (m.forward(x.clone()) - y.clone()).powi_scalar(2).mean())?;
//!     println!("loss {}", step.loss.into_scalar::<f32>());
//! }
//! # Ok(()) }
//! ```
//!
//! With Burn's own optimizer instead (samopt only perturbs and restores: `base: None`), use
//! [`Sam::step_with`]; the optimizer runs on the gradient at the perturbed point.
//!
//! ## What happens to each parameter
//!
//! Every float parameter of the module that requires a gradient is found by a module visitor
//! (once, if tied) and registered with samopt at the first step. samopt's GPU engine binds a
//! tensor where it is when it is row-major, at an offset that is a multiple of the device's
//! storage offset alignment, a multiple of 16 bytes long, and overlaps no other registered range;
//! Burn's pool packs many tensors into one `wgpu::Buffer`, and that is fine. Parameters that miss
//! one of these (a transposed weight, a view at an odd offset, a bias of 10 `f32`) are copied once,
//! on the device, into a fresh allocation of their own, and the module's parameter becomes that
//! copy: from then on they are stepped in place too, a short one with the padding the pool gives
//! every allocation (zeroed; Burn never reads it). Gradients that miss one of the rules are copied
//! each pass into a zero-padded buffer (a Burn `slice_assign`; counted in [`Placement`]), the
//! others are bound where Burn's backward put them.
//!
//! Burn replaces parameters (a loaded record, its own optimizer, `to_device` on this device): at
//! the next step they are found where they now are and rebound, samopt's state kept; short ones
//! are copied again, as samopt can only pad in an allocation it made. A parameter whose shape or
//! dtype changed, that moved to another device or that left the module is refused, with its path,
//! before anything moves. samopt holds every allocation it binds (cubecl's `ManagedResource`), so
//! the pool cannot free, reuse or move it while samopt may write it.
//!
//! ## Ordering on the shared queue
//!
//! samopt submits to the queue Burn submits to. Before each of its passes the helper flushes
//! Burn's device (with fusion, the lazily recorded graph executes up to every parameter and
//! gradient and the pending command buffers are submitted), so Burn's work is ahead of samopt's in
//! the queue; samopt waits for its own passes before it returns, so Burn's next work sees the
//! perturbed or updated weights.

#![deny(missing_docs)]

mod locate;
mod model;

use std::collections::HashMap;

use burn::Tensor;
use burn::module::{Module, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Device, wgpu::WgpuSetup};
pub use samopt;
use samopt::{BaseOptimizer, Config, DType, Error, ErrorKind, FirstStep, Optimizer, SecondStep, TensorId};

use locate::Located;
use model::{Found, GradBinder, Move, Survey};

/// samopt's result type (errors name the parameter by its module path).
pub type Result<T> = samopt::Result<T>;

/// Initializes Burn's wgpu runtime on the default adapter and returns its device with the wgpu
/// handles it runs on, for [`Sam::new`]. Once per process: Burn's runtime cannot be initialized
/// twice; an application that has its own wgpu device registers it with
/// `Device::wgpu_options().setup(setup).init()` instead and passes that setup.
pub fn init_wgpu() -> Result<(Device, WgpuSetup)> {
    Device::wgpu_options()
        .init_with_setup()
        .map_err(|e| Error::new(ErrorKind::Device, format!("Burn's wgpu runtime did not start: {e}")))
}

/// Where Burn keeps `tensor`'s data: its `wgpu::Buffer`, the byte offset of its first element, and
/// whether it is row-major contiguous (with fusion, the recorded graph executes up to it first).
/// For checking placement: a parameter samopt steps in place keeps its buffer and offset from step
/// to step.
pub fn buffer_of<const D: usize>(tensor: &Tensor<D>) -> Result<(wgpu::Buffer, u64, bool)> {
    let at = locate::locate(tensor.clone(), &|| "the tensor".to_owned())?;
    Ok((at.buffer.clone(), at.offset, at.contiguous))
}

/// The float parameters of `model` that require a gradient, in the order samopt registers them
/// (module visit order, a tied parameter once), as `(path, values)` read back to the host as
/// `f32`. For checks and debugging: it waits for the device and copies every parameter.
pub fn read_params<M: Module>(model: &M) -> Vec<(String, Vec<f32>)> {
    let mut reader = model::Reader::new(None);
    model.visit(&mut reader);
    reader.out
}

/// The gradients in `grads` of the parameters [`read_params`] reads, in the same order, as
/// `(path, values)` (zeros for a parameter without one).
pub fn read_grads<M: Module>(model: &M, grads: &GradientsParams) -> Vec<(String, Vec<f32>)> {
    let mut reader = model::Reader::new(Some(grads));
    model.visit(&mut reader);
    reader.out
}

/// What a training step did.
#[derive(Debug)]
pub struct Step {
    /// samopt's decision: a SAM step, a single-gradient step of a schedule (one forward/backward),
    /// or a step skipped by the loss scaler.
    pub kind: FirstStep,
    /// The loss at `w` (without autodiff).
    pub loss: Tensor<1>,
    /// The loss at the perturbed point `w + e(w)`, on SAM steps.
    pub perturbed_loss: Option<Tensor<1>>,
}

/// Where the parameters are stepped, as of the last step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// Parameters registered with samopt, all stepped in Burn's buffers.
    pub params: usize,
    /// Of those, parameters whose byte size is not a multiple of 16: they live in allocations
    /// samopt-burn made, and samopt binds them with the padding Burn's pool gives every allocation
    /// (zeroed).
    pub padded: usize,
    /// Parameter copies so far into fresh allocations: those samopt cannot bind where they are (not
    /// row-major, at an offset it cannot bind, or a size not a multiple of 16 bytes in an
    /// allocation it did not make), once each, and again whenever Burn replaces one (its own
    /// optimizer does, every step).
    pub moves: u64,
    /// Gradients copied into a padded buffer in the last step (both backward passes): those
    /// whose size is not a multiple of 16 bytes, views, or overlapping another range.
    pub staged_grads: usize,
    /// Bytes copied for those gradients in the last step.
    pub staged_bytes: u64,
}

/// Wall time of the last step's parts, when [`Sam::time_steps`] is on.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTimes {
    /// Finding the parameters, and moving any (the prepare).
    pub prepare: std::time::Duration,
    /// Finding the gradients in Burn's pool, copying the ones to stage, rebinding (both backward
    /// passes).
    pub bind: std::time::Duration,
    /// samopt's first and second steps (its passes, until the device finished them).
    pub passes: std::time::Duration,
}

/// One registered parameter.
pub(crate) struct Entry {
    pub id: ParamId,
    pub path: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    /// Elements samopt steps: the parameter's, padded to a multiple of 16 bytes.
    pub padded: usize,
    /// samopt's id, once registered (at the first step, when there is a gradient to bind).
    pub tensor: Option<TensorId>,
    /// Where the weights are, as of the last [`Sam::prepare`], pinned while samopt may bind them
    /// (held, the pool cannot free, hand out again or move the allocation).
    pub at: Option<Located>,
    /// `at` is an allocation samopt-burn made (a copy of the parameter): the bytes after the
    /// parameter, up to the end of the allocation, are its own, so it may be padded there.
    pub moved: bool,
}

impl Entry {
    fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// SAM for a Burn model on Burn's wgpu device: samopt's [`Optimizer`] on Burn's own device and
/// queue, with the model's parameters registered in place.
pub struct Sam {
    opt: Optimizer,
    /// Burn's device, without autodiff.
    device: Device,
    queue: wgpu::Queue,
    /// Offsets samopt can bind: the device's storage offset alignment (at least 16).
    align: u64,
    entries: Vec<Entry>,
    index: HashMap<ParamId, usize>,
    placement: Placement,
    /// A checkpoint to load as soon as the parameters are registered (the first step).
    pending_state: Option<Vec<u8>>,
    /// Whether to time the steps (Burn's work is then waited for before each pass).
    timing: bool,
    times: StepTimes,
}

impl std::fmt::Debug for Sam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sam").field("optimizer", &self.opt).field("placement", &self.placement).finish()
    }
}

impl Sam {
    /// samopt on Burn's wgpu `device` (with or without autodiff), whose handles are `setup` (from
    /// [`init_wgpu`] or the setup the application registered with Burn). `config` is samopt's:
    /// rho, the variant, the base optimizer (`BaseOptimizer::None` to step with Burn's own
    /// optimizer through [`step_with`](Self::step_with)), schedules, loss scaling. `config.backend`
    /// is ignored: the backend is this device. `setup` must be the handles of `device` (samopt
    /// submits its passes to that queue, on those buffers).
    pub fn new(device: &Device, setup: &WgpuSetup, config: Config) -> Result<Sam> {
        let device = device.clone().inner();
        let opt = Optimizer::on_wgpu_device(
            setup.device.clone(),
            setup.queue.clone(),
            Some(setup.adapter.get_info()),
            config,
        )?;
        let limits = setup.device.limits();
        let align = (limits.min_storage_buffer_offset_alignment as u64).max(16);
        Ok(Sam {
            opt,
            device,
            queue: setup.queue.clone(),
            align,
            entries: Vec::new(),
            index: HashMap::new(),
            placement: Placement::default(),
            pending_state: None,
            timing: false,
            times: StepTimes::default(),
        })
    }

    /// samopt's optimizer: the learning rate and rho (`set_lr`, `set_rho`), counters, the loss
    /// scale, checkpoints (`save_state_file` / `load_state_file`, once the first step has
    /// registered the parameters).
    pub fn optimizer(&mut self) -> &mut Optimizer {
        &mut self.opt
    }

    /// samopt's state (momentum or Adam's moments, LookSAM's `g_v`, the schedule's state, the loss
    /// scale, the step counters), for a checkpoint beside Burn's record of the model. The
    /// parameters are registered at the first step: before it, this is a state with no tensors.
    pub fn save_state(&mut self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.opt.state_size()];
        let n = self.opt.save_state(&mut out)?;
        out.truncate(n);
        Ok(out)
    }

    /// Loads a state [`save_state`](Self::save_state) gave, for the same model (parameters in the
    /// same order, of the same sizes). Loaded now when the parameters are registered; otherwise
    /// kept and loaded at the next step as soon as they are, before anything moves (that step
    /// fails, changing no weight, if it does not fit).
    pub fn load_state(&mut self, bytes: &[u8]) -> Result<()> {
        if !self.entries.is_empty() && self.entries.iter().all(|e| e.tensor.is_some()) {
            return self.opt.load_state(bytes);
        }
        self.pending_state = Some(bytes.to_vec());
        Ok(())
    }

    /// Where the parameters are stepped, as of the last step.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// Times the parts of each step (see [`last_times`](Self::last_times)). For benchmarks: Burn's
    /// device is then synchronized (waited for) before each of samopt's passes instead of only
    /// flushed, so that a pass's time is its own.
    pub fn time_steps(&mut self, on: bool) {
        self.timing = on;
    }

    /// The parts of the last step, when [`time_steps`](Self::time_steps) is on (zero otherwise).
    pub fn last_times(&self) -> StepTimes {
        self.times
    }

    /// The module path and id of each parameter found so far, in samopt's tensor order.
    pub fn params(&self) -> impl Iterator<Item = (&str, ParamId)> {
        self.entries.iter().map(|e| (e.path.as_str(), e.id))
    }

    /// Prepares `model` for a step: finds every float parameter that requires a gradient, copies
    /// those samopt cannot bind where they are (not row-major, at an offset it cannot bind,
    /// overlapping another, or short: a size not a multiple of 16 bytes, in an allocation it did
    /// not make) into fresh allocations of their own (once; again when Burn replaces a short one),
    /// and checks the ones found before (shape, dtype, device, still in the model).
    /// [`step`](Self::step) calls it; call it yourself to place the parameters before the first
    /// step. An error changes nothing; samopt's state is not touched.
    pub fn prepare<M: Module>(&mut self, model: &mut M) -> Result<()> {
        self.expect_idle()?;
        let found = self.survey(model)?;
        if found.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "the model has no float parameter that requires a gradient",
            ));
        }
        self.check_known(&found)?;
        let mut moves = std::collections::HashSet::new();
        let mut taken: Vec<(wgpu::Buffer, u64, u64)> = Vec::new();
        for f in &found {
            let padded = padded_len(f.located.len, f.located.dtype);
            if model::bindable(&f.located, padded, self.own_allocation(f), self.align, &taken) {
                let s = f.located.offset;
                taken.push((f.located.buffer.clone(), s, s + (padded * f.located.dtype.size()) as u64));
            } else {
                moves.insert(f.id);
            }
        }
        if moves.is_empty() {
            self.record(found, &moves, &HashMap::new());
            return Ok(());
        }
        // Those that samopt cannot bind where they are are copied into fresh allocations, then
        // checked again: each must now be bindable, with room for its padding. `before` stays
        // pinned until the copies are checked, so no copy can land in a slot a parameter held.
        let before: HashMap<ParamId, Found> = found.into_iter().map(|f| (f.id, f)).collect();
        let mut mover = Move::new(&self.device, &moves);
        let moved = model.clone().map(&mut mover);
        let tails = mover.finish();
        let found = self.survey(&moved)?;
        let mut taken: Vec<(wgpu::Buffer, u64, u64)> = Vec::new();
        for f in &found {
            let padded = padded_len(f.located.len, f.located.dtype);
            let own = if moves.contains(&f.id) {
                // A copy made just now (the old allocation still pinned, so not the same place).
                before.get(&f.id).is_none_or(|b| !same_place(&b.located, &f.located))
            } else {
                self.own_allocation(f)
            };
            if !model::bindable(&f.located, padded, own, self.align, &taken) {
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!(
                        "parameter `{}`: not in a place samopt can bind even after a copy into a fresh allocation \
                         (offset {}, row-major {}, {} bytes of allocation for {})",
                        f.path,
                        f.located.offset,
                        f.located.contiguous,
                        f.located.alloc,
                        padded * f.located.dtype.size()
                    ),
                ));
            }
            let s = f.located.offset;
            taken.push((f.located.buffer.clone(), s, s + (padded * f.located.dtype.size()) as u64));
        }
        self.placement.moves += moves.len() as u64;
        drop(before);
        self.record(found, &moves, &tails);
        *model = moved;
        Ok(())
    }

    /// Whether the bytes after parameter `f`, up to the end of its allocation, are its own: only
    /// in an allocation samopt-burn made (a copy), where the parameter still is.
    fn own_allocation(&self, f: &Found) -> bool {
        self.index.get(&f.id).is_some_and(|&k| {
            let e = &self.entries[k];
            e.moved && e.at.as_ref().is_some_and(|at| same_place(at, &f.located))
        })
    }

    /// Registered parameters must still be in the model, with their shape and dtype.
    fn check_known(&self, found: &[Found]) -> Result<()> {
        let here: HashMap<ParamId, &Found> = found.iter().map(|f| (f.id, f)).collect();
        for e in &self.entries {
            match here.get(&e.id) {
                None => {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        format!(
                            "parameter `{}` is no longer in the model (or no longer requires a gradient): \
                             samopt keeps state for it; create a new Sam for a changed model",
                            e.path
                        ),
                    ));
                }
                Some(f) if f.shape != e.shape || f.located.dtype != e.dtype => {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        format!(
                            "parameter `{}`: {:?} of {} now, {:?} of {} when registered; create a new Sam for a \
                             changed model",
                            e.path,
                            f.shape,
                            f.located.dtype.name(),
                            e.shape,
                            e.dtype.name()
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Records where each parameter is now (new ones get an entry); `moved` were just copied
    /// into allocations made here, whose padding is zeroed (`tails`: see `model::zero_padding`).
    fn record(
        &mut self,
        found: Vec<Found>,
        moved: &std::collections::HashSet<ParamId>,
        tails: &HashMap<ParamId, [u8; 2]>,
    ) {
        for f in found {
            let k = *self.index.entry(f.id).or_insert_with(|| {
                self.entries.push(Entry {
                    id: f.id,
                    path: f.path.clone(),
                    shape: f.shape.clone(),
                    dtype: f.located.dtype,
                    padded: padded_len(f.located.len, f.located.dtype),
                    tensor: None,
                    at: None,
                    moved: false,
                });
                self.entries.len() - 1
            });
            let e = &mut self.entries[k];
            if moved.contains(&f.id) {
                model::zero_padding(&self.queue, &f.located, e.padded, tails.get(&f.id).copied());
                e.moved = true;
            } else if !e.at.as_ref().is_some_and(|at| same_place(at, &f.located)) {
                e.moved = false;
            }
            e.at = Some(f.located);
        }
        self.placement.params = self.entries.len();
        self.placement.padded = self.entries.iter().filter(|e| e.padded != e.elements()).count();
    }

    /// One SAM training step with samopt's base optimizer (`config.base` SGD or AdamW): the loss
    /// and its gradient at `w`, the first step (`w -> w + e(w)`, in Burn's buffers), the loss and
    /// its gradient at `w + e(w)`, the second step (restore `w` exactly, then the base update).
    /// On a single-gradient step of a schedule (LookSAM, interval, random, AE-SAM) the second
    /// forward/backward is skipped. `loss` is called once or twice with the model and returns a
    /// scalar loss on the autodiff device.
    ///
    /// `model` is updated in place (a parameter samopt cannot bind where it is is replaced by a
    /// copy, see [`prepare`](Self::prepare)). An error before the first step changes nothing. If
    /// `loss` panics at the perturbed point, or its gradient cannot be bound, the step is ended
    /// with the first gradient (the weights restored exactly, then the base update with that
    /// gradient) before the panic or error goes on: the model is never left perturbed.
    pub fn step<M: Module>(&mut self, model: &mut M, loss: impl FnMut(&M) -> Tensor<1>) -> Result<Step> {
        if self.opt.config().base == BaseOptimizer::None {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "base = none: samopt only perturbs and restores; step with Burn's optimizer through Sam::step_with",
            ));
        }
        self.run(model, loss, None::<fn(M, GradientsParams) -> M>)
    }

    /// One SAM training step with Burn's own optimizer (`config.base` = `BaseOptimizer::None`):
    /// as [`step`](Self::step), but after samopt restores `w`, `base` steps the model with the
    /// gradient at the perturbed point (on a single-gradient step, with the one gradient; under
    /// LookSAM, with the direction samopt wrote into it), typically
    /// `|model, grads| optim.step(lr, model, grads)`. Not called on a skipped step.
    /// Burn's optimizer replaces the parameters it updates; they are found and rebound at the
    /// next step (a copy each step for the parameters that live in padded allocations).
    pub fn step_with<M: Module>(
        &mut self,
        model: &mut M,
        loss: impl FnMut(&M) -> Tensor<1>,
        base: impl FnOnce(M, GradientsParams) -> M,
    ) -> Result<Step> {
        if self.opt.config().base != BaseOptimizer::None {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "base = {:?}: samopt updates the weights itself; Sam::step_with is for Burn's optimizer \
                     (base = none)",
                    self.opt.config().base
                ),
            ));
        }
        self.run(model, loss, Some(base))
    }

    fn run<M: Module, F: FnMut(&M) -> Tensor<1>, O: FnOnce(M, GradientsParams) -> M>(
        &mut self,
        model: &mut M,
        mut loss: F,
        base: Option<O>,
    ) -> Result<Step> {
        let clock = std::time::Instant::now;
        let t = clock();
        self.prepare(model)?;
        self.times = StepTimes { prepare: t.elapsed(), ..StepTimes::default() };
        self.placement.staged_grads = 0;
        self.placement.staged_bytes = 0;
        let first_loss = loss(model);
        let mut grads = GradientsParams::from_grads(first_loss.backward(), model);
        if self.timing {
            // The backward's own time stays out of the binding's.
            self.flush()?;
        }
        let t = clock();
        let mut first_bound = self.bind_grads(model, &mut grads, false)?;
        self.flush()?;
        self.times.bind += t.elapsed();
        let t = clock();
        let kind = self.opt.first_step()?;
        self.times.passes += t.elapsed();
        let mut perturbed_loss = None;
        let mut second_bound = None;
        if kind == FirstStep::Perturbed {
            // The first gradient stays bound (and alive) until the second is: whatever happens at
            // w + e(w), the second step can end the step and put the weights back.
            let at_perturbed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let l = loss(model);
                let g = GradientsParams::from_grads(l.backward(), model);
                (l, g)
            }));
            let (l, mut g) = match at_perturbed {
                Ok(v) => v,
                Err(panic) => {
                    let _ = self.flush();
                    let _ = self.opt.second_step();
                    std::panic::resume_unwind(panic);
                }
            };
            if self.timing {
                let _ = self.flush();
            }
            let t = clock();
            let bound = self.bind_grads(model, &mut g, true);
            let _ = self.flush();
            self.times.bind += t.elapsed();
            match bound {
                Ok(b) => second_bound = Some(b),
                Err(e) => {
                    let _ = self.flush();
                    let _ = self.opt.second_step();
                    return Err(e);
                }
            }
            perturbed_loss = Some(l.inner());
            grads = g;
        }
        self.flush()?;
        let t = clock();
        let second = self.opt.second_step()?;
        self.times.passes += t.elapsed();
        if let Some(base) = base
            && kind != FirstStep::Skipped
            && second != SecondStep::Skipped
        {
            // The gradients that were copied go back into `grads` as they are now.
            let used = second_bound.as_mut().unwrap_or(&mut first_bound);
            for b in used.iter_mut() {
                if let Some(give_back) = b.give_back.take() {
                    give_back(&mut grads);
                }
            }
            *model = base(model.clone(), grads);
        }
        drop((first_bound, second_bound));
        Ok(Step { kind, loss: first_loss.inner(), perturbed_loss })
    }

    /// Binds each registered parameter's gradient in `grads` for the next pass; registers the
    /// parameters new since the last step (weights where [`prepare`](Self::prepare) found them).
    /// `between`: between the two steps only the gradients move. Returns the bound gradients,
    /// to be kept alive (and pinned) until samopt is done with them.
    fn bind_grads<M: Module>(
        &mut self,
        model: &M,
        grads: &mut GradientsParams,
        between: bool,
    ) -> Result<Vec<model::BoundGrad>> {
        let index: HashMap<ParamId, (usize, usize, String)> = self
            .index
            .iter()
            .map(|(&id, &k)| (id, (k, self.entries[k].padded, self.entries[k].path.clone())))
            .collect();
        let taken = self
            .entries
            .iter()
            .filter_map(|e| {
                let at = e.at.as_ref()?;
                let s = at.offset;
                Some((at.buffer.clone(), s, s + e.padded as u64 * e.dtype.size() as u64))
            })
            .collect();
        let mut binder = GradBinder::new(&self.device, self.align, &index, grads, taken);
        model.visit(&mut binder);
        if let Some(e) = binder.error.take() {
            return Err(e);
        }
        let bound = std::mem::take(&mut binder.bound);
        drop(binder);
        if let Some(missing) = self.entries.iter().enumerate().find(|(k, _)| !bound.iter().any(|b| b.entry == *k)) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("parameter `{}` was not found in the model passed to the loss", missing.1.path),
            ));
        }
        for b in bound.iter().filter(|b| b.staged.is_some()) {
            self.placement.staged_grads += 1;
            self.placement.staged_bytes += (self.entries[b.entry].elements() * b.located.dtype.size()) as u64;
        }
        if between {
            let items: Vec<(TensorId, &wgpu::Buffer, u64)> = bound
                .iter()
                .map(|b| {
                    (
                        self.entries[b.entry].tensor.expect("registered at the first step"),
                        &b.located.buffer,
                        b.located.offset,
                    )
                })
                .collect();
            self.opt.rebind_wgpu_grads(&items)?;
            return Ok(bound);
        }
        // Known tensors first (their old gradient ranges may be where the new ones now are), then
        // the new ones, checked against where everything is now.
        let mut rebind = Vec::new();
        let mut new = Vec::new();
        for b in &bound {
            let e = &self.entries[b.entry];
            let at = e.at.as_ref().expect("prepare located every entry");
            match e.tensor {
                Some(id) => rebind.push((id, &at.buffer, at.offset, &b.located.buffer, b.located.offset)),
                None => new.push(b),
            }
        }
        self.opt.rebind_wgpu_many(&rebind)?;
        for b in new {
            let e = &self.entries[b.entry];
            let at = e.at.as_ref().expect("prepare located every entry");
            let id = self
                .opt
                .register_wgpu_writable(&at.buffer, at.offset, &b.located.buffer, b.located.offset, e.padded, e.dtype)
                .map_err(|err| Error::new(err.kind(), format!("parameter `{}`: {}", e.path, err.message())))?;
            self.entries[b.entry].tensor = Some(id);
        }
        if let Some(state) = self.pending_state.take() {
            self.opt.load_state(&state)?;
        }
        Ok(bound)
    }

    /// Hands Burn's recorded and buffered work to the queue before samopt submits its own (waits
    /// for it when timing).
    fn flush(&self) -> Result<()> {
        let done = if self.timing { self.device.sync() } else { self.device.flush() };
        done.map_err(|e| Error::new(ErrorKind::Device, format!("Burn's device failed before samopt's pass: {e:?}")))
    }

    fn expect_idle(&self) -> Result<()> {
        if self.opt.phase() != samopt::Phase::Idle {
            return Err(Error::new(
                ErrorKind::InvalidState,
                "samopt is between the two steps of a step that did not finish (an earlier error)",
            ));
        }
        Ok(())
    }

    fn survey<M: Module>(&self, model: &M) -> Result<Vec<Found>> {
        let mut survey = Survey::new(&self.device);
        model.visit(&mut survey);
        survey.finish()
    }
}

/// Elements of a tensor of `len` elements of `dtype`, padded to a multiple of 16 bytes.
fn padded_len(len: usize, dtype: DType) -> usize {
    let per = 16 / dtype.size();
    len.div_ceil(per) * per
}

/// Whether two located tensors start at the same byte of the same buffer.
fn same_place(a: &Located, b: &Located) -> bool {
    a.buffer == b.buffer && a.offset == b.offset
}
