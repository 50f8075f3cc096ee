//! A classifier declared in config: labels with example texts, scored by cosine similarity
//! to each label's centroid in the resident embedding model's space.
//!
//! Centroids are computed once, at warm-up, through the embedder's own queue; a request
//! costs one embedding plus a dot product per label. This is how the `router` classifier
//! that routing uses is defined: no training, no extra weights, editable in config.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::tokenize::Truncation;
use super::{Encoded, EncoderService};
use crate::error::Error;

/// A prototype classifier over an embedding model.
pub struct PrototypeClassifier {
    pub name: String,
    pub embedder: Arc<EncoderService>,
    pub labels: Vec<String>,
    centroids: Vec<Vec<f32>>,
    temperature: f32,
}

/// Default softmax temperature over cosine similarities.
pub const DEFAULT_TEMPERATURE: f32 = 0.05;

impl PrototypeClassifier {
    /// Embeds every example and averages each label's vectors into its unit centroid.
    pub async fn build(
        name: String,
        embedder: Arc<EncoderService>,
        examples: &BTreeMap<String, Vec<String>>,
        temperature: f32,
    ) -> Result<Self, String> {
        if examples.len() < 2 {
            return Err("a prototype classifier needs at least two labels".into());
        }
        let mut labels = Vec::new();
        let mut centroids = Vec::new();
        for (label, texts) in examples {
            if texts.is_empty() {
                return Err(format!("label {label:?} has no examples"));
            }
            // One chunk at a time keeps warm-up within the embedder's admission limit.
            let mut sum = vec![0f32; embedder.dims];
            for chunk in texts.chunks(32) {
                let out = embedder.encode_internal(chunk.to_vec(), Truncation::Right, true).await.map_err(|e| e.to_string())?;
                for row in out.rows {
                    sum.iter_mut().zip(row).for_each(|(s, x)| *s += x);
                }
            }
            super::pooling::l2_normalize(&mut sum);
            labels.push(label.clone());
            centroids.push(sum);
        }
        Ok(PrototypeClassifier { name, embedder, labels, centroids, temperature })
    }

    /// Per input, `(label, score)` sorted by score descending: softmax over cosine similarity
    /// divided by the temperature, or the cosine similarities themselves when `raw`.
    pub async fn classify(&self, texts: Vec<String>, truncate: Truncation, raw: bool) -> Result<(Vec<Vec<(String, f32)>>, Encoded), Error> {
        let encoded = self.embedder.encode(texts, truncate, true).await?;
        let scored = encoded.rows.iter().map(|v| self.score(v, raw)).collect();
        Ok((scored, encoded))
    }

    /// Scores one unit vector.
    pub fn score(&self, v: &[f32], raw: bool) -> Vec<(String, f32)> {
        let sims: Vec<f32> = self.centroids.iter().map(|c| c.iter().zip(v).map(|(a, b)| a * b).sum()).collect();
        let scores = if raw {
            sims
        } else {
            let t = self.temperature.max(1e-6);
            let m = sims.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = sims.iter().map(|s| ((s - m) / t).exp()).collect();
            let z: f32 = e.iter().sum();
            e.into_iter().map(|x| x / z).collect()
        };
        sort_scores(self.labels.iter().cloned().zip(scores).collect())
    }
}

/// Sorts `(label, score)` pairs by score, highest first (ties keep label order).
pub fn sort_scores(mut pairs: Vec<(String, f32)>) -> Vec<(String, f32)> {
    pairs.sort_by(|a, b| b.1.total_cmp(&a.1));
    pairs
}
