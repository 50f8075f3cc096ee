//! The edge routing tier: for `model: "auto"`, decide per request whether the local model
//! answers (the edge) or the configured upstream does (the cloud), with fallback both ways,
//! a cost ledger with budgets, the design's economic viability test computed live, and an
//! A/B split mode.
//!
//! The decision (`Router::decide`) uses the `router` prototype classifier's confidence that
//! the request is edge-shaped plus cheap features: prompt tokens (with the local model's own
//! tokenizer and chat template), requested `max_tokens`, and conversation length. The HTTP
//! side (`crate::http::route`) runs the decision and falls back when a tier fails.

pub mod breaker;
pub mod ledger;
pub mod upstream;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::{Config, CostsConfig, ModelKind, RoutingConfig, RoutingMode};
use crate::error::Error;
use crate::generate::template::ChatMessage;
use crate::generate::PromptInput;
use crate::node::Node;
use crate::service::Service;
use crate::telemetry::metrics::METRICS;
use crate::telemetry::stats::percentile;
use ledger::{Ledger, Tier};
use upstream::Upstream;

/// What the router looked at.
#[derive(Debug, Clone, Serialize)]
pub struct Features {
    pub prompt_tokens: Option<usize>,
    pub max_tokens: Option<i64>,
    pub messages: usize,
    /// The classifier's confidence that the request is edge-shaped.
    pub edge_confidence: Option<f32>,
}

/// Where a request goes and why.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub tier: Tier,
    pub reason: String,
    /// The request fits the local model (context, admission shape); fallback to the edge needs it.
    pub fits_edge: bool,
    /// Chosen by the A/B split rather than by confidence.
    pub split: bool,
    pub features: Features,
    /// The prompt as the local model tokenized it while deciding, so running at the edge
    /// does not render and tokenize it again.
    #[serde(skip)]
    pub prepared: Option<crate::generate::Prepared>,
}

/// One routed request, for `/stats`.
#[derive(Debug, Clone)]
struct RouteSample {
    at: Instant,
    tier: Tier,
    split: bool,
    fallback: bool,
    total_s: f64,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost_usd: f64,
}

/// Most routed requests remembered for `/stats`.
const MAX_SAMPLES: usize = 100_000;
const WINDOW: Duration = Duration::from_secs(24 * 3600);

/// The routing tier of one node.
pub struct Router {
    pub cfg: RoutingConfig,
    costs: CostsConfig,
    pub upstream: Option<Upstream>,
    pub ledger: Ledger,
    rng: Mutex<StdRng>,
    samples: Mutex<VecDeque<RouteSample>>,
    decisions: Mutex<BTreeMap<(Tier, String), u64>>,
}

impl Router {
    pub fn new(config: &Config) -> Result<Router, String> {
        Ok(Router {
            cfg: config.routing.clone(),
            costs: config.costs.clone(),
            upstream: Upstream::new(&config.upstream)?,
            ledger: Ledger::new(&config.costs),
            rng: Mutex::new(StdRng::seed_from_u64(config.routing.split_seed)),
            samples: Mutex::new(VecDeque::new()),
            decisions: Mutex::new(BTreeMap::new()),
        })
    }

    /// True when the cloud tier exists and is within budget.
    pub fn cloud_usable(&self) -> bool {
        self.upstream.is_some() && !self.ledger.over_budget(Tier::Cloud)
    }

    /// The edge's confidence for `text` from the configured classifier.
    async fn edge_confidence(&self, node: &Node, text: String) -> Result<f32, Error> {
        let slot = node.registry.resolve(Some(&self.cfg.classifier), ModelKind::Classify)?;
        let scored = match slot.ready_service(node.ready_wait()).await? {
            Service::Prototype(p) => p.classify(vec![text], true, false).await?.0,
            Service::Encoder(e) => {
                let crate::encoder::EncoderTask::Classify { labels, multi_label } = &e.task else {
                    return Err(Error::Internal(format!("routing.classifier {} has no classifier head", slot.name())));
                };
                let encoded = e.encode(vec![text], true, false).await?;
                let scores = crate::encoder::bert::class_scores(&encoded.rows.concat(), labels.len(), *multi_label, false);
                scores.into_iter().map(|row| labels.iter().cloned().zip(row).collect()).collect()
            }
            Service::Generator(_) => return Err(Error::Internal("routing.classifier is a generator".into())),
        };
        let row = scored.into_iter().next().unwrap_or_default();
        row.into_iter()
            .find(|(label, _)| *label == self.cfg.edge_label)
            .map(|(_, s)| s)
            .ok_or_else(|| Error::Internal(format!("routing.classifier {} has no label {:?}", self.cfg.classifier, self.cfg.edge_label)))
    }

    /// Decides where a chat request goes. Errors only when every tier is over budget.
    pub async fn decide(&self, node: &Node, messages: &[ChatMessage], max_tokens: Option<i64>) -> Result<Decision, Error> {
        let mut features = Features { prompt_tokens: None, max_tokens, messages: messages.len(), edge_confidence: None };
        // Does it fit the local model at all (context window, a ready model)?
        let local = node.registry.resolve(Some(&self.cfg.local_model), ModelKind::Generate);
        let mut prepared = None;
        let fits = match local {
            Ok(slot) => match slot.ready_service(node.ready_wait()).await {
                Ok(Service::Generator(g)) => match g.prepare(PromptInput::Chat(messages.to_vec()), max_tokens).await {
                    Ok(p) => {
                        features.prompt_tokens = Some(p.tokens.len());
                        prepared = Some(p);
                        Ok(())
                    }
                    Err(Error::ContextExceeded { .. }) => Err("exceeds_edge_context"),
                    Err(Error::MaxTokensTooLarge { .. }) => Err("exceeds_edge_max_tokens"),
                    Err(e @ (Error::InvalidField { .. } | Error::EmptyInput(_) | Error::MissingField(_))) => return Err(e),
                    Err(_) => Err("edge_unavailable"),
                },
                _ => Err("edge_unavailable"),
            },
            Err(_) => Err("no_edge_model"),
        };
        let fits_edge = fits.is_ok();
        let mut split = false;
        let (mut tier, mut reason) = if self.upstream.is_none() {
            (Tier::Edge, "no_upstream".to_string())
        } else if self.cfg.mode == RoutingMode::Split {
            split = true;
            let edge = self.rng.lock().random_bool(self.cfg.split_edge_share);
            if edge {
                (Tier::Edge, "split".to_string())
            } else {
                (Tier::Cloud, "split".to_string())
            }
        } else if let Err(why) = fits {
            (Tier::Cloud, why.to_string())
        } else if messages.len() > self.cfg.max_edge_messages {
            (Tier::Cloud, "long_conversation".to_string())
        } else if features.prompt_tokens.unwrap_or(0) > self.cfg.max_edge_prompt_tokens {
            (Tier::Cloud, "long_prompt".to_string())
        } else if max_tokens.is_some_and(|m| m > self.cfg.max_edge_completion_tokens as i64) {
            (Tier::Cloud, "long_answer".to_string())
        } else {
            let text = messages.iter().rev().find(|m| m.role == "user").map(|m| m.content.clone()).unwrap_or_default();
            match self.edge_confidence(node, text).await {
                Ok(p) => {
                    features.edge_confidence = Some(p);
                    if p >= self.cfg.threshold {
                        (Tier::Edge, format!("confident ({p:.2} >= {})", self.cfg.threshold))
                    } else {
                        (Tier::Cloud, format!("low_confidence ({p:.2} < {})", self.cfg.threshold))
                    }
                }
                Err(e) => {
                    tracing::warn!("routing classifier failed, sending to the cloud: {e}");
                    (Tier::Cloud, "classifier_unavailable".to_string())
                }
            }
        };
        if tier == Tier::Edge && !fits_edge && self.upstream.is_some() && !split {
            tier = Tier::Cloud;
        }
        // Budgets: an exhausted tier is not chosen; with both exhausted nothing is.
        if self.ledger.over_budget(tier) {
            let other = tier.other();
            let other_possible = match other {
                Tier::Edge => fits_edge,
                Tier::Cloud => self.upstream.is_some(),
            };
            if other_possible && !self.ledger.over_budget(other) {
                reason = format!("{}_budget_exhausted", tier.as_str());
                tier = other;
                split = false;
            } else {
                return Err(Error::BudgetExceeded(format!(
                    "the {} tier's daily budget is spent and no other tier can answer this request",
                    tier.as_str()
                )));
            }
        }
        Ok(Decision { tier, reason, fits_edge, split, features, prepared })
    }

    /// Counts a decision as finally taken (after any fallback).
    pub fn count_decision(&self, tier: Tier, reason: &str) {
        let key = reason.split([' ', ':']).next().unwrap_or(reason).to_string();
        METRICS.route_decisions.with_label_values(&[tier.as_str(), &key]).inc();
        *self.decisions.lock().entry((tier, key)).or_default() += 1;
    }

    /// Records one answered routed request in the ledger and `/stats`.
    pub fn record(&self, tier: Tier, model: &str, split: bool, fallback: bool, total_s: f64, prompt: u64, completion: u64) {
        let cost_usd = self.ledger.record(tier, model, prompt, completion);
        let mut samples = self.samples.lock();
        samples.push_back(RouteSample {
            at: Instant::now(),
            tier,
            split,
            fallback,
            total_s,
            prompt_tokens: prompt,
            completion_tokens: completion,
            cost_usd,
        });
        while samples.len() > MAX_SAMPLES || samples.front().is_some_and(|s| s.at.elapsed() > WINDOW) {
            samples.pop_front();
        }
    }

    /// The routing section of `/stats`.
    pub fn stats(&self) -> Value {
        let samples: Vec<RouteSample> = self.samples.lock().iter().cloned().collect();
        let bucket = |pick: &dyn Fn(&RouteSample) -> bool| -> Value {
            let chosen: Vec<&RouteSample> = samples.iter().filter(|s| pick(s)).collect();
            let mut ms: Vec<f64> = chosen.iter().map(|s| s.total_s * 1000.0).collect();
            ms.sort_by(|a, b| a.total_cmp(b));
            let n = chosen.len();
            json!({
                "count": n,
                "fallbacks": chosen.iter().filter(|s| s.fallback).count(),
                "latency_ms": {"p50": percentile(&ms, 0.5), "p99": percentile(&ms, 0.99), "mean": if n > 0 { ms.iter().sum::<f64>() / n as f64 } else { 0.0 }},
                "prompt_tokens": chosen.iter().map(|s| s.prompt_tokens).sum::<u64>(),
                "completion_tokens": chosen.iter().map(|s| s.completion_tokens).sum::<u64>(),
                "cost_usd": chosen.iter().fold(0.0, |a, s| a + s.cost_usd),
            })
        };
        let mut decisions = json!({"edge": {}, "cloud": {}});
        for ((tier, reason), n) in self.decisions.lock().iter() {
            decisions[tier.as_str()][reason] = json!(n);
        }
        let upstream = self.upstream.as_ref().map(|u| {
            let (circuit, failures, opens) = u.breaker.snapshot();
            json!({"base_url": u.base_url, "model": u.model, "circuit": circuit, "consecutive_failures": failures, "times_opened": opens})
        });
        let mut out = json!({
            "mode": self.cfg.mode,
            "threshold": (self.cfg.threshold as f64 * 1000.0).round() / 1000.0,
            "decisions": decisions,
            "tiers": {
                "edge": bucket(&|s| s.tier == Tier::Edge),
                "cloud": bucket(&|s| s.tier == Tier::Cloud),
            },
            "ledger": self.ledger.snapshot(),
            "viability": self.viability(&samples),
            "upstream": upstream,
        });
        if self.cfg.mode == RoutingMode::Split {
            out["split"] = json!({
                "edge_share_target": self.cfg.split_edge_share,
                "edge": bucket(&|s| s.split && s.tier == Tier::Edge),
                "cloud": bucket(&|s| s.split && s.tier == Tier::Cloud),
            });
        }
        out
    }

    /// The design's economic viability test on observed traffic: the edge's cost premium
    /// over what the same tokens cost in the cloud, against the value of the latency the
    /// edge saved (observed cloud mean minus each edge answer's latency, priced per hour).
    fn viability(&self, samples: &[RouteSample]) -> Value {
        let edge: Vec<&RouteSample> = samples.iter().filter(|s| s.tier == Tier::Edge).collect();
        let cloud: Vec<&RouteSample> = samples.iter().filter(|s| s.tier == Tier::Cloud).collect();
        let (cloud_ms, source) = if cloud.is_empty() {
            (self.costs.assumed_cloud_latency_ms, "assumed (costs.assumed_cloud_latency_ms)")
        } else {
            (cloud.iter().map(|s| s.total_s * 1000.0).sum::<f64>() / cloud.len() as f64, "observed")
        };
        let tokens: u64 = edge.iter().map(|s| s.prompt_tokens + s.completion_tokens).sum();
        let edge_cost: f64 = edge.iter().fold(0.0, |a, s| a + s.cost_usd);
        let cloud_cost_same = self.ledger.price(Tier::Cloud, tokens);
        let premium = edge_cost - cloud_cost_same;
        let saved_s: f64 = edge.iter().map(|s| (cloud_ms / 1000.0 - s.total_s).max(0.0)).sum();
        let value = saved_s / 3600.0 * self.costs.latency_usd_per_hour;
        let verdict = if edge.is_empty() {
            "no edge traffic yet"
        } else if value > premium {
            "edge justified"
        } else {
            "edge not justified"
        };
        json!({
            "edge_requests": edge.len(),
            "edge_tokens": tokens,
            "edge_cost_usd": edge_cost,
            "same_tokens_at_cloud_price_usd": cloud_cost_same,
            "cost_premium_usd": premium,
            "cloud_latency_ms": cloud_ms,
            "cloud_latency_source": source,
            "edge_latency_ms_mean": if edge.is_empty() { 0.0 } else { edge.iter().map(|s| s.total_s * 1000.0).sum::<f64>() / edge.len() as f64 },
            "latency_saved_s": saved_s,
            "latency_usd_per_hour": self.costs.latency_usd_per_hour,
            "latency_value_usd": value,
            "verdict": verdict,
        })
    }
}
