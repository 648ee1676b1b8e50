//! The module visitors and mappers: finding a model's float parameters, copying the ones samopt
//! cannot bind where they are into allocations of their own, and finding each parameter's
//! gradient.
//!
//! Burn's tensors carry their rank in their type, so everything that touches a parameter's
//! tensor happens inside a visitor, where the rank is known.

use std::collections::HashMap;

use burn::Tensor;
use burn::module::{ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::Device;
use samopt::{Error, ErrorKind, Result};

use crate::locate::{self, Located};

/// A float parameter that requires a gradient, where it is now.
pub(crate) struct Found {
    pub id: ParamId,
    pub path: String,
    pub shape: Vec<usize>,
    pub located: Located,
}

/// The dotted module path of the parameter being visited.
#[derive(Default)]
struct Path(Vec<String>);

impl Path {
    fn enter(&mut self, name: &str) {
        self.0.push(name.to_owned());
    }

    fn exit(&mut self) {
        self.0.pop();
    }

    fn name(&self, id: ParamId) -> String {
        if self.0.is_empty() { format!("param {id}") } else { self.0.join(".") }
    }
}

/// Finds every float parameter that requires a gradient (frozen ones are left alone), once each
/// (the visitor meets a tied parameter once per use).
pub(crate) struct Survey<'a> {
    device: &'a Device,
    path: Path,
    found: Vec<Found>,
    seen: std::collections::HashSet<ParamId>,
    error: Option<Error>,
}

impl<'a> Survey<'a> {
    pub fn new(device: &'a Device) -> Self {
        Survey { device, path: Path::default(), found: Vec::new(), seen: Default::default(), error: None }
    }

    pub fn finish(self) -> Result<Vec<Found>> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.found),
        }
    }
}

impl ModuleVisitor for Survey<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.enter(name);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.error.is_some() || !self.seen.insert(param.id) {
            return;
        }
        let tensor: Tensor<D> = (**param).clone();
        let path = self.path.name(param.id);
        if !tensor.is_autodiff() {
            self.error = Some(Error::new(
                ErrorKind::InvalidArgument,
                format!("parameter `{path}` is not on an autodiff device: build the model on `device.autodiff()`"),
            ));
            return;
        }
        if !tensor.is_require_grad() {
            return;
        }
        if tensor.device().inner() != *self.device {
            self.error = Some(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "parameter `{path}` is on {:?}, not on samopt's device {:?} (moved with to_device?)",
                    tensor.device(),
                    self.device
                ),
            ));
            return;
        }
        let shape = tensor.dims().to_vec();
        match locate::locate(tensor, &|| format!("parameter `{path}`")) {
            Ok(located) => self.found.push(Found { id: param.id, path, shape, located }),
            Err(e) => self.error = Some(e),
        }
    }
}

/// Copies the parameters in `moves` into fresh allocations of their own (row-major, the whole of
/// their allocation, which the pool rounds up to its alignment: room for samopt's padding),
/// keeping id and autodiff state. On the device: zeros plus the flattened parameter, an
/// elementwise kernel whose output is a new allocation (or the zeros', made here), row-major.
pub(crate) struct Move<'a> {
    device: &'a Device,
    moves: &'a std::collections::HashSet<ParamId>,
    /// The last element's bytes of each moved 16-bit parameter with an odd length (see
    /// [`zero_padding`]).
    tails: HashMap<ParamId, [u8; 2]>,
}

impl<'a> Move<'a> {
    pub fn new(device: &'a Device, moves: &'a std::collections::HashSet<ParamId>) -> Self {
        Move { device, moves, tails: HashMap::new() }
    }

    pub fn finish(self) -> HashMap<ParamId, [u8; 2]> {
        self.tails
    }
}

impl ModuleMapper for Move<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !self.moves.contains(&param.id) {
            return param;
        }
        let (device, id) = (self.device, param.id);
        let mut tail = None;
        let param = param.map(|t| {
            let require_grad = t.is_require_grad();
            let (dims, dtype) = (t.dims(), t.dtype());
            let n = dims.iter().product::<usize>();
            // Flattened first: an elementwise kernel keeps a transposed input's strides.
            let flat: Tensor<1> = t.inner().reshape([n]);
            if dtype.size() == 2 && n % 2 == 1 {
                let last = flat.clone().slice([n - 1..n]).into_data();
                tail = Some([last.as_bytes()[0], last.as_bytes()[1]]);
            }
            let fresh = Tensor::<1>::zeros([n], (device, dtype)).add(flat).reshape(dims).autodiff();
            if require_grad { fresh.require_grad() } else { fresh }
        });
        if let Some(tail) = tail {
            self.tails.insert(id, tail);
        }
        param
    }
}

/// A fresh allocation of `padded` elements (zeros after the tensor's), holding `tensor`
/// flattened in row-major order.
pub(crate) fn padded_copy<const D: usize>(tensor: Tensor<D>, padded: usize, device: &Device) -> Tensor<1> {
    let n = tensor.shape().num_elements();
    let dtype = tensor.dtype();
    let flat: Tensor<1> = tensor.reshape([n]);
    Tensor::<1>::zeros([padded], (device, dtype)).slice_assign([0..n], flat)
}

/// Whether samopt can bind `at` in place as a tensor of `padded` elements (its own length rounded
/// up to 16 bytes): row-major, at an offset samopt can bind, not overlapping any range in `taken`
/// (same buffer), and either a multiple of 16 bytes or, when `own_allocation` says the bytes up to
/// the end of its allocation are its alone, with room there for the padding.
pub(crate) fn bindable(
    at: &Located,
    padded: usize,
    own_allocation: bool,
    align: u64,
    taken: &[(wgpu::Buffer, u64, u64)],
) -> bool {
    let bytes = padded as u64 * at.dtype.size() as u64;
    let end = at.offset + bytes;
    at.contiguous
        && at.offset.is_multiple_of(align)
        && (padded == at.len || (own_allocation && bytes <= at.alloc))
        && !taken.iter().any(|(b, s, e)| *b == at.buffer && at.offset < *e && *s < end)
}

/// Zeroes the padding samopt binds after a parameter's data in an allocation samopt-burn made
/// (bytes Burn never reads): padding stays zero through every pass, as its gradient is zero (and
/// no garbage NaN there reaches ASAM's norm). Queue writes are 4-byte aligned: a 16-bit parameter
/// of odd length ends mid-word, so that word is written whole, with `tail`, the last element's
/// bytes, read back when the parameter was copied.
pub(crate) fn zero_padding(queue: &wgpu::Queue, at: &Located, padded: usize, tail: Option<[u8; 2]>) {
    let (mut start, end) = (at.offset + at.bytes(), at.offset + (padded * at.dtype.size()) as u64);
    if start == end {
        return;
    }
    if start % 4 == 2 {
        let [a, b] = tail.expect("the last element of a 16-bit parameter of odd length was read when it was copied");
        queue.write_buffer(&at.buffer, start - 2, &[a, b, 0, 0]);
        start += 2;
    }
    if start < end {
        queue.write_buffer(&at.buffer, start, &[0u8; 16][..(end - start) as usize]);
    }
}

/// Where one parameter's gradient is bound for a pass.
pub(crate) struct BoundGrad {
    pub entry: usize,
    pub located: Located,
    /// The padded copy when the gradient was staged (kept alive while samopt reads it).
    pub staged: Option<Tensor<1>>,
    /// For a staged gradient: puts the copy back into the gradients, in the parameter's shape,
    /// once samopt is done with it (LookSAM writes its direction there for the host's
    /// optimizer; a view taken earlier would, under fusion, be a copy of the old values).
    pub give_back: Option<Box<dyn FnOnce(&mut GradientsParams)>>,
}

/// Finds each registered parameter's gradient in `grads`, copies into a padded allocation the
/// ones samopt cannot bind where they are (taking them out of `grads` until
/// [`BoundGrad::give_back`]), and a zero gradient for a parameter that got none.
pub(crate) struct GradBinder<'a> {
    pub device: &'a Device,
    pub align: u64,
    /// ParamId -> (entry, padded elements, path).
    pub index: &'a HashMap<ParamId, (usize, usize, String)>,
    pub grads: &'a mut GradientsParams,
    /// Byte ranges taken so far (the weights, then each bound gradient), per buffer.
    pub taken: Vec<(wgpu::Buffer, u64, u64)>,
    pub bound: Vec<BoundGrad>,
    seen: std::collections::HashSet<ParamId>,
    pub error: Option<Error>,
}

impl<'a> GradBinder<'a> {
    pub fn new(
        device: &'a Device,
        align: u64,
        index: &'a HashMap<ParamId, (usize, usize, String)>,
        grads: &'a mut GradientsParams,
        taken: Vec<(wgpu::Buffer, u64, u64)>,
    ) -> Self {
        GradBinder { device, align, index, grads, taken, bound: Vec::new(), seen: Default::default(), error: None }
    }

    fn bind<const D: usize>(&mut self, param: &Param<Tensor<D>>) -> Result<()> {
        let Some((entry, padded, path)) = self.index.get(&param.id) else { return Ok(()) };
        let (entry, padded) = (*entry, *padded);
        let dims = param.dims();
        let grad = match self.grads.remove::<D>(param.id) {
            Some(g) => g,
            // No gradient this step (the parameter did not take part in the loss): zero.
            None => Tensor::<D>::zeros(dims, (self.device, param.dtype())),
        };
        let what = || format!("the gradient of `{path}`");
        let located = locate::locate(grad.clone(), &what)?;
        if located.len != dims.iter().product::<usize>() || Some(located.dtype) != locate::element_type(param.dtype()) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{}: {} elements of {}, the parameter {dims:?} of {:?}",
                    what(),
                    located.len,
                    located.dtype.name(),
                    param.dtype()
                ),
            ));
        }
        // A gradient is bound where it is only when it needs no padding (samopt-burn cannot tell
        // whether the bytes after it are its own); the others are copied, padded with zeros.
        if bindable(&located, padded, false, self.align, &self.taken) {
            let s = located.offset;
            self.taken.push((located.buffer.clone(), s, s + (padded * located.dtype.size()) as u64));
            self.grads.register::<D>(param.id, grad);
            self.bound.push(BoundGrad { entry, located, staged: None, give_back: None });
            return Ok(());
        }
        drop(located);
        let staged = padded_copy(grad.inner(), padded, self.device);
        let located = locate::locate(staged.clone(), &what)?;
        if !located.offset.is_multiple_of(self.align) {
            return Err(Error::new(
                ErrorKind::Internal,
                format!("{}: Burn put its padded copy at offset {}", what(), located.offset),
            ));
        }
        let s = located.offset;
        self.taken.push((located.buffer.clone(), s, s + located.bytes()));
        let n: usize = dims.iter().product();
        let (id, copy) = (param.id, staged.clone());
        let give_back: Box<dyn FnOnce(&mut GradientsParams)> =
            Box::new(move |grads: &mut GradientsParams| grads.register::<D>(id, copy.slice([0..n]).reshape(dims)));
        self.bound.push(BoundGrad { entry, located, staged: Some(staged), give_back: Some(give_back) });
        Ok(())
    }
}

impl ModuleVisitor for GradBinder<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.error.is_some() || !self.seen.insert(param.id) {
            return;
        }
        if let Err(e) = self.bind(param) {
            self.error = Some(e);
        }
    }
}

/// Reads the float parameters that require a gradient (in samopt's registration order) and, with
/// `grads`, their gradients, to host `f32` values.
pub(crate) struct Reader<'a> {
    grads: Option<&'a GradientsParams>,
    path: Path,
    seen: std::collections::HashSet<ParamId>,
    pub out: Vec<(String, Vec<f32>)>,
}

impl<'a> Reader<'a> {
    pub fn new(grads: Option<&'a GradientsParams>) -> Self {
        Reader { grads, path: Path::default(), seen: Default::default(), out: Vec::new() }
    }
}

fn host_values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().expect("float data converts to f32")
}

impl ModuleVisitor for Reader<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.enter(name);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor: Tensor<D> = (**param).clone();
        if !tensor.is_require_grad() || !self.seen.insert(param.id) {
            return;
        }
        let values = match self.grads {
            None => host_values(tensor.inner()),
            Some(g) => match g.get::<D>(param.id) {
                Some(g) => host_values(g),
                None => vec![0.0; tensor.shape().num_elements()],
            },
        };
        self.out.push((self.path.name(param.id), values));
    }
}
