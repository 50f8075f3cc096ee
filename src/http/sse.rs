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

    /// `format`, for a format that needs what the generation knows besides the piece
    /// (whether this text is the last, the end-of-sequence token): TGI's marks its last
    /// token event.
    fn format_in(&mut self, piece: &Piece, _generation: &Generation) -> Vec<Value> {
        self.format(piece)
    }

    /// Whether the stream ends with `data: [DONE]` (OpenAI's and ours do; TGI's does not).
    fn done_marker(&self) -> bool {
        true
    }
}

/// Called once when a stream ends: with `true` after `[DONE]`, `false` when the client
/// went away first. It records the request's metrics, which only the stream's end knows.
pub type OnEnd = Box<dyn FnOnce(&Generation, bool) + Send>;

/// A running stream: the generation, its formatter, and its `stream` span (the request's
/// span stays open through it, so the trace covers the whole stream).
struct Running<F> {
    generation: Box<Generation>,
    format: F,
    on_end: Option<OnEnd>,
    _span: tracing::Span,
}

impl<F> Running<F> {
    fn end(&mut self, completed: bool) {
        if let Some(f) = self.on_end.take() {
            f(&self.generation, completed);
        }
    }
}

impl<F> Drop for Running<F> {
    fn drop(&mut self) {
        self.end(false);
    }
}

enum Phase<F> {
    Running(Box<Running<F>>),
    Finished,
}

/// The SSE response for a running generation, with `prelude` events sent first.
pub fn stream_response<F: PieceFormat>(generation: Generation, prelude: Vec<Value>, format: F, on_end: OnEnd) -> Response {
    let start = stream::iter(prelude.into_iter().map(|v| Ok::<Event, Infallible>(json_event(&v))));
    let running = Running { generation: Box::new(generation), format, on_end: Some(on_end), _span: tracing::info_span!("stream") };
    let body = stream::unfold(Phase::Running(Box::new(running)), |phase| async move {
        match phase {
            Phase::Finished => None,
            Phase::Running(mut r) => match r.generation.next().await {
                Some(piece) => {
                    let events: Vec<Event> = r.format.format_in(&piece, &r.generation).iter().map(json_event).collect();
                    Some((stream::iter(events), Phase::Running(r)))
                }
                None => {
                    r.end(true);
                    let done = if r.format.done_marker() { vec![Event::default().data("[DONE]")] } else { vec![] };
                    Some((stream::iter(done), Phase::Finished))
                }
            },
        }
    })
    .flat_map(|events| events.map(Ok::<Event, Infallible>));
    Sse::new(start.chain(body)).keep_alive(KeepAlive::default()).into_response()
}

fn json_event(v: &Value) -> Event {
    Event::default().data(v.to_string())
}
