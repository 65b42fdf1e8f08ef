//! `FastSink`: an in-process, in-memory OpenSearch double built for speed.
//!
//! [`Osmem`](crate::Osmem) is the faithful test server; `FastSink` trades
//! breadth for throughput so that benchmarks measure ferry rather than the
//! sink. It serves HTTP/1.1 with hyper (`Content-Length` bodies only,
//! keep-alive, pipelining) and just enough of the OpenSearch REST API for
//! ferry's index lifecycle and `_bulk` writes:
//!
//! * `GET /`, `GET /_cluster/health`
//! * `PUT /{index}`, `HEAD /{index}`, `GET /{index}`, `DELETE /{index}`
//! * `GET|PUT /{index}/_mapping` (`properties` merged, `_meta` replaced)
//! * `PUT /{index}/_settings` (acknowledged, ignored)
//! * `GET /_alias/{alias}`, `GET /{index}/_alias`, `HEAD /_alias/{alias}`,
//!   `POST /_aliases` (`add`, `remove`, `remove_index`, applied atomically)
//! * `POST /_bulk`, `POST /{index}/_bulk` (`index`, `create`, `delete`;
//!   internal, `external` and `external_gte` versioning, with tombstones)
//! * `POST /{index}/_refresh`, `POST /{index}/_delete_by_query` (`match_all`),
//!   `GET /{index}/_count`, `GET /{index}/_doc/{id}`
//!
//! Documents are stored as the raw bytes of their source line: the bulk
//! action lines are parsed into small borrowed structs, the source is only
//! checked to be a well-formed JSON object and never turned into a tree.
//!
//! One file per concern: `http.rs` (hyper, limits, routing), `store.rs`
//! (indexes, documents, aliases), `indices.rs` (index lifecycle and
//! mappings), `aliases.rs`, `search.rs` (refresh, count, get, delete by
//! query), `ndjson.rs` (parsing bulk bodies) and `bulk.rs` (versioning and
//! applying bulk actions).
//!
//! The server runs on its own thread with its own single-threaded tokio
//! runtime, so it works the same from synchronous and asynchronous callers,
//! and stops when the [`FastSink`] is dropped.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde::de::{self, Deserializer, IgnoredAny, Visitor};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::net::{TcpListener, TcpStream};

use crate::error::{Result, TestkitError};

mod aliases;
mod bulk;
mod http;
mod indices;
mod ndjson;
mod search;
mod store;
#[cfg(test)]
mod tests;

use aliases::*;
use bulk::*;
use http::*;
use indices::*;
use ndjson::*;
use search::*;
use store::*;

/// The OpenSearch version FastSink claims to be.
pub(super) const VERSION_NUMBER: &str = "2.19.0";

/// Counters of what the sink has received since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FastSinkStats {
    /// HTTP requests of any kind.
    pub requests: u64,
    /// `_bulk` requests.
    pub bulk_requests: u64,
    /// Actions in those bulk requests.
    pub bulk_items: u64,
    /// Bulk items refused with 409 (version conflict or existing document).
    pub bulk_conflicts: u64,
    /// Bulk items refused with another error status (400, 404 on a missing index, …).
    pub bulk_errors: u64,
    /// Request bytes read, heads and bodies together.
    pub bytes_received: u64,
}

impl FastSinkStats {
    /// What was counted between `earlier` and `self`.
    pub fn since(&self, earlier: &FastSinkStats) -> FastSinkStats {
        FastSinkStats {
            requests: self.requests.saturating_sub(earlier.requests),
            bulk_requests: self.bulk_requests.saturating_sub(earlier.bulk_requests),
            bulk_items: self.bulk_items.saturating_sub(earlier.bulk_items),
            bulk_conflicts: self.bulk_conflicts.saturating_sub(earlier.bulk_conflicts),
            bulk_errors: self.bulk_errors.saturating_sub(earlier.bulk_errors),
            bytes_received: self.bytes_received.saturating_sub(earlier.bytes_received),
        }
    }
}

/// What happened to one bulk action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemOutcome {
    /// A new document was stored (201).
    Created,
    /// An existing document was replaced (200).
    Updated,
    /// A document was deleted (200).
    Deleted,
    /// A delete found no document (404); its version is still remembered.
    NotFound,
    /// Refused because the stored version wins or the document exists (409).
    Conflict,
    /// Refused for another reason, with this status.
    Rejected(u16),
}

impl ItemOutcome {
    /// The HTTP status OpenSearch reports for this outcome.
    pub fn status(self) -> u16 {
        match self {
            ItemOutcome::Created => 201,
            ItemOutcome::Updated | ItemOutcome::Deleted => 200,
            ItemOutcome::NotFound => 404,
            ItemOutcome::Conflict => 409,
            ItemOutcome::Rejected(s) => s,
        }
    }

    /// True when the action changed the stored state.
    pub fn applied(self) -> bool {
        matches!(
            self,
            ItemOutcome::Created | ItemOutcome::Updated | ItemOutcome::Deleted
        )
    }
}

/// One action of a bulk request, as reported to subscribers.
#[derive(Debug, Clone)]
pub struct ItemArrival {
    /// Concrete index written to (or the name given, when it did not resolve).
    pub index: Arc<str>,
    /// Document id.
    pub id: String,
    /// Version the action carried or was given (0 when refused before versioning).
    pub version: u64,
    /// What happened.
    pub outcome: ItemOutcome,
}

/// Every action of one bulk request, reported after it was applied.
#[derive(Debug, Clone)]
pub struct BulkArrival {
    /// When the request's body had been read completely.
    pub received: Instant,
    /// The actions, in request order.
    pub items: Vec<ItemArrival>,
}

/// A running in-memory OpenSearch double; stops when dropped.
pub struct FastSink {
    url: String,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for FastSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FastSink").field("url", &self.url).finish()
    }
}

impl FastSink {
    /// Binds 127.0.0.1 on a free port and starts serving on a dedicated thread.
    pub fn start() -> Result<FastSink> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
            .map_err(|e| TestkitError::io("binding FastSink to 127.0.0.1:0", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| TestkitError::io("reading FastSink's listening address", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| TestkitError::io("making FastSink's listener non-blocking", e))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TestkitError::io("building FastSink's tokio runtime", e))?;

        let shared = Arc::new(Shared::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let server_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("fastsink".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            let _ = ready_tx.send(Ok(()));
                            accept_loop(listener, server_shared, stop_rx).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })
            .map_err(|e| TestkitError::io("spawning the FastSink thread", e))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(TestkitError::io("registering FastSink's listener", e));
            }
            Err(_) => {
                let _ = thread.join();
                return Err(TestkitError::io(
                    "starting FastSink",
                    std::io::Error::other("the server thread ended before it was ready"),
                ));
            }
        }
        let url = format!("http://{addr}");
        tracing::debug!(%url, "ferry-testkit: FastSink started");
        Ok(FastSink {
            url,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Base URL, e.g. `http://127.0.0.1:40123` (no trailing slash).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Live documents in an index, or in every index behind an alias; 0 when
    /// the name is unknown.
    pub fn doc_count(&self, index_or_alias: &str) -> usize {
        let state = self.shared.lock();
        state
            .read_targets(index_or_alias)
            .iter()
            .filter_map(|name| state.indices.get(name))
            .map(|ix| ix.live)
            .sum()
    }

    /// A live document's version and source bytes.
    pub fn get(&self, index_or_alias: &str, id: &str) -> Option<(u64, Vec<u8>)> {
        let state = self.shared.lock();
        state
            .read_targets(index_or_alias)
            .iter()
            .filter_map(|name| state.indices.get(name))
            .find_map(|ix| {
                let doc = ix.docs.get(id)?;
                let source = doc.source.as_ref()?;
                Some((doc.version, source.to_vec()))
            })
    }

    /// When the latest accepted write (index or delete) of a document arrived;
    /// deleted documents keep the time of their delete.
    pub fn last_write(&self, index_or_alias: &str, id: &str) -> Option<Instant> {
        let state = self.shared.lock();
        state
            .read_targets(index_or_alias)
            .iter()
            .filter_map(|name| state.indices.get(name))
            .find_map(|ix| ix.docs.get(id).map(|d| d.at))
    }

    /// Ids of every live document, sorted.
    pub fn ids(&self, index_or_alias: &str) -> Vec<String> {
        let state = self.shared.lock();
        let mut out: Vec<String> = state
            .read_targets(index_or_alias)
            .iter()
            .filter_map(|name| state.indices.get(name))
            .flat_map(|ix| {
                ix.docs
                    .iter()
                    .filter(|(_, d)| d.source.is_some())
                    .map(|(id, _)| id.clone())
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// The concrete indexes a name stands for (itself, or an alias's targets).
    pub fn resolve(&self, index_or_alias: &str) -> Vec<String> {
        self.shared.lock().read_targets(index_or_alias)
    }

    /// Every concrete index, sorted.
    pub fn indices(&self) -> Vec<String> {
        self.shared.lock().indices.keys().cloned().collect()
    }

    /// The counters so far.
    pub fn stats(&self) -> FastSinkStats {
        self.shared.counters.snapshot()
    }

    /// A channel receiving one [`BulkArrival`] per bulk request from now on.
    ///
    /// Drain it promptly (messages queue up unbounded); dropping the receiver
    /// unsubscribes. Nothing is recorded while nobody subscribes.
    pub fn subscribe(&self) -> mpsc::Receiver<BulkArrival> {
        let (tx, rx) = mpsc::channel();
        let mut subs = lock(&self.shared.subscribers);
        subs.push(tx);
        self.shared.has_subscribers.store(true, Ordering::Release);
        rx
    }

    /// Blocks until `index_or_alias` holds exactly `count` live documents;
    /// false on timeout.
    pub fn wait_for_count(&self, index_or_alias: &str, count: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |state| {
            state
                .read_targets(index_or_alias)
                .iter()
                .filter_map(|name| state.indices.get(name))
                .map(|ix| ix.live)
                .sum::<usize>()
                == count
        })
    }

    /// Blocks until a live document `id` exists in `index_or_alias`; false on timeout.
    pub fn wait_for_doc(&self, index_or_alias: &str, id: &str, timeout: Duration) -> bool {
        self.wait_until(timeout, |state| {
            state
                .read_targets(index_or_alias)
                .iter()
                .filter_map(|name| state.indices.get(name))
                .any(|ix| ix.docs.get(id).is_some_and(|d| d.source.is_some()))
        })
    }

    fn wait_until(&self, timeout: Duration, mut done: impl FnMut(&State) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if done(&state) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = match self.shared.changed.wait_timeout(state, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

impl Drop for FastSink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
