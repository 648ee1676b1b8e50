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

// half's slice conversions detect F16C at run time and round to nearest even.
impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn widen(src: &[f16], dst: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst)
    }
    fn narrow(src: &[f32], dst: &mut [f16]) {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src)
    }
    fn as_f32(_: &[f16]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [f16]) -> Option<&mut [f32]> {
        None
    }
}

// bf16 is the top half of an f32, so both conversions are integer operations that vectorize;
// written out here because half converts bf16 slices one element at a time. Rounding is to
// nearest even with NaN kept quiet, bit for bit what `bf16::from_f32` gives.
impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn widen(src: &[bf16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
    fn narrow(src: &[f32], dst: &mut [bf16]) {
        for (d, s) in dst.iter_mut().zip(src) {
            let b = s.to_bits();
            let bits = if s.is_nan() {
                (b >> 16) as u16 | 0x0040
            } else {
                (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
            };
            *d = bf16::from_bits(bits);
        }
    }
    fn as_f32(_: &[bf16]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [bf16]) -> Option<&mut [f32]> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorizable bf16 rounding agrees with half's scalar one on every class of input.
    #[test]
    fn bf16_narrow_matches_half() {
        let mut x = 0x1234_5678u32;
        let mut src: Vec<f32> = (0..100_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                f32::from_bits(x)
            })
            .collect();
        src.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
            1.0 + f32::EPSILON,
        ]);
        src.extend((0..1000).map(|i| f32::from_bits(0x3F80_8000 + (i << 16)))); // exact ties
        let mut got = vec![bf16::ZERO; src.len()];
        bf16::narrow(&src, &mut got);
        for (s, g) in src.iter().zip(&got) {
            let want = bf16::from_f32(*s);
            assert!(g.to_bits() == want.to_bits() || (s.is_nan() && g.is_nan()), "{s:e}: {g} vs {want}");
        }
        let mut back = vec![0f32; got.len()];
        bf16::widen(&got, &mut back);
        for (b, g) in back.iter().zip(&got) {
            assert!(b.to_bits() == g.to_f32().to_bits() || b.is_nan());
        }
    }
}
