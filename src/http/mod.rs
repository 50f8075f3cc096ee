//! The HTTP surface: routes, and the middleware every request passes through.
//!
//! Two dialects, as clients already speak them: OpenAI's under `/v1/*`, and
//! text-embeddings-inference's native routes (`/embed`, `/classify`, `/predict`), plus our
//! `/generate` and the operations routes. Unknown routes, wrong methods and oversized
//! bodies answer in the same JSON error shape as everything else.

pub mod embed;
pub mod generate;
pub mod json;
pub mod ops;
pub mod sse;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::error::Error;
use crate::node::Node;

/// The state handlers share.
pub type AppState = Arc<Node>;

/// Builds the router for a node.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/livez", get(ops::livez))
        .route("/readyz", get(ops::readyz))
        .route("/info", get(ops::info))
        .route("/v1/models", get(ops::list_models))
        .route("/embed", post(embed::embed))
        .route("/v1/embeddings", post(embed::openai_embeddings))
        .route("/classify", post(embed::classify))
        .route("/predict", post(embed::classify))
        .route("/generate", post(generate::generate))
        .route("/v1/chat/completions", post(generate::chat_completions))
        .route("/v1/completions", post(generate::completions))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        // `JsonBody` enforces `limits.max_body_bytes` itself (and drains what is over it).
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(node.clone(), envelope))
        .with_state(node)
}

async fn unknown_route(method: Method, uri: Uri) -> Error {
    Error::UnknownRoute { method: method.to_string(), path: uri.path().to_string() }
}

async fn wrong_method(method: Method, uri: Uri) -> Error {
    Error::MethodNotAllowed { method: method.to_string(), path: uri.path().to_string() }
}

/// Wraps every request: records the body limit for error messages, refuses work while
/// draining, and enforces the request timeout on non-streaming answers.
async fn envelope(State(node): State<AppState>, mut req: Request, next: Next) -> Response {
    req.extensions_mut().insert(json::BodyLimit(node.config.limits.max_body_bytes));
    let path = req.uri().path().to_string();
    let is_ops = matches!(path.as_str(), "/livez" | "/readyz" | "/info" | "/metrics" | "/stats" | "/v1/models");
    if node.is_draining() && !is_ops {
        return Error::Draining.into_response();
    }
    let timeout = std::time::Duration::from_secs(node.config.limits.request_timeout_s);
    let started = std::time::Instant::now();
    let mut response = match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => Error::Timeout(node.config.limits.request_timeout_s).into_response(),
    };
    if !is_ops {
        let total = format!("{:.2}", started.elapsed().as_secs_f64() * 1000.0);
        if let Ok(v) = HeaderValue::from_str(&total) {
            response.headers_mut().insert("x-total-time", v);
        }
    }
    response
}

/// Sets `x-edgenode-model` and the stage timing headers on an inference answer.
pub fn inference_headers(response: &mut Response, model_label: &str, queue_s: f64, compute_s: f64) {
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(model_label) {
        h.insert("x-edgenode-model", v);
    }
    let (q, c) = (queue_s * 1000.0, compute_s * 1000.0);
    if let Ok(v) = HeaderValue::from_str(&format!("{q:.2}")) {
        h.insert("x-queue-time", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{c:.2}")) {
        h.insert("x-inference-time", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("queue;dur={q:.2}, inference;dur={c:.2}")) {
        h.insert("server-timing", v);
    }
}
