//! Faults on the PostgreSQL side: the replication slot dropped (while ferry
//! is down and while it streams), an idle slot on a busy database, and a
//! network path to PostgreSQL that stalls and then drops every connection.
//! Every test ends with the oracle: each document equals its row and no
//! document exists without a row.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_e2e::{compare, rows_as_json, TestEnv};
use ferry_opensearch::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A whole config: `[source]` reads `source_url` plus `source` lines.
fn config(env: &TestEnv, source_url: &str, source: &str, index: &str, table: &str) -> PathBuf {
    env.write_config(&format!(
        "[source]\nurl = \"{source_url}\"\nslot = \"ferry_test\"\npublication = \"ferry_test\"\n{source}\n\n\
         [sink]\nurl = \"{}\"\n\n\
         [engine]\nmax_batch_delay_ms = 20\n\n\
         [[index]]\nname = \"{}\"\ntable = \"{table}\"\n",
        env.os.url(),
        env.index(index),
    ))
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

/// (active, confirmed_flush_lsn) of the test slot; `None` when it does not exist.
async fn slot(db: &tokio_postgres::Client) -> Option<(bool, String)> {
    db.query_opt(
        "SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'ferry_test'",
        &[],
    )
    .await
    .expect("read pg_replication_slots")
    .map(|r| (r.get(0), r.get(1)))
}

/// Number of differences between `table` and `index` right now.
async fn differences(
    env: &TestEnv,
    db: &tokio_postgres::Client,
    index: &str,
    table: &str,
) -> usize {
    compare(&rows_as_json(db, table).await, &env.documents(index).await).len()
}

/// Inserts, updates, deletes and a key change over `s`, with fresh ids from `base`.
async fn churn(db: &tokio_postgres::Client, base: u32) {
    db.batch_execute(&format!(
        "INSERT INTO s SELECT g, 'new ' || g FROM generate_series({base}, {}) g;
         UPDATE s SET v = 'upd {base} ' || id WHERE id % 7 = {};
         DELETE FROM s WHERE id % 11 = {};
         UPDATE s SET id = id + 500000 WHERE id = (SELECT min(id) FROM s WHERE id < 500000);",
        base + 49,
        base % 7,
        base % 11
    ))
    .await
    .expect("changes");
}

/// Ends the walsender streaming the test slot and drops the slot before
/// ferry reconnects (retrying while the slot is still held).
async fn drop_slot_under_ferry(db: &tokio_postgres::Client) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = db
            .batch_execute(
                "SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots
                   WHERE slot_name = 'ferry_test' AND active_pid IS NOT NULL;
                 SELECT pg_drop_replication_slot('ferry_test');",
            )
            .await;
        match r {
            Ok(()) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("drop attempt failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("could not drop the slot under ferry in 30 s: {e}"),
        }
    }
}

/// Number of documents a search on `alias` answers with right now.
async fn search_total(env: &TestEnv, alias: &str) -> u64 {
    let res = env
        .sink
        .json_request(
            Method::Post,
            &format!("/{alias}/_search"),
            Some(serde_json::json!({"size": 0, "track_total_hits": true})),
        )
        .await
        .unwrap_or_else(|e| panic!("searches on {alias} are answered: {e}\n{}", env.log_tail()));
    res["hits"]["total"]["value"].as_u64().unwrap_or(0)
}

/// Searches `alias` until it points at another concrete index than `old`,
/// asserting every answer holds exactly `expected` documents; returns the
/// number of searches answered before the alias moved.
async fn searches_stay_full_until_the_alias_moves(
    env: &TestEnv,
    alias: &str,
    old: &[String],
    expected: u64,
    within: Duration,
) -> u32 {
    let deadline = Instant::now() + within;
    let mut answered = 0;
    loop {
        let total = search_total(env, alias).await;
        let now = env.sink.alias_targets(alias).await.expect("alias");
        if now != old {
            assert_eq!(now.len(), 1, "the alias serves one index: {now:?}");
            return answered;
        }
        assert_eq!(
            total,
            expected,
            "search {answered} during the reseed saw a partial index\n{}",
            env.log_tail()
        );
        answered += 1;
        assert!(
            Instant::now() < deadline,
            "the alias never moved to a rebuilt index\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until concrete index `name` (one the alias left) is deleted.
async fn assert_deleted(env: &TestEnv, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while env
        .sink
        .json_request(Method::Get, &format!("/{name}"), None)
        .await
        .is_ok()
    {
        assert!(
            Instant::now() < deadline,
            "the index the alias left, {name}, was never deleted\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Table `s` with `rows` rows.
async fn table_s(db: &tokio_postgres::Client, rows: u32) {
    db.batch_execute(&format!(
        "CREATE TABLE s (id int PRIMARY KEY, v text);
         INSERT INTO s SELECT g, 'v' || g FROM generate_series(1, {rows}) g;"
    ))
    .await
    .expect("schema");
}

/// A config for index `s` over table `s` with `source` lines and slow enough chunks
/// that a reseed is observable.
fn config_s(env: &TestEnv, source: &str) -> PathBuf {
    env.write_config(&format!(
        "[source]\nurl = \"{}\"\nslot = \"ferry_test\"\npublication = \"ferry_test\"\n{source}\n\n\
         [sink]\nurl = \"{}\"\n\n\
         [engine]\nmax_batch_delay_ms = 20\nbackfill_chunk_rows = 500\n\n\
         [[index]]\nname = \"{}\"\ntable = \"s\"\n",
        env.pg.url("app"),
        env.os.url(),
        env.index("s"),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_slot_reseeds_beside_the_live_index_and_searches_stay_full() {
    const ROWS: u32 = 20_000;
    let env = TestEnv::start().await;
    let db = env.db().await;
    table_s(&db, ROWS).await;
    let cfg = config_s(&env, "");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("s", "s", Duration::from_secs(90))
        .await;
    wait_for_log(&env, "streaming changes", 1, Duration::from_secs(30)).await;
    let alias = env.index("s");
    let old = env.sink.alias_targets(&alias).await.expect("alias");

    // Dropped under the running ferry (the default policy is "reseed").
    drop_slot_under_ferry(&db).await;
    // Updates keep the row count: every search must see all of it.
    db.batch_execute("UPDATE s SET v = 'during reseed' WHERE id <= 100")
        .await
        .expect("update");
    let answered = searches_stay_full_until_the_alias_moves(
        &env,
        &alias,
        &old,
        ROWS as u64,
        Duration::from_secs(120),
    )
    .await;
    assert!(
        answered > 0,
        "the alias moved before any search could run during the reseed\n{}",
        env.log_tail()
    );
    println!("{answered} searches answered with all {ROWS} documents during the reseed");
    assert!(slot(&db).await.is_some(), "ferry recreated the slot");
    assert_eq!(
        env.log().matches("backfill started").count(),
        2,
        "{}",
        env.log_tail()
    );
    assert_deleted(&env, &old[0]).await;
    churn(&db, 30_000).await;
    env.assert_converges("s", "s", Duration::from_secs(60))
        .await;
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_slot_under_policy_stop_exits_3_and_leaves_the_index_untouched() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    table_s(&db, 500).await;
    let cfg = config_s(&env, "on_slot_lost = \"stop\"");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("s", "s", Duration::from_secs(60))
        .await;
    wait_for_log(&env, "streaming changes", 1, Duration::from_secs(30)).await;
    let alias = env.index("s");
    let old = env.sink.alias_targets(&alias).await.expect("alias");
    let before = env.documents("s").await;

    drop_slot_under_ferry(&db).await;
    churn(&db, 1000).await;
    let code = ferry.exit_code_within(Duration::from_secs(60));
    assert_eq!(code, Some(3), "{}", env.log_tail());
    let log = env.log();
    let error = log
        .lines()
        .rev()
        .find(|l| l.contains("ferry stopped"))
        .unwrap_or("(no final error)");
    assert!(
        error.contains("\"ferry_test\"") && error.contains("source.on_slot_lost = \"reseed\""),
        "the error names the slot and the choice: {error}"
    );
    assert!(slot(&db).await.is_none(), "ferry did not recreate the slot");
    assert_eq!(env.sink.alias_targets(&alias).await.expect("alias"), old);
    assert_eq!(env.documents("s").await, before, "the index is untouched");
    assert_eq!(log.matches("backfill started").count(), 1, "no reseed");

    // The way back the message names: start once with "reseed".
    let cfg = config_s(&env, "on_slot_lost = \"reseed\"");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("s", "s", Duration::from_secs(60))
        .await;
    assert_ne!(env.sink.alias_targets(&alias).await.expect("alias"), old);
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());
}

/// Makes PostgreSQL invalidate the stopped test slot: a tiny
/// `max_slot_wal_keep_size`, then WAL segments switched and checkpointed
/// until `wal_status` is `lost`.
async fn invalidate_slot(db: &tokio_postgres::Client) {
    // ALTER SYSTEM refuses to run in the implicit transaction of a multi-statement batch.
    for sql in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
        "SELECT pg_reload_conf()",
        "CREATE TABLE IF NOT EXISTS wal_filler (v text)",
    ] {
        db.batch_execute(sql).await.expect(sql);
    }
    for round in 0..60 {
        let status: Option<String> = db
            .query_one(
                "SELECT wal_status::text FROM pg_replication_slots WHERE slot_name = 'ferry_test'",
                &[],
            )
            .await
            .expect("slot")
            .get(0);
        if status.as_deref() == Some("lost") {
            println!("slot invalidated after {round} round(s)");
            for sql in [
                "ALTER SYSTEM RESET max_slot_wal_keep_size",
                "SELECT pg_reload_conf()",
            ] {
                db.batch_execute(sql).await.expect(sql);
            }
            return;
        }
        for sql in [
            "INSERT INTO wal_filler SELECT repeat('x', 1000) FROM generate_series(1, 5000)",
            "SELECT pg_switch_wal()",
            "CHECKPOINT",
        ] {
            db.batch_execute(sql).await.expect(sql);
        }
    }
    panic!("PostgreSQL did not invalidate the slot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidated_slot_stops_under_stop_and_reseeds_beside_under_reseed() {
    const ROWS: u32 = 20_000;
    let env = TestEnv::start().await;
    let db = env.db().await;
    table_s(&db, ROWS).await;
    let cfg = config_s(&env, "");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("s", "s", Duration::from_secs(90))
        .await;
    wait_for_log(&env, "streaming changes", 1, Duration::from_secs(30)).await;
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());
    let alias = env.index("s");
    let old = env.sink.alias_targets(&alias).await.expect("alias");
    db.batch_execute("UPDATE s SET v = 'while stopped' WHERE id <= 100")
        .await
        .expect("update");
    invalidate_slot(&db).await;

    let stop = config_s(&env, "on_slot_lost = \"stop\"");
    let code = env
        .run_ferry(&stop)
        .exit_code_within(Duration::from_secs(60));
    assert_eq!(code, Some(3), "{}", env.log_tail());
    assert!(
        env.log_tail().contains("invalidated") && env.log_tail().contains("source.on_slot_lost"),
        "{}",
        env.log_tail()
    );
    assert_eq!(env.sink.alias_targets(&alias).await.expect("alias"), old);
    assert_eq!(search_total(&env, &alias).await, ROWS as u64);

    let ferry = env.run_ferry(&cfg);
    let answered = searches_stay_full_until_the_alias_moves(
        &env,
        &alias,
        &old,
        ROWS as u64,
        Duration::from_secs(120),
    )
    .await;
    assert!(
        answered > 0,
        "no search ran during the reseed\n{}",
        env.log_tail()
    );
    env.assert_converges("s", "s", Duration::from_secs(60))
        .await;
    let (active, _) = slot(&db).await.expect("a new slot");
    assert!(active, "ferry streams from the new slot");
    churn(&db, 30_000).await;
    env.assert_converges("s", "s", Duration::from_secs(60))
        .await;
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncating_a_related_table_rebuilds_beside_while_other_indexes_stream() {
    const USERS: u32 = 30_000;
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(&format!(
        "CREATE TABLE users (id int PRIMARY KEY, name text);
         CREATE TABLE orders (id int PRIMARY KEY, user_id int NOT NULL, total int);
         CREATE TABLE notes (id int PRIMARY KEY, body text);
         INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, {USERS}) g;
         INSERT INTO orders SELECT g, g, g FROM generate_series(1, {USERS}) g;
         INSERT INTO notes SELECT g, 'n' || g FROM generate_series(1, 10) g;
         CREATE INDEX ON orders (user_id);"
    ))
    .await
    .expect("schema");
    let users = env.index("users");
    let notes = env.index("notes");
    let cfg = env.write_config(&format!(
        "[source]\nurl = \"{}\"\nslot = \"ferry_test\"\npublication = \"ferry_test\"\n\n\
         [sink]\nurl = \"{}\"\n\n[engine]\nmax_batch_delay_ms = 20\nbackfill_chunk_rows = 500\n\n\
         [[index]]\nname = \"{users}\"\ntable = \"users\"\n\
         [[index.has_many]]\nfield = \"orders\"\ntable = \"orders\"\nforeign_key = \"user_id\"\n\n\
         [[index]]\nname = \"{notes}\"\ntable = \"notes\"\n",
        env.pg.url("app"),
        env.os.url(),
    ));
    let ferry = env.run_ferry(&cfg);
    let with_orders = "SELECT u.id::text, jsonb_build_object('id', u.id, 'name', u.name, \
         'orders', coalesce(o.orders, '[]'))::text FROM users u LEFT JOIN \
         (SELECT user_id, jsonb_agg(to_jsonb(o) ORDER BY o.id) AS orders FROM orders o GROUP BY user_id) o \
         ON o.user_id = u.id";
    env.assert_converges_to("users", with_orders, Duration::from_secs(120))
        .await;
    env.assert_converges("notes", "notes", Duration::from_secs(30))
        .await;
    let old = env.sink.alias_targets(&users).await.expect("alias");

    db.batch_execute("TRUNCATE orders").await.expect("truncate");
    let truncated_at = Instant::now();
    db.batch_execute("INSERT INTO notes VALUES (11, 'after the truncate')")
        .await
        .expect("insert");
    // The other index streams on while `users` is rebuilt, and `users` keeps
    // serving its old, complete documents until the new copy is done.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut note_seen_while_rebuilding = false;
    loop {
        let moved = env.sink.alias_targets(&users).await.expect("alias") != old;
        if moved {
            break;
        }
        assert_eq!(
            search_total(&env, &users).await,
            USERS as u64,
            "{}",
            env.log_tail()
        );
        let doc = env
            .sink
            .json_request(Method::Get, &format!("/{users}/_doc/7"), None)
            .await
            .expect("doc 7");
        if doc["_index"].as_str() != Some(old[0].as_str()) {
            break; // the alias moved between the two requests
        }
        assert_eq!(
            doc["_source"]["orders"].as_array().map(|a| a.len()),
            Some(1),
            "until the alias moves, searches see the old complete document: {doc}"
        );
        if !note_seen_while_rebuilding && env.count("notes").await == 11 {
            note_seen_while_rebuilding = true;
            println!(
                "notes streamed {:?} after the truncate, while users was rebuilt",
                truncated_at.elapsed()
            );
        }
        assert!(
            Instant::now() < deadline,
            "users never moved\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        note_seen_while_rebuilding,
        "the notes index did not stream while users was rebuilt\n{}",
        env.log_tail()
    );
    env.assert_converges_to("users", with_orders, Duration::from_secs(60))
        .await;
    env.assert_converges("notes", "notes", Duration::from_secs(30))
        .await;
    db.batch_execute("INSERT INTO orders VALUES (1, 1, 99)")
        .await
        .expect("order");
    env.assert_converges_to("users", with_orders, Duration::from_secs(60))
        .await;
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slot_still_advances_with_heartbeats() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE quiet (id int PRIMARY KEY, v text);
         INSERT INTO quiet SELECT g, 'v' || g FROM generate_series(1, 200) g;
         CREATE TABLE busy (id bigserial PRIMARY KEY, payload text);",
    )
    .await
    .expect("schema");
    let cfg = config(
        &env,
        &env.pg.url("app"),
        "heartbeat_secs = 1",
        "quiet",
        "quiet",
    );
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("quiet", "quiet", Duration::from_secs(60))
        .await;
    wait_for_log(&env, "streaming changes", 1, Duration::from_secs(30)).await;
    let published: bool = db
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = 'ferry_test' AND tablename = 'busy')",
            &[],
        )
        .await
        .expect("publication")
        .get(0);
    assert!(!published, "busy is outside the publication");
    // A second slot that sees logical messages (ferry's own stream does not
    // ask for them) shows whether ferry really writes heartbeats.
    db.batch_execute("SELECT pg_create_logical_replication_slot('heartbeat_probe', 'pgoutput')")
        .await
        .expect("probe slot");

    // Plenty of WAL, none of it for the index.
    for _ in 0..10 {
        db.batch_execute(
            "INSERT INTO busy (payload) SELECT repeat(md5(g::text), 4) FROM generate_series(1, 10000) g",
        )
        .await
        .expect("unrelated inserts");
    }
    // The insert position: the test cluster runs with synchronous_commit = off,
    // so the write position (pg_current_wal_lsn) may lag behind the last commit.
    let after: String = db
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    let (_, start) = slot(&db).await.expect("slot");
    let began = Instant::now();
    loop {
        let row = db
            .query_one(
                "SELECT confirmed_flush_lsn::text, confirmed_flush_lsn >= $1::text::pg_lsn
                 FROM pg_replication_slots WHERE slot_name = 'ferry_test'",
                &[&after],
            )
            .await
            .expect("slot");
        let (confirmed, past): (String, bool) = (row.get(0), row.get(1));
        if past {
            println!(
                "slot confirmed {start} → {confirmed} (past {after}) {:?} after the unrelated activity",
                began.elapsed()
            );
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "the idle slot did not advance past {after} within 10 s (confirmed {confirmed})\n--- ferry log ---\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The idle pipeline wrote heartbeats (heartbeat_secs = 1).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let beats: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('heartbeat_probe', NULL, NULL,
                   'proto_version', '1', 'publication_names', 'ferry_test', 'messages', 'true')
                 WHERE position('ferry_heartbeat'::bytea IN data) > 0",
                &[],
            )
            .await
            .expect("peek the probe slot")
            .get(0);
        if beats > 0 {
            println!("{beats} heartbeat message(s) seen while the indexed table was idle");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no heartbeat message within 10 s of idleness\n--- ferry log ---\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    db.batch_execute("SELECT pg_drop_replication_slot('heartbeat_probe')")
        .await
        .expect("drop the probe slot");
    // Still streaming, and the indexed table is untouched.
    env.assert_converges("quiet", "quiet", Duration::from_secs(10))
        .await;
    db.batch_execute("UPDATE quiet SET v = 'woke up' WHERE id = 1")
        .await
        .expect("update");
    env.assert_converges("quiet", "quiet", Duration::from_secs(30))
        .await;
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());
}

/// A raw TCP forwarder that can stall (stop moving bytes, connections stay
/// open) and cut every connection it carries.
struct TcpProxy {
    addr: SocketAddr,
    stalled: watch::Sender<bool>,
    generation: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    async fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (stalled, stalled_rx) = watch::channel(false);
        let (generation, generation_rx) = watch::channel(0u64);
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(carry(
                    client,
                    upstream,
                    stalled_rx.clone(),
                    generation_rx.clone(),
                ));
            }
        });
        TcpProxy {
            addr,
            stalled,
            generation,
            accepted,
            task,
        }
    }

    fn stall(&self, on: bool) {
        self.stalled.send_replace(on);
    }

    fn cut_all(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_all();
    }
}

/// Carries one connection until either side closes or the connection is cut.
async fn carry(
    client: TcpStream,
    upstream: SocketAddr,
    stalled: watch::Receiver<bool>,
    mut generation: watch::Receiver<u64>,
) {
    let born = *generation.borrow_and_update();
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::select! {
        _ = pump(cr, sw, stalled.clone()) => {}
        _ = pump(sr, cw, stalled) => {}
        _ = generation.wait_for(|g| *g != born) => {}
    }
    // Dropping both halves of both sockets closes them.
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just as the stall began wait for it to end.
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_stall_is_survived() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE s (id int PRIMARY KEY, v text);
         INSERT INTO s SELECT g, 'v' || g FROM generate_series(1, 500) g;",
    )
    .await
    .expect("schema");
    let upstream: SocketAddr = format!("{}:{}", env.pg.host(), env.pg.port())
        .parse()
        .expect("PostgreSQL address");
    let proxy = TcpProxy::start(upstream).await;
    let via_proxy = format!("postgres://postgres@{}/app", proxy.addr);
    let cfg = config(&env, &via_proxy, "", "s", "s");
    let mut ferry = env.run_ferry(&cfg);
    env.assert_converges("s", "s", Duration::from_secs(60))
        .await;
    wait_for_log(&env, "streaming changes", 1, Duration::from_secs(30)).await;

    // 1. A 5 s stall, then the path comes back: the same sessions go on.
    proxy.stall(true);
    let stalled_at = Instant::now();
    churn(&db, 1000).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        ferry.is_running(),
        "ferry exited during the stall\n{}",
        env.log_tail()
    );
    assert!(
        differences(&env, &db, "s", "s").await > 0,
        "the index caught up although the path to PostgreSQL was stalled: the stall did not hold"
    );
    let accepted_before = proxy.accepted();
    proxy.stall(false);
    env.assert_converges("s", "s", Duration::from_secs(30))
        .await;
    println!(
        "stall without cut: converged {:?} after the stall began; {} new connection(s) meanwhile",
        stalled_at.elapsed(),
        proxy.accepted() - accepted_before
    );

    // 2. Stall, then every connection is cut, then the path comes back:
    // ferry reconnects and resumes from the slot.
    proxy.stall(true);
    churn(&db, 2000).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        ferry.is_running(),
        "ferry exited during the stall\n{}",
        env.log_tail()
    );
    let accepted_before = proxy.accepted();
    proxy.cut_all();
    proxy.stall(false);
    let cut_at = Instant::now();
    churn(&db, 3000).await;
    env.assert_converges("s", "s", Duration::from_secs(60))
        .await;
    println!(
        "stall then cut: converged {:?} after the cut; ferry opened {} new connection(s)",
        cut_at.elapsed(),
        proxy.accepted() - accepted_before
    );
    assert!(
        proxy.accepted() > accepted_before,
        "ferry reconnected through the proxy"
    );
    let log = env.log();
    let restart = log
        .lines()
        .find(|l| l.contains("restarting"))
        .unwrap_or_else(|| {
            panic!(
                "ferry rebuilt its pipeline after the cut\n{}",
                env.log_tail()
            )
        });
    println!("ferry after the cut: {restart}");
    assert!(ferry.is_running(), "{}", env.log_tail());
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publication_losing_a_table_stops_ferry_with_the_fix() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE pubt (id int PRIMARY KEY, v text);
         INSERT INTO pubt SELECT g, 'v' || g FROM generate_series(1, 50) g;",
    )
    .await
    .expect("schema");
    let cfg = env.config("pubt", "pubt", "");
    let mut ferry = env.run_ferry(&cfg);
    env.assert_converges("pubt", "pubt", Duration::from_secs(60))
        .await;
    db.batch_execute("ALTER PUBLICATION ferry_test DROP TABLE pubt")
        .await
        .expect("drop table from publication");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while ferry.is_running() {
        assert!(
            std::time::Instant::now() < deadline,
            "ferry kept running with a table outside its publication\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = env.log();
    assert!(
        log.contains("no longer covers table public.pubt") && log.contains("ferry reindex"),
        "{}",
        env.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_commands_show_and_drop_the_slot() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute("CREATE TABLE sl (id int PRIMARY KEY); INSERT INTO sl VALUES (1), (2);")
        .await
        .expect("schema");
    let cfg = env.config("sl", "sl", "");
    let cfg_s = cfg.to_str().expect("utf8").to_string();
    let (_, out, _) = ferry_e2e::ferry_once(&["slot", "--config", &cfg_s, "info"]);
    assert!(out.contains("does not exist"), "{out}");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("sl", "sl", Duration::from_secs(60))
        .await;
    let (code, out, _) = ferry_e2e::ferry_once(&["slot", "--config", &cfg_s, "info"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("confirmed flush lsn") && out.contains("active               true"),
        "{out}"
    );
    let (code, _, err) = ferry_e2e::ferry_once(&["slot", "--config", &cfg_s, "drop", "--yes"]);
    assert_ne!(code, 0);
    assert!(err.contains("stop ferry first"), "{err}");
    assert_eq!(ferry.stop(), Some(0));
    let (code, out, _) = ferry_e2e::ferry_once(&["slot", "--config", &cfg_s, "drop"]);
    assert_eq!(code, 2, "{out}");
    let (code, out, _) = ferry_e2e::ferry_once(&["slot", "--config", &cfg_s, "drop", "--yes"]);
    assert_eq!(code, 0);
    assert!(out.contains("dropped slot"), "{out}");
    let n: i64 = db
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .expect("slots")
        .get(0);
    assert_eq!(n, 0);
}
