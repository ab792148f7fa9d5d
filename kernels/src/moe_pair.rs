//! Mixtral's experts per (token, expert) pair for one or two tokens (`cuda/moe_pair.cu`):
//! w1‖w3 with SiLU·mul, then w2 with the routing-weighted sum and the residual.

use std::ffi::c_void;

use candle_core::{DType, Result, Tensor, quantized::QTensor};

use crate::ffi::{zopilot_moe_w2, zopilot_moe_w13_silu};
use crate::launch::{check, cuda_dev, dtype_code, q4k_applies, stream, tensor_ptr, weight_ptr};
use crate::pool::{Out, Q8Rows};

/// Checks `ids` (u32) and `weights` (f32) are `[tokens, topk]`; returns `topk`.
pub(crate) fn routing_dims(ids: &Tensor, weights: Option<&Tensor>, tokens: usize) -> Result<usize> {
    let (t, topk) = ids.dims2()?;
    if t != tokens || ids.dtype() != DType::U32 || topk == 0 {
        candle_core::bail!(
            "zopilot moe: ids {:?} {:?} for {tokens} tokens",
            ids.dims(),
            ids.dtype()
        );
    }
    if let Some(w) = weights {
        if w.dims2()? != (t, topk) || w.dtype() != DType::F32 {
            candle_core::bail!("zopilot moe: weights {:?} {:?}", w.dims(), w.dtype());
        }
    }
    Ok(topk)
}

/// The residual added to the experts' output, contiguous: `[tokens, h]` of `dtype`.
pub(crate) fn residual(
    resid: Option<&Tensor>,
    tokens: usize,
    h: usize,
    dtype: DType,
) -> Result<Option<Tensor>> {
    let resid = resid.map(|r| r.contiguous()).transpose()?;
    if let Some(r) = &resid {
        if r.dims2()? != (tokens, h) || r.dtype() != dtype {
            candle_core::bail!("zopilot moe: residual {:?} {:?}", r.dims(), r.dtype());
        }
    }
    Ok(resid)
}

/// Expert pair of Mixtral's FFN for each (token, slot): `silu(x·w1[e]) * (x·w3[e])`,
/// quantized, `[tokens * topk, N]`. `w1`, `w3`: `[E, N, K]` Q4K; `ids`: `[tokens, topk]` u32.
pub fn moe_w13_silu(w1: &QTensor, w3: &QTensor, ids: &Tensor, x: &Q8Rows) -> Result<Q8Rows> {
    let dev = cuda_dev(ids)?;
    let (e, n, k) = w1.shape().dims3()?;
    if !q4k_applies(w1)
        || !q4k_applies(w3)
        || w3.shape().dims3()? != (e, n, k)
        || n % 32 != 0
        || x.k != k
    {
        candle_core::bail!(
            "zopilot moe w13: w1 {:?} w3 {:?} x k {}",
            w1.shape(),
            w3.shape(),
            x.k
        );
    }
    let topk = routing_dims(ids, None, x.rows)?;
    let ids = ids.contiguous()?;
    let pairs = x.rows * topk;
    let act = Q8Rows::alloc(&dev, pairs, n)?;
    let (xq, xd, xs) = x.ptrs(0);
    let (aq, ad, as_) = act.ptrs(0);
    let code = unsafe {
        zopilot_moe_w13_silu(
            weight_ptr(w1)?,
            weight_ptr(w3)?,
            tensor_ptr(&ids)? as *const u32,
            pairs as i32,
            topk as i32,
            xq,
            xd,
            xs,
            n as i32,
            k as i32,
            aq,
            ad,
            as_,
            stream(&dev),
        )
    };
    check(code, "zopilot moe w13")?;
    Ok(act)
}

/// `Σ_slot weights[t, slot] · act[t, slot] · w2[ids[t, slot]]` → `[tokens, H]` in `dtype`,
/// plus `resid` (`[tokens, H]`, `dtype`) when given. `w2`: `[E, H, N]` Q4K; `act`:
/// `[tokens * topk, N]` from [`moe_w13_silu`].
pub fn moe_w2(
    w2: &QTensor,
    ids: &Tensor,
    weights: &Tensor,
    act: &Q8Rows,
    dtype: DType,
    resid: Option<&Tensor>,
) -> Result<Tensor> {
    let dev = cuda_dev(ids)?;
    let (_, h, k) = w2.shape().dims3()?;
    let tokens = ids.dim(0)?;
    let topk = routing_dims(ids, Some(weights), tokens)?;
    if !q4k_applies(w2) || act.k != k || act.rows != tokens * topk {
        candle_core::bail!(
            "zopilot moe w2: w2 {:?}, act [{}, {}]",
            w2.shape(),
            act.rows,
            act.k
        );
    }
    let (ids, weights) = (ids.contiguous()?, weights.contiguous()?);
    let resid = residual(resid, tokens, h, dtype)?;
    let resid_ptr = match &resid {
        Some(r) => tensor_ptr(r)? as *const c_void,
        None => std::ptr::null(),
    };
    let out = Out::alloc(&dev, dtype, tokens * h)?;
    let (aq, ad, as_) = act.ptrs(0);
    let code = unsafe {
        zopilot_moe_w2(
            weight_ptr(w2)?,
            tensor_ptr(&ids)? as *const u32,
            tensor_ptr(&weights)? as *const f32,
            tokens as i32,
            topk as i32,
            aq,
            ad,
            as_,
            h as i32,
            k as i32,
            resid_ptr,
            out.ptr() as *mut c_void,
            dtype_code(dtype)?,
            stream(&dev),
        )
    };
    check(code, "zopilot moe w2")?;
    Ok(out.into_tensor(&dev, tokens, h))
}
