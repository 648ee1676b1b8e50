//! A dependency-free SVG of the demo's curves: training loss and clean test accuracy per epoch, for
//! every run (SGD, SAM, and the schedules of a comparison), side by side, with a legend.

use std::fmt::Write;

use crate::demo::RunResult;

const W: f64 = 460.0;
const H: f64 = 300.0;
const PAD: f64 = 48.0;
/// ColorBrewer's Dark2: SGD first, SAM second, as before the schedules came.
const COLORS: [&str; 8] = ["#d95f02", "#1b9e77", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"];

/// One panel of curves; the legend goes in its top right corner, or in its bottom right corner
/// when `legend_low` (where rising curves leave room).
fn panel(out: &mut String, x0: f64, title: &str, runs: &[(&str, &[f64])], legend_low: bool) {
    let all: Vec<f64> = runs.iter().flat_map(|(_, v)| v.iter().copied()).filter(|v| v.is_finite()).collect();
    let (mut lo, mut hi) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        lo -= 0.5;
        hi += 0.5;
    }
    let n = runs.iter().map(|(_, v)| v.len()).max().unwrap_or(1).max(2);
    let sx = |i: usize| x0 + PAD + (W - 1.5 * PAD) * i as f64 / (n - 1) as f64;
    let sy = |v: f64| H - PAD - (H - 2.0 * PAD) * (v - lo) / (hi - lo);
    let _ = write!(
        out,
        r##"<rect x="{x}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#888"/>"##,
        x = x0 + PAD,
        top = PAD,
        w = W - 1.5 * PAD,
        h = H - 2.0 * PAD
    );
    let _ = write!(
        out,
        r#"<text x="{}" y="{}" font-size="15" text-anchor="middle">{title}</text>"#,
        x0 + W / 2.0,
        PAD - 16.0
    );
    for v in [lo, (lo + hi) / 2.0, hi].iter() {
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" font-size="11" text-anchor="end">{:.3}</text>"#,
            x0 + PAD - 4.0,
            sy(*v) + 4.0,
            v
        );
    }
    let _ = write!(
        out,
        r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">epoch</text>"#,
        x0 + W / 2.0,
        H - PAD + 28.0
    );
    for (i, label) in [(0, 1), (n - 1, n)] {
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">{label}</text>"#,
            sx(i),
            H - PAD + 14.0
        );
    }
    for (k, (name, values)) in runs.iter().enumerate() {
        let points: Vec<String> =
            values.iter().enumerate().map(|(i, &v)| format!("{:.1},{:.1}", sx(i), sy(v))).collect();
        let _ = write!(
            out,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            COLORS[k % COLORS.len()],
            points.join(" ")
        );
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" font-size="12" text-anchor="end" fill="{}">{}</text>"#,
            x0 + W - 0.5 * PAD - 6.0,
            if legend_low { H - PAD - 8.0 - 14.0 * (runs.len() - 1 - k) as f64 } else { PAD + 16.0 + 14.0 * k as f64 },
            COLORS[k % COLORS.len()],
            escape(name)
        );
    }
}

/// `text` with XML's special characters escaped.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The SVG document for `runs`.
pub fn svg(runs: &[RunResult]) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif">"#,
        2.0 * W,
        H
    );
    let loss: Vec<(&str, &[f64])> = runs.iter().map(|r| (r.label.as_str(), r.history.train_loss.as_slice())).collect();
    let acc: Vec<(&str, &[f64])> =
        runs.iter().map(|r| (r.label.as_str(), r.history.test_accuracy.as_slice())).collect();
    panel(&mut out, 0.0, "training loss (noisy labels)", &loss, false);
    panel(&mut out, W, "test accuracy (clean labels)", &acc, true);
    out.push_str("</svg>\n");
    out
}
