//! Command-line surface: clap derive types holding raw values only. Every flag has an
//! env fallback; validation and defaults that depend on other flags live in `settings`.
//! On/off flags take `1`/`0`, `true`/`false`, `yes`/`no` or `on`/`off` from the environment.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::synth::Preset;

/// Serve Mixtral-8x7B-Instruct, quantized in situ to 4 bits, on one GPU.
#[derive(Debug, Parser)]
#[command(name = "zopilot-gpu", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (the default when no command is given).
    Serve(ServeArgs),
    /// Load the model, generate for one prompt and stream the tokens to stdout.
    Generate(GenerateArgs),
    /// Write a synthetic Mixtral-architecture model (config, tokenizer, random weights).
    Synth(SynthArgs),
    /// Check driver, GPU, memory, disk and model access; exit 3 when a check fails.
    Check(CheckArgs),
    /// Prove this binary's kernels work on this GPU against a CPU reference.
    Selftest(SelftestArgs),
    /// Measure TTFT, inter-token latency and throughput at several concurrency levels.
    Bench(BenchArgs),
    /// Run as a RunPod queue worker (the default when RUNPOD_WEBHOOK_GET_JOB is set).
    Worker(WorkerArgs),
}

/// The RunPod queue worker. The RUNPOD_* variables are set by RunPod itself.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Run one job locally and exit 0/1, as RunPod's SDK does (`test_input.json` in the
    /// working directory is used when present and no job server is configured).
    #[arg(long)]
    pub test_input: Option<String>,

    /// Serve /ping and /health on this port while working.
    #[arg(long, env = "PORT_HEALTH")]
    pub port_health: Option<u16>,

    /// Job-take URL template ($ID → worker id).
    #[arg(long, env = "RUNPOD_WEBHOOK_GET_JOB", hide = true)]
    pub get_job: Option<String>,

    /// Result URL template ($RUNPOD_POD_ID → worker id, $ID → job id).
    #[arg(long, env = "RUNPOD_WEBHOOK_POST_OUTPUT", hide = true)]
    pub post_output: Option<String>,

    /// Stream URL template ($RUNPOD_POD_ID → worker id, $ID → job id).
    #[arg(long, env = "RUNPOD_WEBHOOK_POST_STREAM", hide = true)]
    pub post_stream: Option<String>,

    /// Heartbeat URL template ($RUNPOD_POD_ID → worker id).
    #[arg(long, env = "RUNPOD_WEBHOOK_PING", hide = true)]
    pub ping: Option<String>,

    /// Key sent as the raw Authorization header.
    #[arg(long, env = "RUNPOD_AI_API_KEY", hide = true, hide_env_values = true)]
    pub runpod_api_key: Option<String>,

    /// This worker's id.
    #[arg(long, env = "RUNPOD_POD_ID", hide = true)]
    pub pod_id: Option<String>,

    /// Heartbeat interval in milliseconds.
    #[arg(
        long,
        env = "RUNPOD_PING_INTERVAL",
        default_value_t = 10_000,
        hide = true
    )]
    pub ping_interval_ms: u64,

    /// Timeout of result, stream and heartbeat calls, in milliseconds (the long-polls
    /// take 90 s).
    #[arg(
        long,
        env = "ZOPILOT_RUNPOD_CALL_TIMEOUT_MS",
        default_value_t = 30_000,
        hide = true
    )]
    pub call_timeout_ms: u64,

    /// Endpoint id, added to JSON logs.
    #[arg(long, env = "RUNPOD_ENDPOINT_ID", hide = true)]
    pub endpoint_id: Option<String>,

    /// Seconds in-flight jobs get to finish after SIGTERM.
    #[arg(long, env = "ZOPILOT_SHUTDOWN_GRACE", default_value_t = 30)]
    pub shutdown_grace: u64,

    /// Final streamed answers carry the list of all partials (as worker-vllm does).
    #[arg(long, env = "ZOPILOT_AGGREGATE_STREAM", default_value_t = true, action = clap::ArgAction::Set)]
    pub aggregate_stream: bool,
}

/// The benchmark.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Prompt length in tokens.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,

    /// Tokens generated per request.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,

    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32")]
    pub concurrency: Vec<usize>,

    /// Measure a running server over HTTP (its /v1/completions) instead of in-process.
    #[arg(long)]
    pub url: Option<String>,

    /// Bearer key for --url.
    #[arg(long, env = "ZOPILOT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Memory bandwidth in GB/s for the floor (default: the card's datasheet figure).
    #[arg(long)]
    pub bandwidth_gbs: Option<f64>,

    /// Mixed load: after each level, its streams decode again while prompts of this many
    /// tokens arrive one after another (`--long-prompts` of them); reports the streams'
    /// inter-token latency meanwhile and the prompts' TTFT. 0: off.
    #[arg(long, default_value_t = 0)]
    pub long_prompt_tokens: usize,

    /// Long prompts per level in the mixed-load phase.
    #[arg(long, default_value_t = 4)]
    pub long_prompts: usize,

    /// Give every stream a prompt of its own (same length), so that a mixture of experts
    /// routes the streams to different experts as real traffic does. By default every stream
    /// sends the same prompt, as in every earlier record: the streams then decode the same
    /// tokens and take the same experts.
    #[arg(long)]
    pub distinct_prompts: bool,

    /// Print the report as JSON (schema `zopilot-gpu/bench/v1`).
    #[arg(long)]
    pub json: bool,
}

/// Start-up checks without serving.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Print the report as JSON (schema `zopilot-gpu/check/v1`).
    #[arg(long)]
    pub json: bool,
}

/// The GPU self-test.
#[derive(Debug, Clone, Args)]
pub struct SelftestArgs {
    /// Run on the CPU (against itself): proves the pipeline, not a GPU.
    #[arg(long)]
    pub cpu: bool,

    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,

    /// Compute the CPU reference and print it as JSON (used by the self-test itself).
    #[arg(long, hide = true)]
    pub reference: bool,

    #[command(flatten)]
    pub decode: DecodeArgs,
}

/// What to load and how: shared by every command that runs the model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Hugging Face model id, a local model directory, or `synthetic:tiny`
    /// [default: mistralai/Mixtral-8x7B-Instruct-v0.1; RunPod's MODEL_NAME is honoured too].
    #[arg(long, env = "ZOPILOT_MODEL")]
    pub model: Option<String>,

    /// Model id as RunPod templates set it; used when --model is not given.
    #[arg(long = "model-name", env = "MODEL_NAME", hide = true)]
    pub model_name: Option<String>,

    /// Hugging Face revision (branch, tag or commit) of the model.
    #[arg(long, env = "ZOPILOT_REVISION")]
    pub revision: Option<String>,

    /// In-situ quantization applied while loading: q4k (default), q5k, q6k, q8_0 or none.
    #[arg(long, env = "ZOPILOT_ISQ", default_value = "q4k")]
    pub isq: String,

    /// Longest sequence (prompt + generated tokens) accepted; 0 means the model's own limit
    /// [default: 8192; vLLM's MAX_MODEL_LEN is honoured too].
    #[arg(long, env = "ZOPILOT_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,

    /// The RunPod/vLLM spelling of --max-model-len; used when that flag is not given.
    #[arg(long = "max-model-len-compat", env = "MAX_MODEL_LEN", hide = true)]
    pub max_model_len_compat: Option<usize>,

    /// Sequences generated at once; further requests wait in the queue (--max-queue).
    #[arg(long, env = "ZOPILOT_MAX_NUM_SEQS", default_value_t = 16)]
    pub max_num_seqs: usize,

    /// Most prompt tokens one prefill step takes on a GPU: waiting prompts beyond it wait for
    /// the next step, so the step's activations stay bounded. A longer prompt runs alone.
    #[arg(long, env = "ZOPILOT_MAX_PREFILL_TOKENS", default_value_t = 2048)]
    pub max_prefill_tokens: usize,

    /// Chunked prefill on a GPU: while sequences decode, a prompt longer than this is
    /// prefilled this many tokens a step (rounded down to whole KV-cache blocks), its steps
    /// alternating with decode steps, so streams keep their pace while it loads; with nothing
    /// decoding a prompt runs whole. Smaller chunks: shorter gaps, a slower prompt
    /// (bench/README.md). 0: off, a prompt stalls every stream for its whole prefill.
    #[arg(long, env = "ZOPILOT_PREFILL_CHUNK_TOKENS", default_value_t = 256)]
    pub prefill_chunk_tokens: usize,

    /// Requests that may wait, first come first served, for a sequence slot while all are
    /// busy; one more is answered 429 with Retry-After at once. 0: no queue.
    #[arg(long, env = "ZOPILOT_MAX_QUEUE", default_value_t = 512)]
    pub max_queue: usize,

    /// Seconds a request may wait in the queue for a slot before it is answered 429.
    #[arg(long, env = "ZOPILOT_MAX_QUEUE_WAIT", default_value_t = 60.0)]
    pub max_queue_wait: f64,

    /// Tokens of KV cache reserved on the GPU (paged attention); 0 means
    /// max-model-len × 3, enough for three full-length sequences (and, for Mixtral Q4K on a
    /// 32 GB card, room for a full-length prompt's prefill beside it).
    #[arg(long, env = "ZOPILOT_KV_CACHE_TOKENS", default_value_t = 0)]
    pub kv_cache_tokens: usize,

    /// Run on the CPU even when a GPU is present.
    #[arg(long, env = "ZOPILOT_CPU", value_parser = clap::builder::BoolishValueParser::new())]
    pub cpu: bool,

    /// Hugging Face access token (Mixtral is gated).
    #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
    pub hf_token: Option<String>,

    /// Hugging Face cache directory (weights are downloaded here).
    #[arg(long, env = "HF_HOME")]
    pub hf_home: Option<PathBuf>,

    /// Quantized-weights cache: a directory, or `off`. The first in-situ-quantized load
    /// writes a GGUF file there; later starts load it instead of quantizing. The CUDA
    /// driver's compiled kernels are kept under it too (`cuda-jit`, unless CUDA_CACHE_PATH
    /// is set) [default: HF_HOME/zopilot-quant-cache].
    #[arg(long, env = "ZOPILOT_QUANT_CACHE")]
    pub quant_cache: Option<String>,

    /// Hugging Face endpoint (a mirror, or a local emulator in tests).
    #[arg(
        long,
        env = "HF_ENDPOINT",
        default_value = "https://huggingface.co",
        hide = true
    )]
    pub hf_endpoint: String,

    /// Name the model is served as on /v1/models and in responses (default: --model).
    #[arg(long, env = "ZOPILOT_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,

    /// Log as JSON lines (for log collectors) instead of human-readable text.
    #[arg(long, env = "ZOPILOT_LOG_JSON", value_parser = clap::builder::BoolishValueParser::new())]
    pub log_json: bool,

    #[command(flatten)]
    pub decode: DecodeArgs,
}

/// How Mixtral decodes on a GPU: which path, and from how many tokens each of our kernels
/// takes over (the `zopilot-kernels` crate; docs/decode.md has the dispatch table). The
/// defaults are what was measured fastest; these are for comparison, profiling and tuning
/// on another card.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Decode options")]
pub struct DecodeArgs {
    /// Mixtral's layers: `ours` (stacked experts, our Q4K kernels, the fused decode layer) or
    /// `upstream` (mistral.rs' own: a loop over the experts, candle's kernels).
    #[arg(long, env = "ZOPILOT_MIXTRAL_PATH", default_value = "ours")]
    pub mixtral_path: String,

    /// Programmatic dependent launch of our kernels (Hopper and later): on or off.
    #[arg(long, env = "ZOPILOT_PDL", default_value = "on")]
    pub pdl: String,

    /// Most tokens in a forward for which the experts run per (token, expert) pair; more go
    /// grouped by expert.
    #[arg(long, env = "ZOPILOT_MOE_GATHER_MAX_TOKENS", default_value_t = 2)]
    pub moe_gather_max_tokens: usize,

    /// Most tokens for the grouped experts on tensor cores (more: each expert dequantized for
    /// cuBLAS); 0 turns them off.
    #[arg(long, env = "ZOPILOT_MOE_MMA_MAX_TOKENS", default_value_t = 64)]
    pub moe_mma_max_tokens: usize,

    /// Tokens from which the experts run as one GEMM straight from Q4K on f16 tensor cores
    /// (prefill), instead of each expert dequantized for cuBLAS; 0 turns it off.
    #[arg(long, env = "ZOPILOT_MOE_GEMM_MIN_TOKENS", default_value_t = 0)]
    pub moe_gemm_min_tokens: usize,

    /// Rows from which the dense Q4K layers multiply on tensor cores instead of the mat-vec;
    /// 0 turns that off.
    #[arg(long, env = "ZOPILOT_MMA_MIN_TOKENS", default_value_t = 3)]
    pub mma_min_tokens: usize,

    /// Most rows the dense Q4K layers (attention projections, router, lm_head) take through
    /// our kernels; more go to candle's quantized matmul (unless --dense-cublas-min-tokens takes
    /// them).
    #[arg(long, env = "ZOPILOT_MMA_MAX_TOKENS", default_value_t = 128)]
    pub mma_max_tokens: usize,

    /// Rows from which the dense Q4K layers dequantize their weight to f16 and multiply with
    /// cuBLAS (prefill), ahead of our kernels and candle's quantized matmul; 0 turns it off.
    #[arg(long, env = "ZOPILOT_DENSE_CUBLAS_MIN_TOKENS", default_value_t = 129)]
    pub dense_cublas_min_tokens: usize,

    /// Print one `zopilot-step` line per engine step on stderr (scripts/gpu-profile.sh).
    #[arg(long, env = "ZOPILOT_STEP_TRACE", value_parser = clap::builder::BoolishValueParser::new())]
    pub step_trace: bool,

    /// With --step-trace: the GPU spins this many µs before each forward, so the host queues
    /// the whole step ahead of it (forward time minus this is the GPU's own time).
    #[arg(long, env = "ZOPILOT_STEP_TRACE_HEAD_US", default_value_t = 0)]
    pub step_trace_head_us: usize,
}

/// The HTTP server.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Address to listen on.
    #[arg(long, env = "ZOPILOT_HOST", default_value = "0.0.0.0")]
    pub host: String,

    /// Port to listen on.
    #[arg(long, env = "PORT", default_value_t = 8000)]
    pub port: u16,

    /// Second port that serves only /ping and /health (RunPod load balancer); off when unset
    /// or equal to --port.
    #[arg(long, env = "PORT_HEALTH")]
    pub port_health: Option<u16>,

    /// Bearer token required on every endpoint except /health, /ping and /metrics.
    #[arg(long, env = "ZOPILOT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Longest a request may run, in seconds, before it is cancelled.
    #[arg(long, env = "ZOPILOT_REQUEST_TIMEOUT", default_value_t = 600.0)]
    pub request_timeout: f64,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "ZOPILOT_BODY_LIMIT", default_value_t = 1 << 20)]
    pub body_limit: usize,

    /// Skip the GPU self-test that runs before the model loads.
    #[arg(long, env = "ZOPILOT_SKIP_SELFTEST", value_parser = clap::builder::BoolishValueParser::new())]
    pub skip_selftest: bool,

    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "ZOPILOT_SHUTDOWN_GRACE", default_value_t = 30)]
    pub shutdown_grace: u64,
}

/// One prompt, streamed to stdout.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// The user message (the chat template is applied).
    #[arg(long, short)]
    pub prompt: String,

    /// Optional system message.
    #[arg(long)]
    pub system: Option<String>,

    /// Tokens to generate at most (default: the room left in the context).
    #[arg(long)]
    pub max_tokens: Option<usize>,

    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
}

/// Write a synthetic model directory.
#[derive(Debug, Clone, Args)]
pub struct SynthArgs {
    /// Shapes to use.
    #[arg(long, value_enum, default_value_t = Preset::Tiny)]
    pub preset: Preset,

    /// Number of decoder layers (default: the preset's).
    #[arg(long)]
    pub layers: Option<usize>,

    /// Seed of the random weights; the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Directory to write (created if missing).
    #[arg(long)]
    pub out: PathBuf,

    /// Write the weights already quantized, as one GGUF file (`q4k`), instead of bf16
    /// safetensors: the whole Mixtral-8x7B in 26 GB rather than 93.
    #[arg(long, value_parser = ["q4k"])]
    pub quantized: Option<String>,
}

impl WorkerArgs {
    /// `worker`'s arguments from the environment alone, for a bare `zopilot-gpu` on RunPod.
    pub fn from_env() -> Self {
        match Cli::parse_from(["zopilot-gpu", "worker"]).command {
            Some(Command::Worker(a)) => a,
            _ => unreachable!("`worker` parses to Command::Worker"),
        }
    }
}

impl ServeArgs {
    /// `serve`'s arguments from the environment alone, for a bare `zopilot-gpu`.
    pub fn from_env() -> Self {
        match Cli::parse_from(["zopilot-gpu", "serve"]).command {
            Some(Command::Serve(a)) => a,
            _ => unreachable!("`serve` parses to Command::Serve"),
        }
    }
}
