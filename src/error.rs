//! Errors of the Rust API.
//!
//! Every fallible call returns [`Result`]. An [`Error`] carries a [`ErrorKind`], which the C layer
//! maps one-to-one onto the stable `SamStatus` numbers, and a message that names the argument and
//! the value that was wrong. A failed call never changes the optimizer or the host's buffers.

use std::fmt;

/// What went wrong, in the categories the C ABI reports as `SamStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A required pointer was NULL (C API only).
    NullPointer,
    /// An argument had a value the call cannot accept.
    InvalidArgument,
    /// The call is not allowed in the optimizer's current phase (for example a second step
    /// without a first one).
    InvalidState,
    /// A gradient held NaN or infinity; nothing was changed.
    NonFinite,
    /// The request is valid but not supported by this build or this backend.
    Unsupported,
    /// The GPU device or driver failed.
    Device,
    /// Reading or writing a file or a serialized state failed.
    Io,
    /// Memory for the optimizer's state could not be allocated.
    OutOfMemory,
    /// A bug in samopt (a caught panic).
    Internal,
    /// A callback the host registered (the all-reduce) reported failure.
    Callback,
}

/// An error with its kind and a message that names the offending argument and value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    /// Creates an error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into() }
    }

    /// The category of the error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    pub(crate) fn state(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidState, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// The result type of every fallible samopt call.
pub type Result<T, E = Error> = std::result::Result<T, E>;
