//! The edge tier's economics, as the README's "Response cache", "Per-key limits and
//! budgets", "Quality" and "Fly fleet" sections describe them: the real daemon on real
//! models, over HTTP.

mod common;

use std::io::{BufRead, BufReader};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const MODELS: &str = "[[models]]\nname = \"minilm\"\nkind = \"embed\"\n\n[[models]]\nname = \"smollm2\"\nkind = \"generate\"\n";

fn start(config: &str) -> Daemon {
    let d = Daemon::start(Options { config: Some(format!("{config}\n{MODELS}")), ..Default::default() });
    d.wait_ready(Duration::from_secs(180));
    d
}

fn chat_body(content: &str) -> Value {
    json!({"model": "smollm2", "messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0})
}

/// POSTs `body` with extra headers; returns (status, x-edgenode-cache, body).
fn post(d: &Daemon, path: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, String, Value) {
    let mut r = client().post(d.url(path)).json(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().unwrap();
    let status = r.status().as_u16();
    let cache = r.headers().get("x-edgenode-cache").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (status, cache, r.json().unwrap_or(Value::Null))
}

/// A streamed chat answer's text and its x-edgenode-cache header.
fn stream_text(d: &Daemon, body: &Value) -> (String, String) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let r = client().post(d.url("/v1/chat/completions")).json(&body).send().unwrap();
    assert_eq!(r.status(), 200);
    let cache = r.headers().get("x-edgenode-cache").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let mut text = String::new();
    for line in BufReader::new(r).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        text.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    (text, cache)
}

fn content(body: &Value) -> String {
    body["choices"][0]["message"]["content"].as_str().unwrap().to_string()
}

#[test]
fn the_response_cache_answers_repeats_exactly_semantically_and_not_when_told_not_to() {
    let d = start("[cache]\nenabled = true\nsemantic_threshold = 0.9\n");
    let question = chat_body("What is the capital of France?");

    // The first answer runs the model; the same request again is a hit with the same answer.
    let (s, cache, first) = post(&d, "/v1/chat/completions", &question, &[]);
    assert_eq!((s, cache.as_str()), (200, "miss"), "{first}");
    let (s, cache, again) = post(&d, "/v1/chat/completions", &question, &[]);
    assert_eq!((s, cache.as_str()), (200, "hit"));
    assert_eq!(content(&again), content(&first));
    assert_eq!(again["usage"], first["usage"], "a hit reports the answer's tokens");
    assert_ne!(again["id"], first["id"], "a hit is a new response");

    // Streamed and non-streamed requests share entries: the hit streams the cached pieces.
    let (text, cache) = stream_text(&d, &question);
    assert_eq!((text, cache.as_str()), (content(&first), "hit"));

    // The same prompt through /generate (same rendered prompt, same parameters) shares it too.
    let native = json!({"model": "smollm2", "messages": question["messages"], "max_tokens": 12, "temperature": 0});
    let (s, cache, body) = post(&d, "/generate", &native, &[]);
    assert_eq!((s, cache.as_str(), body["text"].as_str().unwrap()), (200, "hit", content(&first).as_str()));

    // A differently worded question with the same meaning is a semantic hit; another topic is not.
    let (_, cache, close) = post(&d, "/v1/chat/completions", &chat_body("What's the capital of France?"), &[]);
    assert_eq!(cache, "semantic-hit");
    assert_eq!(content(&close), content(&first));
    let (_, cache, _) = post(&d, "/v1/chat/completions", &chat_body("Name three kinds of volcano."), &[]);
    assert_eq!(cache, "miss");

    // Other parameters are other entries.
    let mut longer = question.clone();
    longer["max_tokens"] = json!(13);
    assert_eq!(post(&d, "/v1/chat/completions", &longer, &[]).1, "miss");

    // Cache-Control: no-cache runs the model (and refreshes the entry); no-store neither reads
    // nor writes; a sampled request without a seed is not reproducible and is never cached.
    assert_eq!(post(&d, "/v1/chat/completions", &question, &[("cache-control", "no-cache")]).1, "bypass");
    assert_eq!(post(&d, "/v1/chat/completions", &question, &[("cache-control", "no-store")]).1, "bypass");
    let mut sampled = question.clone();
    sampled["temperature"] = json!(0.8);
    assert_eq!(post(&d, "/v1/chat/completions", &sampled, &[]).1, "bypass");
    sampled["seed"] = json!(7);
    assert_eq!(post(&d, "/v1/chat/completions", &sampled, &[]).1, "miss");
    let (_, cache, seeded) = post(&d, "/v1/chat/completions", &sampled, &[]);
    assert_eq!(cache, "hit", "a seeded request is reproducible: {seeded}");

    // Embeddings: per input; a request is a hit when every input was cached.
    let embed = json!({"input": ["a cached sentence", "another one"], "model": "minilm"});
    let (s, cache, fresh) = post(&d, "/v1/embeddings", &embed, &[]);
    assert_eq!((s, cache.as_str()), (200, "miss"));
    let (_, cache, hit) = post(&d, "/v1/embeddings", &embed, &[]);
    assert_eq!(cache, "hit");
    assert_eq!(hit["data"], fresh["data"]);
    assert_eq!(hit["usage"], fresh["usage"]);
    let (_, cache, tei) = post(&d, "/embed", &json!({"inputs": ["another one", "a third"]}), &[]);
    assert_eq!(cache, "miss", "one of two inputs is new");
    let (_, cache, _) = post(&d, "/embed", &json!({"inputs": ["a third"]}), &[]);
    assert_eq!(cache, "hit", "{tei}");

    // /stats counts it all, with what the hits saved.
    let (_, stats) = get_json(&d, "/stats");
    let c = &stats["cache"];
    assert_eq!(c["enabled"], true);
    let g = &c["generate"];
    assert_eq!((g["hits"].as_u64(), g["semantic_hits"].as_u64()), (Some(4), Some(1)), "{c}");
    assert_eq!((g["misses"].as_u64(), g["bypassed"].as_u64()), (Some(4), Some(3)), "{c}");
    assert!(g["model_seconds_saved"].as_f64().unwrap() > 0.0);
    assert!(g["tokens_saved"].as_u64().unwrap() > 0);
    assert!(g["edge_cost_saved_usd"].as_f64().unwrap() > 0.0);
    assert_eq!((c["embed"]["hits"].as_u64(), c["embed"]["misses"].as_u64()), (Some(2), Some(2)), "{c}");
    assert!(c["entries"].as_u64().unwrap() >= 6, "{c}");

    let metrics = client().get(d.url("/metrics")).send().unwrap().text().unwrap();
    for line in [
        "edgenode_cache_requests_total{kind=\"generate\",result=\"hit\"} 4",
        "edgenode_cache_requests_total{kind=\"generate\",result=\"semantic_hit\"} 1",
        "edgenode_cache_requests_total{kind=\"embed\",result=\"miss\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} not in /metrics");
    }
    assert!(metrics.contains("edgenode_cache_entries "));
    assert!(metrics.contains("edgenode_cache_saved_seconds_total{kind=\"generate\"}"));
}

#[test]
fn the_cache_stays_within_max_bytes_by_evicting() {
    // A 384-float vector weighs about 1.7 KB: 8 KiB holds four of them.
    let d = start("[cache]\nenabled = true\nmax_bytes = 8192\n");
    for i in 0..40 {
        let (s, cache, _) = post(&d, "/embed", &json!({"inputs": format!("sentence number {i}")}), &[]);
        assert_eq!((s, cache.as_str()), (200, "miss"));
    }
    let (_, stats) = get_json(&d, "/stats");
    let c = &stats["cache"];
    assert!(c["weighted_bytes"].as_u64().unwrap() <= 8192, "{c}");
    assert!((1..=5).contains(&c["entries"].as_u64().unwrap()), "{c}");
    assert!(c["evicted"].as_u64().unwrap() >= 35, "{c}");
    let metrics = client().get(d.url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains("edgenode_cache_evictions_total{cause=\"size\"}"));
    // TinyLFU admits an entry once it is asked for more often than what it would evict: a
    // sentence asked for again becomes a hit within a few requests.
    let outcomes: Vec<String> = (0..4).map(|_| post(&d, "/embed", &json!({"inputs": "a frequent sentence"}), &[]).1).collect();
    assert_eq!(outcomes[0], "miss");
    assert!(outcomes.contains(&"hit".to_string()), "{outcomes:?} {c}");
}

#[test]
fn without_a_cache_section_answers_carry_no_cache_header() {
    let d = start("");
    let (s, cache, _) = post(&d, "/v1/chat/completions", &chat_body("Hi"), &[]);
    assert_eq!((s, cache.as_str()), (200, ""));
    let (_, stats) = get_json(&d, "/stats");
    assert_eq!(stats["cache"], json!({"enabled": false}));
}
