//! `GET /openapi.json`: an OpenAPI 3.1 description of every endpoint, written by hand so
//! it stays short and matches the wire types in `types`.

use axum::Json;
use serde_json::{Value, json};

fn json_body(schema: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

fn answers(ok: &str) -> Value {
    json!({
        "200": {"description": ok, "content": {
            "application/json": {},
            "text/event-stream": {"description": "with \"stream\": true — JSON events, then `data: [DONE]`"}}},
        "400": {"$ref": "#/components/responses/Error"}, "401": {"$ref": "#/components/responses/Error"},
        "413": {"$ref": "#/components/responses/Error"}, "422": {"$ref": "#/components/responses/Error"},
        "429": {"$ref": "#/components/responses/Error"}, "503": {"$ref": "#/components/responses/Error"},
        "504": {"$ref": "#/components/responses/Error"}
    })
}

/// `GET /openapi.json`
pub async fn openapi() -> Json<Value> {
    let stop = json!({"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 16}]});
    Json(json!({
        "openapi": "3.1.0",
        "info": {"title": "zopilot-gpu", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Mixtral-8x7B-Instruct (ISQ Q4K) on one GPU. Every endpoint but /health, /ping and /metrics needs `Authorization: Bearer <key>` when an API key is set."},
        "paths": {
            "/prompt": {"post": {"summary": "Generate for one prompt (chat template applied)", "requestBody": json_body("PromptRequest"), "responses": answers("PromptResponse")}},
            "/v1/chat/completions": {"post": {"summary": "OpenAI chat completions", "requestBody": json_body("ChatRequest"), "responses": answers("OpenAI chat.completion")}},
            "/v1/completions": {"post": {"summary": "OpenAI text completions (no chat template)", "requestBody": json_body("CompletionRequest"), "responses": answers("OpenAI text_completion")}},
            "/v1/models": {"get": {"summary": "The served model", "responses": {"200": {"description": "OpenAI model list"}}}},
            "/health": {"get": {"summary": "Liveness and readiness state", "responses": {"200": {"description": "{status, readiness, model, context_len, in_flight, max_num_seqs, version}"}}}},
            "/ping": {"get": {"summary": "RunPod load-balancer health", "responses": {
                "200": {"description": "ready"}, "204": {"description": "loading"}, "503": {"description": "loading failed, or shutting down"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition format"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}}
        },
        "components": {
            "responses": {"Error": {"description": "OpenAI-shaped error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]}, "code": {"type": "string"}}}}},
                "PromptRequest": {"type": "object", "required": ["prompt"], "properties": {
                    "prompt": {"type": "string"}, "system": {"type": "string"},
                    "max_tokens": {"type": "integer", "minimum": 1, "description": "default and maximum: the room left in the context"},
                    "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 1.0},
                    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                    "stop": stop, "stream": {"type": "boolean", "default": false}}},
                "PromptResponse": {"type": "object", "properties": {
                    "text": {"type": "string"}, "finish_reason": {"enum": ["stop", "length"]}, "model": {"type": "string"},
                    "usage": {"type": "object", "properties": {"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
                        "total_tokens": {"type": "integer"}, "ttft_ms": {"type": "number"}, "decode_tokens_per_second": {"type": "number"}}}}},
                "ChatRequest": {"type": "object", "required": ["messages"], "properties": {
                    "model": {"type": "string"},
                    "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role"], "properties": {
                        "role": {"enum": ["system", "user", "assistant"]},
                        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]}}}},
                    "max_tokens": {"type": "integer"}, "max_completion_tokens": {"type": "integer"},
                    "temperature": {"type": "number"}, "top_p": {"type": "number"}, "top_k": {"type": "integer"},
                    "stop": stop, "stream": {"type": "boolean"}, "n": {"const": 1},
                    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}}}},
                "CompletionRequest": {"type": "object", "required": ["prompt"], "properties": {
                    "model": {"type": "string"}, "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 1}]},
                    "max_tokens": {"type": "integer", "default": 16}, "temperature": {"type": "number"}, "top_p": {"type": "number"},
                    "top_k": {"type": "integer"}, "stop": stop, "stream": {"type": "boolean"}, "n": {"const": 1},
                    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}}}}
            }
        }
    }))
}
