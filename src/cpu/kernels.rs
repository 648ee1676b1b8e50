//! The CPU engine's per-dtype kernels: one segment of one pass, widened to f32 in L1-sized blocks,
//! compiled for the baseline and for AVX2 + F16C and chosen at run time.

use half::{bf16, f16};

use super::{BLOCK, Buffers, Segment, Shared, Slot};
use crate::backend::HostTensor;
use crate::config::BaseOptimizer;
use crate::dtype::{DType, Element};
use crate::math::{Perturbation, TensorStep, UpdateStep, adamw, ascent_norm_term, direction, perturbed, sgd};

/// The instruction set the hot loops run with, detected once per engine. Both variants compute the
/// same bits: the lanes of every reduction are explicit, and Rust never fuses a multiply and an add
/// on its own, so wider vectors change speed only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// The target's baseline (SSE2 on x86-64).
    Baseline,
    /// AVX2 with F16C: twice the lanes, and hardware half-precision conversion.
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Isa {
    /// The widest variant this CPU runs, unless `SAMOPT_CPU_ISA=baseline` asks for the baseline.
    pub fn detect() -> Isa {
        if std::env::var("SAMOPT_CPU_ISA").is_ok_and(|v| v.eq_ignore_ascii_case("baseline")) {
            return Isa::Baseline;
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
            return Isa::Avx2;
        }
        Isa::Baseline
    }
}

/// Defines `$name(isa, args)`, which runs the `#[inline(always)]` body `$any` compiled for `isa`.
macro_rules! dispatch {
    ($(#[$doc:meta])* unsafe fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $any:ident) => {
        $(#[$doc])*
        pub(super) unsafe fn $name(isa: Isa, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                // SAFETY: the caller's contract, and `isa` says the CPU has these features.
                unsafe { $any($($arg),*) }
            }
            match isa {
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { avx2($($arg),*) },
                // SAFETY: the caller's contract.
                Isa::Baseline => unsafe { $any($($arg),*) },
            }
        }
    };
}

dispatch! {
    /// [`norm_segment_any`] for `isa`.
    ///
    /// # Safety
    /// As [`norm_segment_any`]; `isa` must come from [`Isa::detect`].
    unsafe fn norm_segment(t: &HostTensor, seg: &Segment, adaptive: bool, eta: f64) -> f64 = norm_segment_any
}

dispatch! {
    /// [`perturb_segment_any`] for `isa`.
    ///
    /// # Safety
    /// As [`perturb_segment_any`]; `isa` must come from [`Isa::detect`].
    unsafe fn perturb_segment(slot: &Slot, seg: &Segment, bufs: Buffers, p: &Perturbation) = perturb_segment_any
}

dispatch! {
    /// [`reduce_segment_any`] for `isa`.
    ///
    /// # Safety
    /// As [`reduce_segment_any`]; `isa` must come from [`Isa::detect`].
    unsafe fn reduce_segment(slot: &Slot, seg: &Segment, first: Option<Shared<u64>>) -> [f64; 2] = reduce_segment_any
}

dispatch! {
    /// [`update_segment_any`] for `isa`.
    ///
    /// # Safety
    /// As [`update_segment_any`]; `isa` must come from [`Isa::detect`].
    unsafe fn update_segment(slot: &Slot, seg: &Segment, bufs: Buffers, job: &UpdateJob<'_>) = update_segment_any
}

/// The parameter and gradient of a segment as typed slices.
///
/// # Safety
/// The segment must lie inside the tensor, the tensor's buffers must be valid and aligned for `T`,
/// and no other thread may access these ranges for the returned lifetime.
#[inline(always)]
unsafe fn segment_slices<'a, T: Element>(t: &HostTensor, seg: &Segment) -> (&'a mut [T], &'a [T]) {
    unsafe {
        let w = std::slice::from_raw_parts_mut(t.param.cast::<T>().add(seg.start), seg.len);
        let g = std::slice::from_raw_parts(t.grad.cast::<T>().add(seg.start), seg.len);
        (w, g)
    }
}

/// # Safety
/// As [`segment_slices`], read-only.
#[inline(always)]
unsafe fn norm_segment_any(t: &HostTensor, seg: &Segment, adaptive: bool, eta: f64) -> f64 {
    #[inline(always)]
    unsafe fn typed<T: Element>(t: &HostTensor, seg: &Segment, adaptive: bool, eta: f64) -> f64 {
        let (w, g) = unsafe { segment_slices::<T>(t, seg) };
        let w: &[T] = w;
        if let (Some(w), Some(g)) = (T::as_f32(w), T::as_f32(g)) {
            return sum_sq(w, g, adaptive, eta);
        }
        let (mut wf, mut gf) = ([0f32; BLOCK], [0f32; BLOCK]);
        let mut sum = 0.0;
        for (wb, gb) in w.chunks(BLOCK).zip(g.chunks(BLOCK)) {
            let n = wb.len();
            T::widen(gb, &mut gf[..n]);
            if adaptive {
                T::widen(wb, &mut wf[..n]);
            }
            sum += sum_sq(&wf[..n], &gf[..n], adaptive, eta);
        }
        sum
    }
    unsafe {
        match t.dtype {
            DType::F32 => typed::<f32>(t, seg, adaptive, eta),
            DType::F16 => typed::<f16>(t, seg, adaptive, eta),
            DType::BF16 => typed::<bf16>(t, seg, adaptive, eta),
        }
    }
}

/// `sum (T_w g)^2` in f64 over eight independent lanes (so the loop vectorizes), then added in a
/// fixed tree. `w` is read only under ASAM.
#[inline(always)]
fn sum_sq(w: &[f32], g: &[f32], adaptive: bool, eta: f64) -> f64 {
    #[inline(always)]
    fn lanes<const ADAPTIVE: bool>(w: &[f32], g: &[f32], eta: f64) -> f64 {
        const L: usize = 8;
        let mut acc = [0f64; L];
        let (gc, wc) = (g.chunks_exact(L), w.chunks_exact(L));
        let (gt, wt) = (gc.remainder(), wc.remainder());
        for (gb, wb) in gc.zip(wc) {
            for l in 0..L {
                acc[l] += ascent_norm_term::<ADAPTIVE>(wb[l], gb[l], eta);
            }
        }
        for (l, (&gv, &wv)) in gt.iter().zip(wt).enumerate() {
            acc[l] += ascent_norm_term::<ADAPTIVE>(wv, gv, eta);
        }
        ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
    }
    if adaptive { lanes::<true>(w, g, eta) } else { lanes::<false>(g, g, eta) }
}

/// # Safety
/// As [`segment_slices`]; the backup range of the segment must be exclusively this caller's.
#[inline(always)]
unsafe fn perturb_segment_any(slot: &Slot, seg: &Segment, bufs: Buffers, p: &Perturbation) {
    #[inline(always)]
    unsafe fn typed<T: Element>(slot: &Slot, seg: &Segment, bufs: Buffers, p: &Perturbation) {
        let (w, g) = unsafe { segment_slices::<T>(&slot.host, seg) };
        let (saved, first) = unsafe { engine_slices::<T>(slot, seg, bufs) };
        match (p.adaptive, p.sign) {
            (false, false) => blocks::<T, false, false>(w, g, saved, first, p),
            (false, true) => blocks::<T, false, true>(w, g, saved, first, p),
            (true, false) => blocks::<T, true, false>(w, g, saved, first, p),
            (true, true) => blocks::<T, true, true>(w, g, saved, first, p),
        }
    }
    unsafe {
        match slot.host.dtype {
            DType::F32 => typed::<f32>(slot, seg, bufs, p),
            DType::F16 => typed::<f16>(slot, seg, bufs, p),
            DType::BF16 => typed::<bf16>(slot, seg, bufs, p),
        }
    }
}

/// The segment's backup and (under GSAM) first-gradient copy, as typed slices.
///
/// # Safety
/// The segment lies inside its tensor, and no other thread touches its ranges meanwhile.
#[inline(always)]
unsafe fn engine_slices<'a, T: Element>(
    slot: &Slot,
    seg: &Segment,
    bufs: Buffers,
) -> (&'a mut [T], Option<&'a mut [T]>) {
    unsafe {
        let at = |base: Shared<u64>| {
            std::slice::from_raw_parts_mut(base.at(slot.backup_word).cast::<T>().add(seg.start), seg.len)
        };
        (at(bufs.backup), bufs.first.map(at))
    }
}

/// Backs up and perturbs `w` block by block, so the block read for the backup is still in L1 when
/// it is updated.
#[inline(always)]
fn blocks<T: Element, const ADAPTIVE: bool, const SIGN: bool>(
    w: &mut [T],
    g: &[T],
    saved: &mut [T],
    mut first: Option<&mut [T]>,
    p: &Perturbation,
) {
    let (eta, scale) = (p.eta, p.scale);
    let (mut wf, mut gf) = ([0f32; BLOCK], [0f32; BLOCK]);
    for (k, ((wb, gb), sb)) in w.chunks_mut(BLOCK).zip(g.chunks(BLOCK)).zip(saved.chunks_mut(BLOCK)).enumerate() {
        sb.copy_from_slice(wb);
        if let Some(f) = first.as_deref_mut() {
            f[k * BLOCK..k * BLOCK + gb.len()].copy_from_slice(gb);
        }
        if let (Some(gb), Some(wb)) = (T::as_f32(gb), T::as_f32_mut(wb)) {
            for (w, &g) in wb.iter_mut().zip(gb) {
                *w = perturbed::<ADAPTIVE, SIGN>(*w, g, eta, scale);
            }
            continue;
        }
        let n = wb.len();
        T::widen(wb, &mut wf[..n]);
        T::widen(gb, &mut gf[..n]);
        for (w, &g) in wf[..n].iter_mut().zip(&gf[..n]) {
            *w = perturbed::<ADAPTIVE, SIGN>(*w, g, eta, scale);
        }
        T::narrow(&wf[..n], wb);
    }
}

/// `(||g'||^2, g . g')` over a segment, in f64 over eight lanes; `g` is the GSAM copy of the
/// first gradient (the dot product is 0 without it).
///
/// # Safety
/// As [`segment_slices`], read-only.
#[inline(always)]
unsafe fn reduce_segment_any(slot: &Slot, seg: &Segment, first: Option<Shared<u64>>) -> [f64; 2] {
    #[inline(always)]
    fn lanes(g2: &[f32], g1: Option<&[f32]>) -> [f64; 2] {
        const L: usize = 8;
        let (mut sq, mut dot) = ([0f64; L], [0f64; L]);
        // chunks_exact, as in `sum_sq`: no bounds checks in the loop, so it vectorizes (indexing
        // `g2[i + l]` kept it scalar, several times slower than the memory it reads). Element `i`
        // goes to lane `i % L` either way: the same sums, bit for bit.
        let c2 = g2.chunks_exact(L);
        let t2 = c2.remainder();
        match g1 {
            None => {
                for b2 in c2 {
                    for l in 0..L {
                        let x = b2[l] as f64;
                        sq[l] += x * x;
                    }
                }
            }
            Some(g1) => {
                let c1 = g1[..g2.len()].chunks_exact(L);
                for (b2, b1) in c2.zip(c1) {
                    for l in 0..L {
                        let x = b2[l] as f64;
                        sq[l] += x * x;
                        dot[l] += b1[l] as f64 * x;
                    }
                }
            }
        }
        let n = g2.len() - t2.len();
        for (l, &v) in t2.iter().enumerate() {
            let x = v as f64;
            sq[l] += x * x;
            if let Some(g1) = g1 {
                dot[l] += g1[n + l] as f64 * x;
            }
        }
        let tree = |a: [f64; L]| ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
        [tree(sq), tree(dot)]
    }
    #[inline(always)]
    unsafe fn typed<T: Element>(slot: &Slot, seg: &Segment, first: Option<Shared<u64>>) -> [f64; 2] {
        let (_, g2) = unsafe { segment_slices::<T>(&slot.host, seg) };
        let g1: Option<&[T]> = first
            .map(|f| unsafe { std::slice::from_raw_parts(f.at(slot.backup_word).cast::<T>().add(seg.start), seg.len) });
        if let Some(g2) = T::as_f32(g2) {
            return lanes(g2, g1.map(|g| T::as_f32(g).expect("same type")));
        }
        let (mut f2, mut f1) = ([0f32; BLOCK], [0f32; BLOCK]);
        let mut out = [0.0; 2];
        for (k, b2) in g2.chunks(BLOCK).enumerate() {
            let n = b2.len();
            T::widen(b2, &mut f2[..n]);
            if let Some(g1) = g1 {
                T::widen(&g1[k * BLOCK..k * BLOCK + n], &mut f1[..n]);
            }
            let [a, b] = lanes(&f2[..n], g1.map(|_| &f1[..n]));
            out[0] += a;
            out[1] += b;
        }
        out
    }
    unsafe {
        match slot.host.dtype {
            DType::F32 => typed::<f32>(slot, seg, first),
            DType::F16 => typed::<f16>(slot, seg, first),
            DType::BF16 => typed::<bf16>(slot, seg, first),
        }
    }
}

/// What the fused update of one segment needs besides the buffers.
pub(super) struct UpdateJob<'a> {
    pub(super) step: &'a UpdateStep,
    pub(super) tensor: &'a TensorStep,
    pub(super) base: BaseOptimizer,
    pub(super) has_state: bool,
}

/// The restore fused with the base update over one segment: `w` from the backup, the direction
/// from the second (and GSAM's first) gradient, the state updated in place.
///
/// # Safety
/// As [`segment_slices`]; the segment's backup and state ranges must be exclusively this caller's.
#[inline(always)]
unsafe fn update_segment_any(slot: &Slot, seg: &Segment, bufs: Buffers, job: &UpdateJob<'_>) {
    #[inline(always)]
    unsafe fn typed<T: Element>(slot: &Slot, seg: &Segment, bufs: Buffers, job: &UpdateJob<'_>) {
        let (w, g2) = unsafe { segment_slices::<T>(&slot.host, seg) };
        let (saved, g1) = unsafe { engine_slices::<T>(slot, seg, bufs) };
        let len = slot.host.len;
        let state = |k: usize| unsafe {
            std::slice::from_raw_parts_mut(bufs.state.at(slot.state + k * len + seg.start), seg.len)
        };
        let adamw = job.base == BaseOptimizer::AdamW;
        let m: &mut [f32] = if job.has_state { state(0) } else { &mut [] };
        let v: &mut [f32] = if adamw { state(1) } else { &mut [] };
        let g1: &[T] = g1.as_deref().unwrap_or(&[]);
        let (s, t) = (job.step, job.tensor);
        // f32 in place: no conversion buffers.
        if let (Some(w), Some(saved), Some(g2)) = (T::as_f32_mut(w), T::as_f32(saved), T::as_f32(g2)) {
            let g1 = T::as_f32(g1).expect("same type");
            return fused(w, saved, g2, g1, m, v, adamw, s, t);
        }
        // Master weights: w is the f32 copy (taken from the saved bits at the first update), and
        // the update writes the copy and its rounding to the host's tensor.
        let master: &mut [f32] = match slot.master {
            Some(k) => unsafe { state_slice(slot, seg, bufs, k) },
            None => &mut [],
        };
        update_blocks(w, Some(saved), g2, Operand::Typed(g1), m, v, master, adamw, s, t);
    }
    unsafe {
        match slot.host.dtype {
            DType::F32 => typed::<f32>(slot, seg, bufs, job),
            DType::F16 => typed::<f16>(slot, seg, bufs, job),
            DType::BF16 => typed::<bf16>(slot, seg, bufs, job),
        }
    }
}

dispatch! {
    /// [`accumulate_segment_any`] for `isa`.
    ///
    /// # Safety
    /// As [`accumulate_segment_any`]; `isa` must come from [`Isa::detect`].
    unsafe fn accumulate_segment(slot: &Slot, seg: &Segment, bufs: Buffers, acc: Shared<f32>, first: bool) = accumulate_segment_any
}

dispatch! {
    /// [`mean_segment_any`] for `isa`.
    ///
    /// # Safety
    /// As [`mean_segment_any`]; `isa` must come from [`Isa::detect`].
    unsafe fn mean_segment(slot: &Slot, seg: &Segment, acc: Shared<f32>, scale: f32) = mean_segment_any
}

/// Per-shard SAM over one segment: `w` back from the backup, the gradient added to the
/// accumulator (which `first` starts from zero).
///
/// # Safety
/// As [`segment_slices`]; the segment's backup and accumulator ranges are this caller's alone.
#[inline(always)]
unsafe fn accumulate_segment_any(slot: &Slot, seg: &Segment, bufs: Buffers, acc: Shared<f32>, first: bool) {
    #[inline(always)]
    unsafe fn typed<T: Element>(slot: &Slot, seg: &Segment, bufs: Buffers, acc: Shared<f32>, first: bool) {
        let (w, g) = unsafe { segment_slices::<T>(&slot.host, seg) };
        let (saved, _) = unsafe { engine_slices::<T>(slot, seg, bufs) };
        let acc = unsafe { std::slice::from_raw_parts_mut(acc.at(slot.elem + seg.start), seg.len) };
        w.copy_from_slice(saved);
        let mut gf = [0f32; BLOCK];
        for (gb, ab) in g.chunks(BLOCK).zip(acc.chunks_mut(BLOCK)) {
            let n = gb.len();
            T::widen(gb, &mut gf[..n]);
            for (a, &g) in ab.iter_mut().zip(&gf[..n]) {
                *a = if first { g } else { *a + g };
            }
        }
    }
    unsafe {
        match slot.host.dtype {
            DType::F32 => typed::<f32>(slot, seg, bufs, acc, first),
            DType::F16 => typed::<f16>(slot, seg, bufs, acc, first),
            DType::BF16 => typed::<bf16>(slot, seg, bufs, acc, first),
        }
    }
}

/// Writes `scale * accumulator` into the segment's gradient, rounded to its dtype.
///
/// # Safety
/// The gradient buffer must be writable (per-shard SAM's contract) and the ranges this caller's.
#[inline(always)]
unsafe fn mean_segment_any(slot: &Slot, seg: &Segment, acc: Shared<f32>, scale: f32) {
    #[inline(always)]
    unsafe fn typed<T: Element>(slot: &Slot, seg: &Segment, acc: Shared<f32>, scale: f32) {
        let g =
            unsafe { std::slice::from_raw_parts_mut(slot.host.grad.cast_mut().cast::<T>().add(seg.start), seg.len) };
        let acc = unsafe { std::slice::from_raw_parts(acc.at(slot.elem + seg.start), seg.len) };
        let mut mf = [0f32; BLOCK];
        for (gb, ab) in g.chunks_mut(BLOCK).zip(acc.chunks(BLOCK)) {
            let n = gb.len();
            for (m, &a) in mf[..n].iter_mut().zip(ab) {
                *m = a * scale;
            }
            T::narrow(&mf[..n], gb);
        }
    }
    unsafe {
        match slot.host.dtype {
            DType::F32 => typed::<f32>(slot, seg, acc, scale),
            DType::F16 => typed::<f16>(slot, seg, acc, scale),
            DType::BF16 => typed::<bf16>(slot, seg, acc, scale),
        }
    }
}

/// The second operand of an update's direction `a*g' - b*g1`: GSAM's first gradient in the
/// tensor's dtype, LookSAM's `g_v` in f32 (empty slices where there is none).
enum Operand<'a, T> {
    Typed(&'a [T]),
    F32(&'a [f32]),
}

/// The block loop of both updates over one segment, in L1-sized blocks: `w` widened from `src`
/// (the backup: the restore) or, with `src` = `None`, from the weights in place (a single-gradient
/// step), or taken from the master copy after the tensor's first update; the direction's operands
/// widened; [`fused`]; the result rounded into `w` and, with master weights, kept in the copy.
/// `m`, `v`, `master` and the operand are empty where the configuration has none.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn update_blocks<T: Element>(
    mut w: &mut [T],
    mut src: Option<&[T]>,
    mut g2: &[T],
    mut g1: Operand<'_, T>,
    mut m: &mut [f32],
    mut v: &mut [f32],
    mut master: &mut [f32],
    adamw: bool,
    s: &UpdateStep,
    t: &TensorStep,
) {
    let (mut wf, mut out, mut f2, mut f1) = ([0f32; BLOCK], [0f32; BLOCK], [0f32; BLOCK], [0f32; BLOCK]);
    while !w.is_empty() {
        let n = w.len().min(BLOCK);
        let part = |len: usize| if len == 0 { 0 } else { n };
        let (nm, nv) = (part(m.len()), part(v.len()));
        if master.is_empty() || t.fresh {
            T::widen(src.map_or(&w[..n], |src| &src[..n]), &mut wf[..n]);
        } else {
            wf[..n].copy_from_slice(&master[..n]);
        }
        T::widen(&g2[..n], &mut f2[..n]);
        let n1 = match g1 {
            Operand::Typed(g) => {
                let k = part(g.len());
                T::widen(&g[..k], &mut f1[..k]);
                g1 = Operand::Typed(&g[k..]);
                k
            }
            Operand::F32(g) => {
                let k = part(g.len());
                f1[..k].copy_from_slice(&g[..k]);
                g1 = Operand::F32(&g[k..]);
                k
            }
        };
        let (mb, mr) = std::mem::take(&mut m).split_at_mut(nm);
        let (vb, vr) = std::mem::take(&mut v).split_at_mut(nv);
        fused(&mut out[..n], &wf[..n], &f2[..n], &f1[..n1], mb, vb, adamw, s, t);
        let (wb, wr) = std::mem::take(&mut w).split_at_mut(n);
        T::narrow(&out[..n], wb);
        if !master.is_empty() {
            let (kb, kr) = std::mem::take(&mut master).split_at_mut(n);
            kb.copy_from_slice(&out[..n]);
            master = kr;
        }
        (w, m, v) = (wr, mr, vr);
        src = src.map(|src| &src[n..]);
        g2 = &g2[n..];
    }
}

/// The fused restore + update over f32 slices: `out[i]` from the restored `w[i]`, the second
/// gradient, (GSAM) the first gradient, and the state. `g1`, `m`, `v` are empty where the
/// configuration has none; the const parameters give each case its own branch-free loop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fused(
    out: &mut [f32],
    w: &[f32],
    g2: &[f32],
    g1: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    adamw_base: bool,
    s: &UpdateStep,
    t: &TensorStep,
) {
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn run<const ADAMW: bool, const GSAM: bool, const HAS_M: bool>(
        out: &mut [f32],
        w: &[f32],
        g2: &[f32],
        g1: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        s: &UpdateStep,
        t: &TensorStep,
    ) {
        let n = out.len();
        let (w, g2) = (&w[..n], &g2[..n]);
        let g1 = if GSAM { &g1[..n] } else { g1 };
        let m = if HAS_M { &mut m[..n] } else { m };
        let v = if ADAMW { &mut v[..n] } else { v };
        for i in 0..n {
            // Without GSAM, a*g' - b*0 with b = 0 is a*g': the same bits.
            let d = if GSAM { direction(g2[i], g1[i], s) } else { s.a * g2[i] };
            let mut mi = if HAS_M { m[i] } else { 0.0 };
            let mut vi = if ADAMW { v[i] } else { 0.0 };
            out[i] = if ADAMW { adamw(w[i], d, &mut mi, &mut vi, s, t) } else { sgd(w[i], d, &mut mi, s, t) };
            if HAS_M {
                m[i] = mi;
            }
            if ADAMW {
                v[i] = vi;
            }
        }
    }
    match (adamw_base, !g1.is_empty(), !m.is_empty()) {
        (true, false, _) => run::<true, false, true>(out, w, g2, g1, m, v, s, t),
        (true, true, _) => run::<true, true, true>(out, w, g2, g1, m, v, s, t),
        (false, false, false) => run::<false, false, false>(out, w, g2, g1, m, v, s, t),
        (false, false, true) => run::<false, false, true>(out, w, g2, g1, m, v, s, t),
        (false, true, false) => run::<false, true, false>(out, w, g2, g1, m, v, s, t),
        (false, true, true) => run::<false, true, true>(out, w, g2, g1, m, v, s, t),
    }
}

/// # Safety
/// The tensor's buffers must be valid for reads.
pub(crate) unsafe fn first_non_finite(t: &HostTensor, adaptive: bool) -> Option<usize> {
    unsafe fn typed<T: Element>(t: &HostTensor, adaptive: bool) -> Option<usize> {
        let seg = Segment { tensor: 0, start: 0, len: t.len };
        let (w, g) = unsafe { segment_slices::<T>(t, &seg) };
        let mut buf = [0f32; 2];
        (0..t.len).find(|&i| {
            T::widen(&[g[i], w[i]], &mut buf);
            !buf[0].is_finite() || (adaptive && !buf[1].is_finite())
        })
    }
    unsafe {
        match t.dtype {
            DType::F32 => typed::<f32>(t, adaptive),
            DType::F16 => typed::<f16>(t, adaptive),
            DType::BF16 => typed::<bf16>(t, adaptive),
        }
    }
}

// ---- Step schedules: LookSAM's g_v, and the single-gradient step ----

dispatch! {
    /// [`look_store_segment_any`] for `isa`.
    ///
    /// # Safety
    /// As [`look_store_segment_any`]; `isa` must come from [`Isa::detect`].
    unsafe fn look_store_segment(slot: &Slot, seg: &Segment, bufs: Buffers, look: usize, c: f32) -> f64 = look_store_segment_any
}

dispatch! {
    /// [`update_single_segment_any`] for `isa`.
    ///
    /// # Safety
    /// As [`update_single_segment_any`]; `isa` must come from [`Isa::detect`].
    unsafe fn update_single_segment(slot: &Slot, seg: &Segment, bufs: Buffers, job: &UpdateJob<'_>, look: Option<usize>) = update_single_segment_any
}

dispatch! {
    /// [`look_direction_segment_any`] for `isa`.
    ///
    /// # Safety
    /// As [`look_direction_segment_any`]; `isa` must come from [`Isa::detect`].
    unsafe fn look_direction_segment(slot: &Slot, seg: &Segment, bufs: Buffers, look: usize, c: f32) = look_direction_segment_any
}

/// The segment's f32 state vector `k` (0: momentum or Adam's first moment, 1: Adam's second
/// moment, then LookSAM's `g_v`).
///
/// # Safety
/// The segment lies inside its tensor, the state holds vector `k`, and no other thread touches
/// the range meanwhile.
#[inline(always)]
unsafe fn state_slice<'a>(slot: &Slot, seg: &Segment, bufs: Buffers, k: usize) -> &'a mut [f32] {
    unsafe { std::slice::from_raw_parts_mut(bufs.state.at(slot.state + k * slot.host.len + seg.start), seg.len) }
}

/// LookSAM on a SAM step: `g_v = g' - c * g` (f32), with `g'` the second gradient, `g` the first
/// one kept by the perturbation and `c = (g . g') / ||g||^2`, into state vector `look`; returns
/// the segment's `||g_v||^2` (f64 over eight lanes, as the norm pass).
///
/// # Safety
/// As [`segment_slices`], and the first gradient was kept (`bufs.first` is set); the segment's
/// state range is this caller's alone.
#[inline(always)]
unsafe fn look_store_segment_any(slot: &Slot, seg: &Segment, bufs: Buffers, look: usize, c: f32) -> f64 {
    #[inline(always)]
    unsafe fn typed<T: Element>(slot: &Slot, seg: &Segment, bufs: Buffers, look: usize, c: f32) -> f64 {
        let (_, g2) = unsafe { segment_slices::<T>(&slot.host, seg) };
        let (_, g1) = unsafe { engine_slices::<T>(slot, seg, bufs) };
        let g1: &[T] = g1.expect("LookSAM keeps the first gradient");
        let gv = unsafe { state_slice(slot, seg, bufs, look) };
        let (mut f2, mut f1) = ([0f32; BLOCK], [0f32; BLOCK]);
        let mut sum = 0.0;
        for ((b2, b1), vb) in g2.chunks(BLOCK).zip(g1.chunks(BLOCK)).zip(gv.chunks_mut(BLOCK)) {
            let n = b2.len();
            T::widen(b2, &mut f2[..n]);
            T::widen(b1, &mut f1[..n]);
            for ((v, &x2), &x1) in vb.iter_mut().zip(&f2[..n]).zip(&f1[..n]) {
                *v = x2 - c * x1;
            }
            sum += sum_sq(vb, vb, false, 0.0);
        }
        sum
    }
    unsafe {
        match slot.host.dtype {
            DType::F32 => typed::<f32>(slot, seg, bufs, look, c),
            DType::F16 => typed::<f16>(slot, seg, bufs, look, c),
            DType::BF16 => typed::<bf16>(slot, seg, bufs, look, c),
        }
    }
}

/// A single-gradient step's base update over one segment: `w` read in place (nothing was
/// perturbed), the direction `a * g - b * g_v` from the gradient and (LookSAM, state vector
/// `look`) `g_v`, with `b = -(the reuse coefficient)`, through the same [`fused`] arithmetic as a
/// SAM step's update.
///
/// # Safety
/// As [`segment_slices`]; the segment's state ranges are this caller's alone.
#[inline(always)]
unsafe fn update_single_segment_any(
    slot: &Slot,
    seg: &Segment,
    bufs: Buffers,
    job: &UpdateJob<'_>,
    look: Option<usize>,
) {
    #[inline(always)]
    unsafe fn typed<T: Element>(slot: &Slot, seg: &Segment, bufs: Buffers, job: &UpdateJob<'_>, look: Option<usize>) {
        let (w, g) = unsafe { segment_slices::<T>(&slot.host, seg) };
        let adamw = job.base == BaseOptimizer::AdamW;
        let m: &mut [f32] = if job.has_state { unsafe { state_slice(slot, seg, bufs, 0) } } else { &mut [] };
        let v: &mut [f32] = if adamw { unsafe { state_slice(slot, seg, bufs, 1) } } else { &mut [] };
        let gv: &[f32] = match look {
            Some(k) => unsafe { state_slice(slot, seg, bufs, k) },
            None => &[],
        };
        let (s, t) = (job.step, job.tensor);
        let master: &mut [f32] = match slot.master {
            Some(k) => unsafe { state_slice(slot, seg, bufs, k) },
            None => &mut [],
        };
        // w in place: nothing was perturbed, so there is nothing to restore.
        update_blocks(w, None, g, Operand::F32(gv), m, v, master, adamw, s, t);
    }
    unsafe {
        match slot.host.dtype {
            DType::F32 => typed::<f32>(slot, seg, bufs, job, look),
            DType::F16 => typed::<f16>(slot, seg, bufs, job, look),
            DType::BF16 => typed::<bf16>(slot, seg, bufs, job, look),
        }
    }
}

/// LookSAM without a built-in base optimizer, on a single-gradient step: `g <- g + c * g_v` in the
/// host's gradient buffer (rounded to its dtype), so that the host's optimizer steps with
/// LookSAM's direction.
///
/// # Safety
/// The gradient buffer was registered writable (the engine checked it); the ranges are this
/// caller's alone.
#[inline(always)]
unsafe fn look_direction_segment_any(slot: &Slot, seg: &Segment, bufs: Buffers, look: usize, c: f32) {
    #[inline(always)]
    unsafe fn typed<T: Element>(slot: &Slot, seg: &Segment, bufs: Buffers, look: usize, c: f32) {
        let g =
            unsafe { std::slice::from_raw_parts_mut(slot.host.grad.cast_mut().cast::<T>().add(seg.start), seg.len) };
        let gv = unsafe { state_slice(slot, seg, bufs, look) };
        let mut gf = [0f32; BLOCK];
        for (gb, vb) in g.chunks_mut(BLOCK).zip(gv.chunks(BLOCK)) {
            let n = gb.len();
            T::widen(gb, &mut gf[..n]);
            for (x, &v) in gf[..n].iter_mut().zip(vb) {
                *x += c * v;
            }
            T::narrow(&gf[..n], gb);
        }
    }
    unsafe {
        match slot.host.dtype {
            DType::F32 => typed::<f32>(slot, seg, bufs, look, c),
            DType::F16 => typed::<f16>(slot, seg, bufs, look, c),
            DType::BF16 => typed::<bf16>(slot, seg, bufs, look, c),
        }
    }
}

// ---- The preconditioned perturbation (AdamW): e = rho P g / ||P g||, P = 1 / (sqrt(v_hat) + eps) ----

dispatch! {
    /// [`precond_norm_segment_any`] for `isa`.
    ///
    /// # Safety
    /// As [`precond_norm_segment_any`]; `isa` must come from [`Isa::detect`].
    unsafe fn precond_norm_segment(slot: &Slot, seg: &Segment, bufs: Buffers, pre: Precond) -> f64 = precond_norm_segment_any
}

dispatch! {
    /// [`precond_perturb_segment_any`] for `isa`.
    ///
    /// # Safety
    /// As [`precond_perturb_segment_any`]; `isa` must come from [`Isa::detect`].
    unsafe fn precond_perturb_segment(slot: &Slot, seg: &Segment, bufs: Buffers, pre: Precond, scale: f32) = precond_perturb_segment_any
}

/// A tensor's preconditioner: `P = 1 / (sqrt(v) / bias2_sqrt + eps)` from AdamW's second moment
/// `v` (state vector 1), with `bias2_sqrt = sqrt(1 - beta2^t)` after the tensor's `t` updates.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Precond {
    pub bias2_sqrt: f32,
    pub eps: f32,
}

impl Precond {
    /// `P g` for one element, in the order of AdamW's denominator.
    #[inline(always)]
    fn apply(self, g: f32, v: f32) -> f32 {
        g / (v.sqrt() / self.bias2_sqrt + self.eps)
    }
}

/// `sum (P g)^2` over a segment, in f64 over eight lanes.
///
/// # Safety
/// As [`segment_slices`], read-only; the tensor's state holds AdamW's second moment.
#[inline(always)]
unsafe fn precond_norm_segment_any(slot: &Slot, seg: &Segment, bufs: Buffers, pre: Precond) -> f64 {
    #[inline(always)]
    unsafe fn typed<T: Element>(slot: &Slot, seg: &Segment, bufs: Buffers, pre: Precond) -> f64 {
        let (_, g) = unsafe { segment_slices::<T>(&slot.host, seg) };
        let v: &[f32] = unsafe { state_slice(slot, seg, bufs, 1) };
        let (mut gf, mut pg) = ([0f32; BLOCK], [0f32; BLOCK]);
        let mut sum = 0.0;
        for (gb, vb) in g.chunks(BLOCK).zip(v.chunks(BLOCK)) {
            let n = gb.len();
            T::widen(gb, &mut gf[..n]);
            for ((p, &g), &v) in pg[..n].iter_mut().zip(&gf[..n]).zip(vb) {
                *p = pre.apply(g, v);
            }
            sum += sum_sq(&pg[..n], &pg[..n], false, 0.0);
        }
        sum
    }
    unsafe {
        match slot.host.dtype {
            DType::F32 => typed::<f32>(slot, seg, bufs, pre),
            DType::F16 => typed::<f16>(slot, seg, bufs, pre),
            DType::BF16 => typed::<bf16>(slot, seg, bufs, pre),
        }
    }
}

/// Backs up `w` (and keeps the first gradient where asked), then `w <- w + scale * P g`.
///
/// # Safety
/// As [`perturb_segment_any`]; the tensor's state holds AdamW's second moment.
#[inline(always)]
unsafe fn precond_perturb_segment_any(slot: &Slot, seg: &Segment, bufs: Buffers, pre: Precond, scale: f32) {
    #[inline(always)]
    unsafe fn typed<T: Element>(slot: &Slot, seg: &Segment, bufs: Buffers, pre: Precond, scale: f32) {
        let (w, g) = unsafe { segment_slices::<T>(&slot.host, seg) };
        let (saved, mut first) = unsafe { engine_slices::<T>(slot, seg, bufs) };
        let v: &[f32] = unsafe { state_slice(slot, seg, bufs, 1) };
        let (mut wf, mut gf) = ([0f32; BLOCK], [0f32; BLOCK]);
        for (k, (((wb, gb), sb), vb)) in
            w.chunks_mut(BLOCK).zip(g.chunks(BLOCK)).zip(saved.chunks_mut(BLOCK)).zip(v.chunks(BLOCK)).enumerate()
        {
            let n = wb.len();
            sb.copy_from_slice(wb);
            if let Some(f) = first.as_deref_mut() {
                f[k * BLOCK..k * BLOCK + n].copy_from_slice(gb);
            }
            T::widen(wb, &mut wf[..n]);
            T::widen(gb, &mut gf[..n]);
            for ((w, &g), &v) in wf[..n].iter_mut().zip(&gf[..n]).zip(vb) {
                *w += pre.apply(g, v) * scale;
            }
            T::narrow(&wf[..n], wb);
        }
    }
    unsafe {
        match slot.host.dtype {
            DType::F32 => typed::<f32>(slot, seg, bufs, pre, scale),
            DType::F16 => typed::<f16>(slot, seg, bufs, pre, scale),
            DType::BF16 => typed::<bf16>(slot, seg, bufs, pre, scale),
        }
    }
}
