//! Lifecycle with the real binary and real signals: readiness follows the measured boot
//! stages, a request sent during warm-up is answered once ready, model sync reports drift
//! against a central manifest (file and URL, reachable or not), and SIGTERM drains.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const MINILM_ONLY: &str = "[[models]]\nname = \"minilm\"\nkind = \"embed\"\n";

/// The repository's manifest cut to its first entry (minilm): a central manifest for
/// nodes that serve only minilm.
fn minilm_manifest() -> String {
    let text = std::fs::read_to_string(root().join("models/manifest.toml")).unwrap();
    let first = text.find("[[models]]").unwrap();
    let second = text[first + 1..].find("[[models]]").map(|i| i + first + 1).unwrap_or(text.len());
    text[..second].to_string()
}

/// The repository's manifest with one minilm file digest changed: what the central
/// manifest looks like after someone shipped a new minilm and forgot this node.
fn manifest_with_new_minilm() -> String {
    let text = minilm_manifest();
    let old = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db";
    assert!(text.contains(old), "the test knows minilm's model.safetensors digest");
    text.replace(old, &"ab".repeat(32)).replacen("version = \"0.1.0\"", "version = \"0.2.0\"", 1)
}

fn temp_file(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

/// `name{labels} value` of one sample of /metrics, parsed with a Prometheus parser.
fn metric(d: &Daemon, name: &str, label: (&str, &str)) -> Option<f64> {
    let text = client().get(d.url("/metrics")).send().unwrap().text().unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    scrape.samples.iter().find(|s| s.metric == name && s.labels.get(label.0) == Some(label.1)).map(|s| match s.value {
        prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
        _ => f64::NAN,
    })
}

#[test]
fn a_request_sent_during_warm_up_is_answered_after_ready() {
    let d = Daemon::start_default();
    let (code, body) = get_json(&d, "/readyz");
    assert_eq!(code, 503, "models are still booting: {body}");
    // Sent before the models are warm: it waits for readiness instead of failing.
    let (status, vectors) = post_json(&d, "/embed", &json!({"inputs": "sent while warming up"}));
    assert_eq!(status, 200, "{vectors}");
    assert_eq!(vectors[0].as_array().unwrap().len(), 384);
    d.wait_ready(Duration::from_secs(180));
    let (_, info) = get_json(&d, "/info");
    for m in info["models"].as_array().unwrap() {
        let stages = &m["stage_seconds"];
        assert!(stages["warming_up"].as_f64().is_some(), "each model reports its warm-up: {info}");
        if m["name"] != "router" {
            for s in ["verifying", "loading"] {
                assert!(stages[s].as_f64().is_some(), "{s} of {}: {info}", m["name"]);
            }
        }
    }
    // The start-up log says the same, one line per model.
    let log = d.log_text();
    assert!(log.contains("\"message\":\"ready\"") && log.contains("warming_up="), "{log}");
}

#[test]
fn a_request_that_outwaits_ready_wait_gets_503_with_retry_after() {
    let d = Daemon::start(Options { config: Some(format!("{MINILM_ONLY}\n[server]\nready_wait_s = 0\n")), ..Default::default() });
    let r = client().post(d.url("/v1/embeddings")).json(&json!({"input": "too early"})).send().unwrap();
    if r.status() == 503 {
        assert!(r.headers().get("retry-after").is_some());
        let body: Value = r.json().unwrap();
        assert_eq!(body["error"]["code"], "not_ready", "{body}");
    } else {
        // The model beat the request to ready (a very fast machine): it must then be a real answer.
        assert_eq!(r.status(), 200);
    }
}

#[test]
fn drift_against_a_central_manifest_file_is_reported_and_can_fail_readiness() {
    let expected = temp_file(&manifest_with_new_minilm());
    let config = format!(
        "[sync]\nexpected_manifest = {:?}\ninterval_s = 1\nfail_ready_on_drift = true\n\n{MINILM_ONLY}",
        expected.path().display().to_string()
    );
    let d = Daemon::start(Options { config: Some(config), ..Default::default() });
    // Ready in every other respect, but drifted: the platform should route around it.
    let deadline = Instant::now() + Duration::from_secs(120);
    let body = loop {
        let (code, body) = get_json(&d, "/readyz");
        if body["models"]["minilm"]["stage"] == "ready" && body["sync"].is_object() {
            assert_eq!(code, 503, "{body}");
            break body;
        }
        assert!(Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(body["status"], "drift", "{body}");
    assert_eq!(body["sync"]["models"]["minilm"], "stale");

    let (_, info) = get_json(&d, "/info");
    let minilm = &info["sync"]["models"]["minilm"];
    assert_eq!(minilm["status"], "stale", "{info}");
    assert_eq!(minilm["expected"]["version"], "0.2.0");
    assert_eq!(minilm["local"]["version"], "0.1.0");
    assert_eq!(info["sync"]["reachable"], true);
    let (_, models) = get_json(&d, "/v1/models");
    assert_eq!(models["data"][0]["sync"], "stale", "{models}");
    assert_eq!(metric(&d, "edgenode_model_in_sync", ("model", "minilm")), Some(0.0));
    assert_eq!(metric(&d, "edgenode_sync_manifest_reachable", ("", "")).or(Some(1.0)), Some(1.0));
    assert!(d.log_text().contains("model drift against the expected manifest"));

    // Serving goes on: drift is a report, not an outage.
    let (status, _) = post_json(&d, "/embed", &json!({"inputs": "still serving"}));
    assert_eq!(status, 200);

    // The central manifest catches up (someone reverts it): the next check says in_sync.
    std::fs::write(expected.path(), minilm_manifest()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = get_json(&d, "/readyz");
        if code == 200 {
            assert_eq!(body["sync"]["models"]["minilm"], "in_sync", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(metric(&d, "edgenode_model_in_sync", ("model", "minilm")), Some(1.0));
}

/// Serves one file over HTTP on an ephemeral port for as long as the test runs.
fn serve_file(text: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let head = format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", text.len());
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(text.as_bytes());
        }
    });
    format!("http://{addr}/manifest.toml")
}

#[test]
fn a_central_manifest_url_in_sync_and_an_unreachable_one_never_block_readiness() {
    let url = serve_file(std::fs::read_to_string(root().join("models/manifest.toml")).unwrap());
    let config = format!("[sync]\nexpected_manifest = {url:?}\n\n{MINILM_ONLY}");
    let d = Daemon::start(Options { config: Some(config), ..Default::default() });
    d.wait_ready(Duration::from_secs(120));
    let (_, info) = get_json(&d, "/info");
    assert_eq!(info["sync"]["models"]["minilm"]["status"], "in_sync", "{info}");
    // The central manifest also lists smollm2, which this node does not serve.
    assert_eq!(info["sync"]["models"]["smollm2"]["status"], "missing", "{info}");
    drop(d);

    // Nothing listens on port 9 of localhost: unreachable, reported as such, never as drift.
    let config =
        format!("[sync]\nexpected_manifest = \"http://127.0.0.1:9/manifest.toml\"\ntimeout_s = 2\nfail_ready_on_drift = true\n\n{MINILM_ONLY}");
    let d = Daemon::start(Options { config: Some(config), ..Default::default() });
    d.wait_ready(Duration::from_secs(120));
    let deadline = Instant::now() + Duration::from_secs(30);
    let info = loop {
        let (_, info) = get_json(&d, "/info");
        if info["sync"]["checked_at"].is_u64() {
            break info;
        }
        assert!(Instant::now() < deadline, "{info}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(info["sync"]["reachable"], false, "{info}");
    assert!(info["sync"]["error"].as_str().unwrap().contains("127.0.0.1:9"), "{info}");
    assert_eq!(info["sync"]["models"], json!({}), "no comparison, so no drift: {info}");
    let (code, body) = get_json(&d, "/readyz");
    assert_eq!(code, 200, "an unreachable manifest never fails readiness: {body}");
    assert!(d.log_text().contains("expected manifest unreachable"));
}

#[test]
fn models_verify_against_exits_1_on_drift_and_2_when_unreachable() {
    ensure_models();
    let run = |against: &str| {
        let out = Command::new(binary())
            .current_dir(root())
            .env_remove("EDGENODE_CONFIG")
            .args(["models", "verify", "--against", against])
            .output()
            .unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let same = temp_file(&std::fs::read_to_string(root().join("models/manifest.toml")).unwrap());
    let (code, out) = run(&same.path().display().to_string());
    assert_eq!(code, 0, "{out}");
    assert!(out.lines().any(|l| l.starts_with("in_sync") && l.contains("minilm")), "{out}");

    let drifted = temp_file(&manifest_with_new_minilm());
    let (code, out) = run(&drifted.path().display().to_string());
    assert_eq!(code, 1, "{out}");
    assert!(out.lines().any(|l| l.starts_with("stale") && l.contains("minilm") && l.contains("0.2.0")), "{out}");

    let (code, out) = run("http://127.0.0.1:9/manifest.toml");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("cannot compare"), "{out}");
}

#[test]
fn sigterm_drains_a_running_stream_then_exits_0() {
    let config = "[server]\ndrain_grace_s = 20\n\n[[models]]\nname = \"smollm2\"\nkind = \"generate\"\n";
    let mut d = Daemon::start(Options { config: Some(config.into()), ..Default::default() });
    d.wait_ready(Duration::from_secs(180));
    let body = json!({
        "model": "smollm2", "stream": true, "max_tokens": 48, "ignore_eos": true, "temperature": 0,
        "messages": [{"role": "user", "content": "Count from one to a hundred."}],
    });
    let response = client().post(d.url("/v1/chat/completions")).json(&body).send().unwrap();
    assert_eq!(response.status(), 200);
    let mut lines = BufReader::new(response).lines();
    // Wait for the first token, then ask the process to stop.
    let first = lines.by_ref().map_while(Result::ok).find(|l| l.starts_with("data: ")).unwrap();
    assert!(first.contains("chat.completion.chunk"));
    let signalled = Instant::now();
    d.signal("TERM");

    // New connections are refused while the stream finishes.
    std::thread::sleep(Duration::from_millis(300));
    let refused = std::net::TcpStream::connect_timeout(&d.addr.parse().unwrap(), Duration::from_secs(2)).is_err();
    assert!(refused, "the listener must close on SIGTERM");

    let rest: Vec<String> = lines.map_while(Result::ok).filter(|l| l.starts_with("data: ")).collect();
    assert_eq!(rest.last().map(String::as_str), Some("data: [DONE]"), "the stream completes: {rest:?}");
    let finish = rest
        .iter()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(&l[6..]).ok())
        .find_map(|v| v["choices"][0]["finish_reason"].as_str().map(String::from));
    assert_eq!(finish.as_deref(), Some("length"), "all 48 tokens arrived: {rest:?}");

    let deadline = signalled + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit within the grace period");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "logs:\n{}", d.log_text());
    let log = d.log_text();
    assert!(log.contains("draining") && log.contains("drained; exiting"), "{log}");
}

#[test]
fn a_second_signal_exits_at_once() {
    let config = "[server]\ndrain_grace_s = 60\n\n[[models]]\nname = \"smollm2\"\nkind = \"generate\"\n";
    let mut d = Daemon::start(Options { config: Some(config.into()), ..Default::default() });
    d.wait_ready(Duration::from_secs(180));
    let body = json!({"prompt": "Write a long story.", "stream": true, "max_tokens": 2000, "ignore_eos": true});
    let response = client().post(d.url("/generate")).json(&body).send().unwrap();
    let mut lines = BufReader::new(response).lines();
    lines.by_ref().map_while(Result::ok).find(|l| l.starts_with("data: ")).unwrap();
    d.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !d.log_text().contains("draining") {
        assert!(Instant::now() < deadline, "{}", d.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = Instant::now();
    d.signal("INT");
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(second.elapsed() < Duration::from_secs(5), "a second signal must exit at once");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(d.log_text().contains("second signal"), "{}", d.log_text());
    assert_eq!(status.code(), Some(0));
}
