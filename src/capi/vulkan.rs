//! The host's own Vulkan device: required extensions, an optimizer on it, and its `VkBuffer`s.

use std::ffi::{c_char, c_void};
use std::sync::Mutex;

use super::ffi::{arg_ref, boundary, non_null, read_versioned, write_out};
use super::lifecycle::{SamConfig, read_config};
use super::logging;
use super::types::{SamDType, SamOptimizer, SamStatus, dtype_from_c};
use crate::engine::Optimizer;
use crate::error::{Error, ErrorKind, Result};

/// The loader's `vkGetInstanceProcAddr`, cast to this type: `(SamVkGetInstanceProcAddr)vkGetInstanceProcAddr`
/// (the same function; its result is declared as a plain pointer here).
pub type SamVkGetInstanceProcAddr =
    Option<unsafe extern "system" fn(instance: *mut c_void, name: *const c_char) -> *const c_void>;

/// The host's Vulkan objects, for `sam_create_vulkan` (all of them) and
/// `sam_vulkan_required_extensions` (the instance and physical device). Set `struct_size` to
/// `sizeof(SamVulkanDevice)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SamVulkanDevice {
    /// `sizeof(SamVulkanDevice)` as the caller compiled it.
    pub struct_size: usize,
    /// The loader's `vkGetInstanceProcAddr`, cast to `SamVkGetInstanceProcAddr`.
    pub get_instance_proc_addr: SamVkGetInstanceProcAddr,
    /// The host's `VkInstance`, Vulkan 1.1 or later.
    pub instance: *mut c_void,
    /// The `apiVersion` the instance was created with.
    pub api_version: u32,
    /// How many instance extensions the host enabled.
    pub instance_extension_count: u32,
    /// Their names.
    pub instance_extensions: *const *const c_char,
    /// The `VkPhysicalDevice` the device was created from.
    pub physical_device: *mut c_void,
    /// The host's `VkDevice` (ignored by `sam_vulkan_required_extensions`).
    pub device: *mut c_void,
    /// How many device extensions the host enabled.
    pub device_extension_count: u32,
    /// Their names: a superset of what `sam_vulkan_required_extensions` lists.
    pub device_extensions: *const *const c_char,
    /// The queue family samopt submits to (it must support compute).
    pub queue_family_index: u32,
    /// The queue within that family.
    pub queue_index: u32,
}

/// Reads and checks a `SamVulkanDevice`.
///
/// # Safety
/// A non-null `d` must point to a `SamVulkanDevice` with valid extension arrays.
pub(super) unsafe fn vulkan_handles(
    d: *const SamVulkanDevice,
    need_device: bool,
) -> Result<crate::gpu::vulkan::VulkanHandles> {
    use ash::vk::Handle;
    let empty = SamVulkanDevice {
        struct_size: size_of::<SamVulkanDevice>(),
        get_instance_proc_addr: None,
        instance: std::ptr::null_mut(),
        api_version: 0,
        instance_extension_count: 0,
        instance_extensions: std::ptr::null(),
        physical_device: std::ptr::null_mut(),
        device: std::ptr::null_mut(),
        device_extension_count: 0,
        device_extensions: std::ptr::null(),
        queue_family_index: 0,
        queue_index: 0,
    };
    // SAFETY: the caller's contract; `struct_size` is read and checked before anything else.
    let d = &unsafe { read_versioned(d, "device", &[size_of::<SamVulkanDevice>()], empty, &[]) }?;
    let gipa = d
        .get_instance_proc_addr
        .ok_or_else(|| Error::new(ErrorKind::NullPointer, "device->get_instance_proc_addr is NULL"))?;
    non_null(d.instance, "device->instance")?;
    non_null(d.physical_device, "device->physical_device")?;
    if need_device {
        non_null(d.device, "device->device")?;
    }
    // SAFETY: the loader's vkGetInstanceProcAddr: the same signature, its result a function
    // pointer where this type says a plain one.
    let gipa: ash::vk::PFN_vkGetInstanceProcAddr = unsafe { std::mem::transmute(gipa) };
    Ok(crate::gpu::vulkan::VulkanHandles {
        get_instance_proc_addr: gipa,
        instance: ash::vk::Instance::from_raw(d.instance as u64),
        api_version: d.api_version,
        // SAFETY: the caller's contract for the arrays.
        instance_extensions: unsafe {
            crate::gpu::vulkan::names(d.instance_extensions, d.instance_extension_count, "instance_extensions")
        }?,
        physical_device: ash::vk::PhysicalDevice::from_raw(d.physical_device as u64),
        device: ash::vk::Device::from_raw(d.device as u64),
        // SAFETY: as above.
        device_extensions: unsafe {
            crate::gpu::vulkan::names(d.device_extensions, d.device_extension_count, "device_extensions")
        }?,
        queue_family: d.queue_family_index,
        queue_index: d.queue_index,
    })
}

/// The device extensions the host must enable when it creates the `VkDevice` it hands to
/// `sam_create_vulkan` (from `device->instance` and `device->physical_device`; the device itself
/// may not exist yet). Stores the number in `*out_count` and the first `capacity` names (static
/// strings) in `out_names`, which may be NULL to ask for the count. No instance extension is
/// required beyond Vulkan 1.1; no device feature beyond Vulkan 1.1's is used.
///
/// # Safety
/// `device` must be NULL or valid (see `SamVulkanDevice`); `out_names` NULL or writable for
/// `capacity` pointers; `out_count` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_vulkan_required_extensions(
    device: *const SamVulkanDevice,
    out_names: *mut *const c_char,
    capacity: usize,
    out_count: *mut usize,
) -> SamStatus {
    boundary("sam_vulkan_required_extensions", || {
        non_null(out_count, "out_count")?;
        // SAFETY: the caller's contract.
        let handles = unsafe { vulkan_handles(device, false) }?;
        let names = crate::gpu::vulkan::required_device_extensions(&handles)?;
        if !out_names.is_null() {
            for (i, n) in names.iter().take(capacity).enumerate() {
                // SAFETY: writable for `capacity` pointers (the caller's contract).
                unsafe { out_names.add(i).write(n.as_ptr()) };
            }
        }
        // SAFETY: checked non-null.
        unsafe { write_out(out_count, "out_count", names.len()) }
    })
}

/// Creates an optimizer whose GPU engine runs on the host's own Vulkan device and queue, so that
/// `sam_register_vulkan` can register the host's `VkBuffer`s and the passes run on them in place.
/// samopt never destroys the host's instance, device, queue or buffers.
///
/// The synchronisation contract:
/// - before a step (`sam_first_step`, `sam_second_step`, ...) the host's writes to the registered
///   buffers (its gradients, its weights) must be complete on the GPU (e.g. its fence waited);
/// - when a samopt call returns, all the GPU work it submitted is complete, so the host may read
///   and write the buffers at once;
/// - samopt submits to the given queue only inside its own calls; Vulkan requires the host not
///   to submit to the same `VkQueue` concurrently (give samopt a queue of its own, or do not use
///   that queue from another thread while a samopt call runs).
///
/// Fails with `SAM_ERR_NULL_POINTER`, `SAM_ERR_INVALID_ARGUMENT` (wrong `struct_size`, a required
/// device extension missing from `device->device_extensions`, a queue family that does not exist
/// or lacks compute, a queue index past the family's count), `SAM_ERR_UNSUPPORTED`,
/// `SAM_ERR_DEVICE`.
///
/// # Safety
/// `device` must describe live Vulkan objects created as documented there; `config` and `out` as
/// in `sam_create`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_create_vulkan(
    device: *const SamVulkanDevice,
    config: *const SamConfig,
    out: *mut *mut SamOptimizer,
) -> SamStatus {
    boundary("sam_create_vulkan", || {
        logging::install();
        non_null(out, "out")?;
        // SAFETY: the caller's contract.
        let config = unsafe { read_config(config) }?;
        // SAFETY: the caller's contract.
        let handles = unsafe { vulkan_handles(device, true) }?;
        let opt = Optimizer::on_vulkan(&handles, config)?;
        let handle = Box::into_raw(Box::new(SamOptimizer { inner: Mutex::new(opt) }));
        // SAFETY: checked non-null above.
        unsafe { write_out(out, "out", handle) }
    })
}

/// Registers a tensor in the host's `VkBuffer`s (for an optimizer from `sam_create_vulkan`):
/// `len` elements of `dtype` at byte `param_offset` of `param_buffer` and `grad_offset` of
/// `grad_buffer`. The passes read and write them in place; the host keeps owning them (samopt
/// never frees them) and keeps them alive for the optimizer's lifetime. Both buffers need the
/// `VK_BUFFER_USAGE_STORAGE_BUFFER_BIT` usage, offsets a multiple of the device's
/// `minStorageBufferOffsetAlignment`, and the tensor a multiple of 16 bytes.
///
/// Fails, registering nothing, with `SAM_ERR_NULL_POINTER` (a `VK_NULL_HANDLE` or `out_id` NULL),
/// `SAM_ERR_INVALID_ARGUMENT` (`len` 0, an unknown dtype, a buffer smaller than `offset + len *
/// size`, a misaligned offset, overlapping ranges), `SAM_ERR_UNSUPPORTED` (not a Vulkan optimizer).
/// Vulkan has no query for a buffer's size, so samopt bounds the range by the buffer's memory
/// requirements (`vkGetBufferMemoryRequirements`): a range that ends inside the alignment padding
/// past the size the host created the buffer with is not caught, and stays the host's to avoid.
///
/// # Safety
/// `opt` must be NULL or a live handle; the buffers must be live `VkBuffer`s of its device.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sam_register_vulkan(
    opt: *mut SamOptimizer,
    param_buffer: u64,
    param_offset: u64,
    grad_buffer: u64,
    grad_offset: u64,
    len: usize,
    dtype: SamDType,
    out_id: *mut u32,
) -> SamStatus {
    boundary("sam_register_vulkan", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        non_null(out_id, "out_id")?;
        let dtype = dtype_from_c(dtype)?;
        let mut inner = opt.lock()?;
        // SAFETY: the host's contract for its buffers.
        let id =
            unsafe { inner.register_vulkan((param_buffer, param_offset), (grad_buffer, grad_offset), len, dtype) }?;
        // SAFETY: checked non-null.
        unsafe { write_out(out_id, "out_id", id) }
    })
}

/// Re-points tensor `id`, registered with `sam_register_vulkan`, at other `VkBuffer` ranges of
/// the same size, keeping its state (momentum, Adam's moments, LookSAM's `g_v`, master weights):
/// for engines whose allocator hands out new buffers between steps. The new parameter range must
/// hold the weights. Checked as at registration (its own old ranges excepted); refused between the
/// two steps, or for a tensor not registered with `sam_register_vulkan`; a refused call changes
/// nothing. Nothing is copied; the next pass rebuilds the bindings of this tensor's windows.
///
/// # Safety
/// As `sam_register_vulkan` for the new buffers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sam_rebind_vulkan(
    opt: *mut SamOptimizer,
    id: u32,
    param_buffer: u64,
    param_offset: u64,
    grad_buffer: u64,
    grad_offset: u64,
) -> SamStatus {
    boundary("sam_rebind_vulkan", || {
        // SAFETY: the caller's contract.
        let opt = unsafe { arg_ref(opt, "opt") }?;
        // SAFETY: the host's contract for its buffers.
        unsafe { opt.lock()?.rebind_vulkan(id, (param_buffer, param_offset), (grad_buffer, grad_offset)) }
    })
}
