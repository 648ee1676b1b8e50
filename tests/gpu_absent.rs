//! Without any GPU adapter: `Backend::Gpu` is the device error, and AUTO puts optimizer-allocated
//! tensors on the CPU and says so, once per handle, through the `log` crate.
//!
//! One test in its own binary: it hides every Vulkan driver from wgpu through the environment
//! before wgpu first starts.

use std::sync::Mutex;

use samopt::{Backend, Config, ErrorKind, Optimizer};

static MESSAGES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.target().starts_with("samopt")
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            MESSAGES.lock().unwrap().push(format!("{} {}", r.level(), r.args()));
        }
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture;

#[test]
fn no_adapter() {
    // SAFETY: the only test of this binary, before any other thread reads the environment.
    unsafe {
        std::env::set_var("WGPU_BACKEND", "vulkan");
        std::env::set_var("VK_ICD_FILENAMES", "/nonexistent/icd.json");
        std::env::set_var("VK_DRIVER_FILES", "/nonexistent/icd.json");
    }
    log::set_logger(&CAPTURE).unwrap();
    log::set_max_level(log::LevelFilter::Debug);

    let e = Optimizer::new(Config { backend: Backend::Gpu, ..Config::default() }).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Device);
    assert!(e.message().contains("no GPU adapter"), "{}", e.message());

    for _ in 0..2 {
        let mut opt = Optimizer::new(Config::default()).unwrap();
        let id = opt.add_tensor(&[1.0f32, 2.0]).unwrap();
        assert_eq!(opt.backend(), Backend::Cpu);
        opt.write_grad(id, &[3.0f32, 4.0]).unwrap();
        opt.first_step().unwrap();
        let mut w = [0f32; 2];
        opt.read_param(id, &mut w).unwrap();
        assert_eq!(w, [1.0 + 0.05 * 0.6, 2.0 + 0.05 * 0.8]);
    }
    let messages = MESSAGES.lock().unwrap();
    let fallbacks: Vec<&String> = messages.iter().filter(|m| m.contains("AUTO runs on the CPU")).collect();
    // Once per handle (each handle decides its backend once), so a host sees it for every handle.
    assert_eq!(fallbacks.len(), 2, "{messages:?}");
    assert!(fallbacks[0].starts_with("WARN"), "{}", fallbacks[0]);
}
