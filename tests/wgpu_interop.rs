//! A Rust engine on wgpu hands the optimizer its own device, queue and buffers: the passes run on
//! those buffers in place. Checked against the CPU engine over several steps with a built-in base
//! optimizer, read back through the host's own staging buffer; every variant and dtype the same as on
//! the CPU engine; bad registrations refused.

mod common;

use common::Rng;
use samopt::{Backend, BaseOptimizer, Config, DType, ErrorKind, Norm, Optimizer};

struct Host {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
}

/// The host's own device, as a wgpu engine would have it (None, with a notice, without one).
fn host() -> Option<Host> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = match pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default())) {
        Ok(a) => a,
        Err(e) if std::env::var("SAMOPT_REQUIRE_GPU").as_deref() != Ok("1") => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "NOTICE: wgpu interop test skipped, no adapter ({e})");
            return None;
        }
        Err(e) => panic!("no adapter: {e}"),
    };
    let info = adapter.get_info();
    let (device, queue) = pollster::block_on(
        adapter.request_device(&wgpu::DeviceDescriptor { required_limits: adapter.limits(), ..Default::default() }),
    )
    .unwrap();
    Some(Host { device, queue, info })
}

fn read(host: &Host, buffer: &wgpu::Buffer, offset: u64, n: usize) -> Vec<f32> {
    read_as(host, buffer, offset, n)
}

/// The host's parameter and gradient buffers of `size` bytes, usable by samopt and copyable.
fn param_and_grad_buffers(host: &Host, size: u64) -> (wgpu::Buffer, wgpu::Buffer) {
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let make = |label| {
        host.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: false,
        })
    };
    (make("host params"), make("host grads"))
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn passes_run_in_the_hosts_buffers() {
    let Some(host) = host() else { return };
    let align = host.device.limits().min_storage_buffer_offset_alignment as u64;
    let config = Config { base: BaseOptimizer::Sgd, lr: 0.1, momentum: 0.9, rho: 0.1, ..Config::default() };
    let mut sam =
        Optimizer::on_wgpu_device(host.device.clone(), host.queue.clone(), Some(host.info.clone()), config.clone())
            .unwrap();
    let mut cpu = Optimizer::new(Config { backend: Backend::Cpu, ..config }).unwrap();

    // Two tensors in one parameter buffer (the second at an aligned offset), gradients in another.
    let lens = [1024usize, 4096];
    let offsets = [0u64, (1024 * 4u64).div_ceil(align) * align];
    let size = offsets[1] + 4096 * 4 + 64;
    let (params, grads) = param_and_grad_buffers(&host, size);
    // A sentinel just past the second tensor: samopt must never write it.
    host.queue.write_buffer(&params, offsets[1] + 4096 * 4, &bytes(&[7.0; 16]));
    let mut rng = Rng::new(3);
    for (k, &n) in lens.iter().enumerate() {
        let w: Vec<f32> = (0..n).map(|_| rng.sym(1.0) as f32).collect();
        host.queue.write_buffer(&params, offsets[k], &bytes(&w));
        sam.register_wgpu(&params, offsets[k], &grads, offsets[k], n, DType::F32).unwrap();
        cpu.add_tensor(&w).unwrap();
    }
    assert_eq!(sam.backend(), Backend::Gpu);
    for step in 0..5 {
        for pass in 0..2 {
            for (k, &n) in lens.iter().enumerate() {
                let g: Vec<f32> =
                    (0..n).map(|i| ((i + 31 * k + 7 * step + 3 * pass) as f32 * 0.37).sin() * 0.1).collect();
                host.queue.write_buffer(&grads, offsets[k], &bytes(&g));
                cpu.write_grad(k as u32, &g).unwrap();
            }
            if pass == 0 {
                sam.first_step().unwrap();
                cpu.first_step().unwrap();
                // Between the steps the host's own buffer holds w + e(w).
                let perturbed = read(&host, &params, offsets[0], lens[0]);
                let mut want = vec![0f32; lens[0]];
                cpu.read_param(0, &mut want).unwrap();
                for (a, b) in perturbed.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "step {step}: perturbed {a} vs {b}");
                }
            } else {
                sam.second_step().unwrap();
                cpu.second_step().unwrap();
            }
        }
    }
    for (k, &n) in lens.iter().enumerate() {
        let got = read(&host, &params, offsets[k], n);
        let mut want = vec![0f32; n];
        cpu.read_param(k as u32, &mut want).unwrap();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1e-2), "tensor {k}[{i}]: device {a} vs cpu {b}");
        }
    }
    assert_eq!(read(&host, &params, offsets[1] + 4096 * 4, 16), vec![7.0; 16], "samopt wrote past a tensor");
    // The host's objects outlive the optimizer.
    drop(sam);
    assert_eq!(read(&host, &params, offsets[1] + 4096 * 4, 1), vec![7.0]);
}

#[test]
fn bad_registrations_are_refused() {
    let Some(host) = host() else { return };
    let align = host.device.limits().min_storage_buffer_offset_alignment as u64;
    let mut sam = Optimizer::on_wgpu_device(host.device.clone(), host.queue.clone(), None, Config::default()).unwrap();
    let make = |size, usage| {
        host.device.create_buffer(&wgpu::BufferDescriptor { label: None, size, usage, mapped_at_creation: false })
    };
    let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
    let (a, b) = (make(4096, storage), make(4096, storage));
    let no_storage = make(4096, wgpu::BufferUsages::COPY_DST);
    for (result, needle) in [
        (sam.register_wgpu(&a, 4, &b, 0, 16, DType::F32), "param_offset = 4"),
        (sam.register_wgpu(&a, 0, &b, 0, 2048, DType::F32), "passes the end"),
        (sam.register_wgpu(&a, 0, &b, 0, 5, DType::F32), "multiple of 16 bytes"),
        (sam.register_wgpu(&a, 0, &no_storage, 0, 16, DType::F32), "STORAGE"),
        (sam.register_wgpu(&a, 0, &a, 0, 16, DType::F32), "overlap"),
        (sam.register_wgpu(&a, 0, &b, 0, 0, DType::F32), "len = 0"),
    ] {
        let e = result.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{}", e.message());
        assert!(e.message().contains(needle), "{:?} should say {needle:?}", e.message());
    }
    assert_eq!(sam.tensor_count(), 0);
    sam.register_wgpu(&a, 0, &b, 0, 16, DType::F32).unwrap();
    let e = sam.register_wgpu(&a, 0, &b, align, 16, DType::F32).unwrap_err();
    assert!(e.message().contains("tensor 0"), "{}", e.message());
    // A plain optimizer has no device for them.
    let mut plain = Optimizer::new(Config { backend: Backend::Cpu, ..Config::default() }).unwrap();
    plain.add_tensor(&[0f32]).unwrap();
    assert_eq!(plain.register_wgpu(&a, 0, &b, 0, 16, DType::F32).unwrap_err().kind(), ErrorKind::Unsupported);
}

/// The host's buffer read back through its own staging buffer, as `T`s.
fn read_as<T: samopt::Element>(host: &Host, buffer: &wgpu::Buffer, offset: u64, n: usize) -> Vec<T> {
    let size = (n * std::mem::size_of::<T>()) as u64;
    let staging = host.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("host readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = host.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
    host.queue.submit([enc.finish()]);
    staging.map_async(wgpu::MapMode::Read, .., |r| r.unwrap());
    host.device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    let mut out = vec![T::zeroed(); n];
    bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&staging.get_mapped_range(..).unwrap());
    staging.unmap();
    out
}

/// One variant on one dtype: the same steps on the host's buffers and on the CPU engine; the
/// largest difference of the perturbed and of the final weights, in units of the dtype's rounding
/// relative to max(|w|, 1). The CPU engine is the one checked against float64 in cpu_step.rs and
/// base_optimizer.rs; this shows the imported buffers take the same road as samopt's own tensors.
fn variant_on_imported_buffers<T: samopt::Element>(host: &Host, config: &Config) -> f64 {
    let n = 3000; // 12000 or 6000 bytes: a multiple of 16 in every dtype
    let mut sam = Optimizer::on_wgpu_device(host.device.clone(), host.queue.clone(), None, config.clone()).unwrap();
    let mut cpu = Optimizer::new(Config { backend: Backend::Cpu, ..config.clone() }).unwrap();
    let size = (n * std::mem::size_of::<T>()) as u64;
    let (params, grads) = param_and_grad_buffers(host, size);
    let narrow = |v: Vec<f32>| {
        let mut out = vec![T::zeroed(); v.len()];
        T::narrow(&v, &mut out);
        out
    };
    let widen = |v: &[T]| {
        let mut out = vec![0f32; v.len()];
        T::widen(v, &mut out);
        out
    };
    let unit = match T::DTYPE {
        DType::F32 => f32::EPSILON as f64 / 2.0,
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
    };
    let roundings = |got: &[f32], want: &[f32]| {
        got.iter().zip(want).map(|(a, b)| (a - b).abs() as f64 / (b.abs() as f64).max(1.0) / unit).fold(0.0, f64::max)
    };
    let mut rng = Rng::new(11);
    let w = narrow((0..n).map(|_| rng.sym(1.0) as f32).collect());
    host.queue.write_buffer(&params, 0, bytemuck::cast_slice(&w));
    sam.register_wgpu(&params, 0, &grads, 0, n, T::DTYPE).unwrap();
    cpu.add_tensor(&w).unwrap();
    let mut worst = 0f64;
    let mut want = vec![T::zeroed(); n];
    for step in 0..4 {
        for pass in 0..2 {
            let g = narrow((0..n).map(|i| ((i * 7 + 13 * step + 5 * pass) as f32 * 0.11).sin() * 0.2).collect());
            host.queue.write_buffer(&grads, 0, bytemuck::cast_slice(&g));
            cpu.write_grad(0, &g).unwrap();
            let before = widen(&read_as::<T>(host, &params, 0, n));
            if pass == 0 {
                sam.first_step().unwrap();
                cpu.first_step().unwrap();
            } else {
                sam.second_step().unwrap();
                cpu.second_step().unwrap();
            }
            let got = widen(&read_as::<T>(host, &params, 0, n));
            cpu.read_param(0, &mut want).unwrap();
            worst = worst.max(roundings(&got, &widen(&want)));
            if pass == 0 {
                let moved = got.iter().zip(&before).filter(|(a, b)| a != b).count();
                assert!(moved > n / 5, "{config:?} on {:?}: the ascent moved {moved} of {n} weights", T::DTYPE);
            }
        }
    }
    worst
}

#[test]
fn every_variant_and_dtype_on_imported_buffers() {
    let Some(host) = host() else { return };
    let variants = [
        ("SAM, host's optimizer", Config { rho: 0.05, ..Config::default() }),
        ("ASAM eta 0.01", Config { adaptive: true, rho: 0.5, eta: 0.01, ..Config::default() }),
        ("sign perturbation", Config { norm: Norm::LInf, rho: 0.01, ..Config::default() }),
        (
            "SGD nesterov + L2",
            Config {
                base: BaseOptimizer::Sgd,
                lr: 0.1,
                momentum: 0.9,
                nesterov: true,
                weight_decay: Some(1e-3),
                ..Config::default()
            },
        ),
        (
            "AdamW, clipped",
            Config {
                base: BaseOptimizer::AdamW,
                lr: 1e-2,
                weight_decay: Some(0.01),
                max_grad_norm: Some(0.5),
                ..Config::default()
            },
        ),
        ("GSAM + SGD", Config { base: BaseOptimizer::Sgd, lr: 0.1, gsam_alpha: Some(0.3), ..Config::default() }),
    ];
    let mut worst = 0f64;
    for (name, config) in &variants {
        for (dtype, ulps) in [
            ("f32", variant_on_imported_buffers::<f32>(&host, config)),
            ("f16", variant_on_imported_buffers::<half::f16>(&host, config)),
            ("bf16", variant_on_imported_buffers::<half::bf16>(&host, config)),
        ] {
            // Within a few roundings over 4 steps: the GPU sums the norm in f32 partials, the CPU in f64.
            assert!(ulps <= 4.0, "{name} on {dtype}: {ulps:.1} roundings from the CPU engine");
            worst = worst.max(ulps);
        }
    }
    eprintln!("every variant on imported buffers: at most {worst:.1} roundings from the CPU engine");
}

/// Finding 14: a parameter and its gradient at disjoint ranges of one buffer, as a framework's
/// memory pool places them, run like separate buffers (before: registration succeeded and the
/// first step failed with a wgpu validation error, the buffer bound read-only and read-write in
/// one dispatch). Checked against float64: the perturbation and an SGD step.
#[test]
fn finding_14_param_and_grad_in_one_buffer() {
    let Some(host) = host() else { return };
    let align = host.device.limits().min_storage_buffer_offset_alignment as u64;
    let (rho, lr) = (0.1, 0.5);
    let config = Config { base: BaseOptimizer::Sgd, lr, rho, ..Config::default() };
    let mut sam =
        Optimizer::on_wgpu_device(host.device.clone(), host.queue.clone(), Some(host.info.clone()), config).unwrap();
    const N: usize = 1000;
    let grad_offset = (N as u64 * 4).div_ceil(align) * align;
    let (pool, _) = param_and_grad_buffers(&host, grad_offset + N as u64 * 4);
    let mut rng = Rng::new(14);
    let w: Vec<f32> = (0..N).map(|_| rng.sym(1.0) as f32).collect();
    let g: Vec<f32> = (0..N).map(|_| rng.sym(1.0) as f32).collect();
    host.queue.write_buffer(&pool, 0, &bytes(&w));
    host.queue.write_buffer(&pool, grad_offset, &bytes(&g));
    sam.register_wgpu(&pool, 0, &pool, grad_offset, N, DType::F32).unwrap();
    // Overlapping ranges of the one buffer are still refused.
    assert!(sam.register_wgpu(&pool, 0, &pool, 64, 16, DType::F32).is_err());
    sam.first_step().unwrap();
    let norm = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let perturbed = read(&host, &pool, 0, N);
    for i in 0..N {
        let want = w[i] as f64 + rho * g[i] as f64 / norm;
        assert!((perturbed[i] as f64 - want).abs() <= 1e-6, "perturbed {i}: {} vs {want}", perturbed[i]);
    }
    assert_eq!(read(&host, &pool, grad_offset, N), g, "the gradient was written");
    let g2: Vec<f32> = g.iter().map(|x| x * 0.5 + 0.25).collect();
    host.queue.write_buffer(&pool, grad_offset, &bytes(&g2));
    sam.second_step().unwrap();
    let stepped = read(&host, &pool, 0, N);
    for i in 0..N {
        let want = w[i] as f64 - lr * g2[i] as f64;
        assert!((stepped[i] as f64 - want).abs() <= 1e-6, "stepped {i}: {} vs {want}", stepped[i]);
    }
}

/// `rebind_wgpu`: a run that moves its tensor to freshly allocated device buffers before every step
/// (the weights copied over by the host) ends with the same weights and the same optimizer state,
/// bit for bit, as a run that never moves; a bad rebind changes nothing.
#[test]
fn rebinding_device_buffers_keeps_the_state() {
    let Some(host) = host() else { return };
    let config = Config { base: BaseOptimizer::AdamW, lr: 0.01, master_weights: false, ..Config::default() };
    let n = 4096usize;
    let mut rng = Rng::new(41);
    let w0: Vec<f32> = (0..n).map(|_| rng.sym(1.0) as f32).collect();
    let grads: Vec<(Vec<f32>, Vec<f32>)> = (0..6)
        .map(|_| ((0..n).map(|_| rng.sym(0.5) as f32).collect(), (0..n).map(|_| rng.sym(0.5) as f32).collect()))
        .collect();
    let run = |moving: bool| {
        let mut sam =
            Optimizer::on_wgpu_device(host.device.clone(), host.queue.clone(), Some(host.info.clone()), config.clone())
                .unwrap();
        let (mut p, mut g) = param_and_grad_buffers(&host, n as u64 * 4);
        host.queue.write_buffer(&p, 0, &bytes(&w0));
        let id = sam.register_wgpu(&p, 0, &g, 0, n, DType::F32).unwrap();
        for (g1, g2) in &grads {
            if moving {
                let (p2, g2buf) = param_and_grad_buffers(&host, n as u64 * 4);
                let mut enc = host.device.create_command_encoder(&Default::default());
                enc.copy_buffer_to_buffer(&p, 0, &p2, 0, n as u64 * 4);
                host.queue.submit([enc.finish()]);
                sam.rebind_wgpu(id, &p2, 0, &g2buf, 0).unwrap();
                (p, g) = (p2, g2buf);
            }
            host.queue.write_buffer(&g, 0, &bytes(g1));
            sam.first_step().unwrap();
            host.queue.write_buffer(&g, 0, &bytes(g2));
            sam.second_step().unwrap();
        }
        let mut state = vec![0u8; sam.state_size()];
        sam.save_state(&mut state).unwrap();
        // Refused: another tensor's range, and a buffer too small; nothing changes.
        let (small, _) = param_and_grad_buffers(&host, 64);
        assert_eq!(sam.rebind_wgpu(id, &small, 0, &g, 0).unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert_eq!(sam.rebind_wgpu(id + 1, &p, 0, &g, 0).unwrap_err().kind(), ErrorKind::InvalidArgument);
        let mut again = vec![0u8; sam.state_size()];
        sam.save_state(&mut again).unwrap();
        assert!(again == state);
        (read(&host, &p, 0, n), state)
    };
    let (still, moved) = (run(false), run(true));
    assert!(still.0 == moved.0, "the weights differ after rebinding");
    assert!(still.1 == moved.1, "the optimizer state differs after rebinding");
}

/// `rebind_wgpu_grads`: a host whose backward writes each gradient into a fresh buffer (Burn's
/// autodiff) points samopt at it before each step, the second step included. Two tensors whose
/// gradient ranges trade places between steps (an allocator handing one tensor's old slot to
/// the other) are refused one at a time and accepted together. The weights follow SAM with SGD in
/// float64; a refused rebind changes nothing.
#[test]
fn fresh_gradient_buffers_between_the_steps() {
    let Some(host) = host() else { return };
    let (lr, rho) = (0.1f64, 0.05f64);
    let config = Config { base: BaseOptimizer::Sgd, lr, rho, ..Config::default() };
    let mut sam =
        Optimizer::on_wgpu_device(host.device.clone(), host.queue.clone(), Some(host.info.clone()), config).unwrap();
    let n = 256usize;
    let align = host.device.limits().min_storage_buffer_offset_alignment as u64;
    let slot = (n as u64 * 4).div_ceil(align) * align;
    // One pool of four slots: two weights, then two gradient slots the tensors trade.
    let (pool, _) = param_and_grad_buffers(&host, 4 * slot);
    let mut rng = Rng::new(7);
    let mut w: Vec<Vec<f64>> = (0..2).map(|_| (0..n).map(|_| rng.sym(1.0) as f32 as f64).collect()).collect();
    for (k, wk) in w.iter().enumerate() {
        host.queue.write_buffer(&pool, k as u64 * slot, &bytes(&wk.iter().map(|&x| x as f32).collect::<Vec<_>>()));
    }
    let a = sam.register_wgpu(&pool, 0, &pool, 2 * slot, n, DType::F32).unwrap();
    let b = sam.register_wgpu(&pool, slot, &pool, 3 * slot, n, DType::F32).unwrap();
    for step in 0..4u64 {
        // Even steps: a's gradient in slot 2 and b's in slot 3; odd steps the other way round.
        let (ga, gb) = if step % 2 == 0 { (2 * slot, 3 * slot) } else { (3 * slot, 2 * slot) };
        if step > 0 {
            assert!(sam.rebind_wgpu_grads(&[(a, &pool, ga)]).is_err(), "a alone takes b's range");
            sam.rebind_wgpu_grads(&[(a, &pool, ga), (b, &pool, gb)]).unwrap();
        }
        let g: Vec<Vec<f32>> = (0..2).map(|_| (0..n).map(|_| rng.sym(0.5) as f32).collect()).collect();
        host.queue.write_buffer(&pool, ga, &bytes(&g[0]));
        host.queue.write_buffer(&pool, gb, &bytes(&g[1]));
        sam.first_step().unwrap();
        let norm = g.iter().flatten().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        // The gradient at the perturbed point arrives in other buffers: slot 2/3 swapped back.
        let g2: Vec<Vec<f32>> = (0..2).map(|_| (0..n).map(|_| rng.sym(0.5) as f32).collect()).collect();
        assert!(sam.rebind_wgpu(a, &pool, 0, &pool, gb).is_err(), "moving the weights is refused between the steps");
        sam.rebind_wgpu_grads(&[(a, &pool, gb), (b, &pool, ga)]).unwrap();
        host.queue.write_buffer(&pool, gb, &bytes(&g2[0]));
        host.queue.write_buffer(&pool, ga, &bytes(&g2[1]));
        for k in 0..2 {
            let perturbed = read(&host, &pool, k as u64 * slot, n);
            for i in 0..n {
                let want = w[k][i] + rho * g[k][i] as f64 / norm;
                assert!((perturbed[i] as f64 - want).abs() <= 1e-6, "step {step} perturbed {k}/{i}");
            }
        }
        sam.second_step().unwrap();
        for k in 0..2 {
            let stepped = read(&host, &pool, k as u64 * slot, n);
            for i in 0..n {
                w[k][i] -= lr * g2[k][i] as f64;
                assert!((stepped[i] as f64 - w[k][i]).abs() <= 1e-6, "step {step} stepped {k}/{i}");
                w[k][i] = stepped[i] as f64;
            }
        }
        // Back to the first gradient slots for the next step's check of the pair.
        sam.rebind_wgpu_grads(&[(a, &pool, ga), (b, &pool, gb)]).unwrap();
    }
    // Refused: an unknown id, the same id twice, a misaligned offset; nothing changes.
    assert!(sam.rebind_wgpu_grads(&[(b + 1, &pool, 2 * slot)]).is_err());
    assert!(sam.rebind_wgpu_grads(&[(a, &pool, 2 * slot), (a, &pool, 3 * slot)]).is_err());
    if align > 4 {
        assert!(sam.rebind_wgpu_grads(&[(a, &pool, 2 * slot + 4)]).is_err());
    }
}
