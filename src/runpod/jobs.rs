//! What a job asks for and how it is answered. Every job is routed through the API's own
//! router in-process (no server, no socket), so validation, messages and OpenAI shapes are
//! exactly the HTTP API's; this file only translates job inputs in and outputs out.
//!
//! Inputs: the appliance's `{"prompt", "system"?, ...}` (as `POST /prompt`); worker-vllm's
//! `{"prompt" | "messages", "sampling_params", "stream"}`; and
//! `{"openai_route", "openai_input"}`.

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tower::ServiceExt;

/// How the answer is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `POST /prompt`'s own JSON.
    Native,
    /// worker-vllm's `[{"choices": [{"tokens": [...]}], "usage": {"input", "output"}}]`.
    Vllm,
    /// Exactly the OpenAI endpoint's body; stream partials are its SSE lines.
    OpenAi,
}

/// A job translated into an API call.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: Method,
    pub path: String,
    pub body: Value,
    pub stream: bool,
    pub shape: Shape,
}

/// Translates a job's `input`; the error text is the job's answer.
pub fn parse(input: &Value) -> Result<Call, String> {
    if !input.is_object() {
        return Err("the job input must be a JSON object".into());
    }
    if let Some(route) = input.get("openai_route") {
        let route = route.as_str().unwrap_or_default();
        let (method, path) = match route {
            "/v1/chat/completions" | "/v1/completions" => (Method::POST, route),
            "/v1/models" => (Method::GET, route),
            other => {
                return Err(format!(
                    "`openai_route` must be /v1/chat/completions, /v1/completions or /v1/models. Given: `{other}`"
                ));
            }
        };
        let body = input
            .get("openai_input")
            .cloned()
            .unwrap_or_else(|| json!({}));
        let stream = body["stream"].as_bool().unwrap_or(false);
        return Ok(Call {
            method,
            path: path.into(),
            body,
            stream,
            shape: Shape::OpenAi,
        });
    }
    let stream = input["stream"].as_bool().unwrap_or(false);
    if input.get("sampling_params").is_some() || input.get("messages").is_some() {
        let sp = input
            .get("sampling_params")
            .cloned()
            .unwrap_or_else(|| json!({}));
        let mut body = json!({"stream": stream});
        for key in [
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "stop",
            "n",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
        ] {
            if let Some(v) = sp.get(key) {
                body[key] = v.clone();
            }
        }
        // vLLM's `logprobs` is a count of alternatives; OpenAI's chat splits it in two.
        let logprobs = sp.get("logprobs").filter(|v| !v.is_null()).cloned();
        let path = if let Some(m) = input.get("messages") {
            body["messages"] = m.clone();
            if let Some(n) = logprobs {
                body["logprobs"] = json!(true);
                body["top_logprobs"] = n;
            }
            "/v1/chat/completions"
        } else if let Some(p) = input.get("prompt") {
            body["prompt"] = p.clone();
            if let Some(n) = logprobs {
                body["logprobs"] = n;
            }
            "/v1/completions"
        } else {
            return Err("worker-vllm input needs `messages` or `prompt`".into());
        };
        if stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        return Ok(Call {
            method: Method::POST,
            path: path.into(),
            body,
            stream,
            shape: Shape::Vllm,
        });
    }
    if input.get("prompt").is_some() {
        return Ok(Call {
            method: Method::POST,
            path: "/prompt".into(),
            body: input.clone(),
            stream,
            shape: Shape::Native,
        });
    }
    Err("the job input needs `prompt` (this appliance's API), `messages`/`sampling_params` (worker-vllm) or `openai_route`".into())
}

/// The error message inside an API error body.
fn error_message(body: &Value) -> String {
    body["error"]["message"]
        .as_str()
        .map_or_else(|| body.to_string(), str::to_owned)
}

fn vllm_usage(u: &Value) -> Value {
    json!({"input": u["prompt_tokens"], "output": u["completion_tokens"]})
}

/// Reshapes a complete answer.
fn shape_output(shape: Shape, body: Value) -> Value {
    match shape {
        Shape::Native | Shape::OpenAi => body,
        Shape::Vllm => {
            let choice = &body["choices"][0];
            let text = choice["message"]["content"]
                .as_str()
                .or(choice["text"].as_str())
                .unwrap_or_default();
            json!([{"choices": [{"tokens": [text]}], "usage": vllm_usage(&body["usage"])}])
        }
    }
}

/// Reshapes one SSE payload into a stream partial (None: nothing to send).
fn shape_partial(shape: Shape, data: &str) -> Result<Option<Value>, String> {
    if data == "[DONE]" {
        return Ok((shape == Shape::OpenAi).then(|| Value::String("data: [DONE]\n\n".into())));
    }
    let v: Value = serde_json::from_str(data).map_err(|e| format!("bad stream event: {e}"))?;
    if v.get("error").is_some() {
        return Err(error_message(&v));
    }
    Ok(match shape {
        Shape::OpenAi => Some(Value::String(format!("data: {data}\n\n"))),
        Shape::Native => Some(v),
        Shape::Vllm => {
            let choice = &v["choices"][0];
            let text = choice["delta"]["content"]
                .as_str()
                .or(choice["text"].as_str());
            match (text, v.get("usage").filter(|u| !u.is_null())) {
                (Some(t), _) if !t.is_empty() => Some(json!({"choices": [{"tokens": [t]}]})),
                (_, Some(u)) => Some(json!({"choices": [{"tokens": []}], "usage": vllm_usage(u)})),
                _ => None,
            }
        }
    })
}

/// Runs a call through the router. Stream partials go to `partials` in order; the result
/// is the complete output (non-streaming) or `Value::Null` (streaming).
pub async fn execute(
    router: Router,
    call: Call,
    partials: Option<mpsc::Sender<Value>>,
) -> Result<Value, String> {
    let body = if call.method == Method::GET {
        Body::empty()
    } else {
        Body::from(call.body.to_string())
    };
    let req = Request::builder()
        .method(call.method)
        .uri(&call.path)
        .header("content-type", "application/json")
        .body(body)
        .map_err(|e| e.to_string())?;
    let resp = router.oneshot(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let is_sse = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let mut body = resp.into_body().into_data_stream();
    if !is_sse {
        let mut bytes = Vec::new();
        while let Some(chunk) = body.next().await {
            bytes.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
        }
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|e| format!("unreadable answer: {e}"))?;
        return if status.is_success() {
            Ok(shape_output(call.shape, v))
        } else {
            Err(error_message(&v))
        };
    }
    let Some(partials) = partials else {
        return Err("a streamed answer needs a stream to go to".into());
    };
    let mut buf = String::new();
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.map_err(|e| e.to_string())?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for data in event
                .lines()
                .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            {
                if let Some(p) = shape_partial(call.shape, data.trim())? {
                    // The job was stopped or the worker is gone: dropping the body cancels.
                    partials
                        .send(p)
                        .await
                        .map_err(|_| "cancelled".to_string())?;
                }
            }
        }
    }
    Ok(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_pick_their_route() {
        assert_eq!(parse(&json!({"prompt": "hi"})).unwrap().path, "/prompt");
        let c = parse(&json!({"messages": [{"role": "user", "content": "x"}], "sampling_params": {"max_tokens": 5}})).unwrap();
        assert_eq!(
            (c.path.as_str(), c.shape, c.body["max_tokens"].as_u64()),
            ("/v1/chat/completions", Shape::Vllm, Some(5))
        );
        assert_eq!(
            parse(&json!({"prompt": "x", "sampling_params": {}}))
                .unwrap()
                .path,
            "/v1/completions"
        );
        let c = parse(&json!({"openai_route": "/v1/models"})).unwrap();
        assert_eq!(c.method, Method::GET);
        assert!(
            parse(&json!({"openai_route": "/v1/embeddings"}))
                .unwrap_err()
                .contains("/v1/embeddings")
        );
        assert!(parse(&json!({"nothing": 1})).is_err());
        assert!(parse(&json!("text")).is_err());
    }

    #[test]
    fn vllm_sampling_params_carry_seed_penalties_bias_and_logprobs() {
        let sp = json!({"seed": 3, "presence_penalty": 0.5, "frequency_penalty": 0.1,
                        "logit_bias": {"5": -100}, "logprobs": 2});
        let chat =
            parse(&json!({"messages": [{"role": "user", "content": "x"}], "sampling_params": sp}))
                .unwrap();
        assert_eq!(chat.body["seed"], 3);
        assert_eq!(chat.body["logit_bias"]["5"], -100);
        assert_eq!(
            (
                chat.body["logprobs"].clone(),
                chat.body["top_logprobs"].clone()
            ),
            (json!(true), json!(2))
        );
        let text = parse(&json!({"prompt": "x", "sampling_params": sp})).unwrap();
        assert_eq!(text.body["logprobs"], 2);
        assert_eq!(text.body["presence_penalty"], 0.5);
    }

    #[test]
    fn vllm_partials_carry_tokens_then_usage() {
        let p = shape_partial(Shape::Vllm, r#"{"choices":[{"delta":{"content":"ab"}}]}"#)
            .unwrap()
            .unwrap();
        assert_eq!(p["choices"][0]["tokens"][0], "ab");
        let u = shape_partial(
            Shape::Vllm,
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(u["usage"]["output"], 4);
        assert!(shape_partial(Shape::Vllm, "[DONE]").unwrap().is_none());
        assert_eq!(
            shape_partial(Shape::OpenAi, "[DONE]").unwrap().unwrap(),
            "data: [DONE]\n\n"
        );
        assert!(
            shape_partial(Shape::Native, r#"{"error":{"message":"boom"}}"#)
                .unwrap_err()
                .contains("boom")
        );
    }
}
