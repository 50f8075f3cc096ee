//! The versioned store: where each version of a model lives on disk, which one this node
//! switched to, and which older ones are kept.
//!
//! - The version the node's own manifest pins lives in `<store>/<name>/` (as always).
//! - A version model sync applied lives in `<store>/<name>@<version>+<digest12>/`, with the
//!   manifest entry it was made from beside it (`<same>.toml`), so a later switch back to it
//!   (a manifest that moves back) needs no download.
//! - `<store>/.applied/<name>.toml` is the entry this node switched to last: a restart boots
//!   that version from disk directly instead of the manifest's (when `sync.apply` is on).
//! - The last `store.keep_versions` applied folders are kept; older ones are removed (never
//!   the one serving, the one being replaced, or the manifest's own folder).

use std::path::{Path, PathBuf};

use super::manifest::{Manifest, ManifestEntry, SourceKind};

/// `<name>@<version>+<digest12>`: one version's folder name.
fn version_name(entry: &ManifestEntry) -> String {
    let version: String = entry.version.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    format!("{}@{}+{}", entry.name, version, &entry.digest()[..12])
}

/// Where a version's files live: its local source folder, the manifest's own folder when it
/// is the version the node's manifest pins (`base`), else its own versioned folder.
pub fn dir_for(store: &Path, entry: &ManifestEntry, base: Option<&ManifestEntry>) -> PathBuf {
    if entry.source.kind() == Some(SourceKind::Dir) || base.is_some_and(|b| b.digest() == entry.digest()) {
        return entry.dir(store);
    }
    store.join(version_name(entry))
}

/// Remembers the manifest entry a versioned folder holds.
pub fn write_entry(store: &Path, entry: &ManifestEntry) -> std::io::Result<()> {
    let path = store.join(format!("{}.toml", version_name(entry)));
    write_manifest(&path, entry)
}

fn write_manifest(path: &Path, entry: &ManifestEntry) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let text = toml::to_string(&Manifest { models: vec![entry.clone()] }).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("toml.partial");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}

fn read_manifest(path: &Path) -> Option<ManifestEntry> {
    let text = std::fs::read_to_string(path).ok()?;
    Manifest::parse(&text, &path.display().to_string()).ok()?.models.into_iter().next()
}

fn applied_path(store: &Path, name: &str) -> PathBuf {
    store.join(".applied").join(format!("{name}.toml"))
}

/// The entry this node last switched `name` to, if any.
pub fn applied(store: &Path, name: &str) -> Option<ManifestEntry> {
    read_manifest(&applied_path(store, name)).filter(|e| e.name == name)
}

/// Records the entry `name` now serves, so a restart boots it.
pub fn set_applied(store: &Path, entry: &ManifestEntry) -> std::io::Result<()> {
    write_manifest(&applied_path(store, &entry.name), entry)
}

/// Records the entry `name` served before its last switch: what a rollback returns to.
pub fn set_previous(store: &Path, entry: &ManifestEntry) -> std::io::Result<()> {
    write_manifest(&store.join(".applied").join(format!("{}.previous.toml", entry.name)), entry)
}

/// The entry `name` served before its last switch, if recorded.
pub fn previous(store: &Path, name: &str) -> Option<ManifestEntry> {
    read_manifest(&store.join(".applied").join(format!("{name}.previous.toml"))).filter(|e| e.name == name)
}

fn hold_path(store: &Path, name: &str) -> PathBuf {
    store.join(".applied").join(format!("{name}.hold"))
}

/// The digest a rollback holds `name` away from (model sync does not apply it again).
pub fn hold(store: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(hold_path(store, name)).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// Holds `name` away from `digest`, or (`None`) lifts the hold.
pub fn set_hold(store: &Path, name: &str, digest: Option<&str>) -> std::io::Result<()> {
    let path = hold_path(store, name);
    match digest {
        Some(d) => {
            std::fs::create_dir_all(path.parent().unwrap_or(store))?;
            std::fs::write(path, d)
        }
        None => match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// Removes applied versions of `name` beyond the newest `keep` (by modification time),
/// never one of `protect`. Returns the folders removed.
pub fn prune(store: &Path, name: &str, keep: usize, protect: &[&Path]) -> Vec<PathBuf> {
    let prefix = format!("{name}@");
    let Ok(items) = std::fs::read_dir(store) else { return Vec::new() };
    let mut versions: Vec<(std::time::SystemTime, PathBuf)> = items
        .filter_map(Result::ok)
        .filter(|i| i.file_name().to_string_lossy().starts_with(&prefix) && i.path().is_dir())
        .map(|i| (i.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH), i.path()))
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.0));
    let mut removed = Vec::new();
    for (_, path) in versions.into_iter().skip(keep) {
        if protect.contains(&path.as_path()) {
            continue;
        }
        if std::fs::remove_dir_all(&path).is_ok() {
            let _ = std::fs::remove_file(PathBuf::from(format!("{}.toml", path.display())));
            removed.push(path);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(version: &str, sha: char) -> ManifestEntry {
        let text = format!(
            "[[models]]\nname = \"bge\"\nkind = \"embed\"\nversion = \"{version}\"\nsource = {{ url = \"https://b.example/\" }}\nfiles = [{{ path = \"a\", sha256 = \"{}\" }}]\n",
            std::iter::repeat_n(sha, 64).collect::<String>()
        );
        Manifest::parse(&text, "t").unwrap().models.remove(0)
    }

    #[test]
    fn versions_have_their_own_folders_and_the_base_keeps_its_own() {
        let store = Path::new("/s");
        let (base, next) = (entry("1", 'a'), entry("2/rc", 'b'));
        assert_eq!(dir_for(store, &base, Some(&base)), PathBuf::from("/s/bge"));
        let d = dir_for(store, &next, Some(&base));
        assert!(d.to_string_lossy().starts_with("/s/bge@2_rc+"), "{}", d.display());
    }

    #[test]
    fn applied_round_trips_and_prune_keeps_the_newest() {
        let store = tempfile::tempdir().unwrap();
        let e = entry("2", 'b');
        set_applied(store.path(), &e).unwrap();
        assert_eq!(applied(store.path(), "bge"), Some(e));
        for (i, v) in ["1", "2", "3"].iter().enumerate() {
            let d = dir_for(store.path(), &entry(v, (b'a' + i as u8) as char), None);
            std::fs::create_dir_all(&d).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let oldest = dir_for(store.path(), &entry("1", 'a'), None);
        let removed = prune(store.path(), "bge", 2, &[]);
        assert_eq!(removed, vec![oldest.clone()]);
        assert!(!oldest.exists());
        assert!(prune(store.path(), "bge", 1, &[&dir_for(store.path(), &entry("2", 'b'), None)]).is_empty());
    }
}
