//! What each command-line command does.

use std::process::ExitCode;

use anyhow::{bail, Context};

use crate::cli::{Command, KernelsCommand, ModelsCommand};
use crate::config::{Config, ModelKind};
use crate::models::fetch::{fetch, Fetched};
use crate::models::manifest::{FileEntry, Manifest, ManifestEntry, Source};
use crate::models::sync::{self, Drift, Pin};
use crate::models::verify::{all_present, sha256_file, verify_model};

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
                match fetch(entry, &config.store.dir, &config.store.python) {
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
        ModelsCommand::Pin { name, kind, version, dir, description, manifest, files } => {
            let entry = pin(name.clone(), &kind, version, dir, description, files)?;
            match manifest {
                None => print!("{entry}"),
                Some(path) => {
                    add_to_manifest(&path, &entry)?;
                    println!("added {name} to {}", path.display());
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

/// A manifest entry (TOML) for files already on disk: `models pin`.
fn pin(name: String, kind: &str, version: String, dir: std::path::PathBuf, description: String, files: Vec<String>) -> anyhow::Result<String> {
    let kind = match kind {
        "embed" => ModelKind::Embed,
        "classify" => ModelKind::Classify,
        "generate" => ModelKind::Generate,
        other => bail!("--kind {other:?}: one of embed, classify, generate"),
    };
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
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_none_or(|e| e != "partial") {
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
        let sha256 = sha256_file(&dir.join(&path)).with_context(|| format!("cannot read {}", dir.join(&path).display()))?;
        entries.push(FileEntry { path, sha256 });
    }
    let source = Source { package: None, version: None, sha256: None, prefix: String::new(), dir: Some(dir) };
    let entry = ManifestEntry { name, kind, version, description, source, files: entries };
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
