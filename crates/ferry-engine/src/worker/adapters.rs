//! The real implementations of the worker's seams: the OpenSearch sink and
//! the PostgreSQL row source.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use ferry_core::plan::Probe;
use ferry_core::stats::Stats;
use ferry_core::{DocWrite, Lsn};
use ferry_opensearch::{BulkOutcome, DeadLetter, Sink, SinkError};
use ferry_postgres::Session;

use super::seams::{DocSink, RowSource};
use crate::index::{IndexId, IndexRuntime, RunSink, Target};
use crate::EngineError;

/// The sinks, writing each index's documents to its concrete index on its
/// sink and, while a rebuild seeds, to the index the alias still serves.
/// With several sinks a batch's writes go to each at once, and the batch
/// is durable only when every sink made its part durable.
#[derive(Clone)]
pub struct OpenSearchSink {
    /// The run's sinks, by position.
    sinks: Vec<RunSink>,
    /// Per index position: the position of its sink.
    sink_of: Vec<usize>,
    /// `Sink::write` addresses concrete indexes by slot in this list, laid
    /// out by [`Target::names`]: each index's primary, then each index's
    /// shadow, the one its alias still serves during a rebuild ("" when
    /// none). [`Target::slot`] and [`Target::of`] map to and from slots.
    names: Vec<String>,
    /// Per index position: whether writes are copied to its shadow.
    shadowed: Vec<bool>,
}

impl OpenSearchSink {
    /// Writes to the indexes as prepared at start-up.
    pub fn new(sinks: Vec<RunSink>, indexes: &[IndexRuntime]) -> OpenSearchSink {
        OpenSearchSink {
            sinks,
            sink_of: indexes.iter().map(|i| i.sink).collect(),
            names: Target::names(indexes),
            shadowed: indexes.iter().map(|i| i.shadow.is_some()).collect(),
        }
    }

    /// The sink index `id` goes to.
    pub fn sink(&self, id: IndexId) -> &Sink {
        &self.sinks[self.sink_of[id.0]].sink
    }

    /// The concrete index that index `id` writes to (its primary target).
    pub fn primary(&self, id: IndexId) -> &str {
        &self.names[Target::Primary.slot(id, self.shadowed.len())]
    }

    /// Stops copying the writes of index `pos` to the index its alias left.
    pub fn retire_shadow(&mut self, pos: usize) {
        let n = self.shadowed.len();
        if let Some(s) = self.shadowed.get_mut(pos) {
            *s = false;
        }
        if let Some(name) = self.names.get_mut(Target::Shadow.slot(IndexId(pos), n)) {
            name.clear();
        }
    }

    /// Sends `writes` (addressed by slot) to their sinks, each sink's share
    /// at once, and merges the answers; any sink's failure fails the whole.
    async fn send(&self, writes: &[DocWrite]) -> Result<BulkOutcome, SinkError> {
        if self.sinks.len() == 1 {
            return self.sinks[0].sink.write(writes, &self.names).await;
        }
        let n = self.shadowed.len();
        let mut shares = vec![Vec::new(); self.sinks.len()];
        for w in writes {
            let (id, _) = Target::of(w.index, n);
            shares[self.sink_of[id.0]].push(w.clone());
        }
        let sends = shares
            .iter()
            .zip(&self.sinks)
            .filter(|(share, _)| !share.is_empty())
            .map(|(share, s)| s.sink.write(share, &self.names));
        let mut merged = BulkOutcome::default();
        for outcome in futures_util::future::try_join_all(sends).await? {
            merged.requests += outcome.requests;
            merged.written += outcome.written;
            merged.superseded += outcome.superseded;
            merged.superseded_writes.extend(outcome.superseded_writes);
            merged.retried += outcome.retried;
            merged.rejected.extend(outcome.rejected);
        }
        Ok(merged)
    }
}

impl DocSink for OpenSearchSink {
    async fn write(&self, writes: &[DocWrite]) -> Result<BulkOutcome, SinkError> {
        let n = self.shadowed.len();
        if !writes
            .iter()
            .any(|w| self.shadowed.get(w.index) == Some(&true))
        {
            return self.send(writes).await;
        }
        // Keep the index the alias still serves current during a rebuild.
        let mut all = writes.to_vec();
        all.extend(
            writes
                .iter()
                .filter(|w| self.shadowed.get(w.index) == Some(&true))
                .map(|w| DocWrite {
                    index: Target::Shadow.slot(IndexId(w.index), n),
                    ..w.clone()
                }),
        );
        let mut outcome = self.send(&all).await?;
        // A document the served index refused is missing from searches
        // until the alias moves: report it under its index like any other
        // rejection (once, even when both targets refused it), so the
        // poison policy rebuilds, dead-letters or stops on it.
        let mut seen = std::collections::HashSet::new();
        outcome.rejected.retain_mut(|r| {
            let (id, target) = Target::of(r.write.index, n);
            if target == Target::Shadow {
                tracing::warn!(index = %self.names.get(r.write.index).map(String::as_str).unwrap_or(""),
                    id = %r.write.id, status = r.status, "the index the alias still serves refused a document");
                r.write.index = id.0;
            }
            seen.insert((r.write.index, r.write.id.clone()))
        });
        // Count a superseded write once, under its index: the copy to the
        // served index is the same write.
        outcome
            .superseded_writes
            .retain(|w| Target::of(w.index, n).1 == Target::Primary);
        Ok(outcome)
    }

    async fn store_dead_letters(&self, letters: &[(usize, DeadLetter)]) -> Result<(), SinkError> {
        for (pos, s) in self.sinks.iter().enumerate() {
            let mine: Vec<DeadLetter> = letters
                .iter()
                .filter(|(ix, _)| self.sink_of.get(*ix) == Some(&pos))
                .map(|(_, l)| l.clone())
                .collect();
            if !mine.is_empty() {
                s.sink
                    .store_dead_letters(&s.dead_letter_index, &mine)
                    .await?;
            }
        }
        Ok(())
    }
}

/// PostgreSQL: resolves and builds documents with one statement per batch
/// and index (see `build.rs`).
pub struct PgRows {
    /// The query session (also used for catalog look-ups).
    pub client: Session,
    /// The indexes, by position.
    pub indexes: Vec<IndexRuntime>,
    stats: Arc<Stats>,
}

impl PgRows {
    /// Reads through `client`.
    pub fn new(client: Session, indexes: Vec<IndexRuntime>, stats: Arc<Stats>) -> PgRows {
        PgRows {
            client,
            indexes,
            stats,
        }
    }
}

impl RowSource for PgRows {
    async fn resolve(
        &mut self,
        index: usize,
        probe: &Probe,
        values: HashSet<String>,
    ) -> Result<Vec<Vec<String>>, EngineError> {
        let ix = &self.indexes[index];
        let before = values.len();
        let keys = crate::build::resolve(&self.client, ix, probe, values).await?;
        if !(probe.parent.is_empty()
            && probe.via_join.is_none()
            && ix.plan.table.key == [probe.column.clone()])
        {
            // One statement per 1,000 values (see build::resolve).
            self.stats
                .sql_statements
                .fetch_add(before.div_ceil(1000) as u64, Relaxed);
        }
        Ok(keys)
    }

    async fn build(
        &mut self,
        index: usize,
        keys: &[Vec<String>],
        version: Lsn,
        out: &mut Vec<DocWrite>,
    ) -> Result<(), EngineError> {
        self.stats.sql_statements.fetch_add(1, Relaxed);
        crate::build::build_docs(&self.client, &self.indexes[index], keys, version, out).await
    }
}
