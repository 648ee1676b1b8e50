//! Errors and diagnostics: the log callback, the last error, status strings, versions.

use std::ffi::{c_char, c_void};

use super::ffi::{boundary, last_error_ptr};
use super::logging;
use super::types::{SAM_ABI_VERSION, SamStatus};

/// A log message's severity, for `sam_set_log_callback`: 1 error, 2 warning, 3 info, 4 debug.
pub type SamLogLevel = u32;

/// Receives samopt's log messages (for example that backend AUTO fell back to the CPU).
/// `message` is valid only during the call.
pub type SamLogCallback = Option<unsafe extern "C" fn(level: SamLogLevel, message: *const c_char, user: *mut c_void)>;

/// Sends samopt's log messages (errors, warnings such as AUTO's fallback to the CPU) to
/// `callback` with `user`, from any thread; NULL stops them. Without a callback, messages go to
/// standard error when the environment sets `SAMOPT_LOG` (to `error`, `warn`, `info` or `debug`).
///
/// The callback runs without samopt's logging lock, on the thread of the call that logs: it may
/// call `sam_set_log_callback`, `sam_last_error` and `sam_*` on other handles; a call on the
/// handle whose call is logging is refused with `SAM_ERR_INVALID_STATE`.
#[unsafe(no_mangle)]
pub extern "C" fn sam_set_log_callback(callback: SamLogCallback, user: *mut c_void) -> SamStatus {
    boundary("sam_set_log_callback", || {
        logging::set_callback(callback, user);
        Ok(())
    })
}

/// This thread's message for its last failing call, starting with the function's name, e.g.
/// `"sam_register_host: len = 0: a tensor needs at least one element"`. Empty if no call failed on
/// this thread. Never NULL. The string stays valid until the next failing call on this thread:
/// copy it to keep it.
#[unsafe(no_mangle)]
pub extern "C" fn sam_last_error() -> *const c_char {
    last_error_ptr()
}

/// A static, never-NULL description of a status, e.g. `"invalid argument"`; `"unknown status"`
/// for a number that is not a `SamStatus`.
#[unsafe(no_mangle)]
pub extern "C" fn sam_status_string(status: i32) -> *const c_char {
    let s: &'static std::ffi::CStr = match status {
        0 => c"ok",
        1 => c"step skipped: non-finite second gradient",
        2 => c"single-gradient step: skip the second forward/backward",
        -1 => c"null pointer",
        -2 => c"invalid argument",
        -3 => c"invalid state",
        -4 => c"non-finite gradient",
        -5 => c"unsupported",
        -6 => c"device error",
        -7 => c"I/O or format error",
        -8 => c"out of memory",
        -9 => c"internal error",
        -10 => c"host callback failed",
        _ => c"unknown status",
    };
    s.as_ptr()
}

/// The library's version, e.g. `"0.1.0"`: static, never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn sam_version() -> *const c_char {
    const V: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    V.as_ptr().cast()
}

/// The C ABI version of the loaded library; equal to `SAM_ABI_VERSION` of a compatible header.
#[unsafe(no_mangle)]
pub extern "C" fn sam_abi_version() -> u32 {
    SAM_ABI_VERSION
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_strings_cover_every_status() {
        for s in [
            SamStatus::SAM_OK,
            SamStatus::SAM_STEP_SKIPPED,
            SamStatus::SAM_STEP_SINGLE_GRADIENT,
            SamStatus::SAM_ERR_NULL_POINTER,
            SamStatus::SAM_ERR_INVALID_ARGUMENT,
            SamStatus::SAM_ERR_INVALID_STATE,
            SamStatus::SAM_ERR_NON_FINITE,
            SamStatus::SAM_ERR_UNSUPPORTED,
            SamStatus::SAM_ERR_DEVICE,
            SamStatus::SAM_ERR_IO,
            SamStatus::SAM_ERR_OUT_OF_MEMORY,
            SamStatus::SAM_ERR_INTERNAL,
            SamStatus::SAM_ERR_CALLBACK,
        ] {
            // SAFETY: static NUL-terminated strings.
            let text = unsafe { std::ffi::CStr::from_ptr(sam_status_string(s as i32)) };
            assert_ne!(text.to_str().unwrap(), "unknown status", "{s:?}");
        }
        // SAFETY: as above.
        let text = unsafe { std::ffi::CStr::from_ptr(sam_status_string(12345)) };
        assert_eq!(text.to_str().unwrap(), "unknown status");
    }
}
