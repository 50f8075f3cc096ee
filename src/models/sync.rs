//! Model sync: is this node serving the versions a central manifest says it should?
//!
//! "You upgrade the cloud model but forget to push to the edge": the node fetches the
//! expected manifest (a file or an http(s) URL in `models/manifest.toml`'s format) at boot
//! and every `interval_s`, and compares it with the digests it verified and serves. Each
//! model is `in_sync`, `stale` (same name, other digest), `missing` (expected, not served)
//! or `extra` (served, not expected). A manifest that cannot be fetched is reported as
//! unreachable — never as drift — and never stops serving.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::manifest::Manifest;
use super::registry::Stage;
use crate::config::SyncConfig;
use crate::models::registry::Registry;
use crate::telemetry::metrics::METRICS;
use tokio::sync::watch;

/// One model's standing against the expected manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Drift {
    InSync,
    Stale,
    Missing,
    Extra,
}

impl Drift {
    /// Its name in JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Drift::InSync => "in_sync",
            Drift::Stale => "stale",
            Drift::Missing => "missing",
            Drift::Extra => "extra",
        }
    }
}

/// A version and digest, local or expected.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pin {
    pub version: String,
    pub digest: String,
}

/// One manifest entry's comparison.
#[derive(Debug, Clone, Serialize)]
pub struct ModelDrift {
    pub status: Drift,
    pub local: Option<Pin>,
    pub expected: Option<Pin>,
}

/// Where applying the expected manifest to one model stands (`sync.apply`): shown in
/// `/info`'s `sync.apply`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ApplyStatus {
    /// `scheduled` (waiting for this node's share of `rollout_jitter_s`), `fetching`,
    /// `verifying`, `loading` (includes warm-up), `probing`, `switched`, or `failed`.
    pub state: &'static str,
    /// The version being applied (or last applied).
    pub target: Option<Pin>,
    /// Why the last try failed, naming the step.
    pub error: Option<String>,
    /// Tries that failed in a row.
    pub failures: u32,
    /// Seconds since the epoch: when this node switches (scheduled), retries (failed), or
    /// switched.
    pub at: Option<u64>,
    /// While fetching: the file, bytes done and in all.
    pub fetch: Option<super::download::Progress>,
}

/// What an operator asks of the upgrade task (`sync.apply`), with where its answer goes.
#[derive(Debug)]
pub enum SyncCommand {
    /// Switch `model` back to the version it served before its last switch (kept on disk),
    /// and hold the version rolled back from until the central manifest names another.
    /// Answers the new version's label, or why not.
    Rollback { model: String, reply: tokio::sync::oneshot::Sender<Result<String, String>> },
}

/// The last sync check.
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    /// Where the expected manifest comes from.
    pub source: String,
    /// Seconds since the epoch of the last attempt.
    pub checked_at: u64,
    /// Whether the last attempt could read the manifest.
    pub reachable: bool,
    /// Why it could not, if it could not.
    pub error: Option<String>,
    /// Per manifest entry (from the last successful fetch).
    pub models: BTreeMap<String, ModelDrift>,
    /// The expected manifest itself (from the last successful fetch), for `sync.apply`.
    #[serde(skip)]
    pub expected: Option<Arc<Manifest>>,
}

impl SyncReport {
    /// True when the last successful comparison found any model stale or missing.
    pub fn drifted(&self) -> bool {
        self.models.values().any(|m| matches!(m.status, Drift::Stale | Drift::Missing))
    }
}

/// Compares what is served (entry name → pin) with the expected manifest.
pub fn compare(local: &BTreeMap<String, Pin>, expected: &Manifest) -> BTreeMap<String, ModelDrift> {
    let mut out = BTreeMap::new();
    for e in &expected.models {
        let want = Pin { version: e.version.clone(), digest: e.digest() };
        let have = local.get(&e.name).cloned();
        let status = match &have {
            Some(h) if h.digest == want.digest => Drift::InSync,
            Some(_) => Drift::Stale,
            None => Drift::Missing,
        };
        out.insert(e.name.clone(), ModelDrift { status, local: have, expected: Some(want) });
    }
    for (name, pin) in local {
        out.entry(name.clone()).or_insert(ModelDrift { status: Drift::Extra, local: Some(pin.clone()), expected: None });
    }
    out
}

/// Reads the expected manifest from a file path or an http(s) URL.
pub async fn fetch(source: &str, timeout: Duration) -> Result<Manifest, String> {
    let text = if source.starts_with("http://") || source.starts_with("https://") {
        let client =
            reqwest::Client::builder().connect_timeout(timeout).timeout(timeout).build().map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        let response = client.get(source).send().await.map_err(|e| format!("cannot reach {source}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{source} answered {}", response.status()));
        }
        response.text().await.map_err(|e| format!("cannot read {source}: {e}"))?
    } else {
        tokio::fs::read_to_string(source).await.map_err(|e| format!("cannot read {source}: {e}"))?
    };
    Manifest::parse(&text, source).map_err(|e| e.to_string())
}

/// Builds a report from one fetch attempt; a failed fetch keeps the previous comparison.
pub fn report(source: &str, fetched: Result<Manifest, String>, local: &BTreeMap<String, Pin>, previous: Option<&SyncReport>) -> SyncReport {
    let checked_at = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    match fetched {
        Ok(expected) => SyncReport {
            source: source.into(),
            checked_at,
            reachable: true,
            error: None,
            models: compare(local, &expected),
            expected: Some(Arc::new(expected)),
        },
        Err(e) => SyncReport {
            source: source.into(),
            checked_at,
            reachable: false,
            error: Some(e),
            models: previous.map(|p| p.models.clone()).unwrap_or_default(),
            expected: previous.and_then(|p| p.expected.clone()),
        },
    }
}

/// What this node serves, per manifest entry: the digest it verified on disk, or (while a
/// model still boots) the pinned one it will verify against. A model that failed to load
/// serves nothing and so counts as missing.
pub fn local_pins(registry: &Registry) -> BTreeMap<String, Pin> {
    let mut out = BTreeMap::new();
    for slot in registry.slots() {
        let Some(entry) = slot.entry() else { continue };
        if matches!(slot.stage(), Stage::Failed(_)) {
            continue;
        }
        let digest = slot.facts().digest.unwrap_or_else(|| entry.digest());
        out.entry(entry.name.clone()).or_insert(Pin { version: entry.version.clone(), digest });
    }
    out
}

/// Checks once: fetch, compare, set the gauges, log what drifted.
pub async fn check(cfg: &SyncConfig, registry: &Registry, previous: Option<&SyncReport>) -> SyncReport {
    let fetched = fetch(&cfg.expected_manifest, Duration::from_secs(cfg.timeout_s)).await;
    let report = report(&cfg.expected_manifest, fetched, &local_pins(registry), previous);
    let metrics = &*METRICS;
    metrics.sync_reachable.set(if report.reachable { 1.0 } else { 0.0 });
    match &report.error {
        Some(e) => tracing::warn!(source = %report.source, "expected manifest unreachable (not counted as drift): {e}"),
        None => {
            for (name, m) in &report.models {
                metrics.model_in_sync.with_label_values(&[name.as_str()]).set(i64::from(m.status == Drift::InSync));
                if m.status != Drift::InSync {
                    tracing::warn!(
                        model = %name,
                        status = m.status.as_str(),
                        local = m.local.as_ref().map(|p| format!("{}+{}", p.version, &p.digest[..12.min(p.digest.len())])).unwrap_or_default(),
                        expected = m.expected.as_ref().map(|p| format!("{}+{}", p.version, &p.digest[..12.min(p.digest.len())])).unwrap_or_default(),
                        "model drift against the expected manifest"
                    );
                }
            }
        }
    }
    report
}

/// Checks at boot and then every `sync.interval_s`, publishing each report, until every
/// receiver (the node) is gone.
pub async fn run(cfg: SyncConfig, registry: Arc<Registry>, publish: watch::Sender<Option<SyncReport>>) {
    let every = Duration::from_secs(cfg.interval_s.max(1));
    loop {
        let previous = publish.borrow().clone();
        let report = tokio::select! {
            r = check(&cfg, &registry, previous.as_ref()) => r,
            _ = publish.closed() => return,
        };
        if publish.send(Some(report)).is_err() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = publish.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_every_case() {
        let expected = Manifest::load(None).unwrap();
        let minilm = expected.get("minilm").unwrap();
        let mut local = BTreeMap::new();
        local.insert("minilm".to_string(), Pin { version: minilm.version.clone(), digest: minilm.digest() });
        local.insert("smollm2".to_string(), Pin { version: "0.0.9".into(), digest: "0".repeat(64) });
        local.insert("tiny".to_string(), Pin { version: "1".into(), digest: "1".repeat(64) });
        let mut cut = expected.clone();
        cut.models.retain(|m| m.name != "tiny");
        let r = compare(&local, &cut);
        assert_eq!(r["minilm"].status, Drift::InSync);
        assert_eq!(r["smollm2"].status, Drift::Stale);
        assert_eq!(r["tiny"].status, Drift::Extra);
        local.remove("minilm");
        assert_eq!(compare(&local, &cut)["minilm"].status, Drift::Missing);
    }
}
