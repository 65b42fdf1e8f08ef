//! What the worker does besides turning changes into documents: TRUNCATE,
//! retiring the index an alias left, publication coverage, partitions
//! attached or detached, heartbeats.

use std::time::Instant;

use super::Worker;
use crate::index::IndexId;
use crate::EngineError;

impl Worker {
    /// TRUNCATE: a root table's index is emptied; a related table's
    /// truncation rebuilds every document of the indexes that read it.
    pub(super) async fn on_truncate(&mut self, rels: Vec<u32>) -> Result<(), EngineError> {
        let t = self.core.router().truncation(&rels);
        if t.empty.is_empty() && t.rebuild.is_empty() {
            return Ok(());
        }
        // Everything before the truncate must land first.
        self.core.barrier().await?;
        for i in t.empty {
            let concrete = self.core.sink.primary(IndexId(i));
            self.core.sink.sink.delete_all(concrete).await?;
            tracing::info!(index = %self.core.rows.indexes[i].alias, "root table truncated: removed every document");
        }
        let names = self.core.sink.names().to_vec();
        for i in t.rebuild {
            tracing::info!(index = %self.core.rows.indexes[i].alias, "a related table was truncated: rebuilding every document");
            let ctx = crate::backfill::Ctx {
                cfg: &self.cfg,
                shutdown: &self.shutdown,
                stats: None,
                all_stats: self.stats.clone(),
                checkpoint: None,
                resume_after: None,
            };
            crate::backfill::run(
                &self.core.rows.client,
                &self.core.sink.sink,
                &self.core.rows.indexes[i],
                &names,
                self.core.version(),
                &ctx,
            )
            .await?;
        }
        Ok(())
    }

    /// The alias of index `pos` moved off `old`: stop writing to it (after
    /// the write in flight lands) and delete it.
    pub(super) async fn retire_shadow(&mut self, pos: usize, old: &str) -> Result<(), EngineError> {
        self.core.settle().await?;
        if let Some(ix) = self.core.rows.indexes.get_mut(pos) {
            ix.shadow = None;
        }
        self.core.sink.retire_shadow(pos);
        self.core.sink.sink.delete_index(old).await?;
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
    /// reading that table for a rebuild and restarts the pipeline, which
    /// rebuilds them beside the served index and moves the alias. Empty
    /// partitions (created ahead of time) change nothing.
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
        let mut rebuild = Vec::new();
        for ix in indexes {
            if ix
                .plan
                .usages()
                .iter()
                .any(|(oid, _)| moved_rows.contains(oid))
            {
                self.core.sink.sink.request_reindex(&ix.alias).await?;
                rebuild.push(ix.alias.clone());
            }
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
