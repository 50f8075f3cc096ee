//! The mistral.rs engine behind the `Generator` seam.
//!
//! mistral.rs 0.8.1 has traps this module designs around (read from its source):
//! - Loading goes through `Loader::load_model_from_path` with explicit local paths, so no
//!   hub client, token file or cache folder is ever touched; the dtype is F32 on CPU (its
//!   high-level GGUF builder hard-codes "auto", which is BF16 on CPU).
//! - Requests always stream internally. A non-streaming request whose receiver is dropped
//!   makes its engine thread panic; a streaming one is simply cancelled at the next token,
//!   which is how we cancel.
//! - The engine awaits every send to a request's channel, so one slow reader would stall
//!   every sequence: each request's channel holds its whole answer, and a forwarding task
//!   drains it at once into our own unbounded buffer.
//! - It has no per-request seed (one RNG, seeded 0, shared by all sequences): sampling is
//!   done by our own per-request `Sampler` in a logits processor that returns a one-hot
//!   distribution to the engine's greedy pick. The processor also counts tokens exactly.
//! - Its prefix cache never evicts on CPU: it is disabled.

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use either::Either;
use mistralrs::core::{
    AdapterPaths, GGUFLoaderBuilder, GGUFSpecificConfig, Loader, LocalModelPaths, MistralRs, MistralRsBuilder, ModelPaths, NormalLoaderBuilder,
    NormalSpecificConfig,
};
use mistralrs::{
    Constraint, DefaultSchedulerMethod, DeviceMapSetting, ModelDType, NormalLoaderType, NormalRequest, Request, RequestMessage, Response,
    SchedulerConfig, StopTokens,
};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::constrain::TokenTable;
use super::detok::Detokenizer;
use super::engine::{EngineError, FinishReason, GenEvent, Generator, GeneratorInfo, TokenStream};
use super::sampling::{Sampler, SamplingParams};
use super::template::{ChatMessage, ChatTemplate};
use super::tokenizer::GgufTokenizer;

/// A model served by mistral.rs.
pub struct MistralGenerator {
    runner: Arc<MistralRs>,
    /// Sequences allowed inside the engine at once. On the CPU this is 1: measured here,
    /// mistral.rs 0.8.1 corrupts the text of sequences that share decode steps on the CPU
    /// (eight concurrent greedy chats came back mixed), so sequences take turns.
    turns: Arc<tokio::sync::Semaphore>,
    tokenizer: Arc<Vocabulary>,
    table: Arc<TokenTable>,
    template: ChatTemplate,
    context: usize,
    eos: Arc<Vec<u32>>,
    details: serde_json::Value,
}

/// The tokenizer prompts are encoded with and picks decoded with. For a GGUF file it is ours
/// (`generate::tokenizer`), the native engine's: mistral.rs reads a SentencePiece vocabulary
/// as a Unigram model and so tokenizes TinyLlama's prompts unlike llama.cpp.
enum Vocabulary {
    Gguf(Box<GgufTokenizer>),
    Hf(Arc<tokenizers021::Tokenizer>),
}

impl Vocabulary {
    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        match self {
            Vocabulary::Gguf(t) => t.encode(text),
            // The same call mistral.rs makes for a text completion (special tokens on).
            Vocabulary::Hf(t) => t.encode_fast(text, true).map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string()),
        }
    }

    fn decode(&self, ids: &[u32]) -> String {
        match self {
            Vocabulary::Gguf(t) => t.decode(ids),
            Vocabulary::Hf(t) => t.decode(ids, true).unwrap_or_default(),
        }
    }

    fn vocab_size(&self) -> usize {
        match self {
            Vocabulary::Gguf(t) => t.vocab_size(),
            Vocabulary::Hf(t) => t.get_vocab_size(true),
        }
    }

    /// Every token's bytes: ours for a GGUF; for a `tokenizer.json`, llguidance's reading
    /// of it (guarded: it asserts on vocabularies it does not expect).
    fn token_bytes(&self) -> Result<Vec<Vec<u8>>, String> {
        match self {
            Vocabulary::Gguf(t) => Ok(t.token_bytes().to_vec()),
            Vocabulary::Hf(t) => {
                let json: serde_json::Value = serde_json::from_str(&t.to_string(false).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
                std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
                    .map_err(|_| "the tokenizer's vocabulary cannot be read as bytes".to_string())?
                    .map_err(|e| format!("the tokenizer's vocabulary cannot be read as bytes: {e}"))
            }
        }
    }
}

/// Our tokenizer for a GGUF file, from its metadata.
fn gguf_tokenizer(path: &Path) -> Result<GgufTokenizer, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut f).map_err(|e| format!("{} is not a valid GGUF file: {e}", path.display()))?;
    GgufTokenizer::from_gguf(&content)
}

/// What to load: a GGUF file, or a Hugging Face safetensors folder (Llama layout).
pub enum ModelFiles<'a> {
    Gguf(&'a Path),
    SafetensorsDir(&'a Path),
}

/// Builds the pipeline from local files only. Blocking: call it off the async workers.
fn load_pipeline(
    files: &ModelFiles,
    device: &candle_core::Device,
) -> anyhow::Result<Arc<tokio::sync::Mutex<dyn mistralrs::core::Pipeline + Send + Sync>>> {
    // F32 on the CPU (exact, and what candle's quantized CPU kernels compute in); on a GPU
    // mistral.rs picks BF16/F16 itself.
    let dtype = if device.is_cpu() { ModelDType::F32 } else { ModelDType::Auto };
    let (loader, paths): (Box<dyn Loader>, Box<dyn ModelPaths>) = match files {
        ModelFiles::Gguf(file) => {
            let file = file.canonicalize()?;
            let dir = file.parent().ok_or_else(|| anyhow::anyhow!("GGUF file has no folder"))?;
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let loader = GGUFLoaderBuilder::new(
                None,
                None,
                dir.to_string_lossy().into_owned(),
                vec![name],
                GGUFSpecificConfig { topology: None },
                false,
                None,
            )
            .build();
            let paths = LocalModelPaths {
                // Empty: the tokenizer and chat template come from the GGUF's metadata.
                tokenizer_filename: Default::default(),
                config_filename: Default::default(),
                template_filename: None,
                filenames: vec![file.clone()],
                adapter_paths: AdapterPaths::None,
                gen_conf: None,
                preprocessor_config: None,
                processor_config: None,
                chat_template_json_filename: None,
            };
            (loader, Box::new(paths))
        }
        ModelFiles::SafetensorsDir(dir) => {
            let dir = dir.canonicalize()?;
            let optional = |f: &str| Some(dir.join(f)).filter(|p| p.is_file());
            let loader = NormalLoaderBuilder::new(NormalSpecificConfig::default(), None, None, Some(dir.to_string_lossy().into_owned()), false, None)
                .build(Some(NormalLoaderType::Llama))?;
            let paths = LocalModelPaths {
                tokenizer_filename: dir.join("tokenizer.json"),
                config_filename: dir.join("config.json"),
                template_filename: optional("chat_template.jinja").or_else(|| optional("tokenizer_config.json")),
                filenames: vec![dir.join("model.safetensors")],
                adapter_paths: AdapterPaths::None,
                gen_conf: optional("generation_config.json"),
                preprocessor_config: None,
                processor_config: None,
                chat_template_json_filename: optional("chat_template.json"),
            };
            (loader, Box::new(paths))
        }
    };
    loader.load_model_from_path(&paths, &dtype, device, true, DeviceMapSetting::dummy(), None, None)
}

/// The text of a special token as the chat template names it (its type is private to
/// mistral.rs, so this is a macro over the field rather than a function over the type).
macro_rules! token_text {
    ($t:expr) => {
        match &$t {
            Some(tok) => match &tok.0 {
                Either::Left(s) => s.clone(),
                Either::Right(added) => added.content.clone(),
            },
            None => String::new(),
        }
    };
}

impl MistralGenerator {
    /// Loads the model and starts its engine with room for `max_sequences` running together.
    pub async fn load(files: ModelFiles<'_>, device: &candle_core::Device, max_sequences: usize) -> Result<Self, String> {
        let ours = match files {
            ModelFiles::Gguf(path) => Some(tokio::task::block_in_place(|| gguf_tokenizer(path))?),
            ModelFiles::SafetensorsDir(_) => None,
        };
        let pipeline = tokio::task::block_in_place(|| load_pipeline(&files, device)).map_err(|e| format!("{e:#}"))?;
        let (tokenizer, template, context, eos, details) = {
            let p = pipeline.lock().await;
            let md = p.get_metadata();
            let tokenizer = p.tokenizer().ok_or("the model has no tokenizer")?;
            let chat = p.get_chat_template().ok_or("the model has no chat template")?;
            let source = match chat.chat_template.as_ref().map(|v| &v.0) {
                Some(Either::Left(s)) => s.clone(),
                Some(Either::Right(named)) => named
                    .iter()
                    .find(|m| m.get("name").is_some_and(|n| n == "default"))
                    .and_then(|m| m.get("template").cloned())
                    .ok_or("the model's chat templates have no default")?,
                None => return Err("the model has no chat template".into()),
            };
            let template = ChatTemplate::new(&source, &token_text!(chat.bos_token), &token_text!(chat.eos_token))?;
            let (tokenizer, eos) = match ours {
                Some(t) => {
                    let mut eos = t.eos.clone();
                    eos.extend(md.eos_tok.iter().filter(|e| !t.eos.contains(e)));
                    (Vocabulary::Gguf(Box::new(t)), eos)
                }
                None => (Vocabulary::Hf(tokenizer), md.eos_tok.clone()),
            };
            let details = serde_json::json!({
                "layers": md.num_hidden_layers,
                "activation_dtype": format!("{:?}", md.activation_dtype),
                "eos_token_ids": eos,
                "vocab_size": tokenizer.vocab_size(),
            });
            (Arc::new(tokenizer), template, md.max_seq_len, eos, details)
        };
        let table = TokenTable::new(&tokenizer.token_bytes()?, &eos)?;
        let sequences = NonZeroUsize::new(max_sequences.max(1)).ok_or("max sequences must be positive")?;
        let runner =
            MistralRsBuilder::new(pipeline, SchedulerConfig::DefaultScheduler { method: DefaultSchedulerMethod::Fixed(sequences) }, false, None)
                .with_no_prefix_cache(true)
                .build()
                .await;
        let turns = if device.is_cpu() { 1 } else { max_sequences.max(1) };
        let details = {
            let mut d = details;
            d["sequences_in_engine"] = serde_json::json!(turns);
            d
        };
        Ok(MistralGenerator {
            runner,
            turns: Arc::new(tokio::sync::Semaphore::new(turns)),
            tokenizer,
            table,
            template,
            context,
            eos: Arc::new(eos),
            details,
        })
    }
}

/// Samples for the engine: our seeded `Sampler` picks the token, the engine is handed a
/// one-hot distribution (its own sampling is greedy), and every call is counted.
struct SeededPick {
    sampler: Mutex<Sampler>,
    eos: Arc<Vec<u32>>,
    generated: AtomicUsize,
    last: AtomicU32,
    /// Every token picked, in order: the text is made from these by our own detokenizer,
    /// so both engines turn the same tokens into the same text (mistral.rs trims the first
    /// piece and drops byte-fallback tokens from its own).
    picks: Mutex<Vec<u32>>,
    /// When set, the first logits seen are kept here (the parity test reads them).
    capture: Option<Mutex<Option<Vec<f32>>>>,
    /// The end-of-sequence token's log-probability, when it ended on one and they were asked for.
    end: Mutex<Option<super::sampling::TokenLogprob>>,
}

impl mistralrs::CustomLogitsProcessor for SeededPick {
    fn apply(&self, logits: &candle_core::Tensor, _context: &[u32]) -> candle_core::Result<candle_core::Tensor> {
        let values: Vec<f32> = logits.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        if let Some(slot) = &self.capture {
            slot.lock().get_or_insert_with(|| values.clone());
        }
        let pick = {
            let mut sampler = self.sampler.lock();
            let pick = sampler.sample(&values);
            if let Some(e) = sampler.grammar_error() {
                // The sequence fails (the engine reports the error) rather than go on unconstrained.
                return Err(candle_core::Error::Msg(format!("the response_format grammar failed: {e}")));
            }
            if self.eos.contains(&pick) {
                *self.end.lock() = sampler.take_last_logprob();
            }
            pick
        };
        self.picks.lock().push(pick);
        self.generated.fetch_add(1, Ordering::SeqCst);
        self.last.store(pick, Ordering::SeqCst);
        let mut one_hot = vec![f32::NEG_INFINITY; values.len()];
        if let Some(v) = one_hot.get_mut(pick as usize) {
            *v = 0.0;
        }
        candle_core::Tensor::from_vec(one_hot, values.len(), logits.device())?.to_dtype(logits.dtype())
    }
}

impl Generator for MistralGenerator {
    fn info(&self) -> GeneratorInfo {
        GeneratorInfo {
            engine: "mistralrs",
            context: self.context,
            details: self.details.clone(),
            template_tools: self.template.supports_tools,
            prompt_logprobs: false,
        }
    }

    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        self.template.render(messages).map_err(EngineError::Template)
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.tokenizer.encode(text).map_err(EngineError::Tokenizer)
    }

    fn tokenize_plain(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        match &*self.tokenizer {
            Vocabulary::Gguf(t) => t.encode_plain(text),
            Vocabulary::Hf(t) => t.encode_fast(text, false).map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string()),
        }
        .map_err(EngineError::Tokenizer)
    }

    fn detokenize(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids)
    }

    fn token_table(&self) -> Arc<TokenTable> {
        self.table.clone()
    }

    fn eos_tokens(&self) -> Vec<u32> {
        self.eos.to_vec()
    }

    fn start(&self, prompt: Vec<u32>, sampler: Sampler, max_tokens: usize, stop: &[String]) -> Result<TokenStream, EngineError> {
        self.start_with(prompt, sampler, max_tokens, stop, None).map(|(s, _)| s).map_err(EngineError::Failed)
    }
}

impl MistralGenerator {
    /// The logits mistral.rs computes for the token after `prompt` (the parity test compares
    /// them with our engine's on the same weights).
    pub async fn next_token_logits(&self, prompt: Vec<u32>) -> Result<Vec<f32>, String> {
        let (mut stream, pick) = self.start_with(prompt, Sampler::new(SamplingParams::greedy()), 1, &[], Some(Mutex::new(None)))?;
        while let Some(e) = stream.events.recv().await {
            if let GenEvent::Failed(m) = e {
                return Err(m);
            }
        }
        let captured = pick.capture.as_ref().and_then(|c| c.lock().take());
        captured.ok_or_else(|| "no logits were captured".to_string())
    }

    fn start_with(
        &self,
        prompt: Vec<u32>,
        mut sampler: Sampler,
        max_tokens: usize,
        stop: &[String],
        capture: Option<Mutex<Option<Vec<f32>>>>,
    ) -> Result<(TokenStream, Arc<SeededPick>), String> {
        if sampler.params().ignore_eos {
            sampler.ban(&self.eos);
        }
        let pick = Arc::new(SeededPick {
            sampler: Mutex::new(sampler),
            eos: self.eos.clone(),
            generated: AtomicUsize::new(0),
            last: AtomicU32::new(u32::MAX),
            picks: Mutex::new(Vec::new()),
            capture,
            end: Mutex::new(None),
        });
        // Room for every message of the answer, so the engine never waits on this channel.
        let (tx, mut rx) = mpsc::channel::<Response>(max_tokens + 16);
        let sampling = mistralrs::SamplingParams {
            temperature: Some(0.0),
            top_k: None,
            top_p: None,
            min_p: None,
            top_n_logprobs: 0,
            frequency_penalty: None,
            presence_penalty: None,
            repetition_penalty: None,
            stop_toks: (!stop.is_empty()).then(|| StopTokens::Seqs(stop.to_vec())),
            max_len: Some(max_tokens),
            logits_bias: None,
            n_choices: 1,
            dry_params: None,
        };
        let request = Request::Normal(Box::new(NormalRequest {
            messages: RequestMessage::CompletionTokens(prompt),
            sampling_params: sampling,
            response: tx,
            return_logprobs: false,
            is_streaming: true,
            id: self.runner.next_request_id(),
            constraint: Constraint::None,
            suffix: None,
            tools: None,
            tool_choice: None,
            logits_processors: Some(vec![pick.clone() as Arc<dyn mistralrs::CustomLogitsProcessor>]),
            return_raw_logits: false,
            web_search_options: None,
            model_id: None,
            truncate_sequence: false,
        }));
        let sender = self.runner.get_sender(None).map_err(|e| format!("the engine is not running: {e}"))?;
        let (out, events) = mpsc::unbounded_channel();
        let eos = self.eos.clone();
        let turns = self.turns.clone();
        let tokenizer = self.tokenizer.clone();
        let task_pick = pick.clone();
        tokio::spawn(async move {
            let pick = task_pick;
            let mut detok = Detokenizer::default();
            let (mut last_text, mut last_logprobs) = (String::new(), Vec::new());
            let decode = |ids: &[u32]| tokenizer.decode(ids);
            // New text from the picks so far (an end-of-sequence pick is never text).
            let text_now = |detok: &mut Detokenizer, flush: bool| {
                let picks = pick.picks.lock().clone();
                let end = if picks.last().is_some_and(|t| eos.contains(t)) { picks.len() - 1 } else { picks.len() };
                let text = if flush { detok.flush(decode, &picks[..end]) } else { detok.push(decode, &picks[..end]) };
                (text, picks.len())
            };
            // Wait for the engine's turn (see `turns`); give up if the reader leaves first.
            let _turn = tokio::select! {
                _ = out.closed() => return,
                t = turns.acquire_owned() => match t {
                    Ok(t) => t,
                    Err(_) => return,
                },
            };
            if let Err(e) = sender.send(request).await {
                let _ = out.send(GenEvent::Failed(format!("the engine refused the request: {e}")));
                return;
            }
            loop {
                let message = tokio::select! {
                    // Our reader is gone: dropping `rx` cancels the sequence at its next token.
                    _ = out.closed() => return,
                    m = rx.recv() => m,
                };
                // mistral.rs's own text is ignored: ours comes from the tokens it picked.
                if let Some(Response::CompletionChunk(_) | Response::CompletionDone(_)) | None = &message {
                    let done = match &message {
                        Some(Response::CompletionChunk(c)) => c.choices.first().is_some_and(|c| c.finish_reason.is_some()),
                        _ => true,
                    };
                    if let (Some(text), tokens) = text_now(&mut detok, done) {
                        let logprobs = pick.sampler.lock().take_logprobs();
                        if done {
                            // The last text travels with `Done`, so the reader knows it is the last.
                            last_text = text;
                            last_logprobs = logprobs;
                        } else if out.send(GenEvent::Text { text, tokens, logprobs }).is_err() {
                            return;
                        }
                    }
                }
                let event = match message {
                    Some(Response::CompletionChunk(chunk)) => {
                        let Some(choice) = chunk.choices.into_iter().next() else { continue };
                        match choice.finish_reason.as_deref() {
                            None => continue,
                            Some(reason) => finish(reason, &pick),
                        }
                    }
                    Some(Response::CompletionDone(done)) => {
                        let reason = done.choices.first().map(|c| c.finish_reason.clone()).unwrap_or_default();
                        finish(&reason, &pick)
                    }
                    Some(Response::CompletionModelError(e, _)) | Some(Response::ModelError(e, _)) => GenEvent::Failed(e),
                    Some(Response::InternalError(e)) | Some(Response::ValidationError(e)) => GenEvent::Failed(e.to_string()),
                    Some(_) => continue,
                    // Closed without a finish: it ended on a token whose bytes were not yet a
                    // whole character (mistral.rs then sends nothing), or the engine died.
                    None => {
                        let generated = pick.generated.load(Ordering::SeqCst);
                        let last = pick.last.load(Ordering::SeqCst);
                        if generated >= max_tokens {
                            GenEvent::done(FinishReason::Length, generated)
                        } else if eos.contains(&last) {
                            GenEvent::done(FinishReason::Stop, generated)
                        } else {
                            GenEvent::Failed("the engine ended the sequence without finishing it".into())
                        }
                    }
                };
                let event = match event {
                    GenEvent::Done { reason, completion_tokens, .. } => {
                        let mut logprobs = std::mem::take(&mut last_logprobs);
                        logprobs.extend(pick.sampler.lock().take_logprobs());
                        let end = pick.end.lock().take();
                        GenEvent::Done { reason, completion_tokens, text: std::mem::take(&mut last_text), logprobs, end }
                    }
                    other => other,
                };
                let _ = out.send(event);
                return;
            }
        });
        Ok((TokenStream { events }, pick))
    }
}

fn finish(reason: &str, pick: &SeededPick) -> GenEvent {
    let completion_tokens = pick.generated.load(Ordering::SeqCst);
    match reason {
        "length" => GenEvent::done(FinishReason::Length, completion_tokens),
        "stop" => GenEvent::done(FinishReason::Stop, completion_tokens),
        other => GenEvent::Failed(format!("the engine ended the sequence: {other}")),
    }
}
