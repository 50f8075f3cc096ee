//! Server-sent events for streamed generations.
//!
//! A stream is built from a `Generation` and a formatter that turns each piece into zero or
//! more JSON events; it ends with `data: [DONE]`, as OpenAI's streams do. When the client
//! disconnects, the response body — and with it the `Generation` — is dropped, which frees
//! the sequence slot and cancels the sequence in the engine.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, StreamExt};
use serde_json::Value;

use crate::generate::{Generation, Piece};

/// Turns each piece into the JSON payloads to send (none, one, or several).
pub trait PieceFormat: Send + 'static {
    fn format(&mut self, piece: &Piece) -> Vec<Value>;
}

enum Phase<F> {
    Running(Box<Generation>, F),
    Finished,
}

/// The SSE response for a running generation, with `prelude` events sent first.
pub fn stream_response<F: PieceFormat>(generation: Generation, prelude: Vec<Value>, format: F) -> Response {
    let start = stream::iter(prelude.into_iter().map(|v| Ok::<Event, Infallible>(json_event(&v))));
    let body = stream::unfold(Phase::Running(Box::new(generation), format), |phase| async move {
        match phase {
            Phase::Finished => None,
            Phase::Running(mut generation, mut format) => match generation.next().await {
                Some(piece) => {
                    let events: Vec<Event> = format.format(&piece).iter().map(json_event).collect();
                    Some((stream::iter(events), Phase::Running(generation, format)))
                }
                None => Some((stream::iter(vec![Event::default().data("[DONE]")]), Phase::Finished)),
            },
        }
    })
    .flat_map(|events| events.map(Ok::<Event, Infallible>));
    Sse::new(start.chain(body)).keep_alive(KeepAlive::default()).into_response()
}

fn json_event(v: &Value) -> Event {
    Event::default().data(v.to_string())
}
