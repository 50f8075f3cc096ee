//! Reliability and security with the real binary: every bad input gets its documented
//! status and JSON error and the node serves on at normal speed; overload answers only 200
//! or 429 and gives every slot back; clients that vanish hold nothing; damaged files are
//! refused by name while the rest serves; keys, CORS and connection limits hold.

mod common;

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Sends raw bytes with a content type; returns (status, JSON body, retry-after present).
fn raw(d: &Daemon, method: &str, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let c = client();
    let req = match method {
        "GET" => c.get(d.url(path)),
        _ => c.post(d.url(path)).header("content-type", content_type).body(body),
    };
    let r = req.send().expect("request");
    let status = r.status().as_u16();
    let text = r.text().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn rss(d: &Daemon) -> f64 {
    let text = client().get(d.url("/metrics")).send().unwrap().text().unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    scrape
        .samples
        .iter()
        .find(|s| s.metric == "edgenode_process_resident_memory_bytes")
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .unwrap_or(0.0)
}

fn gauge(d: &Daemon, name: &str, model: &str) -> f64 {
    let text = client().get(d.url("/metrics")).send().unwrap().text().unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && s.labels.get("model") == Some(model))
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .unwrap_or(0.0)
}

fn embed_ms(d: &Daemon) -> f64 {
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let (s, _) = post_json(d, "/embed", &json!({"inputs": "a normal sentence about the weather"}));
            assert_eq!(s, 200);
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    times[2]
}

#[test]
fn every_bad_input_gets_its_documented_status_and_the_node_serves_on() {
    let d = Daemon::start_default();
    d.wait_ready(Duration::from_secs(180));
    let before_ms = embed_ms(&d);
    let j = |v: Value| serde_json::to_vec(&v).unwrap();
    let nested = format!("{{\"input\": {}\"x\"{}}}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes();
    let nested_any =
        format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}], \"stop\": {}\"x\"{}}}", "[".repeat(10_000), "]".repeat(10_000))
            .into_bytes();
    type Row<'a> = (&'a str, &'a str, &'a str, &'a str, Vec<u8>, u16, &'a str);
    let rows: Vec<Row> = vec![
        // (what, method, path, content type, body, status, code)
        ("malformed JSON", "POST", "/v1/embeddings", "application/json", b"{\"input\": ".to_vec(), 400, "invalid_json"),
        ("invalid UTF-8", "POST", "/v1/embeddings", "application/json", b"{\"input\": \"\xff\xfe\"}".to_vec(), 400, "invalid_json"),
        ("empty body", "POST", "/v1/embeddings", "application/json", vec![], 400, "invalid_json"),
        ("deeply nested JSON where strings belong", "POST", "/v1/embeddings", "application/json", nested, 400, "invalid_json"),
        ("deeply nested JSON where any JSON goes", "POST", "/v1/chat/completions", "application/json", nested_any, 400, "invalid_json"),
        ("token ids where text belongs", "POST", "/v1/embeddings", "application/json", j(json!({"input": [1, 2]})), 400, "invalid_field"),
        ("input: []", "POST", "/v1/embeddings", "application/json", j(json!({"input": []})), 400, "empty_input"),
        ("an empty string", "POST", "/v1/embeddings", "application/json", j(json!({"input": ""})), 400, "empty_input"),
        ("missing field", "POST", "/v1/embeddings", "application/json", j(json!({})), 400, "missing_field"),
        ("an unknown field", "POST", "/v1/embeddings", "application/json", j(json!({"text": "hi"})), 400, "invalid_field"),
        ("10,000 inputs", "POST", "/v1/embeddings", "application/json", j(json!({"input": vec!["x"; 10_000]})), 413, "too_many_inputs"),
        (
            "1,000,000 characters with truncate",
            "POST",
            "/v1/embeddings",
            "application/json",
            j(json!({"input": "a".repeat(1_000_000), "truncate": true})),
            413,
            "input_too_many_chars",
        ),
        (
            "over the token limit without truncate",
            "POST",
            "/v1/embeddings",
            "application/json",
            j(json!({"input": "word ".repeat(1000), "truncate": false})),
            422,
            "input_too_long",
        ),
        ("negative max_tokens", "POST", "/generate", "application/json", j(json!({"prompt": "hi", "max_tokens": -5})), 400, "invalid_field"),
        (
            "huge max_tokens",
            "POST",
            "/generate",
            "application/json",
            j(json!({"prompt": "hi", "max_tokens": 1_000_000_000_000i64})),
            400,
            "max_tokens_too_large",
        ),
        (
            "a string temperature",
            "POST",
            "/v1/chat/completions",
            "application/json",
            j(json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"})),
            400,
            "invalid_field",
        ),
        (
            "an unknown role",
            "POST",
            "/v1/chat/completions",
            "application/json",
            j(json!({"messages": [{"role": "wizard", "content": "hi"}]})),
            400,
            "invalid_field",
        ),
        ("no messages", "POST", "/v1/chat/completions", "application/json", j(json!({"messages": []})), 400, "empty_input"),
        ("unknown model", "POST", "/v1/embeddings", "application/json", j(json!({"input": "hi", "model": "gpt-17"})), 404, "model_not_found"),
        ("wrong content type", "POST", "/v1/embeddings", "text/plain", b"input=hi".to_vec(), 415, "unsupported_media_type"),
        ("unknown route", "POST", "/v2/embed", "application/json", j(json!({})), 404, "not_found"),
        ("wrong method", "GET", "/v1/embeddings", "", vec![], 405, "method_not_allowed"),
    ];
    for (what, method, path, ct, body, status, code) in rows {
        let (s, b) = raw(&d, method, path, ct, body);
        assert_eq!(s, status, "{what}: {b}");
        assert_eq!(b["error"]["code"], code, "{what}: {b}");
        assert!(b["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {b}");
    }
    // TEI's routes, the same mistakes, in TEI's shape and statuses.
    let tei_rows: Vec<Row> = vec![
        ("malformed JSON", "POST", "/embed", "application/json", b"{\"inputs\": ".to_vec(), 400, "Validation"),
        ("inputs: []", "POST", "/embed", "application/json", j(json!({"inputs": []})), 400, "Empty"),
        ("missing field", "POST", "/embed", "application/json", j(json!({})), 422, "Validation"),
        ("10,000 inputs", "POST", "/embed", "application/json", j(json!({"inputs": vec!["x"; 10_000]})), 422, "Validation"),
        (
            "over the token limit",
            "POST",
            "/embed",
            "application/json",
            j(json!({"inputs": "word ".repeat(1000), "truncate": false})),
            422,
            "Validation",
        ),
        ("wrong content type", "POST", "/embed", "text/plain", b"inputs=hi".to_vec(), 415, "Validation"),
        ("wrong method", "GET", "/embed", "", vec![], 405, "Validation"),
    ];
    for (what, method, path, ct, body, status, kind) in tei_rows {
        let (s, b) = raw(&d, method, path, ct, body);
        assert_eq!((s, b["error_type"].as_str()), (status, Some(kind)), "{what}: {b}");
    }
    // NUL bytes are text like any other: embedded, not refused.
    let (s, b) = post_json(&d, "/embed", &json!({"inputs": "before\u{0000}after"}));
    assert_eq!(s, 200, "{b}");

    // A 100 MB string is refused by size without being kept: the process does not grow by it.
    let rss_before = rss(&d);
    let mut huge = b"{\"input\": \"".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 100 * 1024 * 1024));
    huge.extend(b"\"}");
    let (s, b) = raw(&d, "POST", "/v1/embeddings", "application/json", huge);
    assert_eq!((s, b["error"]["code"].as_str()), (413, Some("body_too_large")), "{b}");
    let grew = rss(&d) - rss_before;
    assert!(grew < 32.0 * 1024.0 * 1024.0, "RSS grew by {:.0} MiB", grew / 1048576.0);

    // And the node serves a normal request at normal speed.
    let after_ms = embed_ms(&d);
    assert!(after_ms < (before_ms * 5.0).max(before_ms + 50.0), "before {before_ms:.1} ms, after {after_ms:.1} ms");
    let (s, _) = post_json(&d, "/generate", &json!({"prompt": "Hello", "max_tokens": 2}));
    assert_eq!(s, 200);
}

#[test]
fn overload_answers_only_200_or_429_and_gives_every_slot_back() {
    let config = "[[models]]\nname = \"minilm\"\nkind = \"embed\"\nmax_concurrent_inputs = 4\n\n\
                  [[models]]\nname = \"smollm2\"\nkind = \"generate\"\nmax_concurrent_sequences = 2\nmax_waiting = 2\n";
    let d = Arc::new(Daemon::start(Options { config: Some(config.into()), ..Default::default() }));
    d.wait_ready(Duration::from_secs(180));
    // 4x the admission limits: 16 embed clients for 4 inputs in flight, 16 generate clients
    // for 2 sequences + 2 waiting.
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(std::collections::BTreeMap::<String, u64>::new()));
    let missing_retry_after = Arc::new(AtomicU64::new(0));
    let peak_rss = Arc::new(Mutex::new(0f64));
    let mut threads = Vec::new();
    for i in 0..32 {
        let (d, stop, statuses, missing) = (d.clone(), stop.clone(), statuses.clone(), missing_retry_after.clone());
        threads.push(std::thread::spawn(move || {
            let c = reqwest::blocking::Client::builder().timeout(Duration::from_secs(90)).build().unwrap();
            while !stop.load(Ordering::Relaxed) {
                let r = if i % 2 == 0 {
                    c.post(d.url("/embed")).json(&json!({"inputs": format!("client {i} sends a sentence")})).send()
                } else {
                    c.post(d.url("/generate")).json(&json!({"prompt": "Say something.", "max_tokens": 8})).send()
                };
                let key = match r {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        if s == 429 && r.headers().get("retry-after").is_none() {
                            missing.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = r.bytes();
                        s.to_string()
                    }
                    Err(e) => format!("client error: {e}"),
                };
                *statuses.lock().unwrap().entry(key).or_default() += 1;
            }
        }));
    }
    let (d2, stop2, peak2) = (d.clone(), stop.clone(), peak_rss.clone());
    let sampler = std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            let r = rss(&d2);
            let mut p = peak2.lock().unwrap();
            *p = p.max(r);
            drop(p);
            std::thread::sleep(Duration::from_millis(250));
        }
    });
    std::thread::sleep(Duration::from_secs(20));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    sampler.join().unwrap();
    let statuses = statuses.lock().unwrap().clone();
    let peak = *peak_rss.lock().unwrap();
    eprintln!("overload: {statuses:?}, peak RSS {:.0} MiB", peak / 1048576.0);
    assert!(statuses.keys().all(|k| k == "200" || k == "429"), "only 200 and 429: {statuses:?}");
    assert!(statuses.get("429").copied().unwrap_or(0) > 0, "it was overloaded: {statuses:?}");
    assert!(statuses.get("200").copied().unwrap_or(0) > 100, "and it served: {statuses:?}");
    assert_eq!(missing_retry_after.load(Ordering::Relaxed), 0, "every 429 has Retry-After");
    assert!(peak < 2.0 * 1024.0 * 1024.0 * 1024.0, "RSS bounded: {:.0} MiB", peak / 1048576.0);
    // Every slot is back.
    std::thread::sleep(Duration::from_millis(200));
    for model in ["minilm", "smollm2"] {
        assert_eq!(gauge(&d, "edgenode_in_flight", model), 0.0, "{model}");
    }
    assert_eq!(gauge(&d, "edgenode_queue_depth", "smollm2"), 0.0);
}

/// Writes a whole HTTP request on a fresh connection and closes it at once.
fn send_and_vanish(addr: &str, path: &str, body: &Value) {
    let body = body.to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    let req = format!("POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Both);
}

#[test]
fn clients_that_disconnect_right_after_sending_hold_no_slot() {
    let config = "[[models]]\nname = \"minilm\"\nkind = \"embed\"\nmax_concurrent_inputs = 1\n\n\
                  [[models]]\nname = \"smollm2\"\nkind = \"generate\"\nmax_concurrent_sequences = 1\nmax_waiting = 0\n";
    let d = Daemon::start(Options { config: Some(config.into()), ..Default::default() });
    d.wait_ready(Duration::from_secs(180));
    for i in 0..50 {
        send_and_vanish(&d.addr, "/embed", &json!({"inputs": format!("gone {i}")}));
        let chat = json!({"messages": [{"role": "user", "content": "Write a long story."}], "stream": true, "max_tokens": 200, "ignore_eos": true});
        send_and_vanish(&d.addr, "/v1/chat/completions", &chat);
    }
    // At limit 1, a request is admitted afterwards: nothing leaked a slot.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ok = (false, false);
    while !(ok.0 && ok.1) {
        assert!(Instant::now() < deadline, "a slot stayed held: embed ok {}, generate ok {}", ok.0, ok.1);
        if !ok.0 {
            ok.0 = post_json(&d, "/embed", &json!({"inputs": "still here"})).0 == 200;
        }
        if !ok.1 {
            ok.1 = post_json(&d, "/generate", &json!({"prompt": "Hi", "max_tokens": 2})).0 == 200;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(gauge(&d, "edgenode_in_flight", "minilm"), 0.0);
    assert_eq!(gauge(&d, "edgenode_in_flight", "smollm2"), 0.0);
}

#[test]
fn damaged_files_are_refused_by_name_while_the_rest_serves() {
    ensure_models();
    // A truncated weights file.
    let store = tempfile::tempdir().unwrap();
    copy_dir(&models_dir().join("minilm"), &store.path().join("minilm"));
    copy_dir(&models_dir().join("smollm2"), &store.path().join("smollm2"));
    let weights = store.path().join("minilm/model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&weights).unwrap().set_len(len / 2).unwrap();
    let config = |store: &std::path::Path| {
        format!(
            "[store]\ndir = {:?}\nfetch_missing = false\n[[models]]\nname = \"minilm\"\nkind = \"embed\"\n[[models]]\nname = \"smollm2\"\nkind = \"generate\"\n",
            store.display().to_string()
        )
    };
    let wait_failed = |d: &Daemon| -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (code, body) = get_json(d, "/readyz");
            if body["models"]["smollm2"]["stage"] == "ready" && body["models"]["minilm"]["stage"] == "failed" {
                assert_eq!(code, 503);
                return body;
            }
            assert!(Instant::now() < deadline, "{body}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let d = Daemon::start(Options { config: Some(config(store.path())), ..Default::default() });
    let body = wait_failed(&d);
    let err = body["models"]["minilm"]["error"].as_str().unwrap();
    assert!(err.contains("model.safetensors") && err.contains("53aa51172d142c89"), "names the file and its digest: {err}");
    assert_eq!(post_json(&d, "/generate", &json!({"prompt": "Hi", "max_tokens": 2})).0, 200, "the other model serves");
    let (s, b) = post_json(&d, "/v1/embeddings", &json!({"input": "hi"}));
    assert_error(s, &b, 503, "not_ready");
    let (s, b) = post_json(&d, "/embed", &json!({"inputs": "hi"}));
    assert_tei_error(s, &b, 503, "Unhealthy");
    drop(d);

    // A missing tokenizer.json.
    let store2 = tempfile::tempdir().unwrap();
    copy_dir(&models_dir().join("minilm"), &store2.path().join("minilm"));
    copy_dir(&models_dir().join("smollm2"), &store2.path().join("smollm2"));
    let tokenizer = store2.path().join("minilm/tokenizer.json");
    std::fs::remove_file(&tokenizer).unwrap();
    let d = Daemon::start(Options { config: Some(config(store2.path())), ..Default::default() });
    let body = wait_failed(&d);
    let err = body["models"]["minilm"]["error"].as_str().unwrap();
    assert!(err.contains(&tokenizer.display().to_string()), "names the path: {err}");
}

#[test]
fn api_keys_cors_and_probes() {
    let key = "sk-edge-test-7f3a9c21d4";
    let config = "[server]\ncors_origins = [\"https://app.example.com\"]\n\n\
                  [auth]\napi_keys_env = \"EDGE_TEST_KEYS\"\n\n[[models]]\nname = \"minilm\"\nkind = \"embed\"\n";
    let d = Daemon::start(Options {
        config: Some(config.into()),
        env: vec![("EDGE_TEST_KEYS".into(), format!("other-key-123456789,{key}"))],
        ..Default::default()
    });
    d.wait_ready(Duration::from_secs(120));
    let c = client();
    let body = json!({"inputs": "secret"});
    let r = c.post(d.url("/v1/embeddings")).json(&json!({"input": "secret"})).send().unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let b: Value = r.json().unwrap();
    assert_eq!(b["error"]["code"], "invalid_api_key");
    let r = c.post(d.url("/embed")).json(&body).send().unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer", "TEI's shape keeps the headers");
    let r = c.post(d.url("/embed")).bearer_auth("sk-edge-test-7f3a9c21d5").json(&body).send().unwrap();
    assert_eq!(r.status(), 401, "a wrong key");
    let r = c.post(d.url("/embed")).bearer_auth(key).json(&body).send().unwrap();
    assert_eq!(r.status(), 200, "the right key");
    // Probes stay open for the platform; everything else needs the key.
    for path in ["/livez", "/readyz", "/metrics"] {
        assert_eq!(c.get(d.url(path)).send().unwrap().status(), 200, "{path}");
    }
    for path in ["/info", "/stats", "/v1/models"] {
        assert_eq!(c.get(d.url(path)).send().unwrap().status(), 401, "{path}");
    }
    let info: Value = c.get(d.url("/info")).bearer_auth(key).send().unwrap().json().unwrap();
    assert_eq!(info["auth"]["enabled"], true);
    assert_eq!(info["auth"]["keys"], json!(["…6789", "…21d4"]), "redacted: {info}");
    assert!(!info.to_string().contains(key));
    assert!(!d.log_text().contains(key), "the key never reaches the logs");
    // CORS: a browser preflight from the allowed origin.
    let r = c
        .request(reqwest::Method::OPTIONS, d.url("/embed"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization,content-type")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], "https://app.example.com");
    let r = c.post(d.url("/embed")).header("origin", "https://evil.example").bearer_auth(key).json(&body).send().unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none(), "other origins get no CORS grant");
}

#[test]
fn token_and_connection_limits_have_their_own_errors() {
    let config = "[limits]\nmax_request_tokens = 50\nmax_connections = 3\n\n[[models]]\nname = \"minilm\"\nkind = \"embed\"\n";
    let d = Daemon::start(Options { config: Some(config.into()), ..Default::default() });
    d.wait_ready(Duration::from_secs(120));
    let (s, b) = post_json(&d, "/v1/embeddings", &json!({"input": vec!["ten words in this sentence make it long enough now"; 5]}));
    assert_error(s, &b, 413, "request_too_many_tokens");
    assert!(b["error"]["message"].as_str().unwrap().contains("limit is 50"), "{b}");
    let (s, b) = post_json(&d, "/embed", &json!({"inputs": vec!["ten words in this sentence make it long enough now"; 5]}));
    assert!(assert_tei_error(s, &b, 422, "Validation").contains("limit is 50"), "{b}");

    // Three idle connections fill the limit; the fourth is told why and closed. (First let
    // the connections of the requests above finish closing: each client closes its own
    // in the background.)
    std::thread::sleep(Duration::from_secs(1));
    let held: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(&d.addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut fourth = TcpStream::connect(&d.addr).unwrap();
    fourth.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = String::new();
    let _ = fourth.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_lowercase().contains("retry-after: 1") && answer.contains("too_many_connections"), "{answer}");
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let (s, _) = post_json(&d, "/embed", &json!({"inputs": "a slot is free again"}));
    assert_eq!(s, 200);
}

/// `[debug] fault_injection` kills the generator's engine thread mid-stream, outside its
/// caught step, as a bug in the sampler would: the stream ends with an error event, the
/// model is `restarting` (`/readyz` 503) until the supervisor has reloaded and warmed it,
/// and then it serves again.
#[test]
fn a_generator_whose_engine_thread_dies_is_restarted_and_readyz_says_so() {
    let config = "[debug]\nfault_injection = true\n\n[[models]]\nname = \"smollm2\"\nkind = \"generate\"\n";
    let d = Daemon::start(Options { config: Some(config.into()), ..Default::default() });
    d.wait_ready(Duration::from_secs(180));

    let body = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Count to a thousand."}],
                      "max_tokens": 400, "ignore_eos": true, "stream": true});
    let r = client().post(d.url("/v1/chat/completions")).json(&body).send().unwrap();
    assert_eq!(r.status(), 200);
    let mut lines = std::io::BufReader::new(r).lines();
    let mut payloads = Vec::new();
    while payloads.len() < 3 {
        let line = lines.next().expect("the stream is running").unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            payloads.push(data.to_string());
        }
    }
    let (s, answer) = post_json(&d, "/debug/fault", &json!({"model": "smollm2"}));
    assert_eq!(s, 202, "{answer}");
    let rest: Vec<String> = lines.map_while(Result::ok).filter_map(|l| l.strip_prefix("data: ").map(str::to_string)).collect();
    let error = rest.iter().find_map(|p| serde_json::from_str::<Value>(p).ok().filter(|v| v["error"].is_object()));
    let error = error.unwrap_or_else(|| panic!("the stream ends with an error event: {rest:?}"));
    assert_eq!(error["error"]["code"], "internal_error", "{error}");

    let (s, ready) = get_json(&d, "/readyz");
    assert_eq!(s, 503, "{ready}");
    assert_eq!(ready["models"]["smollm2"]["stage"], "restarting", "{ready}");
    d.wait_ready(Duration::from_secs(120));
    let chat = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    let (s, answer) = post_json(&d, "/v1/chat/completions", &chat);
    assert_eq!(s, 200, "{answer}");
    assert!(d.log_text().contains("model worker died; restarting it"));

    // Without the switch the route does not exist.
    let plain = Daemon::start(Options { config: Some("[[models]]\nname = \"minilm\"\nkind = \"embed\"\n".into()), ..Default::default() });
    let (s, body) = post_json(&plain, "/debug/fault", &json!({"model": "smollm2"}));
    assert_error(s, &body, 404, "not_found");
}
