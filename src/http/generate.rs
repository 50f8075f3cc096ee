//! Generation routes: `/generate` (native), `/v1/chat/completions` and `/v1/completions`
//! (OpenAI's shapes, streaming included).
//!
//! All three go the same way: parse → resolve the model → render and tokenize the prompt
//! and check it against the context (`GenerateService::prepare`) → take a sequence slot →
//! stream pieces. Only the JSON around the pieces differs.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::cached::{start_generation, GenerationLookup};
use super::fields;
use super::json::{from_value, JsonBody};
use super::sse::{stream_response, OnEnd, PieceFormat};
use super::{inference_headers, record_request, AppState, Served};
use crate::cache::Directive;
use crate::config::ModelKind;
use crate::error::Error;
use crate::generate::constrain::Grammar;
use crate::generate::engine::FinishReason;
use crate::generate::sampling::{SamplingParams, TokenLogprob};
use crate::generate::template::ChatMessage;
use crate::generate::{Decoding, GenerateService, Generation, Piece, Prepared, PromptInput, Usage};
use crate::models::registry::{ModelSlot, SlotRef};
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

/// A chat message as clients send it. Every field OpenAI defines is read, so that one the
/// local chat template cannot render is refused by name rather than dropped.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InMessage {
    pub role: Role,
    #[serde(deserialize_with = "content", default)]
    pub content: String,
    /// A participant's name (OpenAI's), which our templates have no place for.
    #[serde(default)]
    pub name: Option<Value>,
    /// An assistant's earlier tool calls.
    #[serde(default)]
    pub tool_calls: Option<Value>,
    /// Which call a `tool` message answers.
    #[serde(default)]
    pub tool_call_id: Option<Value>,
    /// Fields an assistant message may carry back from an earlier answer; refused unless null.
    #[serde(default)]
    pub refusal: Option<Value>,
    #[serde(default)]
    pub audio: Option<Value>,
    #[serde(default)]
    pub function_call: Option<Value>,
}

/// The roles clients send.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    /// OpenAI's newer name for system instructions.
    Developer,
    User,
    Assistant,
    /// A tool's result (needs a template with tool support).
    Tool,
    /// OpenAI's deprecated function result.
    Function,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::System | Role::Developer => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::Function => "function",
        }
    }
}

/// The conversation as the local chat template renders it. Anything in a message the
/// template has no place for (tool turns, names, tool calls) is a 400 naming it: the
/// model would otherwise answer a conversation other than the one sent.
pub(crate) fn to_chat(messages: &[InMessage]) -> Result<Vec<ChatMessage>, Error> {
    check_messages(messages)?;
    Ok(messages.iter().map(|m| ChatMessage { role: m.role.as_str().to_string(), content: m.content.clone() }).collect())
}

/// `to_chat`'s checks alone, without building the conversation (the router asks first).
fn check_messages(messages: &[InMessage]) -> Result<(), Error> {
    if messages.is_empty() {
        return Err(Error::EmptyInput("messages".into()));
    }
    let present = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
    for (i, m) in messages.iter().enumerate() {
        if matches!(m.role, Role::Tool | Role::Function) {
            return Err(Error::field(
                format!("messages[{i}].role"),
                "tool results need tool support, which the local model's chat template does not have",
            ));
        }
        for (field, value) in [
            ("name", &m.name),
            ("tool_calls", &m.tool_calls),
            ("tool_call_id", &m.tool_call_id),
            ("audio", &m.audio),
            ("function_call", &m.function_call),
            ("refusal", &m.refusal),
        ] {
            if present(value) {
                return Err(Error::field(format!("messages[{i}].{field}"), "the local model's chat template has no place for it"));
            }
        }
    }
    Ok(())
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
    pub frequency_penalty: Option<Value>,
    pub presence_penalty: Option<Value>,
    /// Our extension (as vLLM's and llama.cpp's).
    pub repetition_penalty: Option<Value>,
    pub logit_bias: Option<Value>,
    /// Chat: `true`/`false`; legacy completions: how many alternatives (0–5).
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<Value>,
    pub response_format: Option<Value>,
}

/// How a route spells `logprobs`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LogprobStyle {
    /// `logprobs: true` with `top_logprobs: 0..=20` (chat, `/generate`).
    Chat,
    /// `logprobs: 0..=5`, the number of alternatives (legacy completions).
    Completions,
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
            if !(1..=128).contains(&n) {
                return Err(Error::field("n", format!("must be between 1 and 128, got {n}")));
            }
        }
        let penalty = |field: &str, v: &Option<Value>| -> Result<f32, Error> {
            let p = number(field, v)?.unwrap_or(0.0);
            if !(-2.0..=2.0).contains(&p) {
                return Err(Error::field(field, format!("must be between -2 and 2, got {p}")));
            }
            Ok(p as f32)
        };
        let frequency_penalty = penalty("frequency_penalty", &self.frequency_penalty)?;
        let presence_penalty = penalty("presence_penalty", &self.presence_penalty)?;
        let repetition_penalty = number("repetition_penalty", &self.repetition_penalty)?.unwrap_or(1.0);
        if !(repetition_penalty > 0.0 && repetition_penalty <= 10.0) {
            return Err(Error::field("repetition_penalty", format!("must be in (0, 10], got {repetition_penalty}")));
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
        Ok(SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k: top_k as usize,
            typical_p: 1.0,
            seed,
            ignore_eos,
            frequency_penalty,
            presence_penalty,
            repetition_penalty: repetition_penalty as f32,
        })
    }

    /// Choices beyond one (`n`); more than one is for the cloud tier only.
    pub(crate) fn choices(&self) -> Result<i64, Error> {
        Ok(integer("n", &self.n)?.unwrap_or(1))
    }

    /// Everything that shapes how tokens are chosen, validated.
    pub(crate) fn decoding(&self, style: LogprobStyle) -> Result<Decoding, Error> {
        let params = self.params()?;
        let mut decoding = Decoding::new(params);
        decoding.logit_bias = self.logit_bias()?;
        decoding.logprobs = self.logprobs(style)?;
        decoding.grammar = self.grammar()?;
        Ok(decoding)
    }

    /// `logit_bias`: token ids (as strings, OpenAI's JSON) to a bias in [-100, 100].
    fn logit_bias(&self) -> Result<Vec<(u32, f32)>, Error> {
        let map = match &self.logit_bias {
            None | Some(Value::Null) => return Ok(vec![]),
            Some(Value::Object(m)) => m,
            Some(other) => return Err(Error::field("logit_bias", format!("must be an object of token id to bias, got {other}"))),
        };
        if map.len() > 1024 {
            return Err(Error::field("logit_bias", format!("at most 1024 tokens, got {}", map.len())));
        }
        map.iter()
            .map(|(k, v)| {
                let field = format!("logit_bias.{k}");
                let token: u32 = k.parse().map_err(|_| Error::field(&field, "keys must be token ids (integers as strings)"))?;
                let bias = v.as_f64().ok_or_else(|| Error::field(&field, format!("must be a number, got {v}")))?;
                if !(-100.0..=100.0).contains(&bias) {
                    return Err(Error::field(&field, format!("must be between -100 and 100, got {bias}")));
                }
                Ok((token, bias as f32))
            })
            .collect()
    }

    fn logprobs(&self, style: LogprobStyle) -> Result<Option<usize>, Error> {
        match style {
            LogprobStyle::Chat => {
                let on = match &self.logprobs {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(other) => return Err(Error::field("logprobs", format!("must be true or false, got {other}"))),
                };
                let top = integer("top_logprobs", &self.top_logprobs)?;
                match top {
                    Some(t) if !(0..=20).contains(&t) => Err(Error::field("top_logprobs", format!("must be between 0 and 20, got {t}"))),
                    Some(_) if !on => Err(Error::field("top_logprobs", "needs \"logprobs\": true")),
                    _ => Ok(on.then(|| top.unwrap_or(0) as usize)),
                }
            }
            LogprobStyle::Completions => match integer("logprobs", &self.logprobs)? {
                None => Ok(None),
                Some(k) if (0..=5).contains(&k) => Ok(Some(k as usize)),
                Some(k) => Err(Error::field("logprobs", format!("must be between 0 and 5, got {k}"))),
            },
        }
    }

    /// `response_format`: text, `json_object`, or `json_schema` (`{name, schema, strict}`).
    fn grammar(&self) -> Result<Option<Grammar>, Error> {
        let format = match &self.response_format {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(f)) => f,
            Some(other) => return Err(Error::field("response_format", format!("must be an object, got {other}"))),
        };
        // TGI's form, which huggingface_hub's `chat_completion` sends for a json_schema:
        // `{"type": "json_object" | "json", "value": schema}`, or `{"type": "regex", "value"}`.
        let value = format.get("value").filter(|v| !v.is_null());
        match (format.get("type").and_then(Value::as_str), value) {
            (Some("json_object" | "json"), Some(schema @ Value::Object(_))) => return Ok(Some(Grammar::JsonSchema(schema.clone()))),
            (Some("regex"), Some(Value::String(rx))) if !rx.is_empty() => return Ok(Some(Grammar::Regex(rx.clone()))),
            (_, Some(other)) => {
                return Err(Error::field(
                    "response_format.value",
                    format!("must be a JSON Schema object (or a regex with \"type\": \"regex\"), got {other}"),
                ))
            }
            _ => {}
        }
        match format.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(Grammar::JsonObject)),
            Some("json_schema") => {
                let spec = format
                    .get("json_schema")
                    .and_then(Value::as_object)
                    .ok_or_else(|| Error::field("response_format.json_schema", "must be an object with a `schema` (and a `name`)"))?;
                for key in spec.keys() {
                    if !["name", "schema", "strict", "description"].contains(&key.as_str()) {
                        return Err(Error::field(
                            format!("response_format.json_schema.{key}"),
                            "unknown field; known: name, schema, strict, description",
                        ));
                    }
                }
                match spec.get("schema") {
                    Some(schema @ Value::Object(_)) => Ok(Some(Grammar::JsonSchema(schema.clone()))),
                    Some(Value::Bool(true)) | None => Ok(Some(Grammar::JsonObject)),
                    Some(other) => Err(Error::field("response_format.json_schema.schema", format!("must be a JSON Schema object, got {other}"))),
                }
            }
            Some(other) => Err(Error::field(
                "response_format.type",
                format!("must be text, json_object or json_schema (or TGI's json or regex with a value), got {other:?}"),
            )),
            None => Err(Error::field("response_format.type", "is required (text, json_object or json_schema)")),
        }
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

pub(crate) async fn ready_generator(node: &Node, slot: &SlotRef<'_>) -> Result<Arc<GenerateService>, Error> {
    Ok(slot.ready_service(node.ready_wait()).await?.generator(slot.name())?.clone())
}

/// Prepares, admits and starts one generation (or replays it from the response cache).
pub(crate) async fn begin(
    node: &Node,
    slot: &SlotRef<'_>,
    prompt: PromptInput,
    sampling: &SamplingFields,
    style: LogprobStyle,
    directive: Directive,
) -> Result<(Arc<GenerateService>, Generation), Error> {
    begin_prepared(node, slot, prompt, sampling, style, None, directive).await
}

/// `begin`, reusing a prompt this model already prepared (the router's decision did).
pub(crate) async fn begin_prepared(
    node: &Node,
    slot: &SlotRef<'_>,
    prompt: PromptInput,
    sampling: &SamplingFields,
    style: LogprobStyle,
    prepared: Option<Prepared>,
    directive: Directive,
) -> Result<(Arc<GenerateService>, Generation), Error> {
    let decoding = sampling.decoding(style)?;
    if sampling.choices()? > 1 {
        return Err(Error::field(
            "n",
            format!("model {} generates one choice per request (n = 1); use \"model\": \"auto\" with a cloud upstream for more", slot.name()),
        ));
    }
    let seeded = sampling.seed.as_ref().is_some_and(|s| !s.is_null());
    let ask = Ask { decoding, stops: sampling.stops()?, max_tokens: sampling.max_tokens()?, seeded };
    begin_ask(node, slot, prompt, ask, prepared, directive).await
}

/// A generation request as every dialect ends up asking for it, validated.
pub(crate) struct Ask {
    pub decoding: Decoding,
    pub stops: Vec<String>,
    pub max_tokens: Option<i64>,
    /// The request named a seed (sampling with one is reproducible, so cacheable).
    pub seeded: bool,
}

/// Prepares (unless done), admits and starts one generation, or replays it from the cache.
pub(crate) async fn begin_ask(
    node: &Node,
    slot: &SlotRef<'_>,
    prompt: PromptInput,
    ask: Ask,
    prepared: Option<Prepared>,
    directive: Directive,
) -> Result<(Arc<GenerateService>, Generation), Error> {
    let service = ready_generator(node, slot).await?;
    let prepared = match prepared {
        Some(p) => p,
        None => service.prepare(prompt.clone(), ask.max_tokens).await?,
    };
    let Ask { decoding, stops, seeded, .. } = ask;
    let lookup = GenerationLookup { slot, label: slot.label(), prompt: &prompt, decoding, stops, seeded, directive };
    let generation = start_generation(node, &service, lookup, prepared).await?;
    Ok((service, generation))
}

/// A generation run to its end.
pub(crate) struct Collected {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub usage: Usage,
    pub reason: FinishReason,
    pub generation: Generation,
}

/// Runs a generation to the end, collecting its text (after `first`, a piece already taken).
pub(crate) async fn collect_after(first: Option<Piece>, mut generation: Generation) -> Result<Collected, Error> {
    let (mut text, mut logprobs) = (String::new(), Vec::new());
    let mut next = first;
    loop {
        let piece = match next.take() {
            Some(p) => Some(p),
            None => generation.next().await,
        };
        match piece {
            Some(Piece::Text { text: t, logprobs: l }) => {
                text.push_str(&t);
                logprobs.extend(l);
            }
            Some(Piece::Done(usage, reason)) => return Ok(Collected { text, logprobs, usage, reason, generation }),
            Some(Piece::Error(e)) => return Err(e),
            None => return Err(Error::Internal("the generation ended without finishing".into())),
        }
    }
}

/// Runs a generation to the end, collecting its text.
pub(crate) async fn collect(generation: Generation) -> Result<Collected, Error> {
    collect_after(None, generation).await
}

pub(crate) fn served(slot: &ModelSlot, generation: &Generation, streaming: bool) -> Served {
    Served {
        cache: generation.cache,
        caller: crate::accounts::current(),
        workload: "generate",
        model: slot.name().to_string(),
        queue_s: generation.queue_s(),
        tokenize_s: 0.0,
        first_token_s: generation.first_piece.map(|t| t.duration_since(generation.started).as_secs_f64()),
        compute_s: if streaming { 0.0 } else { generation.compute_s() },
        input_tokens: generation.prompt_tokens,
        output_tokens: generation.completion_tokens(),
        streaming,
    }
}

pub(crate) fn headers(mut response: Response, slot: &SlotRef<'_>, generation: &Generation) -> Response {
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

/// Log-probabilities in JSON: -inf (a token the grammar or a bias ruled out) is written as
/// OpenAI writes it, -9999.
pub(crate) fn finite(logprob: f32) -> f32 {
    if logprob.is_finite() {
        logprob
    } else {
        -9999.0
    }
}

/// Chat's `logprobs` object for some tokens: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
pub(crate) fn chat_logprobs(tokens: &[TokenLogprob]) -> Value {
    let entry = |bytes: &[u8], logprob: f32| json!({"token": String::from_utf8_lossy(bytes), "logprob": finite(logprob), "bytes": bytes});
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(&t.bytes, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|(_, b, lp)| entry(b, *lp)).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Legacy completions' `logprobs` object: parallel lists, offsets into `text` from `offset`.
fn completion_logprobs(tokens: &[TokenLogprob], offset: usize) -> Value {
    let mut at = offset;
    let (mut names, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for t in tokens {
        let name = String::from_utf8_lossy(&t.bytes).into_owned();
        offsets.push(at);
        at += name.len();
        names.push(name);
        lps.push(finite(t.logprob));
        let top: serde_json::Map<String, Value> =
            t.top.iter().map(|(_, b, lp)| (String::from_utf8_lossy(b).into_owned(), json!(finite(*lp)))).collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": names, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// `user`, `metadata` and `safety_identifier` go on the request's trace and into the log:
/// attribution a gateway keys on, never dropped.
pub(crate) fn record_attribution(body: &Value) -> Result<(), Error> {
    if let Some(meta) = body.get("metadata").filter(|m| !m.is_null()) {
        let map = meta.as_object().ok_or_else(|| Error::field("metadata", "must be an object of strings"))?;
        if map.len() > 16 {
            return Err(Error::field("metadata", format!("at most 16 keys, got {}", map.len())));
        }
        for (k, v) in map {
            match v.as_str() {
                Some(s) if k.chars().count() <= 64 && s.chars().count() <= 512 => {}
                _ => return Err(Error::field(format!("metadata.{k}"), "keys are at most 64 characters and values strings of at most 512")),
            }
        }
    }
    for field in ["user", "safety_identifier"] {
        if let Some(v) = body.get(field).filter(|v| !v.is_null()) {
            if !v.is_string() {
                return Err(Error::field(field, format!("must be a string, got {v}")));
            }
        }
    }
    let user = body.get("user").and_then(Value::as_str);
    if let Some(u) = user {
        crate::accounts::set_user(u);
    }
    let safety = body.get("safety_identifier").and_then(Value::as_str);
    let metadata = body.get("metadata").filter(|m| !m.is_null()).map(|m| m.to_string());
    if user.is_some() || safety.is_some() || metadata.is_some() {
        tracing::info!(user, safety_identifier = safety, metadata, "request attribution");
    }
    Ok(())
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
        (None, Some(m)) => Ok(PromptInput::Chat(to_chat(&m)?)),
        (None, None) => Err(Error::MissingField("prompt (or messages)".into())),
    }
}

struct NativeFormat {
    model: String,
    logprobs: bool,
}

impl PieceFormat for NativeFormat {
    fn format(&mut self, piece: &Piece) -> Vec<Value> {
        match piece {
            Piece::Text { text, logprobs } => {
                let mut event = json!({"text": text});
                if self.logprobs {
                    event["logprobs"] = chat_logprobs(logprobs);
                }
                vec![event]
            }
            Piece::Done(usage, reason) => {
                vec![json!({"text": "", "finish_reason": reason.as_str(), "usage": usage, "model": self.model})]
            }
            Piece::Error(e) => vec![e.body()],
        }
    }
}

/// `POST /generate`: TGI's request when the body has `inputs` (`tgi.rs`); otherwise ours,
/// answered `{"text", "finish_reason", "usage", "model"}`, or SSE with `stream`.
pub async fn generate(State(node): State<AppState>, request_headers: HeaderMap, JsonBody(raw): JsonBody<Value>) -> Response {
    if raw.get("inputs").is_some() {
        return super::tgi::answer(node, request_headers, raw, super::tgi::TgiRoute::Generate).await;
    }
    native_generate(node, request_headers, raw).await.into_response()
}

async fn native_generate(node: AppState, request_headers: HeaderMap, raw: Value) -> Result<Response, Error> {
    fields::check(&raw, fields::GENERATE)?;
    record_attribution(&raw)?;
    let req: GenerateRequest = from_value(raw)?;
    let slot = node.registry.resolve(req.model.as_deref(), ModelKind::Generate)?;
    slot.record_on_span();
    let prompt = native_prompt(req.prompt, req.messages)?;
    let (_, generation) = begin(&node, &slot, prompt, &req.sampling, LogprobStyle::Chat, Directive::from_headers(&request_headers)).await?;
    let model = slot.name().to_string();
    let logprobs = req.sampling.logprobs(LogprobStyle::Chat)?.is_some();
    if req.stream {
        let response = stream_response_with_headers(&node, "/generate", &slot, generation, vec![], NativeFormat { model, logprobs }, None);
        return Ok(response);
    }
    let done = collect(generation).await?;
    let mut body = json!({"text": done.text, "finish_reason": done.reason.as_str(), "usage": done.usage, "model": model});
    if logprobs {
        body["logprobs"] = chat_logprobs(&done.logprobs);
    }
    Ok(headers(Json(body).into_response(), &slot, &done.generation))
}

/// An SSE answer; the request is recorded in `/metrics` and `/stats` when the stream ends
/// (status 499 when the client left first).
pub(crate) fn stream_response_with_headers<F: PieceFormat>(
    node: &AppState,
    route: &'static str,
    slot: &SlotRef<'_>,
    generation: Generation,
    prelude: Vec<Value>,
    format: F,
    also_on_end: Option<OnEnd>,
) -> Response {
    let mut head = served(slot, &generation, true);
    let (node, slot_for_end, span, caller) = (node.clone(), slot.slot().clone(), tracing::Span::current(), head.caller.clone());
    let on_end: OnEnd = Box::new(move |generation: &Generation, completed: bool| {
        record_tokens(&span, generation.prompt_tokens, Some(generation.completion_tokens()));
        let mut s = served(&slot_for_end, generation, false);
        // The stream ends outside the request's task: its caller was taken at the start.
        s.caller = caller;
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
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
    /// Obfuscation padding on streamed chunks (OpenAI's); there is nothing to pad here.
    #[serde(default)]
    pub include_obfuscation: Option<bool>,
}

/// `POST /v1/chat/completions` body. Which top-level fields are accepted, and what is done
/// with each, is `fields::CHAT`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<InMessage>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub tools: Option<Value>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub store: Option<Value>,
    #[serde(default)]
    pub service_tier: Option<Value>,
    #[serde(default)]
    pub modalities: Option<Value>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

impl ChatRequest {
    /// Why the local model cannot answer this request as asked: the field, and the reason
    /// (a 400 when the local model was named; the cloud, when the router chooses).
    pub(crate) fn edge_refusal(&self, model: &str, template_tools: bool) -> Option<Error> {
        self.edge_refusal_inner(model, template_tools).or_else(|| check_messages(&self.messages).err())
    }

    fn edge_refusal_inner(&self, model: &str, template_tools: bool) -> Option<Error> {
        let tools = self.tools.as_ref().is_some_and(|t| t.as_array().is_some_and(|a| !a.is_empty()) || !(t.is_null() || t.is_array()));
        if tools {
            let why = if template_tools {
                format!("tool calling is not implemented for local models yet (model {model}); use \"model\": \"auto\" with a cloud upstream")
            } else {
                format!("model {model}'s chat template has no tool support; use \"model\": \"auto\" with a cloud upstream")
            };
            return Some(Error::field("tools", why));
        }
        match self.tool_choice.as_ref() {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "none" || s == "auto" => {}
            Some(_) => return Some(Error::field("tool_choice", format!("model {model} cannot call tools: only \"none\" or \"auto\" without tools"))),
        }
        match self.sampling.choices() {
            Ok(n) if n > 1 => return Some(Error::field("n", format!("model {model} generates one choice per request (n = 1)"))),
            _ => {}
        }
        if self.store.as_ref().is_some_and(|v| v.as_bool() == Some(true)) {
            return Some(Error::field("store", "completions are not stored at the edge (send false)"));
        }
        if let Some(tier) = self.service_tier.as_ref().and_then(Value::as_str) {
            if tier != "auto" && tier != "default" {
                return Some(Error::field("service_tier", format!("{tier:?} is a cloud billing tier; the edge serves \"auto\" or \"default\"")));
            }
        }
        if let Some(m) = self.modalities.as_ref().filter(|m| !m.is_null()) {
            if m.as_array().is_none_or(|a| a.iter().any(|x| x != "text")) {
                return Some(Error::field("modalities", "the local model writes text only ([\"text\"])"));
            }
        }
        None
    }

    pub(crate) fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

pub(crate) struct ChatFormat {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
    pub logprobs: bool,
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
    /// `null` unless the request asked for `logprobs`.
    logprobs: Option<Value>,
}

#[derive(Debug, Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<()>,
}

impl ChatFormat {
    /// The formatter for a chat request's answer.
    pub(crate) fn new(model: &str, req: &ChatRequest) -> Result<Self, Error> {
        Ok(ChatFormat {
            id: request_id("chatcmpl"),
            created: now_s(),
            model: model.to_string(),
            include_usage: req.include_usage(),
            logprobs: req.sampling.logprobs(LogprobStyle::Chat)?.is_some(),
        })
    }

    /// The non-streamed answer, for the local route and the routed edge alike.
    pub(crate) fn completion<'a>(&'a self, done: &'a Collected) -> ChatCompletion<'a> {
        ChatCompletion {
            id: &self.id,
            object: "chat.completion",
            created: self.created,
            model: &self.model,
            choices: [ChatChoice {
                index: 0,
                message: AssistantMessage { role: "assistant", content: &done.text, refusal: None },
                finish_reason: done.reason.as_str(),
                logprobs: self.logprobs.then(|| chat_logprobs(&done.logprobs)),
            }],
            usage: done.usage,
        }
    }

    pub(crate) fn chunk(&self, delta: Value, finish: Option<&str>, logprobs: Option<Value>) -> Value {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}],
        })
    }

    /// The first event of a stream: the assistant's role.
    pub(crate) fn opening(&self) -> Value {
        self.chunk(json!({"role": "assistant", "content": ""}), None, None)
    }
}

impl PieceFormat for ChatFormat {
    fn format(&mut self, piece: &Piece) -> Vec<Value> {
        match piece {
            Piece::Text { text, logprobs } => vec![self.chunk(json!({"content": text}), None, self.logprobs.then(|| chat_logprobs(logprobs)))],
            Piece::Done(usage, reason) => {
                let mut out = vec![self.chunk(json!({}), Some(reason.as_str()), None)];
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
pub(crate) async fn chat_local(node: AppState, req: ChatRequest, directive: Directive) -> Result<Response, Error> {
    let slot = node.registry.resolve(req.model.as_deref().filter(|m| !m.is_empty()), ModelKind::Generate)?;
    slot.record_on_span();
    let service = ready_generator(&node, &slot).await?;
    if let Some(e) = req.edge_refusal(slot.name(), service.info.template_tools) {
        return Err(e);
    }
    let format = ChatFormat::new(slot.name(), &req)?;
    node.router.quality.remember(&format.id, crate::routing::ledger::Tier::Edge, false);
    let prompt = PromptInput::Chat(to_chat(&req.messages)?);
    let (_, generation) = begin(&node, &slot, prompt, &req.sampling, LogprobStyle::Chat, directive).await?;
    if req.stream {
        let first = format.opening();
        return Ok(stream_response_with_headers(&node, "/v1/chat/completions", &slot, generation, vec![first], format, None));
    }
    let done = collect(generation).await?;
    Ok(headers(Json(format.completion(&done)).into_response(), &slot, &done.generation))
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
    logprobs: bool,
    /// Characters of text sent so far (`text_offset` counts from here).
    sent: usize,
}

impl CompletionFormat {
    fn chunk(&self, text: &str, finish: Option<&str>, logprobs: Option<Value>) -> Value {
        json!({
            "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}],
        })
    }
}

impl PieceFormat for CompletionFormat {
    fn format(&mut self, piece: &Piece) -> Vec<Value> {
        match piece {
            Piece::Text { text, logprobs } => {
                let lp = self.logprobs.then(|| completion_logprobs(logprobs, self.sent));
                self.sent += text.len();
                vec![self.chunk(text, None, lp)]
            }
            Piece::Done(usage, reason) => {
                let mut out = vec![self.chunk("", Some(reason.as_str()), None)];
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
pub async fn completions(State(node): State<AppState>, request_headers: HeaderMap, JsonBody(raw): JsonBody<Value>) -> Result<Response, Error> {
    fields::check(&raw, fields::COMPLETIONS)?;
    record_attribution(&raw)?;
    let mut req: CompletionRequest = from_value(raw)?;
    let slot = node.registry.resolve(req.model.as_deref().filter(|m| !m.is_empty()), ModelKind::Generate)?;
    slot.record_on_span();
    if req.prompt.0.is_empty() {
        return Err(Error::EmptyInput("prompt".into()));
    }
    if req.sampling.max_tokens()?.is_none() {
        req.sampling.max_tokens = Some(json!(COMPLETIONS_DEFAULT_MAX_TOKENS));
    }
    let (_, generation) =
        begin(&node, &slot, PromptInput::Text(req.prompt.0), &req.sampling, LogprobStyle::Completions, Directive::from_headers(&request_headers))
            .await?;
    let format = CompletionFormat {
        id: request_id("cmpl"),
        created: now_s(),
        model: slot.name().to_string(),
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        logprobs: req.sampling.logprobs(LogprobStyle::Completions)?.is_some(),
        sent: 0,
    };
    if req.stream {
        return Ok(stream_response_with_headers(&node, "/v1/completions", &slot, generation, vec![], format, None));
    }
    let done = collect(generation).await?;
    let logprobs = format.logprobs.then(|| completion_logprobs(&done.logprobs, 0));
    let body = json!({
        "id": format.id, "object": "text_completion", "created": format.created, "model": format.model,
        "choices": [{"index": 0, "text": done.text, "finish_reason": done.reason.as_str(), "logprobs": logprobs}],
        "usage": done.usage,
    });
    Ok(headers(Json(body).into_response(), &slot, &done.generation))
}
