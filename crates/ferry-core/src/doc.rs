//! Document writes: what the engine asks a sink to make durable.

use crate::Lsn;

/// One operation on one search document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocOp {
    /// Create or replace the document with this JSON body (an object).
    Index(Vec<u8>),
    /// Remove the document (a missing document is not an error).
    Delete,
}

/// A write to one document of one index, ordered by `version`.
///
/// Writes are idempotent: the id is derived from the root row's primary key
/// and `version` is the commit LSN the write reflects, sent as an external
/// version so a replayed or delayed older write never replaces a newer one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocWrite {
    /// Position of the index in the configuration (resolved to a name by the sink).
    pub index: usize,
    /// The document id (see [`crate::schema::doc_id`]).
    pub id: String,
    /// External version: the LSN whose effects the write reflects.
    pub version: Lsn,
    /// What to do.
    pub op: DocOp,
}

impl DocWrite {
    /// Approximate bytes this write adds to a bulk request.
    pub fn weight(&self) -> usize {
        96 + self.id.len()
            + match &self.op {
                DocOp::Index(body) => body.len(),
                DocOp::Delete => 0,
            }
    }
}
