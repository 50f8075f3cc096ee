//! The tokenizer a GGUF file carries in its metadata, built to give llama.cpp's tokens.
//!
//! Both engines use this one (mistral.rs's own GGUF conversion reads a `llama` vocabulary as
//! a Unigram model, which splits "Hello world" into six pieces where llama.cpp and
//! SentencePiece give two). The models are the `tokenizers` crate's; what this module adds
//! is how llama.cpp reads the metadata:
//!
//! - `llama` (SentencePiece, TinyLlama's): a BPE over the vocabulary's pieces whose merges
//!   are ranked by the merged piece's score — SentencePiece's BPE merges the adjacent pair
//!   whose union scores highest, which is what a BPE model applying merges in that order
//!   does (the same construction as transformers' `LlamaTokenizerFast`). Characters outside
//!   the vocabulary fall back to `<0xXX>` byte pieces; spaces become `▁`, and one `▁` is put
//!   in front of every stretch of text (`tokenizer.ggml.add_space_prefix`, default on).
//! - `gpt2` (byte-level BPE, SmolLM2's): the file's merges behind the split rules of its
//!   `tokenizer.ggml.pre`. Only the pre-tokenizer we test against llama.cpp's tokens is
//!   accepted (`smollm`); any other is refused at load, never served with approximately
//!   right tokens.
//!
//! Control and unknown tokens (`<s>`, `</s>`, `<|im_end|>`) are matched whole in a prompt
//! and left out of decoded text; user-defined tokens are matched whole and decoded as their
//! text; byte tokens are only ever produced by byte fallback. A prompt gets BOS in front
//! when the file asks for it (`tokenizer.ggml.add_bos_token`; by default on for `llama`
//! vocabularies, as in llama.cpp) unless it already starts with it.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};

use super::constrain::{table_bytes, PieceStyle};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// GPT-2's split rule, which SmolLM applies after splitting digits one by one.
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

/// A GGUF model's tokenizer with its special token ids.
pub struct GgufTokenizer {
    tokenizer: Tokenizer,
    /// Tokens that end a turn: EOS, and EOT/EOM where the file names them.
    pub eos: Vec<u32>,
    pub bos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    /// What the vocabulary is, for `/info` (`llama (SentencePiece)`, `gpt2 (smollm)`).
    pub kind: String,
    /// Every token's bytes as the decoder writes them (special tokens marked): what
    /// constrained decoding and log-probabilities need.
    token_bytes: Vec<Vec<u8>>,
}

fn meta<'a>(c: &'a Content, key: &str) -> Result<&'a Value, String> {
    c.metadata.get(key).ok_or_else(|| format!("the GGUF has no {key}"))
}

fn strings(v: &Value, key: &str) -> Result<Vec<String>, String> {
    v.to_vec().map_err(|e| format!("{key}: {e}"))?.iter().map(|s| s.to_string().cloned().map_err(|e| format!("{key}: {e}"))).collect()
}

fn id(c: &Content, key: &str) -> Option<u32> {
    c.metadata.get(key).and_then(|v| v.to_u32().ok())
}

fn flag(c: &Content, key: &str) -> Option<bool> {
    c.metadata.get(key).and_then(|v| v.to_bool().ok())
}

fn text(c: &Content, key: &str) -> Option<String> {
    c.metadata.get(key).and_then(|v| v.to_string().ok()).cloned()
}

/// SentencePiece's BPE as merges: for every piece, each split into two pieces of the
/// vocabulary, ranked by the whole piece's score (highest first), ties in vocabulary order
/// and then by the halves' ids — transformers' `SentencePieceExtractor` order.
fn spm_merges(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let ids: HashMap<&str, u32> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i as u32)).collect();
    let mut ranked: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        for (at, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (ids.get(&piece[..at]), ids.get(&piece[at..])) {
                ranked.push((scores[i], i as u32, l, r));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3)));
    ranked.into_iter().map(|(_, _, l, r)| (tokens[l as usize].clone(), tokens[r as usize].clone())).collect()
}

fn replace(from: &str, to: &str) -> Result<Replace, String> {
    Replace::new(from, to).map_err(|e| e.to_string())
}

fn split(pattern: &str) -> Result<PreTokenizerWrapper, String> {
    Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
        .map(PreTokenizerWrapper::Split)
        .map_err(|e| e.to_string())
}

impl GgufTokenizer {
    /// Builds the tokenizer from `tokenizer.ggml.*` metadata.
    pub fn from_gguf(c: &Content) -> Result<Self, String> {
        let model = text(c, "tokenizer.ggml.model").ok_or("the GGUF has no tokenizer.ggml.model")?;
        let tokens = strings(meta(c, "tokenizer.ggml.tokens")?, "tokenizer.ggml.tokens")?;
        let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| format!("tokenizer.ggml.token_type: {e}"))?
                .iter()
                .map(|t| t.to_i32().map_err(|e| format!("tokenizer.ggml.token_type: {e}")))
                .collect::<Result<_, _>>()?,
            None => vec![TYPE_NORMAL; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(format!("tokenizer.ggml.token_type has {} entries for {} tokens", types.len(), tokens.len()));
        }
        let token_id = |key: &str| -> Result<Option<u32>, String> {
            match id(c, key) {
                Some(i) if i as usize >= tokens.len() => Err(format!("{key} {i} is outside the vocabulary of {}", tokens.len())),
                other => Ok(other),
            }
        };
        let eos = token_id("tokenizer.ggml.eos_token_id")?.ok_or("the GGUF has no tokenizer.ggml.eos_token_id")?;
        let bos = token_id("tokenizer.ggml.bos_token_id")?;
        let unk = token_id("tokenizer.ggml.unknown_token_id")?;
        let mut end_of_turn = vec![eos];
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(t) = token_id(key)? {
                if !end_of_turn.contains(&t) {
                    end_of_turn.push(t);
                }
            }
        }

        let style = if model == "gpt2" { PieceStyle::ByteLevel } else { PieceStyle::SentencePiece };
        let is_special = |i: usize| types[i] == TYPE_CONTROL || types[i] == TYPE_UNKNOWN || Some(i as u32) == bos || i as u32 == eos;
        let token_bytes = table_bytes(&tokens, style, is_special);

        let (mut tokenizer, kind, default_bos) = match model.as_str() {
            "llama" => {
                let scores: Vec<f32> = meta(c, "tokenizer.ggml.scores")?
                    .to_vec()
                    .map_err(|e| e.to_string())?
                    .iter()
                    .map(|s| s.to_f32().map_err(|e| format!("tokenizer.ggml.scores: {e}")))
                    .collect::<Result<_, _>>()?;
                if scores.len() != tokens.len() {
                    return Err(format!("tokenizer.ggml.scores has {} entries for {} tokens", scores.len(), tokens.len()));
                }
                let merges = spm_merges(&tokens, &scores);
                let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
                let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
                if let Some(u) = unk {
                    builder = builder.unk_token(tokens[u as usize].clone());
                }
                let bpe = builder.build().map_err(|e| format!("cannot build the SentencePiece tokenizer: {e}"))?;
                let mut t = Tokenizer::new(bpe);
                let space_prefix = flag(c, "tokenizer.ggml.add_space_prefix").unwrap_or(true);
                let mut normalizers = Vec::new();
                if space_prefix {
                    normalizers.push(NormalizerWrapper::Prepend(Prepend::new("▁".into())));
                }
                normalizers.push(NormalizerWrapper::Replace(replace(" ", "▁")?));
                t.with_normalizer(Some(NormalizerSequence::new(normalizers)));
                let mut decoders = vec![
                    DecoderWrapper::Replace(replace("▁", " ")?),
                    DecoderWrapper::ByteFallback(ByteFallback::new()),
                    DecoderWrapper::Fuse(Fuse::new()),
                ];
                if space_prefix {
                    decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
                }
                t.with_decoder(Some(DecoderSequence::new(decoders)));
                (t, "llama (SentencePiece)".to_string(), true)
            }
            "gpt2" => {
                let pre = text(c, "tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
                let splits = match pre.as_str() {
                    "smollm" => vec![PreTokenizerWrapper::Digits(Digits::new(true)), split(GPT2_SPLIT)?],
                    other => {
                        return Err(format!(
                            "the GGUF's byte-level BPE pre-tokenizer {other:?} (tokenizer.ggml.pre) is not supported: \
                             smollm is (the pre-tokenizers we check against llama.cpp's tokens)"
                        ))
                    }
                };
                let merges: Vec<(String, String)> = strings(meta(c, "tokenizer.ggml.merges")?, "tokenizer.ggml.merges")?
                    .into_iter()
                    .map(|m| match m.split_once(' ') {
                        Some((a, b)) => Ok((a.to_string(), b.to_string())),
                        None => Err(format!("tokenizer.ggml.merges: {m:?} is not a pair")),
                    })
                    .collect::<Result<_, _>>()?;
                let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
                let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| format!("cannot build the BPE tokenizer: {e}"))?;
                let mut t = Tokenizer::new(bpe);
                let mut steps = splits;
                steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)));
                t.with_pre_tokenizer(Some(PreSequence::new(steps)));
                t.with_decoder(Some(ByteLevel::new(false, false, false)));
                (t, format!("gpt2 ({pre})"), false)
            }
            other => {
                return Err(format!(
                "the GGUF's tokenizer model {other:?} (tokenizer.ggml.model) is not supported: llama (SentencePiece) and gpt2 (byte-level BPE) are"
            ))
            }
        };

        // Whole-token matches: control and unknown tokens are special (dropped from decoded
        // text), user-defined ones are text. Both match on the raw prompt, as in llama.cpp.
        let mut added = Vec::new();
        for (i, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
            let special = is_special(i);
            if special || *ty == TYPE_USER_DEFINED {
                added.push(AddedToken::from(tok.clone(), special).normalized(false));
            }
        }
        tokenizer.add_tokens(&added);
        Ok(GgufTokenizer {
            tokenizer,
            eos: end_of_turn,
            bos,
            add_bos: bos.is_some() && flag(c, "tokenizer.ggml.add_bos_token").unwrap_or(default_bos),
            add_eos: flag(c, "tokenizer.ggml.add_eos_token").unwrap_or(false),
            kind,
            token_bytes,
        })
    }

    /// A prompt's tokens as llama.cpp gives them to the model: special tokens recognized,
    /// BOS (and EOS) added when the file asks for them.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut ids = self.encode_plain(text)?;
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        if self.add_eos {
            ids.push(self.eos[0]);
        }
        Ok(ids)
    }

    /// The tokens of `text` alone, nothing added around it (llama.cpp's tokenizer test
    /// vectors are made this way).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, String> {
        self.tokenizer.encode_fast(text, false).map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string())
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// Tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Every token's bytes (special tokens marked with `constrain::SPECIAL`).
    pub fn token_bytes(&self) -> &[Vec<u8>] {
        &self.token_bytes
    }

    /// Whether prompts get BOS in front.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }
}
