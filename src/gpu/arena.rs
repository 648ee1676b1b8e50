//! Registration and packing: each tensor's home on the device, and arenas of tensors end to end.

use super::pipelines::dtype_index;
use super::{External, GpuEngine};
use crate::backend::{HostTensor, Part};
use crate::config::BaseOptimizer;
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};

/// A host tensor staged through the device, with the host-side copy of `w` for the restore.
pub(super) struct Staged {
    pub(super) host: HostTensor,
    pub(super) saved: Vec<u64>,
}

/// Where a tensor's device data lives.
pub(super) enum Home {
    /// An optimizer-allocated tensor not packed yet: buffers of its own.
    Own { param: wgpu::Buffer, grad: wgpu::Buffer },
    /// A staged host tensor not packed yet (its data is uploaded at every step anyway).
    Unplaced,
    /// In arena `arena`, from u32 word `offset`.
    Packed { arena: usize, offset: u64 },
}

pub(super) struct GpuTensor {
    pub(super) len: usize,
    pub(super) dtype: DType,
    /// u32 words on the device: the tensor's bytes rounded up to 16.
    pub(super) words: u64,
    pub(super) home: Home,
    pub(super) staged: Option<Staged>,
    /// Tensors of one cohort share every per-tensor scalar; an arena holds one cohort.
    pub(super) cohort: (u32, u64),
    /// The host's buffers, for a tensor registered in place: it gets an arena of its own.
    pub(super) external: Option<External>,
}

impl GpuTensor {
    pub(super) fn host_bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
}

/// Tensors of one dtype, end to end.
pub(super) struct Arena {
    pub(super) dtype: DType,
    pub(super) param: wgpu::Buffer,
    /// Bytes before the arena's first word in `param` (non-zero for a host buffer).
    pub(super) param_offset: u64,
    pub(super) grad: wgpu::Buffer,
    pub(super) grad_offset: u64,
    pub(super) backup: wgpu::Buffer,
    /// GSAM: the first gradient, saved by the perturbation pass.
    pub(super) first_grad: Option<wgpu::Buffer>,
    /// The base optimizer's f32 state: momentum buffer or Adam's first moment, second moment.
    pub(super) state_m: Option<wgpu::Buffer>,
    pub(super) state_v: Option<wgpu::Buffer>,
    /// LookSAM's `g_v`, f32 laid out as the state.
    pub(super) look: Option<wgpu::Buffer>,
    /// f32 master weights (half-precision arenas with master weights), laid out as the state.
    pub(super) master: Option<wgpu::Buffer>,
    /// `(first word, tensor)` of every member, in order.
    pub(super) members: Vec<(u64, usize)>,
}

impl Arena {
    pub(super) fn per_word(&self) -> u64 {
        if self.dtype == DType::F32 { 1 } else { 2 }
    }
}

impl GpuEngine {
    pub(super) fn add(&mut self, len: usize, dtype: DType, staged: Option<Staged>) -> Result<()> {
        let bytes = len as u64 * dtype.size() as u64;
        let words = bytes.div_ceil(16) * 4;
        if words > self.arena_words {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "len = {len}: {bytes} bytes of {} exceed the largest buffer of {} ({} bytes)",
                    dtype.name(),
                    self.ctx.summary.name,
                    self.arena_words * 4
                ),
            ));
        }
        let home = if staged.is_some() {
            Home::Unplaced
        } else {
            let d = &self.ctx.device;
            self.ctx.checked("allocating a tensor", || {
                let make = |label| {
                    d.create_buffer(&wgpu::BufferDescriptor {
                        label: Some(label),
                        size: words * 4,
                        usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    })
                };
                Ok(Home::Own { param: make("samopt param"), grad: make("samopt grad") })
            })?
        };
        self.tensors.push(GpuTensor { len, dtype, words, home, staged, cohort: (0, 0), external: None });
        self.prepared = None;
        self.packed = false;
        Ok(())
    }

    /// Registers a tensor in the host's own device buffers; the passes run on them in place.
    /// Checked here: usage, alignment, sizes; the device is the caller's promise.
    pub fn add_external(&mut self, e: External, len: usize, dtype: DType) -> Result<()> {
        let ranges: Vec<Option<&External>> = self.tensors.iter().map(|t| t.external.as_ref()).collect();
        self.check_external(&e, len, dtype, None, &ranges)?;
        let bytes = len as u64 * dtype.size() as u64;
        self.tensors.push(GpuTensor {
            len,
            dtype,
            words: bytes / 4,
            home: Home::Unplaced,
            staged: None,
            cohort: (0, 0),
            external: Some(e),
        });
        self.prepared = None;
        self.packed = false;
        Ok(())
    }

    /// Re-points in-place tensor `tensor` at other device buffers (checked as at registration,
    /// its own old ranges excepted); its state stays. Only its arena's buffers change: the windows'
    /// bind groups are rebuilt at the next pass, nothing is copied.
    pub fn rebind_external(&mut self, tensor: usize, e: External) -> Result<()> {
        self.rebind_externals(vec![(tensor, e)])
    }

    /// Re-points the gradients of in-place tensors (`(tensor, grad, grad_offset)` each), all or
    /// nothing; their weights stay where they are. Not for Vulkan tensors, whose ranges samopt
    /// tracks by `VkBuffer` handle.
    pub fn rebind_external_grads(&mut self, items: Vec<(usize, wgpu::Buffer, u64)>) -> Result<()> {
        let mut externals = Vec::with_capacity(items.len());
        for (tensor, grad, grad_offset) in items {
            let Some(e) = self.tensors.get(tensor).and_then(|t| t.external.as_ref()) else {
                return Err(Error::invalid(format!("id = {tensor}: not a tensor in device buffers (register_wgpu)")));
            };
            if self.vulkan_ranges.iter().any(|&(t, ..)| t == tensor) {
                return Err(Error::invalid(format!(
                    "id = {tensor}: a tensor in VkBuffers: rebind it with sam_rebind_vulkan"
                )));
            }
            externals
                .push((tensor, External { param: e.param.clone(), param_offset: e.param_offset, grad, grad_offset }));
        }
        self.rebind_externals(externals)
    }

    /// Re-points several in-place tensors at once, all or nothing. The overlap checks see the
    /// ranges as they will be after the call: a host whose allocator hands one tensor's old range
    /// to another between steps (a fresh gradient in a freed slot) rebinds them together.
    pub fn rebind_externals(&mut self, items: Vec<(usize, External)>) -> Result<()> {
        let mut moved: Vec<Option<&External>> = vec![None; self.tensors.len()];
        for (tensor, e) in &items {
            match self.tensors.get(*tensor) {
                Some(t) if t.external.is_some() => {}
                _ => {
                    return Err(Error::invalid(format!(
                        "id = {tensor}: not a tensor in device buffers (register_wgpu / sam_register_vulkan)"
                    )));
                }
            }
            if moved[*tensor].replace(e).is_some() {
                return Err(Error::invalid(format!("id = {tensor}: named twice in one rebind")));
            }
        }
        let after: Vec<Option<&External>> =
            self.tensors.iter().zip(&moved).map(|(t, m)| m.or(t.external.as_ref())).collect();
        for (tensor, e) in &items {
            let t = &self.tensors[*tensor];
            self.check_external(e, t.len, t.dtype, Some(*tensor), &after)?;
        }
        for (tensor, e) in items {
            if let Home::Packed { arena, .. } = self.tensors[tensor].home {
                // An in-place tensor has an arena of its own, around the host's buffers.
                let a = &mut self.arenas[arena];
                a.param = e.param.clone();
                a.param_offset = e.param_offset;
                a.grad = e.grad.clone();
                a.grad_offset = e.grad_offset;
                self.prepared = None;
            }
            self.tensors[tensor].external = Some(e);
        }
        Ok(())
    }

    /// The checks of an in-place tensor's buffers: usage, alignment, sizes, and overlaps with every
    /// other in-place tensor (but `except`) at the ranges `ranges` gives them (its index is the
    /// tensor's); the device is the caller's promise.
    fn check_external(
        &self,
        e: &External,
        len: usize,
        dtype: DType,
        except: Option<usize>,
        ranges: &[Option<&External>],
    ) -> Result<()> {
        let bytes = len as u64 * dtype.size() as u64;
        let align = self.ctx.limits.min_storage_buffer_offset_alignment as u64;
        if !bytes.is_multiple_of(16) {
            return Err(Error::invalid(format!(
                "len = {len}: in-place device tensors need a multiple of 16 bytes ({} {} elements)",
                16 / dtype.size(),
                dtype.name()
            )));
        }
        for (name, buffer, offset) in [("param", &e.param, e.param_offset), ("grad", &e.grad, e.grad_offset)] {
            if !offset.is_multiple_of(align) {
                return Err(Error::invalid(format!(
                    "{name}_offset = {offset}: must be a multiple of {align} bytes (the device's storage offset alignment)"
                )));
            }
            if offset.checked_add(bytes).is_none_or(|end| end > buffer.size()) {
                return Err(Error::invalid(format!(
                    "{name}: offset {offset} + {bytes} bytes passes the end of the {}-byte buffer",
                    buffer.size()
                )));
            }
            if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
                return Err(Error::invalid(format!("{name}: the buffer lacks the STORAGE usage")));
            }
        }
        if e.param == e.grad && e.param_offset < e.grad_offset + bytes && e.grad_offset < e.param_offset + bytes {
            return Err(Error::invalid("param and grad overlap in the same buffer"));
        }
        for (k, t) in self.tensors.iter().enumerate().filter(|&(k, _)| Some(k) != except) {
            if let Some(o) = ranges[k] {
                let o_bytes = t.len as u64 * t.dtype.size() as u64;
                for (b, off) in [(&e.param, e.param_offset), (&e.grad, e.grad_offset)] {
                    for (ob, ooff) in [(&o.param, o.param_offset), (&o.grad, o.grad_offset)] {
                        if b == ob && off < ooff + o_bytes && ooff < off + bytes {
                            return Err(Error::invalid(format!("a buffer range overlaps one of tensor {k}")));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Where a part of a tensor lives: buffer and byte offset.
    pub(super) fn location<'a>(&'a self, t: &'a GpuTensor, part: Part) -> (&'a wgpu::Buffer, u64) {
        match &t.home {
            Home::Own { param, grad } => (if part == Part::Param { param } else { grad }, 0),
            Home::Packed { arena, offset } => {
                let a = &self.arenas[*arena];
                match part {
                    Part::Param => (&a.param, a.param_offset + offset * 4),
                    Part::Grad => (&a.grad, a.grad_offset + offset * 4),
                }
            }
            Home::Unplaced => unreachable!("staged tensors are not read or written through the device"),
        }
    }

    /// Packs every tensor into arenas, moving the data of those that have some on the device.
    pub(super) fn pack(&mut self) -> Result<()> {
        let d = &self.ctx.device;
        // Per arena to build: dtype, cohort, words used, and the `(first word, tensor)` of its
        // members. One arena per (dtype, cohort), split where it would pass the largest buffer.
        struct Plan {
            dtype: DType,
            cohort: (u32, u64),
            words: u64,
            members: Vec<(u64, usize)>,
            /// A tensor in the host's buffers: an arena of its own, around them.
            external: Option<External>,
        }
        let mut order: Vec<usize> = (0..self.tensors.len()).collect();
        order.sort_by_key(|&k| (dtype_index(self.tensors[k].dtype), self.tensors[k].cohort, k));
        let mut plan: Vec<Plan> = Vec::new();
        for k in order {
            let t = &self.tensors[k];
            if let Some(external) = &t.external {
                let (dtype, cohort, words) = (t.dtype, t.cohort, t.words);
                plan.push(Plan { dtype, cohort, words, members: vec![(0, k)], external: Some(external.clone()) });
                continue;
            }
            match plan.last_mut() {
                Some(p)
                    if p.external.is_none()
                        && p.dtype == t.dtype
                        && p.cohort == t.cohort
                        && p.words + t.words <= self.arena_words =>
                {
                    p.members.push((p.words, k));
                    p.words += t.words;
                }
                _ => plan.push(Plan {
                    dtype: t.dtype,
                    cohort: t.cohort,
                    words: t.words,
                    members: vec![(0, k)],
                    external: None,
                }),
            }
        }
        let per_word = |d: DType| if d == DType::F32 { 1 } else { 2 };
        let (has_m, has_v) = (self.momentum || self.base == BaseOptimizer::AdamW, self.base == BaseOptimizer::AdamW);
        let arenas = self.ctx.checked("packing the tensors", || {
            use wgpu::BufferUsages as U;
            let mut arenas = Vec::with_capacity(plan.len());
            let mut enc = d.create_command_encoder(&Default::default());
            for Plan { dtype, words, members, external, .. } in &plan {
                let make = |label, usage| {
                    d.create_buffer(&wgpu::BufferDescriptor {
                        label: Some(label),
                        size: words * 4,
                        usage,
                        mapped_at_creation: false,
                    })
                };
                // f32 state: 4 bytes per element, `per_word` elements per word.
                let state = |label| {
                    d.create_buffer(&wgpu::BufferDescriptor {
                        label: Some(label),
                        size: words * 4 * per_word(*dtype),
                        usage: U::STORAGE | U::COPY_SRC | U::COPY_DST,
                        mapped_at_creation: false,
                    })
                };
                let (param, param_offset, grad, grad_offset) = match external {
                    // The host's buffers, in place: nothing to copy.
                    Some(e) => (e.param.clone(), e.param_offset, e.grad.clone(), e.grad_offset),
                    None => (
                        make("samopt params", U::STORAGE | U::COPY_SRC | U::COPY_DST),
                        0,
                        make("samopt grads", U::STORAGE | U::COPY_SRC | U::COPY_DST),
                        0,
                    ),
                };
                let arena = Arena {
                    dtype: *dtype,
                    param,
                    param_offset,
                    grad,
                    grad_offset,
                    backup: make("samopt backups", U::STORAGE | U::COPY_SRC),
                    first_grad: self.keep_first.then(|| make("samopt first grads", U::STORAGE)),
                    state_m: has_m.then(|| state("samopt state m")),
                    state_v: has_v.then(|| state("samopt state v")),
                    look: self.look.then(|| state("samopt looksam g_v")),
                    master: (self.master && *dtype != DType::F32).then(|| state("samopt master weights")),
                    members: members.clone(),
                };
                for &(offset, k) in members {
                    let t = &self.tensors[k];
                    if t.staged.is_none() && t.external.is_none() {
                        for (part, dst) in [(Part::Param, &arena.param), (Part::Grad, &arena.grad)] {
                            let (src, src_offset) = self.location(t, part);
                            enc.copy_buffer_to_buffer(src, src_offset, dst, offset * 4, t.words * 4);
                        }
                    }
                    // The optimizer state moves with the tensor (new tensors start at zeros).
                    if let Home::Packed { arena: old, offset: old_offset } = t.home {
                        let pw = per_word(t.dtype);
                        let old = &self.arenas[old];
                        for (src, dst) in [
                            (&old.state_m, &arena.state_m),
                            (&old.state_v, &arena.state_v),
                            (&old.look, &arena.look),
                            (&old.master, &arena.master),
                        ] {
                            if let (Some(src), Some(dst)) = (src, dst) {
                                enc.copy_buffer_to_buffer(
                                    src,
                                    old_offset * 4 * pw,
                                    dst,
                                    offset * 4 * pw,
                                    t.words * 4 * pw,
                                );
                            }
                        }
                    }
                }
                arenas.push(arena);
            }
            self.ctx.queue.submit([enc.finish()]);
            self.ctx.wait()?;
            Ok(arenas)
        })?;
        for (a, arena) in arenas.iter().enumerate() {
            for &(offset, k) in &arena.members {
                self.tensors[k].home = Home::Packed { arena: a, offset };
            }
        }
        self.arenas = arenas;
        Ok(())
    }

    /// f32 state values per element of a tensor of `dtype`: the base optimizer's 0, 1 (momentum)
    /// or 2 (Adam), then LookSAM's `g_v`, then the master weight (half precision).
    pub(super) fn state_per_elem(&self, dtype: DType) -> usize {
        self.state_per_dtype[dtype_index(dtype)]
    }

    /// An arena's f32 state buffers in checkpoint order: momentum or first moment, second
    /// moment, `g_v`, master weights, each where the configuration has it.
    pub(super) fn state_buffers(arena: &Arena) -> impl Iterator<Item = &wgpu::Buffer> {
        [&arena.state_m, &arena.state_v, &arena.look, &arena.master].into_iter().flatten()
    }

    /// Window size in words for an arena of `dtype`: one storage binding, or half of one for a
    /// half-precision arena whose f32 state takes twice the bytes of its words.
    pub(super) fn window_words_for(&self, dtype: DType) -> u64 {
        let has_state = self.momentum || self.base == BaseOptimizer::AdamW || self.look || self.master;
        if dtype != DType::F32 && has_state { (self.window_words / 2 / 64 * 64).max(64) } else { self.window_words }
    }
}
