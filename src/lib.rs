//! # samopt: Sharpness-Aware Minimization as an embeddable optimizer
//!
//! SAM (Foret et al. 2020) minimises the worst loss in a ball of radius `rho` around the weights.
//! Each training step takes two gradients: one at `w`, which gives the ascent direction, and one at
//! the perturbed point `w + e(w)`, which the base optimizer then applies at `w`. samopt does the
//! part between the two: one global gradient norm, the perturbation, and the exact restore, on
//! buffers the host already owns.
//!
//! It is built for being linked from other training code: the C ABI in [`capi`] (with the generated
//! header `include/samopt.h`) is the primary interface, and [`Optimizer`] is the same engine for
//! Rust callers.
//!
//! ```
//! use samopt::{Config, Optimizer};
//!
//! // AUTO: tensors the optimizer allocates go to the GPU when there is one, else to the CPU.
//! let mut sam = Optimizer::new(Config::default())?;
//! let w = sam.add_tensor(&[0.5f32; 4])?;
//! let mut weights = [0f32; 4];
//! for _step in 0..3 {
//!     sam.write_grad(w, &[1.0f32, -1.0, 0.5, 0.0])?; // gradient at w
//!     sam.first_step()?;                              // w -> w + e(w)
//!     sam.read_param(w, &mut weights)?;               // the host's forward pass at w + e(w) ...
//!     sam.write_grad(w, &[0.9f32, -1.1, 0.4, 0.1])?; // ... gives the gradient there
//!     sam.second_step()?;                             // back to w, bit for bit
//!     // ... the base optimizer steps w with the second gradient ...
//! }
//! # Ok::<(), samopt::Error>(())
//! ```
//!
//! Layout: [`config`] validates once; [`engine`] owns the state machine; `backend` names the passes
//! every engine implements; `cpu` is the fused multithreaded CPU engine; [`gpu`] the wgpu compute
//! engine; `math` writes the formulas once; [`capi`] only translates and checks.

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod backend;
pub mod bench;
pub mod capi;
pub mod checkpoint;
pub mod config;
mod cpu;
pub mod dtype;
pub mod engine;
pub mod error;
pub mod gpu;
mod math;

pub use config::{Backend, BaseOptimizer, Config, LossScale, Norm, Schedule};
pub use dtype::{DType, Element};
pub use engine::{FirstStep, GroupId, Optimizer, Phase, SecondStep, TensorId};
pub use error::{Error, ErrorKind, Result};
pub use half;

/// The crate version, as `sam_version` reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
