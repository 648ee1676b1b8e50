//! What a training loop reads and sets between steps: the gradient norm, the learning rate, groups.

use super::ffi::{arg_ref, boundary, non_null, write_out};
use super::types::{SamOptimizer, SamStatus};
use crate::error::Error;

/// Stores in `*out` the L2 norm `||T_w * g||_2` (plain `||g||_2` without ASAM) that the last
/// successful first step computed, over every registered tensor. Also computed for
/// `norm_p = INFINITY`, where the perturbation does not use it. With loss scaling, of the true
/// gradient (the buffers' divided by the scale). `SAM_ERR_INVALID_STATE` before the
/// first successful first step.
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_grad_norm(opt: *const SamOptimizer, out: *mut f64) -> SamStatus {
    boundary("sam_grad_norm", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        non_null(out, "out")?;
        let norm = opt.lock()?.grad_norm().ok_or_else(|| Error::state("no first step has succeeded yet"))?;
        // SAFETY: checked non-null above.
        unsafe { write_out(out, "out", norm) }
    })
}

/// Sets the learning rate of the built-in base optimizer from the next second step on: the hook
/// for a learning-rate schedule, called between steps. Groups scale it. `lr` must be finite and
/// >= 0.
///
/// # Safety
/// `opt` must be NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_set_lr(opt: *mut SamOptimizer, lr: f64) -> SamStatus {
    boundary("sam_set_lr", || {
        // SAFETY: the caller's contract.
        unsafe { arg_ref(opt, "opt") }?.lock()?.set_lr(lr)
    })
}

/// Stores the current learning rate in `*out`.
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_get_lr(opt: *const SamOptimizer, out: *mut f64) -> SamStatus {
    boundary("sam_get_lr", || {
        // SAFETY: the caller's contract.
        let lr = unsafe { arg_ref(opt, "opt") }?.lock()?.lr();
        // SAFETY: the caller's contract.
        unsafe { write_out(out, "out", lr) }
    })
}

/// Sets rho from the next first step on: the hook for a rho schedule (GSAM ties rho to the
/// learning rate), called between steps. `rho` must be finite and > 0. Checkpoints carry it.
///
/// # Safety
/// `opt` must be NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_set_rho(opt: *mut SamOptimizer, rho: f64) -> SamStatus {
    boundary("sam_set_rho", || {
        // SAFETY: the caller's contract.
        unsafe { arg_ref(opt, "opt") }?.lock()?.set_rho(rho)
    })
}

/// Stores the current rho in `*out`.
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_get_rho(opt: *const SamOptimizer, out: *mut f64) -> SamStatus {
    boundary("sam_get_rho", || {
        // SAFETY: the caller's contract.
        let rho = unsafe { arg_ref(opt, "opt") }?.lock()?.rho();
        // SAFETY: the caller's contract.
        unsafe { write_out(out, "out", rho) }
    })
}

/// Stores in `*out` the loss scale `S` to multiply the next loss by before its backward pass
/// (1.0 without loss scaling). `sam_second_step` may change it (growth after good steps, backoff
/// after an overflow): a host that runs its own optimizer (`SAM_BASE_NONE`) reads it before
/// `sam_second_step` and divides its gradients by that value.
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_get_loss_scale(opt: *const SamOptimizer, out: *mut f64) -> SamStatus {
    boundary("sam_get_loss_scale", || {
        // SAFETY: the caller's contract.
        let scale = unsafe { arg_ref(opt, "opt") }?.lock()?.loss_scale().unwrap_or(1.0);
        // SAFETY: the caller's contract.
        unsafe { write_out(out, "out", scale) }
    })
}

/// Stores the completed steps of each kind, for logging: SAM steps (two gradients) in
/// `*out_sam_steps` and single-gradient steps in `*out_single_steps`. Their sum is
/// `sam_step_count`; gradient evaluations so far are `2 * sam + single`. Either pointer may be
/// NULL to skip it.
///
/// # Safety
/// `opt` must be NULL or a live handle; each out pointer NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_schedule_counts(
    opt: *const SamOptimizer,
    out_sam_steps: *mut u64,
    out_single_steps: *mut u64,
) -> SamStatus {
    boundary("sam_schedule_counts", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?.lock()?;
        let (sam, single) = (opt.sam_steps(), opt.single_steps());
        // SAFETY: the caller's contract: NULL or writable.
        unsafe {
            if let Some(p) = out_sam_steps.as_mut() {
                *p = sam;
            }
            if let Some(p) = out_single_steps.as_mut() {
                *p = single;
            }
        }
        Ok(())
    })
}

/// Adds a parameter group, as PyTorch's `param_groups`, and stores its id in `*out_group`: its
/// tensors step with learning rate `lr * lr_scale` and weight decay `weight_decay` (`NAN`: group
/// 0's, the config's). Group 0 exists from the start and holds every tensor until
/// `sam_set_tensor_group` moves it. The gradient norm stays one norm over all groups. The common
/// use: a group with weight decay 0 for biases and normalisation weights.
///
/// # Safety
/// `opt` must be NULL or a live handle; `out_group` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_add_group(
    opt: *mut SamOptimizer,
    lr_scale: f64,
    weight_decay: f64,
    out_group: *mut u32,
) -> SamStatus {
    boundary("sam_add_group", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        non_null(out_group, "out_group")?;
        let group = opt.lock()?.add_group(lr_scale, (!weight_decay.is_nan()).then_some(weight_decay))?;
        // SAFETY: checked non-null.
        unsafe { write_out(out_group, "out_group", group) }
    })
}

/// Moves tensor `id` into `group` (refused between the two steps).
///
/// # Safety
/// `opt` must be NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_set_tensor_group(opt: *mut SamOptimizer, id: u32, group: u32) -> SamStatus {
    boundary("sam_set_tensor_group", || {
        // SAFETY: the caller's contract.
        unsafe { arg_ref(opt, "opt") }?.lock()?.set_group(id, group)
    })
}
