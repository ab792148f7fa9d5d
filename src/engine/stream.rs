//! The per-request task between a backend sequence and its consumer: stop strings (with
//! hold-back so a stop string never leaks into streamed text), token counts and timings,
//! the request deadline, and cancellation when the consumer goes away.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::{EngineError, Event, FinishReason, Step, Usage};
use crate::metrics::Metrics;

pub(super) struct StreamCtx {
    pub steps: mpsc::Receiver<Step>,
    pub out: mpsc::Sender<Event>,
    pub stop: Vec<String>,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub admitted: Instant,
    pub deadline: Instant,
    pub timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// Held until the sequence ends, so admission counts running sequences exactly.
    pub permit: OwnedSemaphorePermit,
}

enum Outcome {
    Finished(FinishReason),
    Failed(String),
    Timeout,
    Cancelled,
}

/// Finds the earliest stop string in `text`, returning where it starts.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

pub(super) async fn run(c: StreamCtx) {
    let StreamCtx {
        mut steps,
        out,
        stop,
        prompt_tokens,
        max_tokens,
        admitted,
        deadline,
        timeout,
        metrics,
        permit,
    } = c;
    metrics.in_flight.fetch_add(1, Relaxed);
    metrics
        .prompt_tokens
        .fetch_add(prompt_tokens as u64, Relaxed);
    let hold_back = stop
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(1)
        .saturating_sub(1);
    let mut pending = String::new();
    let mut generated = 0usize;
    let mut first: Option<Instant> = None;
    let mut last = admitted;

    let outcome = loop {
        let step = tokio::select! {
            s = steps.recv() => s,
            _ = tokio::time::sleep_until(deadline.into()) => break Outcome::Timeout,
            _ = out.closed() => break Outcome::Cancelled,
        };
        let (text, finish) = match step {
            None => {
                let reason = if generated >= max_tokens {
                    FinishReason::Length
                } else {
                    FinishReason::Stop
                };
                break Outcome::Finished(reason);
            }
            Some(Step::Failed(msg)) => break Outcome::Failed(msg),
            Some(Step::Text { text, finish }) => (text, finish),
        };
        generated += 1;
        metrics.generated_tokens.fetch_add(1, Relaxed);
        last = Instant::now();
        if first.is_none() {
            first = Some(last);
            metrics.ttft.observe((last - admitted).as_secs_f64());
        }
        pending.push_str(&text);
        let (cut, done) = match find_stop(&pending, &stop) {
            Some(at) => {
                pending.truncate(at);
                (pending.len(), Some(FinishReason::Stop))
            }
            None if finish.is_some() => (pending.len(), finish),
            None => (
                floor_boundary(&pending, pending.len().saturating_sub(hold_back)),
                None,
            ),
        };
        if cut > 0 {
            let piece: String = pending.drain(..cut).collect();
            if out.send(Event::Text(piece)).await.is_err() {
                break Outcome::Cancelled;
            }
        }
        if let Some(reason) = done {
            break Outcome::Finished(reason);
        }
    };
    // Dropping the backend's receiver is what cancels a sequence still running.
    drop(steps);
    metrics.in_flight.fetch_sub(1, Relaxed);
    drop(permit);

    let event = match outcome {
        Outcome::Finished(reason) => {
            if !pending.is_empty() {
                let _ = out.send(Event::Text(std::mem::take(&mut pending))).await;
            }
            let completion = if reason == FinishReason::Length {
                max_tokens
            } else {
                generated
            };
            let decode_secs = first.map_or(0.0, |f| (last - f).as_secs_f64());
            let usage = Usage {
                prompt_tokens,
                completion_tokens: completion,
                total_tokens: prompt_tokens + completion,
                ttft_ms: first.map_or(0.0, |f| (f - admitted).as_secs_f64() * 1e3),
                decode_tokens_per_second: if decode_secs > 0.0 {
                    (generated.saturating_sub(1)) as f64 / decode_secs
                } else {
                    0.0
                },
            };
            metrics
                .request_duration
                .observe(admitted.elapsed().as_secs_f64());
            Event::Done {
                finish_reason: reason,
                usage,
            }
        }
        Outcome::Failed(msg) => Event::Error(EngineError::Internal(msg)),
        Outcome::Timeout => {
            metrics.cancelled.fetch_add(1, Relaxed);
            Event::Error(EngineError::Timeout(timeout))
        }
        Outcome::Cancelled => {
            metrics.cancelled.fetch_add(1, Relaxed);
            tracing::info!(generated, "client went away; sequence cancelled");
            return;
        }
    };
    let _ = out.send(event).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_stop_string_wins() {
        let stops = vec!["END".to_owned(), "b".to_owned()];
        assert_eq!(find_stop("a b END", &stops), Some(2));
        assert_eq!(find_stop("nothing", &stops), None);
    }

    #[test]
    fn boundary_never_splits_a_character() {
        let s = "aé";
        assert_eq!(floor_boundary(s, 2), 1);
        assert_eq!(floor_boundary(s, 3), 3);
    }
}
