//! Process-wide counters, gauges and histograms, rendered in the Prometheus text format.
//! Lock-free on the request path (atomics); label sets are small and fixed.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Seconds buckets shared by the latency histograms.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// A cumulative histogram of seconds.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                self.counts[i].fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add((seconds * 1e6) as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.counts[i].load(Relaxed)
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Every metric the server exports.
#[derive(Default)]
pub struct Metrics {
    /// (endpoint, status) → count.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// error type → count.
    errors: Mutex<BTreeMap<&'static str, u64>>,
    pub rejected: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub in_flight: AtomicI64,
    /// Requests waiting for a sequence slot.
    pub queued: AtomicI64,
    pub cancelled: AtomicU64,
    pub model_load_millis: AtomicU64,
    pub ttft: Histogram,
    pub request_duration: Histogram,
    /// Time admitted requests waited for a slot (0 when one was free).
    pub queue_wait: Histogram,
}

impl Metrics {
    pub fn record_request(&self, endpoint: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((endpoint.to_owned(), status)).or_default() += 1;
    }

    pub fn record_error(&self, kind: &'static str) {
        let mut m = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(kind).or_default() += 1;
    }

    /// The Prometheus exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP zopilot_requests_total HTTP requests by endpoint and status.\n# TYPE zopilot_requests_total counter\n");
        for ((ep, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "zopilot_requests_total{{endpoint=\"{ep}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP zopilot_errors_total Failed requests by error type.\n# TYPE zopilot_errors_total counter\n");
        for (kind, n) in self.errors.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "zopilot_errors_total{{type=\"{kind}\"}} {n}");
        }
        let scalar = |out: &mut String, name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        scalar(
            &mut out,
            "zopilot_rejected_total",
            "counter",
            "Requests refused with 429: every sequence slot busy and the queue full, or the wait past its limit.",
            self.rejected.load(Relaxed).to_string(),
        );
        scalar(
            &mut out,
            "zopilot_prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            self.prompt_tokens.load(Relaxed).to_string(),
        );
        scalar(
            &mut out,
            "zopilot_generated_tokens_total",
            "counter",
            "Tokens generated.",
            self.generated_tokens.load(Relaxed).to_string(),
        );
        scalar(
            &mut out,
            "zopilot_cancelled_total",
            "counter",
            "Sequences cancelled because the client went away or timed out.",
            self.cancelled.load(Relaxed).to_string(),
        );
        scalar(
            &mut out,
            "zopilot_in_flight_sequences",
            "gauge",
            "Sequences being generated now.",
            self.in_flight.load(Relaxed).to_string(),
        );
        scalar(
            &mut out,
            "zopilot_queued_requests",
            "gauge",
            "Requests waiting for a sequence slot.",
            self.queued.load(Relaxed).to_string(),
        );
        scalar(
            &mut out,
            "zopilot_model_load_seconds",
            "gauge",
            "Seconds the model took to load (0 until loaded).",
            format!("{}", self.model_load_millis.load(Relaxed) as f64 / 1e3),
        );
        self.ttft.render(
            &mut out,
            "zopilot_time_to_first_token_seconds",
            "Time from request to first generated token.",
        );
        self.request_duration.render(
            &mut out,
            "zopilot_request_duration_seconds",
            "Time from request to the last token.",
        );
        self.queue_wait.render(
            &mut out,
            "zopilot_queue_wait_seconds",
            "Time admitted requests waited for a sequence slot.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.ttft.observe(0.02);
        m.ttft.observe(3.0);
        let text = m.render();
        assert!(text.contains("zopilot_time_to_first_token_seconds_bucket{le=\"0.025\"} 1"));
        assert!(text.contains("zopilot_time_to_first_token_seconds_bucket{le=\"5\"} 2"));
        assert!(text.contains("zopilot_time_to_first_token_seconds_count 2"));
    }
}
