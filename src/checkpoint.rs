//! The optimizer-state format of `sam_state_save` / `sam_state_load` ([`crate::Optimizer::save_state`],
//! [`crate::Optimizer::load_state`]).
//!
//! Little-endian throughout:
//!
//! ```text
//! 0   magic "SAMOPTCK"
//! 8   u32 version (2; version 1 files, written before step schedules, are read too)
//! 12  u32 reserved (0)
//! 16  u64 fingerprint of the configuration (every field that shapes the state or the update;
//!     not the backend, threads or adapter, so a CPU checkpoint resumes on the GPU and back)
//! 24  u64 fingerprint of the registrations (count; each tensor's length, dtype and group; groups)
//! 32  u64 payload bytes P
//! 40  payload:
//!       u64 steps, f64 lr, f64 last norm, f64 last second norm (NaN: none)
//!       (version 2) f64 rho, then the step schedule: u64 decisions t, u64 generator state,
//!       f64 AE-SAM mean, f64 AE-SAM variance, u64 SAM steps, u64 single-gradient steps,
//!       f64 LookSAM's local ||g_v||^2 (NaN: none kept yet), f64 loss scale (NaN: none),
//!       u64 good steps since the scale last changed
//!       u32 groups, then per group: f64 lr_scale, f64 weight_decay
//!       u32 tensors, then per tensor: u64 len, u8 dtype, u32 group, u64 updates, u64 epoch
//!       the f32 state, tensor by tensor (momentum or first moment, second moment, LookSAM's g_v)
//! 40+P u32 CRC-32 (IEEE) of every byte before it
//! ```
//!
//! Loading checks, in this order, the size, the magic, the version, the checksum, the configuration
//! and the registrations, before anything is changed, and says which one failed.

use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};

const MAGIC: &[u8; 8] = b"SAMOPTCK";
/// The version this library writes (it reads this one and version 1).
pub const VERSION: u32 = 2;
const HEADER: usize = 40;
/// The version-2 block of rho and the step schedule.
const SCHEDULE_BYTES: usize = 80;
const TRAILER: usize = 4;

/// What a checkpoint holds, besides the backend's state floats.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Snapshot {
    pub steps: u64,
    pub lr: f64,
    pub last_norm: Option<f64>,
    pub last_second_norm: Option<f64>,
    /// `(lr_scale, weight_decay)` per group.
    pub groups: Vec<(f64, f64)>,
    pub tensors: Vec<TensorRecord>,
    /// The base optimizer's state (and LookSAM's `g_v`), tensor by tensor.
    pub state: Vec<f32>,
    /// Version 2: rho and the step schedule; `None` from a version-1 file (plain SAM, the
    /// configured rho).
    pub schedule: Option<ScheduleRecord>,
}

/// The current rho and the step schedule's state, as a checkpoint holds them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ScheduleRecord {
    pub rho: f64,
    pub t: u64,
    pub rng: u64,
    pub mean: f64,
    pub var: f64,
    pub sam_steps: u64,
    pub single_steps: u64,
    pub gv_local_sq: Option<f64>,
    /// Loss scaling: the scale and the good steps since it last changed.
    pub loss_scale: Option<(f64, u64)>,
}

/// One tensor's registration and counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TensorRecord {
    pub len: u64,
    pub dtype: DType,
    pub group: u32,
    pub updates: u64,
    pub epoch: u64,
}

fn dtype_code(d: DType) -> u8 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

/// FNV-1a, 64 bits: the fingerprints.
pub(crate) struct Fnv(u64);

#[allow(clippy::new_without_default)]
impl Fnv {
    pub fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    pub fn bytes(mut self, b: &[u8]) -> Fnv {
        for &x in b {
            self.0 = (self.0 ^ x as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }
    pub fn u64(self, v: u64) -> Fnv {
        self.bytes(&v.to_le_bytes())
    }
    pub fn f64(self, v: f64) -> Fnv {
        self.u64(v.to_bits())
    }
    pub fn finish(self) -> u64 {
        self.0
    }
}

/// CRC-32 (IEEE 802.3, reflected), table-driven.
fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

/// The fingerprint of a registration layout.
pub(crate) fn layout_fingerprint(tensors: &[TensorRecord], groups: usize) -> u64 {
    let mut h = Fnv::new().u64(tensors.len() as u64).u64(groups as u64);
    for t in tensors {
        h = h.u64(t.len).u64(dtype_code(t.dtype) as u64).u64(t.group as u64);
    }
    h.finish()
}

/// Bytes of a checkpoint with `groups` groups, `tensors` tensors and `state` state floats.
pub(crate) fn size(groups: usize, tensors: usize, state: usize) -> usize {
    HEADER + 32 + SCHEDULE_BYTES + 4 + 16 * groups + 4 + 29 * tensors + 4 * state + TRAILER
}

/// Writes `s` into `out`, which must hold exactly [`size`] bytes.
pub(crate) fn encode(s: &Snapshot, config_fingerprint: u64, out: &mut [u8]) {
    let total = size(s.groups.len(), s.tensors.len(), s.state.len());
    assert_eq!(out.len(), total, "the caller sized the buffer with checkpoint::size");
    let mut w = Writer { buf: out, at: 0 };
    w.put(MAGIC);
    w.put(&VERSION.to_le_bytes());
    w.put(&0u32.to_le_bytes());
    w.put(&config_fingerprint.to_le_bytes());
    w.put(&layout_fingerprint(&s.tensors, s.groups.len()).to_le_bytes());
    w.put(&((total - HEADER - TRAILER) as u64).to_le_bytes());
    w.put(&s.steps.to_le_bytes());
    for v in [s.lr, s.last_norm.unwrap_or(f64::NAN), s.last_second_norm.unwrap_or(f64::NAN)] {
        w.put(&v.to_le_bytes());
    }
    let r = s.schedule.expect("this library writes version 2");
    w.put(&r.rho.to_le_bytes());
    for v in [r.t, r.rng] {
        w.put(&v.to_le_bytes());
    }
    for v in [r.mean, r.var] {
        w.put(&v.to_le_bytes());
    }
    for v in [r.sam_steps, r.single_steps] {
        w.put(&v.to_le_bytes());
    }
    w.put(&r.gv_local_sq.unwrap_or(f64::NAN).to_le_bytes());
    let (scale, good) = r.loss_scale.unwrap_or((f64::NAN, 0));
    w.put(&scale.to_le_bytes());
    w.put(&good.to_le_bytes());
    w.put(&(s.groups.len() as u32).to_le_bytes());
    for &(scale, wd) in &s.groups {
        w.put(&scale.to_le_bytes());
        w.put(&wd.to_le_bytes());
    }
    w.put(&(s.tensors.len() as u32).to_le_bytes());
    for t in &s.tensors {
        w.put(&t.len.to_le_bytes());
        w.put(&[dtype_code(t.dtype)]);
        w.put(&t.group.to_le_bytes());
        w.put(&t.updates.to_le_bytes());
        w.put(&t.epoch.to_le_bytes());
    }
    for v in &s.state {
        w.put(&v.to_le_bytes());
    }
    let crc = crc32(&w.buf[..w.at]);
    w.put(&crc.to_le_bytes());
    debug_assert_eq!(w.at, total);
}

struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, b: &[u8]) {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N]> {
        let b = self
            .buf
            .get(self.at..self.at + N)
            .ok_or_else(|| format_error("truncated: the payload ends inside a record"))?;
        self.at += N;
        Ok(b.try_into().expect("N bytes"))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_le_bytes(self.take()?))
    }
}

fn format_error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Io, message)
}

/// What a loading optimizer expects: its configuration fingerprint, its registrations, its groups
/// and how many state floats its backend holds.
pub(crate) struct Expected<'a> {
    pub config_fingerprint: u64,
    pub tensors: &'a [TensorRecord],
    pub groups: usize,
    pub state: usize,
}

/// Reads and checks a checkpoint against what the optimizer expects.
pub(crate) fn decode(bytes: &[u8], want: &Expected<'_>) -> Result<Snapshot> {
    let min = HEADER + TRAILER;
    if bytes.len() < min {
        return Err(format_error(format!("truncated: {} bytes, a checkpoint has at least {min}", bytes.len())));
    }
    if &bytes[..8] != MAGIC {
        return Err(format_error("not a samopt checkpoint: wrong magic number"));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    if version != VERSION && version != 1 {
        return Err(format_error(format!("checkpoint version {version}; this library reads versions 1 and {VERSION}")));
    }
    let payload = u64::from_le_bytes(bytes[32..40].try_into().unwrap());
    let expected_len = (HEADER as u64).checked_add(payload).and_then(|v| v.checked_add(TRAILER as u64));
    if expected_len != Some(bytes.len() as u64) {
        return Err(format_error(format!(
            "truncated or padded: the header announces {payload} payload bytes, so {} bytes in all, but there are {}",
            expected_len.map_or_else(|| "an impossible number of".to_owned(), |v| v.to_string()),
            bytes.len()
        )));
    }
    let body = &bytes[..bytes.len() - TRAILER];
    let stored = u32::from_le_bytes(bytes[bytes.len() - TRAILER..].try_into().unwrap());
    let actual = crc32(body);
    if stored != actual {
        return Err(format_error(format!(
            "corrupted: checksum {actual:#010x} does not match the stored {stored:#010x}"
        )));
    }
    let config = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    if config != want.config_fingerprint {
        return Err(format_error(
            "written for another configuration: the base optimizer, its hyper-parameters or the SAM settings differ",
        ));
    }
    let mut r = Reader { buf: body, at: HEADER };
    let steps = r.u64()?;
    let (lr, norm, second) = (r.f64()?, r.f64()?, r.f64()?);
    let schedule = if version >= 2 {
        let rho = r.f64()?;
        let (t, rng, mean, var) = (r.u64()?, r.u64()?, r.f64()?, r.f64()?);
        let (sam_steps, single_steps, gv) = (r.u64()?, r.u64()?, r.f64()?);
        let gv_local_sq = (!gv.is_nan()).then_some(gv);
        let (scale, good) = (r.f64()?, r.u64()?);
        let loss_scale = (!scale.is_nan()).then_some((scale, good));
        Some(ScheduleRecord { rho, t, rng, mean, var, sam_steps, single_steps, gv_local_sq, loss_scale })
    } else {
        None
    };
    let group_count = r.u32()? as usize;
    if group_count != want.groups {
        return Err(format_error(format!(
            "written for another registration layout: {group_count} groups in the checkpoint, {} here",
            want.groups
        )));
    }
    let mut groups = Vec::with_capacity(group_count);
    for _ in 0..group_count {
        groups.push((r.f64()?, r.f64()?));
    }
    let tensor_count = r.u32()? as usize;
    if tensor_count != want.tensors.len() {
        return Err(format_error(format!(
            "written for another registration layout: {tensor_count} tensors in the checkpoint, {} registered here",
            want.tensors.len()
        )));
    }
    let mut tensors = Vec::with_capacity(tensor_count);
    for (k, here) in want.tensors.iter().enumerate() {
        let len = r.u64()?;
        let [code] = r.take::<1>()?;
        let group = r.u32()?;
        let (updates, epoch) = (r.u64()?, r.u64()?);
        if len != here.len || code != dtype_code(here.dtype) || group != here.group {
            return Err(format_error(format!(
                "written for another registration layout: tensor {k} is {len} elements of dtype {code} in group {group} \
                 in the checkpoint, {} elements of {} in group {} here",
                here.len,
                here.dtype.name(),
                here.group
            )));
        }
        tensors.push(TensorRecord { len, dtype: here.dtype, group, updates, epoch });
    }
    // Checked after the fields it covers, whose messages say more; what is left is a writer that
    // wrote fields and fingerprint apart.
    let layout = u64::from_le_bytes(bytes[24..32].try_into().unwrap());
    if layout != layout_fingerprint(want.tensors, want.groups) {
        return Err(format_error(
            "written for another registration layout: the layout fingerprint differs (tensor count, lengths, \
             dtypes, groups)",
        ));
    }
    let floats = (body.len() - r.at) / 4;
    if floats != want.state || !(body.len() - r.at).is_multiple_of(4) {
        return Err(format_error(format!(
            "written for another registration layout: {floats} state values in the checkpoint, {} here",
            want.state
        )));
    }
    let state: Vec<f32> = body[r.at..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let opt = |v: f64| (!v.is_nan()).then_some(v);
    let s =
        Snapshot { steps, lr, last_norm: opt(norm), last_second_norm: opt(second), groups, tensors, state, schedule };
    validate(&s)?;
    Ok(s)
}

/// Every loaded value as the setter that would have set it checks it, and the counters as a run
/// produces them: a checksum only says the bytes are the ones written, not that a writer (or an
/// edit before the checksum was recomputed) wrote sense. An update count near `u64::MAX` would
/// otherwise wrap AdamW's step `t` and give an infinite step.
fn validate(s: &Snapshot) -> Result<()> {
    let bad = |what: String| Err(format_error(format!("invalid value: {what}")));
    if !(s.lr.is_finite() && s.lr >= 0.0) {
        return bad(format!("lr = {}: must be finite and >= 0", s.lr));
    }
    for (name, v) in [("last norm", s.last_norm), ("last second norm", s.last_second_norm)] {
        if let Some(v) = v.filter(|v| !(v.is_finite() && *v >= 0.0)) {
            return bad(format!("{name} = {v}: must be finite and >= 0"));
        }
    }
    for (g, &(lr_scale, weight_decay)) in s.groups.iter().enumerate() {
        if !(lr_scale.is_finite() && lr_scale >= 0.0) {
            return bad(format!("group {g}: lr_scale = {lr_scale}: must be finite and >= 0"));
        }
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return bad(format!("group {g}: weight_decay = {weight_decay}: must be finite and >= 0"));
        }
    }
    if let Some(r) = &s.schedule {
        if !(r.rho.is_finite() && r.rho > 0.0) {
            return bad(format!("rho = {}: must be finite and > 0", r.rho));
        }
        for (name, v) in [("AE-SAM mean", r.mean), ("AE-SAM variance", r.var)] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{name} = {v}: must be finite and >= 0"));
            }
        }
        if let Some(v) = r.gv_local_sq.filter(|v| !(v.is_finite() && *v >= 0.0)) {
            return bad(format!("LookSAM's ||g_v||^2 = {v}: must be finite and >= 0"));
        }
        if let Some((scale, _)) = r.loss_scale.filter(|&(v, _)| !(v.is_finite() && v > 0.0)) {
            return bad(format!("loss scale = {scale}: must be finite and > 0"));
        }
        if r.sam_steps.checked_add(r.single_steps) != Some(s.steps) || r.t < s.steps {
            return bad(format!(
                "the schedule's counts ({} SAM, {} single-gradient steps, {} decisions) do not add up to {} steps",
                r.sam_steps, r.single_steps, r.t, s.steps
            ));
        }
    }
    if s.steps == u64::MAX {
        return bad(format!("steps = {}: the step counter cannot go on", s.steps));
    }
    for (k, t) in s.tensors.iter().enumerate() {
        // A tensor registered after `epoch` steps has had at most one update per step since.
        if t.epoch > s.steps || t.updates > s.steps - t.epoch {
            return bad(format!(
                "tensor {k}: registered at step {} with {} updates, but the optimizer took {} steps",
                t.epoch, t.updates, s.steps
            ));
        }
    }
    if let Some(i) = s.state.iter().position(|v| !v.is_finite()) {
        return bad(format!("state value {i} = {}: the base optimizer's state is finite", s.state[i]));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    fn sample() -> Snapshot {
        Snapshot {
            steps: 7,
            lr: 0.01,
            last_norm: Some(1.5),
            last_second_norm: None,
            groups: vec![(1.0, 0.0), (0.5, 0.1)],
            tensors: vec![
                TensorRecord { len: 3, dtype: DType::F32, group: 0, updates: 7, epoch: 0 },
                TensorRecord { len: 2, dtype: DType::BF16, group: 1, updates: 2, epoch: 5 },
            ],
            state: vec![1.0, 2.0, 3.0, 4.0, 5.0],
            schedule: Some(ScheduleRecord {
                rho: 0.05,
                t: 9,
                rng: 42,
                mean: 1.0,
                var: 0.5,
                sam_steps: 4,
                single_steps: 3,
                gv_local_sq: None,
                loss_scale: Some((1024.0, 3)),
            }),
        }
    }

    #[test]
    fn round_trip_and_every_rejection() {
        let s = sample();
        let mut buf = vec![0u8; size(2, 2, 5)];
        encode(&s, 42, &mut buf);
        let want = Expected { config_fingerprint: 42, tensors: &s.tensors, groups: 2, state: 5 };
        assert_eq!(decode(&buf, &want).unwrap(), s);

        let msg = |b: &[u8], w: &Expected<'_>| decode(b, w).unwrap_err().message().to_owned();
        assert!(msg(&buf[..buf.len() - 1], &want).starts_with("truncated"));
        assert!(msg(&buf[..10], &want).starts_with("truncated"));
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert!(msg(&bad, &want).contains("magic"));
        let mut bad = buf.clone();
        bad[8] = 3;
        assert!(msg(&bad, &want).contains("version 3"));
        let mut bad = buf.clone();
        bad[60] ^= 1;
        assert!(msg(&bad, &want).starts_with("corrupted"));
        assert!(msg(&buf, &Expected { config_fingerprint: 43, ..want }).contains("another configuration"));
        let mut other = s.tensors.clone();
        other[1].len = 9;
        assert!(msg(&buf, &Expected { tensors: &other, ..want }).contains("tensor 1"));
        assert!(msg(&buf, &Expected { groups: 3, ..want }).contains("groups"));
        assert!(msg(&buf, &Expected { tensors: &s.tensors[..1], ..want }).contains("1 registered here"));

        // Counts that do not add up are refused even with a valid checksum.
        let mut odd = s.clone();
        odd.schedule.as_mut().unwrap().single_steps = 4;
        let mut bytes = vec![0u8; size(2, 2, 5)];
        encode(&odd, 42, &mut bytes);
        assert!(msg(&bytes, &want).contains("do not add up"));
    }

    /// A version-1 file (no rho, no schedule block) still loads, as plain SAM.
    #[test]
    fn reads_version_1() {
        let s = sample();
        let mut buf = vec![0u8; size(2, 2, 5)];
        encode(&s, 42, &mut buf);
        // Version 1 is version 2 without the 64-byte block after the four leading payload fields.
        let mut v1 = buf[..HEADER + 32].to_vec();
        v1.extend_from_slice(&buf[HEADER + 32 + SCHEDULE_BYTES..buf.len() - TRAILER]);
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        let payload = (v1.len() - HEADER) as u64;
        v1[32..40].copy_from_slice(&payload.to_le_bytes());
        let crc = crc32(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        let want = Expected { config_fingerprint: 42, tensors: &s.tensors, groups: 2, state: 5 };
        assert_eq!(decode(&v1, &want).unwrap(), Snapshot { schedule: None, ..s });
    }
}
