//! What every wrapper shares: the device and stream of a tensor, programmatic dependent
//! launch (set once, before the first launch), error codes, dtype codes, device pointers, and
//! the profiling spin kernel.

use std::ffi::c_void;

use candle_core::{
    CudaDevice, DType, Device, Result, Storage, Tensor,
    cuda_backend::{
        CudaStorageSlice,
        cudarc::driver::{CudaSlice, DevicePtr},
    },
    quantized::{GgmlDType, QTensor},
};

use crate::ffi::{zopilot_set_pdl, zopilot_spin};

/// Whether `q` is a CUDA Q4K tensor whose row length (last dim) these kernels take (a
/// multiple of 256; the fused expert kernel also wants rows in multiples of 32).
pub fn q4k_applies(q: &QTensor) -> bool {
    let dims = q.shape().dims();
    q.dtype() == GgmlDType::Q4K
        && q.device().is_cuda()
        && dims.len() >= 2
        && dims[dims.len() - 1] % 256 == 0
}

pub(crate) fn cuda_dev(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        _ => candle_core::bail!("zopilot q4k kernels need CUDA tensors"),
    }
}

pub(crate) fn stream(dev: &CudaDevice) -> i64 {
    pdl_init();
    dev.cuda_stream().cu_stream() as i64
}

/// Profiling: the GPU spins `us` microseconds on the device's stream (the step trace's head
/// start, [`DecodeOptions::step_trace_head_us`](crate::options::DecodeOptions)).
pub fn spin(dev: &Device, us: i32) -> Result<()> {
    if let Device::Cuda(d) = dev {
        // SAFETY: a one-thread kernel on the device's stream; no pointers.
        check(unsafe { zopilot_spin(us, stream(d)) }, "spin")?;
    }
    Ok(())
}

/// Programmatic dependent launch for every kernel of ours ([`DecodeOptions::pdl`](crate::options::DecodeOptions); the
/// kernels take it only on Hopper and later): each may start while the one before it in the
/// stream finishes. Set once per process, before the first launch.
fn pdl_init() {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        // SAFETY: sets a flag the launchers read; no pointers are passed.
        unsafe { zopilot_set_pdl(i32::from(crate::options::get().pdl)) };
    });
}

pub(crate) fn check(code: i32, what: &str) -> Result<()> {
    if code != 0 {
        candle_core::bail!("{what}: CUDA error {code}");
    }
    Ok(())
}

pub(crate) fn dtype_code(dtype: DType) -> Result<i32> {
    Ok(match dtype {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
        other => candle_core::bail!("zopilot q4k kernels: no {other:?} activations"),
    })
}

/// [`dtype_code`] for the kernels that take only 16-bit activations (bf16, f16).
pub(crate) fn half_dtype_code(dtype: DType, what: &str) -> Result<i32> {
    match dtype_code(dtype) {
        Ok(code) if code != 0 => Ok(code),
        _ => candle_core::bail!("{what}: no {dtype:?}"),
    }
}

/// Device address of a contiguous tensor's first element.
pub(crate) fn tensor_ptr(t: &Tensor) -> Result<u64> {
    if !t.is_contiguous() {
        candle_core::bail!("zopilot q4k kernels need contiguous tensors");
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        candle_core::bail!("zopilot q4k kernels need CUDA tensors");
    };
    let offset = layout.start_offset();
    let ptr = match &s.slice {
        CudaStorageSlice::F32(x) => x.slice(offset..).device_ptr(x.stream()).0,
        CudaStorageSlice::BF16(x) => x.slice(offset..).device_ptr(x.stream()).0,
        CudaStorageSlice::F16(x) => x.slice(offset..).device_ptr(x.stream()).0,
        CudaStorageSlice::U32(x) => x.slice(offset..).device_ptr(x.stream()).0,
        CudaStorageSlice::I64(x) => x.slice(offset..).device_ptr(x.stream()).0,
        _ => candle_core::bail!("zopilot q4k kernels: unsupported dtype {:?}", t.dtype()),
    };
    Ok(ptr)
}

pub(crate) fn weight_ptr(q: &QTensor) -> Result<*const c_void> {
    Ok(q.device_ptr()? as *const c_void)
}

pub(crate) fn slice_ptr<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    s: &CudaSlice<T>,
) -> u64 {
    s.device_ptr(s.stream()).0
}
