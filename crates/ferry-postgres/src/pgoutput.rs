//! Decoder for the `pgoutput` logical replication protocol (version 1).
//!
//! Every `XLogData` message of a logical replication stream started with the
//! `pgoutput` plugin carries exactly one pgoutput message in its payload. The
//! first byte is a tag that selects the message kind; the rest is a fixed
//! sequence of big-endian integers, NUL-terminated strings and length-prefixed
//! byte strings (see the PostgreSQL documentation, "Logical Replication Message
//! Formats").
//!
//! [`decode`] turns one such payload into a [`Message`]. It is written to cope
//! with hostile input: it never panics, never reads past the end of the
//! buffer, and never reserves memory based on a length field alone (every
//! pre-allocation is bounded by the number of bytes actually left). Column
//! values and logical decoding message contents are returned as zero-copy
//! [`Bytes`] slices of the input buffer.
//!
//! Only the protocol version 1 layout is understood. In versions 2 and later,
//! messages sent inside a streamed (in-progress) transaction carry an extra
//! transaction id after the tag; those payloads, and the stream / two-phase
//! control messages, are not handled here.
//!
//! The [`encode`] module produces the wire form of a [`Message`] and exists so
//! tests (in this crate and others) can build payloads without hand-assembling
//! bytes.

use bytes::Bytes;

/// Message tag of a Begin message.
const TAG_BEGIN: u8 = b'B';
/// Message tag of a Commit message.
const TAG_COMMIT: u8 = b'C';
/// Message tag of an Origin message.
const TAG_ORIGIN: u8 = b'O';
/// Message tag of a Relation message.
const TAG_RELATION: u8 = b'R';
/// Message tag of a Type message.
const TAG_TYPE: u8 = b'Y';
/// Message tag of an Insert message.
const TAG_INSERT: u8 = b'I';
/// Message tag of an Update message.
const TAG_UPDATE: u8 = b'U';
/// Message tag of a Delete message.
const TAG_DELETE: u8 = b'D';
/// Message tag of a Truncate message.
const TAG_TRUNCATE: u8 = b'T';
/// Message tag of a logical decoding message (`pg_logical_emit_message`).
const TAG_MESSAGE: u8 = b'M';

/// Marker preceding a new row image.
const TUPLE_NEW: u8 = b'N';
/// Marker preceding an old row image holding only replica identity columns.
const TUPLE_KEY: u8 = b'K';
/// Marker preceding a complete old row image.
const TUPLE_OLD: u8 = b'O';

/// Column value kind: SQL NULL.
const DATUM_NULL: u8 = b'n';
/// Column value kind: unchanged TOASTed value (no data follows).
const DATUM_UNCHANGED: u8 = b'u';
/// Column value kind: text representation.
const DATUM_TEXT: u8 = b't';
/// Column value kind: binary representation.
const DATUM_BINARY: u8 = b'b';

/// Relation column flag bit marking a replica identity (key) column.
const COLUMN_FLAG_KEY: u8 = 1;

/// Smallest number of wire bytes one Relation column can occupy
/// (flags, empty name, type OID, type modifier).
const MIN_RELATION_COLUMN_LEN: usize = 1 + 1 + 4 + 4;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Start of a transaction (`'B'`).
    Begin {
        /// LSN of the transaction's commit record.
        final_lsn: u64,
        /// Commit time in microseconds since 2000-01-01 00:00:00 UTC.
        commit_ts: i64,
        /// Transaction id.
        xid: u32,
    },
    /// End of a transaction (`'C'`).
    Commit {
        /// Flag bits; PostgreSQL currently always sends 0.
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: u64,
        /// LSN just past the end of the transaction; the position to confirm
        /// once the transaction has been applied.
        end_lsn: u64,
        /// Commit time in microseconds since 2000-01-01 00:00:00 UTC.
        commit_ts: i64,
    },
    /// The transaction originated on another node (`'O'`); may occur several
    /// times within one transaction.
    Origin {
        /// Commit LSN on the origin server.
        commit_lsn: u64,
        /// Name of the replication origin.
        name: String,
    },
    /// Description of a table (`'R'`), sent before the first change to it in
    /// a session and again whenever its definition may have changed.
    Relation(Relation),
    /// Description of a non-built-in data type (`'Y'`).
    Type {
        /// OID of the type.
        oid: u32,
        /// Schema of the type; empty for `pg_catalog`.
        namespace: String,
        /// Name of the type.
        name: String,
    },
    /// A row was inserted (`'I'`).
    Insert {
        /// OID of the relation, as announced by a previous [`Message::Relation`].
        rel: u32,
        /// The inserted row.
        new: Tuple,
    },
    /// A row was updated (`'U'`).
    Update {
        /// OID of the relation, as announced by a previous [`Message::Relation`].
        rel: u32,
        /// The old row or old key; only present when the replica identity is
        /// FULL or when a key column changed.
        old: Option<OldTuple>,
        /// The row after the update. Columns that are TOASTed and did not
        /// change are sent as [`Datum::Unchanged`].
        new: Tuple,
    },
    /// A row was deleted (`'D'`).
    Delete {
        /// OID of the relation, as announced by a previous [`Message::Relation`].
        rel: u32,
        /// The deleted row's replica identity key or whole old row.
        old: OldTuple,
    },
    /// One or more tables were truncated (`'T'`).
    Truncate {
        /// Option bits: 1 = `CASCADE`, 2 = `RESTART IDENTITY`.
        flags: u8,
        /// OIDs of the truncated relations.
        rels: Vec<u32>,
    },
    /// A logical decoding message emitted with `pg_logical_emit_message`
    /// (`'M'`); only sent when the `messages` plugin option is enabled.
    Message {
        /// Flag bits: 1 = transactional message.
        flags: u8,
        /// LSN of the message.
        lsn: u64,
        /// Prefix given by the emitter.
        prefix: String,
        /// Opaque payload; a zero-copy slice of the decoded buffer.
        content: Bytes,
    },
}

// The row images and relation descriptions are ferry's change vocabulary,
// defined in `ferry-core` so the engine never reads this decoder's types.
pub use ferry_core::change::{Datum, OldKind, OldTuple, Relation, RelationColumn, Tuple};

/// Why a pgoutput payload could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The payload was empty, so it did not even contain a message tag.
    #[error("empty pgoutput message")]
    Empty,
    /// The payload ended before a fixed-size field or length-prefixed value.
    #[error(
        "pgoutput message truncated while reading {what}: needed {needed} bytes, {available} left"
    )]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes that were left.
        available: usize,
    },
    /// The payload ended before the NUL terminating a string field.
    #[error("pgoutput message truncated: {what} has no NUL terminator")]
    UnterminatedString {
        /// The string field being read.
        what: &'static str,
    },
    /// A name or other string field was not valid UTF-8.
    #[error("{what} in pgoutput message is not valid UTF-8")]
    InvalidUtf8 {
        /// The string field being read.
        what: &'static str,
    },
    /// The first byte is not a known protocol version 1 message tag.
    #[error("unknown pgoutput message tag '{}'", .0.escape_ascii())]
    UnknownTag(u8),
    /// An Insert, Update or Delete had an unexpected tuple marker where the
    /// `'N'`, `'K'` or `'O'` marker belongs.
    #[error("bad tuple marker '{}' in pgoutput message, expected {expected}", .found.escape_ascii())]
    BadTupleKind {
        /// The marker(s) allowed at this point.
        expected: &'static str,
        /// The byte found instead.
        found: u8,
    },
    /// A column value in tuple data had an unknown kind byte
    /// (known: `'n'`, `'u'`, `'t'`, `'b'`).
    #[error("unknown column value kind '{}' in pgoutput tuple data", .0.escape_ascii())]
    BadDatumKind(u8),
    /// A length or count field was negative.
    #[error("negative {what} ({len}) in pgoutput message")]
    NegativeLength {
        /// The length or count field.
        what: &'static str,
        /// The value read.
        len: i32,
    },
    /// Bytes were left over after a complete message was decoded.
    #[error("{remaining} unexpected trailing bytes after pgoutput '{}' message", .tag.escape_ascii())]
    TrailingData {
        /// Tag of the decoded message.
        tag: u8,
        /// Number of bytes left over.
        remaining: usize,
    },
}

/// Decodes one pgoutput message. Datum bytes are zero-copy slices of `data` (Bytes::slice).
///
/// `data` must be exactly one message (the payload of one `XLogData`); bytes
/// left after the message are reported as [`DecodeError::TrailingData`].
/// Never panics, whatever `data` contains.
///
/// # Errors
///
/// Returns a [`DecodeError`] when `data` is not one well-formed protocol
/// version 1 message: it is empty or cut short, has an unknown tag, tuple
/// marker or column kind, a negative length, a non-UTF-8 string, or extra
/// bytes at the end.
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let mut r = Reader { buf: data, pos: 0 };
    let tag = r.u8("message tag").map_err(|_| DecodeError::Empty)?;
    let msg = match tag {
        TAG_BEGIN => Message::Begin {
            final_lsn: r.u64("Begin final LSN")?,
            commit_ts: r.i64("Begin commit timestamp")?,
            xid: r.u32("Begin xid")?,
        },
        TAG_COMMIT => Message::Commit {
            flags: r.u8("Commit flags")?,
            commit_lsn: r.u64("Commit LSN")?,
            end_lsn: r.u64("Commit end LSN")?,
            commit_ts: r.i64("Commit timestamp")?,
        },
        TAG_ORIGIN => Message::Origin {
            commit_lsn: r.u64("Origin commit LSN")?,
            name: r.string("Origin name")?,
        },
        TAG_RELATION => Message::Relation(relation(&mut r)?),
        TAG_TYPE => Message::Type {
            oid: r.u32("Type OID")?,
            namespace: r.string("Type namespace")?,
            name: r.string("Type name")?,
        },
        TAG_INSERT => {
            let rel = r.u32("Insert relation OID")?;
            let marker = r.u8("Insert tuple marker")?;
            if marker != TUPLE_NEW {
                return Err(DecodeError::BadTupleKind {
                    expected: "'N'",
                    found: marker,
                });
            }
            Message::Insert {
                rel,
                new: tuple(&mut r)?,
            }
        }
        TAG_UPDATE => {
            let rel = r.u32("Update relation OID")?;
            let marker = r.u8("Update tuple marker")?;
            let (old, marker) = match marker {
                TUPLE_KEY | TUPLE_OLD => {
                    let old = old_tuple(marker, &mut r)?;
                    (Some(old), r.u8("Update new tuple marker")?)
                }
                TUPLE_NEW => (None, marker),
                found => {
                    return Err(DecodeError::BadTupleKind {
                        expected: "'K', 'O' or 'N'",
                        found,
                    })
                }
            };
            if marker != TUPLE_NEW {
                return Err(DecodeError::BadTupleKind {
                    expected: "'N'",
                    found: marker,
                });
            }
            Message::Update {
                rel,
                old,
                new: tuple(&mut r)?,
            }
        }
        TAG_DELETE => {
            let rel = r.u32("Delete relation OID")?;
            let marker = r.u8("Delete tuple marker")?;
            if marker != TUPLE_KEY && marker != TUPLE_OLD {
                return Err(DecodeError::BadTupleKind {
                    expected: "'K' or 'O'",
                    found: marker,
                });
            }
            Message::Delete {
                rel,
                old: old_tuple(marker, &mut r)?,
            }
        }
        TAG_TRUNCATE => {
            let count = r.len("Truncate relation count")?;
            let flags = r.u8("Truncate flags")?;
            let mut rels = Vec::with_capacity(count.min(r.remaining() / 4));
            for _ in 0..count {
                rels.push(r.u32("Truncate relation OID")?);
            }
            Message::Truncate { flags, rels }
        }
        TAG_MESSAGE => {
            let flags = r.u8("Message flags")?;
            let lsn = r.u64("Message LSN")?;
            let prefix = r.string("Message prefix")?;
            let len = r.len("Message content length")?;
            let content = r.bytes(len, "Message content")?;
            Message::Message {
                flags,
                lsn,
                prefix,
                content,
            }
        }
        other => return Err(DecodeError::UnknownTag(other)),
    };
    match r.remaining() {
        0 => Ok(msg),
        remaining => Err(DecodeError::TrailingData { tag, remaining }),
    }
}

/// Decodes the body of a Relation message (after the tag).
fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let oid = r.u32("Relation OID")?;
    let namespace = r.string("Relation namespace")?;
    let name = r.string("Relation name")?;
    let replica_identity = r.u8("Relation replica identity")?;
    let count = usize::from(r.u16("Relation column count")?);
    let mut columns = Vec::with_capacity(count.min(r.remaining() / MIN_RELATION_COLUMN_LEN));
    for _ in 0..count {
        let flags = r.u8("Relation column flags")?;
        columns.push(RelationColumn {
            key: flags & COLUMN_FLAG_KEY != 0,
            name: r.string("Relation column name")?,
            type_oid: r.u32("Relation column type OID")?,
            type_modifier: r.i32("Relation column type modifier")?,
        });
    }
    Ok(Relation {
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

/// Decodes the tuple data following an already-read `'K'` or `'O'` marker.
fn old_tuple(marker: u8, r: &mut Reader<'_>) -> Result<OldTuple, DecodeError> {
    let kind = if marker == TUPLE_KEY {
        OldKind::Key
    } else {
        OldKind::Full
    };
    Ok(OldTuple {
        kind,
        tuple: tuple(r)?,
    })
}

/// Decodes a TupleData structure.
fn tuple(r: &mut Reader<'_>) -> Result<Tuple, DecodeError> {
    let count = usize::from(r.u16("tuple column count")?);
    // Every column takes at least its one kind byte.
    let mut datums = Vec::with_capacity(count.min(r.remaining()));
    for _ in 0..count {
        let datum = match r.u8("tuple column kind")? {
            DATUM_NULL => Datum::Null,
            DATUM_UNCHANGED => Datum::Unchanged,
            DATUM_TEXT => {
                let len = r.len("text column length")?;
                Datum::Text(r.bytes(len, "text column value")?)
            }
            DATUM_BINARY => {
                let len = r.len("binary column length")?;
                Datum::Binary(r.bytes(len, "binary column value")?)
            }
            other => return Err(DecodeError::BadDatumKind(other)),
        };
        datums.push(datum);
    }
    Ok(Tuple(datums))
}

/// Bounds-checked cursor over a message buffer.
struct Reader<'a> {
    /// The whole message.
    buf: &'a Bytes,
    /// Offset of the next unread byte; never greater than `buf.len()`.
    pos: usize,
}

impl<'a> Reader<'a> {
    /// The unread part of the buffer.
    fn rest(&self) -> &'a [u8] {
        let all: &'a [u8] = self.buf;
        all.get(self.pos..).unwrap_or_default()
    }

    /// Number of unread bytes.
    fn remaining(&self) -> usize {
        self.rest().len()
    }

    /// Consumes exactly `n` bytes.
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let rest = self.rest();
        let taken = rest.get(..n).ok_or(DecodeError::Truncated {
            what,
            needed: n,
            available: rest.len(),
        })?;
        // Cannot overflow: `pos + n <= buf.len()` since `rest` had `n` bytes.
        self.pos += n;
        Ok(taken)
    }

    /// Consumes a fixed-size field.
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let slice = self.take(N, what)?;
        <[u8; N]>::try_from(slice).map_err(|_| DecodeError::Truncated {
            what,
            needed: N,
            available: slice.len(),
        })
    }

    /// Consumes an Int8 / Byte1.
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(what).map(|[b]| b)
    }

    /// Consumes an unsigned Int16.
    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.array(what).map(u16::from_be_bytes)
    }

    /// Consumes an unsigned Int32.
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    /// Consumes a signed Int32.
    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.array(what).map(i32::from_be_bytes)
    }

    /// Consumes an unsigned Int64.
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.array(what).map(u64::from_be_bytes)
    }

    /// Consumes a signed Int64.
    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.array(what).map(i64::from_be_bytes)
    }

    /// Consumes a signed Int32 length or count, rejecting negative values.
    fn len(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let len = self.i32(what)?;
        usize::try_from(len).map_err(|_| DecodeError::NegativeLength { what, len })
    }

    /// Consumes `n` bytes as a zero-copy slice of the buffer.
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(n, what)?;
        // In range: `take` just checked that `start + n <= buf.len()`.
        Ok(self.buf.slice(start..self.pos))
    }

    /// Consumes a NUL-terminated UTF-8 string (the NUL is not returned).
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = self.rest();
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::UnterminatedString { what })?;
        let raw = self.take(end, what)?;
        self.take(1, what)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8 { what })
    }
}

/// Builds pgoutput payloads from [`Message`] values, the inverse of
/// [`decode`].
///
/// Intended for tests: it lets code that consumes replication messages build
/// realistic input without spelling out bytes by hand.
pub mod encode {
    use super::*;

    /// Encodes `msg` into the bytes [`decode`] accepts, so that
    /// `decode(&encode(msg).into()) == Ok(msg.clone())`.
    ///
    /// # Panics
    ///
    /// Panics if `msg` cannot be represented on the wire: a string containing
    /// a NUL byte, more than 65535 columns in a relation or tuple, or a
    /// relation list or byte value longer than `i32::MAX`.
    pub fn encode(msg: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        match msg {
            Message::Begin {
                final_lsn,
                commit_ts,
                xid,
            } => {
                out.push(TAG_BEGIN);
                out.extend_from_slice(&final_lsn.to_be_bytes());
                out.extend_from_slice(&commit_ts.to_be_bytes());
                out.extend_from_slice(&xid.to_be_bytes());
            }
            Message::Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_ts,
            } => {
                out.push(TAG_COMMIT);
                out.push(*flags);
                out.extend_from_slice(&commit_lsn.to_be_bytes());
                out.extend_from_slice(&end_lsn.to_be_bytes());
                out.extend_from_slice(&commit_ts.to_be_bytes());
            }
            Message::Origin { commit_lsn, name } => {
                out.push(TAG_ORIGIN);
                out.extend_from_slice(&commit_lsn.to_be_bytes());
                put_string(&mut out, name);
            }
            Message::Relation(rel) => {
                out.push(TAG_RELATION);
                out.extend_from_slice(&rel.oid.to_be_bytes());
                put_string(&mut out, &rel.namespace);
                put_string(&mut out, &rel.name);
                out.push(rel.replica_identity);
                put_count16(&mut out, rel.columns.len());
                for col in &rel.columns {
                    out.push(if col.key { COLUMN_FLAG_KEY } else { 0 });
                    put_string(&mut out, &col.name);
                    out.extend_from_slice(&col.type_oid.to_be_bytes());
                    out.extend_from_slice(&col.type_modifier.to_be_bytes());
                }
            }
            Message::Type {
                oid,
                namespace,
                name,
            } => {
                out.push(TAG_TYPE);
                out.extend_from_slice(&oid.to_be_bytes());
                put_string(&mut out, namespace);
                put_string(&mut out, name);
            }
            Message::Insert { rel, new } => {
                out.push(TAG_INSERT);
                out.extend_from_slice(&rel.to_be_bytes());
                out.push(TUPLE_NEW);
                put_tuple(&mut out, new);
            }
            Message::Update { rel, old, new } => {
                out.push(TAG_UPDATE);
                out.extend_from_slice(&rel.to_be_bytes());
                if let Some(old) = old {
                    put_old_tuple(&mut out, old);
                }
                out.push(TUPLE_NEW);
                put_tuple(&mut out, new);
            }
            Message::Delete { rel, old } => {
                out.push(TAG_DELETE);
                out.extend_from_slice(&rel.to_be_bytes());
                put_old_tuple(&mut out, old);
            }
            Message::Truncate { flags, rels } => {
                out.push(TAG_TRUNCATE);
                put_len32(&mut out, rels.len());
                out.push(*flags);
                for rel in rels {
                    out.extend_from_slice(&rel.to_be_bytes());
                }
            }
            Message::Message {
                flags,
                lsn,
                prefix,
                content,
            } => {
                out.push(TAG_MESSAGE);
                out.push(*flags);
                out.extend_from_slice(&lsn.to_be_bytes());
                put_string(&mut out, prefix);
                put_len32(&mut out, content.len());
                out.extend_from_slice(content);
            }
        }
        out
    }

    /// Appends a `'K'`/`'O'` marker and the tuple data.
    fn put_old_tuple(out: &mut Vec<u8>, old: &OldTuple) {
        out.push(match old.kind {
            OldKind::Key => TUPLE_KEY,
            OldKind::Full => TUPLE_OLD,
        });
        put_tuple(out, &old.tuple);
    }

    /// Appends a TupleData structure.
    fn put_tuple(out: &mut Vec<u8>, tuple: &Tuple) {
        put_count16(out, tuple.0.len());
        for datum in &tuple.0 {
            match datum {
                Datum::Null => out.push(DATUM_NULL),
                Datum::Unchanged => out.push(DATUM_UNCHANGED),
                Datum::Text(value) => {
                    out.push(DATUM_TEXT);
                    put_len32(out, value.len());
                    out.extend_from_slice(value);
                }
                Datum::Binary(value) => {
                    out.push(DATUM_BINARY);
                    put_len32(out, value.len());
                    out.extend_from_slice(value);
                }
            }
        }
    }

    /// Appends a NUL-terminated string.
    fn put_string(out: &mut Vec<u8>, s: &str) {
        assert!(
            !s.as_bytes().contains(&0),
            "pgoutput strings cannot contain NUL bytes: {s:?}"
        );
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    /// Appends an Int16 column count.
    fn put_count16(out: &mut Vec<u8>, n: usize) {
        let n = u16::try_from(n).expect("pgoutput column count exceeds 65535");
        out.extend_from_slice(&n.to_be_bytes());
    }

    /// Appends an Int32 length or count.
    fn put_len32(out: &mut Vec<u8>, n: usize) {
        let n = i32::try_from(n).expect("pgoutput length exceeds i32::MAX");
        out.extend_from_slice(&n.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::encode::encode;
    use super::*;
    use proptest::prelude::*;

    fn dec(bytes: &[u8]) -> Result<Message, DecodeError> {
        decode(&Bytes::copy_from_slice(bytes))
    }

    /// Big-endian helpers for building messages by hand.
    fn be16(v: u16) -> [u8; 2] {
        v.to_be_bytes()
    }
    fn be32(v: u32) -> [u8; 4] {
        v.to_be_bytes()
    }
    fn be64(v: u64) -> [u8; 8] {
        v.to_be_bytes()
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    fn text(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    /// One instance of every message kind, used by the exhaustive tests.
    fn samples() -> Vec<Message> {
        vec![
            Message::Begin {
                final_lsn: 0x0000_0001_6B37_4D48,
                commit_ts: 771_234_567_890_123,
                xid: 7_654,
            },
            Message::Commit {
                flags: 0,
                commit_lsn: 0x0001_6B37_4D48,
                end_lsn: 0x0001_6B37_4D78,
                commit_ts: -5,
            },
            Message::Origin {
                commit_lsn: 42,
                name: "node_a".into(),
            },
            Message::Relation(Relation {
                oid: 16_384,
                namespace: "public".into(),
                name: "users".into(),
                replica_identity: b'd',
                columns: vec![
                    RelationColumn {
                        key: true,
                        name: "id".into(),
                        type_oid: 23,
                        type_modifier: -1,
                    },
                    RelationColumn {
                        key: false,
                        name: "name".into(),
                        type_oid: 1043,
                        type_modifier: 68,
                    },
                ],
            }),
            Message::Type {
                oid: 90_000,
                namespace: String::new(),
                name: "mood".into(),
            },
            Message::Insert {
                rel: 16_384,
                new: Tuple(vec![text("1"), Datum::Null]),
            },
            Message::Update {
                rel: 16_384,
                old: Some(OldTuple {
                    kind: OldKind::Full,
                    tuple: Tuple(vec![text("1"), text("a")]),
                }),
                new: Tuple(vec![text("1"), Datum::Unchanged]),
            },
            Message::Update {
                rel: 16_384,
                old: None,
                new: Tuple(vec![Datum::Binary(Bytes::from_static(&[0, 0, 0, 1]))]),
            },
            Message::Delete {
                rel: 16_384,
                old: OldTuple {
                    kind: OldKind::Key,
                    tuple: Tuple(vec![text("1"), Datum::Null]),
                },
            },
            Message::Truncate {
                flags: 3,
                rels: vec![1, 2, 3],
            },
            Message::Message {
                flags: 1,
                lsn: 99,
                prefix: "ferry".into(),
                content: Bytes::from_static(b"hello"),
            },
        ]
    }

    #[test]
    fn begin_by_hand() {
        let bytes = cat(&[b"B", &be64(0x10), &be64(0x20), &be32(0x30)]);
        assert_eq!(
            dec(&bytes),
            Ok(Message::Begin {
                final_lsn: 0x10,
                commit_ts: 0x20,
                xid: 0x30
            })
        );
    }

    #[test]
    fn commit_by_hand() {
        let bytes = cat(&[b"C", &[0], &be64(1), &be64(2), &be64(3)]);
        assert_eq!(
            dec(&bytes),
            Ok(Message::Commit {
                flags: 0,
                commit_lsn: 1,
                end_lsn: 2,
                commit_ts: 3
            })
        );
    }

    #[test]
    fn origin_and_type_by_hand() {
        let bytes = cat(&[b"O", &be64(7), b"origin1\0"]);
        assert_eq!(
            dec(&bytes),
            Ok(Message::Origin {
                commit_lsn: 7,
                name: "origin1".into()
            })
        );
        let bytes = cat(&[b"Y", &be32(12_345), b"\0", b"citext\0"]);
        assert_eq!(
            dec(&bytes),
            Ok(Message::Type {
                oid: 12_345,
                namespace: String::new(),
                name: "citext".into()
            })
        );
    }

    #[test]
    fn relation_by_hand() {
        let bytes = cat(&[
            b"R",
            &be32(16_384),
            b"public\0",
            b"users\0",
            b"f",
            &be16(2),
            // Column 1: key flag, "id", int4, no typmod.
            &[1],
            b"id\0",
            &be32(23),
            &(-1i32).to_be_bytes(),
            // Column 2: unknown extra flag bits are ignored, only bit 1 counts.
            &[0b10],
            b"email\0",
            &be32(1043),
            &be32(259),
        ]);
        assert_eq!(
            dec(&bytes),
            Ok(Message::Relation(Relation {
                oid: 16_384,
                namespace: "public".into(),
                name: "users".into(),
                replica_identity: b'f',
                columns: vec![
                    RelationColumn {
                        key: true,
                        name: "id".into(),
                        type_oid: 23,
                        type_modifier: -1
                    },
                    RelationColumn {
                        key: false,
                        name: "email".into(),
                        type_oid: 1043,
                        type_modifier: 259
                    },
                ],
            }))
        );
    }

    #[test]
    fn insert_by_hand_is_zero_copy() {
        let bytes = Bytes::from(cat(&[
            b"I",
            &be32(16_384),
            b"N",
            &be16(4),
            b"t",
            &be32(2),
            b"42",
            b"n",
            b"b",
            &be32(3),
            &[0xde, 0xad, 0x00],
            b"t",
            &be32(0),
        ]));
        let msg = decode(&bytes).unwrap();
        assert_eq!(
            msg,
            Message::Insert {
                rel: 16_384,
                new: Tuple(vec![
                    text("42"),
                    Datum::Null,
                    Datum::Binary(Bytes::from_static(&[0xde, 0xad, 0x00])),
                    text(""),
                ]),
            }
        );
        let Message::Insert { new, .. } = msg else {
            unreachable!()
        };
        let Datum::Text(value) = &new.0[0] else {
            unreachable!()
        };
        let range = bytes.as_ptr_range();
        assert!(range.contains(&value.as_ptr()), "datum was copied");
    }

    #[test]
    fn update_with_key_old_tuple_by_hand() {
        let bytes = cat(&[
            b"U",
            &be32(5),
            b"K",
            &be16(2),
            b"t",
            &be32(1),
            b"1",
            b"n",
            b"N",
            &be16(2),
            b"t",
            &be32(1),
            b"2",
            b"t",
            &be32(3),
            b"abc",
        ]);
        assert_eq!(
            dec(&bytes),
            Ok(Message::Update {
                rel: 5,
                old: Some(OldTuple {
                    kind: OldKind::Key,
                    tuple: Tuple(vec![text("1"), Datum::Null]),
                }),
                new: Tuple(vec![text("2"), text("abc")]),
            })
        );
    }

    #[test]
    fn update_with_unchanged_toast_by_hand() {
        let bytes = cat(&[
            b"U",
            &be32(5),
            b"N",
            &be16(3),
            b"t",
            &be32(1),
            b"1",
            b"u",
            b"n",
        ]);
        assert_eq!(
            dec(&bytes),
            Ok(Message::Update {
                rel: 5,
                old: None,
                new: Tuple(vec![text("1"), Datum::Unchanged, Datum::Null]),
            })
        );
    }

    #[test]
    fn delete_with_full_old_row_by_hand() {
        let bytes = cat(&[b"D", &be32(9), b"O", &be16(2), b"t", &be32(1), b"7", b"n"]);
        assert_eq!(
            dec(&bytes),
            Ok(Message::Delete {
                rel: 9,
                old: OldTuple {
                    kind: OldKind::Full,
                    tuple: Tuple(vec![text("7"), Datum::Null]),
                },
            })
        );
    }

    #[test]
    fn truncate_with_flags_by_hand() {
        // Count comes before the option bits on the wire.
        let bytes = cat(&[b"T", &be32(2), &[1 | 2], &be32(100), &be32(200)]);
        assert_eq!(
            dec(&bytes),
            Ok(Message::Truncate {
                flags: 3,
                rels: vec![100, 200]
            })
        );
        let bytes = cat(&[b"T", &be32(0), &[0]]);
        assert_eq!(
            dec(&bytes),
            Ok(Message::Truncate {
                flags: 0,
                rels: vec![]
            })
        );
    }

    #[test]
    fn logical_message_by_hand() {
        let bytes = cat(&[b"M", &[1], &be64(77), b"pfx\0", &be32(3), b"a\0b"]);
        assert_eq!(
            dec(&bytes),
            Ok(Message::Message {
                flags: 1,
                lsn: 77,
                prefix: "pfx".into(),
                content: Bytes::from_static(b"a\0b"),
            })
        );
    }

    #[test]
    fn encode_matches_hand_built_bytes() {
        let bytes = cat(&[b"D", &be32(9), b"O", &be16(2), b"t", &be32(1), b"7", b"n"]);
        let msg = dec(&bytes).unwrap();
        assert_eq!(encode(&msg), bytes);
    }

    #[test]
    fn samples_round_trip() {
        for msg in samples() {
            let bytes = Bytes::from(encode(&msg));
            assert_eq!(decode(&bytes), Ok(msg));
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for msg in samples() {
            let bytes = encode(&msg);
            for len in 0..bytes.len() {
                assert!(
                    dec(&bytes[..len]).is_err(),
                    "prefix of length {len} of {msg:?} decoded"
                );
            }
        }
    }

    #[test]
    fn errors() {
        assert_eq!(dec(b""), Err(DecodeError::Empty));
        assert_eq!(dec(b"Z"), Err(DecodeError::UnknownTag(b'Z')));
        assert_eq!(
            dec(&cat(&[b"B", &be64(1)])),
            Err(DecodeError::Truncated {
                what: "Begin commit timestamp",
                needed: 8,
                available: 0
            })
        );
        assert_eq!(
            dec(&cat(&[b"O", &be64(1), b"abc"])),
            Err(DecodeError::UnterminatedString {
                what: "Origin name"
            })
        );
        assert_eq!(
            dec(&cat(&[b"O", &be64(1), &[0xff, 0]])),
            Err(DecodeError::InvalidUtf8 {
                what: "Origin name"
            })
        );
        assert_eq!(
            dec(&cat(&[b"I", &be32(1), b"K", &be16(0)])),
            Err(DecodeError::BadTupleKind {
                expected: "'N'",
                found: b'K'
            })
        );
        assert_eq!(
            dec(&cat(&[b"U", &be32(1), b"K", &be16(0), b"O", &be16(0)])),
            Err(DecodeError::BadTupleKind {
                expected: "'N'",
                found: b'O'
            })
        );
        assert_eq!(
            dec(&cat(&[b"U", &be32(1), b"X"])),
            Err(DecodeError::BadTupleKind {
                expected: "'K', 'O' or 'N'",
                found: b'X'
            })
        );
        assert_eq!(
            dec(&cat(&[b"D", &be32(1), b"N", &be16(0)])),
            Err(DecodeError::BadTupleKind {
                expected: "'K' or 'O'",
                found: b'N'
            })
        );
        assert_eq!(
            dec(&cat(&[b"I", &be32(1), b"N", &be16(1), b"x"])),
            Err(DecodeError::BadDatumKind(b'x'))
        );
        assert_eq!(
            dec(&cat(&[
                b"I",
                &be32(1),
                b"N",
                &be16(1),
                b"t",
                &be32(u32::MAX)
            ])),
            Err(DecodeError::NegativeLength {
                what: "text column length",
                len: -1
            })
        );
        assert_eq!(
            dec(&cat(&[b"T", &be32(0x8000_0000), &[0]])),
            Err(DecodeError::NegativeLength {
                what: "Truncate relation count",
                len: i32::MIN
            })
        );
        assert_eq!(
            dec(&cat(&[b"C", &[0], &be64(1), &be64(2), &be64(3), b"??"])),
            Err(DecodeError::TrailingData {
                tag: b'C',
                remaining: 2
            })
        );
    }

    #[test]
    fn huge_counts_do_not_preallocate() {
        // Claims i32::MAX relations / a 2 GiB datum but carries almost nothing.
        assert!(matches!(
            dec(&cat(&[b"T", &be32(i32::MAX as u32), &[0], &be32(1)])),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            dec(&cat(&[
                b"M",
                &[0],
                &be64(0),
                b"\0",
                &be32(i32::MAX as u32),
                b"x"
            ])),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            dec(&cat(&[b"R", &be32(1), b"\0", b"\0", b"d", &be16(u16::MAX)])),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn error_messages_are_readable() {
        assert_eq!(
            DecodeError::UnknownTag(0xff).to_string(),
            "unknown pgoutput message tag '\\xff'"
        );
        assert_eq!(
            DecodeError::BadDatumKind(b'x').to_string(),
            "unknown column value kind 'x' in pgoutput tuple data"
        );
    }

    fn arb_bytes() -> impl Strategy<Value = Bytes> {
        prop::collection::vec(any::<u8>(), 0..16).prop_map(Bytes::from)
    }

    fn arb_string() -> impl Strategy<Value = String> {
        // Anything but NUL, which cannot appear in a NUL-terminated string.
        "[^\u{0}]{0,8}"
    }

    fn arb_datum() -> impl Strategy<Value = Datum> {
        prop_oneof![
            Just(Datum::Null),
            Just(Datum::Unchanged),
            arb_bytes().prop_map(Datum::Text),
            arb_bytes().prop_map(Datum::Binary),
        ]
    }

    fn arb_tuple() -> impl Strategy<Value = Tuple> {
        prop::collection::vec(arb_datum(), 0..6).prop_map(Tuple)
    }

    fn arb_old_tuple() -> impl Strategy<Value = OldTuple> {
        (
            prop_oneof![Just(OldKind::Key), Just(OldKind::Full)],
            arb_tuple(),
        )
            .prop_map(|(kind, tuple)| OldTuple { kind, tuple })
    }

    fn arb_relation() -> impl Strategy<Value = Relation> {
        let column = (any::<bool>(), arb_string(), any::<u32>(), any::<i32>()).prop_map(
            |(key, name, type_oid, type_modifier)| RelationColumn {
                key,
                name,
                type_oid,
                type_modifier,
            },
        );
        (
            any::<u32>(),
            arb_string(),
            arb_string(),
            any::<u8>(),
            prop::collection::vec(column, 0..6),
        )
            .prop_map(
                |(oid, namespace, name, replica_identity, columns)| Relation {
                    oid,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                },
            )
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_ts, xid)| {
                Message::Begin {
                    final_lsn,
                    commit_ts,
                    xid,
                }
            }),
            (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>()).prop_map(
                |(flags, commit_lsn, end_lsn, commit_ts)| Message::Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_ts,
                }
            ),
            (any::<u64>(), arb_string())
                .prop_map(|(commit_lsn, name)| Message::Origin { commit_lsn, name }),
            arb_relation().prop_map(Message::Relation),
            (any::<u32>(), arb_string(), arb_string()).prop_map(|(oid, namespace, name)| {
                Message::Type {
                    oid,
                    namespace,
                    name,
                }
            }),
            (any::<u32>(), arb_tuple()).prop_map(|(rel, new)| Message::Insert { rel, new }),
            (any::<u32>(), prop::option::of(arb_old_tuple()), arb_tuple())
                .prop_map(|(rel, old, new)| Message::Update { rel, old, new }),
            (any::<u32>(), arb_old_tuple()).prop_map(|(rel, old)| Message::Delete { rel, old }),
            (any::<u8>(), prop::collection::vec(any::<u32>(), 0..6))
                .prop_map(|(flags, rels)| Message::Truncate { flags, rels }),
            (any::<u8>(), any::<u64>(), arb_string(), arb_bytes()).prop_map(
                |(flags, lsn, prefix, content)| Message::Message {
                    flags,
                    lsn,
                    prefix,
                    content,
                }
            ),
        ]
    }

    /// Re-decoding the encoding of whatever `decode` accepted gives the same
    /// message; the only lossy part of decoding is unknown column flag bits.
    fn assert_stable(bytes: &Bytes) {
        if let Ok(msg) = decode(bytes) {
            let again = decode(&Bytes::from(encode(&msg)));
            assert_eq!(again, Ok(msg));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn prop_round_trip(msg in arb_message()) {
            let bytes = Bytes::from(encode(&msg));
            prop_assert_eq!(decode(&bytes), Ok(msg));
        }

        #[test]
        fn prop_strict_prefixes_fail(msg in arb_message(), cut in any::<prop::sample::Index>()) {
            let bytes = encode(&msg);
            let len = cut.index(bytes.len());
            prop_assert!(dec(&bytes[..len]).is_err());
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..256)) {
            assert_stable(&Bytes::from(data));
        }

        #[test]
        fn prop_tagged_garbage_never_panics(
            tag in prop::sample::select(b"BCORYIUDTM".to_vec()),
            body in prop::collection::vec(
                prop_oneof![
                    any::<u8>(),
                    prop::sample::select(b"NKOnutb\0".to_vec()),
                ],
                0..128,
            ),
        ) {
            let mut data = vec![tag];
            data.extend(body);
            assert_stable(&Bytes::from(data));
        }

        #[test]
        fn prop_mutated_messages_never_panic(
            msg in arb_message(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut data = encode(&msg);
            for (at, byte) in edits {
                if !data.is_empty() {
                    let i = at.index(data.len());
                    data[i] = byte;
                }
            }
            let keep = cut.index(data.len() + 1);
            data.truncate(keep);
            assert_stable(&Bytes::from(data));
        }
    }
}
