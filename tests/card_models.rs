//! The card's own models — TinyLlama-1.1B-Chat and bge-small/base-en-v1.5 — served the way
//! the README's recipe says a user serves the real files: a manifest entry made with
//! `edgenode models pin`, a `[[models]]` table each, the real daemon over HTTP.
//!
//! Their weights are out of reach, so the files are shape-faithful stand-ins written at test
//! time by `scripts/standins.py` (real widths and vocabularies, real file formats, 2 layers,
//! seeded weights). The bge stand-ins are the same bytes on every machine (the test checks
//! the weights' sha256), so their embeddings are compared with the vectors
//! sentence-transformers computed from those very files (`tests/fixtures/bge_standin_golden.json`).

mod common;

use std::time::Duration;

use common::*;
use edgenode::generate::tokenizer::GgufTokenizer;
use serde_json::{json, Value};

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("bge_standin_golden.json")).unwrap()).unwrap()
}

fn golden_model<'a>(g: &'a Value, name: &str) -> &'a Value {
    g["models"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap()
}

/// The bge-shaped folder for a golden entry, in one pooling-config format, checked to hold
/// the very weights the golden vectors were computed from.
fn bge_folder(model: &Value, format: &str) -> std::path::PathBuf {
    ensure_models();
    let tokenizer = models_dir().join("minilm/tokenizer.json").display().to_string();
    let mut args = vec!["--tokenizer", tokenizer.as_str(), "--pooling-format", format];
    args.extend(model["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()));
    let dir = standin("bge", &args);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    assert_eq!(sha, model["weights_sha256"].as_str().unwrap(), "scripts/standins.py wrote other weights than the golden vectors were made from");
    dir
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// One daemon serving every stand-in: bge-small twice (the published bge files' boolean
/// pooling keys, and current sentence-transformers' `pooling_mode`), bge-base, and the
/// TinyLlama stand-in as Q4_K_M (llama.cpp's mix of Q4_K and Q6_K) and Q8_0.
fn start() -> Daemon {
    let g = golden();
    let small = golden_model(&g, "bge-small");
    let base = golden_model(&g, "bge-base");
    let mut manifest = String::new();
    manifest += &pin("bge-small", "embed", &bge_folder(small, "legacy"));
    manifest += &pin("bge-small-current", "embed", &bge_folder(small, "current"));
    manifest += &pin("bge-base", "embed", &bge_folder(base, "legacy"));
    manifest += &pin("tinyllama", "generate", tinyllama_standin("q4_k_m").parent().unwrap());
    manifest += &pin("tinyllama-q8", "generate", tinyllama_standin("q8_0").parent().unwrap());
    let manifest_file = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("card-models-manifest.toml");
    std::fs::write(&manifest_file, manifest).unwrap();
    let config = format!(
        r#"[store]
dir = {models:?}
manifest = {manifest:?}

[[models]]
name = "bge-small"
kind = "embed"

[[models]]
name = "bge-small-current"
kind = "embed"

[[models]]
name = "bge-base"
kind = "embed"

[[models]]
name = "tinyllama"
kind = "generate"

[[models]]
name = "tinyllama-q8"
kind = "generate"
"#,
        models = models_dir().display().to_string(),
        manifest = manifest_file.display().to_string(),
    );
    let d = Daemon::start(Options { config: Some(config), ..Default::default() });
    d.wait_ready(Duration::from_secs(300));
    d
}

#[test]
fn card_models_serve_like_their_references() {
    let d = start();
    let g = golden();

    // --- bge: CLS pooling, Normalize, 512 positions, both pooling formats, prompts.
    for (name, golden_name) in [("bge-small", "bge-small"), ("bge-small-current", "bge-small"), ("bge-base", "bge-base")] {
        let rows = golden_model(&g, golden_name)["rows"].as_array().unwrap();
        let (short, long) = rows.split_at(rows.len() - 1);
        let texts: Vec<&str> = short.iter().map(|r| r["text"].as_str().unwrap()).collect();
        let (status, body) = post_json(&d, "/embed", &json!({"inputs": texts, "model": name}));
        assert_eq!(status, 200, "{name}: {body}");
        for (row, got) in short.iter().zip(body.as_array().unwrap()) {
            let c = cosine(&floats(got), &floats(&row["cls_normalized"]));
            assert!(c >= 0.9999, "{name}: cosine {c} for {:?}", row["text"]);
        }

        // bge's query instruction as a named prompt, as sentence-transformers applies it.
        let (status, body) = post_json(&d, "/embed", &json!({"inputs": texts, "model": name, "prompt_name": "query"}));
        assert_eq!(status, 200, "{name}: {body}");
        for (row, got) in short.iter().zip(body.as_array().unwrap()) {
            let c = cosine(&floats(got), &floats(&row["query_cls_normalized"]));
            assert!(c >= 0.9999, "{name} with the query prompt: cosine {c} for {:?}", row["text"]);
        }
        let (status, body) = post_json(&d, "/embed", &json!({"inputs": "hi", "model": name, "prompt_name": "passage"}));
        let message = assert_tei_error(status, &body, 422, "Validation");
        assert!(message.starts_with("prompt_name:") && message.contains("document, query"), "{body}");

        // Past 512 tokens: refused by name with "truncate": false, cut at 512 as
        // sentence-transformers cuts it otherwise (TEI's default).
        let long = &long[0];
        let (status, body) = post_json(&d, "/embed", &json!({"inputs": long["text"], "model": name, "truncate": false}));
        let message = assert_tei_error(status, &body, 422, "Validation");
        assert!(message.contains("the limit is 512"), "{body}");
        let (status, body) = post_json(&d, "/v1/embeddings", &json!({"input": long["text"], "model": name}));
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["prompt_tokens"], long["tokens"], "{body}");
        assert_eq!(long["tokens"], 512);
        let c = cosine(&floats(&body["data"][0]["embedding"]), &floats(&long["cls_normalized"]));
        assert!(c >= 0.9999, "{name} at 512 tokens: cosine {c}");
    }

    let (_, info) = get_json(&d, "/info");
    let models = info["models"].as_array().unwrap();
    let model = |n: &str| models.iter().find(|m| m["name"] == n).unwrap_or_else(|| panic!("{n} in /info: {info}")).clone();
    for n in ["bge-small", "bge-small-current"] {
        let m = model(n);
        assert_eq!(m["details"]["pooling"], "cls", "{m}");
        assert_eq!(m["details"]["normalizes"], true, "{m}");
        assert_eq!(m["details"]["max_input_tokens"], 512, "{m}");
        assert_eq!(m["details"]["dimensions"], 384, "{m}");
        assert_eq!(m["details"]["prompts"]["query"], "Represent this sentence for searching relevant passages: ", "{m}");
    }
    assert_eq!(model("bge-base")["details"]["dimensions"], 768);

    // --- TinyLlama: llama.cpp's tokens (BOS from the file), its own template, Q4_K_M's
    // mixed formats loaded as they are.
    let q4 = model("tinyllama");
    assert_eq!(q4["details"]["context"], 2048);
    if info["device"].as_str().is_some_and(|d| d.starts_with("cuda")) {
        // scripts/gpu-check.sh runs this test on a GPU, where mistral.rs serves GGUF files
        // (with our tokenizer: the token counts below hold there too).
        assert_eq!(q4["details"]["engine"], "mistralrs", "{q4}");
    } else {
        assert_eq!(q4["details"]["engine"], "native", "{q4}");
        let formats = &q4["details"]["model"]["formats"];
        assert_eq!(formats["Q6_K"], 3, "output, and attn_v and ffn_down of layer 1 (llama.cpp's use_more_bits): {q4}");
        assert_eq!(formats["Q4_K"], 13, "{q4}");
        assert_eq!(q4["details"]["model"]["tokenizer"], "llama (SentencePiece)");
        assert_eq!(q4["details"]["model"]["adds_bos"], true);
    }

    let vocab = {
        let mut f = std::fs::File::open(fixture("vocab/ggml-vocab-llama-spm.gguf")).unwrap();
        GgufTokenizer::from_gguf(&candle_core::quantized::gguf_file::Content::read(&mut f).unwrap()).unwrap()
    };
    for name in ["tinyllama", "tinyllama-q8"] {
        // "Hello world" is BOS ▁Hello ▁world for llama.cpp: three tokens.
        let (status, body) =
            post_json(&d, "/generate", &json!({"model": name, "prompt": "Hello world", "max_tokens": 4, "temperature": 0, "ignore_eos": true}));
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["prompt_tokens"], 3, "{body}");
        assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");

        // The Zephyr template from the file's metadata, rendered and tokenized as llama.cpp does.
        let rendered = "<|user|>\nWhat is the capital of France?</s>\n<|assistant|>\n";
        let want_tokens = vocab.encode(rendered).unwrap();
        assert_eq!(want_tokens[0], 1);
        let chat = json!({"model": name, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                          "max_tokens": 16, "temperature": 0});
        let (status, whole) = post_json(&d, "/v1/chat/completions", &chat);
        assert_eq!(status, 200, "{whole}");
        assert_eq!(whole["usage"]["prompt_tokens"], want_tokens.len(), "{whole}");
        let text = whole["choices"][0]["message"]["content"].as_str().unwrap().to_string();

        // Streamed pieces join to the same text.
        let mut stream = chat.clone();
        stream["stream"] = json!(true);
        let body = client().post(d.url("/v1/chat/completions")).json(&stream).send().unwrap().text().unwrap();
        let mut streamed = String::new();
        for line in body.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|l| *l != "[DONE]") {
            let v: Value = serde_json::from_str(line).unwrap();
            if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                streamed.push_str(t);
            }
        }
        assert_eq!(streamed, text, "{name}: streamed and whole answers differ");
    }
}
