//! What the model is asked and how it answers, against references we did not write: prompt
//! ids equal to transformers' for every endpoint, and the OpenAI decoding controls —
//! `logprobs`, `seed`, penalties, `logit_bias`, `response_format` — on the tiny model.

use futures::StreamExt;
use serde_json::{Value, json};

use crate::support::{self, MODEL, post, post_sse};

/// The prompts every endpoint must tokenize as transformers does.
fn reference_cases() -> Vec<Value> {
    vec![
        json!({"messages": [{"role": "user", "content": "Name three rivers."}]}),
        json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]}),
        json!({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                            {"role": "user", "content": "And 3+3, naïvely?"}]}),
        json!({"prompt": "Name three rivers."}),
        json!({"prompt": "  leading spaces, ümlauts and\nnew lines"}),
    ]
}

/// transformers' ids for `reference_cases`, from tests/reference_ids.py over a synthetic
/// model directory written like the server's; `None` (a skip) when transformers is missing
/// and CI did not ask for it.
fn transformers_ids() -> Option<Vec<Vec<u64>>> {
    if !support::python_has(
        "transformers, jinja2",
        "transformers jinja2",
        "ZOPILOT_REQUIRE_REFERENCE",
    ) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    zopilot_gpu::synth::write(zopilot_gpu::synth::Preset::Tiny, None, 0, false, dir.path())
        .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference_ids.py");
    let mut child = std::process::Command::new("python3")
        .arg(script)
        .arg(dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(Value::Array(reference_cases()).to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("ids: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn prompt_ids_equal_transformers_on_every_endpoint() {
    let s = support::shared();
    let Some(expected) = transformers_ids() else {
        return;
    };
    for (case, want) in reference_cases().iter().zip(&expected) {
        let (status, body) = post(s, "/tokenize", case.clone()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(&ids(&body["tokens"]), want, "/tokenize of {case}");
        assert_eq!(body["count"], want.len());
        // The generation endpoints count the same prompt.
        let (path, request) = match case.get("messages") {
            Some(m) => (
                "/v1/chat/completions",
                json!({"messages": m, "max_tokens": 1}),
            ),
            None => (
                "/v1/completions",
                json!({"prompt": case["prompt"], "max_tokens": 1}),
            ),
        };
        let (status, body) = post(s, path, request).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["usage"]["prompt_tokens"],
            want.len(),
            "{path} for {case}"
        );
    }
    // /prompt is the first chat case (one user message).
    let (_, body) = post(
        s,
        "/prompt",
        json!({"prompt": "Name three rivers.", "max_tokens": 1}),
    )
    .await;
    assert_eq!(body["usage"]["prompt_tokens"], expected[0].len());
}

#[tokio::test]
async fn a_chat_prompt_starts_with_one_bos_and_detokenizes_back() {
    let s = support::shared();
    let (_, chat) = post(
        s,
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "Hello"}]}),
    )
    .await;
    let chat = ids(&chat["tokens"]);
    assert_eq!(chat[0], 1, "BOS first");
    assert_ne!(chat[1], 1, "and only once: {chat:?}");
    let (_, text) = post(s, "/tokenize", json!({"prompt": "Hello"})).await;
    let text = ids(&text["tokens"]);
    assert_eq!((text[0], text[1] != 1), (1, true));
    let (status, back) = post(s, "/detokenize", json!({"tokens": chat})).await;
    assert_eq!(status, 200, "{back}");
    let back = back["prompt"].as_str().unwrap();
    assert!(
        back.starts_with("<s>") && back.ends_with("[INST] Hello [/INST]"),
        "{back}"
    );
    let (status, body) = post(s, "/detokenize", json!({"tokens": [1, 999999]})).await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("tokens"))
    );
    let (status, body) = post(
        s,
        "/tokenize",
        json!({"prompt": "x", "add_special_tokens": false}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = post(s, "/tokenize", json!({"prompt": "x", "messages": []})).await;
    assert_eq!(status, 400);
}

fn logprob_chat(extra: Value) -> Value {
    let mut r = json!({"model": MODEL, "messages": [{"role": "user", "content": "Count to ten."}],
                       "max_tokens": 12, "temperature": 0, "logprobs": true, "top_logprobs": 5});
    for (k, v) in extra.as_object().unwrap() {
        r[k] = v.clone();
    }
    r
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-4
}

#[tokio::test]
async fn logprobs_are_natural_logs_consistent_with_the_sampled_tokens() {
    // A server of its own: the same request's log-probabilities are compared across calls to
    // 1e-4, and other tests' requests batched beside these would change the arithmetic
    // (a batch's matmuls round otherwise than one sequence's), as seen under the full suite.
    let s = &support::start_like_shared();
    let (status, body) = post(s, "/v1/chat/completions", logprob_chat(json!({}))).await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 12, "one entry per generated token");
    let mut text = String::new();
    for t in content {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 5);
        let lps: Vec<f64> = top.iter().map(|a| a["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]), "best first: {lps:?}");
        assert!(lps.iter().all(|&l| l <= 0.0));
        let mass: f64 = lps.iter().map(|l| l.exp()).sum();
        assert!(mass <= 1.0 + 1e-4, "probabilities of a softmax: {mass}");
        // Greedy: the sampled token is the likeliest.
        assert!(close(t["logprob"].as_f64().unwrap(), lps[0]), "{t}");
        assert_eq!(t["bytes"], json!(t["token"].as_str().unwrap().as_bytes()));
        text.push_str(t["token"].as_str().unwrap());
    }
    assert_eq!(
        text,
        body["choices"][0]["message"]["content"].as_str().unwrap()
    );

    // The distribution reported is the model's, whatever the temperature used to sample.
    let (_, warm) = post(
        s,
        "/v1/chat/completions",
        logprob_chat(json!({"temperature": 1.5, "seed": 11, "max_tokens": 1})),
    )
    .await;
    let first = |b: &Value| b["choices"][0]["logprobs"]["content"][0]["top_logprobs"].clone();
    let (a, b) = (first(&body), first(&warm));
    for (x, y) in a.as_array().unwrap().iter().zip(b.as_array().unwrap()) {
        assert_eq!(x["token"], y["token"]);
        assert!(close(
            x["logprob"].as_f64().unwrap(),
            y["logprob"].as_f64().unwrap()
        ));
    }
    let sampled = warm["choices"][0]["logprobs"]["content"][0]["logprob"]
        .as_f64()
        .unwrap();
    assert!(sampled <= a[0]["logprob"].as_f64().unwrap() + 1e-6 && sampled.is_finite());

    // Streamed, the same entries arrive with the pieces they belong to.
    let events = post_sse(
        s,
        "/v1/chat/completions",
        logprob_chat(json!({"stream": true})),
    )
    .await;
    let streamed: Vec<Value> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(streamed.len(), 12);
    for (x, y) in streamed.iter().zip(content) {
        assert_eq!(x["token"], y["token"]);
        assert!(close(
            x["logprob"].as_f64().unwrap(),
            y["logprob"].as_f64().unwrap()
        ));
    }

    // /v1/completions: OpenAI's legacy lists, offsets into the text.
    let (status, body) = post(
        s,
        "/v1/completions",
        json!({"prompt": "Once upon", "max_tokens": 6, "temperature": 0, "logprobs": 3}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let lp = &body["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), 6);
    assert_eq!(
        tokens.concat(),
        body["choices"][0]["text"].as_str().unwrap()
    );
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 6);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 3);
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert_eq!(offsets[1], tokens[0].len() as u64);
    let (_, plain) = post(
        s,
        "/v1/completions",
        json!({"prompt": "Once upon", "max_tokens": 2}),
    )
    .await;
    assert!(
        plain["choices"][0]["logprobs"].is_null(),
        "absent unless asked for"
    );

    // vLLM's `return_tokens_as_token_ids`: the greedy token is the first alternative, and
    // the ids detokenize to the answer.
    let (_, by_id) = post(
        s,
        "/v1/chat/completions",
        logprob_chat(json!({"return_tokens_as_token_ids": true})),
    )
    .await;
    let mut ids = Vec::new();
    for t in by_id["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
    {
        let token = t["token"].as_str().unwrap();
        assert_eq!(token, t["top_logprobs"][0]["token"].as_str().unwrap());
        ids.push(
            token
                .strip_prefix("token_id:")
                .unwrap()
                .parse::<u32>()
                .unwrap(),
        );
    }
    let (_, text) = post(s, "/detokenize", json!({"tokens": ids})).await;
    assert_eq!(
        text["prompt"].as_str().unwrap().trim_start(),
        by_id["choices"][0]["message"]["content"].as_str().unwrap()
    );
}

fn sampled(seed: Option<u64>, extra: Value) -> Value {
    let mut r = json!({"model": MODEL, "messages": [{"role": "user", "content": "Write a poem."}],
                       "max_tokens": 24, "temperature": 1.0, "top_p": 0.95});
    if let Some(seed) = seed {
        r["seed"] = json!(seed);
    }
    for (k, v) in extra.as_object().unwrap() {
        r[k] = v.clone();
    }
    r
}

async fn content(s: &support::Server, request: Value) -> String {
    let (status, body) = post(s, "/v1/chat/completions", request).await;
    assert_eq!(status, 200, "{body}");
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn the_same_seed_gives_the_same_text_even_beside_other_requests() {
    let s = support::shared();
    let alone = content(s, sampled(Some(42), json!({}))).await;
    // Again, while unseeded sampling requests draw from the engine's generator beside it.
    let noise = (0..3).map(|_| content(s, sampled(None, json!({}))));
    let (again, _) = tokio::join!(
        content(s, sampled(Some(42), json!({}))),
        futures::future::join_all(noise)
    );
    assert_eq!(alone, again);
    let other = content(s, sampled(Some(43), json!({}))).await;
    assert_ne!(alone, other, "another seed, another text");
}

#[tokio::test]
async fn logit_bias_and_penalties_change_the_choice() {
    let s = support::shared();
    let greedy = json!({"model": MODEL, "messages": [{"role": "user", "content": "Repeat after me."}],
                        "max_tokens": 16, "temperature": 0, "logprobs": true});
    let (_, plain) = post(s, "/v1/chat/completions", greedy.clone()).await;
    let plain_text = plain["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    // +100 makes one token certain: token 100 of the tiny vocabulary is the byte `a`.
    let mut forced = greedy.clone();
    forced["logit_bias"] = json!({"100": 100});
    let (_, piece) = post(s, "/detokenize", json!({"tokens": [100]})).await;
    let piece = piece["prompt"].as_str().unwrap().to_owned();
    let text = content(s, forced).await;
    assert_eq!(text, piece.repeat(16));
    // -100 then bans it: with token 101 also at +100, 101 is the only likely choice left.
    let mut banned = greedy.clone();
    banned["logit_bias"] = json!({"100": -100, "101": 100});
    let (_, other) = post(s, "/detokenize", json!({"tokens": [101]})).await;
    assert_eq!(
        content(s, banned).await,
        other["prompt"].as_str().unwrap().repeat(16)
    );
    // Penalties on repeated tokens change a greedy answer that repeats itself.
    let mut penalised = greedy.clone();
    penalised["frequency_penalty"] = json!(2.0);
    penalised["presence_penalty"] = json!(2.0);
    assert_ne!(content(s, penalised).await, plain_text);
    let (status, body) = post(s, "/v1/chat/completions", {
        let mut r = greedy.clone();
        r["logit_bias"] = json!({"512": 1});
        r
    })
    .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("logit_bias")),
        "{body}"
    );
    let (status, _) = post(s, "/v1/chat/completions", {
        let mut r = greedy;
        r["presence_penalty"] = json!(3);
        r
    })
    .await;
    assert_eq!(status, 400);
}

/// Chat requests on the shared server, eight at a time: each answer's text and finish reason.
async fn chat_answers(requests: impl Iterator<Item = Value>) -> Vec<(String, String)> {
    let s = support::shared();
    futures::stream::iter(requests.map(|r| async move {
        let (status, body) = post(s, "/v1/chat/completions", r).await;
        assert_eq!(status, 200, "{body}");
        let choice = &body["choices"][0];
        (
            choice["message"]["content"].as_str().unwrap().to_owned(),
            choice["finish_reason"].as_str().unwrap().to_owned(),
        )
    }))
    .buffer_unordered(8)
    .collect()
    .await
}

/// A bounded schema: every string, number and list has a limit, so the grammar closes each
/// answer within the token budget however random the model.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "role": {"enum": ["admin", "user", "guest"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
            "active": {"type": "boolean"}
        },
        "required": ["name", "age", "role", "active"],
        "additionalProperties": false
    })
}

/// `person_schema`'s rules, checked by hand (the test's own validator).
fn check_person(v: &Value) -> Result<(), String> {
    let o = v.as_object().ok_or("not an object")?;
    for k in ["name", "age", "role", "active"] {
        if !o.contains_key(k) {
            return Err(format!("missing {k}"));
        }
    }
    for (k, x) in o {
        let ok = match k.as_str() {
            "name" => x
                .as_str()
                .is_some_and(|s| (1..=12).contains(&s.chars().count())),
            "age" => x.as_u64().is_some_and(|n| n <= 150),
            "role" => matches!(x.as_str(), Some("admin" | "user" | "guest")),
            "tags" => x.as_array().is_some_and(|a| {
                a.len() <= 3
                    && a.iter()
                        .all(|t| t.as_str().is_some_and(|s| s.chars().count() <= 6))
            }),
            "active" => x.is_boolean(),
            _ => false,
        };
        if !ok {
            return Err(format!("{k} = {x}"));
        }
    }
    Ok(())
}

#[tokio::test]
async fn json_schema_answers_always_parse_and_validate() {
    let answers = chat_answers((0..100).map(|i| {
        json!({"model": MODEL, "max_tokens": 200, "temperature": 1.0, "seed": i,
            "messages": [{"role": "user", "content": format!("Describe person {i} as JSON.")}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "person", "schema": person_schema()}}})
    }))
    .await;
    let mut bad = Vec::new();
    for (text, finish) in &answers {
        match serde_json::from_str::<Value>(text) {
            Ok(v) => {
                if let Err(e) = check_person(&v) {
                    bad.push(format!("{e}: {text}"));
                }
            }
            Err(e) => bad.push(format!("{e} ({finish}): {text}")),
        }
    }
    assert!(
        bad.is_empty(),
        "{} of 100 invalid:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

/// JSON mode (`json_object`) bounds nothing, so random weights would run out of budget inside
/// a long string: the engine closes such an answer as the budget runs out (finish_reason
/// `length`), and every answer is a whole JSON object.
#[tokio::test]
async fn json_mode_answers_are_whole_objects_even_at_the_budget() {
    let answers = chat_answers((0..100).map(|i| {
        json!({"model": MODEL, "max_tokens": 200, "temperature": 0.7, "seed": i,
            "messages": [{"role": "user", "content": format!("Answer {i} in JSON.")}],
            "response_format": {"type": "json_object"}})
    }))
    .await;
    let mut closed = 0;
    for (text, finish) in &answers {
        // Checked without converting numbers: a number past f64's range (7e546) is JSON too.
        let parsed = serde_json::from_str::<serde::de::IgnoredAny>(text);
        assert!(
            parsed.is_ok() && text.trim_start().starts_with('{'),
            "not a whole JSON object ({finish}): {text}"
        );
        closed += usize::from(finish == "length");
    }
    eprintln!("json_object: 100 of 100 whole objects, {closed} closed at the 200-token budget");
}
