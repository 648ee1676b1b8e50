//! The fused multithreaded CPU engine for host memory.
//!
//! All registered tensors are laid end to end in one index space and cut into fixed chunks of
//! [`CHUNK`] elements; a chunk may hold the tail of one tensor and the heads of the next ones.
//! Threads take whole chunks, so thousands of small tensors cost what one large tensor of the same
//! total size costs, and the chunk boundaries depend only on the registered lengths: the norm's
//! per-chunk partial sums, added in chunk order, give the same bits whatever the thread count.
//!
//! Inside a chunk, work goes in blocks of [`BLOCK`] elements that stay in L1: the perturbation pass
//! copies a block of weights to the backup and then updates the same block, so each weight and
//! gradient crosses the memory bus once per pass.

use std::ops::Range;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::backend::{AscentNorm, HostTensor, Part, Passes, SecondNorm};
use crate::config::{BaseOptimizer, Config};
use crate::dtype::{DType, Element};
use crate::error::{Error, ErrorKind, Result};
use crate::math::{Perturbation, TensorStep, UpdateStep, adamw, ascent_norm_term, direction, perturbed, sgd};

/// Elements per unit of parallel work.
pub(crate) const CHUNK: usize = 1 << 16;
/// Elements per L1-resident block inside a chunk.
const BLOCK: usize = 1024;
/// Backups start on 64-byte boundaries (8 words), so every tensor's backup is cache-line aligned.
const BACKUP_ALIGN_WORDS: usize = 8;

/// A registered tensor and where its backup lives.
struct Slot {
    host: HostTensor,
    /// Offset of the backup in `CpuEngine::backup` (and of the GSAM copy of the first gradient in
    /// `CpuEngine::first_grads`), in u64 words.
    backup_word: usize,
    /// Offset of the base optimizer's state in `CpuEngine::state`, in f32: the momentum buffer or
    /// Adam's first moment (`len`), then Adam's second moment (`len`).
    state: usize,
    /// The tensor's first element in the index space of all tensors (and in the accumulator).
    elem: usize,
}

/// A parameter/gradient pair the engine allocated (an owned tensor), 8-byte aligned. Only held
/// to keep the memory alive: the passes reach it through the tensor's `HostTensor` addresses.
struct OwnedPair {
    _param: Box<[u64]>,
    _grad: Box<[u64]>,
}

/// A contiguous piece of one tensor inside one chunk.
#[derive(Clone, Copy)]
struct Segment {
    tensor: usize,
    start: usize,
    len: usize,
}

/// The base address of an engine-owned buffer (backup, first gradients, state), shareable across
/// worker threads.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: every worker writes only the disjoint ranges of the segments it owns.
unsafe impl<T> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The address of element `at` (a method, so closures capture the whole `Sync` wrapper).
    fn at(self, at: usize) -> *mut T {
        self.0.wrapping_add(at)
    }
}

/// The engine-owned buffers a pass works on, for the worker threads.
#[derive(Clone, Copy)]
struct Buffers {
    backup: Shared<u64>,
    /// The GSAM copy of the first gradient, laid out as the backup; `None` without GSAM.
    first: Option<Shared<u64>>,
    state: Shared<f32>,
}

/// The CPU backend.
pub(crate) struct CpuEngine {
    pool: rayon::ThreadPool,
    isa: Isa,
    slots: Vec<Slot>,
    /// Per slot: the buffers of an owned tensor (`None` for the host's own buffers).
    owned: Vec<Option<OwnedPair>>,
    /// Saved weights, all tensors end to end, each aligned to [`BACKUP_ALIGN_WORDS`].
    backup: Vec<u64>,
    /// GSAM: the first gradient, kept by the perturbation pass, laid out as `backup`.
    first_grads: Vec<u64>,
    gsam: bool,
    base: BaseOptimizer,
    /// f32 state per element: 0 (none, or SGD without momentum), 1 (momentum), 2 (Adam).
    state_per_elem: usize,
    state: Vec<f32>,
    /// Per-chunk partial sums of the second step's reduction: `(||g'||^2, g . g')`.
    partials2: Vec<[f64; 2]>,
    /// Per-shard SAM: the sum of the shards' perturbed gradients, f32, all tensors end to end
    /// (allocated at the first accumulation).
    acc: Vec<f32>,
    /// Elements over all tensors.
    elements: usize,
    segments: Vec<Segment>,
    /// Each chunk's range in `segments`.
    chunks: Vec<Range<usize>>,
    /// Elements in the last chunk so far.
    last_chunk_fill: usize,
    /// Per-chunk partial sums of the norm pass, reused every step.
    partials: Vec<f64>,
}

impl CpuEngine {
    /// A CPU engine with `config.threads` workers (0: one per available core), holding the state
    /// the configured base optimizer needs.
    pub fn new(config: &Config) -> Result<CpuEngine> {
        let state_per_elem = match config.base {
            BaseOptimizer::None => 0,
            BaseOptimizer::Sgd => (config.momentum != 0.0) as usize,
            BaseOptimizer::AdamW => 2,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads)
            .thread_name(|i| format!("samopt-cpu-{i}"))
            .build()
            .map_err(|e| Error::new(ErrorKind::Internal, format!("cannot start CPU worker threads: {e}")))?;
        Ok(CpuEngine {
            pool,
            isa: Isa::detect(),
            slots: Vec::new(),
            owned: Vec::new(),
            backup: Vec::new(),
            first_grads: Vec::new(),
            gsam: config.gsam_alpha.is_some(),
            base: config.base,
            state_per_elem,
            state: Vec::new(),
            partials2: Vec::new(),
            acc: Vec::new(),
            elements: 0,
            segments: Vec::new(),
            chunks: Vec::new(),
            last_chunk_fill: CHUNK,
            partials: Vec::new(),
        })
    }

    /// Worker threads in this engine's pool.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    fn buffers(&mut self) -> Buffers {
        Buffers {
            backup: Shared(self.backup.as_mut_ptr()),
            first: self.gsam.then_some(Shared(self.first_grads.as_mut_ptr())),
            state: Shared(self.state.as_mut_ptr()),
        }
    }

    /// Cuts a new tensor of `len` elements into the chunk list, continuing the last chunk.
    fn append_segments(&mut self, tensor: usize, len: usize) {
        let mut start = 0;
        while start < len {
            if self.last_chunk_fill == CHUNK {
                self.chunks.push(self.segments.len()..self.segments.len());
                self.last_chunk_fill = 0;
            }
            let take = (len - start).min(CHUNK - self.last_chunk_fill);
            self.segments.push(Segment { tensor, start, len: take });
            self.chunks.last_mut().expect("a chunk was just pushed").end += 1;
            self.last_chunk_fill += take;
            start += take;
        }
    }

    fn chunk_segments(&self, chunk: &Range<usize>) -> &[Segment] {
        &self.segments[chunk.clone()]
    }
}

impl Passes for CpuEngine {
    fn add_host(&mut self, host: HostTensor) -> Result<()> {
        let bytes = host.len * host.dtype.size();
        let words = bytes.div_ceil(8).next_multiple_of(BACKUP_ALIGN_WORDS);
        let backup_word = self.backup.len();
        // Reserve everything before changing anything, so a failure leaves the engine as it was.
        let new_chunks = host.len.div_ceil(CHUNK) + 1;
        let first_words = if self.gsam { words } else { 0 };
        let state_len = self.state_per_elem * host.len;
        self.backup
            .try_reserve_exact(words)
            .and_then(|_| self.first_grads.try_reserve_exact(first_words))
            .and_then(|_| self.state.try_reserve_exact(state_len))
            .and_then(|_| self.partials2.try_reserve(new_chunks))
            .and_then(|_| self.segments.try_reserve(new_chunks))
            .and_then(|_| self.chunks.try_reserve(new_chunks))
            .and_then(|_| self.partials.try_reserve(new_chunks))
            .and_then(|_| self.slots.try_reserve(1))
            .and_then(|_| self.owned.try_reserve(1))
            .map_err(|_| {
                Error::new(
                    ErrorKind::OutOfMemory,
                    format!("cannot allocate the backup and state of a tensor of {} elements", host.len),
                )
            })?;
        self.backup.resize(backup_word + words, 0);
        self.first_grads.resize(self.first_grads.len() + first_words, 0);
        let state = self.state.len();
        self.state.resize(state + state_len, 0.0);
        self.slots.push(Slot { host, backup_word, state, elem: self.elements });
        self.elements += host.len;
        self.owned.push(None);
        self.append_segments(self.slots.len() - 1, host.len);
        self.partials.resize(self.chunks.len(), 0.0);
        self.partials2.resize(self.chunks.len(), [0.0; 2]);
        Ok(())
    }

    fn add_owned(&mut self, len: usize, dtype: DType) -> Result<()> {
        let words = (len * dtype.size()).div_ceil(8);
        let alloc = || -> Option<Box<[u64]>> {
            let mut v = Vec::new();
            v.try_reserve_exact(words).ok()?;
            v.resize(words, 0u64);
            Some(v.into_boxed_slice())
        };
        let (Some(mut param), Some(grad)) = (alloc(), alloc()) else {
            return Err(Error::new(ErrorKind::OutOfMemory, format!("cannot allocate a tensor of {len} elements")));
        };
        // Boxed slices never move, so these addresses stay valid while `self.owned` keeps them.
        let host = HostTensor { param: param.as_mut_ptr().cast(), grad: grad.as_ptr().cast(), len, dtype };
        self.add_host(host)?;
        *self.owned.last_mut().expect("add_host pushed a slot") = Some(OwnedPair { _param: param, _grad: grad });
        Ok(())
    }

    fn owned_host_ptrs(&self, tensor: usize) -> Option<(*mut u8, *mut u8)> {
        let slot = &self.slots[tensor];
        self.owned[tensor].as_ref().map(|_| (slot.host.param, slot.host.grad.cast_mut()))
    }

    fn write_owned(&mut self, tensor: usize, part: Part, bytes: &[u8]) -> Result<()> {
        let (param, grad) = self.owned_host_ptrs(tensor).expect("the engine checked that the tensor is owned");
        let dst = if part == Part::Param { param } else { grad };
        // SAFETY: an owned buffer of the tensor's size, which the engine checked `bytes` has.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
        Ok(())
    }

    fn read_owned(&mut self, tensor: usize, part: Part, out: &mut [u8]) -> Result<()> {
        let (param, grad) = self.owned_host_ptrs(tensor).expect("the engine checked that the tensor is owned");
        let src = if part == Part::Param { param } else { grad };
        // SAFETY: as in `write_owned`.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    fn ascent_norm(&mut self, config: &Config) -> Result<AscentNorm> {
        let (adaptive, eta, isa) = (config.adaptive, config.eta, self.isa);
        let slots = &self.slots;
        let segments = &self.segments;
        let chunks = &self.chunks;
        self.pool.install(|| {
            self.partials.par_iter_mut().zip(chunks.par_iter()).for_each(|(partial, chunk)| {
                let mut sum = 0.0;
                for seg in &segments[chunk.clone()] {
                    // SAFETY: the segment lies inside a registered tensor (see `append_segments`).
                    sum += unsafe { norm_segment(isa, &slots[seg.tensor].host, seg, adaptive, eta) };
                }
                *partial = sum;
            })
        });
        // A fixed order over fixed chunks: the same bits for any number of threads.
        let sum_sq = self.partials.iter().sum();
        Ok(AscentNorm { sum_sq })
    }

    fn perturb(&mut self, p: &Perturbation) -> Result<()> {
        let bufs = self.buffers();
        let this = &*self;
        this.pool.install(|| {
            this.chunks.par_iter().for_each(|chunk| {
                for seg in this.chunk_segments(chunk) {
                    let slot = &this.slots[seg.tensor];
                    // SAFETY: the segment lies inside its tensor and its backup; chunks are
                    // disjoint, so no two workers touch the same bytes.
                    unsafe { perturb_segment(this.isa, slot, seg, bufs, p) };
                }
            })
        });
        Ok(())
    }

    fn restore(&mut self) -> Result<()> {
        let backup = self.buffers().backup;
        let this = &*self;
        this.pool.install(|| {
            this.chunks.par_iter().for_each(|chunk| {
                for seg in this.chunk_segments(chunk) {
                    let slot = &this.slots[seg.tensor];
                    let size = slot.host.dtype.size();
                    // SAFETY: as in `perturb`; a plain copy of the saved bits.
                    unsafe {
                        let src = backup.at(slot.backup_word).cast::<u8>().add(seg.start * size);
                        let dst = slot.host.param.add(seg.start * size);
                        std::ptr::copy_nonoverlapping(src, dst, seg.len * size);
                    }
                }
            })
        });
        Ok(())
    }

    fn second_reduce(&mut self, gsam: bool) -> Result<SecondNorm> {
        let (isa, bufs) = (self.isa, self.buffers());
        let first = if gsam { bufs.first } else { None };
        let slots = &self.slots;
        let segments = &self.segments;
        let chunks = &self.chunks;
        self.pool.install(|| {
            self.partials2.par_iter_mut().zip(chunks.par_iter()).for_each(|(partial, chunk)| {
                let mut sums = [0.0f64; 2];
                for seg in &segments[chunk.clone()] {
                    // SAFETY: the segment lies inside a registered tensor; this only reads.
                    let [a, b] = unsafe { reduce_segment(isa, &slots[seg.tensor], seg, first) };
                    sums[0] += a;
                    sums[1] += b;
                }
                *partial = sums;
            })
        });
        let (mut sum_sq, mut dot) = (0.0, 0.0);
        for [a, b] in &self.partials2 {
            sum_sq += a;
            dot += b;
        }
        Ok(SecondNorm { sum_sq, dot })
    }

    fn update(&mut self, step: &UpdateStep, tensors: &[TensorStep]) -> Result<()> {
        let (isa, bufs, base) = (self.isa, self.buffers(), self.base);
        let has_state = self.state_per_elem > 0;
        let this = &*self;
        this.pool.install(|| {
            this.chunks.par_iter().for_each(|chunk| {
                for seg in this.chunk_segments(chunk) {
                    let slot = &this.slots[seg.tensor];
                    let job = UpdateJob { step, tensor: &tensors[seg.tensor], base, has_state };
                    // SAFETY: as in `perturb`: disjoint ranges of the tensor, backup and state.
                    unsafe { update_segment(isa, slot, seg, bufs, &job) };
                }
            })
        });
        Ok(())
    }

    fn accumulate(&mut self, first: bool) -> Result<()> {
        if self.acc.len() < self.elements {
            let more = self.elements - self.acc.len();
            self.acc.try_reserve_exact(more).map_err(|_| {
                Error::new(
                    ErrorKind::OutOfMemory,
                    format!("cannot allocate the accumulator of {} elements", self.elements),
                )
            })?;
            self.acc.resize(self.elements, 0.0);
        }
        let (isa, bufs, acc) = (self.isa, self.buffers(), Shared(self.acc.as_mut_ptr()));
        let this = &*self;
        this.pool.install(|| {
            this.chunks.par_iter().for_each(|chunk| {
                for seg in this.chunk_segments(chunk) {
                    // SAFETY: disjoint ranges of the tensor, its backup and the accumulator.
                    unsafe { accumulate_segment(isa, &this.slots[seg.tensor], seg, bufs, acc, first) };
                }
            })
        });
        Ok(())
    }

    fn write_mean(&mut self, scale: f32) -> Result<()> {
        let (isa, acc) = (self.isa, Shared(self.acc.as_mut_ptr()));
        let this = &*self;
        this.pool.install(|| {
            this.chunks.par_iter().for_each(|chunk| {
                for seg in this.chunk_segments(chunk) {
                    // SAFETY: disjoint ranges of the gradient buffers and the accumulator.
                    unsafe { mean_segment(isa, &this.slots[seg.tensor], seg, acc, scale) };
                }
            })
        });
        Ok(())
    }

    fn export_state(&mut self, out: &mut [f32]) -> Result<()> {
        // Slots hold their state end to end in registration order: the checkpoint's layout.
        out.copy_from_slice(&self.state);
        Ok(())
    }

    fn import_state(&mut self, data: &[f32]) -> Result<()> {
        self.state.copy_from_slice(data);
        Ok(())
    }

    fn find_non_finite(&self, adaptive: bool) -> Option<(usize, usize)> {
        self.slots.iter().enumerate().find_map(|(i, slot)| {
            // SAFETY: the tensor is registered; this only reads.
            let at = unsafe { first_non_finite(&slot.host, adaptive) };
            at.map(|e| (i, e))
        })
    }

    fn describe(&self) -> String {
        format!("cpu ({} threads, {:?})", self.threads(), self.isa)
    }
}

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
        unsafe fn $name(isa: Isa, $($arg: $ty),*) $(-> $ret)? {
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
        let n = g2.len() / L * L;
        for i in (0..n).step_by(L) {
            for l in 0..L {
                let x = g2[i + l] as f64;
                sq[l] += x * x;
            }
            if let Some(g1) = g1 {
                for l in 0..L {
                    dot[l] += g1[i + l] as f64 * g2[i + l] as f64;
                }
            }
        }
        for i in n..g2.len() {
            let x = g2[i] as f64;
            sq[i - n] += x * x;
            if let Some(g1) = g1 {
                dot[i - n] += g1[i] as f64 * x;
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
struct UpdateJob<'a> {
    step: &'a UpdateStep,
    tensor: &'a TensorStep,
    base: BaseOptimizer,
    has_state: bool,
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
        let mut m: &mut [f32] = if job.has_state { state(0) } else { &mut [] };
        let mut v: &mut [f32] = if adamw { state(1) } else { &mut [] };
        let mut g1: &[T] = g1.as_deref().unwrap_or(&[]);
        let (s, t) = (job.step, job.tensor);
        // f32 in place: no conversion buffers.
        if let (Some(w), Some(saved), Some(g2)) = (T::as_f32_mut(w), T::as_f32(saved), T::as_f32(g2)) {
            let g1 = T::as_f32(g1).expect("same type");
            return fused(w, saved, g2, g1, m, v, adamw, s, t);
        }
        let (mut wf, mut out, mut f2, mut f1) = ([0f32; BLOCK], [0f32; BLOCK], [0f32; BLOCK], [0f32; BLOCK]);
        let mut w = w;
        let (mut saved, mut g2): (&[T], &[T]) = (saved, g2);
        while !w.is_empty() {
            let n = w.len().min(BLOCK);
            // Absent buffers (no GSAM, no state) stay empty.
            let part = |len: usize| if len == 0 { 0 } else { n };
            let (nm, nv, n1) = (part(m.len()), part(v.len()), part(g1.len()));
            // The restore: w is the saved bits, widened.
            T::widen(&saved[..n], &mut wf[..n]);
            T::widen(&g2[..n], &mut f2[..n]);
            T::widen(&g1[..n1], &mut f1[..n1]);
            let (mb, mr) = std::mem::take(&mut m).split_at_mut(nm);
            let (vb, vr) = std::mem::take(&mut v).split_at_mut(nv);
            fused(&mut out[..n], &wf[..n], &f2[..n], &f1[..n1], mb, vb, adamw, s, t);
            let (wb, wr) = std::mem::take(&mut w).split_at_mut(n);
            T::narrow(&out[..n], wb);
            (w, m, v) = (wr, mr, vr);
            (saved, g2, g1) = (&saved[n..], &g2[n..], &g1[n1..]);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Norm;

    /// The AVX2 and baseline builds of the kernels give the same bits, for the norm and for every
    /// perturbed weight, in every dtype and variant.
    #[test]
    fn instruction_sets_agree_bitwise() {
        let mut x = 0x9E37_79B9u32;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32) * 2.0 - 1.0
        };
        let n = 3 * CHUNK + 1001;
        let w32: Vec<f32> = (0..n).map(|_| next()).collect();
        let g32: Vec<f32> = (0..n).map(|_| next() * 1e-2).collect();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (adaptive, norm) in [(false, Norm::L2), (true, Norm::L2), (false, Norm::LInf), (true, Norm::LInf)] {
                let config = Config { adaptive, norm, eta: 0.01, ..Config::default() };
                let mut results = Vec::new();
                for isa in [Isa::Baseline, Isa::detect()] {
                    let (mut w, g) = (encode(&w32, dtype), encode(&g32, dtype));
                    let mut engine = CpuEngine::new(&Config { threads: 2, ..Config::default() }).unwrap();
                    engine.isa = isa;
                    engine
                        .add_host(HostTensor { param: w.as_mut_ptr().cast(), grad: g.as_ptr().cast(), len: n, dtype })
                        .unwrap();
                    let sum = engine.ascent_norm(&config).unwrap().sum_sq;
                    engine.perturb(&Perturbation::new(&config, sum.sqrt())).unwrap();
                    results.push((sum.to_bits(), w));
                }
                assert!(results[0] == results[1], "{dtype:?} adaptive {adaptive} {norm:?}");
            }
        }
    }

    fn encode(v: &[f32], dtype: DType) -> Vec<u32> {
        let mut out = vec![0u32; v.len()];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
        match dtype {
            DType::F32 => bytes.copy_from_slice(bytemuck::cast_slice(v)),
            DType::F16 => f16::narrow(v, &mut bytemuck::cast_slice_mut(bytes)[..v.len()]),
            DType::BF16 => bf16::narrow(v, &mut bytemuck::cast_slice_mut(bytes)[..v.len()]),
        }
        out
    }
}
