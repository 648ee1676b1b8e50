//! Per step, samopt's passes on Burn's own buffers beside Burn's own SGD step over the same
//! parameters, both on the device and timed in the same run, for a model with a real model's
//! parameter sizes (ResNet-50's 161 tensors, 25.6M parameters, or GPT-2 small's 148, 124M).
//!
//!     cargo run --release --example bench -- --layout resnet50 --steps 10
//!
//! samopt's side is its first and second step (norm, perturbation, restore and the fused
//! SGD update, each waited for), plus finding and binding the gradients Burn's backward produced
//! (and copying the ones it cannot bind in place). Burn's side is `Sgd::step` (with momentum and
//! weight decay: the same update), waited for. A device copy of the parameters' bytes gives the
//! bandwidth scale. Burn's forward/backward runs in both and is not counted in either.

use std::time::{Duration, Instant};

use burn::module::{Module, Param};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Distribution, Tensor};
use clap::Parser;
use samopt::{BaseOptimizer, Config};
use samopt_burn::Sam;

const LAYOUTS: &str = include_str!("../../../benches/param_layouts.json");

#[derive(Parser, Debug)]
struct Args {
    /// Parameter sizes: resnet50 (161 tensors, 25.6M) or gpt2_small (148 tensors, 124M).
    #[arg(long, default_value = "resnet50")]
    layout: String,
    /// Timed steps (after one untimed warm-up step each).
    #[arg(long, default_value = "10")]
    steps: usize,
    /// Scale every tensor's size down by this factor (a quick run on a slow device).
    #[arg(long, default_value = "1")]
    shrink: usize,
}

/// Parameters only: the sizes of a real model, each a 1-D tensor.
#[derive(Module, Debug)]
struct Flat {
    params: Vec<Param<Tensor<1>>>,
}

impl Flat {
    /// A loss whose gradient is cheap to compute and different for every element: sum(w * w) / 2
    /// plus a fixed ramp, so the backward gives w + c.
    fn loss(&self) -> Tensor<1> {
        let mut total: Option<Tensor<1>> = None;
        for p in &self.params {
            let w = p.val();
            let term = (w.clone() * w).sum().mul_scalar(0.5);
            total = Some(match total {
                None => term,
                Some(t) => t + term,
            });
        }
        total.expect("at least one parameter")
    }
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn main() {
    let a = Args::parse();
    let layouts: serde_json_lite::Layouts = serde_json_lite::parse(LAYOUTS);
    let sizes: Vec<usize> = layouts
        .get(&a.layout)
        .unwrap_or_else(|| panic!("--layout {}: resnet50 or gpt2_small", a.layout))
        .iter()
        .map(|&n| (n / a.shrink.max(1)).max(1))
        .collect();
    let total: usize = sizes.iter().sum();
    let (device, setup) = samopt_burn::init_wgpu().expect("Burn's wgpu runtime");
    let info = setup.adapter.get_info();
    let ad = device.clone().autodiff();
    let make = || Flat {
        params: sizes
            .iter()
            .map(|&n| Param::from_tensor(Tensor::<1>::random([n], Distribution::Uniform(-1.0, 1.0), &ad)))
            .collect(),
    };
    let (lr, momentum, wd) = (1e-3, 0.9, 5e-4);
    println!(
        "samopt-burn bench: {} ({} tensors, {:.1}M f32 parameters), Burn 0.22.1 on {} ({:?}), fusion {}",
        a.layout,
        sizes.len(),
        total as f64 / 1e6,
        info.name,
        info.backend,
        if cfg!(feature = "fusion") { "on" } else { "off" }
    );

    // samopt: SAM with its fused SGD, on Burn's buffers.
    let mut model = make();
    let config = Config { base: BaseOptimizer::Sgd, lr, momentum, weight_decay: Some(wd), ..Config::default() };
    let mut sam = Sam::new(&ad, &setup, config).expect("samopt on Burn's device");
    sam.time_steps(true);
    let (mut passes, mut bind) = (Vec::new(), Vec::new());
    for step in 0..=a.steps {
        sam.step(&mut model, |m| m.loss()).expect("a SAM step");
        if step > 0 {
            passes.push(sam.last_times().passes);
            bind.push(sam.last_times().bind);
        }
    }
    // One more step with the device's timestamps, where it has them: the passes' own GPU time.
    let timed = sam.optimizer().enable_pass_timing();
    sam.step(&mut model, |m| m.loss()).expect("a SAM step");
    let gpu = if timed { sam.optimizer().pass_times() } else { None };
    let placement = sam.placement();
    let copy = sam.optimizer().time_device_copy((total * 4) as u64, 5).expect("a device copy");
    // Nanoseconds per copy; the fastest of five.
    let copy_ms = copy.iter().map(|c| c.0).fold(f64::INFINITY, f64::min) / 1e6;
    drop(model);

    // Burn: its SGD with momentum and weight decay, the same update.
    let mut model = make();
    let mut sgd = SgdConfig::new()
        .with_momentum(Some(MomentumConfig { momentum, dampening: 0.0, nesterov: false }))
        .with_weight_decay(Some(WeightDecayConfig { penalty: wd as f32 }))
        .init();
    let mut burn = Vec::new();
    for step in 0..=a.steps {
        let grads = GradientsParams::from_grads(model.loss().backward(), &model);
        device.sync().expect("sync");
        let t = Instant::now();
        model = sgd.step(lr, model, grads);
        device.sync().expect("sync");
        if step > 0 {
            burn.push(t.elapsed());
        }
    }
    let (p, b, s) = (median(passes), median(bind), median(burn));
    let bytes = (total * 4) as f64;
    println!("{:<44} {:>10} {:>12}", "per step (median of the timed steps)", "ms", "x Burn SGD");
    println!("{:<44} {:>10.2} {:>12.2}", "Burn Sgd::step (momentum, weight decay)", s, 1.0);
    println!("{:<44} {:>10.2} {:>12.2}", "samopt SAM passes (norm, perturb, restore+SGD)", p, p / s);
    println!("{:<44} {:>10.2} {:>12.2}", "samopt binding Burn's gradients (2 backward)", b, b / s);
    println!("{:<44} {:>10.2} {:>12.2}", "device copy of the parameters' bytes", copy_ms, copy_ms / s);
    if let Some(t) = gpu {
        println!(
            "samopt's passes on the device (timestamps): norm {:.2} ms, perturbation {:.2} ms, restore + SGD {:.2} ms \
             (the second gradient's reduction is not timed)",
            t.norm_ns / 1e6,
            t.perturb_ns / 1e6,
            t.restore_ns / 1e6
        );
    }
    println!(
        "placement: {} parameters in Burn's buffers ({} padded in their allocation, {} copied once); {} gradients \
         ({} bytes) copied per step",
        placement.params, placement.padded, placement.moves, placement.staged_grads, placement.staged_bytes
    );
    println!(
        "samopt passes move about {:.1} GB/s ({} bytes of parameters), the copy {:.1} GB/s",
        // norm: read g; perturb: read w, g, write w and the backup; second: read g', backup,
        // momentum, write w and momentum: 11 words per parameter.
        11.0 * bytes / (p / 1e3) / 1e9,
        bytes as u64,
        2.0 * bytes / (copy_ms / 1e3) / 1e9
    );
}

/// The two lists of `param_layouts.json`, read without a JSON dependency.
mod serde_json_lite {
    pub type Layouts = std::collections::HashMap<String, Vec<usize>>;

    pub fn parse(text: &str) -> Layouts {
        let mut out = Layouts::new();
        for key in ["resnet50", "gpt2_small"] {
            let at = text.find(&format!("\"{key}\"")).expect("the layout is in the file");
            let open = at + text[at..].find('[').expect("a list");
            let close = open + text[open..].find(']').expect("a closed list");
            let sizes = text[open + 1..close].split(',').map(|n| n.trim().parse().expect("a size")).collect();
            out.insert(key.to_owned(), sizes);
        }
        out
    }
}
