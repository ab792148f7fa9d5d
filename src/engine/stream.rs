//! The per-request task between a backend sequence and its consumer: stop strings (with
//! hold-back so a stop string never leaks into streamed text), each token's log-probabilities
//! sent with the piece of text that completes it, token counts and timings, the request
//! deadline, and cancellation when the consumer goes away.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::{EngineError, Event, FinishReason, Step, TokenLogprob, Usage};
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

/// Text not yet sent, and the log-probabilities of the tokens that wrote it, each with the
/// byte range of its text there.
#[derive(Default)]
struct Pending {
    text: String,
    tokens: Vec<(usize, usize, TokenLogprob)>,
}

impl Pending {
    fn push(&mut self, text: &str, logprob: Option<TokenLogprob>) {
        let start = self.text.len();
        self.text.push_str(text);
        if let Some(lp) = logprob {
            self.tokens.push((start, self.text.len(), lp));
        }
    }

    /// The first `cut` bytes, with the tokens whose text ends within them.
    fn take(&mut self, cut: usize) -> (String, Vec<TokenLogprob>) {
        let piece: String = self.text.drain(..cut).collect();
        let done = self.tokens.iter().take_while(|t| t.1 <= cut).count();
        let tokens = self.tokens.drain(..done).map(|t| t.2).collect();
        for t in &mut self.tokens {
            t.0 = t.0.saturating_sub(cut);
            t.1 = t.1.saturating_sub(cut);
        }
        (piece, tokens)
    }

    /// Cuts the text at a stop string: tokens that wrote none of what is kept go too.
    fn truncate(&mut self, at: usize) {
        self.text.truncate(at);
        self.tokens.retain(|t| t.0 < at || t.0 == t.1);
        for t in &mut self.tokens {
            t.1 = t.1.min(at);
        }
    }
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
    let mut pending = Pending::default();
    let mut generated = 0usize;
    let mut first: Option<Instant> = None;
    let mut last = admitted;

    let outcome = loop {
        let step = tokio::select! {
            s = steps.recv() => s,
            _ = tokio::time::sleep_until(deadline.into()) => break Outcome::Timeout,
            _ = out.closed() => break Outcome::Cancelled,
        };
        let finish = match step {
            None => {
                let reason = if generated >= max_tokens {
                    FinishReason::Length
                } else {
                    FinishReason::Stop
                };
                break Outcome::Finished(reason);
            }
            Some(Step::Failed(msg)) => break Outcome::Failed(msg),
            Some(Step::Text {
                text,
                finish,
                logprob,
            }) => {
                pending.push(&text, logprob);
                finish
            }
        };
        generated += 1;
        metrics.generated_tokens.fetch_add(1, Relaxed);
        last = Instant::now();
        if first.is_none() {
            first = Some(last);
            metrics.ttft.observe((last - admitted).as_secs_f64());
        }
        let (cut, done) = match find_stop(&pending.text, &stop) {
            Some(at) => {
                pending.truncate(at);
                (pending.text.len(), Some(FinishReason::Stop))
            }
            None if finish.is_some() => (pending.text.len(), finish),
            None => (
                floor_boundary(&pending.text, pending.text.len().saturating_sub(hold_back)),
                None,
            ),
        };
        // A token that wrote no text yet (it ends inside a character) goes with the next piece.
        if cut > 0 {
            let (text, logprobs) = pending.take(cut);
            if out.send(Event::Text { text, logprobs }).await.is_err() {
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
            if !pending.text.is_empty() || !pending.tokens.is_empty() {
                let end = pending.text.len();
                let (text, mut logprobs) = pending.take(end);
                logprobs.extend(pending.tokens.drain(..).map(|t| t.2));
                let _ = out.send(Event::Text { text, logprobs }).await;
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
        Outcome::Failed(msg) => Event::Error(EngineError::from_step_failure(msg)),
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

    fn lp(token: &str) -> TokenLogprob {
        TokenLogprob {
            id: 0,
            token: token.into(),
            logprob: -1.0,
            top: vec![],
        }
    }

    #[test]
    fn tokens_go_out_with_the_text_that_completes_them() {
        let mut p = Pending::default();
        p.push("ab", Some(lp("ab")));
        p.push("c", Some(lp("c")));
        let (text, tokens) = p.take(2);
        assert_eq!(text, "ab");
        assert_eq!(tokens, vec![lp("ab")]);
        // "é" in two tokens: the first writes nothing until the second completes it.
        p.push("", Some(lp("")));
        p.push("é", Some(lp("é")));
        let (text, tokens) = p.take(p.text.len());
        assert_eq!(text, "cé");
        assert_eq!(tokens, vec![lp("c"), lp(""), lp("é")]);
    }

    #[test]
    fn a_stop_string_drops_the_tokens_that_only_wrote_it() {
        let mut p = Pending::default();
        p.push("x E", Some(lp("x E")));
        p.push("ND", Some(lp("ND")));
        p.push("!", Some(lp("!")));
        p.truncate(find_stop(&p.text, &["END".to_owned()]).unwrap());
        let (text, tokens) = p.take(p.text.len());
        assert_eq!(text, "x ");
        assert_eq!(
            tokens,
            vec![lp("x E")],
            "the token that began the stop string stays"
        );
    }

    #[test]
    fn boundary_never_splits_a_character() {
        let s = "aé";
        assert_eq!(floor_boundary(s, 2), 1);
        assert_eq!(floor_boundary(s, 3), 3);
    }
}
