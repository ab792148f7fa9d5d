//! OpenAI-compatible endpoints: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.
//! The official `openai` client works against them unchanged.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::respond::{collect, sse, unix_now};
use super::types::{ChatRequest, CompletionRequest, OpenAiUsage, check_model};
use super::{ApiError, AppState, error::ApiJson};
use crate::engine::{Event, TokenLogprob};

/// What the client asked to see of each token's log-probabilities.
#[derive(Clone, Copy)]
struct Show {
    logprobs: bool,
    /// vLLM's `return_tokens_as_token_ids`.
    ids: bool,
}

impl Show {
    fn token(self, id: u32, text: &str) -> String {
        if self.ids {
            format!("token_id:{id}")
        } else {
            text.to_owned()
        }
    }
}

/// Starts a validated request, noting what the client asked to see of log-probabilities.
async fn start(
    s: &AppState,
    req: crate::engine::GenRequest,
    ids: bool,
) -> Result<(crate::engine::Generation, Show), ApiError> {
    let show = Show {
        logprobs: req.decoding.logprobs.is_some(),
        ids,
    };
    Ok((s.engine.generate(req).await?, show))
}

/// Chat's `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
fn chat_logprobs(show: Show, tokens: &[TokenLogprob]) -> Value {
    if !show.logprobs {
        return Value::Null;
    }
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let top: Vec<Value> = t
                .top
                .iter()
                .map(|a| json!({"token": show.token(a.id, &a.token), "logprob": a.logprob, "bytes": a.token.as_bytes()}))
                .collect();
            json!({"token": show.token(t.id, &t.token), "logprob": t.logprob, "bytes": t.token.as_bytes(), "top_logprobs": top})
        })
        .collect();
    json!({"content": content})
}

/// Completions' `logprobs` object: parallel lists of tokens, their log-probabilities, the
/// alternatives (token → log-probability) and each token's offset in the whole text, which
/// starts at `offset` for this piece.
fn completion_logprobs(show: Show, tokens: &[TokenLogprob], offset: &mut usize) -> Value {
    if !show.logprobs {
        return Value::Null;
    }
    let mut offsets = Vec::with_capacity(tokens.len());
    for t in tokens {
        offsets.push(*offset);
        *offset += t.token.len();
    }
    let top: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let m: serde_json::Map<String, Value> = t
                .top
                .iter()
                .map(|a| (show.token(a.id, &a.token), json!(a.logprob)))
                .collect();
            Value::Object(m)
        })
        .collect();
    json!({
        "tokens": tokens.iter().map(|t| show.token(t.id, &t.token)).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": offsets,
    })
}

/// Builds the OpenAI objects of one response: `choices` and an optional `usage` wrapped in
/// the id, object type, creation time and model they all share.
fn chunker(
    id: String,
    object: &'static str,
    created: u64,
    model: String,
) -> impl Fn(Value, Option<Value>) -> Value + Send + 'static {
    move |choices, usage| {
        let mut c = json!({"id": id, "object": object, "created": created, "model": model, "choices": choices});
        if let Some(u) = usage {
            c["usage"] = u;
        }
        c
    }
}

/// `POST /v1/chat/completions`
pub async fn chat(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    check_model(req.model.as_deref(), &s.engine.model_name)?;
    let (stream, usage_chunk) = (
        req.stream,
        req.stream_options.as_ref().is_some_and(|o| o.include_usage),
    );
    let ids = req.return_tokens_as_token_ids;
    let (g, asked) = start(&s, req.validate()?, ids).await?;
    let (id, model, created) = (
        format!("chatcmpl-{}", g.id),
        s.engine.model_name.clone(),
        unix_now(),
    );
    let chunk = chunker(id, "chat.completion.chunk", created, model);
    if stream {
        let mut first = true;
        return Ok(sse(g, move |ev| match ev {
            Event::Text { text, logprobs } => {
                let delta = if std::mem::take(&mut first) {
                    json!({"role": "assistant", "content": text})
                } else {
                    json!({"content": text})
                };
                let lp = chat_logprobs(asked, &logprobs);
                vec![chunk(
                    json!([{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": null}]),
                    None,
                )]
            }
            Event::Done {
                finish_reason,
                usage,
            } => {
                let delta = if first {
                    json!({"role": "assistant", "content": ""})
                } else {
                    json!({})
                };
                let mut out = vec![chunk(
                    json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}]),
                    None,
                )];
                if usage_chunk {
                    out.push(chunk(json!([]), Some(json!(OpenAiUsage::from(&usage)))));
                }
                out
            }
            Event::Error(_) => vec![],
        }));
    }
    let done = collect(g).await?;
    Ok(Json(json!({
        "id": format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        "object": "chat.completion",
        "created": created,
        "model": s.engine.model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                     "logprobs": chat_logprobs(asked, &done.logprobs), "finish_reason": done.finish_reason}],
        "usage": OpenAiUsage::from(&done.usage),
    }))
    .into_response())
}

/// `POST /v1/completions`
pub async fn completions(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    check_model(req.model.as_deref(), &s.engine.model_name)?;
    let (stream, usage_chunk) = (
        req.stream,
        req.stream_options.as_ref().is_some_and(|o| o.include_usage),
    );
    let ids = req.return_tokens_as_token_ids;
    let (g, asked) = start(&s, req.validate()?, ids).await?;
    let (id, model, created) = (
        format!("cmpl-{}", g.id),
        s.engine.model_name.clone(),
        unix_now(),
    );
    let chunk = chunker(id, "text_completion", created, model);
    if stream {
        let mut offset = 0;
        return Ok(sse(g, move |ev| match ev {
            Event::Text { text, logprobs } => {
                let lp = completion_logprobs(asked, &logprobs, &mut offset);
                vec![chunk(
                    json!([{"index": 0, "text": text, "logprobs": lp, "finish_reason": null}]),
                    None,
                )]
            }
            Event::Done {
                finish_reason,
                usage,
            } => {
                let mut out = vec![chunk(
                    json!([{"index": 0, "text": "", "logprobs": null, "finish_reason": finish_reason}]),
                    None,
                )];
                if usage_chunk {
                    out.push(chunk(json!([]), Some(json!(OpenAiUsage::from(&usage)))));
                }
                out
            }
            Event::Error(_) => vec![],
        }));
    }
    let done = collect(g).await?;
    let lp = completion_logprobs(asked, &done.logprobs, &mut 0);
    Ok(Json(chunk(
        json!([{"index": 0, "text": done.text, "logprobs": lp, "finish_reason": done.finish_reason}]),
        Some(json!(OpenAiUsage::from(&done.usage))),
    ))
    .into_response())
}

/// `GET /v1/models`
pub async fn models(State(s): State<AppState>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": s.engine.model_name, "object": "model", "created": unix_now(), "owned_by": "zopilot-gpu",
        "max_model_len": s.engine.context_len(),
    }]}))
}
