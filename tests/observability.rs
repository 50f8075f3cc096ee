//! Observability with the real binary: spans arrive at an OTLP receiver inside the test
//! (decoded with the protocol's own types) with the right structure and attributes and the
//! caller's trace id; `/metrics` parses as Prometheus text and moves by exactly the
//! requests made; `/stats` counts them with ordered percentiles; with no endpoint nothing
//! is exported and nothing is logged about it.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{json, Value};

/// A minimal OTLP/HTTP receiver: accepts `POST /v1/traces` (protobuf) and keeps every span.
struct Receiver {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
    paths: Arc<Mutex<Vec<String>>>,
}

fn read_request(stream: &mut std::net::TcpStream) -> Option<(String, Vec<u8>)> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let path = request_line.split_whitespace().nth(1)?.to_string();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).ok()?;
    Some((path, body))
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let spans = Arc::new(Mutex::new(Vec::new()));
        let paths = Arc::new(Mutex::new(Vec::new()));
        let (sink, seen) = (spans.clone(), paths.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let (sink, seen) = (sink.clone(), seen.clone());
                std::thread::spawn(move || {
                    while let Some((path, body)) = read_request(&mut stream) {
                        seen.lock().unwrap().push(path);
                        let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf");
                        for rs in request.resource_spans {
                            for ss in rs.scope_spans {
                                sink.lock().unwrap().extend(ss.spans);
                            }
                        }
                        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                        if stream.write_all(head.as_bytes()).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Receiver { url, spans, paths }
    }
}

fn attrs(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn children<'a>(all: &'a [Span], parent: &Span) -> Vec<&'a Span> {
    all.iter().filter(|s| s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id).collect()
}

fn names(spans: &[&Span]) -> Vec<String> {
    let mut n: Vec<String> = spans.iter().map(|s| s.name.clone()).collect();
    n.sort();
    n.dedup();
    n
}

#[test]
fn spans_reach_an_otlp_collector_with_structure_attributes_and_the_callers_trace() {
    let receiver = Receiver::start();
    let config = format!(
        "[telemetry]\notlp_endpoint = {:?}\nservice_name = \"edge-test\"\n\n\
         [[models]]\nname = \"minilm\"\nkind = \"embed\"\n\n[[models]]\nname = \"smollm2\"\nkind = \"generate\"\n",
        receiver.url
    );
    let mut d = Daemon::start(Options { config: Some(config), ..Default::default() });
    d.wait_ready(Duration::from_secs(180));

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let r = client()
        .post(d.url("/embed"))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&json!({"inputs": ["traced input one", "and two"]}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, _) = post_json(&d, "/generate", &json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0}));
    assert_eq!(status, 200);
    let streamed = client()
        .post(d.url("/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": true}))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(streamed.contains("[DONE]"));

    // Spans are flushed on shutdown.
    d.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    let spans = receiver.spans.lock().unwrap().clone();
    assert!(receiver.paths.lock().unwrap().iter().all(|p| p == "/v1/traces"));

    // /embed: continues the caller's trace, carries the attributes, has its stages as children.
    let embed = spans
        .iter()
        .find(|s| s.name == "POST /embed")
        .unwrap_or_else(|| panic!("no embed span in {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>()));
    assert_eq!(hex::encode(&embed.trace_id), trace_id, "the caller's trace continues");
    assert_eq!(hex::encode(&embed.parent_span_id), caller_span, "parented to the caller's span");
    let a = attrs(embed);
    assert_eq!(a["route"], "/embed");
    assert_eq!(a["model"], "minilm");
    assert_eq!(a["model.version"], "0.1.0");
    assert_eq!(a["model.digest"].len(), 64);
    assert_eq!(a["device"], "cpu");
    assert_eq!(a["status"], "200");
    assert!(a["input_tokens"].parse::<u64>().unwrap() >= 6, "{a:?}");
    let kids = children(&spans, embed);
    assert_eq!(names(&kids), ["batch", "queue", "tokenize", "validate"], "{:?}", names(&kids));
    let batch = kids.iter().find(|s| s.name == "batch").unwrap();
    let b = attrs(batch);
    assert!(b["batch.size"].parse::<u64>().unwrap() >= 1 && b["batch.tokens"].parse::<u64>().unwrap() >= 6, "{b:?}");
    let in_batch: Vec<&Span> = kids.iter().filter(|s| s.name == "batch").flat_map(|b| children(&spans, b)).collect();
    assert_eq!(names(&in_batch), ["inference", "pool"]);
    assert_eq!(kids.iter().filter(|s| s.name == "queue").count(), 2, "one queue wait per input");

    // /generate: a new root trace with queue, prefill and decode.
    let gen = spans.iter().find(|s| s.name == "POST /generate").expect("generate span");
    assert!(gen.parent_span_id.is_empty(), "no traceparent: a root span");
    let g = attrs(gen);
    assert_eq!(g["model"], "smollm2");
    assert_eq!(g["output_tokens"], "4");
    assert!(g["input_tokens"].parse::<u64>().unwrap() > 0);
    assert_eq!(names(&children(&spans, gen)), ["decode", "prefill", "queue"]);

    // A stream: its span and the token counts arrive when the stream ends.
    let chat = spans.iter().find(|s| s.name == "POST /v1/chat/completions").expect("chat span");
    assert!(names(&children(&spans, chat)).contains(&"stream".to_string()));
    assert_eq!(attrs(chat)["output_tokens"], "3");
}

fn scrape(d: &Daemon) -> prometheus_parse::Scrape {
    let r = client().get(d.url("/metrics")).send().unwrap();
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = r.text().unwrap();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text")
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(buckets) => buckets.iter().map(|b| b.count).fold(0.0, f64::max),
            _ => 0.0,
        })
        .sum()
}

#[test]
fn metrics_and_stats_count_exactly_the_requests_made() {
    let d = Daemon::start_default();
    d.wait_ready(Duration::from_secs(180));
    let before = scrape(&d);
    let embed_200 = [("route", "/embed"), ("model", "minilm"), ("status", "200")];
    let base = value(&before, "edgenode_requests_total", &embed_200);

    for i in 0..5 {
        let (s, _) = post_json(&d, "/embed", &json!({"inputs": format!("sentence number {i}")}));
        assert_eq!(s, 200);
    }
    let (s, _) = post_json(&d, "/embed", &json!({"inputs": []}));
    assert_eq!(s, 400);
    let (s, _) = post_json(&d, "/classify", &json!({"inputs": "What time is it in Tokyo?"}));
    assert_eq!(s, 200);
    let (s, body) = post_json(&d, "/generate", &json!({"prompt": "Hi", "max_tokens": 5, "ignore_eos": true}));
    assert_eq!(s, 200, "{body}");

    let after = scrape(&d);
    assert_eq!(value(&after, "edgenode_requests_total", &embed_200) - base, 5.0);
    assert_eq!(value(&after, "edgenode_requests_total", &[("route", "/embed"), ("status", "400")]), 1.0);
    assert_eq!(value(&after, "edgenode_requests_total", &[("route", "/classify"), ("model", "router"), ("status", "200")]), 1.0);
    assert_eq!(value(&after, "edgenode_requests_total", &[("route", "/generate"), ("model", "smollm2"), ("status", "200")]), 1.0);
    assert_eq!(value(&after, "edgenode_request_duration_seconds", &[("route", "/generate"), ("status", "200")]), 1.0, "one observation");
    assert_eq!(
        value(&after, "edgenode_tokens_total", &[("model", "smollm2"), ("kind", "completion")])
            - value(&before, "edgenode_tokens_total", &[("model", "smollm2"), ("kind", "completion")]),
        5.0
    );
    assert!(value(&after, "edgenode_time_to_first_token_seconds", &[("model", "smollm2")]) >= 1.0);
    assert!(value(&after, "edgenode_batch_size", &[("model", "minilm")]) >= 5.0);
    assert!(value(&after, "edgenode_queue_wait_seconds", &[("model", "minilm")]) >= 5.0);
    assert_eq!(value(&after, "edgenode_in_flight", &[("model", "minilm")]), 0.0);
    assert_eq!(value(&after, "edgenode_model_ready", &[("model", "smollm2")]), 1.0);
    assert!(value(&after, "edgenode_process_resident_memory_bytes", &[]) > 1e8);

    // /stats: the same counts, ordered percentiles, the latency split, the design's arithmetic.
    let (s, stats) = get_json(&d, "/stats?saving_ms=20");
    assert_eq!(s, 200);
    assert_eq!(stats["saving_ms"], 20.0);
    let find = |w: &str, m: &str| -> Value {
        stats["workloads"].as_array().unwrap().iter().find(|x| x["workload"] == w && x["model"] == m).cloned().unwrap_or_else(|| panic!("{stats}"))
    };
    let embed = find("embed", "minilm");
    assert_eq!(embed["count"], 5, "warm-up is not traffic, a 400 is not a latency sample: {embed}");
    let l = &embed["latency_ms"];
    let (p50, p95, p99) = (l["p50"].as_f64().unwrap(), l["p95"].as_f64().unwrap(), l["p99"].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= p95 && p95 <= p99 && p99 <= l["max"].as_f64().unwrap(), "{embed}");
    let share = embed["saving_pct_of_mean"].as_f64().unwrap();
    let expect = 20.0 / l["mean"].as_f64().unwrap() * 100.0;
    assert!((share - expect).abs() < 0.05 * expect + 0.01, "{embed}");
    assert_eq!(find("classify", "router")["count"], 1);
    let gen = find("generate", "smollm2");
    assert_eq!(gen["count"], 1);
    assert_eq!(gen["output_tokens"], 5);
    assert!(gen["output_tokens_per_s"].as_f64().unwrap() > 0.0);
    let (s, bad) = get_json(&d, "/stats?saving_ms=-1");
    assert_error(s, &bad, 400, "invalid_field");
}

#[test]
fn timing_headers_on_every_inference_answer() {
    let d = Daemon::start(Options { config: Some("[[models]]\nname = \"minilm\"\nkind = \"embed\"\n".into()), ..Default::default() });
    d.wait_ready(Duration::from_secs(120));
    let r = client().post(d.url("/v1/embeddings")).json(&json!({"input": "headers"})).send().unwrap();
    let h = r.headers();
    for k in ["x-queue-time", "x-inference-time", "x-total-time"] {
        assert!(h[k].to_str().unwrap().parse::<f64>().unwrap() >= 0.0, "{k}");
    }
    let timing = h["server-timing"].to_str().unwrap();
    assert!(timing.contains("queue;dur=") && timing.contains("inference;dur="), "{timing}");
    assert!(h["x-edgenode-model"].to_str().unwrap().starts_with("minilm@0.1.0+"));
}

#[test]
fn without_an_endpoint_nothing_is_exported_and_nothing_is_logged_about_it() {
    let d = Daemon::start(Options { config: Some("[[models]]\nname = \"minilm\"\nkind = \"embed\"\n".into()), ..Default::default() });
    d.wait_ready(Duration::from_secs(120));
    let (s, _) = post_json(&d, "/embed", &json!({"inputs": "quiet"}));
    assert_eq!(s, 200);
    d.signal("TERM");
    std::thread::sleep(Duration::from_millis(500));
    let log = d.log_text();
    for line in log.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or(json!({}));
        assert!(v["level"] != "ERROR" && v["level"] != "WARN", "{line}");
        assert!(!line.to_lowercase().contains("otlp") && !line.to_lowercase().contains("opentelemetry"), "{line}");
    }
}

/// `server.metrics_addr`: `/metrics` on a listener of its own, and no longer on the public
/// port (where, with API keys, it would name each key with its spend).
#[test]
fn metrics_move_to_their_own_listener_off_the_public_port() {
    let config = "[server]\nmetrics_addr = \"127.0.0.1:0\"\n\n[[models]]\nname = \"minilm\"\nkind = \"embed\"\n";
    let d = Daemon::start(Options { config: Some(config.into()), ..Default::default() });
    d.wait_ready(Duration::from_secs(180));
    let log = d.log_text();
    let addr = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "metrics listening")
        .and_then(|v| v["addr"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no `metrics listening` line:\n{log}"));
    let (s, _) = post_json(&d, "/embed", &serde_json::json!({"inputs": "hello"}));
    assert_eq!(s, 200);
    let private = client().get(format!("http://{addr}/metrics")).send().unwrap();
    assert_eq!(private.status(), 200);
    let text = private.text().unwrap();
    assert!(text.contains("edgenode_requests_total"), "{text}");
    let public = client().get(d.url("/metrics")).send().unwrap();
    assert_eq!(public.status(), 404, "the public port does not answer /metrics");
    let other = client().get(format!("http://{addr}/info")).send().unwrap();
    assert_eq!(other.status(), 404, "the metrics listener serves /metrics only");
}
