//! The worker's rules against in-memory fakes of its seams: acks, batches
//! split inside a transaction, TOAST refill, poison documents, failed flushes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use ferry_config::Config;
use ferry_core::change::ChangeOp;
use ferry_core::plan::{Link, Probe};
use ferry_core::schema::doc_id;
use ferry_core::stats::Stats;
use ferry_core::{DocOp, DocWrite, Lsn, TypeKind};
use ferry_opensearch::{BulkOutcome, DeadLetter, Rejected, SinkError};
use tokio::sync::Semaphore;

use super::flat::Projection;
use super::pipeline::Pipeline;
use super::route::tests::{change, index, node, relation, shape};
use super::seams::{DocSink, RowSource};
use crate::EngineError;

/// What happened, in order: flushes, dead letters, confirmations.
type Log = Arc<Mutex<Vec<String>>>;

/// A body text and the gate flushes of such bodies wait at.
type Hold = (String, Arc<Semaphore>);

/// Refuses (400) every document whose body contains `bad`; can fail whole
/// flushes or hold them until the test releases a permit.
#[derive(Clone, Default)]
struct FakeSink {
    log: Log,
    flushed: Arc<Mutex<Vec<Vec<DocWrite>>>>,
    fail: Arc<Mutex<bool>>,
    gate: Option<Arc<Semaphore>>,
    /// Holds every flush with a document body containing this text (or,
    /// for `delete ID`, deleting that document) until a permit is added.
    hold: Arc<Mutex<Option<Hold>>>,
}

impl DocSink for FakeSink {
    async fn write(&self, writes: &[DocWrite]) -> Result<BulkOutcome, SinkError> {
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate open").forget();
        }
        let held = self.hold.lock().unwrap().clone();
        if let Some((needle, gate)) = held {
            let holds = |w: &DocWrite| match &w.op {
                DocOp::Index(b) => b.windows(needle.len()).any(|x| x == needle.as_bytes()),
                DocOp::Delete => needle == format!("delete {}", w.id),
            };
            if writes.iter().any(holds) {
                gate.acquire().await.expect("gate open").forget();
            }
        }
        if *self.fail.lock().unwrap() {
            return Err(SinkError::Unreachable {
                url: "fake".into(),
                reason: "down".into(),
            });
        }
        let ids: Vec<&str> = writes.iter().map(|w| w.id.as_str()).collect();
        self.log.lock().unwrap().push(format!("flush {ids:?}"));
        self.flushed.lock().unwrap().push(writes.to_vec());
        let rejected = writes
            .iter()
            .filter(|w| matches!(&w.op, DocOp::Index(b) if b.windows(3).any(|x| x == b"bad")))
            .map(|w| Rejected {
                write: w.clone(),
                status: 400,
                reason: "mapper_parsing_exception: bad".into(),
            })
            .collect();
        Ok(BulkOutcome {
            rejected,
            ..Default::default()
        })
    }

    async fn store_dead_letters(&self, letters: &[(usize, DeadLetter)]) -> Result<(), SinkError> {
        for (_, l) in letters {
            self.log
                .lock()
                .unwrap()
                .push(format!("dead letter {}", l.id));
        }
        Ok(())
    }
}

/// Current rows by (index, document id) → document body; probes resolve
/// to their values as single-column keys.
#[derive(Clone, Default)]
struct FakeRows {
    rows: Arc<Mutex<HashMap<(usize, String), String>>>,
    /// The routing of a row's document (none when absent).
    routings: Arc<Mutex<HashMap<(usize, String), String>>>,
    built: Arc<Mutex<Vec<Vec<String>>>>,
}

impl RowSource for FakeRows {
    async fn resolve(
        &mut self,
        _index: usize,
        _probe: &Probe,
        values: HashSet<String>,
    ) -> Result<Vec<Vec<String>>, EngineError> {
        Ok(values.into_iter().map(|v| vec![v]).collect())
    }

    async fn build(
        &mut self,
        index: usize,
        keys: &[Vec<String>],
        version: Lsn,
        out: &mut Vec<DocWrite>,
    ) -> Result<(), EngineError> {
        let rows = self.rows.lock().unwrap();
        for key in keys {
            let parts: Vec<&[u8]> = key.iter().map(|p| p.as_bytes()).collect();
            let id = doc_id(&parts);
            self.built.lock().unwrap().push(key.clone());
            let op = match rows.get(&(index, id.clone())) {
                Some(body) => DocOp::Index(body.clone().into_bytes()),
                None => DocOp::Delete,
            };
            let routing = match op {
                DocOp::Index(_) => self
                    .routings
                    .lock()
                    .unwrap()
                    .get(&(index, id.clone()))
                    .cloned(),
                DocOp::Delete => None,
            };
            out.push(DocWrite {
                index,
                id,
                version,
                op,
                routing,
            });
        }
        Ok(())
    }
}

struct Harness {
    pipeline: Pipeline<FakeSink, FakeRows>,
    log: Log,
    sink: FakeSink,
    rows: FakeRows,
    stats: Arc<Stats>,
}

impl Harness {
    /// One flat index over `events(id, body)` (OID 20), with `on_poison`
    /// and `max_batch_changes` as given; `held` makes flushes wait for permits.
    fn new(on_poison: &str, max_changes: usize, held: bool) -> Harness {
        Harness::in_flight(on_poison, max_changes, held, 1)
    }

    /// Like [`Harness::new`], with `engine.max_in_flight_bulks = in_flight`.
    fn in_flight(on_poison: &str, max_changes: usize, held: bool, in_flight: usize) -> Harness {
        let cfg = Config::from_toml(&format!(
            "[source]\nurl = \"postgres://ferry@127.0.0.1:5432/app\"\nslot = \"s\"\npublication = \"p\"\n\
             [sink]\nurl = \"http://127.0.0.1:9200\"\n\
             [engine]\nmax_batch_changes = {max_changes}\nmax_in_flight_bulks = {in_flight}\n\
             [[index]]\nname = \"events\"\ntable = \"events\"\non_poison = \"{on_poison}\"\n"
        ))
        .expect("test config");
        let events = shape("events", 20, &["id", "body"]);
        let flat = index(0, node("", events.clone(), Link::Root), true);
        let log: Log = Arc::default();
        let sink = FakeSink {
            log: log.clone(),
            flushed: Arc::default(),
            fail: Arc::default(),
            gate: held.then(|| Arc::new(Semaphore::new(0))),
            hold: Arc::default(),
        };
        let rows = FakeRows::default();
        let confirmed = log.clone();
        let stats = Arc::new(Stats::default());
        let mut pipeline = Pipeline::new(
            sink.clone(),
            rows.clone(),
            std::slice::from_ref(&flat),
            &cfg,
            stats.clone(),
            Box::new(move |lsn| confirmed.lock().unwrap().push(format!("confirm {}", lsn.0))),
        );
        let rel = relation(&events);
        let projection = Projection::new(0, &events, None, &rel, |_| TypeKind::Text).unwrap();
        pipeline.set_relation(rel, vec![projection]);
        Harness {
            pipeline,
            log,
            sink,
            rows,
            stats,
        }
    }

    async fn insert(&mut self, id: &str, body: &str) {
        let c = change(20, ChangeOp::Insert, None, Some(&[id, body]));
        self.pipeline.change(c).unwrap();
        self.pipeline.step().await.unwrap();
    }

    async fn commit(&mut self, end: u64) {
        self.pipeline.commit(Lsn(end), 0);
        self.pipeline.step().await.unwrap();
    }

    /// One transaction (final LSN `begin`, end `end`) inserting `ids` with
    /// `body`, dispatched as a batch of its own.
    async fn send_transaction(&mut self, begin: u64, ids: &[&str], body: &str, end: u64) {
        self.pipeline.begin(Lsn(begin));
        for id in ids {
            self.insert(id, body).await;
        }
        self.commit(end).await;
        self.pipeline.dispatch().await.unwrap();
    }

    /// Waits for the flush in flight and handles its outcome.
    async fn land(&mut self) -> Result<(), EngineError> {
        let r = self.pipeline.flush_done().await;
        self.pipeline.flush_finished(r).await
    }

    /// Holds flushes of a document body containing `needle` until the
    /// returned gate gets a permit.
    fn hold(&self, needle: &str) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        *self.sink.hold.lock().unwrap() = Some((needle.to_string(), gate.clone()));
        gate
    }

    fn release(&self) {
        self.sink.gate.as_ref().expect("held sink").add_permits(1);
    }

    fn confirmed(&self) -> Vec<u64> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix("confirm ")?.parse().ok())
            .collect()
    }
}

#[tokio::test]
async fn a_batch_confirms_only_after_its_flush() {
    let mut h = Harness::new("skip", 1000, true);
    h.pipeline.begin(Lsn(90));
    h.insert("1", "a").await;
    h.commit(100).await;
    h.pipeline.dispatch().await.unwrap();
    tokio::task::yield_now().await;
    assert!(
        h.confirmed().is_empty(),
        "confirmed before the flush landed"
    );
    h.release();
    h.land().await.unwrap();
    assert_eq!(
        *h.log.lock().unwrap(),
        ["flush [\"1\"]", "confirm 100"],
        "the confirmation follows the flush"
    );
}

#[tokio::test]
async fn a_transaction_split_across_batches_is_confirmed_by_the_batch_holding_its_commit() {
    let mut h = Harness::new("skip", 2, false);
    h.pipeline.begin(Lsn(290));
    h.insert("1", "a").await;
    h.insert("2", "b").await; // full: the first half goes without its commit
    h.land().await.unwrap();
    assert!(h.confirmed().is_empty());
    h.insert("3", "c").await;
    h.commit(300).await;
    assert!(
        h.confirmed().is_empty(),
        "the commit's batch is not flushed yet"
    );
    h.pipeline.dispatch().await.unwrap();
    h.land().await.unwrap();
    assert_eq!(h.confirmed(), [300]);
    let flushed = h.sink.flushed.lock().unwrap();
    assert_eq!(flushed.len(), 2);
    assert!(flushed.iter().flatten().all(|w| w.version == Lsn(290)));
}

#[tokio::test]
async fn keepalives_confirm_only_when_nothing_is_pending() {
    let mut h = Harness::new("skip", 1000, true);
    h.pipeline.keepalive(Lsn(10));
    assert_eq!(h.confirmed(), [10], "an idle worker confirms keepalives");
    h.pipeline.begin(Lsn(20));
    h.pipeline.keepalive(Lsn(21));
    h.insert("1", "a").await;
    h.pipeline.keepalive(Lsn(22));
    h.commit(30).await;
    h.pipeline.keepalive(Lsn(31));
    h.pipeline.dispatch().await.unwrap();
    h.pipeline.keepalive(Lsn(32));
    assert_eq!(
        h.confirmed(),
        [10],
        "nothing confirmed while a write is pending"
    );
    h.release();
    h.land().await.unwrap();
    h.pipeline.keepalive(Lsn(40));
    assert_eq!(h.confirmed(), [10, 30, 40]);
}

#[tokio::test]
async fn a_commit_without_writes_is_confirmed_at_once() {
    let mut h = Harness::new("skip", 1000, false);
    h.pipeline.begin(Lsn(50));
    h.commit(60).await;
    assert_eq!(h.confirmed(), [60]);
    assert!(h.sink.flushed.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_failed_flush_confirms_nothing() {
    let mut h = Harness::new("skip", 1000, false);
    *h.sink.fail.lock().unwrap() = true;
    h.pipeline.begin(Lsn(70));
    h.insert("1", "a").await;
    h.commit(80).await;
    h.pipeline.dispatch().await.unwrap();
    assert!(h.land().await.is_err());
    h.pipeline.keepalive(Lsn(90));
    assert!(h.confirmed().is_empty());
}

#[tokio::test]
async fn unchanged_toast_values_are_refilled_from_the_row() {
    let mut h = Harness::new("skip", 1000, false);
    let id = doc_id(&[b"7"]);
    h.rows
        .rows
        .lock()
        .unwrap()
        .insert((0, id.clone()), "{\"id\":\"7\",\"body\":\"long\"}".into());
    h.pipeline.begin(Lsn(110));
    let update = change(20, ChangeOp::Update, None, Some(&["7", "\\u"]));
    h.pipeline.change(update).unwrap();
    h.commit(120).await;
    h.pipeline.dispatch().await.unwrap();
    h.land().await.unwrap();
    assert_eq!(*h.rows.built.lock().unwrap(), [vec!["7".to_string()]]);
    let flushed = h.sink.flushed.lock().unwrap();
    assert_eq!(
        flushed[0],
        [DocWrite {
            index: 0,
            id,
            version: Lsn(110),
            op: DocOp::Index(b"{\"id\":\"7\",\"body\":\"long\"}".to_vec()),
            routing: None,
        }]
    );
    assert_eq!(h.confirmed(), [120]);
}

/// Inserts a document the sink refuses; the row still holds `row_body`.
async fn poison(on_poison: &str, row_body: &str) -> (Harness, Result<(), EngineError>) {
    let mut h = Harness::new(on_poison, 1000, false);
    h.rows
        .rows
        .lock()
        .unwrap()
        .insert((0, doc_id(&[b"9"])), row_body.into());
    h.pipeline.begin(Lsn(200));
    h.insert("9", "bad").await;
    h.commit(210).await;
    h.pipeline.dispatch().await.unwrap();
    let r = h.land().await;
    (h, r)
}

#[tokio::test]
async fn a_poison_document_is_stored_as_a_dead_letter_before_its_batch_is_confirmed() {
    let (h, r) = poison("dead_letter", "{\"body\":\"still bad\"}").await;
    r.unwrap();
    let log = h.log.lock().unwrap().clone();
    assert_eq!(log[2..], ["dead letter 9", "confirm 210"]);
}

#[tokio::test]
async fn a_poison_document_is_skipped_under_skip_and_the_batch_confirmed() {
    let (h, r) = poison("skip", "{\"body\":\"still bad\"}").await;
    r.unwrap();
    assert!(!h.log.lock().unwrap().iter().any(|l| l.starts_with("dead")));
    assert_eq!(h.confirmed(), [210]);
}

#[tokio::test]
async fn a_poison_document_stops_the_worker_under_stop_and_confirms_nothing() {
    let (h, r) = poison("stop", "{\"body\":\"still bad\"}").await;
    assert!(matches!(
        r,
        Err(EngineError::Sink(SinkError::Poison { status: 400, .. }))
    ));
    assert!(h.confirmed().is_empty());
}

#[tokio::test]
async fn a_poison_document_whose_row_was_fixed_heals_on_its_rebuild() {
    let (h, r) = poison("stop", "{\"body\":\"fixed\"}").await;
    r.unwrap();
    let flushed = h.sink.flushed.lock().unwrap();
    assert_eq!(flushed.len(), 2, "the first write, then the rebuilt one");
    assert_eq!(flushed[1][0].version, Lsn(200));
    assert_eq!(h.confirmed(), [210]);
}

#[tokio::test]
async fn a_later_batch_landing_first_confirms_nothing_until_the_earlier_one_lands() {
    let mut h = Harness::in_flight("skip", 1000, false, 4);
    let gate = h.hold("held");
    h.send_transaction(90, &["1"], "held", 100).await;
    h.pipeline.begin(Lsn(110));
    h.insert("1", "b").await;
    h.insert("2", "b").await;
    h.commit(120).await;
    // The same document again: a newer write may overtake the held one.
    h.pipeline.dispatch().await.unwrap();
    h.land().await.unwrap();
    assert_eq!(
        *h.log.lock().unwrap(),
        ["flush [\"1\", \"2\"]"],
        "the later batch landed first and confirmed nothing"
    );
    gate.add_permits(1);
    h.land().await.unwrap();
    assert_eq!(
        h.confirmed(),
        [120],
        "both commits, once the earlier batch landed"
    );
    let flushed = h.sink.flushed.lock().unwrap();
    assert_eq!(flushed[0][0].version, Lsn(110));
    assert_eq!(flushed[1][0].version, Lsn(90));
}

#[tokio::test]
async fn a_delete_waits_for_an_in_flight_write_of_its_document_while_the_rest_of_its_batch_goes() {
    let mut h = Harness::in_flight("skip", 1000, false, 4);
    let gate = h.hold("held");
    h.send_transaction(90, &["1"], "held", 100).await;
    h.pipeline.begin(Lsn(110));
    let delete = change(20, ChangeOp::Delete, Some(&["1", "held"]), None);
    h.pipeline.change(delete).unwrap();
    h.insert("2", "b").await;
    h.commit(120).await;
    tokio::time::timeout(std::time::Duration::from_secs(5), h.pipeline.dispatch())
        .await
        .expect("the batch was sent without waiting for the held write")
        .unwrap();
    h.land().await.unwrap();
    assert_eq!(
        *h.log.lock().unwrap(),
        ["flush [\"2\"]"],
        "the rest of the batch went at once and confirmed nothing"
    );
    assert!(!h.pipeline.is_idle(), "a held delete is pending work");
    gate.add_permits(1);
    h.land().await.unwrap();
    h.land().await.unwrap();
    assert_eq!(
        *h.log.lock().unwrap(),
        [
            "flush [\"2\"]",
            "flush [\"1\"]",
            "confirm 100",
            "flush [\"1\"]",
            "confirm 120"
        ],
        "the delete was sent only after the write it would overtake landed, \
         and its commit confirmed only after the delete landed"
    );
    let flushed = h.sink.flushed.lock().unwrap();
    assert_eq!(flushed[2][0].op, DocOp::Delete);
    assert_eq!(flushed[2][0].version, Lsn(110));
}

#[tokio::test]
async fn held_deletes_ride_with_the_next_batch_and_a_newer_write_of_their_document_replaces_them() {
    let mut h = Harness::in_flight("skip", 1000, false, 4);
    let gate = h.hold("held");
    h.send_transaction(90, &["1", "3"], "held", 100).await;
    h.pipeline.begin(Lsn(110));
    for id in ["1", "3"] {
        let delete = change(20, ChangeOp::Delete, Some(&[id, "held"]), None);
        h.pipeline.change(delete).unwrap();
    }
    h.commit(120).await;
    h.pipeline.dispatch().await.unwrap();
    // The next batch fills while the write they wait for is out: once it
    // landed, the deletes ride with that batch, except the one its newer
    // write of document 3 makes moot.
    h.pipeline.begin(Lsn(130));
    h.insert("3", "c").await;
    h.commit(140).await;
    gate.add_permits(1);
    h.land().await.unwrap();
    assert_eq!(h.confirmed(), [100]);
    h.pipeline.dispatch().await.unwrap();
    h.land().await.unwrap();
    assert_eq!(h.confirmed(), [100, 140]);
    let flushed = h.sink.flushed.lock().unwrap();
    assert_eq!(
        flushed.len(),
        2,
        "the held deletes took no request of their own"
    );
    let last: Vec<(&str, bool)> = flushed[1]
        .iter()
        .map(|w| (w.id.as_str(), w.op == DocOp::Delete))
        .collect();
    assert_eq!(last, [("3", false), ("1", true)]);
}

#[tokio::test]
async fn a_held_delete_is_dropped_when_its_transaction_writes_the_document_again() {
    let mut h = Harness::in_flight("skip", 1000, false, 4);
    let gate = h.hold("held");
    h.send_transaction(90, &["1"], "held", 100).await;
    // One transaction deletes document 1 and inserts it again, cut into
    // two batches between the two: the delete is held behind the write in
    // flight, the insert (same version) goes at once.
    h.pipeline.begin(Lsn(110));
    let delete = change(20, ChangeOp::Delete, Some(&["1", "held"]), None);
    h.pipeline.change(delete).unwrap();
    h.pipeline.dispatch().await.unwrap();
    h.insert("1", "again").await;
    h.commit(120).await;
    h.pipeline.dispatch().await.unwrap();
    h.land().await.unwrap();
    gate.add_permits(1);
    h.pipeline.settle().await.unwrap();
    let flushed: Vec<(String, Lsn, bool)> = h
        .sink
        .flushed
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .map(|w| (w.id.clone(), w.version, w.op == DocOp::Delete))
        .collect();
    assert_eq!(
        flushed,
        [("1".into(), Lsn(110), false), ("1".into(), Lsn(90), false)],
        "the held delete never followed the newer insert of its document"
    );
    assert_eq!(h.confirmed(), [120]);
}

#[tokio::test]
async fn a_write_waits_for_an_in_flight_delete_of_the_same_version() {
    let mut h = Harness::in_flight("skip", 1000, false, 4);
    let gate = h.hold("delete 1");
    h.pipeline.begin(Lsn(110));
    let delete = change(20, ChangeOp::Delete, Some(&["1", "a"]), None);
    h.pipeline.change(delete).unwrap();
    // The batch is cut inside the transaction: the delete is in flight ...
    h.pipeline.dispatch().await.unwrap();
    // ... when the same transaction inserts the document again.
    h.insert("1", "b").await;
    h.commit(120).await;
    h.pipeline.dispatch().await.unwrap();
    let early = tokio::time::timeout(std::time::Duration::from_millis(100), h.land()).await;
    assert!(early.is_err(), "nothing lands while the delete is held up");
    gate.add_permits(1);
    h.land().await.unwrap();
    assert!(h.confirmed().is_empty(), "the insert is not durable yet");
    h.land().await.unwrap();
    assert_eq!(
        *h.log.lock().unwrap(),
        ["flush [\"1\"]", "flush [\"1\"]", "confirm 120"],
    );
    let flushed = h.sink.flushed.lock().unwrap();
    assert_eq!(flushed[0][0].op, DocOp::Delete);
    assert_eq!(flushed[1][0].version, Lsn(110));
    assert!(matches!(flushed[1][0].op, DocOp::Index(_)));
}

#[tokio::test]
async fn a_write_waits_for_an_in_flight_write_of_the_same_version() {
    let mut h = Harness::in_flight("skip", 1000, false, 4);
    let gate = h.hold("first");
    h.pipeline.begin(Lsn(110));
    h.insert("1", "first").await;
    // The batch is cut inside the transaction: the first write is in flight ...
    h.pipeline.dispatch().await.unwrap();
    // ... when the same transaction writes the document again. Both carry
    // version 110, so the cluster would keep whichever lands last.
    h.insert("1", "second").await;
    h.commit(120).await;
    h.pipeline.dispatch().await.unwrap();
    let early = tokio::time::timeout(std::time::Duration::from_millis(100), h.land()).await;
    assert!(
        early.is_err(),
        "the second write waits for the first to land"
    );
    gate.add_permits(1);
    h.land().await.unwrap();
    h.land().await.unwrap();
    assert_eq!(h.confirmed(), [120]);
    let landed = fold_landed(&h.sink.flushed.lock().unwrap());
    assert!(landed["1"].contains("second"), "{landed:?}");
}

/// A pipeline over `docs(id, tenant, body)` (OID 30) routed by `tenant`:
/// flat (documents from the WAL tuple) or built by query.
fn routed_pipeline(flat: bool) -> (Pipeline<FakeSink, FakeRows>, FakeSink, FakeRows) {
    let cfg = Config::from_toml(
        "[source]\nurl = \"postgres://ferry@127.0.0.1:5432/app\"\nslot = \"s\"\npublication = \"p\"\n\
         [sink]\nurl = \"http://127.0.0.1:9200\"\n[engine]\nmax_in_flight_bulks = 4\n\
         [[index]]\nname = \"docs\"\ntable = \"docs\"\nrouting = \"tenant\"\n",
    )
    .expect("test config");
    let docs = shape("docs", 30, &["id", "tenant", "body"]);
    let mut plan = node("", docs.clone(), Link::Root);
    plan.routing = Some("tenant".into());
    let ix = index(0, plan, flat);
    let sink = FakeSink::default();
    let rows = FakeRows::default();
    let mut pipeline = Pipeline::new(
        sink.clone(),
        rows.clone(),
        std::slice::from_ref(&ix),
        &cfg,
        Arc::new(Stats::default()),
        Box::new(|_| {}),
    );
    let rel = relation(&docs);
    let projections = if flat {
        vec![Projection::new(0, &docs, Some("tenant"), &rel, |_| TypeKind::Text).unwrap()]
    } else {
        Vec::new()
    };
    pipeline.set_relation(rel, projections);
    (pipeline, sink, rows)
}

/// (operation, id, routing) of each write of each flush, in order.
fn placed(sink: &FakeSink) -> Vec<Vec<(&'static str, String, Option<String>)>> {
    let flushed = sink.flushed.lock().unwrap();
    flushed
        .iter()
        .map(|f| {
            let mut v: Vec<_> = f
                .iter()
                .map(|w| {
                    let op = if w.op == DocOp::Delete {
                        "delete"
                    } else {
                        "index"
                    };
                    (op, w.id.clone(), w.routing.clone())
                })
                .collect();
            v.sort();
            v
        })
        .collect()
}

/// One transaction of the change `c`, dispatched as a batch of its own.
async fn send(p: &mut Pipeline<FakeSink, FakeRows>, lsn: u64, c: ferry_core::change::Change) {
    p.begin(Lsn(lsn));
    p.change(c).unwrap();
    p.commit(Lsn(lsn + 1), 0);
    p.dispatch().await.unwrap();
}

/// Like [`send`], then waits for its flush to land.
async fn run(p: &mut Pipeline<FakeSink, FakeRows>, lsn: u64, c: ferry_core::change::Change) {
    send(p, lsn, c).await;
    let r = p.flush_done().await;
    p.flush_finished(r).await.unwrap();
}

#[tokio::test]
async fn a_routing_change_moves_the_document_and_leaves_no_copy_under_the_old_routing() {
    for flat in [true, false] {
        let (mut p, sink, rows) = routed_pipeline(flat);
        let at = (0, "1".to_string());
        rows.rows.lock().unwrap().insert(at.clone(), "{}".into());
        rows.routings.lock().unwrap().insert(at.clone(), "b".into());
        let moved = change(
            30,
            ChangeOp::Update,
            Some(&["1", "a", "x"]),
            Some(&["1", "b", "x"]),
        );
        run(&mut p, 10, moved).await;
        rows.rows.lock().unwrap().clear();
        run(
            &mut p,
            20,
            change(30, ChangeOp::Delete, Some(&["1", "b", "x"]), None),
        )
        .await;
        let some = |r: &str| Some(r.to_string());
        assert_eq!(
            placed(&sink),
            [
                vec![
                    ("delete", "1".into(), some("a")),
                    ("index", "1".into(), some("b"))
                ],
                vec![("delete", "1".into(), some("b"))],
            ],
            "flat: {flat}"
        );
    }
}

#[tokio::test]
async fn a_routed_root_found_gone_is_deleted_under_the_routing_its_row_image_gave() {
    let (mut p, sink, _rows) = routed_pipeline(false);
    // The row was deleted again before the build read it.
    let insert = change(30, ChangeOp::Insert, None, Some(&["2", "c", "x"]));
    run(&mut p, 10, insert).await;
    assert_eq!(
        placed(&sink),
        [vec![("delete", "2".into(), Some("c".into()))]],
        "the image's routing places the delete"
    );
}

#[tokio::test]
async fn a_held_delete_under_an_old_routing_survives_newer_writes_under_the_new_one() {
    let (mut p, sink, _rows) = routed_pipeline(true);
    let gate = Arc::new(Semaphore::new(0));
    *sink.hold.lock().unwrap() = Some(("first".into(), gate.clone()));
    // The first write of (1, a) stays in flight; the move's delete of
    // (1, a) is held behind it; a later edit writes (1, b) again.
    send(
        &mut p,
        10,
        change(30, ChangeOp::Insert, None, Some(&["1", "a", "first"])),
    )
    .await;
    let moved = change(
        30,
        ChangeOp::Update,
        Some(&["1", "a", "first"]),
        Some(&["1", "b", "moved"]),
    );
    send(&mut p, 20, moved).await;
    let edited = change(
        30,
        ChangeOp::Update,
        Some(&["1", "b", "moved"]),
        Some(&["1", "b", "edited"]),
    );
    send(&mut p, 30, edited).await;
    gate.add_permits(1);
    p.settle().await.unwrap();
    let deletes: Vec<(String, Option<String>)> = placed(&sink)
        .into_iter()
        .flatten()
        .filter(|(op, ..)| *op == "delete")
        .map(|(_, id, r)| (id, r))
        .collect();
    assert_eq!(deletes, [("1".to_string(), Some("a".to_string()))]);
}

#[tokio::test]
async fn a_flush_before_a_truncate_counts_as_a_flush_and_as_progress() {
    let mut h = Harness::new("skip", 1000, false);
    h.pipeline.begin(Lsn(90));
    h.insert("1", "a").await;
    h.insert("2", "b").await;
    let before = h
        .stats
        .progress_at
        .load(std::sync::atomic::Ordering::Relaxed);
    std::thread::sleep(std::time::Duration::from_millis(2));
    h.pipeline.barrier().await.unwrap();
    assert!(
        h.stats
            .progress_at
            .load(std::sync::atomic::Ordering::Relaxed)
            > before
    );
    assert_eq!(h.sink.flushed.lock().unwrap().len(), 1);
    let counted = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(counted(&h.stats.flushes), 1);
    assert_eq!(counted(&h.stats.flush_docs), 2);
}

#[tokio::test]
async fn a_hanging_flush_counts_as_a_stall_while_later_flushes_land() {
    let mut h = Harness::in_flight("skip", 1000, false, 4);
    h.stats.set_streaming(true);
    let gate = h.hold("hangs");
    h.send_transaction(90, &["1"], "hangs", 100).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    h.send_transaction(110, &["2"], "lands", 120).await;
    h.land().await.unwrap();
    assert_eq!(
        h.sink.flushed.lock().unwrap().len(),
        1,
        "the later flush landed"
    );
    let now = ferry_core::stats::mono_us();
    let stalled = h.stats.stalled_for(now).expect("work is pending");
    assert!(
        stalled >= std::time::Duration::from_millis(300),
        "stalled since the hanging flush was sent, not since the later one landed: {stalled:?}"
    );
    gate.add_permits(1);
    h.land().await.unwrap();
    let now = ferry_core::stats::mono_us();
    assert_eq!(
        h.stats.stalled_for(now),
        None,
        "all confirmed: nothing pending"
    );
}

/// Applies flushed writes in landing order as the cluster does with
/// `external_gte`: a write older than the stored version (a delete's
/// tombstone included) loses. Returns id → body of the documents left.
fn fold_landed(flushed: &[Vec<DocWrite>]) -> HashMap<String, String> {
    let mut stored: HashMap<String, (Lsn, Option<String>)> = HashMap::new();
    for w in flushed.iter().flatten() {
        if stored.get(&w.id).is_none_or(|(v, _)| w.version >= *v) {
            let body = match &w.op {
                DocOp::Index(b) => Some(String::from_utf8_lossy(b).into_owned()),
                DocOp::Delete => None,
            };
            stored.insert(w.id.clone(), (w.version, body));
        }
    }
    stored
        .into_iter()
        .filter_map(|(id, (_, body))| body.map(|b| (id, b)))
        .collect()
}

#[tokio::test]
async fn one_index_on_two_sinks_is_built_once_per_batch_and_written_to_both() {
    let cfg = Config::from_toml(
        "[source]\nurl = \"postgres://ferry@127.0.0.1:5432/app\"\nslot = \"s\"\npublication = \"p\"\n\
         [sink.a]\nurl = \"http://127.0.0.1:9200\"\n[sink.b]\nurl = \"http://127.0.0.1:9201\"\n\
         [[index]]\nname = \"docs\"\ntable = \"docs\"\nwhere = \"body <> ''\"\n",
    )
    .expect("test config")
    .fan_out();
    let docs = shape("docs", 31, &["id", "body"]);
    let plan = node("", docs.clone(), Link::Root);
    let pairs: Vec<_> = (0..2)
        .map(|pos| {
            let mut ix = index(pos, plan.clone(), false);
            ix.alias = "docs".into();
            ix.sink = pos;
            ix
        })
        .collect();
    let sink = FakeSink::default();
    let rows = FakeRows::default();
    for pos in 0..2 {
        rows.rows
            .lock()
            .unwrap()
            .insert((pos, "1".into()), "{\"body\":\"one\"}".into());
    }
    let mut pipeline = Pipeline::new(
        sink.clone(),
        rows.clone(),
        &pairs,
        &cfg,
        Arc::new(Stats::default()),
        Box::new(|_| {}),
    );
    pipeline.set_relation(relation(&docs), Vec::new());
    run(
        &mut pipeline,
        10,
        change(31, ChangeOp::Insert, None, Some(&["1", "one"])),
    )
    .await;
    assert_eq!(
        *rows.built.lock().unwrap(),
        [vec!["1".to_string()]],
        "one build for both sinks"
    );
    let flushed = sink.flushed.lock().unwrap();
    let mut written: Vec<(usize, String, bool)> = flushed
        .iter()
        .flatten()
        .map(|w| {
            (
                w.index,
                w.id.clone(),
                matches!(&w.op, DocOp::Index(b) if b == b"{\"body\":\"one\"}"),
            )
        })
        .collect();
    written.sort();
    assert_eq!(
        written,
        [(0, "1".to_string(), true), (1, "1".to_string(), true)],
        "the same document, once per sink"
    );
}
