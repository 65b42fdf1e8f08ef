//! Shared helpers for ferry's end-to-end tests: a throwaway PostgreSQL, the
//! test OpenSearch (osmem-server, or a real cluster from
//! `FERRY_TEST_OPENSEARCH_URL`), the real `ferry` binary as a process, and
//! an oracle comparing every document with what PostgreSQL says the row is.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ferry_opensearch::{Method, Sink};
use ferry_testkit::{PgCluster, PgOptions, TestSink};
use serde_json::{json, Value};

/// The `ferry` binary, built on first use if the test run did not build it.
pub fn ferry_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // target/<profile>/deps/<test-binary> → target/<profile>/ferry
        let exe = std::env::current_exe().expect("current exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        let bin = profile_dir.join("ferry");
        // Build it (a no-op when up to date): `cargo test -p ferry-e2e`
        // alone would otherwise run a stale binary.
        {
            let release = profile_dir.ends_with("release");
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "-p", "ferry", "--bin", "ferry"]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("run cargo build");
            assert!(status.success(), "building the ferry binary failed");
        }
        bin
    })
    .clone()
}

/// Every document of index (or alias) `name` on `sink` by id (`_source`),
/// after a refresh; empty when it does not exist.
pub async fn documents_in(sink: &Sink, name: &str) -> BTreeMap<String, Value> {
    let name = name.to_string();
    let mut out = BTreeMap::new();
    if sink.refresh(&name).await.is_err() {
        return out; // not created yet
    }
    let mut after: Option<Value> = None;
    loop {
        let mut q = json!({"size": 5000, "sort": [{"id": "asc"}], "query": {"match_all": {}}});
        if let Some(a) = &after {
            q["search_after"] = a.clone();
        }
        let res = sink
            .json_request(Method::Post, &format!("/{name}/_search"), Some(q))
            .await
            .expect("search");
        let hits = res["hits"]["hits"].as_array().cloned().unwrap_or_default();
        if hits.is_empty() {
            break;
        }
        for h in &hits {
            out.insert(
                h["_id"].as_str().unwrap_or_default().to_string(),
                h["_source"].clone(),
            );
        }
        after = hits.last().map(|h| h["sort"].clone());
    }
    out
}

/// One HTTP/1.0 GET: (status, head, body).
pub async fn get(port: u16, path: &str) -> std::io::Result<(u16, String, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut raw),
    )
    .await
    .map_err(|_| std::io::Error::other("no answer within 10 s"))??;
    let text = String::from_utf8(raw).map_err(std::io::Error::other)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no head in {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    Ok((status, head.to_string(), body.to_string()))
}

/// The value of the sample line starting with `series` (name and labels).
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// A PostgreSQL database plus a test OpenSearch, for one test.
pub struct TestEnv {
    /// The throwaway cluster.
    pub pg: PgCluster,
    /// The search endpoint.
    pub os: TestSink,
    /// A client for the endpoint.
    pub sink: Sink,
    /// Directory for config files and logs.
    pub dir: tempfile::TempDir,
}

impl TestEnv {
    /// Starts PostgreSQL (database `app`) and the test OpenSearch.
    pub async fn start() -> TestEnv {
        Self::start_with(PgOptions::default()).await
    }

    /// Like [`start`](Self::start) with PostgreSQL options.
    pub async fn start_with(opts: PgOptions) -> TestEnv {
        let pg = tokio::task::spawn_blocking(move || PgCluster::start_with(opts))
            .await
            .expect("join")
            .expect("start PostgreSQL");
        pg.create_database("app").await.expect("create database");
        pg.client("app")
            .await
            .expect("connect to app")
            .batch_execute(FERRY_DOC)
            .await
            .expect("install ferry_doc");
        let os = tokio::task::spawn_blocking(TestSink::start)
            .await
            .expect("join")
            .expect("start the test OpenSearch");
        let sink = Sink::new(os.url(), Duration::from_secs(30)).expect("sink client");
        TestEnv {
            pg,
            os,
            sink,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A client on database `app`.
    pub async fn db(&self) -> tokio_postgres::Client {
        self.pg.client("app").await.expect("connect to app")
    }

    /// The index name for this test (prefixed when sharing a real cluster).
    pub fn index(&self, name: &str) -> String {
        self.os.index_name(name)
    }

    /// A config with one index over `table`, written to a file.
    pub fn config(&self, index: &str, table: &str, extra: &str) -> PathBuf {
        let text = format!(
            "[source]\nurl = \"{}\"\nslot = \"ferry_test\"\npublication = \"ferry_test\"\n\n[sink]\nurl = \"{}\"\n\n[engine]\nmax_batch_delay_ms = 20\n\n[[index]]\nname = \"{}\"\ntable = \"{}\"\n{extra}",
            self.pg.url("app"),
            self.os.url(),
            self.index(index),
            table
        );
        self.write_config(&text)
    }

    /// Writes a config file and returns its path.
    pub fn write_config(&self, text: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir.path().join(format!("ferry-{n}.toml"));
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// Starts `ferry run --config <path>`.
    pub fn run_ferry(&self, config: &Path) -> FerryProcess {
        FerryProcess::start(config, &self.dir.path().join("ferry.log"))
    }

    /// Every document of `index` by id (`_source`), after a refresh.
    pub async fn documents(&self, index: &str) -> BTreeMap<String, Value> {
        documents_in(&self.sink, &self.index(index)).await
    }

    /// The `properties` of `index`'s mapping (through its alias).
    pub async fn mapping_properties(&self, index: &str) -> Value {
        let name = self.index(index);
        let mapping = self
            .sink
            .json_request(Method::Get, &format!("/{name}/_mapping"), None)
            .await
            .expect("mapping");
        mapping
            .as_object()
            .and_then(|m| m.values().next())
            .map(|v| v["mappings"]["properties"].clone())
            .unwrap_or_default()
    }

    /// Document count of `index` after a refresh.
    pub async fn count(&self, index: &str) -> u64 {
        let name = self.index(index);
        let _ = self.sink.refresh(&name).await;
        match self
            .sink
            .json_request(Method::Get, &format!("/{name}/_count"), None)
            .await
        {
            Ok(v) => v["count"].as_u64().unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// Waits until `index` holds exactly the rows of `table`, each as
    /// [`FERRY_DOC`] renders it, panicking with the differences after `within`.
    pub async fn assert_converges(&self, index: &str, table: &str, within: Duration) {
        let sql = format!("SELECT id::text, ferry_doc(ferry_row__)::text FROM {table} ferry_row__");
        self.assert_converges_to(index, &sql, within).await
    }

    /// Waits until `index` holds exactly the documents `sql` describes (rows
    /// of document id text and expected JSON text), compared with [`same`].
    pub async fn assert_converges_to(&self, index: &str, sql: &str, within: Duration) {
        let db = self.db().await;
        let deadline = Instant::now() + within;
        loop {
            let rows = expected_json(&db, sql).await;
            let docs = self.documents(index).await;
            let diff = compare(&rows, &docs);
            if diff.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                let shown: Vec<&String> = diff.iter().take(10).collect();
                panic!(
                    "index {index} did not converge within {within:?}: {} differences, first: {shown:#?}\n--- ferry log ---\n{}",
                    diff.len(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The last lines of the ferry log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("ferry.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// The whole ferry log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ferry.log")).unwrap_or_default()
    }
}

/// Rows of (id text, JSON text) from `sql`, parsed.
pub async fn expected_json(db: &tokio_postgres::Client, sql: &str) -> BTreeMap<String, Value> {
    let rows = db.query(sql, &[]).await.expect("read expected documents");
    rows.iter()
        .map(|r| {
            let id: String = r.get(0);
            let j: String = r.try_get(1).unwrap_or_else(|e| panic!("row {id}: {e:?}"));
            (
                id,
                serde_json::from_str(&j).expect("expected document is JSON"),
            )
        })
        .collect()
}

/// Every row of `table` as the document ferry must write for it
/// (`ferry_doc`), by primary key `id` text.
pub async fn rows_as_json(db: &tokio_postgres::Client, table: &str) -> BTreeMap<String, Value> {
    let sql = format!("SELECT id::text, ferry_doc(ferry_row__)::text FROM {table} ferry_row__");
    expected_json(db, &sql).await
}

/// Differences between expected documents and documents, as readable lines.
pub fn compare(rows: &BTreeMap<String, Value>, docs: &BTreeMap<String, Value>) -> Vec<String> {
    let mut out = Vec::new();
    for (id, row) in rows {
        match docs.get(id) {
            None => out.push(format!("missing document {id}")),
            Some(doc) => {
                if !same(row, doc) {
                    out.push(format!("document {id} differs:\n  row {row}\n  doc {doc}"));
                }
            }
        }
    }
    for id in docs.keys() {
        if !rows.contains_key(id) {
            out.push(format!("extra document {id}"));
        }
    }
    out
}

/// Equality of an expected value and a document value. The expected side
/// is already in the one form ferry must write for its column type (see
/// [`FERRY_DOC`]; `to_jsonb` is that form for every type but bytea,
/// timestamptz and the infinities), so strings compare exactly. Numbers
/// compare by value as JSON numbers do (`1.50` is `1.5`): integers exactly,
/// others as doubles (numeric beyond a double's precision is checked byte
/// for byte by `types.rs`).
pub fn same(row: &Value, doc: &Value) -> bool {
    match (row, doc) {
        (Value::Number(a), Value::Number(b)) => match (a.as_i64(), b.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => match (a.as_u64(), b.as_u64()) {
                (Some(x), Some(y)) => x == y,
                _ => a.as_f64() == b.as_f64(),
            },
        },
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(x, y))
        }
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len() && a.iter().all(|(k, v)| b.get(k).is_some_and(|w| same(v, w)))
        }
        _ => row == doc,
    }
}

/// `ferry_doc(row)`, installed in database `app` by [`TestEnv::start`]: a
/// table row as the document ferry must write for it, decided per column
/// type — bytea as base64, timestamptz as RFC 3339 in UTC with `Z` (the
/// fraction as PostgreSQL prints it), infinite dates and timestamps and
/// non-finite numbers as null, every other type as `to_jsonb` renders it.
pub const FERRY_DOC: &str = r#"
CREATE FUNCTION ferry_doc(r anyelement) RETURNS jsonb LANGUAGE plpgsql STABLE AS $f$
DECLARE
  j jsonb := to_jsonb(r);
  out jsonb := '{}';
  c record;
  v jsonb;
  t text;
BEGIN
  FOR c IN SELECT a.attname::text AS name, a.atttypid::regtype AS typ
           FROM pg_type ty JOIN pg_attribute a ON a.attrelid = ty.typrelid
           WHERE ty.oid = pg_typeof(r) AND a.attnum > 0 AND NOT a.attisdropped
  LOOP
    v := j -> c.name;
    IF jsonb_typeof(v) = 'string' THEN
      t := v #>> '{}';
      IF c.typ = 'bytea'::regtype THEN
        v := to_jsonb(translate(encode(decode(substr(t, 3), 'hex'), 'base64'), E'\n', ''));
      ELSIF c.typ IN ('timestamptz'::regtype, 'timestamp'::regtype, 'date'::regtype)
            AND t IN ('infinity', '-infinity') THEN
        v := 'null';
      ELSIF c.typ = 'timestamptz'::regtype THEN
        v := to_jsonb(regexp_replace(to_char(t::timestamptz AT TIME ZONE 'UTC',
               'YYYY-MM-DD"T"HH24:MI:SS.US'), '\.?0+$', '') || 'Z');
      ELSIF c.typ IN ('numeric'::regtype, 'real'::regtype, 'double precision'::regtype) THEN
        v := 'null';
      END IF;
    END IF;
    out := out || jsonb_build_object(c.name, v);
  END LOOP;
  RETURN out;
END $f$;
"#;

/// A running `ferry` process; killed on drop.
pub struct FerryProcess {
    child: Option<Child>,
}

impl FerryProcess {
    /// Starts `ferry run --config <config>`, logging to `log`.
    pub fn start(config: &Path, log: &Path) -> FerryProcess {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let mut cmd = Command::new(ferry_bin());
        // Tests run in parallel: unless a test configures the admin
        // endpoint itself, let each ferry take any free port.
        let text = std::fs::read_to_string(config).unwrap_or_default();
        if !text.contains("[admin]") {
            cmd.env("FERRY_ADMIN__LISTEN", "127.0.0.1:0");
        }
        let child = cmd
            .args(["run", "--config"])
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("FERRY_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("start ferry");
        FerryProcess { child: Some(child) }
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit code.
    pub fn stop(mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: sending a signal to our own child process id.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("ferry did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGHUP (re-read the configuration).
    pub fn hangup(&self) {
        if let Some(c) = &self.child {
            // SAFETY: sending a signal to our own child process id.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGHUP);
            }
        }
    }

    /// Kills the process without warning (SIGKILL).
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit on its own (panicking after `within`)
    /// and returns its exit code.
    pub fn exit_code_within(mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while self.is_running() {
            assert!(
                Instant::now() < deadline,
                "ferry kept running for {within:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.stop()
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for FerryProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `ferry <args…>` to completion; returns (exit code, stdout, stderr).
pub fn ferry_once(args: &[&str]) -> (i32, String, String) {
    output_of(
        Command::new(ferry_bin())
            .args(args)
            // Parallel tests: never compete for the default admin port.
            .env("FERRY_ADMIN__LISTEN", "127.0.0.1:0"),
    )
}

/// Runs `cmd` (a `ferry` command line) to completion with `RUST_LOG=info`;
/// returns (exit code, stdout, stderr).
pub fn output_of(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.env("RUST_LOG", "info").output().expect("run ferry");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `check` every 200 ms until it holds; panics naming `what` after `within`.
pub async fn wait_for(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One `_bulk` action and its source (none for a delete).
#[derive(Debug)]
pub struct BulkAction {
    /// `index` or `delete`.
    pub op: String,
    /// `_index`.
    pub index: String,
    /// `_id`.
    pub id: String,
    /// The external version.
    pub version: u64,
    /// The document, for `index`.
    pub source: Option<Value>,
}

/// Parses a `_bulk` body as ferry encodes it; panics on anything else.
pub fn parse_bulk(body: &str) -> Vec<BulkAction> {
    let mut lines = body.lines();
    let mut out = Vec::new();
    while let Some(line) = lines.next() {
        let action: Value = serde_json::from_str(line).expect("action line is JSON");
        let (op, meta) = action
            .as_object()
            .and_then(|o| o.iter().next())
            .expect("one action per line");
        let source = match op.as_str() {
            "index" => Some(
                serde_json::from_str(lines.next().expect("source line")).expect("source is JSON"),
            ),
            "delete" => None,
            other => panic!("unexpected action {other}"),
        };
        assert_eq!(meta["version_type"], "external_gte", "{line}");
        out.push(BulkAction {
            op: op.clone(),
            index: meta["_index"].as_str().expect("_index").to_string(),
            id: meta["_id"].as_str().expect("_id").to_string(),
            version: meta["version"].as_u64().expect("version"),
            source,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_accepts_only_the_one_form_a_type_requires() {
        assert!(same(&json!("AQI="), &json!("AQI=")));
        // The oracle renders bytea and timestamptz in ferry's form itself:
        // another rendering of the same value is a difference.
        assert!(!same(&json!("\\x0102"), &json!("AQI=")));
        assert!(!same(
            &json!("2024-01-31T12:34:56Z"),
            &json!("2024-01-31T12:34:56+00:00")
        ));
        assert!(same(&json!(1.50), &json!(1.5)));
        assert!(!same(&json!(1), &json!("1")));
        assert!(!same(&json!({"a": 1}), &json!({"a": 1, "b": null})));
    }
}
