//! Embeddings and classification against sentence-transformers' own outputs, through the
//! real daemon: one request at a time, many at once, and one big request.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

/// minilm four times (mean and CLS pooling, int8 and bf16 mean, over the same files), the router, and the tiny
/// classifier fixture; room for the golden set in one request.
fn config() -> String {
    format!(
        r#"[store]
dir = {models:?}
manifest = {manifest:?}

[limits]
max_inputs = 128

[[models]]
name = "minilm"
kind = "embed"

[[models]]
name = "minilm-candle"
kind = "embed"
manifest = "minilm"
engine = "candle"

[[models]]
name = "minilm-int8"
kind = "embed"
manifest = "minilm"
precision = "int8"

[[models]]
name = "minilm-bf16"
kind = "embed"
manifest = "minilm"
precision = "bf16"

[[models]]
name = "minilm-cls"
kind = "embed"
manifest = "minilm"
pooling = "cls"

[[models]]
name = "router"
kind = "classify"
embedder = "minilm"
temperature = 0.05
labels = {{ edge = ["What is the capital of France?", "Hi there!", "Convert 5 kilometers to miles."], cloud = ["Write a detailed business plan with financial projections.", "Analyze this dataset and explain the trends in depth.", "Refactor this large codebase and explain every decision."] }}

[[models]]
name = "tiny-classifier"
kind = "classify"
max_concurrent_inputs = 4

[[models]]
name = "tiny-cross-encoder"
kind = "classify"
"#,
        models = models_dir().display().to_string(),
        manifest = fixture("manifest.toml").display().to_string(),
    )
}

fn start() -> Daemon {
    let d = Daemon::start(Options { config: Some(config()), ..Default::default() });
    d.wait_ready(Duration::from_secs(180));
    d
}

struct Golden {
    rows: Vec<Value>,
}

fn golden() -> Golden {
    let v: Value = serde_json::from_slice(&std::fs::read(fixture("minilm_public.json")).unwrap()).unwrap();
    Golden { rows: v["rows"].as_array().unwrap().clone() }
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64) * (*y as f64)).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn rel_l2(a: &[f32], reference: &[f32]) -> f64 {
    let diff: f64 = a.iter().zip(reference).map(|(x, y)| ((*x - *y) as f64).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = reference.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    diff / norm
}

fn check_rows(label: &str, got: &[Vec<f32>], golden: &Golden, key: &str) {
    assert_eq!(got.len(), golden.rows.len());
    for (i, (row, g)) in got.iter().zip(&golden.rows).enumerate() {
        let want = floats(&g[key]);
        if key == "mean_raw" {
            let e = rel_l2(row, &want);
            assert!(e <= 1e-4, "{label} row {i} ({:?}): relative L2 error {e:e}", g["text"]);
        } else {
            let c = cosine(row, &want);
            assert!(c >= 0.9999, "{label} row {i} ({:?}): cosine {c}", g["text"]);
        }
    }
}

fn texts(g: &Golden) -> Vec<String> {
    g.rows.iter().map(|r| r["text"].as_str().unwrap().to_string()).collect()
}

fn embed_one_request(d: &Daemon, model: &str, texts: &[String], normalize: bool) -> Vec<Vec<f32>> {
    let (status, body) = post_json(d, "/embed", &json!({"inputs": texts, "model": model, "truncate": true, "normalize": normalize}));
    assert_eq!(status, 200, "{body}");
    body.as_array().unwrap().iter().map(floats).collect()
}

#[test]
fn embeddings_match_sentence_transformers() {
    let d = start();
    let g = golden();
    let all = texts(&g);
    // One 66-input request.
    check_rows("mean, one request", &embed_one_request(&d, "minilm", &all, true), &g, "mean_normalized");
    check_rows("raw, one request", &embed_one_request(&d, "minilm", &all, false), &g, "mean_raw");
    check_rows("cls, one request", &embed_one_request(&d, "minilm-cls", &all, true), &g, "cls_normalized");
    // candle's ops (the GPU path's code, run on the CPU) agree too.
    check_rows("candle, one request", &embed_one_request(&d, "minilm-candle", &all, true), &g, "mean_normalized");

    // 66 concurrent single-input requests: batched with each other by the queue.
    let d = Arc::new(d);
    let handles: Vec<_> = all
        .iter()
        .cloned()
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || embed_one_request(&d, "minilm", &[t], true).remove(0))
        })
        .collect();
    let rows: Vec<Vec<f32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    check_rows("mean, 66 concurrent requests", &rows, &g, "mean_normalized");

    // OpenAI shape: usage counts equal the reference token counts (after truncation at 256).
    for (i, r) in g.rows.iter().enumerate() {
        let (status, body) = post_json(&d, "/v1/embeddings", &json!({"input": r["text"], "model": "minilm", "truncate": true}));
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["prompt_tokens"], r["tokens"], "row {i}: {:?}", r["text"]);
        let v = floats(&body["data"][0]["embedding"]);
        assert!(cosine(&v, &floats(&r["mean_normalized"])) >= 0.9999);
    }
}

/// `precision = "int8"`: 8-bit weights and activations stay within cosine 0.995 of
/// sentence-transformers' fp32 vectors on every golden sentence, batched and alone.
#[test]
fn int8_embeddings_stay_close_to_sentence_transformers() {
    reduced_precision_stays_close("minilm-int8", "int8", 0.995);
}

/// `precision = "bf16"`: bf16 weights and activations (f32 accumulation) stay within cosine
/// 0.998 of sentence-transformers' fp32 vectors on every golden sentence, batched and alone;
/// `/info` names the kernel (`avx512_bf16`, or the f32 fallback on a CPU without it).
#[test]
fn bf16_embeddings_stay_close_to_sentence_transformers() {
    reduced_precision_stays_close("minilm-bf16", "bf16", 0.998);
}

fn reduced_precision_stays_close(name: &str, precision: &str, bar: f64) {
    let d = start();
    let g = golden();
    let all = texts(&g);
    let (status, info) = get_json(&d, "/info");
    assert_eq!(status, 200);
    let model = info["models"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap();
    assert_eq!(model["details"]["precision"], precision, "{model}");
    assert!(model["details"]["cpu_path"].is_string(), "{model}");
    let fp32 = info["models"].as_array().unwrap().iter().find(|m| m["name"] == "minilm").unwrap();
    assert_eq!(fp32["details"]["precision"], "fp32", "{fp32}");

    let batched = embed_one_request(&d, name, &all, true);
    let mut worst = (1.0f64, String::new());
    for (i, (row, r)) in batched.iter().zip(&g.rows).enumerate() {
        let alone = embed_one_request(&d, name, &all[i..i + 1], true).remove(0);
        for (how, v) in [("batched", row), ("alone", &alone)] {
            let c = cosine(v, &floats(&r["mean_normalized"]));
            if c < worst.0 {
                worst = (c, format!("{how}, row {i} ({:?})", r["text"]));
            }
        }
    }
    assert!(worst.0 >= bar, "smallest cosine {} at {}", worst.0, worst.1);
    eprintln!("{precision} MiniLM ({}): smallest cosine to sentence-transformers {:.4} ({})", model["details"]["cpu_path"], worst.0, worst.1);
}

#[test]
fn openai_embeddings_shapes() {
    let d = start();
    let (status, body) = post_json(&d, "/v1/embeddings", &json!({"input": ["alpha", "beta"], "model": "minilm"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "minilm");
    assert_eq!(body["data"][1]["index"], 1);
    assert_eq!(body["data"][0]["object"], "embedding");
    let float = floats(&body["data"][0]["embedding"]);
    assert_eq!(float.len(), 384);

    let (_, b64) = post_json(&d, "/v1/embeddings", &json!({"input": "alpha", "model": "minilm", "encoding_format": "base64"}));
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let decoded: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert_eq!(decoded, float);

    let (_, short) = post_json(&d, "/v1/embeddings", &json!({"input": "alpha", "model": "minilm", "dimensions": 64}));
    let v = floats(&short["data"][0]["embedding"]);
    assert_eq!(v.len(), 64);
    let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
}

#[test]
fn bad_inputs_get_clear_errors_and_hold_nothing() {
    let d = start();
    // TEI's routes answer in TEI's shape...
    let (s, b) = post_json(&d, "/embed", &json!({"inputs": ""}));
    assert_tei_error(s, &b, 400, "Empty");
    let (s, b) = post_json(&d, "/embed", &json!({"inputs": []}));
    assert_tei_error(s, &b, 400, "Empty");
    let (s, b) = post_json(&d, "/embed", &json!({"inputs": ["ok", true]}));
    assert!(assert_tei_error(s, &b, 422, "Validation").starts_with("inputs"), "{b}");
    let many: Vec<String> = (0..129).map(|i| format!("text {i}")).collect();
    let (s, b) = post_json(&d, "/embed", &json!({"inputs": many}));
    assert!(assert_tei_error(s, &b, 422, "Validation").contains("limit is 128"), "{b}");
    let long = "word ".repeat(400);
    let (s, b) = post_json(&d, "/embed", &json!({"inputs": ["short", long], "truncate": false}));
    let msg = assert_tei_error(s, &b, 422, "Validation");
    assert!(msg.contains("input 1") && msg.contains("402 tokens") && msg.contains("256"), "{msg}");
    let (s, b) = post_json(&d, "/embed", &json!({"inputs": "hi", "model": "nope"}));
    assert!(assert_tei_error(s, &b, 404, "Validation").contains("minilm, minilm-candle, minilm-int8, minilm-bf16, minilm-cls"), "{b}");
    // ...OpenAI's in OpenAI's.
    let (s, b) = post_json(&d, "/v1/embeddings", &json!({"input": ["ok", true]}));
    assert_error(s, &b, 400, "invalid_field");
    let (s, b) = post_json(&d, "/v1/embeddings", &json!({"input": many}));
    assert_error(s, &b, 413, "too_many_inputs");
    let (s, b) = post_json(&d, "/v1/embeddings", &json!({"input": ["short", "word ".repeat(400)], "truncate": false}));
    assert_error(s, &b, 422, "input_too_long");

    // The classifier admits at most 4 inputs in flight: a 5-input request is answered 4 at a
    // time, and a 4-input request still fits after every refusal above and below, so
    // nothing was left holding a slot.
    let (s, b) = post_json(&d, "/classify", &json!({"inputs": ["a", "b", "c", "d", "e"], "model": "tiny-classifier"}));
    assert_eq!((s, b.as_array().map(Vec::len)), (200, Some(5)), "{b}");
    let (s, b) = post_json(&d, "/classify", &json!({"inputs": ["a", "b", "c", "word ".repeat(100)], "model": "tiny-classifier", "truncate": false}));
    assert_tei_error(s, &b, 422, "Validation");
    let (s, b) = post_json(&d, "/classify", &json!({"inputs": ["a", "b", "c", "d"], "model": "tiny-classifier"}));
    assert_eq!(s, 200, "{b}");
    let (_, info) = get_json(&d, "/info");
    for m in info["models"].as_array().unwrap() {
        if let Some(n) = m["load"]["in_flight"].as_u64() {
            assert_eq!(n, 0, "{} holds inputs after the requests ended", m["name"]);
        }
    }
}

#[test]
fn sequence_classifier_matches_transformers() {
    let d = start();
    let fixture: Value = serde_json::from_slice(&std::fs::read(fixture("tiny_classifier_scores.json")).unwrap()).unwrap();
    let labels: Vec<&str> = fixture["labels"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    for row in fixture["rows"].as_array().unwrap() {
        for (raw, key) in [(false, "scores"), (true, "logits")] {
            let (s, body) =
                post_json(&d, "/predict", &json!({"inputs": row["text"], "model": "tiny-classifier", "truncate": true, "raw_scores": raw}));
            assert_eq!(s, 200, "{body}");
            let got = body.as_array().unwrap();
            // Sorted by score, highest first.
            let scores: Vec<f64> = got.iter().map(|x| x["score"].as_f64().unwrap()).collect();
            assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{body}");
            for (i, label) in labels.iter().enumerate() {
                let want = row[key][i].as_f64().unwrap();
                let have = got.iter().find(|x| x["label"] == *label).unwrap()["score"].as_f64().unwrap();
                assert!((want - have).abs() < 1e-4, "{label} {key}: transformers {want}, ours {have} for {:?}", row["text"]);
            }
        }
    }
}

/// A cross-encoder (a sequence classifier with one label) scores sentence pairs: TEI's
/// `/rerank` and pairs on `/predict`, against sentence-transformers' own `CrossEncoder` on
/// the same files (`make_tiny_cross_encoder.py`), truncation of a long pair included.
#[test]
fn cross_encoder_pairs_and_rerank_match_sentence_transformers() {
    let d = start();
    let f: Value = serde_json::from_slice(&std::fs::read(fixture("tiny_cross_encoder_scores.json")).unwrap()).unwrap();
    let (query, passages) = (f["query"].as_str().unwrap(), f["passages"].as_array().unwrap());
    let close = |a: f64, b: &Value, what: &str| assert!((a - b.as_f64().unwrap()).abs() < 1e-4, "{what}: ours {a}, sentence-transformers {b}");

    // /rerank: the only one-label classify model is the default re-ranker.
    let (s, ranked) = post_json(&d, "/rerank", &json!({"query": query, "texts": passages}));
    assert_eq!(s, 200, "{ranked}");
    let ranked = ranked.as_array().unwrap();
    let want = f["rank"].as_array().unwrap();
    assert_eq!(ranked.iter().map(|r| r["index"].clone()).collect::<Vec<_>>(), want.iter().map(|r| r["index"].clone()).collect::<Vec<_>>());
    for (got, want) in ranked.iter().zip(want) {
        close(got["score"].as_f64().unwrap(), &want["score"], "rank");
        assert!(got.get("text").is_none(), "text only with return_text: {got}");
    }
    let (_, raw) = post_json(&d, "/rerank", &json!({"query": query, "texts": passages, "raw_scores": true, "return_text": true}));
    for r in raw.as_array().unwrap() {
        let i = r["index"].as_u64().unwrap() as usize;
        close(r["score"].as_f64().unwrap(), &f["logits"][i], "raw logit");
        assert_eq!(r["text"], passages[i]);
    }

    // /predict: a list of pairs answers per pair; ["q", "p"] is one pair, answered flat.
    let pairs: Vec<Value> = passages.iter().map(|p| json!([query, p])).collect();
    let (s, batch) = post_json(&d, "/predict", &json!({"inputs": pairs, "model": "tiny-cross-encoder"}));
    assert_eq!(s, 200, "{batch}");
    for (i, row) in batch.as_array().unwrap().iter().enumerate() {
        close(row[0]["score"].as_f64().unwrap(), &f["scores"][i], "predict pair");
    }
    let (_, one) = post_json(&d, "/predict", &json!({"inputs": [query, passages[3]], "model": "tiny-cross-encoder", "raw_scores": true}));
    close(one[0]["score"].as_f64().unwrap(), &f["logits"][3], "one pair");

    // The last pair is over 64 tokens: cut longest first, as transformers cuts it, or refused.
    let last = passages.len() - 1;
    let (s, b) = post_json(&d, "/rerank", &json!({"query": query, "texts": [passages[last]], "truncate": false}));
    assert!(assert_tei_error(s, &b, 422, "Validation").contains("the limit is 64"), "{b}");
    // Refusals name what is wrong.
    let (s, b) = post_json(&d, "/rerank", &json!({"query": query, "texts": []}));
    assert_tei_error(s, &b, 400, "Empty");
    let (s, b) = post_json(&d, "/rerank", &json!({"query": query, "texts": ["a"], "model": "tiny-classifier"}));
    assert!(assert_tei_error(s, &b, 422, "Validation").contains("3 labels"), "{b}");
    let (s, b) = post_json(&d, "/predict", &json!({"inputs": [["a", "b"]], "model": "router"}));
    assert!(assert_tei_error(s, &b, 422, "Validation").contains("cross-encoder"), "{b}");
    let (s, b) = post_json(&d, "/predict", &json!({"inputs": ["a", "b", "c"], "model": "tiny-cross-encoder"}));
    assert!(assert_tei_error(s, &b, 422, "Validation").contains("list of lists"), "{b}");
    // Our /classify reads a list of strings as a batch, as before.
    let (s, b) = post_json(&d, "/classify", &json!({"inputs": ["a", "b", "c"], "model": "tiny-classifier"}));
    assert_eq!((s, b.as_array().map(Vec::len)), (200, Some(3)), "{b}");
}

/// `/embed_all`'s token states are the same on our CPU engine and candle's, and CLS pooling
/// of them is `/embed`'s vector for the CLS-pooled model.
#[test]
fn token_embeddings_agree_across_engines_and_pool_to_the_sentence_vector() {
    let d = start();
    let texts = json!(["Embeddings map text to vectors.", "A second, slightly longer input sentence here."]);
    let states = |model: &str| {
        let (s, b) = post_json(&d, "/embed_all", &json!({"inputs": texts, "model": model}));
        assert_eq!(s, 200, "{b}");
        b.as_array().unwrap().iter().map(|input| input.as_array().unwrap().iter().map(floats).collect::<Vec<_>>()).collect::<Vec<_>>()
    };
    let (ours, candle) = (states("minilm"), states("minilm-candle"));
    for (a, b) in ours.iter().flatten().zip(candle.iter().flatten()) {
        assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() < 2e-3), "token states differ between engines");
    }
    let (_, cls) = post_json(&d, "/embed", &json!({"inputs": texts, "model": "minilm-cls"}));
    for (input, pooled) in ours.iter().zip(cls.as_array().unwrap()) {
        let first = &input[0];
        let norm = first.iter().map(|x| x * x).sum::<f32>().sqrt();
        let c = cosine(&first.iter().map(|x| x / norm).collect::<Vec<_>>(), &floats(pooled));
        assert!(c > 0.9999, "the [CLS] state is the CLS-pooled vector: cosine {c}");
    }
}

#[test]
fn router_prototypes_separate_edge_from_cloud() {
    let d = start();
    let (s, body) = post_json(
        &d,
        "/classify",
        &json!({"inputs": ["What is the capital of Italy?", "Write an in-depth analysis of our cloud costs with a migration plan."], "model": "router"}),
    );
    assert_eq!(s, 200, "{body}");
    assert_eq!(body[0][0]["label"], "edge", "{body}");
    assert_eq!(body[1][0]["label"], "cloud", "{body}");
    let total: f64 = body[0].as_array().unwrap().iter().map(|x| x["score"].as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-5);
    let r = client().post(d.url("/classify")).json(&json!({"inputs": "hello", "model": "router"})).send().unwrap();
    let header = r.headers()["x-edgenode-model"].to_str().unwrap().to_string();
    assert!(header.starts_with("router"), "{header}");
}
