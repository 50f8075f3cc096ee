//! The node: the state every request and background task shares.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::config::Config;
use crate::encoder::tokenize::TokenizerPool;
use crate::models::manifest::Manifest;
use crate::models::registry::Registry;

/// The running daemon's shared state.
pub struct Node {
    pub config: Config,
    pub manifest: Manifest,
    pub registry: Registry,
    /// Shared by every encoder model.
    pub tokenizers: Arc<TokenizerPool>,
    /// Where models run, e.g. `cpu` or `cuda:0`.
    pub device: String,
    pub started: Instant,
    pub started_at: SystemTime,
    draining: AtomicBool,
}

impl Node {
    /// A node whose models are all still pending.
    pub fn new(config: Config, manifest: Manifest, registry: Registry, device: String) -> std::io::Result<Self> {
        let threads = crate::runtime::compute_threads(&config).clamp(1, 4);
        Ok(Node {
            config,
            manifest,
            registry,
            tokenizers: Arc::new(TokenizerPool::new(threads)?),
            device,
            started: Instant::now(),
            started_at: SystemTime::now(),
            draining: AtomicBool::new(false),
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

    /// How long a request waits for a model that is still warming.
    pub fn ready_wait(&self) -> Duration {
        Duration::from_secs(self.config.server.ready_wait_s)
    }
}
