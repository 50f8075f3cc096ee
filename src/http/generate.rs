//! Generation routes: `/generate` (native), `/v1/chat/completions` and `/v1/completions`
//! (OpenAI's shapes, streaming included).
//!
//! All three go the same way: parse → resolve the model → render and tokenize the prompt
//! and check it against the context (`GenerateService::prepare`) → take a sequence slot →
//! stream pieces. Only the JSON around the pieces differs.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::json::JsonBody;
use super::sse::{stream_response, OnEnd, PieceFormat};
use super::{inference_headers, record_request, AppState, Served};
use crate::config::ModelKind;
use crate::error::Error;
use crate::generate::engine::FinishReason;
use crate::generate::sampling::SamplingParams;
use crate::generate::template::ChatMessage;
use crate::generate::{GenerateService, Generation, Piece, Prepared, PromptInput, Usage};
use crate::models::registry::ModelSlot;
use crate::node::Node;
use crate::telemetry::trace::record_tokens;

/// Message content: a string, or OpenAI's list of content parts (text parts only).
fn content<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    struct Part {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        text: Option<String>,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Parts(Vec<Part>),
    }
    match Option::<Raw>::deserialize(d).map_err(|_| de::Error::custom("expected a string or an array of text parts"))? {
        None => Ok(String::new()),
        Some(Raw::Text(s)) => Ok(s),
        Some(Raw::Parts(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => out.push_str(&t),
                    (kind, _) => return Err(de::Error::custom(format!("content part of type {kind:?} is not supported (text only)"))),
                }
            }
            Ok(out)
        }
    }
}

/// A chat message as clients send it.
#[derive(Debug, Deserialize)]
pub struct InMessage {
    pub role: Role,
    #[serde(deserialize_with = "content", default)]
    pub content: String,
}

/// The roles a chat template understands.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    /// OpenAI's newer name for system instructions.
    Developer,
    User,
    Assistant,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::System | Role::Developer => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

pub(crate) fn to_chat(messages: Vec<InMessage>) -> Result<Vec<ChatMessage>, Error> {
    if messages.is_empty() {
        return Err(Error::EmptyInput("messages".into()));
    }
    Ok(messages.into_iter().map(|m| ChatMessage { role: m.role.as_str().to_string(), content: m.content }).collect())
}

/// Sampling fields shared by every route. They are kept as raw JSON and typed here, so a
/// wrong type is reported with the field's name even though the struct is flattened into
/// each request (serde loses field paths through `flatten`).
#[derive(Debug, Deserialize, Default)]
pub struct SamplingFields {
    pub max_tokens: Option<Value>,
    /// OpenAI's newer name for `max_tokens`.
    pub max_completion_tokens: Option<Value>,
    pub temperature: Option<Value>,
    pub top_p: Option<Value>,
    pub top_k: Option<Value>,
    pub seed: Option<Value>,
    pub stop: Option<Value>,
    pub n: Option<Value>,
    /// Our extension (as vLLM's): keep generating past end-of-sequence, up to `max_tokens`.
    pub ignore_eos: Option<Value>,
}

fn number(field: &str, v: &Option<Value>) -> Result<Option<f64>, Error> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(Error::field(field, format!("must be a number, got {other}"))),
    }
}

fn integer(field: &str, v: &Option<Value>) -> Result<Option<i64>, Error> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Ok(Some(i)),
            (None, Some(_)) => Ok(Some(i64::MAX)),
            _ => Err(Error::field(field, format!("must be an integer, got {n}"))),
        },
        Some(other) => Err(Error::field(field, format!("must be an integer, got {other}"))),
    }
}

impl SamplingFields {
    pub(crate) fn params(&self) -> Result<SamplingParams, Error> {
        let temperature = number("temperature", &self.temperature)?.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(Error::field("temperature", format!("must be between 0 and 2, got {temperature}")));
        }
        let top_p = number("top_p", &self.top_p)?.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(Error::field("top_p", format!("must be in (0, 1], got {top_p}")));
        }
        let top_k = integer("top_k", &self.top_k)?.unwrap_or(0);
        if top_k < 0 {
            return Err(Error::field("top_k", format!("must be 0 (no limit) or more, got {top_k}")));
        }
        if let Some(n) = integer("n", &self.n)? {
            if n != 1 {
                return Err(Error::field("n", "only n = 1 is supported"));
            }
        }
        let seed = match &self.seed {
            None | Some(Value::Null) => rand::random(),
            Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => u,
                (None, Some(i)) => i as u64,
                _ => return Err(Error::field("seed", format!("must be an integer, got {n}"))),
            },
            Some(other) => return Err(Error::field("seed", format!("must be an integer, got {other}"))),
        };
        self.stops()?;
        let ignore_eos = match &self.ignore_eos {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(Error::field("ignore_eos", format!("must be true or false, got {other}"))),
        };
        Ok(SamplingParams { temperature: temperature as f32, top_p: top_p as f32, top_k: top_k as usize, seed, ignore_eos })
    }

    /// `stop`: one string or a list of up to 8 non-empty strings.
    pub(crate) fn stops(&self) -> Result<Vec<String>, Error> {
        let list = match &self.stop {
            None | Some(Value::Null) => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(Error::field(format!("stop[{i}]"), format!("must be a string, got {other}"))),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(Error::field("stop", format!("must be a string or an array of strings, got {other}"))),
        };
        if list.len() > 8 {
            return Err(Error::field("stop", format!("at most 8 stop sequences, got {}", list.len())));
        }
        if list.iter().any(String::is_empty) {
            return Err(Error::field("stop", "stop sequences must not be empty"));
        }
        Ok(list)
    }

    pub(crate) fn max_tokens(&self) -> Result<Option<i64>, Error> {
        Ok(integer("max_completion_tokens", &self.max_completion_tokens)?.or(integer("max_tokens", &self.max_tokens)?))
    }
}

async fn ready_generator(node: &Node, slot: &ModelSlot) -> Result<Arc<GenerateService>, Error> {
    Ok(slot.ready_service(node.ready_wait()).await?.generator(slot.name())?.clone())
}

/// Prepares, admits and starts one generation.
pub(crate) async fn begin(
    node: &Node,
    slot: &ModelSlot,
    prompt: PromptInput,
    sampling: &SamplingFields,
) -> Result<(Arc<GenerateService>, Generation), Error> {
    begin_prepared(node, slot, prompt, sampling, None).await
}

/// `begin`, reusing a prompt this model already prepared (the router's decision did).
pub(crate) async fn begin_prepared(
    node: &Node,
    slot: &ModelSlot,
    prompt: PromptInput,
    sampling: &SamplingFields,
    prepared: Option<Prepared>,
) -> Result<(Arc<GenerateService>, Generation), Error> {
    let params = sampling.params()?;
    let service = ready_generator(node, slot).await?;
    let prepared = match prepared {
        Some(p) => p,
        None => service.prepare(prompt, sampling.max_tokens()?).await?,
    };
    let generation = service.start(prepared, params, sampling.stops()?).await?;
    Ok((service, generation))
}

/// Runs a generation to the end, collecting its text.
pub(crate) async fn collect(mut generation: Generation) -> Result<(String, Usage, FinishReason, Generation), Error> {
    let mut text = String::new();
    while let Some(piece) = generation.next().await {
        match piece {
            Piece::Text(t) => text.push_str(&t),
            Piece::Done(usage, reason) => return Ok((text, usage, reason, generation)),
            Piece::Error(e) => return Err(e),
        }
    }
    Err(Error::Internal("the generation ended without finishing".into()))
}

pub(crate) fn served(slot: &ModelSlot, generation: &Generation, streaming: bool) -> Served {
    Served {
        workload: "generate",
        model: slot.name().to_string(),
        queue_s: generation.queue_s(),
        compute_s: if streaming { 0.0 } else { generation.compute_s() },
        input_tokens: generation.prompt_tokens,
        output_tokens: generation.completion_tokens(),
        streaming,
    }
}

pub(crate) fn headers(mut response: Response, slot: &ModelSlot, generation: &Generation) -> Response {
    record_tokens(&tracing::Span::current(), generation.prompt_tokens, Some(generation.completion_tokens()));
    inference_headers(&mut response, &slot.label(), served(slot, generation, false));
    response
}

pub(crate) fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub(crate) fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

// ---------------------------------------------------------------- /generate

/// `POST /generate` body.
#[derive(Debug, Deserialize)]
pub struct GenerateRequest {
    pub prompt: Option<String>,
    pub messages: Option<Vec<InMessage>>,
    pub model: Option<String>,
    #[serde(default)]
    pub stream: bool,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

fn native_prompt(prompt: Option<String>, messages: Option<Vec<InMessage>>) -> Result<PromptInput, Error> {
    match (prompt, messages) {
        (Some(_), Some(_)) => Err(Error::field("prompt", "send either prompt or messages, not both")),
        (Some(p), None) if p.is_empty() => Err(Error::EmptyInput("prompt".into())),
        (Some(p), None) => Ok(PromptInput::Text(p)),
        (None, Some(m)) => Ok(PromptInput::Chat(to_chat(m)?)),
        (None, None) => Err(Error::MissingField("prompt (or messages)".into())),
    }
}

struct NativeFormat {
    model: String,
}

impl PieceFormat for NativeFormat {
    fn format(&mut self, piece: &Piece) -> Vec<Value> {
        match piece {
            Piece::Text(t) => vec![json!({"text": t})],
            Piece::Done(usage, reason) => {
                vec![json!({"text": "", "finish_reason": reason.as_str(), "usage": usage, "model": self.model})]
            }
            Piece::Error(e) => vec![e.body()],
        }
    }
}

/// `POST /generate`: `{"text", "finish_reason", "usage", "model"}`, or SSE with `stream`.
pub async fn generate(State(node): State<AppState>, JsonBody(req): JsonBody<GenerateRequest>) -> Result<Response, Error> {
    let slot = node.registry.resolve(req.model.as_deref(), ModelKind::Generate)?;
    slot.record_on_span();
    let prompt = native_prompt(req.prompt, req.messages)?;
    let (_, generation) = begin(&node, slot, prompt, &req.sampling).await?;
    let model = slot.name().to_string();
    if req.stream {
        let response = stream_response_with_headers(&node, "/generate", slot, generation, vec![], NativeFormat { model }, None);
        return Ok(response);
    }
    let (text, usage, reason, generation) = collect(generation).await?;
    let body = json!({"text": text, "finish_reason": reason.as_str(), "usage": usage, "model": model});
    Ok(headers(Json(body).into_response(), slot, &generation))
}

/// An SSE answer; the request is recorded in `/metrics` and `/stats` when the stream ends
/// (status 499 when the client left first).
pub(crate) fn stream_response_with_headers<F: PieceFormat>(
    node: &AppState,
    route: &'static str,
    slot: &Arc<ModelSlot>,
    generation: Generation,
    prelude: Vec<Value>,
    format: F,
    also_on_end: Option<OnEnd>,
) -> Response {
    let mut head = served(slot, &generation, true);
    let (node, slot_for_end, span) = (node.clone(), slot.clone(), tracing::Span::current());
    let on_end: OnEnd = Box::new(move |generation: &Generation, completed: bool| {
        record_tokens(&span, generation.prompt_tokens, Some(generation.completion_tokens()));
        let mut s = served(&slot_for_end, generation, false);
        s.streaming = true;
        let status = if completed { 200 } else { 499 };
        record_request(&node, route, status, generation.started.elapsed().as_secs_f64(), Some(&s));
        if let Some(f) = also_on_end {
            f(generation, completed);
        }
    });
    let mut response = stream_response(generation, prelude, format, on_end);
    head.compute_s = 0.0;
    inference_headers(&mut response, &slot.label(), head);
    response
}

// ---------------------------------------------------------------- /v1/chat/completions

/// `stream_options`.
#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/chat/completions` body (fields we do not use are accepted and ignored).
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<InMessage>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

pub(crate) struct ChatFormat {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
}

/// OpenAI's `chat.completion` object: the whole answer of a non-streamed chat request.
#[derive(Debug, Serialize)]
pub(crate) struct ChatCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [ChatChoice<'a>; 1],
    usage: Usage,
}

#[derive(Debug, Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: AssistantMessage<'a>,
    finish_reason: &'static str,
    /// Always `null`: log probabilities are not produced.
    logprobs: Option<()>,
}

#[derive(Debug, Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    content: &'a str,
}

impl ChatFormat {
    /// The non-streamed answer, for the local route and the routed edge alike.
    pub(crate) fn completion<'a>(&'a self, text: &'a str, usage: Usage, reason: FinishReason) -> ChatCompletion<'a> {
        ChatCompletion {
            id: &self.id,
            object: "chat.completion",
            created: self.created,
            model: &self.model,
            choices: [ChatChoice {
                index: 0,
                message: AssistantMessage { role: "assistant", content: text },
                finish_reason: reason.as_str(),
                logprobs: None,
            }],
            usage,
        }
    }

    pub(crate) fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        })
    }
}

impl PieceFormat for ChatFormat {
    fn format(&mut self, piece: &Piece) -> Vec<Value> {
        match piece {
            Piece::Text(t) => vec![self.chunk(json!({"content": t}), None)],
            Piece::Done(usage, reason) => {
                let mut out = vec![self.chunk(json!({}), Some(reason.as_str()))];
                if self.include_usage {
                    out.push(json!({
                        "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [], "usage": usage,
                    }));
                }
                out
            }
            Piece::Error(e) => vec![e.body()],
        }
    }
}

/// A chat request answered by the local model it names (or the first generate model).
pub(crate) async fn chat_local(node: AppState, req: ChatRequest) -> Result<Response, Error> {
    let slot = node.registry.resolve(req.model.as_deref().filter(|m| !m.is_empty()), ModelKind::Generate)?;
    slot.record_on_span();
    let prompt = PromptInput::Chat(to_chat(req.messages)?);
    let (_, generation) = begin(&node, slot, prompt, &req.sampling).await?;
    let format = ChatFormat {
        id: request_id("chatcmpl"),
        created: now_s(),
        model: slot.name().to_string(),
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    };
    if req.stream {
        let first = format.chunk(json!({"role": "assistant", "content": ""}), None);
        return Ok(stream_response_with_headers(&node, "/v1/chat/completions", slot, generation, vec![first], format, None));
    }
    let (text, usage, reason, generation) = collect(generation).await?;
    Ok(headers(Json(format.completion(&text, usage, reason)).into_response(), slot, &generation))
}

// ---------------------------------------------------------------- /v1/completions

/// `prompt` of a legacy completion: one string (or a list holding one).
#[derive(Debug)]
pub struct CompletionPrompt(pub String);

impl<'de> Deserialize<'de> for CompletionPrompt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        match Raw::deserialize(d).map_err(|_| de::Error::custom("expected a string (or an array with one string)"))? {
            Raw::One(s) => Ok(CompletionPrompt(s)),
            Raw::Many(mut v) if v.len() == 1 => Ok(CompletionPrompt(v.remove(0))),
            Raw::Many(v) => Err(de::Error::custom(format!("one prompt per request is supported, got {}", v.len()))),
        }
    }
}

/// `POST /v1/completions` body.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: CompletionPrompt,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

struct CompletionFormat {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl CompletionFormat {
    fn chunk(&self, text: &str, finish: Option<&str>) -> Value {
        json!({
            "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": null}],
        })
    }
}

impl PieceFormat for CompletionFormat {
    fn format(&mut self, piece: &Piece) -> Vec<Value> {
        match piece {
            Piece::Text(t) => vec![self.chunk(t, None)],
            Piece::Done(usage, reason) => {
                let mut out = vec![self.chunk("", Some(reason.as_str()))];
                if self.include_usage {
                    out.push(json!({
                        "id": self.id, "object": "text_completion", "created": self.created,
                        "model": self.model, "choices": [], "usage": usage,
                    }));
                }
                out
            }
            Piece::Error(e) => vec![e.body()],
        }
    }
}

/// OpenAI's default `max_tokens` for legacy completions.
const COMPLETIONS_DEFAULT_MAX_TOKENS: i64 = 16;

/// `POST /v1/completions`.
pub async fn completions(State(node): State<AppState>, JsonBody(mut req): JsonBody<CompletionRequest>) -> Result<Response, Error> {
    let slot = node.registry.resolve(req.model.as_deref().filter(|m| !m.is_empty()), ModelKind::Generate)?;
    slot.record_on_span();
    if req.prompt.0.is_empty() {
        return Err(Error::EmptyInput("prompt".into()));
    }
    if req.sampling.max_tokens()?.is_none() {
        req.sampling.max_tokens = Some(json!(COMPLETIONS_DEFAULT_MAX_TOKENS));
    }
    let (_, generation) = begin(&node, slot, PromptInput::Text(req.prompt.0), &req.sampling).await?;
    let format = CompletionFormat {
        id: request_id("cmpl"),
        created: now_s(),
        model: slot.name().to_string(),
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    };
    if req.stream {
        return Ok(stream_response_with_headers(&node, "/v1/completions", slot, generation, vec![], format, None));
    }
    let (text, usage, reason, generation) = collect(generation).await?;
    let body = json!({
        "id": format.id, "object": "text_completion", "created": format.created, "model": format.model,
        "choices": [{"index": 0, "text": text, "finish_reason": reason.as_str(), "logprobs": null}],
        "usage": usage,
    });
    Ok(headers(Json(body).into_response(), slot, &generation))
}
