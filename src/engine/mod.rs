//! The engine: readiness, admission (sequence slots behind a bounded FIFO queue), request
//! validation against the context, and the per-request stream that turns backend steps into
//! text events with stop strings, log-probabilities, usage and cancellation. The backend
//! behind it (`mistral`) is the only code that imports mistralrs.

mod admission;
pub mod heap;
mod json_close;
mod mistral;
mod shaping;
mod stream;

use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::settings::ModelSettings;

pub use admission::{Admission, QueueLimits};
pub use mistral::MistralBackend;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// What the model is asked to continue.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// A conversation; the model's chat template is applied.
    Chat(Vec<ChatMessage>),
    /// Raw text; only the BOS token is added.
    Text(String),
    /// Token ids, used as they are (benchmarks).
    Tokens(Vec<u32>),
}

/// A generation request as the API hands it over (not yet checked against the context).
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Prompt,
    /// `None`: the room left in the context.
    pub max_tokens: Option<usize>,
    /// 0 is greedy.
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub stop: Vec<String>,
    pub decoding: Decoding,
}

/// Output held to a grammar (OpenAI's `response_format`).
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    /// Any JSON object.
    JsonObject,
    /// JSON valid under this JSON Schema.
    JsonSchema(serde_json::Value),
}

/// The decoding controls OpenAI clients send beyond temperature and top-p/top-k.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decoding {
    /// The same seed (and request) gives the same text, whatever else runs beside it.
    pub seed: Option<u64>,
    /// Subtracted once from the logit of every token already in the sequence (-2..=2).
    pub presence_penalty: Option<f32>,
    /// Subtracted per occurrence from the logit of every token in the sequence (-2..=2).
    pub frequency_penalty: Option<f32>,
    /// Added to these tokens' logits before sampling (-100..=100 each).
    pub logit_bias: Vec<(u32, f32)>,
    /// Report each token's log-probability and this many likeliest alternatives (0..=20).
    pub logprobs: Option<usize>,
    pub format: Option<Format>,
}

/// Sampling as the backend receives it, after validation.
#[derive(Debug, Clone)]
pub struct Sampling {
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub decoding: Decoding,
}

/// One alternative at a position: natural-log probability under the model's softmax.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alternative {
    pub id: u32,
    pub token: String,
    pub logprob: f32,
}

/// A generated token with its log-probability and the likeliest alternatives, best first.
/// `token` is the text it added to the output (empty while it ends inside a character).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub token: String,
    pub logprob: f32,
    pub top: Vec<Alternative>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End of sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Token counts and timings of one request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// Milliseconds from admission to the first generated token.
    pub ttft_ms: f64,
    /// Generated tokens per second after the first one.
    pub decode_tokens_per_second: f64,
}

/// What a request stream yields, in order: text pieces, then exactly one `Done` or `Error`.
#[derive(Debug)]
pub enum Event {
    /// A piece of text and the log-probabilities of the tokens it completes (empty unless
    /// asked for).
    Text {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Done {
        finish_reason: FinishReason,
        usage: Usage,
    },
    Error(EngineError),
}

/// Failures the API maps onto HTTP statuses.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("the model is not ready: {0}")]
    NotReady(String),
    #[error(
        "every sequence slot is busy ({0} running) and the waiting queue is full or too slow; retry shortly"
    )]
    Overloaded(usize),
    #[error("{message}")]
    Invalid {
        param: &'static str,
        message: String,
    },
    #[error("the request ran past its {0:?} limit and was cancelled")]
    Timeout(Duration),
    #[error("internal error: {0}")]
    Internal(String),
    /// The GPU had no memory left for this request's step; the server stays up.
    #[error(
        "the GPU ran out of memory for this request (its prompt's prefill beside the others'); \
         the server is still up: retry, or send a shorter prompt. Operators: lower \
         --max-model-len, --kv-cache-tokens or --max-prefill-tokens"
    )]
    OutOfMemory(String),
}

impl EngineError {
    /// A failed engine step as the error its client gets: out of memory told apart (and
    /// logged here, whole, since its client sees only the fixes; other failures are logged
    /// where they become a 500).
    pub fn from_step_failure(msg: String) -> Self {
        const OOM: [&str; 3] = [
            "CUDA_ERROR_OUT_OF_MEMORY",
            "out of memory",
            "Failed to allocate preallocated KV cache",
        ];
        if OOM.iter().any(|s| msg.contains(s)) {
            tracing::error!(detail = %msg, "out of GPU memory");
            EngineError::OutOfMemory(msg)
        } else {
            EngineError::Internal(msg)
        }
    }
}

/// Where the model is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum Readiness {
    Loading,
    Ready,
    /// Shutting down: in-flight work finishes, new work is refused.
    Draining,
    Failed(String),
}

/// One step of a running sequence, as the backend reports it.
#[derive(Debug)]
pub enum Step {
    Text {
        text: String,
        finish: Option<FinishReason>,
        /// Present when the request asked for log-probabilities.
        logprob: Option<TokenLogprob>,
    },
    Failed(String),
}

/// What the engine needs from a model runtime. `mistral::MistralBackend` is the real
/// one; tests may bring a fake.
pub trait Backend: Send + Sync + 'static {
    /// The longest sequence (prompt + generated) the backend can run.
    fn context_len(&self) -> usize;
    /// Tokens in the vocabulary, when the backend knows it (bounds `logit_bias` and
    /// `/detokenize` ids).
    fn vocab_size(&self) -> Option<usize>;
    /// Prompt token ids as the model sees them: the chat template applied to a chat (the
    /// template writes BOS), BOS added to raw text, token prompts as they are.
    fn tokenize(
        &self,
        prompt: Prompt,
    ) -> futures::future::BoxFuture<'static, Result<Vec<u32>, EngineError>>;
    /// The text of token ids, special tokens included.
    fn detokenize(
        &self,
        ids: Vec<u32>,
    ) -> futures::future::BoxFuture<'static, Result<String, EngineError>>;
    /// Starts a sequence; dropping the receiver cancels it.
    fn start(
        &self,
        prompt: Vec<u32>,
        sampling: Sampling,
    ) -> futures::future::BoxFuture<'static, Result<mpsc::Receiver<Step>, EngineError>>;
}

/// A started generation: the validated numbers and the event stream.
pub struct Generation {
    pub id: String,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub events: mpsc::Receiver<Event>,
}

/// The engine handle shared by the API, the CLI and the worker.
pub struct Engine {
    state: RwLock<Readiness>,
    backend: OnceLock<Arc<dyn Backend>>,
    admission: Admission,
    max_model_len: Option<usize>,
    request_timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// Name reported in responses.
    pub model_name: String,
}

impl Engine {
    /// An engine in the `Loading` state; call `install` (or `load`) to make it ready.
    pub fn new(model: &ModelSettings, request_timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            state: RwLock::new(Readiness::Loading),
            backend: OnceLock::new(),
            admission: Admission::new(model.max_num_seqs, model.queue, metrics.clone()),
            max_model_len: model.max_model_len,
            request_timeout,
            metrics,
            model_name: model.served_model_name.clone(),
        }
    }

    /// Loads the configured model with mistral.rs and marks the engine ready or failed.
    pub async fn load(self: &Arc<Self>, model: &ModelSettings) -> anyhow::Result<()> {
        let started = Instant::now();
        match MistralBackend::load(model).await {
            Ok(backend) => {
                self.metrics.model_load_millis.store(
                    started.elapsed().as_millis() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                self.install(Arc::new(backend));
                tracing::info!(
                    seconds = started.elapsed().as_secs_f64(),
                    context = self.context_len(),
                    "model ready"
                );
                Ok(())
            }
            Err(e) => {
                let reason = format!("{e:#}");
                tracing::error!(%reason, "model failed to load");
                self.fail(reason);
                Err(e)
            }
        }
    }

    /// Makes `backend` the engine's and marks it ready.
    pub fn install(&self, backend: Arc<dyn Backend>) {
        if self.backend.set(backend).is_ok() {
            let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
            if *s == Readiness::Loading {
                *s = Readiness::Ready;
            }
        }
    }

    /// Marks loading as failed.
    pub fn fail(&self, reason: String) {
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = Readiness::Failed(reason);
    }

    /// Stops admitting new requests; those running finish.
    /// Gives freed heap back to the operating system whenever the engine goes idle after
    /// work (see `heap`); runs until the engine is dropped. Call once, inside the runtime.
    pub fn trim_heap_when_idle(self: &Arc<Self>) {
        tokio::spawn(heap::trim_when_idle(Arc::downgrade(self)));
    }

    pub fn drain(&self) {
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        if *s == Readiness::Ready || *s == Readiness::Loading {
            *s = Readiness::Draining;
        }
    }

    pub fn readiness(&self) -> Readiness {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The context length requests are validated against (0 until ready).
    pub fn context_len(&self) -> usize {
        let Some(b) = self.backend.get() else {
            return 0;
        };
        match self.max_model_len {
            Some(n) => n.min(b.context_len()),
            None => b.context_len(),
        }
    }

    /// Sequences running now.
    pub fn in_flight(&self) -> usize {
        self.admission.running()
    }

    /// Free sequence slots.
    pub fn free_slots(&self) -> usize {
        self.admission.free()
    }

    /// Tokens in the model's vocabulary, once loaded and if known.
    pub fn vocab_size(&self) -> Option<usize> {
        self.backend.get().and_then(|b| b.vocab_size())
    }

    /// Requests waiting for a slot.
    pub fn queued(&self) -> usize {
        self.admission.waiting()
    }

    pub fn max_num_seqs(&self) -> usize {
        self.admission.slots()
    }

    fn ready_backend(&self) -> Result<Arc<dyn Backend>, EngineError> {
        self.backend
            .get()
            .cloned()
            .ok_or_else(|| EngineError::NotReady("still loading".into()))
    }

    /// Token ids of a prompt as the model would see it.
    pub async fn tokenize(&self, prompt: Prompt) -> Result<Vec<u32>, EngineError> {
        self.ready_backend()?.tokenize(prompt).await
    }

    /// The text of token ids (special tokens included); ids outside the vocabulary are
    /// refused.
    pub async fn detokenize(&self, ids: Vec<u32>) -> Result<String, EngineError> {
        let backend = self.ready_backend()?;
        if let Some(vocab) = backend.vocab_size()
            && let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab)
        {
            return Err(EngineError::Invalid {
                param: "tokens",
                message: format!("token id {bad} is outside the vocabulary (0..{vocab})"),
            });
        }
        backend.detokenize(ids).await
    }

    /// Admits, validates and starts a request. Waits in the bounded FIFO queue when every
    /// slot is busy; fails with `Overloaded` (429) when the queue is full or the wait would
    /// run past its limit.
    pub async fn generate(&self, req: GenRequest) -> Result<Generation, EngineError> {
        let admitted = Instant::now();
        let backend = match (self.readiness(), self.backend.get()) {
            (Readiness::Ready, Some(b)) => b.clone(),
            (Readiness::Failed(r), _) => {
                return Err(EngineError::NotReady(format!("loading failed: {r}")));
            }
            (Readiness::Draining, _) => return Err(EngineError::NotReady("shutting down".into())),
            _ => return Err(EngineError::NotReady("still loading".into())),
        };
        validate_sampling(&req, backend.vocab_size())?;
        let ids = backend.tokenize(req.prompt.clone()).await?;
        let max_tokens = self.check_lengths(ids.len(), req.max_tokens)?;
        // Validated before waiting, so a bad request is answered at once.
        let permit = self.admission.admit().await?;
        let sampling = Sampling {
            max_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            decoding: req.decoding,
        };
        let prompt_tokens = ids.len();
        let steps = backend.start(ids, sampling).await?;
        // Bounded by the request's own token budget, so a slow client never stalls the
        // engine and the buffer never grows past what this request may produce.
        let (tx, events) = mpsc::channel(max_tokens + 2);
        let ctx = stream::StreamCtx {
            steps,
            out: tx,
            stop: req.stop,
            prompt_tokens,
            max_tokens,
            admitted,
            deadline: admitted + self.request_timeout,
            timeout: self.request_timeout,
            metrics: self.metrics.clone(),
            permit,
        };
        tokio::spawn(stream::run(ctx));
        Ok(Generation {
            id: uuid::Uuid::new_v4().simple().to_string(),
            prompt_tokens,
            max_tokens,
            events,
        })
    }

    /// The validated `max_tokens`: the default is the room left, and a prompt that leaves
    /// no room, or a request for more than the room, is refused with the numbers.
    fn check_lengths(&self, prompt: usize, asked: Option<usize>) -> Result<usize, EngineError> {
        let ctx = self.context_len();
        if prompt >= ctx {
            return Err(EngineError::Invalid {
                param: "messages",
                message: format!(
                    "the prompt is {prompt} tokens; the context is {ctx} tokens (--max-model-len), \
                     leaving no room to generate. Shorten the prompt to < {ctx} tokens"
                ),
            });
        }
        let room = ctx - prompt;
        match asked {
            None => Ok(room),
            Some(0) => Err(EngineError::Invalid {
                param: "max_tokens",
                message: "`max_tokens` must be >= 1. Given: 0".into(),
            }),
            Some(n) if n > room => Err(EngineError::Invalid {
                param: "max_tokens",
                message: format!(
                    "`max_tokens` must be <= {room} (context {ctx} − prompt {prompt}). Given: {n}"
                ),
            }),
            Some(n) => Ok(n),
        }
    }
}

fn validate_sampling(req: &GenRequest, vocab: Option<usize>) -> Result<(), EngineError> {
    let invalid = |param, message: String| Err(EngineError::Invalid { param, message });
    if !(0.0..=2.0).contains(&req.temperature) || req.temperature.is_nan() {
        return invalid(
            "temperature",
            format!(
                "`temperature` must be between 0 and 2. Given: {}",
                req.temperature
            ),
        );
    }
    if let Some(p) = req.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return invalid("top_p", format!("`top_p` must be in (0, 1]. Given: {p}"));
    }
    if let Some(0) = req.top_k {
        return invalid("top_k", "`top_k` must be >= 1. Given: 0".into());
    }
    if req.stop.len() > 16 {
        return invalid(
            "stop",
            format!("`stop` takes at most 16 strings. Given: {}", req.stop.len()),
        );
    }
    if req.stop.iter().any(String::is_empty) {
        return invalid("stop", "`stop` strings must not be empty".into());
    }
    validate_decoding(&req.decoding, vocab)
}

fn validate_decoding(d: &Decoding, vocab: Option<usize>) -> Result<(), EngineError> {
    let invalid = |param, message: String| Err(EngineError::Invalid { param, message });
    for (param, value) in [
        ("presence_penalty", d.presence_penalty),
        ("frequency_penalty", d.frequency_penalty),
    ] {
        if let Some(v) = value
            && !(-2.0..=2.0).contains(&v)
        {
            return invalid(
                param,
                format!("`{param}` must be between -2 and 2. Given: {v}"),
            );
        }
    }
    for &(id, bias) in &d.logit_bias {
        if !(-100.0..=100.0).contains(&bias) {
            return invalid(
                "logit_bias",
                format!(
                    "`logit_bias` values must be between -100 and 100. Given: {bias} for token {id}"
                ),
            );
        }
        if let Some(v) = vocab
            && id as usize >= v
        {
            return invalid(
                "logit_bias",
                format!("`logit_bias` key {id} is not a token id (the vocabulary has {v} tokens)"),
            );
        }
    }
    Ok(())
}

/// The most alternatives a token's log-probabilities list (OpenAI's limit; the API checks
/// it, naming each endpoint's own field).
pub const MAX_TOP_LOGPROBS: usize = 20;
