//! The C vocabulary: the ABI version, statuses, the enums read as integers, and the handle.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, MutexGuard};

use crate::dtype::DType;
use crate::engine::Optimizer;
use crate::error::{Error, ErrorKind, Result};

pub use super::abi::SAM_ABI_VERSION;

/// The result of every fallible call. `SAM_OK` is 0, errors are negative, non-fatal outcomes are
/// positive, and a number never changes meaning (retired numbers are not reused).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum SamStatus {
    /// Success.
    SAM_OK = 0,
    /// Not an error: `sam_second_step` found NaN or infinity in the second gradient, restored the
    /// weights exactly, and skipped the base update (its state and step count untouched). A
    /// loss-scaled loop lowers its scale and goes on; with samopt's own loss scaling
    /// (`config.loss_scale`) samopt lowers it, and `sam_first_step` returns this status too when
    /// the first gradient overflowed (nothing moved: skip the second forward/backward and call
    /// `sam_second_step`, which returns it again). Without a built-in base optimizer only
    /// `SAM_SCHEDULE_LOOKSAM` reduces the second gradient and can return it: skip your own
    /// optimizer's step then.
    SAM_STEP_SKIPPED = 1,
    /// Not an error: the step schedule made this a single-gradient step (`sam_first_step`). The
    /// weights were not moved: skip the second forward/backward and call `sam_second_step` now,
    /// which applies the base update with the gradient already in the buffers (and, under
    /// LookSAM, the reused direction). Never returned with `SAM_SCHEDULE_EVERY`.
    SAM_STEP_SINGLE_GRADIENT = 2,
    /// A required pointer argument was NULL.
    SAM_ERR_NULL_POINTER = -1,
    /// An argument had a value the call cannot accept; the message names it.
    SAM_ERR_INVALID_ARGUMENT = -2,
    /// The call is not allowed now: a second step before a first step, a first step twice,
    /// registering while the weights are perturbed.
    SAM_ERR_INVALID_STATE = -3,
    /// A gradient held NaN or infinity: no parameter was changed. A loss-scaled loop lowers its
    /// scale and retries.
    SAM_ERR_NON_FINITE = -4,
    /// Valid, but not supported by this build or backend.
    SAM_ERR_UNSUPPORTED = -5,
    /// The GPU device or driver failed.
    SAM_ERR_DEVICE = -6,
    /// Reading or writing a file or a serialized state failed.
    SAM_ERR_IO = -7,
    /// The optimizer's state could not be allocated.
    SAM_ERR_OUT_OF_MEMORY = -8,
    /// A bug in samopt (a caught panic); please report the message.
    SAM_ERR_INTERNAL = -9,
    /// A callback the host registered (the all-reduce of `sam_set_allreduce`) returned non-zero;
    /// nothing was changed.
    SAM_ERR_CALLBACK = -10,
}

/// Which engine runs the passes: one of the `SAM_BACKEND_*` values.
pub type SamBackend = u32;

/// Decided at the first registration: the CPU for host buffers (`sam_register_host`), the GPU
/// for tensors the optimizer allocates (`sam_tensor_create`), or the CPU when no GPU adapter
/// exists (logged once).
pub const SAM_BACKEND_AUTO: SamBackend = 0;

/// The fused multithreaded CPU engine.
pub const SAM_BACKEND_CPU: SamBackend = 1;

/// The wgpu compute engine.
pub const SAM_BACKEND_GPU: SamBackend = 2;

/// Element type of a parameter and its gradient: one of the `SAM_DTYPE_*` values.
pub type SamDType = u32;

/// IEEE 754 binary32.
pub const SAM_DTYPE_F32: SamDType = 0;

/// IEEE 754 binary16.
pub const SAM_DTYPE_F16: SamDType = 1;

/// bfloat16.
pub const SAM_DTYPE_BF16: SamDType = 2;

/// The base optimizer of the second step: one of the `SAM_BASE_*` values.
pub type SamBase = u32;

/// No base optimizer: `sam_second_step` only restores `w`, and the host runs its own optimizer on
/// the gradient it computed at `w + e(w)`, as the PyTorch reference does.
pub const SAM_BASE_NONE: SamBase = 0;

/// PyTorch's SGD (lr, momentum, dampening, nesterov, weight_decay), fused with the restore.
pub const SAM_BASE_SGD: SamBase = 1;

/// PyTorch's AdamW (lr, beta1, beta2, adam_eps, weight_decay), fused with the restore.
pub const SAM_BASE_ADAMW: SamBase = 2;

/// Which buffer of an optimizer-allocated tensor: one of the `SAM_PART_*` values.
pub type SamTensorPart = u32;

/// The parameter `w`.
pub const SAM_PART_PARAM: SamTensorPart = 0;

/// The gradient `g`.
pub const SAM_PART_GRAD: SamTensorPart = 1;

/// Which steps are SAM steps and which take a single gradient: one of the `SAM_SCHEDULE_*` values
/// (`t` counts the steps from 0, a skipped step taken back as if it never happened; each value cites
/// its paper).
pub type SamSchedule = u32;

/// Every step is a SAM step (the default: plain SAM).
pub const SAM_SCHEDULE_EVERY: SamSchedule = 0;

/// SAM when `t mod schedule_k == 0`, else a single-gradient step with the plain gradient
/// (MosaicML Composer's `SAMAlgorithm(interval=k)`).
pub const SAM_SCHEDULE_INTERVAL: SamSchedule = 1;

/// SAM with probability `schedule_p`, a Bernoulli trial per step from a SplitMix64 generator
/// seeded with `schedule_seed` (RST / SS-SAM, Zhao et al. 2022, arXiv 2203.09962); else the
/// plain gradient.
pub const SAM_SCHEDULE_RANDOM: SamSchedule = 2;

/// LookSAM (Liu et al. 2022, arXiv 2203.02714): SAM when `t mod schedule_k == 0`, keeping the
/// part `g_v` of the perturbed gradient orthogonal to the gradient (one f32 buffer per
/// parameter); other steps use `g + looksam_alpha (||g|| / ||g_v||) g_v`. Not with ASAM or GSAM. Without a built-in base
/// optimizer, every gradient must be registered writable (`SAM_REGISTER_GRAD_WRITABLE`): the
/// single-gradient step leaves that direction in the gradient buffers for the host's optimizer.
pub const SAM_SCHEDULE_LOOKSAM: SamSchedule = 3;

/// AE-SAM (Jiang et al. 2023, arXiv 2304.14647): SAM when `||g||^2 >= mu + c_t sqrt(s)` (moving mean `mu` and variance `s` of
/// `||g||^2` with forgetting rate `aesam_delta`, `c_t` linear from `aesam_lambda1` to
/// `aesam_lambda2` over `aesam_planned_steps`), else the plain gradient.
pub const SAM_SCHEDULE_AESAM: SamSchedule = 4;

/// Flags of `sam_register_host_ex`, or-ed together.
pub type SamRegisterFlags = u32;
/// samopt may write the gradient buffer. It does so in two cases only, both without a built-in
/// base optimizer: the mean gradient of per-shard SAM, and LookSAM's direction on its
/// single-gradient steps. Without the flag, registered gradients are only read.
pub const SAM_REGISTER_GRAD_WRITABLE: SamRegisterFlags = 1;

/// An optimizer handle: create with `sam_create`, free with `sam_destroy`.
pub struct SamOptimizer {
    pub(super) inner: Mutex<Optimizer>,
}

thread_local! {
    /// The handles whose lock this thread holds: a callback (log, all-reduce) that samopt calls
    /// while it works on a handle runs on the same thread, so a call on that handle from inside it
    /// is found here and refused instead of waiting forever for a lock its own thread holds.
    static HELD: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// A handle's optimizer, locked by this thread for one call.
pub(super) struct Locked<'a> {
    guard: MutexGuard<'a, Optimizer>,
    handle: usize,
}

impl Deref for Locked<'_> {
    type Target = Optimizer;
    fn deref(&self) -> &Optimizer {
        &self.guard
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Optimizer {
        &mut self.guard
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        HELD.with(|held| {
            let mut held = held.borrow_mut();
            if let Some(k) = held.iter().rposition(|&h| h == self.handle) {
                held.swap_remove(k);
            }
        });
    }
}

impl SamOptimizer {
    /// Locks the handle for one call. Refused with `SAM_ERR_INVALID_STATE` when this thread is
    /// already inside a call on it (a callback calling back into the optimizer that called it).
    pub(super) fn lock(&self) -> Result<Locked<'_>> {
        let handle = self as *const SamOptimizer as usize;
        if HELD.with(|held| held.borrow().contains(&handle)) {
            return Err(Error::state(
                "re-entrant call: a callback (log or all-reduce) that samopt runs during a call on this optimizer \
                 may not call sam_* functions on the same optimizer",
            ));
        }
        let guard = self.inner.lock().map_err(|_| {
            Error::new(ErrorKind::Internal, "the optimizer is unusable after an earlier internal error")
        })?;
        HELD.with(|held| held.borrow_mut().push(handle));
        Ok(Locked { guard, handle })
    }
}

pub(super) fn dtype_from_c(dtype: SamDType) -> Result<DType> {
    match dtype {
        SAM_DTYPE_F32 => Ok(DType::F32),
        SAM_DTYPE_F16 => Ok(DType::F16),
        SAM_DTYPE_BF16 => Ok(DType::BF16),
        other => Err(Error::invalid(format!("dtype = {other}: not a SamDType (0 F32, 1 F16, 2 BF16)"))),
    }
}
