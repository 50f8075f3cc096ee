//! The routing policy: where an `auto` request goes, as a pure function of what was
//! gathered about it (its shape at the local model, the classifier's confidence) and of
//! the node's state (an upstream, its circuit, the budgets, the split draw).
//!
//! The HTTP layer gathers; this module only decides, so every branch of the README's
//! routing section is a unit test here. The classifier is the one costly input: `decide`
//! asks for it (`Verdict::AskClassifier`) only when nothing cheaper settled the question.

use serde::Serialize;

use super::ledger::Tier;
use crate::config::{RoutingConfig, RoutingMode};

/// Whether the request fits the local model, and why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeFit {
    Fits,
    /// Prompt plus `max_tokens` over the local context.
    ExceedsContext,
    /// `max_tokens` over `limits.max_tokens`.
    ExceedsMaxTokens,
    /// The local model is not ready (loading, restarting, failed).
    Unavailable,
    /// No generate model named `routing.local_model` is served.
    NoModel,
    /// The request asks for something the local model cannot do (tools, `n` > 1, …); the
    /// field it names.
    Unsupported(&'static str),
}

impl EdgeFit {
    fn reason(self) -> String {
        let fixed = match self {
            EdgeFit::Unsupported(field) => return format!("edge_unsupported: {field}"),
            EdgeFit::Fits => "fits",
            EdgeFit::ExceedsContext => "exceeds_edge_context",
            EdgeFit::ExceedsMaxTokens => "exceeds_edge_max_tokens",
            EdgeFit::Unavailable => "edge_unavailable",
            EdgeFit::NoModel => "no_edge_model",
        };
        fixed.to_string()
    }
}

/// The classifier's answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Confidence {
    /// Not asked yet.
    NotAsked,
    /// Its confidence that the request is edge-shaped.
    Scored(f32),
    /// It could not answer.
    Failed,
}

/// What the router looked at, as `/route` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Features {
    pub prompt_tokens: Option<usize>,
    pub max_tokens: Option<i64>,
    pub messages: usize,
    /// The classifier's confidence that the request is edge-shaped.
    pub edge_confidence: Option<f32>,
}

/// Everything the policy decides on.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub features: Features,
    pub fit: EdgeFit,
    pub confidence: Confidence,
    /// An upstream is configured.
    pub has_upstream: bool,
    /// The upstream's breaker would let a call through now (closed, or due for a probe).
    pub cloud_accepting: bool,
    pub edge_over_budget: bool,
    pub cloud_over_budget: bool,
    /// Split mode's draw for this request: `true` sends it to the edge.
    pub split_draw_edge: bool,
}

/// Where the request goes, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub tier: Tier,
    pub reason: String,
    /// Chosen by the A/B split rather than by the policy.
    pub split: bool,
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Route(Route),
    /// Only the classifier can settle it: score the last user message and decide again.
    AskClassifier,
    /// Every tier that could answer has spent its budget.
    BudgetExceeded(String),
}

fn route(tier: Tier, reason: impl Into<String>) -> Route {
    Route { tier, reason: reason.into(), split: false }
}

/// Decides where a request goes. Pure: same inputs, same verdict.
pub fn decide(cfg: &RoutingConfig, r: &Inputs) -> Verdict {
    let fits = r.fit == EdgeFit::Fits;
    let chosen = if !r.has_upstream {
        route(Tier::Edge, "no_upstream")
    } else if let EdgeFit::Unsupported(_) = r.fit {
        // Not even an A/B split sends the edge a request it would have to refuse.
        route(Tier::Cloud, r.fit.reason())
    } else if cfg.mode == RoutingMode::Split {
        Route { tier: if r.split_draw_edge { Tier::Edge } else { Tier::Cloud }, reason: "split".into(), split: true }
    } else if !fits {
        route(Tier::Cloud, r.fit.reason())
    } else if r.features.messages > cfg.max_edge_messages {
        route(Tier::Cloud, "long_conversation")
    } else if r.features.prompt_tokens.unwrap_or(0) > cfg.max_edge_prompt_tokens {
        route(Tier::Cloud, "long_prompt")
    } else if r.features.max_tokens.is_some_and(|m| m > cfg.max_edge_completion_tokens as i64) {
        route(Tier::Cloud, "long_answer")
    } else {
        match r.confidence {
            Confidence::NotAsked => return Verdict::AskClassifier,
            Confidence::Scored(p) if p >= cfg.threshold => route(Tier::Edge, format!("confident ({p:.2} >= {})", cfg.threshold)),
            Confidence::Scored(p) => route(Tier::Cloud, format!("low_confidence ({p:.2} < {})", cfg.threshold)),
            Confidence::Failed => route(Tier::Cloud, "classifier_unavailable"),
        }
    };
    // An open circuit would refuse the call at once: a request the edge can take goes there.
    let chosen = if chosen.tier == Tier::Cloud && !chosen.split && r.has_upstream && !r.cloud_accepting && fits {
        route(Tier::Edge, "cloud_circuit_open")
    } else {
        chosen
    };
    // Budgets: an exhausted tier is not chosen; with both exhausted nothing is.
    let over = |t: Tier| match t {
        Tier::Edge => r.edge_over_budget,
        Tier::Cloud => r.cloud_over_budget,
    };
    if !over(chosen.tier) {
        return Verdict::Route(chosen);
    }
    let other = chosen.tier.other();
    let other_possible = match other {
        Tier::Edge => fits,
        Tier::Cloud => r.has_upstream,
    };
    if other_possible && !over(other) {
        Verdict::Route(route(other, format!("{}_budget_exhausted", chosen.tier.as_str())))
    } else {
        Verdict::BudgetExceeded(format!("the {} tier's daily budget is spent and no other tier can answer this request", chosen.tier.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RoutingConfig {
        RoutingConfig::default()
    }

    /// A short, edge-shaped request on a node with a healthy upstream and budget left.
    fn short() -> Inputs {
        Inputs {
            features: Features { prompt_tokens: Some(20), max_tokens: Some(32), messages: 1, edge_confidence: None },
            fit: EdgeFit::Fits,
            confidence: Confidence::NotAsked,
            has_upstream: true,
            cloud_accepting: true,
            edge_over_budget: false,
            cloud_over_budget: false,
            split_draw_edge: true,
        }
    }

    fn routed(v: Verdict) -> (Tier, String) {
        match v {
            Verdict::Route(r) => (r.tier, r.reason),
            other => panic!("expected a route, got {other:?}"),
        }
    }

    #[test]
    fn the_classifier_is_asked_only_when_nothing_cheaper_decides() {
        assert_eq!(decide(&cfg(), &short()), Verdict::AskClassifier);
        let mut long = short();
        long.features.prompt_tokens = Some(5_000);
        assert_eq!(routed(decide(&cfg(), &long)), (Tier::Cloud, "long_prompt".into()));
    }

    #[test]
    fn confidence_at_or_above_the_threshold_stays_at_the_edge() {
        let c = cfg();
        let mut r = short();
        r.confidence = Confidence::Scored(c.threshold);
        assert_eq!(routed(decide(&c, &r)), (Tier::Edge, format!("confident ({:.2} >= {})", c.threshold, c.threshold)));
        r.confidence = Confidence::Scored(0.1);
        let (tier, reason) = routed(decide(&c, &r));
        assert_eq!(tier, Tier::Cloud);
        assert!(reason.starts_with("low_confidence (0.10 <"), "{reason}");
        r.confidence = Confidence::Failed;
        assert_eq!(routed(decide(&c, &r)), (Tier::Cloud, "classifier_unavailable".into()));
    }

    #[test]
    fn cheap_features_veto_the_edge() {
        let c = cfg();
        type Change<'a> = &'a dyn Fn(&mut Inputs);
        let cases: [(Change, &str); 8] = [
            (&|r| r.features.messages = c.max_edge_messages + 1, "long_conversation"),
            (&|r| r.features.prompt_tokens = Some(c.max_edge_prompt_tokens + 1), "long_prompt"),
            (&|r| r.features.max_tokens = Some(c.max_edge_completion_tokens as i64 + 1), "long_answer"),
            (&|r| r.fit = EdgeFit::ExceedsContext, "exceeds_edge_context"),
            (&|r| r.fit = EdgeFit::ExceedsMaxTokens, "exceeds_edge_max_tokens"),
            (&|r| r.fit = EdgeFit::Unavailable, "edge_unavailable"),
            (&|r| r.fit = EdgeFit::NoModel, "no_edge_model"),
            (&|r| r.fit = EdgeFit::Unsupported("tools"), "edge_unsupported: tools"),
        ];
        for (change, reason) in cases {
            let mut r = short();
            r.confidence = Confidence::Scored(1.0);
            change(&mut r);
            assert_eq!(routed(decide(&c, &r)), (Tier::Cloud, reason.to_string()));
        }
    }

    #[test]
    fn without_an_upstream_everything_is_the_edges() {
        let mut r = short();
        r.has_upstream = false;
        r.fit = EdgeFit::ExceedsContext;
        assert_eq!(routed(decide(&cfg(), &r)), (Tier::Edge, "no_upstream".into()));
    }

    #[test]
    fn a_request_the_edge_cannot_honour_goes_to_the_cloud_even_in_a_split() {
        let mut r = short();
        r.fit = EdgeFit::Unsupported("n");
        r.split_draw_edge = true;
        let c = RoutingConfig { mode: RoutingMode::Split, ..cfg() };
        assert_eq!(routed(decide(&c, &r)), (Tier::Cloud, "edge_unsupported: n".into()));
        r.cloud_accepting = false;
        assert_eq!(routed(decide(&c, &r)).0, Tier::Cloud, "an open circuit does not send it to an edge that would refuse it");
    }

    #[test]
    fn split_mode_follows_the_draw_and_ignores_confidence() {
        let c = RoutingConfig { mode: RoutingMode::Split, ..cfg() };
        let mut r = short();
        for (draw, tier) in [(true, Tier::Edge), (false, Tier::Cloud)] {
            r.split_draw_edge = draw;
            let Verdict::Route(route) = decide(&c, &r) else { panic!() };
            assert_eq!((route.tier, route.reason.as_str(), route.split), (tier, "split", true));
        }
    }

    #[test]
    fn an_open_circuit_sends_what_fits_to_the_edge_and_the_rest_to_fail_fast() {
        let mut r = short();
        r.cloud_accepting = false;
        r.confidence = Confidence::Scored(0.0);
        assert_eq!(routed(decide(&cfg(), &r)), (Tier::Edge, "cloud_circuit_open".into()));
        r.fit = EdgeFit::ExceedsContext;
        assert_eq!(routed(decide(&cfg(), &r)), (Tier::Cloud, "exceeds_edge_context".into()));
    }

    #[test]
    fn an_exhausted_tier_hands_over_and_with_none_left_the_budget_is_exceeded() {
        let mut r = short();
        r.confidence = Confidence::Scored(1.0);
        r.edge_over_budget = true;
        assert_eq!(routed(decide(&cfg(), &r)), (Tier::Cloud, "edge_budget_exhausted".into()));
        r.edge_over_budget = false;
        r.cloud_over_budget = true;
        r.confidence = Confidence::Scored(0.0);
        assert_eq!(routed(decide(&cfg(), &r)), (Tier::Edge, "cloud_budget_exhausted".into()));
        r.fit = EdgeFit::ExceedsContext;
        assert!(matches!(decide(&cfg(), &r), Verdict::BudgetExceeded(m) if m.contains("cloud tier's daily budget")));
        r.fit = EdgeFit::Fits;
        r.edge_over_budget = true;
        assert!(matches!(decide(&cfg(), &r), Verdict::BudgetExceeded(_)));
    }
}
