//! Prefill attention's scaled, masked softmax (`cuda/softmax.cu`): `softmax(att · scale +
//! mask)` over the last dimension in one launch, bit-identical to candle's `affine`,
//! `broadcast_add` and `softmax_last_dim` on bf16 or f16.

use std::ffi::c_void;

use candle_core::{DType, Result, Tensor};

use crate::ffi::zopilot_masked_softmax;
use crate::launch::{check, cuda_dev, half_dtype_code, stream, tensor_ptr};
use crate::pool::Out;

/// `softmax_last_dim((att * scale).broadcast_add(mask))` for raw attention scores `att`
/// `[b, h, q, k]` (candle's `affine(scale, 0)` rounding: the factors rounded to the dtype as
/// candle rounds them) and
/// a mask `[q, k]` (every batch entry and head), `[1, q, k]` / `[1, 1, q, k]`, or `[b, q, k]`
/// / `[b, 1, q, k]` (per batch entry), both contiguous CUDA bf16 or f16 of one dtype. `None`
/// when the inputs are not of that form (the caller then takes candle's two kernels).
pub fn masked_softmax(att: &Tensor, mask: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let Ok((b, h, q, k)) = att.dims4() else {
        return Ok(None);
    };
    let mdims = mask.dims();
    let mask_batch_rows = match mdims {
        [mq, mk] if (*mq, *mk) == (q, k) => 0,
        [1, mq, mk] | [1, 1, mq, mk] if (*mq, *mk) == (q, k) => 0,
        [mb, mq, mk] | [mb, 1, mq, mk] if (*mb, *mq, *mk) == (b, q, k) => q,
        _ => return Ok(None),
    };
    let Ok(dtype_code) = half_dtype_code(att.dtype(), "masked softmax") else {
        return Ok(None);
    };
    if !att.device().is_cuda()
        || mask.dtype() != att.dtype()
        || !att.is_contiguous()
        || !mask.is_contiguous()
        || b * h * q == 0
        || k == 0
        || k > i32::MAX as usize
        || q > i32::MAX as usize
        || h > i32::MAX as usize
    {
        return Ok(None);
    }
    // What candle's affine hands its kernel: `T::from_f64` of the factors.
    let (mul_bits, add_bits) = match att.dtype() {
        DType::BF16 => (
            half::bf16::from_f64(scale).to_bits(),
            half::bf16::from_f64(0.0).to_bits(),
        ),
        _ => (
            half::f16::from_f64(scale).to_bits(),
            half::f16::from_f64(0.0).to_bits(),
        ),
    };
    let dev = cuda_dev(att)?;
    let rows = b * h * q;
    let out = Out::alloc(&dev, att.dtype(), rows * k)?;
    // SAFETY: att and mask are contiguous CUDA tensors of the shapes checked above; out holds
    // rows · k elements of their dtype, written in full by the kernel.
    let code = unsafe {
        zopilot_masked_softmax(
            tensor_ptr(att)? as *const c_void,
            tensor_ptr(mask)? as *const c_void,
            out.ptr() as *mut c_void,
            rows as i64,
            k as i32,
            q as i32,
            h as i32,
            mask_batch_rows as i32,
            mul_bits,
            add_bits,
            dtype_code,
            stream(&dev),
        )
    };
    check(code, "zopilot masked softmax")?;
    Ok(Some(out.into_tensor(&dev, rows, k).reshape((b, h, q, k))?))
}
