//! Activation rows quantized to our int8 layout (`cuda/quantize.cu`).

use std::ffi::c_void;

use candle_core::{Result, Tensor};

use crate::ffi::zopilot_q8_quantize;
use crate::launch::{check, cuda_dev, dtype_code, stream, tensor_ptr};
use crate::pool::Q8Rows;

/// `x` `[rows, k]` (f32, bf16 or f16; `k` a multiple of 32) quantized to int8 rows.
pub fn quantize(x: &Tensor) -> Result<Q8Rows> {
    let dev = cuda_dev(x)?;
    let (rows, k) = x.dims2()?;
    if k % 32 != 0 || rows == 0 {
        candle_core::bail!("zopilot quantize: x [{rows}, {k}]");
    }
    let x = x.contiguous()?;
    let out = Q8Rows::alloc(&dev, rows, k)?;
    let (q, d, s) = out.ptrs(0);
    let code = unsafe {
        zopilot_q8_quantize(
            tensor_ptr(&x)? as *const c_void,
            dtype_code(x.dtype())?,
            k as i64,
            rows as i32,
            k as i32,
            q,
            d,
            s,
            stream(&dev),
        )
    };
    check(code, "zopilot quantize")?;
    Ok(out)
}
