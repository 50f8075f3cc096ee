//! Request spans: one `request` span per HTTP request, continuing the caller's trace when
//! it sent a W3C `traceparent`, with the request's stages as children (validate, tokenize,
//! queue, batch, inference, pool; prefill, decode, stream for generation).
//!
//! Attribute names on the request span: `route`, `model`, `model.version`,
//! `model.digest`, `device`, `input_tokens`, `output_tokens`, `status`.

use axum::http::HeaderMap;
use opentelemetry::propagation::Extractor;
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The span of one HTTP request, parented to the caller's `traceparent` when present.
pub fn request_span(method: &str, route: &str, headers: &HeaderMap) -> Span {
    let span = tracing::info_span!(
        "request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = %method,
        route = %route,
        status = Empty,
        model = Empty,
        model.version = Empty,
        model.digest = Empty,
        device = Empty,
        input_tokens = Empty,
        output_tokens = Empty,
    );
    if headers.contains_key("traceparent") {
        let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
        // A malformed header just leaves the span as a new root.
        let _ = span.set_parent(parent);
    }
    span
}

/// Records which model (version, digest, device) answers the current request.
pub fn record_model(name: &str, version: Option<&str>, digest: Option<&str>, device: Option<&str>) {
    let span = Span::current();
    span.record("model", name);
    for (field, value) in [("model.version", version), ("model.digest", digest), ("device", device)] {
        if let Some(v) = value {
            span.record(field, v);
        }
    }
}

/// Records token counts on a request span.
pub fn record_tokens(span: &Span, input: usize, output: Option<usize>) {
    span.record("input_tokens", input as u64);
    if let Some(o) = output {
        span.record("output_tokens", o as u64);
    }
}

/// Records the answer's status on a request span.
pub fn record_status(span: &Span, status: u16) {
    span.record("status", status as u64);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
}
