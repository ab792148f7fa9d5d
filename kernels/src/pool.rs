//! Device buffers our kernels write: the per-thread scratch pool, quantized activation rows
//! (`Q8Rows`), outputs in the model's dtype (`Out`) and routing results (`Routing`).

use candle_core::{
    CudaDevice, CudaStorage, DType, Result, Shape, Storage, Tensor,
    cuda_backend::cudarc::driver::CudaSlice,
};

use crate::launch::slice_ptr;

/// Device scratch that goes back to a small per-thread pool when dropped instead of being
/// freed, and is taken from it by the next request of the same size on the same stream. Our
/// scratch (quantized activations, attention partials) is only ever touched by kernels on the
/// device's one stream, so a buffer dropped once its last use is queued can back the next
/// request: stream order puts that use before any later kernel's writes. A one-token step
/// makes about a hundred such requests; each pooled one saves a `cuMemAllocAsync` /
/// `cuMemFreeAsync` pair of host time, which at batch 1 is time the GPU waits for launches.
pub(crate) struct Scratch(Option<CudaSlice<u8>>);

thread_local! {
    static SCRATCH_POOL: std::cell::RefCell<Vec<CudaSlice<u8>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Most buffers the pool keeps per thread, and the largest it keeps (a prompt's activations
/// are freed as usual): at most 64 MiB of device memory held, where a one-token step reuses
/// about five buffers of a few KB to 40 KB.
const SCRATCH_POOL_MAX: usize = 16;
const SCRATCH_POOL_MAX_BYTES: usize = 4 << 20;

impl Scratch {
    /// `bytes` of uninitialised device memory (our kernels fill them).
    pub(crate) fn alloc(dev: &CudaDevice, bytes: usize) -> Result<Self> {
        let stream = dev.cuda_stream();
        let pooled = SCRATCH_POOL
            .try_with(|p| {
                let mut p = p.borrow_mut();
                let i = p.iter().rposition(|b| {
                    b.len() == bytes && std::sync::Arc::ptr_eq(b.stream(), &stream)
                })?;
                Some(p.swap_remove(i))
            })
            .ok()
            .flatten();
        match pooled {
            Some(b) => Ok(Self(Some(b))),
            // SAFETY: uninitialised bytes, written by our kernels before they are read.
            None => Ok(Self(Some(unsafe { dev.alloc::<u8>(bytes)? }))),
        }
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.0.as_ref().map_or(0, slice_ptr)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(b) = self.0.take().filter(|b| b.len() <= SCRATCH_POOL_MAX_BYTES) {
            // Outside the pool's thread-local lifetime `b` is freed; a full pool frees its
            // oldest buffer (sizes that stopped coming back, e.g. a past batch's).
            let _ = SCRATCH_POOL.try_with(|p| {
                let mut p = p.borrow_mut();
                if p.len() >= SCRATCH_POOL_MAX {
                    p.remove(0);
                }
                p.push(b);
            });
        }
    }
}

/// Rows of activations quantized to int8 with one f32 scale per 32 values and the
/// scaled sum of every 16 values (`cuda/common.cuh` has the layout), in one pooled buffer:
/// values, then scales, then sums, each part 256-byte aligned.
pub struct Q8Rows {
    pub(crate) buf: Scratch,
    pub(crate) rows: usize,
    pub(crate) k: usize,
}

impl Q8Rows {
    /// Byte offsets of the scales and the sums, and the whole size.
    pub(crate) fn layout(rows: usize, k: usize) -> (usize, usize, usize) {
        let d = (rows * k).next_multiple_of(256);
        let s = (d + rows * k / 32 * 4).next_multiple_of(256);
        (d, s, s + rows * k / 16 * 4)
    }

    /// Uninitialised buffers for `rows` rows of `k` values (our kernels fill them).
    pub(crate) fn alloc(dev: &CudaDevice, rows: usize, k: usize) -> Result<Self> {
        let (_, _, bytes) = Self::layout(rows, k);
        Ok(Self {
            buf: Scratch::alloc(dev, bytes)?,
            rows,
            k,
        })
    }

    /// Device addresses of the values, scales and sums from row `row` on.
    pub(crate) fn ptrs(&self, row: usize) -> (*mut i8, *mut f32, *mut f32) {
        let (d, s, _) = Self::layout(self.rows, self.k);
        let (base, k, row) = (self.buf.ptr(), self.k as u64, row as u64);
        (
            (base + row * k) as *mut i8,
            (base + d as u64 + row * k / 32 * 4) as *mut f32,
            (base + s as u64 + row * k / 16 * 4) as *mut f32,
        )
    }
}

/// An output buffer our kernels write (uninitialised until they do).
pub(crate) enum Out {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<half::bf16>),
    F16(CudaSlice<half::f16>),
}

impl Out {
    pub(crate) fn alloc(dev: &CudaDevice, dtype: DType, len: usize) -> Result<Self> {
        Ok(match dtype {
            DType::F32 => Self::F32(unsafe { dev.alloc::<f32>(len)? }),
            DType::BF16 => Self::BF16(unsafe { dev.alloc::<half::bf16>(len)? }),
            DType::F16 => Self::F16(unsafe { dev.alloc::<half::f16>(len)? }),
            other => candle_core::bail!("zopilot q4k kernels: no {other:?} output"),
        })
    }

    pub(crate) fn into_tensor(self, dev: &CudaDevice, rows: usize, n: usize) -> Tensor {
        let storage = match self {
            Self::F32(s) => CudaStorage::wrap_cuda_slice(s, dev.clone()),
            Self::BF16(s) => CudaStorage::wrap_cuda_slice(s, dev.clone()),
            Self::F16(s) => CudaStorage::wrap_cuda_slice(s, dev.clone()),
        };
        Tensor::from((Storage::Cuda(storage), Shape::from((rows, n))))
    }

    pub(crate) fn ptr(&self) -> u64 {
        match self {
            Self::F32(s) => slice_ptr(s),
            Self::BF16(s) => slice_ptr(s),
            Self::F16(s) => slice_ptr(s),
        }
    }
}

/// Device buffers for `rows` tokens' top-k routing: expert ids (u32) and weights (f32).
pub(crate) struct Routing {
    pub(crate) ids: CudaSlice<u32>,
    pub(crate) weights: CudaSlice<f32>,
}

impl Routing {
    pub(crate) fn alloc(dev: &CudaDevice, rows: usize, top_k: usize) -> Result<Self> {
        // SAFETY: written in full by the routing kernel before any read.
        Ok(Self {
            ids: unsafe { dev.alloc::<u32>(rows * top_k)? },
            weights: unsafe { dev.alloc::<f32>(rows * top_k)? },
        })
    }

    /// ids `[rows, top_k]` u32 and weights `[rows, top_k]` f32.
    pub(crate) fn into_tensors(
        self,
        dev: &CudaDevice,
        rows: usize,
        top_k: usize,
    ) -> (Tensor, Tensor) {
        let shape = Shape::from((rows, top_k));
        let ids = Tensor::from((
            Storage::Cuda(CudaStorage::wrap_cuda_slice(self.ids, dev.clone())),
            shape.clone(),
        ));
        let weights = Tensor::from((
            Storage::Cuda(CudaStorage::wrap_cuda_slice(self.weights, dev.clone())),
            shape,
        ));
        (ids, weights)
    }
}
