//! Throughput of the CPU engine's SAM passes beside a plain memory copy of the same bytes, timed
//! alternately in one run (see `samopt::bench` for the bytes each pass must move).
//!
//! Run: `cargo bench --bench step` (options: `--threads N`, `--reps N`, `--gpt2` to add GPT-2 small).
//!
//! A second table times `rebind_host_raw` for every tensor of a layout (what a host that
//! reallocates its buffers every step pays) beside one SAM step (first + second step) on it.

use samopt::bench;
use samopt::{BaseOptimizer, Config, DType, LossScale};

const LAYOUTS: &str = include_str!("param_layouts.json");

fn layout(key: &str) -> Vec<usize> {
    let v: serde_json::Value = serde_json::from_str(LAYOUTS).expect("param_layouts.json parses");
    v[key].as_array().expect("a list of sizes").iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag =
        |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(|s| s.parse().unwrap());
    let threads: usize = flag("--threads").unwrap_or(0);
    let reps: usize = flag("--reps").unwrap_or(15);

    let resnet = layout("resnet50");
    let total: usize = resnet.iter().sum();
    let plain = Config { threads, ..Config::default() };
    let mut cases: Vec<(&str, Vec<usize>, DType, Config)> = vec![
        ("resnet50, 161 tensors", resnet.clone(), DType::F32, plain.clone()),
        ("one tensor", vec![total], DType::F32, plain.clone()),
        ("10k tensors of ~2.5k", (0..10_000).map(|i| total / 10_000 + (i % 3)).collect(), DType::F32, plain.clone()),
        ("resnet50, ASAM", resnet.clone(), DType::F32, Config { adaptive: true, ..plain.clone() }),
        ("resnet50, bf16", resnet.clone(), DType::BF16, plain.clone()),
        ("resnet50, f16", resnet.clone(), DType::F16, plain.clone()),
        (
            "resnet50, SGD momentum",
            resnet.clone(),
            DType::F32,
            Config { base: BaseOptimizer::Sgd, momentum: 0.9, ..plain.clone() },
        ),
        ("resnet50, AdamW", resnet.clone(), DType::F32, Config { base: BaseOptimizer::AdamW, ..plain.clone() }),
        (
            "resnet50, SGD, loss scale",
            resnet.clone(),
            DType::F32,
            Config { base: BaseOptimizer::Sgd, momentum: 0.9, loss_scale: Some(LossScale::dynamic()), ..plain.clone() },
        ),
        (
            "resnet50, SGD momentum",
            resnet.clone(),
            DType::BF16,
            Config { base: BaseOptimizer::Sgd, momentum: 0.9, ..plain.clone() },
        ),
        (
            "resnet50, SGD, master",
            resnet.clone(),
            DType::BF16,
            Config { base: BaseOptimizer::Sgd, momentum: 0.9, master_weights: true, ..plain.clone() },
        ),
    ];
    if args.iter().any(|a| a == "--gpt2") {
        cases.push(("gpt2-small, 148 tensors", layout("gpt2_small"), DType::F32, plain.clone()));
    }

    println!("samopt {} CPU benchmark: {reps} repetitions of copy then SAM; medians", samopt::VERSION);
    println!();
    println!(
        "{:<26} {:>6} {:>11} {:>10} {:>10} {:>10} {:>8}",
        "layout", "dtype", "elements", "SAM ms", "SAM GB/s", "copy GB/s", "ratio"
    );
    for (name, lens, dtype, config) in &cases {
        let m = bench::cpu(lens, *dtype, config, reps).expect("the CPU engine runs");
        println!(
            "{:<26} {:>6} {:>11} {:>10.2} {:>10.2} {:>10.2} {:>8.2}",
            name,
            dtype.name(),
            m.elements,
            m.sam_seconds * 1e3,
            m.sam_bytes / m.sam_seconds / 1e9,
            m.copy_bytes / m.copy_seconds / 1e9,
            m.ratio
        );
    }

    println!();
    println!("rebinding every tensor once per step, beside one SAM step (first + second), medians of {reps}");
    println!("{:<26} {:>8} {:>12} {:>12} {:>10}", "layout", "tensors", "rebind us", "SAM step ms", "share");
    let mut layouts = vec![("resnet50", layout("resnet50"))];
    if args.iter().any(|a| a == "--gpt2") {
        layouts.push(("gpt2-small", layout("gpt2_small")));
    }
    for (name, lens) in layouts {
        let (rebind, step) = rebind_cost(&lens, threads, reps);
        println!(
            "{:<26} {:>8} {:>12.1} {:>12.2} {:>9.3}%",
            name,
            lens.len(),
            rebind * 1e6,
            step * 1e3,
            100.0 * rebind / step
        );
    }
}

/// Median seconds of rebinding every tensor of `lens` (to the buffers it already has, which costs
/// what new ones cost: the same checks and map updates), and of one SAM step without a base.
fn rebind_cost(lens: &[usize], threads: usize, reps: usize) -> (f64, f64) {
    use std::time::Instant;
    let mut opt = samopt::Optimizer::new(Config { threads, backend: samopt::Backend::Cpu, ..Config::default() })
        .expect("a CPU optimizer");
    let mut bufs: Vec<(Vec<f32>, Vec<f32>)> =
        lens.iter().map(|&n| (vec![0.5f32; n], (0..n).map(|i| (i % 7) as f32 * 1e-3).collect())).collect();
    for (w, g) in &mut bufs {
        // SAFETY: the buffers outlive the optimizer and are only touched between its calls.
        unsafe { opt.register_host_raw(w.as_mut_ptr().cast(), g.as_ptr().cast(), w.len(), DType::F32) }
            .expect("registration");
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mut rebinds, mut steps) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        for (id, (w, g)) in bufs.iter_mut().enumerate() {
            // SAFETY: as above.
            unsafe { opt.rebind_host_raw(id as u32, w.as_mut_ptr().cast(), g.as_ptr().cast()) }.expect("rebind");
        }
        rebinds.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        opt.first_step().expect("first step");
        opt.second_step().expect("second step");
        steps.push(t.elapsed().as_secs_f64());
    }
    (median(rebinds), median(steps))
}
