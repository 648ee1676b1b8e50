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

/// How SAM perturbs the weights. See `SAM.md` for the formulas.
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
    /// Worker threads of the CPU engine; 0 uses every available core.
    pub threads: usize,
    /// The GPU adapter: an index into [`crate::gpu::adapters`], or a case-insensitive part of its
    /// name. `None`: the `SAMOPT_ADAPTER` environment variable, else the best adapter (discrete,
    /// integrated, virtual, CPU). `WGPU_BACKEND` (e.g. `vulkan`, `gl`) limits the APIs searched.
    pub adapter: Option<String>,
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
        }
    }
}

impl Config {
    /// Checks every field; the error names the first field that is wrong and its value.
    pub fn validate(&self) -> Result<()> {
        if !(self.rho.is_finite() && self.rho > 0.0) {
            return Err(Error::invalid(format!("rho = {}: must be finite and > 0", self.rho)));
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(Error::invalid(format!("eps = {}: must be finite and >= 0", self.eps)));
        }
        if !(self.eta.is_finite() && self.eta >= 0.0) {
            return Err(Error::invalid(format!("eta = {}: must be finite and >= 0", self.eta)));
        }
        Ok(())
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
