//! Hashing model files and checking them against the manifest.
//!
//! Files are hashed in streaming chunks (never read whole into memory), so verifying a
//! 2 GB TinyLlama costs a few MB of RAM.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::manifest::ManifestEntry;

/// Hex sha256 of everything `reader` yields.
pub fn sha256_reader(mut reader: impl Read) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    sha256_reader(File::open(path)?)
}

/// Why a model's files do not match its manifest entry.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VerifyError {
    #[error("{model}: {} is missing", path.display())]
    Missing { model: String, path: PathBuf },
    #[error("{model}: cannot read {}: {message}", path.display())]
    Unreadable { model: String, path: PathBuf, message: String },
    #[error("{model}: {} has sha256 {actual}, the manifest expects {expected}", path.display())]
    Mismatch { model: String, path: PathBuf, expected: String, actual: String },
}

/// A model whose files all match: the model digest and each file's digest.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub digest: String,
    pub files: Vec<(String, String)>,
}

/// Hashes every file of `entry` under `dir` and compares it with the manifest.
/// Stops at the first problem, naming the file, the expected and the actual digest.
pub fn verify_model(entry: &ManifestEntry, dir: &Path) -> Result<Verified, VerifyError> {
    let mut files = Vec::with_capacity(entry.files.len());
    for f in &entry.files {
        let path = dir.join(&f.path);
        if !path.is_file() {
            return Err(VerifyError::Missing { model: entry.name.clone(), path });
        }
        let actual =
            sha256_file(&path).map_err(|e| VerifyError::Unreadable { model: entry.name.clone(), path: path.clone(), message: e.to_string() })?;
        if actual != f.sha256 {
            return Err(VerifyError::Mismatch { model: entry.name.clone(), path, expected: f.sha256.clone(), actual });
        }
        files.push((f.path.clone(), actual));
    }
    let digest = super::manifest::model_digest(files.iter().map(|(p, s)| (p.as_str(), s.as_str())));
    Ok(Verified { digest, files })
}

/// True when every file of the model exists (cheap; says nothing about content).
pub fn all_present(entry: &ManifestEntry, dir: &Path) -> bool {
    entry.files.iter().all(|f| dir.join(&f.path).is_file())
}
