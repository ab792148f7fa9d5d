//! OpenAI-compatible endpoints: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.
//! The official `openai` client works against them unchanged.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::respond::{collect, sse, unix_now};
use super::types::{ChatRequest, CompletionRequest, OpenAiUsage, check_model};
use super::{ApiError, AppState, error::ApiJson};
use crate::engine::Event;

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
    let g = s.engine.generate(req.validate()?).await?;
    let (id, model, created) = (
        format!("chatcmpl-{}", g.id),
        s.engine.model_name.clone(),
        unix_now(),
    );
    let chunk = chunker(id, "chat.completion.chunk", created, model);
    if stream {
        let mut first = true;
        return Ok(sse(g, move |ev| match ev {
            Event::Text(t) => {
                let delta = if std::mem::take(&mut first) {
                    json!({"role": "assistant", "content": t})
                } else {
                    json!({"content": t})
                };
                vec![chunk(
                    json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}]),
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
                     "logprobs": null, "finish_reason": done.finish_reason}],
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
    let g = s.engine.generate(req.validate()?).await?;
    let (id, model, created) = (
        format!("cmpl-{}", g.id),
        s.engine.model_name.clone(),
        unix_now(),
    );
    let chunk = chunker(id, "text_completion", created, model);
    if stream {
        return Ok(sse(g, move |ev| match ev {
            Event::Text(t) => vec![chunk(
                json!([{"index": 0, "text": t, "logprobs": null, "finish_reason": null}]),
                None,
            )],
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
    Ok(Json(chunk(
        json!([{"index": 0, "text": done.text, "logprobs": null, "finish_reason": done.finish_reason}]),
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
