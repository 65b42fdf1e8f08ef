//! Backfill: copy a table's rows under the start-up snapshot into its index.
//!
//! Rows stream out of `COPY (SELECT …) TO STDOUT` (text format, the same
//! value rendering as the replication stream), become documents in a reused
//! buffer, and go to the sink in bulk batches. One batch is written while
//! the next is read, so PostgreSQL and OpenSearch work at the same time.

use std::time::{Duration, Instant};

use ferry_config::Config;
use ferry_core::schema::doc_id;
use ferry_core::{DocOp, DocWrite, Lsn};
use ferry_opensearch::Sink;
use ferry_postgres::SourceError;
use futures_util::{pin_mut, StreamExt};
use tokio::sync::mpsc;
use tokio_postgres::Client;

use crate::rows::{LineSplitter, RowBuf};
use crate::setup::IndexRuntime;
use crate::{EngineError, Shutdown};
use ferry_core::stats::IndexStats;

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
}

/// Copies every row of `ix`'s table into its concrete index, versioned `version`.
pub async fn run(
    client: &Client,
    sink: &Sink,
    ix: &IndexRuntime,
    names: &[String],
    version: Lsn,
    ctx: &Ctx<'_>,
) -> Result<u64, EngineError> {
    let started = Instant::now();
    let (shutdown, stats) = (ctx.shutdown, ctx.stats);
    let sql = ix.plan.build_sql(None);
    let key_pos: Vec<usize> = ix.plan.key_positions().collect();
    let estimate = estimate_rows(client, &ix.shape.qualified()).await;
    if let Some(st) = stats {
        st.backfill_total
            .store(estimate, std::sync::atomic::Ordering::Relaxed);
        st.backfill_rows
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }
    tracing::info!(index = %ix.alias, table = %ix.shape.qualified(), rows_estimate = estimate, "backfill started");

    // The writer task: at most one batch in flight plus one waiting.
    let (tx, mut rx) = mpsc::channel::<Vec<DocWrite>>(1);
    let sink2 = sink.clone();
    let names2 = names.to_vec();
    let cfg2 = ctx.cfg.clone();
    let stats2 = ctx.all_stats.clone();
    let policies: Vec<(String, ferry_config::PoisonPolicy)> = ctx
        .cfg
        .indexes
        .iter()
        .map(|c| (c.name.clone(), c.on_poison))
        .collect();
    let writer = tokio::spawn(async move {
        let mut written = 0u64;
        while let Some(batch) = rx.recv().await {
            let outcome = sink2.write(&batch, &names2).await?;
            written += batch.len() as u64 - outcome.rejected.len() as u64;
            if !outcome.rejected.is_empty() {
                // Backfill documents come from the current rows already.
                crate::poison::apply(&sink2, &cfg2, &stats2, &policies, outcome.rejected).await?;
            }
        }
        Ok::<u64, EngineError>(written)
    });

    let stream = client
        .copy_out(sql.as_str())
        .await
        .map_err(|e| SourceError::from_pg(&format!("reading {}", ix.shape.qualified()), e))?;
    pin_mut!(stream);
    let ncols = ix.shape.columns.len();
    let mut malformed = 0u64;
    let batch_rows = ctx.cfg.engine.backfill_batch_rows;
    let mut batch = Vec::with_capacity(batch_rows);
    let mut row = RowBuf::default();
    let mut lines = LineSplitter::default();
    let mut rows = 0u64;
    let mut last_log = Instant::now();
    let mut send_failed = false;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| SourceError::from_pg(&format!("reading {}", ix.shape.qualified()), e))?;
        let mut full_batches = Vec::new();
        lines.feed(&chunk, |line| {
            row.parse(line);
            let keys: Vec<&[u8]> = key_pos
                .iter()
                .map(|p| row.field(*p).unwrap_or(b""))
                .collect();
            let id = doc_id(&keys);
            let mut body = Vec::with_capacity(line.len() + ncols * 16);
            if !ix.plan.write_root(|i| row.field(i), &mut body) {
                malformed += 1;
                return;
            }
            batch.push(DocWrite {
                index: ix.pos,
                id,
                version,
                op: DocOp::Index(body),
            });
            rows += 1;
            if batch.len() >= batch_rows {
                full_batches.push(std::mem::replace(
                    &mut batch,
                    Vec::with_capacity(batch_rows),
                ));
            }
        });
        for full in full_batches {
            if tx.send(full).await.is_err() {
                send_failed = true;
                break;
            }
        }
        if let Some(st) = stats {
            st.backfill_rows
                .store(rows, std::sync::atomic::Ordering::Relaxed);
        }
        if send_failed || *shutdown.borrow() {
            break;
        }
        if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            let rate = rows as f64 / started.elapsed().as_secs_f64().max(0.001);
            tracing::info!(index = %ix.alias, rows, rows_estimate = estimate, rate = rate as u64, "backfill progress");
        }
    }
    if !batch.is_empty() && !send_failed {
        let _ = tx.send(batch).await;
    }
    drop(tx);
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

async fn estimate_rows(client: &Client, qualified: &str) -> i64 {
    let sql = format!(
        "SELECT greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = '{}'::regclass",
        qualified.replace('\'', "''")
    );
    match client.query_one(sql.as_str(), &[]).await {
        Ok(row) => row.get(0),
        Err(_) => -1,
    }
}
