//! zopilot-gpu patch: Mixtral's quantized linear layers (attention projections, router,
//! lm_head) keeping their Q4K tensor, so decode runs our Q4K mat-vec (`zopilot-kernels`)
//! on an input quantized once for all layers that read it (q, k and v; router and experts).
//!
//! Upstream, each of these layers casts its input to f32, quantizes it to Q8_1, multiplies,
//! and casts back — four launches a layer, the same input quantized three times for q/k/v.
//! When immediate ISQ asks for Q4K on a CUDA device, [`QLinear::load`] quantizes the weight
//! itself (the same candle quantizer ISQ uses) and wraps the tensor in the same `GgufMatMul`
//! upstream would have built, so every other path (ISQ listing, candle's quantized matmul
//! for the rows between our kernels' and cuBLAS's ranges) is unchanged. At prefill sizes
//! (`dense_cublas_min_tokens`) the weight is dequantized to f16 for cuBLAS instead.
//! With upstream's Mixtral path chosen (`--mixtral-path upstream`) upstream's layers load instead.

use std::sync::Arc;

use candle_core::{quantized::GgmlDType, DType, Device, Result, Tensor};
use mistralrs_quant::{QuantMethod, ShardedVarBuilder};

use super::mixtral_stacked_moe::{gguf_layer, qmatmul, quantize_rows};
use super::zopilot_weights;

/// A quantized linear layer without bias.
#[derive(Clone)]
pub(crate) struct QLinear {
    /// The layer as mistral.rs sees it (`IsqModel::get_layers` may replace it).
    pub(crate) mm: Arc<dyn QuantMethod>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    q4k: Option<Q4k>,
}

#[derive(Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Q4k {
    q: Arc<candle_core::quantized::QTensor>,
    /// Address of the `mm` made from `q`: if ISQ replaces `mm` later, `q` is not used.
    mm_addr: usize,
}

fn own_q4k_enabled() -> bool {
    super::mixtral_stacked_moe::ours_enabled()
}

fn addr(mm: &Arc<dyn QuantMethod>) -> usize {
    Arc::as_ptr(mm) as *const () as usize
}

impl From<Arc<dyn QuantMethod>> for QLinear {
    /// A layer we do not own the weight of (tied embeddings).
    fn from(mm: Arc<dyn QuantMethod>) -> Self {
        Self { mm, q4k: None }
    }
}

impl QLinear {
    /// A layer around a GGUF tensor we made or were handed; our Q4K kernels take it when
    /// it is Q4K (and our Mixtral path is chosen).
    fn owned(q: Arc<candle_core::quantized::QTensor>, mm: Arc<dyn QuantMethod>) -> Self {
        let q4k = (own_q4k_enabled() && q.dtype() == GgmlDType::Q4K).then(|| Q4k {
            q,
            mm_addr: addr(&mm),
        });
        Self { mm, q4k }
    }

    /// `[out_dim, in_dim]` weight at `vb` (`vb.pp("weight")`). `eligible`: the caller's
    /// conditions for owning the weight (no pre-quantized checkpoint, no tensor parallelism).
    /// Then the installed weight store's tensor if it has one (`zopilot_weights`), else the
    /// weight quantized here when immediate ISQ asks for a GGUF type and either it is Q4K on
    /// CUDA or a store records it; otherwise `upstream(vb)`.
    pub(crate) fn load(
        in_dim: usize,
        out_dim: usize,
        vb: ShardedVarBuilder,
        eligible: bool,
        upstream: impl FnOnce(ShardedVarBuilder) -> Result<Arc<dyn QuantMethod>>,
    ) -> Result<Self> {
        if eligible {
            let name = format!("{}.weight", vb.prefix());
            let isq = mistralrs_quant::immediate_isq_match(&vb);
            let target = isq
                .as_ref()
                .and_then(|m| m.device.clone())
                .unwrap_or_else(|| vb.device().clone());
            let dims = [out_dim, in_dim];
            if let Some((q, mm)) = zopilot_weights::load_stored(&name, &dims, &target)? {
                return Ok(Self::owned(q, mm));
            }
            // Ours when our Q4K kernels take the result or a weight store records it; the
            // same candle quantizer as upstream's ISQ, so the same bytes either way.
            let dtype = isq
                .and_then(|m| GgmlDType::try_from(m.ty).ok())
                .filter(|&d| {
                    zopilot_weights::installed()
                        || (own_q4k_enabled() && d == GgmlDType::Q4K && target.is_cuda())
                });
            if let Some(dtype) = dtype.filter(|_| vb.contains_tensor("weight")) {
                let w = vb.clone().set_device(Device::Cpu).get((out_dim, in_dim), "weight")?;
                let bytes = quantize_rows(&w, dtype)?;
                zopilot_weights::record(&name, dtype, &dims, &bytes)?;
                let (q, mm) = gguf_layer(dtype, &bytes, dims.to_vec(), &target)?;
                return Ok(Self::owned(q, mm));
            }
        }
        Ok(Self {
            mm: upstream(vb)?,
            q4k: None,
        })
    }

    /// Our Q4K tensor, when our kernels may take it on `device` (ISQ has not replaced `mm`).
    #[cfg(feature = "cuda")]
    fn q4k_on(&self, device: &Device) -> Option<&candle_core::quantized::QTensor> {
        let q4k = self.q4k.as_ref()?;
        (q4k.mm_addr == addr(&self.mm) && device.is_cuda() && zopilot_kernels::q4k_applies(&q4k.q))
            .then_some(&*q4k.q)
    }

    /// The Q4K tensor for a forward of `tokens` tokens on `device`, when our kernels take it.
    #[cfg(feature = "cuda")]
    pub(crate) fn q4k_for(&self, tokens: usize, device: &Device) -> Option<&candle_core::quantized::QTensor> {
        let max = zopilot_kernels::options::get().mma_max_tokens;
        (1..=max).contains(&tokens).then(|| self.q4k_on(device)).flatten()
    }

    /// The Q4K tensor for a forward of `tokens` tokens that dequantizes it for cuBLAS
    /// (`dense_cublas_min_tokens`): at prefill sizes cuBLAS on the f16 weight outruns both
    /// candle's quantized matmul and our tensor-core kernel, and the dequantization (one
    /// write of the f16 weight) costs less than either's extra passes over the input.
    #[cfg(feature = "cuda")]
    fn q4k_for_cublas(&self, tokens: usize, device: &Device) -> Option<&candle_core::quantized::QTensor> {
        let min = zopilot_kernels::options::get().dense_cublas_min_tokens;
        (min > 0 && tokens >= min).then(|| self.q4k_on(device)).flatten()
    }

    /// `xs · Wᵀ` in `dtype` (upstream: the quantized layer's activation type, then `dtype`).
    pub(crate) fn forward(&self, xs: &Tensor, dtype: DType) -> Result<Tensor> {
        let mut ys = Self::forward_many(&[self], xs, dtype)?;
        Ok(ys.remove(0))
    }

    /// Several layers on the same input (q, k and v): the input quantized once.
    pub(crate) fn forward_many(layers: &[&Self], xs: &Tensor, dtype: DType) -> Result<Vec<Tensor>> {
        let dims = xs.dims().to_vec();
        let hidden = *dims.last().unwrap_or(&0);
        let tokens = if hidden == 0 { 0 } else { xs.elem_count() / hidden };
        #[cfg(feature = "cuda")]
        {
            let reshaped = |y: Tensor| {
                let mut shape = dims.clone();
                if let Some(last) = shape.last_mut() {
                    *last = y.dim(1)?;
                }
                y.reshape(shape)
            };
            let dense = layers
                .iter()
                .map(|l| l.q4k_for_cublas(tokens, xs.device()))
                .collect::<Option<Vec<_>>>();
            if let Some(qs) = dense {
                let x = xs.reshape((tokens, hidden))?.to_dtype(DType::F16)?;
                return qs
                    .iter()
                    .map(|q| {
                        let w = dequantize_f16(q)?;
                        reshaped(x.matmul(&w.t()?)?.to_dtype(dtype)?)
                    })
                    .collect();
            }
            let qs = layers
                .iter()
                .map(|l| l.q4k_for(tokens, xs.device()))
                .collect::<Option<Vec<_>>>();
            if let Some(qs) = qs {
                use zopilot_kernels as zq;
                let x = zq::quantize(&xs.reshape((tokens, hidden))?)?;
                return zq::matvec_many(&qs, &x, dtype, None)?
                    .into_iter()
                    .map(reshaped)
                    .collect();
            }
        }
        let _ = tokens;
        // Upstream's way, the input cast to the activation type once for layers sharing it.
        let mut cast: Option<(Option<DType>, Tensor)> = None;
        layers
            .iter()
            .map(|l| {
                let act = l.mm.quantized_act_type();
                let x = match &cast {
                    Some((t, x)) if *t == act => x.clone(),
                    _ => {
                        let x = act.map_or_else(|| Ok(xs.clone()), |t| xs.to_dtype(t))?;
                        cast = Some((act, x.clone()));
                        x
                    }
                };
                qmatmul(&x, &*l.mm)?.to_dtype(dtype)
            })
            .collect()
    }
}

/// A `[n, k]` Q4K tensor on the GPU dequantized to an f16 `[n, k]` tensor (our kernel).
#[cfg(feature = "cuda")]
fn dequantize_f16(q: &candle_core::quantized::QTensor) -> Result<Tensor> {
    let Device::Cuda(dev) = q.device() else {
        candle_core::bail!("dequantizing for cuBLAS needs a CUDA tensor");
    };
    let (n, k) = q.shape().dims2()?;
    zopilot_kernels::dequant_q4k_f16(&dev, q.device_ptr()? as u64, n, k)
}
