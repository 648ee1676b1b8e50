//! The two steps of SAM: the ascent (first) step and the restore (second) step.

use super::ffi::{arg_ref, boundary_status};
use super::types::{SamOptimizer, SamStatus};
use crate::engine::{FirstStep, SecondStep};

/// The ascent (first) step: computes one L2 norm over the gradients of every registered tensor,
/// then moves every parameter to `w + e(w)` and keeps `w` for the restore.
///
/// Returns `SAM_OK` for a SAM step (compute the gradient at the perturbed weights next), or, when
/// the config's `schedule` makes this a single-gradient step, `SAM_STEP_SINGLE_GRADIENT`
/// (positive, not an error): the weights were not moved; skip the second forward/backward and
/// call `sam_second_step` now. One loop serves every schedule:
///
/// ```c
/// if (sam_first_step(opt) == SAM_OK) { forward_backward(); }   // the second gradient
/// sam_second_step(opt);                                        // restore + update, or update
/// ```
///
/// With loss scaling (`config.loss_scale`), a gradient holding NaN or infinity is the scale's
/// overflow: the call returns `SAM_STEP_SKIPPED` (positive), nothing moved, the scale was lowered;
/// skip the second forward/backward and call `sam_second_step`, which ends the step as skipped.
/// Without loss scaling it returns `SAM_ERR_NON_FINITE`, with no parameter touched and no decision
/// taken, when any gradient (under ASAM, any weight) holds NaN or infinity; `SAM_ERR_INVALID_STATE` when called
/// twice without a second step in between, or with no tensor registered.
///
/// # Safety
/// `opt` must be NULL or a live handle whose registered buffers are valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_first_step(opt: *mut SamOptimizer) -> SamStatus {
    boundary_status("sam_first_step", || {
        // SAFETY: the caller's contract.
        Ok(first_status(unsafe { arg_ref(opt, "opt") }?.lock()?.first_step()?))
    })
}

/// The status of a successful first step.
pub(super) fn first_status(step: FirstStep) -> SamStatus {
    match step {
        FirstStep::Perturbed => SamStatus::SAM_OK,
        FirstStep::SingleGradient => SamStatus::SAM_STEP_SINGLE_GRADIENT,
        FirstStep::Skipped => SamStatus::SAM_STEP_SKIPPED,
    }
}

/// The second step: restores every parameter to exactly the bits it had before the first step.
/// With `SAM_BASE_NONE` the host then runs its own optimizer with the gradient it computed at
/// `w + e(w)`; with `SAM_BASE_SGD` or `SAM_BASE_ADAMW` the restore and the base update run as one
/// pass (after one reduction over the second gradient: its norm for `max_grad_norm`, its dot
/// product with the first gradient for GSAM, and a finiteness check).
///
/// After a single-gradient first step (`SAM_STEP_SINGLE_GRADIENT`) nothing is restored: the
/// built-in base optimizer steps with the gradient in the buffers (LookSAM: plus its reused
/// direction); with `SAM_BASE_NONE` the host's optimizer does (LookSAM leaves its direction in the
/// writable gradient buffers).
///
/// Returns `SAM_OK`; `SAM_STEP_SKIPPED` (positive, not an error) when a built-in base optimizer
/// (or LookSAM, which reduces the second gradient even without one) finds NaN or infinity in the
/// second gradient: weights restored, no update, state untouched (without a base optimizer, skip
/// your own optimizer's step); `SAM_ERR_INVALID_STATE` without a preceding first step.
///
/// # Safety
/// `opt` must be NULL or a live handle whose registered buffers are valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_second_step(opt: *mut SamOptimizer) -> SamStatus {
    boundary_status("sam_second_step", || {
        // SAFETY: the caller's contract.
        Ok(match unsafe { arg_ref(opt, "opt") }?.lock()?.second_step()? {
            SecondStep::Skipped => SamStatus::SAM_STEP_SKIPPED,
            SecondStep::Restored | SecondStep::Updated => SamStatus::SAM_OK,
        })
    })
}
