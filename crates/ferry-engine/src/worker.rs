//! The streaming worker: takes events off the queue, turns row changes into
//! document writes, flushes them in one bulk request per batch, and only
//! then confirms the LSN of the last transaction the batch completed.
//!
//! Invariants:
//! * an LSN is confirmed only after every write of every transaction up to
//!   it is durable in the sink (a transaction split across batches is
//!   confirmed by the batch holding its `Commit`);
//! * writes carry their transaction's commit LSN as external version, so
//!   replays after a crash are harmless and never overwrite newer documents;
//! * within a batch only the last write per document is sent.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use ferry_config::Config;
use ferry_core::change::{Change, ChangeOp, Datum, Event, Relation, Tuple};
use ferry_core::plan::{Probe, Role, Usage};
use ferry_core::schema::split_doc_id;
use ferry_core::schema::{doc_id, DocumentWriter};
use ferry_core::{ColumnShape, DocOp, DocWrite, Lsn};
use ferry_opensearch::{Rejected, Sink};
use ferry_postgres::capture;
use ferry_postgres::catalog::{self, TypeResolver};
use ferry_postgres::{Session, SourceError};

use crate::index::{IndexId, IndexRuntime, Target};
use crate::setup::Prepared;
use crate::{EngineError, Shutdown};
use ferry_core::stats::{IndexState, Stats};
use std::sync::atomic::Ordering::Relaxed;

/// How one index reads the tuples of one relation (rebuilt on every Relation message).
struct Projection {
    index: usize,
    writer: DocumentWriter,
    /// Tuple position of each document column.
    cols: Vec<usize>,
    /// Tuple positions of the primary-key columns.
    key: Vec<usize>,
}

/// Root keys (primary-key texts) of documents to rebuild from the database.
type RootKeys = HashSet<Vec<String>>;

#[derive(Default)]
struct Batch {
    slots: HashMap<(usize, String), usize>,
    items: Vec<DocWrite>,
    /// Per index: roots whose documents are rebuilt by query at dispatch.
    rebuild: HashMap<usize, RootKeys>,
    /// Per index and probe: values selecting parent rows whose roots are rebuilt.
    probes: HashMap<(usize, Probe), HashSet<String>>,
    changes: usize,
    bytes: usize,
    ack: Option<Lsn>,
    since: Option<Instant>,
}

impl Batch {
    fn push(&mut self, w: DocWrite) {
        self.bytes += w.weight();
        match self.slots.entry((w.index, w.id.clone())) {
            std::collections::hash_map::Entry::Occupied(at) => self.items[*at.get()] = w,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(self.items.len());
                self.items.push(w);
            }
        }
    }

    fn rebuild(&mut self, index: usize, key: Vec<String>) {
        self.bytes += 64;
        self.rebuild.entry(index).or_default().insert(key);
    }

    fn has_work(&self) -> bool {
        !self.items.is_empty() || !self.rebuild.is_empty() || !self.probes.is_empty()
    }

    fn is_idle(&self) -> bool {
        !self.has_work() && self.ack.is_none()
    }
}

struct Worker {
    client: Session,
    types: TypeResolver,
    sink: Sink,
    indexes: Vec<IndexRuntime>,
    names: Vec<String>,
    /// Root table OID → index positions.
    roots: HashMap<u32, Vec<usize>>,
    /// Relation OID → how each fast index reads it.
    projections: HashMap<u32, Vec<Projection>>,
    /// Table OID → (index, usage) for indexes built by query.
    routes: HashMap<u32, Vec<(usize, Usage)>>,
    cfg: Config,
    shutdown: Shutdown,
    stats: Arc<Stats>,
    /// Commit time of the newest transaction in the current batch.
    batch_commit_ts: i64,
    relations: HashMap<u32, Arc<Relation>>,
    batch: Batch,
    ack: capture::AckHandle,
    in_txn: bool,
    version: Lsn,
    /// The bulk write in flight, resolving to the LSN it lets us confirm.
    inflight: Option<Inflight>,
    /// Index positions whose config lists no columns: documents follow the table's shape.
    follow_shape: Vec<bool>,
    last_event: Instant,
}

/// What a finished bulk write reports: the LSN it lets us confirm and the
/// writes the cluster rejected for good.
type Flushed = (Option<Lsn>, Vec<Rejected>);

type Inflight = tokio::task::JoinHandle<Result<Flushed, ferry_opensearch::SinkError>>;

/// Streams changes until shutdown or a failure.
pub async fn stream(
    cfg: &Config,
    prepared: Prepared,
    shutdown: &mut Shutdown,
    stats: &Arc<Stats>,
) -> Result<(), EngineError> {
    let Prepared {
        params,
        client,
        types,
        sink,
        indexes,
        seeding,
    } = prepared;
    let mut capture = capture::start(
        &params,
        &cfg.source.slot,
        &cfg.source.publication,
        cfg.engine.queue_capacity,
    )
    .await?;
    let mut roots: HashMap<u32, Vec<usize>> = HashMap::new();
    let mut routes: HashMap<u32, Vec<(usize, Usage)>> = HashMap::new();
    for ix in &indexes {
        if ix.fast {
            roots.entry(ix.shape.oid).or_default().push(ix.pos);
        } else {
            for (oid, usage) in ix.plan.usages() {
                routes.entry(oid).or_default().push((ix.pos, usage));
            }
        }
    }
    let indexes_fast: Vec<bool> = indexes.iter().map(|i| i.fast).collect();
    let mut w = Worker {
        client,
        types,
        sink,
        names: Target::names(&indexes),
        indexes,
        roots,
        projections: HashMap::new(),
        routes,
        cfg: cfg.clone(),
        shutdown: shutdown.clone(),
        stats: stats.clone(),
        batch_commit_ts: 0,
        relations: HashMap::new(),
        batch: Batch::default(),
        ack: capture.ack.clone(),
        in_txn: false,
        version: Lsn::ZERO,
        inflight: None,
        follow_shape: cfg
            .indexes
            .iter()
            .zip(&indexes_fast)
            .map(|(i, fast)| i.columns.is_none() && *fast)
            .collect(),
        last_event: Instant::now(),
    };
    // Seeding runs beside streaming; it reports each alias it moves.
    let (swapped_tx, mut swapped_rx) = tokio::sync::mpsc::channel::<(usize, String)>(16);
    let mut seeding_task = seeding.map(|s| {
        tokio::spawn(crate::seed::run(
            s,
            w.sink.clone(),
            w.indexes.clone(),
            cfg.clone(),
            shutdown.clone(),
            stats.clone(),
            swapped_tx,
        ))
    });
    tracing::info!("streaming changes");
    stats.streaming.store(true, Relaxed);
    for i in 0..w.indexes.len() {
        if let Some(st) = stats.index(i) {
            st.set_state(IndexState::Streaming);
        }
    }
    let max_delay = cfg.engine.max_batch_delay();
    let heartbeat = cfg.source.heartbeat();
    let mut joined = false;
    let mut coverage = tokio::time::interval(std::time::Duration::from_secs(30));
    coverage.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result: Result<(), EngineError> = loop {
        let deadline = w.batch.since.map(|t| t + max_delay);
        let beat_at = heartbeat.map(|h| w.last_event + h);
        let ev = tokio::select! {
            biased;
            _ = shutdown.changed() => {
                tracing::info!("stopping: flushing the in-flight batch");
                break w.finish(cfg.engine.shutdown_timeout()).await;
            }
            r = wait_seeding(&mut seeding_task) => {
                seeding_task = None;
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(e),
                    Err(e) => break Err(EngineError::Stream(format!("seeding task failed: {e}"))),
                }
                continue;
            }
            Some((pos, old)) = swapped_rx.recv() => {
                if let Err(e) = w.retire_shadow(pos, &old).await { break Err(e); }
                continue;
            }
            r = wait_inflight(&mut w.inflight) => {
                w.inflight = None;
                if let Err(e) = w.settled(r).await { break Err(e); }
                w.ack_if_nothing_pending();
                continue;
            }
            _ = sleep_until(deadline), if deadline.is_some() => {
                if let Err(e) = w.dispatch().await { break Err(e); }
                continue;
            }
            _ = coverage.tick() => {
                if let Err(e) = w.check_publication().await { break Err(e); }
                continue;
            }
            _ = sleep_until(beat_at), if beat_at.is_some() && w.batch.is_idle() => {
                w.heartbeat().await;
                continue;
            }
            ev = capture.events.recv() => ev,
        };
        let Some(ev) = ev else {
            // Capture ended: make what arrived durable, then report why.
            if let Err(e) = w.finish(cfg.engine.shutdown_timeout()).await {
                break Err(e);
            }
            joined = true;
            break match (&mut capture.task).await {
                Ok(Ok(())) => Err(EngineError::Source(SourceError::Unavailable {
                    what: "streaming changes".into(),
                    reason: "the replication stream ended".into(),
                })),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(EngineError::Stream(format!("capture task failed: {e}"))),
            };
        };
        if !matches!(ev, Event::Keepalive { .. }) {
            w.last_event = Instant::now();
        }
        if let Err(e) = w.handle(ev).await {
            break Err(e);
        }
        let full = w.batch.changes >= cfg.engine.max_batch_changes
            || w.batch.bytes >= cfg.engine.max_batch_bytes;
        if full {
            if let Err(e) = w.dispatch().await {
                break Err(e);
            }
        }
        w.ack_if_nothing_pending();
    };
    // A seeding still running belongs to this pipeline: stop it (it resumes
    // from its checkpoint next time).
    if let Some(t) = seeding_task.take() {
        t.abort();
    }
    // Capture reports the last confirmed position to the server, then closes the stream.
    capture.stop();
    if !joined {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), &mut capture.task).await;
    }
    tracing::info!(confirmed = %capture.ack.confirmed(), "stream closed");
    result
}

async fn wait_seeding(
    task: &mut Option<tokio::task::JoinHandle<Result<(), EngineError>>>,
) -> Result<Result<(), EngineError>, tokio::task::JoinError> {
    match task {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

async fn wait_inflight(
    inflight: &mut Option<Inflight>,
) -> Result<Result<Flushed, ferry_opensearch::SinkError>, tokio::task::JoinError> {
    match inflight {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

impl Worker {
    /// Confirms `lsn` to PostgreSQL (through capture) and records it.
    fn confirm(&mut self, lsn: Lsn) {
        self.ack.confirm(lsn);
        self.stats.confirmed_lsn.fetch_max(lsn.0, Relaxed);
    }

    /// Confirms at once a commit that left nothing to write (every write
    /// of its transaction is already durable, or it had none).
    fn ack_if_nothing_pending(&mut self) {
        if !self.batch.has_work() && self.inflight.is_none() {
            if let Some(lsn) = self.batch.ack.take() {
                self.confirm(lsn);
                self.batch.since = None;
                self.batch.changes = 0;
            }
        }
    }

    async fn handle(&mut self, ev: Event) -> Result<(), EngineError> {
        match ev {
            Event::Begin { final_lsn, .. } => {
                self.in_txn = true;
                self.version = final_lsn;
                self.stats.transactions.fetch_add(1, Relaxed);
                self.stats.received_lsn.fetch_max(final_lsn.0, Relaxed);
            }
            Event::Commit {
                end_lsn, commit_ts, ..
            } => {
                self.in_txn = false;
                self.batch_commit_ts = commit_ts;
                self.batch.ack = Some(end_lsn);
                self.batch.since.get_or_insert_with(Instant::now);
            }
            Event::Relation(rel) => self.on_relation(rel).await?,
            Event::Change(change) => {
                let op = match change.op {
                    ChangeOp::Insert => 0,
                    ChangeOp::Update => 1,
                    ChangeOp::Delete => 2,
                };
                self.stats.changes[op].fetch_add(1, Relaxed);
                self.batch.changes += 1;
                self.batch.since.get_or_insert_with(Instant::now);
                self.on_change(change)?;
            }
            Event::Truncate { rels } => self.on_truncate(rels).await?,
            Event::Keepalive { wal_end } => {
                if !self.in_txn && self.batch.is_idle() && self.inflight.is_none() {
                    self.confirm(wal_end);
                }
            }
        }
        Ok(())
    }

    async fn on_relation(&mut self, rel: Arc<Relation>) -> Result<(), EngineError> {
        self.projections.remove(&rel.oid);
        let Some(positions) = self.roots.get(&rel.oid).cloned() else {
            self.relations.insert(rel.oid, rel);
            return Ok(());
        };
        for &pos in &positions {
            if self.follow_shape.get(pos).copied().unwrap_or(false) {
                self.follow_table_shape(pos, &rel).await?;
            }
        }
        let mut projs = Vec::with_capacity(positions.len());
        for pos in positions {
            let shape = &self.indexes[pos].shape;
            let mut columns = Vec::with_capacity(shape.columns.len());
            let mut cols = Vec::with_capacity(shape.columns.len());
            for c in &shape.columns {
                let Some(at) = rel.columns.iter().position(|rc| rc.name == c.name) else {
                    tracing::warn!(table = %shape.qualified(), column = %c.name, "column is gone from the table; leaving it out of documents");
                    continue;
                };
                let type_oid = rel.columns[at].type_oid;
                let kind = if type_oid == c.type_oid {
                    c.kind.clone()
                } else {
                    self.types.resolve(&self.client, type_oid).await?
                };
                columns.push(ColumnShape {
                    name: c.name.clone(),
                    type_oid,
                    kind,
                });
                cols.push(at);
            }
            let mut key = Vec::with_capacity(shape.key.len());
            for k in &shape.key {
                match rel.columns.iter().position(|rc| &rc.name == k) {
                    Some(at) => key.push(at),
                    None => {
                        return Err(EngineError::Stream(format!(
                        "primary-key column {k:?} of {} is missing from the replication stream; \
                             restart ferry so it re-reads the table's shape",
                        shape.qualified()
                    )))
                    }
                }
            }
            projs.push(Projection {
                index: pos,
                writer: DocumentWriter::new(&columns),
                cols,
                key,
            });
        }
        self.projections.insert(rel.oid, projs);
        self.relations.insert(rel.oid, rel);
        Ok(())
    }

    /// Brings an index whose documents carry every column in line with a
    /// new Relation message: added columns join the documents (and the
    /// mapping is extended), dropped ones leave, changed types are reported.
    async fn follow_table_shape(&mut self, pos: usize, rel: &Relation) -> Result<(), EngineError> {
        // The catalog says what the table is now; the Relation message may
        // describe older rows being replayed (columns since dropped).
        let table = self.indexes[pos].plan.table.qualified_plain();
        let current = catalog::read_table(
            &self.client,
            &mut self.types,
            &format!("index[{pos}]"),
            &table,
            None,
            true,
        )
        .await?;
        let plan_cols = self.indexes[pos].plan.table.columns.clone();
        let dropped: Vec<&str> = plan_cols
            .iter()
            .filter(|c| current.column(&c.name).is_none())
            .map(|c| c.name.as_str())
            .collect();
        let retyped: Vec<&str> = plan_cols
            .iter()
            .filter(|c| {
                current
                    .column(&c.name)
                    .is_some_and(|now| now.type_oid != c.type_oid)
            })
            .map(|c| c.name.as_str())
            .collect();
        if !dropped.is_empty() || !retyped.is_empty() {
            // Documents written before hold the old shape: rebuild the index
            // in the background (its mapping hash changed) and move the alias.
            return Err(EngineError::Restart(format!(
                "table {table} changed shape (dropped: {dropped:?}, retyped: {retyped:?}); index {} is rebuilt in the background",
                self.indexes[pos].alias
            )));
        }
        let mut added = serde_json::Map::new();
        let mut columns = plan_cols;
        for rc in &rel.columns {
            let Some(now) = current.column(&rc.name) else {
                continue;
            };
            if columns.iter().any(|c| c.name == rc.name) {
                continue;
            }
            added.insert(now.name.clone(), now.kind.mapping());
            columns.push(now.clone());
        }
        if added.is_empty() {
            return Ok(());
        }
        let ix = &mut self.indexes[pos];
        ix.plan.fields = columns.iter().map(|c| c.name.clone()).collect();
        ix.plan.table.columns = columns.clone();
        ix.shape.columns = columns;
        let names: Vec<String> = added.keys().cloned().collect();
        match self.sink.extend_mapping(&self.names[pos], added).await {
            Ok(()) => {
                tracing::info!(index = %self.indexes[pos].alias, columns = ?names, "new columns: extended the index mapping")
            }
            Err(e) => {
                tracing::error!(index = %self.indexes[pos].alias, columns = ?names, error = %e, "new columns: the index mapping could not be extended")
            }
        }
        Ok(())
    }

    fn on_change(&mut self, change: Change) -> Result<(), EngineError> {
        if self.routes.contains_key(&change.rel) {
            self.route_change(&change)?;
        }
        let Some(projs) = self.projections.get(&change.rel) else {
            if self.roots.contains_key(&change.rel) {
                return Err(EngineError::Stream(format!(
                    "a change of relation {} arrived before its Relation message",
                    change.rel
                )));
            }
            return Ok(());
        };
        let version = self.version;
        for p in projs {
            match change.op {
                ChangeOp::Insert | ChangeOp::Update => {
                    let Some(new) = &change.new else { continue };
                    let id = key_id(new, &p.key);
                    if let Some(old) = &change.old {
                        let old_id = key_id(&old.tuple, &p.key);
                        if old_id != id {
                            // The primary key changed: the old document goes.
                            self.batch.push(DocWrite {
                                index: p.index,
                                id: old_id,
                                version,
                                op: DocOp::Delete,
                            });
                        }
                    }
                    let unchanged = p
                        .cols
                        .iter()
                        .any(|c| matches!(new.0.get(*c), Some(Datum::Unchanged)));
                    if unchanged {
                        // A TOASTed value was not sent: rebuild from the table.
                        let key = p
                            .key
                            .iter()
                            .map(|k| {
                                String::from_utf8_lossy(text(new, *k).unwrap_or(b"")).into_owned()
                            })
                            .collect();
                        self.batch.rebuild(p.index, key);
                        continue;
                    }
                    let mut body = Vec::with_capacity(128);
                    p.writer
                        .write(|i| p.cols.get(i).and_then(|c| text(new, *c)), &mut body);
                    self.batch.push(DocWrite {
                        index: p.index,
                        id,
                        version,
                        op: DocOp::Index(body),
                    });
                }
                ChangeOp::Delete => {
                    let Some(old) = &change.old else { continue };
                    let id = key_id(&old.tuple, &p.key);
                    self.batch.push(DocWrite {
                        index: p.index,
                        id,
                        version,
                        op: DocOp::Delete,
                    });
                }
            }
        }
        Ok(())
    }

    /// Takes the batch's writes and turns its rebuild requests into writes
    /// (resolving related-row changes to roots first).
    async fn prepare_writes(&mut self) -> Result<Vec<DocWrite>, EngineError> {
        let mut writes = std::mem::take(&mut self.batch.items);
        self.batch.slots.clear();
        self.batch.bytes = 0;
        let probes = std::mem::take(&mut self.batch.probes);
        let mut rebuild = std::mem::take(&mut self.batch.rebuild);
        for ((index, probe), values) in probes {
            let keys = self.resolve(index, &probe, values).await?;
            rebuild.entry(index).or_default().extend(keys);
        }
        // The build reads the current rows, which reflect at least every
        // transaction of this batch: version them with the newest one.
        let version = self.version;
        for (index, keys) in rebuild {
            let keys: Vec<Vec<String>> = keys.into_iter().collect();
            for chunk in keys.chunks(1000) {
                self.build_docs(index, chunk, version, &mut writes).await?;
            }
        }
        Ok(writes)
    }

    /// Closes the current batch: waits for the previous bulk write (so
    /// writes reach the sink in stream order), then sends this one in the
    /// background while the next batch fills. Its LSN is confirmed when it
    /// completes (see [`Worker::settled`]).
    /// The alias moved off `old`: stop writing to it (after the write in
    /// flight lands) and delete it.
    async fn retire_shadow(&mut self, pos: usize, old: &str) -> Result<(), EngineError> {
        self.settle().await?;
        let n = self.indexes.len();
        if let Some(ix) = self.indexes.get_mut(pos) {
            ix.shadow = None;
        }
        if let Some(name) = self.names.get_mut(Target::Shadow.slot(IndexId(pos), n)) {
            name.clear();
        }
        self.sink.delete_index(old).await?;
        tracing::info!(index = %old, "deleted the index the alias left");
        Ok(())
    }

    async fn dispatch(&mut self) -> Result<(), EngineError> {
        let mut writes = self.prepare_writes().await?;
        // Keep an index the alias still serves current during a rebuild.
        let n = self.indexes.len();
        let shadowed: Vec<DocWrite> = writes
            .iter()
            .filter(|w| {
                self.indexes
                    .get(w.index)
                    .is_some_and(|i| i.shadow.is_some())
            })
            .map(|w| DocWrite {
                index: Target::Shadow.slot(IndexId(w.index), n),
                ..w.clone()
            })
            .collect();
        writes.extend(shadowed);
        let ack = self.batch.ack.take();
        self.batch.since = None;
        self.batch.changes = 0;
        self.settle().await?;
        if writes.is_empty() {
            if let Some(lsn) = ack {
                self.confirm(lsn);
            }
            return Ok(());
        }
        let sink = self.sink.clone();
        let names = self.names.clone();
        let stats = self.stats.clone();
        let commit_ts = self.batch_commit_ts;
        self.inflight = Some(tokio::spawn(async move {
            let started = Instant::now();
            let outcome = sink.write(&writes, &names).await?;
            stats.record_flush(writes.len() as u64, started.elapsed().as_micros() as u64);
            stats.retries.fetch_add(outcome.retried, Relaxed);
            stats.bulk_requests[0].fetch_add(outcome.requests, Relaxed);
            if ack.is_some() {
                stats.last_durable_commit_us.fetch_max(commit_ts, Relaxed);
            }
            // Count per index first: one stats look-up per index, not per write.
            let mut counts: HashMap<usize, (u64, u64)> = HashMap::new();
            for w in &writes {
                let c = counts.entry(w.index).or_default();
                match w.op {
                    DocOp::Index(_) => c.0 += 1,
                    DocOp::Delete => c.1 += 1,
                }
            }
            for (index, (written, deleted)) in counts {
                if let Some(st) = stats.index(index) {
                    st.docs_written.fetch_add(written, Relaxed);
                    st.docs_deleted.fetch_add(deleted, Relaxed);
                }
            }
            tracing::debug!(
                writes = writes.len(),
                requests = outcome.requests,
                superseded = outcome.superseded,
                ms = started.elapsed().as_millis() as u64,
                "batch flushed"
            );
            Ok((ack, outcome.rejected))
        }));
        Ok(())
    }

    /// Waits for the bulk write in flight, if any, and confirms its LSN.
    async fn settle(&mut self) -> Result<(), EngineError> {
        if let Some(h) = self.inflight.take() {
            let r = h.await;
            self.settled(r).await?;
        }
        Ok(())
    }

    async fn settled(
        &mut self,
        r: Result<Result<Flushed, ferry_opensearch::SinkError>, tokio::task::JoinError>,
    ) -> Result<(), EngineError> {
        match r {
            Ok(Ok((ack, rejected))) => {
                if !rejected.is_empty() {
                    self.on_rejected(rejected).await?;
                }
                if let Some(lsn) = ack {
                    self.confirm(lsn);
                }
                Ok(())
            }
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(EngineError::Stream(format!("bulk write task failed: {e}"))),
        }
    }

    /// Documents the cluster refused for good. Each is first rebuilt from
    /// its current row (the row may have been fixed since the change that
    /// failed) and written again; what is still refused follows the index's
    /// poison policy. Runs before the batch's LSN is confirmed.
    async fn on_rejected(&mut self, rejected: Vec<Rejected>) -> Result<(), EngineError> {
        let mut by_index: HashMap<usize, Vec<Rejected>> = HashMap::new();
        let n = self.indexes.len();
        for r in rejected {
            if Target::of(r.write.index, n).1 == Target::Shadow {
                tracing::warn!(index = %self.names.get(r.write.index).map(String::as_str).unwrap_or(""),
                    id = %r.write.id, "the index being replaced refused a document; the rebuilt index decides");
                continue;
            }
            by_index.entry(r.write.index).or_default().push(r);
        }
        let mut still = Vec::new();
        for (index, list) in by_index {
            let keys: Vec<Vec<String>> = list
                .iter()
                .map(|r| split_doc_id(&r.write.id, self.indexes[index].plan.table.key.len()))
                .collect();
            let version = list
                .iter()
                .map(|r| r.write.version)
                .max()
                .unwrap_or(self.version);
            let mut writes = Vec::new();
            self.build_docs(index, &keys, version, &mut writes).await?;
            let outcome = self.sink.write(&writes, &self.names).await?;
            let reasons: HashMap<&str, &Rejected> =
                list.iter().map(|r| (r.write.id.as_str(), r)).collect();
            for r in outcome.rejected {
                let first = reasons.get(r.write.id.as_str()).copied().cloned();
                still.push(
                    first
                        .map(|f| Rejected {
                            write: r.write.clone(),
                            ..f
                        })
                        .unwrap_or(r),
                );
            }
        }
        let indexes: Vec<(String, ferry_config::PoisonPolicy)> = self
            .indexes
            .iter()
            .map(|ix| {
                let policy = self
                    .cfg
                    .indexes
                    .get(ix.pos)
                    .map(|c| c.on_poison)
                    .unwrap_or_default();
                (ix.alias.clone(), policy)
            })
            .collect();
        crate::poison::apply(&self.sink, &self.cfg, &self.stats, &indexes, still).await
    }

    /// Flushes and confirms everything received, within `limit`; past it,
    /// gives up without confirming (the changes are replayed on restart).
    async fn finish(&mut self, limit: std::time::Duration) -> Result<(), EngineError> {
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
                if let Some(h) = self.inflight.take() {
                    h.abort();
                }
                Ok(())
            }
        }
    }

    /// Stops with the fix when the publication no longer covers a table an
    /// index reads: its changes are no longer streamed, so the index would
    /// silently drift.
    async fn check_publication(&mut self) -> Result<(), EngineError> {
        let oids: Vec<u32> = self
            .indexes
            .iter()
            .flat_map(|ix| ix.plan.usages().into_iter().map(|(oid, _)| oid))
            .collect();
        self.client
            .check_coverage(&self.cfg.source.publication, &oids)
            .await?;
        Ok(())
    }

    /// Writes a transactional logical message so an idle slot still advances
    /// (its Begin/Commit arrive and are confirmed like any transaction).
    async fn heartbeat(&mut self) {
        self.last_event = Instant::now();
        if let Err(e) = self.client.emit_heartbeat().await {
            tracing::warn!(error = %e, "heartbeat failed (needs EXECUTE on pg_logical_emit_message); set source.heartbeat_secs = 0 to turn it off");
        }
    }

    /// Builds the documents of these roots; gone roots become deletes.
    async fn build_docs(
        &mut self,
        index: usize,
        keys: &[Vec<String>],
        version: Lsn,
        writes: &mut Vec<DocWrite>,
    ) -> Result<(), EngineError> {
        let ix = &self.indexes[index];
        self.stats.sql_statements.fetch_add(1, Relaxed);
        crate::build::build_docs(&self.client, ix, keys, version, writes).await
    }

    /// Root keys whose documents a probe's values affect.
    async fn resolve(
        &mut self,
        index: usize,
        probe: &Probe,
        values: HashSet<String>,
    ) -> Result<Vec<Vec<String>>, EngineError> {
        let ix = &self.indexes[index];
        let before = values.len();
        let keys = crate::build::resolve(&self.client, ix, probe, values).await?;
        if !(probe.parent.is_empty()
            && probe.via_join.is_none()
            && ix.plan.table.key == [probe.column.clone()])
        {
            // One statement per 1,000 values (see build::resolve).
            self.stats
                .sql_statements
                .fetch_add(before.div_ceil(1000) as u64, Relaxed);
        }
        Ok(keys)
    }

    /// Records which documents of query-built indexes a change affects.
    fn route_change(&mut self, change: &Change) -> Result<(), EngineError> {
        let Some(rel) = self.relations.get(&change.rel).cloned() else {
            return Err(EngineError::Stream(format!(
                "a change of relation {} arrived before its Relation message",
                change.rel
            )));
        };
        let Some(routes) = self.routes.get(&change.rel).cloned() else {
            return Ok(());
        };
        let images: Vec<&Tuple> = change
            .new
            .iter()
            .chain(change.old.iter().map(|o| &o.tuple))
            .collect();
        let column = |name: &str| rel.columns.iter().position(|c| c.name == name);
        for (index, usage) in routes {
            let plan = &self.indexes[index].plan;
            if usage.path.is_empty() && usage.role == Role::Node {
                let key_pos: Option<Vec<usize>> =
                    plan.table.key.iter().map(|k| column(k)).collect();
                let Some(key_pos) = key_pos else {
                    return Err(EngineError::Stream(format!(
                        "primary key of {} is missing from the replication stream; restart ferry",
                        plan.table.qualified()
                    )));
                };
                for t in &images {
                    let key: Option<Vec<String>> = key_pos
                        .iter()
                        .map(|p| text(t, *p).map(|b| String::from_utf8_lossy(b).into_owned()))
                        .collect();
                    if let Some(key) = key {
                        self.batch.rebuild(index, key);
                    }
                }
                continue;
            }
            let Some((col, probe)) = plan.probe(&usage) else {
                continue;
            };
            let Some(at) = column(&col) else {
                tracing::warn!(table = %rel.name, column = %col, "column used to find documents is missing from the stream");
                continue;
            };
            let values: Vec<String> = images
                .iter()
                .filter_map(|t| text(t, at))
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect();
            if values.is_empty() {
                continue;
            }
            self.batch.bytes += 64 * values.len();
            self.batch
                .probes
                .entry((index, probe))
                .or_default()
                .extend(values);
        }
        Ok(())
    }

    /// TRUNCATE: a root table's index is emptied; a related table's
    /// truncation rebuilds every document of the indexes that read it.
    async fn on_truncate(&mut self, rels: Vec<u32>) -> Result<(), EngineError> {
        let mut empty = Vec::new();
        let mut rebuild_all = Vec::new();
        for r in &rels {
            if let Some(list) = self.roots.get(r) {
                empty.extend(list.iter().copied());
            }
            if let Some(list) = self.routes.get(r) {
                for (index, usage) in list {
                    if usage.path.is_empty() && usage.role == Role::Node {
                        empty.push(*index);
                    } else {
                        rebuild_all.push(*index);
                    }
                }
            }
        }
        empty.sort_unstable();
        empty.dedup();
        rebuild_all.sort_unstable();
        rebuild_all.dedup();
        rebuild_all.retain(|i| !empty.contains(i));
        if empty.is_empty() && rebuild_all.is_empty() {
            return Ok(());
        }
        // Everything before the truncate must land first.
        let writes = self.prepare_writes().await?;
        self.settle().await?;
        if !writes.is_empty() {
            self.sink.write(&writes, &self.names).await?;
        }
        for i in empty {
            self.sink.delete_all(&self.names[i]).await?;
            tracing::info!(index = %self.indexes[i].alias, "root table truncated: removed every document");
        }
        for i in rebuild_all {
            tracing::info!(index = %self.indexes[i].alias, "a related table was truncated: rebuilding every document");
            let names = self.names.clone();
            let ctx = crate::backfill::Ctx {
                cfg: &self.cfg,
                shutdown: &self.shutdown,
                stats: None,
                all_stats: self.stats.clone(),
                checkpoint: None,
                resume_after: None,
            };
            crate::backfill::run(
                &self.client,
                &self.sink,
                &self.indexes[i],
                &names,
                self.version,
                &ctx,
            )
            .await?;
        }
        Ok(())
    }
}

fn text(t: &Tuple, i: usize) -> Option<&[u8]> {
    match t.0.get(i) {
        Some(Datum::Text(b)) | Some(Datum::Binary(b)) => Some(b.as_ref()),
        _ => None,
    }
}

fn key_id(t: &Tuple, key: &[usize]) -> String {
    let parts: Vec<&[u8]> = key.iter().map(|k| text(t, *k).unwrap_or(b"")).collect();
    doc_id(&parts)
}
