//! Throughput of the CPU engine's SAM passes beside a plain memory copy, measured in one run.
//!
//! For each layout it times first + second step (norm pass, perturbation pass, restore pass) and
//! counts the bytes those passes must move:
//!
//! ```text
//! norm:     read g                        4 B/elem (f32)   (+4 under ASAM: read w)
//! perturb:  read w, g; write w, backup   16 B/elem
//! restore:  read backup; write w          8 B/elem
//! ```
//!
//! With a built-in base optimizer the restore becomes a reduction over `g'` (4 B/elem) and the
//! fused restore + update: read backup, g', state; write w, state (SGD with momentum 20 B/elem,
//! AdamW 28 B/elem, f32 state).
//!
//! The reference is a copy of a buffer of the same size as the parameters on the same threads
//! (8 B/elem moved: read + write), timed alternately with the SAM step so both see the same
//! machine. The printed ratio is SAM bytes/s over copy bytes/s, the median over adjacent pairs of
//! repetitions (the shared machine's bandwidth drifts); 1.0 means the passes run at memory copy speed.
//!
//! Run: `cargo bench --bench step` (options: `--threads N`, `--reps N`, `--gpt2` to add GPT-2 small).

use std::time::{Duration, Instant};

use rayon::prelude::*;
use samopt::{BaseOptimizer, Config, DType, Optimizer};

const LAYOUTS: &str = include_str!("param_layouts.json");

struct Case {
    name: String,
    lens: Vec<usize>,
    dtype: DType,
    adaptive: bool,
    base: BaseOptimizer,
}

fn layout(key: &str) -> Vec<usize> {
    let v: serde_json::Value = serde_json::from_str(LAYOUTS).expect("param_layouts.json parses");
    v[key].as_array().expect("a list of sizes").iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag =
        |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(|s| s.parse().unwrap());
    let threads: usize = flag("--threads").unwrap_or(0);
    let reps: usize = flag("--reps").unwrap_or(15);

    let resnet = layout("resnet50");
    let total: usize = resnet.iter().sum();
    let mut cases = vec![
        Case {
            name: "resnet50, 161 tensors".into(),
            lens: resnet.clone(),
            dtype: DType::F32,
            adaptive: false,
            base: BaseOptimizer::None,
        },
        Case {
            name: "one tensor".into(),
            lens: vec![total],
            dtype: DType::F32,
            adaptive: false,
            base: BaseOptimizer::None,
        },
        Case {
            name: "10k tensors of ~2.5k".into(),
            lens: (0..10_000).map(|i| total / 10_000 + (i % 3)).collect(),
            dtype: DType::F32,
            adaptive: false,
            base: BaseOptimizer::None,
        },
        Case {
            name: "resnet50, ASAM".into(),
            lens: resnet.clone(),
            dtype: DType::F32,
            adaptive: true,
            base: BaseOptimizer::None,
        },
        Case {
            name: "resnet50, bf16".into(),
            lens: resnet.clone(),
            dtype: DType::BF16,
            adaptive: false,
            base: BaseOptimizer::None,
        },
        Case {
            name: "resnet50, f16".into(),
            lens: resnet.clone(),
            dtype: DType::F16,
            adaptive: false,
            base: BaseOptimizer::None,
        },
        Case {
            name: "resnet50, SGD momentum".into(),
            lens: resnet.clone(),
            dtype: DType::F32,
            adaptive: false,
            base: BaseOptimizer::Sgd,
        },
        Case {
            name: "resnet50, AdamW".into(),
            lens: resnet.clone(),
            dtype: DType::F32,
            adaptive: false,
            base: BaseOptimizer::AdamW,
        },
    ];
    if args.iter().any(|a| a == "--gpt2") {
        cases.push(Case {
            name: "gpt2-small, 148 tensors".into(),
            lens: layout("gpt2_small"),
            dtype: DType::F32,
            adaptive: false,
            base: BaseOptimizer::None,
        });
    }

    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    println!(
        "samopt {} CPU benchmark: {} threads, {reps} repetitions of copy then SAM; medians",
        samopt::VERSION,
        pool.current_num_threads()
    );
    println!();
    println!(
        "{:<26} {:>6} {:>11} {:>10} {:>10} {:>10} {:>8}",
        "layout", "dtype", "elements", "SAM ms", "SAM GB/s", "copy GB/s", "ratio"
    );

    for case in &cases {
        let n: usize = case.lens.iter().sum();
        let size = case.dtype.size();
        // The host's buffers: one allocation per tensor, as a framework would have them.
        let mut params: Vec<Vec<u64>> =
            case.lens.iter().map(|&l| vec![0x3F80_0000_3F80_0000u64; (l * size).div_ceil(8)]).collect();
        let grads: Vec<Vec<u64>> =
            case.lens.iter().map(|&l| vec![0x3C23_D70A_3C23_D70Au64; (l * size).div_ceil(8)]).collect();
        let config = Config { adaptive: case.adaptive, threads, base: case.base, momentum: 0.9, ..Config::default() };
        let mut sam = Optimizer::new(config).unwrap();
        for ((p, g), &l) in params.iter_mut().zip(&grads).zip(&case.lens) {
            // SAFETY: the buffers outlive `sam` and are not touched while it runs.
            unsafe { sam.register_host_raw(p.as_mut_ptr().cast(), g.as_ptr().cast(), l, case.dtype).unwrap() };
        }

        // The copy reference: the parameter bytes, copied on the same number of threads.
        let src = vec![1u64; (n * size).div_ceil(8)];
        let mut dst = vec![0u64; src.len()];
        let copy = |dst: &mut [u64]| {
            pool.install(|| {
                dst.par_chunks_mut(1 << 16).zip(src.par_chunks(1 << 16)).for_each(|(d, s)| d.copy_from_slice(s))
            })
        };
        copy(&mut dst);
        sam.first_step().unwrap();
        sam.second_step().unwrap();

        let (mut t_copy, mut t_sam) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t = Instant::now();
            copy(&mut dst);
            t_copy.push(t.elapsed());
            let t = Instant::now();
            sam.first_step().unwrap();
            sam.second_step().unwrap();
            t_sam.push(t.elapsed());
        }
        assert_eq!(dst[dst.len() / 2], 1);
        // Element-sized (dtype) streams, plus f32 state streams for the base optimizer.
        let second = match case.base {
            BaseOptimizer::None => 2 * size,
            BaseOptimizer::Sgd => 4 * size + 2 * 4,
            BaseOptimizer::AdamW => 4 * size + 4 * 4,
        };
        let bytes_per_elem = (if case.adaptive { 2 } else { 1 } + 4) * size + second;
        let (sam_bytes, copy_bytes) = ((n * bytes_per_elem) as f64, (2 * n * size) as f64);
        // The machine's bandwidth drifts: the ratio is taken per adjacent pair, then the median.
        let mut ratios: Vec<f64> = t_sam
            .iter()
            .zip(&t_copy)
            .map(|(s, c)| (sam_bytes / s.as_secs_f64()) / (copy_bytes / c.as_secs_f64()))
            .collect();
        ratios.sort_by(f64::total_cmp);
        let ratio = ratios[ratios.len() / 2];
        let (t_copy, t_sam) = (median(t_copy), median(t_sam));
        let sam_bw = sam_bytes / t_sam.as_secs_f64() / 1e9;
        let copy_bw = copy_bytes / t_copy.as_secs_f64() / 1e9;
        println!(
            "{:<26} {:>6} {:>11} {:>10.2} {:>10.2} {:>10.2} {:>8.2}",
            case.name,
            case.dtype.name(),
            n,
            t_sam.as_secs_f64() * 1e3,
            sam_bw,
            copy_bw,
            ratio
        );
    }
}
