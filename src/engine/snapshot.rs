//! The optimizer's side of checkpoints: what it saves, and the checks before a load replaces
//! its state (the format itself is `crate::checkpoint`).

use super::{Group, Optimizer};
use super::{ScaleState, ScheduleState};
use crate::checkpoint::{self, Expected, ScheduleRecord, Snapshot, TensorRecord};
use crate::config::BaseOptimizer;
use crate::error::{Error, ErrorKind, Result};

impl Optimizer {
    pub(super) fn records(&self) -> Vec<TensorRecord> {
        self.tensors
            .iter()
            .map(|t| TensorRecord {
                len: t.len as u64,
                dtype: t.dtype,
                group: t.group,
                updates: t.updates,
                epoch: t.epoch,
            })
            .collect()
    }

    pub(super) fn state_len(&self) -> usize {
        self.tensors.iter().map(|t| self.config.state_per_element(t.dtype) * t.len).sum()
    }

    /// Bytes [`save_state`](Self::save_state) writes now.
    pub fn state_size(&self) -> usize {
        checkpoint::size(self.groups.len(), self.tensors.len(), self.state_len())
    }

    /// Writes the optimizer's state (step counts, learning rate, groups, per-tensor counters and
    /// the base optimizer's state) into `out`, which must hold at least
    /// [`state_size`](Self::state_size) bytes; returns the bytes written. Refused between the two
    /// steps. See [`checkpoint`] for the format.
    pub fn save_state(&mut self, out: &mut [u8]) -> Result<usize> {
        self.expect_idle("save the state")?;
        let size = self.state_size();
        if out.len() < size {
            return Err(Error::invalid(format!("len = {}: the state needs {size} bytes", out.len())));
        }
        let mut state = vec![0f32; self.state_len()];
        if let Some(p) = self.passes.as_mut() {
            p.export_state(&mut state)?;
        }
        let snapshot = Snapshot {
            steps: self.steps,
            lr: self.lr,
            last_norm: self.last_norm,
            last_second_norm: self.last_second_norm,
            groups: self.groups.iter().map(|g| (g.lr_scale, g.weight_decay)).collect(),
            tensors: self.records(),
            state,
            schedule: Some(ScheduleRecord {
                rho: self.rho,
                t: self.schedule.t,
                rng: self.schedule.rng,
                mean: self.schedule.mean,
                var: self.schedule.var,
                sam_steps: self.schedule.sam_steps,
                single_steps: self.schedule.single_steps,
                gv_local_sq: self.schedule.gv_local_sq,
                loss_scale: self.scaler.map(|s| (s.scale, s.good_steps)),
            }),
        };
        checkpoint::encode(&snapshot, self.config.fingerprint(), &mut out[..size]);
        Ok(size)
    }

    /// Restores a state written by [`save_state`](Self::save_state) by an optimizer of the same
    /// configuration with the same registrations (count, lengths, dtypes, groups). A truncated or
    /// corrupted checkpoint, another version, configuration or layout is refused with
    /// [`ErrorKind::Io`] and a message that says which, and the optimizer stays as it was.
    /// Refused between the two steps.
    pub fn load_state(&mut self, bytes: &[u8]) -> Result<()> {
        self.expect_idle("load a state")?;
        let records = self.records();
        let want = Expected {
            config_fingerprint: self.config.fingerprint(),
            tensors: &records,
            groups: self.groups.len(),
            state: self.state_len(),
        };
        let s = checkpoint::decode(bytes, &want)?;
        if self.config.base == BaseOptimizer::AdamW {
            // Adam's second moments, each tensor's second state vector, are >= 0.
            let mut at = 0;
            for (k, t) in self.tensors.iter().enumerate() {
                let v = &s.state[at + t.len..at + 2 * t.len];
                if let Some(i) = v.iter().position(|&x| x < 0.0) {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!("invalid value: tensor {k}, element {i}: Adam's second moment {} is negative", v[i]),
                    ));
                }
                at += self.config.state_per_element(t.dtype) * t.len;
            }
        }
        let schedule = match s.schedule {
            Some(r) => {
                if r.gv_local_sq.is_some() && !self.config.looksam() {
                    return Err(Error::new(ErrorKind::Io, "invalid value: a LookSAM g_v norm without LookSAM"));
                }
                if r.loss_scale.is_some() != self.scaler.is_some() {
                    return Err(Error::new(
                        ErrorKind::Io,
                        "invalid value: a loss scale where none is configured, or none",
                    ));
                }
                let state = ScheduleState {
                    t: r.t,
                    rng: r.rng,
                    mean: r.mean,
                    var: r.var,
                    sam_steps: r.sam_steps,
                    single_steps: r.single_steps,
                    gv_local_sq: r.gv_local_sq,
                };
                let scaler = r.loss_scale.map(|(scale, good_steps)| ScaleState { scale, good_steps });
                (r.rho, state, scaler)
            }
            // Version 1: plain SAM (the fingerprint matched, so the schedule is `every`), every
            // completed step a SAM step, at the configured rho.
            None => {
                let mut state = ScheduleState::new(&self.config.schedule);
                state.t = s.steps;
                state.sam_steps = s.steps;
                (self.config.rho, state, self.scaler)
            }
        };
        if !s.state.is_empty() {
            // Creates the backend under AUTO (the optimizer has registrations, so it exists).
            self.passes()?.import_state(&s.state)?;
        }
        self.steps = s.steps;
        self.lr = s.lr;
        (self.rho, self.schedule, self.scaler) = schedule;
        self.last_norm = s.last_norm;
        self.last_second_norm = s.last_second_norm;
        for (g, &(lr_scale, weight_decay)) in self.groups.iter_mut().zip(&s.groups) {
            *g = Group { lr_scale, weight_decay };
        }
        for (k, (t, r)) in self.tensors.iter_mut().zip(&s.tensors).enumerate() {
            t.updates = r.updates;
            if t.epoch != r.epoch {
                t.epoch = r.epoch;
                if let Some(p) = self.passes.as_mut() {
                    p.set_cohort(k, (t.group, t.epoch));
                }
            }
        }
        Ok(())
    }

    /// [`save_state`](Self::save_state) to a file: written to a temporary file beside it, flushed
    /// to disk and renamed into place, so a crash never leaves half a checkpoint under `path`.
    pub fn save_state_file(&mut self, path: &std::path::Path) -> Result<()> {
        use std::io::Write;
        let mut bytes = vec![0u8; self.state_size()];
        self.save_state(&mut bytes)?;
        let io = |what: &str, e: std::io::Error| Error::new(ErrorKind::Io, format!("{what} {}: {e}", path.display()));
        let name =
            path.file_name().ok_or_else(|| Error::invalid(format!("path = {}: not a file name", path.display())))?;
        // Unique per save: two handles of one process saving to the same path at once each write
        // their own temporary file (the last rename wins, and neither is ever half written).
        static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let save = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{}-{save}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let written = (|| {
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("writing", e));
        }
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("renaming the checkpoint into", e));
        }
        // The rename itself reaches the disk with the directory.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// [`load_state`](Self::load_state) from a file.
    pub fn load_state_file(&mut self, path: &std::path::Path) -> Result<()> {
        let bytes =
            std::fs::read(path).map_err(|e| Error::new(ErrorKind::Io, format!("reading {}: {e}", path.display())))?;
        self.load_state(&bytes).map_err(|e| Error::new(e.kind(), format!("{}: {}", path.display(), e.message())))
    }
}
