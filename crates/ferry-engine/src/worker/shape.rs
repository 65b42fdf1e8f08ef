//! Relation messages: how flat indexes read a table's tuples, and indexes
//! that carry every column following the table's shape.

use std::sync::Arc;

use ferry_core::change::Relation;
use ferry_postgres::catalog;

use super::flat::Projection;
use super::Worker;
use crate::index::IndexId;
use crate::EngineError;

impl Worker {
    /// A Relation message: refreshes the flat indexes rooted at `rel`.
    pub(super) async fn on_relation(&mut self, rel: Arc<Relation>) -> Result<(), EngineError> {
        let positions = self.core.router().flat_indexes(rel.oid).to_vec();
        for &pos in &positions {
            if self.follow_shape.get(pos).copied().unwrap_or(false) {
                self.follow_table_shape(pos, &rel).await?;
            }
        }
        let mut projections = Vec::with_capacity(positions.len());
        for pos in positions {
            let ix = &self.core.rows.indexes[pos];
            let (shape, routing) = (&ix.shape, ix.plan.routing.as_deref());
            // Learn the kinds of retyped columns first; the projection reads them.
            for c in &shape.columns {
                if let Some(rc) = rel.columns.iter().find(|rc| rc.name == c.name) {
                    if rc.type_oid != c.type_oid {
                        self.types
                            .resolve(&self.core.rows.client, rc.type_oid)
                            .await?;
                    }
                }
            }
            let types = &self.types;
            projections.push(Projection::new(pos, shape, routing, &rel, |oid| {
                types.get(oid)
            })?);
        }
        self.core.set_relation(rel, projections);
        Ok(())
    }

    /// Brings an index whose documents carry every column in line with a
    /// new Relation message: added columns join the documents (and the
    /// mapping is extended), dropped or retyped ones rebuild the index.
    async fn follow_table_shape(&mut self, pos: usize, rel: &Relation) -> Result<(), EngineError> {
        // The catalog says what the table is now; the Relation message may
        // describe older rows being replayed (columns since dropped).
        let table = self.core.rows.indexes[pos].plan.table.qualified_plain();
        let current = catalog::read_table(
            &self.core.rows.client,
            &mut self.types,
            &format!("index {:?}", self.core.rows.indexes[pos].alias),
            &table,
            None,
            true,
        )
        .await?;
        let plan_cols = self.core.rows.indexes[pos].plan.table.columns.clone();
        let dropped: Vec<&str> = plan_cols
            .iter()
            .filter(|c| current.column(&c.name).is_none())
            .map(|c| c.name.as_str())
            .collect();
        let retyped: Vec<&str> = plan_cols
            .iter()
            .filter(|c| {
                current
                    .column(&c.name)
                    .is_some_and(|now| now.type_oid != c.type_oid)
            })
            .map(|c| c.name.as_str())
            .collect();
        if !dropped.is_empty() || !retyped.is_empty() {
            // Documents written before hold the old shape: rebuild the index
            // in the background (its mapping hash changed) and move the alias.
            return Err(EngineError::Restart(format!(
                "table {table} changed shape (dropped: {dropped:?}, retyped: {retyped:?}); index {} is rebuilt in the background",
                self.core.rows.indexes[pos].alias
            )));
        }
        let mut added = serde_json::Map::new();
        let mut columns = plan_cols;
        for rc in &rel.columns {
            let Some(now) = current.column(&rc.name) else {
                continue;
            };
            if columns.iter().any(|c| c.name == rc.name) {
                continue;
            }
            added.insert(now.name.clone(), now.kind.mapping());
            columns.push(now.clone());
        }
        if added.is_empty() {
            return Ok(());
        }
        let ix = &mut self.core.rows.indexes[pos];
        ix.plan.fields = columns.iter().map(|c| c.name.clone()).collect();
        ix.plan.table.columns = columns.clone();
        ix.shape.columns = columns;
        let alias = ix.alias.clone();
        let names: Vec<String> = added.keys().cloned().collect();
        let sink = &self.core.sink;
        match sink
            .sink(IndexId(pos))
            .extend_mapping(sink.primary(IndexId(pos)), added)
            .await
        {
            Ok(()) => {
                tracing::info!(index = %alias, columns = ?names, "new columns: extended the index mapping")
            }
            Err(e) => {
                tracing::error!(index = %alias, columns = ?names, error = %e, "new columns: the index mapping could not be extended")
            }
        }
        Ok(())
    }
}
