//! Drives random sequences of C ABI calls with random arguments over a valid arena of host
//! buffers: NULLs, zero, huge and misaligned lengths, overlapping buffers, out-of-range enums,
//! calls out of order, NaN and infinity in gradients, truncated and corrupted checkpoints.
//!
//! After every call it checks that the status is one samopt defines, that a failing call left a
//! message, and that a failing call changed no registered parameter (and, for a failed load, no
//! optimizer state).
//!
//! Run: `cargo fuzz run capi` (CI: `bash scripts/fuzz.sh 60`).

#![no_main]

use std::ffi::CStr;
use std::ptr::{null, null_mut};

use libfuzzer_sys::fuzz_target;
use samopt::capi::*;

/// The arena: four parameter/gradient pairs of a few sizes and dtypes, 8-byte aligned.
const LENS: [usize; 4] = [1, 3, 64, 1025];
const DTYPES: [SamDType; 4] = [SAM_DTYPE_F32, SAM_DTYPE_F16, SAM_DTYPE_BF16, SAM_DTYPE_F32];

struct Arena {
    params: Vec<Vec<u64>>,
    grads: Vec<Vec<u64>>,
    /// Which arena slots the current optimizer registered (their params must only change on
    /// success).
    registered: Vec<usize>,
}

impl Arena {
    fn new() -> Arena {
        let words = |n: usize, d: SamDType| (n * if d == SAM_DTYPE_F32 { 4 } else { 2 }).div_ceil(8) + 1;
        let fill = |seed: u64, n: usize| {
            (0..n as u64).map(|i| (i + seed).wrapping_mul(0x3C00_3C00_3F80_0000) & 0x3F3F_3F3F_3F3F_3F3F).collect()
        };
        Arena {
            params: LENS.iter().zip(DTYPES).enumerate().map(|(k, (&n, d))| fill(k as u64, words(n, d))).collect(),
            grads: LENS.iter().zip(DTYPES).enumerate().map(|(k, (&n, d))| fill(7 + k as u64, words(n, d))).collect(),
            registered: Vec::new(),
        }
    }

    fn snapshot(&self) -> Vec<Vec<u64>> {
        self.registered.iter().map(|&k| self.params[k].clone()).collect()
    }
}

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn pick<T: Copy>(&mut self, table: &[T]) -> Option<T> {
        Some(table[self.u8()? as usize % table.len()])
    }
}

const F64S: [f64; 10] = [0.05, 0.5, 2.0, 0.0, -1.0, f64::NAN, f64::INFINITY, 1e-30, 1e30, 0.9];
const LENS_ARG: [usize; 8] = [0, 1, 3, 64, 1025, 1026, usize::MAX / 2, usize::MAX];

fn known(s: SamStatus) -> bool {
    // The enum is #[repr(i32)] and only samopt creates its values; reading the number keeps the
    // check honest about what crossed the boundary.
    matches!(s as i32, 0 | 1 | -9..=-1)
}

fn check(s: SamStatus, before: &[Vec<u64>], arena: &Arena, what: &str) {
    assert!(known(s), "{what}: unknown status {}", s as i32);
    if (s as i32) < 0 {
        // SAFETY: never NULL, NUL-terminated.
        let msg = unsafe { CStr::from_ptr(sam_last_error()) };
        assert!(!msg.to_bytes().is_empty(), "{what}: failed without a message");
        assert!(before == arena.snapshot().as_slice(), "{what}: a failed call changed a parameter: {msg:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    // Keep AUTO on the CPU (no Vulkan driver, no GL): the fuzzer is after the ABI, not a graphics
    // driver's allocations.
    // SAFETY: set before any optimizer exists; libFuzzer runs the target on one thread.
    unsafe {
        std::env::set_var("WGPU_BACKEND", "vulkan");
        std::env::set_var("VK_ICD_FILENAMES", "/nonexistent.json");
        std::env::set_var("VK_DRIVER_FILES", "/nonexistent.json");
    }
    let mut input = Bytes(data);
    let mut arena = Arena::new();
    let mut opt: *mut SamOptimizer = null_mut();
    let mut saved: Vec<u8> = Vec::new();
    let mut scratch = vec![0u64; 1100];
    let mut steps = 0;
    while let Some(op) = input.u8() {
        steps += 1;
        if steps > 64 {
            break;
        }
        let before = arena.snapshot();
        // SAFETY: every pointer passed below is either NULL, or points into the arena or
        // `scratch`/`saved` with at least the length passed, or is what the call must reject
        // (a misaligned or overlapping pointer into the arena, never one out of it).
        unsafe {
            match op % 12 {
                0 => {
                    let Some(r) = (|| {
                        let mut c = sam_config_default();
                        c.rho = input.pick(&F64S)?;
                        c.eps = input.pick(&[1e-12, 0.0, -1.0, f64::NAN])?;
                        c.adaptive = input.u8()? & 1 == 1;
                        c.eta = input.pick(&[0.0, 0.01, -1.0])?;
                        c.norm_p = input.pick(&[2.0, f64::INFINITY, 3.0, 0.5, f64::NAN])?;
                        c.backend = input.pick(&[SAM_BACKEND_AUTO, SAM_BACKEND_CPU, 7])?;
                        c.base = input.pick(&[SAM_BASE_NONE, SAM_BASE_SGD, SAM_BASE_ADAMW, 9])?;
                        c.lr = input.pick(&F64S)?;
                        c.momentum = input.pick(&[0.0, 0.9, -0.5])?;
                        c.nesterov = input.u8()? & 1 == 1;
                        c.max_grad_norm = input.pick(&[0.0, 1.0, -1.0])?;
                        c.gsam_alpha = input.pick(&[0.0, 0.3, f64::NAN])?;
                        c.num_threads = input.pick(&[0, 1, 3])?;
                        c.struct_size = input.pick(&[size_of::<SamConfig>(), 8, 0, size_of::<SamConfig>() + 8])?;
                        let mut out = 0x1 as *mut SamOptimizer;
                        let s = sam_create(if input.u8()? % 8 == 0 { null() } else { &c }, &mut out);
                        Some((s, out))
                    })() else {
                        break;
                    };
                    let (s, out) = r;
                    check(s, &before, &arena, "sam_create");
                    if s == SamStatus::SAM_OK {
                        sam_destroy(opt);
                        opt = out;
                        arena = Arena::new();
                        saved.clear();
                    } else {
                        assert_eq!(out, 0x1 as *mut SamOptimizer, "a failed sam_create wrote *out");
                    }
                }
                1 => {
                    let (Some(k), Some(variant), Some(len_pick)) = (input.u8(), input.u8(), input.u8()) else { break };
                    let k = k as usize % LENS.len();
                    let other = (k + 1) % LENS.len();
                    let (p, g) = (arena.params[k].as_mut_ptr().cast::<u8>(), arena.grads[k].as_ptr().cast::<u8>());
                    let (param, grad, len, dtype): (*mut u8, *const u8, usize, SamDType) = match variant % 8 {
                        0 => (null_mut(), g, LENS[k], DTYPES[k]),
                        1 => (p, null(), LENS[k], DTYPES[k]),
                        2 => (p.add(1), g, LENS[k], DTYPES[k]),
                        3 => (p, p, LENS[k], DTYPES[k]),
                        4 => (p, arena.params[other].as_ptr().cast(), LENS[k].min(LENS[other]), DTYPES[k]),
                        5 => (p, g, LENS[k], 3 + variant as u32),
                        6 => (p, g, LENS_ARG[len_pick as usize % LENS_ARG.len()].min(LENS[k]), DTYPES[k]),
                        _ => (p, g, LENS[k], DTYPES[k]),
                    };
                    let mut id = u32::MAX;
                    let out_id: *mut u32 = if len_pick == 255 { null_mut() } else { &mut id };
                    let s = sam_register_host(opt, param.cast(), grad.cast(), len, dtype, out_id);
                    check(s, &before, &arena, "sam_register_host");
                    if s == SamStatus::SAM_OK {
                        arena.registered.push(k);
                    } else {
                        assert_eq!(id, u32::MAX, "a failed registration wrote out_id");
                    }
                }
                2 => check(sam_first_step(opt), &before, &arena, "sam_first_step"),
                3 => {
                    let s = sam_second_step(opt);
                    check(s, &before, &arena, "sam_second_step");
                }
                4 => {
                    let (Some(k), Some(at), Some(v)) = (input.u8(), input.u8(), input.u8()) else { break };
                    let k = k as usize % LENS.len();
                    let word = at as usize % arena.grads[k].len();
                    let bits = [0x7FC0_0000_7FC0_0000u64, 0x7F80_0000_7C00_7C00, 0, u64::MAX, 0x3F80_0000_3C00_3C00];
                    arena.grads[k][word] = bits[v as usize % bits.len()];
                }
                5 => {
                    let Some(lr) = input.pick(&F64S) else { break };
                    check(sam_set_lr(opt, lr), &before, &arena, "sam_set_lr");
                }
                6 => {
                    let Some(short) = input.u8() else { break };
                    let mut size = 0usize;
                    let s = sam_state_size(opt, &mut size);
                    check(s, &before, &arena, "sam_state_size");
                    if s == SamStatus::SAM_OK {
                        let len = size.saturating_sub((short % 4) as usize);
                        saved = vec![0u8; len];
                        let s = sam_state_save(opt, saved.as_mut_ptr().cast(), len, null_mut());
                        check(s, &before, &arena, "sam_state_save");
                        assert!(s == SamStatus::SAM_OK || len < size || (s as i32) < 0);
                    }
                }
                7 => {
                    let (Some(flip), Some(cut)) = (input.u8(), input.u8()) else { break };
                    let mut bytes = saved.clone();
                    if !bytes.is_empty() && flip % 2 == 1 {
                        let at = flip as usize * 7 % bytes.len();
                        bytes[at] ^= 1 << (flip % 8);
                    }
                    bytes.truncate(bytes.len().saturating_sub((cut % 3) as usize * 9));
                    // A failed load must also leave the optimizer's own state as it was.
                    let state_before = state_bytes(opt);
                    let s = sam_state_load(opt, if cut == 255 { null() } else { bytes.as_ptr().cast() }, bytes.len());
                    check(s, &before, &arena, "sam_state_load");
                    if (s as i32) < 0 {
                        assert!(state_before == state_bytes(opt), "a failed load changed the optimizer state");
                    }
                }
                8 => {
                    let (Some(scale), Some(t), Some(g)) = (input.pick(&F64S), input.u8(), input.u8()) else { break };
                    let mut group = u32::MAX;
                    check(sam_add_group(opt, scale, f64::NAN, &mut group), &before, &arena, "sam_add_group");
                    check(
                        sam_set_tensor_group(opt, (t % 6) as u32, (g % 4) as u32),
                        &before,
                        &arena,
                        "sam_set_tensor_group",
                    );
                }
                9 => {
                    let (mut n, mut c, mut b, mut steps_done) = (0.0f64, 0usize, false, 0u64);
                    check(sam_grad_norm(opt, &mut n), &before, &arena, "sam_grad_norm");
                    check(sam_tensor_count(opt, &mut c), &before, &arena, "sam_tensor_count");
                    check(sam_is_perturbed(opt, &mut b), &before, &arena, "sam_is_perturbed");
                    check(sam_step_count(opt, &mut steps_done), &before, &arena, "sam_step_count");
                    check(sam_grad_norm(opt, null_mut()), &before, &arena, "sam_grad_norm(NULL)");
                }
                10 => {
                    let (Some(len_pick), Some(dt), Some(part)) = (input.u8(), input.u8(), input.u8()) else { break };
                    let len = LENS_ARG[len_pick as usize % LENS_ARG.len()];
                    let mut id = 0u32;
                    let s = sam_tensor_create(opt, len.min(1 << 20), (dt % 4) as u32, &mut id);
                    check(s, &before, &arena, "sam_tensor_create");
                    let n = len.min(1024);
                    let s = sam_tensor_write(opt, id, (part % 3) as u32, scratch.as_ptr().cast(), n);
                    check(s, &before, &arena, "sam_tensor_write");
                    let s = sam_tensor_read(opt, id, (part % 3) as u32, scratch.as_mut_ptr().cast(), n);
                    check(s, &before, &arena, "sam_tensor_read");
                }
                _ => {
                    // Status strings for any number, and the version calls.
                    let Some(x) = input.u8() else { break };
                    assert!(!sam_status_string(x as i32 - 128).is_null());
                    assert!(!sam_version().is_null());
                    assert_eq!(sam_abi_version(), SAM_ABI_VERSION);
                }
            }
        }
    }
    // SAFETY: the handle (or NULL) is destroyed once, after its last use.
    unsafe { sam_destroy(opt) };
});

/// The optimizer's serialised state, or nothing when it cannot be saved now.
fn state_bytes(opt: *mut SamOptimizer) -> Vec<u8> {
    let mut size = 0usize;
    // SAFETY: `opt` is NULL or live; the buffer has the size asked for.
    unsafe {
        if sam_state_size(opt, &mut size) != SamStatus::SAM_OK {
            return Vec::new();
        }
        let mut buf = vec![0u8; size];
        if sam_state_save(opt, buf.as_mut_ptr().cast(), size, null_mut()) != SamStatus::SAM_OK {
            return Vec::new();
        }
        buf
    }
}
