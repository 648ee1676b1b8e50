//! The few helpers every exported function goes through: the panic boundary, the thread's last
//! error, and pointer checks that name the argument.

use std::cell::RefCell;
use std::ffi::{CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

use super::SamStatus;
use crate::error::{Error, ErrorKind, Result};

thread_local! {
    /// This thread's message for its last failing call, NUL-terminated.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// The stable status number of an error kind.
pub(crate) fn status_of(kind: ErrorKind) -> SamStatus {
    match kind {
        ErrorKind::NullPointer => SamStatus::SAM_ERR_NULL_POINTER,
        ErrorKind::InvalidArgument => SamStatus::SAM_ERR_INVALID_ARGUMENT,
        ErrorKind::InvalidState => SamStatus::SAM_ERR_INVALID_STATE,
        ErrorKind::NonFinite => SamStatus::SAM_ERR_NON_FINITE,
        ErrorKind::Unsupported => SamStatus::SAM_ERR_UNSUPPORTED,
        ErrorKind::Device => SamStatus::SAM_ERR_DEVICE,
        ErrorKind::Io => SamStatus::SAM_ERR_IO,
        ErrorKind::OutOfMemory => SamStatus::SAM_ERR_OUT_OF_MEMORY,
        ErrorKind::Internal => SamStatus::SAM_ERR_INTERNAL,
        ErrorKind::Callback => SamStatus::SAM_ERR_CALLBACK,
    }
}

fn set_last_error(function: &str, message: &str) {
    let text = format!("{function}: {message}").replace('\0', "\\0");
    let text = CString::new(text).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

/// A pointer to this thread's last error message (empty when no call failed yet).
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Runs `body` as the exported function `function`: a panic becomes `SAM_ERR_INTERNAL`, an error
/// becomes its status, and either sets this thread's last error to a message starting with the
/// function's name.
pub(crate) fn boundary(function: &str, body: impl FnOnce() -> Result<()>) -> SamStatus {
    boundary_status(function, || body().map(|()| SamStatus::SAM_OK))
}

/// [`boundary`] for a body that chooses its own non-negative status on success.
pub(crate) fn boundary_status(function: &str, body: impl FnOnce() -> Result<SamStatus>) -> SamStatus {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => {
            set_last_error(function, e.message());
            status_of(e.kind())
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            set_last_error(function, &format!("internal error (please report): {what}"));
            SamStatus::SAM_ERR_INTERNAL
        }
    }
}

/// `&T` from a pointer argument, or a null-pointer error naming it.
///
/// # Safety
/// A non-null `ptr` must point to a valid `T` for `'a`.
pub(crate) unsafe fn arg_ref<'a, T>(ptr: *const T, name: &str) -> Result<&'a T> {
    // SAFETY: the caller's contract.
    unsafe { ptr.as_ref() }.ok_or_else(|| Error::new(ErrorKind::NullPointer, format!("{name} is NULL")))
}

/// Writes an output argument, or returns a null-pointer error naming it.
///
/// # Safety
/// A non-null `ptr` must be valid for a write of `T`.
pub(crate) unsafe fn write_out<T>(ptr: *mut T, name: &str, value: T) -> Result<()> {
    if ptr.is_null() {
        return Err(Error::new(ErrorKind::NullPointer, format!("{name} is NULL")));
    }
    // SAFETY: checked non-null; the caller's contract for the rest. `write` does not drop the
    // (possibly uninitialised) old value.
    unsafe { ptr.write(value) };
    Ok(())
}

/// Fails with a null-pointer error naming `name` when `ptr` is NULL.
pub(crate) fn non_null<T>(ptr: *const T, name: &str) -> Result<()> {
    if ptr.is_null() { Err(Error::new(ErrorKind::NullPointer, format!("{name} is NULL"))) } else { Ok(()) }
}
