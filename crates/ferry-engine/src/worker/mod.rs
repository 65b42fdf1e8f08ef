//! The streaming worker: takes events off the capture queue, turns row
//! changes into document writes, flushes them in one bulk request per
//! batch, and only then confirms the LSN of the last transaction the batch
//! completed.
//!
//! Invariants:
//! * an LSN is confirmed only after every write of every transaction up to
//!   it is durable in the sink (a transaction split across batches is
//!   confirmed by the batch holding its `Commit`); see `batch.rs`;
//! * writes carry their transaction's commit LSN as external version, so
//!   replays after a crash are harmless and never overwrite newer documents;
//! * within a batch only the last write per document is sent.
//!
//! Files: `route.rs` (which documents a change touches), `flat.rs` (WAL
//! tuple → document), `batch.rs` (batching and acknowledgements),
//! `flush.rs` (bulk write, poison path), `pipeline.rs` (the rules, over the
//! seams of `seams.rs`), `adapters.rs` (the real sink and source),
//! `shape.rs` and `maintenance.rs` (Relation messages, TRUNCATE, shadow
//! indexes, publication coverage, heartbeats). This file wires them.

mod adapters;
mod batch;
mod flat;
mod flush;
mod maintenance;
mod pipeline;
mod route;
mod seams;
mod shape;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_config::Config;
use ferry_core::change::Event;
use ferry_core::stats::Stats;
use ferry_postgres::capture;
use ferry_postgres::catalog::TypeResolver;
use ferry_postgres::SourceError;

use crate::setup::Prepared;
use crate::{EngineError, Shutdown};
use adapters::{OpenSearchSink, PgRows};
use pipeline::Pipeline;

/// The pipeline over the real sink and source, plus what only they can do.
struct Worker {
    core: Pipeline<OpenSearchSink, PgRows>,
    types: TypeResolver,
    cfg: Config,
    /// Per index position: the config lists no columns, so documents
    /// follow the table's shape.
    follow_shape: Vec<bool>,
    last_event: Instant,
    /// Leaf partitions of the partitioned tables read, as last seen.
    partitions: Vec<(u32, u32)>,
    /// Per index position: the oldest snapshot position whose rows its
    /// copy holds — this pipeline's snapshot, or an earlier run's for a copy
    /// resumed from its checkpoint (a TRUNCATE older than that is already
    /// in the copy).
    seeded_at: Vec<Option<ferry_core::Lsn>>,
    /// The snapshot position this pipeline's seeding copies from, if it
    /// seeds anything.
    seeding_version: Option<ferry_core::Lsn>,
    /// Index positions whose copy in this pipeline predates a change (see
    /// `maintenance.rs`): settled once seeding stopped, so the next start
    /// copies them again.
    copy_again: Vec<usize>,
}

/// Streams changes until shutdown or a failure.
pub async fn stream(
    cfg: &Config,
    prepared: Prepared,
    shutdown: &mut Shutdown,
    stats: &Arc<Stats>,
) -> Result<(), EngineError> {
    let Prepared {
        params,
        client,
        types,
        sinks,
        indexes,
        seeding,
        partitions,
    } = prepared;
    let mut capture = capture::start(
        &params,
        &cfg.source.slot,
        &cfg.source.publication,
        cfg.engine.queue_capacity,
    )
    .await?;
    let ack = capture.ack.clone();
    let doc_sink = OpenSearchSink::new(sinks.clone(), &indexes);
    let follow_shape = cfg
        .indexes
        .iter()
        .zip(&indexes)
        .map(|(c, ix)| c.columns.is_none() && ix.fast)
        .collect();
    let mut seeded_at = vec![None; indexes.len()];
    let seeding_version = seeding.as_ref().map(|s| s.version);
    if let Some(s) = &seeding {
        for job in &s.jobs {
            // A resumed copy also holds rows of an earlier run's snapshot.
            seeded_at[job.index.0] = Some(job.copied_since(s.version));
        }
    }
    // Seeding runs beside streaming; it reports each alias it moves.
    let (swapped_tx, mut swapped_rx) = tokio::sync::mpsc::channel::<(usize, String)>(16);
    let (alive, mut seeding_gone) = crate::seed::alive();
    let mut seeding_task = seeding.map(|s| {
        tokio::spawn(crate::seed::run(
            s,
            sinks,
            indexes.clone(),
            cfg.clone(),
            shutdown.clone(),
            stats.clone(),
            crate::seed::ToWorker {
                swapped: swapped_tx,
                alive,
            },
        ))
    });
    let core = Pipeline::new(
        doc_sink,
        PgRows::new(client, indexes.clone(), stats.clone()),
        &indexes,
        cfg,
        stats.clone(),
        Box::new(move |lsn| ack.confirm(lsn)),
    );
    let mut w = Worker {
        core,
        types,
        cfg: cfg.clone(),
        follow_shape,
        last_event: Instant::now(),
        partitions,
        seeded_at,
        seeding_version,
        copy_again: Vec::new(),
    };
    tracing::info!("streaming changes");
    // Each index keeps the state set up for it (seeding, rebuilding or streaming).
    stats.set_queue_probe(Some(Box::new(capture.depth_probe())));
    stats.set_streaming(true);
    let heartbeat = cfg.source.heartbeat();
    let mut joined = false;
    let mut coverage = tokio::time::interval(Duration::from_secs(30));
    coverage.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result: Result<(), EngineError> = loop {
        let deadline = w.core.deadline();
        let beat_at = heartbeat.map(|h| w.last_event + h);
        let idle = w.core.is_idle();
        let ev = tokio::select! {
            biased;
            _ = shutdown.changed() => {
                tracing::info!("stopping: flushing the in-flight batch");
                break w.core.finish(cfg.engine.shutdown_timeout()).await;
            }
            r = wait_seeding(&mut seeding_task) => {
                seeding_task = None;
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(e),
                    Err(e) => break Err(EngineError::Stream(format!("seeding task failed: {e}"))),
                }
                continue;
            }
            Some((pos, old)) = swapped_rx.recv() => {
                if let Err(e) = w.retire_shadow(pos, &old).await { break Err(e); }
                continue;
            }
            r = w.core.flush_done() => {
                if let Err(e) = w.core.flush_finished(r).await { break Err(e); }
                continue;
            }
            _ = sleep_until(deadline), if deadline.is_some() => {
                if let Err(e) = w.core.dispatch().await { break Err(e); }
                continue;
            }
            _ = coverage.tick() => {
                if let Err(e) = w.check_publication().await { break Err(e); }
                if let Err(e) = w.check_partitions().await { break Err(e); }
                continue;
            }
            _ = sleep_until(beat_at), if beat_at.is_some() && idle => {
                w.heartbeat().await;
                continue;
            }
            ev = capture.events.recv() => ev,
        };
        let Some(ev) = ev else {
            // Capture ended: make what arrived durable, then report why.
            if let Err(e) = w.core.finish(cfg.engine.shutdown_timeout()).await {
                break Err(e);
            }
            joined = true;
            break match (&mut capture.task).await {
                Ok(Ok(())) => Err(EngineError::Source(SourceError::Unavailable {
                    what: "streaming changes".into(),
                    reason: "the replication stream ended".into(),
                })),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(EngineError::Stream(format!("capture task failed: {e}"))),
            };
        };
        if let Err(e) = w.handle(ev).await {
            break Err(e);
        }
    };
    // A seeding still running belongs to this pipeline: stop it (it resumes
    // from its checkpoint next time).
    if let Some(t) = seeding_task.take() {
        t.abort();
        let _ = t.await;
    }
    // Its index and chunk tasks too (also those of a seeding that ended in
    // an error): nothing of it may land after this.
    crate::seed::stopped(&mut seeding_gone).await;
    w.discard_stale_copies().await;
    // Capture reports the last confirmed position to the server, then closes the stream.
    capture.stop();
    if !joined {
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut capture.task).await;
    }
    tracing::info!(confirmed = %capture.ack.confirmed(), "stream closed");
    result
}

impl Worker {
    /// Hands one event to the part that owns it, then lets the pipeline
    /// flush a full batch and confirm what it may.
    async fn handle(&mut self, ev: Event) -> Result<(), EngineError> {
        if !matches!(ev, Event::Keepalive { .. }) {
            self.last_event = Instant::now();
        }
        match ev {
            Event::Begin { final_lsn, .. } => self.core.begin(final_lsn),
            Event::Commit {
                end_lsn, commit_ts, ..
            } => self.core.commit(end_lsn, commit_ts),
            Event::Relation(rel) => self.on_relation(rel).await?,
            Event::Change(change) => self.core.change(change)?,
            Event::Truncate { rels } => self.on_truncate(rels).await?,
            Event::Keepalive { wal_end } => self.core.keepalive(wal_end),
        }
        self.core.step().await
    }
}

async fn wait_seeding(
    task: &mut Option<tokio::task::JoinHandle<Result<(), EngineError>>>,
) -> Result<Result<(), EngineError>, tokio::task::JoinError> {
    match task {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
