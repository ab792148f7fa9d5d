//! `GET /openapi.json`: an OpenAPI 3.1 description of every endpoint, written by hand so
//! it stays short and matches the wire types in `types`. It states every rule the
//! validation enforces, so a schema-driven client or fuzzer never sends a request the schema
//! allows and the server refuses; the limits that depend on the loaded model (context,
//! vocabulary) are filled in from it.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::AppState;
use crate::engine::MAX_TOP_LOGPROBS;

fn json_body(schema: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

fn answers(ok: &str) -> Value {
    json!({
        "200": {"description": ok, "content": {
            "application/json": {},
            "text/event-stream": {"description": "with \"stream\": true — JSON events, then `data: [DONE]`"}}},
        "400": {"$ref": "#/components/responses/Error"}, "401": {"$ref": "#/components/responses/Error"},
        "404": {"$ref": "#/components/responses/Error"},
        "413": {"$ref": "#/components/responses/Error"}, "422": {"$ref": "#/components/responses/Error"},
        "429": {"$ref": "#/components/responses/Error"}, "503": {"$ref": "#/components/responses/Error"},
        "504": {"$ref": "#/components/responses/Error"}
    })
}

/// The limits a request is checked against, from the loaded model.
struct Limits {
    /// The longest text a schema admits per field, so that prompt tokens plus `max_tokens`
    /// always fit the context (a character is at most 4 byte tokens; two text fields, as
    /// `/prompt`'s `system` and `prompt`; 32 tokens for the template).
    text_chars: usize,
    max_tokens: usize,
    vocab: usize,
    /// The only `model` accepted (the served name).
    model: String,
}

impl Limits {
    fn of(s: &AppState) -> Self {
        let context = s.engine.context_len().max(64);
        // Half the context for the prompt, half for the answer; 32 tokens for the template.
        let half = context / 2;
        Self {
            text_chars: (half.saturating_sub(32) / 8).max(1),
            max_tokens: half,
            vocab: s.engine.vocab_size().unwrap_or(u32::MAX as usize),
            model: s.engine.model_name.clone(),
        }
    }
}

/// The request schemas, with `l`'s limits.
fn schemas(l: &Limits) -> Value {
    let text = json!({"type": "string", "maxLength": l.text_chars});
    let non_blank = json!({"type": "string", "minLength": 1, "maxLength": l.text_chars, "pattern": "\\S",
                           "description": "must hold a character other than white space"});
    let stop_string = json!({"type": "string", "minLength": 1, "maxLength": 64});
    let stop =
        json!({"oneOf": [stop_string, {"type": "array", "items": stop_string, "maxItems": 16}]});
    let max_tokens = json!({"type": "integer", "minimum": 1, "maximum": l.max_tokens,
        "description": "default: the room left in the context; prompt tokens + max_tokens must fit the context (--max-model-len)"});
    let token_id = json!({"type": "integer", "minimum": 0, "maximum": l.vocab.saturating_sub(1)});
    // Keys: token ids as decimal strings below the vocabulary size (a pattern can only say
    // "digits"; `maxLength` bounds the size when the vocabulary is under 10^k).
    let digits = l.vocab.saturating_sub(1).to_string().len();
    let logit_bias = json!({"type": "object", "maxProperties": 300,
        "propertyNames": {"pattern": format!("^(0|[1-9][0-9]{{0,{}}})$", digits.saturating_sub(2))},
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        "description": format!("token id → bias; ids below {}", l.vocab)});
    let response_format = json!({"oneOf": [
        {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type", "json_schema"], "properties": {
            "type": {"const": "json_schema"},
            "json_schema": {"type": "object", "required": ["schema"], "properties": {
                "name": {"type": "string"}, "strict": {"type": "boolean"},
                "schema": {"type": "object", "description": "a JSON Schema the answer is held to"}}}}}]});
    let penalty = json!({"type": "number", "minimum": -2, "maximum": 2});
    let decoding = json!({
        "seed": {"type": "integer", "minimum": i64::MIN, "maximum": i64::MAX},
        "presence_penalty": penalty, "frequency_penalty": penalty,
        "logit_bias": logit_bias, "response_format": response_format,
        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 1.0},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "stop": stop, "stream": {"type": "boolean", "default": false},
        "max_tokens": max_tokens,
    });
    let with = |extra: Value| {
        let mut p = decoding.clone();
        for (k, v) in extra.as_object().into_iter().flatten() {
            p[k] = v.clone();
        }
        p
    };
    let top_k = json!({"type": "integer", "minimum": 1});
    let stream_options =
        json!({"type": "object", "properties": {"include_usage": {"type": "boolean"}}});
    let model = json!({"const": l.model, "description": "the served model (GET /v1/models); may be left out"});
    let message = json!({"type": "object", "required": ["role"], "properties": {
        "role": {"const": "user"},
        "content": {"oneOf": [text, {"type": "array", "items": {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": text}}}]}},
        "description": "system, user or assistant; after an optional system message, roles alternate user/assistant starting with user (the chat template's rule)"});
    let messages = json!({"type": "array", "minItems": 1, "maxItems": 1, "items": message,
        "description": "the schema admits one user message, which always fits the context; the server takes whole conversations within the context and the template's rule"});
    json!({
        "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
            "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]}, "code": {"type": "string"}}}}},
        "PromptRequest": {"type": "object", "required": ["prompt"], "properties": with(json!({
            "prompt": non_blank, "system": text}))},
        "PromptResponse": {"type": "object", "properties": {
            "text": {"type": "string"}, "finish_reason": {"enum": ["stop", "length"]}, "model": {"type": "string"},
            "usage": {"type": "object", "properties": {"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
                "total_tokens": {"type": "integer"}, "ttft_ms": {"type": "number"}, "decode_tokens_per_second": {"type": "number"}}}}},
        "ChatRequest": {"type": "object", "required": ["messages"], "properties": with(json!({
            "model": model, "messages": messages,
            "max_completion_tokens": max_tokens, "top_k": top_k, "n": {"const": 1},
            "logprobs": {"type": "boolean"},
            "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS},
            "return_tokens_as_token_ids": {"type": "boolean", "description": "vLLM's: log-probability tokens as `token_id:<id>`"},
            "stream_options": stream_options})),
            "dependentSchemas": {"top_logprobs": {"required": ["logprobs"], "properties": {"logprobs": {"const": true}}}}},
        "CompletionRequest": {"type": "object", "required": ["prompt"], "properties": with(json!({
            "model": model,
            "prompt": {"oneOf": [{"type": "string", "minLength": 1, "maxLength": l.text_chars},
                                 {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": l.text_chars}, "minItems": 1, "maxItems": 1}]},
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": l.max_tokens, "default": 16},
            "top_k": top_k, "n": {"const": 1},
            "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS},
            "return_tokens_as_token_ids": {"type": "boolean", "description": "vLLM's: log-probability tokens as `token_id:<id>`"},
            "stream_options": stream_options}))},
        "TokenizeRequest": {"oneOf": [
            {"type": "object", "required": ["prompt"], "properties": {"model": model, "prompt": text,
                "add_special_tokens": {"const": true}}, "not": {"required": ["messages"]}},
            {"type": "object", "required": ["messages"], "properties": {"model": model, "messages": messages,
                "add_special_tokens": {"const": false}, "add_generation_prompt": {"const": true}}, "not": {"required": ["prompt"]}}]},
        "DetokenizeRequest": {"type": "object", "required": ["tokens"], "properties": {
            "model": model, "tokens": {"type": "array", "items": token_id, "maxItems": 4096}}}
    })
}

/// `GET /openapi.json`
pub async fn openapi(State(s): State<AppState>) -> Json<Value> {
    let limits = Limits::of(&s);
    Json(json!({
        "openapi": "3.1.0",
        "info": {"title": "zopilot-gpu", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Mixtral-8x7B-Instruct (ISQ Q4K) on one GPU. Every endpoint but /health, /ping and /metrics needs `Authorization: Bearer <key>` when an API key is set. A busy server queues requests (--max-queue, --max-queue-wait) and answers 429 with Retry-After past that."},
        "paths": {
            "/prompt": {"post": {"summary": "Generate for one prompt (chat template applied)", "requestBody": json_body("PromptRequest"), "responses": answers("PromptResponse")}},
            "/v1/chat/completions": {"post": {"summary": "OpenAI chat completions", "requestBody": json_body("ChatRequest"), "responses": answers("OpenAI chat.completion")}},
            "/v1/completions": {"post": {"summary": "OpenAI text completions (no chat template)", "requestBody": json_body("CompletionRequest"), "responses": answers("OpenAI text_completion")}},
            "/tokenize": {"post": {"summary": "Prompt token ids as generation sees them (vLLM's shape): {count, max_model_len, tokens}", "requestBody": json_body("TokenizeRequest"), "responses": answers("token ids")}},
            "/detokenize": {"post": {"summary": "The text of token ids: {prompt}", "requestBody": json_body("DetokenizeRequest"), "responses": answers("text")}},
            "/v1/models": {"get": {"summary": "The served model", "responses": {"200": {"description": "OpenAI model list"}}}},
            "/health": {"get": {"summary": "Liveness and readiness state", "responses": {"200": {"description": "{status, readiness, model, context_len, in_flight, queued, max_num_seqs, version, loading}; loading is {phase, percent, bytes_done, bytes_total, rate_bytes_per_second, eta_seconds} while the model loads, else null"}}}},
            "/ping": {"get": {"summary": "RunPod load-balancer health", "responses": {
                "200": {"description": "ready"}, "204": {"description": "loading"}, "503": {"description": "loading failed, or shutting down"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition format"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}}
        },
        "components": {
            "responses": {"Error": {"description": "OpenAI-shaped error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
            "schemas": schemas(&limits)
        }
    }))
}
