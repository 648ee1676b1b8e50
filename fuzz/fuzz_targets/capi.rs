//! Drives random sequences of C ABI calls with random arguments over a valid arena of host
//! buffers: NULLs, zero, huge and misaligned lengths, overlapping buffers, out-of-range enums and
//! flags, calls out of order, NaN and infinity in gradients, truncated and corrupted checkpoints,
//! versioned configs of any size, and the data-parallel calls (an all-reduce callback that sums as
//! one worker, fails, writes NaN or a norm below the local one, or calls back into the handle;
//! global norms of any value; per-shard accumulation).
//!
//! After every call it checks that
//! - the status is one samopt defines, and a failing call left a message;
//! - a gradient registered without `SAM_REGISTER_GRAD_WRITABLE` was not written (whatever the call
//!   returned);
//! - a failing call changed no registered parameter or gradient (and, for a failed load, no
//!   optimizer state); the one exception is a failed second step, which may end the step with the
//!   parameters restored to `w`;
//! - whenever the weights are restored (an accumulated shard, a second step without a base
//!   optimizer, a skipped or failed second step) they are bit for bit the `w` of the first step;
//! - with an all-reduce installed, every first step (and every second step with a base optimizer)
//!   calls it exactly once, with 1 (2) values, and `SAM_ERR_CALLBACK` only follows a non-zero return.
//!
//! Run: `cargo fuzz run capi` (CI: `bash scripts/fuzz.sh 60`).

#![no_main]

use std::cell::Cell;
use std::ffi::{CStr, c_void};
use std::ptr::{null, null_mut};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use samopt::capi::*;

/// The arena: four parameter/gradient pairs of a few sizes and dtypes, 8-byte aligned.
const LENS: [usize; 4] = [1, 3, 64, 1025];
const DTYPES: [SamDType; 4] = [SAM_DTYPE_F32, SAM_DTYPE_F16, SAM_DTYPE_BF16, SAM_DTYPE_F32];

/// The CPU engine's chunk (`src/cpu/mod.rs`, `CHUNK`): a tensor of `CHUNK + 1` elements spans two.
const CHUNK: usize = 1 << 16;

/// Which arena buffer a registration uses as its gradient.
#[derive(Clone, Copy)]
enum GradBuf {
    Grad(usize),
    /// Another slot's parameter buffer (a registration the overlap checks must allow).
    Param(usize),
}

#[derive(Clone, Copy)]
struct Registration {
    param: usize,
    grad: GradBuf,
    writable: bool,
}

struct Arena {
    params: Vec<Vec<u64>>,
    grads: Vec<Vec<u64>>,
    /// What the current optimizer registered, in order: its params must change only on success,
    /// and its gradients only when writable.
    regs: Vec<Registration>,
}

/// The registered buffers' contents, in registration order.
#[derive(PartialEq)]
struct Snap {
    params: Vec<Vec<u64>>,
    grads: Vec<Vec<u64>>,
}

impl Arena {
    /// A fresh arena: a copy of one filled once (filling it per optimizer cost several per cent
    /// of the fuzzer's time).
    fn new() -> Arena {
        static FILLED: OnceLock<(Vec<Vec<u64>>, Vec<Vec<u64>>)> = OnceLock::new();
        let (params, grads) = FILLED.get_or_init(|| {
            let words = |n: usize, d: SamDType| (n * if d == SAM_DTYPE_F32 { 4 } else { 2 }).div_ceil(8) + 1;
            let fill = |seed: u64, n: usize| {
                (0..n as u64).map(|i| (i + seed).wrapping_mul(0x3C00_3C00_3F80_0000) & 0x3F3F_3F3F_3F3F_3F3F).collect()
            };
            (
                LENS.iter().zip(DTYPES).enumerate().map(|(k, (&n, d))| fill(k as u64, words(n, d))).collect(),
                LENS.iter().zip(DTYPES).enumerate().map(|(k, (&n, d))| fill(7 + k as u64, words(n, d))).collect(),
            )
        });
        Arena { params: params.clone(), grads: grads.clone(), regs: Vec::new() }
    }

    fn grad(&self, g: GradBuf) -> &Vec<u64> {
        match g {
            GradBuf::Grad(k) => &self.grads[k],
            GradBuf::Param(k) => &self.params[k],
        }
    }

    fn snapshot(&self) -> Snap {
        Snap {
            params: self.regs.iter().map(|r| self.params[r.param].clone()).collect(),
            grads: self.regs.iter().map(|r| self.grad(r.grad).clone()).collect(),
        }
    }
}

/// A `SamConfig` with zeroed bytes after it, so that a `struct_size` up to 64 bytes larger than
/// ours stays within the object (`sam_create` reads `struct_size` bytes).
#[repr(C)]
struct Padded {
    c: SamConfig,
    _tail: [u64; 8],
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
/// Lengths for `sam_tensor_create`: the huge ones overflow for every dtype (2 or 4 bytes) and are
/// refused before any allocation. One pick in 16 spans two CPU chunks: its steps and checkpoints
/// (the Adam moments alone are 512 KiB) cost more than whole inputs of small tensors, so it stays
/// rare; a megabyte-sized tensor would add no path.
const CREATE_LENS: [usize; 16] =
    [0, 1, 3, 64, 1025, 1, 3, 64, 1025, 4097, 0, 3, 64, CHUNK + 1, usize::MAX / 2, usize::MAX];
/// The shared pool (0), or a number over the bound of 1024 (refused). A number within it would
/// give the handle its own pool, whose threads outlive `sam_destroy` (rayon does not join them):
/// every such input then costs thread starts and a LeakSanitizer scan (the frees happen after the
/// input), a handful of milliseconds, and the fuzzer slows five-fold. Own pools run under
/// AddressSanitizer in tests/threads.rs (scripts/asan-test.sh).
const THREADS: [u32; 8] = [0, 0, 0, 0, 0, 0, 1025, u32::MAX];
const STATUS_CALLBACK: i32 = -10;

fn known(s: SamStatus) -> bool {
    // The enum is #[repr(i32)] and only samopt creates its values; reading the number keeps the
    // check honest about what crossed the boundary.
    matches!(s as i32, 0..=2 | -10..=-1)
}

fn last_error() -> String {
    // SAFETY: never NULL, NUL-terminated.
    unsafe { CStr::from_ptr(sam_last_error()) }.to_string_lossy().into_owned()
}

/// The checks after every call: a defined status, read-only gradients untouched, and a failure
/// with a message that changed no registered buffer (a failed second step may instead have
/// restored the parameters to `restored`, the `w` of the first step).
fn check_with(s: SamStatus, before: &Snap, arena: &Arena, what: &str, restored: Option<&[Vec<u64>]>) {
    assert!(known(s), "{what}: unknown status {}", s as i32);
    let now = arena.snapshot();
    for (i, r) in arena.regs.iter().enumerate() {
        if !r.writable {
            assert!(
                before.grads[i] == now.grads[i],
                "{what} (status {}) wrote the read-only gradient of tensor {i}",
                s as i32
            );
        }
    }
    if (s as i32) < 0 {
        let msg = last_error();
        assert!(!msg.is_empty(), "{what}: failed without a message");
        let params_ok = before.params == now.params || restored.is_some_and(|w| w == now.params.as_slice());
        assert!(params_ok, "{what}: a failed call changed a parameter: {msg:?}");
        assert!(before.grads == now.grads, "{what}: a failed call changed a gradient: {msg:?}");
    }
}

fn check(s: SamStatus, before: &Snap, arena: &Arena, what: &str) {
    check_with(s, before, arena, what, None)
}

/// The all-reduce callback's behaviour and what it saw, shared with the callback through `user`.
struct Reduce {
    /// What the next call does (see [`allreduce`]).
    mode: Cell<u8>,
    /// The handle the callback is installed on (for the re-entrant mode).
    opt: Cell<*mut SamOptimizer>,
    calls: Cell<u32>,
    last_count: Cell<usize>,
    failed: Cell<bool>,
}

/// A one-worker all-reduce, with faults: the sum over one worker leaves the values as they are.
///
/// # Safety
/// `user` is NULL or the fuzz input's `Reduce`; `values` holds `count` doubles.
unsafe extern "C" fn allreduce(values: *mut f64, count: usize, user: *mut c_void) -> i32 {
    assert!(!values.is_null() && (1..=2).contains(&count), "all-reduce called with {values:p}, {count}");
    // SAFETY: the library's contract.
    let v = unsafe { std::slice::from_raw_parts_mut(values, count) };
    // SAFETY: our own `user`, alive while the callback is installed.
    let Some(r) = (unsafe { user.cast::<Reduce>().as_ref() }) else { return 0 };
    r.calls.set(r.calls.get() + 1);
    r.last_count.set(count);
    let rc = match r.mode.get() % 10 {
        0 => 0,
        1 => -1,
        2 => 7,
        3 => {
            v.fill(f64::NAN);
            0
        }
        // Another worker with the same contribution: a valid sum, twice the local one.
        4 => {
            v.iter_mut().for_each(|x| *x *= 2.0);
            0
        }
        // A sum below this worker's own squared norm (or zero), and a negative one.
        5 => {
            v[0] *= 0.5;
            0
        }
        6 => {
            v[0] = -1.0;
            0
        }
        7 => {
            v[0] = f64::INFINITY;
            0
        }
        // A callback that calls back into the handle it serves: refused, never a deadlock.
        8 => {
            let opt = r.opt.get();
            let mut n = 0usize;
            // SAFETY: `opt` is the live handle whose call runs this callback.
            let s = unsafe { sam_tensor_count(opt, &mut n) };
            assert_eq!(s as i32, SamStatus::SAM_ERR_INVALID_STATE as i32, "a re-entrant call was not refused");
            // SAFETY: as above.
            let s = unsafe { sam_first_step(opt) };
            assert_eq!(s as i32, SamStatus::SAM_ERR_INVALID_STATE as i32, "a re-entrant step was not refused");
            assert!(!last_error().is_empty());
            0
        }
        _ => i32::MIN,
    };
    r.failed.set(r.failed.get() || rc != 0);
    rc
}

/// Everything a fuzz input works on.
struct World {
    arena: Arena,
    opt: *mut SamOptimizer,
    base: SamBase,
    /// Whether the current handle's schedule is LookSAM (which exchanges two values in the first
    /// step, and two in every second step even without a base optimizer).
    look: bool,
    /// Whether the current handle has loss scaling (which reduces, and exchanges, the second
    /// gradient without a base optimizer too).
    scaled: bool,
    /// Whether the current handle has the all-reduce installed.
    reducing: bool,
    /// The registered parameters at the last successful first step: what every restore must give.
    w: Option<Vec<Vec<u64>>>,
    /// The last local squared norm samopt reported.
    local_sq: f64,
    reduce: Box<Reduce>,
}

impl World {
    /// Adopts a handle `sam_create` just returned.
    fn adopt(&mut self, out: *mut SamOptimizer, base: SamBase, look: bool, scaled: bool) {
        // SAFETY: the old handle (or NULL) is destroyed once, after its last use.
        unsafe { sam_destroy(self.opt) };
        self.opt = out;
        self.base = base;
        self.look = look;
        self.scaled = scaled;
        self.arena = Arena::new();
        self.reducing = false;
        self.w = None;
        self.local_sq = 1.0;
    }

    /// Runs a call that may use the all-reduce: with it installed, `exchanges` (the values it sums,
    /// 0 for a call that must not exchange at all) says how it must be called, exactly once.
    fn exchanging(&mut self, exchanges: usize, call: impl FnOnce(*mut SamOptimizer) -> SamStatus) -> SamStatus {
        let r = &self.reduce;
        let calls = r.calls.get();
        r.failed.set(false);
        let s = call(self.opt);
        if self.reducing && !self.opt.is_null() && exchanges > 0 {
            assert_eq!(
                r.calls.get(),
                calls + 1,
                "the call did not join the all-reduce exactly once (status {})",
                s as i32
            );
            assert_eq!(r.last_count.get(), exchanges, "the all-reduce summed the wrong number of values");
        }
        if s as i32 == STATUS_CALLBACK {
            assert!(r.failed.get(), "SAM_ERR_CALLBACK without a failing callback: {}", last_error());
        }
        s
    }
}

fuzz_target!(|data: &[u8]| {
    // Keep AUTO on the CPU: the fuzzer is after the ABI, not a graphics driver's allocations.
    // WGPU_BACKEND=noop names only wgpu's no-op backend, which this build does not compile in, so
    // AUTO's adapter search starts no graphics API at all (with "vulkan" and no ICD, each search
    // still loaded the Vulkan loader: 6% of the fuzzer's time); the ICD variables are a second
    // guard.
    // SAFETY: set before any optimizer exists; libFuzzer runs the target on one thread.
    unsafe {
        std::env::set_var("WGPU_BACKEND", "noop");
        std::env::set_var("VK_ICD_FILENAMES", "/nonexistent.json");
        std::env::set_var("VK_DRIVER_FILES", "/nonexistent.json");
    }
    let mut input = Bytes(data);
    let mut world = World {
        arena: Arena::new(),
        opt: null_mut(),
        base: SAM_BASE_NONE,
        look: false,
        scaled: false,
        reducing: false,
        w: None,
        local_sq: 1.0,
        reduce: Box::new(Reduce {
            mode: Cell::new(0),
            opt: Cell::new(null_mut()),
            calls: Cell::new(0),
            last_count: Cell::new(0),
            failed: Cell::new(false),
        }),
    };
    let mut saved: Vec<u8> = Vec::new();
    let mut scratch = vec![0u64; 1100];
    let mut steps = 0;
    while let Some(op) = input.u8() {
        steps += 1;
        if steps > 64 {
            break;
        }
        let before = world.arena.snapshot();
        let opt = world.opt;
        // SAFETY: every pointer passed below is either NULL, or points into the arena or
        // `scratch`/`saved`/`buf` with at least the length passed, or is what the call must reject
        // (a misaligned or overlapping pointer into the arena, never one out of it, or a size the
        // call refuses before it reads or writes anything).
        unsafe {
            match op % 18 {
                0 => {
                    let Some(r) = (|| {
                        let mut padded = Padded { c: SamConfig::default(), _tail: [0; 8] };
                        let c = &mut padded.c;
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
                        c.num_threads = input.pick(&THREADS)?;
                        c.schedule = input.pick(&[
                            SAM_SCHEDULE_EVERY,
                            SAM_SCHEDULE_INTERVAL,
                            SAM_SCHEDULE_RANDOM,
                            SAM_SCHEDULE_LOOKSAM,
                            SAM_SCHEDULE_AESAM,
                            9,
                        ])?;
                        c.schedule_k = input.pick(&[2, 1, 0])?;
                        c.schedule_p = input.pick(&[0.5, 0.0, 1.5])?;
                        c.aesam_planned_steps = input.pick(&[8, 0])?;
                        c.loss_scale = input.pick(&[0.0, 0.0, 65536.0, 1.0, -1.0, f64::NAN])?;
                        c.loss_scale_backoff = input.pick(&[0.5, 1.0, 0.0])?;
                        c.struct_size = input.pick(&[size_of::<SamConfig>(), 8, 0, size_of::<SamConfig>() + 8])?;
                        let mut out = 0x1 as *mut SamOptimizer;
                        let s = sam_create(if input.u8()? % 8 == 0 { null() } else { &padded.c }, &mut out);
                        let c = &padded.c;
                        Some((s, out, c.base, c.schedule == SAM_SCHEDULE_LOOKSAM, c.loss_scale != 0.0))
                    })() else {
                        break;
                    };
                    let (s, out, base, look, scaled) = r;
                    check(s, &before, &world.arena, "sam_create");
                    if s == SamStatus::SAM_OK {
                        world.adopt(out, base, look, scaled);
                        saved.clear();
                    } else {
                        assert_eq!(out, 0x1 as *mut SamOptimizer, "a failed sam_create wrote *out");
                    }
                }
                1 | 12 => {
                    // sam_register_host, and (12) sam_register_host_ex with flags.
                    let (Some(k), Some(variant), Some(len_pick)) = (input.u8(), input.u8(), input.u8()) else { break };
                    let flags = if op % 18 == 12 {
                        let Some(f) =
                            input.pick(&[0, SAM_REGISTER_GRAD_WRITABLE, SAM_REGISTER_GRAD_WRITABLE, 2, 3, 1 << 31])
                        else {
                            break;
                        };
                        Some(f)
                    } else {
                        None
                    };
                    let k = k as usize % LENS.len();
                    let other = (k + 1) % LENS.len();
                    let arena = &mut world.arena;
                    let p = arena.params[k].as_mut_ptr().cast::<u8>();
                    let g = arena.grads[k].as_mut_ptr().cast::<u8>();
                    let q = arena.params[other].as_mut_ptr().cast::<u8>();
                    let (param, grad, len, dtype, gbuf): (*mut u8, *mut u8, usize, SamDType, GradBuf) =
                        match variant % 8 {
                            0 => (null_mut(), g, LENS[k], DTYPES[k], GradBuf::Grad(k)),
                            1 => (p, null_mut(), LENS[k], DTYPES[k], GradBuf::Grad(k)),
                            2 => (p.add(1), g, LENS[k], DTYPES[k], GradBuf::Grad(k)),
                            3 => (p, p, LENS[k], DTYPES[k], GradBuf::Grad(k)),
                            4 => (p, q, LENS[k].min(LENS[other]), DTYPES[k], GradBuf::Param(other)),
                            5 => (p, g, LENS[k], 3 + variant as u32, GradBuf::Grad(k)),
                            6 => (
                                p,
                                g,
                                LENS_ARG[len_pick as usize % LENS_ARG.len()].min(LENS[k]),
                                DTYPES[k],
                                GradBuf::Grad(k),
                            ),
                            _ => (p, g, LENS[k], DTYPES[k], GradBuf::Grad(k)),
                        };
                    let mut id = u32::MAX;
                    let out_id: *mut u32 = if len_pick == 255 { null_mut() } else { &mut id };
                    let (s, what) = match flags {
                        None => (
                            sam_register_host(opt, param.cast(), grad.cast_const().cast(), len, dtype, out_id),
                            "sam_register_host",
                        ),
                        Some(f) => (
                            sam_register_host_ex(opt, param.cast(), grad.cast(), len, dtype, f, out_id),
                            "sam_register_host_ex",
                        ),
                    };
                    check(s, &before, &world.arena, what);
                    let flags = flags.unwrap_or(0);
                    if flags & !SAM_REGISTER_GRAD_WRITABLE != 0 {
                        assert!((s as i32) < 0, "{what}: unknown flags {flags:#x} accepted");
                    }
                    if s == SamStatus::SAM_OK {
                        world.arena.regs.push(Registration {
                            param: k,
                            grad: gbuf,
                            writable: flags & SAM_REGISTER_GRAD_WRITABLE != 0,
                        });
                    } else {
                        assert_eq!(id, u32::MAX, "a failed registration wrote out_id");
                    }
                }
                2 => {
                    let s = world.exchanging(if world.look { 2 } else { 1 }, |o| sam_first_step(o));
                    check(s, &before, &world.arena, "sam_first_step");
                    if s == SamStatus::SAM_STEP_SINGLE_GRADIENT || s == SamStatus::SAM_STEP_SKIPPED {
                        assert!(before.params == world.arena.snapshot().params, "a first step that did not perturb moved w");
                    }
                    if (s as i32) >= 0 {
                        world.w = Some(before.params.clone());
                    }
                }
                3 => {
                    let exchanges = if world.base == SAM_BASE_NONE && !world.look && !world.scaled { 0 } else { 2 };
                    let s = world.exchanging(exchanges, |o| sam_second_step(o));
                    check_with(s, &before, &world.arena, "sam_second_step", world.w.as_deref());
                    // A restore gives back w, bit for bit: always without a base optimizer, and
                    // for a skipped step.
                    if s == SamStatus::SAM_STEP_SKIPPED || (s == SamStatus::SAM_OK && world.base == SAM_BASE_NONE) {
                        let w = world.w.as_ref().expect("a second step succeeded without a first step");
                        assert!(*w == world.arena.snapshot().params, "sam_second_step did not restore w exactly");
                    }
                }
                4 => {
                    let (Some(k), Some(at), Some(v)) = (input.u8(), input.u8(), input.u8()) else { break };
                    let k = k as usize % LENS.len();
                    let word = at as usize % world.arena.grads[k].len();
                    let bits = [0x7FC0_0000_7FC0_0000u64, 0x7F80_0000_7C00_7C00, 0, u64::MAX, 0x3F80_0000_3C00_3C00];
                    world.arena.grads[k][word] = bits[v as usize % bits.len()];
                }
                5 => {
                    let Some(lr) = input.pick(&F64S) else { break };
                    check(sam_set_lr(opt, lr), &before, &world.arena, "sam_set_lr");
                }
                6 => {
                    let Some(short) = input.u8() else { break };
                    let mut size = 0usize;
                    let s = sam_state_size(opt, &mut size);
                    check(s, &before, &world.arena, "sam_state_size");
                    if s == SamStatus::SAM_OK {
                        let len = size.saturating_sub((short % 4) as usize);
                        saved = vec![0u8; len];
                        let s = sam_state_save(opt, saved.as_mut_ptr().cast(), len, null_mut());
                        check(s, &before, &world.arena, "sam_state_save");
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
                    check(s, &before, &world.arena, "sam_state_load");
                    if (s as i32) < 0 {
                        assert!(state_before == state_bytes(opt), "a failed load changed the optimizer state");
                    }
                }
                8 => {
                    let (Some(scale), Some(t), Some(g)) = (input.pick(&F64S), input.u8(), input.u8()) else { break };
                    let mut group = u32::MAX;
                    check(sam_add_group(opt, scale, f64::NAN, &mut group), &before, &world.arena, "sam_add_group");
                    check(
                        sam_set_tensor_group(opt, (t % 6) as u32, (g % 4) as u32),
                        &before,
                        &world.arena,
                        "sam_set_tensor_group",
                    );
                }
                9 => {
                    let (mut n, mut c, mut b, mut steps_done, mut lr, mut backend) =
                        (0.0f64, 0usize, false, 0u64, 0.0f64, 99);
                    let a = &world.arena;
                    check(sam_grad_norm(opt, &mut n), &before, a, "sam_grad_norm");
                    check(sam_tensor_count(opt, &mut c), &before, a, "sam_tensor_count");
                    check(sam_is_perturbed(opt, &mut b), &before, a, "sam_is_perturbed");
                    check(sam_step_count(opt, &mut steps_done), &before, a, "sam_step_count");
                    check(sam_grad_norm(opt, null_mut()), &before, a, "sam_grad_norm(NULL)");
                    check(sam_get_lr(opt, &mut lr), &before, a, "sam_get_lr");
                    let s = sam_get_backend(opt, &mut backend);
                    check(s, &before, a, "sam_get_backend");
                    if s == SamStatus::SAM_OK {
                        assert!(backend <= SAM_BACKEND_GPU, "sam_get_backend: {backend}");
                    }
                }
                10 => {
                    let (Some(len_pick), Some(dt), Some(part)) = (input.u8(), input.u8(), input.u8()) else { break };
                    let len = CREATE_LENS[len_pick as usize % CREATE_LENS.len()];
                    let mut id = 0u32;
                    let s = sam_tensor_create(opt, len, (dt % 4) as u32, &mut id);
                    check(s, &before, &world.arena, "sam_tensor_create");
                    let n = len.min(1024);
                    let s = sam_tensor_write(opt, id, (part % 3) as u32, scratch.as_ptr().cast(), n);
                    check(s, &before, &world.arena, "sam_tensor_write");
                    let s = sam_tensor_read(opt, id, (part % 3) as u32, scratch.as_mut_ptr().cast(), n);
                    check(s, &before, &world.arena, "sam_tensor_read");
                }
                11 => {
                    // Status strings for any number, and the version calls.
                    let Some(x) = input.u8() else { break };
                    assert!(!sam_status_string(x as i32 - 128).is_null());
                    assert!(!sam_version().is_null());
                    assert_eq!(sam_abi_version(), SAM_ABI_VERSION);
                }
                13 => {
                    // Installs (or removes) the all-reduce, and sets what it does from now on.
                    let (Some(how), Some(mode)) = (input.u8(), input.u8()) else { break };
                    world.reduce.mode.set(mode);
                    if how % 8 == 7 {
                        continue; // only the behaviour changes
                    }
                    let install = how % 4 != 0;
                    let user: *mut c_void =
                        if how % 4 == 3 { null_mut() } else { (&*world.reduce as *const Reduce).cast_mut().cast() };
                    let cb: SamAllreduce = if install { Some(allreduce) } else { None };
                    let s = sam_set_allreduce(opt, cb, user);
                    check(s, &before, &world.arena, "sam_set_allreduce");
                    if s == SamStatus::SAM_OK {
                        // A NULL `user` makes the callback a plain one-worker sum (not counted).
                        world.reducing = install && !user.is_null();
                        world.reduce.opt.set(opt);
                    }
                }
                14 => {
                    let Some(null_out) = input.u8() else { break };
                    let mut v = -1.0f64;
                    let out: *mut f64 = if null_out % 16 == 15 { null_mut() } else { &mut v };
                    let s = world.exchanging(0, |o| sam_grad_sq_norm_local(o, out));
                    check(s, &before, &world.arena, "sam_grad_sq_norm_local");
                    if s == SamStatus::SAM_OK {
                        assert!(v.is_finite() && v >= 0.0, "sam_grad_sq_norm_local: {v}");
                        world.local_sq = v;
                    } else {
                        assert_eq!(v.to_bits(), (-1.0f64).to_bits(), "a failed sam_grad_sq_norm_local wrote *out");
                    }
                }
                15 => {
                    let Some(pick) = input.u8() else { break };
                    let local = world.local_sq.sqrt();
                    let norms = [
                        local,
                        local * (1.0 + 1e-9),
                        local * 2.0,
                        local * 0.5,
                        local * (1.0 - 1e-3),
                        0.0,
                        -0.0,
                        -1.0,
                        f64::NAN,
                        f64::INFINITY,
                        f64::NEG_INFINITY,
                        1e-300,
                        1e300,
                        f64::MIN_POSITIVE / 4.0,
                    ];
                    let norm = norms[pick as usize % norms.len()];
                    let s = world.exchanging(0, |o| sam_first_step_with_norm(o, norm));
                    check(s, &before, &world.arena, "sam_first_step_with_norm");
                    if !norm.is_finite() || norm < 0.0 {
                        // With loss scaling a non-finite norm is the scale's overflow: a skipped step.
                        let overflow = world.scaled && !norm.is_finite() && s == SamStatus::SAM_STEP_SKIPPED;
                        assert!((s as i32) < 0 || overflow, "sam_first_step_with_norm accepted {norm}");
                    }
                    if (s as i32) >= 0 {
                        world.w = Some(before.params.clone());
                    }
                }
                16 => {
                    let s = world.exchanging(0, |o| sam_accumulate_step(o));
                    check(s, &before, &world.arena, "sam_accumulate_step");
                    if s == SamStatus::SAM_OK {
                        let w = world.w.as_ref().expect("accumulate_step succeeded without a first step");
                        assert!(*w == world.arena.snapshot().params, "sam_accumulate_step did not restore w exactly");
                    }
                }
                _ => {
                    // sam_config_init for a caller's layout of any size, then sam_create from it.
                    let (Some(size_pick), Some(poke), Some(backend), Some(base), Some(threads)) =
                        (input.u8(), input.u8(), input.u8(), input.u8(), input.u8())
                    else {
                        break;
                    };
                    // sam_config_layout with any capacity: at most `capacity` entries written, all
                    // of them in order and inside the struct; NULLs refused, writing nothing.
                    const ROOM: usize = 48;
                    let cap = poke as usize % ROOM;
                    let mut fields = vec![SamConfigField { name: std::ptr::null(), offset: usize::MAX, size: 0 }; ROOM];
                    let mut count = usize::MAX;
                    let s = sam_config_layout(
                        if poke == 254 { null_mut() } else { fields.as_mut_ptr() },
                        cap,
                        if poke == 253 { null_mut() } else { &mut count },
                    );
                    check(s, &before, &world.arena, "sam_config_layout");
                    if s == SamStatus::SAM_OK {
                        let written = cap.min(count);
                        assert!(count > 30 && count < ROOM, "sam_config_layout: {count} fields");
                        assert!(fields[written..].iter().all(|f| f.offset == usize::MAX), "wrote past capacity {cap}");
                        assert!(fields[..written].windows(2).all(|p| p[0].offset + p[0].size <= p[1].offset));
                        assert!(fields[..written].iter().all(|f| f.offset + f.size <= size_of::<SamConfig>()));
                    } else {
                        assert!(poke == 253 || (poke == 254 && cap > 0), "sam_config_layout refused capacity {cap}");
                        assert!(fields.iter().all(|f| f.offset == usize::MAX) && count == usize::MAX);
                    }
                    let ours = size_of::<SamConfig>();
                    let sizes =
                        [0, 8, ours - 8, ours, ours, ours + 1, ours + 8, ours + 64, 1 << 16, (1 << 16) + 1, usize::MAX];
                    let size = sizes[size_pick as usize % sizes.len()];
                    const FILL: u64 = 0xA5A5_A5A5_A5A5_A5A5;
                    // Writable for every size above that the call may write (up to 1 << 16).
                    let mut buf = vec![FILL; (1 << 16) / 8 + 16];
                    let cfg = buf.as_mut_ptr().cast::<SamConfig>();
                    let s = sam_config_init(if poke == 255 { null_mut() } else { cfg }, size);
                    check(s, &before, &world.arena, "sam_config_init");
                    let bytes = std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), buf.len() * 8);
                    if s != SamStatus::SAM_OK {
                        // Whole-slice comparisons (memcmp), not per-element loops under coverage.
                        assert!(buf == vec![FILL; buf.len()], "a failed sam_config_init wrote the config");
                        assert!(poke == 255 || size < ours || size > 1 << 16, "sam_config_init refused size {size}");
                        continue;
                    }
                    assert!((ours..=1 << 16).contains(&size), "sam_config_init accepted size {size}");
                    assert!(bytes[size..] == vec![0xA5; bytes.len() - size], "sam_config_init wrote past size {size}");
                    assert!(bytes[ours..size] == vec![0; size - ours], "sam_config_init left unknown fields non-zero");
                    let c = &mut *cfg;
                    assert_eq!(c.struct_size, size);
                    assert!(same_config(c, &SamConfig::default()), "sam_config_init: not the defaults: {c:?}");
                    c.backend = [SAM_BACKEND_AUTO, SAM_BACKEND_CPU, 3][backend as usize % 3];
                    c.base = [SAM_BASE_NONE, SAM_BASE_SGD, SAM_BASE_ADAMW][base as usize % 3];
                    c.num_threads = THREADS[threads as usize % THREADS.len()];
                    // A field this library does not know, set: a newer header's request it cannot honour.
                    let newer = size > ours && poke % 4 == 1;
                    if newer {
                        buf.as_mut_ptr().cast::<u8>().add(ours + poke as usize % (size - ours)).write(1);
                    }
                    let mut out = 0x1 as *mut SamOptimizer;
                    let s = sam_create(cfg, &mut out);
                    check(s, &before, &world.arena, "sam_create(sam_config_init)");
                    if newer {
                        assert_eq!(s as i32, SamStatus::SAM_ERR_UNSUPPORTED as i32, "a set unknown field was accepted");
                    }
                    if s == SamStatus::SAM_OK {
                        world.adopt(out, (*cfg).base, (*cfg).schedule == SAM_SCHEDULE_LOOKSAM, (*cfg).loss_scale != 0.0);
                        saved.clear();
                    } else {
                        assert_eq!(out, 0x1 as *mut SamOptimizer, "a failed sam_create wrote *out");
                    }
                }
            }
        }
    }
    // SAFETY: the handle (or NULL) is destroyed once, after its last use; `world.reduce`, which
    // its callback may point to, is dropped after it.
    unsafe { sam_destroy(world.opt) };
});

/// Whether two configs have the same fields besides `struct_size`, bit for bit (NaN included).
fn same_config(a: &SamConfig, b: &SamConfig) -> bool {
    let f = |c: &SamConfig| {
        [
            c.rho,
            c.eps,
            c.eta,
            c.norm_p,
            c.lr,
            c.momentum,
            c.dampening,
            c.weight_decay,
            c.beta1,
            c.beta2,
            c.adam_eps,
            c.max_grad_norm,
            c.gsam_alpha,
        ]
        .map(f64::to_bits)
    };
    f(a) == f(b)
        && (a.adaptive, a.backend, a.num_threads, a.adapter, a.base, a.nesterov)
            == (b.adaptive, b.backend, b.num_threads, b.adapter, b.base, b.nesterov)
}

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
