//! `FastSink`: an in-process, in-memory OpenSearch double built for speed.
//!
//! [`Osmem`](crate::Osmem) is the faithful test server; `FastSink` trades
//! breadth for throughput so that benchmarks measure ferry rather than the
//! sink. It speaks just enough HTTP/1.1 (request line, headers,
//! `Content-Length` bodies, keep-alive, pipelining) and just enough of the
//! OpenSearch REST API for ferry's index lifecycle and `_bulk` writes:
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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::error::{Result, TestkitError};

/// Largest request head (request line plus headers) accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest request body accepted, like OpenSearch's default `http.max_content_length`.
const MAX_BODY_BYTES: usize = 100 * 1024 * 1024;
/// Bodies over the limit but at most this big are read and discarded so the
/// client sees the 413; anything bigger gets the 413 and a closed connection.
const DRAIN_LIMIT: usize = 1024 * 1024 * 1024;
/// The OpenSearch version FastSink claims to be.
const VERSION_NUMBER: &str = "2.19.0";

// ---------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------

/// One stored document, or the tombstone of a deleted one.
struct Doc {
    version: u64,
    seq_no: u64,
    /// `None` for a tombstone.
    source: Option<Box<[u8]>>,
    /// When the write that produced this state arrived.
    at: Instant,
}

/// One concrete index.
struct Index {
    name: Arc<str>,
    docs: HashMap<String, Doc>,
    /// Documents with a source (tombstones excluded).
    live: usize,
    next_seq_no: u64,
    /// The `mappings` object (`properties`, `_meta`, …).
    mappings: Map<String, Value>,
    settings: Value,
}

impl Index {
    fn new(name: &str, mappings: Map<String, Value>, settings: Value) -> Index {
        Index {
            name: Arc::from(name),
            docs: HashMap::new(),
            live: 0,
            next_seq_no: 0,
            mappings,
            settings,
        }
    }
}

#[derive(Default)]
struct State {
    indices: BTreeMap<String, Index>,
    /// Alias → its concrete indexes.
    aliases: BTreeMap<String, BTreeSet<String>>,
    /// Counter for generated document ids.
    auto_ids: u64,
}

impl State {
    /// Concrete indexes a read (count, get, refresh, …) of `expr` touches.
    /// Unknown names contribute nothing.
    fn read_targets(&self, expr: &str) -> Vec<String> {
        self.resolve(expr).unwrap_or_default()
    }

    /// Concrete indexes named by a comma-separated list of names, aliases and
    /// `*` patterns; `Err(name)` for the first name matching nothing.
    fn resolve(&self, expr: &str) -> std::result::Result<Vec<String>, String> {
        let mut out = BTreeSet::new();
        for part in expr.split(',').filter(|p| !p.is_empty()) {
            if part == "_all" {
                out.extend(self.indices.keys().cloned());
            } else if part.contains('*') {
                out.extend(
                    self.indices
                        .keys()
                        .filter(|n| glob(part, n))
                        .cloned()
                        .chain(
                            self.aliases
                                .iter()
                                .filter(|(a, _)| glob(part, a))
                                .flat_map(|(_, t)| t.iter().cloned()),
                        ),
                );
            } else if self.indices.contains_key(part) {
                out.insert(part.to_owned());
            } else if let Some(targets) = self.aliases.get(part) {
                out.extend(targets.iter().cloned());
            } else {
                return Err(part.to_owned());
            }
        }
        Ok(out.into_iter().collect())
    }

    fn aliases_of(&self, index: &str) -> Vec<&str> {
        self.aliases
            .iter()
            .filter(|(_, t)| t.contains(index))
            .map(|(a, _)| a.as_str())
            .collect()
    }

    /// The concrete index a write to `name` lands in, creating it when
    /// nothing has that name (OpenSearch's automatic index creation).
    fn write_target(&mut self, name: &str, create: bool) -> std::result::Result<Arc<str>, Fail> {
        if let Some(ix) = self.indices.get(name) {
            return Ok(Arc::clone(&ix.name));
        }
        if let Some(targets) = self.aliases.get(name) {
            let mut it = targets.iter();
            return match (it.next(), it.next()) {
                (Some(only), None) => self
                    .indices
                    .get(only)
                    .map(|ix| Arc::clone(&ix.name))
                    .ok_or_else(|| Fail::index_not_found(name)),
                _ => Err(Fail::new(
                    400,
                    "illegal_argument_exception",
                    format!(
                        "no write index is defined for alias [{name}]. The write request \
                         cannot be executed because the alias points to multiple indices"
                    ),
                )),
            };
        }
        if !create {
            return Err(Fail::index_not_found(name));
        }
        if let Some(why) = invalid_index_name(name) {
            return Err(Fail::new(
                400,
                "invalid_index_name_exception",
                format!("Invalid index name [{name}], {why}"),
            ));
        }
        let ix = Index::new(name, Map::new(), json!({}));
        let arc = Arc::clone(&ix.name);
        self.indices.insert(name.to_owned(), ix);
        Ok(arc)
    }
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    bulk_requests: AtomicU64,
    bulk_items: AtomicU64,
    bulk_conflicts: AtomicU64,
    bulk_errors: AtomicU64,
    bytes_received: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> FastSinkStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FastSinkStats {
            requests: get(&self.requests),
            bulk_requests: get(&self.bulk_requests),
            bulk_items: get(&self.bulk_items),
            bulk_conflicts: get(&self.bulk_conflicts),
            bulk_errors: get(&self.bulk_errors),
            bytes_received: get(&self.bytes_received),
        }
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled after every change of `state`.
    changed: Condvar,
    counters: Counters,
    subscribers: Mutex<Vec<mpsc::Sender<BulkArrival>>>,
    has_subscribers: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn publish(&self, arrival: BulkArrival) {
        let mut subs = lock(&self.subscribers);
        subs.retain(|tx| tx.send(arrival.clone()).is_ok());
        if subs.is_empty() {
            self.has_subscribers.store(false, Ordering::Release);
        }
    }
}

/// Locks a mutex, carrying on when a panicking holder poisoned it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An OpenSearch-style failure: status, error type and reason.
#[derive(Debug, Clone)]
struct Fail {
    status: u16,
    kind: &'static str,
    reason: String,
}

impl Fail {
    fn new(status: u16, kind: &'static str, reason: impl Into<String>) -> Fail {
        Fail {
            status,
            kind,
            reason: reason.into(),
        }
    }

    fn index_not_found(name: &str) -> Fail {
        Fail::new(
            404,
            "index_not_found_exception",
            format!("no such index [{name}]"),
        )
    }
}

/// OpenSearch's index-name rules; the reason when `name` breaks one.
fn invalid_index_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("must not be empty");
    }
    if name.len() > 255 {
        return Some("index name is too long, (> 255)");
    }
    if name.starts_with(['_', '-', '+']) {
        return Some("must not start with '_', '-', or '+'");
    }
    if name == "." || name == ".." {
        return Some("must not be '.' or '..'");
    }
    if name.chars().any(|c| c.is_uppercase()) {
        return Some("must be lowercase");
    }
    if name.chars().any(|c| {
        matches!(
            c,
            '\\' | '/' | '*' | '?' | '"' | '<' | '>' | '|' | ' ' | ',' | '#' | ':'
        )
    }) {
        return Some(
            "must not contain the following characters [ , \", *, \\, <, |, ,, >, /, ?, #, :]",
        );
    }
    None
}

/// Matches `text` against a pattern where `*` stands for any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let mut rest = text;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(p) => rest = &rest[p + part.len()..],
                None => return false,
            }
        }
    }
    rest.is_empty()
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((sock, _)) => {
                    tokio::spawn(serve_connection(sock, Arc::clone(&shared)));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "ferry-testkit: FastSink accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

async fn serve_connection(mut sock: TcpStream, shared: Arc<Shared>) {
    let _ = sock.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        match serve_request(&mut sock, &mut buf, &shared).await {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                tracing::trace!(error = %e, "ferry-testkit: FastSink connection ended");
                break;
            }
        }
    }
}

/// The parts of a request head FastSink cares about.
#[derive(Debug)]
struct Head {
    method: String,
    path: String,
    query: String,
    content_length: usize,
    keep_alive: bool,
    /// A `Transfer-Encoding` other than `identity` was sent.
    transfer_encoded: bool,
    /// A `Content-Encoding` other than `identity` was sent.
    content_encoded: bool,
    expect_continue: bool,
}

/// A response about to be written.
struct Reply {
    status: u16,
    body: Vec<u8>,
    /// Close the connection after writing it.
    close: bool,
}

impl Reply {
    fn json(status: u16, value: &Value) -> Reply {
        Reply {
            status,
            body: value.to_string().into_bytes(),
            close: false,
        }
    }

    fn ok() -> Reply {
        Reply::json(200, &json!({"acknowledged": true}))
    }

    fn fail(f: &Fail, index: Option<&str>) -> Reply {
        let mut cause = json!({"type": f.kind, "reason": f.reason});
        if let Some(ix) = index {
            cause["index"] = json!(ix);
            cause["index_uuid"] = json!("_na_");
        }
        let mut error = cause.clone();
        error["root_cause"] = json!([cause]);
        Reply::json(f.status, &json!({"error": error, "status": f.status}))
    }

    fn error(status: u16, kind: &'static str, reason: impl Into<String>) -> Reply {
        Reply::fail(&Fail::new(status, kind, reason), None)
    }

    fn closing(mut self) -> Reply {
        self.close = true;
        self
    }
}

/// Reads, answers and writes one request; `Ok(false)` when the connection should close.
async fn serve_request(
    sock: &mut TcpStream,
    buf: &mut BytesMut,
    shared: &Shared,
) -> std::io::Result<bool> {
    let head_len = loop {
        if let Some(end) = find_head_end(buf) {
            break end;
        }
        if buf.len() > MAX_HEAD_BYTES {
            let reply = Reply::error(
                431,
                "too_long_frame_exception",
                format!("the request head is longer than {MAX_HEAD_BYTES} bytes"),
            );
            write_reply(sock, false, reply.closing()).await?;
            return Ok(false);
        }
        if sock.read_buf(buf).await? == 0 {
            return Ok(false);
        }
    };
    let raw_head = buf.split_to(head_len);
    Counters::add(&shared.counters.requests, 1);
    Counters::add(&shared.counters.bytes_received, head_len as u64);
    let head = match parse_head(&raw_head) {
        Ok(h) => h,
        Err(why) => {
            let reply = Reply::error(400, "bad_request", why).closing();
            write_reply(sock, false, reply).await?;
            return Ok(false);
        }
    };
    let is_head = head.method == "HEAD";
    if head.transfer_encoded {
        let reply = Reply::error(
            411,
            "length_required",
            "FastSink needs a Content-Length header; Transfer-Encoding (chunked) \
             request bodies are not supported",
        );
        write_reply(sock, is_head, reply.closing()).await?;
        return Ok(false);
    }
    let len = head.content_length;
    if len > MAX_BODY_BYTES {
        let reply = Reply::error(
            413,
            "content_too_long",
            format!("request body of {len} bytes exceeds the limit of {MAX_BODY_BYTES} bytes"),
        );
        if len > DRAIN_LIMIT || head.expect_continue {
            write_reply(sock, is_head, reply.closing()).await?;
            return Ok(false);
        }
        discard(sock, buf, len).await?;
        Counters::add(&shared.counters.bytes_received, len as u64);
        let reply = if head.keep_alive {
            reply
        } else {
            reply.closing()
        };
        write_reply(sock, is_head, reply).await?;
        return Ok(head.keep_alive);
    }
    if head.expect_continue && len > buf.len() {
        sock.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }
    while buf.len() < len {
        buf.reserve(len - buf.len());
        if sock.read_buf(buf).await? == 0 {
            return Ok(false);
        }
    }
    let body = buf.split_to(len).freeze();
    Counters::add(&shared.counters.bytes_received, len as u64);
    let received = Instant::now();

    let reply = if head.content_encoded {
        Reply::error(
            415,
            "illegal_argument_exception",
            "FastSink does not decompress request bodies (Content-Encoding)",
        )
    } else {
        route(shared, &head, &body, received)
    };
    let mut reply = reply;
    reply.close |= !head.keep_alive;
    let keep = !reply.close;
    write_reply(sock, is_head, reply).await?;
    Ok(keep)
}

/// Reads and drops `len` body bytes.
async fn discard(sock: &mut TcpStream, buf: &mut BytesMut, len: usize) -> std::io::Result<()> {
    let mut left = len;
    loop {
        let take = left.min(buf.len());
        let _ = buf.split_to(take);
        left -= take;
        if left == 0 {
            return Ok(());
        }
        buf.reserve(64 * 1024);
        if sock.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Position just past the blank line ending the head, if it is complete.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn parse_head(raw: &[u8]) -> std::result::Result<Head, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "the request head is not UTF-8".to_owned())?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && t.starts_with('/') => (m, t, v),
        _ => return Err(format!("malformed request line {request_line:?}")),
    };
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        other => return Err(format!("unsupported protocol version {other:?}")),
    };
    let mut head = Head {
        method: method.to_owned(),
        path: String::new(),
        query: String::new(),
        content_length: 0,
        keep_alive,
        transfer_encoded: false,
        content_encoded: false,
        expect_continue: false,
    };
    let mut content_length = None;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("malformed header line {line:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| format!("invalid Content-Length {value:?}"))?;
            if content_length.is_some_and(|m| m != n) {
                return Err("conflicting Content-Length headers".into());
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.transfer_encoded |= !value.eq_ignore_ascii_case("identity");
        } else if name.eq_ignore_ascii_case("content-encoding") {
            head.content_encoded |= !value.eq_ignore_ascii_case("identity");
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("expect") {
            head.expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    head.keep_alive = keep_alive;
    head.content_length = content_length.unwrap_or(0);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    head.path = path.to_owned();
    head.query = query.to_owned();
    Ok(head)
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Unknown",
    }
}

async fn write_reply(sock: &mut TcpStream, is_head: bool, reply: Reply) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(160 + if is_head { 0 } else { reply.body.len() });
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: application/json; charset=UTF-8\r\ncontent-length: {}\r\n",
        reply.status,
        reason_phrase(reply.status),
        reply.body.len()
    );
    if reply.close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !is_head {
        out.extend_from_slice(&reply.body);
    }
    sock.write_all(&out).await?;
    sock.flush().await
}

/// Decodes `%XX` escapes in one path segment.
fn percent_decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

// ---------------------------------------------------------------------------
// REST routing
// ---------------------------------------------------------------------------

fn route(shared: &Shared, head: &Head, body: &Bytes, received: Instant) -> Reply {
    let segments: Vec<String> = head
        .path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = head.method.as_str();
    match (method, seg.as_slice()) {
        ("GET" | "HEAD", []) => Reply::json(200, &info()),
        ("GET", ["_cluster", "health"]) => Reply::json(200, &health()),
        ("POST" | "PUT", ["_bulk"]) => bulk(shared, None, body, received),
        ("POST" | "PUT", [index, "_bulk"]) => bulk(shared, Some(index), body, received),
        ("POST", ["_aliases"]) => update_aliases(shared, body),
        ("GET", ["_alias"]) => get_aliases(shared, None, None),
        ("GET" | "HEAD", ["_alias", names]) => get_aliases(shared, None, Some(names)),
        ("GET", [index, "_alias"]) => get_aliases(shared, Some(index), None),
        ("GET" | "HEAD", [index, "_alias", names]) => get_aliases(shared, Some(index), Some(names)),
        ("POST" | "GET", ["_refresh"]) => refresh(shared, "_all"),
        ("POST" | "GET", [index, "_refresh"]) => refresh(shared, index),
        ("GET", [index, "_mapping"]) => get_mapping(shared, index),
        ("PUT" | "POST", [index, "_mapping"]) => put_mapping(shared, index, body),
        ("PUT", [index, "_settings"]) => put_settings(shared, index),
        ("POST", [index, "_delete_by_query"]) => delete_by_query(shared, index, body),
        ("GET" | "POST", [index, "_count"]) => count(shared, index, body),
        ("GET" | "HEAD", [index, "_doc", id]) => get_doc(shared, index, id),
        ("PUT", [index]) if !index.starts_with('_') => create_index(shared, index, body),
        ("HEAD", [index]) => exists(shared, index),
        ("GET", [index]) if !index.starts_with('_') => get_index(shared, index),
        ("DELETE", [index]) if !index.starts_with('_') => delete_index(shared, index),
        _ => Reply::json(
            400,
            &json!({
                "error": format!(
                    "no handler found for uri [{}{}{}] and method [{method}] (FastSink implements only what ferry uses)",
                    head.path,
                    if head.query.is_empty() { "" } else { "?" },
                    head.query
                ),
                "status": 400
            }),
        ),
    }
}

fn info() -> Value {
    json!({
        "name": "fastsink",
        "cluster_name": "fastsink",
        "cluster_uuid": "fastsink-0000000000000000",
        "version": {
            "distribution": "opensearch",
            "number": VERSION_NUMBER,
            "build_type": "tar",
            "build_hash": "fastsink",
            "build_date": "2025-01-01T00:00:00.000000Z",
            "build_snapshot": false,
            "lucene_version": "9.12.1",
            "minimum_wire_compatibility_version": "7.10.0",
            "minimum_index_compatibility_version": "7.0.0"
        },
        "tagline": "The OpenSearch Project: https://opensearch.org/"
    })
}

fn health() -> Value {
    json!({
        "cluster_name": "fastsink",
        "status": "green",
        "timed_out": false,
        "number_of_nodes": 1,
        "number_of_data_nodes": 1,
        "active_primary_shards": 0,
        "active_shards": 0,
        "relocating_shards": 0,
        "initializing_shards": 0,
        "unassigned_shards": 0,
        "active_shards_percent_as_number": 100.0
    })
}

fn shards() -> Value {
    json!({"total": 1, "successful": 1, "failed": 0})
}

/// Parses a JSON object body; an empty body is an empty object.
fn object_body(body: &[u8]) -> std::result::Result<Map<String, Value>, Reply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Reply::error(
            400,
            "parse_exception",
            "request body must be a JSON object",
        )),
        Err(e) => Err(Reply::error(
            400,
            "parse_exception",
            format!("request body is not valid JSON: {e}"),
        )),
    }
}

fn exists(shared: &Shared, expr: &str) -> Reply {
    let state = shared.lock();
    match state.resolve(expr) {
        Ok(v) if !v.is_empty() => Reply::json(200, &json!({})),
        _ => Reply::json(404, &json!({})),
    }
}

fn create_index(shared: &Shared, name: &str, body: &[u8]) -> Reply {
    let mut req = match object_body(body) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let mut state = shared.lock();
    if state.indices.contains_key(name) {
        return Reply::fail(
            &Fail::new(
                400,
                "resource_already_exists_exception",
                format!("index [{name}/fastsink] already exists"),
            ),
            Some(name),
        );
    }
    if state.aliases.contains_key(name) {
        return Reply::fail(
            &Fail::new(
                400,
                "invalid_index_name_exception",
                format!("Invalid index name [{name}], already exists as alias"),
            ),
            Some(name),
        );
    }
    if let Some(why) = invalid_index_name(name) {
        return Reply::fail(
            &Fail::new(
                400,
                "invalid_index_name_exception",
                format!("Invalid index name [{name}], {why}"),
            ),
            Some(name),
        );
    }
    let mappings = match req.remove("mappings") {
        Some(Value::Object(m)) => m,
        None | Some(Value::Null) => Map::new(),
        Some(_) => {
            return Reply::error(
                400,
                "mapper_parsing_exception",
                "mappings must be an object",
            )
        }
    };
    let settings = req.remove("settings").unwrap_or_else(|| json!({}));
    let aliases: Vec<String> = match req.remove("aliases") {
        Some(Value::Object(a)) => a.keys().cloned().collect(),
        _ => Vec::new(),
    };
    state
        .indices
        .insert(name.to_owned(), Index::new(name, mappings, settings));
    for alias in aliases {
        state
            .aliases
            .entry(alias)
            .or_default()
            .insert(name.to_owned());
    }
    drop(state);
    shared.changed.notify_all();
    Reply::json(
        200,
        &json!({"acknowledged": true, "shards_acknowledged": true, "index": name}),
    )
}

fn get_index(shared: &Shared, expr: &str) -> Reply {
    let state = shared.lock();
    let names = match state.resolve(expr) {
        Ok(n) => n,
        Err(missing) => return Reply::fail(&Fail::index_not_found(&missing), Some(&missing)),
    };
    let mut out = Map::new();
    for name in names {
        if let Some(ix) = state.indices.get(&name) {
            let aliases: Map<String, Value> = state
                .aliases_of(&name)
                .into_iter()
                .map(|a| (a.to_owned(), json!({})))
                .collect();
            out.insert(
                name.clone(),
                json!({"aliases": aliases, "mappings": ix.mappings, "settings": ix.settings}),
            );
        }
    }
    Reply::json(200, &Value::Object(out))
}

fn delete_index(shared: &Shared, name: &str) -> Reply {
    let mut state = shared.lock();
    if state.aliases.contains_key(name) && !state.indices.contains_key(name) {
        return Reply::error(
            400,
            "illegal_argument_exception",
            format!(
                "The provided expression [{name}] matches an alias, specify the corresponding concrete indices instead."
            ),
        );
    }
    let names = match state.resolve(name) {
        Ok(n) if !n.is_empty() => n,
        Ok(_) => return Reply::ok(),
        Err(missing) => return Reply::fail(&Fail::index_not_found(&missing), Some(&missing)),
    };
    for n in &names {
        state.indices.remove(n);
        for targets in state.aliases.values_mut() {
            targets.remove(n);
        }
    }
    state.aliases.retain(|_, t| !t.is_empty());
    drop(state);
    shared.changed.notify_all();
    Reply::ok()
}

fn get_mapping(shared: &Shared, expr: &str) -> Reply {
    let state = shared.lock();
    let names = match state.resolve(expr) {
        Ok(n) => n,
        Err(missing) => return Reply::fail(&Fail::index_not_found(&missing), Some(&missing)),
    };
    let mut out = Map::new();
    for name in names {
        if let Some(ix) = state.indices.get(&name) {
            out.insert(name, json!({"mappings": ix.mappings}));
        }
    }
    Reply::json(200, &Value::Object(out))
}

/// Dynamic settings are accepted and ignored (the double has no refresh or
/// tombstone expiry to tune); a missing index is an error as in OpenSearch.
fn put_settings(shared: &Shared, expr: &str) -> Reply {
    let state = shared.lock();
    match state.resolve(expr) {
        Ok(_) => Reply::json(200, &json!({"acknowledged": true})),
        Err(missing) => Reply::fail(&Fail::index_not_found(&missing), Some(&missing)),
    }
}

fn put_mapping(shared: &Shared, expr: &str, body: &[u8]) -> Reply {
    let req = match object_body(body) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let mut state = shared.lock();
    let names = match state.resolve(expr) {
        Ok(n) => n,
        Err(missing) => return Reply::fail(&Fail::index_not_found(&missing), Some(&missing)),
    };
    for name in names {
        let Some(ix) = state.indices.get_mut(&name) else {
            continue;
        };
        for (key, value) in &req {
            match (key.as_str(), value) {
                ("properties", Value::Object(props)) => {
                    let slot = ix.mappings.entry("properties").or_insert_with(|| json!({}));
                    if let Value::Object(existing) = slot {
                        for (field, mapping) in props {
                            existing.insert(field.clone(), mapping.clone());
                        }
                    } else {
                        *slot = Value::Object(props.clone());
                    }
                }
                _ => {
                    ix.mappings.insert(key.clone(), value.clone());
                }
            }
        }
    }
    drop(state);
    shared.changed.notify_all();
    Reply::ok()
}

/// Names of one alias action field that may be a string or an array of strings.
fn names_field(action: &Map<String, Value>, one: &str, many: &str) -> Vec<String> {
    let mut out = Vec::new();
    for key in [one, many] {
        match action.get(key) {
            Some(Value::String(s)) => out.push(s.clone()),
            Some(Value::Array(a)) => {
                out.extend(a.iter().filter_map(|v| v.as_str().map(str::to_owned)))
            }
            _ => {}
        }
    }
    out
}

fn update_aliases(shared: &Shared, body: &[u8]) -> Reply {
    let req = match object_body(body) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let Some(Value::Array(actions)) = req.get("actions") else {
        return Reply::error(
            400,
            "action_request_validation_exception",
            "Validation Failed: 1: no actions;",
        );
    };
    let mut state = shared.lock();
    // Work on a copy and commit it only if every action is valid: atomic, like OpenSearch.
    let mut aliases = state.aliases.clone();
    let mut drop_indices = Vec::new();
    for action in actions {
        let Some((kind, Value::Object(spec))) = action.as_object().and_then(|o| o.iter().next())
        else {
            return Reply::error(
                400,
                "illegal_argument_exception",
                format!("malformed alias action {action}"),
            );
        };
        let indices = names_field(spec, "index", "indices");
        let names = names_field(spec, "alias", "aliases");
        let mut concrete = Vec::new();
        for ix in &indices {
            match state.resolve(ix) {
                Ok(v) if !v.is_empty() => concrete.extend(v),
                Ok(_) | Err(_) => return Reply::fail(&Fail::index_not_found(ix), Some(ix)),
            }
        }
        match kind.as_str() {
            "add" => {
                if concrete.is_empty() || names.is_empty() {
                    return Reply::error(
                        400,
                        "action_request_validation_exception",
                        "Validation Failed: 1: [index] and [alias] are required for add;",
                    );
                }
                for alias in &names {
                    if state.indices.contains_key(alias) {
                        return Reply::error(
                            400,
                            "invalid_alias_name_exception",
                            format!("Invalid alias name [{alias}]: an index or data stream exists with the same name as the alias"),
                        );
                    }
                    aliases
                        .entry(alias.clone())
                        .or_default()
                        .extend(concrete.iter().cloned());
                }
            }
            "remove" => {
                for alias in &names {
                    let removed = aliases.get_mut(alias).is_some_and(|targets| {
                        let before = targets.len();
                        targets.retain(|t| !concrete.contains(t));
                        targets.len() < before
                    });
                    if !removed {
                        return Reply::error(
                            404,
                            "aliases_not_found_exception",
                            format!("aliases [{alias}] missing"),
                        );
                    }
                }
            }
            "remove_index" => drop_indices.extend(concrete),
            other => {
                let why =
                    format!("unknown alias action [{other}]; use add, remove or remove_index");
                return Reply::error(400, "illegal_argument_exception", why);
            }
        }
    }
    for name in &drop_indices {
        state.indices.remove(name);
        for targets in aliases.values_mut() {
            targets.remove(name);
        }
    }
    aliases.retain(|_, t| !t.is_empty());
    state.aliases = aliases;
    drop(state);
    shared.changed.notify_all();
    Reply::ok()
}

fn get_aliases(shared: &Shared, index: Option<&str>, names: Option<&str>) -> Reply {
    let state = shared.lock();
    let indices: Option<Vec<String>> = match index.map(|i| state.resolve(i)) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(missing)) => return Reply::fail(&Fail::index_not_found(&missing), Some(&missing)),
    };
    let wanted: Option<Vec<&str>> = names.map(|n| n.split(',').collect());
    let mut out: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut missing: Vec<&str> = Vec::new();
    if let Some(w) = &wanted {
        for name in w {
            let known = state.aliases.iter().any(|(a, _)| {
                if name.contains('*') {
                    glob(name, a)
                } else {
                    a == name
                }
            });
            if !known {
                missing.push(name);
            }
        }
    }
    for (alias, targets) in &state.aliases {
        if let Some(w) = &wanted {
            if !w.iter().any(|p| {
                if p.contains('*') {
                    glob(p, alias)
                } else {
                    p == alias
                }
            }) {
                continue;
            }
        }
        for t in targets {
            if indices.as_ref().is_some_and(|ix| !ix.contains(t)) {
                continue;
            }
            out.entry(t.clone())
                .or_default()
                .insert(alias.clone(), json!({}));
        }
    }
    if let (Some(ix), None) = (&indices, &wanted) {
        for i in ix {
            out.entry(i.clone()).or_default();
        }
    }
    let body: Map<String, Value> = out
        .into_iter()
        .map(|(k, v)| (k, json!({"aliases": v})))
        .collect();
    if !missing.is_empty() {
        let what = missing.join(",");
        let mut v = Value::Object(body);
        v["error"] = json!(format!("alias [{what}] missing"));
        v["status"] = json!(404);
        return Reply::json(404, &v);
    }
    Reply::json(200, &Value::Object(body))
}

fn refresh(shared: &Shared, expr: &str) -> Reply {
    let state = shared.lock();
    match state.resolve(expr) {
        Ok(_) => Reply::json(200, &json!({"_shards": shards()})),
        Err(missing) => Reply::fail(&Fail::index_not_found(&missing), Some(&missing)),
    }
}

/// True when a search body is absent or asks for every document.
fn matches_all(body: &[u8]) -> std::result::Result<bool, Reply> {
    let req = object_body(body)?;
    Ok(match req.get("query") {
        None => true,
        Some(q) => q.get("match_all").is_some(),
    })
}

fn count(shared: &Shared, expr: &str, body: &[u8]) -> Reply {
    match matches_all(body) {
        Ok(true) => {}
        Ok(false) => {
            return Reply::error(
                400,
                "illegal_argument_exception",
                "FastSink counts only with match_all (or no query)",
            )
        }
        Err(r) => return r,
    }
    let state = shared.lock();
    match state.resolve(expr) {
        Ok(names) => {
            let n: usize = names
                .iter()
                .filter_map(|n| state.indices.get(n))
                .map(|ix| ix.live)
                .sum();
            Reply::json(200, &json!({"count": n, "_shards": shards()}))
        }
        Err(missing) => Reply::fail(&Fail::index_not_found(&missing), Some(&missing)),
    }
}

fn delete_by_query(shared: &Shared, expr: &str, body: &[u8]) -> Reply {
    let started = Instant::now();
    match matches_all(body) {
        Ok(true) => {}
        Ok(false) => {
            return Reply::error(
                400,
                "illegal_argument_exception",
                "FastSink deletes by query only with match_all",
            )
        }
        Err(r) => return r,
    }
    let mut state = shared.lock();
    let names = match state.resolve(expr) {
        Ok(n) => n,
        Err(missing) => return Reply::fail(&Fail::index_not_found(&missing), Some(&missing)),
    };
    let now = Instant::now();
    let mut deleted = 0u64;
    for name in names {
        let Some(ix) = state.indices.get_mut(&name) else {
            continue;
        };
        for doc in ix.docs.values_mut() {
            if doc.source.take().is_some() {
                // Internal versioning: the delete bumps the version by one.
                doc.version += 1;
                ix.next_seq_no += 1;
                doc.seq_no = ix.next_seq_no;
                doc.at = now;
                deleted += 1;
            }
        }
        ix.live = 0;
    }
    drop(state);
    shared.changed.notify_all();
    Reply::json(
        200,
        &json!({
            "took": started.elapsed().as_millis() as u64,
            "timed_out": false,
            "total": deleted,
            "deleted": deleted,
            "batches": u64::from(deleted > 0),
            "version_conflicts": 0,
            "noops": 0,
            "retries": {"bulk": 0, "search": 0},
            "throttled_millis": 0,
            "requests_per_second": -1.0,
            "throttled_until_millis": 0,
            "failures": []
        }),
    )
}

fn get_doc(shared: &Shared, expr: &str, id: &str) -> Reply {
    let state = shared.lock();
    let names = match state.resolve(expr) {
        Ok(n) => n,
        Err(missing) => return Reply::fail(&Fail::index_not_found(&missing), Some(&missing)),
    };
    for name in &names {
        let Some(ix) = state.indices.get(name) else {
            continue;
        };
        if let Some(doc) = ix.docs.get(id) {
            if let Some(source) = &doc.source {
                let mut body = Vec::with_capacity(source.len() + 160);
                body.extend_from_slice(b"{\"_index\":");
                push_json_str(&mut body, name);
                body.extend_from_slice(b",\"_id\":");
                push_json_str(&mut body, id);
                let _ = write!(
                    body,
                    ",\"_version\":{},\"_seq_no\":{},\"_primary_term\":1,\"found\":true,\"_source\":",
                    doc.version, doc.seq_no
                );
                body.extend_from_slice(source);
                body.push(b'}');
                return Reply {
                    status: 200,
                    body,
                    close: false,
                };
            }
        }
    }
    let index = names.first().map(String::as_str).unwrap_or(expr);
    Reply::json(404, &json!({"_index": index, "_id": id, "found": false}))
}

// ---------------------------------------------------------------------------
// _bulk
// ---------------------------------------------------------------------------

/// A string from an action line, borrowed from the body unless it had escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct StrVisitor;
        impl<'de> Visitor<'de> for StrVisitor {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(
                self,
                v: &'de str,
            ) -> std::result::Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<Self::Value, E> {
                Ok(Cow::Owned(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_string()))
            }
        }
        d.deserialize_any(StrVisitor).map(Str)
    }
}

/// The metadata object of an action line.
#[derive(Deserialize)]
struct Meta<'a> {
    #[serde(borrow, default, rename = "_index")]
    index: Option<Str<'a>>,
    #[serde(borrow, default, rename = "_id")]
    id: Option<Str<'a>>,
    #[serde(default)]
    version: Option<u64>,
    #[serde(borrow, default)]
    version_type: Option<Str<'a>>,
}

/// One action line: `{"index": {...}}`, `{"delete": {...}}`, …
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum ActionLine<'a> {
    Index(#[serde(borrow)] Meta<'a>),
    Create(#[serde(borrow)] Meta<'a>),
    Update(#[serde(borrow)] Meta<'a>),
    Delete(#[serde(borrow)] Meta<'a>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Index,
    Create,
    Update,
    Delete,
}

impl OpKind {
    fn key(self) -> &'static str {
        match self {
            OpKind::Index => "index",
            OpKind::Create => "create",
            OpKind::Update => "update",
            OpKind::Delete => "delete",
        }
    }
}

/// A parsed action with its source line.
struct Op<'a> {
    kind: OpKind,
    meta: Meta<'a>,
    source: Option<&'a [u8]>,
}

/// What applying one action produced, for the response.
struct Done<'a> {
    kind: OpKind,
    index: Arc<str>,
    id: Cow<'a, str>,
    version: u64,
    seq_no: u64,
    outcome: ItemOutcome,
    error: Option<Fail>,
}

/// Splits the body into lines (without `\n` or a trailing `\r`).
struct Lines<'a> {
    data: &'a [u8],
    pos: usize,
    /// 1-based number of the line returned last.
    number: usize,
}

impl<'a> Iterator for Lines<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        if self.pos >= self.data.len() {
            return None;
        }
        let rest = self.data.get(self.pos..)?;
        let len = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        self.pos += len + 1;
        self.number += 1;
        let line = rest.get(..len)?;
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    }
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// Parses the NDJSON body into actions; an error answers the whole request.
fn parse_bulk(body: &[u8]) -> std::result::Result<Vec<Op<'_>>, Reply> {
    if is_blank(body) {
        return Err(Reply::error(
            400,
            "action_request_validation_exception",
            "Validation Failed: 1: no requests added;",
        ));
    }
    if !body.ends_with(b"\n") {
        return Err(Reply::error(
            400,
            "illegal_argument_exception",
            "The bulk request must be terminated by a newline [\\n]",
        ));
    }
    let mut ops = Vec::with_capacity(body.len() / 128 + 1);
    let mut lines = Lines {
        data: body,
        pos: 0,
        number: 0,
    };
    while let Some(line) = lines.next() {
        if is_blank(line) {
            continue;
        }
        let action: ActionLine<'_> = serde_json::from_slice(line).map_err(|e| {
            Reply::error(
                400,
                "illegal_argument_exception",
                format!(
                    "Malformed action/metadata line [{}], expected one of [create, delete, index, update] with an object: {e}",
                    lines.number
                ),
            )
        })?;
        let (kind, meta) = match action {
            ActionLine::Index(m) => (OpKind::Index, m),
            ActionLine::Create(m) => (OpKind::Create, m),
            ActionLine::Update(m) => (OpKind::Update, m),
            ActionLine::Delete(m) => (OpKind::Delete, m),
        };
        let source = if kind == OpKind::Delete {
            None
        } else {
            let at = lines.number;
            Some(lines.next().ok_or_else(|| {
                Reply::error(
                    400,
                    "illegal_argument_exception",
                    format!(
                        "the {} action on line [{at}] has no source line",
                        kind.key()
                    ),
                )
            })?)
        };
        ops.push(Op { kind, meta, source });
    }
    Ok(ops)
}

/// Checks that a source line is one well-formed JSON object, without building it.
fn check_source(source: &[u8]) -> std::result::Result<(), Fail> {
    let starts_object = source
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{');
    if !starts_object {
        return Err(Fail::new(
            400,
            "mapper_parsing_exception",
            "failed to parse, document is empty or not a JSON object",
        ));
    }
    serde_json::from_slice::<IgnoredAny>(source)
        .map(|_| ())
        .map_err(|e| {
            Fail::new(
                400,
                "mapper_parsing_exception",
                format!("failed to parse: {e}"),
            )
        })
}

/// The version a write gets, or why it is refused, given the stored version.
fn next_version(
    meta: &Meta<'_>,
    id: &str,
    current: Option<u64>,
) -> std::result::Result<u64, (ItemOutcome, Fail)> {
    let vt = meta.version_type.as_ref().map(|s| s.0.as_ref());
    let invalid = |reason: String| {
        (
            ItemOutcome::Rejected(400),
            Fail::new(400, "action_request_validation_exception", reason),
        )
    };
    match vt {
        None | Some("internal") => {
            if meta.version.is_some() {
                return Err(invalid(
                    "Validation Failed: 1: internal versioning can not be used for optimistic \
                     concurrency control. Please use `if_seq_no` and `if_primary_term` instead;"
                        .into(),
                ));
            }
            Ok(current.map_or(1, |c| c + 1))
        }
        Some(kind @ ("external" | "external_gte")) => {
            let Some(v) = meta.version else {
                return Err(invalid(format!(
                    "Validation Failed: 1: an external version must be set for version_type [{kind}];"
                )));
            };
            let gte = kind == "external_gte";
            match current {
                Some(c) if (gte && v < c) || (!gte && v <= c) => Err((
                    ItemOutcome::Conflict,
                    Fail::new(
                        409,
                        "version_conflict_engine_exception",
                        format!(
                            "[{id}]: version conflict, current version [{c}] is higher{} than the one provided [{v}]",
                            if gte { "" } else { " or equal to" }
                        ),
                    ),
                )),
                _ => Ok(v),
            }
        }
        Some(other) => Err(invalid(format!(
            "Validation Failed: 1: version type [{other}] is not supported by FastSink;"
        ))),
    }
}

/// Applies one action to the state.
fn apply<'a>(
    state: &mut State,
    op: &Op<'a>,
    default_index: Option<&str>,
    memo: &mut Option<(String, Arc<str>)>,
    at: Instant,
) -> Done<'a> {
    let given = op
        .meta
        .index
        .as_ref()
        .map(|s| s.0.as_ref())
        .or(default_index);
    let id: Cow<'a, str> = match &op.meta.id {
        Some(s) => s.0.clone(),
        None if op.kind != OpKind::Delete => {
            state.auto_ids += 1;
            Cow::Owned(format!("fastsink-{}", state.auto_ids))
        }
        None => Cow::Borrowed(""),
    };
    let mut done = Done {
        kind: op.kind,
        index: Arc::from(given.unwrap_or("")),
        id,
        version: 0,
        seq_no: 0,
        outcome: ItemOutcome::Rejected(400),
        error: None,
    };
    let fail = |mut done: Done<'a>, outcome: ItemOutcome, f: Fail| {
        done.outcome = outcome;
        done.error = Some(f);
        done
    };
    let Some(given) = given else {
        let f = Fail::new(
            400,
            "action_request_validation_exception",
            "Validation Failed: 1: index is missing;",
        );
        return fail(done, ItemOutcome::Rejected(400), f);
    };
    if op.kind == OpKind::Delete && done.id.is_empty() {
        let f = Fail::new(
            400,
            "action_request_validation_exception",
            "Validation Failed: 1: id is missing;",
        );
        return fail(done, ItemOutcome::Rejected(400), f);
    }
    if op.kind == OpKind::Update {
        let f = Fail::new(
            400,
            "illegal_argument_exception",
            "FastSink does not implement bulk update actions",
        );
        return fail(done, ItemOutcome::Rejected(400), f);
    }
    if let Some(source) = op.source {
        if let Err(f) = check_source(source) {
            let status = f.status;
            return fail(done, ItemOutcome::Rejected(status), f);
        }
    }

    let concrete = match memo {
        Some((name, arc)) if name == given => Arc::clone(arc),
        _ => match state.write_target(given, op.kind != OpKind::Delete) {
            Ok(arc) => {
                *memo = Some((given.to_owned(), Arc::clone(&arc)));
                arc
            }
            Err(f) => {
                let status = f.status;
                return fail(done, ItemOutcome::Rejected(status), f);
            }
        },
    };
    done.index = Arc::clone(&concrete);
    let Some(ix) = state.indices.get_mut(&*concrete) else {
        let f = Fail::index_not_found(&concrete);
        return fail(done, ItemOutcome::Rejected(404), f);
    };

    let current = ix.docs.get(done.id.as_ref());
    let current_version = current.map(|d| d.version);
    let was_live = current.is_some_and(|d| d.source.is_some());
    if op.kind == OpKind::Create && was_live {
        let f = Fail::new(
            409,
            "version_conflict_engine_exception",
            format!(
                "[{}]: version conflict, document already exists (current version [{}])",
                done.id,
                current_version.unwrap_or(0)
            ),
        );
        return fail(done, ItemOutcome::Conflict, f);
    }
    let version = match next_version(&op.meta, &done.id, current_version) {
        Ok(v) => v,
        Err((outcome, f)) => return fail(done, outcome, f),
    };
    ix.next_seq_no += 1;
    let seq_no = ix.next_seq_no;
    let source: Option<Box<[u8]>> = op.source.map(Box::from);
    let is_delete = source.is_none();
    match ix.docs.get_mut(done.id.as_ref()) {
        Some(doc) => {
            doc.version = version;
            doc.seq_no = seq_no;
            doc.source = source;
            doc.at = at;
        }
        None => {
            ix.docs.insert(
                done.id.clone().into_owned(),
                Doc {
                    version,
                    seq_no,
                    source,
                    at,
                },
            );
        }
    }
    done.outcome = match (is_delete, was_live) {
        (true, true) => {
            ix.live -= 1;
            ItemOutcome::Deleted
        }
        (true, false) => ItemOutcome::NotFound,
        (false, true) => ItemOutcome::Updated,
        (false, false) => {
            ix.live += 1;
            ItemOutcome::Created
        }
    };
    done.version = version;
    done.seq_no = seq_no;
    done
}

fn bulk(shared: &Shared, default_index: Option<&str>, body: &Bytes, received: Instant) -> Reply {
    let started = Instant::now();
    Counters::add(&shared.counters.bulk_requests, 1);
    let ops = match parse_bulk(body) {
        Ok(ops) => ops,
        Err(reply) => return reply,
    };
    let mut done = Vec::with_capacity(ops.len());
    let mut conflicts = 0u64;
    let mut errors = 0u64;
    {
        let mut state = shared.lock();
        let mut memo = None;
        for op in &ops {
            done.push(apply(&mut state, op, default_index, &mut memo, received));
        }
        for d in &done {
            match d.outcome {
                ItemOutcome::Conflict => conflicts += 1,
                ItemOutcome::Rejected(_) => errors += 1,
                _ => {}
            }
        }
        // Counters and subscribers are updated before the state lock is
        // released, so whoever observes the new state also sees them.
        Counters::add(&shared.counters.bulk_items, done.len() as u64);
        Counters::add(&shared.counters.bulk_conflicts, conflicts);
        Counters::add(&shared.counters.bulk_errors, errors);
        if shared.has_subscribers.load(Ordering::Acquire) {
            let items = done
                .iter()
                .map(|d| ItemArrival {
                    index: Arc::clone(&d.index),
                    id: d.id.to_string(),
                    version: d.version,
                    outcome: d.outcome,
                })
                .collect();
            shared.publish(BulkArrival { received, items });
        }
    }
    shared.changed.notify_all();

    let mut out = Vec::with_capacity(64 + done.len() * 200);
    let _ = write!(
        out,
        "{{\"took\":{},\"errors\":{},\"items\":[",
        started.elapsed().as_millis(),
        conflicts + errors > 0
    );
    for (i, d) in done.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        render_item(&mut out, d);
    }
    out.extend_from_slice(b"]}");
    Reply {
        status: 200,
        body: out,
        close: false,
    }
}

fn render_item(out: &mut Vec<u8>, d: &Done<'_>) {
    out.extend_from_slice(b"{\"");
    out.extend_from_slice(d.kind.key().as_bytes());
    out.extend_from_slice(b"\":{\"_index\":");
    push_json_str(out, &d.index);
    out.extend_from_slice(b",\"_id\":");
    push_json_str(out, &d.id);
    match &d.error {
        None => {
            let result = match d.outcome {
                ItemOutcome::Created => "created",
                ItemOutcome::Updated => "updated",
                ItemOutcome::Deleted => "deleted",
                _ => "not_found",
            };
            let _ = write!(
                out,
                ",\"_version\":{},\"result\":\"{result}\",\"_shards\":{{\"total\":2,\"successful\":1,\"failed\":0}},\"_seq_no\":{},\"_primary_term\":1,\"status\":{}}}}}",
                d.version,
                d.seq_no,
                d.outcome.status()
            );
        }
        Some(f) => {
            let _ = write!(out, ",\"status\":{},\"error\":{{\"type\":", f.status);
            push_json_str(out, f.kind);
            out.extend_from_slice(b",\"reason\":");
            push_json_str(out, &f.reason);
            out.extend_from_slice(b",\"index\":");
            push_json_str(out, &d.index);
            out.extend_from_slice(b",\"shard\":\"0\",\"index_uuid\":\"fastsink\"}}}");
        }
    }
}

/// Appends `s` as a JSON string literal.
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    if !bytes.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20) {
        out.extend_from_slice(bytes);
    } else {
        for &b in bytes {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                b if b < 0x20 => {
                    let _ = write!(out, "\\u{b:04x}");
                }
                b => out.push(b),
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read};
    use std::net::TcpStream as StdStream;

    /// A tiny blocking HTTP/1.1 client over one connection.
    struct Client {
        reader: BufReader<StdStream>,
    }

    impl Client {
        fn connect(sink: &FastSink) -> Client {
            let addr = sink.url().trim_start_matches("http://");
            let stream = StdStream::connect(addr).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            Client {
                reader: BufReader::new(stream),
            }
        }

        fn send(&mut self, method: &str, path: &str, body: &str) {
            let req = format!(
                "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            self.reader
                .get_mut()
                .write_all(req.as_bytes())
                .expect("write");
        }

        fn send_raw(&mut self, raw: &str) {
            self.reader
                .get_mut()
                .write_all(raw.as_bytes())
                .expect("write");
        }

        /// Reads one response: status, headers (lowercased names), body.
        fn read(&mut self, head_only: bool) -> (u16, Vec<(String, String)>, String) {
            let mut line = String::new();
            self.reader.read_line(&mut line).expect("status line");
            let status: u16 = line
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad status line {line:?}"));
            let mut headers = Vec::new();
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                self.reader.read_line(&mut h).expect("header");
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                let (k, v) = h.split_once(':').expect("header colon");
                let (k, v) = (k.to_ascii_lowercase(), v.trim().to_owned());
                if k == "content-length" {
                    len = v.parse().expect("length");
                }
                headers.push((k, v));
            }
            let mut body = vec![0u8; if head_only { 0 } else { len }];
            self.reader.read_exact(&mut body).expect("body");
            (status, headers, String::from_utf8(body).expect("utf8"))
        }

        fn call(&mut self, method: &str, path: &str, body: &str) -> (u16, Value) {
            self.send(method, path, body);
            let (status, _, text) = self.read(method == "HEAD");
            let v = if text.is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
            };
            (status, v)
        }
    }

    fn statuses(resp: &Value) -> Vec<u64> {
        resp["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|item| {
                let (_, v) = item.as_object().expect("obj").iter().next().expect("one");
                v["status"].as_u64().expect("status")
            })
            .collect()
    }

    #[test]
    fn bulk_applies_external_gte_versions() {
        let sink = FastSink::start().expect("start");
        let mut c = Client::connect(&sink);
        let (s, _) = c.call(
            "PUT",
            "/idx-1",
            r#"{"mappings":{"properties":{"a":{"type":"long"}}}}"#,
        );
        assert_eq!(s, 200);
        let line = |op: &str, id: &str, v: u64| {
            format!(
                r#"{{"{op}":{{"_index":"idx-1","_id":"{id}","version":{v},"version_type":"external_gte"}}}}"#
            )
        };
        let mut body = String::new();
        for (op, id, v, src) in [
            ("index", "1", 10, Some(r#"{"a":1}"#)),
            ("index", "2", 10, Some(r#"{"a":2}"#)),
            ("index", "1", 5, Some(r#"{"a":"old"}"#)), // lower: 409
            ("index", "1", 10, Some(r#"{"a":11}"#)),   // equal: applied
            ("delete", "2", 9, None),                  // lower: 409
            ("delete", "2", 11, None),                 // deleted
            ("delete", "3", 1, None),                  // missing: 404
            ("index", "2", 10, Some(r#"{"a":"zombie"}"#)), // below the tombstone: 409
            ("index", "3", 2, Some(r#"{"a":3}"#)),     // above the tombstone: created
        ] {
            body.push_str(&line(op, id, v));
            body.push('\n');
            if let Some(src) = src {
                body.push_str(src);
                body.push('\n');
            }
        }
        let (s, resp) = c.call("POST", "/_bulk", &body);
        assert_eq!(s, 200, "{resp}");
        assert_eq!(resp["errors"], json!(true));
        assert_eq!(
            statuses(&resp),
            vec![201, 201, 409, 200, 409, 200, 404, 409, 201]
        );
        assert_eq!(
            resp["items"][2]["index"]["error"]["type"],
            json!("version_conflict_engine_exception")
        );
        assert_eq!(resp["items"][6]["delete"]["result"], json!("not_found"));
        assert_eq!(resp["items"][3]["index"]["result"], json!("updated"));

        assert_eq!(sink.doc_count("idx-1"), 2);
        assert_eq!(sink.ids("idx-1"), vec!["1".to_string(), "3".to_string()]);
        assert_eq!(sink.get("idx-1", "1"), Some((10, br#"{"a":11}"#.to_vec())));
        assert_eq!(sink.get("idx-1", "2"), None);
        assert!(
            sink.last_write("idx-1", "2").is_some(),
            "tombstone keeps its arrival"
        );

        let st = sink.stats();
        assert_eq!(st.bulk_requests, 1);
        assert_eq!(st.bulk_items, 9);
        assert_eq!(st.bulk_conflicts, 3);
        assert_eq!(st.bulk_errors, 0);

        // All good: errors is false, and _doc reads the raw source back.
        let ok = format!("{}\n{{\"a\":4}}\n", line("index", "4", 20));
        let (_, resp) = c.call("POST", "/_bulk", &ok);
        assert_eq!(resp["errors"], json!(false));
        let (s, doc) = c.call("GET", "/idx-1/_doc/4", "");
        assert_eq!(s, 200);
        assert_eq!(doc["_source"], json!({"a": 4}));
        assert_eq!(doc["_version"], json!(20));
    }

    #[test]
    fn bulk_rejects_bad_input_clearly() {
        let sink = FastSink::start().expect("start");
        let mut c = Client::connect(&sink);
        let (s, v) = c.call(
            "POST",
            "/_bulk",
            "{\"index\":{\"_index\":\"a\",\"_id\":\"1\"}}\n{}",
        );
        assert_eq!(s, 400, "missing final newline: {v}");
        let (s, _) = c.call("POST", "/_bulk", "{\"frobnicate\":{}}\n");
        assert_eq!(s, 400);
        let (s, _) = c.call(
            "POST",
            "/_bulk",
            "{\"index\":{\"_index\":\"a\",\"_id\":\"1\"}}\n",
        );
        assert_eq!(s, 400, "index without a source line");
        // Per-item failures: broken source, missing index, delete on a missing index.
        let body = "{\"index\":{\"_index\":\"a\",\"_id\":\"1\"}}\n{\"x\":\n\
                    {\"index\":{\"_id\":\"2\"}}\n{}\n\
                    {\"delete\":{\"_index\":\"nope\",\"_id\":\"3\"}}\n\
                    {\"index\":{\"_index\":\"a\",\"_id\":\"q\\\"1\"}}\n{\"ok\":true}\n";
        let (s, v) = c.call("POST", "/_bulk", body);
        assert_eq!(s, 200);
        assert_eq!(statuses(&v), vec![400, 400, 404, 201]);
        assert_eq!(
            v["items"][3]["index"]["_id"],
            json!("q\"1"),
            "escaped ids round-trip"
        );
        assert_eq!(sink.stats().bulk_errors, 3);
        assert_eq!(sink.doc_count("a"), 1, "index auto-created");
    }

    #[test]
    fn aliases_resolve_for_reads_and_writes() {
        let sink = FastSink::start().expect("start");
        let mut c = Client::connect(&sink);
        let (s, v) = c.call("GET", "/_alias/docs", "");
        assert_eq!(s, 404, "{v}");
        let (s, _) = c.call("HEAD", "/docs", "");
        assert_eq!(s, 404);
        c.call(
            "PUT",
            "/docs-aaaa",
            r#"{"mappings":{"_meta":{"ferry":{"hash":"aaaa"}},"properties":{}}}"#,
        );
        let (s, _) = c.call(
            "POST",
            "/_aliases",
            r#"{"actions":[{"add":{"index":"docs-aaaa","alias":"docs"}}]}"#,
        );
        assert_eq!(s, 200);
        let (s, v) = c.call("GET", "/_alias/docs", "");
        assert_eq!(s, 200);
        assert_eq!(v, json!({"docs-aaaa": {"aliases": {"docs": {}}}}));
        assert_eq!(c.call("HEAD", "/docs", "").0, 200);
        assert_eq!(c.call("HEAD", "/docs-aaaa", "").0, 200);

        // Writes through the alias land in the concrete index.
        let body = "{\"index\":{\"_index\":\"docs\",\"_id\":\"7\",\"version\":3,\"version_type\":\"external_gte\"}}\n{\"n\":7}\n";
        let (_, v) = c.call("POST", "/_bulk", body);
        assert_eq!(v["items"][0]["index"]["_index"], json!("docs-aaaa"));
        assert_eq!(sink.doc_count("docs"), 1);
        assert_eq!(sink.doc_count("docs-aaaa"), 1);
        assert_eq!(sink.resolve("docs"), vec!["docs-aaaa".to_string()]);
        assert_eq!(sink.get("docs", "7"), Some((3, b"{\"n\":7}".to_vec())));

        // _meta is replaced by PUT _mapping, properties are merged.
        let (s, _) = c.call(
            "PUT",
            "/docs-aaaa/_mapping",
            r#"{"_meta":{"ferry":{"hash":"aaaa","seeded_lsn":"0/10"}},"properties":{"n":{"type":"long"}}}"#,
        );
        assert_eq!(s, 200);
        let (_, m) = c.call("GET", "/docs/_mapping", "");
        assert_eq!(
            m["docs-aaaa"]["mappings"]["_meta"]["ferry"]["seeded_lsn"],
            json!("0/10")
        );
        assert_eq!(
            m["docs-aaaa"]["mappings"]["properties"]["n"]["type"],
            json!("long")
        );
        assert_eq!(c.call("POST", "/docs/_refresh", "").0, 200);
        assert_eq!(c.call("GET", "/docs/_count", "").1["count"], json!(1));

        // Moving the alias is atomic; deleting the old index leaves the alias on the new one.
        c.call("PUT", "/docs-bbbb", "{}");
        let (s, _) = c.call(
            "POST",
            "/_aliases",
            r#"{"actions":[{"add":{"index":"docs-bbbb","alias":"docs"}},{"remove":{"index":"docs-aaaa","alias":"docs"}}]}"#,
        );
        assert_eq!(s, 200);
        assert_eq!(sink.resolve("docs"), vec!["docs-bbbb".to_string()]);
        assert_eq!(sink.doc_count("docs"), 0);
        assert_eq!(
            c.call("DELETE", "/docs", "").0,
            400,
            "deleting through an alias is refused"
        );
        assert_eq!(c.call("DELETE", "/docs-aaaa", "").0, 200);
        assert_eq!(c.call("DELETE", "/docs-aaaa", "").0, 404);
        assert_eq!(sink.indices(), vec!["docs-bbbb".to_string()]);

        // delete_by_query empties the index, leaving tombstones behind.
        let body = "{\"index\":{\"_index\":\"docs\",\"_id\":\"1\"}}\n{}\n{\"index\":{\"_index\":\"docs\",\"_id\":\"2\"}}\n{}\n";
        c.call("POST", "/_bulk", body);
        assert_eq!(sink.doc_count("docs"), 2);
        let (s, v) = c.call(
            "POST",
            "/docs-bbbb/_delete_by_query?conflicts=proceed&refresh=true",
            r#"{"query":{"match_all":{}}}"#,
        );
        assert_eq!(s, 200);
        assert_eq!(v["deleted"], json!(2));
        assert_eq!(sink.doc_count("docs"), 0);
    }

    #[test]
    fn keep_alive_serves_several_requests_on_one_connection() {
        let sink = FastSink::start().expect("start");
        let mut c = Client::connect(&sink);
        let (s, v) = c.call("GET", "/", "");
        assert_eq!(s, 200);
        assert_eq!(v["version"]["distribution"], json!("opensearch"));
        assert_eq!(v["version"]["number"], json!(VERSION_NUMBER));
        let (s, _) = c.call("PUT", "/one", "{}");
        assert_eq!(s, 200);
        // Two pipelined requests in one write are answered in order.
        c.send_raw(
            "HEAD /one HTTP/1.1\r\nhost: x\r\n\r\nGET /_alias/none HTTP/1.1\r\nhost: x\r\n\r\n",
        );
        assert_eq!(c.read(true).0, 200);
        assert_eq!(c.read(false).0, 404);
        assert_eq!(sink.stats().requests, 4);

        // `Connection: close` is honoured.
        c.send_raw("GET / HTTP/1.1\r\nconnection: close\r\n\r\n");
        let (s, headers, _) = c.read(false);
        assert_eq!(s, 200);
        assert!(headers
            .iter()
            .any(|(k, v)| k == "connection" && v == "close"));
        let mut rest = Vec::new();
        let n = c.reader.read_to_end(&mut rest).expect("eof");
        assert_eq!(n, 0, "connection closed after the response");
    }

    #[test]
    fn chunked_and_malformed_requests_get_clear_errors() {
        let sink = FastSink::start().expect("start");
        let mut c = Client::connect(&sink);
        c.send_raw(
            "POST /_bulk HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        );
        let (s, _, body) = c.read(false);
        assert_eq!(s, 411);
        assert!(body.contains("Content-Length"), "{body}");

        let mut c = Client::connect(&sink);
        c.send_raw("NONSENSE\r\n\r\n");
        let (s, _, _) = c.read(false);
        assert_eq!(s, 400);

        let mut c = Client::connect(&sink);
        let (s, v) = c.call("GET", "/idx/_search", "{}");
        assert_eq!(s, 400);
        assert!(
            v["error"].as_str().unwrap_or("").contains("no handler"),
            "{v}"
        );
    }

    #[test]
    fn subscribers_and_waiters_see_every_write() {
        let sink = FastSink::start().expect("start");
        let rx = sink.subscribe();
        let mut c = Client::connect(&sink);
        let body = "{\"index\":{\"_index\":\"w\",\"_id\":\"a\",\"version\":2,\"version_type\":\"external_gte\"}}\n{}\n\
                    {\"delete\":{\"_index\":\"w\",\"_id\":\"b\",\"version\":2,\"version_type\":\"external_gte\"}}\n";
        let before = Instant::now();
        c.call("POST", "/_bulk", body);
        assert!(sink.wait_for_doc("w", "a", Duration::from_secs(5)));
        assert!(sink.wait_for_count("w", 1, Duration::from_secs(5)));
        assert!(!sink.wait_for_count("w", 2, Duration::from_millis(20)));
        let arrival = rx.recv_timeout(Duration::from_secs(5)).expect("arrival");
        assert!(arrival.received >= before);
        let got: Vec<(&str, u64, ItemOutcome)> = arrival
            .items
            .iter()
            .map(|i| (i.id.as_str(), i.version, i.outcome))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", 2, ItemOutcome::Created),
                ("b", 2, ItemOutcome::NotFound)
            ]
        );
        assert_eq!(&*arrival.items[0].index, "w");
        drop(rx);
        // With the receiver gone, the next bulk unsubscribes it quietly.
        c.call("POST", "/_bulk", body);
        assert!(!sink.shared.has_subscribers.load(Ordering::Acquire));
    }

    #[test]
    fn helpers() {
        assert!(glob("docs-*", "docs-1"));
        assert!(!glob("docs-*", "doc"));
        assert!(glob("*", "x"));
        assert!(glob("a*c*e", "abcde"));
        assert_eq!(percent_decode("a%2Cb"), "a,b");
        assert_eq!(percent_decode("100%"), "100%");
        let mut out = Vec::new();
        push_json_str(&mut out, "a\"b\\c\n\u{1}");
        assert_eq!(out, br#""a\"b\\c\n\u0001""#.to_vec());
    }
}
