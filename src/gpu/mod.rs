//! The wgpu compute engine: the norm, perturbation and restore passes as WGSL compute shaders
//! (`shaders/sam.wgsl`).
//!
//! Tensors are packed, per dtype, into arenas: three device buffers (parameters, gradients,
//! backups) holding the tensors end to end, each padded with zeros to 16 bytes. An arena is cut
//! into windows of at most one storage binding, and a pass is one dispatch per window, so a model
//! of thousands of tensors costs a handful of dispatches, as Apex's multi-tensor kernels do.
//! Packing, bind groups and pipelines are built at the first step after the registrations change
//! and reused at every step after it: a step compiles nothing and allocates nothing.
//!
//! - Norm: each workgroup writes an f32 partial sum of `(T_w g)^2` and a non-finite flag (a bit
//!   test on the inputs, which a driver that assumes finite math cannot optimise away); the host
//!   adds the partials in f64 in a fixed order, so the same inputs give the same bits on the same
//!   adapter. Only when a flag is raised does a second pass find the first bad element.
//! - Perturbation: `backup <- w; w <- w + e(w)`, 16 bytes per invocation, grid-stride loops over a
//!   fixed grid.
//! - Restore: `w <- backup`.
//!
//! Host buffers registered under the GPU backend are staged: the first step uploads `w` and `g`,
//! runs the passes and downloads the perturbed `w`; the bits of `w` are also kept on the host, so
//! the restore is a host copy and a device failure can always put the host's weights back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::backend::{AscentNorm, HostTensor, Part, Passes, SecondNorm};
use crate::config::{BaseOptimizer, Config, Norm};
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use crate::math::{Perturbation, TensorStep, UpdateStep};

pub mod vulkan;

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

    /// The host's own device and queue (a Rust engine on wgpu). samopt installs no callbacks on
    /// them (the host keeps its own); its errors come back through error scopes.
    fn existing(device: wgpu::Device, queue: wgpu::Queue, info: Option<wgpu::AdapterInfo>) -> GpuContext {
        let limits = device.limits();
        let summary = AdapterSummary {
            name: info.as_ref().map_or_else(|| "the host's wgpu device".to_owned(), |i| i.name.clone()),
            backend: info.as_ref().map_or_else(|| "?".to_owned(), |i| i.backend.to_str().to_owned()),
            device_type: info.as_ref().map_or("other", |i| device_type_name(i.device_type)).to_owned(),
            driver: info
                .as_ref()
                .map_or_else(String::new, |i| format!("{} {}", i.driver, i.driver_info).trim().to_owned()),
            max_binding_bytes: limits.max_storage_buffer_binding_size,
            max_buffer_bytes: limits.max_buffer_size,
            timestamps: device.features().contains(wgpu::Features::TIMESTAMP_QUERY),
        };
        GpuContext { device, queue, summary, limits, lost: Arc::new(AtomicBool::new(false)) }
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

/// Where a tensor's device data lives.
enum Home {
    /// An optimizer-allocated tensor not packed yet: buffers of its own.
    Own { param: wgpu::Buffer, grad: wgpu::Buffer },
    /// A staged host tensor not packed yet (its data is uploaded at every step anyway).
    Unplaced,
    /// In arena `arena`, from u32 word `offset`.
    Packed { arena: usize, offset: u64 },
}

/// A tensor in the host's own device buffers, registered with
/// [`Optimizer::register_wgpu`](crate::Optimizer::register_wgpu): the passes run on them in place.
#[derive(Clone, Debug)]
pub struct External {
    /// The parameter's buffer.
    pub param: wgpu::Buffer,
    /// Bytes from the start of `param` to the tensor.
    pub param_offset: u64,
    /// The gradient's buffer.
    pub grad: wgpu::Buffer,
    /// Bytes from the start of `grad` to the tensor.
    pub grad_offset: u64,
}

struct GpuTensor {
    len: usize,
    dtype: DType,
    /// u32 words on the device: the tensor's bytes rounded up to 16.
    words: u64,
    home: Home,
    staged: Option<Staged>,
    /// Tensors of one cohort share every per-tensor scalar; an arena holds one cohort.
    cohort: (u32, u64),
    /// The host's buffers, for a tensor registered in place: it gets an arena of its own.
    external: Option<External>,
}

impl GpuTensor {
    fn host_bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
}

/// Tensors of one dtype, end to end.
struct Arena {
    dtype: DType,
    param: wgpu::Buffer,
    /// Bytes before the arena's first word in `param` (non-zero for a host buffer).
    param_offset: u64,
    grad: wgpu::Buffer,
    grad_offset: u64,
    backup: wgpu::Buffer,
    /// GSAM: the first gradient, saved by the perturbation pass.
    first_grad: Option<wgpu::Buffer>,
    /// The base optimizer's f32 state: momentum buffer or Adam's first moment, second moment.
    state_m: Option<wgpu::Buffer>,
    state_v: Option<wgpu::Buffer>,
    /// `(first word, tensor)` of every member, in order.
    members: Vec<(u64, usize)>,
}

impl Arena {
    fn per_word(&self) -> u64 {
        if self.dtype == DType::F32 { 1 } else { 2 }
    }
}

/// One window's GPU resources.
struct WindowRes {
    arena: usize,
    first_word: u64,
    quads: u32,
    groups: u32,
    slot: u32,
    bind_group: wgpu::BindGroup,
}

/// What the windows need, rebuilt when the registrations change.
struct Prepared {
    /// Bytes between two windows' uniforms.
    stride: u64,
    windows: Vec<WindowRes>,
    partials: wgpu::Buffer,
    partials_readback: wgpu::Buffer,
    first_bad: wgpu::Buffer,
    first_bad_readback: wgpu::Buffer,
    slots: u32,
    window_uniforms: wgpu::Buffer,
}

/// The `Step` uniform of the shader.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct StepUniform {
    scale: f32,
    eta: f32,
    a: f32,
    b: f32,
    nd: f32,
    nb: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    adam_eps: f32,
    pad: u32,
}

/// The `Window` uniform of the shader.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct WindowUniform {
    quads: u32,
    slot: u32,
    index: u32,
    pad0: u32,
    lr: f32,
    weight_decay: f32,
    keep: f32,
    take: f32,
    decay: f32,
    step_size: f32,
    bias2_sqrt: f32,
    pad1: u32,
}

/// The GPU time of each pass of the last step, in nanoseconds, from timestamp queries.
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
}

/// The shader's entry points, each specialised per dtype (`restore` moves words, whatever they
/// hold).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Entry {
    Norm = 0,
    Perturb = 1,
    Restore = 2,
    Locate = 3,
    SecondReduce = 4,
    Update = 5,
}

const ENTRIES: [Entry; 6] =
    [Entry::Norm, Entry::Perturb, Entry::Restore, Entry::Locate, Entry::SecondReduce, Entry::Update];
const ENTRY_NAMES: [&str; 6] = ["ascent_norm", "perturb", "restore", "locate_non_finite", "second_reduce", "update"];

fn dtype_index(d: DType) -> usize {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

/// The GPU backend.
pub(crate) struct GpuEngine {
    ctx: GpuContext,
    adaptive: bool,
    sign: bool,
    base: BaseOptimizer,
    momentum: bool,
    gsam: bool,
    module: wgpu::ShaderModule,
    layout: wgpu::BindGroupLayout,
    pipeline_layout: wgpu::PipelineLayout,
    /// `[entry][dtype]`, compiled when a dtype first appears.
    pipelines: [[Option<wgpu::ComputePipeline>; 3]; 6],
    step_uniform: wgpu::Buffer,
    /// The host copy of the `Step` uniform: each pass changes its own fields.
    step: StepUniform,
    /// Bound where a pipeline's optional buffer (GSAM's copy, the state) does not exist.
    dummy: wgpu::Buffer,
    readback: wgpu::Buffer,
    tensors: Vec<GpuTensor>,
    arenas: Vec<Arena>,
    prepared: Option<Prepared>,
    /// Largest arena, in u32 words (the device's largest buffer).
    arena_words: u64,
    /// Window size in u32 words: the storage-binding limit, a multiple of the offset alignment.
    window_words: u64,
    max_groups: u32,
    /// Windows whose workgroups saw a non-finite input in the last norm pass.
    bad_windows: Vec<usize>,
    /// The window uniforms of the last update, reused every step.
    window_uniforms: Vec<WindowUniform>,
    /// The wgpu instance and adapter around a host's Vulkan device, kept as long as the device.
    keep_alive: Option<(wgpu::Instance, wgpu::Adapter)>,
    timing: Option<Timing>,
}

impl GpuEngine {
    /// Opens the adapter `config.adapter` (see [`pick_adapter`]) and prepares the shader.
    pub fn new(config: &Config) -> Result<GpuEngine> {
        GpuEngine::with_context(GpuContext::open(config.adapter.as_deref())?, config)
    }

    /// An engine on the host's own wgpu device and queue.
    pub fn on_device(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: Option<wgpu::AdapterInfo>,
        config: &Config,
    ) -> Result<GpuEngine> {
        GpuEngine::with_context(GpuContext::existing(device, queue, info), config)
    }

    fn with_context(ctx: GpuContext, config: &Config) -> Result<GpuEngine> {
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
        let (module, layout, pipeline_layout) = ctx.checked("compiling the SAM shaders", || {
            let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some("samopt window"),
                entries: &[
                    storage(0, false),
                    storage(1, true),
                    storage(2, false),
                    storage(3, false),
                    uniform(4),
                    uniform(5),
                    storage(6, false),
                    storage(7, false),
                    storage(8, false),
                    storage(9, false),
                ],
            });
            let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("samopt"),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("sam.wgsl"),
                source: wgpu::ShaderSource::Wgsl(include_str!("shaders/sam.wgsl").into()),
            });
            Ok((module, layout, pipeline_layout))
        })?;
        let step_uniform = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("samopt step"),
            size: size_of::<StepUniform>() as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("samopt unused binding"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let readback = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("samopt readback"),
            size: READBACK_BYTES,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let align = (ctx.limits.min_storage_buffer_offset_alignment as u64).max(16);
        let binding = ctx.limits.max_storage_buffer_binding_size.min(ctx.limits.max_buffer_size);
        let window_words = (binding / align * align / 4).max(align / 4);
        let arena_words = (ctx.limits.max_buffer_size / align * align / 4).max(window_words);
        // Software drivers run workgroups on a few CPU threads, and barriers are costly there.
        let max_groups = if ctx.summary.device_type == "cpu" { 256 } else { 8192 };
        Ok(GpuEngine {
            ctx,
            adaptive: config.adaptive,
            sign: config.norm == Norm::LInf,
            base: config.base,
            momentum: config.base == BaseOptimizer::Sgd && config.momentum != 0.0,
            gsam: config.gsam_alpha.is_some(),
            step: bytemuck::Zeroable::zeroed(),
            dummy,
            window_uniforms: Vec::new(),
            keep_alive: None,
            module,
            layout,
            pipeline_layout,
            pipelines: Default::default(),
            step_uniform,
            readback,
            tensors: Vec::new(),
            arenas: Vec::new(),
            prepared: None,
            arena_words,
            window_words,
            max_groups,
            bad_windows: Vec::new(),
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
        self.timing = Some(Timing { queries, resolve, readback, period_ns });
        true
    }

    /// The pass times of the last step, when timing is enabled.
    pub fn pass_times(&mut self) -> Option<PassTimes> {
        let timing = self.timing.as_ref()?;
        let mut raw = [0u64; 6];
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        enc.resolve_query_set(&timing.queries, 0..6, &timing.resolve, 0);
        enc.copy_buffer_to_buffer(&timing.resolve, 0, &timing.readback, 0, 48);
        self.ctx.queue.submit([enc.finish()]);
        map_read(&self.ctx, &timing.readback, 0, 48, |bytes| raw.copy_from_slice(bytemuck::cast_slice(bytes))).ok()?;
        let span = |a: usize| raw[a + 1].saturating_sub(raw[a]) as f64 * timing.period_ns;
        Some(PassTimes { norm_ns: span(0), perturb_ns: span(2), restore_ns: span(4) })
    }

    /// Times a device buffer-to-buffer copy of `bytes` bytes, the bandwidth reference of the
    /// benchmark: `(nanoseconds, from timestamps)` per repetition; wall-clock submit-to-done time
    /// when the adapter cannot write timestamps inside an encoder or timing is off.
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
        Ok(())
    }

    /// Registers a tensor in the host's own device buffers; the passes run on them in place.
    /// Checked here: usage, alignment, sizes; the device is the caller's promise.
    pub fn add_external(&mut self, e: External, len: usize, dtype: DType) -> Result<()> {
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
        for (k, t) in self.tensors.iter().enumerate() {
            if let Some(o) = &t.external {
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
        Ok(())
    }

    /// Where a part of a tensor lives: buffer and byte offset.
    fn location<'a>(&'a self, t: &'a GpuTensor, part: Part) -> (&'a wgpu::Buffer, u64) {
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
    fn pack(&mut self) -> Result<()> {
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
                    first_grad: self.gsam.then(|| make("samopt first grads", U::STORAGE)),
                    state_m: has_m.then(|| state("samopt state m")),
                    state_v: has_v.then(|| state("samopt state v")),
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
                        for (src, dst) in [(&old.state_m, &arena.state_m), (&old.state_v, &arena.state_v)] {
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

    /// f32 state values per element: 0, 1 (momentum) or 2 (Adam).
    fn state_per_elem(&self) -> usize {
        match self.base {
            BaseOptimizer::AdamW => 2,
            BaseOptimizer::Sgd if self.momentum => 1,
            _ => 0,
        }
    }

    /// Window size in words for an arena of `dtype`: one storage binding, or half of one for a
    /// half-precision arena whose f32 state takes twice the bytes of its words.
    fn window_words_for(&self, dtype: DType) -> u64 {
        let has_state = self.momentum || self.base == BaseOptimizer::AdamW;
        if dtype != DType::F32 && has_state { (self.window_words / 2 / 64 * 64).max(64) } else { self.window_words }
    }

    fn pipeline(&self, entry: Entry, dtype: DType) -> &wgpu::ComputePipeline {
        let d = if entry == Entry::Restore { 0 } else { dtype_index(dtype) };
        self.pipelines[entry as usize][d].as_ref().expect("compiled in prepare")
    }

    /// Compiles the pipelines a dtype needs, once.
    fn compile(&mut self, dtype: DType) -> Result<()> {
        let d = dtype_index(dtype);
        for entry in ENTRIES {
            if self.base == BaseOptimizer::None && matches!(entry, Entry::SecondReduce | Entry::Update) {
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
    fn prepare(&mut self) -> Result<()> {
        if self.prepared.is_some() {
            return Ok(());
        }
        self.pack()?;
        for dtype in self.arenas.iter().map(|a| a.dtype).collect::<Vec<_>>() {
            self.compile(dtype)?;
        }
        let d = &self.ctx.device;
        let uniform_align = self.ctx.limits.min_uniform_buffer_offset_alignment as u64;
        let stride = (size_of::<WindowUniform>() as u64).div_ceil(uniform_align) * uniform_align;
        // (arena, first word, words, groups, slot)
        let mut plan = Vec::new();
        let mut slots = 0u32;
        for (a, arena) in self.arenas.iter().enumerate() {
            let words = arena.members.last().map_or(0, |&(o, k)| o + self.tensors[k].words);
            let mut first = 0;
            let window_words = self.window_words_for(arena.dtype);
            while first < words {
                let n = window_words.min(words - first);
                let groups = (n / 4).div_ceil(WORKGROUP).clamp(1, self.max_groups as u64) as u32;
                plan.push((a, first, n, groups, slots));
                slots += groups;
                first += n;
            }
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
            for (i, &(a, first, n, groups, slot)) in plan.iter().enumerate() {
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
                let bind_group = d.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("samopt window"),
                    layout: &self.layout,
                    entries: &[
                        wgpu::BindGroupEntry { binding: 0, resource: range_at(&arena.param, arena.param_offset) },
                        wgpu::BindGroupEntry { binding: 1, resource: range_at(&arena.grad, arena.grad_offset) },
                        wgpu::BindGroupEntry { binding: 2, resource: range(&arena.backup) },
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
                });
                windows.push(WindowRes {
                    arena: a,
                    first_word: first,
                    quads: (n / 4) as u32,
                    groups,
                    slot,
                    bind_group,
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
    fn record_pass(
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
            pass.set_bind_group(0, &w.bind_group, &[]);
            pass.dispatch_workgroups(w.groups, 1, 1);
        }
    }

    fn all_windows(&self) -> std::ops::Range<usize> {
        0..self.prepared.as_ref().map_or(0, |p| p.windows.len())
    }

    /// Copies host bytes to `buffer` at `offset`, padding the last word with zeros.
    fn upload(&self, buffer: &wgpu::Buffer, offset: u64, bytes: &[u8]) {
        let whole = bytes.len() / 4 * 4;
        if whole > 0 {
            self.ctx.queue.write_buffer(buffer, offset, &bytes[..whole]);
        }
        if whole < bytes.len() {
            let mut tail = [0u8; 4];
            tail[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
            self.ctx.queue.write_buffer(buffer, offset + whole as u64, &tail);
        }
    }

    /// Downloads device bytes into host memory, batched through the staging buffer: jobs of
    /// `(buffer, byte offset, destination, bytes)`.
    ///
    /// # Safety
    /// Every destination must be valid for writes of its byte count.
    unsafe fn download(&self, jobs: &[(&wgpu::Buffer, u64, *mut u8, usize)]) -> Result<()> {
        // (job, offset within the job, offset in the staging buffer, bytes)
        let mut batch: Vec<(usize, u64, u64, usize)> = Vec::new();
        let mut used = 0u64;
        let flush = |batch: &mut Vec<(usize, u64, u64, usize)>, used: &mut u64| -> Result<()> {
            if batch.is_empty() {
                return Ok(());
            }
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            for &(j, done, at, n) in batch.iter() {
                let (src, src_offset, _, _) = jobs[j];
                enc.copy_buffer_to_buffer(src, src_offset + done, &self.readback, at, (n as u64).div_ceil(4) * 4);
            }
            self.ctx.queue.submit([enc.finish()]);
            map_read(&self.ctx, &self.readback, 0, *used, |staged| {
                for &(j, done, at, n) in batch.iter() {
                    let src = &staged[at as usize..at as usize + n];
                    // SAFETY: the caller's contract; `done + n` is inside the destination.
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), jobs[j].2.add(done as usize), n) };
                }
            })?;
            batch.clear();
            *used = 0;
            Ok(())
        };
        for (j, &(_, _, _, bytes)) in jobs.iter().enumerate() {
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

    /// After a pass that moved the weights: the staged tensors' new weights back into the host's
    /// buffers (or, with none staged, just the wait for the pass).
    fn download_staged_params(&self) -> Result<()> {
        let jobs: Vec<(&wgpu::Buffer, u64, *mut u8, usize)> = self
            .tensors
            .iter()
            .filter_map(|t| {
                let s = t.staged.as_ref()?;
                let (buffer, offset) = self.location(t, Part::Param);
                Some((buffer, offset, s.host.param, t.host_bytes()))
            })
            .collect();
        if jobs.is_empty() {
            return self.ctx.wait();
        }
        // SAFETY: the host's registration promise: its parameter buffers are valid for writes.
        unsafe { self.download(&jobs) }
    }

    fn restore_staged_hosts(&self) {
        for t in &self.tensors {
            if let Some(s) = &t.staged {
                // SAFETY: the host's registration promise; `saved` holds exactly these bytes.
                unsafe { std::ptr::copy_nonoverlapping(s.saved.as_ptr().cast::<u8>(), s.host.param, t.host_bytes()) };
            }
        }
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
        // wgpu zero-initialises new buffers, padding included.
        self.add(len, dtype, None)
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

    fn ascent_norm(&mut self, config: &Config) -> Result<AscentNorm> {
        self.prepare()?;
        self.step.eta = config.eta as f32;
        self.ctx.queue.write_buffer(&self.step_uniform, 0, bytemuck::bytes_of(&self.step));
        let prepared = self.prepared.as_ref().expect("prepared above");
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
                    for &[bits, _, flag, _] in &partials[w.slot as usize..(w.slot + w.groups) as usize] {
                        sum_sq += f32::from_bits(bits) as f64;
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
                for &[sq, d, flag, _] in bytemuck::cast_slice::<u8, [u32; 4]>(b) {
                    sum_sq += f32::from_bits(sq) as f64;
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
                quads: 0,
                slot: w.slot,
                index: i as u32,
                pad0: 0,
                lr: t.lr,
                weight_decay: t.weight_decay,
                keep: t.keep,
                take: t.take,
                decay: t.decay,
                step_size: t.step_size,
                bias2_sqrt: t.bias2_sqrt,
                pad1: 0,
            });
        }
        let result = self.ctx.checked("the update pass", || {
            for (i, (u, w)) in uniforms.iter_mut().zip(&prepared.windows).enumerate() {
                u.quads = w.quads;
                self.ctx.queue.write_buffer(
                    &prepared.window_uniforms,
                    i as u64 * prepared.stride,
                    bytemuck::bytes_of(u),
                );
            }
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            self.record_pass(&mut enc, Entry::Update, self.all_windows(), Some(2));
            self.ctx.queue.submit([enc.finish()]);
            self.download_staged_params()
        });
        self.window_uniforms = uniforms;
        if result.is_err() {
            // The host's weights go back to w; the device state may have moved.
            self.restore_staged_hosts();
        }
        result
    }

    fn accumulate(&mut self, _first: bool) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "per-shard accumulation runs on the CPU backend only in this version; the GPU engine has no \
             accumulation pass yet",
        ))
    }

    fn write_mean(&mut self, _scale: f32) -> Result<()> {
        Err(Error::new(ErrorKind::Unsupported, "per-shard accumulation runs on the CPU backend only"))
    }

    fn export_state(&mut self, out: &mut [f32]) -> Result<()> {
        let per_tensor = self.state_per_elem();
        if per_tensor == 0 {
            return Ok(());
        }
        out.fill(0.0); // tensors never packed have never been updated: zero state
        let mut jobs: Vec<(&wgpu::Buffer, u64, *mut u8, usize)> = Vec::new();
        let mut at = 0usize;
        for t in &self.tensors {
            if let Home::Packed { arena, offset } = t.home {
                let a = &self.arenas[arena];
                for (k, buffer) in [&a.state_m, &a.state_v].into_iter().take(per_tensor).enumerate() {
                    let buffer = buffer.as_ref().expect("the arena holds the configured state");
                    let dst = out[at + k * t.len..at + (k + 1) * t.len].as_mut_ptr().cast::<u8>();
                    jobs.push((buffer, offset * a.per_word() * 4, dst, t.len * 4));
                }
            }
            at += per_tensor * t.len;
        }
        self.ctx.checked("reading the optimizer state", || {
            // SAFETY: every destination is a distinct range of `out` of exactly that many bytes.
            unsafe { self.download(&jobs) }
        })
    }

    fn import_state(&mut self, data: &[f32]) -> Result<()> {
        let per_tensor = self.state_per_elem();
        if per_tensor == 0 {
            return Ok(());
        }
        self.prepare()?; // every tensor gets its place in an arena
        self.ctx.checked("writing the optimizer state", || {
            let mut at = 0usize;
            for t in &self.tensors {
                let Home::Packed { arena, offset } = t.home else { unreachable!("packed by prepare") };
                let a = &self.arenas[arena];
                for (k, buffer) in [&a.state_m, &a.state_v].into_iter().take(per_tensor).enumerate() {
                    let buffer = buffer.as_ref().expect("the arena holds the configured state");
                    let values = &data[at + k * t.len..at + (k + 1) * t.len];
                    self.upload(buffer, offset * a.per_word() * 4, bytemuck::cast_slice(values));
                }
                at += per_tensor * t.len;
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

    fn set_cohort(&mut self, tensor: usize, cohort: (u32, u64)) {
        if self.tensors[tensor].cohort != cohort {
            self.tensors[tensor].cohort = cohort;
            self.prepared = None;
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
