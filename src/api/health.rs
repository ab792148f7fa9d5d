//! Liveness and readiness: `/health` (always 200 while the process lives, with the state),
//! `/ping` (RunPod's load-balancer contract: 204 loading, 200 ready, 503 failed or
//! draining) and `/metrics` (Prometheus text).

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::AppState;
use crate::engine::Readiness;

/// `GET /health`
pub async fn health(State(s): State<AppState>) -> Json<Value> {
    let e = &s.engine;
    Json(json!({
        "status": "ok",
        "readiness": e.readiness(),
        "model": e.model_name,
        "context_len": e.context_len(),
        "in_flight": e.in_flight(),
        "queued": e.queued(),
        "max_num_seqs": e.max_num_seqs(),
        "version": env!("CARGO_PKG_VERSION"),
        // While loading: phase, percent, bytes, rate and ETA (quant_cache::progress).
        "loading": crate::quant_cache::progress::snapshot(),
    }))
}

/// `GET /ping`
pub async fn ping(State(s): State<AppState>) -> impl IntoResponse {
    match s.engine.readiness() {
        Readiness::Loading => StatusCode::NO_CONTENT.into_response(),
        Readiness::Ready => (StatusCode::OK, Json(json!({"status": "healthy"}))).into_response(),
        Readiness::Draining => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response(),
        Readiness::Failed(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "failed", "reason": reason})),
        )
            .into_response(),
    }
}

/// `GET /metrics`
pub async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.engine.metrics.render(),
    )
}
