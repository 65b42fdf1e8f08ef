//! `FaultProxy`: a small HTTP/1.1 reverse proxy that sits between ferry and
//! its search cluster and misbehaves on request.
//!
//! The proxy listens on `127.0.0.1:<random port>` and forwards every request
//! to an upstream base URL (an `osmem-server` or a real cluster reachable over
//! plain `http://`). A [`Fault`] installed with [`FaultProxy::set`] changes
//! what happens to requests whose path matches the proxy's path filter
//! (by default, paths ending in `/_bulk`); every other request is forwarded
//! untouched.
//!
//! HTTP/1.1 on both sides is hyper's: clients get keep-alive, pipelining,
//! `Content-Length` or chunked bodies and `Expect: 100-continue`; each
//! forwarded request goes out on a fresh upstream connection with
//! `Connection: close`, and the whole answer is re-framed for the client
//! with a `Content-Length`.
//!
//! [`Fault::DelayContaining`] holds back only the requests whose body holds
//! a given text, so a later request overtakes the held one (reordering
//! between concurrent bulk requests); [`FaultProxy::delayed_answered`] says
//! when a held request got its answer.
//!
//! [`Fault::ItemStatus`] is the subtle one: the rejected items are removed
//! from the body before it is forwarded, so they really are *not* applied
//! upstream, and synthetic per-item errors are spliced into the upstream
//! answer at their original positions. A client that wrongly treated those
//! errors as success would lose documents, which a test can then observe.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, HOST};
use hyper::service::service_fn;
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::error::{Result, TestkitError};

/// How long connecting to the upstream may take before the proxy answers 502.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Path filter used until [`FaultProxy::set_path_filter`] changes it.
const DEFAULT_PATH_FILTER: &str = "/_bulk";

/// One way for the proxy to misbehave.
///
/// Where a variant has `times`, `Some(n)` limits the fault to the next `n`
/// requests it actually alters, after which the proxy forwards faithfully
/// again (as if [`FaultProxy::clear`] had been called); `None` keeps the
/// fault until it is cleared or replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer `status` without contacting the upstream. The body is empty
    /// for 413 and a short OpenSearch-style JSON error otherwise.
    Status {
        /// HTTP status to answer, e.g. 429, 502, 503 or 413.
        status: u16,
        /// How many requests to answer this way (`None`: until cleared).
        times: Option<u32>,
    },
    /// Treat the request as a `_bulk` body and fail every `every_nth` item
    /// (the items at 1-based positions n, 2n, 3n, …) with `status`.
    ///
    /// Those items are cut out of the body before it is forwarded, so the
    /// upstream never applies them; the answer then carries synthetic error
    /// items at their positions and `"errors": true`. A bulk with fewer than
    /// `every_nth` items passes untouched and does not count against
    /// `times`. `every_nth == 0` is treated as 1 (fail every item).
    ItemStatus {
        /// Per-item status, typically 429 or 503.
        status: u16,
        /// Period of the rejected items.
        every_nth: usize,
        /// How many bulk requests to alter (`None`: until cleared).
        times: Option<u32>,
    },
    /// Wait this long before forwarding each matching request.
    Delay(Duration),
    /// Wait `delay` before forwarding a matching request whose body
    /// contains `needle`; other requests pass at once, so a later request
    /// can overtake the delayed one.
    DelayContaining {
        /// Bytes the body must contain, e.g. a value only one write carries.
        needle: String,
        /// How long to hold the request before forwarding it.
        delay: Duration,
        /// How many requests to delay (`None`: until cleared).
        times: Option<u32>,
    },
    /// Read the request, then close the client connection without answering.
    DropConnection {
        /// How many requests to drop (`None`: until cleared).
        times: Option<u32>,
    },
    /// Read the request and never answer; the connection stays open until
    /// the client gives up (its timeout must fire) or the proxy is dropped.
    Blackhole,
}

/// A running fault-injecting reverse proxy.
///
/// Cloning gives another handle to the same proxy, e.g. to move into a
/// spawned task. The proxy stops (its listener closes and every connection,
/// including blackholed ones, is dropped) when the last handle is dropped.
/// It runs on the Tokio runtime that called [`FaultProxy::start`].
#[derive(Clone)]
pub struct FaultProxy {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Dropping this sender tells every task of the proxy to stop.
    _stop: watch::Sender<()>,
}

/// State shared between the handles and the connection tasks.
struct Shared {
    upstream: Upstream,
    control: Mutex<Control>,
    requests: AtomicU64,
    matched: AtomicU64,
    injected: AtomicU64,
    items_rejected: AtomicU64,
    delayed_answered: AtomicU64,
}

struct Control {
    fault: Option<Fault>,
    path_filter: String,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("url", &self.inner.url)
            .field("fault", &self.fault())
            .field("requests", &self.requests())
            .field("injected", &self.injected())
            .finish()
    }
}

impl FaultProxy {
    /// Binds `127.0.0.1:0` and starts forwarding to `upstream`, a base URL
    /// such as `http://127.0.0.1:9200` (plain HTTP only; user info in the
    /// URL becomes a Basic `Authorization` header on forwarded requests that
    /// carry none). No fault is active at first.
    pub async fn start(upstream: &str) -> Result<FaultProxy> {
        let parsed = Upstream::parse(upstream).map_err(|why| {
            TestkitError::io(
                "FaultProxy: unusable upstream URL",
                io::Error::new(io::ErrorKind::InvalidInput, why),
            )
        })?;
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| TestkitError::io("FaultProxy: binding 127.0.0.1:0", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| TestkitError::io("FaultProxy: reading the listener address", e))?;
        let shared = Arc::new(Shared {
            upstream: parsed,
            control: Mutex::new(Control {
                fault: None,
                path_filter: DEFAULT_PATH_FILTER.to_owned(),
            }),
            requests: AtomicU64::new(0),
            matched: AtomicU64::new(0),
            injected: AtomicU64::new(0),
            items_rejected: AtomicU64::new(0),
            delayed_answered: AtomicU64::new(0),
        });
        let (stop_tx, stop_rx) = watch::channel(());
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), stop_rx));
        tracing::debug!(%addr, "ferry-testkit: fault proxy started");
        Ok(FaultProxy {
            inner: Arc::new(Inner {
                url: format!("http://{addr}"),
                addr,
                shared,
                _stop: stop_tx,
            }),
        })
    }

    /// Base URL clients should use, e.g. `http://127.0.0.1:40123` (no trailing slash).
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Installs `fault`, replacing any previous one. It applies to requests
    /// read from now on; requests already being handled keep their fate.
    pub fn set(&self, fault: Fault) {
        let exhausted = matches!(
            fault,
            Fault::Status { times: Some(0), .. }
                | Fault::ItemStatus { times: Some(0), .. }
                | Fault::DelayContaining { times: Some(0), .. }
                | Fault::DropConnection { times: Some(0) }
        );
        self.control().fault = if exhausted { None } else { Some(fault) };
    }

    /// Removes the active fault: from now on every request is forwarded faithfully.
    pub fn clear(&self) {
        self.control().fault = None;
    }

    /// The active fault, with `times` showing what is left of it; `None`
    /// once cleared or used up.
    pub fn fault(&self) -> Option<Fault> {
        self.control().fault.clone()
    }

    /// Faults apply only to requests whose path (query string excluded)
    /// ends with `suffix`; the default is `/_bulk`, and `""` matches every
    /// request.
    pub fn set_path_filter(&self, suffix: &str) {
        suffix.clone_into(&mut self.control().path_filter);
    }

    /// Requests read from clients so far, on any path.
    pub fn requests(&self) -> u64 {
        self.inner.shared.requests.load(Ordering::Relaxed)
    }

    /// Requests so far whose path matched the filter.
    pub fn matched(&self) -> u64 {
        self.inner.shared.matched.load(Ordering::Relaxed)
    }

    /// Requests so far that a fault altered (answered, delayed, dropped,
    /// blackholed, or had items rejected).
    pub fn injected(&self) -> u64 {
        self.inner.shared.injected.load(Ordering::Relaxed)
    }

    /// Delayed requests ([`Fault::Delay`], [`Fault::DelayContaining`]) the
    /// upstream has answered so far (the answer is on its way to the client).
    pub fn delayed_answered(&self) -> u64 {
        self.inner.shared.delayed_answered.load(Ordering::Relaxed)
    }

    /// Bulk items rejected so far by [`Fault::ItemStatus`].
    pub fn items_rejected(&self) -> u64 {
        self.inner.shared.items_rejected.load(Ordering::Relaxed)
    }

    /// Waits until [`injected`](Self::injected) reaches `n`; false if it did
    /// not within `within`.
    pub async fn wait_for_injected(&self, n: u64, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.injected() >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        self.inner.shared.control()
    }
}

impl Shared {
    fn control(&self) -> MutexGuard<'_, Control> {
        // A panic while holding the lock cannot leave Control inconsistent.
        self.control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Decides what happens to `req`, consuming one use of a limited fault.
    fn plan(&self, req: &Request) -> Plan {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut control = self.control();
        if !path_of(&req.target).ends_with(control.path_filter.as_str()) {
            return Plan::Forward;
        }
        self.matched.fetch_add(1, Ordering::Relaxed);
        let Some(fault) = control.fault.clone() else {
            return Plan::Forward;
        };
        let plan = match fault {
            Fault::Status { status, .. } => Plan::Respond(status),
            Fault::Delay(d) => Plan::Delay(d),
            Fault::DelayContaining { needle, delay, .. } => {
                let body: &[u8] = &req.body;
                if needle.is_empty() || !body.windows(needle.len()).any(|w| w == needle.as_bytes())
                {
                    return Plan::Forward;
                }
                Plan::Delay(delay)
            }
            Fault::DropConnection { .. } => Plan::Drop,
            Fault::Blackhole => Plan::Blackhole,
            Fault::ItemStatus {
                status, every_nth, ..
            } => {
                let compressed = req
                    .headers
                    .get("content-encoding")
                    .is_some_and(|v| v.as_bytes() != b"identity");
                let items = if compressed {
                    None
                } else {
                    parse_bulk(&req.body, index_from_path(path_of(&req.target)))
                };
                let Some(items) = items else {
                    return Plan::Forward;
                };
                let n = every_nth.max(1);
                let rejected: Vec<bool> = (1..=items.len()).map(|i| i % n == 0).collect();
                let count = rejected.iter().filter(|r| **r).count();
                if count == 0 {
                    return Plan::Forward;
                }
                self.items_rejected
                    .fetch_add(count as u64, Ordering::Relaxed);
                Plan::RejectItems {
                    status,
                    items,
                    rejected,
                }
            }
        };
        use_once(&mut control.fault);
        self.injected.fetch_add(1, Ordering::Relaxed);
        plan
    }
}

/// Counts one use of a limited fault, removing it when used up.
fn use_once(fault: &mut Option<Fault>) {
    let used_up = match fault {
        Some(
            Fault::Status { times, .. }
            | Fault::ItemStatus { times, .. }
            | Fault::DelayContaining { times, .. }
            | Fault::DropConnection { times },
        ) => match times {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        },
        _ => false,
    };
    if used_up {
        *fault = None;
    }
}

/// What to do with one request.
enum Plan {
    Forward,
    Delay(Duration),
    Respond(u16),
    Drop,
    Blackhole,
    RejectItems {
        status: u16,
        items: Vec<BulkItem>,
        rejected: Vec<bool>,
    },
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<()>) {
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((socket, _)) => {
                let _ = socket.set_nodelay(true);
                let shared = Arc::clone(&shared);
                let mut stop = stop.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.changed() => {}
                        _ = serve(shared, socket) => {}
                    }
                });
            }
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tracing::debug!(error = %e, "ferry-testkit: fault proxy accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Serves one client connection until it closes, errs, or asks to close.
async fn serve(shared: Arc<Shared>, client: TcpStream) {
    let service = service_fn(move |req| {
        let shared = Arc::clone(&shared);
        async move { answer(&shared, req).await }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "ferry-testkit: fault proxy connection ended");
    }
}

/// Reads one request and answers it as the active fault says; an `Err`
/// makes hyper close the connection without answering.
async fn answer(
    shared: &Shared,
    req: hyper::Request<Incoming>,
) -> io::Result<hyper::Response<Full<Bytes>>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    let req = Request {
        method: parts.method,
        target,
        headers: parts.headers,
        body,
    };
    let head_only = req.method == Method::HEAD;
    let response = match shared.plan(&req) {
        Plan::Forward => forward(&shared.upstream, &req, req.body.clone()).await,
        Plan::Delay(d) => {
            tokio::time::sleep(d).await;
            let answer = forward(&shared.upstream, &req, req.body.clone()).await;
            shared.delayed_answered.fetch_add(1, Ordering::Relaxed);
            answer
        }
        Plan::Respond(status) => injected_status(status),
        Plan::Drop => {
            tracing::debug!(target = %req.target, "ferry-testkit: fault proxy dropping the connection");
            return Err(io::Error::other("connection dropped by FaultProxy"));
        }
        Plan::Blackhole => {
            tracing::debug!(target = %req.target, "ferry-testkit: fault proxy blackholing a request");
            // Until the client gives up (hyper drops this future when the
            // connection closes) or the proxy stops.
            std::future::pending::<()>().await;
            return Err(io::Error::other("blackholed by FaultProxy"));
        }
        Plan::RejectItems {
            status,
            items,
            rejected,
        } => reject_items(&shared.upstream, &req, status, &items, &rejected).await,
    };
    Ok(response.into_hyper(head_only))
}

/// Forwards the request with only the kept items, then splices synthetic
/// errors for the rejected ones into the answer.
async fn reject_items(
    upstream: &Upstream,
    req: &Request,
    status: u16,
    items: &[BulkItem],
    rejected: &[bool],
) -> Response {
    let synthetic = |item: &BulkItem| item_error(item, status);
    if rejected.iter().all(|r| *r) {
        // Nothing left to forward: answer for the upstream.
        let all: Vec<Value> = items.iter().map(synthetic).collect();
        let body = json!({"took": 0, "errors": true, "items": all});
        return Response::json(200, &body);
    }
    let mut kept = Vec::new();
    for (item, r) in items.iter().zip(rejected) {
        if !r {
            kept.extend_from_slice(&item.raw);
        }
    }
    let upstream_answer = forward(upstream, req, Bytes::from(kept)).await;
    if !(200..300).contains(&upstream_answer.status) {
        // The whole request failed upstream; the client will resend all of it.
        return upstream_answer;
    }
    let spliced = (|| {
        let mut answer: Value = serde_json::from_slice(&upstream_answer.body).ok()?;
        let got = std::mem::take(answer.get_mut("items")?.as_array_mut()?);
        let kept_count = rejected.iter().filter(|r| !**r).count();
        if got.len() != kept_count {
            return None;
        }
        let mut got = got.into_iter();
        let mut merged = Vec::with_capacity(items.len());
        for (item, r) in items.iter().zip(rejected) {
            merged.push(if *r { synthetic(item) } else { got.next()? });
        }
        answer["items"] = Value::Array(merged);
        answer["errors"] = Value::Bool(true);
        Some(answer)
    })();
    match spliced {
        Some(answer) => Response::json(upstream_answer.status, &answer),
        // Better a retryable failure than a wrong answer about the items.
        None => Response::text(
            502,
            "FaultProxy could not splice rejected items into the upstream bulk answer",
        ),
    }
}

/// A per-item error in the shape OpenSearch uses.
fn item_error(item: &BulkItem, status: u16) -> Value {
    let (kind, reason) = match status {
        429 => (
            "rejected_execution_exception",
            "rejected execution of bulk item (injected by FaultProxy)",
        ),
        503 => (
            "unavailable_shards_exception",
            "primary shard is not active (injected by FaultProxy)",
        ),
        _ => (
            "fault_proxy_exception",
            "item failure injected by FaultProxy",
        ),
    };
    let mut body = serde_json::Map::new();
    body.insert("_index".into(), json!(item.index));
    body.insert("_id".into(), json!(item.id));
    body.insert("status".into(), json!(status));
    body.insert("error".into(), json!({"type": kind, "reason": reason}));
    let mut outer = serde_json::Map::new();
    outer.insert(item.action.clone(), Value::Object(body));
    Value::Object(outer)
}

/// The answer for [`Fault::Status`].
fn injected_status(status: u16) -> Response {
    if status == 413 {
        return Response {
            status,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        };
    }
    let kind = match status {
        429 => "rejected_execution_exception",
        503 => "unavailable_shards_exception",
        _ => "fault_proxy_exception",
    };
    Response::json(
        status,
        &json!({
            "error": {"type": kind, "reason": format!("status {status} injected by FaultProxy")},
            "status": status
        }),
    )
}

// ---------------------------------------------------------------------------
// Bulk bodies

/// One action of a `_bulk` body with its raw lines.
#[derive(Debug, Clone, PartialEq)]
struct BulkItem {
    /// `index`, `create`, `update` or `delete`.
    action: String,
    index: Option<String>,
    id: Option<String>,
    /// The action line and, except for deletes, the source line, each ending in `\n`.
    raw: Vec<u8>,
}

/// Splits an NDJSON bulk body into items; `None` if it is not one.
fn parse_bulk(body: &[u8], default_index: Option<&str>) -> Option<Vec<BulkItem>> {
    let mut lines = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace));
    let mut items = Vec::new();
    while let Some(action_line) = lines.next() {
        let parsed: Value = serde_json::from_slice(action_line).ok()?;
        let object = parsed.as_object()?;
        if object.len() != 1 {
            return None;
        }
        let (action, meta) = object.iter().next()?;
        let mut raw = action_line.to_vec();
        raw.push(b'\n');
        match action.as_str() {
            "delete" => {}
            "index" | "create" | "update" => {
                raw.extend_from_slice(lines.next()?);
                raw.push(b'\n');
            }
            _ => return None,
        }
        let text = |key: &str| match meta.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Null) | None => None,
            Some(other) => Some(other.to_string()),
        };
        items.push(BulkItem {
            action: action.clone(),
            index: text("_index").or_else(|| default_index.map(str::to_owned)),
            id: text("_id"),
            raw,
        });
    }
    Some(items)
}

/// `idx` from `/idx/_bulk`.
fn index_from_path(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?.strip_suffix("/_bulk")?;
    (!rest.is_empty() && !rest.contains('/')).then_some(rest)
}

// ---------------------------------------------------------------------------
// HTTP/1.1 (hyper)

/// A request read from a client.
#[derive(Debug)]
struct Request {
    method: Method,
    /// Path and query, as sent.
    target: String,
    headers: HeaderMap,
    body: Bytes,
}

/// An answer to a client.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Response {
    fn json(status: u16, body: &Value) -> Response {
        Response::with_type(status, "application/json; charset=UTF-8", body.to_string())
    }

    fn text(status: u16, text: &str) -> Response {
        Response::with_type(status, "text/plain; charset=UTF-8", text.to_owned())
    }

    fn with_type(status: u16, content_type: &'static str, body: String) -> Response {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static(content_type));
        Response {
            status,
            headers,
            body: Bytes::from(body),
        }
    }

    /// The answer framed with `Content-Length` by hyper. For a HEAD request
    /// the upstream's `Content-Length` (if any) is kept.
    fn into_hyper(self, head_only: bool) -> hyper::Response<Full<Bytes>> {
        let mut out = hyper::Response::new(Full::new(self.body));
        *out.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_GATEWAY);
        for (name, value) in &self.headers {
            if !is_hop_by_hop(name.as_str()) && name != CONTENT_LENGTH {
                out.headers_mut().append(name, value.clone());
            }
        }
        if head_only {
            if let Some(len) = self.headers.get(CONTENT_LENGTH) {
                out.headers_mut().insert(CONTENT_LENGTH, len.clone());
            }
        }
        out
    }
}

/// Where forwarded requests go.
#[derive(Debug, Clone, PartialEq)]
struct Upstream {
    /// `host:port`, for connecting and for the `Host` header.
    authority: String,
    /// Path prefix of the base URL without a trailing slash, e.g. `/os` or ``.
    prefix: String,
    /// `Basic …` from the URL's user info.
    authorization: Option<String>,
}

impl Upstream {
    fn parse(url: &str) -> std::result::Result<Upstream, String> {
        let rest = url
            .trim()
            .strip_prefix("http://")
            .ok_or_else(|| "only plain http:// upstream URLs are supported (no TLS)".to_owned())?;
        let (location, path) = match rest.find(['/', '?', '#']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let (userinfo, host) = match location.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, location),
        };
        if host.is_empty() {
            return Err(format!("no host in {url:?}"));
        }
        let has_port = host
            .rfind(':')
            .is_some_and(|colon| host.rfind(']').is_none_or(|bracket| colon > bracket));
        let authority = if has_port {
            host.to_owned()
        } else {
            format!("{host}:80")
        };
        let path = path.split(['?', '#']).next().unwrap_or("");
        Ok(Upstream {
            authority,
            prefix: path.trim_end_matches('/').to_owned(),
            authorization: userinfo.map(|u| {
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(u)
                )
            }),
        })
    }
}

/// Sends `req` (with `body` in place of its own) on a fresh upstream
/// connection and reads the whole answer. Failures become a 502.
async fn forward(upstream: &Upstream, req: &Request, body: Bytes) -> Response {
    match try_forward(upstream, req, body).await {
        Ok(resp) => resp,
        Err(e) => Response::text(
            502,
            &format!(
                "FaultProxy could not reach the upstream {}: {e}",
                upstream.authority
            ),
        ),
    }
}

async fn try_forward(upstream: &Upstream, req: &Request, body: Bytes) -> io::Result<Response> {
    let mut out = hyper::Request::new(Full::new(body.clone()));
    *out.method_mut() = req.method.clone();
    *out.uri_mut() = format!("{}{}", upstream.prefix, req.target)
        .parse()
        .map_err(io::Error::other)?;
    let headers = out.headers_mut();
    for (name, value) in &req.headers {
        let skip = is_hop_by_hop(name.as_str())
            || ["host", "content-length", "expect", "accept-encoding"].contains(&name.as_str());
        if !skip {
            headers.append(name, value.clone());
        }
    }
    headers.insert(
        HOST,
        HeaderValue::from_str(&upstream.authority).map_err(io::Error::other)?,
    );
    if let (Some(auth), false) = (&upstream.authorization, headers.contains_key(AUTHORIZATION)) {
        headers.insert(
            AUTHORIZATION,
            HeaderValue::from_str(auth).map_err(io::Error::other)?,
        );
    }
    let had_body =
        req.headers.contains_key(CONTENT_LENGTH) || req.headers.contains_key("transfer-encoding");
    if had_body || !body.is_empty() {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    headers.insert(CONNECTION, HeaderValue::from_static("close"));

    let stream = tokio::time::timeout(
        UPSTREAM_CONNECT_TIMEOUT,
        TcpStream::connect(upstream.authority.as_str()),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(connection);
    let answer = sender.send_request(out).await.map_err(io::Error::other)?;
    let (parts, body) = answer.into_parts();
    let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
    Ok(Response {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

fn is_hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// The path of a request target, without query string or fragment.
fn path_of(target: &str) -> &str {
    target.split(['?', '#']).next().unwrap_or(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Osmem;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack.windows(needle.len()).position(|w| w == needle)
    }

    async fn read_more(conn: &mut TcpStream, buf: &mut Vec<u8>, want: usize) -> io::Result<usize> {
        buf.reserve(want.max(4096));
        conn.read_buf(buf).await
    }

    fn invalid(why: &str) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, why.to_owned())
    }

    /// A minimal client: one request on an open connection, the answer
    /// framed by `Content-Length` (which the proxy always sends).
    async fn send(
        conn: &mut TcpStream,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> io::Result<(u16, Value)> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/x-ndjson\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body.unwrap_or(""));
        conn.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if read_more(conn, &mut buf, 4096).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid("status"))?;
        let len: usize = if method == "HEAD" {
            0
        } else {
            head.split("\r\n")
                .filter_map(|l| l.split_once(':'))
                .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse().ok())
                .ok_or_else(|| invalid("no content-length"))?
        };
        while buf.len() < head_end + len {
            if read_more(conn, &mut buf, len).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        let body = &buf[head_end..head_end + len];
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
        };
        Ok((status, value))
    }

    async fn connect(proxy: &FaultProxy) -> TcpStream {
        TcpStream::connect(proxy.addr())
            .await
            .expect("connect to the proxy")
    }

    async fn setup() -> (Osmem, FaultProxy) {
        let osmem = tokio::task::spawn_blocking(Osmem::start)
            .await
            .expect("join")
            .expect("start osmem-server");
        let proxy = FaultProxy::start(osmem.url()).await.expect("start proxy");
        (osmem, proxy)
    }

    fn bulk(index: &str, ids: &[u32]) -> String {
        ids.iter()
            .map(|id| {
                format!(
                    "{{\"index\":{{\"_index\":\"{index}\",\"_id\":\"{id}\"}}}}\n{{\"n\":{id}}}\n"
                )
            })
            .collect()
    }

    async fn doc_status(conn: &mut TcpStream, index: &str, id: u32) -> u16 {
        send(conn, "GET", &format!("/{index}/_doc/{id}"), None)
            .await
            .expect("get doc")
            .0
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwards_faithfully_on_a_kept_alive_connection() {
        let (_osmem, proxy) = setup().await;
        let mut c = connect(&proxy).await;
        let (status, root) = send(&mut c, "GET", "/", None).await.expect("GET /");
        assert_eq!(status, 200);
        assert!(root["version"]["number"].is_string(), "{root}");
        let (status, answer) = send(&mut c, "POST", "/_bulk", Some(&bulk("pass", &[1, 2])))
            .await
            .expect("bulk");
        assert_eq!(status, 200);
        assert_eq!(answer["errors"], false, "{answer}");
        let (status, _) = send(&mut c, "HEAD", "/pass", None).await.expect("HEAD");
        assert_eq!(status, 200);
        assert_eq!(doc_status(&mut c, "pass", 1).await, 200);
        assert_eq!(doc_status(&mut c, "pass", 3).await, 404);
        assert_eq!(proxy.requests(), 5);
        assert_eq!(proxy.matched(), 1);
        assert_eq!(proxy.injected(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn status_fault_answers_instead_of_forwarding_then_expires() {
        let (_osmem, proxy) = setup().await;
        let mut c = connect(&proxy).await;
        proxy.set(Fault::Status {
            status: 503,
            times: Some(2),
        });
        for id in [1, 2] {
            let (status, answer) = send(&mut c, "POST", "/_bulk", Some(&bulk("st", &[id])))
                .await
                .expect("bulk");
            assert_eq!(status, 503, "{answer}");
        }
        // Only `/_bulk` is affected, and nothing reached the upstream.
        assert_eq!(doc_status(&mut c, "st", 1).await, 404);
        assert_eq!(proxy.injected(), 2);
        assert_eq!(proxy.fault(), None, "used up after two requests");
        let (status, _) = send(&mut c, "POST", "/_bulk", Some(&bulk("st", &[3])))
            .await
            .expect("bulk");
        assert_eq!(status, 200);
        assert_eq!(doc_status(&mut c, "st", 3).await, 200);

        proxy.set(Fault::Status {
            status: 413,
            times: None,
        });
        let (status, body) = send(&mut c, "POST", "/_bulk", Some(&bulk("st", &[4])))
            .await
            .expect("bulk");
        assert_eq!((status, body), (413, Value::Null), "413 has an empty body");
        assert!(proxy.fault().is_some(), "an unlimited fault stays");
        proxy.clear();
        assert_eq!(proxy.fault(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn item_status_fault_keeps_rejected_items_from_the_upstream() {
        let (_osmem, proxy) = setup().await;
        let mut c = connect(&proxy).await;
        proxy.set(Fault::ItemStatus {
            status: 429,
            every_nth: 3,
            times: Some(1),
        });
        let mut body = bulk("items", &[1, 2, 3, 4, 5]);
        body.push_str("{\"delete\":{\"_index\":\"items\",\"_id\":\"99\"}}\n");
        body.push_str(&bulk("items", &[7]));
        let (status, answer) = send(&mut c, "POST", "/_bulk", Some(&body))
            .await
            .expect("bulk");
        assert_eq!(status, 200);
        assert_eq!(answer["errors"], true);
        let items = answer["items"].as_array().expect("items");
        assert_eq!(items.len(), 7, "{answer}");
        let statuses: Vec<u64> = items
            .iter()
            .map(|i| {
                i.as_object().and_then(|o| o.values().next()).expect("item")["status"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .collect();
        assert_eq!(statuses, [201, 201, 429, 201, 201, 429, 201]);
        let third = &items[2]["index"];
        assert_eq!(third["_id"], "3");
        assert_eq!(third["error"]["type"], "rejected_execution_exception");
        assert_eq!(items[5]["delete"]["_id"], "99");
        assert_eq!(proxy.items_rejected(), 2);
        assert_eq!(proxy.injected(), 1);
        // The rejected document never reached the upstream; the others did.
        assert_eq!(doc_status(&mut c, "items", 3).await, 404);
        for id in [1, 2, 4, 5, 7] {
            assert_eq!(doc_status(&mut c, "items", id).await, 200, "doc {id}");
        }

        // Every item rejected: answered without the upstream.
        proxy.set(Fault::ItemStatus {
            status: 503,
            every_nth: 1,
            times: None,
        });
        let (status, answer) = send(
            &mut c,
            "POST",
            "/items/_bulk",
            Some("{\"index\":{\"_id\":\"8\"}}\n{\"n\":8}\n"),
        )
        .await
        .expect("bulk");
        assert_eq!(status, 200);
        assert_eq!(answer["items"][0]["index"]["status"], 503);
        assert_eq!(answer["items"][0]["index"]["_index"], "items");
        assert_eq!(doc_status(&mut c, "items", 8).await, 404);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delay_fault_holds_the_answer_back() {
        let (_osmem, proxy) = setup().await;
        let mut c = connect(&proxy).await;
        proxy.set(Fault::Delay(Duration::from_millis(400)));
        let started = Instant::now();
        let (status, _) = send(&mut c, "POST", "/_bulk", Some(&bulk("delay", &[1])))
            .await
            .expect("bulk");
        assert_eq!(status, 200);
        assert!(started.elapsed() >= Duration::from_millis(400));
        let started = Instant::now();
        send(&mut c, "GET", "/", None).await.expect("GET /");
        assert!(
            started.elapsed() < Duration::from_millis(400),
            "other paths are not delayed"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delay_containing_holds_only_requests_with_the_needle_so_others_overtake() {
        let (_osmem, proxy) = setup().await;
        proxy.set(Fault::DelayContaining {
            needle: "\"n\":1}".into(),
            delay: Duration::from_secs(3),
            times: Some(1),
        });
        let held = {
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let mut c = connect(&proxy).await;
                send(&mut c, "POST", "/_bulk", Some(&bulk("dc", &[1])))
                    .await
                    .expect("held bulk")
                    .0
            })
        };
        assert!(proxy.wait_for_injected(1, Duration::from_secs(2)).await);
        let started = Instant::now();
        let mut c = connect(&proxy).await;
        let (status, _) = send(&mut c, "POST", "/_bulk", Some(&bulk("dc", &[2])))
            .await
            .expect("other bulk");
        assert_eq!(status, 200);
        assert_eq!(
            proxy.delayed_answered(),
            0,
            "a request without the needle overtook the held one ({:?})",
            started.elapsed()
        );
        assert_eq!(held.await.expect("join"), 200);
        assert_eq!(proxy.delayed_answered(), 1);
        assert_eq!(proxy.fault(), None, "used up after one request");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drop_connection_fault_closes_without_answering() {
        let (_osmem, proxy) = setup().await;
        proxy.set(Fault::DropConnection { times: Some(1) });
        let mut c = connect(&proxy).await;
        let err = send(&mut c, "POST", "/_bulk", Some(&bulk("drop", &[1])))
            .await
            .expect_err("no answer");
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            ),
            "{err:?}"
        );
        let mut c = connect(&proxy).await;
        let (status, _) = send(&mut c, "POST", "/_bulk", Some(&bulk("drop", &[2])))
            .await
            .expect("bulk");
        assert_eq!(status, 200);
        assert_eq!(doc_status(&mut c, "drop", 1).await, 404);
        assert_eq!(proxy.injected(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blackhole_fault_never_answers() {
        let (_osmem, proxy) = setup().await;
        proxy.set(Fault::Blackhole);
        let mut c = connect(&proxy).await;
        let outcome = tokio::time::timeout(
            Duration::from_millis(600),
            send(&mut c, "POST", "/_bulk", Some(&bulk("hole", &[1]))),
        )
        .await;
        assert!(
            outcome.is_err(),
            "no answer within the timeout: {outcome:?}"
        );
        assert!(proxy.wait_for_injected(1, Duration::from_secs(1)).await);
        proxy.clear();
        let mut c = connect(&proxy).await;
        let (status, _) = send(&mut c, "POST", "/_bulk", Some(&bulk("hole", &[2])))
            .await
            .expect("bulk");
        assert_eq!(status, 200);
        assert_eq!(doc_status(&mut c, "hole", 1).await, 404);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn path_filter_chooses_the_faulted_requests() {
        let (_osmem, proxy) = setup().await;
        let mut c = connect(&proxy).await;
        proxy.set_path_filter("");
        proxy.set(Fault::Status {
            status: 502,
            times: None,
        });
        assert_eq!(send(&mut c, "GET", "/", None).await.expect("GET").0, 502);
        proxy.set_path_filter("/_refresh");
        assert_eq!(send(&mut c, "GET", "/", None).await.expect("GET").0, 200);
        assert_eq!(
            send(&mut c, "POST", "/x/_refresh?pretty", None)
                .await
                .expect("refresh")
                .0,
            502
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_last_handle_stops_the_proxy() {
        let (_osmem, proxy) = setup().await;
        let addr = proxy.addr();
        let other = proxy.clone();
        drop(proxy);
        let mut c = TcpStream::connect(addr).await.expect("still up");
        assert_eq!(send(&mut c, "GET", "/", None).await.expect("GET").0, 200);
        drop(other);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let refused = match TcpStream::connect(addr).await {
            Err(_) => true,
            Ok(mut c) => send(&mut c, "GET", "/", None).await.is_err(),
        };
        assert!(refused, "the listener is gone");
    }

    #[test]
    fn parses_upstream_urls() {
        let u = Upstream::parse("http://127.0.0.1:9200").expect("plain");
        assert_eq!(
            (u.authority.as_str(), u.prefix.as_str()),
            ("127.0.0.1:9200", "")
        );
        assert_eq!(u.authorization, None);
        let u = Upstream::parse("http://admin:pw@search.local/os/").expect("with auth");
        assert_eq!(
            (u.authority.as_str(), u.prefix.as_str()),
            ("search.local:80", "/os")
        );
        assert_eq!(u.authorization.as_deref(), Some("Basic YWRtaW46cHc="));
        assert_eq!(
            Upstream::parse("http://[::1]").expect("v6").authority,
            "[::1]:80"
        );
        assert!(Upstream::parse("https://x:9200").is_err());
    }

    #[test]
    fn splits_bulk_bodies_into_items() {
        let body = b"{\"index\":{\"_index\":\"a\",\"_id\":\"1\"}}\n{\"x\":1}\n\n{\"delete\":{\"_id\":2}}\r\n{\"update\":{\"_index\":\"a\",\"_id\":\"3\"}}\n{\"doc\":{}}\n";
        let items = parse_bulk(body, Some("dflt")).expect("bulk");
        assert_eq!(items.len(), 3);
        assert_eq!(
            items[0].raw,
            b"{\"index\":{\"_index\":\"a\",\"_id\":\"1\"}}\n{\"x\":1}\n"
        );
        assert_eq!(
            (
                items[1].action.as_str(),
                items[1].index.as_deref(),
                items[1].id.as_deref()
            ),
            ("delete", Some("dflt"), Some("2"))
        );
        assert_eq!(items[2].action, "update");
        assert!(parse_bulk(b"not json\n", None).is_none());
        assert!(
            parse_bulk(b"{\"index\":{}}\n", None).is_none(),
            "source line missing"
        );
        assert_eq!(index_from_path("/idx/_bulk"), Some("idx"));
        assert_eq!(index_from_path("/_bulk"), None);
    }
}
