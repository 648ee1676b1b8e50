//! Rebinding host tensors to new buffers (`rebind_host_raw`, `sam_rebind_host`): a run that moves
//! every tensor to freshly allocated buffers before every step ends with the same weights and the
//! same optimizer state, bit for bit, as a run that never moves (the state compared through the
//! checkpoint bytes, which hold the momentum and Adam's moments); bad input is refused with
//! nothing changed. CPU, and the GPU engine staging host buffers.

mod common;

use common::{Rng, optimizer_or_skip};
use samopt::{Backend, BaseOptimizer, Config, DType, ErrorKind, Optimizer, Schedule};

const LENS: [usize; 3] = [7, 1000, 4099];

/// A host tensor's buffers, re-allocated on demand (the old ones freed after the rebind).
struct Host {
    w: Vec<f32>,
    g: Vec<f32>,
}

fn run(config: &Config, rebind: bool) -> Option<(Vec<Vec<f32>>, Vec<u8>)> {
    let mut opt = optimizer_or_skip(config.clone())?;
    let mut rng = Rng::new(17);
    let mut hosts: Vec<Host> =
        LENS.iter().map(|&n| Host { w: (0..n).map(|_| rng.sym(1.0) as f32).collect(), g: vec![0.0; n] }).collect();
    for h in &mut hosts {
        // SAFETY: the vectors outlive their registration (rebinding replaces them before they drop).
        unsafe {
            opt.register_host_writable_raw(h.w.as_mut_ptr().cast(), h.g.as_mut_ptr().cast(), h.w.len(), DType::F32)
        }
        .unwrap();
    }
    for _ in 0..12 {
        if rebind {
            for (id, h) in hosts.iter_mut().enumerate() {
                // New allocations, as a framework's allocator would hand out: the weights copied.
                let mut fresh = Host { w: h.w.clone(), g: vec![0.0; h.w.len()] };
                // SAFETY: the new vectors stay alive in `hosts`; the old ones are not used again.
                unsafe { opt.rebind_host_raw(id as u32, fresh.w.as_mut_ptr().cast(), fresh.g.as_mut_ptr().cast()) }
                    .unwrap();
                *h = fresh;
            }
        }
        let g1: Vec<Vec<f32>> = LENS.iter().map(|&n| (0..n).map(|_| rng.sym(0.5) as f32).collect()).collect();
        let g2: Vec<Vec<f32>> = LENS.iter().map(|&n| (0..n).map(|_| rng.sym(0.5) as f32).collect()).collect();
        for (h, g) in hosts.iter_mut().zip(&g1) {
            h.g.copy_from_slice(g);
        }
        if opt.first_step().unwrap() == samopt::FirstStep::Perturbed {
            for (h, g) in hosts.iter_mut().zip(&g2) {
                h.g.copy_from_slice(g);
            }
        }
        opt.second_step().unwrap();
    }
    let mut state = vec![0u8; opt.state_size()];
    opt.save_state(&mut state).unwrap();
    drop(opt);
    Some((hosts.into_iter().map(|h| h.w).collect(), state))
}

#[test]
fn rebinding_every_step_keeps_weights_and_state_bit_for_bit() {
    for backend in [Backend::Cpu, Backend::Gpu] {
        let configs = [
            Config { backend, base: BaseOptimizer::Sgd, lr: 0.1, momentum: 0.9, ..Config::default() },
            Config { backend, base: BaseOptimizer::AdamW, lr: 0.01, ..Config::default() },
            Config {
                backend,
                base: BaseOptimizer::Sgd,
                lr: 0.1,
                momentum: 0.5,
                schedule: Schedule::LookSam { k: 3, alpha: 0.7 },
                ..Config::default()
            },
        ];
        for config in configs {
            let Some(still) = run(&config, false) else { return };
            let moved = run(&config, true).unwrap();
            assert!(still.0 == moved.0, "{backend:?} {:?}: the weights differ", config.base);
            assert!(still.1 == moved.1, "{backend:?} {:?}: the optimizer state differs", config.base);
        }
    }
}

#[test]
fn bad_rebinds_are_refused_with_nothing_changed() {
    let config =
        Config { backend: Backend::Cpu, base: BaseOptimizer::Sgd, lr: 0.1, momentum: 0.9, ..Config::default() };
    let mut opt = Optimizer::new(config).unwrap();
    let (mut w0, g0) = (vec![1.0f32; 64], vec![0.5f32; 64]);
    let (mut w1, g1) = (vec![2.0f32; 64], vec![0.25f32; 64]);
    // SAFETY: all four outlive the optimizer and are only touched between its calls.
    unsafe {
        opt.register_host_raw(w0.as_mut_ptr().cast(), g0.as_ptr().cast(), 64, DType::F32).unwrap();
        opt.register_host_raw(w1.as_mut_ptr().cast(), g1.as_ptr().cast(), 64, DType::F32).unwrap();
    }
    let owned = opt.add_tensor(&[1.0f32; 16]).unwrap();
    opt.first_step().unwrap();
    opt.second_step().unwrap();
    let mut before = vec![0u8; opt.state_size()];
    opt.save_state(&mut before).unwrap();
    let weights = (w0.clone(), w1.clone());

    let mut spare = vec![0f32; 130];
    let base = spare.as_mut_ptr();
    let cases: Vec<(u32, *mut u8, *const u8, ErrorKind, &str)> = vec![
        (0, std::ptr::null_mut(), g0.as_ptr().cast(), ErrorKind::NullPointer, "param is NULL"),
        (0, base.cast::<u8>().wrapping_add(1), g0.as_ptr().cast(), ErrorKind::InvalidArgument, "not aligned"),
        (0, base.cast(), base.wrapping_add(10).cast(), ErrorKind::InvalidArgument, "overlap"),
        (0, w1.as_mut_ptr().cast(), g0.as_ptr().cast(), ErrorKind::InvalidArgument, "overlaps a buffer of tensor 1"),
        (0, base.cast(), g1.as_ptr().cast(), ErrorKind::InvalidArgument, "overlaps a buffer of tensor 1"),
        (owned, base.cast(), base.wrapping_add(64).cast(), ErrorKind::InvalidArgument, "not a tensor in host buffers"),
        (9, base.cast(), base.wrapping_add(64).cast(), ErrorKind::InvalidArgument, "id = 9"),
    ];
    for (id, p, g, kind, needle) in cases {
        // SAFETY: every pointer is NULL, misaligned or inside a live buffer: the call must refuse
        // before it touches any.
        let e = unsafe { opt.rebind_host_raw(id, p, g) }.unwrap_err();
        assert_eq!(e.kind(), kind, "{needle}: {}", e.message());
        assert!(e.message().contains(needle), "{needle}: {}", e.message());
    }
    let mut after = vec![0u8; opt.state_size()];
    opt.save_state(&mut after).unwrap();
    assert!(before == after, "a refused rebind changed the optimizer's state");
    assert!(weights == (w0.clone(), w1.clone()), "a refused rebind changed the weights");

    // Between the two steps: refused.
    opt.first_step().unwrap();
    // SAFETY: as above.
    let e = unsafe { opt.rebind_host_raw(0, base.cast(), base.wrapping_add(64).cast()) }.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidState);
    opt.second_step().unwrap();

    // The map of ranges did not change either: tensor 0 can move into `spare`, and back into its
    // own old buffers, which do not count as another tensor's.
    spare[..64].copy_from_slice(&w0);
    // SAFETY: `spare` outlives the optimizer.
    unsafe { opt.rebind_host_raw(0, base.cast(), base.wrapping_add(64).cast()) }.unwrap();
    // SAFETY: w0/g0 outlive the optimizer.
    unsafe { opt.rebind_host_raw(0, w0.as_mut_ptr().cast(), g0.as_ptr().cast()) }.unwrap();
    // The tensor's old range is free again: tensor 1 may move into `spare`.
    // SAFETY: as above.
    unsafe { opt.rebind_host_raw(1, base.cast(), base.wrapping_add(64).cast()) }.unwrap();
}

/// An allocator may hand one tensor the address another one held: rebinding them one at a time
/// is refused (the other's old range is still registered), rebinding them together succeeds and
/// keeps each tensor's state.
#[test]
fn tensors_that_swap_addresses_rebind_together() {
    let config =
        Config { backend: Backend::Cpu, base: BaseOptimizer::Sgd, lr: 0.1, momentum: 0.9, ..Config::default() };
    let mut opt = Optimizer::new(config).unwrap();
    let mut a = (vec![1.0f32; 32], vec![0.0f32; 32]);
    let mut b = (vec![2.0f32; 32], vec![0.0f32; 32]);
    // SAFETY: the vectors outlive the optimizer and are only touched between its calls.
    unsafe {
        opt.register_host_raw(a.0.as_mut_ptr().cast(), a.1.as_ptr().cast(), 32, DType::F32).unwrap();
        opt.register_host_raw(b.0.as_mut_ptr().cast(), b.1.as_ptr().cast(), 32, DType::F32).unwrap();
    }
    a.1.fill(0.5);
    b.1.fill(-0.5);
    opt.first_step().unwrap();
    opt.second_step().unwrap();
    // Swap the gradient buffers between the two tensors.
    let (ga, gb) = (a.1.as_ptr().cast::<u8>(), b.1.as_ptr().cast::<u8>());
    // SAFETY: all buffers are live; the call must refuse before touching any.
    let e = unsafe { opt.rebind_host_raw(0, a.0.as_mut_ptr().cast(), gb) }.unwrap_err();
    assert!(e.message().contains("overlaps a buffer of tensor 1"), "{}", e.message());
    // SAFETY: as above; this one succeeds.
    unsafe { opt.rebind_hosts_raw(&[(0, a.0.as_mut_ptr().cast(), gb), (1, b.0.as_mut_ptr().cast(), ga)]) }.unwrap();
    // The gradients now come from the swapped buffers; momentum continues per tensor.
    b.1.fill(0.5); // tensor 0's gradient
    a.1.fill(-0.5); // tensor 1's gradient
    opt.first_step().unwrap();
    opt.second_step().unwrap();
    // SGD momentum, two updates of +-0.5: w - 0.1 * (0.5 + (0.9 * 0.5 + 0.5)).
    let want0 = 1.0f32 - 0.1 * 0.5 - 0.1 * (0.9 * 0.5 + 0.5);
    let want1 = 2.0f32 + 0.1 * 0.5 + 0.1 * (0.9 * 0.5 + 0.5);
    assert!((a.0[0] - want0).abs() < 1e-6 && (b.0[0] - want1).abs() < 1e-6, "{} {}", a.0[0], b.0[0]);
    // Duplicates and overlapping new buffers are refused, all or nothing.
    // SAFETY: as above.
    let e = unsafe { opt.rebind_hosts_raw(&[(0, a.0.as_mut_ptr().cast(), gb), (0, b.0.as_mut_ptr().cast(), ga)]) }
        .unwrap_err();
    assert!(e.message().contains("appears twice"), "{}", e.message());
    // SAFETY: as above.
    let e = unsafe { opt.rebind_hosts_raw(&[(0, a.0.as_mut_ptr().cast(), ga), (1, b.0.as_mut_ptr().cast(), ga)]) }
        .unwrap_err();
    assert!(e.message().contains("of tensor 1 overlaps a buffer of tensor 0"), "{}", e.message());
    // Nothing moved: the swapped binding still holds.
    // SAFETY: as above; rebinding to the current buffers is allowed.
    unsafe { opt.rebind_hosts_raw(&[(0, a.0.as_mut_ptr().cast(), gb), (1, b.0.as_mut_ptr().cast(), ga)]) }.unwrap();
}
