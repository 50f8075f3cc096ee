//! Embedding and classification routes: `/embed` and `/classify` (text-embeddings-inference's
//! shapes), `/v1/embeddings` (OpenAI's).
//!
//! Validation happens once, in `Inputs::validate`, for both dialects: empty input (400),
//! too many inputs or characters (413), before anything is queued. Token limits are
//! checked by the tokenizer (422 naming the input), and admission (429) before that, so a
//! refused request holds nothing afterwards.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::json::JsonBody;
use super::{inference_headers, AppState, Served};
use crate::config::{LimitsConfig, ModelKind};
use crate::encoder::{Encoded, EncoderService};
use crate::error::Error;
use crate::models::registry::ModelSlot;
use crate::node::Node;
use crate::telemetry::trace::record_tokens;

/// One string or a list of strings, as both dialects accept.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub texts: Vec<String>,
    /// True when the client sent a single string (TEI answers `/classify` flat then).
    pub single: bool,
}

impl<'de> Deserialize<'de> for Inputs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Inputs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Inputs, E> {
                Ok(Inputs { texts: vec![s.to_string()], single: true })
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Inputs, E> {
                Ok(Inputs { texts: vec![s], single: true })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Inputs, A::Error> {
                let mut texts = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(t) = seq.next_element::<String>()? {
                    texts.push(t);
                }
                Ok(Inputs { texts, single: false })
            }
        }
        d.deserialize_any(V)
    }
}

impl Inputs {
    /// The checks made before any work: non-empty, within the count and character limits.
    pub fn validate(&self, field: &str, limits: &LimitsConfig) -> Result<(), Error> {
        if self.texts.is_empty() {
            return Err(Error::EmptyInput(field.to_string()));
        }
        if self.texts.len() > limits.max_inputs {
            return Err(Error::TooManyInputs { field: field.to_string(), count: self.texts.len(), limit: limits.max_inputs });
        }
        for (index, t) in self.texts.iter().enumerate() {
            if t.is_empty() {
                return Err(Error::EmptyInput(if self.single { field.to_string() } else { format!("{field}[{index}]") }));
            }
            // Bytes bound characters from above: count characters only when it matters.
            if t.len() > limits.max_input_chars {
                let chars = t.chars().count();
                if chars > limits.max_input_chars {
                    return Err(Error::InputTooManyChars { index, chars, limit: limits.max_input_chars });
                }
            }
        }
        Ok(())
    }
}

/// `POST /embed` body (TEI).
#[derive(Debug, Deserialize)]
pub struct EmbedRequest {
    pub inputs: Inputs,
    #[serde(default = "yes")]
    pub normalize: bool,
    #[serde(default)]
    pub truncate: bool,
    #[serde(default)]
    pub model: Option<String>,
    /// One of the model's named prompts (sentence-transformers' `prompts`, e.g. bge's
    /// `query`), put in front of every input; default: the model's `default_prompt_name`.
    #[serde(default)]
    pub prompt_name: Option<String>,
}

fn yes() -> bool {
    true
}

/// The encoder behind an embed model, once it is warm.
async fn ready_encoder(node: &Node, slot: &ModelSlot) -> Result<Arc<EncoderService>, Error> {
    Ok(slot.ready_service(node.ready_wait()).await?.encoder(slot.name())?.clone())
}

fn answer(body: impl Serialize, slot: &ModelSlot, encoded: &Encoded, workload: &'static str) -> Response {
    let mut response = Json(body).into_response();
    let input_tokens = encoded.tokens.iter().sum();
    record_tokens(&tracing::Span::current(), input_tokens, None);
    let served = Served {
        workload,
        model: slot.name().to_string(),
        queue_s: encoded.queue_s,
        compute_s: encoded.compute_s,
        input_tokens,
        output_tokens: 0,
        streaming: false,
    };
    inference_headers(&mut response, &slot.label(), served);
    response
}

/// Runs the request's checks inside a `validate` span.
fn validated(inputs: &Inputs, field: &str, node: &Node) -> Result<(), Error> {
    tracing::info_span!("validate", inputs = inputs.texts.len()).in_scope(|| inputs.validate(field, &node.config.limits))
}

/// `POST /embed`: one vector per input, in input order.
pub async fn embed(State(node): State<AppState>, JsonBody(req): JsonBody<EmbedRequest>) -> Result<Response, Error> {
    let slot = node.registry.resolve(req.model.as_deref(), ModelKind::Embed)?;
    slot.record_on_span();
    validated(&req.inputs, "inputs", &node)?;
    let encoder = ready_encoder(&node, slot).await?;
    let texts = encoder.with_prompt(req.inputs.texts, req.prompt_name.as_deref())?;
    let encoded = encoder.encode(texts, req.truncate, req.normalize).await?;
    Ok(answer(&encoded.rows, slot, &encoded, "embed"))
}

/// `POST /v1/embeddings` body (OpenAI).
#[derive(Debug, Deserialize)]
pub struct OpenAiEmbeddingRequest {
    pub input: Inputs,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub encoding_format: Option<EncodingFormat>,
    #[serde(default)]
    pub dimensions: Option<usize>,
    /// Our extension: cut inputs over the model's token limit instead of answering 422.
    #[serde(default)]
    pub truncate: bool,
    /// Our extension, as on `/embed`: one of the model's named prompts.
    #[serde(default)]
    pub prompt_name: Option<String>,
}

/// How `/v1/embeddings` encodes vectors.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    Float,
    Base64,
}

/// `POST /v1/embeddings`: OpenAI's shape, with `usage` token counts, base64 and `dimensions`.
pub async fn openai_embeddings(State(node): State<AppState>, JsonBody(req): JsonBody<OpenAiEmbeddingRequest>) -> Result<Response, Error> {
    let slot = node.registry.resolve(req.model.as_deref().filter(|m| !m.is_empty()), ModelKind::Embed)?;
    slot.record_on_span();
    validated(&req.input, "input", &node)?;
    let encoder = ready_encoder(&node, slot).await?;
    if let Some(d) = req.dimensions {
        if d == 0 || d > encoder.dims {
            return Err(Error::field("dimensions", format!("must be between 1 and {} for model {}", encoder.dims, slot.name())));
        }
    }
    let texts = encoder.with_prompt(req.input.texts, req.prompt_name.as_deref())?;
    let encoded = encoder.encode(texts, req.truncate, true).await?;
    let format = req.encoding_format.unwrap_or(EncodingFormat::Float);
    let data: Vec<EmbeddingItem> = encoded
        .rows
        .iter()
        .enumerate()
        .map(|(index, row)| {
            let mut v = row.clone();
            if let Some(d) = req.dimensions {
                // Matryoshka-style: keep the leading dimensions and renormalize.
                v.truncate(d);
                crate::encoder::pooling::l2_normalize(&mut v);
            }
            let embedding = match format {
                EncodingFormat::Float => Embedding::Float(v),
                EncodingFormat::Base64 => {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    Embedding::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            };
            EmbeddingItem { object: "embedding", index, embedding }
        })
        .collect();
    let tokens: usize = encoded.tokens.iter().sum();
    let body = EmbeddingList { object: "list", data, model: slot.name(), usage: EmbeddingUsage { prompt_tokens: tokens, total_tokens: tokens } };
    Ok(answer(&body, slot, &encoded, "embed"))
}

/// OpenAI's embeddings answer.
#[derive(Debug, Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<EmbeddingItem>,
    model: &'a str,
    usage: EmbeddingUsage,
}

#[derive(Debug, Serialize)]
struct EmbeddingItem {
    object: &'static str,
    index: usize,
    embedding: Embedding,
}

/// A vector as floats, or as base64 of its little-endian f32 bytes (`encoding_format`).
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Embedding {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
struct EmbeddingUsage {
    prompt_tokens: usize,
    total_tokens: usize,
}

/// One label's score, as TEI answers `/classify` and `/predict`.
#[derive(Debug, Serialize)]
struct LabelScore {
    label: String,
    score: f32,
}

/// `POST /classify` and `/predict` body (TEI).
#[derive(Debug, Deserialize)]
pub struct ClassifyRequest {
    pub inputs: Inputs,
    #[serde(default)]
    pub raw_scores: bool,
    #[serde(default)]
    pub truncate: bool,
    #[serde(default)]
    pub model: Option<String>,
}

/// `POST /classify`: per input, `[{"label", "score"}]` sorted by score, highest first.
/// A single string input answers with one flat list, as TEI does.
pub async fn classify(State(node): State<AppState>, JsonBody(req): JsonBody<ClassifyRequest>) -> Result<Response, Error> {
    let slot = node.registry.resolve(req.model.as_deref(), ModelKind::Classify)?;
    slot.record_on_span();
    validated(&req.inputs, "inputs", &node)?;
    let service = slot.ready_service(node.ready_wait()).await?;
    let (scored, encoded) = service.classify(slot.name(), req.inputs.texts, req.truncate, req.raw_scores).await?;
    let mut rows: Vec<Vec<LabelScore>> =
        scored.into_iter().map(|row| row.into_iter().map(|(label, score)| LabelScore { label, score }).collect()).collect();
    if req.inputs.single {
        // A single string input answers with one flat list, as TEI does.
        return Ok(answer(rows.pop().unwrap_or_default(), slot, &encoded, "classify"));
    }
    Ok(answer(&rows, slot, &encoded, "classify"))
}
