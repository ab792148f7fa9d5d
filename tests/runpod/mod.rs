//! The queue worker against a RunPod job-server emulator on loopback, with faults: 500s and
//! 429s on take, failing result posts, stop requests and SIGTERM mid-job.

use std::collections::VecDeque;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::support::binary;

#[derive(Default)]
struct Emulator {
    queue: VecDeque<Value>,
    /// Takes whose connection is dropped without an answer.
    take_drops: usize,
    take_failures: usize,
    take_rate_limits: usize,
    /// Result posts refused (500) before one is accepted, per job.
    done_failures: std::collections::HashMap<String, usize>,
    /// Result posts recorded but answered after the worker's timeout, per job.
    done_slow: std::collections::HashMap<String, usize>,
    stop: Vec<String>,
    /// (job, isStream, body, X-Request-ID, Authorization) of accepted result posts.
    done: Vec<(String, String, Value, String, String)>,
    refused_done: usize,
    partials: Vec<(String, Value)>,
    pings: Vec<String>,
}

type Shared = Arc<Mutex<Emulator>>;

async fn take_one(State(s): State<Shared>) -> Response {
    let mut e = s.lock().unwrap();
    if e.take_drops > 0 {
        e.take_drops -= 1;
        drop(e);
        // Unwinding out of the handler makes the server close the connection unanswered.
        std::panic::resume_unwind(Box::new("emulated dropped connection"));
    }
    if e.take_failures > 0 {
        e.take_failures -= 1;
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    if e.take_rate_limits > 0 {
        e.take_rate_limits -= 1;
        return StatusCode::TOO_MANY_REQUESTS.into_response();
    }
    match e.queue.pop_front() {
        Some(job) => Json(job).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

async fn take_batch(
    State(s): State<Shared>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let n: usize = q
        .get("batch_size")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut e = s.lock().unwrap();
    let jobs: Vec<Value> = (0..n).filter_map(|_| e.queue.pop_front()).collect();
    if jobs.is_empty() {
        StatusCode::NO_CONTENT.into_response()
    } else {
        Json(jobs).into_response()
    }
}

async fn stop(State(s): State<Shared>) -> Response {
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ids: Vec<String> = std::mem::take(&mut s.lock().unwrap().stop);
    if ids.is_empty() {
        StatusCode::NO_CONTENT.into_response()
    } else {
        Json(json!({"jobsToStop": ids})).into_response()
    }
}

async fn done(
    State(s): State<Shared>,
    Path((_w, job)): Path<(String, String)>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    h: HeaderMap,
    body: String,
) -> StatusCode {
    let slow = {
        let mut e = s.lock().unwrap();
        if let Some(n) = e.done_failures.get_mut(&job).filter(|n| **n > 0) {
            *n -= 1;
            e.refused_done += 1;
            return StatusCode::INTERNAL_SERVER_ERROR;
        }
        let header = |k: &str| {
            h.get(k)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        let slow = e
            .done_slow
            .get_mut(&job)
            .filter(|n| **n > 0)
            .map(|n| *n -= 1)
            .is_some();
        let record = (
            job,
            q.get("isStream").cloned().unwrap_or_default(),
            serde_json::from_str(&body).unwrap(),
            header("x-request-id"),
            header("authorization"),
        );
        e.done.push(record);
        slow
    };
    if slow {
        // Processed, but the answer comes after the worker has given up waiting.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    StatusCode::OK
}

async fn partial(
    State(s): State<Shared>,
    Path((_w, job)): Path<(String, String)>,
    body: String,
) -> StatusCode {
    s.lock()
        .unwrap()
        .partials
        .push((job, serde_json::from_str(&body).unwrap()));
    StatusCode::OK
}

async fn ping(State(s): State<Shared>, uri: axum::http::Uri) -> StatusCode {
    s.lock()
        .unwrap()
        .pings
        .push(uri.query().unwrap_or_default().to_owned());
    StatusCode::OK
}

/// Starts the emulator on its own thread; returns its state and base URL.
fn emulator(e: Emulator) -> (Shared, String) {
    let shared: Shared = Arc::new(Mutex::new(e));
    let (tx, rx) = std::sync::mpsc::channel();
    let state = shared.clone();
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move {
                let app = Router::new()
                    .route("/v2/ep/job-take/{w}", get(take_one))
                    .route("/v2/ep/job-take-batch/{w}", get(take_batch))
                    .route("/v2/ep/job-stop/{w}", get(stop))
                    .route("/v2/ep/job-done/{w}/{job}", post(done))
                    .route("/v2/ep/job-stream/{w}/{job}", post(partial))
                    .route("/v2/ep/ping/{w}", get(ping))
                    .with_state(state);
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(format!("http://{}", l.local_addr().unwrap()))
                    .unwrap();
                axum::serve(l, app).await.unwrap();
            })
    });
    (shared, rx.recv().unwrap())
}

struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_worker(base: &str, seqs: &str) -> Worker {
    spawn_worker_with(base, seqs, &[])
}

fn spawn_worker_with(base: &str, seqs: &str, env: &[(&str, &str)]) -> Worker {
    Worker(
        binary()
            .args([
                "worker",
                "--model",
                "synthetic:tiny",
                "--cpu",
                "--max-num-seqs",
                seqs,
                "--max-model-len",
                "2048",
            ])
            .env(
                "RUNPOD_WEBHOOK_GET_JOB",
                format!("{base}/v2/ep/job-take/$ID?gpu=test"),
            )
            .env(
                "RUNPOD_WEBHOOK_POST_OUTPUT",
                format!("{base}/v2/ep/job-done/$RUNPOD_POD_ID/$ID?gpu=test"),
            )
            .env(
                "RUNPOD_WEBHOOK_POST_STREAM",
                format!("{base}/v2/ep/job-stream/$RUNPOD_POD_ID/$ID?gpu=test"),
            )
            .env(
                "RUNPOD_WEBHOOK_PING",
                format!("{base}/v2/ep/ping/$RUNPOD_POD_ID?gpu=test"),
            )
            .env("RUNPOD_AI_API_KEY", "rp-key")
            .env("RUNPOD_POD_ID", "worker-1")
            .env("RUNPOD_PING_INTERVAL", "100")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("worker starts"),
    )
}

fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn job(id: &str, input: Value) -> Value {
    json!({"id": id, "input": input})
}

#[test]
fn every_job_is_answered_exactly_once_through_faults() {
    let mut e = Emulator {
        take_failures: 2,
        take_rate_limits: 1,
        ..Default::default()
    };
    e.done_failures.insert("native".into(), 2);
    e.queue.extend([
        job("native", json!({"prompt": "hi", "max_tokens": 5})),
        job("vllm-stream", json!({"messages": [{"role": "user", "content": "x"}], "sampling_params": {"max_tokens": 6, "temperature": 0}, "stream": true})),
        job("openai", json!({"openai_route": "/v1/completions", "openai_input": {"prompt": "abc", "max_tokens": 3}})),
        job("invalid", json!({"prompt": "x", "max_tokens": 100000})),
        job("models", json!({"openai_route": "/v1/models"})),
        job("long", json!({"prompt": "long", "max_tokens": 1500})),
    ]);
    let (state, base) = emulator(e);
    let _w = spawn_worker(&base, "2");
    assert!(
        wait_for(Duration::from_secs(90), || state.lock().unwrap().done.len()
            >= 6),
        "all answered"
    );
    std::thread::sleep(Duration::from_millis(500));
    let e = state.lock().unwrap();
    let mut ids: Vec<&str> = e.done.iter().map(|d| d.0.as_str()).collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "invalid",
            "long",
            "models",
            "native",
            "openai",
            "vllm-stream"
        ],
        "exactly one accepted answer each"
    );
    assert_eq!(e.refused_done, 2, "the refused posts were retried");
    assert_eq!(
        (e.take_drops, e.take_failures, e.take_rate_limits),
        (0, 0, 0),
        "every take fault was met"
    );
    for (id, _, _, request_id, auth) in &e.done {
        assert_eq!(request_id, id);
        assert_eq!(auth, "rp-key", "raw key, no Bearer");
    }
    let get = |id: &str| e.done.iter().find(|d| d.0 == id).unwrap();
    assert_eq!(get("native").2["output"]["usage"]["completion_tokens"], 5);
    assert_eq!(get("native").1, "false");
    assert!(
        get("invalid").2["error"]
            .as_str()
            .unwrap()
            .contains("max_tokens")
    );
    assert_eq!(get("openai").2["output"]["object"], "text_completion");
    assert_eq!(get("models").2["output"]["data"][0]["id"], "synthetic:tiny");

    let (_, stream_flag, body, _, _) = get("vllm-stream");
    assert_eq!(stream_flag, "true");
    let partials: Vec<&Value> = e
        .partials
        .iter()
        .filter(|p| p.0 == "vllm-stream")
        .map(|p| &p.1["output"])
        .collect();
    assert_eq!(
        body["output"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>(),
        partials,
        "the aggregate is the partials in order"
    );
    assert_eq!(partials.last().unwrap()["usage"]["output"], 6);

    assert!(
        e.pings.iter().any(|q| q.contains("job_id=long")),
        "heartbeats carry in-progress ids: {:?}",
        &e.pings[..e.pings.len().min(5)]
    );
    assert!(
        e.pings
            .iter()
            .any(|q| !q.contains("job_id=") && q.contains("runpod_version="))
    );
}

#[test]
fn a_stopped_job_gets_no_answer_and_the_worker_goes_on() {
    let mut e = Emulator::default();
    e.queue
        .push_back(job("doomed", json!({"prompt": "x", "max_tokens": 1900})));
    let (state, base) = emulator(e);
    let _w = spawn_worker(&base, "1");
    assert!(wait_for(Duration::from_secs(60), || state
        .lock()
        .unwrap()
        .pings
        .iter()
        .any(|q| q.contains("job_id=doomed"))));
    state.lock().unwrap().stop.push("doomed".into());
    assert!(
        wait_for(Duration::from_secs(10), || state
            .lock()
            .unwrap()
            .pings
            .last()
            .is_some_and(|q| !q.contains("doomed"))),
        "stopped"
    );
    state
        .lock()
        .unwrap()
        .queue
        .push_back(job("next", json!({"prompt": "y", "max_tokens": 2})));
    assert!(wait_for(Duration::from_secs(20), || !state
        .lock()
        .unwrap()
        .done
        .is_empty()));
    std::thread::sleep(Duration::from_millis(300));
    let ids: Vec<String> = state
        .lock()
        .unwrap()
        .done
        .iter()
        .map(|d| d.0.clone())
        .collect();
    assert_eq!(ids, ["next"], "nothing was posted for the stopped job");
}

#[test]
fn sigterm_mid_job_finishes_posts_and_exits_zero() {
    let mut e = Emulator::default();
    e.queue
        .push_back(job("last", json!({"prompt": "x", "max_tokens": 1500})));
    let (state, base) = emulator(e);
    let mut w = spawn_worker(&base, "1");
    assert!(wait_for(Duration::from_secs(60), || state
        .lock()
        .unwrap()
        .pings
        .iter()
        .any(|q| q.contains("job_id=last"))));
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &w.0.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let mut status = None;
    assert!(wait_for(Duration::from_secs(30), || {
        status = w.0.try_wait().unwrap();
        status.is_some()
    }));
    assert!(status.unwrap().success(), "{status:?}");
    let e = state.lock().unwrap();
    assert_eq!(e.done.len(), 1);
    assert_eq!(
        e.done[0].2["output"]["usage"]["completion_tokens"], 1500,
        "the running job finished"
    );
}

#[test]
fn a_result_answered_too_late_is_posted_again_unchanged() {
    let mut e = Emulator::default();
    e.done_slow.insert("slow".into(), 1);
    e.queue.extend([
        job("slow", json!({"prompt": "x", "max_tokens": 3})),
        job("after", json!({"prompt": "y", "max_tokens": 2})),
    ]);
    let (state, base) = emulator(e);
    let _w = spawn_worker_with(&base, "1", &[("ZOPILOT_RUNPOD_CALL_TIMEOUT_MS", "300")]);
    assert!(wait_for(Duration::from_secs(30), || state
        .lock()
        .unwrap()
        .done
        .iter()
        .any(|d| d.0 == "after")));
    let e = state.lock().unwrap();
    let slow: Vec<&Value> = e
        .done
        .iter()
        .filter(|d| d.0 == "slow")
        .map(|d| &d.2)
        .collect();
    assert!(
        slow.len() >= 2,
        "the timed-out post was retried: {} posts",
        slow.len()
    );
    assert!(
        slow.iter().all(|b| *b == slow[0]),
        "every post of a job carries the same result"
    );
    assert_eq!(slow[0]["output"]["usage"]["completion_tokens"], 3);
}
