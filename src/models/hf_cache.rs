//! The local Hugging Face cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`), as the official
//! client lays it out: `models--ORG--REPO/snapshots/<commit>/<path>`, each a link to
//! `blobs/<etag>`, where a large file's etag is its sha256 and a small file's its git blob
//! id. A node whose machine already downloaded a model with `huggingface_hub` (or
//! `huggingface-cli download`) takes the files from there once they match their pins,
//! instead of downloading them again.

use std::path::{Path, PathBuf};

use super::download::Expected;
use super::hub::hf_home;

/// The cache folder.
#[derive(Debug, Clone)]
pub struct HfCache {
    pub root: PathBuf,
}

impl HfCache {
    /// `HF_HUB_CACHE`, else `HF_HOME/hub` (`~/.cache/huggingface/hub` by default).
    pub fn from_env() -> HfCache {
        let root = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| hf_home().join("hub"));
        HfCache { root }
    }

    /// `models--ORG--REPO`.
    fn repo_dir(&self, repo: &str) -> PathBuf {
        self.root.join(format!("models--{}", repo.replace('/', "--")))
    }

    /// The cached copy of `path` at `commit`, if there is one.
    pub fn snapshot_file(&self, repo: &str, commit: &str, path: &str) -> Option<PathBuf> {
        let p = self.repo_dir(repo).join("snapshots").join(commit).join(path);
        p.is_file().then_some(p)
    }

    /// What a cached file without a pinned sha256 must hash to: the git blob id that names
    /// its blob, when the snapshot entry is a link into `blobs/` (the cache's own layout;
    /// the client named the blob by the etag the Hub sent for that commit).
    pub fn blob_oid(file: &Path) -> Option<Expected> {
        let target = std::fs::read_link(file).ok()?;
        let name = target.file_name()?.to_str()?.to_ascii_lowercase();
        if !name.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        // A small file's blob is named by its git blob id, an LFS file's by its sha256.
        match name.len() {
            40 => Some(Expected::GitBlob(name)),
            64 => Some(Expected::Sha256(name)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_snapshot_file_and_its_blob_id() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = HfCache { root: tmp.path().to_path_buf() };
        let repo = tmp.path().join("models--BAAI--bge-small-en-v1.5");
        let oid = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/c0ffee/1_Pooling")).unwrap();
        std::fs::write(repo.join("blobs").join(oid), b"{}").unwrap();
        std::os::unix::fs::symlink(format!("../../../blobs/{oid}"), repo.join("snapshots/c0ffee/1_Pooling/config.json")).unwrap();
        let found = cache.snapshot_file("BAAI/bge-small-en-v1.5", "c0ffee", "1_Pooling/config.json").unwrap();
        assert_eq!(HfCache::blob_oid(&found), Some(Expected::GitBlob(oid.into())));
        assert!(cache.snapshot_file("BAAI/bge-small-en-v1.5", "other", "1_Pooling/config.json").is_none());
    }
}
