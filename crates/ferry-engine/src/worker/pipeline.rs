//! The worker's rules, free of concrete I/O: row changes become batched
//! document work, a batch is flushed through a [`DocSink`] (built documents
//! come from a [`RowSource`]), and positions are confirmed through
//! [`Acks`] only after the flush that made them durable.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_config::Config;
use ferry_core::ack::{last_per_document, Overtaking};
use ferry_core::change::{Change, ChangeOp, Relation};
use ferry_core::doc::DocKey;
use ferry_core::stats::{mono_us, Stats};
use ferry_core::{DocOp, DocWrite, Lsn, PIPELINE_TARGET};
use ferry_opensearch::SinkError;
use tokio::task::JoinError;
use tracing::{field, Instrument, Span};

use super::batch::{Acks, Batch, FlushTicket};
use super::flat::Projection;
use super::flush::{self, Flushed, Inflight, PoisonRules};
use super::route::Router;
use super::seams::{DocSink, RowSource};
use crate::index::IndexRuntime;
use crate::EngineError;

/// Called with each position that may be confirmed to the source.
pub type Confirm = Box<dyn Fn(Lsn) + Send + Sync>;

/// Batching, flushing and acknowledging, over a sink `S` and a row source `R`.
pub struct Pipeline<S: DocSink, R: RowSource> {
    /// Where documents go.
    pub sink: S,
    /// Where documents built by query come from.
    pub rows: R,
    router: Router,
    /// Relation OID → how each flat index reads it.
    projections: HashMap<u32, Vec<Projection>>,
    relations: HashMap<u32, Arc<Relation>>,
    poison: PoisonRules,
    batch: Batch,
    acks: Acks,
    /// Commit LSN of the current (or last) transaction: the version of its writes.
    version: Lsn,
    /// Commit time of the newest transaction in the current batch.
    commit_ts: i64,
    /// Bulk writes in flight; they may land in any order.
    inflight: Inflight,
    /// What the in-flight writes hold, so a delete never overtakes a write.
    overtaking: Overtaking,
    /// Flush number → when it was sent (monotonic µs), for the stall check.
    sent_at: BTreeMap<u64, u64>,
    /// Operations held back until the in-flight one of their document they
    /// must not overtake landed, each group with its batch's ticket.
    held: Vec<(FlushTicket, Vec<DocWrite>)>,
    /// Most bulk writes in flight at once (`engine.max_in_flight_bulks`).
    max_in_flight: usize,
    confirm: Confirm,
    stats: Arc<Stats>,
    /// Index position → (alias, root table), for trace spans.
    names: Vec<(String, String)>,
    /// Positions of the indexes with a routing column.
    routed: HashSet<usize>,
    /// Index position → the first position whose documents are built the
    /// same way (one index on several sinks, see `Config::fan_out`): their
    /// roots are resolved and their documents built once per batch.
    twins: Vec<usize>,
    max_changes: usize,
    max_bytes: usize,
    max_delay: Duration,
}

impl<S: DocSink, R: RowSource> Pipeline<S, R> {
    /// A pipeline for `indexes`, batching as `cfg.engine` says.
    pub fn new(
        sink: S,
        rows: R,
        indexes: &[IndexRuntime],
        cfg: &Config,
        stats: Arc<Stats>,
        confirm: Confirm,
    ) -> Self {
        Pipeline {
            sink,
            rows,
            router: Router::new(indexes),
            projections: HashMap::new(),
            relations: HashMap::new(),
            poison: PoisonRules::new(indexes, cfg),
            batch: Batch::default(),
            acks: Acks::default(),
            version: Lsn::ZERO,
            commit_ts: 0,
            inflight: Inflight::new(),
            overtaking: Overtaking::default(),
            sent_at: BTreeMap::new(),
            held: Vec::new(),
            max_in_flight: cfg.engine.max_in_flight_bulks.max(1),
            confirm,
            stats,
            names: names(indexes),
            twins: twins(indexes),
            routed: indexes
                .iter()
                .filter(|ix| ix.plan.routing.is_some())
                .map(|ix| ix.pos)
                .collect(),
            max_changes: cfg.engine.max_batch_changes,
            max_bytes: cfg.engine.max_batch_bytes,
            max_delay: cfg.engine.max_batch_delay(),
        }
    }

    /// The routes from tables to documents.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The commit LSN of the current (or last) transaction.
    pub fn version(&self) -> Lsn {
        self.version
    }

    /// When the current batch must be flushed even if not full.
    pub fn deadline(&self) -> Option<Instant> {
        self.batch.opened().map(|t| t + self.max_delay)
    }

    /// True when nothing waits to be written or confirmed.
    pub fn is_idle(&self) -> bool {
        !self.batch.has_work() && !self.acks.has_pending() && self.held.is_empty()
    }

    /// A transaction began; its writes carry `final_lsn`.
    pub fn begin(&mut self, final_lsn: Lsn) {
        self.acks.begin();
        self.version = final_lsn;
        self.stats.transaction_began(final_lsn.0);
    }

    /// A transaction committed: `end_lsn` is confirmed with the batch holding it.
    pub fn commit(&mut self, end_lsn: Lsn, commit_ts: i64) {
        self.acks.pending(end_lsn);
        self.stats.transaction_committed(end_lsn.0, commit_ts);
        self.commit_ts = commit_ts;
        self.batch.touch();
    }

    /// A Relation message: `projections` are how the flat indexes rooted at
    /// it read its tuples from now on.
    pub fn set_relation(&mut self, rel: Arc<Relation>, projections: Vec<Projection>) {
        if projections.is_empty() {
            self.projections.remove(&rel.oid);
        } else {
            self.projections.insert(rel.oid, projections);
        }
        self.stats
            .register_table(rel.oid, &format!("{}.{}", rel.namespace, rel.name));
        self.relations.insert(rel.oid, rel);
    }

    /// A row change: flat indexes take the tuple, indexes built by query
    /// note the roots (or probes) to rebuild.
    pub fn change(&mut self, change: Change) -> Result<(), EngineError> {
        let op = match change.op {
            ChangeOp::Insert => 0,
            ChangeOp::Update => 1,
            ChangeOp::Delete => 2,
        };
        self.stats.count_change(change.rel, op);
        self.batch.count_change();
        let before_relation = || {
            EngineError::Stream(format!(
                "a change of relation {} arrived before its Relation message",
                change.rel
            ))
        };
        if self.router.is_routed(change.rel) {
            let rel = self
                .relations
                .get(&change.rel)
                .ok_or_else(before_relation)?;
            let routed = self.router.route(&change, rel)?;
            for (index, key) in routed.roots {
                self.batch.rebuild(index, key);
            }
            for (index, probe, values) in routed.probes {
                self.batch.probe(index, probe, values);
            }
            for (index, id, routing) in routed.routings {
                self.batch.saw_routing(index, id, routing);
            }
        }
        match self.projections.get(&change.rel) {
            Some(projs) => {
                for p in projs {
                    p.apply(&change, self.version, &mut self.batch);
                }
            }
            None if !self.router.flat_indexes(change.rel).is_empty() => {
                return Err(before_relation())
            }
            None => {}
        }
        Ok(())
    }

    /// A keepalive: its position is confirmed only when nothing is pending.
    pub fn keepalive(&mut self, wal_end: Lsn) {
        if self.batch.has_work() {
            return;
        }
        if let Some(lsn) = self.acks.keepalive(wal_end) {
            self.confirm(lsn);
        }
    }

    /// After each event: flushes a full batch, and confirms at once a
    /// commit that left nothing to write.
    pub async fn step(&mut self) -> Result<(), EngineError> {
        if self.batch.is_full(self.max_changes, self.max_bytes) {
            self.dispatch().await?;
        }
        self.confirm_if_idle().await
    }

    /// Confirms a pending commit when no write is batched or in flight
    /// (every write of its transaction is durable, or it had none).
    async fn confirm_if_idle(&mut self) -> Result<(), EngineError> {
        if !self.batch.has_work() && self.inflight.is_empty() && self.acks.has_pending() {
            self.dispatch().await?;
        }
        Ok(())
    }

    /// Closes the batch and sends it in the background while the next
    /// batch fills, once fewer than `max_in_flight` flushes are out. An
    /// operation that must not overtake one of its document in flight (see
    /// `ferry_core::ack::Overtaking`) is held back and rides with a later
    /// flush once that one landed; held operations on documents this batch
    /// writes are dropped (this batch's are newer), and held groups no
    /// longer blocked join this flush. Flushes may land in any order; each
    /// ticket is redeemed when its writes landed, and `Acks` confirms only
    /// the contiguous prefix of landed tickets.
    pub async fn dispatch(&mut self) -> Result<(), EngineError> {
        let span = if self.batch.has_work() {
            tracing::info_span!(
                target: PIPELINE_TARGET,
                "batch",
                lsn = %self.version,
                changes = self.batch.changes() as i64,
                documents = field::Empty,
                deletes = field::Empty,
                held = field::Empty,
            )
        } else {
            Span::none()
        };
        let writes = self.prepare_writes().instrument(span.clone()).await?;
        let writes = last_per_document(writes);
        self.batch.close();
        while self.inflight.len() >= self.max_in_flight {
            self.settle_one().await?;
        }
        self.drop_superseded(&writes);
        let (mut writes, held) = self.overtaking.split(writes);
        let deletes = writes.iter().filter(|w| w.op == DocOp::Delete).count();
        span.record("documents", (writes.len() - deletes) as i64);
        span.record("deletes", deletes as i64);
        span.record("held", held.len() as i64);
        let mut tickets = Vec::new();
        if held.is_empty() {
            tickets.push(self.acks.seal());
        } else {
            tickets.push(self.acks.seal_part());
            let rest = self.acks.seal();
            self.held.push((rest, held));
        }
        let mut origins = vec![tickets[0].seq(); writes.len()];
        self.release_held(&mut writes, &mut origins, &mut tickets);
        self.send(writes, origins, tickets, span);
        Ok(())
    }

    /// Drops the held operations on documents `writes` (a newer batch)
    /// operates on; a group left empty is released with the next flush.
    fn drop_superseded(&mut self, writes: &[DocWrite]) {
        if self.held.is_empty() {
            return;
        }
        // By (index, id, routing): a delete of a copy under an old routing
        // is not superseded by writes under the new one.
        let newer: HashSet<DocKey<'_>> = writes.iter().map(DocWrite::key).collect();
        for (_, ops) in &mut self.held {
            ops.retain(|w| !newer.contains(&w.key()));
        }
    }

    /// Moves the held groups no longer blocked by a flush in flight into
    /// `writes` (with the number of their batch in `origins`), and their
    /// tickets into `tickets`.
    fn release_held(
        &mut self,
        writes: &mut Vec<DocWrite>,
        origins: &mut Vec<u64>,
        tickets: &mut Vec<FlushTicket>,
    ) {
        if self.held.is_empty() {
            return;
        }
        let overtaking = &self.overtaking;
        let (free, still): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|(t, ops)| !ops.iter().any(|w| overtaking.holds(w, t.seq())));
        self.held = still;
        for (ticket, ops) in free {
            origins.extend(std::iter::repeat_n(ticket.seq(), ops.len()));
            writes.extend(ops);
            tickets.push(ticket);
        }
    }

    /// Sends `writes` (from the batches numbered in `origins`) in the
    /// background; with nothing to write, the tickets are redeemed at once.
    fn send(
        &mut self,
        writes: Vec<DocWrite>,
        origins: Vec<u64>,
        tickets: Vec<FlushTicket>,
        batch: Span,
    ) {
        if writes.is_empty() {
            for t in tickets {
                self.redeem(t);
            }
            return;
        }
        if let Some(first) = tickets.first() {
            self.overtaking
                .sent(first.seq(), origins.into_iter().zip(writes.iter()));
            self.sent_at.insert(first.seq(), mono_us());
            self.note_oldest_flush();
        }
        flush::spawn(
            &mut self.inflight,
            self.sink.clone(),
            writes,
            tickets,
            self.stats.clone(),
            self.commit_ts,
            batch,
        );
    }

    /// Sends the held groups no longer blocked, when the stream has
    /// nothing batched that they could ride with.
    fn send_released(&mut self) {
        if self.held.is_empty()
            || self.batch.has_work()
            || self.inflight.len() >= self.max_in_flight
        {
            return;
        }
        let (mut writes, mut origins, mut tickets) = (Vec::new(), Vec::new(), Vec::new());
        self.release_held(&mut writes, &mut origins, &mut tickets);
        if !tickets.is_empty() {
            self.send(writes, origins, tickets, Span::none());
        }
    }

    /// Waits for the next flush to land (pending forever when none is out).
    pub async fn flush_done(&mut self) -> Result<Result<Flushed, SinkError>, JoinError> {
        match self.inflight.join_next().await {
            Some(r) => r,
            None => std::future::pending().await,
        }
    }

    /// Handles what [`Pipeline::flush_done`] returned.
    pub async fn flush_finished(
        &mut self,
        r: Result<Result<Flushed, SinkError>, JoinError>,
    ) -> Result<(), EngineError> {
        self.settled(r).await?;
        self.send_released();
        self.confirm_if_idle().await
    }

    /// Waits for every flush in flight, then for the operations held back
    /// behind them, and redeems their tickets.
    pub async fn settle(&mut self) -> Result<(), EngineError> {
        loop {
            while !self.inflight.is_empty() {
                self.settle_one().await?;
            }
            if self.held.is_empty() {
                return Ok(());
            }
            let (mut writes, mut origins, mut tickets) = (Vec::new(), Vec::new(), Vec::new());
            self.release_held(&mut writes, &mut origins, &mut tickets);
            self.send(writes, origins, tickets, Span::none());
        }
    }

    /// Waits for the next flush in flight to land, if any, and redeems its ticket.
    async fn settle_one(&mut self) -> Result<(), EngineError> {
        if let Some(r) = self.inflight.join_next().await {
            self.settled(r).await?;
        }
        Ok(())
    }

    /// Makes everything batched so far durable now, before an operation
    /// that must follow it (a TRUNCATE). Pending commits stay pending.
    pub async fn barrier(&mut self) -> Result<(), EngineError> {
        let writes = self.prepare_writes().await?;
        self.settle().await?;
        if !writes.is_empty() {
            let started = Instant::now();
            let outcome = self.sink.write(&writes).await?;
            flush::record(&self.stats, &writes, &outcome, started);
            self.poison_path(outcome.rejected).await?;
        }
        Ok(())
    }

    /// Flushes and confirms everything received, within `limit`; past it,
    /// gives up without confirming (the changes are replayed on restart).
    pub async fn finish(&mut self, limit: Duration) -> Result<(), EngineError> {
        let work = async {
            self.dispatch().await?;
            self.settle().await
        };
        match tokio::time::timeout(limit, work).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(
                    seconds = limit.as_secs(),
                    "could not flush within the shutdown timeout; unconfirmed changes will be replayed on restart"
                );
                self.inflight.abort_all();
                Ok(())
            }
        }
    }

    async fn settled(
        &mut self,
        r: Result<Result<Flushed, SinkError>, JoinError>,
    ) -> Result<(), EngineError> {
        match r {
            Ok(Ok(Flushed { tickets, rejected })) => {
                // A flush is known by its first ticket (see `send`).
                if let Some(first) = tickets.first() {
                    self.overtaking.landed(first.seq());
                    self.sent_at.remove(&first.seq());
                    self.note_oldest_flush();
                }
                self.poison_path(rejected).await?;
                for t in tickets {
                    self.redeem(t);
                }
                Ok(())
            }
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(EngineError::Stream(format!("bulk write task failed: {e}"))),
        }
    }

    async fn poison_path(
        &mut self,
        rejected: Vec<ferry_opensearch::Rejected>,
    ) -> Result<(), EngineError> {
        if rejected.is_empty() {
            return Ok(());
        }
        flush::handle_rejected(
            &self.sink,
            &mut self.rows,
            &self.poison,
            &self.stats,
            rejected,
            self.version,
        )
        .await
    }

    /// Takes the batch's writes and turns its rebuild requests into writes
    /// (resolving related-row changes to roots first).
    async fn prepare_writes(&mut self) -> Result<Vec<DocWrite>, EngineError> {
        let work = self.batch.take();
        let mut writes = work.writes;
        let mut rebuild = work.rebuild;
        // One index on several sinks asks the same question once.
        let mut resolved: HashMap<(usize, ferry_core::plan::Probe, Vec<String>), Vec<Vec<String>>> =
            HashMap::new();
        for ((index, probe), values) in work.probes {
            // Only an index with a twin pays for the sorted copy.
            let mut sorted: Vec<String> = match self.has_twin(index) {
                true => values.iter().cloned().collect(),
                false => Vec::new(),
            };
            sorted.sort_unstable();
            let asked = (self.twin(index), probe, sorted);
            let keys = match resolved.get(&asked).filter(|_| self.has_twin(index)) {
                Some(keys) => keys.clone(),
                None => {
                    let span = tracing::info_span!(
                        target: PIPELINE_TARGET,
                        "resolve",
                        index = self.index_name(index),
                        column = %asked.1.column,
                        values = values.len() as i64,
                        roots = field::Empty,
                    );
                    let keys = self
                        .rows
                        .resolve(index, &asked.1, values)
                        .instrument(span.clone())
                        .await?;
                    span.record("roots", keys.len() as i64);
                    resolved.insert(asked, keys.clone());
                    keys
                }
            };
            rebuild.entry(index).or_default().extend(keys);
        }
        // The build reads the current rows, which reflect at least every
        // transaction of this batch: version them with the newest one.
        let built_from = writes.len();
        let mut built: HashMap<(usize, Vec<Vec<String>>), std::ops::Range<usize>> = HashMap::new();
        for (index, keys) in rebuild {
            let mut keys: Vec<Vec<String>> = keys.into_iter().collect();
            if self.has_twin(index) {
                keys.sort_unstable();
            }
            let before = writes.len();
            let asked = (self.twin(index), keys);
            if let Some(range) = built.get(&asked).filter(|_| self.has_twin(index)) {
                // A twin's documents: the same, addressed to this index.
                let copies: Vec<DocWrite> = writes[range.clone()]
                    .iter()
                    .map(|w| DocWrite { index, ..w.clone() })
                    .collect();
                writes.extend(copies);
                continue;
            }
            let span = tracing::info_span!(
                target: PIPELINE_TARGET,
                "build",
                index = self.index_name(index),
                table = self.names.get(index).map_or("", |n| n.1.as_str()),
                roots = asked.1.len() as i64,
                documents = field::Empty,
            );
            async {
                for chunk in asked.1.chunks(1000) {
                    self.rows
                        .build(index, chunk, self.version, &mut writes)
                        .await?;
                }
                Ok::<(), EngineError>(())
            }
            .instrument(span.clone())
            .await?;
            span.record("documents", (writes.len() - before) as i64);
            built.insert(asked, before..writes.len());
        }
        if !self.routed.is_empty() {
            let built = writes.split_off(built_from);
            let (built, unplaced) = work.routings.settle(built, |i| self.routed.contains(&i));
            if unplaced > 0 {
                tracing::debug!(
                    unplaced,
                    "roots found gone through related rows only: their own changes delete them"
                );
            }
            writes.extend(built);
        }
        Ok(writes)
    }

    /// Tells the stall check when the oldest flush in flight was sent.
    fn note_oldest_flush(&self) {
        self.stats
            .set_oldest_flush(self.sent_at.values().min().copied());
    }

    /// The first index built the same way as `index` (itself if none).
    fn twin(&self, index: usize) -> usize {
        self.twins.get(index).copied().unwrap_or(index)
    }

    /// Whether another index is built the same way as `index`.
    fn has_twin(&self, index: usize) -> bool {
        let first = self.twin(index);
        self.twins
            .iter()
            .enumerate()
            .any(|(i, &t)| t == first && i != index)
    }

    fn index_name(&self, index: usize) -> &str {
        self.names.get(index).map_or("", |n| n.0.as_str())
    }

    fn redeem(&mut self, ticket: FlushTicket) {
        if let Some(lsn) = self.acks.flushed(ticket) {
            self.confirm(lsn);
        }
    }

    fn confirm(&mut self, lsn: Lsn) {
        (self.confirm)(lsn);
        self.stats.confirmed(lsn.0);
    }
}

/// Index position → (alias, qualified root table), for trace spans.
/// (Counts in spans are `i64`: OTLP has no unsigned integers.)
/// Per index position, the first position with the same alias and
/// document plan (itself when none): built documents are then the same
/// but for the index they are addressed to.
fn twins(indexes: &[IndexRuntime]) -> Vec<usize> {
    let last = indexes.iter().map(|i| i.pos + 1).max().unwrap_or(0);
    let mut twins: Vec<usize> = (0..last).collect();
    for ix in indexes {
        if let Some(first) = indexes
            .iter()
            .find(|o| o.alias == ix.alias && o.plan == ix.plan && o.fast == ix.fast)
        {
            twins[ix.pos] = first.pos;
        }
    }
    twins
}

fn names(indexes: &[IndexRuntime]) -> Vec<(String, String)> {
    let mut names =
        vec![(String::new(), String::new()); indexes.iter().map(|i| i.pos + 1).max().unwrap_or(0)];
    for i in indexes {
        names[i.pos] = (i.alias.clone(), i.shape.qualified_plain());
    }
    names
}
