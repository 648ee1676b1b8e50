//! Throughput of the CPU engine's SAM passes beside a plain memory copy of the same bytes, timed
//! alternately in one run (see `samopt::bench` for the bytes each pass must move).
//!
//! Run: `cargo bench --bench step` (options: `--threads N`, `--reps N`, `--gpt2` to add GPT-2 small).

use samopt::bench;
use samopt::{BaseOptimizer, Config, DType};

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
}
