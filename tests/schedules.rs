//! Step schedules (interval, random, LookSAM, AE-SAM) over 40-step trajectories, against an
//! independent float64 implementation written here from the rules as their papers state them
//! (Composer's interval; RST/SS-SAM, arXiv 2203.09962; LookSAM, arXiv 2203.02714; AE-SAM, arXiv
//! 2304.14647) and PyTorch's documented SGD and AdamW: every step's decision must be the
//! reference's, the perturbed weights of SAM steps and the weights after every step must match
//! it, in every dtype, on the CPU and (when an adapter exists) the GPU. Also: checkpoint resume in
//! the middle of a schedule, LookSAM before its first kept `g_v`, data-parallel workers deciding
//! alike, and the refusals.
//!
//! Tolerances as in `tests/base_optimizer.rs` (relative to `max(|w|, 1)`): f32 1e-5, f16 1.5e-3,
//! bf16 1.2e-2 (three units in the last place of [0.5, 1): the weights are rounded to the dtype
//! after every update by both sides, from f32 and from f64).

mod common;

use common::{Rng, ThreadAllReduce, Ty, optimizer_or_skip};
use samopt::{Backend, BaseOptimizer, Config, ErrorKind, FirstStep, Optimizer, Schedule, SecondStep};

const STEPS: usize = 40;
const SIZES: [usize; 3] = [5, 1000, 4099];

/// The float64 reference: the schedule's decisions and statistics, and PyTorch's SGD / AdamW.
struct Reference {
    config: Config,
    rho: f64,
    t: u64,
    /// The random schedule's generator: SplitMix64 (Steele, Lea, Flood 2014), `common::Rng`,
    /// written in the tests independently of the crate.
    rng: Rng,
    mean: f64,
    var: f64,
    /// LookSAM's g_v, per tensor, once kept.
    gv: Option<Vec<Vec<f64>>>,
    w: Vec<Vec<f64>>,
    buf: Vec<Vec<f64>>,
    m: Vec<Vec<f64>>,
    v: Vec<Vec<f64>>,
    updates: u64,
}

impl Reference {
    fn new(config: &Config, w: Vec<Vec<f64>>) -> Reference {
        let zeros: Vec<Vec<f64>> = w.iter().map(|t| vec![0.0; t.len()]).collect();
        let rng = Rng::new(if let Schedule::Random { seed, .. } = config.schedule { seed } else { 0 });
        Reference {
            config: config.clone(),
            rho: config.rho,
            t: 0,
            rng,
            mean: 0.0,
            var: 0.0,
            gv: None,
            w,
            buf: zeros.clone(),
            m: zeros.clone(),
            v: zeros,
            updates: 0,
        }
    }

    /// The decision of this step from `||g||^2` (true: SAM).
    fn decide(&mut self, grad_sq: f64) -> bool {
        let t = self.t;
        self.t += 1;
        match self.config.schedule {
            Schedule::Every => true,
            Schedule::Interval { k } | Schedule::LookSam { k, .. } => t.is_multiple_of(k),
            Schedule::Random { p, .. } => ((self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p,
            Schedule::AeSam { delta, lambda1, lambda2, planned_steps } => {
                // mu_t = delta mu + (1 - delta) x; s_t = delta s + (1 - delta) (x - mu_t)^2.
                self.mean = delta * self.mean + (1.0 - delta) * grad_sq;
                self.var = delta * self.var + (1.0 - delta) * (grad_sq - self.mean).powi(2);
                let c = lambda1 + (lambda2 - lambda1) * (t as f64 / planned_steps as f64).min(1.0);
                grad_sq >= self.mean + c * self.var.sqrt()
            }
        }
    }

    /// One base update of every tensor with direction `d` (rounded to `ty` afterwards).
    fn update(&mut self, d: &[Vec<f64>], ty: Ty, lr: f64) {
        self.updates += 1;
        let c = &self.config;
        let wd = c.effective_weight_decay();
        for k in 0..self.w.len() {
            for i in 0..self.w[k].len() {
                let w = self.w[k][i];
                let new = match c.base {
                    BaseOptimizer::Sgd => {
                        let mut d = d[k][i] + wd * w;
                        if c.momentum != 0.0 {
                            self.buf[k][i] = if self.updates == 1 {
                                d
                            } else {
                                c.momentum * self.buf[k][i] + (1.0 - c.dampening) * d
                            };
                            d = if c.nesterov { d + c.momentum * self.buf[k][i] } else { self.buf[k][i] };
                        }
                        w - lr * d
                    }
                    BaseOptimizer::AdamW => {
                        let d = d[k][i];
                        let w = w * (1.0 - lr * wd);
                        self.m[k][i] = c.beta1 * self.m[k][i] + (1.0 - c.beta1) * d;
                        self.v[k][i] = c.beta2 * self.v[k][i] + (1.0 - c.beta2) * d * d;
                        let bc1 = 1.0 - c.beta1.powi(self.updates as i32);
                        let bc2 = 1.0 - c.beta2.powi(self.updates as i32);
                        w - lr / bc1 * self.m[k][i] / (self.v[k][i].sqrt() / bc2.sqrt() + c.adam_eps)
                    }
                    // The host's own optimizer in these tests: plain SGD.
                    BaseOptimizer::None => w - lr * d[k][i],
                };
                self.w[k][i] = ty.round(new);
            }
        }
    }
}

fn dot(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| x * y).sum()
}

fn scaled(a: &[Vec<f64>], s: f64) -> Vec<Vec<f64>> {
    a.iter().map(|t| t.iter().map(|x| x * s).collect()).collect()
}

fn check(what: &str, got: &[f64], want: &[f64], ty: Ty) -> f64 {
    let mut worst = 0.0f64;
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let rel = (a - b).abs() / b.abs().max(1.0);
        assert!(rel <= ty.trajectory_tolerance(), "{what}[{i}]: engine {a}, reference {b} (rel {rel:e})");
        worst = worst.max(rel);
    }
    worst
}

struct Case {
    name: &'static str,
    config: Config,
    /// rho at step k through `set_rho` (None: constant).
    rho: Option<fn(usize) -> f64>,
}

fn cases() -> Vec<Case> {
    let sgd = Config { base: BaseOptimizer::Sgd, lr: 0.05, momentum: 0.9, rho: 0.1, ..Config::default() };
    let adamw = Config { base: BaseOptimizer::AdamW, lr: 0.01, rho: 0.1, ..Config::default() };
    let host = Config { base: BaseOptimizer::None, lr: 0.05, rho: 0.1, ..Config::default() };
    vec![
        Case {
            name: "interval sgd",
            config: Config { schedule: Schedule::Interval { k: 3 }, ..sgd.clone() },
            rho: None,
        },
        Case {
            name: "interval host rho schedule",
            config: Config { schedule: Schedule::Interval { k: 2 }, ..host.clone() },
            rho: Some(|k| 0.2 * (1.0 - k as f64 / STEPS as f64) + 0.01),
        },
        Case {
            name: "random adamw",
            config: Config { schedule: Schedule::Random { p: 0.4, seed: 77 }, ..adamw.clone() },
            rho: None,
        },
        Case {
            name: "looksam sgd",
            config: Config { schedule: Schedule::LookSam { k: 4, alpha: 0.7 }, ..sgd.clone() },
            rho: None,
        },
        Case {
            name: "looksam adamw clipped",
            config: Config {
                schedule: Schedule::LookSam { k: 3, alpha: 0.5 },
                max_grad_norm: Some(2.0),
                ..adamw.clone()
            },
            rho: None,
        },
        Case {
            name: "looksam host",
            config: Config { schedule: Schedule::LookSam { k: 3, alpha: 0.7 }, ..host.clone() },
            rho: None,
        },
        Case {
            name: "aesam sgd",
            config: Config { schedule: Schedule::ae_sam(STEPS as u64), ..sgd.clone() },
            rho: None,
        },
        Case {
            name: "interval asam clipped",
            config: Config {
                schedule: Schedule::Interval { k: 2 },
                adaptive: true,
                eta: 0.01,
                max_grad_norm: Some(1.0),
                ..sgd.clone()
            },
            rho: None,
        },
    ]
}

/// The host's gradients of one step: independent of the weights (so a last-bit difference cannot
/// grow through them), and of a size that varies from step to step, so that AE-SAM's rule has
/// something to decide.
fn gradients(rng: &mut Rng, ty: Ty) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let scale = 0.2 + rng.unit();
    let g1 = SIZES.iter().map(|&n| (0..n).map(|_| ty.round(scale * rng.sym(0.5))).collect()).collect();
    let g2 = SIZES.iter().map(|&n| (0..n).map(|_| ty.round(scale * rng.sym(0.5))).collect()).collect();
    (g1, g2)
}

/// Runs a case for `STEPS` steps; returns the largest relative difference and the decisions.
fn run(case: &Case, backend: Backend, ty: Ty) -> Option<(f64, Vec<bool>)> {
    let config = Config { backend, ..case.config.clone() };
    let mut opt = optimizer_or_skip(config.clone())?;
    let mut rng = Rng::new(4321 + ty as u64);
    let mut w0 = Vec::new();
    for &n in &SIZES {
        let w: Vec<f64> = (0..n).map(|_| ty.round(rng.sym(1.0))).collect();
        // Owned tensors: their gradients are writable, as LookSAM without a base needs.
        let id = opt.add_zeroed_tensor(n, ty.dtype()).unwrap();
        common::write_values(&mut opt, id, ty, false, &w);
        w0.push(w);
    }
    let mut r = Reference::new(&config, w0);
    let mut worst = 0.0f64;
    let mut decisions = Vec::new();
    for step in 0..STEPS {
        if let Some(rho) = case.rho {
            r.rho = rho(step);
            opt.set_rho(r.rho).unwrap();
        }
        let (g1, g2) = gradients(&mut rng, ty);
        for (id, g) in g1.iter().enumerate() {
            common::write_values(&mut opt, id as u32, ty, true, g);
        }
        // The ascent norm: ||T_w g|| under ASAM, which AE-SAM would read; the cases here use the
        // plain norm for every rule that reads it.
        let grad_sq: f64 = g1.iter().flatten().map(|x| x * x).sum();
        let sam = r.decide(grad_sq);
        let before: Vec<Vec<f64>> =
            (0..SIZES.len()).map(|k| common::read_values(&mut opt, k as u32, ty, SIZES[k], false)).collect();
        let got = opt.first_step().unwrap();
        let label = format!("{} {backend:?} {ty:?} step {step}", case.name);
        assert_eq!(got == FirstStep::Perturbed, sam, "{label}: decision");
        decisions.push(sam);
        let c = &r.config;
        let d: Vec<Vec<f64>> = if sam {
            if !c.adaptive {
                // The perturbed weights: w + rho g / ||g||, rounded to the dtype.
                let s = r.rho / (grad_sq.sqrt() + c.eps);
                for (k, g) in g1.iter().enumerate() {
                    let want: Vec<f64> = r.w[k].iter().zip(g).map(|(w, g)| ty.round(w + s * g)).collect();
                    let got = common::read_values(&mut opt, k as u32, ty, want.len(), false);
                    worst = worst.max(check(&format!("{label}: perturbed tensor {k}"), &got, &want, ty));
                }
            }
            for (id, g) in g2.iter().enumerate() {
                common::write_values(&mut opt, id as u32, ty, true, g);
            }
            let norm2: f64 = g2.iter().flatten().map(|x| x * x).sum();
            if let Schedule::LookSam { .. } = c.schedule {
                // g_v = g_s - (g . g_s / ||g||^2) g, kept for the steps that follow.
                let proj = dot(&g1, &g2) / grad_sq;
                r.gv = Some(
                    g2.iter().zip(&g1).map(|(s, g)| s.iter().zip(g).map(|(s, g)| s - proj * g).collect()).collect(),
                );
            }
            let clip = c.max_grad_norm.map_or(1.0, |m| (m / (norm2.sqrt() + 1e-6)).min(1.0));
            scaled(&g2, clip)
        } else {
            // A single-gradient step: nothing moved.
            for (k, w) in before.iter().enumerate() {
                let got = common::read_values(&mut opt, k as u32, ty, w.len(), false);
                assert!(got == *w, "{label}: a single-gradient first step moved tensor {k}");
            }
            let clip = c.max_grad_norm.map_or(1.0, |m| (m / (grad_sq.sqrt() + 1e-6)).min(1.0));
            let mut d = g1.clone();
            if let (Schedule::LookSam { alpha, .. }, Some(gv)) = (c.schedule, &r.gv) {
                let gv_norm = gv.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
                let s = alpha * grad_sq.sqrt() / gv_norm;
                for (dk, vk) in d.iter_mut().zip(gv) {
                    for (x, v) in dk.iter_mut().zip(vk) {
                        *x += s * v;
                    }
                }
            }
            scaled(&d, clip)
        };
        let second = opt.second_step().unwrap();
        if c.base == BaseOptimizer::None {
            assert_eq!(second, SecondStep::Restored, "{label}");
            // The host's optimizer: the weights are w again; it reads its gradient buffers, which
            // hold g' (SAM step), g, or LookSAM's direction (written by samopt, rounded to the
            // dtype), and steps with plain SGD.
            let lr = c.lr;
            for (k, dk) in d.iter().enumerate() {
                let want: Vec<f64> = dk.iter().map(|&x| ty.round(x)).collect();
                let got = common::read_values(&mut opt, k as u32, ty, want.len(), true);
                worst = worst.max(check(&format!("{label}: direction in the gradient of tensor {k}"), &got, &want, ty));
                let w = common::read_values(&mut opt, k as u32, ty, want.len(), false);
                assert!(w == before[k], "{label}: restore of tensor {k}");
                let next: Vec<f64> = w.iter().zip(&got).map(|(w, g)| ty.round(w - lr * g)).collect();
                common::write_values(&mut opt, k as u32, ty, false, &next);
            }
            r.update(&d, ty, lr);
            // The host stepped with the engine's own rounded direction: adopt its weights, so that
            // only this step's difference is measured (the direction was checked above).
            for (k, w) in r.w.iter_mut().enumerate() {
                let got = common::read_values(&mut opt, k as u32, ty, w.len(), false);
                worst = worst.max(check(&format!("{label}: host step of tensor {k}"), &got, w, ty));
                *w = got;
            }
        } else {
            assert_eq!(second, SecondStep::Updated, "{label}");
            r.update(&d, ty, c.lr);
            for (k, w) in r.w.iter().enumerate() {
                let got = common::read_values(&mut opt, k as u32, ty, w.len(), false);
                worst = worst.max(check(&format!("{label}: tensor {k}"), &got, w, ty));
            }
        }
    }
    let sams = decisions.iter().filter(|&&s| s).count() as u64;
    assert_eq!(opt.sam_steps(), sams, "{}: SAM steps counted", case.name);
    assert_eq!(opt.single_steps(), STEPS as u64 - sams, "{}: single steps counted", case.name);
    assert_eq!(opt.steps(), STEPS as u64);
    Some((worst, decisions))
}

fn run_all(backend: Backend) {
    let mut report = String::new();
    for case in cases() {
        for ty in common::ALL_TYPES {
            let Some((worst, decisions)) = run(&case, backend, ty) else { return };
            let pattern: String = decisions.iter().map(|&s| if s { 'S' } else { '.' }).collect();
            report += &format!("{backend:?} {:<28} {ty:?}: {pattern} largest difference {worst:.2e}\n", case.name);
            // Every schedule here mixes both kinds of step (the test would prove little otherwise).
            assert!(decisions.iter().any(|&s| s) && decisions.iter().any(|&s| !s), "{}: {pattern}", case.name);
        }
    }
    eprint!("{report}");
}

#[test]
fn trajectories_cpu() {
    run_all(Backend::Cpu);
}

#[test]
fn trajectories_gpu() {
    run_all(Backend::Gpu);
}

/// Saves in the middle of each schedule, loads into a fresh optimizer, and runs both on: the same
/// decisions and the same bits, step for step (the generator, AE-SAM's statistics, LookSAM's g_v
/// and the counters all travel in the checkpoint).
#[test]
fn checkpoint_resume_mid_schedule_is_bit_identical() {
    for backend in [Backend::Cpu, Backend::Gpu] {
        for case in cases() {
            let config = Config { backend, ..case.config.clone() };
            let (Some(mut a), Some(mut b)) = (optimizer_or_skip(config.clone()), optimizer_or_skip(config.clone()))
            else {
                continue;
            };
            let ty = Ty::BF16;
            let mut rng = Rng::new(99);
            for opt in [&mut a, &mut b] {
                for &n in &SIZES {
                    opt.add_zeroed_tensor(n, ty.dtype()).unwrap();
                }
            }
            for (k, &n) in SIZES.iter().enumerate() {
                let w: Vec<f64> = (0..n).map(|_| ty.round(rng.sym(1.0))).collect();
                common::write_values(&mut a, k as u32, ty, false, &w);
            }
            let step = |opt: &mut Optimizer, g1: &[Vec<f64>], g2: &[Vec<f64>]| {
                for (id, g) in g1.iter().enumerate() {
                    common::write_values(opt, id as u32, ty, true, g);
                }
                let first = opt.first_step().unwrap();
                if first == FirstStep::Perturbed {
                    for (id, g) in g2.iter().enumerate() {
                        common::write_values(opt, id as u32, ty, true, g);
                    }
                }
                opt.second_step().unwrap();
                first
            };
            let grads: Vec<_> = (0..24).map(|_| gradients(&mut rng, ty)).collect();
            for (s, (g1, g2)) in grads.iter().enumerate() {
                if s == 13 {
                    let mut checkpoint = vec![0u8; a.state_size()];
                    a.save_state(&mut checkpoint).unwrap();
                    for (k, &n) in SIZES.iter().enumerate() {
                        let w = common::read_values(&mut a, k as u32, ty, n, false);
                        common::write_values(&mut b, k as u32, ty, false, &w);
                    }
                    b.load_state(&checkpoint).unwrap();
                    assert_eq!((b.sam_steps(), b.single_steps(), b.rho()), (a.sam_steps(), a.single_steps(), a.rho()));
                }
                let fa = step(&mut a, g1, g2);
                if s >= 13 {
                    let fb = step(&mut b, g1, g2);
                    assert_eq!(fa, fb, "{} {backend:?} step {s}: decision after resume", case.name);
                    for (k, &n) in SIZES.iter().enumerate() {
                        let (wa, wb) = (
                            common::read_values(&mut a, k as u32, ty, n, false),
                            common::read_values(&mut b, k as u32, ty, n, false),
                        );
                        let same = wa.iter().zip(&wb).all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(same, "{} {backend:?} step {s}: tensor {k} differs after resume", case.name);
                    }
                }
            }
        }
    }
}

/// LookSAM's single-gradient steps always follow a kept g_v: the first step is a SAM step, and a
/// skipped one (a non-finite second gradient) is taken back, so the next step is that SAM step
/// again. Where the kept g_v is zero (the perturbed gradient parallel to the gradient) there is
/// nothing to reuse, and the single-gradient steps use the plain gradient, as defined.
#[test]
fn looksam_without_a_direction_to_reuse_uses_the_plain_gradient() {
    for backend in [Backend::Cpu, Backend::Gpu] {
        let schedule = Schedule::LookSam { k: 3, alpha: 0.7 };
        let config = Config { backend, base: BaseOptimizer::Sgd, lr: 0.5, schedule, ..Config::default() };
        let Some(mut opt) = optimizer_or_skip(config) else { continue };
        let id = opt.add_tensor(&[1.0f32, -1.0, 0.5, 2.0]).unwrap();
        let g = [0.125f32, 0.25, -0.375, 0.5];
        opt.write_grad(id, &g).unwrap();
        assert_eq!(opt.first_step().unwrap(), FirstStep::Perturbed);
        opt.write_grad(id, &[f32::NAN, 0.0, 0.0, 0.0]).unwrap();
        assert_eq!(opt.second_step().unwrap(), SecondStep::Skipped);
        // Taken back: step 0 again, a SAM step; its second gradient is parallel to g.
        opt.write_grad(id, &g).unwrap();
        assert_eq!(opt.first_step().unwrap(), FirstStep::Perturbed);
        opt.write_grad(id, &g.map(|x| 2.0 * x)).unwrap();
        assert_eq!(opt.second_step().unwrap(), SecondStep::Updated);
        let mut w: Vec<f32> = [1.0f32, -1.0, 0.5, 2.0].iter().zip(g).map(|(w, g)| w - 0.5 * (2.0 * g)).collect();
        assert_eq!(read_f32(&mut opt, id), w);
        for g in [[0.1f32, 0.2, -0.3, 0.4], [-0.2f32, 0.1, 0.0, 0.3]] {
            opt.write_grad(id, &g).unwrap();
            assert_eq!(opt.first_step().unwrap(), FirstStep::SingleGradient);
            assert_eq!(opt.second_step().unwrap(), SecondStep::Updated);
            for (w, g) in w.iter_mut().zip(g) {
                *w -= 0.5 * g;
            }
            assert_eq!(read_f32(&mut opt, id), w, "g_v = 0: the plain gradient");
        }
        assert_eq!((opt.sam_steps(), opt.single_steps(), opt.steps()), (1, 2, 3));

        // Without a base optimizer, LookSAM reduces g' too: a non-finite one is a skipped step for
        // the host's optimizer, with w restored, no g_v kept, and the step taken back.
        let host = Config { backend, schedule, ..Config::default() };
        let Some(mut opt) = optimizer_or_skip(host) else { continue };
        let id = opt.add_tensor(&[1.0f32, -1.0, 0.5, 2.0]).unwrap();
        opt.write_grad(id, &[0.1f32, 0.2, -0.3, 0.4]).unwrap();
        assert_eq!(opt.first_step().unwrap(), FirstStep::Perturbed);
        opt.write_grad(id, &[0.0, f32::INFINITY, 0.0, 0.0]).unwrap();
        assert_eq!(opt.second_step().unwrap(), SecondStep::Skipped);
        assert_eq!(read_f32(&mut opt, id), [1.0, -1.0, 0.5, 2.0]);
        opt.write_grad(id, &[0.3f32, -0.1, 0.2, 0.0]).unwrap();
        assert_eq!(opt.first_step().unwrap(), FirstStep::Perturbed, "the skipped SAM step again");
        assert_eq!((opt.sam_steps(), opt.single_steps()), (0, 0));
    }
}

fn read_f32(opt: &mut Optimizer, id: u32) -> Vec<f32> {
    let mut out = vec![0f32; opt.tensor(id).unwrap().0];
    opt.read_param(id, &mut out).unwrap();
    out
}

/// Two workers, each with its own shard of the tensors and the all-reduce installed, take the
/// same decisions as one process holding every tensor, and reach the same weights (LookSAM's
/// global ||g_v|| and g.g' and AE-SAM's global norm come through the exchange).
#[test]
fn sharded_workers_decide_as_one_process() {
    for schedule in [Schedule::LookSam { k: 3, alpha: 0.7 }, Schedule::ae_sam(20), Schedule::Random { p: 0.5, seed: 3 }]
    {
        let config = Config { backend: Backend::Cpu, base: BaseOptimizer::Sgd, lr: 0.1, schedule, ..Config::default() };
        let mut rng = Rng::new(5);
        let sizes = [[300usize, 17], [1000, 64]];
        let w0: Vec<Vec<Vec<f32>>> =
            sizes.iter().map(|s| s.iter().map(|&n| (0..n).map(|_| rng.sym(1.0) as f32).collect()).collect()).collect();
        // Per step, per shard, per tensor: (g at w, g at the perturbed w).
        type Grads = Vec<Vec<Vec<(Vec<f32>, Vec<f32>)>>>;
        let steps: Grads = (0..12)
            .map(|_| {
                let scale = 0.2 + rng.unit() as f32;
                sizes
                    .iter()
                    .map(|s| {
                        s.iter()
                            .map(|&n| {
                                let g1 = (0..n).map(|_| scale * rng.sym(0.5) as f32).collect();
                                let g2 = (0..n).map(|_| scale * rng.sym(0.5) as f32).collect();
                                (g1, g2)
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let drive = |opt: &mut Optimizer, shards: &[usize]| -> (Vec<FirstStep>, Vec<Vec<f32>>) {
            let mut ids = Vec::new();
            for &s in shards {
                for w in &w0[s] {
                    ids.push((s, opt.add_tensor(w).unwrap()));
                }
            }
            let mut decisions = Vec::new();
            for step in &steps {
                let grads: Vec<&(Vec<f32>, Vec<f32>)> = shards.iter().flat_map(|&s| &step[s]).collect();
                for (&(_, id), (g1, _)) in ids.iter().zip(&grads) {
                    opt.write_grad(id, g1).unwrap();
                }
                let first = opt.first_step().unwrap();
                if first == FirstStep::Perturbed {
                    for (&(_, id), (_, g2)) in ids.iter().zip(&grads) {
                        opt.write_grad(id, g2).unwrap();
                    }
                }
                opt.second_step().unwrap();
                decisions.push(first);
            }
            (decisions, ids.iter().map(|&(_, id)| opt.param::<f32>(id).unwrap().to_vec()).collect())
        };
        let mut single = Optimizer::new(config.clone()).unwrap();
        let (want_decisions, want) = drive(&mut single, &[0, 1]);
        let reduce = ThreadAllReduce::new(2);
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|s| {
                    let (config, reduce, drive) = (config.clone(), reduce.clone(), &drive);
                    scope.spawn(move || {
                        let mut opt = Optimizer::new(config).unwrap();
                        reduce.install(&mut opt);
                        drive(&mut opt, &[s])
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut got = Vec::new();
        for (decisions, weights) in results {
            assert_eq!(decisions, want_decisions, "{schedule:?}: a worker decided differently");
            got.extend(weights);
        }
        for (k, (a, b)) in got.iter().zip(&want).enumerate() {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{schedule:?} tensor {k}[{i}]: {x} vs {y}");
            }
        }
    }
}

/// Bad schedules are refused by name at creation; LookSAM's contracts are checked before anything
/// changes.
#[test]
fn refusals() {
    let bad = [
        (Schedule::Interval { k: 0 }, "schedule_k = 0"),
        (Schedule::Random { p: 1.01, seed: 0 }, "schedule_p = 1.01"),
        (Schedule::Random { p: f64::NAN, seed: 0 }, "schedule_p = NaN"),
        (Schedule::LookSam { k: 2, alpha: -0.1 }, "looksam_alpha = -0.1"),
        (
            Schedule::AeSam { delta: 0.9, lambda1: -1.0, lambda2: f64::INFINITY, planned_steps: 5 },
            "aesam_lambda2 = inf",
        ),
        (Schedule::ae_sam(0), "aesam_planned_steps = 0"),
    ];
    for (schedule, message) in bad {
        let e = Optimizer::new(Config { schedule, ..Config::default() }).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.message().starts_with(message), "{}", e.message());
    }
    let look = Schedule::LookSam { k: 2, alpha: 0.7 };
    for config in [
        Config { schedule: look, adaptive: true, ..Config::default() },
        Config { schedule: look, base: BaseOptimizer::Sgd, gsam_alpha: Some(0.1), ..Config::default() },
    ] {
        assert_eq!(Optimizer::new(config).unwrap_err().kind(), ErrorKind::Unsupported);
    }

    // LookSAM without a base writes its direction into the gradients: read-only ones are refused
    // at the first step, before any decision.
    let mut opt = Optimizer::new(Config { backend: Backend::Cpu, schedule: look, ..Config::default() }).unwrap();
    let mut w = [1.0f32; 8];
    let g = [0.5f32; 8];
    // SAFETY: both live for the optimizer's lifetime and are not touched during its calls.
    unsafe { opt.register_host_raw(w.as_mut_ptr().cast(), g.as_ptr().cast(), 8, samopt::DType::F32).unwrap() };
    let e = opt.first_step().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidState);
    assert!(e.message().contains("tensor 0's gradient was registered read-only"), "{}", e.message());
    assert_eq!((opt.phase(), opt.grad_norm()), (samopt::Phase::Idle, None));
    drop(opt);
    assert_eq!(w, [1.0; 8]);

    // The sharded path without an all-reduce cannot give LookSAM its global sums.
    let mut opt =
        Optimizer::new(Config { backend: Backend::Cpu, schedule: look, base: BaseOptimizer::Sgd, ..Config::default() })
            .unwrap();
    let id = opt.add_tensor(&[1.0f32; 4]).unwrap();
    opt.write_grad(id, &[0.5f32; 4]).unwrap();
    assert_eq!(opt.first_step_with_norm(1.0).unwrap_err().kind(), ErrorKind::Unsupported);
    // Per-shard accumulation takes one decision per step, which schedules cannot give it.
    let interval = Config { backend: Backend::Cpu, schedule: Schedule::Interval { k: 1 }, ..Config::default() };
    let mut opt = Optimizer::new(Config { base: BaseOptimizer::Sgd, ..interval }).unwrap();
    let id = opt.add_tensor(&[1.0f32; 4]).unwrap();
    opt.write_grad(id, &[0.5f32; 4]).unwrap();
    assert_eq!(opt.first_step().unwrap(), FirstStep::Perturbed);
    assert_eq!(opt.accumulate_step().unwrap_err().kind(), ErrorKind::Unsupported);
    // A single-gradient step refuses what a perturbed one refuses.
    let mut opt = Optimizer::new(Config {
        backend: Backend::Cpu,
        base: BaseOptimizer::Sgd,
        schedule: Schedule::Interval { k: 2 },
        ..Config::default()
    })
    .unwrap();
    let id = opt.add_tensor(&[1.0f32; 4]).unwrap();
    for expected in [FirstStep::Perturbed, FirstStep::SingleGradient] {
        opt.write_grad(id, &[0.5f32; 4]).unwrap();
        assert_eq!(opt.first_step().unwrap(), expected);
        assert_eq!(opt.first_step().unwrap_err().kind(), ErrorKind::InvalidState);
        assert_eq!(opt.save_state(&mut [0u8; 4096]).unwrap_err().kind(), ErrorKind::InvalidState);
        opt.second_step().unwrap();
    }
    assert!(opt.set_rho(0.0).is_err() && opt.set_rho(f64::NAN).is_err());
}

/// Host buffers on the GPU engine (staged through the device): single-gradient updates reach the
/// host's weights, and LookSAM's direction (no base) the host's writable gradients, as on the CPU.
#[test]
fn staged_host_buffers_on_the_gpu_match_the_cpu() {
    let look = Schedule::LookSam { k: 3, alpha: 0.7 };
    for base in [BaseOptimizer::Sgd, BaseOptimizer::None] {
        let mut results = Vec::new();
        for backend in [Backend::Cpu, Backend::Gpu] {
            let config = Config { backend, base, lr: 0.1, momentum: 0.5, schedule: look, ..Config::default() };
            let Some(mut opt) = optimizer_or_skip(config) else { return };
            let mut rng = Rng::new(8);
            let mut w: Vec<f32> = (0..777).map(|_| rng.sym(1.0) as f32).collect();
            let mut g = vec![0f32; 777];
            // SAFETY: both outlive the optimizer and are only touched between its calls.
            unsafe {
                opt.register_host_writable_raw(w.as_mut_ptr().cast(), g.as_mut_ptr().cast(), 777, samopt::DType::F32)
                    .unwrap()
            };
            let mut grads_seen = Vec::new();
            for _ in 0..7 {
                let scale = 0.2 + rng.unit() as f32;
                g.iter_mut().for_each(|x| *x = scale * rng.sym(0.5) as f32);
                let g2: Vec<f32> = (0..777).map(|_| scale * rng.sym(0.5) as f32).collect();
                if opt.first_step().unwrap() == FirstStep::Perturbed {
                    g.copy_from_slice(&g2);
                }
                opt.second_step().unwrap();
                if base == BaseOptimizer::None {
                    // The host's optimizer: plain SGD on what the gradient buffer holds now.
                    w.iter_mut().zip(&g).for_each(|(w, g)| *w -= 0.1 * g);
                }
                grads_seen.push(g.clone());
            }
            drop(opt);
            results.push((w, grads_seen));
        }
        let (cpu, gpu) = (&results[0], &results[1]);
        for (a, b) in cpu.0.iter().zip(&gpu.0).chain(cpu.1.iter().flatten().zip(gpu.1.iter().flatten())) {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{base:?}: CPU {a}, GPU {b}");
        }
    }
}
