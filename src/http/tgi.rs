//! text-generation-inference's dialect: `/generate` with `inputs`, `/generate_stream`, and
//! `POST /` when it generates, so Hugging Face's clients (`InferenceClient.text_generation`,
//! LangChain's `HuggingFaceEndpoint`) and TGI's curl examples work unchanged.
//!
//! The request is `{"inputs", "parameters": {...}, "stream"}`; the answer
//! `{"generated_text", "details"}`, or one SSE event per token (`token` with its id, text,
//! log-probability and whether it is special) with `generated_text` on the last. What TGI
//! does differently from OpenAI's routes is kept: greedy unless `do_sample` or a sampling
//! parameter is set, a stop sequence stays in the text, `finish_reason` tells `eos_token`
//! from `stop_sequence`, and `POST /` returns the prompt with the text (TGI's default
//! there for text-generation models) and a list. A parameter we cannot honour is a 400
//! naming it; a value TGI would refuse is TGI's 422.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::fields;
use super::generate::{begin_ask, collect, finite, headers, ready_generator, stream_response_with_headers, Ask};
use super::json::{from_value, JsonBody};
use super::sse::PieceFormat;
use super::{speaking, AppState, Dialect};
use crate::cache::Directive;
use crate::config::ModelKind;
use crate::error::Error;
use crate::generate::constrain::{Grammar, TokenTable};
use crate::generate::sampling::{SamplingParams, TokenLogprob};
use crate::generate::{Decoding, Generation, Piece, PromptInput};

/// Most stop sequences in one request (`/info`'s `max_stop_sequences`).
pub const MAX_STOP_SEQUENCES: usize = 8;
/// Most alternatives per token in `top_tokens` (TGI's `max_top_n_tokens`).
pub const MAX_TOP_N_TOKENS: usize = 20;

/// Which of TGI's routes a request came in on: they differ in streaming, the answer's shape
/// and `return_full_text`'s default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TgiRoute {
    /// `/generate`: one object; streams only when the body says `"stream": true` (which TGI
    /// itself ignores there, but `InferenceClient` sends to whatever URL it was given).
    Generate,
    /// `/generate_stream`: always SSE.
    Stream,
    /// `POST /` (TGI's `compat_generate`): a list of one object, or SSE with `stream`; the
    /// prompt is returned with the text unless `return_full_text` is false.
    Compat,
}

impl TgiRoute {
    fn path(self) -> &'static str {
        match self {
            TgiRoute::Generate => "/generate",
            TgiRoute::Stream => "/generate_stream",
            TgiRoute::Compat => "/",
        }
    }
}

/// What the answer carries besides the text.
#[derive(Debug, Clone)]
struct Shape {
    details: bool,
    /// `decoder_input_details`: the prompt's tokens with their log-probabilities.
    prefill: bool,
    top_n: usize,
    /// The prompt, put before the generated text (`return_full_text`).
    prefix: Option<String>,
    /// The seed reported in `details` (only when sampling, as TGI does).
    seed: Option<u64>,
}

/// A TGI request, validated.
struct TgiRequest {
    inputs: String,
    model: Option<String>,
    stream: bool,
    ask: Ask,
    truncate: Option<usize>,
    shape: Shape,
}

/// `POST /generate_stream`.
pub async fn generate_stream(State(node): State<AppState>, request_headers: HeaderMap, JsonBody(raw): JsonBody<Value>) -> Response {
    answer(node, request_headers, raw, TgiRoute::Stream).await
}

/// Answers a TGI request on `route`, errors in TGI's shape.
pub(crate) async fn answer(node: AppState, request_headers: HeaderMap, raw: Value, route: TgiRoute) -> Response {
    speaking(Dialect::Tgi, respond(node, request_headers, raw, route).await)
}

async fn respond(node: AppState, request_headers: HeaderMap, raw: Value, route: TgiRoute) -> Result<Response, Error> {
    let req = parse(raw, route)?;
    let slot = node.registry.resolve(req.model.as_deref(), ModelKind::Generate)?;
    slot.record_on_span();
    let service = ready_generator(&node, &slot).await?;
    if let Some(t) = req.truncate.filter(|&t| t >= service.context) {
        return Err(Error::field(
            "parameters.truncate",
            format!("must be at most {} (the context of model {} less one token to generate), got {t}", service.context - 1, slot.name()),
        ));
    }
    let prompt = PromptInput::Text(req.inputs.clone());
    let prepared = service.prepare_with(prompt.clone(), req.ask.max_tokens, "parameters.max_new_tokens", req.truncate).await.map_err(tgi_names)?;
    let prompt_tokens = req.shape.prefill.then(|| prepared.tokens.clone());
    let (service, generation) =
        begin_ask(&node, &slot, prompt, req.ask, Some(prepared), Directive::from_headers(&request_headers)).await.map_err(tgi_names)?;
    let table = service.token_table();
    if req.stream {
        let format = TgiStream { table, shape: req.shape, index: 0, text: String::new(), held: None };
        return Ok(stream_response_with_headers(&node, route.path(), &slot, generation, vec![], format, None));
    }
    let done = collect(generation).await?;
    let mut body = json!({"generated_text": format!("{}{}", req.shape.prefix.as_deref().unwrap_or(""), done.text)});
    if req.shape.details || req.shape.prefill {
        let mut tokens = token_values(&table, &done.text, &done.logprobs, &mut None);
        tokens.extend(done.generation.end_token.iter().map(|t| end_token(&table, t)));
        let mut details = json!({
            "finish_reason": done.reason.tgi(),
            "generated_tokens": done.usage.completion_tokens,
            "seed": req.shape.seed,
            "prefill": prompt_tokens.map_or(json!([]), |p| prefill(&table, &p, done.generation.prompt_logprobs.as_deref())),
            "tokens": tokens.iter().map(|(token, _)| token.clone()).collect::<Vec<_>>(),
        });
        if req.shape.top_n > 0 {
            details["top_tokens"] = tokens.into_iter().map(|(_, top)| top).collect();
        }
        body["details"] = details;
    }
    let body = if route == TgiRoute::Compat { json!([body]) } else { body };
    Ok(headers(Json(body).into_response(), &slot, &done.generation))
}

/// Errors from the shared generation path that name OpenAI's fields, named as TGI's: the
/// grammar (`response_format` there) and the prompt.
fn tgi_names(e: Error) -> Error {
    match e {
        Error::InvalidField { field, message } if field == "response_format" => Error::InvalidField { field: "parameters.grammar".into(), message },
        Error::EmptyInput(field) if field == "prompt" => Error::EmptyInput("inputs".into()),
        other => other,
    }
}

/// The body's top level (`fields::TGI`); `parameters` is read field by field (`Params`),
/// so each error names `parameters.X`.
#[derive(Debug, Deserialize)]
struct Body {
    inputs: String,
    #[serde(default)]
    parameters: Option<Value>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    model: Option<String>,
}

/// Reads and validates a TGI request: its fields (`fields::TGI`, `fields::TGI_PARAMETERS`)
/// and each parameter's value, as TGI's own validation does.
fn parse(raw: Value, route: TgiRoute) -> Result<TgiRequest, Error> {
    fields::check(&raw, fields::TGI)?;
    let Body { inputs, parameters, stream, model } = from_value(raw)?;
    let params = &parameters.unwrap_or_else(|| Value::Object(Map::new()));
    fields::check_in(params, fields::TGI_PARAMETERS, "parameters.")?;
    if inputs.is_empty() {
        return Err(Error::EmptyInput("inputs".into()));
    }
    let model = model.filter(|m| !m.is_empty());
    let stream = route == TgiRoute::Stream || stream.unwrap_or(false);
    let p = Params(params);
    let temperature = p.number("temperature")?;
    if let Some(t) = temperature.filter(|t| t.is_nan() || *t <= 0.0) {
        return Err(p.bad("temperature", format!("must be strictly positive, got {t}")));
    }
    let top_p = p.number("top_p")?;
    if let Some(v) = top_p.filter(|v| !(*v > 0.0 && *v < 1.0)) {
        return Err(p.bad("top_p", format!("must be > 0.0 and < 1.0, got {v}")));
    }
    let typical_p = p.number("typical_p")?;
    if let Some(v) = typical_p.filter(|v| !(*v > 0.0 && *v < 1.0)) {
        return Err(p.bad("typical_p", format!("must be > 0.0 and < 1.0, got {v}")));
    }
    let top_k = p.integer("top_k")?;
    if let Some(k) = top_k.filter(|k| *k <= 0) {
        return Err(p.bad("top_k", format!("must be strictly positive, got {k}")));
    }
    let repetition_penalty = p.number("repetition_penalty")?;
    if let Some(r) = repetition_penalty.filter(|r| r.is_nan() || *r <= 0.0) {
        return Err(p.bad("repetition_penalty", format!("must be strictly positive, got {r}")));
    }
    let frequency_penalty = p.number("frequency_penalty")?;
    if let Some(f) = frequency_penalty.filter(|f| !(-2.0..=2.0).contains(f)) {
        return Err(p.bad("frequency_penalty", format!("must be >= -2.0 and <= 2.0, got {f}")));
    }
    let max_new_tokens = p.integer("max_new_tokens")?;
    if let Some(m) = max_new_tokens.filter(|m| *m <= 0) {
        return Err(p.bad("max_new_tokens", format!("must be strictly positive, got {m}")));
    }
    let seed = match p.get("seed") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| p.bad("seed", format!("must be a non-negative integer, got {v}")))?),
    };
    let stops = p.stops()?;
    let do_sample = p.flag("do_sample")?.unwrap_or(false);
    let details = p.flag("details")?.unwrap_or(false);
    let prefill = p.flag("decoder_input_details")?.unwrap_or(false);
    if prefill && stream {
        return Err(p.bad("decoder_input_details", "is not supported when streaming tokens (TGI refuses it too)"));
    }
    let full_text = p.flag("return_full_text")?.unwrap_or(route == TgiRoute::Compat);
    let top_n = p.integer("top_n_tokens")?.unwrap_or(0);
    if !(0..=MAX_TOP_N_TOKENS as i64).contains(&top_n) {
        return Err(p.bad("top_n_tokens", format!("must be between 0 and {MAX_TOP_N_TOKENS}, got {top_n}")));
    }
    let truncate = p.integer("truncate")?;
    if let Some(t) = truncate.filter(|t| *t <= 0) {
        return Err(p.bad("truncate", format!("must be strictly positive, got {t}")));
    }
    let grammar = p.grammar()?;
    // TGI samples when asked to, or when any sampling parameter is set; otherwise greedy.
    let sampling = do_sample || temperature.is_some() || top_k.is_some() || top_p.is_some() || typical_p.is_some();
    let drawn = seed.unwrap_or_else(rand::random);
    let params = SamplingParams {
        temperature: if sampling { temperature.unwrap_or(1.0) as f32 } else { 0.0 },
        top_p: top_p.unwrap_or(1.0) as f32,
        top_k: top_k.unwrap_or(0) as usize,
        typical_p: typical_p.unwrap_or(1.0) as f32,
        seed: drawn,
        ignore_eos: false,
        frequency_penalty: frequency_penalty.unwrap_or(0.0) as f32,
        presence_penalty: 0.0,
        repetition_penalty: repetition_penalty.unwrap_or(1.0) as f32,
    };
    let decoding = Decoding {
        params,
        logit_bias: Vec::new(),
        // Every token is reported with its log-probability, streamed or in `details`.
        logprobs: Some(top_n as usize),
        grammar,
        keep_stop: true,
        prompt_logprobs: prefill,
    };
    Ok(TgiRequest {
        inputs: inputs.clone(),
        model,
        stream,
        ask: Ask { decoding, stops, max_tokens: max_new_tokens, seeded: seed.is_some() },
        truncate: truncate.map(|t| t as usize),
        shape: Shape { details, prefill, top_n: top_n as usize, prefix: full_text.then_some(inputs), seed: sampling.then_some(drawn) },
    })
}

/// TGI's `parameters` object, read field by field with each error naming its field.
struct Params<'a>(&'a Value);

impl Params<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn bad(&self, key: &str, message: impl Into<String>) -> Error {
        Error::field(format!("parameters.{key}"), message)
    }

    fn number(&self, key: &str) -> Result<Option<f64>, Error> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.bad(key, format!("must be a number, got {v}"))),
        }
    }

    fn flag(&self, key: &str) -> Result<Option<bool>, Error> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.bad(key, format!("must be true or false, got {v}"))),
        }
    }

    fn integer(&self, key: &str) -> Result<Option<i64>, Error> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| self.bad(key, format!("must be an integer, got {v}"))),
        }
    }

    /// `stop`: a list of non-empty strings (one string is read as a list of one).
    fn stops(&self) -> Result<Vec<String>, Error> {
        let list: Vec<String> = match self.get("stop") {
            None => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| v.as_str().map(str::to_string).ok_or_else(|| self.bad(&format!("stop[{i}]"), format!("must be a string, got {v}"))))
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(self.bad("stop", format!("must be a list of strings, got {other}"))),
        };
        if list.len() > MAX_STOP_SEQUENCES {
            return Err(self.bad("stop", format!("at most {MAX_STOP_SEQUENCES} stop sequences, got {}", list.len())));
        }
        if list.iter().any(String::is_empty) {
            return Err(self.bad("stop", "stop sequences must not be empty"));
        }
        Ok(list)
    }

    /// `grammar`: `{"type": "json", "value": schema}` (an object, or a string holding
    /// one), `{"type": "regex", "value": "..."}`, or `{"type": "json_schema", "value":
    /// {"name", "schema"}}`.
    fn grammar(&self) -> Result<Option<Grammar>, Error> {
        let Some(g) = self.get("grammar") else { return Ok(None) };
        let Some(map) = g.as_object() else {
            return Err(self.bad("grammar", format!("must be an object {{\"type\", \"value\"}}, got {g}")));
        };
        if let Some(key) = map.keys().find(|k| *k != "type" && *k != "value") {
            return Err(Error::UnhonouredField { field: format!("parameters.grammar.{key}"), message: "unknown field; known: type, value".into() });
        }
        let value = map.get("value").filter(|v| !v.is_null()).ok_or_else(|| Error::MissingField("parameters.grammar.value".into()))?;
        let schema = |v: &Value, field: &str| -> Result<Grammar, Error> {
            let parsed = match v {
                Value::String(s) => serde_json::from_str(s).map_err(|e| Error::field(field, format!("is not JSON: {e}")))?,
                other => other.clone(),
            };
            match parsed {
                schema @ Value::Object(_) => Ok(Grammar::JsonSchema(schema)),
                other => Err(Error::field(field, format!("must be a JSON Schema object, got {other}"))),
            }
        };
        match map.get("type").and_then(Value::as_str) {
            Some("json") => Ok(Some(schema(value, "parameters.grammar.value")?)),
            Some("regex") => match value.as_str() {
                Some(rx) if !rx.is_empty() => Ok(Some(Grammar::Regex(rx.to_string()))),
                _ => Err(self.bad("grammar.value", format!("must be a regular expression (a non-empty string), got {value}"))),
            },
            Some("json_schema") => match value.get("schema") {
                Some(s) => Ok(Some(schema(s, "parameters.grammar.value.schema")?)),
                None => Err(Error::MissingField("parameters.grammar.value.schema".into())),
            },
            other => {
                Err(self
                    .bad("grammar.type", format!("must be json, regex or json_schema, got {}", other.map_or("nothing".into(), |t| format!("{t:?}")))))
            }
        }
    }
}

/// A token as TGI writes it: `{"id", "text", "logprob", "special"}`.
fn token(table: &TokenTable, id: u32, text: String, logprob: Option<f32>) -> Value {
    json!({"id": id, "text": text, "logprob": logprob.map(finite), "special": table.is_special(id)})
}

/// The end-of-sequence token, with its name as its text (it adds nothing to the answer).
fn end_token(table: &TokenTable, t: &TokenLogprob) -> (Value, Value) {
    (token(table, t.token, String::from_utf8_lossy(&t.bytes).into_owned(), Some(t.logprob)), alternatives(table, t))
}

/// A token's `top_tokens`: its most likely alternatives, most likely first.
fn alternatives(table: &TokenTable, t: &TokenLogprob) -> Value {
    t.top.iter().map(|(id, bytes, lp)| token(table, *id, String::from_utf8_lossy(bytes).into_owned(), Some(*lp))).collect()
}

/// Each token behind `text` with its share of it, as TGI reports tokens: the text is split
/// at the tokens' byte boundaries, a token that ends inside a character gets "" and the one
/// that completes it the whole character. A decoder that drops the first token's leading
/// space makes the bytes longer than the text by that much; it is taken off the front.
/// A special token (`<|im_end|>` mid-answer) adds nothing to the text and gets "".
/// Should the bytes not spell the text at all, the last token carries it whole.
/// `skip` carries the bytes still to take off across pieces of one stream.
fn token_values(table: &TokenTable, text: &str, tokens: &[TokenLogprob], skip: &mut Option<usize>) -> Vec<(Value, Value)> {
    let pieces: Vec<&[u8]> = tokens.iter().map(|t| if table.is_special(t.token) { &[][..] } else { &t.bytes[..] }).collect();
    let texts = split_text(text, &pieces, skip);
    tokens.iter().zip(texts).map(|(t, text)| (token(table, t.token, text, Some(t.logprob)), alternatives(table, t))).collect()
}

/// Each token's share of `text`, given each token's bytes (see `token_values`).
fn split_text(text: &str, pieces: &[&[u8]], skip: &mut Option<usize>) -> Vec<String> {
    let bytes: Vec<u8> = pieces.concat();
    let mut out = vec![String::new(); pieces.len()];
    let drop = match skip.take() {
        Some(d) => d,
        None if bytes.ends_with(text.as_bytes()) => bytes.len() - text.len(),
        None => usize::MAX,
    };
    if drop == usize::MAX || bytes.len() < drop || &bytes[drop..] != text.as_bytes() {
        if let Some(last) = out.last_mut() {
            *last = text.to_string();
        }
        return out;
    }
    let mut dropped = 0;
    let mut carry: Vec<u8> = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        let from = (drop - dropped).min(piece.len());
        dropped += from;
        carry.extend_from_slice(&piece[from..]);
        let valid = match std::str::from_utf8(&carry) {
            Ok(_) => carry.len(),
            Err(e) => e.valid_up_to(),
        };
        out[i] = String::from_utf8_lossy(&carry[..valid]).into_owned();
        carry.drain(..valid);
    }
    out
}

/// `details.prefill`: the prompt's tokens, each with its log-probability after the ones
/// before it (the first has none).
fn prefill(table: &TokenTable, prompt: &[u32], logprobs: Option<&[f32]>) -> Value {
    prompt
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let lp = if i == 0 { None } else { logprobs.and_then(|l| l.get(i - 1)).copied() };
            json!({"id": id, "text": String::from_utf8_lossy(table.bytes(id)), "logprob": lp.map(finite)})
        })
        .collect()
}

/// TGI's stream: one event per token; the last carries `generated_text` (and `details`
/// when asked). The last text token is held until it is known not to be the last.
struct TgiStream {
    table: Arc<TokenTable>,
    shape: Shape,
    /// Events sent so far (TGI's `index`).
    index: u32,
    /// The generated text so far.
    text: String,
    /// A token event not yet sent: it may be the last.
    held: Option<Value>,
}

impl TgiStream {
    fn event(&mut self, (token, top): (Value, Value)) -> Value {
        self.index += 1;
        let mut event = json!({"index": self.index, "token": token, "generated_text": null, "details": null});
        if self.shape.top_n > 0 {
            event["top_tokens"] = top;
        }
        event
    }
}

impl PieceFormat for TgiStream {
    /// Never called: the stream formats through `format_in`, which sees the generation.
    fn format(&mut self, _piece: &Piece) -> Vec<Value> {
        Vec::new()
    }

    /// TGI's stream ends with its last token event, not OpenAI's `data: [DONE]` (which a
    /// client that parses every `data:` line as JSON would choke on).
    fn done_marker(&self) -> bool {
        false
    }

    fn format_in(&mut self, piece: &Piece, generation: &Generation) -> Vec<Value> {
        match piece {
            Piece::Text { text, logprobs } => {
                self.text.push_str(text);
                let mut out: Vec<Value> = self.held.take().into_iter().collect();
                // Only the first token's text may leave out bytes (a leading space).
                let mut skip = if self.index == 0 && out.is_empty() { None } else { Some(0) };
                let tokens = token_values(&self.table, text, logprobs, &mut skip);
                for t in tokens {
                    let e = self.event(t);
                    out.push(e);
                }
                // The last text before the end: its last token may be the answer's last event.
                if generation.finishing() && generation.end_token.is_none() {
                    self.held = out.pop();
                }
                out
            }
            Piece::Done(usage, reason) => {
                let mut out: Vec<Value> = Vec::new();
                let mut last = match &generation.end_token {
                    Some(end) => {
                        out.extend(self.held.take());
                        let e = end_token(&self.table, end);
                        self.event(e)
                    }
                    None => match self.held.take() {
                        Some(held) => held,
                        // Nothing to carry the end (an engine that sent its last text early).
                        None => self.event((token(&self.table, 0, String::new(), None), json!([]))),
                    },
                };
                last["generated_text"] = json!(format!("{}{}", self.shape.prefix.as_deref().unwrap_or(""), self.text));
                if self.shape.details {
                    last["details"] = json!({
                        "finish_reason": reason.tgi(),
                        "generated_tokens": usage.completion_tokens,
                        "seed": self.shape.seed,
                        "input_length": usage.prompt_tokens,
                    });
                }
                out.push(last);
                out
            }
            Piece::Error(e) => {
                let mut out: Vec<Value> = self.held.take().into_iter().collect();
                out.push(e.tgi().1);
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(text: &str, pieces: &[&[u8]]) -> Vec<String> {
        split_text(text, pieces, &mut None)
    }

    /// The tokens' texts always add up to the text: split at token boundaries, a character
    /// split across tokens given whole to the token that completes it, a dropped leading
    /// space taken off the first token, special tokens empty.
    #[test]
    fn each_token_gets_its_share_of_the_text() {
        assert_eq!(split("Paris is", &[b" Paris", b" is"]), ["Paris", " is"], "the decoder dropped the first space");
        assert_eq!(split(" Paris is", &[b" Paris", b" is"]), [" Paris", " is"]);
        let e_acute = "é".as_bytes();
        assert_eq!(split("café", &[b"caf", &e_acute[..1], &e_acute[1..]]), ["caf", "", "é"]);
        assert_eq!(split("ok", &[b"ok", b""]), ["ok", ""], "a special token adds nothing");
        assert_eq!(split("abc", &[b"xy", b"z"]), ["", "abc"], "bytes that do not spell the text: the last token carries it");
        // A later piece of a stream never drops bytes.
        assert_eq!(split_text("b", &[b" b"], &mut Some(0)), ["b"]);
        assert_eq!(split("", &[]), Vec::<String>::new());
    }
}
