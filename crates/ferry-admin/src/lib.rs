//! ferry's admin endpoint: a small HTTP server over the engine's [`Stats`]
//! (read-only routes, plus the bearer-guarded control API of [`control`]
//! when a token is configured), and systemd readiness/watchdog notifications.
//!
//! Routes (GET or HEAD, served by axum on hyper; every response closes the
//! connection):
//!
//! * `/healthz`: `200 ok` while the process answers at all;
//! * `/readyz`: `200` once ferry streams changes and the search cluster
//!   answers, `503` with the reason otherwise;
//! * `/metrics`: Prometheus text exposition format 0.0.4 (`prometheus-client`);
//! * `/status`: a JSON summary (slot, positions, lag, per-index progress).
//!
//! `/control/…` is the control API ([`control`]): `404` unless a token is
//! configured, then `401` without the right bearer token.
//!
//! Nothing the read-only routes serve contains row values, document ids or credentials:
//! only counters, index names, the slot name and error messages the engine
//! records without row data.
//!
//! [`telemetry`] exports the pipeline's trace spans over OTLP when configured.

mod client;
pub mod control;
mod metrics;
mod routes;
mod server;
mod status;
pub mod systemd;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::stats::Stats;

pub use client::{call, fetch, Response};
pub use control::{Action, ControlApi, ControlError, ControlRequest};
pub use metrics::Metrics;
pub use server::AdminServer;
pub use status::{admin_url, status_json, status_table};

/// Facts about the process that the counters do not carry, shown in `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminInfo {
    /// The replication slot ferry consumes.
    pub slot: String,
    /// ferry's version (`CARGO_PKG_VERSION` of the binary).
    pub version: &'static str,
    /// When `/readyz` and `/healthz` turn failing.
    pub limits: HealthLimits,
}

/// The thresholds of the health checks (`[admin]` `flush_failure_secs` and
/// `stall_timeout_secs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthLimits {
    /// `/readyz` fails once bulk writes have failed (and been retried) for this long.
    pub flush_failure: Duration,
    /// `/healthz` fails, and the systemd watchdog stops, once work has
    /// been pending this long without progress.
    pub stall: Duration,
}

impl Default for HealthLimits {
    fn default() -> Self {
        HealthLimits {
            flush_failure: Duration::from_secs(30),
            stall: Duration::from_secs(300),
        }
    }
}

/// What can go wrong serving or fetching admin pages.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The listening socket could not be opened (address in use, not local, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The listening socket stopped accepting connections.
    #[error("the admin listener failed: {0}")]
    Accept(#[source] std::io::Error),
    /// The URL given to [`fetch`] is not a plain `http://host:port/path` URL.
    #[error("invalid admin URL {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// [`fetch`] could not connect, timed out or got no complete HTTP response.
    #[error("request to {url} failed: {reason}")]
    Request {
        /// The URL requested.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

/// Binds `listen` and serves the admin routes until the listener fails.
///
/// Runs until the task is aborted; returns only on an error (binding, or
/// the listener failing for good). To learn the bound address or report a
/// bind failure before starting, use [`AdminServer::bind`] and
/// [`AdminServer::run`].
pub async fn serve(
    listen: SocketAddr,
    stats: Arc<Stats>,
    info: AdminInfo,
) -> Result<(), AdminError> {
    AdminServer::bind(listen).await?.run(stats, info).await
}

/// `Ok` while the pipeline is not wedged, else why: work (a transaction
/// received and not confirmed, or an index being copied) has been pending
/// for longer than `limits.stall` without progress (see
/// `ferry_core::stats` for both definitions). Starting, retrying and
/// standing by are live: the restart loop runs.
pub fn liveness(stats: &Stats, limits: &HealthLimits, now: u64) -> Result<(), String> {
    match stats.stalled_for(now) {
        Some(t) if t > limits.stall => Err(format!(
            "stalled: no progress for {} s while work is pending (a flush or a copy does not complete; [admin] stall_timeout_secs = {})",
            t.as_secs(),
            limits.stall.as_secs()
        )),
        _ => Ok(()),
    }
}

/// `Ok` when ferry is ready to serve traffic, else the reason it is not:
/// a standby, PostgreSQL or the search cluster unreachable, bulk writes
/// failing for longer than `limits.flush_failure`, a stalled pipeline
/// ([`liveness`]), or not streaming yet.
pub fn readiness(stats: &Stats, limits: &HealthLimits, now: u64) -> Result<(), String> {
    if stats.standby.load(Relaxed) {
        return Err("standby: another consumer holds the replication slot; this ferry takes over when it is released".into());
    }
    if !stats.source_ok.load(Relaxed) {
        return Err("PostgreSQL is unreachable (or not reached yet)".into());
    }
    if !stats.sink_ok.load(Relaxed) {
        let down: Vec<String> = stats
            .sinks()
            .iter()
            .filter(|s| !s.ok.load(Relaxed))
            .map(|s| s.name.clone())
            .collect();
        return Err(match down.is_empty() {
            true => "the search cluster is unreachable (or not reached yet)".into(),
            false => format!("sink {} unreachable (or not reached yet)", down.join(", ")),
        });
    }
    if let Some(t) = stats.flush_failing_for(now) {
        if t > limits.flush_failure {
            return Err(format!(
                "bulk writes have failed for {} s and are being retried ([admin] flush_failure_secs = {})",
                t.as_secs(),
                limits.flush_failure.as_secs()
            ));
        }
    }
    liveness(stats, limits, now)?;
    if !stats.streaming.load(Relaxed) {
        let waiting = stats
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        return Err(
            waiting.unwrap_or_else(|| "not streaming yet (starting, or preparing indexes)".into())
        );
    }
    Ok(())
}

/// Seconds between 1970-01-01 and 2000-01-01, PostgreSQL's timestamp epoch.
const PG_EPOCH_OFFSET_SECS: i64 = 946_684_800;

/// Now, in microseconds since 2000-01-01 (the unit of
/// [`Stats::last_durable_commit_us`]).
pub(crate) fn now_pg_micros() -> i64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    unix.saturating_sub(PG_EPOCH_OFFSET_SECS * 1_000_000)
}

/// How far the index trails the database.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Lag {
    /// Received minus confirmed LSN.
    pub bytes: u64,
    /// Seconds since the commit of the oldest transaction received and not
    /// yet confirmed; 0 when everything received is confirmed.
    pub seconds: f64,
}

/// The lag as of `now_us` (µs since 2000-01-01).
pub(crate) fn lag(stats: &Stats, now_us: i64) -> Lag {
    let confirmed = stats.confirmed_lsn.load(Relaxed);
    let received = stats.received_lsn.load(Relaxed);
    let bytes = received.saturating_sub(confirmed);
    let seconds = match stats.oldest_unconfirmed_commit_us() {
        Some(oldest) if oldest > 0 => now_us.saturating_sub(oldest).max(0) as f64 / 1e6,
        _ => 0.0,
    };
    Lag { bytes, seconds }
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use ferry_core::stats::IndexState;

    /// Stats with two indexes and some traffic, at a fixed time.
    pub fn sample() -> Stats {
        let s = Stats::default();
        let ix = s.register(&[("users".into(), None), ("orders".into(), None)]);
        s.set_streaming(true);
        s.register_table(16384, "public.users");
        s.count_change(16384, 0);
        s.changes[0].store(10, Relaxed);
        s.changes[1].store(4, Relaxed);
        s.changes[2].store(1, Relaxed);
        // One transaction received (committed 2.5 s before NOW), unconfirmed.
        s.transaction_began(0x1_0000_0180);
        s.transaction_committed(0x1_0000_01a0, 1_000_000_000);
        s.transactions.store(7, Relaxed);
        s.bulk_requests[0].store(3, Relaxed);
        s.bulk_requests[2].store(1, Relaxed);
        s.retries.store(2, Relaxed);
        s.reconnects.store(1, Relaxed);
        s.restarts_requested.store(4, Relaxed);
        s.set_queue_probe(Some(Box::new(|| 5)));
        s.confirmed_lsn.store(0x1_0000_0100, Relaxed);
        s.last_durable_commit_us.store(900_000_000, Relaxed);
        s.record_flush(10, 3_000); // 3 ms
        s.record_flush(20, 30_000); // 30 ms
        s.record_flush(30, 4_000_000); // 4 s
        s.sink_ok.store(true, Relaxed);
        s.source_ok.store(true, Relaxed);
        ix[0].set_state(IndexState::Streaming);
        ix[0].docs_written.store(12, Relaxed);
        ix[0].docs_deleted.store(1, Relaxed);
        ix[0].docs_superseded.store(2, Relaxed);
        ix[0].docs_rejected.store(1, Relaxed);
        ix[0].dead_letters.store(1, Relaxed);
        ix[0].backfill_rows.store(100, Relaxed);
        ix[0].backfill_total.store(120, Relaxed);
        ix[0].set_error("mapper_parsing_exception on field \"age\"");
        ix[1].set_state(IndexState::Seeding);
        ix[1].backfill_rows.store(5, Relaxed);
        s
    }

    /// The time the sample is observed at: 2.5 s after its oldest unconfirmed commit.
    pub const NOW: i64 = 1_002_500_000;
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::stats::{mono_us, IndexState};

    #[test]
    fn lag_counts_from_the_oldest_unconfirmed_commit() {
        let s = testutil::sample();
        assert_eq!(
            lag(&s, testutil::NOW),
            Lag {
                bytes: 0x80,
                seconds: 2.5
            }
        );
        s.confirmed(0x1_0000_01a0);
        assert_eq!(
            lag(&s, testutil::NOW),
            Lag {
                bytes: 0,
                seconds: 0.0
            }
        );
    }

    #[test]
    fn lag_seconds_zero_with_nothing_unconfirmed() {
        let s = Stats::default();
        s.received_lsn.store(10, Relaxed);
        let l = lag(&s, testutil::NOW);
        assert_eq!(l.bytes, 10);
        assert_eq!(l.seconds, 0.0);
    }

    #[test]
    fn now_is_after_2020_in_pg_time() {
        // 2020-01-01 is 631 152 000 s after 2000-01-01.
        assert!(now_pg_micros() > 631_152_000 * 1_000_000);
    }

    fn ready_stats() -> Stats {
        let s = Stats::default();
        s.register(&[("a".into(), None)])[0].set_state(IndexState::Streaming);
        s.source_ok.store(true, Relaxed);
        s.sink_ok.store(true, Relaxed);
        s.set_streaming(true);
        s
    }

    #[test]
    fn readiness_names_the_missing_condition() {
        let limits = HealthLimits::default();
        let now = mono_us();
        let s = Stats::default();
        assert!(readiness(&s, &limits, now)
            .unwrap_err()
            .contains("PostgreSQL"));
        s.source_ok.store(true, Relaxed);
        assert!(readiness(&s, &limits, now)
            .unwrap_err()
            .contains("search cluster"));
        s.sink_ok.store(true, Relaxed);
        assert!(readiness(&s, &limits, now)
            .unwrap_err()
            .contains("not streaming"));
        *s.waiting.lock().unwrap() = Some("retrying: PostgreSQL is down".into());
        assert_eq!(
            readiness(&s, &limits, now).unwrap_err(),
            "retrying: PostgreSQL is down"
        );
        s.set_streaming(true);
        assert_eq!(readiness(&s, &limits, now), Ok(()));
        s.standby.store(true, Relaxed);
        assert!(readiness(&s, &limits, now)
            .unwrap_err()
            .starts_with("standby"));
    }

    #[test]
    fn readiness_fails_once_bulk_writes_fail_longer_than_the_limit() {
        let limits = HealthLimits::default();
        let s = ready_stats();
        s.bulk_retried(None);
        let now = mono_us();
        assert_eq!(
            readiness(&s, &limits, now),
            Ok(()),
            "a short failure is tolerated"
        );
        let later = now + 31_000_000;
        assert!(readiness(&s, &limits, later)
            .unwrap_err()
            .contains("flush_failure_secs = 30"));
        s.bulk_completed(None);
        assert_eq!(readiness(&s, &limits, later), Ok(()));
    }

    #[test]
    fn liveness_fails_only_when_pending_work_makes_no_progress() {
        let limits = HealthLimits::default();
        let s = ready_stats();
        let hour = 3_600_000_000;
        assert_eq!(
            liveness(&s, &limits, mono_us() + hour),
            Ok(()),
            "idle is live"
        );
        s.transaction_began(100);
        let now = mono_us();
        assert_eq!(liveness(&s, &limits, now + 299_000_000), Ok(()));
        let err = liveness(&s, &limits, now + 301_000_000).unwrap_err();
        assert!(err.contains("stall_timeout_secs = 300"), "{err}");
        assert!(readiness(&s, &limits, now + 301_000_000).is_err());
        s.transaction_committed(120, 1);
        s.confirmed(120);
        assert_eq!(liveness(&s, &limits, mono_us() + hour), Ok(()));
    }
}
