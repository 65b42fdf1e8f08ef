//! The OpenSearch (and Elasticsearch) sink: index lifecycle and bulk writes.
//!
//! * [`Sink::prepare_index`] makes sure an alias exists over a concrete index
//!   whose name carries a hash of its mapping, and says whether it is seeded.
//! * [`Sink::write`] makes a batch of [`DocWrite`]s durable with `_bulk`,
//!   retrying transient failures (transport errors, 429, 5xx, per-item 429/5xx)
//!   with capped exponential backoff for as long as it takes, splitting on 413,
//!   and treating a 409 on an external version as success (a newer write is
//!   already there). It returns only when every write is durable or when an
//!   item is rejected for good (poison), which is an error naming the document.
//!
//! Dropping a `write` future is safe: nothing is acknowledged upstream unless
//! it returned `Ok`.

mod bulk;
mod index;

pub use bulk::{encode_bulk, BulkOutcome};
pub use index::{concrete_name, IndexPlan, PreparedIndex};
pub use opensearch::http::Method;

use std::time::Duration;

use ferry_core::DocWrite;
use opensearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use opensearch::OpenSearch;

/// Errors from the sink, each saying whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The cluster could not be reached or did not answer in time.
    #[error("OpenSearch at {url} is unreachable: {reason}")]
    Unreachable {
        /// Redacted base URL.
        url: String,
        /// Transport error text.
        reason: String,
    },
    /// The cluster answered a request with an error status.
    #[error("OpenSearch answered {status} to {what}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The request, e.g. `PUT /users-1a2b`.
        what: String,
        /// Start of the response body.
        body: String,
    },
    /// One document was rejected for good (mapping conflict, too large, …).
    #[error("OpenSearch rejected document {id:?} of index {index:?} with {status}: {reason}; fix the mapping or the row, then restart ferry")]
    Poison {
        /// Concrete index name.
        index: String,
        /// Document id.
        id: String,
        /// Item status.
        status: u16,
        /// Error type and reason from the response.
        reason: String,
    },
    /// The configuration does not fit what is in the cluster.
    #[error("{0}")]
    Conflict(String),
    /// The response could not be understood.
    #[error("unexpected answer from OpenSearch to {what}: {reason}")]
    Protocol {
        /// The request.
        what: String,
        /// What was wrong.
        reason: String,
    },
}

impl SinkError {
    /// True when the same request may succeed later without anyone's help.
    pub fn is_retryable(&self) -> bool {
        match self {
            SinkError::Unreachable { .. } => true,
            SinkError::Status { status, .. } => is_transient(*status),
            SinkError::Poison { .. } | SinkError::Conflict(_) | SinkError::Protocol { .. } => false,
        }
    }
}

/// Statuses that mean "try again later": throttling and server-side failures.
pub fn is_transient(status: u16) -> bool {
    status == 429 || status == 408 || status >= 500
}

/// A connection to the search cluster.
#[derive(Clone)]
pub struct Sink {
    client: OpenSearch,
    url: String,
    timeout: Duration,
    max_backoff: Duration,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").field("url", &self.url).finish()
    }
}

/// Removes user info (credentials) from a URL before it is shown anywhere.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if !u.username().is_empty() || u.password().is_some() {
                let _ = u.set_username("");
                let _ = u.set_password(None);
            }
            u.to_string().trim_end_matches('/').to_string()
        }
        Err(_) => "<invalid url>".into(),
    }
}

impl Sink {
    /// Builds a client for `url` (no request is made yet).
    pub fn new(url: &str, timeout: Duration) -> Result<Sink, SinkError> {
        let parsed = url::Url::parse(url).map_err(|e| {
            SinkError::Conflict(format!("sink.url {:?} is not a URL: {e}", redact_url(url)))
        })?;
        let transport = TransportBuilder::new(SingleNodeConnectionPool::new(parsed))
            .disable_proxy()
            .timeout(timeout)
            .build()
            .map_err(|e| SinkError::Conflict(format!("cannot build the OpenSearch client: {e}")))?;
        Ok(Sink {
            client: OpenSearch::new(transport),
            url: redact_url(url),
            timeout,
            max_backoff: Duration::from_secs(30),
        })
    }

    /// Caps the retry backoff (tests use short caps).
    pub fn with_max_backoff(mut self, max: Duration) -> Self {
        self.max_backoff = max;
        self
    }

    /// The redacted base URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Asks the cluster for its distribution and version (`GET /`).
    pub async fn version(&self) -> Result<String, SinkError> {
        let v: serde_json::Value = self
            .request_json(opensearch::http::Method::Get, "/", None)
            .await?;
        let dist = v["version"]["distribution"]
            .as_str()
            .unwrap_or("elasticsearch");
        let num = v["version"]["number"].as_str().unwrap_or("unknown");
        Ok(format!("{dist} {num}"))
    }

    async fn request(
        &self,
        method: opensearch::http::Method,
        path: &str,
        body: Option<bytes::Bytes>,
        content_type: &'static str,
    ) -> Result<(u16, bytes::Bytes), SinkError> {
        use opensearch::http::headers::{HeaderMap, HeaderValue, CONTENT_TYPE};
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        let res = self
            .client
            .send::<bytes::Bytes, ()>(method, path, headers, None, body, Some(self.timeout))
            .await
            .map_err(|e| SinkError::Unreachable {
                url: self.url.clone(),
                reason: error_chain(&e),
            })?;
        let status = res.status_code().as_u16();
        let bytes = res.bytes().await.map_err(|e| SinkError::Unreachable {
            url: self.url.clone(),
            reason: error_chain(&e),
        })?;
        Ok((status, bytes))
    }

    /// Sends a JSON request and parses a 2xx JSON answer (for tools and tests).
    pub async fn json_request(
        &self,
        method: opensearch::http::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, SinkError> {
        self.request_json(method, path, body).await
    }

    /// Sends a JSON request and parses a 2xx JSON answer.
    async fn request_json(
        &self,
        method: opensearch::http::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, SinkError> {
        let what = format!("{} {path}", method_name(&method));
        let body = body.map(|b| bytes::Bytes::from(b.to_string().into_bytes()));
        let (status, bytes) = self.request(method, path, body, "application/json").await?;
        if !(200..300).contains(&status) {
            return Err(SinkError::Status {
                status,
                what,
                body: snippet(&bytes),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| SinkError::Protocol {
            what,
            reason: e.to_string(),
        })
    }

    /// Makes every write durable; see the crate docs for the retry rules.
    ///
    /// `index_names[w.index]` is the concrete index of write `w`.
    pub async fn write(
        &self,
        writes: &[DocWrite],
        index_names: &[String],
    ) -> Result<BulkOutcome, SinkError> {
        bulk::write_all(self, writes, index_names).await
    }

    /// Refreshes an index (or alias) so its writes become searchable.
    pub async fn refresh(&self, name: &str) -> Result<(), SinkError> {
        self.request_json(
            opensearch::http::Method::Post,
            &format!("/{name}/_refresh"),
            None,
        )
        .await
        .map(|_| ())
    }
}

fn method_name(m: &opensearch::http::Method) -> &'static str {
    use opensearch::http::Method;
    match m {
        Method::Get => "GET",
        Method::Put => "PUT",
        Method::Post => "POST",
        Method::Delete => "DELETE",
        Method::Head => "HEAD",
    }
}

/// A short, single-line excerpt of a response body for error messages.
fn snippet(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    if s.is_empty() {
        return "(empty body)".into();
    }
    let mut out: String = s.chars().take(400).collect();
    if s.chars().count() > 400 {
        out.push('…');
    }
    out.replace('\n', " ")
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
