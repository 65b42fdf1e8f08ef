//! What the worker does besides turning changes into documents: TRUNCATE,
//! retiring the index an alias left, publication coverage, heartbeats.

use std::time::Instant;

use ferry_postgres::SourceError;

use super::Worker;
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
        let names = self.core.sink.concrete().to_vec();
        for i in t.empty {
            self.core.sink.sink.delete_all(&names[i]).await?;
            tracing::info!(index = %self.core.rows.indexes[i].alias, "root table truncated: removed every document");
        }
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
        let mut oids: Vec<i64> = self
            .core
            .rows
            .indexes
            .iter()
            .flat_map(|ix| ix.plan.usages().into_iter().map(|(oid, _)| i64::from(oid)))
            .collect();
        oids.sort_unstable();
        oids.dedup();
        let rows = self
            .core
            .rows
            .client
            .query(
                "SELECT n.nspname::text || '.' || c.relname::text FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.oid::int8 = ANY($1) AND NOT EXISTS ( \
                   SELECT 1 FROM pg_publication p WHERE p.pubname = $2 AND (p.puballtables OR EXISTS ( \
                     SELECT 1 FROM pg_publication_tables t WHERE t.pubname = p.pubname \
                       AND t.schemaname = n.nspname AND t.tablename = c.relname)))",
                &[&oids, &self.cfg.source.publication],
            )
            .await
            .map_err(|e| SourceError::from_pg("checking publication coverage", e))?;
        if let Some(row) = rows.first() {
            let table: String = row.get(0);
            return Err(SourceError::Operator(format!(
                "publication {:?} no longer covers table {table}, so its changes are not streamed: \
                 add it back (ALTER PUBLICATION … ADD TABLE {table}, or restart ferry, which extends the publication) \
                 and run `ferry reindex` for the indexes that read it, since changes made meanwhile were missed",
                self.cfg.source.publication
            ))
            .into());
        }
        Ok(())
    }

    /// Writes a transactional logical message so an idle slot still advances
    /// (its Begin/Commit arrive and are confirmed like any transaction).
    pub(super) async fn heartbeat(&mut self) {
        self.last_event = Instant::now();
        if let Err(e) = self
            .core
            .rows
            .client
            .execute(
                "SELECT pg_logical_emit_message(true, 'ferry_heartbeat', '')",
                &[],
            )
            .await
        {
            tracing::warn!(error = %e, "heartbeat failed (needs EXECUTE on pg_logical_emit_message); set source.heartbeat_secs = 0 to turn it off");
        }
    }
}
