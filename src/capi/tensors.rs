//! Tensors the optimizer allocates (on the GPU or in host memory), and their data.

use std::ffi::c_void;

use super::ffi::{arg_ref, boundary, non_null, write_out};
use super::types::{SAM_PART_GRAD, SAM_PART_PARAM, SamDType, SamOptimizer, SamStatus, SamTensorPart, dtype_from_c};
use crate::dtype::DType;
use crate::engine::Optimizer;
use crate::error::{Error, Result};

/// Allocates a parameter/gradient pair of `len` zeros owned by the optimizer and stores its id in
/// `*out_id`: on the GPU backend both live on the device, with the optimizer's state, and the
/// passes run there with no host copy; on the CPU backend they live in host memory. Under
/// `SAM_BACKEND_AUTO` the first such call (before any `sam_register_host`) picks the GPU, or the
/// CPU when no adapter exists. Fill and read them with `sam_tensor_write` and `sam_tensor_read`.
///
/// Fails with `SAM_ERR_INVALID_ARGUMENT` (`len` 0, unknown dtype, a size over the device's
/// largest buffer), `SAM_ERR_INVALID_STATE` (between the two steps), `SAM_ERR_DEVICE`.
///
/// # Safety
/// `opt` must be NULL or a live handle; `out_id` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_tensor_create(
    opt: *mut SamOptimizer,
    len: usize,
    dtype: SamDType,
    out_id: *mut u32,
) -> SamStatus {
    boundary("sam_tensor_create", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        non_null(out_id, "out_id")?;
        let dtype = dtype_from_c(dtype)?;
        let id = opt.lock()?.add_zeroed_tensor(len, dtype)?;
        // SAFETY: checked non-null above.
        unsafe { write_out(out_id, "out_id", id) }
    })
}

pub(super) fn part_from_c(part: SamTensorPart) -> Result<crate::backend::Part> {
    match part {
        SAM_PART_PARAM => Ok(crate::backend::Part::Param),
        SAM_PART_GRAD => Ok(crate::backend::Part::Grad),
        other => Err(Error::invalid(format!("part = {other}: not a SamTensorPart (0 PARAM, 1 GRAD)"))),
    }
}

/// Checks a raw buffer argument for tensor `id` and returns the tensor's element type.
pub(super) fn check_tensor_buffer(
    opt: &Optimizer,
    id: u32,
    ptr: *const c_void,
    name: &str,
    len: usize,
) -> Result<DType> {
    non_null(ptr, name)?;
    let (n, dtype) = opt
        .tensor(id)
        .ok_or_else(|| Error::invalid(format!("id = {id}: only {} tensors are registered", opt.tensor_count())))?;
    if len != n {
        return Err(Error::invalid(format!("len = {len}: tensor {id} has {n} elements")));
    }
    if !(ptr as usize).is_multiple_of(dtype.size()) {
        return Err(Error::invalid(format!("{name} = {ptr:p} is not aligned to {} bytes", dtype.size())));
    }
    Ok(dtype)
}

/// Copies `len` elements from `src` into the parameter or gradient (`part`) of tensor `id`, which
/// `sam_tensor_create` allocated; `len` must be the tensor's length and `src` hold its dtype.
/// Writing the parameter between the two steps is overwritten by the restore.
///
/// # Safety
/// `opt` must be NULL or a live handle; `src` NULL or valid for reads of `len` elements.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_tensor_write(
    opt: *mut SamOptimizer,
    id: u32,
    part: SamTensorPart,
    src: *const c_void,
    len: usize,
) -> SamStatus {
    boundary("sam_tensor_write", || {
        // SAFETY: the caller's contract.
        let mut inner = unsafe { arg_ref(opt, "opt") }?.lock()?;
        let part = part_from_c(part)?;
        let dtype = check_tensor_buffer(&inner, id, src, "src", len)?;
        // SAFETY: checked non-null and aligned; the caller promises `len` readable elements.
        unsafe {
            match dtype {
                DType::F32 => inner.write_owned_part(id, part, std::slice::from_raw_parts(src.cast::<f32>(), len)),
                DType::F16 => {
                    inner.write_owned_part(id, part, std::slice::from_raw_parts(src.cast::<half::f16>(), len))
                }
                DType::BF16 => {
                    inner.write_owned_part(id, part, std::slice::from_raw_parts(src.cast::<half::bf16>(), len))
                }
            }
        }
    })
}

/// Copies the parameter or gradient (`part`) of tensor `id`, which `sam_tensor_create`
/// allocated, into `dst` (`len` elements: the tensor's length). Between the two steps the
/// parameter reads as `w + e(w)`. Waits for the device.
///
/// # Safety
/// `opt` must be NULL or a live handle; `dst` NULL or valid for writes of `len` elements.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_tensor_read(
    opt: *mut SamOptimizer,
    id: u32,
    part: SamTensorPart,
    dst: *mut c_void,
    len: usize,
) -> SamStatus {
    boundary("sam_tensor_read", || {
        // SAFETY: the caller's contract.
        let mut inner = unsafe { arg_ref(opt, "opt") }?.lock()?;
        let part = part_from_c(part)?;
        let dtype = check_tensor_buffer(&inner, id, dst, "dst", len)?;
        // SAFETY: checked non-null and aligned; the caller promises `len` writable elements.
        unsafe {
            match dtype {
                DType::F32 => inner.read_owned_part(id, part, std::slice::from_raw_parts_mut(dst.cast::<f32>(), len)),
                DType::F16 => {
                    inner.read_owned_part(id, part, std::slice::from_raw_parts_mut(dst.cast::<half::f16>(), len))
                }
                DType::BF16 => {
                    inner.read_owned_part(id, part, std::slice::from_raw_parts_mut(dst.cast::<half::bf16>(), len))
                }
            }
        }
    })
}
