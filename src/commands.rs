//! What each command-line command does.

use std::process::ExitCode;

use anyhow::{bail, Context};

use crate::cli::{Command, KernelsCommand, ModelsCommand};
use crate::config::{Config, ModelKind};
use crate::models::download::Progress;
use crate::models::fetch::{fetch, FetchOptions, Fetched};
use crate::models::manifest::{FileEntry, Manifest, ManifestEntry, Source};
use crate::models::probe::Probe;
use crate::models::sync::{self, Drift, Pin};
use crate::models::verify::{all_present, sha256_file, verify_model, Recorded};

/// Runs one command to completion.
pub async fn run(command: Command, config: Config) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve { .. } => crate::server::serve(config).await.map(|_| ExitCode::SUCCESS),
        Command::Models { command } => tokio::task::spawn_blocking(move || models(command, &config)).await.context("models command panicked")?,
        Command::Kernels { command } => tokio::task::spawn_blocking(move || kernels(command)).await.context("kernels command panicked")?,
    }
}

/// `edgenode kernels verify`: one line per compared configuration, then a verdict.
fn kernels(command: KernelsCommand) -> anyhow::Result<ExitCode> {
    use crate::encoder::twins::{verify, TwinError, TOLERANCE};
    let KernelsCommand::Verify { device } = command;
    let ordinal = match device.as_str() {
        "cuda" => 0,
        d => d.strip_prefix("cuda:").and_then(|n| n.parse().ok()).with_context(|| format!("--device {d:?}: expected cuda or cuda:N"))?,
    };
    let cases = match verify(ordinal) {
        Ok(cases) => cases,
        Err(e @ TwinError::Unavailable(_)) => {
            eprintln!("edgenode: {e}");
            return Ok(ExitCode::from(2));
        }
        Err(e) => bail!("{e}"),
    };
    let mut failed = 0;
    for case in &cases {
        println!("{:4} {:.2e}  {}", if case.passed() { "ok" } else { "FAIL" }, case.max_rel_err, case.name);
        failed += usize::from(!case.passed());
    }
    let worst = cases.iter().map(|c| c.max_rel_err).fold(0.0f32, f32::max);
    println!("{} of {} configurations within {TOLERANCE:.0e} of their Rust twins on {device} (worst {worst:.2e})", cases.len() - failed, cases.len());
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn models(command: ModelsCommand, config: &Config) -> anyhow::Result<ExitCode> {
    match command {
        ModelsCommand::Fetch { names } => {
            let manifest = Manifest::load(config.store.manifest.as_deref())?;
            let entries = select(&manifest, config, &names)?;
            let mut failed = false;
            for entry in entries {
                let started = std::time::Instant::now();
                let bar = progress_bar(&entry.name);
                let progress = |p: &Progress| {
                    if let Some(bar) = &bar {
                        bar.set_length(p.bytes_total);
                        bar.set_position(p.bytes_done);
                        bar.set_message(p.file.clone());
                    }
                };
                let fetched = fetch(entry, &config.store.dir, &FetchOptions { python: &config.store.python, progress: &progress });
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                }
                match fetched {
                    Ok(f) => {
                        let how = if matches!(f, Fetched::Downloaded(_)) { "fetched" } else { "present" };
                        let dir = entry.dir(&config.store.dir);
                        println!(
                            "{how:8} {:<12} {}@{} digest {} in {} ({:.1} s)",
                            entry.name,
                            entry.name,
                            entry.version,
                            f.verified().digest,
                            dir.display(),
                            started.elapsed().as_secs_f64()
                        );
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        failed = true;
                    }
                }
            }
            Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        ModelsCommand::Verify { manifest, against, names } => {
            let path = manifest.as_deref().or(config.store.manifest.as_deref());
            let manifest = Manifest::load(path)?;
            let entries = select(&manifest, config, &names)?;
            let mut failed = false;
            let mut local = std::collections::BTreeMap::new();
            for entry in entries {
                let dir = entry.dir(&config.store.dir);
                match verify_model(entry, &dir) {
                    Ok(v) => {
                        println!("ok       {:<12} {}@{} digest {}", entry.name, entry.name, entry.version, v.digest);
                        local.insert(entry.name.clone(), Pin { version: entry.version.clone(), digest: v.digest });
                    }
                    Err(e) => {
                        println!("MISMATCH {e}");
                        failed = true;
                    }
                }
            }
            if let Some(source) = against {
                let timeout = std::time::Duration::from_secs(config.sync.timeout_s.max(1));
                let expected = tokio::runtime::Handle::current().block_on(sync::fetch(&source, timeout));
                let expected = match expected {
                    Ok(m) => m,
                    Err(e) => {
                        eprintln!("cannot compare: {e}");
                        return Ok(ExitCode::from(2));
                    }
                };
                let drift = sync::compare(&local, &expected);
                for (name, m) in &drift {
                    let show = |p: &Option<Pin>| {
                        p.as_ref().map(|p| format!("{}+{}", p.version, &p.digest[..12.min(p.digest.len())])).unwrap_or_else(|| "-".into())
                    };
                    println!("{:<8} {:<12} local {:<24} expected {}", m.status.as_str(), name, show(&m.local), show(&m.expected));
                }
                if drift.values().any(|m| matches!(m.status, Drift::Stale | Drift::Missing)) {
                    failed = true;
                }
            }
            Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        ModelsCommand::Pin { name, kind, version, dir, hf, description, manifest, files } => {
            let kind = parse_kind(&kind)?;
            let (source, files) = match (dir, hf) {
                (Some(dir), None) => pin_dir(dir, files)?,
                (None, Some(spec)) => pin_hub(&spec, kind, files)?,
                _ => bail!("give either --dir or --hf"),
            };
            let entry = ManifestEntry { name: name.clone(), kind, version, description, source, files, probe: None };
            let entry = entry_toml(entry)?;
            match manifest {
                None => print!("{entry}"),
                Some(path) => {
                    add_to_manifest(&path, &entry)?;
                    println!("added {name} to {}", path.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::Rollback { name, url } => {
            let answer = NodeClient::new(&url)?.call(&format!("/models/{name}/rollback"), Some(serde_json::json!({})))?;
            println!(
                "{name} now serves {}; the version rolled back from is held until the central manifest names another",
                answer["serving"].as_str().unwrap_or("?")
            );
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::Probe { name, url, manifest, inputs, min_cosine, prompt, tokens, min_match } => {
            let (entry_name, probe) = probe_from_node(&url, &name, inputs, min_cosine, prompt, tokens, min_match)?;
            let table = toml::to_string(&probe).context("cannot write the probe as TOML")?;
            match manifest {
                None => print!("[models.probe]\n{table}"),
                Some(path) => {
                    set_probe(&path, &entry_name, &probe)?;
                    println!("set the probe of {entry_name} in {}", path.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::List => {
            let manifest = Manifest::load(config.store.manifest.as_deref())?;
            println!("{:<12} {:<9} {:<10} {:<8} {:<8} DIGEST", "NAME", "KIND", "VERSION", "FILES", "SERVED");
            for e in &manifest.models {
                let present = if all_present(e, &e.dir(&config.store.dir)) { "present" } else { "missing" };
                let served = config.models.iter().any(|m| m.manifest_entry() == e.name);
                println!(
                    "{:<12} {:<9} {:<10} {:<8} {:<8} {}",
                    e.name,
                    e.kind.as_str(),
                    e.version,
                    present,
                    if served { "yes" } else { "no" },
                    e.digest()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Asks a running node for what its version of `name` answers now: a probe for the next one.
/// Returns the model's manifest entry name with the probe. An API key, if the node needs
/// one, comes from `EDGENODE_API_KEY`.
fn probe_from_node(
    url: &str,
    name: &str,
    inputs: Vec<String>,
    min_cosine: f32,
    prompt: String,
    tokens: u32,
    min_match: f32,
) -> anyhow::Result<(String, Probe)> {
    let node = NodeClient::new(url)?;
    let call = |path: &str, body: Option<serde_json::Value>| node.call(path, body);
    let info = call("/info", None)?;
    let model = info["models"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .with_context(|| format!("the node serves no model {name:?}"))?;
    let entry = model["manifest"]
        .as_str()
        .with_context(|| format!("model {name:?} has no manifest entry (a prototype classifier has no files to probe)"))?
        .to_string();
    let probe = match model["kind"].as_str() {
        Some("generate") => {
            let body = serde_json::json!({"model": name, "prompt": prompt, "max_tokens": tokens, "temperature": 0});
            let answer = call("/v1/completions", Some(body))?;
            let completion = answer["choices"][0]["text"].as_str().context("no completion text in the answer")?.to_string();
            Probe {
                inputs: vec![],
                vectors: vec![],
                min_cosine: None,
                prompt: Some(prompt),
                completion: Some(completion),
                min_match: Some(min_match),
            }
        }
        _ => {
            let inputs = if inputs.is_empty() {
                ["What is an edge node?", "The weather in Paris is mild in spring.", "def add(a, b): return a + b"].map(String::from).to_vec()
            } else {
                inputs
            };
            let vectors: Vec<Vec<f32>> = serde_json::from_value(call("/embed", Some(serde_json::json!({"model": name, "inputs": inputs})))?)
                .context("/embed did not answer one vector per input")?;
            Probe { inputs, vectors, min_cosine: Some(min_cosine), prompt: None, completion: None, min_match: None }
        }
    };
    Ok((entry, probe))
}

/// A running node's HTTP API, for the commands that act on one (`probe`, `rollback`). An API
/// key, if the node needs one, comes from `EDGENODE_API_KEY`.
struct NodeClient {
    base: String,
    client: reqwest::blocking::Client,
    key: Option<String>,
}

impl NodeClient {
    fn new(url: &str) -> anyhow::Result<NodeClient> {
        let client = reqwest::blocking::Client::builder().timeout(std::time::Duration::from_secs(600)).build()?;
        let key = std::env::var("EDGENODE_API_KEY").ok().filter(|k| !k.is_empty());
        Ok(NodeClient { base: url.trim_end_matches('/').to_string(), client, key })
    }

    /// GET (no body) or POST a JSON body; a non-2xx answer is an error with the node's message.
    fn call(&self, path: &str, body: Option<serde_json::Value>) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.base);
        let mut req = match &body {
            Some(b) => self.client.post(&url).json(b),
            None => self.client.get(&url),
        };
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        let r = req.send().with_context(|| format!("cannot reach {url}"))?;
        let status = r.status();
        let v: serde_json::Value = r.json().with_context(|| format!("{url} answered {status} without JSON"))?;
        if !status.is_success() {
            let message = v["error"]["message"].as_str().or(v["error"].as_str()).map(str::to_string).unwrap_or_else(|| v.to_string());
            bail!("{url} answered {status}: {message}");
        }
        Ok(v)
    }
}

/// Sets the probe of one entry of a manifest file, replacing the file once the result reads
/// as a manifest.
fn set_probe(path: &std::path::Path, entry: &str, probe: &Probe) -> anyhow::Result<()> {
    let mut manifest = Manifest::load(Some(path))?;
    let e = manifest.models.iter_mut().find(|m| m.name == entry).with_context(|| format!("{} has no entry {entry:?}", path.display()))?;
    e.probe = Some(probe.clone());
    // Written back as read, except that local source folders are now absolute.
    let text = toml::to_string(&manifest).context("cannot write the manifest as TOML")?;
    Manifest::parse(&text, &path.display().to_string())?;
    let tmp = path.with_extension("toml.partial");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

/// A progress bar on stderr when it is a terminal (logs every few seconds otherwise).
fn progress_bar(model: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal as _;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    let style = indicatif::ProgressStyle::with_template("{prefix:12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {wide_msg}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(model.to_string());
    Some(bar)
}

/// The named manifest entries, or those the config serves when none are named.
fn select<'m>(manifest: &'m Manifest, config: &Config, names: &[String]) -> anyhow::Result<Vec<&'m ManifestEntry>> {
    if names.is_empty() {
        let mut out: Vec<&ManifestEntry> = Vec::new();
        for m in &config.models {
            if let Some(e) = manifest.get(m.manifest_entry()) {
                if !out.iter().any(|o| o.name == e.name) {
                    out.push(e);
                }
            }
        }
        return Ok(out);
    }
    names
        .iter()
        .map(|n| {
            manifest.get(n).with_context(|| {
                let known: Vec<&str> = manifest.models.iter().map(|m| m.name.as_str()).collect();
                format!("no model {n:?} in the manifest (it has: {})", known.join(", "))
            })
        })
        .collect()
}

fn parse_kind(kind: &str) -> anyhow::Result<ModelKind> {
    Ok(match kind {
        "embed" => ModelKind::Embed,
        "classify" => ModelKind::Classify,
        "generate" => ModelKind::Generate,
        other => bail!("--kind {other:?}: one of embed, classify, generate"),
    })
}

/// `models pin --dir`: the files already on disk, each hashed.
fn pin_dir(dir: std::path::PathBuf, files: Vec<String>) -> anyhow::Result<(Source, Vec<FileEntry>)> {
    if !dir.is_dir() {
        bail!("--dir {}: not a folder", dir.display());
    }
    // Absolute, because a manifest reads relative folders from its own location.
    let dir = dir.canonicalize().with_context(|| format!("--dir {}", dir.display()))?;
    let mut paths = files;
    if paths.is_empty() {
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            for item in std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
                let path = item?.path();
                let ours = path.file_name().is_some_and(|n| n.to_string_lossy() == Recorded::FILE);
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_none_or(|e| e != "partial") && !ours {
                    let rel = path.strip_prefix(&dir)?.to_string_lossy().replace(std::path::MAIN_SEPARATOR, "/");
                    paths.push(rel);
                }
            }
        }
        paths.sort();
    }
    if paths.is_empty() {
        bail!("{} holds no files", dir.display());
    }
    let mut entries = Vec::with_capacity(paths.len());
    for path in paths {
        let file = dir.join(&path);
        let sha256 = sha256_file(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let size = std::fs::metadata(&file).map(|m| m.len()).ok();
        entries.push(FileEntry { path, sha256: Some(sha256), size });
    }
    Ok((Source { dir: Some(dir), ..Source::default() }, entries))
}

/// `models pin --hf ORG/REPO[@REVISION]`: the revision resolved to its commit, large files'
/// sha256 from the Hub's listing, small files downloaded and hashed (after checking them
/// against the git object id the listing gives).
fn pin_hub(spec: &str, kind: ModelKind, files: Vec<String>) -> anyhow::Result<(Source, Vec<FileEntry>)> {
    use crate::models::download::{download, Expected, FileRequest};
    use crate::models::hub::{Hub, HubSettings};
    let (repo, revision) = spec.split_once('@').unwrap_or((spec, "main"));
    if repo.split('/').count() != 2 || repo.split('/').any(str::is_empty) {
        bail!("--hf {spec:?}: expected ORG/REPO or ORG/REPO@REVISION");
    }
    let hub = Hub::new(HubSettings::from_env())?;
    let commit = hub.resolve_commit(repo, revision)?;
    let listing = hub.list_files(repo, &commit)?;
    let paths = if files.is_empty() { loader_files(kind, repo, &listing)? } else { files };
    let tmp = tempfile::tempdir().context("cannot create a temporary folder")?;
    let mut entries = Vec::with_capacity(paths.len());
    for path in paths {
        let Some(listed) = listing.iter().find(|l| l.path == path) else {
            let names: Vec<&str> = listing.iter().map(|l| l.path.as_str()).collect();
            bail!("{path} is not in {repo} at {commit} (it has: {})", names.join(", "));
        };
        let sha256 = match &listed.lfs_sha256 {
            Some(sha) => sha.clone(),
            None => {
                let dest = tmp.path().join(path.replace('/', "_"));
                let url = hub.file_url(repo, &commit, &path)?;
                let expected = Expected::GitBlob(listed.oid.clone());
                let req = FileRequest { url, token: hub.settings.token.as_deref(), dest: &dest, expected: &expected };
                download(hub.client(), &req, &mut |_| {}).map_err(|e| hub.explain(&e, repo, Some(&commit), Some(&path)))?
            }
        };
        entries.push(FileEntry { path, sha256: Some(sha256), size: Some(listed.size) });
    }
    let source = Source { hf: Some(repo.to_string()), revision: Some(commit), ..Source::default() };
    Ok((source, entries))
}

/// What the loader reads for a kind, as present in a repository's listing.
fn loader_files(kind: ModelKind, repo: &str, listing: &[crate::models::hub::HubFile]) -> anyhow::Result<Vec<String>> {
    let has = |p: &str| listing.iter().any(|l| l.path == p);
    match kind {
        ModelKind::Generate => {
            let ggufs: Vec<&str> = listing.iter().map(|l| l.path.as_str()).filter(|p| p.ends_with(".gguf")).collect();
            match ggufs.as_slice() {
                [one] => Ok(vec![one.to_string()]),
                [] => bail!("{repo} has no GGUF file; a generate model is one GGUF file"),
                many => bail!("{repo} has {} GGUF files: name the one to pin ({})", many.len(), many.join(", ")),
            }
        }
        ModelKind::Embed | ModelKind::Classify => {
            for required in ["config.json", "model.safetensors", "tokenizer.json"] {
                if !has(required) {
                    bail!("{repo} has no {required}, which an encoder needs (safetensors weights and a tokenizer.json)");
                }
            }
            Ok(crate::encoder::files::READS.iter().filter(|p| has(p)).map(|p| p.to_string()).collect())
        }
    }
}

/// The entry as manifest TOML, checked to read back as a manifest.
fn entry_toml(entry: ManifestEntry) -> anyhow::Result<String> {
    let text = toml::to_string(&Manifest { models: vec![entry] }).context("cannot write the entry as TOML")?;
    // What we print must load as a manifest; a blank line keeps appended entries apart.
    Manifest::parse(&text, "(the pinned entry)")?;
    Ok(format!("{text}\n"))
}

/// Appends a pinned entry to a manifest file (a new file starts as the built-in manifest),
/// checking that the result still reads as a manifest (a name listed twice does not), and
/// replacing the file only once it does.
fn add_to_manifest(path: &std::path::Path, entry: &str) -> anyhow::Result<()> {
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => crate::models::manifest::BUILT_IN.to_string(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let text = format!("{}\n{entry}", existing.trim_end());
    Manifest::parse(&text, &path.display().to_string())?;
    let tmp = path.with_extension("toml.partial");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}
