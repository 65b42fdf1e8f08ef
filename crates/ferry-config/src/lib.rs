//! ferry's configuration: one TOML file, every key overridable from the
//! environment (`FERRY_SOURCE__URL`, `FERRY_SINK__URL`, …), parsed strictly
//! (unknown keys are errors) and then validated as a whole so that one run
//! reports every problem with the key that has it.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The PostgreSQL database changes come from.
    pub source: SourceConfig,
    /// The OpenSearch (or Elasticsearch) cluster documents go to.
    pub sink: SinkConfig,
    /// Batching and queueing knobs.
    #[serde(default)]
    pub engine: EngineConfig,
    /// The search indexes ferry keeps in sync.
    #[serde(default, rename = "index")]
    pub indexes: Vec<IndexConfig>,
}

/// `[source]`: the PostgreSQL side.
#[derive(Debug, Clone, Deserialize, PartialEq)]
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
    /// Seconds of silence after which ferry writes a logical-message
    /// heartbeat so the slot advances on a database busy elsewhere (0 = off).
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u64,
}

impl SourceConfig {
    /// The heartbeat interval, `None` when turned off.
    pub fn heartbeat(&self) -> Option<Duration> {
        (self.heartbeat_secs > 0).then(|| Duration::from_secs(self.heartbeat_secs))
    }
}

/// `[sink]`: the search cluster.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Base URL, e.g. `http://127.0.0.1:9200`.
    pub url: String,
    /// Timeout of one bulk request in seconds (default 60).
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
}

/// `[engine]`: how changes are batched between the stream and the sink.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Most changes in one batch (one bulk request per batch).
    pub max_batch_changes: usize,
    /// Most bytes of documents in one bulk request.
    pub max_batch_bytes: usize,
    /// Longest a change waits for its batch to fill, in milliseconds.
    pub max_batch_delay_ms: u64,
    /// Capacity of the queue between capture and worker, in changes.
    pub queue_capacity: usize,
    /// Rows per bulk request during backfill.
    pub backfill_batch_rows: usize,
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
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IndexConfig {
    /// What users query: an alias over the concrete index ferry manages.
    pub name: String,
    /// Root table, optionally schema-qualified (`public.users`); one document per row.
    pub table: String,
    /// Columns to include; default every column.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
}

impl IndexConfig {
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

fn default_heartbeat() -> u64 {
    30
}

fn default_request_timeout() -> u64 {
    60
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
        match url::Url::parse(&self.sink.url) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            Ok(_) => bad(
                "sink.url",
                "must start with http:// or https:// (e.g. http://127.0.0.1:9200)".into(),
            ),
            Err(e) => bad(
                "sink.url",
                format!("is not a URL ({e}); expected e.g. http://127.0.0.1:9200"),
            ),
        }
        if self.sink.request_timeout_secs == 0 {
            bad("sink.request_timeout_secs", "must be at least 1".into());
        }
        let e = &self.engine;
        for (key, v) in [
            ("engine.max_batch_changes", e.max_batch_changes),
            ("engine.max_batch_bytes", e.max_batch_bytes),
            ("engine.queue_capacity", e.queue_capacity),
            ("engine.backfill_batch_rows", e.backfill_batch_rows),
        ] {
            if v == 0 {
                bad(key, "must be greater than 0".into());
            }
        }
        if self.indexes.is_empty() {
            bad(
                "index",
                "no [[index]] defined; add at least one with a name and a table".into(),
            );
        }
        let mut seen = std::collections::HashSet::new();
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
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(p))
        }
    }
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
        let c = Config::from_toml_with_env(REFERENCE);
        std::env::remove_var("FERRY_SINK__URL");
        std::env::remove_var("FERRY_ENGINE__MAX_BATCH_CHANGES");
        std::env::remove_var("FERRY_CONFIG");
        let c = c.expect("env config");
        assert_eq!(c.sink.url, "http://10.0.0.1:9200");
        assert_eq!(c.engine.max_batch_changes, 77);
    }
}
