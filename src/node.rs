//! The node: the state every request and background task shares.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::accounts::Accounts;
use crate::auth::ApiKeys;
use crate::cache::ResponseCache;
use crate::config::Config;
use crate::encoder::tokenize::TokenizerPool;
use crate::fleet::Fleet;
use crate::models::manifest::Manifest;
use crate::models::registry::Registry;
use crate::models::sync::{ApplyStatus, SyncCommand, SyncReport};
use crate::quota::{Kind, Meters, Quotas, Scope};
use crate::routing::ledger::Tier;
use crate::routing::Router;
use crate::state::{Changes, Durable, StateStore};
use crate::telemetry::stats::Stats;
use tokio::sync::watch;

/// The running daemon's shared state.
pub struct Node {
    pub config: Config,
    pub manifest: Manifest,
    pub registry: Arc<Registry>,
    /// Shared by every encoder model.
    pub tokenizers: Arc<TokenizerPool>,
    /// Where models run, e.g. `cpu` or `cuda:0`.
    pub device: String,
    pub started: Instant,
    pub started_at: SystemTime,
    draining: AtomicBool,
    /// The accepted API keys, as sha256 digests (empty: the node is open).
    pub keys: ApiKeys,
    /// The edge/cloud routing tier (its upstream, ledger and decisions).
    pub router: Router,
    /// The latency profile `/stats` reports.
    pub stats: Stats,
    /// Spend by key and user, and the keys' limits.
    pub accounts: Accounts,
    /// The budgets' and keys' limits: this node's own, or the fleet's (`[fleet] store`).
    pub quotas: Arc<Quotas>,
    /// Where the ledger, accounts and quality scores persist (`[state]`).
    pub state: Arc<StateStore>,
    /// This node's lasting identity (kept in its state; the fleet store counts by it).
    pub node_id: String,
    /// Spill-over to other Machines of a Fly app (`[fleet]`).
    pub fleet: Fleet,
    /// The response cache, when `[cache] enabled`.
    pub cache: Option<Arc<ResponseCache>>,
    /// The last model-sync check, when `[sync]` is on (published by `models::sync::run`).
    sync: watch::Receiver<Option<SyncReport>>,
    /// Per model, where applying the expected manifest stands (`sync.apply`; written by
    /// `upgrade::run`).
    pub upgrades: parking_lot::RwLock<std::collections::BTreeMap<String, ApplyStatus>>,
    /// Requests to the upgrade task (`POST /models/{name}/rollback`); `None` without
    /// `sync.apply`.
    pub sync_commands: Option<tokio::sync::mpsc::UnboundedSender<SyncCommand>>,
}

impl Node {
    /// A node whose models are all still pending.
    pub fn new(
        config: Config,
        manifest: Manifest,
        registry: Arc<Registry>,
        device: String,
        sync: watch::Receiver<Option<SyncReport>>,
        sync_commands: Option<tokio::sync::mpsc::UnboundedSender<SyncCommand>>,
    ) -> std::io::Result<Self> {
        let threads = crate::runtime::compute_threads(&config).clamp(1, 4);
        let stats = Stats::new(Duration::from_secs(config.telemetry.stats_window_s));
        let keys = ApiKeys::from_config(&config.auth).map_err(std::io::Error::other)?;
        let state = Arc::new(StateStore::open(&config.state.dir_for(&config.store)).map_err(std::io::Error::other)?);
        let node_id = node_identity(&state)?;
        let quotas = Arc::new(Quotas::new(&config.fleet, &node_id).map_err(std::io::Error::other)?);
        let router = Router::new(&config, quotas.clone()).map_err(std::io::Error::other)?;
        for key in keys.policies() {
            crate::telemetry::metrics::METRICS.initialize_key(&key.name);
            for (kind, limit) in [
                (Kind::Requests, key.requests_per_minute.map(|l| l as f64)),
                (Kind::Tokens, key.tokens_per_minute.map(|l| l as f64)),
                (Kind::Cost, key.daily_budget_usd),
            ] {
                if let Some(limit) = limit {
                    quotas.register(Scope::key(kind, &key.name), limit);
                }
            }
        }
        let accounts = Accounts::default();
        let records = state.load().map_err(std::io::Error::other)?;
        router.restore(&records);
        accounts.restore(&records);
        tracing::info!(path = %state.path().display(), records = records.len(), node = %node_id, "state restored");
        let cache = ResponseCache::new(&config.cache).map(Arc::new);
        let fleet = Fleet::new(&config.fleet, std::env::var("FLY_APP_NAME").ok().as_deref());
        Ok(Node {
            config,
            manifest,
            registry,
            tokenizers: Arc::new(TokenizerPool::new(threads)?),
            device,
            started: Instant::now(),
            started_at: SystemTime::now(),
            draining: AtomicBool::new(false),
            sync,
            upgrades: Default::default(),
            sync_commands,
            stats,
            router,
            keys,
            accounts,
            quotas,
            state,
            node_id,
            fleet,
            cache,
        })
    }

    /// True once shutdown began: `/readyz` says `draining` and new work is refused.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Starts draining.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// The last model-sync report (none when sync is off or before the first check).
    pub fn sync_report(&self) -> Option<SyncReport> {
        self.sync.borrow().clone()
    }

    /// Each new model-sync report as it is published.
    pub fn sync_updates(&self) -> watch::Receiver<Option<SyncReport>> {
        self.sync.clone()
    }

    /// True when `fail_ready_on_drift` is set and the last comparison found drift.
    pub fn drift_blocks_ready(&self) -> bool {
        self.config.sync.fail_ready_on_drift && self.sync.borrow().as_ref().is_some_and(|r| r.drifted())
    }

    /// How long a request waits for a model that is still warming.
    pub fn ready_wait(&self) -> Duration {
        Duration::from_secs(self.config.server.ready_wait_s)
    }
}

/// This node's identity: kept in its state file, so a restarted node reports under the same
/// name (its restored spend then replaces, never adds to, what the fleet store holds of
/// it). A new state file takes the Fly Machine id when there is one.
fn node_identity(state: &StateStore) -> std::io::Result<String> {
    if let Some(id) = state.get::<String>("node", "id") {
        return Ok(id);
    }
    let id = std::env::var("FLY_MACHINE_ID").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
    let mut c = Changes::default();
    c.put("node", "id", &id);
    state.commit(&c).map_err(std::io::Error::other)?;
    Ok(id)
}

impl Meters for Node {
    fn minutes(&self, scope: &Scope, now: u64) -> Vec<(u64, f64)> {
        match scope.owner.split_once(':') {
            Some(("tier", "edge")) => self.router.cost_minutes(Tier::Edge, now),
            Some(("tier", "cloud")) => self.router.cost_minutes(Tier::Cloud, now),
            Some(("key", name)) => self.accounts.minutes(name, scope.kind, now, scope.kind.window_minutes()),
            _ => Vec::new(),
        }
    }
}

impl Durable for Node {
    fn changes(&self, out: &mut Changes) {
        self.router.changes(out);
        self.accounts.changes(out);
    }
}
