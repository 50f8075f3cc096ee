//! The edge routing tier: for `model: "auto"`, decide per request whether the local model
//! answers (the edge) or the configured upstream does (the cloud), with fallback both ways,
//! a cost ledger with budgets, the design's economic viability test computed live, and an
//! A/B split mode.
//!
//! The decision is `policy::decide`, a pure function of the request's features (prompt
//! tokens with the local model's own tokenizer and chat template, requested `max_tokens`,
//! conversation length, the `router` classifier's confidence that it is edge-shaped) and
//! of the node's state (`Router::inputs`: upstream, circuit, budgets, split draw). The HTTP
//! side (`crate::http::route`) gathers the features, runs the decision and falls back when
//! a tier fails.

pub mod breaker;
pub mod ledger;
pub mod policy;
pub mod quality;
pub mod upstream;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::{Config, CostsConfig, RoutingConfig, RoutingMode};
use crate::quota::{minute_now, Check, Quotas, Scope, DAY_MINUTES};
use crate::state::{unix_ms, Changes, Durable, Journal, Records, Stamped};
use crate::telemetry::metrics::METRICS;
use crate::telemetry::stats::percentile;
use ledger::{Ledger, Tier};
use policy::{Confidence, EdgeFit, Features, Inputs};
use quality::Quality;
use upstream::Upstream;

/// One answered routed request, as the ledger and `/stats` count it.
#[derive(Debug, Clone)]
pub struct Answered {
    pub tier: Tier,
    /// The model that answered (the local one, or the upstream's).
    pub model: String,
    pub split: bool,
    pub fallback: bool,
    /// Answered from the response cache: no model ran, nothing was spent.
    pub cached: bool,
    pub total_s: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// One routed request, for `/stats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RouteSample {
    /// Unix ms when it was answered.
    at: u64,
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

impl Stamped for RouteSample {
    fn at_ms(&self) -> u64 {
        self.at
    }
}

/// Decisions taken per (tier, reason), and those changed since the last save.
#[derive(Default)]
struct Decisions {
    counts: BTreeMap<(Tier, String), u64>,
    dirty: BTreeSet<(Tier, String)>,
}

const SECTION: &str = "routing";

/// The routing tier of one node.
pub struct Router {
    pub cfg: RoutingConfig,
    costs: CostsConfig,
    pub upstream: Option<Upstream>,
    pub ledger: Ledger,
    rng: Mutex<StdRng>,
    /// Draws which edge answers are shadowed (its own stream, so shadowing does not change
    /// the split's draws).
    shadow_rng: Mutex<StdRng>,
    /// Quality scores per tier, from feedback and shadow comparisons.
    pub quality: Quality,
    samples: Mutex<Journal<RouteSample>>,
    decisions: Mutex<Decisions>,
    /// The tier budgets' limits: this node's own, or the fleet's (`[fleet] store`).
    quotas: Arc<Quotas>,
}

impl Router {
    pub fn new(config: &Config, quotas: Arc<Quotas>) -> Result<Router, String> {
        for tier in [Tier::Edge, Tier::Cloud] {
            let budget = if tier == Tier::Edge { config.costs.edge_daily_budget_usd } else { config.costs.cloud_daily_budget_usd };
            if let Some(b) = budget {
                quotas.register(Scope::tier_cost(tier.as_str()), b);
            }
        }
        Ok(Router {
            cfg: config.routing.clone(),
            costs: config.costs.clone(),
            upstream: Upstream::new(&config.upstream)?,
            ledger: Ledger::new(&config.costs),
            rng: Mutex::new(StdRng::seed_from_u64(config.routing.split_seed)),
            shadow_rng: Mutex::new(StdRng::seed_from_u64(config.routing.split_seed ^ 0x5348_4144_4f57)),
            quality: Quality::new(Duration::from_secs(config.routing.feedback_window_s)),
            samples: Mutex::new(Journal::new("s/", MAX_SAMPLES, WINDOW)),
            decisions: Mutex::default(),
            quotas,
        })
    }

    /// Restores samples and decision counts (and the ledger and quality scores) an earlier
    /// run saved.
    pub fn restore(&self, records: &Records) {
        self.ledger.restore(records);
        self.quality.restore(records);
        let mut decisions = self.decisions.lock();
        for (key, n) in records.prefixed::<u64>(SECTION, "d/") {
            if let Some((tier, reason)) = key.split_once('/') {
                let tier = if tier == "edge" { Tier::Edge } else { Tier::Cloud };
                decisions.counts.insert((tier, reason.to_string()), n);
            }
        }
        self.samples.lock().restore(records, SECTION);
    }

    /// True when `tier` has a daily budget and it is spent: this node's, or with a fleet
    /// store the fleet's as this node's lease sees it (a used-up lease counts as spent until
    /// `refill_budgets` renews it).
    pub fn over_budget(&self, tier: Tier) -> bool {
        let Some(budget) = self.ledger.budget(tier) else { return false };
        self.quotas.check(&Scope::tier_cost(tier.as_str()), budget, self.ledger.day()[tier as usize].cost_usd, minute_now()) != Check::Allow
    }

    /// The tier budgets whose leases are used up (to refill before deciding).
    pub fn budgets_to_refill(&self) -> Vec<Scope> {
        [Tier::Edge, Tier::Cloud]
            .into_iter()
            .filter_map(|tier| {
                let budget = self.ledger.budget(tier)?;
                let scope = Scope::tier_cost(tier.as_str());
                let own = self.ledger.day()[tier as usize].cost_usd;
                (self.quotas.check(&scope, budget, own, minute_now()) == Check::Refill).then_some(scope)
            })
            .collect()
    }

    /// This node's spend on `tier` per minute of the rolling day (the quota meter).
    pub fn cost_minutes(&self, tier: Tier, now: u64) -> Vec<(u64, f64)> {
        self.ledger.cost_minutes(tier, now, DAY_MINUTES)
    }

    /// True when the cloud tier exists and is within budget.
    pub fn cloud_usable(&self) -> bool {
        self.upstream.is_some() && !self.over_budget(Tier::Cloud)
    }

    /// The node's side of the policy's inputs for one request: the upstream and its
    /// circuit, the budgets, and (in split mode) this request's draw.
    pub fn inputs(&self, features: Features, fit: EdgeFit) -> Inputs {
        let split_draw_edge = self.cfg.mode == RoutingMode::Split && self.rng.lock().random_bool(self.cfg.split_edge_share);
        Inputs {
            features,
            fit,
            confidence: Confidence::NotAsked,
            has_upstream: self.upstream.is_some(),
            cloud_accepting: self.upstream.as_ref().is_some_and(|u| u.breaker.accepting()),
            edge_over_budget: self.over_budget(Tier::Edge),
            cloud_over_budget: self.over_budget(Tier::Cloud),
            split_draw_edge,
        }
    }

    /// Whether this edge answer is also sent to the cloud for scoring (`shadow_rate`); never
    /// when the cloud cannot take it (no upstream, open circuit, over budget).
    pub fn draw_shadow(&self) -> bool {
        let usable = self.cloud_usable() && self.upstream.as_ref().is_some_and(|u| u.breaker.accepting());
        self.cfg.shadow_rate > 0.0 && usable && self.shadow_rng.lock().random_bool(self.cfg.shadow_rate)
    }

    /// Counts a decision as finally taken (after any fallback).
    pub fn count_decision(&self, tier: Tier, reason: &str) {
        let key = reason.split([' ', ':']).next().unwrap_or(reason).to_string();
        METRICS.route_decisions.with_label_values(&[tier.as_str(), &key]).inc();
        let mut decisions = self.decisions.lock();
        *decisions.counts.entry((tier, key.clone())).or_default() += 1;
        decisions.dirty.insert((tier, key));
    }

    /// Records one answered routed request in the ledger and `/stats`; returns its cost.
    pub fn record(&self, a: &Answered) -> f64 {
        let cost_usd = if a.cached {
            self.ledger.record_cached(a.tier, &a.model);
            0.0
        } else {
            self.ledger.record(a.tier, &a.model, a.prompt_tokens, a.completion_tokens)
        };
        self.samples.lock().push(RouteSample {
            at: unix_ms(),
            tier: a.tier,
            split: a.split,
            fallback: a.fallback,
            total_s: a.total_s,
            prompt_tokens: a.prompt_tokens,
            completion_tokens: a.completion_tokens,
            cost_usd,
        });
        cost_usd
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
        for ((tier, reason), n) in self.decisions.lock().counts.iter() {
            decisions[tier.as_str()][reason] = json!(n);
        }
        let upstream = self.upstream.as_ref().map(|u| {
            let (circuit, failures, opens) = u.breaker.snapshot();
            json!({"base_url": u.base_url, "model": u.model, "circuit": circuit, "consecutive_failures": failures, "times_opened": opens})
        });
        let mut out = json!({
            "quality": self.quality.stats(self.cfg.mode == RoutingMode::Split),
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
        // The article's A/B table, live: latency, cost and quality side by side per tier.
        let quality = self.quality.stats(self.cfg.mode == RoutingMode::Split);
        for tier in ["edge", "cloud"] {
            out["tiers"][tier]["quality"] = quality[tier]["all"].clone();
        }
        if self.cfg.mode == RoutingMode::Split {
            out["split"] = json!({
                "edge_share_target": self.cfg.split_edge_share,
                "edge": bucket(&|s| s.split && s.tier == Tier::Edge),
                "cloud": bucket(&|s| s.split && s.tier == Tier::Cloud),
            });
            for tier in ["edge", "cloud"] {
                out["split"][tier]["quality"] = quality["split"][tier]["all"].clone();
            }
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
        let (edge_q, cloud_q) = (self.quality.mean(Tier::Edge), self.quality.mean(Tier::Cloud));
        // The gap counts once both tiers have scores; shadow scores compare the edge with
        // the cloud directly (the cloud's answer scores 1 against itself).
        let cloud_ref = cloud_q.or(edge_q.map(|_| 1.0).filter(|_| self.quality.count(Tier::Edge, quality::Source::Shadow) > 0));
        let gap = edge_q.zip(cloud_ref).map(|(e, c)| c - e);
        let verdict = if edge.is_empty() {
            "no edge traffic yet"
        } else if gap.is_some_and(|g| g > self.cfg.max_quality_gap) {
            "edge not justified (quality)"
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
            "quality": {
                "edge_mean": edge_q,
                "cloud_mean": cloud_ref,
                "gap": gap,
                "max_quality_gap": self.cfg.max_quality_gap,
            },
            "verdict": verdict,
        })
    }
}

impl Durable for Router {
    fn changes(&self, out: &mut Changes) {
        self.ledger.changes(out);
        self.quality.changes(out);
        self.samples.lock().changes(SECTION, out);
        let mut decisions = self.decisions.lock();
        for (tier, reason) in std::mem::take(&mut decisions.dirty) {
            let n = decisions.counts.get(&(tier, reason.clone())).copied().unwrap_or(0);
            out.put(SECTION, &format!("d/{}/{reason}", tier.as_str()), &n);
        }
    }
}
