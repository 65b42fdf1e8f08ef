//! ferry's configuration: one TOML file, every key overridable from the
//! environment (`FERRY_SOURCE__URL`, `FERRY_SINK__URL`, …), parsed strictly
//! (unknown keys are errors) and then validated as a whole so that one run
//! reports every problem with the key that has it.

use std::collections::BTreeMap;
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
    /// Whether ferry may set REPLICA IDENTITY FULL on tables whose old rows
    /// it needs (related tables); when false, the SQL is printed instead.
    #[serde(default = "yes")]
    pub manage_replica_identity: bool,
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
}

/// A related table folded into the document (`[[index.has_many]]`,
/// `[[index.belongs_to]]`, nestable to any depth).
#[derive(Debug, Clone, Deserialize, PartialEq)]
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
}

/// The join table of a many-to-many relation.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ThroughConfig {
    /// Join table, optionally schema-qualified.
    pub table: String,
    /// Join-table column pointing at the related table's `references` column.
    pub other_key: String,
}

/// `[[index.count]]`: the number of related rows as an integer field.
#[derive(Debug, Clone, Deserialize, PartialEq)]
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
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MappingType {
    /// Each element indexed as its own hidden document: queries match within one element.
    Nested,
    /// Fields flattened into the parent: cheaper, but array elements mix in queries.
    Object,
}

impl IndexConfig {
    /// True when documents need more than the root row's own columns
    /// (relations, a filter or a soft-delete column), so they are built by
    /// querying PostgreSQL rather than from the replicated row alone.
    pub fn is_relational(&self) -> bool {
        !self.has_many.is_empty()
            || !self.belongs_to.is_empty()
            || !self.count.is_empty()
            || self.filter.is_some()
            || self.soft_delete.is_some()
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
                &mut fields,
                &mut relation_problems,
            );
        }
        p.append(&mut relation_problems);
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
    for (key, r) in nested {
        let mut inner = std::collections::HashSet::new();
        validate_relations(&key, &r.has_many, &r.belongs_to, &r.count, &mut inner, p);
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
