//! The cloud tier: any OpenAI-compatible `/chat/completions` endpoint, reached with one
//! pooled HTTP client. Connect and first-byte timeouts bound how long a failing upstream
//! can hold a request; the circuit breaker stops calling one that keeps failing. Streams
//! are passed through chunk by chunk, with the usage chunk read on the way for the ledger.

use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde_json::Value;

use super::breaker::Breaker;
use crate::config::UpstreamConfig;
use crate::error::Error;

/// Why the cloud tier did not answer. Every variant counts against the breaker except
/// `CircuitOpen` (no call was made) and `NotConfigured`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream is configured (upstream.base_url)")]
    NotConfigured,
    #[error("upstream {base_url} is failing; its circuit is open")]
    CircuitOpen { base_url: String },
    #[error("upstream {url} could not be reached: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("upstream {url} did not start answering within {ms} ms")]
    FirstByteTimeout { url: String, ms: u128 },
    #[error("upstream {url} did not finish within {s} s")]
    TotalTimeout { url: String, s: u64 },
    /// A 5xx, 408 or 429: the upstream's trouble, not the request's.
    #[error("upstream {url} answered {status}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error("upstream {url} broke off its answer: {cause}")]
    BrokenOff { url: String, cause: String },
    #[error("upstream {url} answered {status} with a body that is not JSON")]
    NotJson { url: String, status: u16 },
    #[error("upstream {url} ended its stream before any data")]
    EmptyStream { url: String },
}

impl UpstreamError {
    /// The upstream took too long (a gateway timeout rather than a bad gateway).
    pub fn is_timeout(&self) -> bool {
        matches!(self, UpstreamError::FirstByteTimeout { .. } | UpstreamError::TotalTimeout { .. })
    }
}

impl From<UpstreamError> for Error {
    fn from(e: UpstreamError) -> Self {
        if e.is_timeout() {
            Error::UpstreamTimeout(e.to_string())
        } else {
            Error::Upstream(e.to_string())
        }
    }
}

/// The configured upstream.
pub struct Upstream {
    client: reqwest::Client,
    pub base_url: String,
    pub model: String,
    key: Option<String>,
    first_byte: Duration,
    total: Duration,
    pub breaker: Breaker,
}

/// What the upstream answered.
pub enum Answer {
    /// A whole JSON answer with its status (2xx, or a 4xx that is the request's own fault).
    Json { status: u16, body: Value },
    /// A stream that has started: its first bytes, and the rest.
    Stream { first: Bytes, rest: std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>> },
}

impl Upstream {
    /// The upstream of this config, or `None` when no `base_url` is set.
    pub fn new(cfg: &UpstreamConfig) -> Result<Option<Upstream>, String> {
        if cfg.base_url.is_empty() {
            return Ok(None);
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| format!("cannot build the upstream HTTP client: {e}"))?;
        let key = std::env::var(&cfg.api_key_env).ok().filter(|k| !k.is_empty());
        Ok(Some(Upstream {
            client,
            base_url: cfg.base_url.trim_end_matches('/').to_string(),
            model: cfg.model.clone(),
            key,
            first_byte: Duration::from_millis(cfg.first_byte_timeout_ms),
            total: Duration::from_secs(cfg.timeout_s),
            breaker: Breaker::new(cfg.circuit_failures, Duration::from_secs(cfg.circuit_open_s)),
        }))
    }

    fn url(&self) -> String {
        format!("{}/chat/completions", self.base_url)
    }

    /// Sends a chat request (already addressed to the upstream's model). Fails — counting
    /// against the breaker — on a refused or broken connection, a timeout before the first
    /// byte, a 5xx, 408 or 429; a 4xx that is the request's own fault is passed back as is.
    /// Cancelled (the future dropped), it counts as neither, and a half-open probe's slot is
    /// given back (see `Breaker::permit`).
    pub async fn chat(&self, body: &Value, stream: bool) -> Result<Answer, UpstreamError> {
        let permit = self.breaker.permit().ok_or_else(|| UpstreamError::CircuitOpen { base_url: self.base_url.clone() })?;
        let result = self.send(body, stream).await;
        match &result {
            Ok(_) => permit.success(),
            Err(_) => permit.failure(),
        }
        result
    }

    async fn send(&self, body: &Value, stream: bool) -> Result<Answer, UpstreamError> {
        let mut request = self.client.post(self.url()).json(body);
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        let url = self.url();
        let timed_out = || UpstreamError::FirstByteTimeout { url: url.clone(), ms: self.first_byte.as_millis() };
        let broken = |e: reqwest::Error| UpstreamError::BrokenOff { url: url.clone(), cause: root_cause(&e) };
        let response = tokio::time::timeout(self.first_byte, request.send())
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| UpstreamError::Unreachable { url: url.clone(), cause: root_cause(&e) })?;
        let status = response.status().as_u16();
        if status >= 500 || status == 408 || status == 429 {
            let text = response.text().await.unwrap_or_default();
            return Err(UpstreamError::Status { url, status, body: text.chars().take(300).collect() });
        }
        if status >= 400 || !stream {
            let text = tokio::time::timeout(self.total, response.text())
                .await
                .map_err(|_| UpstreamError::TotalTimeout { url: url.clone(), s: self.total.as_secs() })?
                .map_err(broken)?;
            let body: Value = serde_json::from_str(&text).map_err(|_| UpstreamError::NotJson { url: url.clone(), status })?;
            return Ok(Answer::Json { status, body });
        }
        let mut rest = response.bytes_stream().boxed();
        let first = tokio::time::timeout(self.first_byte, rest.next())
            .await
            .map_err(|_| timed_out())?
            .ok_or_else(|| UpstreamError::EmptyStream { url: url.clone() })?
            .map_err(broken)?;
        Ok(Answer::Stream { first, rest })
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    msg
}

/// Reads `usage` objects out of passing SSE bytes (which may split lines anywhere).
#[derive(Default)]
pub struct UsageSniffer {
    partial: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub seen: bool,
    /// The answer's `id`, from the first chunk that has one.
    pub id: Option<String>,
}

impl UsageSniffer {
    pub fn feed(&mut self, chunk: &[u8]) {
        self.partial.push_str(&String::from_utf8_lossy(chunk));
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            let Some(data) = line.trim_end().strip_prefix("data: ") else { continue };
            if let Ok(v) = serde_json::from_str::<Value>(data) {
                if self.id.is_none() {
                    self.id = v.get("id").and_then(Value::as_str).map(str::to_string);
                }
                if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                    self.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
                    self.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
                    self.seen = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_found_across_chunk_boundaries() {
        let mut s = UsageSniffer::default();
        s.feed(b"data: {\"choices\":[]}\n\ndata: {\"choices\":[],\"usa");
        assert!(!s.seen);
        s.feed(b"ge\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\ndata: [DONE]\n\n");
        assert!(s.seen);
        assert_eq!((s.prompt_tokens, s.completion_tokens), (7, 3));
    }
}
