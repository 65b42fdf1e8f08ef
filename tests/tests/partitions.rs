//! Partitioned tables, indexed by their root: backfill through the root,
//! changes from every partition (the publication publishes via the root),
//! rows moving between partitions, and partitions attached and detached
//! while ferry runs — as the root table of an index and as a related table
//! nested in another index's documents.

use std::time::Duration;

use ferry_e2e::{ferry_once, TestEnv};

const CONVERGE: Duration = Duration::from_secs(150);

const SCHEMA: &str = "
CREATE TABLE accounts (id int PRIMARY KEY, name text NOT NULL);
INSERT INTO accounts SELECT g, 'account ' || g FROM generate_series(1, 100) g;
CREATE TABLE events (id int, region text, account_id int NOT NULL, v text, PRIMARY KEY (id, region))
    PARTITION BY LIST (region);
CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
INSERT INTO events SELECT g, (ARRAY['eu','us'])[1 + g % 2], 1 + g % 100, 'event ' || g
    FROM generate_series(1, 2000) g;
-- An existing publication that reports the partitions, not the root.
CREATE PUBLICATION ferry_test FOR TABLE accounts, events;
";

/// Documents of the `events` index: id = the root's primary key.
const EVENTS: &str = "SELECT e.id::text || ',' || e.region, to_jsonb(e)::text FROM events e";

/// Documents of the `accounts` index: each account with its events nested.
const ACCOUNTS: &str = "SELECT a.id::text, (to_jsonb(a) || jsonb_build_object('events', \
     coalesce((SELECT jsonb_agg(to_jsonb(e) ORDER BY e.id, e.region) FROM events e WHERE e.account_id = a.id), '[]'::jsonb)))::text \
     FROM accounts a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_is_indexed_by_its_root_across_moves_attaches_and_detaches() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(SCHEMA).await.expect("schema");
    let cfg = env.write_config(&format!(
        "[source]\nurl = \"{}\"\nslot = \"ferry_test\"\npublication = \"ferry_test\"\n\n\
         [sink]\nurl = \"{}\"\n\n[engine]\nmax_batch_delay_ms = 20\n\n\
         [[index]]\nname = \"{}\"\ntable = \"events\"\n\n\
         [[index]]\nname = \"{}\"\ntable = \"accounts\"\n\n\
           [[index.has_many]]\n  field = \"events\"\n  table = \"events\"\n  foreign_key = \"account_id\"\n",
        env.pg.url("app"),
        env.os.url(),
        env.index("events"),
        env.index("accounts"),
    ));
    let cfg_s = cfg.to_str().expect("utf8").to_string();
    let mut ferry = env.run_ferry(&cfg);

    // Backfill through the root.
    env.assert_converges_to("events", EVENTS, CONVERGE).await;
    env.assert_converges_to("accounts", ACCOUNTS, CONVERGE)
        .await;
    assert_eq!(env.count("events").await, 2000);
    let via_root: bool = db
        .query_one(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = 'ferry_test'",
            &[],
        )
        .await
        .expect("publication")
        .get(0);
    assert!(via_root, "the publication publishes via the partition root");
    let (code, out, err) = ferry_once(&["check", "--config", &cfg_s]);
    assert_eq!(code, 0, "check accepts a partitioned root: {out}{err}");

    // Inserts, updates and deletes in every partition.
    db.batch_execute(
        "INSERT INTO events VALUES (5001, 'eu', 7, 'new eu'), (5002, 'us', 8, 'new us');
         UPDATE events SET v = 'changed' WHERE id BETWEEN 10 AND 30;
         DELETE FROM events WHERE id BETWEEN 40 AND 49;",
    )
    .await
    .expect("live changes");
    env.assert_converges_to("events", EVENTS, CONVERGE).await;
    env.assert_converges_to("accounts", ACCOUNTS, CONVERGE)
        .await;

    // Rows moving between partitions (an update of the partition key, which
    // PostgreSQL replicates as a delete from one partition and an insert
    // into the other), one of them to another account as well.
    db.batch_execute(
        "UPDATE events SET region = 'us' WHERE region = 'eu' AND id BETWEEN 100 AND 120;
         UPDATE events SET region = 'eu', account_id = 99 WHERE id = 201;",
    )
    .await
    .expect("cross-partition moves");
    env.assert_converges_to("events", EVENTS, CONVERGE).await;
    env.assert_converges_to("accounts", ACCOUNTS, CONVERGE)
        .await;

    // A partition attached with rows while ferry runs: its rows appear, its
    // changes stream, and it got REPLICA IDENTITY FULL for the nested index.
    db.batch_execute(
        "CREATE TABLE events_asia (id int, region text, account_id int NOT NULL, v text, PRIMARY KEY (id, region));
         INSERT INTO events_asia SELECT g, 'asia', 1 + g % 100, 'asia ' || g FROM generate_series(3001, 3300) g;
         ALTER TABLE events ATTACH PARTITION events_asia FOR VALUES IN ('asia');",
    )
    .await
    .expect("attach");
    env.assert_converges_to("events", EVENTS, CONVERGE).await;
    env.assert_converges_to("accounts", ACCOUNTS, CONVERGE)
        .await;
    assert_eq!(env.count("events").await, 2000 + 2 - 10 + 300);
    db.batch_execute(
        "UPDATE events SET v = 'asia changed', account_id = 3 WHERE id = 3001;
         DELETE FROM events WHERE id = 3002;
         UPDATE events SET region = 'asia' WHERE id = 2 AND region = 'eu';",
    )
    .await
    .expect("changes in the attached partition");
    env.assert_converges_to("events", EVENTS, CONVERGE).await;
    env.assert_converges_to("accounts", ACCOUNTS, CONVERGE)
        .await;
    let ident: String = db
        .query_one(
            "SELECT relreplident::text FROM pg_class WHERE relname = 'events_asia'",
            &[],
        )
        .await
        .expect("replica identity")
        .get(0);
    assert_eq!(ident, "f");

    // A detached partition's rows are no longer in the table: they leave
    // both indexes.
    db.batch_execute("ALTER TABLE events DETACH PARTITION events_us")
        .await
        .expect("detach");
    env.assert_converges_to("events", EVENTS, CONVERGE).await;
    env.assert_converges_to("accounts", ACCOUNTS, CONVERGE)
        .await;
    assert!(ferry.is_running(), "{}", env.log_tail());
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());
}
