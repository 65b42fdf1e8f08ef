//! Flat indexes: documents taken straight from the WAL tuple of the root
//! table. A value the WAL did not carry (an unchanged TOASTed column) sends
//! the row through the build query instead.

use ferry_core::change::{Change, ChangeOp, Datum, Relation, Tuple};
use ferry_core::doc::routing_of;
use ferry_core::schema::{doc_id, DocumentWriter};
use ferry_core::{ColumnShape, DocOp, DocWrite, Lsn, TableShape, TypeKind};

use super::batch::Batch;
use super::route::text;
use crate::EngineError;

/// How one flat index reads the tuples of its root table (rebuilt on every
/// Relation message).
pub struct Projection {
    index: usize,
    writer: DocumentWriter,
    /// Tuple position of each document column.
    cols: Vec<usize>,
    /// Tuple positions of the primary-key columns.
    key: Vec<usize>,
    /// Tuple position of the routing column, when the index is routed.
    routing: Option<usize>,
}

impl Projection {
    /// Maps `shape`'s columns (and the routing column, if any) onto
    /// `rel`'s tuple layout. `kind(oid)` gives the kind of a column whose
    /// type differs from the shape's (the caller resolved those beforehand).
    pub fn new(
        index: usize,
        shape: &TableShape,
        routing: Option<&str>,
        rel: &Relation,
        kind: impl Fn(u32) -> TypeKind,
    ) -> Result<Projection, EngineError> {
        let mut columns = Vec::with_capacity(shape.columns.len());
        let mut cols = Vec::with_capacity(shape.columns.len());
        for c in &shape.columns {
            let Some(at) = rel.columns.iter().position(|rc| rc.name == c.name) else {
                tracing::warn!(table = %shape.qualified(), column = %c.name, "column is gone from the table; leaving it out of documents");
                continue;
            };
            let type_oid = rel.columns[at].type_oid;
            columns.push(ColumnShape {
                name: c.name.clone(),
                type_oid,
                kind: if type_oid == c.type_oid {
                    c.kind.clone()
                } else {
                    kind(type_oid)
                },
            });
            cols.push(at);
        }
        let mut key = Vec::with_capacity(shape.key.len());
        for k in &shape.key {
            let Some(at) = rel.columns.iter().position(|rc| &rc.name == k) else {
                return Err(EngineError::Stream(format!(
                    "primary-key column {k:?} of {} is missing from the replication stream; \
                     restart ferry so it re-reads the table's shape",
                    shape.qualified()
                )));
            };
            key.push(at);
        }
        let routing =
            match routing {
                None => None,
                Some(r) => Some(rel.columns.iter().position(|rc| rc.name == r).ok_or_else(
                    || {
                        EngineError::Stream(format!(
                            "routing column {r:?} of {} is missing from the replication stream; \
                     restart ferry so it re-reads the table's shape",
                            shape.qualified()
                        ))
                    },
                )?),
            };
        Ok(Projection {
            index,
            writer: DocumentWriter::new(&columns),
            cols,
            key,
            routing,
        })
    }

    /// The routing a row image gives its document (`None` for an
    /// unrouted index or a NULL or empty value).
    fn routing_of(&self, t: &Tuple) -> Option<String> {
        routing_of(self.routing.and_then(|r| text(t, r)))
    }

    /// Adds what `change` does to this index's documents, versioned `version`.
    pub fn apply(&self, change: &Change, version: Lsn, batch: &mut Batch) {
        let write = |id, op, routing| DocWrite {
            index: self.index,
            id,
            version,
            op,
            routing,
        };
        match change.op {
            ChangeOp::Insert | ChangeOp::Update => {
                let Some(new) = &change.new else { return };
                let id = key_id(new, &self.key);
                let routing = self.routing_of(new);
                if let Some(old) = &change.old {
                    let old_id = key_id(&old.tuple, &self.key);
                    let old_routing = self.routing_of(&old.tuple);
                    if old_id != id || old_routing != routing {
                        // The primary key or the routing changed: the old document goes.
                        batch.push(write(old_id, DocOp::Delete, old_routing));
                    }
                }
                let unchanged = self
                    .cols
                    .iter()
                    .chain(&self.routing)
                    .any(|c| matches!(new.0.get(*c), Some(Datum::Unchanged)));
                if unchanged {
                    // A TOASTed value was not sent: rebuild from the table
                    // (which writes under the routing the row has then).
                    // A routing value sent unchanged is the one the document has.
                    if self
                        .routing
                        .is_some_and(|r| !matches!(new.0.get(r), Some(Datum::Unchanged)))
                    {
                        batch.saw_routing(self.index, id.clone(), routing);
                    }
                    let key = self
                        .key
                        .iter()
                        .map(|k| String::from_utf8_lossy(text(new, *k).unwrap_or(b"")).into_owned())
                        .collect();
                    batch.rebuild(self.index, key);
                    return;
                }
                let mut body = Vec::with_capacity(128);
                self.writer
                    .write(|i| self.cols.get(i).and_then(|c| text(new, *c)), &mut body);
                batch.push(write(id, DocOp::Index(body), routing));
            }
            ChangeOp::Delete => {
                let Some(old) = &change.old else { return };
                let id = key_id(&old.tuple, &self.key);
                batch.push(write(id, DocOp::Delete, self.routing_of(&old.tuple)));
            }
        }
    }
}

fn key_id(t: &Tuple, key: &[usize]) -> String {
    let parts: Vec<&[u8]> = key.iter().map(|k| text(t, *k).unwrap_or(b"")).collect();
    doc_id(&parts)
}
