//! The boot sequence: the listener is already bound and answering (`/livez` 200, `/readyz`
//! 503 with each model's stage) while every model goes through fetch (if missing) →
//! verify digests → load → warm up → ready. Models boot concurrently; a classifier that
//! builds on an embedding model waits for that model first. A model that fails is marked
//! failed with its reason; the others still come up and serve.

use std::path::Path;
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
use crate::models::fetch::{fetch, FetchOptions};
use crate::models::manifest::SourceKind;
use crate::models::registry::{ModelSlot, Stage};
use crate::models::verify::{needs_fetch, verify_model};
use crate::node::Node;
use crate::service::Service;

/// Boots every model; returns when each is ready or failed.
pub async fn boot_all(node: Arc<Node>, device: Device) {
    let started = Instant::now();
    let (restarts, mut restart_rx) = mpsc::unbounded_channel::<Arc<ModelSlot>>();
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
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, String> + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| format!("the boot task panicked: {e}"))?
}

async fn boot_model(
    node: &Arc<Node>,
    slot: &Arc<ModelSlot>,
    device: &Device,
    restarts: &mpsc::UnboundedSender<Arc<ModelSlot>>,
) -> Result<(), String> {
    let dir = match &slot.entry {
        Some(entry) => Some(verify_files(node, slot, entry.clone()).await?),
        None => None,
    };
    slot.update_facts(|f| f.device = Some(node.device.clone()));
    let service = match (slot.config.kind, dir) {
        (ModelKind::Embed | ModelKind::Classify, Some(dir)) => {
            slot.set_stage(Stage::Loading);
            let (service, policy) = load_encoder(node, slot, &dir, device, restarts).await?;
            compile_kernels(slot, device).await?;
            slot.set_stage(Stage::WarmingUp);
            warm_encoder(&service, policy).await?;
            Service::Encoder(service)
        }
        (ModelKind::Classify, None) => {
            let embedder = wait_for_embedder(node, &slot.config).await?;
            slot.set_stage(Stage::WarmingUp);
            let labels = slot.config.labels.clone().unwrap_or_default();
            let temperature = slot.config.temperature.unwrap_or(DEFAULT_TEMPERATURE);
            let classifier = PrototypeClassifier::build(slot.name().to_string(), embedder, &labels, temperature).await?;
            slot.update_facts(|f| {
                f.details.insert("labels".into(), serde_json::json!(classifier.labels));
                f.details.insert("embedder".into(), serde_json::json!(classifier.embedder.name));
                f.details.insert("temperature".into(), serde_json::json!(temperature));
            });
            Service::Prototype(Arc::new(classifier))
        }
        (ModelKind::Generate, Some(dir)) => {
            slot.set_stage(Stage::Loading);
            let service = load_generator(node, slot, &dir, device, restarts).await?;
            slot.set_stage(Stage::WarmingUp);
            service.warm_up().await?;
            Service::Generator(service)
        }
        (kind, None) => return Err(format!("a {kind} model needs a manifest entry with its files")),
    };
    slot.install(service);
    Ok(())
}

/// Fetches missing files (when allowed) and verifies every file against the manifest.
async fn verify_files(node: &Arc<Node>, slot: &Arc<ModelSlot>, entry: crate::models::manifest::ManifestEntry) -> Result<std::path::PathBuf, String> {
    let store = node.config.store.dir.clone();
    let dir = entry.dir(&store);
    if needs_fetch(&entry, &dir) && node.config.store.fetch_missing && entry.source.kind() != Some(SourceKind::Dir) {
        slot.set_stage(Stage::Fetching);
        let python = node.config.store.python.clone();
        let (e, s) = (entry.clone(), slot.clone());
        let fetched = blocking(move || {
            let progress = |p: &Progress| s.update_facts(|f| f.fetch = Some(p.clone()));
            fetch(&e, &store, &FetchOptions { python: &python, progress: &progress }).map_err(|e| e.to_string())
        })
        .await;
        slot.update_facts(|f| f.fetch = None);
        fetched?;
    }
    slot.set_stage(Stage::Verifying);
    let d = dir.clone();
    let verified = blocking(move || verify_model(&entry, &d).map_err(|e| e.to_string())).await?;
    slot.update_facts(|f| {
        f.digest = Some(verified.digest.clone());
        f.files = verified.files.iter().cloned().collect();
    });
    Ok(dir)
}

/// Reads the folder, loads the weights onto the device and starts queue and worker.
async fn load_encoder(
    node: &Arc<Node>,
    slot: &Arc<ModelSlot>,
    dir: &Path,
    device: &Device,
    restarts: &mpsc::UnboundedSender<Arc<ModelSlot>>,
) -> Result<(Arc<EncoderService>, BatchPolicy), String> {
    let cfg = slot.config.clone();
    let on_gpu = !device.is_cpu();
    let native = runs_native(&cfg, device, false)?;
    let precision = cfg.precision.unwrap_or(Precision::Fp32);
    let threads = crate::runtime::compute_threads(&node.config);
    let (dir, device) = (dir.to_path_buf(), device.clone());
    let pinned: Vec<String> = slot.entry.iter().flat_map(|e| e.files.iter().map(|f| f.path.clone())).collect();
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
    slot.update_facts(|f| {
        f.details.insert("engine".into(), serde_json::json!(model.engine()));
        f.details.insert("precision".into(), serde_json::json!(model.precision()));
        if model.engine() == "native" {
            f.details.insert("cpu_isa".into(), serde_json::json!(crate::cpu::Isa::detect().name()));
        }
    });
    let dims = match &task {
        EncoderTask::Classify { labels, .. } => labels.len(),
        EncoderTask::Embed { .. } => files.config.hidden_size,
    };
    let (job_tx, job_rx) = mpsc::unbounded_channel();
    let (batch_tx, batch_rx) = mpsc::channel(1);
    let idle = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(run_queue(slot.name().to_string(), job_rx, batch_tx, idle.clone(), policy));
    spawn_worker(slot.name().to_string(), Box::new(model), batch_rx, idle, on_worker_exit(slot, restarts))
        .map_err(|e| format!("cannot start the model worker: {e}"))?;

    let max_in_flight = slot.config.max_concurrent_inputs.unwrap_or(encoder::DEFAULT_MAX_CONCURRENT_INPUTS);
    slot.update_facts(|f| {
        let d = &mut f.details;
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
    });
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

/// What a model's worker thread does when it ends: if it ended while serving (not because
/// the model was uninstalled or the node is stopping), the model is taken out of service
/// (`/readyz` 503, `restarting`) and handed to the supervisor to reload.
fn on_worker_exit(slot: &Arc<ModelSlot>, restarts: &mpsc::UnboundedSender<Arc<ModelSlot>>) -> impl FnOnce() + Send + 'static {
    let (slot, restarts) = (slot.clone(), restarts.clone());
    move || {
        if slot.stage() == Stage::Ready {
            slot.uninstall(Stage::Restarting);
            let _ = restarts.send(slot);
        }
    }
}

/// Loads a generate model's engine from its verified files.
async fn load_generator(
    node: &Arc<Node>,
    slot: &Arc<ModelSlot>,
    dir: &Path,
    device: &Device,
    restarts: &mpsc::UnboundedSender<Arc<ModelSlot>>,
) -> Result<Arc<GenerateService>, String> {
    let entry = slot.entry.as_ref().ok_or("no manifest entry")?;
    let gguf = entry.files.iter().find(|f| f.path.ends_with(".gguf")).map(|f| dir.join(&f.path));
    let engine: Arc<dyn Generator> = if runs_native(&slot.config, device, gguf.is_some())? {
        let path = gguf.ok_or("no GGUF file")?;
        let threads = crate::runtime::compute_threads(&node.config);
        let on_exit = on_worker_exit(slot, restarts);
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
    slot.update_facts(|f| {
        f.details.insert("engine".into(), serde_json::json!(service.info.engine));
        f.details.insert("context".into(), serde_json::json!(service.context));
        f.details.insert("max_concurrent_sequences".into(), serde_json::json!(service.max_sequences));
        f.details.insert("model".into(), service.info.details.clone());
    });
    Ok(Arc::new(service))
}

/// On a GPU, compiles our pooling kernels for its architecture now, so no request pays
/// for NVRTC. Nothing to do on a CPU.
async fn compile_kernels(slot: &Arc<ModelSlot>, device: &Device) -> Result<(), String> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        slot.set_stage(Stage::CompilingKernels);
        let dev = dev.clone();
        blocking(move || crate::gpu::compile_for_device(&dev).map(|_| ()).map_err(|e| format!("cannot compile kernels/pooling.cu: {e}"))).await?;
    }
    let _ = (slot, device);
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
async fn wait_for_embedder(node: &Arc<Node>, cfg: &ModelConfig) -> Result<Arc<EncoderService>, String> {
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
