//! Datasets for the demo: the embedded generated task, and loaders for real data (CSV with a label
//! column, MNIST's IDX files).

use std::path::Path;

/// A classification dataset: `x` is `n` rows of `dim` features, row-major; `y` holds class indices.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub x: Vec<f32>,
    pub y: Vec<u32>,
    pub dim: usize,
    pub classes: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.dim..(i + 1) * self.dim]
    }

    /// The rows `idx`, in that order.
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let mut x = Vec::with_capacity(idx.len() * self.dim);
        for &i in idx {
            x.extend_from_slice(self.row(i));
        }
        Dataset { x, y: idx.iter().map(|&i| self.y[i]).collect(), dim: self.dim, classes: self.classes }
    }

    /// Standardises every feature with the mean and deviation of `self` (applied to both sets).
    pub fn standardize_with(&mut self, other: &mut Dataset) {
        for j in 0..self.dim {
            let n = self.len() as f64;
            let mean = (0..self.len()).map(|i| self.x[i * self.dim + j] as f64).sum::<f64>() / n;
            let var = (0..self.len()).map(|i| (self.x[i * self.dim + j] as f64 - mean).powi(2)).sum::<f64>() / n;
            let sd = var.sqrt().max(1e-6);
            for d in [&mut *self, &mut *other] {
                for i in 0..d.len() {
                    let v = &mut d.x[i * d.dim + j];
                    *v = ((*v as f64 - mean) / sd) as f32;
                }
            }
        }
    }
}

/// A small deterministic generator (SplitMix64 with a Box-Muller normal).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit().max(1e-300), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// The embedded task: `dim` Gaussian features, labelled by a fixed random two-layer teacher network
/// into `classes` classes (a nonlinear decision boundary). Returns `(train, test)`, both clean.
pub fn generated(train: usize, test: usize, dim: usize, classes: usize, seed: u64) -> (Dataset, Dataset) {
    // The teacher is the same for every seed: the seed picks the sample, not the task.
    let mut teacher = Rng::new(0x7EAC_4E12);
    let hidden = 32;
    let w1: Vec<f64> = (0..dim * hidden).map(|_| teacher.normal() / (dim as f64).sqrt()).collect();
    let b1: Vec<f64> = (0..hidden).map(|_| 0.5 * teacher.normal()).collect();
    let w2: Vec<f64> = (0..hidden * classes).map(|_| teacher.normal()).collect();
    let mut rng = Rng::new(seed);
    let mut sample = |n: usize| {
        let mut x = Vec::with_capacity(n * dim);
        let mut y = Vec::with_capacity(n);
        for _ in 0..n {
            let row: Vec<f64> = (0..dim).map(|_| rng.normal()).collect();
            let h: Vec<f64> = (0..hidden)
                .map(|j| (b1[j] + (0..dim).map(|i| row[i] * w1[i * hidden + j]).sum::<f64>()).tanh())
                .collect();
            let logits: Vec<f64> =
                (0..classes).map(|c| (0..hidden).map(|j| h[j] * w2[j * classes + c]).sum()).collect();
            let label = (0..classes).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
            x.extend(row.iter().map(|&v| v as f32));
            y.push(label as u32);
        }
        Dataset { x, y, dim, classes }
    };
    (sample(train), sample(test))
}

/// The demo's task: `data` (80% trains, 20% tests; with `labels` for IDX images) or the embedded
/// one (`train` samples, 2000 tests), standardised with the training set's statistics, a `noise`
/// fraction of training labels flipped. Returns (train, test, a description, labels flipped).
pub fn task(
    data: Option<&Path>,
    labels: Option<&Path>,
    (train, noise, seed): (usize, f64, u64),
) -> Result<(Dataset, Dataset, String, usize), String> {
    let (mut train, mut test, source) = match data {
        Some(path) => {
            let all = load(path, labels)?;
            let (train, test) = split(&all, seed, &path.display().to_string())?;
            (train, test, path.display().to_string())
        }
        None => {
            let (train, test) = generated(train, 2000, 16, 4, seed);
            (train, test, "embedded task (16 Gaussian features, 4 classes by a fixed random teacher network)".into())
        }
    };
    train.standardize_with(&mut test);
    let flipped = flip_labels(&mut train, noise, seed);
    Ok((train, test, source, flipped))
}

/// `all` shuffled with `seed` and cut 80% / 20% into (train, test); `name` names it in errors.
pub fn split(all: &Dataset, seed: u64, name: &str) -> Result<(Dataset, Dataset), String> {
    let mut idx: Vec<usize> = (0..all.len()).collect();
    Rng::new(seed).shuffle(&mut idx);
    let cut = all.len() * 4 / 5;
    if cut == 0 || cut == all.len() {
        return Err(format!("--data {name}: {} rows are too few to split", all.len()));
    }
    Ok((all.subset(&idx[..cut]), all.subset(&idx[cut..])))
}

/// Replaces a `fraction` of the labels by a different class, uniformly; returns how many.
pub fn flip_labels(d: &mut Dataset, fraction: f64, seed: u64) -> usize {
    let mut rng = Rng::new(seed.wrapping_mul(31).wrapping_add(7));
    let mut idx: Vec<usize> = (0..d.len()).collect();
    rng.shuffle(&mut idx);
    let count = (fraction * d.len() as f64).round() as usize;
    for &i in &idx[..count] {
        let shift = 1 + rng.below(d.classes - 1) as u32;
        d.y[i] = (d.y[i] + shift) % d.classes as u32;
    }
    count
}

/// Loads `path`: MNIST IDX images (with `labels`, an IDX label file), or a CSV file with a header
/// and a column named `label` (else the last column is the label). Labels are class indices
/// 0..K-1 (CSV labels may be any strings: they are numbered in order of first appearance).
pub fn load(path: &Path, labels: Option<&Path>) -> Result<Dataset, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("--data {}: {e}", path.display()))?;
    if bytes.len() >= 4 && bytes[..4] == [0, 0, 8, 3] {
        let labels = labels.ok_or_else(|| {
            format!("--data {}: an IDX image file needs --labels with its IDX label file", path.display())
        })?;
        let label_bytes = std::fs::read(labels).map_err(|e| format!("--labels {}: {e}", labels.display()))?;
        return idx(&bytes, &label_bytes).map_err(|e| format!("--data {}: {e}", path.display()));
    }
    let text = String::from_utf8(bytes).map_err(|_| format!("--data {}: neither IDX nor UTF-8 CSV", path.display()))?;
    csv(&text).map_err(|e| format!("--data {}: {e}", path.display()))
}

/// Parses MNIST's IDX format: images (magic 0x00000803, u8 pixels scaled to [0, 1]) and labels
/// (magic 0x00000801).
pub fn idx(images: &[u8], labels: &[u8]) -> Result<Dataset, String> {
    let be = |b: &[u8], at: usize| -> Result<usize, String> {
        b.get(at..at + 4)
            .map(|s| u32::from_be_bytes(s.try_into().unwrap()) as usize)
            .ok_or("truncated header".to_owned())
    };
    if be(images, 0)? != 0x0803 {
        return Err("not an IDX image file (magic 0x00000803)".into());
    }
    if be(labels, 0)? != 0x0801 {
        return Err("the label file is not an IDX label file (magic 0x00000801)".into());
    }
    let (n, rows, cols) = (be(images, 4)?, be(images, 8)?, be(images, 12)?);
    let dim = rows * cols;
    if images.len() != 16 + n * dim {
        return Err(format!("{n} images of {rows}x{cols} need {} bytes, the file has {}", 16 + n * dim, images.len()));
    }
    if be(labels, 4)? != n || labels.len() != 8 + n {
        return Err(format!("{n} images but the label file holds {} labels", labels.len().saturating_sub(8)));
    }
    let y: Vec<u32> = labels[8..].iter().map(|&l| l as u32).collect();
    let classes = y.iter().max().map_or(0, |&m| m as usize + 1);
    if classes < 2 {
        return Err("fewer than two classes".into());
    }
    Ok(Dataset { x: images[16..].iter().map(|&p| p as f32 / 255.0).collect(), y, dim, classes })
}

/// Parses a CSV file with a header row; the column `label` (else the last one) is the class.
pub fn csv(text: &str) -> Result<Dataset, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines.next().ok_or("empty file")?.split(',').map(str::trim).collect();
    let label_col = header.iter().position(|h| h.eq_ignore_ascii_case("label")).unwrap_or(header.len() - 1);
    let dim = header.len() - 1;
    if dim == 0 {
        return Err("needs at least one feature column beside the label".into());
    }
    let mut names: Vec<String> = Vec::new();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (n, line) in lines.enumerate() {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() != header.len() {
            return Err(format!("line {}: {} cells, the header has {}", n + 2, cells.len(), header.len()));
        }
        for (j, c) in cells.iter().enumerate() {
            if j == label_col {
                let k = names.iter().position(|l| l == c).unwrap_or_else(|| {
                    names.push(c.to_string());
                    names.len() - 1
                });
                y.push(k as u32);
            } else {
                x.push(c.parse::<f32>().map_err(|_| format!("line {}: {c:?} is not a number", n + 2))?);
            }
        }
    }
    if names.len() < 2 {
        return Err(format!("{} distinct labels: a classification needs two or more", names.len()));
    }
    Ok(Dataset { x, y, dim, classes: names.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_named_label_column_and_string_classes() {
        let d = csv("a,label,b\n1,cat,2\n3,dog,4.5\n-1,cat,0\n").unwrap();
        assert_eq!(d.dim, 2);
        assert_eq!(d.classes, 2);
        assert_eq!(d.x, vec![1.0, 2.0, 3.0, 4.5, -1.0, 0.0]);
        assert_eq!(d.y, vec![0, 1, 0]);
    }

    #[test]
    fn csv_last_column_by_default_and_errors() {
        let d = csv("x,y,class\n0,1,1\n1,0,0\n").unwrap();
        assert_eq!((d.dim, d.classes, d.y.clone()), (2, 2, vec![0, 1]));
        assert!(csv("").unwrap_err().contains("empty"));
        assert!(csv("a,label\n1,0\n2\n").unwrap_err().contains("line 3"));
        assert!(csv("a,label\nx,0\n1,1\n").unwrap_err().contains("not a number"));
        assert!(csv("a,label\n1,0\n2,0\n").unwrap_err().contains("two or more"));
    }

    fn idx_files(n: usize, rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>) {
        let mut images = vec![0, 0, 8, 3];
        for v in [n, rows, cols] {
            images.extend((v as u32).to_be_bytes());
        }
        images.extend((0..n * rows * cols).map(|i| (i % 256) as u8));
        let mut labels = vec![0, 0, 8, 1];
        labels.extend((n as u32).to_be_bytes());
        labels.extend((0..n).map(|i| (i % 3) as u8));
        (images, labels)
    }

    #[test]
    fn idx_images_and_labels() {
        let (images, labels) = idx_files(5, 2, 3);
        let d = idx(&images, &labels).unwrap();
        assert_eq!((d.len(), d.dim, d.classes), (5, 6, 3));
        assert_eq!(d.row(1), &[6.0 / 255.0, 7.0 / 255.0, 8.0 / 255.0, 9.0 / 255.0, 10.0 / 255.0, 11.0 / 255.0]);
        assert_eq!(d.y, vec![0, 1, 2, 0, 1]);
        assert!(idx(&images[..20], &labels).unwrap_err().contains("bytes"));
        assert!(idx(&labels, &images).unwrap_err().contains("magic"));
        assert!(idx(&images, &labels[..10]).unwrap_err().contains("labels"));
    }

    #[test]
    fn generated_task_is_deterministic_and_balanced_enough() {
        let (a, t) = generated(500, 200, 8, 4, 3);
        let (b, _) = generated(500, 200, 8, 4, 3);
        assert_eq!(a, b);
        assert_eq!((a.len(), t.len(), a.dim), (500, 200, 8));
        for c in 0..4 {
            let share = a.y.iter().filter(|&&y| y == c).count() as f64 / 500.0;
            assert!(share > 0.05, "class {c} has {share} of the samples");
        }
        let mut noisy = a.clone();
        assert_eq!(flip_labels(&mut noisy, 0.3, 1), 150);
        assert_eq!(noisy.y.iter().zip(&a.y).filter(|(p, q)| p != q).count(), 150);
    }
}
