//! `/tokenize` and `/decode` (TEI's), `/tokenize` and `/detokenize` (llama.cpp's): clients
//! count and chunk text with the model's own tokenizer before they send it.
//!
//! `/tokenize` speaks both dialects, told apart by the body: TEI's `inputs` (an embed
//! model's tokenizer, tokens with the text and byte offsets they cover) or llama.cpp's
//! `content` (a generate model's tokenizer, ids, optionally with their pieces).

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::embed::Inputs;
use super::fields;
use super::json::{from_value, JsonBody};
use super::AppState;
use crate::config::ModelKind;
use crate::encoder::tokenize::SimpleToken;
use crate::error::Error;

/// TEI's `/tokenize` body.
#[derive(Debug, Deserialize)]
struct TeiTokenize {
    inputs: Inputs,
    #[serde(default = "yes")]
    add_special_tokens: bool,
    #[serde(default)]
    prompt_name: Option<String>,
    #[serde(default)]
    model: Option<String>,
}

/// llama.cpp's `/tokenize` body.
#[derive(Debug, Deserialize)]
struct LlamaTokenize {
    content: String,
    #[serde(default)]
    add_special: bool,
    #[serde(default)]
    with_pieces: bool,
    #[serde(default)]
    model: Option<String>,
}

fn yes() -> bool {
    true
}

/// `POST /tokenize`.
pub async fn tokenize(State(node): State<AppState>, JsonBody(raw): JsonBody<Value>) -> Result<Json<Value>, Error> {
    if raw.get("content").is_some() {
        fields::check(&raw, fields::TOKENIZE_LLAMA)?;
        let req: LlamaTokenize = from_value(raw)?;
        let slot = node.registry.resolve(req.model.as_deref(), ModelKind::Generate)?;
        let service = slot.ready_service(node.ready_wait()).await?;
        let generator = service.generator(slot.name())?.clone();
        let ids = tokio::task::spawn_blocking(move || generator.tokenize(&req.content, req.add_special).map(|ids| (ids, generator)))
            .await
            .map_err(|_| Error::Internal("the tokenizer panicked".into()))?;
        let (ids, generator) = ids?;
        if req.with_pieces {
            let tokens: Vec<Value> = ids.iter().map(|&id| json!({"id": id, "piece": generator.piece(id)})).collect();
            return Ok(Json(json!({"tokens": tokens})));
        }
        return Ok(Json(json!({"tokens": ids})));
    }
    fields::check(&raw, fields::TOKENIZE)?;
    let req: TeiTokenize = from_value(raw)?;
    req.inputs.validate("inputs", &node.config.limits)?;
    let slot = node.registry.resolve(req.model.as_deref(), ModelKind::Embed)?;
    let service = slot.ready_service(node.ready_wait()).await?;
    let encoder = service.encoder(slot.name())?.clone();
    let texts = encoder.with_prompt(req.inputs.texts, req.prompt_name.as_deref())?;
    let add_special = req.add_special_tokens;
    let tokenizer = encoder.tokenizer.clone();
    let out: Vec<Vec<SimpleToken>> =
        tokio::task::spawn_blocking(move || texts.iter().map(|t| tokenizer.tokens(t, add_special)).collect::<Result<_, _>>())
            .await
            .map_err(|_| Error::Internal("the tokenizer panicked".into()))??;
    Ok(Json(json!(out)))
}

/// Token ids: one list, or a list of lists (TEI's `/decode`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Ids {
    One(Vec<u32>),
    Many(Vec<Vec<u32>>),
}

/// TEI's `/decode` body.
#[derive(Debug, Deserialize)]
struct TeiDecode {
    ids: Ids,
    #[serde(default = "yes")]
    skip_special_tokens: bool,
    #[serde(default)]
    model: Option<String>,
}

/// `POST /decode` (TEI): one text per list of ids.
pub async fn decode(State(node): State<AppState>, JsonBody(raw): JsonBody<Value>) -> Result<Json<Value>, Error> {
    fields::check(&raw, fields::DECODE)?;
    let req: TeiDecode = from_value(raw)?;
    let lists = match req.ids {
        Ids::One(ids) => vec![ids],
        Ids::Many(lists) => lists,
    };
    if lists.is_empty() || lists.iter().any(Vec::is_empty) {
        return Err(Error::EmptyInput("ids".into()));
    }
    if lists.len() > node.config.limits.max_inputs {
        return Err(Error::TooManyInputs { field: "ids".into(), count: lists.len(), limit: node.config.limits.max_inputs });
    }
    let slot = node.registry.resolve(req.model.as_deref(), ModelKind::Embed)?;
    let service = slot.ready_service(node.ready_wait()).await?;
    let tokenizer = service.encoder(slot.name())?.tokenizer.clone();
    let vocab = tokenizer.vocab_size();
    for (i, ids) in lists.iter().enumerate() {
        if let Some(j) = ids.iter().position(|&t| t as usize >= vocab) {
            return Err(Error::field(
                format!("ids[{i}][{j}]"),
                format!("{} is not in the vocabulary of model {} ({vocab} tokens)", ids[j], slot.name()),
            ));
        }
    }
    let texts: Vec<String> = lists.iter().map(|ids| tokenizer.decode(ids, req.skip_special_tokens)).collect::<Result<_, _>>()?;
    Ok(Json(json!(texts)))
}

/// llama.cpp's `/detokenize` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Detokenize {
    tokens: Vec<u32>,
    #[serde(default)]
    model: Option<String>,
}

/// `POST /detokenize` (llama.cpp): `{"content"}` of a generate model's token ids.
pub async fn detokenize(State(node): State<AppState>, JsonBody(req): JsonBody<Detokenize>) -> Result<Json<Value>, Error> {
    let slot = node.registry.resolve(req.model.as_deref(), ModelKind::Generate)?;
    let service = slot.ready_service(node.ready_wait()).await?;
    let content = service.generator(slot.name())?.detokenize(&req.tokens)?;
    Ok(Json(json!({"content": content})))
}
