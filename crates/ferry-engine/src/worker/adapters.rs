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
use crate::index::{IndexId, IndexRuntime, Target};
use crate::EngineError;

/// The OpenSearch sink, writing each index's documents to its concrete
/// index and, while a rebuild seeds, to the index the alias still serves.
#[derive(Clone)]
pub struct OpenSearchSink {
    /// The cluster connection.
    pub sink: Sink,
    /// `Sink::write` addresses concrete indexes by slot in this list, laid
    /// out by [`Target::names`]: each index's primary, then each index's
    /// shadow, the one its alias still serves during a rebuild ("" when
    /// none). [`Target::slot`] and [`Target::of`] map to and from slots.
    names: Vec<String>,
    /// Per index position: whether writes are copied to its shadow.
    shadowed: Vec<bool>,
    dead_letter_index: String,
}

impl OpenSearchSink {
    /// Writes to the indexes as prepared at start-up.
    pub fn new(sink: Sink, indexes: &[IndexRuntime], dead_letter_index: &str) -> OpenSearchSink {
        OpenSearchSink {
            sink,
            names: Target::names(indexes),
            shadowed: indexes.iter().map(|i| i.shadow.is_some()).collect(),
            dead_letter_index: dead_letter_index.to_string(),
        }
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
}

impl DocSink for OpenSearchSink {
    async fn write(&self, writes: &[DocWrite]) -> Result<BulkOutcome, SinkError> {
        let n = self.shadowed.len();
        if !writes
            .iter()
            .any(|w| self.shadowed.get(w.index) == Some(&true))
        {
            return self.sink.write(writes, &self.names).await;
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
        let mut outcome = self.sink.write(&all, &self.names).await?;
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

    async fn store_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), SinkError> {
        self.sink
            .store_dead_letters(&self.dead_letter_index, letters)
            .await
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
