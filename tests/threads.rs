//! Threads: one handle called from many threads at once is serialised (no data race, no
//! deadlock, every status sensible, the weights restored exactly in the end); separate handles run
//! in parallel and give the bits a single thread gives.

mod common;

use std::sync::Arc;

use common::*;
use samopt::capi::*;

/// Raw pointers cross threads in this test only as the host's promise they stay valid.
#[derive(Clone, Copy)]
struct Handle(*mut SamOptimizer);
// SAFETY: the C API documents handles as usable from any thread.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

#[test]
fn one_handle_many_threads() {
    let mut rng = Rng::new(4);
    let mut tensors: Vec<Tensor> = [3usize, 40_000].iter().map(|&n| Tensor::random(Ty::F32, n, &mut rng)).collect();
    let before: Vec<Vec<u8>> = tensors.iter().map(|t| t.param.bytes().to_vec()).collect();
    let opt = create(&SamConfig { num_threads: 2, ..SamConfig::default() });
    register_all(opt, &mut tensors);
    let h = Arc::new(Handle(opt));
    let workers: Vec<_> = (0..4)
        .map(|k| {
            let h = h.clone();
            std::thread::spawn(move || {
                let mut counts = [0u32; 3];
                for i in 0..200 {
                    // SAFETY: the handle lives until every thread has joined.
                    let s = unsafe {
                        match (k + i) % 4 {
                            0 | 1 => sam_first_step(h.0),
                            2 => sam_second_step(h.0),
                            _ => {
                                let mut n = 0.0;
                                sam_grad_norm(h.0, &mut n)
                            }
                        }
                    };
                    match s {
                        SamStatus::SAM_OK => counts[0] += 1,
                        SamStatus::SAM_ERR_INVALID_STATE => counts[1] += 1,
                        other => panic!("thread {k}: unexpected {other:?}: {}", last_error()),
                    }
                    counts[2] += 1;
                }
                counts
            })
        })
        .collect();
    let totals = workers
        .into_iter()
        .map(|w| w.join().expect("no thread panicked"))
        .fold([0; 3], |a, c| [a[0] + c[0], a[1] + c[1], a[2] + c[2]]);
    assert_eq!(totals[2], 800);
    assert!(totals[0] > 0 && totals[1] > 0, "{totals:?}: both outcomes should occur when threads interleave");
    // SAFETY: all threads joined; the handle is live.
    unsafe {
        let mut perturbed = false;
        sam_is_perturbed(opt, &mut perturbed);
        if perturbed {
            assert_eq!(sam_second_step(opt), SamStatus::SAM_OK);
        }
        sam_destroy(opt);
    }
    // Without a base optimizer every completed step restores w: the bits are the originals.
    for (t, b) in tensors.iter().zip(&before) {
        assert_eq!(t.param.bytes(), &b[..]);
    }
}

/// Four handles stepping in parallel with SGD give the same bits as the same work done on one
/// thread.
#[test]
fn separate_handles_in_parallel() {
    fn work(seed: u64) -> Vec<u8> {
        let mut rng = Rng::new(seed);
        let mut tensors: Vec<Tensor> =
            [17usize, 100_000].iter().map(|&n| Tensor::random(Ty::BF16, n, &mut rng)).collect();
        let opt =
            create(&SamConfig { base: SAM_BASE_SGD, lr: 0.1, momentum: 0.9, num_threads: 1, ..SamConfig::default() });
        register_all(opt, &mut tensors);
        for _ in 0..20 {
            for t in tensors.iter_mut() {
                for i in 0..t.grad.len {
                    t.grad.set(i, rng.sym(1.0));
                }
            }
            // SAFETY: live handle, buffers outlive it.
            unsafe {
                assert_eq!(sam_first_step(opt), SamStatus::SAM_OK);
                assert_eq!(sam_second_step(opt), SamStatus::SAM_OK);
            }
        }
        // SAFETY: live handle, destroyed once.
        unsafe { sam_destroy(opt) };
        tensors.iter().flat_map(|t| t.param.bytes().to_vec()).collect()
    }
    let sequential: Vec<Vec<u8>> = (0..4).map(work).collect();
    let parallel: Vec<Vec<u8>> = (0..4)
        .map(|s| std::thread::spawn(move || work(s)))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert!(sequential == parallel, "parallel handles changed the results");
}
