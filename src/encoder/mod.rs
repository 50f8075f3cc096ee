//! Encoder models (embeddings and sequence classification) and the service requests use.
//!
//! `EncoderService` is what a request holds: admission (a bound on inputs in flight),
//! tokenization on the shared pool, and the model's queue. The model itself lives on its
//! worker thread (`crate::batching`); the HTTP layer never sees a tensor.

pub mod bert;
pub mod cpu_bert;
pub mod files;
pub mod pooling;
pub mod prototype;
pub mod tokenize;
pub mod twins;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::batching::packed::PackedBatch;
use crate::batching::queue::{BatchPolicy, Job, JobOutput, Output};
use crate::batching::worker::{BatchError, BatchModel};
use crate::config::{Pooling, Precision};
use crate::error::Error;
use crate::telemetry::metrics::METRICS;
use bert::Bert;
use cpu_bert::CpuBert;
use files::{EncoderFiles, Prompts};
use tokenize::{InputTokenizer, Text, TokenizerPool, Tokens, Truncation};

/// What an encoder model produces.
#[derive(Debug, Clone)]
pub enum EncoderTask {
    /// Pooled sentence embeddings; `always_normalize` when the model's own pipeline ends in
    /// a Normalize module (then `normalize: false` cannot un-normalize it).
    Embed { pooling: Pooling, always_normalize: bool },
    /// Class logits from a sequence-classification head.
    Classify { labels: Vec<String>, multi_label: bool },
}

/// The implementation that runs the forward pass.
enum Backend {
    /// candle's ops on any device (the GPU path, and the reference on the CPU).
    Candle(Bert),
    /// Our own CPU kernels.
    Native(Box<CpuBert>),
}

/// A loaded encoder on its device: what the worker thread owns.
pub struct EncoderModel {
    backend: Backend,
    task: EncoderTask,
}

impl EncoderModel {
    /// Loads the model with our CPU kernels (`native`, its dense layers in `precision`) or
    /// candle's ops (fp32 only).
    pub fn load(
        dir: &Path,
        files: &EncoderFiles,
        task: &EncoderTask,
        device: &Device,
        (native, precision): (bool, Precision),
        threads: usize,
    ) -> Result<Self, String> {
        if !native && precision != Precision::Fp32 {
            return Err(format!(
                "precision \"{}\" runs on our CPU engine only (engine \"native\" on a CPU device); this model runs on candle",
                precision.as_str()
            ));
        }
        if native {
            let labels = match task {
                EncoderTask::Classify { labels, .. } => Some(labels.len()),
                EncoderTask::Embed { .. } => None,
            };
            let bert = CpuBert::load(dir, &files.config, labels, threads, precision)?;
            return Ok(EncoderModel { backend: Backend::Native(Box::new(bert)), task: task.clone() });
        }
        Self::load_candle(dir, files, task, device)
    }

    /// Which implementation runs it.
    pub fn engine(&self) -> &'static str {
        match self.backend {
            Backend::Candle(_) => "candle",
            Backend::Native(_) => "native",
        }
    }

    /// The CPU kernel its dense layers run on (native engine only), for `/info`.
    pub fn cpu_path(&self) -> Option<String> {
        match &self.backend {
            Backend::Candle(_) => None,
            Backend::Native(bert) => Some(bert.cpu_path()),
        }
    }

    /// The arithmetic of its dense layers.
    pub fn precision(&self) -> Precision {
        match &self.backend {
            Backend::Candle(_) => Precision::Fp32,
            Backend::Native(bert) => bert.precision(),
        }
    }

    fn load_candle(dir: &Path, files: &EncoderFiles, task: &EncoderTask, device: &Device) -> Result<Self, String> {
        let dtype = if device.is_cuda() { DType::F16 } else { DType::F32 };
        let weights = dir.join("model.safetensors");
        // SAFETY: the file was verified against its digest just before; mmap requires that no
        // one truncates it while mapped, which the model store never does.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, device) }
            .map_err(|e| format!("cannot read {}: {e}", weights.display()))?;
        let (with_head, labels) = match task {
            EncoderTask::Classify { labels, .. } => (true, labels.len()),
            EncoderTask::Embed { .. } => (false, 0),
        };
        let bert = Bert::load(vb, &files.config, with_head, labels).map_err(|e| format!("cannot build the model: {e}"))?;
        Ok(EncoderModel { backend: Backend::Candle(bert), task: task.clone() })
    }

    fn run_native(bert: &mut CpuBert, task: &EncoderTask, batch: &PackedBatch, outputs: &[Output]) -> Result<Vec<Vec<f32>>, String> {
        let dim = bert.hidden();
        let hidden = tracing::info_span!("inference", engine = "native").in_scope(|| bert.forward(batch))?;
        let _pool = tracing::info_span!("pool").entered();
        match task {
            EncoderTask::Classify { .. } => bert.classify(batch).ok_or_else(|| "the model has no classifier head".to_string()),
            EncoderTask::Embed { pooling, always_normalize } => {
                let all = *always_normalize || outputs.iter().all(|o| *o == Output::Pooled { normalize: true });
                let pooled = pooling::pool_normalize(hidden, &batch.cu_seqlens, dim, *pooling, all);
                let rows = pooled.chunks_exact(dim).map(<[f32]>::to_vec).collect();
                let tokens = |i: usize| hidden[batch.cu_seqlens[i] as usize * dim..batch.cu_seqlens[i + 1] as usize * dim].to_vec();
                Ok(shape_rows(rows, outputs, all, tokens))
            }
        }
    }

    fn run_candle(bert: &Bert, task: &EncoderTask, batch: &PackedBatch, outputs: &[Output]) -> candle_core::Result<Vec<Vec<f32>>> {
        let hidden = tracing::info_span!("inference", engine = "candle").in_scope(|| bert.forward(batch))?;
        let _pool = tracing::info_span!("pool").entered();
        match task {
            EncoderTask::Classify { .. } => {
                let logits = bert.classify(&hidden, batch)?.ok_or_else(|| candle_core::Error::Msg("no head".into()))?;
                logits.to_vec2::<f32>()
            }
            EncoderTask::Embed { pooling, always_normalize } => {
                let all = *always_normalize || outputs.iter().all(|o| *o == Output::Pooled { normalize: true });
                let rows = pool(&hidden, batch, *pooling, all)?;
                let mut token_rows = Vec::new();
                for (i, o) in outputs.iter().enumerate() {
                    if *o == Output::Tokens {
                        let (start, end) = (batch.cu_seqlens[i] as usize, batch.cu_seqlens[i + 1] as usize);
                        token_rows.push((i, hidden.narrow(0, start, end - start)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?));
                    }
                }
                let mut token_rows = token_rows.into_iter();
                Ok(shape_rows(rows, outputs, all, |_| token_rows.next().map(|(_, v)| v).unwrap_or_default()))
            }
        }
    }
}

/// Each input's answer from a batch's pooled rows (normalized already when `all_normalized`):
/// normalized where asked, or replaced by the input's token states (`tokens(i)`, called in
/// input order).
fn shape_rows(mut rows: Vec<Vec<f32>>, outputs: &[Output], all_normalized: bool, mut tokens: impl FnMut(usize) -> Vec<f32>) -> Vec<Vec<f32>> {
    for (i, (row, output)) in rows.iter_mut().zip(outputs).enumerate() {
        match output {
            Output::Pooled { normalize: true } if !all_normalized => pooling::l2_normalize(row),
            Output::Pooled { .. } => {}
            Output::Tokens => *row = tokens(i),
        }
    }
    rows
}

/// Pools packed hidden states on their device: our CUDA kernel on a GPU, the Rust
/// specification on the CPU.
fn pool(hidden: &candle_core::Tensor, batch: &PackedBatch, mode: Pooling, normalize: bool) -> candle_core::Result<Vec<Vec<f32>>> {
    #[cfg(feature = "cuda")]
    if hidden.device().is_cuda() {
        return crate::gpu::pool_normalize(hidden, &batch.cu_seqlens, mode, normalize)?.to_vec2::<f32>();
    }
    let dim = hidden.dim(1)?;
    let flat = hidden.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let pooled = pooling::pool_normalize(&flat, &batch.cu_seqlens, dim, mode, normalize);
    Ok(pooled.chunks_exact(dim).map(<[f32]>::to_vec).collect())
}

impl BatchModel for EncoderModel {
    fn run(&mut self, batch: &PackedBatch, outputs: &[Output]) -> Result<Vec<Vec<f32>>, BatchError> {
        match &mut self.backend {
            Backend::Native(bert) => Self::run_native(bert, &self.task, batch, outputs).map_err(BatchError::Model),
            Backend::Candle(bert) => Self::run_candle(bert, &self.task, batch, outputs).map_err(|e| BatchError::Model(e.to_string())),
        }
    }
}

/// The answer for one request's inputs.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// One vector per input, in input order.
    pub rows: Vec<Vec<f32>>,
    /// Tokens per input after truncation.
    pub tokens: Vec<usize>,
    /// The longest queue wait among the inputs, seconds.
    pub queue_s: f64,
    /// The longest batch compute among the inputs, seconds.
    pub compute_s: f64,
    /// Seconds spent tokenizing.
    pub tokenize_s: f64,
}

/// What requests use to reach an encoder model.
pub struct EncoderService {
    pub name: String,
    pub task: EncoderTask,
    /// Output width (hidden size for embeddings, label count for classifiers).
    pub dims: usize,
    pub tokenizer: Arc<InputTokenizer>,
    pool: Arc<TokenizerPool>,
    jobs: mpsc::UnboundedSender<Job>,
    admission: Arc<Semaphore>,
    max_in_flight: usize,
    /// `limits.max_request_tokens`: all inputs of one request together.
    max_request_tokens: usize,
    /// The model's named prompts (sentence-transformers' `prompts`).
    pub prompts: Prompts,
}

impl EncoderService {
    /// Wraps a running queue; `limits` is (inputs in flight, tokens per request).
    pub fn new(
        name: String,
        task: EncoderTask,
        dims: usize,
        tokenizer: Arc<InputTokenizer>,
        pool: Arc<TokenizerPool>,
        jobs: mpsc::UnboundedSender<Job>,
        (max_in_flight, max_request_tokens): (usize, usize),
    ) -> Self {
        EncoderService {
            name,
            task,
            dims,
            tokenizer,
            pool,
            jobs,
            admission: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            max_request_tokens,
            prompts: Prompts::default(),
        }
    }

    /// The service with the model's named prompts.
    pub fn with_prompts(mut self, prompts: Prompts) -> Self {
        self.prompts = prompts;
        self
    }

    /// `texts` with a prompt in front, as sentence-transformers' `encode(prompt_name=...)`
    /// does: the one the request names, else the model's default prompt, else none.
    pub fn with_prompt(&self, mut texts: Vec<String>, name: Option<&str>) -> Result<Vec<String>, Error> {
        let Some(name) = name.or(self.prompts.default.as_deref()) else { return Ok(texts) };
        let prompt = self.prompts.named.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.prompts.named.keys().map(String::as_str).collect();
            Error::field(
                "prompt_name",
                format!(
                    "{name:?} is not a prompt of model {}; its prompts: {}",
                    self.name,
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                ),
            )
        })?;
        if !prompt.is_empty() {
            for t in &mut texts {
                t.insert_str(0, prompt);
            }
        }
        Ok(texts)
    }

    /// Most inputs admitted at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// Inputs admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.admission.available_permits()
    }

    /// Encodes `texts` (pooled, optionally normalized), in input order. A request of many
    /// inputs is tokenized and checked whole (`limits.max_request_tokens`, 413), then
    /// admitted and queued `INPUTS_PER_CHUNK` inputs at a time, so that one client's 2,048
    /// inputs hold no more of the model's admission than a request of 64 and others'
    /// requests interleave with it in the batches.
    pub async fn encode(&self, texts: Vec<String>, truncation: Truncation, normalize: bool) -> Result<Encoded, Error> {
        let texts = texts.into_iter().map(Text::One).collect();
        self.encode_within(texts, truncation, Output::Pooled { normalize }, self.max_request_tokens).await
    }

    /// `encode` for texts and sentence pairs (a cross-encoder's inputs), not normalized.
    pub async fn encode_texts(&self, texts: Vec<Text>, truncation: Truncation) -> Result<Encoded, Error> {
        self.encode_within(texts, truncation, Output::Pooled { normalize: false }, self.max_request_tokens).await
    }

    /// Every token's final hidden state per input, unpooled (TEI's `/embed_all`): each row is
    /// `tokens × dims` values, token after token.
    pub async fn encode_tokens(&self, texts: Vec<String>, truncation: Truncation) -> Result<Encoded, Error> {
        self.encode_within(texts.into_iter().map(Text::One).collect(), truncation, Output::Tokens, self.max_request_tokens).await
    }

    /// `encode` for the node's own work (warm-up at the batch budget), which is not a client
    /// request and so not bound by `limits.max_request_tokens`.
    pub async fn encode_internal(&self, texts: Vec<String>, truncation: Truncation, normalize: bool) -> Result<Encoded, Error> {
        self.encode_within(texts.into_iter().map(Text::One).collect(), truncation, Output::Pooled { normalize }, usize::MAX).await
    }

    async fn encode_within(&self, texts: Vec<Text>, truncation: Truncation, output: Output, max_request_tokens: usize) -> Result<Encoded, Error> {
        let n = texts.len();
        let started = Instant::now();
        let tokens =
            self.pool.encode(self.tokenizer.clone(), Arc::new(texts), truncation).instrument(tracing::info_span!("tokenize", inputs = n)).await?;
        let tokenize_s = started.elapsed().as_secs_f64();
        let total: usize = tokens.iter().map(|t| t.ids.len()).sum();
        if total > max_request_tokens {
            return Err(Error::RequestTooManyTokens { tokens: total, limit: max_request_tokens });
        }
        let chunk = INPUTS_PER_CHUNK.min(self.max_in_flight).max(1);
        let mut out = Encoded { rows: Vec::with_capacity(n), tokens: Vec::with_capacity(n), queue_s: 0.0, compute_s: 0.0, tokenize_s };
        let mut tokens = tokens.into_iter();
        for first in std::iter::once(true).chain(std::iter::repeat(false)) {
            let part: Vec<Tokens> = tokens.by_ref().take(chunk).collect();
            if part.is_empty() {
                break;
            }
            self.encode_chunk(part, output, first, &mut out).await?;
        }
        METRICS.tokens.with_label_values(&[self.name.as_str(), "input"]).inc_by(out.tokens.iter().sum::<usize>() as u64);
        Ok(out)
    }

    /// Admits one chunk of a request's inputs and waits for their vectors. The first chunk is
    /// refused at once when the model is full (429); later ones wait their turn, since the
    /// request is already being answered (the request timeout bounds the wait).
    async fn encode_chunk(&self, part: Vec<Tokens>, output: Output, first: bool, out: &mut Encoded) -> Result<(), Error> {
        let permits = part.len() as u32;
        let _admitted = if first {
            self.admission.clone().try_acquire_many_owned(permits).map_err(|_| Error::Overloaded {
                what: format!("model {} (inputs in flight)", self.name),
                limit: self.max_in_flight,
                retry_after_s: 1,
            })?
        } else {
            self.admission.clone().acquire_many_owned(permits).await.map_err(|_| Error::Internal("the admission semaphore is closed".into()))?
        };
        let span = tracing::Span::current();
        let mut replies = Vec::with_capacity(part.len());
        for t in part {
            let (tx, rx) = oneshot::channel();
            out.tokens.push(t.ids.len());
            let queue_span = tracing::info_span!(parent: &span, "queue", model = %self.name, tokens = t.ids.len());
            let job = Job { ids: t.ids, type_ids: t.type_ids, output, enqueued: Instant::now(), reply: tx, span: span.clone(), queue_span };
            self.jobs.send(job).map_err(|_| Error::NotReady { message: format!("model {} is restarting", self.name), retry_after_s: 2 })?;
            replies.push(rx);
        }
        for rx in replies {
            let done: JobOutput = rx.await.map_err(|_| Error::Internal(format!("model {} dropped the input", self.name)))??;
            out.queue_s = out.queue_s.max(done.queue_s);
            out.compute_s = out.compute_s.max(done.compute_s);
            out.rows.push(done.values);
        }
        Ok(())
    }
}

/// Most inputs of one request admitted and queued at once; a larger request is answered
/// chunk by chunk (see `EncoderService::encode`).
pub const INPUTS_PER_CHUNK: usize = 64;

/// Default batch limits for an encoder when its config does not set them.
pub fn batch_policy(max_batch_tokens: Option<usize>, max_batch_requests: Option<usize>) -> BatchPolicy {
    BatchPolicy {
        max_batch_tokens: max_batch_tokens.unwrap_or(DEFAULT_MAX_BATCH_TOKENS),
        max_batch_requests: max_batch_requests.unwrap_or(DEFAULT_MAX_BATCH_REQUESTS),
    }
}

/// Default token budget of one batch on the CPU: batches beyond a few hundred short inputs
/// gain no throughput on a CPU (the dense layers are already compute-bound) and only add
/// latency for whoever waits behind them.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 2048;
/// Default token budget of one batch on a GPU, where larger batches keep it busy.
pub const DEFAULT_MAX_BATCH_TOKENS_GPU: usize = 16384;
/// Default most inputs in one batch.
pub const DEFAULT_MAX_BATCH_REQUESTS: usize = 64;
/// Default most inputs admitted at once per model.
pub const DEFAULT_MAX_CONCURRENT_INPUTS: usize = 1024;
