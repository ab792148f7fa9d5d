//! Synthetic Mixtral-architecture models: config.json, a SentencePiece-style BPE
//! tokenizer.json, tokenizer_config.json with Mixtral's `[INST]` chat template, and bf16
//! safetensors of seeded random weights. Used by tests, the GPU self-test and benchmarks,
//! so nothing needs a model hub. The same preset, layer count and seed write the same bytes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use clap::ValueEnum;

/// Which synthetic model to write (`synth --preset`, `--model synthetic:tiny`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// Two layers, hidden 256: seconds to load on a CPU, still quantizable to Q4K.
    Tiny,
    /// The real Mixtral-8x7B shapes (use --layers for fewer than 32).
    #[value(name = "mixtral-8x7b")]
    Mixtral8x7b,
}

/// Mixtral-8x7B-Instruct-v0.1's chat template (system message folded into the first turn).
pub const MIXTRAL_CHAT_TEMPLATE: &str = "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}{{- bos_token }}{%- for message in loop_messages %}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}{%- if message['role'] == 'user' %}{%- if loop.first and system_message is defined %}{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}{%- endif %}{%- endfor %}";

/// Largest safetensors shard written, in bytes (Hugging Face's usual 5 GB, rounded down).
const SHARD_BYTES: u64 = 4 << 30;

/// The shapes of a Mixtral-architecture model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shapes {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub experts: usize,
    pub experts_per_tok: usize,
    pub max_positions: usize,
}

impl Shapes {
    /// The preset's shapes with an optional layer count.
    pub fn of(preset: Preset, layers: Option<usize>) -> Self {
        let base = match preset {
            // Multiples of 256 everywhere so Q4K (256-wide blocks) applies to every matrix.
            Preset::Tiny => Shapes {
                vocab: 512,
                hidden: 256,
                intermediate: 512,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                experts: 4,
                experts_per_tok: 2,
                max_positions: 2048,
            },
            Preset::Mixtral8x7b => Shapes {
                vocab: 32000,
                hidden: 4096,
                intermediate: 14336,
                layers: 32,
                heads: 32,
                kv_heads: 8,
                experts: 8,
                experts_per_tok: 2,
                max_positions: 32768,
            },
        };
        Shapes {
            layers: layers.unwrap_or(base.layers),
            ..base
        }
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Every tensor's name and shape, in file order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, hd) = (self.hidden, self.intermediate, self.head_dim());
        let mut t = vec![("model.embed_tokens.weight".to_owned(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            t.push((format!("{p}.input_layernorm.weight"), vec![h]));
            t.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            t.push((
                format!("{p}.self_attn.q_proj.weight"),
                vec![self.heads * hd, h],
            ));
            t.push((
                format!("{p}.self_attn.k_proj.weight"),
                vec![self.kv_heads * hd, h],
            ));
            t.push((
                format!("{p}.self_attn.v_proj.weight"),
                vec![self.kv_heads * hd, h],
            ));
            t.push((
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, self.heads * hd],
            ));
            t.push((
                format!("{p}.block_sparse_moe.gate.weight"),
                vec![self.experts, h],
            ));
            for e in 0..self.experts {
                let q = format!("{p}.block_sparse_moe.experts.{e}");
                t.push((format!("{q}.w1.weight"), vec![i, h]));
                t.push((format!("{q}.w2.weight"), vec![h, i]));
                t.push((format!("{q}.w3.weight"), vec![i, h]));
            }
        }
        t.push(("model.norm.weight".to_owned(), vec![h]));
        t.push(("lm_head.weight".to_owned(), vec![self.vocab, h]));
        t
    }

    /// Weights one decode step reads: attention, the router, `experts_per_tok` of the
    /// experts in every layer, and the output head (one embedding row is negligible).
    pub fn active_weights_per_token(&self) -> u64 {
        let (h, i, hd) = (
            self.hidden as u64,
            self.intermediate as u64,
            self.head_dim() as u64,
        );
        let attention = 2 * h * self.heads as u64 * hd + 2 * h * self.kv_heads as u64 * hd;
        let experts = self.experts_per_tok as u64 * 3 * h * i;
        let router = self.experts as u64 * h;
        self.layers as u64 * (attention + experts + router) + self.vocab as u64 * h
    }

    /// Total parameter count.
    pub fn parameters(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum()
    }

    fn config(&self) -> Value {
        json!({
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_positions,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1e6,
            "sliding_window": null,
            "num_experts_per_tok": self.experts_per_tok,
            "num_local_experts": self.experts,
            "tie_word_embeddings": false,
            "torch_dtype": "bfloat16",
            "bos_token_id": 1,
            "eos_token_id": 2,
            "output_router_logits": false,
            "router_aux_loss_coef": 0.02
        })
    }
}

/// What `write` produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub parameters: u64,
    pub bytes: u64,
    pub shards: usize,
    pub layers: usize,
}

/// Writes a complete model directory: bf16 safetensors, or with `quantized` one Q4_K GGUF
/// file of random quantized weights (`quant_cache::synth`) that `serve --model DIR` loads.
pub fn write(
    preset: Preset,
    layers: Option<usize>,
    seed: u64,
    quantized: bool,
    out: &Path,
) -> Result<Summary> {
    let shapes = Shapes::of(preset, layers);
    if shapes.layers == 0 {
        bail!("--layers must be >= 1. Given: 0");
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_json(&out.join("config.json"), &shapes.config())?;
    write_json(&out.join("tokenizer.json"), &tokenizer_json(shapes.vocab))?;
    write_json(
        &out.join("tokenizer_config.json"),
        &tokenizer_config(shapes.max_positions),
    )?;
    write_json(
        &out.join("generation_config.json"),
        &json!({"bos_token_id": 1, "eos_token_id": 2}),
    )?;
    let (bytes, shards) = if quantized {
        let files = crate::quant_cache::HfFiles::read(out)?;
        let arch = crate::quant_cache::layout::Arch::from_config(&files.config)?;
        let bytes = crate::quant_cache::synth::write_q4k(out, &arch, &files, seed, |dims, buf| {
            fill("model.embed_tokens.weight", dims, seed, 0, buf)
        })?;
        (bytes, 1)
    } else {
        write_weights(&shapes, seed, out)?
    };
    Ok(Summary {
        parameters: shapes.parameters(),
        bytes,
        shards,
        layers: shapes.layers,
    })
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn tokenizer_config(max_len: usize) -> Value {
    json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": null,
        "clean_up_tokenization_spaces": false,
        "legacy": true,
        "model_max_length": max_len,
        "tokenizer_class": "LlamaTokenizer",
        "chat_template": MIXTRAL_CHAT_TEMPLATE
    })
}

/// The vocabulary: specials, ASCII byte-fallback tokens, single characters, then merged
/// pieces built breadth-first so that every merge joins two tokens already present.
/// Only ASCII bytes get fallback tokens, so random weights always decode to valid UTF-8.
fn vocabulary(size: usize) -> (Vec<String>, Vec<(String, String)>) {
    let mut vocab: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    vocab.extend((0u8..0x80).map(|b| format!("<0x{b:02X}>")));
    let mut singles = vec!["▁".to_owned()];
    singles.extend((0x21u8..0x7f).map(|b| (b as char).to_string()));
    vocab.extend(singles.iter().cloned());
    let letters: Vec<String> = ('a'..='z').map(|c| c.to_string()).collect();
    let mut merges = Vec::new();
    let mut seen: std::collections::HashSet<String> = vocab.iter().cloned().collect();
    let mut frontier: Vec<String> = std::iter::once("▁".to_owned())
        .chain(letters.iter().cloned())
        .collect();
    'grow: while vocab.len() < size {
        let mut next = Vec::new();
        for left in &frontier {
            for right in &letters {
                if vocab.len() >= size {
                    break 'grow;
                }
                let piece = format!("{left}{right}");
                if seen.insert(piece.clone()) {
                    merges.push((left.clone(), right.clone()));
                    vocab.push(piece.clone());
                    next.push(piece);
                }
            }
        }
        frontier = next;
    }
    vocab.truncate(size);
    (vocab, merges)
}

fn tokenizer_json(size: usize) -> Value {
    let (vocab, merges) = vocabulary(size);
    let vocab_map: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let merges: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
    let special = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
        ]},
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab_map, "merges": merges
        }
    })
}

/// SplitMix64: tiny, fast and good enough for weights nobody trains.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Standard deviation of the output logits: large enough that the top two logits are
/// rarely within rounding noise of each other, so greedy decoding is reproducible across
/// batch shapes and devices.
const LOGIT_STD: f32 = 8.0;
/// The end-of-sequence token id (`</s>`).
const EOS: usize = 2;

/// Fills `out` with bf16 little-endian values of tensor `name`, elements `start..`.
/// Norm weights are 1; everything else is uniform with standard deviation 1/sqrt(fan_in),
/// which keeps activations of a deep random network finite in bf16. The output head is
/// scaled to `LOGIT_STD`, and its EOS row is zero so the EOS logit sits at 0, far below the
/// best of the others: synthetic models never end on their own, and every run generates
/// exactly `max_tokens`.
fn fill(name: &str, shape: &[usize], seed: u64, start: usize, out: &mut [u8]) {
    if name.ends_with("norm.weight") {
        let one = half::bf16::from_f32(1.0).to_le_bytes();
        out.chunks_exact_mut(2)
            .for_each(|c| c.copy_from_slice(&one));
        return;
    }
    let fan_in = *shape.last().unwrap_or(&1);
    let is_head = name == "lm_head.weight";
    let scale = if is_head { LOGIT_STD } else { 1.0 };
    let amplitude = (3.0 / fan_in as f32).sqrt() * scale;
    let eos_row = if is_head {
        (EOS * fan_in)..((EOS + 1) * fan_in)
    } else {
        0..0
    };
    // One generator per 4096-element block keeps any split of the work reproducible.
    const BLOCK: usize = 4096;
    let base = fnv1a(name) ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D);
    for (k, chunk) in out.chunks_mut(2 * BLOCK).enumerate() {
        let block = (start / BLOCK + k) as u64;
        let mut rng = SplitMix(base ^ block.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let first = start + k * BLOCK;
        for (j, c) in chunk.chunks_exact_mut(2).enumerate() {
            let u = (rng.next() >> 40) as f32 / (1u64 << 24) as f32;
            let x = if eos_row.contains(&(first + j)) {
                0.0
            } else {
                (2.0 * u - 1.0) * amplitude
            };
            let v = half::bf16::from_f32(x);
            c.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// Writes the safetensors shards (and the index when there is more than one).
fn write_weights(shapes: &Shapes, seed: u64, out: &Path) -> Result<(u64, usize)> {
    let tensors = shapes.tensors();
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![vec![]];
    let mut in_shard = 0u64;
    for (name, shape) in tensors {
        let bytes = 2 * shape.iter().product::<usize>() as u64;
        if in_shard > 0 && in_shard + bytes > SHARD_BYTES {
            shards.push(vec![]);
            in_shard = 0;
        }
        in_shard += bytes;
        shards.last_mut().expect("one shard").push((name, shape));
    }
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let file = if count == 1 {
            "model.safetensors".to_owned()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        };
        total += write_shard(&out.join(&file), shard, seed)?;
        for (name, _) in shard {
            weight_map.insert(name.clone(), file.clone());
        }
    }
    if count > 1 {
        write_json(
            &out.join("model.safetensors.index.json"),
            &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
    }
    Ok((total, count))
}

fn write_shard(path: &Path, tensors: &[(String, Vec<usize>)], seed: u64) -> Result<u64> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let len = 2 * shape.iter().product::<usize>();
        header.insert(
            name.clone(),
            json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut head = serde_json::to_vec(&Value::Object(header))?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(8 << 20, file);
    w.write_all(&(head.len() as u64).to_le_bytes())?;
    w.write_all(&head)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    const PIECE: usize = 1 << 22; // elements generated per thread and round
    let mut buf = vec![0u8; 2 * PIECE * threads];
    for (name, shape) in tensors {
        let elems: usize = shape.iter().product();
        let mut done = 0;
        while done < elems {
            let n = (elems - done).min(PIECE * threads);
            let region = &mut buf[..2 * n];
            std::thread::scope(|s| {
                for (t, part) in region.chunks_mut(2 * PIECE).enumerate() {
                    let start = done + t * PIECE;
                    s.spawn(move || fill(name, shape, seed, start, part));
                }
            });
            w.write_all(region)?;
            done += n;
        }
    }
    w.flush()?;
    Ok(offset as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabulary_has_the_requested_size_and_valid_merges() {
        let (vocab, merges) = vocabulary(512);
        assert_eq!(vocab.len(), 512);
        let set: std::collections::HashSet<_> = vocab.iter().collect();
        assert_eq!(set.len(), 512, "tokens are unique");
        for (a, b) in merges
            .iter()
            .filter(|(a, b)| set.contains(&format!("{a}{b}")))
        {
            assert!(set.contains(a) && set.contains(b));
        }
        let (big, _) = vocabulary(32000);
        assert_eq!(big.len(), 32000);
    }

    #[test]
    fn weights_are_reproducible_and_split_independent() {
        let shape = [300, 256];
        let mut whole = vec![0u8; 2 * 300 * 256];
        fill("x.weight", &shape, 7, 0, &mut whole);
        let mut split = vec![0u8; 2 * 300 * 256];
        let (a, b) = split.split_at_mut(2 * 8192);
        fill("x.weight", &shape, 7, 0, a);
        fill("x.weight", &shape, 7, 8192, b);
        assert_eq!(whole, split);
        let mut other = vec![0u8; 2 * 300 * 256];
        fill("x.weight", &shape, 8, 0, &mut other);
        assert_ne!(whole, other);
    }

    #[test]
    fn mixtral_shapes_match_the_real_model() {
        let s = Shapes::of(Preset::Mixtral8x7b, None);
        // 46.7 B parameters, as published for Mixtral-8x7B.
        assert!(
            (46_600_000_000..46_800_000_000).contains(&s.parameters()),
            "{}",
            s.parameters()
        );
        assert_eq!(Shapes::of(Preset::Mixtral8x7b, Some(8)).layers, 8);
        // 8 layers × (41.9 M attention + 352.3 M experts + router) + 131 M head ≈ 3.28 G.
        let active = Shapes::of(Preset::Mixtral8x7b, Some(8)).active_weights_per_token();
        assert!((3_270_000_000..3_290_000_000).contains(&active), "{active}");
    }
}
