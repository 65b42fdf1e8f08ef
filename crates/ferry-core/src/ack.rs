//! Which positions may be confirmed when work finishes out of order.
//!
//! # Acknowledgements
//!
//! A commit's end LSN enters [`Acks`] as *pending* when its `Commit` is
//! read. Closing a batch seals whatever is pending into a [`FlushTicket`]
//! numbered in stream order; the ticket travels with the batch's writes into
//! the sink and comes back only with a successful flush, and only
//! [`Acks::flushed`] turns a ticket into a position. Several batches may be
//! in flight and land in any order: a ticket yields a position only once
//! every ticket sealed before it has come back too, so the position
//! confirmed is always the newest commit of the *contiguous prefix* of
//! durable batches, never a commit with an earlier batch still out. A batch
//! cut before its transaction's `Commit` carries a ticket that confirms
//! nothing, so a transaction split across batches is confirmed by the batch
//! holding its commit (and only once the batches before it landed). A
//! keepalive's position is confirmable only when no transaction is open,
//! nothing is pending and no ticket is outstanding.
//!
//! # Reordering between requests
//!
//! Every write carries its transaction's commit LSN as an external version
//! (`external_gte`), so two writes of one document landing in the wrong
//! order end with the newer one, and a delete overtaken by an older write
//! of its document refuses that write (409) — except that the cluster
//! remembers a deleted document's version only for `index.gc_deletes`
//! (60 s by default). A delete must therefore never overtake an older write
//! of its document that is still in flight (its retries may last longer
//! than that). And two operations of one document with the *same* version
//! (one transaction split across batches: updated twice, or deleted and
//! inserted again) are ordered by nothing but their arrival, so a write
//! must not overtake an in-flight write or delete of the same version
//! either. [`Overtaking`] picks out
//! such operations. The rest of their batch is sent at once (sealed with
//! [`Acks::seal_part`]); the held operations keep the batch's own ticket and
//! follow once what they wait for has landed (or are dropped when a newer
//! batch operates on their document), so the batch's commit is confirmed
//! only when both parts are durable.
//!
//! [`InOrder`] is the rule underneath, also used by the backfill for its
//! checkpoints (chunks copied in parallel finish in any order).

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::doc::DocKey;
use crate::{DocOp, DocWrite, Lsn};

/// Work items numbered in issue order that complete in any order: tells
/// which completed items now form the contiguous prefix.
#[derive(Debug)]
pub struct InOrder<T> {
    /// Number of the next item issued.
    next: u64,
    /// Number of the first item not yet in the completed prefix.
    head: u64,
    /// Completed items waiting for an earlier one.
    done: BTreeMap<u64, T>,
}

impl<T> Default for InOrder<T> {
    fn default() -> Self {
        InOrder {
            next: 0,
            head: 0,
            done: BTreeMap::new(),
        }
    }
}

impl<T> InOrder<T> {
    /// Numbers a new item.
    pub fn issue(&mut self) -> u64 {
        let n = self.next;
        self.next += 1;
        n
    }

    /// Item `n` completed with `value`: returns, in issue order, the values
    /// of the items that joined the completed prefix (empty while an earlier
    /// item is still out).
    pub fn complete(&mut self, n: u64, value: T) -> Vec<T> {
        if n < self.head || n >= self.next {
            return Vec::new();
        }
        self.done.insert(n, value);
        let mut out = Vec::new();
        while let Some(v) = self.done.remove(&self.head) {
            out.push(v);
            self.head += 1;
        }
        out
    }

    /// Items issued and not yet in the completed prefix.
    pub fn outstanding(&self) -> u64 {
        self.next - self.head
    }
}

/// Which positions may be confirmed to PostgreSQL (see the module docs).
#[derive(Debug, Default)]
pub struct Acks {
    in_txn: bool,
    /// End LSN of the newest commit whose batch is not sealed yet.
    pending: Option<Lsn>,
    /// Tickets issued, in stream order, and which came back.
    tickets: InOrder<Option<Lsn>>,
}

/// A sealed batch's claim: redeemed by [`Acks::flushed`] once its flush succeeded.
#[derive(Debug)]
#[must_use = "a ticket confirms its commit only when redeemed after the flush"]
pub struct FlushTicket {
    seq: u64,
    commit: Option<Lsn>,
}

impl FlushTicket {
    /// True when the batch holds the last write of some transaction.
    pub fn completes_commit(&self) -> bool {
        self.commit.is_some()
    }

    /// The batch's number in stream order.
    pub fn seq(&self) -> u64 {
        self.seq
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
        FlushTicket {
            seq: self.tickets.issue(),
            commit: self.pending.take(),
        }
    }

    /// Seals a first part of the current batch, sent ahead of the rest: its
    /// ticket carries no commit, and the ticket sealed next (holding the
    /// rest) can only be confirmed once this one came back too.
    pub fn seal_part(&mut self) -> FlushTicket {
        FlushTicket {
            seq: self.tickets.issue(),
            commit: None,
        }
    }

    /// The batch of `ticket` is durable: the position that may be confirmed
    /// now — the newest commit among the batches that, with this one, form
    /// the durable prefix — or `None` while an earlier batch is still out.
    pub fn flushed(&mut self, ticket: FlushTicket) -> Option<Lsn> {
        self.tickets
            .complete(ticket.seq, ticket.commit)
            .into_iter()
            .flatten()
            .last()
    }

    /// A keepalive's position, confirmable only when nothing is pending.
    pub fn keepalive(&self, wal_end: Lsn) -> Option<Lsn> {
        (!self.in_txn && self.pending.is_none() && self.tickets.outstanding() == 0)
            .then_some(wal_end)
    }
}

/// The document operations in flight, so that an operation that must not
/// overtake an older one of its document is held back (see the module
/// docs): a delete waits for any write of its document, a write for any
/// operation of the same version (one transaction split across batches).
#[derive(Debug, Default)]
pub struct Overtaking {
    /// (index position, document id, routing) → its operations in flight.
    ops: HashMap<Owned, Vec<Flying>>,
    /// Flush number → the documents it carries.
    flights: HashMap<u64, Vec<Owned>>,
}

/// A [`crate::doc::DocKey`] that owns its strings.
type Owned = (usize, String, Option<String>);

fn owned(w: &DocWrite) -> Owned {
    (w.index, w.id.clone(), w.routing.clone())
}

/// One operation in flight.
#[derive(Debug)]
struct Flying {
    flush: u64,
    /// Ticket number of the batch the operation came from.
    origin: u64,
    delete: bool,
    version: Lsn,
}

impl Overtaking {
    /// Flush `flush` (a number no other flush has) was sent carrying `ops`,
    /// each with the ticket number of the batch it came from.
    pub fn sent<'a>(&mut self, flush: u64, ops: impl IntoIterator<Item = (u64, &'a DocWrite)>) {
        let mut keys = Vec::new();
        for (origin, w) in ops {
            let key = owned(w);
            self.ops.entry(key.clone()).or_default().push(Flying {
                flush,
                origin,
                delete: w.op == DocOp::Delete,
                version: w.version,
            });
            keys.push(key);
        }
        if !keys.is_empty() {
            self.flights.insert(flush, keys);
        }
    }

    /// Flush `flush` landed (or failed: nothing waits for it then).
    pub fn landed(&mut self, flush: u64) {
        for key in self.flights.remove(&flush).unwrap_or_default() {
            if let Some(v) = self.ops.get_mut(&key) {
                v.retain(|f| f.flush != flush);
                if v.is_empty() {
                    self.ops.remove(&key);
                }
            }
        }
    }

    /// True when `w`, from the batch numbered `origin`, must wait for an
    /// operation in flight from an older batch: a delete for any write of
    /// its document, a write for a write or delete of its document with the
    /// same version (versions cannot order those two).
    pub fn holds(&self, w: &DocWrite, origin: u64) -> bool {
        let Some(flying) = self.ops.get(&owned(w)) else {
            return false;
        };
        let delete = w.op == DocOp::Delete;
        flying.iter().any(|f| {
            f.origin < origin
                && match (delete, f.delete) {
                    (true, false) => true,
                    (false, _) => f.version >= w.version,
                    (true, true) => false,
                }
        })
    }

    /// Splits a new batch's `writes` into what may be sent now and what
    /// must wait for an operation in flight (every batch out is older).
    pub fn split(&self, writes: Vec<DocWrite>) -> (Vec<DocWrite>, Vec<DocWrite>) {
        if self.ops.is_empty() {
            return (writes, Vec::new());
        }
        writes.into_iter().partition(|w| !self.holds(w, u64::MAX))
    }
}

/// Keeps only the last operation per document of a batch's `writes` (in
/// stream order, the last one is the newest state: a rebuild reads the
/// current rows), so no two operations of one document ever share a request.
pub fn last_per_document(writes: Vec<DocWrite>) -> Vec<DocWrite> {
    let mut last: HashMap<DocKey<'_>, usize> = HashMap::with_capacity(writes.len());
    for (i, w) in writes.iter().enumerate() {
        last.insert(w.key(), i);
    }
    if last.len() == writes.len() {
        return writes;
    }
    let keep: HashSet<usize> = last.into_values().collect();
    writes
        .into_iter()
        .enumerate()
        .filter(|(i, _)| keep.contains(i))
        .map(|(_, w)| w)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_yields_only_the_contiguous_prefix() {
        let mut o = InOrder::default();
        let (a, b, c) = (o.issue(), o.issue(), o.issue());
        assert_eq!(o.complete(c, 'c'), Vec::<char>::new());
        assert_eq!(o.complete(b, 'b'), Vec::<char>::new());
        assert_eq!(o.outstanding(), 3);
        assert_eq!(o.complete(a, 'a'), vec!['a', 'b', 'c']);
        assert_eq!(o.outstanding(), 0);
        assert_eq!(o.complete(a, 'x'), Vec::<char>::new(), "no item twice");
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
    fn a_later_batch_landing_first_confirms_nothing_until_the_earlier_one_lands() {
        let mut acks = Acks::default();
        acks.begin();
        acks.pending(Lsn(10));
        let first = acks.seal();
        acks.begin();
        acks.pending(Lsn(20));
        let second = acks.seal();
        acks.begin();
        acks.pending(Lsn(30));
        let third = acks.seal();
        assert_eq!(acks.flushed(third), None, "10 and 20 are still out");
        assert_eq!(acks.flushed(second), None, "10 is still out");
        assert_eq!(acks.keepalive(Lsn(40)), None);
        assert_eq!(acks.flushed(first), Some(Lsn(30)), "the whole prefix");
        assert_eq!(acks.keepalive(Lsn(40)), Some(Lsn(40)));
    }

    #[test]
    fn the_prefix_confirms_its_newest_commit_even_when_the_last_batch_has_none() {
        let mut acks = Acks::default();
        acks.begin();
        acks.pending(Lsn(10));
        let first = acks.seal();
        acks.begin();
        let split = acks.seal(); // a transaction cut before its commit
        assert_eq!(acks.flushed(split), None);
        assert_eq!(acks.flushed(first), Some(Lsn(10)));
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

    fn write(id: &str) -> DocWrite {
        DocWrite {
            index: 0,
            id: id.into(),
            version: Lsn(1),
            op: DocOp::Index(b"{}".to_vec()),
            routing: None,
        }
    }

    fn delete(id: &str) -> DocWrite {
        DocWrite {
            index: 0,
            id: id.into(),
            version: Lsn(2),
            op: DocOp::Delete,
            routing: None,
        }
    }

    #[test]
    fn a_delete_never_overtakes_an_in_flight_write_of_its_document() {
        let mut o = Overtaking::default();
        let (w1, d9) = (write("1"), delete("9"));
        o.sent(3, [(3, &w1), (3, &d9)]);
        let (now, held) = o.split(vec![write("2"), delete("1"), delete("2")]);
        assert_eq!(ids(&now), ["2", "2"], "the rest of the batch goes at once");
        assert_eq!(ids(&held), ["1"], "only the conflicting delete waits");
        assert!(
            !o.holds(&at(write("1"), 5), u64::MAX),
            "a newer write may overtake"
        );
        assert!(
            !o.holds(&delete("9"), u64::MAX),
            "deletes do not block deletes"
        );
        assert!(
            !o.holds(&delete("1"), 3),
            "an operation waits only for batches older than its own"
        );
        assert!(o.holds(&delete("1"), 4));
        o.landed(3);
        assert!(!o.holds(&delete("1"), u64::MAX));
        assert!(o.split(vec![delete("1")]).1.is_empty());
    }

    #[test]
    fn a_write_never_overtakes_an_in_flight_delete_of_the_same_version() {
        let mut o = Overtaking::default();
        let gone = at(delete("1"), 7);
        o.sent(0, [(0, &gone)]);
        assert!(
            o.holds(&at(write("1"), 7), 1),
            "same transaction: order unknown to the cluster"
        );
        assert!(
            !o.holds(&at(write("1"), 8), 1),
            "a newer write wins by its version"
        );
        o.landed(0);
        assert!(!o.holds(&at(write("1"), 7), 1));
    }

    #[test]
    fn a_write_never_overtakes_an_in_flight_write_of_the_same_version() {
        let mut o = Overtaking::default();
        let first = at(write("1"), 7);
        o.sent(0, [(0, &first)]);
        assert!(
            o.holds(&at(write("1"), 7), 1),
            "one transaction updating a document twice across batches: the cluster keeps whichever lands last"
        );
        assert!(
            !o.holds(&at(write("1"), 8), 1),
            "a newer write wins by its version"
        );
        o.landed(0);
        assert!(!o.holds(&at(write("1"), 7), 1));
    }

    #[test]
    fn only_the_last_operation_of_a_document_in_a_batch_is_kept() {
        let kept = last_per_document(vec![delete("1"), write("2"), write("1")]);
        assert_eq!(ids(&kept), ["2", "1"]);
        assert_eq!(kept[1].op, DocOp::Index(b"{}".to_vec()));
    }

    #[test]
    fn one_id_under_two_routings_is_two_documents() {
        // A routing move in one batch: the copy at "a" goes, "b" is written.
        let moved = vec![routed(delete("1"), "a"), routed(write("1"), "b")];
        assert_eq!(last_per_document(moved.clone()), moved, "both are kept");
        let mut o = Overtaking::default();
        o.sent(0, [(0, &routed(write("1"), "b"))]);
        assert!(
            !o.holds(&routed(delete("1"), "a"), 1),
            "the write in flight is another document"
        );
        assert!(o.holds(&routed(delete("1"), "b"), 1));
    }

    #[test]
    fn a_batch_sent_in_two_parts_confirms_only_when_both_landed() {
        let mut acks = Acks::default();
        acks.begin();
        acks.pending(Lsn(10));
        let first = acks.seal_part();
        let rest = acks.seal();
        acks.begin();
        acks.pending(Lsn(20));
        let next = acks.seal();
        assert_eq!(
            acks.flushed(first),
            None,
            "the commit travels with the rest"
        );
        assert_eq!(acks.flushed(next), None, "an earlier part is still out");
        assert_eq!(acks.flushed(rest), Some(Lsn(20)));
    }

    fn at(mut w: DocWrite, version: u64) -> DocWrite {
        w.version = Lsn(version);
        w
    }

    fn routed(mut w: DocWrite, routing: &str) -> DocWrite {
        w.routing = Some(routing.into());
        w
    }

    fn ids(writes: &[DocWrite]) -> Vec<&str> {
        writes.iter().map(|w| w.id.as_str()).collect()
    }
}
