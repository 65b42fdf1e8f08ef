//! Backfill: copy a table's rows under a snapshot into its index.
//!
//! Rows are read in primary-key order, in chunks
//! (`COPY (SELECT … WHERE key > last ORDER BY key LIMIT n) TO STDOUT`, text
//! format: the same value rendering as the replication stream), become
//! documents, and go to the
//! sink in bulk batches. A writer task sends one batch while the next is
//! read, so PostgreSQL and OpenSearch work at the same time.
//!
//! After each chunk's documents are durable, the last key is recorded in the
//! index's `_meta` (a checkpoint): an interrupted backfill resumes after it
//! instead of starting over. Rows before the checkpoint stay correct because
//! the stream has been applying their changes all along.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use ferry_config::Config;
use ferry_core::stats::IndexStats;
use ferry_core::{DocWrite, Lsn};
use ferry_opensearch::{IndexPlan, Sink};
use ferry_postgres::Session;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use tokio::sync::mpsc;

use crate::index::IndexRuntime;
use crate::{EngineError, Shutdown};

/// What a backfill needs besides the table and the sink.
pub struct Ctx<'a> {
    /// The configuration (batch sizes).
    pub cfg: &'a Config,
    /// Stop early when this turns true.
    pub shutdown: &'a Shutdown,
    /// Progress figures to update.
    pub stats: Option<&'a IndexStats>,
    /// All figures (rejections are counted per index).
    pub all_stats: std::sync::Arc<ferry_core::stats::Stats>,
    /// Record checkpoints for this index plan (`None`: no checkpoints).
    pub checkpoint: Option<&'a IndexPlan>,
    /// Resume after this primary key.
    pub resume_after: Option<Vec<String>>,
}

enum Msg {
    Batch(Vec<DocWrite>),
    Checkpoint(Vec<String>),
}

/// Copies every row of `ix`'s table into its concrete index, versioned
/// `version`; returns the documents written.
pub async fn run(
    client: &Session,
    sink: &Sink,
    ix: &IndexRuntime,
    names: &[String],
    version: Lsn,
    ctx: &Ctx<'_>,
) -> Result<u64, EngineError> {
    let started = Instant::now();
    let (shutdown, stats) = (ctx.shutdown, ctx.stats);
    let estimate = client.estimate_rows(&ix.shape).await;
    if let Some(st) = stats {
        st.backfill_total.store(estimate, Relaxed);
        st.backfill_rows.store(0, Relaxed);
    }
    match &ctx.resume_after {
        Some(after) => {
            tracing::info!(index = %ix.alias, table = %ix.shape.qualified(), rows_estimate = estimate,
            after = ?after, "backfill resumed after its last checkpoint (rows up to that key are not copied again)")
        }
        None => {
            tracing::info!(index = %ix.alias, table = %ix.shape.qualified(), rows_estimate = estimate, "backfill started")
        }
    }

    // The writer task: at most one batch in flight plus one waiting.
    let (tx, mut rx) = mpsc::channel::<Msg>(1);
    let sink2 = sink.clone();
    let names2 = names.to_vec();
    let cfg2 = ctx.cfg.clone();
    let stats2 = ctx.all_stats.clone();
    let plan2 = ctx.checkpoint.cloned();
    let concrete = ix.concrete.clone();
    let policies: Vec<(String, ferry_config::PoisonPolicy)> = ctx
        .cfg
        .indexes
        .iter()
        .map(|c| (c.name.clone(), c.on_poison))
        .collect();
    let writer = tokio::spawn(async move {
        let mut written = 0u64;
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Batch(batch) => {
                    let outcome = sink2.write(&batch, &names2).await?;
                    stats2.progressed();
                    written += batch.len() as u64 - outcome.rejected.len() as u64;
                    if !outcome.rejected.is_empty() {
                        // Backfill documents come from the current rows already.
                        crate::poison::apply(&sink2, &cfg2, &stats2, &policies, outcome.rejected)
                            .await?;
                    }
                }
                // Every batch before it is durable: record the position.
                Msg::Checkpoint(after) => {
                    if let Some(plan) = &plan2 {
                        sink2.set_checkpoint(plan, &concrete, &after).await?;
                    }
                }
            }
        }
        Ok::<u64, EngineError>(written)
    });
    // A seeding stopped from outside (its copy may be discarded) takes its
    // writer with it: no batch or checkpoint of that copy lands later.
    let _writer_stops_with_us = AbortOnDrop(writer.abort_handle());

    let batch_rows = ctx.cfg.engine.backfill_batch_rows;
    let chunk_rows = ctx.cfg.engine.backfill_chunk_rows;
    let mut batch = Vec::with_capacity(batch_rows);
    let mut rows = 0u64;
    let mut malformed = 0u64;
    let mut last_log = Instant::now();
    let mut send_failed = false;
    let mut after = ctx.resume_after.clone();
    let progress = Progress::new(&ix.alias, estimate);
    'chunks: loop {
        let mut rows_in = client
            .copy_chunk(&ix.plan, after.as_deref(), chunk_rows)
            .await?;
        let mut in_chunk = 0usize;
        // The key of the chunk's last row, once the chunk is full.
        let mut last_key: Option<Vec<String>> = None;
        loop {
            let mut full_batches = Vec::new();
            let more = rows_in
                .read(|row| {
                    in_chunk += 1;
                    if in_chunk == chunk_rows {
                        last_key = Some(ix.plan.row_key(|i| row.field(i)));
                    }
                    match ix.plan.document(|i| row.field(i), ix.pos, version) {
                        Some(w) => batch.push(w),
                        None => {
                            malformed += 1;
                            return;
                        }
                    }
                    rows += 1;
                    if batch.len() >= batch_rows {
                        full_batches.push(std::mem::replace(
                            &mut batch,
                            Vec::with_capacity(batch_rows),
                        ));
                    }
                })
                .await?;
            if !more {
                break;
            }
            for full in full_batches {
                if tx.send(Msg::Batch(full)).await.is_err() {
                    send_failed = true;
                    break 'chunks;
                }
            }
            if let Some(st) = stats {
                st.backfill_rows.store(rows, Relaxed);
            }
            if *shutdown.borrow() {
                break 'chunks;
            }
            if last_log.elapsed() >= Duration::from_secs(5) {
                last_log = Instant::now();
                let rate = rows as f64 / started.elapsed().as_secs_f64().max(0.001);
                tracing::info!(index = %ix.alias, rows, rows_estimate = estimate, rate = rate as u64, "backfill progress");
            }
            progress.show(rows);
        }
        // A short chunk is the last one.
        let Some(key) = last_key else {
            break;
        };
        // The chunk is complete: its last key is the next chunk's start.
        if !batch.is_empty() {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(batch_rows));
            if tx.send(Msg::Batch(full)).await.is_err() {
                send_failed = true;
                break;
            }
        }
        if ctx.checkpoint.is_some() && tx.send(Msg::Checkpoint(key.clone())).await.is_err() {
            send_failed = true;
            break;
        }
        after = Some(key);
    }
    if !batch.is_empty() && !send_failed && !*shutdown.borrow() {
        let _ = tx.send(Msg::Batch(batch)).await;
    }
    drop(tx);
    progress.finish();
    let written = match writer.await {
        Ok(r) => r?,
        Err(e) => {
            return Err(EngineError::Stream(format!(
                "backfill writer task failed: {e}"
            )))
        }
    };
    if malformed > 0 {
        return Err(EngineError::Stream(format!(
            "backfill of {}: {malformed} rows came back in an unexpected shape from the document query",
            ix.alias
        )));
    }
    let secs = started.elapsed().as_secs_f64().max(0.001);
    tracing::info!(index = %ix.alias, rows = written, seconds = secs, rate = (written as f64 / secs) as u64, "backfill finished");
    Ok(written)
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
/// gets the periodic `backfill progress` lines instead).
struct Progress(ProgressBar);

impl Progress {
    fn new(name: &str, total: i64) -> Progress {
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

    fn show(&self, rows: u64) {
        // Drawn at most 20 times a second by indicatif.
        self.0.set_position(rows);
    }

    fn finish(&self) {
        self.0.finish();
    }
}

fn mean_rate(s: &ProgressState) -> f64 {
    s.pos() as f64 / s.elapsed().as_secs_f64().max(0.001)
}
