//! Shared pieces of the integration tests: typed host buffers, a deterministic generator, and the
//! float64 reference of SAM's first step (SAM, arXiv 2010.01412; ASAM, arXiv 2102.11600), written
//! here independently of the crate.

#![allow(dead_code)]

use std::ffi::CStr;

use samopt::capi::*;
use samopt::half::{bf16, f16};

/// A small deterministic generator (SplitMix64), so the tests need no RNG crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
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
    /// Uniform in [-a, a).
    pub fn sym(&mut self, a: f64) -> f64 {
        (2.0 * self.unit() - 1.0) * a
    }
    /// A signed value whose magnitude is log-uniform over [10^lo, 10^hi), sometimes exactly 0.
    pub fn wide(&mut self, lo: f64, hi: f64) -> f64 {
        if self.next_u64().is_multiple_of(64) {
            return 0.0;
        }
        let m = 10f64.powf(lo + (hi - lo) * self.unit());
        if self.next_u64() & 1 == 0 { m } else { -m }
    }
}

/// The element types under test, with their C dtype and rounding unit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Ty {
    F32,
    F16,
    BF16,
}

pub const ALL_TYPES: [Ty; 3] = [Ty::F32, Ty::F16, Ty::BF16];

impl Ty {
    pub fn c(self) -> SamDType {
        match self {
            Ty::F32 => SAM_DTYPE_F32,
            Ty::F16 => SAM_DTYPE_F16,
            Ty::BF16 => SAM_DTYPE_BF16,
        }
    }
    /// Unit roundoff (half an ulp, relative).
    pub fn unit_roundoff(self) -> f64 {
        match self {
            Ty::F32 => 2f64.powi(-24),
            Ty::F16 => 2f64.powi(-11),
            Ty::BF16 => 2f64.powi(-8),
        }
    }
    /// The smallest positive subnormal: the absolute rounding floor near zero.
    pub fn tiny(self) -> f64 {
        match self {
            Ty::F32 => 2f64.powi(-149),
            Ty::F16 => 2f64.powi(-24),
            Ty::BF16 => 2f64.powi(-133),
        }
    }
}

/// A host buffer of one element type, stored as raw bits with 8-byte alignment.
#[derive(Clone, Debug)]
pub struct Buf {
    pub ty: Ty,
    pub len: usize,
    words: Vec<u64>,
}

impl Buf {
    pub fn from_f64(ty: Ty, values: &[f64]) -> Buf {
        let size = if ty == Ty::F32 { 4 } else { 2 };
        let mut b = Buf { ty, len: values.len(), words: vec![0; (values.len() * size).div_ceil(8)] };
        for (i, &v) in values.iter().enumerate() {
            b.set(i, v);
        }
        b
    }
    pub fn ptr(&mut self) -> *mut std::ffi::c_void {
        self.words.as_mut_ptr().cast()
    }
    pub fn bytes(&self) -> &[u8] {
        let size = if self.ty == Ty::F32 { 4 } else { 2 };
        &bytemuck_bytes(&self.words)[..self.len * size]
    }
    pub fn get(&self, i: usize) -> f64 {
        let b = self.bytes();
        match self.ty {
            Ty::F32 => f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()) as f64,
            Ty::F16 => f16::from_le_bytes(b[2 * i..2 * i + 2].try_into().unwrap()).to_f64(),
            Ty::BF16 => bf16::from_le_bytes(b[2 * i..2 * i + 2].try_into().unwrap()).to_f64(),
        }
    }
    pub fn set(&mut self, i: usize, v: f64) {
        let bytes: &mut [u8] = bytemuck_bytes_mut(&mut self.words);
        match self.ty {
            Ty::F32 => bytes[4 * i..4 * i + 4].copy_from_slice(&(v as f32).to_le_bytes()),
            Ty::F16 => bytes[2 * i..2 * i + 2].copy_from_slice(&f16::from_f64(v).to_le_bytes()),
            Ty::BF16 => bytes[2 * i..2 * i + 2].copy_from_slice(&bf16::from_f64(v).to_le_bytes()),
        }
    }
    pub fn values(&self) -> Vec<f64> {
        (0..self.len).map(|i| self.get(i)).collect()
    }
}

fn bytemuck_bytes(w: &[u64]) -> &[u8] {
    // SAFETY: u64 has no padding; any bytes are valid u8.
    unsafe { std::slice::from_raw_parts(w.as_ptr().cast(), w.len() * 8) }
}
fn bytemuck_bytes_mut(w: &mut [u64]) -> &mut [u8] {
    // SAFETY: as above.
    unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr().cast(), w.len() * 8) }
}

/// One tensor under test: parameter, gradient, and the reference inputs they were rounded from.
pub struct Tensor {
    pub param: Buf,
    pub grad: Buf,
}

impl Tensor {
    /// Weights uniform in [-1, 1), gradients over several decades (and some zeros).
    pub fn random(ty: Ty, len: usize, rng: &mut Rng) -> Tensor {
        let w: Vec<f64> = (0..len).map(|_| rng.sym(1.0)).collect();
        let g: Vec<f64> = (0..len).map(|_| rng.wide(-3.0, 1.0)).collect();
        Tensor { param: Buf::from_f64(ty, &w), grad: Buf::from_f64(ty, &g) }
    }
}

/// SAM's first step in float64, over the values the buffers actually hold.
/// Returns the global norm `||T_w g||_2` and each tensor's perturbed weights.
pub fn reference_first_step(
    tensors: &[Tensor],
    rho: f64,
    eps: f64,
    adaptive: bool,
    eta: f64,
    p_inf: bool,
) -> (f64, Vec<Vec<f64>>) {
    let t = |w: f64| if adaptive { w.abs() + eta } else { 1.0 };
    let mut sum = 0.0f64;
    let mut comp = 0.0f64; // Neumaier compensation: the reference must be better than the code
    for x in tensors {
        for i in 0..x.param.len {
            let v = t(x.param.get(i)) * x.grad.get(i);
            let y = v * v;
            let s = sum + y;
            comp += if sum.abs() >= y { (sum - s) + y } else { (y - s) + sum };
            sum = s;
        }
    }
    let norm = (sum + comp).sqrt();
    let perturbed = tensors
        .iter()
        .map(|x| {
            (0..x.param.len)
                .map(|i| {
                    let (w, g) = (x.param.get(i), x.grad.get(i));
                    let e = if p_inf {
                        rho * t(w)
                            * if g > 0.0 {
                                1.0
                            } else if g < 0.0 {
                                -1.0
                            } else {
                                0.0
                            }
                    } else {
                        rho * t(w) * t(w) * g / (norm + eps)
                    };
                    w + e
                })
                .collect()
        })
        .collect();
    (norm, perturbed)
}

/// Sizes that straddle the engines' block, chunk and workgroup boundaries.
pub const AWKWARD: [usize; 4] = [1, 3, 1023, (1 << 20) + 7];

/// Relative error of the CPU engine's norm: accumulated in f64 from exact f32 products.
pub const CPU_NORM_TOL: f64 = 1e-12;

/// Runs one SAM step over `tensors` and checks the norm, every perturbed weight and the restore.
pub fn check_step(tensors: &mut [Tensor], config: SamConfig, norm_tol: f64) {
    let p_inf = config.norm_p.is_infinite();
    let (norm_ref, expect) = reference_first_step(tensors, config.rho, config.eps, config.adaptive, config.eta, p_inf);
    let before: Vec<Vec<u8>> = tensors.iter().map(|t| t.param.bytes().to_vec()).collect();
    let w_before: Vec<Vec<f64>> = tensors.iter().map(|t| t.param.values()).collect();

    let opt = create(&config);
    register_all(opt, tensors);
    // SAFETY: live handle, buffers outlive it.
    assert_eq!(unsafe { sam_first_step(opt) }, SamStatus::SAM_OK, "{}", last_error());

    let mut norm = f64::NAN;
    // SAFETY: valid pointers.
    assert_eq!(unsafe { sam_grad_norm(opt, &mut norm) }, SamStatus::SAM_OK);
    assert!(((norm - norm_ref) / norm_ref).abs() < norm_tol, "norm {norm} vs reference {norm_ref}");

    let mut worst = 0.0f64;
    for ((t, want), w_before) in tensors.iter().zip(&expect).zip(&w_before) {
        let ty = t.param.ty;
        for (i, &r) in want.iter().enumerate() {
            let got = t.param.get(i);
            let (w, e) = (w_before[i], r - w_before[i]);
            // One rounding to the element type, plus the f32 arithmetic of e (a few f32 ulps of
            // the operands), plus the norm's own error carried into e, plus the subnormal floor.
            let tol = ty.unit_roundoff() * r.abs()
                + 8.0 * 2f64.powi(-24) * (w.abs() + e.abs())
                + norm_tol * e.abs()
                + ty.tiny();
            let err = (got - r).abs();
            assert!(err <= tol, "{ty:?} len {} element {i}: got {got}, reference {r}, tolerance {tol}", t.param.len);
            worst = worst.max(err / tol);
        }
    }
    assert!(worst > 0.0 || tensors.iter().all(|t| t.param.len < 4), "the check compared nothing");

    // SAFETY: live handle.
    assert_eq!(unsafe { sam_second_step(opt) }, SamStatus::SAM_OK, "{}", last_error());
    for (t, b) in tensors.iter().zip(&before) {
        assert_eq!(t.param.bytes(), &b[..], "restore is not bitwise for {:?} len {}", t.param.ty, t.param.len);
    }
    // SAFETY: live handle, destroyed once.
    unsafe { sam_destroy(opt) };
}

pub fn config(adaptive: bool, p_inf: bool) -> SamConfig {
    SamConfig {
        rho: if adaptive { 0.5 } else { 0.05 },
        adaptive,
        eta: if adaptive { 0.01 } else { 0.0 },
        norm_p: if p_inf { f64::INFINITY } else { 2.0 },
        ..SamConfig::default()
    }
}

/// The last error message of this thread.
pub fn last_error() -> String {
    // SAFETY: sam_last_error never returns NULL and the string is NUL-terminated.
    unsafe { CStr::from_ptr(sam_last_error()) }.to_string_lossy().into_owned()
}

/// Creates an optimizer through the C ABI, panicking with the library's message on failure.
pub fn create(config: &SamConfig) -> *mut SamOptimizer {
    let mut opt = std::ptr::null_mut();
    // SAFETY: valid pointers.
    let s = unsafe { sam_create(config, &mut opt) };
    assert_eq!(s, SamStatus::SAM_OK, "{}", last_error());
    opt
}

/// Registers every tensor through the C ABI.
pub fn register_all(opt: *mut SamOptimizer, tensors: &mut [Tensor]) {
    for (k, t) in tensors.iter_mut().enumerate() {
        let mut id = u32::MAX;
        let (len, ty) = (t.param.len, t.param.ty);
        let grad = t.grad.ptr();
        // SAFETY: the buffers outlive the optimizer in every test.
        let s = unsafe { sam_register_host(opt, t.param.ptr(), grad, len, ty.c(), &mut id) };
        assert_eq!(s, SamStatus::SAM_OK, "{}", last_error());
        assert_eq!(id as usize, k);
    }
}

impl Ty {
    /// `x` rounded to the nearest value of this type, as f64.
    pub fn round(self, x: f64) -> f64 {
        match self {
            Ty::F32 => x as f32 as f64,
            Ty::F16 => f16::from_f64(x).to_f64(),
            Ty::BF16 => bf16::from_f64(x).to_f64(),
        }
    }

    /// The tolerance of a multi-step trajectory against a float64 reference, relative to
    /// `max(|w|, 1)`: f32 1e-5; f16 1.5e-3 and bf16 1.2e-2, three units in the last place of
    /// [0.5, 1) (both sides round the weights to the type after every update, from f32 and from
    /// f64, and may land on either side of a rounding boundary).
    pub fn trajectory_tolerance(self) -> f64 {
        match self {
            Ty::F32 => 1e-5,
            Ty::F16 => 1.5e-3,
            Ty::BF16 => 1.2e-2,
        }
    }

    /// The crate's dtype.
    pub fn dtype(self) -> samopt::DType {
        match self {
            Ty::F32 => samopt::DType::F32,
            Ty::F16 => samopt::DType::F16,
            Ty::BF16 => samopt::DType::BF16,
        }
    }
}

/// Writes `v` (rounded to `ty`) into the parameter or (`grad`) the gradient of owned tensor `id`.
pub fn write_values(opt: &mut samopt::Optimizer, id: u32, ty: Ty, grad: bool, v: &[f64]) {
    macro_rules! go {
        ($t:ty, $conv:expr) => {{
            let data: Vec<$t> = v.iter().map(|&x| $conv(x)).collect();
            if grad { opt.write_grad(id, &data).unwrap() } else { opt.write_param(id, &data).unwrap() }
        }};
    }
    match ty {
        Ty::F32 => go!(f32, |x: f64| x as f32),
        Ty::F16 => go!(f16, f16::from_f64),
        Ty::BF16 => go!(bf16, bf16::from_f64),
    }
}

/// The parameter or (`grad`) the gradient of owned tensor `id`, `n` values of `ty`, as f64.
pub fn read_values(opt: &mut samopt::Optimizer, id: u32, ty: Ty, n: usize, grad: bool) -> Vec<f64> {
    macro_rules! go {
        ($t:ty, $zero:expr, $conv:expr) => {{
            let mut out = vec![$zero; n];
            if grad {
                opt.read_grad(id, &mut out).unwrap()
            } else {
                opt.read_param(id, &mut out).unwrap()
            }
            out.iter().map(|&x| $conv(x)).collect()
        }};
    }
    match ty {
        Ty::F32 => go!(f32, 0f32, |x: f32| x as f64),
        Ty::F16 => go!(f16, f16::ZERO, |x: f16| x.to_f64()),
        Ty::BF16 => go!(bf16, bf16::ZERO, |x: bf16| x.to_f64()),
    }
}

/// An optimizer for `config`, or `None` when it asks for the GPU backend and no adapter exists:
/// the test then skips with a notice, unless `SAMOPT_REQUIRE_GPU=1` (as CI sets), which makes a
/// missing adapter fail. Any other error fails the test.
pub fn optimizer_or_skip(config: samopt::Config) -> Option<samopt::Optimizer> {
    match samopt::Optimizer::new(config) {
        Ok(opt) => Some(opt),
        Err(e)
            if e.kind() == samopt::ErrorKind::Device && std::env::var("SAMOPT_REQUIRE_GPU").as_deref() != Ok("1") =>
        {
            // Straight to the stream, past the test harness's capture, so the skip is seen.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "NOTICE: GPU test skipped, no adapter ({e})");
            None
        }
        Err(e) => panic!("creating the optimizer: {e}"),
    }
}

/// An all-reduce (sum) between the threads of a test, each playing a worker: a barrier and a
/// shared slot.
#[derive(Clone)]
pub struct ThreadAllReduce {
    barrier: std::sync::Arc<std::sync::Barrier>,
    sum: std::sync::Arc<std::sync::Mutex<Vec<f64>>>,
}

impl ThreadAllReduce {
    pub fn new(n: usize) -> Self {
        ThreadAllReduce {
            barrier: std::sync::Arc::new(std::sync::Barrier::new(n)),
            sum: std::sync::Arc::new(std::sync::Mutex::new(Vec::new())),
        }
    }
    /// Installs this all-reduce as `opt`'s.
    pub fn install(&self, opt: &mut samopt::Optimizer) {
        let me = self.clone();
        opt.set_allreduce(Some(Box::new(move |v: &mut [f64]| {
            me.run(v);
            Ok(())
        })));
    }
    /// Sums `values` over the `n` threads in place; every thread must call it.
    pub fn run(&self, values: &mut [f64]) {
        {
            let mut s = self.sum.lock().unwrap();
            if s.len() != values.len() {
                *s = vec![0.0; values.len()];
            }
            for (a, v) in s.iter_mut().zip(values.iter()) {
                *a += v;
            }
        }
        self.barrier.wait();
        values.copy_from_slice(&self.sum.lock().unwrap());
        if self.barrier.wait().is_leader() {
            self.sum.lock().unwrap().clear();
        }
        self.barrier.wait();
    }
}
