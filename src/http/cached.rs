//! The response cache on the request path: what goes into a key, and answering from it.
//!
//! A generation's key covers the model's exact version (name, version, digest), the prompt
//! as the model's tokens (so two requests that render to the same prompt share an entry,
//! whichever route and whether they stream), the completion budget, stop sequences and
//! every decoding parameter. Only reproducible requests take part: greedy decoding, or an
//! explicit `seed`. An embedding's key covers the model's version, the input text, the
//! truncation and normalization; each input of a request is looked up on its own.

use std::sync::Arc;
use std::time::Duration;

use crate::cache::{Answer, Directive, Key, KeyBuilder, Kind, Outcome, ResponseCache, Vector};
use crate::config::ModelKind;
use crate::encoder::tokenize::Truncation;
use crate::encoder::{Encoded, EncoderService};
use crate::error::Error;
use crate::generate::template::ChatMessage;
use crate::generate::{Decoding, GenerateService, Generation, Prepared, PromptInput};
use crate::models::registry::{ModelSlot, SlotRef};
use crate::node::Node;

/// What a generation request brings to the cache.
pub(crate) struct GenerationLookup<'a> {
    pub slot: &'a ModelSlot,
    /// The label of the version the request took (not the slot's current one: a request
    /// pinned to the previous version, or racing a switch, must not share the new one's
    /// entries).
    pub label: String,
    pub prompt: &'a PromptInput,
    pub decoding: Decoding,
    pub stops: Vec<String>,
    /// The request named a `seed` (sampling with one is reproducible).
    pub seeded: bool,
    pub directive: Directive,
}

/// Where the semantic index files a request, and its last user message's vector.
type Semantic = Option<(Key, Vec<f32>)>;

impl GenerationLookup<'_> {
    /// Everything but the prompt: model version, budget, stops and decoding.
    fn parameters(&self, kind: &str, prepared: &Prepared) -> KeyBuilder {
        let mut decoding = self.decoding.clone();
        if decoding.params.temperature == 0.0 {
            // Greedy decoding ignores the seed (a random one is drawn when none is given).
            decoding.params.seed = 0;
        }
        let mut k = KeyBuilder::new(kind);
        k.text(&self.label).part(&(prepared.max_tokens as u64).to_le_bytes()).text(&format!("{decoding:?}"));
        for stop in &self.stops {
            k.text(stop);
        }
        k
    }

    fn exact_key(&self, prepared: &Prepared) -> Key {
        let mut k = self.parameters("generate", prepared);
        let tokens: Vec<u8> = prepared.tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        k.part(&tokens);
        k.finish()
    }

    /// The semantic bucket (parameters and the messages before the last) and the last
    /// message, when the conversation ends with a user message.
    fn bucket(&self, prepared: &Prepared) -> Option<(Key, &str)> {
        let PromptInput::Chat(messages) = self.prompt else { return None };
        let (last, earlier) = messages.split_last()?;
        if last.role != "user" {
            return None;
        }
        let mut k = self.parameters("semantic", prepared);
        for ChatMessage { role, content } in earlier {
            k.text(role).text(content);
        }
        Some((k.finish(), last.content.as_str()))
    }
}

/// Starts a generation, or replays a cached one. The answer's `cache` field says which.
pub(crate) async fn start_generation(
    node: &Node,
    service: &GenerateService,
    lookup: GenerationLookup<'_>,
    prepared: Prepared,
) -> Result<Generation, Error> {
    let Some(cache) = node.cache.clone() else {
        let GenerationLookup { decoding, stops, .. } = lookup;
        let keep = decoding.keep_stop;
        return service.start(prepared, service.sampler(decoding).await?, stops, keep).await;
    };
    // The prompt's log-probabilities are not kept in a transcript: such a request runs.
    let reproducible = (lookup.decoding.params.temperature == 0.0 || lookup.seeded) && !lookup.decoding.prompt_logprobs;
    if !reproducible || lookup.directive == Directive::Skip {
        cache.count(Kind::Generate, Outcome::Bypass, 0.0, 0);
        let GenerationLookup { decoding, stops, .. } = lookup;
        let keep = decoding.keep_stop;
        let mut generation = service.start(prepared, service.sampler(decoding).await?, stops, keep).await?;
        generation.cache = Some(Outcome::Bypass.as_str());
        return Ok(generation);
    }
    let timeout = Duration::from_secs(node.config.limits.request_timeout_s);
    let key = lookup.exact_key(&prepared);
    let prompt_tokens = prepared.tokens.len();
    if lookup.directive == Directive::Use {
        if let Some(Answer::Generation { transcript, prompt_tokens: cached_prompt }) = cache.get(&key) {
            return Ok(replay(&cache, lookup.slot.name(), prompt_tokens, &transcript, cached_prompt, Outcome::Hit, timeout));
        }
    }
    let semantic = semantic_probe(node, &cache, &lookup, &prepared).await;
    if let (Some((bucket, vector)), Directive::Use) = (&semantic, lookup.directive) {
        if let Some((Answer::Generation { transcript, prompt_tokens: cached_prompt }, cosine)) = cache.nearest(bucket, vector) {
            tracing::debug!(cosine, "semantic cache hit");
            return Ok(replay(&cache, lookup.slot.name(), prompt_tokens, &transcript, cached_prompt, Outcome::SemanticHit, timeout));
        }
    }
    let outcome = if lookup.directive == Directive::Use { Outcome::Miss } else { Outcome::Bypass };
    cache.count(Kind::Generate, outcome, 0.0, 0);
    let GenerationLookup { decoding, stops, .. } = lookup;
    let keep = decoding.keep_stop;
    let mut generation = service.start(prepared, service.sampler(decoding).await?, stops, keep).await?;
    generation.cache = Some(outcome.as_str());
    let store = cache.clone();
    generation.record_into(Box::new(move |transcript| {
        store.put(key, Answer::Generation { transcript, prompt_tokens }, semantic);
    }));
    Ok(generation)
}

fn replay(
    cache: &ResponseCache,
    model: &str,
    prompt_tokens: usize,
    transcript: &crate::generate::Transcript,
    cached_prompt: usize,
    outcome: Outcome,
    timeout: Duration,
) -> Generation {
    cache.count(Kind::Generate, outcome, transcript.compute_s, cached_prompt + transcript.completion_tokens);
    let mut generation = Generation::replay(model, prompt_tokens, transcript, timeout);
    generation.cache = Some(outcome.as_str());
    generation
}

/// The semantic bucket and the last user message's vector, when semantic matching is on.
/// An embedder that fails only turns semantic matching off for this request.
async fn semantic_probe(node: &Node, cache: &ResponseCache, lookup: &GenerationLookup<'_>, prepared: &Prepared) -> Semantic {
    cache.semantic_threshold()?;
    let (bucket, text) = lookup.bucket(prepared)?;
    let name = Some(cache.embedder()).filter(|n| !n.is_empty());
    match embed_normalized(node, name, vec![text.to_string()]).await {
        Ok(v) => v.into_iter().next().map(|v| (bucket, v)),
        Err(e) => {
            tracing::warn!("the semantic cache cannot embed the last user message: {e}");
            None
        }
    }
}

/// Normalized pooled vectors of `texts` from an embed model (`name`, or the node's first),
/// cut at the model's limit: what semantic matching and shadow scoring compare.
pub(crate) async fn embed_normalized(node: &Node, name: Option<&str>, texts: Vec<String>) -> Result<Vec<Vec<f32>>, Error> {
    let slot = node.registry.resolve(name, ModelKind::Embed)?;
    let encoder = slot.ready_service(node.ready_wait()).await?.encoder(slot.name())?.clone();
    Ok(encoder.encode(texts, Truncation::Right, true).await?.rows)
}

/// Encodes texts to pooled vectors, answering each input the cache holds from it. The
/// outcome is `hit` only when every input was cached.
pub(crate) async fn encode(
    node: &Node,
    slot: &SlotRef<'_>,
    encoder: &Arc<EncoderService>,
    texts: Vec<String>,
    truncation: Truncation,
    normalize: bool,
    directive: Directive,
) -> Result<(Encoded, Option<&'static str>), Error> {
    let Some(cache) = node.cache.as_ref() else {
        return Ok((encoder.encode(texts, truncation, normalize).await?, None));
    };
    if directive == Directive::Skip {
        cache.count(Kind::Embed, Outcome::Bypass, 0.0, 0);
        return Ok((encoder.encode(texts, truncation, normalize).await?, Some(Outcome::Bypass.as_str())));
    }
    let label = slot.label();
    let keys: Vec<Key> = texts
        .iter()
        .map(|t| {
            let mut k = KeyBuilder::new("embed");
            k.text(&label).text(&format!("{truncation:?}")).part(&[normalize as u8]).text(t);
            k.finish()
        })
        .collect();
    let cached: Vec<Option<Vector>> = keys
        .iter()
        .map(|k| match (directive, cache.get(k)) {
            (Directive::Use, Some(Answer::Embedding(v))) => Some(v),
            _ => None,
        })
        .collect();
    let missing: Vec<usize> = (0..texts.len()).filter(|&i| cached[i].is_none()).collect();
    let (saved_s, saved_tokens) = cached.iter().flatten().fold((0.0f64, 0usize), |(s, t), v| (s.max(v.compute_s), t + v.tokens));
    let fresh = if missing.is_empty() {
        None
    } else {
        let texts: Vec<String> = missing.iter().map(|&i| texts[i].clone()).collect();
        Some(encoder.encode(texts, truncation, normalize).await?)
    };
    let mut rows = Vec::with_capacity(texts.len());
    let mut tokens = Vec::with_capacity(texts.len());
    let mut fresh_rows = fresh.as_ref().map(|f| f.rows.iter().zip(&f.tokens)).into_iter().flatten();
    for (i, hit) in cached.into_iter().enumerate() {
        match hit {
            Some(v) => {
                tokens.push(v.tokens);
                rows.push(v.values);
            }
            None => {
                let (row, &n) = fresh_rows.next().ok_or_else(|| Error::Internal("the encoder answered fewer rows than inputs".into()))?;
                let compute_s = fresh.as_ref().map_or(0.0, |f| f.compute_s);
                cache.put(keys[i], Answer::Embedding(Vector { values: row.clone(), tokens: n, compute_s }), None);
                tokens.push(n);
                rows.push(row.clone());
            }
        }
    }
    let outcome = match (directive, missing.is_empty()) {
        (Directive::Refresh, _) => Outcome::Bypass,
        (_, true) => Outcome::Hit,
        (_, false) => Outcome::Miss,
    };
    cache.count(Kind::Embed, outcome, if outcome == Outcome::Hit { saved_s } else { 0.0 }, saved_tokens);
    let encoded = match fresh {
        Some(f) => Encoded { rows, tokens, queue_s: f.queue_s, compute_s: f.compute_s, tokenize_s: f.tokenize_s },
        None => Encoded { rows, tokens, queue_s: 0.0, compute_s: 0.0, tokenize_s: 0.0 },
    };
    Ok((encoded, Some(outcome.as_str())))
}
