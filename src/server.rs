//! `edgenode serve`: bind first, then boot the models behind a live listener, and drain on
//! SIGTERM / SIGINT.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::boot::boot_all;
use crate::config::Config;
use crate::models::manifest::Manifest;
use crate::models::registry::Registry;
use crate::node::Node;
use crate::runtime::select_device;

/// Serves until a shutdown signal and the drain that follows.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let manifest = Manifest::load(config.store.manifest.as_deref())?;
    let registry = Arc::new(Registry::build(&config, &manifest)?);
    let (device, device_name) = select_device(&config.runtime.device).map_err(anyhow::Error::msg)?;
    let addr = config.server.addr;
    let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr().context("listener has no address")?;
    let drain_grace = Duration::from_secs(config.server.drain_grace_s);
    // The sync task publishes its reports to the node; it stops when the node is gone.
    let (sync_tx, sync_rx) = tokio::sync::watch::channel(None);
    if !config.sync.expected_manifest.is_empty() {
        tokio::spawn(crate::models::sync::run(config.sync.clone(), registry.clone(), sync_tx));
    }
    let applies = config.sync.apply && !config.sync.expected_manifest.is_empty();
    let (commands_tx, commands_rx) = tokio::sync::mpsc::unbounded_channel();
    let commands_tx = applies.then_some(commands_tx);
    let node = Arc::new(Node::new(config, manifest, registry, device_name.clone(), sync_rx, commands_tx).context("cannot start the node")?);
    tracing::info!(addr = %local, device = %device_name, version = env!("CARGO_PKG_VERSION"), "listening");

    // The supervisor's inbox: boot's and model sync's loads both report a dead worker there.
    let restarts = tokio::sync::mpsc::unbounded_channel();
    if applies {
        tokio::spawn(crate::upgrade::run(node.clone(), device.clone(), restarts.0.clone(), commands_rx));
    }
    tokio::spawn(boot_all(node.clone(), device, restarts));

    // Metrics on a listener of their own, when configured: served until `serve` returns
    // (through the drain, so a scrape sees it), then stopped with it.
    let _metrics = match node.config.server.metrics_addr {
        Some(addr) => Some(serve_metrics(addr, node.clone()).await?),
        None => None,
    };
    // The state flusher commits the ledger and accounts every `state.flush_ms`; the fleet
    // sync reports use and renews leases every `fleet.sync_ms`. Both belong to `serve`:
    // after the drain the sync stops, the leases go back, and the flusher commits last.
    let mut flusher = crate::state::Flusher::start(
        node.state.clone(),
        vec![node.clone() as Arc<dyn crate::state::Durable>],
        Duration::from_millis(node.config.state.flush_ms),
    )
    .context("cannot start the state flusher")?;
    let fleet_sync = node.quotas.fleet().then(|| {
        let node = node.clone();
        AbortOnDrop(tokio::spawn(async move { node.quotas.run(node.as_ref()).await }))
    });
    let result = serve_until_drained(node.clone(), listener, drain_grace).await;
    drop(fleet_sync);
    node.quotas.release(node.as_ref()).await;
    flusher.stop();
    tracing::info!(path = %node.state.path().display(), "state saved");
    result
}

/// Serves until a signal, then drains for at most `drain_grace`.
async fn serve_until_drained(node: Arc<Node>, listener: TcpListener, drain_grace: Duration) -> anyhow::Result<()> {
    let app = crate::http::router(node.clone());
    let listener = crate::http::listener::LimitedListener::new(listener, node.config.limits.max_connections);
    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown_node = node.clone();
    let mut server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                wait_for_signal().await;
                shutdown_node.start_draining();
                tracing::info!(grace_s = drain_grace.as_secs(), "draining: refusing new connections, finishing in-flight requests");
                let _ = draining_tx.send(());
            })
            .await
    });
    // Serve until the first signal; then give in-flight requests (streams included) the
    // grace period, and exit at once on a second signal.
    tokio::select! {
        r = &mut server => return finished(r),
        _ = draining_rx => {}
    }
    tokio::select! {
        r = &mut server => {
            tracing::info!("drained; exiting");
            finished(r)
        }
        _ = tokio::time::sleep(drain_grace) => {
            tracing::warn!("grace period over; exiting with requests still in flight");
            Ok(())
        }
        _ = wait_for_signal() => {
            tracing::warn!("second signal; exiting now");
            Ok(())
        }
    }
}

/// A task that is stopped when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds `server.metrics_addr` and serves `/metrics` there; a bind failure stops start-up.
async fn serve_metrics(addr: std::net::SocketAddr, node: Arc<Node>) -> anyhow::Result<AbortOnDrop> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on server.metrics_addr {addr}"))?;
    let local = listener.local_addr().context("metrics listener has no address")?;
    tracing::info!(addr = %local, "metrics listening");
    let app = crate::http::metrics_router(node);
    Ok(AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the metrics listener failed: {e}");
        }
    })))
}

fn finished(r: Result<std::io::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    r.context("the server task panicked")?.context("server error")
}

/// SIGTERM (what platforms send) or SIGINT (Ctrl-C).
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
