//! Generation with the real SmolLM2 through the real daemon: determinism, stop sequences,
//! length limits, concurrency, cancellation, seeds, bad input, and no network.

mod common;

use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn start_with(engine: &str, extra: &str) -> Daemon {
    let config = format!("[[models]]\nname = \"smollm2\"\nkind = \"generate\"\nengine = \"{engine}\"\n{extra}\n");
    let d = Daemon::start(Options { config: Some(config), ..Default::default() });
    d.wait_ready(Duration::from_secs(180));
    d
}

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({"model": "smollm2", "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 24});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn stream_chat(d: &Daemon, body: &Value) -> (String, Vec<Value>) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let events = sse_events(client().post(d.url("/v1/chat/completions")).json(&body).send().unwrap());
    let text: String = events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    (text, events)
}

fn chat_text(d: &Daemon, body: &Value) -> (String, Value) {
    let (s, b) = post_json(d, "/v1/chat/completions", body);
    assert_eq!(s, 200, "{b}");
    (b["choices"][0]["message"]["content"].as_str().unwrap().to_string(), b)
}

fn greedy_is_deterministic_streaming_or_not(engine: &str) {
    let d = start_with(engine, "");
    let body = chat("What is the capital of France?", json!({}));
    let (a, full) = chat_text(&d, &body);
    let (b, _) = chat_text(&d, &body);
    assert!(!a.is_empty());
    assert_eq!(a, b, "two greedy runs differ");
    let mut streaming = body.clone();
    streaming["stream_options"] = json!({"include_usage": true});
    let (streamed, events) = stream_chat(&d, &streaming);
    assert_eq!(streamed, a, "streaming differs from non-streaming");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let last_choice = events.iter().rev().find(|e| !e["choices"].as_array().unwrap().is_empty()).unwrap();
    assert_eq!(last_choice["choices"][0]["finish_reason"], full["choices"][0]["finish_reason"]);
    let usage = &events.last().unwrap()["usage"];
    assert_eq!(usage, &full["usage"], "stream usage equals non-stream usage");
    assert_eq!(full["object"], "chat.completion");
    assert!(full["id"].as_str().unwrap().starts_with("chatcmpl-"));
}

fn stop_sequences_cut_the_text_and_are_not_included(engine: &str) {
    let d = start_with(engine, "");
    let body = chat("Write a sentence about the sea.", json!({"max_tokens": 32}));
    let (text, _) = chat_text(&d, &body);
    // Stop on a word from the middle of the greedy answer.
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(words.len() > 4, "{text}");
    let stop = format!(" {}", words[3]);
    let at = text.find(&stop).unwrap();
    let mut with_stop = body.clone();
    with_stop["stop"] = json!([stop.clone(), "§never§"]);
    let (cut, full) = chat_text(&d, &with_stop);
    assert_eq!(cut, text[..at], "stop {stop:?}");
    assert_eq!(full["choices"][0]["finish_reason"], "stop");
    let (streamed, _) = stream_chat(&d, &with_stop);
    assert_eq!(streamed, text[..at], "streaming must not leak the stop sequence");
}

fn max_tokens_gives_length_with_exactly_that_many_tokens(engine: &str) {
    let d = start_with(engine, "");
    for n in [1, 7, 20] {
        let body = chat("Tell me a long story about a dragon.", json!({"max_tokens": n}));
        let (_, full) = chat_text(&d, &body);
        assert_eq!(full["choices"][0]["finish_reason"], "length", "{full}");
        assert_eq!(full["usage"]["completion_tokens"], n, "{full}");
        let u = &full["usage"];
        assert_eq!(u["total_tokens"].as_u64().unwrap(), u["prompt_tokens"].as_u64().unwrap() + n);
    }
    // The native route says the same.
    let (s, b) = post_json(&d, "/generate", &json!({"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}));
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["finish_reason"], "length");
    assert_eq!(b["usage"]["completion_tokens"], 5);
    assert_eq!(b["model"], "smollm2");
}

fn concurrent_streams_are_independent_and_correct(engine: &str) {
    let d = Arc::new(start_with(engine, ""));
    let prompts: Vec<String> = [
        "What is the capital of France?",
        "Name a color.",
        "Say hello in Spanish.",
        "What is 2 plus 2?",
        "Name a planet in our solar system.",
        "Give me a fruit that is yellow.",
        "What do bees make?",
        "Which animal says moo?",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Reference answers, one at a time.
    let expected: Vec<String> = prompts.iter().map(|p| chat_text(&d, &chat(p, json!({}))).0).collect();
    let handles: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|p| {
            let d = d.clone();
            std::thread::spawn(move || stream_chat(&d, &chat(&p, json!({}))).0)
        })
        .collect();
    let got: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(got, expected);
}

fn a_dropped_stream_frees_its_slot(engine: &str) {
    let d = start_with(engine, "max_concurrent_sequences = 1\nmax_waiting = 0\n");
    let body = chat("Tell me a very long story about the ocean.", json!({"max_tokens": 400, "stream": true}));
    let response = client().post(d.url("/v1/chat/completions")).json(&body).send().unwrap();
    assert_eq!(response.status(), 200);
    let mut lines = BufReader::new(response).lines();
    let mut seen = 0;
    while seen < 3 {
        let line = lines.next().unwrap().unwrap();
        if line.starts_with("data: ") {
            seen += 1;
        }
    }
    // While it runs, the only slot is taken and nobody may wait: 429 with Retry-After.
    let r = client().post(d.url("/v1/chat/completions")).json(&chat("Hi", json!({"max_tokens": 2}))).send().unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    drop(lines); // the client goes away mid-stream
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (s, b) = post_json(&d, "/v1/chat/completions", &chat("Hi", json!({"max_tokens": 2})));
        if s == 200 {
            break;
        }
        assert_eq!(s, 429, "{b}");
        assert!(Instant::now() < deadline, "the slot was not freed after the client left");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn a_seed_makes_sampling_repeatable(engine: &str) {
    let d = start_with(engine, "");
    let body = chat("Write a short poem about rain.", json!({"temperature": 0.9, "top_p": 0.95, "seed": 1234, "max_tokens": 32}));
    let (a, _) = chat_text(&d, &body);
    let (b, _) = chat_text(&d, &body);
    assert_eq!(a, b);
    let texts: std::collections::HashSet<String> = (0..4)
        .map(|seed| {
            let mut x = body.clone();
            x["seed"] = json!(seed);
            chat_text(&d, &x).0
        })
        .collect();
    assert!(texts.len() > 1, "different seeds should sample differently");
}

fn bad_generation_requests_name_the_field(engine: &str) {
    let d = start_with(engine, "context = 64\n");
    let cases = [
        (json!({"model": "smollm2"}), 400, "missing_field"),
        (json!({"model": "smollm2", "messages": []}), 400, "empty_input"),
        (json!({"model": "smollm2", "messages": [{"role": "robot", "content": "hi"}]}), 400, "invalid_field"),
        (json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}), 400, "invalid_field"),
        (json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}), 400, "invalid_field"),
        (json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}), 400, "context_length_exceeded"),
        (json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}), 400, "invalid_field"),
        (json!({"model": "smollm2", "messages": [{"role": "user", "content": "word ".repeat(100)}]}), 400, "context_length_exceeded"),
        (json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}), 404, "model_not_found"),
    ];
    for (body, status, code) in cases {
        let (s, b) = post_json(&d, "/v1/chat/completions", &body);
        assert_error(s, &b, status, code);
        let message = b["error"]["message"].as_str().unwrap();
        match code {
            "invalid_field" => assert!(b["error"]["param"].is_string(), "names the field: {b}"),
            "context_length_exceeded" if body["max_tokens"].is_null() => {
                assert!(message.contains("tokens") && message.contains("64"), "{message}")
            }
            _ => {}
        }
    }
    let (s, b) =
        post_json(&d, "/v1/chat/completions", &json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}));
    assert_eq!(b["error"]["param"], "temperature", "{s} {b}");
    let (s, b) = post_json(&d, "/generate", &json!({}));
    assert_error(s, &b, 400, "missing_field");
}

fn loads_and_generates_without_any_network(engine: &str) {
    let home = tempfile::tempdir().unwrap();
    let closed = "http://127.0.0.1:9";
    let env: Vec<(String, String)> =
        [("HTTP_PROXY", closed), ("HTTPS_PROXY", closed), ("ALL_PROXY", closed), ("http_proxy", closed), ("https_proxy", closed), ("NO_PROXY", "")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([("HOME".to_string(), home.path().display().to_string()), ("HF_HOME".to_string(), home.path().join("hf").display().to_string())])
            .collect();
    let config = format!("[[models]]\nname = \"smollm2\"\nkind = \"generate\"\nengine = \"{engine}\"\n");
    let d = Daemon::start(Options { config: Some(config), env, ..Default::default() });
    d.wait_ready(Duration::from_secs(180));
    let (s, b) = post_json(&d, "/generate", &json!({"prompt": "Hello", "max_tokens": 3}));
    assert_eq!(s, 200, "{b}");
    // No hub client ran: it would have created its cache folders under HF_HOME / HOME.
    let created: Vec<_> = std::fs::read_dir(home.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(created.is_empty(), "something wrote to HOME/HF_HOME: {created:?}");
}

/// Every test above, on both engines: our CPU engine (the default on a CPU) and mistral.rs
/// (the GPU engine, run here on the CPU).
macro_rules! on_both_engines {
    ($($name:ident),*) => {
        mod native {
            $(#[test] fn $name() { super::$name("native") })*
        }
        mod mistralrs {
            $(#[test] fn $name() { super::$name("mistralrs") })*
        }
    };
}

on_both_engines!(
    greedy_is_deterministic_streaming_or_not,
    stop_sequences_cut_the_text_and_are_not_included,
    max_tokens_gives_length_with_exactly_that_many_tokens,
    concurrent_streams_are_independent_and_correct,
    a_dropped_stream_frees_its_slot,
    a_seed_makes_sampling_repeatable,
    bad_generation_requests_name_the_field,
    loads_and_generates_without_any_network
);
