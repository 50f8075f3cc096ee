//! The one error type a request can meet, and its one mapping to HTTP.
//!
//! Every failure a client can cause or observe is a variant here. `status()` and
//! `code()` are the only place a variant becomes an HTTP status; `IntoResponse` renders
//! OpenAI's error shape (`{"error": {"message", "type", "code", "param"}}`) so that SDKs
//! print the message, and sets `Retry-After` where waiting helps. Handlers return
//! `Result<_, Error>` and never build a status code themselves.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Every error a request can end with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The body is not valid JSON, or not valid UTF-8.
    #[error("{0}")]
    InvalidJson(String),
    /// A field has the wrong type or an invalid value; `field` names it.
    #[error("{field}: {message}")]
    InvalidField { field: String, message: String },
    /// A field the route does not act on: unknown to it, or one it refuses (`fields.rs`).
    /// A 400 in every dialect but TEI's, whose own server answers 422 for it.
    #[error("{field}: {message}")]
    UnhonouredField { field: String, message: String },
    /// A field that must be present is missing.
    #[error("missing field `{0}`")]
    MissingField(String),
    /// An empty string or an empty list where text is required.
    #[error("{0} must not be empty")]
    EmptyInput(String),
    /// The request body exceeds `limits.max_body_bytes`.
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// More inputs in one request than `limits.max_inputs`.
    #[error("{field} has {count} inputs; the limit is {limit} per request")]
    TooManyInputs { field: String, count: usize, limit: usize },
    /// An input longer (in characters) than `limits.max_input_chars`, checked before tokenizing.
    #[error("input {index} has {chars} characters; the limit is {limit}")]
    InputTooManyChars { index: usize, chars: usize, limit: usize },
    /// All inputs of one request together over `limits.max_request_tokens`.
    #[error("the request has {tokens} tokens in all; the limit is {limit} per request")]
    RequestTooManyTokens { tokens: usize, limit: usize },
    /// `max_tokens` over `limits.max_tokens`.
    #[error("{field} is {requested}; the limit is {limit}")]
    MaxTokensTooLarge { field: String, requested: i64, limit: usize },
    /// More open connections than `limits.max_connections`.
    #[error("the node has {0} open connections, its limit; retry shortly")]
    TooManyConnections(usize),
    /// An input over the model's token limit when `truncate` is false.
    #[error("input {index} has {tokens} tokens; the limit is {limit} (set \"truncate\": true to cut it)")]
    InputTooLong { index: usize, tokens: usize, limit: usize },
    /// A prompt plus `max_tokens` that does not fit the generator's context.
    #[error("{message}")]
    ContextExceeded { message: String },
    /// The `Content-Type` is not JSON.
    #[error("content type must be application/json, got {0:?}")]
    UnsupportedMediaType(String),
    /// No model of that name (and kind) is served.
    #[error("model {name:?} is not served here; served {kind} models: {served}")]
    UnknownModel { name: String, kind: &'static str, served: String },
    /// The request pins a model version this node does not serve (now, or any more).
    #[error("model {model:?} is not served at version {requested:?} here; serving {serving}")]
    ModelVersionUnavailable { model: String, requested: String, serving: String },
    /// A rollback with no earlier version on disk to return to.
    #[error("{0}")]
    RollbackUnavailable(String),
    /// No such route.
    #[error("no route for {method} {path}")]
    UnknownRoute { method: String, path: String },
    /// The route exists but not with this method.
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// An API key is required and was missing or wrong.
    #[error("a valid API key is required: send \"Authorization: Bearer <key>\"")]
    Unauthorized,
    /// Admission refused: the queue or the sequence slots are full.
    #[error("{what} is at capacity ({limit}); retry after {retry_after_s} s")]
    Overloaded { what: String, limit: usize, retry_after_s: u64 },
    /// A spending budget forbids every tier that could answer.
    #[error("{0}")]
    BudgetExceeded(String),
    /// An API key is over one of its `[[auth.keys]]` rate limits; other keys are unaffected.
    #[error("key {key:?} is over its limit of {limit}; retry after {retry_after_s} s")]
    RateLimited { key: String, limit: String, retry_after_s: u64 },
    /// An API key spent its `daily_budget_usd` over the rolling day.
    #[error("key {key:?} spent its daily budget of ${budget_usd} over the rolling day; retry after {retry_after_s} s")]
    KeyBudgetExceeded { key: String, budget_usd: f64, retry_after_s: u64 },
    /// An API key may not use this model (`[[auth.keys]] models`).
    #[error("key {key:?} may not use model {model:?}; it may use: {allowed}")]
    ModelNotAllowed { key: String, model: String, allowed: String },
    /// The model is not loaded and warm yet, or it failed to load.
    #[error("{message}")]
    NotReady { message: String, retry_after_s: u64 },
    /// The node is shutting down.
    #[error("the node is draining and takes no new requests")]
    Draining,
    /// The edge produced no first token within `routing.edge_timeout_ms` (a routed request
    /// then goes to the cloud; alone, only when the cloud fails too).
    #[error("the edge produced no token within {ms} ms")]
    FirstTokenTimeout { ms: u128 },
    /// The request ran past `limits.request_timeout_s`.
    #[error("the request did not finish within {0} s")]
    Timeout(u64),
    /// The cloud upstream answered with an error or could not be reached.
    #[error("{0}")]
    Upstream(String),
    /// The cloud upstream did not answer in time.
    #[error("{0}")]
    UpstreamTimeout(String),
    /// A bug or a failed model run; the message says what failed, never a panic's payload verbatim.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// Shorthand for a field that failed validation.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidField { field: field.into(), message: message.into() }
    }

    /// The HTTP status for this error: the one place this mapping exists.
    pub fn status(&self) -> StatusCode {
        use Error::*;
        match self {
            InvalidJson(_) | InvalidField { .. } | UnhonouredField { .. } | MissingField(_) | EmptyInput(_) => StatusCode::BAD_REQUEST,
            Unauthorized => StatusCode::UNAUTHORIZED,
            ModelNotAllowed { .. } => StatusCode::FORBIDDEN,
            UnknownModel { .. } | UnknownRoute { .. } => StatusCode::NOT_FOUND,
            ModelVersionUnavailable { .. } | RollbackUnavailable(_) => StatusCode::CONFLICT,
            MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            BodyTooLarge { .. } | TooManyInputs { .. } | InputTooManyChars { .. } | RequestTooManyTokens { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            // OpenAI's status for a prompt over the context: SDKs raise `BadRequestError` and
            // gateways key their context-window fallbacks on it.
            MaxTokensTooLarge { .. } | ContextExceeded { .. } => StatusCode::BAD_REQUEST,
            UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            InputTooLong { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Overloaded { .. } | BudgetExceeded(_) | RateLimited { .. } | KeyBudgetExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Upstream(_) => StatusCode::BAD_GATEWAY,
            NotReady { .. } | Draining | TooManyConnections(_) => StatusCode::SERVICE_UNAVAILABLE,
            Timeout(_) | UpstreamTimeout(_) | FirstTokenTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable machine-readable code (OpenAI's `error.code`).
    pub fn code(&self) -> &'static str {
        use Error::*;
        match self {
            InvalidJson(_) => "invalid_json",
            InvalidField { .. } | UnhonouredField { .. } => "invalid_field",
            MissingField(_) => "missing_field",
            EmptyInput(_) => "empty_input",
            BodyTooLarge { .. } => "body_too_large",
            TooManyInputs { .. } => "too_many_inputs",
            InputTooManyChars { .. } => "input_too_many_chars",
            InputTooLong { .. } => "input_too_long",
            RequestTooManyTokens { .. } => "request_too_many_tokens",
            MaxTokensTooLarge { .. } => "max_tokens_too_large",
            TooManyConnections(_) => "too_many_connections",
            ContextExceeded { .. } => "context_length_exceeded",
            UnsupportedMediaType(_) => "unsupported_media_type",
            UnknownModel { .. } => "model_not_found",
            ModelVersionUnavailable { .. } => "model_version_unavailable",
            RollbackUnavailable(_) => "rollback_unavailable",
            UnknownRoute { .. } => "not_found",
            MethodNotAllowed { .. } => "method_not_allowed",
            Unauthorized => "invalid_api_key",
            Overloaded { .. } => "overloaded",
            BudgetExceeded(_) | KeyBudgetExceeded { .. } => "budget_exceeded",
            RateLimited { .. } => "rate_limited",
            ModelNotAllowed { .. } => "model_not_allowed",
            NotReady { .. } => "not_ready",
            Draining => "draining",
            Timeout(_) => "timeout",
            FirstTokenTimeout { .. } => "first_token_timeout",
            Upstream(_) => "upstream_error",
            UpstreamTimeout(_) => "upstream_timeout",
            Internal(_) => "internal_error",
        }
    }

    /// OpenAI's `error.type`, derived from the status class.
    fn kind(&self) -> &'static str {
        match self.status().as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }

    /// The request field the error is about, when there is one (OpenAI's `error.param`).
    fn param(&self) -> Option<&str> {
        match self {
            Error::InvalidField { field, .. } | Error::UnhonouredField { field, .. } | Error::MissingField(field) | Error::EmptyInput(field) => {
                Some(field)
            }
            Error::TooManyInputs { field, .. } | Error::MaxTokensTooLarge { field, .. } => Some(field),
            _ => None,
        }
    }

    pub fn retry_after_s(&self) -> Option<u64> {
        match self {
            Error::Overloaded { retry_after_s, .. }
            | Error::NotReady { retry_after_s, .. }
            | Error::RateLimited { retry_after_s, .. }
            | Error::KeyBudgetExceeded { retry_after_s, .. } => Some(*retry_after_s),
            Error::Draining => Some(5),
            Error::TooManyConnections(_) => Some(1),
            _ => None,
        }
    }

    /// Which of the kinds Hugging Face's servers (TEI, TGI) tell apart this error is: the one
    /// place they are told apart, which `tei()` and `tgi()` each name in their own words.
    fn hf_kind(&self) -> HfKind {
        use Error::*;
        match self {
            EmptyInput(_) => HfKind::Empty,
            InvalidField { .. }
            | MissingField(_)
            | TooManyInputs { .. }
            | InputTooManyChars { .. }
            | InputTooLong { .. }
            | RequestTooManyTokens { .. }
            | MaxTokensTooLarge { .. }
            | ContextExceeded { .. } => HfKind::Invalid,
            UnhonouredField { .. } => HfKind::Unhonoured,
            Overloaded { .. } | BudgetExceeded(_) | RateLimited { .. } | KeyBudgetExceeded { .. } => HfKind::Overloaded,
            NotReady { .. } | Draining | TooManyConnections(_) => HfKind::Unavailable,
            Internal(_) | Upstream(_) => HfKind::Failed,
            Timeout(_) | UpstreamTimeout(_) | FirstTokenTimeout { .. } => HfKind::TimedOut,
            Unauthorized => HfKind::Unauthorized,
            InvalidJson(_)
            | BodyTooLarge { .. }
            | UnsupportedMediaType(_)
            | UnknownModel { .. }
            | ModelVersionUnavailable { .. }
            | RollbackUnavailable(_)
            | UnknownRoute { .. }
            | MethodNotAllowed { .. }
            | ModelNotAllowed { .. } => HfKind::Request,
        }
    }

    /// text-embeddings-inference's status and body for this error, on its routes:
    /// `{"error": message, "error_type": "Validation" | "Empty" | "Overloaded" | "Unhealthy"
    /// | "Backend" | "Tokenizer"}` with TEI 1.9's statuses (validation 422, empty 400,
    /// overload 429, unhealthy 503, a failed model 424; an unknown field is TEI's own 422).
    /// What TEI has no type for keeps our status, with the closest type.
    pub fn tei(&self) -> (StatusCode, serde_json::Value) {
        let (status, kind) = match self.hf_kind() {
            HfKind::Empty => (StatusCode::BAD_REQUEST, "Empty"),
            HfKind::Invalid | HfKind::Unhonoured => (StatusCode::UNPROCESSABLE_ENTITY, "Validation"),
            HfKind::Overloaded => (StatusCode::TOO_MANY_REQUESTS, "Overloaded"),
            HfKind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "Unhealthy"),
            HfKind::Failed => (StatusCode::FAILED_DEPENDENCY, "Backend"),
            HfKind::TimedOut => (StatusCode::GATEWAY_TIMEOUT, "Backend"),
            HfKind::Unauthorized | HfKind::Request => (self.status(), "Validation"),
        };
        (status, json!({"error": self.to_string(), "error_type": kind}))
    }

    /// text-generation-inference's status and body for this error, on its routes:
    /// `{"error": message, "error_type": "validation" | "overloaded" | "generation" |
    /// "incomplete_generation" | …}` with TGI's statuses (validation 422, overload 429, a
    /// failed generation 424). A field we do not honour is a 400 (TGI itself would ignore
    /// it and answer 200, which is worse). What TGI has no type for keeps our status.
    /// huggingface_hub's `InferenceClient` raises its `ValidationError`,
    /// `OverloadedError`, `GenerationError` from these types.
    pub fn tgi(&self) -> (StatusCode, serde_json::Value) {
        let (status, kind) = match self.hf_kind() {
            HfKind::Empty | HfKind::Invalid => (StatusCode::UNPROCESSABLE_ENTITY, "validation"),
            HfKind::Unhonoured | HfKind::Request => (self.status(), "validation"),
            HfKind::Overloaded => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
            HfKind::Failed => (StatusCode::FAILED_DEPENDENCY, "generation"),
            HfKind::TimedOut => (self.status(), "incomplete_generation"),
            HfKind::Unavailable => (self.status(), "unhealthy"),
            HfKind::Unauthorized => (self.status(), "authentication"),
        };
        (status, json!({"error": self.to_string(), "error_type": kind}))
    }

    /// The JSON body for this error (also used inside SSE streams, where no status can change).
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.to_string(),
            "type": self.kind(),
            "code": self.code(),
            "param": self.param(),
        }})
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        if matches!(self, Error::Unauthorized) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(s) = self.retry_after_s() {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response.extensions_mut().insert(ErrorCode(self.code()));
        // The error itself, for a route whose dialect renders errors its own way.
        response.extensions_mut().insert(self);
        response
    }
}

/// The kinds of error Hugging Face's servers give their own types and statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HfKind {
    /// An empty input or list.
    Empty,
    /// A wrong value, or one over a limit.
    Invalid,
    /// A field the route does not act on.
    Unhonoured,
    Overloaded,
    /// Not ready, draining, out of connections.
    Unavailable,
    /// The model (or the upstream) failed.
    Failed,
    TimedOut,
    Unauthorized,
    /// Anything else about the request itself (malformed, unknown model or route).
    Request,
}

/// Left on error responses so middleware (metrics, logs) can see which error it was.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

/// Result with the request error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_openai_shaped() {
        let e = Error::InputTooLong { index: 3, tokens: 611, limit: 256 };
        assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let body = e.body();
        assert_eq!(body["error"]["code"], "input_too_long");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(body["error"]["message"].as_str().unwrap().contains("611 tokens"));
    }

    #[test]
    fn overload_sets_retry_after() {
        let r = Error::Overloaded { what: "queue".into(), limit: 4, retry_after_s: 1 }.into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }
}
