//! The engine: the registry of tensors, the state machine of a SAM step, and the backend.
//!
//! ```text
//!   Idle --first_step--> Perturbed --second_step--> Idle
//! ```
//!
//! Registration happens while idle. Every call checks everything it needs before the first write,
//! so a call that fails leaves the optimizer and the host's buffers as they were.

use std::collections::BTreeMap;

use crate::backend::{HostTensor, Passes};
use crate::config::{Backend, Config};
use crate::cpu::CpuEngine;
use crate::dtype::{DType, Element};
use crate::error::{Error, ErrorKind, Result};
use crate::math::Perturbation;

/// Identifies a registered tensor: its index in registration order, from 0.
pub type TensorId = u32;

/// The phase of a SAM step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// At `w`: ready for registration or a first step.
    Idle,
    /// At `w + e(w)`: the host computes the gradient here, then calls the second step.
    Perturbed,
}

/// Metadata the engine keeps per tensor.
#[derive(Clone, Copy, Debug)]
struct TensorInfo {
    len: usize,
    dtype: DType,
}

/// A parameter/gradient pair allocated and owned by the optimizer (the safe Rust route).
struct OwnedPair {
    param: Box<[u64]>,
    grad: Box<[u64]>,
    len: usize,
    dtype: DType,
}

/// A Sharpness-Aware Minimization optimizer over host buffers.
///
/// The host registers its parameter and gradient buffers once, then for every training step:
/// computes the gradient at `w`, calls [`first_step`](Self::first_step) (the weights move to
/// `w + e(w)`), computes the gradient again at the perturbed weights, calls
/// [`second_step`](Self::second_step) (the weights get back exactly the bits of `w`), and runs its
/// base optimizer on the second gradient.
///
/// ```
/// use samopt::{Config, Optimizer};
///
/// let mut sam = Optimizer::new(Config { rho: 0.1, ..Config::default() })?;
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
    backend: Backend,
    passes: Box<dyn Passes>,
    phase: Phase,
    tensors: Vec<TensorInfo>,
    /// Every registered host byte range, `start -> (end, tensor)`, to refuse overlaps.
    ranges: BTreeMap<usize, (usize, TensorId)>,
    owned: Vec<Option<OwnedPair>>,
    last_norm: Option<f64>,
    steps: u64,
}

impl std::fmt::Debug for Optimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Optimizer")
            .field("config", &self.config)
            .field("backend", &self.passes.describe())
            .field("phase", &self.phase)
            .field("tensors", &self.tensors.len())
            .field("last_norm", &self.last_norm)
            .finish()
    }
}

impl Optimizer {
    /// Validates `config` and creates an optimizer with no tensors.
    pub fn new(config: Config) -> Result<Optimizer> {
        config.validate()?;
        let (backend, passes): (Backend, Box<dyn Passes>) = match config.backend {
            Backend::Auto | Backend::Cpu => (Backend::Cpu, Box::new(CpuEngine::new(config.threads)?)),
            Backend::Gpu => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "backend = GPU: this build has no GPU engine yet; use CPU or AUTO",
                ));
            }
        };
        Ok(Optimizer {
            config,
            backend,
            passes,
            phase: Phase::Idle,
            tensors: Vec::new(),
            ranges: BTreeMap::new(),
            owned: Vec::new(),
            last_norm: None,
            steps: 0,
        })
    }

    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The backend that runs the passes (never [`Backend::Auto`]).
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A one-line description of the backend, e.g. `cpu (2 threads)`.
    pub fn backend_description(&self) -> String {
        self.passes.describe()
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

    /// Number of completed SAM steps (second steps).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The L2 norm `||T_w * g||_2` of the last successful first step, over every registered
    /// tensor. Reported for p = infinity too, where the perturbation itself does not use it.
    pub fn grad_norm(&self) -> Option<f64> {
        self.last_norm
    }

    /// Registers a parameter buffer and its gradient buffer, both owned by the host.
    ///
    /// Checks, and refuses with [`ErrorKind::InvalidArgument`]: NULL or misaligned pointers,
    /// `len == 0`, a byte size or range that overflows, parameter and gradient overlapping each
    /// other or any range registered before (the same buffer twice included). With
    /// [`ErrorKind::InvalidState`]: registering between a first and a second step.
    ///
    /// # Safety
    /// `param` must be valid for reads and writes and `grad` for reads of `len` elements of
    /// `dtype`, for as long as the optimizer lives; the host must not access them while an
    /// optimizer call runs, and writes the gradient only between calls.
    pub unsafe fn register_host_raw(
        &mut self,
        param: *mut u8,
        grad: *const u8,
        len: usize,
        dtype: DType,
    ) -> Result<TensorId> {
        self.expect_idle("register a tensor")?;
        if self.tensors.len() >= TensorId::MAX as usize {
            return Err(Error::invalid(format!("too many tensors: {}", self.tensors.len())));
        }
        if len == 0 {
            return Err(Error::invalid("len = 0: a tensor needs at least one element"));
        }
        let bytes = len.checked_mul(dtype.size()).filter(|&b| b <= isize::MAX as usize).ok_or_else(|| {
            Error::invalid(format!("len = {len}: {len} elements of {} overflow the address space", dtype.name()))
        })?;
        let p = Self::check_range("param", param as usize, bytes, dtype)?;
        let g = Self::check_range("grad", grad as usize, bytes, dtype)?;
        if p.start < g.end && g.start < p.end {
            return Err(Error::invalid(format!(
                "param = {param:p} and grad = {grad:p} overlap ({bytes} bytes each): they must be separate buffers"
            )));
        }
        for (name, r) in [("param", &p), ("grad", &g)] {
            if let Some(other) = self.overlapping(r) {
                return Err(Error::invalid(format!(
                    "{name} = {:#x} ({bytes} bytes) overlaps a buffer of tensor {other}, registered before",
                    r.start
                )));
            }
        }
        let id = self.tensors.len() as TensorId;
        self.passes.add_host(HostTensor { param, grad, len, dtype })?;
        self.ranges.insert(p.start, (p.end, id));
        self.ranges.insert(g.start, (g.end, id));
        self.tensors.push(TensorInfo { len, dtype });
        self.owned.push(None);
        Ok(id)
    }

    /// Typed form of [`register_host_raw`](Self::register_host_raw).
    ///
    /// # Safety
    /// As [`register_host_raw`](Self::register_host_raw).
    pub unsafe fn register_host<T: Element>(&mut self, param: *mut T, grad: *const T, len: usize) -> Result<TensorId> {
        unsafe { self.register_host_raw(param.cast(), grad.cast(), len, T::DTYPE) }
    }

    /// Allocates a parameter initialised from `init` and a zeroed gradient, owned by the
    /// optimizer, and registers them. Read and write them with [`param`](Self::param),
    /// [`param_mut`](Self::param_mut) and [`grad_mut`](Self::grad_mut): the safe route for Rust code
    /// that does not need its own buffers.
    pub fn add_tensor<T: Element>(&mut self, init: &[T]) -> Result<TensorId> {
        self.expect_idle("add a tensor")?;
        let len = init.len();
        let words = (len * T::DTYPE.size()).div_ceil(8);
        let mut param = vec![0u64; words].into_boxed_slice();
        let mut grad = vec![0u64; words].into_boxed_slice();
        bytemuck::cast_slice_mut::<u64, T>(&mut param)[..len].copy_from_slice(init);
        // SAFETY: both boxes live in `self.owned` as long as the optimizer, never move (boxed
        // slices), and are only reachable through `&self`/`&mut self` outside optimizer calls.
        let id = unsafe {
            self.register_host_raw(param.as_mut_ptr().cast(), grad.as_mut_ptr().cast_const().cast(), len, T::DTYPE)?
        };
        self.owned[id as usize] = Some(OwnedPair { param, grad, len, dtype: T::DTYPE });
        Ok(id)
    }

    fn owned_pair<T: Element>(&self, id: TensorId) -> Result<&OwnedPair> {
        let pair = self
            .owned
            .get(id as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::invalid(format!("id = {id}: not a tensor allocated by add_tensor")))?;
        if pair.dtype != T::DTYPE {
            return Err(Error::invalid(format!(
                "id = {id}: tensor holds {}, not {}",
                pair.dtype.name(),
                T::DTYPE.name()
            )));
        }
        Ok(pair)
    }

    fn owned_pair_mut<T: Element>(&mut self, id: TensorId) -> Result<&mut OwnedPair> {
        self.owned_pair::<T>(id)?;
        Ok(self.owned[id as usize].as_mut().expect("checked above"))
    }

    /// The parameter of a tensor from [`add_tensor`](Self::add_tensor): `w`, or `w + e(w)` between
    /// the two steps.
    pub fn param<T: Element>(&self, id: TensorId) -> Result<&[T]> {
        let pair = self.owned_pair::<T>(id)?;
        Ok(&bytemuck::cast_slice(&pair.param)[..pair.len])
    }

    /// The parameter of a tensor from [`add_tensor`](Self::add_tensor), for the host's own update.
    /// Between the two steps a write is overwritten by the restore.
    pub fn param_mut<T: Element>(&mut self, id: TensorId) -> Result<&mut [T]> {
        let pair = self.owned_pair_mut::<T>(id)?;
        Ok(&mut bytemuck::cast_slice_mut(&mut pair.param)[..pair.len])
    }

    /// The gradient of a tensor from [`add_tensor`](Self::add_tensor), for the host to fill.
    pub fn grad_mut<T: Element>(&mut self, id: TensorId) -> Result<&mut [T]> {
        let pair = self.owned_pair_mut::<T>(id)?;
        Ok(&mut bytemuck::cast_slice_mut(&mut pair.grad)[..pair.len])
    }

    /// The ascent: computes one global norm over every registered gradient, then moves every
    /// parameter to `w + e(w)`, saving `w`.
    ///
    /// A NaN or infinity in any gradient (under ASAM, in any weight too) is found by the norm pass
    /// itself; the call then returns [`ErrorKind::NonFinite`] and no parameter is touched, so a
    /// loss-scaled loop can lower its scale and retry.
    pub fn first_step(&mut self) -> Result<()> {
        self.expect_idle("take a first step")?;
        if self.tensors.is_empty() {
            return Err(Error::state("no tensor is registered: register the parameters before the first step"));
        }
        let norm = self.passes.ascent_norm(&self.config)?;
        if !norm.sum_sq.is_finite() {
            let place = match self.passes.find_non_finite(self.config.adaptive) {
                Some((t, e)) => format!("tensor {t}, element {e}"),
                None => "an element".to_owned(),
            };
            let what = if self.config.adaptive { "gradient or weight" } else { "gradient" };
            return Err(Error::new(
                ErrorKind::NonFinite,
                format!("{what} at {place} is NaN or infinite; no parameter was changed"),
            ));
        }
        let n = norm.sum_sq.sqrt();
        self.passes.perturb(&Perturbation::new(&self.config, n))?;
        self.last_norm = Some(n);
        self.phase = Phase::Perturbed;
        Ok(())
    }

    /// Restores every parameter to exactly the bits it had before the first step.
    ///
    /// The host then runs its base optimizer on the gradient it computed at the perturbed point.
    pub fn second_step(&mut self) -> Result<()> {
        if self.phase != Phase::Perturbed {
            return Err(Error::state("second step without a first step: call first_step before second_step"));
        }
        self.passes.restore()?;
        self.phase = Phase::Idle;
        self.steps += 1;
        Ok(())
    }

    fn expect_idle(&self, action: &str) -> Result<()> {
        match self.phase {
            Phase::Idle => Ok(()),
            Phase::Perturbed => {
                Err(Error::state(format!("cannot {action} while the weights are perturbed: call second_step first")))
            }
        }
    }

    fn check_range(name: &str, addr: usize, bytes: usize, dtype: DType) -> Result<std::ops::Range<usize>> {
        if addr == 0 {
            return Err(Error::new(ErrorKind::NullPointer, format!("{name} is NULL")));
        }
        if !addr.is_multiple_of(dtype.size()) {
            return Err(Error::invalid(format!(
                "{name} = {addr:#x} is not aligned to {} bytes, as {} elements need",
                dtype.size(),
                dtype.name()
            )));
        }
        let end = addr.checked_add(bytes).ok_or_else(|| {
            Error::invalid(format!("{name} = {addr:#x} plus {bytes} bytes overflows the address space"))
        })?;
        Ok(addr..end)
    }

    /// The tensor whose registered range overlaps `r`, if any.
    fn overlapping(&self, r: &std::ops::Range<usize>) -> Option<TensorId> {
        // The last range starting before r.end is the only candidate: registered ranges are
        // pairwise disjoint, so earlier ones end before it starts.
        let (_, &(end, id)) = self.ranges.range(..r.end).next_back()?;
        (end > r.start).then_some(id)
    }
}
