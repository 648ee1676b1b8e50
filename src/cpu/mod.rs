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
//!
//! This file is the chunked multithreaded driver (registration, chunks, the `Passes` implementation);
//! `kernels` holds the per-dtype work on one segment, compiled per instruction set.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use crate::backend::{AscentNorm, HostTensor, Part, Passes, SecondNorm};
use crate::config::{BaseOptimizer, Config};
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use crate::math::{Perturbation, TensorStep, UpdateStep};

mod kernels;
pub(crate) use kernels::{Isa, first_non_finite};
use kernels::{
    Precond, UpdateJob, accumulate_segment, look_direction_segment, look_store_segment, mean_segment, norm_segment,
    perturb_segment, precond_norm_segment, precond_perturb_segment, reduce_segment, update_segment,
    update_single_segment,
};

/// Elements per unit of parallel work.
pub(crate) const CHUNK: usize = 1 << 16;
/// Elements per L1-resident block inside a chunk.
const BLOCK: usize = 1024;
/// Backups start on 64-byte boundaries (8 words), so every tensor's backup is cache-line aligned.
const BACKUP_ALIGN_WORDS: usize = 8;

/// A registered tensor and where its backup lives.
#[derive(Clone, Copy)]
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
    /// Master weights (f16/bf16 tensors): the index of the f32 master copy among the tensor's
    /// state vectors.
    master: Option<usize>,
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
    /// The process-wide pool, or this engine's own when `threads` is set.
    pool: Workers,
    isa: Isa,
    slots: Vec<Slot>,
    /// Per slot: the buffers of an owned tensor (`None` for the host's own buffers).
    owned: Vec<Option<OwnedPair>>,
    /// Saved weights, all tensors end to end, each aligned to [`BACKUP_ALIGN_WORDS`].
    backup: Vec<u64>,
    /// GSAM: the first gradient, kept by the perturbation pass, laid out as `backup`.
    first_grads: Vec<u64>,
    /// Per-shard SAM with a built-in base: the mean of the shards' gradients, rounded to each
    /// tensor's dtype and laid out as `backup` (allocated at the first such step), so the host's
    /// gradient buffers are only read.
    mean: Vec<u64>,
    /// `slots` with each gradient address pointing into `mean`: set by `write_mean` into the
    /// engine's buffer, read by the next `second_reduce` and `update`.
    mean_slots: Vec<Slot>,
    /// Whether the next `second_reduce` and `update` read `mean_slots` (cleared by them, by
    /// `restore` and `perturb`).
    use_mean: bool,
    /// GSAM: the update's direction reads the first gradient.
    gsam: bool,
    /// GSAM or LookSAM: the perturbation keeps a copy of the first gradient.
    keep_first: bool,
    base: BaseOptimizer,
    /// f32 state per element of every tensor: the base optimizer's (0 none or SGD without momentum,
    /// 1 momentum, 2 Adam), then LookSAM's `g_v` (1); f16/bf16 tensors with master weights have
    /// one more, their master copy.
    state_per_elem: usize,
    /// The base optimizer's share of `state_per_elem`.
    base_state: usize,
    /// LookSAM: `g_v` is state vector `base_state` of each tensor.
    look: bool,
    /// f32 master copies of f16/bf16 weights, the state vector after the others.
    master_weights: bool,
    /// The preconditioned perturbation: per tensor, `sqrt(1 - beta2^t)` (0: plain SAM for it),
    /// and AdamW's eps.
    precond: Vec<f32>,
    precond_eps: f32,
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

/// An engine's worker pool: the process-wide one, or a pool of its own. Rayon lets a pool's
/// workers run on after the pool is dropped; an own pool's threads are joined here when the
/// engine is dropped, so that no samopt code still runs after `sam_destroy` returns (a host may
/// unload the library then).
struct Workers {
    pool: Option<Arc<rayon::ThreadPool>>,
    /// An own pool's threads, spawned by samopt so that it can join them.
    threads: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
}

impl Workers {
    /// The pool for `threads` workers: 0 shares one process-wide pool with a worker per core
    /// (built at the first use), so that many handles (a fuzzer, a test suite, many small models)
    /// do not each start a thread per core; a number gives the handle a pool of its own.
    fn new(threads: usize) -> Result<Workers> {
        static SHARED: Mutex<Option<Arc<rayon::ThreadPool>>> = Mutex::new(None);
        let fail = |n: &str, e: rayon::ThreadPoolBuildError| {
            Error::new(ErrorKind::OutOfMemory, format!("cannot start CPU worker threads ({n}): {e}"))
        };
        let builder = || rayon::ThreadPoolBuilder::new().thread_name(|i| format!("samopt-cpu-{i}"));
        let spawned = Arc::new(Mutex::new(Vec::new()));
        if threads != 0 {
            let handles = spawned.clone();
            let pool = builder()
                .num_threads(threads)
                .spawn_handler(move |thread| {
                    let mut b = std::thread::Builder::new();
                    if let Some(name) = thread.name() {
                        b = b.name(name.to_owned());
                    }
                    if let Some(size) = thread.stack_size() {
                        b = b.stack_size(size);
                    }
                    let handle = b.spawn(|| thread.run())?;
                    handles.lock().unwrap_or_else(|e| e.into_inner()).push(handle);
                    Ok(())
                })
                .build()
                .map_err(|e| fail(&threads.to_string(), e))?;
            return Ok(Workers { pool: Some(Arc::new(pool)), threads: spawned });
        }
        let mut shared = SHARED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if shared.is_none() {
            *shared = Some(Arc::new(builder().build().map_err(|e| fail("one per core", e))?));
        }
        Ok(Workers { pool: shared.clone(), threads: spawned })
    }

    fn pool(&self) -> &rayon::ThreadPool {
        self.pool.as_ref().expect("the pool lives as long as the engine")
    }

    /// Runs `f` in the pool, as `rayon::ThreadPool::install`.
    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool().install(f)
    }

    fn current_num_threads(&self) -> usize {
        self.pool().current_num_threads()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Dropping an own pool (its only reference) tells its workers to finish; they have no
        // work left, so each returns and its thread ends.
        drop(self.pool.take());
        for handle in self.threads.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = handle.join();
        }
    }
}

impl CpuEngine {
    /// A CPU engine with `config.threads` workers (0: one per available core), holding the state
    /// the configured base optimizer needs.
    pub fn new(config: &Config) -> Result<CpuEngine> {
        Ok(CpuEngine {
            pool: Workers::new(config.threads)?,
            isa: Isa::detect(),
            slots: Vec::new(),
            owned: Vec::new(),
            backup: Vec::new(),
            first_grads: Vec::new(),
            mean: Vec::new(),
            mean_slots: Vec::new(),
            use_mean: false,
            gsam: config.gsam_alpha.is_some(),
            keep_first: config.keeps_first_grad(),
            base: config.base,
            state_per_elem: config.base_state_per_element() + config.looksam() as usize,
            base_state: config.base_state_per_element(),
            look: config.looksam(),
            master_weights: config.master_weights,
            precond: Vec::new(),
            precond_eps: 0.0,
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
            first: self.keep_first.then_some(Shared(self.first_grads.as_mut_ptr())),
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
        let first_words = if self.keep_first { words } else { 0 };
        let master = (self.master_weights && host.dtype != DType::F32).then_some(self.state_per_elem);
        let state_len = (self.state_per_elem + master.is_some() as usize) * host.len;
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
        self.slots.push(Slot { host, backup_word, state, elem: self.elements, master });
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

    fn rebind_host(&mut self, tensor: usize, host: HostTensor) -> Result<()> {
        self.slots[tensor].host = host;
        // A mean written into the engine's buffer is read through slots copied from these.
        self.use_mean = false;
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

    fn precondition(&mut self, bias2_sqrt: &[f32], eps: f32) {
        self.precond.clear();
        self.precond.extend_from_slice(bias2_sqrt);
        self.precond_eps = eps;
    }

    fn ascent_norm(&mut self, config: &Config) -> Result<AscentNorm> {
        let (adaptive, eta, isa) = (config.adaptive, config.eta, self.isa);
        let pre = config.preconditioned;
        let bufs = self.buffers();
        let slots = &self.slots;
        let segments = &self.segments;
        let chunks = &self.chunks;
        let (precond, eps) = (&self.precond, self.precond_eps);
        self.pool.install(|| {
            self.partials.par_iter_mut().zip(chunks.par_iter()).for_each(|(partial, chunk)| {
                let mut sum = 0.0;
                for seg in &segments[chunk.clone()] {
                    let b = if pre { precond[seg.tensor] } else { 0.0 };
                    sum += if b > 0.0 {
                        let p = Precond { bias2_sqrt: b, eps };
                        // SAFETY: the segment lies inside its tensor; AdamW's state exists; reads only.
                        unsafe { precond_norm_segment(isa, &slots[seg.tensor], seg, bufs, p) }
                    } else {
                        // SAFETY: the segment lies inside a registered tensor (see `append_segments`).
                        unsafe { norm_segment(isa, &slots[seg.tensor].host, seg, adaptive, eta) }
                    };
                }
                *partial = sum;
            })
        });
        // A fixed order over fixed chunks: the same bits for any number of threads.
        let sum_sq = self.partials.iter().sum();
        Ok(AscentNorm { sum_sq })
    }

    fn perturb(&mut self, p: &Perturbation) -> Result<()> {
        self.use_mean = false;
        let bufs = self.buffers();
        let this = &*self;
        this.pool.install(|| {
            this.chunks.par_iter().for_each(|chunk| {
                for seg in this.chunk_segments(chunk) {
                    let slot = &this.slots[seg.tensor];
                    let b = this.precond.get(seg.tensor).copied().unwrap_or(0.0);
                    if b > 0.0 {
                        let pre = Precond { bias2_sqrt: b, eps: this.precond_eps };
                        // SAFETY: as below; AdamW's state exists.
                        unsafe { precond_perturb_segment(this.isa, slot, seg, bufs, pre, p.scale) };
                        continue;
                    }
                    // SAFETY: the segment lies inside its tensor and its backup; chunks are
                    // disjoint, so no two workers touch the same bytes.
                    unsafe { perturb_segment(this.isa, slot, seg, bufs, p) };
                }
            })
        });
        Ok(())
    }

    fn restore(&mut self) -> Result<()> {
        self.use_mean = false;
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
        let slots = if self.use_mean { &self.mean_slots } else { &self.slots };
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
        let (isa, mut bufs, base) = (self.isa, self.buffers(), self.base);
        // Only GSAM's direction reads the first gradient (LookSAM keeps it for `look_store`).
        if !self.gsam {
            bufs.first = None;
        }
        let has_state = self.base_state > 0;
        let this = &*self;
        let slots = if self.use_mean { &self.mean_slots } else { &self.slots };
        this.pool.install(|| {
            this.chunks.par_iter().for_each(|chunk| {
                for seg in this.chunk_segments(chunk) {
                    let slot = &slots[seg.tensor];
                    let job = UpdateJob { step, tensor: &tensors[seg.tensor], base, has_state };
                    // SAFETY: as in `perturb`: disjoint ranges of the tensor, backup and state.
                    unsafe { update_segment(isa, slot, seg, bufs, &job) };
                }
            })
        });
        self.use_mean = false;
        Ok(())
    }

    fn look_store(&mut self, c: f32) -> Result<f64> {
        let (isa, bufs, look) = (self.isa, self.buffers(), self.base_state);
        let slots = &self.slots;
        let segments = &self.segments;
        let chunks = &self.chunks;
        self.pool.install(|| {
            self.partials.par_iter_mut().zip(chunks.par_iter()).for_each(|(partial, chunk)| {
                let mut sum = 0.0;
                for seg in &segments[chunk.clone()] {
                    // SAFETY: the segment lies inside its tensor; chunks are disjoint, so each
                    // worker writes its own range of g_v.
                    sum += unsafe { look_store_segment(isa, &slots[seg.tensor], seg, bufs, look, c) };
                }
                *partial = sum;
            })
        });
        Ok(self.partials.iter().sum())
    }

    fn update_single(&mut self, step: &UpdateStep, tensors: &[TensorStep], with_gv: bool) -> Result<()> {
        let (isa, bufs, base) = (self.isa, self.buffers(), self.base);
        let has_state = self.base_state > 0;
        let look = (self.look && with_gv).then_some(self.base_state);
        let this = &*self;
        this.pool.install(|| {
            this.chunks.par_iter().for_each(|chunk| {
                for seg in this.chunk_segments(chunk) {
                    let job = UpdateJob { step, tensor: &tensors[seg.tensor], base, has_state };
                    // SAFETY: disjoint ranges of the tensor and its state.
                    unsafe { update_single_segment(isa, &this.slots[seg.tensor], seg, bufs, &job, look) };
                }
            })
        });
        Ok(())
    }

    fn look_direction(&mut self, c: f32) -> Result<()> {
        let (isa, bufs, look) = (self.isa, self.buffers(), self.base_state);
        let this = &*self;
        this.pool.install(|| {
            this.chunks.par_iter().for_each(|chunk| {
                for seg in this.chunk_segments(chunk) {
                    // SAFETY: the engine checked that every gradient is writable; disjoint ranges.
                    unsafe { look_direction_segment(isa, &this.slots[seg.tensor], seg, bufs, look, c) };
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

    fn write_mean(&mut self, scale: f32, into_grads: bool) -> Result<()> {
        if !into_grads {
            if self.mean.len() < self.backup.len() {
                let more = self.backup.len() - self.mean.len();
                self.mean.try_reserve_exact(more).map_err(|_| {
                    Error::new(
                        ErrorKind::OutOfMemory,
                        format!("cannot allocate the mean gradient of {} elements", self.elements),
                    )
                })?;
                self.mean.resize(self.backup.len(), 0);
            }
            let base = self.mean.as_mut_ptr();
            self.mean_slots.clear();
            self.mean_slots.extend(self.slots.iter().map(|s| Slot {
                host: HostTensor { grad: base.wrapping_add(s.backup_word).cast::<u8>(), ..s.host },
                ..*s
            }));
        }
        let (isa, acc) = (self.isa, Shared(self.acc.as_mut_ptr()));
        let this = &*self;
        let slots = if into_grads { &self.slots } else { &self.mean_slots };
        this.pool.install(|| {
            this.chunks.par_iter().for_each(|chunk| {
                for seg in this.chunk_segments(chunk) {
                    // SAFETY: disjoint ranges of the gradient buffers (the host's, registered as
                    // writable, or the engine's mean) and the accumulator.
                    unsafe { mean_segment(isa, &slots[seg.tensor], seg, acc, scale) };
                }
            })
        });
        self.use_mean = !into_grads;
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

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::*;
    use crate::config::Norm;
    use crate::dtype::Element;

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
                    engine.perturb(&Perturbation::new(&config, config.rho, sum.sqrt())).unwrap();
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
