//! samopt-burn on Burn's wgpu backend (lavapipe in CI): the passes run in Burn's own buffers (the
//! weights Burn reads back at the perturbed point are samopt's, every parameter keeps its buffer and
//! offset), and every step equals samopt's CPU engine fed the same gradients (computed by Burn
//! independently, inside the loss closure) within rounding: SAM, ASAM and the sign perturbation,
//! SGD and AdamW bases, a LookSAM schedule, in f32 and f16; Burn's own optimizer against a SAM step
//! written in Burn tensors, and under LookSAM against the CPU engine. A model with short,
//! transposed and sliced parameters; parameters that share Burn's pool buffers; parameters
//! replaced between steps (rebound, state kept) or changed (refused with their path); checkpoints.
//! Run with fusion (the default features) and without (`--no-default-features`).

use std::cell::RefCell;
use std::sync::OnceLock;

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Distribution, Tensor, wgpu::WgpuSetup};
use samopt::{Backend, BaseOptimizer, Config, ErrorKind, FirstStep, Norm, Optimizer, Schedule};
use samopt_burn::{Sam, buffer_of, read_grads, read_params};

/// Burn's wgpu runtime, started once for the whole test binary (it cannot start twice).
fn runtime() -> Option<&'static (Device, WgpuSetup)> {
    static RUNTIME: OnceLock<Option<(Device, WgpuSetup)>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| match samopt_burn::init_wgpu() {
            Ok(r) => Some(r),
            Err(e) if std::env::var("SAMOPT_REQUIRE_GPU").as_deref() != Ok("1") => {
                eprintln!("NOTICE: Burn tests skipped, no wgpu adapter ({})", e.message());
                None
            }
            Err(e) => panic!("no wgpu adapter: {}", e.message()),
        })
        .as_ref()
}

/// Every kind of parameter a real model brings: a weight and bias samopt binds where Burn put them
/// (`a`), a weight in place and a 3-element bias (12 bytes in f32: copied once into an
/// allocation of samopt-burn's, padded there) in `b`, a transposed (not row-major, 15 elements)
/// matrix `t`, and `v`, rows of a larger tensor (a view into its allocation without fusion, a copy
/// with it; bound where it is either way).
#[derive(Module, Debug)]
struct Net {
    a: Linear,
    b: Linear,
    t: Param<Tensor<2>>,
    v: Param<Tensor<1>>,
}

impl Net {
    fn new(device: &Device) -> Net {
        let t: Tensor<2> = Tensor::random([5, 3], Distribution::Uniform(-0.5, 0.5), device).transpose();
        let v: Tensor<1> =
            Tensor::<2>::random([4, 4], Distribution::Uniform(-0.5, 0.5), device).slice([1..3]).reshape([8]);
        Net {
            a: LinearConfig::new(8, 16).init(device),
            b: LinearConfig::new(16, 3).init(device),
            t: Param::from_tensor(t),
            v: Param::from_tensor(v),
        }
    }

    fn loss(&self, x: &Tensor<2>, y: &Tensor<2>) -> Tensor<1> {
        let h = burn::tensor::activation::relu(self.a.forward(x.clone()));
        let out = self.b.forward(h).matmul(self.t.val()); // [n, 5]
        let side = x.clone().matmul(self.v.val().reshape([8, 1])); // [n, 1]
        (out + side - y.clone()).powi_scalar(2).mean()
    }
}

fn batch(device: &Device, n: usize) -> (Tensor<2>, Tensor<2>) {
    (
        Tensor::random([n, 8], Distribution::Normal(0.0, 1.0), device),
        Tensor::random([n, 5], Distribution::Normal(0.0, 1.0), device),
    )
}

/// What the loss closure saw on one call: the weights as Burn reads them, and the gradient there,
/// computed by a backward of its own.
struct Seen {
    weights: Vec<(String, Vec<f32>)>,
    grads: Vec<(String, Vec<f32>)>,
}

fn max_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs() / (x.abs().max(1.0) as f64)).fold(0.0, f64::max)
}

/// Rounding allowed between the GPU and CPU engines per step (relative to max(|w|, 1)): the
/// global norm is summed in another order, so the perturbation and the Adam denominators may
/// differ in the last bits of f32; in f16, a result may round to the neighbouring f16 (2^-10).
const TOL: f64 = 4e-6;
const TOL_F16: f64 = 1.0 / 1024.0;

/// samopt's CPU engine holding the reference copy of the parameters, in f32 or f16.
struct Cpu {
    opt: Optimizer,
    ids: Vec<samopt::TensorId>,
    f16: bool,
}

impl Cpu {
    fn new(config: &Config, params: &[(String, Vec<f32>)], f16: bool) -> Cpu {
        let mut opt = Optimizer::new(Config { backend: Backend::Cpu, ..config.clone() }).unwrap();
        let ids = params
            .iter()
            .map(|(_, w)| if f16 { opt.add_tensor(&halves(w)) } else { opt.add_tensor(w) }.unwrap())
            .collect();
        Cpu { opt, ids, f16 }
    }

    fn write_grad(&mut self, k: usize, g: &[f32]) {
        if self.f16 { self.opt.write_grad(self.ids[k], &halves(g)) } else { self.opt.write_grad(self.ids[k], g) }
            .unwrap()
    }

    fn write_param(&mut self, k: usize, w: &[f32]) {
        if self.f16 { self.opt.write_param(self.ids[k], &halves(w)) } else { self.opt.write_param(self.ids[k], w) }
            .unwrap()
    }

    fn read_param(&mut self, k: usize, len: usize) -> Vec<f32> {
        if self.f16 {
            let mut out = vec![samopt::half::f16::ZERO; len];
            self.opt.read_param(self.ids[k], &mut out).unwrap();
            out.iter().map(|h| h.to_f32()).collect()
        } else {
            let mut out = vec![0f32; len];
            self.opt.read_param(self.ids[k], &mut out).unwrap();
            out
        }
    }
}

/// f16 values of f32 ones that are f16 already (read back from f16 tensors): exact.
fn halves(v: &[f32]) -> Vec<samopt::half::f16> {
    v.iter().map(|&x| samopt::half::f16::from_f32(x)).collect()
}

/// Every parameter as `dtype` (a Burn cast; f32 stays as it is).
struct Cast(burn::tensor::DType);

impl burn::module::ModuleMapper for Cast {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let dtype = self.0;
        param.map(|w| w.inner().cast(dtype).autodiff().require_grad())
    }
}

/// Trains `steps` steps with samopt-burn and replays them on samopt's CPU engine with the
/// gradients Burn computed at the weights Burn saw; every perturbed point and every update must
/// agree, and every parameter must keep its buffer and offset. `f16`: the model's parameters are
/// Burn f16 tensors (Burn's wgpu has no bf16).
fn against_cpu(config: Config, steps: usize) {
    against_cpu_in(config.clone(), steps, false);
    against_cpu_in(config, steps, true);
}

fn against_cpu_in(config: Config, steps: usize, f16: bool) {
    let Some((device, setup)) = runtime() else { return };
    let ad = device.clone().autodiff();
    let dtype = if f16 { burn::tensor::DType::F16 } else { burn::tensor::DType::F32 };
    let tol = if f16 { TOL_F16 } else { TOL };
    let mut model = Net::new(&ad).map(&mut Cast(dtype));
    let mut sam = Sam::new(&ad, setup, config.clone()).unwrap();
    sam.prepare(&mut model).unwrap();
    let mut cpu = Cpu::new(&config, &read_params(&model), f16);
    let places = |m: &Net| -> Vec<(wgpu::Buffer, u64)> {
        let mut out = Vec::new();
        for t in [m.a.weight.val(), m.b.weight.val(), m.t.val()] {
            let (b, o, _) = buffer_of(&t).unwrap();
            out.push((b, o));
        }
        for t in [m.a.bias.as_ref().unwrap().val(), m.b.bias.as_ref().unwrap().val(), m.v.val()] {
            let (b, o, _) = buffer_of(&t).unwrap();
            out.push((b, o));
        }
        out
    };
    let before = places(&model);
    // Six parameters; the 3-element bias and the transposed 15-element matrix copied once into
    // allocations of their own, padded there; the others bound where Burn put them.
    let placement = sam.placement();
    assert_eq!((placement.params, placement.padded, placement.moves), (6, 2, 2), "{placement:?}");
    // Burn's pool packs small tensors into shared buffers: some parameters share one.
    assert!((0..before.len()).any(|i| (0..i).any(|j| before[i].0 == before[j].0)), "no two parameters share a buffer");
    for step in 0..steps {
        let (x, y) = batch(&ad, 32);
        let (x, y) = (x.cast(dtype), y.cast(dtype));
        let seen: RefCell<Vec<Seen>> = RefCell::new(Vec::new());
        let st = sam
            .step(&mut model, |m| {
                let g = GradientsParams::from_grads(m.loss(&x, &y).backward(), m);
                seen.borrow_mut().push(Seen { weights: read_params(m), grads: read_grads(m, &g) });
                m.loss(&x, &y)
            })
            .unwrap();
        let seen = seen.into_inner();
        for (k, (_, g)) in seen[0].grads.iter().enumerate() {
            cpu.write_grad(k, g);
        }
        let kind = cpu.opt.first_step().unwrap();
        assert_eq!(kind, st.kind, "step {step}: the engines decided differently");
        assert_eq!(seen.len(), if kind == FirstStep::Perturbed { 2 } else { 1 }, "step {step}: loss calls");
        if kind == FirstStep::Perturbed {
            for (k, (path, w)) in seen[1].weights.iter().enumerate() {
                let d = max_diff(w, &cpu.read_param(k, w.len()));
                assert!(d <= tol, "step {step} ({dtype:?}): `{path}` at the perturbed point differs by {d:e}");
                assert!(max_diff(w, &seen[0].weights[k].1) > 0.0, "step {step}: `{path}` was not perturbed");
            }
            for (k, (_, g)) in seen[1].grads.iter().enumerate() {
                cpu.write_grad(k, g);
            }
        }
        cpu.opt.second_step().unwrap();
        for (k, (path, w)) in read_params(&model).iter().enumerate() {
            let d = max_diff(w, &cpu.read_param(k, w.len()));
            assert!(d <= tol, "step {step} ({dtype:?}): `{path}` after the step differs by {d:e}");
            // The CPU engine goes on from the GPU's weights, so rounding does not accumulate.
            cpu.write_param(k, w);
        }
        assert!(places(&model) == before, "step {step}: a parameter moved");
    }
    eprintln!("placement after {steps} steps ({dtype:?}): {:?}", sam.placement());
}

#[test]
fn sam_with_sgd_equals_the_cpu_engine_in_place() {
    against_cpu(
        Config {
            base: BaseOptimizer::Sgd,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: Some(5e-4),
            rho: 0.05,
            ..Config::default()
        },
        4,
    );
}

#[test]
fn asam_with_adamw_equals_the_cpu_engine_in_place() {
    against_cpu(
        Config {
            base: BaseOptimizer::AdamW,
            lr: 0.01,
            weight_decay: Some(0.01),
            rho: 0.5,
            adaptive: true,
            ..Config::default()
        },
        4,
    );
}

#[test]
fn linf_sam_with_sgd_equals_the_cpu_engine_in_place() {
    against_cpu(Config { base: BaseOptimizer::Sgd, lr: 0.05, rho: 0.01, norm: Norm::LInf, ..Config::default() }, 3);
}

#[test]
fn looksam_skips_the_second_backward_and_equals_the_cpu_engine() {
    against_cpu(
        Config {
            base: BaseOptimizer::Sgd,
            lr: 0.1,
            momentum: 0.9,
            rho: 0.05,
            schedule: Schedule::LookSam { k: 2, alpha: 0.7 },
            ..Config::default()
        },
        5,
    );
}

/// Burn's own SGD after samopt's restore, against a SAM step written in Burn tensors:
/// e = rho g / ||g||, g' = the gradient at w + e, w <- w - lr g'.
#[test]
fn burns_optimizer_steps_after_the_restore() {
    let Some((device, setup)) = runtime() else { return };
    let ad = device.clone().autodiff();
    let (lr, rho) = (0.1f64, 0.05f64);
    let mut model = Net::new(&ad);
    // Its own buffers: samopt perturbs `model`'s in place.
    let mut reference = model.clone().map(&mut DeepCopy);
    let mut sam = Sam::new(&ad, setup, Config { base: BaseOptimizer::None, rho, ..Config::default() }).unwrap();
    let mut optim = SgdConfig::new().init();
    let mut optim_ref = SgdConfig::new().init();
    for step in 0..3 {
        let (x, y) = batch(&ad, 32);
        sam.step_with(&mut model, |m| m.loss(&x, &y), |m, g| optim.step(lr, m, g)).unwrap();
        // The reference: Burn alone.
        let g = GradientsParams::from_grads(reference.loss(&x, &y).backward(), &reference);
        let gs = read_grads(&reference, &g);
        let norm = gs.iter().flat_map(|(_, v)| v).map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let perturbed = reference.clone().map(&mut Shift { grads: &g, scale: rho / norm });
        let g2 = GradientsParams::from_grads(perturbed.loss(&x, &y).backward(), &perturbed);
        reference = optim_ref.step(lr, reference, g2);
        for ((path, w), (_, want)) in read_params(&model).iter().zip(read_params(&reference)) {
            let d = max_diff(w, &want);
            assert!(d <= 1e-5, "step {step}: `{path}` differs from Burn's own SAM by {d:e}");
        }
        // Burn's optimizer replaced the parameters: found again and rebound at the next step.
    }
    // The short bias and the transposed matrix were copied once; then Burn's optimizer replaced
    // every parameter by a fresh tensor: samopt binds those where they are, but for the two whose
    // size is not a multiple of 16 bytes (in allocations samopt-burn did not make), which are
    // copied again at each step.
    assert_eq!(sam.placement().moves, 2 + 2 * 2, "{:?}", sam.placement());
}

/// A copy of every parameter in a buffer of its own.
struct DeepCopy;

impl burn::module::ModuleMapper for DeepCopy {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|w| {
            let device = w.device();
            Tensor::<D>::from_data(w.to_data(), &device).require_grad()
        })
    }
}

/// w + scale * g, parameter by parameter (the reference perturbation).
struct Shift<'a> {
    grads: &'a GradientsParams,
    scale: f64,
}

impl burn::module::ModuleMapper for Shift<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(g) = self.grads.get::<D>(param.id) else { return param };
        let scale = self.scale;
        param.map(|w| (w.inner() + g.mul_scalar(scale)).autodiff().require_grad())
    }
}

/// A parameter replaced between steps (set by hand, or by `load_record`) is rebound with samopt's
/// state kept: the next steps equal the CPU engine whose weights were replaced the same way
/// (momentum carried over). A parameter whose shape changed is refused by its path, nothing
/// changed.
#[test]
fn replaced_parameters_are_rebound_and_changed_ones_refused() {
    let Some((device, setup)) = runtime() else { return };
    let ad = device.clone().autodiff();
    let config = Config { base: BaseOptimizer::Sgd, lr: 0.1, momentum: 0.9, rho: 0.05, ..Config::default() };
    let mut model = Net::new(&ad);
    let mut sam = Sam::new(&ad, setup, config.clone()).unwrap();
    let mut cpu = Optimizer::new(Config { backend: Backend::Cpu, ..config }).unwrap();
    let ids: Vec<_> = read_params(&model).iter().map(|(_, w)| cpu.add_tensor(w).unwrap()).collect();
    let run = |sam: &mut Sam, model: &mut Net, cpu: &mut Optimizer| {
        let (x, y) = batch(&ad, 16);
        let grads: RefCell<Vec<Vec<(String, Vec<f32>)>>> = RefCell::new(Vec::new());
        sam.step(model, |m| {
            let g = GradientsParams::from_grads(m.loss(&x, &y).backward(), m);
            grads.borrow_mut().push(read_grads(m, &g));
            m.loss(&x, &y)
        })
        .unwrap();
        for g in grads.into_inner() {
            for (k, (_, g)) in g.iter().enumerate() {
                cpu.write_grad(ids[k], g).unwrap();
            }
            if cpu.phase() == samopt::Phase::Idle {
                cpu.first_step().unwrap();
            }
        }
        cpu.second_step().unwrap();
        for (k, (path, w)) in read_params(model).iter().enumerate() {
            let mut want = vec![0f32; w.len()];
            cpu.read_param(ids[k], &mut want).unwrap();
            assert!(max_diff(w, &want) <= TOL, "`{path}` differs by {:e}", max_diff(w, &want));
            cpu.write_param(ids[k], w).unwrap();
        }
    };
    run(&mut sam, &mut model, &mut cpu);
    run(&mut sam, &mut model, &mut cpu);
    // Replace an in-place weight and a moved bias, as loading a record would: same ids, new tensors.
    let wa: Tensor<2> = Tensor::random([8, 16], Distribution::Uniform(-0.3, 0.3), &ad);
    let bb: Tensor<1> = Tensor::random([3], Distribution::Uniform(-0.3, 0.3), &ad);
    let (ida, idb) = (model.a.weight.id, model.b.bias.as_ref().unwrap().id);
    model.a.weight = Param::initialized(ida, wa.clone().require_grad());
    model.b.bias = Some(Param::initialized(idb, bb.clone().require_grad()));
    cpu.write_param(ids[0], &wa.into_data().try_into_vec_as::<f32>().unwrap()).unwrap();
    cpu.write_param(ids[3], &bb.into_data().try_into_vec_as::<f32>().unwrap()).unwrap();
    let (old, _, _) = buffer_of(&model.a.weight.val()).unwrap();
    run(&mut sam, &mut model, &mut cpu);
    run(&mut sam, &mut model, &mut cpu);
    assert!(buffer_of(&model.a.weight.val()).unwrap().0 == old, "the replaced weight is stepped where it now is");

    // A record of the model loaded back over it (Burn's checkpoint path): new tensors, same ids.
    let snapshot = read_params(&model);
    let record = model.clone().map(&mut DeepCopy).into_record();
    run(&mut sam, &mut model, &mut cpu);
    model = model.load_record(record);
    assert!(read_params(&model) == snapshot, "the record was loaded");
    for (k, (_, w)) in snapshot.iter().enumerate() {
        cpu.write_param(ids[k], w).unwrap();
    }
    run(&mut sam, &mut model, &mut cpu);

    // A changed shape is refused, naming the parameter; the model and samopt are left as they were.
    let kept = read_params(&model);
    let mut changed = model.clone();
    changed.b.bias = Some(Param::initialized(idb, Tensor::<1>::zeros([4], &ad).require_grad()));
    let (x, y) = batch(&ad, 16);
    let err = sam.step(&mut changed, |m| m.loss(&x, &y)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.message().contains("b.bias"), "{}", err.message());
    assert!(read_params(&model).iter().zip(&kept).all(|(a, b)| a.1 == b.1));
    run(&mut sam, &mut model, &mut cpu);
}

/// Misuse is refused with a message, before anything moves.
#[test]
fn misuse_is_refused() {
    let Some((device, setup)) = runtime() else { return };
    let ad = device.clone().autodiff();
    let (x, y) = batch(&ad, 4);
    // samopt's SGD with Burn's optimizer, and the other way round.
    let mut sam = Sam::new(&ad, setup, Config { base: BaseOptimizer::Sgd, ..Config::default() }).unwrap();
    let mut model = Net::new(&ad);
    let err = sam.step_with(&mut model, |m| m.loss(&x, &y), |m, _| m).unwrap_err();
    assert!(err.message().contains("step_with"), "{}", err.message());
    let mut none = Sam::new(&ad, setup, Config { base: BaseOptimizer::None, ..Config::default() }).unwrap();
    assert!(none.step(&mut model, |m| m.loss(&x, &y)).unwrap_err().message().contains("step_with"));
    // A model without autodiff cannot give gradients.
    let mut plain = Net::new(device);
    let err = sam.step(&mut plain, |m| m.loss(&x.clone().inner(), &y.clone().inner())).unwrap_err();
    assert!(err.message().contains("autodiff"), "{}", err.message());
    // A model with nothing to train.
    let mut frozen = Net::new(&ad).no_grad();
    assert!(sam.prepare(&mut frozen).unwrap_err().message().contains("no float parameter"));
}

/// A checkpoint of samopt's state, loaded into a new `Sam` before its first step (the parameters
/// are registered there), resumes the run bit for bit: AdamW's moments and the step count carry
/// over.
#[test]
fn a_checkpoint_resumes_the_run_exactly() {
    let Some((device, setup)) = runtime() else { return };
    let ad = device.clone().autodiff();
    let config = Config { base: BaseOptimizer::AdamW, lr: 0.01, rho: 0.05, ..Config::default() };
    let start = Net::new(&ad);
    let batches: Vec<_> = (0..4).map(|_| batch(&ad, 16)).collect();
    let run = |model: &mut Net, sam: &mut Sam, range: std::ops::Range<usize>| {
        for (x, y) in &batches[range] {
            sam.step(model, |m| m.loss(x, y)).unwrap();
        }
    };
    let mut straight = start.clone().map(&mut DeepCopy);
    run(&mut straight, &mut Sam::new(&ad, setup, config.clone()).unwrap(), 0..4);

    let mut resumed = start.clone().map(&mut DeepCopy);
    let mut first = Sam::new(&ad, setup, config.clone()).unwrap();
    run(&mut resumed, &mut first, 0..2);
    let state = first.save_state().unwrap();
    drop(first);
    let mut second = Sam::new(&ad, setup, config).unwrap();
    second.load_state(&state).unwrap();
    run(&mut resumed, &mut second, 2..4);
    assert_eq!(second.optimizer().steps(), 4);
    for ((path, a), (_, b)) in read_params(&straight).iter().zip(read_params(&resumed)) {
        assert!(a == &b, "`{path}` differs after resuming");
    }
    // A state for another model is refused at the first step, before anything moves.
    let mut other = Net::new(&ad);
    let kept = read_params(&other);
    let mut third = Sam::new(&ad, setup, Config { base: BaseOptimizer::AdamW, ..Config::default() }).unwrap();
    third.load_state(&state[..state.len() - 8]).unwrap();
    let (x, y) = &batches[0];
    assert!(third.step(&mut other, |m| m.loss(x, y)).is_err());
    assert!(read_params(&other).iter().zip(&kept).all(|(a, b)| a.1 == b.1));
}

/// LookSAM with Burn's own optimizer: on its single-gradient steps samopt writes LookSAM's
/// direction into Burn's gradients (the short ones through their padded copies) and Burn's SGD
/// steps with it. The weights follow samopt's CPU engine on host buffers with writable gradients
/// and the same SGD written in the test, step after step.
#[test]
fn looksam_hands_its_direction_to_burns_optimizer() {
    let Some((device, setup)) = runtime() else { return };
    let ad = device.clone().autodiff();
    let lr = 0.1f64;
    let config = Config {
        base: BaseOptimizer::None,
        rho: 0.05,
        schedule: Schedule::LookSam { k: 2, alpha: 0.7 },
        ..Config::default()
    };
    let mut model = Net::new(&ad);
    let mut sam = Sam::new(&ad, setup, config.clone()).unwrap();
    let mut optim = SgdConfig::new().init();
    // The reference: host buffers the CPU engine perturbs, restores and (LookSAM) writes into.
    let mut cpu = Optimizer::new(Config { backend: Backend::Cpu, ..config }).unwrap();
    let mut w: Vec<Vec<f32>> = read_params(&model).into_iter().map(|(_, v)| v).collect();
    let mut g: Vec<Vec<f32>> = w.iter().map(|v| vec![0.0; v.len()]).collect();
    for k in 0..w.len() {
        // SAFETY: the vectors are neither moved nor resized while `cpu` lives.
        unsafe { cpu.register_host_writable(w[k].as_mut_ptr(), g[k].as_mut_ptr(), w[k].len()) }.unwrap();
    }
    let mut single = 0;
    for step in 0..5 {
        let (x, y) = batch(&ad, 32);
        let seen: RefCell<Vec<Seen>> = RefCell::new(Vec::new());
        let st = sam
            .step_with(
                &mut model,
                |m| {
                    let grads = GradientsParams::from_grads(m.loss(&x, &y).backward(), m);
                    seen.borrow_mut().push(Seen { weights: read_params(m), grads: read_grads(m, &grads) });
                    m.loss(&x, &y)
                },
                |m, grads| optim.step(lr, m, grads),
            )
            .unwrap();
        let seen = seen.into_inner();
        for (k, (_, gk)) in seen[0].grads.iter().enumerate() {
            g[k].copy_from_slice(gk);
        }
        assert_eq!(cpu.first_step().unwrap(), st.kind, "step {step}");
        if st.kind == FirstStep::Perturbed {
            for (k, (path, wk)) in seen[1].weights.iter().enumerate() {
                let d = max_diff(wk, &w[k]);
                assert!(d <= TOL, "step {step}: `{path}` at the perturbed point differs by {d:e}");
            }
            for (k, (_, gk)) in seen[1].grads.iter().enumerate() {
                g[k].copy_from_slice(gk);
            }
        } else {
            single += 1;
        }
        cpu.second_step().unwrap();
        for (k, (path, wk)) in read_params(&model).iter().enumerate() {
            let want: Vec<f32> = w[k].iter().zip(&g[k]).map(|(&wi, &gi)| wi - lr as f32 * gi).collect();
            let d = max_diff(wk, &want);
            assert!(d <= TOL, "step {step}: `{path}` after Burn's SGD differs by {d:e}");
            w[k].copy_from_slice(wk);
        }
    }
    assert!(single >= 2, "LookSAM took {single} single-gradient steps");
}
