//! Embedding and classification routes: `/embed` and `/classify` (text-embeddings-inference's
//! shapes), `/v1/embeddings` (OpenAI's).
//!
//! Validation happens once, in `Inputs::validate`, for both dialects: empty input (400),
//! too many inputs or characters (413), before anything is queued. Token limits are
//! checked by the tokenizer (422 naming the input), and admission (429) before that, so a
//! refused request holds nothing afterwards.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use serde_json::{json, Value};

use super::cached;
use super::fields;
use super::json::{from_value, JsonBody};
use super::{inference_headers, AppState, Served};
use crate::cache::Directive;
use crate::config::{LimitsConfig, ModelKind};
use crate::encoder::tokenize::{Text, Truncation};
use crate::encoder::{Encoded, EncoderService};
use crate::error::Error;
use crate::models::registry::{ModelSlot, SlotRef};
use crate::node::Node;
use crate::telemetry::trace::record_tokens;

/// Why token-id inputs are refused, and what to do instead.
const TOKEN_IDS_REFUSED: &str = "token ids are not accepted, send text: ids made by another tokenizer (tiktoken's, for one) \
     mean nothing to this model's vocabulary. LangChain's OpenAIEmbeddings sends them unless it is made with \
     check_embedding_ctx_length=False";

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
                while let Some(t) = seq.next_element::<serde_json::Value>()? {
                    match t {
                        serde_json::Value::String(s) => texts.push(s),
                        serde_json::Value::Number(_) | serde_json::Value::Array(_) => return Err(de::Error::custom(TOKEN_IDS_REFUSED)),
                        other => return Err(de::Error::custom(format!("expected a string, got {other}"))),
                    }
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

/// `POST /embed` body (TEI). The fields are `fields::EMBED`.
#[derive(Debug, Deserialize)]
pub struct EmbedRequest {
    pub inputs: Inputs,
    #[serde(default = "yes")]
    pub normalize: bool,
    /// Cut inputs over the model's token limit; absent or null: `limits.auto_truncate`.
    #[serde(default)]
    pub truncate: Option<bool>,
    #[serde(default)]
    pub truncation_direction: Option<Direction>,
    #[serde(default)]
    pub model: Option<String>,
    /// One of the model's named prompts (sentence-transformers' `prompts`, e.g. bge's
    /// `query`), put in front of every input; default: the model's `default_prompt_name`.
    #[serde(default)]
    pub prompt_name: Option<String>,
    /// Keep the first `dimensions` of each vector (Matryoshka), before normalizing.
    #[serde(default)]
    pub dimensions: Option<usize>,
}

/// TEI's `truncation_direction`: which end of a long input is cut.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
pub enum Direction {
    #[serde(alias = "right")]
    Right,
    #[serde(alias = "left")]
    Left,
}

/// What a request's `truncate` and `truncation_direction` ask for, with the node's default.
fn truncation(node: &Node, truncate: Option<bool>, direction: Option<Direction>) -> Truncation {
    match (truncate.unwrap_or(node.config.limits.auto_truncate), direction.unwrap_or(Direction::Right)) {
        (false, _) => Truncation::Refuse,
        (true, Direction::Right) => Truncation::Right,
        (true, Direction::Left) => Truncation::Left,
    }
}

fn yes() -> bool {
    true
}

/// The encoder behind an embed model, once it is warm.
async fn ready_encoder(node: &Node, slot: &SlotRef<'_>) -> Result<Arc<EncoderService>, Error> {
    Ok(slot.ready_service(node.ready_wait()).await?.encoder(slot.name())?.clone())
}

fn answer(body: impl Serialize, slot: &SlotRef<'_>, encoded: &Encoded, workload: &'static str, cache: Option<&'static str>) -> Response {
    let mut response = Json(body).into_response();
    let input_tokens = encoded.tokens.iter().sum();
    record_tokens(&tracing::Span::current(), input_tokens, None);
    let served = Served {
        workload,
        model: slot.name().to_string(),
        queue_s: encoded.queue_s,
        compute_s: encoded.compute_s,
        tokenize_s: encoded.tokenize_s,
        first_token_s: None,
        input_tokens,
        output_tokens: 0,
        streaming: false,
        cache,
        caller: crate::accounts::current(),
    };
    inference_headers(&mut response, &slot.label(), served);
    response
}

/// Runs the request's checks inside a `validate` span.
fn validated(inputs: &Inputs, field: &str, node: &Node) -> Result<(), Error> {
    tracing::info_span!("validate", inputs = inputs.texts.len()).in_scope(|| inputs.validate(field, &node.config.limits))
}

/// `dimensions`, checked against the model's width.
fn dimensions(requested: Option<usize>, encoder: &EncoderService) -> Result<Option<usize>, Error> {
    match requested {
        Some(d) if d == 0 || d > encoder.dims => {
            Err(Error::field("dimensions", format!("must be between 1 and {} for model {}", encoder.dims, encoder.name)))
        }
        other => Ok(other),
    }
}

/// Keeps the leading `dims` of a vector (Matryoshka), normalized again when it was.
fn shorten(mut v: Vec<f32>, dims: Option<usize>, normalize: bool) -> Vec<f32> {
    if let Some(d) = dims {
        v.truncate(d);
        if normalize {
            crate::encoder::pooling::l2_normalize(&mut v);
        }
    }
    v
}

/// What `/embed` and `/embed_all` share before the model runs: the model, its encoder, the
/// inputs with their prompt, and the truncation asked for.
async fn prepare_embed(node: &AppState, req: EmbedRequest) -> Result<(SlotRef<'_>, Arc<EncoderService>, Vec<String>, Truncation), Error> {
    let slot = node.registry.resolve(req.model.as_deref(), ModelKind::Embed)?;
    slot.record_on_span();
    validated(&req.inputs, "inputs", node)?;
    let encoder = ready_encoder(node, &slot).await?;
    let texts = encoder.with_prompt(req.inputs.texts, req.prompt_name.as_deref())?;
    Ok((slot, encoder, texts, truncation(node, req.truncate, req.truncation_direction)))
}

/// `POST /embed`: one vector per input, in input order.
pub async fn embed(State(node): State<AppState>, headers: HeaderMap, JsonBody(raw): JsonBody<Value>) -> Result<Response, Error> {
    fields::check(&raw, fields::EMBED)?;
    let req: EmbedRequest = from_value(raw)?;
    let (normalize, requested_dims) = (req.normalize, req.dimensions);
    let (slot, encoder, texts, truncate) = prepare_embed(&node, req).await?;
    let dims = dimensions(requested_dims, &encoder)?;
    let (encoded, cache) = cached::encode(&node, &slot, &encoder, texts, truncate, normalize, Directive::from_headers(&headers)).await?;
    let rows: Vec<Vec<f32>> = encoded.rows.iter().map(|r| shorten(r.clone(), dims, normalize)).collect();
    Ok(answer(&rows, &slot, &encoded, "embed", cache))
}

/// `POST /embed_all`: every token's final hidden state per input, unpooled and not
/// normalized (`[[[f32]]]`: input, token, dimension), special tokens included, as TEI
/// answers it and as sentence-transformers' `output_value="token_embeddings"` gives them.
/// The body is `/embed`'s without `normalize` and `dimensions` (`fields::EMBED_ALL`).
pub async fn embed_all(State(node): State<AppState>, JsonBody(raw): JsonBody<Value>) -> Result<Response, Error> {
    fields::check(&raw, fields::EMBED_ALL)?;
    let req: EmbedRequest = from_value(raw)?;
    let (slot, encoder, texts, truncate) = prepare_embed(&node, req).await?;
    let encoded = encoder.encode_tokens(texts, truncate).await?;
    let dims = encoder.dims;
    let rows: Vec<Vec<&[f32]>> = encoded.rows.iter().map(|r| r.chunks_exact(dims).collect()).collect();
    Ok(answer(&rows, &slot, &encoded, "embed", None))
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
    /// Our extension, as on `/embed`: absent or null, `limits.auto_truncate`.
    #[serde(default)]
    pub truncate: Option<bool>,
    /// Recorded on the trace (`generate::record_attribution`), as on the chat routes.
    #[serde(default)]
    pub user: Option<String>,
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
pub async fn openai_embeddings(State(node): State<AppState>, headers: HeaderMap, JsonBody(raw): JsonBody<Value>) -> Result<Response, Error> {
    fields::check(&raw, fields::EMBEDDINGS)?;
    super::generate::record_attribution(&raw)?;
    let req: OpenAiEmbeddingRequest = from_value(raw)?;
    let slot = node.registry.resolve(req.model.as_deref().filter(|m| !m.is_empty()), ModelKind::Embed)?;
    slot.record_on_span();
    validated(&req.input, "input", &node)?;
    let encoder = ready_encoder(&node, &slot).await?;
    let dims = dimensions(req.dimensions, &encoder)?;
    let texts = encoder.with_prompt(req.input.texts, req.prompt_name.as_deref())?;
    let truncate = truncation(&node, req.truncate, None);
    let (encoded, cache) = cached::encode(&node, &slot, &encoder, texts, truncate, true, Directive::from_headers(&headers)).await?;
    let format = req.encoding_format.unwrap_or(EncodingFormat::Float);
    let data: Vec<EmbeddingItem> = encoded
        .rows
        .iter()
        .enumerate()
        .map(|(index, row)| {
            let v = shorten(row.clone(), dims, true);
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
    Ok(answer(&body, &slot, &encoded, "embed", cache))
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

/// `POST /classify` and `/predict` body (TEI). The fields are `fields::PREDICT`; `inputs`
/// is read by `ClassifyInputs::read`, as each route reads it.
#[derive(Debug, Deserialize)]
pub struct ClassifyRequest {
    pub inputs: Value,
    #[serde(default)]
    pub raw_scores: bool,
    #[serde(default)]
    pub truncate: Option<bool>,
    #[serde(default)]
    pub truncation_direction: Option<Direction>,
    #[serde(default)]
    pub model: Option<String>,
}

/// A classify request's inputs: texts and sentence pairs, and whether the answer is one flat
/// list (a single input) or one list per input.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassifyInputs {
    pub texts: Vec<Text>,
    pub flat: bool,
}

impl ClassifyInputs {
    /// `"text"` (flat); `[["a"], ["q", "p"], ...]`, a batch of texts and pairs; and a list of
    /// strings, which TEI's `/predict` reads as one pair when it has two (`tei_pairs`: `["q",
    /// "p"]` is a pair, flat) and `/classify` as a batch of texts.
    pub fn read(inputs: &Value, tei_pairs: bool, limits: &LimitsConfig) -> Result<Self, Error> {
        let text = |v: &Value, at: String| -> Result<String, Error> {
            match v {
                Value::String(s) if s.is_empty() => Err(Error::EmptyInput(at)),
                Value::String(s) if s.chars().count() > limits.max_input_chars => {
                    Err(Error::InputTooManyChars { index: 0, chars: s.chars().count(), limit: limits.max_input_chars })
                }
                Value::String(s) => Ok(s.clone()),
                Value::Number(_) => Err(Error::field(at, TOKEN_IDS_REFUSED)),
                other => Err(Error::field(at, format!("expected a string, got {other}"))),
            }
        };
        let items = match inputs {
            Value::String(_) => return Ok(ClassifyInputs { texts: vec![Text::One(text(inputs, "inputs".into())?)], flat: true }),
            Value::Array(items) if items.is_empty() => return Err(Error::EmptyInput("inputs".into())),
            Value::Array(items) => items,
            other => return Err(Error::field("inputs", format!("expected a string, a list of strings or a list of lists, got {other}"))),
        };
        if items.len() > limits.max_inputs {
            return Err(Error::TooManyInputs { field: "inputs".into(), count: items.len(), limit: limits.max_inputs });
        }
        let all_strings = items.iter().all(|v| !v.is_array());
        if all_strings && tei_pairs {
            let at = |i: usize| format!("inputs[{i}]");
            return match items.as_slice() {
                [one] => Ok(ClassifyInputs { texts: vec![Text::One(text(one, at(0))?)], flat: true }),
                [a, b] => Ok(ClassifyInputs { texts: vec![Text::Pair(text(a, at(0))?, text(b, at(1))?)], flat: true }),
                _ => Err(Error::field(
                    "inputs",
                    "a list of strings is one sentence pair here (TEI's /predict) and has two; send a batch as a list of lists: [[\"a\"], [\"b\"]]",
                )),
            };
        }
        let texts = items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::Array(pair) => match pair.as_slice() {
                    [one] => Ok(Text::One(text(one, format!("inputs[{i}][0]"))?)),
                    [a, b] => Ok(Text::Pair(text(a, format!("inputs[{i}][0]"))?, text(b, format!("inputs[{i}][1]"))?)),
                    _ => Err(Error::field(
                        format!("inputs[{i}]"),
                        format!("a text is [\"text\"] and a pair [\"a\", \"b\"]; got {} strings", pair.len()),
                    )),
                },
                one => Ok(Text::One(text(one, format!("inputs[{i}]"))?)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ClassifyInputs { texts, flat: false })
    }
}

/// `POST /classify`: per input, `[{"label", "score"}]` sorted by score, highest first.
/// A single string input answers with one flat list, as TEI does.
pub async fn classify(State(node): State<AppState>, JsonBody(raw): JsonBody<Value>) -> Result<Response, Error> {
    classify_as(node, raw, false).await
}

/// `POST /predict`: `/classify` with TEI's reading of `inputs` (two strings are a pair).
pub async fn predict(State(node): State<AppState>, JsonBody(raw): JsonBody<Value>) -> Result<Response, Error> {
    classify_as(node, raw, true).await
}

/// `parameters` as huggingface_hub's `text_classification` sends them.
#[derive(Debug, Default)]
struct HubClassify {
    /// Keep the `top_k` highest-scoring labels of each input.
    top_k: Option<usize>,
    /// Turn the model's raw scores into the answer's: `softmax`, `sigmoid` or `none`.
    function: Option<ScoreFunction>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ScoreFunction {
    Softmax,
    Sigmoid,
    None,
}

impl HubClassify {
    fn read(params: &Value) -> Result<Self, Error> {
        fields::check_in(params, fields::CLASSIFY_PARAMETERS, "parameters.")?;
        let top_k = match params.get("top_k").filter(|v| !v.is_null()) {
            None => None,
            Some(v) => match v.as_u64() {
                Some(k) if k >= 1 => Some(k as usize),
                _ => return Err(Error::field("parameters.top_k", format!("must be a positive integer, got {v}"))),
            },
        };
        let function = match params.get("function_to_apply").filter(|v| !v.is_null()) {
            None => None,
            Some(v) => Some(match v.as_str() {
                Some("softmax") => ScoreFunction::Softmax,
                Some("sigmoid") => ScoreFunction::Sigmoid,
                Some("none") => ScoreFunction::None,
                _ => return Err(Error::field("parameters.function_to_apply", format!("must be softmax, sigmoid or none, got {v}"))),
            }),
        };
        Ok(HubClassify { top_k, function })
    }

    /// One input's raw scores as the function asks, highest first, cut to `top_k`.
    fn apply(&self, mut row: Vec<(String, f32)>) -> Vec<(String, f32)> {
        match self.function {
            Some(ScoreFunction::Softmax) => {
                let max = row.iter().map(|r| r.1).fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|r| (r.1 - max).exp()).sum();
                row.iter_mut().for_each(|r| r.1 = (r.1 - max).exp() / sum);
            }
            Some(ScoreFunction::Sigmoid) => row.iter_mut().for_each(|r| r.1 = 1.0 / (1.0 + (-r.1).exp())),
            Some(ScoreFunction::None) | None => {}
        }
        row.sort_by(|a, b| b.1.total_cmp(&a.1));
        if let Some(k) = self.top_k {
            row.truncate(k);
        }
        row
    }
}

async fn classify_as(node: AppState, raw: Value, tei_pairs: bool) -> Result<Response, Error> {
    fields::check(&raw, fields::PREDICT)?;
    // The Hub's text-classification request: `{"inputs", "parameters"}`, answered in its
    // shape too (a list per input, even for one).
    let hub = match raw.get("parameters") {
        None => None,
        Some(Value::Null) => Some(HubClassify::default()),
        Some(p) => Some(HubClassify::read(p)?),
    };
    let req: ClassifyRequest = from_value(raw)?;
    let slot = node.registry.resolve(req.model.as_deref(), ModelKind::Classify)?;
    slot.record_on_span();
    let inputs = tracing::info_span!("validate").in_scope(|| ClassifyInputs::read(&req.inputs, tei_pairs, &node.config.limits))?;
    if req.raw_scores && hub.as_ref().is_some_and(|h| h.function.is_some()) {
        return Err(Error::field("parameters.function_to_apply", "cannot be combined with raw_scores (which is function_to_apply: none)"));
    }
    let service = slot.ready_service(node.ready_wait()).await?;
    let truncate = truncation(&node, req.truncate, req.truncation_direction);
    let raw_scores = req.raw_scores || hub.as_ref().is_some_and(|h| h.function.is_some());
    let (scored, encoded) = service.classify(slot.name(), inputs.texts, truncate, raw_scores).await?;
    let scored: Vec<Vec<(String, f32)>> = match &hub {
        Some(h) => scored.into_iter().map(|row| h.apply(row)).collect(),
        None => scored,
    };
    let mut rows: Vec<Vec<LabelScore>> =
        scored.into_iter().map(|row| row.into_iter().map(|(label, score)| LabelScore { label, score }).collect()).collect();
    if inputs.flat && hub.is_none() {
        // A single input answers with one flat list, as TEI does.
        return Ok(answer(rows.pop().unwrap_or_default(), &slot, &encoded, "classify", None));
    }
    Ok(answer(&rows, &slot, &encoded, "classify", None))
}

/// `POST /similarity` body (TEI's). The fields are `fields::SIMILARITY`.
#[derive(Debug, Deserialize)]
struct SimilarityRequest {
    inputs: SimilarityInputs,
    #[serde(default)]
    parameters: Option<SimilarityParameters>,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimilarityInputs {
    source_sentence: String,
    sentences: Vec<String>,
}

/// `parameters` of `/similarity`; the fields are `fields::SIMILARITY_PARAMETERS`.
#[derive(Debug, Default, Deserialize)]
struct SimilarityParameters {
    #[serde(default)]
    prompt_name: Option<String>,
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    truncation_direction: Option<Direction>,
}

/// `POST /similarity` (TEI's): the cosine of `source_sentence`'s embedding with each of
/// `sentences`', in their order: what `InferenceClient.sentence_similarity` and
/// sentence-transformers' `util.cos_sim` give.
pub async fn similarity(State(node): State<AppState>, headers: HeaderMap, JsonBody(raw): JsonBody<Value>) -> Result<Response, Error> {
    fields::check(&raw, fields::SIMILARITY)?;
    if let Some(p) = raw.get("parameters").filter(|p| !p.is_null()) {
        fields::check_in(p, fields::SIMILARITY_PARAMETERS, "parameters.")?;
    }
    let SimilarityRequest { inputs: SimilarityInputs { source_sentence: source, sentences }, parameters, model } = from_value(raw)?;
    let params = parameters.unwrap_or_default();
    if source.is_empty() {
        return Err(Error::EmptyInput("inputs.source_sentence".into()));
    }
    if sentences.is_empty() {
        return Err(Error::EmptyInput("inputs.sentences".into()));
    }
    if let Some(i) = sentences.iter().position(String::is_empty) {
        return Err(Error::EmptyInput(format!("inputs.sentences[{i}]")));
    }
    let model = model.filter(|m| !m.is_empty());
    let texts = std::iter::once(source).chain(sentences).collect();
    let req = EmbedRequest {
        inputs: Inputs { texts, single: false },
        normalize: true,
        truncate: params.truncate,
        truncation_direction: params.truncation_direction,
        model,
        prompt_name: params.prompt_name,
        dimensions: None,
    };
    let (slot, encoder, texts, truncate) = prepare_embed(&node, req).await?;
    let (encoded, cache) = cached::encode(&node, &slot, &encoder, texts, truncate, true, Directive::from_headers(&headers)).await?;
    let (source, others) = encoded.rows.split_first().ok_or_else(|| Error::Internal("the encoder answered no rows".into()))?;
    let scores: Vec<f32> = others.iter().map(|row| row.iter().zip(source).map(|(a, b)| a * b).sum()).collect();
    Ok(answer(&scores, &slot, &encoded, "embed", cache))
}

/// `POST /rerank` body (TEI). The fields are `fields::RERANK`.
#[derive(Debug, Deserialize)]
pub struct RerankRequest {
    pub query: String,
    pub texts: Vec<String>,
    #[serde(default)]
    pub raw_scores: bool,
    #[serde(default)]
    pub return_text: bool,
    #[serde(default)]
    pub truncate: Option<bool>,
    #[serde(default)]
    pub truncation_direction: Option<Direction>,
    #[serde(default)]
    pub model: Option<String>,
}

/// One ranked text, as TEI answers `/rerank`.
#[derive(Debug, Serialize)]
struct Ranked {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    score: f32,
}

/// The labels a classify model reports (one for a cross-encoder).
fn label_count(slot: &ModelSlot) -> Option<usize> {
    slot.facts().details.get("labels").and_then(Value::as_array).map(Vec::len)
}

/// `POST /rerank`: each text scored against the query by a cross-encoder (a classify model
/// with one label: sigmoid of its logit, or the logit with `raw_scores`), most relevant
/// first, as TEI and sentence-transformers' `CrossEncoder.rank` answer.
pub async fn rerank(State(node): State<AppState>, JsonBody(raw): JsonBody<Value>) -> Result<Response, Error> {
    fields::check(&raw, fields::RERANK)?;
    let req: RerankRequest = from_value(raw)?;
    let slot = match req.model.as_deref() {
        Some(name) => node.registry.resolve(Some(name), ModelKind::Classify)?,
        None => node
            .registry
            .slots()
            .iter()
            .find(|s| s.config.kind == ModelKind::Classify && label_count(s) == Some(1))
            .map(SlotRef::unpinned)
            .ok_or_else(|| {
                Error::field(
                    "model",
                    "no re-ranker is served: a cross-encoder is a classify model with one label (a BertForSequenceClassification folder)",
                )
            })?,
    };
    slot.record_on_span();
    if req.query.is_empty() {
        return Err(Error::EmptyInput("query".into()));
    }
    let pairs: Vec<Value> = req.texts.iter().map(|t| json!([req.query, t])).collect();
    if pairs.is_empty() {
        return Err(Error::EmptyInput("texts".into()));
    }
    let inputs = ClassifyInputs::read(&Value::Array(pairs), false, &node.config.limits).map_err(|e| match e {
        Error::EmptyInput(_) => Error::EmptyInput("texts".into()),
        other => other,
    })?;
    let service = slot.ready_service(node.ready_wait()).await?;
    if let Some(n) = label_count(&slot).filter(|&n| n != 1) {
        return Err(Error::field("model", format!("model {} has {n} labels; a re-ranker (cross-encoder) has one", slot.name())));
    }
    let truncate = truncation(&node, req.truncate, req.truncation_direction);
    let (scored, encoded) = service.classify(slot.name(), inputs.texts, truncate, req.raw_scores).await?;
    let mut ranked: Vec<Ranked> = scored
        .into_iter()
        .enumerate()
        .map(|(index, row)| Ranked { index, text: req.return_text.then(|| req.texts[index].clone()), score: row.first().map_or(f32::NAN, |r| r.1) })
        .collect();
    ranked.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.index.cmp(&b.index)));
    Ok(answer(&ranked, &slot, &encoded, "classify", None))
}
