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

/// Panics unless the index name (an alias managed by ferry) points at an index.
async fn assert_alias_resolves(env: &TestEnv, index: &str) {
    let alias = env.index(index);
    if let Err(e) = env
        .sink
        .json_request(Method::Get, &format!("/_alias/{alias}"), None)
        .await
    {
        let all = env
            .sink
            .json_request(Method::Get, "/_aliases", None)
            .await
            .map(|v| v.to_string())
            .unwrap_or_else(|e| e.to_string());
        panic!(
            "after the re-seed the index name {alias:?} points at no index ({e}); \
             indexes and their aliases: {all}\n--- ferry log ---\n{}",
            env.log_tail()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_slot_stops_ferry_with_the_way_back() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE s (id int PRIMARY KEY, v text);
         INSERT INTO s SELECT g, 'v' || g FROM generate_series(1, 500) g;",
    )
    .await
    .expect("schema");
    let cfg = env.config("s", "s", "");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("s", "s", Duration::from_secs(60))
        .await;
    wait_for_log(&env, "streaming changes", 1, Duration::from_secs(30)).await;

    // 1. Dropped while ferry is down.
    ferry.kill();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match db
            .batch_execute("SELECT pg_drop_replication_slot('ferry_test')")
            .await
        {
            Ok(()) => break,
            // The walsender of the killed process may still hold it for a moment.
            Err(e) if Instant::now() < deadline => {
                eprintln!("drop not yet possible: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("could not drop the slot of a killed ferry: {e}"),
        }
    }
    churn(&db, 1000).await;
    // Rows deleted while nobody recorded it: their documents must go too.
    db.batch_execute("DELETE FROM s WHERE id BETWEEN 100 AND 149")
        .await
        .expect("delete");
    let mut ferry = env.run_ferry(&cfg);
    wait_for_log(&env, "streaming changes", 2, Duration::from_secs(60)).await;
    assert_alias_resolves(&env, "s").await;
    env.assert_converges("s", "s", Duration::from_secs(60))
        .await;
    assert!(slot(&db).await.is_some(), "ferry recreated the slot");
    let log = env.log();
    assert_eq!(
        log.matches("backfill started").count(),
        2,
        "a new slot means a re-seed\n{}",
        env.log_tail()
    );
    wait_for_log(&env, "streaming changes", 2, Duration::from_secs(30)).await;
    churn(&db, 2000).await;
    env.assert_converges("s", "s", Duration::from_secs(60))
        .await;

    // 2. Dropped under a running ferry: end its walsender and drop the slot
    // before ferry reconnects.
    let streams_before = env.log().matches("streaming changes").count();
    let log_before_drop = env.log().len();
    let backfills_before = env.log().matches("backfill started").count();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let r = db
            .batch_execute(
                "SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots
                   WHERE slot_name = 'ferry_test' AND active_pid IS NOT NULL;
                 SELECT pg_drop_replication_slot('ferry_test');",
            )
            .await;
        match r {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                if attempts <= 3 {
                    eprintln!("drop attempt {attempts} failed: {e}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("could not drop the slot under ferry in 30 s: {e}"),
        }
    }
    println!("slot dropped under the running ferry after {attempts} attempt(s)");
    churn(&db, 3000).await;

    // Either ferry ends with an error naming the slot and the way back, or
    // it recovers by itself (new slot, re-seed). Which one is reported.
    let deadline = Instant::now() + Duration::from_secs(60);
    let outcome = loop {
        if !ferry.is_running() {
            break "exited";
        }
        if env.log().matches("streaming changes").count() > streams_before
            && slot(&db).await.is_some_and(|(active, _)| active)
        {
            break "recovered";
        }
        assert!(
            Instant::now() < deadline,
            "ferry neither stopped nor recovered within 60 s of the slot drop\n--- ferry log ---\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let ferry = if outcome == "exited" {
        let code = ferry.stop();
        let log = env.log();
        let last_error = log
            .lines()
            .rev()
            .find(|l| l.contains("ERROR"))
            .unwrap_or("(no ERROR line)")
            .to_string();
        println!("observed: ferry exited with {code:?} after the slot drop: {last_error}");
        assert_ne!(code, Some(0), "losing the slot is an error exit");
        assert!(
            last_error.contains("slot") && last_error.contains("restart ferry"),
            "the error names the slot and what to do: {last_error}"
        );
        let streams = env.log().matches("streaming changes").count();
        let ferry = env.run_ferry(&cfg);
        wait_for_log(
            &env,
            "streaming changes",
            streams + 1,
            Duration::from_secs(60),
        )
        .await;
        ferry
    } else {
        let log = env.log();
        let lines: Vec<&str> = log[log_before_drop..]
            .lines()
            .filter(|l| {
                l.contains("WARN")
                    || l.contains("ERROR")
                    || l.contains("slot")
                    || l.contains("recreating")
            })
            .collect();
        println!(
            "observed: ferry recovered by itself after the slot drop:\n{}",
            lines.join("\n")
        );
        ferry
    };
    assert_alias_resolves(&env, "s").await;
    churn(&db, 4000).await;
    env.assert_converges("s", "s", Duration::from_secs(60))
        .await;
    assert!(slot(&db).await.is_some(), "a slot exists again");
    assert!(
        env.log().matches("backfill started").count() > backfills_before,
        "the lost slot led to a re-seed"
    );
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
