//! `POST /`, as text-embeddings-inference and text-generation-inference serve it: the task
//! of the server. Hugging Face's clients post there when they are given only a base URL.
//!
//! A node serves several tasks, so the body decides, and `server.root_route` decides what
//! the body leaves open:
//!
//! - `inputs` as `{"source_sentence", "sentences"}` is TEI's `/similarity`;
//! - `stream`, or a TGI generation parameter in `parameters`, is TGI's generation;
//! - `function_to_apply` in `parameters`, or `raw_scores`, is classification;
//! - `normalize`, `prompt_name`, `dimensions` or `encoding_format` beside `inputs` is
//!   TEI's `/embed`.
//!
//! What is left is ambiguous: `{"inputs": "..."}` alone (TEI's embed or classify clients,
//! `InferenceClient.feature_extraction`) and `{"inputs": "...", "parameters": {}}`
//! (`InferenceClient.text_generation` and `.text_classification` with no options send the
//! very same body). `root_route = "auto"` answers those with the node's only task when it
//! serves one, otherwise with generation when `parameters` is there (TGI's shape) and with
//! embedding when it is not (TEI's); `embed`, `classify` or `generate` fixes the answer.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::Value;

use super::embed;
use super::fields;
use super::json::JsonBody;
use super::tgi::{self, TgiRoute};
use super::{speaking, AppState, Dialect};
use crate::config::{ModelKind, RootRoute};
use crate::error::Error;
use crate::node::Node;

/// What `POST /` does with a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Task {
    Embed,
    Similarity,
    Classify,
    Generate,
}

impl Task {
    fn kind(self) -> ModelKind {
        match self {
            Task::Embed | Task::Similarity => ModelKind::Embed,
            Task::Classify => ModelKind::Classify,
            Task::Generate => ModelKind::Generate,
        }
    }

    fn route(self) -> &'static str {
        match self {
            Task::Embed => "/embed",
            Task::Similarity => "/similarity",
            Task::Classify => "/classify",
            Task::Generate => "/generate",
        }
    }
}

/// `POST /`.
pub async fn root(State(node): State<AppState>, headers: HeaderMap, JsonBody(raw): JsonBody<Value>) -> Response {
    let task = match decide(&node, &raw) {
        Ok(task) => task,
        Err(e) => return speaking(Dialect::Tei, Err(e)),
    };
    tracing::debug!(?task, "POST / answers as {}", task.route());
    // A key limited to some models: checked now that the body says which kind it needs.
    if let Err(e) = allowed(&node, &raw, task) {
        let dialect = if task == Task::Generate { Dialect::Tgi } else { Dialect::Tei };
        return speaking(dialect, Err(e));
    }
    match task {
        Task::Generate => tgi::answer(node, headers, raw, TgiRoute::Compat).await,
        Task::Similarity => speaking(Dialect::Tei, embed::similarity(State(node), headers, JsonBody(raw)).await),
        Task::Embed => speaking(Dialect::Tei, embed::embed(State(node), headers, JsonBody(raw)).await),
        Task::Classify => speaking(Dialect::Tei, embed::classify(State(node), JsonBody(raw)).await),
    }
}

/// The caller's key may use the model this body reaches (named, aliased, or the task's
/// default).
fn allowed(node: &Node, body: &Value, task: Task) -> Result<(), Error> {
    let Some(key) = crate::accounts::current().and_then(|c| c.key.clone()).filter(|k| !k.models.is_empty()) else { return Ok(()) };
    let named = body.get("model").and_then(Value::as_str).filter(|m| !m.is_empty());
    let model = match node.registry.resolve(named, task.kind()) {
        Ok(slot) => slot.name().to_string(),
        // An unknown model is the handler's 404 to give.
        Err(_) => return Ok(()),
    };
    key.allows(&model)
}

/// The task a body asks for, from its shape, then `server.root_route`.
fn decide(node: &Node, body: &Value) -> Result<Task, Error> {
    let Value::Object(map) = body else {
        return Err(Error::InvalidJson("the request body must be a JSON object".into()));
    };
    let served: Vec<ModelKind> = {
        let mut kinds: Vec<ModelKind> = node.registry.slots().iter().map(|s| s.config.kind).collect();
        kinds.sort_by_key(|k| k.as_str());
        kinds.dedup();
        kinds
    };
    let (task, why) = match said(map) {
        Some(said) => said,
        None => (unsaid(node.config.server.root_route, &served, map.contains_key("parameters")), "server.root_route"),
    };
    if !served.contains(&task.kind()) {
        return Err(Error::field(
            "inputs",
            format!(
                "POST / read this body as {} (by {why}), but this node serves no {} model; call the route you mean or set server.root_route",
                task.route(),
                task.kind()
            ),
        ));
    }
    Ok(task)
}

/// The task the body's own fields name, and which field said so.
fn said(map: &serde_json::Map<String, Value>) -> Option<(Task, &'static str)> {
    if map.get("inputs").is_some_and(|i| i.get("source_sentence").is_some()) {
        return Some((Task::Similarity, "inputs.source_sentence"));
    }
    if map.contains_key("stream") {
        return Some((Task::Generate, "stream"));
    }
    if let Some(Value::Object(params)) = map.get("parameters") {
        if params.contains_key("function_to_apply") {
            return Some((Task::Classify, "parameters.function_to_apply"));
        }
        // `top_k` is both a generation and a classification parameter: it says nothing.
        if params.keys().any(|k| k != "top_k" && fields::TGI_PARAMETERS.iter().any(|f| f.name == k)) {
            return Some((Task::Generate, "a TGI parameter"));
        }
    }
    if map.contains_key("raw_scores") {
        return Some((Task::Classify, "raw_scores"));
    }
    if ["normalize", "prompt_name", "dimensions", "encoding_format"].iter().any(|k| map.contains_key(*k)) {
        return Some((Task::Embed, "an embedding field"));
    }
    None
}

/// `server.root_route` for a body that does not say.
fn unsaid(route: RootRoute, served: &[ModelKind], has_parameters: bool) -> Task {
    match route {
        RootRoute::Embed => Task::Embed,
        RootRoute::Classify => Task::Classify,
        RootRoute::Generate => Task::Generate,
        RootRoute::Auto => match served {
            [ModelKind::Embed] => Task::Embed,
            [ModelKind::Classify] => Task::Classify,
            [ModelKind::Generate] => Task::Generate,
            _ if has_parameters && served.contains(&ModelKind::Generate) => Task::Generate,
            _ if served.contains(&ModelKind::Embed) => Task::Embed,
            _ if served.contains(&ModelKind::Classify) => Task::Classify,
            _ => Task::Generate,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn said_task(body: Value) -> Option<Task> {
        said(body.as_object().unwrap()).map(|(t, _)| t)
    }

    /// What each of huggingface_hub's base-URL calls sends, and what it is read as.
    #[test]
    fn bodies_say_their_task_or_leave_it_to_root_route() {
        assert_eq!(said_task(json!({"inputs": {"source_sentence": "a", "sentences": ["b"]}, "parameters": {}})), Some(Task::Similarity));
        assert_eq!(said_task(json!({"inputs": "a", "parameters": {"max_new_tokens": 5}})), Some(Task::Generate));
        assert_eq!(said_task(json!({"inputs": "a", "parameters": {}, "stream": true})), Some(Task::Generate));
        assert_eq!(said_task(json!({"inputs": "a", "parameters": {"function_to_apply": "softmax"}})), Some(Task::Classify));
        assert_eq!(said_task(json!({"inputs": "a", "normalize": true})), Some(Task::Embed));
        // Ambiguous: text_generation and text_classification without options; feature_extraction.
        assert_eq!(said_task(json!({"inputs": "a", "parameters": {}})), None);
        assert_eq!(said_task(json!({"inputs": "a", "parameters": {"top_k": 2}})), None);
        assert_eq!(said_task(json!({"inputs": "a"})), None);
        let all = [ModelKind::Classify, ModelKind::Embed, ModelKind::Generate];
        assert_eq!(unsaid(RootRoute::Auto, &all, true), Task::Generate);
        assert_eq!(unsaid(RootRoute::Auto, &all, false), Task::Embed);
        assert_eq!(unsaid(RootRoute::Auto, &[ModelKind::Classify], true), Task::Classify);
        assert_eq!(unsaid(RootRoute::Classify, &all, true), Task::Classify);
    }
}
