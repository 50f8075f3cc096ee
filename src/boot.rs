//! The boot sequence: the listener is already bound and answering (`/livez` 200, `/readyz`
//! 503 with each model's stage) while every model goes through fetch (if missing) →
//! verify digests → load → warm up → ready. Models boot concurrently; a classifier that
//! builds on an embedding model waits for that model first. A model that fails is marked
//! failed with its reason; the others still come up and serve.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use tokio::sync::mpsc;

use crate::batching::queue::{run_queue, BatchPolicy};
use crate::batching::worker::spawn_worker;
use crate::config::{Engine, ModelConfig, ModelKind, Pooling, Precision};
use crate::encoder::files::EncoderFiles;
use crate::encoder::prototype::{PrototypeClassifier, DEFAULT_TEMPERATURE};
use crate::encoder::tokenize::{InputTokenizer, Truncation};
use crate::encoder::{self, EncoderModel, EncoderService, EncoderTask};
use crate::generate::engine::Generator;
use crate::generate::native::NativeGenerator;
use crate::generate::{mistral, GenerateService};
use crate::models::download::Progress;
use crate::models::fetch::{fetch_into, FetchOptions};
use crate::models::manifest::{ManifestEntry, SourceKind};
use crate::models::registry::{next_load_id, Loaded, ModelFacts, ModelSlot, Stage};
use crate::models::verify::{needs_fetch, verify_model, Verified};
use crate::node::Node;
use crate::service::Service;

/// Where a model whose worker died is sent to be reloaded (the supervisor's inbox).
pub type Restarts = mpsc::UnboundedSender<Arc<ModelSlot>>;

/// Boots every model, then supervises them (reloading one whose worker died) until the
/// process ends. With `sync.apply`, a model boots the version model sync last switched it
/// to (`models::store::applied`), from disk, instead of its manifest's.
pub async fn boot_all(node: Arc<Node>, device: Device, (restarts, mut restart_rx): (Restarts, mpsc::UnboundedReceiver<Arc<ModelSlot>>)) {
    let started = Instant::now();
    if node.config.sync.apply {
        for slot in node.registry.slots() {
            let Some(entry) = slot.entry() else { continue };
            if let Some(applied) = crate::models::store::applied(&node.config.store.dir, &entry.name).filter(|a| a.kind == entry.kind) {
                if applied.digest() != entry.digest() {
                    tracing::info!(model = %slot.name(), version = %applied.version, "booting the version model sync switched to");
                    slot.set_entry(applied);
                }
            }
        }
    }
    let tasks: Vec<_> = node
        .registry
        .slots()
        .iter()
        .cloned()
        .map(|slot| {
            let node = node.clone();
            let device = device.clone();
            let restarts = restarts.clone();
            tokio::spawn(async move {
                if let Err(message) = boot_model(&node, &slot, &device, &restarts).await {
                    slot.set_stage(Stage::Failed(message));
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let ready = node.registry.slots().iter().filter(|s| s.stage() == Stage::Ready).count();
    tracing::info!(ready, models = node.registry.slots().len(), seconds = format!("{:.2}", started.elapsed().as_secs_f64()), "boot finished");
    supervise(node, device, restarts, &mut restart_rx).await;
}

/// Reloads a model whose worker thread died: `/readyz` shows it `restarting` meanwhile and
/// requests wait for it (up to `server.ready_wait_s`). A model that keeps dying is retried
/// with a growing pause, and given up (failed) after five restarts within ten minutes.
async fn supervise(
    node: Arc<Node>,
    device: Device,
    restarts: mpsc::UnboundedSender<Arc<ModelSlot>>,
    rx: &mut mpsc::UnboundedReceiver<Arc<ModelSlot>>,
) {
    let mut history: std::collections::HashMap<String, Vec<Instant>> = std::collections::HashMap::new();
    while let Some(slot) = rx.recv().await {
        let recent = history.entry(slot.name().to_string()).or_default();
        recent.retain(|t| t.elapsed() < std::time::Duration::from_secs(600));
        recent.push(Instant::now());
        if recent.len() > 5 {
            slot.set_stage(Stage::Failed("its worker died five times within ten minutes; not restarting again".into()));
            continue;
        }
        let pause = std::time::Duration::from_secs(1 << (recent.len() - 1).min(5));
        tracing::warn!(model = %slot.name(), pause_s = pause.as_secs(), "model worker died; restarting it");
        let (node, device, restarts) = (node.clone(), device.clone(), restarts.clone());
        tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            if let Err(message) = boot_model(&node, &slot, &device, &restarts).await {
                slot.set_stage(Stage::Failed(message));
            }
        });
    }
}

/// Runs blocking work (hashing, loading) off the async workers.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, String> + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| format!("the boot task panicked: {e}"))?
}

async fn boot_model(
    node: &Arc<Node>,
    slot: &Arc<ModelSlot>,
    device: &Device,
    restarts: &mpsc::UnboundedSender<Arc<ModelSlot>>,
) -> Result<(), String> {
    slot.update_facts(|f| f.device = Some(node.device.clone()));
    let loaded = match slot.entry() {
        Some(entry) => {
            let dir = entry_dir(node, &entry);
            let verified = verify_files(node, slot, &entry, &dir).await?;
            load_version(node, slot, entry, verified, &dir, device, restarts, true).await?
        }
        None if slot.config.kind == ModelKind::Classify => {
            let embedder = wait_for_embedder(node, &slot.config).await?;
            slot.set_stage(Stage::WarmingUp);
            build_prototype(node, slot, embedder).await?
        }
        None => return Err(format!("a {} model needs a manifest entry with its files", slot.config.kind)),
    };
    slot.install(loaded);
    Ok(())
}

/// Where a manifest entry's files live in this node's store: the manifest's own folder for
/// the version the node's manifest pins, a versioned folder for one model sync applied.
pub fn entry_dir(node: &Node, entry: &ManifestEntry) -> PathBuf {
    crate::models::store::dir_for(&node.config.store.dir, entry, node.manifest.get(&entry.name))
}

/// Loads one version of a model from its verified files, starts its queue and worker and
/// warms it up, without installing it: at boot the caller installs it; model sync loads a
/// new version beside the serving one and switches to it only once it is warm and passes its
/// probe. With `report`, the slot's stage follows along (boot); without, the slot keeps
/// serving as it is.
#[allow(clippy::too_many_arguments)] // one call per caller; a struct would only rename them
pub async fn load_version(
    node: &Arc<Node>,
    slot: &Arc<ModelSlot>,
    entry: ManifestEntry,
    verified: Verified,
    dir: &Path,
    device: &Device,
    restarts: &mpsc::UnboundedSender<Arc<ModelSlot>>,
    report: bool,
) -> Result<Loaded, String> {
    let id = next_load_id();
    let facts = parking_lot::Mutex::new(ModelFacts {
        version: Some(entry.version.clone()),
        digest: Some(verified.digest),
        files: verified.files.into_iter().collect(),
        device: Some(node.device.clone()),
        ..Default::default()
    });
    let stage = |s: Stage| {
        if report {
            slot.set_stage(s);
        }
    };
    let service = match slot.config.kind {
        ModelKind::Embed | ModelKind::Classify => {
            stage(Stage::Loading);
            let (service, policy) = load_encoder(node, slot, &entry, dir, device, (restarts, id), &facts).await?;
            compile_kernels(slot, device, report).await?;
            stage(Stage::WarmingUp);
            warm_encoder(&service, policy).await?;
            Service::Encoder(service)
        }
        ModelKind::Generate => {
            stage(Stage::Loading);
            let service = load_generator(node, slot, &entry, dir, device, (restarts, id), &facts).await?;
            stage(Stage::WarmingUp);
            service.warm_up().await?;
            Service::Generator(service)
        }
    };
    Ok(Loaded { id, service, entry: Some(entry), facts: facts.into_inner() })
}

/// A prototype classifier over an embedder's service: its labels' centroids embedded now.
pub async fn build_prototype(node: &Node, slot: &Arc<ModelSlot>, embedder: Arc<EncoderService>) -> Result<Loaded, String> {
    let labels = slot.config.labels.clone().unwrap_or_default();
    let temperature = slot.config.temperature.unwrap_or(DEFAULT_TEMPERATURE);
    let classifier = PrototypeClassifier::build(slot.name().to_string(), embedder, &labels, temperature).await?;
    let mut facts = ModelFacts { device: Some(node.device.clone()), ..Default::default() };
    facts.details.insert("labels".into(), serde_json::json!(classifier.labels));
    facts.details.insert("embedder".into(), serde_json::json!(classifier.embedder.name));
    facts.details.insert("temperature".into(), serde_json::json!(temperature));
    Ok(Loaded { id: next_load_id(), service: Service::Prototype(Arc::new(classifier)), entry: None, facts })
}

/// Fetches missing files (when allowed) and verifies every file against the manifest.
pub async fn verify_files(node: &Arc<Node>, slot: &Arc<ModelSlot>, entry: &ManifestEntry, dir: &Path) -> Result<Verified, String> {
    if !will_fetch(entry, dir, node.config.store.fetch_missing) {
        slot.set_stage(Stage::Verifying);
        return verify_in(entry, dir).await;
    }
    slot.set_stage(Stage::Fetching);
    let s = slot.clone();
    let fetched = fetch_files(node, entry, dir, move |p| s.update_facts(|f| f.fetch = Some(p.clone()))).await;
    slot.update_facts(|f| f.fetch = None);
    fetched
}

/// Whether `entry`'s files in `dir` must (and, with `allowed`, may) be fetched before they
/// can be verified: some are missing or unchecked, and the source is not a local folder.
pub fn will_fetch(entry: &ManifestEntry, dir: &Path, allowed: bool) -> bool {
    allowed && needs_fetch(entry, dir) && entry.source.kind() != Some(SourceKind::Dir)
}

/// Fetches `entry`'s files into `dir`, reporting progress, and returns them verified: a
/// fetch verifies what it leaves, so nothing is hashed again after it.
pub async fn fetch_files(node: &Node, entry: &ManifestEntry, dir: &Path, progress: impl Fn(&Progress) + Send + 'static) -> Result<Verified, String> {
    let (store, python) = (node.config.store.dir.clone(), node.config.store.python.clone());
    let (e, d) = (entry.clone(), dir.to_path_buf());
    blocking(move || {
        let fetched = fetch_into(&e, &store, &d, &FetchOptions { python: &python, progress: &progress }).map_err(|e| e.to_string())?;
        Ok(fetched.verified().clone())
    })
    .await
}

/// Hashes `entry`'s files in `dir` against their pins, off the async workers.
pub async fn verify_in(entry: &ManifestEntry, dir: &Path) -> Result<Verified, String> {
    let (e, d) = (entry.clone(), dir.to_path_buf());
    blocking(move || verify_model(&e, &d).map_err(|e| e.to_string())).await
}

/// Reads the folder, loads the weights onto the device and starts queue and worker.
async fn load_encoder(
    node: &Arc<Node>,
    slot: &Arc<ModelSlot>,
    entry: &ManifestEntry,
    dir: &Path,
    device: &Device,
    (restarts, id): (&mpsc::UnboundedSender<Arc<ModelSlot>>, u64),
    facts: &parking_lot::Mutex<ModelFacts>,
) -> Result<(Arc<EncoderService>, BatchPolicy), String> {
    let cfg = slot.config.clone();
    let on_gpu = !device.is_cpu();
    let native = runs_native(&cfg, device, false)?;
    let precision = cfg.precision.unwrap_or(Precision::Fp32);
    let threads = crate::runtime::compute_threads(&node.config);
    let (dir, device) = (dir.to_path_buf(), device.clone());
    let pinned: Vec<String> = entry.files.iter().map(|f| f.path.clone()).collect();
    let (model, files, task, tokenizer) = blocking(move || {
        crate::encoder::files::check_pinned(&dir, &pinned.iter().map(String::as_str).collect::<Vec<_>>())?;
        let files = EncoderFiles::read(&dir)?;
        let task = match cfg.kind {
            ModelKind::Classify => EncoderTask::Classify {
                labels: files.labels.clone().ok_or("config.json has no id2label for a sequence classifier")?,
                multi_label: files.config.problem_type.as_deref() == Some("multi_label_classification"),
            },
            _ => EncoderTask::Embed { pooling: cfg.pooling.or(files.pooling).unwrap_or(Pooling::Mean), always_normalize: files.normalizes },
        };
        if let EncoderTask::Embed { pooling: Pooling::Mean, .. } = task {
            if !files.include_prompt && !files.prompts.named.is_empty() {
                return Err("1_Pooling/config.json sets include_prompt = false with mean pooling, which is not supported".to_string());
            }
        }
        let tokenizer = InputTokenizer::load(&dir.join("tokenizer.json"), files.max_tokens)?;
        let model = EncoderModel::load(&dir, &files, &task, &device, (native, precision), threads)?;
        Ok((model, files, task, tokenizer))
    })
    .await?;

    let policy = encoder::batch_policy(
        slot.config.max_batch_tokens.or(Some(if on_gpu { encoder::DEFAULT_MAX_BATCH_TOKENS_GPU } else { encoder::DEFAULT_MAX_BATCH_TOKENS })),
        slot.config.max_batch_requests,
    );
    {
        let f = &mut *facts.lock();
        f.details.insert("engine".into(), serde_json::json!(model.engine()));
        f.details.insert("precision".into(), serde_json::json!(model.precision()));
        if model.engine() == "native" {
            f.details.insert("cpu_isa".into(), serde_json::json!(crate::cpu::Isa::detect().name()));
        }
        if let Some(path) = model.cpu_path() {
            tracing::info!(model = %slot.name(), precision = model.precision().as_str(), cpu_path = %path, "encoder kernels");
            f.details.insert("cpu_path".into(), serde_json::json!(path));
        }
    }
    let dims = match &task {
        EncoderTask::Classify { labels, .. } => labels.len(),
        EncoderTask::Embed { .. } => files.config.hidden_size,
    };
    let (job_tx, job_rx) = mpsc::unbounded_channel();
    let (batch_tx, batch_rx) = mpsc::channel(1);
    let idle = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(run_queue(slot.name().to_string(), job_rx, batch_tx, idle.clone(), policy));
    spawn_worker(slot.name().to_string(), Box::new(model), batch_rx, idle, on_worker_exit(slot, restarts, id))
        .map_err(|e| format!("cannot start the model worker: {e}"))?;

    let max_in_flight = slot.config.max_concurrent_inputs.unwrap_or(encoder::DEFAULT_MAX_CONCURRENT_INPUTS);
    {
        let d = &mut facts.lock().details;
        d.insert("dimensions".into(), serde_json::json!(dims));
        d.insert("max_input_tokens".into(), serde_json::json!(files.max_tokens));
        d.insert("max_batch_tokens".into(), serde_json::json!(policy.max_batch_tokens));
        d.insert("max_batch_requests".into(), serde_json::json!(policy.max_batch_requests));
        d.insert("max_concurrent_inputs".into(), serde_json::json!(max_in_flight));
        if !files.prompts.named.is_empty() {
            d.insert("prompts".into(), serde_json::json!(files.prompts.named));
            d.insert("default_prompt_name".into(), serde_json::json!(files.prompts.default));
        }
        match &task {
            EncoderTask::Embed { pooling, always_normalize } => {
                d.insert("normalizes".into(), serde_json::json!(always_normalize));
                d.insert("pooling".into(), serde_json::json!(pooling))
            }
            EncoderTask::Classify { labels, .. } => d.insert("labels".into(), serde_json::json!(labels)),
        };
    }
    let service = EncoderService::new(
        slot.name().to_string(),
        task,
        dims,
        Arc::new(tokenizer),
        node.tokenizers.clone(),
        job_tx,
        (max_in_flight, node.config.limits.max_request_tokens),
    )
    .with_prompts(files.prompts.clone());
    Ok((Arc::new(service), policy))
}

/// Our own CPU engine, or the library's (candle for encoders, mistral.rs for generators):
/// the one place that choice is made. By default our engine runs wherever it can: on the
/// CPU, for generators from a GGUF file.
fn runs_native(cfg: &ModelConfig, device: &Device, gguf: bool) -> Result<bool, String> {
    let on_cpu = device.is_cpu();
    match (cfg.kind, cfg.engine) {
        (_, Some(Engine::Native)) if !on_cpu => Err("engine \"native\" runs on the CPU only; the device is a GPU".into()),
        (ModelKind::Generate, Some(Engine::Native)) if !gguf => Err("engine \"native\" loads GGUF files only".into()),
        (_, Some(Engine::Native)) => Ok(true),
        (_, Some(Engine::Candle | Engine::Mistralrs)) => Ok(false),
        (ModelKind::Generate, _) => Ok(on_cpu && gguf),
        (_, _) => Ok(on_cpu),
    }
}

/// What a model's worker thread does when it ends: if it ended while its version was the one
/// serving (not because the model was uninstalled, switched to another version, or the node
/// is stopping), the model is taken out of service (`/readyz` 503, `restarting`) and handed
/// to the supervisor to reload.
///
/// It holds the slot weakly: the slot holds the service that keeps the worker alive, so a
/// strong handle here would keep a removed model alive for good.
fn on_worker_exit(slot: &Arc<ModelSlot>, restarts: &mpsc::UnboundedSender<Arc<ModelSlot>>, id: u64) -> impl FnOnce() + Send + 'static {
    let (slot, restarts) = (Arc::downgrade(slot), restarts.clone());
    move || {
        let Some(slot) = slot.upgrade() else { return };
        if slot.stage() == Stage::Ready && slot.uninstall_if(id, Stage::Restarting) {
            let _ = restarts.send(slot);
        }
    }
}

/// Loads a generate model's engine from its verified files.
async fn load_generator(
    node: &Arc<Node>,
    slot: &Arc<ModelSlot>,
    entry: &ManifestEntry,
    dir: &Path,
    device: &Device,
    (restarts, id): (&mpsc::UnboundedSender<Arc<ModelSlot>>, u64),
    facts: &parking_lot::Mutex<ModelFacts>,
) -> Result<Arc<GenerateService>, String> {
    let gguf = entry.files.iter().find(|f| f.path.ends_with(".gguf")).map(|f| dir.join(&f.path));
    let engine: Arc<dyn Generator> = if runs_native(&slot.config, device, gguf.is_some())? {
        let path = gguf.ok_or("no GGUF file")?;
        let threads = crate::runtime::compute_threads(&node.config);
        let on_exit = on_worker_exit(slot, restarts, id);
        Arc::new(blocking(move || NativeGenerator::load_supervised(&path, threads, false, on_exit)).await?)
    } else {
        let files = match &gguf {
            Some(p) => mistral::ModelFiles::Gguf(p),
            None => mistral::ModelFiles::SafetensorsDir(dir),
        };
        let max_sequences = slot.config.max_concurrent_sequences.unwrap_or(crate::generate::DEFAULT_MAX_SEQUENCES);
        Arc::new(mistral::MistralGenerator::load(files, device, max_sequences).await?)
    };
    let service = GenerateService::new(engine, &slot.config, &node.config.limits);
    {
        let f = &mut *facts.lock();
        f.details.insert("engine".into(), serde_json::json!(service.info.engine));
        f.details.insert("context".into(), serde_json::json!(service.context));
        f.details.insert("max_concurrent_sequences".into(), serde_json::json!(service.max_sequences));
        f.details.insert("model".into(), service.info.details.clone());
    }
    Ok(Arc::new(service))
}

/// On a GPU, compiles our pooling kernels for its architecture now, so no request pays
/// for NVRTC. Nothing to do on a CPU.
async fn compile_kernels(slot: &Arc<ModelSlot>, device: &Device, report: bool) -> Result<(), String> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        if report {
            slot.set_stage(Stage::CompilingKernels);
        }
        let dev = dev.clone();
        blocking(move || crate::gpu::compile_for_device(&dev).map(|_| ()).map_err(|e| format!("cannot compile kernels/pooling.cu: {e}"))).await?;
    }
    let _ = (slot, device, report);
    Ok(())
}

/// Runs the shapes traffic will use through the real queue: one single short input, and
/// one batch as large as the token budget allows (within the admission limit).
async fn warm_encoder(service: &EncoderService, policy: BatchPolicy) -> Result<(), String> {
    service.encode(vec!["warm-up".into()], Truncation::Right, true).await.map_err(|e| format!("warm-up failed: {e}"))?;
    let max = service.tokenizer.max_tokens;
    let inputs = (policy.max_batch_tokens / max.max(1)).clamp(1, policy.max_batch_requests.min(service.max_in_flight()));
    let long = "edge ".repeat(max);
    service.encode_internal(vec![long; inputs], Truncation::Right, true).await.map_err(|e| format!("warm-up failed: {e}"))?;
    Ok(())
}

/// Waits for the embedding model a prototype classifier builds on.
pub async fn wait_for_embedder(node: &Arc<Node>, cfg: &ModelConfig) -> Result<Arc<EncoderService>, String> {
    let name = cfg.embedder.clone().ok_or("a prototype classifier needs `embedder` (an embed model's name)")?;
    let slot = node
        .registry
        .get(&name)
        .filter(|s| s.config.kind == ModelKind::Embed)
        .ok_or_else(|| format!("embedder {name:?} is not an embed model served here"))?;
    match slot.ready_service(std::time::Duration::from_secs(3600)).await {
        Ok(Service::Encoder(e)) => Ok(e),
        Ok(_) => Err(format!("embedder {name:?} is not an encoder")),
        Err(e) => Err(format!("embedder {name:?}: {e}")),
    }
}
