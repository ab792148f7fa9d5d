//! `zopilot-gpu selftest`: proves that this binary's kernels run on this device and give
//! sane numbers. It loads the tiny synthetic Mixtral on the device (unquantized and with
//! ISQ Q4K) and on the CPU in f32 as the reference, then compares the logits of one prompt
//! and a greedy continuation.
//!
//! Tolerances: the synthetic head gives logits with a standard deviation of ~8, so the
//! comparison is `max |device − cpu| / std(cpu)`. Unquantized, the device runs the same
//! bf16 weights with bf16 activations (8-bit mantissa, ~0.4 % per rounding, a few dozen
//! roundings deep), so ≤ 0.05 std; with Q4K both sides use the same 4-bit weights but
//! quantize activations differently (Q8_1 on CUDA, Q8_K on the CPU), so ≤ 0.25 std. Above
//! that something is wrong with the kernels, not with rounding. The greedy argmax of the
//! prompt must agree, and so must the first tokens of a greedy continuation.

use std::time::Instant;

use serde::Serialize;

use crate::cli::Preset;
use crate::engine::{Backend, MistralBackend, Prompt, Sampling, Step};
use crate::settings::{Isq, ModelSettings, ModelSource};

const PROMPT: &str = "The quick brown fox jumps over the lazy dog";
const GREEDY_TOKENS: usize = 8;

/// One comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    pub isq: &'static str,
    pub argmax_agrees: bool,
    /// max |device − cpu| / std(cpu logits).
    pub normalized_error: f64,
    pub tolerance: f64,
    pub greedy_device: String,
    pub greedy_cpu: String,
    pub greedy_agrees: bool,
    pub passed: bool,
}

/// The self-test's result.
#[derive(Debug, Clone, Serialize)]
pub struct SelfTest {
    pub device: &'static str,
    pub passed: bool,
    pub cases: Vec<Case>,
    pub seconds: f64,
}

fn tiny(cpu: bool, isq: Option<Isq>) -> ModelSettings {
    ModelSettings {
        source: ModelSource::Synthetic(Preset::Tiny),
        revision: None,
        isq,
        max_model_len: Some(512),
        max_num_seqs: 1,
        kv_cache_tokens: 2048,
        cpu,
        hf_token: None,
        hf_home: None,
        served_model_name: "selftest".into(),
        log_json: false,
    }
}

async fn greedy(b: &MistralBackend, ids: Vec<u32>) -> anyhow::Result<String> {
    let mut rx = b
        .start(
            ids,
            Sampling {
                max_tokens: GREEDY_TOKENS,
                temperature: 0.0,
                top_p: None,
                top_k: None,
            },
        )
        .await?;
    let mut text = String::new();
    while let Some(step) = rx.recv().await {
        match step {
            Step::Text { text: t, finish } => {
                text.push_str(&t);
                if finish.is_some() {
                    break;
                }
            }
            Step::Failed(e) => anyhow::bail!(e),
        }
    }
    Ok(text)
}

fn compare(device: &[f32], cpu: &[f32]) -> (bool, f64) {
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    };
    let n = cpu.len().min(device.len());
    let (d, c) = (&device[device.len() - n..], &cpu[cpu.len() - n..]);
    let mean = c.iter().map(|x| *x as f64).sum::<f64>() / n as f64;
    let std = (c.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
    let max_err = d
        .iter()
        .zip(c)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, f64::max);
    (argmax(d) == argmax(c), max_err / std.max(1e-9))
}

/// Runs the self-test on the GPU, or on the CPU against itself with `cpu`.
pub async fn run(cpu: bool) -> anyhow::Result<SelfTest> {
    let started = Instant::now();
    let mut cases = Vec::new();
    for (isq, name, tolerance) in [(None, "none", 0.05), (Some(Isq::Q4K), "q4k", 0.25)] {
        let reference = MistralBackend::load(&tiny(true, isq)).await?;
        let device = if cpu {
            None
        } else {
            Some(MistralBackend::load(&tiny(false, isq)).await?)
        };
        let subject = device.as_ref().unwrap_or(&reference);
        let ids = reference.tokenize(Prompt::Text(PROMPT.into())).await?;
        let (argmax_agrees, normalized_error) = compare(
            &subject.prompt_logits(ids.clone()).await?,
            &reference.prompt_logits(ids.clone()).await?,
        );
        let greedy_device = greedy(subject, ids.clone()).await?;
        let greedy_cpu = greedy(&reference, ids).await?;
        // Q4K may drift once tokens pass, but never on the first few characters.
        let greedy_agrees = if isq.is_none() {
            greedy_device == greedy_cpu
        } else {
            greedy_device.chars().take(4).eq(greedy_cpu.chars().take(4))
        };
        let passed = argmax_agrees && normalized_error <= tolerance && greedy_agrees;
        cases.push(Case {
            isq: name,
            argmax_agrees,
            normalized_error,
            tolerance,
            greedy_device,
            greedy_cpu,
            greedy_agrees,
            passed,
        });
    }
    Ok(SelfTest {
        device: if cpu { "cpu" } else { "cuda:0" },
        passed: cases.iter().all(|c| c.passed),
        cases,
        seconds: started.elapsed().as_secs_f64(),
    })
}
