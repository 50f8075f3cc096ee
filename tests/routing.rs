//! The routing tier with two real processes: B is a plain edgenode serving SmolLM2, and
//! A's upstream ("the cloud") is B's `/v1/chat/completions`. Nothing is mocked: A's router
//! classifier, local model, ledger and circuit breaker all run for real, and B really
//! answers what A sends it.

mod common;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SHORT: &str = "What's the capital of Italy?";
const LONG: &str = "Write a detailed analysis of the economic causes of the Great Depression, comparing monetary and fiscal explanations.";

fn auto(content: &str, extra: Value) -> Value {
    let mut body = json!({"model": "auto", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// Sends a chat request; returns (status, route, reason, body).
fn send(d: &Daemon, body: &Value) -> (u16, String, String, Value) {
    let r = client().post(d.url("/v1/chat/completions")).json(body).send().unwrap();
    let status = r.status().as_u16();
    let header = |k: &str| r.headers().get(k).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let (route, reason) = (header("x-edgenode-route"), header("x-edgenode-route-reason"));
    let text = r.text().unwrap();
    (status, route, reason, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Sends a streaming chat request; returns (route, reason, payloads before [DONE]).
fn send_stream(d: &Daemon, body: &Value) -> (String, String, Vec<Value>) {
    let r = client().post(d.url("/v1/chat/completions")).json(body).send().unwrap();
    assert_eq!(r.status(), 200);
    let header = |k: &str| r.headers().get(k).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let (route, reason) = (header("x-edgenode-route"), header("x-edgenode-route-reason"));
    let events = sse_events(r);
    (route, reason, events)
}

fn generated_count(d: &Daemon) -> u64 {
    let (_, stats) = get_json(d, "/stats");
    stats["workloads"].as_array().unwrap().iter().filter(|w| w["workload"] == "generate").map(|w| w["count"].as_u64().unwrap()).sum()
}

fn usage_of(events: &[Value]) -> (u64, u64) {
    let u = events.iter().rev().find(|e| e["usage"].is_object()).map(|e| e["usage"].clone()).expect("a usage chunk");
    (u["prompt_tokens"].as_u64().unwrap(), u["completion_tokens"].as_u64().unwrap())
}

#[test]
fn auto_routes_by_confidence_and_the_ledger_matches_the_usage_seen() {
    let cloud = start_cloud(None);
    let edge = start_edge(&cloud, "", "");
    let mut seen = [(0u64, 0u64); 2]; // (prompt, completion) per tier: edge, cloud
    let mut add = |tier: &str, p: u64, c: u64| {
        let i = if tier == "edge" { 0 } else { 1 };
        seen[i].0 += p;
        seen[i].1 += c;
    };

    // /route answers without running anything.
    let (s, decision) = post_json(&edge, "/route", &auto(SHORT, json!({})));
    assert_eq!(s, 200);
    assert_eq!(decision["tier"], "edge", "{decision}");
    assert!(decision["features"]["edge_confidence"].as_f64().unwrap() >= 0.6);
    assert!(decision["features"]["prompt_tokens"].as_u64().unwrap() > 5);
    let (_, decision) = post_json(&edge, "/route", &auto(LONG, json!({})));
    assert_eq!(decision["tier"], "cloud", "{decision}");
    assert_eq!(generated_count(&cloud), 0, "/route runs nothing");

    // A short lookup answers at the edge.
    let (s, route, reason, body) = send(&edge, &auto(SHORT, json!({})));
    assert_eq!((s, route.as_str()), (200, "edge"), "{body}");
    assert!(reason.starts_with("confident"), "{reason}");
    assert_eq!(body["model"], "smollm2");
    add("edge", body["usage"]["prompt_tokens"].as_u64().unwrap(), body["usage"]["completion_tokens"].as_u64().unwrap());
    assert_eq!(generated_count(&cloud), 0);

    // A long analysis goes to the cloud, and the answer is B's.
    let (s, route, reason, body) = send(&edge, &auto(LONG, json!({})));
    assert_eq!((s, route.as_str()), (200, "cloud"), "{body}");
    assert!(reason.starts_with("low_confidence"), "{reason}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(generated_count(&cloud), 1, "B answered it");
    add("cloud", body["usage"]["prompt_tokens"].as_u64().unwrap(), body["usage"]["completion_tokens"].as_u64().unwrap());

    // Streams too, both ways; the cloud stream is passed through chunk by chunk.
    let (route, _, events) = send_stream(&edge, &auto(LONG, json!({"stream": true})));
    assert_eq!(route, "cloud");
    assert!(events.iter().any(|e| e["choices"][0]["delta"]["content"].as_str().is_some_and(|t| !t.is_empty())));
    let (p, c) = usage_of(&events);
    add("cloud", p, c);
    assert_eq!(generated_count(&cloud), 2);
    let (route, _, events) = send_stream(&edge, &auto(SHORT, json!({"stream": true, "stream_options": {"include_usage": true}})));
    assert_eq!(route, "edge");
    let (p, c) = usage_of(&events);
    add("edge", p, c);

    // The ledger counts exactly what the usage fields said.
    let (_, stats) = get_json(&edge, "/stats");
    let r = &stats["routing"];
    for (i, tier) in ["edge", "cloud"].iter().enumerate() {
        let day = &r["ledger"]["rolling_day"][tier];
        assert_eq!(day["prompt_tokens"].as_u64().unwrap(), seen[i].0, "{tier}: {r}");
        assert_eq!(day["completion_tokens"].as_u64().unwrap(), seen[i].1, "{tier}: {r}");
        assert_eq!(day["requests"], 2);
        assert_eq!(r["tiers"][tier]["count"], 2);
    }
    let edge_cost = r["ledger"]["rolling_day"]["edge"]["cost_usd"].as_f64().unwrap();
    assert!((edge_cost - (seen[0].0 + seen[0].1) as f64 * 0.20 / 1e6).abs() < 1e-12);
    assert_eq!(r["decisions"]["edge"]["confident"], 2);
    assert_eq!(r["decisions"]["cloud"]["low_confidence"], 2);
    let verdict = r["viability"]["verdict"].as_str().unwrap();
    assert!(verdict == "edge justified" || verdict == "edge not justified", "{r}");
    assert_eq!(r["viability"]["cloud_latency_source"], "observed");
    assert!(r["ledger"]["rolling_day"]["alerting"].as_bool().unwrap(), "edge spend share is far over 5%: {r}");
    assert!(edge.log_text().contains("passed costs.edge_share_alert"));

    // An explicit model name is not re-routed.
    let (s, route, _, body) = send(&edge, &json!({"model": "smollm2", "messages": [{"role": "user", "content": LONG}], "max_tokens": 4}));
    assert_eq!(s, 200);
    assert_eq!(route, "", "a named local model runs locally, unrouted: {body}");
    assert_eq!(generated_count(&cloud), 2);
}

/// What the local model cannot do (tools, several choices, tool turns) is never answered at
/// the edge as something else: named locally it is a 400 naming the field; with `auto` it
/// goes to the cloud, with the field in the route reason, even for a short, confident
/// prompt. (B, the "cloud" here, is an edgenode too, so it refuses tools in turn: the point
/// is where A sent the request and why.)
#[test]
fn requests_the_edge_cannot_honour_go_to_the_cloud_with_the_field_named() {
    let cloud = start_cloud(None);
    let edge = start_edge(&cloud, "", "");
    let tools = json!([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]);
    let cases = [
        (json!({"tools": tools}), "tools"),
        (json!({"n": 2}), "n"),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"messages": [{"role": "user", "content": SHORT}, {"role": "tool", "content": "18C", "tool_call_id": "c1"}]}), "messages"),
    ];
    for (extra, field) in cases {
        let (s, route, reason, body) = send(&edge, &auto(SHORT, extra.clone()));
        assert_eq!(route, "cloud", "{extra}: {body}");
        assert_eq!(reason, format!("edge_unsupported: {field}"), "{extra}");
        assert_eq!(s, 400, "B refuses it as A would have: {body}");
        let (_, decision) = post_json(&edge, "/route", &auto(SHORT, extra.clone()));
        assert_eq!((decision["tier"].as_str(), decision["fits_edge"].as_bool()), (Some("cloud"), Some(false)), "{decision}");
        // Named locally: the 400 names the field.
        let mut local = auto(SHORT, extra);
        local["model"] = json!("smollm2");
        let (s, route, _, body) = send(&edge, &local);
        assert_eq!((s, route.as_str()), (400, ""), "{body}");
        assert!(body["error"]["param"].as_str().unwrap().starts_with(field), "{body}");
    }
    // The same short prompt without them stays at the edge.
    let (s, route, _, _) = send(&edge, &auto(SHORT, json!({})));
    assert_eq!((s, route.as_str()), (200, "edge"));
}

#[test]
fn local_overload_sends_the_next_auto_request_to_the_cloud() {
    let cloud = start_cloud(None);
    let edge = start_edge(&cloud, "", "max_concurrent_sequences = 1\nmax_waiting = 0\n");
    // One long local stream holds the only sequence slot.
    let body = json!({"model": "smollm2", "stream": true, "max_tokens": 400, "ignore_eos": true,
                      "messages": [{"role": "user", "content": "Tell me a long story."}]});
    let r = client().post(edge.url("/v1/chat/completions")).json(&body).send().unwrap();
    let mut lines = BufReader::new(r).lines();
    lines.by_ref().map_while(Result::ok).find(|l| l.starts_with("data: ")).unwrap();

    let (s, route, reason, body) = send(&edge, &auto(SHORT, json!({})));
    assert_eq!((s, route.as_str()), (200, "cloud"), "{body}");
    assert!(reason.starts_with("fallback_from_edge: overloaded"), "{reason}");
    assert_eq!(generated_count(&cloud), 1, "B answered it");
    drop(lines);
}

#[test]
fn upstream_down_falls_back_or_names_the_upstream_and_the_circuit_recovers() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let cloud = start_cloud(Some(addr.clone()));
    let edge = start_edge(&cloud, "", "");
    drop(cloud); // B dies.

    // Cloud-bound, but it fits the local model: answered at the edge.
    let (s, route, reason, body) = send(&edge, &auto(LONG, json!({})));
    assert_eq!((s, route.as_str()), (200, "edge"), "{body}");
    assert!(reason.starts_with("fallback_from_cloud: upstream_error"), "{reason}");
    assert!(body["choices"][0]["message"]["content"].as_str().is_some());

    // Cloud-bound and too big for the local context: a 502 that names the upstream.
    let (s, _, _, body) = send(&edge, &auto(LONG, json!({"max_tokens": 1_000_000})));
    assert_eq!(s, 502, "{body}");
    assert_eq!(body["error"]["code"], "upstream_error");
    assert!(body["error"]["message"].as_str().unwrap().contains(&addr), "{body}");

    // Two failures opened the circuit: the next call does not even try.
    let (_, stats) = get_json(&edge, "/stats");
    assert_eq!(stats["routing"]["upstream"]["circuit"], "open", "{stats}");
    let metrics = client().get(edge.url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.lines().any(|l| l == "edgenode_upstream_circuit_open 1"), "{metrics}");
    let (s, _, _, body) = send(&edge, &auto(LONG, json!({"max_tokens": 1_000_000})));
    assert_eq!(s, 502);
    assert!(body["error"]["message"].as_str().unwrap().contains("circuit is open"), "{body}");

    // B comes back on the same address; after circuit_open_s one probe goes through and closes it.
    let cloud = start_cloud(Some(addr));
    std::thread::sleep(Duration::from_millis(1100));
    let (s, route, reason, body) = send(&edge, &auto(LONG, json!({})));
    assert_eq!((s, route.as_str()), (200, "cloud"), "{reason} {body}");
    assert_eq!(generated_count(&cloud), 1);
    let (_, stats) = get_json(&edge, "/stats");
    assert_eq!(stats["routing"]["upstream"]["circuit"], "closed", "{stats}");
    assert_eq!(stats["routing"]["upstream"]["times_opened"], 1);
}

/// An upstream that accepts connections and never answers, until dropped.
struct HangingUpstream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HangingUpstream {
    fn bind(addr: &str) -> HangingUpstream {
        let listener = std::net::TcpListener::bind(addr).expect("bind the hanging upstream");
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => held.push(conn),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        HangingUpstream { stop, thread: Some(thread) }
    }
}

impl Drop for HangingUpstream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_half_open_probe_that_is_cut_off_frees_its_slot_and_the_circuit_recovers() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let cloud = start_cloud(Some(addr.clone()));
    // The request timeout (2 s) is shorter than the upstream's first-byte timeout (10 s).
    let edge = start_edge(&cloud, "\n[limits]\nrequest_timeout_s = 2", "");
    drop(cloud);
    for _ in 0..2 {
        let (s, route, _, body) = send(&edge, &auto(LONG, json!({})));
        assert_eq!((s, route.as_str()), (200, "edge"), "{body}");
    }
    let (_, stats) = get_json(&edge, "/stats");
    assert_eq!(stats["routing"]["upstream"]["circuit"], "open", "{stats}");

    // The probe meets an upstream that never answers and is cut by the request timeout.
    let hanging = HangingUpstream::bind(&addr);
    std::thread::sleep(Duration::from_millis(1100));
    let (s, _, _, body) = send(&edge, &auto(LONG, json!({})));
    assert_eq!(s, 504, "{body}");
    assert_eq!(body["error"]["code"], "timeout");

    // The next probe's client goes away before the upstream answers.
    let impatient = reqwest::blocking::Client::builder().timeout(Duration::from_millis(700)).build().unwrap();
    let cut = impatient.post(edge.url("/v1/chat/completions")).json(&auto(LONG, json!({}))).send();
    assert!(cut.is_err(), "the hanging upstream cannot have answered");
    std::thread::sleep(Duration::from_millis(300));
    drop(hanging);

    // A healthy upstream takes the port: the very next auto request probes, and closes the circuit.
    let cloud = start_cloud(Some(addr));
    let (s, route, reason, body) = send(&edge, &auto(LONG, json!({})));
    assert_eq!((s, route.as_str()), (200, "cloud"), "{reason} {body}");
    assert_eq!(generated_count(&cloud), 1);
    let (_, stats) = get_json(&edge, "/stats");
    assert_eq!(stats["routing"]["upstream"]["circuit"], "closed", "{stats}");
    assert_eq!(stats["routing"]["upstream"]["times_opened"], 1, "cancelled probes are not failures: {stats}");
    let logs = edge.log_text();
    assert_eq!(logs.matches("upstream probe was cancelled").count(), 2, "both cut probes gave their slot back");
}

#[test]
fn budgets_steer_tiers_and_429_when_none_is_left() {
    let cloud = start_cloud(None);
    let edge = start_edge(&cloud, "\n[costs]\nedge_daily_budget_usd = 0.0\n", "");
    for _ in 0..3 {
        let (s, route, reason, body) = send(&edge, &auto(SHORT, json!({})));
        assert_eq!((s, route.as_str()), (200, "cloud"), "{body}");
        assert_eq!(reason, "edge_budget_exhausted");
    }
    assert_eq!(generated_count(&cloud), 3, "everything went to B");
    drop(edge);

    let edge = start_edge(&cloud, "\n[costs]\nedge_daily_budget_usd = 0.0\ncloud_daily_budget_usd = 0.0\n", "");
    let (s, _, _, body) = send(&edge, &auto(SHORT, json!({})));
    assert_error(s, &body, 429, "budget_exceeded");
}

#[test]
fn split_mode_at_half_sends_about_half_of_200_requests_to_each_tier() {
    let cloud = start_cloud(None);
    let edge = start_edge(&cloud, "mode = \"split\"\nsplit_edge_share = 0.5\nsplit_seed = 7\n", "");
    let started = Instant::now();
    let mut to_edge = 0;
    for i in 0..200 {
        let (s, route, reason, body) = send(&edge, &auto(&format!("Question {i}: what is {i} plus one?"), json!({"max_tokens": 1})));
        assert_eq!(s, 200, "{body}");
        assert_eq!(reason, "split");
        if route == "edge" {
            to_edge += 1;
        }
    }
    assert!((80..=120).contains(&to_edge), "edge share {to_edge}/200");
    let (_, stats) = get_json(&edge, "/stats");
    let split = &stats["routing"]["split"];
    assert_eq!(split["edge"]["count"].as_u64().unwrap() + split["cloud"]["count"].as_u64().unwrap(), 200, "{split}");
    assert_eq!(split["edge"]["count"], to_edge);
    for tier in ["edge", "cloud"] {
        let l = &split[tier]["latency_ms"];
        assert!(l["p50"].as_f64().unwrap() <= l["p99"].as_f64().unwrap());
        assert!(split[tier]["completion_tokens"].as_u64().unwrap() > 0);
    }
    assert_eq!(generated_count(&cloud), 200 - to_edge);
    eprintln!("200 split requests in {:.1} s", started.elapsed().as_secs_f64());
}
