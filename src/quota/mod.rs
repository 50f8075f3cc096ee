//! Limits that hold across restarts and across a fleet: the daily budgets per tier and per
//! key, and each key's requests and tokens per minute.
//!
//! Every limit is a *scope* (what is counted, whose) with a window: a rolling day for
//! spend, the current minute for requests and tokens. What this node used in each minute
//! comes from its own ledger and accounts (`Meters`), which persist on its volume
//! (`crate::state`); so on one node a restart keeps every budget.
//!
//! With `[fleet] store`, the same limits bind every node sharing the store. Redis stays off
//! the hot path: a node holds a *lease* per scope (`fleet.lease_share` of the limit, what it
//! may use before asking again) and checks requests against it in memory. A sync every
//! `fleet.sync_ms` reports what the node used and renews its leases in one script call; a
//! request that finds its lease used up triggers that call itself (its one round trip).
//! The script grants only what the limit leaves after the fleet's total and every other
//! node's unexpired lease, so, while the store answers, the fleet can pass a limit only by
//! what requests already admitted go on to use (a request's cost is known when it ends).
//!
//! When the store does not answer, a node keeps serving on its lease plus
//! `fleet.offline_share` of each limit, never more, and says so (`/stats`, `/info`,
//! `edgenode_fleet_store_up`). Nodes report absolute amounts per minute, so when the store
//! is back what a node used offline is added exactly once. The source of truth is each
//! node's own state file; the store holds their sum. If the store loses its data (a new
//! epoch), every node reports its whole window again and the sums are rebuilt.

pub mod redis;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::config::FleetConfig;
use crate::telemetry::metrics::METRICS;
use redis::{Granted, RedisStore, Report, Settled};

/// What a scope counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Requests admitted, per minute.
    Requests,
    /// Tokens answered, per minute.
    Tokens,
    /// Spend in USD, per rolling day.
    Cost,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Requests => "requests",
            Kind::Tokens => "tokens",
            Kind::Cost => "cost",
        }
    }

    /// Minutes in the window the limit applies to.
    pub fn window_minutes(self) -> u64 {
        match self {
            Kind::Requests | Kind::Tokens => 1,
            Kind::Cost => DAY_MINUTES,
        }
    }

    /// Counted in whole units (leases are rounded up to at least one).
    fn whole(self) -> bool {
        self != Kind::Cost
    }
}

pub const DAY_MINUTES: u64 = 24 * 60;

/// One limit's counter: what, and whose (`tier:cloud`, `key:app`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope {
    pub kind: Kind,
    pub owner: String,
}

impl Scope {
    pub fn tier_cost(tier: &str) -> Scope {
        Scope { kind: Kind::Cost, owner: format!("tier:{tier}") }
    }

    pub fn key(kind: Kind, name: &str) -> Scope {
        Scope { kind, owner: format!("key:{name}") }
    }

    /// `cost:tier:cloud`, `requests:key:app`: its name in the store, `/stats` and metrics.
    pub fn id(&self) -> String {
        format!("{}:{}", self.kind.as_str(), self.owner)
    }
}

/// What a limit says about one more request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Allow,
    /// The lease is used up: ask the store (one round trip), then check again.
    Refill,
    Refuse,
}

/// This node's own use, per minute: the ledger's and the accounts' counters.
pub trait Meters: Send + Sync {
    /// (minute since the epoch, amount) for the minutes of `scope`'s window ending at `now`.
    fn minutes(&self, scope: &Scope, now: u64) -> Vec<(u64, f64)>;
}

/// The current minute since the Unix epoch.
pub fn minute_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() / 60).unwrap_or(0)
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A scope's lease, as the store last granted it.
#[derive(Debug, Clone, Default)]
struct Lease {
    limit: f64,
    /// What this node may use beyond `base`.
    granted: f64,
    /// This node's own total over the window as last reported.
    base: f64,
    /// The minute of the last report (a per-minute lease holds for that minute only).
    minute: u64,
    /// The fleet's total over the window at the last report.
    fleet_total: f64,
    /// The store granted nothing at the last report: the limit is reached fleet-wide.
    exhausted: bool,
    /// What the store holds of this node's minutes (so only changes are sent).
    reported: BTreeMap<u64, f64>,
}

impl Lease {
    /// (granted, base) for `now`; a per-minute lease from another minute is worth nothing.
    fn current(&self, kind: Kind, now: u64) -> (f64, f64) {
        if kind.window_minutes() == 1 && self.minute != now {
            (0.0, 0.0)
        } else {
            (self.granted, self.base)
        }
    }
}

#[derive(Debug, Default)]
struct LinkState {
    /// The store's epoch as this node knows it ('' before the first answer).
    epoch: String,
    /// `None` before the first call; then whether the last call was answered.
    reachable: Option<bool>,
    last_ok_ms: Option<u64>,
    last_error: Option<String>,
    unreachable_since_ms: Option<u64>,
    syncs: u64,
    failures: u64,
    /// Settle calls finished (answered or not): a request that waited for another's call
    /// uses that call's leases instead of making its own.
    settled: u64,
    leases: BTreeMap<Scope, Lease>,
}

/// A node's link to the fleet store.
struct Link {
    store: RedisStore,
    node: String,
    lease_share: f64,
    offline_share: f64,
    lease_ttl: Duration,
    sync_every: Duration,
    state: Mutex<LinkState>,
    /// One settle call at a time: a call's leases are computed from the reports it carries.
    calling: tokio::sync::Mutex<()>,
}

/// The limits of one node: local only, or fleet-wide through a store.
pub struct Quotas {
    link: Option<Link>,
}

impl Quotas {
    /// Local limits only (no `fleet.store`).
    pub fn local() -> Quotas {
        Quotas { link: None }
    }

    /// From `[fleet]`; `node` is this node's lasting identity (kept in its state file).
    pub fn new(cfg: &FleetConfig, node: &str) -> Result<Quotas, String> {
        if cfg.store.is_empty() {
            return Ok(Quotas::local());
        }
        let store = RedisStore::new(&cfg.store, &cfg.namespace, Duration::from_millis(cfg.timeout_ms))?;
        tracing::info!(store = %store.shown, node, "limits are fleet-wide");
        Ok(Quotas {
            link: Some(Link {
                store,
                node: node.to_string(),
                lease_share: cfg.lease_share,
                offline_share: cfg.offline_share,
                lease_ttl: Duration::from_secs(cfg.lease_ttl_s),
                sync_every: Duration::from_millis(cfg.sync_ms),
                state: Mutex::new(LinkState::default()),
                calling: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// True with a fleet store.
    pub fn fleet(&self) -> bool {
        self.link.is_some()
    }

    /// Makes `scope` (with its limit) part of every sync, before any request uses it, so the
    /// fleet's totals show from the start.
    pub fn register(&self, scope: Scope, limit: f64) {
        if let Some(link) = &self.link {
            link.state.lock().leases.entry(scope).or_default().limit = limit;
        }
    }

    /// Whether one more request may use `scope`, whose limit is `limit`, when this node's
    /// own use over the scope's window is `own` (what the request itself adds is not in it).
    pub fn check(&self, scope: &Scope, limit: f64, own: f64, now: u64) -> Check {
        let Some(link) = &self.link else {
            return if own < limit { Check::Allow } else { Check::Refuse };
        };
        let mut state = link.state.lock();
        let reachable = state.reachable;
        let lease = state.leases.entry(scope.clone()).or_default();
        lease.limit = limit;
        let (granted, base) = lease.current(scope.kind, now);
        let used = own - base;
        if used < granted {
            return Check::Allow;
        }
        match reachable {
            Some(false) => {
                let mut extra = link.offline_share * limit;
                if scope.kind.whole() {
                    extra = extra.ceil();
                }
                if used < granted + extra {
                    Check::Allow
                } else {
                    Check::Refuse
                }
            }
            _ if lease.exhausted && (scope.kind == Kind::Cost || lease.minute == now) => Check::Refuse,
            _ => Check::Refill,
        }
    }

    /// Asks the store for fresh leases of `scopes` (reporting their use): the round trip a
    /// request makes when its lease is used up. A request that waited while another call
    /// finished takes that call's leases instead (so waiters do not queue round trips), and
    /// none is made while the store is known to be unreachable (the sync keeps trying).
    pub async fn refill(&self, scopes: &[Scope], meters: &dyn Meters) {
        if let Some(link) = &self.link {
            let seen = link.state.lock().settled;
            let _one = link.calling.lock().await;
            let skip = {
                let state = link.state.lock();
                state.settled != seen || state.reachable == Some(false)
            };
            if !skip {
                link.settle(scopes, meters, Want::Lease).await;
            }
        }
    }

    /// Reports every scope; renews the leases in use and gives back those not used since
    /// they were granted (an idle node holds nothing the others could use).
    pub async fn sync(&self, meters: &dyn Meters) {
        if let Some(link) = &self.link {
            let _one = link.calling.lock().await;
            let scopes: Vec<Scope> = link.state.lock().leases.keys().cloned().collect();
            link.settle(&scopes, meters, Want::InUse).await;
        }
    }

    /// Reports every scope a last time and gives every lease back (a graceful stop).
    pub async fn release(&self, meters: &dyn Meters) {
        if let Some(link) = &self.link {
            let _one = link.calling.lock().await;
            let scopes: Vec<Scope> = link.state.lock().leases.keys().cloned().collect();
            if link.settle(&scopes, meters, Want::Nothing).await {
                tracing::info!(scopes = scopes.len(), "gave the fleet store back this node's leases");
            }
        }
    }

    /// Syncs every `fleet.sync_ms` until the task is aborted (its owner is `serve`).
    pub async fn run(&self, meters: &dyn Meters) {
        let Some(link) = &self.link else { return };
        let mut tick = tokio::time::interval(link.sync_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sync(meters).await;
        }
    }

    /// Whether the store answered the last call (`None` without a store or before a call).
    pub fn reachable(&self) -> Option<bool> {
        self.link.as_ref().and_then(|l| l.state.lock().reachable)
    }

    /// The `fleet` section of `/stats`: the store, and per scope the fleet's total beside
    /// this node's share and lease.
    pub fn stats(&self, meters: &dyn Meters) -> Value {
        let Some(link) = &self.link else {
            return json!({"store": null, "note": "limits are this node's own (no fleet.store)"});
        };
        let now = minute_now();
        let leases: Vec<(Scope, Lease)> = link.state.lock().leases.iter().map(|(s, l)| (s.clone(), l.clone())).collect();
        let mut scopes = serde_json::Map::new();
        for (scope, lease) in leases {
            let own: f64 = meters.minutes(&scope, now).iter().map(|(_, v)| v).sum();
            let (granted, base) = lease.current(scope.kind, now);
            let current = scope.kind == Kind::Cost || lease.minute == now;
            // The fleet's total as of the last report, plus what this node used since.
            let fleet = if current { lease.fleet_total + (own - base).max(0.0) } else { own };
            scopes.insert(
                scope.id(),
                json!({
                    "limit": lease.limit,
                    "window_minutes": scope.kind.window_minutes(),
                    "fleet_total": fleet,
                    "this_node": own,
                    "this_node_share": if fleet > 0.0 { own / fleet } else { 0.0 },
                    "lease": granted,
                    "lease_left": (granted - (own - base)).max(0.0),
                    "exhausted": lease.exhausted && current,
                }),
            );
        }
        let state = link.state.lock();
        json!({
            "store": link.store.shown,
            "node": link.node,
            "reachable": state.reachable,
            "epoch": state.epoch,
            "last_sync_ms_ago": state.last_ok_ms.map(|t| unix_ms().saturating_sub(t)),
            "unreachable_since_ms_ago": state.unreachable_since_ms.map(|t| unix_ms().saturating_sub(t)),
            "last_error": state.last_error,
            "syncs": state.syncs,
            "failures": state.failures,
            "lease_share": link.lease_share,
            "offline_share": link.offline_share,
            "lease_ttl_s": link.lease_ttl.as_secs(),
            "scopes": scopes,
        })
    }
}

/// Which leases a settle call asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// A full lease of every scope (a request's refill).
    Lease,
    /// A full lease of the scopes used since their last grant, none of the others.
    InUse,
    /// None: every lease goes back.
    Nothing,
}

impl Link {
    /// One settle call for `scopes`. Returns whether the store answered.
    async fn settle(&self, scopes: &[Scope], meters: &dyn Meters, want: Want) -> bool {
        for _ in 0..2 {
            let now = minute_now();
            // Read this node's counters before taking the state lock: admission takes the
            // accounts' lock and then this one, never the other way round.
            let own: Vec<Vec<(u64, f64)>> = scopes.iter().map(|s| meters.minutes(s, now)).collect();
            let (epoch, reports) = {
                let mut state = self.state.lock();
                let epoch = state.epoch.clone();
                let reports: Vec<Report> = scopes
                    .iter()
                    .zip(&own)
                    .map(|(scope, minutes)| {
                        let lease = state.leases.entry(scope.clone()).or_default();
                        let own: f64 = minutes.iter().map(|(_, v)| v).sum();
                        let (_, base) = lease.current(scope.kind, now);
                        let take = match want {
                            Want::Lease => true,
                            Want::InUse => own > base,
                            Want::Nothing => false,
                        };
                        let mut amount = if take { self.lease_share * lease.limit } else { 0.0 };
                        if take && scope.kind.whole() {
                            amount = amount.ceil().max(1.0);
                        }
                        Report {
                            scope: scope.id(),
                            window_minutes: scope.kind.window_minutes(),
                            limit: lease.limit,
                            want: amount,
                            minutes: minutes.iter().filter(|(m, v)| lease.reported.get(m) != Some(v)).copied().collect(),
                        }
                    })
                    .collect();
                (epoch, reports)
            };
            let started = Instant::now();
            let proposed = format!("{:016x}", rand::random::<u64>());
            let answer = self.store.settle(&self.node, &epoch, &proposed, now, self.lease_ttl, &reports).await;
            METRICS.fleet_sync_seconds.observe(started.elapsed().as_secs_f64());
            let mut state = self.state.lock();
            state.settled += 1;
            match answer {
                Ok(Settled::Epoch(current)) => {
                    if !state.epoch.is_empty() {
                        tracing::warn!(was = %state.epoch, now = %current, "the fleet store lost its data (new epoch): reporting this node's whole window again");
                    }
                    state.epoch = current;
                    for lease in state.leases.values_mut() {
                        lease.reported.clear();
                    }
                    continue;
                }
                Ok(Settled::Ok { epoch, scopes: granted }) => {
                    if state.reachable == Some(false) {
                        tracing::info!("the fleet store answers again; what this node used meanwhile is reported");
                    }
                    state.epoch = epoch;
                    state.reachable = Some(true);
                    state.last_ok_ms = Some(unix_ms());
                    state.unreachable_since_ms = None;
                    state.last_error = None;
                    state.syncs += 1;
                    METRICS.fleet_store_up.set(1);
                    for (((scope, minutes), g), report) in scopes.iter().zip(own).zip(granted).zip(&reports) {
                        let lease = state.leases.entry(scope.clone()).or_default();
                        apply(lease, &minutes, g, now, report.want);
                        let id = scope.id();
                        METRICS.fleet_total.with_label_values(&[&id]).set(g.total);
                        METRICS.fleet_lease.with_label_values(&[&id]).set(g.lease);
                    }
                    return true;
                }
                Err(e) => {
                    if state.reachable != Some(false) {
                        tracing::warn!(store = %self.store.shown, "the fleet store does not answer ({e}): serving on leases plus fleet.offline_share");
                        state.unreachable_since_ms = Some(unix_ms());
                    }
                    state.reachable = Some(false);
                    state.last_error = Some(e);
                    state.failures += 1;
                    METRICS.fleet_store_up.set(0);
                    METRICS.fleet_sync_failures.inc();
                    return false;
                }
            }
        }
        false
    }
}

/// Takes the store's answer for one scope: what it now holds of this node, the new lease
/// and the fleet's total. Asked for a lease and granted none, the limit is reached.
fn apply(lease: &mut Lease, minutes: &[(u64, f64)], g: Granted, now: u64, wanted: f64) {
    lease.reported = minutes.iter().copied().collect();
    lease.base = minutes.iter().map(|(_, v)| v).sum();
    lease.granted = g.lease;
    lease.fleet_total = g.total;
    lease.minute = now;
    lease.exhausted = wanted > 0.0 && g.lease <= 0.0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_limits_compare_own_use() {
        let q = Quotas::local();
        let s = Scope::key(Kind::Requests, "app");
        assert_eq!(q.check(&s, 2.0, 1.0, 5), Check::Allow);
        assert_eq!(q.check(&s, 2.0, 2.0, 5), Check::Refuse);
        assert_eq!(s.id(), "requests:key:app");
        assert_eq!(Scope::tier_cost("cloud").id(), "cost:tier:cloud");
    }

    #[tokio::test]
    async fn a_lease_allows_its_share_then_asks_and_offline_adds_the_offline_share() {
        let cfg = FleetConfig { store: "redis://127.0.0.1:1".into(), ..FleetConfig::default() };
        let q = Quotas::new(&cfg, "n1").unwrap();
        let s = Scope::key(Kind::Requests, "app");
        assert_eq!(q.check(&s, 100.0, 0.0, 7), Check::Refill, "no lease before the first answer");
        {
            let link = q.link.as_ref().unwrap();
            let mut state = link.state.lock();
            let lease = state.leases.get_mut(&s).unwrap();
            apply(lease, &[(7, 3.0)], Granted { total: 50.0, lease: 5.0 }, 7, 5.0);
        }
        assert_eq!(q.check(&s, 100.0, 7.0, 7), Check::Allow, "4 of 5 used");
        assert_eq!(q.check(&s, 100.0, 8.0, 7), Check::Refill, "5 of 5 used");
        assert_eq!(q.check(&s, 100.0, 0.0, 8), Check::Refill, "a minute's lease ends with the minute");
        q.link.as_ref().unwrap().state.lock().reachable = Some(false);
        // Offline: the lease plus 10% of 100.
        assert_eq!(q.check(&s, 100.0, 17.0, 7), Check::Allow);
        assert_eq!(q.check(&s, 100.0, 18.0, 7), Check::Refuse);
        assert_eq!(q.check(&s, 100.0, 9.0, 8), Check::Allow);
        assert_eq!(q.check(&s, 100.0, 10.0, 8), Check::Refuse);
    }
}
