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
pub mod configplan;
mod docplan;
mod error;
mod health;
mod index;
pub mod ops;
mod poison;
pub mod preview;
mod seed;
mod setup;
mod worker;

pub use backfill::set_progress_bar;
pub use error::{Disposition, EngineError, EXIT_SLOT_LOST};
pub use setup::{check, Prepared};

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::stats::IndexState;
pub use ferry_core::stats::Stats;

use backon::ExponentialBackoff;
use ferry_config::{Config, SlotLostPolicy};
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
    let mut delays = restart_delays();
    loop {
        // A new attempt: the last wait's reason no longer describes the phase.
        set_waiting(&stats, None);
        let began = std::time::Instant::now();
        let result = run_once(&cfg, &mut shutdown, &stats).await;
        if began.elapsed() > Duration::from_secs(60) {
            // It ran for a while: this failure is news, not a repeat.
            delays = restart_delays();
        }
        let e = match result {
            Ok(()) => {
                stats.set_all_states(IndexState::Stopped);
                return Ok(());
            }
            Err(e) => e,
        };
        let disposition = e.disposition();
        stats
            .standby
            .store(disposition == Disposition::Standby, Relaxed);
        stats.set_all_states(state_while_restarting(&e, disposition));
        let deliberate = matches!(e, EngineError::Restart(_));
        if disposition == Disposition::Retry && matches!(e, EngineError::Source(_)) {
            stats.source_ok.store(false, Relaxed);
        }
        match disposition {
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
            Disposition::SlotLost if cfg.source.on_slot_lost == SlotLostPolicy::Stop => {
                return Err(EngineError::SlotLost {
                    slot: cfg.source.slot.clone(),
                    cause: Box::new(e),
                });
            }
            d @ (Disposition::Retry | Disposition::SlotLost) => {
                let backoff = delays.next().unwrap_or(MAX_RESTART_DELAY);
                if d == Disposition::SlotLost {
                    // The next start recreates the slot and builds every
                    // index beside the one its alias serves.
                    tracing::warn!(error = %e, slot = %cfg.source.slot, "replication slot lost; source.on_slot_lost = \"reseed\": recreating it and rebuilding every index beside the live one");
                } else if deliberate {
                    stats.restarts_requested.fetch_add(1, Relaxed);
                    tracing::info!(reason = %e, retry_in_ms = backoff.as_millis() as u64, "restarting the pipeline");
                } else {
                    stats.reconnects.fetch_add(1, Relaxed);
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "pipeline failed; restarting it");
                }
                let phase = if deliberate { "restarting" } else { "retrying" };
                set_waiting(&stats, Some(format!("{phase}: {e}")));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                if *shutdown.borrow() {
                    return Ok(());
                }
            }
            Disposition::Operator | Disposition::Fatal => return Err(e),
        }
    }
}

/// The first restart step; each further failure in a row doubles it.
const FIRST_RESTART_DELAY: Duration = Duration::from_millis(250);
/// No restart waits longer than this: short, so the pipeline is back within
/// seconds of PostgreSQL or the cluster answering again, however long the
/// outage was.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(3);

/// Restart delays for one run of failures, forever: step `n` doubles from
/// [`FIRST_RESTART_DELAY`] up to [`MAX_RESTART_DELAY`], and each delay is
/// drawn at random from `[step / 2, step)` so ferry processes that lost the
/// same server do not all come back at the same instant.
fn restart_delays() -> ExponentialBackoff {
    ferry_core::backoff::jittered(FIRST_RESTART_DELAY, MAX_RESTART_DELAY)
}

/// The state every index shows while the restart loop handles `e`: a
/// restart ferry asked for itself (`EngineError::Restart`: a rebuild to
/// start, a table's new shape) is no failure, and is not counted as a
/// reconnect either.
fn state_while_restarting(e: &EngineError, d: Disposition) -> IndexState {
    match (e, d) {
        // Another ferry maintains the indexes.
        (_, Disposition::Standby) => IndexState::Stopped,
        (EngineError::Restart(_), _) => IndexState::Starting,
        _ => IndexState::Failed,
    }
}

/// Records why the pipeline waits (the systemd `STATUS=` line shows it
/// until the restart loop tries again).
fn set_waiting(stats: &Stats, why: Option<String>) {
    *stats.waiting.lock().unwrap_or_else(|p| p.into_inner()) = why;
}

async fn run_once(
    cfg: &Config,
    shutdown: &mut Shutdown,
    stats: &Arc<Stats>,
) -> Result<(), EngineError> {
    // One entry per index and sink: what the pipeline writes.
    let cfg = &cfg.fan_out();
    let prepared = setup::prepare(cfg, stats).await?;
    if *shutdown.borrow() {
        return Ok(());
    }
    let sinks = prepared.sinks.iter().map(|s| s.sink.clone()).collect();
    let probe = tokio::spawn(health::probe_sinks(sinks));
    let result = worker::stream(cfg, prepared, shutdown, stats).await;
    probe.abort();
    stats.set_streaming(false);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_delays_double_with_jitter_and_never_pass_the_cap() {
        let mut delays = restart_delays();
        let mut step = FIRST_RESTART_DELAY;
        for _ in 0..40 {
            let d = delays.next().expect("restarts forever");
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} outside [{:?}, {step:?}]",
                step / 2
            );
            step = (step * 2).min(MAX_RESTART_DELAY);
        }
    }

    #[test]
    fn a_restart_ferry_asks_for_itself_shows_no_index_as_failed() {
        let restart = EngineError::Restart("a related table was truncated".into());
        assert_eq!(
            state_while_restarting(&restart, restart.disposition()),
            IndexState::Starting
        );
        let lost = EngineError::Stream("the stream ended".into());
        assert_eq!(
            state_while_restarting(&lost, Disposition::Retry),
            IndexState::Failed
        );
        assert_eq!(
            state_while_restarting(&lost, Disposition::Standby),
            IndexState::Stopped
        );
    }

    #[test]
    fn restart_delays_differ_between_processes() {
        let firsts: std::collections::HashSet<Duration> = (0..20)
            .map(|_| restart_delays().next().expect("a delay"))
            .collect();
        assert!(firsts.len() > 1, "twenty fresh runs all waited {firsts:?}");
    }
}
