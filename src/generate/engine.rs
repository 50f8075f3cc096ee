//! The `Generator` seam: what our HTTP layer needs from a text-generation engine, and
//! nothing more. Admission, stop sequences, streaming, timeouts, usage and metrics all live
//! in front of it (`GenerateService`), so an engine can be swapped — mistral.rs on CUDA,
//! our own CPU engine — without touching a route.

use tokio::sync::mpsc;

use std::sync::Arc;

use super::constrain::TokenTable;
use super::sampling::{Sampler, TokenLogprob};
use super::template::ChatMessage;

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token (or the grammar completed, which ends the sequence).
    Stop,
    /// One of the request's stop sequences.
    StopSequence,
    /// `max_tokens` reached, or the context is full.
    Length,
}

impl FinishReason {
    /// OpenAI's name for it (which does not tell a stop sequence from end-of-sequence).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop | FinishReason::StopSequence => "stop",
            FinishReason::Length => "length",
        }
    }

    /// text-generation-inference's name for it.
    pub fn tgi(self) -> &'static str {
        match self {
            FinishReason::Stop => "eos_token",
            FinishReason::StopSequence => "stop_sequence",
            FinishReason::Length => "length",
        }
    }
}

/// What an engine sends while it generates one sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// The next piece of text (one token's worth, or more once bytes form whole characters);
    /// `tokens` counts the tokens generated so far; `logprobs` has an entry per token
    /// behind this text when the request asked for them.
    Text { text: String, tokens: usize, logprobs: Vec<TokenLogprob> },
    /// The prompt's own log-probabilities, sent once prefill is done when the sampler asked
    /// for them (`Sampler::report_prompt_logprobs`): entry `i` is the log-probability of
    /// prompt token `i + 1` after the tokens before it.
    Prefill(Vec<f32>),
    /// The sequence ended; `completion_tokens` counts every generated token, EOS included.
    /// The last text comes with it (so a reader knows which text is the last); `end` is the
    /// end-of-sequence token's log-probability when it ended on one and they were asked for.
    Done { reason: FinishReason, completion_tokens: usize, text: String, logprobs: Vec<TokenLogprob>, end: Option<TokenLogprob> },
    /// The engine failed this sequence.
    Failed(String),
}

impl GenEvent {
    /// The end of a sequence whose text was all sent before.
    pub fn done(reason: FinishReason, completion_tokens: usize) -> Self {
        GenEvent::Done { reason, completion_tokens, text: String::new(), logprobs: Vec::new(), end: None }
    }
}

/// A running sequence's events. Dropping it (or closing `events`) cancels the sequence:
/// the engine sees the closed channel and frees its slot within one decode step.
pub struct TokenStream {
    pub events: mpsc::UnboundedReceiver<GenEvent>,
}

/// Facts about a loaded generator.
#[derive(Debug, Clone)]
pub struct GeneratorInfo {
    /// Engine name for `/info` (`mistralrs`, `edgenode-cpu`).
    pub engine: &'static str,
    /// Context window in tokens (prompt + completion).
    pub context: usize,
    /// Layers, vocabulary and similar, for `/info`.
    pub details: serde_json::Value,
    /// The chat template renders tool definitions.
    pub template_tools: bool,
    /// The engine reports the prompt's own log-probabilities (`GenEvent::Prefill`).
    pub prompt_logprobs: bool,
}

/// Why an engine could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The messages cannot be rendered with the model's chat template (the request's fault).
    #[error("{0}")]
    Template(String),
    /// The tokenizer failed on the text.
    #[error("tokenizer failed: {0}")]
    Tokenizer(String),
    /// The engine's thread is gone (the supervisor is reloading the model).
    #[error("the engine has stopped")]
    Stopped,
    /// Anything else the engine reports.
    #[error("{0}")]
    Failed(String),
}

/// A loaded text-generation model.
pub trait Generator: Send + Sync + 'static {
    /// What this generator is.
    fn info(&self) -> GeneratorInfo;

    /// Renders chat messages with the model's chat template.
    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError>;

    /// Tokenizes prompt text exactly as the engine will see it.
    fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError>;

    /// The tokens of `text` alone: no BOS or EOS added (llama.cpp's `/tokenize` default).
    fn tokenize_plain(&self, text: &str) -> Result<Vec<u32>, EngineError>;

    /// The text of `ids`, special tokens left out.
    fn detokenize(&self, ids: &[u32]) -> String;

    /// Every token's bytes, with the grammar engine built over them (constrained decoding,
    /// log-probabilities).
    fn token_table(&self) -> Arc<TokenTable>;

    /// The tokens that end a sequence.
    fn eos_tokens(&self) -> Vec<u32>;

    /// Starts generating after `prompt`, picking tokens with `sampler` (which already
    /// holds the request's seed, penalties, bias and grammar). Stop sequences are passed as
    /// a hint (the caller matches them on the text itself); `max_tokens` fits the context
    /// (the caller checked).
    fn start(&self, prompt: Vec<u32>, sampler: Sampler, max_tokens: usize, stop: &[String]) -> Result<TokenStream, EngineError>;

    /// Kills the engine's own thread as a bug would (`debug.fault_injection` only).
    fn inject_fault(&self) -> Result<(), EngineError> {
        Err(EngineError::Failed(format!("engine {} has no fault injection", self.info().engine)))
    }
}
