//! Pipelines and bind groups: the shader's entry points per dtype, the uniforms, and the windows
//! each pass dispatches over.

use super::GpuEngine;
use crate::config::BaseOptimizer;
use crate::dtype::DType;
use crate::error::Result;

/// Invocations per workgroup (the shader's `@workgroup_size`).
pub(super) const WORKGROUP: u64 = 256;

/// One window's GPU resources.
pub(super) struct WindowRes {
    pub(super) arena: usize,
    pub(super) first_word: u64,
    pub(super) quads: u32,
    /// Workgroups of the reductions (norm, second gradient, LookSAM's g_v): one partial-sum
    /// slot each, from `slot`.
    pub(super) groups: u32,
    /// Workgroups of the elementwise passes (no reduction tree: more of them is cheaper).
    pub(super) spread: u32,
    pub(super) slot: u32,
    pub(super) bind_group: wgpu::BindGroup,
    /// The same bindings with other buffers in bindings 2 and 3, indexed `2 * b2 + b3`: b2 = 1 puts
    /// LookSAM's `g_v` in place of the backup, b3 = 1 the master weights in place of the partial
    /// sums (see [`Entry::bindings`]); `[0]` is `bind_group`, built where an entry needs one.
    pub(super) variants: [Option<wgpu::BindGroup>; 4],
}

/// What the windows need, rebuilt when the registrations change.
pub(super) struct Prepared {
    /// Bytes between two windows' uniforms.
    pub(super) stride: u64,
    pub(super) windows: Vec<WindowRes>,
    pub(super) partials: wgpu::Buffer,
    pub(super) partials_readback: wgpu::Buffer,
    pub(super) first_bad: wgpu::Buffer,
    pub(super) first_bad_readback: wgpu::Buffer,
    pub(super) slots: u32,
    pub(super) window_uniforms: wgpu::Buffer,
}

/// The `Step` uniform of the shader.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct StepUniform {
    pub(super) scale: f32,
    pub(super) eta: f32,
    pub(super) a: f32,
    pub(super) b: f32,
    pub(super) nd: f32,
    pub(super) nb: f32,
    pub(super) beta1: f32,
    pub(super) one_minus_beta1: f32,
    pub(super) beta2: f32,
    pub(super) one_minus_beta2: f32,
    pub(super) adam_eps: f32,
    pub(super) pad: u32,
}

/// The `Window` uniform of the shader.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct WindowUniform {
    pub(super) quads: u32,
    pub(super) slot: u32,
    pub(super) index: u32,
    pub(super) fresh: u32,
    pub(super) lr: f32,
    pub(super) weight_decay: f32,
    pub(super) keep: f32,
    pub(super) take: f32,
    pub(super) decay: f32,
    pub(super) step_size: f32,
    pub(super) bias2_sqrt: f32,
    pub(super) pre_bias2_sqrt: f32,
}
/// The shader's entry points, each specialised per dtype (`restore` moves words, whatever they
/// hold).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Entry {
    Norm = 0,
    Perturb = 1,
    Restore = 2,
    Locate = 3,
    SecondReduce = 4,
    Update = 5,
    UpdateSingle = 6,
    LookStore = 7,
    LookDirection = 8,
}

impl Entry {
    /// What the pass finds in bindings 2 and 3, as `2 * b2 + b3`: b2 = 1 for LookSAM's `g_v`
    /// (else the backup), b3 = 1 for the master weights (else the partial sums).
    pub(super) fn bindings(self, look: bool, master: bool) -> usize {
        let b2 = look && matches!(self, Entry::UpdateSingle | Entry::LookStore | Entry::LookDirection);
        let b3 = master && matches!(self, Entry::Update | Entry::UpdateSingle);
        2 * b2 as usize + b3 as usize
    }
}

pub(super) const ENTRIES: [Entry; 9] = [
    Entry::Norm,
    Entry::Perturb,
    Entry::Restore,
    Entry::Locate,
    Entry::SecondReduce,
    Entry::Update,
    Entry::UpdateSingle,
    Entry::LookStore,
    Entry::LookDirection,
];
pub(super) const ENTRY_NAMES: [&str; 9] = [
    "ascent_norm",
    "perturb",
    "restore",
    "locate_non_finite",
    "second_reduce",
    "update",
    "update_single",
    "look_store",
    "look_direction",
];

pub(super) fn dtype_index(d: DType) -> usize {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

impl GpuEngine {
    pub(super) fn pipeline(&self, entry: Entry, dtype: DType) -> &wgpu::ComputePipeline {
        let d = if entry == Entry::Restore { 0 } else { dtype_index(dtype) };
        self.pipelines[entry as usize][d].as_ref().expect("compiled in prepare")
    }

    /// Compiles the pipelines a dtype needs, once.
    pub(super) fn compile(&mut self, dtype: DType) -> Result<()> {
        let d = dtype_index(dtype);
        let base = self.base != BaseOptimizer::None;
        for entry in ENTRIES {
            let needed = match entry {
                Entry::Norm | Entry::Perturb | Entry::Restore | Entry::Locate => true,
                // LookSAM reduces g.g' without a base optimizer too.
                Entry::SecondReduce => base || self.look || self.scaled,
                Entry::Update | Entry::UpdateSingle => base,
                Entry::LookStore => self.look,
                Entry::LookDirection => self.look && !base,
            };
            if !needed {
                continue;
            }
            let slot = if entry == Entry::Restore { 0 } else { d };
            if self.pipelines[entry as usize][slot].is_some() {
                continue;
            }
            let base = match self.base {
                BaseOptimizer::None => 0.0,
                BaseOptimizer::Sgd => 1.0,
                BaseOptimizer::AdamW => 2.0,
            };
            let flag = |b: bool| b as u8 as f64;
            let constants = [
                ("DTYPE", slot as f64),
                ("ADAPTIVE", flag(self.adaptive)),
                ("SIGN", flag(self.sign)),
                ("BASE", base),
                ("MOMENTUM", flag(self.momentum)),
                ("GSAM", flag(self.gsam)),
                ("KEEP_FIRST", flag(self.keep_first)),
                ("LOOK", flag(self.look)),
                ("MASTER", flag(self.master && dtype != DType::F32)),
                ("PRECOND", flag(self.precond)),
            ];
            let pipeline = self.ctx.checked("compiling a SAM pipeline", || {
                Ok(self.ctx.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(ENTRY_NAMES[entry as usize]),
                    layout: Some(&self.pipeline_layout),
                    module: &self.module,
                    entry_point: Some(ENTRY_NAMES[entry as usize]),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &constants,
                        ..Default::default()
                    },
                    cache: None,
                }))
            })?;
            self.pipelines[entry as usize][slot] = Some(pipeline);
        }
        Ok(())
    }

    /// After the registrations change: packs the tensors, compiles what a new dtype needs, cuts
    /// the arenas into windows and builds their bind groups and the partial-sum buffers.
    pub(super) fn prepare(&mut self) -> Result<()> {
        if self.prepared.is_some() {
            return Ok(());
        }
        // A rebinding only changes an arena's buffers: the windows are rebuilt, not the arenas.
        if !self.packed {
            self.pack()?;
            self.packed = true;
        }
        for dtype in self.arenas.iter().map(|a| a.dtype).collect::<Vec<_>>() {
            self.compile(dtype)?;
        }
        let d = &self.ctx.device;
        let uniform_align = self.ctx.limits.min_uniform_buffer_offset_alignment as u64;
        let stride = (size_of::<WindowUniform>() as u64).div_ceil(uniform_align) * uniform_align;
        // (arena, first word, words)
        let mut windows = Vec::new();
        for (a, arena) in self.arenas.iter().enumerate() {
            let words = arena.members.last().map_or(0, |&(o, k)| o + self.tensors[k].words);
            let mut first = 0;
            let window_words = self.window_words_for(arena.dtype);
            while first < words {
                let n = window_words.min(words - first);
                windows.push((a, first, n));
                first += n;
            }
        }
        // Workgroups: one per WORKGROUP quads, at most `max_groups` per window; the shader
        // strides over the rest. The reductions' workgroups are rationed further: at most about
        // `max_groups` per pass in all, shared by the windows in proportion to their size (at
        // least one each). A reduction over many small windows (tensors in the host's own
        // buffers, one window each) then runs as many reduction trees as one over the same bytes
        // packed, which matters where a tree's barriers are costly (software drivers: 4.5x faster
        // norm pass on lavapipe over ResNet-50's 161 tensors).
        let total_quads: u64 = windows.iter().map(|&(_, _, n)| n / 4).sum::<u64>().max(1);
        let max_groups = self.max_groups as u64;
        // (arena, first word, words, reduction groups, elementwise groups, slot)
        let mut plan = Vec::with_capacity(windows.len());
        let mut slots = 0u32;
        for (a, first, n) in windows {
            let spread = (n / 4).div_ceil(WORKGROUP).clamp(1, max_groups);
            let groups = spread.min((max_groups * (n / 4)).div_ceil(total_quads)).max(1);
            plan.push((a, first, n, groups as u32, spread as u32, slots));
            slots += groups as u32;
        }
        let prepared = self.ctx.checked("preparing the windows", || {
            let buffer = |label, size: u64, usage| {
                d.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size, usage, mapped_at_creation: false })
            };
            use wgpu::BufferUsages as U;
            let uniforms = buffer("samopt windows", stride * plan.len().max(1) as u64, U::UNIFORM | U::COPY_DST);
            let partial_bytes = 16 * slots.max(1) as u64;
            let partials = buffer("samopt partials", partial_bytes, U::STORAGE | U::COPY_SRC);
            let partials_readback = buffer("samopt partials readback", partial_bytes, U::MAP_READ | U::COPY_DST);
            let bad_bytes = (4 * plan.len().max(1) as u64).div_ceil(8) * 8;
            let first_bad = buffer("samopt first bad", bad_bytes, U::STORAGE | U::COPY_SRC | U::COPY_DST);
            let first_bad_readback = buffer("samopt first bad readback", bad_bytes, U::MAP_READ | U::COPY_DST);
            let mut windows = Vec::with_capacity(plan.len());
            for (i, &(a, first, n, groups, spread, slot)) in plan.iter().enumerate() {
                let arena = &self.arenas[a];
                let u = WindowUniform { quads: (n / 4) as u32, slot, index: i as u32, ..bytemuck::Zeroable::zeroed() };
                self.ctx.queue.write_buffer(&uniforms, i as u64 * stride, bytemuck::bytes_of(&u));
                let pw = arena.per_word();
                // f32 state: `pw` elements of 4 bytes per word.
                fn state_range<'a>(
                    buffer: &'a Option<wgpu::Buffer>,
                    dummy: &'a wgpu::Buffer,
                    (first, n, pw): (u64, u64, u64),
                ) -> wgpu::BindingResource<'a> {
                    match buffer {
                        Some(buffer) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer,
                            offset: first * 4 * pw,
                            size: wgpu::BufferSize::new(n * 4 * pw),
                        }),
                        None => dummy.as_entire_binding(),
                    }
                }
                let range_at = |buffer, base: u64| {
                    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer,
                        offset: base + first * 4,
                        size: wgpu::BufferSize::new(n * 4),
                    })
                };
                let range = |buffer| range_at(buffer, 0);
                // Binding 2: the backup, or (LookSAM's passes) g_v, laid out as the state; binding
                // 3: the partial sums, or (the updates of a master arena) the master weights.
                let make_group = |saved: wgpu::BindingResource<'_>, third: wgpu::BindingResource<'_>| {
                    d.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some("samopt window"),
                        layout: &self.layout,
                        entries: &[
                            wgpu::BindGroupEntry { binding: 0, resource: range_at(&arena.param, arena.param_offset) },
                            wgpu::BindGroupEntry { binding: 1, resource: range_at(&arena.grad, arena.grad_offset) },
                            wgpu::BindGroupEntry { binding: 2, resource: saved },
                            wgpu::BindGroupEntry { binding: 3, resource: third },
                            wgpu::BindGroupEntry {
                                binding: 4,
                                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                    buffer: &uniforms,
                                    offset: i as u64 * stride,
                                    size: wgpu::BufferSize::new(size_of::<WindowUniform>() as u64),
                                }),
                            },
                            wgpu::BindGroupEntry { binding: 5, resource: self.step_uniform.as_entire_binding() },
                            wgpu::BindGroupEntry { binding: 6, resource: first_bad.as_entire_binding() },
                            wgpu::BindGroupEntry {
                                binding: 7,
                                resource: match &arena.first_grad {
                                    Some(b) => range(b),
                                    None => self.dummy.as_entire_binding(),
                                },
                            },
                            wgpu::BindGroupEntry {
                                binding: 8,
                                resource: state_range(&arena.state_m, &self.dummy, (first, n, pw)),
                            },
                            wgpu::BindGroupEntry {
                                binding: 9,
                                resource: state_range(&arena.state_v, &self.dummy, (first, n, pw)),
                            },
                        ],
                    })
                };
                let bind_group = make_group(range(&arena.backup), partials.as_entire_binding());
                let (look, master) = (arena.look.is_some(), arena.master.is_some());
                let mut variants: [Option<wgpu::BindGroup>; 4] = Default::default();
                for (key, variant) in variants.iter_mut().enumerate().skip(1) {
                    let (b2, b3) = (key & 2 != 0, key & 1 != 0);
                    if (b2 && !look) || (b3 && !master) {
                        continue;
                    }
                    let second =
                        if b2 { state_range(&arena.look, &self.dummy, (first, n, pw)) } else { range(&arena.backup) };
                    let third = if b3 {
                        state_range(&arena.master, &self.dummy, (first, n, pw))
                    } else {
                        partials.as_entire_binding()
                    };
                    *variant = Some(make_group(second, third));
                }
                windows.push(WindowRes {
                    arena: a,
                    first_word: first,
                    quads: (n / 4) as u32,
                    groups,
                    spread,
                    slot,
                    bind_group,
                    variants,
                });
            }
            Ok(Prepared {
                stride,
                windows,
                partials,
                partials_readback,
                first_bad,
                first_bad_readback,
                slots,
                window_uniforms: uniforms,
            })
        })?;
        self.prepared = Some(prepared);
        Ok(())
    }

    /// Records one compute pass of `entry` over `windows` (indices), timestamped as pass `index`.
    pub(super) fn record_pass(
        &self,
        enc: &mut wgpu::CommandEncoder,
        entry: Entry,
        windows: impl IntoIterator<Item = usize>,
        index: Option<u32>,
    ) {
        let prepared = self.prepared.as_ref().expect("prepared before recording");
        let timestamp_writes = index.and_then(|index| {
            self.timing.as_ref().map(|t| wgpu::ComputePassTimestampWrites {
                query_set: &t.queries,
                beginning_of_pass_write_index: Some(2 * index),
                end_of_pass_write_index: Some(2 * index + 1),
            })
        });
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes });
        for i in windows {
            let w = &prepared.windows[i];
            pass.set_pipeline(self.pipeline(entry, self.arenas[w.arena].dtype));
            let arena = &self.arenas[w.arena];
            let key = entry.bindings(arena.look.is_some(), arena.master.is_some());
            let group = match key {
                0 => &w.bind_group,
                _ => w.variants[key].as_ref().expect("built for the arena's buffers"),
            };
            pass.set_bind_group(0, group, &[]);
            let reduces = matches!(entry, Entry::Norm | Entry::SecondReduce | Entry::LookStore);
            pass.dispatch_workgroups(if reduces { w.groups } else { w.spread }, 1, 1);
        }
    }

    pub(super) fn all_windows(&self) -> std::ops::Range<usize> {
        0..self.prepared.as_ref().map_or(0, |p| p.windows.len())
    }
}
