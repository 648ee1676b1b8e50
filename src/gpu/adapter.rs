//! Adapter discovery and choice: which GPUs wgpu sees, ranked, and the one a config asks for.

use super::AdapterSummary;
use crate::error::{Error, ErrorKind, Result};

pub(super) fn device_type_name(t: wgpu::DeviceType) -> &'static str {
    match t {
        wgpu::DeviceType::DiscreteGpu => "discrete",
        wgpu::DeviceType::IntegratedGpu => "integrated",
        wgpu::DeviceType::VirtualGpu => "virtual",
        wgpu::DeviceType::Cpu => "cpu",
        wgpu::DeviceType::Other => "other",
    }
}

/// Lists the adapters wgpu finds (honouring `WGPU_BACKEND`), best first: discrete, integrated,
/// virtual, CPU; native APIs before GL.
pub fn adapters() -> Vec<AdapterSummary> {
    ranked_adapters().iter().map(summarize).collect()
}

pub(super) fn summarize(a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    let limits = a.limits();
    AdapterSummary {
        name: info.name,
        backend: info.backend.to_str().to_owned(),
        device_type: device_type_name(info.device_type).to_owned(),
        driver: format!("{} {}", info.driver, info.driver_info).trim().to_owned(),
        max_binding_bytes: limits.max_storage_buffer_binding_size,
        max_buffer_bytes: limits.max_buffer_size,
        timestamps: a.features().contains(wgpu::Features::TIMESTAMP_QUERY),
    }
}

pub(super) fn ranked_adapters() -> Vec<wgpu::Adapter> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let mut list = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    let rank = |a: &wgpu::Adapter| {
        let info = a.get_info();
        let kind = match info.device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Cpu => 3,
            wgpu::DeviceType::Other => 4,
        };
        (kind, (info.backend == wgpu::Backend::Gl) as u8)
    };
    list.sort_by_key(rank); // stable: ties keep wgpu's order
    list
}

/// The user's explicit adapter choice and where it comes from: `config_choice` (the config's
/// `adapter`), else `SAMOPT_ADAPTER` from the environment; `None` when neither names one.
pub(crate) fn explicit_choice(config_choice: Option<&str>) -> Option<(String, &'static str)> {
    match config_choice {
        Some(c) => Some((c.to_owned(), "config->adapter")),
        None => std::env::var("SAMOPT_ADAPTER").ok().filter(|s| !s.is_empty()).map(|e| (e, "SAMOPT_ADAPTER")),
    }
}

/// Fails, naming the choice and the adapters found, when the user chose an adapter explicitly
/// (see [`explicit_choice`]) and it matches none: an explicit choice is never silently ignored.
pub(crate) fn check_choice(config_choice: Option<&str>) -> Result<()> {
    match explicit_choice(config_choice) {
        Some(_) => pick_adapter(config_choice, false).map(|_| ()),
        None => Ok(()),
    }
}

/// Picks an adapter: the explicit choice (an index into [`adapters`] or a case-insensitive part
/// of a name, see [`explicit_choice`]), else the best one. For backend AUTO (`auto`), the best one
/// must not be a software rasterizer (device type CPU, e.g. llvmpipe/lavapipe): samopt's own CPU
/// engine runs the same passes many times faster, so AUTO refuses it unless it was chosen by name.
pub(super) fn pick_adapter(config_choice: Option<&str>, auto: bool) -> Result<wgpu::Adapter> {
    let explicit = explicit_choice(config_choice);
    let mut list = ranked_adapters();
    if list.is_empty() {
        return Err(Error::new(
            ErrorKind::Device,
            "no GPU adapter found (wgpu found no Vulkan, Metal, DX12 or GL device; on Linux without a GPU, \
             install mesa-vulkan-drivers for the lavapipe software driver)",
        ));
    }
    let Some((choice, source)) = explicit else {
        let best = list.remove(0);
        let info = best.get_info();
        if auto && info.device_type == wgpu::DeviceType::Cpu {
            return Err(Error::new(
                ErrorKind::Device,
                format!(
                    "the best GPU adapter, {}, is a software rasterizer running on the CPU; samopt's CPU engine \
                     is faster (name the adapter in config->adapter or SAMOPT_ADAPTER to use it anyway)",
                    info.name
                ),
            ));
        }
        return Ok(best);
    };
    let names: Vec<String> = list.iter().map(|a| a.get_info().name).collect();
    let index = match choice.trim().parse::<usize>() {
        Ok(i) if i < list.len() => i,
        Ok(i) => {
            return Err(Error::invalid(format!(
                "{source} = {i}: only {} adapters found ({})",
                list.len(),
                names.join(", ")
            )));
        }
        Err(_) => {
            let needle = choice.to_lowercase();
            names.iter().position(|n| n.to_lowercase().contains(&needle)).ok_or_else(|| {
                Error::new(
                    ErrorKind::Device,
                    format!("{source} = {choice:?}: no adapter's name contains it (found: {})", names.join(", ")),
                )
            })?
        }
    };
    Ok(list.swap_remove(index))
}
