//! The HTTP API (axum): `app()` builds the router shared by `serve` and the tests; the
//! handlers live one file per endpoint family. Auth, body limit and metrics are layers.

mod error;
mod health;
mod openai;
mod openapi;
mod prompt;
mod respond;
mod tokenize;
pub mod types;

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

pub use error::{ApiError, BodyLimit};

use crate::engine::Engine;
use error::ErrorKind;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub api_key: Option<Arc<str>>,
    pub body_limit: usize,
}

/// The full API router.
pub fn app(state: AppState) -> Router {
    let protected = Router::new()
        .route("/prompt", post(prompt::prompt))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/openapi.json", get(openapi::openapi))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    let limit = state.body_limit;
    health_routes()
        .route("/metrics", get(health::metrics))
        .merge(protected)
        .fallback(|uri: axum::http::Uri| async move { ApiError::NotFound(uri.path().to_owned()) })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(move |mut req: Request, next: Next| {
            let announced = req
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            req.extensions_mut().insert(BodyLimit(limit));
            async move {
                match announced {
                    Some(n) if n > limit as u64 => refuse_unread(req, limit),
                    _ => next.run(req).await,
                }
            }
        }))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// `/ping` and `/health` alone, for the RunPod load balancer's health port.
pub fn health_app(state: AppState) -> Router {
    health_routes().with_state(state)
}

fn health_routes() -> Router<AppState> {
    Router::new()
        .route("/health", get(health::health))
        .route("/ping", get(health::ping))
}

/// The most of a refused body read and thrown away, and for how long.
const LINGER_BYTES: usize = 64 << 20;
const LINGER: Duration = Duration::from_secs(5);

/// 413 for a body announced over the limit, answered before any of it is read. What the client
/// still sends is read and dropped in the background, within `LINGER_BYTES` and `LINGER` (a
/// "lingering close"): closing on unread data would reset the connection, and a client still
/// uploading would see the reset instead of the 413.
fn refuse_unread(req: Request, limit: usize) -> Response {
    let mut body = req.into_body().into_data_stream();
    tokio::spawn(async move {
        let drain = async {
            let mut seen = 0;
            while let Some(Ok(chunk)) = futures::StreamExt::next(&mut body).await {
                seen += chunk.len();
                if seen > LINGER_BYTES {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    });
    let mut resp = ApiError::TooLarge(limit).into_response();
    resp.headers_mut().insert(
        header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    resp
}

async fn require_key(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// Counts requests by endpoint and status, and errors by kind.
async fn track(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_owned(), |p| p.as_str().to_owned());
    let resp = next.run(req).await;
    s.engine
        .metrics
        .record_request(&endpoint, resp.status().as_u16());
    if let Some(ErrorKind(kind)) = resp.extensions().get::<ErrorKind>() {
        s.engine.metrics.record_error(kind);
    }
    resp
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets in-flight requests
/// finish for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = fired_tx.send(());
    });
    let deadline = async move {
        if fired_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = server.into_future() => r,
        _ = deadline => {
            tracing::warn!(?grace, "grace period over; exiting with requests still in flight");
            Ok(())
        }
    }
}
