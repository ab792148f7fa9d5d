//! `POST /tokenize` and `POST /detokenize`, shaped as vLLM's: the ids a prompt becomes,
//! exactly as generation sees it (a chat through the model's template, which writes BOS;
//! raw text with BOS added), and the text of ids.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::types::{InMessage, chat_messages, check_model};
use super::{ApiError, AppState, error::ApiJson};
use crate::engine::Prompt;

/// `POST /tokenize`: `prompt` (raw text, as `/v1/completions`) or `messages` (a chat, as
/// `/v1/chat/completions`).
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<InMessage>>,
    pub add_special_tokens: Option<bool>,
    pub add_generation_prompt: Option<bool>,
}

/// `POST /detokenize`.
#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    #[serde(deserialize_with = "super::types::whole::list")]
    pub tokens: Vec<u32>,
}

impl TokenizeRequest {
    /// The prompt, refusing the vLLM switches that would give other ids than generation.
    fn prompt(self) -> Result<Prompt, ApiError> {
        let only = |param: &str, given: Option<bool>, generation: bool| match given {
            Some(v) if v != generation => Err(ApiError::bad(
                param,
                format!(
                    "`{param}` can only be {generation} here, as generation tokenizes so. Given: {v}"
                ),
            )),
            _ => Ok(()),
        };
        match (self.prompt, self.messages) {
            (Some(text), None) => {
                only("add_special_tokens", self.add_special_tokens, true)?;
                Ok(Prompt::Text(text))
            }
            (None, Some(messages)) => {
                only("add_special_tokens", self.add_special_tokens, false)?;
                only("add_generation_prompt", self.add_generation_prompt, true)?;
                Ok(Prompt::Chat(chat_messages(messages)?))
            }
            _ => Err(ApiError::bad(
                "prompt",
                "give exactly one of `prompt` (text) and `messages` (a chat)",
            )),
        }
    }
}

/// `POST /tokenize` → `{"count", "max_model_len", "tokens"}`.
pub async fn tokenize(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    check_model(req.model.as_deref(), &s.engine.model_name)?;
    let ids = s.engine.tokenize(req.prompt()?).await?;
    Ok(Json(json!({
        "count": ids.len(),
        "max_model_len": s.engine.context_len(),
        "tokens": ids,
    })))
}

/// `POST /detokenize` → `{"prompt"}`.
pub async fn detokenize(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<DetokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    check_model(req.model.as_deref(), &s.engine.model_name)?;
    let text = s.engine.detokenize(req.tokens).await?;
    Ok(Json(json!({"prompt": text})))
}
