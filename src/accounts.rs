//! Who calls, and what they spent: per-key limits and budgets, and spend by key and by the
//! request's `user`.
//!
//! A request that passed authentication carries a `Caller` (a task-local set by the HTTP
//! envelope for the handler's whole run), naming its key and, once the handler read the
//! body, its `user`. Before a request runs, `Accounts::admit` checks the key's
//! requests-per-minute, tokens-per-minute and rolling-day budget; after it is answered,
//! `Accounts::charge` counts its tokens and cost (the configured per-token price of the
//! tier that answered; nothing for a cache hit). Windows are per-minute buckets, like the
//! ledger's: a minute's tokens count until that minute is a minute old.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::KeyConfig;
use crate::error::Error;
use crate::quota::{Check, Kind, Quotas, Scope};
use crate::state::{Changes, Durable, Records};
use crate::telemetry::metrics::METRICS;

/// The limits of one named key (`[[auth.keys]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyPolicy {
    pub name: String,
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub daily_budget_usd: Option<f64>,
    /// Models the key may use; empty: all.
    pub models: Vec<String>,
}

impl KeyPolicy {
    pub fn from_config(k: &KeyConfig) -> Self {
        KeyPolicy {
            name: k.name.clone(),
            requests_per_minute: k.requests_per_minute,
            tokens_per_minute: k.tokens_per_minute,
            daily_budget_usd: k.daily_budget_usd,
            models: k.models.clone(),
        }
    }

    /// An `auth.api_keys` key: a name and no limits.
    pub fn unlimited(name: String) -> Self {
        KeyPolicy { name, requests_per_minute: None, tokens_per_minute: None, daily_budget_usd: None, models: Vec::new() }
    }

    /// Refuses a model the key may not use.
    pub fn allows(&self, model: &str) -> Result<(), Error> {
        if self.models.is_empty() || self.models.iter().any(|m| m == model) {
            return Ok(());
        }
        Err(Error::ModelNotAllowed { key: self.name.clone(), model: model.to_string(), allowed: self.models.join(", ") })
    }
}

/// The caller of one request.
#[derive(Debug, Default)]
pub struct Caller {
    /// The key it presented (none on an open node).
    pub key: Option<Arc<KeyPolicy>>,
    /// The request body's `user`, once the handler read it.
    pub user: Mutex<Option<String>>,
}

tokio::task_local! {
    /// The caller of the request this task is handling.
    pub static CALLER: Arc<Caller>;
}

/// The caller of the request being handled, if any (outside a request: none).
pub fn current() -> Option<Arc<Caller>> {
    CALLER.try_with(Arc::clone).ok()
}

/// Records the body's `user` on the current caller.
pub fn set_user(user: &str) {
    if let Some(c) = current() {
        *c.user.lock() = Some(user.chars().take(256).collect());
    }
}

/// Requests, tokens and spend.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Spend {
    pub requests: u64,
    pub tokens: u64,
    pub cost_usd: f64,
    pub cache_hits: u64,
}

impl Spend {
    fn add(&mut self, tokens: u64, cost: f64, cached: bool) {
        self.requests += 1;
        self.tokens += tokens;
        self.cost_usd += cost;
        self.cache_hits += cached as u64;
    }
}

/// One key's recent use: per-minute buckets of the last day.
#[derive(Default)]
struct Usage {
    /// (minute since the epoch, requests admitted, tokens, cost).
    minutes: VecDeque<(u64, u64, u64, f64)>,
    since_start: Spend,
    refused: u64,
    /// Minutes that left the day since the state was last saved (their records go).
    expired: Vec<u64>,
}

const DAY_MINUTES: u64 = 24 * 60;
/// Most distinct `user` values remembered; beyond it, new users count under `(other)`.
const MAX_USERS: usize = 10_000;

fn minute_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() / 60).unwrap_or(0)
}

fn seconds_into_minute() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() % 60).unwrap_or(0)
}

impl Usage {
    fn bucket(&mut self, now: u64) -> &mut (u64, u64, u64, f64) {
        while let Some((m, ..)) = self.minutes.front().copied().filter(|(m, ..)| now.saturating_sub(*m) >= DAY_MINUTES) {
            self.minutes.pop_front();
            self.expired.push(m);
        }
        match self.minutes.back_mut() {
            Some(last) if last.0 == now => {}
            _ => self.minutes.push_back((now, 0, 0, 0.0)),
        }
        // Not empty: a bucket for `now` is last.
        let last = self.minutes.len() - 1;
        &mut self.minutes[last]
    }

    fn this_minute(&self, now: u64) -> (u64, u64) {
        self.minutes.back().filter(|(m, ..)| *m == now).map_or((0, 0), |(_, r, t, _)| (*r, *t))
    }

    fn day_cost(&self, now: u64) -> f64 {
        self.minutes.iter().filter(|(m, ..)| now.saturating_sub(*m) < DAY_MINUTES).map(|(.., c)| c).sum()
    }

    /// Seconds until the oldest spend of the rolling day leaves it.
    fn day_retry_s(&self, now: u64) -> u64 {
        self.minutes.iter().find(|(_, _, _, c)| *c > 0.0).map_or(60, |(m, ..)| (m + DAY_MINUTES).saturating_sub(now) * 60).max(1)
    }
}

/// What a key carries over a restart beside its minutes.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct KeyTotals {
    since_start: Spend,
    refused: u64,
}

/// Spend by key and by user, and the keys' limits.
#[derive(Default)]
pub struct Accounts {
    keys: Mutex<BTreeMap<String, Usage>>,
    users: Mutex<HashMap<String, Spend>>,
    /// Records changed since the state was last saved: `k/<minute>/<key>`, `t/<key>`, `u/<user>`.
    dirty: Mutex<BTreeSet<String>>,
}

/// Whether a request is admitted, or must wait for fresh fleet leases first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// These scopes' leases are used up: refill them (`Quotas::refill`) and ask again.
    Refill(Vec<Scope>),
}

impl Accounts {
    /// Admits one request of `key`, or says which limit it is over. With a fleet store, a
    /// used-up lease answers `Refill` when `may_refill`, else counts as the limit reached.
    pub fn admit(&self, key: &KeyPolicy, quotas: &Quotas, may_refill: bool) -> Result<Admission, Error> {
        let now = minute_now();
        let mut keys = self.keys.lock();
        let usage = keys.entry(key.name.clone()).or_default();
        let (requests, tokens) = usage.this_minute(now);
        let retry_minute = (60 - seconds_into_minute()).max(1);
        let mut refill = Vec::new();
        let mut over = |kind: Kind, limit: Option<u64>, own: f64| -> bool {
            let Some(limit) = limit else { return false };
            match quotas.check(&Scope::key(kind, &key.name), limit as f64, own, now) {
                Check::Allow => false,
                Check::Refill if may_refill => {
                    refill.push(Scope::key(kind, &key.name));
                    false
                }
                Check::Refill | Check::Refuse => true,
            }
        };
        let over_requests = over(Kind::Requests, key.requests_per_minute, requests as f64);
        let over_tokens = !over_requests && over(Kind::Tokens, key.tokens_per_minute, tokens as f64);
        let over_budget = !over_requests
            && !over_tokens
            && key.daily_budget_usd.is_some()
            && match quotas.check(&Scope::key(Kind::Cost, &key.name), key.daily_budget_usd.unwrap_or(0.0), usage.day_cost(now), now) {
                Check::Allow => false,
                Check::Refill if may_refill => {
                    refill.push(Scope::key(Kind::Cost, &key.name));
                    false
                }
                Check::Refill | Check::Refuse => true,
            };
        let refusal = if over_requests {
            Some(Error::RateLimited {
                key: key.name.clone(),
                limit: format!("requests_per_minute = {}", key.requests_per_minute.unwrap_or(0)),
                retry_after_s: retry_minute,
            })
        } else if over_tokens {
            Some(Error::RateLimited {
                key: key.name.clone(),
                limit: format!("tokens_per_minute = {}", key.tokens_per_minute.unwrap_or(0)),
                retry_after_s: retry_minute,
            })
        } else {
            key.daily_budget_usd.filter(|_| over_budget).map(|budget| Error::KeyBudgetExceeded {
                key: key.name.clone(),
                budget_usd: budget,
                retry_after_s: usage.day_retry_s(now),
            })
        };
        if let Some(e) = refusal {
            usage.refused += 1;
            self.dirty.lock().insert(format!("t/{}", key.name));
            let limit = match &e {
                Error::KeyBudgetExceeded { .. } => "daily_budget_usd",
                Error::RateLimited { limit, .. } => limit.split(' ').next().unwrap_or("limit"),
                _ => "limit",
            };
            METRICS.key_refusals.with_label_values(&[&key.name, limit]).inc();
            return Err(e);
        }
        if !refill.is_empty() {
            return Ok(Admission::Refill(refill));
        }
        usage.bucket(now).1 += 1;
        self.dirty.lock().insert(format!("k/{now}/{}", key.name));
        Ok(Admission::Admitted)
    }

    /// This node's use of `key` per minute (requests, tokens or cost) over the `window`
    /// ending at `now`.
    pub fn minutes(&self, key: &str, kind: Kind, now: u64, window: u64) -> Vec<(u64, f64)> {
        let keys = self.keys.lock();
        let Some(usage) = keys.get(key) else { return Vec::new() };
        usage
            .minutes
            .iter()
            .filter(|(m, ..)| now.saturating_sub(*m) < window && *m <= now)
            .map(|(m, r, t, c)| {
                let amount = match kind {
                    Kind::Requests => *r as f64,
                    Kind::Tokens => *t as f64,
                    Kind::Cost => *c,
                };
                (*m, amount)
            })
            .collect()
    }

    /// Restores what an earlier run saved (minutes older than a day are dropped).
    pub fn restore(&self, records: &Records) {
        let now = minute_now();
        let mut keys = self.keys.lock();
        let mut users = self.users.lock();
        let mut stale = Vec::new();
        for (record, value) in records.section::<serde_json::Value>(SECTION) {
            if let Some(rest) = record.strip_prefix("k/") {
                let Some((minute, name)) = rest.split_once('/') else { continue };
                let Ok(minute) = minute.parse::<u64>() else { continue };
                match serde_json::from_value::<(u64, u64, f64)>(value) {
                    Ok((r, t, c)) if now.saturating_sub(minute) < DAY_MINUTES => {
                        keys.entry(name.to_string()).or_default().minutes.push_back((minute, r, t, c))
                    }
                    _ => stale.push(record),
                }
            } else if let Some(name) = record.strip_prefix("t/") {
                if let Ok(t) = serde_json::from_value::<KeyTotals>(value) {
                    let usage = keys.entry(name.to_string()).or_default();
                    usage.since_start = t.since_start;
                    usage.refused = t.refused;
                }
            } else if let Some(name) = record.strip_prefix("u/") {
                if let Ok(spend) = serde_json::from_value::<Spend>(value) {
                    users.insert(name.to_string(), spend);
                }
            }
        }
        for usage in keys.values_mut() {
            usage.minutes.make_contiguous().sort_by_key(|(m, ..)| *m);
        }
        self.dirty.lock().extend(stale);
    }

    /// Counts one answered request's tokens and cost against its caller's key and user.
    pub fn charge(&self, caller: Option<&Caller>, tokens: u64, cost_usd: f64, cached: bool) {
        let Some(caller) = caller else { return };
        if let Some(key) = &caller.key {
            let mut keys = self.keys.lock();
            let usage = keys.entry(key.name.clone()).or_default();
            let now = minute_now();
            let bucket = usage.bucket(now);
            bucket.2 += tokens;
            bucket.3 += cost_usd;
            usage.since_start.add(tokens, cost_usd, cached);
            let mut dirty = self.dirty.lock();
            dirty.insert(format!("k/{now}/{}", key.name));
            dirty.insert(format!("t/{}", key.name));
            METRICS.key_tokens.with_label_values(&[&key.name]).inc_by(tokens);
            METRICS.key_cost_usd.with_label_values(&[&key.name]).inc_by(cost_usd);
        }
        if let Some(user) = caller.user.lock().clone() {
            let mut users = self.users.lock();
            let name = if users.len() >= MAX_USERS && !users.contains_key(&user) { "(other)".to_string() } else { user };
            self.dirty.lock().insert(format!("u/{name}"));
            users.entry(name).or_default().add(tokens, cost_usd, cached);
        }
    }

    /// The `accounts` section of `/stats`: per key (its rolling day against its budget) and
    /// per user.
    pub fn stats(&self, policies: &[Arc<KeyPolicy>]) -> Value {
        let now = minute_now();
        let keys = self.keys.lock();
        let by_key: BTreeMap<&str, Value> = policies
            .iter()
            .map(|p| {
                let usage = keys.get(&p.name);
                let day = usage.map_or(0.0, |u| u.day_cost(now));
                let (requests, tokens) = usage.map_or((0, 0), |u| u.this_minute(now));
                let since_start = usage.map(|u| u.since_start).unwrap_or_default();
                let v = json!({
                    "since_start": since_start,
                    "rolling_day_cost_usd": day,
                    "daily_budget_usd": p.daily_budget_usd,
                    "budget_left_usd": p.daily_budget_usd.map(|b| (b - day).max(0.0)),
                    "this_minute": {"requests": requests, "tokens": tokens},
                    "requests_per_minute": p.requests_per_minute,
                    "tokens_per_minute": p.tokens_per_minute,
                    "models": p.models,
                    "refused": usage.map_or(0, |u| u.refused),
                });
                (p.name.as_str(), v)
            })
            .collect();
        let users: BTreeMap<String, Spend> = self.users.lock().iter().map(|(k, v)| (k.clone(), *v)).collect();
        json!({"keys": by_key, "users": users})
    }
}

const SECTION: &str = "accounts";

impl Durable for Accounts {
    fn changes(&self, out: &mut Changes) {
        let mut keys = self.keys.lock();
        let mut dirty = std::mem::take(&mut *self.dirty.lock());
        for (name, usage) in keys.iter_mut() {
            dirty.extend(usage.expired.drain(..).map(|m| format!("k/{m}/{name}")));
        }
        if dirty.is_empty() {
            return;
        }
        let users = self.users.lock();
        for record in dirty {
            let value = if let Some(rest) = record.strip_prefix("k/") {
                rest.split_once('/').and_then(|(minute, name)| {
                    let minute = minute.parse::<u64>().ok()?;
                    let (_, r, t, c) = keys.get(name)?.minutes.iter().find(|(m, ..)| *m == minute)?;
                    serde_json::to_value((r, t, c)).ok()
                })
            } else if let Some(name) = record.strip_prefix("t/") {
                keys.get(name).and_then(|u| serde_json::to_value(KeyTotals { since_start: u.since_start, refused: u.refused }).ok())
            } else if let Some(name) = record.strip_prefix("u/") {
                users.get(name).and_then(|s| serde_json::to_value(s).ok())
            } else {
                None
            };
            match value {
                Some(v) => out.put(SECTION, &record, &v),
                None => out.delete(SECTION, &record),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(rpm: Option<u64>, tpm: Option<u64>, budget: Option<f64>) -> Arc<KeyPolicy> {
        Arc::new(KeyPolicy { name: "k".into(), requests_per_minute: rpm, tokens_per_minute: tpm, daily_budget_usd: budget, models: vec![] })
    }

    #[test]
    fn each_limit_refuses_with_its_name() {
        let a = Accounts::default();
        let k = key(Some(2), None, None);
        assert_eq!(a.admit(&k, &Quotas::local(), false).unwrap(), Admission::Admitted);
        assert!(a.admit(&k, &Quotas::local(), false).is_ok());
        let e = a.admit(&k, &Quotas::local(), false).unwrap_err();
        assert!(matches!(&e, Error::RateLimited { limit, .. } if limit == "requests_per_minute = 2"), "{e}");
        assert!(e.retry_after_s().is_some_and(|s| (1..=60).contains(&s)));

        let a = Accounts::default();
        let k = key(None, Some(100), None);
        let caller = Caller { key: Some(k.clone()), user: Mutex::new(Some("ann".into())) };
        a.admit(&k, &Quotas::local(), false).unwrap();
        a.charge(Some(&caller), 150, 0.0, false);
        assert!(matches!(a.admit(&k, &Quotas::local(), false), Err(Error::RateLimited { limit, .. }) if limit == "tokens_per_minute = 100"));

        let a = Accounts::default();
        let k = key(None, None, Some(0.01));
        let caller = Caller { key: Some(k.clone()), user: Mutex::new(None) };
        a.admit(&k, &Quotas::local(), false).unwrap();
        a.charge(Some(&caller), 10, 0.02, false);
        let e = a.admit(&k, &Quotas::local(), false).unwrap_err();
        assert_eq!(e.code(), "budget_exceeded");
        let stats = a.stats(std::slice::from_ref(&k));
        assert_eq!(stats["keys"]["k"]["budget_left_usd"], 0.0);
        assert_eq!(stats["keys"]["k"]["refused"], 1);

        // Saved and restored: the budget is still spent, the refusal still counted.
        let dir = tempfile::tempdir().unwrap();
        let store = crate::state::StateStore::open(dir.path()).unwrap();
        let mut c = Changes::default();
        a.changes(&mut c);
        store.commit(&c).unwrap();
        let restored = Accounts::default();
        restored.restore(&store.load().unwrap());
        assert_eq!(restored.admit(&k, &Quotas::local(), false).unwrap_err().code(), "budget_exceeded");
        assert_eq!(restored.stats(std::slice::from_ref(&k))["keys"]["k"]["refused"], 2);
        let minutes = restored.minutes("k", Kind::Cost, minute_now(), DAY_MINUTES);
        assert_eq!(minutes.iter().map(|(_, c)| c).sum::<f64>(), 0.02);
    }

    #[test]
    fn spend_is_broken_down_by_user() {
        let a = Accounts::default();
        let caller = Caller { key: None, user: Mutex::new(Some("bob".into())) };
        a.charge(Some(&caller), 7, 0.5, false);
        a.charge(Some(&caller), 0, 0.0, true);
        let stats = a.stats(&[]);
        assert_eq!(stats["users"]["bob"]["tokens"], 7);
        assert_eq!(stats["users"]["bob"]["cache_hits"], 1);
        assert_eq!(stats["users"]["bob"]["requests"], 2);
    }

    #[test]
    fn models_outside_the_list_are_refused() {
        let mut k = KeyPolicy::unlimited("app".into());
        assert!(k.allows("anything").is_ok());
        k.models = vec!["minilm".into()];
        assert!(k.allows("minilm").is_ok());
        assert_eq!(k.allows("smollm2").unwrap_err().code(), "model_not_allowed");
    }
}
