//! The SAM formulas, written once; the CPU kernels call these and the GPU shaders mirror them.
//!
//! With `g` the gradient at `w` and `T_w = |w| + eta` under ASAM (1 otherwise), the ascent
//! (first) step moves every weight to `w + e(w)` with
//!
//! ```text
//! p = 2:    n = ||T_w * g||_2 over all registered tensors,  e = rho * T_w^2 * g / (n + eps)
//! p = inf:  e = rho * T_w * sign(g)                          (sign(0) = 0, as torch.sign)
//! ```
//!
//! The norm is accumulated in f64 from f32 products, so it is exact to float64 rounding whatever
//! the element count. The perturbation is computed in f32 as the PyTorch reference (`sam.py`,
//! davda54/sam) writes it, `w + ((T_w^2 * g) * scale)` with `scale = rho / (n + eps)`; that the bits
//! match PyTorch's is not claimed (PyTorch's kernels choose their own vectorisation): the LibTorch
//! example checks that the two agree within 1e-5 relative over 60 steps (it prints the measured
//! difference: 8.4e-7 when last measured, see the README).

use crate::config::{Config, Norm};

/// One element's contribution to the squared ascent norm: `(T_w * g)^2`, in f64.
#[inline(always)]
pub(crate) fn ascent_norm_term<const ADAPTIVE: bool>(w: f32, g: f32, eta: f64) -> f64 {
    let g = g as f64;
    if ADAPTIVE {
        let t = (w as f64).abs() + eta;
        (t * g) * (t * g)
    } else {
        g * g
    }
}

/// The perturbation of one first step, fixed once the global norm is known.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Perturbation {
    /// ASAM: scale by `T_w` elementwise.
    pub adaptive: bool,
    /// ASAM's `eta`.
    pub eta: f32,
    /// p = infinity: the sign perturbation.
    pub sign: bool,
    /// `rho / (n + eps)` for p = 2, `rho` for p = infinity.
    pub scale: f32,
}

impl Perturbation {
    /// The perturbation for a configuration, the current `rho` and the global ascent norm `n`.
    ///
    /// A zero norm means every (scaled) gradient element is zero: the perturbation is zero for
    /// every `eps`, where `rho / (0 + 0) * 0` would be NaN. The scale is capped at f32's largest
    /// value, so that a norm below `rho / f32::MAX` (gradients of subnormal size, `eps = 0`) gives
    /// a finite perturbation instead of `0 * inf`.
    pub fn new(config: &Config, rho: f64, norm: f64) -> Perturbation {
        let sign = config.norm == Norm::LInf;
        let scale = if sign {
            rho
        } else if norm == 0.0 {
            0.0
        } else {
            (rho / (norm + config.eps)).min(f32::MAX as f64)
        };
        Perturbation { adaptive: config.adaptive, eta: config.eta as f32, sign, scale: scale as f32 }
    }
}

/// `w + e(w)` for one element. The const parameters let each variant's loop vectorize.
#[inline(always)]
pub(crate) fn perturbed<const ADAPTIVE: bool, const SIGN: bool>(w: f32, g: f32, eta: f32, scale: f32) -> f32 {
    let t = if ADAPTIVE { w.abs() + eta } else { 1.0 };
    let e = if SIGN {
        let s = if g > 0.0 {
            scale
        } else if g < 0.0 {
            -scale
        } else {
            0.0
        };
        if ADAPTIVE { s * t } else { s }
    } else if ADAPTIVE {
        ((t * t) * g) * scale
    } else {
        g * scale
    };
    w + e
}

// ---- The base optimizers, fused with the restore (PyTorch's SGD and AdamW) ----
//
// With `w` the restored weight and `d` the descent direction (the second gradient `g'`, clipped by
// `c` and, under GSAM, `d = a * g' - b * g` with `a = c + alpha * (g.g') / ||g'||^2`, `b = alpha`):
//
// ```text
// SGD:    d <- d + lambda*w;  b <- d (first update) or mu*b + (1 - tau)*d;  d <- d + mu*b (Nesterov) or b
//         w <- w - lr*d
// AdamW:  w <- w * (1 - lr*lambda);  m <- beta1*m + (1 - beta1)*d;  v <- beta2*v + (1 - beta2)*(d*d)
//         w <- w - (lr / (1 - beta1^t)) * (m / (sqrt(v) / sqrt(1 - beta2^t) + eps))
// ```
//
// Scalars are computed in f64 once per step and rounded to f32; the elementwise work is f32 in
// the order of the formulas above (those of PyTorch's documentation of `torch.optim.SGD` and
// `torch.optim.AdamW`; bit equality with PyTorch's kernels is not claimed). The state (momentum
// buffer, Adam moments) is f32 for every parameter dtype.
//
// SGD's cases are folded into coefficients, so one branch-free loop (which vectorizes) serves them
// all: `d <- a*g' - b*g` (b = 0 without GSAM), `d <- d + lambda*w` (lambda may be 0),
// `buf <- keep*buf + take*d` ((0, 1) on the first update, when the buffer is zero, and without
// momentum; (mu, 1 - tau) after), `d <- nd*d + nb*buf` ((1, mu) Nesterov, (0, 1) momentum, (1, 0)
// none). Each folded term adds or multiplies an exact 0 or 1, so the result is that of the unfolded
// formulas above, bit for bit, up to the sign of a zero.

/// The per-step scalars shared by every tensor.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct UpdateStep {
    /// The direction is `a * g' - b * g` (b = 0 without GSAM).
    pub a: f32,
    pub b: f32,
    /// SGD: `d <- nd*d + nb*buf`.
    pub nd: f32,
    pub nb: f32,
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub adam_eps: f32,
}

impl UpdateStep {
    /// The scalars of one second step for `config`, with direction coefficients `a`, `b`.
    pub fn new(config: &Config, a: f64, b: f64) -> UpdateStep {
        let (nd, nb) = if config.momentum == 0.0 {
            (1.0, 0.0)
        } else if config.nesterov {
            (1.0, config.momentum)
        } else {
            (0.0, 1.0)
        };
        UpdateStep {
            a: a as f32,
            b: b as f32,
            nd,
            nb: nb as f32,
            beta1: config.beta1 as f32,
            one_minus_beta1: (1.0 - config.beta1) as f32,
            beta2: config.beta2 as f32,
            one_minus_beta2: (1.0 - config.beta2) as f32,
            adam_eps: config.adam_eps as f32,
        }
    }
}

/// The per-tensor scalars of one step (they depend on the tensor's group and update count).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct TensorStep {
    /// The learning rate times the group's scale.
    pub lr: f32,
    /// SGD: the group's weight decay `lambda` (added to the gradient).
    pub weight_decay: f32,
    /// SGD: `buf <- keep*buf + take*d`.
    pub keep: f32,
    pub take: f32,
    /// AdamW: `1 - lr*lambda`.
    pub decay: f32,
    /// AdamW: `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// AdamW: `sqrt(1 - beta2^t)`.
    pub bias2_sqrt: f32,
    /// Master weights: this is the tensor's first update, so its f32 copy is taken from the
    /// weights now (afterwards the copy is the weight).
    pub fresh: bool,
}

impl TensorStep {
    /// The scalars for learning rate `lr`, weight decay `lambda` and update number `t` (from 1).
    pub fn new(config: &Config, lr: f64, lambda: f64, t: u64) -> TensorStep {
        let first = t == 1 || config.momentum == 0.0;
        let t = t.min(i32::MAX as u64) as i32;
        TensorStep {
            lr: lr as f32,
            weight_decay: lambda as f32,
            keep: if first { 0.0 } else { config.momentum as f32 },
            take: if first { 1.0 } else { (1.0 - config.dampening) as f32 },
            decay: (1.0 - lr * lambda) as f32,
            step_size: (lr / (1.0 - config.beta1.powi(t))) as f32,
            bias2_sqrt: (1.0 - config.beta2.powi(t)).sqrt() as f32,
            fresh: t == 1,
        }
    }
}

/// The descent direction for one element: `a*g' - b*g`.
#[inline(always)]
pub(crate) fn direction(g2: f32, g1: f32, s: &UpdateStep) -> f32 {
    s.a * g2 - s.b * g1
}

/// One SGD update of one element; `buf` is its momentum buffer.
#[inline(always)]
pub(crate) fn sgd(w: f32, d: f32, buf: &mut f32, s: &UpdateStep, t: &TensorStep) -> f32 {
    let d = d + t.weight_decay * w;
    *buf = t.keep * *buf + t.take * d;
    let d = s.nd * d + s.nb * *buf;
    w - t.lr * d
}

/// One AdamW update of one element; `m`, `v` are its moments.
#[inline(always)]
pub(crate) fn adamw(w: f32, d: f32, m: &mut f32, v: &mut f32, s: &UpdateStep, t: &TensorStep) -> f32 {
    let w = w * t.decay;
    *m = s.beta1 * *m + s.one_minus_beta1 * d;
    *v = s.beta2 * *v + s.one_minus_beta2 * (d * d);
    let denom = v.sqrt() / t.bias2_sqrt + s.adam_eps;
    // With adam_eps = 0, denom is 0 only where every gradient so far was 0, so m is 0 too: the
    // step is 0 there, not 0/0. Elsewhere this selects m/denom, bit for bit.
    let ratio = if denom > 0.0 { *m / denom } else { 0.0 };
    w - t.step_size * ratio
}
