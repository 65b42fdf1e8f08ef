//! What the worker gathers between two flushes, and the rule that turns
//! finished flushes into positions PostgreSQL may forget.
//!
//! # Acknowledgements
//!
//! A commit's end LSN enters [`Acks`] as *pending* when its `Commit` is
//! read. Closing a batch seals whatever is pending into a [`FlushTicket`];
//! the ticket travels with the batch's writes into the sink and comes back
//! only with a successful flush, and only [`Acks::flushed`] turns a ticket
//! into a position. A batch cut before its transaction's `Commit` carries a
//! ticket that confirms nothing, so a transaction split across batches is
//! confirmed by the batch holding its commit. A keepalive's position is
//! confirmable only when no transaction is open, nothing is pending and no
//! ticket is outstanding.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

use ferry_core::plan::Probe;
use ferry_core::{DocWrite, Lsn};

/// Root keys (primary-key texts) of documents to rebuild from the database.
pub type RootKeys = HashSet<Vec<String>>;

/// Bytes a root key or probe value is counted for until it is resolved.
const PENDING_KEY_BYTES: usize = 64;

/// Document writes and rebuild requests collected since the last flush.
/// Only the last write per document is kept.
#[derive(Default)]
pub struct Batch {
    /// (index, document id) → position in `writes`.
    slots: HashMap<(usize, String), usize>,
    writes: Vec<DocWrite>,
    /// Per index: roots whose documents are rebuilt by query.
    rebuild: HashMap<usize, RootKeys>,
    /// Per index and probe: values selecting parent rows whose roots are rebuilt.
    probes: HashMap<(usize, Probe), HashSet<String>>,
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
}

impl Batch {
    /// Adds a write, replacing an earlier write of the same document.
    pub fn push(&mut self, w: DocWrite) {
        self.bytes += w.weight();
        match self.slots.entry((w.index, w.id.clone())) {
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
        }
    }

    /// Resets the change count and the clock: the next batch begins.
    pub fn close(&mut self) {
        self.changes = 0;
        self.opened = None;
    }
}

/// Which positions may be confirmed to PostgreSQL (see the module docs).
#[derive(Debug, Default)]
pub struct Acks {
    in_txn: bool,
    /// End LSN of the newest commit whose batch is not sealed yet.
    pending: Option<Lsn>,
    /// Tickets issued and not yet redeemed.
    outstanding: usize,
}

/// A sealed batch's claim: redeemed by [`Acks::flushed`] once its flush succeeded.
#[derive(Debug)]
#[must_use = "a ticket confirms its commit only when redeemed after the flush"]
pub struct FlushTicket {
    commit: Option<Lsn>,
}

impl FlushTicket {
    /// True when the batch holds the last write of some transaction.
    pub fn completes_commit(&self) -> bool {
        self.commit.is_some()
    }
}

impl Acks {
    /// A transaction began.
    pub fn begin(&mut self) {
        self.in_txn = true;
    }

    /// A transaction's `Commit` was batched: `end_lsn` becomes pending.
    pub fn pending(&mut self, end_lsn: Lsn) {
        self.in_txn = false;
        self.pending = Some(end_lsn);
    }

    /// True when a commit waits for its batch to be sealed.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Seals the current batch: its ticket carries the pending commit, if any.
    pub fn seal(&mut self) -> FlushTicket {
        self.outstanding += 1;
        FlushTicket {
            commit: self.pending.take(),
        }
    }

    /// The batch of `ticket` is durable: the position it lets us confirm.
    pub fn flushed(&mut self, ticket: FlushTicket) -> Option<Lsn> {
        self.outstanding = self.outstanding.saturating_sub(1);
        ticket.commit
    }

    /// A keepalive's position, confirmable only when nothing is pending.
    pub fn keepalive(&self, wal_end: Lsn) -> Option<Lsn> {
        (!self.in_txn && self.pending.is_none() && self.outstanding == 0).then_some(wal_end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::DocOp;

    fn write(id: &str, body: &str) -> DocWrite {
        DocWrite {
            index: 0,
            id: id.into(),
            version: Lsn(1),
            op: DocOp::Index(body.as_bytes().to_vec()),
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

    #[test]
    fn a_ticket_without_a_commit_confirms_nothing() {
        let mut acks = Acks::default();
        acks.begin();
        let first = acks.seal();
        acks.pending(Lsn(10));
        let second = acks.seal();
        assert_eq!(acks.flushed(first), None);
        assert_eq!(acks.flushed(second), Some(Lsn(10)));
    }

    #[test]
    fn keepalives_wait_for_open_transactions_pending_commits_and_outstanding_tickets() {
        let mut acks = Acks::default();
        assert_eq!(acks.keepalive(Lsn(5)), Some(Lsn(5)));
        acks.begin();
        assert_eq!(acks.keepalive(Lsn(6)), None);
        acks.pending(Lsn(7));
        assert_eq!(acks.keepalive(Lsn(8)), None);
        let t = acks.seal();
        assert_eq!(acks.keepalive(Lsn(9)), None);
        assert_eq!(acks.flushed(t), Some(Lsn(7)));
        assert_eq!(acks.keepalive(Lsn(10)), Some(Lsn(10)));
    }
}
