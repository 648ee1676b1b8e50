//! A Burn model trained on Burn's wgpu backend, with Burn's SGD and with SAM through samopt, on
//! samopt's demo task (noisy labels) or on `--data`: what a Burn user copies.
//!
//!     cargo run --release --example train            # the embedded task, 40% of labels flipped
//!     cargo run --release --example train -- --data my.csv --epochs 20
//!
//! Both runs start from the same weights and see the same batches; the base update is the same
//! SGD (momentum 0.9, no dampening, weight decay 5e-4, cosine learning rate): Burn's `Sgd` for
//! the plain run, samopt's fused restore + SGD for the SAM run. The first SAM steps are checked
//! against samopt's CPU engine fed the gradients Burn computed at the weights Burn saw.

#[allow(dead_code)]
#[path = "../../../src/bin/samopt/data.rs"]
mod data;

use std::cell::RefCell;
use std::path::PathBuf;
use std::time::Instant;

use burn::module::{Module, ModuleMapper, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use clap::Parser;
use samopt::{Backend, BaseOptimizer, Config, FirstStep, Optimizer};
use samopt_burn::{Sam, read_grads, read_params};

#[derive(Parser, Debug)]
#[command(about = "SGD vs SAM (samopt) for a Burn MLP on Burn's wgpu backend")]
struct Args {
    /// Training epochs, the same for both runs.
    #[arg(long, default_value = "30")]
    epochs: usize,
    /// SAM's radius.
    #[arg(long, default_value = "0.3")]
    rho: f64,
    /// Peak learning rate (cosine decay to 0).
    #[arg(long, default_value = "0.05")]
    lr: f64,
    /// Fraction of training labels flipped to another class (test labels stay clean).
    #[arg(long, default_value = "0.4")]
    noise: f64,
    /// Seed of the sample, the label noise and the batch order.
    #[arg(long, default_value = "1")]
    seed: u64,
    /// Width of the two hidden layers.
    #[arg(long, default_value = "128")]
    hidden: usize,
    /// Mini-batch size.
    #[arg(long, default_value = "64")]
    batch: usize,
    /// Training samples of the embedded task.
    #[arg(long, default_value = "2000")]
    train: usize,
    /// A CSV file (header, a `label` column or the last) or MNIST IDX images (with --labels)
    /// instead of the embedded task; 80% trains, 20% tests.
    #[arg(long)]
    data: Option<PathBuf>,
    /// The IDX label file for --data.
    #[arg(long, requires = "data")]
    labels: Option<PathBuf>,
    /// SAM steps checked against samopt's CPU engine.
    #[arg(long, default_value = "3")]
    check_steps: usize,
}

#[derive(Module, Debug)]
struct Mlp {
    l1: Linear,
    l2: Linear,
    l3: Linear,
}

impl Mlp {
    fn new(dim: usize, hidden: usize, classes: usize, device: &Device) -> Mlp {
        Mlp {
            l1: LinearConfig::new(dim, hidden).init(device),
            l2: LinearConfig::new(hidden, hidden).init(device),
            l3: LinearConfig::new(hidden, classes).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        use burn::tensor::activation::relu;
        self.l3.forward(relu(self.l2.forward(relu(self.l1.forward(x)))))
    }
}

/// A copy of every parameter in a buffer of its own (both runs start from the same weights).
struct DeepCopy;

impl ModuleMapper for DeepCopy {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|w| {
            let device = w.device();
            Tensor::<D>::from_data(w.to_data(), &device).require_grad()
        })
    }
}

struct Batches<'a> {
    set: &'a data::Dataset,
    device: &'a Device,
}

impl Batches<'_> {
    fn get(&self, rows: &[usize]) -> (Tensor<2>, Tensor<1, Int>) {
        let sub = self.set.subset(rows);
        let x = Tensor::<2>::from_data(TensorData::new(sub.x, [rows.len(), sub.dim]), self.device);
        let y = Tensor::<1, Int>::from_data(
            TensorData::new(sub.y.iter().map(|&c| c as i64).collect::<Vec<_>>(), [rows.len()]),
            self.device,
        );
        (x, y)
    }
}

fn accuracy(model: &Mlp, set: &data::Dataset, device: &Device) -> f64 {
    let all: Vec<usize> = (0..set.len()).collect();
    let (x, y) = Batches { set, device }.get(&all);
    let predicted = model.forward(x).argmax(1).reshape([set.len()]);
    let correct: i64 = predicted.equal(y).int().sum().into_scalar();
    correct as f64 / set.len() as f64
}

enum Method {
    Sgd,
    Sam,
}

struct Outcome {
    accuracy: f64,
    seconds: f64,
    check: Option<(f64, f64)>,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> Result<(), String> {
    let (train, test, source, flipped) =
        data::task(a.data.as_deref(), a.labels.as_deref(), (a.train, a.noise, a.seed))?;
    let (device, setup) = samopt_burn::init_wgpu().map_err(|e| e.message().to_owned())?;
    let info = setup.adapter.get_info();
    println!(
        "samopt-burn: Burn 0.22.1 on wgpu ({}, {:?}), fusion {}",
        info.name,
        info.backend,
        if cfg!(feature = "fusion") { "on" } else { "off" }
    );
    println!(
        "data: {source}: {} train ({flipped} labels flipped, {:.0}%), {} test (clean), {} epochs of batch {}",
        train.len(),
        100.0 * a.noise,
        test.len(),
        a.epochs,
        a.batch
    );
    let ad = device.clone().autodiff();
    device.seed(a.seed);
    let init = Mlp::new(train.dim, a.hidden, train.classes, &ad);
    let sgd = train_one(&a, Method::Sgd, init.clone().map(&mut DeepCopy), &train, &test, &ad, &setup)?;
    let sam = train_one(&a, Method::Sam, init.map(&mut DeepCopy), &train, &test, &ad, &setup)?;
    if let Some((perturbed, updated)) = sam.check {
        println!(
            "check: the first {} SAM steps against samopt's CPU engine on the same gradients: largest \
             difference {perturbed:.1e} at w + e(w), {updated:.1e} after the update (relative to max(|w|, 1))",
            a.check_steps
        );
        if perturbed > 1e-5 || updated > 1e-5 {
            return Err("the GPU steps in Burn's buffers differ from the CPU engine".into());
        }
    }
    println!("{:<24} {:>16} {:>10}", "run", "clean test acc", "seconds");
    println!("{:<24} {:>15.1}% {:>10.1}", "SGD (Burn's Sgd)", 100.0 * sgd.accuracy, sgd.seconds);
    println!("{:<24} {:>15.1}% {:>10.1}", format!("SAM (samopt, rho {})", a.rho), 100.0 * sam.accuracy, sam.seconds);
    Ok(())
}

fn train_one(
    a: &Args,
    method: Method,
    mut model: Mlp,
    train: &data::Dataset,
    test: &data::Dataset,
    device: &Device,
    setup: &burn::tensor::wgpu::WgpuSetup,
) -> Result<Outcome, String> {
    let batches = Batches { set: train, device };
    let loss_of = |m: &Mlp, x: &Tensor<2>, y: &Tensor<1, Int>| {
        CrossEntropyLossConfig::new().init(device).forward(m.forward(x.clone()), y.clone())
    };
    let config = Config {
        base: BaseOptimizer::Sgd,
        lr: a.lr,
        momentum: 0.9,
        weight_decay: Some(5e-4),
        rho: a.rho,
        ..Config::default()
    };
    let mut sam = match method {
        Method::Sam => Some(Sam::new(device, setup, config.clone()).map_err(|e| e.message().to_owned())?),
        Method::Sgd => None,
    };
    let mut sgd = SgdConfig::new()
        .with_momentum(Some(MomentumConfig { momentum: 0.9, dampening: 0.0, nesterov: false }))
        .with_weight_decay(Some(WeightDecayConfig { penalty: 5e-4 }))
        .init();
    // The CPU engine the first SAM steps are replayed on.
    let mut cpu: Option<(Optimizer, Vec<samopt::TensorId>)> = None;
    let mut check = (0f64, 0f64);
    let steps_per_epoch = train.len().div_ceil(a.batch);
    let total = (a.epochs * steps_per_epoch) as f64;
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut rng = data::Rng::new(a.seed ^ 0xBA7C);
    let start = Instant::now();
    let mut t = 0usize;
    for _epoch in 0..a.epochs {
        rng.shuffle(&mut order);
        for rows in order.chunks(a.batch) {
            let lr = 0.5 * a.lr * (1.0 + (std::f64::consts::PI * t as f64 / total).cos());
            let (x, y) = batches.get(rows);
            match &mut sam {
                None => {
                    let loss = loss_of(&model, &x, &y);
                    let grads = GradientsParams::from_grads(loss.backward(), &model);
                    model = sgd.step(lr, model, grads);
                }
                Some(sam) => {
                    sam.optimizer().set_lr(lr).map_err(|e| e.message().to_owned())?;
                    if t < a.check_steps {
                        let cpu = cpu.get_or_insert_with(|| {
                            let mut o = Optimizer::new(Config { backend: Backend::Cpu, ..config.clone() })
                                .expect("a valid config");
                            let ids = read_params(&model).iter().map(|(_, w)| o.add_tensor(w).unwrap()).collect();
                            (o, ids)
                        });
                        check = max_pair(check, checked_step(sam, &mut model, cpu, lr, &|m| loss_of(m, &x, &y))?);
                    } else {
                        sam.step(&mut model, |m| loss_of(m, &x, &y)).map_err(|e| e.message().to_owned())?;
                    }
                }
            }
            t += 1;
        }
    }
    device.sync().map_err(|e| format!("{e:?}"))?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(Outcome {
        accuracy: accuracy(&model, test, &device.clone().inner()),
        seconds,
        check: sam.is_some().then_some(check),
    })
}

fn max_pair(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    (a.0.max(b.0), a.1.max(b.1))
}

fn max_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs() / (x.abs().max(1.0) as f64)).fold(0.0, f64::max)
}

/// One SAM step through samopt-burn, replayed on the CPU engine: the loss closure records the
/// weights Burn reads and the gradient there (a backward of its own); the CPU engine takes the
/// same gradients. Returns the largest differences at w + e(w) and after the update.
fn checked_step(
    sam: &mut Sam,
    model: &mut Mlp,
    (cpu, ids): &mut (Optimizer, Vec<samopt::TensorId>),
    lr: f64,
    loss: &dyn Fn(&Mlp) -> Tensor<1>,
) -> Result<(f64, f64), String> {
    let seen = RefCell::new(Vec::new());
    let step = sam
        .step(model, |m| {
            let g = GradientsParams::from_grads(loss(m).backward(), m);
            seen.borrow_mut().push((read_params(m), read_grads(m, &g)));
            loss(m)
        })
        .map_err(|e| e.message().to_owned())?;
    let seen = seen.into_inner();
    let err = |e: samopt::Error| e.message().to_owned();
    cpu.set_lr(lr).map_err(err)?;
    for (k, (_, g)) in seen[0].1.iter().enumerate() {
        cpu.write_grad(ids[k], g).map_err(err)?;
    }
    if cpu.first_step().map_err(err)? != step.kind || step.kind != FirstStep::Perturbed {
        return Err("the CPU engine took another kind of step".into());
    }
    let mut diff = (0f64, 0f64);
    for (k, (_, w)) in seen[1].0.iter().enumerate() {
        let mut want = vec![0f32; w.len()];
        cpu.read_param(ids[k], &mut want).map_err(err)?;
        diff.0 = diff.0.max(max_diff(w, &want));
    }
    for (k, (_, g)) in seen[1].1.iter().enumerate() {
        cpu.write_grad(ids[k], g).map_err(err)?;
    }
    cpu.second_step().map_err(err)?;
    for (k, (_, w)) in read_params(model).iter().enumerate() {
        let mut want = vec![0f32; w.len()];
        cpu.read_param(ids[k], &mut want).map_err(err)?;
        diff.1 = diff.1.max(max_diff(w, &want));
        cpu.write_param(ids[k], w).map_err(err)?;
    }
    Ok(diff)
}
