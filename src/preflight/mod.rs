//! Start-up preflight: every version and device fact is read from the running system,
//! compared against ranges (`rules`), and reported with the fix, before any weight is
//! downloaded. `zopilot-gpu check [--json]` prints it; `serve` runs it first and stops on
//! a failure. The JSON schema (`zopilot-gpu/check/v1`) is documented in README.md.

pub mod driver;
pub mod hub;
pub mod load;
pub mod rules;
pub mod runpath;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::settings::{Isq, ModelSettings, ModelSource};
use crate::synth::Preset;
use crate::synth::Shapes;
pub use rules::{BuildTarget, Check, MemoryPlan, Verdict};

/// Exit code of `check` (and `serve`) when a check fails.
pub const EXIT_PREFLIGHT: u8 = 3;

/// Facts compiled in by build.rs.
#[derive(Debug, Clone, Serialize)]
pub struct BuildFacts {
    pub version: &'static str,
    pub git_rev: &'static str,
    pub mistralrs: &'static str,
    pub features: Vec<&'static str>,
    /// nvcc release, e.g. "13.0"; empty for CPU builds.
    pub cuda: &'static str,
    /// e.g. "120"; empty for CPU builds.
    pub compute_cap: &'static str,
}

impl BuildFacts {
    pub fn current() -> Self {
        BuildFacts {
            version: env!("CARGO_PKG_VERSION"),
            git_rev: env!("ZOPILOT_BUILD_GIT_REV"),
            mistralrs: env!("ZOPILOT_BUILD_MISTRALRS"),
            features: if cfg!(feature = "cuda") {
                vec!["cuda"]
            } else {
                vec![]
            },
            cuda: env!("ZOPILOT_BUILD_CUDA"),
            compute_cap: env!("ZOPILOT_BUILD_COMPUTE_CAP"),
        }
    }

    pub fn target(&self) -> BuildTarget {
        let cuda = self
            .cuda
            .split_once('.')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
        BuildTarget {
            cuda,
            compute_cap: self.compute_cap.parse().ok(),
        }
    }
}

/// Host memory and disk.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HostFacts {
    pub ram_total_bytes: u64,
    pub ram_available_bytes: u64,
    /// The model cache directory and its free space.
    pub cache_dir: PathBuf,
    pub cache_free_bytes: Option<u64>,
    pub cache_writable: bool,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: &'static str,
    /// The worst verdict of all checks.
    pub verdict: Verdict,
    pub build: BuildFacts,
    pub driver: driver::DriverFacts,
    pub devices: Vec<driver::DeviceFacts>,
    pub host: HostFacts,
    pub checks: Vec<Check>,
    pub duration_ms: f64,
}

impl Report {
    pub fn failed(&self) -> bool {
        self.verdict == Verdict::Fail
    }

    pub fn push(&mut self, c: Check) {
        // A skipped check neither passes nor fails the whole.
        if c.verdict != Verdict::Skip {
            self.verdict = self.verdict.max(c.verdict);
        }
        self.checks.push(c);
    }

    /// The human-readable table.
    pub fn render(&self) -> String {
        let mut out = format!(
            "zopilot-gpu {} ({}), mistralrs {}, {}\n",
            self.build.version,
            self.build.git_rev,
            self.build.mistralrs,
            if self.build.cuda.is_empty() {
                "CPU build".to_owned()
            } else {
                format!("CUDA {} for cc {}", self.build.cuda, self.build.compute_cap)
            }
        );
        for c in &self.checks {
            let mark = match c.verdict {
                Verdict::Pass => "PASS",
                Verdict::Skip => "skip",
                Verdict::Warn => "WARN",
                Verdict::Fail => "FAIL",
            };
            out.push_str(&format!("{mark:<5} {:<12} {}\n", c.id, c.summary));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("{:<18} fix: {fix}\n", ""));
            }
        }
        out.push_str(
            &format!("verdict: {:?} ({:.0} ms)\n", self.verdict, self.duration_ms).to_lowercase(),
        );
        out
    }
}

fn host_facts(cache_dir: PathBuf) -> HostFacts {
    // SAFETY: sysinfo fills a zeroed struct.
    let mut si: libc::sysinfo = unsafe { std::mem::zeroed() };
    let (total, _) = if unsafe { libc::sysinfo(&mut si) } == 0 {
        (
            si.totalram as u64 * si.mem_unit as u64,
            si.freeram as u64 * si.mem_unit as u64,
        )
    } else {
        (0, 0)
    };
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(total, |kib| kib * 1024);
    let cache_writable =
        std::fs::create_dir_all(&cache_dir).is_ok() && tempfile::tempfile_in(&cache_dir).is_ok();
    HostFacts {
        ram_total_bytes: total,
        ram_available_bytes: available,
        cache_free_bytes: disk_free(&cache_dir),
        cache_dir,
        cache_writable,
    }
}

/// `path`, or its nearest ancestor that exists (a directory a start will create).
pub(crate) fn nearest_existing(path: &Path) -> Option<&Path> {
    path.ancestors().find(|p| p.exists())
}

pub(crate) fn disk_free(path: &Path) -> Option<u64> {
    let existing = nearest_existing(path)?;
    let c = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid path and a zeroed out-struct.
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0)
        .then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Where Hugging Face downloads land.
pub fn hf_cache_dir(m: &ModelSettings) -> PathBuf {
    m.hf_home
        .clone()
        .or_else(|| std::env::var_os("HF_HOME").map(PathBuf::from))
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from)
                .join(".cache/huggingface")
        })
}

/// Shapes from a config.json's fields.
fn shapes_from_config(v: &serde_json::Value) -> Option<Shapes> {
    let n = |k: &str| v[k].as_u64().map(|x| x as usize);
    Some(Shapes {
        vocab: n("vocab_size")?,
        hidden: n("hidden_size")?,
        intermediate: n("intermediate_size")?,
        layers: n("num_hidden_layers")?,
        heads: n("num_attention_heads")?,
        kv_heads: n("num_key_value_heads").or(n("num_attention_heads"))?,
        experts: n("num_local_experts").unwrap_or(1),
        experts_per_tok: n("num_experts_per_tok").unwrap_or(1),
        max_positions: n("max_position_embeddings").unwrap_or(4096),
    })
}

fn read_config(p: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

/// The snapshot directories of a Hub model in the download cache.
fn snapshots(id: &str, cache: &Path) -> impl Iterator<Item = PathBuf> {
    let dir = cache
        .join("hub")
        .join(format!("models--{}", id.replace('/', "--")))
        .join("snapshots");
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
}

/// A Hub model's config.json already in the download cache, if any.
fn cached_config(id: &str, cache: &Path) -> Option<serde_json::Value> {
    snapshots(id, cache).find_map(|d| read_config(&d.join("config.json")))
}

/// A file of the model on disk: in its directory, or in a Hub snapshot already downloaded
/// (a synthetic model's directory is its loader's).
pub(crate) fn model_file(m: &ModelSettings, name: &str) -> Option<PathBuf> {
    match &m.source {
        ModelSource::Local(dir) => Some(dir.join(name)),
        ModelSource::Gguf(file) => file.parent().map(|d| d.join(name)),
        ModelSource::Hub(id) => snapshots(id, &hf_cache_dir(m))
            .map(|d| d.join(name))
            .find(|p| p.is_file()),
        ModelSource::Synthetic(_) => None,
    }
}

/// The model's shapes: from a local config.json, a Hub model's config.json (cached or
/// fetched: `hub_config`), or the built-in Mixtral table.
fn model_shapes(m: &ModelSettings, hub_config: Option<&serde_json::Value>) -> Option<Shapes> {
    match &m.source {
        ModelSource::Synthetic(p) => Some(Shapes::of(*p, None)),
        ModelSource::Local(dir) => read_config(&dir.join("config.json"))
            .as_ref()
            .and_then(shapes_from_config),
        ModelSource::Gguf(_) => None,
        ModelSource::Hub(id) => hub_config.and_then(shapes_from_config).or_else(|| {
            id.starts_with("mistralai/Mixtral-8x7B")
                .then(|| Shapes::of(Preset::Mixtral8x7b, None))
        }),
    }
}

/// The shapes known without the network (for benchmarks).
pub(crate) fn known_shapes(m: &ModelSettings) -> Option<Shapes> {
    let cached = match &m.source {
        ModelSource::Hub(id) => cached_config(id, &hf_cache_dir(m)),
        _ => None,
    };
    model_shapes(m, cached.as_ref())
}

/// Prefill activation bytes per token and hidden unit: the peak of a prefill pass of `T`
/// tokens, less the memory in use before it, over `T × hidden`. Measured on the whole
/// Mixtral-8x7B (Q4K, an H100, nvidia-smi every 100 ms, 2026-12-05): passes of 4,096 tokens
/// (eight 512-token prompts) 2,308 MiB, 144 bytes; one 7,902-token prompt 3,620 MiB, 117.
const PREFILL_BYTES_PER_TOKEN_AND_UNIT: u64 = 144;

/// The CUDA context, cuBLAS workspaces and the engine's standing buffers: measured at
/// 841 MiB over weights and KV cache (the whole Mixtral-8x7B at rest on an H100).
const OVERHEAD_BYTES: u64 = 900 << 20;

/// GPU bytes for weights at `isq`, a KV cache of `kv_tokens`, the activations of a prefill
/// pass of `prefill_tokens` (the prefill budget: a longer single prompt needs more, see
/// README "Known limits") and the fixed overhead.
pub fn memory_plan(
    s: &Shapes,
    isq: Option<Isq>,
    kv_tokens: usize,
    prefill_tokens: usize,
) -> MemoryPlan {
    let bits = isq.map_or(16.0, Isq::bits_per_weight);
    let weights: f64 = s
        .tensors()
        .iter()
        .map(|(name, shape)| {
            let n = shape.iter().product::<usize>() as f64;
            // Embeddings and norms stay in 16 bits; every other matrix is quantized.
            if shape.len() == 2 && !name.contains("embed_tokens") {
                n * bits / 8.0
            } else {
                n * 2.0
            }
        })
        .sum();
    let head_dim = s.hidden / s.heads;
    let kv_per_token = (2 * s.layers * s.kv_heads * head_dim * 2) as u64;
    MemoryPlan {
        weights_bytes: weights as u64,
        kv_cache_bytes: kv_per_token * kv_tokens as u64,
        prefill_bytes: PREFILL_BYTES_PER_TOKEN_AND_UNIT * (prefill_tokens * s.hidden) as u64,
        prefill_tokens,
        overhead_bytes: OVERHEAD_BYTES,
        kv_bytes_per_token: kv_per_token,
    }
}

fn model_checks(
    m: &ModelSettings,
    shapes: Option<&Shapes>,
    remote: Option<&hub::Remote>,
    host: &HostFacts,
    (path, gguf_error): (&load::LoadPath, Option<&str>),
    report: &mut Report,
) {
    match (&m.source, path, gguf_error) {
        (ModelSource::Synthetic(_), ..) => report.push(Check::new(
            "model",
            Verdict::Pass,
            "synthetic model, written at start-up",
        )),
        // A GGUF model, as a file or the one GGUF of a directory.
        (_, _, Some(e)) => report.push(
            Check::new("model", Verdict::Fail, e)
                .fix("point --model at one Mixtral GGUF file (llama.cpp's conversion or ours), or a directory of safetensors"),
        ),
        (ModelSource::Gguf(file), _, None)
        | (ModelSource::Local(_), load::LoadPath::Gguf { file, cached: false, .. }, None) => {
            report.push(Check::new(
                "model",
                Verdict::Pass,
                format!("GGUF model {}", file.display()),
            ))
        }
        (ModelSource::Local(dir), ..) => {
            let has = |f: &str| dir.join(f).exists();
            // A cache file of this checkpoint stands in for its safetensors.
            let cached = matches!(path, load::LoadPath::Gguf { cached: true, .. });
            let weights = std::fs::read_dir(dir)
                .map(|d| {
                    d.flatten().any(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        name.ends_with(".safetensors") || name.ends_with(".gguf")
                    })
                })
                .unwrap_or(false);
            let missing: Vec<&str> = [
                ("config.json", has("config.json")),
                (
                    "tokenizer.json",
                    has("tokenizer.json") || has("tokenizer.model"),
                ),
                ("*.safetensors or a .gguf", weights || cached),
            ]
            .into_iter()
            .filter(|(_, ok)| !ok)
            .map(|(f, _)| f)
            .collect();
            if missing.is_empty() {
                report.push(Check::new(
                    "model",
                    Verdict::Pass,
                    format!("local model at {}", dir.display()),
                ));
            } else {
                report.push(
                    Check::new(
                        "model",
                        Verdict::Fail,
                        format!("{} lacks {}", dir.display(), missing.join(", ")),
                    )
                    .fix("point --model at a complete Hugging Face model directory"),
                );
            }
        }
        (ModelSource::Hub(id), ..) => {
            report.push(hub_model_check(id, m, remote, host));
        }
    }
    report.push(load::cache_check(m, path));
    report.push(load::disk_check(load::disk_needs(m, path, shapes, host)));
    report.push(load::host_memory_check(path, shapes, host));
}

/// Access to a Hub model: a token for gated repositories, what the Hub said of its
/// config.json, and a writable cache.
fn hub_model_check(
    id: &str,
    m: &ModelSettings,
    remote: Option<&hub::Remote>,
    host: &HostFacts,
) -> Check {
    let gated = id.starts_with("mistralai/") || id.starts_with("meta-llama/");
    if gated && m.hf_token.is_none() && !host.cache_dir.join("token").exists() {
        return Check::new(
            "model",
            Verdict::Fail,
            format!("{id} is gated and no Hugging Face token is set"),
        )
        .fix("accept the licence on huggingface.co, then set HF_TOKEN (or --hf-token)");
    }
    match remote {
        Some(hub::Remote::NoAccess(status)) => {
            return Check::new(
                "model",
                Verdict::Fail,
                format!("the Hub refused {id} ({status}): this token has no access"),
            )
            .fix(format!(
                "accept the licence at {}/{id} with the token's account, or use a token that has",
                m.hf_endpoint
            ));
        }
        Some(hub::Remote::NotFound) => {
            let rev = m.revision.as_deref().unwrap_or("main");
            return Check::new(
                "model",
                Verdict::Fail,
                format!("{id} at revision {rev} does not exist on the Hub"),
            )
            .fix("check --model and --revision");
        }
        _ => {}
    }
    if !host.cache_writable {
        return Check::new(
            "model",
            Verdict::Fail,
            format!(
                "cannot write to the model cache {}",
                host.cache_dir.display()
            ),
        )
        .fix(
            "set HF_HOME (or --hf-home) to a writable directory, e.g. /runpod-volume/huggingface",
        );
    }
    if let Some(hub::Remote::Unreachable(why)) = remote {
        return Check::new(
            "model",
            Verdict::Warn,
            format!("could not read {id}'s config.json: {why}"),
        )
        .fix("check the network (or HF_ENDPOINT); the download will fail the same way");
    }
    let token = if m.hf_token.is_some() {
        "set"
    } else {
        "not needed or cached"
    };
    Check::new(
        "model",
        Verdict::Pass,
        format!(
            "{id}: token {token}, cache {} writable",
            host.cache_dir.display()
        ),
    )
}

/// Runs every check. `cpu` skips the GPU ones.
pub fn run(m: &ModelSettings) -> Report {
    let started = Instant::now();
    let build = BuildFacts::current();
    let target = build.target();
    let gpu = target.cuda.is_some() && !m.cpu;
    let (driver, devices) = if gpu {
        driver::probe()
    } else {
        Default::default()
    };
    let host = host_facts(hf_cache_dir(m));
    let mut report = Report {
        schema: "zopilot-gpu/check/v1",
        verdict: Verdict::Pass,
        build,
        driver,
        devices,
        host: host.clone(),
        checks: vec![],
        duration_ms: 0.0,
    };
    report.push(Check::new(
        "build",
        Verdict::Pass,
        format!("{} build", if gpu { "CUDA" } else { "CPU" }),
    ));
    if gpu {
        let d = rules::driver_check(&target, &report.driver);
        let driver_ok = d.verdict == Verdict::Pass;
        report.push(d);
        report.push(rules::device_check(&target, &report.devices, driver_ok));
    } else {
        report.push(Check::new("driver", Verdict::Skip, "running on the CPU"));
    }
    // Before any weight: the model's own config.json, from the cache or fetched alone.
    let cached = match &m.source {
        ModelSource::Hub(id) => cached_config(id, &host.cache_dir),
        _ => None,
    };
    let remote = match &m.source {
        ModelSource::Hub(id) if cached.is_none() => {
            let cached_token = std::fs::read_to_string(host.cache_dir.join("token")).ok();
            let token = m
                .hf_token
                .clone()
                .or_else(|| cached_token.map(|t| t.trim().to_owned()));
            Some(hub::fetch_config(
                &m.hf_endpoint,
                id,
                m.revision.as_deref(),
                token.as_deref(),
            ))
        }
        _ => None,
    };
    let hub_config = cached.as_ref().or(match &remote {
        Some(hub::Remote::Config(v)) => Some(v),
        _ => None,
    });
    let (path, gguf_config, gguf_error) = load::load_path(m);
    let shapes = gguf_config
        .as_ref()
        .and_then(shapes_from_config)
        .or_else(|| model_shapes(m, hub_config));
    match &shapes {
        Some(s) if gpu => {
            let mut plan = memory_plan(s, m.isq, m.kv_cache_tokens, m.max_prefill_tokens);
            if let load::LoadPath::Gguf { tensor_bytes, .. } = &path {
                // A GGUF's own tensors: a Q4_K_M mixes in Q6_K, more than 4.5 bits a weight.
                plan.weights_bytes = plan.weights_bytes.max(*tensor_bytes);
            }
            report.push(rules::memory_check(
                &plan,
                report.devices.first(),
                m.kv_cache_tokens,
            ));
        }
        Some(_) => report.push(Check::new("memory", Verdict::Skip, "running on the CPU")),
        None => report.push(
            Check::new(
                "memory",
                Verdict::Warn,
                "model shapes unknown until its config.json is downloaded",
            )
            .fix("none needed; the plan is checked against the real config after download"),
        ),
    }
    model_checks(
        m,
        shapes.as_ref(),
        remote.as_ref(),
        &host,
        (&path, gguf_error.as_deref()),
        &mut report,
    );
    report.duration_ms = started.elapsed().as_secs_f64() * 1e3;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixtral_q4k_plan_fits_a_5090_with_the_default_kv_cache() {
        let s = Shapes::of(Preset::Mixtral8x7b, None);
        let plan = memory_plan(&s, Some(Isq::Q4K), 24576, 2048);
        // 46.7 B parameters at 4.5 bits ≈ 24.5 GiB; KV 128 KiB per token.
        assert!(
            (24.0..25.5).contains(&rules::gib(plan.weights_bytes)),
            "{plan:?}"
        );
        assert_eq!(plan.kv_bytes_per_token, 128 << 10);
        // Within the 30.5 GiB a 5090 (32,607 MiB) can give with headroom.
        assert!(rules::gib(plan.total()) < 30.5, "{plan:?}");
    }
}
