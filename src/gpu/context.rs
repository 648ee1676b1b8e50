//! The wgpu device and queue the engine runs on, its error scopes, and mapped reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::AdapterSummary;
use super::adapter::{device_type_name, pick_adapter, summarize};
use crate::error::{Error, ErrorKind, Result};

/// The wgpu device and what the engine needs to know about it.
pub(super) struct GpuContext {
    pub(super) device: wgpu::Device,
    pub(super) queue: wgpu::Queue,
    pub(super) summary: AdapterSummary,
    pub(super) limits: wgpu::Limits,
    pub(super) lost: Arc<AtomicBool>,
}

impl GpuContext {
    /// Opens the adapter [`pick_adapter`] picks (`auto`: for backend AUTO, no software adapter
    /// unless chosen by name).
    pub(super) fn open(choice: Option<&str>, auto: bool) -> Result<GpuContext> {
        let adapter = pick_adapter(choice, auto)?;
        let summary = summarize(&adapter);
        let wanted = wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("samopt"),
            required_features: adapter.features() & wanted,
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(|e| Error::new(ErrorKind::Device, format!("cannot open {}: {e}", summary.name)))?;
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            flag.store(true, Ordering::SeqCst);
            log::error!("samopt: GPU device lost ({reason:?}): {message}");
        });
        // Errors inside samopt's own calls are caught by error scopes and returned; this catches
        // the rest so that nothing panics inside the host's process.
        device.on_uncaptured_error(Arc::new(|e| log::error!("samopt: wgpu error: {e}")));
        let limits = device.limits();
        Ok(GpuContext { device, queue, summary, limits, lost })
    }

    /// The host's own device and queue (a Rust engine on wgpu). samopt installs no callbacks on
    /// them (the host keeps its own); its errors come back through error scopes.
    pub(super) fn existing(device: wgpu::Device, queue: wgpu::Queue, info: Option<wgpu::AdapterInfo>) -> GpuContext {
        let limits = device.limits();
        let summary = AdapterSummary {
            name: info.as_ref().map_or_else(|| "the host's wgpu device".to_owned(), |i| i.name.clone()),
            backend: info.as_ref().map_or_else(|| "?".to_owned(), |i| i.backend.to_str().to_owned()),
            device_type: info.as_ref().map_or("other", |i| device_type_name(i.device_type)).to_owned(),
            driver: info
                .as_ref()
                .map_or_else(String::new, |i| format!("{} {}", i.driver, i.driver_info).trim().to_owned()),
            max_binding_bytes: limits.max_storage_buffer_binding_size,
            max_buffer_bytes: limits.max_buffer_size,
            timestamps: device.features().contains(wgpu::Features::TIMESTAMP_QUERY),
        };
        GpuContext { device, queue, summary, limits, lost: Arc::new(AtomicBool::new(false)) }
    }

    pub(super) fn check_alive(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Device, format!("the GPU device ({}) was lost", self.summary.name)));
        }
        Ok(())
    }

    /// Runs `f`, turning any wgpu validation, out-of-memory or internal error it raises into a
    /// device error naming `what`.
    pub(super) fn checked<R>(&self, what: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.check_alive()?;
        let scopes = [wgpu::ErrorFilter::Validation, wgpu::ErrorFilter::OutOfMemory, wgpu::ErrorFilter::Internal]
            .map(|filter| self.device.push_error_scope(filter));
        let result = f();
        let mut first_error = None;
        for scope in scopes.into_iter().rev() {
            if let Some(e) = pollster::block_on(scope.pop()) {
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            let kind = match e {
                wgpu::Error::OutOfMemory { .. } => ErrorKind::OutOfMemory,
                _ => ErrorKind::Device,
            };
            return Err(Error::new(kind, format!("{what} failed on {}: {e}", self.summary.name)));
        }
        self.check_alive()?;
        result
    }

    pub(super) fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::new(ErrorKind::Device, format!("waiting for {}: {e}", self.summary.name)))
    }
}

/// Maps `size` bytes of `buffer` at `offset` for reading, waits, hands them to `f`, unmaps.
pub(super) fn map_read(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    offset: u64,
    size: u64,
    f: impl FnOnce(&[u8]),
) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    buffer.map_async(wgpu::MapMode::Read, offset..offset + size, move |r| {
        let _ = tx.send(r);
    });
    ctx.wait()?;
    rx.recv()
        .map_err(|_| Error::new(ErrorKind::Device, "a buffer mapping never completed"))?
        .map_err(|e| Error::new(ErrorKind::Device, format!("mapping a buffer for reading: {e}")))?;
    {
        let view = buffer
            .get_mapped_range(offset..offset + size)
            .map_err(|e| Error::new(ErrorKind::Device, format!("reading a mapped buffer: {e}")))?;
        f(&view);
    }
    buffer.unmap();
    Ok(())
}
