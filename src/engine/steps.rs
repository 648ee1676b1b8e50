//! The steps of SAM: the first step (norm, perturbation), the distributed variants, the second
//! step (restore, or restore fused with the base update), and the learning rate.

use super::{AllReduce, Optimizer, Phase, SecondStep};
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
    pub(super) fn checked_local_norm(&mut self, action: &str) -> Result<f64> {
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

    pub(super) fn perturb_with(&mut self, norm: f64) -> Result<()> {
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
}
