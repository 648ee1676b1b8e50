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
//! - Norm: each workgroup writes a scaled partial sum of `(T_w g)^2` (`q * 2^(2k)`, as BLAS nrm2
//!   scales, so no finite input overflows) and a non-finite flag (a bit
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
//!
//! Files: `adapter` (discovery and choice), `context` (device, error scopes, mapped reads), `arena`
//! (registration, packing), `pipelines` (entry points, uniforms, windows and bind groups),
//! `passes` (the engine's `Passes` implementation), `staging` (host buffers),
//! `timing` (timestamp queries), `vulkan` (the host's own Vulkan device).

use crate::config::{BaseOptimizer, Config, Norm};
use crate::error::Result;

mod adapter;
mod arena;
mod context;
mod passes;
mod pipelines;
mod staging;
mod timing;
pub mod vulkan;

pub use crate::backend::{AdapterSummary, External, PassTimes};
pub use adapter::adapters;
pub(crate) use adapter::check_choice;
use arena::{Arena, GpuTensor};
use context::GpuContext;
use pipelines::{Prepared, StepUniform, WindowUniform};
use staging::READBACK_BYTES;
use timing::Timing;

/// The GPU backend.
pub(crate) struct GpuEngine {
    ctx: GpuContext,
    adaptive: bool,
    sign: bool,
    base: BaseOptimizer,
    momentum: bool,
    gsam: bool,
    /// GSAM or LookSAM: the perturbation keeps the first gradient.
    keep_first: bool,
    /// LookSAM: each arena holds `g_v`.
    look: bool,
    /// Loss scaling: the second gradient is reduced (its overflow check) even without a base.
    scaled: bool,
    /// f32 master weights for the half-precision arenas.
    master: bool,
    /// f32 state values per element, by dtype index (`Config::state_per_element`).
    state_per_dtype: [usize; 3],
    /// The preconditioned perturbation, and per tensor `sqrt(1 - beta2^t)` (0: plain SAM).
    precond: bool,
    precond_bias: Vec<f32>,
    module: wgpu::ShaderModule,
    layout: wgpu::BindGroupLayout,
    pipeline_layout: wgpu::PipelineLayout,
    /// `[entry][dtype]`, compiled when a dtype first appears.
    pipelines: [[Option<wgpu::ComputePipeline>; 3]; 9],
    step_uniform: wgpu::Buffer,
    /// The host copy of the `Step` uniform: each pass changes its own fields.
    step: StepUniform,
    /// Bound where a pipeline's optional buffer (GSAM's copy, the state) does not exist.
    dummy: wgpu::Buffer,
    readback: wgpu::Buffer,
    tensors: Vec<GpuTensor>,
    arenas: Vec<Arena>,
    prepared: Option<Prepared>,
    /// Whether the arenas hold every tensor as registered (a registration or a group change
    /// repacks; a rebinding only rebuilds the windows).
    packed: bool,
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
    /// The host's `VkBuffer` ranges registered so far, `(tensor, handle, start, end)`: one `VkBuffer`
    /// registered twice gets two wgpu wrappers, which wgpu cannot tell apart, so samopt checks
    /// their overlaps itself.
    vulkan_ranges: Vec<(usize, u64, u64, u64)>,
    timing: Option<Timing>,
}

impl GpuEngine {
    /// Opens the adapter `config.adapter` (see [`pick_adapter`]) and prepares the shader.
    pub fn new(config: &Config) -> Result<GpuEngine> {
        GpuEngine::with_context(GpuContext::open(config.adapter.as_deref(), false)?, config)
    }

    /// As [`new`](Self::new), for backend AUTO: fails rather than open a software adapter that the
    /// user did not choose by name (the CPU engine is faster than a rasterizer on the CPU).
    pub fn new_auto(config: &Config) -> Result<GpuEngine> {
        GpuEngine::with_context(GpuContext::open(config.adapter.as_deref(), true)?, config)
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
                    // Read-write although the passes only read it: a framework's memory pool may
                    // place a parameter and its gradient in one buffer, and wgpu refuses a buffer
                    // bound read-only and read-write in one dispatch, but not read-write twice
                    // (the ranges are disjoint, checked at registration).
                    storage(1, false),
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
            keep_first: config.keeps_first_grad(),
            look: config.looksam(),
            scaled: config.loss_scale.is_some(),
            master: config.master_weights,
            state_per_dtype: [crate::DType::F32, crate::DType::F16, crate::DType::BF16]
                .map(|d| config.state_per_element(d)),
            precond: config.preconditioned,
            precond_bias: Vec::new(),
            step: bytemuck::Zeroable::zeroed(),
            dummy,
            window_uniforms: Vec::new(),
            keep_alive: None,
            vulkan_ranges: Vec::new(),
            module,
            layout,
            pipeline_layout,
            pipelines: Default::default(),
            step_uniform,
            readback,
            tensors: Vec::new(),
            arenas: Vec::new(),
            prepared: None,
            packed: false,
            arena_words,
            window_words,
            max_groups,
            bad_windows: Vec::new(),
            timing: None,
        })
    }
}
