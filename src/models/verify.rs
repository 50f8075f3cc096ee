//! Hashing model files and checking them against the manifest.
//!
//! Files are hashed in streaming chunks (never read whole into memory), so verifying a
//! 2 GB TinyLlama costs a few MB of RAM.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::manifest::ManifestEntry;

/// Feeds everything `reader` yields into `hasher`, in 1 MiB chunks.
fn hash_into(mut reader: impl Read, hasher: &mut impl sha2::Digest) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

/// Hex sha256 of everything `reader` yields.
pub fn sha256_reader(reader: impl Read) -> std::io::Result<String> {
    let mut h = Sha256::new();
    hash_into(reader, &mut h)?;
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
    #[error("{model}: {} has no sha256 in the manifest and has not been checked against the Hub's object id yet: fetch it (edgenode models fetch {model})", path.display())]
    Unchecked { model: String, path: PathBuf },
}

/// A model whose files all match: the model digest and each file's digest.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub digest: String,
    pub files: Vec<(String, String)>,
}

/// Hashes every file of `entry` under `dir` and compares it with the manifest.
/// Stops at the first problem, naming the file, the expected and the actual digest.
/// A file without a pinned sha256 is compared with the sha256 recorded when it was first
/// fetched and checked against the Hub (`Recorded`).
pub fn verify_model(entry: &ManifestEntry, dir: &Path) -> Result<Verified, VerifyError> {
    let recorded = Recorded::load(dir, entry);
    let mut files = Vec::with_capacity(entry.files.len());
    for f in &entry.files {
        let path = dir.join(&f.path);
        if !path.is_file() {
            return Err(VerifyError::Missing { model: entry.name.clone(), path });
        }
        let Some(expected) = f.sha256.as_deref().or_else(|| recorded.sha256_of(&f.path)) else {
            return Err(VerifyError::Unchecked { model: entry.name.clone(), path });
        };
        let actual =
            sha256_file(&path).map_err(|e| VerifyError::Unreadable { model: entry.name.clone(), path: path.clone(), message: e.to_string() })?;
        if actual != expected {
            return Err(VerifyError::Mismatch { model: entry.name.clone(), path, expected: expected.to_string(), actual });
        }
        files.push((f.path.clone(), actual));
    }
    Ok(Verified { digest: entry.digest(), files })
}

/// True when every file of the model exists (cheap; says nothing about content).
pub fn all_present(entry: &ManifestEntry, dir: &Path) -> bool {
    entry.files.iter().all(|f| dir.join(&f.path).is_file())
}

/// True when something must be fetched before the model can be verified: a missing file, or
/// a Hub file without a pinned sha256 that has not been checked against the Hub yet.
pub fn needs_fetch(entry: &ManifestEntry, dir: &Path) -> bool {
    if !all_present(entry, dir) {
        return true;
    }
    let recorded = Recorded::load(dir, entry);
    entry.files.iter().any(|f| f.sha256.is_none() && recorded.sha256_of(&f.path).is_none())
}

/// The git object id of a blob: sha1 over `"blob <len>\0"` and the bytes. The Hub lists
/// every file of a commit with it, so a file can be checked against a commit without a
/// sha256 of its own.
pub fn git_blob_oid(path: &Path) -> std::io::Result<String> {
    let len = std::fs::metadata(path)?.len();
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {len}\0").as_bytes());
    hash_into(File::open(path)?, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// The sha256 of Hub files whose manifest entry pins none, learned at their first fetch
/// (after their bytes matched the object id the Hub lists at the pinned commit) and kept
/// beside them in `<model dir>/.edgenode-verified.json`. Later boots verify against it
/// locally, with no network. The record names the repository and commit it was made for,
/// so a manifest that moves to another commit starts a new one.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Recorded {
    source: String,
    files: BTreeMap<String, RecordedFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RecordedFile {
    sha256: String,
    git_oid: String,
}

impl Recorded {
    /// The record's file name inside a model's folder.
    pub const FILE: &'static str = ".edgenode-verified.json";

    fn source_of(entry: &ManifestEntry) -> String {
        format!("hf:{}@{}", entry.source.hf.as_deref().unwrap_or(""), entry.source.revision.as_deref().unwrap_or(""))
    }

    /// The record for `entry` in `dir`; empty when there is none, it is unreadable, or it
    /// was made for another repository or commit.
    pub fn load(dir: &Path, entry: &ManifestEntry) -> Recorded {
        let fresh = Recorded { source: Self::source_of(entry), files: BTreeMap::new() };
        if entry.source.hf.is_none() {
            return fresh;
        }
        match std::fs::read(dir.join(Self::FILE)).ok().and_then(|b| serde_json::from_slice::<Recorded>(&b).ok()) {
            Some(r) if r.source == fresh.source => r,
            _ => fresh,
        }
    }

    /// The recorded sha256 of a file.
    pub fn sha256_of(&self, path: &str) -> Option<&str> {
        self.files.get(path).map(|f| f.sha256.as_str())
    }

    /// Records a file checked against its git object id.
    pub fn insert(&mut self, path: &str, sha256: String, git_oid: String) {
        self.files.insert(path.to_string(), RecordedFile { sha256, git_oid });
    }

    /// Writes the record (a temporary file renamed into place, so it is whole or absent).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!("{}.partial", Self::FILE));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, dir.join(Self::FILE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_blob_ids_are_gits_own() {
        // `git hash-object` of an empty file and of "hello\n".
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("empty"), b"").unwrap();
        std::fs::write(dir.path().join("hello"), b"hello\n").unwrap();
        assert_eq!(git_blob_oid(&dir.path().join("empty")).unwrap(), "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391");
        assert_eq!(git_blob_oid(&dir.path().join("hello")).unwrap(), "ce013625030ba8dba906f756967f9e9ca394464a");
    }

    #[test]
    fn recorded_digests_hold_for_their_commit_only() {
        let commit = |c: char| std::iter::repeat_n(c, 40).collect::<String>();
        let text = |rev: &str| {
            format!("[[models]]\nname = \"bge\"\nkind = \"embed\"\nversion = \"1\"\nsource = {{ hf = \"a/b\", revision = \"{rev}\" }}\nfiles = [{{ path = \"modules.json\" }}]\n")
        };
        let entry = |rev: &str| super::super::manifest::Manifest::parse(&text(rev), "t").unwrap().models.remove(0);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("modules.json"), b"[]").unwrap();
        let (a, b) = (entry(&commit('a')), entry(&commit('b')));
        assert!(matches!(verify_model(&a, dir.path()), Err(VerifyError::Unchecked { .. })));
        assert!(needs_fetch(&a, dir.path()));

        let mut r = Recorded::load(dir.path(), &a);
        r.insert("modules.json", sha256_file(&dir.path().join("modules.json")).unwrap(), git_blob_oid(&dir.path().join("modules.json")).unwrap());
        r.save(dir.path()).unwrap();
        assert!(!needs_fetch(&a, dir.path()));
        assert_eq!(verify_model(&a, dir.path()).unwrap().digest, a.digest());
        // Another commit: the record does not apply.
        assert!(needs_fetch(&b, dir.path()));
        // Changed bytes: a mismatch against the recorded sha256.
        std::fs::write(dir.path().join("modules.json"), b"[{}]").unwrap();
        assert!(matches!(verify_model(&a, dir.path()), Err(VerifyError::Mismatch { .. })));
    }
}
