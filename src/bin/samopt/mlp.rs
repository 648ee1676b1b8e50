//! A small multilayer perceptron with a hand-written forward and backward pass (ReLU hidden layers,
//! softmax cross-entropy), its matrix products by `matrixmultiply`'s sgemm.
//!
//! Parameters and gradients are separate `Vec<f32>`s per tensor (weights and biases of each layer),
//! as a framework would hold them: the demo registers each pair with samopt.

use crate::data::Rng;

pub struct Mlp {
    /// Layer widths, input first.
    pub sizes: Vec<usize>,
    /// `[W0, b0, W1, b1, ...]`, `W` row-major `in x out`.
    pub params: Vec<Vec<f32>>,
    /// Gradients, shaped as `params`.
    pub grads: Vec<Vec<f32>>,
}

/// `c = alpha * a * b + beta * c` for row-major `c` (m x n); `a` (m x k) and `b` (k x n) given by
/// their row and column strides, so transposes cost nothing.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    (ra, ca): (usize, usize),
    b: &[f32],
    (rb, cb): (usize, usize),
    beta: f32,
    c: &mut [f32],
) {
    assert!(m == 0 || k == 0 || (m - 1) * ra + (k - 1) * ca < a.len());
    assert!(k == 0 || n == 0 || (k - 1) * rb + (n - 1) * cb < b.len());
    assert!(c.len() >= m * n);
    // SAFETY: the asserts above keep every index the strides reach inside the slices.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            ra as isize,
            ca as isize,
            b.as_ptr(),
            rb as isize,
            cb as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        )
    }
}

impl Mlp {
    /// He-initialised weights, zero biases.
    pub fn new(sizes: &[usize], seed: u64) -> Mlp {
        let mut rng = Rng::new(seed ^ 0xA11CE);
        let mut params = Vec::new();
        for w in sizes.windows(2) {
            let scale = (2.0 / w[0] as f64).sqrt();
            params.push((0..w[0] * w[1]).map(|_| (rng.normal() * scale) as f32).collect());
            params.push(vec![0.0; w[1]]);
        }
        let grads = params.iter().map(|p: &Vec<f32>| vec![0.0; p.len()]).collect();
        Mlp { sizes: sizes.to_vec(), params, grads }
    }

    /// Mean cross-entropy and the number of correct predictions over `n` rows of `x` with labels
    /// `y`; with `grad`, writes the gradient of the mean loss into `self.grads`.
    pub fn run(&mut self, x: &[f32], y: &[u32], grad: bool) -> (f64, usize) {
        let n = y.len();
        let layers = self.sizes.len() - 1;
        // acts[l]: the input of layer l (n x sizes[l]); the last entry holds the logits.
        let mut acts: Vec<Vec<f32>> = vec![x.to_vec()];
        for l in 0..layers {
            let (inp, out) = (self.sizes[l], self.sizes[l + 1]);
            let mut z = vec![0f32; n * out];
            for row in z.chunks_mut(out) {
                row.copy_from_slice(&self.params[2 * l + 1]);
            }
            gemm(n, inp, out, &acts[l], (inp, 1), &self.params[2 * l], (out, 1), 1.0, &mut z);
            if l + 1 < layers {
                z.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            acts.push(z);
        }
        let k = self.sizes[layers];
        let mut loss = 0.0f64;
        let mut correct = 0;
        let mut delta = vec![0f32; n * k];
        for (i, (logits, d)) in acts[layers].chunks(k).zip(delta.chunks_mut(k)).enumerate() {
            let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let sum: f64 = logits.iter().map(|&v| ((v - max) as f64).exp()).sum();
            let label = y[i] as usize;
            loss += sum.ln() - (logits[label] - max) as f64;
            let best = (0..k).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
            correct += (best == label) as usize;
            for (j, dj) in d.iter_mut().enumerate() {
                let p = ((logits[j] - max) as f64).exp() / sum;
                *dj = ((p - (j == label) as u8 as f64) / n as f64) as f32;
            }
        }
        if grad {
            for l in (0..layers).rev() {
                let (inp, out) = (self.sizes[l], self.sizes[l + 1]);
                gemm(inp, n, out, &acts[l], (1, inp), &delta, (out, 1), 0.0, &mut self.grads[2 * l]);
                let db = &mut self.grads[2 * l + 1];
                db.fill(0.0);
                for row in delta.chunks(out) {
                    db.iter_mut().zip(row).for_each(|(a, b)| *a += b);
                }
                if l > 0 {
                    let mut prev = vec![0f32; n * inp];
                    gemm(n, out, inp, &delta, (out, 1), &self.params[2 * l], (1, out), 0.0, &mut prev);
                    // Through the ReLU: acts[l] is its output.
                    prev.iter_mut().zip(&acts[l]).for_each(|(d, &a)| {
                        if a <= 0.0 {
                            *d = 0.0
                        }
                    });
                    delta = prev;
                }
            }
        }
        (loss / n as f64, correct)
    }

    /// Total number of parameters.
    pub fn param_count(&self) -> usize {
        self.params.iter().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The analytic gradient against central differences in float64 terms.
    #[test]
    #[allow(clippy::needless_range_loop)] // the loops also write net.params[t][i]
    fn gradient_matches_finite_differences() {
        let mut net = Mlp::new(&[3, 5, 4, 3], 1);
        let x: Vec<f32> = (0..12).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
        let y = [0u32, 2, 1, 2];
        net.run(&x, &y, true);
        let grads = net.grads.clone();
        for t in 0..net.params.len() {
            for i in 0..net.params[t].len() {
                let w = net.params[t][i];
                let h = 1e-2;
                net.params[t][i] = w + h;
                let (lp, _) = net.run(&x, &y, false);
                net.params[t][i] = w - h;
                let (lm, _) = net.run(&x, &y, false);
                net.params[t][i] = w;
                let numeric = (lp - lm) / (2.0 * h as f64);
                let analytic = grads[t][i] as f64;
                assert!(
                    (numeric - analytic).abs() < 2e-3 + 2e-2 * analytic.abs(),
                    "tensor {t}[{i}]: {analytic} vs {numeric}"
                );
            }
        }
    }
}
