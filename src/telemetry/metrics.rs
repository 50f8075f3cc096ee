//! Prometheus metrics, served as text at `/metrics`.
//!
//! One process-wide set (like the Prometheus client's default registry): the batch worker,
//! the generation engine and the HTTP middleware all record into it without the node being
//! threaded through every layer. Names follow Prometheus conventions: `_total` counters,
//! `_seconds` durations, base units.

use std::sync::LazyLock;

use prometheus::{Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

/// Every metric edgenode exports.
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by route, model and HTTP status.
    pub requests: IntCounterVec,
    /// End-to-end request duration, by route, model and status.
    pub request_seconds: HistogramVec,
    /// Time an input waited in a model's queue before its batch started.
    pub queue_seconds: HistogramVec,
    /// Model compute time of one batch (encoders) or one request (generation).
    pub inference_seconds: HistogramVec,
    /// Inputs in one encoder batch.
    pub batch_size: HistogramVec,
    /// Tokens in one encoder batch (padding-free).
    pub batch_tokens: HistogramVec,
    /// Inputs waiting in a model's queue (encoders) or requests waiting for a sequence slot.
    pub queue_depth: IntGaugeVec,
    /// Inputs (encoders) or sequences (generation) being worked on or queued.
    pub in_flight: IntGaugeVec,
    /// Tokens read and produced, by model and `kind` (`prompt` | `completion` | `input`).
    pub tokens: IntCounterVec,
    /// Time from a generation request's arrival to its first token.
    pub ttft_seconds: HistogramVec,
    /// 1 while a model is in sync with the expected manifest, 0 when stale or missing.
    pub model_in_sync: IntGaugeVec,
    /// 1 when the last fetch of the expected manifest succeeded.
    pub sync_reachable: Gauge,
    /// 1 while a model is ready.
    pub model_ready: IntGaugeVec,
    /// Versions model sync switched to, by model.
    pub model_switches: IntCounterVec,
    /// Versions model sync could not apply, by model and the step that failed.
    pub model_sync_failures: IntCounterVec,
    /// Routing decisions, by tier, reason and whether it was a fallback.
    pub route_decisions: IntCounterVec,
    /// Spend by tier, in US dollars, from the configured per-token prices.
    pub cost_usd: prometheus::CounterVec,
    /// Tokens each tier processed, by tier and `kind`.
    pub tier_tokens: IntCounterVec,
    /// The edge's share of the day's spend (0..1).
    pub edge_cost_share: Gauge,
    /// 1 while the upstream's circuit breaker is open.
    pub upstream_circuit_open: Gauge,
    /// Resident memory of this process, in bytes.
    pub resident_bytes: Gauge,
    /// Per-model labelled gauges that are not request-driven.
    pub model_info: GaugeVec,
    /// Response-cache lookups, by kind (`generate`, `embed`) and result (`hit`,
    /// `semantic_hit`, `miss`, `bypass`).
    pub cache_requests: IntCounterVec,
    /// Model seconds the response cache's hits saved, by kind.
    pub cache_saved_seconds: prometheus::CounterVec,
    /// Entries the response cache dropped, by cause (`size`, `expired`).
    pub cache_evictions: IntCounterVec,
    /// Entries in the response cache.
    pub cache_entries: prometheus::IntGauge,
    /// Bytes the response cache's entries weigh.
    pub cache_bytes: prometheus::IntGauge,
    /// Requests an API key was refused, by key name and the limit it hit.
    pub key_refusals: IntCounterVec,
    /// Tokens charged to each named API key.
    pub key_tokens: IntCounterVec,
    /// Spend charged to each named API key, in US dollars.
    pub key_cost_usd: prometheus::CounterVec,
    /// Requests handed to another Machine with `fly-replay`, by reason.
    pub fleet_replays: IntCounterVec,
    /// Quality scores (0..1) by tier and source (`feedback`, `shadow`).
    pub quality_score: HistogramVec,
    /// Shadow comparisons by result (`scored`, `failed`, `skipped`).
    pub shadow_requests: IntCounterVec,
    /// Time one commit of the node's state took.
    pub state_commit_seconds: prometheus::Histogram,
    /// State records written (puts and deletes).
    pub state_records_written: prometheus::IntCounter,
    /// Commits of the node's state that failed (their records are retried).
    pub state_commit_failures: prometheus::IntCounter,
    /// 1 when the fleet store answered the last call, 0 when it did not.
    pub fleet_store_up: prometheus::IntGauge,
    /// Time one call to the fleet store took (report use, renew leases).
    pub fleet_sync_seconds: prometheus::Histogram,
    /// Calls to the fleet store that failed or timed out.
    pub fleet_sync_failures: prometheus::IntCounter,
    /// The fleet's total per limit scope over its window, at the last call.
    pub fleet_total: GaugeVec,
    /// This node's lease per limit scope, at the last call.
    pub fleet_lease: GaugeVec,
}

/// Registers `metric` and hands it back.
fn registered<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: Result<M, prometheus::Error>) -> M {
    let m = metric.expect("valid metric definition");
    registry.register(Box::new(m.clone())).expect("metric names are unique");
    m
}

const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const TOKEN_BUCKETS: &[f64] = &[16.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0];

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels).expect("valid histogram definition");
    registry.register(Box::new(h.clone())).expect("metric names are unique");
    h
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter definition");
    registry.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge definition");
    registry.register(Box::new(g.clone())).expect("metric names are unique");
    g
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::new(name, help).expect("valid gauge definition");
    registry.register(Box::new(g.clone())).expect("metric names are unique");
    g
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let cost_usd = prometheus::CounterVec::new(
            Opts::new("edgenode_cost_usd_total", "Spend by tier in US dollars, from the configured per-token prices."),
            &["tier"],
        )
        .expect("valid counter definition");
        r.register(Box::new(cost_usd.clone())).expect("metric names are unique");
        let model_info = GaugeVec::new(
            Opts::new("edgenode_model_info", "Always 1; labels say which version and digest each model serves."),
            &["model", "version", "digest", "device"],
        )
        .expect("valid gauge definition");
        r.register(Box::new(model_info.clone())).expect("metric names are unique");
        let cache_saved_seconds = prometheus::CounterVec::new(
            Opts::new("edgenode_cache_saved_seconds_total", "Model seconds the response cache's hits saved, by kind."),
            &["kind"],
        )
        .expect("valid counter definition");
        r.register(Box::new(cache_saved_seconds.clone())).expect("metric names are unique");
        let int_gauge = |name: &str, help: &str| {
            let g = prometheus::IntGauge::new(name, help).expect("valid gauge definition");
            r.register(Box::new(g.clone())).expect("metric names are unique");
            g
        };
        let key_cost_usd =
            prometheus::CounterVec::new(Opts::new("edgenode_key_cost_usd_total", "Spend charged to each API key, in US dollars."), &["key"])
                .expect("valid counter definition");
        r.register(Box::new(key_cost_usd.clone())).expect("metric names are unique");
        let cache_entries = int_gauge("edgenode_cache_entries", "Entries in the response cache.");
        let cache_bytes = int_gauge("edgenode_cache_bytes", "Bytes the response cache's entries weigh.");
        Metrics {
            requests: counter(&r, "edgenode_requests_total", "Requests answered, by route, model and HTTP status.", &["route", "model", "status"]),
            request_seconds: histogram(
                &r,
                "edgenode_request_duration_seconds",
                "End-to-end request duration.",
                &["route", "model", "status"],
                LATENCY_BUCKETS,
            ),
            queue_seconds: histogram(
                &r,
                "edgenode_queue_wait_seconds",
                "Time an input waited before its batch or sequence started.",
                &["model"],
                LATENCY_BUCKETS,
            ),
            inference_seconds: histogram(
                &r,
                "edgenode_inference_seconds",
                "Model compute time of one batch (encoders) or one request (generation).",
                &["model"],
                LATENCY_BUCKETS,
            ),
            batch_size: histogram(&r, "edgenode_batch_size", "Inputs in one encoder batch.", &["model"], SIZE_BUCKETS),
            batch_tokens: histogram(&r, "edgenode_batch_tokens", "Tokens in one encoder batch (padding-free).", &["model"], TOKEN_BUCKETS),
            queue_depth: gauge_vec(&r, "edgenode_queue_depth", "Inputs or requests waiting for a model.", &["model"]),
            in_flight: gauge_vec(&r, "edgenode_in_flight", "Inputs (encoders) or sequences (generation) admitted and not yet answered.", &["model"]),
            tokens: counter(
                &r,
                "edgenode_tokens_total",
                "Tokens read and produced, by model and kind (input, prompt, completion).",
                &["model", "kind"],
            ),
            ttft_seconds: histogram(
                &r,
                "edgenode_time_to_first_token_seconds",
                "Time from a generation request's arrival to its first token.",
                &["model"],
                LATENCY_BUCKETS,
            ),
            model_in_sync: gauge_vec(
                &r,
                "edgenode_model_in_sync",
                "1 when a model matches the expected manifest, 0 when stale, missing or extra.",
                &["model"],
            ),
            sync_reachable: gauge(&r, "edgenode_sync_manifest_reachable", "1 when the last fetch of the expected manifest succeeded."),
            model_ready: gauge_vec(&r, "edgenode_model_ready", "1 while a model is loaded, verified and warm.", &["model"]),
            model_switches: counter(&r, "edgenode_model_switches_total", "Versions model sync switched to, by model.", &["model"]),
            model_sync_failures: counter(
                &r,
                "edgenode_model_sync_failures_total",
                "New versions model sync could not apply (the serving one stayed), by model and failed step.",
                &["model", "step"],
            ),
            route_decisions: counter(&r, "edgenode_route_decisions_total", "Routing decisions by tier and reason.", &["tier", "reason"]),
            cost_usd,
            tier_tokens: counter(
                &r,
                "edgenode_tier_tokens_total",
                "Tokens each tier processed, by tier and kind (prompt, completion).",
                &["tier", "kind"],
            ),
            edge_cost_share: gauge(&r, "edgenode_edge_cost_share", "The edge tier's share of the rolling day's spend (0..1)."),
            upstream_circuit_open: gauge(&r, "edgenode_upstream_circuit_open", "1 while the upstream's circuit breaker is open."),
            resident_bytes: gauge(&r, "edgenode_process_resident_memory_bytes", "Resident memory of this process."),
            model_info,
            cache_requests: counter(
                &r,
                "edgenode_cache_requests_total",
                "Response-cache lookups by kind (generate, embed) and result (hit, semantic_hit, miss, bypass).",
                &["kind", "result"],
            ),
            cache_saved_seconds,
            cache_evictions: counter(
                &r,
                "edgenode_cache_evictions_total",
                "Entries the response cache dropped, by cause (size, expired).",
                &["cause"],
            ),
            cache_entries,
            cache_bytes,
            key_refusals: counter(
                &r,
                "edgenode_key_refusals_total",
                "Requests an API key was refused, by key and the limit it hit.",
                &["key", "limit"],
            ),
            key_tokens: counter(&r, "edgenode_key_tokens_total", "Tokens charged to each API key.", &["key"]),
            key_cost_usd,
            fleet_replays: counter(
                &r,
                "edgenode_fleet_replays_total",
                "Requests handed to another Machine with fly-replay, by reason (overloaded, model_not_served).",
                &["reason"],
            ),
            quality_score: histogram(
                &r,
                "edgenode_quality_score",
                "Quality scores (0..1) by tier and source (feedback, shadow).",
                &["tier", "source"],
                &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0],
            ),
            shadow_requests: counter(&r, "edgenode_shadow_requests_total", "Shadow comparisons by result (scored, failed, skipped).", &["result"]),
            state_commit_seconds: registered(
                &r,
                prometheus::Histogram::with_opts(
                    HistogramOpts::new("edgenode_state_commit_seconds", "Time one commit of the node's state (state.redb) took.")
                        .buckets(LATENCY_BUCKETS.to_vec()),
                ),
            ),
            state_records_written: registered(
                &r,
                prometheus::IntCounter::new("edgenode_state_records_written_total", "State records written (puts and deletes)."),
            ),
            state_commit_failures: registered(
                &r,
                prometheus::IntCounter::new("edgenode_state_commit_failures_total", "Commits of the node's state that failed (retried)."),
            ),
            fleet_store_up: registered(
                &r,
                prometheus::IntGauge::new("edgenode_fleet_store_up", "1 when the fleet store (fleet.store) answered the last call, else 0."),
            ),
            fleet_sync_seconds: registered(
                &r,
                prometheus::Histogram::with_opts(
                    HistogramOpts::new("edgenode_fleet_sync_seconds", "Time one call to the fleet store took.").buckets(LATENCY_BUCKETS.to_vec()),
                ),
            ),
            fleet_sync_failures: registered(
                &r,
                prometheus::IntCounter::new("edgenode_fleet_sync_failures_total", "Calls to the fleet store that failed or timed out."),
            ),
            fleet_total: registered(
                &r,
                GaugeVec::new(
                    Opts::new("edgenode_fleet_total", "The fleet's total per limit scope (cost:tier:cloud, requests:key:app, ...) over its window."),
                    &["scope"],
                ),
            ),
            fleet_lease: registered(&r, GaugeVec::new(Opts::new("edgenode_fleet_lease", "This node's lease per limit scope."), &["scope"])),
            registry: r,
        }
    }

    /// Creates the series whose label values are known in advance at zero, so that they are
    /// exposed (and `rate()` works) before the first event: cache lookups, evictions, fleet
    /// replays, shadow results, quality scores, spend per tier.
    fn initialize(&self) {
        for kind in ["generate", "embed"] {
            for result in ["hit", "semantic_hit", "miss", "bypass"] {
                self.cache_requests.with_label_values(&[kind, result]);
            }
            self.cache_saved_seconds.with_label_values(&[kind]);
        }
        for cause in ["size", "expired"] {
            self.cache_evictions.with_label_values(&[cause]);
        }
        for reason in ["overloaded", "model_not_served"] {
            self.fleet_replays.with_label_values(&[reason]);
        }
        for result in ["scored", "failed", "skipped"] {
            self.shadow_requests.with_label_values(&[result]);
        }
        for tier in ["edge", "cloud"] {
            self.cost_usd.with_label_values(&[tier]);
            for source in ["feedback", "shadow"] {
                self.quality_score.with_label_values(&[tier, source]);
            }
            for kind in ["prompt", "completion"] {
                self.tier_tokens.with_label_values(&[tier, kind]);
            }
        }
    }

    /// Creates a named API key's series at zero.
    pub fn initialize_key(&self, key: &str) {
        self.key_tokens.with_label_values(&[key]);
        self.key_cost_usd.with_label_values(&[key]);
        for limit in ["requests_per_minute", "tokens_per_minute", "daily_budget_usd"] {
            self.key_refusals.with_label_values(&[key, limit]);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        if let Some(rss) = resident_bytes() {
            self.resident_bytes.set(rss as f64);
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!("cannot encode metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let m = Metrics::new();
    m.initialize();
    m
});

/// Resident set size from `/proc/self/statm` (Linux); `None` elsewhere.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_metric_registers_and_renders() {
        let m = &*super::METRICS;
        m.requests.with_label_values(&["/embed", "minilm", "200"]).inc();
        let text = m.render();
        assert!(text.contains("edgenode_requests_total{model=\"minilm\",route=\"/embed\",status=\"200\"} 1"));
    }
}
