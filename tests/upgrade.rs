//! Nodes that keep themselves current (`sync.apply`), through the real daemon.
//!
//! The versions are shape-faithful stand-ins with other seeds: a bge-small-shaped embedder
//! and a TinyLlama-shaped Q4_K_M chat model, version 1 (seed 1) in the node's own manifest,
//! version 2 (seed 2) in the central one. While clients embed and stream chats, the central
//! manifest moves: no request fails, every answer names the version that computed it, and
//! each embedding under a label is that version's vector. Then the failure paths: a probe
//! that fails and a download that fails keep the serving version and say why, the retry
//! succeeds once the source is fixed; pinned requests get 409 after a switch (after
//! `keep_previous_s`); a restart boots the new version from disk; a manifest that moves
//! back switches without downloading.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::hub::HubServer;
use common::*;
use serde_json::{json, Value};

const SENTENCE: &str = "What is an edge node?";

fn bge(seed: &str) -> PathBuf {
    ensure_models();
    let tokenizer = models_dir().join("minilm/tokenizer.json").display().to_string();
    let mut args = vec!["--tokenizer", tokenizer.as_str(), "--pooling-format", "legacy", "--shape", "small", "--layers", "2", "--prompts"];
    if seed != "1" {
        args.extend(["--seed", seed]);
    }
    standin("bge", &args)
}

fn tiny(seed: &str) -> PathBuf {
    if seed == "1" {
        return tinyllama_standin("q4_k_m").parent().unwrap().to_path_buf();
    }
    let vocab = fixture("vocab/ggml-vocab-llama-spm.gguf").display().to_string();
    standin("tinyllama", &["--vocab", &vocab, "--layers", "2", "--types", "q4_k_m", "--seed", seed])
}

/// `edgenode models pin NAME --kind KIND --version VERSION (--dir DIR | --hf REPO)`.
fn pin(name: &str, kind: &str, version: &str, from: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(binary());
    cmd.args(["models", "pin", name, "--kind", kind, "--version", version]).args(from).current_dir(root()).env_remove("EDGENODE_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run edgenode models pin");
    assert!(out.status.success(), "models pin failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn pin_dir(name: &str, kind: &str, version: &str, dir: &Path) -> String {
    pin(name, kind, version, &["--dir", &dir.display().to_string()], &[])
}

/// A node's scratch folder: its store, its own manifest, the central manifest it follows.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(local_manifest: &str) -> Setup {
        let s = Setup { dir: tempfile::tempdir().unwrap() };
        std::fs::write(s.path("manifest.toml"), local_manifest).unwrap();
        std::fs::write(s.path("central.toml"), local_manifest).unwrap();
        s
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn publish(&self, central: &str) {
        let tmp = self.path("central.toml.partial");
        std::fs::write(&tmp, central).unwrap();
        std::fs::rename(tmp, self.path("central.toml")).unwrap();
    }

    fn config(&self, sync: &str, models: &[(&str, &str)]) -> String {
        let mut text = format!(
            "[store]\ndir = {:?}\nmanifest = {:?}\n\n[sync]\nexpected_manifest = {:?}\ninterval_s = 1\napply = true\n{sync}\n",
            self.path("store").display().to_string(),
            self.path("manifest.toml").display().to_string(),
            self.path("central.toml").display().to_string()
        );
        for (name, kind) in models {
            text += &format!("\n[[models]]\nname = {name:?}\nkind = {kind:?}\n");
        }
        text
    }
}

fn info_model(d: &Daemon, name: &str) -> Value {
    let (_, info) = get_json(d, "/info");
    info["models"].as_array().unwrap().iter().find(|m| m["name"] == name).cloned().unwrap_or(Value::Null)
}

fn apply_state(d: &Daemon, name: &str) -> Value {
    let (_, info) = get_json(d, "/info");
    info["sync"]["apply"][name].clone()
}

/// Waits until `name` is served at `version` (its `/info` version), failing with the apply
/// state if it is not within `timeout`.
fn wait_for_version(d: &Daemon, name: &str, version: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while info_model(d, name)["version"] != version {
        assert!(Instant::now() < deadline, "{name} never reached version {version}: {}\n{}", apply_state(d, name), d.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_for_state(d: &Daemon, name: &str, state: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = apply_state(d, name);
        if s["state"] == state {
            return s;
        }
        assert!(Instant::now() < deadline, "{name}'s apply state never became {state}: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn embed(d: &Daemon, model: &str) -> (u16, String, Value) {
    let r = client().post(d.url("/embed")).json(&json!({"model": model, "inputs": [SENTENCE]})).send().unwrap();
    let status = r.status().as_u16();
    let label = r.headers().get("x-edgenode-model").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    (status, label, r.json().unwrap_or(Value::Null))
}

fn cosine(a: &Value, b: &Value) -> f64 {
    let (a, b): (Vec<f64>, Vec<f64>) =
        (a.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect(), b.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect());
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    dot / (a.iter().map(|x| x * x).sum::<f64>().sqrt() * b.iter().map(|x| x * x).sum::<f64>().sqrt())
}

/// What one client saw: (status, model label, payload) per request, in order.
type Seen = Arc<Mutex<Vec<(u16, String, Value)>>>;

#[test]
fn a_node_switches_versions_under_load_without_dropping_a_request() {
    let local = pin_dir("bge", "embed", "1", &bge("1")) + &pin_dir("tiny", "generate", "1", &tiny("1"));
    let central = pin_dir("bge", "embed", "2", &bge("2")) + &pin_dir("tiny", "generate", "2", &tiny("2"));
    let setup = Setup::new(&local);
    let d = Daemon::start(Options { config: Some(setup.config("", &[("bge", "embed"), ("tiny", "generate")])), ..Default::default() });
    d.wait_ready(Duration::from_secs(300));
    let d = Arc::new(d);

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    let mut seen_by: Vec<(&str, Seen)> = Vec::new();
    for _ in 0..4 {
        let (d, stop, seen): (_, _, Seen) = (d.clone(), stop.clone(), Arc::default());
        seen_by.push(("embed", seen.clone()));
        clients.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let (status, label, body) = embed(&d, "bge");
                seen.lock().unwrap().push((status, label, body.get(0).cloned().unwrap_or(body)));
            }
        }));
    }
    for _ in 0..2 {
        let (d, stop, seen): (_, _, Seen) = (d.clone(), stop.clone(), Arc::default());
        seen_by.push(("chat", seen.clone()));
        clients.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "Tell me about edge nodes."}], "max_tokens": 24, "temperature": 0, "stream": true});
                let r = client().post(d.url("/v1/chat/completions")).json(&body).send().unwrap();
                let status = r.status().as_u16();
                let label = r.headers().get("x-edgenode-model").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
                // sse_events asserts the stream ended with [DONE]: a stream cut by the switch fails here.
                let events = if status == 200 { sse_events(r) } else { vec![] };
                let finish = events.iter().rev().find_map(|e| e["choices"][0]["finish_reason"].as_str().map(str::to_string));
                seen.lock().unwrap().push((status, label, json!(finish)));
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(3));
    let before: usize = seen_by.iter().map(|(_, s)| s.lock().unwrap().len()).sum();
    assert!(before > 0, "no request finished before the switch");
    setup.publish(&central);
    wait_for_version(&d, "bge", "2", Duration::from_secs(240));
    wait_for_version(&d, "tiny", "2", Duration::from_secs(240));
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().expect("a client thread panicked (a stream did not end with [DONE]?)");
    }

    let label_of = |name: &str| info_model(&d, name)["label"].as_str().unwrap().to_string();
    let (bge2, tiny2) = (label_of("bge"), label_of("tiny"));
    assert!(bge2.starts_with("bge@2+") && tiny2.starts_with("tiny@2+"), "{bge2} {tiny2}");
    let mut vectors: std::collections::BTreeMap<String, Value> = Default::default();
    let mut labels_seen = std::collections::BTreeSet::new();
    for (kind, seen) in &seen_by {
        let seen = seen.lock().unwrap();
        let mut on_new = false;
        for (status, label, payload) in seen.iter() {
            assert_eq!(*status, 200, "a {kind} request failed during the switch: {payload}");
            let (old_prefix, new) = if *kind == "embed" { ("bge@1+", &bge2) } else { ("tiny@1+", &tiny2) };
            assert!(label.starts_with(old_prefix) || label == new, "{kind} answered as {label:?}");
            // Requests one client sends one after another: once the new version answered,
            // the old one never does again.
            assert!(!(on_new && label.starts_with(old_prefix)), "{kind}: the old version answered after the new one had");
            on_new |= label == new;
            labels_seen.insert(label.clone());
            if *kind == "embed" {
                // Under one label, one embedding space: every vector for the sentence is that version's.
                let first = vectors.entry(label.clone()).or_insert_with(|| payload.clone());
                assert!(cosine(first, payload) > 0.9999, "two vectors under {label}");
            } else {
                assert!(payload.is_string(), "a stream ended without a finish reason");
            }
        }
        assert!(on_new, "a {kind} client never reached the new version");
    }
    assert_eq!(labels_seen.len(), 4, "both versions of both models answered: {labels_seen:?}");
    let (v1, v2) = (vectors.iter().find(|(k, _)| k.starts_with("bge@1+")).unwrap().1, &vectors[&bge2]);
    assert!(cosine(v1, v2) < 0.99, "the two versions are different models (cosine {})", cosine(v1, v2));

    let s = apply_state(&d, "bge");
    assert_eq!(s["state"], "switched", "{s}");
    assert_eq!(s["target"]["version"], "2");
    let (_, ready) = get_json(&d, "/readyz");
    assert_eq!(ready["status"], "ready", "{ready}");
    let (_, metrics) = (0, client().get(d.url("/metrics")).send().unwrap().text().unwrap());
    assert!(metrics.contains("edgenode_model_switches_total{model=\"bge\"} 1"), "{metrics}");
    // The versions have their own folders; the manifest's own stays.
    let store = setup.path("store");
    let versioned: Vec<String> = std::fs::read_dir(&store)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains('@'))
        .collect();
    assert!(versioned.is_empty(), "dir sources are used in place, not copied: {versioned:?}");
}

/// The failure paths, on one node whose central manifest names Hub versions: a probe that
/// fails, a download that fails (and its retry once fixed), pinned requests, keep_previous_s,
/// a restart, and a manifest that moves back.
#[test]
fn bad_versions_never_serve_and_pinned_requests_never_mix_spaces() {
    let hub = HubServer::start(&[("standins/bge-v2", &bge("2"))], &[], "unused");
    let hub_env = [("HF_ENDPOINT", hub.hub.as_str()), ("HF_HOME", "/nonexistent-hf-home")];
    let local = pin_dir("bge", "embed", "1", &bge("1"));
    let v2 = pin("bge", "embed", "2", &["--hf", "standins/bge-v2"], &hub_env);
    let setup = Setup::new(&local);
    let config = setup.config("keep_previous_s = 4", &[("bge", "embed")]);
    let env: Vec<(String, String)> = hub_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let d = Daemon::start(Options { config: Some(config.clone()), env: env.clone(), ..Default::default() });
    d.wait_ready(Duration::from_secs(120));
    let (status, label1, v1) = embed(&d, "bge");
    assert_eq!(status, 200);
    assert!(label1.starts_with("bge@1+"), "{label1}");
    // A version pin that names what is served is answered; one that does not is refused.
    assert_eq!(embed(&d, "bge@1").0, 200);
    let (status, _, body) = embed(&d, "bge@2");
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains(&label1), "{body}");
    // Nothing to roll back to before a switch.
    let (status, body) = post_json(&d, "/models/bge/rollback", &json!({}));
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "rollback_unavailable", "{body}");
    let (status, body) = post_json(&d, "/models/bge/rollback", &json!({"version": "1"}));
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("version")), "a field it would ignore is refused: {body}");

    // 1. A probe that fails: version 2 must reproduce version 1's vector, which it cannot.
    let probe = format!("\n[models.probe]\ninputs = [{SENTENCE:?}]\nvectors = [{}]\nmin_cosine = 0.99\n", v1[0]);
    setup.publish(&(v2.clone() + &probe));
    let s = wait_for_state(&d, "bge", "failed", Duration::from_secs(120));
    assert!(s["error"].as_str().unwrap().starts_with("probe: "), "{s}");
    assert_eq!(embed(&d, "bge").1, label1, "a version that failed its probe serves");
    assert!(d.log_text().contains("the new version was not applied"));

    // 2. A download that fails (the Hub answers 503 long enough to exhaust a fetch's tries):
    //    still version 1, and the retry succeeds once the Hub answers again.
    hub.control(json!({"reset": true, "fail": 1000, "status": 503}));
    std::fs::remove_dir_all(setup.path("store")).ok();
    setup.publish(&v2);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = apply_state(&d, "bge");
        if s["state"] == "failed" && s["error"].as_str().unwrap_or("").starts_with("fetch: ") {
            break;
        }
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(embed(&d, "bge").1, label1);
    let (_, metrics) = (0, client().get(d.url("/metrics")).send().unwrap().text().unwrap());
    assert!(metrics.contains("edgenode_model_sync_failures_total{model=\"bge\",step=\"fetch\"}"), "{metrics}");
    hub.control(json!({"reset": true}));
    wait_for_version(&d, "bge", "2", Duration::from_secs(120));
    let (status, label2, _) = embed(&d, "bge");
    assert_eq!(status, 200);
    assert_ne!(label2, label1);

    // 3. keep_previous_s: version 1 still answers requests that pin it, for 4 s.
    let (status, label, _) = embed(&d, "bge@1");
    assert_eq!((status, label.as_str()), (200, label1.as_str()), "the previous version answers its pin within keep_previous_s");
    std::thread::sleep(Duration::from_secs(5));
    let (status, _, body) = embed(&d, "bge@1");
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error_type"], "Validation", "{body}");
    assert!(body["error"].as_str().unwrap().contains(&label2), "{body}");
    let digest_prefix = label2.split('+').nth(1).unwrap()[..8].to_string();
    assert_eq!(embed(&d, &format!("bge@{digest_prefix}")).0, 200, "a digest prefix pins too");
    drop(d);

    // 4. A restart boots version 2 from the store, asking the Hub nothing.
    hub.control(json!({"reset": true}));
    let d = Daemon::start(Options { config: Some(config), env, ..Default::default() });
    d.wait_ready(Duration::from_secs(120));
    assert_eq!(embed(&d, "bge").1, label2, "the restart serves the version it switched to");
    assert!(hub.downloads().is_empty(), "a restart downloaded: {:?}", hub.downloads());

    // 5. `edgenode models rollback`: back to version 1 from disk, and held there although
    //    the central manifest still names version 2.
    let out = Command::new(binary()).args(["models", "rollback", "bge", "--url", &d.url("")]).env_remove("EDGENODE_CONFIG").output().unwrap();
    assert!(out.status.success(), "models rollback: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&label1), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(embed(&d, "bge").1, label1);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(embed(&d, "bge").1, label1, "a rollback holds against the central manifest");
    assert_eq!(apply_state(&d, "bge")["state"], "held");

    // 6. The central manifest moves back to version 1 (the hold lifts), then forward to
    //    version 2 again: both switches come from disk, without a download.
    setup.publish(&local);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(embed(&d, "bge").1, label1);
    setup.publish(&v2);
    wait_for_version(&d, "bge", "2", Duration::from_secs(120));
    assert_eq!(embed(&d, "bge").1, label2);
    assert!(hub.downloads().is_empty(), "switching between kept versions downloaded: {:?}", hub.downloads());
}

/// `edgenode models probe` writes probes from what a node serves now; a version that answers
/// them serves, one that does not (the other seed) never does.
#[test]
fn probes_written_from_a_serving_node_pass_the_same_version_and_stop_another() {
    let v1 = pin_dir("bge", "embed", "1", &bge("1")) + &pin_dir("tiny", "generate", "1", &tiny("1"));
    let v2 = pin_dir("bge", "embed", "2", &bge("2")) + &pin_dir("tiny", "generate", "2", &tiny("2"));
    let models = [("bge", "embed"), ("tiny", "generate")];

    // A node serving version 2 writes its probes into a copy of the version 2 manifest.
    let reference = Setup::new(&v2);
    let d = Daemon::start(Options { config: Some(reference.config("", &models)), ..Default::default() });
    d.wait_ready(Duration::from_secs(300));
    let probed = reference.path("probed.toml");
    std::fs::write(&probed, &v2).unwrap();
    for name in ["bge", "tiny"] {
        let out = Command::new(binary())
            .args(["models", "probe", name, "--url", &d.url(""), "--manifest", &probed.display().to_string()])
            .current_dir(root())
            .env_remove("EDGENODE_CONFIG")
            .output()
            .unwrap();
        assert!(out.status.success(), "models probe {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    drop(d);
    let text = std::fs::read_to_string(&probed).unwrap();
    assert!(text.matches("[models.probe]").count() == 2 && text.contains("completion = ") && text.contains("vectors = "), "{text}");

    // A node on version 1 follows the probed manifest.
    let node = Setup::new(&v1);
    let d = Daemon::start(Options { config: Some(node.config("", &models)), ..Default::default() });
    d.wait_ready(Duration::from_secs(300));
    // First a third bge (another seed) under version 2's probe: it cannot answer it.
    let entry = |text: &str, name: &str| -> toml::Value {
        let m: toml::Table = text.parse().unwrap();
        m["models"].as_array().unwrap().iter().find(|e| e["name"].as_str() == Some(name)).unwrap().clone()
    };
    let mut third = entry(&pin_dir("bge", "embed", "3", &bge("3")), "bge");
    third.as_table_mut().unwrap().insert("probe".into(), entry(&text, "bge")["probe"].clone());
    let bad = toml::to_string(&toml::Table::from_iter([("models".to_string(), toml::Value::Array(vec![third, entry(&v1, "tiny")]))])).unwrap();
    node.publish(&bad);
    let s = wait_for_state(&d, "bge", "failed", Duration::from_secs(120));
    assert!(s["error"].as_str().unwrap().starts_with("probe: "), "{s}");
    assert_eq!(info_model(&d, "bge")["version"], "1");

    node.publish(&text);
    wait_for_version(&d, "bge", "2", Duration::from_secs(180));
    wait_for_version(&d, "tiny", "2", Duration::from_secs(180));
    assert_eq!(apply_state(&d, "tiny")["state"], "switched");
}

/// Two versions that do not fit `limits.max_model_bytes`: the old one is unloaded first and
/// the model answers 503 `not_ready` with `Retry-After` until the new one is warm, never a
/// wrong answer and never an out-of-memory kill.
#[test]
fn a_switch_past_max_model_bytes_is_an_announced_unavailability() {
    let local = pin_dir("bge", "embed", "1", &bge("1"));
    let central = pin_dir("bge", "embed", "2", &bge("2"));
    let one: u64 = std::fs::read_dir(bge("1"))
        .unwrap()
        .chain(std::fs::read_dir(bge("1").join("1_Pooling")).unwrap())
        .filter_map(|e| e.ok())
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();
    let setup = Setup::new(&local);
    let config = setup.config("", &[("bge", "embed")]) + &format!("\n[limits]\nmax_model_bytes = {}\n\n[server]\nready_wait_s = 0\n", one * 3 / 2);
    let d = Arc::new(Daemon::start(Options { config: Some(config), ..Default::default() }));
    d.wait_ready(Duration::from_secs(120));

    let stop = Arc::new(AtomicBool::new(false));
    let seen: Seen = Arc::default();
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (d, stop, seen) = (d.clone(), stop.clone(), seen.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let r = client().post(d.url("/embed")).json(&json!({"model": "bge", "inputs": [SENTENCE]})).send().unwrap();
                    let status = r.status().as_u16();
                    let label = r.headers().get("x-edgenode-model").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
                    let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
                    let body: Value = r.json().unwrap_or(Value::Null);
                    seen.lock().unwrap().push((status, label, json!({"retry_after": retry, "body": body})));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    setup.publish(&central);
    wait_for_version(&d, "bge", "2", Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let seen = seen.lock().unwrap();
    let unavailable: Vec<_> = seen.iter().filter(|(s, _, _)| *s == 503).collect();
    assert!(!unavailable.is_empty(), "the old version was unloaded first, so some requests met the unavailability");
    for (status, label, extra) in seen.iter() {
        match status {
            200 => assert!(label.starts_with("bge@1+") || label.starts_with("bge@2+"), "{label}"),
            503 => {
                assert!(extra["retry_after"].as_u64().is_some_and(|s| s >= 1), "503 without Retry-After: {extra}");
                assert_eq!(extra["body"]["error_type"], "Unhealthy", "{extra}");
            }
            other => panic!("status {other} during the switch: {extra}"),
        }
    }
    assert!(seen.last().unwrap().1.starts_with("bge@2+"));
    assert!(d.log_text().contains("do not fit limits.max_model_bytes"));
}

/// A model the central manifest adds is fetched and served (the node ready throughout); one
/// it drops is served on until `sync.remove` says otherwise, then answers 404.
#[test]
fn models_the_central_manifest_adds_are_served_and_dropped_ones_removed() {
    let bge1 = pin_dir("bge", "embed", "1", &bge("1"));
    let tiny1 = pin_dir("tiny", "generate", "1", &tiny("1"));
    let setup = Setup::new(&bge1);
    let d = Arc::new(Daemon::start(Options { config: Some(setup.config("remove = true", &[("bge", "embed")])), ..Default::default() }));
    d.wait_ready(Duration::from_secs(120));

    let stop = Arc::new(AtomicBool::new(false));
    let ready_codes: Arc<Mutex<Vec<u16>>> = Arc::default();
    let watcher = {
        let (d, stop, codes) = (d.clone(), stop.clone(), ready_codes.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                codes.lock().unwrap().push(get_json(&d, "/readyz").0);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    setup.publish(&(bge1.clone() + &tiny1));
    let deadline = Instant::now() + Duration::from_secs(240);
    while info_model(&d, "tiny")["stage"] != "ready" {
        assert!(Instant::now() < deadline, "tiny was never added: {}", apply_state(&d, "tiny"));
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    let codes = ready_codes.lock().unwrap();
    assert!(!codes.is_empty() && codes.iter().all(|c| *c == 200), "the node left ready while adding a model: {codes:?}");
    assert_eq!(apply_state(&d, "tiny")["state"], "added");
    let (status, body) =
        post_json(&d, "/v1/chat/completions", &json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}));
    assert_eq!(status, 200, "{body}");
    let (_, models) = get_json(&d, "/v1/models");
    assert!(models["data"].as_array().unwrap().iter().any(|m| m["id"] == "tiny"), "{models}");

    // The central manifest drops bge: with sync.remove it is no longer served.
    setup.publish(&tiny1);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _, body) = embed(&d, "bge");
        if status == 404 {
            assert_eq!(body["error_type"], "Validation", "{body}");
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(Instant::now() < deadline, "bge was never removed");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(apply_state(&d, "bge")["state"], "removed");
    let (code, ready) = get_json(&d, "/readyz");
    assert_eq!(code, 200, "{ready}");
    assert!(ready["models"].get("bge").is_none(), "{ready}");
}

/// `sync.rollout_jitter_s`: a node waits for its stable share of the window before it
/// applies a change, and `/info` says when it will switch.
#[test]
fn a_fleet_rolls_each_node_switches_at_its_own_share_of_the_window() {
    let local = pin_dir("bge", "embed", "1", &bge("1"));
    let central = pin_dir("bge", "embed", "2", &bge("2"));
    // A Machine id whose share of the window is over half, and one near its start.
    let ids: Vec<String> = (0..200).map(|i| format!("machine-{i}")).collect();
    let late = ids.iter().find(|i| edgenode::upgrade::jitter_share(i) > 0.5).unwrap().clone();
    let early = ids.iter().find(|i| edgenode::upgrade::jitter_share(i) < 0.002).cloned();
    let window = 3600u64;
    let setup = Setup::new(&local);
    let config = setup.config(&format!("rollout_jitter_s = {window}"), &[("bge", "embed")]);
    let late_node = Daemon::start(Options { config: Some(config.clone()), env: vec![("FLY_MACHINE_ID".into(), late.clone())], ..Default::default() });
    late_node.wait_ready(Duration::from_secs(120));
    let published = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    setup.publish(&central);
    let s = wait_for_state(&late_node, "bge", "scheduled", Duration::from_secs(30));
    let at = s["at"].as_u64().unwrap();
    let expected = published as f64 + window as f64 * edgenode::upgrade::jitter_share(&late);
    assert!((at as f64 - expected).abs() <= 3.0, "scheduled at {at}, expected about {expected}: {s}");
    assert_eq!(s["target"]["version"], "2");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(info_model(&late_node, "bge")["version"], "1", "a node switched before its share of the window");
    drop(late_node);

    if let Some(early) = early {
        // Another node of the fleet, whose share comes within seconds, has switched meanwhile.
        let early_node = Daemon::start(Options { config: Some(config), env: vec![("FLY_MACHINE_ID".into(), early)], ..Default::default() });
        early_node.wait_ready(Duration::from_secs(120));
        wait_for_version(&early_node, "bge", "2", Duration::from_secs(120));
    }
}
