//! Models from the Hugging Face Hub, through the real CLI and daemon.
//!
//! The Hub is out of reach here, so `tests/fixtures/hub_server.py` plays it on two local
//! ports: the Hub itself (`localhost`: the API, `resolve` URLs, small files with their git
//! blob id as `ETag`) and a second host (`127.0.0.1`, the CDN large files redirect to, with
//! `X-Linked-Etag` and `X-Repo-Commit`). The official `huggingface_hub` client downloads
//! from it too (first test), so the server speaks the real protocol, and edgenode is held to
//! that same server: pin, fetch and serve the bge-shaped and TinyLlama-shaped stand-ins, a
//! cut connection resumed, corrupted bytes refused, the token kept from the CDN, the gated,
//! not-found and offline messages, and the local Hugging Face cache used instead of the
//! network.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::hub::HubServer;
use common::*;
use serde_json::{json, Value};

const BGE_REPO: &str = "standins/bge-small-en-v1.5";
const TINY_REPO: &str = "standins/TinyLlama-1.1B-Chat-v1.0-GGUF";
const TINY_FILE: &str = "tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf";
const TOKEN: &str = "hf_test_token_for_the_hub_only";

/// The bge-small-shaped stand-in the golden vectors were computed from (tests/card_models.rs).
fn bge_standin() -> PathBuf {
    ensure_models();
    let tokenizer = models_dir().join("minilm/tokenizer.json").display().to_string();
    standin("bge", &["--tokenizer", &tokenizer, "--pooling-format", "legacy", "--shape", "small", "--layers", "2", "--prompts"])
}

/// The hub-shaped server with the bge and TinyLlama stand-ins as `standins/...`
/// repositories (the TinyLlama one with a README beside its GGUF file); `gated` ones need
/// `TOKEN`.
struct Hub;

impl Hub {
    fn start(gated: &[&str]) -> HubServer {
        let tiny = tempfile::tempdir().unwrap();
        std::fs::copy(tinyllama_standin("q4_k_m"), tiny.path().join(TINY_FILE)).unwrap();
        std::fs::write(tiny.path().join("README.md"), "A TinyLlama-shaped stand-in with random weights.\n").unwrap();
        HubServer::start(&[(BGE_REPO, &bge_standin()), (TINY_REPO, tiny.path())], gated, TOKEN)
    }
}

/// A scratch folder with a store, a manifest and a config that serve what `models` names.
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        Node { dir: tempfile::tempdir().unwrap() }
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn manifest(&self) -> PathBuf {
        self.dir.path().join("manifest.toml")
    }

    fn hf_home(&self) -> PathBuf {
        self.dir.path().join("hf-home")
    }

    /// `[store]` on this node's store and manifest, and a `[[models]]` table per (name, kind).
    fn config(&self, models: &[(&str, &str)]) -> String {
        let mut text = format!("[store]\ndir = {:?}\nmanifest = {:?}\n", self.store().display().to_string(), self.manifest().display().to_string());
        for (name, kind) in models {
            text += &format!("\n[[models]]\nname = {name:?}\nkind = {kind:?}\n");
        }
        text
    }

    fn config_file(&self, models: &[(&str, &str)]) -> PathBuf {
        let path = self.dir.path().join("edgenode.toml");
        std::fs::write(&path, self.config(models)).unwrap();
        path
    }

    /// `edgenode ARGS` with the Hub's variables for `hub` (and only `env` beyond them).
    fn run(&self, hub: &HubServer, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(binary());
        cmd.args(args).current_dir(self.dir.path()).env_remove("EDGENODE_CONFIG");
        for k in ["HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN_PATH", "HUGGING_FACE_HUB_TOKEN"] {
            cmd.env_remove(k);
        }
        cmd.env("HF_ENDPOINT", &hub.hub).env("HF_HOME", self.hf_home());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run edgenode")
    }

    fn pin(&self, hub: &HubServer, name: &str, kind: &str, spec: &str, files: &[&str], env: &[(&str, &str)]) -> Output {
        let manifest = self.manifest().display().to_string();
        let mut args = vec!["models", "pin", name, "--kind", kind, "--version", "1.0-standin", "--hf", spec, "--manifest", &manifest];
        args.extend_from_slice(files);
        self.run(hub, &args, env)
    }

    /// The environment a daemon of this node runs with: the Hub's address and this node's
    /// (empty) Hugging Face cache.
    fn daemon_env(&self, hub: &HubServer) -> Vec<(String, String)> {
        vec![("HF_ENDPOINT".to_string(), hub.hub.clone()), ("HF_HOME".to_string(), self.hf_home().display().to_string())]
    }

    fn fetch(&self, hub: &HubServer, models: &[(&str, &str)], env: &[(&str, &str)]) -> Output {
        let config = self.config_file(models).display().to_string();
        self.run(hub, &["--config", &config, "models", "fetch"], env)
    }
}

fn ok(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{what} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn failed(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{what} should have failed:\n{}\n{stderr}", String::from_utf8_lossy(&out.stdout));
    stderr
}

fn manifest_entry(node: &Node, name: &str) -> toml::Table {
    let m: toml::Table = std::fs::read_to_string(node.manifest()).unwrap().parse().unwrap();
    m["models"].as_array().unwrap().iter().find(|e| e["name"].as_str() == Some(name)).and_then(|e| e.as_table().cloned()).unwrap()
}

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// The same manifest as `pin` wrote for bge, but without the sha256 of its small
/// sentence-transformers files: the card manifest's form for files whose digests we do not
/// know (they are checked against the Hub's object ids and recorded at the first fetch).
fn drop_small_file_digests(node: &Node) {
    let text = std::fs::read_to_string(node.manifest()).unwrap();
    let mut m: toml::Table = text.parse().unwrap();
    for e in m["models"].as_array_mut().unwrap() {
        if e["name"].as_str() == Some("bge-small") {
            for f in e["files"].as_array_mut().unwrap() {
                let path = f["path"].as_str().unwrap().to_string();
                if ["modules.json", "1_Pooling/config.json", "sentence_bert_config.json", "config_sentence_transformers.json"]
                    .contains(&path.as_str())
                {
                    f.as_table_mut().unwrap().remove("sha256");
                }
            }
        }
    }
    std::fs::write(node.manifest(), toml::to_string(&m).unwrap()).unwrap();
}

#[test]
fn the_official_client_downloads_from_the_hub_shaped_server() {
    let hub = Hub::start(&[BGE_REPO]);
    let node = Node::new();
    let out = Command::new(test_python())
        .arg(fixture("hf_hub_client.py"))
        .arg(&hub.hub)
        .arg(BGE_REPO)
        .arg(bge_standin())
        .args(["--token", TOKEN])
        .env("HF_HOME", node.hf_home())
        .output()
        .expect("run hf_hub_client.py");
    let stdout = ok(&out, "huggingface_hub against the hub-shaped server");
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(v["ok"], true, "{stdout}");
    assert!(v["files"].as_u64().unwrap() >= 6, "{stdout}");
    // Large files went through the CDN host, without the token.
    let cdn: Vec<Value> = hub.log().into_iter().filter(|r| r["port"] == "cdn").collect();
    assert!(!cdn.is_empty(), "huggingface_hub fetched no large file from the second host");
    assert!(cdn.iter().all(|r| r["authorization"].is_null()), "the official client sent the token to the CDN? {cdn:?}");
}

/// The README's card recipe against the Hub: pin both stand-ins by repository, serve them
/// (the node fetches at boot, `/readyz` showing the bytes), and check what they answer:
/// bge's vectors are sentence-transformers' for these very files.
#[test]
fn pin_fetch_and_serve_the_card_standins_from_the_hub() {
    let hub = Hub::start(&[]);
    let node = Node::new();
    ok(&node.pin(&hub, "bge-small", "embed", BGE_REPO, &[], &[]), "pin bge-small");
    ok(&node.pin(&hub, "tinyllama", "generate", &format!("{TINY_REPO}@main"), &[], &[]), "pin tinyllama");

    // The entries: the commit, not `main`; every file the loader reads, each with its sha256
    // (large ones from the Hub's listing) and size.
    let bge = manifest_entry(&node, "bge-small");
    let commit = bge["source"]["revision"].as_str().unwrap().to_string();
    assert_eq!(commit.len(), 40, "{bge:?}");
    assert_eq!(bge["source"]["hf"].as_str(), Some(BGE_REPO));
    let paths: Vec<&str> = bge["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    for file in edgenode::encoder::files::READS {
        assert!(paths.contains(file), "pin --hf pins {file}: {paths:?}");
    }
    for f in bge["files"].as_array().unwrap() {
        let local = bge_standin().join(f["path"].as_str().unwrap());
        assert_eq!(f["sha256"].as_str().unwrap(), sha256_hex(&local), "{f:?}");
        assert_eq!(f["size"].as_integer().unwrap() as u64, std::fs::metadata(&local).unwrap().len());
    }
    let tiny = manifest_entry(&node, "tinyllama");
    let files = tiny["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "a generate model is its GGUF file, not the README: {files:?}");
    assert_eq!(files[0]["sha256"].as_str().unwrap(), sha256_hex(&tinyllama_standin("q4_k_m")));
    // Pinning downloaded no large file: their sha256 came from the listing.
    assert!(hub.log().iter().all(|r| r["port"] != "cdn"), "pin downloaded a large file");

    // The card manifest's form: the small sentence-transformers files without sha256.
    drop_small_file_digests(&node);
    hub.control(json!({"reset": true, "throttle": 4_000_000}));
    let config = node.config(&[("bge-small", "embed"), ("tinyllama", "generate")]);
    let env = node.daemon_env(&hub);
    let d = Daemon::start(Options { config: Some(config.clone()), env: env.clone(), ..Default::default() });

    // While it downloads, /readyz and /info say how far it is.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = None;
    while Instant::now() < deadline && seen.is_none() {
        let (_, ready) = get_json(&d, "/readyz");
        let stage = &ready["models"]["tinyllama"];
        if stage["stage"] == "fetching" && stage["bytes_total"].as_u64().unwrap_or(0) > 0 && stage["bytes_done"].as_u64().unwrap_or(0) > 0 {
            let (_, info) = get_json(&d, "/info");
            let model = info["models"].as_array().unwrap().iter().find(|m| m["name"] == "tinyllama").cloned().unwrap();
            seen = Some((stage.clone(), model["fetch"].clone()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (stage, info_fetch) = seen.expect("/readyz never showed tinyllama fetching with bytes done and total");
    assert_eq!(stage["file"], TINY_FILE, "{stage}");
    assert_eq!(stage["bytes_total"].as_u64(), std::fs::metadata(tinyllama_standin("q4_k_m")).ok().map(|m| m.len()), "{stage}");
    assert!(info_fetch["bytes_total"].as_u64().unwrap_or(0) > 0, "/info's fetch: {info_fetch}");
    hub.control(json!({"throttle": 0}));
    d.wait_ready(Duration::from_secs(300));

    let (status, info) = get_json(&d, "/info");
    assert_eq!(status, 200);
    let bge_info = info["models"].as_array().unwrap().iter().find(|m| m["name"] == "bge-small").cloned().unwrap();
    assert_eq!(bge_info["files"]["modules.json"].as_str().unwrap(), sha256_hex(&bge_standin().join("modules.json")), "{bge_info}");

    let g: Value = serde_json::from_str(&std::fs::read_to_string(fixture("bge_standin_golden.json")).unwrap()).unwrap();
    let rows = g["models"].as_array().unwrap().iter().find(|m| m["name"] == "bge-small").unwrap()["rows"].as_array().unwrap().clone();
    let texts: Vec<&str> = rows.iter().take(3).map(|r| r["text"].as_str().unwrap()).collect();
    let (status, body) = post_json(&d, "/embed", &json!({"inputs": texts, "model": "bge-small"}));
    assert_eq!(status, 200, "{body}");
    for (row, got) in rows.iter().zip(body.as_array().unwrap()) {
        let (a, b): (Vec<f64>, Vec<f64>) = (
            got.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect(),
            row["cls_normalized"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect(),
        );
        let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!(dot >= 0.9999, "bge-small from the Hub: cosine {dot} to sentence-transformers for {:?}", row["text"]);
    }
    let (status, body) = post_json(
        &d,
        "/v1/chat/completions",
        &json!({"model": "tinyllama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() >= 1, "{body}");
    drop(d);

    // The small files' sha256 were recorded at the first fetch: a restart verifies locally and
    // asks the Hub nothing, even offline.
    hub.control(json!({"reset": true}));
    let mut offline = env.clone();
    offline.push(("HF_HUB_OFFLINE".into(), "1".into()));
    let d = Daemon::start(Options { config: Some(config), env: offline, ..Default::default() });
    d.wait_ready(Duration::from_secs(120));
    assert!(hub.log().is_empty(), "a restart with everything verified asked the Hub: {:?}", hub.log());
}

/// A connection cut in the middle of a large file: the next try asks for the rest with
/// `Range` and the file completes and verifies.
#[test]
fn a_cut_download_resumes_where_it_stopped() {
    let hub = Hub::start(&[]);
    let node = Node::new();
    ok(&node.pin(&hub, "tinyllama", "generate", TINY_REPO, &[], &[]), "pin");
    let size = std::fs::metadata(tinyllama_standin("q4_k_m")).unwrap().len();
    let cut = size / 3;
    hub.control(json!({"reset": true, "cut_after": cut}));
    let out = ok(&node.fetch(&hub, &[("tinyllama", "generate")], &[]), "fetch after a cut");
    assert!(out.contains("fetched") && out.contains("tinyllama"), "{out}");
    let ranges: Vec<String> = hub.log().iter().filter(|r| r["port"] == "cdn").filter_map(|r| r["range"].as_str().map(str::to_string)).collect();
    assert_eq!(ranges, vec![format!("bytes={cut}-")], "the second try resumes from byte {cut}");
    let file = node.store().join("tinyllama").join(TINY_FILE);
    assert_eq!(sha256_hex(&file), sha256_hex(&tinyllama_standin("q4_k_m")));
    assert!(!node.store().join("tinyllama").join(format!("{TINY_FILE}.partial")).exists());
}

/// Bytes that do not hash to the pin are refused: no file under the real name, nothing
/// half-written left to load, and a node that would serve them reports why and serves none.
#[test]
fn corrupted_bytes_are_refused_and_never_loaded() {
    let hub = Hub::start(&[]);
    let node = Node::new();
    ok(&node.pin(&hub, "tinyllama", "generate", TINY_REPO, &[], &[]), "pin");
    hub.control(json!({"reset": true, "corrupt": true}));
    let err = failed(&node.fetch(&hub, &[("tinyllama", "generate")], &[]), "fetch of corrupted bytes");
    assert!(err.contains("sha256") && err.contains("discarded"), "{err}");
    let dir = node.store().join("tinyllama");
    assert!(!dir.join(TINY_FILE).exists(), "a corrupted file was put in place");
    assert!(!dir.join(format!("{TINY_FILE}.partial")).exists(), "corrupted bytes were kept to resume from");

    // Served: the model fails with the reason, and nothing is loaded.
    hub.control(json!({"corrupt": true}));
    let config = node.config(&[("tinyllama", "generate")]);
    let env = node.daemon_env(&hub);
    let d = Daemon::start(Options { config: Some(config), env, ..Default::default() });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, ready) = get_json(&d, "/readyz");
        if ready["models"]["tinyllama"]["stage"] == "failed" {
            assert_eq!(status, 503);
            let error = ready["models"]["tinyllama"]["error"].as_str().unwrap();
            assert!(error.contains("sha256") && error.contains(TINY_FILE), "{error}");
            break;
        }
        assert!(Instant::now() < deadline, "never failed: {ready}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!dir.join(TINY_FILE).exists());

    // The source fixed, a fetch succeeds.
    hub.control(json!({"reset": true}));
    ok(&node.fetch(&hub, &[("tinyllama", "generate")], &[]), "fetch once the bytes are right");
}

/// A gated repository: without a token the message says what is needed; with one the token
/// goes to the Hub's host on every request and to the CDN on none.
#[test]
fn the_token_reaches_the_hub_host_only() {
    let hub = Hub::start(&[BGE_REPO]);
    let node = Node::new();
    let err = failed(&node.pin(&hub, "bge-small", "embed", BGE_REPO, &[], &[]), "pin a gated repository without a token");
    assert!(err.contains(&format!("needs HF_TOKEN with access to {BGE_REPO}")) && err.contains("401"), "{err}");

    ok(&node.pin(&hub, "bge-small", "embed", BGE_REPO, &[], &[("HF_TOKEN", TOKEN)]), "pin with HF_TOKEN");
    let err = failed(&node.fetch(&hub, &[("bge-small", "embed")], &[]), "fetch a gated repository without a token");
    assert!(err.contains(&format!("needs HF_TOKEN with access to {BGE_REPO}")), "{err}");
    let err = failed(&node.fetch(&hub, &[("bge-small", "embed")], &[("HF_TOKEN", "hf_wrong")]), "fetch with a wrong token");
    assert!(err.contains(&format!("HF_TOKEN has no access to {BGE_REPO}")), "{err}");

    hub.control(json!({"reset": true}));
    ok(&node.fetch(&hub, &[("bge-small", "embed")], &[("HF_TOKEN", TOKEN)]), "fetch with HF_TOKEN");
    let log = hub.log();
    let (to_hub, to_cdn): (Vec<&Value>, Vec<&Value>) = log.iter().partition(|r| r["port"] == "hub");
    assert!(!to_cdn.is_empty(), "the weights came through the CDN host: {log:?}");
    assert!(to_hub.iter().all(|r| r["authorization"] == format!("Bearer {TOKEN}")), "every Hub request carries the token: {to_hub:?}");
    assert!(to_cdn.iter().all(|r| r["authorization"].is_null()), "the token leaked to the CDN: {to_cdn:?}");
}

/// A revision or repository that does not exist, and offline mode: each says so by name.
#[test]
fn missing_revisions_and_offline_mode_say_what_is_wrong() {
    let hub = Hub::start(&[]);
    let node = Node::new();
    let err = failed(&node.pin(&hub, "x", "embed", &format!("{BGE_REPO}@v9.9"), &[], &[]), "pin an unknown revision");
    assert!(err.contains(&format!("revision v9.9 not found in {BGE_REPO}")) && err.contains("RevisionNotFound"), "{err}");
    let err = failed(&node.pin(&hub, "x", "embed", "standins/nothing-here", &[], &[]), "pin an unknown repository");
    assert!(err.contains("repository standins/nothing-here not found") && err.contains("RepoNotFound"), "{err}");
    let err = failed(&node.pin(&hub, "x", "generate", TINY_REPO, &["no-such.gguf"], &[]), "pin an unknown file");
    assert!(err.contains("no-such.gguf is not in") && err.contains(TINY_FILE), "{err}");

    // A branch name in a manifest is refused: it moves.
    ok(&node.pin(&hub, "tinyllama", "generate", TINY_REPO, &[], &[]), "pin");
    let text = std::fs::read_to_string(node.manifest()).unwrap();
    let commit = manifest_entry(&node, "tinyllama")["source"]["revision"].as_str().unwrap().to_string();
    std::fs::write(node.dir.path().join("moving.toml"), text.replace(&commit, "main")).unwrap();
    let moving = node.dir.path().join("moving.toml").display().to_string();
    let err = failed(&node.run(&hub, &["models", "verify", "--manifest", &moving, "tinyllama"], &[]), "a manifest at a branch");
    assert!(err.contains("is not a commit id") && err.contains("pin"), "{err}");

    hub.control(json!({"reset": true}));
    let err = failed(&node.fetch(&hub, &[("tinyllama", "generate")], &[("HF_HUB_OFFLINE", "1")]), "fetch offline");
    assert!(err.contains("HF_HUB_OFFLINE is set") && err.contains(TINY_FILE) && err.contains("Hugging Face cache"), "{err}");
    assert!(hub.log().is_empty(), "offline mode asked the Hub: {:?}", hub.log());
}

/// Files the official client already put in the local Hugging Face cache are used, checked,
/// and not downloaded again.
#[test]
fn files_in_the_hugging_face_cache_are_not_downloaded_again() {
    let hub = Hub::start(&[]);
    let node = Node::new();
    ok(&node.pin(&hub, "bge-small", "embed", BGE_REPO, &[], &[]), "pin");
    drop_small_file_digests(&node);
    let out = Command::new(test_python())
        .arg(fixture("hf_hub_client.py"))
        .arg(&hub.hub)
        .arg(BGE_REPO)
        .arg(bge_standin())
        .env("HF_HOME", node.hf_home())
        .output()
        .unwrap();
    ok(&out, "huggingface_hub filling the cache");
    hub.control(json!({"reset": true}));
    let out = ok(&node.fetch(&hub, &[("bge-small", "embed")], &[]), "fetch with the files in the HF cache");
    assert!(out.contains("fetched") && out.contains("bge-small"), "{out}");
    assert!(hub.downloads().is_empty(), "files in the HF cache were downloaded again: {:?}", hub.downloads());
    assert_eq!(sha256_hex(&node.store().join("bge-small/model.safetensors")), sha256_hex(&bge_standin().join("model.safetensors")));
}

/// A plain URL source (object storage): the base with each file's path appended, followed
/// through redirects, verified like any other; and a store without room for it is refused
/// before anything downloads.
#[test]
fn url_sources_fetch_verify_and_check_free_space() {
    let hub = Hub::start(&[]);
    let node = Node::new();
    ok(&node.pin(&hub, "tinyllama", "generate", TINY_REPO, &[], &[]), "pin");
    let commit = manifest_entry(&node, "tinyllama")["source"]["revision"].as_str().unwrap().to_string();
    let sha = sha256_hex(&tinyllama_standin("q4_k_m"));
    let size = std::fs::metadata(tinyllama_standin("q4_k_m")).unwrap().len();
    let entry = |name: &str, size: u64| {
        format!(
            "[[models]]\nname = {name:?}\nkind = \"generate\"\nversion = \"1\"\nsource = {{ url = \"{}/{TINY_REPO}/resolve/{commit}/\" }}\nfiles = [{{ path = {TINY_FILE:?}, sha256 = {sha:?}, size = {size} }}]\n\n",
            hub.hub
        )
    };
    std::fs::write(node.manifest(), entry("tiny-url", size) + &entry("tiny-huge", 1 << 60)).unwrap();
    hub.control(json!({"reset": true, "cut_after": size / 2}));
    ok(&node.fetch(&hub, &[("tiny-url", "generate")], &[]), "fetch from a URL source");
    assert_eq!(sha256_hex(&node.store().join("tiny-url").join(TINY_FILE)), sha);
    let err = failed(&node.fetch(&hub, &[("tiny-huge", "generate")], &[]), "fetch more than the disk holds");
    assert!(err.contains("needs") && err.contains("free in") && err.contains("available"), "{err}");
}
