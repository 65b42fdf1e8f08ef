//! ferry's configuration: one TOML file, every key overridable from the
//! environment (`FERRY_SOURCE__URL`, `FERRY_SINK__URL`, …), parsed strictly
//! (unknown keys are errors) and then validated as a whole so that one run
//! reports every problem with the key that has it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The PostgreSQL database changes come from.
    pub source: SourceConfig,
    /// Where documents go: one `[sink]`, or several named ones
    /// (`[sink.primary]`, `[sink.eu]`) fed by the one replication stream.
    #[serde(rename = "sink")]
    #[schemars(with = "SinksSchema")]
    pub sinks: Sinks,
    /// Batching and queueing knobs.
    #[serde(default)]
    pub engine: EngineConfig,
    /// The search indexes ferry keeps in sync.
    #[serde(default, rename = "index")]
    pub indexes: Vec<IndexConfig>,
    /// The admin HTTP endpoint (health, readiness, metrics, status).
    #[serde(default)]
    pub admin: AdminConfig,
    /// OpenTelemetry trace export (off unless `otlp_endpoint` is set).
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// `[telemetry]`: OpenTelemetry traces of the pipeline, sent over OTLP/HTTP.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Base URL of an OTLP/HTTP collector, e.g. `http://127.0.0.1:4318`;
    /// spans go to its `/v1/traces`. Unset (the default): no traces.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` the spans carry (default `ferry`).
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "ferry".into(),
        }
    }
}

impl TelemetryConfig {
    /// The URL spans are posted to: `otlp_endpoint` with `/v1/traces`
    /// appended unless it already ends so; `None` when tracing is off.
    pub fn traces_url(&self) -> Option<String> {
        let base = self.otlp_endpoint.as_deref()?.trim_end_matches('/');
        Some(if base.ends_with("/v1/traces") {
            base.to_string()
        } else {
            format!("{base}/v1/traces")
        })
    }
}

/// `[admin]`: where the admin HTTP endpoint listens, when its health
/// checks fail, and the token that turns its control API on.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Socket address, e.g. `127.0.0.1:9187` (the default); port 0 picks a free port.
    pub listen: String,
    /// `/readyz` fails once bulk writes have failed (and been retried) for
    /// this many seconds in a row (default 30).
    #[schemars(range(min = 1))]
    pub flush_failure_secs: u64,
    /// `/healthz` fails, and the systemd watchdog stops being fed, once work
    /// has been pending this many seconds without progress (default 300).
    #[schemars(range(min = 1))]
    pub stall_timeout_secs: u64,
    /// File holding the bearer token of the control API (`/control/…`);
    /// the API is off unless this or `token_env` is set.
    pub token_file: Option<std::path::PathBuf>,
    /// Environment variable holding the bearer token of the control API.
    pub token_env: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9187".into(),
            flush_failure_secs: 30,
            stall_timeout_secs: 300,
            token_file: None,
            token_env: None,
        }
    }
}

impl AdminConfig {
    /// `flush_failure_secs` as a duration.
    pub fn flush_failure(&self) -> Duration {
        Duration::from_secs(self.flush_failure_secs)
    }

    /// `stall_timeout_secs` as a duration.
    pub fn stall_timeout(&self) -> Duration {
        Duration::from_secs(self.stall_timeout_secs)
    }

    /// The control API's bearer token, read from `token_file` or
    /// `token_env`; `None` when neither is set (the API is off). The error
    /// names the key and never holds the secret.
    pub fn token(&self) -> Result<Option<String>, String> {
        if let Some(path) = &self.token_file {
            return read_secret_file(path)
                .map(Some)
                .map_err(|e| format!("admin.token_file {}: {e}", path.display()));
        }
        if let Some(name) = &self.token_env {
            return read_secret_env(name)
                .map(Some)
                .map_err(|e| format!("admin.token_env: {e}"));
        }
        Ok(None)
    }
}

/// `[source]`: the PostgreSQL side.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// libpq-style URL, e.g. `postgres://ferry@127.0.0.1:5432/app`.
    pub url: String,
    /// Logical replication slot; created if missing.
    pub slot: String,
    /// Publication; created (or extended) to cover every table the indexes read.
    pub publication: String,
    /// Whether ferry may create or extend the publication (default true).
    #[serde(default = "yes")]
    pub manage_publication: bool,
    /// Whether ferry may set REPLICA IDENTITY FULL on tables whose old rows
    /// it needs (related tables); when false, the SQL is printed instead.
    #[serde(default = "yes")]
    pub manage_replica_identity: bool,
    /// Seconds of silence after which ferry writes a logical-message
    /// heartbeat so the slot advances on a database busy elsewhere (0 = off).
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u64,
    /// What ferry does when its replication slot is dropped or invalidated
    /// (`max_slot_wal_keep_size`): changes were missed, so every index needs
    /// a new copy.
    #[serde(default)]
    pub on_slot_lost: SlotLostPolicy,
    /// TLS towards PostgreSQL, as libpq's `sslmode`. When unset, the URL's
    /// `?sslmode=` decides, then the `PGSSLMODE` variable, then `prefer`.
    #[serde(default)]
    pub sslmode: Option<SslMode>,
    /// PEM file with the CA certificate(s) that signed the server's
    /// certificate, for `verify-ca` and `verify-full` (default: the Mozilla
    /// roots). The URL's `?sslrootcert=` works too.
    #[serde(default)]
    pub ssl_root_cert: Option<std::path::PathBuf>,
    /// File holding the password (a trailing newline is ignored), e.g. a
    /// mounted secret. Read at start-up; excludes a password in `url`.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    /// Name of the environment variable holding the password (read at
    /// start-up); excludes a password in `url` and `password_file`.
    #[serde(default)]
    pub password_env: Option<String>,
}

/// What happens when the replication slot is lost (dropped, or invalidated
/// because PostgreSQL removed WAL it still needed).
///
/// Either way searches never see an empty or partial index: the index the
/// alias serves stays untouched until a complete replacement exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
#[schemars(rename_all = "lowercase")]
pub enum SlotLostPolicy {
    /// Recreate the slot and build every index anew beside the one the alias
    /// serves (which keeps answering and receiving changes), then move the
    /// alias when the new copy is complete.
    #[default]
    Reseed,
    /// Stop with an operator error naming the slot; the indexes stay as they are.
    Stop,
}

impl SlotLostPolicy {
    /// The spelling in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotLostPolicy::Reseed => "reseed",
            SlotLostPolicy::Stop => "stop",
        }
    }
}

impl<'de> Deserialize<'de> for SlotLostPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "reseed" => Ok(SlotLostPolicy::Reseed),
            "stop" => Ok(SlotLostPolicy::Stop),
            other => Err(serde::de::Error::custom(format!(
                "{other:?} is not a choice: use \"reseed\" (rebuild every index beside the live one) or \"stop\""
            ))),
        }
    }
}

/// How ferry protects its PostgreSQL connections, the values of libpq's `sslmode`.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, plain otherwise; the certificate is not checked.
    Prefer,
    /// TLS or no connection; the certificate is not checked (no protection
    /// against an active man in the middle).
    Require,
    /// TLS with a certificate signed by a trusted CA; any host name.
    VerifyCa,
    /// TLS with a certificate signed by a trusted CA and valid for the host.
    VerifyFull,
}

impl SslMode {
    /// Parses libpq's spelling (`verify-full`, …); `allow` counts as `prefer`.
    pub fn parse(text: &str) -> Option<SslMode> {
        Some(match text {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// libpq's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// True for the modes that check the server's certificate.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl SourceConfig {
    /// The heartbeat interval, `None` when turned off.
    pub fn heartbeat(&self) -> Option<Duration> {
        (self.heartbeat_secs > 0).then(|| Duration::from_secs(self.heartbeat_secs))
    }
}

/// Where documents go: the one `[sink]`, or the named `[sink.NAME]` tables.
/// The parsed form keeps the sinks in name order; an unnamed `[sink]` is
/// one sink named `default` that metrics do not label.
#[derive(Debug, Clone, PartialEq)]
pub struct Sinks {
    /// Whether the file names its sinks (`[sink.NAME]`).
    pub named: bool,
    /// The sinks, ordered by name.
    pub list: Vec<NamedSink>,
}

/// One sink and its name.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedSink {
    /// `NAME` of `[sink.NAME]` (`default` for an unnamed `[sink]`).
    pub name: String,
    /// Its keys.
    pub config: SinkConfig,
}

/// The name an unnamed `[sink]` goes by.
pub const DEFAULT_SINK: &str = "default";

/// The keys of one sink: a `[sink]` table holding any of them is one
/// unnamed sink, not a table of named ones.
const SINK_KEYS: &[&str] = &[
    "url",
    "rotate_bytes",
    "dead_letter_index",
    "request_timeout_secs",
    "username",
    "password_file",
    "password_env",
    "ca_cert",
    "tls_verify",
    "api_key_file",
    "api_key_env",
    "client_cert",
    "client_key",
    "aws",
];

/// The JSON schema's view of `[sink]`: one sink, or named sinks.
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum SinksSchema {
    One(Box<SinkConfig>),
    Named(BTreeMap<String, SinkConfig>),
}

impl<'de> Deserialize<'de> for Sinks {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Sinks, D::Error> {
        use serde::de::Error;
        let raw = BTreeMap::<String, config::Value>::deserialize(d)?;
        // An unnamed sink has a scalar `url`; named sinks are all tables
        // (so a sink may be called `aws`).
        let table = |v: &config::Value| matches!(v.kind, config::ValueKind::Table(_));
        let one = raw.is_empty() || raw.values().any(|v| !table(v));
        if one {
            let named: Vec<&String> = raw
                .iter()
                .filter(|(k, v)| table(v) && !SINK_KEYS.contains(&k.as_str()))
                .map(|(k, _)| k)
                .collect();
            if let Some(first) = named.first() {
                return Err(D::Error::custom(format!(
                    "sink: an unnamed [sink] (its url, or FERRY_SINK__URL) is mixed with the named sink [sink.{first}]: \
                     name every sink ([sink.NAME] with its own url) or keep the one [sink]"
                )));
            }
            let table =
                config::Value::new(None, config::ValueKind::Table(raw.into_iter().collect()));
            let config = table
                .try_deserialize::<SinkConfig>()
                .map_err(|e| D::Error::custom(format!("sink: {e}")))?;
            return Ok(Sinks {
                named: false,
                list: vec![NamedSink {
                    name: DEFAULT_SINK.into(),
                    config,
                }],
            });
        }
        let mut list = Vec::with_capacity(raw.len());
        for (name, v) in raw {
            let config = v
                .try_deserialize::<SinkConfig>()
                .map_err(|e| D::Error::custom(format!("sink.{name}: {e}")))?;
            list.push(NamedSink { name, config });
        }
        Ok(Sinks { named: true, list })
    }
}

impl Sinks {
    /// The sink called `name`.
    pub fn find(&self, name: &str) -> Option<&NamedSink> {
        self.list.iter().find(|s| s.name == name)
    }

    /// Every sink's name, in order.
    pub fn names(&self) -> Vec<String> {
        self.list.iter().map(|s| s.name.clone()).collect()
    }

    /// The key prefix of `sink`'s keys: `sink`, or `sink.NAME` when named.
    pub fn key(&self, sink: &NamedSink) -> String {
        if self.named {
            format!("sink.{}", sink.name)
        } else {
            "sink".into()
        }
    }

    /// The label a sink's metrics carry: its name when sinks are named.
    pub fn label(&self, pos: usize) -> Option<String> {
        self.named.then(|| self.list[pos].name.clone())
    }

    /// Everything wrong with the sinks, each under its own key.
    fn problems(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let mut urls = std::collections::HashMap::new();
        for s in &self.list {
            let prefix = self.key(s);
            if self.named && !sink_name_ok(&s.name) {
                p.push(Problem {
                    key: prefix.clone(),
                    message: format!(
                        "{:?} is not a usable sink name: use lowercase letters, digits, '_' and '-' (it labels metrics and is passed as --sink)",
                        s.name
                    ),
                });
            }
            for mut problem in sink_problems(&s.config) {
                if self.named {
                    problem.key = problem.key.replacen("sink", &prefix, 1);
                    problem.message = rename_sink_keys(&problem.message, &prefix);
                }
                p.push(problem);
            }
            if let Some(other) = urls.insert(same_place(&s.config.url), s.name.clone()) {
                p.push(Problem {
                    key: format!("{prefix}.url"),
                    message: format!(
                        "is also the url of sink.{other}: two sinks on one cluster or log would write the same indexes; remove one"
                    ),
                });
            }
        }
        p
    }
}

/// `sink.KEY` mentions in `message` as `PREFIX.KEY`, leaving text such as
/// a quoted URL's `//sink.example` alone.
fn rename_sink_keys(message: &str, prefix: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("sink.") {
        let before = rest[..at].chars().next_back();
        out.push_str(&rest[..at]);
        if before.is_none_or(|c| !(c.is_ascii_alphanumeric() || "/._-@:".contains(c))) {
            out.push_str(prefix);
            out.push('.');
        } else {
            out.push_str("sink.");
        }
        rest = &rest[at + "sink.".len()..];
    }
    out.push_str(rest);
    out
}

/// What two sink URLs must not share: scheme, host (any case), port (the
/// default one filled in) and path; the raw text for anything else.
fn same_place(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => format!(
            "{}://{}:{}{}",
            u.scheme(),
            u.host_str().unwrap_or_default().to_ascii_lowercase(),
            u.port_or_known_default().unwrap_or(0),
            u.path().trim_end_matches('/')
        ),
        _ => url.trim_end_matches('/').to_string(),
    }
}

fn sink_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// `[sink]`: the search cluster, or a file or stdout log of bulk requests.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Base URL, e.g. `http://127.0.0.1:9200`; or `file:///path/to/log.ndjson`
    /// (bulk requests appended and fsynced before the ack) or `stdout:`.
    pub url: String,
    /// A `file://` log is rotated when the next request would take it past
    /// this many bytes (default 256 MiB): the full file becomes
    /// `<file>.<n>`, numbered upwards, and a new one starts.
    #[serde(default)]
    #[schemars(range(min = 4096))]
    pub rotate_bytes: Option<u64>,
    /// Index where rejected documents are recorded (default `ferry-dead-letters`).
    #[serde(default = "default_dead_letter_index")]
    pub dead_letter_index: String,
    /// Timeout of one bulk request in seconds (default 60).
    #[serde(default = "default_request_timeout")]
    #[schemars(range(min = 1))]
    pub request_timeout_secs: u64,
    /// HTTP basic-auth user (a user in `url` works too, but not both).
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the basic-auth password (a trailing newline is ignored).
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    /// Name of the environment variable holding the basic-auth password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// PEM file with extra CA certificate(s) to trust for `https://` (added
    /// to the system's roots).
    #[serde(default)]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Whether the cluster's certificate is checked (default true). `false`
    /// accepts any certificate and is logged as a warning at every start.
    #[serde(default = "yes")]
    pub tls_verify: bool,
    /// File holding an API key as the cluster issues it (the base64
    /// `encoded` value of `POST /_security/api_key`), sent as
    /// `Authorization: ApiKey <value>`.
    #[serde(default)]
    pub api_key_file: Option<std::path::PathBuf>,
    /// Name of the environment variable holding the API key (see `api_key_file`).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// PEM file with the client certificate (chain) ferry presents to the
    /// cluster (mutual TLS); needs `client_key`.
    #[serde(default)]
    pub client_cert: Option<std::path::PathBuf>,
    /// PEM file with the private key of `client_cert` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub client_key: Option<std::path::PathBuf>,
    /// AWS SigV4 request signing for Amazon OpenSearch Service / Serverless;
    /// credentials come from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` /
    /// `AWS_SESSION_TOKEN` (or the SDK's whole chain with the `aws` feature).
    #[serde(default)]
    pub aws: Option<AwsConfig>,
}

/// `[sink.aws]`: SigV4 signing for Amazon OpenSearch Service.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// AWS region, e.g. `eu-west-1` (default: `AWS_REGION`, then `AWS_DEFAULT_REGION`).
    #[serde(default)]
    pub region: Option<String>,
    /// `es` for OpenSearch Service domains (the default), `aoss` for Serverless collections.
    #[serde(default)]
    pub service: AwsService,
}

/// Which AWS service signs the requests.
#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AwsService {
    /// Amazon OpenSearch Service (managed domains).
    #[default]
    Es,
    /// Amazon OpenSearch Serverless.
    Aoss,
}

impl AwsService {
    /// The SigV4 service name.
    pub fn as_str(self) -> &'static str {
        match self {
            AwsService::Es => "es",
            AwsService::Aoss => "aoss",
        }
    }
}

/// Upper bound of `engine.backfill_parallelism` and `engine.max_in_flight_bulks`.
pub const MAX_CONCURRENCY: usize = 32;

/// `[engine]`: how changes are batched between the stream and the sink.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Most changes in one batch (one bulk request per batch).
    #[schemars(range(min = 1))]
    pub max_batch_changes: usize,
    /// Most bytes of documents in one bulk request.
    #[schemars(range(min = 1))]
    pub max_batch_bytes: usize,
    /// Longest a change waits for its batch to fill, in milliseconds.
    pub max_batch_delay_ms: u64,
    /// Capacity of the queue between capture and worker, in changes.
    #[schemars(range(min = 1))]
    pub queue_capacity: usize,
    /// Rows per bulk request during backfill.
    #[schemars(range(min = 1))]
    pub backfill_batch_rows: usize,
    /// Rows per key-ordered backfill chunk: each chunk is read in its own
    /// short snapshot transaction; a checkpoint follows the chunks done in key order.
    #[schemars(range(min = 1))]
    pub backfill_chunk_rows: usize,
    /// Chunks copied at once, across tables and indexes; each holds one
    /// PostgreSQL connection while seeding runs.
    #[schemars(range(min = 1))]
    pub backfill_parallelism: usize,
    /// Bulk requests of the streaming worker in flight at once; the slot
    /// still confirms only transactions whose writes are all durable.
    #[schemars(range(min = 1))]
    pub max_in_flight_bulks: usize,
    /// Longest a stop (SIGTERM) waits for the in-flight batch, in seconds.
    pub shutdown_timeout_secs: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_changes: 5_000,
            max_batch_bytes: 8 * 1024 * 1024,
            max_batch_delay_ms: 20,
            queue_capacity: 20_000,
            backfill_batch_rows: 5_000,
            backfill_chunk_rows: 20_000,
            backfill_parallelism: 2,
            max_in_flight_bulks: 2,
            shutdown_timeout_secs: 30,
        }
    }
}

impl EngineConfig {
    /// `shutdown_timeout_secs` as a duration.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }

    /// `max_batch_delay_ms` as a duration.
    pub fn max_batch_delay(&self) -> Duration {
        Duration::from_millis(self.max_batch_delay_ms)
    }
}

/// `[[index]]`: one search index fed by one root table.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IndexConfig {
    /// What users query: an alias over the concrete index ferry manages.
    pub name: String,
    /// Root table, optionally schema-qualified (`public.users`); one document per row.
    pub table: String,
    /// Columns to include; default every column.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Row filter, an SQL boolean expression over the root table's columns
    /// (e.g. `"status <> 'draft'"`); rows failing it are not in the index.
    #[serde(default, rename = "where")]
    pub filter: Option<String>,
    /// Soft-delete column: rows where it is true (boolean) or set (any other
    /// type) leave the index.
    #[serde(default)]
    pub soft_delete: Option<String>,
    /// Column → field renames (`rename = { email = "mail" }`).
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Field → OpenSearch mapping overrides
    /// (`mapping = { email = { type = "keyword" } }`).
    #[serde(default)]
    pub mapping: BTreeMap<String, serde_json::Value>,
    /// One-to-many relations folded in as arrays.
    #[serde(default)]
    pub has_many: Vec<RelationConfig>,
    /// Many-to-one relations folded in as an object (or null).
    #[serde(default)]
    pub belongs_to: Vec<RelationConfig>,
    /// Counts of related rows, as integers.
    #[serde(default)]
    pub count: Vec<CountConfig>,
    /// Fields computed by SQL expressions over the root table's columns.
    #[serde(default)]
    pub computed: Vec<ComputedConfig>,
    /// What to do with a document the cluster rejects for good.
    #[serde(default)]
    pub on_poison: PoisonPolicy,
    /// Index settings used when ferry creates the index
    /// (`settings = { number_of_shards = 1, number_of_replicas = 1 }`, analyzers, …).
    /// Changing them builds a new index in the background and moves the alias.
    #[serde(default)]
    pub settings: BTreeMap<String, serde_json::Value>,
    /// An ingest pipeline every write into the index goes through: ferry
    /// creates the concrete index with `index.default_pipeline` set to it,
    /// so backfill, streaming, repairs and retries all use it. It must
    /// exist in the cluster; changing it rebuilds the index in the background.
    #[serde(default)]
    pub pipeline: Option<String>,
    /// A column of the root table whose value becomes each document's
    /// `_routing` (e.g. `routing = "tenant_id"`), so one tenant's documents
    /// share a shard. When a row's value changes, the copy under the old
    /// routing is deleted; the column must be in the primary key or the
    /// table must log whole old rows (REPLICA IDENTITY FULL, which ferry
    /// sets under `source.manage_replica_identity`). A NULL value routes
    /// by id.
    #[serde(default)]
    pub routing: Option<String>,
    /// The named sinks (`[sink.NAME]`) this index goes to, e.g.
    /// `sinks = ["primary"]`; default: every sink.
    #[serde(default)]
    pub sinks: Option<Vec<String>>,
}

/// What happens to a document the cluster rejects for good (a 4xx other
/// than a version conflict: mapping conflict, strict mapping, too large).
///
/// The default, `dead_letter`, keeps every other document flowing and
/// records the rejected one durably, where `ferry dead-letters` lists and
/// retries it: one bad row never stops the whole pipeline, and nothing is
/// silently lost.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum PoisonPolicy {
    /// Stop ferry with the document id and the reason.
    Stop,
    /// Log it, count it, go on.
    Skip,
    /// Store it in the dead-letter index, count it, go on.
    #[default]
    DeadLetter,
}

/// A related table folded into the document (`[[index.has_many]]`,
/// `[[index.belongs_to]]`, nestable to any depth).
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RelationConfig {
    /// Document field holding the relation.
    pub field: String,
    /// Related table, optionally schema-qualified.
    pub table: String,
    /// has_many: the column of the related table pointing at the parent;
    /// belongs_to: the column of the parent pointing at the related table;
    /// with `through`: the join-table column pointing at the parent.
    pub foreign_key: String,
    /// The column the foreign key points at (default: the primary key of the
    /// parent for has_many, of the related table for belongs_to).
    #[serde(default)]
    pub references: Option<String>,
    /// Many-to-many: the join table between parent and related table.
    #[serde(default)]
    pub through: Option<ThroughConfig>,
    /// Columns to include; default every column.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// has_many ordering, SQL `column [asc|desc]` list (e.g. `"created_at desc"`).
    #[serde(default)]
    pub order_by: Option<String>,
    /// has_many: keep at most this many related rows.
    #[serde(default)]
    pub limit: Option<u32>,
    /// Row filter over the related table's columns.
    #[serde(default, rename = "where")]
    pub filter: Option<String>,
    /// Soft-delete column of the related table.
    #[serde(default)]
    pub soft_delete: Option<String>,
    /// Column → field renames.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Field → mapping overrides inside this relation.
    #[serde(default)]
    pub mapping: BTreeMap<String, serde_json::Value>,
    /// `nested` (default for has_many) or `object` (default for belongs_to).
    #[serde(default)]
    pub mapping_type: Option<MappingType>,
    /// Relations of the related table.
    #[serde(default)]
    pub has_many: Vec<RelationConfig>,
    /// Relations of the related table.
    #[serde(default)]
    pub belongs_to: Vec<RelationConfig>,
    /// Counts of rows related to the related table.
    #[serde(default)]
    pub count: Vec<CountConfig>,
    /// Fields computed by SQL expressions over the related table's columns.
    #[serde(default)]
    pub computed: Vec<ComputedConfig>,
}

/// `[[index.computed]]` (also in relations): a document field whose value
/// is an SQL expression over the block's own table, e.g.
/// `sql = "first_name || ' ' || last_name"`.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ComputedConfig {
    /// Document field holding the value; not a column name of the table.
    pub field: String,
    /// SQL expression over the table's columns (trusted text, placed in
    /// ferry's queries as written).
    pub sql: String,
    /// Mapping type of the field (e.g. `keyword`); default: derived from
    /// the expression's PostgreSQL type.
    #[serde(default, rename = "type")]
    pub mapping_type: Option<String>,
}

/// The join table of a many-to-many relation.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ThroughConfig {
    /// Join table, optionally schema-qualified.
    pub table: String,
    /// Join-table column pointing at the related table's `references` column.
    pub other_key: String,
}

/// `[[index.count]]`: the number of related rows as an integer field.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CountConfig {
    /// Document field holding the count.
    pub field: String,
    /// Related table.
    pub table: String,
    /// Column of the related table pointing at the parent.
    pub foreign_key: String,
    /// The parent column it points at (default: the parent's primary key).
    #[serde(default)]
    pub references: Option<String>,
    /// Only count rows passing this SQL filter.
    #[serde(default, rename = "where")]
    pub filter: Option<String>,
}

/// How an embedded relation is mapped in OpenSearch.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MappingType {
    /// Each element indexed as its own hidden document: queries match within one element.
    Nested,
    /// Fields flattened into the parent: cheaper, but array elements mix in queries.
    Object,
}

impl IndexConfig {
    /// True when documents need more than the root row's own columns as
    /// they are (relations, a filter, a soft-delete column, renames or
    /// computed fields), so
    /// they are built by querying PostgreSQL rather than from the replicated
    /// row alone.
    pub fn is_relational(&self) -> bool {
        !self.has_many.is_empty()
            || !self.belongs_to.is_empty()
            || !self.count.is_empty()
            || self.filter.is_some()
            || self.soft_delete.is_some()
            || !self.rename.is_empty()
            || !self.computed.is_empty()
    }

    /// The root table split into (schema, table); schema defaults to `public`.
    pub fn schema_and_table(&self) -> (&str, &str) {
        match self.table.split_once('.') {
            Some((s, t)) => (s, t),
            None => ("public", self.table.as_str()),
        }
    }
}

fn yes() -> bool {
    true
}

/// Where `[sink]` writes, read from `sink.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkTarget {
    /// A search cluster at an `http://` or `https://` URL.
    Cluster,
    /// A log of bulk requests appended to this file (`file:///…`).
    File(std::path::PathBuf),
    /// A log of bulk requests written to standard output (`stdout:`).
    Stdout,
}

/// The default of `sink.rotate_bytes`: 256 MiB.
pub const DEFAULT_ROTATE_BYTES: u64 = 256 << 20;

impl SinkConfig {
    /// Where the sink writes. A URL that is none of the three forms reads
    /// as a cluster; [`Config::validate`] refuses it with the fix.
    pub fn target(&self) -> SinkTarget {
        if self.url == "stdout:" {
            return SinkTarget::Stdout;
        }
        match url::Url::parse(&self.url) {
            Ok(u) if u.scheme() == "file" => match u.to_file_path() {
                Ok(path) => SinkTarget::File(path),
                Err(()) => SinkTarget::Cluster,
            },
            _ => SinkTarget::Cluster,
        }
    }

    /// Whether the sink is a file or stdout log rather than a cluster.
    pub fn is_log(&self) -> bool {
        self.target() != SinkTarget::Cluster
    }

    /// `sink.rotate_bytes`, or its default.
    pub fn rotate_bytes(&self) -> u64 {
        self.rotate_bytes.unwrap_or(DEFAULT_ROTATE_BYTES)
    }
}

fn default_dead_letter_index() -> String {
    "ferry-dead-letters".into()
}

fn default_heartbeat() -> u64 {
    30
}

fn default_request_timeout() -> u64 {
    60
}

/// Everything wrong with one sink's keys, under `sink.…` (see
/// [`Sinks::problems`] for named sinks).
fn sink_problems(sink: &SinkConfig) -> Vec<Problem> {
    let mut p = Vec::new();
    let mut bad = |key: &str, message: String| {
        p.push(Problem {
            key: key.to_string(),
            message,
        })
    };
    match url::Url::parse(&sink.url) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
        _ if sink.url == "stdout:" => {}
        Ok(u) if u.scheme() == "file" => {
            let file = sink.target();
            if u.host_str()
                .is_some_and(|h| !h.is_empty() && h != "localhost")
                || u.path().ends_with('/')
                || matches!(&file, SinkTarget::File(p) if p.file_name().is_none())
                || file == SinkTarget::Cluster
            {
                bad(
                    "sink.url",
                    format!(
                        "{:?} does not name a local file: use file:/// and an absolute path \
                         (e.g. file:///var/lib/ferry/users.ndjson)",
                        sink.url
                    ),
                );
            }
        }
        Ok(_) => bad(
            "sink.url",
            "must start with http:// or https:// (e.g. http://127.0.0.1:9200), \
             or be file:///path/to/log.ndjson or stdout:"
                .into(),
        ),
        Err(e) => bad(
            "sink.url",
            format!("is not a URL ({e}); expected e.g. http://127.0.0.1:9200"),
        ),
    }
    if sink.request_timeout_secs == 0 {
        bad("sink.request_timeout_secs", "must be at least 1".into());
    }
    p.extend(sink_secret_problems(sink));
    p.extend(log_sink_problems(sink));
    p
}

/// Keys that mean nothing for the kind of sink `sink.url` names: the
/// cluster's credentials and TLS for a file or stdout log, and rotation for
/// anything but a file.
fn log_sink_problems(sink: &SinkConfig) -> Vec<Problem> {
    let target = sink.target();
    let mut p = Vec::new();
    if target != SinkTarget::Cluster {
        let set = [
            ("sink.username", sink.username.is_some()),
            ("sink.password_file", sink.password_file.is_some()),
            ("sink.password_env", sink.password_env.is_some()),
            ("sink.api_key_file", sink.api_key_file.is_some()),
            ("sink.api_key_env", sink.api_key_env.is_some()),
            ("sink.ca_cert", sink.ca_cert.is_some()),
            ("sink.tls_verify", !sink.tls_verify),
            ("sink.client_cert", sink.client_cert.is_some()),
            ("sink.client_key", sink.client_key.is_some()),
            ("sink.aws", sink.aws.is_some()),
        ];
        for (key, _) in set.iter().filter(|(_, on)| *on) {
            p.push(Problem {
                key: (*key).to_string(),
                message:
                    "is for a search cluster, and sink.url names a file or stdout log: remove it"
                        .into(),
            });
        }
    }
    if let Some(bytes) = sink.rotate_bytes {
        if !matches!(target, SinkTarget::File(_)) {
            p.push(Problem {
                key: "sink.rotate_bytes".into(),
                message: "rotates a file:// log only; remove it or set sink.url to file:///path/to/log.ndjson".into(),
            });
        } else if bytes < 4096 {
            p.push(Problem {
                key: "sink.rotate_bytes".into(),
                message: format!(
                    "{bytes} is too small: use at least 4096 (the default is 268435456, 256 MiB)"
                ),
            });
        }
    }
    p
}

/// Conflicts between the ways of giving credentials and TLS settings. Files
/// and variables are not read here: they are resolved at start-up, where a
/// missing one is reported with its key too.
fn source_secret_problems(src: &SourceConfig) -> Vec<Problem> {
    let mut p = Vec::new();
    let mut bad = |key: &str, message: String| {
        p.push(Problem {
            key: key.to_string(),
            message,
        })
    };
    let src_url_password = url::Url::parse(&src.url)
        .ok()
        .is_some_and(|u| u.password().is_some());
    secret_ref_problems(
        "source",
        src.password_file.as_deref(),
        src.password_env.as_deref(),
        src_url_password,
        &mut bad,
    );
    if let (Some(_), Some(mode)) = (&src.ssl_root_cert, src.sslmode) {
        if !mode.verifies() {
            bad(
                "source.ssl_root_cert",
                format!("is used only with source.sslmode = \"verify-ca\" or \"verify-full\" (it is {mode:?}); set one of those or remove the key", mode = mode.as_str()),
            );
        }
    }
    p
}

/// Conflicts between the ways a sink is given credentials and TLS settings.
fn sink_secret_problems(sink: &SinkConfig) -> Vec<Problem> {
    let mut p = Vec::new();
    let mut bad = |key: &str, message: String| {
        p.push(Problem {
            key: key.to_string(),
            message,
        })
    };
    let parsed = url::Url::parse(&sink.url).ok();
    let url_user = parsed.as_ref().is_some_and(|u| !u.username().is_empty());
    let url_password = parsed.as_ref().is_some_and(|u| u.password().is_some());
    let https = parsed.as_ref().is_some_and(|u| u.scheme() == "https");
    secret_ref_problems(
        "sink",
        sink.password_file.as_deref(),
        sink.password_env.as_deref(),
        url_password,
        &mut bad,
    );
    let has_password = url_password || sink.password_file.is_some() || sink.password_env.is_some();
    if sink.username.is_some() && url_user {
        bad(
            "sink.username",
            "is given twice: here and as the user in sink.url; keep one".into(),
        );
    }
    if let Some(u) = &sink.username {
        if u.is_empty() {
            bad("sink.username", "must not be empty".into());
        } else if !has_password {
            bad(
                "sink.username",
                "has no password: set sink.password_file or sink.password_env".into(),
            );
        }
    }
    if (sink.password_file.is_some() || sink.password_env.is_some())
        && sink.username.is_none()
        && !url_user
    {
        bad(
            "sink.username",
            "is missing: sink.password_file / sink.password_env need a user for basic auth".into(),
        );
    }
    if sink.ca_cert.is_some() {
        if !sink.tls_verify {
            bad(
                "sink.ca_cert",
                "has no effect with sink.tls_verify = false; remove one of them".into(),
            );
        }
        if parsed.is_some() && !https {
            bad(
                "sink.ca_cert",
                "is set but sink.url is not https://; use an https:// URL or remove the key".into(),
            );
        }
    }
    let has_api_key = sink.api_key_file.is_some() || sink.api_key_env.is_some();
    if sink.api_key_file.is_some() && sink.api_key_env.is_some() {
        bad(
            "sink.api_key_file",
            "and sink.api_key_env both give the API key; keep one".into(),
        );
    }
    if sink
        .api_key_file
        .as_ref()
        .is_some_and(|f| f.as_os_str().is_empty())
    {
        bad("sink.api_key_file", "must be a file path".into());
    }
    if let Some(name) = &sink.api_key_env {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            bad(
                "sink.api_key_env",
                format!(
                    "{name:?} is not an environment variable name (e.g. \"OPENSEARCH_API_KEY\")"
                ),
            );
        }
    }
    if has_api_key && (sink.username.is_some() || url_user || has_password) {
        bad(
            "sink.api_key_file",
            "an API key (sink.api_key_file / sink.api_key_env) and basic auth (sink.username / sink.password_file / sink.password_env / a user in sink.url) are mutually exclusive; keep one".into(),
        );
    }
    match (&sink.client_cert, &sink.client_key) {
        (Some(_), None) => bad(
            "sink.client_key",
            "is missing: sink.client_cert needs the PEM file of its private key".into(),
        ),
        (None, Some(_)) => bad(
            "sink.client_cert",
            "is missing: sink.client_key needs the PEM file of its certificate".into(),
        ),
        (Some(_), Some(_)) if parsed.is_some() && !https => bad(
            "sink.client_cert",
            "is set but sink.url is not https://; client certificates need an https:// URL".into(),
        ),
        _ => {}
    }
    if let Some(aws) = &sink.aws {
        if sink.username.is_some() || url_user || has_password {
            bad(
                "sink.aws",
                "SigV4 signing replaces basic auth: remove sink.username, sink.password_file, sink.password_env and any user in sink.url".into(),
            );
        }
        if has_api_key {
            bad(
                "sink.aws",
                "SigV4 signing replaces the API key: remove sink.api_key_file / sink.api_key_env"
                    .into(),
            );
        }
        if sink.client_cert.is_some() {
            bad(
                "sink.aws",
                "SigV4 signing and a client certificate (sink.client_cert) cannot be combined; Amazon OpenSearch Service authenticates by signature".into(),
            );
        }
        if aws.region.as_deref().is_some_and(str::is_empty) {
            bad(
                "sink.aws.region",
                "must not be empty (e.g. \"eu-west-1\"); remove it to use AWS_REGION".into(),
            );
        }
    }
    p
}

/// Reads a secret from a file named by a `password_file` key, dropping one
/// trailing line break (`\n` or `\r\n`) as editors and `echo` leave it. The
/// error says why the file is unusable and never holds its content.
pub fn read_secret_file(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let mut text = String::from_utf8(bytes).map_err(|_| "it is not UTF-8 text".to_string())?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err("it is empty".into());
    }
    Ok(text)
}

/// Reads a secret from the environment variable named by a `password_env`
/// key; the error says whether it is unset or empty.
pub fn read_secret_env(name: &str) -> Result<String, String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Ok(v),
        Ok(_) => Err(format!("the environment variable {name} is empty")),
        Err(std::env::VarError::NotPresent) => {
            Err(format!("the environment variable {name} is not set"))
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(format!("the environment variable {name} is not UTF-8"))
        }
    }
}

/// `password_file` / `password_env` of one section: at most one way to give
/// the password, and each well-formed.
fn secret_ref_problems(
    section: &str,
    file: Option<&Path>,
    env: Option<&str>,
    url_password: bool,
    bad: &mut impl FnMut(&str, String),
) {
    if file.is_some() && env.is_some() {
        bad(
            &format!("{section}.password_file"),
            format!("and {section}.password_env both give the password; keep one"),
        );
    }
    if url_password {
        for (key, set) in [
            ("password_file", file.is_some()),
            ("password_env", env.is_some()),
        ] {
            if set {
                bad(
                    &format!("{section}.{key}"),
                    format!("gives the password that {section}.url also carries; keep one (the URL is easier to leak)"),
                );
            }
        }
    }
    if file.is_some_and(|f| f.as_os_str().is_empty()) {
        bad(
            &format!("{section}.password_file"),
            "must be a file path".into(),
        );
    }
    if let Some(name) = env {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            bad(
                &format!("{section}.password_env"),
                format!("{name:?} is not an environment variable name (e.g. \"PGPASSWORD\")"),
            );
        }
    }
}

/// The JSON Schema of the configuration file, generated from these types
/// (`ferry config schema`; committed as `config/ferry.schema.json` for TOML
/// editors). It describes the keys and their types; the checks across keys
/// (`Config::validate`) still run at load.
pub fn json_schema() -> serde_json::Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(Config)).unwrap_or_default();
    schema["title"] = "ferry configuration".into();
    schema
}

/// [`json_schema`] as committed: pretty JSON ending in a line break.
pub fn json_schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&json_schema()).unwrap_or_default();
    text.push('\n');
    text
}

/// One thing wrong with the configuration, located by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `index[0].table`.
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why a configuration could not be loaded. Never retryable: an operator must fix the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is missing or unreadable.
    #[error("cannot read config file {path}: {reason}")]
    Read {
        /// The path given.
        path: String,
        /// The underlying reason.
        reason: String,
    },
    /// The TOML or an environment override does not fit the schema.
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// Values parsed but are not acceptable.
    #[error("invalid configuration:\n{}", list(.0))]
    Invalid(Vec<Problem>),
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// The positions in `sinks.list` of the sinks `ix` goes to: those its
    /// `sinks` key names, or every sink.
    pub fn sinks_of(&self, ix: &IndexConfig) -> Vec<usize> {
        match &ix.sinks {
            None => (0..self.sinks.list.len()).collect(),
            Some(names) => self
                .sinks
                .list
                .iter()
                .enumerate()
                .filter(|(_, s)| names.contains(&s.name))
                .map(|(i, _)| i)
                .collect(),
        }
    }

    /// The first sink's keys: *the* sink of a configuration with one
    /// (after [`Config::for_sink`], every operator tool's view).
    pub fn sink(&self) -> &SinkConfig {
        &self.sinks.list[0].config
    }

    /// The configuration one sink sees: that sink alone and the indexes
    /// going to it. `name` may be omitted when there is one sink; the error
    /// says which names there are.
    pub fn for_sink(&self, name: Option<&str>) -> Result<Config, String> {
        let pos = match name {
            None if self.sinks.list.len() == 1 => 0,
            None => {
                return Err(format!(
                    "this configuration has several sinks ({}): name one with --sink NAME",
                    self.sinks.names().join(", ")
                ))
            }
            Some(n) if !self.sinks.named => {
                return Err(format!(
                    "--sink {n}: this configuration has one unnamed [sink]; drop --sink"
                ))
            }
            Some(n) => self
                .sinks
                .list
                .iter()
                .position(|s| s.name == n)
                .ok_or_else(|| {
                    format!(
                        "--sink {n}: no such sink; the sinks are {}",
                        self.sinks.names().join(", ")
                    )
                })?,
        };
        let mut one = self.clone();
        one.indexes.retain(|ix| self.sinks_of(ix).contains(&pos));
        one.sinks.list = vec![self.sinks.list[pos].clone()];
        Ok(one)
    }

    /// One entry per (index, sink) pair, index by index, each `sinks` key
    /// naming its one sink (see [`Config::sink_of`]): what the pipeline
    /// runs. With one sink this is the configuration itself.
    pub fn fan_out(&self) -> Config {
        let mut out = self.clone();
        if !self.sinks.named {
            return out;
        }
        out.indexes = self
            .indexes
            .iter()
            .flat_map(|ix| {
                self.sinks_of(ix).into_iter().map(|s| IndexConfig {
                    sinks: Some(vec![self.sinks.list[s].name.clone()]),
                    ..ix.clone()
                })
            })
            .collect();
        out
    }

    /// The position in `sinks.list` of the sink a fanned-out index entry
    /// goes to (its first named sink; the only one after [`Config::fan_out`]).
    pub fn sink_of(&self, ix: &IndexConfig) -> usize {
        self.sinks_of(ix).first().copied().unwrap_or(0)
    }

    /// Loads `path` (TOML) with `FERRY_…` environment overrides, then validates it.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        if !path.is_file() {
            return Err(ConfigError::Read {
                path: path.display().to_string(),
                reason: "no such file".into(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_toml_with_env(&text)
    }

    /// Parses TOML text plus `FERRY_…` environment overrides, then validates.
    pub fn from_toml_with_env(text: &str) -> Result<Config, ConfigError> {
        Self::build(text, true)
    }

    /// Parses TOML text alone (no environment), then validates. For tests and tools.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::build(text, false)
    }

    fn build(text: &str, with_env: bool) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml));
        if with_env {
            // Double underscores separate levels so that keys containing a
            // single underscore (max_batch_changes) survive; values are not
            // type-guessed, so a password "007" stays a string.
            // Only nested keys (SECTION__KEY) are config keys: FERRY_CONFIG and
            // FERRY_LOG_FORMAT belong to the command line.
            let vars: config::Map<String, String> = std::env::vars()
                .filter(|(k, _)| {
                    k.strip_prefix("FERRY_")
                        .is_some_and(|rest| rest.contains("__"))
                })
                .collect();
            builder = builder.add_source(
                config::Environment::with_prefix("FERRY")
                    .prefix_separator("_")
                    .separator("__")
                    .ignore_empty(true)
                    .try_parsing(false)
                    .source(Some(vars)),
            );
        }
        let raw = builder
            .build()
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        let cfg: Config = raw
            .try_deserialize()
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value and returns all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        let mut bad = |key: &str, message: String| {
            p.push(Problem {
                key: key.to_string(),
                message,
            })
        };
        let src = &self.source;
        if !(src.url.starts_with("postgres://") || src.url.starts_with("postgresql://")) {
            bad(
                "source.url",
                "must be a URL like postgres://user@host:5432/database".into(),
            );
        }
        if let Some(m) = pg_name_problem(&src.slot, true) {
            bad("source.slot", m);
        }
        if let Some(m) = pg_name_problem(&src.publication, false) {
            bad("source.publication", m);
        }
        if let Some(endpoint) = &self.telemetry.otlp_endpoint {
            match url::Url::parse(endpoint) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                _ => bad(
                    "telemetry.otlp_endpoint",
                    format!(
                        "{endpoint:?} is not an http:// or https:// URL; expected an OTLP/HTTP \
                         collector such as http://127.0.0.1:4318"
                    ),
                ),
            }
        }
        if self.telemetry.service_name.trim().is_empty() {
            bad("telemetry.service_name", "must not be empty".into());
        }
        let e = &self.engine;
        for (key, v) in [
            ("engine.max_batch_changes", e.max_batch_changes),
            ("engine.max_batch_bytes", e.max_batch_bytes),
            ("engine.queue_capacity", e.queue_capacity),
            ("engine.backfill_batch_rows", e.backfill_batch_rows),
            ("engine.backfill_chunk_rows", e.backfill_chunk_rows),
        ] {
            if v == 0 {
                bad(key, "must be greater than 0".into());
            }
        }
        for (key, v) in [
            ("admin.flush_failure_secs", self.admin.flush_failure_secs),
            ("admin.stall_timeout_secs", self.admin.stall_timeout_secs),
        ] {
            if v == 0 {
                bad(key, "must be at least 1 (seconds)".into());
            }
        }
        for (key, v, what) in [
            (
                "engine.backfill_parallelism",
                e.backfill_parallelism,
                "each is one PostgreSQL connection while seeding",
            ),
            (
                "engine.max_in_flight_bulks",
                e.max_in_flight_bulks,
                "each is one bulk request of up to max_batch_bytes held in memory",
            ),
        ] {
            if !(1..=MAX_CONCURRENCY).contains(&v) {
                bad(
                    key,
                    format!("must be between 1 and {MAX_CONCURRENCY} ({what}); got {v}"),
                );
            }
        }
        if let Err(e) = self.admin.listen.parse::<std::net::SocketAddr>() {
            bad(
                "admin.listen",
                format!(
                    "{:?} is not a socket address ({e}); expected e.g. 127.0.0.1:9187 or [::1]:9187",
                    self.admin.listen
                ),
            );
        }
        if self.admin.token_file.is_some() && self.admin.token_env.is_some() {
            bad(
                "admin.token_file",
                "and admin.token_env both give the control API token; keep one".into(),
            );
        }
        if self
            .admin
            .token_file
            .as_ref()
            .is_some_and(|f| f.as_os_str().is_empty())
        {
            bad("admin.token_file", "must be a file path".into());
        }
        if let Some(name) = &self.admin.token_env {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                bad(
                    "admin.token_env",
                    format!("{name:?} is not an environment variable name (e.g. \"ADMIN_TOKEN\")"),
                );
            }
        }
        if self.indexes.is_empty() {
            bad(
                "index",
                "no [[index]] defined; add at least one with a name and a table".into(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        let mut relation_problems = Vec::new();
        for (i, ix) in self.indexes.iter().enumerate() {
            if let Some(m) = index_name_problem(&ix.name) {
                bad(&format!("index[{i}].name"), m);
            } else if !seen.insert(ix.name.as_str()) {
                bad(
                    &format!("index[{i}].name"),
                    format!(
                        "{:?} is used by another [[index]]; names must be unique",
                        ix.name
                    ),
                );
            }
            let listed = ix.sinks.as_deref().unwrap_or_default();
            for unknown in listed
                .iter()
                .filter(|n| !self.sinks.named || self.sinks.find(n).is_none())
            {
                bad(
                    &format!("index[{i}].sinks"),
                    if self.sinks.named {
                        format!(
                            "names sink {unknown:?}, which is not configured; the sinks are {} ([sink.NAME])",
                            self.sinks.names().join(", ")
                        )
                    } else {
                        "lists named sinks, and [sink] is one unnamed sink: name the sinks \
                         ([sink.primary], [sink.eu]) or remove the key"
                            .into()
                    },
                );
            }
            if listed
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
                != listed.len()
            {
                bad(
                    &format!("index[{i}].sinks"),
                    "names a sink twice; list each once".into(),
                );
            }
            if ix.sinks.as_ref().is_some_and(Vec::is_empty) {
                bad(
                    &format!("index[{i}].sinks"),
                    "lists no sink: name at least one, or remove the key to send the index to every sink".into(),
                );
            }
            if let Some(log) = self
                .sinks_of(ix)
                .into_iter()
                .map(|s| &self.sinks.list[s])
                .find(|s| s.config.is_log())
            {
                if ix.pipeline.is_some() {
                    bad(
                        &format!("index[{i}].pipeline"),
                        format!(
                            "needs a search cluster, which runs ingest pipelines; {}.url names a file or stdout log, which \
                             gets the documents as ferry builds them: remove the key or send the index to a cluster",
                            self.sinks.key(log)
                        ),
                    );
                }
            }
            if ix.pipeline.is_some()
                && ["index.default_pipeline", "default_pipeline"]
                    .iter()
                    .any(|k| ix.settings.contains_key(*k))
            {
                bad(
                    &format!("index[{i}].pipeline"),
                    "is set together with settings.index.default_pipeline, which it sets: keep one of them".into(),
                );
            }
            let (schema, table) = ix.schema_and_table();
            if schema.is_empty() || table.is_empty() || table.contains('.') {
                bad(
                    &format!("index[{i}].table"),
                    format!("{:?} must be `table` or `schema.table`", ix.table),
                );
            }
            if let Some(cols) = &ix.columns {
                if cols.is_empty() {
                    bad(
                        &format!("index[{i}].columns"),
                        "is empty; list at least the primary key, or remove the key for every column".into(),
                    );
                }
                let mut cs = std::collections::HashSet::new();
                for c in cols {
                    if !cs.insert(c.as_str()) {
                        bad(
                            &format!("index[{i}].columns"),
                            format!("column {c:?} is listed twice"),
                        );
                    }
                }
            }
            let mut fields = std::collections::HashSet::new();
            validate_relations(
                &format!("index[{i}]"),
                &ix.has_many,
                &ix.belongs_to,
                &ix.count,
                &ix.computed,
                &mut fields,
                &mut relation_problems,
            );
        }
        p.append(&mut relation_problems);
        p.extend(source_secret_problems(&self.source));
        p.extend(self.sinks.problems());
        for (pos, s) in self.sinks.list.iter().enumerate() {
            if self.sinks.named
                && !self.indexes.is_empty()
                && !self
                    .indexes
                    .iter()
                    .any(|ix| self.sinks_of(ix).contains(&pos))
            {
                p.push(Problem {
                    key: self.sinks.key(s),
                    message: "no [[index]] goes to it (each lists its sinks): add it to an index's sinks or remove it".into(),
                });
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(p))
        }
    }
}

fn validate_relations(
    at: &str,
    has_many: &[RelationConfig],
    belongs_to: &[RelationConfig],
    count: &[CountConfig],
    computed: &[ComputedConfig],
    fields: &mut std::collections::HashSet<String>,
    p: &mut Vec<Problem>,
) {
    let mut bad = |key: String, message: String| p.push(Problem { key, message });
    let mut nested = Vec::new();
    for (kind, list) in [("has_many", has_many), ("belongs_to", belongs_to)] {
        for (j, r) in list.iter().enumerate() {
            let key = format!("{at}.{kind}[{j}]");
            if r.field.is_empty() || !fields.insert(r.field.clone()) {
                bad(
                    format!("{key}.field"),
                    format!("{:?} is empty or used twice at this level", r.field),
                );
            }
            if r.table.is_empty() || r.table.split('.').count() > 2 {
                bad(
                    format!("{key}.table"),
                    format!("{:?} must be `table` or `schema.table`", r.table),
                );
            }
            if r.foreign_key.is_empty() {
                bad(format!("{key}.foreign_key"), "must name a column".into());
            }
            if kind == "belongs_to"
                && (r.through.is_some() || r.order_by.is_some() || r.limit.is_some())
            {
                bad(
                    key.clone(),
                    "through, order_by and limit apply to has_many only".into(),
                );
            }
            if r.limit == Some(0) {
                bad(format!("{key}.limit"), "must be at least 1".into());
            }
            if let Some(o) = &r.order_by {
                if !order_by_ok(o) {
                    bad(
                        format!("{key}.order_by"),
                        format!("{o:?} must be a list of `column [asc|desc]`, e.g. \"created_at desc, id\""),
                    );
                }
            }
            nested.push((key, r));
        }
    }
    for (j, c) in count.iter().enumerate() {
        if c.field.is_empty() || !fields.insert(c.field.clone()) {
            bad(
                format!("{at}.count[{j}].field"),
                format!("{:?} is empty or used twice at this level", c.field),
            );
        }
        if c.table.is_empty() || c.foreign_key.is_empty() {
            bad(
                format!("{at}.count[{j}]"),
                "table and foreign_key are required".into(),
            );
        }
    }
    for (j, c) in computed.iter().enumerate() {
        if c.field.is_empty() || !fields.insert(c.field.clone()) {
            bad(
                format!("{at}.computed[{j}].field"),
                format!("{:?} is empty or used twice at this level", c.field),
            );
        }
        if c.field.starts_with("ferry_") {
            bad(
                format!("{at}.computed[{j}].field"),
                format!(
                    "{:?}: names starting with ferry_ are ferry's own in its queries",
                    c.field
                ),
            );
        }
        if c.sql.trim().is_empty() {
            bad(
                format!("{at}.computed[{j}].sql"),
                "must be an SQL expression over the table's columns, e.g. \"first_name || ' ' || last_name\"".into(),
            );
        }
    }
    for (key, r) in nested {
        let mut inner = std::collections::HashSet::new();
        validate_relations(
            &key,
            &r.has_many,
            &r.belongs_to,
            &r.count,
            &r.computed,
            &mut inner,
            p,
        );
    }
}

/// `col [asc|desc] [nulls first|last], …` with plain identifiers only.
fn order_by_ok(text: &str) -> bool {
    text.split(',').all(|part| {
        let words: Vec<String> = part
            .split_whitespace()
            .map(str::to_ascii_lowercase)
            .collect();
        let ident = |w: &str| {
            !w.is_empty()
                && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !w.starts_with(|c: char| c.is_ascii_digit())
        };
        match words.as_slice() {
            [c] => ident(c),
            [c, d] => ident(c) && (d == "asc" || d == "desc"),
            [c, d, n, f] => {
                ident(c)
                    && (d == "asc" || d == "desc")
                    && n == "nulls"
                    && (f == "first" || f == "last")
            }
            _ => false,
        }
    })
}

fn pg_name_problem(name: &str, slot: bool) -> Option<String> {
    if name.is_empty() || name.len() > 63 {
        return Some("must be 1 to 63 characters".into());
    }
    let ok = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if slot && !ok {
        return Some(format!(
            "{name:?} may contain only lower-case letters, digits and underscores (PostgreSQL's rule for slot names)"
        ));
    }
    if !slot && name.contains('"') {
        return Some(format!("{name:?} must not contain double quotes"));
    }
    None
}

fn index_name_problem(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > 200 {
        return Some("must be 1 to 200 characters".into());
    }
    if name.starts_with(['-', '_', '+', '.']) {
        return Some(format!("{name:?} must not start with -, _, + or ."));
    }
    let ok = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
    if !ok {
        return Some(format!(
            "{name:?} may contain only lower-case letters, digits, '-', '_' and '.' (OpenSearch index names)"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFERENCE: &str = r#"
[source]
url = "postgres://ferry@127.0.0.1:5432/app"
slot = "ferry_app"          # created if missing
publication = "ferry_app"   # created (or extended) to cover every table the indexes read

[sink]
url = "http://127.0.0.1:9200"

[[index]]
name = "users"              # what users query: an alias (or the index itself)
table = "users"             # root table, schema-qualified allowed; document _id = primary key
# columns = ["id", "email"] # optional; default: every column
"#;

    #[test]
    fn reference_config_parses() {
        let c = Config::from_toml(REFERENCE).expect("reference config");
        assert_eq!(c.source.slot, "ferry_app");
        assert_eq!(c.indexes.len(), 1);
        assert_eq!(c.indexes[0].schema_and_table(), ("public", "users"));
        assert_eq!(c.indexes[0].columns, None);
        assert_eq!(c.engine, EngineConfig::default());
    }

    #[test]
    fn relational_reference_config_parses() {
        let text = format!(
            "{}\n{}",
            REFERENCE.split("[[index]]").next().unwrap_or_default(),
            r#"
[[index]]
name = "users"
table = "users"
columns = ["id", "email", "name", "company_id"]

  [[index.has_many]]            # users.id <- orders.user_id ; an array of objects
  field = "orders"
  table = "orders"
  foreign_key = "user_id"
  columns = ["id", "total", "status"]
  order_by = "id"               # optional; "created_at desc" allowed
  # limit = 5                   # optional

    [[index.has_many.has_many]]
    field = "items"
    table = "line_items"
    foreign_key = "order_id"

  [[index.belongs_to]]          # users.company_id -> companies.id ; an object or null
  field = "company"
  table = "companies"
  foreign_key = "company_id"
  columns = ["id", "name"]
"#
        );
        let c = Config::from_toml(&text).expect("relational config");
        let ix = &c.indexes[0];
        assert!(ix.is_relational());
        assert_eq!(ix.has_many[0].order_by.as_deref(), Some("id"));
        assert_eq!(ix.has_many[0].has_many[0].table, "line_items");
        assert_eq!(ix.belongs_to[0].field, "company");
        let bad = text.replace("order_by = \"id\"", "order_by = \"id; drop table x\"");
        let err = Config::from_toml(&bad)
            .expect_err("bad order_by")
            .to_string();
        assert!(err.contains("index[0].has_many[0].order_by"), "{err}");
    }

    #[test]
    fn telemetry_is_off_by_default_and_its_endpoint_must_be_an_http_url() {
        let c = Config::from_toml(REFERENCE).expect("reference config");
        assert_eq!(c.telemetry.traces_url(), None);
        assert_eq!(c.telemetry.service_name, "ferry");
        for (endpoint, url) in [
            ("http://otel:4318", "http://otel:4318/v1/traces"),
            ("http://otel:4318/", "http://otel:4318/v1/traces"),
            ("https://otel/v1/traces", "https://otel/v1/traces"),
        ] {
            let text = format!("[telemetry]\notlp_endpoint = \"{endpoint}\"\n{REFERENCE}");
            let c = Config::from_toml(&text).expect("telemetry endpoint");
            assert_eq!(c.telemetry.traces_url().as_deref(), Some(url));
        }
        let text = format!("[telemetry]\notlp_endpoint = \"otel:4318\"\n{REFERENCE}");
        let err = Config::from_toml(&text).expect_err("no scheme").to_string();
        assert!(err.contains("telemetry.otlp_endpoint"), "{err}");
        let text = format!("[telemetry]\nservice_name = \" \"\n{REFERENCE}");
        let err = Config::from_toml(&text)
            .expect_err("blank name")
            .to_string();
        assert!(err.contains("telemetry.service_name"), "{err}");
    }

    #[test]
    fn admin_section_defaults_and_validates() {
        let c = Config::from_toml(REFERENCE).expect("reference config");
        assert_eq!(c.admin.listen, "127.0.0.1:9187");
        let text = format!("[admin]\nlisten = \"0.0.0.0:9999\"\n{REFERENCE}");
        let c = Config::from_toml(&text).expect("admin listen");
        assert_eq!(c.admin.listen, "0.0.0.0:9999");
        let text = format!("[admin]\nlisten = \"localhost\"\n{REFERENCE}");
        let err = Config::from_toml(&text)
            .expect_err("bad listen")
            .to_string();
        assert!(err.contains("admin.listen"), "{err}");
        assert_eq!(c.admin.flush_failure_secs, 30);
        assert_eq!(c.admin.stall_timeout_secs, 300);
        let text = format!("[admin]\nstall_timeout_secs = 0\n{REFERENCE}");
        let err = Config::from_toml(&text)
            .expect_err("zero stall timeout")
            .to_string();
        assert!(err.contains("admin.stall_timeout_secs"), "{err}");
        let text = format!("[admin]\nport = 1\n{REFERENCE}");
        let err = Config::from_toml(&text)
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn computed_fields_need_a_free_name_and_an_expression() {
        let base = "[source]\nurl = \"postgres://u@h/d\"\nslot = \"s\"\npublication = \"p\"\n\
                    [sink]\nurl = \"http://127.0.0.1:9200\"\n[[index]]\nname = \"users\"\ntable = \"users\"\n";
        let ok = format!("{base}[[index.computed]]\nfield = \"full_name\"\nsql = \"a || b\"\n");
        assert!(Config::from_toml(&ok).is_ok());
        for (field, sql, key) in [
            ("ferry_k", "a", "index[0].computed[0].field"),
            ("x", " ", "index[0].computed[0].sql"),
        ] {
            let text = format!("{base}[[index.computed]]\nfield = \"{field}\"\nsql = \"{sql}\"\n");
            let err = Config::from_toml(&text).expect_err(key).to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let text = REFERENCE.replace("[sink]", "[sink]\nurll = \"x\"");
        let err = Config::from_toml(&text)
            .expect_err("unknown key")
            .to_string();
        eprintln!("{err}");
        assert!(err.contains("urll"), "{err}");
    }

    #[test]
    fn unknown_key_in_index_is_named() {
        let text = format!("{REFERENCE}\ncolumn = [\"id\"]\n");
        let err = Config::from_toml(&text)
            .expect_err("unknown key")
            .to_string();
        eprintln!("{err}");
        assert!(err.contains("column"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = REFERENCE
            .replace("ferry_app\"          #", "Ferry-App\"  #")
            .replace("http://127.0.0.1:9200", "ftp://x")
            .replace("name = \"users\"", "name = \"Users\"");
        let err = Config::from_toml(&text).expect_err("invalid").to_string();
        for key in ["source.slot", "sink.url", "index[0].name"] {
            assert!(err.contains(key), "{key} missing in {err}");
        }
    }

    #[test]
    fn missing_required_key_is_named() {
        let text = REFERENCE.replace("slot = \"ferry_app\"", "");
        let err = Config::from_toml(&text).expect_err("missing").to_string();
        assert!(err.contains("slot"), "{err}");
    }

    #[test]
    fn environment_overrides_nested_keys() {
        // Environment is process-wide: this is the only test that sets FERRY_ variables.
        std::env::set_var("FERRY_SINK__URL", "http://10.0.0.1:9200");
        std::env::set_var("FERRY_ENGINE__MAX_BATCH_CHANGES", "77");
        std::env::set_var("FERRY_CONFIG", "/etc/ferry/ferry.toml");
        std::env::set_var("FERRY_SOURCE__SSLMODE", "verify-full");
        std::env::set_var("FERRY_SOURCE__PASSWORD_ENV", "PG_SECRET");
        std::env::set_var("FERRY_SINK__TLS_VERIFY", "false");
        let c = Config::from_toml_with_env(REFERENCE);
        std::env::remove_var("FERRY_SOURCE__SSLMODE");
        std::env::remove_var("FERRY_SOURCE__PASSWORD_ENV");
        std::env::remove_var("FERRY_SINK__TLS_VERIFY");
        std::env::remove_var("FERRY_SINK__URL");
        std::env::remove_var("FERRY_ENGINE__MAX_BATCH_CHANGES");
        std::env::remove_var("FERRY_CONFIG");
        let c = c.expect("env config");
        assert_eq!(c.sink().url, "http://10.0.0.1:9200");
        assert_eq!(c.engine.max_batch_changes, 77);
        assert_eq!(c.source.sslmode, Some(SslMode::VerifyFull));
        assert_eq!(c.source.password_env.as_deref(), Some("PG_SECRET"));
        assert!(!c.sink().tls_verify);
    }
    #[test]
    fn committed_json_schema_matches_the_config_types() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../config/ferry.schema.json"
        );
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == json_schema_text(),
            "config/ferry.schema.json is out of date with the config types; regenerate it with\n  \
             cargo run -p ferry -- config schema > config/ferry.schema.json"
        );
        let schema = json_schema();
        let admin = &schema["$defs"]["AdminConfig"]["properties"];
        assert!(admin["token_file"].is_object(), "{admin}");
        assert_eq!(schema["additionalProperties"], serde_json::json!(false));
    }
}

#[cfg(test)]
mod security_tests {
    use super::*;

    const BASE: &str = r#"
[source]
url = "postgres://ferry@127.0.0.1:5432/app"
slot = "ferry_app"
publication = "ferry_app"

[sink]
url = "https://search.example:9200"

[[index]]
name = "users"
table = "users"
"#;

    fn with(source_extra: &str, sink_extra: &str) -> String {
        BASE.replace(
            "publication = \"ferry_app\"",
            &format!("publication = \"ferry_app\"\n{source_extra}"),
        )
        .replace(
            "url = \"https://search.example:9200\"",
            &format!("url = \"https://search.example:9200\"\n{sink_extra}"),
        )
    }

    fn err(text: &str) -> String {
        Config::from_toml(text).expect_err("invalid").to_string()
    }

    #[test]
    fn security_keys_default_to_safe_values() {
        let c = Config::from_toml(BASE).expect("base");
        assert_eq!(c.source.sslmode, None);
        assert!(c.sink().tls_verify, "certificate checks are on by default");
        assert_eq!(c.sink().aws, None);
        assert_eq!(c.sink().username, None);
    }

    #[test]
    fn security_keys_parse() {
        let text = with(
            "sslmode = \"verify-full\"\nssl_root_cert = \"/etc/ferry/ca.pem\"\npassword_file = \"/run/secrets/pg\"",
            "username = \"ferry\"\npassword_env = \"OS_PASSWORD\"\nca_cert = \"/etc/ferry/os-ca.pem\"",
        );
        let c = Config::from_toml(&text).expect("security config");
        assert_eq!(c.source.sslmode, Some(SslMode::VerifyFull));
        assert_eq!(
            c.source.password_file.as_deref(),
            Some(Path::new("/run/secrets/pg"))
        );
        assert_eq!(c.sink().username.as_deref(), Some("ferry"));
        assert_eq!(c.sink().password_env.as_deref(), Some("OS_PASSWORD"));

        let aws = with("", "aws = { region = \"eu-west-1\", service = \"aoss\" }");
        let c = Config::from_toml(&aws).expect("aws config");
        let a = c.sink().aws.clone().expect("aws");
        assert_eq!(a.service, AwsService::Aoss);
        assert_eq!(a.region.as_deref(), Some("eu-west-1"));
    }

    #[test]
    fn on_slot_lost_defaults_to_reseed_and_refuses_other_values() {
        let c = Config::from_toml(BASE).expect("base");
        assert_eq!(c.source.on_slot_lost, SlotLostPolicy::Reseed);
        let c = Config::from_toml(&with("on_slot_lost = \"stop\"", "")).expect("stop");
        assert_eq!(c.source.on_slot_lost, SlotLostPolicy::Stop);
        let e = err(&with("on_slot_lost = \"recreate\"", ""));
        assert!(
            e.contains("on_slot_lost") && e.contains("recreate") && e.contains("reseed"),
            "{e}"
        );
    }

    #[test]
    fn unknown_sslmode_is_named() {
        let e = err(&with("sslmode = \"verify_full\"", ""));
        assert!(e.contains("verify_full"), "{e}");
    }

    #[test]
    fn secret_files_lose_one_trailing_line_break_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("pw");
        for (content, want) in [
            ("s3cret\n", Ok("s3cret")),
            ("s3cret\r\n", Ok("s3cret")),
            ("s3cret", Ok("s3cret")),
            (" s3cret \n\n", Ok(" s3cret \n")),
            ("\n", Err(())),
        ] {
            std::fs::write(&f, content).expect("write");
            let got = read_secret_file(&f);
            match want {
                Ok(w) => assert_eq!(got.as_deref(), Ok(w)),
                Err(()) => assert!(got.is_err(), "{content:?} should be refused"),
            }
        }
        let missing = read_secret_file(&dir.path().join("nope")).expect_err("missing file");
        assert!(!missing.is_empty());
        let e = read_secret_env("FERRY_TEST_SURELY_UNSET_VARIABLE").expect_err("unset");
        assert!(e.contains("not set"), "{e}");
    }

    #[test]
    fn sslmode_spellings_match_libpq() {
        for m in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
            let parsed = SslMode::parse(m).expect("libpq spelling");
            assert_eq!(parsed.as_str(), m);
        }
        assert_eq!(SslMode::parse("allow"), Some(SslMode::Prefer));
        assert_eq!(SslMode::parse("verify_full"), None);
    }

    #[test]
    fn file_and_stdout_urls_name_logs_and_reject_cluster_only_keys() {
        let file = BASE.replace(
            "https://search.example:9200",
            "file:///var/lib/ferry/users.ndjson",
        );
        let c = Config::from_toml(&file).expect("a file log");
        assert_eq!(
            c.sink().target(),
            SinkTarget::File("/var/lib/ferry/users.ndjson".into())
        );
        assert_eq!(c.sink().rotate_bytes(), DEFAULT_ROTATE_BYTES);
        let c = Config::from_toml(&BASE.replace("https://search.example:9200", "stdout:"))
            .expect("stdout");
        assert_eq!(c.sink().target(), SinkTarget::Stdout);

        let e = err(&file.replace(
            "[[index]]",
            "username = \"u\"\npassword_env = \"P\"\n\n[[index]]",
        ));
        assert!(
            e.contains("sink.username") && e.contains("file or stdout log"),
            "{e}"
        );
        let e = err(&format!("{file}pipeline = \"p\"\n"));
        assert!(e.contains("index[0].pipeline"), "{e}");
        let e = err(&file.replace("[[index]]", "rotate_bytes = 100\n\n[[index]]"));
        assert!(e.contains("sink.rotate_bytes") && e.contains("4096"), "{e}");
        let e = err(&BASE.replace("[[index]]", "rotate_bytes = 1000000\n\n[[index]]"));
        assert!(
            e.contains("sink.rotate_bytes") && e.contains("file://"),
            "{e}"
        );
        for bad in ["file://host/x.ndjson", "file:///var/lib/ferry/", "ftp://x"] {
            let e = err(&BASE.replace("https://search.example:9200", bad));
            assert!(e.contains("sink.url"), "{bad}: {e}");
        }
    }

    #[test]
    fn password_in_url_and_file_is_an_error_naming_both_keys() {
        let text = with("password_file = \"/run/secrets/pg\"", "")
            .replace("postgres://ferry@", "postgres://ferry:inline-secret@");
        let e = err(&text);
        assert!(e.contains("source.password_file"), "{e}");
        assert!(e.contains("source.url"), "{e}");
        assert!(!e.contains("inline-secret"), "the password leaked: {e}");

        let text = with("", "password_env = \"OS_PW\"").replace(
            "https://search.example",
            "https://admin:inline-secret@search.example",
        );
        let e = err(&text);
        assert!(e.contains("sink.password_env"), "{e}");
        assert!(e.contains("sink.url"), "{e}");
        assert!(!e.contains("inline-secret"), "the password leaked: {e}");
    }

    #[test]
    fn two_password_sources_are_an_error() {
        let e = err(&with(
            "password_file = \"/run/secrets/pg\"\npassword_env = \"PGPW\"",
            "",
        ));
        assert!(e.contains("source.password_file"), "{e}");
        assert!(e.contains("source.password_env"), "{e}");
    }

    #[test]
    fn sink_credentials_must_be_complete() {
        let e = err(&with("", "username = \"ferry\""));
        assert!(e.contains("sink.username"), "{e}");
        let e = err(&with("", "password_file = \"/run/secrets/os\""));
        assert!(e.contains("sink.username"), "{e}");
        let text = with("", "username = \"ferry\"\npassword_file = \"/x\"")
            .replace("https://search", "https://other@search");
        let e = err(&text);
        assert!(e.contains("sink.username"), "{e}");
    }

    #[test]
    fn api_key_and_client_certificate_keys_parse() {
        let c = Config::from_toml(&with(
            "",
            "api_key_env = \"OS_API_KEY\"\nclient_cert = \"/etc/ferry/client.pem\"\nclient_key = \"/etc/ferry/client.key\"",
        ))
        .expect("api key + mTLS");
        assert_eq!(c.sink().api_key_env.as_deref(), Some("OS_API_KEY"));
        assert_eq!(
            c.sink().client_cert.as_deref(),
            Some(Path::new("/etc/ferry/client.pem"))
        );
        assert_eq!(
            c.sink().client_key.as_deref(),
            Some(Path::new("/etc/ferry/client.key"))
        );
    }

    #[test]
    fn api_key_with_basic_auth_is_an_error_naming_both() {
        let e = err(&with(
            "",
            "api_key_file = \"/run/secrets/key\"\nusername = \"ferry\"\npassword_env = \"OS_PW\"",
        ));
        assert!(
            e.contains("sink.api_key_file") && e.contains("sink.username"),
            "{e}"
        );
        let e = err(&with(
            "",
            "api_key_file = \"/run/secrets/key\"\napi_key_env = \"OS_API_KEY\"",
        ));
        assert!(
            e.contains("sink.api_key_file") && e.contains("sink.api_key_env"),
            "{e}"
        );
        let e = err(&with(
            "",
            "api_key_env = \"OS_API_KEY\"\naws = { region = \"eu-west-1\" }",
        ));
        assert!(e.contains("sink.aws") && e.contains("sink.api_key"), "{e}");
    }

    #[test]
    fn client_certificate_needs_its_key_and_https() {
        let e = err(&with("", "client_cert = \"/c.pem\""));
        assert!(e.contains("sink.client_key"), "{e}");
        let e = err(&with("", "client_key = \"/c.key\""));
        assert!(e.contains("sink.client_cert"), "{e}");
        let text = with("", "client_cert = \"/c.pem\"\nclient_key = \"/c.key\"")
            .replace("https://search", "http://search");
        let e = err(&text);
        assert!(e.contains("sink.client_cert") && e.contains("https"), "{e}");
    }

    #[test]
    fn contradictory_tls_settings_are_errors() {
        let e = err(&with("", "ca_cert = \"/ca.pem\"\ntls_verify = false"));
        assert!(e.contains("sink.ca_cert"), "{e}");
        let text = with("", "ca_cert = \"/ca.pem\"").replace("https://search", "http://search");
        let e = err(&text);
        assert!(e.contains("sink.ca_cert"), "{e}");
        let e = err(&with(
            "sslmode = \"require\"\nssl_root_cert = \"/ca.pem\"",
            "",
        ));
        assert!(e.contains("source.ssl_root_cert"), "{e}");
        let e = err(&with(
            "",
            "username = \"u\"\npassword_env = \"P\"\naws = { region = \"eu-west-1\" }",
        ));
        assert!(e.contains("sink.aws"), "{e}");
        let e = err(&with("password_env = \"\"", ""));
        assert!(e.contains("source.password_env"), "{e}");
    }

    #[test]
    fn a_pipeline_and_a_default_pipeline_setting_together_are_an_error_naming_both() {
        let ok = Config::from_toml(&format!("{BASE}pipeline = \"p\"\n")).expect("pipeline");
        assert_eq!(ok.indexes[0].pipeline.as_deref(), Some("p"));
        let e = err(&format!(
            "{BASE}pipeline = \"p\"\nsettings = {{ \"index.default_pipeline\" = \"q\" }}\n"
        ));
        assert!(e.contains("index[0].pipeline"), "{e}");
        assert!(e.contains("settings.index.default_pipeline"), "{e}");
    }
}

#[cfg(test)]
mod sinks_tests {
    use super::*;

    const NAMED: &str = r#"
[source]
url = "postgres://ferry@127.0.0.1:5432/app"
slot = "ferry_app"
publication = "ferry_app"

[sink.primary]
url = "http://es.example:9200"

[sink.eu]
url = "http://os.example:9200"
dead_letter_index = "eu-dead-letters"

[[index]]
name = "users"
table = "users"

[[index]]
name = "orders"
table = "orders"
sinks = ["eu"]
"#;

    fn problems(text: &str) -> String {
        match Config::from_toml(text) {
            Err(e) => e.to_string(),
            Ok(_) => String::new(),
        }
    }

    #[test]
    fn named_sinks_parse_in_name_order_and_an_index_goes_to_every_sink_unless_it_names_some() {
        let c = Config::from_toml(NAMED).expect("named sinks");
        assert!(c.sinks.named);
        assert_eq!(c.sinks.names(), ["eu", "primary"]);
        assert_eq!(c.sinks.list[0].config.dead_letter_index, "eu-dead-letters");
        assert_eq!(c.sinks_of(&c.indexes[0]), [0, 1]);
        assert_eq!(c.sinks_of(&c.indexes[1]), [0]);
        let fanned = c.fan_out();
        let pairs: Vec<(&str, usize)> = fanned
            .indexes
            .iter()
            .map(|i| (i.name.as_str(), fanned.sink_of(i)))
            .collect();
        assert_eq!(pairs, [("users", 0), ("users", 1), ("orders", 0)]);
    }

    #[test]
    fn a_single_unnamed_sink_is_one_default_sink_and_fans_out_to_itself() {
        let c = Config::from_toml(&NAMED.replace(
            "[sink.primary]\nurl = \"http://es.example:9200\"\n\n[sink.eu]\nurl = \"http://os.example:9200\"\ndead_letter_index = \"eu-dead-letters\"",
            "[sink]\nurl = \"http://es.example:9200\"",
        ).replace("sinks = [\"eu\"]\n", ""))
        .expect("one sink");
        assert!(!c.sinks.named);
        assert_eq!(c.sinks.names(), [DEFAULT_SINK]);
        assert_eq!(c.sink().url, "http://es.example:9200");
        assert_eq!(c.fan_out(), c);
        assert_eq!(c.sinks.label(0), None);
    }

    #[test]
    fn for_sink_keeps_that_sink_and_its_indexes_and_names_the_sinks_when_one_is_needed() {
        let c = Config::from_toml(NAMED).expect("named sinks");
        let primary = c.for_sink(Some("primary")).expect("primary");
        assert_eq!(primary.sink().url, "http://es.example:9200");
        assert_eq!(primary.indexes.len(), 1);
        assert_eq!(primary.indexes[0].name, "users");
        let e = c.for_sink(None).expect_err("which sink?");
        assert!(
            e.contains("--sink NAME") && e.contains("eu, primary"),
            "{e}"
        );
        let e = c.for_sink(Some("us")).expect_err("unknown");
        assert!(
            e.contains("no such sink") && e.contains("eu, primary"),
            "{e}"
        );
    }

    #[test]
    fn a_named_sinks_problems_carry_its_own_key() {
        let e = problems(&NAMED.replace("url = \"http://os.example:9200\"", "url = \"ftp://x\""));
        assert!(e.contains("sink.eu.url"), "{e}");
        let e = problems(&NAMED.replace(
            "dead_letter_index = \"eu-dead-letters\"",
            "username = \"ferry\"",
        ));
        assert!(
            e.contains("sink.eu.username") && e.contains("sink.eu.password_file"),
            "{e}"
        );
    }

    #[test]
    fn index_sinks_must_name_configured_sinks_once() {
        let e = problems(&NAMED.replace("sinks = [\"eu\"]", "sinks = [\"us\"]"));
        assert!(
            e.contains("index[1].sinks") && e.contains("\"us\"") && e.contains("eu, primary"),
            "{e}"
        );
        let e = problems(&NAMED.replace("sinks = [\"eu\"]", "sinks = [\"eu\", \"eu\"]"));
        assert!(e.contains("names a sink twice"), "{e}");
        let e = problems(&NAMED.replace("sinks = [\"eu\"]", "sinks = []"));
        assert!(e.contains("lists no sink"), "{e}");
    }

    #[test]
    fn two_sinks_on_one_url_are_refused() {
        let e = problems(&NAMED.replace("http://os.example:9200", "http://es.example:9200/"));
        assert!(e.contains("is also the url of sink."), "{e}");
    }

    #[test]
    fn index_sinks_with_one_unnamed_sink_say_how_to_name_them() {
        let text = NAMED
            .replace("[sink.primary]\nurl = \"http://es.example:9200\"\n\n[sink.eu]\nurl = \"http://os.example:9200\"\ndead_letter_index = \"eu-dead-letters\"", "[sink]\nurl = \"http://es.example:9200\"");
        let e = problems(&text);
        assert!(
            e.contains("index[1].sinks") && e.contains("[sink.primary]"),
            "{e}"
        );
    }

    #[test]
    fn a_misspelt_key_of_an_unnamed_sink_is_reported_not_taken_for_a_sink_name() {
        let e = problems(&NAMED.replace(
            "[sink.primary]\nurl = \"http://es.example:9200\"\n\n[sink.eu]\nurl = \"http://os.example:9200\"\ndead_letter_index = \"eu-dead-letters\"",
            "[sink]\nurl = \"http://es.example:9200\"\nrequest_timeout = 5",
        ));
        assert!(e.contains("request_timeout"), "{e}");
    }

    #[test]
    fn a_pipeline_on_an_index_going_to_a_log_names_that_sink() {
        let e = problems(
            &NAMED
                .replace("http://os.example:9200", "stdout:")
                .replace("table = \"orders\"", "table = \"orders\"\npipeline = \"p\""),
        );
        assert!(
            e.contains("index[1].pipeline") && e.contains("sink.eu.url"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod sinks_review_tests {
    use super::*;

    fn two(a: &str, b: &str, extra: &str) -> String {
        format!(
            "[source]\nurl = \"postgres://ferry@127.0.0.1:5432/app\"\nslot = \"s\"\npublication = \"p\"\n\
             [sink.{a}]\nurl = \"http://one.example:9200\"\n[sink.{b}]\nurl = \"http://two.example\"\n{extra}\
             [[index]]\nname = \"users\"\ntable = \"users\"\n"
        )
    }

    #[test]
    fn a_sink_may_be_named_like_a_sink_key() {
        let c = Config::from_toml(&two("aws", "url", "")).expect("named aws and url");
        assert_eq!(c.sinks.names(), ["aws", "url"]);
    }

    #[test]
    fn an_unnamed_sink_mixed_with_named_ones_says_so() {
        let text = two("a", "b", "").replace("[sink.a]\n", "[sink]\n");
        let e = Config::from_toml(&text).expect_err("mixed");
        assert!(
            e.to_string().contains("mixed with the named sink [sink.b]"),
            "{e}"
        );
    }

    #[test]
    fn urls_naming_one_cluster_in_different_spellings_are_refused() {
        let text = two("a", "b", "").replace("http://two.example", "http://ONE.example:9200/");
        let e = Config::from_toml(&text).expect_err("same cluster");
        assert!(e.to_string().contains("is also the url of sink.a"), "{e}");
        let text = two("a", "b", "").replace("http://one.example:9200", "http://two.example:80");
        assert!(
            Config::from_toml(&text).is_err(),
            "port 80 is http's default"
        );
    }

    #[test]
    fn a_sink_no_index_goes_to_is_refused() {
        let text = two("a", "b", "").replace(
            "table = \"users\"\n",
            "table = \"users\"\nsinks = [\"a\"]\n",
        );
        let e = Config::from_toml(&text).expect_err("b unused");
        assert!(
            e.to_string().contains("sink.b") && e.to_string().contains("no [[index]] goes to it"),
            "{e}"
        );
    }

    #[test]
    fn sink_keys_in_messages_are_renamed_but_urls_are_not() {
        assert_eq!(
            rename_sink_keys("\"file://sink.example/x\" is bad; see sink.url", "sink.eu"),
            "\"file://sink.example/x\" is bad; see sink.eu.url"
        );
    }

    #[test]
    fn index_sinks_naming_default_with_one_unnamed_sink_is_refused() {
        let text = "[source]\nurl = \"postgres://ferry@h/app\"\nslot = \"s\"\npublication = \"p\"\n\
                    [sink]\nurl = \"http://h:9200\"\n[[index]]\nname = \"u\"\ntable = \"u\"\nsinks = [\"default\"]\n";
        let e = Config::from_toml(text).expect_err("no named sinks");
        assert!(e.to_string().contains("index[0].sinks"), "{e}");
    }
}
