//! Checkpoints: a resumed run gives the same bits as one that never stopped (CPU and GPU, bytes
//! and files); every bad checkpoint is refused with a message saying why, and changes nothing.

mod common;

use common::Rng;
use samopt::{Backend, BaseOptimizer, Config, ErrorKind, Optimizer};

const SIZES: [usize; 3] = [5, 1000, 70_001];

fn config(backend: Backend) -> Config {
    Config { backend, base: BaseOptimizer::AdamW, lr: 0.01, max_grad_norm: Some(5.0), ..Config::default() }
}

/// An optimizer with the test's tensors (device tensors where the backend is the GPU) and a group.
fn build(backend: Backend) -> Option<Optimizer> {
    let mut opt = match Optimizer::new(config(backend)) {
        Ok(o) => o,
        Err(e) if e.kind() == ErrorKind::Device && std::env::var("SAMOPT_REQUIRE_GPU").as_deref() != Ok("1") => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "NOTICE: GPU checkpoint test skipped, no adapter ({e})");
            return None;
        }
        Err(e) => panic!("{e}"),
    };
    let mut rng = Rng::new(1);
    for &n in &SIZES {
        let w: Vec<f32> = (0..n).map(|_| rng.sym(1.0) as f32).collect();
        opt.add_tensor(&w).unwrap();
    }
    let g = opt.add_group(0.5, Some(0.0)).unwrap();
    opt.set_group(1, g).unwrap();
    Some(opt)
}

/// Steps `from..to` of a fixed run: gradients depend on the step only, the lr follows a schedule.
fn run(opt: &mut Optimizer, from: usize, to: usize) {
    for step in from..to {
        let mut rng = Rng::new(1000 + step as u64);
        opt.set_lr(0.01 / (1.0 + step as f64 * 0.1)).unwrap();
        for (id, &n) in SIZES.iter().enumerate() {
            let g: Vec<f32> = (0..n).map(|_| rng.sym(1.0) as f32).collect();
            opt.write_grad(id as u32, &g).unwrap();
        }
        opt.first_step().unwrap();
        for (id, &n) in SIZES.iter().enumerate() {
            let g: Vec<f32> = (0..n).map(|_| rng.sym(1.0) as f32).collect();
            opt.write_grad(id as u32, &g).unwrap();
        }
        opt.second_step().unwrap();
    }
}

fn weights(opt: &mut Optimizer) -> Vec<u32> {
    let mut out = Vec::new();
    for (id, &n) in SIZES.iter().enumerate() {
        let mut w = vec![0f32; n];
        opt.read_param(id as u32, &mut w).unwrap();
        out.extend(w.iter().map(|x| x.to_bits()));
    }
    out
}

fn save(opt: &mut Optimizer) -> Vec<u8> {
    let mut buf = vec![0u8; opt.state_size()];
    assert_eq!(opt.save_state(&mut buf).unwrap(), buf.len());
    buf
}

#[test]
fn resume_gives_the_same_bits() {
    for backend in [Backend::Cpu, Backend::Gpu] {
        let Some(mut straight) = build(backend) else { continue };
        run(&mut straight, 0, 30);

        let mut first = build(backend).unwrap();
        run(&mut first, 0, 15);
        let bytes = save(&mut first);
        let w15 = weights(&mut first);
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("ckpt-{backend:?}"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.samopt");
        first.save_state_file(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "file and buffer hold the same checkpoint");
        let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 1, "a temporary file was left behind: {leftovers:?}");
        drop(first);

        for from_file in [false, true] {
            // A new job: same configuration and registrations, weights from the host's own save.
            let mut resumed = build(backend).unwrap();
            for (id, chunk) in SIZES
                .iter()
                .scan(0, |at, &n| {
                    let r = *at..*at + n;
                    *at += n;
                    Some(r)
                })
                .enumerate()
            {
                let w: Vec<f32> = w15[chunk].iter().map(|&b| f32::from_bits(b)).collect();
                resumed.write_param(id as u32, &w).unwrap();
            }
            if from_file {
                resumed.load_state_file(&path).unwrap();
            } else {
                resumed.load_state(&bytes).unwrap();
            }
            assert_eq!(resumed.steps(), 15);
            run(&mut resumed, 15, 30);
            assert!(weights(&mut resumed) == weights(&mut straight), "{backend:?}: the resumed run diverged");
            assert_eq!(save(&mut resumed), save(&mut straight), "{backend:?}: the states differ");
        }
    }
}

/// A checkpoint written on the CPU resumes on the GPU (and the other way): the state is the same
/// format; the two engines then agree to rounding.
#[test]
fn checkpoints_move_between_backends() {
    let (Some(mut cpu), Some(mut gpu)) = (build(Backend::Cpu), build(Backend::Gpu)) else { return };
    run(&mut cpu, 0, 10);
    let bytes = save(&mut cpu);
    let w = weights(&mut cpu);
    let mut at = 0;
    for (id, &n) in SIZES.iter().enumerate() {
        let v: Vec<f32> = w[at..at + n].iter().map(|&b| f32::from_bits(b)).collect();
        gpu.write_param(id as u32, &v).unwrap();
        at += n;
    }
    gpu.load_state(&bytes).unwrap();
    assert_eq!(save(&mut gpu), bytes, "the GPU holds exactly the CPU's state");
    run(&mut cpu, 10, 20);
    run(&mut gpu, 10, 20);
    for (a, b) in weights(&mut cpu).iter().zip(weights(&mut gpu)) {
        let (a, b) = (f32::from_bits(*a), f32::from_bits(b));
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "cpu {a} gpu {b}");
    }
}

#[test]
fn bad_checkpoints_are_refused_and_change_nothing() {
    let mut opt = build(Backend::Cpu).unwrap();
    run(&mut opt, 0, 3);
    let good = save(&mut opt);
    let before = (save(&mut opt), weights(&mut opt));

    let mut truncated = good.clone();
    truncated.truncate(good.len() - 100);
    let mut corrupted = good.clone();
    corrupted[good.len() / 2] ^= 0x10;
    let mut version = good.clone();
    version[8] = 9;
    let mut magic = good.clone();
    magic[0] = b'x';

    let mut other_config = Optimizer::new(Config { beta1: 0.8, ..config(Backend::Cpu) }).unwrap();
    let mut other_layout = Optimizer::new(config(Backend::Cpu)).unwrap();
    for (opt, middle) in [(&mut other_config, 1000), (&mut other_layout, 999)] {
        opt.add_tensor(&[0f32; 5]).unwrap();
        opt.add_tensor(&vec![0f32; middle]).unwrap();
        opt.add_tensor(&vec![0f32; 70_001]).unwrap();
        let g = opt.add_group(0.5, Some(0.0)).unwrap();
        opt.set_group(1, g).unwrap();
    }
    let from_other_config = save(&mut other_config);
    let from_other_layout = save(&mut other_layout);

    for (bytes, needle) in [
        (&truncated, "truncated"),
        (&good[..20].to_vec(), "truncated"),
        (&corrupted, "corrupted"),
        (&version, "version 9"),
        (&magic, "not a samopt checkpoint"),
        (&from_other_config, "another configuration"),
        (&from_other_layout, "tensor 1 is 999 elements"),
    ] {
        let e = opt.load_state(bytes).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{}", e.message());
        assert!(e.message().contains(needle), "{:?} should say {needle:?}", e.message());
        assert_eq!((save(&mut opt), weights(&mut opt)), before, "a refused load changed the optimizer");
    }
    let e = opt.load_state_file(std::path::Path::new("/nonexistent/state")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(e.message().contains("/nonexistent/state"));

    // Between the two steps, neither saving nor loading.
    opt.first_step().unwrap();
    let mut buf = vec![0u8; opt.state_size()];
    assert_eq!(opt.save_state(&mut buf).unwrap_err().kind(), ErrorKind::InvalidState);
    assert_eq!(opt.load_state(&good).unwrap_err().kind(), ErrorKind::InvalidState);
    opt.second_step().unwrap();
    let mut small = vec![0u8; 10];
    let e = opt.save_state(&mut small).unwrap_err();
    assert!(e.message().contains("len = 10"), "{}", e.message());
}
