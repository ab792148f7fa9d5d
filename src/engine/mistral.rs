//! The mistral.rs backend: the only module that imports mistralrs. Loads the model with
//! ISQ (paged attention on CUDA), tokenizes with the model's chat template, and runs each
//! request as an internally streamed sequence so that dropping its receiver cancels it.

use std::sync::Arc;

use either::Either;
use futures::FutureExt;
use futures::future::BoxFuture;
use indexmap::IndexMap;
use mistralrs::{
    AutoDeviceMapParams, Constraint, DeviceMapSetting, IsqType, MemoryGpuConfig, Model, ModelDType,
    NormalRequest, PagedAttentionMetaBuilder, Request, RequestMessage, Response, SamplingParams,
    TextModelBuilder, TokenSource,
};
use tokio::sync::mpsc;

use super::{Backend, EngineError, FinishReason, Prompt, Sampling, Step};
use crate::settings::{Isq, ModelSettings, ModelSource};

/// A loaded mistral.rs model.
pub struct MistralBackend {
    model: Arc<Model>,
    context_len: usize,
    /// Keeps a synthetic model's directory alive for as long as the model is served.
    _synthetic_dir: Option<tempfile::TempDir>,
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
        ModelSource::Synthetic(preset) => {
            let dir = tempfile::Builder::new()
                .prefix("zopilot-synthetic-")
                .tempdir()?;
            crate::synth::write(*preset, None, 0, dir.path())?;
            (dir.path().display().to_string(), Some(dir))
        }
    })
}

impl MistralBackend {
    /// Loads (and, for Hub ids, downloads) the model. Blocking work runs off the runtime.
    pub async fn load(s: &ModelSettings) -> anyhow::Result<Self> {
        let (model_id, synthetic_dir) = resolve_model(&s.source)?;
        let context_hint = s
            .max_model_len
            .unwrap_or(crate::settings::DEFAULT_MAX_MODEL_LEN);
        let mut builder = TextModelBuilder::new(&model_id)
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
        if let Some(isq) = s.isq {
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
        let model = tokio::task::spawn_blocking(move || handle.block_on(builder.build()))
            .await
            .map_err(|e| anyhow::anyhow!("model loading panicked: {e}"))??;
        let model_max = model.max_sequence_length()?.unwrap_or(context_hint);
        Ok(Self {
            model: Arc::new(model),
            context_len: model_max,
            _synthetic_dir: synthetic_dir,
        })
    }
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
) -> Request {
    Request::Normal(Box::new(NormalRequest {
        messages: RequestMessage::CompletionTokens(prompt),
        sampling_params: sampling,
        response: tx,
        return_logprobs: logprobs,
        is_streaming: true,
        id: 0,
        constraint: Constraint::None,
        suffix: None,
        tools: None,
        tool_choice: None,
        logits_processors: None,
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

    fn tokenize(&self, prompt: Prompt) -> BoxFuture<'static, Result<Vec<u32>, EngineError>> {
        if let Prompt::Tokens(ids) = prompt {
            return futures::future::ready(Ok(ids)).boxed();
        }
        let model = self.model.clone();
        // Run to completion on its own task: mistral.rs panics its engine thread if the
        // receiver of a tokenization is dropped, as a handler is when its client leaves.
        let task = tokio::spawn(async move {
            let (tx, mut rx) = mpsc::channel(1);
            let text = match prompt {
                Prompt::Chat(m) => Either::Left(to_mistral_messages(m)),
                Prompt::Text(t) => Either::Right(t),
                Prompt::Tokens(_) => unreachable!("token prompts return early"),
            };
            let is_chat = text.is_left();
            let request = Request::Tokenize(mistralrs::core::TokenizationRequest {
                text,
                tools: None,
                add_generation_prompt: true,
                add_special_tokens: true,
                enable_thinking: None,
                reasoning_effort: None,
                response: tx,
            });
            send(&model, request).await?;
            match rx.recv().await {
                Some(Ok(ids)) if ids.is_empty() => Err(EngineError::Invalid {
                    param: if is_chat { "messages" } else { "prompt" },
                    message: "the prompt is empty".into(),
                }),
                Some(Ok(ids)) => Ok(ids),
                // Template errors (wrong role order, unknown role) are the client's.
                Some(Err(e)) => Err(EngineError::Invalid {
                    param: if is_chat { "messages" } else { "prompt" },
                    message: format!("{e:#}"),
                }),
                None => Err(EngineError::Internal(
                    "the engine dropped a tokenization".into(),
                )),
            }
        });
        async move {
            task.await
                .map_err(|e| EngineError::Internal(e.to_string()))?
        }
        .boxed()
    }

    fn start(
        &self,
        prompt: Vec<u32>,
        s: Sampling,
    ) -> BoxFuture<'static, Result<mpsc::Receiver<Step>, EngineError>> {
        let model = self.model.clone();
        async move {
            let (tx, mut rx) = mpsc::channel::<Response>(64);
            let mut sampling = SamplingParams::neutral();
            sampling.temperature = Some(s.temperature);
            sampling.top_p = s.top_p;
            sampling.top_k = s.top_k;
            sampling.max_len = Some(s.max_tokens);
            send(&model, completion_request(prompt, sampling, tx, false)).await?;
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
                            let finish = choice.finish_reason.as_deref().map(finish_of);
                            Step::Text {
                                text: choice.text,
                                finish,
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
    /// Greedy-decodes `n` tokens, one request per step, and returns each step's `top`
    /// (token, natural-log probability) pairs, best first; the greedy token is the first.
    /// One step per request because mistral.rs 0.8.1 reports log-probabilities only where it
    /// samples: its argmax path takes log10 of raw logits, and with top-k = 1 the runner-up
    /// is zeroed first. At temperature 1 the reported top list is the model's softmax
    /// distribution; the token it then samples is ignored and the argmax appended instead.
    pub async fn greedy_logprobs(
        &self,
        prompt: Vec<u32>,
        n: usize,
        top: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>, EngineError> {
        let mut context = prompt;
        let mut steps = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, mut rx) = mpsc::channel::<Response>(64);
            let mut sampling = SamplingParams::neutral();
            sampling.max_len = Some(1);
            sampling.temperature = Some(1.0);
            sampling.top_n_logprobs = top.max(1);
            send(
                &self.model,
                completion_request(context.clone(), sampling, tx, true),
            )
            .await?;
            let mut step = None;
            while let Some(resp) = rx.recv().await {
                match resp {
                    Response::CompletionChunk(c) => {
                        let Some(choice) = c.choices.into_iter().next() else {
                            continue;
                        };
                        if let Some(lp) = choice.logprobs {
                            // log10 → nats; -inf (ruled out) has no JSON form, -1e30 compares the same.
                            step = Some(
                                lp.top_logprobs
                                    .iter()
                                    .map(|t| {
                                        let nats = t.logprob * std::f32::consts::LN_10;
                                        (t.token, if nats.is_finite() { nats } else { -1e30 })
                                    })
                                    .collect::<Vec<_>>(),
                            );
                        }
                        if choice.finish_reason.is_some() {
                            break;
                        }
                    }
                    other => {
                        if let Some(m) = error_message(&other) {
                            return Err(EngineError::Internal(m));
                        }
                    }
                }
            }
            let step =
                step.ok_or_else(|| EngineError::Internal("no log-probabilities returned".into()))?;
            let best = step
                .first()
                .map(|&(id, _)| id)
                .ok_or_else(|| EngineError::Internal("empty log-probabilities".into()))?;
            context.push(best);
            steps.push(step);
        }
        Ok(steps)
    }
}
