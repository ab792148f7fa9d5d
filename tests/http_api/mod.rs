//! The public HTTP API against the tiny synthetic Mixtral loaded with ISQ Q4K on the CPU.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

use crate::support::{self, KEY, MODEL, eventually, get, metric, metric_delta, post, post_sse};

fn greedy_chat(max_tokens: usize) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell me about mixtures of experts."}],
           "max_tokens": max_tokens, "temperature": 0})
}

#[tokio::test]
async fn prompt_answers_text_finish_reason_usage_and_model() {
    let s = support::shared();
    let (status, body) = post(
        s,
        "/prompt",
        json!({"prompt": "hello there", "system": "Be brief.", "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["text"].is_string());
    assert_eq!(body["finish_reason"], "length");
    assert_eq!(body["model"], MODEL);
    let u = &body["usage"];
    assert_eq!(u["completion_tokens"], 8);
    assert!(
        u["prompt_tokens"].as_u64().unwrap() > 5,
        "chat template tokens are counted: {u}"
    );
    assert_eq!(u["total_tokens"], u["prompt_tokens"].as_u64().unwrap() + 8);
    assert!(u["ttft_ms"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn system_message_changes_the_prompt_token_count() {
    let s = support::shared();
    let (_, bare) = post(s, "/prompt", json!({"prompt": "hi", "max_tokens": 1})).await;
    let (_, with_system) = post(
        s,
        "/prompt",
        json!({"prompt": "hi", "system": "You are terse and exact.", "max_tokens": 1}),
    )
    .await;
    assert!(
        with_system["usage"]["prompt_tokens"].as_u64() > bare["usage"]["prompt_tokens"].as_u64()
    );
}

#[tokio::test]
async fn chat_completion_has_the_openai_shape() {
    let s = support::shared();
    let (status, body) = post(s, "/v1/chat/completions", greedy_chat(6)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL);
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 6);
}

#[tokio::test]
async fn max_tokens_is_honoured_exactly() {
    let s = support::shared();
    for n in [1, 3, 17] {
        let (_, body) = post(s, "/v1/chat/completions", greedy_chat(n)).await;
        assert_eq!(body["usage"]["completion_tokens"], n, "{body}");
    }
}

#[tokio::test]
async fn completions_default_to_sixteen_tokens_without_a_template() {
    let s = support::shared();
    let (status, body) = post(
        s,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Once upon a time", "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["usage"]["completion_tokens"], 16);
    // Raw text: no `[INST]` wrapping, so far fewer prompt tokens than the chat form.
    let (_, chat) = post(
        s,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 1}),
    )
    .await;
    assert!(body["usage"]["prompt_tokens"].as_u64() < chat["usage"]["prompt_tokens"].as_u64());
}

#[tokio::test]
async fn chat_stream_is_framed_in_order_and_matches_the_non_streamed_answer() {
    let s = support::shared();
    let (_, whole) = post(s, "/v1/chat/completions", greedy_chat(12)).await;
    let mut req = greedy_chat(12);
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let data = post_sse(s, "/v1/chat/completions", req).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 12);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    // Only the final content chunk carries a finish reason.
    assert!(
        chunks[..chunks.len() - 2]
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null())
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
}

#[tokio::test]
async fn completion_and_prompt_streams_end_with_done() {
    let s = support::shared();
    let data = post_sse(
        s,
        "/v1/completions",
        json!({"prompt": "abc", "max_tokens": 5, "stream": true}),
    )
    .await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");

    let data = post_sse(
        s,
        "/prompt",
        json!({"prompt": "abc", "max_tokens": 4, "stream": true}),
    )
    .await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(last["finish_reason"], "length");
    assert_eq!(last["usage"]["completion_tokens"], 4);
}

#[tokio::test]
async fn stop_strings_cut_the_text_streamed_or_not() {
    let s = support::shared();
    let base = json!({"prompt": "Write a long story.", "max_tokens": 40, "temperature": 0});
    let (_, full) = post(s, "/prompt", base.clone()).await;
    let text = full["text"].as_str().unwrap().to_owned();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 12, "need some text to cut: {text:?}");
    let stop: String = chars[8..10].iter().collect();
    let expected = &text[..text.find(&stop).unwrap()];

    let mut req = base.clone();
    req["stop"] = json!([stop.clone(), "\u{1F600}never"]);
    let (_, cut) = post(s, "/prompt", req.clone()).await;
    assert_eq!(cut["text"], expected);
    assert_eq!(cut["finish_reason"], "stop");

    req["stream"] = json!(true);
    let data = post_sse(s, "/prompt", req).await;
    let streamed: String = data[..data.len() - 1]
        .iter()
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        streamed, expected,
        "no part of the stop string leaks into the stream"
    );
}

#[tokio::test]
async fn validation_errors_name_the_field_limit_and_value() {
    let s = support::shared();
    let (status, body) = post(s, "/v1/chat/completions", greedy_chat(5000)).await;
    assert_eq!(status, 400);
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("max_tokens") && msg.contains("2048") && msg.contains("5000"),
        "{msg}"
    );
    assert_eq!(body["error"]["param"], "max_tokens");

    let (status, body) = post(s, "/prompt", json!({"prompt": "x", "temperature": 7})).await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("temperature"))
    );
    let (status, _) = post(s, "/v1/chat/completions", json!({"messages": []})).await;
    assert_eq!(status, 400);
    let (status, _) = post(s, "/v1/chat/completions", json!({"messages": 5})).await;
    assert_eq!(status, 422);
    let (status, body) = post(
        s,
        "/v1/chat/completions",
        json!({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = post(
        s,
        "/v1/chat/completions",
        json!({"messages": [{"role": "assistant", "content": "x"}], "max_tokens": 2}),
    )
    .await;
    assert_eq!(
        status, 400,
        "the chat template's own rule (roles alternate) is a client error: {body}"
    );
    let long = "word ".repeat(3000);
    let (status, body) = post(s, "/prompt", json!({"prompt": long})).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("context is 2048"),
        "{body}"
    );

    let r = support::client()
        .post(format!("{}/prompt", s.url))
        .bearer_auth(KEY)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(
        r.json::<Value>().await.unwrap()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("JSON")
    );
}

#[tokio::test]
async fn api_key_guards_everything_but_health_ping_and_metrics() {
    let s = support::shared();
    let c = support::client();
    let r = c.get(format!("{}/v1/models", s.url)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "authentication_error"
    );
    let r = c
        .post(format!("{}/prompt", s.url))
        .bearer_auth("wrong")
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    for open in ["/health", "/ping", "/metrics"] {
        let r = c.get(format!("{}{open}", s.url)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{open} needs no key");
    }
    let (status, body) = get(s, "/v1/models").await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
}

#[tokio::test]
async fn oversized_bodies_get_413_as_json() {
    let s = support::shared();
    let big = "x".repeat(2 << 20);
    let r = support::client()
        .post(format!("{}/prompt", s.url))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(format!("{{\"prompt\": \"{big}\"}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    assert!(
        r.json::<Value>().await.unwrap()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit")
    );
}

/// Starts a long streamed request and waits for its first event: the server's one slot is
/// then busy until the returned body is dropped.
async fn hold_the_slot(
    s: &support::Server,
    c: &reqwest::Client,
) -> impl futures::Stream<Item = reqwest::Result<axum::body::Bytes>> {
    let long = c
        .post(format!("{}/prompt", s.url))
        .json(&json!({"prompt": "go", "max_tokens": 1800, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(long.status().as_u16(), 200);
    let mut body = Box::pin(long.bytes_stream());
    body.next().await.expect("first event").unwrap();
    body
}

#[tokio::test]
async fn saturated_server_answers_429_at_once_with_retry_after() {
    let s = support::narrow();
    let _g = s.exclusive.lock().await;
    let c = support::client();
    let body = hold_the_slot(s, &c).await;
    let started = std::time::Instant::now();
    let r = c
        .post(format!("{}/prompt", s.url))
        .json(&json!({"prompt": "me too", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once with --max-queue 0"
    );
    assert_eq!(r.headers()["retry-after"], "1");
    drop(body);
    assert!(eventually(Duration::from_secs(20), async || s.engine.in_flight() == 0).await);
}

#[tokio::test]
async fn client_disconnect_cancels_the_sequence() {
    let s = support::narrow();
    let _g = s.exclusive.lock().await;
    let c = support::client();
    let before = get(s, "/metrics").await.1;
    let r = c.post(format!("{}/v1/chat/completions", s.url))
        .json(&json!({"messages": [{"role": "user", "content": "go on"}], "max_tokens": 1800, "stream": true}))
        .send().await.unwrap();
    let mut body = r.bytes_stream();
    body.next().await.expect("first chunk").unwrap();
    assert_eq!(s.engine.in_flight(), 1);
    drop(body);
    assert!(
        eventually(Duration::from_secs(10), async || s.engine.in_flight() == 0).await,
        "in-flight returns to 0"
    );
    let after = get(s, "/metrics").await.1;
    let generated = metric_delta(&after, &before, "zopilot_generated_tokens_total");
    assert!(
        generated < 1800.0,
        "the sequence stopped early: {generated} tokens"
    );
    assert_eq!(
        metric_delta(&after, &before, "zopilot_cancelled_total"),
        1.0
    );
    assert_eq!(metric(&after, "zopilot_in_flight_sequences"), 0.0);
}

#[tokio::test]
async fn ping_goes_204_while_loading_then_200_and_health_reports_state() {
    let s = support::start(&["--max-model-len", "512"], false);
    let c = support::client();
    let ping = async || {
        c.get(format!("{}/ping", s.url))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(ping().await, 204);
    let (status, body) = post(&s, "/prompt", json!({"prompt": "x"})).await;
    assert_eq!(status, 503, "{body}");
    let health: Value = serde_json::from_str(&get(&s, "/health").await.1).unwrap();
    assert_eq!(health["readiness"]["state"], "loading");
    let settings = support::settings(&["--max-model-len", "512"]);
    s.engine.load(&settings.model).await.unwrap();
    assert_eq!(ping().await, 200);
    let health: Value = serde_json::from_str(&get(&s, "/health").await.1).unwrap();
    assert_eq!(health["readiness"]["state"], "ready");
    assert_eq!(health["context_len"], 512);
}

#[tokio::test]
async fn failed_load_answers_503_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        "{\"architectures\": [\"NoSuchModel\"]}",
    )
    .unwrap();
    let model = dir.path().to_str().unwrap().to_owned();
    let s = support::start(&["--model", &model], false);
    let settings = support::settings(&["--model", &model]);
    assert!(s.engine.load(&settings.model).await.is_err());
    let r = support::client()
        .get(format!("{}/ping", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "failed");
    assert!(!body["reason"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn metrics_and_openapi_describe_the_server() {
    let s = support::shared();
    post(s, "/prompt", json!({"prompt": "count me", "max_tokens": 2})).await;
    let (_, text) = get(s, "/metrics").await;
    for name in [
        "zopilot_requests_total{endpoint=\"/prompt\",status=\"200\"}",
        "zopilot_time_to_first_token_seconds_bucket",
        "zopilot_request_duration_seconds_count",
        "zopilot_prompt_tokens_total",
        "zopilot_generated_tokens_total",
        "zopilot_in_flight_sequences",
        "zopilot_rejected_total",
        "zopilot_model_load_seconds",
    ] {
        assert!(text.contains(name), "{name} in /metrics");
    }
    assert!(metric(&text, "zopilot_model_load_seconds") > 0.0);
    let (status, doc) = get(s, "/openapi.json").await;
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    for p in [
        "/prompt",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/health",
        "/ping",
        "/metrics",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} documented");
    }
    let (status, body) = get(s, "/nope").await;
    assert_eq!(status, 404);
    assert!(body.contains("/nope"));
}

#[tokio::test]
async fn a_request_past_its_timeout_is_cancelled_with_504() {
    // 0.3 s against ~2 s of generation on a CPU: far apart on any machine we run on.
    let s = support::start(
        &["--request-timeout", "0.3", "--max-model-len", "2048"],
        true,
    );
    let started = std::time::Instant::now();
    let (status, body) = post(
        &s,
        "/prompt",
        json!({"prompt": "on and on", "max_tokens": 2000}),
    )
    .await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["type"], "timeout");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cancelled at the deadline, not at the end"
    );
    assert!(eventually(Duration::from_secs(5), async || s.engine.in_flight() == 0).await);
}

#[tokio::test]
async fn a_non_streaming_client_that_leaves_cancels_too() {
    let s = support::narrow();
    let _g = s.exclusive.lock().await;
    let before = get(s, "/metrics").await.1;
    let c = support::client();
    let req = c
        .post(format!("{}/prompt", s.url))
        .json(&json!({"prompt": "long", "max_tokens": 1900}))
        .send();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), req)
            .await
            .is_err(),
        "still generating"
    );
    assert!(eventually(Duration::from_secs(10), async || s.engine.in_flight() == 0).await);
    let after = get(s, "/metrics").await.1;
    let generated = metric_delta(&after, &before, "zopilot_generated_tokens_total");
    assert!(
        generated < 1900.0,
        "the sequence stopped when the client left: {generated} tokens"
    );
}

#[tokio::test]
async fn concurrent_greedy_requests_answer_as_they_do_alone() {
    // Batched decode gives each sequence its own attention (mistral.rs' CPU decode kernel
    // shared its scratch across the batch, fixed in vendor/), logits row and rotary
    // positions; a mix-up makes a batched answer continue another request's text. Its own
    // server: four requests at once would take every slot of the shared one.
    let s = support::start_like_shared();
    let prompts = [
        "dogs and cats",
        "one two three",
        "cats and dogs",
        "tell me more about it",
    ];
    let ask = async |p: &str| {
        let body = json!({"prompt": p, "max_tokens": 12, "temperature": 0});
        let (status, b) = post(&s, "/prompt", body).await;
        assert_eq!(status, 200, "{b}");
        b["text"].clone()
    };
    let mut alone = Vec::new();
    for p in prompts {
        alone.push(ask(p).await);
    }
    assert_ne!(alone[0], alone[2], "different prompts, different answers");
    let together = futures::future::join_all(prompts.iter().map(|p| ask(p))).await;
    assert_eq!(
        together, alone,
        "batched answers against the same requests alone"
    );
}

#[tokio::test]
async fn a_body_announced_over_the_limit_is_refused_before_it_arrives() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = support::shared();
    let addr = s.url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /prompt HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 200000000\r\n\r\n{{\"prompt\": \""
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    // No more of the body is sent: the answer must not wait for it.
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut answer))
        .await
        .expect("answered before the body arrived")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"too_large\""), "{answer}");
}

#[tokio::test]
async fn a_busy_server_queues_then_refuses_when_the_queue_is_full() {
    let s = support::queued();
    let _g = s.exclusive.lock().await;
    let c = support::client();
    let body = hold_the_slot(s, &c).await;
    // The second waits for the slot...
    let waiting = tokio::spawn({
        let (c, url) = (c.clone(), s.url.clone());
        async move {
            c.post(format!("{url}/prompt"))
                .json(&json!({"prompt": "next", "max_tokens": 2}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    assert!(eventually(Duration::from_secs(10), async || s.engine.queued() == 1).await);
    assert_eq!(
        metric(&get(s, "/metrics").await.1, "zopilot_queued_requests"),
        1.0
    );
    // ...the third finds the queue full and is refused at once.
    let started = std::time::Instant::now();
    let r = c
        .post(format!("{}/prompt", s.url))
        .json(&json!({"prompt": "and me", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "overloaded"
    );
    // The slot frees and the waiting request is served.
    drop(body);
    assert_eq!(waiting.await.unwrap(), 200);
    let m = get(s, "/metrics").await.1;
    assert_eq!(metric(&m, "zopilot_queued_requests"), 0.0);
    assert!(metric(&m, "zopilot_queue_wait_seconds_count") >= 2.0);
}

#[tokio::test]
async fn a_wait_past_the_limit_is_refused_and_a_leaving_waiter_frees_its_place() {
    let s = support::queued();
    let _g = s.exclusive.lock().await;
    let c = support::client();
    let body = hold_the_slot(s, &c).await;
    // A waiter whose client gives up leaves the queue.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let gone = impatient
        .post(format!("{}/prompt", s.url))
        .json(&json!({"prompt": "bye", "max_tokens": 2}))
        .send()
        .await;
    assert!(gone.is_err(), "the client timed out");
    assert!(eventually(Duration::from_secs(5), async || s.engine.queued() == 0).await);
    // One that stays is refused once --max-queue-wait (3 s) has passed.
    let started = std::time::Instant::now();
    let r = c
        .post(format!("{}/prompt", s.url))
        .json(&json!({"prompt": "patient", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    drop(body);
    assert!(eventually(Duration::from_secs(20), async || s.engine.in_flight() == 0).await);
}
