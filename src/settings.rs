//! Settings: the one validated, immutable configuration built from the CLI's raw values.
//! Every cross-field check lives here, and every message names the flag, the limit and the
//! value given. Nothing else reads the process environment.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::{DecodeArgs, ModelArgs, ServeArgs, WorkerArgs};
use crate::engine::QueueLimits;
use crate::synth::Preset;
pub use zopilot_kernels::options::{DecodeOptions, MixtralPath};

/// The model served when neither `--model` nor RunPod's `MODEL_NAME` says otherwise.
pub const DEFAULT_MODEL: &str = "mistralai/Mixtral-8x7B-Instruct-v0.1";
/// Where RunPod mounts a network volume.
pub const RUNPOD_VOLUME: &str = "/runpod-volume";
/// Context length used when neither `--max-model-len` nor `MAX_MODEL_LEN` is given.
pub const DEFAULT_MAX_MODEL_LEN: usize = 8192;
/// Size limit given to the CUDA driver's JIT cache when it lives under the quantized-weights
/// cache (the driver's own default, 256 MiB, can evict kernels a start needs).
const CUDA_JIT_CACHE_BYTES: u64 = 1 << 30;

/// A configuration mistake, reported before anything is loaded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SettingsError(pub String);

fn bad(msg: impl Into<String>) -> SettingsError {
    SettingsError(msg.into())
}

/// Where the weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face repository id (`owner/name`).
    Hub(String),
    /// A directory holding config.json, tokenizer files and safetensors (or one GGUF file).
    Local(PathBuf),
    /// A GGUF file (ours or llama.cpp's Mixtral conversion).
    Gguf(PathBuf),
    /// A synthetic model written to a temporary directory at start-up.
    Synthetic(Preset),
}

/// In-situ quantization applied while loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isq {
    Q4K,
    Q5K,
    Q6K,
    Q8_0,
}

impl Isq {
    /// The spelling used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Isq::Q4K => "q4k",
            Isq::Q5K => "q5k",
            Isq::Q6K => "q6k",
            Isq::Q8_0 => "q8_0",
        }
    }

    /// Bits per weight including block scales (GGUF block layouts).
    pub fn bits_per_weight(self) -> f64 {
        match self {
            Isq::Q4K => 4.5,
            Isq::Q5K => 5.5,
            Isq::Q6K => 6.5625,
            Isq::Q8_0 => 8.5,
        }
    }
}

fn parse_isq(raw: &str) -> Result<Option<Isq>, SettingsError> {
    match raw.to_ascii_lowercase().as_str() {
        "none" | "off" | "" => Ok(None),
        "q4k" | "q4_k" => Ok(Some(Isq::Q4K)),
        "q5k" | "q5_k" => Ok(Some(Isq::Q5K)),
        "q6k" | "q6_k" => Ok(Some(Isq::Q6K)),
        "q8_0" | "q80" => Ok(Some(Isq::Q8_0)),
        other => Err(bad(format!(
            "--isq must be one of q4k, q5k, q6k, q8_0, none. Given: {other}"
        ))),
    }
}

/// Everything needed to load and run the model.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    pub source: ModelSource,
    pub revision: Option<String>,
    /// `None` loads the weights unquantized.
    pub isq: Option<Isq>,
    /// `None` means the model's own limit (`max_position_embeddings`).
    pub max_model_len: Option<usize>,
    pub max_num_seqs: usize,
    /// Most prompt tokens one prefill step admits (a longer prompt runs alone).
    pub max_prefill_tokens: usize,
    /// Chunked prefill's chunk in tokens while sequences decode; 0: off.
    pub prefill_chunk_tokens: usize,
    /// The waiting line in front of the sequence slots.
    pub queue: QueueLimits,
    /// Tokens of paged KV cache to reserve on a GPU.
    pub kv_cache_tokens: usize,
    pub cpu: bool,
    pub hf_token: Option<String>,
    pub hf_home: Option<PathBuf>,
    /// The quantized-weights cache directory; `None` when off.
    pub quant_cache: Option<PathBuf>,
    /// Where config.json comes from (mistral.rs' downloader reads HF_ENDPOINT itself).
    pub hf_endpoint: String,
    /// Name reported on /v1/models and in every response.
    pub served_model_name: String,
    pub log_json: bool,
    /// Which decode path and kernels run (process-wide: [`Self::export_env`] installs them).
    pub decode: DecodeOptions,
}

/// The HTTP server's own limits.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    /// A second listener for /ping and /health only.
    pub health_listen: Option<SocketAddr>,
    pub api_key: Option<String>,
    pub request_timeout: Duration,
    pub body_limit: usize,
    pub shutdown_grace: Duration,
    /// Run the GPU self-test before loading (CUDA builds on a GPU only).
    pub selftest: bool,
}

/// The whole validated configuration of `serve`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub model: ModelSettings,
    pub server: ServerSettings,
}

/// Validates the decode options (`--mixtral-path`, `--pdl`, the kernel thresholds).
pub fn decode_options(a: &DecodeArgs) -> Result<DecodeOptions, SettingsError> {
    let mixtral_path = match a.mixtral_path.trim().to_ascii_lowercase().as_str() {
        "ours" => MixtralPath::Ours,
        "upstream" => MixtralPath::Upstream,
        other => {
            return Err(bad(format!(
                "--mixtral-path must be `ours` or `upstream`. Given: {other:?}"
            )));
        }
    };
    let pdl = match a.pdl.trim().to_ascii_lowercase().as_str() {
        "on" | "1" | "true" => true,
        "off" | "0" | "false" => false,
        other => {
            return Err(bad(format!(
                "--pdl must be `on` or `off`. Given: {other:?}"
            )));
        }
    };
    // The grouped kernels plan at most 4,096 (token, expert) pairs: 512 tokens of top-8.
    if a.moe_mma_max_tokens > 512 {
        return Err(bad(format!(
            "--moe-mma-max-tokens must be at most 512 (0 turns the kernels off). Given: {}",
            a.moe_mma_max_tokens
        )));
    }
    if !(1..=8192).contains(&a.mma_max_tokens) || (a.mma_min_tokens == 0 && a.mma_max_tokens > 128)
    {
        return Err(bad(format!(
            "--mma-max-tokens must be between 1 and 8192 (at most 128 with --mma-min-tokens 0: \
             the mat-vec takes 8 rows a launch). Given: {}",
            a.mma_max_tokens
        )));
    }
    if a.moe_gemm_min_tokens > 1_000_000 {
        return Err(bad(format!(
            "--moe-gemm-min-tokens must be at most 1000000 (0 turns it off). Given: {}",
            a.moe_gemm_min_tokens
        )));
    }
    if a.dense_cublas_min_tokens > 1_000_000 {
        return Err(bad(format!(
            "--dense-cublas-min-tokens must be at most 1000000 (0 turns it off). Given: {}",
            a.dense_cublas_min_tokens
        )));
    }
    if a.step_trace_head_us > 1_000_000 {
        return Err(bad(format!(
            "--step-trace-head-us must be at most 1000000 (one second). Given: {}",
            a.step_trace_head_us
        )));
    }
    Ok(DecodeOptions {
        mixtral_path,
        pdl,
        moe_gather_max_tokens: a.moe_gather_max_tokens,
        moe_mma_max_tokens: a.moe_mma_max_tokens,
        moe_gemm_min_tokens: a.moe_gemm_min_tokens,
        mma_min_tokens: a.mma_min_tokens,
        mma_max_tokens: a.mma_max_tokens,
        dense_cublas_min_tokens: a.dense_cublas_min_tokens,
        step_trace: a.step_trace,
        step_trace_head_us: a.step_trace_head_us,
    })
}

fn non_empty(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn parse_source(raw: &str) -> Result<ModelSource, SettingsError> {
    if let Some(preset) = raw.strip_prefix("synthetic:") {
        return match preset {
            "tiny" => Ok(ModelSource::Synthetic(Preset::Tiny)),
            other => Err(bad(format!(
                "--model synthetic:<preset> knows only `synthetic:tiny` (write larger ones with \
                 `zopilot-gpu synth --preset mixtral-8x7b --out DIR` and pass DIR). Given: synthetic:{other}"
            ))),
        };
    }
    let path = Path::new(raw);
    let looks_like_path = raw.starts_with('/') || raw.starts_with('.') || raw.starts_with('~');
    if raw.ends_with(".gguf") {
        return if path.is_file() {
            Ok(ModelSource::Gguf(path.to_path_buf()))
        } else {
            Err(bad(format!(
                "--model names a GGUF file that does not exist. Given: {raw}"
            )))
        };
    }
    if path.is_dir() {
        return Ok(ModelSource::Local(path.to_path_buf()));
    }
    if looks_like_path {
        return Err(bad(format!(
            "--model looks like a local directory but none exists there. Given: {raw}"
        )));
    }
    let mut parts = raw.split('/');
    let valid = matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None)
        if !a.is_empty() && !b.is_empty()
            && raw.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)));
    if !valid {
        return Err(bad(format!(
            "--model must be a Hugging Face id like `{DEFAULT_MODEL}`, an existing directory, \
             or `synthetic:tiny`. Given: {raw}"
        )));
    }
    Ok(ModelSource::Hub(raw.to_owned()))
}

impl ModelSettings {
    /// Validates the model flags shared by `serve`, `generate` and the worker.
    pub fn from_args(a: &ModelArgs) -> Result<Self, SettingsError> {
        let raw_model = non_empty(&a.model)
            .or_else(|| non_empty(&a.model_name))
            .unwrap_or_else(|| DEFAULT_MODEL.to_owned());
        let source = parse_source(&raw_model)?;
        let isq = parse_isq(&a.isq)?;
        // RunPod mounts network volumes at /runpod-volume: weights kept there survive
        // worker restarts, so that is the default cache when it exists.
        let hf_home = a.hf_home.clone().or_else(|| {
            Path::new(RUNPOD_VOLUME)
                .is_dir()
                .then(|| Path::new(RUNPOD_VOLUME).join("huggingface"))
        });

        let max_model_len = match a.max_model_len.or(a.max_model_len_compat) {
            None => Some(DEFAULT_MAX_MODEL_LEN),
            Some(0) => None,
            Some(n) if n < 64 => {
                return Err(bad(format!(
                    "--max-model-len must be >= 64 tokens (or 0 for the model's own limit). Given: {n}"
                )));
            }
            Some(n) => Some(n),
        };
        if !(64..=1 << 20).contains(&a.max_prefill_tokens) {
            return Err(bad(format!(
                "--max-prefill-tokens must be between 64 and 1048576. Given: {}",
                a.max_prefill_tokens
            )));
        }
        if a.prefill_chunk_tokens != 0
            && !(32..=a.max_prefill_tokens).contains(&a.prefill_chunk_tokens)
        {
            return Err(bad(format!(
                "--prefill-chunk-tokens must be 0 (off) or between 32 and --max-prefill-tokens \
                 ({}). Given: {}",
                a.max_prefill_tokens, a.prefill_chunk_tokens
            )));
        }
        if !(1..=256).contains(&a.max_num_seqs) {
            return Err(bad(format!(
                "--max-num-seqs must be between 1 and 256. Given: {}",
                a.max_num_seqs
            )));
        }
        const MAX_QUEUE: usize = 65_536;
        if a.max_queue > MAX_QUEUE {
            return Err(bad(format!(
                "--max-queue must be at most {MAX_QUEUE}. Given: {}",
                a.max_queue
            )));
        }
        if !(a.max_queue_wait > 0.0 && a.max_queue_wait <= 3600.0) {
            return Err(bad(format!(
                "--max-queue-wait must be > 0 and <= 3600 seconds. Given: {}",
                a.max_queue_wait
            )));
        }
        let queue = QueueLimits {
            max_waiting: a.max_queue,
            max_wait: Duration::from_secs_f64(a.max_queue_wait),
        };
        let context_for_kv = max_model_len.unwrap_or(DEFAULT_MAX_MODEL_LEN);
        let kv_cache_tokens = match a.kv_cache_tokens {
            0 => context_for_kv * 3,
            n if n < context_for_kv => {
                return Err(bad(format!(
                    "--kv-cache-tokens must be >= --max-model-len ({context_for_kv}) so one \
                     full-length sequence fits. Given: {n}"
                )));
            }
            n => n,
        };
        let served_model_name =
            non_empty(&a.served_model_name).unwrap_or_else(|| raw_model.clone());
        Ok(Self {
            source,
            revision: non_empty(&a.revision),
            isq,
            max_model_len,
            max_num_seqs: a.max_num_seqs,
            max_prefill_tokens: a.max_prefill_tokens,
            prefill_chunk_tokens: a.prefill_chunk_tokens,
            queue,
            kv_cache_tokens,
            cpu: a.cpu,
            hf_token: non_empty(&a.hf_token),
            hf_home: hf_home.clone(),
            quant_cache: match a.quant_cache.as_deref().map(str::trim) {
                Some("off") => None,
                Some("") => return Err(bad("--quant-cache must be a directory or `off`")),
                Some(dir) => Some(PathBuf::from(dir)),
                None => Some(
                    hf_home
                        .or_else(|| std::env::var_os("HF_HOME").map(PathBuf::from))
                        .unwrap_or_else(|| {
                            std::env::var_os("HOME")
                                .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from)
                                .join(".cache/huggingface")
                        })
                        .join("zopilot-quant-cache"),
                ),
            },
            served_model_name,
            hf_endpoint: a.hf_endpoint.clone(),
            log_json: a.log_json,
            decode: decode_options(&a.decode)?,
        })
    }

    /// Hands the Hugging Face cache location to the download library, which reads `HF_HOME`,
    /// and keeps the CUDA driver's compiled kernels beside the quantized-weights cache.
    /// Call before any thread is started and before CUDA is initialised.
    ///
    /// The GPU kernels ship as PTX, which the driver compiles for the card on first use:
    /// ~25 s of the first start on an H200, ~2 s once its cache holds them. The driver's
    /// default cache (`~/.nv/ComputeCache`, 256 MiB) lives on a container's scratch disk and
    /// dies with it; under the quantized-weights cache (a RunPod network volume) it survives,
    /// so only a pod's first start on a driver pays. `CUDA_CACHE_PATH` set by the user wins.
    pub fn export_env(&self) {
        install_decode_options(&self.decode);
        if let Some(home) = &self.hf_home {
            // SAFETY: called from `main` before the runtime or any other thread exists.
            unsafe { std::env::set_var("HF_HOME", home) };
        }
        if let Some(dir) = self.cuda_jit_cache() {
            // SAFETY: as above.
            unsafe {
                std::env::set_var("CUDA_CACHE_PATH", dir);
                if std::env::var_os("CUDA_CACHE_MAXSIZE").is_none() {
                    std::env::set_var("CUDA_CACHE_MAXSIZE", CUDA_JIT_CACHE_BYTES.to_string());
                }
            }
        }
    }

    /// Where the CUDA driver's JIT cache goes: `<quant-cache>/cuda-jit`, unless
    /// `CUDA_CACHE_PATH` is already set or the quantized-weights cache is off.
    fn cuda_jit_cache(&self) -> Option<PathBuf> {
        if std::env::var_os("CUDA_CACHE_PATH").is_some() {
            return None;
        }
        self.quant_cache.as_ref().map(|dir| dir.join("cuda-jit"))
    }
}

impl Settings {
    /// Validates the flags of `serve`.
    pub fn from_serve_args(a: &ServeArgs) -> Result<Self, SettingsError> {
        let model = ModelSettings::from_args(&a.model)?;
        let host: IpAddr = a.host.parse().map_err(|_| {
            bad(format!(
                "--host must be an IP address such as 0.0.0.0 or ::. Given: {}",
                a.host
            ))
        })?;
        if !(a.request_timeout > 0.0 && a.request_timeout.is_finite()) {
            return Err(bad(format!(
                "--request-timeout must be > 0 seconds. Given: {}",
                a.request_timeout
            )));
        }
        const MIN_BODY: usize = 1024;
        const MAX_BODY: usize = 64 << 20;
        if !(MIN_BODY..=MAX_BODY).contains(&a.body_limit) {
            return Err(bad(format!(
                "--body-limit must be between {MIN_BODY} and {MAX_BODY} bytes. Given: {}",
                a.body_limit
            )));
        }
        let health_listen = a
            .port_health
            .filter(|p| *p != a.port)
            .map(|p| SocketAddr::new(host, p));
        let selftest = cfg!(feature = "cuda") && !model.cpu && !a.skip_selftest;
        Ok(Self {
            model,
            server: ServerSettings {
                listen: SocketAddr::new(host, a.port),
                health_listen,
                api_key: non_empty(&a.api_key),
                request_timeout: Duration::from_secs_f64(a.request_timeout),
                body_limit: a.body_limit,
                shutdown_grace: Duration::from_secs(a.shutdown_grace),
                selftest,
            },
        })
    }
}

/// Where the RunPod job server is, as its URL templates give it.
#[derive(Debug, Clone)]
pub struct JobServer {
    pub get_job: String,
    pub post_output: String,
    pub post_stream: String,
    pub ping: Option<String>,
    pub api_key: String,
    pub worker_id: String,
    pub ping_interval: Duration,
    /// Timeout of every call but the long-polls.
    pub call_timeout: Duration,
}

/// How the worker runs: against a job server, or one local test job.
#[derive(Debug, Clone)]
pub enum WorkerMode {
    Server(JobServer),
    TestInput(serde_json::Value),
}

/// The validated configuration of `worker`.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub model: ModelSettings,
    pub mode: WorkerMode,
    pub health_listen: Option<SocketAddr>,
    pub endpoint_id: Option<String>,
    pub shutdown_grace: Duration,
    pub aggregate_stream: bool,
}

/// RunPod sets this on queue workers; a bare `zopilot-gpu` then runs `worker`.
pub fn runpod_queue_configured() -> bool {
    std::env::var_os("RUNPOD_WEBHOOK_GET_JOB").is_some_and(|v| !v.is_empty())
}

impl WorkerSettings {
    pub fn from_args(a: &WorkerArgs) -> Result<Self, SettingsError> {
        let model = ModelSettings::from_args(&a.model)?;
        let test_file = Path::new("test_input.json");
        let test_input = match (&a.test_input, &a.get_job) {
            (Some(raw), _) => Some(raw.clone()),
            (None, None) if test_file.exists() => Some(
                std::fs::read_to_string(test_file)
                    .map_err(|e| bad(format!("reading test_input.json: {e}")))?,
            ),
            _ => None,
        };
        let mode = if let Some(raw) = test_input {
            let v: serde_json::Value = serde_json::from_str(&raw).map_err(|e| {
                bad(format!(
                    "--test-input must be JSON like {{\"input\": {{...}}}}: {e}"
                ))
            })?;
            WorkerMode::TestInput(v)
        } else {
            let need = |v: &Option<String>, var: &str| {
                non_empty(v).ok_or_else(|| bad(format!("{var} must be set for the queue worker (RunPod sets it); for a local run use --test-input")))
            };
            if a.ping_interval_ms < 100 {
                return Err(bad(format!(
                    "RUNPOD_PING_INTERVAL must be >= 100 ms. Given: {}",
                    a.ping_interval_ms
                )));
            }
            WorkerMode::Server(JobServer {
                get_job: need(&a.get_job, "RUNPOD_WEBHOOK_GET_JOB")?,
                post_output: need(&a.post_output, "RUNPOD_WEBHOOK_POST_OUTPUT")?,
                post_stream: need(&a.post_stream, "RUNPOD_WEBHOOK_POST_STREAM")?,
                ping: non_empty(&a.ping),
                api_key: non_empty(&a.runpod_api_key).unwrap_or_default(),
                worker_id: non_empty(&a.pod_id)
                    .unwrap_or_else(|| format!("local-{}", std::process::id())),
                ping_interval: Duration::from_millis(a.ping_interval_ms),
                call_timeout: Duration::from_millis(a.call_timeout_ms.max(100)),
            })
        };
        Ok(Self {
            model,
            mode,
            health_listen: a.port_health.map(|p| SocketAddr::from(([0, 0, 0, 0], p))),
            endpoint_id: non_empty(&a.endpoint_id),
            shutdown_grace: Duration::from_secs(a.shutdown_grace),
            aggregate_stream: a.aggregate_stream,
        })
    }
}

/// Makes `options` the process's decode options (read by the kernels and the vendored Mixtral
/// layer at load). Once per process, before any model loads; a second, different set is a
/// programming error and is logged, the first options staying in force.
pub fn install_decode_options(options: &DecodeOptions) {
    if let Err(now) = zopilot_kernels::options::set(options.clone()) {
        tracing::error!(?now, asked = ?options, "decode options already set; keeping the first");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn serve(args: &[&str]) -> Result<Settings, SettingsError> {
        let mut argv = vec!["zopilot-gpu", "serve"];
        argv.extend_from_slice(args);
        let cli = crate::cli::Cli::try_parse_from(argv).expect("clap parses");
        match cli.command {
            Some(crate::cli::Command::Serve(a)) => Settings::from_serve_args(&a),
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_serve_mixtral_at_q4k() {
        let s = serve(&["--model", DEFAULT_MODEL]).unwrap();
        assert_eq!(s.model.source, ModelSource::Hub(DEFAULT_MODEL.into()));
        assert_eq!(s.model.isq, Some(Isq::Q4K));
        assert_eq!(s.model.max_model_len, Some(DEFAULT_MAX_MODEL_LEN));
        assert_eq!(s.model.kv_cache_tokens, DEFAULT_MAX_MODEL_LEN * 3);
    }

    #[test]
    fn decode_options_default_to_ours_and_take_each_flag() {
        let d = serve(&["--model", "synthetic:tiny"]).unwrap().model.decode;
        assert_eq!(d, DecodeOptions::default());
        assert_eq!(d.mixtral_path, MixtralPath::Ours);
        let d = serve(&[
            "--model",
            "synthetic:tiny",
            "--mixtral-path",
            "upstream",
            "--pdl",
            "off",
            "--moe-gather-max-tokens",
            "4",
            "--moe-mma-max-tokens",
            "0",
            "--moe-gemm-min-tokens",
            "0",
            "--mma-min-tokens",
            "9",
            "--mma-max-tokens",
            "512",
            "--dense-cublas-min-tokens",
            "0",
            "--step-trace",
            "--step-trace-head-us",
            "500",
        ])
        .unwrap()
        .model
        .decode;
        assert_eq!(
            d,
            DecodeOptions {
                mixtral_path: MixtralPath::Upstream,
                pdl: false,
                moe_gather_max_tokens: 4,
                moe_mma_max_tokens: 0,
                moe_gemm_min_tokens: 0,
                mma_min_tokens: 9,
                mma_max_tokens: 512,
                dense_cublas_min_tokens: 0,
                step_trace: true,
                step_trace_head_us: 500,
            }
        );
    }

    #[test]
    fn bad_decode_options_name_the_flag() {
        for (args, flag) in [
            (["--mixtral-path", "loop"], "--mixtral-path"),
            (["--pdl", "maybe"], "--pdl"),
            (["--moe-mma-max-tokens", "513"], "--moe-mma-max-tokens"),
            (["--mma-max-tokens", "0"], "--mma-max-tokens"),
            (
                ["--dense-cublas-min-tokens", "2000000"],
                "--dense-cublas-min-tokens",
            ),
            (
                ["--moe-gemm-min-tokens", "3000000"],
                "--moe-gemm-min-tokens",
            ),
            (["--step-trace-head-us", "2000000"], "--step-trace-head-us"),
        ] {
            let mut argv = vec!["--model", "synthetic:tiny"];
            argv.extend_from_slice(&args);
            let e = serve(&argv).unwrap_err().to_string();
            assert!(e.contains(flag) && e.contains(args[1]), "{e}");
        }
    }

    #[test]
    fn prefill_chunk_is_off_or_between_32_and_the_prefill_budget() {
        let chunk = |extra: &[&str]| {
            let mut argv = vec!["--model", "synthetic:tiny"];
            argv.extend_from_slice(extra);
            serve(&argv).map(|s| s.model.prefill_chunk_tokens)
        };
        assert_eq!(chunk(&[]).unwrap(), 256);
        assert_eq!(chunk(&["--prefill-chunk-tokens", "0"]).unwrap(), 0);
        assert_eq!(chunk(&["--prefill-chunk-tokens", "96"]).unwrap(), 96);
        for bad in [
            &["--prefill-chunk-tokens", "16"][..],
            &[
                "--prefill-chunk-tokens",
                "4096",
                "--max-prefill-tokens",
                "2048",
            ][..],
        ] {
            let e = chunk(bad).unwrap_err().to_string();
            assert!(
                e.contains("--prefill-chunk-tokens") && e.contains(bad[1]),
                "{e}"
            );
        }
    }

    #[test]
    fn kv_cache_smaller_than_context_names_both() {
        let e = serve(&[
            "--model",
            "synthetic:tiny",
            "--max-model-len",
            "4096",
            "--kv-cache-tokens",
            "1000",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--kv-cache-tokens") && e.contains("4096") && e.contains("1000"),
            "{e}"
        );
    }

    #[test]
    fn rejects_unknown_isq_and_bad_ids() {
        assert!(
            serve(&["--model", "synthetic:tiny", "--isq", "q3"])
                .unwrap_err()
                .to_string()
                .contains("q3")
        );
        assert!(serve(&["--model", "not an id"]).is_err());
        assert!(
            serve(&["--model", "./missing-dir"])
                .unwrap_err()
                .to_string()
                .contains("missing-dir")
        );
        assert!(serve(&["--model", "synthetic:huge"]).is_err());
        assert_eq!(
            serve(&["--model", "synthetic:tiny", "--isq", "none"])
                .unwrap()
                .model
                .isq,
            None
        );
    }

    #[test]
    fn worker_without_runpod_variables_names_the_missing_one() {
        let cli = crate::cli::Cli::try_parse_from([
            "zopilot-gpu",
            "worker",
            "--model",
            "synthetic:tiny",
            "--get-job",
            "http://h/job-take/$ID?x=1",
        ])
        .unwrap();
        let Some(crate::cli::Command::Worker(a)) = cli.command else {
            unreachable!()
        };
        if std::env::var_os("RUNPOD_WEBHOOK_POST_OUTPUT").is_none() {
            let e = WorkerSettings::from_args(&a).unwrap_err().to_string();
            assert!(
                e.contains("RUNPOD_WEBHOOK_POST_OUTPUT") && e.contains("--test-input"),
                "{e}"
            );
        }
        let cli = crate::cli::Cli::try_parse_from([
            "zopilot-gpu",
            "worker",
            "--model",
            "synthetic:tiny",
            "--test-input",
            "{not json",
        ])
        .unwrap();
        let Some(crate::cli::Command::Worker(a)) = cli.command else {
            unreachable!()
        };
        assert!(
            WorkerSettings::from_args(&a)
                .unwrap_err()
                .to_string()
                .contains("--test-input")
        );
    }

    #[test]
    fn health_port_equal_to_port_is_off() {
        let s = serve(&[
            "--model",
            "synthetic:tiny",
            "--port",
            "9000",
            "--port-health",
            "9000",
        ])
        .unwrap();
        assert!(s.server.health_listen.is_none());
        let s = serve(&[
            "--model",
            "synthetic:tiny",
            "--port",
            "9000",
            "--port-health",
            "9001",
        ])
        .unwrap();
        assert_eq!(s.server.health_listen.unwrap().port(), 9001);
    }

    #[test]
    fn limits_name_flag_and_value() {
        let e = serve(&["--model", "synthetic:tiny", "--max-num-seqs", "0"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--max-num-seqs") && e.contains('0'), "{e}");
        let e = serve(&["--model", "synthetic:tiny", "--body-limit", "10"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--body-limit") && e.contains("10"), "{e}");
        let e = serve(&["--model", "synthetic:tiny", "--max-model-len", "8"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--max-model-len"), "{e}");
    }
}
