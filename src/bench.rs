//! `zopilot-gpu bench`: drives the engine in-process (or a running server over HTTP with
//! `--url`) with a fixed prompt length and output length at a list of concurrency levels,
//! and reports TTFT percentiles, inter-token latency, per-stream and aggregate decode
//! rates, prompt rate, load time, peak GPU memory and peak host RSS. Greedy decoding;
//! synthetic models never emit EOS, so every request generates exactly `--max-tokens`.
//! With `--long-prompt-tokens`, each level also measures mixed load: its streams decode
//! while long prompts arrive one after another, and the streams' inter-token latency in
//! that window is reported beside the prompts' TTFT (what chunked prefill is judged by).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, Event, GenRequest, Prompt};
use crate::metrics::Metrics;
use crate::settings::ModelSettings;

/// What one request saw.
#[derive(Debug, Clone)]
struct Sample {
    start: Instant,
    first: Instant,
    end: Instant,
    tokens: usize,
    prompt_tokens: usize,
    /// Gaps between consecutive tokens, seconds, each with the arrival that ended it.
    gaps: Vec<f64>,
    arrivals: Vec<Instant>,
}

/// How a caller steers one request beyond its shape: a counter of requests that have their
/// first token (incremented once, then), and a signal to stop reading and drop the request.
#[derive(Clone, Default)]
struct Steer {
    started: Option<Arc<AtomicUsize>>,
    stop: Option<CancellationToken>,
}

impl Steer {
    async fn stopped(&self) {
        match &self.stop {
            Some(t) => t.cancelled().await,
            None => std::future::pending().await,
        }
    }
}

/// Token arrival times of one request, as they happen.
struct Clock {
    start: Instant,
    first: Option<Instant>,
    last: Instant,
    gaps: Vec<f64>,
    arrivals: Vec<Instant>,
    started: Option<Arc<AtomicUsize>>,
    count: usize,
}

impl Clock {
    fn new(steer: &Steer) -> Self {
        let now = Instant::now();
        Clock {
            start: now,
            first: None,
            last: now,
            gaps: Vec::new(),
            arrivals: Vec::new(),
            started: steer.started.clone(),
            count: 0,
        }
    }

    /// A token arrived now.
    fn token(&mut self) {
        let now = Instant::now();
        if self.first.is_some() {
            self.gaps.push((now - self.last).as_secs_f64());
            self.arrivals.push(now);
        } else if let Some(n) = &self.started {
            n.fetch_add(1, Ordering::SeqCst);
        }
        self.first.get_or_insert(now);
        self.last = now;
        self.count += 1;
    }

    /// The sample; `tokens` from the final usage, or the tokens seen when stopped early.
    fn finish(self, tokens: Option<usize>, prompt_tokens: usize) -> Sample {
        Sample {
            start: self.start,
            first: self.first.unwrap_or(self.last),
            end: self.last,
            tokens: tokens.unwrap_or(self.count),
            prompt_tokens,
            gaps: self.gaps,
            arrivals: self.arrivals,
        }
    }
}

/// Percentiles of a list of seconds, reported in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if v.is_empty() {
            0.0
        } else {
            v[((v.len() - 1) as f64 * q).round() as usize] * 1e3
        }
    };
    Percentiles {
        p50_ms: at(0.5),
        p90_ms: at(0.9),
        p99_ms: at(0.99),
    }
}

/// One concurrency level.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    pub concurrency: usize,
    pub requests: usize,
    pub ttft: Percentiles,
    pub inter_token: Percentiles,
    /// Mean over streams of (tokens − 1) / (last − first token).
    pub decode_tokens_per_second_per_stream: f64,
    /// All generated tokens / wall time of the level (the window includes every prefill).
    pub aggregate_tokens_per_second: f64,
    /// Sum over streams of their decode rate: the batch's decode throughput with prefill left
    /// out, as llama.cpp's `llama-batched-bench` reports generation speed (S_TG).
    pub decode_aggregate_tokens_per_second: f64,
    /// Prompt tokens / mean TTFT, per stream.
    pub prompt_tokens_per_second: f64,
    /// Per-stream decode rate / floor_tokens_per_second.
    pub fraction_of_floor: Option<f64>,
    /// The level's streams again, decoding while long prompts arrive (`--long-prompt-tokens`).
    pub mixed: Option<MixedLoad>,
}

/// A level's streams decoding while long prompts arrive one after another: what a long
/// prompt costs the streams already running (their inter-token latency while the prompts
/// are being answered, against the level's `inter_token` without them) and what the
/// prompts wait (TTFT).
#[derive(Debug, Clone, Serialize)]
pub struct MixedLoad {
    pub long_prompt_tokens: usize,
    pub long_prompts: usize,
    /// Gaps between the streams' tokens that ended between the first long prompt's sending
    /// and the last one's first token.
    pub inter_token_during_prompts: Percentiles,
    pub gaps_during_prompts: usize,
    /// The long prompts' time to first token (each sent when the one before it answered).
    pub long_prompt_ttft: Percentiles,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub schema: &'static str,
    pub model: String,
    /// Decoder layers of the model (a synthetic Mixtral may have fewer than 32).
    pub layers: Option<usize>,
    pub isq: String,
    pub device: String,
    pub target: String,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    /// Whether every stream had a prompt of its own (`--distinct-prompts`).
    pub distinct_prompts: bool,
    /// Seconds from start to ready, ISQ included (in-process only).
    pub load_seconds: Option<f64>,
    pub peak_gpu_memory_bytes: Option<u64>,
    pub peak_host_rss_bytes: Option<u64>,
    /// GPU 0's name (CUDA builds).
    pub device_name: Option<String>,
    /// Weight bytes one decode step reads at this ISQ type.
    pub bytes_per_token: Option<u64>,
    /// Memory bandwidth used for the floor (datasheet, or --bandwidth-gbs).
    pub bandwidth_bytes_per_second: Option<f64>,
    /// bandwidth / bytes_per_token: the decode rate if only weight traffic counted.
    pub floor_tokens_per_second: Option<f64>,
    pub levels: Vec<Level>,
}

/// Options of `bench`.
pub struct BenchOptions {
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub concurrency: Vec<usize>,
    pub url: Option<String>,
    pub api_key: Option<String>,
    /// Overrides the datasheet bandwidth, GB/s.
    pub bandwidth_gbs: Option<f64>,
    /// Whether `--model` (or MODEL_NAME) named the model. With `--url` and no name, the
    /// shapes (layers, bytes per token, floor) are unknown rather than the default model's.
    pub model_named: bool,
    /// Every stream its own prompt ([`stream_prompt`]) instead of one prompt for all.
    pub distinct_prompts: bool,
    /// Mixed load: prompts of this many tokens arrive while each level's streams decode
    /// (0: off).
    pub long_prompt_tokens: usize,
    /// How many long prompts arrive, one after another, in each level's mixed phase.
    pub long_prompts: usize,
}

fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Memory bandwidth of known cards, bytes per second (NVIDIA's datasheets).
fn bandwidth_of(name: &str) -> Option<f64> {
    let n = name.to_ascii_uppercase();
    let gbs = if n.contains("H200") {
        4800.0
    } else if n.contains("H100") && n.contains("PCIE") {
        2000.0
    } else if n.contains("H100") {
        3350.0
    } else if n.contains("5090") {
        1792.0
    } else if n.contains("4090") {
        1008.0
    } else if n.contains("L40S") {
        864.0
    } else if n.contains("A100") && n.contains("80GB") {
        2039.0
    } else if n.contains("A100") {
        1555.0
    } else {
        return None;
    };
    Some(gbs * 1e9)
}

/// A prompt of exactly `n` tokens: the tokenization of a long text, cut to length.
async fn fixed_prompt(engine: &Engine, n: usize) -> Result<Vec<u32>> {
    let text =
        "The history of the mixture of experts begins with gating networks. ".repeat(n / 4 + 8);
    let ids = engine.tokenize(Prompt::Text(text)).await?;
    if ids.len() < n {
        bail!("could not build a {n}-token prompt (got {})", ids.len());
    }
    Ok(ids[..n].to_vec())
}

async fn one_in_process(
    engine: Arc<Engine>,
    prompt: Vec<u32>,
    max_tokens: usize,
    steer: Steer,
) -> Result<Sample> {
    let mut clock = Clock::new(&steer);
    let prompt_tokens = prompt.len();
    let req = GenRequest {
        prompt: Prompt::Tokens(prompt),
        max_tokens: Some(max_tokens),
        temperature: 0.0,
        top_p: None,
        top_k: None,
        stop: vec![],
        decoding: Default::default(),
    };
    let mut g = engine.generate(req).await?;
    let mut tokens = None;
    loop {
        let ev = tokio::select! {
            ev = g.events.recv() => ev,
            // Dropping the request (below) cancels it in the engine.
            () = steer.stopped() => break,
        };
        match ev {
            Some(Event::Text { .. }) => clock.token(),
            Some(Event::Done { usage, .. }) => tokens = Some(usage.completion_tokens),
            Some(Event::Error(e)) => return Err(e.into()),
            None => break,
        }
    }
    Ok(clock.finish(tokens, prompt_tokens))
}

/// One streamed `/v1/completions` request over HTTP.
async fn one_http(
    client: reqwest::Client,
    url: String,
    key: Option<String>,
    prompt: String,
    max_tokens: usize,
    steer: Steer,
) -> Result<Sample> {
    let mut clock = Clock::new(&steer);
    let body = serde_json::json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true,
                                  "stream_options": {"include_usage": true}});
    let mut req = client.post(format!("{url}/v1/completions")).json(&body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await?.error_for_status()?;
    let mut stream = resp.bytes_stream();
    let (mut tokens, mut prompt_tokens, mut buf) = (None, 0, String::new());
    loop {
        let chunk = tokio::select! {
            c = stream.next() => c,
            // Dropping the response closes the connection, which cancels the request.
            () = steer.stopped() => break,
        };
        let Some(chunk) = chunk else { break };
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(i) = buf.find("\n\n") {
            let event: String = buf.drain(..i + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(data)?;
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = Some(n as usize);
                prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize;
            } else if v["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                clock.token();
            }
        }
    }
    Ok(clock.finish(tokens, prompt_tokens))
}

/// Over HTTP the prompt travels as text of about `tokens` tokens (stream `i`'s starting with
/// its number); the server's own count (`usage.prompt_tokens`) is what the report uses.
fn prompt_text(tokens: usize, stream: Option<usize>) -> String {
    let words = "a ".repeat(tokens.saturating_sub(1));
    match stream {
        Some(i) => format!("{i} {}", &words[2.min(words.len())..]),
        None => words,
    }
}

/// Stream `i`'s prompt: `base` with positions 1 and 2 (after the first token, usually BOS)
/// set to a pair of `base`'s own tokens that no other stream gets, so the prompts differ and
/// keep their length; `None` (or a prompt too short to vary) gives `base` itself.
fn stream_prompt(base: &[u32], stream: Option<usize>) -> Vec<u32> {
    let mut p = base.to_vec();
    let Some(i) = stream else {
        return p;
    };
    let mut vocab: Vec<u32> = base.to_vec();
    vocab.sort_unstable();
    vocab.dedup();
    if p.len() >= 3 && !vocab.is_empty() {
        let m = vocab.len();
        p[1] = vocab[i % m];
        p[2] = vocab[(i / m) % m];
    }
    p
}

/// Where requests go: the engine in-process, or a server's `/v1/completions`.
struct Target {
    engine: Arc<Engine>,
    client: reqwest::Client,
    url: Option<String>,
    key: Option<String>,
}

impl Target {
    /// One request on a task of its own: `prompt` in-process, or over HTTP a text of its
    /// length (stream `stream`'s own text when given).
    fn spawn(
        &self,
        prompt: Vec<u32>,
        stream: Option<usize>,
        max_tokens: usize,
        steer: Steer,
    ) -> tokio::task::JoinHandle<Result<Sample>> {
        let (engine, client, url, key) = (
            self.engine.clone(),
            self.client.clone(),
            self.url.clone(),
            self.key.clone(),
        );
        tokio::spawn(async move {
            match url {
                None => one_in_process(engine, prompt, max_tokens, steer).await,
                Some(u) => {
                    let text = prompt_text(prompt.len(), stream);
                    one_http(client, u, key, text, max_tokens, steer).await
                }
            }
        })
    }
}

/// The mixed phase of a level: `c` streams decode (up to `budget` tokens each); once every
/// one has its first token, the long prompts are sent one after another, each answered with
/// one token; then the streams are stopped. The streams' gaps that ended inside that window
/// and the prompts' TTFT are reported.
async fn mixed_load(
    target: &Target,
    c: usize,
    prompt: &[u32],
    distinct: bool,
    long: &[u32],
    o: &BenchOptions,
    budget: usize,
) -> Result<MixedLoad> {
    let started = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let steer = Steer {
        started: Some(started.clone()),
        stop: Some(stop.clone()),
    };
    let streams: Vec<_> = (0..c)
        .map(|i| {
            let stream = distinct.then_some(i);
            target.spawn(stream_prompt(prompt, stream), stream, budget, steer.clone())
        })
        .collect();
    while started.load(Ordering::SeqCst) < c {
        if streams.iter().all(|t| t.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let window_start = Instant::now();
    let mut ttfts = Vec::with_capacity(o.long_prompts);
    for j in 0..o.long_prompts {
        // Each long prompt its own (past every stream's index), so no prefix is shared.
        let stream = Some(c + 1000 + j);
        let p = stream_prompt(long, stream);
        let s = target.spawn(p, stream, 1, Steer::default()).await??;
        ttfts.push((s.first - s.start).as_secs_f64());
    }
    let window_end = Instant::now();
    stop.cancel();
    let mut during = Vec::new();
    for t in streams {
        let s = t.await??;
        during.extend(
            s.gaps
                .iter()
                .zip(&s.arrivals)
                .filter(|(_, at)| **at >= window_start && **at <= window_end)
                .map(|(g, _)| *g),
        );
    }
    Ok(MixedLoad {
        long_prompt_tokens: long.len(),
        long_prompts: o.long_prompts,
        gaps_during_prompts: during.len(),
        inter_token_during_prompts: percentiles(during),
        long_prompt_ttft: percentiles(ttfts),
    })
}

fn summarize(concurrency: usize, samples: &[Sample]) -> Level {
    let prompt_tokens =
        samples.iter().map(|s| s.prompt_tokens).sum::<usize>() / samples.len().max(1);
    let t0 = samples
        .iter()
        .map(|s| s.start)
        .min()
        .unwrap_or_else(Instant::now);
    let t1 = samples.iter().map(|s| s.end).max().unwrap_or(t0);
    let ttfts: Vec<f64> = samples
        .iter()
        .map(|s| (s.first - s.start).as_secs_f64())
        .collect();
    let gaps: Vec<f64> = samples
        .iter()
        .flat_map(|s| s.gaps.iter().copied())
        .collect();
    let per_stream: Vec<f64> = samples
        .iter()
        .filter(|s| s.end > s.first)
        .map(|s| s.tokens.saturating_sub(1) as f64 / (s.end - s.first).as_secs_f64())
        .collect();
    let mean_ttft = ttfts.iter().sum::<f64>() / ttfts.len().max(1) as f64;
    Level {
        concurrency,
        requests: samples.len(),
        ttft: percentiles(ttfts),
        inter_token: percentiles(gaps),
        decode_tokens_per_second_per_stream: per_stream.iter().sum::<f64>()
            / per_stream.len().max(1) as f64,
        aggregate_tokens_per_second: samples.iter().map(|s| s.tokens).sum::<usize>() as f64
            / (t1 - t0).as_secs_f64().max(1e-9),
        decode_aggregate_tokens_per_second: per_stream.iter().sum(),
        fraction_of_floor: None,
        mixed: None,
        prompt_tokens_per_second: if mean_ttft > 0.0 {
            prompt_tokens as f64 / mean_ttft
        } else {
            0.0
        },
    }
}

/// The first model id a server lists on /v1/models.
async fn served_model(client: &reqwest::Client, url: &str, key: Option<&str>) -> Option<String> {
    let mut req = client.get(format!("{}/v1/models", url.trim_end_matches('/')));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let body: serde_json::Value = req.send().await.ok()?.json().await.ok()?;
    Some(body["data"][0]["id"].as_str()?.to_owned())
}

/// Runs the benchmark.
pub async fn run(mut model: ModelSettings, o: BenchOptions) -> Result<BenchReport> {
    let max_c = o.concurrency.iter().copied().max().unwrap_or(1);
    // A slot per stream, and one more for the mixed phase's long prompt.
    model.max_num_seqs = model
        .max_num_seqs
        .max(max_c + usize::from(o.long_prompt_tokens > 0));
    let started = Instant::now();
    let engine = Arc::new(Engine::new(
        &model,
        Duration::from_secs(3600),
        Arc::new(Metrics::default()),
    ));
    // Over HTTP the server has the model; only the prompt's length matters here.
    let (load_seconds, prompt) = if o.url.is_none() {
        engine.load(&model).await.context("loading the model")?;
        let loaded = started.elapsed().as_secs_f64();
        (Some(loaded), fixed_prompt(&engine, o.prompt_tokens).await?)
    } else {
        (None, vec![0; o.prompt_tokens])
    };
    // The mixed-load phase's long prompt, and how long its decoding streams may run: until
    // the model's context is full (they are stopped once the long prompts are answered).
    // In-process the loaded engine's own limit; over HTTP the server's default.
    let context = match (&o.url, engine.context_len()) {
        (None, n) if n > 0 => n,
        _ => model
            .max_model_len
            .unwrap_or(crate::settings::DEFAULT_MAX_MODEL_LEN),
    };
    let stream_budget = context.saturating_sub(o.prompt_tokens + 1);
    let long_prompt = match o.long_prompt_tokens {
        0 => None,
        n if n + 1 > context || stream_budget < 2 => bail!(
            "--long-prompt-tokens {n} and --prompt-tokens {} must each leave room in the \
             {context}-token context (--max-model-len)",
            o.prompt_tokens
        ),
        n if o.url.is_none() => Some(fixed_prompt(&engine, n).await?),
        n => Some(vec![0; n]),
    };
    let client = reqwest::Client::new();
    let mut gpu_peak = crate::preflight::driver::gpu_used_bytes();
    // Over HTTP with no model named, report what the server says it serves.
    if let (Some(url), false) = (&o.url, o.model_named)
        && let Some(id) = served_model(&client, url, o.api_key.as_deref()).await
    {
        model.served_model_name = id;
    }
    // The memory floor: weight bytes per decode step against the card's bandwidth.
    let shapes = if o.url.is_some() && !o.model_named {
        None
    } else {
        crate::preflight::known_shapes(&model)
    };
    let bits = model
        .isq
        .map_or(16.0, crate::settings::Isq::bits_per_weight);
    let bytes_per_token = shapes.map(|s| (s.active_weights_per_token() as f64 * bits / 8.0) as u64);
    let device_name = if cfg!(feature = "cuda") && !model.cpu {
        crate::preflight::driver::probe()
            .1
            .first()
            .map(|d| d.name.clone())
    } else {
        None
    };
    let bandwidth = o
        .bandwidth_gbs
        .map(|g| g * 1e9)
        .or_else(|| device_name.as_deref().and_then(bandwidth_of));
    let floor = bandwidth.zip(bytes_per_token).map(|(bw, b)| bw / b as f64);
    let mut levels = Vec::new();
    for &c in &o.concurrency {
        let target = Target {
            engine: engine.clone(),
            client: client.clone(),
            url: o.url.clone(),
            key: o.api_key.clone(),
        };
        // Warm-up: one request of the same shape, not measured.
        let warm = o.max_tokens.min(8);
        drop(
            target
                .spawn(prompt.clone(), None, warm, Steer::default())
                .await??,
        );
        let tasks: Vec<_> = (0..c)
            .map(|i| {
                let stream = o.distinct_prompts.then_some(i);
                let p = stream_prompt(&prompt, stream);
                target.spawn(p, stream, o.max_tokens, Steer::default())
            })
            .collect();
        let mut samples = Vec::new();
        for t in tasks {
            samples.push(t.await??);
        }
        gpu_peak = gpu_peak.max(crate::preflight::driver::gpu_used_bytes());
        let mut level = summarize(c, &samples);
        level.fraction_of_floor = floor.map(|f| level.decode_tokens_per_second_per_stream / f);
        if let Some(long) = &long_prompt {
            let mixed = mixed_load(
                &target,
                c,
                &prompt,
                o.distinct_prompts,
                long,
                &o,
                stream_budget,
            )
            .await?;
            gpu_peak = gpu_peak.max(crate::preflight::driver::gpu_used_bytes());
            level.mixed = Some(mixed);
        }
        tracing::info!(
            concurrency = c,
            aggregate = level.aggregate_tokens_per_second,
            "level done"
        );
        levels.push(level);
    }
    Ok(BenchReport {
        schema: "zopilot-gpu/bench/v1",
        model: model.served_model_name.clone(),
        layers: shapes.map(|s| s.layers),
        isq: model.isq.map_or("none", |i| i.name()).to_owned(),
        device: if model.cpu || !cfg!(feature = "cuda") {
            "cpu".into()
        } else {
            "cuda:0".into()
        },
        target: o.url.clone().unwrap_or_else(|| "in-process".into()),
        prompt_tokens: o.prompt_tokens,
        max_tokens: o.max_tokens,
        distinct_prompts: o.distinct_prompts,
        load_seconds,
        peak_gpu_memory_bytes: gpu_peak,
        peak_host_rss_bytes: peak_rss(),
        device_name,
        bytes_per_token,
        bandwidth_bytes_per_second: bandwidth,
        floor_tokens_per_second: floor,
        levels,
    })
}

impl BenchReport {
    /// The human-readable table.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} ({} layers, isq {}) on {} via {}; prompt {} tokens, {} new tokens each; load {:.1} s; peak GPU {} ; peak RSS {}\n",
            self.model,
            self.layers.map_or("?".into(), |l| l.to_string()),
            self.isq,
            self.device,
            self.target,
            self.prompt_tokens,
            self.max_tokens,
            self.load_seconds.unwrap_or(0.0),
            self.peak_gpu_memory_bytes.map_or("n/a".into(), |b| format!(
                "{:.1} GiB",
                b as f64 / (1u64 << 30) as f64
            )),
            self.peak_host_rss_bytes.map_or("n/a".into(), |b| format!(
                "{:.1} GiB",
                b as f64 / (1u64 << 30) as f64
            )),
        );
        if let (Some(b), Some(f)) = (self.bytes_per_token, self.floor_tokens_per_second) {
            out.push_str(&format!(
                "{:.2} GB of weights per token; bandwidth floor {f:.0} tok/s per stream\n",
                b as f64 / 1e9
            ));
        }
        out.push_str("conc  ttft p50/p90/p99 ms      itl p50/p99 ms   tok/s/stream  aggregate tok/s  decode agg  prompt tok/s  of floor\n");
        for l in &self.levels {
            let of_floor = l
                .fraction_of_floor
                .map_or("     -".into(), |f| format!("{:>5.1}%", f * 100.0));
            out.push_str(&format!(
                "{:>4}  {:>7.1}/{:>7.1}/{:>7.1}  {:>6.2}/{:>6.2}  {:>12.1}  {:>15.1}  {:>10.1}  {:>12.1}  {of_floor:>8}\n",
                l.concurrency,
                l.ttft.p50_ms,
                l.ttft.p90_ms,
                l.ttft.p99_ms,
                l.inter_token.p50_ms,
                l.inter_token.p99_ms,
                l.decode_tokens_per_second_per_stream,
                l.aggregate_tokens_per_second,
                l.decode_aggregate_tokens_per_second,
                l.prompt_tokens_per_second
            ));
        }
        for l in &self.levels {
            if let Some(m) = &l.mixed {
                out.push_str(&format!(
                    "{:>4}  with {} prompts of {} tokens arriving: itl p50/p99 {:.2}/{:.2} ms ({} gaps; {:.2} ms p50 without); their ttft p50/p99 {:.1}/{:.1} ms\n",
                    l.concurrency,
                    m.long_prompts,
                    m.long_prompt_tokens,
                    m.inter_token_during_prompts.p50_ms,
                    m.inter_token_during_prompts.p99_ms,
                    m.gaps_during_prompts,
                    l.inter_token.p50_ms,
                    m.long_prompt_ttft.p50_ms,
                    m.long_prompt_ttft.p99_ms,
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_prompts_differ_per_stream_and_keep_their_length() {
        let base: Vec<u32> = (0..40).map(|t| 100 + t % 7).collect();
        let prompts: Vec<Vec<u32>> = (0..32).map(|i| stream_prompt(&base, Some(i))).collect();
        for p in &prompts {
            assert_eq!(p.len(), base.len());
            assert_eq!(p[0], base[0]);
            assert_eq!(p[3..], base[3..]);
        }
        let mut unique = prompts.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            prompts.len(),
            "7 tokens give 49 distinct pairs"
        );
        assert_eq!(stream_prompt(&base, None), base);
    }

    #[test]
    fn http_prompt_texts_differ_per_stream_only_when_asked() {
        assert_eq!(prompt_text(5, None), "a a a a ");
        assert_eq!(prompt_text(5, Some(12)), "12 a a a ");
        assert_ne!(prompt_text(5, Some(1)), prompt_text(5, Some(2)));
    }
}
