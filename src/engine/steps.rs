//! The steps of SAM: the first step (norm, perturbation), the distributed variants, the second
//! step (restore, or restore fused with the base update), and the learning rate.

use super::{AllReduce, Fault, Optimizer, Phase, SecondStep};
use crate::backend::SecondNorm;
use crate::config::BaseOptimizer;
use crate::error::{Error, ErrorKind, Result};
use crate::math::{Perturbation, TensorStep, UpdateStep};

impl Optimizer {
    /// The ascent: computes one global norm over every registered gradient, then moves every
    /// parameter to `w + e(w)`, saving `w`.
    ///
    /// A NaN or infinity in any gradient (under ASAM, in any weight too) is found by the norm pass
    /// itself; the call then returns [`ErrorKind::NonFinite`] and no parameter is touched, so a
    /// loss-scaled loop can lower its scale and retry.
    ///
    /// With an all-reduce installed ([`set_allreduce`](Self::set_allreduce)) every call joins the
    /// exchange exactly once, whatever fails locally (wrong phase, no tensor, a device error, a
    /// non-finite gradient): the failing worker contributes NaN, so every worker refuses the step
    /// together and none is left waiting in the collective.
    pub fn first_step(&mut self) -> Result<()> {
        if self.allreduce.is_none() {
            let sum_sq = self.checked_local_norm("take a first step")?;
            return self.perturb_with(sum_sq.sqrt());
        }
        let local = self.checked_local_norm("take a first step");
        let mut sum_sq = [*local.as_ref().unwrap_or(&f64::NAN)];
        let exchanged = self.exchange(&mut sum_sq);
        // This worker's own failure says more than the NaN it caused.
        let local = local?;
        exchanged?;
        if !sum_sq[0].is_finite() {
            return Err(Error::new(
                ErrorKind::NonFinite,
                "the global gradient norm is NaN or infinite: another worker's gradient holds NaN or infinity, \
                 or its first step failed; no parameter was changed",
            ));
        }
        self.check_global(sum_sq[0], local, "the all-reduced squared norm")?;
        self.perturb_with(sum_sq[0].sqrt())
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
        passes.perturb(&Perturbation::new(config, norm))?;
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
        let local = match self.local_sum_sq {
            Some(v) => v,
            None => self.checked_local_norm("take a first step")?,
        };
        self.check_global(global_norm * global_norm, local, "global_norm^2")?;
        self.perturb_with(global_norm)
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
        if self.phase != Phase::Perturbed {
            return Err(Error::state("accumulate_step without a first step: call first_step for the shard first"));
        }
        if self.config.gsam_alpha.is_some() {
            return Err(Error::new(ErrorKind::Unsupported, "per-shard accumulation with GSAM is not supported"));
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
    /// perturbed point, in the same pass.
    ///
    /// With a base optimizer the second gradient is first reduced (its norm for clipping, its dot
    /// product with the first gradient for GSAM, and a finiteness check); a NaN or infinity there
    /// makes the step [`SecondStep::Skipped`]: restored, no update, state untouched. Without one,
    /// the host runs its own optimizer afterwards.
    ///
    /// If the fused update fails (a device error), the weights are restored to `w` when the
    /// backend still can, the step is over (a retry is refused, so momentum is never applied
    /// twice) and not counted; the base optimizer's state may be partly updated on a device that
    /// failed midway, so the error says to load a checkpoint to continue exactly.
    pub fn second_step(&mut self) -> Result<SecondStep> {
        // Sharded parameters: the reduction of g' spans the workers too, so that clipping, GSAM
        // and the decision to skip are the same on every worker. Every call joins that exchange
        // once, contributing NaN when it fails locally, as the first step does.
        let exchange = self.allreduce.is_some() && self.config.base != BaseOptimizer::None;
        let reduced = self.second_reduction();
        if exchange {
            let mut v = match &reduced {
                Ok(Some(r)) => [r.sum_sq, r.dot],
                _ => [f64::NAN; 2],
            };
            let exchanged = self.exchange(&mut v);
            // With a base optimizer the reduction is `Some` when it succeeds.
            let failed = match (reduced, exchanged) {
                (Err(e), _) | (Ok(_), Err(e)) => Some(e),
                (Ok(_), Ok(())) => None,
            };
            if let Some(e) = failed {
                // The step ends here on every worker: the others see NaN and skip it.
                if self.phase != Phase::Idle {
                    self.phase = Phase::Idle;
                    self.shards = 0;
                    self.passes.as_mut().expect("a first step ran").restore()?;
                }
                return Err(e);
            }
            return self.apply_update(SecondNorm { sum_sq: v[0], dot: v[1] });
        }
        match reduced? {
            None => {
                self.phase = Phase::Idle;
                self.steps += 1;
                Ok(SecondStep::Restored)
            }
            Some(r) => self.apply_update(r),
        }
    }

    /// Sums `values` over the workers with the installed all-reduce.
    fn exchange(&mut self, values: &mut [f64]) -> Result<()> {
        let allreduce = self.allreduce.as_mut().expect("an all-reduce is installed");
        allreduce(values).map_err(|e| Error::new(ErrorKind::Callback, format!("the all-reduce failed: {e}")))
    }

    /// The second step up to its reduction: the phase check, the mean of accumulated shards, and
    /// then either the plain restore (no base optimizer: `None`, the step is done but not yet
    /// counted) or the reduction of g' (`Some`).
    fn second_reduction(&mut self) -> Result<Option<SecondNorm>> {
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
            // w is restored already; the mean of the shards' perturbed gradients takes g's place:
            // in samopt's memory with a built-in base, else in the (writable) gradient buffers.
            passes.write_mean(1.0 / self.shards as f32, config.base == BaseOptimizer::None)?;
            self.shards = 0;
        }
        if config.base == BaseOptimizer::None {
            if !accumulated {
                passes.restore()?;
            }
            return Ok(None);
        }
        self.take_fault(Fault::Reduce)?;
        let passes = self.passes.as_mut().expect("a first step ran");
        passes.second_reduce(self.config.gsam_alpha.is_some()).map(Some)
    }

    /// The rest of a second step with a base optimizer, from the (global) reduction of g'.
    fn apply_update(&mut self, reduced: SecondNorm) -> Result<SecondStep> {
        let config = &self.config;
        if !reduced.sum_sq.is_finite() {
            self.passes.as_mut().expect("a first step ran").restore()?;
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
}
