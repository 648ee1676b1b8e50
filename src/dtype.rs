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
    #[inline(always)]
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    #[inline(always)]
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

// On x86-64 with F16C the conversions run eight lanes at a time (the check is a cached load);
// elsewhere half's slice conversions. Both round to nearest even.
impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn widen(src: &[f16], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has F16C (and so AVX).
            return unsafe { f16c::widen(src, dst) };
        }
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst)
    }
    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [f16]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has F16C (and so AVX).
            return unsafe { f16c::narrow(src, dst) };
        }
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src)
    }
    fn as_f32(_: &[f16]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [f16]) -> Option<&mut [f32]> {
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod f16c {
    use half::f16;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must have F16C and AVX.
    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn widen(src: &[f16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n elements on both sides; unaligned loads and stores.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        for j in i..n {
            dst[j] = src[j].to_f32();
        }
    }

    /// # Safety
    /// The CPU must have F16C and AVX.
    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn narrow(src: &[f32], dst: &mut [f16]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: as in `widen`.
            unsafe {
                let v = _mm256_loadu_ps(src.as_ptr().add(i));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm_storeu_si128(dst.as_mut_ptr().add(i).cast(), h);
            }
            i += 8;
        }
        for j in i..n {
            dst[j] = f16::from_f32(src[j]);
        }
    }
}

// bf16 is the top half of an f32, so both conversions are integer operations that vectorize;
// written out here because half converts bf16 slices one element at a time. Rounding is to
// nearest even with NaN kept quiet, bit for bit what `bf16::from_f32` gives.
impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn widen(src: &[bf16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
    #[inline(always)]
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

    /// Every f16 widens exactly as half's conversion does.
    #[test]
    fn f16_widen_is_exact_for_every_value() {
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let mut got = vec![0f32; all.len()];
        f16::widen(&all, &mut got);
        for (h, g) in all.iter().zip(&got) {
            let want = h.to_f32();
            assert!(
                g.to_bits() == want.to_bits() || (h.is_nan() && g.is_nan()),
                "{:#06x}: {g:e} vs {want:e}",
                h.to_bits()
            );
        }
    }

    /// f32 -> f16 rounds as half's conversion does, over a dense sweep of the f32 range.
    #[test]
    fn f16_narrow_matches_half() {
        // Every 97th f32 bit pattern (both signs, all exponents, ties included by the edge cases).
        let mut src: Vec<f32> = (0..u32::MAX / 97).map(|i| f32::from_bits(i.wrapping_mul(97))).collect();
        src.extend((0..=u16::MAX).flat_map(|h| {
            let x = f16::from_bits(h).to_f32().to_bits();
            [x, x.wrapping_add(0x1000), x.wrapping_add(0xfff), x.wrapping_add(0x1001)].map(f32::from_bits)
        }));
        src.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MAX, 65504.0, 65520.0, 65519.99]);
        let mut got = vec![f16::ZERO; src.len()];
        f16::narrow(&src, &mut got);
        for (s, g) in src.iter().zip(&got) {
            let want = f16::from_f32(*s);
            assert!(
                g.to_bits() == want.to_bits() || (s.is_nan() && g.is_nan()),
                "{s:e}: {:#06x} vs {:#06x}",
                g.to_bits(),
                want.to_bits()
            );
        }
    }

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
