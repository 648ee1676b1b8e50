//! Staging of host buffers through the device: uploads, batched downloads, and the host-side restore.

use super::GpuEngine;
use super::context::map_read;
use crate::backend::Part;
use crate::error::Result;

/// Bytes of the reusable download staging buffer (downloads larger than this go in pieces).
pub(super) const READBACK_BYTES: u64 = 32 << 20;

impl GpuEngine {
    /// Copies host bytes to `buffer` at `offset`, padding the last word with zeros.
    pub(super) fn upload(&self, buffer: &wgpu::Buffer, offset: u64, bytes: &[u8]) {
        let whole = bytes.len() / 4 * 4;
        if whole > 0 {
            self.ctx.queue.write_buffer(buffer, offset, &bytes[..whole]);
        }
        if whole < bytes.len() {
            let mut tail = [0u8; 4];
            tail[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
            self.ctx.queue.write_buffer(buffer, offset + whole as u64, &tail);
        }
    }

    /// Downloads device bytes into host memory, batched through the staging buffer: jobs of
    /// `(buffer, byte offset, destination, bytes)`.
    ///
    /// # Safety
    /// Every destination must be valid for writes of its byte count.
    pub(super) unsafe fn download(&self, jobs: &[(&wgpu::Buffer, u64, *mut u8, usize)]) -> Result<()> {
        // (job, offset within the job, offset in the staging buffer, bytes)
        let mut batch: Vec<(usize, u64, u64, usize)> = Vec::new();
        let mut used = 0u64;
        let flush = |batch: &mut Vec<(usize, u64, u64, usize)>, used: &mut u64| -> Result<()> {
            if batch.is_empty() {
                return Ok(());
            }
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            for &(j, done, at, n) in batch.iter() {
                let (src, src_offset, _, _) = jobs[j];
                enc.copy_buffer_to_buffer(src, src_offset + done, &self.readback, at, (n as u64).div_ceil(4) * 4);
            }
            self.ctx.queue.submit([enc.finish()]);
            map_read(&self.ctx, &self.readback, 0, *used, |staged| {
                for &(j, done, at, n) in batch.iter() {
                    let src = &staged[at as usize..at as usize + n];
                    // SAFETY: the caller's contract; `done + n` is inside the destination.
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), jobs[j].2.add(done as usize), n) };
                }
            })?;
            batch.clear();
            *used = 0;
            Ok(())
        };
        for (j, &(_, _, _, bytes)) in jobs.iter().enumerate() {
            let mut done = 0usize;
            while done < bytes {
                if used + 8 > READBACK_BYTES {
                    flush(&mut batch, &mut used)?;
                }
                let n = ((bytes - done) as u64).min(READBACK_BYTES - used) as usize;
                batch.push((j, done as u64, used, n));
                used = (used + n as u64).div_ceil(8) * 8;
                done += n;
            }
        }
        flush(&mut batch, &mut used)
    }

    /// After a pass that moved the weights: the staged tensors' new weights back into the host's
    /// buffers (or, with none staged, just the wait for the pass).
    pub(super) fn download_staged_params(&self) -> Result<()> {
        let jobs: Vec<(&wgpu::Buffer, u64, *mut u8, usize)> = self
            .tensors
            .iter()
            .filter_map(|t| {
                let s = t.staged.as_ref()?;
                let (buffer, offset) = self.location(t, Part::Param);
                Some((buffer, offset, s.host.param, t.host_bytes()))
            })
            .collect();
        if jobs.is_empty() {
            return self.ctx.wait();
        }
        // SAFETY: the host's registration promise: its parameter buffers are valid for writes.
        unsafe { self.download(&jobs) }
    }

    pub(super) fn restore_staged_hosts(&self) {
        for t in &self.tensors {
            if let Some(s) = &t.staged {
                // SAFETY: the host's registration promise; `saved` holds exactly these bytes.
                unsafe { std::ptr::copy_nonoverlapping(s.saved.as_ptr().cast::<u8>(), s.host.param, t.host_bytes()) };
            }
        }
    }
}
