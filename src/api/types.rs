//! Wire types of the HTTP API (also the RunPod job inputs) and their validation into the
//! engine's `GenRequest`: unvalidated input cannot reach the engine.

use serde::{Deserialize, Serialize};

use super::error::ApiError;
use crate::engine::{ChatMessage, FinishReason, GenRequest, Prompt, Usage};

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(s: Option<Stop>) -> Vec<String> {
        match s {
            None => vec![],
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        }
    }
}

/// `POST /prompt`: the API of the appliance this one replaces.
#[derive(Debug, Clone, Deserialize)]
pub struct PromptRequest {
    pub prompt: String,
    pub system: Option<String>,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
}

/// `POST /prompt` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptResponse {
    pub text: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub model: String,
}

impl PromptRequest {
    pub fn validate(self) -> Result<GenRequest, ApiError> {
        if self.prompt.trim().is_empty() {
            return Err(ApiError::bad("prompt", "`prompt` must not be empty"));
        }
        let mut messages = Vec::new();
        if let Some(system) = self.system.filter(|s| !s.is_empty()) {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system,
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: self.prompt,
        });
        Ok(GenRequest {
            prompt: Prompt::Chat(messages),
            max_tokens: self.max_tokens,
            temperature: self.temperature.unwrap_or(DEFAULT_TEMPERATURE),
            top_p: self.top_p,
            top_k: None,
            stop: Stop::into_vec(self.stop),
        })
    }
}

/// OpenAI's default sampling temperature.
pub const DEFAULT_TEMPERATURE: f64 = 1.0;
/// OpenAI's (and vLLM's) default `max_tokens` for `/v1/completions`.
pub const DEFAULT_COMPLETION_TOKENS: usize = 16;

/// Message content: a string or OpenAI's list of typed parts (text only here).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InMessage {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<InMessage>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<usize>,
}

/// `POST /v1/completions`: `prompt` is a string or a one-element list.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: CompletionPrompt,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CompletionPrompt {
    One(String),
    Many(Vec<String>),
}

fn check_n(n: Option<usize>) -> Result<(), ApiError> {
    match n {
        None | Some(1) => Ok(()),
        Some(n) => Err(ApiError::bad(
            "n",
            format!("`n` must be 1 (one choice per request). Given: {n}"),
        )),
    }
}

/// Checks the `model` field against the served name (absent is accepted).
pub fn check_model(asked: Option<&str>, served: &str) -> Result<(), ApiError> {
    match asked {
        Some(m) if !m.is_empty() && m != served => Err(ApiError::ModelNotFound(m.to_owned())),
        _ => Ok(()),
    }
}

fn message_text(i: usize, content: Option<Content>) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t),
        Some(Content::Parts(parts)) => parts
            .into_iter()
            .map(|p| match (p.kind.as_str(), p.text) {
                ("text", Some(t)) => Ok(t),
                (kind, _) => Err(ApiError::bad(
                    &format!("messages[{i}].content"),
                    format!("only text content parts are supported. Given: `{kind}`"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.join("")),
    }
}

impl ChatRequest {
    pub fn validate(self) -> Result<GenRequest, ApiError> {
        check_n(self.n)?;
        if self.messages.is_empty() {
            return Err(ApiError::bad(
                "messages",
                "`messages` must hold at least one message",
            ));
        }
        let messages = self
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                    return Err(ApiError::bad(
                        &format!("messages[{i}].role"),
                        format!(
                            "`role` must be system, user or assistant. Given: `{}`",
                            m.role
                        ),
                    ));
                }
                Ok(ChatMessage {
                    role: m.role,
                    content: message_text(i, m.content)?,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(GenRequest {
            prompt: Prompt::Chat(messages),
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature.unwrap_or(DEFAULT_TEMPERATURE),
            top_p: self.top_p,
            top_k: self.top_k,
            stop: Stop::into_vec(self.stop),
        })
    }
}

impl CompletionRequest {
    pub fn validate(self) -> Result<GenRequest, ApiError> {
        check_n(self.n)?;
        let text = match self.prompt {
            CompletionPrompt::One(t) => t,
            CompletionPrompt::Many(mut v) if v.len() == 1 => v.remove(0),
            CompletionPrompt::Many(v) => {
                return Err(ApiError::bad(
                    "prompt",
                    format!(
                        "`prompt` must be one string (batches are not supported). Given: {} prompts",
                        v.len()
                    ),
                ));
            }
        };
        if text.is_empty() {
            return Err(ApiError::bad("prompt", "`prompt` must not be empty"));
        }
        Ok(GenRequest {
            prompt: Prompt::Text(text),
            max_tokens: Some(self.max_tokens.unwrap_or(DEFAULT_COMPLETION_TOKENS)),
            temperature: self.temperature.unwrap_or(DEFAULT_TEMPERATURE),
            top_p: self.top_p,
            top_k: self.top_k,
            stop: Stop::into_vec(self.stop),
        })
    }
}

/// OpenAI's usage object.
#[derive(Debug, Clone, Serialize)]
pub struct OpenAiUsage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl From<&Usage> for OpenAiUsage {
    fn from(u: &Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(json: &str) -> Result<GenRequest, ApiError> {
        serde_json::from_str::<ChatRequest>(json)
            .unwrap()
            .validate()
    }

    #[test]
    fn chat_accepts_text_parts_and_rejects_images() {
        let r = chat(r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#).unwrap();
        match r.prompt {
            Prompt::Chat(m) => assert_eq!(m[0].content, "ab"),
            _ => panic!(),
        }
        let e =
            chat(r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#).unwrap_err();
        assert!(e.body().to_string().contains("image_url"));
    }

    #[test]
    fn chat_rejects_n_and_unknown_roles() {
        assert!(chat(r#"{"messages":[{"role":"user","content":"x"}],"n":2}"#).is_err());
        let e = chat(r#"{"messages":[{"role":"tool","content":"x"}]}"#).unwrap_err();
        assert!(e.body()["error"]["param"] == "messages[0].role");
    }

    #[test]
    fn max_completion_tokens_wins_over_max_tokens() {
        let r = chat(r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":5,"max_completion_tokens":7}"#).unwrap();
        assert_eq!(r.max_tokens, Some(7));
    }

    #[test]
    fn completions_default_to_sixteen_tokens() {
        let r: CompletionRequest = serde_json::from_str(r#"{"prompt":["hi"]}"#).unwrap();
        assert_eq!(r.validate().unwrap().max_tokens, Some(16));
    }
}
