//! text-generation-inference's dialect and Hugging Face's own clients: TGI's routes checked
//! against TGI's OpenAPI document, then huggingface_hub's `InferenceClient` and LangChain's
//! `HuggingFaceEndpoint` driving the real daemon, pointed at each route and at the base URL
//! (`tests/hf_clients.py`).

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// The interpreter with huggingface_hub and langchain-huggingface (`scripts/test.sh` makes
/// it: langchain-huggingface needs huggingface_hub 1.x, the main test environment has 2.x).
fn hf_python() -> String {
    std::env::var("HF_CLIENTS_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[test]
fn hugging_face_clients_work_unchanged_against_the_default_node() {
    let d = Daemon::start_default();
    d.wait_ready(Duration::from_secs(180));
    // The same models, with POST / answering classification when the body does not say.
    let config = std::fs::read_to_string(root().join("edgenode.toml"))
        .unwrap()
        .replacen("root_route = \"auto\"", "root_route = \"classify\"", 1)
        .replacen("dir = \"models\"", &format!("dir = {:?}", models_dir().display().to_string()), 1);
    assert!(config.contains("root_route = \"classify\""), "edgenode.toml sets server.root_route");
    let classify_root = Daemon::start(Options { config: Some(config), ..Default::default() });
    classify_root.wait_ready(Duration::from_secs(180));
    let openapi = root().join("tests/fixtures/tgi_openapi.json").display().to_string();
    run_client_script(&hf_python(), "hf_clients.py", &[d.url(""), classify_root.url(""), openapi]);
}

/// The model names clients send for "the model here" map to the route's default model;
/// a name that is simply wrong is still a 404 naming what is served.
#[test]
fn placeholder_model_names_map_to_the_default_model_and_wrong_names_stay_404() {
    let d = Daemon::start_default();
    d.wait_ready(Duration::from_secs(180));
    let ask = |model: &str| {
        post_json(&d, "/v1/chat/completions", &json!({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}))
    };
    for alias in ["tgi", "dummy", "smollm2"] {
        let (s, b) = ask(alias);
        assert_eq!(s, 200, "{alias}: {b}");
        assert_eq!(b["model"], "smollm2", "{alias} answers as the model it stands for: {b}");
    }
    let (s, b) = ask("gpt-4o");
    assert_error(s, &b, 404, "model_not_found");
    assert!(b["error"]["message"].as_str().unwrap().contains("smollm2"), "{b}");
    // An alias names the default model of the route's kind: on /embed, the embedder.
    let (s, b) = post_json(&d, "/embed", &json!({"model": "tgi", "inputs": "hello"}));
    assert_eq!(s, 200, "{b}");
}

/// POST / says what it could not decide: a body for a task this node does not serve.
#[test]
fn the_root_route_follows_the_node_it_runs_on() {
    let d = Daemon::start(Options { config: Some("[[models]]\nname = \"minilm\"\nkind = \"embed\"\n".into()), ..Default::default() });
    d.wait_ready(Duration::from_secs(180));
    // One task: every undecided body is that task (TEI's own `POST /`).
    let (s, b) = post_json(&d, "/", &json!({"inputs": ["a", "b"]}));
    assert_eq!(s, 200, "{b}");
    assert_eq!(b.as_array().map(Vec::len), Some(2), "{b}");
    let (s, b) = post_json(&d, "/", &json!({"inputs": "a", "parameters": {}}));
    assert_eq!(s, 422, "{b}: an embedder's /embed takes no `parameters`");
    // A body that asks for generation on a node without a generate model.
    let (s, b) = post_json(&d, "/", &json!({"inputs": "a", "parameters": {"max_new_tokens": 4}}));
    let message = assert_tei_error(s, &b, 422, "Validation");
    assert!(message.contains("/generate") && message.contains("serves no generate model"), "{message}");
}

/// A key limited to some models is held to them on `POST /` too, once the body says which
/// kind of model it needs (the route itself names none).
#[test]
fn the_root_route_keeps_a_keys_model_list() {
    let config = "[auth]\n[[auth.keys]]\nname = \"embed-only\"\n\
                  sha256 = \"6fb62b96eee7850cb5db3722a3ba58482de589c78059cbf230477173dc8dd770\"\nmodels = [\"minilm\"]\n\n\
                  [[models]]\nname = \"minilm\"\nkind = \"embed\"\n\n[[models]]\nname = \"smollm2\"\nkind = \"generate\"\n";
    let d = Daemon::start(Options { config: Some(config.into()), ..Default::default() });
    d.wait_ready(Duration::from_secs(180));
    let post = |body: serde_json::Value| {
        let r = client().post(d.url("/")).bearer_auth("k-embed-only").json(&body).send().unwrap();
        (r.status().as_u16(), r.json::<serde_json::Value>().unwrap())
    };
    let (s, b) = post(json!({"inputs": "edge"}));
    assert_eq!(s, 200, "embedding is allowed: {b}");
    let (s, b) = post(json!({"inputs": "edge", "parameters": {"max_new_tokens": 2}}));
    assert_eq!(s, 403, "generation is not: {b}");
    assert_eq!(b["error_type"], "validation", "in TGI's shape: {b}");
    assert!(b["error"].as_str().unwrap().contains("smollm2"), "{b}");
    let (s, b) = post(json!({"inputs": "edge", "parameters": {"max_new_tokens": 2}, "model": "tgi"}));
    assert_eq!(s, 403, "an alias is the model it stands for: {b}");
}
