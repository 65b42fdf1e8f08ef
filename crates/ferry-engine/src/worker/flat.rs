//! Flat indexes: documents taken straight from the WAL tuple of the root
//! table. A value the WAL did not carry (an unchanged TOASTed column) sends
//! the row through the build query instead.

use ferry_core::change::{Change, ChangeOp, Datum, Relation, Tuple};
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
}

impl Projection {
    /// Maps `shape`'s columns onto `rel`'s tuple layout. `kind(oid)` gives
    /// the kind of a column whose type differs from the shape's (the caller
    /// resolved those beforehand).
    pub fn new(
        index: usize,
        shape: &TableShape,
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
        Ok(Projection {
            index,
            writer: DocumentWriter::new(&columns),
            cols,
            key,
        })
    }

    /// Adds what `change` does to this index's documents, versioned `version`.
    pub fn apply(&self, change: &Change, version: Lsn, batch: &mut Batch) {
        let write = |id, op| DocWrite {
            index: self.index,
            id,
            version,
            op,
        };
        match change.op {
            ChangeOp::Insert | ChangeOp::Update => {
                let Some(new) = &change.new else { return };
                let id = key_id(new, &self.key);
                if let Some(old) = &change.old {
                    let old_id = key_id(&old.tuple, &self.key);
                    if old_id != id {
                        // The primary key changed: the old document goes.
                        batch.push(write(old_id, DocOp::Delete));
                    }
                }
                let unchanged = self
                    .cols
                    .iter()
                    .any(|c| matches!(new.0.get(*c), Some(Datum::Unchanged)));
                if unchanged {
                    // A TOASTed value was not sent: rebuild from the table.
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
                batch.push(write(id, DocOp::Index(body)));
            }
            ChangeOp::Delete => {
                let Some(old) = &change.old else { return };
                batch.push(write(key_id(&old.tuple, &self.key), DocOp::Delete));
            }
        }
    }
}

fn key_id(t: &Tuple, key: &[usize]) -> String {
    let parts: Vec<&[u8]> = key.iter().map(|k| text(t, *k).unwrap_or(b"")).collect();
    doc_id(&parts)
}
