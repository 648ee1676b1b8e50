//! `samopt demo`: the same MLP trained on noisy labels with SGD alone and with SAM around the same
//! SGD (under a step schedule, or several of them in the comparison mode), then compared on clean
//! test accuracy, sharpness and the gradient evaluations each run paid for.

use std::time::Instant;

use samopt::half::{bf16, f16};
use samopt::{Backend, BaseOptimizer, Config, DType, Element, FirstStep, LossScale, Optimizer, Schedule, SecondStep};

use crate::data::{Dataset, Rng};
use crate::mlp::Mlp;
use crate::schedule::Spec;

/// The training setup shared by every run.
#[derive(Clone, Debug)]
pub struct Setup {
    pub hidden: usize,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub rho: f64,
    pub adaptive: bool,
    pub backend: Backend,
    /// Use samopt's built-in SGD, fused with the restore, instead of the host's own.
    pub fused: bool,
    pub seed: u64,
    /// Mixed precision (`--amp`); `None`: f32 throughout.
    pub amp: Option<Amp>,
}

/// Mixed precision as it is trained today: the host's weights and gradients are 16-bit tensors
/// (registered with samopt as such), the matrix products run in f32 on the widened weights, the
/// gradient is multiplied by the loss scale and rounded to the 16-bit type, and samopt keeps the
/// loss scale, skips overflowing steps and (with `master_weights`) updates f32 master copies with
/// its fused SGD. Every run uses samopt's SGD then, the SGD run included (a schedule that never
/// takes a SAM step), so that all runs share the same precision path.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Amp {
    /// [`DType::BF16`] or [`DType::F16`].
    pub dtype: DType,
    pub master_weights: bool,
    pub loss_scale: LossScale,
}

impl Amp {
    /// Whether the loss scale never changes (`--loss-scale S`).
    pub fn fixed_scale(&self) -> bool {
        self.loss_scale == LossScale::fixed(self.loss_scale.init)
    }

    /// One line for the output's header: the mode.
    pub fn describe(&self) -> String {
        let l = self.loss_scale;
        let scale = if self.fixed_scale() {
            format!("fixed loss scale {}", scale_text(l.init))
        } else {
            format!(
                "dynamic loss scale ({} at the start, x{} after {} good steps, x{} on overflow)",
                scale_text(l.init),
                l.growth_factor,
                l.growth_interval,
                l.backoff_factor
            )
        };
        let name = self.dtype.name();
        let master = if self.master_weights {
            "f32 master weights in samopt".to_owned()
        } else {
            format!("no master weights (samopt's SGD updates the {name} weights themselves)")
        };
        format!("{name} weights and gradients (matmuls in f32 on the widened weights), {master}, {scale}")
    }
}

/// Per-epoch curves.
#[derive(Clone, Debug, Default)]
pub struct History {
    pub train_loss: Vec<f64>,
    pub test_accuracy: Vec<f64>,
}

/// What one run trains with: the base SGD alone, or SAM around it under a step schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    Sgd,
    Sam(Spec),
}

impl Method {
    /// The run's name in tables, plots and JSON: `sgd`, `sam` (every step), or the schedule's
    /// specification (`interval:10`, `looksam:5:0.7`, ...), which is SAM under that schedule.
    pub fn label(self) -> String {
        match self {
            Method::Sgd => "sgd".into(),
            Method::Sam(Spec::Every) => "sam".into(),
            Method::Sam(spec) => spec.to_string(),
        }
    }
}

/// A loss scale as the output prints it: plainly from 10^-3 to 10^7 (the powers of two a dynamic
/// scale takes print whole), else in exponent notation.
pub fn scale_text(s: f64) -> String {
    if (1e-3..=1e7).contains(&s) { format!("{s}") } else { format!("{s:e}") }
}

/// One run's results.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// `sgd` or `sam`.
    pub optimizer: &'static str,
    /// The SAM run's schedule (`None` for SGD).
    pub schedule: Option<Spec>,
    /// [`Method::label`].
    pub label: String,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub test_accuracy: f64,
    /// Loss increase at the worst point found by projected gradient ascent inside the rho-ball.
    pub sharpness: f64,
    /// Mean loss increase under random perturbations of norm rho.
    pub sharpness_random: f64,
    /// Wall time of the training steps (without the per-epoch test evaluation of the curves).
    pub wall_s: f64,
    pub seconds_per_step: f64,
    pub steps: u64,
    /// Forward/backward passes the training loop ran (one per SGD step, two per SAM step, one
    /// per single-gradient step).
    pub grad_evals: u64,
    /// The optimizer's own counters (`None` for SGD, which samopt runs only under `--amp`).
    pub sam_steps: Option<u64>,
    pub single_steps: Option<u64>,
    /// Under `--amp`: the loss scale at the end of the run, and the steps skipped because the
    /// scaled gradient overflowed (inf or NaN in the 16-bit gradient), of [`steps`](Self::steps).
    pub loss_scale: Option<f64>,
    pub skipped_steps: Option<u64>,
    pub backend: String,
    pub history: History,
}

impl RunResult {
    /// Gradient evaluations per step, relative to SGD's one: 1 for SGD, 2 for SAM on every step.
    pub fn grad_evals_per_step(&self) -> f64 {
        self.grad_evals as f64 / self.steps.max(1) as f64
    }
}

/// The host's own SGD with momentum and L2 weight decay (PyTorch's semantics), the base optimizer
/// of every run unless `fused`.
struct HostSgd {
    buffers: Vec<Vec<f32>>,
    started: bool,
}

impl HostSgd {
    fn step(&mut self, net: &mut Mlp, s: &Setup, lr: f64) {
        for ((w, g), b) in net.params.iter_mut().zip(&net.grads).zip(&mut self.buffers) {
            for ((w, &g), b) in w.iter_mut().zip(g).zip(b.iter_mut()) {
                let d = g + s.weight_decay as f32 * *w;
                *b = if self.started { s.momentum as f32 * *b + d } else { d };
                *w -= lr as f32 * *b;
            }
        }
        self.started = true;
    }
}

/// The host's 16-bit weights and gradients of a mixed-precision run, shaped as the network's.
struct LowTensors<T> {
    params: Vec<Vec<T>>,
    grads: Vec<Vec<T>>,
}

/// What the training loop does with the 16-bit tensors, whatever their type.
trait HostTensors {
    /// The network's f32 weights become the 16-bit weights, widened (exactly).
    fn widen_into(&self, net: &mut Mlp);
    /// The 16-bit gradients become the network's f32 gradients times `scale`, rounded to nearest
    /// (inf where the scaled gradient overflows the type). Scales `net.grads` in place.
    fn store_scaled_grads(&mut self, net: &mut Mlp, scale: f32);
    /// Registers every weight/gradient pair with `opt`.
    fn register(&mut self, opt: &mut Optimizer) -> Result<(), String>;
}

impl<T: Element + Default> HostTensors for LowTensors<T> {
    fn widen_into(&self, net: &mut Mlp) {
        for (w, low) in net.params.iter_mut().zip(&self.params) {
            T::widen(low, w);
        }
    }

    fn store_scaled_grads(&mut self, net: &mut Mlp, scale: f32) {
        for (g, low) in net.grads.iter_mut().zip(&mut self.grads) {
            g.iter_mut().for_each(|v| *v *= scale);
            T::narrow(g, low);
        }
    }

    fn register(&mut self, opt: &mut Optimizer) -> Result<(), String> {
        for (w, g) in self.params.iter_mut().zip(&self.grads) {
            // SAFETY: the vectors are never resized and outlive `opt` (dropped before them at the
            // end of the run); they are only touched between optimizer calls.
            unsafe { opt.register_host(w.as_mut_ptr(), g.as_ptr(), w.len()) }.map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// The network's initial weights rounded to `T`, and zero gradients.
fn low_tensors<T: Element + Default>(net: &Mlp) -> LowTensors<T> {
    let params = net
        .params
        .iter()
        .map(|w| {
            let mut low = vec![T::default(); w.len()];
            T::narrow(w, &mut low);
            low
        })
        .collect();
    LowTensors { params, grads: net.params.iter().map(|w| vec![T::default(); w.len()]).collect() }
}

fn accuracy(net: &mut Mlp, d: &Dataset) -> f64 {
    let mut correct = 0;
    for start in (0..d.len()).step_by(1024) {
        let end = (start + 1024).min(d.len());
        correct += net.run(&d.x[start * d.dim..end * d.dim], &d.y[start..end], false).1;
    }
    correct as f64 / d.len() as f64
}

fn full_loss(net: &mut Mlp, d: &Dataset, grad: bool) -> (f64, usize) {
    net.run(&d.x, &d.y, grad)
}

/// Cosine decay from `lr` to 0 over the run.
fn schedule(s: &Setup, step: usize, total: usize) -> f64 {
    0.5 * s.lr * (1.0 + (std::f64::consts::PI * step as f64 / total as f64).cos())
}

/// Trains a fresh network on `train` (noisy labels) with `method`.
pub fn train(
    s: &Setup,
    train: &Dataset,
    test: &Dataset,
    method: Method,
    progress: &dyn Fn(usize),
) -> Result<RunResult, String> {
    let sizes = [train.dim, s.hidden, s.hidden, train.classes];
    let mut net = Mlp::new(&sizes, s.seed);
    let mut host_sgd = HostSgd { buffers: net.params.iter().map(|p| vec![0.0; p.len()]).collect(), started: false };
    let steps_per_epoch = train.len().div_ceil(s.batch);
    let total = s.epochs * steps_per_epoch;

    // Under --amp the host's tensors are 16-bit copies that samopt steps (and the SGD run goes
    // through samopt too, on single-gradient steps only); the f32 network computes with them widened.
    let mut low: Option<Box<dyn HostTensors>> = s.amp.map(|amp| -> Box<dyn HostTensors> {
        match amp.dtype {
            DType::F16 => Box::new(low_tensors::<f16>(&net)),
            _ => Box::new(low_tensors::<bf16>(&net)),
        }
    });
    if let Some(low) = &low {
        low.widen_into(&mut net);
    }
    let step_schedule = match (method, s.amp) {
        (Method::Sam(spec), _) => Some((spec.schedule(s.seed, total as u64), spec.to_string())),
        // SGD through samopt: every step a single-gradient step (p = 0: never SAM), d = g.
        (Method::Sgd, Some(_)) => Some((Schedule::Random { p: 0.0, seed: s.seed }, "sgd".to_owned())),
        (Method::Sgd, None) => None,
    };
    let fused = s.fused || s.amp.is_some();
    let mut optimizer = if let Some((schedule, name)) = step_schedule {
        let config = Config {
            rho: s.rho,
            adaptive: s.adaptive,
            eta: if s.adaptive { 0.01 } else { 0.0 },
            backend: s.backend,
            base: if fused { BaseOptimizer::Sgd } else { BaseOptimizer::None },
            lr: s.lr,
            momentum: s.momentum,
            weight_decay: Some(s.weight_decay),
            schedule,
            loss_scale: s.amp.map(|a| a.loss_scale),
            master_weights: s.amp.is_some_and(|a| a.master_weights),
            ..Config::default()
        };
        let mut opt = Optimizer::new(config).map_err(|e| match method {
            Method::Sam(_) => format!("--schedule {name}: {e}"),
            Method::Sgd => format!("--amp (the SGD run): {e}"),
        })?;
        if let Some(low) = low.as_mut() {
            low.register(&mut opt)?;
        } else {
            // LookSAM with the demo's own SGD: samopt writes LookSAM's direction into the gradient
            // buffers on single-gradient steps, and the SGD below steps with it. That needs the
            // explicit opt-in to writes; every other run registers its gradients read-only.
            let writable = matches!(method, Method::Sam(spec) if spec.writes_gradients()) && !fused;
            for (w, g) in net.params.iter_mut().zip(&mut net.grads) {
                // SAFETY: the network's vectors are never resized and outlive `opt`; they are only
                // touched between optimizer calls.
                unsafe {
                    if writable {
                        opt.register_host_writable(w.as_mut_ptr(), g.as_mut_ptr(), w.len())
                    } else {
                        opt.register_host(w.as_mut_ptr(), g.as_ptr(), w.len())
                    }
                }
                .map_err(|e| e.to_string())?;
            }
        }
        Some(opt)
    } else {
        None
    };
    let backend = optimizer.as_ref().map_or_else(|| "host sgd".to_owned(), |o| o.backend_description());

    let mut rng = Rng::new(s.seed.wrapping_add(99));
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut history = History::default();
    let mut xb = Vec::with_capacity(s.batch * train.dim);
    let mut yb = Vec::with_capacity(s.batch);
    let mut step = 0;
    let mut grad_evals = 0u64;
    // Under --amp: steps the loss scale skipped at the first step (one gradient spent) and at the
    // second (two).
    let (mut skipped_first, mut skipped_second) = (0u64, 0u64);
    let mut wall_s = 0.0;
    for epoch in 0..s.epochs {
        let started = Instant::now();
        rng.shuffle(&mut order);
        let mut loss_sum = 0.0;
        for chunk in order.chunks(s.batch) {
            xb.clear();
            yb.clear();
            for &i in chunk {
                xb.extend_from_slice(train.row(i));
                yb.push(train.y[i]);
            }
            let lr = schedule(s, step, total);
            let (loss, _) = net.run(&xb, &yb, true);
            grad_evals += 1;
            loss_sum += loss * chunk.len() as f64;
            match optimizer.as_mut() {
                Some(opt) => {
                    // The loss times S, as GradScaler's host does: here the f32 gradient times S,
                    // rounded to the 16-bit type (where it may overflow).
                    let scale = opt.loss_scale().unwrap_or(1.0) as f32;
                    if let Some(low) = low.as_mut() {
                        low.store_scaled_grads(&mut net, scale);
                    }
                    // The one loop for every schedule: a SAM step moved w to w + e(w) and wants
                    // the gradient there; a single-gradient step moved nothing and wants none,
                    // nor does a step the loss scale skipped (overflow).
                    let first = opt.first_step().map_err(|e| e.to_string())?;
                    if first == FirstStep::Perturbed {
                        if let Some(low) = low.as_mut() {
                            low.widen_into(&mut net); // the perturbed 16-bit weights
                        }
                        net.run(&xb, &yb, true); // the gradient at w + e(w)
                        grad_evals += 1;
                        if let Some(low) = low.as_mut() {
                            low.store_scaled_grads(&mut net, scale);
                        }
                    }
                    if fused {
                        opt.set_lr(lr).map_err(|e| e.to_string())?;
                        // (restore +) SGD, one pass; or the end of a skipped step, w restored.
                        let second = opt.second_step().map_err(|e| e.to_string())?;
                        match (first, second) {
                            (FirstStep::Skipped, _) => skipped_first += 1,
                            (_, SecondStep::Skipped) => skipped_second += 1,
                            _ => {}
                        }
                        if let Some(low) = low.as_mut() {
                            low.widen_into(&mut net); // the updated (or restored) 16-bit weights
                        }
                    } else {
                        // Back to w (a SAM step); the gradients hold the direction to step with.
                        opt.second_step().map_err(|e| e.to_string())?;
                        host_sgd.step(&mut net, s, lr);
                    }
                }
                None => host_sgd.step(&mut net, s, lr),
            }
            step += 1;
        }
        wall_s += started.elapsed().as_secs_f64();
        history.train_loss.push(loss_sum / train.len() as f64);
        history.test_accuracy.push(accuracy(&mut net, test));
        progress(epoch + 1);
    }
    let counters = optimizer.as_ref().map(|o| (o.sam_steps(), o.single_steps(), o.steps()));
    let skipped = skipped_first + skipped_second;
    if let Some((sam, single, steps)) = counters
        && (sam + single != steps
            || steps + skipped != total as u64
            || 2 * sam + single + skipped_first + 2 * skipped_second != grad_evals)
    {
        return Err(format!(
            "{}: samopt counted {sam} SAM and {single} single-gradient steps of {steps} (and the demo {skipped} \
             skipped), but the demo ran {total} steps and {grad_evals} gradient evaluations",
            method.label()
        ));
    }
    let loss_scale = optimizer.as_ref().and_then(Optimizer::loss_scale);
    drop(optimizer);
    // The f32 network now holds the final weights: the 16-bit ones widened under --amp.
    drop(low);

    let (train_loss, correct) = full_loss(&mut net, train, false);
    let (sharpness, sharpness_random) = sharpness(&mut net, train, s.rho, s.seed);
    Ok(RunResult {
        optimizer: if method == Method::Sgd { "sgd" } else { "sam" },
        schedule: if let Method::Sam(spec) = method { Some(spec) } else { None },
        label: method.label(),
        train_loss,
        train_accuracy: correct as f64 / train.len() as f64,
        test_accuracy: accuracy(&mut net, test),
        sharpness,
        sharpness_random,
        wall_s,
        seconds_per_step: wall_s / total as f64,
        steps: total as u64,
        grad_evals,
        sam_steps: counters.map(|c| c.0),
        single_steps: counters.map(|c| c.1),
        loss_scale,
        skipped_steps: s.amp.map(|_| skipped),
        backend,
        history,
    })
}

/// How much the training loss can rise inside the ball `||e|| <= rho` around the trained weights:
/// by projected normalised gradient ascent (8 steps of rho/4), and on average under 8 random
/// directions of norm rho. Both on the whole training set, as trained (noisy labels).
fn sharpness(net: &mut Mlp, d: &Dataset, rho: f64, seed: u64) -> (f64, f64) {
    let w0 = net.params.clone();
    let (base, _) = full_loss(net, d, false);
    let norm = |v: &[Vec<f32>]| v.iter().flatten().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let set = |net: &mut Mlp, e: &[Vec<f32>]| {
        for ((w, w0), e) in net.params.iter_mut().zip(&w0).zip(e) {
            for ((w, &w0), &e) in w.iter_mut().zip(w0).zip(e) {
                *w = w0 + e;
            }
        }
    };
    let mut e: Vec<Vec<f32>> = w0.iter().map(|w| vec![0.0; w.len()]).collect();
    let mut worst = 0.0f64;
    for _ in 0..8 {
        set(net, &e);
        let (loss, _) = full_loss(net, d, true);
        worst = worst.max(loss - base);
        let gn = norm(&net.grads).max(1e-12);
        for (e, g) in e.iter_mut().zip(&net.grads) {
            e.iter_mut().zip(g).for_each(|(e, &g)| *e += (rho / 4.0 / gn) as f32 * g);
        }
        let en = norm(&e);
        if en > rho {
            e.iter_mut().flatten().for_each(|x| *x *= (rho / en) as f32);
        }
    }
    set(net, &e);
    worst = worst.max(full_loss(net, d, false).0 - base);

    let mut rng = Rng::new(seed ^ 0x5EED);
    let mut random = 0.0;
    for _ in 0..8 {
        let mut u: Vec<Vec<f32>> = w0.iter().map(|w| w.iter().map(|_| rng.normal() as f32).collect()).collect();
        let un = norm(&u);
        u.iter_mut().flatten().for_each(|x| *x *= (rho / un) as f32);
        set(net, &u);
        random += (full_loss(net, d, false).0 - base) / 8.0;
    }
    net.params = w0;
    (worst, random)
}
