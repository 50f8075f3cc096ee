//! Operations routes: liveness, readiness, what this node serves and proves.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::AppState;
use crate::config::ModelKind;
use crate::error::Error;
use crate::models::registry::Stage;

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
                Stage::Fetching => match s.facts().fetch {
                    Some(p) => json!({"stage": "fetching", "file": p.file, "bytes_done": p.bytes_done, "bytes_total": p.bytes_total}),
                    None => json!({"stage": "fetching"}),
                },
                other => json!({"stage": other.name()}),
            };
            (s.name().to_string(), v)
        })
        .collect();
    let any_failed = node.registry.slots().iter().any(|s| matches!(s.stage(), Stage::Failed(_)));
    let status = if node.is_draining() {
        "draining"
    } else if node.drift_blocks_ready() {
        "drift"
    } else if node.registry.all_ready() {
        "ready"
    } else if any_failed {
        "failed"
    } else {
        "warming"
    };
    let code = if status == "ready" { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut body = json!({"status": status, "models": models});
    if let Some(report) = node.sync_report() {
        body["sync"] = sync_summary(&report);
    }
    let mut response = (code, Json(body)).into_response();
    if code != StatusCode::OK {
        response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("5"));
    }
    response
}

/// Per manifest entry, its drift status; plus whether the manifest could be read.
fn sync_summary(report: &crate::models::sync::SyncReport) -> Value {
    let models: serde_json::Map<String, Value> = report.models.iter().map(|(k, m)| (k.clone(), json!(m.status))).collect();
    json!({"source": report.source, "reachable": report.reachable, "error": report.error, "models": models})
}

/// `POST /models/{name}/rollback`: switch a model back to the version it served before its
/// last switch (on disk, no download), and hold it there until the central manifest names
/// another version. Needs `sync.apply`.
pub async fn rollback(
    State(node): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, Error> {
    // It takes no fields: one sent would be ignored, so it is refused by name.
    if !body.iter().all(u8::is_ascii_whitespace) {
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(fields)) if fields.is_empty() => {}
            Ok(Value::Object(fields)) => {
                let field = fields.keys().next().cloned().unwrap_or_default();
                return Err(Error::field(field, "POST /models/{name}/rollback takes no fields: it returns to the version before the last switch"));
            }
            _ => return Err(Error::field("body", "POST /models/{name}/rollback takes no body, or an empty JSON object")),
        }
    }
    let Some(commands) = &node.sync_commands else {
        return Err(Error::field(
            "sync.apply",
            "rollback switches versions model sync applied; this node does not apply the central manifest (sync.apply = false)",
        ));
    };
    if node.registry.get(&name).is_none_or(|s| s.entry().is_none()) {
        return Err(Error::UnknownModel {
            name,
            kind: "served",
            served: node.registry.slots().iter().map(|s| s.name()).collect::<Vec<_>>().join(", "),
        });
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    commands
        .send(crate::models::sync::SyncCommand::Rollback { model: name.clone(), reply })
        .map_err(|_| Error::Internal("the model sync task has stopped".into()))?;
    match answer.await {
        Ok(Ok(label)) => Ok(Json(json!({"model": name, "serving": label, "held": true}))),
        Ok(Err(message)) => Err(Error::RollbackUnavailable(message)),
        Err(_) => Err(Error::Internal("the model sync task stopped before answering".into())),
    }
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
            let load = s.current_service().map_or(json!({}), |service| service.load());
            json!({
                "load": load,
                "name": s.name(),
                "kind": s.config.kind,
                "manifest": s.entry().map(|e| e.name),
                "version": facts.version,
                "digest": facts.digest,
                "label": s.label(),
                "files": facts.files,
                "device": facts.device,
                "stage": stage.name(),
                "error": match &stage { Stage::Failed(m) => Some(m.clone()), _ => None },
                "stage_seconds": stages,
                "fetch": facts.fetch,
                "details": facts.details,
            })
        })
        .collect();
    let limits = &node.config.limits;
    let mut sync = match node.sync_report() {
        Some(r) => serde_json::to_value(&r).unwrap_or(Value::Null),
        None if node.config.sync.expected_manifest.is_empty() => json!({"enabled": false}),
        None => json!({"enabled": true, "source": node.config.sync.expected_manifest, "checked_at": null}),
    };
    if node.config.sync.apply && !node.config.sync.expected_manifest.is_empty() {
        sync["apply"] = json!(*node.upgrades.read());
    }
    let auth = json!({
        "enabled": node.keys.enabled(),
        "keys": node.keys.hints(),
        "protect_probes": node.config.auth.protect_probes,
    });
    let fleet = json!({
        "store": node.quotas.fleet().then(|| crate::quota::redis::shown_url(&node.config.fleet.store)),
        "reachable": node.quotas.reachable(),
        "node": node.node_id,
    });
    let mut info = json!({
        "auth": auth,
        "fleet": fleet,
        "state": {"path": node.state.path(), "flush_ms": node.config.state.flush_ms},
        "sync": sync,
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
            "max_request_tokens": limits.max_request_tokens,
            "max_tokens": limits.max_tokens,
            "max_connections": limits.max_connections,
            "auto_truncate": limits.auto_truncate,
        },
        "models": models,
    });
    if let (Value::Object(ours), Value::Object(tei)) = (&mut info, tei_info(&node)) {
        ours.extend(tei);
    }
    // TGI's fields where TEI's have not taken the name (a node with an embed model reports
    // that model's `model_id`, as TEI would).
    if let (Value::Object(ours), Value::Object(tgi)) = (&mut info, tgi_info(&node)) {
        for (k, v) in tgi {
            ours.entry(k).or_insert(v);
        }
    }
    Json(info)
}

/// text-generation-inference's `/info` fields, for the first generate model: TGI clients
/// read `max_input_tokens` and `max_total_tokens` to size their prompts.
fn tgi_info(node: &AppState) -> Value {
    let Some(slot) = node.registry.slots().into_iter().find(|s| s.config.kind == ModelKind::Generate) else {
        return json!({});
    };
    let facts = slot.facts();
    let generator = match slot.current_service() {
        Some(crate::service::Service::Generator(g)) => Some(g),
        _ => None,
    };
    let context = generator.as_ref().map(|g| g.context);
    json!({
        "model_id": slot.name(),
        "model_sha": facts.digest,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": generator.as_ref().map(|g| g.max_sequences + g.max_waiting()),
        "max_best_of": 1,
        "max_stop_sequences": super::tgi::MAX_STOP_SEQUENCES,
        "max_input_tokens": context.map(|c| c.saturating_sub(1)),
        "max_total_tokens": context,
        "validation_workers": node.tokenizers.threads(),
        "max_client_batch_size": 1,
        "router": "edgenode",
        "sha": option_env!("BUILD_GIT_SHA"),
        "docker_label": Value::Null,
    })
}

/// text-embeddings-inference's `/info` fields, for the first embed model, beside ours: TEI
/// clients read `max_client_batch_size` and `max_input_length` to size their requests.
fn tei_info(node: &AppState) -> Value {
    let limits = &node.config.limits;
    let Some(slot) = node.registry.slots().into_iter().find(|s| s.config.kind == ModelKind::Embed) else {
        return json!({"max_client_batch_size": limits.max_inputs, "auto_truncate": limits.auto_truncate});
    };
    let facts = slot.facts();
    let d = &facts.details;
    json!({
        "model_id": slot.name(),
        "model_sha": facts.digest,
        "model_dtype": "float32",
        "model_type": {"embedding": {"pooling": d.get("pooling").cloned().unwrap_or(Value::Null)}},
        "max_concurrent_requests": d.get("max_concurrent_inputs").cloned().unwrap_or(Value::Null),
        "max_input_length": d.get("max_input_tokens").cloned().unwrap_or(Value::Null),
        "max_batch_tokens": d.get("max_batch_tokens").cloned().unwrap_or(Value::Null),
        "max_batch_requests": d.get("max_batch_requests").cloned().unwrap_or(Value::Null),
        "max_client_batch_size": limits.max_inputs,
        "auto_truncate": limits.auto_truncate,
        "tokenization_workers": node.tokenizers.threads(),
        "sha": option_env!("BUILD_GIT_SHA"),
        "docker_label": Value::Null,
    })
}

/// `GET /health` (TEI's): 200 with an empty body when every model is ready and the node is
/// not draining; otherwise 503 in TEI's shape (`"error_type": "Unhealthy"`).
pub async fn health(State(node): State<AppState>) -> Result<StatusCode, Error> {
    if node.is_draining() {
        return Err(Error::Draining);
    }
    if !node.registry.all_ready() || node.drift_blocks_ready() {
        return Err(Error::NotReady { message: "unhealthy: not every model is ready (see /readyz)".into(), retry_after_s: 1 });
    }
    Ok(StatusCode::OK)
}

/// `GET /v1/models`: OpenAI's list, each entry with our `version`, `digest`, `kind` and `device`.
pub async fn list_models(State(node): State<AppState>) -> Json<Value> {
    let report = node.sync_report();
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
                "label": s.label(),
                "sync": s.entry().and_then(|e| report.as_ref().and_then(|r| r.models.get(&e.name))).map(|m| m.status),
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// The body of `POST /debug/fault`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRequest {
    /// The generate model whose engine thread dies.
    model: String,
}

/// `POST /debug/fault` (only with `debug.fault_injection`): kills a generate model's engine
/// thread outside its caught step, as a bug in the sampler or detokenizer would. Its running
/// sequences end with an error, `/readyz` answers 503 while the supervisor reloads it, and
/// 200 once it is warm again.
pub async fn debug_fault(
    State(node): State<AppState>,
    super::json::JsonBody(req): super::json::JsonBody<FaultRequest>,
) -> Result<Response, crate::error::Error> {
    let slot = node.registry.resolve(Some(&req.model), crate::config::ModelKind::Generate)?;
    let service = slot
        .current_service()
        .ok_or_else(|| crate::error::Error::NotReady { message: format!("model {} is not running", req.model), retry_after_s: 1 })?;
    let g = service.generator(slot.name())?;
    g.inject_fault()?;
    tracing::warn!(model = %req.model, "fault injected: the engine thread is told to die");
    Ok((StatusCode::ACCEPTED, Json(json!({"model": req.model, "fault": "engine thread killed"}))).into_response())
}
