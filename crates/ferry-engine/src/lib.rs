//! The engine: start-up (checks, publication, slot, indexes, backfill), then
//! the streaming loop capture → bounded queue → worker → sink → ack.
//!
//! ```text
//!  PostgreSQL slot ──pgoutput──▶ capture ──bounded queue──▶ worker ──_bulk──▶ OpenSearch
//!         ▲                                                   │
//!         └──────────── confirm LSN (only after the flush) ◀──┘
//! ```
//!
//! [`run`] keeps the pipeline alive: a retryable failure (database or
//! cluster unreachable, stream broken) tears the pipeline down and builds it
//! again after a capped exponential backoff, resuming from the slot's
//! confirmed position; nothing is lost because nothing unflushed was
//! confirmed. An error only an operator can fix ends `run` with the fix in
//! the message.

mod backfill;
mod build;
mod docplan;
mod error;
mod index;
pub mod ops;
mod poison;
mod seed;
mod setup;
mod worker;

pub use error::{Disposition, EngineError};
pub use setup::{check, Prepared};

use std::sync::Arc;
use std::time::Duration;

pub use ferry_core::stats::Stats;

use ferry_config::Config;
use tokio::sync::watch;

/// A signal that asks the engine to stop after the in-flight batch.
pub type Shutdown = watch::Receiver<bool>;

/// Like [`run`], restarting the pipeline with each new configuration
/// published on `configs` (SIGHUP): the in-flight batch is flushed and
/// confirmed, the pipeline stops, and it starts again with the new
/// configuration, so it is never half-configured.
pub async fn run_reloadable(
    mut configs: watch::Receiver<Config>,
    mut shutdown: Shutdown,
    stats: Arc<Stats>,
) -> Result<(), EngineError> {
    loop {
        let cfg = configs.borrow_and_update().clone();
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut outer = shutdown.clone();
        let mut cfgs = configs.clone();
        let forward = tokio::spawn(async move {
            tokio::select! {
                _ = outer.changed() => {}
                _ = cfgs.changed() => {}
            }
            let _ = stop_tx.send(true);
        });
        let result = run(cfg, stop_rx, stats.clone()).await;
        forward.abort();
        result?;
        if *shutdown.borrow_and_update() || !configs.has_changed().unwrap_or(false) {
            return Ok(());
        }
        tracing::info!("restarting the pipeline with the reloaded configuration");
    }
}

/// Runs ferry until `shutdown` turns true or an unrecoverable error occurs.
pub async fn run(
    cfg: Config,
    mut shutdown: Shutdown,
    stats: Arc<Stats>,
) -> Result<(), EngineError> {
    let mut backoff = Duration::from_millis(250);
    let max_backoff = Duration::from_secs(30);
    loop {
        let began = std::time::Instant::now();
        let result = run_once(&cfg, &mut shutdown, &stats).await;
        if began.elapsed() > Duration::from_secs(60) {
            // It ran for a while: this failure is news, not a repeat.
            backoff = Duration::from_millis(250);
        }
        let e = match result {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        match e.disposition() {
            Disposition::Standby => {
                // PostgreSQL lets one consumer hold a slot: that is our lock.
                // Poll it briskly so a standby takes over within seconds.
                tracing::info!(reason = %e, "standby: the slot is held by another consumer; retrying in 2 s");
                set_waiting(&stats, Some(format!("standby: {e}")));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                if *shutdown.borrow() {
                    return Ok(());
                }
            }
            Disposition::Retry => {
                stats
                    .reconnects
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "pipeline failed; restarting it");
                set_waiting(&stats, Some(format!("retrying: {e}")));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                if *shutdown.borrow() {
                    return Ok(());
                }
                backoff = (backoff * 2).min(max_backoff);
            }
            Disposition::Operator | Disposition::Fatal => return Err(e),
        }
    }
}

/// Records why the pipeline waits (the systemd `STATUS=` line shows it
/// until streaming starts again).
fn set_waiting(stats: &Stats, why: Option<String>) {
    *stats.waiting.lock().unwrap_or_else(|p| p.into_inner()) = why;
}

async fn run_once(
    cfg: &Config,
    shutdown: &mut Shutdown,
    stats: &Arc<Stats>,
) -> Result<(), EngineError> {
    let prepared = setup::prepare(cfg, stats).await?;
    if *shutdown.borrow() {
        return Ok(());
    }
    let result = worker::stream(cfg, prepared, shutdown, stats).await;
    stats
        .streaming
        .store(false, std::sync::atomic::Ordering::Relaxed);
    result
}
