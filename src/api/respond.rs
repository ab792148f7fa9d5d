//! Turning a started generation into an HTTP answer: collected into one value, or streamed
//! as server-sent events that end in `data: [DONE]`. Dropping the SSE body (the client
//! left) drops the event receiver, which cancels the sequence.

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::Value;

use super::ApiError;
use crate::engine::{Event, FinishReason, Generation, TokenLogprob, Usage};

/// The whole answer of a non-streaming request.
pub struct Collected {
    pub text: String,
    /// Every token's, when the request asked for them.
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
}

/// Waits for the end of a generation.
pub async fn collect(mut g: Generation) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(ev) = g.events.recv().await {
        match ev {
            Event::Text {
                text: t,
                logprobs: l,
            } => {
                text.push_str(&t);
                logprobs.extend(l);
            }
            Event::Done {
                finish_reason,
                usage,
            } => {
                return Ok(Collected {
                    text,
                    logprobs,
                    finish_reason,
                    usage,
                });
            }
            Event::Error(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Internal(
        "the generation ended without a result".into(),
    ))
}

/// Streams a generation; `map` turns each engine event into zero or more JSON payloads.
pub fn sse<M>(g: Generation, map: M) -> Response
where
    M: FnMut(Event) -> Vec<Value> + Send + 'static,
{
    let stream = futures::stream::unfold(
        (g.events, map, false),
        |(mut rx, mut map, ended)| async move {
            if ended {
                return None;
            }
            let (payloads, ended) = match rx.recv().await {
                Some(Event::Error(e)) => (vec![ApiError::from(e).body()], true),
                Some(ev) => {
                    let terminal = !matches!(ev, Event::Text { .. });
                    (map(ev), terminal)
                }
                None => (vec![ApiError::Internal(String::new()).body()], true),
            };
            let mut events: Vec<SseEvent> = payloads
                .into_iter()
                .map(|v| SseEvent::default().data(v.to_string()))
                .collect();
            if ended {
                events.push(SseEvent::default().data("[DONE]"));
            }
            Some((
                futures::stream::iter(events.into_iter().map(Ok::<_, Infallible>)),
                (rx, map, ended),
            ))
        },
    )
    .flatten();
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Seconds since the Unix epoch, for OpenAI's `created`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
