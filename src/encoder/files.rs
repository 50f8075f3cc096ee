//! Reading a sentence-transformers / Hugging Face encoder folder: `config.json`,
//! `sentence_bert_config.json` (max_seq_length), `1_Pooling/config.json` (pooling mode, in
//! both of sentence-transformers' formats), `modules.json` (a `Normalize` module),
//! `config_sentence_transformers.json` (named prompts such as bge's query instruction) and,
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

/// `1_Pooling/config.json`: current sentence-transformers writes `pooling_mode` (a name),
/// older versions (and most published models) one boolean per mode.
#[derive(Deserialize, Default)]
struct PoolingConfig {
    /// A mode's name, or a list of them (concatenated pooling).
    #[serde(default)]
    pooling_mode: Option<serde_json::Value>,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    include_prompt: Option<bool>,
}

impl PoolingConfig {
    /// The one mode the file asks for.
    fn mode(&self) -> Result<Pooling, String> {
        match &self.pooling_mode {
            Some(serde_json::Value::String(name)) => {
                return match name.as_str() {
                    "cls" => Ok(Pooling::Cls),
                    "mean" => Ok(Pooling::Mean),
                    "lasttoken" => Ok(Pooling::LastToken),
                    other => Err(format!("pooling_mode {other:?} is not supported (cls, mean, lasttoken)")),
                }
            }
            Some(serde_json::Value::Array(modes)) if modes.len() == 1 => {
                let one = PoolingConfig { pooling_mode: Some(modes[0].clone()), ..Default::default() };
                return one.mode();
            }
            Some(other) => return Err(format!("pooling_mode {other} is not supported: one of cls, mean, lasttoken (concatenated modes are not)")),
            None => {}
        }
        let flags = [
            ("pooling_mode_cls_token", self.pooling_mode_cls_token, Some(Pooling::Cls)),
            ("pooling_mode_mean_tokens", self.pooling_mode_mean_tokens, Some(Pooling::Mean)),
            ("pooling_mode_lasttoken", self.pooling_mode_lasttoken, Some(Pooling::LastToken)),
            ("pooling_mode_max_tokens", self.pooling_mode_max_tokens, None),
            ("pooling_mode_mean_sqrt_len_tokens", self.pooling_mode_mean_sqrt_len_tokens, None),
            ("pooling_mode_weightedmean_tokens", self.pooling_mode_weightedmean_tokens, None),
        ];
        let set: Vec<_> = flags.iter().filter(|f| f.1).collect();
        match set[..] {
            [(_, _, Some(mode))] => Ok(*mode),
            [(key, _, None)] => Err(format!("{key} is not supported (cls, mean, lasttoken)")),
            [] => Err("no pooling mode is set (cls, mean, lasttoken are supported)".into()),
            _ => Err(format!("{} are all set: concatenated pooling modes are not supported", set.iter().map(|f| f.0).collect::<Vec<_>>().join(", "))),
        }
    }
}

/// `config_sentence_transformers.json`: named prompts put in front of inputs.
#[derive(Deserialize, Default)]
struct SentenceTransformersConfig {
    #[serde(default)]
    prompts: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    default_prompt_name: Option<String>,
}

/// A model's named prompts (sentence-transformers' `prompts`): the text put in front of an
/// input when a request names the prompt, or always for the default one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prompts {
    pub named: BTreeMap<String, String>,
    /// Applied when a request names none (`default_prompt_name`).
    pub default: Option<String>,
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
    /// Named prompts from `config_sentence_transformers.json`.
    pub prompts: Prompts,
    /// The pooling config's `include_prompt` (false: prompt tokens are left out of a mean).
    pub include_prompt: bool,
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

/// Every file an encoder's loading reads when it exists. Each one there must be pinned by
/// the model's manifest entry: an unpinned `1_Pooling/config.json` would change what is
/// served (the pooling) without changing the digest the node reports.
pub const READS: &[&str] = &[
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
    "modules.json",
    "config_sentence_transformers.json",
];

/// Refuses a folder that holds a file the loader would read but `pinned` does not list.
pub fn check_pinned(dir: &Path, pinned: &[&str]) -> Result<(), String> {
    for f in READS {
        if dir.join(f).is_file() && !pinned.contains(f) {
            return Err(format!(
                "{} is read when it exists, but the manifest entry does not pin it: add it (edgenode models pin) or remove it",
                dir.join(f).display()
            ));
        }
    }
    Ok(())
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
        if !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            return Err("hidden_size is not a multiple of num_attention_heads".into());
        }
        let st = dir.join("sentence_bert_config.json");
        let st_max = if st.is_file() { read_json::<SentenceBertConfig>(&st)?.max_seq_length } else { None };
        let max_tokens = st_max.unwrap_or(config.max_position_embeddings).min(config.max_position_embeddings);
        let pool_path = dir.join("1_Pooling/config.json");
        let (pooling, include_prompt) = if pool_path.is_file() {
            let p: PoolingConfig = read_json(&pool_path)?;
            let mode = p.mode().map_err(|e| format!("{}: {e}", pool_path.display()))?;
            (Some(mode), p.include_prompt.unwrap_or(true))
        } else {
            (None, true)
        };
        let st_path = dir.join("config_sentence_transformers.json");
        let prompts = if st_path.is_file() {
            let c: SentenceTransformersConfig = read_json(&st_path)?;
            if let Some(d) = &c.default_prompt_name {
                if !c.prompts.contains_key(d) {
                    return Err(format!("{}: default_prompt_name {d:?} is not one of its prompts", st_path.display()));
                }
            }
            Prompts { named: c.prompts, default: c.default_prompt_name }
        } else {
            Prompts::default()
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
        let normalizes = modules.is_file() && read_json::<Vec<Module>>(&modules)?.iter().any(|m| m.kind.ends_with("models.Normalize"));
        Ok(EncoderFiles { config, max_tokens, pooling, labels, normalizes, prompts, include_prompt })
    }
}

fn is_classifier(config: &BertConfig) -> bool {
    config.architectures.as_ref().is_some_and(|a| a.iter().any(|s| s.ends_with("ForSequenceClassification")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(json: &str) -> Result<Pooling, String> {
        serde_json::from_str::<PoolingConfig>(json).unwrap().mode()
    }

    /// A file the loader reads must be pinned: an unpinned pooling config is refused by name.
    #[test]
    fn unpinned_files_the_loader_reads_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("1_Pooling")).unwrap();
        for f in ["config.json", "1_Pooling/config.json", "README.md"] {
            std::fs::write(dir.path().join(f), "{}").unwrap();
        }
        assert!(check_pinned(dir.path(), &["config.json", "1_Pooling/config.json"]).is_ok(), "README.md is never read");
        let err = check_pinned(dir.path(), &["config.json"]).unwrap_err();
        assert!(err.contains("1_Pooling/config.json") && err.contains("does not pin"), "{err}");
    }

    /// Both of sentence-transformers' formats: `pooling_mode` (current) and one boolean per
    /// mode (older, and most published models, bge's among them).
    #[test]
    fn reads_both_pooling_formats() {
        assert_eq!(mode(r#"{"embedding_dimension": 384, "pooling_mode": "cls", "include_prompt": true}"#), Ok(Pooling::Cls));
        assert_eq!(mode(r#"{"pooling_mode": ["mean"]}"#), Ok(Pooling::Mean));
        assert_eq!(mode(r#"{"pooling_mode": "lasttoken"}"#), Ok(Pooling::LastToken));
        assert_eq!(mode(r#"{"word_embedding_dimension": 384, "pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}"#), Ok(Pooling::Cls));
        assert_eq!(mode(r#"{"pooling_mode_mean_tokens": true}"#), Ok(Pooling::Mean));
        let err = mode(r#"{"pooling_mode": "max"}"#).unwrap_err();
        assert!(err.contains("\"max\""), "{err}");
        let err = mode(r#"{"pooling_mode": ["cls", "mean"]}"#).unwrap_err();
        assert!(err.contains("concatenated"), "{err}");
        let err = mode(r#"{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": true}"#).unwrap_err();
        assert!(err.contains("pooling_mode_cls_token, pooling_mode_mean_tokens"), "{err}");
        let err = mode(r#"{"pooling_mode_weightedmean_tokens": true}"#).unwrap_err();
        assert!(err.contains("pooling_mode_weightedmean_tokens"), "{err}");
    }
}
