//! Q4K → f16 dequantization (`cuda/dequantize.cu`): cuBLAS's input at prefill sizes, for the
//! host-routed grouped MoE path and the dense layers.

use std::ffi::c_void;

use candle_core::{CudaDevice, DType, Result, Tensor};

use crate::ffi::zopilot_q4k_dequant_f16;
use crate::launch::{check, stream};
use crate::pool::Out;

/// `n × k` values of Q4K blocks at `src` (an address inside `dev`'s memory, e.g. one expert
/// of a stacked tensor) dequantized to an f16 `[n, k]` tensor: 2.95 TB/s of reads and writes
/// on an H100 (kernel bench), ~4× candle's kernel; every prefill runs it for each expert with
/// more than 16 tokens and each dense layer.
pub fn dequant_q4k_f16(dev: &CudaDevice, src: u64, n: usize, k: usize) -> Result<Tensor> {
    if k % 256 != 0 {
        candle_core::bail!("zopilot dequant: row length {k} is not a multiple of 256");
    }
    let out = Out::alloc(dev, DType::F16, n * k)?;
    let code = unsafe {
        zopilot_q4k_dequant_f16(
            src as *const c_void,
            out.ptr() as *mut c_void,
            (n * k / 256) as i64,
            stream(dev),
        )
    };
    check(code, "zopilot dequant")?;
    Ok(out.into_tensor(dev, n, k))
}
