//! The worker's rules, free of concrete I/O: row changes become batched
//! document work, a batch is flushed through a [`DocSink`] (built documents
//! come from a [`RowSource`]), and positions are confirmed through
//! [`Acks`] only after the flush that made them durable.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_config::Config;
use ferry_core::ack::Overtaking;
use ferry_core::change::{Change, ChangeOp, Relation};
use ferry_core::stats::Stats;
use ferry_core::{DocWrite, Lsn};
use ferry_opensearch::SinkError;
use tokio::task::JoinError;

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
    /// Most bulk writes in flight at once (`engine.max_in_flight_bulks`).
    max_in_flight: usize,
    confirm: Confirm,
    stats: Arc<Stats>,
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
            max_in_flight: cfg.engine.max_in_flight_bulks.max(1),
            confirm,
            stats,
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
        !self.batch.has_work() && !self.acks.has_pending()
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
    /// batch fills, once fewer than `max_in_flight` flushes are out and no
    /// flush in flight writes a document this batch deletes (see
    /// `ferry_core::ack::Overtaking`). Flushes may land in any order; its
    /// ticket is redeemed when it lands, and `Acks` confirms only the
    /// contiguous prefix of landed batches.
    pub async fn dispatch(&mut self) -> Result<(), EngineError> {
        let writes = self.prepare_writes().await?;
        self.batch.close();
        let ticket = self.acks.seal();
        while self.inflight.len() >= self.max_in_flight
            || (!self.inflight.is_empty() && self.overtaking.blocks(&writes))
        {
            self.settle_one().await?;
        }
        if writes.is_empty() {
            self.redeem(ticket);
            return Ok(());
        }
        self.overtaking.sent(ticket.seq(), &writes);
        flush::spawn(
            &mut self.inflight,
            self.sink.clone(),
            writes,
            ticket,
            self.stats.clone(),
            self.commit_ts,
        );
        Ok(())
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
        self.confirm_if_idle().await
    }

    /// Waits for every flush in flight and redeems their tickets.
    pub async fn settle(&mut self) -> Result<(), EngineError> {
        while !self.inflight.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
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
            let outcome = self.sink.write(&writes).await?;
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
            Ok(Ok(Flushed { ticket, rejected })) => {
                self.overtaking.landed(ticket.seq());
                self.poison_path(rejected).await?;
                self.redeem(ticket);
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
        for ((index, probe), values) in work.probes {
            let keys = self.rows.resolve(index, &probe, values).await?;
            rebuild.entry(index).or_default().extend(keys);
        }
        // The build reads the current rows, which reflect at least every
        // transaction of this batch: version them with the newest one.
        for (index, keys) in rebuild {
            let keys: Vec<Vec<String>> = keys.into_iter().collect();
            for chunk in keys.chunks(1000) {
                self.rows
                    .build(index, chunk, self.version, &mut writes)
                    .await?;
            }
        }
        Ok(writes)
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
