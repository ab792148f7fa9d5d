//! The tensors of a quantized Mixtral in GGUF, named and laid out as llama.cpp's converter
//! writes them (architecture `llama`, experts stacked per layer as `blk.N.ffn_*_exps`), and
//! each one's Hugging Face name, so the cache file is a GGUF that llama.cpp reads.
//!
//! | GGUF                      | Hugging Face                                        | type      |
//! |---------------------------|-----------------------------------------------------|-----------|
//! | `token_embd.weight`       | `model.embed_tokens.weight`                         | BF16      |
//! | `blk.N.attn_norm.weight`  | `model.layers.N.input_layernorm.weight`             | F32       |
//! | `blk.N.attn_q.weight`     | `model.layers.N.self_attn.q_proj.weight` (rows permuted) | quantized |
//! | `blk.N.attn_k.weight`     | `… .k_proj.weight` (rows permuted)                  | quantized |
//! | `blk.N.attn_v.weight`     | `… .v_proj.weight`                                  | quantized |
//! | `blk.N.attn_output.weight`| `… .o_proj.weight`                                  | quantized |
//! | `blk.N.ffn_gate_inp.weight` | `model.layers.N.block_sparse_moe.gate.weight`     | quantized |
//! | `blk.N.ffn_gate_exps.weight` | `… .experts.w1`, `[E, I, H]`                     | quantized |
//! | `blk.N.ffn_up_exps.weight`   | `… .experts.w3`, `[E, I, H]`                     | quantized |
//! | `blk.N.ffn_down_exps.weight` | `… .experts.w2`, `[E, H, I]`                     | quantized |
//! | `blk.N.ffn_norm.weight`   | `model.layers.N.post_attention_layernorm.weight`    | F32       |
//! | `output_norm.weight`      | `model.norm.weight`                                 | F32       |
//! | `output.weight`           | `lm_head.weight`                                    | quantized |
//!
//! llama.cpp applies rotary embeddings to adjacent pairs, Hugging Face to the two halves of a
//! head; its converter therefore permutes the rows of q and k within each head, and so do we
//! (on quantized rows, which are whole blocks: exact).

use anyhow::{Context, Result, bail};
use candle_core::quantized::GgmlDType;
use serde_json::Value;

use super::gguf::TensorSpec;

/// The fields of a Mixtral config.json the file and its metadata need.
#[derive(Debug, Clone, PartialEq)]
pub struct Arch {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub experts: usize,
    pub experts_per_tok: usize,
    pub max_positions: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
}

impl Arch {
    /// From a Mixtral config.json.
    pub fn from_config(v: &Value) -> Result<Self> {
        let n = |k: &str| {
            v[k].as_u64()
                .map(|x| x as usize)
                .with_context(|| format!("config.json has no `{k}`"))
        };
        if v["model_type"].as_str().is_some_and(|t| t != "mixtral") {
            bail!(
                "the quantized-weights cache knows Mixtral; this is a {}",
                v["model_type"]
            );
        }
        let (hidden, heads) = (n("hidden_size")?, n("num_attention_heads")?);
        Ok(Arch {
            vocab: n("vocab_size")?,
            hidden,
            intermediate: n("intermediate_size")?,
            layers: n("num_hidden_layers")?,
            heads,
            kv_heads: n("num_key_value_heads").unwrap_or(heads),
            head_dim: n("head_dim").unwrap_or(hidden / heads),
            experts: n("num_local_experts")?,
            experts_per_tok: n("num_experts_per_tok")?,
            max_positions: n("max_position_embeddings").unwrap_or(32768),
            rms_norm_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-5),
            rope_theta: v["rope_theta"].as_f64().unwrap_or(1e6),
        })
    }
}

/// What a tensor of the file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Made by in-situ quantization (or supplied in its place).
    Quantized,
    /// Copied from the checkpoint: the embedding (BF16) and the norms (F32).
    Plain,
}

/// One tensor: its GGUF spec, Hugging Face name, kind, and for q/k the head count whose
/// rows are permuted.
#[derive(Debug, Clone)]
pub struct Entry {
    pub spec: TensorSpec,
    pub hf: String,
    pub kind: Kind,
    pub permute_heads: Option<usize>,
}

/// The file's tensors in order, quantized ones as `dtype`.
pub fn entries(a: &Arch, dtype: GgmlDType) -> Vec<Entry> {
    let plain = |gguf: String, hf: String, dt: GgmlDType, dims: Vec<usize>| Entry {
        spec: TensorSpec {
            name: gguf,
            dtype: dt,
            dims,
        },
        hf,
        kind: Kind::Plain,
        permute_heads: None,
    };
    let quant = |gguf: String, hf: String, dims: Vec<usize>, permute: Option<usize>| Entry {
        spec: TensorSpec {
            name: gguf,
            dtype,
            dims,
        },
        hf,
        kind: Kind::Quantized,
        permute_heads: permute,
    };
    let (h, i, e) = (a.hidden, a.intermediate, a.experts);
    let mut out = vec![plain(
        "token_embd.weight".into(),
        "model.embed_tokens.weight".into(),
        GgmlDType::BF16,
        vec![a.vocab, h],
    )];
    for l in 0..a.layers {
        let blk = |s: &str| format!("blk.{l}.{s}.weight");
        let hf = |s: &str| format!("model.layers.{l}.{s}");
        out.push(plain(
            blk("attn_norm"),
            hf("input_layernorm.weight"),
            GgmlDType::F32,
            vec![h],
        ));
        out.push(quant(
            blk("attn_q"),
            hf("self_attn.q_proj.weight"),
            vec![a.heads * a.head_dim, h],
            Some(a.heads),
        ));
        out.push(quant(
            blk("attn_k"),
            hf("self_attn.k_proj.weight"),
            vec![a.kv_heads * a.head_dim, h],
            Some(a.kv_heads),
        ));
        out.push(quant(
            blk("attn_v"),
            hf("self_attn.v_proj.weight"),
            vec![a.kv_heads * a.head_dim, h],
            None,
        ));
        out.push(quant(
            blk("attn_output"),
            hf("self_attn.o_proj.weight"),
            vec![h, a.heads * a.head_dim],
            None,
        ));
        out.push(quant(
            blk("ffn_gate_inp"),
            hf("block_sparse_moe.gate.weight"),
            vec![e, h],
            None,
        ));
        out.push(quant(
            blk("ffn_gate_exps"),
            hf("block_sparse_moe.experts.w1"),
            vec![e, i, h],
            None,
        ));
        out.push(quant(
            blk("ffn_up_exps"),
            hf("block_sparse_moe.experts.w3"),
            vec![e, i, h],
            None,
        ));
        out.push(quant(
            blk("ffn_down_exps"),
            hf("block_sparse_moe.experts.w2"),
            vec![e, h, i],
            None,
        ));
        out.push(plain(
            blk("ffn_norm"),
            hf("post_attention_layernorm.weight"),
            GgmlDType::F32,
            vec![h],
        ));
    }
    out.push(plain(
        "output_norm.weight".into(),
        "model.norm.weight".into(),
        GgmlDType::F32,
        vec![h],
    ));
    out.push(quant(
        "output.weight".into(),
        "lm_head.weight".into(),
        vec![a.vocab, h],
        None,
    ));
    out
}

/// The row llama.cpp's layout puts Hugging Face row `r` of a q/k matrix at, for `heads`
/// heads of `rows / heads` rows: within a head, row `half * d/2 + j` goes to `2 * j + half`.
fn gguf_row(r: usize, rows: usize, heads: usize) -> usize {
    let d = rows / heads;
    let (head, within) = (r / d, r % d);
    let (half, j) = (within / (d / 2), within % (d / 2));
    head * d + 2 * j + half
}

/// `bytes` of a `rows`-row matrix, rows permuted from Hugging Face's order to llama.cpp's
/// (`to_gguf`) or back.
pub fn permute_rows(bytes: &[u8], rows: usize, heads: usize, to_gguf: bool) -> Vec<u8> {
    let row = bytes.len() / rows;
    let mut out = vec![0u8; bytes.len()];
    for r in 0..rows {
        let g = gguf_row(r, rows, heads);
        let (from, to) = if to_gguf { (r, g) } else { (g, r) };
        out[to * row..(to + 1) * row].copy_from_slice(&bytes[from * row..(from + 1) * row]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_matches_llama_cpps_converter_and_inverts() {
        // convert_hf_to_gguf.py: w.reshape(heads, 2, d/2, …).swapaxes(1, 2).reshape(w.shape):
        // GGUF row h*d + 2j + k holds HF row h*d + k*d/2 + j.
        let (rows, heads) = (16, 2);
        let d = rows / heads;
        let bytes: Vec<u8> = (0..rows as u8).collect();
        let g = permute_rows(&bytes, rows, heads, true);
        for h in 0..heads {
            for j in 0..d / 2 {
                for k in 0..2 {
                    assert_eq!(g[h * d + 2 * j + k] as usize, h * d + k * d / 2 + j);
                }
            }
        }
        assert_eq!(permute_rows(&g, rows, heads, false), bytes);
    }

    #[test]
    fn the_table_names_every_weight_once() {
        let a = Arch {
            vocab: 512,
            hidden: 256,
            intermediate: 512,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            experts: 4,
            experts_per_tok: 2,
            max_positions: 2048,
            rms_norm_eps: 1e-5,
            rope_theta: 1e6,
        };
        let e = entries(&a, GgmlDType::Q4K);
        assert_eq!(e.len(), 3 + 2 * 10);
        let mut names: Vec<_> = e.iter().map(|e| &e.spec.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), e.len());
        let exps = e
            .iter()
            .find(|e| e.spec.name == "blk.1.ffn_down_exps.weight")
            .unwrap();
        assert_eq!(
            (exps.spec.dims.clone(), exps.spec.bytes()),
            (vec![4, 256, 512], 4 * 256 * 2 * 144)
        );
    }
}
