//! Row changes as the source hands them to the engine, in stream order.
//!
//! These are the shapes of logical replication (pgoutput protocol 1): a
//! relation is described before its first change, row images hold one
//! datum per published column, and every change sits between the `Begin`
//! and `Commit` of its transaction. The source decodes into these types;
//! the engine reads only these, never the decoder's.

use std::sync::Arc;

use bytes::Bytes;

use crate::Lsn;

/// A table description carried by a Relation message.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    /// OID of the relation; row change messages refer to it by this id.
    pub oid: u32,
    /// Schema of the relation; empty for `pg_catalog`.
    pub namespace: String,
    /// Name of the relation.
    pub name: String,
    /// Replica identity setting, as in `pg_class.relreplident`:
    /// `b'd'` default, `b'n'` nothing, `b'f'` full, `b'i'` index.
    pub replica_identity: u8,
    /// Published columns in the order used by tuple data.
    pub columns: Vec<RelationColumn>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq)]
pub struct RelationColumn {
    /// Whether the column is part of the replica identity key (flag bit 1).
    pub key: bool,
    /// Column name.
    pub name: String,
    /// OID of the column's data type.
    pub type_oid: u32,
    /// Type modifier (`pg_attribute.atttypmod`), -1 when none.
    pub type_modifier: i32,
}

/// A row image: one datum per column, in relation column order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tuple(pub Vec<Datum>);

/// The value of one column in a [`Tuple`].
#[derive(Debug, Clone, PartialEq)]
pub enum Datum {
    /// SQL NULL (`'n'`).
    Null,
    /// 'u': unchanged TOASTed value, not sent
    Unchanged,
    /// Value in text output format (`'t'`); a zero-copy slice of the input.
    Text(Bytes),
    /// Value in binary send format (`'b'`); a zero-copy slice of the input.
    Binary(Bytes),
}

/// Which kind of old row image an [`OldTuple`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// 'K': only replica identity key columns are set (others Null)
    Key,
    /// 'O': the whole old row (REPLICA IDENTITY FULL)
    Full,
}

/// The old row image of an Update or Delete.
#[derive(Debug, Clone, PartialEq)]
pub struct OldTuple {
    /// Whether the image holds only the key or the full row.
    pub kind: OldKind,
    /// The old values.
    pub tuple: Tuple,
}

/// A row change of one relation.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Relation OID.
    pub rel: u32,
    /// Insert, update or delete.
    pub op: ChangeOp,
    /// The old row image (key columns or the full row), when sent.
    pub old: Option<OldTuple>,
    /// The new row image (insert and update).
    pub new: Option<Tuple>,
}

/// The kind of row change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOp {
    /// A new row.
    Insert,
    /// A changed row.
    Update,
    /// A removed row.
    Delete,
}

/// What the source's capture task queues for the engine, in stream order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A transaction starts; its changes carry `final_lsn` as their version.
    Begin {
        /// LSN of the transaction's commit record.
        final_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01.
        commit_ts: i64,
    },
    /// A relation's current shape (sent before its first change and after DDL).
    Relation(Arc<Relation>),
    /// A row change.
    Change(Change),
    /// Tables were truncated.
    Truncate {
        /// Relation OIDs.
        rels: Vec<u32>,
    },
    /// The transaction ends; `end_lsn` is what may be confirmed once durable.
    Commit {
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// LSN just past the commit record.
        end_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01.
        commit_ts: i64,
    },
    /// The server's WAL end while idle.
    Keepalive {
        /// Server WAL end.
        wal_end: Lsn,
    },
}
