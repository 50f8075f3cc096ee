//! Which request fields each route honours, and the 400 for every other one.
//!
//! A client that sends a field we do not act on must hear so: a 200 that quietly did
//! something else (a `response_format` ignored, a `logit_bias` dropped) is worse than an
//! error. Every field of the dialects' request schemas is listed here with what we do with
//! it; a field not listed is answered with a 400 naming it, and a listed field we refuse
//! is answered with a 400 saying why. The README's field table is checked against these
//! lists (a unit test below), so the documentation cannot drift from the code.

use serde_json::Value;

use crate::error::Error;

/// What a route does with a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Acted on as the dialect defines it.
    Honoured,
    /// Kept: on the request's trace span and in the log (`user`, `metadata`).
    Recorded,
    /// Answered with a 400 saying why, unless its value asks for nothing: null, `false`,
    /// `1` (as `best_of`), an empty string, list or object.
    Refused(&'static str),
}

/// One field of a route's request body.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub name: &'static str,
    pub support: Support,
}

const fn honoured(name: &'static str) -> Field {
    Field { name, support: Support::Honoured }
}

const fn recorded(name: &'static str) -> Field {
    Field { name, support: Support::Recorded }
}

const fn refused(name: &'static str, why: &'static str) -> Field {
    Field { name, support: Support::Refused(why) }
}

/// Fields every generation route shares (sampling and decoding).
macro_rules! sampling_fields {
    () => {
        [
            honoured("max_tokens"),
            honoured("temperature"),
            honoured("top_p"),
            honoured("top_k"),
            honoured("seed"),
            honoured("stop"),
            honoured("n"),
            honoured("ignore_eos"),
            honoured("frequency_penalty"),
            honoured("presence_penalty"),
            honoured("repetition_penalty"),
            honoured("logit_bias"),
            honoured("logprobs"),
            honoured("stream"),
            honoured("stream_options"),
            honoured("model"),
            recorded("user"),
        ]
    };
}

/// `POST /v1/chat/completions`.
pub const CHAT: &[Field] = &concat_fields::<17, 20, 37>(
    sampling_fields!(),
    [
        honoured("messages"),
        honoured("max_completion_tokens"),
        honoured("top_logprobs"),
        honoured("response_format"),
        honoured("tools"),
        honoured("tool_choice"),
        honoured("parallel_tool_calls"),
        recorded("metadata"),
        recorded("safety_identifier"),
        honoured("prompt_cache_key"),
        honoured("store"),
        honoured("service_tier"),
        honoured("modalities"),
        refused("functions", "deprecated by OpenAI and not supported: send `tools`"),
        refused("function_call", "deprecated by OpenAI and not supported: send `tool_choice`"),
        refused("audio", "this node serves text models only"),
        refused("prediction", "predicted outputs are not supported"),
        refused("web_search_options", "this node does not search the web"),
        refused("reasoning_effort", "the served models are not reasoning models"),
        refused("verbosity", "the served models have no verbosity control"),
    ],
);

/// `POST /v1/completions`.
pub const COMPLETIONS: &[Field] = &concat_fields::<17, 4, 21>(
    sampling_fields!(),
    [
        honoured("prompt"),
        refused("echo", "echoing the prompt is not supported (send `false`)"),
        refused("best_of", "best_of is not supported (send 1)"),
        refused("suffix", "suffix (fill-in-the-middle) is not supported by the served models"),
    ],
);

/// `POST /generate` (ours): chat's decoding fields on a prompt or messages.
pub const GENERATE: &[Field] = &concat_fields::<17, 5, 22>(
    sampling_fields!(),
    [honoured("prompt"), honoured("messages"), honoured("max_completion_tokens"), honoured("top_logprobs"), honoured("response_format")],
);

/// `POST /generate` with `inputs`, `/generate_stream` and `POST /` (text-generation-inference's).
pub const TGI: &[Field] = &[honoured("inputs"), honoured("parameters"), honoured("stream"), honoured("model")];

/// TGI's `parameters` object.
pub const TGI_PARAMETERS: &[Field] = &[
    honoured("max_new_tokens"),
    honoured("temperature"),
    honoured("top_p"),
    honoured("top_k"),
    honoured("typical_p"),
    honoured("repetition_penalty"),
    honoured("frequency_penalty"),
    honoured("seed"),
    honoured("stop"),
    honoured("do_sample"),
    honoured("return_full_text"),
    honoured("details"),
    honoured("decoder_input_details"),
    honoured("top_n_tokens"),
    honoured("truncate"),
    honoured("grammar"),
    refused("best_of", "best_of is not supported: one sequence is generated per request (send 1)"),
    refused("watermark", "watermarking is not supported"),
    refused("adapter_id", "LoRA adapters are not supported: each served model is one set of weights"),
];

/// `POST /v1/embeddings`.
pub const EMBEDDINGS: &[Field] = &[
    honoured("input"),
    honoured("model"),
    honoured("encoding_format"),
    honoured("dimensions"),
    recorded("user"),
    // Ours, as on `/embed`.
    honoured("truncate"),
    honoured("prompt_name"),
];

/// `POST /v1/feedback`.
pub const FEEDBACK: &[Field] = &[honoured("id"), honoured("score"), honoured("comment")];

/// `POST /embed` (TEI).
pub const EMBED: &[Field] = &[
    honoured("inputs"),
    honoured("model"),
    honoured("normalize"),
    honoured("truncate"),
    honoured("truncation_direction"),
    honoured("prompt_name"),
    honoured("dimensions"),
];

/// `POST /embed_all` (TEI).
pub const EMBED_ALL: &[Field] =
    &[honoured("inputs"), honoured("model"), honoured("truncate"), honoured("truncation_direction"), honoured("prompt_name")];

/// `POST /classify`, `/predict` (TEI), with the Hub client's `parameters`.
pub const PREDICT: &[Field] =
    &[honoured("inputs"), honoured("model"), honoured("raw_scores"), honoured("truncate"), honoured("truncation_direction"), honoured("parameters")];

/// `parameters` on `/classify` and `/predict` (huggingface_hub's text-classification).
pub const CLASSIFY_PARAMETERS: &[Field] = &[honoured("top_k"), honoured("function_to_apply")];

/// `POST /similarity` (TEI).
pub const SIMILARITY: &[Field] = &[honoured("inputs"), honoured("parameters"), honoured("model")];

/// `parameters` on `/similarity` (TEI's).
pub const SIMILARITY_PARAMETERS: &[Field] = &[honoured("prompt_name"), honoured("truncate"), honoured("truncation_direction")];

/// `POST /rerank` (TEI).
pub const RERANK: &[Field] = &[
    honoured("query"),
    honoured("texts"),
    honoured("model"),
    honoured("raw_scores"),
    honoured("return_text"),
    honoured("truncate"),
    honoured("truncation_direction"),
];

/// `POST /tokenize` (TEI).
pub const TOKENIZE: &[Field] = &[honoured("inputs"), honoured("model"), honoured("add_special_tokens"), honoured("prompt_name")];

/// `POST /tokenize` with `content` (llama.cpp's).
pub const TOKENIZE_LLAMA: &[Field] = &[honoured("content"), honoured("model"), honoured("add_special"), honoured("with_pieces")];

/// `POST /decode` (TEI).
pub const DECODE: &[Field] = &[honoured("ids"), honoured("model"), honoured("skip_special_tokens")];

/// Joins two field arrays at compile time.
const fn concat_fields<const A: usize, const B: usize, const N: usize>(a: [Field; A], b: [Field; B]) -> [Field; N] {
    assert!(A + B == N, "concat_fields: N must be A + B");
    let mut out = [honoured(""); N];
    let mut i = 0;
    while i < A {
        out[i] = a[i];
        i += 1;
    }
    while i < N {
        out[i] = b[i - A];
        i += 1;
    }
    out
}

/// Checks a request body's top-level fields against a route's list: the body must be a
/// JSON object, every key must be listed, and a refused field must be null.
pub fn check(body: &Value, fields: &[Field]) -> Result<(), Error> {
    check_in(body, fields, "")
}

/// `check` for a nested object (TGI's `parameters`): fields are named with `prefix`.
pub fn check_in(body: &Value, fields: &[Field], prefix: &str) -> Result<(), Error> {
    let Value::Object(map) = body else {
        let what = if prefix.is_empty() { "the request body".to_string() } else { format!("`{}`", prefix.trim_end_matches('.')) };
        if prefix.is_empty() {
            return Err(Error::InvalidJson(format!("{what} must be a JSON object, got {}", kind(body))));
        }
        return Err(Error::field(prefix.trim_end_matches('.'), format!("must be a JSON object, got {}", kind(body))));
    };
    let unhonoured = |key: &str, message: String| Error::UnhonouredField { field: format!("{prefix}{key}"), message };
    for (key, value) in map {
        match fields.iter().find(|f| f.name == key) {
            None => {
                let known: Vec<&str> = fields.iter().filter(|f| !matches!(f.support, Support::Refused(_))).map(|f| f.name).collect();
                return Err(unhonoured(key, format!("unknown field; this route accepts: {}", known.join(", "))));
            }
            Some(Field { support: Support::Refused(why), .. }) if !asks_nothing(value) => return Err(unhonoured(key, why.to_string())),
            Some(_) => {}
        }
    }
    Ok(())
}

/// A value that leaves a refused feature off.
fn asks_nothing(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Number(n) => n.as_u64() == Some(1),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Bool(true) => false,
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_and_refused_fields_are_named() {
        let e = check(&json!({"messages": [], "frobnicate": 1}), CHAT).unwrap_err();
        assert!(matches!(&e, Error::UnhonouredField { field, message } if field == "frobnicate" && message.contains("messages")), "{e}");
        let e = check(&json!({"messages": [], "audio": {"voice": "alloy"}}), CHAT).unwrap_err();
        assert!(matches!(&e, Error::UnhonouredField { field, .. } if field == "audio"));
        check(&json!({"messages": [], "audio": null, "user": "u-1"}), CHAT).unwrap();
        check(&json!({"prompt": "x", "echo": false, "best_of": 1}), COMPLETIONS).unwrap();
        assert!(check(&json!({"prompt": "x", "best_of": 2}), COMPLETIONS).is_err());
        assert!(check(&json!([1]), CHAT).is_err());
    }

    /// Every field of every route appears in the README's field table, in the row of its route.
    #[test]
    fn the_readme_field_table_lists_every_field() {
        let readme = include_str!("../../README.md");
        let start = readme.find("<!-- fields:begin -->").expect("README has a field table between <!-- fields:begin/end --> marks");
        let end = readme.find("<!-- fields:end -->").expect("README field table end mark");
        let table = &readme[start..end];
        let routes: [(&str, &[Field]); 16] = [
            ("/v1/chat/completions", CHAT),
            ("/v1/completions", COMPLETIONS),
            ("/generate", GENERATE),
            ("/generate_stream", TGI),
            ("/generate_stream", TGI_PARAMETERS),
            ("/classify", CLASSIFY_PARAMETERS),
            ("/similarity", SIMILARITY),
            ("/similarity", SIMILARITY_PARAMETERS),
            ("/v1/embeddings", EMBEDDINGS),
            ("/embed", EMBED),
            ("/embed_all", EMBED_ALL),
            ("/predict", PREDICT),
            ("/rerank", RERANK),
            ("/tokenize", TOKENIZE),
            ("/tokenize", TOKENIZE_LLAMA),
            ("/decode", DECODE),
        ];
        let mut missing = Vec::new();
        for (route, fields) in routes {
            for f in fields {
                let listed = table.lines().any(|l| l.starts_with(&format!("| `{}` |", f.name)) && l.contains(&format!("`{route}`")));
                if !listed {
                    missing.push(format!("{route} {}", f.name));
                }
            }
        }
        assert!(missing.is_empty(), "README field table lacks: {missing:?}");
    }
}
