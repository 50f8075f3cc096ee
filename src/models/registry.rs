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

/// One served model.
pub struct ModelSlot {
    pub config: ModelConfig,
    /// Its manifest entry (`None` for a prototype classifier, which has no files of its own).
    pub entry: Option<ManifestEntry>,
    stage: watch::Sender<Stage>,
    facts: RwLock<ModelFacts>,
    service: RwLock<Option<Service>>,
    stage_started: parking_lot::Mutex<Instant>,
}

impl ModelSlot {
    fn new(config: ModelConfig, entry: Option<ManifestEntry>) -> Self {
        let facts = ModelFacts { version: entry.as_ref().map(|e| e.version.clone()), ..Default::default() };
        ModelSlot {
            config,
            entry,
            stage: watch::channel(Stage::Pending).0,
            facts: RwLock::new(facts),
            service: RwLock::new(None),
            stage_started: parking_lot::Mutex::new(Instant::now()),
        }
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

    /// Installs the warm service and marks the model ready.
    pub fn install(&self, service: Service) {
        *self.service.write() = Some(service);
        self.set_stage(Stage::Ready);
    }

    /// Takes the service away (its worker died); requests wait again until it is back.
    pub fn uninstall(&self, stage: Stage) {
        *self.service.write() = None;
        self.set_stage(stage);
    }

    /// Records on the current request's span which model answers it (version, digest, device).
    pub fn record_on_span(&self) {
        self.with_facts(|f| crate::telemetry::trace::record_model(self.name(), f.version.as_deref(), f.digest.as_deref(), f.device.as_deref()));
    }

    /// The service, if the model is ready now (no waiting).
    pub fn current_service(&self) -> Option<Service> {
        self.service.read().clone()
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
        let mut rx = self.stage.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let stage = rx.borrow_and_update().clone();
            match stage {
                Stage::Ready => {
                    if let Some(s) = self.service.read().clone() {
                        return Ok(s);
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
                    retry_after_s: 5,
                });
            }
        }
    }
}

/// All served models, in config order.
pub struct Registry {
    slots: Vec<Arc<ModelSlot>>,
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
        Ok(Registry::new(models))
    }

    /// One slot per configured model, with its manifest entry resolved.
    pub fn new(models: Vec<(ModelConfig, Option<ManifestEntry>)>) -> Self {
        Registry { slots: models.into_iter().map(|(c, e)| Arc::new(ModelSlot::new(c, e))).collect() }
    }

    /// Every slot.
    pub fn slots(&self) -> &[Arc<ModelSlot>] {
        &self.slots
    }

    /// The slot of this name.
    pub fn get(&self, name: &str) -> Option<&Arc<ModelSlot>> {
        self.slots.iter().find(|s| s.name() == name)
    }

    /// The names of the models of one kind.
    pub fn names_of(&self, kind: ModelKind) -> Vec<&str> {
        self.slots.iter().filter(|s| s.config.kind == kind).map(|s| s.name()).collect()
    }

    /// The model a request asked for (or the first of the kind when it named none).
    pub fn resolve(&self, requested: Option<&str>, kind: ModelKind) -> Result<&Arc<ModelSlot>, Error> {
        let found = match requested {
            Some(name) => self.get(name).filter(|s| s.config.kind == kind),
            None => self.slots.iter().find(|s| s.config.kind == kind),
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
        self.slots.iter().all(|s| s.stage() == Stage::Ready)
    }
}
