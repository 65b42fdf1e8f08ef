//! One workload's world: a throwaway PostgreSQL, a sink (a [`FastSink`] or
//! the real OpenSearch node, see [`Sink`]), and the real `ferry` binary
//! running as a child process the way users run it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_testkit::{FastSink, PgCluster, PgOptions};

use crate::opensearch::Node;
use crate::sink::Sink;
use crate::workloads::Ctx;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Database every workload uses.
pub const DB: &str = "bench";
/// ferry's replication slot.
pub const SLOT: &str = "ferry_bench";
/// ferry's publication (also read by the `pg_recvlogical` ceiling).
pub const PUBLICATION: &str = "ferry_bench";
/// The index name (an alias over ferry's concrete index).
pub const INDEX: &str = "bench";

/// PostgreSQL settings that keep checkpoints out of the measurements.
///
/// `synchronous_commit = on` matters for lag: the walsender only sends WAL
/// that is flushed, and with the test kit's `off` a commit waits up to
/// `wal_writer_delay` (200 ms) for that. With `fsync = off` it costs little.
const PG_CONF: &[&str] = &[
    "synchronous_commit = on",
    "max_wal_size = '4GB'",
    "checkpoint_timeout = '30min'",
    "shared_buffers = '512MB'",
    "autovacuum = off",
];

/// PostgreSQL + sink + (once started) ferry, all torn down on drop.
pub struct Harness {
    // Field order is drop order: ferry goes before the services it talks to.
    ferry: Option<Ferry>,
    /// Where ferry writes.
    pub sink: Sink,
    /// The throwaway cluster.
    pub pg: PgCluster,
    /// A connection to [`DB`].
    pub db: tokio_postgres::Client,
    dir: tempfile::TempDir,
    ferry_bin: PathBuf,
    keep_logs: Option<(PathBuf, String)>,
    log_filter: String,
    /// Port of ferry's admin endpoint (`/metrics`), chosen at start-up.
    admin_port: u16,
    /// Lines of the `[engine]` section the next ferry gets.
    engine_extra: String,
    /// Where the next ferry writes instead of the sink (e.g. a delaying proxy).
    sink_url: Option<String>,
}

impl Harness {
    /// Starts PostgreSQL (with database [`DB`]) and a FastSink, or empties
    /// the node when the run uses one.
    pub async fn start(ctx: &Ctx, workload: &str) -> Result<Harness> {
        let opts = PgOptions {
            extra_conf: PG_CONF.iter().map(|s| (*s).to_owned()).collect(),
            ..PgOptions::default()
        };
        let pg = tokio::task::spawn_blocking(move || PgCluster::start_with(opts))
            .await
            .context("joining the PostgreSQL start-up task")?
            .context("starting PostgreSQL")?;
        pg.create_database(DB).await?;
        let db = pg.client(DB).await?;
        let sink = match &ctx.node {
            Some(node) => {
                node.delete_all_indexes()
                    .await
                    .context("emptying the OpenSearch node")?;
                Sink::Node(node.clone())
            }
            None => Sink::Fast(FastSink::start().context("starting FastSink")?),
        };
        Ok(Harness {
            ferry: None,
            sink,
            pg,
            db,
            dir: tempfile::tempdir()?,
            ferry_bin: ctx.ferry_bin.clone(),
            keep_logs: ctx
                .keep_logs
                .as_ref()
                .map(|d| (d.clone(), workload.to_owned())),
            log_filter: "warn".to_owned(),
            admin_port: ferry_testkit::try_free_port()
                .context("finding a port for ferry's admin endpoint")?,
            engine_extra: String::new(),
            sink_url: None,
        })
    }

    /// This workload's scratch directory (config, ferry's log).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// A new connection to [`DB`].
    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        Ok(self.pg.client(DB).await?)
    }

    /// The `RUST_LOG` filter the next [`start_ferry`](Self::start_ferry)
    /// passes (default `warn`).
    pub fn set_log_filter(&mut self, filter: &str) {
        self.log_filter = filter.to_owned();
    }

    /// `[engine]` keys (TOML lines) the next [`start_ferry`](Self::start_ferry) writes.
    pub fn set_engine(&mut self, lines: &str) {
        self.engine_extra = lines.to_owned();
    }

    /// The URL the next ferry writes to instead of the sink's own (a proxy in front of it).
    pub fn set_sink_url(&mut self, url: &str) {
        self.sink_url = Some(url.to_owned());
    }

    /// Everything ferry has logged so far (empty before it started).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ferry.log")).unwrap_or_default()
    }

    /// Runs `ferry run --config …` for one index over `table`; returns when
    /// the process has been spawned.
    pub fn start_ferry(&mut self, table: &str) -> Result<Instant> {
        self.start_ferry_with(table, "")
    }

    /// Like [`start_ferry`](Self::start_ferry), with `index_extra` (TOML
    /// keys and sub-tables of the `[[index]]` block, e.g. relations)
    /// appended to the index.
    ///
    /// The admin endpoint listens on a free loopback port, so `/metrics` can
    /// be read with [`metric`](Self::metric) and a stray process on ferry's
    /// default port cannot stop it from starting. On the single-node
    /// OpenSearch the index gets `number_of_replicas = 0` (green, not
    /// yellow); every other setting is ferry's default.
    pub fn start_ferry_with(&mut self, table: &str, index_extra: &str) -> Result<Instant> {
        let settings = match self.sink {
            Sink::Node(_) => "settings = { number_of_replicas = 0 }\n",
            Sink::Fast(_) => "",
        };
        let config = format!(
            "[source]\nurl = \"{}\"\nslot = \"{SLOT}\"\npublication = \"{PUBLICATION}\"\n\n\
             [sink]\nurl = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:{}\"\n\n[engine]\n{}\n\n\
             [[index]]\nname = \"{INDEX}\"\ntable = \"{table}\"\n{settings}{index_extra}",
            self.pg.url(DB),
            self.sink_url.as_deref().unwrap_or(self.sink.url()),
            self.admin_port,
            self.engine_extra
        );
        let config_path = self.dir.path().join("ferry.toml");
        std::fs::write(&config_path, config)?;
        let log = self.dir.path().join("ferry.log");
        let started = Instant::now();
        self.ferry = Some(Ferry::spawn(
            &self.ferry_bin,
            &config_path,
            &log,
            &self.log_filter,
        )?);
        Ok(started)
    }

    /// The sum of every sample of metric `name` on ferry's `/metrics`
    /// (all label sets together); `None` when ferry's admin endpoint does
    /// not answer or does not list it.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let body = self.metrics_text().await?;
        metric_sum(&body, name, "")
    }

    /// ferry's counters of its writes to the sink, from `/metrics`.
    pub async fn counters(&self) -> Option<FerryCounters> {
        let body = self.metrics_text().await?;
        let get = |name: &str, label: &str| metric_sum(&body, name, label).unwrap_or(0.0);
        Some(FerryCounters {
            bulk_requests: get("ferry_bulk_requests_total", ""),
            bulk_failed: get("ferry_bulk_requests_total", "class=\"4xx\"")
                + get("ferry_bulk_requests_total", "class=\"5xx\""),
            retries: get("ferry_retries_total", ""),
            superseded: get("ferry_documents_total", "result=\"superseded\""),
            rejected: get("ferry_documents_total", "result=\"rejected\""),
        })
    }

    async fn metrics_text(&self) -> Option<String> {
        let fetch = async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.admin_port)).await?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                .await?;
            let mut body = String::new();
            s.read_to_string(&mut body).await?;
            Ok::<_, std::io::Error>(body)
        };
        tokio::time::timeout(Duration::from_secs(5), fetch)
            .await
            .ok()?
            .ok()
    }

    /// The running ferry process.
    pub fn ferry(&self) -> Result<&Ferry> {
        self.ferry.as_ref().context("ferry was not started")
    }

    /// Blocks (off the async workers) until `done` holds for the FastSink,
    /// checking in between that ferry is still alive. Returns when it was
    /// observed.
    pub async fn wait_sink(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&FastSink, Duration) -> bool,
    ) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(250));
            let sink = self.sink.fast()?;
            if tokio::task::block_in_place(|| done(sink, slice)) {
                return Ok(Instant::now());
            }
            self.check_alive(what)?;
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {:.0} s waiting for {what} (the sink holds {} documents)\n{}",
                    timeout.as_secs_f64(),
                    self.sink.fast()?.doc_count(INDEX),
                    self.log_excerpt()
                );
            }
        }
    }

    /// Polls the node until `done` says yes, checking in between that
    /// ferry is still alive; returns when it was observed.
    async fn wait_node<F, Fut>(
        &mut self,
        what: &str,
        timeout: Duration,
        every: Duration,
        done: F,
    ) -> Result<Instant>
    where
        F: Fn(Arc<Node>) -> Fut,
        Fut: std::future::Future<Output = Result<bool>>,
    {
        let node = self
            .sink
            .node()
            .cloned()
            .context("the sink is not a node")?;
        let deadline = Instant::now() + timeout;
        loop {
            if done(node.clone()).await? {
                return Ok(Instant::now());
            }
            self.check_alive(what)?;
            if Instant::now() >= deadline {
                let docs = node.count(INDEX).await.unwrap_or(0);
                bail!(
                    "timed out after {:.0} s waiting for {what} (the node shows {docs} documents)\n{}",
                    timeout.as_secs_f64(),
                    self.log_excerpt()
                );
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Waits until the index holds exactly `count` documents (on the node:
    /// searchable ones, polled every 100 ms without forcing a refresh).
    pub async fn wait_count(&mut self, count: usize, timeout: Duration) -> Result<Instant> {
        let what = format!("{count} documents");
        if let Sink::Fast(_) = self.sink {
            return self
                .wait_sink(&what, timeout, |s, t| s.wait_for_count(INDEX, count, t))
                .await;
        }
        self.wait_node(&what, timeout, Duration::from_millis(100), |n| async move {
            Ok(n.count(INDEX).await? == count)
        })
        .await
    }

    /// Waits until document `id` exists (on the node: real-time gets every
    /// 10 ms).
    pub async fn wait_doc(&mut self, id: &str, timeout: Duration) -> Result<Instant> {
        let what = format!("document {id}");
        if let Sink::Fast(_) = self.sink {
            return self
                .wait_sink(&what, timeout, |s, t| s.wait_for_doc(INDEX, id, t))
                .await;
        }
        let id = id.to_owned();
        self.wait_node(&what, timeout, Duration::from_millis(10), |n| {
            let id = id.clone();
            async move { n.exists(INDEX, &id).await }
        })
        .await
    }

    /// Fails with the log tail when ferry has exited.
    pub fn check_alive(&mut self, what: &str) -> Result<()> {
        let exited = match self.ferry.as_mut() {
            Some(f) => f.exited(),
            None => bail!("ferry was not started"),
        };
        if let Some(status) = exited {
            bail!(
                "ferry exited ({status}) while waiting for {what}\n{}",
                self.log_excerpt()
            );
        }
        Ok(())
    }

    /// Proves the streaming path works: a probe row appears, then disappears.
    pub async fn probe_stream(&mut self, table: &str, insert_probe: &str) -> Result<()> {
        let before = self.sink.settled_count(INDEX).await?;
        self.db.batch_execute(insert_probe).await?;
        self.wait_doc("-1", Duration::from_secs(120)).await?;
        self.db
            .batch_execute(&format!("DELETE FROM {table} WHERE id = -1"))
            .await?;
        match self.sink {
            Sink::Fast(_) => {
                self.wait_count(before, Duration::from_secs(60)).await?;
            }
            // The node's count may never have shown the probe: wait for
            // the delete itself.
            Sink::Node(_) => {
                self.wait_node(
                    "document -1 to go",
                    Duration::from_secs(60),
                    Duration::from_millis(10),
                    |n| async move { Ok(!n.exists(INDEX, "-1").await?) },
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Bytes of WAL ferry's slot still holds back.
    pub async fn retained_wal(&self) -> Result<Option<i64>> {
        let row = self
            .db
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&SLOT],
            )
            .await?;
        Ok(row.and_then(|r| r.get::<_, Option<i64>>(0)))
    }

    /// Bytes between the WAL end and what ferry has confirmed as flushed.
    pub async fn unconfirmed_wal(&self) -> Result<Option<i64>> {
        let row = self
            .db
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&SLOT],
            )
            .await?;
        Ok(row.and_then(|r| r.get::<_, Option<i64>>(0)))
    }

    /// The current WAL position as text.
    pub async fn current_lsn(&self) -> Result<String> {
        let row = self
            .db
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?;
        Ok(row.get(0))
    }

    /// Creates a pgoutput slot for a `pg_recvlogical` ceiling run.
    pub async fn create_ceiling_slot(&self, name: &str) -> Result<()> {
        self.db
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&name],
            )
            .await?;
        Ok(())
    }

    /// Records the current end of WAL as the end position of ceiling runs,
    /// and writes a non-transactional logical message just past it.
    ///
    /// `pg_recvlogical` asks for messages (`messages=true`), so it sees a
    /// record beyond `-E` and exits at once instead of waiting for a
    /// keepalive from an idle walsender.
    pub async fn mark_end(&self) -> Result<String> {
        let end_lsn = self.current_lsn().await?;
        self.db
            .execute(
                "SELECT pg_logical_emit_message(false, 'ferry-bench', 'end')",
                &[],
            )
            .await?;
        Ok(end_lsn)
    }

    /// Drains `slot` with `pg_recvlogical` into /dev/null up to `end_lsn`
    /// (from [`mark_end`](Self::mark_end)), then drops the slot; returns how
    /// long the drain took.
    pub async fn recvlogical(&self, slot: &str, end_lsn: &str) -> Result<Duration> {
        let bin = self.pg.bin_dir().join("pg_recvlogical");
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.args(["--start", "--no-loop", "-S", slot, "-P", "pgoutput"])
            .args(["-o", "proto_version=1", "-o", "messages=true"])
            .arg("-o")
            .arg(format!("publication_names={PUBLICATION}"))
            .args(["-f", "/dev/null", "-E", end_lsn, "-h", self.pg.host()])
            .args([
                "-p",
                &self.pg.port().to_string(),
                "-U",
                "postgres",
                "-d",
                DB,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for var in ["PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGOPTIONS"] {
            cmd.env_remove(var);
        }
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("running {}", bin.display()))?;
        let out = tokio::time::timeout(Duration::from_secs(900), child.wait_with_output())
            .await
            .context("pg_recvlogical did not reach the end position within 15 minutes")??;
        let took = started.elapsed();
        if !out.status.success() {
            bail!(
                "pg_recvlogical failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let _ = self
            .db
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await;
        Ok(took)
    }

    /// Stops ferry with SIGTERM; returns its exit status when it stopped in time.
    pub fn stop_ferry(&mut self) -> Option<ExitStatus> {
        let status = self
            .ferry
            .as_mut()
            .and_then(|f| f.stop(Duration::from_secs(30)));
        self.save_log();
        status
    }

    /// The last lines of ferry's log, labelled, for error messages.
    pub fn log_excerpt(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(25)..].join("\n");
        if tail.trim().is_empty() {
            "(ferry's log is empty)".to_owned()
        } else {
            format!("--- last lines of ferry's log ---\n{tail}")
        }
    }

    fn save_log(&self) {
        if let Some((dir, name)) = &self.keep_logs {
            let _ = std::fs::create_dir_all(dir);
            let _ = std::fs::copy(
                self.dir.path().join("ferry.log"),
                dir.join(format!("{name}.ferry.log")),
            );
            let _ = std::fs::copy(
                self.dir.path().join("ferry.toml"),
                dir.join(format!("{name}.ferry.toml")),
            );
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.save_log();
    }
}

/// Keeps the user's own `FERRY_…` overrides out of a ferry the bench starts.
fn without_ferry_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FERRY_") {
            cmd.env_remove(key);
        }
    }
}

/// A one-shot ferry command (`ferry verify`, …) that ran to its end.
pub struct OnceRun {
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
    /// Peak resident set size of that process (`VmHWM`, polled every
    /// 50 ms), in bytes.
    pub peak_rss_bytes: u64,
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Its standard output.
    pub stdout: String,
}

impl Harness {
    /// Runs `ferry ARGS --config <the last started configuration>` to its
    /// end, measuring that process alone.
    pub async fn run_once(&self, args: &[&str]) -> Result<OnceRun> {
        let config = self.dir.path().join("ferry.toml");
        let out = self.dir.path().join("once.out");
        let mut cmd = Command::new(&self.ferry_bin);
        cmd.args(args)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::from(File::create(&out)?))
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(self.dir.path().join("ferry.log"))?,
            ));
        without_ferry_env(&mut cmd);
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.ferry_bin.display()))?;
        // The peak RSS of the ferry process itself: `VmHWM` of its own
        // address space, polled until it exits (rusage's ru_maxrss would
        // also count the bench process it was spawned from).
        let mut peak = 0u64;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if let Ok(text) = std::fs::read_to_string(format!("/proc/{}/status", child.id())) {
                peak = peak.max(vm_field_bytes(&text, "VmHWM:").unwrap_or(0));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let elapsed = started.elapsed();
        Ok(OnceRun {
            elapsed,
            peak_rss_bytes: peak,
            code: status.code(),
            stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        })
    }
}

/// The ferry child process; killed on drop if still running.
pub struct Ferry {
    child: Child,
    pid: i32,
}

impl Ferry {
    fn spawn(bin: &Path, config: &Path, log: &Path, filter: &str) -> Result<Ferry> {
        let log_file = File::create(log)?;
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file));
        without_ferry_env(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = i32::try_from(child.id()).context("pid out of range")?;
        Ok(Ferry { child, pid })
    }

    /// The exit status, once the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Freezes (`SIGSTOP`, `true`) or resumes (`SIGCONT`) the process, so a
    /// backlog can build up in its slot and its drain be timed alone.
    pub fn freeze(&self, frozen: bool) {
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe {
            libc::kill(self.pid, signal);
        }
    }

    /// User plus system CPU seconds used so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        cpu_from_stat(&stat, clock_ticks())
    }

    /// Peak resident set size so far (`VmHWM`), in bytes.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        vm_field_bytes(&status, "VmHWM:")
    }

    fn stop(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe {
            libc::kill(self.pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Clock ticks per second for `/proc/<pid>/stat` times.
pub(crate) fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// utime + stime from a `/proc/<pid>/stat` line, in seconds.
pub(crate) fn cpu_from_stat(stat: &str, ticks: f64) -> Option<f64> {
    // The command name may contain spaces; fields after it are plain.
    let after = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Field 3 (state) is fields[0], so utime (14) and stime (15) are 11 and 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

/// ferry's own counters of its writes (from `/metrics`), summed over indexes.
#[derive(Debug, Clone, Copy, Default)]
pub struct FerryCounters {
    /// Bulk requests sent.
    pub bulk_requests: f64,
    /// Bulk requests answered 4xx/5xx or lost in transport.
    pub bulk_failed: f64,
    /// Bulk attempts retried (whole requests or items).
    pub retries: f64,
    /// Writes refused as older than the stored version (409).
    pub superseded: f64,
    /// Writes refused for good.
    pub rejected: f64,
}

impl FerryCounters {
    /// `self - before`.
    pub fn since(&self, before: &FerryCounters) -> FerryCounters {
        FerryCounters {
            bulk_requests: self.bulk_requests - before.bulk_requests,
            bulk_failed: self.bulk_failed - before.bulk_failed,
            retries: self.retries - before.retries,
            superseded: self.superseded - before.superseded,
            rejected: self.rejected - before.rejected,
        }
    }
}

/// The sum of the samples of metric `name` in a Prometheus text exposition
/// whose labels contain `label` (e.g. `class="5xx"`; empty: every sample);
/// `None` when there is none.
fn metric_sum(text: &str, name: &str, label: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // `name value` or `name{labels} value`, not a longer name.
        let value = if let Some(labelled) = rest.strip_prefix('{') {
            labelled
                .rsplit_once('}')
                .filter(|(labels, _)| labels.contains(label))
                .map(|(_, v)| v)
        } else if rest.starts_with(' ') && label.is_empty() {
            Some(rest)
        } else {
            None
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// A `kB` line of `/proc/<pid>/status`, in bytes.
fn vm_field_bytes(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line
        .get(field.len()..)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "1234 (ferry (x) y) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1";
        assert_eq!(cpu_from_stat(stat, 100.0), Some(3.0));
        assert_eq!(cpu_from_stat("garbage", 100.0), None);
        let status = "Name:\tferry\nVmHWM:\t   2048 kB\nVmRSS:\t 1024 kB\n";
        assert_eq!(vm_field_bytes(status, "VmHWM:"), Some(2048 * 1024));
        assert_eq!(vm_field_bytes(status, "VmSwap:"), None);
    }

    #[test]
    fn sums_metric_samples() {
        let text = "# HELP ferry_sql_statements_total x\n# TYPE ferry_sql_statements_total counter\n\
                    ferry_sql_statements_total 12\nferry_sql_statements_total_other 5\n\
                    ferry_bulk_requests_total{class=\"2xx\"} 3\nferry_bulk_requests_total{class=\"5xx\"} 1\n";
        assert_eq!(
            metric_sum(text, "ferry_sql_statements_total", ""),
            Some(12.0)
        );
        assert_eq!(metric_sum(text, "ferry_bulk_requests_total", ""), Some(4.0));
        assert_eq!(
            metric_sum(text, "ferry_bulk_requests_total", "class=\"5xx\""),
            Some(1.0)
        );
        assert_eq!(metric_sum(text, "ferry_nothing", ""), None);
    }

    #[test]
    fn our_own_process_is_readable() {
        let pid = std::process::id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        assert!(cpu_from_stat(&stat, clock_ticks()).is_some());
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        assert!(vm_field_bytes(&status, "VmHWM:").is_some_and(|b| b > 0));
    }
}
