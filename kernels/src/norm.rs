//! RMSNorm fused with the quantization of its output (`cuda/norm.cu`), the residual add
//! before it and, optionally, the MoE routing of the normalized rows.

use std::ffi::c_void;

use candle_core::{Result, Tensor, quantized::QTensor};

use crate::ffi::zopilot_rmsnorm_quantize;
use crate::launch::{check, cuda_dev, dtype_code, slice_ptr, stream, tensor_ptr, weight_ptr};
use crate::matvec::router_experts;
use crate::pool::{Out, Q8Rows, Routing};

/// RMSNorm of `x` `[rows, K]` with `alpha` `[K]` (candle's arithmetic), quantized for the
/// mat-vec; with `resid`, of `h = x + resid` instead, `h` returned too (the next residual).
/// With `route` (a Q4K router `[E, K]` and top k), each row's MoE routing from the quantized
/// row in the same launch: what [`router_topk`](crate::router_topk) of the returned rows would give (logits
/// rounded through x's dtype).
pub fn rmsnorm_quantize(
    x: &Tensor,
    resid: Option<&Tensor>,
    alpha: &Tensor,
    eps: f32,
    route: Option<(&QTensor, usize)>,
) -> Result<(Option<Tensor>, Q8Rows, Option<(Tensor, Tensor)>)> {
    let dev = cuda_dev(x)?;
    let (rows, k) = x.dims2()?;
    let dtype = x.dtype();
    if k % 32 != 0 || rows == 0 || alpha.dims1()? != k || alpha.dtype() != dtype {
        candle_core::bail!(
            "zopilot rmsnorm: x {:?}, alpha {:?} {:?}",
            x.dims(),
            alpha.dims(),
            alpha.dtype()
        );
    }
    let (x, alpha) = (x.contiguous()?, alpha.contiguous()?);
    let resid = resid.map(|r| r.contiguous()).transpose()?;
    let h = match &resid {
        Some(r) if r.dims() != x.dims() || r.dtype() != dtype => {
            candle_core::bail!("zopilot rmsnorm: residual {:?} {:?}", r.dims(), r.dtype())
        }
        Some(_) => Some(Out::alloc(&dev, dtype, rows * k)?),
        None => None,
    };
    let out = Q8Rows::alloc(&dev, rows, k)?;
    let (q, d, s) = out.ptrs(0);
    let resid_ptr = resid.as_ref().map_or(Ok(0), tensor_ptr)?;
    let routing = match route {
        Some((w, top_k)) => {
            let experts = router_experts(w, k, top_k)?;
            Some((w, experts, top_k, Routing::alloc(&dev, rows, top_k)?))
        }
        None => None,
    };
    let (router, experts, top_k, ids, weights) = match &routing {
        Some((w, experts, top_k, r)) => (
            weight_ptr(w)?,
            *experts as i32,
            *top_k as i32,
            slice_ptr(&r.ids) as *mut u32,
            slice_ptr(&r.weights) as *mut f32,
        ),
        None => (
            std::ptr::null(),
            0,
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        ),
    };
    // SAFETY: x, resid, alpha: contiguous CUDA tensors of the checked shapes; h, the quantized
    // rows and the routing buffers allocated above for `rows` rows (null when not asked for).
    let code = unsafe {
        zopilot_rmsnorm_quantize(
            tensor_ptr(&x)? as *const c_void,
            resid_ptr as *const c_void,
            h.as_ref().map_or(0, Out::ptr) as *mut c_void,
            tensor_ptr(&alpha)? as *const c_void,
            rows as i32,
            k as i32,
            eps,
            dtype_code(dtype)?,
            q,
            d,
            s,
            router,
            experts,
            top_k,
            ids,
            weights,
            stream(&dev),
        )
    };
    check(code, "zopilot rmsnorm")?;
    let h = h.map(|h| h.into_tensor(&dev, rows, k));
    let routing = routing.map(|(_, _, top_k, r)| r.into_tensors(&dev, rows, top_k));
    Ok((h, out, routing))
}
