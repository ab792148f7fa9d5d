//! `zopilot-gpu bench`: drives the engine in-process (or a running server over HTTP with
//! `--url`) with a fixed prompt length and output length at a list of concurrency levels,
//! and reports TTFT percentiles, inter-token latency, per-stream and aggregate decode
//! rates, prompt rate, load time, peak GPU memory and peak host RSS. Greedy decoding;
//! synthetic models never emit EOS, so every request generates exactly `--max-tokens`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use serde::Serialize;

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
    /// Gaps between consecutive tokens, seconds.
    gaps: Vec<f64>,
}

/// Token arrival times of one request, as they happen.
struct Clock {
    start: Instant,
    first: Option<Instant>,
    last: Instant,
    gaps: Vec<f64>,
}

impl Clock {
    fn new() -> Self {
        let now = Instant::now();
        Clock {
            start: now,
            first: None,
            last: now,
            gaps: Vec::new(),
        }
    }

    /// A token arrived now.
    fn token(&mut self) {
        let now = Instant::now();
        if self.first.is_some() {
            self.gaps.push((now - self.last).as_secs_f64());
        }
        self.first.get_or_insert(now);
        self.last = now;
    }

    fn finish(self, tokens: usize, prompt_tokens: usize) -> Sample {
        Sample {
            start: self.start,
            first: self.first.unwrap_or(self.last),
            end: self.last,
            tokens,
            prompt_tokens,
            gaps: self.gaps,
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
) -> Result<Sample> {
    let mut clock = Clock::new();
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
    let mut tokens = 0;
    while let Some(ev) = g.events.recv().await {
        match ev {
            Event::Text { .. } => clock.token(),
            Event::Done { usage, .. } => tokens = usage.completion_tokens,
            Event::Error(e) => return Err(e.into()),
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
) -> Result<Sample> {
    let mut clock = Clock::new();
    let body = serde_json::json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true,
                                  "stream_options": {"include_usage": true}});
    let mut req = client.post(format!("{url}/v1/completions")).json(&body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await?.error_for_status()?;
    let mut stream = resp.bytes_stream();
    let (mut tokens, mut prompt_tokens, mut buf) = (0, 0, String::new());
    while let Some(chunk) = stream.next().await {
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
                tokens = n as usize;
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
    model.max_num_seqs = model.max_num_seqs.max(max_c);
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
        // Warm-up: one request of the same shape, not measured.
        match &o.url {
            None => {
                drop(one_in_process(engine.clone(), prompt.clone(), o.max_tokens.min(8)).await?)
            }
            Some(u) => drop(
                one_http(
                    client.clone(),
                    u.clone(),
                    o.api_key.clone(),
                    prompt_text(prompt.len(), None),
                    o.max_tokens.min(8),
                )
                .await?,
            ),
        }
        let tasks: Vec<_> = (0..c)
            .map(|i| {
                let stream = o.distinct_prompts.then_some(i);
                let (engine, prompt, client, url, key) = (
                    engine.clone(),
                    stream_prompt(&prompt, stream),
                    client.clone(),
                    o.url.clone(),
                    o.api_key.clone(),
                );
                tokio::spawn(async move {
                    match url {
                        None => one_in_process(engine, prompt, o.max_tokens).await,
                        Some(u) => {
                            let text = prompt_text(prompt.len(), stream);
                            one_http(client, u, key, text, o.max_tokens).await
                        }
                    }
                })
            })
            .collect();
        let mut samples = Vec::new();
        for t in tasks {
            samples.push(t.await??);
        }
        gpu_peak = gpu_peak.max(crate::preflight::driver::gpu_used_bytes());
        let mut level = summarize(c, &samples);
        level.fraction_of_floor = floor.map(|f| level.decode_tokens_per_second_per_stream / f);
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
