//! What a handle reports about itself: tensors, steps, phase, backend.

use super::ffi::{arg_ref, boundary, write_out};
use super::types::{SAM_BACKEND_AUTO, SAM_BACKEND_CPU, SAM_BACKEND_GPU, SamBackend, SamOptimizer, SamStatus};
use crate::config::Backend;
use crate::engine::Phase;

/// Stores the number of registered tensors in `*out`.
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_tensor_count(opt: *const SamOptimizer, out: *mut usize) -> SamStatus {
    boundary("sam_tensor_count", || {
        // SAFETY: the caller's contract.
        let n = unsafe { arg_ref(opt, "opt") }?.lock()?.tensor_count();
        // SAFETY: the caller's contract.
        unsafe { write_out(out, "out", n) }
    })
}

/// Stores in `*out` the number of completed steps, SAM and single-gradient: second steps that were
/// not skipped (with a built-in base optimizer, the number of updates applied, as PyTorch's
/// optimizer step count). `sam_schedule_counts` splits it by kind.
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_step_count(opt: *const SamOptimizer, out: *mut u64) -> SamStatus {
    boundary("sam_step_count", || {
        // SAFETY: the caller's contract.
        let n = unsafe { arg_ref(opt, "opt") }?.lock()?.steps();
        // SAFETY: the caller's contract.
        unsafe { write_out(out, "out", n) }
    })
}

/// Stores in `*out` whether the weights are perturbed (between a first and a second step of a SAM
/// step; false during a single-gradient step, whose weights never move).
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_is_perturbed(opt: *const SamOptimizer, out: *mut bool) -> SamStatus {
    boundary("sam_is_perturbed", || {
        // SAFETY: the caller's contract.
        let phase = unsafe { arg_ref(opt, "opt") }?.lock()?.phase();
        // SAFETY: the caller's contract.
        unsafe { write_out(out, "out", phase == Phase::Perturbed) }
    })
}

/// Stores in `*out` the backend that runs this optimizer's passes: `SAM_BACKEND_CPU` or
/// `SAM_BACKEND_GPU`, or `SAM_BACKEND_AUTO` while an AUTO optimizer has no tensor yet (its first
/// registration decides).
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_get_backend(opt: *const SamOptimizer, out: *mut SamBackend) -> SamStatus {
    boundary("sam_get_backend", || {
        // SAFETY: the caller's contract.
        let backend = match unsafe { arg_ref(opt, "opt") }?.lock()?.backend() {
            Backend::Gpu => SAM_BACKEND_GPU,
            Backend::Cpu => SAM_BACKEND_CPU,
            Backend::Auto => SAM_BACKEND_AUTO,
        };
        // SAFETY: the caller's contract.
        unsafe { write_out(out, "out", backend) }
    })
}
