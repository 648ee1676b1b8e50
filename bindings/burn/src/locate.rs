//! Where a Burn tensor lives: its `wgpu::Buffer`, byte offset and layout, pinned while samopt
//! binds it.
//!
//! A float tensor of Burn's wgpu backend is a cubecl tensor (a handle into one of the memory
//! pool's pages, plus shape and strides), wrapped in a fusion tensor when Burn's `fusion` feature
//! is on. Fusion records operations lazily: resolving the tensor executes what it depends on and
//! gives back the cubecl tensor. The pool hands out slices of large buffers and may reuse or move a
//! slice once nothing holds it, so every range samopt binds is held through cubecl's
//! `ManagedResource`, which keeps the allocation alive and in place.

use burn::Tensor;
use burn::tensor::DType as BurnDType;
use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;
use cubecl_runtime::storage::ManagedResource;
use cubecl_wgpu::{AutoCompiler, WgpuResource, WgpuServer};
use samopt::{DType, Error, ErrorKind, Result};

/// A tensor's place in a wgpu buffer, pinned (the allocation stays alive and unmoved) while held.
pub(crate) struct Located {
    pub buffer: wgpu::Buffer,
    /// Byte offset of the first element in `buffer`.
    pub offset: u64,
    /// Elements.
    pub len: usize,
    pub dtype: DType,
    /// Row-major and dense: element `i` of the flattened tensor is at `offset + i * size`.
    pub contiguous: bool,
    /// Bytes from `offset` to the end of the tensor's allocation, when the tensor starts it
    /// (cubecl's pools round every allocation up to their alignment): the tensor's bytes, or
    /// more. Whether those extra bytes are the tensor's alone (and not the rest of a larger
    /// tensor this one is a view of) only the caller can know: samopt-burn binds them only in
    /// allocations it made itself.
    pub alloc: u64,
    _pin: ManagedResource<WgpuResource>,
}

impl Located {
    pub fn bytes(&self) -> u64 {
        self.len as u64 * self.dtype.size() as u64
    }
}

/// samopt's element type for a Burn float dtype.
pub(crate) fn element_type(dtype: BurnDType) -> Option<DType> {
    match dtype {
        BurnDType::F32 => Some(DType::F32),
        BurnDType::F16 => Some(DType::F16),
        BurnDType::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// The backend primitive of a float tensor, resolved to the cubecl tensor that holds its data:
/// itself without fusion, the fusion graph executed up to it with fusion.
#[diagnostic::on_unimplemented(
    message = "Burn's `fusion` feature is on: enable samopt-burn's `fusion` feature too (it is a default feature)"
)]
pub(crate) trait Resolve {
    fn resolve(self) -> CubeTensor;
}

impl Resolve for CubeTensor {
    fn resolve(self) -> CubeTensor {
        self
    }
}

#[cfg(feature = "fusion")]
impl Resolve for burn_fusion::FusionTensor<burn_cubecl::fusion::FusionCubeRuntime> {
    fn resolve(self) -> CubeTensor {
        let client = self.client.clone();
        client.resolve_tensor_float::<CubeBackend>(self)
    }
}

/// The cubecl backend as dispatch names it: `Fusion<CubeBackend>` or `CubeBackend`.
type Cube = burn::backend::Cube;

/// Finds `tensor` (a parameter or gradient; autodiff is dropped) in its wgpu buffer. `what`
/// names it in errors.
pub(crate) fn locate<const D: usize>(tensor: Tensor<D>, what: &dyn Fn() -> String) -> Result<Located>
where
    <Cube as burn::backend::BackendTypes>::FloatTensorPrimitive: Resolve,
{
    let dtype = tensor.dtype();
    let dtype = element_type(dtype).ok_or_else(|| {
        Error::new(ErrorKind::Unsupported, format!("{}: dtype {dtype:?}: samopt steps f32, f16 and bf16", what()))
    })?;
    let primitive = tensor.inner().try_into_primitive::<Cube>().map_err(|e| {
        Error::new(
            ErrorKind::Unsupported,
            format!(
                "{}: not a tensor of Burn's wgpu (cubecl) backend ({e:?}); samopt-burn runs on Burn's wgpu device",
                what()
            ),
        )
    })?;
    let cube = primitive.resolve();
    let contiguous = cube.is_contiguous();
    let len = cube.meta.shape().num_elements();
    let bytes = (len * dtype.size()) as u64;
    let alloc = if cube.handle.offset_start.unwrap_or(0) == 0 { cube.handle.size().max(bytes) } else { bytes };
    let resource = cube.client.get_resource::<WgpuServer<AutoCompiler>>(cube.handle.clone()).map_err(|e| {
        Error::new(
            ErrorKind::Device,
            format!("{}: Burn's wgpu runtime did not give its buffer ({e:?}); is the device a wgpu device?", what()),
        )
    })?;
    let (buffer, offset, size) = {
        let r = resource.resource();
        (r.buffer.clone(), r.offset, r.size)
    };
    let located = Located { buffer, offset, len, dtype, contiguous, alloc, _pin: resource };
    if contiguous && located.bytes() > size {
        return Err(Error::new(
            ErrorKind::Internal,
            format!("{}: {} bytes of data in a {size}-byte allocation", what(), located.bytes()),
        ));
    }
    Ok(located)
}
