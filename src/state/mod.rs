//! Durable state of one node: the ledger, spend by key and user, answer ids awaiting
//! feedback, quality scores and the routing samples, kept in `<state.dir>/state.redb`.
//!
//! Why redb: pure Rust (no C build, unlike SQLite), one file whose every commit is atomic
//! and crash-safe (copy-on-write pages, a checksummed commit slot), and a file lock, so a
//! second daemon on the same volume fails at start instead of double counting. The data is
//! small key → value records, not queries, so SQL would buy nothing.
//!
//! Each owner of in-memory state (`Durable`) marks the records it changed; a flusher thread
//! collects those every `state.flush_ms` and commits them in one transaction. So a request
//! never waits for the disk, a graceful stop flushes everything, and `kill -9` loses at most
//! the changes of the last `flush_ms` (plus one commit's time).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableError};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::telemetry::metrics::METRICS;

mod journal;
pub use journal::{Journal, Stamped};

/// Every record lives in one table, keyed `"<section>/<key>"`, its value JSON.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");

/// Why the state store failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state.dir {dir}: {source}")]
    Dir { dir: PathBuf, source: std::io::Error },
    #[error("state file {path} is in use by another edgenode process (one state.dir per node)")]
    InUse { path: PathBuf },
    #[error("state file {path}: {message}")]
    Db { path: PathBuf, message: String },
}

/// Writes collected since the last commit: `Some(json)` puts, `None` deletes.
#[derive(Default)]
pub struct Changes {
    writes: BTreeMap<String, Option<Vec<u8>>>,
}

impl Changes {
    /// Puts one record (`section/key` → `value` as JSON).
    pub fn put(&mut self, section: &str, key: &str, value: &impl Serialize) {
        if let Ok(bytes) = serde_json::to_vec(value) {
            self.writes.insert(format!("{section}/{key}"), Some(bytes));
        }
    }

    /// Deletes one record.
    pub fn delete(&mut self, section: &str, key: &str) {
        self.writes.insert(format!("{section}/{key}"), None);
    }

    pub fn len(&self) -> usize {
        self.writes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

/// The records read at start, by section.
#[derive(Default)]
pub struct Records {
    sections: BTreeMap<String, Vec<(String, Vec<u8>)>>,
}

impl Records {
    /// The records of `section` whose value parses as `T`, as (key, value). A record that
    /// no longer parses (written by another version) is skipped with a warning.
    pub fn section<T: DeserializeOwned>(&self, section: &str) -> Vec<(String, T)> {
        let Some(items) = self.sections.get(section) else { return Vec::new() };
        items
            .iter()
            .filter_map(|(k, v)| match serde_json::from_slice(v) {
                Ok(t) => Some((k.clone(), t)),
                Err(e) => {
                    tracing::warn!(section, key = %k, "skipping a state record that does not parse: {e}");
                    None
                }
            })
            .collect()
    }

    /// The records of `section` whose key starts with `prefix`, the prefix taken off, whose
    /// value parses as `T`.
    pub fn prefixed<T: DeserializeOwned>(&self, section: &str, prefix: &str) -> Vec<(String, T)> {
        let Some(items) = self.sections.get(section) else { return Vec::new() };
        items
            .iter()
            .filter_map(|(k, v)| {
                let key = k.strip_prefix(prefix)?;
                match serde_json::from_slice(v) {
                    Ok(t) => Some((key.to_string(), t)),
                    Err(e) => {
                        tracing::warn!(section, key = %k, "skipping a state record that does not parse: {e}");
                        None
                    }
                }
            })
            .collect()
    }

    /// How many records were read.
    pub fn len(&self) -> usize {
        self.sections.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Something that keeps state in memory and persists it through the store.
pub trait Durable: Send + Sync {
    /// Moves what changed since the last call into `out` (records to put or delete).
    fn changes(&self, out: &mut Changes);
}

/// The open state file.
pub struct StateStore {
    db: Database,
    path: PathBuf,
}

impl StateStore {
    /// Opens (creating) `<dir>/state.redb`.
    pub fn open(dir: &Path) -> Result<StateStore, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::Dir { dir: dir.to_path_buf(), source })?;
        let path = dir.join("state.redb");
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StateError::InUse { path: path.clone() },
            other => StateError::Db { path: path.clone(), message: other.to_string() },
        })?;
        Ok(StateStore { db, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db_error(&self, e: impl std::fmt::Display) -> StateError {
        StateError::Db { path: self.path.clone(), message: e.to_string() }
    }

    /// Every record, by section.
    pub fn load(&self) -> Result<Records, StateError> {
        let tx = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let table = match tx.open_table(RECORDS) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Records::default()),
            Err(e) => return Err(self.db_error(e)),
        };
        let mut records = Records::default();
        for item in table.iter().map_err(|e| self.db_error(e))? {
            let (k, v) = item.map_err(|e| self.db_error(e))?;
            let Some((section, key)) = k.value().split_once('/') else { continue };
            records.sections.entry(section.to_string()).or_default().push((key.to_string(), v.value().to_vec()));
        }
        Ok(records)
    }

    /// Commits `changes` in one durable transaction.
    pub fn commit(&self, changes: &Changes) -> Result<(), StateError> {
        let tx = self.db.begin_write().map_err(|e| self.db_error(e))?;
        {
            let mut table = tx.open_table(RECORDS).map_err(|e| self.db_error(e))?;
            for (key, value) in &changes.writes {
                match value {
                    Some(bytes) => table.insert(key.as_str(), bytes.as_slice()).map(|_| ()),
                    None => table.remove(key.as_str()).map(|_| ()),
                }
                .map_err(|e| self.db_error(e))?;
            }
        }
        tx.commit().map_err(|e| self.db_error(e))
    }

    /// One record read directly (for the node's identity, before anything else loads).
    pub fn get<T: DeserializeOwned>(&self, section: &str, key: &str) -> Option<T> {
        let tx = self.db.begin_read().ok()?;
        let table = tx.open_table(RECORDS).ok()?;
        let value = table.get(format!("{section}/{key}").as_str()).ok()??;
        serde_json::from_slice(value.value()).ok()
    }
}

/// Unix time in milliseconds: what persisted records use instead of `Instant`.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The flusher: a thread that commits every owner's changes each `every`, and once more
/// when stopped. It belongs to whoever holds it; `stop` (or drop) ends it after that last
/// commit.
pub struct Flusher {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    pub fn start(store: Arc<StateStore>, owners: Vec<Arc<dyn Durable>>, every: Duration) -> std::io::Result<Flusher> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("state-flusher".into()).spawn(move || {
            // What a failed commit could not write; the next round starts from it, so a
            // newer value of the same record overwrites the older one.
            let mut pending = Changes::default();
            loop {
                let last = !matches!(stopped.recv_timeout(every), Err(mpsc::RecvTimeoutError::Timeout));
                pending = flush(&store, &owners, pending);
                if last {
                    return;
                }
            }
        })?;
        Ok(Flusher { stop: Some(stop), thread: Some(thread) })
    }

    /// Commits what is pending and ends the thread.
    pub fn stop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Collects and commits one round of changes on top of `pending`; returns what is still
/// unwritten. A failed commit keeps the daemon serving; its records go into the next round.
fn flush(store: &StateStore, owners: &[Arc<dyn Durable>], mut changes: Changes) -> Changes {
    for o in owners {
        o.changes(&mut changes);
    }
    if changes.is_empty() {
        return changes;
    }
    let started = Instant::now();
    match store.commit(&changes) {
        Ok(()) => {
            METRICS.state_commit_seconds.observe(started.elapsed().as_secs_f64());
            METRICS.state_records_written.inc_by(changes.len() as u64);
            Changes::default()
        }
        Err(e) => {
            METRICS.state_commit_failures.inc();
            tracing::error!("could not save the node's state: {e}");
            changes
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_and_a_second_opener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut c = Changes::default();
        c.put("ledger", "m/1", &[1.5, 2.0]);
        c.put("ledger", "m/2", &[3.0]);
        c.put("other", "x", &"y");
        store.commit(&c).unwrap();
        let mut c = Changes::default();
        c.delete("ledger", "m/2");
        store.commit(&c).unwrap();
        assert!(matches!(StateStore::open(dir.path()), Err(StateError::InUse { .. })));
        drop(store);
        let store = StateStore::open(dir.path()).unwrap();
        let records = store.load().unwrap();
        assert_eq!(records.section::<Vec<f64>>("ledger"), vec![("m/1".to_string(), vec![1.5, 2.0])]);
        assert_eq!(store.get::<String>("other", "x").as_deref(), Some("y"));
    }
}
