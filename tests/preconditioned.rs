//! The preconditioned perturbation (`Config::preconditioned`, AdamW): at every first step the
//! perturbed weights are `w + rho P g / ||P g||` with `P = 1 / (sqrt(v / (1 - beta2^t)) + eps)`,
//! computed here in float64 from a float64 AdamW run beside the engine (plain SAM at the first
//! step, before any update), on the CPU and the GPU, in f32 and bf16.

mod common;

use common::{Rng, optimizer_or_skip};
use samopt::half::bf16;
use samopt::{Backend, BaseOptimizer, Config, DType, ErrorKind, Optimizer};

const N: usize = 3000;

#[test]
fn perturbation_follows_adamw_preconditioned_gradient() {
    for backend in [Backend::Cpu, Backend::Gpu] {
        for dtype in [DType::F32, DType::BF16] {
            let config = Config {
                backend,
                base: BaseOptimizer::AdamW,
                lr: 0.01,
                rho: 0.05,
                preconditioned: true,
                ..Config::default()
            };
            let Some(mut opt) = optimizer_or_skip(config.clone()) else { return };
            let round = |x: f64| if dtype == DType::F32 { x as f32 as f64 } else { bf16::from_f64(x).to_f64() };
            let mut rng = Rng::new(21);
            let w0: Vec<f64> = (0..N).map(|_| round(rng.sym(1.0))).collect();
            let id = opt.add_zeroed_tensor(N, dtype).unwrap();
            let write = |opt: &mut Optimizer, v: &[f64], grad: bool| {
                if dtype == DType::F32 {
                    let d: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                    if grad { opt.write_grad(id, &d) } else { opt.write_param(id, &d) }
                } else {
                    let d: Vec<bf16> = v.iter().map(|&x| bf16::from_f64(x)).collect();
                    if grad { opt.write_grad(id, &d) } else { opt.write_param(id, &d) }
                }
                .unwrap()
            };
            let read = |opt: &mut Optimizer| -> Vec<f64> {
                if dtype == DType::F32 {
                    let mut out = vec![0f32; N];
                    opt.read_param(id, &mut out).unwrap();
                    out.iter().map(|&x| x as f64).collect()
                } else {
                    let mut out = vec![bf16::ZERO; N];
                    opt.read_param(id, &mut out).unwrap();
                    out.iter().map(|x| x.to_f64()).collect()
                }
            };
            write(&mut opt, &w0, false);
            let mut v = vec![0.0f64; N];
            let mut worst = 0.0f64;
            for t in 0..6 {
                // Gradients of very different sizes per element, so that P matters.
                let g1: Vec<f64> = (0..N).map(|i| round(rng.sym(1.0) * [1.0, 0.01, 3.0][i % 3])).collect();
                let g2: Vec<f64> = (0..N).map(|i| round(rng.sym(1.0) * [2.0, 0.05, 0.5][i % 3])).collect();
                let w = read(&mut opt);
                write(&mut opt, &g1, true);
                opt.first_step().unwrap();
                let got = read(&mut opt);
                // P from v after t updates (t = 0: P = 1, plain SAM).
                let p: Vec<f64> = if t == 0 {
                    vec![1.0; N]
                } else {
                    let bc2 = 1.0 - config.beta2.powi(t);
                    v.iter().map(|&v| 1.0 / ((v / bc2).sqrt() + config.adam_eps)).collect()
                };
                let norm = g1.iter().zip(&p).map(|(g, p)| (g * p) * (g * p)).sum::<f64>().sqrt();
                for i in 0..N {
                    let want = round(w[i] + config.rho * p[i] * g1[i] / norm);
                    let tol = if dtype == DType::F32 { 1e-6 } else { 2f64.powi(-7) };
                    let diff = (got[i] - want).abs() / want.abs().max(1.0);
                    assert!(diff <= tol, "{backend:?} {dtype:?} step {t} element {i}: {} vs {want}", got[i]);
                    worst = worst.max(diff);
                }
                write(&mut opt, &g2, true);
                opt.second_step().unwrap();
                for i in 0..N {
                    v[i] = config.beta2 * v[i] + (1.0 - config.beta2) * g2[i] * g2[i];
                }
            }
            eprintln!("{backend:?} {dtype:?}: largest relative difference {worst:.2e}");
        }
    }
}

#[test]
fn refusals() {
    let e = Optimizer::new(Config { preconditioned: true, ..Config::default() }).unwrap_err();
    assert!(e.message().starts_with("preconditioned = true needs base = adamw"), "{}", e.message());
    let adamw = Config { preconditioned: true, base: BaseOptimizer::AdamW, ..Config::default() };
    let e = Optimizer::new(Config { adaptive: true, ..adamw.clone() }).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    let e = Optimizer::new(Config { norm: samopt::Norm::LInf, ..adamw }).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
}
