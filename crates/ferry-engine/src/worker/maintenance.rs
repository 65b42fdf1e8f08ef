//! What the worker does besides turning changes into documents: TRUNCATE,
//! retiring the index an alias left, publication coverage, heartbeats.

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

    /// Writes a transactional logical message so an idle slot still advances
    /// (its Begin/Commit arrive and are confirmed like any transaction).
    pub(super) async fn heartbeat(&mut self) {
        self.last_event = Instant::now();
        if let Err(e) = self.core.rows.client.emit_heartbeat().await {
            tracing::warn!(error = %e, "heartbeat failed (needs EXECUTE on pg_logical_emit_message); set source.heartbeat_secs = 0 to turn it off");
        }
    }
}
