//! The models this node serves, each with its lifecycle stage and, once warm, its service.
//!
//! The registry is built from the config before anything loads, so `/readyz` and `/info`
//! can describe every model from the first request on. The boot sequence (`crate::boot`)
//! moves each model through its stages; requests wait on a model's stage (a `watch`
//! channel) and only ever reach a model whose service is installed, i.e. fully warm.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use serde::Serialize;
use tokio::sync::watch;

use anyhow::Context;

use crate::config::{Config, ModelConfig, ModelKind};
use crate::error::Error;
use crate::models::manifest::{Manifest, ManifestEntry};
use crate::service::Service;

/// Where a model is in its boot sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Waiting for its turn.
    Pending,
    /// Downloading its package (files were missing).
    Fetching,
    /// Hashing its files against the manifest.
    Verifying,
    /// Reading weights onto the device.
    Loading,
    /// Compiling our CUDA kernels with NVRTC for this GPU (CUDA devices only).
    CompilingKernels,
    /// Running warm-up inputs at the shapes traffic will use.
    WarmingUp,
    /// Serving.
    Ready,
    /// Restarting after its worker died.
    Restarting,
    /// It could not be loaded; the message says why.
    Failed(String),
}

impl Stage {
    /// A short name for logs and JSON (`failed` without its message).
    pub fn name(&self) -> &'static str {
        match self {
            Stage::Pending => "pending",
            Stage::Fetching => "fetching",
            Stage::Verifying => "verifying",
            Stage::Loading => "loading",
            Stage::CompilingKernels => "compiling_kernels",
            Stage::WarmingUp => "warming_up",
            Stage::Ready => "ready",
            Stage::Restarting => "restarting",
            Stage::Failed(_) => "failed",
        }
    }
}

/// What `/info` says about a model beyond its config.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModelFacts {
    /// The manifest version.
    pub version: Option<String>,
    /// The model digest that was verified on disk.
    pub digest: Option<String>,
    /// Each file and its verified sha256.
    pub files: BTreeMap<String, String>,
    /// The device it runs on.
    pub device: Option<String>,
    /// Seconds spent in each stage, in boot order.
    pub stage_seconds: Vec<(String, f64)>,
    /// Facts the model reports about itself (dimensions, max tokens, context...).
    pub details: BTreeMap<String, serde_json::Value>,
    /// While its files download: which file, bytes done and in all.
    pub fetch: Option<crate::models::download::Progress>,
}

/// One loaded version of a model, warm and ready to be installed in its slot.
pub struct Loaded {
    /// Unique per load: a worker that ends acts on its slot only while its version is the
    /// one installed.
    pub id: u64,
    pub service: Service,
    /// The manifest entry it was loaded from (`None` for a prototype classifier).
    pub entry: Option<ManifestEntry>,
    /// What `/info` reports about this version (version, digest, files, details).
    pub facts: ModelFacts,
}

/// A number no other load has had.
pub fn next_load_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The version a slot serves, as requests take it: the service with the label that names
/// it, so an answer names the version that computed it even if a switch happens meanwhile.
#[derive(Clone)]
pub struct Installed {
    pub id: u64,
    pub service: Service,
    /// `NAME@VERSION+DIGEST12`.
    pub label: String,
    pub version: Option<String>,
    pub digest: Option<String>,
}

impl Installed {
    /// Whether a request's version pin (`@1.5`, or `@` a digest prefix of 4+ hex digits)
    /// names this version.
    pub fn matches(&self, pin: &str) -> bool {
        let hex = pin.len() >= 4 && pin.chars().all(|c| c.is_ascii_hexdigit());
        self.version.as_deref() == Some(pin) || (hex && self.digest.as_deref().is_some_and(|d| d.starts_with(&pin.to_ascii_lowercase())))
    }
}

/// One served model.
pub struct ModelSlot {
    pub config: ModelConfig,
    /// Its manifest entry (`None` for a prototype classifier, which has no files of its
    /// own): the version being booted, then the one serving; model sync replaces it.
    entry: RwLock<Option<ManifestEntry>>,
    stage: watch::Sender<Stage>,
    facts: RwLock<ModelFacts>,
    current: RwLock<Option<Installed>>,
    /// The version a switch replaced, still answering requests that pin it until the instant
    /// given (`sync.keep_previous_s`).
    previous: RwLock<Option<(Installed, Instant)>>,
    stage_started: parking_lot::Mutex<Instant>,
    /// While the model is out of service on purpose (a switch that could not hold two
    /// versions), the seconds a client should wait: its `Retry-After`.
    retry_after_s: std::sync::atomic::AtomicU64,
}

impl ModelSlot {
    /// A slot in no registry yet: model sync loads a model the central manifest added before
    /// it joins the registry, so the node's readiness never depends on it.
    pub fn new(config: ModelConfig, entry: Option<ManifestEntry>) -> Self {
        let facts = ModelFacts { version: entry.as_ref().map(|e| e.version.clone()), ..Default::default() };
        ModelSlot {
            config,
            entry: RwLock::new(entry),
            stage: watch::channel(Stage::Pending).0,
            facts: RwLock::new(facts),
            current: RwLock::new(None),
            previous: RwLock::new(None),
            stage_started: parking_lot::Mutex::new(Instant::now()),
            retry_after_s: std::sync::atomic::AtomicU64::new(5),
        }
    }

    /// The manifest entry of the version booting or serving.
    pub fn entry(&self) -> Option<ManifestEntry> {
        self.entry.read().clone()
    }

    /// Boots another entry than the one the registry was built with (the version model sync
    /// switched to before a restart).
    pub fn set_entry(&self, entry: ManifestEntry) {
        self.facts.write().version = Some(entry.version.clone());
        *self.entry.write() = Some(entry);
    }

    /// The id of the version installed now.
    pub fn installed_id(&self) -> Option<u64> {
        self.current.read().as_ref().map(|i| i.id)
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The current stage.
    pub fn stage(&self) -> Stage {
        self.stage.borrow().clone()
    }

    /// Moves to `stage`, recording how long the previous stage took.
    pub fn set_stage(&self, stage: Stage) {
        let now = Instant::now();
        let previous = self.stage();
        {
            let mut started = self.stage_started.lock();
            if previous != Stage::Pending && previous != Stage::Ready && !matches!(previous, Stage::Failed(_)) {
                let secs = now.duration_since(*started).as_secs_f64();
                self.facts.write().stage_seconds.push((previous.name().to_string(), secs));
            }
            *started = now;
        }
        match &stage {
            Stage::Failed(msg) => tracing::error!(model = %self.name(), "failed: {msg}"),
            Stage::Ready => {
                let facts = self.facts.read();
                let stages: Vec<String> = facts.stage_seconds.iter().map(|(k, v)| format!("{k}={v:.3}s")).collect();
                tracing::info!(model = %self.name(), label = %self.label_of(&facts), stages = %stages.join(" "), "ready");
            }
            s => tracing::info!(model = %self.name(), stage = s.name(), "stage"),
        }
        let metrics = &crate::telemetry::metrics::METRICS;
        metrics.model_ready.with_label_values(&[self.name()]).set(i64::from(stage == Stage::Ready));
        self.stage.send_replace(stage);
    }

    /// Edits what `/info` reports.
    pub fn update_facts(&self, f: impl FnOnce(&mut ModelFacts)) {
        f(&mut self.facts.write());
    }

    /// A copy of what `/info` reports.
    pub fn facts(&self) -> ModelFacts {
        self.facts.read().clone()
    }

    /// Reads what `/info` reports without copying it (for per-request use).
    pub fn with_facts<R>(&self, f: impl FnOnce(&ModelFacts) -> R) -> R {
        f(&self.facts.read())
    }

    /// Installs a warm version and marks the model ready.
    pub fn install(&self, loaded: Loaded) {
        self.retry_after_s.store(5, std::sync::atomic::Ordering::Relaxed);
        self.put(loaded);
        self.set_stage(Stage::Ready);
    }

    /// Serves `loaded` from now on, in place of the version serving: requests that already
    /// hold the old version finish on it (it is dropped with its last user). With `keep`,
    /// the old version goes on answering requests that pin it until then.
    pub fn switch(&self, loaded: Loaded, keep: Option<Instant>) {
        let old = self.current.read().clone();
        *self.previous.write() = match (old, keep) {
            (Some(old), Some(until)) => Some((old, until)),
            _ => None,
        };
        let label = self.put(loaded);
        tracing::info!(model = %self.name(), label = %label, "switched to a new version");
    }

    /// Replaces entry, facts (keeping the boot's stage timings) and the installed version.
    fn put(&self, loaded: Loaded) -> String {
        let Loaded { id, service, entry, facts } = loaded;
        if let Some(e) = entry {
            *self.entry.write() = Some(e);
        }
        let label = {
            let mut f = self.facts.write();
            let stage_seconds = std::mem::take(&mut f.stage_seconds);
            *f = ModelFacts { stage_seconds, ..facts };
            self.label_of(&f)
        };
        let (version, digest) = self.with_facts(|f| (f.version.clone(), f.digest.clone()));
        *self.current.write() = Some(Installed { id, service, label: label.clone(), version, digest });
        label
    }

    /// Takes the service away if version `id` is the one installed (its worker died), in one
    /// step, so a switch that happened meanwhile is never undone. True when it did.
    pub fn uninstall_if(&self, id: u64, stage: Stage) -> bool {
        {
            let mut current = self.current.write();
            if current.as_ref().map(|i| i.id) != Some(id) {
                return false;
            }
            *current = None;
        }
        self.set_stage(stage);
        true
    }

    /// Takes the service away (its worker died); requests wait again until it is back.
    pub fn uninstall(&self, stage: Stage) {
        *self.current.write() = None;
        self.set_stage(stage);
    }

    /// Takes the service away for a reload that is expected to take `retry_after_s`:
    /// requests wait for it (`server.ready_wait_s`), then get 503 with that `Retry-After`.
    pub fn unload_for(&self, stage: Stage, retry_after_s: u64) {
        self.retry_after_s.store(retry_after_s.max(1), std::sync::atomic::Ordering::Relaxed);
        *self.previous.write() = None;
        self.uninstall(stage);
    }

    /// Seconds this version took to load and warm up at boot (for a `Retry-After`).
    pub fn load_seconds(&self) -> f64 {
        self.with_facts(|f| f.stage_seconds.iter().filter(|(s, _)| s == "loading" || s == "warming_up" || s == "verifying").map(|(_, v)| v).sum())
    }

    /// The version a switch replaced and until when it answers pinned requests, if it still
    /// does.
    pub fn previous(&self) -> Option<(Installed, Instant)> {
        let mut previous = self.previous.write();
        if previous.as_ref().is_some_and(|(_, until)| *until <= Instant::now()) {
            // Past its time: dropped here, so its memory goes once its last request ends.
            *previous = None;
        }
        previous.clone()
    }

    /// Records on the current request's span which model answers it (version, digest, device).
    pub fn record_on_span(&self) {
        self.with_facts(|f| crate::telemetry::trace::record_model(self.name(), f.version.as_deref(), f.digest.as_deref(), f.device.as_deref()));
    }

    /// The service, if the model is ready now (no waiting).
    pub fn current_service(&self) -> Option<Service> {
        self.current.read().as_ref().map(|i| i.service.clone())
    }

    /// The installed version, if the model is ready now (no waiting).
    pub fn current(&self) -> Option<Installed> {
        self.current.read().clone()
    }

    /// `NAME@VERSION+DIGEST12` for the `x-edgenode-model` header.
    pub fn label(&self) -> String {
        self.label_of(&self.facts.read())
    }

    fn label_of(&self, facts: &ModelFacts) -> String {
        match (&facts.version, &facts.digest) {
            (Some(v), Some(d)) => format!("{}@{}+{}", self.name(), v, &d[..d.len().min(12)]),
            _ => self.name().to_string(),
        }
    }

    /// The service, once the model is ready; waits up to `wait` while it is still booting.
    pub async fn ready_service(&self, wait: Duration) -> Result<Service, Error> {
        self.ready_installed(None, wait).await.map(|i| i.service)
    }

    /// The installed version a request gets, once the model is ready (waiting up to `wait`
    /// while it boots): the current one, or with a version pin the one it names (the current
    /// one, or the previous one within `sync.keep_previous_s` of a switch), else 409
    /// `model_version_unavailable` naming what is served. Never a version the pin does not
    /// name: vectors of two embedding spaces must not mix silently.
    pub async fn ready_installed(&self, pin: Option<&str>, wait: Duration) -> Result<Installed, Error> {
        let mut rx = self.stage.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let stage = rx.borrow_and_update().clone();
            match stage {
                Stage::Ready => {
                    if let Some(current) = self.current() {
                        let Some(pin) = pin else { return Ok(current) };
                        if current.matches(pin) {
                            return Ok(current);
                        }
                        if let Some((previous, _)) = self.previous().filter(|(p, _)| p.matches(pin)) {
                            return Ok(previous);
                        }
                        let serving = match self.previous() {
                            Some((p, until)) => format!(
                                "{} (and {} for {} s more)",
                                current.label,
                                p.label,
                                until.saturating_duration_since(Instant::now()).as_secs()
                            ),
                            None => current.label,
                        };
                        return Err(Error::ModelVersionUnavailable { model: self.name().to_string(), requested: pin.to_string(), serving });
                    }
                }
                Stage::Failed(message) => {
                    return Err(Error::NotReady { message: format!("model {:?} failed to load: {message}", self.name()), retry_after_s: 30 })
                }
                _ => {}
            }
            let woke = tokio::time::timeout_at(deadline, rx.changed()).await;
            if !matches!(woke, Ok(Ok(()))) {
                return Err(Error::NotReady {
                    message: format!("model {:?} is not ready yet (stage: {})", self.name(), self.stage().name()),
                    retry_after_s: self.retry_after_s.load(std::sync::atomic::Ordering::Relaxed),
                });
            }
        }
    }
}

/// A model as one request resolved it: the slot, the version the request pins (if any),
/// and, once the request took a version, that version's label for its answer's header.
/// It holds the slot itself, so a model that model sync removes meanwhile still finishes
/// the requests that resolved it.
pub struct SlotRef<'a> {
    slot: Arc<ModelSlot>,
    pin: Option<String>,
    chosen: std::sync::OnceLock<String>,
    /// Resolved from a registry, for as long as the request borrows it.
    _registry: std::marker::PhantomData<&'a Registry>,
}

impl std::ops::Deref for SlotRef<'_> {
    type Target = Arc<ModelSlot>;
    fn deref(&self) -> &Arc<ModelSlot> {
        &self.slot
    }
}

impl<'a> SlotRef<'a> {
    fn new(slot: Arc<ModelSlot>, pin: Option<String>) -> SlotRef<'a> {
        SlotRef { slot, pin, chosen: std::sync::OnceLock::new(), _registry: std::marker::PhantomData }
    }

    /// A slot reached without a request's model name (so without a version pin).
    pub fn unpinned(slot: &Arc<ModelSlot>) -> SlotRef<'a> {
        SlotRef::new(slot.clone(), None)
    }

    /// The service of the version this request gets (see `ModelSlot::ready_installed`).
    pub async fn ready_service(&self, wait: Duration) -> Result<Service, Error> {
        let installed = self.slot.ready_installed(self.pin.as_deref(), wait).await?;
        let _ = self.chosen.set(installed.label.clone());
        Ok(installed.service)
    }

    /// The label of the version that answered (once `ready_service` chose it), else the
    /// current one's.
    pub fn label(&self) -> String {
        self.chosen.get().cloned().unwrap_or_else(|| self.slot.label())
    }

    /// The slot itself, for work that outlives the request.
    pub fn slot(&self) -> &Arc<ModelSlot> {
        &self.slot
    }
}

/// All served models, in config order, then the ones model sync added. Model sync may add
/// and remove models while requests run, so the list is behind a lock and handed out as
/// shared handles; a request keeps the slot it resolved.
pub struct Registry {
    slots: RwLock<Vec<Arc<ModelSlot>>>,
    /// `server.model_aliases`: a name clients send → the model it means (`None`: the
    /// route's default model of the kind it needs).
    aliases: std::collections::HashMap<String, Option<String>>,
}

impl Registry {
    /// Resolves each configured model's manifest entry; a model that needs one and lacks it,
    /// or whose entry is of another kind, stops start-up.
    pub fn build(config: &Config, manifest: &Manifest) -> anyhow::Result<Registry> {
        let mut models = Vec::new();
        for m in &config.models {
            let prototype = m.kind == ModelKind::Classify && m.labels.is_some();
            let entry = if prototype {
                if m.manifest.is_some() {
                    anyhow::bail!("model {:?}: a prototype classifier (with `labels`) takes no manifest entry", m.name);
                }
                None
            } else {
                let e = manifest
                    .get(m.manifest_entry())
                    .with_context(|| format!("model {:?}: the manifest has no entry {:?}", m.name, m.manifest_entry()))?;
                if e.kind != m.kind {
                    anyhow::bail!("model {:?} is {} but manifest entry {:?} is {}", m.name, m.kind, e.name, e.kind);
                }
                Some(e.clone())
            };
            models.push((m.clone(), entry));
        }
        let mut registry = Registry::new(models);
        registry.aliases =
            config.server.model_aliases.iter().map(|(alias, target)| (alias.clone(), (target != "*").then(|| target.clone()))).collect();
        Ok(registry)
    }

    /// One slot per configured model, with its manifest entry resolved.
    pub fn new(models: Vec<(ModelConfig, Option<ManifestEntry>)>) -> Self {
        Registry { slots: RwLock::new(models.into_iter().map(|(c, e)| Arc::new(ModelSlot::new(c, e))).collect()), aliases: Default::default() }
    }

    /// Every slot, now.
    pub fn slots(&self) -> Vec<Arc<ModelSlot>> {
        self.slots.read().clone()
    }

    /// The slot of this name.
    pub fn get(&self, name: &str) -> Option<Arc<ModelSlot>> {
        self.slots.read().iter().find(|s| s.name() == name).cloned()
    }

    /// Serves a loaded slot from now on (model sync: a model the central manifest added);
    /// `false` when one of that name is already served.
    pub fn add(&self, slot: Arc<ModelSlot>) -> bool {
        let mut slots = self.slots.write();
        if slots.iter().any(|s| s.name() == slot.name()) {
            return false;
        }
        slots.push(slot);
        true
    }

    /// Stops serving a model (model sync with `sync.remove`): new requests for it get 404;
    /// requests that already resolved it finish, and its memory goes with the last of them.
    pub fn remove(&self, name: &str) -> Option<Arc<ModelSlot>> {
        let mut slots = self.slots.write();
        let i = slots.iter().position(|s| s.name() == name)?;
        let slot = slots.remove(i);
        drop(slots);
        *slot.previous.write() = None;
        slot.uninstall(Stage::Pending);
        Some(slot)
    }

    /// The names of the models of one kind.
    pub fn names_of(&self, kind: ModelKind) -> Vec<String> {
        self.slots.read().iter().filter(|s| s.config.kind == kind).map(|s| s.name().to_string()).collect()
    }

    /// The model a request asked for (or the first of the kind when it named none). A name
    /// may pin a version: `bge-small@1.5`, or `@` a digest prefix.
    pub fn resolve(&self, requested: Option<&str>, kind: ModelKind) -> Result<SlotRef<'_>, Error> {
        let (name, pin) = match requested.and_then(|r| r.split_once('@')) {
            Some((name, pin)) if !pin.is_empty() => (Some(name), Some(pin.to_string())),
            _ => (requested, None),
        };
        // An alias stands for its model; a served model's own name always wins (the
        // config refuses an alias that is one).
        let name = match name.and_then(|n| self.aliases.get(n).filter(|_| self.get(n).is_none())) {
            Some(target) => target.as_deref(),
            None => name,
        };
        let slot = self.resolve_name(name, kind).map_err(|e| match (e, requested) {
            (Error::UnknownModel { kind, served, .. }, Some(r)) => Error::UnknownModel { name: r.to_string(), kind, served },
            (e, _) => e,
        })?;
        Ok(SlotRef::new(slot, pin))
    }

    fn resolve_name(&self, requested: Option<&str>, kind: ModelKind) -> Result<Arc<ModelSlot>, Error> {
        let found = match requested {
            Some(name) => self.get(name).filter(|s| s.config.kind == kind),
            None => self.slots.read().iter().find(|s| s.config.kind == kind).cloned(),
        };
        found.ok_or_else(|| Error::UnknownModel {
            name: requested.unwrap_or("").to_string(),
            kind: kind.as_str(),
            served: {
                let names = self.names_of(kind);
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            },
        })
    }

    /// True when every model is ready.
    pub fn all_ready(&self) -> bool {
        self.slots.read().iter().all(|s| s.stage() == Stage::Ready)
    }
}
