//! The passes of a SAM step on the GPU: the `Passes` implementation the engine calls.

use super::arena::{Home, Staged};
use super::context::map_read;
use super::pipelines::{Entry, WindowUniform};
use super::{AdapterSummary, External, GpuEngine, PassTimes};
use crate::backend::{AscentNorm, HostTensor, Part, Passes, SecondNorm};
use crate::config::Config;
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use crate::math::{Perturbation, TensorStep, UpdateStep};

impl GpuEngine {
    /// The update of a SAM step (`Entry::Update`: w from the backup) or of a single-gradient step
    /// (`Entry::UpdateSingle`: w in place): the step's scalars, each window's, one pass, and the
    /// staged hosts' weights back.
    fn run_update(&mut self, entry: Entry, step: &UpdateStep, tensors: &[TensorStep]) -> Result<()> {
        // Rebuilt here when a rebinding between the two steps (new gradient buffers) dropped them.
        self.prepare()?;
        self.step.a = step.a;
        self.step.b = step.b;
        self.step.nd = step.nd;
        self.step.nb = step.nb;
        self.step.beta1 = step.beta1;
        self.step.one_minus_beta1 = step.one_minus_beta1;
        self.step.beta2 = step.beta2;
        self.step.one_minus_beta2 = step.one_minus_beta2;
        self.step.adam_eps = step.adam_eps;
        self.ctx.queue.write_buffer(&self.step_uniform, 0, bytemuck::bytes_of(&self.step));
        let prepared = self.prepared.as_ref().expect("prepared by the first step");
        // Every member of an arena is of one cohort, so its first member's scalars are the arena's.
        let mut uniforms = std::mem::take(&mut self.window_uniforms);
        uniforms.clear();
        for (i, w) in prepared.windows.iter().enumerate() {
            let t = &tensors[self.arenas[w.arena].members[0].1];
            uniforms.push(WindowUniform {
                quads: w.quads,
                slot: w.slot,
                index: i as u32,
                fresh: t.fresh as u32,
                lr: t.lr,
                weight_decay: t.weight_decay,
                keep: t.keep,
                take: t.take,
                decay: t.decay,
                step_size: t.step_size,
                bias2_sqrt: t.bias2_sqrt,
                pre_bias2_sqrt: 0.0,
            });
        }
        let single = entry == Entry::UpdateSingle;
        let result =
            self.ctx.checked(if single { "the single-gradient update pass" } else { "the update pass" }, || {
                for (i, u) in uniforms.iter().enumerate() {
                    self.ctx.queue.write_buffer(
                        &prepared.window_uniforms,
                        i as u64 * prepared.stride,
                        bytemuck::bytes_of(u),
                    );
                }
                let mut enc = self.ctx.device.create_command_encoder(&Default::default());
                self.record_pass(&mut enc, entry, self.all_windows(), Some(2));
                self.ctx.queue.submit([enc.finish()]);
                self.download_staged_params()
            });
        self.window_uniforms = uniforms;
        if result.is_err() && !single {
            // The host's weights go back to w; the device state may have moved. (A single step
            // wrote nothing to the host before the download.)
            self.restore_staged_hosts();
        }
        result
    }

    /// After a norm pass raised a flag: the first bad element, as (tensor, element).
    fn locate(&self) -> Result<Option<(usize, usize)>> {
        let prepared = self.prepared.as_ref().expect("prepared by the norm pass");
        let n = prepared.windows.len();
        let mut first = vec![u32::MAX; n];
        self.ctx.checked("locating a non-finite gradient", || {
            self.ctx.queue.write_buffer(&prepared.first_bad, 0, bytemuck::cast_slice(&first));
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            self.record_pass(&mut enc, Entry::Locate, self.bad_windows.iter().copied(), None);
            enc.copy_buffer_to_buffer(&prepared.first_bad, 0, &prepared.first_bad_readback, 0, 4 * n as u64);
            self.ctx.queue.submit([enc.finish()]);
            map_read(&self.ctx, &prepared.first_bad_readback, 0, (4 * n as u64).div_ceil(8) * 8, |b| {
                first.copy_from_slice(&bytemuck::cast_slice(b)[..n])
            })
        })?;
        // Windows are in arena order, and arenas in dtype order: report the lowest tensor id.
        let mut best: Option<(usize, usize)> = None;
        for (i, &e) in first.iter().enumerate().filter(|&(_, &e)| e != u32::MAX) {
            let w = &prepared.windows[i];
            let arena = &self.arenas[w.arena];
            let per_word = if arena.dtype == DType::F32 { 1 } else { 2 };
            let elem = w.first_word * per_word + e as u64;
            let pos = arena.members.partition_point(|&(o, _)| o * per_word <= elem) - 1;
            let (offset, k) = arena.members[pos];
            let at = (elem - offset * per_word) as usize;
            if best.is_none_or(|b| (k, at) < b) {
                best = Some((k, at));
            }
        }
        Ok(best)
    }
}

/// A workgroup's sum of squares from its partial: the shader's scaled sum `q * 2^(2k)` (f32 bits
/// of `q`, i32 bits of `k`), in f64, where every finite input's sum is finite.
fn unscaled(q: u32, k: u32) -> f64 {
    f32::from_bits(q) as f64 * 2f64.powi(2 * k as i32)
}

impl Passes for GpuEngine {
    fn add_host(&mut self, host: HostTensor) -> Result<()> {
        let bytes = host.len * host.dtype.size();
        let mut saved = Vec::new();
        saved.try_reserve_exact(bytes.div_ceil(8)).map_err(|_| {
            Error::new(ErrorKind::OutOfMemory, format!("cannot allocate the {bytes}-byte host copy of a staged tensor"))
        })?;
        saved.resize(bytes.div_ceil(8), 0);
        self.add(host.len, host.dtype, Some(Staged { host, saved }))
    }

    fn add_owned(&mut self, len: usize, dtype: DType) -> Result<()> {
        // wgpu zero-initialises new buffers, padding included.
        self.add(len, dtype, None)
    }

    fn rebind_host(&mut self, tensor: usize, host: HostTensor) -> Result<()> {
        // Staged tensors are uploaded at every step from their host addresses: new addresses
        // are all there is to change.
        let staged = self.tensors[tensor].staged.as_mut().expect("the engine rebinds host tensors only");
        staged.host = host;
        Ok(())
    }

    fn owned_host_ptrs(&self, _tensor: usize) -> Option<(*mut u8, *mut u8)> {
        None
    }

    fn write_owned(&mut self, tensor: usize, part: Part, bytes: &[u8]) -> Result<()> {
        let t = &self.tensors[tensor];
        let (buffer, offset) = self.location(t, part);
        self.ctx.checked("writing a tensor", || {
            self.upload(buffer, offset, bytes);
            self.ctx.queue.submit([]);
            Ok(())
        })
    }

    fn read_owned(&mut self, tensor: usize, part: Part, out: &mut [u8]) -> Result<()> {
        let t = &self.tensors[tensor];
        let (buffer, offset) = self.location(t, part);
        self.ctx.checked("reading a tensor", || {
            // SAFETY: `out` is a live slice of exactly this many bytes.
            unsafe { self.download(&[(buffer, offset, out.as_mut_ptr(), out.len())]) }
        })
    }

    fn precondition(&mut self, bias2_sqrt: &[f32], eps: f32) {
        self.precond_bias.clear();
        self.precond_bias.extend_from_slice(bias2_sqrt);
        self.step.adam_eps = eps;
    }

    fn ascent_norm(&mut self, config: &Config) -> Result<AscentNorm> {
        self.prepare()?;
        self.step.eta = config.eta as f32;
        self.ctx.queue.write_buffer(&self.step_uniform, 0, bytemuck::bytes_of(&self.step));
        let prepared = self.prepared.as_ref().expect("prepared above");
        if self.precond {
            // Each window's preconditioner bias for this step's norm and perturbation passes (the
            // update pass writes its own scalars over them).
            for (i, w) in prepared.windows.iter().enumerate() {
                let b = self.precond_bias.get(self.arenas[w.arena].members[0].1).copied().unwrap_or(0.0);
                let u = WindowUniform {
                    quads: w.quads,
                    slot: w.slot,
                    index: i as u32,
                    pre_bias2_sqrt: b,
                    ..bytemuck::Zeroable::zeroed()
                };
                self.ctx.queue.write_buffer(
                    &prepared.window_uniforms,
                    i as u64 * prepared.stride,
                    bytemuck::bytes_of(&u),
                );
            }
        }
        let bytes = 16 * prepared.slots as u64;
        // Reused every step: no allocation once the windows are built.
        let mut bad_windows = std::mem::take(&mut self.bad_windows);
        bad_windows.clear();
        let mut sum_sq = 0.0f64;
        let result = self.ctx.checked("the norm pass", || {
            for t in &self.tensors {
                if let Some(s) = &t.staged {
                    let n = t.host_bytes();
                    // SAFETY: the host's registration promise.
                    let (w, g) = unsafe {
                        (std::slice::from_raw_parts(s.host.param, n), std::slice::from_raw_parts(s.host.grad, n))
                    };
                    let Home::Packed { arena, offset } = t.home else { unreachable!("packed by prepare") };
                    self.upload(&self.arenas[arena].param, offset * 4, w);
                    self.upload(&self.arenas[arena].grad, offset * 4, g);
                }
            }
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            self.record_pass(&mut enc, Entry::Norm, self.all_windows(), Some(0));
            enc.copy_buffer_to_buffer(&prepared.partials, 0, &prepared.partials_readback, 0, bytes);
            self.ctx.queue.submit([enc.finish()]);
            map_read(&self.ctx, &prepared.partials_readback, 0, bytes, |b| {
                let partials: &[[u32; 4]] = bytemuck::cast_slice(b);
                // Fixed order over fixed slots: the same bits for the same inputs on one adapter.
                for (i, w) in prepared.windows.iter().enumerate() {
                    let mut bad = false;
                    for &[q, _, flag, k] in &partials[w.slot as usize..(w.slot + w.groups) as usize] {
                        sum_sq += unscaled(q, k);
                        bad |= flag != 0;
                    }
                    if bad {
                        bad_windows.push(i);
                    }
                }
            })
        });
        self.bad_windows = bad_windows;
        result?;
        if !self.bad_windows.is_empty() {
            sum_sq = f64::NAN;
        }
        Ok(AscentNorm { sum_sq })
    }

    fn perturb(&mut self, p: &Perturbation) -> Result<()> {
        self.prepare()?;
        self.step.scale = p.scale;
        self.step.eta = p.eta;
        self.ctx.queue.write_buffer(&self.step_uniform, 0, bytemuck::bytes_of(&self.step));
        // The host's own copy of w first, so the host's weights survive any device failure below.
        for t in &mut self.tensors {
            if let Some(s) = &mut t.staged {
                // SAFETY: the host's registration promise; `saved` has room for these bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        s.host.param,
                        s.saved.as_mut_ptr().cast::<u8>(),
                        t.len * t.dtype.size(),
                    )
                };
            }
        }
        let result = self.ctx.checked("the perturbation pass", || {
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            self.record_pass(&mut enc, Entry::Perturb, self.all_windows(), Some(1));
            self.ctx.queue.submit([enc.finish()]);
            self.download_staged_params()
        });
        if result.is_err() {
            self.restore_staged_hosts();
        }
        result
    }

    fn restore(&mut self) -> Result<()> {
        self.prepare()?;
        self.restore_staged_hosts();
        if self.tensors.iter().all(|t| t.staged.is_some()) && self.timing.is_none() {
            return Ok(());
        }
        self.ctx.checked("the restore pass", || {
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            self.record_pass(&mut enc, Entry::Restore, self.all_windows(), Some(2));
            self.ctx.queue.submit([enc.finish()]);
            self.ctx.wait()
        })
    }

    fn second_reduce(&mut self, _gsam: bool) -> Result<SecondNorm> {
        self.prepare()?;
        let prepared = self.prepared.as_ref().expect("prepared by the first step");
        let bytes = 16 * prepared.slots as u64;
        let (mut sum_sq, mut dot, mut bad) = (0.0f64, 0.0f64, false);
        self.ctx.checked("the second gradient's reduction", || {
            for t in &self.tensors {
                if let Some(s) = &t.staged {
                    // SAFETY: the host's registration promise.
                    let g = unsafe { std::slice::from_raw_parts(s.host.grad, t.host_bytes()) };
                    let (buffer, offset) = self.location(t, Part::Grad);
                    self.upload(buffer, offset, g);
                }
            }
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            self.record_pass(&mut enc, Entry::SecondReduce, self.all_windows(), None);
            enc.copy_buffer_to_buffer(&prepared.partials, 0, &prepared.partials_readback, 0, bytes);
            self.ctx.queue.submit([enc.finish()]);
            map_read(&self.ctx, &prepared.partials_readback, 0, bytes, |b| {
                // Fixed order over fixed slots, as in the norm pass.
                for &[q, d, flag, k] in bytemuck::cast_slice::<u8, [u32; 4]>(b) {
                    sum_sq += unscaled(q, k);
                    dot += f32::from_bits(d) as f64;
                    bad |= flag != 0;
                }
            })
        })?;
        if bad {
            sum_sq = f64::NAN;
        }
        Ok(SecondNorm { sum_sq, dot })
    }

    fn update(&mut self, step: &UpdateStep, tensors: &[TensorStep]) -> Result<()> {
        self.run_update(Entry::Update, step, tensors)
    }

    fn look_store(&mut self, c: f32) -> Result<f64> {
        self.prepare()?;
        self.step.b = c;
        self.ctx.queue.write_buffer(&self.step_uniform, 0, bytemuck::bytes_of(&self.step));
        let prepared = self.prepared.as_ref().expect("prepared by the first step");
        let bytes = 16 * prepared.slots as u64;
        let mut sum_sq = 0.0f64;
        self.ctx.checked("LookSAM's g_v pass", || {
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            self.record_pass(&mut enc, Entry::LookStore, self.all_windows(), None);
            enc.copy_buffer_to_buffer(&prepared.partials, 0, &prepared.partials_readback, 0, bytes);
            self.ctx.queue.submit([enc.finish()]);
            map_read(&self.ctx, &prepared.partials_readback, 0, bytes, |b| {
                for &[q, _, _, k] in bytemuck::cast_slice::<u8, [u32; 4]>(b) {
                    sum_sq += unscaled(q, k);
                }
            })
        })?;
        Ok(sum_sq)
    }

    fn update_single(&mut self, step: &UpdateStep, tensors: &[TensorStep], with_gv: bool) -> Result<()> {
        // The LOOK pipeline always reads g_v; without one to reuse its coefficient is zero.
        let step = if with_gv { *step } else { UpdateStep { b: 0.0, ..*step } };
        self.run_update(Entry::UpdateSingle, &step, tensors)
    }

    fn look_direction(&mut self, c: f32) -> Result<()> {
        self.prepare()?;
        self.step.b = c;
        self.ctx.queue.write_buffer(&self.step_uniform, 0, bytemuck::bytes_of(&self.step));
        self.ctx.checked("LookSAM's direction pass", || {
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            self.record_pass(&mut enc, Entry::LookDirection, self.all_windows(), None);
            self.ctx.queue.submit([enc.finish()]);
            // Staged host tensors get the direction in their own (writable) gradient buffers.
            let jobs: Vec<(&wgpu::Buffer, u64, *mut u8, usize)> = self
                .tensors
                .iter()
                .filter_map(|t| {
                    let s = t.staged.as_ref()?;
                    let (buffer, offset) = self.location(t, Part::Grad);
                    Some((buffer, offset, s.host.grad.cast_mut(), t.host_bytes()))
                })
                .collect();
            if jobs.is_empty() {
                return self.ctx.wait();
            }
            // SAFETY: the engine checked that the host registered every gradient writable.
            unsafe { self.download(&jobs) }
        })
    }

    fn accumulate(&mut self, _first: bool) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "per-shard accumulation runs on the CPU backend only in this version; the GPU engine has no \
             accumulation pass yet",
        ))
    }

    fn write_mean(&mut self, _scale: f32, _into_grads: bool) -> Result<()> {
        Err(Error::new(ErrorKind::Unsupported, "per-shard accumulation runs on the CPU backend only"))
    }

    fn export_state(&mut self, out: &mut [f32]) -> Result<()> {
        if self.tensors.iter().all(|t| self.state_per_elem(t.dtype) == 0) {
            return Ok(());
        }
        out.fill(0.0); // tensors never packed have never been updated: zero state
        let mut jobs: Vec<(&wgpu::Buffer, u64, *mut u8, usize)> = Vec::new();
        let mut at = 0usize;
        for t in &self.tensors {
            if let Home::Packed { arena, offset } = t.home {
                let a = &self.arenas[arena];
                for (k, buffer) in GpuEngine::state_buffers(a).enumerate() {
                    let dst = out[at + k * t.len..at + (k + 1) * t.len].as_mut_ptr().cast::<u8>();
                    jobs.push((buffer, offset * a.per_word() * 4, dst, t.len * 4));
                }
            }
            at += self.state_per_elem(t.dtype) * t.len;
        }
        self.ctx.checked("reading the optimizer state", || {
            // SAFETY: every destination is a distinct range of `out` of exactly that many bytes.
            unsafe { self.download(&jobs) }
        })
    }

    fn import_state(&mut self, data: &[f32]) -> Result<()> {
        if self.tensors.iter().all(|t| self.state_per_elem(t.dtype) == 0) {
            return Ok(());
        }
        self.prepare()?; // every tensor gets its place in an arena
        self.ctx.checked("writing the optimizer state", || {
            let mut at = 0usize;
            for t in &self.tensors {
                let Home::Packed { arena, offset } = t.home else { unreachable!("packed by prepare") };
                let a = &self.arenas[arena];
                for (k, buffer) in GpuEngine::state_buffers(a).enumerate() {
                    let values = &data[at + k * t.len..at + (k + 1) * t.len];
                    self.upload(buffer, offset * a.per_word() * 4, bytemuck::cast_slice(values));
                }
                at += self.state_per_elem(t.dtype) * t.len;
            }
            self.ctx.queue.submit([]);
            self.ctx.wait()
        })
    }

    fn add_external(&mut self, external: External, len: usize, dtype: DType) -> Result<()> {
        GpuEngine::add_external(self, external, len, dtype)
    }

    unsafe fn add_vulkan(&mut self, param: (u64, u64), grad: (u64, u64), len: usize, dtype: DType) -> Result<()> {
        // SAFETY: the caller's contract, passed on.
        unsafe { GpuEngine::add_vulkan(self, param, grad, len, dtype) }
    }

    fn rebind_externals(&mut self, items: Vec<(usize, External)>) -> Result<()> {
        GpuEngine::rebind_externals(self, items)
    }

    fn rebind_external_grads(&mut self, items: Vec<(usize, wgpu::Buffer, u64)>) -> Result<()> {
        GpuEngine::rebind_external_grads(self, items)
    }

    unsafe fn rebind_vulkan(&mut self, tensor: usize, param: (u64, u64), grad: (u64, u64)) -> Result<()> {
        // SAFETY: the caller's contract, passed on.
        unsafe { GpuEngine::rebind_vulkan(self, tensor, param, grad) }
    }

    fn limit_window(&mut self, bytes: u64) {
        // Windows start at multiples of the storage offset alignment (and of 16 bytes).
        let align = (self.ctx.limits.min_storage_buffer_offset_alignment as u64).max(16);
        self.window_words = self.window_words.min((bytes / align * align / 4).max(align / 4));
        self.prepared = None;
    }

    fn set_cohort(&mut self, tensor: usize, cohort: (u32, u64)) {
        if self.tensors[tensor].cohort != cohort {
            self.tensors[tensor].cohort = cohort;
            self.prepared = None;
            self.packed = false;
        }
    }

    fn find_non_finite(&self, _adaptive: bool) -> Option<(usize, usize)> {
        self.locate().ok().flatten()
    }

    fn describe(&self) -> String {
        format!("gpu ({}, {}, {})", self.ctx.summary.name, self.ctx.summary.backend, self.ctx.summary.device_type)
    }

    fn adapter(&self) -> Option<AdapterSummary> {
        Some(self.ctx.summary.clone())
    }

    fn enable_timing(&mut self) -> bool {
        GpuEngine::enable_timing(self)
    }

    fn pass_times(&mut self) -> Option<PassTimes> {
        GpuEngine::pass_times(self)
    }

    fn time_copy(&self, bytes: u64, reps: usize) -> Result<Vec<(f64, bool)>> {
        GpuEngine::time_copy(self, bytes, reps)
    }
}
