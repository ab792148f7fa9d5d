//! How far the model load is: the phase, bytes done of the phase's total, rate and ETA —
//! logged at info level every 10 % (RunPod's log is all a user sees of a cold start) and
//! shown by `/health` while loading. One load per process, so one process-wide record,
//! advanced by the weight stores as tensors are read or quantized.

use std::sync::Mutex;
use std::time::Instant;

use serde_json::{Value, json};

struct State {
    phase: &'static str,
    done: u64,
    total: u64,
    started: Instant,
    logged_tenth: u64,
}

static LOAD: Mutex<Option<State>> = Mutex::new(None);

/// Starts `phase`, whose work is `total` bytes.
pub fn begin(phase: &'static str, total: u64) {
    tracing::info!("loading: {phase}, {:.1} GB", total as f64 / 1e9);
    *LOAD.lock().unwrap_or_else(|e| e.into_inner()) = Some(State {
        phase,
        done: 0,
        total,
        started: Instant::now(),
        logged_tenth: 0,
    });
}

/// `bytes` more of the current phase done.
pub fn advance(bytes: u64) {
    let mut guard = LOAD.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = guard.as_mut() else { return };
    s.done = (s.done + bytes).min(s.total);
    let tenth = (s.done * 10).checked_div(s.total).unwrap_or(10);
    if tenth > s.logged_tenth {
        s.logged_tenth = tenth;
        let v = snapshot_of(s);
        tracing::info!(
            "loading: {} {}% ({:.1} of {:.1} GB, {:.2} GB/s, ETA {:.0} s)",
            s.phase,
            v["percent"],
            s.done as f64 / 1e9,
            s.total as f64 / 1e9,
            v["rate_bytes_per_second"].as_f64().unwrap_or(0.0) / 1e9,
            v["eta_seconds"].as_f64().unwrap_or(0.0)
        );
    }
}

/// Clears the record (the load finished or failed).
pub fn end() {
    *LOAD.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

fn snapshot_of(s: &State) -> Value {
    let secs = s.started.elapsed().as_secs_f64();
    let rate = if secs > 0.0 {
        s.done as f64 / secs
    } else {
        0.0
    };
    let eta = if rate > 0.0 {
        Some(((s.total - s.done) as f64 / rate * 10.0).round() / 10.0)
    } else {
        None
    };
    json!({
        "phase": s.phase,
        "percent": (s.done * 100).checked_div(s.total).unwrap_or(100),
        "bytes_done": s.done,
        "bytes_total": s.total,
        "rate_bytes_per_second": rate.round(),
        "eta_seconds": eta,
    })
}

/// The current phase and its progress, if a load is under way.
pub fn snapshot() -> Option<Value> {
    LOAD.lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(snapshot_of)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reports_percent_and_clears() {
        begin("reading quantized weights", 1000);
        advance(250);
        advance(0);
        let s = snapshot().unwrap();
        assert_eq!(s["phase"], "reading quantized weights");
        assert_eq!(
            (s["percent"].as_u64(), s["bytes_done"].as_u64()),
            (Some(25), Some(250))
        );
        advance(5000);
        assert_eq!(snapshot().unwrap()["percent"], 100, "never past the total");
        end();
        assert!(snapshot().is_none());
    }
}
