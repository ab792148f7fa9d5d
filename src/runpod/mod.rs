//! The RunPod queue worker, speaking the wire protocol of runpod-python 1.12: take jobs
//! (long-poll, batched when several slots are free), run them, stream partials, post each
//! result exactly once (retried with capped exponential backoff and jitter), heartbeat with
//! the in-progress ids, honour stop requests, and drain on SIGTERM. No HTTP server lives
//! in this loop; jobs run through the API router in-process (`jobs`).

pub mod jobs;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use axum::Router;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, Readiness};
use crate::settings::JobServer;

/// Reported to RunPod as `runpod_version`.
const VERSION: &str = concat!("zopilot-gpu/", env!("CARGO_PKG_VERSION"));
/// The SDK's long-poll client timeout.
const TAKE_TIMEOUT: Duration = Duration::from_secs(90);
/// Attempts at posting one result before giving up (and logging it).
const POST_ATTEMPTS: u32 = 6;

/// Capped exponential backoff with jitter: 0.25 s, 0.5 s, ... up to 8 s, ±25 %.
pub fn backoff(attempt: u32) -> Duration {
    let base = 250u64.saturating_mul(1 << attempt.min(5)).min(8000);
    let jitter = (uuid::Uuid::new_v4().as_u128() % (base as u128 / 2 + 1)) as u64;
    Duration::from_millis(base - base / 4 + jitter)
}

/// The job server's URLs with this worker's id filled in.
#[derive(Clone)]
pub struct Urls {
    take: String,
    stop: String,
    output: String,
    stream: String,
    ping: Option<String>,
}

impl Urls {
    pub fn new(s: &JobServer) -> Self {
        let take = s.get_job.replace("$ID", &s.worker_id);
        Urls {
            stop: take.replace("/job-take/", "/job-stop/"),
            take,
            output: s.post_output.replace("$RUNPOD_POD_ID", &s.worker_id),
            stream: s.post_stream.replace("$RUNPOD_POD_ID", &s.worker_id),
            ping: s
                .ping
                .as_ref()
                .map(|p| p.replace("$RUNPOD_POD_ID", &s.worker_id)),
        }
    }

    fn take(&self, batch: usize, in_progress: bool) -> String {
        let flag = format!("&job_in_progress={}", u8::from(in_progress));
        if batch > 1 {
            format!(
                "{}{flag}&batch_size={batch}",
                self.take.replace("/job-take/", "/job-take-batch/")
            )
        } else {
            format!("{}{flag}", self.take)
        }
    }

    fn done(&self, job: &str, stream: bool) -> String {
        format!("{}&isStream={stream}", self.output.replace("$ID", job))
    }

    fn partial(&self, job: &str) -> String {
        format!("{}&isStream=true", self.stream.replace("$ID", job))
    }
}

/// The running jobs and their cancel switches.
type InProgress = Arc<Mutex<HashMap<String, CancellationToken>>>;

struct Worker {
    http: reqwest::Client,
    urls: Urls,
    key: String,
    /// Timeout of result, stream and heartbeat calls.
    call_timeout: Duration,
    router: Router,
    in_progress: InProgress,
    aggregate_stream: bool,
}

/// Runs the worker until `shutdown`, then lets running jobs finish within `grace`.
pub async fn run(
    server: JobServer,
    engine: Arc<Engine>,
    router: Router,
    shutdown: CancellationToken,
    grace: Duration,
    aggregate_stream: bool,
) -> Result<()> {
    let w = Arc::new(Worker {
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()?,
        urls: Urls::new(&server),
        key: server.api_key.clone(),
        call_timeout: server.call_timeout,
        router,
        in_progress: Arc::default(),
        aggregate_stream,
    });
    let stopping = CancellationToken::new();
    let heartbeat = tokio::spawn(w.clone().heartbeat(server.ping_interval, stopping.clone()));
    let stops = tokio::spawn(w.clone().watch_stops(stopping.clone()));
    let slots = Arc::new(Semaphore::new(engine.max_num_seqs()));
    let mut jobs = tokio::task::JoinSet::new();
    let mut failures = 0u32;
    loop {
        match engine.readiness() {
            Readiness::Ready => {}
            Readiness::Failed(reason) => anyhow::bail!("the model failed to load: {reason}"),
            _ => {
                tokio::select! { _ = shutdown.cancelled() => break, _ = tokio::time::sleep(Duration::from_millis(200)) => continue }
            }
        }
        // Never take a job that cannot start: hold a slot for each one asked for.
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => p?,
            _ = shutdown.cancelled() => break,
        };
        let mut permits = vec![first];
        while let Ok(p) = slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        let taken = tokio::select! {
            t = w.take(permits.len()) => t,
            _ = shutdown.cancelled() => break,
        };
        match taken {
            Ok(list) => {
                failures = 0;
                for job in list {
                    let Some(permit) = permits.pop() else {
                        tracing::error!(
                            "the job server sent more jobs than asked for; the rest wait for a slot"
                        );
                        break;
                    };
                    let w = w.clone();
                    jobs.spawn(async move {
                        w.run_job(job).await;
                        drop(permit);
                    });
                }
            }
            Err(TakeError::RateLimited) => tokio::time::sleep(backoff(3)).await,
            Err(TakeError::Failed(e)) => {
                failures += 1;
                tracing::warn!(error = %e, "job take failed; backing off");
                tokio::time::sleep(backoff(failures)).await;
            }
        }
        while jobs.try_join_next().is_some() {}
    }
    tracing::info!(
        running = jobs.len(),
        "stopping: no new jobs; finishing the running ones"
    );
    let drained =
        tokio::time::timeout(grace, async { while jobs.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(?grace, "grace period over; abandoning running jobs");
    }
    stopping.cancel();
    let _ = tokio::join!(heartbeat, stops);
    Ok(())
}

enum TakeError {
    RateLimited,
    Failed(String),
}

impl Worker {
    fn in_progress_ids(&self) -> Vec<String> {
        self.in_progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    async fn take(&self, batch: usize) -> Result<Vec<Value>, TakeError> {
        let url = self.urls.take(batch, !self.in_progress_ids().is_empty());
        let resp = self
            .http
            .get(url)
            .header("Authorization", &self.key)
            .timeout(TAKE_TIMEOUT)
            .send()
            .await
            .map_err(|e| TakeError::Failed(e.to_string()))?;
        match resp.status().as_u16() {
            204 | 400 => return Ok(vec![]),
            429 => return Err(TakeError::RateLimited),
            s if !(200..300).contains(&s) => return Err(TakeError::Failed(format!("status {s}"))),
            _ => {}
        }
        let text = resp
            .text()
            .await
            .map_err(|e| TakeError::Failed(e.to_string()))?;
        if text.trim().is_empty() {
            return Ok(vec![]);
        }
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| TakeError::Failed(format!("unreadable job: {e}")))?;
        Ok(match v {
            Value::Array(list) => list,
            Value::Null => vec![],
            one => vec![one],
        })
    }

    /// Runs one job and answers it exactly once (or not at all if it was stopped).
    async fn run_job(self: Arc<Self>, job: Value) {
        let Some(id) = job["id"].as_str().map(str::to_owned) else {
            tracing::error!(%job, "a job without an id cannot be answered; skipped");
            return;
        };
        let cancel = CancellationToken::new();
        self.in_progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), cancel.clone());
        tracing::info!(job_id = %id, "job started");
        let outcome = tokio::select! {
            o = self.clone().answer(&id, &job["input"]) => Some(o),
            _ = cancel.cancelled() => None,
        };
        match outcome {
            Some((body, streamed)) => self.post_done(&id, &body, streamed).await,
            None => tracing::info!(job_id = %id, "job stopped by the job server; nothing posted"),
        }
        self.in_progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// The result body (`{"output"}` or `{"error"}`) and whether it was streamed.
    async fn answer(self: Arc<Self>, id: &str, input: &Value) -> (Value, bool) {
        let call = match jobs::parse(input) {
            Ok(c) => c,
            Err(e) => return (json!({"error": e}), false),
        };
        if !call.stream {
            return match jobs::execute(self.router.clone(), call, None).await {
                Ok(output) => (json!({"output": output}), false),
                Err(e) => (json!({"error": e}), false),
            };
        }
        let (tx, mut rx) = mpsc::channel::<Value>(64);
        let run = tokio::spawn(jobs::execute(self.router.clone(), call, Some(tx)));
        let mut all = Vec::new();
        while let Some(partial) = rx.recv().await {
            self.post_with_retry(&self.urls.partial(id), id, &json!({"output": partial}))
                .await;
            if self.aggregate_stream {
                all.push(partial);
            }
        }
        match run.await {
            Ok(Ok(_)) => (
                json!({"output": if self.aggregate_stream { Value::Array(all) } else { Value::Null }}),
                true,
            ),
            Ok(Err(e)) => (json!({"error": e}), true),
            Err(e) => (json!({"error": format!("job task failed: {e}")}), true),
        }
    }

    async fn post_done(&self, id: &str, body: &Value, streamed: bool) {
        if body.get("error").is_some() {
            tracing::warn!(job_id = %id, error = %body["error"], "job failed");
        }
        if self
            .post_with_retry(&self.urls.done(id, streamed), id, body)
            .await
        {
            tracing::info!(job_id = %id, "job done");
        }
    }

    /// POSTs the same body until it lands; true if it did.
    async fn post_with_retry(&self, url: &str, id: &str, body: &Value) -> bool {
        let text = body.to_string();
        for attempt in 0..POST_ATTEMPTS {
            let sent = self
                .http
                .post(url)
                // What runpod-python sends, though the body is JSON.
                .header("Content-Type", "application/x-www-form-urlencoded")
                .header("X-Request-ID", id)
                .header("Authorization", &self.key)
                .timeout(self.call_timeout)
                .body(text.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => return true,
                Ok(r) => {
                    tracing::warn!(job_id = %id, status = r.status().as_u16(), attempt, "post refused; retrying")
                }
                Err(e) => {
                    tracing::warn!(job_id = %id, error = %e, attempt, "post failed; retrying")
                }
            }
            tokio::time::sleep(backoff(attempt)).await;
        }
        tracing::error!(job_id = %id, "could not deliver the result after {POST_ATTEMPTS} attempts");
        false
    }

    async fn heartbeat(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        let Some(base) = self.urls.ping.clone() else {
            return;
        };
        loop {
            let ids = self.in_progress_ids();
            let mut url = base.clone();
            if !ids.is_empty() {
                url.push_str(&format!("&job_id={}", ids.join(",")));
            }
            url.push_str(&format!("&runpod_version={VERSION}"));
            if let Err(e) = self
                .http
                .get(url)
                .header("Authorization", &self.key)
                .timeout(self.call_timeout)
                .send()
                .await
            {
                tracing::warn!(error = %e, "heartbeat failed");
            }
            tokio::select! { _ = tokio::time::sleep(every) => {}, _ = stop.cancelled() => return }
        }
    }

    /// Long-polls the stop URL and cancels the jobs it names.
    async fn watch_stops(self: Arc<Self>, stop: CancellationToken) {
        let mut failures = 0;
        loop {
            let poll = self
                .http
                .get(&self.urls.stop)
                .header("Authorization", &self.key)
                .timeout(TAKE_TIMEOUT)
                .send();
            let resp = tokio::select! { r = poll => r, _ = stop.cancelled() => return };
            let ids: Vec<String> = match resp {
                Ok(r) if r.status().as_u16() == 200 => {
                    failures = 0;
                    let v: Value = r.json().await.unwrap_or(Value::Null);
                    v["jobsToStop"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                }
                Ok(r) if r.status().as_u16() == 204 => {
                    failures = 0;
                    vec![]
                }
                _ => {
                    failures += 1;
                    tokio::select! { _ = tokio::time::sleep(backoff(failures)) => {}, _ = stop.cancelled() => return }
                    continue;
                }
            };
            for id in ids {
                if let Some(t) = self
                    .in_progress
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&id)
                {
                    tracing::info!(job_id = %id, "stop requested");
                    t.cancel();
                }
            }
        }
    }
}

/// Runs one local job (`--test-input`) and returns its result body.
pub async fn run_test_input(router: Router, job: Value) -> Value {
    let input = job.get("input").cloned().unwrap_or(job);
    let call = match jobs::parse(&input) {
        Ok(c) => c,
        Err(e) => return json!({"error": e}),
    };
    let stream = call.stream;
    let (tx, mut rx) = mpsc::channel(64);
    let run = tokio::spawn(jobs::execute(router, call, stream.then_some(tx)));
    let mut partials = Vec::new();
    while let Some(p) = rx.recv().await {
        partials.push(p);
    }
    match run.await {
        Ok(Ok(out)) => json!({"output": if stream { Value::Array(partials) } else { out }}),
        Ok(Err(e)) => json!({"error": e}),
        Err(e) => json!({"error": e.to_string()}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_the_sdk_templates() {
        let s = JobServer {
            get_job: "http://h/v2/e/job-take/$ID?gpu=x".into(),
            post_output: "http://h/v2/e/job-done/$RUNPOD_POD_ID/$ID?gpu=x".into(),
            post_stream: "http://h/v2/e/job-stream/$RUNPOD_POD_ID/$ID?gpu=x".into(),
            ping: Some("http://h/v2/e/ping/$RUNPOD_POD_ID?gpu=x".into()),
            api_key: "k".into(),
            worker_id: "w1".into(),
            ping_interval: Duration::from_secs(10),
            call_timeout: Duration::from_secs(30),
        };
        let u = Urls::new(&s);
        assert_eq!(
            u.take(1, false),
            "http://h/v2/e/job-take/w1?gpu=x&job_in_progress=0"
        );
        assert_eq!(
            u.take(3, true),
            "http://h/v2/e/job-take-batch/w1?gpu=x&job_in_progress=1&batch_size=3"
        );
        assert_eq!(u.stop, "http://h/v2/e/job-stop/w1?gpu=x");
        assert_eq!(
            u.done("j9", false),
            "http://h/v2/e/job-done/w1/j9?gpu=x&isStream=false"
        );
        assert_eq!(
            u.partial("j9"),
            "http://h/v2/e/job-stream/w1/j9?gpu=x&isStream=true"
        );
        assert_eq!(u.ping.unwrap(), "http://h/v2/e/ping/w1?gpu=x");
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        for a in 0..20 {
            let d = backoff(a);
            assert!(
                d >= Duration::from_millis(180) && d <= Duration::from_secs(10),
                "{a}: {d:?}"
            );
        }
    }
}
