//! Mixtral's experts at prompt sizes (`cuda/moe_gemm.cu`): pairs grouped by expert on the
//! device, each expert's Q4K weights dequantized tile by tile into shared memory and
//! multiplied on f16 tensor cores — no f16 copy of the experts in memory, no host sync — then
//! the routing-weighted sum.

use std::ffi::c_void;

use candle_core::{DType, Result, Tensor, quantized::QTensor};

use crate::ffi::{zopilot_moe_gemm_w2, zopilot_moe_gemm_w13};
use crate::launch::{check, cuda_dev, half_dtype_code, slice_ptr, stream, tensor_ptr, weight_ptr};
use crate::moe_grouped::{GROUPED_MAX_PAIRS, GroupPlan, combine, expert_dims};
use crate::moe_pair::routing_dims;
use crate::pool::Out;

/// Pairs per chunk (one block's columns) for `pairs` pairs over `experts` experts: 128 when
/// the average expert gets at least that many, else 64.
fn gemm_chunk(pairs: usize, experts: usize) -> usize {
    if pairs >= 128 * experts { 128 } else { 64 }
}

/// Mixtral's experts for a prompt's tokens: `x` `[tokens, K]` in bf16 or f16, `w1`, `w3`
/// `[E, N, K]` and `w2` `[E, H, N]` Q4K, `ids` `[tokens, topk]` u32 and `weights` f32 as
/// [`router_topk`](crate::router_topk) or mistral.rs' top-k return them → `[tokens, H]` in
/// `out_dtype` (f32, bf16 or f16): Σ weight · w2(silu(x·w1)·(x·w3)) over each token's
/// experts, summed in f32. At most
/// [`GROUPED_MAX_PAIRS`] (token, expert) pairs a call; N % 64 == 0, H % 128 == 0,
/// K % 256 == 0 and N % 256 == 0.
pub fn moe_gemm(
    (w1, w3, w2): (&QTensor, &QTensor, &QTensor),
    ids: &Tensor,
    weights: &Tensor,
    x: &Tensor,
    out_dtype: DType,
) -> Result<Tensor> {
    let dev = cuda_dev(ids)?;
    let (tokens, kx) = x.dims2()?;
    let topk = routing_dims(ids, Some(weights), tokens)?;
    let pairs = tokens * topk;
    let dims = expert_dims((w1, w3, w2))?.filter(|&(_, n, k, h)| {
        kx == k
            && k % 256 == 0
            && n % 256 == 0
            && h % 128 == 0
            && (1..=GROUPED_MAX_PAIRS).contains(&pairs)
    });
    let Some((experts, n, k, h)) = dims else {
        candle_core::bail!(
            "zopilot moe gemm: w1 {:?} w3 {:?} w2 {:?}, x {:?}, {tokens} tokens × {topk}",
            w1.shape(),
            w3.shape(),
            w2.shape(),
            x.shape()
        );
    };
    let xdtype = half_dtype_code(x.dtype(), "zopilot moe gemm")?;
    let (x, ids, weights) = (x.contiguous()?, ids.contiguous()?, weights.contiguous()?);
    if tensor_ptr(&x)? % 16 != 0 {
        candle_core::bail!("zopilot moe gemm: x is not 16-byte aligned");
    }
    let bn = gemm_chunk(pairs, experts);
    let plan = GroupPlan::with_chunk(&dev, &ids, experts, bn)?;
    let order = slice_ptr(&plan.order) as *const i32;
    let chunks = slice_ptr(&plan.chunks) as *const c_void;
    let max_chunks = plan.max_chunks as i32;

    let act = Out::alloc(&dev, DType::F16, pairs * n)?;
    let code = unsafe {
        zopilot_moe_gemm_w13(
            weight_ptr(w1)?,
            weight_ptr(w3)?,
            order,
            chunks,
            max_chunks,
            bn as i32,
            topk as i32,
            tensor_ptr(&x)? as *const c_void,
            xdtype,
            n as i32,
            k as i32,
            act.ptr() as *mut c_void,
            stream(&dev),
        )
    };
    check(code, "zopilot moe gemm w13")?;

    let y = unsafe { dev.alloc::<f32>(pairs * h)? };
    let code = unsafe {
        zopilot_moe_gemm_w2(
            weight_ptr(w2)?,
            order,
            chunks,
            max_chunks,
            bn as i32,
            act.ptr() as *const c_void,
            h as i32,
            n as i32,
            slice_ptr(&y) as *mut f32,
            stream(&dev),
        )
    };
    check(code, "zopilot moe gemm w2")?;
    combine(&dev, &y, &weights, (tokens, topk, h), None, out_dtype)
}
