//! Data-parallel SAM: the all-reduce hook, the two-call global norm, and per-shard accumulation.

use std::ffi::c_void;

use super::ffi::{arg_ref, boundary, non_null, write_out};
use super::types::{SamOptimizer, SamStatus};
use crate::error::{Error, ErrorKind};

/// Sums `count` doubles at `values` in place across the workers of a data-parallel job (an
/// all-reduce with the sum, e.g. `MPI_Allreduce(MPI_IN_PLACE, values, count, MPI_DOUBLE, MPI_SUM,
/// comm)`); returns 0 on success. Every worker calls it at the same point of the same step.
pub type SamAllreduce = Option<unsafe extern "C" fn(values: *mut f64, count: usize, user: *mut c_void) -> i32>;

/// The host's `user` pointer, handed back to its callback on whichever thread calls.
pub(super) struct UserPtr(*mut c_void);

// SAFETY: sam_set_allreduce's contract: the callback may be called from any thread with `user`.
unsafe impl Send for UserPtr {}

/// Global-norm SAM across workers, with the exchange inside `sam_first_step`: installs the host's
/// all-reduce. From then on `sam_first_step` computes the local squared norm `sum (T_w g)^2`, sums
/// it over the workers through `callback` (one double, no gradient copied), and perturbs with the
/// square root, so every worker uses the norm over all workers' gradients (over the union of the
/// shards when each worker holds its own part of the parameters). A callback returning non-zero
/// makes `sam_first_step` fail with `SAM_ERR_CALLBACK`, nothing changed. A worker whose own
/// gradient holds NaN or infinity still calls the all-reduce (with NaN), so every worker returns
/// `SAM_ERR_NON_FINITE` for that step and none waits for it. NULL removes it.
///
/// The same without a callback: `sam_grad_sq_norm_local`, the host's all-reduce, then
/// `sam_first_step_with_norm`.
///
/// Per-worker SAM (m-sharpness, as the original JAX code across accelerators) needs none of
/// this: each worker calls plain `sam_first_step` on its own gradient, and the host all-reduces
/// only the second gradient before `sam_second_step`.
///
/// # Safety
/// `opt` must be NULL or a live handle; `callback`, when set, must be safe to call with `user`
/// from any thread for as long as it is installed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_set_allreduce(
    opt: *mut SamOptimizer,
    callback: SamAllreduce,
    user: *mut c_void,
) -> SamStatus {
    boundary("sam_set_allreduce", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        let allreduce = callback.map(|f| {
            let user = UserPtr(user);
            Box::new(move |values: &mut [f64]| {
                let user = &user;
                // SAFETY: the host's contract for its callback.
                match unsafe { f(values.as_mut_ptr(), values.len(), user.0) } {
                    0 => Ok(()),
                    rc => Err(Error::new(ErrorKind::Callback, format!("the host's all-reduce returned {rc}"))),
                }
            }) as crate::engine::AllReduce
        });
        opt.lock()?.set_allreduce(allreduce);
        Ok(())
    })
}

/// Global-norm SAM across workers, step 1 of 2: stores in `*out` the local squared norm
/// `sum (T_w g)^2` over this worker's tensors (one read of the gradients, nothing written). The
/// host sums it over the workers and passes the square root to `sam_first_step_with_norm`.
/// `SAM_ERR_NON_FINITE` when a local gradient holds NaN or infinity (a host that must keep its
/// all-reduce in step can sum NaN then, so that every worker refuses the step).
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_grad_sq_norm_local(opt: *mut SamOptimizer, out: *mut f64) -> SamStatus {
    boundary("sam_grad_sq_norm_local", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        non_null(out, "out")?;
        let v = opt.lock()?.local_sq_norm()?;
        // SAFETY: checked non-null.
        unsafe { write_out(out, "out", v) }
    })
}

/// Global-norm SAM across workers, step 2 of 2: the ascent (as `sam_first_step`) with the given
/// global norm, the square root of the all-reduced `sam_grad_sq_norm_local` values. A NaN or
/// infinite `global_norm` (some worker's gradient was not finite) returns `SAM_ERR_NON_FINITE`
/// with nothing changed; a negative one `SAM_ERR_INVALID_ARGUMENT`. The gradients must not change
/// between `sam_grad_sq_norm_local` and this call: its finiteness check is reused, so the
/// gradients are read once.
///
/// # Safety
/// `opt` must be NULL or a live handle whose registered buffers are valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_first_step_with_norm(opt: *mut SamOptimizer, global_norm: f64) -> SamStatus {
    boundary("sam_first_step_with_norm", || {
        // SAFETY: the caller's contract.
        unsafe { arg_ref(opt, "opt") }?.lock()?.first_step_with_norm(global_norm)
    })
}

/// Per-shard SAM in one process (m-sharpness): a host that splits its batch into k shards calls,
/// for each shard,
///
/// ```text
/// gradient of the shard at w       -> the gradient buffers
/// sam_first_step(opt)                 w -> w + e_k(w), the shard's own perturbation
/// gradient of the shard at w + e_k -> the gradient buffers
/// sam_accumulate_step(opt)            w restored exactly, that gradient added to an accumulator
/// ```
///
/// and after the last shard `sam_second_step(opt)`, which writes the mean of the k perturbed
/// gradients into the gradient buffers and, with a built-in base optimizer, steps with it (without
/// one, the host's optimizer uses it). This is the one case samopt writes the gradient buffers:
/// they must be writable. The CPU backend runs it; `SAM_ERR_UNSUPPORTED` on the GPU for now and
/// with GSAM. `SAM_ERR_INVALID_STATE` without a preceding first step.
///
/// # Safety
/// `opt` must be NULL or a live handle whose registered buffers are valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_accumulate_step(opt: *mut SamOptimizer) -> SamStatus {
    boundary("sam_accumulate_step", || {
        // SAFETY: the caller's contract.
        unsafe { arg_ref(opt, "opt") }?.lock()?.accumulate_step()
    })
}
