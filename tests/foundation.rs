//! The foundation, as a user meets it: config precedence and errors, the pinned model
//! store, and the daemon's operations routes and error shape.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A config that serves nothing, for tests about the daemon itself.
const NO_MODELS: &str = "models = []\n";

#[test]
fn config_precedence_is_file_then_env_then_flag() {
    // File: an address that cannot be bound, and two limits. Env overrides one limit and the
    // address; the --addr flag the harness passes (127.0.0.1:0) overrides both addresses.
    let d = Daemon::start(Options {
        config: Some(format!("{NO_MODELS}[server]\naddr = \"192.0.2.1:1\"\n[limits]\nmax_inputs = 10\nmax_input_chars = 777\n")),
        env: vec![("EDGENODE_LIMITS__MAX_INPUTS".into(), "20".into()), ("EDGENODE_SERVER__ADDR".into(), "192.0.2.2:2".into())],
        ..Default::default()
    });
    d.wait_ready(Duration::from_secs(30));
    let (status, info) = get_json(&d, "/info");
    assert_eq!(status, 200);
    assert_eq!(info["limits"]["max_inputs"], 20, "env beats file");
    assert_eq!(info["limits"]["max_input_chars"], 777, "file beats defaults");
    assert!(d.addr.starts_with("127.0.0.1:"), "flag beats env and file: {}", d.addr);
}

fn serve_with_config(text: &str, env: &[(&str, &str)]) -> (i32, String) {
    let f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(f.path(), text).unwrap();
    let mut cmd = Command::new(binary());
    cmd.args(["serve", "--addr", "127.0.0.1:0", "--config"]).arg(f.path()).current_dir(root());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn unknown_key_stops_startup_naming_key_and_source() {
    let (code, err) = serve_with_config("[server]\nadress = \"127.0.0.1:1\"\n", &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("server.adress") && err.contains(".toml"), "names key and file: {err}");

    let (code, err) = serve_with_config("", &[("EDGENODE_LIMITS__MAX_INPUTS", "many")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("limits.max_inputs") && err.contains("EDGENODE_LIMITS__MAX_INPUTS"), "{err}");

    let (code, err) = serve_with_config("[[models]]\nname = \"x\"\nkind = \"embed\"\npooling = \"cls\"\nlabels = { a = [\"b\"] }\n", &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("labels") && err.contains("embed"), "{err}");
}

fn verify_output(store: &std::path::Path) -> (i32, String) {
    let f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(f.path(), format!("[store]\ndir = {:?}\n", store.display().to_string())).unwrap();
    let out = Command::new(binary()).args(["models", "verify", "--config"]).arg(f.path()).current_dir(root()).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn fetched_models_verify_and_a_flipped_byte_is_refused() {
    ensure_models();
    let (code, out) = verify_output(&models_dir());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("minilm") && out.contains("smollm2"), "{out}");

    // A second fetch downloads nothing and takes seconds.
    let started = Instant::now();
    let again = Command::new(binary()).args(["models", "fetch"]).current_dir(root()).output().unwrap();
    assert!(again.status.success());
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(text.lines().all(|l| l.starts_with("present")), "{text}");
    assert!(started.elapsed() < Duration::from_secs(20));

    // Flip one byte of a copy of the weights.
    let store = tempfile::tempdir().unwrap();
    copy_dir(&models_dir().join("minilm"), &store.path().join("minilm"));
    copy_dir(&models_dir().join("smollm2"), &store.path().join("smollm2"));
    let weights = store.path().join("minilm/model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    std::fs::write(&weights, bytes).unwrap();

    let (code, out) = verify_output(store.path());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("model.safetensors") && out.contains("53aa51172d142c89"), "names file and expected digest: {out}");

    // serve refuses the damaged model (naming the file), and still serves the other one.
    let d = Daemon::start(Options {
        config: Some(format!(
            "[store]\ndir = {:?}\nfetch_missing = false\n[[models]]\nname = \"minilm\"\nkind = \"embed\"\n[[models]]\nname = \"smollm2\"\nkind = \"generate\"\n",
            store.path().display().to_string()
        )),
        ..Default::default()
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let body = loop {
        let (_, body) = get_json(&d, "/readyz");
        if body["models"]["smollm2"]["stage"] == "ready" && body["models"]["minilm"]["stage"] == "failed" {
            break body;
        }
        assert!(Instant::now() < deadline, "{body}\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(body["status"], "failed");
    let err = body["models"]["minilm"]["error"].as_str().unwrap();
    assert!(err.contains("model.safetensors") && err.contains("53aa51172d142c89"), "{err}");
    let (status, _) = post_json(&d, "/generate", &json!({"prompt": "Hello", "max_tokens": 2}));
    assert_eq!(status, 200, "the healthy model still serves");
}

#[test]
fn readiness_follows_boot_and_info_carries_the_verified_digests() {
    let d = Daemon::start_default();
    // /livez answers from the first moment; /readyz is 503 until every model is warm.
    let (live, _) = get_json(&d, "/livez");
    assert_eq!(live, 200);
    let (first, body) = get_json(&d, "/readyz");
    assert_eq!(first, 503, "still booting right after listening: {body}");
    assert_eq!(body["status"], "warming");
    d.wait_ready(Duration::from_secs(180));
    let (live, _) = get_json(&d, "/livez");
    assert_eq!(live, 200);

    let (code, out) = verify_output(&models_dir());
    assert_eq!(code, 0);
    let digest_of = |name: &str| -> String {
        let line = out.lines().find(|l| l.split_whitespace().nth(1) == Some(name)).unwrap();
        line.split_whitespace().last().unwrap().to_string()
    };
    let (_, info) = get_json(&d, "/info");
    let (_, models) = get_json(&d, "/v1/models");
    for name in ["minilm", "smollm2"] {
        let digest = digest_of(name);
        let m = info["models"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap();
        assert_eq!(m["digest"], digest.as_str(), "{info}");
        assert!(m["stage_seconds"]["verifying"].as_f64().is_some(), "{info}");
        let listed = models["data"].as_array().unwrap().iter().find(|m| m["id"] == name).unwrap();
        assert_eq!(listed["digest"], digest.as_str());
        assert_eq!(listed["object"], "model");
    }
    assert_eq!(models["object"], "list");
}

#[test]
fn every_error_is_json() {
    let d = Daemon::start(Options { config: Some(NO_MODELS.into()), ..Default::default() });
    d.wait_ready(Duration::from_secs(30));
    let c = client();
    let big = format!("{{\"input\": \"{}\"}}", "a".repeat(9 * 1024 * 1024));

    // OpenAI's shape on OpenAI's routes (and ours).
    let send = |path: &str, content_type: &str, body: String| {
        let r = c.post(d.url(path)).header("content-type", content_type).body(body).send().unwrap();
        (r.status().as_u16(), r.json::<serde_json::Value>().unwrap())
    };
    let (status, body) = send("/v1/embeddings", "application/json", "{\"input\": [".into());
    assert_error(status, &body, 400, "invalid_json");
    let (status, body) = get_json(&d, "/no/such/route");
    assert_error(status, &body, 404, "not_found");
    let r = c.get(d.url("/v1/embeddings")).send().unwrap();
    let status = r.status().as_u16();
    assert_error(status, &r.json().unwrap(), 405, "method_not_allowed");
    let (status, body) = send("/v1/embeddings", "application/json", big.clone());
    assert_error(status, &body, 413, "body_too_large");
    let (status, body) = send("/v1/embeddings", "text/plain", "hello".into());
    assert_error(status, &body, 415, "unsupported_media_type");
    let (status, body) = send("/v1/embeddings", "application/json", "{\"input\": \"hi\", \"frobnicate\": 1}".into());
    assert_error(status, &body, 400, "invalid_field");
    assert_eq!(body["error"]["param"], "frobnicate", "an unknown field is named: {body}");
    // No embed model is served: the 404 says so and lists what is.
    let (status, body) = post_json(&d, "/v1/embeddings", &json!({"input": "hi"}));
    assert_error(status, &body, 404, "model_not_found");

    // TEI's shape on TEI's routes: {"error", "error_type"}, TEI 1.9's statuses.
    let tei = |(status, body): (u16, serde_json::Value), want: u16, kind: &str| {
        assert_eq!(status, want, "{body}");
        assert_eq!(body["error_type"], kind, "{body}");
        assert!(body["error"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    };
    tei(send("/embed", "application/json", "{\"inputs\": [".into()), 400, "Validation");
    tei(send("/embed", "application/json", big.replace("\"input\"", "\"inputs\"")), 413, "Validation");
    tei(send("/embed", "text/plain", "hello".into()), 415, "Validation");
    tei(send("/embed", "application/json", "{\"inputs\": \"hi\", \"frobnicate\": 1}".into()), 422, "Validation");
    tei(post_json(&d, "/embed", &json!({"inputs": "hi"})), 404, "Validation");
}

#[test]
fn shipped_config_is_the_built_in_default() {
    let shipped = edgenode::config::parse_file(&root().join("edgenode.toml")).unwrap();
    assert_eq!(shipped, edgenode::config::Config::default(), "edgenode.toml and the defaults drifted apart");
}
