//! Data-parallel SAM: the all-reduce hook, the two-call global norm, and per-shard accumulation.

use std::ffi::c_void;

use super::ffi::{arg_ref, boundary, boundary_status, non_null, write_out};
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

/// SAM over parameters sharded across workers (ZeRO, FSDP, tensor parallel: each worker
/// registers only its own part of the parameters), with the exchange inside `sam_first_step`:
/// installs the host's all-reduce. From then on `sam_first_step` computes the local squared norm
/// `sum (T_w g)^2` over this worker's tensors, sums it over the workers through `callback` (one
/// double, no gradient copied), and perturbs with the square root: the norm over the whole
/// parameter vector, so the workers together take exactly the single-process SAM step. NULL
/// removes it.
///
/// The three data-parallel cases:
/// - replicated parameters (plain data parallelism): the host all-reduces (averages) the
///   gradients before `sam_first_step`, so every worker perturbs identically: exact SAM over the
///   global batch. No all-reduce is installed here; samopt exchanges nothing.
/// - per-worker perturbation (m-sharpness, as the original JAX code across accelerators): each
///   worker calls plain `sam_first_step` on its own local gradient, and the host all-reduces only
///   the second gradient before `sam_second_step`. No all-reduce is installed here either.
/// - sharded parameters: this function (or, without a callback, `sam_grad_sq_norm_local`, the
///   host's all-reduce, then `sam_first_step_with_norm`).
///
/// With a built-in base optimizer, `sam_second_step` uses the all-reduce too: it sums the second
/// gradient's squared norm and GSAM's dot product `g.g'` (two doubles), so that clipping, GSAM and
/// the skip of a non-finite step are decided over the whole model, the same on every worker.
///
/// Step schedules decide from these global sums, so every worker takes the same kind of step
/// (`SAM_SCHEDULE_RANDOM` needs the same `schedule_seed` everywhere). Under
/// `SAM_SCHEDULE_LOOKSAM` the first step sums two doubles (the squared norm and `||g_v||^2`) and
/// every second step sums two, with or without a built-in base (`g.g'` for `g_v`); a
/// single-gradient step's second step joins that exchange too, so the count of collectives never
/// depends on the decision.
///
/// With an all-reduce installed, every `sam_first_step` call (and, with a built-in base or
/// LookSAM, every `sam_second_step` call) joins the exchange exactly once, whatever fails locally (a non-finite
/// gradient, no tensor, a call in the wrong phase, a device error): that worker contributes NaN
/// and returns its own error, and every other worker refuses the step together (the first step
/// with `SAM_ERR_NON_FINITE`, nothing changed; the second with `SAM_STEP_SKIPPED`, weights
/// restored), so none is left waiting in the collective. The only calls that return before the
/// exchange are caller errors no worker can recover from: a NULL handle, and a call made from
/// inside a callback of the same handle. A callback returning non-zero fails the call with
/// `SAM_ERR_CALLBACK` (a first step changes nothing; a second step ends with the weights restored).
///
/// The callback runs on the calling thread while samopt works on `opt`: it may call `sam_*` on
/// other handles and `sam_last_error`, but a call on `opt` itself is refused with
/// `SAM_ERR_INVALID_STATE` (it would otherwise wait for itself).
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

/// Sharded-parameter SAM across workers, step 1 of 2: stores in `*out` the local squared norm
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

/// Sharded-parameter SAM across workers, step 2 of 2: the ascent (as `sam_first_step`) with the
/// given global norm, the square root of the all-reduced `sam_grad_sq_norm_local` values. A NaN or
/// infinite `global_norm` (some worker's gradient was not finite) returns `SAM_ERR_NON_FINITE`
/// with nothing changed; a negative one, or one whose square is below this worker's own squared
/// norm (the sum includes it; 1e-6 relative allowance for an f32 sum), `SAM_ERR_INVALID_ARGUMENT`.
/// The gradients must not change between `sam_grad_sq_norm_local` and this call: its local norm
/// is reused, so the gradients are read once; without it (or after a registration since), this
/// call runs the local norm pass itself.
///
/// Returns `SAM_OK` or, as `sam_first_step`, `SAM_STEP_SINGLE_GRADIENT` when the schedule
/// decides (from `global_norm`, so alike on every worker) on a single-gradient step.
/// `SAM_SCHEDULE_LOOKSAM` is refused here (`SAM_ERR_UNSUPPORTED`): it needs global sums this
/// call does not exchange; install `sam_set_allreduce` and call `sam_first_step` instead.
///
/// # Safety
/// `opt` must be NULL or a live handle whose registered buffers are valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_first_step_with_norm(opt: *mut SamOptimizer, global_norm: f64) -> SamStatus {
    boundary_status("sam_first_step_with_norm", || {
        // SAFETY: the caller's contract.
        let step = unsafe { arg_ref(opt, "opt") }?.lock()?.first_step_with_norm(global_norm)?;
        Ok(super::steps::first_status(step))
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
/// and after the last shard `sam_second_step(opt)`, which applies the mean of the k perturbed
/// gradients. With a built-in base optimizer the mean stays in samopt's memory and the gradient
/// buffers are only read. Without one (`SAM_BASE_NONE`), the second step writes the mean into the
/// gradient buffers for the host's optimizer: every tensor must then be registered with
/// `sam_register_host_ex(..., SAM_REGISTER_GRAD_WRITABLE, ...)` (or allocated by samopt), which
/// the first `sam_accumulate_step` checks, refusing with `SAM_ERR_INVALID_STATE` and changing
/// nothing otherwise. The CPU backend runs it; `SAM_ERR_UNSUPPORTED` on the GPU for now and with
/// GSAM. `SAM_ERR_INVALID_STATE` without a preceding first step.
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
