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

mod client;
pub mod control;
mod metrics;
mod routes;
mod server;
mod status;
pub mod systemd;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

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

/// `Ok` when ferry is ready to serve traffic (streaming and the sink
/// answering), else the reason it is not.
pub fn readiness(stats: &Stats) -> Result<(), &'static str> {
    if !stats.sink_ok.load(Relaxed) {
        Err("the search cluster has not answered yet or is failing")
    } else if !stats.streaming.load(Relaxed) {
        Err("not streaming yet (starting, backfilling, or standing by for the slot)")
    } else {
        Ok(())
    }
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
    /// Seconds since the commit of the last transaction made durable, while
    /// something is pending; 0 when caught up or when no commit is durable yet.
    pub seconds: f64,
}

/// The lag as of `now_us` (µs since 2000-01-01).
pub(crate) fn lag(stats: &Stats, now_us: i64) -> Lag {
    let confirmed = stats.confirmed_lsn.load(Relaxed);
    let received = stats.received_lsn.load(Relaxed);
    let bytes = received.saturating_sub(confirmed);
    let last = stats.last_durable_commit_us.load(Relaxed);
    let seconds = if bytes == 0 || last <= 0 {
        0.0
    } else {
        now_us.saturating_sub(last).max(0) as f64 / 1e6
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
        let ix = s.register(&["users".to_string(), "orders".to_string()]);
        s.changes[0].store(10, Relaxed);
        s.changes[1].store(4, Relaxed);
        s.changes[2].store(1, Relaxed);
        s.transactions.store(7, Relaxed);
        s.bulk_requests[0].store(3, Relaxed);
        s.retries.store(2, Relaxed);
        s.reconnects.store(1, Relaxed);
        s.queue_depth.store(5, Relaxed);
        s.confirmed_lsn.store(0x1_0000_0100, Relaxed);
        s.received_lsn.store(0x1_0000_0180, Relaxed);
        s.last_durable_commit_us.store(1_000_000_000, Relaxed);
        s.record_flush(10, 3_000); // 3 ms
        s.record_flush(20, 30_000); // 30 ms
        s.record_flush(30, 4_000_000); // 4 s
        s.streaming.store(true, Relaxed);
        s.sink_ok.store(true, Relaxed);
        ix[0].set_state(IndexState::Streaming);
        ix[0].docs_written.store(12, Relaxed);
        ix[0].docs_deleted.store(1, Relaxed);
        ix[0].docs_superseded.store(2, Relaxed);
        ix[0].docs_rejected.store(1, Relaxed);
        ix[0].dead_letters.store(1, Relaxed);
        ix[0].backfill_rows.store(100, Relaxed);
        ix[0].backfill_total.store(120, Relaxed);
        ix[0].set_error("mapper_parsing_exception on field \"age\"");
        ix[1].set_state(IndexState::Backfilling);
        ix[1].backfill_rows.store(5, Relaxed);
        s
    }

    /// The time the sample is observed at: 2.5 s after its last durable commit.
    pub const NOW: i64 = 1_002_500_000;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_zero_when_caught_up() {
        let s = testutil::sample();
        assert_eq!(
            lag(&s, testutil::NOW),
            Lag {
                bytes: 0x80,
                seconds: 2.5
            }
        );
        s.confirmed_lsn.store(0x1_0000_0200, Relaxed);
        assert_eq!(
            lag(&s, testutil::NOW),
            Lag {
                bytes: 0,
                seconds: 0.0
            }
        );
    }

    #[test]
    fn lag_seconds_unknown_before_first_durable_commit() {
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

    #[test]
    fn readiness_names_the_missing_condition() {
        let s = Stats::default();
        assert!(readiness(&s).unwrap_err().contains("search cluster"));
        s.sink_ok.store(true, Relaxed);
        assert!(readiness(&s).unwrap_err().contains("not streaming"));
        s.streaming.store(true, Relaxed);
        assert_eq!(readiness(&s), Ok(()));
    }
}
