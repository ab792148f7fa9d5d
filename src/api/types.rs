//! Wire types of the HTTP API (also the RunPod job inputs) and their validation into the
//! engine's `GenRequest`: unvalidated input cannot reach the engine.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use crate::engine::{
    ChatMessage, Decoding, FinishReason, Format, GenRequest, MAX_TOP_LOGPROBS, Prompt, Usage,
};

/// Whole numbers as JSON Schema's `integer` admits them: `476` and `476.0` alike (serde's
/// integer types refuse the second, so a schema-driven client could be refused for a valid
/// request).
pub mod whole {
    use serde::Deserializer;
    use serde::de::{self, Visitor};

    struct Whole;

    impl Visitor<'_> for Whole {
        type Value = i128;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a whole number")
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i128, E> {
            Ok(v.into())
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i128, E> {
            Ok(v.into())
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<i128, E> {
            if v.fract() == 0.0 && v.abs() < 1.7e38 {
                Ok(v as i128)
            } else {
                Err(E::custom(format!("expected a whole number, got {v}")))
            }
        }
    }

    fn number<'de, D: Deserializer<'de>, T: TryFrom<i128>>(d: D) -> Result<T, D::Error> {
        let v = d.deserialize_any(Whole)?;
        T::try_from(v).map_err(|_| de::Error::custom(format!("{v} is out of range")))
    }

    /// An optional whole number that fits `T`.
    pub fn opt<'de, D: Deserializer<'de>, T: TryFrom<i128>>(d: D) -> Result<Option<T>, D::Error> {
        struct Opt<T>(std::marker::PhantomData<T>);
        impl<'de, T: TryFrom<i128>> Visitor<'de> for Opt<T> {
            type Value = Option<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a whole number or null")
            }
            fn visit_none<E: de::Error>(self) -> Result<Option<T>, E> {
                Ok(None)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Option<T>, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
                number(d).map(Some)
            }
        }
        d.deserialize_option(Opt(std::marker::PhantomData))
    }

    /// A list of whole numbers that fit `T`.
    pub fn list<'de, D: Deserializer<'de>, T: TryFrom<i128>>(d: D) -> Result<Vec<T>, D::Error> {
        struct Item<T>(T);
        impl<'de, T: TryFrom<i128>> serde::Deserialize<'de> for Item<T> {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                number(d).map(Item)
            }
        }
        let items: Vec<Item<T>> = serde::Deserialize::deserialize(d)?;
        Ok(items.into_iter().map(|i| i.0).collect())
    }
}

/// OpenAI's `response_format`.
#[derive(Debug, Clone, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub schema: Option<Value>,
    pub strict: Option<bool>,
}

/// Decoding controls every generation endpoint takes alike.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DecodingFields {
    /// Signed as OpenAI's; used as its 64-bit pattern.
    #[serde(default, deserialize_with = "whole::opt")]
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string, OpenAI's JSON) → bias.
    pub logit_bias: Option<BTreeMap<String, f32>>,
    pub response_format: Option<ResponseFormat>,
}

impl DecodingFields {
    fn into_decoding(self, logprobs: Option<usize>) -> Result<Decoding, ApiError> {
        let logit_bias = self
            .logit_bias
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| {
                k.trim().parse::<u32>().map(|id| (id, v)).map_err(|_| {
                    ApiError::bad(
                        "logit_bias",
                        format!("`logit_bias` keys must be token ids. Given: `{k}`"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let format = match self.response_format {
            None => None,
            Some(f) => match (f.kind.as_str(), f.json_schema) {
                ("text", _) => None,
                ("json_object", _) => Some(Format::JsonObject),
                (
                    "json_schema",
                    Some(JsonSchemaFormat {
                        schema: Some(schema),
                        ..
                    }),
                ) if schema.is_object() => Some(Format::JsonSchema(schema)),
                ("json_schema", _) => {
                    return Err(ApiError::bad(
                        "response_format",
                        "`response_format` of type `json_schema` needs `json_schema.schema`, a JSON Schema object",
                    ));
                }
                (other, _) => {
                    return Err(ApiError::bad(
                        "response_format",
                        format!(
                            "`response_format.type` must be text, json_object or json_schema. Given: `{other}`"
                        ),
                    ));
                }
            },
        };
        Ok(Decoding {
            seed: self.seed.map(|s| s as u64),
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias,
            logprobs,
            format,
        })
    }
}

/// Fields a request carried that this server does not use: accepted, as vLLM does, and
/// named in the log.
fn log_ignored(endpoint: &str, ignored: &BTreeMap<String, Value>) {
    if !ignored.is_empty() {
        let fields: Vec<&str> = ignored.keys().map(String::as_str).collect();
        tracing::info!(endpoint, ?fields, "request fields ignored");
    }
}

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
    #[serde(default, deserialize_with = "whole::opt")]
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    #[serde(flatten)]
    pub decoding: DecodingFields,
    #[serde(flatten)]
    pub ignored: BTreeMap<String, Value>,
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
        log_ignored("/prompt", &self.ignored);
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
            decoding: self.decoding.into_decoding(None)?,
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
    #[serde(default, deserialize_with = "whole::opt")]
    pub max_tokens: Option<usize>,
    #[serde(default, deserialize_with = "whole::opt")]
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    #[serde(default, deserialize_with = "whole::opt")]
    pub top_k: Option<usize>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default, deserialize_with = "whole::opt")]
    pub n: Option<usize>,
    /// Return each output token's log-probability.
    pub logprobs: Option<bool>,
    /// With `logprobs`, this many likeliest alternatives per token (0..=20).
    #[serde(default, deserialize_with = "whole::opt")]
    pub top_logprobs: Option<usize>,
    /// vLLM's switch: log-probability tokens written `token_id:<id>` instead of as text.
    #[serde(default)]
    pub return_tokens_as_token_ids: bool,
    #[serde(flatten)]
    pub decoding: DecodingFields,
    #[serde(flatten)]
    pub ignored: BTreeMap<String, Value>,
}

/// `POST /v1/completions`: `prompt` is a string or a one-element list.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: CompletionPrompt,
    #[serde(default, deserialize_with = "whole::opt")]
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    #[serde(default, deserialize_with = "whole::opt")]
    pub top_k: Option<usize>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default, deserialize_with = "whole::opt")]
    pub n: Option<usize>,
    /// Return each output token's log-probability and this many alternatives (0..=20).
    #[serde(default, deserialize_with = "whole::opt")]
    pub logprobs: Option<usize>,
    /// vLLM's switch: log-probability tokens written `token_id:<id>` instead of as text.
    #[serde(default)]
    pub return_tokens_as_token_ids: bool,
    #[serde(flatten)]
    pub decoding: DecodingFields,
    #[serde(flatten)]
    pub ignored: BTreeMap<String, Value>,
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

/// A conversation checked for the roles and content shapes the chat template takes.
pub fn chat_messages(messages: Vec<InMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad(
            "messages",
            "`messages` must hold at least one message",
        ));
    }
    messages
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
        .collect::<Result<Vec<_>, _>>()
}

fn check_top_logprobs(param: &str, n: usize) -> Result<(), ApiError> {
    if n > MAX_TOP_LOGPROBS {
        return Err(ApiError::bad(
            param,
            format!("`{param}` must be between 0 and {MAX_TOP_LOGPROBS}. Given: {n}"),
        ));
    }
    Ok(())
}

impl ChatRequest {
    pub fn validate(self) -> Result<GenRequest, ApiError> {
        log_ignored("/v1/chat/completions", &self.ignored);
        check_n(self.n)?;
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (false, Some(_)) => {
                return Err(ApiError::bad(
                    "top_logprobs",
                    "`top_logprobs` needs `logprobs: true`",
                ));
            }
            (false, None) => None,
            (true, n) => {
                let n = n.unwrap_or(0);
                check_top_logprobs("top_logprobs", n)?;
                Some(n)
            }
        };
        let messages = chat_messages(self.messages)?;
        Ok(GenRequest {
            prompt: Prompt::Chat(messages),
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature.unwrap_or(DEFAULT_TEMPERATURE),
            top_p: self.top_p,
            top_k: self.top_k,
            stop: Stop::into_vec(self.stop),
            decoding: self.decoding.into_decoding(logprobs)?,
        })
    }
}

impl CompletionRequest {
    pub fn validate(self) -> Result<GenRequest, ApiError> {
        log_ignored("/v1/completions", &self.ignored);
        check_n(self.n)?;
        if let Some(n) = self.logprobs {
            check_top_logprobs("logprobs", n)?;
        }
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
            decoding: self.decoding.into_decoding(self.logprobs)?,
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
pub(crate) mod whole_test {
    #[derive(serde::Deserialize)]
    pub struct Ids {
        #[serde(deserialize_with = "super::whole::list")]
        pub tokens: Vec<u32>,
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
    fn decoding_fields_reach_the_engine_and_unknown_fields_are_accepted() {
        let r = chat(
            r#"{"messages":[{"role":"user","content":"x"}],"seed":-1,"presence_penalty":0.5,
                "frequency_penalty":-0.5,"logit_bias":{"7":-100,"12":3.5},"logprobs":true,
                "top_logprobs":3,"response_format":{"type":"json_object"},"user":"u1","parallel_tool_calls":false}"#,
        )
        .unwrap();
        let d = r.decoding;
        assert_eq!(d.seed, Some(u64::MAX));
        assert_eq!(
            (d.presence_penalty, d.frequency_penalty),
            (Some(0.5), Some(-0.5))
        );
        assert_eq!(d.logit_bias, vec![(12, 3.5), (7, -100.0)]);
        assert_eq!(d.logprobs, Some(3));
        assert_eq!(d.format, Some(Format::JsonObject));
    }

    #[test]
    fn bad_decoding_fields_name_the_field() {
        let e = chat(r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"a":1}}"#)
            .unwrap_err();
        assert_eq!(e.body()["error"]["param"], "logit_bias");
        let e =
            chat(r#"{"messages":[{"role":"user","content":"x"}],"top_logprobs":2}"#).unwrap_err();
        assert_eq!(e.body()["error"]["param"], "top_logprobs");
        let e = chat(
            r#"{"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":21}"#,
        )
        .unwrap_err();
        assert!(
            e.body()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("21")
        );
        let e = chat(r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema"}}"#)
            .unwrap_err();
        assert_eq!(e.body()["error"]["param"], "response_format");
        let e = chat(
            r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"yaml"}}"#,
        )
        .unwrap_err();
        assert!(
            e.body()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("yaml")
        );
    }

    #[test]
    fn whole_numbers_may_be_written_as_floats() {
        let r = chat(r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":7.0,"top_k":3,"seed":-2.0}"#)
            .unwrap();
        assert_eq!(
            (r.max_tokens, r.top_k, r.decoding.seed),
            (Some(7), Some(3), Some(-2i64 as u64))
        );
        for bad in [
            r#""max_tokens":7.5"#,
            r#""max_tokens":-1"#,
            r#""top_k":"3""#,
        ] {
            let json = format!(r#"{{"messages":[{{"role":"user","content":"x"}}],{bad}}}"#);
            assert!(serde_json::from_str::<ChatRequest>(&json).is_err(), "{bad}");
        }
        let d: crate::api::types::whole_test::Ids =
            serde_json::from_str(r#"{"tokens":[1,2.0]}"#).unwrap();
        assert_eq!(d.tokens, vec![1, 2]);
    }

    #[test]
    fn completions_default_to_sixteen_tokens() {
        let r: CompletionRequest = serde_json::from_str(r#"{"prompt":["hi"]}"#).unwrap();
        assert_eq!(r.validate().unwrap().max_tokens, Some(16));
    }
}
