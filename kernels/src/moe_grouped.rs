//! Mixtral's experts for 3 to a few dozen tokens (`cuda/moe_grouped.cu`): pairs grouped by
//! expert on the device, w1‖w3 and w2 on tensor cores, then the routing-weighted sum.

use std::ffi::c_void;

use candle_core::{
    CudaDevice, DType, Result, Tensor, cuda_backend::cudarc::driver::CudaSlice, quantized::QTensor,
};

use crate::ffi::{zopilot_moe_combine, zopilot_moe_plan, zopilot_moe_w2_mma, zopilot_moe_w13_mma};
use crate::launch::{
    check, cuda_dev, dtype_code, q4k_applies, slice_ptr, stream, tensor_ptr, weight_ptr,
};
use crate::mma::Packed;
use crate::moe_pair::{residual, routing_dims};
use crate::pool::{Out, Q8Rows};

/// Pairs per chunk of the grouped expert kernels for `tokens` tokens: 8 (measured faster up
/// to 32 tokens on an H100, scripts/q4k-kernel-bench.cu), then 16.
pub(crate) fn grouped_chunk(tokens: usize) -> usize {
    if tokens <= 32 { 8 } else { 16 }
}

/// The (token, slot) pairs grouped by expert on the device, in chunks of `nt`.
pub(crate) struct GroupPlan {
    pub(crate) order: CudaSlice<i32>,
    pub(crate) chunks: CudaSlice<i32>,
    pub(crate) max_chunks: usize,
    pub(crate) nt: usize,
}

impl GroupPlan {
    pub(crate) fn new(
        dev: &CudaDevice,
        ids: &Tensor,
        experts: usize,
        tokens: usize,
    ) -> Result<Self> {
        Self::with_chunk(dev, ids, experts, grouped_chunk(tokens))
    }

    /// The plan in chunks of `nt` pairs.
    pub(crate) fn with_chunk(
        dev: &CudaDevice,
        ids: &Tensor,
        experts: usize,
        nt: usize,
    ) -> Result<Self> {
        let pairs = ids.elem_count();
        let max_chunks = pairs / nt + experts.min(pairs);
        let plan = Self {
            order: unsafe { dev.alloc::<i32>(pairs)? },
            chunks: unsafe { dev.alloc::<i32>(max_chunks * 4)? },
            max_chunks,
            nt,
        };
        let code = unsafe {
            zopilot_moe_plan(
                tensor_ptr(ids)? as *const u32,
                pairs as i32,
                experts as i32,
                nt as i32,
                max_chunks as i32,
                slice_ptr(&plan.order) as *mut i32,
                slice_ptr(&plan.chunks) as *mut c_void,
                stream(dev),
            )
        };
        check(code, "zopilot moe plan")?;
        Ok(plan)
    }
}

/// `(experts, n, k, h)` of stacked experts `w1`, `w3` `[E, N, K]` and `w2` `[E, H, N]` when
/// our Q4K kernels take them (Q4K on CUDA, shapes consistent, at most 256 experts).
pub(crate) fn expert_dims(
    (w1, w3, w2): (&QTensor, &QTensor, &QTensor),
) -> Result<Option<(usize, usize, usize, usize)>> {
    let (experts, n, k) = w1.shape().dims3()?;
    let (e2, h, k2) = w2.shape().dims3()?;
    Ok((q4k_applies(w1)
        && q4k_applies(w3)
        && q4k_applies(w2)
        && w3.shape().dims3()? == (experts, n, k)
        && e2 == experts
        && k2 == n
        && experts <= 256)
        .then_some((experts, n, k, h)))
}

/// Most pairs the grouped kernels' plan takes in one launch.
pub const GROUPED_MAX_PAIRS: usize = 4096;

/// Mixtral's experts for a few dozen tokens with each expert's weights read once per chunk of
/// pairs routed to it (the per-pair kernels, [`moe_w13_silu`](crate::moe_w13_silu) and [`moe_w2`](crate::moe_w2), read an expert
/// once per pair): pairs grouped by expert on the device, then w1‖w3·SiLU and w2 on tensor
/// cores, then the routing-weighted sum (plus `resid`) → `[tokens, H]` in `dtype`. `w1`, `w3`:
/// `[E, N, K]` Q4K, `w2`: `[E, H, N]`; `ids` `[tokens, topk]` u32 and `weights` f32 as
/// [`router_topk`](crate::router_topk) returns them; `x`: the tokens quantized.
pub fn moe_grouped(
    (w1, w3, w2): (&QTensor, &QTensor, &QTensor),
    ids: &Tensor,
    weights: &Tensor,
    x: &Q8Rows,
    dtype: DType,
    resid: Option<&Tensor>,
) -> Result<Tensor> {
    let dev = cuda_dev(ids)?;
    let tokens = x.rows;
    let topk = routing_dims(ids, Some(weights), tokens)?;
    let pairs = tokens * topk;
    let dims = expert_dims((w1, w3, w2))?.filter(|&(_, n, k, h)| {
        x.k == k && n % 256 == 0 && h % 32 == 0 && pairs <= GROUPED_MAX_PAIRS
    });
    let Some((experts, n, k, h)) = dims else {
        candle_core::bail!(
            "zopilot grouped moe: w1 {:?} w3 {:?} w2 {:?}, {tokens} tokens × {topk}",
            w1.shape(),
            w3.shape(),
            w2.shape()
        );
    };
    let (ids, weights) = (ids.contiguous()?, weights.contiguous()?);
    let resid = residual(resid, tokens, h, dtype)?;
    let plan = GroupPlan::new(&dev, &ids, experts, tokens)?;
    let order = slice_ptr(&plan.order) as *const i32;
    let chunks = slice_ptr(&plan.chunks) as *const c_void;
    let (max_chunks, nt) = (plan.max_chunks as i32, plan.nt as i32);

    let px = Packed::new(&dev, x, &plan, topk)?;
    let act = Q8Rows::alloc(&dev, pairs, n)?;
    let (aq, ad, as_) = act.ptrs(0);
    let (pq, pf) = px.ptrs();
    let code = unsafe {
        zopilot_moe_w13_mma(
            weight_ptr(w1)?,
            weight_ptr(w3)?,
            order,
            chunks,
            max_chunks,
            nt,
            topk as i32,
            pq,
            pf,
            n as i32,
            k as i32,
            aq,
            ad,
            as_,
            stream(&dev),
        )
    };
    check(code, "zopilot grouped moe w13")?;

    let pa = Packed::new(&dev, &act, &plan, 1)?;
    let y = unsafe { dev.alloc::<f32>(pairs * h)? };
    let (pq, pf) = pa.ptrs();
    let code = unsafe {
        zopilot_moe_w2_mma(
            weight_ptr(w2)?,
            order,
            chunks,
            max_chunks,
            nt,
            topk as i32,
            pq,
            pf,
            h as i32,
            n as i32,
            slice_ptr(&y) as *mut f32,
            stream(&dev),
        )
    };
    check(code, "zopilot grouped moe w2")?;
    combine(&dev, &y, &weights, (tokens, topk, h), resid.as_ref(), dtype)
}

/// `out[t] = Σ_slot weights[t, slot] · y[t · topk + slot]` (+ `resid[t]`) in `dtype`, summed
/// in slot order in f32 (`moe_combine_kernel`): `y` `[tokens · topk, h]` f32, `weights`
/// `[tokens, topk]` f32 contiguous.
pub(crate) fn combine(
    dev: &CudaDevice,
    y: &CudaSlice<f32>,
    weights: &Tensor,
    (tokens, topk, h): (usize, usize, usize),
    resid: Option<&Tensor>,
    dtype: DType,
) -> Result<Tensor> {
    let out = Out::alloc(dev, dtype, tokens * h)?;
    let resid_ptr = resid.map_or(Ok(0), tensor_ptr)?;
    let code = unsafe {
        zopilot_moe_combine(
            slice_ptr(y) as *const f32,
            tensor_ptr(weights)? as *const f32,
            tokens as i32,
            topk as i32,
            h as i32,
            resid_ptr as *const c_void,
            out.ptr() as *mut c_void,
            dtype_code(dtype)?,
            stream(dev),
        )
    };
    check(code, "zopilot moe combine")?;
    Ok(out.into_tensor(dev, tokens, h))
}
