//! GGUF tokenizers against llama.cpp's own token ids.
//!
//! The reference vectors are llama.cpp's (`tests/fixtures/vocab/`, see its README): for
//! TinyLlama's SentencePiece vocabulary, the test strings llama.cpp ships with their ids;
//! for SmolLM2's byte-level BPE (the default chat model), the ids llama.cpp gives for the same
//! strings on the default model's own file. Every tokenizer type the engines accept is here.

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use common::*;
use edgenode::generate::tokenizer::GgufTokenizer;

fn load(path: &Path) -> GgufTokenizer {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let content = Content::read(&mut f).unwrap();
    GgufTokenizer::from_gguf(&content).unwrap()
}

/// llama.cpp's format: inputs separated by `\n__ggml_vocab_test__\n`, one line of ids each.
fn vectors(inp: &Path, out: &Path) -> Vec<(String, Vec<u32>)> {
    let inputs = std::fs::read_to_string(inp).unwrap();
    let outputs = std::fs::read_to_string(out).unwrap();
    // Each input ends with the separator, the last one too (as llama.cpp's reader reads it).
    let sep = "\n__ggml_vocab_test__\n";
    let inputs: Vec<&str> = inputs.strip_suffix(sep).unwrap_or(&inputs).split(sep).collect();
    let outputs: Vec<&str> = outputs.lines().collect();
    assert_eq!(inputs.len(), outputs.len(), "{} inputs, {} outputs", inputs.len(), outputs.len());
    inputs.into_iter().zip(outputs).map(|(i, o)| (i.to_string(), o.split_whitespace().map(|t| t.parse().unwrap()).collect())).collect()
}

fn check(tok: &GgufTokenizer, cases: &[(String, Vec<u32>)], roundtrip: bool) {
    let mut wrong = Vec::new();
    for (text, want) in cases {
        let got = tok.encode_plain(text).unwrap();
        if &got != want {
            wrong.push(format!("{text:?}: llama.cpp {want:?}, ours {got:?}"));
        } else if roundtrip && tok.decode(&got) != *text {
            wrong.push(format!("{text:?} decodes to {:?}", tok.decode(&got)));
        }
    }
    assert!(wrong.is_empty(), "{} of {} cases differ:\n{}", wrong.len(), cases.len(), wrong.join("\n"));
}

#[test]
fn tinyllama_sentencepiece_vocabulary_tokenizes_as_llama_cpp() {
    let dir = root().join("tests/fixtures/vocab");
    let tok = load(&dir.join("ggml-vocab-llama-spm.gguf"));
    let cases = vectors(&dir.join("ggml-vocab-llama-spm.gguf.inp"), &dir.join("ggml-vocab-llama-spm.gguf.out"));
    assert_eq!(cases.len(), 46);
    check(&tok, &cases, true);

    // A prompt as the engines see it: BOS (the file's add_bos_token), then the text; the
    // end-of-sequence token in a rendered chat is matched whole and a space prefix follows it.
    assert_eq!(tok.encode("Hello world").unwrap(), vec![1, 15043, 3186]);
    assert_eq!(tok.encode("<s>Hello world").unwrap(), vec![1, 15043, 3186], "no second BOS");
    let chat = tok.encode("<|user|>\nHi</s>\n<|assistant|>\n").unwrap();
    assert_eq!(chat[0], 1);
    assert!(chat.contains(&2), "</s> is one token: {chat:?}");
    assert_eq!(tok.eos, vec![2]);
    // Byte-fallback pieces decode to their bytes; control tokens are left out.
    let ids = tok.encode_plain("🦙 ok").unwrap();
    assert!(ids.iter().any(|&i| (3..259).contains(&i)), "the llama emoji falls back to bytes: {ids:?}");
    let mut with_eos = ids.clone();
    with_eos.push(2);
    assert_eq!(tok.decode(&with_eos), "🦙 ok");
}

#[test]
fn smollm2_byte_level_vocabulary_tokenizes_as_llama_cpp() {
    ensure_models();
    let dir = root().join("tests/fixtures/vocab");
    let tok = load(&models_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let cases = vectors(&dir.join("ggml-vocab-llama-spm.gguf.inp"), &dir.join("smollm2.out"));
    check(&tok, &cases, true);
    // SmolLM2's file says add_bos_token = false: a prompt is its text alone.
    assert_eq!(tok.encode("Hello").unwrap(), tok.encode_plain("Hello").unwrap());
}

#[test]
fn unsupported_tokenizers_are_refused_by_name() {
    let path = root().join("tests/fixtures/vocab/ggml-vocab-llama-spm.gguf");
    let mut f = std::fs::File::open(&path).unwrap();
    let mut content = Content::read(&mut f).unwrap();
    use candle_core::quantized::gguf_file::Value;
    content.metadata.insert("tokenizer.ggml.model".into(), Value::String("t5".into()));
    let err = GgufTokenizer::from_gguf(&content).err().unwrap();
    assert!(err.contains("\"t5\"") && err.contains("tokenizer.ggml.model"), "{err}");
    content.metadata.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
    content.metadata.insert("tokenizer.ggml.pre".into(), Value::String("qwen2".into()));
    let err = GgufTokenizer::from_gguf(&content).err().unwrap();
    assert!(err.contains("\"qwen2\"") && err.contains("tokenizer.ggml.pre"), "{err}");
}
