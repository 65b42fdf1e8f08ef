//! FastSink's HTTP side, on hyper: request limits, the framing FastSink
//! refuses (chunked or compressed bodies) and routing to the REST handlers.

use std::convert::Infallible;

use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use hyper::{Request, Response, StatusCode};

use super::*;

/// Largest request body accepted, like OpenSearch's default `http.max_content_length`.
const MAX_BODY_BYTES: usize = 100 * 1024 * 1024;
/// Bodies over the limit but at most this big are read and discarded so the
/// client sees the 413; anything bigger gets the 413 and a closed connection.
const DRAIN_LIMIT: usize = 1024 * 1024 * 1024;

pub(super) async fn accept_loop(
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

async fn serve_connection(sock: TcpStream, shared: Arc<Shared>) {
    let _ = sock.set_nodelay(true);
    let service = service_fn(move |req| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(serve_request(&shared, req).await) }
    });
    let served = http1::Builder::new()
        .serve_connection(TokioIo::new(sock), service)
        .await;
    if let Err(e) = served {
        tracing::trace!(error = %e, "ferry-testkit: FastSink connection ended");
    }
}

/// The parts of a request head the routes look at.
#[derive(Debug)]
pub(super) struct Head {
    pub(super) method: String,
    pub(super) path: String,
    pub(super) query: String,
}

/// A response about to be written.
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) body: Vec<u8>,
    /// Close the connection after writing it.
    pub(super) close: bool,
}

impl Reply {
    pub(super) fn json(status: u16, value: &Value) -> Reply {
        Reply {
            status,
            body: value.to_string().into_bytes(),
            close: false,
        }
    }

    pub(super) fn ok() -> Reply {
        Reply::json(200, &json!({"acknowledged": true}))
    }

    pub(super) fn fail(f: &Fail, index: Option<&str>) -> Reply {
        let mut cause = json!({"type": f.kind, "reason": f.reason});
        if let Some(ix) = index {
            cause["index"] = json!(ix);
            cause["index_uuid"] = json!("_na_");
        }
        let mut error = cause.clone();
        error["root_cause"] = json!([cause]);
        Reply::json(f.status, &json!({"error": error, "status": f.status}))
    }

    pub(super) fn error(status: u16, kind: &'static str, reason: impl Into<String>) -> Reply {
        Reply::fail(&Fail::new(status, kind, reason), None)
    }

    pub(super) fn closing(mut self) -> Reply {
        self.close = true;
        self
    }
}

/// Answers one request.
async fn serve_request(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    Counters::add(&shared.counters.requests, 1);
    Counters::add(&shared.counters.bytes_received, head_bytes(&req));
    let headers = req.headers();
    let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let not_identity =
        |name: &str| value(name).is_some_and(|v| !v.eq_ignore_ascii_case("identity"));
    let wants_close = value("connection")
        .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
    if not_identity("transfer-encoding") {
        return respond(
            Reply::error(
                411,
                "length_required",
                "FastSink needs a Content-Length header; Transfer-Encoding (chunked) \
             request bodies are not supported",
            )
            .closing(),
        );
    }
    let content_encoded = not_identity("content-encoding");
    let expect_continue = value("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    let len: usize = value("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let head = Head {
        method: req.method().as_str().to_owned(),
        path: req.uri().path().to_owned(),
        query: req.uri().query().unwrap_or("").to_owned(),
    };
    let mut body = req.into_body();
    if len > MAX_BODY_BYTES {
        let reply = Reply::error(
            413,
            "content_too_long",
            format!("request body of {len} bytes exceeds the limit of {MAX_BODY_BYTES} bytes"),
        );
        if len > DRAIN_LIMIT || expect_continue {
            return respond(reply.closing());
        }
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return respond(reply.closing());
            };
            if let Ok(data) = frame.into_data() {
                Counters::add(&shared.counters.bytes_received, data.len() as u64);
            }
        }
        return respond(if wants_close { reply.closing() } else { reply });
    }
    let mut buf = BytesMut::with_capacity(len);
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return respond(
                Reply::error(400, "bad_request", "the request body ended early").closing(),
            );
        };
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
        }
    }
    let body = buf.freeze();
    Counters::add(&shared.counters.bytes_received, body.len() as u64);
    let received = Instant::now();
    let mut reply = if content_encoded {
        Reply::error(
            415,
            "illegal_argument_exception",
            "FastSink does not decompress request bodies (Content-Encoding)",
        )
    } else {
        route(shared, &head, &body, received)
    };
    reply.close |= wants_close;
    respond(reply)
}

/// The size of the request head as sent (request line and headers).
fn head_bytes<B>(req: &Request<B>) -> u64 {
    let line = req.method().as_str().len() + req.uri().to_string().len() + 12;
    let headers: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    (line + headers + 2) as u64
}

fn respond(reply: Reply) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    if reply.close {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Decodes `%XX` escapes in one path segment.
pub(super) fn percent_decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

// ---------------------------------------------------------------------------
// REST routing
// ---------------------------------------------------------------------------

pub(super) fn route(shared: &Shared, head: &Head, body: &Bytes, received: Instant) -> Reply {
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
