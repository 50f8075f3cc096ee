//! Reading a sentence-transformers / Hugging Face encoder folder: `config.json`,
//! `sentence_bert_config.json` (max_seq_length), `1_Pooling/config.json` (pooling mode) and,
//! for a `BertForSequenceClassification`, its `id2label`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::config::Pooling;

/// The parts of a BERT `config.json` the forward pass needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    /// Classifiers: label names by class index (`{"0": "negative", ...}`).
    #[serde(default)]
    pub id2label: Option<BTreeMap<String, String>>,
    /// Classifiers: `single_label_classification` (softmax) or `multi_label_classification` (sigmoid).
    #[serde(default)]
    pub problem_type: Option<String>,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

#[derive(Deserialize, Default)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

/// What a model folder says about itself.
#[derive(Debug, Clone)]
pub struct EncoderFiles {
    pub config: BertConfig,
    /// Most tokens per input, special tokens included.
    pub max_tokens: usize,
    /// The pooling the folder declares (`None` when it has no pooling config).
    pub pooling: Option<Pooling>,
    /// Class labels in index order, for sequence classifiers.
    pub labels: Option<Vec<String>>,
    /// The folder's sentence-transformers pipeline (`modules.json`) ends in `Normalize`:
    /// its embeddings are unit vectors whatever the request says, as in sentence-transformers.
    pub normalizes: bool,
}

#[derive(Deserialize)]
struct Module {
    #[serde(rename = "type")]
    kind: String,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} is not valid: {e}", path.display()))
}

impl EncoderFiles {
    /// Reads the folder's JSON files; weights and tokenizer are loaded elsewhere.
    pub fn read(dir: &Path) -> Result<Self, String> {
        let config: BertConfig = read_json(&dir.join("config.json"))?;
        if config.hidden_act != "gelu" && config.hidden_act != "gelu_new" && config.hidden_act != "gelu_pytorch_tanh" {
            return Err(format!("hidden_act {:?} is not supported (gelu variants only)", config.hidden_act));
        }
        if let Some(p) = &config.position_embedding_type {
            if p != "absolute" {
                return Err(format!("position_embedding_type {p:?} is not supported (absolute only)"));
            }
        }
        if config.hidden_size % config.num_attention_heads != 0 {
            return Err("hidden_size is not a multiple of num_attention_heads".into());
        }
        let st = dir.join("sentence_bert_config.json");
        let st_max = if st.is_file() { read_json::<SentenceBertConfig>(&st)?.max_seq_length } else { None };
        let max_tokens = st_max.unwrap_or(config.max_position_embeddings).min(config.max_position_embeddings);
        let pool_path = dir.join("1_Pooling/config.json");
        let pooling = if pool_path.is_file() {
            let p: PoolingConfig = read_json(&pool_path)?;
            if p.pooling_mode_cls_token {
                Some(Pooling::Cls)
            } else if p.pooling_mode_lasttoken {
                Some(Pooling::LastToken)
            } else if p.pooling_mode_mean_tokens {
                Some(Pooling::Mean)
            } else {
                return Err(format!("{}: no supported pooling mode (cls, mean, lasttoken)", pool_path.display()));
            }
        } else {
            None
        };
        let labels = match &config.id2label {
            Some(map) if is_classifier(&config) => {
                let mut pairs: Vec<(usize, String)> = map
                    .iter()
                    .map(|(k, v)| k.parse::<usize>().map(|i| (i, v.clone())))
                    .collect::<Result<_, _>>()
                    .map_err(|_| "id2label has a non-numeric key".to_string())?;
                pairs.sort();
                if pairs.iter().enumerate().any(|(i, (k, _))| i != *k) {
                    return Err("id2label must number its labels 0..n".into());
                }
                Some(pairs.into_iter().map(|(_, v)| v).collect())
            }
            _ => None,
        };
        let modules = dir.join("modules.json");
        let normalizes = modules.is_file()
            && read_json::<Vec<Module>>(&modules)?.iter().any(|m| m.kind.ends_with("models.Normalize"));
        Ok(EncoderFiles { config, max_tokens, pooling, labels, normalizes })
    }
}

fn is_classifier(config: &BertConfig) -> bool {
    config.architectures.as_ref().is_some_and(|a| a.iter().any(|s| s.ends_with("ForSequenceClassification")))
}
