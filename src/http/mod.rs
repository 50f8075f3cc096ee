//! The HTTP surface: routes, and the middleware every request passes through.
//!
//! Three dialects, as clients already speak them: OpenAI's under `/v1/*`,
//! text-embeddings-inference's native routes (`/embed`, `/classify`, `/predict`,
//! `/similarity`), and text-generation-inference's (`/generate` with `inputs`,
//! `/generate_stream`, and `POST /` for both servers), plus our own `/generate` and the
//! operations routes. Unknown routes, wrong methods and oversized bodies answer in the
//! same JSON error shape as everything else.

pub mod cached;
pub mod dashboard;
pub mod embed;
pub mod fields;
#[cfg(test)]
mod fuzz;
pub mod generate;
pub mod json;
pub mod listener;
pub mod ops;
pub mod root;
pub mod route;
pub mod sse;
pub mod stats;
pub mod tgi;
pub mod tokens;

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;

use crate::accounts::{Caller, CALLER};
use crate::error::Error;
use crate::node::Node;
use crate::telemetry::metrics::METRICS;
use crate::telemetry::stats::Sample;
use crate::telemetry::trace::{record_status, request_span};
use tracing::Instrument;

/// The state handlers share.
pub type AppState = Arc<Node>;

/// What the envelope does around a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Platform probes: open unless `auth.protect_probes`; no span, timeout or metrics.
    Probe,
    /// The node's own state: behind the key; no span, timeout or metrics.
    Ops,
    /// Work for a model: behind the key, refused while draining, under the request
    /// timeout, traced and measured. Unknown routes are treated as work.
    Work,
}

/// Whose error shape a route answers in. A handler that serves two dialects on one route
/// (`/generate`, `/`) puts the one it chose on its response as an extension, which wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// OpenAI's `{"error": {"message", "type", "code", "param"}}`: ours and `/v1/*`.
    OpenAi,
    /// text-embeddings-inference's `{"error", "error_type"}` with its status codes, so a TEI
    /// client's error handling works unchanged on TEI's routes.
    Tei,
    /// text-generation-inference's `{"error", "error_type"}` with its statuses and types.
    Tgi,
}

/// A handler's answer in `dialect`: its error, if it is one, is rendered in that shape.
pub(crate) fn speaking(dialect: Dialect, result: Result<Response, Error>) -> Response {
    let mut response = result.unwrap_or_else(IntoResponse::into_response);
    response.extensions_mut().insert(dialect);
    response
}

/// Every route with its class and dialect: the one list of paths the node serves.
fn routes(node: &Node) -> Vec<(&'static str, Class, Dialect, MethodRouter<AppState>)> {
    use Dialect::{OpenAi, Tei, Tgi};
    let mut routes = vec![
        ("/livez", Class::Probe, OpenAi, get(ops::livez)),
        ("/readyz", Class::Probe, OpenAi, get(ops::readyz)),
        ("/health", Class::Probe, Tei, get(ops::health)),
        ("/metrics", Class::Probe, OpenAi, get(stats::metrics)),
        // The dashboard's page and assets carry no figures on a node with keys (its script
        // sends the key to /stats and /info), so they are open like the probes.
        ("/dashboard", Class::Probe, OpenAi, get(dashboard::page)),
        ("/dashboard/app.js", Class::Probe, OpenAi, get(dashboard::app_js)),
        ("/dashboard/app.css", Class::Probe, OpenAi, get(dashboard::app_css)),
        ("/dashboard/uplot.js", Class::Probe, OpenAi, get(dashboard::uplot_js)),
        ("/dashboard/uplot.css", Class::Probe, OpenAi, get(dashboard::uplot_css)),
        ("/info", Class::Ops, OpenAi, get(ops::info)),
        ("/v1/models", Class::Ops, OpenAi, get(ops::list_models)),
        ("/models/{name}/rollback", Class::Ops, OpenAi, post(ops::rollback)),
        ("/stats", Class::Ops, OpenAi, get(stats::stats)),
        ("/embed", Class::Work, Tei, post(embed::embed)),
        ("/embed_all", Class::Work, Tei, post(embed::embed_all)),
        ("/v1/embeddings", Class::Work, OpenAi, post(embed::openai_embeddings)),
        ("/classify", Class::Work, Tei, post(embed::classify)),
        ("/predict", Class::Work, Tei, post(embed::predict)),
        ("/rerank", Class::Work, Tei, post(embed::rerank)),
        ("/tokenize", Class::Work, Tei, post(tokens::tokenize)),
        ("/decode", Class::Work, Tei, post(tokens::decode)),
        ("/detokenize", Class::Work, OpenAi, post(tokens::detokenize)),
        ("/generate", Class::Work, OpenAi, post(generate::generate)),
        ("/generate_stream", Class::Work, Tgi, post(tgi::generate_stream)),
        ("/similarity", Class::Work, Tei, post(embed::similarity)),
        ("/", Class::Work, Tei, post(root::root)),
        ("/v1/chat/completions", Class::Work, OpenAi, post(route::chat)),
        ("/route", Class::Work, OpenAi, post(route::route)),
        ("/v1/feedback", Class::Work, OpenAi, post(route::feedback)),
        ("/v1/completions", Class::Work, OpenAi, post(generate::completions)),
    ];
    if node.config.debug.fault_injection {
        routes.push(("/debug/fault", Class::Work, OpenAi, post(ops::debug_fault)));
    }
    if !node.config.server.metrics_on_public_port() {
        routes.retain(|(path, ..)| *path != "/metrics");
    }
    routes
}

/// The router of `server.metrics_addr`: `/metrics` alone, open (the listener is meant for a
/// private network: Fly's scraper, a sidecar), anything else 404.
pub fn metrics_router(node: Arc<Node>) -> Router {
    Router::new().route("/metrics", get(stats::metrics)).fallback(unknown_route).with_state(node)
}

/// The envelope's view of the routes: each matched path's class and dialect.
type Classes = Arc<HashMap<&'static str, (Class, Dialect)>>;

/// Builds the router for a node.
pub fn router(node: Arc<Node>) -> Router {
    let cors = cors_layer(&node.config.server.cors_origins);
    let mut app = Router::new();
    let mut classes = HashMap::new();
    for (path, class, dialect, handler) in routes(&node) {
        classes.insert(path, (class, dialect));
        app = app.route(path, handler);
    }
    let app = app
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        // `JsonBody` enforces `limits.max_body_bytes` itself (and drains what is over it).
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state((node.clone(), Arc::new(classes)), envelope))
        .with_state(node);
    match cors {
        Some(layer) => app.layer(layer),
        None => app,
    }
}

/// CORS for the configured origins (`"*"`: any); `None` when none are configured.
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers(Any)
            .expose_headers(Any)
            .max_age(std::time::Duration::from_secs(600)),
    )
}

async fn unknown_route(method: Method, uri: Uri) -> Error {
    Error::UnknownRoute { method: method.to_string(), path: uri.path().to_string() }
}

async fn wrong_method(method: Method, uri: Uri) -> Error {
    Error::MethodNotAllowed { method: method.to_string(), path: uri.path().to_string() }
}

/// Wraps every request: opens its span (continuing the caller's `traceparent`), records
/// the body limit for error messages, refuses work while draining, enforces the request
/// timeout on non-streaming answers, and records metrics and the latency profile.
async fn envelope(State((node, classes)): State<(AppState, Classes)>, mut req: Request, next: Next) -> Response {
    req.extensions_mut().insert(json::BodyLimit(node.config.limits.max_body_bytes));
    let matched = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string());
    let (class, dialect) = matched.as_deref().and_then(|m| classes.get(m)).copied().unwrap_or((Class::Work, Dialect::OpenAi));
    let route = matched.unwrap_or_else(|| "unmatched".into());
    let mut key = None;
    if node.keys.enabled() && (class != Class::Probe || node.config.auth.protect_probes) {
        let authorization = req.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        key = node.keys.identify(authorization);
        // A browser's CORS preflight carries no credentials; the CORS layer answers it.
        if key.is_none() && req.method() != Method::OPTIONS {
            let response = in_dialect(dialect, Error::Unauthorized.into_response());
            record_request(&node, &route, response.status().as_u16(), 0.0, None);
            return response;
        }
    }
    if class != Class::Work {
        return in_dialect(dialect, next.run(req).await);
    }
    let admitted = match key.as_deref() {
        Some(k) => admit(&node, k).await,
        None => Ok(()),
    };
    if let Err(refusal) = admitted {
        let response = in_dialect(dialect, refusal.into_response());
        record_request(&node, &route, response.status().as_u16(), 0.0, None);
        return response;
    }
    let replayable = node.fleet.may_replay(req.headers());
    if let Some(response) = replayable.then(|| node.fleet.replay_before(&route, generators_saturated(&node))).flatten() {
        record_request(&node, &route, response.status().as_u16(), 0.0, None);
        return response;
    }
    let caller = Arc::new(Caller { key, user: Default::default() });
    req.extensions_mut().insert(caller.clone());
    let span = request_span(req.method().as_str(), &route, req.headers());
    let started = std::time::Instant::now();
    let response = if node.is_draining() {
        Error::Draining.into_response()
    } else {
        let timeout = std::time::Duration::from_secs(node.config.limits.request_timeout_s);
        let run = CALLER.scope(caller, next.run(req).instrument(span.clone()));
        match tokio::time::timeout(timeout, run).await {
            Ok(r) => r,
            Err(_) => Error::Timeout(node.config.limits.request_timeout_s).into_response(),
        }
    };
    let response = if replayable { node.fleet.replay_after(response) } else { response };
    let mut response = in_dialect(dialect, response);
    let total_s = started.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    record_status(&span, status);
    let served = response.extensions().get::<Served>().cloned();
    // A stream records itself when it ends; everything else is recorded now.
    if !served.as_ref().is_some_and(|s| s.streaming) {
        record_request(&node, &route, status, total_s, served.as_ref());
    }
    let total = format!("{:.2}", total_s * 1000.0);
    if let Ok(v) = HeaderValue::from_str(&total) {
        response.headers_mut().insert("x-total-time", v);
    }
    response
}

/// Admits one request of `key` against its limits; with a fleet store, a used-up lease
/// costs this request a round trip to the store for a fresh one (a second only when the
/// first lease was taken by other requests, or ended with its minute, before this one used
/// it).
async fn admit(node: &Node, key: &crate::accounts::KeyPolicy) -> Result<(), Error> {
    use crate::accounts::Admission;
    for may_refill in [true, true, false] {
        match node.accounts.admit(key, &node.quotas, may_refill)? {
            Admission::Admitted => return Ok(()),
            Admission::Refill(scopes) => node.quotas.refill(&scopes, node).await,
        }
    }
    Ok(())
}

/// One flag per ready generation model: is it saturated (slots and waiting queue full)?
fn generators_saturated(node: &Node) -> Vec<bool> {
    node.registry
        .slots()
        .iter()
        .filter_map(|s| match s.current_service() {
            Some(crate::service::Service::Generator(g)) => Some(g.saturated()),
            _ => None,
        })
        .collect()
}

/// An error answer re-rendered in the route's dialect, or the one its handler chose (its
/// headers kept).
fn in_dialect(dialect: Dialect, response: Response) -> Response {
    let dialect = response.extensions().get::<Dialect>().copied().unwrap_or(dialect);
    if dialect == Dialect::OpenAi {
        return response;
    }
    let Some(error) = response.extensions().get::<Error>().cloned() else { return response };
    let (status, body) = if dialect == Dialect::Tgi { error.tgi() } else { error.tei() };
    let (mut parts, _) = response.into_parts();
    parts.status = status;
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body.to_string()))
}

/// What an inference handler reports about its answer (a response extension the envelope
/// reads for metrics and `/stats`).
#[derive(Debug, Clone)]
pub struct Served {
    /// `embed`, `classify` or `generate`.
    pub workload: &'static str,
    pub model: String,
    pub queue_s: f64,
    pub compute_s: f64,
    /// Seconds tokenizing (encoders).
    pub tokenize_s: f64,
    /// Seconds from arrival to the first token (generation).
    pub first_token_s: Option<f64>,
    pub input_tokens: usize,
    pub output_tokens: usize,
    /// A stream records itself when it ends.
    pub streaming: bool,
    /// What the response cache did (`x-edgenode-cache`); `None` when it is off.
    pub cache: Option<&'static str>,
    /// Who asked: the request's tokens and cost are charged to its key and user.
    pub caller: Option<Arc<Caller>>,
}

/// Counts one answered request in `/metrics` and, when a model answered, in `/stats`.
pub fn record_request(node: &Node, route: &str, status: u16, total_s: f64, served: Option<&Served>) {
    let m = &*METRICS;
    let model = served.map(|s| s.model.as_str()).unwrap_or("");
    let code = status.to_string();
    m.requests.with_label_values(&[route, model, &code]).inc();
    m.request_seconds.with_label_values(&[route, model, &code]).observe(total_s);
    if let Some(s) = served.filter(|_| status < 400) {
        let sample = Sample {
            at: std::time::Instant::now(),
            total_s,
            queue_s: s.queue_s,
            compute_s: s.compute_s,
            tokenize_s: s.tokenize_s,
            first_token_s: s.first_token_s,
            input_tokens: s.input_tokens,
            output_tokens: s.output_tokens,
        };
        node.stats.record(s.workload, &s.model, sample);
        let tokens = (s.input_tokens + s.output_tokens) as u64;
        let cached = matches!(s.cache, Some("hit" | "semantic-hit"));
        let cost = if cached { 0.0 } else { node.router.ledger.price(crate::routing::ledger::Tier::Edge, tokens) };
        node.accounts.charge(s.caller.as_deref(), if cached { 0 } else { tokens }, cost, cached);
    }
}

/// Sets `x-edgenode-model`, the stage timing headers (`x-queue-time`, `x-inference-time`,
/// `server-timing`) and the `Served` report on an inference answer.
pub fn inference_headers(response: &mut Response, model_label: &str, served: Served) {
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(model_label) {
        h.insert("x-edgenode-model", v);
    }
    let (q, c) = (served.queue_s * 1000.0, served.compute_s * 1000.0);
    if let Ok(v) = HeaderValue::from_str(&format!("{q:.2}")) {
        h.insert("x-queue-time", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{c:.2}")) {
        h.insert("x-inference-time", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("queue;dur={q:.2}, inference;dur={c:.2}")) {
        h.insert("server-timing", v);
    }
    if let Some(outcome) = served.cache {
        h.insert("x-edgenode-cache", HeaderValue::from_static(outcome));
    }
    response.extensions_mut().insert(served);
}
