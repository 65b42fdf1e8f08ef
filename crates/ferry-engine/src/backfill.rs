//! Backfill: copy one key range of a table (a *chunk*) into its index.
//!
//! A chunk is read in its own short `REPEATABLE READ` transaction
//! (`COPY (SELECT … WHERE key > after AND key <= upto ORDER BY key) TO
//! STDOUT`, text format: the same value rendering as the replication
//! stream); its rows become documents and go to the sink in bulk batches. A
//! writer runs beside the reader, so PostgreSQL and OpenSearch work at the
//! same time. No snapshot outlives its chunk, so vacuum is never held back
//! for a whole backfill.
//!
//! Every chunk's snapshot must contain the *floor*, the snapshot exported at
//! the seeding's consistent point C ([`ferry_postgres::Session::begin_chunk`]
//! checks it), and its documents carry C as their version: see
//! ARCHITECTURE.md, "Parallel seeding", for why that is exact.
//! `seed.rs` chooses the chunks, runs `engine.backfill_parallelism` of them
//! at once over a [`Pool`] of connections, and records checkpoints.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_config::{Config, PoisonPolicy};
use ferry_core::stats::{IndexStats, Stats};
use ferry_core::{DocWrite, Lsn};

use ferry_postgres::Session;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::index::{IndexRuntime, RunSink};
use crate::{EngineError, Shutdown};

/// What every chunk copy of one seeding shares.
pub struct Copier {
    /// The run's sinks; an index's documents go to its own.
    pub sinks: Vec<RunSink>,
    /// The configuration (batch sizes, poison policies).
    pub cfg: Config,
    /// All figures (rejections are counted per index).
    pub stats: Arc<Stats>,
    /// Every index's concrete name, by position (the sink's write targets).
    pub names: Vec<String>,
    /// (alias, poison policy) per index position.
    pub policies: Vec<(String, PoisonPolicy)>,
    /// The snapshot every chunk snapshot must contain (`pg_snapshot` text).
    pub floor: String,
    /// The floor's consistent point: every copied document's version.
    pub version: Lsn,
    /// Stop early when this turns true.
    pub shutdown: Shutdown,
}

/// One key range of an index's root table: keys after `after` up to `upto`
/// (`None`: unbounded on that side).
#[derive(Debug, Clone)]
pub struct Chunk {
    /// Exclusive lower bound.
    pub after: Option<Vec<String>>,
    /// Inclusive upper bound.
    pub upto: Option<Vec<String>>,
}

/// The connections chunks are copied on: one per concurrent chunk.
pub struct Pool {
    free: Mutex<Vec<Session>>,
    permits: Arc<Semaphore>,
}

/// A connection taken from the [`Pool`]; [`Lease::give_back`] returns it.
/// Dropped without that (a failed or interrupted chunk, possibly in the
/// middle of a transaction), the connection is closed and the pool shrinks.
pub struct Lease {
    session: Option<Session>,
    pool: Arc<Pool>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Pool {
    /// A pool over these connections.
    pub fn new(sessions: Vec<Session>) -> Arc<Pool> {
        Arc::new(Pool {
            permits: Arc::new(Semaphore::new(sessions.len())),
            free: Mutex::new(sessions),
        })
    }

    /// Waits for a free connection (cancel-safe).
    pub async fn take(self: &Arc<Self>) -> Result<Lease, EngineError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| EngineError::Stream("the backfill connection pool closed".into()))?;
        let session = self
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .ok_or_else(|| EngineError::Stream("the backfill connection pool is empty".into()))?;
        Ok(Lease {
            session: Some(session),
            pool: self.clone(),
            permit: Some(permit),
        })
    }
}

impl Lease {
    /// The connection.
    pub fn session(&self) -> &Session {
        self.session
            .as_ref()
            .expect("a lease holds its session until given back")
    }

    /// Returns the connection (idle, outside any transaction) to the pool.
    pub fn give_back(mut self) {
        if let Some(s) = self.session.take() {
            self.pool
                .free
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(s);
        }
        self.permit.take();
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.session.is_some() {
            // The connection goes with the lease: so does its permit.
            if let Some(p) = self.permit.take() {
                p.forget();
            }
        }
    }
}

/// Copies `chunk` of `ix`'s table into its concrete index (and the index
/// its alias still serves, through `names`) on `lease`'s connection;
/// returns the documents written, or `None` when a shutdown interrupted it
/// (nothing about the chunk may then be assumed).
pub async fn copy_chunk(
    lease: Lease,
    shared: Arc<Copier>,
    ix: IndexRuntime,
    chunk: Chunk,
    progress: Arc<Progress>,
    index_stats: Option<Arc<IndexStats>>,
) -> Result<Option<u64>, EngineError> {
    let (copier, ix, chunk, progress) = (&*shared, &ix, &chunk, &*progress);
    let index_stats = index_stats.as_deref();
    let db = lease.session();
    let mut tries = 0u32;
    while !db.begin_chunk(&copier.floor).await? {
        tries += 1;
        if tries.is_multiple_of(250) {
            tracing::warn!(index = %ix.alias, tries, "a backfill chunk is still waiting for transactions the seeding snapshot saw committed to leave the in-progress list (a synchronous standby not answering?)");
        }
        if *copier.shutdown.borrow() {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let batch_rows = copier.cfg.engine.backfill_batch_rows;
    let sink = &copier.sinks[ix.sink];
    let (tx, mut rx) = mpsc::channel::<Vec<DocWrite>>(1);
    let writer = async {
        let mut written = 0u64;
        while let Some(batch) = rx.recv().await {
            let outcome = sink.sink.write(&batch, &copier.names).await?;
            copier.stats.progressed();
            written += batch.len() as u64 - outcome.rejected.len() as u64;
            if !outcome.rejected.is_empty() {
                // Backfill documents come from the current rows already.
                crate::poison::apply(
                    &sink.sink,
                    &sink.dead_letter_index,
                    &copier.stats,
                    &copier.policies,
                    outcome.rejected,
                )
                .await?;
            }
            if let Some(st) = index_stats {
                st.backfill_rows.fetch_add(batch.len() as u64, Relaxed);
            }
            progress.add(batch.len() as u64);
        }
        Ok::<u64, EngineError>(written)
    };
    let reader = async move {
        let mut rows = db
            .copy_range(&ix.plan, chunk.after.as_deref(), chunk.upto.as_deref())
            .await?;
        let mut batch = Vec::with_capacity(batch_rows);
        let mut malformed = 0u64;
        loop {
            let mut full_batches = Vec::new();
            let more = rows
                .read(|row| {
                    match ix.plan.document(|i| row.field(i), ix.pos, copier.version) {
                        Some(w) => batch.push(w),
                        None => {
                            malformed += 1;
                            return;
                        }
                    }
                    if batch.len() >= batch_rows {
                        full_batches.push(std::mem::replace(
                            &mut batch,
                            Vec::with_capacity(batch_rows),
                        ));
                    }
                })
                .await?;
            for full in full_batches {
                if tx.send(full).await.is_err() {
                    // The writer failed: its error is the one reported.
                    return Ok(Some(malformed));
                }
            }
            if !more {
                break;
            }
            if *copier.shutdown.borrow() {
                return Ok(None);
            }
        }
        if !batch.is_empty() {
            let _ = tx.send(batch).await;
        }
        if malformed > 0 {
            return Err(EngineError::Stream(format!(
                "backfill of {}: {malformed} rows came back in an unexpected shape from the document query",
                ix.alias
            )));
        }
        Ok::<Option<u64>, EngineError>(Some(malformed))
    };
    let (read, written) = tokio::try_join!(reader, writer)?;
    if read.is_none() || *copier.shutdown.borrow() {
        return Ok(None);
    }
    // The snapshot transaction ends only once every batch of the chunk is
    // durable: until then it holds its table's ACCESS SHARE lock, so a
    // TRUNCATE or DETACH cannot commit between the read and the last write
    // (the worker's reaction to it then finds every write of the chunk).
    db.end_chunk().await?;
    lease.give_back();
    Ok(Some(written))
}

/// Whether backfills may draw a progress bar on a terminal stderr. The
/// binary turns it off when its logs are JSON, so machine-read output never
/// holds a bar.
static PROGRESS_BAR: AtomicBool = AtomicBool::new(true);

/// Allow or forbid the backfill progress bar (it is only ever drawn when
/// stderr is a terminal).
pub fn set_progress_bar(on: bool) {
    PROGRESS_BAR.store(on, Relaxed);
}

/// A one-line progress bar on stderr when it is a terminal (a service's log
/// gets the periodic `backfill progress` lines instead), shared by the
/// chunks of one index.
pub struct Progress(ProgressBar);

impl Progress {
    /// A bar for index `name` of about `total` rows (-1: unknown).
    pub fn new(name: &str, total: i64) -> Progress {
        let target = if PROGRESS_BAR.load(Relaxed) {
            // Hidden by indicatif itself when stderr is not a terminal.
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let template = if total > 0 {
            "{msg} [{bar:30}] {percent:>3}% {pos}/{len} rows {rate} ETA {eta}"
        } else {
            "{msg} {pos}/? rows {rate}"
        };
        let style = ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            // The mean rate since the start, as the `backfill progress` log.
            .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0} rows/s", mean_rate(s));
            })
            .with_key("eta", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let left = s.len().unwrap_or(0).saturating_sub(s.pos());
                let _ = write!(w, "{:.0}s", left as f64 / mean_rate(s).max(1.0));
            })
            .progress_chars("#>.");
        let bar = ProgressBar::with_draw_target(Some(total.max(0) as u64), target)
            .with_style(style)
            .with_message(name.to_string());
        Progress(bar)
    }

    /// `rows` more rows are durable; returns the rows so far.
    pub fn add(&self, rows: u64) -> u64 {
        // Drawn at most 20 times a second by indicatif.
        self.0.inc(rows);
        self.0.position()
    }

    /// Rows durable so far.
    pub fn rows(&self) -> u64 {
        self.0.position()
    }

    /// Stops drawing.
    pub fn finish(&self) {
        self.0.finish();
    }
}

fn mean_rate(s: &ProgressState) -> f64 {
    s.pos() as f64 / s.elapsed().as_secs_f64().max(0.001)
}
