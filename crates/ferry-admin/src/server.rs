//! The admin listener: accepts connections and hands each to hyper, which
//! serves the [`router`](crate::routes) over HTTP/1.
//!
//! The accept loop is ours for the limits an always-on side port needs and
//! `axum::serve` does not set: at most 64 connections at once (more are
//! closed at once), 10 s per connection, an 8 KiB request head, one request
//! per connection, and accept errors that pass (a reset, descriptors running
//! out) do not end the endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::stats::Stats;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::{AdminError, AdminInfo};

/// Largest request head accepted (hyper's smallest buffer limit).
const MAX_HEAD: usize = 8 * 1024;
/// Longest one connection may take, from accept to the last byte written.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;

/// A bound admin listener, not serving yet.
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    addr: SocketAddr,
    /// The control API, when a token is configured.
    control: Option<crate::ControlApi>,
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
        Ok(AdminServer {
            listener,
            addr,
            control: None,
        })
    }

    /// Serves the control API (`/control/…`) too; without it those paths
    /// answer `404`.
    pub fn with_control(mut self, control: crate::ControlApi) -> AdminServer {
        self.control = Some(control);
        self
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves the admin routes until the listener fails for good; runs
    /// until the task is aborted otherwise.
    pub async fn run(self, stats: Arc<Stats>, info: AdminInfo) -> Result<(), AdminError> {
        let routes = crate::routes::router(stats, info).merge(crate::control::routes(self.control));
        let service = TowerToHyperService::new(routes);
        let mut http = http1::Builder::new();
        http.keep_alive(false)
            .max_buf_size(MAX_HEAD)
            .timer(TokioTimer::new())
            .header_read_timeout(CONNECTION_TIMEOUT);
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
            let connection = http.serve_connection(TokioIo::new(stream), service.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{fetch, Response};
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn info() -> AdminInfo {
        AdminInfo {
            slot: "ferry_test".into(),
            version: "0.0.0",
            limits: crate::HealthLimits::default(),
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

    /// Sends raw bytes and returns the raw answer, header names lowercased.
    async fn raw(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        let text = String::from_utf8(out).expect("utf-8");
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        format!("{}\r\n\r\n{body}", head.to_ascii_lowercase())
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
        assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));

        let r = fetch(&format!("{base}/metrics?x=1"))
            .await
            .expect("metrics");
        assert_eq!(r.status, 200);
        assert!(r.body.contains("ferry_changes_total{op=\"insert\"} 10\n"));

        let r = fetch(&format!("{base}/status")).await.expect("status");
        assert_eq!(r.status, 200);
        assert!(r.body.ends_with("}\n"), "{}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
        assert_eq!(v["slot"], "ferry_test");
        assert_eq!(v["indexes"][0]["name"], "users");

        let r = fetch(&format!("{base}/nope")).await.expect("404");
        assert_eq!(r.status, 404);
        let r = fetch(&format!("{base}/")).await.expect("index");
        assert_eq!(r.status, 200);
        assert!(r.body.contains("/healthz /readyz /metrics /status"));
        task.abort();
    }

    #[tokio::test]
    async fn responses_carry_their_content_type_and_close() {
        let (addr, task) = start(Arc::new(crate::testutil::sample())).await;
        for (path, content_type) in [
            ("/healthz", "text/plain; charset=utf-8"),
            ("/readyz", "text/plain; charset=utf-8"),
            ("/metrics", "text/plain; version=0.0.4; charset=utf-8"),
            ("/status", "application/json"),
            ("/nope", "text/plain; charset=utf-8"),
        ] {
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
            let answer = raw(addr, request.as_bytes()).await;
            assert!(
                answer.contains(&format!("\r\ncontent-type: {content_type}\r\n")),
                "{answer}"
            );
            assert!(
                answer.contains("\r\ncache-control: no-store\r\n"),
                "{answer}"
            );
            assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
        }
        task.abort();
    }

    #[tokio::test]
    async fn odd_requests_are_refused_cleanly() {
        let (addr, task) = start(Arc::new(Stats::default())).await;
        for post in [
            raw(addr, b"POST /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await,
            raw(addr, b"DELETE /nope HTTP/1.1\r\nHost: x\r\n\r\n").await,
        ] {
            assert!(post.starts_with("http/1.1 405 "), "{post}");
            assert!(post.contains("\r\nallow: get, head\r\n"), "{post}");
        }

        let head = raw(addr, b"HEAD /healthz HTTP/1.1\r\n\r\n").await;
        assert!(head.starts_with("http/1.1 200 "), "{head}");
        assert!(head.contains("\r\ncontent-length: 3\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "{head}");

        let garbage = raw(addr, b"hello\r\n\r\n").await;
        assert!(garbage.starts_with("http/1.1 400 "), "{garbage}");

        let bare_lf = raw(addr, b"GET /healthz HTTP/1.0\n\n").await;
        assert!(bare_lf.contains(" 200 "), "{bare_lf}");
        assert!(bare_lf.ends_with("\r\n\r\nok\n"), "{bare_lf}");

        let mut big = b"GET /healthz HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        let too_big = raw(addr, &big).await;
        assert!(too_big.starts_with("http/1.1 431 "), "{too_big}");

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
}
