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

/// No versioned struct will grow past this many bytes; a larger `struct_size` is garbage.
const MAX_STRUCT_SIZE: usize = 1 << 16;

/// The name a message gives a versioned struct type: `SamConfig`, not its module path.
fn struct_name<T>() -> &'static str {
    std::any::type_name::<T>().rsplit("::").next().unwrap_or("struct")
}

/// Refuses a `size` (named `size_name`) that no caller's `T` can have: past [`MAX_STRUCT_SIZE`],
/// or smaller than this library's `T` without being a released layout (`sizes`). A larger size is
/// a newer layout, left to the caller to handle.
fn check_layout_size<T>(size: usize, size_name: &str, sizes: &[usize]) -> Result<()> {
    let type_name = struct_name::<T>();
    if size > MAX_STRUCT_SIZE {
        return Err(Error::invalid(format!("{size_name} = {size}: larger than any {type_name} can grow")));
    }
    if size < size_of::<T>() && !sizes.contains(&size) {
        return Err(Error::invalid(format!(
            "{size_name} = {size}: not the size of any released {type_name} layout ({sizes:?} bytes)"
        )));
    }
    Ok(())
}

/// Reads a caller's versioned input struct (`SamConfig`, `SamVulkanDevice`), whose first field is
/// `struct_size`, the way Linux's `copy_struct_from_user` reads one:
///
/// - a size of one of the released layouts (`sizes`, oldest first, ending with ours): the caller's
///   bytes, and `default`'s fields past them (a program built against an older header);
/// - a larger size (a program built against a newer header than this library): accepted when
///   every byte this library does not know is zero, refused otherwise (it asked for something
///   this library cannot do);
/// - anything else is refused. Nothing is read past `struct_size`.
///
/// `bools` names the `bool` fields by offset: their bytes must be 0 or 1 (any other value would be
/// undefined behaviour as a Rust `bool`), checked before the struct is typed.
///
/// # Safety
/// A non-null `ptr` must point to at least `struct_size` readable bytes.
pub(crate) unsafe fn read_versioned<T: Copy>(
    ptr: *const T,
    name: &str,
    sizes: &[usize],
    default: T,
    bools: &[(&str, usize)],
) -> Result<T> {
    non_null(ptr, name)?;
    let ours = size_of::<T>();
    // SAFETY: every layout starts with `struct_size` (the caller's contract).
    let size = unsafe { ptr.cast::<usize>().read_unaligned() };
    check_layout_size::<T>(size, &format!("{name}->struct_size"), sizes)?;
    if size > ours {
        // SAFETY: `size` bytes are readable (the caller's contract).
        let tail = unsafe { std::slice::from_raw_parts(ptr.cast::<u8>().add(ours), size - ours) };
        if let Some(k) = tail.iter().position(|&b| b != 0) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{name}->struct_size = {size}: this library (samopt {}) knows {} of {ours} bytes, and byte {} \
                     of the newer fields is set: a newer samopt is needed for it",
                    crate::VERSION,
                    struct_name::<T>(),
                    ours + k
                ),
            ));
        }
    }
    let known = size.min(ours);
    let mut value = std::mem::MaybeUninit::new(default);
    // SAFETY: `known` bytes are readable (the caller's contract) and fit in `value`.
    unsafe { std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), value.as_mut_ptr().cast::<u8>(), known) };
    for &(field, offset) in bools {
        // SAFETY: the offset of a one-byte field inside `value`, every byte of which is initialised
        // (the default's, or the caller's).
        let byte = unsafe { value.as_ptr().cast::<u8>().add(offset).read() };
        if byte > 1 {
            return Err(Error::invalid(format!("{name}->{field} = {byte}: a bool is 0 (false) or 1 (true)")));
        }
    }
    // SAFETY: a valid `default` overwritten by the caller's bytes of the same layout, whose bool
    // fields were checked above; the other fields take any bits.
    Ok(unsafe { value.assume_init() })
}

/// Writes a caller's versioned struct (`SamAdapterInfo` out of a query, `SamConfig` out of
/// `sam_config_init`) of `size` bytes, `size` being the caller's `sizeof`: the first `size` bytes
/// of `value` for an older layout, all of `value` and zeros after it for a newer one. Sizes that
/// are no released layout are refused, nothing written, with a message naming `size_name` (the
/// argument that gave the size). `value`'s `struct_size` is written as `size`.
///
/// # Safety
/// A non-null `out` must be writable for `size` bytes.
pub(crate) unsafe fn write_versioned<T: Copy>(
    out: *mut T,
    name: &str,
    size: usize,
    size_name: &str,
    sizes: &[usize],
    value: T,
) -> Result<()> {
    non_null(out, name)?;
    let ours = size_of::<T>();
    check_layout_size::<T>(size, size_name, sizes)?;
    let mut value = std::mem::MaybeUninit::new(value);
    // SAFETY: every layout starts with `struct_size`; `size` writable bytes (the caller's
    // contract), at most `ours` of them from `value`, the rest zeroed.
    unsafe {
        value.as_mut_ptr().cast::<usize>().write_unaligned(size);
        let dst = out.cast::<u8>();
        std::ptr::copy_nonoverlapping(value.as_ptr().cast::<u8>(), dst, size.min(ours));
        if size > ours {
            std::ptr::write_bytes(dst.add(ours), 0, size - ours);
        }
    }
    Ok(())
}

/// The bytes a caller passed as `(ptr, len)`, refusing a NULL `ptr` and a `len` that no object
/// can have (past `isize::MAX`, or wrapping the address space), which a slice may not span.
///
/// # Safety
/// A non-null `ptr` must be readable for `len` bytes for `'a`.
pub(crate) unsafe fn byte_slice<'a>(ptr: *const u8, len: usize, name: &str) -> Result<&'a [u8]> {
    non_null(ptr, name)?;
    if len > isize::MAX as usize || (ptr as usize).checked_add(len).is_none() {
        return Err(Error::invalid(format!("len = {len}: larger than any buffer at {name} = {ptr:p} can be")));
    }
    // SAFETY: the caller's contract; the length is one a slice may have.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}
