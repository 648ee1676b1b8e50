//! f32 master weights for f16/bf16 tensors (`Config::master_weights`): with updates far below half
//! a unit in the last place of the weights, half-precision weights without master copies never
//! move, and with them they track a float64 reference of the same training within one rounding
//! to the dtype; the copies travel in checkpoints (a resumed run continues bit for bit); with a
//! zero learning rate the weights come back with their exact bits (the perturbation and restore
//! stay exact). SAM steps and single-gradient steps, SGD and AdamW, CPU and GPU.

mod common;

use common::optimizer_or_skip;
use samopt::half::{bf16, f16};
use samopt::{Backend, BaseOptimizer, Config, DType, FirstStep, Optimizer, Schedule};

const N: usize = 1000;
const STEPS: usize = 300;

fn set<T: samopt::Element>(opt: &mut Optimizer, id: u32, v: &[f64], conv: impl Fn(f64) -> T, grad: bool) {
    let data: Vec<T> = v.iter().map(|&x| conv(x)).collect();
    if grad { opt.write_grad(id, &data).unwrap() } else { opt.write_param(id, &data).unwrap() }
}

/// Runs `STEPS` steps of SGD (lr 1e-3) on one tensor of `dtype`, weights near 1 and second
/// gradients of 0.05: each update is 5e-5, far below half a unit in the last place of 1.0 in
/// f16 (2^-11) and bf16 (2^-8). Returns the weights as f64 and the float64 reference.
fn train(
    backend: Backend,
    dtype: DType,
    master: bool,
    schedule: Schedule,
    base: BaseOptimizer,
) -> Option<(Vec<f64>, Vec<f64>)> {
    let config = Config { backend, base, lr: 1e-3, master_weights: master, schedule, ..Config::default() };
    let mut opt = optimizer_or_skip(config.clone())?;
    let id = opt.add_zeroed_tensor(N, dtype).unwrap();
    let w0: Vec<f64> = (0..N).map(|i| 1.0 + (i % 8) as f64 * 2f64.powi(-6)).collect();
    let write = |opt: &mut Optimizer, v: &[f64], grad: bool| match dtype {
        DType::F16 => set(opt, id, v, f16::from_f64, grad),
        DType::BF16 => set(opt, id, v, bf16::from_f64, grad),
        DType::F32 => set(opt, id, v, |x| x as f32, grad),
    };
    write(&mut opt, &w0, false);
    let g1: Vec<f64> = (0..N).map(|i| if i % 2 == 0 { 0.05 } else { -0.025 }).collect();
    let g2 = vec![0.05; N];
    // The reference: the same SGD (or AdamW) in float64, never rounded to the dtype.
    let mut w = w0.clone();
    let (mut m, mut v) = (vec![0.0; N], vec![0.0; N]);
    for t in 1..=STEPS {
        write(&mut opt, &g1, true);
        let d = if opt.first_step().unwrap() == FirstStep::Perturbed {
            write(&mut opt, &g2, true);
            &g2
        } else {
            &g1
        };
        opt.second_step().unwrap();
        for i in 0..N {
            match base {
                BaseOptimizer::Sgd => w[i] -= 1e-3 * d[i],
                _ => {
                    let wd = config.effective_weight_decay();
                    w[i] *= 1.0 - 1e-3 * wd;
                    m[i] = 0.9 * m[i] + 0.1 * d[i];
                    v[i] = 0.999 * v[i] + 0.001 * d[i] * d[i];
                    let (b1, b2) = (1.0 - 0.9f64.powi(t as i32), 1.0 - 0.999f64.powi(t as i32));
                    w[i] -= 1e-3 / b1 * m[i] / ((v[i] / b2).sqrt() + 1e-8);
                }
            }
        }
    }
    let got: Vec<f64> = match dtype {
        DType::F16 => {
            let mut out = vec![f16::ZERO; N];
            opt.read_param(id, &mut out).unwrap();
            out.iter().map(|x| x.to_f64()).collect()
        }
        DType::BF16 => {
            let mut out = vec![bf16::ZERO; N];
            opt.read_param(id, &mut out).unwrap();
            out.iter().map(|x| x.to_f64()).collect()
        }
        DType::F32 => unreachable!(),
    };
    Some((got, w))
}

/// One unit in the last place of `x` in `dtype`.
fn ulp(dtype: DType, x: f64) -> f64 {
    let mantissa = if dtype == DType::F16 { 10 } else { 7 };
    2f64.powi(x.abs().log2().floor() as i32 - mantissa)
}

#[test]
fn small_updates_accumulate_only_with_master_weights() {
    for backend in [Backend::Cpu, Backend::Gpu] {
        for dtype in [DType::F16, DType::BF16] {
            for (schedule, base) in [
                (Schedule::Every, BaseOptimizer::Sgd),
                (Schedule::Interval { k: 3 }, BaseOptimizer::Sgd),
                (Schedule::Every, BaseOptimizer::AdamW),
            ] {
                let label = format!("{backend:?} {dtype:?} {schedule:?} {base:?}");
                if base == BaseOptimizer::Sgd {
                    let Some((without, _)) = train(backend, dtype, false, schedule, base) else { return };
                    let w0: Vec<f64> = (0..N).map(|i| 1.0 + (i % 8) as f64 * 2f64.powi(-6)).collect();
                    assert!(without == w0, "{label}: without master weights the updates should all be lost");
                }
                let (with, reference) = train(backend, dtype, true, schedule, base).unwrap();
                let mut worst = 0.0f64;
                for (i, (&a, &r)) in with.iter().zip(&reference).enumerate() {
                    let units = (a - r).abs() / ulp(dtype, r);
                    assert!(units <= 1.0, "{label}: element {i}: {a} vs the reference {r} ({units} units apart)");
                    worst = worst.max(units);
                }
                // The weights moved by more than a unit: the updates did accumulate.
                assert!((with[0] - 1.0).abs() > ulp(dtype, 1.0), "{label}: {}", with[0]);
                eprintln!("{label}: within {worst:.2} units in the last place of the float64 reference");
            }
        }
    }
}

/// The master copies are in checkpoints: a run saved and resumed (into an optimizer whose
/// half-precision weights were copied over) goes on bit for bit as the run that never stopped; an
/// f32 tensor beside them has no copy. With lr = 0 the weights keep their exact bits.
#[test]
fn checkpoints_carry_the_master_weights() {
    for backend in [Backend::Cpu, Backend::Gpu] {
        let config = Config {
            backend,
            base: BaseOptimizer::Sgd,
            lr: 1e-3,
            momentum: 0.9,
            master_weights: true,
            ..Config::default()
        };
        let (Some(mut a), Some(mut b)) = (optimizer_or_skip(config.clone()), optimizer_or_skip(config.clone())) else {
            return;
        };
        let w0: Vec<bf16> = (0..64).map(|i| bf16::from_f32(1.0 + i as f32 / 64.0)).collect();
        for opt in [&mut a, &mut b] {
            opt.add_tensor(&w0).unwrap();
            opt.add_tensor(&[0.5f32; 8]).unwrap();
        }
        let step = |opt: &mut Optimizer, k: usize| {
            opt.write_grad(0, &[bf16::from_f32(0.03 * (k % 3) as f32); 64]).unwrap();
            opt.write_grad(1, &[0.01f32; 8]).unwrap();
            opt.first_step().unwrap();
            opt.write_grad(0, &[bf16::from_f32(0.05); 64]).unwrap();
            opt.write_grad(1, &[0.02f32; 8]).unwrap();
            opt.second_step().unwrap();
        };
        for k in 0..20 {
            step(&mut a, k);
        }
        let mut ck = vec![0u8; a.state_size()];
        a.save_state(&mut ck).unwrap();
        // bf16 weights with SGD momentum: 64 (momentum) + 64 (master); the f32 tensor: 8 (momentum).
        assert_eq!(
            ck.len()
                - Optimizer::new(Config { backend: Backend::Cpu, ..config.clone() })
                    .map(|mut o| {
                        o.add_tensor(&w0).unwrap();
                        o.add_tensor(&[0.5f32; 8]).unwrap();
                        o.state_size()
                    })
                    .unwrap(),
            0
        );
        let mut w = vec![bf16::ZERO; 64];
        a.read_param(0, &mut w).unwrap();
        b.write_param(0, &w).unwrap();
        let mut f = [0f32; 8];
        a.read_param(1, &mut f).unwrap();
        b.write_param(1, &f).unwrap();
        b.load_state(&ck).unwrap();
        for k in 20..40 {
            step(&mut a, k);
            step(&mut b, k);
            let (mut wa, mut wb) = (vec![bf16::ZERO; 64], vec![bf16::ZERO; 64]);
            a.read_param(0, &mut wa).unwrap();
            b.read_param(0, &mut wb).unwrap();
            assert!(wa == wb, "{backend:?} step {k}: the resumed run differs");
        }

        // lr = 0: the update writes back the rounding of the untouched master copy, the exact bits.
        let zero = Config { lr: 0.0, ..config.clone() };
        let Some(mut z) = optimizer_or_skip(zero) else { return };
        let odd: Vec<f16> = (0..64).map(|i| f16::from_f32(0.1 + i as f32 * 0.37)).collect();
        z.add_tensor(&odd).unwrap();
        for _ in 0..3 {
            z.write_grad(0, &[f16::from_f32(0.5); 64]).unwrap();
            z.first_step().unwrap();
            z.write_grad(0, &[f16::from_f32(-0.25); 64]).unwrap();
            z.second_step().unwrap();
        }
        let mut back = vec![f16::ZERO; 64];
        z.read_param(0, &mut back).unwrap();
        assert!(back.iter().zip(&odd).all(|(a, b)| a.to_bits() == b.to_bits()), "{backend:?}: lr = 0 moved weights");
    }
}

#[test]
fn master_weights_need_a_base_optimizer() {
    let e = Optimizer::new(Config { master_weights: true, ..Config::default() }).unwrap_err();
    assert!(e.message().starts_with("master_weights = true"), "{}", e.message());
}
