//! Capture: the replication stream, decoded into [`Event`]s on a bounded queue.
//!
//! # Progress tracking
//! The stream delivers whole committed transactions in commit order
//! (pgoutput protocol 1: the server decodes a transaction only after it
//! commits). Capture never decides what is safe to confirm: it forwards
//! `Begin`, changes and `Commit` in order, and the worker reports back, via
//! [`AckHandle`], the end LSN of the last transaction whose documents are all
//! durable. Capture hands that to the replication session, which sends it as
//! the flushed/applied position in its standby status updates (also while
//! the stream is idle, so the server never times the session out).
//!
//! Keepalives are forwarded as [`Event::Keepalive`]: when the worker holds
//! nothing unflushed, everything before a keepalive is durable, so its WAL
//! position may be confirmed too, letting the slot advance on a database
//! whose changes are all outside the publication.
//!
//! The queue is bounded: when the worker falls behind, `send` waits, capture
//! stops reading, and TCP flow control holds the server back.

use std::sync::Arc;

use bytes::Bytes;
use ferry_core::Lsn;
use pgwire_replication::{ReplicationClient, ReplicationEvent};
use tokio::sync::{mpsc, watch};

pub use ferry_core::change::{Change, ChangeOp, Event};

use crate::pgoutput::{self, Message};
use crate::{PgParams, SourceError};

/// Where the worker reports the LSN up to which everything is durable.
#[derive(Debug, Clone)]
pub struct AckHandle(watch::Sender<Lsn>);

impl AckHandle {
    /// Confirms `lsn` (monotonic: a lower value is ignored).
    pub fn confirm(&self, lsn: Lsn) {
        self.0.send_if_modified(|cur| {
            if lsn > *cur {
                *cur = lsn;
                true
            } else {
                false
            }
        });
    }

    /// The highest LSN confirmed so far.
    pub fn confirmed(&self) -> Lsn {
        *self.0.borrow()
    }
}

/// A running capture task.
pub struct Capture {
    /// Ordered events; closed when capture ends.
    pub events: mpsc::Receiver<Event>,
    /// Where to confirm durable positions.
    pub ack: AckHandle,
    /// Ends with capture's result.
    pub task: tokio::task::JoinHandle<Result<(), SourceError>>,
    stop: watch::Sender<bool>,
    /// The queue's sending side, to measure its depth without keeping it open.
    queue: mpsc::WeakSender<Event>,
}

impl Capture {
    /// Asks capture to end: the last confirmed position is reported to the
    /// server, then the stream is closed.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Reads how many events wait in the queue at the moment it is called
    /// (0 once capture ended).
    pub fn depth_probe(&self) -> impl Fn() -> usize + Send + Sync + 'static {
        let queue = self.queue.clone();
        move || {
            queue
                .upgrade()
                .map_or(0, |tx| tx.max_capacity() - tx.capacity())
        }
    }
}

/// Starts streaming `slot` from its confirmed position into a queue of `capacity` events.
pub async fn start(
    params: &PgParams,
    slot: &str,
    publication: &str,
    capacity: usize,
) -> Result<Capture, SourceError> {
    let cfg = params.replication(slot, publication);
    let mut client = ReplicationClient::connect(cfg)
        .await
        .map_err(|e| SourceError::from_replication("starting replication", e))?;
    client.wait_started().await.map_err(|e| {
        SourceError::from_replication(&format!("starting replication on slot {slot:?}"), e)
    })?;
    tracing::info!(slot, publication, "replication started");
    let (tx, rx) = mpsc::channel(capacity.max(16));
    let (ack_tx, ack_rx) = watch::channel(Lsn::ZERO);
    let (stop_tx, stop_rx) = watch::channel(false);
    let queue = tx.downgrade();
    let task = tokio::spawn(run(client, tx, ack_rx, stop_rx));
    Ok(Capture {
        events: rx,
        ack: AckHandle(ack_tx),
        task,
        stop: stop_tx,
        queue,
    })
}

async fn run(
    mut client: ReplicationClient,
    tx: mpsc::Sender<Event>,
    mut ack_rx: watch::Receiver<Lsn>,
    mut stop_rx: watch::Receiver<bool>,
) -> Result<(), SourceError> {
    let result = stream(&mut client, &tx, &mut ack_rx, &mut stop_rx).await;
    // Report the last confirmed position before closing: the session sends
    // a status update at most every status interval, so give it one.
    let last = *ack_rx.borrow();
    if last > Lsn::ZERO {
        client.update_applied_lsn(pgwire_replication::Lsn(last.0));
    }
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    client.stop();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), client.shutdown()).await;
    result
}

async fn stream(
    client: &mut ReplicationClient,
    tx: &mpsc::Sender<Event>,
    ack_rx: &mut watch::Receiver<Lsn>,
    stop_rx: &mut watch::Receiver<bool>,
) -> Result<(), SourceError> {
    loop {
        let ev = tokio::select! {
            biased;
            _ = stop_rx.changed() => return Ok(()),
            r = ack_rx.changed() => {
                if r.is_ok() {
                    let lsn = *ack_rx.borrow_and_update();
                    client.update_applied_lsn(pgwire_replication::Lsn(lsn.0));
                }
                continue;
            }
            ev = client.recv() => ev,
        };
        let ev = match ev {
            Ok(Some(ev)) => ev,
            Ok(None) => {
                return Err(SourceError::Unavailable {
                    what: "streaming changes".into(),
                    reason: "the server ended the replication stream".into(),
                })
            }
            Err(e) => return Err(SourceError::from_replication("streaming changes", e)),
        };
        let out = match ev {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => Event::Begin {
                final_lsn: Lsn(final_lsn.0),
                commit_ts: commit_time_micros,
            },
            ReplicationEvent::Commit {
                lsn,
                end_lsn,
                commit_time_micros,
            } => Event::Commit {
                commit_lsn: Lsn(lsn.0),
                end_lsn: Lsn(end_lsn.0),
                commit_ts: commit_time_micros,
            },
            ReplicationEvent::XLogData { data, .. } => match decode(&data)? {
                Some(e) => e,
                None => continue,
            },
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Never wait on a full queue for a keepalive: drop it instead.
                let _ = tx.try_send(Event::Keepalive {
                    wal_end: Lsn(wal_end.0),
                });
                continue;
            }
            ReplicationEvent::StoppedAt { .. } => return Ok(()),
            _ => continue,
        };
        // Back-pressure: wait for room, but keep honouring stop requests.
        tokio::select! {
            biased;
            _ = stop_rx.changed() => return Ok(()),
            r = tx.send(out) => if r.is_err() { return Ok(()) },
        }
    }
}

/// Turns one pgoutput payload into an event (`None` for messages ferry ignores).
pub fn decode(data: &Bytes) -> Result<Option<Event>, SourceError> {
    Ok(match pgoutput::decode(data)? {
        Message::Begin {
            final_lsn,
            commit_ts,
            ..
        } => Some(Event::Begin {
            final_lsn: Lsn(final_lsn),
            commit_ts,
        }),
        Message::Commit {
            commit_lsn,
            end_lsn,
            commit_ts,
            ..
        } => Some(Event::Commit {
            commit_lsn: Lsn(commit_lsn),
            end_lsn: Lsn(end_lsn),
            commit_ts,
        }),
        Message::Relation(r) => Some(Event::Relation(Arc::new(r))),
        Message::Insert { rel, new } => Some(Event::Change(Change {
            rel,
            op: ChangeOp::Insert,
            old: None,
            new: Some(new),
        })),
        Message::Update { rel, old, new } => Some(Event::Change(Change {
            rel,
            op: ChangeOp::Update,
            old,
            new: Some(new),
        })),
        Message::Delete { rel, old } => Some(Event::Change(Change {
            rel,
            op: ChangeOp::Delete,
            old: Some(old),
            new: None,
        })),
        Message::Truncate { rels, .. } => Some(Event::Truncate { rels }),
        Message::Origin { .. } | Message::Type { .. } | Message::Message { .. } => None,
    })
}
