//! What the worker does besides turning changes into documents: TRUNCATE,
//! retiring the index an alias left, publication coverage, partitions
//! attached or detached, heartbeats.

use std::time::Instant;

use super::Worker;
use crate::index::IndexId;
use crate::EngineError;

impl Worker {
    /// TRUNCATE: a root table's index is emptied (its primary and the
    /// index its alias still serves); a related table's truncation rebuilds
    /// the indexes that read it beside the ones searches use: the pipeline
    /// starts again (so the other indexes stream on at once) and seeds a new
    /// copy from a snapshot taken after the truncate, which the replayed
    /// TRUNCATE then finds already applied.
    pub(super) async fn on_truncate(&mut self, rels: Vec<u32>) -> Result<(), EngineError> {
        let t = self.core.router().truncation(&rels);
        if t.empty.is_empty() && t.rebuild.is_empty() {
            return Ok(());
        }
        // Everything before the truncate must land first.
        self.core.barrier().await?;
        for i in t.empty {
            let mut targets = vec![self.core.sink.primary(IndexId(i)).to_string()];
            targets.extend(self.core.rows.indexes[i].shadow.clone());
            for concrete in &targets {
                self.core.sink.sink.delete_all(concrete).await?;
            }
            tracing::info!(index = %self.core.rows.indexes[i].alias, "root table truncated: removed every document");
        }
        let version = self.core.version();
        let mut rebuilding = Vec::new();
        for i in t.rebuild {
            let ix = &self.core.rows.indexes[i];
            if self.seeded_at[i].is_some_and(|at| at >= version) {
                // This pipeline copies it from a snapshot taken after the truncate.
                continue;
            }
            if ix.shadow.is_some() {
                // Its primary is still being copied and is not served: copy it again.
                self.discard_on_exit.push(ix.concrete.clone());
            } else {
                let serving = self.core.sink.sink.request_reindex(&ix.alias).await?;
                tracing::info!(index = %ix.alias, serving = %serving, "a related table was truncated: rebuilding the index beside the one searches use");
            }
            rebuilding.push(ix.alias.clone());
        }
        if !rebuilding.is_empty() {
            return Err(EngineError::Restart(format!(
                "a related table was truncated: restarting the pipeline to rebuild {} beside the live index",
                rebuilding.join(", ")
            )));
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
