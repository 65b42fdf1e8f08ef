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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use ferry_config::Config;
use ferry_core::schema::{doc_id, quote_ident, quote_literal, DocumentWriter};
use ferry_core::{ColumnShape, DocOp, DocWrite, Lsn};
use ferry_opensearch::Sink;
use ferry_postgres::capture::{self, Change, ChangeOp, Event};
use ferry_postgres::catalog::TypeResolver;
use ferry_postgres::pgoutput::{Datum, Relation, Tuple};
use ferry_postgres::SourceError;
use futures_util::{pin_mut, StreamExt};
use tokio_postgres::Client;

use crate::rows::{LineSplitter, RowBuf};
use crate::setup::{IndexRuntime, Prepared};
use crate::{EngineError, Shutdown};

/// How one index reads the tuples of one relation (rebuilt on every Relation message).
struct Projection {
    index: usize,
    writer: DocumentWriter,
    /// Tuple position of each document column.
    cols: Vec<usize>,
    /// Tuple positions of the primary-key columns.
    key: Vec<usize>,
}

/// A document to re-read: its id, version and primary-key texts.
type Refetch = (String, Lsn, Vec<Vec<u8>>);

/// A write waiting in the current batch.
enum Pending {
    Write(DocWrite),
    /// The document must be re-read from the table (an unchanged TOAST value was not sent).
    Fetch {
        index: usize,
        id: String,
        version: Lsn,
        key: Vec<Vec<u8>>,
    },
}

#[derive(Default)]
struct Batch {
    slots: HashMap<(usize, String), usize>,
    items: Vec<Pending>,
    changes: usize,
    bytes: usize,
    ack: Option<Lsn>,
    since: Option<Instant>,
}

impl Batch {
    fn push(&mut self, index: usize, id: String, item: Pending) {
        self.bytes += match &item {
            Pending::Write(w) => w.weight(),
            Pending::Fetch { .. } => 64,
        };
        match self.slots.get(&(index, id.clone())) {
            Some(&at) => self.items[at] = item,
            None => {
                self.slots.insert((index, id), self.items.len());
                self.items.push(item);
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.items.is_empty() && self.ack.is_none()
    }
}

struct Worker {
    client: Client,
    types: TypeResolver,
    sink: Sink,
    indexes: Vec<IndexRuntime>,
    names: Vec<String>,
    /// Root table OID → index positions.
    roots: HashMap<u32, Vec<usize>>,
    /// Relation OID → how each index reads it.
    projections: HashMap<u32, Vec<Projection>>,
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

type Inflight = tokio::task::JoinHandle<Result<Option<Lsn>, ferry_opensearch::SinkError>>;

/// Streams changes until shutdown or a failure.
pub async fn stream(
    cfg: &Config,
    prepared: Prepared,
    shutdown: &mut Shutdown,
) -> Result<(), EngineError> {
    let Prepared {
        params,
        client,
        types,
        sink,
        indexes,
    } = prepared;
    let mut capture = capture::start(
        &params,
        &cfg.source.slot,
        &cfg.source.publication,
        cfg.engine.queue_capacity,
    )
    .await?;
    let mut roots: HashMap<u32, Vec<usize>> = HashMap::new();
    for ix in &indexes {
        roots.entry(ix.shape.oid).or_default().push(ix.pos);
    }
    let mut w = Worker {
        client,
        types,
        sink,
        names: indexes.iter().map(|i| i.concrete.clone()).collect(),
        indexes,
        roots,
        projections: HashMap::new(),
        relations: HashMap::new(),
        batch: Batch::default(),
        ack: capture.ack.clone(),
        in_txn: false,
        version: Lsn::ZERO,
        inflight: None,
        follow_shape: cfg.indexes.iter().map(|i| i.columns.is_none()).collect(),
        last_event: Instant::now(),
    };
    tracing::info!("streaming changes");
    let max_delay = cfg.engine.max_batch_delay();
    let heartbeat = cfg.source.heartbeat();
    let mut joined = false;
    let result: Result<(), EngineError> = loop {
        let deadline = w.batch.since.map(|t| t + max_delay);
        let beat_at = heartbeat.map(|h| w.last_event + h);
        let ev = tokio::select! {
            biased;
            _ = shutdown.changed() => {
                tracing::info!("stopping: flushing the in-flight batch");
                break w.finish(cfg.engine.shutdown_timeout()).await;
            }
            r = wait_inflight(&mut w.inflight) => {
                w.inflight = None;
                if let Err(e) = w.settled(r) { break Err(e); }
                w.ack_if_nothing_pending();
                continue;
            }
            _ = sleep_until(deadline), if deadline.is_some() => {
                if let Err(e) = w.dispatch().await { break Err(e); }
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
    // Capture reports the last confirmed position to the server, then closes the stream.
    capture.stop();
    if !joined {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), &mut capture.task).await;
    }
    tracing::info!(confirmed = %capture.ack.confirmed(), "stream closed");
    result
}

async fn wait_inflight(
    inflight: &mut Option<Inflight>,
) -> Result<Result<Option<Lsn>, ferry_opensearch::SinkError>, tokio::task::JoinError> {
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
    /// Confirms at once a commit that left nothing to write (every write
    /// of its transaction is already durable, or it had none).
    fn ack_if_nothing_pending(&mut self) {
        if self.batch.items.is_empty() && self.inflight.is_none() {
            if let Some(lsn) = self.batch.ack.take() {
                self.ack.confirm(lsn);
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
            }
            Event::Commit { end_lsn, .. } => {
                self.in_txn = false;
                self.batch.ack = Some(end_lsn);
                self.batch.since.get_or_insert_with(Instant::now);
            }
            Event::Relation(rel) => self.on_relation(rel).await?,
            Event::Change(change) => {
                self.batch.changes += 1;
                self.batch.since.get_or_insert_with(Instant::now);
                self.on_change(change)?;
            }
            Event::Truncate { rels } => {
                let hit: Vec<usize> = rels
                    .iter()
                    .filter_map(|r| self.roots.get(r))
                    .flatten()
                    .copied()
                    .collect();
                if !hit.is_empty() {
                    // Everything before the truncate must land first.
                    let writes = self.prepare_writes().await?;
                    self.settle().await?;
                    if !writes.is_empty() {
                        self.sink.write(&writes, &self.names).await?;
                    }
                    for i in hit {
                        let name = &self.names[i];
                        self.sink.delete_all(name).await?;
                        tracing::info!(index = %self.indexes[i].alias, "root table truncated: removed every document");
                    }
                }
            }
            Event::Keepalive { wal_end } => {
                if !self.in_txn && self.batch.is_idle() && self.inflight.is_none() {
                    self.ack.confirm(wal_end);
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
        let mut added = serde_json::Map::new();
        let mut columns = Vec::with_capacity(rel.columns.len());
        for rc in &rel.columns {
            let old = self.indexes[pos]
                .shape
                .columns
                .iter()
                .find(|c| c.name == rc.name)
                .cloned();
            let column = match old {
                Some(c) if c.type_oid == rc.type_oid => c,
                Some(c) => {
                    let kind = self.types.resolve(&self.client, rc.type_oid).await?;
                    tracing::warn!(
                        index = %self.indexes[pos].alias,
                        column = %rc.name,
                        "column changed type; the index mapping keeps {}; documents that no longer fit are rejected: run a reindex after such a change",
                        c.kind.mapping()
                    );
                    ColumnShape {
                        name: rc.name.clone(),
                        type_oid: rc.type_oid,
                        kind,
                    }
                }
                None => {
                    let kind = self.types.resolve(&self.client, rc.type_oid).await?;
                    added.insert(rc.name.clone(), kind.mapping());
                    ColumnShape {
                        name: rc.name.clone(),
                        type_oid: rc.type_oid,
                        kind,
                    }
                }
            };
            columns.push(column);
        }
        let ix = &mut self.indexes[pos];
        for gone in ix
            .shape
            .columns
            .iter()
            .filter(|c| !rel.columns.iter().any(|rc| rc.name == c.name))
        {
            tracing::info!(index = %ix.alias, column = %gone.name, "column dropped from the table; it leaves the documents");
        }
        ix.shape.columns = columns;
        if !added.is_empty() {
            let names: Vec<String> = added.keys().cloned().collect();
            match self.sink.extend_mapping(&self.names[pos], added).await {
                Ok(()) => {
                    tracing::info!(index = %self.indexes[pos].alias, columns = ?names, "new columns: extended the index mapping")
                }
                Err(e) => {
                    tracing::error!(index = %self.indexes[pos].alias, columns = ?names, error = %e, "new columns: the index mapping could not be extended")
                }
            }
        }
        Ok(())
    }

    fn on_change(&mut self, change: Change) -> Result<(), EngineError> {
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
                            let w = DocWrite {
                                index: p.index,
                                id: old_id.clone(),
                                version,
                                op: DocOp::Delete,
                            };
                            self.batch.push(p.index, old_id, Pending::Write(w));
                        }
                    }
                    let unchanged = p
                        .cols
                        .iter()
                        .any(|c| matches!(new.0.get(*c), Some(Datum::Unchanged)));
                    if unchanged {
                        let key = p
                            .key
                            .iter()
                            .map(|k| text(new, *k).unwrap_or(b"").to_vec())
                            .collect();
                        self.batch.push(
                            p.index,
                            id.clone(),
                            Pending::Fetch {
                                index: p.index,
                                id,
                                version,
                                key,
                            },
                        );
                        continue;
                    }
                    let mut body = Vec::with_capacity(128);
                    p.writer
                        .write(|i| p.cols.get(i).and_then(|c| text(new, *c)), &mut body);
                    let w = DocWrite {
                        index: p.index,
                        id: id.clone(),
                        version,
                        op: DocOp::Index(body),
                    };
                    self.batch.push(p.index, id, Pending::Write(w));
                }
                ChangeOp::Delete => {
                    let Some(old) = &change.old else { continue };
                    let id = key_id(&old.tuple, &p.key);
                    let w = DocWrite {
                        index: p.index,
                        id: id.clone(),
                        version,
                        op: DocOp::Delete,
                    };
                    self.batch.push(p.index, id, Pending::Write(w));
                }
            }
        }
        Ok(())
    }

    /// Takes the batch's pending items and resolves re-reads into writes.
    async fn prepare_writes(&mut self) -> Result<Vec<DocWrite>, EngineError> {
        let items = std::mem::take(&mut self.batch.items);
        self.batch.slots.clear();
        self.batch.bytes = 0;
        let mut writes = Vec::with_capacity(items.len());
        let mut fetches: HashMap<usize, Vec<Refetch>> = HashMap::new();
        for it in items {
            match it {
                Pending::Write(w) => writes.push(w),
                Pending::Fetch {
                    index,
                    id,
                    version,
                    key,
                } => fetches.entry(index).or_default().push((id, version, key)),
            }
        }
        for (index, wanted) in fetches {
            self.fetch_rows(index, wanted, &mut writes).await?;
        }
        Ok(writes)
    }

    /// Closes the current batch: waits for the previous bulk write (so
    /// writes reach the sink in stream order), then sends this one in the
    /// background while the next batch fills. Its LSN is confirmed when it
    /// completes (see [`Worker::settled`]).
    async fn dispatch(&mut self) -> Result<(), EngineError> {
        let writes = self.prepare_writes().await?;
        let ack = self.batch.ack.take();
        self.batch.since = None;
        self.batch.changes = 0;
        self.settle().await?;
        if writes.is_empty() {
            if let Some(lsn) = ack {
                self.ack.confirm(lsn);
            }
            return Ok(());
        }
        let sink = self.sink.clone();
        let names = self.names.clone();
        self.inflight = Some(tokio::spawn(async move {
            let started = Instant::now();
            let outcome = sink.write(&writes, &names).await?;
            tracing::debug!(
                writes = writes.len(),
                requests = outcome.requests,
                superseded = outcome.superseded,
                ms = started.elapsed().as_millis() as u64,
                "batch flushed"
            );
            Ok(ack)
        }));
        Ok(())
    }

    /// Waits for the bulk write in flight, if any, and confirms its LSN.
    async fn settle(&mut self) -> Result<(), EngineError> {
        if let Some(h) = self.inflight.take() {
            let r = h.await;
            self.settled(r)?;
        }
        Ok(())
    }

    fn settled(
        &mut self,
        r: Result<Result<Option<Lsn>, ferry_opensearch::SinkError>, tokio::task::JoinError>,
    ) -> Result<(), EngineError> {
        match r {
            Ok(Ok(Some(lsn))) => {
                self.ack.confirm(lsn);
                Ok(())
            }
            Ok(Ok(None)) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(EngineError::Stream(format!("bulk write task failed: {e}"))),
        }
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

    /// Writes a transactional logical message so an idle slot still advances
    /// (its Begin/Commit arrive and are confirmed like any transaction).
    async fn heartbeat(&mut self) {
        self.last_event = Instant::now();
        if let Err(e) = self
            .client
            .execute(
                "SELECT pg_logical_emit_message(true, 'ferry_heartbeat', '')",
                &[],
            )
            .await
        {
            tracing::warn!(error = %e, "heartbeat failed (needs EXECUTE on pg_logical_emit_message); set source.heartbeat_secs = 0 to turn it off");
        }
    }

    /// Re-reads rows by key (for TOAST values the stream did not carry) and
    /// turns them into writes; rows gone from the table become deletes.
    async fn fetch_rows(
        &mut self,
        index: usize,
        wanted: Vec<Refetch>,
        writes: &mut Vec<DocWrite>,
    ) -> Result<(), EngineError> {
        let shape = &self.indexes[index].shape;
        let mut names: Vec<&str> = shape.columns.iter().map(|c| c.name.as_str()).collect();
        let mut key_pos = Vec::new();
        for k in &shape.key {
            match names.iter().position(|n| n == k) {
                Some(p) => key_pos.push(p),
                None => {
                    names.push(k);
                    key_pos.push(names.len() - 1);
                }
            }
        }
        let cols = names
            .iter()
            .map(|n| quote_ident(n))
            .collect::<Vec<_>>()
            .join(", ");
        let key_cols = shape
            .key
            .iter()
            .map(|k| quote_ident(k))
            .collect::<Vec<_>>()
            .join(", ");
        let tuples = wanted
            .iter()
            .map(|(_, _, key)| {
                let parts: Vec<String> = key
                    .iter()
                    .map(|k| quote_literal(&String::from_utf8_lossy(k)))
                    .collect();
                format!("({})", parts.join(", "))
            })
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "COPY (SELECT {cols} FROM {} WHERE ({key_cols}) IN ({tuples})) TO STDOUT",
            shape.qualified()
        );
        let stream = self.client.copy_out(sql.as_str()).await.map_err(|e| {
            SourceError::from_pg(&format!("re-reading rows of {}", shape.qualified()), e)
        })?;
        pin_mut!(stream);
        let mut versions: HashMap<&str, Lsn> =
            wanted.iter().map(|(id, v, _)| (id.as_str(), *v)).collect();
        let writer = DocumentWriter::new(&shape.columns);
        let mut row = RowBuf::default();
        let mut lines = LineSplitter::default();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                SourceError::from_pg(&format!("re-reading rows of {}", shape.qualified()), e)
            })?;
            lines.feed(&chunk, |line| {
                row.parse(line);
                let keys: Vec<&[u8]> = key_pos
                    .iter()
                    .map(|p| row.field(*p).unwrap_or(b""))
                    .collect();
                let id = doc_id(&keys);
                if let Some(version) = versions.remove(id.as_str()) {
                    let mut body = Vec::new();
                    writer.write(|i| row.field(i), &mut body);
                    writes.push(DocWrite {
                        index,
                        id,
                        version,
                        op: DocOp::Index(body),
                    });
                }
            });
        }
        for (id, version) in versions {
            writes.push(DocWrite {
                index,
                id: id.to_string(),
                version,
                op: DocOp::Delete,
            });
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
