#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

/// Mixtral Model
/// https://github.com/huggingface/transformers/blob/main/src/transformers/models/mixtral/modeling_mixtral.py
/// https://mistral.ai/news/mixtral-of-experts/
use candle_core::{DType, Device, Module, Result, Tensor};
use mistralrs_quant::{
    ColumnParallelLayer, QuantMethod, QuantizedConfig, ReplicatedLayer, RowParallelLayer,
    ShardedVarBuilder,
};
use serde::{Deserialize, Serialize};
use std::{collections::HashMap, sync::Arc};

use super::mixtral_stacked_moe::{ours_enabled, StackedExperts};
use super::zopilot_linear::QLinear;
use crate::{
    amoe::AnyMoeBaseModelMixin,
    attention::SdpaParams,
    device_map::{DeviceMappedMask, DeviceMapper},
    layers::{self, Activation, CausalMasker, MatMul, RmsNorm, RotaryEmbedding, Sdpa},
    layers_masker::PastKvLenCache,
    paged_attention::{AttentionImplementation, ModelConfigMetadata, PagedAttention},
    pipeline::{
        extract_logits,
        text_models_inputs_processor::{FlashParams, PagedAttentionInputMetadata},
        EitherCache, IsqModel, KvCache, NormalCache, NormalLoadingMetadata, NormalModel,
    },
    serde_default_fn,
    utils::{progress::NiceProgressBar, unvarbuilder::UnVarBuilder},
};

serde_default_fn!(bool, word_emb_default, false);

/// https://github.com/huggingface/transformers/blob/1a585c1222a56bcaecc070966d558d4a9d862e83/src/transformers/models/mixtral/configuration_mixtral.py#L113
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Config {
    pub(crate) vocab_size: usize,
    pub(crate) hidden_size: usize,
    pub(crate) intermediate_size: usize,
    pub(crate) num_hidden_layers: usize,
    pub(crate) num_attention_heads: usize,
    pub(crate) num_key_value_heads: usize,
    pub(crate) hidden_act: Activation,
    pub(crate) max_position_embeddings: usize,
    pub(crate) rms_norm_eps: f64,
    pub(crate) rope_theta: f64,
    pub(crate) sliding_window: Option<usize>,
    pub(crate) num_experts_per_tok: usize,
    pub(crate) num_local_experts: usize,
    pub(crate) quantization_config: Option<QuantizedConfig>,
    #[serde(default = "word_emb_default")]
    pub(crate) tie_word_embeddings: bool,
}

/// zopilot-gpu patch: whether this crate's Mixtral loads and quantizes a layer's weights itself
/// (stacked experts, `QLinear`): not for pre-quantized checkpoints, not under tensor
/// parallelism, and not when ISQ runs after loading (imatrix, UQFF, calibration), which would
/// replace the layers and strand our tensors.
fn own_weights(cfg: &Config, comm: &mistralrs_quant::Comm, loading_isq: bool) -> bool {
    cfg.quantization_config.is_none() && comm.world_size() == 1 && !loading_isq
}

struct Attention {
    q_proj: QLinear,
    k_proj: QLinear,
    v_proj: QLinear,
    o_proj: QLinear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    rotary_emb: Arc<RotaryEmbedding>,
    paged_attn: Option<PagedAttention>,
    sdpa_params: SdpaParams,
}

impl Attention {
    fn new(
        rotary_emb: Arc<RotaryEmbedding>,
        cfg: &Config,
        vb: ShardedVarBuilder,
        paged_attn: Option<PagedAttention>,
        comm: &Arc<mistralrs_quant::Comm>,
        loading_isq: bool,
    ) -> Result<Self> {
        let hidden_sz = cfg.hidden_size;
        let num_heads = cfg.num_attention_heads;
        let num_kv_heads = cfg.num_key_value_heads;
        let head_dim = hidden_sz / num_heads;
        // zopilot-gpu patch: layers keep their Q4K tensor for our decode mat-vec.
        let own = own_weights(cfg, comm, loading_isq);
        let q_proj = QLinear::load(hidden_sz, num_heads * head_dim, vb.pp("q_proj"), own, |vb| {
            ColumnParallelLayer::new(
                hidden_sz,
                num_heads * head_dim,
                &cfg.quantization_config,
                false,
                comm,
                vb,
            )
        })?;
        let kv_shard = mistralrs_quant::compute_kv_shard(
            cfg.num_key_value_heads,
            cfg.hidden_size / cfg.num_attention_heads,
            comm,
        );
        let kv = |name: &str| {
            QLinear::load(hidden_sz, num_kv_heads * head_dim, vb.pp(name), own, |vb| {
                ColumnParallelLayer::new_with_shard(
                    hidden_sz,
                    num_kv_heads * head_dim,
                    &cfg.quantization_config,
                    false,
                    comm,
                    kv_shard,
                    vb,
                )
            })
        };
        let k_proj = kv("k_proj")?;
        let v_proj = kv("v_proj")?;
        let o_proj = QLinear::load(num_heads * head_dim, hidden_sz, vb.pp("o_proj"), own, |vb| {
            RowParallelLayer::new(
                num_heads * head_dim,
                hidden_sz,
                &cfg.quantization_config,
                false,
                comm,
                vb,
            )
        })?;
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            num_heads: num_heads / comm.world_size(),
            num_kv_heads: (num_kv_heads / comm.world_size()).max(1),
            head_dim,
            rotary_emb,
            paged_attn,
            sdpa_params: SdpaParams {
                n_kv_groups: mistralrs_quant::compute_n_kv_groups(
                    cfg.num_key_value_heads,
                    cfg.num_attention_heads,
                    comm,
                ),
                softcap: None,
                softmax_scale: 1.0 / (head_dim as f32).sqrt(),
                sliding_window: cfg.sliding_window,
                sinks: None,
            },
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        xs: &Tensor,
        attention_mask: Option<&Tensor>,
        seqlen_offsets: &[usize],
        kv_cache: &mut KvCache,
        metadata: Option<((Tensor, Tensor), &PagedAttentionInputMetadata)>,
        flash_params: &FlashParams,
    ) -> Result<Tensor> {
        let (b_sz, q_len, _) = xs.dims3()?;

        let original_dtype = xs.dtype();
        let [q, k, v]: [Tensor; 3] =
            QLinear::forward_many(&[&self.q_proj, &self.k_proj, &self.v_proj], xs, original_dtype)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("three projections".into()))?;
        self.attend(
            (q, k, v),
            (b_sz, q_len),
            attention_mask,
            seqlen_offsets,
            kv_cache,
            metadata,
            flash_params,
        )
    }

    /// zopilot-gpu patch: `forward` after the q/k/v projections (`[b, q_len, heads·dim]` each,
    /// in the model's dtype): rope, attention, o_proj.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        (q, k, v): (Tensor, Tensor, Tensor),
        (b_sz, q_len): (usize, usize),
        attention_mask: Option<&Tensor>,
        seqlen_offsets: &[usize],
        kv_cache: &mut KvCache,
        metadata: Option<((Tensor, Tensor), &PagedAttentionInputMetadata)>,
        flash_params: &FlashParams,
    ) -> Result<Tensor> {
        let original_dtype = q.dtype();
        #[cfg(feature = "cuda")]
        if let Some((out, quantized)) = self.attend_one_token(
            (&q, &k, &v),
            (b_sz, q_len),
            attention_mask,
            seqlen_offsets,
            metadata.as_ref(),
            flash_params,
        )? {
            // The attention kernel quantized its output for o_proj already: straight to the
            // mat-vec (what `o_proj.forward` would do after quantizing `out` the same way).
            if let (Some(x), Some(w)) = (quantized, self.o_proj.q4k_for(1, out.device())) {
                let y = zopilot_kernels::matvec_many(&[w], &x, original_dtype, None)?;
                return y[0].reshape((b_sz, q_len, ()));
            }
            return self.o_proj.forward(&out, original_dtype);
        }

        let (q, k, v) = if q_len != 1 {
            let q = q
                .reshape((b_sz, q_len, self.num_heads, self.head_dim))?
                .transpose(1, 2)?;
            let k = k
                .reshape((b_sz, q_len, self.num_kv_heads, self.head_dim))?
                .transpose(1, 2)?;
            let v = v
                .reshape((b_sz, q_len, self.num_kv_heads, self.head_dim))?
                .transpose(1, 2)?;
            (q, k, v)
        } else {
            let q = q.reshape((b_sz, self.num_heads, q_len, self.head_dim))?;
            let k = k.reshape((b_sz, self.num_kv_heads, q_len, self.head_dim))?;
            let v = v.reshape((b_sz, self.num_kv_heads, q_len, self.head_dim))?;
            (q, k, v)
        };

        let (q, k) = self.rotary_emb.forward(&q, &k, seqlen_offsets)?;

        let mut attn_output = match &self.paged_attn {
            Some(paged_attn) => match metadata {
                Some(((key_cache, value_cache), input_metadata)) => paged_attn.forward(
                    &q,
                    &k,
                    &v,
                    attention_mask,
                    Some(key_cache),
                    Some(value_cache),
                    input_metadata,
                    &self.sdpa_params,
                    Some(flash_params),
                )?,
                None => {
                    // If we don't have metadata, we are most likely generating an imatrix so we don't want to populate that.
                    // Generating the dummy metadata with the assumption that we are not generating text (only processing prompts).
                    let input_metadata = PagedAttentionInputMetadata::dummy(q.device())?;
                    // Sanity check.
                    assert!(attention_mask.is_some());
                    paged_attn.forward(
                        &q,
                        &k,
                        &v,
                        attention_mask,
                        None,
                        None,
                        &input_metadata,
                        &self.sdpa_params,
                        Some(flash_params),
                    )?
                }
            },
            None => {
                let (k, v) = kv_cache.append(&k, &v)?;

                Sdpa.run_attention(
                    &q,
                    &k,
                    &v,
                    attention_mask,
                    Some(flash_params),
                    &self.sdpa_params,
                )?
            }
        };

        attn_output = if attention_mask.is_some() {
            attn_output.transpose(1, 2)?.reshape((b_sz, q_len, ()))?
        } else {
            attn_output.reshape((b_sz, q_len, ()))?
        };
        self.o_proj.forward(&attn_output, original_dtype)
    }
}

impl Attention {
    /// zopilot-gpu patch: one decode token (batch 1) with paged attention on CUDA. Where our
    /// split-context attention applies (head dim 128, plain causal attention, block size a
    /// multiple of 8): its two kernels also rotate q and k and write the KV cache
    /// (`decode_attention` with [`DecodeRope`](zopilot_kernels::DecodeRope)), and
    /// with a Q4K o_proj quantize the output for o_proj's mat-vec — two launches where rope q,
    /// rope k, `reshape_and_cache`, paged attention and the quantization were five. Otherwise
    /// the rope and the cache write in one kernel of ours (`rope_cache_decode`), then paged
    /// attention's decode over the cache (`forward_donor_cache`, which does not write it).
    /// `None` when the layer is not set up that way (no paged attention, a cache in another
    /// dtype than the activations — FP8, whose scales the kernels do not apply —, interleaved
    /// rope) or with upstream's Mixtral path chosen: the caller then takes the general path.
    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    fn attend_one_token(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        (b_sz, q_len): (usize, usize),
        attention_mask: Option<&Tensor>,
        seqlen_offsets: &[usize],
        metadata: Option<&((Tensor, Tensor), &PagedAttentionInputMetadata)>,
        flash_params: &FlashParams,
    ) -> Result<Option<(Tensor, Option<zopilot_kernels::Q8Rows>)>> {
        let (Some(paged_attn), Some(((key_cache, value_cache), input_metadata)), Some((cos, sin))) =
            (&self.paged_attn, metadata, self.rotary_emb.neox_tables())
        else {
            return Ok(None);
        };
        let slots = input_metadata.slot_mappings.get(&q.device().location());
        let Some(slots) = slots else {
            return Ok(None);
        };
        if b_sz * q_len != 1
            || attention_mask.is_some()
            || seqlen_offsets.len() != 1
            || seqlen_offsets[0] >= cos.dim(0)?
            || key_cache.dtype() != q.dtype()
            || cos.dtype() != q.dtype()
            || key_cache.rank() != 5
            || slots.dtype() != DType::I64
            || slots.elem_count() != 1
            || !q.device().is_cuda()
            || !ours_enabled()
        {
            return Ok(None);
        }
        let pos = seqlen_offsets[0];
        let q = q.reshape((1, self.num_heads, 1, self.head_dim))?;
        let k = k.reshape((1, self.num_kv_heads, 1, self.head_dim))?;
        let v = v.reshape((1, self.num_kv_heads, 1, self.head_dim))?;
        let (cos, sin) = (cos.narrow(0, pos, 1)?, sin.narrow(0, pos, 1)?);
        let rope = zopilot_kernels::DecodeRope {
            k: &k,
            v: &v,
            cos: &cos,
            sin: &sin,
            slot_mapping: slots,
        };
        // Our split-context decode attention where it applies (plain causal attention of one
        // sequence, head dim 128), rotary embedding and cache write in its launch; else the
        // rope + cache kernel, then paged attention's decode kernel over the same cache.
        let sdpa = &self.sdpa_params;
        let table = input_metadata.full_block_tables.as_ref();
        let (table, ctx) = match (sdpa.sliding_window, table) {
            (None, Some(t)) => (Some(t), input_metadata.full_max_context_len),
            _ => (
                input_metadata.block_tables.as_ref(),
                input_metadata.max_context_len,
            ),
        };
        let table = table.and_then(|t| t.get(&q.device().location()));
        let ours = match (table, ctx) {
            (Some(table), Some(ctx))
                if table.dtype() == DType::U32
                    && self.head_dim == 128
                    && key_cache.dim(3)? % 8 == 0
                    && sdpa.sliding_window.is_none()
                    && sdpa.softcap.is_none_or(|c| c == 1.0)
                    && sdpa.sinks.is_none()
                    && !paged_attn.has_alibi() =>
            {
                Some((table, ctx))
            }
            _ => None,
        };
        // Rope and cache write in our attention's own launch, or in their kernel first.
        let fused = ours.is_some();
        if !fused {
            zopilot_kernels::rope_cache_decode(&q, &rope, key_cache, value_cache)?;
        }
        let (out, quantized) = match ours {
            Some((table, ctx)) => zopilot_kernels::decode_attention(
                &q,
                fused.then_some(&rope),
                key_cache,
                value_cache,
                table,
                ctx,
                sdpa.softmax_scale,
                self.o_proj.q4k_for(1, q.device()).is_some(),
            )?,
            None => (
                paged_attn.forward_donor_cache(
                    &q,
                    key_cache,
                    value_cache,
                    None,
                    input_metadata,
                    sdpa,
                    Some(flash_params),
                )?,
                None,
            ),
        };
        Ok(Some((out.reshape((b_sz, q_len, ()))?, quantized)))
    }
}

#[derive(Clone)]
struct BlockSparseTop2MLP {
    w1: Arc<dyn QuantMethod>,
    w2: Arc<dyn QuantMethod>,
    w3: Arc<dyn QuantMethod>,
    act_fn: Activation,
}

impl BlockSparseTop2MLP {
    fn new(cfg: &Config, vb: ShardedVarBuilder, comm: &Arc<mistralrs_quant::Comm>) -> Result<Self> {
        let hidden_sz = cfg.hidden_size;
        let intermediate_sz = cfg.intermediate_size;
        let w1 = ColumnParallelLayer::new(
            hidden_sz,
            intermediate_sz,
            &cfg.quantization_config,
            false,
            comm,
            vb.pp("w1"),
        )?;
        let w2 = RowParallelLayer::new(
            intermediate_sz,
            hidden_sz,
            &cfg.quantization_config,
            false,
            comm,
            vb.pp("w2"),
        )?;
        let w3 = ColumnParallelLayer::new(
            hidden_sz,
            intermediate_sz,
            &cfg.quantization_config,
            false,
            comm,
            vb.pp("w3"),
        )?;
        Ok(Self {
            w1,
            w2,
            w3,
            act_fn: cfg.hidden_act,
        })
    }
}

impl Module for BlockSparseTop2MLP {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let original_dtype = xs.dtype();
        let mut xs = xs.clone();
        if let Some(t) = self.w1.quantized_act_type() {
            xs = xs.to_dtype(t)?;
        }
        let w1_out = MatMul.qmethod_matmul(&xs, &*self.w1)?;
        let w3_out = MatMul.qmethod_matmul(&xs, &*self.w3)?;
        let activated = crate::ops::mul_and_act(&w1_out, &w3_out, self.act_fn)?;
        let mut res = MatMul.qmethod_matmul(&activated, &*self.w2)?;
        if self.w1.quantized_act_type().is_some() {
            res = res.to_dtype(original_dtype)?;
        }
        Ok(res)
    }
}

#[derive(Clone)]
struct SparseMoeBlock {
    gate: QLinear,
    /// Upstream's per-expert layers; empty when `stacked` is used (zopilot-gpu patch).
    experts: Vec<BlockSparseTop2MLP>,
    stacked: Option<Arc<StackedExperts>>,
    num_experts_per_tok: usize,
}

impl SparseMoeBlock {
    fn new(
        cfg: &Config,
        vb: ShardedVarBuilder,
        comm: &Arc<mistralrs_quant::Comm>,
        loading_isq: bool,
    ) -> Result<Self> {
        let own = own_weights(cfg, comm, loading_isq);
        let gate = QLinear::load(cfg.hidden_size, cfg.num_local_experts, vb.pp("gate"), own, |vb| {
            mistralrs_quant::linear_no_bias(
                cfg.hidden_size,
                cfg.num_local_experts,
                &cfg.quantization_config,
                vb,
            )
        })?;
        let vb = vb.pp("experts");
        // zopilot-gpu patch: stacked experts with on-device routing unless `own_weights` says
        // no or upstream's path is chosen (`--mixtral-path upstream`).
        let stacked = if own && ours_enabled() {
            StackedExperts::load(
                &vb,
                cfg.num_local_experts,
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.hidden_act,
            )?
            .map(Arc::new)
        } else {
            None
        };
        let mut experts = Vec::with_capacity(cfg.num_local_experts);
        if stacked.is_none() {
            for idx in 0..cfg.num_local_experts {
                let expert = BlockSparseTop2MLP::new(cfg, vb.pp(idx), comm)?;
                experts.push(expert)
            }
        }
        Ok(SparseMoeBlock {
            gate,
            experts,
            stacked,
            num_experts_per_tok: cfg.num_experts_per_tok,
        })
    }
}

impl Module for SparseMoeBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b_size, seq_len, hidden_dim) = xs.dims3()?;
        let xs = xs.reshape(((), hidden_dim))?;

        if let Some(stacked) = self.stacked.as_ref() {
            // zopilot-gpu patch: decode through the fused Q4K kernels where they apply.
            if let Some(ys) = stacked.forward_fused(&xs, &self.gate, self.num_experts_per_tok)? {
                return ys.reshape((b_size, seq_len, hidden_dim));
            }
        }
        let original_dtype = xs.dtype();
        let router_logits = self.gate.forward(&xs, original_dtype)?;
        // As upstream: the experts below take the router's activation type (f32 when quantized).
        let xs = match self.gate.mm.quantized_act_type() {
            Some(t) => xs.to_dtype(t)?,
            None => xs,
        };

        if let Some(stacked) = &self.stacked {
            let ys = stacked.forward(&xs, &router_logits, self.num_experts_per_tok)?;
            return ys.reshape((b_size, seq_len, hidden_dim));
        }

        let routing_weights = candle_nn::ops::softmax_last_dim(&router_logits)?;

        // In order to extract topk, we extract the data from the tensor and manipulate it
        // directly. Maybe we will want to use some custom ops instead at some point.
        let routing_weights = routing_weights.to_dtype(DType::F32)?.to_vec2::<f32>()?;

        // routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        // top_x contains the row indexes to evaluate for each expert.
        let mut top_x = vec![vec![]; self.experts.len()];
        let mut selected_rws = vec![vec![]; self.experts.len()];
        for (row_idx, rw) in routing_weights.iter().enumerate() {
            let mut dst = (0..rw.len() as u32).collect::<Vec<u32>>();
            dst.sort_by(|&i, &j| rw[j as usize].total_cmp(&rw[i as usize]));
            let mut sum_routing_weights = 0f32;
            for &expert_idx in dst.iter().take(self.num_experts_per_tok) {
                let expert_idx = expert_idx as usize;
                let routing_weight = rw[expert_idx];
                sum_routing_weights += routing_weight;
                top_x[expert_idx].push(row_idx as u32);
            }
            for &expert_idx in dst.iter().take(self.num_experts_per_tok) {
                let expert_idx = expert_idx as usize;
                let routing_weight = rw[expert_idx];
                selected_rws[expert_idx].push(routing_weight / sum_routing_weights)
            }
        }

        // routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        // expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)

        let mut ys = xs.zeros_like()?;
        for (expert_idx, expert_layer) in self.experts.iter().enumerate() {
            let top_x = &top_x[expert_idx];
            if top_x.is_empty() {
                continue;
            }
            let top_x = Tensor::new(top_x.as_slice(), xs.device())?;
            let selected_rws =
                Tensor::new(selected_rws[expert_idx].as_slice(), xs.device())?.reshape(((), 1))?;
            // Index the correct hidden states and compute the expert hidden state for
            // the current expert. We need to make sure to multiply the output hidden
            // states by `routing_weights` on the corresponding tokens (top-1 and top-2)
            let current_state = xs.index_select(&top_x, 0)?.reshape(((), hidden_dim))?;
            // current_hidden_states = expert_layer(current_state, routing_weights[top_x_list, idx_list, None])
            let current_hidden_states = expert_layer.forward(&current_state)?;
            // zopilot-gpu patch: the weights are f32; upstream multiplied them into bf16 states
            // ("dtype mismatch in mul") whenever the model ran unquantized in bf16.
            let current_hidden_states = current_hidden_states
                .broadcast_mul(&selected_rws.to_dtype(current_hidden_states.dtype())?)?;
            ys = ys.index_add(&top_x, &current_hidden_states, 0)?;
        }

        let ys = ys.reshape((b_size, seq_len, hidden_dim))?;
        Ok(ys)
    }
}

struct DecoderLayer {
    self_attn: Attention,
    block_sparse_moe: SparseMoeBlock,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    #[allow(clippy::too_many_arguments)]
    fn new(
        rotary_emb: Arc<RotaryEmbedding>,
        cfg: &Config,
        vb: ShardedVarBuilder,
        mapper: &dyn DeviceMapper,
        layer_idx: usize,
        loading_isq: bool,
        paged_attn: Option<PagedAttention>,
        comm: &Arc<mistralrs_quant::Comm>,
    ) -> Result<Self> {
        let self_attn = Attention::new(
            rotary_emb,
            cfg,
            mapper.set_device(layer_idx, vb.pp("self_attn"), loading_isq),
            paged_attn,
            comm,
            loading_isq,
        )?;
        let block_sparse_moe = SparseMoeBlock::new(
            cfg,
            mapper.set_device(layer_idx, vb.pp("block_sparse_moe"), loading_isq),
            comm,
            loading_isq,
        )?;
        let input_layernorm = RmsNorm::new(
            cfg.hidden_size,
            cfg.rms_norm_eps,
            mapper.set_device(layer_idx, vb.pp("input_layernorm"), false),
        )?;
        let post_attention_layernorm = RmsNorm::new(
            cfg.hidden_size,
            cfg.rms_norm_eps,
            mapper.set_device(layer_idx, vb.pp("post_attention_layernorm"), false),
        )?;
        Ok(Self {
            self_attn,
            block_sparse_moe,
            input_layernorm,
            post_attention_layernorm,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        xs: &Tensor,
        attention_mask: Option<&Tensor>,
        seqlen_offsets: &[usize],
        kv_cache: &mut KvCache,
        metadata: Option<((Tensor, Tensor), &PagedAttentionInputMetadata)>,
        flash_params: &FlashParams,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(plan) = self.fused_plan(xs)? {
            return self.forward_fused(
                plan,
                xs,
                attention_mask,
                seqlen_offsets,
                kv_cache,
                metadata,
                flash_params,
            );
        }
        let residual = xs;
        let xs = self.input_layernorm.forward(xs)?;
        let xs = self.self_attn.forward(
            &xs,
            attention_mask,
            seqlen_offsets,
            kv_cache,
            metadata,
            flash_params,
        )?;
        let xs = (xs + residual)?;
        let residual = &xs;
        let xs = xs
            .apply(&self.post_attention_layernorm)?
            .apply(&self.block_sparse_moe)?
            .to_dtype(residual.dtype())?;
        residual + xs
    }
}

/// zopilot-gpu patch: what a fused decode layer runs on (`DecoderLayer::fused_plan`).
#[cfg(feature = "cuda")]
struct FusedLayer<'a> {
    qkv: [&'a candle_core::quantized::QTensor; 3],
    moe: super::mixtral_stacked_moe::FusedMoe<'a>,
}

/// zopilot-gpu patch: a decode layer through our Q4K kernels (the `zopilot-kernels` crate).
#[cfg(feature = "cuda")]
impl DecoderLayer {
    /// The q/k/v weights and the MoE block's tensors when this layer's decode of `xs` goes
    /// the fused way: every projection and the MoE block Q4K on CUDA, few enough tokens for
    /// the fused MoE.
    fn fused_plan(&self, xs: &Tensor) -> Result<Option<FusedLayer<'_>>> {
        let (b, s, _) = xs.dims3()?;
        let (n, device) = (b * s, xs.device());
        let (attn, moe) = (&self.self_attn, &self.block_sparse_moe);
        if attn.o_proj.q4k_for(n, device).is_none() {
            return Ok(None);
        }
        let plan = || {
            Some(FusedLayer {
                qkv: [
                    attn.q_proj.q4k_for(n, device)?,
                    attn.k_proj.q4k_for(n, device)?,
                    attn.v_proj.q4k_for(n, device)?,
                ],
                moe: moe
                    .stacked
                    .as_ref()?
                    .fused(n, moe.num_experts_per_tok, &moe.gate, device)?,
            })
        };
        Ok(plan())
    }

    /// RMSNorm fused with the quantization of its output, q/k/v in one mat-vec launch (on
    /// tensor cores, one packing for the three, from 3 tokens), attention (ours for one token,
    /// [`Attention::attend_one_token`]), then residual add + RMSNorm + quantization (+ the MoE
    /// routing, when asked for) in one kernel and the fused MoE adding the second residual
    /// itself: the same arithmetic as `forward` (values rounded to the model's dtype where it
    /// rounds them) in about a third of the launches.
    #[allow(clippy::too_many_arguments)]
    fn forward_fused(
        &self,
        FusedLayer { qkv, moe }: FusedLayer<'_>,
        xs: &Tensor,
        attention_mask: Option<&Tensor>,
        seqlen_offsets: &[usize],
        kv_cache: &mut KvCache,
        metadata: Option<((Tensor, Tensor), &PagedAttentionInputMetadata)>,
        flash_params: &FlashParams,
    ) -> Result<Tensor> {
        use zopilot_kernels as zq;
        let (b, s, hidden) = xs.dims3()?;
        let dtype = xs.dtype();
        let x = xs.reshape((b * s, hidden))?;
        let norm = &self.input_layernorm;
        let (_, xq, _) = zq::rmsnorm_quantize(&x, None, norm.weight(), norm.eps() as f32, None)?;
        let mut proj = zq::matvec_many(&qkv, &xq, dtype, None)?.into_iter();
        let mut next = || -> Result<Tensor> {
            let t = proj
                .next()
                .ok_or_else(|| candle_core::Error::Msg("three projections".into()))?;
            t.reshape((b, s, ()))
        };
        let (q, k, v) = (next()?, next()?, next()?);
        let attn = self.self_attn.attend(
            (q, k, v),
            (b, s),
            attention_mask,
            seqlen_offsets,
            kv_cache,
            metadata,
            flash_params,
        )?;
        let norm = &self.post_attention_layernorm;
        let (h, mq, _) = zq::rmsnorm_quantize(
            &attn.reshape((b * s, hidden))?,
            Some(&x),
            norm.weight(),
            norm.eps() as f32,
            None,
        )?;
        let h = h.ok_or_else(|| candle_core::Error::Msg("fused RMSNorm: no residual".into()))?;
        moe.forward(&mq, dtype, Some(&h))?
            .reshape((b, s, hidden))
    }
}

pub struct Model {
    embed_tokens: candle_nn::Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: QLinear,
    sliding_window: Option<usize>,
    device: Device,
    cache: EitherCache,
    max_seq_len: usize,
    mapper: Box<dyn DeviceMapper + Send + Sync>,
    cfg: ModelConfigMetadata,
}

impl Model {
    pub fn new(
        cfg: &Config,
        vb: ShardedVarBuilder,
        is_gptx: bool,
        normal_loading_metadata: NormalLoadingMetadata,
        attention_mechanism: AttentionImplementation,
    ) -> Result<Self> {
        if let Some(ref quant_cfg) = &cfg.quantization_config {
            tracing::info!(
                "Using {} quantization: {}.",
                quant_cfg.name(),
                quant_cfg.get_bits_name(&vb)
            );
        }
        let mapper = normal_loading_metadata.mapper;
        let vb_m = vb.pp("model");

        let embed_tokens = layers::embedding(
            cfg.vocab_size,
            cfg.hidden_size,
            mapper.set_nm_device(vb_m.pp("embed_tokens"), false),
            &cfg.quantization_config,
        )?;
        let head_dim = cfg.hidden_size / cfg.num_attention_heads;
        let mut ropes = HashMap::new();
        for layer_idx in 0..cfg.num_hidden_layers {
            let device = mapper
                .device_for(layer_idx, false)
                .unwrap_or(&normal_loading_metadata.real_device);
            ropes.insert(
                device.location(),
                Arc::new(RotaryEmbedding::new(
                    cfg.rope_theta as f32,
                    head_dim,
                    cfg.max_position_embeddings,
                    device,
                    is_gptx,
                    vb_m.dtype(),
                )?),
            );
        }
        let vb_l = vb_m.pp("layers");
        let layers: Vec<DecoderLayer> = NiceProgressBar::<_, 'b'>(
            0..cfg.num_hidden_layers,
            "Loading repeating layers",
            &normal_loading_metadata.multi_progress,
        )
        .par_iter_if_isq(|layer_idx| {
            let device = mapper
                .device_for(layer_idx, false)
                .unwrap_or(&normal_loading_metadata.real_device);
            let rotary_emb = ropes
                .get(&device.location())
                .expect("No RoPE for device location!")
                .clone();
            let paged_attn = match &attention_mechanism {
                AttentionImplementation::Eager => None,
                AttentionImplementation::PagedAttention => {
                    Some(PagedAttention::new(head_dim, device, None)?)
                }
            };
            let comm = mapper.get_comm_for(layer_idx)?;
            DecoderLayer::new(
                rotary_emb.clone(),
                cfg,
                vb_l.pp(layer_idx),
                &*mapper,
                layer_idx,
                normal_loading_metadata.loading_isq,
                paged_attn,
                &comm,
            )
        })?;
        let norm = RmsNorm::new(
            cfg.hidden_size,
            cfg.rms_norm_eps,
            mapper.set_nm_device(vb_m.pp("norm"), false),
        )?;
        let lm_head = if !cfg.tie_word_embeddings {
            let own =
                cfg.quantization_config.is_none() && !normal_loading_metadata.loading_isq;
            let vb_head = mapper.set_nm_device(vb.pp("lm_head"), normal_loading_metadata.loading_isq);
            QLinear::load(cfg.hidden_size, cfg.vocab_size, vb_head, own, |vb| {
                ReplicatedLayer::new(
                    cfg.hidden_size,
                    cfg.vocab_size,
                    &cfg.quantization_config,
                    false,
                    vb,
                )
            })?
        } else {
            QLinear::from(ReplicatedLayer::from_linear(candle_nn::Linear::new(
                mapper.cast_nm_device(
                    embed_tokens.embeddings(),
                    normal_loading_metadata.loading_isq,
                )?,
                None,
            ))?)
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            sliding_window: cfg.sliding_window,
            device: normal_loading_metadata.real_device,
            cache: EitherCache::Normal(NormalCache::new_sliding(
                cfg.num_hidden_layers,
                cfg.max_position_embeddings,
                cfg.sliding_window,
            )),
            max_seq_len: cfg.max_position_embeddings,
            cfg: ModelConfigMetadata {
                max_seq_len: cfg.max_position_embeddings,
                num_layers: cfg.num_hidden_layers,
                hidden_size: cfg.hidden_size,
                num_attn_heads: cfg.num_attention_heads / mapper.get_comm_for(0)?.world_size(),
                num_kv_heads: (cfg.num_key_value_heads / mapper.get_comm_for(0)?.world_size())
                    .max(1),
                sliding_window: cfg.sliding_window,
                k_head_dim: cfg.hidden_size / cfg.num_attention_heads,
                v_head_dim: cfg.hidden_size / cfg.num_attention_heads,
                kv_cache_layout: crate::paged_attention::KvCacheLayout::Standard,
            },
            mapper,
        })
    }

    pub fn forward(
        &self,
        input_ids: &Tensor,
        seqlen_offsets: &[usize],
        context_lens: Vec<(usize, usize)>,
        metadata: Option<(Vec<(Tensor, Tensor)>, &PagedAttentionInputMetadata)>,
        flash_params: &FlashParams,
    ) -> Result<Tensor> {
        let mut xs = self.embed_tokens.forward(input_ids)?;
        let cache = &mut self.cache.normal().0;
        let attention_mask = CausalMasker.make_sliding_window_causal_mask_matrix(
            input_ids,
            metadata
                .as_ref()
                .map(|(_, _)| &seqlen_offsets as &dyn PastKvLenCache)
                .unwrap_or(cache as &dyn PastKvLenCache),
            self.sliding_window,
            xs.dtype(),
            self.cfg.num_attn_heads,
        )?;
        // PagedAttention prompt chunking
        let attention_mask = attention_mask.filter(|_| {
            metadata
                .as_ref()
                .map(|(_, meta)| meta.is_first_prompt_chunk)
                .unwrap_or(true)
        });
        let attention_mask = DeviceMappedMask::new(attention_mask, &*self.mapper)?;
        for (i, layer) in self.layers.iter().enumerate() {
            xs = self.mapper.map(xs, i)?;
            xs = layer.forward(
                &xs,
                attention_mask.as_ref().map(|m| m.get(xs.device())),
                seqlen_offsets,
                &mut cache[i],
                metadata
                    .as_ref()
                    .map(|(kv_cache, metadata)| (kv_cache[i].clone(), *metadata)),
                flash_params,
            )?;
        }
        let xs = xs.to_device(&self.device)?;
        let xs = xs.apply(&self.norm)?;
        let xs = extract_logits(&xs, context_lens)?;
        let dtype = self.lm_head.mm.quantized_act_type().unwrap_or(xs.dtype());
        self.lm_head.forward(&xs, dtype)
    }
}

impl IsqModel for Model {
    fn get_layers(
        &mut self,
    ) -> (
        Vec<(&mut Arc<dyn QuantMethod>, Option<usize>)>,
        &dyn DeviceMapper,
    ) {
        let mut tensors = Vec::new();
        tensors.push((&mut self.lm_head.mm, None));
        for (i, layer) in self.layers.iter_mut().enumerate() {
            tensors.push((&mut layer.self_attn.q_proj.mm, Some(i)));
            tensors.push((&mut layer.self_attn.k_proj.mm, Some(i)));
            tensors.push((&mut layer.self_attn.v_proj.mm, Some(i)));
            tensors.push((&mut layer.self_attn.o_proj.mm, Some(i)));
            tensors.push((&mut layer.block_sparse_moe.gate.mm, Some(i)));
            for expert in &mut layer.block_sparse_moe.experts {
                tensors.push((&mut expert.w1, Some(i)));
                tensors.push((&mut expert.w2, Some(i)));
                tensors.push((&mut expert.w3, Some(i)));
            }
        }
        (tensors, &*self.mapper)
    }

    fn residual_tensors(&self) -> Vec<(String, Tensor)> {
        let uvb = UnVarBuilder::new();

        let uvb_m = uvb.pp("model");
        uvb_m.pp("embed_tokens").add(&self.embed_tokens);
        uvb_m.pp("norm").add(&self.norm);

        for (layer_idx, layer) in self.layers.iter().enumerate() {
            let uvb_l = uvb_m.pp("layers").pp(layer_idx);
            uvb_l.pp("input_layernorm").add(&layer.input_layernorm);
            uvb_l
                .pp("post_attention_layernorm")
                .add(&layer.post_attention_layernorm);
        }

        uvb.to_safetensors()
    }
}

impl NormalModel for Model {
    fn forward(
        &self,
        input_ids: &Tensor,
        seqlen_offsets: &[usize],
        context_lens: Vec<(usize, usize)>,
        _position_ids: Vec<usize>,
        metadata: Option<(Vec<(Tensor, Tensor)>, &PagedAttentionInputMetadata)>,
        flash_params: &FlashParams,
    ) -> Result<Tensor> {
        self.forward(
            input_ids,
            seqlen_offsets,
            context_lens,
            metadata,
            flash_params,
        )
    }
    fn xlora_forward(
        &self,
        _input_ids: &Tensor,
        _input_ids_full: &Tensor,
        _seqlen_offsets: &[usize],
        _seqlen_offsets_full: &[usize],
        _no_kv_cache: bool,
        _non_granular_state: &Option<crate::xlora_models::NonGranularState>,
        _context_lens: Vec<(usize, usize)>,
        _position_ids: Vec<usize>,
        _flash_params: &FlashParams,
        _flash_params_full: &FlashParams,
    ) -> Result<Tensor> {
        unimplemented!()
    }
    fn cache(&self) -> &EitherCache {
        &self.cache
    }
    fn cache_mut(&mut self) -> &mut EitherCache {
        &mut self.cache
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn is_xlora(&self) -> bool {
        false
    }
    fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }
    fn config(&self) -> &ModelConfigMetadata {
        &self.cfg
    }
}

impl AnyMoeBaseModelMixin for Model {}
