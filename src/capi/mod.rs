//! The C ABI: `include/samopt.h` is generated from this module by cbindgen.
//!
//! This layer only translates and checks: every function runs inside one panic boundary, turns
//! pointers into references through helpers that name the argument when it is NULL, reads enums as
//! plain integers so that an out-of-range value is an error rather than undefined behaviour, and
//! hands the work to [`Optimizer`](crate::Optimizer). A failing call returns a negative [`SamStatus`], sets this
//! thread's [`sam_last_error`] message and changes nothing.
//!
//! A handle may be used from any thread; calls on one handle are serialised by a lock.

mod abi;
mod ffi;
mod logging;

// Declared in the header's order: cbindgen writes the functions of each module in turn.
mod types;
mod lifecycle;
mod steps;
mod distributed;
mod training;
mod checkpoint;
mod vulkan;
mod queries;
mod tensors;
mod adapters;
mod errors;

pub use adapters::*;
pub use checkpoint::*;
pub use distributed::*;
pub use errors::*;
pub use lifecycle::*;
pub use queries::*;
pub use steps::*;
pub use tensors::*;
pub use training::*;
pub use types::*;
pub use vulkan::*;
