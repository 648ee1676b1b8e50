//! The host plays a Vulkan engine with `ash`: it creates its instance and device with the
//! extensions samopt asks for, allocates host-visible buffers, fills them, and registers them
//! through the C ABI. Several SAM steps with a built-in base optimizer run in place; the host
//! reads the results through its own mapping and compares them with the CPU engine; then it
//! destroys the optimizer and, after it, its own objects. Under the Khronos validation layer when
//! it is installed (CI installs it and sets SAMOPT_REQUIRE_VALIDATION=1): zero validation errors.

mod common;

use std::ffi::{CStr, CString, c_void};
use std::sync::Mutex;

use ash::vk;
use ash::vk::Handle;
use samopt::capi::*;
use samopt::{Backend, BaseOptimizer, Config, Optimizer};

static VALIDATION: Mutex<Vec<String>> = Mutex::new(Vec::new());

unsafe extern "system" fn on_message(
    severity: vk::DebugUtilsMessageSeverityFlagsEXT,
    _kind: vk::DebugUtilsMessageTypeFlagsEXT,
    data: *const vk::DebugUtilsMessengerCallbackDataEXT<'_>,
    _user: *mut c_void,
) -> vk::Bool32 {
    if severity.contains(vk::DebugUtilsMessageSeverityFlagsEXT::ERROR) {
        // SAFETY: the layer passes a valid message.
        let text = unsafe { CStr::from_ptr((*data).p_message) }.to_string_lossy().into_owned();
        VALIDATION.lock().unwrap().push(text);
    }
    vk::FALSE
}

fn require(name: &str) -> bool {
    std::env::var(name).as_deref() == Ok("1")
}

fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "NOTICE: Vulkan interop test skipped: {why}");
}

#[test]
fn host_vulkan_buffers_in_place() {
    // SAFETY: loading the system's Vulkan loader.
    let entry = match unsafe { ash::Entry::load() } {
        Ok(e) => e,
        Err(e) if !require("SAMOPT_REQUIRE_GPU") => return skip(&format!("no Vulkan loader ({e})")),
        Err(e) => panic!("no Vulkan loader: {e}"),
    };
    // SAFETY: plain Vulkan calls on objects this test creates and destroys in order.
    unsafe {
        let layer = c"VK_LAYER_KHRONOS_validation";
        let has_layer = entry
            .enumerate_instance_layer_properties()
            .unwrap()
            .iter()
            .any(|l| CStr::from_ptr(l.layer_name.as_ptr()) == layer);
        if !has_layer && require("SAMOPT_REQUIRE_VALIDATION") {
            panic!("the Khronos validation layer is not installed (vulkan-validationlayers)");
        }
        let layers: Vec<*const i8> = if has_layer { vec![layer.as_ptr()] } else { vec![] };
        let instance_exts: Vec<*const i8> = if has_layer { vec![ash::ext::debug_utils::NAME.as_ptr()] } else { vec![] };
        let api_version = vk::make_api_version(0, 1, 3, 0);
        let app = vk::ApplicationInfo::default().api_version(api_version);
        let instance = entry
            .create_instance(
                &vk::InstanceCreateInfo::default()
                    .application_info(&app)
                    .enabled_layer_names(&layers)
                    .enabled_extension_names(&instance_exts),
                None,
            )
            .expect("vkCreateInstance");
        let debug = ash::ext::debug_utils::Instance::new(&entry, &instance);
        let messenger = has_layer.then(|| {
            debug
                .create_debug_utils_messenger(
                    &vk::DebugUtilsMessengerCreateInfoEXT::default()
                        .message_severity(
                            vk::DebugUtilsMessageSeverityFlagsEXT::ERROR
                                | vk::DebugUtilsMessageSeverityFlagsEXT::WARNING,
                        )
                        .message_type(
                            vk::DebugUtilsMessageTypeFlagsEXT::VALIDATION | vk::DebugUtilsMessageTypeFlagsEXT::GENERAL,
                        )
                        .pfn_user_callback(Some(on_message)),
                    None,
                )
                .unwrap()
        });
        let devices = instance.enumerate_physical_devices().unwrap();
        let Some(&phd) = devices.first() else {
            if require("SAMOPT_REQUIRE_GPU") {
                panic!("no Vulkan physical device");
            }
            instance.destroy_instance(None);
            return skip("no Vulkan physical device");
        };
        let family = instance
            .get_physical_device_queue_family_properties(phd)
            .iter()
            .position(|q| q.queue_flags.contains(vk::QueueFlags::COMPUTE))
            .expect("a compute queue") as u32;

        // Ask samopt which device extensions to enable.
        let inst_ext_names: Vec<CString> = instance_exts.iter().map(|&p| CStr::from_ptr(p).to_owned()).collect();
        let inst_ext_ptrs: Vec<*const i8> = inst_ext_names.iter().map(|c| c.as_ptr()).collect();
        let mut desc = SamVulkanDevice {
            struct_size: size_of::<SamVulkanDevice>(),
            // SAFETY: the same function, its result declared as a plain pointer.
            get_instance_proc_addr: Some(std::mem::transmute::<
                vk::PFN_vkGetInstanceProcAddr,
                unsafe extern "system" fn(*mut c_void, *const std::ffi::c_char) -> *const c_void,
            >(entry.static_fn().get_instance_proc_addr)),
            instance: instance.handle().as_raw() as *mut c_void,
            api_version,
            instance_extension_count: inst_ext_ptrs.len() as u32,
            instance_extensions: inst_ext_ptrs.as_ptr(),
            physical_device: phd.as_raw() as *mut c_void,
            device: std::ptr::null_mut(),
            device_extension_count: 0,
            device_extensions: std::ptr::null(),
            queue_family_index: family,
            queue_index: 0,
        };
        let mut count = 0usize;
        assert_eq!(
            sam_vulkan_required_extensions(&desc, std::ptr::null_mut(), 0, &mut count),
            SamStatus::SAM_OK,
            "{}",
            common::last_error()
        );
        let mut names = vec![std::ptr::null::<i8>(); count];
        assert_eq!(sam_vulkan_required_extensions(&desc, names.as_mut_ptr(), count, &mut count), SamStatus::SAM_OK);
        let priorities = [1.0f32];
        let queue_info =
            [vk::DeviceQueueCreateInfo::default().queue_family_index(family).queue_priorities(&priorities)];
        let device = instance
            .create_device(
                phd,
                &vk::DeviceCreateInfo::default().queue_create_infos(&queue_info).enabled_extension_names(&names),
                None,
            )
            .expect("vkCreateDevice");

        // Host-visible buffers: two tensors in one parameter buffer, gradients in another.
        let limits = instance.get_physical_device_properties(phd).limits;
        let align = limits.min_storage_buffer_offset_alignment.max(16);
        let lens = [1024usize, 2048];
        let offsets = [0u64, (1024 * 4u64).div_ceil(align) * align];
        let size = offsets[1] + 2048 * 4;
        let memory_props = instance.get_physical_device_memory_properties(phd);
        let make = |usage: vk::BufferUsageFlags| {
            let buffer = device.create_buffer(&vk::BufferCreateInfo::default().size(size).usage(usage), None).unwrap();
            let req = device.get_buffer_memory_requirements(buffer);
            let wanted = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
            let type_index = (0..memory_props.memory_type_count)
                .find(|&i| {
                    req.memory_type_bits & (1 << i) != 0
                        && memory_props.memory_types[i as usize].property_flags.contains(wanted)
                })
                .expect("host-visible memory");
            let memory = device
                .allocate_memory(
                    &vk::MemoryAllocateInfo::default().allocation_size(req.size).memory_type_index(type_index),
                    None,
                )
                .unwrap();
            device.bind_buffer_memory(buffer, memory, 0).unwrap();
            let ptr = device.map_memory(memory, 0, size, vk::MemoryMapFlags::empty()).unwrap().cast::<f32>();
            (buffer, memory, ptr)
        };
        let storage = vk::BufferUsageFlags::STORAGE_BUFFER
            | vk::BufferUsageFlags::TRANSFER_SRC
            | vk::BufferUsageFlags::TRANSFER_DST;
        let (pbuf, pmem, pptr) = make(storage);
        let (gbuf, gmem, gptr) = make(storage);
        // Finding 14: a third tensor's parameter and gradient in one VkBuffer, as a framework's
        // memory pool places them.
        let (sbuf, smem, sptr) = make(storage);
        const SHARED: usize = 512;
        let shared_grad = (SHARED as u64 * 4).div_ceil(align) * align;

        // samopt on the host's device, an SGD with momentum; the CPU engine on copies, as reference.
        let ext_ptrs: Vec<*const i8> = names.clone();
        desc.device = device.handle().as_raw() as *mut c_void;
        desc.device_extension_count = ext_ptrs.len() as u32;
        desc.device_extensions = ext_ptrs.as_ptr();
        let config = SamConfig { base: SAM_BASE_SGD, lr: 0.1, momentum: 0.9, rho: 0.1, ..SamConfig::default() };
        let mut opt = std::ptr::null_mut();
        // Bad descriptions: each refused with a message naming the field, no optimizer made.
        let too_few: Vec<*const i8> = ext_ptrs[..ext_ptrs.len().saturating_sub(1)].to_vec();
        let mut refused = vec![
            (SamVulkanDevice { struct_size: 8, ..desc }, SamStatus::SAM_ERR_INVALID_ARGUMENT, "struct_size = 8"),
            (
                SamVulkanDevice { get_instance_proc_addr: None, ..desc },
                SamStatus::SAM_ERR_NULL_POINTER,
                "get_instance_proc_addr",
            ),
            (
                SamVulkanDevice { instance: std::ptr::null_mut(), ..desc },
                SamStatus::SAM_ERR_NULL_POINTER,
                "device->instance",
            ),
            (
                SamVulkanDevice { device: std::ptr::null_mut(), ..desc },
                SamStatus::SAM_ERR_NULL_POINTER,
                "device->device",
            ),
            (
                SamVulkanDevice { queue_family_index: 99, ..desc },
                SamStatus::SAM_ERR_INVALID_ARGUMENT,
                "queue_family_index = 99",
            ),
            (SamVulkanDevice { queue_index: 1000, ..desc }, SamStatus::SAM_ERR_INVALID_ARGUMENT, "queue_index = 1000"),
        ];
        if !ext_ptrs.is_empty() {
            let mut missing = desc;
            missing.device_extension_count = too_few.len() as u32;
            missing.device_extensions = too_few.as_ptr();
            refused.push((missing, SamStatus::SAM_ERR_INVALID_ARGUMENT, "device_extensions lacks"));
        }
        eprintln!("samopt asks for {} device extensions; {} bad descriptions refused", ext_ptrs.len(), refused.len());
        for (bad, status, needle) in &refused {
            assert_eq!(sam_create_vulkan(bad, &config, &mut opt), *status, "{needle}: {}", common::last_error());
            assert!(common::last_error().contains(needle), "{:?} should say {needle:?}", common::last_error());
            assert!(opt.is_null());
        }
        assert_eq!(sam_create_vulkan(std::ptr::null(), &config, &mut opt), SamStatus::SAM_ERR_NULL_POINTER);
        assert_eq!(sam_create_vulkan(&desc, &config, &mut opt), SamStatus::SAM_OK, "{}", common::last_error());
        let mut cpu = Optimizer::new(Config {
            backend: Backend::Cpu,
            base: BaseOptimizer::Sgd,
            lr: 0.1,
            momentum: 0.9,
            rho: 0.1,
            ..Config::default()
        })
        .unwrap();
        let mut rng = common::Rng::new(9);
        for (k, &n) in lens.iter().enumerate() {
            let w: Vec<f32> = (0..n).map(|_| rng.sym(1.0) as f32).collect();
            std::ptr::copy_nonoverlapping(w.as_ptr(), pptr.add(offsets[k] as usize / 4), n);
            let mut id = 99;
            let s = sam_register_vulkan(
                opt,
                pbuf.as_raw(),
                offsets[k],
                gbuf.as_raw(),
                offsets[k],
                n,
                SAM_DTYPE_F32,
                &mut id,
            );
            assert_eq!(s, SamStatus::SAM_OK, "{}", common::last_error());
            assert_eq!(id, k as u32);
            cpu.add_tensor(&w).unwrap();
        }
        // Bad registrations: a buffer too small for the range, a null handle, a misaligned offset.
        let mut id = 0;
        assert_eq!(
            sam_register_vulkan(opt, pbuf.as_raw(), size, gbuf.as_raw(), 0, 1024, SAM_DTYPE_F32, &mut id),
            SamStatus::SAM_ERR_INVALID_ARGUMENT
        );
        assert!(common::last_error().contains("passes the end"), "{}", common::last_error());
        assert_eq!(
            sam_register_vulkan(opt, 0, 0, gbuf.as_raw(), 0, 16, SAM_DTYPE_F32, &mut id),
            SamStatus::SAM_ERR_NULL_POINTER
        );
        if align > 4 {
            assert_eq!(
                sam_register_vulkan(opt, pbuf.as_raw(), 4, gbuf.as_raw(), 0, 16, SAM_DTYPE_F32, &mut id),
                SamStatus::SAM_ERR_INVALID_ARGUMENT
            );
        }
        // A range of a VkBuffer registered before, registered again: refused (two wgpu wrappers
        // of one VkBuffer are not comparable, samopt checks the handles' ranges itself).
        assert_eq!(
            sam_register_vulkan(opt, pbuf.as_raw(), 0, gbuf.as_raw(), offsets[1], 16, SAM_DTYPE_F32, &mut id),
            SamStatus::SAM_ERR_INVALID_ARGUMENT
        );
        assert!(common::last_error().contains("registered before"), "{}", common::last_error());
        let w: Vec<f32> = (0..SHARED).map(|_| rng.sym(1.0) as f32).collect();
        std::ptr::copy_nonoverlapping(w.as_ptr(), sptr, SHARED);
        let s = sam_register_vulkan(opt, sbuf.as_raw(), 0, sbuf.as_raw(), shared_grad, SHARED, SAM_DTYPE_F32, &mut id);
        assert_eq!(s, SamStatus::SAM_OK, "{}", common::last_error());
        assert_eq!(cpu.add_tensor(&w).unwrap(), id);
        let mut count_now = 0;
        sam_tensor_count(opt, &mut count_now);
        assert_eq!(count_now, 3);

        for step in 0..4 {
            for pass in 0..2 {
                for (k, &n) in lens.iter().enumerate() {
                    let g: Vec<f32> =
                        (0..n).map(|i| ((i + 13 * k + 5 * step + 2 * pass) as f32 * 0.21).cos() * 0.1).collect();
                    std::ptr::copy_nonoverlapping(g.as_ptr(), gptr.add(offsets[k] as usize / 4), n);
                    cpu.write_grad(k as u32, &g).unwrap();
                }
                let g: Vec<f32> = (0..SHARED).map(|i| ((i + 7 * step + 3 * pass) as f32 * 0.13).sin() * 0.2).collect();
                std::ptr::copy_nonoverlapping(g.as_ptr(), sptr.add(shared_grad as usize / 4), SHARED);
                cpu.write_grad(2, &g).unwrap();
                if pass == 0 {
                    assert_eq!(sam_first_step(opt), SamStatus::SAM_OK, "{}", common::last_error());
                    cpu.first_step().unwrap();
                } else {
                    assert_eq!(sam_second_step(opt), SamStatus::SAM_OK, "{}", common::last_error());
                    cpu.second_step().unwrap();
                }
                // The host reads its own memory: done when samopt's call returned.
                for (k, &n) in lens.iter().enumerate() {
                    let got = std::slice::from_raw_parts(pptr.add(offsets[k] as usize / 4), n);
                    let mut want = vec![0f32; n];
                    cpu.read_param(k as u32, &mut want).unwrap();
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 * b.abs().max(1e-2),
                            "step {step} pass {pass} tensor {k}[{i}]: {a} vs {b}"
                        );
                    }
                }
                let got = std::slice::from_raw_parts(sptr, SHARED);
                let mut want = vec![0f32; SHARED];
                cpu.read_param(2, &mut want).unwrap();
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1e-2),
                        "step {step} pass {pass} shared[{i}]: {a} vs {b}"
                    );
                }
            }
        }
        // sam_rebind_vulkan: tensor 0 moves to new VkBuffers (its weights copied over by the
        // host) and training goes on with its momentum, as the CPU reference's does.
        let (pbuf2, pmem2, pptr2) = make(storage);
        let (gbuf2, gmem2, gptr2) = make(storage);
        let n0 = lens[0];
        std::ptr::copy_nonoverlapping(pptr.add(offsets[0] as usize / 4), pptr2, n0);
        let mut id_count = 0;
        sam_tensor_count(opt, &mut id_count);
        assert_eq!(
            sam_rebind_vulkan(opt, 0, pbuf.as_raw(), offsets[1], gbuf2.as_raw(), 0),
            SamStatus::SAM_ERR_INVALID_ARGUMENT,
            "onto tensor 1's range"
        );
        assert!(common::last_error().contains("overlap"), "{}", common::last_error());
        assert_eq!(
            sam_rebind_vulkan(opt, 7, pbuf2.as_raw(), 0, gbuf2.as_raw(), 0),
            SamStatus::SAM_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            sam_rebind_vulkan(opt, 0, pbuf2.as_raw(), 0, gbuf2.as_raw(), 0),
            SamStatus::SAM_OK,
            "{}",
            common::last_error()
        );
        for step in 4..6 {
            for pass in 0..2 {
                let g: Vec<f32> = (0..n0).map(|i| ((i + 5 * step + 2 * pass) as f32 * 0.17).cos() * 0.1).collect();
                std::ptr::copy_nonoverlapping(g.as_ptr(), gptr2, n0);
                cpu.write_grad(0, &g).unwrap();
                for (k, &n) in lens.iter().enumerate().skip(1) {
                    let g: Vec<f32> = (0..n).map(|i| ((i + k + step + pass) as f32 * 0.3).sin() * 0.1).collect();
                    std::ptr::copy_nonoverlapping(g.as_ptr(), gptr.add(offsets[k] as usize / 4), n);
                    cpu.write_grad(k as u32, &g).unwrap();
                }
                let g = vec![0.01f32; SHARED];
                std::ptr::copy_nonoverlapping(g.as_ptr(), sptr.add(shared_grad as usize / 4), SHARED);
                cpu.write_grad(2, &g).unwrap();
                if pass == 0 {
                    assert_eq!(sam_first_step(opt), SamStatus::SAM_OK, "{}", common::last_error());
                    cpu.first_step().unwrap();
                } else {
                    assert_eq!(sam_second_step(opt), SamStatus::SAM_OK, "{}", common::last_error());
                    cpu.second_step().unwrap();
                }
                let got = std::slice::from_raw_parts(pptr2, n0);
                let mut want = vec![0f32; n0];
                cpu.read_param(0, &mut want).unwrap();
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1e-2),
                        "rebound step {step} pass {pass} [{i}]: {a} vs {b}"
                    );
                }
            }
        }
        sam_destroy(opt);

        // The host's objects are still the host's: use one, then destroy them all.
        *pptr = 42.0;
        assert_eq!(*pptr, 42.0);
        device.device_wait_idle().unwrap();
        for (b, m) in [(pbuf, pmem), (gbuf, gmem), (sbuf, smem), (pbuf2, pmem2), (gbuf2, gmem2)] {
            device.unmap_memory(m);
            device.destroy_buffer(b, None);
            device.free_memory(m, None);
        }
        device.destroy_device(None);
        if let Some(m) = messenger {
            debug.destroy_debug_utils_messenger(m, None);
        }
        instance.destroy_instance(None);
        let errors = VALIDATION.lock().unwrap();
        assert!(errors.is_empty(), "{} validation errors:\n{}", errors.len(), errors.join("\n"));
        if has_layer {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "validation layer: 0 errors");
        }
    }
}
