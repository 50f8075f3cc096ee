//! Constrained decoding: a grammar (a JSON schema, "any JSON object") turned into a mask
//! over the vocabulary at every step, so the model can only write text the grammar allows.
//!
//! The grammar → automaton → token-mask part is `llguidance` (the crate mistral.rs and
//! vLLM use for the same job). What this module owns is the bridge: each token's bytes as
//! the model's tokenizer defines them (`TokenTable`), built once per loaded model, and a
//! per-request `Constraint` that the sampler asks for a mask and tells what was picked.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A document valid against this JSON schema (`response_format: {"type": "json_schema"}`).
    JsonSchema(Value),
    /// Text matching this regular expression, whole (TGI's `grammar: {"type": "regex"}`).
    Regex(String),
}

impl Grammar {
    fn top_level(&self) -> TopLevelGrammar {
        let schema = match self {
            Grammar::JsonObject => serde_json::json!({"type": "object"}),
            Grammar::JsonSchema(schema) => schema.clone(),
            Grammar::Regex(rx) => return TopLevelGrammar::from_regex(rx),
        };
        // Compact separators (no free whitespace between tokens): a small model given
        // free whitespace can spend its whole budget on newlines.
        let mut schema = schema;
        if let Value::Object(map) = &mut schema {
            map.entry("x-guidance")
                .or_insert_with(|| serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}));
        }
        TopLevelGrammar::from_json_schema(schema)
    }
}

/// Every token's bytes, and the parser factory llguidance builds over them. Built once when
/// a model loads (it walks the whole vocabulary).
pub struct TokenTable {
    env: TokEnv,
    factory: ParserFactory,
}

/// The `TokenizerEnv` llguidance asks for: the trie, and a tokenizer for text the grammar
/// itself forces. Greedy longest-match over the trie is a valid (if not always canonical)
/// tokenization, which is all llguidance needs without forced tokens.
struct TrieEnv {
    trie: TokTrie,
}

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// The byte that marks a special token's bytes (`<|im_end|>`, `</s>`) in a token table:
/// such tokens never match grammar text.
pub const SPECIAL: u8 = TokTrie::SPECIAL_TOKEN_MARKER;

impl TokenTable {
    /// A table from each token's bytes (special tokens prefixed with `SPECIAL`) and the
    /// tokens that end a sequence.
    pub fn new(token_bytes: &[Vec<u8>], eos: &[u32]) -> Result<Arc<Self>, String> {
        let first = *eos.first().ok_or("the model names no end-of-sequence token")?;
        let info = TokRxInfo::new(token_bytes.len() as u32, first);
        let trie = TokTrie::from(&info, token_bytes).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(TrieEnv { trie });
        let mut factory = ParserFactory::new(&env, InferenceCapabilities::default(), &llguidance::earley::SlicedBiasComputer::general_slices())
            .map_err(|e| format!("cannot build the grammar engine over the vocabulary: {e}"))?;
        factory.quiet();
        Ok(Arc::new(TokenTable { env, factory }))
    }

    /// Tokens in the table.
    pub fn len(&self) -> usize {
        self.env.tok_trie().vocab_size()
    }

    /// Whether the table is empty (never, for a loaded model).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `id` is a special token (`</s>`, `<|im_end|>`): its bytes are its name, not text.
    pub fn is_special(&self, id: u32) -> bool {
        let trie = self.env.tok_trie();
        (id as usize) < trie.vocab_size() && trie.token(id).first() == Some(&SPECIAL)
    }

    /// The bytes token `id` stands for; a special token's own name (`<|im_end|>`), without
    /// the marker. Empty for an id outside the vocabulary.
    pub fn bytes(&self, id: u32) -> &[u8] {
        let trie = self.env.tok_trie();
        if id as usize >= trie.vocab_size() {
            return &[];
        }
        let b = trie.token(id);
        b.strip_prefix(&[SPECIAL]).unwrap_or(b)
    }

    /// Compiles a grammar for one request. The error names what is wrong with the schema.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, String> {
        let parser = self.factory.create_parser(grammar.top_level()).map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Constraint { matcher })
    }
}

/// One request's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// Sets every logit the grammar forbids now to -inf. Returns whether any token is left.
    /// Logits past the vocabulary (an output layer padded beyond it) are never allowed.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<bool, String> {
        let allowed = self.matcher.compute_mask_or_eos().map_err(|e| e.to_string())?;
        let words = allowed.as_slice();
        let mut any = false;
        // 32 tokens a word, bit j of word w for token 32w + j; whole words at a time.
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            match words.get(w).copied().unwrap_or(0) {
                0 => chunk.fill(f32::NEG_INFINITY),
                u32::MAX if chunk.len() == 32 => any |= chunk.iter().any(|l| *l > f32::NEG_INFINITY),
                bits => {
                    for (j, l) in chunk.iter_mut().enumerate() {
                        if bits >> j & 1 == 1 {
                            any |= *l > f32::NEG_INFINITY;
                        } else {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
        Ok(any)
    }

    /// Whether the grammar allows `token` next: the cheap check of one token, where `mask`
    /// computes the whole vocabulary's set.
    pub fn allows(&mut self, token: u32) -> bool {
        self.matcher.validate_tokens(&[token]).is_ok_and(|n| n == 1)
    }

    /// The first token the grammar allows now (when every allowed token's logit is -inf).
    pub fn first_allowed(&mut self) -> Option<u32> {
        let allowed = self.matcher.compute_mask_or_eos().ok()?;
        (0..allowed.len() as u32).find(|&t| allowed.is_allowed(t))
    }

    /// Advances past the token the sampler picked.
    pub fn accept(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// The grammar is complete and allows nothing more (the sequence ends here).
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// GPT-2's byte-level alphabet reversed: the byte each printable stand-in character means.
/// (Bytes that are printable Latin-1 stand for themselves; the rest were shifted to U+0100
/// onwards, in byte order.)
fn byte_level_chars() -> std::collections::HashMap<char, u8> {
    let mut map = std::collections::HashMap::with_capacity(256);
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        let c = if printable {
            char::from(b)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).unwrap_or('\u{FFFD}')
        };
        map.insert(c, b);
    }
    map
}

/// How a vocabulary writes bytes in its pieces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PieceStyle {
    /// SentencePiece: `▁` is a space, `<0xAB>` byte pieces are one byte.
    SentencePiece,
    /// GPT-2 byte-level BPE: every byte is written as one printable character.
    ByteLevel,
}

/// A token's bytes from its piece, as the tokenizer's decoder would produce them.
pub fn piece_bytes(piece: &str, style: PieceStyle, special: bool, byte_chars: &std::collections::HashMap<char, u8>) -> Vec<u8> {
    if special {
        let mut b = vec![SPECIAL];
        b.extend_from_slice(piece.as_bytes());
        return b;
    }
    match style {
        PieceStyle::SentencePiece => {
            if piece.len() == 6 && piece.starts_with("<0x") && piece.ends_with('>') {
                if let Ok(b) = u8::from_str_radix(&piece[3..5], 16) {
                    return vec![b];
                }
            }
            piece.replace('▁', " ").into_bytes()
        }
        PieceStyle::ByteLevel => match piece.chars().map(|c| byte_chars.get(&c).copied()).collect::<Option<Vec<u8>>>() {
            Some(bytes) => bytes,
            // Not written in the byte alphabet (a user-defined token): its text as is.
            None => piece.as_bytes().to_vec(),
        },
    }
}

/// Every token's bytes for a vocabulary of pieces.
pub fn table_bytes(pieces: &[String], style: PieceStyle, is_special: impl Fn(usize) -> bool) -> Vec<Vec<u8>> {
    let chars = byte_level_chars();
    pieces.iter().enumerate().map(|(i, p)| piece_bytes(p, style, is_special(i), &chars)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy vocabulary: single characters of JSON, a few words, and an EOS.
    fn table() -> Arc<TokenTable> {
        let mut pieces: Vec<String> = "{}[]\":, 0123456789abcdefghijklmnopqrstuvwxyz".chars().map(String::from).collect();
        pieces.extend(["true", "false", "null", "\"name\"", "</s>"].map(String::from));
        let eos = pieces.len() as u32 - 1;
        let bytes = table_bytes(&pieces, PieceStyle::SentencePiece, |i| i as u32 == eos);
        TokenTable::new(&bytes, &[eos]).unwrap()
    }

    fn id(t: &TokenTable, s: &str) -> u32 {
        (0..t.len() as u32).find(|&i| t.bytes(i) == s.as_bytes()).unwrap()
    }

    #[test]
    fn a_schema_masks_everything_but_what_it_allows() {
        let t = table();
        let schema =
            serde_json::json!({"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"], "additionalProperties": false});
        let mut c = t.compile(&Grammar::JsonSchema(schema)).unwrap();
        let mut logits = vec![0.0f32; t.len()];
        c.mask(&mut logits).unwrap();
        let open = id(&t, "{");
        assert!(logits[open as usize].is_finite());
        assert_eq!(logits.iter().filter(|l| l.is_finite()).count(), 1, "only {{ can start the object");
        for piece in ["{", "\"", "a", "\"", ":", " ", "true", "}"] {
            // Logits for more tokens than the vocabulary: the extra ones are never allowed.
            let mut logits = vec![0.0f32; t.len() + 40];
            c.mask(&mut logits).unwrap();
            let tok = id(&t, piece);
            assert!(logits[tok as usize].is_finite(), "{piece:?} must be allowed here");
            assert!(logits[t.len()..].iter().all(|l| *l == f32::NEG_INFINITY));
            let allowed: Vec<u32> = (0..t.len() as u32).filter(|&i| logits[i as usize].is_finite()).collect();
            assert!((0..t.len() as u32).all(|i| c.allows(i) == allowed.contains(&i)), "allows() agrees with the mask");
            c.accept(tok).unwrap();
        }
        // The object is complete: only the end of the sequence is left.
        let mut logits = vec![0.0f32; t.len()];
        c.mask(&mut logits).unwrap();
        let finite: Vec<usize> = (0..logits.len()).filter(|&i| logits[i].is_finite()).collect();
        assert!(c.is_finished() || finite == vec![t.len() - 1], "{finite:?}");
    }

    #[test]
    fn an_invalid_schema_is_refused_with_a_reason() {
        let t = table();
        let err = t.compile(&Grammar::JsonSchema(serde_json::json!({"type": "no-such-type"}))).err().unwrap();
        assert!(!err.is_empty());
    }

    #[test]
    fn byte_level_pieces_become_their_bytes() {
        let chars = byte_level_chars();
        assert_eq!(chars.len(), 256);
        // "Ġ" is GPT-2's space, "Ċ" its newline.
        assert_eq!(piece_bytes("Ġhello", PieceStyle::ByteLevel, false, &chars), b" hello");
        assert_eq!(piece_bytes("Ċ", PieceStyle::ByteLevel, false, &chars), b"\n");
        assert_eq!(piece_bytes("<0x0A>", PieceStyle::SentencePiece, false, &chars), b"\n");
        assert_eq!(piece_bytes("▁the", PieceStyle::SentencePiece, false, &chars), b" the");
        assert_eq!(piece_bytes("<|im_end|>", PieceStyle::ByteLevel, true, &chars)[0], SPECIAL);
    }
}
