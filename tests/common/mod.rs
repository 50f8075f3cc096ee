//! What every integration test shares: the real `edgenode` binary started on an ephemeral
//! port, with the real default models (fetched once per run and verified by digest).
#![allow(dead_code)]

pub mod hub;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, Once};
use std::time::{Duration, Instant};

/// The repository root (tests run with it as the working directory).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The model store the tests share: the repository's `models/`.
pub fn models_dir() -> PathBuf {
    root().join("models")
}

/// The `edgenode` binary under test.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_edgenode"))
}

static FETCH: Once = Once::new();

/// Fetches and verifies the default models once per test binary.
pub fn ensure_models() {
    FETCH.call_once(|| {
        let out = Command::new(binary())
            .args(["models", "fetch"])
            .current_dir(root())
            .env_remove("EDGENODE_CONFIG")
            .output()
            .expect("run edgenode models fetch");
        assert!(
            out.status.success(),
            "edgenode models fetch failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// A running daemon. Killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
    pub logs: std::sync::Arc<Mutex<Vec<String>>>,
    _config: Option<tempfile::NamedTempFile>,
    /// The node's own `state.dir` when the test did not choose one (removed with the daemon).
    _state: Option<tempfile::TempDir>,
}

/// How to start a daemon.
#[derive(Default)]
pub struct Options {
    /// A config file's text; unless it has a `[store]` table, the shared model store is added.
    /// `None` uses the repository's own `edgenode.toml`.
    pub config: Option<String>,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
    /// Listen here instead of an ephemeral port (for a process restarted on the same port).
    pub addr: Option<String>,
    /// The node's `state.dir`, for a test that restarts a node on the same state; by default
    /// each daemon has a fresh one of its own (so no test sees another's spend).
    pub state_dir: Option<PathBuf>,
}

impl Daemon {
    /// Starts the daemon with the repository's `edgenode.toml` (the default models).
    pub fn start_default() -> Daemon {
        Daemon::start(Options::default())
    }

    /// Starts `edgenode serve --addr 127.0.0.1:0` and waits until it listens (not until ready).
    pub fn start(opts: Options) -> Daemon {
        ensure_models();
        let mut cmd = Command::new(binary());
        let addr = opts.addr.clone().unwrap_or_else(|| "127.0.0.1:0".into());
        cmd.current_dir(root()).arg("serve").args(["--addr", addr.as_str()]).args(&opts.args);
        cmd.env("EDGENODE_LOG__FORMAT", "json").env("RUST_LOG", "info").env_remove("EDGENODE_CONFIG");
        let mut config_file = None;
        if let Some(extra) = &opts.config {
            let mut f = tempfile::Builder::new().suffix(".toml").tempfile().expect("temp config");
            // Top-level keys of `extra` must come before any table, so the store goes last.
            let store = format!("\n[store]\ndir = {:?}\n", models_dir().display().to_string());
            let text = if extra.contains("[store]") { extra.clone() } else { format!("{extra}\n{store}") };
            std::fs::write(f.path(), text).expect("write config");
            use std::io::Write;
            f.flush().ok();
            cmd.arg("--config").arg(f.path());
            config_file = Some(f);
        }
        let own_state = opts.state_dir.is_none().then(|| tempfile::tempdir().expect("temp state dir"));
        let state_dir = opts.state_dir.clone().or_else(|| own_state.as_ref().map(|d| d.path().to_path_buf()));
        if let Some(dir) = &state_dir {
            cmd.env("EDGENODE_STATE__DIR", dir);
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn edgenode");
        let stderr = child.stderr.take().expect("stderr");
        let logs = std::sync::Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["message"] == "listening" {
                        let _ = tx.send(v["addr"].as_str().unwrap_or_default().to_string());
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("edgenode did not start listening:\n{}", logs.lock().unwrap().join("\n"));
            }
        };
        Daemon { child, addr, logs, _config: config_file, _state: own_state }
    }

    /// `http://addr/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Waits for `/readyz` to answer 200.
    pub fn wait_ready(&self, timeout: Duration) -> &Self {
        let deadline = Instant::now() + timeout;
        let client = reqwest::blocking::Client::new();
        loop {
            if let Ok(r) = client.get(self.url("/readyz")).send() {
                if r.status() == 200 {
                    return self;
                }
                let body = r.text().unwrap_or_default();
                if body.contains("\"status\":\"failed\"") {
                    panic!("a model failed to load: {body}\nlogs:\n{}", self.log_text());
                }
            }
            if Instant::now() > deadline {
                let body = client.get(self.url("/readyz")).send().and_then(|r| r.text()).unwrap_or_default();
                panic!("not ready after {timeout:?}: {body}\nlogs:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Everything the daemon logged so far.
    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status();
    }

    /// `kill -9`: no drain, no last commit.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the process to exit after its drain (at most `timeout`).
    pub fn stop(&mut self, timeout: Duration) -> std::process::ExitStatus {
        self.signal("TERM");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "did not exit within {timeout:?} of SIGTERM:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A real `redis-server` (Debian's package) on a free port, without persistence, so a
/// restart is a store that lost its data. Killed when dropped.
pub struct RedisServer {
    child: Child,
    pub port: u16,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_on(free_port())
    }

    /// Starts on `port` and waits until it answers `PING`.
    pub fn start_on(port: u16) -> RedisServer {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run redis-server (scripts/test.sh installs Debian's redis-server)");
        let server = RedisServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while server.cli(&["PING"]).trim() != "PONG" {
            assert!(Instant::now() < deadline, "redis-server did not answer on port {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs `redis-cli` against this server; its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output().expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A blocking client with a generous timeout.
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

/// POSTs JSON and returns (status, parsed body).
pub fn post_json(d: &Daemon, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = client().post(d.url(path)).json(body).send().expect("request");
    let status = r.status().as_u16();
    let text = r.text().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| serde_json::Value::String(text)))
}

/// GETs and returns (status, parsed body).
pub fn get_json(d: &Daemon, path: &str) -> (u16, serde_json::Value) {
    let r = client().get(d.url(path)).send().expect("request");
    let status = r.status().as_u16();
    let text = r.text().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| serde_json::Value::String(text)))
}

/// Asserts an OpenAI-shaped JSON error with this status and code.
pub fn assert_error(status: u16, body: &serde_json::Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "body: {body}");
    assert_eq!(body["error"]["code"], want_code, "body: {body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "body: {body}");
}

/// Asserts a text-embeddings-inference-shaped JSON error (`{"error", "error_type"}`) with
/// this status and type; returns the message.
pub fn assert_tei_error(status: u16, body: &serde_json::Value, want_status: u16, want_type: &str) -> String {
    assert_eq!(status, want_status, "body: {body}");
    assert_eq!(body["error_type"], want_type, "body: {body}");
    let message = body["error"].as_str().unwrap_or_default().to_string();
    assert!(!message.is_empty(), "body: {body}");
    message
}

/// A fixture file's path.
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// Copies a model folder (for tests that damage files).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

/// The Python the test set-up prepared (`scripts/test.sh`: numpy, gguf, openai), or
/// `python3` when the tests run without it.
pub fn test_python() -> PathBuf {
    std::env::var_os("TEST_PYTHON").or_else(|| std::env::var_os("OPENAI_CLIENT_PYTHON")).map(PathBuf::from).unwrap_or_else(|| "python3".into())
}

static STANDINS: Mutex<()> = Mutex::new(());

/// Runs `scripts/standins.py ARGS OUT` once per distinct set of arguments and generator
/// version, keeping the output under cargo's temporary folder for later runs. Returns OUT.
pub fn standin(kind: &str, args: &[&str]) -> PathBuf {
    let _one_at_a_time = STANDINS.lock().unwrap_or_else(|e| e.into_inner());
    let script = root().join("scripts/standins.py");
    let source = std::fs::read(&script).expect("read scripts/standins.py");
    let key = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(&source);
        h.update(kind.as_bytes());
        for a in args {
            h.update(b"\0");
            h.update(a.as_bytes());
        }
        hex::encode(h.finalize())[..16].to_string()
    };
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("standins").join(format!("{kind}-{key}"));
    let done = out.with_extension("complete");
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&out);
        let status = Command::new(test_python())
            .arg(&script)
            .arg(kind)
            .arg(&out)
            .args(args)
            .current_dir(root())
            .stdout(Stdio::null())
            .status()
            .expect("run scripts/standins.py (the test Python needs numpy and gguf: scripts/test.sh installs them)");
        assert!(status.success(), "scripts/standins.py {kind} {args:?} failed");
        std::fs::write(&done, b"").unwrap();
    }
    out
}

/// A 2-layer TinyLlama-1.1B-Chat-shaped GGUF (real widths, vocabulary and template) in
/// `mix` (`q4_k_m`, `q8_0`, `q5_k_m`, `f16`).
pub fn tinyllama_standin(mix: &str) -> PathBuf {
    let vocab = fixture("vocab/ggml-vocab-llama-spm.gguf").display().to_string();
    let dir = standin("tinyllama", &["--vocab", &vocab, "--layers", "2", "--types", mix]);
    dir.join(format!("tinyllama-1.1b-chat-standin-2l.{}.gguf", mix.to_uppercase()))
}

/// `edgenode models pin NAME --kind KIND --version VERSION --dir DIR`: a manifest entry.
pub fn pin(name: &str, kind: &str, dir: &Path) -> String {
    let out = Command::new(binary())
        .args(["models", "pin", name, "--kind", kind, "--version", "0.0.1-standin", "--dir"])
        .arg(dir)
        .current_dir(root())
        .env_remove("EDGENODE_CONFIG")
        .output()
        .expect("run edgenode models pin");
    assert!(out.status.success(), "models pin failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Two real processes for routing tests. B: the "cloud", an edgenode that serves only SmolLM2.
pub fn start_cloud(addr: Option<String>) -> Daemon {
    let d = Daemon::start(Options { config: Some("[[models]]\nname = \"smollm2\"\nkind = \"generate\"\n".into()), addr, ..Default::default() });
    d.wait_ready(Duration::from_secs(180));
    d
}

pub fn toml_list(items: &[&str]) -> String {
    format!("[{}]", items.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", "))
}

/// A: the edge node, with B as its upstream and the default router's examples.
pub fn start_edge(cloud: &Daemon, extra: &str, smollm2: &str) -> Daemon {
    let config = format!(
        "[upstream]\nbase_url = \"http://{}/v1\"\nmodel = \"smollm2\"\ncircuit_failures = 2\ncircuit_open_s = 1\n\
         first_byte_timeout_ms = 10000\n\n[routing]\nedge_timeout_ms = 10000\n{extra}\n\n\
         [[models]]\nname = \"minilm\"\nkind = \"embed\"\n\n\
         [[models]]\nname = \"router\"\nkind = \"classify\"\nembedder = \"minilm\"\ntemperature = 0.05\n\
         [models.labels]\nedge = {}\ncloud = {}\n\n\
         [[models]]\nname = \"smollm2\"\nkind = \"generate\"\n{smollm2}\n",
        cloud.addr,
        toml_list(edgenode::config::ROUTER_EDGE),
        toml_list(edgenode::config::ROUTER_CLOUD),
    );
    let d = Daemon::start(Options { config: Some(config), ..Default::default() });
    d.wait_ready(Duration::from_secs(180));
    d
}

/// Reads an SSE response into its JSON payloads (stopping at `[DONE]`, which must come last).
pub fn sse_events(response: reqwest::blocking::Response) -> Vec<serde_json::Value> {
    assert_eq!(response.status(), 200);
    let mut events = Vec::new();
    let mut done = false;
    for line in BufReader::new(response).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else { continue };
        assert!(!done, "data after [DONE]");
        if data == "[DONE]" {
            done = true;
            continue;
        }
        events.push(serde_json::from_str(data).unwrap());
    }
    assert!(done, "stream did not end with [DONE]");
    events
}

/// Runs the client script `tests/SCRIPT ARGS` with `python` (the interpreter scripts/test.sh
/// prepared for it); the script exits non-zero on a failure, which fails the test with its
/// output. No Hugging Face token reaches it: the clients talk to the node only.
pub fn run_client_script(python: &str, script: &str, args: &[String]) {
    let out = Command::new(python)
        .arg(root().join("tests").join(script))
        .args(args)
        .env_remove("HF_TOKEN")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e} (run the suite with scripts/test.sh)"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "{script} failed (interpreter {python}):\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
}
