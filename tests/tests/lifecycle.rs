//! Backfill and index lifecycle: seeding while live changes flow, resuming
//! an interrupted backfill, and rebuilding into a new index when the
//! mapping changes while searches keep being answered.

use std::time::{Duration, Instant};

use ferry_e2e::TestEnv;
use ferry_opensearch::Method;
use serde_json::json;

const CONVERGE: Duration = Duration::from_secs(120);

fn config(env: &TestEnv, extra_engine: &str, indexes: &str) -> String {
    format!(
        "[source]\nurl = \"{}\"\nslot = \"ferry_test\"\npublication = \"ferry_test\"\n\n[sink]\nurl = \"{}\"\n\n[engine]\nmax_batch_delay_ms = 20\n{extra_engine}\n{indexes}",
        env.pg.url("app"),
        env.os.url(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_runs_while_live_changes_flow_and_other_indexes_stream() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE big (id int PRIMARY KEY, v text, n int);
         INSERT INTO big SELECT g, 'v' || g, 0 FROM generate_series(1, 30000) g;
         CREATE TABLE small (id int PRIMARY KEY, v text);",
    )
    .await
    .expect("schema");
    let indexes = format!(
        "[[index]]\nname = \"{}\"\ntable = \"big\"\n\n[[index]]\nname = \"{}\"\ntable = \"small\"\n",
        env.index("big"),
        env.index("small")
    );
    let cfg = env.write_config(&config(&env, "backfill_chunk_rows = 5000", &indexes));
    let ferry = env.run_ferry(&cfg);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !env.log().contains("streaming changes") {
        assert!(
            Instant::now() < deadline,
            "never streamed\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Live changes while the big table is being copied: updates, deletes
    // (which the copy must not resurrect) and inserts.
    let mut seen_while_seeding = false;
    for round in 0..10 {
        db.batch_execute(&format!(
            "UPDATE big SET n = n + 1, v = 'live {round}' WHERE id % 97 = {round};
             DELETE FROM big WHERE id % 101 = {round};
             INSERT INTO big VALUES ({}, 'new', 0);
             INSERT INTO small VALUES ({round}, 'small {round}');",
            100_000 + round
        ))
        .await
        .expect("live changes");
        // The other index streams meanwhile.
        let deadline = Instant::now() + Duration::from_secs(5);
        while env.count("small").await < round as u64 + 1 {
            assert!(
                Instant::now() < deadline,
                "small index did not stream\n{}",
                env.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if env.count("big").await < 30_000 {
            seen_while_seeding = true;
        }
    }
    assert!(
        seen_while_seeding,
        "the small index streamed while the big one was still seeding"
    );
    env.assert_converges("big", "big", CONVERGE).await;
    env.assert_converges("small", "small", CONVERGE).await;
    assert_eq!(ferry.stop(), Some(0));
}

/// Creates `table` with 20,000 rows, starts ferry copying it in 2,000-row
/// chunks and kills it (SIGKILL) once 8,000 documents are durable, so its
/// checkpoint is at least two chunks in; returns the config.
async fn kill_during_the_copy_of_20000_rows(
    env: &TestEnv,
    db: &tokio_postgres::Client,
    table: &str,
) -> std::path::PathBuf {
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, v text);
         INSERT INTO {table} SELECT g, repeat('x', 20) || g FROM generate_series(1, 20000) g;"
    ))
    .await
    .expect("schema");
    let indexes = format!(
        "[[index]]\nname = \"{}\"\ntable = \"{table}\"\n",
        env.index(table)
    );
    let cfg = env.write_config(&config(
        env,
        "backfill_chunk_rows = 2000\nbackfill_batch_rows = 500",
        &indexes,
    ));
    let ferry = env.run_ferry(&cfg);
    let deadline = Instant::now() + CONVERGE;
    while env.count(table).await < 8_000 {
        assert!(Instant::now() < deadline, "no progress\n{}", env.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ferry.kill();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_backfill_resumes_from_its_checkpoint() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    let cfg = kill_during_the_copy_of_20000_rows(&env, &db, "r").await;
    db.batch_execute("UPDATE r SET v = 'changed while down' WHERE id IN (1, 19999)")
        .await
        .expect("change");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("r", "r", CONVERGE).await;
    let log = env.log();
    assert!(
        log.contains("backfill resumed after its last checkpoint"),
        "{log}"
    );
    // The second run copied only what came after the checkpoint.
    let second: u64 = log
        .lines()
        .filter(|l| l.contains("backfill finished"))
        .filter_map(|l| l.split("rows=").nth(1))
        .filter_map(|r| r.split_whitespace().next())
        .filter_map(|n| n.parse().ok())
        .next_back()
        .expect("backfill finished line");
    // At least 8,000 documents were durable when ferry was killed; the last
    // checkpoint before that is at least two 2,000-row chunks in.
    assert!(
        second <= 16_000,
        "the resumed backfill copied {second} rows: it did not skip the chunks already done"
    );
    assert_eq!(ferry.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_while_ferry_is_down_mid_copy_leaves_no_row_of_the_older_snapshot() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    let cfg = kill_during_the_copy_of_20000_rows(&env, &db, "rt").await;
    // The copy's checkpointed chunks hold rows of the snapshot before this.
    db.batch_execute("TRUNCATE rt; INSERT INTO rt VALUES (3, 'after'), (19000, 'after');")
        .await
        .expect("truncate");
    let ferry = env.run_ferry(&cfg);
    // The resumed copy holds rows from both sides of the truncate: it is
    // deleted (its alias with it, as nothing was served yet) and copied anew.
    let deadline = Instant::now() + CONVERGE;
    while env.log().matches("created index").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "not copied again\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.assert_converges("rt", "rt", CONVERGE).await;
    assert_eq!(ferry.stop(), Some(0));
}

/// The number of documents a search on `alias` finds; panics when the
/// search is not answered.
async fn hits_during_rebuild(env: &TestEnv, alias: &str) -> u64 {
    let res = env
        .sink
        .json_request(
            Method::Post,
            &format!("/{alias}/_search"),
            Some(json!({"size": 0, "track_total_hits": true})),
        )
        .await
        .expect("searches are answered during the rebuild");
    res["hits"]["total"]["value"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapping_change_rebuilds_in_the_background_and_swaps_the_alias() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE m (id int PRIMARY KEY, v text, w int);
         INSERT INTO m SELECT g, 'v' || g, g FROM generate_series(1, 8000) g;",
    )
    .await
    .expect("schema");
    let alias = env.index("m");
    let v1 = format!("[[index]]\nname = \"{alias}\"\ntable = \"m\"\ncolumns = [\"id\", \"v\"]\n");
    let cfg = env.write_config(&config(&env, "backfill_chunk_rows = 1000", &v1));
    let ferry = env.run_ferry(&cfg);
    let expected_v1 = "SELECT id::text, jsonb_build_object('id', id, 'v', v)::text FROM m";
    env.assert_converges_to("m", expected_v1, CONVERGE).await;
    let old: Vec<String> = env.sink.alias_targets(&alias).await.expect("alias");
    assert_eq!(ferry.stop(), Some(0));

    // New mapping: one more column. ferry builds a new index beside the
    // old one; searches on the alias keep working the whole time.
    let v2 =
        format!("[[index]]\nname = \"{alias}\"\ntable = \"m\"\ncolumns = [\"id\", \"v\", \"w\"]\n");
    let cfg = env.write_config(&config(&env, "backfill_chunk_rows = 1000", &v2));
    let ferry = env.run_ferry(&cfg);
    let deadline = Instant::now() + CONVERGE;
    let mut round = 0;
    loop {
        round += 1;
        db.batch_execute(&format!(
            "UPDATE m SET v = 'during rebuild {round}' WHERE id = {round}"
        ))
        .await
        .expect("live change");
        let hits = hits_during_rebuild(&env, &alias).await;
        assert!(hits >= 8_000, "{hits} hits");
        let now: Vec<String> = env.sink.alias_targets(&alias).await.expect("alias");
        if now != old {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alias never moved\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expected_v2 = "SELECT id::text, jsonb_build_object('id', id, 'v', v, 'w', w)::text FROM m";
    env.assert_converges_to("m", expected_v2, CONVERGE).await;
    let gone = env
        .sink
        .json_request(Method::Get, &format!("/{}", old[0]), None)
        .await;
    assert!(gone.is_err(), "the old index was deleted");
    assert_eq!(ferry.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_valid_config_and_refuses_a_broken_one() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE a (id int PRIMARY KEY, v text);
         CREATE TABLE b (id int PRIMARY KEY, v text);
         INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 200) g;
         INSERT INTO b SELECT g, 'b' || g FROM generate_series(1, 300) g;",
    )
    .await
    .expect("schema");
    let one = format!("[[index]]\nname = \"{}\"\ntable = \"a\"\n", env.index("a"));
    let two = format!(
        "{one}\n[[index]]\nname = \"{}\"\ntable = \"b\"\n",
        env.index("b")
    );
    let cfg = env.write_config(&config(&env, "", &one));
    let mut ferry = env.run_ferry(&cfg);
    env.assert_converges("a", "a", CONVERGE).await;

    // A broken file is refused; the running pipeline goes on.
    std::fs::write(&cfg, config(&env, "max_batch_changes = 0", &two)).expect("write");
    ferry.hangup();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !env.log().contains("configuration reload refused") {
        assert!(
            Instant::now() < deadline,
            "no refusal logged\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    db.batch_execute("INSERT INTO a VALUES (1000, 'still streaming')")
        .await
        .expect("insert");
    env.assert_converges("a", "a", CONVERGE).await;
    assert!(ferry.is_running());

    // A valid one (a second index) is applied without a restart of the process.
    std::fs::write(&cfg, config(&env, "", &two)).expect("write");
    ferry.hangup();
    env.assert_converges("b", "b", CONVERGE).await;
    db.batch_execute(
        "INSERT INTO a VALUES (1001, 'after reload'); INSERT INTO b VALUES (1001, 'after reload')",
    )
    .await
    .expect("insert");
    env.assert_converges("a", "a", CONVERGE).await;
    env.assert_converges("b", "b", CONVERGE).await;
    assert!(ferry.is_running());
    assert_eq!(ferry.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reindex_rebuilds_into_a_new_index_and_swaps_the_alias() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE x (id int PRIMARY KEY, v text);
         INSERT INTO x SELECT g, 'x' || g FROM generate_series(1, 3000) g;",
    )
    .await
    .expect("schema");
    let alias = env.index("x");
    let indexes = format!("[[index]]\nname = \"{alias}\"\ntable = \"x\"\n");
    let cfg = env.write_config(&config(&env, "backfill_chunk_rows = 500", &indexes));
    let cfg_s = cfg.to_str().expect("utf8").to_string();
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("x", "x", CONVERGE).await;
    let old = env.sink.alias_targets(&alias).await.expect("alias");

    let (code, out, err) = ferry_e2e::ferry_once(&["reindex", &alias, "--config", &cfg_s]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("rebuild of"), "{out}");
    ferry.hangup();
    let deadline = Instant::now() + CONVERGE;
    let mut round = 0;
    loop {
        round += 1;
        db.batch_execute(&format!(
            "UPDATE x SET v = 'during reindex {round}' WHERE id = {round}"
        ))
        .await
        .expect("live change");
        let now = env.sink.alias_targets(&alias).await.expect("alias");
        assert_eq!(now.len(), 1, "the alias always points at exactly one index");
        if now != old {
            assert!(
                now[0].starts_with(&old[0]),
                "a new generation of the same mapping: {now:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the alias never moved\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.assert_converges("x", "x", CONVERGE).await;
    let gone = env
        .sink
        .json_request(Method::Get, &format!("/{}", old[0]), None)
        .await;
    assert!(gone.is_err(), "the old index was deleted");
    assert_eq!(ferry.stop(), Some(0));
}

/// Changing a row filter (`where`) rebuilds the index in the background like
/// a mapping change: documents that no longer match disappear when the alias
/// moves, and searches are answered throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_change_rebuilds_and_drops_documents_that_no_longer_match() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE f (id int PRIMARY KEY, v text, active bool NOT NULL);
         INSERT INTO f SELECT g, 'v' || g, g % 2 = 0 FROM generate_series(1, 3000) g;",
    )
    .await
    .expect("schema");
    let alias = env.index("f");
    let index = |filter: &str| {
        format!("[[index]]\nname = \"{alias}\"\ntable = \"f\"\nwhere = \"{filter}\"\n")
    };
    let cfg = env.write_config(&config(&env, "backfill_chunk_rows = 500", &index("active")));
    let mut ferry = env.run_ferry(&cfg);
    let expected =
        |filter: &str| format!("SELECT id::text, to_jsonb(f)::text FROM f WHERE {filter}");
    env.assert_converges_to("f", &expected("active"), CONVERGE)
        .await;
    let old = env.sink.alias_targets(&alias).await.expect("alias");

    // Narrow the filter and reload: the alias moves to a new index that
    // holds only the rows matching the new filter.
    std::fs::write(
        &cfg,
        config(
            &env,
            "backfill_chunk_rows = 500",
            &index("active AND id <= 1000"),
        ),
    )
    .expect("write");
    ferry.hangup();
    let deadline = Instant::now() + CONVERGE;
    loop {
        let hits = hits_during_rebuild(&env, &alias).await;
        assert!(hits >= 500, "{hits} hits");
        let now = env.sink.alias_targets(&alias).await.expect("alias");
        assert_eq!(now.len(), 1, "the alias always points at exactly one index");
        if now != old {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the alias never moved\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.assert_converges_to("f", &expected("active AND id <= 1000"), CONVERGE)
        .await;
    assert_eq!(env.count("f").await, 500);
    db.batch_execute("UPDATE f SET active = true WHERE id IN (1, 2001)")
        .await
        .expect("live change");
    env.assert_converges_to("f", &expected("active AND id <= 1000"), CONVERGE)
        .await;
    assert!(ferry.is_running());

    // A restart with the same filter keeps the rebuilt index: no new rebuild.
    assert_eq!(ferry.stop(), Some(0));
    let now = env.sink.alias_targets(&alias).await.expect("alias");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges_to("f", &expected("active AND id <= 1000"), CONVERGE)
        .await;
    assert_eq!(env.sink.alias_targets(&alias).await.expect("alias"), now);
    assert_eq!(ferry.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_pipeline_sees_every_write_and_verify_compares_only_ferrys_fields() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 200) g;",
    )
    .await
    .expect("schema");
    // Pipeline names are cluster-wide: prefix it like the index.
    let pipeline = env.index("stamp");
    let missing = env.write_config(&config(
        &env,
        "",
        &format!(
            "[[index]]\nname = \"{}\"\ntable = \"t\"\npipeline = \"{pipeline}\"\n",
            env.index("t")
        ),
    ));
    let missing_s = missing.to_str().expect("utf8");
    // Bad input first: a pipeline the cluster lacks is named with the fix,
    // by `check` and by `run`, before anything is created.
    let (code, out, err) = ferry_e2e::ferry_once(&["check", "--config", missing_s]);
    assert_ne!(code, 0, "{out}{err}");
    let fix = format!("index[0].pipeline: ingest pipeline {pipeline:?} does not exist in the cluster: create it (PUT _ingest/pipeline/{pipeline})");
    assert!(out.contains(&format!("problem: {fix}")), "{out}{err}");
    let ferry = env.run_ferry(&missing);
    assert_eq!(
        ferry.exit_code_within(Duration::from_secs(60)),
        Some(1),
        "{}",
        env.log_tail()
    );
    assert!(env.log().contains(&fix), "{}", env.log_tail());
    let slots: i64 = db
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .expect("slots")
        .get(0);
    assert_eq!(slots, 0, "refused before creating the slot");

    env.sink
        .json_request(
            Method::Put,
            &format!("/_ingest/pipeline/{pipeline}"),
            Some(json!({"processors": [{"set": {"field": "piped", "value": true}}]})),
        )
        .await
        .expect("create pipeline");
    let ferry = env.run_ferry(&missing);
    let all_piped = async |want: usize| {
        let docs = env.documents("t").await;
        docs.len() == want && docs.values().all(|d| d["piped"] == json!(true))
    };
    let deadline = Instant::now() + CONVERGE;
    while !all_piped(200).await {
        assert!(
            Instant::now() < deadline,
            "backfill through the pipeline: {}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    db.batch_execute("INSERT INTO t VALUES (201, 'new'); UPDATE t SET v = 'changed' WHERE id = 5;")
        .await
        .expect("changes");
    while !(all_piped(201).await && env.documents("t").await["5"]["v"] == "changed") {
        assert!(
            Instant::now() < deadline,
            "streamed writes through the pipeline: {}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The field the pipeline adds is not drift; a changed field of ferry's is.
    let (code, out, err) = ferry_e2e::ferry_once(&["verify", "--config", missing_s]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("checked 201, missing 0, different 0, extra 0"),
        "{out}"
    );
    env.sink
        .json_request(
            Method::Put,
            &format!("/{}/_doc/9", env.index("t")),
            Some(json!({"id": 9, "v": "tampered"})),
        )
        .await
        .expect("tamper");
    let (code, out, _) = ferry_e2e::ferry_once(&["verify", "--config", missing_s]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("different\t9"), "{out}");
    assert_eq!(ferry.stop(), Some(0));
}
/// Changing how a relation joins (`foreign_key` here; `table`, `references`
/// and `through` likewise) rebuilds the index in the background like a
/// mapping change: when the alias moves, every document holds the related
/// rows of the new join, and searches are answered throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relation_join_change_rebuilds_and_documents_hold_the_new_related_rows() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE u (id int PRIMARY KEY, name text);
         CREATE TABLE notes (id int PRIMARY KEY, author_id int, editor_id int, body text);
         INSERT INTO u SELECT g, 'user ' || g FROM generate_series(1, 500) g;
         INSERT INTO notes SELECT g, 1 + g % 500, 1 + (g * 7) % 250, 'note ' || g FROM generate_series(1, 1500) g;",
    )
    .await
    .expect("schema");
    let alias = env.index("u");
    let index = |fk: &str| {
        format!(
            "[[index]]\nname = \"{alias}\"\ntable = \"u\"\n\n\
             [[index.has_many]]\nfield = \"notes\"\ntable = \"notes\"\nforeign_key = \"{fk}\"\n"
        )
    };
    let expected = |fk: &str| {
        format!(
            "SELECT u.id::text, (to_jsonb(u) || jsonb_build_object('notes', coalesce((SELECT jsonb_agg(to_jsonb(n) ORDER BY n.id) \
             FROM notes n WHERE n.{fk} = u.id), '[]'::jsonb)))::text FROM u"
        )
    };
    let cfg = env.write_config(&config(
        &env,
        "backfill_chunk_rows = 100",
        &index("author_id"),
    ));
    let ferry = env.run_ferry(&cfg);
    env.assert_converges_to("u", &expected("author_id"), CONVERGE)
        .await;
    let old = env.sink.alias_targets(&alias).await.expect("alias");

    std::fs::write(
        &cfg,
        config(&env, "backfill_chunk_rows = 100", &index("editor_id")),
    )
    .expect("write");
    ferry.hangup();
    let deadline = Instant::now() + CONVERGE;
    loop {
        assert_eq!(hits_during_rebuild(&env, &alias).await, 500);
        let now = env.sink.alias_targets(&alias).await.expect("alias");
        assert_eq!(now.len(), 1, "the alias always points at exactly one index");
        if now != old {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the alias never moved\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.assert_converges_to("u", &expected("editor_id"), CONVERGE)
        .await;
    db.batch_execute("UPDATE notes SET editor_id = 1 WHERE id IN (1, 2, 3)")
        .await
        .expect("live change");
    env.assert_converges_to("u", &expected("editor_id"), CONVERGE)
        .await;
    assert_eq!(ferry.stop(), Some(0));
}

/// A root TRUNCATE while the first copy is still being made from a
/// snapshot older than the truncate: that copy is discarded and the index
/// copied again from a snapshot after it, so no row the truncate removed
/// comes back from the old snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_truncate_during_the_first_copy_leaves_no_row_of_the_older_snapshot() {
    let env = TestEnv::start().await;
    let proxy = ferry_testkit::FaultProxy::start(env.os.url())
        .await
        .expect("start the fault proxy");
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 6000) g;",
    )
    .await
    .expect("schema");
    let alias = env.index("t");
    let cfg = env.write_config(&format!(
        "[source]\nurl = \"{}\"\nslot = \"ferry_test\"\npublication = \"ferry_test\"\n\n\
         [sink]\nurl = \"{}\"\nrequest_timeout_secs = 30\n\n\
         [engine]\nmax_batch_delay_ms = 20\nbackfill_batch_rows = 100\nbackfill_chunk_rows = 500\n\n\
         [[index]]\nname = \"{alias}\"\ntable = \"t\"\n",
        env.pg.url("app"),
        proxy.url(),
    ));
    // A slow copy (each 100-row bulk waits 200 ms), truncated in its middle.
    proxy.set(ferry_testkit::Fault::Delay(Duration::from_millis(200)));
    let ferry = env.run_ferry(&cfg);
    let deadline = Instant::now() + CONVERGE;
    loop {
        let n = env.count("t").await;
        if n >= 1500 {
            assert!(n < 6000, "the copy finished before the truncate");
            break;
        }
        assert!(Instant::now() < deadline, "no progress\n{}", env.log_tail());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    db.batch_execute("TRUNCATE t; INSERT INTO t VALUES (1, 'after'), (7000, 'after');")
        .await
        .expect("truncate");
    proxy.clear();
    env.assert_converges("t", "t", CONVERGE).await;
    assert_eq!(env.count("t").await, 2);
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());
}

/// One sample of the snapshot-holding transactions of ferry's sessions.
async fn ferry_snapshots(db: &tokio_postgres::Client) -> Vec<(i32, String, f64)> {
    db.query(
        "SELECT pid, xact_start::text, extract(epoch FROM clock_timestamp() - xact_start)::float8
         FROM pg_stat_activity
         WHERE datname = 'app' AND application_name = 'ferry'
           AND backend_xmin IS NOT NULL AND xact_start IS NOT NULL",
        &[],
    )
    .await
    .expect("sample pg_stat_activity")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Seeding copies key-range chunks in parallel, each in its own short
/// snapshot transaction, while a writer keeps updating, deleting and
/// inserting rows all over the table: every row changed while its chunk was
/// being copied ends exactly right, and `pg_stat_activity` never shows a
/// ferry transaction holding a snapshot for longer than about one chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_changed_while_their_chunk_is_copied_end_right_and_no_snapshot_outlives_a_chunk() {
    use ferry_testkit::{Fault, FaultProxy};
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE seeded (id int PRIMARY KEY, v text, n int);
         INSERT INTO seeded SELECT g, 'v' || g, 0 FROM generate_series(1, 6000) g;",
    )
    .await
    .expect("schema");
    // Each bulk request takes 300 ms more: a 500-row chunk (5 requests,
    // its snapshot held until the last is durable) takes about 1.5 s, and
    // the whole copy (12 chunks, 2 at a time) about 9 s.
    let proxy = FaultProxy::start(env.os.url()).await.expect("proxy");
    proxy.set(Fault::Delay(Duration::from_millis(300)));
    let text = format!(
        "[source]\nurl = \"{}\"\nslot = \"ferry_test\"\npublication = \"ferry_test\"\n\n[sink]\nurl = \"{}\"\n\n\
         [engine]\nmax_batch_delay_ms = 20\nbackfill_chunk_rows = 500\nbackfill_batch_rows = 100\nbackfill_parallelism = 2\n\n\
         [[index]]\nname = \"{}\"\ntable = \"seeded\"\n",
        env.pg.url("app"),
        proxy.url(),
        env.index("seeded")
    );
    let cfg = env.write_config(&text);
    let ferry = env.run_ferry(&cfg);

    // The writer: every 50 ms one transaction updating, deleting and
    // inserting rows spread over the whole key range.
    let stop = Arc::new(AtomicBool::new(false));
    let writer_db = env.db().await;
    let writer_stop = stop.clone();
    let writer = tokio::spawn(async move {
        let mut round = 0i32;
        while !writer_stop.load(Ordering::Relaxed) {
            round += 1;
            let sql = format!(
                "BEGIN;
                 UPDATE seeded SET v = 'updated in round {round}', n = n + 1 WHERE id % 97 = {r97};
                 DELETE FROM seeded WHERE id % 101 = {r101};
                 INSERT INTO seeded SELECT 100000 + {round} * 10 + g, 'inserted', 0 FROM generate_series(1, 10) g;
                 COMMIT;",
                r97 = round % 97,
                r101 = round % 101
            );
            writer_db.batch_execute(&sql).await.expect("writer");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        round
    });

    // Sample ferry's snapshot transactions until the copy is done.
    let started = Instant::now();
    let deadline = started + CONVERGE;
    let mut longest = 0.0f64;
    let mut transactions: HashSet<(i32, String)> = HashSet::new();
    while !env.log().contains("backfill finished") {
        for (pid, xact_start, age) in ferry_snapshots(&db).await {
            longest = longest.max(age);
            transactions.insert((pid, xact_start));
        }
        assert!(
            Instant::now() < deadline,
            "the copy never finished\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seeding = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let rounds = writer.await.expect("writer task");
    proxy.clear();
    env.assert_converges("seeded", "seeded", CONVERGE).await;

    assert!(
        seeding > Duration::from_secs(6),
        "seeding took only {seeding:?}: too short to tell a chunk from the whole copy"
    );
    assert!(rounds >= 40, "the writer ran only {rounds} transactions");
    // 12 chunks of 500 keys, each its own transaction (sampling every
    // 50 ms sees most of them), where one snapshot used to serve them all.
    assert!(
        transactions.len() >= 4,
        "saw {} snapshot transactions of ferry's sessions (longest {longest:.1} s): {transactions:?}",
        transactions.len()
    );
    assert!(
        longest < 4.0 && longest < seeding.as_secs_f64() / 2.0,
        "a ferry transaction held its snapshot for {longest:.1} s of a {:.1} s seeding",
        seeding.as_secs_f64()
    );
    assert_eq!(ferry.stop(), Some(0));
}
