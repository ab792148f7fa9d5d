//! `POST /prompt`: the API of the appliance this one replaces. The chat template is
//! applied to `system` + `prompt`; the answer is `{text, finish_reason, usage, model}`.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::respond::{collect, sse};
use super::types::{PromptRequest, PromptResponse};
use super::{ApiError, AppState, error::ApiJson};
use crate::engine::Event;

/// `POST /prompt`; with `"stream": true`, SSE events `{"text"}` then a final one with
/// `finish_reason` and `usage`, then `[DONE]`.
pub async fn prompt(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<PromptRequest>,
) -> Result<Response, ApiError> {
    let stream = req.stream;
    let g = s.engine.generate(req.validate()?).await?;
    let model = s.engine.model_name.clone();
    if stream {
        return Ok(sse(g, move |ev| match ev {
            Event::Text { text, .. } => vec![json!({"text": text})],
            Event::Done {
                finish_reason,
                usage,
            } => {
                vec![
                    json!({"text": "", "finish_reason": finish_reason, "usage": usage, "model": model}),
                ]
            }
            Event::Error(_) => vec![],
        }));
    }
    let done = collect(g).await?;
    Ok(Json(PromptResponse {
        text: done.text,
        finish_reason: done.finish_reason,
        usage: done.usage,
        model,
    })
    .into_response())
}
