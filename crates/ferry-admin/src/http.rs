//! A deliberately small HTTP/1.x server (GET and HEAD, one request per
//! connection) and the matching client used by `ferry status`.
//!
//! The admin routes are tiny, read-only and polled every few seconds, so a
//! full HTTP stack would add nothing but build time: the server reads one
//! request head, answers it and closes the connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::stats::Stats;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::{AdminError, AdminInfo};

/// Largest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Longest one connection may take, from accept to the last byte written.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// Largest response body [`fetch`] reads.
const MAX_RESPONSE: u64 = 16 * 1024 * 1024;

/// A bound admin listener, not serving yet.
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    addr: SocketAddr,
}

impl AdminServer {
    /// Opens the listening socket on `listen` (port 0 picks a free port).
    pub async fn bind(listen: SocketAddr) -> Result<AdminServer, AdminError> {
        let bind_err = |source| AdminError::Bind {
            addr: listen,
            source,
        };
        let listener = TcpListener::bind(listen).await.map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        Ok(AdminServer { listener, addr })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves the admin routes until the listener fails for good; runs
    /// until the task is aborted otherwise.
    pub async fn run(self, stats: Arc<Stats>, info: AdminInfo) -> Result<(), AdminError> {
        let info = Arc::new(info);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) if per_connection(&e) => continue,
                Err(e) if resource_shortage(&e) => {
                    tracing::warn!(error = %e, "admin endpoint cannot accept connections; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(e) => return Err(AdminError::Accept(e)),
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "admin endpoint busy; closing connection");
                continue;
            };
            let stats = stats.clone();
            let info = info.clone();
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(CONNECTION_TIMEOUT, handle(stream, &stats, &info)).await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "admin connection failed"),
                    Err(_) => tracing::debug!(%peer, "admin connection timed out"),
                }
            });
        }
    }
}

/// Errors that concern one connection only.
fn per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | TimedOut
    )
}

/// Errors that pass once descriptors or memory are freed.
fn resource_shortage(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        )
    }
    #[cfg(not(unix))]
    {
        e.kind() == std::io::ErrorKind::OutOfMemory
    }
}

/// A response to write.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
    allow: bool,
}

impl Reply {
    fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            allow: false,
        }
    }
}

/// Reads one request head, answers it and closes the connection.
async fn handle(mut stream: TcpStream, stats: &Stats, info: &AdminInfo) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = loop {
        if let Some(end) = head_end(&head) {
            head.truncate(end);
            break true;
        }
        if head.len() > MAX_HEAD {
            break false;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            if head.is_empty() {
                return Ok(()); // connected and left: a port check
            }
            break false;
        }
        head.extend_from_slice(&buf[..n]);
    };
    let (reply, head_only) = if complete {
        route(&head, stats, info)
    } else if head.len() > MAX_HEAD {
        (Reply::text(431, "request head too large\n"), false)
    } else {
        (Reply::text(400, "incomplete request\n"), false)
    };
    write_reply(&mut stream, &reply, head_only).await?;
    stream.shutdown().await
}

/// The length of the request head including its blank line, once complete.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Picks the answer for a request head; the flag is true for HEAD.
fn route(head: &[u8], stats: &Stats, info: &AdminInfo) -> (Reply, bool) {
    let text = String::from_utf8_lossy(head);
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split_ascii_whitespace();
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return (Reply::text(400, "malformed request line\n"), false);
    };
    if !version.starts_with("HTTP/1.") {
        return (Reply::text(505, "only HTTP/1.x is served\n"), false);
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut r = Reply::text(405, "only GET and HEAD are allowed\n");
            r.allow = true;
            return (r, false);
        }
    };
    let path = target.split(['?', '#']).next().unwrap_or_default();
    let reply = match path {
        "/healthz" => Reply::text(200, "ok\n"),
        "/readyz" => match crate::readiness(stats) {
            Ok(()) => Reply::text(200, "ready\n"),
            Err(why) => Reply::text(503, format!("not ready: {why}\n")),
        },
        "/metrics" => Reply {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: crate::render_metrics(stats),
            allow: false,
        },
        "/status" => {
            let v = crate::status_json(stats, info);
            let mut body = serde_json::to_string_pretty(&v).unwrap_or_else(|_| "{}".into());
            body.push('\n');
            Reply {
                status: 200,
                content_type: "application/json",
                body,
                allow: false,
            }
        }
        "/" => Reply::text(
            200,
            "ferry admin endpoint: /healthz /readyz /metrics /status\n",
        ),
        _ => Reply::text(
            404,
            "not found; try /healthz, /readyz, /metrics or /status\n",
        ),
    };
    (reply, head_only)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

async fn write_reply(stream: &mut TcpStream, r: &Reply, head_only: bool) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    if r.allow {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&r.body);
    }
    stream.write_all(out.as_bytes()).await
}

/// A response received by [`fetch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// The body, decoded as UTF-8 (invalid bytes replaced).
    pub body: String,
}

/// GETs a plain `http://` URL (HTTP/1.0, no redirects, 10 s limit): enough
/// to read the admin endpoint without an HTTP client library.
pub async fn fetch(url: &str) -> Result<Response, AdminError> {
    let bad = |reason: &str| AdminError::Url {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if parsed.scheme() != "http" {
        return Err(bad("only http:// URLs are supported"));
    }
    let host = parsed.host_str().ok_or_else(|| bad("no host"))?.to_string();
    let port = parsed.port_or_known_default().unwrap_or(80);
    let mut target = parsed.path().to_string();
    if let Some(q) = parsed.query() {
        target.push('?');
        target.push_str(q);
    }
    let failed = |reason: String| AdminError::Request {
        url: url.to_string(),
        reason,
    };
    let exchange = async {
        let mut stream = TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let request = format!(
            "GET {target} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: ferry/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            env!("CARGO_PKG_VERSION")
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("cannot send the request: {e}"))?;
        let mut raw = Vec::new();
        (&mut stream)
            .take(MAX_RESPONSE)
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("cannot read the response: {e}"))?;
        parse_response(&raw)
    };
    match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(r) => r.map_err(failed),
        Err(_) => Err(failed("no answer within 10 s".into())),
    }
}

/// Splits a raw HTTP/1.x response into status and body.
fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let end = head_end(raw).ok_or("the response has no complete head")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split_ascii_whitespace();
    let status = match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => code
            .parse::<u16>()
            .map_err(|_| format!("bad status line {status_line:?}"))?,
        _ => return Err(format!("not an HTTP response: {status_line:?}")),
    };
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&raw[end..]).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    fn info() -> AdminInfo {
        AdminInfo {
            slot: "ferry_test".into(),
            version: "0.0.0",
        }
    }

    async fn start(stats: Arc<Stats>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let server = AdminServer::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = server.local_addr();
        let task = tokio::spawn(async move {
            let _ = server.run(stats, info()).await;
        });
        (addr, task)
    }

    /// Sends raw bytes and returns the raw answer.
    async fn raw(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        String::from_utf8(out).expect("utf-8")
    }

    #[tokio::test]
    async fn routes_answer() {
        let stats = Arc::new(crate::testutil::sample());
        stats.streaming.store(false, Relaxed);
        let (addr, task) = start(stats.clone()).await;
        let base = format!("http://{addr}");

        let r = fetch(&format!("{base}/healthz")).await.expect("healthz");
        assert_eq!(
            r,
            Response {
                status: 200,
                body: "ok\n".into()
            }
        );

        let r = fetch(&format!("{base}/readyz")).await.expect("readyz");
        assert_eq!(r.status, 503);
        assert!(r.body.contains("not streaming"), "{}", r.body);
        stats.streaming.store(true, Relaxed);
        let r = fetch(&format!("{base}/readyz")).await.expect("readyz");
        assert_eq!(r.status, 200);

        let r = fetch(&format!("{base}/metrics?x=1"))
            .await
            .expect("metrics");
        assert_eq!(r.status, 200);
        assert!(r.body.contains("ferry_changes_total{op=\"insert\"} 10\n"));

        let r = fetch(&format!("{base}/status")).await.expect("status");
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
        assert_eq!(v["slot"], "ferry_test");
        assert_eq!(v["indexes"][0]["name"], "users");

        let r = fetch(&format!("{base}/nope")).await.expect("404");
        assert_eq!(r.status, 404);
        task.abort();
    }

    #[tokio::test]
    async fn odd_requests_are_refused_cleanly() {
        let (addr, task) = start(Arc::new(Stats::default())).await;
        let post = raw(addr, b"POST /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert!(post.contains("Allow: GET, HEAD\r\n"), "{post}");

        let head = raw(addr, b"HEAD /healthz HTTP/1.1\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert!(head.contains("Content-Length: 3\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "{head}");

        let garbage = raw(addr, b"hello\r\n\r\n").await;
        assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");

        let bare_lf = raw(addr, b"GET /healthz HTTP/1.0\n\n").await;
        assert!(bare_lf.starts_with("HTTP/1.1 200 "), "{bare_lf}");
        assert!(bare_lf.ends_with("\r\n\r\nok\n"), "{bare_lf}");

        let mut big = b"GET /healthz HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        let too_big = raw(addr, &big).await;
        assert!(too_big.starts_with("HTTP/1.1 431 "), "{too_big}");

        // A connection that says nothing is simply closed.
        let silent = TcpStream::connect(addr).await.expect("connect");
        drop(silent);
        let still = fetch(&format!("http://{addr}/healthz"))
            .await
            .expect("alive");
        assert_eq!(still.status, 200);
        task.abort();
    }

    #[tokio::test]
    async fn bind_failure_names_the_address() {
        let first = AdminServer::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let taken = first.local_addr();
        let err = AdminServer::bind(taken).await.expect_err("in use");
        assert!(matches!(err, AdminError::Bind { addr, .. } if addr == taken));
        assert!(err.to_string().contains(&taken.to_string()), "{err}");
    }

    #[tokio::test]
    async fn fetch_reports_bad_urls_and_refusals() {
        assert!(matches!(
            fetch("https://127.0.0.1:1/status").await,
            Err(AdminError::Url { .. })
        ));
        assert!(matches!(
            fetch("not a url").await,
            Err(AdminError::Url { .. })
        ));
        // Bind then drop: the port is (almost certainly) closed now.
        let addr = AdminServer::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind")
            .local_addr();
        let err = fetch(&format!("http://{addr}/status"))
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("cannot connect"), "{err}");
    }

    #[test]
    fn responses_parse() {
        let r =
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\nA: b\r\n\r\nbody").expect("ok");
        assert_eq!(r.status, 503);
        assert_eq!(r.body, "body");
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
    }
}
