//! Operations routes: liveness, readiness, what this node serves and proves.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::AppState;
use crate::models::registry::Stage;
use crate::service::Service;

/// `GET /livez`: 200 as soon as the process serves HTTP, even while models warm up.
pub async fn livez() -> Json<Value> {
    Json(json!({"status": "alive"}))
}

/// `GET /readyz`: 200 `{"status": "ready"}` once every model is loaded, verified and warm;
/// otherwise 503 with `warming`, `failed` or `draining` and each model's stage.
pub async fn readyz(State(node): State<AppState>) -> Response {
    let models: serde_json::Map<String, Value> = node
        .registry
        .slots()
        .iter()
        .map(|s| {
            let stage = s.stage();
            let v = match &stage {
                Stage::Failed(msg) => json!({"stage": "failed", "error": msg}),
                other => json!({"stage": other.name()}),
            };
            (s.name().to_string(), v)
        })
        .collect();
    let any_failed = node.registry.slots().iter().any(|s| matches!(s.stage(), Stage::Failed(_)));
    let status = if node.is_draining() {
        "draining"
    } else if node.registry.all_ready() {
        "ready"
    } else if any_failed {
        "failed"
    } else {
        "warming"
    };
    let code = if status == "ready" { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut response = (code, Json(json!({"status": status, "models": models}))).into_response();
    if code != StatusCode::OK {
        response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("5"));
    }
    response
}

/// `GET /info`: version, build, device, limits, and per model its version, digest, files,
/// stage and the seconds each boot stage took.
pub async fn info(State(node): State<AppState>) -> Json<Value> {
    let models: Vec<Value> = node
        .registry
        .slots()
        .iter()
        .map(|s| {
            let facts = s.facts();
            let stage = s.stage();
            let stages: serde_json::Map<String, Value> =
                facts.stage_seconds.iter().map(|(k, v)| (k.clone(), json!((v * 1000.0).round() / 1000.0))).collect();
            let load = match s.current_service() {
                Some(Service::Encoder(e)) => json!({"in_flight": e.in_flight()}),
                Some(Service::Generator(g)) => json!({"running": g.running(), "waiting": g.waiting()}),
                _ => json!({}),
            };
            json!({
                "load": load,
                "name": s.name(),
                "kind": s.config.kind,
                "manifest": s.entry.as_ref().map(|e| e.name.clone()),
                "version": facts.version,
                "digest": facts.digest,
                "label": s.label(),
                "files": facts.files,
                "device": facts.device,
                "stage": stage.name(),
                "error": match &stage { Stage::Failed(m) => Some(m.clone()), _ => None },
                "stage_seconds": stages,
                "details": facts.details,
            })
        })
        .collect();
    let limits = &node.config.limits;
    Json(json!({
        "name": "edgenode",
        "version": env!("CARGO_PKG_VERSION"),
        "git_sha": option_env!("BUILD_GIT_SHA").unwrap_or("unknown"),
        "device": node.device,
        "uptime_s": node.started.elapsed().as_secs(),
        "limits": {
            "max_body_bytes": limits.max_body_bytes,
            "max_inputs": limits.max_inputs,
            "max_input_chars": limits.max_input_chars,
            "request_timeout_s": limits.request_timeout_s,
        },
        "models": models,
    }))
}

/// `GET /v1/models`: OpenAI's list, each entry with our `version`, `digest`, `kind` and `device`.
pub async fn list_models(State(node): State<AppState>) -> Json<Value> {
    let created = node.started_at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let data: Vec<Value> = node
        .registry
        .slots()
        .iter()
        .map(|s| {
            let facts = s.facts();
            json!({
                "id": s.name(),
                "object": "model",
                "created": created,
                "owned_by": "edgenode",
                "kind": s.config.kind,
                "version": facts.version,
                "digest": facts.digest,
                "device": facts.device,
                "ready": s.stage() == Stage::Ready,
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}
