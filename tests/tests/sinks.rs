//! Named sinks: one replication stream feeds two clusters. While one of
//! them fails, the slot holds its position and the metrics and `/status`
//! name the failing sink; when it is back, both equal the table and nothing
//! is lost on either. The index is built by query (a `where`), so the
//! one build per batch that both sinks share runs on real PostgreSQL.

use std::time::Duration;

use ferry_e2e::{
    compare, documents_in, ferry_once, get, rows_as_json, sample, wait_for, FerryProcess, TestEnv,
};
use ferry_opensearch::Sink;
use ferry_testkit::{try_free_port, FaultProxy, Osmem};
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(90);

/// Waits until the documents of `index` on `sink` equal the rows of `items`.
async fn assert_sink_converges(
    sink: &Sink,
    index: &str,
    db: &tokio_postgres::Client,
    what: &str,
    log: &str,
) {
    let mut last = Vec::new();
    let deadline = std::time::Instant::now() + CONVERGE;
    while std::time::Instant::now() < deadline {
        let rows = rows_as_json(db, "items").await;
        last = compare(&rows, &documents_in(sink, index).await);
        if last.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("{what} never equalled the table: {last:?}\n{log}");
}

/// The WAL position now, as text.
async fn wal_now(db: &tokio_postgres::Client) -> String {
    db.query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("wal position")
        .get(0)
}

/// Whether the slot's confirmed position is at or past `lsn`.
async fn confirmed_past(db: &tokio_postgres::Client, lsn: &str) -> bool {
    db.query_one(
        "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'ferry_sinks'",
        &[&lsn],
    )
    .await
    .expect("slot position")
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sinks_both_equal_the_table_after_one_failed_for_a_while_and_the_slot_waited_for_it() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, name text, qty int);
         INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, 2000) g;",
    )
    .await
    .expect("schema");
    // The second cluster, behind a proxy that can make it fail.
    let second = tokio::task::spawn_blocking(Osmem::start)
        .await
        .expect("join")
        .expect("start the second cluster");
    let proxy = FaultProxy::start(second.url()).await.expect("proxy");
    let second_client = Sink::new(second.url(), Duration::from_secs(30)).expect("client");
    let index = env.index("items");
    let port = try_free_port().expect("a free port");
    let cfg = env.write_config(&format!(
        "[source]\nurl = \"{}\"\nslot = \"ferry_sinks\"\npublication = \"ferry_sinks\"\n\n\
         [sink.primary]\nurl = \"{}\"\n\n[sink.eu]\nurl = \"{}\"\ndead_letter_index = \"eu-dead-letters\"\n\n\
         [engine]\nmax_batch_delay_ms = 20\n\n[admin]\nlisten = \"127.0.0.1:{port}\"\n\n\
         [[index]]\nname = \"{index}\"\ntable = \"items\"\nwhere = \"qty >= 0\"\n",
        env.pg.url("app"),
        env.os.url(),
        proxy.url(),
    ));
    let log = env.dir.path().join("ferry.log");
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let ferry = FerryProcess::start(&cfg, &log);

    // Both are seeded from the one slot and follow the stream.
    assert_sink_converges(&env.sink, &index, &db, "the primary sink", &text()).await;
    assert_sink_converges(&second_client, &index, &db, "the eu sink", &text()).await;
    db.batch_execute("UPDATE items SET qty = qty + 1 WHERE id <= 100")
        .await
        .expect("update");
    assert_sink_converges(&second_client, &index, &db, "the eu sink", &text()).await;
    let metrics = get(port, "/metrics").await.expect("metrics").2;
    assert_eq!(
        sample(
            &metrics,
            &format!("ferry_documents_total{{index=\"{index}\",sink=\"eu\",result=\"written\"}}")
        )
        .map(|v| v > 0.0),
        Some(true),
        "per-sink document counts\n{metrics}"
    );

    // A document only the eu cluster refuses (twice: the write and its
    // rebuild) becomes a dead letter there, in eu's own dead-letter index;
    // the primary has it.
    let config = cfg.to_str().expect("utf-8 path");
    proxy.set(ferry_testkit::Fault::ItemStatus {
        status: 400,
        every_nth: 1,
        times: Some(2),
    });
    db.batch_execute("UPDATE items SET name = 'refused by eu' WHERE id = 7")
        .await
        .expect("update");
    let deadline = std::time::Instant::now() + CONVERGE;
    loop {
        let (code, out, err) = ferry_once(&["dead-letters", "-c", config, "list", "--sink", "eu"]);
        if out.lines().any(|l| l.split('\t').nth(1) == Some("7")) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no dead letter on the eu sink: {code}\n{out}\n{err}\n{}",
            text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (_, out, _) = ferry_once(&["dead-letters", "-c", config, "list", "--sink", "primary"]);
    assert!(
        !out.lines().any(|l| l.contains('\t')),
        "no dead letter on the primary: {out}"
    );
    assert_sink_converges(&env.sink, &index, &db, "the primary sink", &text()).await;
    assert!(
        documents_in(&second_client, "eu-dead-letters").await.len() == 1,
        "the eu sink's dead letter is in its own dead_letter_index"
    );
    let (code, out, err) = ferry_once(&["dead-letters", "-c", config, "retry", "--sink", "eu"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_sink_converges(
        &second_client,
        &index,
        &db,
        "the eu sink after the retry",
        &text(),
    )
    .await;

    // The eu cluster fails every request for a while.
    proxy.set(ferry_testkit::Fault::Status {
        status: 503,
        times: None,
    });
    let before = wal_now(&db).await;
    db.batch_execute(
        "INSERT INTO items SELECT g, 'late ' || g, g FROM generate_series(2001, 2500) g;
         UPDATE items SET name = 'renamed' WHERE id BETWEEN 101 AND 300;
         DELETE FROM items WHERE id BETWEEN 301 AND 400;",
    )
    .await
    .expect("changes during the outage");
    let after = wal_now(&db).await;
    let mut failing = String::new();
    wait_for("the eu sink reported failing", CONVERGE, async || {
        let Ok((_, _, m)) = get(port, "/metrics").await else {
            return false;
        };
        failing = m;
        sample(&failing, "ferry_named_sink_failing_seconds{sink=\"eu\"}").is_some_and(|s| s > 0.0)
    })
    .await;
    assert_eq!(
        sample(
            &failing,
            "ferry_named_sink_failing_seconds{sink=\"primary\"}"
        ),
        Some(0.0),
        "{failing}"
    );
    let status: Value =
        serde_json::from_str(&get(port, "/status").await.expect("status").2).expect("status JSON");
    let sinks = status["sinks"].as_array().cloned().unwrap_or_default();
    assert!(
        sinks
            .iter()
            .any(|s| s["name"] == "eu" && s["failing_seconds"].as_f64().is_some()),
        "{status}"
    );
    assert!(
        status["indexes"].as_array().is_some_and(|a| a
            .iter()
            .filter(|i| i["name"] == index.as_str())
            .count()
            == 2),
        "one entry per index and sink\n{status}"
    );
    // The slot does not pass the changes the eu sink has not made durable.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !confirmed_past(&db, &after).await,
        "the slot passed changes a failing sink lacks (written up to {after}, slot at {})\n{}",
        db.query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'ferry_sinks'", &[]).await.expect("slot").get::<_, String>(0),
        text()
    );

    // Back: both end equal to the table, nothing lost on either.
    proxy.clear();
    assert_sink_converges(&second_client, &index, &db, "the eu sink", &text()).await;
    assert_sink_converges(&env.sink, &index, &db, "the primary sink", &text()).await;
    wait_for("the slot moved past the outage", CONVERGE, async || {
        confirmed_past(&db, &after).await
    })
    .await;
    assert!(confirmed_past(&db, &before).await);

    // Operator tools read one cluster, named with --sink.
    let (code, out, err) = ferry_once(&["verify", "-c", config, "--sink", "eu"]);
    assert_eq!(code, 0, "verify of the eu sink\n{out}\n{err}");
    assert!(out.contains("missing 0, different 0, extra 0"), "{out}");
    let (code, _, err) = ferry_once(&["verify", "-c", config]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--sink NAME") && err.contains("eu, primary"),
        "{err}"
    );
    assert_eq!(ferry.stop(), Some(0), "{}", text());
}
