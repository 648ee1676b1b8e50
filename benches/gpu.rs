//! Throughput of the GPU engine's SAM passes beside a device buffer copy, measured in one run:
//! device tensors (the optimizer's own buffers, nothing crosses to the host), each pass timed by
//! timestamp queries where the adapter has them, and the staged route (host buffers under
//! `SAM_BACKEND_GPU`) by the wall clock, to show its cost. See `samopt::bench` for the bytes.
//!
//! Run: `cargo bench --bench gpu -- [--elements N] [--layout resnet50|gpt2|one] [--reps N]`, or
//! `bash scripts/gpu-bench.sh`, which prints the table last.

use samopt::bench;
use samopt::{BaseOptimizer, Config, DType, LossScale};

const LAYOUTS: &str = include_str!("param_layouts.json");

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let reps: usize = flag("--reps").map_or(9, |s| s.parse().expect("--reps N"));
    let layout = flag("--layout").unwrap_or_else(|| "resnet50".into());
    let v: serde_json::Value = serde_json::from_str(LAYOUTS).unwrap();
    let mut lens: Vec<usize> = match layout.as_str() {
        "one" => vec![25_557_032],
        "resnet50" | "gpt2_small" | "gpt2" => {
            let key = if layout == "resnet50" { "resnet50" } else { "gpt2_small" };
            v[key].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
        }
        other => panic!("--layout {other}: resnet50, gpt2 or one"),
    };
    // --elements N repeats the layout until it holds at least N parameters.
    if let Some(n) = flag("--elements").map(|s| s.parse::<usize>().expect("--elements N")) {
        let base = lens.clone();
        while lens.iter().sum::<usize>() < n {
            lens.extend(&base);
        }
    }
    let config = Config::default();
    let mut rows = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        match bench::gpu(&lens, dtype, &config, reps) {
            Ok(m) => rows.push((format!("device tensors, {}", dtype.name()), m)),
            Err(e) => {
                eprintln!("no GPU: {e}");
                std::process::exit(2);
            }
        }
    }
    // The fused update with unscaling (loss scale) and with master weights (bf16), wall clock.
    let sgd = Config { base: BaseOptimizer::Sgd, momentum: 0.9, ..Config::default() };
    for (name, dtype, c) in [
        ("SGD update, f32", DType::F32, sgd.clone()),
        ("SGD update, loss scale, f32", DType::F32, Config { loss_scale: Some(LossScale::dynamic()), ..sgd.clone() }),
        ("SGD update, bf16", DType::BF16, sgd.clone()),
        ("SGD update, master, bf16", DType::BF16, Config { master_weights: true, ..sgd.clone() }),
    ] {
        rows.push((name.to_owned(), bench::gpu(&lens, dtype, &c, reps).expect("the GPU ran above")));
    }
    let staged = bench::gpu_staged(&lens, &config, reps.min(5)).expect("staged run");

    println!("samopt {} GPU benchmark", samopt::VERSION);
    println!("{}; {} tensors, {} parameters, median of {reps}", rows[0].1.backend, lens.len(), rows[0].1.elements);
    println!("timing: {}", rows[0].1.timing);
    println!();
    println!("{:<40} {:>10} {:>10} {:>10}", "pass", "ms", "GB/s", "vs copy");
    for (name, m) in &rows {
        let copy_bw = m.copy_bytes / m.copy_seconds;
        println!(
            "{:<40} {:>10.3} {:>10.1} {:>10.2}",
            format!("copy ({name})"),
            m.copy_seconds * 1e3,
            copy_bw / 1e9,
            1.0
        );
        if let Some(p) = m.passes {
            let n = m.elements as f64;
            let s = m.copy_bytes / (2.0 * n); // bytes per element
            for (pass, ns, bytes) in [
                ("  norm", p.norm_ns, s * n),
                ("  perturbation", p.perturb_ns, 4.0 * s * n),
                ("  restore", p.restore_ns, 2.0 * s * n),
            ] {
                let bw = bytes / (ns * 1e-9);
                println!("{:<40} {:>10.3} {:>10.1} {:>10.2}", pass, ns * 1e-6, bw / 1e9, bw / copy_bw);
            }
        }
        let bw = m.sam_bytes / m.sam_seconds;
        println!(
            "{:<40} {:>10.3} {:>10.1} {:>10.2}",
            format!("SAM step ({name})"),
            m.sam_seconds * 1e3,
            bw / 1e9,
            m.ratio
        );
    }
    let bw = staged.sam_bytes / staged.sam_seconds;
    println!(
        "{:<40} {:>10.3} {:>10.1} {:>10.2}",
        "SAM step, staged host f32",
        staged.sam_seconds * 1e3,
        bw / 1e9,
        staged.ratio
    );
}
