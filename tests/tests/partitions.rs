//! Partitioned tables, indexed by their root: backfill through the root,
//! changes from every partition (the publication publishes via the root),
//! rows moving between partitions, and partitions attached and detached
//! while ferry runs — as the root table of an index and as a related table
//! nested in another index's documents.

use std::time::{Duration, Instant};

use ferry_e2e::{compare, expected_json, ferry_once, TestEnv};
use ferry_opensearch::Method;
use ferry_testkit::{Fault, FaultProxy};
use serde_json::json;

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

/// A partitioned root of 6,000 rows in two partitions, copied slowly enough
/// to be held in the middle.
const HELD_SCHEMA: &str = "
CREATE TABLE events (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
INSERT INTO events SELECT g, (ARRAY['eu','us'])[1 + g % 2], 'event ' || g FROM generate_series(1, 6000) g;
CREATE PUBLICATION ferry_test FOR TABLE events;
";

/// Documents of the flat `events` index of [`HELD_SCHEMA`].
const HELD_EVENTS: &str = "SELECT e.id::text || ',' || e.region, to_jsonb(e)::text FROM events e";

/// ferry writing to the test cluster through a fault proxy, with a small
/// backfill page so a held copy has checkpoints behind it.
struct Held {
    env: TestEnv,
    proxy: FaultProxy,
    cfg: std::path::PathBuf,
    alias: String,
}

impl Held {
    async fn start() -> Held {
        let env = TestEnv::start().await;
        let proxy = FaultProxy::start(env.os.url())
            .await
            .expect("start the fault proxy");
        env.db()
            .await
            .batch_execute(HELD_SCHEMA)
            .await
            .expect("schema");
        let alias = env.index("events");
        let cfg = env.write_config(&format!(
            "[source]\nurl = \"{}\"\nslot = \"ferry_test\"\npublication = \"ferry_test\"\n\n\
             [sink]\nurl = \"{}\"\nrequest_timeout_secs = 30\n\n\
             [engine]\nmax_batch_delay_ms = 20\nbackfill_batch_rows = 100\nbackfill_chunk_rows = 500\n\n\
             [[index]]\nname = \"{alias}\"\ntable = \"events\"\n",
            env.pg.url("app"),
            proxy.url(),
        ));
        Held {
            env,
            proxy,
            cfg,
            alias,
        }
    }

    /// Documents in the concrete index being copied: beside the served
    /// one (a rebuild), or the one the alias serves (a first start).
    async fn copied(&self, beside: bool) -> u64 {
        let served = self
            .env
            .sink
            .alias_targets(&self.alias)
            .await
            .expect("alias");
        let all = self
            .env
            .sink
            .json_request(Method::Get, &format!("/{}-*/_mapping", self.alias), None)
            .await
            .expect("indexes");
        let names: Vec<String> = all
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        let Some(copy) = names.iter().find(|n| served.contains(n) != beside) else {
            return 0;
        };
        let _ = self.env.sink.refresh(copy).await;
        match self
            .env
            .sink
            .json_request(Method::Get, &format!("/{copy}/_count"), None)
            .await
        {
            Ok(v) => v["count"].as_u64().unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// Lets the (delayed) copy get past `docs` documents, then holds its
    /// bulk writes (checkpoints still land).
    async fn hold_after(&self, docs: u64, beside: bool) {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let n = self.copied(beside).await;
            if n >= docs {
                assert!(n < 6000, "the copy finished before it could be held");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the copy made no progress\n{}",
                self.env.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.proxy.set(Fault::Blackhole);
    }

    /// Attaches a partition whose rows (inserted now, after the copy's
    /// snapshot) interleave with the copied keys, and detaches one whose
    /// rows were partly copied already; waits for ferry to notice, then
    /// lets the copy go on.
    ///
    /// The DETACH waits for the copy's snapshot transaction, which holds
    /// ACCESS SHARE on every partition it read: it is issued while the copy
    /// runs and lands when the copy stops.
    async fn attach_and_detach_while_held(&self) -> Detach {
        let log_before = self.env.log().matches(PARTITIONS_CHANGED).count();
        self.env
            .db()
            .await
            .batch_execute(
                "CREATE TABLE events_asia (id int, region text, v text, PRIMARY KEY (id, region));
                 INSERT INTO events_asia SELECT g, 'asia', 'asia ' || g FROM generate_series(1, 6000, 3) g;
                 ALTER TABLE events ATTACH PARTITION events_asia FOR VALUES IN ('asia');",
            )
            .await
            .expect("attach");
        let db = self.env.db().await;
        let detach = tokio::spawn(async move {
            db.batch_execute("ALTER TABLE events DETACH PARTITION events_us")
                .await
        });
        // The worker compares the leaf set every 30 s.
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.env.log().matches(PARTITIONS_CHANGED).count() == log_before {
            assert!(
                Instant::now() < deadline,
                "ferry never noticed the partition change\n{}",
                self.env.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.proxy.clear();
        detach
    }

    /// Documents of region `region` that a search on the alias finds (0
    /// while the alias does not exist).
    async fn visible(&self, region: &str) -> u64 {
        let res = self
            .env
            .sink
            .json_request(
                Method::Post,
                &format!("/{}/_search", self.alias),
                Some(json!({"size": 0, "track_total_hits": true, "query": {"term": {"region": region}}})),
            )
            .await;
        match res {
            Ok(v) => v["hits"]["total"]["value"].as_u64().unwrap_or(0),
            Err(_) => 0,
        }
    }
}

/// The DETACH issued while the copy ran.
type Detach = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

/// Waits for the DETACH issued while the copy was held.
async fn detached(detach: Detach) {
    tokio::time::timeout(CONVERGE, detach)
        .await
        .expect("the DETACH lands once the copy stopped")
        .expect("join")
        .expect("detach");
}

/// What ferry logs when it restarts the pipeline for a partition change.
const PARTITIONS_CHANGED: &str = "a partition with rows was attached or detached";

/// A copy taken before a partition was attached or detached never goes
/// live: ferry discards the unfinished copy and copies again from a
/// snapshot that has the change (a rebuild beside the served index here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_change_during_a_rebuild_discards_the_unfinished_copy() {
    let h = Held::start().await;
    let cfg_s = h.cfg.to_str().expect("utf8").to_string();
    let ferry = h.env.run_ferry(&h.cfg);
    h.env
        .assert_converges_to("events", HELD_EVENTS, CONVERGE)
        .await;
    let served = h.env.sink.alias_targets(&h.alias).await.expect("alias");

    // Rebuild beside the served index (`ferry reindex`), slowly, and hold
    // the copy in its middle.
    h.proxy.set(Fault::Delay(Duration::from_millis(200)));
    let (code, out, err) = ferry_once(&["reindex", &h.alias, "--config", &cfg_s]);
    assert_eq!(code, 0, "{out}{err}");
    ferry.hangup();
    h.hold_after(1500, true).await;
    let detach = h.attach_and_detach_while_held().await;

    // Searches keep being answered by the served index meanwhile.
    let hits = h
        .env
        .sink
        .json_request(
            Method::Post,
            &format!("/{}/_search", h.alias),
            Some(json!({"size": 0, "track_total_hits": true})),
        )
        .await
        .expect("searches are answered during the rebuild");
    assert!(
        hits["hits"]["total"]["value"].as_u64().unwrap_or(0) > 0,
        "{hits}"
    );
    detached(detach).await;
    h.env
        .assert_converges_to("events", HELD_EVENTS, CONVERGE)
        .await;
    let now = h.env.sink.alias_targets(&h.alias).await.expect("alias");
    assert_ne!(now, served, "the alias moved to the rebuilt index");
    assert_eq!(ferry.stop(), Some(0), "{}", h.env.log_tail());
}

/// The same on a first start, where the copy being held is the only index
/// the alias points at: once the change is noticed that copy is discarded,
/// never served while another is built (searches never see the detached
/// partition's rows again), it is copied again, and ferry keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_change_during_the_first_copy_discards_it_and_copies_again() {
    let h = Held::start().await;
    h.proxy.set(Fault::Delay(Duration::from_millis(200)));
    let mut ferry = h.env.run_ferry(&h.cfg);
    h.hold_after(1500, false).await;
    assert!(
        h.visible("us").await > 0,
        "the held copy holds rows of the partition to detach"
    );
    let detach = h.attach_and_detach_while_held().await;
    let db = h.env.db().await;
    let deadline = Instant::now() + CONVERGE;
    loop {
        assert_eq!(
            h.visible("us").await,
            0,
            "the copy taken before the change is still served\n{}",
            h.env.log_tail()
        );
        let rows = expected_json(&db, HELD_EVENTS).await;
        if compare(&rows, &h.env.documents("events").await).is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never converged\n{}",
            h.env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    detached(detach).await;
    h.env
        .assert_converges_to("events", HELD_EVENTS, CONVERGE)
        .await;
    assert!(ferry.is_running(), "{}", h.env.log_tail());
    assert_eq!(ferry.stop(), Some(0), "{}", h.env.log_tail());
}
