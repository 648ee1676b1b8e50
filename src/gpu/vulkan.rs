//! The host's own Vulkan objects under the GPU engine: its `VkInstance`, `VkPhysicalDevice`,
//! `VkDevice` and queue become a wgpu device (through wgpu-hal's `from_raw` constructors), and its
//! `VkBuffer`s become `wgpu::Buffer`s the passes run on in place. samopt never destroys any of
//! them: every wrapper is built with a no-op drop callback.

use std::ffi::{CStr, c_char};

use ash::vk;
use ash::vk::Handle;
use wgpu::hal::api::Vulkan;

use super::{External, GpuEngine};
use crate::config::Config;
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};

/// The host's Vulkan objects, as `SamVulkanDevice` carries them.
pub struct VulkanHandles {
    /// The loader's `vkGetInstanceProcAddr`.
    pub get_instance_proc_addr: vk::PFN_vkGetInstanceProcAddr,
    /// The host's `VkInstance`.
    pub instance: vk::Instance,
    /// The API version the instance was created with (`VK_MAKE_API_VERSION`).
    pub api_version: u32,
    /// The instance extensions the host enabled.
    pub instance_extensions: Vec<String>,
    /// The `VkPhysicalDevice` the device was created from.
    pub physical_device: vk::PhysicalDevice,
    /// The host's `VkDevice` (`vk::Device::null()` when only asking for required extensions).
    pub device: vk::Device,
    /// The device extensions the host enabled.
    pub device_extensions: Vec<String>,
    /// The queue family and index samopt submits to.
    pub queue_family: u32,
    /// The queue index within the family.
    pub queue_index: u32,
}

fn device_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Device, format!("{what}: {e}"))
}

/// The hal instance around the host's `VkInstance`, enabling only what the host enabled.
fn hal_instance(h: &VulkanHandles) -> Result<wgpu::hal::vulkan::Instance> {
    // SAFETY: the host's loader entry point (checked non-null by the C layer).
    let entry =
        unsafe { ash::Entry::from_static_fn(ash::StaticFn { get_instance_proc_addr: h.get_instance_proc_addr }) };
    // SAFETY: a live instance created from this loader (the host's contract).
    let raw = unsafe { ash::Instance::load(entry.static_fn(), h.instance) };
    let flags = wgpu::InstanceFlags::empty();
    let desired = wgpu::hal::vulkan::Instance::desired_extensions(&entry, h.api_version, flags)
        .map_err(|e| device_error("listing the instance extensions", e))?;
    let enabled: Vec<&'static CStr> =
        desired.into_iter().filter(|d| h.instance_extensions.iter().any(|e| e.as_bytes() == d.to_bytes())).collect();
    // SAFETY: the instance was created from `entry` with at least `enabled`; the no-op drop
    // callback leaves the host's instance alone.
    unsafe {
        wgpu::hal::vulkan::Instance::from_raw(
            entry,
            raw,
            h.api_version,
            0,
            None,
            enabled,
            flags,
            Default::default(),
            false,
            Some(Box::new(|| {})),
        )
    }
    .map_err(|e| device_error("wrapping the host's VkInstance", e))
}

/// The device extensions wgpu needs for compute on this adapter. The swapchain extensions are
/// left out: samopt never presents, and asking a compute engine for them would drag in
/// VK_KHR_surface on its instance.
fn compute_extensions(adapter: &wgpu::hal::vulkan::Adapter) -> Vec<&'static CStr> {
    let mut list = adapter.required_device_extensions(wgpu::Features::empty());
    list.retain(|e| !e.to_bytes().windows(9).any(|w| w == b"swapchain"));
    list
}

/// The device extensions samopt needs the host to enable on its `VkDevice` (from its instance and
/// physical device), as static C strings.
pub fn required_device_extensions(h: &VulkanHandles) -> Result<Vec<&'static CStr>> {
    let instance = hal_instance(h)?;
    let exposed = instance.expose_adapter(h.physical_device).ok_or_else(|| {
        Error::new(ErrorKind::Unsupported, "the physical device cannot run wgpu (Vulkan 1.1 or later is needed)")
    })?;
    Ok(compute_extensions(&exposed.adapter))
}

/// A GPU engine on the host's `VkDevice` and queue.
pub(crate) fn open(h: &VulkanHandles, config: &Config) -> Result<GpuEngine> {
    let hal = hal_instance(h)?;
    let exposed = hal.expose_adapter(h.physical_device).ok_or_else(|| {
        Error::new(ErrorKind::Unsupported, "the physical device cannot run wgpu (Vulkan 1.1 or later is needed)")
    })?;
    let features = wgpu::Features::empty();
    let required = compute_extensions(&exposed.adapter);
    if let Some(missing) = required.iter().find(|r| !h.device_extensions.iter().any(|e| e.as_bytes() == r.to_bytes())) {
        return Err(Error::invalid(format!(
            "device->device_extensions lacks {}: enable every extension sam_vulkan_required_extensions lists",
            missing.to_string_lossy()
        )));
    }
    // The queue must exist and run compute: wgpu fetches it with vkGetDeviceQueue, where a bad
    // index is undefined behaviour rather than an error.
    {
        // SAFETY: a physical device of this instance (the host's contract).
        let families = unsafe {
            hal.shared_instance().raw_instance().get_physical_device_queue_family_properties(h.physical_device)
        };
        let Some(family) = families.get(h.queue_family as usize) else {
            return Err(Error::invalid(format!(
                "device->queue_family_index = {}, but the physical device has {} queue families",
                h.queue_family,
                families.len()
            )));
        };
        if !family.queue_flags.contains(ash::vk::QueueFlags::COMPUTE) {
            return Err(Error::invalid(format!(
                "device->queue_family_index = {}: that family does not support compute",
                h.queue_family
            )));
        }
        if h.queue_index >= family.queue_count {
            return Err(Error::invalid(format!(
                "device->queue_index = {}, but queue family {} has {} queues",
                h.queue_index, h.queue_family, family.queue_count
            )));
        }
    }
    let limits = exposed.capabilities.limits.clone();
    let raw_device = {
        let instance = hal.shared_instance().raw_instance();
        // SAFETY: a live device of this instance (the host's contract).
        unsafe { ash::Device::load(instance.fp_v1_0(), h.device) }
    };
    // SAFETY: the host created the device from this physical device with (at least) `required`
    // and the queue family; the no-op drop callback leaves the host's device alone.
    let open = unsafe {
        exposed.adapter.device_from_raw(
            raw_device,
            Some(Box::new(|| {})),
            &required,
            features,
            &limits,
            &wgpu::MemoryHints::default(),
            h.queue_family,
            h.queue_index,
        )
    }
    .map_err(|e| device_error("wrapping the host's VkDevice", e))?;
    // SAFETY: wgpu takes the hal objects built above from the host's handles.
    let instance = unsafe { wgpu::Instance::from_hal::<Vulkan>(hal) };
    // SAFETY: `exposed` comes from this instance.
    let adapter = unsafe { instance.create_adapter_from_hal(exposed) };
    let info = adapter.get_info();
    // SAFETY: `open` comes from this adapter, with `features` and `limits`.
    let (device, queue) = unsafe {
        adapter.create_device_from_hal(
            open,
            &wgpu::DeviceDescriptor {
                label: Some("samopt on the host's VkDevice"),
                required_features: features,
                required_limits: limits,
                ..Default::default()
            },
        )
    }
    .map_err(|e| device_error("creating the wgpu device", e))?;
    let mut engine = GpuEngine::on_device(device, queue, Some(info), config)?;
    engine.keep_alive = Some((instance, adapter));
    Ok(engine)
}

/// A range of a host `VkBuffer`: `(handle, start byte, end byte)`.
type VkRange = (u64, u64, u64);

impl GpuEngine {
    /// Registers a tensor in the host's `VkBuffer`s: `len` elements of `dtype` at byte offsets.
    ///
    /// # Safety
    /// Both handles must be live buffers of this engine's `VkDevice`, created with the
    /// STORAGE_BUFFER usage, and stay alive and unused by the host during samopt's calls for the
    /// optimizer's lifetime.
    pub(crate) unsafe fn add_vulkan(
        &mut self,
        param: (u64, u64),
        grad: (u64, u64),
        len: usize,
        dtype: DType,
    ) -> Result<()> {
        let tensor = self.tensors.len();
        // SAFETY: the caller's contract, passed on.
        let (external, ranges) = unsafe { self.wrap_vulkan(param, grad, len, dtype, None) }?;
        self.add_external(external, len, dtype)?;
        self.vulkan_ranges.extend(ranges.map(|(h, s, e)| (tensor, h, s, e)));
        Ok(())
    }

    /// Re-points Vulkan tensor `tensor` at other `VkBuffer` ranges (checked as at registration,
    /// its own old ranges excepted), keeping its state.
    ///
    /// # Safety
    /// As [`add_vulkan`](Self::add_vulkan) for the new buffers.
    pub(crate) unsafe fn rebind_vulkan(&mut self, tensor: usize, param: (u64, u64), grad: (u64, u64)) -> Result<()> {
        if !self.vulkan_ranges.iter().any(|&(t, ..)| t == tensor) {
            return Err(Error::invalid(format!("id = {tensor}: not a tensor registered with sam_register_vulkan")));
        }
        let (len, dtype) = (self.tensors[tensor].len, self.tensors[tensor].dtype);
        // SAFETY: the caller's contract, passed on.
        let (external, ranges) = unsafe { self.wrap_vulkan(param, grad, len, dtype, Some(tensor)) }?;
        self.rebind_external(tensor, external)?;
        self.vulkan_ranges.retain(|&(t, ..)| t != tensor);
        self.vulkan_ranges.extend(ranges.map(|(h, s, e)| (tensor, h, s, e)));
        Ok(())
    }

    /// Wraps the host's `VkBuffer` ranges for wgpu, after checking them: handles, sizes, and
    /// overlaps with the ranges of every Vulkan tensor but `except` (wgpu cannot tell two
    /// wrappers of one `VkBuffer` apart, so samopt checks those itself).
    ///
    /// # Safety
    /// As [`add_vulkan`](Self::add_vulkan).
    unsafe fn wrap_vulkan(
        &self,
        (param, param_offset): (u64, u64),
        (grad, grad_offset): (u64, u64),
        len: usize,
        dtype: DType,
        except: Option<usize>,
    ) -> Result<(External, [VkRange; 2])> {
        let bytes = (len as u64)
            .checked_mul(dtype.size() as u64)
            .ok_or_else(|| Error::invalid(format!("len = {len}: overflows")))?;
        let ranges = [
            (param, param_offset, param_offset.saturating_add(bytes)),
            (grad, grad_offset, grad_offset.saturating_add(bytes)),
        ];
        let wrap = |handle: u64, offset: u64, name: &str| -> Result<wgpu::Buffer> {
            if handle == 0 {
                return Err(Error::new(ErrorKind::NullPointer, format!("{name}_buffer is VK_NULL_HANDLE")));
            }
            let buffer = vk::Buffer::from_raw(handle);
            // The host's buffer must hold the range. Vulkan cannot tell a buffer's creation size;
            // its memory requirements are the tightest bound samopt can check (documented in the header).
            // SAFETY: a live buffer of this device (the caller's contract).
            let size = unsafe {
                self.ctx.device.as_hal::<Vulkan>().map(|d| d.raw_device().get_buffer_memory_requirements(buffer).size)
            }
            .ok_or_else(|| Error::new(ErrorKind::Unsupported, "the engine's device is not a Vulkan device"))?;
            let end = offset.saturating_add(bytes);
            if end > size {
                return Err(Error::invalid(format!(
                    "{name}_offset = {offset} + {bytes} bytes passes the end of the buffer (at most {size} bytes)"
                )));
            }
            // SAFETY: the caller's contract; the no-op drop callback leaves the buffer to the host.
            let hal = unsafe { wgpu::hal::vulkan::Buffer::from_raw_externally_owned(buffer, Box::new(|| {})) };
            // SAFETY: `hal` is a buffer of this device, initialised by the host, of at least `end` bytes.
            Ok(unsafe {
                self.ctx.device.create_buffer_from_hal::<Vulkan>(
                    hal,
                    &wgpu::BufferDescriptor {
                        label: Some(name),
                        size: end.max(4).div_ceil(4) * 4,
                        usage: wgpu::BufferUsages::STORAGE,
                        mapped_at_creation: false,
                    },
                )
            })
        };
        let external = if param == grad {
            // One buffer holding both (a framework's memory pool): one wrapper, so that the
            // engine sees one buffer and checks the two ranges against each other.
            // The range that ends last bounds the wrapper (and is checked against the buffer).
            let both = if param_offset >= grad_offset {
                wrap(param, param_offset, "param")?
            } else {
                wrap(grad, grad_offset, "grad")?
            };
            External { param: both.clone(), param_offset, grad: both, grad_offset }
        } else {
            External {
                param: wrap(param, param_offset, "param")?,
                param_offset,
                grad: wrap(grad, grad_offset, "grad")?,
                grad_offset,
            }
        };
        for (name, &(handle, start, end)) in ["param", "grad"].iter().zip(&ranges) {
            let earlier =
                self.vulkan_ranges.iter().any(|&(t, h, s, e)| Some(t) != except && h == handle && s < end && start < e);
            if earlier {
                return Err(Error::invalid(format!(
                    "{name}: bytes {start}..{end} of VkBuffer {handle:#x} overlap a range registered before"
                )));
            }
        }
        Ok((external, ranges))
    }
}

/// Reads `count` C strings.
///
/// # Safety
/// `names` must point to `count` valid NUL-terminated strings (or be NULL with `count` 0).
pub(crate) unsafe fn names(names: *const *const c_char, count: u32, what: &str) -> Result<Vec<String>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if names.is_null() {
        return Err(Error::new(ErrorKind::NullPointer, format!("device->{what} is NULL with a count of {count}")));
    }
    (0..count as usize)
        .map(|i| {
            // SAFETY: the caller's contract.
            let p = unsafe { *names.add(i) };
            if p.is_null() {
                return Err(Error::new(ErrorKind::NullPointer, format!("device->{what}[{i}] is NULL")));
            }
            // SAFETY: as above.
            Ok(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        })
        .collect()
}
