//! Counters and gauges the engine updates and the admin endpoint reads,
//! and the one definition of pipeline *progress* the health checks and the
//! systemd watchdog follow.
//!
//! Plain atomics behind an `Arc`: updating costs a relaxed add, reading
//! never blocks the pipeline. Labels are low-cardinality (index, table,
//! operation), never row values or document ids.
//!
//! # Progress and pending work
//! *Progress* is any of: a batch made durable by a successful bulk flush, a
//! position confirmed to PostgreSQL, a backfill page made durable, and the
//! start of streaming; each calls [`Stats::progressed`], which stamps
//! [`Stats::progress_at`]. *Pending work*, while streaming, is a
//! transaction received and not yet confirmed (open or committed), or an
//! index still seeding or rebuilding ([`Stats::has_pending_work`]). The
//! pipeline is *stalled* when work has been pending without progress
//! ([`Stats::stalled_for`], counted from the later of the last progress and
//! the moment work arrived on an idle pipeline, or from when the oldest bulk
//! flush still in flight was sent if that is earlier: with several flushes
//! in flight, later ones landing are no progress past one that hangs);
//! outside streaming (starting,
//! retrying, standby) nothing is pending: the restart loop is what runs.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

/// Pipeline state of an index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexState {
    /// Registered, the pipeline is preparing it.
    Starting,
    /// First copy of the table into a new index (nothing served yet), while
    /// the stream writes to it too.
    Seeding,
    /// Copying into a new concrete index beside the one its alias still
    /// serves (mapping change, `reindex`, lost slot, related TRUNCATE).
    Rebuilding,
    /// Seeded and following the stream.
    Streaming,
    /// Not maintained by this process: stopped cleanly, or standing by
    /// while another ferry holds the slot.
    Stopped,
    /// The pipeline failed: retrying after a backoff, or ended with an error.
    Failed,
    /// Paused through the control API: not written until resumed.
    Paused,
}

impl IndexState {
    /// Every state, in the order `/metrics` lists them.
    pub const ALL: [IndexState; 7] = [
        IndexState::Starting,
        IndexState::Seeding,
        IndexState::Rebuilding,
        IndexState::Streaming,
        IndexState::Stopped,
        IndexState::Failed,
        IndexState::Paused,
    ];

    /// Lower-case name, as shown in `/status` and `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            IndexState::Starting => "starting",
            IndexState::Seeding => "seeding",
            IndexState::Rebuilding => "rebuilding",
            IndexState::Streaming => "streaming",
            IndexState::Stopped => "stopped",
            IndexState::Failed => "failed",
            IndexState::Paused => "paused",
        }
    }

    /// True while a copy into the index runs (seeding or rebuilding).
    pub fn is_copying(self) -> bool {
        matches!(self, IndexState::Seeding | IndexState::Rebuilding)
    }
}

/// Per-index figures.
#[derive(Debug)]
pub struct IndexStats {
    /// The alias users query.
    pub name: String,
    /// The named sink it goes to (`[sink.NAME]`); `None` with one unnamed sink.
    pub sink: Option<String>,
    /// Current state.
    pub state: Mutex<IndexState>,
    /// Index operations the cluster applied (superseded and rejected ones excluded).
    pub docs_written: AtomicU64,
    /// Deletes the cluster applied (superseded and rejected ones excluded).
    pub docs_deleted: AtomicU64,
    /// Writes the cluster already had in a newer version (409 on external versions).
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

/// One named sink's reachability (`[sink.NAME]`); the global
/// [`Stats::sink_ok`] and bulk failure clock hold for all sinks together.
#[derive(Debug)]
pub struct SinkStats {
    /// `NAME` of `[sink.NAME]`.
    pub name: String,
    /// Its last request got an HTTP answer (or its log was written).
    pub ok: AtomicBool,
    /// When its bulk attempts began failing in a row ([`mono_us`]); 0 when not.
    failing_since: AtomicU64,
}

impl SinkStats {
    /// How long its bulk attempts have failed in a row, as of `now` ([`mono_us`]).
    pub fn failing_for(&self, now: u64) -> Option<Duration> {
        match self.failing_since.load(Relaxed) {
            0 => None,
            since => Some(Duration::from_micros(now.saturating_sub(since))),
        }
    }
}

/// Row changes received for one table, by operation (insert, update, delete).
#[derive(Debug)]
pub struct TableStats {
    /// `schema.table`.
    pub name: String,
    /// Insert, update, delete.
    pub changes: [AtomicU64; 3],
}

/// How many events wait in the capture queue, asked at the moment it is read.
pub type QueueProbe = Box<dyn Fn() -> usize + Send + Sync>;

/// The class of one bulk request's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkClass {
    /// 2xx.
    Success,
    /// 4xx.
    ClientError,
    /// 5xx, or no HTTP answer at all (connection refused or dropped, timeout).
    ServerError,
}

impl BulkClass {
    /// The class of an HTTP status (`None`: no answer).
    pub fn of(status: Option<u16>) -> BulkClass {
        match status {
            Some(200..=299) => BulkClass::Success,
            Some(400..=499) => BulkClass::ClientError,
            _ => BulkClass::ServerError,
        }
    }
}

/// Process-wide figures.
#[derive(Default)]
pub struct Stats {
    /// Per index, in config order (set once at start-up).
    pub indexes: Mutex<Vec<Arc<IndexStats>>>,
    /// Row changes received, by operation: insert, update, delete.
    pub changes: [AtomicU64; 3],
    /// Row changes per table (relation OID → counters shared by name).
    tables: RwLock<Tables>,
    /// Transactions received.
    pub transactions: AtomicU64,
    /// Bulk requests by outcome class: 2xx, 4xx, 5xx/transport (see [`BulkClass`]).
    pub bulk_requests: [AtomicU64; 3],
    /// Bulk requests sent again after a transient failure (the whole
    /// request, or the items the cluster asked to retry).
    pub retries: AtomicU64,
    /// SQL statements issued to build documents or resolve related changes.
    pub sql_statements: AtomicU64,
    /// Pipeline rebuilds after a retryable failure.
    pub reconnects: AtomicU64,
    /// Pipeline restarts ferry asked for itself (a rebuild to start after a
    /// related TRUNCATE or a partition change, a table's new shape).
    pub restarts_requested: AtomicU64,
    /// Reads the capture queue's depth (installed while streaming).
    queue: Mutex<Option<QueueProbe>>,
    /// LSN confirmed to PostgreSQL.
    pub confirmed_lsn: AtomicU64,
    /// Highest commit LSN received.
    pub received_lsn: AtomicU64,
    /// Commit time (µs since 2000-01-01) of the last transaction made durable.
    pub last_durable_commit_us: AtomicI64,
    /// Committed transactions not yet confirmed: (end LSN, commit time µs
    /// since 2000-01-01), oldest first.
    unconfirmed: Mutex<VecDeque<(u64, i64)>>,
    /// A transaction is open (Begin seen, Commit not yet).
    open_transaction: AtomicBool,
    /// Batches flushed, and their summed sizes, latencies (µs).
    pub flushes: AtomicU64,
    /// Sum of writes per flushed batch.
    pub flush_docs: AtomicU64,
    /// Sum of flush latencies in microseconds.
    pub flush_micros: AtomicU64,
    /// Flush latency histogram buckets (≤ 5, 10, 25, 50, 100, 250, 500, 1000, 2500 ms, +Inf).
    pub flush_buckets: [AtomicU64; 10],
    /// Batch size histogram buckets (see [`BATCH_BUCKETS`], then +Inf).
    pub batch_buckets: [AtomicU64; 10],
    /// True once streaming.
    pub streaming: AtomicBool,
    /// True while the search cluster answers HTTP requests (any status).
    pub sink_ok: AtomicBool,
    /// True once PostgreSQL was reached, false after the pipeline failed
    /// because the source was unreachable.
    pub source_ok: AtomicBool,
    /// True while another consumer holds the slot and this ferry waits to
    /// take over; cleared when streaming starts or the pipeline fails
    /// otherwise.
    pub standby: AtomicBool,
    /// Since when (monotonic µs, [`mono_us`]) bulk attempts fail in a row; 0 when the last succeeded.
    sink_failing_since: AtomicU64,
    /// The named sinks (`[sink.NAME]`), in order; empty with one unnamed sink.
    sinks: Mutex<Vec<Arc<SinkStats>>>,
    /// Last progress (monotonic µs, [`mono_us`]); see the module docs.
    pub progress_at: AtomicU64,
    /// When work last arrived on a pipeline that had none pending (monotonic µs).
    busy_since: AtomicU64,
    /// When the oldest bulk flush still in flight was sent (monotonic µs);
    /// 0 when none is.
    oldest_flush_at: AtomicU64,
    /// Why the pipeline last waited instead of running (`standby: …`,
    /// `retrying: …`); cleared when the restart loop tries again.
    pub waiting: Mutex<Option<String>>,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats")
            .field("streaming", &self.streaming.load(Relaxed))
            .field("confirmed_lsn", &self.confirmed_lsn.load(Relaxed))
            .field("received_lsn", &self.received_lsn.load(Relaxed))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Tables {
    by_oid: HashMap<u32, Arc<TableStats>>,
    by_name: BTreeMap<String, Arc<TableStats>>,
}

/// Microseconds on a monotonic clock that starts with the process; never 0.
pub fn mono_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_micros())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// Upper bounds (documents) of [`Stats::batch_buckets`], without the +Inf bucket.
pub const BATCH_BUCKETS: [u64; 9] = [1, 10, 50, 100, 500, 1000, 2500, 5000, 10000];

/// Upper bounds (ms) of [`Stats::flush_buckets`], without the +Inf bucket.
pub const FLUSH_BUCKETS_MS: [u64; 9] = [5, 10, 25, 50, 100, 250, 500, 1000, 2500];

impl Stats {
    /// Registers the indexes (config order) and returns their stats.
    /// Each is (alias, named sink it goes to).
    pub fn register(&self, names: &[(String, Option<String>)]) -> Vec<Arc<IndexStats>> {
        let list: Vec<_> = names
            .iter()
            .map(|(n, sink)| {
                Arc::new(IndexStats {
                    name: n.clone(),
                    sink: sink.clone(),
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

    /// Registers the named sinks of the run (replacing those of an earlier
    /// configuration; one already known keeps its figures) and returns their
    /// stats, in order.
    pub fn register_sinks(&self, names: &[String]) -> Vec<Arc<SinkStats>> {
        let mut g = lock(&self.sinks);
        let list: Vec<Arc<SinkStats>> = names
            .iter()
            .map(|n| {
                let known = g.iter().find(|s| &s.name == n).cloned();
                if let Some(k) = &known {
                    // A new run: its first bulk attempt starts the clock.
                    k.failing_since.store(0, Relaxed);
                }
                known.unwrap_or_else(|| {
                    Arc::new(SinkStats {
                        name: n.clone(),
                        ok: AtomicBool::new(false),
                        failing_since: AtomicU64::new(0),
                    })
                })
            })
            .collect();
        *g = list.clone();
        list
    }

    /// The named sinks' stats (empty with one unnamed sink).
    pub fn sinks(&self) -> Vec<Arc<SinkStats>> {
        lock(&self.sinks).clone()
    }

    /// The stats of index `pos`, if registered.
    pub fn index(&self, pos: usize) -> Option<Arc<IndexStats>> {
        self.indexes.lock().ok().and_then(|g| g.get(pos).cloned())
    }

    /// Sets the state of every registered index; a paused index stays
    /// paused (a restart or a failure changes nothing about it) unless the
    /// process stops.
    pub fn set_all_states(&self, state: IndexState) {
        for ix in self.indexes.lock().map(|g| g.clone()).unwrap_or_default() {
            if ix.state() != IndexState::Paused || state == IndexState::Stopped {
                ix.set_state(state);
            }
        }
    }

    /// Records one flushed batch of `docs` writes that took `micros`; a
    /// durable flush is progress.
    pub fn record_flush(&self, docs: u64, micros: u64) {
        self.flushes.fetch_add(1, Relaxed);
        self.flush_docs.fetch_add(docs, Relaxed);
        self.flush_micros.fetch_add(micros, Relaxed);
        bump_bucket(&self.flush_buckets, &FLUSH_BUCKETS_MS, micros / 1000);
        bump_bucket(&self.batch_buckets, &BATCH_BUCKETS, docs);
        self.progressed();
    }

    /// Marks progress now (see the module docs for what counts).
    pub fn progressed(&self) {
        self.progress_at.store(mono_us(), Relaxed);
    }

    /// Streaming started (`true`: a baseline of progress, no standby any
    /// more, no unconfirmed transaction carried over from a failed
    /// pipeline) or stopped (`false`: the queue probe goes too).
    pub fn set_streaming(&self, on: bool) {
        self.streaming.store(on, Relaxed);
        self.open_transaction.store(false, Relaxed);
        self.oldest_flush_at.store(0, Relaxed);
        lock(&self.unconfirmed).clear();
        if on {
            self.standby.store(false, Relaxed);
            self.progressed();
        } else {
            self.set_queue_probe(None);
        }
    }

    /// A transaction began; its writes will carry `final_lsn`.
    pub fn transaction_began(&self, final_lsn: u64) {
        self.transactions.fetch_add(1, Relaxed);
        self.received_lsn.fetch_max(final_lsn, Relaxed);
        if lock(&self.unconfirmed).is_empty() {
            // Work arrives on an idle pipeline: the stall clock starts now.
            self.busy_since.store(mono_us(), Relaxed);
        }
        self.open_transaction.store(true, Relaxed);
    }

    /// A transaction committed at `commit_ts` (µs since 2000-01-01); it is
    /// unconfirmed until a position at or past `end_lsn` is confirmed.
    pub fn transaction_committed(&self, end_lsn: u64, commit_ts: i64) {
        lock(&self.unconfirmed).push_back((end_lsn, commit_ts));
        self.open_transaction.store(false, Relaxed);
    }

    /// `lsn` was confirmed to PostgreSQL: every transaction ending at or
    /// before it is durable. Progress.
    pub fn confirmed(&self, lsn: u64) {
        self.confirmed_lsn.fetch_max(lsn, Relaxed);
        let mut q = lock(&self.unconfirmed);
        while q.front().is_some_and(|(end, _)| *end <= lsn) {
            q.pop_front();
        }
        drop(q);
        self.progressed();
    }

    /// Commit time (µs since 2000-01-01) of the oldest transaction received
    /// and not yet confirmed.
    pub fn oldest_unconfirmed_commit_us(&self) -> Option<i64> {
        lock(&self.unconfirmed).front().map(|(_, ts)| *ts)
    }

    /// True while streaming with work pending: a transaction received and
    /// not confirmed, or an index seeding or rebuilding.
    pub fn has_pending_work(&self) -> bool {
        if !self.streaming.load(Relaxed) {
            return false;
        }
        self.open_transaction.load(Relaxed)
            || !lock(&self.unconfirmed).is_empty()
            || lock(&self.indexes).iter().any(|ix| ix.state().is_copying())
    }

    /// How long work has been pending without progress, as of `now`
    /// ([`mono_us`]); `None` when nothing is pending.
    pub fn stalled_for(&self, now: u64) -> Option<Duration> {
        if !self.has_pending_work() {
            return None;
        }
        let mut since = self
            .progress_at
            .load(Relaxed)
            .max(self.busy_since.load(Relaxed));
        // Later flushes landing are no progress past one that hangs.
        let oldest = self.oldest_flush_at.load(Relaxed);
        if oldest != 0 {
            since = since.min(oldest);
        }
        Some(Duration::from_micros(now.saturating_sub(since)))
    }

    /// The oldest bulk flush in flight was sent at `at` (monotonic µs,
    /// [`mono_us`]); `None` when none is in flight.
    pub fn set_oldest_flush(&self, at: Option<u64>) {
        self.oldest_flush_at.store(at.unwrap_or(0), Relaxed);
    }

    /// The search cluster answered a request (any HTTP status); `who` is
    /// the named sink that did. The global flag holds once every named
    /// sink answers.
    pub fn sink_answered(&self, who: Option<&SinkStats>) {
        let sinks = lock(&self.sinks);
        if let Some(w) = who {
            w.ok.store(true, Relaxed);
        }
        // Under the lock: a concurrent report of another sink cannot be
        // overwritten by a value computed before it.
        let all = who.is_none() || sinks.iter().all(|s| s.ok.load(Relaxed));
        self.sink_ok.store(all, Relaxed);
    }

    /// A request to the search cluster got no HTTP answer (refused,
    /// dropped, timed out); `who` is the named sink that did not answer.
    pub fn sink_unreachable(&self, who: Option<&SinkStats>) {
        let _sinks = lock(&self.sinks);
        if let Some(w) = who {
            w.ok.store(false, Relaxed);
        }
        self.sink_ok.store(false, Relaxed);
    }

    /// Counts one bulk request by the class of its answer.
    pub fn bulk_request(&self, class: BulkClass) {
        let i = match class {
            BulkClass::Success => 0,
            BulkClass::ClientError => 1,
            BulkClass::ServerError => 2,
        };
        self.bulk_requests[i].fetch_add(1, Relaxed);
    }

    /// A bulk attempt (of named sink `who`) failed transiently and will be
    /// sent again.
    pub fn bulk_retried(&self, who: Option<&SinkStats>) {
        self.retries.fetch_add(1, Relaxed);
        let now = mono_us();
        let _sinks = lock(&self.sinks);
        if let Some(w) = who {
            let _ = w.failing_since.compare_exchange(0, now, Relaxed, Relaxed);
        }
        let _ = self
            .sink_failing_since
            .compare_exchange(0, now, Relaxed, Relaxed);
    }

    /// A bulk attempt (of named sink `who`) completed (every item durable,
    /// superseded or refused for good); the global clock keeps running
    /// while another named sink still fails.
    pub fn bulk_completed(&self, who: Option<&SinkStats>) {
        let sinks = lock(&self.sinks);
        let since = match who {
            Some(w) => {
                w.failing_since.store(0, Relaxed);
                sinks
                    .iter()
                    .map(|s| s.failing_since.load(Relaxed))
                    .filter(|&t| t > 0)
                    .min()
                    .unwrap_or(0)
            }
            None => 0,
        };
        self.sink_failing_since.store(since, Relaxed);
    }

    /// How long bulk attempts have failed in a row, as of `now` ([`mono_us`]).
    pub fn flush_failing_for(&self, now: u64) -> Option<Duration> {
        match self.sink_failing_since.load(Relaxed) {
            0 => None,
            since => Some(Duration::from_micros(now.saturating_sub(since))),
        }
    }

    /// Installs (or removes) what reads the capture queue's depth.
    pub fn set_queue_probe(&self, probe: Option<QueueProbe>) {
        *lock(&self.queue) = probe;
    }

    /// Events waiting between capture and the worker, right now (0 when not streaming).
    pub fn queue_depth(&self) -> u64 {
        lock(&self.queue).as_ref().map_or(0, |p| p() as u64)
    }

    /// Names relation `oid` `name` (`schema.table`) for the per-table counters.
    pub fn register_table(&self, oid: u32, name: &str) {
        let mut t = self.tables.write().unwrap_or_else(|p| p.into_inner());
        if t.by_oid.get(&oid).is_some_and(|s| s.name == name) {
            return;
        }
        let stats = t
            .by_name
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(TableStats {
                    name: name.to_string(),
                    changes: Default::default(),
                })
            })
            .clone();
        t.by_oid.insert(oid, stats);
    }

    /// Counts one row change (`op`: 0 insert, 1 update, 2 delete) of relation `oid`.
    pub fn count_change(&self, oid: u32, op: usize) {
        if let Some(c) = self.changes.get(op) {
            c.fetch_add(1, Relaxed);
        }
        let t = self.tables.read().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = t.by_oid.get(&oid).and_then(|s| s.changes.get(op)) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// The per-table counters, by table name.
    pub fn tables(&self) -> Vec<Arc<TableStats>> {
        let t = self.tables.read().unwrap_or_else(|p| p.into_inner());
        t.by_name.values().cloned().collect()
    }
}

/// Adds one to the bucket of `value` (the first bound at or above it, else +Inf).
fn bump_bucket(buckets: &[AtomicU64], bounds: &[u64], value: u64) {
    let b = bounds
        .iter()
        .position(|le| value <= *le)
        .unwrap_or(bounds.len());
    if let Some(bucket) = buckets.get(b) {
        bucket.fetch_add(1, Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl IndexStats {
    /// Sets the state.
    pub fn set_state(&self, s: IndexState) {
        *lock(&self.state) = s;
    }

    /// Reads the state.
    pub fn state(&self) -> IndexState {
        *lock(&self.state)
    }

    /// Records an error message (never row values).
    pub fn set_error(&self, e: &str) {
        *lock(&self.last_error) = Some(e.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streaming() -> Stats {
        let s = Stats::default();
        s.register(&[("a".into(), None)])[0].set_state(IndexState::Streaming);
        s.set_streaming(true);
        s
    }

    #[test]
    fn idle_pipeline_is_never_stalled() {
        let s = streaming();
        assert_eq!(s.stalled_for(mono_us() + 3_600_000_000), None);
    }

    #[test]
    fn pending_work_without_progress_stalls_from_when_it_arrived() {
        let s = streaming();
        s.progress_at.store(1, Relaxed); // progress long ago
        s.transaction_began(100);
        let arrived = s.busy_since.load(Relaxed);
        assert!(s.has_pending_work());
        assert_eq!(
            s.stalled_for(arrived + 5_000_000),
            Some(Duration::from_secs(5))
        );
        s.transaction_committed(120, 7);
        assert_eq!(s.oldest_unconfirmed_commit_us(), Some(7));
        s.confirmed(120);
        assert!(!s.has_pending_work());
        assert_eq!(s.oldest_unconfirmed_commit_us(), None);
    }

    #[test]
    fn a_flush_in_flight_since_before_the_last_progress_stalls_from_when_it_was_sent() {
        let s = streaming();
        s.transaction_began(100);
        s.set_oldest_flush(Some(1_000_000));
        s.progress_at.store(50_000_000, Relaxed); // later flushes landed
        s.busy_since.store(0, Relaxed);
        assert_eq!(
            s.stalled_for(61_000_000),
            Some(Duration::from_secs(60)),
            "stalled since the hanging flush was sent"
        );
        s.set_oldest_flush(None);
        assert_eq!(s.stalled_for(61_000_000), Some(Duration::from_secs(11)));
    }

    #[test]
    fn a_paused_index_stays_paused_through_restarts_and_failures_until_ferry_stops() {
        let s = Stats::default();
        let ix = s.register(&[("a".into(), None), ("b".into(), None)]);
        ix[0].set_state(IndexState::Paused);
        ix[1].set_state(IndexState::Streaming);
        s.set_all_states(IndexState::Failed);
        assert_eq!(
            (ix[0].state(), ix[1].state()),
            (IndexState::Paused, IndexState::Failed)
        );
        s.set_all_states(IndexState::Starting);
        assert_eq!(ix[0].state(), IndexState::Paused);
        s.set_all_states(IndexState::Stopped);
        assert_eq!(ix[0].state(), IndexState::Stopped);
    }

    #[test]
    fn a_copying_index_is_pending_work_while_streaming() {
        let s = streaming();
        s.index(0).expect("index").set_state(IndexState::Seeding);
        assert!(s.has_pending_work());
        s.set_streaming(false);
        assert!(
            !s.has_pending_work(),
            "nothing is pending outside streaming"
        );
    }

    #[test]
    fn confirming_pops_only_the_transactions_it_covers() {
        let s = streaming();
        for (end, ts) in [(10, 1), (20, 2), (30, 3)] {
            s.transaction_began(end - 1);
            s.transaction_committed(end, ts);
        }
        s.confirmed(20);
        assert_eq!(s.oldest_unconfirmed_commit_us(), Some(3));
    }

    #[test]
    fn failing_bulks_are_timed_from_the_first_retry_until_one_completes() {
        let s = Stats::default();
        assert_eq!(s.flush_failing_for(mono_us()), None);
        s.bulk_retried(None);
        let first = s.sink_failing_since.load(Relaxed);
        s.bulk_retried(None);
        assert_eq!(s.sink_failing_since.load(Relaxed), first);
        assert_eq!(s.retries.load(Relaxed), 2);
        assert_eq!(
            s.flush_failing_for(first + 2_000_000),
            Some(Duration::from_secs(2))
        );
        s.bulk_completed(None);
        assert_eq!(s.flush_failing_for(mono_us()), None);
    }

    #[test]
    fn changes_are_counted_per_table_across_relation_oids() {
        let s = Stats::default();
        s.register_table(1, "public.items");
        s.count_change(1, 0);
        // A pipeline restart may see the same table under the same name again.
        s.register_table(2, "public.items");
        s.count_change(2, 1);
        s.count_change(3, 2); // unknown relation: only the total
        let t = s.tables();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].changes[0].load(Relaxed), 1);
        assert_eq!(t[0].changes[1].load(Relaxed), 1);
        assert_eq!(s.changes[2].load(Relaxed), 1);
    }

    #[test]
    fn batch_sizes_fall_in_their_buckets() {
        let s = Stats::default();
        s.record_flush(1, 0);
        s.record_flush(7, 0);
        s.record_flush(20_000, 0);
        assert_eq!(s.batch_buckets[0].load(Relaxed), 1);
        assert_eq!(s.batch_buckets[1].load(Relaxed), 1);
        assert_eq!(s.batch_buckets[BATCH_BUCKETS.len()].load(Relaxed), 1);
    }
}
