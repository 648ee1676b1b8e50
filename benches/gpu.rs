//! Throughput of the GPU engine's SAM passes beside a device buffer copy, measured in one run.
//!
//! The passes run on device tensors (the optimizer's own buffers: nothing crosses to the host).
//! Their time comes from timestamp queries around each pass when the adapter has them, else from
//! the wall clock of the whole step. The bytes they must move, per f32 element:
//!
//! ```text
//! norm: read g (4)    perturb: read w, g; write w, backup (16)    restore: read backup; write w (8)
//! ```
//!
//! The reference is `copy_buffer_to_buffer` of the parameters' bytes on the same device (read +
//! write: 8 B/elem), timed the same way. A last row times the staged route (host buffers under
//! `SAM_BACKEND_GPU`: upload w and g, download the perturbed w) by the wall clock, to show its cost.
//!
//! Run: `cargo bench --bench gpu -- [--elements N] [--layout resnet50|gpt2|one] [--reps N]`, or
//! `bash scripts/gpu-bench.sh`, which prints the table last.

use std::time::Instant;

use samopt::{Backend, Config, DType, Optimizer};

const LAYOUTS: &str = include_str!("param_layouts.json");

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

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
    let n: usize = lens.iter().sum();

    let mut sam = match Optimizer::new(Config { backend: Backend::Gpu, ..Config::default() }) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("no GPU adapter: {e}");
            std::process::exit(2);
        }
    };
    for &l in &lens {
        let id = sam.add_zeroed_tensor(l, DType::F32).unwrap();
        sam.write_grad(id, &vec![0.01f32; l]).unwrap();
        sam.write_param(id, &vec![1.0f32; l]).unwrap();
    }
    let adapter = sam.adapter().unwrap();
    let timestamps = sam.enable_pass_timing();
    sam.first_step().unwrap();
    sam.second_step().unwrap();

    let (mut norm, mut perturb, mut restore, mut wall) = (vec![], vec![], vec![], vec![]);
    for _ in 0..reps {
        let t = Instant::now();
        sam.first_step().unwrap();
        sam.second_step().unwrap();
        wall.push(t.elapsed().as_secs_f64() * 1e9);
        if let Some(p) = sam.pass_times() {
            norm.push(p.norm_ns);
            perturb.push(p.perturb_ns);
            restore.push(p.restore_ns);
        }
    }
    let copy = sam.time_device_copy((n * 4) as u64, reps).unwrap();
    let copy_from_timestamps = copy[0].1;
    let copy_ns = median(copy.iter().map(|c| c.0).collect());
    let copy_bw = (8 * n) as f64 / copy_ns;

    // The staged route: the same tensors as host buffers under the GPU backend.
    let mut staged = Optimizer::new(Config { backend: Backend::Gpu, ..Config::default() }).unwrap();
    let mut host_w: Vec<Vec<f32>> = lens.iter().map(|&l| vec![1.0; l]).collect();
    let host_g: Vec<Vec<f32>> = lens.iter().map(|&l| vec![0.01; l]).collect();
    for (w, g) in host_w.iter_mut().zip(&host_g) {
        // SAFETY: the vectors outlive `staged` and are untouched while it runs.
        unsafe { staged.register_host(w.as_mut_ptr(), g.as_ptr(), w.len()).unwrap() };
    }
    let mut staged_wall = vec![];
    for _ in 0..reps.min(5) {
        let t = Instant::now();
        staged.first_step().unwrap();
        staged.second_step().unwrap();
        staged_wall.push(t.elapsed().as_secs_f64() * 1e9);
    }

    println!("samopt {} GPU benchmark", samopt::VERSION);
    println!(
        "adapter: {} ({}, {}), {} tensors, {} f32 parameters, median of {reps}",
        adapter.name,
        adapter.backend,
        adapter.device_type,
        lens.len(),
        n
    );
    println!(
        "timing: passes by {}, copy by {}",
        if timestamps && !norm.is_empty() { "timestamp queries" } else { "wall clock (step)" },
        if copy_from_timestamps { "timestamp queries" } else { "wall clock (submit to done)" }
    );
    println!();
    println!("{:<28} {:>10} {:>12} {:>10}", "pass", "ms", "GB/s", "vs copy");
    let row = |name: &str, ns: f64, bytes: f64| {
        let bw = bytes / ns;
        println!("{:<28} {:>10.3} {:>12.1} {:>10.2}", name, ns / 1e6, bw, bw / copy_bw);
    };
    row("device copy (reference)", copy_ns, (8 * n) as f64);
    if timestamps && !norm.is_empty() {
        let (a, b, c) = (median(norm), median(perturb), median(restore));
        row("norm", a, (4 * n) as f64);
        row("perturbation", b, (16 * n) as f64);
        row("restore", c, (8 * n) as f64);
        row("first + second step", a + b + c, (28 * n) as f64);
    }
    row("step, wall clock", median(wall), (28 * n) as f64);
    row("staged host buffers, wall", median(staged_wall), (28 * n) as f64);
}
