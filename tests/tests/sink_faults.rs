//! End-to-end: the real ferry binary writes to OpenSearch through a
//! `FaultProxy` that fails bulk requests on demand, while PostgreSQL keeps
//! changing. Each test is named after the invariant it guards: transient
//! sink failures are retried until every change lands, nothing is treated
//! as poison that is not, and the replication slot never confirms changes
//! that are not yet in the index.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_e2e::{compare, rows_as_json, FerryProcess, TestEnv};
use ferry_testkit::{Fault, FaultProxy};

/// A test environment whose sink URL is a fault proxy in front of the test OpenSearch.
struct Rig {
    env: TestEnv,
    proxy: FaultProxy,
}

impl Rig {
    /// Starts PostgreSQL, the test OpenSearch and a proxy in front of it;
    /// `None` (the test is skipped) only for a cluster outside the test kit
    /// (`FERRY_TEST_OPENSEARCH_URL`) that the proxy cannot speak to (HTTPS).
    /// On the kit's own engines a proxy that does not start fails the test.
    async fn start() -> Option<Rig> {
        let env = TestEnv::start().await;
        match FaultProxy::start(env.os.url()).await {
            Ok(proxy) => Some(Rig { env, proxy }),
            Err(e) if env.os.engine() == "external" => {
                eprintln!("skipping: the fault proxy cannot front this cluster: {e}");
                None
            }
            Err(e) => panic!("starting the fault proxy: {e}"),
        }
    }

    /// Like `TestEnv::config`, but ferry's sink is the proxy. `sink` and
    /// `engine` are extra lines for those sections.
    fn config(&self, index: &str, table: &str, sink: &str, engine: &str) -> PathBuf {
        let text = format!(
            "[source]\nurl = \"{}\"\nslot = \"ferry_test\"\npublication = \"ferry_test\"\n\n\
             [sink]\nurl = \"{}\"\n{sink}\n\n\
             [engine]\n{engine}\n\n\
             [[index]]\nname = \"{}\"\ntable = \"{}\"\n",
            self.env.pg.url("app"),
            self.proxy.url(),
            self.env.index(index),
            table
        );
        self.env.write_config(&text)
    }

    /// Differences between `table` and `index` right now (empty: converged).
    async fn differences(&self, db: &tokio_postgres::Client, index: &str, table: &str) -> usize {
        let rows = rows_as_json(db, table).await;
        let docs = self.env.documents(index).await;
        compare(&rows, &docs).len()
    }

    /// Panics with the log if ferry is no longer running.
    fn assert_running(&self, ferry: &mut FerryProcess, when: &str) {
        assert!(
            ferry.is_running(),
            "ferry exited {when}\n--- ferry log ---\n{}",
            self.env.log_tail()
        );
    }

    /// Stops ferry and expects a clean exit.
    fn stop(&self, ferry: FerryProcess) {
        assert_eq!(
            ferry.stop(),
            Some(0),
            "ferry exits 0 on SIGTERM\n{}",
            self.env.log_tail()
        );
    }
}

/// `docs` with `rows` rows.
async fn create_docs(db: &tokio_postgres::Client, rows: u32) {
    db.batch_execute(&format!(
        "CREATE TABLE docs (
             id         bigint PRIMARY KEY,
             title      text NOT NULL,
             n          integer,
             tags       text[],
             updated_at timestamptz DEFAULT now()
         );
         INSERT INTO docs (id, title, n, tags)
         SELECT g, 'title ' || g, g % 97, ARRAY['t' || (g % 5), 'all']
         FROM generate_series(1, {rows}) g;"
    ))
    .await
    .expect("create docs");
}

/// 1,000 changes over rows 1..=2000 in several transactions: 400 inserts
/// (ids from `first_new`), 400 updates, 200 deletes.
async fn thousand_changes(db: &tokio_postgres::Client, first_new: u32) {
    let mut sql = String::new();
    for part in 0..4 {
        let from = first_new + part * 100;
        sql.push_str(&format!(
            "INSERT INTO docs (id, title, n) SELECT g, 'new ' || g, g FROM generate_series({from}, {}) g;\n",
            from + 99
        ));
    }
    sql.push_str(
        "UPDATE docs SET title = 'updated ' || id, n = NULL, tags = '{}' WHERE id % 5 = 0 AND id <= 2000;
         BEGIN;
         DELETE FROM docs WHERE id % 10 = 1 AND id <= 1000;
         DELETE FROM docs WHERE id % 10 = 1 AND id BETWEEN 1001 AND 2000;
         COMMIT;",
    );
    db.batch_execute(&sql).await.expect("1,000 changes");
}

async fn lsn(db: &tokio_postgres::Client, sql: &str) -> String {
    db.query_one(sql, &[]).await.expect("read an LSN").get(0)
}

/// The slot's `confirmed_flush_lsn`, and whether `confirmed_flush_lsn <op> lsn`.
async fn slot_vs(db: &tokio_postgres::Client, op: &str, lsn: &str) -> (String, bool) {
    let row = db
        .query_one(
            &format!(
                "SELECT confirmed_flush_lsn::text, confirmed_flush_lsn {op} $1::text::pg_lsn
                 FROM pg_replication_slots WHERE slot_name = 'ferry_test'"
            ),
            &[&lsn],
        )
        .await
        .expect("read the slot");
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_503s_then_429s_ends_in_full_convergence_without_restart() {
    let Some(rig) = Rig::start().await else {
        return;
    };
    let db = rig.env.db().await;
    create_docs(&db, 2000).await;
    let cfg = rig.config("docs", "docs", "", "max_batch_delay_ms = 20");
    let mut ferry = rig.env.run_ferry(&cfg);
    rig.env
        .assert_converges("docs", "docs", Duration::from_secs(60))
        .await;

    rig.proxy.set(Fault::Status {
        status: 503,
        times: None,
    });
    let before = rig.proxy.injected();
    let outage = Instant::now();
    thousand_changes(&db, 10_001).await;
    assert!(
        rig.proxy
            .wait_for_injected(before + 1, Duration::from_secs(10))
            .await,
        "ferry never sent a bulk request during the outage\n{}",
        rig.env.log_tail()
    );
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed())).await;
    rig.assert_running(&mut ferry, "during the 503 outage");
    // A full minute of outage: 30 s of 503s, then 30 s of 429s.
    rig.proxy.set(Fault::Status {
        status: 429,
        times: None,
    });
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(outage.elapsed())).await;
    rig.assert_running(&mut ferry, "during the 429 throttling");
    assert!(
        rig.proxy.injected() >= before + 2,
        "ferry retried the failed bulk during the outage ({} answered 503)",
        rig.proxy.injected() - before
    );
    let pending = rig.differences(&db, "docs", "docs").await;
    assert!(
        pending > 0,
        "the index converged although every bulk request failed: the fault did not hold"
    );

    rig.proxy.clear();
    rig.env
        .assert_converges("docs", "docs", Duration::from_secs(45))
        .await;
    rig.assert_running(&mut ferry, "after the outage");
    rig.stop(ferry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_429_is_retried_not_treated_as_poison() {
    let Some(rig) = Rig::start().await else {
        return;
    };
    let db = rig.env.db().await;
    create_docs(&db, 1000).await;

    // Whole-request 429s: the first four bulk requests of the backfill.
    rig.proxy.set(Fault::Status {
        status: 429,
        times: Some(4),
    });
    let cfg = rig.config("docs", "docs", "", "max_batch_delay_ms = 20");
    let mut ferry = rig.env.run_ferry(&cfg);
    rig.env
        .assert_converges("docs", "docs", Duration::from_secs(60))
        .await;
    assert_eq!(rig.proxy.injected(), 4, "four bulk requests were throttled");
    rig.assert_running(&mut ferry, "after whole-request 429s");

    // Per-item 429s on every third item of the next twelve bulks that have
    // one. Each round is one transaction of 150 changes, applied before the
    // next starts, so its bulk and the retries of its throttled items are
    // altered four times (150 -> 50 -> 16 -> 5 -> 1 item, and a bulk of
    // fewer than three items passes): three rounds use the twelve faults.
    // Rounds go on until they are used, whatever the batching.
    rig.proxy.set(Fault::ItemStatus {
        status: 429,
        every_nth: 3,
        times: Some(12),
    });
    let mut round = 0u32;
    while rig.proxy.fault().is_some() {
        assert!(
            round < 12,
            "twelve rounds did not use twelve per-item faults"
        );
        let lo = (round % 4) * 250 + 1;
        db.batch_execute(&format!(
            "UPDATE docs SET title = 'round {round} ' || id, n = {round} WHERE id BETWEEN {lo} AND {};
             INSERT INTO docs (id, title) SELECT g, 'inserted in round {round}' FROM generate_series({}, {}) g;",
            lo + 99,
            5000 + round * 100,
            5000 + round * 100 + 49,
        ))
        .await
        .expect("changes");
        rig.env
            .assert_converges("docs", "docs", Duration::from_secs(60))
            .await;
        round += 1;
    }
    assert!(rig.proxy.items_rejected() >= 12);
    rig.assert_running(&mut ferry, "after per-item 429s");
    let log = rig.env.log();
    assert!(
        !log.contains("OpenSearch rejected document"),
        "a throttled item was treated as poison:\n{}",
        rig.env.log_tail()
    );
    rig.stop(ferry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_and_timeouts_are_retried() {
    let Some(rig) = Rig::start().await else {
        return;
    };
    let db = rig.env.db().await;
    create_docs(&db, 500).await;
    let cfg = rig.config(
        "docs",
        "docs",
        "request_timeout_secs = 2",
        "max_batch_delay_ms = 20",
    );
    let mut ferry = rig.env.run_ferry(&cfg);
    rig.env
        .assert_converges("docs", "docs", Duration::from_secs(60))
        .await;

    // Five bulk requests lose their connection without an answer.
    rig.proxy.set(Fault::DropConnection { times: Some(5) });
    let before = rig.proxy.injected();
    db.batch_execute("UPDATE docs SET title = 'after drops ' || id WHERE id % 3 = 0")
        .await
        .expect("changes");
    assert!(
        rig.proxy
            .wait_for_injected(before + 5, Duration::from_secs(20))
            .await,
        "ferry did not retry through five dropped connections (saw {})\n{}",
        rig.proxy.injected() - before,
        rig.env.log_tail()
    );
    rig.env
        .assert_converges("docs", "docs", Duration::from_secs(30))
        .await;
    rig.assert_running(&mut ferry, "after dropped connections");

    // Then the cluster stops answering at all: ferry's 2 s timeout must fire.
    rig.proxy.set(Fault::Blackhole);
    let before = rig.proxy.injected();
    let hole = Instant::now();
    db.batch_execute(
        "INSERT INTO docs (id, title) SELECT g, 'during blackhole' FROM generate_series(501, 700) g;
         DELETE FROM docs WHERE id BETWEEN 1 AND 50;",
    )
    .await
    .expect("changes");
    // A second blackholed request means the first one timed out and was retried.
    assert!(
        rig.proxy
            .wait_for_injected(before + 2, Duration::from_secs(10))
            .await,
        "ferry did not give up on an unanswered request within its 2 s timeout (saw {} requests)\n{}",
        rig.proxy.injected() - before,
        rig.env.log_tail()
    );
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(hole.elapsed())).await;
    rig.assert_running(&mut ferry, "while the sink did not answer");
    assert!(
        rig.differences(&db, "docs", "docs").await > 0,
        "the index converged although no bulk request was answered: the fault did not hold"
    );
    rig.proxy.clear();
    rig.env
        .assert_converges("docs", "docs", Duration::from_secs(30))
        .await;
    rig.assert_running(&mut ferry, "after the blackhole");
    rig.stop(ferry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_too_large_413_splits_the_batch() {
    let Some(rig) = Rig::start().await else {
        return;
    };
    let db = rig.env.db().await;
    create_docs(&db, 1000).await;
    // The backfill sends all 1,000 rows in one bulk (backfill_batch_rows is
    // 5,000); a long batch delay keeps the later transaction in one bulk too,
    // so three halvings never reach a single document.
    rig.proxy.set(Fault::Status {
        status: 413,
        times: Some(3),
    });
    let cfg = rig.config("docs", "docs", "", "max_batch_delay_ms = 1500");
    let mut ferry = rig.env.run_ferry(&cfg);
    rig.env
        .assert_converges("docs", "docs", Duration::from_secs(60))
        .await;
    assert_eq!(rig.proxy.injected(), 3, "three requests answered 413");
    rig.assert_running(&mut ferry, "after 413s during the backfill");

    rig.proxy.set(Fault::Status {
        status: 413,
        times: Some(3),
    });
    db.batch_execute(
        "BEGIN;
         INSERT INTO docs (id, title, n) SELECT g, 'big batch ' || g, g FROM generate_series(1001, 1800) g;
         UPDATE docs SET title = 'big update ' || id WHERE id <= 200;
         COMMIT;",
    )
    .await
    .expect("one large transaction");
    rig.env
        .assert_converges("docs", "docs", Duration::from_secs(45))
        .await;
    assert_eq!(rig.proxy.injected(), 6, "three more requests answered 413");
    rig.assert_running(&mut ferry, "after 413s on live changes");
    let splits = rig.env.log().matches("splitting it").count();
    assert!(
        splits >= 6,
        "ferry logged {splits} splits for six 413 answers\n{}",
        rig.env.log_tail()
    );
    rig.stop(ferry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_does_not_advance_past_unflushed_changes() {
    let Some(rig) = Rig::start().await else {
        return;
    };
    let db = rig.env.db().await;
    create_docs(&db, 500).await;
    let cfg = rig.config("docs", "docs", "", "max_batch_delay_ms = 20");
    let mut ferry = rig.env.run_ferry(&cfg);
    rig.env
        .assert_converges("docs", "docs", Duration::from_secs(60))
        .await;

    rig.proxy.set(Fault::Status {
        status: 503,
        times: None,
    });
    let before = rig.proxy.injected();
    // The insert position just before a transaction's COMMIT is below the end
    // of its commit record, which is what confirming that transaction reports.
    db.batch_execute("BEGIN; UPDATE docs SET title = 'outage ' || id WHERE id <= 100;")
        .await
        .expect("first change");
    let first_precommit = lsn(&db, "SELECT pg_current_wal_insert_lsn()::text").await;
    db.batch_execute("COMMIT").await.expect("commit");
    db.batch_execute(
        "INSERT INTO docs (id, title) SELECT g, 'outage insert' FROM generate_series(501, 600) g;
         DELETE FROM docs WHERE id BETWEEN 401 AND 450;",
    )
    .await
    .expect("more changes");
    db.batch_execute("BEGIN; UPDATE docs SET n = -1 WHERE id BETWEEN 300 AND 320;")
        .await
        .expect("last change");
    let last_precommit = lsn(&db, "SELECT pg_current_wal_insert_lsn()::text").await;
    db.batch_execute("COMMIT").await.expect("commit");
    let after_changes = lsn(&db, "SELECT pg_current_wal_lsn()::text").await;

    assert!(
        rig.proxy
            .wait_for_injected(before + 1, Duration::from_secs(10))
            .await,
        "ferry never tried to write the changes\n{}",
        rig.env.log_tail()
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    rig.assert_running(&mut ferry, "during the outage");
    let (confirmed, past_first) = slot_vs(&db, ">", &first_precommit).await;
    assert!(
        !past_first,
        "the slot confirmed {confirmed} while the first unflushed transaction commits after {first_precommit}: \
         ferry confirmed changes it could not write\n{}",
        rig.env.log_tail()
    );
    assert!(
        rig.differences(&db, "docs", "docs").await > 0,
        "the index converged although every bulk request failed: the fault did not hold"
    );

    rig.proxy.clear();
    rig.env
        .assert_converges("docs", "docs", Duration::from_secs(45))
        .await;
    // Once everything is flushed the slot moves past all of it: first past
    // the last commit, then (keepalives of an idle stream) past the WAL
    // position read after the changes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (confirmed, past_last) = slot_vs(&db, ">", &last_precommit).await;
        let (_, past_all) = slot_vs(&db, ">=", &after_changes).await;
        if past_last && past_all {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "10 s after converging the slot is still at {confirmed}: not past the last \
             flushed commit (which ends after {last_precommit}: {past_last}) or the WAL \
             position after the changes ({after_changes}: {past_all})\n{}",
            rig.env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    rig.assert_running(&mut ferry, "after the outage");
    rig.stop(ferry);
}

/// A copy that reaches a row more than a minute after the stream deleted it
/// must not bring it back: the delete's tombstone would have expired under
/// OpenSearch's default `index.gc_deletes` (60 s), so ferry raises it while
/// an index seeds. Each bulk request is slowed to make the copy take ~80 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_never_resurrects_a_row_deleted_more_than_a_minute_earlier() {
    let Some(rig) = Rig::start().await else {
        return;
    };
    let db = rig.env.db().await;
    db.batch_execute(
        "CREATE TABLE late (id int PRIMARY KEY, v text);
         INSERT INTO late SELECT g, 'v' || g FROM generate_series(1, 36) g;",
    )
    .await
    .expect("schema");
    rig.proxy.set(Fault::Delay(Duration::from_millis(2200)));
    let cfg = rig.config(
        "late",
        "late",
        "",
        "max_batch_delay_ms = 20\nbackfill_batch_rows = 1\nbackfill_chunk_rows = 1000",
    );
    let mut ferry = rig.env.run_ferry(&cfg);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !rig.env.log().contains("streaming changes") {
        assert!(
            Instant::now() < deadline,
            "never streamed\n{}",
            rig.env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The last row in key order: the copy reaches it last, ~80 s from now;
    // the stream's delete lands within seconds.
    db.batch_execute("DELETE FROM late WHERE id = 36")
        .await
        .expect("delete");
    let started = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(240);
    while !rig.env.log().contains("backfill finished") {
        assert!(
            Instant::now() < deadline,
            "the copy never finished\n{}",
            rig.env.log_tail()
        );
        rig.assert_running(&mut ferry, "while seeding");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        started.elapsed() > Duration::from_secs(65),
        "the copy reached the deleted row only {:?} after its delete: the test proves nothing",
        started.elapsed()
    );
    rig.proxy.clear();
    rig.env
        .assert_converges("late", "late", Duration::from_secs(60))
        .await;
    assert_eq!(ferry.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_block_stops_ferry_unconfirmed_and_nothing_is_lost_once_lifted() {
    use ferry_opensearch::Method;
    let env = TestEnv::start().await;
    let db = env.db().await;
    create_docs(&db, 200).await;
    let cfg = env.config("docs", "docs", "");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("docs", "docs", Duration::from_secs(60))
        .await;
    let concrete = env
        .sink
        .alias_targets(&env.index("docs"))
        .await
        .expect("alias")
        .remove(0);
    let block = |on: bool| serde_json::json!({"index": {"blocks": {"write": if on { serde_json::json!(true) } else { serde_json::Value::Null }}}});
    env.sink
        .json_request(
            Method::Put,
            &format!("/{concrete}/_settings"),
            Some(block(true)),
        )
        .await
        .expect("block writes");
    let before: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    db.batch_execute("UPDATE docs SET title = 'while blocked' WHERE id <= 10; INSERT INTO docs (id, title) VALUES (9001, 'blocked')")
        .await
        .expect("changes");

    // The 403 needs an operator: ferry stops with the reason, dead-letters
    // nothing, counts nothing as written and confirms nothing past it.
    let code = ferry.exit_code_within(Duration::from_secs(60));
    assert_eq!(code, Some(1), "{}", env.log_tail());
    let log = env.log();
    let error = log
        .lines()
        .rev()
        .find(|l| l.contains("ferry stopped"))
        .unwrap_or("(no final error)");
    assert!(
        error.contains(&concrete) && error.contains("index.blocks.write") && error.contains("403"),
        "the error names the index, the status and the fix: {error}"
    );
    assert!(
        !log.contains("dead letter"),
        "nothing was dead-lettered\n{}",
        env.log_tail()
    );
    let unconfirmed: bool = db
        .query_one(
            &format!("SELECT confirmed_flush_lsn <= '{before}'::pg_lsn FROM pg_replication_slots WHERE slot_name = 'ferry_test'"),
            &[],
        )
        .await
        .expect("slot")
        .get(0);
    assert!(
        unconfirmed,
        "the slot confirmed changes the cluster refused"
    );

    env.sink
        .json_request(
            Method::Put,
            &format!("/{concrete}/_settings"),
            Some(block(false)),
        )
        .await
        .expect("lift the block");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("docs", "docs", Duration::from_secs(60))
        .await;
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_index_stops_ferry_and_a_restart_rebuilds_it() {
    use ferry_opensearch::Method;
    let env = TestEnv::start().await;
    let db = env.db().await;
    create_docs(&db, 200).await;
    let cfg = env.config("docs", "docs", "");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("docs", "docs", Duration::from_secs(60))
        .await;
    let alias = env.index("docs");
    let concrete = env
        .sink
        .alias_targets(&alias)
        .await
        .expect("alias")
        .remove(0);
    // Without this the cluster would recreate the index on the next write
    // with guessed mappings; the docs tell operators to set it the same way.
    let auto_create = |value: serde_json::Value| serde_json::json!({"persistent": {"action.auto_create_index": value}});
    env.sink
        .json_request(
            Method::Put,
            "/_cluster/settings",
            Some(auto_create(serde_json::json!(format!("-{alias}*,+*")))),
        )
        .await
        .expect("exclude the test's indexes from auto-creation");
    env.sink
        .json_request(Method::Delete, &format!("/{concrete}"), None)
        .await
        .expect("delete the index behind ferry's back");
    db.batch_execute("UPDATE docs SET title = 'index gone' WHERE id <= 10")
        .await
        .expect("changes");
    let code = ferry.exit_code_within(Duration::from_secs(60));
    env.sink
        .json_request(
            Method::Put,
            "/_cluster/settings",
            Some(auto_create(serde_json::Value::Null)),
        )
        .await
        .expect("reset auto-creation");
    assert_eq!(code, Some(1), "{}", env.log_tail());
    let log = env.log();
    let error = log
        .lines()
        .rev()
        .find(|l| l.contains("ferry stopped"))
        .unwrap_or("(no final error)");
    assert!(
        error.contains(&concrete)
            && error.contains("does not exist")
            && error.contains("restart ferry"),
        "the error names the index and the way back: {error}"
    );
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("docs", "docs", Duration::from_secs(60))
        .await;
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_resume_within_5_s_of_the_cluster_answering_after_a_long_outage() {
    use ferry_opensearch::Method;
    let Some(rig) = Rig::start().await else {
        return;
    };
    let db = rig.env.db().await;
    create_docs(&db, 100).await;
    let cfg = rig.config("docs", "docs", "", "max_batch_delay_ms = 20");
    let mut ferry = rig.env.run_ferry(&cfg);
    rig.env
        .assert_converges("docs", "docs", Duration::from_secs(60))
        .await;
    rig.proxy.set(Fault::Status {
        status: 503,
        times: None,
    });
    db.batch_execute("INSERT INTO docs (id, title) VALUES (7001, 'during the outage')")
        .await
        .expect("insert");
    // Long enough for a growing backoff to reach its old 30 s cap.
    tokio::time::sleep(Duration::from_secs(45)).await;
    rig.assert_running(&mut ferry, "during the outage");
    let alias = rig.env.index("docs");
    let back = Instant::now();
    rig.proxy.clear();
    loop {
        // Straight to the cluster, not through the proxy.
        let found = rig
            .env
            .sink
            .json_request(Method::Get, &format!("/{alias}/_doc/7001"), None)
            .await
            .map(|d| d["found"] == serde_json::json!(true))
            .unwrap_or(false);
        if found {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "the change was not indexed within 5 s of the cluster answering again\n{}",
            rig.env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "indexed {:?} after the cluster answered again",
        back.elapsed()
    );
    rig.stop(ferry);
}

/// With several bulk requests in flight, a request held back by the proxy
/// is overtaken by a later one writing the same documents: the documents
/// end with the newer content (versions), and the slot is never confirmed
/// past the held request's transaction until it lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_bulk_overtaken_by_a_later_one_never_lets_the_slot_pass_it() {
    let Some(rig) = Rig::start().await else {
        return;
    };
    let db = rig.env.db().await;
    create_docs(&db, 200).await;
    let cfg = rig.config(
        "docs",
        "docs",
        "",
        "max_batch_delay_ms = 20\nmax_in_flight_bulks = 4",
    );
    let mut ferry = rig.env.run_ferry(&cfg);
    rig.env
        .assert_converges("docs", "docs", Duration::from_secs(60))
        .await;

    let hold = Duration::from_secs(8);
    rig.proxy.set(Fault::DelayContaining {
        needle: "held back".into(),
        delay: hold,
        times: Some(1),
    });
    let before = rig.proxy.injected();
    // Transaction A: its bulk request is held back.
    db.batch_execute("BEGIN; UPDATE docs SET title = 'held back ' || id WHERE id <= 50;")
        .await
        .expect("A");
    let a_precommit = lsn(&db, "SELECT pg_current_wal_insert_lsn()::text").await;
    db.batch_execute("COMMIT").await.expect("commit A");
    assert!(
        rig.proxy
            .wait_for_injected(before + 1, Duration::from_secs(10))
            .await,
        "ferry never sent transaction A\n{}",
        rig.env.log_tail()
    );
    let held_at = Instant::now();
    // Transaction B: the same documents again (and deletes of others); its
    // request passes at once and overtakes A's.
    db.batch_execute(
        "BEGIN;
         UPDATE docs SET title = 'overtook ' || id, n = -1 WHERE id <= 50;
         DELETE FROM docs WHERE id BETWEEN 151 AND 160;
         COMMIT;",
    )
    .await
    .expect("B");
    let after_b = lsn(&db, "SELECT pg_current_wal_lsn()::text").await;

    // B's documents are in the index while A is still held back.
    loop {
        let docs = rig.env.documents("docs").await;
        let title = docs
            .get("1")
            .and_then(|d| d["title"].as_str().map(str::to_owned));
        if title.as_deref() == Some("overtook 1") && !docs.contains_key("151") {
            break;
        }
        assert!(
            held_at.elapsed() < hold - Duration::from_secs(2),
            "the later request did not land while the earlier one was held (title of 1: {title:?})\n{}",
            rig.env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rig.proxy.delayed_answered(), 0, "A was still held");
    // Until A lands, the slot stays before A's commit.
    let mut samples = 0;
    while rig.proxy.delayed_answered() == 0 {
        let (confirmed, past_a) = slot_vs(&db, ">", &a_precommit).await;
        assert!(
            !past_a,
            "the slot confirmed {confirmed} while transaction A (commit after {a_precommit}) was still in flight\n{}",
            rig.env.log_tail()
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(samples >= 10, "only {samples} samples while A was held");

    // A landed late and lost to B's newer versions: the index equals the table.
    rig.env
        .assert_converges("docs", "docs", Duration::from_secs(30))
        .await;
    let docs = rig.env.documents("docs").await;
    assert_eq!(docs["50"]["title"], "overtook 50", "the newer write won");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (confirmed, past_all) = slot_vs(&db, ">=", &after_b).await;
        if past_all {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot stays at {confirmed} after A landed, below {after_b}\n{}",
            rig.env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    rig.assert_running(&mut ferry, "after the overtaking");
    rig.stop(ferry);
}
