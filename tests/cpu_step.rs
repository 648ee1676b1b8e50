//! The CPU engine's first and second steps, through the C ABI, against a float64 reference.

mod common;

use common::*;
use samopt::capi::*;

/// Sizes that straddle the engine's block and chunk boundaries.

#[test]
fn every_dtype_variant_and_awkward_size() {
    for ty in ALL_TYPES {
        for adaptive in [false, true] {
            for p_inf in [false, true] {
                let mut rng = Rng::new(17 + ty as u64 * 4 + adaptive as u64 * 2 + p_inf as u64);
                let mut tensors: Vec<Tensor> = AWKWARD.iter().map(|&n| Tensor::random(ty, n, &mut rng)).collect();
                check_step(&mut tensors, config(adaptive, p_inf), CPU_NORM_TOL);
            }
        }
    }
}

#[test]
fn mixed_dtypes_share_one_global_norm() {
    let mut rng = Rng::new(5);
    let mut tensors: Vec<Tensor> = [(Ty::F32, 1023), (Ty::F16, 3), (Ty::BF16, 70_001), (Ty::F32, 1), (Ty::F16, 65_537)]
        .iter()
        .map(|&(ty, n)| Tensor::random(ty, n, &mut rng))
        .collect();
    check_step(&mut tensors, config(false, false), CPU_NORM_TOL);
    check_step(&mut tensors, config(true, false), CPU_NORM_TOL);
}

#[test]
fn thousands_of_small_tensors() {
    let mut rng = Rng::new(9);
    let mut tensors: Vec<Tensor> = (0..3000).map(|k| Tensor::random(Ty::F32, 1 + k % 97, &mut rng)).collect();
    check_step(&mut tensors, config(false, false), CPU_NORM_TOL);
}

#[test]
fn zero_gradient_gives_zero_perturbation() {
    let mut t = Tensor { param: Buf::from_f64(Ty::F32, &[1.0, -2.0]), grad: Buf::from_f64(Ty::F32, &[0.0, 0.0]) };
    let opt = create(&SamConfig::default());
    register_all(opt, std::slice::from_mut(&mut t));
    // SAFETY: live handle.
    assert_eq!(unsafe { sam_first_step(opt) }, SamStatus::SAM_OK);
    assert_eq!(t.param.values(), vec![1.0, -2.0]);
    let mut norm = -1.0;
    // SAFETY: valid pointers.
    unsafe { sam_grad_norm(opt, &mut norm) };
    assert_eq!(norm, 0.0);
    // SAFETY: live handle, destroyed once.
    unsafe {
        assert_eq!(sam_second_step(opt), SamStatus::SAM_OK);
        sam_destroy(opt);
    }
}

#[test]
fn many_steps_keep_restoring_exactly() {
    let mut rng = Rng::new(21);
    let mut tensors: Vec<Tensor> = [7, 1500, 300_001].iter().map(|&n| Tensor::random(Ty::BF16, n, &mut rng)).collect();
    let opt = create(&config(true, false));
    register_all(opt, &mut tensors);
    for step in 0..5 {
        let before: Vec<Vec<u8>> = tensors.iter().map(|t| t.param.bytes().to_vec()).collect();
        for t in tensors.iter_mut() {
            for i in 0..t.grad.len {
                t.grad.set(i, rng.wide(-2.0, 0.0));
            }
        }
        // SAFETY: live handle.
        unsafe {
            assert_eq!(sam_first_step(opt), SamStatus::SAM_OK);
            assert_eq!(sam_second_step(opt), SamStatus::SAM_OK);
        }
        for (t, b) in tensors.iter().zip(&before) {
            assert_eq!(t.param.bytes(), &b[..], "step {step}");
        }
        // The host's own update between SAM steps.
        for t in tensors.iter_mut() {
            for i in 0..t.param.len {
                let v = t.param.get(i) - 0.1 * t.grad.get(i);
                t.param.set(i, v);
            }
        }
    }
    let mut steps = 0;
    // SAFETY: valid pointers; destroyed once.
    unsafe {
        sam_step_count(opt, &mut steps);
        sam_destroy(opt);
    }
    assert_eq!(steps, 5);
}

/// The norm of 10^8 gradients spread over six decades stays within 1e-6 of float64 (an f32
/// accumulator would be off by about 1e-3 here), and is the same bits for 1, 2 and 3 threads.
#[test]
fn norm_accuracy_at_1e8_and_thread_count_independence() {
    const N: usize = 100_000_000;
    let mut rng = Rng::new(77);
    let grad: Vec<f32> = (0..N).map(|_| rng.wide(-3.0, 3.0) as f32).collect();
    let mut sum = 0.0f64;
    let mut comp = 0.0f64;
    for &g in &grad {
        let y = (g as f64) * (g as f64);
        let s = sum + y;
        comp += if sum.abs() >= y { (sum - s) + y } else { (y - s) + sum };
        sum = s;
    }
    let reference = (sum + comp).sqrt();
    let mut param = vec![0.25f32; N];
    let mut seen: Option<(u64, Vec<u32>)> = None;
    for threads in [1u32, 2, 3] {
        param.fill(0.25);
        let opt = create(&SamConfig { num_threads: threads, ..SamConfig::default() });
        let mut id = 0;
        let mut norm = 0.0;
        // SAFETY: buffers outlive the optimizer.
        unsafe {
            assert_eq!(
                sam_register_host(opt, param.as_mut_ptr().cast(), grad.as_ptr().cast(), N, SAM_DTYPE_F32, &mut id),
                SamStatus::SAM_OK
            );
            assert_eq!(sam_first_step(opt), SamStatus::SAM_OK);
            sam_grad_norm(opt, &mut norm);
        }
        let rel = ((norm - reference) / reference).abs();
        assert!(rel < 1e-6, "{threads} threads: relative error {rel:e}");
        let sample: Vec<u32> = param.iter().step_by(9973).map(|x| x.to_bits()).collect();
        match &seen {
            None => seen = Some((norm.to_bits(), sample)),
            Some((bits, s)) => {
                assert_eq!(*bits, norm.to_bits(), "norm differs with {threads} threads");
                assert_eq!(s, &sample, "perturbed weights differ with {threads} threads");
            }
        }
        // SAFETY: live handle, destroyed once.
        unsafe {
            assert_eq!(sam_second_step(opt), SamStatus::SAM_OK);
            sam_destroy(opt);
        }
        assert!(param.iter().all(|&x| x == 0.25));
    }
}
