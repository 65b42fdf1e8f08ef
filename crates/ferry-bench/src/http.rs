//! A small HTTP/1.1 client for talking to the OpenSearch node: keep-alive
//! connections over plain TCP, `Content-Length` and chunked responses. The
//! bench needs nothing more (no TLS, no redirects), and this keeps it free
//! of a second TLS stack next to ferry's.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// Longest any single request may take (a bulk request on a busy node
/// included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// An HTTP response: status and whole body.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON; fails (with the body) unless the status is 2xx.
    pub fn json(&self, what: &str) -> Result<serde_json::Value> {
        if !(200..300).contains(&self.status) {
            bail!("{what}: HTTP {}: {}", self.status, self.snippet());
        }
        serde_json::from_slice(&self.body)
            .with_context(|| format!("{what}: the answer is not JSON"))
    }

    /// The start of the body, for error messages.
    pub fn snippet(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        text.chars().take(500).collect()
    }
}

/// One keep-alive connection to `host:port`, opened on first use and
/// reopened when the server closed it.
pub struct Conn {
    authority: String,
    stream: Option<BufReader<TcpStream>>,
}

impl Conn {
    /// A connection to `url` (`http://host:port`), not opened yet.
    pub fn new(url: &str) -> Conn {
        let authority = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        Conn {
            authority,
            stream: None,
        }
    }

    /// Sends one request and reads the whole response. A reused connection
    /// the server had closed is reopened and the request sent once more.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<Response> {
        let reused = self.stream.is_some();
        let first = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.attempt(method, path, content_type, body),
        )
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {REQUEST_TIMEOUT:?}")));
        match first {
            Ok(r) => Ok(r),
            Err(_) if reused => {
                self.stream = None;
                tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    self.attempt(method, path, content_type, body),
                )
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {REQUEST_TIMEOUT:?}")))
            }
            Err(e) => Err(e),
        }
        .with_context(|| format!("{method} {path} on {}", self.authority))
    }

    async fn attempt(
        &mut self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<Response> {
        if self.stream.is_none() {
            let sock = TcpStream::connect(&self.authority).await?;
            sock.set_nodelay(true)?;
            self.stream = Some(BufReader::with_capacity(64 * 1024, sock));
        }
        let Some(stream) = self.stream.as_mut() else {
            bail!("not connected");
        };
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
            self.authority,
            body.len()
        );
        let result = exchange(stream, head.as_bytes(), body, method == "HEAD").await;
        match result {
            Ok((response, keep_alive)) => {
                if !keep_alive {
                    self.stream = None;
                }
                Ok(response)
            }
            Err(e) => {
                self.stream = None;
                Err(e)
            }
        }
    }
}

/// Writes the request, reads the response; also says whether the
/// connection may be reused.
async fn exchange(
    stream: &mut BufReader<TcpStream>,
    head: &[u8],
    body: &[u8],
    is_head: bool,
) -> Result<(Response, bool)> {
    let sock = stream.get_mut();
    sock.write_all(head).await?;
    sock.write_all(body).await?;
    let mut line = String::new();
    if stream.read_line(&mut line).await? == 0 {
        bail!("connection closed before the response");
    }
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {line:?}"))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut keep_alive = true;
    loop {
        let mut header = String::new();
        if stream.read_line(&mut header).await? == 0 {
            bail!("connection closed in the response head");
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse().context("bad content-length")?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                keep_alive = !value.eq_ignore_ascii_case("close");
            }
        }
    }
    let mut out = Vec::new();
    if is_head {
        // No body follows a HEAD response, whatever its headers say.
    } else if chunked {
        loop {
            let mut size = String::new();
            stream.read_line(&mut size).await?;
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .with_context(|| format!("bad chunk size {size:?}"))?;
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    let mut trailer = String::new();
                    if stream.read_line(&mut trailer).await? == 0 || trailer.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let at = out.len();
            out.resize(at + size, 0);
            stream.read_exact(&mut out[at..]).await?;
            let mut crlf = [0u8; 2];
            stream.read_exact(&mut crlf).await?;
        }
    } else if let Some(n) = length {
        out.resize(n, 0);
        stream.read_exact(&mut out).await?;
    } else {
        stream.read_to_end(&mut out).await?;
        keep_alive = false;
    }
    Ok((Response { status, body: out }, keep_alive))
}

/// A few pooled connections to one server, usable from `&self`.
pub struct Client {
    url: String,
    idle: Mutex<Vec<Conn>>,
}

impl Client {
    /// A client for `url` (`http://host:port`).
    pub fn new(url: &str) -> Client {
        Client {
            url: url.trim_end_matches('/').to_owned(),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Sends a request with a JSON body (or none when `body` is empty).
    pub async fn send(&self, method: &str, path: &str, body: &[u8]) -> Result<Response> {
        self.send_typed(method, path, "application/json", body)
            .await
    }

    /// Sends a request with a body of `content_type`.
    pub async fn send_typed(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<Response> {
        let conn = self.idle.lock().await.pop();
        let mut conn = conn.unwrap_or_else(|| Conn::new(&self.url));
        let response = conn.request(method, path, content_type, body).await;
        if response.is_ok() {
            self.idle.lock().await.push(conn);
        }
        response
    }

    /// `send` + [`Response::json`].
    pub async fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let bytes = match body {
            Some(v) => serde_json::to_vec(v)?,
            None => Vec::new(),
        };
        self.send(method, path, &bytes)
            .await?
            .json(&format!("{method} {path}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Serves `answers` in turn on one connection, returning what it read.
    async fn serve(listener: TcpListener, answers: Vec<&'static [u8]>) -> Vec<u8> {
        let (mut sock, _) = listener.accept().await.expect("accept");
        let mut seen = Vec::new();
        for answer in answers {
            let mut buf = vec![0u8; 4096];
            let n = sock.read(&mut buf).await.expect("read");
            seen.extend_from_slice(&buf[..n]);
            sock.write_all(answer).await.expect("write");
        }
        seen
    }

    #[tokio::test]
    async fn reads_sized_and_chunked_bodies_on_one_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let server = tokio::spawn(serve(
            listener,
            vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            ],
        ));
        let mut conn = Conn::new(&url);
        let a = conn
            .request("GET", "/", "application/json", b"")
            .await
            .expect("a");
        assert_eq!((a.status, a.body.as_slice()), (200, &b"ok"[..]));
        let b = conn
            .request("POST", "/x", "application/x-ndjson", b"{}\n")
            .await
            .expect("b");
        assert_eq!((b.status, b.body.as_slice()), (201, &b"abcde"[..]));
        let seen = String::from_utf8(server.await.expect("server")).expect("utf8");
        assert!(seen.starts_with("GET / HTTP/1.1\r\n"));
        assert!(seen.contains("POST /x HTTP/1.1\r\n"));
        assert!(
            seen.contains("content-type: application/x-ndjson\r\ncontent-length: 3\r\n\r\n{}\n")
        );
    }
}
