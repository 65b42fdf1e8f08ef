//! Counters and gauges the engine updates and the admin endpoint reads.
//!
//! Plain atomics behind an `Arc`: updating costs a relaxed add, reading
//! never blocks the pipeline. Labels are low-cardinality (index position,
//! operation), never row values or document ids.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// Pipeline state of an index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexState {
    /// Not started yet.
    Starting,
    /// Copying existing rows.
    Backfilling,
    /// Following the stream.
    Streaming,
    /// Stopped (error or shutdown).
    Stopped,
    /// Paused through the control API: not written until resumed.
    Paused,
}

impl IndexState {
    /// Lower-case name, as shown in `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            IndexState::Starting => "starting",
            IndexState::Backfilling => "backfilling",
            IndexState::Streaming => "streaming",
            IndexState::Stopped => "stopped",
            IndexState::Paused => "paused",
        }
    }
}

/// Per-index figures.
#[derive(Debug)]
pub struct IndexStats {
    /// The alias users query.
    pub name: String,
    /// Current state.
    pub state: Mutex<IndexState>,
    /// Documents written (index operations acknowledged).
    pub docs_written: AtomicU64,
    /// Documents deleted.
    pub docs_deleted: AtomicU64,
    /// Writes the cluster already had in a newer version (409).
    pub docs_superseded: AtomicU64,
    /// Documents rejected for good (poison).
    pub docs_rejected: AtomicU64,
    /// Dead letters stored.
    pub dead_letters: AtomicU64,
    /// Backfill rows copied so far.
    pub backfill_rows: AtomicU64,
    /// Backfill row estimate (`-1` unknown).
    pub backfill_total: AtomicI64,
    /// Last error, if any.
    pub last_error: Mutex<Option<String>>,
}

/// Process-wide figures.
#[derive(Debug, Default)]
pub struct Stats {
    /// Per index, in config order (set once at start-up).
    pub indexes: Mutex<Vec<std::sync::Arc<IndexStats>>>,
    /// Row changes received, by operation: insert, update, delete.
    pub changes: [AtomicU64; 3],
    /// Transactions received.
    pub transactions: AtomicU64,
    /// Bulk requests by outcome class: 2xx, 4xx, 5xx/transport.
    pub bulk_requests: [AtomicU64; 3],
    /// Retried bulk attempts (whole request or items).
    pub retries: AtomicU64,
    /// SQL statements issued to build documents or resolve related changes.
    pub sql_statements: AtomicU64,
    /// Pipeline rebuilds after a retryable failure.
    pub reconnects: AtomicU64,
    /// Events waiting in the queue between capture and worker.
    pub queue_depth: AtomicI64,
    /// LSN confirmed to PostgreSQL.
    pub confirmed_lsn: AtomicU64,
    /// Highest commit LSN received.
    pub received_lsn: AtomicU64,
    /// Commit time (µs since 2000-01-01) of the last transaction made durable.
    pub last_durable_commit_us: AtomicI64,
    /// Batches flushed, and their summed sizes, latencies (µs).
    pub flushes: AtomicU64,
    /// Sum of writes per flushed batch.
    pub flush_docs: AtomicU64,
    /// Sum of flush latencies in microseconds.
    pub flush_micros: AtomicU64,
    /// Flush latency histogram buckets (≤ 5, 10, 25, 50, 100, 250, 500, 1000, 2500 ms, +Inf).
    pub flush_buckets: [AtomicU64; 10],
    /// True once streaming.
    pub streaming: std::sync::atomic::AtomicBool,
    /// True while the sink answers.
    pub sink_ok: std::sync::atomic::AtomicBool,
    /// Why the pipeline last waited instead of running (`standby: …`,
    /// `retrying: …`); meaningful while `streaming` is false.
    pub waiting: Mutex<Option<String>>,
}

/// Upper bounds (ms) of [`Stats::flush_buckets`], without the +Inf bucket.
pub const FLUSH_BUCKETS_MS: [u64; 9] = [5, 10, 25, 50, 100, 250, 500, 1000, 2500];

impl Stats {
    /// Registers the indexes (config order) and returns their stats.
    pub fn register(&self, names: &[String]) -> Vec<std::sync::Arc<IndexStats>> {
        let list: Vec<_> = names
            .iter()
            .map(|n| {
                std::sync::Arc::new(IndexStats {
                    name: n.clone(),
                    state: Mutex::new(IndexState::Starting),
                    docs_written: AtomicU64::new(0),
                    docs_deleted: AtomicU64::new(0),
                    docs_superseded: AtomicU64::new(0),
                    docs_rejected: AtomicU64::new(0),
                    dead_letters: AtomicU64::new(0),
                    backfill_rows: AtomicU64::new(0),
                    backfill_total: AtomicI64::new(-1),
                    last_error: Mutex::new(None),
                })
            })
            .collect();
        if let Ok(mut g) = self.indexes.lock() {
            *g = list.clone();
        }
        list
    }

    /// The stats of index `pos`, if registered.
    pub fn index(&self, pos: usize) -> Option<std::sync::Arc<IndexStats>> {
        self.indexes.lock().ok().and_then(|g| g.get(pos).cloned())
    }

    /// Records one flushed batch.
    pub fn record_flush(&self, docs: u64, micros: u64) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.flush_docs.fetch_add(docs, Ordering::Relaxed);
        self.flush_micros.fetch_add(micros, Ordering::Relaxed);
        let ms = micros / 1000;
        let b = FLUSH_BUCKETS_MS
            .iter()
            .position(|le| ms <= *le)
            .unwrap_or(FLUSH_BUCKETS_MS.len());
        if let Some(bucket) = self.flush_buckets.get(b) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl IndexStats {
    /// Sets the state.
    pub fn set_state(&self, s: IndexState) {
        if let Ok(mut g) = self.state.lock() {
            *g = s;
        }
    }

    /// Reads the state.
    pub fn state(&self) -> IndexState {
        self.state.lock().map(|g| *g).unwrap_or(IndexState::Stopped)
    }

    /// Records an error message (never row values).
    pub fn set_error(&self, e: &str) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some(e.to_string());
        }
    }
}
