//! `samopt`: shows SAM working (`demo`), measures the engines (`bench`), and reports the version and
//! the GPU adapters (`info`). It runs on the same engine the C ABI uses.

mod data;
mod demo;
mod mlp;
mod plot;
mod schedule;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use samopt::{Backend, BaseOptimizer, Config, DType, LossScale};

/// Sharpness-Aware Minimization as an embeddable optimizer: demo, benchmark and device info.
#[derive(Parser, Debug)]
#[command(name = "samopt", version, about, long_about = None, propagate_version = true, arg_required_else_help = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a small MLP on noisy labels with SGD and with SAM around the same SGD (under a step
    /// schedule, or several with --compare), and compare clean test accuracy, sharpness and cost.
    Demo(DemoArgs),
    /// Throughput of the SAM passes beside a plain copy of the same bytes, on the CPU and the GPU.
    Bench(BenchArgs),
    /// Version, ABI version, the GPU adapters wgpu finds, and what backend AUTO picks.
    Info,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    Cpu,
    Gpu,
    Auto,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Backend {
        match b {
            BackendArg::Cpu => Backend::Cpu,
            BackendArg::Gpu => Backend::Gpu,
            BackendArg::Auto => Backend::Auto,
        }
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..1.0).contains(&v) { Ok(v) } else { Err(format!("{v} is not in [0, 1)")) }
}

fn parse_positive(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v.is_finite() && v > 0.0 { Ok(v) } else { Err(format!("{v} is not a finite number > 0")) }
}

#[derive(clap::Args, Debug)]
struct DemoArgs {
    /// Where the SAM passes run (the network itself always trains on the CPU).
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendArg,
    /// Radius of the SAM neighbourhood.
    #[arg(long, default_value = "0.3", value_parser = parse_positive, allow_hyphen_values = true)]
    rho: f64,
    /// Adaptive SAM (ASAM, eta 0.01); it wants a larger rho, about 1 here.
    #[arg(long)]
    adaptive: bool,
    /// Training epochs, the same for every run (SAM takes two gradients per step).
    #[arg(long, default_value = "60", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    epochs: u32,
    /// Fraction of training labels flipped to another class (test labels stay clean).
    #[arg(long, default_value = "0.4", value_parser = parse_fraction, allow_hyphen_values = true)]
    noise: f64,
    /// Seed of the data sample, the label noise, the initialisation and the batch order.
    #[arg(long, default_value = "1")]
    seed: u64,
    /// Print the summary as JSON on standard output instead of a table.
    #[arg(long)]
    json: bool,
    /// Write the loss and accuracy curves of both runs to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Train on this dataset instead of the embedded one: a CSV file with a header and a `label`
    /// column (else the last column), or an MNIST IDX image file with --labels. 80% trains, 20% tests.
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// The IDX label file that goes with an IDX image file given to --data.
    #[arg(long, value_name = "FILE", requires = "data")]
    labels: Option<PathBuf>,
    /// Let samopt run the SGD update too, fused with its restore, instead of the demo's own SGD
    /// (implied by --amp).
    #[arg(long)]
    fused: bool,
    /// Mixed precision, as AMP trains today: the network's weights and gradients are bf16 (or
    /// f16: --amp f16) tensors registered with samopt; the matmuls run in f32 on the widened
    /// weights, and the gradient is multiplied by the loss scale and rounded to the 16-bit type
    /// (an overflow there skips the step). samopt keeps f32 master weights and a dynamic loss
    /// scale (GradScaler's: 2^16, x2 after 2000 good steps, x0.5 on overflow). Implies --fused
    /// (master weights need samopt's SGD), for the SGD run too: samopt's SGD with one gradient a
    /// step (a schedule that never takes a SAM step).
    #[arg(long, value_enum, value_name = "TYPE", num_args = 0..=1, default_missing_value = "bf16")]
    amp: Option<AmpType>,
    /// With --amp: the loss scale, `dynamic` (the default) or a fixed S (overflowing steps are
    /// still skipped, S stays).
    #[arg(long, value_name = "dynamic|S", value_parser = parse_loss_scale, allow_hyphen_values = true)]
    loss_scale: Option<LossScale>,
    /// With --amp: no f32 master weights; samopt's SGD updates the 16-bit weights directly, so
    /// updates below half a unit in their last place are lost.
    #[arg(long)]
    no_master: bool,
    /// Width of the two hidden layers.
    #[arg(long, default_value = "128", value_parser = clap::value_parser!(u32).range(1..=65_536))]
    hidden: u32,
    /// Mini-batch size.
    #[arg(long, default_value = "64", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    batch: u32,
    /// Peak learning rate of SGD (momentum 0.9, cosine decay, weight decay 5e-4).
    #[arg(long, default_value = "0.05", value_parser = parse_positive, allow_hyphen_values = true)]
    lr: f64,
    /// Training samples of the embedded task.
    #[arg(long, default_value = "2000", value_parser = clap::value_parser!(u32).range(10..=10_000_000))]
    train: u32,
    /// Which steps of the SAM run are SAM steps (two gradients): every, interval:K (every K-th),
    /// random:P (with probability P, seeded by --seed), looksam:K[:ALPHA] (every K-th, reusing the
    /// orthogonal part of the last SAM gradient with weight ALPHA, 0.7 by default) or aesam (when
    /// the squared gradient norm is high, adaptively; planned over the whole run). Default: every.
    /// With --compare: repeatable, the schedules compared (default interval:10, random:0.2,
    /// looksam:5:0.7, aesam).
    #[arg(long, value_name = "SPEC", value_parser = schedule::parse)]
    schedule: Vec<schedule::Spec>,
    /// Train SGD, SAM, and SAM under each schedule on the same data, seed and budget, and compare
    /// them: test accuracy, sharpness, gradient evaluations per step (SGD = 1) and wall time.
    #[arg(long)]
    compare: bool,
}

/// The 16-bit type of `--amp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum AmpType {
    Bf16,
    F16,
}

/// `--loss-scale`: `dynamic` (GradScaler's defaults) or a fixed, positive, finite f32 value.
fn parse_loss_scale(s: &str) -> Result<LossScale, String> {
    if s == "dynamic" {
        return Ok(LossScale::dynamic());
    }
    let v: f64 = s.parse().map_err(|_| "neither `dynamic` nor a number".to_owned())?;
    if v.is_finite() && v > 0.0 && v <= f32::MAX as f64 {
        Ok(LossScale::fixed(v))
    } else {
        Err(format!("a fixed loss scale is > 0 and at most {:e} (the largest f32)", f32::MAX))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BenchBackend {
    Cpu,
    Gpu,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BaseArg {
    None,
    Sgd,
    Adamw,
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Which engines to measure.
    #[arg(long, value_enum, default_value = "all")]
    backend: BenchBackend,
    /// Total parameters (repeatable: one row per size).
    #[arg(long, value_name = "N", default_values_t = vec![25_557_032usize])]
    elements: Vec<usize>,
    /// Number of tensors the parameters are split into (repeatable).
    #[arg(long, value_name = "K", default_values_t = vec![1usize, 161])]
    tensors: Vec<usize>,
    /// Element types (repeatable).
    #[arg(long, value_enum, default_values_t = vec![DTypeArg::F32])]
    dtype: Vec<DTypeArg>,
    /// The base optimizer fused with the second step.
    #[arg(long, value_enum, default_value = "none")]
    base: BaseArg,
    /// Repetitions of each measurement (medians are reported).
    #[arg(long, default_value = "9", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    reps: u32,
}

/// Mesa's drivers warn on every start unless `XDG_RUNTIME_DIR` names a private directory; give
/// them one when the environment has none (before any thread starts).
fn quiet_mesa() {
    #[cfg(unix)]
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        use std::os::unix::fs::DirBuilderExt;
        let user = std::env::var("USER").unwrap_or_else(|_| "user".into());
        let dir = std::env::temp_dir().join(format!("samopt-xdg-{user}"));
        if std::fs::DirBuilder::new().mode(0o700).create(&dir).is_ok() || dir.is_dir() {
            // SAFETY: called first thing in main, while the process has one thread.
            unsafe { std::env::set_var("XDG_RUNTIME_DIR", dir) };
        }
    }
}

fn main() -> ExitCode {
    quiet_mesa();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // One line: clap's message and its hints, without the follow-up advice.
            let text = e.render().to_string();
            let parts: Vec<&str> = text
                .lines()
                .map(|l| l.trim().trim_start_matches("error: "))
                .filter(|l| !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:"))
                .collect();
            eprintln!("samopt: {} (see samopt --help)", parts.join("; "));
            return ExitCode::from(2);
        }
    };
    // Usage errors clap's declarations cannot word well: one line, exit 2, as clap's own.
    if let Command::Demo(a) = &cli.command
        && let Err(message) = check_demo_args(a)
    {
        eprintln!("samopt: {message} (see samopt demo --help)");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Demo(args) => run_demo(args),
        Command::Bench(args) => run_bench(args),
        Command::Info => run_info(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("samopt: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The demo's options that only mean something together.
fn check_demo_args(a: &DemoArgs) -> Result<(), String> {
    if a.amp.is_none() {
        if a.loss_scale.is_some() {
            return Err("--loss-scale needs --amp: loss scaling is part of the mixed-precision mode (f32 gradients \
                        need none)"
                .into());
        }
        if a.no_master {
            return Err("--no-master needs --amp: master weights are the f32 copies of --amp's 16-bit weights".into());
        }
    }
    Ok(())
}

fn run_demo(a: DemoArgs) -> Result<(), String> {
    let (train, test, source, flipped) =
        data::task(a.data.as_deref(), a.labels.as_deref(), (a.train as usize, a.noise, a.seed))?;
    let setup = demo::Setup {
        hidden: a.hidden as usize,
        epochs: a.epochs as usize,
        batch: a.batch as usize,
        lr: a.lr,
        momentum: 0.9,
        weight_decay: 5e-4,
        rho: a.rho,
        adaptive: a.adaptive,
        backend: a.backend.into(),
        fused: a.fused || a.amp.is_some(),
        seed: a.seed,
        amp: a.amp.map(|t| demo::Amp {
            dtype: match t {
                AmpType::Bf16 => DType::BF16,
                AmpType::F16 => DType::F16,
            },
            master_weights: !a.no_master,
            loss_scale: a.loss_scale.unwrap_or_else(LossScale::dynamic),
        }),
    };
    let methods = demo_methods(&a)?;
    let bar = indicatif::ProgressBar::with_draw_target(
        Some((methods.len() * setup.epochs) as u64),
        indicatif::ProgressDrawTarget::stderr(), // hidden when standard error is not a terminal
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>13} [{bar:40}] epoch {pos}/{len} {elapsed}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let mut runs = Vec::new();
    for (i, &method) in methods.iter().enumerate() {
        bar.set_prefix(method.label());
        let offset = (i * setup.epochs) as u64;
        runs.push(demo::train(&setup, &train, &test, method, &|e| bar.set_position(offset + e as u64))?);
    }
    bar.finish_and_clear();
    // SAM's accuracy gain over SGD that each run keeps: (acc - acc_sgd) / (acc_sam - acc_sgd).
    let (sgd_acc, sam_acc) = (runs[0].test_accuracy, runs[1].test_accuracy);
    let gain_kept = |r: &demo::RunResult| {
        (a.compare && sam_acc != sgd_acc).then(|| (r.test_accuracy - sgd_acc) / (sam_acc - sgd_acc))
    };

    if let Some(path) = &a.plot {
        if path.extension().and_then(|e| e.to_str()) != Some("svg") {
            return Err(format!("--plot {}: only SVG is written; name the file *.svg", path.display()));
        }
        std::fs::write(path, plot::svg(&runs)).map_err(|e| format!("--plot {}: {e}", path.display()))?;
    }
    let backend = runs[1].backend.clone();
    if a.json {
        let json = serde_json::json!({
            "backend": backend,
            "dataset": {
                "source": source,
                "train": train.len(),
                "test": test.len(),
                "features": train.dim,
                "classes": train.classes,
                "flipped_labels": flipped,
            },
            "setup": {
                "epochs": setup.epochs, "batch": setup.batch, "lr": setup.lr, "momentum": setup.momentum,
                "weight_decay": setup.weight_decay, "rho": setup.rho, "adaptive": setup.adaptive,
                "hidden": setup.hidden, "seed": setup.seed, "fused": setup.fused,
                "schedules": runs.iter().filter_map(|r| r.schedule.map(|s| s.to_string())).collect::<Vec<_>>(),
            },
            "compare": a.compare,
            "precision": precision_json(setup.amp),
            "runs": runs.iter().map(|r| serde_json::json!({
                "optimizer": r.optimizer,
                "method": r.label,
                "schedule": r.schedule.map(|s| s.to_string()),
                "test_accuracy": r.test_accuracy,
                "train_loss": r.train_loss,
                "train_accuracy": r.train_accuracy,
                "sharpness": r.sharpness,
                "sharpness_random": r.sharpness_random,
                "seconds_per_step": r.seconds_per_step,
                "wall_s": r.wall_s,
                "steps": r.steps,
                "grad_evals": r.grad_evals,
                "grad_evals_per_step": r.grad_evals_per_step(),
                "sam_steps": r.sam_steps,
                "single_steps": r.single_steps,
                "loss_scale": r.loss_scale,
                "skipped_steps": r.skipped_steps,
                "sam_gain_kept": gain_kept(r),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&json).expect("JSON serialises"));
        return Ok(());
    }
    println!("samopt demo: {source}");
    println!(
        "{} training samples ({flipped} labels flipped, {:.0}%), {} clean test samples; MLP {}-{h}-{h}-{} \
         ({} parameters)",
        train.len(),
        100.0 * a.noise,
        test.len(),
        train.dim,
        train.classes,
        mlp::Mlp::new(&[train.dim, setup.hidden, setup.hidden, train.classes], 0).param_count(),
        h = setup.hidden,
    );
    let schedules: Vec<String> = runs[1..].iter().filter_map(|r| r.schedule.map(|s| s.to_string())).collect();
    // Plain SAM against SGD reads as before the schedules came; a schedule or a comparison says which.
    let plain = !a.compare && schedules == ["every"];
    println!(
        "SGD momentum 0.9, lr {} cosine, weight decay 5e-4, batch {}, {} epochs for {}; SAM rho {}{}{}; SAM passes on {}",
        setup.lr,
        setup.batch,
        setup.epochs,
        if runs.len() == 2 { "both" } else { "every run" },
        setup.rho,
        if setup.adaptive { " (ASAM)" } else { "" },
        match schedules.len() {
            _ if plain => String::new(),
            1 => format!(", schedule {}", schedules[0]),
            _ => format!(", schedules {}", schedules.join(", ")),
        },
        backend
    );
    if let Some(amp) = &setup.amp {
        println!(
            "mixed precision (--amp): {}; every run steps with samopt's fused SGD (sgd: one gradient a step, never \
             a SAM step)",
            amp.describe()
        );
    }
    println!();
    let width = runs.iter().map(|r| r.label.len()).max().unwrap_or(0).max(5);
    print!(
        "{:<width$} {:>11} {:>10} {:>10} {:>18} {:>18} {:>9} {:>10} {:>7}",
        "run",
        "train loss",
        "train acc",
        "test acc",
        "sharpness ascent",
        "sharpness random",
        "ms/step",
        "grads/step",
        "wall s"
    );
    if setup.amp.is_some() {
        print!(" {:>10} {:>7}", "loss scale", "skipped");
    }
    println!("{}", if a.compare { format!(" {:>9}", "gain kept") } else { String::new() });
    for r in &runs {
        print!(
            "{:<width$} {:>11.4} {:>10.3} {:>10.3} {:>18.4} {:>18.4} {:>9.3} {:>10.3} {:>7.2}",
            r.label,
            r.train_loss,
            r.train_accuracy,
            r.test_accuracy,
            r.sharpness,
            r.sharpness_random,
            r.seconds_per_step * 1e3,
            r.grad_evals_per_step(),
            r.wall_s,
        );
        if setup.amp.is_some() {
            let scale = r.loss_scale.map_or_else(|| "-".to_owned(), demo::scale_text);
            print!(" {scale:>10} {:>7}", r.skipped_steps.unwrap_or(0));
        }
        match gain_kept(r) {
            Some(g) => println!(" {:>8.0}%", 100.0 * g),
            None if a.compare => println!(" {:>9}", "-"),
            None => println!(),
        }
    }
    println!();
    println!(
        "train loss and accuracy are on the noisy labels; sharpness is the rise of that loss within ||e|| <= rho \
         (8 ascent steps; mean of 8 random directions)."
    );
    println!(
        "grads/step: forward/backward passes per training step (SGD 1, SAM 2); wall s: the training steps, without \
         the per-epoch test evaluation."
    );
    if let Some(amp) = &setup.amp {
        println!(
            "loss scale: at the end of the run; skipped: steps whose scaled {} gradient held inf or NaN (overflow), \
             skipped by samopt with the weights restored and the scale lowered (they count in ms/step).",
            amp.dtype.name()
        );
    }
    if !plain {
        println!(
            "A schedule is SAM taking its second gradient on some steps only (see samopt demo --help){}",
            if a.compare {
                "; gain kept: SAM's test accuracy gain over SGD kept, (acc - sgd) / (sam - sgd)."
            } else {
                "."
            }
        );
    }
    Ok(())
}

/// The `precision` object of the JSON summary: f32, or the mixed-precision mode of `--amp`.
fn precision_json(amp: Option<demo::Amp>) -> serde_json::Value {
    let Some(amp) = amp else {
        return serde_json::json!({ "mode": "f32", "dtype": "f32", "master_weights": false, "loss_scale": null });
    };
    let l = amp.loss_scale;
    let dynamic = !amp.fixed_scale();
    serde_json::json!({
        "mode": "amp",
        "dtype": amp.dtype.name(),
        "master_weights": amp.master_weights,
        "loss_scale": {
            "kind": if dynamic { "dynamic" } else { "fixed" },
            "init": l.init,
            "growth_factor": l.growth_factor,
            "backoff_factor": l.backoff_factor,
            "growth_interval": if dynamic { Some(l.growth_interval) } else { None },
        },
        "sgd_run": "samopt's fused SGD with the same precision path, one gradient a step (never a SAM step)",
    })
}

/// The runs of a demo: SGD, then SAM under the `--schedule` (every step by default); with
/// `--compare`, SGD, SAM on every step, and SAM under each schedule asked for (or the default set).
fn demo_methods(a: &DemoArgs) -> Result<Vec<demo::Method>, String> {
    use demo::Method;
    use schedule::Spec;
    if !a.compare {
        return match a.schedule.as_slice() {
            [] => Ok(vec![Method::Sgd, Method::Sam(Spec::Every)]),
            [one] => Ok(vec![Method::Sgd, Method::Sam(*one)]),
            more => Err(format!(
                "--schedule is given {} times: a demo trains one SAM run; add --compare to compare several",
                more.len()
            )),
        };
    }
    let mut methods = vec![Method::Sgd, Method::Sam(Spec::Every)];
    let asked = if a.schedule.is_empty() { &Spec::COMPARED[..] } else { &a.schedule[..] };
    for &spec in asked {
        if !methods.contains(&Method::Sam(spec)) {
            methods.push(Method::Sam(spec));
        }
    }
    Ok(methods)
}

fn run_bench(a: BenchArgs) -> Result<(), String> {
    let config = Config {
        base: match a.base {
            BaseArg::None => BaseOptimizer::None,
            BaseArg::Sgd => BaseOptimizer::Sgd,
            BaseArg::Adamw => BaseOptimizer::AdamW,
        },
        momentum: if a.base == BaseArg::Sgd { 0.9 } else { 0.0 },
        ..Config::default()
    };
    println!(
        "samopt {} bench: a SAM step (first + second) beside a copy of the same bytes, {} repetitions, medians",
        samopt::VERSION,
        a.reps
    );
    println!(
        "{:<5} {:>5} {:>12} {:>8} {:>10} {:>10} {:>10} {:>7}  timing",
        "where", "dtype", "elements", "tensors", "SAM ms", "SAM GB/s", "copy GB/s", "ratio"
    );
    let mut engines = Vec::new();
    if a.backend != BenchBackend::Gpu {
        engines.push(false);
    }
    if a.backend != BenchBackend::Cpu {
        engines.push(true);
    }
    for &gpu in &engines {
        for &n in &a.elements {
            for &k in &a.tensors {
                if k == 0 || k > n {
                    return Err(format!("--tensors {k}: between 1 and --elements ({n})"));
                }
                let lens: Vec<usize> = (0..k).map(|i| n / k + usize::from(i < n % k)).collect();
                for &d in &a.dtype {
                    let dtype = match d {
                        DTypeArg::F32 => DType::F32,
                        DTypeArg::F16 => DType::F16,
                        DTypeArg::Bf16 => DType::BF16,
                    };
                    let m = if gpu {
                        samopt::bench::gpu(&lens, dtype, &config, a.reps as usize)
                    } else {
                        samopt::bench::cpu(&lens, dtype, &config, a.reps as usize)
                    }
                    .map_err(|e| format!("bench on the {}: {e}", if gpu { "GPU" } else { "CPU" }))?;
                    println!(
                        "{:<5} {:>5} {:>12} {:>8} {:>10.3} {:>10.2} {:>10.2} {:>7.2}  {}",
                        if gpu { "gpu" } else { "cpu" },
                        dtype.name(),
                        m.elements,
                        m.tensors,
                        m.sam_seconds * 1e3,
                        m.sam_bytes / m.sam_seconds / 1e9,
                        m.copy_bytes / m.copy_seconds / 1e9,
                        m.ratio,
                        m.timing
                    );
                }
            }
        }
    }
    Ok(())
}

fn run_info() -> Result<(), String> {
    println!("samopt {} (C ABI {})", samopt::VERSION, samopt::capi::SAM_ABI_VERSION);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("CPU engine: {threads} threads");
    let adapters = samopt::gpu::adapters();
    if adapters.is_empty() {
        println!("GPU adapters: none found (WGPU_BACKEND={})", std::env::var("WGPU_BACKEND").unwrap_or_default());
    } else {
        println!("GPU adapters (best first; choose with SAMOPT_ADAPTER=<index or name>):");
        for (i, a) in adapters.iter().enumerate() {
            println!("  [{i}] {} ({}, {})", a.name, a.backend, a.device_type);
            println!(
                "      driver {}; storage binding {} MiB, buffer {} MiB, timestamps {}",
                if a.driver.is_empty() { "?" } else { &a.driver },
                a.max_binding_bytes >> 20,
                a.max_buffer_bytes >> 20,
                if a.timestamps { "yes" } else { "no" }
            );
        }
    }
    println!("backend AUTO picks: the CPU for host buffers (sam_register_host);");
    match adapters.first() {
        Some(a) if a.device_type == "cpu" => println!(
            "  the CPU for optimizer-allocated tensors too: [0] {} is a software rasterizer, slower than the CPU \
             engine (name it in SAMOPT_ADAPTER to use it anyway)",
            a.name
        ),
        Some(a) => println!("  the GPU for optimizer-allocated tensors (sam_tensor_create), on [0] {}", a.name),
        None => println!("  the CPU for optimizer-allocated tensors too (no GPU adapter)"),
    }
    if std::io::stdout().is_terminal() {
        println!("(set SAMOPT_LOG=info to see samopt's own log messages)");
    }
    Ok(())
}
