//! Our CPU generation engine behind the `Generator` seam: Llama-family GGUF models on our
//! own kernels, with continuous batching.
//!
//! One engine thread owns the weights and every sequence's KV cache. Each step it admits
//! new sequences, drops those whose reader went away, and runs one forward pass over rows
//! from all of them: the last token of every decoding sequence plus a chunk of a prompt
//! being prefilled (so a long prompt never stalls the others). Sampling is per sequence
//! with its own seeded `Sampler`; text is detokenized incrementally, whole characters only.

pub mod gguf;
pub mod llama;

use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::constrain::TokenTable;
use super::detok::Detokenizer;
use super::engine::{EngineError, FinishReason, GenEvent, Generator, GeneratorInfo, TokenStream};
use super::sampling::Sampler;
use super::template::{ChatMessage, ChatTemplate};
use super::tokenizer::GgufTokenizer;
use crate::cpu::team::Team;
use crate::runtime::OnExit;
use llama::{KvCache, LlamaWeights, Row, Scratch};

/// Most prompt tokens prefilled in one step, shared by the prefilling sequences; decoding
/// sequences always get their row.
const PREFILL_ROWS_PER_STEP: usize = 256;

/// What the engine thread is asked to do.
enum Command {
    /// A sequence to join.
    Start(Box<NewSequence>),
    /// Die here, outside the caught step, as a bug in the sampler or detokenizer would
    /// (`debug.fault_injection`: how the tests prove the engine is supervised).
    Die,
}

/// A sequence waiting to join the engine.
struct NewSequence {
    prompt: Vec<u32>,
    sampler: Sampler,
    max_tokens: usize,
    events: mpsc::UnboundedSender<GenEvent>,
}

/// A sequence in the engine.
struct Sequence {
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    cache: KvCache,
    sampler: Sampler,
    max_tokens: usize,
    generated: usize,
    detok: Detokenizer,
    events: mpsc::UnboundedSender<GenEvent>,
    /// The prompt's own log-probabilities, gathered while prefilling, when asked for.
    prompt_logprobs: Option<Vec<f32>>,
}

/// The native engine's handle.
pub struct NativeGenerator {
    tx: std_mpsc::Sender<Command>,
    tokenizer: Arc<GgufTokenizer>,
    table: Arc<TokenTable>,
    template: ChatTemplate,
    context: usize,
    details: serde_json::Value,
}

impl NativeGenerator {
    /// Loads a GGUF file and starts the engine thread. `exact` runs the projections in f32
    /// on dequantized weights (the reference mode the parity test uses; 4–8× the memory).
    pub fn load(path: &std::path::Path, threads: usize, exact: bool) -> Result<Self, String> {
        Self::load_supervised(path, threads, exact, || {})
    }

    /// `load`, with `on_exit` called when the engine thread ends for any reason: its handle
    /// was dropped (then every sequence is already over), or it panicked outside the caught
    /// step (then every running sequence has just ended with an error, and the supervisor
    /// must reload the model).
    pub fn load_supervised(path: &std::path::Path, threads: usize, exact: bool, on_exit: impl FnOnce() + Send + 'static) -> Result<Self, String> {
        let model = gguf::load(path, exact)?;
        let tokenizer = Arc::new(model.tokenizer);
        let table = TokenTable::new(tokenizer.token_bytes(), &tokenizer.eos)?;
        let template = ChatTemplate::new(&model.chat_template, &model.bos_text, &model.eos_text)?;
        let weights = model.weights;
        let c = weights.config.clone();
        let weight_bytes: usize =
            weights.blocks.iter().map(|b| b.qkv.bytes() + b.attn_out.bytes() + b.gate_up.bytes() + b.down.bytes()).sum::<usize>()
                + weights.embed.bytes()
                + weights.output.bytes();
        let details = serde_json::json!({
            "layers": c.layers, "hidden": c.hidden, "heads": c.heads, "kv_heads": c.kv_heads,
            "vocab_size": c.vocab, "weight_bytes": weight_bytes, "formats": model.formats,
            // What one decode step reads: every weight but the embedding table (one row).
            "weight_bytes_per_token": weight_bytes - weights.embed.bytes(),
            "cpu_isa": crate::cpu::Isa::detect().name(), "threads": threads,
            "tokenizer": tokenizer.kind, "adds_bos": tokenizer.adds_bos(), "eos_token_ids": tokenizer.eos,
        });
        let (tx, rx) = std_mpsc::channel();
        let eos = tokenizer.eos.clone();
        let tok = tokenizer.clone();
        let (started_tx, started_rx) = std_mpsc::channel();
        std::thread::Builder::new()
            .name("generate-native".into())
            .spawn(move || {
                let exit = OnExit::new(Box::new(on_exit) as Box<dyn FnOnce() + Send>);
                match Team::new(threads.max(1), "generate") {
                    Ok(team) => {
                        let _ = started_tx.send(Ok(()));
                        run_engine(weights, tok, eos, rx, &team, exit)
                    }
                    Err(e) => {
                        let _ = started_tx.send(Err(format!("cannot start the engine's threads: {e}")));
                    }
                }
            })
            .map_err(|e| format!("cannot start the engine thread: {e}"))?;
        started_rx.recv().map_err(|_| "the engine thread ended before it started".to_string())??;
        Ok(NativeGenerator { tx, tokenizer, table, template, context: c.context, details })
    }
}

impl Generator for NativeGenerator {
    fn info(&self) -> GeneratorInfo {
        GeneratorInfo {
            engine: "native",
            context: self.context,
            details: self.details.clone(),
            template_tools: self.template.supports_tools,
            prompt_logprobs: true,
        }
    }

    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        self.template.render(messages).map_err(EngineError::Template)
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.tokenizer.encode(text).map_err(EngineError::Tokenizer)
    }

    fn tokenize_plain(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.tokenizer.encode_plain(text).map_err(EngineError::Tokenizer)
    }

    fn detokenize(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids)
    }

    fn token_table(&self) -> Arc<TokenTable> {
        self.table.clone()
    }

    fn eos_tokens(&self) -> Vec<u32> {
        self.tokenizer.eos.clone()
    }

    fn start(&self, prompt: Vec<u32>, mut sampler: Sampler, max_tokens: usize, _stop: &[String]) -> Result<TokenStream, EngineError> {
        if sampler.params().ignore_eos {
            sampler.ban(&self.tokenizer.eos);
        }
        let (events, rx) = mpsc::unbounded_channel();
        self.tx.send(Command::Start(Box::new(NewSequence { prompt, sampler, max_tokens, events }))).map_err(|_| EngineError::Stopped)?;
        Ok(TokenStream { events: rx })
    }

    fn inject_fault(&self) -> Result<(), EngineError> {
        self.tx.send(Command::Die).map_err(|_| EngineError::Stopped)
    }
}

fn run_engine(
    weights: LlamaWeights,
    tokenizer: Arc<GgufTokenizer>,
    eos: Vec<u32>,
    rx: std_mpsc::Receiver<Command>,
    team: &Team,
    exit: OnExit<Box<dyn FnOnce() + Send>>,
) {
    let layers = weights.config.layers;
    let context = weights.config.context;
    let vocab = weights.config.vocab;
    let mut active: Vec<Sequence> = Vec::new();
    // Declared after `active`, so dropped before it when the thread unwinds: the model is
    // out of service before its running sequences see their channels close.
    let _exit = exit;
    let mut scratch = Scratch::default();
    let admit = |command: Command, active: &mut Vec<Sequence>| {
        let n = match command {
            Command::Start(n) => n,
            Command::Die => panic!("fault injected: the engine thread dies with {} sequences running", active.len()),
        };
        let prompt_logprobs = n.sampler.wants_prompt_logprobs().then(|| Vec::with_capacity(n.prompt.len()));
        active.push(Sequence {
            prompt_logprobs,
            prompt_len: n.prompt.len(),
            tokens: n.prompt,
            prefilled: 0,
            cache: KvCache::new(layers),
            sampler: n.sampler,
            max_tokens: n.max_tokens,
            generated: 0,
            detok: Detokenizer::default(),
            events: n.events,
        });
    };
    loop {
        if active.is_empty() {
            match rx.recv() {
                Ok(n) => admit(n, &mut active),
                Err(_) => return,
            }
        }
        while let Ok(n) = rx.try_recv() {
            admit(n, &mut active);
        }
        // A reader that went away cancels its sequence here, within one step.
        active.retain(|s| !s.events.is_closed());
        if active.is_empty() {
            continue;
        }

        // Rows: every decoding sequence's next token, then prompt chunks within the budget.
        let mut rows = Vec::new();
        let mut budget = PREFILL_ROWS_PER_STEP;
        for (i, s) in active.iter().enumerate() {
            if s.prefilled >= s.prompt_len {
                let pos = s.tokens.len() - 1;
                rows.push(Row { seq: i, pos, token: s.tokens[pos], logits: true });
            }
        }
        for (i, s) in active.iter().enumerate() {
            if s.prefilled < s.prompt_len && budget > 0 {
                let take = (s.prompt_len - s.prefilled).min(budget);
                budget -= take;
                // Every prompt row gets logits when the prompt's own log-probabilities are asked for.
                let all = s.prompt_logprobs.is_some();
                for p in s.prefilled..s.prefilled + take {
                    rows.push(Row { seq: i, pos: p, token: s.tokens[p], logits: all || p + 1 == s.prompt_len });
                }
            }
        }
        // Rows of one sequence must be consecutive: sort by sequence, keeping position order.
        rows.sort_by_key(|r| (r.seq, r.pos));

        let result = {
            let mut caches: Vec<&mut KvCache> = active.iter_mut().map(|s| &mut s.cache).collect();
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| weights.step(&rows, &mut caches, &mut scratch, team)))
        };
        if result.is_err() {
            // The step panicked: fail every sequence in it and start clean.
            for s in active.drain(..) {
                let _ = s.events.send(GenEvent::Failed("the engine failed on this step".into()));
            }
            scratch = Scratch::default();
            continue;
        }

        // Prefill progress, then sampling for rows that produced logits.
        for r in &rows {
            let s = &mut active[r.seq];
            if r.pos < s.prompt_len {
                s.prefilled = s.prefilled.max(r.pos + 1);
            }
        }
        let mut done = Vec::new();
        for (k, r) in rows.iter().filter(|r| r.logits).enumerate() {
            let logits = &scratch.logits[k * vocab..(k + 1) * vocab];
            let s = &mut active[r.seq];
            if r.pos + 1 < s.prompt_len {
                // A prompt row: the log-probability of the prompt's next token, nothing sampled.
                if let Some(lps) = &mut s.prompt_logprobs {
                    lps.push(super::sampling::logprob_of(logits, s.tokens[r.pos + 1]));
                }
                continue;
            }
            if let Some(lps) = s.prompt_logprobs.take() {
                let _ = s.events.send(GenEvent::Prefill(lps));
            }
            let token = s.sampler.sample(logits);
            if let Some(e) = s.sampler.grammar_error() {
                let _ = s.events.send(GenEvent::Failed(format!("the response_format grammar failed: {e}")));
                done.push(r.seq);
                continue;
            }
            s.tokens.push(token);
            s.generated += 1;
            let is_eos = eos.contains(&token);
            let end = if is_eos { s.sampler.take_last_logprob() } else { None };
            let finish = if is_eos || s.sampler.grammar_done() {
                Some(FinishReason::Stop)
            } else if s.generated >= s.max_tokens || s.tokens.len() >= context {
                Some(FinishReason::Length)
            } else {
                None
            };
            let text = if is_eos { None } else { s.detok.push(|ids| tokenizer.decode(ids), &s.tokens[s.prompt_len..]) };
            let Some(reason) = finish else {
                if let Some(text) = text {
                    let _ = s.events.send(GenEvent::Text { text, tokens: s.generated, logprobs: s.sampler.take_logprobs() });
                }
                continue;
            };
            // The last text travels with `Done`, so the reader knows it is the last.
            let generated = if is_eos { &s.tokens[s.prompt_len..s.tokens.len() - 1] } else { &s.tokens[s.prompt_len..] };
            let mut text = text.unwrap_or_default();
            text.extend(s.detok.flush(|ids| tokenizer.decode(ids), generated));
            let logprobs = s.sampler.take_logprobs();
            let _ = s.events.send(GenEvent::Done { reason, completion_tokens: s.generated, text, logprobs, end });
            done.push(r.seq);
        }
        done.sort_unstable();
        for i in done.into_iter().rev() {
            active.swap_remove(i);
        }
    }
}
