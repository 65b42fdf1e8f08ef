//! Chaos: ferry is killed at random moments under a live mixed workload,
//! stopped in the middle of a large backlog, and handed stale writes behind
//! its back. Every test ends with the oracle: each document equals its row
//! and no document exists without a row.
//!
//! The kill test prints its seed; `FERRY_CHAOS_SEED=<seed>` replays the same
//! kill intervals and the same workload statements (the interleaving with
//! ferry's own progress still depends on timing).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_e2e::{compare, rows_as_json, TestEnv};
use ferry_opensearch::Method;
use serde_json::{json, Value};

/// A tiny xorshift64* generator: every random choice of a run follows from its seed.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }

    /// The seed from `FERRY_CHAOS_SEED`, or one taken from the clock.
    fn seed() -> u64 {
        if let Some(s) = std::env::var("FERRY_CHAOS_SEED")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            return s;
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        (nanos ^ u64::from(std::process::id()).rotate_left(32)).max(1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// Waits until the ferry log contains `needle` at least `times` times.
async fn wait_for_log(env: &TestEnv, needle: &str, times: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while env.log().matches(needle).count() < times {
        assert!(
            Instant::now() < deadline,
            "ferry never logged {needle:?} ({times}x) within {within:?}\n--- ferry log ---\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the index behind `index` records a finished seed
/// (`_meta.ferry.seeded_lsn`): from then on a restart never copies the table again.
async fn wait_until_seeded(env: &TestEnv, index: &str, within: Duration) {
    let alias = env.index(index);
    let deadline = Instant::now() + within;
    loop {
        let seeded = env
            .sink
            .json_request(Method::Get, &format!("/{alias}/_mapping"), None)
            .await
            .ok()
            .and_then(|m| {
                m.as_object().map(|o| {
                    o.values()
                        .any(|v| v["mappings"]["_meta"]["ferry"]["seeded_lsn"].is_string())
                })
            })
            .unwrap_or(false);
        if seeded {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "index {alias} was not marked seeded within {within:?}\n--- ferry log ---\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The slot's `confirmed_flush_lsn` as text (`None` without a slot).
async fn confirmed_flush(db: &tokio_postgres::Client) -> Option<String> {
    db.query_opt(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'ferry_test'",
        &[],
    )
    .await
    .expect("read the slot")
    .and_then(|r| r.get(0))
}

async fn lsn_at_least(db: &tokio_postgres::Client, a: &str, b: &str) -> bool {
    db.query_one("SELECT $1::text::pg_lsn >= $2::text::pg_lsn", &[&a, &b])
        .await
        .expect("compare LSNs")
        .get(0)
}

/// One random transaction of 2–6 statements over `chaos`: inserts, updates,
/// deletes, primary-key changes, and a row born and changed in the same
/// transaction. `next_id` hands out fresh keys.
fn random_transaction(rng: &mut XorShift, next_id: &mut u64) -> String {
    let mut sql = String::from("BEGIN;\n");
    for _ in 0..rng.range(2, 6) {
        match rng.range(0, 9) {
            0..=2 => {
                let n = rng.range(1, 20);
                sql.push_str(&format!(
                    "INSERT INTO chaos (id, v, note, tags) \
                     SELECT g, g % 1000, 'ins ' || g, ARRAY['t' || (g % 7)] \
                     FROM generate_series({}, {}) g ON CONFLICT (id) DO NOTHING;\n",
                    *next_id,
                    *next_id + n - 1
                ));
                *next_id += n;
            }
            3..=5 => {
                let r = rng.range(0, 400);
                sql.push_str(&format!(
                    "UPDATE chaos SET v = v + 1, note = 'upd {}', updated_at = now(), \
                     tags = CASE WHEN v % 3 = 0 THEN NULL ELSE tags || 'u'::text END \
                     WHERE id % 401 = {r};\n",
                    rng.next() % 100_000
                ));
            }
            6..=7 => {
                let r = rng.range(0, 210);
                sql.push_str(&format!("DELETE FROM chaos WHERE id % 211 = {r};\n"));
            }
            8 => {
                // Key changes: the old document must go, the new one appear.
                let r = rng.range(0, 96);
                sql.push_str(&format!(
                    "UPDATE chaos SET id = id + 100000, note = 'moved' \
                     WHERE id IN (SELECT c.id FROM chaos c WHERE c.id % 97 = {r} \
                       AND NOT EXISTS (SELECT 1 FROM chaos d WHERE d.id = c.id + 100000) LIMIT 3);\n"
                ));
            }
            _ => {
                // A short-lived row and a twice-changed row inside one transaction.
                let id = *next_id;
                *next_id += 2;
                sql.push_str(&format!(
                    "INSERT INTO chaos (id, v, note) VALUES ({id}, 1, 'short-lived'), ({}, 1, 'kept');\n\
                     UPDATE chaos SET note = 'changed twice' WHERE id IN ({id}, {});\n\
                     UPDATE chaos SET v = 2 WHERE id = {};\n\
                     DELETE FROM chaos WHERE id = {id};\n",
                    id + 1,
                    id + 1,
                    id + 1
                ));
            }
        }
    }
    sql.push_str("COMMIT;");
    sql
}

/// Runs random transactions until `stop`; returns (committed, failed).
async fn workload(db: tokio_postgres::Client, seed: u64, stop: Arc<AtomicBool>) -> (u64, u64) {
    let mut rng = XorShift::new(seed);
    let mut next_id = 1_000_000u64;
    let (mut committed, mut failed) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        // A short pause keeps the stream steady (a few thousand changes a
        // second) instead of a backlog the debug build needs minutes to drain.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let sql = random_transaction(&mut rng, &mut next_id);
        match db.batch_execute(&sql).await {
            Ok(()) => committed += 1,
            Err(e) => {
                // A statement failed: the transaction is void, nothing to index.
                let _ = db.batch_execute("ROLLBACK").await;
                failed += 1;
                if failed <= 3 {
                    eprintln!("workload: transaction failed (rolled back): {e}");
                }
            }
        }
    }
    (committed, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kills_mid_stream_lose_nothing() {
    const KILLS: usize = 20;
    let seed = XorShift::seed();
    println!("chaos seed: {seed} (replay with FERRY_CHAOS_SEED={seed})");
    eprintln!("chaos seed: {seed} (replay with FERRY_CHAOS_SEED={seed})");
    let mut rng = XorShift::new(seed);

    let test_start = Instant::now();
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE chaos (
             id         bigint PRIMARY KEY,
             v          integer NOT NULL,
             note       text,
             tags       text[],
             updated_at timestamptz DEFAULT now()
         );
         INSERT INTO chaos (id, v, note, tags)
         SELECT g, g % 1000, 'seed ' || g, ARRAY['t' || (g % 7), 'all']
         FROM generate_series(1, 2000) g;",
    )
    .await
    .expect("schema");
    let cfg = env.config("chaos", "chaos", "");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("chaos", "chaos", Duration::from_secs(60))
        .await;
    wait_for_log(&env, "streaming changes", 1, Duration::from_secs(30)).await;
    wait_until_seeded(&env, "chaos", Duration::from_secs(30)).await;
    let confirmed_before = confirmed_flush(&db).await.expect("slot exists");

    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(workload(env.db().await, rng.next(), stop.clone()));

    let mut intervals = Vec::with_capacity(KILLS);
    let mut running = Some(ferry);
    for round in 1..=KILLS {
        let wait = rng.range(100, 1500);
        intervals.push(wait);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let mut ferry = running.take().expect("a ferry runs");
        assert!(
            ferry.is_running(),
            "ferry exited by itself before kill {round} (seed {seed})\n--- ferry log ---\n{}",
            env.log_tail()
        );
        assert!(
            !load.is_finished(),
            "the workload ended early (seed {seed})"
        );
        ferry.kill();
        if round < KILLS {
            running = Some(env.run_ferry(&cfg));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (committed, failed) = load.await.expect("workload task");
    let confirmed_after_chaos = confirmed_flush(&db).await.expect("slot exists");
    let rows: i64 = db
        .query_one("SELECT count(*) FROM chaos", &[])
        .await
        .expect("count")
        .get(0);
    println!(
        "seed {seed}: {KILLS} kills after {intervals:?} ms; workload committed {committed} \
         transactions ({failed} rolled back); {rows} rows; slot confirmed {confirmed_before} → \
         {confirmed_after_chaos} during the chaos; ferry reached streaming {} times",
        env.log().matches("streaming changes").count()
    );
    assert!(committed > 0, "the workload committed nothing");

    let ferry = env.run_ferry(&cfg);
    let last_start = Instant::now();
    env.assert_converges("chaos", "chaos", Duration::from_secs(120))
        .await;
    println!(
        "the last ferry converged {:?} after its start; the whole test took {:?}",
        last_start.elapsed(),
        test_start.elapsed()
    );
    let log = env.log();
    assert_eq!(
        log.matches("backfill started").count(),
        1,
        "a kill never forces a new backfill: the slot and the seeded index survive (seed {seed})"
    );
    assert!(
        !log.contains("panicked"),
        "ferry panicked (seed {seed})\n{log}"
    );
    assert_eq!(
        ferry.stop(),
        Some(0),
        "ferry exits 0 on SIGTERM\n{}",
        env.log_tail()
    );
}

/// A config over `table` whose `[engine]` also carries `engine` lines.
fn config_with_engine(env: &TestEnv, index: &str, table: &str, engine: &str) -> std::path::PathBuf {
    env.write_config(&format!(
        "[source]\nurl = \"{}\"\nslot = \"ferry_test\"\npublication = \"ferry_test\"\n\n\
         [sink]\nurl = \"{}\"\n\n\
         [engine]\nmax_batch_delay_ms = 20\n{engine}\n\n\
         [[index]]\nname = \"{}\"\ntable = \"{table}\"\n",
        env.pg.url("app"),
        env.os.url(),
        env.index(index),
    ))
}

/// What a backlog transaction leaves on its last row.
#[derive(Debug, Clone, Copy)]
enum BacklogCheck {
    /// The row was inserted.
    Present(i64),
    /// The row was updated (`v` raised by 10).
    Updated(i64),
    /// The row was deleted.
    Absent(i64),
    /// Nothing that can be checked on its own.
    Nothing,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_large_backlog_exits_cleanly_and_a_restart_continues() {
    const SHUTDOWN_SECS: u64 = 10;
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE backlog (id bigint PRIMARY KEY, v integer, t text);
         INSERT INTO backlog SELECT g, 0, 'row ' || g FROM generate_series(1, 20000) g;",
    )
    .await
    .expect("schema");
    let cfg = config_with_engine(
        &env,
        "backlog",
        "backlog",
        &format!("shutdown_timeout_secs = {SHUTDOWN_SECS}"),
    );
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("backlog", "backlog", Duration::from_secs(60))
        .await;
    wait_until_seeded(&env, "backlog", Duration::from_secs(30)).await;
    assert_eq!(ferry.stop(), Some(0), "first stop\n{}", env.log_tail());

    // 50,000 changes in 50 transactions of 1,000 while ferry is down:
    // 20,000 inserts, 20,000 updates, 10,000 deletes. Each statement runs on
    // its own (one simple query with many statements would be ONE implicit
    // transaction); after each, the WAL insert position is recorded, which
    // is at or past that transaction's commit. (The insert position, not
    // pg_current_wal_lsn: the test cluster runs with synchronous_commit =
    // off, so the write position may lag behind the last commit.)
    let mut txns: Vec<(String, BacklogCheck)> = Vec::with_capacity(50);
    let mut statements = Vec::with_capacity(50);
    for k in 0..20i64 {
        let from = 20_001 + k * 1000;
        let last = from + 999;
        // Rows above 30,000 are deleted again later: their absence proves nothing.
        let check = if last <= 30_000 {
            BacklogCheck::Present(last)
        } else {
            BacklogCheck::Nothing
        };
        let sql = format!(
            "INSERT INTO backlog SELECT g, 1, 'new ' || g FROM generate_series({from}, {last}) g"
        );
        statements.push((sql, check));
    }
    for k in 0..20i64 {
        let from = 1 + k * 1000;
        let last = from + 999;
        let sql = format!(
            "UPDATE backlog SET v = v + 10, t = 'updated ' || id \
             WHERE id BETWEEN {from} AND {last}"
        );
        statements.push((sql, BacklogCheck::Updated(last)));
    }
    for k in 0..10i64 {
        let from = 30_001 + k * 1000;
        let last = from + 999;
        statements.push((
            format!("DELETE FROM backlog WHERE id BETWEEN {from} AND {last}"),
            BacklogCheck::Absent(last),
        ));
    }
    for (sql, check) in statements {
        db.batch_execute(&sql).await.expect("backlog transaction");
        let after: String = db
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .expect("lsn")
            .get(0);
        txns.push((after, check));
    }
    let backlog_end = txns.last().expect("50 transactions").0.clone();
    let confirmed_before = confirmed_flush(&db).await.expect("slot");

    let mut ferry = env.run_ferry(&cfg);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        ferry.is_running(),
        "ferry exited before the SIGTERM\n{}",
        env.log_tail()
    );
    let asked = Instant::now();
    let code = ferry.stop();
    let took = asked.elapsed();
    assert_eq!(
        code,
        Some(0),
        "SIGTERM in the middle of a backlog exits 0\n{}",
        env.log_tail()
    );
    assert!(
        took <= Duration::from_secs(SHUTDOWN_SECS + 5),
        "ferry took {took:?} to stop (shutdown_timeout_secs = {SHUTDOWN_SECS})\n{}",
        env.log_tail()
    );
    let confirmed_at_stop = confirmed_flush(&db).await.expect("slot");
    let rows = rows_as_json(&db, "backlog").await;
    let docs = env.documents("backlog").await;
    let pending = compare(&rows, &docs).len();
    // Every transaction the slot confirmed must be in the index: the clean
    // stop confirms only what it flushed. Documents never move backwards
    // (versions are commit LSNs), so each confirmed transaction's last row
    // shows at least that transaction's effect.
    let mut confirmed_txns = 0;
    for (k, (after, check)) in txns.iter().enumerate() {
        if !lsn_at_least(&db, &confirmed_at_stop, after).await {
            break;
        }
        confirmed_txns += 1;
        let holds = match check {
            BacklogCheck::Present(id) => docs.contains_key(&id.to_string()),
            BacklogCheck::Updated(id) => docs
                .get(&id.to_string())
                .is_some_and(|d| d["v"].as_i64().is_some_and(|v| v >= 10)),
            BacklogCheck::Absent(id) => !docs.contains_key(&id.to_string()),
            BacklogCheck::Nothing => true,
        };
        assert!(
            holds,
            "the slot confirmed backlog transaction {k} ({check:?}, ends before {after}; \
             confirmed {confirmed_at_stop}) but the index does not show it\n{}",
            env.log_tail()
        );
    }
    println!(
        "stopped {took:?} after SIGTERM; slot confirmed {confirmed_before} → {confirmed_at_stop}: \
         {confirmed_txns} of 50 backlog transactions (backlog ends at {backlog_end}); \
         {pending} documents still differed"
    );

    let ferry = env.run_ferry(&cfg);
    env.assert_converges("backlog", "backlog", Duration::from_secs(90))
        .await;
    let log = env.log();
    assert_eq!(
        log.matches("backfill started").count(),
        1,
        "restarts resume from the slot, they do not re-seed"
    );
    assert_eq!(ferry.stop(), Some(0), "last stop\n{}", env.log_tail());
}

/// The concrete index behind alias `alias`.
async fn concrete_index(env: &TestEnv, alias: &str) -> String {
    let mapping = env
        .sink
        .json_request(Method::Get, &format!("/{alias}/_mapping"), None)
        .await
        .expect("mapping");
    let names: Vec<String> = mapping
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    assert_eq!(names.len(), 1, "alias {alias} names one index: {mapping}");
    names[0].clone()
}

/// `POST /_bulk` with an NDJSON body (the sink client only sends single
/// JSON bodies); returns (status, parsed body).
async fn raw_bulk(base_url: &str, ndjson: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/_bulk", base_url.trim_end_matches('/')))
        .header("content-type", "application/x-ndjson")
        .body(ndjson.to_owned())
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("send bulk");
    let status = response.status().as_u16();
    let body = response.text().await.expect("read bulk answer");
    let body = serde_json::from_str(body.trim())
        .unwrap_or_else(|e| panic!("bulk answer is not JSON ({e}): {body}"));
    (status, body)
}

/// `_version` and `_source` of document `id` in `alias`.
async fn doc_with_version(env: &TestEnv, alias: &str, id: &str) -> (u64, Value) {
    let doc = env
        .sink
        .json_request(Method::Get, &format!("/{alias}/_doc/{id}"), None)
        .await
        .expect("get document");
    (
        doc["_version"].as_u64().expect("document has a _version"),
        doc["_source"].clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_older_writes_never_overwrite_newer_documents() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE r (id int PRIMARY KEY, v text, n int);
         INSERT INTO r SELECT g, 'v' || g, g FROM generate_series(1, 100) g;",
    )
    .await
    .expect("schema");
    let cfg = env.config("r", "r", "");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("r", "r", Duration::from_secs(60))
        .await;
    // Row 7 changes live: its document now carries a stream commit LSN.
    db.batch_execute("UPDATE r SET v = 'newest', n = 700 WHERE id = 7")
        .await
        .expect("update");
    env.assert_converges("r", "r", Duration::from_secs(60))
        .await;

    let alias = env.index("r");
    let concrete = concrete_index(&env, &alias).await;
    let (version, source) = doc_with_version(&env, &alias, "7").await;
    assert!(
        version > 1,
        "document versions are commit LSNs, far above 1: {version}"
    );
    assert_eq!(source["v"], "newest");

    // A stale replay through the bulk API, as a retried old batch would send it.
    if env.os.url().starts_with("http://") {
        let ndjson = format!(
            "{}\n{}\n",
            json!({"index": {"_index": concrete, "_id": "7", "version": 1, "version_type": "external_gte"}}),
            json!({"id": 7, "v": "stale", "n": 7})
        );
        let (status, answer) = raw_bulk(env.os.url(), &ndjson).await;
        assert_eq!(
            status, 200,
            "a bulk request answers 200 as a whole: {answer}"
        );
        let item = &answer["items"][0]["index"];
        assert_eq!(
            item["status"], 409,
            "an older version is refused with 409: {answer}"
        );
        assert_eq!(answer["errors"], true, "{answer}");
    } else {
        eprintln!("skipping the raw NDJSON bulk: the cluster is not plain HTTP");
    }

    // The same through the single-document API.
    let single = env
        .sink
        .json_request(
            Method::Put,
            &format!("/{concrete}/_doc/7?version=1&version_type=external_gte"),
            Some(json!({"id": 7, "v": "stale again", "n": 7})),
        )
        .await;
    match single {
        Err(ferry_opensearch::SinkError::Status { status, .. }) => assert_eq!(status, 409),
        other => panic!("an older single-document write must be refused with 409: {other:?}"),
    }

    let (after_version, after_source) = doc_with_version(&env, &alias, "7").await;
    assert_eq!(after_version, version, "the version did not move");
    assert_eq!(after_source, source, "the document did not change");
    env.assert_converges("r", "r", Duration::from_secs(10))
        .await;

    // Newer changes still land on top.
    db.batch_execute("UPDATE r SET v = 'newer still' WHERE id = 7; DELETE FROM r WHERE id = 8")
        .await
        .expect("update");
    env.assert_converges("r", "r", Duration::from_secs(60))
        .await;
    let (latest, _) = doc_with_version(&env, &alias, "7").await;
    assert!(latest > version, "the newer commit wrote a higher version");
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());
}
