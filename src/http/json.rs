//! The JSON body extractor every route uses, so that every way a body can be wrong — too
//! large, not JSON, not UTF-8, a field of the wrong type — answers with our one error type,
//! naming the field (`messages[0].role: unknown variant ...`). It is also where a key
//! limited to some models (`[[auth.keys]] models`) meets the model a request names.

use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_TYPE;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use std::sync::Arc;

use serde_json::Value;

use super::AppState;
use crate::accounts::Caller;
use crate::config::ModelKind;
use crate::error::Error;

/// A JSON request body deserialized into `T`.
pub struct JsonBody<T>(pub T);

impl<T> FromRequest<AppState> for JsonBody<T>
where
    T: DeserializeOwned,
{
    type Rejection = Error;

    async fn from_request(req: Request, node: &AppState) -> Result<Self, Self::Rejection> {
        if let Some(ct) = req.headers().get(CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("");
            let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            if essence != "application/json" && !essence.ends_with("+json") {
                return Err(Error::UnsupportedMediaType(ct.to_string()));
            }
        }
        let limit = req.extensions().get::<BodyLimit>().map(|l| l.0).unwrap_or(usize::MAX);
        let key = req.extensions().get::<Arc<Caller>>().and_then(|c| c.key.clone()).filter(|k| !k.models.is_empty());
        let kind = route_kind(req.uri().path());
        // `POST /` checks once it knows from the body which kind of model it needs.
        let key = key.filter(|_| req.uri().path() != "/");
        let bytes = read_limited(req.into_body(), limit).await?;
        if let Some(key) = key {
            let body: Value = parse(&bytes)?;
            let named = body.get("model").and_then(Value::as_str).filter(|m| !m.is_empty());
            // No model named: the route's default model is the one it would use.
            let model = match (named, kind) {
                // An alias (server.model_aliases) is checked as the model it stands for.
                (Some(m), Some(kind)) => Some(node.registry.resolve(Some(m), kind).map_or(m.to_string(), |s| s.name().to_string())),
                (Some(m), None) => Some(m.to_string()),
                (None, Some(kind)) => node.registry.resolve(None, kind).ok().map(|s| s.name().to_string()),
                (None, None) => None,
            };
            if let Some(model) = model {
                key.allows(&model)?;
            }
        }
        parse(&bytes).map(JsonBody)
    }
}

/// The kind of model a route uses when a request names none.
fn route_kind(path: &str) -> Option<ModelKind> {
    match path {
        "/embed" | "/embed_all" | "/v1/embeddings" | "/similarity" => Some(ModelKind::Embed),
        "/classify" | "/predict" | "/rerank" => Some(ModelKind::Classify),
        "/generate" | "/generate_stream" | "/v1/chat/completions" | "/v1/completions" | "/route" => Some(ModelKind::Generate),
        _ => None,
    }
}

/// Most bytes of an oversized body read and thrown away before answering 413. Reading the
/// rest lets the client, which is still sending, see the 413 instead of a reset connection;
/// beyond this the connection is closed instead. Nothing over `limit` is ever kept.
const DRAIN_CAP: usize = 128 * 1024 * 1024;

/// Reads at most `limit` bytes of body; over it, drains (bounded) and answers 413.
async fn read_limited(body: axum::body::Body, limit: usize) -> Result<Bytes, Error> {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Error::InvalidJson(format!("cannot read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        seen = seen.saturating_add(data.len());
        if seen > limit {
            if seen > DRAIN_CAP {
                break;
            }
            buf.clear();
            continue;
        }
        buf.extend_from_slice(&data);
    }
    if seen > limit {
        return Err(Error::BodyTooLarge { limit });
    }
    Ok(buf.freeze())
}

/// Parses a JSON body, naming the path of the offending field on error.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    if bytes.is_empty() {
        return Err(Error::InvalidJson("the request body is empty; send a JSON object".into()));
    }
    if let Err(e) = std::str::from_utf8(bytes) {
        return Err(Error::InvalidJson(format!("the request body is not valid UTF-8 (at byte {})", e.valid_up_to())));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(field_error)?;
    de.end().map_err(|e| Error::InvalidJson(format!("malformed JSON: {e}")))?;
    Ok(value)
}

/// Types an already parsed JSON value, naming the offending field as `parse` does (for
/// routes that keep the raw body, e.g. to forward it upstream).
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, Error> {
    serde_path_to_error::deserialize(value).map_err(field_error)
}

fn field_error(e: serde_path_to_error::Error<serde_json::Error>) -> Error {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let message = strip_position(&inner.to_string());
    if let Some(field) = message.strip_prefix("missing field `").and_then(|m| m.split('`').next()) {
        let full = if path == "." || path.is_empty() { field.to_string() } else { format!("{path}.{field}") };
        return Error::MissingField(full);
    }
    match inner.classify() {
        serde_json::error::Category::Data if path != "." && !path.is_empty() => Error::field(path, message),
        serde_json::error::Category::Data => Error::InvalidJson(message),
        _ => Error::InvalidJson(format!("malformed JSON: {}", inner)),
    }
}

/// serde_json appends " at line 1 column 17" to data errors; the field path says more.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// The body size limit in force, left on the request by the router for error messages.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Req {
        inputs: Vec<String>,
    }

    #[test]
    fn names_the_field() {
        let e = parse::<Req>(br#"{"inputs": ["a", 5]}"#).unwrap_err();
        assert_eq!(e.code(), "invalid_field");
        assert!(e.to_string().starts_with("inputs[1]:"), "{e}");
        assert_eq!(parse::<Req>(b"{\"inputs\": [").unwrap_err().code(), "invalid_json");
        assert_eq!(parse::<Req>(b"\xff\xfe").unwrap_err().code(), "invalid_json");
    }
}
