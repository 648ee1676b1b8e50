//! The wgpu compute engine: the norm, perturbation and restore passes as WGSL compute shaders
//! (`shaders/sam.wgsl`).
//!
//! Every tensor lives in three device buffers (parameter, gradient, backup). A tensor larger than
//! one storage binding is cut into windows; each window has its bind group, built once after the
//! registrations change and reused every step, so a step compiles nothing and allocates nothing.
//!
//! - Norm: each workgroup of each window writes an f32 partial sum of `(T_w g)^2` and a
//!   non-finite flag (a bit test on the inputs, so a driver that assumes finite math cannot hide
//!   it); the host adds the partials in f64 in a fixed order, so the same inputs give the same bits
//!   on the same adapter.
//! - Perturbation: `backup <- w; w <- w + e(w)`, one word per invocation, grid-stride loops over a
//!   fixed grid.
//! - Restore: `w <- backup`.
//!
//! Host buffers registered under the GPU backend are staged: the first step uploads `w` and `g`,
//! runs the passes and downloads the perturbed `w`; the bits of `w` are also kept on the host, so
//! the restore is a host copy and a device failure can always put the host's weights back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::backend::{AscentNorm, HostTensor, Part, Passes};
use crate::config::Config;
use crate::cpu::first_non_finite;
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use crate::math::Perturbation;

const WORKGROUP: u64 = 256;
/// Bytes of the reusable download staging buffer (downloads larger than this go in pieces).
const READBACK_BYTES: u64 = 32 << 20;

/// The adapter a GPU engine runs on, as `samopt info` and `sam_get_adapter_info` report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterSummary {
    /// The adapter's name, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// The graphics API: `vulkan`, `metal`, `dx12` or `gl`.
    pub backend: String,
    /// `discrete`, `integrated`, `virtual`, `cpu` or `other`.
    pub device_type: String,
    /// The driver's name and version, where the driver reports them.
    pub driver: String,
    /// The largest storage binding, in bytes: tensors larger than this run in windows.
    pub max_binding_bytes: u64,
    /// The largest buffer, in bytes: the largest tensor the engine can hold.
    pub max_buffer_bytes: u64,
    /// Whether the adapter can time passes with timestamp queries.
    pub timestamps: bool,
}

fn device_type_name(t: wgpu::DeviceType) -> &'static str {
    match t {
        wgpu::DeviceType::DiscreteGpu => "discrete",
        wgpu::DeviceType::IntegratedGpu => "integrated",
        wgpu::DeviceType::VirtualGpu => "virtual",
        wgpu::DeviceType::Cpu => "cpu",
        wgpu::DeviceType::Other => "other",
    }
}

/// Lists the adapters wgpu finds (honouring `WGPU_BACKEND`), best first: discrete, integrated,
/// virtual, CPU; native APIs before GL.
pub fn adapters() -> Vec<AdapterSummary> {
    ranked_adapters().iter().map(summarize).collect()
}

fn summarize(a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    let limits = a.limits();
    AdapterSummary {
        name: info.name,
        backend: info.backend.to_str().to_owned(),
        device_type: device_type_name(info.device_type).to_owned(),
        driver: format!("{} {}", info.driver, info.driver_info).trim().to_owned(),
        max_binding_bytes: limits.max_storage_buffer_binding_size,
        max_buffer_bytes: limits.max_buffer_size,
        timestamps: a.features().contains(wgpu::Features::TIMESTAMP_QUERY),
    }
}

fn ranked_adapters() -> Vec<wgpu::Adapter> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let mut list = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    let rank = |a: &wgpu::Adapter| {
        let info = a.get_info();
        let kind = match info.device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Cpu => 3,
            wgpu::DeviceType::Other => 4,
        };
        (kind, (info.backend == wgpu::Backend::Gl) as u8)
    };
    list.sort_by_key(rank); // stable: ties keep wgpu's order
    list
}

/// Picks an adapter: `choice` (an index into [`adapters`] or a case-insensitive part of a name),
/// else `SAMOPT_ADAPTER` from the environment, else the best one.
fn pick_adapter(choice: Option<&str>) -> Result<wgpu::Adapter> {
    let env = std::env::var("SAMOPT_ADAPTER").ok().filter(|s| !s.is_empty());
    let (choice, source) = match (choice, env.as_deref()) {
        (Some(c), _) => (Some(c), "config->adapter"),
        (None, Some(e)) => (Some(e), "SAMOPT_ADAPTER"),
        (None, None) => (None, ""),
    };
    let mut list = ranked_adapters();
    if list.is_empty() {
        return Err(Error::new(
            ErrorKind::Device,
            "no GPU adapter found (wgpu found no Vulkan, Metal, DX12 or GL device; on Linux without a GPU, \
             install mesa-vulkan-drivers for the lavapipe software driver)",
        ));
    }
    let Some(choice) = choice else { return Ok(list.remove(0)) };
    let names: Vec<String> = list.iter().map(|a| a.get_info().name).collect();
    let index = match choice.trim().parse::<usize>() {
        Ok(i) if i < list.len() => i,
        Ok(i) => {
            return Err(Error::invalid(format!(
                "{source} = {i}: only {} adapters found ({})",
                list.len(),
                names.join(", ")
            )));
        }
        Err(_) => {
            let needle = choice.to_lowercase();
            names.iter().position(|n| n.to_lowercase().contains(&needle)).ok_or_else(|| {
                Error::new(
                    ErrorKind::Device,
                    format!("{source} = {choice:?}: no adapter's name contains it (found: {})", names.join(", ")),
                )
            })?
        }
    };
    Ok(list.swap_remove(index))
}

/// The wgpu device and what the engine needs to know about it.
struct GpuContext {
    device: wgpu::Device,
    queue: wgpu::Queue,
    summary: AdapterSummary,
    limits: wgpu::Limits,
    lost: Arc<AtomicBool>,
}

impl GpuContext {
    fn open(choice: Option<&str>) -> Result<GpuContext> {
        let adapter = pick_adapter(choice)?;
        let summary = summarize(&adapter);
        let wanted = wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("samopt"),
            required_features: adapter.features() & wanted,
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(|e| Error::new(ErrorKind::Device, format!("cannot open {}: {e}", summary.name)))?;
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            flag.store(true, Ordering::SeqCst);
            log::error!("samopt: GPU device lost ({reason:?}): {message}");
        });
        // Errors inside samopt's own calls are caught by error scopes and returned; this catches
        // the rest so that nothing panics inside the host's process.
        device.on_uncaptured_error(Arc::new(|e| log::error!("samopt: wgpu error: {e}")));
        let limits = device.limits();
        Ok(GpuContext { device, queue, summary, limits, lost })
    }

    fn check_alive(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Device, format!("the GPU device ({}) was lost", self.summary.name)));
        }
        Ok(())
    }

    /// Runs `f`, turning any wgpu validation, out-of-memory or internal error it raises into a
    /// device error naming `what`.
    fn checked<R>(&self, what: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.check_alive()?;
        let scopes = [wgpu::ErrorFilter::Validation, wgpu::ErrorFilter::OutOfMemory, wgpu::ErrorFilter::Internal]
            .map(|filter| self.device.push_error_scope(filter));
        let result = f();
        let mut first_error = None;
        for scope in scopes.into_iter().rev() {
            if let Some(e) = pollster::block_on(scope.pop()) {
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            let kind = match e {
                wgpu::Error::OutOfMemory { .. } => ErrorKind::OutOfMemory,
                _ => ErrorKind::Device,
            };
            return Err(Error::new(kind, format!("{what} failed on {}: {e}", self.summary.name)));
        }
        self.check_alive()?;
        result
    }

    fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::new(ErrorKind::Device, format!("waiting for {}: {e}", self.summary.name)))
    }
}

/// A host tensor staged through the device, with the host-side copy of `w` for the restore.
struct Staged {
    host: HostTensor,
    saved: Vec<u64>,
}

struct GpuTensor {
    len: usize,
    dtype: DType,
    /// Bytes of each device buffer: the tensor's bytes rounded up to a whole u32 word.
    bytes: u64,
    param: wgpu::Buffer,
    grad: wgpu::Buffer,
    backup: wgpu::Buffer,
    staged: Option<Staged>,
}

impl GpuTensor {
    fn host_bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
}

/// One window's GPU resources.
struct WindowRes {
    tensor: usize,
    groups: u32,
    slot: u32,
    bind_group: wgpu::BindGroup,
}

/// What the windows need, rebuilt when the registrations change.
struct Prepared {
    windows: Vec<WindowRes>,
    partials: wgpu::Buffer,
    partials_readback: wgpu::Buffer,
    slots: u32,
    _window_uniforms: wgpu::Buffer,
}

/// The `Step` uniform of the shader.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct StepUniform {
    scale: f32,
    eta: f32,
    adaptive: u32,
    sign: u32,
}

/// The `Window` uniform of the shader.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct WindowUniform {
    elems: u32,
    words: u32,
    slot: u32,
    dtype: u32,
}

/// Timestamps of the three passes of the last step, in nanoseconds, when the adapter has
/// timestamp queries and timing was enabled.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PassTimes {
    /// The norm pass.
    pub norm_ns: f64,
    /// The perturbation pass.
    pub perturb_ns: f64,
    /// The restore pass.
    pub restore_ns: f64,
}

struct Timing {
    queries: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    readback: wgpu::Buffer,
    period_ns: f64,
    last: PassTimes,
}

/// The GPU backend.
pub(crate) struct GpuEngine {
    ctx: GpuContext,
    layout: wgpu::BindGroupLayout,
    norm_pipeline: wgpu::ComputePipeline,
    perturb_pipeline: wgpu::ComputePipeline,
    restore_pipeline: wgpu::ComputePipeline,
    step_uniform: wgpu::Buffer,
    readback: wgpu::Buffer,
    tensors: Vec<GpuTensor>,
    prepared: Option<Prepared>,
    /// Window size in u32 words: the storage-binding limit, a multiple of the offset alignment.
    window_words: u64,
    max_groups: u32,
    /// Per slot of the last norm pass: whether its workgroup saw a non-finite input.
    bad_slots: Vec<usize>,
    timing: Option<Timing>,
}

impl GpuEngine {
    /// Opens the adapter `choice` (see [`pick_adapter`]) and builds the pipelines.
    pub fn new(choice: Option<&str>) -> Result<GpuEngine> {
        let ctx = GpuContext::open(choice)?;
        let device = &ctx.device;
        let storage = |binding, read_only| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let uniform = |binding| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("samopt window"),
            entries: &[
                storage(0, false),
                storage(1, true),
                storage(2, false),
                storage(3, false),
                uniform(4),
                uniform(5),
            ],
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("samopt"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let (module, pipelines) = ctx.checked("compiling the SAM shaders", || {
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("sam.wgsl"),
                source: wgpu::ShaderSource::Wgsl(include_str!("shaders/sam.wgsl").into()),
            });
            let pipeline = |entry: &str| {
                device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(entry),
                    layout: Some(&pipeline_layout),
                    module: &module,
                    entry_point: Some(entry),
                    compilation_options: Default::default(),
                    cache: None,
                })
            };
            let pipelines = [pipeline("ascent_norm"), pipeline("perturb"), pipeline("restore")];
            Ok((module, pipelines))
        })?;
        drop(module);
        let [norm_pipeline, perturb_pipeline, restore_pipeline] = pipelines;
        let step_uniform = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("samopt step"),
            size: size_of::<StepUniform>() as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let readback = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("samopt readback"),
            size: READBACK_BYTES,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let align = ctx.limits.min_storage_buffer_offset_alignment as u64;
        let binding = ctx.limits.max_storage_buffer_binding_size.min(ctx.limits.max_buffer_size);
        let window_words = (binding / align * align / 4).max(align / 4);
        // Software drivers run workgroups on a few CPU threads, and barriers are costly there.
        let max_groups = if ctx.summary.device_type == "cpu" { 256 } else { 4096 };
        Ok(GpuEngine {
            ctx,
            layout,
            norm_pipeline,
            perturb_pipeline,
            restore_pipeline,
            step_uniform,
            readback,
            tensors: Vec::new(),
            prepared: None,
            window_words,
            max_groups,
            bad_slots: Vec::new(),
            timing: None,
        })
    }

    /// Starts timing the three passes with timestamp queries; `false` when the adapter cannot.
    pub fn enable_timing(&mut self) -> bool {
        if !self.ctx.device.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
            return false;
        }
        let d = &self.ctx.device;
        let queries = d.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("samopt passes"),
            ty: wgpu::QueryType::Timestamp,
            count: 6,
        });
        let buffer = |usage| {
            d.create_buffer(&wgpu::BufferDescriptor { label: None, size: 48, usage, mapped_at_creation: false })
        };
        let resolve = buffer(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC);
        let readback = buffer(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
        let period_ns = self.ctx.queue.get_timestamp_period() as f64;
        self.timing = Some(Timing { queries, resolve, readback, period_ns, last: PassTimes::default() });
        true
    }

    /// The pass times of the last step, when timing is enabled.
    pub fn pass_times(&mut self) -> Option<PassTimes> {
        let timing = self.timing.as_mut()?;
        let mut raw = [0u64; 6];
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        enc.resolve_query_set(&timing.queries, 0..6, &timing.resolve, 0);
        enc.copy_buffer_to_buffer(&timing.resolve, 0, &timing.readback, 0, 48);
        self.ctx.queue.submit([enc.finish()]);
        map_read(&self.ctx, &timing.readback, 0, 48, |bytes| raw.copy_from_slice(bytemuck::cast_slice(bytes))).ok()?;
        let span = |a: usize| raw[a + 1].saturating_sub(raw[a]) as f64 * timing.period_ns;
        timing.last = PassTimes { norm_ns: span(0), perturb_ns: span(2), restore_ns: span(4) };
        Some(timing.last)
    }

    /// Times a device buffer-to-buffer copy of `bytes` bytes, as the bandwidth reference of the
    /// benchmark: `(nanoseconds, from timestamps)`; wall-clock submit-to-done time when the adapter
    /// cannot write timestamps inside an encoder.
    pub fn time_copy(&self, bytes: u64, reps: usize) -> Result<Vec<(f64, bool)>> {
        let d = &self.ctx.device;
        let bytes = bytes.div_ceil(4) * 4;
        let make = |usage| {
            d.create_buffer(&wgpu::BufferDescriptor { label: None, size: bytes, usage, mapped_at_creation: false })
        };
        let src = make(wgpu::BufferUsages::COPY_SRC);
        let dst = make(wgpu::BufferUsages::COPY_DST);
        let in_encoder = d.features().contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS);
        let timing = self.timing.as_ref().filter(|_| in_encoder);
        let mut out = Vec::new();
        for _ in 0..reps {
            self.ctx.checked("timing a copy", || {
                let start = std::time::Instant::now();
                let mut enc = d.create_command_encoder(&Default::default());
                if let Some(t) = timing {
                    enc.write_timestamp(&t.queries, 0);
                }
                enc.copy_buffer_to_buffer(&src, 0, &dst, 0, bytes);
                if let Some(t) = timing {
                    enc.write_timestamp(&t.queries, 1);
                    enc.resolve_query_set(&t.queries, 0..2, &t.resolve, 0);
                    enc.copy_buffer_to_buffer(&t.resolve, 0, &t.readback, 0, 16);
                }
                self.ctx.queue.submit([enc.finish()]);
                self.ctx.wait()?;
                let wall = start.elapsed().as_nanos() as f64;
                match timing {
                    Some(t) => {
                        let mut raw = [0u64; 2];
                        map_read(&self.ctx, &t.readback, 0, 16, |b| raw.copy_from_slice(bytemuck::cast_slice(b)))?;
                        out.push((raw[1].saturating_sub(raw[0]) as f64 * t.period_ns, true));
                    }
                    None => out.push((wall, false)),
                }
                Ok(())
            })?;
        }
        Ok(out)
    }

    fn add(&mut self, len: usize, dtype: DType, staged: Option<Staged>) -> Result<()> {
        let host_bytes = len as u64 * dtype.size() as u64;
        let bytes = host_bytes.div_ceil(4) * 4;
        let max = self.ctx.limits.max_buffer_size;
        if bytes > max {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "len = {len}: {bytes} bytes of {} exceed the largest buffer of {} ({max} bytes)",
                    dtype.name(),
                    self.ctx.summary.name
                ),
            ));
        }
        let d = &self.ctx.device;
        let tensor = self.ctx.checked("allocating a tensor", || {
            let make = |label, usage| {
                d.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size: bytes,
                    usage,
                    mapped_at_creation: false,
                })
            };
            use wgpu::BufferUsages as U;
            Ok(GpuTensor {
                len,
                dtype,
                bytes,
                param: make("samopt param", U::STORAGE | U::COPY_SRC | U::COPY_DST),
                grad: make("samopt grad", U::STORAGE | U::COPY_SRC | U::COPY_DST),
                backup: make("samopt backup", U::STORAGE | U::COPY_SRC),
                staged,
            })
        })?;
        self.tensors.push(tensor);
        self.prepared = None;
        Ok(())
    }

    /// Cuts every tensor into windows and builds their bind groups and the partial-sum buffers.
    fn prepare(&mut self) -> Result<()> {
        if self.prepared.is_some() {
            return Ok(());
        }
        let d = &self.ctx.device;
        let uniform_align = self.ctx.limits.min_uniform_buffer_offset_alignment as u64;
        let stride = (size_of::<WindowUniform>() as u64).div_ceil(uniform_align) * uniform_align;
        // (tensor, first word, words, elements, groups, slot)
        let mut plan = Vec::new();
        let mut slots = 0u32;
        for (k, t) in self.tensors.iter().enumerate() {
            let words = t.bytes / 4;
            let per_word = if t.dtype == DType::F32 { 1 } else { 2 };
            let mut first = 0;
            while first < words {
                let n = self.window_words.min(words - first);
                let elems = (n * per_word).min(t.len as u64 - first * per_word);
                let groups = n.div_ceil(WORKGROUP).min(self.max_groups as u64) as u32;
                plan.push((k, first, n, elems, groups, slots));
                slots += groups;
                first += n;
            }
        }
        let prepared = self.ctx.checked("preparing the windows", || {
            let uniforms = d.create_buffer(&wgpu::BufferDescriptor {
                label: Some("samopt windows"),
                size: stride * plan.len().max(1) as u64,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let partial_bytes = 8 * slots.max(1) as u64;
            let partials = d.create_buffer(&wgpu::BufferDescriptor {
                label: Some("samopt partials"),
                size: partial_bytes,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let partials_readback = d.create_buffer(&wgpu::BufferDescriptor {
                label: Some("samopt partials readback"),
                size: partial_bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut windows = Vec::with_capacity(plan.len());
            for (i, &(k, first, n, elems, groups, slot)) in plan.iter().enumerate() {
                let t = &self.tensors[k];
                let dtype = match t.dtype {
                    DType::F32 => 0,
                    DType::F16 => 1,
                    DType::BF16 => 2,
                };
                let u = WindowUniform { elems: elems as u32, words: n as u32, slot, dtype };
                self.ctx.queue.write_buffer(&uniforms, i as u64 * stride, bytemuck::bytes_of(&u));
                let range = |buffer| {
                    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer,
                        offset: first * 4,
                        size: wgpu::BufferSize::new(n * 4),
                    })
                };
                let bind_group = d.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("samopt window"),
                    layout: &self.layout,
                    entries: &[
                        wgpu::BindGroupEntry { binding: 0, resource: range(&t.param) },
                        wgpu::BindGroupEntry { binding: 1, resource: range(&t.grad) },
                        wgpu::BindGroupEntry { binding: 2, resource: range(&t.backup) },
                        wgpu::BindGroupEntry { binding: 3, resource: partials.as_entire_binding() },
                        wgpu::BindGroupEntry {
                            binding: 4,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: &uniforms,
                                offset: i as u64 * stride,
                                size: wgpu::BufferSize::new(size_of::<WindowUniform>() as u64),
                            }),
                        },
                        wgpu::BindGroupEntry { binding: 5, resource: self.step_uniform.as_entire_binding() },
                    ],
                });
                windows.push(WindowRes { tensor: k, groups, slot, bind_group });
            }
            Ok(Prepared { windows, partials, partials_readback, slots, _window_uniforms: uniforms })
        })?;
        self.prepared = Some(prepared);
        Ok(())
    }

    /// Records one compute pass running `pipeline` over every window, timestamped as pass `index`.
    fn record_pass(&self, enc: &mut wgpu::CommandEncoder, pipeline: &wgpu::ComputePipeline, index: u32) {
        let prepared = self.prepared.as_ref().expect("prepared before recording");
        let timestamp_writes = self.timing.as_ref().map(|t| wgpu::ComputePassTimestampWrites {
            query_set: &t.queries,
            beginning_of_pass_write_index: Some(2 * index),
            end_of_pass_write_index: Some(2 * index + 1),
        });
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes });
        pass.set_pipeline(pipeline);
        for w in &prepared.windows {
            pass.set_bind_group(0, &w.bind_group, &[]);
            pass.dispatch_workgroups(w.groups, 1, 1);
        }
    }

    fn write_step(&self, u: StepUniform) {
        self.ctx.queue.write_buffer(&self.step_uniform, 0, bytemuck::bytes_of(&u));
    }

    /// Copies `bytes` host bytes into a device buffer, padding the last word with zeros.
    fn upload(&self, buffer: &wgpu::Buffer, bytes: &[u8]) {
        let whole = bytes.len() / 4 * 4;
        if whole > 0 {
            self.ctx.queue.write_buffer(buffer, 0, &bytes[..whole]);
        }
        if whole < bytes.len() {
            let mut tail = [0u8; 4];
            tail[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
            self.ctx.queue.write_buffer(buffer, whole as u64, &tail);
        }
    }

    /// Downloads device buffers into host memory: `(buffer, destination, bytes)`, batched through
    /// the staging buffer.
    ///
    /// # Safety
    /// Every destination must be valid for writes of its byte count.
    unsafe fn download(&self, jobs: &[(&wgpu::Buffer, *mut u8, usize)]) -> Result<()> {
        // (job, offset in the source, offset in the staging buffer, bytes)
        let mut batch: Vec<(usize, u64, u64, usize)> = Vec::new();
        let mut used = 0u64;
        let flush = |batch: &mut Vec<(usize, u64, u64, usize)>, used: &mut u64| -> Result<()> {
            if batch.is_empty() {
                return Ok(());
            }
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            for &(j, src_off, dst_off, n) in batch.iter() {
                enc.copy_buffer_to_buffer(jobs[j].0, src_off, &self.readback, dst_off, (n as u64).div_ceil(4) * 4);
            }
            self.ctx.queue.submit([enc.finish()]);
            map_read(&self.ctx, &self.readback, 0, *used, |staged| {
                for &(j, src_off, dst_off, n) in batch.iter() {
                    let src = &staged[dst_off as usize..dst_off as usize + n];
                    // SAFETY: the caller's contract; src_off + n is inside the destination.
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), jobs[j].1.add(src_off as usize), n) };
                }
            })?;
            batch.clear();
            *used = 0;
            Ok(())
        };
        for (j, &(_, _, bytes)) in jobs.iter().enumerate() {
            let mut done = 0usize;
            while done < bytes {
                if used + 8 > READBACK_BYTES {
                    flush(&mut batch, &mut used)?;
                }
                let n = ((bytes - done) as u64).min(READBACK_BYTES - used) as usize;
                batch.push((j, done as u64, used, n));
                used = (used + n as u64).div_ceil(8) * 8;
                done += n;
            }
        }
        flush(&mut batch, &mut used)
    }

    fn restore_staged_hosts(&mut self) {
        for t in &self.tensors {
            if let Some(s) = &t.staged {
                // SAFETY: the host's registration promise; `saved` holds exactly these bytes.
                unsafe { std::ptr::copy_nonoverlapping(s.saved.as_ptr().cast::<u8>(), s.host.param, t.host_bytes()) };
            }
        }
    }

    fn tensor(&self, id: usize) -> &GpuTensor {
        &self.tensors[id]
    }
}

/// Maps `size` bytes of `buffer` at `offset` for reading, waits, hands them to `f`, unmaps.
fn map_read(ctx: &GpuContext, buffer: &wgpu::Buffer, offset: u64, size: u64, f: impl FnOnce(&[u8])) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    buffer.map_async(wgpu::MapMode::Read, offset..offset + size, move |r| {
        let _ = tx.send(r);
    });
    ctx.wait()?;
    rx.recv()
        .map_err(|_| Error::new(ErrorKind::Device, "a buffer mapping never completed"))?
        .map_err(|e| Error::new(ErrorKind::Device, format!("mapping a buffer for reading: {e}")))?;
    {
        let view = buffer
            .get_mapped_range(offset..offset + size)
            .map_err(|e| Error::new(ErrorKind::Device, format!("reading a mapped buffer: {e}")))?;
        f(&view);
    }
    buffer.unmap();
    Ok(())
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
        // wgpu zero-initialises new buffers.
        self.add(len, dtype, None)
    }

    fn owned_host_ptrs(&self, _tensor: usize) -> Option<(*mut u8, *mut u8)> {
        None
    }

    fn write_owned(&mut self, tensor: usize, part: Part, bytes: &[u8]) -> Result<()> {
        let t = self.tensor(tensor);
        let buffer = match part {
            Part::Param => &t.param,
            Part::Grad => &t.grad,
        };
        self.ctx.checked("writing a tensor", || {
            self.upload(buffer, bytes);
            self.ctx.queue.submit([]);
            Ok(())
        })
    }

    fn read_owned(&mut self, tensor: usize, part: Part, out: &mut [u8]) -> Result<()> {
        let t = self.tensor(tensor);
        let buffer = match part {
            Part::Param => &t.param,
            Part::Grad => &t.grad,
        };
        self.ctx.checked("reading a tensor", || {
            // SAFETY: `out` is a live slice of exactly this many bytes.
            unsafe { self.download(&[(buffer, out.as_mut_ptr(), out.len())]) }
        })
    }

    fn ascent_norm(&mut self, config: &Config) -> Result<AscentNorm> {
        self.prepare()?;
        self.write_step(StepUniform { scale: 0.0, eta: config.eta as f32, adaptive: config.adaptive as u32, sign: 0 });
        let prepared = self.prepared.as_ref().expect("prepared above");
        let slots = prepared.slots as usize;
        let mut partials = vec![[0u32; 2]; slots];
        self.ctx.checked("the norm pass", || {
            for t in &self.tensors {
                if let Some(s) = &t.staged {
                    let n = t.host_bytes();
                    // SAFETY: the host's registration promise.
                    let (w, g) = unsafe {
                        (std::slice::from_raw_parts(s.host.param, n), std::slice::from_raw_parts(s.host.grad, n))
                    };
                    self.upload(&t.param, w);
                    self.upload(&t.grad, g);
                }
            }
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            self.record_pass(&mut enc, &self.norm_pipeline, 0);
            enc.copy_buffer_to_buffer(&prepared.partials, 0, &prepared.partials_readback, 0, 8 * slots as u64);
            self.ctx.queue.submit([enc.finish()]);
            map_read(&self.ctx, &prepared.partials_readback, 0, 8 * slots as u64, |b| {
                partials.copy_from_slice(bytemuck::cast_slice(b))
            })
        })?;
        // Fixed order over fixed slots: the same bits for the same inputs on the same adapter.
        let mut sum_sq = 0.0f64;
        self.bad_slots.clear();
        for (i, &[bits, bad]) in partials.iter().enumerate() {
            sum_sq += f32::from_bits(bits) as f64;
            if bad != 0 {
                self.bad_slots.push(i);
            }
        }
        if !self.bad_slots.is_empty() {
            sum_sq = f64::NAN;
        }
        Ok(AscentNorm { sum_sq })
    }

    fn perturb(&mut self, p: &Perturbation) -> Result<()> {
        self.write_step(StepUniform { scale: p.scale, eta: p.eta, adaptive: p.adaptive as u32, sign: p.sign as u32 });
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
            self.record_pass(&mut enc, &self.perturb_pipeline, 1);
            self.ctx.queue.submit([enc.finish()]);
            let jobs: Vec<(&wgpu::Buffer, *mut u8, usize)> = self
                .tensors
                .iter()
                .filter_map(|t| t.staged.as_ref().map(|s| (&t.param, s.host.param, t.host_bytes())))
                .collect();
            if jobs.is_empty() {
                return self.ctx.wait();
            }
            // SAFETY: the host's registration promise.
            unsafe { self.download(&jobs) }
        });
        if result.is_err() {
            self.restore_staged_hosts();
        }
        result
    }

    fn restore(&mut self) -> Result<()> {
        self.restore_staged_hosts();
        if self.tensors.iter().all(|t| t.staged.is_some()) && self.timing.is_none() {
            return Ok(());
        }
        self.ctx.checked("the restore pass", || {
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            self.record_pass(&mut enc, &self.restore_pipeline, 2);
            self.ctx.queue.submit([enc.finish()]);
            self.ctx.wait()
        })
    }

    fn find_non_finite(&self, adaptive: bool) -> Option<(usize, usize)> {
        let prepared = self.prepared.as_ref()?;
        let mut candidates: Vec<usize> = self
            .bad_slots
            .iter()
            .filter_map(|&s| prepared.windows.iter().rfind(|w| w.slot as usize <= s))
            .map(|w| w.tensor)
            .collect();
        candidates.dedup();
        for k in candidates {
            let t = &self.tensors[k];
            let found = match &t.staged {
                // SAFETY: the registered host buffers.
                Some(s) => unsafe { first_non_finite(&s.host, adaptive) },
                None => {
                    let n = t.host_bytes();
                    let (mut w, mut g) = (vec![0u64; n.div_ceil(8)], vec![0u64; n.div_ceil(8)]);
                    let (wp, gp) = (w.as_mut_ptr().cast::<u8>(), g.as_mut_ptr().cast::<u8>());
                    // SAFETY: both vectors hold at least n bytes.
                    unsafe { self.download(&[(&t.param, wp, n), (&t.grad, gp, n)]) }.ok()?;
                    let host = HostTensor { param: wp, grad: gp, len: t.len, dtype: t.dtype };
                    // SAFETY: the copies are valid for reads of the tensor.
                    unsafe { first_non_finite(&host, adaptive) }
                }
            };
            if let Some(e) = found {
                return Some((k, e));
            }
        }
        None
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
