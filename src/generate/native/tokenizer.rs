//! The tokenizer a GGUF file carries in its metadata, and incremental detokenization.
//!
//! Built the way mistral.rs builds it from the same metadata, so both engines see the same
//! tokens for the same prompt: `gpt2` files are byte-level BPE behind a fixed split regex
//! (mistral.rs ignores `tokenizer.ggml.pre`); `llama` files are a Unigram model with byte
//! fallback. Every token whose type is not "normal" (control, byte, unused...) is a special
//! token, matched whole in the text. Nothing is added around a prompt: a BOS appears only if
//! the chat template writes it.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// The split regex mistral.rs applies to every `gpt2` GGUF tokenizer.
const GPT2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A GGUF model's tokenizer with its special token ids.
pub struct GgufTokenizer {
    tokenizer: Tokenizer,
    pub eos: Vec<u32>,
    pub bos: Option<u32>,
}

fn meta<'a>(c: &'a Content, key: &str) -> Result<&'a Value, String> {
    c.metadata.get(key).ok_or_else(|| format!("the GGUF has no {key}"))
}

fn strings(v: &Value, key: &str) -> Result<Vec<String>, String> {
    v.to_vec()
        .map_err(|e| format!("{key}: {e}"))?
        .iter()
        .map(|s| s.to_string().cloned().map_err(|e| format!("{key}: {e}")))
        .collect()
}

fn id(c: &Content, key: &str) -> Option<u32> {
    c.metadata.get(key).and_then(|v| v.to_u32().ok())
}

impl GgufTokenizer {
    /// Builds the tokenizer from `tokenizer.ggml.*` metadata.
    pub fn from_gguf(c: &Content) -> Result<Self, String> {
        let model = meta(c, "tokenizer.ggml.model")?.to_string().map_err(|e| e.to_string())?.clone();
        let tokens = strings(meta(c, "tokenizer.ggml.tokens")?, "tokenizer.ggml.tokens")?;
        let eos = id(c, "tokenizer.ggml.eos_token_id").ok_or("the GGUF has no tokenizer.ggml.eos_token_id")?;
        let bos = id(c, "tokenizer.ggml.bos_token_id");
        let unk = id(c, "tokenizer.ggml.unknown_token_id");
        let mut tokenizer = match model.as_str() {
            "gpt2" => {
                let merges: Vec<(String, String)> = strings(meta(c, "tokenizer.ggml.merges")?, "tokenizer.ggml.merges")?
                    .into_iter()
                    .map(|m| match m.split_once(' ') {
                        Some((a, b)) => (a.to_string(), b.to_string()),
                        None => (m, String::new()),
                    })
                    .collect();
                let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
                let mut builder = BPE::builder().vocab_and_merges(vocab, merges);
                if let Some(u) = unk {
                    builder = builder.unk_token(tokens[u as usize].clone());
                }
                let bpe = builder.build().map_err(|e| format!("cannot build the BPE tokenizer: {e}"))?;
                let mut t = Tokenizer::new(bpe);
                let split = Split::new(SplitPattern::Regex(GPT2_SPLIT.into()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| e.to_string())?;
                t.with_pre_tokenizer(Some(PreSequence::new(vec![
                    PreTokenizerWrapper::Split(split),
                    PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
                ])));
                t.with_decoder(Some(ByteLevel::new(false, false, false)));
                t.with_post_processor(Some(ByteLevel::new(false, false, false)));
                t
            }
            "llama" | "replit" => {
                let scores = meta(c, "tokenizer.ggml.scores")?.to_vec().map_err(|e| e.to_string())?;
                let vocab: Vec<(String, f64)> = tokens
                    .iter()
                    .zip(scores)
                    .map(|(t, s)| s.to_f32().map(|s| (t.clone(), s as f64)).map_err(|e| e.to_string()))
                    .collect::<Result<_, _>>()?;
                let unigram = Unigram::from(vocab, Some(unk.unwrap_or(0) as usize), true).map_err(|e| e.to_string())?;
                let mut t = Tokenizer::new(unigram);
                t.with_normalizer(Some(NormalizerSequence::new(vec![
                    NormalizerWrapper::Prepend(Prepend::new("▁".into())),
                    NormalizerWrapper::Replace(Replace::new(" ", "▁").map_err(|e| e.to_string())?),
                ])));
                t.with_decoder(Some(DecoderSequence::new(vec![
                    DecoderWrapper::Replace(Replace::new("▁", " ").map_err(|e| e.to_string())?),
                    DecoderWrapper::ByteFallback(ByteFallback::new()),
                    DecoderWrapper::Fuse(Fuse::new()),
                    DecoderWrapper::Strip(Strip::new(' ', 1, 0)),
                ])));
                t
            }
            other => return Err(format!("tokenizer model {other:?} is not supported (gpt2 or llama)")),
        };
        let mut special: Vec<AddedToken> = Vec::new();
        for i in [bos, Some(eos), unk].into_iter().flatten() {
            special.push(AddedToken::from(tokens[i as usize].clone(), true));
        }
        if let Ok(types) = meta(c, "tokenizer.ggml.token_type").and_then(|v| v.to_vec().map_err(|e| e.to_string())) {
            if types.len() == tokens.len() {
                for (i, ty) in types.iter().enumerate() {
                    if ty.to_i32().is_ok_and(|t| t != 1) {
                        special.push(AddedToken::from(tokens[i].clone(), true));
                    }
                }
            }
        }
        tokenizer.add_special_tokens(&special);
        Ok(GgufTokenizer { tokenizer, eos: vec![eos], bos })
    }

    /// The tokens of `text` (special tokens recognized, nothing added around it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.tokenizer.encode_fast(text, true).map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string())
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }
}
