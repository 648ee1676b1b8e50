//! Every error path of the C ABI: the status, a message that names the argument and the value,
//! and nothing changed (no tensor registered, no parameter touched, the phase as before).

mod common;

use std::ptr::{null, null_mut};

use common::*;
use samopt::capi::*;

fn expect_err(status: SamStatus, want: SamStatus, needles: &[&str]) {
    assert_eq!(status, want, "message: {}", last_error());
    let msg = last_error();
    for n in needles {
        assert!(msg.contains(n), "message {msg:?} should mention {n:?}");
    }
}

fn try_create(config: &SamConfig) -> (SamStatus, *mut SamOptimizer) {
    let sentinel = std::ptr::dangling_mut::<SamOptimizer>();
    let mut out = sentinel;
    // SAFETY: valid pointers.
    let s = unsafe { sam_create(config, &mut out) };
    if s != SamStatus::SAM_OK {
        assert_eq!(out, sentinel, "a failed sam_create wrote *out");
    }
    (s, out)
}

#[test]
fn create_rejects_bad_configs() {
    let d = SamConfig::default();
    let cases: Vec<(SamConfig, SamStatus, Vec<&str>)> = vec![
        (SamConfig { struct_size: 12, ..d }, SamStatus::SAM_ERR_INVALID_ARGUMENT, vec!["struct_size = 12"]),
        (SamConfig { struct_size: 0, ..d }, SamStatus::SAM_ERR_INVALID_ARGUMENT, vec!["struct_size = 0"]),
        (SamConfig { rho: 0.0, ..d }, SamStatus::SAM_ERR_INVALID_ARGUMENT, vec!["rho = 0"]),
        (SamConfig { rho: -0.1, ..d }, SamStatus::SAM_ERR_INVALID_ARGUMENT, vec!["rho = -0.1"]),
        (SamConfig { rho: f64::NAN, ..d }, SamStatus::SAM_ERR_INVALID_ARGUMENT, vec!["rho = NaN"]),
        (SamConfig { rho: f64::INFINITY, ..d }, SamStatus::SAM_ERR_INVALID_ARGUMENT, vec!["rho = inf"]),
        (SamConfig { eps: -1e-9, ..d }, SamStatus::SAM_ERR_INVALID_ARGUMENT, vec!["eps = -0.000000001"]),
        (SamConfig { eta: -1.0, ..d }, SamStatus::SAM_ERR_INVALID_ARGUMENT, vec!["eta = -1"]),
        (SamConfig { backend: 7, ..d }, SamStatus::SAM_ERR_INVALID_ARGUMENT, vec!["backend = 7"]),
        (SamConfig { norm_p: 0.5, ..d }, SamStatus::SAM_ERR_INVALID_ARGUMENT, vec!["norm_p = 0.5"]),
        (SamConfig { norm_p: f64::NAN, ..d }, SamStatus::SAM_ERR_INVALID_ARGUMENT, vec!["norm_p = NaN"]),
        (SamConfig { norm_p: 3.0, ..d }, SamStatus::SAM_ERR_UNSUPPORTED, vec!["norm_p = 3"]),
    ];
    for (config, status, needles) in cases {
        let (s, _) = try_create(&config);
        expect_err(s, status, &needles);
        assert!(last_error().starts_with("sam_create: "), "{}", last_error());
    }
    let mut out = null_mut();
    // SAFETY: NULL arguments are what is tested.
    unsafe {
        expect_err(sam_create(null(), &mut out), SamStatus::SAM_ERR_NULL_POINTER, &["config is NULL"]);
        expect_err(sam_create(&d, null_mut()), SamStatus::SAM_ERR_NULL_POINTER, &["out is NULL"]);
    }
    assert!(out.is_null());
}

#[test]
fn null_handles_and_outputs() {
    let mut x = 0.0f64;
    let mut n = 0usize;
    let mut id = 0u32;
    let mut w = [0f32; 4];
    let g = [0f32; 4];
    // SAFETY: NULL arguments are what is tested.
    unsafe {
        expect_err(sam_first_step(null_mut()), SamStatus::SAM_ERR_NULL_POINTER, &["opt is NULL"]);
        expect_err(sam_second_step(null_mut()), SamStatus::SAM_ERR_NULL_POINTER, &["opt is NULL"]);
        expect_err(sam_grad_norm(null(), &mut x), SamStatus::SAM_ERR_NULL_POINTER, &["opt is NULL"]);
        expect_err(sam_tensor_count(null(), &mut n), SamStatus::SAM_ERR_NULL_POINTER, &["opt is NULL"]);
        expect_err(
            sam_register_host(null_mut(), w.as_mut_ptr().cast(), g.as_ptr().cast(), 4, SAM_DTYPE_F32, &mut id),
            SamStatus::SAM_ERR_NULL_POINTER,
            &["sam_register_host: opt is NULL"],
        );
        sam_destroy(null_mut()); // a no-op
    }
    let opt = create(&SamConfig::default());
    // SAFETY: NULL outputs are what is tested; the handle is live.
    unsafe {
        expect_err(sam_grad_norm(opt, null_mut()), SamStatus::SAM_ERR_NULL_POINTER, &["out is NULL"]);
        expect_err(sam_tensor_count(opt, null_mut()), SamStatus::SAM_ERR_NULL_POINTER, &["out is NULL"]);
        expect_err(sam_step_count(opt, null_mut()), SamStatus::SAM_ERR_NULL_POINTER, &["out is NULL"]);
        expect_err(sam_is_perturbed(opt, null_mut()), SamStatus::SAM_ERR_NULL_POINTER, &["out is NULL"]);
        expect_err(sam_get_backend(opt, null_mut()), SamStatus::SAM_ERR_NULL_POINTER, &["out is NULL"]);
        expect_err(sam_grad_norm(opt, &mut x), SamStatus::SAM_ERR_INVALID_STATE, &["no first step"]);
        let mut b = 99;
        assert_eq!(sam_get_backend(opt, &mut b), SamStatus::SAM_OK);
        // AUTO with no tensor yet: undecided (the header and the C++ wrapper say so).
        assert_eq!(b, SAM_BACKEND_AUTO);
        sam_destroy(opt);
    }
}

/// Registration failures: each names the argument, and afterwards the optimizer still has only
/// the tensors registered before.
#[test]
fn register_rejects_bad_buffers() {
    let opt = create(&SamConfig::default());
    let mut a = vec![0f32; 64];
    let mut b = vec![0f32; 64];
    let mut c = vec![0f32; 64];
    let mut id = 77u32;
    let count = |opt| {
        let mut n = usize::MAX;
        // SAFETY: valid pointers.
        unsafe { sam_tensor_count(opt, &mut n) };
        n
    };
    // SAFETY: every pointer below is either valid for the stated length or what is tested.
    unsafe {
        let (pa, pb, pc) = (a.as_mut_ptr(), b.as_mut_ptr(), c.as_mut_ptr());
        assert_eq!(sam_register_host(opt, pa.cast(), pb.cast(), 64, SAM_DTYPE_F32, &mut id), SamStatus::SAM_OK);
        assert_eq!(id, 0);
        let id_ptr: *mut u32 = &mut id;
        type Call<'a> = Box<dyn Fn() -> SamStatus + 'a>;
        let cases: Vec<(Call, SamStatus, Vec<&str>)> = vec![
            (
                Box::new(|| sam_register_host(opt, null_mut(), pc.cast(), 4, SAM_DTYPE_F32, id_ptr)),
                SamStatus::SAM_ERR_NULL_POINTER,
                vec!["param is NULL"],
            ),
            (
                Box::new(|| sam_register_host(opt, pc.cast(), null(), 4, SAM_DTYPE_F32, id_ptr)),
                SamStatus::SAM_ERR_NULL_POINTER,
                vec!["grad is NULL"],
            ),
            (
                Box::new(|| sam_register_host(opt, pc.cast(), pc.add(32).cast(), 4, SAM_DTYPE_F32, null_mut())),
                SamStatus::SAM_ERR_NULL_POINTER,
                vec!["out_id is NULL"],
            ),
            (
                Box::new(|| sam_register_host(opt, pc.cast(), pc.add(32).cast(), 0, SAM_DTYPE_F32, id_ptr)),
                SamStatus::SAM_ERR_INVALID_ARGUMENT,
                vec!["len = 0"],
            ),
            (
                Box::new(|| sam_register_host(opt, pc.cast(), pc.add(32).cast(), 4, 3, id_ptr)),
                SamStatus::SAM_ERR_INVALID_ARGUMENT,
                vec!["dtype = 3"],
            ),
            (
                Box::new(|| sam_register_host(opt, pc.cast(), pc.add(32).cast(), 4, u32::MAX, id_ptr)),
                SamStatus::SAM_ERR_INVALID_ARGUMENT,
                vec!["dtype = 4294967295"],
            ),
            // The same buffers as tensor 0.
            (
                Box::new(|| sam_register_host(opt, pa.cast(), pb.cast(), 64, SAM_DTYPE_F32, id_ptr)),
                SamStatus::SAM_ERR_INVALID_ARGUMENT,
                vec!["param", "overlaps", "tensor 0"],
            ),
            // A new parameter whose gradient is tensor 0's parameter.
            (
                Box::new(|| sam_register_host(opt, pc.cast(), pa.add(10).cast(), 8, SAM_DTYPE_F32, id_ptr)),
                SamStatus::SAM_ERR_INVALID_ARGUMENT,
                vec!["grad", "overlaps", "tensor 0"],
            ),
            // Parameter and gradient overlapping each other.
            (
                Box::new(|| sam_register_host(opt, pc.cast(), pc.add(3).cast(), 8, SAM_DTYPE_F32, id_ptr)),
                SamStatus::SAM_ERR_INVALID_ARGUMENT,
                vec!["param", "grad", "overlap"],
            ),
            // Misaligned for f32.
            (
                Box::new(|| {
                    sam_register_host(opt, pc.cast::<u8>().add(1).cast(), pc.add(32).cast(), 4, SAM_DTYPE_F32, id_ptr)
                }),
                SamStatus::SAM_ERR_INVALID_ARGUMENT,
                vec!["param", "aligned"],
            ),
            // A length whose byte size overflows.
            (
                Box::new(|| {
                    sam_register_host(opt, pc.cast(), pc.add(32).cast(), usize::MAX / 2, SAM_DTYPE_F32, id_ptr)
                }),
                SamStatus::SAM_ERR_INVALID_ARGUMENT,
                vec!["len = 9223372036854775807", "overflow"],
            ),
            // A range running past the end of the address space.
            (
                Box::new(|| {
                    sam_register_host(
                        opt,
                        usize::MAX as *mut std::ffi::c_void,
                        pc.cast(),
                        1 << 20,
                        SAM_DTYPE_BF16,
                        id_ptr,
                    )
                }),
                SamStatus::SAM_ERR_INVALID_ARGUMENT,
                vec!["aligned"],
            ),
            (
                Box::new(|| {
                    sam_register_host(
                        opt,
                        (usize::MAX - 7) as *mut std::ffi::c_void,
                        pc.cast(),
                        1 << 20,
                        SAM_DTYPE_F32,
                        id_ptr,
                    )
                }),
                SamStatus::SAM_ERR_INVALID_ARGUMENT,
                vec!["param", "overflows the address space"],
            ),
        ];
        for (call, want, needles) in cases {
            expect_err(call(), want, &needles);
            assert_eq!(id, 0, "a failed registration wrote out_id");
            assert_eq!(count(opt), 1, "a failed registration registered something");
        }
        sam_destroy(opt);
    }
}

/// Calls out of order: each refused with the invalid-state status, weights untouched.
#[test]
fn call_order() {
    let mut t = Tensor { param: Buf::from_f64(Ty::F32, &[1.0, 2.0]), grad: Buf::from_f64(Ty::F32, &[0.5, 0.5]) };
    let opt = create(&SamConfig::default());
    // SAFETY: live handle; the buffers outlive it.
    unsafe {
        expect_err(sam_first_step(opt), SamStatus::SAM_ERR_INVALID_STATE, &["no tensor is registered"]);
        expect_err(sam_second_step(opt), SamStatus::SAM_ERR_INVALID_STATE, &["second step without a first step"]);
        register_all(opt, std::slice::from_mut(&mut t));
        expect_err(sam_second_step(opt), SamStatus::SAM_ERR_INVALID_STATE, &["second step without a first step"]);
        assert_eq!(t.param.values(), vec![1.0, 2.0]);
        assert_eq!(sam_first_step(opt), SamStatus::SAM_OK);
        let perturbed = t.param.bytes().to_vec();
        expect_err(sam_first_step(opt), SamStatus::SAM_ERR_INVALID_STATE, &["perturbed"]);
        assert_eq!(t.param.bytes(), &perturbed[..], "a refused first step moved the weights again");
        let mut w2 = [0f32; 2];
        let g2 = [0f32; 2];
        let mut id = 9;
        expect_err(
            sam_register_host(opt, w2.as_mut_ptr().cast(), g2.as_ptr().cast(), 2, SAM_DTYPE_F32, &mut id),
            SamStatus::SAM_ERR_INVALID_STATE,
            &["register", "perturbed"],
        );
        let mut perturbed_flag = false;
        sam_is_perturbed(opt, &mut perturbed_flag);
        assert!(perturbed_flag);
        assert_eq!(sam_second_step(opt), SamStatus::SAM_OK);
        assert_eq!(t.param.values(), vec![1.0, 2.0]);
        expect_err(sam_second_step(opt), SamStatus::SAM_ERR_INVALID_STATE, &["second step without a first step"]);
        sam_destroy(opt);
    }
}

/// NaN or infinity in any gradient: the non-finite status, the tensor and element named, every
/// parameter untouched, the previous norm kept, and the next good step works.
#[test]
fn non_finite_gradients_change_nothing() {
    for ty in ALL_TYPES {
        for (bad, adaptive) in [(f64::NAN, false), (f64::INFINITY, false), (f64::NEG_INFINITY, true)] {
            let mut rng = Rng::new(3);
            let mut tensors: Vec<Tensor> =
                [5usize, 100_000, 9].iter().map(|&n| Tensor::random(ty, n, &mut rng)).collect();
            let opt = create(&SamConfig { adaptive, ..SamConfig::default() });
            register_all(opt, &mut tensors);
            // SAFETY: live handle; the buffers outlive it.
            unsafe {
                assert_eq!(sam_first_step(opt), SamStatus::SAM_OK);
                assert_eq!(sam_second_step(opt), SamStatus::SAM_OK);
                let mut norm_before = 0.0;
                sam_grad_norm(opt, &mut norm_before);
                tensors[1].grad.set(77_777, bad);
                let before: Vec<Vec<u8>> = tensors.iter().map(|t| t.param.bytes().to_vec()).collect();
                expect_err(sam_first_step(opt), SamStatus::SAM_ERR_NON_FINITE, &["tensor 1, element 77777"]);
                for (t, b) in tensors.iter().zip(&before) {
                    assert_eq!(t.param.bytes(), &b[..], "{ty:?}: a non-finite first step touched a parameter");
                }
                let mut flag = true;
                sam_is_perturbed(opt, &mut flag);
                assert!(!flag);
                let mut norm_after = 0.0;
                sam_grad_norm(opt, &mut norm_after);
                assert_eq!(norm_before.to_bits(), norm_after.to_bits());
                // The host lowers its loss scale and retries with a finite gradient.
                tensors[1].grad.set(77_777, 0.5);
                assert_eq!(sam_first_step(opt), SamStatus::SAM_OK, "{}", last_error());
                assert_eq!(sam_second_step(opt), SamStatus::SAM_OK);
                sam_destroy(opt);
            }
        }
    }
}

/// Under ASAM the weights enter the norm, so a non-finite weight is caught by the same pass.
#[test]
fn non_finite_weight_under_asam() {
    let mut t =
        Tensor { param: Buf::from_f64(Ty::F32, &[1.0, f64::INFINITY]), grad: Buf::from_f64(Ty::F32, &[0.5, 0.0]) };
    let opt = create(&SamConfig { adaptive: true, ..SamConfig::default() });
    register_all(opt, std::slice::from_mut(&mut t));
    // SAFETY: live handle.
    unsafe {
        expect_err(sam_first_step(opt), SamStatus::SAM_ERR_NON_FINITE, &["gradient or weight", "tensor 0, element 1"]);
        sam_destroy(opt);
    }
    assert_eq!(t.param.get(0), 1.0);
}

#[test]
fn last_error_is_per_thread() {
    let (s, _) = try_create(&SamConfig { rho: -3.0, ..SamConfig::default() });
    assert_eq!(s, SamStatus::SAM_ERR_INVALID_ARGUMENT);
    let other = std::thread::spawn(last_error).join().unwrap();
    assert_eq!(other, "", "another thread saw this thread's error");
    assert!(last_error().contains("rho = -3"));
}

#[test]
fn versions() {
    assert_eq!(sam_abi_version(), SAM_ABI_VERSION);
    // SAFETY: static NUL-terminated string.
    let v = unsafe { std::ffi::CStr::from_ptr(sam_version()) }.to_str().unwrap();
    assert_eq!(v, env!("CARGO_PKG_VERSION"));
}

/// The base optimizer through the C API: config fields, groups, the learning rate, and the
/// skipped-step status; and their errors.
#[test]
fn base_optimizer_c_api() {
    let d = SamConfig::default();
    assert!(d.weight_decay.is_nan(), "weight decay defaults to the base optimizer's own default");
    assert_eq!((d.base, d.lr, d.beta1, d.beta2, d.adam_eps), (SAM_BASE_NONE, 1e-3, 0.9, 0.999, 1e-8));
    for (config, needle) in [
        (SamConfig { base: 9, ..d }, "base = 9"),
        (SamConfig { base: SAM_BASE_SGD, nesterov: true, ..d }, "nesterov"),
        (SamConfig { base: SAM_BASE_ADAMW, beta1: 1.5, ..d }, "beta1 = 1.5"),
        (SamConfig { gsam_alpha: 0.2, ..d }, "gsam_alpha = 0.2"),
        (SamConfig { base: SAM_BASE_SGD, max_grad_norm: -1.0, ..d }, "max_grad_norm = -1"),
        (SamConfig { base: SAM_BASE_SGD, lr: f64::NAN, ..d }, "lr = NaN"),
    ] {
        let (s, _) = try_create(&config);
        expect_err(s, SamStatus::SAM_ERR_INVALID_ARGUMENT, &[needle]);
    }

    let opt = create(&SamConfig { base: SAM_BASE_SGD, lr: 0.5, backend: SAM_BACKEND_CPU, ..d });
    let mut w = [1.0f32, 1.0];
    let mut g = [0.5f32, -0.5];
    // The host writes its gradient through the same pointer it registered.
    let gp: *mut [f32; 2] = &mut g;
    let (mut id, mut group) = (9u32, 9u32);
    let mut lr = 0.0;
    // SAFETY: live handle; the arrays outlive it and are written only between calls.
    unsafe {
        assert_eq!(
            sam_register_host(opt, w.as_mut_ptr().cast(), gp.cast_const().cast(), 2, SAM_DTYPE_F32, &mut id),
            SamStatus::SAM_OK
        );
        assert_eq!(sam_add_group(opt, 0.5, f64::NAN, &mut group), SamStatus::SAM_OK);
        assert_eq!(group, 1);
        assert_eq!(sam_set_tensor_group(opt, id, group), SamStatus::SAM_OK);
        expect_err(sam_set_tensor_group(opt, id, 5), SamStatus::SAM_ERR_INVALID_ARGUMENT, &["group = 5"]);
        expect_err(sam_add_group(opt, -1.0, 0.0, &mut group), SamStatus::SAM_ERR_INVALID_ARGUMENT, &["lr_scale = -1"]);
        expect_err(sam_set_lr(opt, -0.1), SamStatus::SAM_ERR_INVALID_ARGUMENT, &["lr = -0.1"]);
        assert_eq!(sam_set_lr(opt, 0.2), SamStatus::SAM_OK);
        assert_eq!(sam_get_lr(opt, &mut lr), SamStatus::SAM_OK);
        assert_eq!(lr, 0.2);

        assert_eq!(sam_first_step(opt), SamStatus::SAM_OK);
        *gp = [f32::INFINITY, 0.0];
        assert_eq!(sam_second_step(opt), SamStatus::SAM_STEP_SKIPPED);
        assert_eq!(w, [1.0, 1.0], "a skipped step moved the weights");
        let mut steps = 7;
        sam_step_count(opt, &mut steps);
        assert_eq!(steps, 0);

        *gp = [0.5, -0.5];
        assert_eq!(sam_first_step(opt), SamStatus::SAM_OK);
        assert_eq!(sam_second_step(opt), SamStatus::SAM_OK);
        // SGD: w - lr * scale * g = 1 -/+ 0.2 * 0.5 * 0.5
        assert_eq!(w, [1.0 - 0.05, 1.0 + 0.05]);
        sam_step_count(opt, &mut steps);
        assert_eq!(steps, 1);
        sam_destroy(opt);
    }
}

/// Checkpoints through the C API: sizes, NULLs, short buffers, bad bytes, files.
#[test]
fn state_c_api() {
    let opt = create(&SamConfig {
        base: SAM_BASE_SGD,
        momentum: 0.9,
        lr: 0.1,
        backend: SAM_BACKEND_CPU,
        ..SamConfig::default()
    });
    let mut w = [1.0f32, 2.0, 3.0];
    let g = [0.5f32, 0.25, -1.0];
    let mut id = 0;
    let mut size = 0usize;
    let mut written = 0usize;
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("capi-state");
    std::fs::create_dir_all(&dir).unwrap();
    let path = std::ffi::CString::new(dir.join("opt.state").to_str().unwrap()).unwrap();
    // SAFETY: live handle; every buffer is valid for the length given or is what is tested.
    unsafe {
        assert_eq!(
            sam_register_host(opt, w.as_mut_ptr().cast(), g.as_ptr().cast(), 3, SAM_DTYPE_F32, &mut id),
            SamStatus::SAM_OK
        );
        assert_eq!(sam_first_step(opt), SamStatus::SAM_OK);
        assert_eq!(sam_second_step(opt), SamStatus::SAM_OK);
        assert_eq!(sam_state_size(opt, &mut size), SamStatus::SAM_OK);
        let mut buf = vec![0u8; size];
        expect_err(
            sam_state_save(opt, null_mut(), size, &mut written),
            SamStatus::SAM_ERR_NULL_POINTER,
            &["buf is NULL"],
        );
        expect_err(
            sam_state_save(opt, buf.as_mut_ptr().cast(), size - 1, &mut written),
            SamStatus::SAM_ERR_INVALID_ARGUMENT,
            &[&format!("len = {}", size - 1), &format!("needs {size} bytes")],
        );
        assert_eq!(sam_state_save(opt, buf.as_mut_ptr().cast(), size, &mut written), SamStatus::SAM_OK);
        assert_eq!(written, size);
        assert_eq!(sam_state_save(opt, buf.as_mut_ptr().cast(), size, null_mut()), SamStatus::SAM_OK);
        assert_eq!(sam_state_load(opt, buf.as_ptr().cast(), size), SamStatus::SAM_OK);
        expect_err(sam_state_load(opt, buf.as_ptr().cast(), 7), SamStatus::SAM_ERR_IO, &["truncated"]);
        expect_err(sam_state_load(opt, null(), size), SamStatus::SAM_ERR_NULL_POINTER, &["buf is NULL"]);
        assert_eq!(sam_state_save_file(opt, path.as_ptr()), SamStatus::SAM_OK);
        assert_eq!(std::fs::read(dir.join("opt.state")).unwrap(), buf);
        assert_eq!(sam_state_load_file(opt, path.as_ptr()), SamStatus::SAM_OK);
        expect_err(sam_state_load_file(opt, null()), SamStatus::SAM_ERR_NULL_POINTER, &["path is NULL"]);
        expect_err(sam_state_load_file(opt, c"/nonexistent/x".as_ptr()), SamStatus::SAM_ERR_IO, &["/nonexistent/x"]);
        expect_err(
            sam_state_save_file(opt, c"/nonexistent/dir/x".as_ptr()),
            SamStatus::SAM_ERR_IO,
            &["/nonexistent/dir/x"],
        );
        assert_eq!(sam_first_step(opt), SamStatus::SAM_OK);
        expect_err(
            sam_state_save(opt, buf.as_mut_ptr().cast(), size, null_mut()),
            SamStatus::SAM_ERR_INVALID_STATE,
            &["perturbed"],
        );
        sam_destroy(opt);
    }
}
