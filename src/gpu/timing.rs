//! Timing of the passes with timestamp queries, and the device copy the benchmarks compare with.

use super::context::map_read;
use super::{GpuEngine, PassTimes};
use crate::error::Result;

pub(super) struct Timing {
    pub(super) queries: wgpu::QuerySet,
    pub(super) resolve: wgpu::Buffer,
    pub(super) readback: wgpu::Buffer,
    pub(super) period_ns: f64,
}

impl GpuEngine {
    /// Starts timing the three passes with timestamp queries; `false` when the adapter cannot.
    pub fn enable_timing(&mut self) -> bool {
        if !self.ctx.device.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
            return false;
        }
        let d = &self.ctx.device;
        let queries = d.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("samopt passes"),
            ty: wgpu::QueryType::Timestamp,
            count: 6,
        });
        let buffer = |usage| {
            d.create_buffer(&wgpu::BufferDescriptor { label: None, size: 48, usage, mapped_at_creation: false })
        };
        let resolve = buffer(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC);
        let readback = buffer(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
        let period_ns = self.ctx.queue.get_timestamp_period() as f64;
        self.timing = Some(Timing { queries, resolve, readback, period_ns });
        true
    }

    /// The pass times of the last step, when timing is enabled.
    pub fn pass_times(&mut self) -> Option<PassTimes> {
        let timing = self.timing.as_ref()?;
        let mut raw = [0u64; 6];
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        enc.resolve_query_set(&timing.queries, 0..6, &timing.resolve, 0);
        enc.copy_buffer_to_buffer(&timing.resolve, 0, &timing.readback, 0, 48);
        self.ctx.queue.submit([enc.finish()]);
        map_read(&self.ctx, &timing.readback, 0, 48, |bytes| raw.copy_from_slice(bytemuck::cast_slice(bytes))).ok()?;
        let span = |a: usize| raw[a + 1].saturating_sub(raw[a]) as f64 * timing.period_ns;
        Some(PassTimes { norm_ns: span(0), perturb_ns: span(2), restore_ns: span(4) })
    }

    /// Times a device buffer-to-buffer copy of `bytes` bytes, the bandwidth reference of the
    /// benchmark: `(nanoseconds, from timestamps)` per repetition; wall-clock submit-to-done time
    /// when the adapter cannot write timestamps inside an encoder or timing is off.
    pub fn time_copy(&self, bytes: u64, reps: usize) -> Result<Vec<(f64, bool)>> {
        let d = &self.ctx.device;
        let bytes = bytes.div_ceil(4) * 4;
        let make = |usage| {
            d.create_buffer(&wgpu::BufferDescriptor { label: None, size: bytes, usage, mapped_at_creation: false })
        };
        let src = make(wgpu::BufferUsages::COPY_SRC);
        let dst = make(wgpu::BufferUsages::COPY_DST);
        let in_encoder = d.features().contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS);
        let timing = self.timing.as_ref().filter(|_| in_encoder);
        let mut out = Vec::new();
        for _ in 0..reps {
            self.ctx.checked("timing a copy", || {
                let start = std::time::Instant::now();
                let mut enc = d.create_command_encoder(&Default::default());
                if let Some(t) = timing {
                    enc.write_timestamp(&t.queries, 0);
                }
                enc.copy_buffer_to_buffer(&src, 0, &dst, 0, bytes);
                if let Some(t) = timing {
                    enc.write_timestamp(&t.queries, 1);
                    enc.resolve_query_set(&t.queries, 0..2, &t.resolve, 0);
                    enc.copy_buffer_to_buffer(&t.resolve, 0, &t.readback, 0, 16);
                }
                self.ctx.queue.submit([enc.finish()]);
                self.ctx.wait()?;
                let wall = start.elapsed().as_nanos() as f64;
                match timing {
                    Some(t) => {
                        let mut raw = [0u64; 2];
                        map_read(&self.ctx, &t.readback, 0, 16, |b| raw.copy_from_slice(bytemuck::cast_slice(b)))?;
                        out.push((raw[1].saturating_sub(raw[0]) as f64 * t.period_ns, true));
                    }
                    None => out.push((wall, false)),
                }
                Ok(())
            })?;
        }
        Ok(out)
    }
}
