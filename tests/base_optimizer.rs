//! The built-in base optimizers fused with the restore, over 50-step trajectories, against an
//! independent float64 implementation of SGD and AdamW as PyTorch's documentation of
//! `torch.optim.SGD` and `torch.optim.AdamW` writes them (and GSAM as arXiv 2203.08065), here:
//! plain SGD, momentum with dampening, Nesterov, weight decay, AdamW with bias correction, groups
//! with different decay and learning-rate scales, `set_lr` mid-run, clipping, GSAM; every dtype,
//! on the CPU and (when an adapter exists) the GPU.
//!
//! Differences are measured relative to `max(|w|, 1)`: the weights start uniform in [-1, 1), so
//! this is the error in units of the weights' scale (a relative error of a weight passing through
//! zero says nothing).
//! - f32: 1e-5. Every update rounds `w` once to f32 (at most 2^-24 = 6e-8 for |w| < 1) and rounds
//!   a few f32 operations of a step of at most ~0.05; over 50 steps at most about 4e-6.
//! - f16: 1.5e-3 and bf16: 1.2e-2, three units in the last place of [0.5, 1) (2^-11, 2^-8): the
//!   weights are stored rounded to the dtype after every update, by the engine from f32 and by the
//!   reference from f64; where the two land on either side of a rounding boundary (about once in
//!   2^16 element-steps for bf16) they differ by a unit, and that difference persists, since the
//!   gradients here do not depend on the weights. It does not grow.
//!
//! Each case prints its largest relative difference (run with `--nocapture` to see them).

mod common;

use std::io::Write;

use common::{Rng, Ty, optimizer_or_skip};
use samopt::{Backend, BaseOptimizer, Config, Optimizer, SecondStep};

const STEPS: usize = 50;
const SIZES: [usize; 4] = [1, 7, 1000, 4099];

/// One tensor of the float64 reference: PyTorch's per-parameter state.
struct RefTensor {
    w: Vec<f64>,
    buf: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    t: u64,
    group: usize,
}

struct Case {
    name: &'static str,
    config: Config,
    /// Extra groups `(lr_scale, weight_decay)`; tensor k goes to group `k % (extra + 1)`.
    groups: Vec<(f64, Option<f64>)>,
    /// `lr` at step k, through `set_lr` (None: constant).
    schedule: Option<fn(usize) -> f64>,
}

fn cases() -> Vec<Case> {
    let sgd = Config { base: BaseOptimizer::Sgd, lr: 0.05, ..Config::default() };
    let adamw = Config { base: BaseOptimizer::AdamW, lr: 0.01, ..Config::default() };
    vec![
        Case { name: "sgd", config: sgd.clone(), groups: vec![], schedule: None },
        Case {
            name: "sgd momentum+dampening",
            config: Config { momentum: 0.9, dampening: 0.1, ..sgd.clone() },
            groups: vec![],
            schedule: None,
        },
        Case {
            name: "sgd nesterov",
            config: Config { momentum: 0.9, nesterov: true, ..sgd.clone() },
            groups: vec![],
            schedule: None,
        },
        Case {
            name: "sgd weight decay",
            config: Config { momentum: 0.5, weight_decay: Some(0.05), ..sgd.clone() },
            groups: vec![],
            schedule: None,
        },
        Case { name: "adamw", config: adamw.clone(), groups: vec![], schedule: None },
        Case {
            name: "adamw groups",
            config: Config { weight_decay: Some(0.1), ..adamw.clone() },
            groups: vec![(0.5, Some(0.0)), (2.0, None)],
            schedule: None,
        },
        Case {
            name: "sgd groups",
            config: Config { momentum: 0.9, weight_decay: Some(0.01), ..sgd.clone() },
            groups: vec![(0.1, Some(0.0))],
            schedule: None,
        },
        Case {
            name: "adamw set_lr",
            config: adamw.clone(),
            groups: vec![],
            schedule: Some(|k| 0.01 * 0.5 * (1.0 + (std::f64::consts::PI * k as f64 / STEPS as f64).cos())),
        },
        Case {
            name: "sgd clipping",
            config: Config { momentum: 0.9, max_grad_norm: Some(0.5), ..sgd.clone() },
            groups: vec![],
            schedule: None,
        },
        Case {
            name: "gsam sgd",
            config: Config { momentum: 0.9, gsam_alpha: Some(0.3), ..sgd.clone() },
            groups: vec![],
            schedule: None,
        },
        Case {
            name: "gsam adamw clipped",
            config: Config { gsam_alpha: Some(0.5), max_grad_norm: Some(1.0), ..adamw.clone() },
            groups: vec![(0.5, Some(0.0))],
            schedule: None,
        },
    ]
}

/// Runs a case for 50 steps on `backend` in dtype `ty`; returns the largest relative difference.
fn run(case: &Case, backend: Backend, ty: Ty) -> Option<f64> {
    let config = Config { backend, ..case.config.clone() };
    let mut opt = optimizer_or_skip(config.clone())?;
    let mut rng = Rng::new(1234 + ty as u64);
    let mut group_ids = vec![0u32];
    for &(scale, wd) in &case.groups {
        group_ids.push(opt.add_group(scale, wd).unwrap());
    }
    let group_decay: Vec<f64> = std::iter::once(config.effective_weight_decay())
        .chain(case.groups.iter().map(|&(_, wd)| wd.unwrap_or(config.effective_weight_decay())))
        .collect();
    let group_scale: Vec<f64> = std::iter::once(1.0).chain(case.groups.iter().map(|&(s, _)| s)).collect();

    let mut reference = Vec::new();
    for (k, &n) in SIZES.iter().enumerate() {
        let w: Vec<f64> = (0..n).map(|_| ty.round(rng.sym(1.0))).collect();
        let id = opt.add_zeroed_tensor(n, ty.dtype()).unwrap();
        common::write_values(&mut opt, id, ty, false, &w);
        let group = k % group_ids.len();
        opt.set_group(id, group_ids[group]).unwrap();
        reference.push(RefTensor { w, buf: vec![0.0; n], m: vec![0.0; n], v: vec![0.0; n], t: 0, group });
    }

    let mut worst = 0.0f64;
    let mut lr = config.lr;
    for step in 0..STEPS {
        if let Some(schedule) = case.schedule {
            lr = schedule(step);
            opt.set_lr(lr).unwrap();
        }
        // The host's two gradients: independent of the weights, so a last-bit difference between
        // the engine and the reference cannot grow through them.
        let g1: Vec<Vec<f64>> = SIZES.iter().map(|&n| (0..n).map(|_| ty.round(rng.sym(0.5))).collect()).collect();
        let g2: Vec<Vec<f64>> = SIZES.iter().map(|&n| (0..n).map(|_| ty.round(rng.sym(0.5))).collect()).collect();
        for (id, g) in g1.iter().enumerate() {
            common::write_values(&mut opt, id as u32, ty, true, g);
        }
        opt.first_step().unwrap();
        for (id, g) in g2.iter().enumerate() {
            common::write_values(&mut opt, id as u32, ty, true, g);
        }
        assert_eq!(opt.second_step().unwrap(), SecondStep::Updated);

        // The reference: clip, GSAM, then PyTorch's SGD or AdamW in float64.
        let norm2: f64 = g2.iter().flatten().map(|x| x * x).sum();
        let dot: f64 = g1.iter().flatten().zip(g2.iter().flatten()).map(|(a, b)| a * b).sum();
        let clip = config.max_grad_norm.map_or(1.0, |m| (m / (norm2.sqrt() + 1e-6)).min(1.0));
        for (k, r) in reference.iter_mut().enumerate() {
            r.t += 1;
            let lr_t = lr * group_scale[r.group];
            let wd = group_decay[r.group];
            for i in 0..r.w.len() {
                let mut d = clip * g2[k][i];
                if let Some(alpha) = config.gsam_alpha {
                    let g_perp = g1[k][i] - dot / norm2 * g2[k][i];
                    d -= alpha * g_perp;
                }
                let w = r.w[i];
                let new = match config.base {
                    BaseOptimizer::Sgd => {
                        let mut d = d + wd * w;
                        if config.momentum != 0.0 {
                            r.buf[i] =
                                if r.t == 1 { d } else { config.momentum * r.buf[i] + (1.0 - config.dampening) * d };
                            d = if config.nesterov { d + config.momentum * r.buf[i] } else { r.buf[i] };
                        }
                        w - lr_t * d
                    }
                    BaseOptimizer::AdamW => {
                        let w = w * (1.0 - lr_t * wd);
                        r.m[i] = config.beta1 * r.m[i] + (1.0 - config.beta1) * d;
                        r.v[i] = config.beta2 * r.v[i] + (1.0 - config.beta2) * d * d;
                        let bc1 = 1.0 - config.beta1.powi(r.t as i32);
                        let bc2 = 1.0 - config.beta2.powi(r.t as i32);
                        w - lr_t / bc1 * r.m[i] / (r.v[i].sqrt() / bc2.sqrt() + config.adam_eps)
                    }
                    BaseOptimizer::None => unreachable!(),
                };
                r.w[i] = ty.round(new);
            }
        }
        for (k, r) in reference.iter().enumerate() {
            let got = common::read_values(&mut opt, k as u32, ty, r.w.len(), false);
            for (i, (&a, &b)) in got.iter().zip(&r.w).enumerate() {
                let rel = (a - b).abs() / b.abs().max(1.0);
                assert!(
                    rel <= ty.trajectory_tolerance(),
                    "{} {backend:?} {ty:?} step {step} tensor {k}[{i}]: engine {a}, reference {b} (rel {rel:e})",
                    case.name
                );
                worst = worst.max(rel);
            }
        }
    }
    assert_eq!(opt.steps(), STEPS as u64);
    Some(worst)
}

fn run_all(backend: Backend) {
    let mut report = String::new();
    for case in cases() {
        for ty in common::ALL_TYPES {
            let Some(worst) = run(&case, backend, ty) else { return };
            report += &format!("{backend:?} {:<22} {ty:?}: largest relative difference {worst:.2e}\n", case.name);
        }
    }
    let _ = write!(std::io::stderr(), "{report}");
}

#[test]
fn trajectories_cpu() {
    run_all(Backend::Cpu);
}

#[test]
fn trajectories_gpu() {
    run_all(Backend::Gpu);
}

/// A non-finite second gradient: restored exactly, no update, state and step count untouched; the
/// next step continues as if the skipped one never happened.
#[test]
fn non_finite_second_gradient_skips_the_update() {
    for backend in [Backend::Cpu, Backend::Gpu] {
        let config = Config { backend, base: BaseOptimizer::AdamW, lr: 0.01, ..Config::default() };
        let (Some(mut a), Some(mut b)) = (optimizer_or_skip(config.clone()), optimizer_or_skip(config)) else {
            continue;
        };
        let w = [0.5f32, -0.25, 1.0];
        let (ia, ib) = (a.add_tensor(&w).unwrap(), b.add_tensor(&w).unwrap());
        let step = |o: &mut Optimizer, id, g1: [f32; 3], g2: [f32; 3]| {
            o.write_grad(id, &g1).unwrap();
            o.first_step().unwrap();
            o.write_grad(id, &g2).unwrap();
            o.second_step().unwrap()
        };
        assert_eq!(step(&mut a, ia, [0.1, 0.2, 0.3], [0.3, 0.2, 0.1]), SecondStep::Updated);
        assert_eq!(step(&mut b, ib, [0.1, 0.2, 0.3], [0.3, 0.2, 0.1]), SecondStep::Updated);
        let mut before = [0f32; 3];
        a.read_param(ia, &mut before).unwrap();
        assert_eq!(step(&mut a, ia, [0.1, 0.2, 0.3], [0.3, f32::NAN, 0.1]), SecondStep::Skipped);
        let mut after = [0f32; 3];
        a.read_param(ia, &mut after).unwrap();
        assert_eq!(before.map(f32::to_bits), after.map(f32::to_bits), "{backend:?}: a skipped step moved w");
        assert_eq!(a.steps(), 1);
        // Both continue identically: the skipped step left AdamW's moments and t as they were.
        assert_eq!(step(&mut a, ia, [0.2, 0.1, 0.0], [0.1, 0.1, 0.1]), SecondStep::Updated);
        assert_eq!(step(&mut b, ib, [0.2, 0.1, 0.0], [0.1, 0.1, 0.1]), SecondStep::Updated);
        let (mut wa, mut wb) = ([0f32; 3], [0f32; 3]);
        a.read_param(ia, &mut wa).unwrap();
        b.read_param(ib, &mut wb).unwrap();
        assert_eq!(wa.map(f32::to_bits), wb.map(f32::to_bits), "{backend:?}");
    }
}

/// Tensors registered, and groups changed, after some updates: the earlier tensors' trajectories
/// are bit for bit those of a run without the change (their state moved with them when the GPU
/// repacked its arenas), and the new tensor starts its own AdamW count at t = 1.
#[test]
fn late_registration_keeps_state() {
    for backend in [Backend::Cpu, Backend::Gpu] {
        let config = Config { backend, base: BaseOptimizer::AdamW, lr: 0.02, ..Config::default() };
        let run = |late: bool| -> Option<Vec<u32>> {
            let mut opt = optimizer_or_skip(config.clone())?;
            let mut rng = Rng::new(77);
            let ids: Vec<u32> = [5usize, 300].iter().map(|&n| opt.add_tensor(&vec![0.5f32; n]).unwrap()).collect();
            let mut extra = None;
            for step in 0..20 {
                if late && step == 10 {
                    let id = opt.add_tensor(&[1.0f32; 9]).unwrap();
                    let g = opt.add_group(0.5, Some(0.0)).unwrap();
                    opt.set_group(id, g).unwrap();
                    extra = Some(id);
                }
                for &id in &ids {
                    let n = if id == 0 { 5 } else { 300 };
                    let g: Vec<f32> = (0..n).map(|_| rng.sym(1.0) as f32).collect();
                    opt.write_grad(id, &g).unwrap();
                }
                if let Some(id) = extra {
                    opt.write_grad(id, &[0.25f32; 9]).unwrap();
                }
                opt.first_step().unwrap();
                opt.second_step().unwrap();
            }
            if let Some(id) = extra {
                // Ten AdamW steps from t = 1 with a constant gradient move w by about 10 * lr/2.
                let mut w = [0f32; 9];
                opt.read_param(id, &mut w).unwrap();
                assert!((w[0] - (1.0 - 10.0 * 0.01)).abs() < 1e-3, "{backend:?}: late tensor at {}", w[0]);
            }
            let mut out = Vec::new();
            for (k, &id) in ids.iter().enumerate() {
                let mut w = vec![0f32; [5, 300][k]];
                opt.read_param(id, &mut w).unwrap();
                out.extend(w.iter().map(|x| x.to_bits()));
            }
            Some(out)
        };
        let (Some(a), Some(b)) = (run(false), run(true)) else { continue };
        assert!(a == b, "{backend:?}: a late registration changed the earlier tensors' trajectory");
    }
}

/// Host buffers staged through the GPU with a built-in optimizer follow the CPU engine.
#[test]
fn staged_host_buffers_with_base_optimizer() {
    let config = Config { base: BaseOptimizer::Sgd, lr: 0.1, momentum: 0.9, ..Config::default() };
    let Some(mut gpu) = optimizer_or_skip(Config { backend: Backend::Gpu, ..config.clone() }) else { return };
    let mut cpu = Optimizer::new(Config { backend: Backend::Cpu, ..config }).unwrap();
    let mut rng = Rng::new(3);
    let w0: Vec<f32> = (0..1001).map(|_| rng.sym(1.0) as f32).collect();
    let (mut wg, mut wc) = (w0.clone(), w0.clone());
    let (mut gg, mut gc) = (vec![0f32; 1001], vec![0f32; 1001]);
    // SAFETY: the vectors outlive the optimizers and are only touched between their calls.
    unsafe {
        gpu.register_host(wg.as_mut_ptr(), gg.as_ptr(), 1001).unwrap();
        cpu.register_host(wc.as_mut_ptr(), gc.as_ptr(), 1001).unwrap();
    }
    for _ in 0..20 {
        let g1: Vec<f32> = (0..1001).map(|_| rng.sym(1.0) as f32).collect();
        let g2: Vec<f32> = (0..1001).map(|_| rng.sym(1.0) as f32).collect();
        gg.copy_from_slice(&g1);
        gc.copy_from_slice(&g1);
        gpu.first_step().unwrap();
        cpu.first_step().unwrap();
        gg.copy_from_slice(&g2);
        gc.copy_from_slice(&g2);
        assert_eq!(gpu.second_step().unwrap(), SecondStep::Updated);
        assert_eq!(cpu.second_step().unwrap(), SecondStep::Updated);
    }
    for (i, (a, b)) in wg.iter().zip(&wc).enumerate() {
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "element {i}: gpu {a} cpu {b}");
    }
}
