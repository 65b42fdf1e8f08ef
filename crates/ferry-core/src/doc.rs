//! Document writes: what the engine asks a sink to make durable.

use std::collections::HashMap;

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
    /// The document's `_routing` (`None`: the default, by id). Two writes
    /// of one id with different routings are two documents (on their
    /// shards): moving a document writes one and deletes the other.
    pub routing: Option<String>,
}

/// The routing a routing column's text gives: `None` (by id) for NULL and
/// for an empty value, which the cluster treats as no routing.
pub fn routing_of(text: Option<&[u8]>) -> Option<String> {
    text.filter(|t| !t.is_empty())
        .map(|t| String::from_utf8_lossy(t).into_owned())
}

/// A document as the cluster stores it: (index position, id, routing).
pub type DocKey<'a> = (usize, &'a str, Option<&'a str>);

impl DocWrite {
    /// Which stored document this write operates on.
    pub fn key(&self) -> DocKey<'_> {
        (self.index, &self.id, self.routing.as_deref())
    }

    /// Approximate bytes this write adds to a bulk request.
    pub fn weight(&self) -> usize {
        96 + self.id.len()
            + self.routing.as_ref().map_or(0, String::len)
            + match &self.op {
                DocOp::Index(body) => body.len(),
                DocOp::Delete => 0,
            }
    }
}

/// The routings each document of a routed index had in one batch's row
/// images (old and new), so that the documents built for the batch also
/// remove the copies stored under another routing.
///
/// A build reads a root's current row, so it knows where the document goes
/// now but not where an older copy lies; the WAL images of the root's
/// changes do (routing columns are in the replica identity). The build's
/// writes are completed by [`SeenRoutings::settle`]: a document written
/// under routing `r` is deleted under every other routing seen, and a
/// document whose root is gone (a delete without a routing) is deleted
/// under each routing seen. A gone root with no image in the batch was
/// reached through a related row; its own root change (in this batch or a
/// later one) carries the routing and deletes it.
#[derive(Debug, Default)]
pub struct SeenRoutings(HashMap<(usize, String), Vec<Option<String>>>);

impl SeenRoutings {
    /// Document `id` of index `index` had routing `routing` in a row image.
    pub fn note(&mut self, index: usize, id: String, routing: Option<String>) {
        let seen = self.0.entry((index, id)).or_default();
        if !seen.contains(&routing) {
            seen.push(routing);
        }
    }

    /// Completes `built`, the writes a build produced for a batch; `routed`
    /// tells which indexes have a routing column (others pass unchanged).
    /// Returns the writes and the number of deletes dropped because no
    /// routing of theirs was seen.
    pub fn settle(
        &self,
        built: Vec<DocWrite>,
        routed: impl Fn(usize) -> bool,
    ) -> (Vec<DocWrite>, usize) {
        let mut out = Vec::with_capacity(built.len());
        let mut dropped = 0;
        for w in built {
            if !routed(w.index) {
                out.push(w);
                continue;
            }
            let seen = self
                .0
                .get(&(w.index, w.id.clone()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let gone = w.op == DocOp::Delete;
            for r in seen.iter().filter(|r| gone || **r != w.routing) {
                out.push(DocWrite {
                    index: w.index,
                    id: w.id.clone(),
                    version: w.version,
                    op: DocOp::Delete,
                    routing: r.clone(),
                });
            }
            if gone {
                dropped += usize::from(seen.is_empty());
            } else {
                out.push(w);
            }
        }
        (out, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(id: &str, op: DocOp, routing: Option<&str>) -> DocWrite {
        DocWrite {
            index: 0,
            id: id.into(),
            version: Lsn(9),
            op,
            routing: routing.map(str::to_string),
        }
    }

    fn body() -> DocOp {
        DocOp::Index(b"{}".to_vec())
    }

    #[test]
    fn a_document_built_under_a_new_routing_deletes_every_other_routing_seen() {
        let mut seen = SeenRoutings::default();
        seen.note(0, "1".into(), Some("a".into()));
        seen.note(0, "1".into(), Some("b".into()));
        seen.note(0, "1".into(), Some("b".into()));
        seen.note(0, "1".into(), None);
        let (out, dropped) = seen.settle(vec![write("1", body(), Some("b"))], |_| true);
        assert_eq!(
            out,
            vec![
                write("1", DocOp::Delete, Some("a")),
                write("1", DocOp::Delete, None),
                write("1", body(), Some("b")),
            ]
        );
        assert_eq!(dropped, 0);
    }

    #[test]
    fn a_gone_root_is_deleted_under_each_routing_seen_and_nowhere_else() {
        let mut seen = SeenRoutings::default();
        seen.note(0, "1".into(), Some("a".into()));
        let built = vec![
            write("1", DocOp::Delete, None),
            write("2", DocOp::Delete, None),
        ];
        let (out, dropped) = seen.settle(built, |_| true);
        assert_eq!(out, vec![write("1", DocOp::Delete, Some("a"))]);
        assert_eq!(dropped, 1, "no routing of 2 was seen");
    }

    #[test]
    fn an_empty_routing_value_routes_by_id_like_null() {
        assert_eq!(routing_of(Some(b"")), None);
        assert_eq!(routing_of(None), None);
        assert_eq!(routing_of(Some(b"t1")), Some("t1".into()));
    }

    #[test]
    fn writes_of_indexes_without_routing_pass_unchanged() {
        let mut seen = SeenRoutings::default();
        seen.note(0, "1".into(), Some("a".into()));
        let built = vec![write("1", DocOp::Delete, None), write("2", body(), None)];
        let (out, dropped) = seen.settle(built.clone(), |_| false);
        assert_eq!((out, dropped), (built, 0));
    }
}
