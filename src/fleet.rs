//! Spill-over on a Fly fleet: a `fly-replay` answer instead of a refusal, so that Fly's
//! proxy replays the request on another Machine of the app.
//!
//! Only on Fly (`FLY_APP_NAME` set) with `fleet.replay` on; never for a request that was
//! itself replayed (`fly-replay-src`), so a request moves at most once; never for a body
//! over 1 MiB, which Fly's proxy cannot replay. Where the refusal can be known before the
//! body is read (every generation queue is full), the body is not read at all.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::config::FleetConfig;
use crate::error::Error;
use crate::telemetry::metrics::METRICS;

/// Largest body Fly's proxy replays.
const MAX_REPLAY_BODY: u64 = 1024 * 1024;

/// The node's part in a fleet.
#[derive(Debug, Clone, Default)]
pub struct Fleet {
    on: bool,
    regions: BTreeMap<String, String>,
}

impl Fleet {
    /// On when `fleet.replay` is set and `fly_app` (the `FLY_APP_NAME` variable) is not empty.
    pub fn new(cfg: &FleetConfig, fly_app: Option<&str>) -> Fleet {
        Fleet { on: cfg.replay && fly_app.is_some_and(|a| !a.is_empty()), regions: cfg.model_regions.clone() }
    }

    /// Whether this request may be replayed: on, not replayed before, a body Fly can replay.
    pub fn may_replay(&self, headers: &HeaderMap) -> bool {
        let length = headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        self.on && !headers.contains_key("fly-replay-src") && length.is_some_and(|n| n <= MAX_REPLAY_BODY)
    }

    /// Before the body is read: a generation route while every generation model is
    /// saturated (`saturated` has one flag per generation model: slots and waiting queue full).
    pub fn replay_before(&self, route: &str, saturated: impl IntoIterator<Item = bool>) -> Option<Response> {
        let generation = matches!(route, "/v1/chat/completions" | "/v1/completions" | "/generate");
        let mut flags = saturated.into_iter().peekable();
        let any = flags.peek().is_some();
        (generation && any && flags.all(|s| s)).then(|| replay("elsewhere=true", "overloaded"))
    }

    /// After the handler: its refusal (a full queue, a model not served here) as a replay.
    pub fn replay_after(&self, response: Response) -> Response {
        let target = match response.extensions().get::<Error>() {
            Some(Error::Overloaded { .. }) => Some(("elsewhere=true".to_string(), "overloaded")),
            Some(Error::UnknownModel { name, .. }) if !name.is_empty() => {
                let to = self.regions.get(name).map_or("elsewhere=true".to_string(), |r| format!("region={r}"));
                Some((to, "model_not_served"))
            }
            _ => None,
        };
        match target {
            Some((to, reason)) => replay(&to, reason),
            None => response,
        }
    }
}

fn replay(to: &str, reason: &'static str) -> Response {
    METRICS.fleet_replays.with_label_values(&[reason]).inc();
    let body = json!({"error": {
        "message": format!("this Machine cannot take the request ({reason}); Fly's proxy replays it ({to})"),
        "type": "server_error",
        "code": "fly_replay",
        "param": null,
    }});
    let mut response = (StatusCode::CONFLICT, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        response.headers_mut().insert("fly-replay", v);
    }
    response
}
