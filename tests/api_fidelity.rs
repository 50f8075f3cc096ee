//! OpenAI's and TEI's dialects, exactly, through clients nobody here wrote: the official
//! `openai` package (structured output validated with `jsonschema`, log-probabilities,
//! penalties, the 400s), LangChain's `OpenAIEmbeddings` with 1,000 inputs a request, and
//! TEI's own OpenAPI document for the TEI routes' answers and errors.

mod common;

use std::time::Duration;

use common::*;

/// Runs one of the Python client scripts against a daemon; it exits non-zero on failure.
fn run_client(script: &str, args: &[String]) {
    // scripts/test.sh installs openai, jsonschema and langchain-openai into its environment.
    run_client_script(&test_python().display().to_string(), script, args);
}

#[test]
fn openai_clients_get_what_they_asked_for_or_a_400_naming_the_field() {
    let d = Daemon::start_default();
    d.wait_ready(Duration::from_secs(180));
    // 20 schemas × 50 sampled documents each, every one validated.
    run_client("openai_fidelity.py", &[d.url("/v1"), "smollm2".into(), "50".into()]);
}

#[test]
fn tei_routes_answer_as_teis_openapi_document_says_and_big_embedding_requests_are_split() {
    let d = Daemon::start_default();
    d.wait_ready(Duration::from_secs(180));
    run_client("tei_client.py", &[d.url(""), root().join("tests/fixtures/tei_openapi.json").display().to_string()]);
}
