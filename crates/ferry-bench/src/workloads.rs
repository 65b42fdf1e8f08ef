//! The workloads. Each one gets a fresh PostgreSQL, sink (a FastSink, or
//! the emptied OpenSearch node) and ferry process, measures one phase, then
//! checks that the index converged.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_testkit::fastsink::{FastSinkStats, ItemOutcome};
use futures_util::StreamExt;
use tokio_postgres::SimpleQueryMessage;

use crate::harness::{FerryCounters, Harness, INDEX};
use crate::opensearch::Node;
use crate::report::{bytes, thousands, Lag, LoadAverage, Outcome};
use crate::{ceiling, relational, selftest, verify};

/// Slots `pg_recvlogical` drains for the streaming ceilings: two runs over
/// the same changes, the faster one counts.
const CEILING_SLOTS: [&str; 2] = ["bench_ceiling_1", "bench_ceiling_2"];
/// Goals the figures are compared with.
const TARGET_BACKFILL_ROWS_S: f64 = 300_000.0;
const TARGET_STREAM_CHANGES_S: f64 = 50_000.0;
const TARGET_LAG_P50_MS: f64 = 50.0;
const TARGET_LAG_P99_MS: f64 = 150.0;
pub(crate) const TARGET_RSS_MIB: f64 = 128.0;
const TARGET_SINK_DOCS_S: f64 = 100_000.0;

/// The narrow table: a key and a few int, text and timestamptz columns.
const NARROW_DDL: &str = "CREATE TABLE items (id bigint PRIMARY KEY, a integer NOT NULL, \
     b integer, label text, note text, created_at timestamptz NOT NULL)";
/// The wide table: about 2 KB of text per row (below the TOAST threshold).
const WIDE_DDL: &str = "CREATE TABLE docs (id bigint PRIMARY KEY, a integer NOT NULL, \
     title text NOT NULL, body text NOT NULL, created_at timestamptz NOT NULL)";

/// A benchmark workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// FastSink alone, driven by a raw HTTP client.
    SinkSelftest,
    /// Initial copy of narrow rows.
    Backfill,
    /// Initial copy of narrow rows while two writers change the table.
    BackfillLive,
    /// Initial copy of ~2 KB rows.
    BackfillWide,
    /// Concurrent writers as fast as possible.
    StreamSimple,
    /// 1,000 changes/s, measuring lag.
    Stream1k,
    /// 5,000 changes/s, measuring lag.
    Stream5k,
    /// Paced at 20,000 changes/s.
    Stream20k,
    /// One transaction of many rows.
    BigTransaction,
    /// Initial copy of relational documents (users with nested orders and
    /// line items, tags, company, order count).
    BackfillNested,
    /// Writers changing child rows of relational documents.
    StreamRelational,
    /// [`Workload::BackfillNested`] without any foreign-key index.
    NestedNofkBackfill,
    /// [`Workload::StreamRelational`] without any foreign-key index.
    NestedNofkStream,
    /// [`Workload::Backfill`] with `engine.backfill_parallelism` 1, then 4,
    /// in the same run; samples `pg_stat_activity` for ferry's longest
    /// snapshot transaction.
    BackfillParallel,
    /// [`Workload::StreamSimple`] through a proxy adding 50 ms to every bulk
    /// request, with `engine.max_in_flight_bulks` 1, then 4.
    StreamInFlight,
    /// `backfill-file`: the narrow backfill into a `file://` log.
    BackfillFile,
    /// Production size, never in a default run: 10,000,000 narrow rows.
    Backfill10m,
    /// Production size: 10,000,000 rows seeded while two writers change them.
    BackfillLive10m,
    /// Production size: 1,000,000 three-level nested documents.
    Nested1m,
    /// Production size: `ferry verify` over a 10,000,000-document index
    /// (needs `--sink opensearch`: FastSink serves no scroll).
    Verify10m,
}

impl Workload {
    /// Every workload, in the order a default run uses.
    /// Production-size workloads: run only when named (not in CI, not by default).
    pub const PRODUCTION: [Workload; 4] = [
        Workload::Backfill10m,
        Workload::BackfillLive10m,
        Workload::Nested1m,
        Workload::Verify10m,
    ];

    pub const ALL: [Workload; 16] = [
        Workload::SinkSelftest,
        Workload::Backfill,
        Workload::BackfillLive,
        Workload::BackfillWide,
        Workload::StreamSimple,
        Workload::Stream1k,
        Workload::Stream5k,
        Workload::Stream20k,
        Workload::BigTransaction,
        Workload::BackfillNested,
        Workload::StreamRelational,
        Workload::NestedNofkBackfill,
        Workload::NestedNofkStream,
        Workload::BackfillParallel,
        Workload::StreamInFlight,
        Workload::BackfillFile,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::SinkSelftest => "sink-selftest",
            Workload::Backfill => "backfill",
            Workload::BackfillLive => "backfill-live",
            Workload::BackfillWide => "backfill-wide",
            Workload::StreamSimple => "stream-simple",
            Workload::Stream1k => "stream-1k",
            Workload::Stream5k => "stream-5k",
            Workload::Stream20k => "stream-20k",
            Workload::BigTransaction => "big-transaction",
            Workload::BackfillNested => "backfill-nested",
            Workload::StreamRelational => "stream-relational",
            Workload::NestedNofkBackfill => "nested-nofk-backfill",
            Workload::NestedNofkStream => "nested-nofk-stream",
            Workload::BackfillParallel => "backfill-parallel",
            Workload::StreamInFlight => "stream-in-flight",
            Workload::BackfillFile => "backfill-file",
            Workload::Backfill10m => "backfill-10m",
            Workload::BackfillLive10m => "backfill-live-10m",
            Workload::Nested1m => "nested-1m",
            Workload::Verify10m => "verify-10m",
        }
    }

    /// The workload called `name`.
    pub fn parse(name: &str) -> Option<Workload> {
        Workload::ALL
            .into_iter()
            .chain(Workload::PRODUCTION)
            .find(|w| w.name() == name)
    }

    /// Whether the workload runs ferry (the self-test does not).
    pub fn needs_ferry(self) -> bool {
        self != Workload::SinkSelftest
    }

    /// Whether the workload runs with `--sink opensearch`. The others need
    /// what only FastSink records (the arrival time of every write, for
    /// lag and coverage) or measure FastSink itself.
    pub fn runs_on_node(self) -> bool {
        matches!(
            self,
            Workload::Backfill
                | Workload::StreamSimple
                | Workload::BackfillNested
                | Workload::NestedNofkBackfill
                | Workload::BackfillParallel
                | Workload::Backfill10m
                | Workload::Nested1m
                | Workload::Verify10m
        )
    }

    fn planned(self, s: &Sizes) -> (u64, &'static str) {
        match self {
            Workload::SinkSelftest => (s.selftest_docs, "docs"),
            Workload::Backfill
            | Workload::BackfillLive
            | Workload::BackfillParallel
            | Workload::BackfillFile => (s.backfill_rows, "rows"),
            Workload::Backfill10m | Workload::BackfillLive10m | Workload::Verify10m => {
                (PRODUCTION_ROWS, "rows")
            }
            Workload::Nested1m => (PRODUCTION_ROOTS, "docs"),
            Workload::StreamInFlight => (s.stream_changes, "changes"),
            Workload::BackfillWide => (s.wide_rows, "rows"),
            Workload::StreamSimple => (s.stream_changes, "changes"),
            Workload::Stream1k => (1_000 * s.rate_seconds, "changes"),
            Workload::Stream5k => (5_000 * s.rate_seconds, "changes"),
            Workload::Stream20k => (20_000 * s.rate_seconds, "changes"),
            Workload::BigTransaction => (s.big_tx_rows, "rows"),
            Workload::BackfillNested | Workload::NestedNofkBackfill => (s.nested_users, "docs"),
            Workload::StreamRelational | Workload::NestedNofkStream => {
                (s.relational_changes, "changes")
            }
        }
    }
}

/// How much each workload moves.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Rows of the narrow backfill.
    pub backfill_rows: u64,
    /// Rows of the wide backfill.
    pub wide_rows: u64,
    /// Changes written by the unpaced writers.
    pub stream_changes: u64,
    /// Seconds of each fixed-rate run.
    pub rate_seconds: u64,
    /// Rows of the big transaction.
    pub big_tx_rows: u64,
    /// Documents of the sink self-test.
    pub selftest_docs: u64,
    /// Users (documents) of the relational backfill.
    pub nested_users: u64,
    /// Users preloaded before the relational stream.
    pub relational_users: u64,
    /// Child-row changes of the relational stream.
    pub relational_changes: u64,
}

impl Sizes {
    /// The default run (about ten minutes on two cores).
    pub fn full() -> Sizes {
        Sizes {
            backfill_rows: 1_000_000,
            wide_rows: 200_000,
            stream_changes: 500_000,
            rate_seconds: 15,
            big_tx_rows: 1_000_000,
            selftest_docs: 1_000_000,
            nested_users: 200_000,
            relational_users: 20_000,
            relational_changes: 300_000,
        }
    }

    /// Small sizes proving everything works end to end.
    pub fn quick() -> Sizes {
        Sizes {
            backfill_rows: 50_000,
            wide_rows: 10_000,
            stream_changes: 50_000,
            rate_seconds: 3,
            big_tx_rows: 50_000,
            selftest_docs: 100_000,
            nested_users: 10_000,
            relational_users: 20_000,
            relational_changes: 20_000,
        }
    }
}

/// What every workload needs to know.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The ferry executable.
    pub ferry_bin: PathBuf,
    /// Workload sizes.
    pub sizes: Sizes,
    /// Where to copy each ferry log and config, if anywhere.
    pub keep_logs: Option<PathBuf>,
    /// The OpenSearch node ferry writes to (`--sink opensearch`); `None`:
    /// a FastSink per workload.
    pub node: Option<Arc<Node>>,
}

/// Runs one workload; failures become a FAIL outcome.
pub async fn run(w: Workload, ctx: &Ctx) -> Outcome {
    let load_start = LoadAverage::now();
    let mut outcome = run_workload(w, ctx).await;
    outcome.load_average = load_start.zip(LoadAverage::now());
    outcome
}

async fn run_workload(w: Workload, ctx: &Ctx) -> Outcome {
    let result = match w {
        Workload::SinkSelftest => selftest::run(ctx.sizes.selftest_docs, TARGET_SINK_DOCS_S).await,
        Workload::Backfill => backfill(ctx, false).await,
        Workload::BackfillLive => backfill_live(ctx).await,
        Workload::BackfillWide => backfill(ctx, true).await,
        Workload::StreamSimple => stream_simple(ctx).await,
        Workload::Stream1k => stream_rate(ctx, w.name(), 1_000).await,
        Workload::Stream5k => stream_rate(ctx, w.name(), 5_000).await,
        Workload::Stream20k => stream_rate(ctx, w.name(), 20_000).await,
        Workload::BigTransaction => big_transaction(ctx).await,
        Workload::BackfillNested | Workload::NestedNofkBackfill => {
            relational::backfill_nested(ctx, w).await
        }
        Workload::StreamRelational | Workload::NestedNofkStream => {
            relational::stream_relational(ctx, w).await
        }
        Workload::BackfillParallel => backfill_parallel(ctx).await,
        Workload::StreamInFlight => stream_in_flight(ctx).await,
        Workload::BackfillFile => backfill_file(ctx).await,
        Workload::Backfill10m => backfill(&production(ctx), false).await,
        Workload::BackfillLive10m => backfill_live(&production(ctx)).await,
        Workload::Nested1m => {
            relational::backfill_nested(&production(ctx), Workload::BackfillNested).await
        }
        Workload::Verify10m => verify_big(&production(ctx)).await,
    };
    result.unwrap_or_else(|e| {
        let (size, unit) = w.planned(&ctx.sizes);
        Outcome::failed(w.name(), size, unit, format!("{e:#}"))
    })
}

/// The columns of narrow row `g`, deterministic in the id.
pub(crate) const NARROW_ROW: &str = "g, (g % 1000)::int, ((g * 7) % 100000)::int, \
     'label-' || (g % 97), md5(g::text), \
     timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second'";

/// `INSERT` of narrow rows `lo..=hi`.
fn insert_narrow(lo: i64, hi: i64) -> String {
    format!(
        "INSERT INTO items SELECT {NARROW_ROW} \
         FROM generate_series({lo}::bigint, {hi}::bigint) g"
    )
}

/// `INSERT` of the narrow rows `ids`.
fn insert_narrow_ids(ids: &[i64]) -> String {
    format!(
        "INSERT INTO items SELECT {NARROW_ROW} FROM unnest({}) g",
        bigint_array(ids)
    )
}

/// A `bigint[]` literal.
fn bigint_array(ids: &[i64]) -> String {
    let items: Vec<String> = ids.iter().map(i64::to_string).collect();
    format!("'{{{}}}'::bigint[]", items.join(","))
}

/// `INSERT` of wide rows `1..=n`: 1,920 characters of body text each.
fn insert_wide(n: u64) -> String {
    format!(
        "INSERT INTO docs SELECT g, (g % 1000)::int, 'title ' || g, repeat(md5(g::text), 60), \
         timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second' \
         FROM generate_series(1, {n}::bigint) g"
    )
}

/// Sum of the rows every statement of a simple query touched.
pub(crate) fn rows_touched(messages: &[SimpleQueryMessage]) -> u64 {
    messages
        .iter()
        .map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => *n,
            _ => 0,
        })
        .sum()
}

/// Generous time limit for moving `units` at no less than `min_rate` per second.
pub(crate) fn limit(units: u64, min_rate: f64) -> Duration {
    Duration::from_secs_f64(60.0 + units as f64 / min_rate)
}

/// ferry's CPU time, its SQL statement counter, its write counters and
/// the sink's counters at one instant.
pub(crate) struct Phase {
    pub(crate) cpu: Option<f64>,
    pub(crate) sql: Option<f64>,
    /// ferry's `/metrics` counters of its bulk writes.
    pub(crate) ferry: Option<FerryCounters>,
    /// FastSink's counters (`None` on the node).
    pub(crate) stats: Option<FastSinkStats>,
    /// The node's write rejections (429) so far (`None` on FastSink).
    pub(crate) rejections: Option<u64>,
}

impl Phase {
    /// The readings now (ferry running).
    pub(crate) async fn read(h: &Harness) -> Phase {
        let cpu = h.ferry().ok().and_then(|f| f.cpu_seconds());
        let stats = h.sink.stats();
        Phase {
            cpu,
            sql: h.metric(SQL_METRIC).await,
            ferry: h.counters().await,
            stats,
            rejections: node_rejections(h).await,
        }
    }

    /// The readings of a ferry that has not been started yet. Its SQL
    /// counter is left out: it covers the streaming worker, not the backfill.
    pub(crate) async fn before_ferry(h: &Harness) -> Phase {
        Phase {
            cpu: Some(0.0),
            sql: None,
            ferry: Some(FerryCounters::default()),
            stats: h.sink.stats(),
            rejections: node_rejections(h).await,
        }
    }
}

async fn node_rejections(h: &Harness) -> Option<u64> {
    h.sink.node()?.write_rejections().await.ok()
}

/// ferry's counter of the SQL statements it issued to build or resolve documents.
const SQL_METRIC: &str = "ferry_sql_statements_total";

/// What the end-of-run convergence check compares the index with.
pub(crate) enum Check<'a> {
    /// Every row of this table, column by column.
    Rows(&'a str),
    /// The relational users index: every live user, compared with the
    /// oracle query for a random sample plus these users.
    Relational(&'a [i32]),
}

/// Derived figures, the convergence check, the end-of-run readings, and
/// stopping ferry.
pub(crate) async fn finish(
    h: &mut Harness,
    o: &mut Outcome,
    check: Check<'_>,
    start: &Phase,
    end: &Phase,
) {
    let units = o.size.max(1) as f64;
    if let (Some(a), Some(b)) = (start.cpu, end.cpu) {
        o.cpu_s_per_100k = Some((b - a) * 100_000.0 / units);
    }
    if let (Some(a), Some(b)) = (start.sql, end.sql) {
        o.sql_per_1k = Some((b - a) * 1000.0 / units);
    }
    if let (Some(a), Some(b)) = (&start.stats, &end.stats) {
        let st = b.since(a);
        o.bulk_per_1k = Some(st.bulk_requests as f64 * 1000.0 / units);
        o.notes.push(format!(
            "ferry sent {} bulk requests, {} items, {:.1} MiB",
            st.bulk_requests,
            st.bulk_items,
            st.bytes_received as f64 / (1024.0 * 1024.0)
        ));
        if st.bulk_conflicts > 0 {
            o.notes.push(format!(
                "{} bulk items were refused as older than the stored version (409)",
                st.bulk_conflicts
            ));
        }
        if st.bulk_errors > 0 {
            o.notes.push(format!(
                "{} bulk items were rejected by the sink",
                st.bulk_errors
            ));
        }
    } else if let (Some(a), Some(b)) = (&start.ferry, &end.ferry) {
        let c = b.since(a);
        // The backfill's requests are not counted there: one per
        // engine.backfill_batch_rows (5,000) rows.
        if c.bulk_requests > 0.0 {
            o.bulk_per_1k = Some(c.bulk_requests * 1000.0 / units);
        }
        o.notes.push(format!(
            "ferry's /metrics (its streaming worker's writes): {} bulk requests ({} failed), {} retries, \
             {} writes superseded (409), {} rejected",
            c.bulk_requests, c.bulk_failed, c.retries, c.superseded, c.rejected
        ));
    }
    if let Some(node) = h.sink.node() {
        if let (Some(a), Some(b)) = (start.rejections, end.rejections) {
            if b > a {
                o.notes.push(format!(
                    "the node's write thread pool rejected {} bulk shard requests (429) during the run",
                    b - a
                ));
            }
        }
        match node.index_stats(INDEX).await {
            Ok(f) => {
                let health = node
                    .health(INDEX)
                    .await
                    .unwrap_or_else(|e| format!("{e:#}"));
                o.notes.push(format!(
                    "ferry's index on the node ({health}): {}",
                    f.describe()
                ));
            }
            Err(e) => o.notes.push(format!("ferry's index stats: {e:#}")),
        }
    }
    let verdict = match check {
        Check::Rows(table) => verify::converged(h, table, Duration::from_secs(60)).await,
        Check::Relational(focus) => relational::converged(h, focus, Duration::from_secs(60)).await,
    };
    match verdict {
        Ok(summary) => {
            o.ok = true;
            o.check = format!("converged: {summary}");
        }
        Err(why) => {
            o.ok = false;
            o.check = format!("FAIL: {why}");
        }
    }
    o.wal_retained_bytes = h.retained_wal().await.ok().flatten();
    if let Ok(Some(unconfirmed)) = h.unconfirmed_wal().await {
        o.notes.push(format!(
            "slot at the end: restart_lsn holds {} of WAL (PostgreSQL moves it at running-xacts records), \
             ferry's confirmed_flush_lsn is {} behind the WAL end",
            bytes(o.wal_retained_bytes.unwrap_or(0)),
            bytes(unconfirmed)
        ));
    }
    o.peak_rss_mib = h
        .ferry()
        .ok()
        .and_then(|f| f.peak_rss_bytes())
        .map(|b| b as f64 / (1024.0 * 1024.0));
    if let Err(e) = h.check_alive("the end of the workload") {
        o.ok = false;
        o.check = format!("FAIL: {e:#}");
    }
    match h.stop_ferry() {
        Some(status) if status.success() => {}
        Some(status) => o
            .notes
            .push(format!("ferry exited with {status} after SIGTERM")),
        None => o
            .notes
            .push("ferry did not stop within 30 s of SIGTERM and was killed".to_owned()),
    }
}

/// Drains `COPY … TO STDOUT` and returns how long it took and the bytes read.
pub(crate) async fn copy_out(db: &tokio_postgres::Client, sql: &str) -> Result<(Duration, u64)> {
    let started = Instant::now();
    let stream = db.copy_out(sql).await?;
    futures_util::pin_mut!(stream);
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        bytes += chunk?.len() as u64;
    }
    Ok((started.elapsed(), bytes))
}

async fn backfill(ctx: &Ctx, wide: bool) -> Result<Outcome> {
    let name = if wide { "backfill-wide" } else { "backfill" };
    let n = if wide {
        ctx.sizes.wide_rows
    } else {
        ctx.sizes.backfill_rows
    };
    let (table, ddl, load, cols) = if wide {
        (
            "docs",
            WIDE_DDL,
            insert_wide(n),
            "id, a, title, body, created_at",
        )
    } else {
        (
            "items",
            NARROW_DDL,
            insert_narrow(1, n as i64),
            "id, a, b, label, note, created_at",
        )
    };
    let mut o = Outcome::new(name, n, "rows");
    let mut h = Harness::start(ctx, name).await?;

    let loading = Instant::now();
    h.db.batch_execute(ddl).await?;
    h.db.batch_execute(&load).await?;
    h.db.batch_execute(&format!("VACUUM (ANALYZE) {table}"))
        .await?;
    let size: String =
        h.db.query_one(
            &format!("SELECT pg_size_pretty(pg_table_size('{table}'))"),
            &[],
        )
        .await?
        .get(0);
    o.notes.push(format!(
        "loading the table ({size}) took {:.1} s before ferry started",
        loading.elapsed().as_secs_f64()
    ));

    let (copy_time, copy_bytes) = copy_out(
        &h.db,
        &format!("COPY (SELECT {cols} FROM {table}) TO STDOUT"),
    )
    .await?;
    o.ceiling = Some(n as f64 / copy_time.as_secs_f64());
    o.ceiling_method = Some(format!(
        "COPY (SELECT …) TO STDOUT of the same table into nothing: {:.2} s, {:.1} MiB",
        copy_time.as_secs_f64(),
        copy_bytes as f64 / (1024.0 * 1024.0)
    ));

    let start = Phase::before_ferry(&h).await;
    let t0 = h.start_ferry(table)?;
    let t1 = h.wait_count(n as usize, limit(n, 5_000.0)).await?;
    let end = Phase::read(&h).await;
    let secs = (t1 - t0).as_secs_f64();
    o.seconds = Some(secs);
    o.rate = Some(n as f64 / secs);
    o.notes
        .push("measured from spawning ferry (slot creation and index set-up included)".into());
    if h.sink.node().is_some() {
        o.notes.push(
            "on the node, completion = the index's _count (polled every 100 ms, no forced refresh) shows every row: \
             ferry pauses refreshes while it seeds and refreshes once at the end"
                .to_owned(),
        );
    }
    finish(&mut h, &mut o, Check::Rows(table), &start, &end).await;
    if h.sink.node().is_some() {
        ceiling::backfill(&h, &mut o).await;
    }
    if !wide {
        o.target_rate(TARGET_BACKFILL_ROWS_S);
    }
    o.target_rss(TARGET_RSS_MIB);
    Ok(o)
}

/// `backfill-file`: the narrow backfill into a `file://` log instead of a
/// cluster (every request appended and fsynced), against the same COPY
/// ceiling as `backfill`. Complete = the log's state file records the
/// copy's seeded position, which ferry writes only after every request of
/// the copy is fsynced; the log must then hold every row's id once.
async fn backfill_file(ctx: &Ctx) -> Result<Outcome> {
    let name = "backfill-file";
    let n = ctx.sizes.backfill_rows;
    let mut o = Outcome::new(name, n, "rows");
    let mut h = Harness::start(ctx, name).await?;
    load_narrow(&h.db, n).await?;
    let (copy_time, _) = copy_out(&h.db, NARROW_COPY).await?;
    o.ceiling = Some(n as f64 / copy_time.as_secs_f64());
    o.ceiling_method = Some(format!(
        "COPY (SELECT …) TO STDOUT of the same table into nothing: {:.2} s",
        copy_time.as_secs_f64()
    ));
    let log = h.dir().join("items.ndjson");
    h.set_sink_url(&format!("file://{}", log.display()));
    let t0 = h.start_ferry("items")?;
    let mut state = log.as_os_str().to_owned();
    state.push(".ferry.json");
    let state = std::path::PathBuf::from(state);
    let deadline = t0 + limit(n, 5_000.0);
    let t1 = loop {
        let seeded = std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| {
                let served = v["aliases"][INDEX].as_str().unwrap_or_default();
                v["indexes"][served]["meta"]["seeded_lsn"].is_string()
            });
        if seeded {
            break Instant::now();
        }
        h.check_alive("the copy into the log")?;
        if Instant::now() > deadline {
            bail!(
                "timed out waiting for the copy into the log\n{}",
                h.log_excerpt()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let secs = (t1 - t0).as_secs_f64();
    o.seconds = Some(secs);
    o.rate = Some(n as f64 / secs);
    o.peak_rss_mib = h
        .ferry()
        .ok()
        .and_then(|f| f.peak_rss_bytes())
        .map(|b| b as f64 / (1024.0 * 1024.0));
    h.stop_ferry();
    let text = std::fs::read_to_string(&log)?;
    let mut ids = std::collections::HashSet::new();
    let mut actions = 0u64;
    for line in text
        .lines()
        .filter(|l| l.starts_with("{\"index\":{\"_index\""))
    {
        let v: serde_json::Value = serde_json::from_str(line)?;
        ids.insert(v["index"]["_id"].as_str().unwrap_or_default().to_owned());
        actions += 1;
    }
    if ids.len() as u64 != n {
        bail!("the log holds {} distinct ids of {n} rows", ids.len());
    }
    o.ok = true;
    o.check = format!("complete: the log holds every one of the {n} rows");
    o.notes.push(format!(
        "measured from spawning ferry; the log holds {actions} index actions ({:.1} MiB)",
        text.len() as f64 / (1024.0 * 1024.0)
    ));
    o.target_rss(TARGET_RSS_MIB);
    Ok(o)
}

/// The narrow table read whole, as the ceiling of its copies measures it.
const NARROW_COPY: &str = "COPY (SELECT id, a, b, label, note, created_at FROM items) TO STDOUT";

/// Creates the narrow `items` table with rows 1..=`n`, analyzed.
async fn load_narrow(db: &tokio_postgres::Client, n: u64) -> Result<()> {
    db.batch_execute(NARROW_DDL).await?;
    db.batch_execute(&insert_narrow(1, n as i64)).await?;
    db.batch_execute("VACUUM (ANALYZE) items").await?;
    Ok(())
}

/// Writers changing the table while `backfill-live` copies it.
const LIVE_WRITERS: i64 = 2;
/// Rows a live writer's transaction updates, deletes and inserts.
const LIVE_UPDATES: usize = 50;
const LIVE_DELETES: usize = 20;
const LIVE_INSERTS: usize = 30;
/// At most this many rows updated by the writers are compared with their
/// documents at the end (on top of the convergence check's random sample).
const LIVE_UPDATE_SAMPLE: usize = 2_000;
/// The log line ferry's engine writes when a table's copy is complete.
const BACKFILL_FINISHED: &str = "backfill finished";

/// A small deterministic generator (splitmix64) for the writers' choices.
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-enough in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The `k`-th id live writer `w` owns: `LIVE_WRITERS * k + w + 1`. Writers
/// own disjoint ids, so they never wait for (or deadlock on) each other.
fn live_id(w: i64, k: i64) -> i64 {
    LIVE_WRITERS * k + w + 1
}

/// The first `k` whose id (for writer `w`) lies above the `n` preloaded rows.
fn first_new_k(w: i64, n: i64) -> i64 {
    (n - w - 1).div_euclid(LIVE_WRITERS) + 1
}

/// What one live writer did.
#[derive(Debug, Default)]
struct LiveLog {
    /// Commit time and rows changed, per transaction.
    commits: Vec<(Instant, u64)>,
    /// Ids an UPDATE changed (a row may appear more than once).
    updated: Vec<i64>,
    /// Ids a DELETE removed (ids are never inserted again).
    deleted: Vec<i64>,
}

/// Live writer `w`: until `stop`, transactions of [`LIVE_UPDATES`] updates
/// and [`LIVE_DELETES`] deletes of random ids it owns (preloaded or its
/// own earlier inserts; an id already deleted changes nothing) and
/// [`LIVE_INSERTS`] inserts of new ids.
async fn live_writer(
    db: tokio_postgres::Client,
    w: i64,
    n: i64,
    stop: Arc<AtomicBool>,
) -> Result<LiveLog> {
    let mut rng = SplitMix(0xFE44_0000 + w as u64);
    let mut next_k = first_new_k(w, n);
    let mut log = LiveLog::default();
    while !stop.load(Ordering::Acquire) {
        let mut pick = |count: usize| -> Vec<i64> {
            (0..count)
                .map(|_| live_id(w, rng.below(next_k as u64) as i64))
                .collect()
        };
        let updates = pick(LIVE_UPDATES);
        let deletes = pick(LIVE_DELETES);
        let inserts: Vec<i64> = (next_k..next_k + LIVE_INSERTS as i64)
            .map(|k| live_id(w, k))
            .collect();
        next_k += LIVE_INSERTS as i64;
        let sql = format!(
            "BEGIN; \
             UPDATE items SET b = b + 1, note = 'live ' || id, created_at = created_at + interval '1 minute' \
             WHERE id = ANY({}) RETURNING id; \
             DELETE FROM items WHERE id = ANY({}) RETURNING id; \
             {}; COMMIT;",
            bigint_array(&updates),
            bigint_array(&deletes),
            insert_narrow_ids(&inserts)
        );
        let messages = db.simple_query(&sql).await?;
        let committed = Instant::now();
        // One CommandComplete per statement: BEGIN, UPDATE, DELETE, INSERT, COMMIT.
        let mut statement = 0;
        for m in &messages {
            match m {
                SimpleQueryMessage::CommandComplete(_) => statement += 1,
                SimpleQueryMessage::Row(row) => {
                    let id: i64 = row
                        .get(0)
                        .context("a RETURNING row without an id")?
                        .parse()
                        .context("a RETURNING id that is not a number")?;
                    match statement {
                        1 => log.updated.push(id),
                        2 => log.deleted.push(id),
                        _ => bail!("an unexpected row from statement {statement}"),
                    }
                }
                _ => {}
            }
        }
        log.commits.push((committed, rows_touched(&messages)));
    }
    Ok(log)
}

/// Sets the flag when dropped: writers stop on every way out.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Watches every bulk item for the preloaded ids `1..=n`: counts in
/// `covered` the ids that got an accepted write (document, delete) or a
/// 409 (the sink already holds something newer), and records in `complete`
/// when the request that covered the last one arrived.
fn coverage_collector(
    arrivals: std::sync::mpsc::Receiver<ferry_testkit::fastsink::BulkArrival>,
    n: u64,
    covered: Arc<AtomicU64>,
    complete: Arc<OnceLock<Instant>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut seen = vec![false; n as usize + 1];
        let mut count = 0u64;
        loop {
            match arrivals.recv_timeout(Duration::from_millis(50)) {
                Ok(bulk) => {
                    for item in bulk.items {
                        if matches!(item.outcome, ItemOutcome::Rejected(_)) {
                            continue;
                        }
                        let Ok(id) = item.id.parse::<u64>() else {
                            continue;
                        };
                        if (1..=n).contains(&id) && !seen[id as usize] {
                            seen[id as usize] = true;
                            count += 1;
                            if count == n {
                                let _ = complete.set(bulk.received);
                            }
                        }
                    }
                    covered.store(count, Ordering::Release);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    })
}

/// The first line of `log` containing `needle`, from the needle on.
fn log_line(log: &str, needle: &str) -> Option<String> {
    log.lines()
        .find_map(|l| l.find(needle).map(|at| l[at..].trim_end().to_owned()))
}

/// `backfill-live`: ferry copies the preloaded narrow table while two
/// writers update, delete and insert rows; they stop once every preloaded
/// id has reached the sink, then the index must converge to the table.
async fn backfill_live(ctx: &Ctx) -> Result<Outcome> {
    let name = Workload::BackfillLive.name();
    let n = ctx.sizes.backfill_rows;
    let mut o = Outcome::new(name, n, "rows");
    let mut h = Harness::start(ctx, name).await?;
    // The engine's backfill logs its start, progress and end at info.
    h.set_log_filter("warn,ferry_engine::backfill=info");

    let loading = Instant::now();
    load_narrow(&h.db, n).await?;
    o.notes.push(format!(
        "loading the table took {:.1} s before ferry started",
        loading.elapsed().as_secs_f64()
    ));
    let (copy_time, copy_bytes) = copy_out(&h.db, NARROW_COPY).await?;
    o.ceiling = Some(n as f64 / copy_time.as_secs_f64());
    o.ceiling_method = Some(format!(
        "COPY (SELECT …) TO STDOUT of the same table into nothing, without the writers: {:.2} s, {:.1} MiB",
        copy_time.as_secs_f64(),
        copy_bytes as f64 / (1024.0 * 1024.0)
    ));
    let mut clients = Vec::new();
    for _ in 0..LIVE_WRITERS {
        clients.push(h.connect().await?);
    }

    let covered = Arc::new(AtomicU64::new(0));
    let complete = Arc::new(OnceLock::new());
    let stop_collector = Arc::new(AtomicBool::new(false));
    let _stop_collector_on_exit = StopOnDrop(Arc::clone(&stop_collector));
    let collector = coverage_collector(
        h.sink.fast()?.subscribe(),
        n,
        Arc::clone(&covered),
        Arc::clone(&complete),
        Arc::clone(&stop_collector),
    );

    let start = Phase::before_ferry(&h).await;
    let t0 = h.start_ferry("items")?;
    // The first document proves the copy's snapshot exists: every change
    // committed from now on reaches ferry through the stream.
    h.wait_sink(
        "the first backfilled document",
        Duration::from_secs(120),
        |s, slice| {
            let until = Instant::now() + slice;
            loop {
                if s.doc_count(INDEX) > 0 {
                    return true;
                }
                if Instant::now() >= until {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        },
    )
    .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_exit = StopOnDrop(Arc::clone(&stop));
    let writers_started = Instant::now();
    let docs_at_start = h.sink.fast()?.doc_count(INDEX);
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(w, db)| tokio::spawn(live_writer(db, w as i64, n as i64, Arc::clone(&stop))))
        .collect();

    // Until every preloaded id has arrived (or, failing that, until ferry
    // has said its copy is done and a grace period has passed).
    let deadline = Instant::now() + limit(n, 2_000.0);
    let mut finished: Option<(Instant, String)> = None;
    let mut log_read = Instant::now();
    let covered_at = loop {
        if let Some(at) = complete.get() {
            break Some(*at);
        }
        if finished.is_none() && log_read.elapsed() >= Duration::from_millis(100) {
            log_read = Instant::now();
            finished = log_line(&h.log_text(), BACKFILL_FINISHED).map(|l| (Instant::now(), l));
        }
        if finished
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() >= Duration::from_secs(30))
        {
            break None;
        }
        h.check_alive("the backfill to cover every preloaded row")?;
        if Instant::now() >= deadline {
            bail!(
                "timed out after {:.0} s: {} of {n} preloaded ids reached the sink, which holds {} documents\n{}",
                limit(n, 2_000.0).as_secs_f64(),
                covered.load(Ordering::Acquire),
                h.sink.fast()?.doc_count(INDEX),
                h.log_excerpt()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    stop.store(true, Ordering::Release);
    let mut logs = Vec::new();
    for t in tasks {
        logs.push(t.await.context("joining a writer")??);
    }
    let writers_stopped = Instant::now();

    // Rows the writers changed reach the sink through the stream ahead of
    // the copy, so the copy's last batch may still be on its way: wait for
    // ferry's own end-of-copy line before checking anything.
    let finish_deadline = Instant::now() + Duration::from_secs(60);
    while finished.is_none() {
        finished = log_line(&h.log_text(), BACKFILL_FINISHED).map(|l| (Instant::now(), l));
        if finished.is_some() || Instant::now() >= finish_deadline {
            break;
        }
        h.check_alive("ferry to log the end of the backfill")?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    h.db.batch_execute(&insert_narrow(0, 0)).await?;
    h.wait_doc("0", Duration::from_secs(120)).await?;
    let end = Phase::read(&h).await;
    stop_collector.store(true, Ordering::Release);
    collector
        .join()
        .map_err(|_| anyhow::anyhow!("the coverage collector panicked"))?;
    let covered_ids = covered.load(Ordering::Acquire);

    // The figures.
    let done = covered_at.or(finished.as_ref().map(|(at, _)| *at));
    if let Some(done) = done {
        let secs = (done - t0).as_secs_f64();
        o.seconds = Some(secs);
        o.rate = Some(n as f64 / secs);
    }
    let cutoff = done.unwrap_or(writers_stopped);
    let mut txs_during = 0u64;
    let mut changes_during = 0u64;
    let mut changes_after = 0u64;
    for (at, changes) in logs.iter().flat_map(|l| l.commits.iter()) {
        if *at <= cutoff {
            txs_during += 1;
            changes_during += changes;
        } else {
            changes_after += changes;
        }
    }
    let window = cutoff
        .saturating_duration_since(writers_started)
        .as_secs_f64();
    o.notes.push(format!(
        "rate = preloaded rows / time from spawning ferry until the sink had received a write \
         (document, delete, or a copy refused as older) for every preloaded id{}",
        if covered_at.is_some() {
            String::new()
        } else {
            format!(
                " — NOT reached ({covered_ids} of {n} ids); the time of ferry's \"{BACKFILL_FINISHED}\" line is used"
            )
        }
    ));
    o.notes.push(format!(
        "{LIVE_WRITERS} writers started {:.2} s after ferry was spawned (first copied document in the sink, {} then) \
         and committed {} changes in {} transactions during the backfill ({} changes/s over {:.2} s; \
         each transaction {LIVE_UPDATES} updates and {LIVE_DELETES} deletes of random existing ids, \
         {LIVE_INSERTS} inserts of new ids), {} more before they stopped",
        (writers_started - t0).as_secs_f64(),
        docs_at_start,
        thousands(changes_during as f64),
        thousands(txs_during as f64),
        thousands(changes_during as f64 / window.max(1e-3)),
        window,
        thousands(changes_after as f64)
    ));
    match &finished {
        Some((at, line)) => o.notes.push(format!(
            "ferry logged \"{line}\", seen {:.2} s after spawning",
            (*at - t0).as_secs_f64()
        )),
        None => o.notes.push(format!(
            "ferry never logged \"{BACKFILL_FINISHED}\" (waited 60 s after the writers stopped)"
        )),
    }

    // Targeted checks: deleted rows stay deleted, updated rows carry their
    // last update, on top of the convergence check below.
    let deleted: std::collections::HashSet<i64> = logs
        .iter()
        .flat_map(|l| l.deleted.iter().copied())
        .collect();
    let back: Vec<i64> = {
        let fast = h.sink.fast()?;
        let mut v: Vec<i64> = deleted
            .iter()
            .copied()
            .filter(|id| fast.get(INDEX, &id.to_string()).is_some())
            .collect();
        v.sort_unstable();
        v
    };
    let mut updated: Vec<i64> = logs
        .iter()
        .flat_map(|l| l.updated.iter().copied())
        .filter(|id| !deleted.contains(id))
        .collect();
    updated.sort_unstable();
    updated.dedup();
    let mut rng = SplitMix(0xC0FF_EE00);
    let mut sample: Vec<i64> = if updated.len() <= LIVE_UPDATE_SAMPLE {
        updated.clone()
    } else {
        (0..LIVE_UPDATE_SAMPLE)
            .map(|_| updated[rng.below(updated.len() as u64) as usize])
            .collect()
    };
    sample.sort_unstable();
    sample.dedup();
    let mut problems = Vec::new();
    if covered_at.is_none() {
        problems.push(format!(
            "{} of {n} preloaded ids never reached the sink in any write",
            n - covered_ids
        ));
    }
    if !back.is_empty() {
        problems.push(format!(
            "{} of {} rows deleted by the writers are documents again (first 5: {:?})",
            back.len(),
            deleted.len(),
            &back[..back.len().min(5)]
        ));
    }
    match verify::documents_equal_rows(&h, "items", &sample).await {
        Ok(()) => o.notes.push(format!(
            "all {} rows deleted by the writers are absent from the index; {} of the {} rows they updated \
             (and did not delete) equal their documents",
            thousands(deleted.len() as f64),
            thousands(sample.len() as f64),
            thousands(updated.len() as f64)
        )),
        Err(why) => problems.push(format!("a row updated by the writers: {why}")),
    }

    o.notes.push(
        "CPU s/100k and bulk/1k are per preloaded row but include streaming the writers' changes"
            .to_owned(),
    );
    finish(&mut h, &mut o, Check::Rows("items"), &start, &end).await;
    if !problems.is_empty() {
        let convergence = std::mem::take(&mut o.check);
        o.ok = false;
        o.check = format!(
            "FAIL: {}; convergence check: {convergence}",
            problems.join("; ")
        );
    }
    o.target_rss(TARGET_RSS_MIB);
    Ok(o)
}

/// Starts ferry on the empty narrow table and waits until a change streams through.
async fn ferry_streaming(ctx: &Ctx, name: &str, preload: u64) -> Result<Harness> {
    let mut h = Harness::start(ctx, name).await?;
    h.db.batch_execute(NARROW_DDL).await?;
    if preload > 0 {
        h.db.batch_execute(&insert_narrow(1, preload as i64))
            .await?;
        h.db.batch_execute("VACUUM (ANALYZE) items").await?;
    }
    h.start_ferry("items")?;
    h.wait_count(preload as usize, limit(preload, 5_000.0))
        .await?;
    h.probe_stream("items", &insert_narrow(-1, -1)).await?;
    Ok(h)
}

/// Creates the ceiling slots; changes from now on are in the ceiling.
async fn create_ceiling_slots(h: &Harness) -> Result<()> {
    for slot in CEILING_SLOTS {
        h.create_ceiling_slot(slot).await?;
    }
    Ok(())
}

/// Drains every ceiling slot with `pg_recvlogical` up to the current end of
/// WAL and records the best resulting rate.
async fn stream_ceiling(h: &Harness, o: &mut Outcome, changes: u64) -> Result<()> {
    let end_lsn = h.mark_end().await?;
    let mut runs = Vec::new();
    for slot in CEILING_SLOTS {
        runs.push(h.recvlogical(slot, &end_lsn).await?.as_secs_f64());
    }
    let best = runs.iter().copied().fold(f64::INFINITY, f64::min);
    o.ceiling = Some(changes as f64 / best);
    let shown: Vec<String> = runs.iter().map(|r| format!("{r:.2} s")).collect();
    o.ceiling_method = Some(format!(
        "pg_recvlogical (pgoutput, proto_version=1) draining the same changes from fresh slots into /dev/null, best of {}: {}",
        runs.len(),
        shown.join(", ")
    ));
    Ok(())
}

/// Writers of the unpaced stream (`stream-simple`).
pub(crate) const UNPACED_WRITERS: i64 = 4;
/// Changes per transaction of the unpaced stream.
const UNPACED_PER_TX: u64 = 100;

/// The rows transaction `k` of unpaced writer `w` changes: it inserts 60
/// new rows, then updates 30 and deletes 10 of those its previous
/// transaction inserted (none in its first transaction).
pub(crate) struct UnpacedTx {
    /// Ids inserted.
    pub(crate) inserted: RangeInclusive<i64>,
    /// Ids updated (`b + 1`, note, `created_at + 1 hour`).
    pub(crate) updated: RangeInclusive<i64>,
    /// Ids deleted.
    pub(crate) deleted: RangeInclusive<i64>,
}

/// Transaction `k` of unpaced writer `w`.
pub(crate) fn unpaced_tx(w: i64, k: i64) -> UnpacedTx {
    let lo = w * 1_000_000_000 + 60 * k + 1;
    let p = lo - 60;
    #[allow(clippy::reversed_empty_ranges)]
    let (updated, deleted) = if k > 0 {
        (p..=p + 29, p + 30..=p + 39)
    } else {
        (1..=0, 1..=0)
    };
    UnpacedTx {
        inserted: lo..=lo + 59,
        updated,
        deleted,
    }
}

/// Writer `w` of the unpaced stream: `txs` transactions (see [`unpaced_tx`]).
async fn unpaced_writer(db: tokio_postgres::Client, w: i64, txs: i64) -> Result<u64> {
    let mut changes = 0;
    for k in 0..txs {
        let tx = unpaced_tx(w, k);
        let mut sql = format!(
            "BEGIN; {}; ",
            insert_narrow(*tx.inserted.start(), *tx.inserted.end())
        );
        if !tx.updated.is_empty() {
            sql.push_str(&format!(
                "UPDATE items SET b = b + 1, note = 'u' || id, created_at = created_at + interval '1 hour' \
                 WHERE id BETWEEN {} AND {}; DELETE FROM items WHERE id BETWEEN {} AND {}; ",
                tx.updated.start(),
                tx.updated.end(),
                tx.deleted.start(),
                tx.deleted.end()
            ));
        }
        sql.push_str("COMMIT;");
        changes += rows_touched(&db.simple_query(&sql).await?);
    }
    Ok(changes)
}

async fn stream_simple(ctx: &Ctx) -> Result<Outcome> {
    const WRITERS: i64 = UNPACED_WRITERS;
    const PER_TX: u64 = UNPACED_PER_TX;
    let name = Workload::StreamSimple.name();
    let planned = ctx.sizes.stream_changes;
    let mut h = ferry_streaming(ctx, name, 0).await?;
    create_ceiling_slots(&h).await?;

    let txs = planned.div_ceil(WRITERS as u64 * PER_TX) as i64;
    let (start, t0, written) = unpaced_writers(&h, txs).await?;
    let writers_done = t0.elapsed();
    h.db.batch_execute(&insert_narrow(0, 0)).await?;
    let changes = written + 1;
    let seen = h.wait_doc("0", limit(changes, 2_000.0)).await?;
    let arrived = h.sink.last_write(INDEX, "0").unwrap_or(seen);
    let end = Phase::read(&h).await;

    let mut o = Outcome::new(name, changes, "changes");
    let secs = (arrived - t0).as_secs_f64();
    o.seconds = Some(secs);
    o.rate = Some(changes as f64 / secs);
    o.notes.push(format!(
        "{WRITERS} writers, {PER_TX} changes per transaction (60 inserts, 30 updates, 10 deletes); \
         PostgreSQL absorbed them in {:.2} s ({} changes/s); completion = arrival of a sentinel row committed last",
        writers_done.as_secs_f64(),
        thousands(written as f64 / writers_done.as_secs_f64())
    ));
    if h.sink.node().is_some() {
        o.notes.push(
            "on the node, arrival = first real-time GET (polled every 10 ms) that finds the sentinel".to_owned(),
        );
    }
    stream_ceiling(&h, &mut o, changes).await?;
    finish(&mut h, &mut o, Check::Rows("items"), &start, &end).await;
    if h.sink.node().is_some() {
        ceiling::stream_simple(&h, &mut o, txs).await;
    }
    o.target_rate(TARGET_STREAM_CHANGES_S);
    o.target_rss(TARGET_RSS_MIB);
    Ok(o)
}

/// Runs [`UNPACED_WRITERS`] unpaced writers of `txs` transactions each to
/// the end: the readings at their start, their start time and the changes
/// they made.
async fn unpaced_writers(h: &Harness, txs: i64) -> Result<(Phase, Instant, u64)> {
    let mut clients = Vec::new();
    for _ in 0..UNPACED_WRITERS {
        clients.push(h.connect().await?);
    }
    let start = Phase::read(h).await;
    let t0 = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(w, db)| tokio::spawn(unpaced_writer(db, w as i64, txs)))
        .collect();
    let mut written = 0u64;
    for t in tasks {
        written += t.await.context("joining a writer")??;
    }
    Ok((start, t0, written))
}

/// Ids a paced transaction `k` changes, given the preloaded row count `p`:
/// five inserts above `p`, four updates counting up from 1, one delete
/// counting down from `p`. No id is changed by two transactions.
fn paced_ids(k: i64, p: i64) -> [i64; 10] {
    let i = p + 5 * k;
    let u = 4 * k;
    [
        i + 1,
        i + 2,
        i + 3,
        i + 4,
        i + 5,
        u + 1,
        u + 2,
        u + 3,
        u + 4,
        p - k,
    ]
}

/// One paced writer: transactions `first, first + step, …` below `count`,
/// each started at `t0 + k * period`. Returns (k, commit time) and the
/// changes made.
async fn paced_writer(
    db: tokio_postgres::Client,
    first: i64,
    step: usize,
    count: i64,
    p: i64,
    t0: Instant,
    period: Duration,
) -> Result<(Vec<(i64, Instant)>, u64)> {
    let mut commits = Vec::new();
    let mut changes = 0;
    for k in (first..count).step_by(step) {
        let due = t0 + period.mul_f64(k as f64);
        tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        let ids = paced_ids(k, p);
        let sql = format!(
            "BEGIN; {}; UPDATE items SET b = b + 1, note = 'r' || id WHERE id BETWEEN {} AND {}; \
             DELETE FROM items WHERE id = {}; COMMIT;",
            insert_narrow(ids[0], ids[4]),
            ids[5],
            ids[8],
            ids[9]
        );
        changes += rows_touched(&db.simple_query(&sql).await?);
        commits.push((k, Instant::now()));
    }
    Ok((commits, changes))
}

async fn stream_rate(ctx: &Ctx, name: &str, rate: u64) -> Result<Outcome> {
    const PER_TX: u64 = 10;
    const WRITERS: usize = 2;
    let seconds = ctx.sizes.rate_seconds;
    let tx_count = (rate * seconds / PER_TX) as i64;
    let preload = (5 * tx_count + 1_000).max(50_000);
    let mut h = ferry_streaming(ctx, name, preload as u64).await?;

    // First arrival of every id from now on.
    let arrivals = h.sink.fast()?.subscribe();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_collector = Arc::clone(&stop);
    let collector = std::thread::spawn(move || {
        let mut first: HashMap<String, Instant> = HashMap::new();
        loop {
            match arrivals.recv_timeout(Duration::from_millis(50)) {
                Ok(bulk) => {
                    for item in bulk.items {
                        first.entry(item.id).or_insert(bulk.received);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if stop_collector.load(Ordering::Acquire) {
                        break;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        first
    });

    let mut clients = Vec::new();
    for _ in 0..WRITERS {
        clients.push(h.connect().await?);
    }
    let period = Duration::from_secs_f64(PER_TX as f64 / rate as f64);
    let start = Phase::read(&h).await;
    let t0 = Instant::now() + Duration::from_millis(20);
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(j, db)| {
            tokio::spawn(paced_writer(
                db, j as i64, WRITERS, tx_count, preload, t0, period,
            ))
        })
        .collect();
    let mut commits = Vec::new();
    let mut changes = 0u64;
    for t in tasks {
        let (c, n) = t.await.context("joining a writer")??;
        commits.extend(c);
        changes += n;
    }
    let last_commit = commits.iter().map(|(_, t)| *t).max().unwrap_or(t0);
    h.db.batch_execute(&insert_narrow(0, 0)).await?;
    h.wait_doc("0", Duration::from_secs(120)).await?;
    let end = Phase::read(&h).await;
    stop.store(true, Ordering::Release);
    let first = collector
        .join()
        .map_err(|_| anyhow::anyhow!("the arrival collector panicked"))?;

    let mut lags = Vec::with_capacity(commits.len() * PER_TX as usize);
    let mut unseen = 0usize;
    for (k, committed) in &commits {
        for id in paced_ids(*k, preload) {
            match first.get(&id.to_string()) {
                Some(at) => lags.push(at.saturating_duration_since(*committed).as_secs_f64() * 1e3),
                None => unseen += 1,
            }
        }
    }
    let mut o = Outcome::new(name, changes, "changes");
    let secs = (last_commit - t0).as_secs_f64().max(1e-3);
    o.seconds = Some(secs);
    o.rate = Some(changes as f64 / secs);
    o.lag_ms = Lag::from_ms(lags);
    o.notes.push(format!(
        "paced at {} changes/s for {seconds} s: {} transactions of {PER_TX} changes (5 inserts, 4 updates, 1 delete) over {WRITERS} connections, {preload} rows preloaded; lag = first arrival at the sink - return of COMMIT",
        thousands(rate as f64),
        tx_count
    ));
    if unseen > 0 {
        o.notes.push(format!(
            "{unseen} changes never arrived as a write of their own"
        ));
    }
    finish(&mut h, &mut o, Check::Rows("items"), &start, &end).await;
    if unseen > 0 && o.ok {
        o.ok = false;
        o.check = format!("FAIL: {unseen} changes were never written to the sink");
    }
    if rate == 5_000 {
        o.target_lag(TARGET_LAG_P50_MS, TARGET_LAG_P99_MS);
    }
    o.target_rss(TARGET_RSS_MIB);
    Ok(o)
}

async fn big_transaction(ctx: &Ctx) -> Result<Outcome> {
    let name = Workload::BigTransaction.name();
    let n = ctx.sizes.big_tx_rows;
    let mut h = ferry_streaming(ctx, name, 0).await?;
    create_ceiling_slots(&h).await?;
    let start = Phase::read(&h).await;
    let began = Instant::now();
    // One statement outside BEGIN/COMMIT is one transaction.
    h.db.batch_execute(&insert_narrow(1, n as i64)).await?;
    let committed = Instant::now();
    let done = h.wait_count(n as usize, limit(n, 2_000.0)).await?;
    let end = Phase::read(&h).await;
    if h.sink.fast()?.doc_count(INDEX) != n as usize {
        bail!("the sink does not hold {n} documents");
    }

    let mut o = Outcome::new(name, n, "rows");
    let secs = (done - committed).as_secs_f64();
    o.seconds = Some(secs);
    o.rate = Some(n as f64 / secs);
    o.notes.push(format!(
        "INSERT … SELECT of {} rows ran {:.2} s; the rate counts from its COMMIT (nothing can stream before it), {:.2} s from BEGIN",
        thousands(n as f64),
        (committed - began).as_secs_f64(),
        (done - began).as_secs_f64()
    ));
    stream_ceiling(&h, &mut o, n).await?;
    if let Some(method) = o.ceiling_method.as_mut() {
        method.push_str(
            "; it decodes the whole transaction inside the timing, which ferry's walsender \
             partly did while the INSERT ran, so the ratio may exceed 1",
        );
    }
    finish(&mut h, &mut o, Check::Rows("items"), &start, &end).await;
    o.target_rss(TARGET_RSS_MIB);
    Ok(o)
}

/// Rows of the production-size flat workloads.
const PRODUCTION_ROWS: u64 = 10_000_000;
/// Root documents of the production-size nested workload.
const PRODUCTION_ROOTS: u64 = 1_000_000;

/// `ctx` with production sizes (`--quick` divides them by 100).
fn production(ctx: &Ctx) -> Ctx {
    let scale = if ctx.sizes.backfill_rows < Sizes::full().backfill_rows {
        100
    } else {
        1
    };
    let mut c = ctx.clone();
    c.sizes.backfill_rows = PRODUCTION_ROWS / scale;
    c.sizes.nested_users = PRODUCTION_ROOTS / scale;
    c
}

/// `verify-10m`: seeds the narrow table into the node, then times `ferry
/// verify` over every document and measures its peak RSS (that process
/// alone); the rate is rows compared per second.
async fn verify_big(ctx: &Ctx) -> Result<Outcome> {
    let name = Workload::Verify10m.name();
    let n = ctx.sizes.backfill_rows;
    let mut o = Outcome::new(name, n, "rows");
    let mut h = Harness::start(ctx, name).await?;
    if h.sink.node().is_none() {
        anyhow::bail!(
            "{name} needs a real node (ferry verify scrolls the index, which FastSink does not serve): \
             run it with --sink opensearch"
        );
    }
    load_narrow(&h.db, n).await?;
    let t0 = h.start_ferry("items")?;
    let t1 = h.wait_count(n as usize, limit(n, 2_000.0)).await?;
    let seed_rss = h.ferry().ok().and_then(|f| f.peak_rss_bytes());
    h.stop_ferry();
    o.notes.push(format!(
        "seeded {n} rows into the node in {:.1} s ({} rows/s, peak RSS {:.1} MiB) before verifying",
        (t1 - t0).as_secs_f64(),
        thousands(n as f64 / (t1 - t0).as_secs_f64()),
        seed_rss.unwrap_or(0) as f64 / (1024.0 * 1024.0)
    ));
    let run = h.run_once(&["verify"]).await?;
    let secs = run.elapsed.as_secs_f64();
    o.seconds = Some(secs);
    o.rate = Some(n as f64 / secs);
    o.peak_rss_mib = Some(run.peak_rss_bytes as f64 / (1024.0 * 1024.0));
    let summary: String = run
        .stdout
        .lines()
        .rev()
        .take(3)
        .collect::<Vec<_>>()
        .join(" | ");
    o.notes.push(format!(
        "ferry verify (every document, default page size) exited {:?} in {secs:.1} s: {summary}",
        run.code
    ));
    if run.code == Some(0) {
        o.ok = true;
        o.check = format!("ferry verify found every document equal to its row: {summary}");
    } else {
        o.check = format!("FAIL: ferry verify exited {:?}: {summary}", run.code);
    }
    o.target_rss(TARGET_RSS_MIB);
    Ok(o)
}

/// Goal: parallelism 4 copies at least this many times faster than 1.
const TARGET_PARALLEL_RATIO: f64 = 2.5;
/// Goal: 4 bulk requests in flight stream at least this many times faster than 1.
const TARGET_IN_FLIGHT_RATIO: f64 = 3.0;

/// The longest a ferry session's transaction has held a snapshot, in seconds.
async fn longest_ferry_snapshot(db: &tokio_postgres::Client) -> Result<f64> {
    let row = db
        .query_one(
            "SELECT coalesce(max(extract(epoch FROM clock_timestamp() - xact_start)), 0)::float8
             FROM pg_stat_activity
             WHERE application_name = 'ferry' AND backend_xmin IS NOT NULL AND xact_start IS NOT NULL",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// `backfill-parallel`: the narrow backfill with parallelism 1, then 4,
/// each on a fresh PostgreSQL and sink; the ratio of the two rates. Run
/// twice: straight into the sink (every process shares this machine's
/// cores), and with [`BULK_LATENCY`] added to every bulk request by a
/// FaultProxy, as a remote cluster's round trip adds it.
async fn backfill_parallel(ctx: &Ctx) -> Result<Outcome> {
    let name = Workload::BackfillParallel.name();
    let n = ctx.sizes.backfill_rows;
    let mut o = Outcome::new(name, n, "rows");
    for latency in [None, Some(BULK_LATENCY)] {
        let mut rates = Vec::new();
        let label = match latency {
            None => "no added latency".to_string(),
            Some(d) => format!("{} ms added per bulk request", d.as_millis()),
        };
        for parallelism in [1usize, 4] {
            let mut h = Harness::start(ctx, name).await?;
            load_narrow(&h.db, n).await?;
            h.set_engine(&format!("backfill_parallelism = {parallelism}"));
            let _proxy = match latency {
                Some(d) => Some(delayed(&mut h, d).await?),
                None => None,
            };
            let probe = h.connect().await?;
            let start = Phase::before_ferry(&h).await;
            let t0 = h.start_ferry("items")?;
            let mut longest = 0.0f64;
            let t1 = {
                let waiting = h.wait_count(n as usize, limit(n, 2_000.0));
                tokio::pin!(waiting);
                loop {
                    tokio::select! {
                        done = &mut waiting => break done?,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {
                            longest = longest.max(longest_ferry_snapshot(&probe).await?);
                        }
                    }
                }
            };
            let end = Phase::read(&h).await;
            let rate = n as f64 / (t1 - t0).as_secs_f64();
            rates.push(rate);
            o.notes.push(format!(
            "{label}, backfill_parallelism = {parallelism}: {} rows/s in {:.2} s; the longest ferry snapshot \
             transaction seen in pg_stat_activity (sampled every 100 ms) was open {longest:.2} s",
            thousands(rate),
            (t1 - t0).as_secs_f64()
        ));
            if parallelism == 4 && latency.is_none() {
                o.seconds = Some((t1 - t0).as_secs_f64());
                o.rate = Some(rate);
                finish(&mut h, &mut o, Check::Rows("items"), &start, &end).await;
            } else {
                h.stop_ferry();
            }
        }
        let ratio = rates[1] / rates[0];
        o.notes.push(format!(
        "{label}: parallelism 4 / parallelism 1 = {ratio:.2} (same run; every process shares this machine's cores)"
    ));
        o.target_ratio(
            &format!("parallelism 4 / 1, {label}"),
            ratio,
            TARGET_PARALLEL_RATIO,
        );
    }
    o.target_rss(TARGET_RSS_MIB);
    Ok(o)
}

/// Puts a FaultProxy adding `latency` to every request in front of the
/// sink for the next ferry; it works as long as the proxy lives.
async fn delayed(h: &mut Harness, latency: Duration) -> Result<ferry_testkit::FaultProxy> {
    let proxy = ferry_testkit::FaultProxy::start(h.sink.url()).await?;
    proxy.set(ferry_testkit::Fault::Delay(latency));
    h.set_sink_url(proxy.url());
    Ok(proxy)
}

/// Added to every bulk request by the proxy in `stream-in-flight` and
/// in the second half of `backfill-parallel`.
const BULK_LATENCY: Duration = Duration::from_millis(50);
/// Batch size of `stream-in-flight`: small enough that the added latency,
/// not ferry's CPU, bounds one request at a time.
const IN_FLIGHT_BATCH: usize = 500;

/// `stream-in-flight`: the unpaced writers of `stream-simple`, with a
/// FaultProxy adding [`BULK_LATENCY`] to every bulk request, at
/// `max_in_flight_bulks` 1, then 4; the ratio of the two rates.
async fn stream_in_flight(ctx: &Ctx) -> Result<Outcome> {
    const WRITERS: i64 = UNPACED_WRITERS;
    const PER_TX: u64 = UNPACED_PER_TX;
    let name = Workload::StreamInFlight.name();
    let planned = ctx.sizes.stream_changes;
    let txs = planned.div_ceil(WRITERS as u64 * PER_TX) as i64;
    let mut o = Outcome::new(name, planned, "changes");
    let mut rates = Vec::new();
    for in_flight in [1usize, 4] {
        let mut h = Harness::start(ctx, name).await?;
        h.db.batch_execute(NARROW_DDL).await?;
        let _proxy = delayed(&mut h, BULK_LATENCY).await?;
        h.set_engine(&format!(
            "max_in_flight_bulks = {in_flight}\nmax_batch_changes = {IN_FLIGHT_BATCH}"
        ));
        h.start_ferry("items")?;
        h.probe_stream("items", &insert_narrow(-1, -1)).await?;
        // The writers fill the slot while ferry is frozen; then ferry drains
        // the backlog alone, so the writers' speed is not what is measured.
        h.ferry()?.freeze(true);
        let (start, _, written) = unpaced_writers(&h, txs).await?;
        h.db.batch_execute(&insert_narrow(0, 0)).await?;
        let changes = written + 1;
        let t0 = Instant::now();
        h.ferry()?.freeze(false);
        let seen = h.wait_doc("0", limit(changes, 500.0)).await?;
        let arrived = h.sink.last_write(INDEX, "0").unwrap_or(seen);
        let end = Phase::read(&h).await;
        let secs = (arrived - t0).as_secs_f64();
        let rate = changes as f64 / secs;
        rates.push(rate);
        o.notes.push(format!(
            "max_in_flight_bulks = {in_flight}: {} changes/s ({changes} changes in {secs:.2} s)",
            thousands(rate)
        ));
        if in_flight == 4 {
            o.size = changes;
            o.seconds = Some(secs);
            o.rate = Some(rate);
            finish(&mut h, &mut o, Check::Rows("items"), &start, &end).await;
        } else {
            h.stop_ferry();
        }
    }
    let ratio = rates[1] / rates[0];
    o.notes.push(format!(
        "every bulk request delayed {} ms by a FaultProxy in front of FastSink; max_batch_changes = {IN_FLIGHT_BATCH}; \
         ferry frozen (SIGSTOP) while the writers fill the slot, then timed draining the backlog; in flight 4 / 1 = {ratio:.2}",
        BULK_LATENCY.as_millis()
    ));
    o.target_ratio("4 in flight / 1", ratio, TARGET_IN_FLIGHT_RATIO);
    o.target_rss(TARGET_RSS_MIB);
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn paced_transactions_never_share_an_id() {
        let k_total = 7_500;
        let p = 5 * k_total + 1_000;
        let mut seen = HashSet::new();
        for k in 0..k_total {
            for id in paced_ids(k, p) {
                assert!(id > 0);
                assert!(seen.insert(id), "id {id} changed twice");
            }
        }
    }

    #[test]
    fn live_writers_own_disjoint_ids_and_start_above_the_preload() {
        let n = 1_001;
        let mut seen = HashSet::new();
        for w in 0..LIVE_WRITERS {
            let k = first_new_k(w, n);
            assert!(live_id(w, k) > n);
            assert!(live_id(w, k - 1) <= n);
            for k in 0..k + 10 {
                assert!(seen.insert(live_id(w, k)), "id shared by two writers");
            }
        }
        // Every preloaded id belongs to some writer.
        assert!((1..=n).all(|id| seen.contains(&id)));
    }

    #[test]
    fn builds_row_inserts_and_finds_log_lines() {
        assert_eq!(bigint_array(&[3, -1, 7]), "'{3,-1,7}'::bigint[]");
        assert!(insert_narrow_ids(&[5]).ends_with("FROM unnest('{5}'::bigint[]) g"));
        let log = "2024 INFO ferry_engine::backfill: backfill started x=1\n\
                   2024 INFO ferry_engine::backfill: backfill finished index=bench rows=9\n";
        assert_eq!(
            log_line(log, BACKFILL_FINISHED).as_deref(),
            Some("backfill finished index=bench rows=9")
        );
        assert_eq!(log_line(log, "nope"), None);
    }

    #[test]
    fn workloads_round_trip_their_names() {
        for w in Workload::ALL {
            assert_eq!(Workload::parse(w.name()), Some(w));
        }
        assert_eq!(Workload::parse("nope"), None);
    }
}
