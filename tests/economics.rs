//! The edge tier's economics, as the README's "Response cache", "Per-key limits and
//! budgets", "Quality" and "Fly fleet" sections describe them: the real daemon on real
//! models, over HTTP.

mod common;

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
    let cache = r.headers().get("x-edgenode-cache").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let text: String = sse_events(r).iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
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

fn sha256_hex(key: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Waits until at least `margin` seconds are left in the current minute, so a test of
/// per-minute limits does not straddle two minutes.
fn away_from_minute_end(margin: u64) {
    let into = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() % 60;
    if into + margin >= 60 {
        std::thread::sleep(Duration::from_secs(61 - into));
    }
}

fn post_as(d: &Daemon, key: &str, path: &str, body: &Value) -> (u16, Option<String>, Value) {
    let r = client().post(d.url(path)).bearer_auth(key).json(body).send().unwrap();
    let status = r.status().as_u16();
    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    (status, retry, r.json().unwrap_or(Value::Null))
}

#[test]
fn each_key_has_its_own_limits_budget_and_models_and_spend_is_counted_by_key_and_user() {
    let config = format!(
        "[auth]\napi_keys = [\"sk-plain-000000\"]\n\n\
         [[auth.keys]]\nname = \"throttled\"\nsha256 = \"{}\"\nrequests_per_minute = 2\n\n\
         [[auth.keys]]\nname = \"embed-only\"\nkey_env = \"TEST_KEY_EMBED_ONLY\"\nmodels = [\"minilm\"]\n\n\
         [[auth.keys]]\nname = \"frugal\"\nsha256 = \"{}\"\ndaily_budget_usd = 0.0000001\n",
        sha256_hex("sk-throttled-1"),
        sha256_hex("sk-frugal-1"),
    );
    let d = Daemon::start(Options {
        config: Some(format!("{config}\n{MODELS}")),
        env: vec![("TEST_KEY_EMBED_ONLY".into(), "sk-embed-only-1".into())],
        ..Default::default()
    });
    d.wait_ready(Duration::from_secs(180));
    let embed = json!({"input": "hello there", "user": "alice"});

    // One key over its requests per minute: 429 naming the key and the limit, with
    // Retry-After; the other keys are unaffected.
    away_from_minute_end(15);
    for _ in 0..2 {
        assert_eq!(post_as(&d, "sk-throttled-1", "/v1/embeddings", &embed).0, 200);
    }
    let (s, retry, body) = post_as(&d, "sk-throttled-1", "/v1/embeddings", &embed);
    assert_eq!(s, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("\"throttled\"") && message.contains("requests_per_minute = 2"), "{message}");
    assert!(retry.unwrap().parse::<u64>().unwrap() >= 1);
    for _ in 0..3 {
        assert_eq!(post_as(&d, "sk-embed-only-1", "/v1/embeddings", &embed).0, 200);
        assert_eq!(post_as(&d, "sk-plain-000000", "/v1/embeddings", &embed).0, 200);
    }

    // A key limited to some models: others are 403, named or by default.
    let (s, _, body) = post_as(&d, "sk-embed-only-1", "/v1/chat/completions", &chat_body("Hi"));
    assert_eq!((s, body["error"]["code"].as_str()), (403, Some("model_not_allowed")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("\"embed-only\""));
    let (s, _, _) = post_as(&d, "sk-embed-only-1", "/generate", &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(s, 403, "the default generate model is not in the key's list");
    assert_eq!(post_as(&d, "sk-embed-only-1", "/embed", &json!({"inputs": "no model named"})).0, 200);

    // A daily budget: the first request spends it, the next is refused until it rolls off.
    assert_eq!(post_as(&d, "sk-frugal-1", "/v1/embeddings", &embed).0, 200);
    let (s, retry, body) = post_as(&d, "sk-frugal-1", "/v1/embeddings", &embed);
    assert_eq!((s, body["error"]["code"].as_str()), (429, Some("budget_exceeded")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("\"frugal\""));
    assert!(retry.is_some());

    // /stats: spend by key and by the request's user; refusals counted.
    let r = client().get(d.url("/stats")).bearer_auth("sk-plain-000000").send().unwrap();
    let stats: Value = r.json().unwrap();
    let keys = &stats["accounts"]["keys"];
    assert_eq!(keys["throttled"]["since_start"]["requests"], 2, "{keys}");
    assert_eq!(keys["throttled"]["refused"], 1);
    assert_eq!(keys["throttled"]["requests_per_minute"], 2);
    assert!(keys["embed-only"]["since_start"]["tokens"].as_u64().unwrap() > 0);
    assert_eq!(keys["frugal"]["budget_left_usd"], 0.0);
    assert!(keys["frugal"]["rolling_day_cost_usd"].as_f64().unwrap() > 0.0);
    assert_eq!(keys["api_keys[0]"]["since_start"]["requests"], 3);
    let alice = &stats["accounts"]["users"]["alice"];
    assert_eq!(alice["requests"], 9, "{alice}");
    let metrics = client().get(d.url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains("edgenode_key_refusals_total{key=\"throttled\",limit=\"requests_per_minute\"} 1"), "{metrics}");
    assert!(metrics.contains("edgenode_key_refusals_total{key=\"frugal\",limit=\"daily_budget_usd\"} 1"));
    assert!(metrics.contains("edgenode_key_tokens_total{key=\"embed-only\"}"));
}

#[test]
fn a_key_env_that_is_not_set_stops_start_up_naming_it() {
    let f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(f.path(), format!("[[auth.keys]]\nname = \"app\"\nkey_env = \"TEST_UNSET_KEY_VAR\"\n\n{MODELS}")).unwrap();
    let out = std::process::Command::new(binary())
        .args(["serve", "--addr", "127.0.0.1:0", "--config"])
        .arg(f.path())
        .current_dir(root())
        .env_remove("TEST_UNSET_KEY_VAR")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("TEST_UNSET_KEY_VAR") && err.contains("\"app\""), "{err}");
}

/// A node that saturates at one running and one waiting sequence.
fn fleet_node(env: Vec<(String, String)>, fleet: &str) -> Daemon {
    let config = format!(
        "[fleet]\n{fleet}\n\n[[models]]\nname = \"minilm\"\nkind = \"embed\"\n\n\
         [[models]]\nname = \"smollm2\"\nkind = \"generate\"\nmax_concurrent_sequences = 1\nmax_waiting = 1\n"
    );
    let d = Daemon::start(Options { config: Some(config), env, ..Default::default() });
    d.wait_ready(Duration::from_secs(180));
    d
}

/// Occupies the node's one sequence slot and its one waiting place with two long streams
/// (about eight seconds of decoding), returning while both are still held.
fn saturate(d: &Daemon) -> Vec<std::thread::JoinHandle<()>> {
    let long = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Count to a thousand."}],
                      "max_tokens": 1000, "ignore_eos": true, "temperature": 0, "stream": true});
    let mut held = Vec::new();
    for _ in 0..2 {
        let (url, body) = (d.url("/v1/chat/completions"), long.clone());
        held.push(std::thread::spawn(move || {
            let c = reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
            if let Ok(r) = c.post(url).json(&body).send() {
                let _ = r.bytes();
            }
        }));
        std::thread::sleep(Duration::from_millis(700));
    }
    held
}

fn replay_of(d: &Daemon, body: &Value, headers: &[(&str, &str)]) -> (u16, Option<String>, Value) {
    let mut r = client().post(d.url("/v1/chat/completions")).json(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().unwrap();
    let status = r.status().as_u16();
    let replay = r.headers().get("fly-replay").map(|v| v.to_str().unwrap().to_string());
    (status, replay, r.json().unwrap_or(Value::Null))
}

#[test]
fn on_fly_a_saturated_node_hands_requests_to_fly_replay_once() {
    let d = fleet_node(vec![("FLY_APP_NAME".into(), "edgenode-test".into())], "replay = true\nmodel_regions = { tinyllama = \"fra\" }");
    // A model this node does not serve: replayed to the region that has it, or elsewhere.
    let (s, to, _) = replay_of(&d, &json!({"model": "tinyllama", "messages": [{"role": "user", "content": "Hi"}]}), &[]);
    assert_eq!((s, to.as_deref()), (409, Some("region=fra")));
    let (s, to, _) = replay_of(&d, &json!({"model": "mystery", "messages": [{"role": "user", "content": "Hi"}]}), &[]);
    assert_eq!((s, to.as_deref()), (409, Some("elsewhere=true")));
    // A request Fly already replayed here is answered here, whatever the answer.
    let src = [("fly-replay-src", "instance=abc;region=ams;t=1")];
    let (s, to, body) = replay_of(&d, &json!({"model": "tinyllama", "messages": [{"role": "user", "content": "Hi"}]}), &src);
    assert_eq!((s, to, body["error"]["code"].as_str()), (404, None, Some("model_not_found")));

    // Saturated: the next generation request is replayed before its body is read...
    let held = saturate(&d);
    let (s, to, body) = replay_of(&d, &chat_body("Hi"), &[]);
    assert_eq!((s, to.as_deref()), (409, Some("elsewhere=true")), "{body}");
    // ...unless it was replayed already: then it gets the node's own 429.
    let (s, to, body) = replay_of(&d, &chat_body("Hi"), &src);
    assert_eq!((s, to, body["error"]["code"].as_str()), (429, None, Some("overloaded")));
    drop(held); // the streams end with the daemon
    let metrics = client().get(d.url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains("edgenode_fleet_replays_total{reason=\"model_not_served\"} 2"), "{metrics}");
    assert!(metrics.contains("edgenode_fleet_replays_total{reason=\"overloaded\"} 1"));
}

#[test]
fn off_fly_or_without_replay_a_saturated_node_answers_429() {
    for (env, fleet) in [(vec![], "replay = true"), (vec![("FLY_APP_NAME".to_string(), "edgenode-test".to_string())], "replay = false")] {
        let d = fleet_node(env, fleet);
        let held = saturate(&d);
        let (s, to, _) = replay_of(&d, &chat_body("Hi"), &[]);
        assert_eq!((s, to), (429, None));
        drop(held);
    }
}

fn auto(content: &str) -> Value {
    json!({"model": "auto", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0})
}

#[test]
fn shadow_traffic_and_feedback_score_each_tier_and_the_verdict_weighs_quality() {
    // B is the cloud: the same SmolLM2, so at temperature 0 its answers match the edge's and
    // the shadow score is the cosine of two identical texts.
    let cloud = start_cloud(None);
    let edge = start_edge(&cloud, "shadow_rate = 1.0\nfeedback_window_s = 600", "");
    let (s, edge_answer) = post_json(&edge, "/v1/chat/completions", &auto("What's the capital of Italy?"));
    assert_eq!(s, 200, "{edge_answer}");
    let (s, cloud_answer) = post_json(
        &edge,
        "/v1/chat/completions",
        &auto("Write a detailed analysis of the economic causes of the Great Depression, comparing monetary and fiscal explanations."),
    );
    assert_eq!(s, 200, "{cloud_answer}");

    // The shadow comparison runs after the client has its answer; wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let quality = loop {
        let (_, stats) = get_json(&edge, "/stats");
        let q = stats["routing"]["quality"].clone();
        if q["edge"]["shadow"]["count"] == 1 || std::time::Instant::now() > deadline {
            break q;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(quality["edge"]["shadow"]["count"], 1, "{quality}");
    assert!(quality["edge"]["shadow"]["mean"].as_f64().unwrap() > 0.99, "same model, same text: {quality}");
    let metrics = client().get(edge.url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains("edgenode_shadow_requests_total{result=\"scored\"} 1"), "{metrics}");
    assert!(metrics.contains("edgenode_quality_score_count{source=\"shadow\",tier=\"edge\"} 1"));

    // Feedback finds the tier that answered each id, once; bad input is named.
    let rate = |id: &Value, score: Value| post_json(&edge, "/v1/feedback", &json!({"id": id, "score": score, "comment": "checked by hand"}));
    let (s, body) = rate(&edge_answer["id"], json!(0.5));
    assert_eq!((s, body["tier"].as_str()), (200, Some("edge")), "{body}");
    let (s, body) = rate(&cloud_answer["id"], json!(0.25));
    assert_eq!((s, body["tier"].as_str()), (200, Some("cloud")), "{body}");
    let (s, body) = rate(&edge_answer["id"], json!(1.0));
    assert_error(s, &body, 400, "invalid_field");
    assert!(body["error"]["message"].as_str().unwrap().contains("scored already"));
    let (s, body) = rate(&json!("chatcmpl-nope"), json!(1.0));
    assert_error(s, &body, 400, "invalid_field");
    assert_eq!(body["error"]["param"], "id");
    let (s, body) = rate(&cloud_answer["id"], json!(1.5));
    assert_error(s, &body, 400, "invalid_field");
    assert_eq!(body["error"]["param"], "score");
    let (s, body) = post_json(&edge, "/v1/feedback", &json!({"id": "x", "score": 1, "stars": 5}));
    assert_eq!(s, 400, "{body}");

    let (_, stats) = get_json(&edge, "/stats");
    let q = &stats["routing"]["quality"];
    assert_eq!(q["edge"]["feedback"]["mean"], 0.5, "{q}");
    assert_eq!(q["cloud"]["feedback"]["mean"], 0.25);
    let v = &stats["routing"]["viability"]["quality"];
    assert_eq!(v["cloud_mean"], 0.25, "{v}");
    assert!(v["gap"].as_f64().unwrap() < 0.0, "the edge scored better here: {v}");
    // The shadow's cloud call is cloud spend in the ledger.
    assert!(stats["routing"]["ledger"]["rolling_day"]["cloud"]["requests"].as_u64().unwrap() >= 2);
}

#[test]
fn every_query_of_the_grafana_dashboard_names_a_metric_that_metrics_exposes() {
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(root().join("deploy/grafana/edgenode.json")).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 20, "{} queries", exprs.len());

    // A node that served embed, chat and routed traffic, behind a named key, with the cache
    // and model sync on.
    let manifest = root().join("models/manifest.toml");
    let config = format!(
        "[cache]\nenabled = true\n\n[sync]\nexpected_manifest = {:?}\n\n[[auth.keys]]\nname = \"dash\"\nsha256 = \"{}\"\n",
        manifest.display().to_string(),
        sha256_hex("sk-dash-1")
    );
    let d = start(&config);
    assert_eq!(post_as(&d, "sk-dash-1", "/v1/embeddings", &json!({"input": "hello"})).0, 200);
    assert_eq!(post_as(&d, "sk-dash-1", "/v1/chat/completions", &chat_body("Hi")).0, 200);
    assert_eq!(post_as(&d, "sk-dash-1", "/v1/chat/completions", &auto("Hi")).0, 200);
    let metrics = client().get(d.url("/metrics")).send().unwrap().text().unwrap();
    let exposed: std::collections::BTreeSet<&str> =
        metrics.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect();
    for expr in &exprs {
        let mut rest = expr.as_str();
        while let Some(i) = rest.find("edgenode_") {
            let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            assert!(exposed.contains(name.as_str()), "{name} (in `{expr}`) is not in /metrics");
            rest = &rest[i + name.len()..];
        }
    }
}
