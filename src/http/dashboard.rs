//! `GET /dashboard`: the node's latency, cost, quality, models and routing at a glance, from
//! the binary itself (HTML, CSS, JS and uPlot are compiled in; nothing is loaded from
//! elsewhere, so it works on an offline edge node).
//!
//! The page is rendered with the current numbers in it, so it reads without JavaScript;
//! its script then polls `/stats` and `/info` (with the API key the page asks for, when the
//! node has keys) and draws the charts. On a node with keys, the rendered page carries no
//! figures: they are the node's own state, behind the key like `/stats`.

use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::AppState;

const PAGE: &str = include_str!("../../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../../assets/dashboard/app.js");
const APP_CSS: &str = include_str!("../../assets/dashboard/app.css");
const UPLOT_JS: &str = include_str!("../../assets/dashboard/vendor/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../assets/dashboard/vendor/uplot/uPlot.min.css");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(CONTENT_TYPE, content_type), (CACHE_CONTROL, "no-cache")], body).into_response()
}

pub async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

pub async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

pub async fn uplot_js() -> Response {
    asset("text/javascript; charset=utf-8", UPLOT_JS)
}

pub async fn uplot_css() -> Response {
    asset("text/css; charset=utf-8", UPLOT_CSS)
}

/// `GET /dashboard`.
pub async fn page(State(node): State<AppState>) -> Response {
    let sections: [(&str, String); 5] = if node.keys.enabled() {
        let ask = "<p class=\"muted\">This node has API keys: enter one above to see its figures.</p>".to_string();
        [("verdict", ask), ("latency", String::new()), ("tiers", String::new()), ("health", String::new()), ("models", String::new())]
    } else {
        let routing = node.router.stats();
        let workloads = serde_json::to_value(node.stats.summaries(node.config.telemetry.saving_ms)).unwrap_or_default();
        [
            ("verdict", verdict(&routing)),
            ("latency", latency(&workloads)),
            ("tiers", tiers(&routing)),
            ("health", health(&node, &routing)),
            ("models", models(&node)),
        ]
    };
    let mut html = PAGE.to_string();
    for (name, body) in sections {
        html = html.replace(&format!("{{{{{name}}}}}"), &body);
    }
    ([(CONTENT_TYPE, "text/html; charset=utf-8"), (CACHE_CONTROL, "no-store")], html).into_response()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => esc(s),
        Value::Null => "—".into(),
        Value::Number(n) => n.as_f64().map_or_else(|| n.to_string(), |f| if f.fract() == 0.0 { format!("{f:.0}") } else { format!("{f:.3}") }),
        other => esc(&other.to_string()),
    }
}

fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = String::from("<div class=\"scroll\"><table><thead><tr>");
    for h in head {
        out.push_str(&format!("<th>{}</th>", esc(h)));
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            out.push_str(&format!("<td>{cell}</td>"));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table></div>");
    out
}

fn verdict(routing: &Value) -> String {
    let v = &routing["viability"];
    format!(
        "<p class=\"verdict\">{}</p>{}",
        text(&v["verdict"]),
        table(
            &["edge requests", "latency value (USD)", "cost premium (USD)", "quality edge / cloud"],
            &[vec![
                text(&v["edge_requests"]),
                text(&v["latency_value_usd"]),
                text(&v["cost_premium_usd"]),
                format!("{} / {}", text(&v["quality"]["edge_mean"]), text(&v["quality"]["cloud_mean"])),
            ]]
        )
    )
}

fn latency(workloads: &Value) -> String {
    let rows: Vec<Vec<String>> = workloads
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            vec![
                format!("{} · {}", text(&w["workload"]), text(&w["model"])),
                text(&w["count"]),
                text(&w["latency_ms"]["p50"]),
                text(&w["latency_ms"]["p99"]),
                text(&w["queue_ms_mean"]),
                text(&w["tokenize_ms_mean"]),
                text(&w["compute_ms_mean"]),
                text(&w["first_token_ms"]["p50"]),
            ]
        })
        .collect();
    table(&["workload · model", "requests", "p50 ms", "p99 ms", "queue ms", "tokenize ms", "inference ms", "first token p50 ms"], &rows)
}

fn tiers(routing: &Value) -> String {
    let day = &routing["ledger"]["rolling_day"];
    let rows: Vec<Vec<String>> = ["edge", "cloud"]
        .iter()
        .map(|t| vec![t.to_string(), text(&day[t]["requests"]), text(&day[t]["cost_usd"]), text(&day[t]["cache_hits"])])
        .collect();
    format!(
        "{}<p>Edge share of the day's spend: {} (alert at {})</p>",
        table(&["tier", "requests", "spend (USD, day)", "cache hits"], &rows),
        text(&day["edge_cost_share"]),
        text(&day["edge_share_alert"])
    )
}

fn health(node: &AppState, routing: &Value) -> String {
    let circuit = if routing["upstream"].is_null() { "no cloud tier".to_string() } else { text(&routing["upstream"]["circuit"]) };
    let cache = match &node.cache {
        Some(c) => {
            let s = c.stats(0.0);
            format!("{} generate, {} embed", text(&s["generate"]["hit_rate"]), text(&s["embed"]["hit_rate"]))
        }
        None => "off".into(),
    };
    let store = match node.quotas.reachable() {
        _ if !node.quotas.fleet() => "none (limits are this node's own)".to_string(),
        Some(true) => "reachable".into(),
        Some(false) => "unreachable".into(),
        None => "not called yet".into(),
    };
    table(&["", ""], &[vec!["circuit".into(), circuit], vec!["cache hit rate".into(), cache], vec!["fleet store".into(), store]])
}

fn models(node: &AppState) -> String {
    let rows: Vec<Vec<String>> = node
        .registry
        .slots()
        .iter()
        .map(|s| {
            let facts = s.facts();
            let digest = facts.digest.as_deref().map(|d| d[..d.len().min(12)].to_string()).unwrap_or_else(|| "—".into());
            vec![
                esc(s.name()),
                esc(s.config.kind.as_str()),
                esc(facts.version.as_deref().unwrap_or("—")),
                format!("<code>{digest}</code>"),
                esc(s.stage().name()),
            ]
        })
        .collect();
    table(&["name", "kind", "version", "digest", "stage"], &rows)
}
