//! GPU adapters: listing them and describing the one a handle runs on.

use std::ffi::c_char;

use super::ffi::{arg_ref, boundary, non_null, write_out, write_versioned};
use super::types::{SamOptimizer, SamStatus};
use crate::error::{Error, ErrorKind, Result};

/// A GPU adapter, as `sam_gpu_adapter_info` and `sam_get_adapter_info` report it. Set
/// `struct_size = sizeof(SamAdapterInfo)` before the call. Strings are NUL-terminated and
/// truncated to fit.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SamAdapterInfo {
    /// `sizeof(SamAdapterInfo)` as the caller compiled it.
    pub struct_size: usize,
    /// The adapter's name, e.g. "NVIDIA H200" or "llvmpipe (LLVM 15.0.6, 256 bits)".
    pub name: [c_char; 256],
    /// The graphics API: "vulkan", "metal", "dx12" or "gl".
    pub backend: [c_char; 16],
    /// "discrete", "integrated", "virtual", "cpu" or "other".
    pub device_type: [c_char; 16],
    /// The driver's name and version, where reported.
    pub driver: [c_char; 256],
    /// The largest storage binding in bytes; larger tensors run in windows.
    pub max_binding_bytes: u64,
    /// The largest buffer in bytes: the largest tensor the GPU engine can hold.
    pub max_buffer_bytes: u64,
    /// Whether the adapter can time passes with timestamp queries.
    pub timestamps: bool,
}

pub(super) fn copy_c_string(dst: &mut [c_char], s: &str) {
    let n = s.len().min(dst.len() - 1);
    for (d, &b) in dst.iter_mut().zip(&s.as_bytes()[..n]) {
        *d = b as c_char;
    }
    dst[n] = 0;
}

/// Fills a caller's `SamAdapterInfo`, honouring its `struct_size`.
///
/// # Safety
/// A non-null `out` must be writable for `out->struct_size` bytes.
pub(super) unsafe fn write_adapter_info(out: *mut SamAdapterInfo, a: &crate::gpu::AdapterSummary) -> Result<()> {
    non_null(out, "out")?;
    let mut info = SamAdapterInfo {
        struct_size: size_of::<SamAdapterInfo>(),
        name: [0; 256],
        backend: [0; 16],
        device_type: [0; 16],
        driver: [0; 256],
        max_binding_bytes: a.max_binding_bytes,
        max_buffer_bytes: a.max_buffer_bytes,
        timestamps: a.timestamps,
    };
    copy_c_string(&mut info.name, &a.name);
    copy_c_string(&mut info.backend, &a.backend);
    copy_c_string(&mut info.device_type, &a.device_type);
    copy_c_string(&mut info.driver, &a.driver);
    // SAFETY: the caller's contract: `struct_size` first, and that many writable bytes.
    unsafe {
        let size = out.cast::<usize>().read_unaligned();
        write_versioned(out, "out", size, "out->struct_size", &[size_of::<SamAdapterInfo>()], info)
    }
}

/// Stores in `*out` how many GPU adapters wgpu finds (honouring `WGPU_BACKEND`). Creating the
/// list can take a moment: it starts the graphics drivers.
///
/// # Safety
/// `out` must be NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_gpu_adapter_count(out: *mut usize) -> SamStatus {
    boundary("sam_gpu_adapter_count", || {
        non_null(out, "out")?;
        let n = crate::gpu::adapters().len();
        // SAFETY: checked non-null.
        unsafe { write_out(out, "out", n) }
    })
}

/// Describes adapter `index` (0 is the one `SAM_BACKEND_GPU` picks without `config.adapter` or
/// `SAMOPT_ADAPTER`).
///
/// # Safety
/// `out` must be NULL or point to a `SamAdapterInfo` whose `struct_size` is set.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_gpu_adapter_info(index: usize, out: *mut SamAdapterInfo) -> SamStatus {
    boundary("sam_gpu_adapter_info", || {
        non_null(out, "out")?;
        let list = crate::gpu::adapters();
        let a = list
            .get(index)
            .ok_or_else(|| Error::invalid(format!("index = {index}: wgpu found {} adapters", list.len())))?;
        // SAFETY: the caller's contract.
        unsafe { write_adapter_info(out, a) }
    })
}

/// Describes the adapter this optimizer's GPU backend runs on; `SAM_ERR_UNSUPPORTED` when the
/// backend is the CPU (or AUTO has not decided yet).
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or a `SamAdapterInfo` with `struct_size` set.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_get_adapter_info(opt: *const SamOptimizer, out: *mut SamAdapterInfo) -> SamStatus {
    boundary("sam_get_adapter_info", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        non_null(out, "out")?;
        let inner = opt.lock()?;
        let a = inner.adapter().ok_or_else(|| {
            Error::new(ErrorKind::Unsupported, format!("the backend is {}, not a GPU", inner.backend_description()))
        })?;
        // SAFETY: the caller's contract.
        unsafe { write_adapter_info(out, &a) }
    })
}
