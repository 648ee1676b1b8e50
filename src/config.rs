//! The optimizer's configuration and its validation.
//!
//! A [`Config`] is checked once, by [`Config::validate`], when an optimizer is created; the
//! engine and the backends then rely on it without checking again.

use crate::error::{Error, ErrorKind, Result};

/// Which engine runs the SAM passes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Decided at the first registration: the CPU for host buffers, the GPU for tensors the
    /// optimizer allocates (the CPU when there is no GPU adapter).
    #[default]
    Auto,
    /// The fused multithreaded CPU engine.
    Cpu,
    /// The wgpu compute engine.
    Gpu,
}

/// The norm of the ball the ascent step searches, `||e||_p <= rho`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Norm {
    /// p = 2: `e = rho * g / ||g||_2` (the SAM paper's default).
    #[default]
    L2,
    /// p = infinity: `e = rho * sign(g)`, the sign perturbation.
    LInf,
}

impl Norm {
    /// Translates the `p` of the C configuration: 2 or infinity.
    pub fn from_p(p: f64) -> Result<Norm> {
        if p == 2.0 {
            Ok(Norm::L2)
        } else if p == f64::INFINITY {
            Ok(Norm::LInf)
        } else if p.is_nan() || p < 1.0 {
            Err(Error::invalid(format!(
                "norm_p = {p}: a norm needs p >= 1 (use 2.0, or INFINITY for the sign perturbation)"
            )))
        } else {
            Err(Error::new(ErrorKind::Unsupported, format!("norm_p = {p}: only 2.0 and INFINITY are supported")))
        }
    }

    /// The `p` of this norm.
    pub fn p(self) -> f64 {
        match self {
            Norm::L2 => 2.0,
            Norm::LInf => f64::INFINITY,
        }
    }
}

/// The base optimizer that `second_step` runs, fused with the restore.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BaseOptimizer {
    /// None: the second step only restores `w`; the host runs its own optimizer on the gradient it
    /// computed at `w + e(w)`, as the PyTorch reference does.
    #[default]
    None,
    /// PyTorch's `torch.optim.SGD` (momentum, dampening, Nesterov, L2 weight decay).
    Sgd,
    /// PyTorch's `torch.optim.AdamW` (decoupled weight decay, bias correction).
    AdamW,
}

impl BaseOptimizer {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            BaseOptimizer::None => "none",
            BaseOptimizer::Sgd => "sgd",
            BaseOptimizer::AdamW => "adamw",
        }
    }

    /// PyTorch's default weight decay for this optimizer: 0 for SGD, 1e-2 for AdamW.
    pub fn default_weight_decay(self) -> f64 {
        if self == BaseOptimizer::AdamW { 1e-2 } else { 0.0 }
    }
}

/// When a step is a SAM step (two gradients: the first step perturbs, the host takes a second
/// gradient at `w + e(w)`) or a single-gradient step (the first step leaves `w` where it is, the
/// host skips its second forward/backward, and the second step applies the base update with the
/// direction the schedule defines). `t` counts the steps, from 0; a step that ends skipped (a
/// non-finite second gradient, or loss scaling's overflow) is taken back, decision, random draw and
/// statistics included, so the run goes on as if it never happened. The sources of each rule are
/// cited on its variant.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Schedule {
    /// Every step is a SAM step (the default: plain SAM).
    #[default]
    Every,
    /// SAM when `t mod k == 0`, else a single-gradient step with `d = g` (MosaicML Composer).
    Interval {
        /// The period, `k >= 1`.
        k: u64,
    },
    /// SAM with probability `p`, a Bernoulli trial per step from a SplitMix64 generator seeded
    /// with `seed` (RST / SS-SAM, arXiv 2203.09962); else `d = g`. The same seed gives the same
    /// decisions on every worker and after a checkpoint resume.
    Random {
        /// The probability of a SAM step, in `[0, 1]`.
        p: f64,
        /// The generator's seed.
        seed: u64,
    },
    /// LookSAM (arXiv 2203.02714): SAM when `t mod k == 0`, keeping `g_v`, the part of the
    /// perturbed gradient `g_s` orthogonal to `g`; other steps use one gradient and
    /// `d = g + alpha (||g|| / ||g_v||) g_v`. One f32 buffer per parameter holds `g_v`.
    LookSam {
        /// The period, `k >= 1`.
        k: u64,
        /// The weight of the reused direction, finite and `>= 0` (the paper: about 0.7).
        alpha: f64,
    },
    /// AE-SAM (arXiv 2304.14647): SAM when `||g||^2 >= mu + c_t sqrt(s)`, with `mu`, `s` moving
    /// averages (forgetting rate `delta`) of the squared gradient norm's mean and variance and
    /// `c_t` moving linearly from `lambda1` to `lambda2` over `planned_steps`; else `d = g`. The
    /// squared norm is the norm pass's own (under ASAM, `||T_w g||^2`), so the rule reads no
    /// gradient again.
    AeSam {
        /// The forgetting rate of the averages, in `[0, 1)` (0.9 in the paper).
        delta: f64,
        /// The threshold's coefficient at step 0, finite.
        lambda1: f64,
        /// The threshold's coefficient from step `planned_steps` on, finite.
        lambda2: f64,
        /// The steps over which `c_t` moves, `>= 1`: usually the planned length of training.
        planned_steps: u64,
    },
}

impl Schedule {
    /// Lower-case name, as the CLI spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Schedule::Every => "every",
            Schedule::Interval { .. } => "interval",
            Schedule::Random { .. } => "random",
            Schedule::LookSam { .. } => "looksam",
            Schedule::AeSam { .. } => "aesam",
        }
    }

    /// AE-SAM with the paper's forgetting rate (0.9) and samopt's default threshold, from
    /// `c = -1` at step 0 to `c = 1` at `planned_steps`.
    pub fn ae_sam(planned_steps: u64) -> Schedule {
        Schedule::AeSam { delta: 0.9, lambda1: -1.0, lambda2: 1.0, planned_steps }
    }

    /// Checks the schedule's own fields; the error names the field and its value.
    pub fn validate(&self) -> Result<()> {
        let period = |name: &str, k: u64| {
            if k == 0 { Err(Error::invalid(format!("{name} = 0: the period is at least 1"))) } else { Ok(()) }
        };
        match *self {
            Schedule::Every => Ok(()),
            Schedule::Interval { k } => period("schedule_k", k),
            Schedule::Random { p, .. } => {
                if (0.0..=1.0).contains(&p) {
                    Ok(())
                } else {
                    Err(Error::invalid(format!("schedule_p = {p}: a probability is in [0, 1]")))
                }
            }
            Schedule::LookSam { k, alpha } => {
                period("schedule_k", k)?;
                if alpha.is_finite() && alpha >= 0.0 {
                    Ok(())
                } else {
                    Err(Error::invalid(format!("looksam_alpha = {alpha}: must be finite and >= 0")))
                }
            }
            Schedule::AeSam { delta, lambda1, lambda2, planned_steps } => {
                if !(0.0..1.0).contains(&delta) {
                    return Err(Error::invalid(format!("aesam_delta = {delta}: must be in [0, 1)")));
                }
                for (name, v) in [("aesam_lambda1", lambda1), ("aesam_lambda2", lambda2)] {
                    if !v.is_finite() {
                        return Err(Error::invalid(format!("{name} = {v}: must be finite")));
                    }
                }
                period("aesam_planned_steps", planned_steps)
            }
        }
    }
}

/// Loss scaling, as PyTorch's `torch.amp.GradScaler`: the host multiplies its loss by the current
/// scale `S` ([`crate::Optimizer::loss_scale`]) before each backward pass, so every gradient in
/// the buffers is `S` times the true one. samopt unscales where it matters (the base update,
/// clipping, GSAM, AE-SAM's statistics; the perturbation `rho g / ||g||` does not depend on `S`),
/// folded into the existing passes' coefficients. A step whose gradients hold inf or NaN is
/// skipped with the weights exactly restored and `S` multiplied by `backoff_factor`; after
/// `growth_interval` consecutive steps without, `S` is multiplied by `growth_factor`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScale {
    /// `S` at the start, finite and > 0 (GradScaler: 2^16).
    pub init: f64,
    /// Multiplies `S` after `growth_interval` good steps, finite and >= 1 (2.0; 1.0 keeps `S`).
    pub growth_factor: f64,
    /// Multiplies `S` at a step with inf or NaN, in (0, 1] (0.5; 1.0 keeps `S`).
    pub backoff_factor: f64,
    /// Consecutive good steps before `S` grows, >= 1 (2000).
    pub growth_interval: u64,
}

impl LossScale {
    /// GradScaler's defaults: 2^16, growth 2 every 2000 good steps, backoff 0.5.
    pub fn dynamic() -> LossScale {
        LossScale { init: 65536.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 2000 }
    }

    /// A scale that never changes (overflowing steps are still skipped).
    pub fn fixed(scale: f64) -> LossScale {
        LossScale { init: scale, growth_factor: 1.0, backoff_factor: 1.0, growth_interval: u64::MAX }
    }

    /// Checks every field; the error names the field and its value.
    pub fn validate(&self) -> Result<()> {
        if !(self.init.is_finite() && self.init > 0.0 && self.init <= f32::MAX as f64) {
            return Err(Error::invalid(format!("loss_scale = {}: must be finite and > 0", self.init)));
        }
        if !(self.growth_factor.is_finite() && self.growth_factor >= 1.0) {
            return Err(Error::invalid(format!("loss_scale_growth = {}: must be finite and >= 1", self.growth_factor)));
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor <= 1.0) {
            return Err(Error::invalid(format!("loss_scale_backoff = {}: must be in (0, 1]", self.backoff_factor)));
        }
        if self.growth_interval == 0 {
            return Err(Error::invalid("loss_scale_interval = 0: at least 1 good step between growths"));
        }
        Ok(())
    }
}

/// The most CPU worker threads an optimizer may ask for ([`Config::threads`]).
pub const MAX_THREADS: usize = 1024;

/// How SAM perturbs the weights and, optionally, how the base optimizer steps. The formulas are
/// those of SAM (Foret et al. 2020, arXiv 2010.01412), ASAM (Kwon et al. 2021, arXiv 2102.11600)
/// and GSAM (Zhuang et al. 2022, arXiv 2203.08065), written out in `src/math.rs`; the base
/// optimizers' fields and defaults are those of PyTorch's `torch.optim.SGD` and
/// `torch.optim.AdamW` documentation.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Radius of the neighbourhood, `rho > 0` (0.05; ASAM usually wants about 2.0).
    pub rho: f64,
    /// Added to the gradient norm before dividing by it, `eps >= 0` (1e-12).
    pub eps: f64,
    /// ASAM: scale the ascent elementwise by `T_w = |w| + eta`.
    pub adaptive: bool,
    /// ASAM's offset `eta >= 0` (0.0, as in the PyTorch reference).
    pub eta: f64,
    /// The norm of the perturbation ball.
    pub norm: Norm,
    /// Which engine runs the passes.
    pub backend: Backend,
    /// Worker threads of the CPU engine, at most [`MAX_THREADS`]. 0 shares one process-wide
    /// pool with a worker per available core (started at the first use); a number gives this
    /// optimizer a pool of its own.
    pub threads: usize,
    /// The GPU adapter: an index into [`crate::gpu::adapters`], or a case-insensitive part of its
    /// name. `None`: the `SAMOPT_ADAPTER` environment variable, else the best adapter (discrete,
    /// integrated, virtual, CPU). `WGPU_BACKEND` (e.g. `vulkan`, `gl`) limits the APIs searched.
    pub adapter: Option<String>,

    /// The base optimizer run by the second step (default: none).
    pub base: BaseOptimizer,
    /// Learning rate, `>= 0` (1e-3, PyTorch's default). Change it step by step with
    /// [`crate::Optimizer::set_lr`]; a group scales it.
    pub lr: f64,
    /// SGD momentum `mu >= 0` (0).
    pub momentum: f64,
    /// SGD dampening `tau` (0).
    pub dampening: f64,
    /// SGD Nesterov momentum (false); needs `momentum > 0` and `dampening == 0`, as in PyTorch.
    pub nesterov: bool,
    /// Weight decay `>= 0` of group 0; `None`: the base optimizer's PyTorch default (0 for SGD,
    /// 1e-2 for AdamW). SGD adds `lambda * w` to the gradient; AdamW decays `w` directly.
    pub weight_decay: Option<f64>,
    /// AdamW's `beta1` in `[0, 1)` (0.9).
    pub beta1: f64,
    /// AdamW's `beta2` in `[0, 1)` (0.999).
    pub beta2: f64,
    /// AdamW's `eps >= 0` (1e-8).
    pub adam_eps: f64,
    /// Clip the second (perturbed) gradient to this global L2 norm, as `clip_grad_norm_` does;
    /// `None` (default): no clipping. Clipping the first gradient would change nothing: the
    /// perturbation divides by its norm. On a single-gradient step ([`Schedule`]) the factor comes
    /// from that step's gradient `||g||` and scales the whole direction.
    pub max_grad_norm: Option<f64>,
    /// GSAM's `alpha`: step with `g' - alpha * g_perp`, `g_perp = g - (g.g' / ||g'||^2) g'`, where
    /// `g` is the first gradient (kept by the first step) and `g'` the second. `None`: plain SAM.
    /// Single-gradient steps of a schedule have no `g'`: they step with `g`.
    pub gsam_alpha: Option<f64>,
    /// Which steps are SAM steps and which take a single gradient (default: every step is SAM).
    pub schedule: Schedule,
    /// Loss scaling (default `None`: the gradients are the true ones).
    pub loss_scale: Option<LossScale>,
    /// f32 master weights for f16 and bf16 tensors (default false): samopt keeps an f32 copy of
    /// each such weight, the base optimizer updates the copy, and the host's tensor receives it
    /// rounded, so updates smaller than half a unit in the last place accumulate instead of being
    /// lost. The perturbation and restore still work on the host's tensor, exactly. The copy is
    /// taken from the weights at a tensor's first update and is authoritative from then on (it is
    /// in checkpoints). Needs a built-in base optimizer.
    pub master_weights: bool,
    /// AdamW only: perturb along AdamW's preconditioned gradient, `e = rho P g / ||P g||` with
    /// `P = 1 / (sqrt(v_hat) + adam_eps)` from each element's second moment after the tensor's
    /// updates so far (plain SAM before its first update), as preconditioned SAM in Functional-SAM
    /// (Singh et al. 2025, arXiv 2502.02407) defines it for language models. Default false. Not
    /// with ASAM or the sign perturbation.
    pub preconditioned: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            rho: 0.05,
            eps: 1e-12,
            adaptive: false,
            eta: 0.0,
            norm: Norm::L2,
            backend: Backend::Auto,
            threads: 0,
            adapter: None,
            base: BaseOptimizer::None,
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: None,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: None,
            gsam_alpha: None,
            schedule: Schedule::Every,
            loss_scale: None,
            master_weights: false,
            preconditioned: false,
        }
    }
}

impl Config {
    /// Checks every field; the error names the first field that is wrong and its value.
    pub fn validate(&self) -> Result<()> {
        if self.threads > MAX_THREADS {
            return Err(Error::invalid(format!("threads = {}: at most {MAX_THREADS}", self.threads)));
        }
        if !(self.rho.is_finite() && self.rho > 0.0) {
            return Err(Error::invalid(format!("rho = {}: must be finite and > 0", self.rho)));
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(Error::invalid(format!("eps = {}: must be finite and >= 0", self.eps)));
        }
        if !(self.eta.is_finite() && self.eta >= 0.0) {
            return Err(Error::invalid(format!("eta = {}: must be finite and >= 0", self.eta)));
        }
        let non_negative = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(Error::invalid(format!("{name} = {v}: must be finite and >= 0")))
            }
        };
        non_negative("lr", self.lr)?;
        non_negative("momentum", self.momentum)?;
        if !self.dampening.is_finite() {
            return Err(Error::invalid(format!("dampening = {}: must be finite", self.dampening)));
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(Error::invalid(format!(
                "nesterov = true needs momentum > 0 and dampening = 0 (momentum = {}, dampening = {})",
                self.momentum, self.dampening
            )));
        }
        if let Some(wd) = self.weight_decay {
            non_negative("weight_decay", wd)?;
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::invalid(format!("{name} = {b}: must be in [0, 1)")));
            }
        }
        non_negative("adam_eps", self.adam_eps)?;
        if let Some(m) = self.max_grad_norm
            && !(m.is_finite() && m > 0.0)
        {
            return Err(Error::invalid(format!("max_grad_norm = {m}: must be finite and > 0 (or off)")));
        }
        if let Some(a) = self.gsam_alpha {
            non_negative("gsam_alpha", a)?;
            if self.base == BaseOptimizer::None {
                return Err(Error::invalid(format!(
                    "gsam_alpha = {a} needs a built-in base optimizer (base = sgd or adamw): \
                     with base = none the host's optimizer applies the gradient"
                )));
            }
        }
        if let Some(m) = self.max_grad_norm
            && self.base == BaseOptimizer::None
        {
            return Err(Error::invalid(format!(
                "max_grad_norm = {m} needs a built-in base optimizer (base = sgd or adamw): with base = \
                 none, clip in the host's optimizer"
            )));
        }
        self.schedule.validate()?;
        if let Some(scale) = &self.loss_scale {
            scale.validate()?;
        }
        if self.preconditioned {
            if self.base != BaseOptimizer::AdamW {
                return Err(Error::invalid(format!(
                    "preconditioned = true needs base = adamw (its second moment is the preconditioner), not {}",
                    self.base.name()
                )));
            }
            if self.adaptive || self.norm != Norm::L2 {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "preconditioned = true with ASAM or p = infinity: the preconditioned perturbation is the L2 one",
                ));
            }
        }
        if self.master_weights && self.base == BaseOptimizer::None {
            return Err(Error::invalid(
                "master_weights = true needs a built-in base optimizer (base = sgd or adamw): with base = none the \
                 host's optimizer updates the weights",
            ));
        }
        if let Schedule::LookSam { .. } = self.schedule {
            if self.adaptive {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "schedule = looksam with adaptive = true: LookSAM's reuse needs the plain gradient norm, \
                     ASAM's norm pass computes ||T_w g||; use interval, random or aesam with ASAM",
                ));
            }
            if let Some(a) = self.gsam_alpha {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("schedule = looksam with gsam_alpha = {a}: both replace the descent direction; choose one"),
                ));
            }
        }
        Ok(())
    }

    /// A fingerprint of every field that shapes the optimizer's state or update (not `backend`,
    /// `threads`, `adapter`, nor `lr`, which schedules change and checkpoints carry), so a
    /// checkpoint refuses to load into a differently configured optimizer. `rho` is the
    /// configured one (a rho schedule's current value travels in the checkpoint); the step
    /// schedule joins the fingerprint only when it is not [`Schedule::Every`], so checkpoints of
    /// plain SAM keep the fingerprint they had before schedules existed.
    pub fn fingerprint(&self) -> u64 {
        let f = |o: Option<f64>| o.unwrap_or(f64::NAN);
        let h = crate::checkpoint::Fnv::new()
            .f64(self.rho)
            .f64(self.eps)
            .u64(self.adaptive as u64)
            .f64(self.eta)
            .f64(self.norm.p())
            .u64(self.base as u64)
            .f64(self.momentum)
            .f64(self.dampening)
            .u64(self.nesterov as u64)
            .f64(self.effective_weight_decay())
            .f64(self.beta1)
            .f64(self.beta2)
            .f64(self.adam_eps)
            .f64(f(self.max_grad_norm))
            .f64(f(self.gsam_alpha));
        let h = match self.schedule {
            Schedule::Every => h,
            Schedule::Interval { k } => h.u64(1).u64(k),
            Schedule::Random { p, seed } => h.u64(2).f64(p).u64(seed),
            Schedule::LookSam { k, alpha } => h.u64(3).u64(k).f64(alpha),
            Schedule::AeSam { delta, lambda1, lambda2, planned_steps } => {
                h.u64(4).f64(delta).f64(lambda1).f64(lambda2).u64(planned_steps)
            }
        };
        let h = if self.master_weights { h.u64(6) } else { h };
        let h = if self.preconditioned { h.u64(7) } else { h };
        let h = match self.loss_scale {
            None => h,
            Some(l) => h.u64(5).f64(l.growth_factor).f64(l.backoff_factor).u64(l.growth_interval),
        };
        h.finish()
    }

    /// f32 state values per parameter element of a tensor of `dtype`: the base optimizer's (1 for
    /// SGD with momentum, 2 for AdamW, else 0), then LookSAM's `g_v` (1), then the master weight
    /// (1, f16 and bf16 tensors with [`master_weights`](Self::master_weights)).
    pub fn state_per_element(&self, dtype: crate::DType) -> usize {
        self.base_state_per_element() + self.looksam() as usize + self.has_master(dtype) as usize
    }

    /// Whether tensors of `dtype` get f32 master weights.
    pub fn has_master(&self, dtype: crate::DType) -> bool {
        self.master_weights && dtype != crate::DType::F32
    }

    /// The base optimizer's f32 state values per parameter element.
    pub fn base_state_per_element(&self) -> usize {
        match self.base {
            BaseOptimizer::AdamW => 2,
            BaseOptimizer::Sgd if self.momentum != 0.0 => 1,
            _ => 0,
        }
    }

    /// Whether the schedule is LookSAM (which keeps `g_v` and the first gradient).
    pub fn looksam(&self) -> bool {
        matches!(self.schedule, Schedule::LookSam { .. })
    }

    /// Whether the first step keeps a copy of the first gradient for the second step: GSAM and
    /// LookSAM.
    pub fn keeps_first_grad(&self) -> bool {
        self.gsam_alpha.is_some() || self.looksam()
    }

    /// The weight decay of group 0: the configured one, or the base optimizer's default.
    pub fn effective_weight_decay(&self) -> f64 {
        self.weight_decay.unwrap_or_else(|| self.base.default_weight_decay())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_fields_by_name() {
        let bad = [
            Config { rho: 0.0, ..Config::default() },
            Config { rho: -1.0, ..Config::default() },
            Config { rho: f64::NAN, ..Config::default() },
            Config { eps: -1e-9, ..Config::default() },
            Config { eta: f64::INFINITY, ..Config::default() },
        ];
        let names = ["rho", "rho", "rho", "eps", "eta"];
        let more = [
            (Config { lr: -1.0, ..Config::default() }, "lr"),
            (Config { momentum: f64::NAN, ..Config::default() }, "momentum"),
            (Config { nesterov: true, ..Config::default() }, "nesterov"),
            (Config { nesterov: true, momentum: 0.9, dampening: 0.1, ..Config::default() }, "nesterov"),
            (Config { weight_decay: Some(-0.1), ..Config::default() }, "weight_decay"),
            (Config { beta1: 1.0, ..Config::default() }, "beta1"),
            (Config { beta2: -0.5, ..Config::default() }, "beta2"),
            (Config { adam_eps: -1e-8, ..Config::default() }, "adam_eps"),
            (Config { max_grad_norm: Some(0.0), base: BaseOptimizer::Sgd, ..Config::default() }, "max_grad_norm"),
            (Config { max_grad_norm: Some(1.0), ..Config::default() }, "max_grad_norm"),
            (Config { gsam_alpha: Some(0.1), ..Config::default() }, "gsam_alpha"),
            (Config { schedule: Schedule::Interval { k: 0 }, ..Config::default() }, "schedule_k"),
            (Config { schedule: Schedule::LookSam { k: 0, alpha: 0.7 }, ..Config::default() }, "schedule_k"),
            (Config { schedule: Schedule::Random { p: 1.5, seed: 0 }, ..Config::default() }, "schedule_p"),
            (Config { schedule: Schedule::Random { p: -0.1, seed: 0 }, ..Config::default() }, "schedule_p"),
            (Config { schedule: Schedule::Random { p: f64::NAN, seed: 0 }, ..Config::default() }, "schedule_p"),
            (Config { schedule: Schedule::LookSam { k: 5, alpha: -0.5 }, ..Config::default() }, "looksam_alpha"),
            (Config { schedule: Schedule::LookSam { k: 5, alpha: f64::NAN }, ..Config::default() }, "looksam_alpha"),
            (
                Config { schedule: Schedule::LookSam { k: 5, alpha: 0.7 }, adaptive: true, ..Config::default() },
                "schedule",
            ),
            (
                Config {
                    schedule: Schedule::AeSam { delta: 1.0, lambda1: -1.0, lambda2: 1.0, planned_steps: 10 },
                    ..Config::default()
                },
                "aesam_delta",
            ),
            (
                Config {
                    schedule: Schedule::AeSam { delta: 0.9, lambda1: f64::NAN, lambda2: 1.0, planned_steps: 10 },
                    ..Config::default()
                },
                "aesam_lambda1",
            ),
            (Config { schedule: Schedule::ae_sam(0), ..Config::default() }, "aesam_planned_steps"),
            (Config { loss_scale: Some(LossScale::fixed(0.0)), ..Config::default() }, "loss_scale"),
            (Config { master_weights: true, ..Config::default() }, "master_weights"),
            (Config { preconditioned: true, base: BaseOptimizer::Sgd, ..Config::default() }, "preconditioned"),
            (Config { loss_scale: Some(LossScale::fixed(f64::INFINITY)), ..Config::default() }, "loss_scale"),
            (
                Config {
                    loss_scale: Some(LossScale { growth_factor: 0.5, ..LossScale::dynamic() }),
                    ..Config::default()
                },
                "loss_scale_growth",
            ),
            (
                Config {
                    loss_scale: Some(LossScale { backoff_factor: 0.0, ..LossScale::dynamic() }),
                    ..Config::default()
                },
                "loss_scale_backoff",
            ),
            (
                Config {
                    loss_scale: Some(LossScale { growth_interval: 0, ..LossScale::dynamic() }),
                    ..Config::default()
                },
                "loss_scale_interval",
            ),
        ];
        for (c, name) in &more {
            let e = c.validate().unwrap_err();
            assert!(e.message().starts_with(name), "{}", e.message());
        }
        for (c, name) in bad.iter().zip(names) {
            let e = c.validate().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
            assert!(e.message().starts_with(name), "{}", e.message());
        }
        Config::default().validate().unwrap();
    }

    #[test]
    fn norm_p() {
        assert_eq!(Norm::from_p(2.0).unwrap(), Norm::L2);
        assert_eq!(Norm::from_p(f64::INFINITY).unwrap(), Norm::LInf);
        assert_eq!(Norm::from_p(3.0).unwrap_err().kind(), ErrorKind::Unsupported);
        assert_eq!(Norm::from_p(0.5).unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert_eq!(Norm::from_p(f64::NAN).unwrap_err().kind(), ErrorKind::InvalidArgument);
    }
}
