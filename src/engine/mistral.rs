//! The mistral.rs backend: the only module that imports mistralrs. Loads the model with
//! ISQ (paged attention on CUDA), tokenizes with the model's chat template, and runs each
//! request as an internally streamed sequence so that dropping its receiver cancels it;
//! grammars, penalties and log-probabilities go to mistral.rs, `logit_bias` and seeded
//! sampling through a logits processor (`shaping`).

use std::sync::Arc;

use either::Either;
use futures::FutureExt;
use futures::future::BoxFuture;
use indexmap::IndexMap;
use mistralrs::{
    AutoDeviceMapParams, Constraint, CustomLogitsProcessor, DeviceMapSetting, IsqType,
    MemoryGpuConfig, Model, ModelDType, NormalRequest, PagedAttentionMetaBuilder, Request,
    RequestMessage, Response, SamplingParams, Tensor, TextModelBuilder, TokenSource,
};
use tokio::sync::mpsc;

use super::json_close::{Closer, Vocabulary};
use super::shaping::Shaper;
use super::{
    Alternative, Backend, EngineError, FinishReason, Format, Prompt, Sampling, Step, TokenLogprob,
};
use crate::quant_cache::Prepared;
use crate::settings::{Isq, ModelSettings, ModelSource};

/// A loaded mistral.rs model.
pub struct MistralBackend {
    model: Arc<Model>,
    context_len: usize,
    vocab_size: Option<usize>,
    /// Token texts from tokenizer.json, for JSON mode's closing; `None` if unreadable.
    vocabulary: Option<Arc<Vocabulary>>,
    /// Keeps a synthetic model's directory alive for as long as the model is served.
    _synthetic_dir: Option<tempfile::TempDir>,
    /// Likewise the view of a GGUF file (config, tokenizer, embedding and norms).
    _view: Option<tempfile::TempDir>,
}

fn isq_type(isq: Isq) -> IsqType {
    match isq {
        Isq::Q4K => IsqType::Q4K,
        Isq::Q5K => IsqType::Q5K,
        Isq::Q6K => IsqType::Q6K,
        Isq::Q8_0 => IsqType::Q8_0,
    }
}

/// Where the model's files are: a Hub id, a directory, or a synthetic model written now.
fn resolve_model(source: &ModelSource) -> anyhow::Result<(String, Option<tempfile::TempDir>)> {
    Ok(match source {
        ModelSource::Hub(id) => (id.clone(), None),
        ModelSource::Local(dir) => (dir.display().to_string(), None),
        ModelSource::Gguf(file) => (file.display().to_string(), None),
        ModelSource::Synthetic(preset) => {
            let dir = tempfile::Builder::new()
                .prefix("zopilot-synthetic-")
                .tempdir()?;
            crate::synth::write(*preset, None, 0, false, dir.path())?;
            (dir.path().display().to_string(), Some(dir))
        }
    })
}

/// A mistral.rs model built from `model_id` (a Hub id or directory) with `isq`.
async fn build(s: &ModelSettings, model_id: &str, isq: Option<Isq>) -> anyhow::Result<Model> {
    let context_hint = s
        .max_model_len
        .unwrap_or(crate::settings::DEFAULT_MAX_MODEL_LEN);
    mistralrs::core::set_max_prefill_tokens(s.max_prefill_tokens);
    mistralrs::core::set_prefill_chunk_tokens(s.prefill_chunk_tokens);
    let mut builder = TextModelBuilder::new(model_id)
        .with_max_num_seqs(s.max_num_seqs)
        // mistral.rs 0.8.1's prefix cache changes greedy output when a prompt repeats
        // (tests/http_api: a streamed answer diverged from the same request unstreamed
        // after ~9 tokens, and matched with the cache off). Correctness first.
        .with_prefix_cache_n(None)
        .with_token_source(match &s.hf_token {
            Some(t) => TokenSource::Literal(t.clone()),
            None => TokenSource::CacheToken,
        })
        // Plan the device map for our real limits, not mistral.rs' defaults, so a model
        // that fits is never split onto the CPU.
        .with_device_mapping(DeviceMapSetting::Auto(AutoDeviceMapParams::Text {
            max_seq_len: context_hint,
            max_batch_size: s.max_num_seqs,
        }));
    if let Some(isq) = isq {
        builder = builder.with_isq(isq_type(isq));
    }
    if let Some(rev) = &s.revision {
        builder = builder.with_hf_revision(rev);
    }
    if s.cpu {
        // f32 on the CPU: as fast there as f16, and numerically stable enough that
        // greedy decoding does not depend on how requests happen to be batched.
        builder = builder.with_force_cpu().with_dtype(ModelDType::F32);
    } else if mistralrs::paged_attn_supported() {
        builder = builder.with_paged_attn(
            PagedAttentionMetaBuilder::default()
                .with_gpu_memory(MemoryGpuConfig::ContextSize(s.kv_cache_tokens))
                .build()?,
        );
    }
    let handle = tokio::runtime::Handle::current();
    // The loader does blocking file and device work inside an async fn.
    tokio::task::spawn_blocking(move || handle.block_on(builder.build()))
        .await
        .map_err(|e| anyhow::anyhow!("model loading panicked: {e}"))?
}

/// Builds the model as `prepared` says: plainly, recording the quantized-weights cache, or
/// from a GGUF file's view. Returns the view directory to keep while serving.
fn load_prepared<'a>(
    s: &'a ModelSettings,
    model_id: &'a str,
    prepared: Prepared,
) -> BoxFuture<'a, anyhow::Result<(Model, Option<tempfile::TempDir>)>> {
    use crate::quant_cache::progress;
    use mistralrs::core::zopilot_weights::set_store;
    async move {
        match prepared {
            Prepared::Plain => Ok((build(s, model_id, s.isq).await?, None)),
            Prepared::Record { recorder, dest } => {
                set_store(Some(recorder.clone()));
                let built = build(s, model_id, s.isq).await;
                set_store(None);
                progress::end();
                let model = built?;
                let started = std::time::Instant::now();
                let finished =
                    tokio::task::spawn_blocking(move || recorder.finish(&dest).map(|()| dest))
                        .await?;
                match finished {
                    Ok(dest) => tracing::info!(
                        file = %dest.display(),
                        seconds = started.elapsed().as_secs_f64(),
                        "quantized-weights cache written: the next start loads it"
                    ),
                    Err(e) => tracing::warn!("quantized-weights cache not written: {e:#}"),
                }
                Ok((model, None))
            }
            Prepared::Replay {
                view,
                isq,
                replay,
                file,
                cached,
            } => {
                set_store(Some(replay.clone()));
                progress::begin("reading quantized weights", replay.quantized_bytes());
                let built = build(s, &view.path().display().to_string(), Some(isq)).await;
                set_store(None);
                progress::end();
                let err = match built {
                    Ok(model) => return Ok((model, Some(view))),
                    Err(e) => e,
                };
                let Some(tensor) = replay.corrupted() else {
                    return Err(err);
                };
                if !cached {
                    anyhow::bail!(
                        "{}: tensor {tensor} does not match its checksum — the file is damaged; \
                         download or write it again",
                        file.display()
                    );
                }
                tracing::warn!(
                    file = %file.display(),
                    "quantized-weights cache damaged (tensor {tensor} fails its checksum): \
                     removing it and quantizing again"
                );
                drop(replay);
                let _ = std::fs::remove_file(&file);
                let again = crate::quant_cache::prepare(s)?;
                if matches!(again, Prepared::Replay { .. }) {
                    anyhow::bail!("{} could not be removed", file.display());
                }
                load_prepared(s, model_id, again).await
            }
        }
    }
    .boxed()
}

impl MistralBackend {
    /// Loads (and, for Hub ids, downloads) the model: from a GGUF file or the
    /// quantized-weights cache when there is one (`quant_cache`), else with in-situ
    /// quantization, writing the cache. Blocking work runs off the runtime.
    pub async fn load(s: &ModelSettings) -> anyhow::Result<Self> {
        let (model_id, synthetic_dir) = resolve_model(&s.source)?;
        let context_hint = s
            .max_model_len
            .unwrap_or(crate::settings::DEFAULT_MAX_MODEL_LEN);
        let prepared = {
            let s = s.clone();
            tokio::task::spawn_blocking(move || crate::quant_cache::prepare(&s)).await??
        };
        let (model, view) = load_prepared(s, &model_id, prepared).await?;
        let model_max = model.max_sequence_length()?.unwrap_or(context_hint);
        let vocab_size = crate::preflight::known_shapes(s).map(|shapes| shapes.vocab);
        let tokenizer = match (&synthetic_dir, &view) {
            (Some(dir), _) | (None, Some(dir)) => Some(dir.path().join("tokenizer.json")),
            (None, None) => crate::preflight::model_file(s, "tokenizer.json"),
        };
        let vocabulary = tokenizer
            .and_then(|t| std::fs::read_to_string(t).ok())
            .and_then(|t| serde_json::from_str(&t).ok())
            .and_then(|j| Vocabulary::from_tokenizer_json(&j))
            .map(Arc::new);
        if vocabulary.is_none() {
            tracing::warn!(
                "tokenizer.json not readable: JSON mode answers are not closed before max_tokens"
            );
        }
        Ok(Self {
            model: Arc::new(model),
            context_len: model_max,
            vocab_size,
            vocabulary,
            _synthetic_dir: synthetic_dir,
            _view: view,
        })
    }
}

/// `logit_bias` and seeded sampling, run by mistral.rs on each step's logits.
struct ShapeLogits(Shaper);

impl CustomLogitsProcessor for ShapeLogits {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> mistralrs::Result<Tensor> {
        let mut v: Vec<f32> = logits.to_dtype(mistralrs::DType::F32)?.to_vec1()?;
        self.0.apply(&mut v, context);
        let n = v.len();
        Tensor::from_vec(v, n, logits.device())
    }
}

/// mistral.rs' sampling parameters, grammar and processors for one request.
fn mistral_sampling(
    s: &Sampling,
    closer: Option<Closer>,
) -> (
    SamplingParams,
    Constraint,
    Option<Vec<Arc<dyn CustomLogitsProcessor>>>,
) {
    let shaper = Shaper::for_request(s, closer);
    let mut p = SamplingParams::neutral();
    if shaper.as_ref().is_some_and(|sh| sh.seeded.is_some()) {
        // The processor has sampled already: mistral.rs takes its one-hot logits greedily.
        p.temperature = None;
    } else {
        p.temperature = Some(s.temperature);
        p.top_p = s.top_p;
        p.top_k = s.top_k;
    }
    p.max_len = Some(s.max_tokens);
    p.presence_penalty = s.decoding.presence_penalty;
    p.frequency_penalty = s.decoding.frequency_penalty;
    p.top_n_logprobs = s.decoding.logprobs.unwrap_or(0);
    let constraint = match &s.decoding.format {
        None => Constraint::None,
        Some(Format::JsonObject) => {
            Constraint::JsonSchema(compact(serde_json::json!({"type": "object"})))
        }
        Some(Format::JsonSchema(schema)) => Constraint::JsonSchema(compact(schema.clone())),
    };
    let processors =
        shaper.map(|sh| vec![Arc::new(ShapeLogits(sh)) as Arc<dyn CustomLogitsProcessor>]);
    (p, constraint, processors)
}

/// JSON without free white space between tokens (llguidance's `whitespace_flexible: false`),
/// unless the schema sets llguidance's options itself: answers are shorter, and a model cannot
/// spend its token budget on spaces and newlines before the value is complete.
fn compact(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
    }
    schema
}

/// Our log-probabilities of one token from mistral.rs' (natural logs, by our patch).
fn token_logprob(text: &str, lp: mistralrs::core::ResponseLogprob) -> TokenLogprob {
    TokenLogprob {
        id: lp.token_id,
        token: text.to_owned(),
        logprob: finite(lp.logprob),
        top: lp
            .top_logprobs
            .into_iter()
            .map(|t| Alternative {
                id: t.token,
                token: t.bytes.unwrap_or_default(),
                logprob: finite(t.logprob),
            })
            .collect(),
    }
}

/// -inf (a token ruled out) has no JSON form; -9999 is as impossible in practice.
fn finite(lp: f32) -> f32 {
    if lp.is_finite() { lp } else { -9999.0 }
}

/// A chat message as mistral.rs' template engine takes it.
type TemplateMessage = IndexMap<String, mistralrs::MessageContent>;

fn to_mistral_messages(messages: Vec<super::ChatMessage>) -> Vec<TemplateMessage> {
    messages
        .into_iter()
        .map(|m| {
            let mut map = IndexMap::new();
            map.insert("role".to_owned(), Either::Left(m.role));
            map.insert("content".to_owned(), Either::Left(m.content));
            map
        })
        .collect()
}

/// Hands one request to the model's engine.
async fn send(model: &Model, request: Request) -> Result<(), EngineError> {
    let sender = model
        .inner()
        .get_sender(None)
        .map_err(|e| EngineError::Internal(e.to_string()))?;
    sender
        .send(request)
        .await
        .map_err(|_| EngineError::Internal("the engine has stopped".into()))
}

/// Sends a request whose answer comes back on a channel of its own and waits for it on a
/// task of its own: mistral.rs panics its engine thread if such a receiver is dropped, as a
/// handler's is when its client leaves. An error answer is the client's, about `param`.
fn ask<T: Send + 'static>(
    model: Arc<Model>,
    param: &'static str,
    what: &'static str,
    request: impl FnOnce(mpsc::Sender<anyhow::Result<T>>) -> Request + Send + 'static,
) -> BoxFuture<'static, Result<T, EngineError>> {
    let task = tokio::spawn(async move {
        let (tx, mut rx) = mpsc::channel(1);
        send(&model, request(tx)).await?;
        match rx.recv().await {
            Some(Ok(answer)) => Ok(answer),
            Some(Err(e)) => Err(EngineError::Invalid {
                param,
                message: format!("{e:#}"),
            }),
            None => Err(EngineError::Internal(format!(
                "the engine dropped a {what}"
            ))),
        }
    });
    async move {
        task.await
            .map_err(|e| EngineError::Internal(e.to_string()))?
    }
    .boxed()
}

/// The message of a response that ends a request with an error.
fn error_message(r: &Response) -> Option<String> {
    match r {
        Response::ValidationError(e) | Response::InternalError(e) => Some(e.to_string()),
        Response::CompletionModelError(m, _) | Response::ModelError(m, _) => Some(m.clone()),
        _ => None,
    }
}

/// A streamed completion of token ids: how every generation reaches mistral.rs.
fn completion_request(
    prompt: Vec<u32>,
    sampling: SamplingParams,
    tx: mpsc::Sender<Response>,
    logprobs: bool,
    constraint: Constraint,
    logits_processors: Option<Vec<Arc<dyn CustomLogitsProcessor>>>,
) -> Request {
    Request::Normal(Box::new(NormalRequest {
        messages: RequestMessage::CompletionTokens(prompt),
        sampling_params: sampling,
        response: tx,
        return_logprobs: logprobs,
        is_streaming: true,
        id: 0,
        constraint,
        suffix: None,
        tools: None,
        tool_choice: None,
        logits_processors,
        return_raw_logits: false,
        web_search_options: None,
        model_id: None,
        truncate_sequence: false,
    }))
}

fn finish_of(reason: &str) -> FinishReason {
    match reason {
        "length" => FinishReason::Length,
        _ => FinishReason::Stop,
    }
}

impl Backend for MistralBackend {
    fn context_len(&self) -> usize {
        self.context_len
    }

    fn vocab_size(&self) -> Option<usize> {
        self.vocab_size
    }

    fn detokenize(&self, ids: Vec<u32>) -> BoxFuture<'static, Result<String, EngineError>> {
        ask(
            self.model.clone(),
            "tokens",
            "detokenization",
            move |response| {
                Request::Detokenize(mistralrs::core::DetokenizationRequest {
                    tokens: ids,
                    skip_special_tokens: false,
                    response,
                })
            },
        )
    }

    fn tokenize(&self, prompt: Prompt) -> BoxFuture<'static, Result<Vec<u32>, EngineError>> {
        if let Prompt::Tokens(ids) = prompt {
            return futures::future::ready(Ok(ids)).boxed();
        }
        let is_chat = matches!(prompt, Prompt::Chat(_));
        let param = if is_chat { "messages" } else { "prompt" };
        let text = match prompt {
            Prompt::Chat(m) => Either::Left(to_mistral_messages(m)),
            Prompt::Text(t) => Either::Right(t),
            Prompt::Tokens(_) => unreachable!("token prompts return early"),
        };
        // Template errors (wrong role order, unknown role) are the client's.
        let ids = ask(self.model.clone(), param, "tokenization", move |response| {
            Request::Tokenize(mistralrs::core::TokenizationRequest {
                text,
                tools: None,
                add_generation_prompt: true,
                // A chat template writes BOS itself (Mixtral's begins with `{{ bos_token }}`);
                // adding special tokens as well gave every chat prompt two, where
                // transformers' `apply_chat_template` gives one. Raw text gets BOS here.
                add_special_tokens: !is_chat,
                enable_thinking: None,
                reasoning_effort: None,
                response,
            })
        });
        async move {
            match ids.await? {
                ids if ids.is_empty() => Err(EngineError::Invalid {
                    param,
                    message: "the prompt is empty".into(),
                }),
                ids => Ok(ids),
            }
        }
        .boxed()
    }

    fn start(
        &self,
        prompt: Vec<u32>,
        s: Sampling,
    ) -> BoxFuture<'static, Result<mpsc::Receiver<Step>, EngineError>> {
        let model = self.model.clone();
        // JSON mode (any object) is closed as its budget runs out; a schema bounds itself.
        let closer = match (&s.decoding.format, &self.vocabulary) {
            (Some(Format::JsonObject), Some(v)) => {
                Some(Closer::new(v.clone(), prompt.len(), s.max_tokens))
            }
            _ => None,
        };
        let forced = closer.as_ref().map(|c| c.forced.clone());
        async move {
            let (tx, mut rx) = mpsc::channel::<Response>(64);
            let logprobs = s.decoding.logprobs.is_some();
            let (sampling, constraint, processors) = mistral_sampling(&s, closer);
            let request =
                completion_request(prompt, sampling, tx, logprobs, constraint, processors);
            send(&model, request).await?;
            let (step_tx, step_rx) = mpsc::channel(64);
            tokio::spawn(async move {
                loop {
                    let resp = tokio::select! {
                        r = rx.recv() => match r { Some(r) => r, None => break },
                        _ = step_tx.closed() => break,
                    };
                    let step = match resp {
                        Response::CompletionChunk(c) => {
                            let Some(choice) = c.choices.into_iter().next() else {
                                continue;
                            };
                            let mut finish = choice.finish_reason.as_deref().map(finish_of);
                            // A JSON answer closed for want of budget ended at the budget.
                            if finish.is_some()
                                && forced
                                    .as_ref()
                                    .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
                            {
                                finish = Some(FinishReason::Length);
                            }
                            let logprob = choice.logprobs.map(|lp| token_logprob(&choice.text, lp));
                            Step::Text {
                                text: choice.text,
                                finish,
                                logprob,
                            }
                        }
                        other => Step::Failed(error_message(&other).unwrap_or_else(|| {
                            format!("unexpected engine response: {}", response_kind(&other))
                        })),
                    };
                    let last = !matches!(step, Step::Text { finish: None, .. });
                    // A closed consumer means the request is gone: dropping `rx` cancels it.
                    if step_tx.send(step).await.is_err() || last {
                        break;
                    }
                }
            });
            Ok(step_rx)
        }
        .boxed()
    }
}

fn response_kind(r: &Response) -> &'static str {
    match r {
        Response::Done(_) => "done",
        Response::Chunk(_) => "chat chunk",
        Response::CompletionDone(_) => "completion done",
        _ => "other",
    }
}

impl MistralBackend {
    /// Greedy-decodes `n` tokens and returns each step's `top` (token, natural-log
    /// probability) pairs, best first; the greedy token is the first.
    pub async fn greedy_logprobs(
        &self,
        prompt: Vec<u32>,
        n: usize,
        top: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>, EngineError> {
        let sampling = Sampling {
            max_tokens: n,
            temperature: 0.0,
            top_p: None,
            top_k: None,
            decoding: super::Decoding {
                logprobs: Some(top.max(1)),
                ..Default::default()
            },
        };
        let mut rx = self.start(prompt, sampling).await?;
        let mut steps = Vec::with_capacity(n);
        while let Some(step) = rx.recv().await {
            match step {
                Step::Text {
                    logprob, finish, ..
                } => {
                    let lp = logprob.ok_or_else(|| {
                        EngineError::Internal("no log-probabilities returned".into())
                    })?;
                    steps.push(lp.top.iter().map(|a| (a.id, a.logprob)).collect());
                    if finish.is_some() {
                        break;
                    }
                }
                Step::Failed(m) => return Err(EngineError::from_step_failure(m)),
            }
        }
        Ok(steps)
    }
}
