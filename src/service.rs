//! What a ready model offers to requests: one variant per kind of service.

use std::sync::Arc;

use crate::encoder::prototype::PrototypeClassifier;
use crate::encoder::EncoderService;
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
