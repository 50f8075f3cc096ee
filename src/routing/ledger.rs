//! The cost ledger: tokens and spend per tier and model, over a rolling day (per-minute
//! buckets) and since start; budgets per tier; and the edge-share alert. Prices are per
//! million tokens (prompt + completion), from `[costs]`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::CostsConfig;
use crate::state::{Changes, Durable, Records};
use crate::telemetry::metrics::METRICS;

/// Where a request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Edge,
    Cloud,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Edge => "edge",
            Tier::Cloud => "cloud",
        }
    }

    pub fn other(self) -> Tier {
        match self {
            Tier::Edge => Tier::Cloud,
            Tier::Cloud => Tier::Edge,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Tokens and spend.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Totals {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
    /// Requests answered from the response cache: counted, at no cost and no tokens.
    pub cache_hits: u64,
}

impl Totals {
    fn add(&mut self, prompt: u64, completion: u64, cost: f64) {
        self.requests += 1;
        self.prompt_tokens += prompt;
        self.completion_tokens += completion;
        self.cost_usd += cost;
    }

    fn add_cached(&mut self) {
        self.requests += 1;
        self.cache_hits += 1;
    }

    fn merge(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.cost_usd += other.cost_usd;
        self.cache_hits += other.cache_hits;
    }
}

const DAY_MINUTES: u64 = 24 * 60;

#[derive(Default)]
struct Inner {
    /// (minute since the epoch, per tier) for the last 24 hours.
    minutes: VecDeque<(u64, [Totals; 2])>,
    /// Since the state began (it survives restarts), per (tier, model).
    by_model: BTreeMap<(Tier, String), Totals>,
    alerting: bool,
    /// Records changed since the state was last saved (`m/<minute>`, `model/<tier>/<model>`).
    dirty: BTreeSet<String>,
}

impl Inner {
    /// The bucket of minute `now`, created (and marked changed) on demand.
    fn bucket(&mut self, now: u64) -> &mut [Totals; 2] {
        if self.minutes.back().is_none_or(|(m, _)| *m != now) {
            self.minutes.push_back((now, [Totals::default(); 2]));
        }
        self.dirty.insert(format!("m/{now}"));
        let last = self.minutes.len() - 1;
        &mut self.minutes[last].1
    }

    fn model(&mut self, tier: Tier, model: &str) -> &mut Totals {
        self.dirty.insert(format!("model/{}/{model}", tier.as_str()));
        self.by_model.entry((tier, model.to_string())).or_default()
    }
}

/// The ledger of one node.
pub struct Ledger {
    prices: [f64; 2],
    budgets: [Option<f64>; 2],
    alert_share: f64,
    inner: Mutex<Inner>,
}

fn minute_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() / 60).unwrap_or(0)
}

impl Ledger {
    pub fn new(cfg: &CostsConfig) -> Self {
        Ledger {
            prices: [cfg.edge_usd_per_1m_tokens, cfg.cloud_usd_per_1m_tokens],
            budgets: [cfg.edge_daily_budget_usd, cfg.cloud_daily_budget_usd],
            alert_share: cfg.edge_share_alert,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// What `tokens` cost on `tier`.
    pub fn price(&self, tier: Tier, tokens: u64) -> f64 {
        tokens as f64 * self.prices[tier.index()] / 1e6
    }

    /// Records one answer from the response cache: a request at no cost.
    pub fn record_cached(&self, tier: Tier, model: &str) {
        let now = minute_now();
        let mut inner = self.inner.lock();
        inner.bucket(now)[tier.index()].add_cached();
        inner.model(tier, model).add_cached();
    }

    /// Records one answered request; returns its cost.
    pub fn record(&self, tier: Tier, model: &str, prompt: u64, completion: u64) -> f64 {
        let cost = self.price(tier, prompt + completion);
        let now = minute_now();
        let mut inner = self.inner.lock();
        inner.bucket(now)[tier.index()].add(prompt, completion, cost);
        while let Some((m, _)) = inner.minutes.front().copied().filter(|(m, _)| now.saturating_sub(*m) >= DAY_MINUTES) {
            inner.minutes.pop_front();
            inner.dirty.insert(format!("m/{m}"));
        }
        inner.model(tier, model).add(prompt, completion, cost);
        let m = &*METRICS;
        m.tier_tokens.with_label_values(&[tier.as_str(), "prompt"]).inc_by(prompt);
        m.tier_tokens.with_label_values(&[tier.as_str(), "completion"]).inc_by(completion);
        m.cost_usd.with_label_values(&[tier.as_str()]).inc_by(cost);
        let day = Self::day_of(&inner.minutes, now);
        let total = day[0].cost_usd + day[1].cost_usd;
        let share = if total > 0.0 { day[0].cost_usd / total } else { 0.0 };
        m.edge_cost_share.set(share);
        let over = share > self.alert_share;
        if over && !inner.alerting {
            tracing::warn!(
                edge_share = format!("{:.1}%", share * 100.0),
                alert_at = format!("{:.1}%", self.alert_share * 100.0),
                "the edge's share of the day's spend passed costs.edge_share_alert"
            );
        }
        inner.alerting = over;
        cost
    }

    fn day_of(minutes: &VecDeque<(u64, [Totals; 2])>, now: u64) -> [Totals; 2] {
        let mut day = [Totals::default(); 2];
        for (m, t) in minutes {
            if now.saturating_sub(*m) < DAY_MINUTES {
                for i in 0..2 {
                    day[i].merge(&t[i]);
                }
            }
        }
        day
    }

    /// Totals per tier over the rolling day.
    pub fn day(&self) -> [Totals; 2] {
        Self::day_of(&self.inner.lock().minutes, minute_now())
    }

    /// True when `tier` has a budget and this node's rolling day's spend reached it.
    pub fn over_budget(&self, tier: Tier) -> bool {
        self.over_budget_in(&self.day(), tier)
    }

    /// The daily budget of `tier`, if any.
    pub fn budget(&self, tier: Tier) -> Option<f64> {
        self.budgets[tier.index()]
    }

    /// This node's spend on `tier` per minute, for the minutes of the `window` ending at `now`.
    pub fn cost_minutes(&self, tier: Tier, now: u64, window: u64) -> Vec<(u64, f64)> {
        let inner = self.inner.lock();
        inner.minutes.iter().filter(|(m, _)| now.saturating_sub(*m) < window && *m <= now).map(|(m, t)| (*m, t[tier.index()].cost_usd)).collect()
    }

    /// Restores the ledger saved by an earlier run (minutes older than a day are dropped).
    pub fn restore(&self, records: &Records) {
        let now = minute_now();
        let mut inner = self.inner.lock();
        let mut minutes: Vec<(u64, [Totals; 2])> = Vec::new();
        for (key, value) in records.section::<Value>(SECTION) {
            if let Some(m) = key.strip_prefix("m/").and_then(|m| m.parse::<u64>().ok()) {
                match serde_json::from_value::<[Totals; 2]>(value) {
                    Ok(t) if now.saturating_sub(m) < DAY_MINUTES => minutes.push((m, t)),
                    _ => {
                        inner.dirty.insert(key);
                    }
                }
            } else if let Some((tier, model)) = key.strip_prefix("model/").and_then(|k| k.split_once('/')) {
                let tier = if tier == "edge" { Tier::Edge } else { Tier::Cloud };
                if let Ok(t) = serde_json::from_value::<Totals>(value) {
                    inner.by_model.insert((tier, model.to_string()), t);
                }
            }
        }
        minutes.sort_by_key(|(m, _)| *m);
        inner.minutes = minutes.into();
    }

    fn over_budget_in(&self, day: &[Totals; 2], tier: Tier) -> bool {
        self.budgets[tier.index()].is_some_and(|budget| day[tier.index()].cost_usd >= budget)
    }

    /// The ledger as `/stats` shows it.
    pub fn snapshot(&self) -> Value {
        let day = self.day();
        let total = day[0].cost_usd + day[1].cost_usd;
        let share = if total > 0.0 { day[0].cost_usd / total } else { 0.0 };
        let by_model: Vec<Value> =
            self.inner.lock().by_model.iter().map(|((tier, model), t)| json!({"tier": tier, "model": model, "totals": t})).collect();
        json!({
            "prices_usd_per_1m_tokens": {"edge": self.prices[0], "cloud": self.prices[1]},
            "rolling_day": {
                "edge": day[0],
                "cloud": day[1],
                "edge_cost_share": share,
                "edge_share_alert": self.alert_share,
                "alerting": share > self.alert_share,
            },
            "budgets_usd_per_day": {
                "edge": self.budgets[0],
                "cloud": self.budgets[1],
                "edge_over": self.over_budget_in(&day, Tier::Edge),
                "cloud_over": self.over_budget_in(&day, Tier::Cloud),
            },
            "since_start": by_model,
        })
    }
}

const SECTION: &str = "ledger";

impl Durable for Ledger {
    fn changes(&self, out: &mut Changes) {
        let mut inner = self.inner.lock();
        for key in std::mem::take(&mut inner.dirty) {
            let value = if let Some(m) = key.strip_prefix("m/").and_then(|m| m.parse::<u64>().ok()) {
                inner.minutes.iter().find(|(at, _)| *at == m).map(|(_, t)| serde_json::to_value(t))
            } else if let Some((tier, model)) = key.strip_prefix("model/").and_then(|k| k.split_once('/')) {
                let tier = if tier == "edge" { Tier::Edge } else { Tier::Cloud };
                inner.by_model.get(&(tier, model.to_string())).map(serde_json::to_value)
            } else {
                None
            };
            match value {
                Some(Ok(v)) => out.put(SECTION, &key, &v),
                _ => out.delete(SECTION, &key),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_budgets_and_share() {
        let cfg = CostsConfig { edge_daily_budget_usd: Some(0.0), ..CostsConfig::default() };
        let l = Ledger::new(&cfg);
        assert!(l.over_budget(Tier::Edge), "a $0 budget is spent before the first request");
        assert!(!l.over_budget(Tier::Cloud));
        let c = l.record(Tier::Cloud, "gpt", 600_000, 400_000);
        assert!((c - 0.005).abs() < 1e-12);
        let e = l.record(Tier::Edge, "smollm2", 1_000_000, 0);
        assert!((e - 0.2).abs() < 1e-12);
        let day = l.day();
        assert_eq!(day[1].prompt_tokens, 600_000);
        assert!((l.snapshot()["rolling_day"]["edge_cost_share"].as_f64().unwrap() - 0.2 / 0.205).abs() < 1e-9);
    }

    #[test]
    fn a_restored_ledger_keeps_the_rolling_day() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::state::StateStore::open(dir.path()).unwrap();
        let l = Ledger::new(&CostsConfig::default());
        l.record(Tier::Cloud, "gpt", 600_000, 400_000);
        l.record_cached(Tier::Edge, "smollm2");
        let mut c = Changes::default();
        l.changes(&mut c);
        store.commit(&c).unwrap();
        let mut again = Changes::default();
        l.changes(&mut again);
        assert!(again.is_empty(), "nothing changed since");
        let restored = Ledger::new(&CostsConfig::default());
        restored.restore(&store.load().unwrap());
        assert!((restored.day()[1].cost_usd - 0.005).abs() < 1e-12);
        assert_eq!(restored.day()[0].cache_hits, 1);
        assert_eq!(restored.cost_minutes(Tier::Cloud, minute_now(), DAY_MINUTES).len(), 1);
        assert_eq!(restored.snapshot()["since_start"].as_array().unwrap().len(), 2);
    }
}
