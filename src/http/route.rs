//! `POST /v1/chat/completions` with routing, and `POST /route`.
//!
//! `model: "auto"` asks the router where the request should run (see `crate::routing`) and
//! runs it there, falling back to the other tier when the chosen one fails: at the edge,
//! admission refused, a model error, or no first token within `routing.edge_timeout_ms`
//! (for streams, always before any byte reached the client); in the cloud, an error, a
//! timeout or an open circuit. Every answer says where it ran and why
//! (`x-edgenode-route`, `x-edgenode-route-reason`). A request that names a local model, or
//! the upstream's model, runs exactly there.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};

use super::cached::embed_normalized;
use super::fields;
use super::generate::{
    begin_prepared, chat_local, collect_after, record_attribution, stream_response_with_headers, to_chat, ChatFormat, ChatRequest, LogprobStyle,
};
use super::json::{from_value, JsonBody};
use super::sse::{OnEnd, PieceFormat};
use super::AppState;
use crate::cache::Directive;
use crate::config::ModelKind;
use crate::encoder::tokenize::{Text, Truncation};
use crate::error::Error;
use crate::generate::template::ChatMessage;
use crate::generate::{Generation, Piece, PromptInput};
use crate::routing::ledger::Tier;
use crate::routing::policy::{self, Confidence, EdgeFit, Features, Verdict};
use crate::routing::quality::FeedbackRefusal;
use crate::routing::upstream::{Answer, UpstreamError, UsageSniffer};
use crate::routing::Answered;
use crate::telemetry::metrics::METRICS;

/// The model name that asks the router to choose.
pub const AUTO: &str = "auto";

/// `POST /v1/chat/completions`.
pub async fn chat(State(node): State<AppState>, headers: HeaderMap, JsonBody(raw): JsonBody<Value>) -> Result<Response, Error> {
    let directive = Directive::from_headers(&headers);
    fields::check(&raw, fields::CHAT)?;
    record_attribution(&raw)?;
    let req: ChatRequest = from_value(raw.clone())?;
    let model = req.model.clone().unwrap_or_default();
    refill_budgets(&node).await;
    if model == AUTO {
        return routed(node, raw, req, directive).await;
    }
    let explicit_cloud = node.router.upstream.as_ref().is_some_and(|u| u.model == model) && node.registry.get(&model).is_none();
    if explicit_cloud {
        // Named explicitly: it runs there, with no re-routing and no fallback; the cloud's
        // daily budget binds it as it binds a routed request.
        req.sampling.params()?;
        if node.router.over_budget(Tier::Cloud) {
            return Err(Error::BudgetExceeded(format!(
                "the cloud tier's daily budget (costs.cloud_daily_budget_usd = {}) is spent; model {model:?} runs only there",
                node.router.ledger.budget(Tier::Cloud).unwrap_or(0.0)
            )));
        }
        let started = Instant::now();
        node.router.count_decision(Tier::Cloud, "explicit");
        let mut response = run_cloud(&node, &raw, req.stream, started, false, false).await?;
        mark(&mut response, Tier::Cloud, "explicit");
        return Ok(response);
    }
    chat_local(node, req, directive).await
}

/// Renews the tier budgets whose fleet lease is used up, before anything is decided (a
/// round trip to the fleet store, only then).
async fn refill_budgets(node: &AppState) {
    // A second time only when the first lease went to other requests first.
    for _ in 0..2 {
        let refill = node.router.budgets_to_refill();
        if refill.is_empty() {
            return;
        }
        node.quotas.refill(&refill, node.as_ref()).await;
    }
}

/// `POST /route`: the decision for a chat request, without running it.
pub async fn route(State(node): State<AppState>, JsonBody(raw): JsonBody<Value>) -> Result<Json<Value>, Error> {
    fields::check(&raw, fields::CHAT)?;
    refill_budgets(&node).await;
    let req: ChatRequest = from_value(raw)?;
    req.sampling.decoding(LogprobStyle::Chat)?;
    let decision = decide(&node, &req).await?;
    let model = match decision.tier {
        Tier::Edge => node.router.cfg.local_model.clone(),
        Tier::Cloud => node.router.upstream.as_ref().map(|u| u.model.clone()).unwrap_or_default(),
    };
    Ok(Json(json!({
        "tier": decision.tier,
        "reason": decision.reason,
        "model": model,
        "fits_edge": decision.fits_edge,
        "split": decision.split,
        "features": decision.features,
        "threshold": (node.router.cfg.threshold as f64 * 1000.0).round() / 1000.0,
    })))
}

/// Decides, runs, and falls back.
async fn routed(node: AppState, raw: Value, req: ChatRequest, directive: Directive) -> Result<Response, Error> {
    req.sampling.decoding(LogprobStyle::Chat)?;
    let started = Instant::now();
    let stream = req.stream;
    let mut decision = decide(&node, &req).await?;
    let prepared = decision.prepared.take();
    let router = &node.router;
    let edge = EdgeRequest { messages: decision.messages.take().unwrap_or_default(), stream, req, directive };
    let (mut response, tier, reason) = match decision.tier {
        Tier::Edge => {
            let deadline = router.cloud_usable().then(|| Duration::from_millis(router.cfg.edge_timeout_ms));
            let shadow = router.draw_shadow().then(|| raw.clone());
            match run_edge(&node, &edge, prepared, deadline, &decision, false, started, shadow).await {
                Ok(r) => (r, Tier::Edge, decision.reason.clone()),
                Err(e) if fallback_worthy(&e) && router.cloud_usable() => {
                    let why = format!("fallback_from_edge: {}; routed edge: {}", e.code(), decision.reason);
                    tracing::info!(reason = %why, "edge failed; sending to the cloud: {e}");
                    match run_cloud(&node, &raw, stream, started, decision.split, true).await {
                        Ok(r) => (r, Tier::Cloud, why),
                        Err(cloud) => return Err(both_failed(&e, &cloud)),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Tier::Cloud => match run_cloud(&node, &raw, stream, started, decision.split, false).await {
            Ok(r) => (r, Tier::Cloud, decision.reason.clone()),
            Err(e) if decision.fits_edge && !router.over_budget(Tier::Edge) => {
                let why = format!("fallback_from_cloud: {}; routed cloud: {}", e.code(), decision.reason);
                tracing::warn!(reason = %why, "cloud failed; answering at the edge: {e}");
                match run_edge(&node, &edge, prepared, None, &decision, true, started, None).await {
                    Ok(r) => (r, Tier::Edge, why),
                    Err(local) => return Err(both_failed(&local, &e)),
                }
            }
            Err(e) => return Err(e),
        },
    };
    router.count_decision(tier, &reason);
    mark(&mut response, tier, &reason);
    Ok(response)
}

/// Where a routed request goes and why, with what was learned while deciding.
#[derive(Debug)]
struct Decision {
    tier: Tier,
    reason: String,
    /// The request fits the local model (context, admission shape); fallback to the edge needs it.
    fits_edge: bool,
    /// Chosen by the A/B split rather than by confidence.
    split: bool,
    features: Features,
    /// The prompt as the local model tokenized it while deciding, so running at the edge
    /// does not render and tokenize it again.
    prepared: Option<crate::generate::Prepared>,
    /// The conversation as the local template takes it (when the edge can take it at all).
    messages: Option<Vec<ChatMessage>>,
}

/// Gathers what the policy decides on (the prompt at the local model; the classifier's
/// confidence only when the policy asks for it) and runs the policy.
async fn decide(node: &AppState, req: &ChatRequest) -> Result<Decision, Error> {
    let router = &node.router;
    let max_tokens = req.sampling.max_tokens()?;
    if req.messages.is_empty() {
        return Err(Error::EmptyInput("messages".into()));
    }
    let mut features = Features { prompt_tokens: None, max_tokens, messages: req.messages.len(), edge_confidence: None };
    let mut prepared = None;
    let mut chat = None;
    let fit = match node.registry.resolve(Some(&router.cfg.local_model), ModelKind::Generate) {
        Err(_) => EdgeFit::NoModel,
        Ok(slot) => match slot.ready_service(node.ready_wait()).await.ok().and_then(|s| s.generator(slot.name()).ok().cloned()) {
            None => EdgeFit::Unavailable,
            Some(g) => match req.edge_refusal(slot.name(), g.info.template_tools) {
                Some(refusal) => EdgeFit::Unsupported(unsupported_field(&refusal)),
                None => {
                    let messages = to_chat(&req.messages)?;
                    let fit = prepare_at_edge(&g, &messages, max_tokens, &mut features, &mut prepared).await?;
                    chat = Some(messages);
                    fit
                }
            },
        },
    };
    let mut inputs = router.inputs(features, fit);
    let mut verdict = policy::decide(&router.cfg, &inputs);
    if verdict == Verdict::AskClassifier {
        let text = req.messages.iter().rev().find(|m| m.role == super::generate::Role::User).map(|m| m.content.clone()).unwrap_or_default();
        inputs.confidence = match edge_confidence(node, text).await {
            Ok(p) => {
                inputs.features.edge_confidence = Some(p);
                Confidence::Scored(p)
            }
            Err(e) => {
                tracing::warn!("routing classifier failed, sending to the cloud: {e}");
                Confidence::Failed
            }
        };
        verdict = policy::decide(&router.cfg, &inputs);
    }
    match verdict {
        Verdict::Route(r) => Ok(Decision {
            tier: r.tier,
            reason: r.reason,
            fits_edge: fit == EdgeFit::Fits,
            split: r.split,
            features: inputs.features,
            prepared,
            messages: chat,
        }),
        Verdict::BudgetExceeded(message) => Err(Error::BudgetExceeded(message)),
        Verdict::AskClassifier => Err(Error::Internal("the routing policy asked for the classifier twice".into())),
    }
}

/// The top-level request field an edge refusal is about (`messages[2].role` → `messages`),
/// for the route reason.
fn unsupported_field(refusal: &Error) -> &'static str {
    const FIELDS: [&str; 7] = ["tools", "tool_choice", "n", "store", "service_tier", "modalities", "messages"];
    let field = match refusal {
        Error::InvalidField { field, .. } => field.split(['[', '.']).next().unwrap_or(""),
        _ => "",
    };
    FIELDS.into_iter().find(|f| *f == field).unwrap_or("request")
}

/// Renders and tokenizes the conversation at the local model: does it fit?
async fn prepare_at_edge(
    g: &crate::generate::GenerateService,
    messages: &[ChatMessage],
    max_tokens: Option<i64>,
    features: &mut Features,
    prepared: &mut Option<crate::generate::Prepared>,
) -> Result<EdgeFit, Error> {
    Ok(match g.prepare(PromptInput::Chat(messages.to_vec()), max_tokens).await {
        Ok(p) => {
            features.prompt_tokens = Some(p.tokens.len());
            *prepared = Some(p);
            EdgeFit::Fits
        }
        Err(Error::ContextExceeded { .. }) => EdgeFit::ExceedsContext,
        Err(Error::MaxTokensTooLarge { .. }) => EdgeFit::ExceedsMaxTokens,
        // The request itself is wrong: it fails the same on every tier.
        Err(e @ (Error::InvalidField { .. } | Error::EmptyInput(_) | Error::MissingField(_))) => return Err(e),
        Err(_) => EdgeFit::Unavailable,
    })
}

/// The configured classifier's confidence that `text` is edge-shaped.
async fn edge_confidence(node: &AppState, text: String) -> Result<f32, Error> {
    let cfg = &node.router.cfg;
    let slot = node.registry.resolve(Some(&cfg.classifier), ModelKind::Classify)?;
    let service = slot.ready_service(node.ready_wait()).await?;
    let (scored, _) = service.classify(slot.name(), vec![Text::One(text)], Truncation::Right, false).await?;
    scored
        .into_iter()
        .next()
        .unwrap_or_default()
        .into_iter()
        .find(|(label, _)| *label == cfg.edge_label)
        .map(|(_, s)| s)
        .ok_or_else(|| Error::Internal(format!("routing.classifier {} has no label {:?}", cfg.classifier, cfg.edge_label)))
}

/// Only failures of capacity or health move a request to the other tier; a request that is
/// itself wrong fails the same everywhere.
fn fallback_worthy(e: &Error) -> bool {
    matches!(
        e,
        Error::Overloaded { .. }
            | Error::NotReady { .. }
            | Error::Internal(_)
            | Error::ContextExceeded { .. }
            | Error::Timeout(_)
            | Error::FirstTokenTimeout { .. }
    )
}

fn both_failed(edge: &Error, cloud: &Error) -> Error {
    let message = format!("the edge failed ({edge}) and so did the cloud ({cloud})");
    match cloud {
        Error::UpstreamTimeout(_) => Error::UpstreamTimeout(message),
        _ => Error::Upstream(message),
    }
}

fn mark(response: &mut Response, tier: Tier, reason: &str) {
    let h = response.headers_mut();
    h.insert("x-edgenode-route", HeaderValue::from_static(tier.as_str()));
    if let Ok(v) = HeaderValue::from_str(reason) {
        h.insert("x-edgenode-route-reason", v);
    }
}

/// What the edge needs to run a routed request.
struct EdgeRequest {
    messages: Vec<ChatMessage>,
    stream: bool,
    req: ChatRequest,
    directive: Directive,
}

/// Runs the request on the local model. With `first_token_within`, gives up (cancelling
/// the sequence) when no token arrives in time, so the caller can try the cloud. With
/// `shadow` (the request as the client sent it), the finished answer is also scored against
/// the cloud's, in the background.
#[allow(clippy::too_many_arguments)]
async fn run_edge(
    node: &AppState,
    edge: &EdgeRequest,
    prepared: Option<crate::generate::Prepared>,
    first_token_within: Option<Duration>,
    decision: &Decision,
    fallback: bool,
    started: Instant,
    shadow: Option<Value>,
) -> Result<Response, Error> {
    let router = &node.router;
    let slot = node.registry.resolve(Some(&router.cfg.local_model), ModelKind::Generate)?;
    let prompt = PromptInput::Chat(edge.messages.clone());
    let (_, mut generation) = begin_prepared(node, &slot, prompt, &edge.req.sampling, LogprobStyle::Chat, prepared, edge.directive).await?;
    // Attached before the first piece is taken, so the transcript is the whole answer.
    if let Some(request) = shadow.filter(|_| !matches!(generation.cache, Some("hit" | "semantic-hit"))) {
        let (node, split) = (node.clone(), decision.split);
        generation.record_into(Box::new(move |transcript| {
            tokio::spawn(shadow_compare(node, request, transcript.text(), split));
        }));
    }
    let first = match first_token_within {
        Some(limit) => tokio::time::timeout(limit, generation.next()).await.map_err(|_| Error::FirstTokenTimeout { ms: limit.as_millis() })?,
        None => generation.next().await,
    };
    let first = match first {
        Some(Piece::Error(e)) => return Err(e),
        Some(p) => p,
        None => return Err(Error::Internal("the edge generation ended without output".into())),
    };
    let mut format = ChatFormat::new(slot.name(), &edge.req)?;
    let (split, model) = (decision.split, slot.name().to_string());
    router.quality.remember(&format.id, Tier::Edge, split);
    let cached = matches!(generation.cache, Some("hit" | "semantic-hit"));
    let answered = move |prompt_tokens: usize, completion_tokens: usize| Answered {
        tier: Tier::Edge,
        model,
        split,
        fallback,
        cached,
        total_s: started.elapsed().as_secs_f64(),
        prompt_tokens: prompt_tokens as u64,
        completion_tokens: completion_tokens as u64,
    };
    if edge.stream {
        let mut prelude = vec![format.opening()];
        prelude.extend(format.format(&first));
        let node2 = node.clone();
        let record: OnEnd = Box::new(move |g: &Generation, completed: bool| {
            if completed {
                node2.router.record(&answered(g.prompt_tokens, g.completion_tokens()));
            }
        });
        return Ok(stream_response_with_headers(node, "/v1/chat/completions", &slot, generation, prelude, format, Some(record)));
    }
    let done = collect_after(Some(first), generation).await?;
    router.record(&answered(done.usage.prompt_tokens, done.usage.completion_tokens));
    Ok(super::generate::headers(Json(format.completion(&done)).into_response(), &slot, &done.generation))
}

/// Sends the request to the upstream (as its model), passing a stream through chunk by chunk.
async fn run_cloud(node: &AppState, raw: &Value, stream: bool, started: Instant, split: bool, fallback: bool) -> Result<Response, Error> {
    let router: &crate::routing::Router = &node.router;
    let upstream = router.upstream.as_ref().ok_or(UpstreamError::NotConfigured)?;
    let mut body = raw.clone();
    body["model"] = json!(upstream.model);
    if stream {
        // Ask for the usage chunk so the ledger can count streamed tokens.
        body["stream_options"] = json!({"include_usage": true});
    }
    let model = upstream.model.clone();
    let base_url = upstream.base_url.clone();
    let caller = crate::accounts::current();
    match upstream.chat(&body, stream).await? {
        Answer::Json { status, body } => {
            if (200..300).contains(&status) {
                let usage = &body["usage"];
                let (p, c) = (usage["prompt_tokens"].as_u64().unwrap_or(0), usage["completion_tokens"].as_u64().unwrap_or(0));
                router.quality.remember(body["id"].as_str().unwrap_or(""), Tier::Cloud, split);
                let cost = router.record(&Answered {
                    tier: Tier::Cloud,
                    model,
                    split,
                    fallback,
                    cached: false,
                    total_s: started.elapsed().as_secs_f64(),
                    prompt_tokens: p,
                    completion_tokens: c,
                });
                node.accounts.charge(caller.as_deref(), p + c, cost, false);
            }
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut response = (code, Json(body)).into_response();
            upstream_header(&mut response, &base_url);
            Ok(response)
        }
        Answer::Stream { first, rest } => {
            let mut ledger =
                StreamLedger { node: node.clone(), model, split, fallback, started, sniffer: UsageSniffer::default(), open: true, caller };
            let chunks = stream::once(async move { Ok(first) }).chain(rest);
            let body = chunks.map(move |chunk| match chunk {
                Ok(bytes) => {
                    ledger.observe(&bytes);
                    Ok(bytes)
                }
                Err(e) => {
                    ledger.close();
                    Err(std::io::Error::other(e))
                }
            });
            let mut response = Response::new(Body::from_stream(body));
            response.headers_mut().insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            response.headers_mut().insert(axum::http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            upstream_header(&mut response, &base_url);
            Ok(response)
        }
    }
}

/// Writes a passed-through cloud stream into the ledger once: as soon as its usage chunk
/// goes by (before the client can read it), else when the stream ends or breaks.
struct StreamLedger {
    node: AppState,
    model: String,
    split: bool,
    fallback: bool,
    started: Instant,
    sniffer: UsageSniffer,
    open: bool,
    /// Whom the stream's tokens are charged to (taken while the request was handled).
    caller: Option<std::sync::Arc<crate::accounts::Caller>>,
}

impl StreamLedger {
    fn observe(&mut self, bytes: &[u8]) {
        self.sniffer.feed(bytes);
        if self.sniffer.seen {
            self.close();
        }
    }

    fn close(&mut self) {
        if std::mem::take(&mut self.open) {
            let (p, c) = (self.sniffer.prompt_tokens, self.sniffer.completion_tokens);
            if let Some(id) = &self.sniffer.id {
                self.node.router.quality.remember(id, Tier::Cloud, self.split);
            }
            let cost = self.node.router.record(&Answered {
                tier: Tier::Cloud,
                model: self.model.clone(),
                split: self.split,
                fallback: self.fallback,
                cached: false,
                total_s: self.started.elapsed().as_secs_f64(),
                prompt_tokens: p,
                completion_tokens: c,
            });
            self.node.accounts.charge(self.caller.as_deref(), p + c, cost, false);
        }
    }
}

impl Drop for StreamLedger {
    fn drop(&mut self) {
        self.close();
    }
}

fn upstream_header(response: &mut Response, base_url: &str) {
    if let Ok(v) = HeaderValue::from_str(base_url) {
        response.headers_mut().insert("x-edgenode-upstream", v);
    }
}

/// Sends an edge-answered request to the cloud as well and scores the edge's answer by the
/// cosine of the two answers' embeddings. Runs after the client has its answer; the cloud's
/// tokens are spend like any other (the ledger counts them, its budget stops them).
async fn shadow_compare(node: AppState, mut request: Value, edge_text: String, split: bool) {
    let router = &node.router;
    let Some(upstream) = router.upstream.as_ref().filter(|_| router.cloud_usable()) else {
        METRICS.shadow_requests.with_label_values(&["skipped"]).inc();
        return;
    };
    request["model"] = json!(upstream.model);
    request["stream"] = json!(false);
    if let Some(o) = request.as_object_mut() {
        o.remove("stream_options");
    }
    let outcome = async {
        let body = match upstream.chat(&request, false).await? {
            Answer::Json { status, body } if (200..300).contains(&status) => body,
            Answer::Json { status, .. } => return Err(Error::Upstream(format!("the cloud answered {status}"))),
            Answer::Stream { .. } => return Err(Error::Upstream("the cloud streamed a non-streamed request".into())),
        };
        let usage = &body["usage"];
        router.ledger.record(
            Tier::Cloud,
            &upstream.model,
            usage["prompt_tokens"].as_u64().unwrap_or(0),
            usage["completion_tokens"].as_u64().unwrap_or(0),
        );
        let cloud_text = body["choices"][0]["message"]["content"].as_str().unwrap_or("").to_string();
        let vectors = embed_normalized(&node, None, vec![edge_text, cloud_text]).await?;
        let [edge, cloud] = vectors.as_slice() else {
            return Err(Error::Internal(format!("the embedder answered {} vectors for 2 texts", vectors.len())));
        };
        let cosine: f32 = edge.iter().zip(cloud).map(|(a, b)| a * b).sum();
        Ok::<f64, Error>(cosine.clamp(0.0, 1.0) as f64)
    };
    match outcome.await {
        Ok(score) => {
            METRICS.shadow_requests.with_label_values(&["scored"]).inc();
            router.quality.shadow(split, score);
        }
        Err(e) => {
            METRICS.shadow_requests.with_label_values(&["failed"]).inc();
            tracing::warn!("shadow comparison failed: {e}");
        }
    }
}

/// `POST /v1/feedback {"id", "score", "comment"?}`: a client's score (0..1) for an answer it
/// got within `routing.feedback_window_s`, counted for the tier that answered it.
pub async fn feedback(State(node): State<AppState>, JsonBody(raw): JsonBody<Value>) -> Result<Json<Value>, Error> {
    fields::check(&raw, fields::FEEDBACK)?;
    let id = match raw.get("id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) => return Err(Error::EmptyInput("id".into())),
        Some(other) => return Err(Error::field("id", format!("must be a response id string, got {other}"))),
        None => return Err(Error::MissingField("id".into())),
    };
    let score = match raw.get("score") {
        Some(Value::Number(n)) => {
            n.as_f64().filter(|s| (0.0..=1.0).contains(s)).ok_or_else(|| Error::field("score", format!("must be between 0 and 1, got {n}")))?
        }
        Some(other) => return Err(Error::field("score", format!("must be a number between 0 and 1, got {other}"))),
        None => return Err(Error::MissingField("score".into())),
    };
    let comment = match raw.get("comment") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) if c.chars().count() <= 4096 => Some(c.as_str()),
        Some(Value::String(_)) => return Err(Error::field("comment", "at most 4096 characters")),
        Some(other) => return Err(Error::field("comment", format!("must be a string, got {other}"))),
    };
    let window = node.router.cfg.feedback_window_s;
    let tier = node.router.quality.feedback(&id, score).map_err(|refusal| match refusal {
        FeedbackRefusal::Unknown => Error::field("id", format!("no answer {id:?} within the last {window} s (routing.feedback_window_s)")),
        FeedbackRefusal::AlreadyScored => Error::field("id", format!("answer {id:?} was scored already; the first score counts")),
    })?;
    tracing::info!(id = %id, tier = tier.as_str(), score, comment, "feedback");
    Ok(Json(json!({"id": id, "tier": tier, "score": score, "recorded": true})))
}
