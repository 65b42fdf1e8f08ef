//! Seeding indexes while the stream runs.
//!
//! Streaming starts at once for every index; an index that is new, was
//! interrupted, or gets a new mapping is copied in the background. The copy
//! is cut into key-range chunks (`engine.backfill_chunk_rows` keys each),
//! `engine.backfill_parallelism` of them copied at once — within a table and
//! across tables and indexes — each in its own short snapshot transaction
//! (see `backfill.rs`) and versioned with the seeding's consistent point. While
//! an index seeds:
//!
//! * the stream writes its changes to the new index too, with higher
//!   versions than the copy, so a late copy never overwrites a live change;
//! * `index.gc_deletes` is raised, so a row deleted by the stream is not
//!   resurrected by a copy that reaches it more than a minute later (the
//!   default tombstone lifetime is 60 s), and refreshes are paused;
//! * an older index the alias still serves keeps receiving every write, so
//!   searches stay current until the alias moves atomically to the new one.
//!
//! Chunks finish in any order; the checkpoint recorded in the index is the
//! upper key of the contiguous prefix of finished chunks
//! (`ferry_core::ack::InOrder`), so a resumed seeding copies again at most
//! the chunks that were in flight.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_config::Config;
use ferry_core::ack::InOrder;
use ferry_core::stats::{IndexState, Stats};
use ferry_core::Lsn;
use ferry_opensearch::IndexPlan;
use ferry_postgres::PgParams;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::backfill::{self, Chunk, Copier, Pool, Progress};
use crate::index::{IndexId, IndexRuntime, RunSink};
use crate::{EngineError, Shutdown};

/// Held by every task of a seeding (its indexes and chunks run as tasks of
/// their own, so a chunk's writes go on while another waits on a lock):
/// once the seeding is stopped, [`stopped`] returns when the last of them
/// is gone, so nothing of it — a write, a checkpoint, an alias move —
/// lands afterwards.
pub type Alive = mpsc::Sender<()>;

/// A token for a seeding's tasks and the wait for all of them to end.
pub fn alive() -> (Alive, mpsc::Receiver<()>) {
    mpsc::channel(1)
}

/// Returns once every task holding a token of `gone` ended (aborted tasks
/// drop theirs when their cancellation completes).
pub async fn stopped(gone: &mut mpsc::Receiver<()>) {
    while gone.recv().await.is_some() {}
}

/// What a seeding hands back to the worker while it runs.
pub struct ToWorker {
    /// Each alias moved, as (index position, the concrete index it left).
    pub swapped: mpsc::Sender<(usize, String)>,
    /// The token every task of the seeding holds.
    pub alive: Alive,
}

/// One index to seed.
#[derive(Debug, Clone)]
pub struct Job {
    /// The index.
    pub index: IndexId,
    /// Its mapping and settings.
    pub plan: IndexPlan,
    /// The concrete index the alias serves now, replaced when seeding ends.
    pub previous: Option<String>,
    /// Resume after this key (an interrupted backfill's checkpoint).
    pub resume_after: Option<Vec<String>>,
    /// With `resume_after`: the oldest snapshot position whose rows the
    /// copy already holds (the earlier runs' versions).
    pub holds_since: Option<Lsn>,
}

impl Job {
    /// The oldest snapshot position whose rows the copy holds once this
    /// seeding, versioned `version`, has written to it: a change after it
    /// may be missing from the copy.
    pub fn copied_since(&self, version: Lsn) -> Lsn {
        self.holds_since.map_or(version, |held| held.min(version))
    }
}

/// The indexes to seed and the snapshot the copy starts from.
pub struct Seeding {
    /// Where the chunk connections go.
    pub params: PgParams,
    /// The snapshot exported at the consistent point (`pg_snapshot` text):
    /// every chunk's snapshot must contain it.
    pub floor: String,
    /// The snapshot's consistent point: the copy's version.
    pub version: Lsn,
    /// What to seed.
    pub jobs: Vec<Job>,
}

/// Seeds every job, `engine.backfill_parallelism` chunks at a time; after
/// each index, tells the worker (through `swapped`) that its alias moved so
/// it stops writing to the old index.
pub async fn run(
    seeding: Seeding,
    sinks: Vec<RunSink>,
    indexes: Vec<IndexRuntime>,
    cfg: Config,
    shutdown: Shutdown,
    stats: Arc<Stats>,
    to_worker: ToWorker,
) -> Result<(), EngineError> {
    let ToWorker { swapped, alive } = to_worker;
    let parallelism = cfg.engine.backfill_parallelism.max(1);
    let mut sessions = Vec::with_capacity(parallelism);
    for _ in 0..parallelism {
        sessions.push(seeding.params.session().await?);
    }
    let pool = Pool::new(sessions);
    let copier = Arc::new(Copier {
        sinks,
        names: indexes.iter().map(|i| i.concrete.clone()).collect(),
        policies: cfg
            .indexes
            .iter()
            .map(|c| (c.name.clone(), c.on_poison))
            .collect(),
        cfg,
        stats,
        floor: seeding.floor,
        version: seeding.version,
        shutdown,
    });
    let mut jobs = JoinSet::new();
    for job in seeding.jobs {
        let ix = indexes[job.index.0].clone();
        let task = seed_index(
            copier.clone(),
            pool.clone(),
            ix,
            job,
            swapped.clone(),
            alive.clone(),
        );
        let alive = alive.clone();
        jobs.spawn(async move {
            let _alive = alive;
            task.await
        });
    }
    while let Some(r) = jobs.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(EngineError::Stream(format!("seeding task failed: {e}"))),
        }
    }
    Ok(())
}

/// Seeds one index: plans its chunks in key order, copies them on the
/// pool's connections, checkpoints the finished prefix, then marks the
/// index seeded and moves its alias.
async fn seed_index(
    copier: Arc<Copier>,
    pool: Arc<Pool>,
    ix: IndexRuntime,
    job: Job,
    swapped: mpsc::Sender<(usize, String)>,
    alive: Alive,
) -> Result<(), EngineError> {
    let sink = &copier.sinks[ix.sink].sink;
    sink.update_settings(
        &ix.concrete,
        json!({"gc_deletes": "12h", "refresh_interval": "-1"}),
    )
    .await?;
    let index_stats = copier.stats.index(job.index.0);
    let estimate = {
        let lease = pool.take().await?;
        let estimate = lease.session().estimate_rows(&ix.shape).await;
        lease.give_back();
        estimate
    };
    if let Some(st) = &index_stats {
        st.backfill_total.store(estimate, Relaxed);
        st.backfill_rows.store(0, Relaxed);
    }
    match &job.resume_after {
        Some(after) => {
            tracing::info!(index = %ix.alias, table = %ix.shape.qualified(), rows_estimate = estimate,
            after = ?after, "backfill resumed after its last checkpoint (rows up to that key are not copied again)")
        }
        None => {
            tracing::info!(index = %ix.alias, table = %ix.shape.qualified(), rows_estimate = estimate, "backfill started")
        }
    }
    let started = Instant::now();
    let progress = Arc::new(Progress::new(&ix.alias, estimate));
    let chunk_rows = copier.cfg.engine.backfill_chunk_rows;
    // Value per chunk: its upper key (`None`: the last chunk).
    let mut order: InOrder<Option<Vec<String>>> = InOrder::default();
    let mut chunks = JoinSet::new();
    let mut after = job.resume_after.clone();
    let mut planning = true;
    let mut complete = false;
    let mut written = 0u64;
    let mut last_log = Instant::now();
    while planning || !chunks.is_empty() {
        tokio::select! {
            lease = pool.take(), if planning => {
                let lease = lease?;
                if *copier.shutdown.borrow() {
                    lease.give_back();
                    planning = false;
                    continue;
                }
                let upto = lease
                    .session()
                    .chunk_end(&ix.plan, after.as_deref(), chunk_rows)
                    .await?;
                let seq = order.issue();
                let chunk = Chunk { after: after.clone(), upto: upto.clone() };
                let task = backfill::copy_chunk(
                    lease,
                    copier.clone(),
                    ix.clone(),
                    chunk,
                    progress.clone(),
                    index_stats.clone(),
                );
                let end = upto.clone();
                let alive = alive.clone();
                chunks.spawn(async move {
                    let _alive = alive;
                    (seq, end, task.await)
                });
                match upto {
                    Some(key) => after = Some(key),
                    None => planning = false,
                }
            }
            Some(r) = chunks.join_next() => {
                let (seq, upto, copied) = r.map_err(|e| {
                    EngineError::Stream(format!("backfill chunk task failed: {e}"))
                })?;
                let Some(n) = copied? else {
                    // Interrupted by a shutdown: nothing more is recorded.
                    planning = false;
                    continue;
                };
                written += n;
                if let Some(reached) = order.complete(seq, upto).pop() {
                    match reached {
                        Some(key) => {
                            let since = job.copied_since(copier.version);
                            sink.set_checkpoint(&job.plan, &ix.concrete, &key, since)
                                .await?
                        }
                        None => complete = true,
                    }
                }
                if last_log.elapsed() >= Duration::from_secs(5) {
                    last_log = Instant::now();
                    let rows = progress.rows();
                    let rate = rows as f64 / started.elapsed().as_secs_f64().max(0.001);
                    tracing::info!(index = %ix.alias, rows, rows_estimate = estimate, rate = rate as u64, "backfill progress");
                }
            }
            else => break,
        }
    }
    progress.finish();
    if !complete || *copier.shutdown.borrow() {
        return Ok(());
    }
    let secs = started.elapsed().as_secs_f64().max(0.001);
    tracing::info!(index = %ix.alias, rows = written, seconds = secs, rate = (written as f64 / secs) as u64, "backfill finished");
    sink.mark_seeded(&job.plan, &ix.concrete, copier.version)
        .await?;
    sink.update_settings(
        &ix.concrete,
        json!({"gc_deletes": null, "refresh_interval": null}),
    )
    .await?;
    let _ = sink.refresh(&ix.concrete).await;
    if let Some(prev) = &job.previous {
        sink.swap_alias(&ix.alias, &ix.concrete, Some(prev)).await?;
        tracing::info!(alias = %ix.alias, from = %prev, to = %ix.concrete, "moved the alias to the rebuilt index");
        let _ = swapped.send((job.index.0, prev.clone())).await;
    }
    if let Some(st) = &index_stats {
        st.set_state(IndexState::Streaming);
    }
    Ok(())
}
