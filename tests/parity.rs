//! Accuracy guard for our CPU generation engine against mistral.rs on the same GGUF weights.
//!
//! In F32 — both engines on the weights dequantized to f32, so neither quantizes
//! activations — next-token logits agree within 1e-3 relative and greedy text is identical
//! for 32 tokens: the architecture (embedding, RMSNorm, RoPE, grouped-query attention,
//! SwiGLU, tied output) is the same computation. In serving mode both quantize activations
//! to 8 bits before every matmul; the kernels themselves match candle's to ~2e-7 (unit
//! tests), but a last-bit difference can flip one rounding and the 30 layers amplify it, so
//! two correct quantized engines differ by a few percent in logits (mistral.rs and
//! llama.cpp differ by ~6% on these prompts). There the guard is the same next token and a
//! bounded distance.

mod common;

use std::sync::Arc;

use common::*;
use edgenode::generate::engine::{GenEvent, Generator};
use edgenode::generate::mistral::{MistralGenerator, ModelFiles};
use edgenode::generate::native::NativeGenerator;
use edgenode::generate::sampling::SamplingParams;
use edgenode::generate::template::ChatMessage;

const PROMPTS: &[&str] = &[
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
    "Explain in one paragraph why the sky is blue, as if to a child who keeps asking why.",
];

async fn greedy(engine: &dyn Generator, prompt: Vec<u32>) -> String {
    let mut stream = engine.start(prompt, SamplingParams::greedy(), 32, &[]).unwrap();
    let mut text = String::new();
    while let Some(e) = stream.events.recv().await {
        match e {
            GenEvent::Text { text: t, .. } => text.push_str(&t),
            GenEvent::Done { .. } => break,
            GenEvent::Failed(m) => panic!("{m}"),
        }
    }
    text
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    d / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt()
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|p| p.0).unwrap()
}

/// mistral.rs with candle told to dequantize every weight (read once per thread, so the load
/// runs on a fresh thread with the variable set).
fn load_mistral_f32(path: std::path::PathBuf) -> MistralGenerator {
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let m = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.block_on(MistralGenerator::load(ModelFiles::Gguf(&path), &candle_core::Device::Cpu, 1)).unwrap()
    })
    .join()
    .unwrap();
    std::env::remove_var("CANDLE_DEQUANTIZE_ALL");
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_engine_matches_mistralrs_on_the_same_weights() {
    ensure_models();
    let path = models_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let team = edgenode::cpu::team::Team::new(2, "parity").unwrap();

    // Serving mode first (this thread's candle state stays "quantized").
    let mistral = MistralGenerator::load(ModelFiles::Gguf(&path), &candle_core::Device::Cpu, 1).await.unwrap();
    let ours_q = edgenode::generate::native::gguf::load(&path, false).unwrap().weights;
    let native = Arc::new(NativeGenerator::load(&path, 2, false).unwrap());
    let mut prompts = Vec::new();
    for prompt in PROMPTS {
        let messages = [ChatMessage { role: "user".into(), content: prompt.to_string() }];
        let text = native.render_chat(&messages).unwrap();
        assert_eq!(text, mistral.render_chat(&messages).unwrap(), "chat templates render alike");
        let ids = native.tokenize(&text).unwrap();
        assert_eq!(ids, mistral.tokenize(&text).unwrap(), "both tokenizers give the same ids for {prompt:?}");
        let ours = ours_q.next_token_logits(&ids, &team);
        let theirs = mistral.next_token_logits(ids.clone()).await.unwrap();
        let e = rel_l2(&ours, &theirs);
        eprintln!("quantized {prompt:?}: relative L2 {e:.2e}, next token ours {} theirs {}", argmax(&ours), argmax(&theirs));
        assert_eq!(argmax(&ours), argmax(&theirs), "same next token for {prompt:?}");
        assert!(e < 0.1, "quantized logits too far apart for {prompt:?}: {e:e}");
        prompts.push(ids);
    }
    drop((mistral, ours_q, native));

    // F32: both engines on dequantized weights.
    let mistral = load_mistral_f32(path.clone());
    let ours = edgenode::generate::native::gguf::load(&path, true).unwrap().weights;
    let native = Arc::new(NativeGenerator::load(&path, 2, true).unwrap());
    for (prompt, ids) in PROMPTS.iter().zip(prompts) {
        let a = ours.next_token_logits(&ids, &team);
        let b = mistral.next_token_logits(ids.clone()).await.unwrap();
        let e = rel_l2(&a, &b);
        eprintln!("f32 {prompt:?}: relative L2 {e:.2e}");
        assert!(e <= 1e-3, "F32 logits differ for {prompt:?}: relative error {e:e}");
        let (ta, tb) = (greedy(native.as_ref(), ids.clone()).await, greedy(&mistral, ids).await);
        assert_eq!(ta, tb, "greedy text for {prompt:?}");
        assert!(!ta.is_empty());
    }
}
