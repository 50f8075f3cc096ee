//! Property-based fuzzing of what every request passes through before any model: the JSON
//! decoders of each route's body and the validation layer. Whatever the bytes, they must
//! decode to a request or to one of our documented errors; nothing may panic.
//!
//! `scripts/fuzz.sh` runs these with a large case budget; the normal test run uses a small
//! one. Failing inputs proptest finds are kept in `proptest-regressions/` and replayed first.

use proptest::prelude::*;
use serde_json::Value;

use super::embed::{ClassifyInputs, ClassifyRequest, EmbedRequest, OpenAiEmbeddingRequest};
use super::fields;
use super::generate::{to_chat, ChatRequest, CompletionRequest, GenerateRequest};
use super::json::{from_value, parse};
use crate::config::LimitsConfig;
use crate::error::Error;

/// The errors a body may legitimately decode to.
const DECODE_CODES: &[&str] = &["invalid_json", "invalid_field", "missing_field", "empty_input"];

/// Field names the request bodies use.
const FIELDS: &[&str] =
    &["inputs", "input", "messages", "role", "content", "prompt", "max_tokens", "temperature", "stop", "seed", "stream", "truncate", "model"];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map(Value::Number).unwrap_or(Value::Null)),
        ".{0,40}".prop_map(Value::String),
        Just(Value::String("user".into())),
        Just(Value::String("auto".into())),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(
                // Mostly the routes' own field names (so bodies get past the first check),
                // sometimes any name.
                prop_oneof![
                    FIELDS.len() as u32 => prop::sample::select(FIELDS).prop_map(str::to_string),
                    1 => "[a-z_]{1,12}",
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn decodes_or_documented<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    match parse::<T>(bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            assert!(DECODE_CODES.contains(&e.code()), "undocumented error {} for {:?}", e.code(), String::from_utf8_lossy(bytes));
            assert!(e.status().is_client_error());
            None
        }
    }
}

fn sampling_checks(s: &super::generate::SamplingFields) {
    use super::generate::LogprobStyle;
    let decodings = [s.decoding(LogprobStyle::Chat).map(|_| ()), s.decoding(LogprobStyle::Completions).map(|_| ())];
    for r in [s.params().map(|_| ()), s.stops().map(|_| ()), s.max_tokens().map(|_| ())].into_iter().chain(decodings) {
        if let Err(e) = r {
            assert!(e.status().is_client_error(), "{e}");
        }
    }
}

fn validate(inputs: &super::embed::Inputs, limits: &LimitsConfig) {
    if let Err(e) = inputs.validate("inputs", limits) {
        assert!(matches!(e, Error::EmptyInput(_) | Error::TooManyInputs { .. } | Error::InputTooManyChars { .. }), "{e}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decodes_or_documented::<EmbedRequest>(&bytes);
        decodes_or_documented::<OpenAiEmbeddingRequest>(&bytes);
        decodes_or_documented::<ClassifyRequest>(&bytes);
        decodes_or_documented::<GenerateRequest>(&bytes);
        decodes_or_documented::<ChatRequest>(&bytes);
        decodes_or_documented::<CompletionRequest>(&bytes);
    }

    #[test]
    fn arbitrary_json_decodes_and_validates_or_names_its_error(v in json_value()) {
        let bytes = serde_json::to_vec(&v).unwrap();
        let limits = LimitsConfig { max_inputs: 4, max_input_chars: 16, ..LimitsConfig::default() };
        if let Some(r) = decodes_or_documented::<EmbedRequest>(&bytes) {
            validate(&r.inputs, &limits);
        }
        if let Some(r) = decodes_or_documented::<GenerateRequest>(&bytes) {
            sampling_checks(&r.sampling);
        }
        if let Ok(r) = from_value::<ChatRequest>(v.clone()) {
            sampling_checks(&r.sampling);
            let _ = to_chat(&r.messages);
        }
        if let Some(r) = decodes_or_documented::<CompletionRequest>(&bytes) {
            sampling_checks(&r.sampling);
        }
        if let Some(r) = decodes_or_documented::<ClassifyRequest>(&bytes) {
            for tei_pairs in [false, true] {
                if let Err(e) = ClassifyInputs::read(&r.inputs, tei_pairs, &limits) {
                    assert!(e.status().is_client_error(), "{e}");
                }
            }
        }
        for route in [fields::CHAT, fields::COMPLETIONS, fields::GENERATE, fields::EMBEDDINGS, fields::EMBED, fields::PREDICT, fields::RERANK] {
            if let Err(e) = fields::check(&v, route) {
                assert!(e.status().is_client_error() && e.tei().0.is_client_error(), "{e}");
            }
        }
    }

    #[test]
    fn chat_shaped_json_with_hostile_values(
        content in ".{0,200}",
        role in prop_oneof![Just("user"), Just("system"), Just("assistant"), Just("tool"), Just("")],
        max_tokens in any::<i64>(),
        temperature in any::<f64>(),
        stop in prop::collection::vec(".{0,5}", 0..12),
    ) {
        let body = serde_json::json!({
            "model": "auto",
            "messages": [{"role": role, "content": content}],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stop": stop,
        });
        if let Some(r) = decodes_or_documented::<ChatRequest>(&serde_json::to_vec(&body).unwrap()) {
            sampling_checks(&r.sampling);
        }
    }
}

#[test]
fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
    // Inputs hold strings (a nested list is read far enough to tell token ids from text,
    // which the recursion limit bounds)...
    let deep = format!("{{\"inputs\": {}", "[".repeat(100_000));
    let e = parse::<EmbedRequest>(deep.as_bytes()).unwrap_err();
    assert!(["invalid_field", "invalid_json"].contains(&e.code()), "{e}");
    // ...and where any JSON is allowed (`stop`), serde_json's recursion limit stops it.
    let deep = format!("{{\"messages\": [], \"stop\": {}", "[".repeat(100_000));
    let e = parse::<ChatRequest>(deep.as_bytes()).unwrap_err();
    assert_eq!(e.code(), "invalid_json", "{e}");
}
