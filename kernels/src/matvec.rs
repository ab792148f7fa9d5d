//! The Q4K mat-vec (`cuda/matvec.cu`) for up to 8 rows a launch, handing larger row counts
//! to the tensor-core matmul (`matmul`), and the router with its top-k in one launch.

use std::ffi::c_void;

use candle_core::{DType, Device, Result, Tensor, quantized::QTensor};

use crate::ffi::{zopilot_q4k_matvec, zopilot_router_topk};
use crate::launch::{check, dtype_code, q4k_applies, slice_ptr, stream, weight_ptr};
use crate::pool::{Out, Q8Rows, Routing};

/// Most tokens one mat-vec launch takes.
pub const MATVEC_MAX_TOKENS: usize = 8;

/// `x · wᵀ` for each `w` `[N, K]` Q4K of the same row length (q, k and v: three to a launch),
/// `x` any number of quantized rows → `[rows, N]` each, in `dtype`: up to 2 rows the mat-vec
/// (launches of [`MATVEC_MAX_TOKENS`]), from [`DecodeOptions::mma_min_tokens`](crate::options::DecodeOptions) rows on (3) tensor cores,
/// each weight read once per 8 or 16 rows — on an H100 2–6× faster than mat-vec launches
/// from 4 rows on (scripts/q4k-kernel-bench.cu --dense), slower end to end at one row (the
/// activation packing costs more than it saves). With `round_via`
/// (bf16 or f16) and `dtype` f32, the values are rounded through that type first, as a layer
/// computing in it would return them.
pub fn matvec_many(
    ws: &[&QTensor],
    x: &Q8Rows,
    dtype: DType,
    round_via: Option<DType>,
) -> Result<Vec<Tensor>> {
    let Some(first) = ws.first() else {
        return Ok(Vec::new());
    };
    let Device::Cuda(dev) = first.device() else {
        candle_core::bail!("zopilot matvec needs CUDA weights");
    };
    let code = match (dtype, round_via) {
        (DType::F32, Some(DType::BF16)) => 3,
        (DType::F32, Some(DType::F16)) => 4,
        _ => dtype_code(dtype)?,
    };
    let mut outs = Vec::with_capacity(ws.len());
    for w in ws {
        let (n, k) = w.shape().dims2()?;
        if !q4k_applies(w) || x.k != k || x.rows == 0 || !w.device().same_device(&first.device()) {
            candle_core::bail!("zopilot matvec: w {:?}, x [{}, {}]", w.shape(), x.rows, x.k);
        }
        outs.push((n, Out::alloc(&dev, dtype, x.rows * n)?));
    }
    let k = x.k;
    let opts = crate::options::get();
    if opts.mma_min_tokens > 0
        && x.rows >= opts.mma_min_tokens
        && outs.iter().all(|(n, _)| n % 16 == 0)
    {
        crate::matmul::matmul(&dev, ws, x, &outs, code)?;
    } else {
        let elem = dtype.size_in_bytes() as u64;
        for group in (0..ws.len()).collect::<Vec<_>>().chunks(3) {
            for start in (0..x.rows).step_by(MATVEC_MAX_TOKENS) {
                let tokens = MATVEC_MAX_TOKENS.min(x.rows - start);
                let mut w_ptrs = Vec::with_capacity(3);
                let mut n_rows = Vec::with_capacity(3);
                let mut out_ptrs = Vec::with_capacity(3);
                for &i in group {
                    let (n, buf) = &outs[i];
                    w_ptrs.push(weight_ptr(ws[i])?);
                    n_rows.push(*n as i32);
                    out_ptrs.push((buf.ptr() + (start * n) as u64 * elem) as *mut c_void);
                }
                let (xq, xd, xs) = x.ptrs(start);
                let status = unsafe {
                    zopilot_q4k_matvec(
                        w_ptrs.as_ptr(),
                        n_rows.as_ptr(),
                        out_ptrs.as_ptr(),
                        group.len() as i32,
                        k as i32,
                        xq,
                        xd,
                        xs,
                        tokens as i32,
                        code,
                        stream(&dev),
                    )
                };
                check(status, "zopilot matvec")?;
            }
        }
    }
    Ok(outs
        .into_iter()
        .map(|(n, buf)| buf.into_tensor(&dev, x.rows, n))
        .collect())
}

/// The number of experts of a Q4K router `[E, K]` that the routing kernels take (E ≤ 256,
/// top_k ≤ min(8, E)), for rows of length `k`.
pub(crate) fn router_experts(w: &QTensor, k: usize, top_k: usize) -> Result<usize> {
    let (experts, wk) = w.shape().dims2()?;
    if !q4k_applies(w) || wk != k || experts > 256 || top_k == 0 || top_k > 8.min(experts) {
        candle_core::bail!("zopilot router: w {:?}, x k {k}, top_k {top_k}", w.shape());
    }
    Ok(experts)
}

/// Router and routing in one launch: logits `x · wᵀ` (`w` `[E, K]` Q4K, E ≤ 256), rounded
/// through `round_via` (bf16/f16) as the model's dtype would return them, then per token the
/// `top_k` (≤ 8) largest and their softmax — what mistral.rs' `topk_softmax` computes.
/// Returns ids `[tokens, top_k]` u32 and weights `[tokens, top_k]` f32.
pub fn router_topk(
    w: &QTensor,
    x: &Q8Rows,
    top_k: usize,
    round_via: Option<DType>,
) -> Result<(Tensor, Tensor)> {
    let Device::Cuda(dev) = w.device() else {
        candle_core::bail!("zopilot router needs a CUDA weight");
    };
    let experts = router_experts(w, x.k, top_k)?;
    let round = match round_via {
        Some(DType::BF16) => 1,
        Some(DType::F16) => 2,
        _ => 0,
    };
    let r = Routing::alloc(&dev, x.rows, top_k)?;
    let (xq, xd, xs) = x.ptrs(0);
    let code = unsafe {
        zopilot_router_topk(
            weight_ptr(w)?,
            experts as i32,
            x.k as i32,
            xq,
            xd,
            xs,
            x.rows as i32,
            top_k as i32,
            round,
            slice_ptr(&r.ids) as *mut u32,
            slice_ptr(&r.weights) as *mut f32,
            stream(&dev),
        )
    };
    check(code, "zopilot router")?;
    Ok(r.into_tensors(&dev, x.rows, top_k))
}
