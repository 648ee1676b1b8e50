//! Finding 12 of the outside review: handles share one CPU worker pool, and a handle's own pool
//! is joined when it is destroyed. Alone in its binary, so that no other test's threads come and
//! go while it counts the process's threads.

use samopt::{Backend, Config, ErrorKind, Optimizer};

fn cpu(config: Config) -> Optimizer {
    Optimizer::new(Config { backend: Backend::Cpu, ..config }).unwrap()
}

fn process_threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("Threads:")).unwrap().trim().parse().unwrap()
}

/// Handles share one CPU worker pool by default (before: each started a thread per core, so a
/// fuzzer or a test suite creating many handles spent its time starting threads); `threads` is
/// bounded; a handle with its own pool leaves no thread behind when it is dropped.
#[test]
fn finding_12_handles_share_one_worker_pool() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let step = |opt: &mut Optimizer| {
        let id = opt.add_tensor(&[1.0f32; 8]).unwrap();
        opt.write_grad(id, &[0.5f32; 8]).unwrap();
        opt.first_step().unwrap();
    };
    let before = process_threads();
    let handles: Vec<Optimizer> = (0..32)
        .map(|_| {
            let mut opt = cpu(Config::default());
            step(&mut opt);
            opt
        })
        .collect();
    let grown = process_threads() - before;
    assert!(grown <= cores, "32 handles started {grown} threads on {cores} cores");
    drop(handles);

    let e = Optimizer::new(Config { threads: 100_000, ..Config::default() }).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.message().contains("threads = 100000"), "{}", e.message());

    // A handle's own workers end with it, every time (none accumulate). The kernel may still
    // count a thread for a moment after it was joined, so the count is read until it settles (2 s
    // at most); that the drop joins them before returning is by construction (samopt spawns them
    // and keeps their handles), which a thread count cannot time.
    let settles_at = |want: usize| {
        (0..200).any(|_| {
            let now = process_threads() == want;
            if !now {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            now
        })
    };
    let before = process_threads();
    for _ in 0..5 {
        let mut own = cpu(Config { threads: 3, ..Config::default() });
        step(&mut own);
        assert_eq!(process_threads(), before + 3);
        drop(own);
        assert!(settles_at(before), "a dropped handle's own workers are still running: {}", process_threads());
    }

    // A handle with its own pool gives the same bits as the shared one.
    let run = |threads: usize| {
        let mut opt = cpu(Config { threads, ..Config::default() });
        let id = opt.add_tensor(&vec![1.0f32; 300_000]).unwrap();
        opt.write_grad(id, &(0..300_000).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<_>>()).unwrap();
        opt.first_step().unwrap();
        opt.param::<f32>(id).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    };
    assert!(run(0) == run(3));
}
