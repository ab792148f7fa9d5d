//! The host-routed grouped MoE path's combine (`cuda/moe_scatter.cu`): one expert's rows,
//! scaled by their routing weights, added in place into the f32 output at their tokens' rows
//! — bit-identical to `ys.index_add(idx, src.broadcast_mul(scale), 0)`.

use candle_core::{DType, Result, Tensor};

use crate::ffi::zopilot_moe_scatter_add;
use crate::launch::{check, cuda_dev, stream, tensor_ptr};

/// `dst[idx[i]] += src[i] · scale[i]` for every row `i`, in place: `dst` `[n, hidden]` f32
/// (a tensor this caller made and nobody else holds: it is written through), `idx` `[m]` u32
/// rows of `dst` with no repeats (the caller's routing guarantees both), `src` `[m, hidden]`
/// f32, `scale` `[m]` or `[m, 1]` f32, all on one CUDA device. `false` (nothing done) when
/// the inputs are not of that form: the caller then takes candle's `index_add`.
pub fn moe_scatter_add(dst: &Tensor, idx: &Tensor, src: &Tensor, scale: &Tensor) -> Result<bool> {
    let (Ok((n, hidden)), Ok((m, h2))) = (dst.dims2(), src.dims2()) else {
        return Ok(false);
    };
    if !dst.device().is_cuda()
        || [dst, src, scale].iter().any(|t| t.dtype() != DType::F32)
        || idx.dtype() != DType::U32
        || idx.elem_count() != m
        || scale.elem_count() != m
        || h2 != hidden
        || m == 0
        || m > n
        || hidden > i32::MAX as usize
        || !dst.is_contiguous()
    {
        return Ok(false);
    }
    let dev = cuda_dev(dst)?;
    let (idx, src, scale) = (idx.contiguous()?, src.contiguous()?, scale.contiguous()?);
    // SAFETY: shapes and dtypes checked above; every pointer is a contiguous CUDA buffer of
    // them; dst is the caller's own, and its rows idx[i] are distinct and below n.
    let code = unsafe {
        zopilot_moe_scatter_add(
            tensor_ptr(dst)? as *mut f32,
            tensor_ptr(&idx)? as *const u32,
            tensor_ptr(&src)? as *const f32,
            tensor_ptr(&scale)? as *const f32,
            m as i64,
            hidden as i32,
            stream(&dev),
        )
    };
    check(code, "zopilot moe scatter add")?;
    Ok(true)
}
