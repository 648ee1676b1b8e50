//! Registration: tensors in host memory, in the host's device buffers, or allocated by the
//! optimizer; their data; parameter groups; and the overlap checks on host byte ranges.

use super::{Group, GroupId, Optimizer, TensorId, TensorInfo};
use crate::backend::{HostTensor, Part, Passes};
use crate::config::Backend;
use crate::dtype::{DType, Element};
use crate::error::{Error, ErrorKind, Result};

impl Optimizer {
    /// What every new tensor must pass, however it is registered: the optimizer idle, at least
    /// one element, room for another id, a byte size inside the address space (returned).
    pub(super) fn check_new_tensor(&self, what: &str, len: usize, dtype: DType) -> Result<usize> {
        self.expect_idle(what)?;
        if len == 0 {
            return Err(Error::invalid("len = 0: a tensor needs at least one element"));
        }
        if self.tensors.len() >= TensorId::MAX as usize {
            return Err(Error::invalid(format!("too many tensors: {}", self.tensors.len())));
        }
        len.checked_mul(dtype.size()).filter(|&b| b <= isize::MAX as usize).ok_or_else(|| {
            Error::invalid(format!("len = {len}: {len} elements of {} overflow the address space", dtype.name()))
        })
    }

    /// Registers a tensor in host device buffers: `add` hands them to the backend, which refuses
    /// (`unsupported`) when there is none.
    pub(super) fn register_in_place(
        &mut self,
        (len, dtype, grad_writable): (usize, DType, bool),
        unsupported: &str,
        add: impl FnOnce(&mut Box<dyn Passes>) -> Result<()>,
    ) -> Result<TensorId> {
        self.check_new_tensor("register a tensor", len, dtype)?;
        add(self.passes.as_mut().ok_or_else(|| Error::new(ErrorKind::Unsupported, unsupported))?)?;
        self.push_tensor(len, dtype, false, grad_writable);
        Ok((self.tensors.len() - 1) as TensorId)
    }

    /// Registers a tensor that lives in the host's wgpu buffers (on the device given to
    /// [`on_wgpu_device`](Self::on_wgpu_device)): `len` elements of `dtype` at byte `param_offset`
    /// of `param` and `grad_offset` of `grad`. The passes read and write them in place; samopt
    /// keeps its backup and state in buffers of its own. Both buffers need the `STORAGE` usage,
    /// offsets a multiple of the device's `min_storage_buffer_offset_alignment`, and the tensor a
    /// multiple of 16 bytes; each is checked, and a failure changes nothing.
    pub fn register_wgpu(
        &mut self,
        param: &wgpu::Buffer,
        param_offset: u64,
        grad: &wgpu::Buffer,
        grad_offset: u64,
        len: usize,
        dtype: DType,
    ) -> Result<TensorId> {
        self.register_wgpu_with((param, param_offset), (grad, grad_offset), (len, dtype, false))
    }

    /// [`register_wgpu`](Self::register_wgpu) with a gradient samopt may write: LookSAM without a
    /// built-in base optimizer writes its direction there for the host's optimizer (as
    /// `SAM_REGISTER_GRAD_WRITABLE` does for host buffers). Nothing else writes a gradient.
    pub fn register_wgpu_writable(
        &mut self,
        param: &wgpu::Buffer,
        param_offset: u64,
        grad: &wgpu::Buffer,
        grad_offset: u64,
        len: usize,
        dtype: DType,
    ) -> Result<TensorId> {
        self.register_wgpu_with((param, param_offset), (grad, grad_offset), (len, dtype, true))
    }

    fn register_wgpu_with(
        &mut self,
        (param, param_offset): (&wgpu::Buffer, u64),
        (grad, grad_offset): (&wgpu::Buffer, u64),
        tensor: (usize, DType, bool),
    ) -> Result<TensorId> {
        let external = crate::gpu::External { param: param.clone(), param_offset, grad: grad.clone(), grad_offset };
        let (len, dtype, _) = tensor;
        self.register_in_place(tensor, "register_wgpu needs an optimizer from on_wgpu_device", |passes| {
            passes.add_external(external, len, dtype)
        })
    }

    /// Re-points tensor `id`, registered with [`register_wgpu`](Self::register_wgpu), at other
    /// device buffers of the same size (checked as at registration, its own old ranges excepted),
    /// keeping its state: for engines whose allocator moves tensors between steps. The new
    /// parameter range must hold the weights. Refused between the two steps; a refused call
    /// changes nothing. Nothing is copied: the next pass rebuilds that tensor's bindings.
    pub fn rebind_wgpu(
        &mut self,
        id: TensorId,
        param: &wgpu::Buffer,
        param_offset: u64,
        grad: &wgpu::Buffer,
        grad_offset: u64,
    ) -> Result<()> {
        self.rebind_wgpu_many(&[(id, param, param_offset, grad, grad_offset)])
    }

    /// [`rebind_wgpu`](Self::rebind_wgpu) for several tensors at once, all or nothing: each item
    /// is `(id, param, param_offset, grad, grad_offset)`. The overlap checks see the ranges as
    /// they will be after the call, so a host whose allocator gives one tensor's old range to
    /// another between steps (fresh gradients in freed slots, as Burn's pool does) rebinds them
    /// together where one at a time would be refused.
    pub fn rebind_wgpu_many(&mut self, items: &[(TensorId, &wgpu::Buffer, u64, &wgpu::Buffer, u64)]) -> Result<()> {
        let mut externals = Vec::with_capacity(items.len());
        for &(id, param, param_offset, grad, grad_offset) in items {
            self.device_tensor(id, "rebind a tensor")?;
            let external = crate::gpu::External { param: param.clone(), param_offset, grad: grad.clone(), grad_offset };
            externals.push((id as usize, external));
        }
        self.passes()?.rebind_externals(externals)
    }

    /// Re-points a `register_vulkan` tensor at other `VkBuffer` ranges, keeping its state.
    ///
    /// # Safety
    /// As [`register_vulkan`](Self::register_vulkan) for the new buffers.
    pub(crate) unsafe fn rebind_vulkan(&mut self, id: TensorId, param: (u64, u64), grad: (u64, u64)) -> Result<()> {
        self.device_tensor(id, "rebind a tensor")?;
        // SAFETY: the caller's contract, passed on.
        unsafe { self.passes()?.rebind_vulkan(id as usize, param, grad) }
    }

    /// Re-points the gradients of tensors registered with [`register_wgpu`](Self::register_wgpu)
    /// at other device ranges (`(id, grad, grad_offset)` each), all or nothing, checked as at
    /// registration against the ranges after the call. Unlike [`rebind_wgpu`](Self::rebind_wgpu)
    /// it is allowed between the two steps too: the weights stay where they are (the restore
    /// needs them there), and only the buffer the next pass reads the gradient from changes. For
    /// engines whose backward writes every gradient into a fresh tensor (Burn's autodiff):
    /// rebind before the first step to the first gradient, and again before the second step to
    /// the gradient at the perturbed point. Nothing is copied.
    pub fn rebind_wgpu_grads(&mut self, items: &[(TensorId, &wgpu::Buffer, u64)]) -> Result<()> {
        let mut grads = Vec::with_capacity(items.len());
        for &(id, grad, grad_offset) in items {
            self.device_tensor_any_phase(id)?;
            grads.push((id as usize, grad.clone(), grad_offset));
        }
        self.passes()?.rebind_external_grads(grads)
    }

    /// Checks that `id` is a tensor in device buffers and the optimizer is idle.
    fn device_tensor(&self, id: TensorId, action: &str) -> Result<()> {
        self.expect_idle(action)?;
        self.device_tensor_any_phase(id)
    }

    /// Checks that `id` is a tensor in device buffers.
    fn device_tensor_any_phase(&self, id: TensorId) -> Result<()> {
        let count = self.tensors.len();
        let t = self
            .tensors
            .get(id as usize)
            .ok_or_else(|| Error::invalid(format!("id = {id}: only {count} tensors are registered")))?;
        if t.owned {
            return Err(Error::invalid(format!(
                "id = {id}: a tensor the optimizer allocated (add_tensor / sam_tensor_create) has no buffers to rebind"
            )));
        }
        if t.host.is_some() {
            return Err(Error::invalid(format!(
                "id = {id}: a tensor in host memory: rebind it with rebind_host_raw / sam_rebind_host"
            )));
        }
        Ok(())
    }

    /// Registers a tensor in the host's `VkBuffer`s (handles and byte offsets).
    ///
    /// # Safety
    /// Both buffers must be live buffers of the optimizer's `VkDevice` with the STORAGE_BUFFER
    /// usage, unused by the host during samopt's calls, for the optimizer's lifetime.
    pub(crate) unsafe fn register_vulkan(
        &mut self,
        param: (u64, u64),
        grad: (u64, u64),
        len: usize,
        dtype: DType,
    ) -> Result<TensorId> {
        self.register_in_place(
            (len, dtype, false),
            "Vulkan buffers need an optimizer from sam_create_vulkan",
            |passes| {
                // SAFETY: the caller's contract, passed on.
                unsafe { passes.add_vulkan(param, grad, len, dtype) }
            },
        )
    }

    /// Registers a parameter buffer and its gradient buffer, both owned by the host.
    ///
    /// Checks, and refuses with [`ErrorKind::InvalidArgument`]: NULL or misaligned pointers,
    /// `len == 0`, a byte size or range that overflows, parameter and gradient overlapping each
    /// other or any range registered before (the same buffer twice included). With
    /// [`ErrorKind::InvalidState`]: registering between a first and a second step.
    ///
    /// # Safety
    /// `param` must be valid for reads and writes and `grad` for reads of `len` elements of
    /// `dtype`, for as long as the optimizer lives; the host must not access them while an
    /// optimizer call runs, and writes the gradient only between calls.
    pub unsafe fn register_host_raw(
        &mut self,
        param: *mut u8,
        grad: *const u8,
        len: usize,
        dtype: DType,
    ) -> Result<TensorId> {
        // SAFETY: the caller's contract, passed on; the gradient is only read.
        unsafe { self.register_host_impl(param, grad, len, dtype, false) }
    }

    /// As [`register_host_raw`](Self::register_host_raw), and samopt may also write the gradient
    /// buffer: the one case is per-shard SAM without a built-in base optimizer, whose second step
    /// leaves the mean of the shards' gradients there for the host's optimizer
    /// ([`accumulate_step`](Self::accumulate_step)). Nothing else writes a gradient.
    ///
    /// # Safety
    /// As [`register_host_raw`](Self::register_host_raw), and `grad` must be valid for writes.
    pub unsafe fn register_host_writable_raw(
        &mut self,
        param: *mut u8,
        grad: *mut u8,
        len: usize,
        dtype: DType,
    ) -> Result<TensorId> {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.register_host_impl(param, grad, len, dtype, true) }
    }

    /// # Safety
    /// As [`register_host_raw`](Self::register_host_raw); `grad` valid for writes if `grad_writable`.
    unsafe fn register_host_impl(
        &mut self,
        param: *mut u8,
        grad: *const u8,
        len: usize,
        dtype: DType,
        grad_writable: bool,
    ) -> Result<TensorId> {
        let bytes = self.check_new_tensor("register a tensor", len, dtype)?;
        let p = Self::check_range("param", param as usize, bytes, dtype)?;
        let g = Self::check_range("grad", grad as usize, bytes, dtype)?;
        if p.start < g.end && g.start < p.end {
            return Err(Error::invalid(format!(
                "param = {param:p} and grad = {grad:p} overlap ({bytes} bytes each): they must be separate buffers"
            )));
        }
        for (name, r) in [("param", &p), ("grad", &g)] {
            if let Some(other) = self.overlapping(r) {
                return Err(Error::invalid(format!(
                    "{name} = {:#x} ({bytes} bytes) overlaps a buffer of tensor {other}, registered before",
                    r.start
                )));
            }
        }
        let id = self.tensors.len() as TensorId;
        self.add_to_backend(false, |passes| passes.add_host(HostTensor { param, grad, len, dtype }))?;
        self.ranges.insert(p.start, (p.end, id));
        self.ranges.insert(g.start, (g.end, id));
        self.push_tensor(len, dtype, false, grad_writable);
        self.tensors.last_mut().expect("pushed above").host = Some((p.start, g.start));
        Ok(id)
    }

    /// Re-points host tensor `id` at new parameter and gradient buffers of the same length and
    /// dtype, keeping everything samopt holds for it (momentum or Adam's moments, LookSAM's `g_v`,
    /// master weights, its group and update count): for hosts that reallocate their buffers
    /// between steps (PyTorch's `zero_grad(set_to_none=True)`, arena allocators). The new `param`
    /// must hold the tensor's current weights (samopt does not copy them over). The checks are
    /// registration's (NULL, alignment, `param` and `grad` disjoint and disjoint from every other
    /// tensor's buffers; the tensor's own old buffers may be reused), and it is refused between the
    /// two steps; a refused call changes nothing. The gradient keeps the writability it was
    /// registered with. Costs a few map updates: cheap enough for every tensor at every step.
    /// When several tensors move at once (an allocator hands one tensor's old address to another),
    /// rebind them together with [`rebind_hosts_raw`](Self::rebind_hosts_raw).
    ///
    /// # Safety
    /// As [`register_host_raw`](Self::register_host_raw) for the new buffers (and `grad` valid for
    /// writes when the tensor was registered with a writable gradient); the old buffers are not
    /// touched again.
    pub unsafe fn rebind_host_raw(&mut self, id: TensorId, param: *mut u8, grad: *const u8) -> Result<()> {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.rebind_hosts_raw(&[(id, param, grad)]) }
    }

    /// [`rebind_host_raw`](Self::rebind_host_raw) for several tensors at once, all or nothing: the
    /// new buffers are checked against each other and against the tensors that do not move, so a
    /// buffer may take over an address another moving tensor held until now.
    ///
    /// # Safety
    /// As [`rebind_host_raw`](Self::rebind_host_raw), for every item.
    pub unsafe fn rebind_hosts_raw(&mut self, items: &[(TensorId, *mut u8, *const u8)]) -> Result<()> {
        self.expect_idle("rebind a tensor")?;
        let count = self.tensors.len();
        let mut checked = Vec::with_capacity(items.len());
        for (k, &(id, param, grad)) in items.iter().enumerate() {
            let info = *self
                .tensors
                .get(id as usize)
                .ok_or_else(|| Error::invalid(format!("id = {id}: only {count} tensors are registered")))?;
            let Some(old) = info.host else {
                return Err(Error::invalid(format!(
                    "id = {id}: not a tensor in host buffers (it was allocated by the optimizer or registered in \
                     device buffers); only sam_register_host tensors are rebound"
                )));
            };
            if items[..k].iter().any(|&(other, ..)| other == id) {
                return Err(Error::invalid(format!("id = {id} appears twice")));
            }
            let bytes = info.len * info.dtype.size();
            let p = Self::check_range("param", param as usize, bytes, info.dtype)?;
            let g = Self::check_range("grad", grad as usize, bytes, info.dtype)?;
            if p.start < g.end && g.start < p.end {
                return Err(Error::invalid(format!(
                    "param = {param:p} and grad = {grad:p} of tensor {id} overlap ({bytes} bytes each): they must be \
                     separate buffers"
                )));
            }
            checked.push((id, info, old, p, g));
        }
        // The moving tensors' old ranges do not count: take them out, put the new ones in one by
        // one (so that new overlapping new is caught too), and undo it all if anything clashes.
        let mut old_ranges = Vec::with_capacity(2 * checked.len());
        for &(_, _, (old_p, old_g), _, _) in &checked {
            for start in [old_p, old_g] {
                if let Some(range) = self.ranges.remove(&start) {
                    old_ranges.push((start, range));
                }
            }
        }
        let mut inserted = Vec::with_capacity(2 * checked.len());
        let mut clash = None;
        'check: for (id, info, _, p, g) in &checked {
            for (name, r) in [("param", p), ("grad", g)] {
                if let Some(other) = self.overlapping(r) {
                    let bytes = info.len * info.dtype.size();
                    clash = Some(Error::invalid(format!(
                        "{name} = {:#x} ({bytes} bytes) of tensor {id} overlaps a buffer of tensor {other}",
                        r.start
                    )));
                    break 'check;
                }
                self.ranges.insert(r.start, (r.end, *id));
                inserted.push(r.start);
            }
        }
        let passes = if clash.is_none() { self.passes().err() } else { None };
        if let Some(e) = clash.or(passes) {
            for start in inserted {
                self.ranges.remove(&start);
            }
            self.ranges.extend(old_ranges);
            return Err(e);
        }
        let passes = self.passes.as_mut().expect("checked above");
        for &(id, info, _, ref p, ref g) in &checked {
            let host =
                HostTensor { param: p.start as *mut u8, grad: g.start as *const u8, len: info.len, dtype: info.dtype };
            // Infallible on both backends (new addresses only); checked before anything changed.
            passes.rebind_host(id as usize, host)?;
            self.tensors[id as usize].host = Some((p.start, g.start));
        }
        Ok(())
    }

    /// Hands a new tensor to the backend (created now under AUTO: `owned` says for which kind of
    /// tensor); if that fails, an AUTO optimizer is left undecided, as it was.
    fn add_to_backend(&mut self, owned: bool, add: impl FnOnce(&mut Box<dyn Passes>) -> Result<()>) -> Result<()> {
        let undecided = self.passes.is_none();
        let result = self.passes_for(owned).and_then(add);
        if result.is_err() && undecided {
            self.passes = None;
            self.backend = Backend::Auto;
        }
        result
    }

    /// Typed form of [`register_host_raw`](Self::register_host_raw).
    ///
    /// # Safety
    /// As [`register_host_raw`](Self::register_host_raw).
    pub unsafe fn register_host<T: Element>(&mut self, param: *mut T, grad: *const T, len: usize) -> Result<TensorId> {
        unsafe { self.register_host_raw(param.cast(), grad.cast(), len, T::DTYPE) }
    }

    /// Typed form of [`register_host_writable_raw`](Self::register_host_writable_raw).
    ///
    /// # Safety
    /// As [`register_host_writable_raw`](Self::register_host_writable_raw).
    pub unsafe fn register_host_writable<T: Element>(
        &mut self,
        param: *mut T,
        grad: *mut T,
        len: usize,
    ) -> Result<TensorId> {
        unsafe { self.register_host_writable_raw(param.cast(), grad.cast(), len, T::DTYPE) }
    }

    /// Allocates a parameter/gradient pair of `len` zeros, owned by the optimizer: in host memory
    /// on the CPU backend, on the device on the GPU backend (where the optimizer's state then stays
    /// too). Write and read it with [`write_param`](Self::write_param),
    /// [`write_grad`](Self::write_grad), [`read_param`](Self::read_param); on the CPU also
    /// through slices ([`param`](Self::param), [`grad_mut`](Self::grad_mut)).
    pub fn add_zeroed_tensor(&mut self, len: usize, dtype: DType) -> Result<TensorId> {
        self.check_new_tensor("add a tensor", len, dtype)?;
        self.add_to_backend(true, |passes| passes.add_owned(len, dtype))?;
        self.push_tensor(len, dtype, true, true);
        Ok((self.tensors.len() - 1) as TensorId)
    }

    /// [`add_zeroed_tensor`](Self::add_zeroed_tensor), with the parameter set to `init`.
    pub fn add_tensor<T: Element>(&mut self, init: &[T]) -> Result<TensorId> {
        let id = self.add_zeroed_tensor(init.len(), T::DTYPE)?;
        self.write_param(id, init)?;
        Ok(id)
    }

    /// Checks that `id` is an owned tensor of `T` with `len` elements.
    pub(super) fn owned_info<T: Element>(&self, id: TensorId, len: Option<usize>) -> Result<TensorInfo> {
        let info = *self.tensors.get(id as usize).filter(|t| t.owned).ok_or_else(|| {
            Error::invalid(format!("id = {id}: not a tensor allocated by the optimizer (add_tensor)"))
        })?;
        if info.dtype != T::DTYPE {
            return Err(Error::invalid(format!(
                "id = {id}: the tensor holds {}, not {}",
                info.dtype.name(),
                T::DTYPE.name()
            )));
        }
        if let Some(len) = len.filter(|&l| l != info.len) {
            return Err(Error::invalid(format!("len = {len}: tensor {id} has {} elements", info.len)));
        }
        Ok(info)
    }

    /// [`write_param`](Self::write_param) or [`write_grad`](Self::write_grad) by `part`.
    pub(crate) fn write_owned_part<T: Element>(&mut self, id: TensorId, part: Part, data: &[T]) -> Result<()> {
        self.write_part(id, part, data)
    }

    /// [`read_param`](Self::read_param) or [`read_grad`](Self::read_grad) by `part`.
    pub(crate) fn read_owned_part<T: Element>(&mut self, id: TensorId, part: Part, out: &mut [T]) -> Result<()> {
        self.read_part(id, part, out)
    }

    pub(super) fn write_part<T: Element>(&mut self, id: TensorId, part: Part, data: &[T]) -> Result<()> {
        self.owned_info::<T>(id, Some(data.len()))?;
        self.passes()?.write_owned(id as usize, part, bytemuck::cast_slice(data))
    }

    pub(super) fn read_part<T: Element>(&mut self, id: TensorId, part: Part, out: &mut [T]) -> Result<()> {
        self.owned_info::<T>(id, Some(out.len()))?;
        self.passes()?.read_owned(id as usize, part, bytemuck::cast_slice_mut(out))
    }

    /// Overwrites the parameter of an owned tensor (`data.len()` must be its length). Between the
    /// two steps a write is overwritten by the restore.
    pub fn write_param<T: Element>(&mut self, id: TensorId, data: &[T]) -> Result<()> {
        self.write_part(id, Part::Param, data)
    }

    /// Overwrites the gradient of an owned tensor (`data.len()` must be its length).
    pub fn write_grad<T: Element>(&mut self, id: TensorId, data: &[T]) -> Result<()> {
        self.write_part(id, Part::Grad, data)
    }

    /// Copies the parameter of an owned tensor into `out`: `w`, or `w + e(w)` between the steps.
    pub fn read_param<T: Element>(&mut self, id: TensorId, out: &mut [T]) -> Result<()> {
        self.read_part(id, Part::Param, out)
    }

    /// Copies the gradient of an owned tensor into `out`.
    pub fn read_grad<T: Element>(&mut self, id: TensorId, out: &mut [T]) -> Result<()> {
        self.read_part(id, Part::Grad, out)
    }

    /// Host addresses of an owned tensor that lives in host memory.
    pub(super) fn host_owned<T: Element>(&self, id: TensorId) -> Result<(TensorInfo, *mut u8, *mut u8)> {
        let info = self.owned_info::<T>(id, None)?;
        let (p, g) = self.passes.as_ref().and_then(|p| p.owned_host_ptrs(id as usize)).ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                format!("id = {id}: the tensor lives on the GPU; use read_param/write_param/write_grad"),
            )
        })?;
        Ok((info, p, g))
    }

    /// The parameter of an owned tensor in host memory (CPU backend): `w`, or `w + e(w)` between
    /// the two steps.
    pub fn param<T: Element>(&self, id: TensorId) -> Result<&[T]> {
        let (info, p, _) = self.host_owned::<T>(id)?;
        // SAFETY: an owned, T-aligned host buffer of `len` elements, alive as long as `self`,
        // written only through `&mut self`.
        Ok(unsafe { std::slice::from_raw_parts(p.cast::<T>(), info.len) })
    }

    /// The parameter of an owned tensor in host memory, for the host's own update.
    pub fn param_mut<T: Element>(&mut self, id: TensorId) -> Result<&mut [T]> {
        let (info, p, _) = self.host_owned::<T>(id)?;
        // SAFETY: as in `param`; `&mut self` makes the borrow exclusive.
        Ok(unsafe { std::slice::from_raw_parts_mut(p.cast::<T>(), info.len) })
    }

    /// The gradient of an owned tensor in host memory, for the host to fill.
    pub fn grad_mut<T: Element>(&mut self, id: TensorId) -> Result<&mut [T]> {
        let (info, _, g) = self.host_owned::<T>(id)?;
        // SAFETY: as in `param_mut`.
        Ok(unsafe { std::slice::from_raw_parts_mut(g.cast::<T>(), info.len) })
    }

    /// Adds a parameter group with its learning-rate scale (`lr * lr_scale` is its learning rate)
    /// and weight decay (`None`: group 0's). Group 0 holds every tensor until
    /// [`set_group`](Self::set_group) moves it; the gradient norm stays one global norm over all
    /// groups, as in the reference.
    pub fn add_group(&mut self, lr_scale: f64, weight_decay: Option<f64>) -> Result<GroupId> {
        if !(lr_scale.is_finite() && lr_scale >= 0.0) {
            return Err(Error::invalid(format!("lr_scale = {lr_scale}: must be finite and >= 0")));
        }
        let weight_decay = weight_decay.unwrap_or(self.groups[0].weight_decay);
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return Err(Error::invalid(format!("weight_decay = {weight_decay}: must be finite and >= 0")));
        }
        if self.groups.len() >= GroupId::MAX as usize {
            return Err(Error::invalid("too many groups"));
        }
        self.groups.push(Group { lr_scale, weight_decay });
        Ok((self.groups.len() - 1) as GroupId)
    }

    /// Moves tensor `id` into `group`. Between the two steps this is refused.
    pub fn set_group(&mut self, id: TensorId, group: GroupId) -> Result<()> {
        self.expect_idle("change a tensor's group")?;
        if group as usize >= self.groups.len() {
            return Err(Error::invalid(format!("group = {group}: only {} groups exist", self.groups.len())));
        }
        let count = self.tensors.len();
        let t = self
            .tensors
            .get_mut(id as usize)
            .ok_or_else(|| Error::invalid(format!("id = {id}: only {count} tensors are registered")))?;
        t.group = group;
        let cohort = (group, t.epoch);
        if let Some(p) = self.passes.as_mut() {
            p.set_cohort(id as usize, cohort);
        }
        Ok(())
    }

    /// The group of tensor `id`.
    pub fn group(&self, id: TensorId) -> Option<GroupId> {
        self.tensors.get(id as usize).map(|t| t.group)
    }

    pub(super) fn push_tensor(&mut self, len: usize, dtype: DType, owned: bool, grad_writable: bool) {
        let epoch = self.steps;
        self.tensors.push(TensorInfo { len, dtype, owned, grad_writable, host: None, group: 0, updates: 0, epoch });
        // A local norm from before this tensor no longer covers every tensor.
        self.local_sum_sq = None;
        let id = self.tensors.len() - 1;
        if let Some(p) = self.passes.as_mut() {
            p.set_cohort(id, (0, epoch));
        }
    }

    pub(super) fn check_range(name: &str, addr: usize, bytes: usize, dtype: DType) -> Result<std::ops::Range<usize>> {
        if addr == 0 {
            return Err(Error::new(ErrorKind::NullPointer, format!("{name} is NULL")));
        }
        if !addr.is_multiple_of(dtype.size()) {
            return Err(Error::invalid(format!(
                "{name} = {addr:#x} is not aligned to {} bytes, as {} elements need",
                dtype.size(),
                dtype.name()
            )));
        }
        let end = addr.checked_add(bytes).ok_or_else(|| {
            Error::invalid(format!("{name} = {addr:#x} plus {bytes} bytes overflows the address space"))
        })?;
        Ok(addr..end)
    }

    /// The tensor whose registered range overlaps `r`, if any.
    pub(super) fn overlapping(&self, r: &std::ops::Range<usize>) -> Option<TensorId> {
        // The last range starting before r.end is the only candidate: registered ranges are
        // pairwise disjoint, so earlier ones end before it starts.
        let (_, &(end, id)) = self.ranges.range(..r.end).next_back()?;
        (end > r.start).then_some(id)
    }
}
