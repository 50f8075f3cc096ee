//! The response cache: answers kept so that a repeated request does not run the model.
//!
//! The cheapest edge answer is the one no model computes. Two kinds of entry share one
//! memory budget: generation transcripts (replayed as the same pieces, so a hit streams or
//! collects through the same formatting as a fresh answer) and embedding vectors (one per
//! input text). Keys are sha256 digests over everything that decides the answer; the HTTP
//! side (`crate::http::cached`) says what goes into them.
//!
//! Semantic matching: a chat request's last user message is embedded by the resident
//! embedder, and a cached answer in the same *bucket* (same model, parameters and earlier
//! messages) whose message is at least `semantic_threshold` cosine-close answers it. The
//! index holds only entries that are still in the cache: eviction removes them from it.
//!
//! Bounds: `moka`'s TinyLFU cache, weighted by bytes. Each entry weighs at least
//! `max_bytes / max_entries`, so the weight bound `max_bytes` also bounds the entry count.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use moka::notification::RemovalCause;
use parking_lot::Mutex;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::config::CacheConfig;
use crate::generate::Transcript;
use crate::telemetry::metrics::METRICS;

/// A cache key or a semantic bucket: sha256 over length-prefixed parts.
pub type Key = [u8; 32];

/// Builds a key from parts; each part is length-prefixed, so `("ab", "c")` and `("a", "bc")`
/// differ.
pub struct KeyBuilder(Sha256);

impl KeyBuilder {
    pub fn new(kind: &str) -> Self {
        let mut b = KeyBuilder(Sha256::new());
        b.part(kind.as_bytes());
        b
    }

    pub fn part(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    pub fn text(&mut self, s: &str) -> &mut Self {
        self.part(s.as_bytes())
    }

    pub fn finish(self) -> Key {
        self.0.finalize().into()
    }
}

/// What a request's `Cache-Control` asks of the cache (RFC 9111's request directives).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    /// Answer from the cache when possible; store a fresh answer.
    Use,
    /// `no-cache`: do not answer from the cache, but store the fresh answer.
    Refresh,
    /// `no-store`: neither read nor write.
    Skip,
}

impl Directive {
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut directive = Directive::Use;
        for value in headers.get_all(axum::http::header::CACHE_CONTROL) {
            for d in value.to_str().unwrap_or("").split(',').map(|d| d.trim().to_ascii_lowercase()) {
                match d.as_str() {
                    "no-store" => return Directive::Skip,
                    "no-cache" => directive = Directive::Refresh,
                    _ => {}
                }
            }
        }
        directive
    }
}

/// What the cache did for one request (the `x-edgenode-cache` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    SemanticHit,
    Miss,
    /// The request asked not to be answered from the cache (`Cache-Control`), or is not
    /// reproducible (sampled without a `seed`).
    Bypass,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::SemanticHit => "semantic-hit",
            Outcome::Miss => "miss",
            Outcome::Bypass => "bypass",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Which part of the node a lookup is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Generate,
    Embed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Generate => "generate",
            Kind::Embed => "embed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One cached embedding: the vector as the encoder returned it and its input's tokens.
#[derive(Debug, Clone)]
pub struct Vector {
    pub values: Vec<f32>,
    pub tokens: usize,
    /// The batch compute time it shared in, seconds.
    pub compute_s: f64,
}

/// A cached answer.
#[derive(Debug, Clone)]
pub enum Answer {
    Generation { transcript: Transcript, prompt_tokens: usize },
    Embedding(Vector),
}

#[derive(Debug)]
struct Entry {
    answer: Answer,
    bytes: u32,
    /// Its place in the semantic index: bucket and the normalized message vector.
    semantic: Option<(Key, Arc<[f32]>)>,
}

/// Counts per kind and outcome, and what the hits saved.
#[derive(Default)]
struct Counters {
    outcomes: [[AtomicU64; 4]; 2],
    /// Model seconds not spent, in microseconds.
    saved_us: [AtomicU64; 2],
    /// Tokens not processed again.
    saved_tokens: [AtomicU64; 2],
    evicted: AtomicU64,
    expired: AtomicU64,
}

type Index = Arc<Mutex<HashMap<Key, Vec<(Key, Arc<[f32]>)>>>>;

/// The node's response cache.
pub struct ResponseCache {
    cfg: CacheConfig,
    store: moka::sync::Cache<Key, Arc<Entry>>,
    index: Index,
    counters: Arc<Counters>,
}

impl ResponseCache {
    /// `None` when `[cache] enabled` is off.
    pub fn new(cfg: &CacheConfig) -> Option<ResponseCache> {
        if !cfg.enabled {
            return None;
        }
        let index: Index = Arc::default();
        let counters = Arc::new(Counters::default());
        let floor = (cfg.max_bytes / cfg.max_entries.max(1)).clamp(1, u32::MAX as u64) as u32;
        let (on_evict, tally) = (index.clone(), counters.clone());
        let store = moka::sync::Cache::builder()
            .max_capacity(cfg.max_bytes)
            .weigher(move |_: &Key, e: &Arc<Entry>| e.bytes.max(floor))
            .time_to_live(Duration::from_secs(cfg.ttl_s))
            .eviction_listener(move |key: Arc<Key>, entry: Arc<Entry>, cause: RemovalCause| {
                match cause {
                    RemovalCause::Size => {
                        tally.evicted.fetch_add(1, Ordering::Relaxed);
                        METRICS.cache_evictions.with_label_values(&["size"]).inc();
                    }
                    RemovalCause::Expired => {
                        tally.expired.fetch_add(1, Ordering::Relaxed);
                        METRICS.cache_evictions.with_label_values(&["expired"]).inc();
                    }
                    RemovalCause::Explicit | RemovalCause::Replaced => {}
                }
                if let Some((bucket, vector)) = &entry.semantic {
                    let mut index = on_evict.lock();
                    if let Some(list) = index.get_mut(bucket) {
                        list.retain(|(k, v)| !(k == key.as_ref() && Arc::ptr_eq(v, vector)));
                        if list.is_empty() {
                            index.remove(bucket);
                        }
                    }
                }
            })
            .build();
        Some(ResponseCache { cfg: cfg.clone(), store, index, counters })
    }

    /// The semantic threshold, when semantic matching is on.
    pub fn semantic_threshold(&self) -> Option<f32> {
        self.cfg.semantic_threshold
    }

    /// The embed model for semantic matching (empty: the node's first).
    pub fn embedder(&self) -> &str {
        &self.cfg.embedder
    }

    /// The answer under `key`, if cached (and not expired).
    pub fn get(&self, key: &Key) -> Option<Answer> {
        self.store.get(key).map(|e| e.answer.clone())
    }

    /// The closest cached answer in `bucket` whose message vector's cosine with `vector`
    /// (both normalized) is at least the threshold, with that cosine.
    pub fn nearest(&self, bucket: &Key, vector: &[f32]) -> Option<(Answer, f32)> {
        let threshold = self.cfg.semantic_threshold?;
        let best = {
            let index = self.index.lock();
            let list = index.get(bucket)?;
            list.iter()
                .map(|(k, v)| (*k, v.iter().zip(vector).map(|(a, b)| a * b).sum::<f32>()))
                .filter(|(_, cos)| *cos >= threshold)
                .max_by(|a, b| a.1.total_cmp(&b.1))
        };
        let (key, cos) = best?;
        self.get(&key).map(|a| (a, cos))
    }

    /// Stores an answer; `semantic` places it in the semantic index too.
    pub fn put(&self, key: Key, answer: Answer, semantic: Option<(Key, Vec<f32>)>) {
        let vector_bytes = semantic.as_ref().map_or(0, |(_, v)| 64 + v.len() * 4);
        let bytes = match &answer {
            Answer::Generation { transcript, .. } => transcript.bytes(),
            Answer::Embedding(v) => 48 + v.values.len() * 4,
        } + vector_bytes
            + 96;
        let semantic = semantic.map(|(bucket, v)| (bucket, Arc::<[f32]>::from(v)));
        if let Some((bucket, vector)) = &semantic {
            let mut index = self.index.lock();
            let list = index.entry(*bucket).or_default();
            list.retain(|(k, _)| *k != key);
            list.push((key, vector.clone()));
        }
        let entry = Entry { answer, bytes: bytes.min(u32::MAX as usize) as u32, semantic };
        self.store.insert(key, Arc::new(entry));
    }

    /// Counts one lookup's outcome; a hit also counts what it saved.
    pub fn count(&self, kind: Kind, outcome: Outcome, saved_s: f64, saved_tokens: usize) {
        let c = &self.counters;
        c.outcomes[kind.index()][outcome.index()].fetch_add(1, Ordering::Relaxed);
        METRICS.cache_requests.with_label_values(&[kind.as_str(), &outcome.as_str().replace('-', "_")]).inc();
        if matches!(outcome, Outcome::Hit | Outcome::SemanticHit) {
            c.saved_us[kind.index()].fetch_add((saved_s * 1e6) as u64, Ordering::Relaxed);
            c.saved_tokens[kind.index()].fetch_add(saved_tokens as u64, Ordering::Relaxed);
            METRICS.cache_saved_seconds.with_label_values(&[kind.as_str()]).inc_by(saved_s);
        }
    }

    /// Applies pending evictions now (moka defers them), so entry counts and bytes are exact.
    pub fn settle(&self) {
        self.store.run_pending_tasks();
    }

    /// The cache section of `/stats`; `edge_usd_per_token` prices the tokens hits saved.
    pub fn stats(&self, edge_usd_per_token: f64) -> Value {
        self.settle();
        let c = &self.counters;
        let per_kind = |kind: Kind| {
            let n = |o: Outcome| c.outcomes[kind.index()][o.index()].load(Ordering::Relaxed);
            let (hit, semantic, miss, bypass) = (n(Outcome::Hit), n(Outcome::SemanticHit), n(Outcome::Miss), n(Outcome::Bypass));
            let lookups = hit + semantic + miss;
            let tokens = c.saved_tokens[kind.index()].load(Ordering::Relaxed);
            json!({
                "hits": hit,
                "semantic_hits": semantic,
                "misses": miss,
                "bypassed": bypass,
                "hit_rate": if lookups > 0 { (hit + semantic) as f64 / lookups as f64 } else { 0.0 },
                "model_seconds_saved": c.saved_us[kind.index()].load(Ordering::Relaxed) as f64 / 1e6,
                "tokens_saved": tokens,
                "edge_cost_saved_usd": tokens as f64 * edge_usd_per_token,
            })
        };
        json!({
            "enabled": true,
            "entries": self.store.entry_count(),
            "weighted_bytes": self.store.weighted_size(),
            "max_entries": self.cfg.max_entries,
            "max_bytes": self.cfg.max_bytes,
            "ttl_s": self.cfg.ttl_s,
            "semantic_threshold": self.cfg.semantic_threshold,
            "evicted": c.evicted.load(Ordering::Relaxed),
            "expired": c.expired.load(Ordering::Relaxed),
            "generate": per_kind(Kind::Generate),
            "embed": per_kind(Kind::Embed),
        })
    }

    /// Refreshes the entry and byte gauges (at scrape time).
    pub fn export_gauges(&self) {
        self.settle();
        METRICS.cache_entries.set(self.store.entry_count() as i64);
        METRICS.cache_bytes.set(self.store.weighted_size() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::engine::FinishReason;

    fn transcript(text: &str) -> Transcript {
        Transcript { pieces: vec![(text.to_string(), vec![])], completion_tokens: 3, reason: FinishReason::Stop, end: None, compute_s: 0.5 }
    }

    fn cache(max_entries: u64, max_bytes: u64, threshold: Option<f32>) -> ResponseCache {
        let cfg = CacheConfig { enabled: true, max_entries, max_bytes, ttl_s: 60, semantic_threshold: threshold, embedder: String::new() };
        ResponseCache::new(&cfg).unwrap()
    }

    #[test]
    fn keys_are_length_prefixed() {
        let k = |a: &str, b: &str| {
            let mut k = KeyBuilder::new("t");
            k.text(a).text(b);
            k.finish()
        };
        assert_ne!(k("ab", "c"), k("a", "bc"));
        assert_eq!(k("a", "bc"), k("a", "bc"));
    }

    #[test]
    fn request_directives() {
        let mut h = HeaderMap::new();
        assert_eq!(Directive::from_headers(&h), Directive::Use);
        h.insert("cache-control", "max-age=0, No-Cache".parse().unwrap());
        assert_eq!(Directive::from_headers(&h), Directive::Refresh);
        h.append("cache-control", "no-store".parse().unwrap());
        assert_eq!(Directive::from_headers(&h), Directive::Skip);
    }

    #[test]
    fn the_byte_bound_also_bounds_entries() {
        let c = cache(4, 1 << 20, None);
        for i in 0..50u8 {
            c.put([i; 32], Answer::Generation { transcript: transcript("x"), prompt_tokens: 1 }, None);
            c.settle();
        }
        assert!(c.store.entry_count() <= 4, "{} entries", c.store.entry_count());
        let c = cache(1000, 4096, None);
        for i in 0..50u8 {
            c.put([i; 32], Answer::Generation { transcript: transcript(&"y".repeat(900)), prompt_tokens: 1 }, None);
            c.settle();
        }
        assert!(c.store.weighted_size() <= 4096, "{} bytes", c.store.weighted_size());
        assert!(c.counters.evicted.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn nearest_finds_only_close_entries_of_the_same_bucket_and_forgets_evicted_ones() {
        let c = cache(100, 1 << 20, Some(0.9));
        let (a, b) = ([1u8; 32], [2u8; 32]);
        c.put([10; 32], Answer::Generation { transcript: transcript("near"), prompt_tokens: 1 }, Some((a, vec![1.0, 0.0])));
        let near = [0.95f32, (1.0f32 - 0.95 * 0.95).sqrt()];
        assert!(c.nearest(&a, &near).is_some());
        assert!(c.nearest(&a, &[0.0, 1.0]).is_none());
        assert!(c.nearest(&b, &near).is_none());
        c.store.invalidate(&[10; 32]);
        c.settle();
        assert!(c.nearest(&a, &near).is_none());
        assert!(c.index.lock().is_empty());
    }
}
