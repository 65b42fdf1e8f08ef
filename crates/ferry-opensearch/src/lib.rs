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
mod deadletter;
mod index;
mod scan;

pub use bulk::{
    encode_bulk, item_outcome, parse_bulk_answer, BulkOutcome, ItemAnswer, ItemOutcome, Rejected,
    SupersededWrite,
};
pub use deadletter::DeadLetter;
pub use index::{concrete_name, IndexPlan, PreparedIndex};
pub use opensearch::http::Method;
pub use scan::{Hit, Scroll};

use std::sync::Arc;
use std::time::Duration;

use ferry_core::stats::Stats;
use ferry_core::DocWrite;
use opensearch::cert::CertificateValidation;
use opensearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use opensearch::OpenSearch;
use percent_encoding::percent_decode_str;

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
    /// The cluster cannot take a write into an index at all: the index is
    /// missing, or writes to it are refused (privileges, a write block).
    /// Nothing of the batch is confirmed; an operator must act.
    #[error("{}", refused_message(index, id, *status, reason))]
    Refused {
        /// Concrete index name.
        index: String,
        /// Document id of the first refused write.
        id: String,
        /// Item status (401, 403, 404).
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

fn refused_message(index: &str, id: &str, status: u16, reason: &str) -> String {
    let fix = if status == 404 {
        format!(
            "index {index:?} does not exist (deleted outside ferry?): restart ferry, which creates it again \
             and copies every row into it (run `ferry reindex` instead to rebuild an index that still exists); \
             keep the cluster from recreating it with guessed mappings by excluding ferry's indexes from action.auto_create_index"
        )
    } else {
        format!(
            "OpenSearch refuses writes to index {index:?}: lift the block (PUT /{index}/_settings \
             {{\"index.blocks.write\": null}}; a read-only block after a full disk needs space first) \
             or grant ferry's user write privileges on it, then restart ferry"
        )
    };
    format!(
        "{fix} (document {id:?} answered {status}: {reason}); \
         nothing after the last confirmed change was acknowledged, so nothing is lost"
    )
}

/// Statuses that mean "try again later": throttling and server-side failures.
pub fn is_transient(status: u16) -> bool {
    status == 429 || status == 408 || status >= 500
}

/// The longest wait between two retries of a failed bulk request: short,
/// so ferry writes again within about that long of the cluster answering
/// after an outage, however long the outage was.
pub const MAX_RETRY_INTERVAL: Duration = Duration::from_secs(2);

/// A connection to the search cluster.
#[derive(Clone)]
pub struct Sink {
    client: OpenSearch,
    url: String,
    timeout: Duration,
    max_backoff: Duration,
    /// Credentials to blank out of any text that leaves the sink.
    secrets: Vec<String>,
    /// Where requests and bulk attempts are counted, when observed.
    stats: Option<Arc<Stats>>,
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
    /// Builds a client for `url` (no request is made yet). A user and
    /// password in the URL become basic-auth credentials and leave the URL,
    /// so they never show up in logs or errors; certificates are verified
    /// against the system's roots.
    pub fn new(url: &str, timeout: Duration) -> Result<Sink, SinkError> {
        let (parsed, in_url) = split_user_info(url)?;
        let credentials = in_url.map(|(user, password)| SinkAuth::Basic { user, password });
        Self::build(parsed, timeout, credentials, Validation::Default)
    }

    /// Builds the client `[sink]` describes: basic auth from the URL or from
    /// `username` + `password_file` / `password_env` (read now), an extra CA
    /// from `ca_cert`, `tls_verify`, and SigV4 signing from `aws`. Errors name
    /// the key to fix and never contain a secret.
    pub fn from_config(cfg: &ferry_config::SinkConfig) -> Result<Sink, SinkError> {
        let bad = |m: String| SinkError::Conflict(m);
        let timeout = Duration::from_secs(cfg.request_timeout_secs);
        let (parsed, in_url) = split_user_info(&cfg.url)?;
        let from_keys = match (&cfg.password_file, &cfg.password_env) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "sink.password_file and sink.password_env both give the password; keep one"
                        .into(),
                ))
            }
            (Some(path), None) => Some(ferry_config::read_secret_file(path).map_err(|r| {
                bad(format!(
                    "sink.password_file: cannot use {}: {r}",
                    path.display()
                ))
            })?),
            (None, Some(name)) => Some(
                ferry_config::read_secret_env(name)
                    .map_err(|r| bad(format!("sink.password_env: {r}")))?,
            ),
            (None, None) => None,
        };
        let credentials = match (in_url, &cfg.username, from_keys) {
            (Some(_), Some(_), _) => {
                return Err(bad(
                    "sink.username and the user in sink.url both give the user; keep one".into(),
                ))
            }
            (Some((_, p)), None, Some(_)) if !p.is_empty() => {
                return Err(bad(
                    "sink.url carries a password and sink.password_file / sink.password_env give one too; keep one".into(),
                ))
            }
            (Some((user, _)), None, Some(password)) => Some(SinkAuth::Basic { user, password }),
            (Some((user, password)), None, None) => Some(SinkAuth::Basic { user, password }),
            (None, Some(user), Some(password)) => Some(SinkAuth::Basic {
                user: user.clone(),
                password,
            }),
            (None, Some(_), None) => {
                return Err(bad(
                    "sink.username has no password: set sink.password_file or sink.password_env"
                        .into(),
                ))
            }
            (None, None, Some(_)) => {
                return Err(bad(
                    "sink.password_file / sink.password_env need sink.username".into(),
                ))
            }
            (None, None, None) => None,
        };
        let credentials = match (&cfg.aws, credentials) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "sink.aws: SigV4 signing replaces basic auth; remove the user and password"
                        .into(),
                ))
            }
            (Some(aws), None) => Some(SinkAuth::Aws(aws.clone())),
            (None, c) => c,
        };
        let validation = if !cfg.tls_verify {
            if cfg.ca_cert.is_some() {
                return Err(bad(
                    "sink.ca_cert has no effect with sink.tls_verify = false; remove one of them"
                        .into(),
                ));
            }
            tracing::warn!(
                sink = %redact_url(&cfg.url),
                "sink.tls_verify = false: the search cluster's certificate is NOT checked; \
                 anyone on the network path can read and change what ferry sends, credentials included"
            );
            Validation::None
        } else if let Some(path) = &cfg.ca_cert {
            let pem = std::fs::read(path)
                .map_err(|e| bad(format!("sink.ca_cert: cannot read {}: {e}", path.display())))?;
            Validation::Ca(opensearch::cert::Certificate::from_pem(&pem).map_err(|e| {
                bad(format!(
                    "sink.ca_cert: {} holds no usable PEM certificate ({e})",
                    path.display()
                ))
            })?)
        } else {
            Validation::Default
        };
        Self::build(parsed, timeout, credentials, validation)
    }

    fn build(
        url: url::Url,
        timeout: Duration,
        auth: Option<SinkAuth>,
        validation: Validation,
    ) -> Result<Sink, SinkError> {
        let shown = redact_url(url.as_str());
        let mut secrets = Vec::new();
        let mut builder = TransportBuilder::new(SingleNodeConnectionPool::new(url))
            .disable_proxy()
            .timeout(timeout);
        match auth {
            None => {}
            Some(SinkAuth::Basic { user, password }) => {
                secrets.push(password.clone());
                builder = builder.auth(opensearch::auth::Credentials::Basic(user, password));
            }
            Some(SinkAuth::Aws(aws)) => builder = aws_signing(builder, &aws)?,
        }
        builder = match validation {
            Validation::Default => builder,
            Validation::Ca(certs) => builder.cert_validation(CertificateValidation::Full(certs)),
            Validation::None => builder.cert_validation(CertificateValidation::None),
        };
        let transport = builder.build().map_err(|e| {
            SinkError::Conflict(format!(
                "cannot build the OpenSearch client: {}",
                scrub(&error_chain(&e), &secrets)
            ))
        })?;
        Ok(Sink {
            client: OpenSearch::new(transport),
            url: shown,
            timeout,
            max_backoff: MAX_RETRY_INTERVAL,
            secrets,
            stats: None,
        })
    }

    /// Why a request did not get an answer, scrubbed of credentials, with a
    /// hint when the cluster's certificate was refused.
    fn transport_reason(&self, e: &dyn std::error::Error) -> String {
        let text = scrub(&error_chain(e), &self.secrets);
        match certificate_hint(&text) {
            Some(hint) => format!("{text}; {hint}"),
            None => text,
        }
    }

    /// Counts every request's answer (or its absence) and every bulk
    /// attempt in `stats`: [`Stats::sink_answered`],
    /// [`Stats::sink_unreachable`], [`Stats::bulk_request`],
    /// [`Stats::bulk_retried`], [`Stats::bulk_completed`].
    pub fn observed_by(mut self, stats: Arc<Stats>) -> Self {
        self.stats = Some(stats);
        self
    }

    /// The figures this sink reports to, if any.
    pub(crate) fn stats(&self) -> Option<&Stats> {
        self.stats.as_deref()
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
        let answer = async {
            let res = self
                .client
                .send::<bytes::Bytes, ()>(method, path, headers, None, body, Some(self.timeout))
                .await
                .map_err(|e| SinkError::Unreachable {
                    url: self.url.clone(),
                    reason: self.transport_reason(&e),
                })?;
            let status = res.status_code().as_u16();
            let bytes = res.bytes().await.map_err(|e| SinkError::Unreachable {
                url: self.url.clone(),
                reason: self.transport_reason(&e),
            })?;
            Ok((status, bytes))
        }
        .await;
        if let Some(stats) = self.stats() {
            match &answer {
                Ok(_) => stats.sink_answered(),
                Err(_) => stats.sink_unreachable(),
            }
        }
        answer
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

/// How requests to the cluster authenticate.
enum SinkAuth {
    /// HTTP basic auth.
    Basic { user: String, password: String },
    /// AWS SigV4 request signing.
    Aws(ferry_config::AwsConfig),
}

/// How the cluster's certificate is checked.
enum Validation {
    /// Against the system's roots, host name included.
    Default,
    /// Against the system's roots plus these CA certificates, host name included.
    Ca(opensearch::cert::Certificate),
    /// Not at all (`tls_verify = false`).
    None,
}

/// Parses `raw` and moves its user info out: (URL without it, (user, password)).
fn split_user_info(raw: &str) -> Result<(url::Url, Option<(String, String)>), SinkError> {
    let mut url = url::Url::parse(raw).map_err(|e| {
        SinkError::Conflict(format!("sink.url {:?} is not a URL: {e}", redact_url(raw)))
    })?;
    if url.username().is_empty() && url.password().is_none() {
        return Ok((url, None));
    }
    // The URL parser keeps user info percent-encoded.
    let decode = |text: &str| percent_decode_str(text).decode_utf8_lossy().into_owned();
    let user = decode(url.username());
    let password = url.password().map(decode).unwrap_or_default();
    // Setting an empty user and no password on an http(s) URL cannot fail.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    Ok((url, Some((user, password))))
}

/// Blanks out the user info of every URL in `text` (HTTP client errors quote
/// the URL they were sending to) and every known secret.
fn scrub(text: &str, secrets: &[String]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || "()\"'<>".contains(c))
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => out.push_str(&authority[at + 1..]),
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    for secret in secrets.iter().filter(|s| s.len() >= 3) {
        out = out.replace(secret.as_str(), "<redacted>");
    }
    out
}

/// What to do when `text` says the cluster's certificate was refused.
fn certificate_hint(text: &str) -> Option<&'static str> {
    let lower = text.to_ascii_lowercase();
    if !lower.contains("certificate") {
        return None;
    }
    Some(
        if lower.contains("not valid for name") || lower.contains("notvalidforname") {
            "the cluster's certificate is not valid for the host in sink.url: use a name the certificate lists"
        } else {
            "the cluster's certificate was not accepted: set sink.ca_cert to the CA that signed it"
        },
    )
}

/// Adds SigV4 signing with credentials from the standard AWS chain.
#[cfg(feature = "aws")]
fn aws_signing(
    builder: TransportBuilder,
    aws: &ferry_config::AwsConfig,
) -> Result<TransportBuilder, SinkError> {
    let region = aws
        .region
        .clone()
        .or_else(|| std::env::var("AWS_REGION").ok().filter(|r| !r.is_empty()))
        .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok().filter(|r| !r.is_empty()))
        .ok_or_else(|| {
            SinkError::Conflict(
                "sink.aws.region is not set and neither is AWS_REGION; name the domain's region, e.g. \"eu-west-1\"".into(),
            )
        })?;
    let region = aws_types::region::Region::new(region);
    let provider = aws_credential_types::provider::SharedCredentialsProvider::new(
        aws_chain::CachedChain::new(region.clone()),
    );
    Ok(builder
        .auth(opensearch::auth::Credentials::AwsSigV4(provider, region))
        .service_name(aws.service.as_str()))
}

/// Without the `aws` feature, a configured `[sink.aws]` is an error that says how to get it.
#[cfg(not(feature = "aws"))]
fn aws_signing(
    _builder: TransportBuilder,
    _aws: &ferry_config::AwsConfig,
) -> Result<TransportBuilder, SinkError> {
    Err(SinkError::Conflict(
        "sink.aws: this ferry was built without AWS SigV4 support; build it with `cargo build --release -p ferry --features ferry-opensearch/aws`".into(),
    ))
}

/// Credentials for SigV4 from the AWS SDK's default chain (environment,
/// shared profile, web identity / IRSA, ECS and EC2 instance roles), created
/// on first use and cached until five minutes before they expire: the client
/// asks for credentials on every request.
#[cfg(feature = "aws")]
mod aws_chain {
    use std::time::{Duration, SystemTime};

    use aws_config::default_provider::credentials::DefaultCredentialsChain;
    use aws_credential_types::provider::{future, ProvideCredentials};
    use aws_credential_types::Credentials;

    /// Refresh this long before the credentials expire.
    const REFRESH_MARGIN: Duration = Duration::from_secs(300);

    #[derive(Debug)]
    pub(crate) struct CachedChain {
        region: aws_types::region::Region,
        chain: tokio::sync::OnceCell<DefaultCredentialsChain>,
        cached: tokio::sync::Mutex<Option<Credentials>>,
    }

    impl CachedChain {
        pub(crate) fn new(region: aws_types::region::Region) -> Self {
            CachedChain {
                region,
                chain: tokio::sync::OnceCell::new(),
                cached: tokio::sync::Mutex::new(None),
            }
        }
    }

    impl ProvideCredentials for CachedChain {
        fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            future::ProvideCredentials::new(async move {
                let mut cached = self.cached.lock().await;
                if let Some(c) = cached.as_ref() {
                    let fresh = c
                        .expiry()
                        .is_none_or(|t| t > SystemTime::now() + REFRESH_MARGIN);
                    if fresh {
                        return Ok(c.clone());
                    }
                }
                let chain = self
                    .chain
                    .get_or_init(|| {
                        DefaultCredentialsChain::builder()
                            .region(self.region.clone())
                            .build()
                    })
                    .await;
                let fresh = chain.provide_credentials().await?;
                *cached = Some(fresh.clone());
                Ok(fresh)
            })
        }
    }
}

#[cfg(test)]
mod security_tests {
    use super::*;
    use base64::Engine as _;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    #[test]
    fn scrub_removes_user_info_and_secrets() {
        let s = scrub(
            "error sending request for url (https://admin:hunter22@search:9200/_bulk): hunter22 again",
            &["hunter22".into()],
        );
        assert_eq!(
            s,
            "error sending request for url (https://search:9200/_bulk): <redacted> again"
        );
        assert_eq!(scrub("no urls here", &[]), "no urls here");
        assert_eq!(scrub("http://u@h", &[]), "http://h");
    }

    #[test]
    fn url_user_info_leaves_the_url() {
        let (url, creds) =
            split_user_info("https://ferry:p%40ss%3Aword@search.example:9200/").expect("url");
        assert_eq!(url.as_str(), "https://search.example:9200/");
        assert_eq!(creds, Some(("ferry".into(), "p@ss:word".into())));
        let sink =
            Sink::new("http://ferry:s3cret@127.0.0.1:9/", Duration::from_secs(1)).expect("sink");
        assert!(!format!("{sink:?} {}", sink.url()).contains("s3cret"));
    }

    fn sink_config(url: &str, extra: &str) -> ferry_config::SinkConfig {
        let text = format!(
            "[source]\nurl = \"postgres://u@h/db\"\nslot = \"s\"\npublication = \"p\"\n[sink]\nurl = \"{url}\"\nrequest_timeout_secs = 5\n{extra}\n[[index]]\nname = \"i\"\ntable = \"t\"\n"
        );
        ferry_config::Config::from_toml(&text).expect("config").sink
    }

    struct Certs {
        dir: tempfile::TempDir,
    }

    impl Certs {
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
    }

    fn openssl(dir: &Path, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("the openssl command is needed to make test certificates");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A CA and a certificate for 127.0.0.1 / localhost signed by it.
    fn make_certs() -> Certs {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-days",
            "2",
            "-subj",
            "/CN=ferry test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        openssl(d, &ca);
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        openssl(d, &csr);
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("ext");
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "server.ext",
                "-out",
                "server.crt",
            ],
        );
        Certs { dir }
    }

    /// A one-trick HTTP server answering every request like `GET /` of a
    /// cluster and recording each request's Authorization header.
    struct FakeCluster {
        port: u16,
        seen: Arc<Mutex<Vec<Option<String>>>>,
    }

    impl FakeCluster {
        async fn start(tls: Option<&Certs>) -> FakeCluster {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let port = listener.local_addr().expect("addr").port();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let acceptor = tls.map(|c| {
                use rustls::pki_types::pem::PemObject;
                use rustls::pki_types::{CertificateDer, PrivateKeyDer};
                let chain = CertificateDer::pem_file_iter(c.path("server.crt"))
                    .expect("crt")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("crt");
                let key = PrivateKeyDer::from_pem_file(c.path("server.key")).expect("key");
                let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .expect("server config");
                tokio_rustls::TlsAcceptor::from(Arc::new(config))
            });
            let record = seen.clone();
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let record = record.clone();
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        match acceptor {
                            Some(a) => {
                                if let Ok(stream) = a.accept(tcp).await {
                                    answer(stream, record).await;
                                }
                            }
                            None => answer(tcp, record).await,
                        }
                    });
                }
            });
            FakeCluster { port, seen }
        }

        fn auth_headers(&self) -> Vec<Option<String>> {
            self.seen.lock().expect("lock").clone()
        }
    }

    async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
        mut s: S,
        seen: Arc<Mutex<Vec<Option<String>>>>,
    ) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let head = String::from_utf8_lossy(&buf).into_owned();
        let auth = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("authorization")
                .then(|| v.trim().to_string())
        });
        seen.lock().expect("lock").push(auth);
        let body = r#"{"version":{"distribution":"opensearch","number":"2.99.0"}}"#;
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(reply.as_bytes()).await;
        let _ = s.shutdown().await;
    }

    fn basic(user: &str, password: &str) -> Option<String> {
        Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        ))
    }

    #[tokio::test]
    async fn custom_ca_is_trusted_and_basic_auth_comes_from_the_password_file() {
        let certs = make_certs();
        let cluster = FakeCluster::start(Some(&certs)).await;
        let pw = certs.path("os-password");
        std::fs::write(&pw, "os-secret-1\n").expect("write");
        let cfg = sink_config(
            &format!("https://localhost:{}", cluster.port),
            &format!(
                "username = \"ferry\"\npassword_file = \"{}\"\nca_cert = \"{}\"",
                pw.display(),
                certs.path("ca.pem").display()
            ),
        );
        let sink = Sink::from_config(&cfg).expect("sink");
        assert_eq!(sink.version().await.expect("version"), "opensearch 2.99.0");
        assert_eq!(cluster.auth_headers(), vec![basic("ferry", "os-secret-1")]);
    }

    #[tokio::test]
    async fn certificates_are_verified_by_default() {
        let certs = make_certs();
        let cluster = FakeCluster::start(Some(&certs)).await;
        let cfg = sink_config(&format!("https://127.0.0.1:{}", cluster.port), "");
        let sink = Sink::from_config(&cfg).expect("sink");
        let e = sink.version().await.expect_err("unknown CA").to_string();
        assert!(e.contains("sink.ca_cert"), "{e}");
        assert!(cluster.auth_headers().is_empty(), "no request got through");

        let cfg = sink_config(
            &format!("https://127.0.0.1:{}", cluster.port),
            "tls_verify = false",
        );
        let sink = Sink::from_config(&cfg).expect("sink");
        sink.version()
            .await
            .expect("tls_verify = false accepts the certificate");
    }

    #[tokio::test]
    async fn credentials_in_the_url_are_sent_but_never_shown() {
        let cluster = FakeCluster::start(None).await;
        let sink = Sink::new(
            &format!("http://ferry:s3cr%40t-pw@127.0.0.1:{}/", cluster.port),
            Duration::from_secs(5),
        )
        .expect("sink");
        sink.version().await.expect("version");
        assert_eq!(cluster.auth_headers(), vec![basic("ferry", "s3cr@t-pw")]);

        // A closed port: the error names the cluster but not the password.
        let closed = Sink::new(
            "http://ferry:s3cr%40t-pw@127.0.0.1:9/",
            Duration::from_secs(2),
        )
        .expect("sink");
        let e = closed.version().await.expect_err("closed port");
        let text = format!("{e} {e:?}");
        assert!(text.contains("127.0.0.1:9"), "{text}");
        assert!(!text.contains("s3cr"), "the password leaked: {text}");
    }

    #[test]
    fn password_sources_are_resolved_with_their_keys() {
        let cfg = sink_config(
            "http://127.0.0.1:9",
            "username = \"ferry\"\npassword_env = \"FERRY_TEST_UNSET_SINK_PASSWORD\"",
        );
        let e = Sink::from_config(&cfg).expect_err("unset").to_string();
        assert!(
            e.contains("sink.password_env") && e.contains("FERRY_TEST_UNSET_SINK_PASSWORD"),
            "{e}"
        );
        let cfg = sink_config(
            "http://127.0.0.1:9",
            "username = \"ferry\"\npassword_file = \"/nonexistent/ferry-pw\"",
        );
        let e = Sink::from_config(&cfg)
            .expect_err("missing file")
            .to_string();
        assert!(
            e.contains("sink.password_file") && e.contains("/nonexistent/ferry-pw"),
            "{e}"
        );
        let cfg = sink_config("https://127.0.0.1:9", "ca_cert = \"/nonexistent/ca.pem\"");
        let e = Sink::from_config(&cfg).expect_err("missing CA").to_string();
        assert!(e.contains("sink.ca_cert"), "{e}");
    }

    #[cfg(not(feature = "aws"))]
    #[test]
    fn aws_without_the_feature_says_how_to_get_it() {
        let cfg = sink_config("https://127.0.0.1:9", "aws = { region = \"eu-west-1\" }");
        let e = Sink::from_config(&cfg).expect_err("no aws").to_string();
        assert!(e.contains("sink.aws") && e.contains("--features"), "{e}");
    }

    #[cfg(feature = "aws")]
    #[tokio::test]
    async fn aws_requests_are_signed_with_credentials_from_the_environment() {
        // The only test that sets AWS_ variables.
        std::env::set_var("AWS_ACCESS_KEY_ID", "AKIDFERRYTEST");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "ferry-test-secret-key");
        let cluster = FakeCluster::start(None).await;
        let cfg = sink_config(
            &format!("http://127.0.0.1:{}", cluster.port),
            "aws = { region = \"eu-west-1\", service = \"aoss\" }",
        );
        let sink = Sink::from_config(&cfg).expect("sink");
        sink.version().await.expect("version");
        sink.version()
            .await
            .expect("version again (cached credentials)");
        let seen = cluster.auth_headers();
        assert_eq!(seen.len(), 2);
        for auth in seen {
            let auth = auth.expect("signed");
            assert!(
                auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDFERRYTEST/")
                    && auth.contains("/eu-west-1/aoss/aws4_request"),
                "{auth}"
            );
        }
    }
}
