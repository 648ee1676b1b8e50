//! The steps of SAM: the first step (norm, perturbation), the distributed variants, the second
//! step (restore, or restore fused with the base update), and the learning rate.

use super::{AllReduce, Fault, FirstStep, Optimizer, Phase, SecondStep};
use crate::backend::SecondNorm;
use crate::config::{BaseOptimizer, Schedule};
use crate::error::{Error, ErrorKind, Result};
use crate::math::{Perturbation, TensorStep, UpdateStep};

impl Optimizer {
    /// The ascent: computes one global norm over every registered gradient, then, on a SAM step,
    /// moves every parameter to `w + e(w)`, saving `w`. The step schedule
    /// ([`Config::schedule`](crate::Config::schedule)) decides from that norm whether this is a
    /// SAM step ([`FirstStep::Perturbed`]: the host computes the gradient at the perturbed
    /// weights) or a single-gradient step ([`FirstStep::SingleGradient`]: nothing moved; the host
    /// skips its second forward/backward and calls [`second_step`](Self::second_step) now). With
    /// the default schedule every step is a SAM step.
    ///
    /// A NaN or infinity in any gradient (under ASAM, in any weight too) is found by the norm pass
    /// itself; the call then returns [`ErrorKind::NonFinite`] and no parameter is touched, so a
    /// loss-scaled loop can lower its scale and retry. A failed call takes no decision.
    ///
    /// With loss scaling ([`Config::loss_scale`](crate::Config::loss_scale)) a non-finite gradient
    /// is the scale's overflow, not an error: the step is skipped ([`FirstStep::Skipped`]), nothing
    /// moved, the scale lowered, and the second step ends the step.
    ///
    /// With an all-reduce installed ([`set_allreduce`](Self::set_allreduce)) every call joins the
    /// exchange exactly once, whatever fails locally (wrong phase, no tensor, a device error, a
    /// non-finite gradient): the failing worker contributes NaN, so every worker refuses the step
    /// together and none is left waiting in the collective. Every worker decides from the same
    /// global numbers, so all take the same kind of step.
    pub fn first_step(&mut self) -> Result<FirstStep> {
        self.step_scale = self.scaler.map_or(1.0, |s| s.scale);
        let result = self.first_step_inner();
        self.overflow_skips(result)
    }

    /// With loss scaling, turns a non-finite gradient (this worker's or another's) into a skipped
    /// step: the scale backs off and the second step ends the step.
    fn overflow_skips(&mut self, result: Result<FirstStep>) -> Result<FirstStep> {
        match result {
            Err(e) if e.kind() == ErrorKind::NonFinite && self.scaler.is_some() => {
                self.back_off();
                self.shards = 0;
                self.local_sum_sq = None;
                self.phase = Phase::Skipped;
                log::debug!("samopt: loss scale overflow at the first step: {}", e.message());
                Ok(FirstStep::Skipped)
            }
            other => other,
        }
    }

    /// The loss scale after a step with inf or NaN.
    fn back_off(&mut self) {
        let factor = self.config.loss_scale.map_or(1.0, |l| l.backoff_factor);
        if let Some(s) = self.scaler.as_mut() {
            // Kept a normal f32, so that the host's loss times it stays meaningful.
            s.scale = (s.scale * factor).max(f32::MIN_POSITIVE as f64);
            s.good_steps = 0;
        }
    }

    /// The loss scale after a completed step.
    fn grow(&mut self) {
        let Some(l) = self.config.loss_scale else { return };
        if let Some(s) = self.scaler.as_mut() {
            s.good_steps += 1;
            if s.good_steps >= l.growth_interval {
                s.scale = (s.scale * l.growth_factor).min(f32::MAX as f64);
                s.good_steps = 0;
            }
        }
    }

    fn first_step_inner(&mut self) -> Result<FirstStep> {
        let look = self.config.looksam();
        if self.allreduce.is_none() {
            self.check_schedule_start()?;
            let sum_sq = self.checked_local_norm("take a first step")?;
            let gv = self.schedule.gv_local_sq;
            return self.begin_step(sum_sq, gv);
        }
        let local = self.check_schedule_start().and_then(|()| self.checked_local_norm("take a first step"));
        // LookSAM's reuse needs the global ||g_v|| too: a second number in the same exchange.
        let mut v = [*local.as_ref().unwrap_or(&f64::NAN), self.schedule.gv_local_sq.unwrap_or(0.0)];
        let n = if look { 2 } else { 1 };
        let exchanged = self.exchange(&mut v[..n]);
        // This worker's own failure says more than the NaN it caused.
        let local = local?;
        exchanged?;
        if !v[0].is_finite() || !v[1].is_finite() {
            return Err(Error::new(
                ErrorKind::NonFinite,
                "the global gradient norm is NaN or infinite: another worker's gradient holds NaN or infinity, \
                 or its first step failed; no parameter was changed",
            ));
        }
        self.check_global(v[0], local, "the all-reduced squared norm")?;
        let gv = self.schedule.gv_local_sq.map(|_| v[1]);
        self.begin_step(v[0], gv)
    }

    /// What the schedule needs before a step may start: LookSAM without a built-in base optimizer
    /// writes its direction into the gradient buffers, so every gradient must be writable.
    fn check_schedule_start(&self) -> Result<()> {
        if self.config.looksam()
            && self.config.base == BaseOptimizer::None
            && let Some(k) = self.tensors.iter().position(|t| !t.grad_writable)
        {
            return Err(Error::state(format!(
                "schedule = looksam without a built-in base optimizer writes LookSAM's direction into the gradient \
                 buffers for the host's optimizer, but tensor {k}'s gradient was registered read-only: register it \
                 with a writable gradient (sam_register_host_ex with SAM_REGISTER_GRAD_WRITABLE), or use a built-in \
                 base optimizer"
            )));
        }
        Ok(())
    }

    /// Decides the step from the global squared norm (and LookSAM's global `||g_v||^2`), then
    /// perturbs on a SAM step. The decision is kept only when the step started.
    fn begin_step(&mut self, grad_sq: f64, gv_sq: Option<f64>) -> Result<FirstStep> {
        let mut next = self.schedule;
        self.schedule_before = self.schedule;
        // The rules read the true norm: the buffers hold the gradient times the loss scale.
        let inv = 1.0 / self.step_scale;
        let sam = next.decide(&self.config.schedule, grad_sq * inv * inv);
        if sam {
            // The perturbation rho g / ||g|| is the same for the scaled gradient.
            self.perturb_with(grad_sq.sqrt())?;
            self.last_norm = Some(grad_sq.sqrt() * inv);
        } else {
            self.last_norm = Some(grad_sq.sqrt() * inv);
            self.local_sum_sq = None;
            self.phase = Phase::Single;
        }
        self.schedule = next;
        self.step_grad_sq = grad_sq;
        self.step_gv_sq = gv_sq;
        Ok(if sam { FirstStep::Perturbed } else { FirstStep::SingleGradient })
    }

    /// The local squared norm `sum (T_w g)^2` over this optimizer's tensors: the norm pass, with
    /// its non-finite check (whose error names the tensor and element).
    pub(super) fn checked_local_norm(&mut self, action: &str) -> Result<f64> {
        self.expect_step_start(action)?;
        if self.tensors.is_empty() {
            return Err(Error::state("no tensor is registered: register the parameters before the first step"));
        }
        self.passes()?;
        self.take_fault(Fault::Norm)?;
        if self.config.preconditioned {
            // AdamW's bias correction after each tensor's updates so far; 0 before the first
            // (plain SAM for it, v being still zero).
            let beta2 = self.config.beta2;
            let mut b = std::mem::take(&mut self.precond_bias);
            b.clear();
            b.extend(self.tensors.iter().map(|t| {
                let t = t.updates.min(i32::MAX as u64) as i32;
                if t == 0 { 0.0 } else { (1.0 - beta2.powi(t)).sqrt() as f32 }
            }));
            let eps = self.config.adam_eps as f32;
            self.passes.as_mut().expect("checked above").precondition(&b, eps);
            self.precond_bias = b;
        }
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

    /// Refuses a global squared norm below this worker's local one (a sum over workers includes
    /// it), with a relative allowance for a host that sums in f32.
    fn check_global(&self, global_sq: f64, local_sq: f64, what: &str) -> Result<()> {
        if global_sq < local_sq * (1.0 - 1e-6) {
            return Err(Error::invalid(format!(
                "{what} = {global_sq:e} is below this worker's own squared norm {local_sq:e}: it must be the sum \
                 of every worker's sam_grad_sq_norm_local; no parameter was changed"
            )));
        }
        Ok(())
    }

    pub(super) fn perturb_with(&mut self, norm: f64) -> Result<()> {
        let (config, passes) = (&self.config, self.passes.as_mut().expect("a norm pass ran"));
        passes.perturb(&Perturbation::new(config, self.rho, norm))?;
        self.last_norm = Some(norm);
        self.local_sum_sq = None;
        self.phase = Phase::Perturbed;
        Ok(())
    }

    /// SAM across workers whose parameters are sharded (ZeRO, FSDP, tensor parallel), step 1 of 2:
    /// the local squared norm `sum (T_w g)^2` over this optimizer's tensors (one read of the
    /// gradients, nothing written). The host sums it over the workers with its own engine (MPI,
    /// NCCL, Gloo) and passes the square root to [`first_step_with_norm`](Self::first_step_with_norm).
    /// A NaN or infinity in a local gradient returns [`ErrorKind::NonFinite`]; so that every worker
    /// learns it, the host then sums NaN.
    pub fn local_sq_norm(&mut self) -> Result<f64> {
        let v = self.checked_local_norm("compute the local norm")?;
        self.local_sum_sq = Some(v);
        Ok(v)
    }

    /// SAM across workers with sharded parameters, step 2 of 2: the ascent with the given norm
    /// (the square root of the all-reduced [`local_sq_norm`](Self::local_sq_norm)s). A NaN or
    /// infinite `global_norm` means a worker's gradient was not finite: [`ErrorKind::NonFinite`],
    /// nothing changed. A norm below this worker's own is refused as an invalid argument.
    ///
    /// The gradients must not change between the two calls: the local norm of the first is
    /// reused, so the gradients are read once. Without a preceding `local_sq_norm` (or after a
    /// registration since), the local norm pass runs here.
    /// The step schedule decides as in [`first_step`](Self::first_step), from `global_norm`.
    /// LookSAM is refused here ([`ErrorKind::Unsupported`]): its reuse needs global sums this path
    /// does not exchange; install an all-reduce with [`set_allreduce`](Self::set_allreduce) instead.
    pub fn first_step_with_norm(&mut self, global_norm: f64) -> Result<FirstStep> {
        self.step_scale = self.scaler.map_or(1.0, |s| s.scale);
        let result = self.first_step_with_norm_inner(global_norm);
        self.overflow_skips(result)
    }

    fn first_step_with_norm_inner(&mut self, global_norm: f64) -> Result<FirstStep> {
        self.expect_step_start("take a first step")?;
        if self.config.looksam() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "schedule = looksam with first_step_with_norm: LookSAM needs the global ||g_v|| and g.g' as well; \
                 install the all-reduce (set_allreduce / sam_set_allreduce) and call first_step",
            ));
        }
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
        let local = match self.local_sum_sq {
            Some(v) => v,
            None => self.checked_local_norm("take a first step")?,
        };
        self.check_global(global_norm * global_norm, local, "global_norm^2")?;
        self.begin_step(global_norm * global_norm, None)
    }

    /// Installs the host's all-reduce for parameters sharded across workers: from then on
    /// [`first_step`](Self::first_step) sums the local squared gradient norm across the workers
    /// with it and perturbs with the norm over all shards (one number exchanged, no gradient
    /// copied); with a built-in base optimizer, [`second_step`](Self::second_step) sums the
    /// second gradient's squared norm and GSAM's dot product too (two numbers), so clipping, GSAM
    /// and skipping a non-finite step are decided the same on every worker. `None` removes it.
    /// With replicated parameters, all-reduce the gradients before the first step instead (exact
    /// SAM over the global batch, no exchange here); for per-worker SAM (m-sharpness) install none.
    ///
    /// The all-reduce runs inside `first_step` and `second_step`, which hold the optimizer: it must
    /// not call this optimizer's methods (through the C ABI such a call is refused as re-entrant).
    pub fn set_allreduce(&mut self, allreduce: Option<AllReduce>) {
        self.allreduce = allreduce;
    }

    /// Per-shard SAM (m-sharpness in one process): after the first step on shard k's gradient and
    /// the host's backward pass at the perturbed weights, restores `w` exactly and adds that
    /// perturbed gradient to an accumulator. The next shard's first step follows; after the last
    /// shard, [`second_step`](Self::second_step) applies the mean of the accumulated gradients.
    ///
    /// With a built-in base optimizer the mean stays in samopt's memory and the gradient buffers
    /// are only read. Without one, the host's optimizer needs the mean in its gradient buffers:
    /// that needs every host tensor registered with a writable gradient
    /// ([`register_host_writable_raw`](Self::register_host_writable_raw)), checked here at the
    /// first shard, before anything changes.
    pub fn accumulate_step(&mut self) -> Result<()> {
        if self.phase != Phase::Perturbed && self.phase != Phase::Single {
            return Err(Error::state("accumulate_step without a first step: call first_step for the shard first"));
        }
        if self.config.gsam_alpha.is_some() {
            return Err(Error::new(ErrorKind::Unsupported, "per-shard accumulation with GSAM is not supported"));
        }
        if self.config.schedule != Schedule::Every {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "per-shard accumulation with schedule = {}: the shards of one step would take separate \
                     decisions; per-shard SAM needs schedule = every",
                    self.config.schedule.name()
                ),
            ));
        }
        if self.config.base == BaseOptimizer::None
            && let Some(k) = self.tensors.iter().position(|t| !t.grad_writable)
        {
            return Err(Error::state(format!(
                "per-shard SAM without a built-in base optimizer writes the mean gradient into the gradient \
                 buffers for the host's optimizer, but tensor {k}'s gradient was registered read-only: register \
                 it with a writable gradient (sam_register_host_ex with SAM_REGISTER_GRAD_WRITABLE), or use a \
                 built-in base optimizer"
            )));
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
    /// perturbed point, in the same pass. After a single-gradient first step there is nothing to
    /// restore: the base optimizer steps with the schedule's direction (`g`, or LookSAM's
    /// `g + alpha (||g|| / ||g_v||) g_v`), and without one the host's optimizer does (LookSAM
    /// leaves its direction in the writable gradient buffers).
    ///
    /// With a base optimizer the second gradient is first reduced (its norm for clipping, its dot
    /// product with the first gradient for GSAM and LookSAM, and a finiteness check); a NaN or
    /// infinity there makes the step [`SecondStep::Skipped`]: restored, no update, state untouched.
    /// Without one, the host runs its own optimizer afterwards.
    ///
    /// If the fused update fails (a device error), the weights are restored to `w` when the
    /// backend still can, the step is over (a retry is refused, so momentum is never applied
    /// twice) and not counted; the base optimizer's state may be partly updated on a device that
    /// failed midway, so the error says to load a checkpoint to continue exactly.
    pub fn second_step(&mut self) -> Result<SecondStep> {
        let skipped_first = self.phase == Phase::Skipped;
        let result = self.second_step_inner();
        if let Ok(SecondStep::Skipped) = result
            && !skipped_first
        {
            // A skipped step is taken back from the schedule too (the draw, AE-SAM's statistics,
            // the step index): the run continues as if it never happened.
            self.schedule = self.schedule_before;
        }
        if self.scaler.is_some() {
            match result {
                // A first-step overflow backed off already.
                Ok(SecondStep::Skipped) if !skipped_first => self.back_off(),
                Ok(SecondStep::Restored | SecondStep::Updated) => self.grow(),
                _ => {}
            }
        }
        result
    }

    fn second_step_inner(&mut self) -> Result<SecondStep> {
        // Sharded parameters: the reduction of g' spans the workers too, so that clipping, GSAM,
        // LookSAM and the decision to skip are the same on every worker. Every call joins that
        // exchange once, contributing NaN when it fails locally, as the first step does.
        let exchange = self.allreduce.is_some() && self.reduces_second_gradient();
        let single = self.phase == Phase::Single;
        if self.phase == Phase::Skipped {
            // The loss scale skipped this step at its first step, on every worker alike; the
            // exchange still happens once, so that a worker whose first step failed otherwise
            // (and contributes NaN here) is not left waiting.
            if exchange {
                self.exchange(&mut [f64::NAN; 2])?;
            }
            self.phase = Phase::Idle;
            return Ok(SecondStep::Skipped);
        }
        let reduced = self.second_reduction();
        if exchange {
            let mut v = match &reduced {
                Ok(Some(r)) => [r.sum_sq, r.dot],
                _ => [f64::NAN; 2],
            };
            let exchanged = self.exchange(&mut v);
            // With an exchange the reduction is `Some` when it succeeds.
            let failed = match (reduced, exchanged) {
                (Err(e), _) | (Ok(_), Err(e)) => Some(e),
                (Ok(_), Ok(())) => None,
            };
            if let Some(e) = failed {
                // The step ends here on every worker: the others see NaN and skip it.
                if self.phase == Phase::Single {
                    self.phase = Phase::Idle;
                } else if self.phase != Phase::Idle {
                    self.phase = Phase::Idle;
                    self.shards = 0;
                    self.passes.as_mut().expect("a first step ran").restore()?;
                }
                return Err(e);
            }
            let r = SecondNorm { sum_sq: v[0], dot: v[1] };
            return if single { self.apply_single(r) } else { self.apply_update(r) };
        }
        match reduced? {
            None => {
                self.phase = Phase::Idle;
                self.steps += 1;
                if single {
                    self.schedule.single_steps += 1;
                } else {
                    self.schedule.sam_steps += 1;
                }
                Ok(SecondStep::Restored)
            }
            Some(r) if single => self.apply_single(r),
            Some(r) => self.apply_update(r),
        }
    }

    /// Sums `values` over the workers with the installed all-reduce.
    fn exchange(&mut self, values: &mut [f64]) -> Result<()> {
        let allreduce = self.allreduce.as_mut().expect("an all-reduce is installed");
        allreduce(values).map_err(|e| Error::new(ErrorKind::Callback, format!("the all-reduce failed: {e}")))
    }

    /// Whether the second step reduces the second gradient: for a built-in base (clipping, GSAM,
    /// the finiteness check), LookSAM (`g.g'`) and loss scaling (its overflow check).
    fn reduces_second_gradient(&self) -> bool {
        self.config.base != BaseOptimizer::None || self.config.looksam() || self.scaler.is_some()
    }

    /// Whether a single-gradient step's update needs the plain `||g||^2` from a reduction: the
    /// first step's norm is `||T_w g||` under ASAM, and clipping needs `||g||`.
    fn single_needs_plain_norm(&self) -> bool {
        self.config.adaptive && self.config.max_grad_norm.is_some() && self.config.base != BaseOptimizer::None
    }

    /// The second step up to its reduction: the phase check, the mean of accumulated shards, and
    /// then either the plain restore (no base optimizer, no LookSAM: `None`, the step is done but
    /// not yet counted) or the reduction of g' (`Some`). A single-gradient step reduces nothing
    /// (`Some` of zeros) unless [`single_needs_plain_norm`](Self::single_needs_plain_norm).
    fn second_reduction(&mut self) -> Result<Option<SecondNorm>> {
        let look = self.config.looksam();
        let reduce = self.reduces_second_gradient();
        match self.phase {
            Phase::Idle | Phase::Skipped => {
                return Err(Error::state("second step without a first step: call first_step before second_step"));
            }
            Phase::Perturbed if self.shards > 0 => {
                return Err(Error::state(format!(
                    "{} shards are accumulated: accumulate the last shard with accumulate_step before second_step",
                    self.shards
                )));
            }
            Phase::Single => {
                if self.config.base == BaseOptimizer::None && !look {
                    return Ok(None);
                }
                if self.single_needs_plain_norm() {
                    self.take_fault(Fault::Reduce)?;
                    let passes = self.passes.as_mut().expect("a first step ran");
                    return passes.second_reduce(false).map(|r| Some(SecondNorm { sum_sq: r.sum_sq, dot: 0.0 }));
                }
                return Ok(Some(SecondNorm { sum_sq: 0.0, dot: 0.0 }));
            }
            _ => {}
        }
        let accumulated = self.phase == Phase::Accumulating;
        let config = &self.config;
        let passes = self.passes.as_mut().expect("a first step ran");
        if accumulated {
            // w is restored already; the mean of the shards' perturbed gradients takes g's place:
            // in samopt's memory with a built-in base, else in the (writable) gradient buffers.
            passes.write_mean(1.0 / self.shards as f32, config.base == BaseOptimizer::None)?;
            self.shards = 0;
        }
        if !reduce {
            if !accumulated {
                passes.restore()?;
            }
            return Ok(None);
        }
        self.take_fault(Fault::Reduce)?;
        let passes = self.passes.as_mut().expect("a first step ran");
        passes.second_reduce(self.config.keeps_first_grad()).map(Some)
    }

    /// LookSAM on a SAM step whose second gradient is finite: keeps `g_v`, the part of `g'`
    /// orthogonal to the first gradient, for the single-gradient steps that follow.
    fn keep_orthogonal(&mut self, reduced: &SecondNorm) -> Result<()> {
        // g_v = g' - (g.g' / ||g||^2) g; a zero g has no direction to remove.
        let c = if self.step_grad_sq > 0.0 { reduced.dot / self.step_grad_sq } else { 0.0 };
        let passes = self.passes.as_mut().expect("a first step ran");
        let gv = passes.look_store(c as f32)?;
        self.schedule.gv_local_sq = Some(gv);
        Ok(())
    }

    /// The rest of a second step with a base optimizer (or LookSAM), from the (global) reduction
    /// of g'.
    fn apply_update(&mut self, reduced: SecondNorm) -> Result<SecondStep> {
        let config = &self.config;
        if !reduced.sum_sq.is_finite() {
            self.passes.as_mut().expect("a first step ran").restore()?;
            self.phase = Phase::Idle;
            // Also without a base optimizer under LookSAM (which reduces g' for g_v): the host's
            // optimizer must skip too, as must every worker of a sharded job; g_v stays as it was.
            return Ok(SecondStep::Skipped);
        }
        if config.looksam() {
            let kept = self.keep_orthogonal(&reduced);
            if let Err(e) = kept {
                self.phase = Phase::Idle;
                self.passes.as_mut().expect("a first step ran").restore()?;
                return Err(e);
            }
        }
        let config = &self.config;
        if config.base == BaseOptimizer::None {
            self.passes.as_mut().expect("a first step ran").restore()?;
            self.phase = Phase::Idle;
            self.steps += 1;
            self.schedule.sam_steps += 1;
            return Ok(SecondStep::Restored);
        }
        // Loss scaling: the buffers hold S g and S g'; the update wants g and g', so 1/S joins
        // the direction's coefficients (g.g'/||g'||^2 does not depend on S).
        let inv = 1.0 / self.step_scale;
        let norm = reduced.sum_sq.sqrt() * inv;
        // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1.
        let clip = config.max_grad_norm.map_or(1.0, |m| (m / (norm + 1e-6)).min(1.0));
        // GSAM: c*g' - alpha*(g - (g.g'/||g'||^2) g') = (c + alpha*g.g'/||g'||^2) g' - alpha g;
        // g_perp does not change when g' is scaled, so clipping scales g' alone.
        let (a, b) = match config.gsam_alpha {
            Some(alpha) => {
                let ratio = if reduced.sum_sq > 0.0 { reduced.dot / reduced.sum_sq } else { 0.0 };
                ((clip + alpha * ratio) * inv, alpha * inv)
            }
            None => (clip * inv, 0.0),
        };
        let step = UpdateStep::new(config, a, b);
        self.fill_tensor_steps();
        let updated = self.take_fault(Fault::Update).and_then(|()| {
            let passes = self.passes.as_mut().expect("a first step ran");
            passes.update(&step, &self.tensor_steps)
        });
        if let Err(e) = updated {
            // The backup is intact (the update only reads it): put w back, and end the step.
            self.phase = Phase::Idle;
            let restored = self.passes.as_mut().expect("a first step ran").restore();
            let weights = match restored {
                Ok(()) => "the weights were restored to w",
                Err(_) => "the weights could not be restored either",
            };
            return Err(Error::new(
                e.kind(),
                format!(
                    "{}; {weights} and the step is over (not counted); the base optimizer's state may be partly \
                     updated: load a checkpoint to continue exactly",
                    e.message()
                ),
            ));
        }
        self.finish_update(norm);
        self.schedule.sam_steps += 1;
        Ok(SecondStep::Updated)
    }

    /// The per-tensor scalars of the next update (each tensor's group and update count).
    fn fill_tensor_steps(&mut self) {
        self.tensor_steps.clear();
        for t in &self.tensors {
            let g = self.groups[t.group as usize];
            self.tensor_steps.push(TensorStep::new(&self.config, self.lr * g.lr_scale, g.weight_decay, t.updates + 1));
        }
    }

    /// Counts an applied update of norm `norm`.
    fn finish_update(&mut self, norm: f64) {
        for t in &mut self.tensors {
            t.updates += 1;
        }
        self.last_second_norm = Some(norm);
        self.phase = Phase::Idle;
        self.steps += 1;
    }

    /// The second step of a single-gradient step: the base update (or, without one, LookSAM's
    /// direction into the gradients) with the gradient of the first step. `reduced` is the global
    /// reduction: zeros, or the plain `||g||^2` under ASAM with clipping, or NaN when another
    /// worker failed (then every worker skips the step).
    fn apply_single(&mut self, reduced: SecondNorm) -> Result<SecondStep> {
        self.phase = Phase::Idle;
        if !reduced.sum_sq.is_finite() {
            return Ok(SecondStep::Skipped);
        }
        let grad_sq = if self.single_needs_plain_norm() { reduced.sum_sq } else { self.step_grad_sq };
        // Loss scaling: the buffers hold S g; the ratio ||g|| / ||g_v|| does not depend on S.
        let inv = 1.0 / self.step_scale;
        let norm = grad_sq.sqrt() * inv;
        // LookSAM: d = g + alpha (||g|| / ||g_v||) g_v; before the first kept g_v (or with g_v = 0)
        // there is nothing to reuse and d = g.
        let reuse = match (self.config.schedule, self.step_gv_sq) {
            (Schedule::LookSam { alpha, .. }, Some(gv_sq)) if gv_sq > 0.0 => alpha * grad_sq.sqrt() / gv_sq.sqrt(),
            _ => 0.0,
        };
        if self.config.base == BaseOptimizer::None {
            if reuse != 0.0 {
                self.take_fault(Fault::Update)?;
                self.passes.as_mut().expect("a first step ran").look_direction(reuse as f32)?;
            }
            self.steps += 1;
            self.schedule.single_steps += 1;
            return Ok(SecondStep::Restored);
        }
        let clip = self.config.max_grad_norm.map_or(1.0, |m| (m / (norm + 1e-6)).min(1.0));
        // The update's direction is a*g - b*g_v: b carries minus the (clipped) reuse coefficient.
        let step = UpdateStep::new(&self.config, clip * inv, -(clip * reuse * inv));
        self.fill_tensor_steps();
        let updated = self.take_fault(Fault::Update).and_then(|()| {
            let passes = self.passes.as_mut().expect("a first step ran");
            passes.update_single(&step, &self.tensor_steps, reuse != 0.0)
        });
        if let Err(e) = updated {
            return Err(Error::new(
                e.kind(),
                format!(
                    "{}; the single-gradient step is over (not counted); weights and state may be partly updated on \
                     a device that failed midway: load a checkpoint to continue exactly",
                    e.message()
                ),
            ));
        }
        self.finish_update(norm);
        self.schedule.single_steps += 1;
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

    /// Sets rho from the next first step on: the hook for a rho schedule (GSAM ties rho to the
    /// learning rate), called between steps. Checkpoints carry the current value.
    pub fn set_rho(&mut self, rho: f64) -> Result<()> {
        if !(rho.is_finite() && rho > 0.0) {
            return Err(Error::invalid(format!("rho = {rho}: must be finite and > 0")));
        }
        self.rho = rho;
        Ok(())
    }

    /// The current rho.
    pub fn rho(&self) -> f64 {
        self.rho
    }

    /// The L2 norm of the last applied second gradient (before clipping); `None` before the first
    /// update or without a base optimizer.
    pub fn second_grad_norm(&self) -> Option<f64> {
        self.last_second_norm
    }
}
