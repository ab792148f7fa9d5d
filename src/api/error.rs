//! The one error → HTTP map. Client mistakes keep their message; internal failures are
//! logged whole and answered with a generic one. Bodies are OpenAI-shaped everywhere:
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::engine::EngineError;

/// Every way a request can fail, by what the client should do about it.
#[derive(Debug)]
pub enum ApiError {
    /// Malformed or semantically invalid input (400).
    BadRequest {
        param: Option<String>,
        message: String,
    },
    /// Well-formed JSON of the wrong shape (422).
    Unprocessable(String),
    /// Missing or wrong API key (401).
    Unauthorized,
    /// The requested model is not the one served (404).
    ModelNotFound(String),
    /// No such endpoint (404).
    NotFound(String),
    /// Body over the limit (413).
    TooLarge(usize),
    /// Every slot busy (429, with Retry-After).
    Overloaded(usize),
    /// Still loading, failed to load, or shutting down (503).
    Unavailable(String),
    /// The request's time ran out (504).
    Timeout(String),
    /// Our fault (500); the detail goes to the log only.
    Internal(String),
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            param: Some(param.to_owned()),
            message: message.into(),
        }
    }

    /// The status, the OpenAI error type, and a short metric label.
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::BadRequest { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request",
            ),
            ApiError::Unprocessable(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                "unprocessable",
            ),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "unauthorized",
            ),
            ApiError::ModelNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
            ),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "invalid_request_error", "not_found"),
            ApiError::TooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "too_large",
            ),
            ApiError::Overloaded(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "overloaded",
            ),
            ApiError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "unavailable",
            ),
            ApiError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout", "timeout"),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "internal",
            ),
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        self.parts().2
    }

    fn message(&self) -> String {
        match self {
            ApiError::BadRequest { message, .. } => message.clone(),
            ApiError::Unprocessable(m) | ApiError::Unavailable(m) | ApiError::Timeout(m) => {
                m.clone()
            }
            ApiError::Unauthorized => {
                "missing or invalid API key: send `Authorization: Bearer <key>`".into()
            }
            ApiError::ModelNotFound(m) => {
                format!("the model `{m}` does not exist here; see GET /v1/models")
            }
            ApiError::NotFound(path) => format!("no endpoint at `{path}`; see GET /openapi.json"),
            ApiError::TooLarge(limit) => {
                format!("the request body is larger than the {limit}-byte limit (--body-limit)")
            }
            ApiError::Overloaded(n) => format!("all {n} sequence slots are busy; retry shortly"),
            ApiError::Internal(_) => "internal error; the server log has the details".into(),
        }
    }

    /// The JSON body, also used for errors inside an event stream.
    pub fn body(&self) -> serde_json::Value {
        let (_, kind, code) = self.parts();
        let param = match self {
            ApiError::BadRequest { param, .. } => param.clone(),
            _ => None,
        };
        json!({"error": {"message": self.message(), "type": kind, "param": param, "code": code}})
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::NotReady(m) => {
                ApiError::Unavailable(format!("the model is not ready: {m}"))
            }
            EngineError::Overloaded(n) => ApiError::Overloaded(n),
            EngineError::Invalid { param, message } => ApiError::bad(param, message),
            e @ EngineError::Timeout(_) => ApiError::Timeout(e.to_string()),
            EngineError::Internal(m) => ApiError::Internal(m),
            e @ EngineError::OutOfMemory(_) => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _, _) = self.parts();
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        let mut resp = (status, Json(self.body())).into_response();
        if let ApiError::Overloaded(_) = self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp.extensions_mut().insert(ErrorKind(self.kind()));
        resp
    }
}

/// Marks a response as an error of this kind, for the metrics middleware.
#[derive(Clone, Copy)]
pub struct ErrorKind(pub &'static str);

/// A JSON body extractor whose failures are `ApiError`s: 413 over the limit, 400 for bad
/// JSON, 422 for JSON of the wrong shape. Any content type is accepted, as curl's `-d`
/// sends form encoding by default.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map_or(usize::MAX, |l| l.0);
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge(limit)
            } else {
                ApiError::bad("body", format!("could not read the request body: {e}"))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| match e.classify() {
                serde_json::error::Category::Data => {
                    ApiError::Unprocessable(format!("invalid request: {e}"))
                }
                _ => ApiError::bad("body", format!("the body is not valid JSON: {e}")),
            })
    }
}

/// The configured body limit, carried in request extensions for the 413 message.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

#[cfg(test)]
mod tests {
    use super::*;

    /// A step that ran out of GPU memory is a 503 naming the fixes; any other failed step
    /// stays a 500 whose detail never reaches the client.
    #[test]
    fn out_of_memory_is_told_apart_from_other_failures() {
        let oom = EngineError::from_step_failure(
            r#"DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#.into(),
        );
        let api = ApiError::from(oom);
        assert_eq!(api.parts().0, StatusCode::SERVICE_UNAVAILABLE);
        let message = api.body()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains("--max-model-len"), "{message}");
        assert!(!message.contains("DriverError"), "{message}");

        let other = ApiError::from(EngineError::from_step_failure("shape mismatch".into()));
        assert_eq!(other.parts().0, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!other.body().to_string().contains("shape mismatch"));
    }
}
