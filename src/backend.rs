//! What every backend implements: the same few passes over the registered tensors.
//!
//! The engine owns the state machine and decides which pass runs when; a backend only moves
//! bytes. Each pass either completes for every tensor or, on error, has written nothing the host
//! can see (the norm pass only reads; the perturbation and restore passes cannot fail once the
//! norm pass has succeeded, except for a device error, which the engine reports as such).

use crate::config::Config;
use crate::dtype::DType;
use crate::error::Result;
use crate::math::Perturbation;

/// A parameter and its gradient in host memory, owned by the host.
///
/// The engine checks before building one that both ranges are non-null, aligned for `dtype`,
/// disjoint from each other and from every other registered range.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HostTensor {
    pub param: *mut u8,
    pub grad: *const u8,
    pub len: usize,
    pub dtype: DType,
}

// SAFETY: a HostTensor is a pair of addresses the host promised (at registration) stay valid and
// untouched by others during optimizer calls; the passes write disjoint ranges from each thread.
unsafe impl Send for HostTensor {}
// SAFETY: as above.
unsafe impl Sync for HostTensor {}

/// The result of the norm pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct AscentNorm {
    /// `sum (T_w * g)^2` over every element of every tensor. NaN or infinite exactly when some
    /// gradient element (or, under ASAM, weight element) is; that is the non-finite flag.
    pub sum_sq: f64,
}

/// The passes of one SAM step.
pub(crate) trait Passes: Send {
    /// Adds a tensor; it takes part in every later pass. Allocates its backup.
    fn add_host(&mut self, tensor: HostTensor) -> Result<()>;

    /// Reads every gradient (and, under ASAM, every weight) once; writes nothing.
    fn ascent_norm(&mut self, config: &Config) -> Result<AscentNorm>;

    /// Saves every weight's bits, then moves it to `w + e(w)`.
    fn perturb(&mut self, perturbation: &Perturbation) -> Result<()>;

    /// Writes back the bits saved by the last `perturb`.
    fn restore(&mut self) -> Result<()>;

    /// The first tensor (index, element) whose gradient, or under ASAM weight, is not finite.
    /// Only called after `ascent_norm` reported a non-finite sum, to say where.
    fn find_non_finite(&self, adaptive: bool) -> Option<(usize, usize)>;

    /// Threads (CPU) or adapter (GPU), for messages and `samopt info`.
    fn describe(&self) -> String;
}
