//! What a ready model offers to requests: one variant per kind of service, and one method
//! per capability, so callers ask the service instead of matching on its kind.

use std::sync::Arc;

use crate::encoder::bert::class_scores;
use crate::encoder::prototype::{sort_scores, PrototypeClassifier};
use crate::encoder::tokenize::{Text, Truncation};
use crate::encoder::{Encoded, EncoderService, EncoderTask};
use crate::error::Error;
use crate::generate::GenerateService;

/// A warm model's entry point. Cloning is cheap (shared handles to actors).
#[derive(Clone)]
pub enum Service {
    /// A BERT encoder: embeddings, or logits of a sequence-classification head.
    Encoder(Arc<EncoderService>),
    /// A prototype classifier over an embedding model.
    Prototype(Arc<PrototypeClassifier>),
    /// A text generator.
    Generator(Arc<GenerateService>),
}

/// Labels with their scores, highest first, one list per input.
pub type Scored = Vec<Vec<(String, f32)>>;

impl Service {
    /// The encoder, for embeddings.
    pub fn encoder(&self, name: &str) -> Result<&Arc<EncoderService>, Error> {
        match self {
            Service::Encoder(e) => Ok(e),
            _ => Err(Error::Internal(format!("model {name} is not an encoder"))),
        }
    }

    /// The generator.
    pub fn generator(&self, name: &str) -> Result<&Arc<GenerateService>, Error> {
        match self {
            Service::Generator(g) => Ok(g),
            _ => Err(Error::Internal(format!("model {name} is not a generator"))),
        }
    }

    /// Scores each text against the model's labels: a sequence-classification head's
    /// probabilities (or logits, `raw`), or a prototype classifier's.
    /// Sentence pairs (`Text::Pair`) need a model that reads them: a sequence classifier
    /// (a cross-encoder); a prototype classifier refuses them by name.
    pub async fn classify(&self, name: &str, texts: Vec<Text>, truncate: Truncation, raw: bool) -> Result<(Scored, Encoded), Error> {
        match self {
            Service::Prototype(p) => {
                let singles = texts
                    .into_iter()
                    .map(|t| match t {
                        Text::One(s) => Ok(s),
                        Text::Pair(..) => Err(Error::field(
                            "inputs",
                            format!("model {name} is a prototype classifier: sentence pairs need a cross-encoder (a BertForSequenceClassification folder)"),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                p.classify(singles, truncate, raw).await
            }
            Service::Encoder(e) => {
                let EncoderTask::Classify { labels, multi_label } = &e.task else {
                    return Err(Error::Internal(format!("model {name} has no classifier head")));
                };
                let encoded = e.encode_texts(texts, truncate).await?;
                let scores = class_scores(&encoded.rows.concat(), labels.len(), *multi_label, raw);
                let scored = scores.into_iter().map(|row| sort_scores(labels.iter().cloned().zip(row).collect())).collect();
                Ok((scored, encoded))
            }
            Service::Generator(_) => Err(Error::Internal(format!("model {name} is a generator, not a classifier"))),
        }
    }

    /// How many handles to this version exist (this one included): 1 once every request
    /// and classifier that held it has let go, so its memory is about to be returned.
    pub fn holders(&self) -> usize {
        match self {
            Service::Encoder(e) => Arc::strong_count(e),
            Service::Prototype(p) => Arc::strong_count(p),
            Service::Generator(g) => Arc::strong_count(g),
        }
    }

    /// Work in the model now, for `/info` and `/metrics`.
    pub fn load(&self) -> serde_json::Value {
        match self {
            Service::Encoder(e) => serde_json::json!({"in_flight": e.in_flight()}),
            Service::Generator(g) => serde_json::json!({"running": g.running(), "waiting": g.waiting()}),
            Service::Prototype(_) => serde_json::json!({}),
        }
    }
}
