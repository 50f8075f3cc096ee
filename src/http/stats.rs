//! `/metrics` (Prometheus text) and `/stats` (the latency profile, JSON for people).

use axum::extract::{Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::AppState;
use crate::error::Error;
use crate::service::Service;
use crate::telemetry::metrics::METRICS;

/// `GET /metrics`: every metric in Prometheus text format 0.0.4.
pub async fn metrics(State(node): State<AppState>) -> Response {
    let m = &*METRICS;
    if let Some(cache) = &node.cache {
        cache.export_gauges();
    }
    // Load gauges are read from the services when scraped, so they cannot drift.
    for slot in node.registry.slots() {
        let name = slot.name();
        match slot.current_service() {
            Some(Service::Encoder(e)) => m.in_flight.with_label_values(&[name]).set(e.in_flight() as i64),
            Some(Service::Generator(g)) => {
                m.in_flight.with_label_values(&[name]).set(g.running() as i64);
                m.queue_depth.with_label_values(&[name]).set(g.waiting() as i64);
            }
            _ => {}
        }
        let facts = slot.facts();
        if let (Some(v), Some(d)) = (&facts.version, &facts.digest) {
            m.model_info.with_label_values(&[name, v, d, facts.device.as_deref().unwrap_or("")]).set(1.0);
        }
    }
    ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], m.render()).into_response()
}

/// `/stats` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// The network saving to weigh against observed latency, in milliseconds.
    saving_ms: Option<f64>,
}

/// `GET /stats[?saving_ms=50]`: per workload and model over the sliding window: count,
/// latency percentiles, the queue/compute split, tokens/s, and what share of the mean
/// latency the given network saving is.
pub async fn stats(
    State(node): State<AppState>,
    query: Result<Query<StatsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, Error> {
    let Query(q) = query.map_err(|e| Error::field("query", e.body_text()))?;
    let saving_ms = q.saving_ms.unwrap_or(node.config.telemetry.saving_ms);
    if !saving_ms.is_finite() || saving_ms < 0.0 {
        return Err(Error::field("saving_ms", "must be a non-negative number of milliseconds"));
    }
    let workloads = node.stats.summaries(saving_ms);
    Ok(Json(json!({
        "window_s": node.stats.window().as_secs(),
        "saving_ms": saving_ms,
        "uptime_s": node.started.elapsed().as_secs(),
        "workloads": workloads,
        "routing": node.router.stats(),
        "accounts": node.accounts.stats(node.keys.policies()),
        "fleet": node.quotas.stats(node.as_ref()),
        "state": {"path": node.state.path(), "node": node.node_id, "flush_ms": node.config.state.flush_ms},
        "cache": node.cache.as_ref().map_or(json!({"enabled": false}), |c| c.stats(node.config.costs.edge_usd_per_1m_tokens / 1e6)),
    })))
}
