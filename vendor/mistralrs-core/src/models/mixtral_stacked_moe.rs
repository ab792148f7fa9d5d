//! zopilot-gpu patch: Mixtral's experts stacked per layer so routing never leaves the device.
//!
//! Upstream 0.8.1 (`SparseMoeBlock` in `mixtral.rs`, kept as the `loop` path) copies the router
//! probabilities to the host in every layer, sorts there and loops over the experts. This module
//! keeps the eight experts of a layer as one `[E, N, K]` weight per projection and routes on the
//! device (softmax, top-k, renormalise in f32, as the reference implementation does):
//! - decode on CUDA with Q4K weights ([`StackedExperts::fused`], our kernels in
//!   the `zopilot-kernels` crate): up to `moe_gather_max_tokens` tokens (default 2) one
//!   kernel pass per (token, expert) pair; up to `moe_mma_max_tokens` (default 64) the
//!   pairs grouped by expert on the device and each expert read once per chunk of 8–16 pairs,
//!   on tensor cores; no host synchronisation either way;
//! - few tokens otherwise (other quantizations): one indexed matmul per projection over the
//!   chosen experts (`GgufMatMul::gather_forward`, the `indexed_moe_forward` CUDA kernel on
//!   GGUF-quantized weights), no host synchronisation;
//! - more tokens (prefill, larger decode batches): one host read of the routing, then per
//!   expert one matmul over the tokens routed to it: up to 16 tokens candle's Q8_1 mat-vec
//!   kernel on the expert's bytes, past that the expert dequantized alone (so the transient
//!   is one expert) for cuBLAS (`GROUPED_MMVQ_MAX_TOKENS`).
//!
//! In-situ quantization of the stacked weights is done here (experts in parallel, in row
//! blocks) into one GGUF tensor per projection, because a stacked layer handed to the generic
//! ISQ path comes back type-erased and the grouped path needs the quantized bytes. `--mixtral-path upstream` (`zopilot_kernels::options`) selects upstream's path.

use std::sync::Arc;

use candle_core::{
    quantized::{GgmlDType, QTensor},
    DType, Device, IndexOp, Result, Tensor, D,
};
use mistralrs_quant::{GgufMatMul, QuantMethod, QuantMethodConfig, ShardedVarBuilder};

use super::zopilot_linear::QLinear;
use crate::layers::Activation;

/// Rows of one expert matrix quantized per task while loading.
const QUANT_ROWS_PER_TASK: usize = 2048;

/// A 2-D CPU weight quantized to GGUF `dtype` in row blocks on rayon's global pool (not the
/// ISQ pool, whose backpressure may be waiting on this thread): mistral.rs loads layers one
/// after another, so a layer's quantization must fill the machine by itself. GGUF blocks run
/// along a row, so row blocks quantized apart concatenate to the same bytes.
pub(crate) fn quantize_rows(w: &Tensor, dtype: GgmlDType) -> Result<Vec<u8>> {
    use rayon::prelude::*;
    let rows = w.dim(0)?;
    let parts = (0..rows.div_ceil(QUANT_ROWS_PER_TASK))
        .into_par_iter()
        .map(|b| {
            let r0 = b * QUANT_ROWS_PER_TASK;
            let part = w
                .narrow(0, r0, QUANT_ROWS_PER_TASK.min(rows - r0))?
                .to_dtype(DType::F32)?;
            Ok(QTensor::quantize(&part, dtype)?.data()?.into_owned())
        })
        .collect::<Result<Vec<Vec<u8>>>>()?;
    Ok(parts.concat())
}

/// A GGUF tensor of `dims` on `target` from its quantized `bytes`, and the `GgufMatMul` that
/// ISQ would have built around it.
pub(crate) fn gguf_layer(
    dtype: GgmlDType,
    bytes: &[u8],
    dims: Vec<usize>,
    target: &Device,
) -> Result<(Arc<QTensor>, Arc<dyn QuantMethod>)> {
    let q = Arc::new(candle_core::quantized::ggml_file::qtensor_from_ggml(
        dtype, bytes, dims, target,
    )?);
    let mm: Arc<dyn QuantMethod> = Arc::new(GgufMatMul::new(QuantMethodConfig::Gguf {
        q_weight: q.clone(),
        b: None,
    })?);
    Ok((q, mm))
}

/// Whether our Mixtral path runs (`zopilot_kernels::options`, `--mixtral-path`), rather
/// than upstream's: the stacked experts here, and the Q4K layers and fused decode layer.
pub(crate) fn ours_enabled() -> bool {
    zopilot_kernels::options::get().mixtral_path == zopilot_kernels::options::MixtralPath::Ours
}

/// Default 2 (`DecodeOptions::moe_gather_max_tokens`), measured on an H100 (8 layers, same
/// run): at 4 sequences the grouped path (each used expert read once) gives 636 tok/s against
/// 548 with the indexed kernel; at 2 sequences 394 against 385; with threshold 1, 2 sequences
/// drop to 347.
fn gather_max_tokens() -> usize {
    zopilot_kernels::options::get().moe_gather_max_tokens
}

/// Most tokens the grouped tensor-core expert kernels take (`DecodeOptions::moe_mma_max_tokens`;
/// 0 turns them off: the host-routed grouped path below, for every batch of more than
/// [`gather_max_tokens`]). Default 64: decode batches up to 64 sequences; longer batches
/// (prefill) dequantize each expert for cuBLAS.
fn mma_max_tokens() -> usize {
    zopilot_kernels::options::get().moe_mma_max_tokens
}

/// Tokens candle's quantized mat-vec kernels take in one launch (they go up to 8 columns).
const VEC_TOKENS: usize = 8;
/// The most tokens one pass of the grouped (prefill) path takes; longer batches go in slices.
const GROUPED_SLICE_TOKENS: usize = 2048;

/// Up to this many tokens, [`qmatmul`] splits a quantized matmul into mat-vec launches.
const VEC_SPLIT_MAX_TOKENS: usize = 128;

/// `f` applied to `x`'s rows `VEC_TOKENS` at a time, the results concatenated along rows.
fn in_vec_launches(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let m = x.dim(0)?;
    let parts = (0..m)
        .step_by(VEC_TOKENS)
        .map(|s| f(&x.narrow(0, s, VEC_TOKENS.min(m - s))?))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

/// A quantized layer's matmul (`MatMul.qmethod_matmul`), with 9–128 tokens on the GPU split
/// into launches of 8. candle sends more than 8 tokens to its tiled MMQ kernel, whose grid is
/// one block per 128 output rows and 64 tokens: Mixtral's 1,024-row k/v projections get 8
/// blocks, the 8-row router 1 block, on a 132-SM H100. Measured there with ncu at 32
/// sequences, per call: q/o 189 µs, k/v 166 µs, router 156 µs — 7 ms of a 20 ms decode step
/// for 8 layers. The mat-vec kernel fills the GPU and reads the weight once per 8 tokens
/// (q_proj: 9 µs a launch).
pub(crate) fn qmatmul(xs: &Tensor, w: &dyn QuantMethod) -> Result<Tensor> {
    let dims = xs.dims().to_vec();
    let hidden = *dims.last().unwrap_or(&0);
    let tokens = if hidden == 0 { 0 } else { xs.elem_count() / hidden };
    if !xs.device().is_cuda()
        || w.quantized_act_type().is_none()
        || tokens <= VEC_TOKENS
        || tokens > VEC_SPLIT_MAX_TOKENS
    {
        return w.forward(xs);
    }
    let out = in_vec_launches(&xs.reshape((tokens, hidden))?, |x| w.forward(x))?;
    let mut shape = dims;
    if let Some(last) = shape.last_mut() {
        *last = out.dim(1)?;
    }
    out.reshape(shape)
}

/// One projection of all experts: `[E, N, K]`.
enum StackedWeight {
    /// Unquantized (the model's dtype).
    Dense(Tensor),
    /// GGUF-quantized; `mm` wraps the same tensor for the indexed kernel.
    Quantized {
        q: Arc<QTensor>,
        mm: Arc<dyn QuantMethod>,
    },
}

impl StackedWeight {
    /// The Q4K tensor the fused decode kernels take, if this is one.
    #[cfg(feature = "cuda")]
    fn fused_q4k(&self) -> Option<&QTensor> {
        match self {
            Self::Quantized { q, .. } if zopilot_kernels::q4k_applies(q) => Some(q),
            _ => None,
        }
    }

    fn dims(&self) -> Result<(usize, usize, usize)> {
        match self {
            Self::Dense(t) => t.dims3(),
            Self::Quantized { q, .. } => q.shape().dims3(),
        }
    }

    /// `x`: `[n, 1 or k, K]`, `ids`: `[n, k]` u32 → `[n, k, N]` in f32.
    fn gather(&self, x: &Tensor, ids: &Tensor) -> Result<Tensor> {
        if let Self::Quantized { mm, .. } = self {
            if x.device().is_cuda() {
                return mm.gather_forward(&x.to_dtype(DType::F32)?.contiguous()?, ids);
            }
        }
        let w = match self {
            Self::Dense(t) => t.clone(),
            Self::Quantized { q, .. } => q.dequantize(x.device())?,
        };
        let (n, k) = ids.dims2()?;
        let (_, r, kdim) = x.dims3()?;
        let (_, out, _) = w.dims3()?;
        let x = if r == 1 {
            x.broadcast_as((n, k, kdim))?
        } else {
            x.clone()
        };
        let x = x.to_dtype(w.dtype())?.contiguous()?.reshape((n * k, 1, kdim))?;
        let w_sel = w.index_select(&ids.flatten_all()?, 0)?;
        x.matmul(&w_sel.transpose(1, 2)?)?
            .reshape((n, k, out))?
            .to_dtype(DType::F32)
    }

    /// Per-expert dense weights for the grouped (prefill) path.
    fn grouped(&self, device: &Device) -> Result<Grouped> {
        Ok(match self {
            Self::Dense(t) => Grouped::Dense(t.clone()),
            Self::Quantized { q, .. } if device.is_cuda() && per_expert_dequant(q.dtype()) => {
                Grouped::PerExpert(q.clone())
            }
            Self::Quantized { q, .. } if device.is_cuda() => Grouped::Dense(q.dequantize_f16(device)?),
            Self::Quantized { q, .. } => Grouped::Dense(q.dequantize(device)?),
        })
    }
}

fn per_expert_dequant(dtype: GgmlDType) -> bool {
    cfg!(feature = "cuda") && dequant_f16_kernel(dtype).is_some()
}

/// candle's f16 dequantize kernel for a k-quant type, with its threads per block.
fn dequant_f16_kernel(dtype: GgmlDType) -> Option<(&'static str, u32)> {
    Some(match dtype {
        GgmlDType::Q2K => ("dequantize_block_q2_K_f16", 64),
        GgmlDType::Q3K => ("dequantize_block_q3_K_f16", 64),
        GgmlDType::Q4K => ("dequantize_block_q4_K_f16", 32),
        GgmlDType::Q5K => ("dequantize_block_q5_K_f16", 64),
        GgmlDType::Q6K => ("dequantize_block_q6_K_f16", 64),
        GgmlDType::Q8K => ("dequantize_block_q8_K_f16", 32),
        _ => return None,
    })
}

/// The CUDA device, the device address of expert `e`'s bytes in a stacked tensor, and the
/// expert's `(n, k)`.
#[cfg(feature = "cuda")]
fn expert_bytes(q: &QTensor, e: usize) -> Result<(candle_core::CudaDevice, u64, usize, usize)> {
    let Device::Cuda(dev) = q.device() else {
        candle_core::bail!("a stacked expert kernel needs a CUDA tensor");
    };
    let (experts, n, k) = q.shape().dims3()?;
    if e >= experts {
        candle_core::bail!("expert {e} out of {experts}");
    }
    let offset = e * n * k / q.dtype().block_size() * q.dtype().type_size();
    Ok((dev, q.device_ptr()? as u64 + offset as u64, n, k))
}

#[cfg(feature = "cuda")]
fn launch_error(err: candle_core::cuda::cudarc::driver::DriverError) -> candle_core::Error {
    candle_core::Error::Msg(err.to_string())
}

enum Grouped {
    Dense(Tensor),
    PerExpert(Arc<QTensor>),
}

impl Grouped {
    /// `x @ W[e]^T` for the `m` tokens routed to expert `e`; the result in f32.
    fn matmul(&self, e: usize, x: &Tensor) -> Result<Tensor> {
        if let Self::PerExpert(q) = self {
            let m = x.dim(0)?;
            if m <= GROUPED_MMVQ_MAX_TOKENS {
                return in_vec_launches(x, |x| expert_mmvq(q, e, x));
            }
        }
        let w = match self {
            Self::Dense(t) => t.i(e)?,
            Self::PerExpert(q) => dequantize_expert_f16(q, e)?,
        };
        x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(DType::F32)
    }
}

/// Most tokens routed to one quantized expert that the grouped path multiplies with candle's
/// mat-vec kernel on the expert's bytes (one read of the expert per 8 tokens); more tokens
/// dequantize the expert alone to f16 for cuBLAS. Measured on an H100 (same run): 16 streams
/// 845 → 937 tok/s against a limit of 8, 32 streams 1,306 → 1,279 (within the run-to-run
/// spread); always dequantizing and a limit of 64 were each best at one batch size only, and
/// candle's tiled MMQ kernel (`mul_mat_q4_K`) lost at every size (4 sequences: 19.4 ms per
/// step against 5.8 ms).
const GROUPED_MMVQ_MAX_TOKENS: usize = 16;

/// `x` `[m, K]` in f32 on the GPU, quantized to Q8_1 the way candle's quantized matmuls
/// want it: rows padded to 512 values, 36 bytes per 32 values. Returns the bytes and the
/// padded row length.
#[cfg(feature = "cuda")]
fn quantize_rows_q8_1(
    dev: &candle_core::CudaDevice,
    x: &Tensor,
) -> Result<(candle_core::cuda::cudarc::driver::CudaSlice<u8>, usize)> {
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::Storage;

    let (m, k) = x.dims2()?;
    let k_padded = k.div_ceil(512) * 512;
    let y_q8_1 = dev.alloc_zeros::<u8>(m * k_padded / 32 * 36)?;
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let (x_storage, x_layout) = x.storage_and_layout();
    let Storage::Cuda(x_cuda) = &*x_storage else {
        candle_core::bail!("a quantized expert kernel needs x on the GPU");
    };
    let start = x_layout.start_offset();
    let x_view = x_cuda.as_cuda_slice::<f32>()?.slice(start..start + m * k);
    let quantize = dev.get_or_load_func("quantize_q8_1", &candle_kernels::QUANTIZED)?;
    let cfg = LaunchConfig {
        grid_dim: (k_padded.div_ceil(256) as u32, m as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (k_i32, k_padded_i32) = (k as i32, k_padded as i32);
    let mut builder = quantize.builder();
    builder.arg(&x_view);
    builder.arg(&y_q8_1);
    builder.arg(&k_i32);
    builder.arg(&k_padded_i32);
    unsafe { builder.launch(cfg) }.map_err(launch_error)?;
    Ok((y_q8_1, k_padded))
}

/// `x` `[m, K]` (m ≤ `VEC_TOKENS`) times expert `e` of a stacked k-quant tensor, as candle's own
/// `mul_mat_vec_via_q8_1` does it for a whole tensor: quantize `x` to Q8_1, then mat-vec.
#[cfg(feature = "cuda")]
fn expert_mmvq(q: &QTensor, e: usize, x: &Tensor) -> Result<Tensor> {
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{CudaStorage, Shape, Storage};

    let (dev, weights, n, k) = expert_bytes(q, e)?;
    let (m, kx) = x.dims2()?;
    if kx != k || m == 0 || m > VEC_TOKENS {
        candle_core::bail!("expert_mmvq: x [{m}, {kx}], weight K {k}");
    }
    let dtype = q.dtype();
    let name = match dtype {
        GgmlDType::Q2K => "mul_mat_vec_q2_K_q8_1_cuda",
        GgmlDType::Q3K => "mul_mat_vec_q3_K_q8_1_cuda",
        GgmlDType::Q4K => "mul_mat_vec_q4_K_q8_1_cuda",
        GgmlDType::Q5K => "mul_mat_vec_q5_K_q8_1_cuda",
        GgmlDType::Q6K => "mul_mat_vec_q6_K_q8_1_cuda",
        other => candle_core::bail!("no mat-vec kernel for {other:?}"),
    };
    let (y_q8_1, k_padded) = quantize_rows_q8_1(&dev, x)?;
    let (k_i32, k_padded_i32) = (k as i32, k_padded as i32);
    // Mat-vec over the expert's rows; dst[token * n + row].
    let func = dev.get_or_load_func(&format!("{name}{m}"), &candle_kernels::QUANTIZED)?;
    let dst = dev.alloc_zeros::<f32>(m * n)?;
    let (blocks, warps) = match m {
        1 => (n as u32, 4),
        2..=4 => ((n as u32).div_ceil(2), 4),
        _ => ((n as u32).div_ceil(2), 2),
    };
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (32, warps, 1),
        shared_mem_bytes: 0,
    };
    let (n_i32, n_dst) = (n as i32, n as i32);
    let mut builder = func.builder();
    builder.arg(&weights);
    builder.arg(&y_q8_1);
    builder.arg(&dst);
    builder.arg(&k_i32);
    builder.arg(&n_i32);
    builder.arg(&k_padded_i32);
    builder.arg(&n_dst);
    unsafe { builder.launch(cfg) }.map_err(launch_error)?;
    let storage = CudaStorage::wrap_cuda_slice(dst, dev.clone());
    Ok(Tensor::from((Storage::Cuda(storage), Shape::from((m, n)))))
}

#[cfg(not(feature = "cuda"))]
fn expert_mmvq(_q: &QTensor, _e: usize, _x: &Tensor) -> Result<Tensor> {
    candle_core::bail!("the expert mat-vec path needs a CUDA build")
}

/// Dequantizes expert `e` of a stacked k-quant tensor on the GPU (ours for Q4K, else candle's
/// own kernel, pointed at the expert's bytes), so prefill holds one expert in f16, not the
/// whole layer.
#[cfg(feature = "cuda")]
fn dequantize_expert_f16(q: &QTensor, e: usize) -> Result<Tensor> {
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{CudaStorage, Shape, Storage};

    let (dev, src, n, k) = expert_bytes(q, e)?;
    if q.dtype() == GgmlDType::Q4K {
        return zopilot_kernels::dequant_q4k_f16(&dev, src, n, k);
    }
    let Some((name, block_dim)) = dequant_f16_kernel(q.dtype()) else {
        candle_core::bail!("no per-expert dequantization for {:?}", q.dtype());
    };
    let elems = n * k;
    let func = dev.get_or_load_func(name, &candle_kernels::QUANTIZED)?;
    let dst = unsafe { dev.alloc::<half::f16>(elems)? };
    let cfg = LaunchConfig {
        grid_dim: ((elems / 256) as u32, 1, 1),
        block_dim: (block_dim, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut builder = func.builder();
    builder.arg(&src);
    builder.arg(&dst);
    unsafe { builder.launch(cfg) }.map_err(launch_error)?;
    let storage = CudaStorage::wrap_cuda_slice(dst, dev.clone());
    Ok(Tensor::from((Storage::Cuda(storage), Shape::from((n, k)))))
}

#[cfg(not(feature = "cuda"))]
fn dequantize_expert_f16(_q: &QTensor, _e: usize) -> Result<Tensor> {
    candle_core::bail!("per-expert dequantization needs a CUDA build")
}

/// A Mixtral MoE block's Q4K tensors for the fused decode kernels ([`StackedExperts::fused`]).
#[cfg(feature = "cuda")]
pub(crate) struct FusedMoe<'a> {
    w1: &'a QTensor,
    w3: &'a QTensor,
    w2: &'a QTensor,
    router: &'a QTensor,
    top_k: usize,
    /// Pairs grouped by expert (more than `gather_max_tokens` tokens).
    grouped: bool,
}

#[cfg(feature = "cuda")]
impl<'a> FusedMoe<'a> {
    /// The MoE block on an input already quantized (`x`, e.g. from the fused RMSNorm):
    /// router and routing in one kernel (logits rounded through `dtype`, as the unfused
    /// router returns them); then per (token, expert) pair w1‖w3 with SiLU·mul and the activation's quantization in one kernel, w2
    /// with the weighted sum (and `resid`, when given) in another, written in `dtype` — two or
    /// three launches where the unfused path takes about sixteen; or, `grouped`, the pairs
    /// grouped by expert on the device and each expert read once per chunk of pairs (tensor
    /// cores; [`zq::moe_grouped`]), no host sync.
    pub(crate) fn forward(
        &self,
        x: &zopilot_kernels::Q8Rows,
        dtype: DType,
        resid: Option<&Tensor>,
    ) -> Result<Tensor> {
        use zopilot_kernels as zq;
        let (ids, weights) = zq::router_topk(self.router, x, self.top_k, Some(dtype))?;
        if self.grouped {
            return zq::moe_grouped((self.w1, self.w3, self.w2), &ids, &weights, x, dtype, resid);
        }
        let act = zq::moe_w13_silu(self.w1, self.w3, &ids, x)?;
        zq::moe_w2(self.w2, &ids, &weights, &act, dtype, resid)
    }
}

/// The experts of one Mixtral layer, stacked.
pub(crate) struct StackedExperts {
    w1: StackedWeight,
    w3: StackedWeight,
    w2: StackedWeight,
    act: Activation,
    gather_max_tokens: usize,
    /// Read by the CUDA-only fused decode path.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    mma_max_tokens: usize,
}

/// Top-k experts per token and their weights, softmax over all experts renormalised over the
/// chosen ones — which equals a softmax over the chosen logits. On CUDA that is one kernel
/// (mistral.rs' own `topk_softmax`, in f32), replacing seven small ones per layer (ncu: ~25 µs
/// of a one-token layer); elsewhere the explicit steps.
fn route(logits: &Tensor, top_k: usize) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        let out = crate::ops::cuda_topk_softmax(logits, top_k)?;
        return Ok((out.indices, out.values));
    }
    let routing = candle_nn::ops::softmax_last_dim(logits)?;
    let ids = routing
        .arg_sort_last_dim(false)?
        .narrow(D::Minus1, 0, top_k)?
        .contiguous()?;
    let weights = routing.gather(&ids, D::Minus1)?;
    let weights = weights.broadcast_div(&weights.sum_keepdim(D::Minus1)?)?;
    Ok((ids, weights))
}

impl StackedExperts {
    /// Loads `experts.{i}.w1|w3|w2.weight`, or the stacked tensors the installed weight store
    /// supplies (`zopilot_weights`, which is also handed what is quantized here); `None` when
    /// this layer must take upstream's path (pre-quantized checkpoints, ISQ types that are not
    /// GGUF, weights absent for UQFF).
    pub(crate) fn load(
        vb: &ShardedVarBuilder,
        num_experts: usize,
        hidden: usize,
        intermediate: usize,
        act: Activation,
    ) -> Result<Option<Self>> {
        let stored_name = |name: &str| format!("{}.{name}", vb.prefix());
        let in_store =
            super::zopilot_weights::store().is_some_and(|s| s.contains(&stored_name("w1")));
        if !in_store && !vb.pp(0).contains_tensor("w1.weight") {
            return Ok(None);
        }
        let mut stacked = Vec::with_capacity(3);
        for (name, shape) in [
            ("w1", (intermediate, hidden)),
            ("w3", (intermediate, hidden)),
            ("w2", (hidden, intermediate)),
        ] {
            let isq = mistralrs_quant::immediate_isq_match(&vb.pp(0).pp(name));
            let dims = [num_experts, shape.0, shape.1];
            let target = isq
                .as_ref()
                .and_then(|m| m.device.clone())
                .unwrap_or_else(|| vb.device().clone());
            if let Some((q, mm)) = super::zopilot_weights::load_stored(&stored_name(name), &dims, &target)? {
                stacked.push(StackedWeight::Quantized { q, mm });
                continue;
            }
            let weight = match isq {
                None => {
                    let parts = (0..num_experts)
                        .map(|i| vb.pp(i).get(shape, &format!("{name}.weight")))
                        .collect::<Result<Vec<_>>>()?;
                    StackedWeight::Dense(Tensor::stack(&parts, 0)?)
                }
                Some(m) => {
                    let Ok(dtype) = GgmlDType::try_from(m.ty) else {
                        return Ok(None);
                    };
                    let cpu = vb.clone().set_device(Device::Cpu);
                    // Experts in parallel, each in row blocks (`quantize_rows`).
                    let quantize = || {
                        use rayon::prelude::*;
                        (0..num_experts)
                            .into_par_iter()
                            .map(|i| {
                                let w = cpu.pp(i).get(shape, &format!("{name}.weight"))?;
                                quantize_rows(&w, dtype)
                            })
                            .collect::<Result<Vec<Vec<u8>>>>()
                    };
                    let started = std::time::Instant::now();
                    let bytes = quantize()?.concat();
                    if crate::pipeline::zopilot_step_trace() {
                        let at = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis());
                        eprintln!(
                            "zopilot-load {name} {num_experts}x{shape:?} {dtype:?} quantize_ms={} at_ms={at}",
                            started.elapsed().as_millis()
                        );
                    }
                    super::zopilot_weights::record(&stored_name(name), dtype, &dims, &bytes)?;
                    let (q, mm) = gguf_layer(dtype, &bytes, dims.to_vec(), &target)?;
                    StackedWeight::Quantized { q, mm }
                }
            };
            stacked.push(weight);
        }
        let w2 = stacked.pop().expect("three projections");
        let w3 = stacked.pop().expect("three projections");
        let w1 = stacked.pop().expect("three projections");
        Ok(Some(Self {
            w1,
            w3,
            w2,
            act,
            gather_max_tokens: gather_max_tokens(),
            mma_max_tokens: mma_max_tokens(),
        }))
    }

    /// `xs`: `[n, hidden]`; `router_logits`: `[n, E]`. Returns `[n, hidden]` in `xs`' dtype.
    pub(crate) fn forward(&self, xs: &Tensor, router_logits: &Tensor, top_k: usize) -> Result<Tensor> {
        let (ids, weights) = route(&router_logits.to_dtype(DType::F32)?, top_k)?;
        let n = xs.dim(0)?;
        if n <= self.gather_max_tokens {
            return self.forward_gather(xs, &ids, &weights)?.to_dtype(xs.dtype());
        }
        // A long prefill goes through the experts a slice of tokens at a time: each expert's
        // intermediates grow with the tokens routed to it, and at 8k tokens they and the f32
        // sum took ~1 GB of a 32 GB card. Tokens are independent here, so the result is the
        // same; only the experts' dequantization repeats per slice.
        // zopilot-gpu patch: prompt-sized batches may take the experts' GEMM straight from Q4K
        // (`moe_gemm_min_tokens`), in slices of as many tokens as its plan takes. It reads f16
        // or bf16; the layer hands f32 (the router's activation type), which goes to f16 as
        // the host-routed path's cuBLAS input does.
        #[cfg(feature = "cuda")]
        let gemm = match self.gemm_q4k(n, top_k, xs) {
            Some(w) => Some((
                w,
                match xs.dtype() {
                    DType::F32 => xs.to_dtype(DType::F16)?,
                    _ => xs.clone(),
                },
            )),
            None => None,
        };
        #[cfg(feature = "cuda")]
        let slice = match gemm {
            Some(_) => zopilot_kernels::GROUPED_MAX_PAIRS / top_k,
            None => GROUPED_SLICE_TOKENS,
        };
        #[cfg(not(feature = "cuda"))]
        let slice = GROUPED_SLICE_TOKENS;
        let mut parts = Vec::with_capacity(n.div_ceil(slice));
        for start in (0..n).step_by(slice) {
            let len = slice.min(n - start);
            let (ids, weights) = (ids.narrow(0, start, len)?, weights.narrow(0, start, len)?);
            #[cfg(feature = "cuda")]
            if let Some((w, x)) = &gemm {
                let x = x.narrow(0, start, len)?;
                parts.push(zopilot_kernels::moe_gemm(*w, &ids, &weights, &x, xs.dtype())?);
                continue;
            }
            let ys = self.forward_grouped(&xs.narrow(0, start, len)?, &ids, &weights)?;
            parts.push(ys.to_dtype(xs.dtype())?);
        }
        if parts.len() == 1 {
            return Ok(parts.remove(0));
        }
        Tensor::cat(&parts, 0)
    }

    /// The tensors for decoding `n` tokens through our fused Q4K kernels
    /// (the `zopilot-kernels` crate), when they apply: at most `moe_gather_max_tokens`
    /// tokens (per-pair kernels) or `moe_mma_max_tokens` (grouped), Q4K experts and
    /// router on CUDA, SiLU, top-k ≤ 8 of ≤ 256 experts.
    #[cfg(feature = "cuda")]
    pub(crate) fn fused<'a>(
        &'a self,
        n: usize,
        top_k: usize,
        gate: &'a QLinear,
        device: &Device,
    ) -> Option<FusedMoe<'a>> {
        let grouped = n > self.gather_max_tokens;
        let grouped_ok = n <= self.mma_max_tokens
            && n * top_k <= zopilot_kernels::GROUPED_MAX_PAIRS;
        if grouped && !grouped_ok {
            return None;
        }
        let (w1, w3, w2) = self.q4k_experts(top_k)?;
        Some(FusedMoe {
            w1,
            w3,
            w2,
            router: gate.q4k_for(n, device)?,
            top_k,
            grouped,
        })
    }

    /// The Q4K experts our kernels take for top-`top_k` routing: SiLU, top-k ≤ 8 of ≤ 256
    /// experts, all three projections Q4K on CUDA.
    #[cfg(feature = "cuda")]
    fn q4k_experts(&self, top_k: usize) -> Option<(&QTensor, &QTensor, &QTensor)> {
        let experts = self.w1.dims().map_or(0, |(e, _, _)| e);
        let ok = (1..=8).contains(&top_k)
            && top_k <= experts
            && experts <= 256
            && self.act == Activation::Silu;
        ok.then_some(())?;
        Some((self.w1.fused_q4k()?, self.w3.fused_q4k()?, self.w2.fused_q4k()?))
    }

    /// The Q4K experts for the prompt-sized GEMM ([`zopilot_kernels::moe_gemm`]) of `n` tokens
    /// `xs`, when it applies: at least `moe_gemm_min_tokens` tokens (0: never), f32, bf16 or
    /// f16 activations on CUDA, [`Self::q4k_experts`], shapes the kernel tiles.
    #[cfg(feature = "cuda")]
    fn gemm_q4k(&self, n: usize, top_k: usize, xs: &Tensor) -> Option<(&QTensor, &QTensor, &QTensor)> {
        let min = zopilot_kernels::options::get().moe_gemm_min_tokens;
        let (experts, ffn, hidden) = self.w1.dims().ok()?;
        let ok = min > 0
            && n >= min
            && xs.device().is_cuda()
            && matches!(xs.dtype(), DType::F32 | DType::BF16 | DType::F16)
            && ffn % 256 == 0
            && hidden % 256 == 0
            && self.w2.dims().ok()? == (experts, hidden, ffn);
        ok.then_some(())?;
        self.q4k_experts(top_k)
    }

    /// [`FusedMoe::forward`] from `xs` `[n, hidden]`; `None` where it does not apply.
    #[cfg(feature = "cuda")]
    pub(crate) fn forward_fused(&self, xs: &Tensor, gate: &QLinear, top_k: usize) -> Result<Option<Tensor>> {
        let Some(moe) = self.fused(xs.dim(0)?, top_k, gate, xs.device()) else {
            return Ok(None);
        };
        let x = zopilot_kernels::quantize(xs)?;
        moe.forward(&x, xs.dtype(), None).map(Some)
    }

    #[cfg(not(feature = "cuda"))]
    pub(crate) fn forward_fused(&self, _xs: &Tensor, _gate: &QLinear, _top_k: usize) -> Result<Option<Tensor>> {
        Ok(None)
    }

    fn forward_gather(&self, xs: &Tensor, ids: &Tensor, weights: &Tensor) -> Result<Tensor> {
        let (n, hidden) = xs.dims2()?;
        let x = xs.reshape((n, 1, hidden))?;
        let gate = self.w1.gather(&x, ids)?;
        let up = self.w3.gather(&x, ids)?;
        let act = crate::ops::mul_and_act(&gate, &up, self.act)?;
        let down = self.w2.gather(&act, ids)?;
        down.broadcast_mul(&weights.unsqueeze(D::Minus1)?)?.sum(1)
    }

    fn forward_grouped(&self, xs: &Tensor, ids: &Tensor, weights: &Tensor) -> Result<Tensor> {
        let (n, hidden) = xs.dims2()?;
        let (experts, _, _) = self.w1.dims()?;
        let ids_host = ids.to_vec2::<u32>()?;
        let weights_host = weights.to_vec2::<f32>()?;
        let mut rows = vec![Vec::<u32>::new(); experts];
        let mut scale = vec![Vec::<f32>::new(); experts];
        for (row, (ids, ws)) in ids_host.iter().zip(&weights_host).enumerate() {
            for (&e, &w) in ids.iter().zip(ws) {
                rows[e as usize].push(row as u32);
                scale[e as usize].push(w);
            }
        }
        let device = xs.device();
        let (w1, w3, w2) = (
            self.w1.grouped(device)?,
            self.w3.grouped(device)?,
            self.w2.grouped(device)?,
        );
        let mut ys = Tensor::zeros((n, hidden), DType::F32, device)?;
        for e in 0..experts {
            if rows[e].is_empty() {
                continue;
            }
            let idx = Tensor::new(rows[e].as_slice(), device)?;
            let scale = Tensor::new(scale[e].as_slice(), device)?.reshape(((), 1))?;
            let x = xs.index_select(&idx, 0)?;
            let gate = w1.matmul(e, &x)?;
            let up = w3.matmul(e, &x)?;
            let act = crate::ops::mul_and_act(&gate, &up, self.act)?;
            let down = w2.matmul(e, &act)?;
            // zopilot-gpu patch: the weighted rows added in place by a kernel of ours,
            // bit-identical to the index_add below (which used 4 blocks and copied `ys`).
            #[cfg(feature = "cuda")]
            if zopilot_kernels::moe_scatter_add(&ys, &idx, &down, &scale)? {
                continue;
            }
            ys = ys.index_add(&idx, &down.broadcast_mul(&scale)?, 0)?;
        }
        Ok(ys)
    }
}
