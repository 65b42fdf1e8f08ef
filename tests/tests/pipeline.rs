//! End-to-end: PostgreSQL table → ferry (the real binary) → OpenSearch index.

use std::time::Duration;

use ferry_e2e::TestEnv;

const MIXED_SCHEMA: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE items (
    id    bigint PRIMARY KEY,
    i     integer,
    s     smallint,
    n     numeric(20,5),
    f     double precision,
    r     real,
    b     boolean,
    t     text,
    v     varchar(40),
    u     uuid,
    d     date,
    ts    timestamp,
    tz    timestamptz,
    j     jsonb,
    ia    integer[],
    ta    text[],
    by    bytea,
    m     mood
);";

/// 20,000 rows of mixed types, with NULLs and awkward text.
const MIXED_ROWS: &str = "
INSERT INTO items
SELECT g,
       CASE WHEN g % 11 = 0 THEN NULL ELSE (g * 7919) % 2000000 - 1000000 END,
       (g % 30000)::smallint,
       CASE WHEN g % 13 = 0 THEN NULL ELSE (g * 1.23456)::numeric(20,5) END,
       g / 7.0,
       (g % 1000) / 8.0,
       g % 2 = 0,
       CASE g % 5 WHEN 0 THEN NULL WHEN 1 THEN 'plain ' || g WHEN 2 THEN E'tab\\there \"quoted\" back\\\\slash'
            WHEN 3 THEN 'ünïcødé ✓ 🚀 ' || g ELSE E'line1\\nline2' END,
       'v' || g,
       md5(g::text)::uuid,
       DATE '2020-01-01' + (g % 2000),
       TIMESTAMP '2021-06-01 12:00:00' + g * INTERVAL '37 seconds',
       TIMESTAMPTZ '2022-03-04 05:06:07.123456+00' + g * INTERVAL '1 minute',
       CASE WHEN g % 3 = 0 THEN NULL ELSE jsonb_build_object('k', g, 'tags', jsonb_build_array('a', g % 5), 'nested', jsonb_build_object('x', g % 2 = 0)) END,
       ARRAY[g, g + 1, NULL],
       ARRAY['x' || g, 'with space', 'NULL'],
       CASE WHEN g % 4 = 0 THEN NULL ELSE decode(md5(g::text), 'hex') END,
       (ARRAY['sad','ok','happy'])[1 + g % 3]::mood
FROM generate_series(1, 20000) g;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfills_20k_mixed_rows_then_converges_on_live_changes() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(MIXED_SCHEMA).await.expect("schema");
    db.batch_execute(MIXED_ROWS).await.expect("rows");

    let cfg = env.config("items", "items", "");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("items", "items", Duration::from_secs(180))
        .await;

    // Live changes: inserts, updates (to and from NULL), deletes, a key change.
    db.batch_execute(
        "BEGIN;
         INSERT INTO items (id, i, t, tz, j, ia, m) SELECT g, g, 'new ' || g, now(), '{\"fresh\": true}', ARRAY[1], 'ok'
           FROM generate_series(20001, 20500) g;
         COMMIT;
         UPDATE items SET t = 'updated ' || id, n = NULL, j = '[1,2,3]' WHERE id % 20 = 1;
         UPDATE items SET i = NULL, b = NOT b, ta = '{}' WHERE id BETWEEN 100 AND 300;
         DELETE FROM items WHERE id % 67 = 0;
         UPDATE items SET id = 900000 + id WHERE id IN (5, 6, 7);
         BEGIN;
         INSERT INTO items (id, t) VALUES (30000, 'short-lived');
         UPDATE items SET t = 'changed twice' WHERE id = 30000;
         DELETE FROM items WHERE id = 30000;
         INSERT INTO items (id, t) VALUES (30001, 'kept');
         COMMIT;",
    )
    .await
    .expect("changes");
    env.assert_converges("items", "items", Duration::from_secs(120))
        .await;
    assert_eq!(
        ferry.stop(),
        Some(0),
        "ferry exits 0 on SIGTERM\n{}",
        env.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_between_batches_loses_and_duplicates_nothing() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL, score numeric, updated_at timestamptz DEFAULT now());
         INSERT INTO users (id, email, score) SELECT g, 'u' || g || '@example.com', g FROM generate_series(1, 1000) g;",
    )
    .await
    .expect("schema");
    let cfg = env.config("users", "users", "");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("users", "users", Duration::from_secs(60))
        .await;

    // Batch 1 while ferry runs.
    db.batch_execute(
        "INSERT INTO users (id, email) SELECT g, 'b1-' || g FROM generate_series(1001, 1200) g;
         UPDATE users SET score = score * 2 WHERE id <= 100;
         DELETE FROM users WHERE id BETWEEN 101 AND 150;",
    )
    .await
    .expect("batch 1");
    let before_last: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    db.batch_execute("UPDATE users SET email = 'last-of-batch-1' WHERE id = 1")
        .await
        .expect("last change of batch 1");
    env.assert_converges("users", "users", Duration::from_secs(60))
        .await;
    assert_eq!(ferry.stop(), Some(0), "clean stop\n{}", env.log_tail());

    // The slot confirmed batch 1 before ferry exited: a restart replays nothing of it.
    let confirmed_past: bool = db
        .query_one(
            "SELECT confirmed_flush_lsn > $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'ferry_test'",
            &[&before_last],
        )
        .await
        .expect("slot")
        .get(0);
    assert!(
        confirmed_past,
        "the clean stop confirmed the last flushed transaction"
    );

    // Batch 2 while ferry is down.
    db.batch_execute(
        "INSERT INTO users (id, email) SELECT g, 'b2-' || g FROM generate_series(1201, 1300) g;
         UPDATE users SET email = 'b2-updated' WHERE id BETWEEN 200 AND 260;
         DELETE FROM users WHERE id BETWEEN 900 AND 950;",
    )
    .await
    .expect("batch 2");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("users", "users", Duration::from_secs(60))
        .await;
    let rows: i64 = db
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        env.count("users").await,
        rows as u64,
        "no duplicates, nothing missing"
    );
    let log = env.log();
    assert_eq!(
        log.matches("backfill started").count(),
        1,
        "the restart did not backfill again\n{log}"
    );
    assert!(log.contains("index is seeded"), "{log}");

    // A crash (SIGKILL) mid-stream loses nothing either.
    db.batch_execute("UPDATE users SET score = -1 WHERE id > 1000")
        .await
        .expect("update");
    ferry.kill();
    db.batch_execute("INSERT INTO users (id, email) VALUES (5000, 'after-crash')")
        .await
        .expect("insert");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("users", "users", Duration::from_secs(60))
        .await;
    assert_eq!(ferry.stop(), Some(0));
}
