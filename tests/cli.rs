//! The `samopt` command as a user runs it: arguments, errors, the JSON summary, the plot, the data
//! loaders on small generated files, `info` and `bench`.

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
    for opt in
        ["--backend", "--rho", "--adaptive", "--epochs", "--noise", "--seed", "--json", "--plot", "--data", "--labels"]
    {
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
