//! The `samopt` command as a user runs it: arguments, errors, the JSON summary, the plot, the data
//! loaders on small generated files, the step schedules and the comparison mode, `info` and `bench`.

use std::path::Path;
use std::process::{Command, Output};

fn samopt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_samopt")).args(args).output().expect("run samopt")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "samopt failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("stdout is JSON")
}

/// A quick demo: few epochs on few samples.
const QUICK: [&str; 6] = ["--epochs", "3", "--train", "300", "--hidden", "16"];

#[test]
fn help_documents_every_command_and_option() {
    let o = samopt(&["--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for word in ["demo", "bench", "info"] {
        assert!(text.contains(word), "--help lacks {word}");
    }
    let o = samopt(&["demo", "--help"]);
    let text = String::from_utf8_lossy(&o.stdout);
    for opt in [
        "--backend",
        "--rho",
        "--adaptive",
        "--epochs",
        "--noise",
        "--seed",
        "--json",
        "--plot",
        "--data",
        "--labels",
        "--schedule",
        "--compare",
        "--amp",
        "--loss-scale",
        "--no-master",
    ] {
        assert!(text.contains(opt), "demo --help lacks {opt}");
    }
}

#[test]
fn bad_arguments_give_one_line_and_a_failure() {
    for (args, needle) in [
        (vec!["demo", "--rho", "-1"], "--rho"),
        (vec!["demo", "--rho", "abc"], "--rho"),
        (vec!["demo", "--noise", "1.5"], "--noise"),
        (vec!["demo", "--epochs", "0"], "--epochs"),
        (vec!["demo", "--backend", "tpu"], "--backend"),
        (vec!["demo", "--labels", "x"], "--data"),
        (vec!["frobnicate"], "frobnicate"),
        (vec!["bench", "--dtype", "f64"], "--dtype"),
    ] {
        let o = samopt(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = stderr(&o);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // Errors found after parsing: exit 1, one line.
    let dir = tempdir();
    let png = dir.join("curves.png");
    let mut args = vec!["demo", "--plot", png.to_str().unwrap()];
    args.extend(QUICK);
    let o = samopt(&args);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("only SVG"), "{}", stderr(&o));
    let o = samopt(&["demo", "--data", "/nonexistent.csv"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("/nonexistent.csv"));
}

#[test]
fn json_summary_shape() {
    let mut args = vec!["demo", "--json", "--backend", "cpu"];
    args.extend(QUICK);
    let v = json(&samopt(&args));
    assert!(v["backend"].as_str().unwrap().starts_with("cpu"));
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["optimizer"], "sgd");
    assert_eq!(runs[1]["optimizer"], "sam");
    for r in runs {
        for key in ["test_accuracy", "train_loss", "sharpness", "seconds_per_step"] {
            let x = r[key].as_f64().unwrap_or_else(|| panic!("{key} is not a number: {r}"));
            assert!(x.is_finite() && x >= 0.0, "{key} = {x}");
        }
        let acc = r["test_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
    }
    assert_eq!(v["dataset"]["train"], 300);
    assert_eq!(v["dataset"]["flipped_labels"], 120);
}

#[test]
fn plot_writes_an_svg_with_both_runs() {
    let dir = tempdir();
    let path = dir.join("curves.svg");
    let mut args = vec!["demo", "--plot", path.to_str().unwrap()];
    args.extend(QUICK);
    let o = samopt(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let svg = std::fs::read_to_string(&path).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 4, "two curves per panel");
    // Three epochs: three points per curve.
    let first = svg.split("points=\"").nth(1).unwrap().split('"').next().unwrap();
    assert_eq!(first.split(' ').count(), 3);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("sgd") && table.contains("sam") && table.contains("test acc"), "{table}");
}

fn tempdir() -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "cli-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn csv_data() {
    let dir = tempdir();
    let path = dir.join("blobs.csv");
    let mut text = String::from("x,y,label\n");
    for i in 0..200 {
        let c = i % 2;
        let (x, y) = ((i % 17) as f32 / 17.0 + 2.0 * c as f32, (i % 13) as f32 / 13.0);
        text += &format!("{x},{y},{}\n", if c == 0 { "left" } else { "right" });
    }
    std::fs::write(&path, text).unwrap();
    let v = json(&samopt(&["demo", "--json", "--data", path.to_str().unwrap(), "--epochs", "5", "--noise", "0"]));
    assert_eq!(v["dataset"]["train"], 160);
    assert_eq!(v["dataset"]["test"], 40);
    assert_eq!(v["dataset"]["features"], 2);
    assert_eq!(v["dataset"]["classes"], 2);
    // Two separable blobs: both runs learn them.
    for r in v["runs"].as_array().unwrap() {
        assert!(r["test_accuracy"].as_f64().unwrap() > 0.9, "{r}");
    }
}

#[test]
fn idx_data() {
    let dir = tempdir();
    let (n, side) = (60usize, 4usize);
    let mut images = vec![0u8, 0, 8, 3];
    for v in [n, side, side] {
        images.extend((v as u32).to_be_bytes());
    }
    let mut labels = vec![0u8, 0, 8, 1];
    labels.extend((n as u32).to_be_bytes());
    for i in 0..n {
        let class = (i % 3) as u8;
        labels.push(class);
        // Each class lights its own pixels.
        images.extend((0..side * side).map(|p| if p % 3 == class as usize { 200 } else { (i * p % 40) as u8 }));
    }
    let (img, lab) = (dir.join("images.idx"), dir.join("labels.idx"));
    std::fs::write(&img, images).unwrap();
    std::fs::write(&lab, labels).unwrap();
    let v = json(&samopt(&[
        "demo",
        "--json",
        "--data",
        img.to_str().unwrap(),
        "--labels",
        lab.to_str().unwrap(),
        "--epochs",
        "10",
        "--noise",
        "0",
    ]));
    assert_eq!((v["dataset"]["features"].as_u64(), v["dataset"]["classes"].as_u64()), (Some(16), Some(3)));
    assert_eq!(v["dataset"]["train"], 48);
    let o = samopt(&["demo", "--data", img.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--labels"), "{}", stderr(&o));
}

#[test]
fn info_and_bench() {
    let o = samopt(&["info"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains(env!("CARGO_PKG_VERSION")) && text.contains("C ABI 1") && text.contains("AUTO"), "{text}");

    let o = samopt(&[
        "bench",
        "--backend",
        "cpu",
        "--elements",
        "200000",
        "--tensors",
        "1",
        "--tensors",
        "7",
        "--reps",
        "2",
        "--dtype",
        "bf16",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("cpu")).collect();
    assert_eq!(rows.len(), 2, "{text}");
    for row in rows {
        let ratio: f64 = row.split_whitespace().nth(7).unwrap().parse().unwrap();
        assert!(ratio > 0.0, "{row}");
    }
    let o = samopt(&["bench", "--backend", "cpu", "--elements", "10", "--tensors", "20"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--tensors 20"));
}

#[test]
fn bad_schedules_are_refused_naming_the_value() {
    for spec in [
        "interval:0",
        "interval",
        "interval:x",
        "random:1.5",
        "random:-0.1",
        "random:nan",
        "looksam:5:-1",
        "looksam:0",
        "looksam:5:inf",
        "aesam:x",
        "every:2",
        "sometimes",
        "",
    ] {
        let o = samopt(&["demo", "--schedule", spec]);
        assert_eq!(o.status.code(), Some(2), "{spec:?}");
        let err = stderr(&o);
        assert_eq!(err.trim_end().lines().count(), 1, "{spec:?}: {err}");
        assert!(err.contains("--schedule") && err.contains(&format!("'{spec}'")), "{spec:?}: {err}");
    }
    let o = samopt(&["demo", "--schedule", "sometimes"]);
    assert!(stderr(&o).contains("every, interval:K, random:P, looksam:K[:ALPHA] or aesam"), "{}", stderr(&o));
    // One SAM run takes one schedule; several need --compare.
    let o = samopt(&["demo", "--schedule", "interval:2", "--schedule", "aesam"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--compare"), "{}", stderr(&o));
}

/// The counters of a run are consistent: gradient evaluations are one per step plus one per SAM
/// step, and their ratio to the steps is `grad_evals_per_step`. Under --amp, steps the loss scale
/// skipped (overflow) count among the steps, with one or two gradient evaluations each, and the SGD
/// run is samopt's, on single-gradient steps only.
fn check_counts(r: &serde_json::Value) -> f64 {
    let steps = r["steps"].as_u64().unwrap();
    let evals = r["grad_evals"].as_u64().unwrap();
    let per_step = r["grad_evals_per_step"].as_f64().unwrap();
    assert!((per_step - evals as f64 / steps as f64).abs() < 1e-12, "{r}");
    let skipped = r["skipped_steps"].as_u64();
    assert_eq!(skipped.is_some(), r["loss_scale"].is_f64(), "{r}");
    let skipped = skipped.unwrap_or(0);
    if r["optimizer"] == "sgd" {
        assert!(r["schedule"].is_null(), "{r}");
    }
    if r["optimizer"] == "sgd" && r["sam_steps"].is_null() {
        assert_eq!(evals, steps, "{r}");
    } else {
        let (sam, single) = (r["sam_steps"].as_u64().unwrap(), r["single_steps"].as_u64().unwrap());
        if r["optimizer"] == "sgd" {
            assert_eq!((sam, evals), (0, steps), "{r}");
        }
        assert_eq!(sam + single + skipped, steps, "{r}");
        assert!(2 * sam + single + skipped <= evals && evals <= 2 * sam + single + 2 * skipped, "{r}");
    }
    assert!(r["wall_s"].as_f64().unwrap() >= 0.0, "{r}");
    per_step
}

#[test]
fn a_schedule_takes_fewer_gradients() {
    for fused in [false, true] {
        let mut args = vec!["demo", "--json", "--schedule", "interval:2"];
        args.extend(QUICK);
        if fused {
            args.push("--fused");
        }
        let v = json(&samopt(&args));
        let runs = v["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0]["optimizer"].as_str(), runs[1]["optimizer"].as_str()), (Some("sgd"), Some("sam")));
        assert_eq!(runs[1]["schedule"], "interval:2");
        assert_eq!(check_counts(&runs[0]), 1.0);
        let per_step = check_counts(&runs[1]);
        assert!(per_step > 1.0 && per_step < 2.0, "{per_step}");
        // 3 epochs of ceil(300 / 64) = 5 steps: SAM on steps 0, 2, ..., 14.
        assert_eq!((runs[1]["steps"].as_u64(), runs[1]["sam_steps"].as_u64()), (Some(15), Some(8)));
    }
    // The default schedule is plain SAM: two gradients a step.
    let mut args = vec!["demo", "--json"];
    args.extend(QUICK);
    let v = json(&samopt(&args));
    assert_eq!(v["runs"][1]["schedule"], "every");
    assert_eq!(check_counts(&v["runs"][1]), 2.0);
}

#[test]
fn looksam_runs_with_the_demos_own_sgd_and_fused() {
    // Without --fused the demo's SGD steps with LookSAM's direction, which samopt writes into the
    // (writably registered) gradients; with it samopt's SGD does. The two agree.
    let mut results = Vec::new();
    for fused in [false, true] {
        let mut args = vec!["demo", "--json", "--schedule", "looksam:3:0.5"];
        args.extend(QUICK);
        if fused {
            args.push("--fused");
        }
        let v = json(&samopt(&args));
        let r = &v["runs"][1];
        assert_eq!(r["schedule"], "looksam:3:0.5");
        assert_eq!(r["sam_steps"], 5, "{r}");
        check_counts(r);
        results.push(r["train_loss"].as_f64().unwrap());
    }
    assert!((results[0] - results[1]).abs() < 1e-3 * results[0].abs().max(1.0), "{results:?}");
}

#[test]
fn comparison_lists_every_method() {
    let dir = tempdir();
    let path = dir.join("compare.svg");
    let methods = ["sgd", "sam", "interval:10", "random:0.2", "looksam:5:0.7", "aesam"];
    let mut args = vec!["demo", "--compare", "--json", "--plot", path.to_str().unwrap()];
    args.extend(QUICK);
    let v = json(&samopt(&args));
    assert_eq!(v["compare"], true);
    let runs = v["runs"].as_array().unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(names, methods);
    for r in runs {
        let per_step = check_counts(r);
        for key in ["test_accuracy", "sharpness", "wall_s"] {
            assert!(r[key].as_f64().unwrap().is_finite(), "{key}: {r}");
        }
        match r["method"].as_str().unwrap() {
            "sgd" => assert_eq!(per_step, 1.0),
            "sam" => assert_eq!(per_step, 2.0),
            "interval:10" => assert!(per_step > 1.0 && per_step < 1.2, "{r}"),
            _ => assert!((1.0..=2.0).contains(&per_step), "{r}"),
        }
        assert_eq!(r["optimizer"], if r["method"] == "sgd" { "sgd" } else { "sam" });
    }
    // Every method's curves, with a legend naming it.
    let svg = std::fs::read_to_string(&path).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 2 * methods.len());
    for m in methods {
        assert_eq!(svg.matches(&format!(">{m}</text>")).count(), 2, "{m}");
    }

    // The table: one row per method, and the schedules asked for instead of the default set.
    let mut args = vec!["demo", "--compare", "--schedule", "random:0.5", "--schedule", "looksam:2"];
    args.extend(QUICK);
    let o = samopt(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    let rows: Vec<&str> =
        table.lines().skip_while(|l| !l.starts_with("run ")).skip(1).take_while(|l| !l.is_empty()).collect();
    let names: Vec<&str> = rows.iter().map(|l| l.split_whitespace().next().unwrap()).collect();
    assert_eq!(names, ["sgd", "sam", "random:0.5", "looksam:2:0.7"], "{table}");
    assert!(table.contains("gain kept") && table.contains("grads/step"), "{table}");
}

/// `--amp`: bf16 weights and gradients with f32 master weights in samopt and a dynamic loss scale,
/// for the SGD run too. The summary names the mode, and each run its final loss scale and skipped
/// steps; without --amp the mode is f32 and those fields are null.
#[test]
fn amp_runs_and_reports_the_loss_scale() {
    let mut args = vec!["demo", "--json", "--amp"];
    args.extend(QUICK);
    let v = json(&samopt(&args));
    let p = &v["precision"];
    assert_eq!((p["mode"].as_str(), p["dtype"].as_str()), (Some("amp"), Some("bf16")), "{p}");
    assert_eq!(p["master_weights"], true);
    assert_eq!(p["loss_scale"]["kind"], "dynamic");
    assert_eq!(p["loss_scale"]["init"], 65536.0);
    assert_eq!(p["loss_scale"]["growth_interval"], 2000);
    assert_eq!(v["setup"]["fused"], true, "--amp implies --fused");
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for r in runs {
        check_counts(r);
        // bf16 has f32's exponent range: a gradient times 2^16 does not overflow it here.
        assert_eq!((r["loss_scale"].as_f64(), r["skipped_steps"].as_u64()), (Some(65536.0), Some(0)), "{r}");
        // Close to the f32 run's learning: clearly below the initial loss (ln 4 = 1.386).
        assert!(r["train_loss"].as_f64().unwrap() < 1.33, "{r}");
    }
    assert_eq!(runs[0]["single_steps"], 15, "the SGD run: samopt's SGD, one gradient a step");

    // The table: the mode and two more columns, only with --amp.
    let mut args = vec!["demo", "--amp", "--no-master"];
    args.extend(QUICK);
    let o = samopt(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("mixed precision (--amp): bf16") && table.contains("no master weights"), "{table}");
    let header = table.lines().find(|l| l.starts_with("run ")).unwrap();
    assert!(header.ends_with("loss scale skipped"), "{table}");
    let row = table.lines().find(|l| l.starts_with("sam ")).unwrap();
    assert!(row.ends_with("65536       0"), "{table}");

    let mut args = vec!["demo", "--json"];
    args.extend(QUICK);
    let v = json(&samopt(&args));
    assert_eq!(v["precision"]["mode"], "f32");
    for r in v["runs"].as_array().unwrap() {
        assert!(r["loss_scale"].is_null() && r["skipped_steps"].is_null(), "{r}");
    }
    let mut args = vec!["demo"];
    args.extend(QUICK);
    let table = String::from_utf8_lossy(&samopt(&args).stdout).into_owned();
    assert!(!table.contains("loss scale") && !table.contains("mixed precision"), "{table}");
}

/// f16's range is small: a gradient times 2^16 overflows it, samopt skips that step and halves the
/// scale. Every run of a comparison, schedules included, goes through the same path.
#[test]
fn amp_f16_skips_overflowing_steps() {
    let mut args = vec!["demo", "--json", "--amp", "f16", "--compare", "--schedule", "interval:2"];
    args.extend(QUICK);
    let v = json(&samopt(&args));
    assert_eq!(v["precision"]["dtype"], "f16");
    let runs = v["runs"].as_array().unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(names, ["sgd", "sam", "interval:2"]);
    let mut skipped_somewhere = false;
    for r in runs {
        check_counts(r);
        let skipped = r["skipped_steps"].as_u64().unwrap();
        skipped_somewhere |= skipped > 0;
        // Fewer than 2000 good steps: the scale never grew, and halved at each skip.
        let scale = r["loss_scale"].as_f64().unwrap();
        assert_eq!(scale * 2f64.powi(skipped as i32), 65536.0, "{r}");
        assert!(r["test_accuracy"].as_f64().unwrap().is_finite(), "{r}");
    }
    assert!(skipped_somewhere, "no step overflowed f16 at a scale of 2^16: {v}");

    // A fixed scale stays, and is reported.
    let mut args = vec!["demo", "--json", "--amp", "--loss-scale", "1024"];
    args.extend(QUICK);
    let v = json(&samopt(&args));
    assert_eq!(v["precision"]["loss_scale"]["kind"], "fixed");
    assert!(v["precision"]["loss_scale"]["growth_interval"].is_null());
    for r in v["runs"].as_array().unwrap() {
        assert_eq!(r["loss_scale"], 1024.0, "{r}");
    }
}

#[test]
fn bad_amp_combinations_are_refused() {
    for (args, needles) in [
        (vec!["demo", "--loss-scale", "1024"], vec!["--loss-scale", "--amp"]),
        (vec!["demo", "--no-master"], vec!["--no-master", "--amp"]),
        (vec!["demo", "--amp", "fp8"], vec!["--amp", "fp8", "bf16"]),
        (vec!["demo", "--amp", "--loss-scale", "0"], vec!["--loss-scale", "> 0"]),
        (vec!["demo", "--amp", "--loss-scale", "-2"], vec!["--loss-scale", "> 0"]),
        (vec!["demo", "--amp", "--loss-scale", "1e39"], vec!["--loss-scale", "largest f32"]),
        (vec!["demo", "--amp", "--loss-scale", "inf"], vec!["--loss-scale", "> 0"]),
        (vec!["demo", "--amp", "--loss-scale", "auto"], vec!["--loss-scale", "dynamic"]),
    ] {
        let o = samopt(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = stderr(&o);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        for needle in needles {
            assert!(err.contains(needle), "{args:?}: {needle:?} not in {err}");
        }
    }
    // What the library refuses is refused under --amp as without it, naming the option.
    let o = samopt(&["demo", "--amp", "--adaptive", "--schedule", "looksam:5", "--epochs", "1"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("--schedule looksam:5:0.7") && err.contains("adaptive"), "{err}");
}
