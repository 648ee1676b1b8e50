//! Loss scaling (`Config::loss_scale`, PyTorch GradScaler's rule): a run whose host multiplies its
//! loss by the scale (so every gradient is `S` times the true one), with overflows injected into
//! either gradient, ends with exactly the weights of an unscaled run that simply leaves the
//! overflowing steps out, bit for bit (the scales are powers of two, so every unscale is exact);
//! the scale follows GradScaler's rule, written here, step by step. Also: the overflow of a first
//! gradient is a skipped step, not an error; the host's own optimizer; checkpoints; sharded
//! workers skipping together. CPU and GPU.

mod common;

use common::{Rng, ThreadAllReduce, optimizer_or_skip};
use samopt::{Backend, BaseOptimizer, Config, ErrorKind, FirstStep, LossScale, Optimizer, Schedule, SecondStep};

const LENS: [usize; 3] = [5, 1000, 2049];
const STEPS: usize = 30;

/// Where a step overflows: none, in the first gradient, or in the second.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Overflow {
    None,
    First,
    Second,
}

fn overflow_at(step: usize) -> Overflow {
    match step {
        4 | 11 | 12 => Overflow::First,
        7 | 19 => Overflow::Second,
        _ => Overflow::None,
    }
}

/// GradScaler's rule, written out: back off on an overflow, grow after `interval` good steps.
struct RefScaler {
    scale: f64,
    good: u64,
    l: LossScale,
}

impl RefScaler {
    fn update(&mut self, overflow: bool) {
        if overflow {
            self.scale *= self.l.backoff_factor;
            self.good = 0;
        } else {
            self.good += 1;
            if self.good == self.l.growth_interval {
                self.scale *= self.l.growth_factor;
                self.good = 0;
            }
        }
    }
}

fn add(opt: &mut Optimizer, rng: &mut Rng) {
    for &n in &LENS {
        let w: Vec<f32> = (0..n).map(|_| rng.sym(1.0) as f32).collect();
        opt.add_tensor(&w).unwrap();
    }
}

fn weights(opt: &mut Optimizer) -> Vec<Vec<f32>> {
    LENS.iter()
        .enumerate()
        .map(|(k, &n)| {
            let mut out = vec![0f32; n];
            opt.read_param(k as u32, &mut out).unwrap();
            out
        })
        .collect()
}

fn write_grads(opt: &mut Optimizer, g: &[Vec<f32>], scale: f32, poison: bool) {
    for (k, gk) in g.iter().enumerate() {
        let mut v: Vec<f32> = gk.iter().map(|x| x * scale).collect();
        if poison {
            let at = k * 3 % v.len();
            v[at] = if k == 1 { f32::INFINITY } else { f32::NAN };
        }
        opt.write_grad(k as u32, &v).unwrap();
    }
}

#[test]
fn scaled_run_equals_the_unscaled_run_without_its_overflowing_steps() {
    let l = LossScale { init: 1024.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 3 };
    for backend in [Backend::Cpu, Backend::Gpu] {
        let sgd = Config { backend, base: BaseOptimizer::Sgd, lr: 0.1, momentum: 0.9, eps: 0.0, ..Config::default() };
        let configs = [
            sgd.clone(),
            Config { backend, base: BaseOptimizer::AdamW, lr: 0.01, eps: 0.0, ..Config::default() },
            Config { gsam_alpha: Some(0.3), max_grad_norm: Some(5.0), ..sgd.clone() },
            Config { schedule: Schedule::LookSam { k: 3, alpha: 0.7 }, max_grad_norm: Some(5.0), ..sgd.clone() },
            Config { schedule: Schedule::ae_sam(STEPS as u64), ..sgd.clone() },
        ];
        for plain in configs {
            let scaled = Config { loss_scale: Some(l), ..plain.clone() };
            let (Some(mut a), Some(mut b)) = (optimizer_or_skip(plain.clone()), optimizer_or_skip(scaled)) else {
                return;
            };
            // The same weights in both runs, then the gradients from their own generator.
            add(&mut a, &mut Rng::new(3));
            add(&mut b, &mut Rng::new(3));
            let mut rng = Rng::new(4);
            let mut reference = RefScaler { scale: l.init, good: 0, l };
            for step in 0..STEPS {
                let g1: Vec<Vec<f32>> = LENS.iter().map(|&n| (0..n).map(|_| rng.sym(0.5) as f32).collect()).collect();
                let g2: Vec<Vec<f32>> = LENS.iter().map(|&n| (0..n).map(|_| rng.sym(0.5) as f32).collect()).collect();
                let overflow = overflow_at(step);
                let label = format!("{backend:?} {:?} {:?} step {step} ({overflow:?})", plain.base, plain.schedule);
                // The host: its loss times the current scale, so its gradients are S g.
                let s = b.loss_scale().unwrap();
                assert_eq!(s, reference.scale, "{label}: the scale");
                write_grads(&mut b, &g1, s as f32, overflow == Overflow::First);
                let first = b.first_step().unwrap();
                if overflow == Overflow::First {
                    assert_eq!(first, FirstStep::Skipped, "{label}");
                } else if first == FirstStep::Perturbed {
                    write_grads(&mut b, &g2, s as f32, overflow == Overflow::Second);
                }
                let second = b.second_step().unwrap();
                reference.update(overflow != Overflow::None);
                if overflow != Overflow::None {
                    assert_eq!(second, SecondStep::Skipped, "{label}");
                } else {
                    // The unscaled run takes the same step with the true gradients.
                    write_grads(&mut a, &g1, 1.0, false);
                    let first_a = a.first_step().unwrap();
                    assert_eq!(first_a, first, "{label}: the schedule decided differently");
                    if first_a == FirstStep::Perturbed {
                        write_grads(&mut a, &g2, 1.0, false);
                    }
                    assert_eq!(a.second_step().unwrap(), second, "{label}");
                    assert_eq!(a.grad_norm(), b.grad_norm(), "{label}: the reported norm is the true one");
                }
                let (wa, wb) = (weights(&mut a), weights(&mut b));
                assert!(wa == wb, "{label}: the weights differ from the unscaled run's");
            }
            assert_eq!(b.loss_scale().unwrap(), reference.scale);
            assert_eq!(b.steps(), a.steps(), "skipped steps are not counted");
        }
    }
}

/// Without loss scaling a non-finite first gradient is an error; with it, a skipped step that the
/// host's unchanged loop absorbs. The host's own optimizer (no base) reads the scale before the
/// second step and skips when told to.
#[test]
fn overflow_is_a_skip_and_the_host_loop_keeps_its_shape() {
    let mut plain = Optimizer::new(Config { backend: Backend::Cpu, ..Config::default() }).unwrap();
    let id = plain.add_tensor(&[1.0f32, 2.0]).unwrap();
    plain.write_grad(id, &[f32::NAN, 0.0]).unwrap();
    assert_eq!(plain.first_step().unwrap_err().kind(), ErrorKind::NonFinite);

    let config = Config { backend: Backend::Cpu, loss_scale: Some(LossScale::dynamic()), ..Config::default() };
    let mut opt = Optimizer::new(config).unwrap();
    let id = opt.add_tensor(&[1.0f32, 2.0]).unwrap();
    assert_eq!(opt.loss_scale(), Some(65536.0));
    opt.write_grad(id, &[f32::INFINITY, 0.0]).unwrap();
    assert_eq!(opt.first_step().unwrap(), FirstStep::Skipped);
    assert_eq!(opt.param::<f32>(id).unwrap(), &[1.0, 2.0]);
    assert_eq!(opt.loss_scale(), Some(32768.0));
    // The step is still in progress: what needs an idle optimizer is refused until it ends.
    assert_eq!(opt.add_tensor(&[0f32; 2]).unwrap_err().kind(), ErrorKind::InvalidState);
    assert_eq!(opt.second_step().unwrap(), SecondStep::Skipped);
    assert_eq!(opt.loss_scale(), Some(32768.0), "one overflow backs off once");
    // A skipped first step may also be followed directly by the next first step.
    opt.write_grad(id, &[f32::NAN, 0.0]).unwrap();
    assert_eq!(opt.first_step().unwrap(), FirstStep::Skipped);
    assert_eq!(opt.loss_scale(), Some(16384.0));
    // No base: a non-finite second gradient is a skip too (samopt reduces it for the check).
    opt.write_grad(id, &[16384.0, 0.0]).unwrap();
    assert_eq!(opt.first_step().unwrap(), FirstStep::Perturbed);
    opt.write_grad(id, &[0.0, f32::NAN]).unwrap();
    assert_eq!(opt.second_step().unwrap(), SecondStep::Skipped);
    assert_eq!(opt.param::<f32>(id).unwrap(), &[1.0, 2.0], "restored exactly");
    assert_eq!(opt.loss_scale(), Some(8192.0));
    opt.write_grad(id, &[8192.0, 0.0]).unwrap();
    assert_eq!(opt.first_step().unwrap(), FirstStep::Perturbed);
    let scale_of_this_step = opt.loss_scale().unwrap();
    opt.write_grad(id, &[4096.0, 8192.0]).unwrap();
    assert_eq!(opt.second_step().unwrap(), SecondStep::Restored);
    // The host's optimizer: the gradient over the scale it carries.
    let g: Vec<f32> = opt.grad_mut::<f32>(id).unwrap().iter().map(|x| x / scale_of_this_step as f32).collect();
    assert_eq!(g, [0.5, 1.0]);
    assert_eq!(opt.steps(), 1);
}

/// The scale and its count of good steps travel in checkpoints: a resumed run grows the scale at
/// the same step as the run that never stopped.
#[test]
fn checkpoints_carry_the_scale() {
    let l = LossScale { init: 8.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 4 };
    let config =
        Config { backend: Backend::Cpu, base: BaseOptimizer::Sgd, lr: 0.1, loss_scale: Some(l), ..Config::default() };
    let mut a = Optimizer::new(config.clone()).unwrap();
    let mut b = Optimizer::new(config).unwrap();
    let id = a.add_tensor(&[1.0f32; 4]).unwrap();
    b.add_tensor(&[1.0f32; 4]).unwrap();
    let step = |o: &mut Optimizer, poison: bool| {
        let s = o.loss_scale().unwrap() as f32;
        o.write_grad(id, &[0.1 * s, if poison { f32::NAN } else { 0.2 * s }, 0.0, 0.1 * s]).unwrap();
        if o.first_step().unwrap() == FirstStep::Perturbed {
            o.write_grad(id, &[0.2 * s, 0.1 * s, 0.0, 0.1 * s]).unwrap();
        }
        o.second_step().unwrap();
    };
    step(&mut a, true);
    step(&mut a, false);
    step(&mut a, false);
    let mut ck = vec![0u8; a.state_size()];
    a.save_state(&mut ck).unwrap();
    b.load_state(&ck).unwrap();
    b.write_param(id, a.param::<f32>(id).unwrap()).unwrap();
    assert_eq!(b.loss_scale(), Some(4.0));
    for _ in 0..3 {
        step(&mut a, false);
        step(&mut b, false);
        assert_eq!(a.loss_scale(), b.loss_scale());
    }
    assert_eq!(a.loss_scale(), Some(8.0), "grew after 4 good steps");
    assert_eq!(a.param::<f32>(id).unwrap(), b.param::<f32>(id).unwrap());
}

/// Two workers with sharded parameters: an overflow on one worker's shard makes both skip and
/// both back off, at the first or at the second gradient.
#[test]
fn sharded_workers_skip_together() {
    let config = Config {
        backend: Backend::Cpu,
        base: BaseOptimizer::Sgd,
        lr: 0.1,
        loss_scale: Some(LossScale::dynamic()),
        ..Config::default()
    };
    let reduce = ThreadAllReduce::new(2);
    let outcomes: Vec<Vec<(FirstStep, SecondStep, f64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|worker| {
                let (config, reduce) = (config.clone(), reduce.clone());
                scope.spawn(move || {
                    let mut opt = Optimizer::new(config).unwrap();
                    reduce.install(&mut opt);
                    let id = opt.add_tensor(&[1.0f32; 8]).unwrap();
                    let mut seen = Vec::new();
                    for step in 0..4 {
                        let s = opt.loss_scale().unwrap() as f32;
                        let poison_first = step == 1 && worker == 1;
                        let poison_second = step == 2 && worker == 0;
                        let g = if poison_first { f32::INFINITY } else { 0.01 * s };
                        opt.write_grad(id, &[g; 8]).unwrap();
                        let first = opt.first_step().unwrap();
                        if first == FirstStep::Perturbed {
                            let g = if poison_second { f32::NAN } else { 0.02 * s };
                            opt.write_grad(id, &[g; 8]).unwrap();
                        }
                        let second = opt.second_step().unwrap();
                        seen.push((first, second, opt.loss_scale().unwrap()));
                    }
                    seen
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(outcomes[0], outcomes[1], "the workers disagree");
    let kinds: Vec<(FirstStep, SecondStep)> = outcomes[0].iter().map(|&(f, s, _)| (f, s)).collect();
    assert_eq!(
        kinds,
        [
            (FirstStep::Perturbed, SecondStep::Updated),
            (FirstStep::Skipped, SecondStep::Skipped),
            (FirstStep::Perturbed, SecondStep::Skipped),
            (FirstStep::Perturbed, SecondStep::Updated),
        ]
    );
    assert_eq!(outcomes[0][3].2, 65536.0 / 4.0);
}
