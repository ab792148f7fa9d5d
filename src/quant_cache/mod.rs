//! The quantized-weights cache and GGUF models: what a model load reads instead of bf16
//! safetensors, and writes so that the next start need not quantize.
//!
//! - **Cache.** The first in-situ-quantized load of a checkpoint records every tensor our
//!   Mixtral layers quantize into a GGUF file (llama.cpp's names and layout, `layout.rs`)
//!   under `--quant-cache` (default `$HF_HOME/zopilot-quant-cache`), written beside a
//!   temporary name and renamed when complete. Later starts map it and never read bf16 nor
//!   quantize. It is keyed by model id and revision (or directory, config and checkpoint
//!   sizes), ISQ type and [`FORMAT`]; a file that is truncated, fails a tensor's CRC-32, or
//!   has another key or format is rebuilt with a log line saying why.
//! - **GGUF in.** `--model FILE.gguf`, or a directory holding one GGUF and no safetensors:
//!   ours or llama.cpp's own Mixtral conversions (`blk.N.ffn_*_exps`), any mix of GGUF types.
//!
//! Either way the loader is handed a *view* — a temporary directory with config.json, the
//! tokenizer files and a small safetensors of the embedding and norms — and a [`store::Replay`]
//! that supplies the quantized tensors (`mistralrs::core::zopilot_weights`).

pub mod checkpoint;
pub mod gguf;
pub mod layout;
pub mod progress;
pub mod store;
pub mod synth;

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, Value as GValue};
use serde_json::{Value, json};

use crate::settings::{Isq, ModelSettings, ModelSource};
use gguf::Meta;
use layout::{Arch, Entry, Kind};
use store::{Recorder, Replay, Slot};

/// Version of our file's layout and metadata; a file of another version is rebuilt.
pub const FORMAT: u32 = 1;

/// The GGUF type in-situ quantization `isq` produces.
pub fn ggml_type(isq: Isq) -> GgmlDType {
    match isq {
        Isq::Q4K => GgmlDType::Q4K,
        Isq::Q5K => GgmlDType::Q5K,
        Isq::Q6K => GgmlDType::Q6K,
        Isq::Q8_0 => GgmlDType::Q8_0,
    }
}

/// The ISQ setting whose memory plan fits a file whose experts are `dtype`.
fn isq_of(dtype: GgmlDType) -> Isq {
    match dtype {
        GgmlDType::Q5K | GgmlDType::Q5_0 | GgmlDType::Q5_1 => Isq::Q5K,
        GgmlDType::Q6K => Isq::Q6K,
        GgmlDType::Q8_0 | GgmlDType::Q8_1 | GgmlDType::Q8K => Isq::Q8_0,
        _ => Isq::Q4K,
    }
}

/// How the model is to be loaded.
pub enum Prepared {
    /// As usual, no cache.
    Plain,
    /// As usual, recording the cache file `dest`.
    Record {
        recorder: Arc<Recorder>,
        dest: PathBuf,
    },
    /// From a GGUF file through a view directory.
    Replay {
        view: tempfile::TempDir,
        isq: Isq,
        replay: Arc<Replay>,
        file: PathBuf,
        /// A cache file (rebuilt when damaged) rather than the user's own GGUF.
        cached: bool,
    },
}

/// The GGUF file `--model` names, if it names one: the file itself, or the one GGUF of a
/// directory without safetensors.
pub fn gguf_model(source: &ModelSource) -> Result<Option<PathBuf>> {
    let dir = match source {
        ModelSource::Gguf(file) => return Ok(Some(file.clone())),
        ModelSource::Local(dir) => dir,
        _ => return Ok(None),
    };
    let mut ggufs = Vec::new();
    let mut safetensors = false;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        match p.extension().and_then(|x| x.to_str()) {
            Some("gguf") => ggufs.push(p),
            Some("safetensors") => safetensors = true,
            _ => {}
        }
    }
    if safetensors {
        return Ok(None);
    }
    match ggufs.len() {
        0 => Ok(None),
        1 => Ok(ggufs.pop()),
        _ => bail!(
            "{} holds {} GGUF files; pass the one to serve: --model {}",
            dir.display(),
            ggufs.len(),
            ggufs[0].display()
        ),
    }
}

/// Where the cache lives, if it is on.
pub fn cache_dir(m: &ModelSettings) -> Option<PathBuf> {
    m.quant_cache.clone()
}

/// The cache key of a checkpoint at `isq`: what must be equal for a file to be reused.
pub fn cache_key(m: &ModelSettings, isq: Isq) -> Option<String> {
    let source = match &m.source {
        ModelSource::Hub(id) => format!(
            "hub={id}\nrevision={}",
            m.revision.as_deref().unwrap_or("main")
        ),
        ModelSource::Local(dir) => {
            let dir = dir.canonicalize().ok()?;
            let config = std::fs::read(dir.join("config.json")).ok()?;
            format!(
                "dir={}\nconfig_crc32={:08x}",
                dir.display(),
                crc32fast::hash(&config)
            )
        }
        _ => return None,
    };
    Some(format!("format={FORMAT}\n{source}\nisq={}", isq.name()))
}

/// A local checkpoint's safetensors as names, sizes and modification times, or `None` when
/// it has none (left out of the key, so a cache outlives the bf16 files it was made from;
/// kept in the file, so weights replaced under the same config are noticed).
fn fingerprint(dir: &Path) -> Option<String> {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .map(|e| {
            let m = e.metadata().ok();
            let len = m.as_ref().map_or(0, |m| m.len());
            let mtime = m
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            format!("{}:{len}:{mtime}", e.file_name().to_string_lossy())
        })
        .collect();
    files.sort();
    (!files.is_empty()).then(|| files.join(","))
}

/// The cache file of `key`.
pub fn cache_file(dir: &Path, m: &ModelSettings, key: &str, isq: Isq) -> PathBuf {
    let name = match &m.source {
        ModelSource::Hub(id) => id.replace('/', "--"),
        ModelSource::Local(d) => d
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned()),
        _ => "model".into(),
    };
    let slug: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!(
        "{slug}-{}-{:08x}.gguf",
        isq.name(),
        crc32fast::hash(key.as_bytes())
    ))
}

/// Decides how to load: the user's GGUF, a valid cache file, a recording load, or plain.
pub fn prepare(m: &ModelSettings) -> Result<Prepared> {
    if let Some(file) = gguf_model(&m.source)? {
        let opened = open(&file, None)
            .with_context(|| format!("reading the GGUF model {}", file.display()))?;
        return opened.into_prepared(file, false, &m.source);
    }
    let (Some(isq), Some(dir)) = (m.isq, cache_dir(m)) else {
        return Ok(Prepared::Plain);
    };
    let Some(key) = cache_key(m, isq) else {
        return Ok(Prepared::Plain);
    };
    let file = cache_file(&dir, m, &key, isq);
    if file.exists() {
        let checkpoint = match &m.source {
            ModelSource::Local(d) => fingerprint(d),
            _ => None,
        };
        let usable = open(&file, Some(&key)).and_then(|o| {
            if checkpoint.is_some() && o.checkpoint != checkpoint {
                bail!("the checkpoint's safetensors changed since it was written");
            }
            o.into_prepared(file.clone(), true, &m.source)
        });
        match usable {
            Ok(p) => {
                tracing::info!(file = %file.display(), "quantized-weights cache found: loading it instead of quantizing");
                return Ok(p);
            }
            Err(e) => {
                tracing::warn!(file = %file.display(), "quantized-weights cache unusable, rebuilding it: {e:#}");
                let _ = std::fs::remove_file(&file);
            }
        }
    }
    if let ModelSource::Local(d) = &m.source {
        let has_weights = std::fs::read_dir(d)?
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "safetensors"));
        if !has_weights {
            bail!(
                "{} has no safetensors and no usable quantized-weights cache ({}): restore the \
                 checkpoint, or pass a GGUF model with --model",
                d.display(),
                file.display()
            );
        }
    }
    if let Err(e) = std::fs::create_dir_all(&dir) {
        tracing::warn!(dir = %dir.display(), "quantized-weights cache off: cannot create its directory: {e}");
        return Ok(Prepared::Plain);
    }
    let tmp = dir.join(format!(
        ".{}.{}.partial",
        file.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let source = m.clone();
    let locate: store::Locate = Box::new(move || {
        crate::preflight::model_file(&source, "config.json")
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .context("the checkpoint's config.json is not on disk")
    });
    let model_name = match &m.source {
        ModelSource::Hub(id) => id.clone(),
        ModelSource::Local(d) => d.display().to_string(),
        _ => String::new(),
    };
    let local = matches!(m.source, ModelSource::Local(_));
    let plan: store::Plan = Box::new(move |dir: &Path, dtype| {
        let files = HfFiles::read(dir)?;
        let arch = Arch::from_config(&files.config)?;
        let mut meta = metadata(&arch, &files, &model_name, Some(&key))?;
        if let Some(fp) = fingerprint(dir).filter(|_| local) {
            meta.push(("zopilot.checkpoint", Meta::Str(fp)));
        }
        Ok(store::Planned {
            entries: layout::entries(&arch, dtype),
            meta,
        })
    });
    tracing::info!(file = %file.display(), "quantized-weights cache: this load writes it");
    Ok(Prepared::Record {
        recorder: Arc::new(Recorder::new(tmp, locate, plan)),
        dest: file,
    })
}

/// The Hugging Face files a view needs.
pub struct HfFiles {
    pub config: Value,
    pub tokenizer: String,
    pub tokenizer_config: Option<Value>,
}

impl HfFiles {
    /// From a checkpoint directory.
    pub fn read(dir: &Path) -> Result<Self> {
        let read = |name: &str| std::fs::read_to_string(dir.join(name));
        Ok(Self {
            config: serde_json::from_str(&read("config.json")?)?,
            tokenizer: read("tokenizer.json").context("tokenizer.json")?,
            tokenizer_config: read("tokenizer_config.json")
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok()),
        })
    }
}

/// The file's metadata: llama.cpp's keys for a Mixtral (architecture `llama`), the
/// tokenizer both as llama.cpp's arrays and as Hugging Face's JSON, and ours.
pub fn metadata(
    a: &Arch,
    files: &HfFiles,
    name: &str,
    key: Option<&str>,
) -> Result<Vec<(&'static str, Meta)>> {
    let u = |x: usize| Meta::U32(x as u32);
    let mut m = vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("general.name", Meta::Str(name.into())),
        ("general.alignment", Meta::U32(gguf::ALIGNMENT as u32)),
        ("llama.vocab_size", u(a.vocab)),
        ("llama.context_length", u(a.max_positions)),
        ("llama.embedding_length", u(a.hidden)),
        ("llama.block_count", u(a.layers)),
        ("llama.feed_forward_length", u(a.intermediate)),
        ("llama.rope.dimension_count", u(a.head_dim)),
        ("llama.attention.head_count", u(a.heads)),
        ("llama.attention.head_count_kv", u(a.kv_heads)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Meta::F32(a.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base", Meta::F32(a.rope_theta as f32)),
        ("llama.expert_count", u(a.experts)),
        ("llama.expert_used_count", u(a.experts_per_tok)),
    ];
    let tok: Value = serde_json::from_str(&files.tokenizer).context("tokenizer.json")?;
    let (tokens, scores, types) = llama_vocab(&tok, a.vocab)?;
    m.extend([
        ("tokenizer.ggml.model", Meta::Str("llama".into())),
        ("tokenizer.ggml.tokens", Meta::Strs(tokens)),
        ("tokenizer.ggml.scores", Meta::F32s(scores)),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        (
            "tokenizer.ggml.bos_token_id",
            Meta::U32(files.config["bos_token_id"].as_u64().unwrap_or(1) as u32),
        ),
        (
            "tokenizer.ggml.eos_token_id",
            Meta::U32(files.config["eos_token_id"].as_u64().unwrap_or(2) as u32),
        ),
        ("tokenizer.ggml.unknown_token_id", Meta::U32(0)),
        ("tokenizer.ggml.add_bos_token", Meta::Bool(true)),
        ("tokenizer.ggml.add_eos_token", Meta::Bool(false)),
        (
            "tokenizer.huggingface.json",
            Meta::Str(files.tokenizer.clone()),
        ),
        ("zopilot.format", Meta::U32(FORMAT)),
        (
            "zopilot.hf.config_json",
            Meta::Str(files.config.to_string()),
        ),
    ]);
    if let Some(tc) = &files.tokenizer_config {
        if let Some(t) = tc["chat_template"].as_str() {
            m.push(("tokenizer.chat_template", Meta::Str(t.into())));
        }
        m.push((
            "zopilot.hf.tokenizer_config_json",
            Meta::Str(tc.to_string()),
        ));
    }
    if let Some(key) = key {
        m.push(("zopilot.key", Meta::Str(key.into())));
    }
    Ok(m)
}

/// llama.cpp's SentencePiece-style vocabulary from a BPE tokenizer.json: tokens by id, a
/// score per token that ranks merges as the BPE does (earlier merge, higher score), and
/// token types (1 normal, 2 unknown, 3 control, 6 byte).
fn llama_vocab(tok: &Value, size: usize) -> Result<(Vec<String>, Vec<f32>, Vec<i32>)> {
    let vocab = tok["model"]["vocab"]
        .as_object()
        .context("tokenizer.json has no model.vocab")?;
    let mut tokens: Vec<String> = (0..size).map(|i| format!("[PAD{i}]")).collect();
    let mut types = vec![1i32; size];
    for (t, id) in vocab {
        if let Some(id) = id.as_u64().map(|i| i as usize).filter(|&i| i < size) {
            tokens[id] = t.clone();
            if t.starts_with("<0x") && t.len() == 6 {
                types[id] = 6;
            }
        }
    }
    for added in tok["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) {
            let id = id as usize;
            if id < size {
                tokens[id] = content.into();
                types[id] = if content == "<unk>" {
                    2
                } else if added["special"] == true {
                    3
                } else {
                    4
                };
            }
        }
    }
    let mut scores = vec![0f32; size];
    for (rank, merge) in tok["model"]["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let joined = match merge {
            Value::String(s) => s.replacen(' ', "", 1),
            Value::Array(p) => p.iter().filter_map(Value::as_str).collect(),
            _ => continue,
        };
        if let Some(id) = vocab
            .get(&joined)
            .and_then(Value::as_u64)
            .map(|i| i as usize)
            .filter(|&i| i < size)
        {
            scores[id] = -(rank as f32) - 1.0;
        }
    }
    Ok((tokens, scores, types))
}

/// A GGUF file read and checked: its tensors and what the view needs.
pub struct Opened {
    arch: Arch,
    replay: Replay,
    config: Value,
    tokenizer: Option<String>,
    tokenizer_config: Option<Value>,
    experts: GgmlDType,
    /// The checkpoint fingerprint a cache file was made from (local directories).
    checkpoint: Option<String>,
    /// Bytes of all tensors, and of the largest one.
    tensor_bytes: u64,
    largest_tensor: u64,
}

/// What the preflight needs of a GGUF file, read from its header alone (no tensor data).
#[derive(Debug, Clone)]
pub struct Inspected {
    pub config: Value,
    pub tensor_bytes: u64,
    pub largest_tensor: u64,
}

/// Reads a GGUF model's or cache file's header as [`open`] does (`key`: the cache key it must
/// carry), without reading a tensor.
pub fn inspect(path: &Path, key: Option<&str>) -> Result<Inspected> {
    let o = open(path, key)?;
    Ok(Inspected {
        config: o.config,
        tensor_bytes: o.tensor_bytes,
        largest_tensor: o.largest_tensor,
    })
}

fn meta_str(c: &Content, k: &str) -> Option<String> {
    match c.metadata.get(k) {
        Some(GValue::String(s)) => Some(s.clone()),
        _ => None,
    }
}

fn meta_u(c: &Content, k: &str) -> Option<usize> {
    c.metadata
        .get(k)
        .and_then(|v| v.to_u64().ok())
        .map(|v| v as usize)
}

fn meta_f(c: &Content, k: &str) -> Option<f64> {
    c.metadata
        .get(k)
        .and_then(|v| v.to_f32().ok())
        .map(f64::from)
}

/// A Mixtral config.json from llama.cpp's metadata keys.
fn config_from_llama(c: &Content) -> Result<Value> {
    let arch = meta_str(c, "general.architecture").unwrap_or_default();
    if arch != "llama" {
        bail!("architecture `{arch}`: only Mixtral (llama with experts) GGUF files are served");
    }
    let n = |k: &str| meta_u(c, &format!("llama.{k}")).with_context(|| format!("no llama.{k}"));
    let experts = n("expert_count")?;
    if experts < 2 {
        bail!("llama.expert_count is {experts}: not a mixture of experts");
    }
    let vocab = match c.metadata.get("tokenizer.ggml.tokens") {
        Some(GValue::Array(a)) => a.len(),
        _ => n("vocab_size")?,
    };
    let (hidden, heads) = (n("embedding_length")?, n("attention.head_count")?);
    Ok(json!({
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": n("feed_forward_length")?,
        "num_hidden_layers": n("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": n("attention.head_count_kv").unwrap_or(heads),
        "head_dim": n("rope.dimension_count").unwrap_or(hidden / heads),
        "hidden_act": "silu",
        "max_position_embeddings": n("context_length").unwrap_or(32768),
        "rms_norm_eps": meta_f(c, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        "rope_theta": meta_f(c, "llama.rope.freq_base").unwrap_or(1e6),
        "sliding_window": null,
        "num_experts_per_tok": n("expert_used_count")?,
        "num_local_experts": experts,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "bos_token_id": meta_u(c, "tokenizer.ggml.bos_token_id").unwrap_or(1),
        "eos_token_id": meta_u(c, "tokenizer.ggml.eos_token_id").unwrap_or(2),
    }))
}

/// Reads and checks the GGUF at `path`. `key`: the cache key the file must carry (cache
/// files); then its format, key, size and checksums are all required.
pub fn open(path: &Path, key: Option<&str>) -> Result<Opened> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let content = Content::read(&mut BufReader::new(&file)).context("not a readable GGUF file")?;
    let format = meta_u(&content, "zopilot.format");
    if let Some(key) = key {
        if format != Some(FORMAT as usize) {
            bail!("format {format:?}, this build writes {FORMAT}");
        }
        let stored = meta_str(&content, "zopilot.key").unwrap_or_default();
        if stored != key {
            bail!("made for another checkpoint or type ({stored:?}, now {key:?})");
        }
    }
    let config: Value = match meta_str(&content, "zopilot.hf.config_json") {
        Some(c) => serde_json::from_str(&c)?,
        None => config_from_llama(&content)?,
    };
    let arch = Arch::from_config(&config)?;
    // The table as laid out for some type; each tensor's own type comes from the file.
    let entries = layout::entries(&arch, GgmlDType::Q4K);
    if content.tensor_infos.contains_key("blk.0.ffn_gate.0.weight") {
        bail!(
            "this GGUF keeps each expert apart (an older llama.cpp conversion): convert it again with a current llama.cpp, which stacks them as blk.N.ffn_*_exps"
        );
    }
    let checksums: Option<Vec<u32>> = match content.metadata.get(gguf::CHECKSUMS_KEY) {
        Some(GValue::Array(a)) if a.len() == entries.len() => Some(
            a.iter()
                .map(|v| v.to_u32().map_err(anyhow::Error::from))
                .collect::<Result<_>>()?,
        ),
        Some(_) => bail!("its checksum table does not match its tensors"),
        None if format.is_some() => bail!("no checksum table"),
        None => None,
    };
    let mut slots = Vec::with_capacity(entries.len());
    let mut experts = None;
    for (i, e) in entries.into_iter().enumerate() {
        let info = content
            .tensor_infos
            .get(&e.spec.name)
            .with_context(|| format!("no tensor {}", e.spec.name))?;
        if info.shape.dims() != e.spec.dims.as_slice() {
            bail!(
                "{} is {:?}, the config says {:?}",
                e.spec.name,
                info.shape.dims(),
                e.spec.dims
            );
        }
        let dtype = info.ggml_dtype;
        if e.spec.name == "blk.0.ffn_gate_exps.weight" {
            experts = Some(dtype);
        }
        let offset = content.tensor_data_offset + info.offset;
        let n: usize = e.spec.dims.iter().product();
        let size = (n / dtype.block_size() * dtype.type_size()) as u64;
        if offset + size > len {
            bail!(
                "truncated: {} ends at byte {}, the file has {len}",
                e.spec.name,
                offset + size
            );
        }
        slots.push(Slot {
            dtype,
            offset: offset as usize,
            len: size as usize,
            checksum: checksums.as_ref().map(|c| c[i]),
            entry: Entry {
                spec: gguf::TensorSpec {
                    dtype,
                    ..e.spec.clone()
                },
                ..e
            },
        });
    }
    let tensor_bytes = slots.iter().map(|s| s.len as u64).sum();
    let largest_tensor = slots.iter().map(|s| s.len as u64).max().unwrap_or(0);
    Ok(Opened {
        arch,
        replay: Replay::new(&file, slots)?,
        config,
        tokenizer: meta_str(&content, "tokenizer.huggingface.json"),
        tokenizer_config: meta_str(&content, "zopilot.hf.tokenizer_config_json")
            .and_then(|t| serde_json::from_str(&t).ok())
            .or_else(|| {
                meta_str(&content, "tokenizer.chat_template").map(|t| {
                    json!({"chat_template": t, "bos_token": "<s>", "eos_token": "</s>",
                           "unk_token": "<unk>", "add_bos_token": true, "add_eos_token": false})
                })
            }),
        experts: experts.unwrap_or(GgmlDType::Q4K),
        tensor_bytes,
        largest_tensor,
        checkpoint: meta_str(&content, "zopilot.checkpoint"),
    })
}

impl Opened {
    /// Writes the view directory and returns how to load.
    fn into_prepared(self, file: PathBuf, cached: bool, source: &ModelSource) -> Result<Prepared> {
        let beside = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let view = tempfile::Builder::new()
            .prefix("zopilot-gguf-view-")
            .tempdir()?;
        let dir = view.path();
        std::fs::write(dir.join("config.json"), self.config.to_string())?;
        let tokenizer = match self.tokenizer {
            Some(t) => t,
            None => std::fs::read_to_string(beside.join("tokenizer.json")).with_context(|| {
                format!(
                    "{} carries no Hugging Face tokenizer (tokenizer.huggingface.json) and no \
                     tokenizer.json lies beside it: put the model's tokenizer.json there",
                    file.display()
                )
            })?,
        };
        std::fs::write(dir.join("tokenizer.json"), tokenizer)?;
        let tokenizer_config = std::fs::read_to_string(beside.join("tokenizer_config.json"))
            .ok()
            .filter(|_| !cached && matches!(source, ModelSource::Gguf(_) | ModelSource::Local(_)))
            .and_then(|t| serde_json::from_str(&t).ok())
            .or(self.tokenizer_config);
        if let Some(tc) = tokenizer_config {
            std::fs::write(dir.join("tokenizer_config.json"), tc.to_string())?;
        }
        write_plain(&self.replay, &dir.join("model.safetensors"))?;
        let _ = &self.arch;
        Ok(Prepared::Replay {
            view,
            isq: isq_of(self.experts),
            replay: Arc::new(self.replay),
            file,
            cached,
        })
    }
}

/// The embedding (as bf16) and norms (as f32) of a GGUF file as a safetensors file.
fn write_plain(replay: &Replay, path: &Path) -> Result<()> {
    use safetensors::{Dtype, tensor::TensorView};
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for slot in replay.slots(Kind::Plain) {
        let (_, bytes) = replay.bytes(&slot.entry.hf)?;
        let dims = slot.entry.spec.dims.clone();
        let (dtype, data) = match slot.dtype {
            GgmlDType::BF16 => (Dtype::BF16, bytes.to_vec()),
            GgmlDType::F32 => (Dtype::F32, bytes.to_vec()),
            GgmlDType::F16 => (Dtype::F16, bytes.to_vec()),
            other => {
                // llama.cpp quantizes the embedding: dequantize it once, here, to f32, the
                // exact values llama.cpp's row lookup gives (bf16 would round them, enough
                // to flip a near-tied routing choice and part the text from llama.cpp's).
                let cpu = candle_core::Device::Cpu;
                let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    other,
                    bytes,
                    dims.clone(),
                    &cpu,
                )?;
                let values: Vec<f32> = q.dequantize(&cpu)?.flatten_all()?.to_vec1()?;
                let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (Dtype::F32, data)
            }
        };
        tensors.push((slot.entry.hf.clone(), dtype, dims, data));
    }
    let views = tensors
        .iter()
        .map(|(name, dtype, dims, data)| {
            Ok((name.clone(), TensorView::new(*dtype, dims.clone(), data)?))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path)?;
    Ok(())
}
