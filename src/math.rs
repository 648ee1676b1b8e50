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
//! the element count. The perturbation is computed in f32 in the order the PyTorch reference uses,
//! `w + ((T_w^2 * g) * scale)` with `scale = rho / (n + eps)`, so an f32 SAM step without ASAM gives
//! the same bits as `sam.py` for the same scale.

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
    /// The perturbation for a configuration and the global ascent norm `n`.
    pub fn new(config: &Config, norm: f64) -> Perturbation {
        let sign = config.norm == Norm::LInf;
        let scale = if sign { config.rho } else { config.rho / (norm + config.eps) };
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
