//! What the worker gathers between two flushes. The rule that turns
//! finished flushes into positions PostgreSQL may forget ([`Acks`], with
//! several batches in flight) is pure and lives in `ferry_core::ack`.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

use ferry_core::doc::SeenRoutings;
use ferry_core::plan::Probe;
use ferry_core::DocWrite;

pub use ferry_core::ack::{Acks, FlushTicket};

/// Root keys (primary-key texts) of documents to rebuild from the database.
pub type RootKeys = HashSet<Vec<String>>;

/// Bytes a root key or probe value is counted for until it is resolved.
const PENDING_KEY_BYTES: usize = 64;

/// Document writes and rebuild requests collected since the last flush.
/// Only the last write per document is kept.
#[derive(Default)]
pub struct Batch {
    /// (index, document id, routing) → position in `writes`.
    slots: HashMap<(usize, String, Option<String>), usize>,
    writes: Vec<DocWrite>,
    /// Per index: roots whose documents are rebuilt by query.
    rebuild: HashMap<usize, RootKeys>,
    /// Per index and probe: values selecting parent rows whose roots are rebuilt.
    probes: HashMap<(usize, Probe), HashSet<String>>,
    /// Routings the documents of routed indexes had in the row images.
    routings: SeenRoutings,
    changes: usize,
    bytes: usize,
    opened: Option<Instant>,
}

/// A batch's work, taken out for flushing.
#[derive(Default)]
pub struct Work {
    /// Writes taken straight from the stream.
    pub writes: Vec<DocWrite>,
    /// Per index: roots to rebuild.
    pub rebuild: HashMap<usize, RootKeys>,
    /// Per index and probe: values to resolve to roots first.
    pub probes: HashMap<(usize, Probe), HashSet<String>>,
    /// Routings seen, which complete the rebuilt documents of routed indexes.
    pub routings: SeenRoutings,
}

impl Batch {
    /// Adds a write, replacing an earlier write of the same document.
    pub fn push(&mut self, w: DocWrite) {
        self.bytes += w.weight();
        match self.slots.entry((w.index, w.id.clone(), w.routing.clone())) {
            Entry::Occupied(at) => self.writes[*at.get()] = w,
            Entry::Vacant(slot) => {
                slot.insert(self.writes.len());
                self.writes.push(w);
            }
        }
    }

    /// Asks for the document of root `key` of `index` to be rebuilt by query.
    pub fn rebuild(&mut self, index: usize, key: Vec<String>) {
        self.bytes += PENDING_KEY_BYTES;
        self.rebuild.entry(index).or_default().insert(key);
    }

    /// Notes that document `id` of routed index `index` had `routing` in a
    /// row image of this batch (see [`SeenRoutings`]).
    pub fn saw_routing(&mut self, index: usize, id: String, routing: Option<String>) {
        self.routings.note(index, id, routing);
    }

    /// Asks for the roots selected by `values` through `probe` to be rebuilt.
    pub fn probe(&mut self, index: usize, probe: Probe, values: Vec<String>) {
        self.bytes += PENDING_KEY_BYTES * values.len();
        self.probes
            .entry((index, probe))
            .or_default()
            .extend(values);
    }

    /// Counts one row change and starts the batch's clock.
    pub fn count_change(&mut self) {
        self.changes += 1;
        self.touch();
    }

    /// Starts the batch's clock if it is not running.
    pub fn touch(&mut self) {
        self.opened.get_or_insert_with(Instant::now);
    }

    /// When the first change or commit of this batch arrived.
    pub fn opened(&self) -> Option<Instant> {
        self.opened
    }

    /// True once the batch holds `max_changes` changes or `max_bytes` bytes.
    pub fn is_full(&self, max_changes: usize, max_bytes: usize) -> bool {
        self.changes >= max_changes || self.bytes >= max_bytes
    }

    /// Changes counted since the batch began.
    pub fn changes(&self) -> usize {
        self.changes
    }

    /// True when something is waiting to be written.
    pub fn has_work(&self) -> bool {
        !self.writes.is_empty() || !self.rebuild.is_empty() || !self.probes.is_empty()
    }

    /// Takes the work out; the change count and clock keep running until [`Batch::close`].
    pub fn take(&mut self) -> Work {
        self.slots.clear();
        self.bytes = 0;
        Work {
            writes: std::mem::take(&mut self.writes),
            rebuild: std::mem::take(&mut self.rebuild),
            probes: std::mem::take(&mut self.probes),
            routings: std::mem::take(&mut self.routings),
        }
    }

    /// Resets the change count and the clock: the next batch begins.
    pub fn close(&mut self) {
        self.changes = 0;
        self.opened = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::{DocOp, Lsn};

    fn write(id: &str, body: &str) -> DocWrite {
        DocWrite {
            index: 0,
            id: id.into(),
            version: Lsn(1),
            op: DocOp::Index(body.as_bytes().to_vec()),
            routing: None,
        }
    }

    #[test]
    fn keeps_only_the_last_write_per_document() {
        let mut b = Batch::default();
        b.push(write("1", "{\"a\":1}"));
        b.push(write("2", "{}"));
        b.push(write("1", "{\"a\":2}"));
        let work = b.take();
        assert_eq!(work.writes.len(), 2);
        assert_eq!(work.writes[0], write("1", "{\"a\":2}"));
        assert!(!b.has_work());
    }

    #[test]
    fn counts_bytes_until_taken() {
        let mut b = Batch::default();
        b.push(write("1", "{}"));
        b.rebuild(0, vec!["7".into()]);
        assert!(b.is_full(usize::MAX, 96 + 1 + 2 + 64));
        assert!(!b.is_full(usize::MAX, 96 + 1 + 2 + 65));
        let _ = b.take();
        assert!(!b.is_full(usize::MAX, 1));
    }
}
