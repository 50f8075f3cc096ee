//! The deployment files agree with the daemon they deploy: fly.toml (the CPU deployment),
//! fly.gpu.toml (the GPU variant) and the Dockerfile name the port, model store, readiness
//! and metrics paths, stop signal and timeouts of edgenode's own defaults, and Fly's
//! concurrency limits follow edgenode's admission limits. Change one side without the other
//! and this fails, naming the file and the value.

use std::path::PathBuf;
use std::time::Duration;

use edgenode::config::{Config, ModelKind, ENV_PREFIX};
use edgenode::encoder::{DEFAULT_MAX_CONCURRENT_INPUTS, INPUTS_PER_CHUNK};
use edgenode::generate::{DEFAULT_MAX_SEQUENCES, DEFAULT_MAX_WAITING};
use figment::providers::Serialized;
use figment::Figment;

/// Seconds from start to `/readyz` 200 with both default models already in the store:
/// 3.2 s measured on 2026-11-29 on the project's 2-core machine while it was building.
const MEASURED_COLD_START_S: f64 = 3.2;
/// The same on a first start that downloads both default model packages (181 MB) with pip
/// and verifies them: 11.5 s measured the same day.
const MEASURED_FIRST_START_S: f64 = 11.5;
/// How many times slower than that a platform's first start may be (a slower path to the
/// package index, a busier host) before its readiness check's grace period runs out.
const FIRST_START_MARGIN: f64 = 4.0;
/// The longest kill timeout Fly.io accepts.
const FLY_MAX_KILL_TIMEOUT: Duration = Duration::from_secs(300);
/// Where every deployment keeps the model store: a volume mounted there.
const STORE: &str = "/data/models";
/// Every Fly configuration: the default models on CPU, the GPU variant, the card's models.
const FLY_FILES: [&str; 3] = ["fly.toml", "fly.gpu.toml", "fly.card.toml"];

fn read(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn fly(name: &str) -> toml::Table {
    read(name).parse::<toml::Table>().unwrap_or_else(|e| panic!("{name} is not valid TOML: {e}"))
}

/// `table.a.b.c`, or a failure naming the file and the key.
fn at<'a>(file: &str, table: &'a toml::Table, path: &str) -> &'a toml::Value {
    let mut parts = path.split('.');
    let first = parts.next().unwrap_or_default();
    let mut value = table.get(first).unwrap_or_else(|| panic!("{file}: `{path}` is missing"));
    for part in parts {
        value = value.get(part).unwrap_or_else(|| panic!("{file}: `{path}` is missing"));
    }
    value
}

fn string<'a>(file: &str, table: &'a toml::Table, path: &str) -> &'a str {
    at(file, table, path).as_str().unwrap_or_else(|| panic!("{file}: `{path}` is not a string"))
}

fn integer(file: &str, table: &toml::Table, path: &str) -> u64 {
    let v = at(file, table, path).as_integer().unwrap_or_else(|| panic!("{file}: `{path}` is not an integer"));
    u64::try_from(v).unwrap_or_else(|_| panic!("{file}: `{path}` is negative"))
}

/// An array of tables (`[[metrics]]`); a single table (`[metrics]`) counts as one.
fn tables<'a>(file: &str, table: &'a toml::Table, path: &str) -> Vec<&'a toml::Table> {
    match at(file, table, path) {
        toml::Value::Array(items) => {
            items.iter().map(|v| v.as_table().unwrap_or_else(|| panic!("{file}: `{path}` holds something other than tables"))).collect()
        }
        toml::Value::Table(t) => vec![t],
        _ => panic!("{file}: `{path}` is not a table"),
    }
}

/// A Fly duration: an integer of seconds, or Go's notation ("45s", "2m", "1m30s", "500ms").
fn duration(file: &str, table: &toml::Table, path: &str) -> Duration {
    match at(file, table, path) {
        toml::Value::Integer(n) => Duration::from_secs(u64::try_from(*n).unwrap_or_else(|_| panic!("{file}: `{path}` < 0"))),
        toml::Value::String(s) => go_duration(s).unwrap_or_else(|| panic!("{file}: `{path}` = {s:?} is not a duration")),
        _ => panic!("{file}: `{path}` is neither seconds nor a duration string"),
    }
}

fn go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (number, tail) = rest.split_at(digits);
        let number: f64 = number.parse().ok()?;
        let unit_len = tail.find(|c: char| c.is_ascii_digit()).unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return None,
        };
        total += Duration::from_secs_f64(number * scale);
        rest = tail;
    }
    Some(total)
}

/// Feeds `EDGENODE_*` variables through the same key mapping as the daemon's environment
/// provider (`__` nests, keys lowercased) on top of the defaults: an unknown key stops
/// edgenode's start-up, so it fails here first.
fn assert_real_config_keys(source: &str, env: &[(String, String)]) -> Config {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    for (key, value) in env {
        let Some(rest) = key.strip_prefix(ENV_PREFIX) else { continue };
        // `EDGENODE_CONFIG` names the config file (the `--config` flag), not a key.
        if rest == "CONFIG" {
            continue;
        }
        let path = rest.split("__").map(str::to_ascii_lowercase).collect::<Vec<_>>().join(".");
        let value: figment::value::Value = value.parse().unwrap_or_else(|never| match never {});
        figment = figment.merge(Serialized::default(&path, value));
    }
    let config: Config = figment.extract().unwrap_or_else(|e| panic!("{source}: edgenode would refuse its environment: {e}"));
    config.validate().unwrap_or_else(|e| panic!("{source}: edgenode would refuse its environment: {e}"));
    config
}

/// What edgenode admits with its default config, in requests:
/// (requests of the largest size every embed/classify model admits at once,
///  generation requests running at once, generation requests running or waiting).
fn admission() -> (usize, usize, usize) {
    let config = Config::default();
    let encoders = config.models.iter().filter(|m| matches!(m.kind, ModelKind::Embed | ModelKind::Classify));
    let full_requests = encoders
        .map(|m| m.max_concurrent_inputs.unwrap_or(DEFAULT_MAX_CONCURRENT_INPUTS) / config.limits.max_inputs.min(INPUTS_PER_CHUNK))
        .min()
        .expect("the default config serves an embed model");
    let generators: Vec<_> = config.models.iter().filter(|m| m.kind == ModelKind::Generate).collect();
    assert!(!generators.is_empty(), "the default config serves a generate model");
    let running = generators.iter().map(|m| m.max_concurrent_sequences.unwrap_or(DEFAULT_MAX_SEQUENCES)).min().unwrap_or(0);
    let admitted = generators
        .iter()
        .map(|m| m.max_concurrent_sequences.unwrap_or(DEFAULT_MAX_SEQUENCES) + m.max_waiting.unwrap_or(DEFAULT_MAX_WAITING))
        .min()
        .unwrap_or(0);
    (full_requests, running, admitted)
}

fn default_port() -> u16 {
    Config::default().server.addr.port()
}

#[test]
fn fly_service_port_volume_and_env_match_the_daemon() {
    let port = u64::from(default_port());
    for file in FLY_FILES {
        let t = fly(file);
        assert_eq!(integer(file, &t, "http_service.internal_port"), port, "{file}: internal_port vs server.addr");

        let mounts = tables(file, &t, "mounts");
        assert_eq!(mounts.len(), 1, "{file}: one volume, the model store");
        let destination = mounts[0].get("destination").and_then(|v| v.as_str());
        assert_eq!(destination, Some(STORE), "{file}: the volume holds the model store");

        let env: Vec<(String, String)> = at(file, &t, "env")
            .as_table()
            .unwrap_or_else(|| panic!("{file}: [env] is not a table"))
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_else(|| panic!("{file}: env {k} is not a string")).to_string()))
            .collect();
        let config = assert_real_config_keys(file, &env);
        assert_eq!(config.store.dir, PathBuf::from(STORE), "{file}: EDGENODE_STORE__DIR vs the mounted volume");
        assert!(env.iter().any(|(k, _)| k.starts_with("OTEL_")), "{file}: sets the OpenTelemetry variables");
    }
}

#[test]
fn fly_stops_with_sigterm_after_the_drain_grace_period() {
    let grace = Duration::from_secs(Config::default().server.drain_grace_s);
    for file in FLY_FILES {
        let t = fly(file);
        assert_eq!(string(file, &t, "kill_signal"), "SIGTERM", "{file}: edgenode drains on SIGTERM");
        let kill = duration(file, &t, "kill_timeout");
        assert!(kill > grace, "{file}: kill_timeout {kill:?} must be longer than server.drain_grace_s {grace:?}");
        assert!(kill <= FLY_MAX_KILL_TIMEOUT, "{file}: kill_timeout {kill:?} is over Fly's limit");
    }
}

#[test]
fn fly_checks_readiness_with_room_for_a_first_start() {
    let first_start = Duration::from_secs_f64(MEASURED_FIRST_START_S * FIRST_START_MARGIN);
    for file in FLY_FILES {
        let t = fly(file);
        let checks = tables(file, &t, "http_service.checks");
        let ready: Vec<_> = checks.iter().filter(|c| c.get("path").and_then(|p| p.as_str()) == Some("/readyz")).collect();
        assert_eq!(ready.len(), 1, "{file}: one check on /readyz");
        let check = ready[0];
        let method = check.get("method").and_then(|m| m.as_str()).unwrap_or("GET");
        assert!(method.eq_ignore_ascii_case("GET"), "{file}: /readyz is a GET route");
        let grace = match check.get("grace_period") {
            Some(toml::Value::String(s)) => go_duration(s).unwrap_or_else(|| panic!("{file}: grace_period {s:?}")),
            Some(toml::Value::Integer(n)) => Duration::from_secs(u64::try_from(*n).unwrap_or(0)),
            _ => panic!("{file}: the /readyz check needs a grace_period"),
        };
        assert!(
            grace >= first_start,
            "{file}: grace_period {grace:?} must cover a first start that downloads the models \
             ({MEASURED_FIRST_START_S} s measured, x{FIRST_START_MARGIN}), not only a warm one \
             ({MEASURED_COLD_START_S} s)"
        );
    }
}

/// Fly scrapes `/metrics` from the daemon's own metrics listener (`server.metrics_addr`),
/// which is not the public service's port, and the public port no longer answers it.
#[test]
fn fly_scrapes_metrics_from_the_daemons_private_listener() {
    let public = u64::from(default_port());
    for file in FLY_FILES {
        let t = fly(file);
        let metrics = tables(file, &t, "metrics");
        assert_eq!(metrics.len(), 1, "{file}: one [[metrics]] table");
        assert_eq!(metrics[0].get("path").and_then(|p| p.as_str()), Some("/metrics"), "{file}: metrics path");
        let metrics_port = metrics[0].get("port").and_then(|p| p.as_integer()).and_then(|p| u64::try_from(p).ok());
        let env: Vec<(String, String)> = at(file, &t, "env")
            .as_table()
            .unwrap_or_else(|| panic!("{file}: [env] is not a table"))
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
            .collect();
        let config = assert_real_config_keys(file, &env);
        let listener = config.server.metrics_addr.unwrap_or_else(|| panic!("{file}: sets EDGENODE_SERVER__METRICS_ADDR"));
        assert_eq!(metrics_port, Some(u64::from(listener.port())), "{file}: Fly scrapes server.metrics_addr's port");
        assert_ne!(metrics_port, Some(public), "{file}: metrics are not on the public service's port");
        assert!(!config.server.metrics_on_public_port(), "{file}: the public port does not answer /metrics");
    }
}

#[test]
fn fly_concurrency_limits_follow_edgenodes_admission_limits() {
    let (full_embed_requests, running, admitted) = admission();
    let hard_expected = full_embed_requests.min(admitted) as u64;
    for file in FLY_FILES {
        let t = fly(file);
        assert_eq!(string(file, &t, "http_service.concurrency.type"), "requests", "{file}: edgenode admits requests");
        let soft = integer(file, &t, "http_service.concurrency.soft_limit");
        let hard = integer(file, &t, "http_service.concurrency.hard_limit");
        assert!(soft <= hard, "{file}: soft_limit {soft} > hard_limit {hard}");
        assert_eq!(soft, running as u64, "{file}: soft_limit = the generation requests one node runs at once (max_concurrent_sequences)");
        assert_eq!(
            hard, hard_expected,
            "{file}: hard_limit = min(max_concurrent_inputs / min(limits.max_inputs, INPUTS_PER_CHUNK) = {full_embed_requests}, \
             max_concurrent_sequences + max_waiting = {admitted}): more and edgenode answers 429, fewer and it idles"
        );
    }
}

#[test]
fn fly_files_build_their_dockerfile_targets() {
    let dockerfile = dockerfile_stages();
    for (file, target) in [("fly.toml", "cpu"), ("fly.gpu.toml", "cuda"), ("fly.card.toml", "cpu")] {
        let t = fly(file);
        assert_eq!(string(file, &t, "build.build-target"), target, "{file}: build target");
        assert!(dockerfile.iter().any(|s| s.name == target), "{file}: the Dockerfile has no stage `{target}`");
    }
    let cpu = fly("fly.toml");
    let size = tables("fly.toml", &cpu, "vm")[0].get("size").and_then(|s| s.as_str()).unwrap_or_default().to_string();
    assert!(size.starts_with("performance-"), "fly.toml: a performance CPU VM, not {size:?}");

    let gpu = fly("fly.gpu.toml");
    let vm = tables("fly.gpu.toml", &gpu, "vm")[0];
    assert!(vm.get("gpu_kind").and_then(|g| g.as_str()).is_some_and(|g| !g.is_empty()), "fly.gpu.toml: [[vm]] gpu_kind");
    assert!(string("fly.gpu.toml", &gpu, "build.args.CUDA_COMPUTE_CAP").parse::<u32>().is_ok(), "fly.gpu.toml: CUDA_COMPUTE_CAP");
    assert!(read("fly.gpu.toml").contains("2026-08-01"), "fly.gpu.toml says what changed on 2026-08-01");
}

/// One `FROM ... AS name` stage of the Dockerfile: its instructions, continuation lines
/// joined and comments dropped.
struct Stage {
    name: String,
    instructions: Vec<String>,
}

impl Stage {
    /// The arguments of every instruction of this kind (`EXPOSE`, `ENV` ...).
    fn args(&self, keyword: &str) -> Vec<&str> {
        self.instructions
            .iter()
            .filter_map(|i| {
                let (word, rest) = i.split_once(char::is_whitespace)?;
                word.eq_ignore_ascii_case(keyword).then_some(rest.trim())
            })
            .collect()
    }

    /// `ENV` pairs (`KEY=value` form).
    fn env(&self) -> Vec<(String, String)> {
        self.args("ENV")
            .into_iter()
            .flat_map(str::split_whitespace)
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect()
    }
}

fn dockerfile_stages() -> Vec<Stage> {
    let text = read("Dockerfile");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                if !current.trim().is_empty() {
                    instructions.push(current.trim().to_string());
                }
                current.clear();
            }
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for instruction in instructions {
        let words: Vec<&str> = instruction.split_whitespace().collect();
        if words.first().is_some_and(|w| w.eq_ignore_ascii_case("FROM")) {
            let name = match words.iter().position(|w| w.eq_ignore_ascii_case("AS")) {
                Some(i) => words.get(i + 1).copied().unwrap_or_default().to_string(),
                None => String::new(),
            };
            stages.push(Stage { name, instructions: Vec::new() });
        } else if let Some(stage) = stages.last_mut() {
            stage.instructions.push(instruction);
        }
    }
    stages
}

#[test]
fn dockerfile_final_images_match_the_daemon() {
    let port = default_port();
    let stages = dockerfile_stages();
    assert_eq!(stages.last().map(|s| s.name.as_str()), Some("cpu"), "a plain `docker build .` builds the CPU image");
    for target in ["cpu", "cuda"] {
        let stage = stages.iter().find(|s| s.name == target).unwrap_or_else(|| panic!("Dockerfile: no `{target}` stage"));
        let exposed: Vec<&str> = stage.args("EXPOSE").into_iter().flat_map(str::split_whitespace).collect();
        assert!(
            exposed.iter().any(|p| p.split('/').next() == Some(port.to_string().as_str())),
            "Dockerfile `{target}`: EXPOSE {exposed:?} lacks server.addr's port {port}"
        );
        assert_eq!(stage.args("STOPSIGNAL"), vec!["SIGTERM"], "Dockerfile `{target}`: edgenode drains on SIGTERM");
        let volumes = stage.args("VOLUME").join(" ");
        assert!(volumes.contains(&format!("\"{STORE}\"")) || volumes.split_whitespace().any(|v| v == STORE), "Dockerfile `{target}`: VOLUME {STORE}");

        let env = stage.env();
        let config = assert_real_config_keys(&format!("Dockerfile `{target}`"), &env);
        assert_eq!(config.store.dir, PathBuf::from(STORE), "Dockerfile `{target}`: EDGENODE_STORE__DIR vs VOLUME");

        let health = stage.args("HEALTHCHECK").join(" ");
        assert!(health.contains(&format!(":{port}/readyz")), "Dockerfile `{target}`: HEALTHCHECK asks /readyz on port {port}: {health}");
        let start_period = health
            .split_whitespace()
            .find_map(|w| w.strip_prefix("--start-period="))
            .and_then(go_duration)
            .unwrap_or_else(|| panic!("Dockerfile `{target}`: HEALTHCHECK needs --start-period"));
        let cpu_fly = fly("fly.toml");
        let fly_grace = tables("fly.toml", &cpu_fly, "http_service.checks")
            .iter()
            .find_map(|c| c.get("grace_period").and_then(|g| g.as_str()).and_then(go_duration))
            .expect("fly.toml: grace_period");
        assert_eq!(start_period, fly_grace, "Dockerfile `{target}`: HEALTHCHECK --start-period vs fly.toml's grace_period");

        let cmd = stage.args("CMD").join(" ");
        assert!(cmd.contains("\"serve\""), "Dockerfile `{target}`: CMD serves: {cmd}");
    }
    let cuda = stages.iter().find(|s| s.name == "build-cuda").expect("Dockerfile: a `build-cuda` stage");
    assert!(
        cuda.args("ARG").iter().any(|a| a.starts_with("CUDA_COMPUTE_CAP")),
        "Dockerfile: the CUDA build takes CUDA_COMPUTE_CAP (there is no GPU during docker build)"
    );
}

/// fly.card.toml serves the card's models: its config is in the image, reads the manifest
/// beside it, serves TinyLlama (also as routing's local model) and bge-small (also as the
/// router's embedder) at the public pins, and its volume and first-start grace period are
/// sized for those files.
#[test]
fn fly_card_serves_the_cards_models_at_their_pins() {
    use edgenode::config::{FileSource, Overrides};
    use edgenode::models::manifest::Manifest;
    use edgenode::models::registry::Registry;

    let t = fly("fly.card.toml");
    let config_path = string("fly.card.toml", &t, "env.EDGENODE_CONFIG");
    let cpu = dockerfile_stages().into_iter().find(|s| s.name == "cpu").expect("Dockerfile: a `cpu` stage");
    let copied = cpu.args("COPY").iter().any(|c| c.split_whitespace().collect::<Vec<_>>() == ["deploy/card/", "/etc/edgenode/card/"]);
    assert!(copied, "Dockerfile `cpu`: COPY deploy/card/ /etc/edgenode/card/ (fly.card.toml's EDGENODE_CONFIG is {config_path})");
    let local =
        PathBuf::from("deploy/card").join(config_path.strip_prefix("/etc/edgenode/card/").expect("the card config lives in /etc/edgenode/card/"));

    let env = figment::providers::Env::prefixed("EDGENODE_TEST_NOTHING_");
    let config = Config::load_from(&FileSource::Explicit(local.clone()), &Overrides::default(), env).expect("the card config loads");
    let manifest_path = config.store.manifest.clone().expect("the card config names its manifest");
    assert_eq!(
        manifest_path.canonicalize().ok(),
        PathBuf::from("deploy/card/manifest.toml").canonicalize().ok(),
        "a relative manifest is read from the config's folder, not {}",
        manifest_path.display()
    );
    let manifest = Manifest::load(Some(&manifest_path)).expect("the card manifest parses");
    let registry = Registry::build(&config, &manifest).expect("every card model has its manifest entry");
    assert_eq!(config.routing.local_model, "tinyllama");
    let router = config.models.iter().find(|m| m.name == config.routing.classifier).expect("the router");
    assert_eq!(router.embedder.as_deref(), Some("bge-small"));

    let tiny = registry.get("tinyllama").and_then(|s| s.entry()).expect("tinyllama");
    assert_eq!(tiny.source.hf.as_deref(), Some("TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF"));
    assert_eq!(tiny.source.revision.as_deref(), Some("52e7645ba7c309695bec7ac98f4f005b139cf465"));
    assert_eq!(tiny.files[0].path, "tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf");
    assert_eq!(tiny.files[0].sha256.as_deref(), Some("9fecc3b3cd76bba89d504f29b616eedf7da85b96540e490ca5824d3f7d2776a0"));
    assert_eq!(tiny.files[0].size, Some(668_788_096));
    let bge = registry.get("bge-small").and_then(|s| s.entry()).expect("bge-small");
    assert_eq!(bge.source.hf.as_deref(), Some("BAAI/bge-small-en-v1.5"));
    assert_eq!(bge.source.revision.as_deref(), Some("5c38ec7c405ec4b44b94cc5a9bb96e735b38267a"));
    let sha = |p: &str| bge.files.iter().find(|f| f.path == p).and_then(|f| f.sha256.clone());
    assert_eq!(sha("model.safetensors").as_deref(), Some("3c9f31665447c8911517620762200d2245a2518d6e7208acc78cd9db317e21ad"));
    assert_eq!(sha("tokenizer.json").as_deref(), Some("d241a60d5e8f04cc1b2b3e9ef7a4921b27bf526d9f6050ab90f9267a1f9e5c66"));
    assert_eq!(sha("config.json").as_deref(), Some("094f8e891b932f2000c92cfc663bac4c62069f5d8af5b5278c4306aef3084750"));
    for file in edgenode::encoder::files::READS {
        assert!(bge.files.iter().any(|f| f.path == *file), "the bge-small entry pins {file}, which the loader reads");
    }

    // The volume holds every file; the first start's grace period covers downloading them
    // at 5 MB/s.
    let bytes: u64 = [&tiny, &bge].iter().flat_map(|e| e.files.iter()).filter_map(|f| f.size).sum();
    let volume = tables("fly.card.toml", &t, "mounts")[0].get("initial_size").and_then(|v| v.as_str()).unwrap_or_default();
    let gb: u64 = volume.trim_end_matches("gb").parse().unwrap_or_else(|_| panic!("fly.card.toml: initial_size {volume:?} in gb"));
    assert!(gb * 1_000_000_000 >= bytes + bytes / 4, "fly.card.toml: a {volume} volume for {bytes} bytes of models");
    let grace = tables("fly.card.toml", &t, "http_service.checks")
        .iter()
        .find_map(|c| c.get("grace_period").and_then(|g| g.as_str()).and_then(go_duration))
        .expect("fly.card.toml: grace_period");
    assert!(grace.as_secs_f64() >= bytes as f64 / 5e6, "fly.card.toml: grace_period {grace:?} for a first start downloading {bytes} bytes");
}

#[test]
fn go_durations_parse_as_fly_writes_them() {
    assert_eq!(go_duration("45s"), Some(Duration::from_secs(45)));
    assert_eq!(go_duration("2m"), Some(Duration::from_secs(120)));
    assert_eq!(go_duration("1m30s"), Some(Duration::from_secs(90)));
    assert_eq!(go_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(go_duration("soon"), None);
    assert_eq!(go_duration(""), None);
}
