//! What the worker does besides turning changes into documents: TRUNCATE,
//! retiring the index an alias left, publication coverage, heartbeats.

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

    /// Writes a transactional logical message so an idle slot still advances
    /// (its Begin/Commit arrive and are confirmed like any transaction).
    pub(super) async fn heartbeat(&mut self) {
        self.last_event = Instant::now();
        if let Err(e) = self.core.rows.client.emit_heartbeat().await {
            tracing::warn!(error = %e, "heartbeat failed (needs EXECUTE on pg_logical_emit_message); set source.heartbeat_secs = 0 to turn it off");
        }
    }
}
