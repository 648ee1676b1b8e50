//! Checkpoints: the base optimizer's state saved to and loaded from memory or a file.

use std::ffi::{CStr, c_char, c_void};

use super::ffi::{arg_ref, boundary, byte_slice, non_null, write_out};
use super::types::{SamOptimizer, SamStatus};
use crate::error::{Error, Result};

/// Stores in `*out` the bytes `sam_state_save` writes now (it grows with registrations).
///
/// # Safety
/// `opt` must be NULL or a live handle; `out` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_state_size(opt: *const SamOptimizer, out: *mut usize) -> SamStatus {
    boundary("sam_state_size", || {
        // SAFETY: the caller's contract.
        let n = unsafe { arg_ref(opt, "opt") }?.lock()?.state_size();
        // SAFETY: the caller's contract.
        unsafe { write_out(out, "out", n) }
    })
}

/// Writes a checkpoint of the optimizer's state into `buf` (`len` bytes, at least
/// `sam_state_size`): step counts, learning rate, groups, and the base optimizer's state
/// (momentum, Adam moments, step counts), with a magic number, a version, fingerprints of the
/// configuration and of the registrations, and a checksum. Stores the bytes written in
/// `*out_written` (which may be NULL). Refused with `SAM_ERR_INVALID_STATE` between the two steps.
///
/// # Safety
/// `opt` must be NULL or a live handle; `buf` NULL or writable for `len` bytes; `out_written`
/// NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_state_save(
    opt: *mut SamOptimizer,
    buf: *mut c_void,
    len: usize,
    out_written: *mut usize,
) -> SamStatus {
    boundary("sam_state_save", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        non_null(buf, "buf")?;
        let mut inner = opt.lock()?;
        // Only the bytes the checkpoint needs are taken as a slice, never a `len` the buffer may
        // not really have (SIZE_MAX from a confused caller).
        let need = inner.state_size();
        if len < need {
            return Err(Error::invalid(format!("len = {len}: the checkpoint needs {need} bytes (sam_state_size)")));
        }
        // SAFETY: non-null, and writable for `len >= need` bytes by the caller's contract.
        let out = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), need) };
        let written = inner.save_state(out)?;
        if !out_written.is_null() {
            // SAFETY: checked non-null.
            unsafe { out_written.write(written) };
        }
        Ok(())
    })
}

/// Restores a checkpoint from `sam_state_save` (`len` bytes at `buf`) into an optimizer created
/// with the same configuration and the same registrations (count, lengths, dtypes, groups), for
/// example in a resumed job. Resuming gives the same bits as a run that never stopped. A
/// truncated or corrupted checkpoint, one of another version, configuration or layout is refused
/// with `SAM_ERR_IO` and a message saying which, and the optimizer is left exactly as it was.
/// Refused with `SAM_ERR_INVALID_STATE` between the two steps.
///
/// # Safety
/// `opt` must be NULL or a live handle; `buf` NULL or readable for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_state_load(opt: *mut SamOptimizer, buf: *const c_void, len: usize) -> SamStatus {
    boundary("sam_state_load", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        // SAFETY: readable for `len` bytes by the caller's contract.
        let bytes = unsafe { byte_slice(buf.cast::<u8>(), len, "buf") }?;
        opt.lock()?.load_state(bytes)
    })
}

/// A path argument as a `Path`: the bytes as they are on Unix, UTF-8 elsewhere.
///
/// # Safety
/// A non-null `path` must be a NUL-terminated string.
pub(super) unsafe fn path_arg<'a>(path: *const c_char) -> Result<&'a std::path::Path> {
    non_null(path, "path")?;
    // SAFETY: the caller's contract.
    let c = unsafe { CStr::from_ptr(path) };
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(std::path::Path::new(std::ffi::OsStr::from_bytes(c.to_bytes())))
    }
    #[cfg(not(unix))]
    {
        c.to_str().map(std::path::Path::new).map_err(|_| Error::invalid("path is not UTF-8"))
    }
}

/// `sam_state_save` to the file `path`: written to a temporary file beside it, flushed to disk
/// and renamed into place, so a crash mid-write never leaves half a checkpoint under `path`.
///
/// # Safety
/// `opt` must be NULL or a live handle; `path` NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_state_save_file(opt: *mut SamOptimizer, path: *const c_char) -> SamStatus {
    boundary("sam_state_save_file", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        // SAFETY: the caller's contract.
        let path = unsafe { path_arg(path) }?;
        opt.lock()?.save_state_file(path)
    })
}

/// `sam_state_load` from the file `path`.
///
/// # Safety
/// `opt` must be NULL or a live handle; `path` NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_state_load_file(opt: *mut SamOptimizer, path: *const c_char) -> SamStatus {
    boundary("sam_state_load_file", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        // SAFETY: the caller's contract.
        let path = unsafe { path_arg(path) }?;
        opt.lock()?.load_state_file(path)
    })
}
