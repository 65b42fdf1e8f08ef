//! Capture survives real databases: TOAST, TRUNCATE, DDL, restarts, big
//! transactions, a standby taking over.

use std::time::Duration;

use ferry_e2e::TestEnv;

const CONVERGE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_value_is_kept_not_nulled() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    // ~40 KB of incompressible text per row: stored out of line (TOAST).
    db.batch_execute(
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
         INSERT INTO docs SELECT g, 'title ' || g,
           (SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 1250) i)
         FROM generate_series(1, 50) g;",
    )
    .await
    .expect("schema");
    let cfg = env.config("docs", "docs", "");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("docs", "docs", CONVERGE).await;
    // Updates that do not touch body: pgoutput sends body as 'unchanged'.
    db.batch_execute(
        "UPDATE docs SET title = 'retitled ' || id WHERE id <= 25;
         BEGIN; UPDATE docs SET title = 'in txn' WHERE id = 30; DELETE FROM docs WHERE id = 31; COMMIT;",
    )
    .await
    .expect("update");
    env.assert_converges("docs", "docs", CONVERGE).await;
    let doc = env.documents("docs").await;
    let body = doc["1"]["body"].as_str().unwrap_or_default();
    assert_eq!(
        body.len(),
        40_000,
        "TOASTed body kept after an update that did not touch it"
    );
    assert_eq!(doc["1"]["title"], "retitled 1");
    assert_eq!(ferry.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_empties_the_index_and_keeps_it() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 500) g;",
    )
    .await
    .expect("schema");
    let cfg = env.config("t", "t", "");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("t", "t", CONVERGE).await;
    db.batch_execute(
        "INSERT INTO t VALUES (1000, 'before truncate');
         TRUNCATE t;
         INSERT INTO t VALUES (1, 'after truncate'), (2, 'also after');",
    )
    .await
    .expect("truncate");
    env.assert_converges("t", "t", CONVERGE).await;
    assert_eq!(env.count("t").await, 2);
    db.batch_execute("TRUNCATE t RESTART IDENTITY CASCADE")
        .await
        .expect("truncate 2");
    env.assert_converges("t", "t", CONVERGE).await;
    assert_eq!(env.count("t").await, 0, "index kept, empty");
    assert_eq!(ferry.stop(), Some(0));
}

/// Changes applied under a replication origin (as a logical replication
/// subscriber or a multi-primary tool applies them) arrive with an Origin
/// message before their rows; every supported PostgreSQL version must index
/// them like any other change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_under_a_replication_origin_are_indexed() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g;",
    )
    .await
    .expect("schema");
    let cfg = env.config("t", "t", "");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("t", "t", CONVERGE).await;
    db.batch_execute(
        "SELECT pg_replication_origin_create('upstream_a');
         SELECT pg_replication_origin_session_setup('upstream_a');
         BEGIN;
         SELECT pg_replication_origin_xact_setup('0/1000', now());
         INSERT INTO t VALUES (101, 'from upstream');
         UPDATE t SET v = 'changed upstream' WHERE id = 1;
         DELETE FROM t WHERE id = 2;
         COMMIT;
         SELECT pg_replication_origin_session_reset();",
    )
    .await
    .expect("changes under an origin");
    env.assert_converges("t", "t", CONVERGE).await;
    let docs = env.documents("t").await;
    assert_eq!(docs["101"]["v"], "from upstream");
    assert_eq!(docs["1"]["v"], "changed upstream");
    assert!(!docs.contains_key("2"));
    assert_eq!(ferry.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_columns_join_documents_and_the_mapping() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE p (id int PRIMARY KEY, name text, old_col int);
         INSERT INTO p SELECT g, 'n' || g, g FROM generate_series(1, 200) g;",
    )
    .await
    .expect("schema");
    let cfg = env.config("p", "p", "");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("p", "p", CONVERGE).await;
    // ADD COLUMN: new rows and changed rows carry it, the mapping grows live.
    db.batch_execute(
        "ALTER TABLE p ADD COLUMN tags text[];
         UPDATE p SET tags = ARRAY['t' || id];",
    )
    .await
    .expect("add column");
    env.assert_converges("p", "p", CONVERGE).await;
    let before = env
        .sink
        .alias_targets(&env.index("p"))
        .await
        .expect("alias");
    // DROP, RENAME and an ADD with a default touch no row in the WAL: ferry
    // rebuilds the index from the table in the background and moves the
    // alias, so even untouched documents follow the new shape.
    db.batch_execute(
        "ALTER TABLE p ADD COLUMN price numeric(10,2) DEFAULT 9.99;
         ALTER TABLE p DROP COLUMN old_col;
         ALTER TABLE p RENAME COLUMN name TO title;
         INSERT INTO p (id, title) VALUES (1000, 'after ddl');",
    )
    .await
    .expect("ddl");
    env.assert_converges("p", "p", CONVERGE).await;
    let props = env.mapping_properties("p").await;
    assert_eq!(props["price"]["type"], "double", "{props}");
    assert_eq!(props["title"]["type"], "text", "{props}");
    assert_eq!(props["tags"]["type"], "text", "{props}");
    let after = env
        .sink
        .alias_targets(&env.index("p"))
        .await
        .expect("alias");
    assert_ne!(before, after, "the alias moved to a rebuilt index");
    assert_eq!(ferry.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_stream_loses_nothing() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE r (id int PRIMARY KEY, v int);
         INSERT INTO r SELECT g, 0 FROM generate_series(1, 300) g;",
    )
    .await
    .expect("schema");
    let cfg = env.config("r", "r", "");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("r", "r", CONVERGE).await;
    db.batch_execute("UPDATE r SET v = 1 WHERE id <= 100")
        .await
        .expect("before");
    drop(db);
    env.pg.restart().expect("pg_ctl restart");
    let db = env.db().await;
    db.batch_execute(
        "UPDATE r SET v = 2 WHERE id > 200; INSERT INTO r SELECT g, 3 FROM generate_series(301, 400) g;",
    )
    .await
    .expect("after");
    env.assert_converges("r", "r", CONVERGE).await;
    assert!(
        env.log().contains("restarting"),
        "ferry noticed and rebuilt its pipeline"
    );
    assert_eq!(ferry.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_transaction_killed_half_way_loses_nothing() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute("CREATE TABLE big (id int PRIMARY KEY, v text)")
        .await
        .expect("schema");
    let cfg = env.config("big", "big", "[engine]\nmax_batch_changes = 2000\n");
    let cfg_text = std::fs::read_to_string(&cfg).expect("read");
    // The helper config already has an [engine] table: merge by rewriting.
    let cfg = env.write_config(&cfg_text.replacen("[engine]\nmax_batch_delay_ms = 20\n", "", 1));
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("big", "big", CONVERGE).await;
    db.batch_execute(
        "INSERT INTO big SELECT g, repeat('x', 50) || g FROM generate_series(1, 40000) g",
    )
    .await
    .expect("one big transaction");
    // Kill once part of it has landed.
    let deadline = std::time::Instant::now() + CONVERGE;
    while env.count("big").await < 5_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "no progress\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ferry.kill();
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("big", "big", Duration::from_secs(180))
        .await;
    assert_eq!(ferry.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_when_the_active_instance_dies() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE h (id int PRIMARY KEY, v int);
         INSERT INTO h SELECT g, 0 FROM generate_series(1, 100) g;",
    )
    .await
    .expect("schema");
    let cfg = env.config("h", "h", "");
    let active = env.run_ferry(&cfg);
    env.assert_converges("h", "h", CONVERGE).await;
    let mut standby = env.run_ferry(&cfg);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !env.log().contains("standby") {
        assert!(
            std::time::Instant::now() < deadline,
            "standby never reported\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    db.batch_execute("UPDATE h SET v = 1 WHERE id <= 50")
        .await
        .expect("update 1");
    env.assert_converges("h", "h", CONVERGE).await;
    active.kill();
    db.batch_execute("UPDATE h SET v = 2 WHERE id > 50; INSERT INTO h VALUES (101, 7)")
        .await
        .expect("update 2");
    env.assert_converges("h", "h", Duration::from_secs(30))
        .await;
    assert!(standby.is_running());
    assert_eq!(standby.stop(), Some(0));
}
