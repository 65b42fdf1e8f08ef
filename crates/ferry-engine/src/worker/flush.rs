//! Flushing: the bulk write in flight, its bookkeeping, and the poison path
//! for documents the cluster refuses for good. Retries of transient
//! failures happen inside the sink; an `Err` here means nothing is durable.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use ferry_config::{Config, PoisonPolicy};
use ferry_core::schema::split_doc_id;
use ferry_core::stats::Stats;
use ferry_core::{DocOp, DocWrite, Lsn};
use ferry_opensearch::{BulkOutcome, Rejected, SinkError};
use tokio::task::JoinSet;

use super::batch::FlushTicket;
use super::seams::{DocSink, RowSource};
use crate::index::IndexRuntime;
use crate::EngineError;

/// The bulk writes in flight (at most `engine.max_in_flight_bulks`).
pub type Inflight = JoinSet<Result<Flushed, SinkError>>;

/// A flush that succeeded: the tickets to redeem and the writes refused for good.
pub struct Flushed {
    /// Redeemed once the rejected writes followed their policy: the batch's
    /// own, and those of held-back deletes that rode along.
    pub tickets: Vec<FlushTicket>,
    /// Writes the cluster refused for good; every other write is durable.
    pub rejected: Vec<Rejected>,
}

/// Sends `writes` in the background, into `inflight`. `commit_ts` is the
/// commit time of the newest transaction in the batch, recorded as durable
/// if the batch completes a commit.
pub fn spawn<S: DocSink>(
    inflight: &mut Inflight,
    sink: S,
    writes: Vec<DocWrite>,
    tickets: Vec<FlushTicket>,
    stats: Arc<Stats>,
    commit_ts: i64,
    batch: tracing::Span,
) {
    let span = tracing::info_span!(
        target: ferry_core::PIPELINE_TARGET,
        parent: &batch,
        "flush",
        documents = writes.len() as i64,
        superseded = tracing::field::Empty,
        rejected = tracing::field::Empty,
    );
    let fut = async move {
        let started = Instant::now();
        let outcome = sink.write(&writes).await?;
        record(&stats, &writes, &outcome, started);
        let current = tracing::Span::current();
        current.record("superseded", outcome.superseded_writes.len() as i64);
        current.record("rejected", outcome.rejected.len() as i64);
        if tickets.iter().any(FlushTicket::completes_commit) {
            stats.last_durable_commit_us.fetch_max(commit_ts, Relaxed);
        }
        Ok(Flushed {
            tickets,
            rejected: outcome.rejected,
        })
    };
    inflight.spawn(tracing::Instrument::instrument(fut, span));
}

/// Counts a finished flush in `stats`: its latency, and per index the
/// documents written, deleted and superseded.
pub fn record(stats: &Stats, writes: &[DocWrite], outcome: &BulkOutcome, started: Instant) {
    stats.record_flush(writes.len() as u64, started.elapsed().as_micros() as u64);
    // Per index: (written, deleted, superseded), one stats look-up per index.
    // Superseded and refused writes are not counted as written or deleted.
    let mut counts: HashMap<usize, [i64; 3]> = HashMap::new();
    for w in writes {
        let c = counts.entry(w.index).or_default();
        match w.op {
            DocOp::Index(_) => c[0] += 1,
            DocOp::Delete => c[1] += 1,
        }
    }
    for s in &outcome.superseded_writes {
        let c = counts.entry(s.index).or_default();
        c[usize::from(s.delete)] -= 1;
        c[2] += 1;
    }
    for r in &outcome.rejected {
        let c = counts.entry(r.write.index).or_default();
        c[usize::from(matches!(r.write.op, DocOp::Delete))] -= 1;
    }
    for (index, [written, deleted, superseded]) in counts {
        if let Some(st) = stats.index(index) {
            let n = |v: i64| u64::try_from(v).unwrap_or(0);
            st.docs_written.fetch_add(n(written), Relaxed);
            st.docs_deleted.fetch_add(n(deleted), Relaxed);
            st.docs_superseded.fetch_add(n(superseded), Relaxed);
        }
    }
    tracing::debug!(
        writes = writes.len(),
        requests = outcome.requests,
        superseded = outcome.superseded,
        ms = started.elapsed().as_millis() as u64,
        "batch flushed"
    );
}

/// What the poison path needs to know of each index, by position.
pub struct PoisonRules {
    /// (alias, policy) per index.
    policies: Vec<(String, PoisonPolicy)>,
    /// Primary-key column count per index (to split document ids).
    key_lens: Vec<usize>,
}

impl PoisonRules {
    /// Each index's `on_poison` policy from the config.
    pub fn new(indexes: &[IndexRuntime], cfg: &Config) -> PoisonRules {
        PoisonRules {
            policies: indexes
                .iter()
                .map(|ix| {
                    let policy = cfg
                        .indexes
                        .get(ix.pos)
                        .map(|c| c.on_poison)
                        .unwrap_or_default();
                    (ix.alias.clone(), policy)
                })
                .collect(),
            key_lens: indexes.iter().map(|ix| ix.plan.table.key.len()).collect(),
        }
    }
}

/// Documents the cluster refused for good. Each is first rebuilt from its
/// current row (the row may have been fixed since the change that failed)
/// and written again; what is still refused follows the index's poison
/// policy. Must finish before the batch's ticket is redeemed.
pub async fn handle_rejected<S: DocSink, R: RowSource>(
    sink: &S,
    rows: &mut R,
    rules: &PoisonRules,
    stats: &Stats,
    rejected: Vec<Rejected>,
    fallback_version: Lsn,
) -> Result<(), EngineError> {
    let mut by_index: HashMap<usize, Vec<Rejected>> = HashMap::new();
    for r in rejected {
        by_index.entry(r.write.index).or_default().push(r);
    }
    let mut still = Vec::new();
    for (index, list) in by_index {
        let Some(&key_len) = rules.key_lens.get(index) else {
            // Confirming past it would lose the write silently.
            return Err(EngineError::Stream(format!(
                "the cluster rejected {} write(s) addressed to unknown index position {index}",
                list.len()
            )));
        };
        let keys: Vec<Vec<String>> = list
            .iter()
            .map(|r| split_doc_id(&r.write.id, key_len))
            .collect();
        let version = list
            .iter()
            .map(|r| r.write.version)
            .max()
            .unwrap_or(fallback_version);
        let mut writes = Vec::new();
        rows.build(index, &keys, version, &mut writes).await?;
        let first: HashMap<&str, &Rejected> =
            list.iter().map(|r| (r.write.id.as_str(), r)).collect();
        // A root found gone is deleted where the refused write went (the
        // build does not know a routing for it).
        for w in &mut writes {
            if w.op == DocOp::Delete && w.routing.is_none() {
                w.routing = first
                    .get(w.id.as_str())
                    .and_then(|r| r.write.routing.clone());
            }
        }
        let outcome = sink.write(&writes).await?;
        // Report a document still refused with the reason it was first refused for.
        for r in outcome.rejected {
            still.push(match first.get(r.write.id.as_str()) {
                Some(f) => Rejected {
                    write: r.write,
                    status: f.status,
                    reason: f.reason.clone(),
                },
                None => r,
            });
        }
    }
    let letters = crate::poison::triage(stats, &rules.policies, still)?;
    if !letters.is_empty() {
        sink.store_dead_letters(&letters).await?;
    }
    Ok(())
}
