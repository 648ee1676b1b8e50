//! Element types of registered tensors.
//!
//! Parameters and gradients are stored in their own type and computed in f32: f16 and bf16 are
//! widened on load and rounded once on store, so a perturbed half-precision weight is the f32
//! result rounded to nearest.

use half::{bf16, f16};

/// The element type of a parameter and its gradient (both have the same type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16: the upper half of a binary32.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Lower-case name, as the C header spells it after `SAM_DTYPE_`.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A Rust element type the optimizer can step: `f32`, [`half::f16`] or [`half::bf16`].
pub trait Element: bytemuck::Pod + Send + Sync + sealed::Sealed {
    /// The matching [`DType`].
    const DTYPE: DType;

    /// Widens `src` into `dst` (same length).
    fn widen(src: &[Self], dst: &mut [f32]);

    /// Rounds `src` to nearest into `dst` (same length).
    fn narrow(src: &[f32], dst: &mut [Self]);

    /// `Some` when the type is f32 itself, so kernels can skip the conversion buffers.
    fn as_f32(s: &[Self]) -> Option<&[f32]>;

    /// Mutable form of [`Element::as_f32`].
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]>;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn narrow(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn as_f32(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
    fn as_f32_mut(s: &mut [f32]) -> Option<&mut [f32]> {
        Some(s)
    }
}

// half's slice conversions use F16C/NEON when the CPU has them, and round to nearest even.
macro_rules! half_element {
    ($t:ty, $d:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            fn widen(src: &[$t], dst: &mut [f32]) {
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst)
            }
            fn narrow(src: &[f32], dst: &mut [$t]) {
                half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src)
            }
            fn as_f32(_: &[$t]) -> Option<&[f32]> {
                None
            }
            fn as_f32_mut(_: &mut [$t]) -> Option<&mut [f32]> {
                None
            }
        }
    };
}
half_element!(f16, DType::F16);
half_element!(bf16, DType::BF16);
