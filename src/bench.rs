//! Measurements behind `cargo bench` and `samopt bench`: the SAM passes beside a plain copy of the
//! same bytes, timed alternately in one run, so the ratio holds on a shared, noisy machine.
//!
//! Bytes counted per element (`s` the dtype's size, state in f32):
//!
//! ```text
//! norm:      read g                              s   (+s under ASAM: read w)
//! perturb:   read w, g; write w, backup          4s
//! restore:   read backup; write w                2s  (no base optimizer)
//! reduce:    read g'                             s   (base optimizer)
//! update:    read backup, g'; write w; state     3s + 8 (SGD with momentum), 3s + 16 (AdamW)
//!            master weights (f16/bf16)           + 8 (read and write the f32 copy)
//! ```
//!
//! Loss scaling moves no extra byte: the unscale is folded into the update's coefficients, and
//! without a base optimizer the second step's reduction (its overflow check) reads g' once (+s).
//!
//! The reference copy moves `2s` bytes per element (read and write the parameters' bytes).

use std::time::Instant;

use rayon::prelude::*;

use crate::config::{Backend, BaseOptimizer, Config};
use crate::dtype::DType;
use crate::engine::Optimizer;
use crate::error::Result;
use crate::gpu::PassTimes;

/// One measurement: a full SAM step (first + second) beside a copy of the parameters' bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    /// Elements over all tensors.
    pub elements: usize,
    /// Number of tensors.
    pub tensors: usize,
    /// Median seconds of one SAM step.
    pub sam_seconds: f64,
    /// Bytes the passes must move per step.
    pub sam_bytes: f64,
    /// Median seconds of one reference copy.
    pub copy_seconds: f64,
    /// Bytes the copy moves.
    pub copy_bytes: f64,
    /// SAM bytes/s over copy bytes/s: the median over adjacent pairs of repetitions.
    pub ratio: f64,
    /// How the times were taken (`wall clock` or `timestamp queries`).
    pub timing: &'static str,
    /// The backend, as the optimizer describes it.
    pub backend: String,
    /// GPU: the median time of each pass, from timestamp queries.
    pub passes: Option<PassTimes>,
}

/// Bytes a SAM step must move per element for `config` and `dtype`.
pub fn bytes_per_element(config: &Config, dtype: DType) -> usize {
    let s = dtype.size();
    let first = if config.adaptive { 6 } else { 5 } * s;
    let second = match config.base {
        BaseOptimizer::None if config.loss_scale.is_some() => 3 * s,
        BaseOptimizer::None => 2 * s,
        BaseOptimizer::Sgd if config.momentum != 0.0 => 4 * s + 8,
        BaseOptimizer::Sgd => 4 * s,
        BaseOptimizer::AdamW => 4 * s + 16,
    };
    let master = if config.has_master(dtype) { 8 } else { 0 };
    first + second + master
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn summarize(
    lens: &[usize],
    dtype: DType,
    config: &Config,
    sam: Vec<f64>,
    copy: Vec<f64>,
    timing: &'static str,
    backend: String,
) -> Measurement {
    let elements: usize = lens.iter().sum();
    let sam_bytes = (elements * bytes_per_element(config, dtype)) as f64;
    let copy_bytes = (2 * elements * dtype.size()) as f64;
    let ratio = median(sam.iter().zip(&copy).map(|(s, c)| (sam_bytes / s) / (copy_bytes / c)).collect());
    Measurement {
        elements,
        tensors: lens.len(),
        sam_seconds: median(sam),
        sam_bytes,
        copy_seconds: median(copy),
        copy_bytes,
        ratio,
        timing,
        backend,
        passes: None,
    }
}

/// The CPU engine on host tensors of `lens` elements, beside a copy on the same number of threads.
pub fn cpu(lens: &[usize], dtype: DType, config: &Config, reps: usize) -> Result<Measurement> {
    let size = dtype.size();
    let mut sam = Optimizer::new(Config { backend: Backend::Cpu, ..config.clone() })?;
    // The host's buffers: one allocation per tensor, as a framework would have them.
    let mut params: Vec<Vec<u64>> =
        lens.iter().map(|&l| vec![0x3F80_0000_3F80_0000u64; (l * size).div_ceil(8)]).collect();
    let grads: Vec<Vec<u64>> = lens.iter().map(|&l| vec![0x3C23_D70A_3C23_D70Au64; (l * size).div_ceil(8)]).collect();
    for ((p, g), &l) in params.iter_mut().zip(&grads).zip(lens) {
        // SAFETY: the buffers outlive `sam` and are not touched while it runs.
        unsafe { sam.register_host_raw(p.as_mut_ptr().cast(), g.as_ptr().cast(), l, dtype)? };
    }
    let pool = rayon::ThreadPoolBuilder::new().num_threads(config.threads).build().expect("a thread pool");
    let n: usize = lens.iter().sum();
    let src = vec![1u64; (n * size).div_ceil(8)];
    let mut dst = vec![0u64; src.len()];
    let copy = |dst: &mut [u64]| {
        pool.install(|| {
            dst.par_chunks_mut(1 << 16).zip(src.par_chunks(1 << 16)).for_each(|(d, s)| d.copy_from_slice(s))
        })
    };
    copy(&mut dst);
    sam.first_step()?;
    sam.second_step()?;
    let (mut t_copy, mut t_sam) = (Vec::new(), Vec::new());
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        copy(&mut dst);
        t_copy.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        sam.first_step()?;
        sam.second_step()?;
        t_sam.push(t.elapsed().as_secs_f64());
    }
    assert_eq!(dst[dst.len() / 2], 1);
    Ok(summarize(lens, dtype, config, t_sam, t_copy, "wall clock", sam.backend_description()))
}

/// The GPU engine on device tensors of `lens` elements, beside a device buffer copy; passes timed
/// by timestamp queries when the adapter has them (the copy too, when it can time inside an
/// encoder), else by the wall clock.
pub fn gpu(lens: &[usize], dtype: DType, config: &Config, reps: usize) -> Result<Measurement> {
    let mut sam = Optimizer::new(Config { backend: Backend::Gpu, ..config.clone() })?;
    for &l in lens {
        let id = sam.add_zeroed_tensor(l, dtype)?;
        match dtype {
            DType::F32 => {
                sam.write_param(id, &vec![1.0f32; l])?;
                sam.write_grad(id, &vec![0.01f32; l])?;
            }
            DType::F16 => {
                sam.write_param(id, &vec![half::f16::ONE; l])?;
                sam.write_grad(id, &vec![half::f16::from_f32(0.01); l])?;
            }
            DType::BF16 => {
                sam.write_param(id, &vec![half::bf16::ONE; l])?;
                sam.write_grad(id, &vec![half::bf16::from_f32(0.01); l])?;
            }
        }
    }
    let stamps = sam.enable_pass_timing();
    sam.first_step()?;
    sam.second_step()?;
    let (mut t_sam, mut passes) = (Vec::new(), Vec::new());
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        sam.first_step()?;
        sam.second_step()?;
        let wall = t.elapsed().as_secs_f64();
        let stamped = sam.pass_times().filter(|_| stamps && config.base == BaseOptimizer::None);
        t_sam.push(stamped.map_or(wall, |p| (p.norm_ns + p.perturb_ns + p.restore_ns) * 1e-9));
        passes.extend(stamped);
    }
    let n: usize = lens.iter().sum();
    let copies = sam.time_device_copy((n * dtype.size()) as u64, reps.max(1))?;
    let copy_stamped = copies.first().is_some_and(|c| c.1);
    let t_copy = copies.iter().map(|c| c.0 * 1e-9).collect();
    let timing = match (stamps && config.base == BaseOptimizer::None, copy_stamped) {
        (true, true) => "timestamp queries",
        (true, false) => "passes by timestamps, copy by wall clock",
        _ => "wall clock",
    };
    let mut m = summarize(lens, dtype, config, t_sam, t_copy, timing, sam.backend_description());
    if !passes.is_empty() {
        m.passes = Some(PassTimes {
            norm_ns: median(passes.iter().map(|p| p.norm_ns).collect()),
            perturb_ns: median(passes.iter().map(|p| p.perturb_ns).collect()),
            restore_ns: median(passes.iter().map(|p| p.restore_ns).collect()),
        });
    }
    Ok(m)
}

/// Host buffers staged through the GPU (`SAM_BACKEND_GPU` on host memory): the wall-clock step,
/// uploads and downloads included, beside the same device copy as [`gpu`], to show the cost.
pub fn gpu_staged(lens: &[usize], config: &Config, reps: usize) -> Result<Measurement> {
    let mut sam = Optimizer::new(Config { backend: Backend::Gpu, ..config.clone() })?;
    let mut params: Vec<Vec<f32>> = lens.iter().map(|&l| vec![1.0; l]).collect();
    let grads: Vec<Vec<f32>> = lens.iter().map(|&l| vec![0.01; l]).collect();
    for (p, g) in params.iter_mut().zip(&grads) {
        // SAFETY: the vectors outlive `sam` and are untouched while it runs.
        unsafe { sam.register_host(p.as_mut_ptr(), g.as_ptr(), p.len())? };
    }
    sam.first_step()?;
    sam.second_step()?;
    let mut t_sam = Vec::new();
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        sam.first_step()?;
        sam.second_step()?;
        t_sam.push(t.elapsed().as_secs_f64());
    }
    let n: usize = lens.iter().sum();
    let t_copy = sam.time_device_copy((n * 4) as u64, reps.max(1))?.iter().map(|c| c.0 * 1e-9).collect();
    Ok(summarize(lens, DType::F32, config, t_sam, t_copy, "wall clock (staged)", sam.backend_description()))
}
