//! Text generation: what a request holds in front of the `Generator` seam.
//!
//! `GenerateService` validates the prompt against the context (the prompt's exact tokens
//! are known before anything is queued), admits the request (`max_concurrent_sequences`
//! running, a bounded number waiting, 429 beyond), and turns the engine's events into
//! `Piece`s with stop sequences cut out and the deadline enforced. A `Generation` owns its
//! sequence slot: dropping it — a client that went away — frees the slot and cancels the
//! sequence in the engine within one decode step.

pub mod constrain;
pub mod detok;
pub mod engine;
pub mod mistral;
pub mod native;
pub mod sampling;
pub mod stop;
pub mod template;
pub mod tokenizer;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::config::{LimitsConfig, ModelConfig};
use crate::error::Error;
use crate::telemetry::metrics::METRICS;
use constrain::Grammar;
use engine::{EngineError, FinishReason, GenEvent, Generator, GeneratorInfo, TokenStream};
use sampling::{Sampler, SamplingParams, TokenLogprob};
use stop::StopMatcher;
use template::ChatMessage;

/// Default sequences decoded together.
pub const DEFAULT_MAX_SEQUENCES: usize = 8;
/// Default requests waiting for a sequence slot.
pub const DEFAULT_MAX_WAITING: usize = 32;
/// Default `max_tokens` when a request names none.
pub const DEFAULT_MAX_TOKENS: usize = 256;

impl From<EngineError> for Error {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Template(message) => Error::field("messages", message),
            EngineError::Stopped => Error::NotReady { message: "the model's engine is restarting".into(), retry_after_s: 1 },
            other => Error::Internal(other.to_string()),
        }
    }
}

/// A prompt as a client sends it.
#[derive(Debug, Clone)]
pub enum PromptInput {
    /// Raw text, used as is (`/v1/completions`, `/generate` with `prompt`).
    Text(String),
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

/// A validated prompt: its tokens and the completion budget that fits the context.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub tokens: Vec<u32>,
    pub max_tokens: usize,
}

/// How a request wants its tokens chosen: the sampling parameters and what shapes them.
#[derive(Debug, Clone)]
pub struct Decoding {
    pub params: SamplingParams,
    /// `logit_bias`: (token, bias) pairs added to the logits.
    pub logit_bias: Vec<(u32, f32)>,
    /// `Some(k)`: report each token's log-probability and its `k` most likely alternatives.
    pub logprobs: Option<usize>,
    /// Output constrained to this grammar (`response_format`).
    pub grammar: Option<Grammar>,
    /// A stop sequence stays in the text, and the text is released whole tokens at a time
    /// (text-generation-inference's way); otherwise it is cut (OpenAI's).
    pub keep_stop: bool,
    /// Report the prompt's own log-probabilities (TGI's `decoder_input_details`).
    pub prompt_logprobs: bool,
}

impl Decoding {
    /// Just sampling parameters, nothing else.
    pub fn new(params: SamplingParams) -> Self {
        Decoding { params, logit_bias: Vec::new(), logprobs: None, grammar: None, keep_stop: false, prompt_logprobs: false }
    }
}

/// What a generation yields, in order: text pieces, then one `Done` (or an `Error`).
#[derive(Debug)]
pub enum Piece {
    /// Text, with the log-probabilities of the tokens behind it when they were asked for.
    Text {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Done(Usage, FinishReason),
    Error(Error),
}

/// Token counts of one generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// A released piece of text with its tokens' log-probabilities (when asked for).
pub type TextPiece = (String, Vec<TokenLogprob>);

/// A finished generation's output as the response cache keeps it: replaying it
/// (`Generation::replay`) yields the same pieces, so a cached answer streams or collects
/// through the same code as a fresh one.
#[derive(Debug, Clone)]
pub struct Transcript {
    /// Text pieces as they were released (stop sequences already cut), with their tokens'
    /// log-probabilities when the request asked for them.
    pub pieces: Vec<TextPiece>,
    pub completion_tokens: usize,
    pub reason: FinishReason,
    /// The end-of-sequence token's log-probability, when it ended on one and they were asked for.
    pub end: Option<TokenLogprob>,
    /// Seconds the model spent: what a replay saves.
    pub compute_s: f64,
}

impl Transcript {
    /// The whole text.
    pub fn text(&self) -> String {
        self.pieces.iter().map(|(t, _)| t.as_str()).collect()
    }

    /// Bytes it holds, for the cache's memory bound.
    pub fn bytes(&self) -> usize {
        let logprob = |l: &TokenLogprob| 48 + l.bytes.len() + l.top.iter().map(|(_, b, _)| 40 + b.len()).sum::<usize>();
        self.pieces.iter().map(|(t, l)| 56 + t.len() + l.iter().map(logprob).sum::<usize>()).sum::<usize>()
            + self.end.as_ref().map_or(0, logprob)
            + 64
    }
}

/// Called once with the transcript when a generation finishes normally (not on an error,
/// a timeout or a client that went away).
pub type OnFinished = Box<dyn FnOnce(Transcript) + Send>;

/// The generation service of one model.
pub struct GenerateService {
    pub name: String,
    engine: Arc<dyn Generator>,
    pub info: GeneratorInfo,
    /// Context window in force (the model's, or less if configured).
    pub context: usize,
    default_max_tokens: usize,
    slots: Arc<Semaphore>,
    pub max_sequences: usize,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    timeout: Duration,
    /// `limits.max_tokens`: the largest `max_tokens` a request may ask for.
    max_tokens_limit: usize,
}

/// Decrements the waiting count when a waiting request is admitted or gives up.
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl GenerateService {
    /// Wraps a loaded engine with the model's admission limits (its `[[models]]` entry)
    /// and the node's request limits.
    pub fn new(engine: Arc<dyn Generator>, model: &ModelConfig, limits: &LimitsConfig) -> Self {
        let info = engine.info();
        let context = model.context.map_or(info.context, |c| c.min(info.context));
        let max_sequences = model.max_concurrent_sequences.unwrap_or(DEFAULT_MAX_SEQUENCES);
        GenerateService {
            name: model.name.clone(),
            engine,
            info,
            context,
            default_max_tokens: model.default_max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            slots: Arc::new(Semaphore::new(max_sequences)),
            max_sequences,
            waiting: Arc::new(AtomicUsize::new(0)),
            max_waiting: model.max_waiting.unwrap_or(DEFAULT_MAX_WAITING),
            timeout: Duration::from_secs(limits.request_timeout_s),
            max_tokens_limit: limits.max_tokens,
        }
    }

    /// The tokens of `text`: with BOS/EOS as prompts get them (`add_special`), or alone.
    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>, Error> {
        let out = if add_special { self.engine.tokenize(text) } else { self.engine.tokenize_plain(text) };
        out.map_err(|e| Error::field("content", e.to_string()))
    }

    /// The text of token ids (special tokens left out); ids outside the vocabulary are a 400.
    pub fn detokenize(&self, ids: &[u32]) -> Result<String, Error> {
        let vocab = self.engine.token_table().len();
        if let Some(i) = ids.iter().position(|&t| t as usize >= vocab) {
            return Err(Error::field(format!("tokens[{i}]"), format!("{} is not in the vocabulary of model {} ({vocab} tokens)", ids[i], self.name)));
        }
        Ok(self.engine.detokenize(ids))
    }

    /// A token's text as the vocabulary writes it (a special token's name).
    pub fn piece(&self, id: u32) -> String {
        String::from_utf8_lossy(self.engine.token_table().bytes(id)).into_owned()
    }

    /// Kills the engine's thread as a bug would (`debug.fault_injection`).
    pub fn inject_fault(&self) -> Result<(), Error> {
        self.engine.inject_fault().map_err(|e| self.engine_error(e))
    }

    /// An engine's error as the request meets it, naming the model.
    fn engine_error(&self, e: EngineError) -> Error {
        match e {
            EngineError::Stopped => Error::NotReady { message: format!("model {} is restarting", self.name), retry_after_s: 1 },
            other => Error::Internal(format!("model {}: {}", self.name, Error::from(other))),
        }
    }

    /// Sequences running now.
    pub fn running(&self) -> usize {
        self.max_sequences - self.slots.available_permits()
    }

    /// Most requests that may wait for a slot (`max_waiting`).
    pub fn max_waiting(&self) -> usize {
        self.max_waiting
    }

    /// Requests waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Every token's bytes (and whether it is special), for answers that report tokens.
    pub fn token_table(&self) -> Arc<constrain::TokenTable> {
        self.engine.token_table()
    }

    /// Renders and tokenizes the prompt, and checks it and `max_tokens` against the context.
    pub async fn prepare(&self, input: PromptInput, max_tokens: Option<i64>) -> Result<Prepared, Error> {
        self.prepare_with(input, max_tokens, "max_tokens", None).await
    }

    /// `prepare`, with the completion budget named as the request names it (`field`), and
    /// keeping only the prompt's last `truncate` tokens first (TGI's `truncate`: the start
    /// of a long prompt is what goes).
    pub async fn prepare_with(&self, input: PromptInput, max_tokens: Option<i64>, field: &str, truncate: Option<usize>) -> Result<Prepared, Error> {
        if let Some(m) = max_tokens {
            if m < 1 {
                return Err(Error::field(field, format!("must be at least 1, got {m}")));
            }
            if m > self.max_tokens_limit as i64 {
                return Err(Error::MaxTokensTooLarge { field: field.into(), requested: m, limit: self.max_tokens_limit });
            }
        }
        let engine = self.engine.clone();
        let tokens = tokio::task::spawn_blocking(move || -> Result<Vec<u32>, Error> {
            let text = match input {
                PromptInput::Text(t) => t,
                PromptInput::Chat(messages) => engine.render_chat(&messages)?,
            };
            Ok(engine.tokenize(&text)?)
        })
        .await
        .map_err(|_| Error::Internal("the tokenizer panicked".into()))??;
        let mut tokens = tokens;
        if let Some(keep) = truncate.filter(|&k| tokens.len() > k) {
            tokens.drain(..tokens.len() - keep);
        }
        if tokens.is_empty() {
            return Err(Error::EmptyInput("prompt".into()));
        }
        let context = self.context;
        if tokens.len() >= context {
            return Err(Error::ContextExceeded {
                message: format!(
                    "the prompt has {} tokens; the context of model {} is {context} tokens, leaving no room to generate",
                    tokens.len(),
                    self.name
                ),
            });
        }
        let room = context - tokens.len();
        let max_tokens = match max_tokens {
            Some(m) => {
                let m = usize::try_from(m).unwrap_or(usize::MAX);
                if m > room {
                    return Err(Error::ContextExceeded {
                        message: format!(
                            "{field} is {m} but the prompt has {} tokens and the context of model {} is {context}: at most {room} can be generated",
                            tokens.len(),
                            self.name
                        ),
                    });
                }
                m
            }
            None => self.default_max_tokens.min(room),
        };
        Ok(Prepared { tokens, max_tokens })
    }

    /// The request's sampler: its `logit_bias` checked against the vocabulary and its
    /// grammar compiled (both the request's fault when wrong: 400 naming the field).
    pub async fn sampler(&self, decoding: Decoding) -> Result<Sampler, Error> {
        let table = self.engine.token_table();
        let Decoding { params, logit_bias, logprobs, grammar, keep_stop: _, prompt_logprobs } = decoding;
        if let Some(&(t, _)) = logit_bias.iter().find(|(t, _)| *t as usize >= table.len()) {
            return Err(Error::field("logit_bias", format!("token {t} is not in the vocabulary of model {} ({} tokens)", self.name, table.len())));
        }
        if grammar.is_some() && params.ignore_eos {
            return Err(Error::field("ignore_eos", "cannot be combined with response_format (the grammar ends the sequence)"));
        }
        let mut sampler = Sampler::new(params);
        sampler.bias(logit_bias);
        if let Some(top) = logprobs {
            sampler.report_logprobs(top, table.clone());
        }
        if prompt_logprobs {
            if !self.info.prompt_logprobs {
                return Err(Error::field(
                    "parameters.decoder_input_details",
                    format!("model {}'s engine ({}) does not report the prompt's log-probabilities", self.name, self.info.engine),
                ));
            }
            sampler.report_prompt_logprobs();
        }
        if let Some(grammar) = grammar {
            let constraint = tokio::task::spawn_blocking(move || table.compile(&grammar))
                .await
                .map_err(|_| Error::Internal("the grammar compiler panicked".into()))?
                .map_err(|e| Error::field("response_format", format!("the schema cannot be used to constrain decoding: {e}")))?;
            sampler.constrain(constraint);
        }
        Ok(sampler)
    }

    /// No free sequence slot and the waiting queue full: a new request would get 429.
    pub fn saturated(&self) -> bool {
        self.slots.available_permits() == 0 && self.waiting() >= self.max_waiting
    }

    /// Takes a sequence slot (waiting in the bounded queue if need be) and starts generating.
    /// With `keep_stop`, a stop sequence stays in the text (TGI's way) and the engine is not
    /// told of the stop sequences (an engine that matches them itself would cut them).
    pub async fn start(&self, prepared: Prepared, mut sampler: Sampler, stop: Vec<String>, keep_stop: bool) -> Result<Generation, Error> {
        let started = Instant::now();
        let permit = self.admit().instrument(tracing::info_span!("queue", model = %self.name)).await?;
        let prompt_tokens = prepared.tokens.len();
        METRICS.queue_seconds.with_label_values(&[self.name.as_str()]).observe(started.elapsed().as_secs_f64());
        sampler.set_prompt(&prepared.tokens);
        let hint: &[String] = if keep_stop { &[] } else { &stop };
        let stream = self.engine.start(prepared.tokens, sampler, prepared.max_tokens, hint).map_err(|e| self.engine_error(e))?;
        Ok(Generation {
            stream,
            matcher: if keep_stop { StopMatcher::keeping(&stop) } else { StopMatcher::new(&stop) },
            prompt_tokens,
            completion_tokens: 0,
            deadline: tokio::time::Instant::now() + self.timeout,
            timeout_s: self.timeout.as_secs(),
            started,
            admitted: Instant::now(),
            first_piece: None,
            pending_done: None,
            logprobs: Vec::new(),
            prompt_logprobs: None,
            end_token: None,
            finished: false,
            model: self.name.clone(),
            prefill_span: tracing::info_span!("prefill", model = %self.name, prompt_tokens),
            request_span: tracing::Span::current(),
            decode_span: tracing::Span::none(),
            _permit: Some(permit),
            replayed: false,
            cache: None,
            recorder: None,
        })
    }

    async fn admit(&self) -> Result<OwnedSemaphorePermit, Error> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        let overloaded = || Error::Overloaded {
            what: format!("model {} (sequences running and waiting)", self.name),
            limit: self.max_sequences + self.max_waiting,
            retry_after_s: 1,
        };
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(overloaded());
        }
        let _waiting = Waiting(self.waiting.clone());
        match tokio::time::timeout(self.timeout, self.slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(Error::Internal("the sequence slots are closed".into())),
            Err(_) => Err(overloaded()),
        }
    }

    /// Runs a short chat prompt through prefill and a few decode steps.
    pub async fn warm_up(&self) -> Result<(), String> {
        let messages = vec![ChatMessage { role: "user".into(), content: "Say hello.".into() }];
        let prepared = self.prepare(PromptInput::Chat(messages), Some(4)).await.map_err(|e| e.to_string())?;
        let mut generation = self.start(prepared, Sampler::new(SamplingParams::greedy()), vec![], false).await.map_err(|e| e.to_string())?;
        while let Some(piece) = generation.next().await {
            match piece {
                Piece::Error(e) => return Err(format!("warm-up generation failed: {e}")),
                Piece::Done(..) => return Ok(()),
                Piece::Text { .. } => {}
            }
        }
        Err("warm-up generation ended without finishing".into())
    }
}

/// One running sequence. Dropping it cancels the sequence and frees its slot.
pub struct Generation {
    stream: TokenStream,
    matcher: StopMatcher,
    pub prompt_tokens: usize,
    completion_tokens: usize,
    deadline: tokio::time::Instant,
    timeout_s: u64,
    /// When the request asked for a slot.
    pub started: Instant,
    /// When it got one.
    pub admitted: Instant,
    /// When the first text arrived.
    pub first_piece: Option<Instant>,
    /// A `Done` to deliver after the text piece just returned.
    pending_done: Option<FinishReason>,
    /// Log-probabilities received with text the stop matcher still holds.
    logprobs: Vec<TokenLogprob>,
    /// The prompt's own log-probabilities (`GenEvent::Prefill`), when they were asked for.
    pub prompt_logprobs: Option<Vec<f32>>,
    /// The end-of-sequence token's log-probability, once the sequence ended on one.
    pub end_token: Option<TokenLogprob>,
    finished: bool,
    model: String,
    /// The request's span, parent of the stage spans.
    request_span: tracing::Span,
    /// Open from admission to the first token.
    prefill_span: tracing::Span,
    /// Open from the first token to the end.
    decode_span: tracing::Span,
    /// The sequence slot (none for a replay, which runs no model).
    _permit: Option<OwnedSemaphorePermit>,
    /// A replay of a cached transcript: no model ran, so no model metrics are counted.
    replayed: bool,
    /// What the response cache said about this request (`hit`, `semantic-hit`, `miss`,
    /// `bypass`), for the `x-edgenode-cache` header; `None` when the cache is off.
    pub cache: Option<&'static str>,
    /// Pieces released so far and who wants them once the generation finishes.
    recorder: Option<(Vec<TextPiece>, Vec<OnFinished>)>,
}

impl Generation {
    /// A generation that yields a cached transcript's pieces without running the model.
    /// `prompt_tokens` is this request's (a semantic hit's prompt differs from the cached one).
    pub fn replay(model: &str, prompt_tokens: usize, transcript: &Transcript, timeout: Duration) -> Generation {
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let last = transcript.pieces.len();
        // The last piece travels with `Done`, as the engines send it.
        let (earlier, final_piece) = match transcript.pieces.split_last() {
            Some((final_piece, earlier)) => (earlier, Some(final_piece)),
            None => (&transcript.pieces[..], None),
        };
        for (i, (text, logprobs)) in earlier.iter().enumerate() {
            // Only the final count is known; spread it so `completion_tokens()` grows.
            let tokens = transcript.completion_tokens * (i + 1) / last.max(1);
            let _ = tx.send(GenEvent::Text { text: text.clone(), tokens, logprobs: logprobs.clone() });
        }
        let (text, logprobs) = final_piece.cloned().unwrap_or_default();
        let _ = tx.send(GenEvent::Done {
            reason: transcript.reason,
            completion_tokens: transcript.completion_tokens,
            text,
            logprobs,
            end: transcript.end.clone(),
        });
        let now = Instant::now();
        Generation {
            stream: TokenStream { events },
            matcher: StopMatcher::new(&[]),
            prompt_tokens,
            completion_tokens: 0,
            deadline: tokio::time::Instant::now() + timeout,
            timeout_s: timeout.as_secs(),
            started: now,
            admitted: now,
            first_piece: None,
            pending_done: None,
            logprobs: Vec::new(),
            prompt_logprobs: None,
            end_token: None,
            finished: false,
            model: model.to_string(),
            request_span: tracing::Span::current(),
            prefill_span: tracing::Span::none(),
            decode_span: tracing::Span::none(),
            _permit: None,
            replayed: true,
            cache: None,
            recorder: None,
        }
    }

    /// Hands the transcript to `on_finished` if this generation finishes normally (each
    /// caller gets its own copy).
    pub fn record_into(&mut self, on_finished: OnFinished) {
        self.recorder.get_or_insert_with(|| (Vec::new(), Vec::new())).1.push(on_finished);
    }

    /// The next piece, or `None` after `Done` / `Error`.
    pub async fn next(&mut self) -> Option<Piece> {
        let piece = self.next_piece().await;
        match &piece {
            Some(Piece::Text { text, logprobs }) => {
                if let Some((pieces, _)) = &mut self.recorder {
                    pieces.push((text.clone(), logprobs.clone()));
                }
            }
            Some(Piece::Done(usage, reason)) => {
                if let Some((pieces, callbacks)) = self.recorder.take() {
                    let transcript = Transcript {
                        pieces,
                        completion_tokens: usage.completion_tokens,
                        reason: *reason,
                        end: self.end_token.clone(),
                        compute_s: self.compute_s(),
                    };
                    for on_finished in callbacks {
                        on_finished(transcript.clone());
                    }
                }
            }
            Some(Piece::Error(_)) | None => self.recorder = None,
        }
        piece
    }

    async fn next_piece(&mut self) -> Option<Piece> {
        if let Some(reason) = self.pending_done.take() {
            self.finish();
            return Some(Piece::Done(self.usage(), reason));
        }
        if self.finished {
            return None;
        }
        loop {
            let event = match tokio::time::timeout_at(self.deadline, self.stream.events.recv()).await {
                Ok(Some(e)) => e,
                Ok(None) => GenEvent::Failed("the engine dropped the sequence".into()),
                Err(_) => {
                    self.finished = true;
                    self.stream.events.close();
                    return Some(Piece::Error(Error::Timeout(self.timeout_s)));
                }
            };
            match event {
                GenEvent::Text { text, tokens, logprobs } => {
                    self.completion_tokens = tokens;
                    self.logprobs.extend(logprobs);
                    let released = self.matcher.push(&text);
                    if released.stopped {
                        // Cancel the sequence in the engine now; the rest is never sent.
                        self.stream.events.close();
                        return Some(self.then_done(released.text, FinishReason::StopSequence));
                    }
                    if !released.text.is_empty() {
                        self.mark_first_piece();
                        return Some(Piece::Text { text: released.text, logprobs: std::mem::take(&mut self.logprobs) });
                    }
                }
                GenEvent::Prefill(logprobs) => self.prompt_logprobs = Some(logprobs),
                GenEvent::Done { reason, completion_tokens, text, logprobs, end } => {
                    self.completion_tokens = completion_tokens;
                    self.logprobs.extend(logprobs);
                    let released = self.matcher.push(&text);
                    if released.stopped {
                        self.stream.events.close();
                        return Some(self.then_done(released.text, FinishReason::StopSequence));
                    }
                    self.end_token = end;
                    let rest = released.text + &self.matcher.finish();
                    return Some(self.then_done(rest, reason));
                }
                GenEvent::Failed(message) => {
                    self.finished = true;
                    return Some(Piece::Error(Error::Internal(message)));
                }
            }
        }
    }

    /// Returns `text` now and `Done` next, or `Done` at once when there is no text (and no
    /// token's log-probability waiting to be reported with it).
    fn then_done(&mut self, text: String, reason: FinishReason) -> Piece {
        if text.is_empty() && self.logprobs.is_empty() {
            self.finish();
            Piece::Done(self.usage(), reason)
        } else {
            self.mark_first_piece();
            self.pending_done = Some(reason);
            Piece::Text { text, logprobs: std::mem::take(&mut self.logprobs) }
        }
    }

    /// The piece just returned was the last text: `Done` comes next, without waiting.
    pub fn finishing(&self) -> bool {
        self.pending_done.is_some()
    }

    /// Tokens generated so far.
    pub fn completion_tokens(&self) -> usize {
        self.completion_tokens
    }

    /// Seconds in the model: from admission to now (or to the end, once finished).
    pub fn compute_s(&self) -> f64 {
        self.admitted.elapsed().as_secs_f64()
    }

    /// Seconds waiting for a sequence slot.
    pub fn queue_s(&self) -> f64 {
        self.admitted.duration_since(self.started).as_secs_f64()
    }

    /// The first text: prefill ends, decode begins, time to first token is known.
    fn mark_first_piece(&mut self) {
        if self.first_piece.is_none() {
            let now = Instant::now();
            self.first_piece = Some(now);
            if self.replayed {
                return;
            }
            METRICS.ttft_seconds.with_label_values(&[self.model.as_str()]).observe(now.duration_since(self.started).as_secs_f64());
            self.prefill_span = tracing::Span::none();
            self.decode_span =
                tracing::info_span!(parent: &self.request_span, "decode", model = %self.model, completion_tokens = tracing::field::Empty);
        }
    }

    /// The generation ended normally: close its spans and count its tokens.
    fn finish(&mut self) {
        self.finished = true;
        self.prefill_span = tracing::Span::none();
        self.decode_span.record("completion_tokens", self.completion_tokens as u64);
        self.decode_span = tracing::Span::none();
        if self.replayed {
            return;
        }
        let m = &*METRICS;
        let model = self.model.as_str();
        m.tokens.with_label_values(&[model, "prompt"]).inc_by(self.prompt_tokens as u64);
        m.tokens.with_label_values(&[model, "completion"]).inc_by(self.completion_tokens as u64);
        m.inference_seconds.with_label_values(&[model]).observe(self.compute_s());
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.prompt_tokens + self.completion_tokens,
        }
    }
}
