//! Beyond one process: the global norm through the host's all-reduce (two workers as threads),
//! and per-shard accumulation (m-sharpness in one process) against a float64 reference.

mod common;

use std::sync::{Arc, Mutex};

use common::{Rng, ThreadAllReduce};
use samopt::capi::*;
use samopt::{Backend, BaseOptimizer, Config, ErrorKind, Optimizer, Phase};

/// Each worker holds its own shard of the parameters (different tensors); the norm over the
/// union equals that of one optimizer holding every tensor, and each worker's perturbation is the
/// single process's, bit for bit.
#[test]
fn global_norm_over_the_union_of_shards() {
    let mut rng = Rng::new(11);
    let shards: Vec<Vec<(Vec<f32>, Vec<f32>)>> = (0..2)
        .map(|_| {
            (0..3)
                .map(|k| {
                    let n = 100 + 37 * k;
                    ((0..n).map(|_| rng.sym(1.0) as f32).collect(), (0..n).map(|_| rng.sym(0.1) as f32).collect())
                })
                .collect()
        })
        .collect();

    // One process with every tensor.
    let mut single = Optimizer::new(Config { backend: Backend::Cpu, ..Config::default() }).unwrap();
    let mut single_ids = Vec::new();
    for shard in &shards {
        for (w, g) in shard {
            let id = single.add_tensor(w).unwrap();
            single.write_grad(id, g).unwrap();
            single_ids.push(id);
        }
    }
    single.first_step().unwrap();
    let norm = single.grad_norm().unwrap();
    let mut want = Vec::new();
    for (k, &id) in single_ids.iter().enumerate() {
        let mut w = vec![0f32; shards[k / 3][k % 3].0.len()];
        single.read_param(id, &mut w).unwrap();
        want.push(w);
    }

    // Two workers, each with its shard, exchanging one number through the callback, then the
    // same through sam_grad_sq_norm_local + first_step_with_norm.
    for with_callback in [true, false] {
        let reduce = ThreadAllReduce::new(2);
        let handles: Vec<_> = shards
            .iter()
            .cloned()
            .map(|shard| {
                let reduce = reduce.clone();
                std::thread::spawn(move || {
                    let mut opt = Optimizer::new(Config { backend: Backend::Cpu, ..Config::default() }).unwrap();
                    let ids: Vec<u32> = shard
                        .iter()
                        .map(|(w, g)| {
                            let id = opt.add_tensor(w).unwrap();
                            opt.write_grad(id, g).unwrap();
                            id
                        })
                        .collect();
                    if with_callback {
                        let r = reduce.clone();
                        opt.set_allreduce(Some(Box::new(move |v: &mut [f64]| {
                            r.run(v);
                            Ok(())
                        })));
                        opt.first_step().unwrap();
                    } else {
                        let mut v = [opt.local_sq_norm().unwrap()];
                        reduce.run(&mut v);
                        opt.first_step_with_norm(v[0].sqrt()).unwrap();
                    }
                    let norm = opt.grad_norm().unwrap();
                    let ws: Vec<Vec<f32>> = ids
                        .iter()
                        .zip(&shard)
                        .map(|(&id, (w, _))| {
                            let mut out = vec![0f32; w.len()];
                            opt.read_param(id, &mut out).unwrap();
                            out
                        })
                        .collect();
                    (norm, ws)
                })
            })
            .collect();
        let results: Vec<(f64, Vec<Vec<f32>>)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (r, (n, ws)) in results.iter().enumerate() {
            // The sum of two partial sums is rounded once more than the single process's one sum.
            assert!(((n - norm) / norm).abs() < 1e-15, "worker {r}: norm {n} vs single process {norm}");
            for (k, w) in ws.iter().enumerate() {
                let single_w = &want[3 * r + k];
                for (a, b) in w.iter().zip(single_w) {
                    assert!((a - b).abs() <= 1e-7 * b.abs().max(1e-3), "worker {r} tensor {k}: {a} vs {b}");
                }
            }
        }
    }
}

/// m-sharpness: each shard perturbed by its own gradient, the perturbed gradients averaged, one
/// SGD step with the mean, against float64. Per-shard losses are quadratics, so the gradient at
/// the perturbed point really depends on the perturbation.
#[test]
fn per_shard_accumulation_matches_m_sharpness() {
    const N: usize = 2049;
    const SHARDS: usize = 4;
    let (rho, lr) = (0.2, 0.5);
    let mut rng = Rng::new(5);
    let w0: Vec<f64> = (0..N).map(|_| rng.sym(1.0) as f32 as f64).collect();
    let a: Vec<Vec<f64>> = (0..SHARDS).map(|_| (0..N).map(|_| 0.5 + rng.unit()).collect()).collect();
    let c: Vec<Vec<f64>> = (0..SHARDS).map(|_| (0..N).map(|_| rng.sym(1.0)).collect()).collect();
    let grad = |k: usize, w: &[f64]| -> Vec<f64> { (0..N).map(|i| a[k][i] * (w[i] - c[k][i])).collect() };

    // float64 reference of m-sharpness.
    let mut mean = vec![0.0; N];
    // The size of the terms summed, for tolerances: f32 rounding is relative to them, not to a
    // mean that may cancel.
    let mut scale = vec![0.0; N];
    for k in 0..SHARDS {
        let g = grad(k, &w0);
        let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        let perturbed: Vec<f64> = (0..N).map(|i| w0[i] + rho * g[i] / (norm + 1e-12)).collect();
        for (i, gp) in grad(k, &perturbed).into_iter().enumerate() {
            mean[i] += gp / SHARDS as f64;
            scale[i] += gp.abs() / SHARDS as f64;
        }
    }

    for base in [BaseOptimizer::None, BaseOptimizer::Sgd] {
        let config = Config { backend: Backend::Cpu, rho, base, lr, ..Config::default() };
        let mut opt = Optimizer::new(config).unwrap();
        let mut w: Vec<f32> = w0.iter().map(|&x| x as f32).collect();
        let mut g = vec![0f32; N];
        let gp: *mut f32 = g.as_mut_ptr();
        // SAFETY: the vectors outlive `opt`; the test writes the gradient only between calls and
        // through the registered pointer. Without a base optimizer the host's optimizer reads the
        // mean from the gradient buffer, so samopt may write it; with one, it only reads it.
        unsafe {
            match base {
                BaseOptimizer::None => opt.register_host_writable(w.as_mut_ptr(), gp, N).unwrap(),
                _ => opt.register_host(w.as_mut_ptr(), gp.cast_const(), N).unwrap(),
            }
        };
        let write = |values: &[f64]| {
            for (i, v) in values.iter().enumerate() {
                // SAFETY: as above.
                unsafe { *gp.add(i) = *v as f32 };
            }
        };
        for k in 0..SHARDS {
            let at: Vec<f64> = w.iter().map(|&x| x as f64).collect();
            assert_eq!(at, w0, "shard {k} does not start from w");
            write(&grad(k, &at));
            opt.first_step().unwrap();
            let perturbed: Vec<f64> = w.iter().map(|&x| x as f64).collect();
            write(&grad(k, &perturbed));
            opt.accumulate_step().unwrap();
            assert_eq!(opt.phase(), Phase::Accumulating);
        }
        assert_eq!(opt.accumulated_shards(), SHARDS as u32);
        // SAFETY: read between calls, through the registered pointer.
        let last_shard: Vec<u32> = (0..N).map(|i| unsafe { *gp.add(i) }.to_bits()).collect();
        opt.second_step().unwrap();
        assert_eq!(opt.accumulated_shards(), 0);
        // SAFETY: as above.
        let g_now: Vec<f64> = (0..N).map(|i| unsafe { *gp.add(i) } as f64).collect();
        if base != BaseOptimizer::None {
            let bits: Vec<u32> = g_now.iter().map(|&x| (x as f32).to_bits()).collect();
            assert!(bits == last_shard, "{base:?}: a read-only gradient buffer was written");
        }
        for i in 0..N {
            // f32 gradients from f32 weights (a few units of 2^-24 of the terms), then one rounding.
            let tol = 4e-7 * (scale[i] + w0[i].abs() + 1.0);
            if base == BaseOptimizer::None {
                assert!((g_now[i] - mean[i]).abs() <= tol, "mean gradient {i}: {} vs {}", g_now[i], mean[i]);
            }
            let want_w = if base == BaseOptimizer::Sgd { w0[i] - lr * mean[i] } else { w0[i] };
            let tol = 4e-7 * (w0[i].abs() + lr * scale[i] + 1.0);
            assert!((w[i] as f64 - want_w).abs() <= tol, "{base:?}: w[{i}] {} vs {want_w}", w[i]);
        }
    }
}

#[test]
fn call_order_and_errors() {
    let mut opt = Optimizer::new(Config { backend: Backend::Cpu, ..Config::default() }).unwrap();
    let id = opt.add_tensor(&[1.0f32, 2.0]).unwrap();
    opt.write_grad(id, &[0.5f32, 0.5]).unwrap();
    assert_eq!(opt.accumulate_step().unwrap_err().kind(), ErrorKind::InvalidState);
    assert_eq!(opt.first_step_with_norm(f64::NAN).unwrap_err().kind(), ErrorKind::NonFinite);
    assert_eq!(opt.first_step_with_norm(-1.0).unwrap_err().kind(), ErrorKind::InvalidArgument);
    opt.first_step().unwrap();
    opt.accumulate_step().unwrap();
    // Between shards: no registration, no checkpoint, no second accumulate.
    assert_eq!(opt.add_tensor(&[0f32]).unwrap_err().kind(), ErrorKind::InvalidState);
    assert_eq!(opt.accumulate_step().unwrap_err().kind(), ErrorKind::InvalidState);
    opt.first_step().unwrap();
    let e = opt.second_step().unwrap_err();
    assert!(e.message().contains("accumulate the last shard"), "{}", e.message());
    opt.accumulate_step().unwrap();
    opt.second_step().unwrap();
    assert_eq!(opt.phase(), Phase::Idle);

    // A failing all-reduce: the callback error, nothing changed.
    opt.set_allreduce(Some(Box::new(|_: &mut [f64]| Err(samopt::Error::new(ErrorKind::Io, "link down")))));
    let mut w = [0f32; 2];
    opt.read_param(id, &mut w).unwrap();
    let e = opt.first_step().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Callback);
    assert!(e.message().contains("link down"));
    let mut after = [0f32; 2];
    opt.read_param(id, &mut after).unwrap();
    assert_eq!(w, after);
    // Another worker's NaN arrives through the sum.
    opt.set_allreduce(Some(Box::new(|v: &mut [f64]| {
        v[0] = f64::NAN;
        Ok(())
    })));
    assert_eq!(opt.first_step().unwrap_err().kind(), ErrorKind::NonFinite);
    // A worker whose own gradient is bad still joins the exchange, sending NaN.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    opt.set_allreduce(Some(Box::new(move |v: &mut [f64]| {
        s2.lock().unwrap().push(v[0]);
        Ok(())
    })));
    opt.write_grad(id, &[f32::NAN, 0.5]).unwrap();
    let e = opt.first_step().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NonFinite);
    assert!(e.message().contains("tensor 0, element 0"), "{}", e.message());
    assert!(seen.lock().unwrap()[0].is_nan(), "the all-reduce was not called with NaN");
    opt.write_grad(id, &[0.5f32, 0.5]).unwrap();
    opt.set_allreduce(None);
    opt.first_step().unwrap();
}

/// The C entry points: the callback, the two-step global norm, accumulation.
#[test]
fn c_api() {
    unsafe extern "C" fn double_it(values: *mut f64, count: usize, user: *mut std::ffi::c_void) -> i32 {
        // SAFETY: samopt passes `count` valid doubles; `user` is the test's counter.
        unsafe {
            *user.cast::<u32>() += 1;
            for i in 0..count {
                *values.add(i) *= 2.0; // two identical workers
            }
        }
        0
    }
    unsafe extern "C" fn fail(_: *mut f64, _: usize, _: *mut std::ffi::c_void) -> i32 {
        7
    }
    let opt = common::create(&SamConfig { backend: SAM_BACKEND_CPU, ..SamConfig::default() });
    let mut w = [3.0f32, 4.0];
    // Accumulation without a base optimizer writes the mean here: registered writable.
    let mut g = [3.0f32, 4.0];
    let mut id = 0;
    let mut calls = 0u32;
    let mut local = 0.0;
    let mut norm = 0.0;
    // SAFETY: live handle; the arrays outlive it; `calls` outlives the callback's installation.
    unsafe {
        let flags = SAM_REGISTER_GRAD_WRITABLE;
        let (wp, gp) = (w.as_mut_ptr().cast(), g.as_mut_ptr().cast());
        assert_eq!(sam_register_host_ex(opt, wp, gp, 2, SAM_DTYPE_F32, flags, &mut id), SamStatus::SAM_OK);
        assert_eq!(sam_grad_sq_norm_local(opt, &mut local), SamStatus::SAM_OK);
        assert_eq!(local, 25.0);
        assert_eq!(sam_first_step_with_norm(opt, 10.0), SamStatus::SAM_OK);
        sam_grad_norm(opt, &mut norm);
        assert_eq!(norm, 10.0);
        assert_eq!(sam_accumulate_step(opt), SamStatus::SAM_OK);
        assert_eq!(sam_second_step(opt), SamStatus::SAM_OK);
        assert_eq!(sam_set_allreduce(opt, Some(double_it), (&raw mut calls).cast()), SamStatus::SAM_OK);
        assert_eq!(sam_first_step(opt), SamStatus::SAM_OK);
        sam_grad_norm(opt, &mut norm);
        assert_eq!((calls, norm), (1, 50f64.sqrt()));
        assert_eq!(sam_second_step(opt), SamStatus::SAM_OK);
        assert_eq!(sam_set_allreduce(opt, Some(fail), std::ptr::null_mut()), SamStatus::SAM_OK);
        assert_eq!(sam_first_step(opt), SamStatus::SAM_ERR_CALLBACK);
        assert!(common::last_error().contains("returned 7"), "{}", common::last_error());
        assert_eq!(w, [3.0, 4.0]);
        assert_eq!(sam_set_allreduce(opt, None, std::ptr::null_mut()), SamStatus::SAM_OK);
        assert_eq!(sam_accumulate_step(opt), SamStatus::SAM_ERR_INVALID_STATE);
        assert_eq!(sam_grad_sq_norm_local(opt, std::ptr::null_mut()), SamStatus::SAM_ERR_NULL_POINTER);
        sam_destroy(opt);
    }
}

/// The two-step global norm on the GPU engine (device tensors) perturbs as the CPU engine does;
/// per-shard accumulation says plainly that the GPU engine lacks it.
#[test]
fn gpu_global_norm_and_accumulation_support() {
    let gpu = Optimizer::new(Config { backend: Backend::Gpu, ..Config::default() });
    let mut gpu = match gpu {
        Ok(o) => o,
        Err(e) if e.kind() == ErrorKind::Device && std::env::var("SAMOPT_REQUIRE_GPU").as_deref() != Ok("1") => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "NOTICE: GPU distributed test skipped, no adapter ({e})");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let mut cpu = Optimizer::new(Config { backend: Backend::Cpu, ..Config::default() }).unwrap();
    let w: Vec<f32> = (0..5000).map(|i| (i as f32 * 0.01).sin()).collect();
    let g: Vec<f32> = (0..5000).map(|i| (i as f32 * 0.03).cos() * 0.1).collect();
    for opt in [&mut gpu, &mut cpu] {
        let id = opt.add_tensor(&w).unwrap();
        opt.write_grad(id, &g).unwrap();
        let local = opt.local_sq_norm().unwrap();
        opt.first_step_with_norm((2.0 * local).sqrt()).unwrap(); // as if a second, identical worker
    }
    let (mut a, mut b) = (vec![0f32; 5000], vec![0f32; 5000]);
    gpu.read_param(0, &mut a).unwrap();
    cpu.read_param(0, &mut b).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6 * y.abs().max(1e-3), "gpu {x} cpu {y}");
    }
    let e = gpu.accumulate_step().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.message().contains("CPU backend"), "{}", e.message());
}
