//! What the worker does besides turning changes into documents: TRUNCATE,
//! retiring the index an alias left, publication coverage, partitions
//! attached or detached, heartbeats.

use std::time::Instant;

use ferry_core::Lsn;

use super::Worker;
use crate::index::IndexId;
use crate::EngineError;

impl Worker {
    /// TRUNCATE: a root table's index is emptied (its primary and the
    /// index its alias still serves); a related table's truncation rebuilds
    /// the indexes that read it beside the ones searches use
    /// ([`Worker::mark_for_rebuild`]): the pipeline starts again (so the
    /// other indexes stream on at once) and the replayed TRUNCATE finds the
    /// new copy already past it. A TRUNCATE never lands inside a copy of its
    /// table (it waits for the copy's lock; see ARCHITECTURE.md), so a
    /// root's copy needs no new copy.
    /// A log ([`ferry_opensearch::Sink::is_log`]) cannot remove documents in
    /// place, so there a root table's truncation rebuilds its index too, into
    /// a new generation its readers see by the new `_index`.
    pub(super) async fn on_truncate(&mut self, rels: Vec<u32>) -> Result<(), EngineError> {
        let mut t = self.core.router().truncation(&rels);
        let sinks = &self.core.sink;
        let (logs, clusters): (Vec<usize>, Vec<usize>) = std::mem::take(&mut t.empty)
            .into_iter()
            .partition(|&i| sinks.sink(IndexId(i)).is_log());
        t.empty = clusters;
        t.rebuild.extend(logs);
        if t.empty.is_empty() && t.rebuild.is_empty() {
            return Ok(());
        }
        // Everything before the truncate must land first.
        self.core.barrier().await?;
        let version = self.core.version();
        let mut rebuilding = Vec::new();
        for i in t.empty {
            let ix = &self.core.rows.indexes[i];
            // A copy from a snapshot after the truncate already lacks the
            // rows; emptying it would also delete rows inserted since (the
            // replayed inserts are older than the copy's tombstones).
            let copied_after = self.seeded_at[i].is_some_and(|at| at >= version);
            // A copy resumed across the truncate holds rows from before it
            // and rows from after it: it can be neither kept nor emptied,
            // only copied again.
            let resumed_across = !copied_after
                && self.seeded_at[i].is_some()
                && self.seeding_version.is_some_and(|at| at >= version);
            let mut targets: Vec<String> = ix.shadow.iter().cloned().collect();
            if !copied_after && !resumed_across {
                targets.push(self.core.sink.primary(IndexId(i)).to_string());
            }
            for concrete in &targets {
                self.core.sink.sink(IndexId(i)).delete_all(concrete).await?;
            }
            tracing::info!(index = %ix.alias, "root table truncated: removed every document");
            if resumed_across {
                let alias = ix.alias.clone();
                if self.mark_for_rebuild(i, Some(version)).await? {
                    rebuilding.push(alias);
                }
            }
        }
        for i in t.rebuild {
            if self.mark_for_rebuild(i, Some(version)).await? {
                rebuilding.push(self.core.rows.indexes[i].alias.clone());
            }
        }
        if !rebuilding.is_empty() {
            return Err(EngineError::Restart(format!(
                "a table was truncated: restarting the pipeline to rebuild {} beside the live index",
                rebuilding.join(", ")
            )));
        }
        Ok(())
    }

    /// Index `i` no longer equals its rows after a change no row change
    /// carries (a TRUNCATE at `at`, or a partition attached or detached,
    /// whose position is unknown: `None`); the caller restarts the pipeline
    /// when this returns true. A served, complete index is marked for a
    /// rebuild beside it (as `ferry reindex` does). A copy this pipeline
    /// makes from a snapshot taken after the change needs nothing (false).
    /// A copy from an older snapshot must never go live nor be resumed from
    /// its checkpoint: it is settled once the seeding stopped, by
    /// [`Worker::discard_stale_copies`].
    async fn mark_for_rebuild(&mut self, i: usize, at: Option<Lsn>) -> Result<bool, EngineError> {
        match self.seeded_at[i] {
            Some(copy) if at.is_some_and(|at| copy >= at) => Ok(false),
            Some(_) => {
                if !self.copy_again.contains(&i) {
                    self.copy_again.push(i);
                }
                Ok(true)
            }
            None => {
                let alias = &self.core.rows.indexes[i].alias;
                let serving = self
                    .core
                    .sink
                    .sink(IndexId(i))
                    .request_reindex(alias)
                    .await?;
                tracing::info!(index = %alias, serving = %serving, "rebuilding the index beside the one searches use");
                Ok(true)
            }
        }
    }

    /// Runs when the pipeline ended, after its seeding stopped: each index
    /// [`Worker::mark_for_rebuild`] found copied from a snapshot older than
    /// a change is copied again by the next start. An unfinished copy (or a
    /// finished one the alias did not move to yet) is deleted, so it is
    /// neither resumed nor moved to; on a first start the alias goes with
    /// it and the next start copies from scratch. The index the alias
    /// serves is marked for a rebuild, so the next start builds a new copy
    /// beside it even when nothing else would (a reseed after a lost slot,
    /// `ferry reindex`). A copy that finished and went live is just marked.
    pub(super) async fn discard_stale_copies(&self) {
        for &i in &self.copy_again {
            let ix = &self.core.rows.indexes[i];
            let sink = self.core.sink.sink(IndexId(i));
            let settled = async {
                let served = sink.alias_targets(&ix.alias).await?;
                let live = served.contains(&ix.concrete);
                if live && sink.seeded_lsn(&ix.concrete).await?.is_some() {
                    sink.request_reindex(&ix.alias).await?;
                    tracing::info!(index = %ix.alias, "the copy went live before the change: rebuilding it beside");
                    return Ok(());
                }
                sink.delete_index(&ix.concrete).await?;
                tracing::info!(index = %ix.concrete, "deleted the copy taken before the change; the next start copies the index again");
                if !live && !served.is_empty() {
                    sink.request_reindex(&ix.alias).await?;
                }
                Ok::<(), ferry_opensearch::SinkError>(())
            };
            if let Err(e) = settled.await {
                tracing::warn!(index = %ix.concrete, error = %e, "could not discard the copy taken before the change");
            }
        }
    }

    /// The alias of index `pos` moved off `old`: stop writing to it (after
    /// the write in flight lands) and delete it.
    pub(super) async fn retire_shadow(&mut self, pos: usize, old: &str) -> Result<(), EngineError> {
        self.core.settle().await?;
        if let Some(ix) = self.core.rows.indexes.get_mut(pos) {
            ix.shadow = None;
        }
        self.core.sink.retire_shadow(pos);
        self.core.sink.sink(IndexId(pos)).delete_index(old).await?;
        tracing::info!(index = %old, "deleted the index the alias left");
        Ok(())
    }

    /// Stops with the fix when the publication no longer covers a table an
    /// index reads: its changes are no longer streamed, so the index would
    /// silently drift.
    pub(super) async fn check_publication(&mut self) -> Result<(), EngineError> {
        let oids: Vec<u32> = self
            .core
            .rows
            .indexes
            .iter()
            .flat_map(|ix| ix.plan.usages().into_iter().map(|(oid, _)| oid))
            .collect();
        self.core
            .rows
            .client
            .check_coverage(&self.cfg.source.publication, &oids)
            .await?;
        Ok(())
    }

    /// Partitions attached to or detached from a partitioned table an index
    /// reads: ATTACH and DETACH write no row changes, so an attached
    /// partition's rows would never arrive and a detached one's would stay.
    /// A new leaf gets REPLICA IDENTITY FULL where old values are needed; a
    /// leaf that came or went with rows (or was dropped) marks every index
    /// reading that table for a rebuild ([`Worker::mark_for_rebuild`]: a copy
    /// still being made from an older snapshot is discarded) and restarts
    /// the pipeline, which rebuilds them beside the served index and moves
    /// the alias. Empty partitions (created ahead of time) change nothing.
    pub(super) async fn check_partitions(&mut self) -> Result<(), EngineError> {
        let client = &self.core.rows.client;
        let indexes = &self.core.rows.indexes;
        let oids: Vec<u32> = indexes
            .iter()
            .flat_map(|ix| ix.plan.usages().into_iter().map(|(oid, _)| oid))
            .collect();
        let now = client.partition_leaves(&oids).await?;
        if now == self.partitions {
            return Ok(());
        }
        let needs: Vec<(u32, String)> = indexes
            .iter()
            .flat_map(|ix| ix.plan.needs_full_identity())
            .collect();
        client
            .ensure_full_identities(&needs, self.cfg.source.manage_replica_identity)
            .await?;
        let mut moved_rows: Vec<u32> = Vec::new();
        let came = now.iter().filter(|p| !self.partitions.contains(p));
        let went = self.partitions.iter().filter(|p| !now.contains(p));
        for &(table, leaf) in came.chain(went) {
            if client.has_rows(leaf).await? != Some(false) {
                moved_rows.push(table);
            }
        }
        self.partitions = now;
        if moved_rows.is_empty() {
            tracing::info!("partitions changed without rows: nothing to rebuild");
            return Ok(());
        }
        let affected: Vec<usize> = indexes
            .iter()
            .enumerate()
            // A paused index is not written: its rebuild on resume reads the partitions anew.
            .filter(|(_, ix)| {
                !ix.paused
                    && ix
                        .plan
                        .usages()
                        .iter()
                        .any(|(oid, _)| moved_rows.contains(oid))
            })
            .map(|(i, _)| i)
            .collect();
        // No write of this pipeline may land after a copy is discarded.
        self.core.settle().await?;
        let mut rebuild = Vec::new();
        for i in affected {
            // When the partition changed is unknown: any copy of this
            // pipeline may predate it.
            self.mark_for_rebuild(i, None).await?;
            rebuild.push(self.core.rows.indexes[i].alias.clone());
        }
        Err(EngineError::Restart(format!(
            "a partition with rows was attached or detached: rebuilding {} in the background",
            rebuild.join(", ")
        )))
    }

    /// Writes a transactional logical message so an idle slot still advances
    /// (its Begin/Commit arrive and are confirmed like any transaction).
    pub(super) async fn heartbeat(&mut self) {
        self.last_event = Instant::now();
        if let Err(e) = self.core.rows.client.emit_heartbeat().await {
            tracing::warn!(error = %e, "heartbeat failed (needs EXECUTE on pg_logical_emit_message); set source.heartbeat_secs = 0 to turn it off");
        }
    }
}
