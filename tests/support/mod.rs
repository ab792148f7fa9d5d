//! Shared fixtures: in-process servers on loopback (one per configuration, loaded once per
//! test binary), a spawned-binary helper, and small HTTP/SSE helpers.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::Value;
use zopilot_gpu::api::{self, AppState};
use zopilot_gpu::cli::{Cli, Command};
use zopilot_gpu::engine::Engine;
use zopilot_gpu::metrics::Metrics;
use zopilot_gpu::settings::Settings;

pub const KEY: &str = "test-key";
pub const MODEL: &str = "synthetic:tiny";

/// A server running on its own thread and runtime, shared by the tests that use it.
pub struct Server {
    pub url: String,
    pub engine: Arc<Engine>,
    /// Tests that watch global counters (in-flight, cancellations) take this.
    pub exclusive: tokio::sync::Mutex<()>,
}

/// Settings as `serve` would build them from these flags.
pub fn settings(extra: &[&str]) -> Settings {
    let mut argv = vec!["zopilot-gpu", "serve", "--cpu", "--port", "0"];
    if !extra.contains(&"--model") {
        argv.extend(["--model", MODEL]);
    }
    argv.extend_from_slice(extra);
    match Cli::try_parse_from(argv).expect("flags parse").command {
        Some(Command::Serve(a)) => Settings::from_serve_args(&a).expect("valid settings"),
        _ => unreachable!(),
    }
}

/// Starts a server; `load` false leaves the engine loading (tests drive it).
pub fn start(extra: &[&str], load: bool) -> Server {
    let s = settings(extra);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async move {
            let engine = Arc::new(Engine::new(
                &s.model,
                s.server.request_timeout,
                Arc::new(Metrics::default()),
            ));
            if load {
                engine.load(&s.model).await.expect("tiny model loads");
            }
            let state = AppState {
                engine: engine.clone(),
                api_key: s.server.api_key.as_deref().map(Arc::from),
                body_limit: s.server.body_limit,
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let url = format!("http://{}", listener.local_addr().expect("addr"));
            tx.send((url, engine)).expect("report");
            axum::serve(listener, api::app(state)).await.expect("serve");
        });
    });
    let (url, engine) = rx.recv().expect("server started");
    Server {
        url,
        engine,
        exclusive: tokio::sync::Mutex::new(()),
    }
}

/// A new server set up as the shared one (API key, four sequence slots), for a test that
/// needs all its slots.
pub fn start_like_shared() -> Server {
    start(
        &[
            "--api-key",
            KEY,
            "--max-num-seqs",
            "4",
            "--max-model-len",
            "2048",
        ],
        true,
    )
}

/// The main shared server: API key set, four sequence slots.
pub fn shared() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(start_like_shared)
}

/// A server with a single sequence slot and no queue, for saturation and cancellation.
pub fn narrow() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        start(
            &[
                "--max-num-seqs",
                "1",
                "--max-queue",
                "0",
                "--max-model-len",
                "2048",
            ],
            true,
        )
    })
}

/// A server with one sequence slot and room for one request to wait (at most 3 s).
pub fn queued() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        start(
            &[
                "--max-num-seqs",
                "1",
                "--max-queue",
                "1",
                "--max-queue-wait",
                "3",
                "--max-model-len",
                "2048",
            ],
            true,
        )
    })
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

/// POSTs JSON with the shared key; returns status and parsed body.
pub async fn post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    let r = client()
        .post(format!("{}{path}", server.url))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .expect("request sent");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub async fn get(server: &Server, path: &str) -> (u16, String) {
    let r = client()
        .get(format!("{}{path}", server.url))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("request sent");
    (r.status().as_u16(), r.text().await.expect("body"))
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|s| s.trim().to_owned())
        .collect()
}

/// POSTs and returns the SSE payloads (everything up to the end of the stream).
pub async fn post_sse(server: &Server, path: &str, body: Value) -> Vec<String> {
    let r = client()
        .post(format!("{}{path}", server.url))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    sse_data(&r.text().await.expect("body"))
}

/// Reads a Prometheus sample's value from /metrics text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

/// How much a Prometheus counter grew between two /metrics texts.
pub fn metric_delta(after: &str, before: &str, name: &str) -> f64 {
    metric(after, name) - metric(before, name)
}

/// Polls `check` until it returns true or `limit` passes.
pub async fn eventually<F: AsyncFnMut() -> bool>(limit: Duration, mut check: F) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Whether python3 can import `modules` (a test's reference or client). Without them the
/// test skips, unless CI set `require` to make it fail instead.
pub fn python_has(modules: &str, packages: &str, require: &str) -> bool {
    let has = std::process::Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .status()
        .is_ok_and(|s| s.success());
    if !has {
        assert!(
            std::env::var_os(require).is_none(),
            "python3 -m pip install {packages}"
        );
        eprintln!("skipped: python3 cannot import {modules} (python3 -m pip install {packages})");
    }
    has
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The built binary under test.
pub fn binary() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_zopilot-gpu"));
    // Start from a clean slate: the environment must not change what the tests mean.
    for var in [
        "PORT",
        "PORT_HEALTH",
        "MODEL_NAME",
        "MAX_MODEL_LEN",
        "ZOPILOT_API_KEY",
        "ZOPILOT_MODEL",
        "ZOPILOT_ISQ",
        "ZOPILOT_MIXTRAL_PATH",
        "ZOPILOT_PDL",
        "ZOPILOT_MOE_GATHER_MAX_TOKENS",
        "ZOPILOT_MOE_MMA_MAX_TOKENS",
        "ZOPILOT_MMA_MIN_TOKENS",
        "ZOPILOT_STEP_TRACE",
        "ZOPILOT_STEP_TRACE_HEAD_US",
    ] {
        c.env_remove(var);
    }
    // Tests that want the quantized-weights cache name a directory of their own.
    c.env("ZOPILOT_QUANT_CACHE", "off");
    c
}
