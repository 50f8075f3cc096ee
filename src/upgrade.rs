//! Model sync that applies (`sync.apply`): a node that keeps itself current.
//!
//! When the expected manifest pins a served model at another version, the node fetches the
//! new version's files into a folder of their own (any source the manifest can name),
//! verifies them, loads the new version beside the serving one and warms it, runs its probe
//! (`models::probe`), and only then switches: new requests get the new version, requests and
//! streams already running finish on the old one, which is dropped with its last user (its
//! memory returned). The node stays ready throughout.
//!
//! A failure at any step leaves the serving version untouched. It is reported (`/info`
//! `sync.apply`, the `edgenode_model_sync_failures_total` counter, a log line, an event on
//! the `model.upgrade` span) and retried with backoff (`sync.interval_s` doubling, at most 16
//! times it), never in a tight loop and never by restarting the process. A change waits for
//! this node's stable share of `sync.rollout_jitter_s` first, so a fleet rolls.
//!
//! One task owns this: it starts after boot, applies one model at a time (two versions of
//! one model in memory at once is the most a switch costs), and ends with the node's sync
//! channel.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use candle_core::Device;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::boot::{build_prototype, entry_dir, fetch_files, load_version, verify_files, verify_in, will_fetch, Restarts};
use crate::config::{ModelConfig, ModelKind};
use crate::encoder::tokenize::Truncation;
use crate::generate::sampling::{Sampler, SamplingParams};
use crate::generate::{Piece, PromptInput};
use crate::models::manifest::ManifestEntry;
use crate::models::probe::Probe;
use crate::models::registry::{Loaded, ModelSlot, Stage};
use crate::models::sync::{ApplyStatus, Pin, SyncCommand};
use crate::models::verify::needs_fetch;
use crate::node::Node;
use crate::service::Service;
use crate::telemetry::metrics::METRICS;

/// How often the task looks again when no report arrives (for scheduled and retried work).
const TICK: Duration = Duration::from_secs(1);

/// Follows the sync reports until the node is gone or draining.
pub async fn run(node: Arc<Node>, device: Device, restarts: Restarts, mut commands: mpsc::UnboundedReceiver<SyncCommand>) {
    let mut updates = node.sync_updates();
    // Per model: when its current target was first seen, and when a failed one may retry.
    let mut first_seen: HashMap<String, (String, Instant)> = HashMap::new();
    let mut retry_at: HashMap<String, Instant> = HashMap::new();
    let share = jitter_share(&node_identity());
    loop {
        tokio::select! {
            changed = updates.changed() => if changed.is_err() { return },
            Some(command) = commands.recv() => {
                let SyncCommand::Rollback { model, reply } = command;
                let _ = reply.send(rollback(&node, &model, &device, &restarts).await);
                continue;
            }
            _ = tokio::time::sleep(TICK) => {}
        }
        if node.is_draining() {
            return;
        }
        for slot in node.registry.slots() {
            // Drops a previous version past sync.keep_previous_s (its memory goes with its
            // last request).
            let _ = slot.previous();
        }
        let Some(expected) = updates.borrow().as_ref().and_then(|r| r.expected.clone()) else { continue };
        for slot in node.registry.slots() {
            let Some(serving) = slot.entry() else { continue };
            let Some(target) = expected.get(&serving.name) else { continue };
            // A model that failed (at boot, or when a switch could not bring its old version
            // back) is repaired by the next version the central manifest names.
            if !matches!(slot.stage(), Stage::Ready | Stage::Failed(_)) {
                continue;
            }
            let digest = target.digest();
            let name = slot.name().to_string();
            let store = &node.config.store.dir;
            match crate::models::store::hold(store, &serving.name) {
                // Rolled back from this version: not applied again until the central
                // manifest names another.
                Some(held) if held == digest => {
                    update(&node, &name, |s| {
                        s.state = "held";
                        s.target = Some(Pin { version: target.version.clone(), digest: digest.clone() });
                    });
                    continue;
                }
                Some(_) => {
                    tracing::info!(model = %name, "the central manifest names another version: lifting the rollback's hold");
                    if let Err(e) = crate::models::store::set_hold(store, &serving.name, None) {
                        tracing::warn!(model = %name, "cannot lift the hold: {e}");
                    }
                }
                None => {}
            }
            if slot.with_facts(|f| f.digest.clone()).as_deref() == Some(digest.as_str()) {
                continue;
            }
            let now = Instant::now();
            let seen = first_seen.entry(name.clone()).or_insert_with(|| (digest.clone(), now));
            if seen.0 != digest {
                *seen = (digest.clone(), now);
                retry_at.remove(&name);
                node.upgrades.write().insert(name.clone(), ApplyStatus::default());
            }
            let due = seen.1 + Duration::from_secs_f64(node.config.sync.rollout_jitter_s as f64 * share);
            let target_pin = Pin { version: target.version.clone(), digest: digest.clone() };
            if now < due {
                update(&node, &name, |s| {
                    s.state = "scheduled";
                    s.target = Some(target_pin.clone());
                    s.at = Some(epoch_of(due));
                });
                continue;
            }
            if retry_at.get(&name).is_some_and(|at| now < *at) {
                continue;
            }
            if target.kind != serving.kind {
                fail(
                    &node,
                    &name,
                    target_pin,
                    "check",
                    format!("the expected manifest has {} as {}, this node serves it as {}", target.name, target.kind, serving.kind),
                );
                retry_at.insert(name, now + Duration::from_secs(node.config.sync.interval_s.max(1)));
                continue;
            }
            update(&node, &name, |s| {
                s.target = Some(target_pin.clone());
                s.error = None;
            });
            let span = tracing::info_span!("model.upgrade", model = %name, version = %target.version, digest = %&digest[..12]);
            match apply(&node, &slot, target.clone(), &device, &restarts).instrument(span.clone()).await {
                Ok(label) => {
                    span.in_scope(|| tracing::info!(model = %name, label = %label, "switched to the expected manifest's version"));
                    METRICS.model_switches.with_label_values(&[name.as_str()]).inc();
                    retry_at.remove(&name);
                    update(&node, &name, |s| {
                        s.state = "switched";
                        s.failures = 0;
                        s.error = None;
                        s.fetch = None;
                        s.at = Some(epoch_of(Instant::now()));
                    });
                }
                Err((step, message)) => {
                    let failures = node.upgrades.read().get(&name).map_or(0, |s| s.failures) + 1;
                    let base = node.config.sync.interval_s.max(1);
                    let wait = Duration::from_secs(base << (failures - 1).min(4));
                    span.in_scope(|| tracing::warn!(model = %name, step, failures, retry_s = wait.as_secs(), "the new version was not applied; the serving one stays: {message}"));
                    fail(&node, &name, target_pin, step, message);
                    retry_at.insert(name.clone(), Instant::now() + wait);
                    update(&node, &name, |s| s.at = Some(epoch_of(Instant::now() + wait)));
                }
            }
        }
        for entry in &expected.models {
            let served = node.registry.slots().iter().any(|s| s.entry().is_some_and(|e| e.name == entry.name));
            let now = Instant::now();
            if served || retry_at.get(&entry.name).is_some_and(|at| now < *at) {
                continue;
            }
            let pin = Pin { version: entry.version.clone(), digest: entry.digest() };
            let span = tracing::info_span!("model.add", model = %entry.name, version = %entry.version);
            match add(&node, entry.clone(), &device, &restarts).instrument(span.clone()).await {
                Ok(label) => {
                    span.in_scope(|| tracing::info!(model = %entry.name, label = %label, "serving a model the expected manifest added"));
                    retry_at.remove(&entry.name);
                    update(&node, &entry.name, |s| {
                        *s = ApplyStatus { state: "added", target: Some(pin), at: Some(epoch_of(Instant::now())), ..Default::default() };
                    });
                }
                Err((step, message)) => {
                    let failures = node.upgrades.read().get(&entry.name).map_or(0, |s| s.failures) + 1;
                    let wait = Duration::from_secs(node.config.sync.interval_s.max(1) << (failures - 1).min(4));
                    span.in_scope(
                        || tracing::warn!(model = %entry.name, step, failures, "a model the expected manifest added could not be served: {message}"),
                    );
                    fail(&node, &entry.name, pin, step, message);
                    retry_at.insert(entry.name.clone(), Instant::now() + wait);
                    update(&node, &entry.name, |s| s.at = Some(epoch_of(Instant::now() + wait)));
                }
            }
        }
        if node.config.sync.remove && expected.models.is_empty() {
            tracing::warn!("the expected manifest lists no models: nothing is removed (an empty manifest is more likely a mistake than an order)");
        } else if node.config.sync.remove {
            for slot in node.registry.slots() {
                let Some(entry) = slot.entry() else { continue };
                if expected.get(&entry.name).is_some() || !matches!(slot.stage(), Stage::Ready | Stage::Failed(_)) {
                    continue;
                }
                if node.registry.remove(slot.name()).is_some() {
                    tracing::warn!(model = %slot.name(), "the expected manifest no longer lists this model: no longer served (sync.remove)");
                    update(&node, slot.name(), |s| {
                        *s = ApplyStatus { state: "removed", at: Some(epoch_of(Instant::now())), ..Default::default() };
                    });
                }
            }
        }
    }
}

/// A model the expected manifest lists and this node does not serve: fetched, verified,
/// loaded, warmed and probed on a slot of its own (every option at its default), which joins
/// the registry only once it is ready, so the node's readiness never waits on it.
async fn add(node: &Arc<Node>, entry: ManifestEntry, device: &Device, restarts: &Restarts) -> Result<String, (&'static str, String)> {
    if node.registry.get(&entry.name).is_some() {
        return Err(("check", format!("a model named {:?} is served already, from another manifest entry", entry.name)));
    }
    let slot = Arc::new(ModelSlot::new(ModelConfig::new(&entry.name, entry.kind), Some(entry.clone())));
    slot.update_facts(|f| f.device = Some(node.device.clone()));
    let dir = entry_dir(node, &entry);
    update(node, &entry.name, |s| s.state = "fetching");
    let verified = verify_files(node, &slot, &entry, &dir).await.map_err(|e| ("fetch", e))?;
    update(node, &entry.name, |s| s.state = "loading");
    let loaded = load_version(node, &slot, entry.clone(), verified, &dir, device, restarts, true).await.map_err(|e| ("load", e))?;
    if let Some(probe) = &entry.probe {
        update(node, &entry.name, |s| s.state = "probing");
        run_probe(&entry.name, &loaded.service, probe).await.map_err(|e| ("probe", e))?;
    }
    slot.install(loaded);
    if !node.registry.add(slot.clone()) {
        return Err(("check", format!("a model named {:?} was added meanwhile", entry.name)));
    }
    if let Err(e) = crate::models::store::set_applied(&node.config.store.dir, &entry) {
        tracing::warn!(model = %entry.name, "cannot record the model: {e}");
    }
    Ok(slot.label())
}

fn update(node: &Node, name: &str, f: impl FnOnce(&mut ApplyStatus)) {
    f(node.upgrades.write().entry(name.to_string()).or_default());
}

fn fail(node: &Node, name: &str, target: Pin, step: &'static str, message: String) {
    METRICS.model_sync_failures.with_label_values(&[name, step]).inc();
    update(node, name, |s| {
        s.state = "failed";
        s.target = Some(target);
        s.error = Some(format!("{step}: {message}"));
        s.failures += 1;
        s.fetch = None;
    });
}

/// Fetch → verify → load and warm up → probe → switch. Returns the new version's label, or
/// the step that failed and why; on failure nothing about the serving version changed.
async fn apply(
    node: &Arc<Node>,
    slot: &Arc<ModelSlot>,
    target: ManifestEntry,
    device: &Device,
    restarts: &Restarts,
) -> Result<String, (&'static str, String)> {
    let name = slot.name().to_string();
    let store = node.config.store.dir.clone();
    let dir = entry_dir(node, &target);
    let step = |state: &'static str| update(node, &name, |s| s.state = state);

    let verified = if will_fetch(&target, &dir, true) {
        step("fetching");
        let (n, model) = (node.clone(), name.clone());
        let fetched = fetch_files(node, &target, &dir, move |p| update(&n, &model, |s| s.fetch = Some(p.clone()))).await;
        update(node, &name, |s| s.fetch = None);
        fetched.map_err(|e| ("fetch", e))?
    } else {
        step("verifying");
        verify_in(&target, &dir).await.map_err(|e| ("verify", e))?
    };
    if dir != target.dir(&store) {
        if let Err(e) = crate::models::store::write_entry(&store, &target) {
            tracing::warn!(model = %name, "cannot record the version's manifest entry beside its folder: {e}");
        }
    }

    // Two versions at once past limits.max_model_bytes: unload the serving one first, an
    // announced unavailability of this model rather than an out-of-memory kill.
    let cap = node.config.limits.max_model_bytes;
    let old = slot.entry();
    let unload = cap > 0 && loaded_bytes(node) + files_bytes(&target, &dir) > cap;
    if unload {
        let secs = slot.load_seconds().ceil() as u64 + 1;
        tracing::warn!(model = %name, cap, retry_after_s = secs, "two versions do not fit limits.max_model_bytes: unloading the serving one first; the model answers 503 meanwhile");
        let old_service = slot.current().map(|i| i.service);
        slot.unload_for(Stage::Loading, secs);
        if let Some(old) = old_service {
            wait_until_dropped(&name, old, Duration::from_secs(node.config.server.drain_grace_s)).await;
        }
    }
    step("loading");
    let outcome = async {
        let loaded = load_version(node, slot, target.clone(), verified, &dir, device, restarts, false).await.map_err(|e| ("load", e))?;
        if let Some(probe) = &target.probe {
            step("probing");
            run_probe(&name, &loaded.service, probe).await.map_err(|e| ("probe", e))?;
        }
        Ok(loaded)
    }
    .await;
    let loaded = match outcome {
        Ok(loaded) => loaded,
        Err(e) => {
            if let (true, Some(old)) = (unload, old) {
                restore(node, slot, old, device, restarts).await;
            }
            return Err(e);
        }
    };

    let old_dir = slot.entry().map(|e| entry_dir(node, &e));
    let label = switch(node, slot, loaded, &target, if unload { Switch::Unloaded } else { Switch::Beside });
    rebuild_dependents(node, slot).await;
    let mut protect = vec![dir.as_path()];
    protect.extend(old_dir.as_deref());
    for removed in crate::models::store::prune(&store, &target.name, node.config.store.keep_versions, &protect) {
        tracing::info!(model = %name, folder = %removed.display(), "removed an old version (store.keep_versions)");
    }
    Ok(label)
}

/// How a switch happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Switch {
    /// Loaded beside the serving version: requests move over, the old one drains.
    Beside,
    /// The serving version was unloaded first (`limits.max_model_bytes`).
    Unloaded,
    /// Back to the version before the last switch (`POST /models/{name}/rollback`).
    Rollback,
}

/// Switches `slot` to a loaded version of `target` and records it for the next boot (and the
/// version it replaced, for a rollback). Returns its label.
fn switch(node: &Arc<Node>, slot: &Arc<ModelSlot>, loaded: Loaded, target: &ManifestEntry, how: Switch) -> String {
    let store = &node.config.store.dir;
    // A rollback records no "previous": the version rolled back from is held, not returned to.
    let replaced = slot.entry().filter(|_| how != Switch::Rollback);
    if how == Switch::Unloaded || slot.current().is_none() {
        slot.install(loaded);
    } else {
        let keep = (node.config.sync.keep_previous_s > 0).then(|| Instant::now() + Duration::from_secs(node.config.sync.keep_previous_s));
        slot.switch(loaded, keep);
    }
    let recorded = crate::models::store::set_applied(store, target).and_then(|()| match &replaced {
        Some(old) => crate::models::store::set_previous(store, old),
        None => Ok(()),
    });
    if let Err(e) = recorded {
        tracing::warn!(model = %slot.name(), "cannot record the switch for the next restart: {e}");
    }
    slot.label()
}

/// `POST /models/{name}/rollback`: back to the version served before the last switch, from
/// disk (never a download), then held there until the central manifest names another.
async fn rollback(node: &Arc<Node>, model: &str, device: &Device, restarts: &Restarts) -> Result<String, String> {
    let slot = &node.registry.get(model).ok_or_else(|| format!("no model {model:?} is served"))?;
    let serving = slot.entry().ok_or_else(|| format!("model {model:?} has no files of its own to roll back"))?;
    let store = node.config.store.dir.clone();
    let previous = crate::models::store::previous(&store, &serving.name)
        .filter(|p| p.digest() != serving.digest())
        .ok_or_else(|| format!("model {model:?} has not switched versions on this node: there is no earlier version to roll back to"))?;
    let dir = entry_dir(node, &previous);
    if needs_fetch(&previous, &dir) {
        return Err(format!(
            "version {} of {model:?} is no longer on disk (store.keep_versions removed it): publish it in the central manifest instead",
            previous.version
        ));
    }
    let span = tracing::info_span!("model.rollback", model = %model, version = %previous.version);
    async {
        let verified = verify_in(&previous, &dir).await.map_err(|e| format!("verify: {e}"))?;
        let loaded = load_version(node, slot, previous.clone(), verified, &dir, device, restarts, false).await.map_err(|e| format!("load: {e}"))?;
        let label = switch(node, slot, loaded, &previous, Switch::Rollback);
        rebuild_dependents(node, slot).await;
        if let Err(e) = crate::models::store::set_hold(&store, &serving.name, Some(&serving.digest())) {
            tracing::warn!(model = %model, "cannot record the hold: {e}");
        }
        tracing::info!(model = %model, label = %label, held = %serving.version, "rolled back");
        update(node, model, |s| {
            s.state = "held";
            s.target = Some(Pin { version: serving.version.clone(), digest: serving.digest() });
            s.error = None;
            s.failures = 0;
        });
        Ok(label)
    }
    .instrument(span)
    .await
}

/// Waits (up to `limit`) until every request holding an unloaded version has finished, so
/// its memory is returned before the next version loads. A prototype classifier built on an
/// embedder holds it until rebuilt: past the limit the load goes ahead, with a warning.
async fn wait_until_dropped(model: &str, service: Service, limit: Duration) {
    let deadline = Instant::now() + limit;
    while service.holders() > 1 {
        if Instant::now() >= deadline {
            tracing::warn!(model = %model, limit_s = limit.as_secs(), "the unloaded version is still in use; loading the new one beside it");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After a failed switch that had unloaded the serving version: load it again, so the model
/// is back as it was. A failure here leaves the model failed, with the reason.
async fn restore(node: &Arc<Node>, slot: &Arc<ModelSlot>, old: ManifestEntry, device: &Device, restarts: &Restarts) {
    let dir = entry_dir(node, &old);
    let result = async {
        let verified = verify_in(&old, &dir).await?;
        load_version(node, slot, old, verified, &dir, device, restarts, true).await
    }
    .await;
    match result {
        Ok(loaded) => slot.install(loaded),
        Err(e) => slot.set_stage(Stage::Failed(format!("the new version failed and the old one could not be loaded again: {e}"))),
    }
}

/// Bytes of model files the node holds loaded now: every installed version of a model with
/// files, and a previous version still kept for pinned requests (counted at its successor's
/// size: versions of one model are alike).
fn loaded_bytes(node: &Node) -> u64 {
    node.registry
        .slots()
        .iter()
        .map(|s| {
            let current = s.entry().filter(|_| s.current().is_some()).map_or(0, |e| files_bytes(&e, &entry_dir(node, &e)));
            let kept = s.previous().map_or(0, |_| current);
            current + kept
        })
        .sum()
}

/// The size of a version's files on disk (what loading it maps or reads).
fn files_bytes(entry: &ManifestEntry, dir: &std::path::Path) -> u64 {
    entry.files.iter().map(|f| std::fs::metadata(dir.join(&f.path)).map(|m| m.len()).unwrap_or(f.size.unwrap_or(0))).sum()
}

/// Prototype classifiers built on a model that switched move to its new version too: their
/// labels' centroids are embedded again in the new space, then they switch.
async fn rebuild_dependents(node: &Arc<Node>, embedder: &Arc<ModelSlot>) {
    let Some(Service::Encoder(encoder)) = embedder.current_service() else { return };
    for slot in node.registry.slots() {
        let builds_on = slot.config.kind == ModelKind::Classify && slot.entry().is_none() && slot.config.embedder.as_deref() == Some(embedder.name());
        if !builds_on || slot.stage() != Stage::Ready {
            continue;
        }
        match build_prototype(node, &slot, encoder.clone()).await {
            Ok(loaded) => slot.switch(loaded, None),
            Err(e) => {
                tracing::error!(model = %slot.name(), embedder = %embedder.name(), "cannot rebuild on the embedder's new version; it keeps the old one: {e}")
            }
        }
    }
}

/// Runs a version's probe against it before it serves.
async fn run_probe(name: &str, service: &Service, probe: &Probe) -> Result<(), String> {
    match service {
        Service::Encoder(e) => {
            let encoded = e.encode_internal(probe.inputs.clone(), Truncation::Right, true).await.map_err(|e| e.to_string())?;
            probe.judge_vectors(&encoded.rows).map(|_| ())
        }
        Service::Generator(g) => {
            let expected = g.tokenize(probe.completion.as_deref().unwrap_or_default(), false).map_err(|e| e.to_string())?;
            let prompt = PromptInput::Text(probe.prompt.clone().unwrap_or_default());
            let prepared = g.prepare(prompt, Some(expected.len().max(1) as i64)).await.map_err(|e| e.to_string())?;
            let mut generation = g.start(prepared, Sampler::new(SamplingParams::greedy()), vec![], false).await.map_err(|e| e.to_string())?;
            let mut text = String::new();
            while let Some(piece) = generation.next().await {
                match piece {
                    Piece::Text { text: t, .. } => text.push_str(&t),
                    Piece::Done(..) => break,
                    Piece::Error(e) => return Err(e.to_string()),
                }
            }
            let got = g.tokenize(&text, false).map_err(|e| e.to_string())?;
            probe.judge_tokens(&expected, &got).map(|_| ())
        }
        Service::Prototype(_) => Err(format!("model {name} is a prototype classifier; it has no files to probe")),
    }
}

/// Who this node is, for its share of the rollout window: the Fly Machine id, else the
/// host name.
pub fn node_identity() -> String {
    std::env::var("FLY_MACHINE_ID")
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default()
}

/// A stable number in [0, 1) from the node's identity: the same on every restart, spread
/// evenly across a fleet.
pub fn jitter_share(identity: &str) -> f64 {
    use sha2::Digest as _;
    let h = sha2::Sha256::digest(identity.as_bytes());
    let n = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
    (n >> 11) as f64 / (1u64 << 53) as f64
}

fn epoch_of(at: Instant) -> u64 {
    let now = Instant::now();
    let wall = SystemTime::now();
    let t = if at >= now { wall + (at - now) } else { wall - (now - at) };
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rollout_share_is_stable_and_spread() {
        assert_eq!(jitter_share("machine-a"), jitter_share("machine-a"));
        let shares: Vec<f64> = (0..1000).map(|i| jitter_share(&format!("machine-{i}"))).collect();
        assert!(shares.iter().all(|s| (0.0..1.0).contains(s)));
        let early = shares.iter().filter(|s| **s < 0.5).count();
        assert!((400..600).contains(&early), "{early} of 1000 in the first half");
    }
}
