//! Delivery you can trust: poison documents follow their policy and heal
//! from dead letters; `ferry verify` finds and repairs drift.

use std::time::Duration;

use ferry_e2e::{ferry_once, wait_for, FerryProcess, TestEnv};
use ferry_opensearch::Method;
use serde_json::json;

const CONVERGE: Duration = Duration::from_secs(60);

fn cfg_text(env: &TestEnv, slot: &str, index: &str, policy: &str) -> String {
    format!(
        "[source]\nurl = \"{}\"\nslot = \"{slot}\"\npublication = \"{slot}\"\n\n[sink]\nurl = \"{}\"\ndead_letter_index = \"{}\"\n\n[engine]\nmax_batch_delay_ms = 20\n\n[[index]]\nname = \"{}\"\ntable = \"items\"\non_poison = \"{policy}\"\nmapping = {{ code = {{ type = \"integer\" }} }}\n",
        env.pg.url("app"),
        env.os.url(),
        env.index("dead-letters"),
        env.index(index),
    )
}

/// Documents expected in an index whose `code` maps as an integer: rows whose code is numeric.
const EXPECTED: &str = "SELECT id::text, to_jsonb(i)::text FROM items i WHERE code ~ '^[0-9]+$'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_documents_follow_the_policy_and_heal_from_dead_letters() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, code text);
         INSERT INTO items SELECT g, g::text FROM generate_series(1, 50) g;
         INSERT INTO items VALUES (51, 'not-a-number');",
    )
    .await
    .expect("schema");

    // dead_letter (the default): everything else flows, the bad one is recorded.
    let cfg = env.write_config(&cfg_text(&env, "ferry_dl", "dl", "dead_letter"));
    let cfg_s = cfg.to_str().expect("utf8").to_string();
    let mut ferry = env.run_ferry(&cfg);
    env.assert_converges_to("dl", EXPECTED, CONVERGE).await;
    db.batch_execute("INSERT INTO items VALUES (52, 'bad too'), (53, '53')")
        .await
        .expect("insert");
    env.assert_converges_to("dl", EXPECTED, CONVERGE).await;
    assert!(
        ferry.is_running(),
        "a poison document does not stop the pipeline"
    );
    wait_for("two dead letters", CONVERGE, async || {
        ferry_once(&["dead-letters", "--config", &cfg_s, "list"])
            .1
            .contains("2 dead letter(s)")
    })
    .await;
    let (_, listed, _) = ferry_once(&["dead-letters", "--config", &cfg_s, "list"]);
    assert!(
        listed.contains("\t51\t") && listed.contains("\t52\t") && listed.contains("mapper_parsing"),
        "{listed}"
    );

    // Fix one row; retry heals it from the current row and keeps the other.
    db.batch_execute("UPDATE items SET code = '5100' WHERE id = 51")
        .await
        .expect("fix");
    env.assert_converges_to("dl", EXPECTED, CONVERGE).await;
    let (code, out, err) = ferry_once(&["dead-letters", "--config", &cfg_s, "retry"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("healed 1, still failing 1"), "{out}");
    let (_, listed, _) = ferry_once(&["dead-letters", "--config", &cfg_s, "list"]);
    assert!(
        listed.contains("1 dead letter(s)") && listed.contains("\t52\t"),
        "{listed}"
    );
    let (code, out, _) = ferry_once(&["dead-letters", "--config", &cfg_s, "purge"]);
    assert_eq!(code, 0);
    assert!(out.contains("purged 1"), "{out}");
    assert_eq!(ferry.stop(), Some(0));

    // skip: logged and counted, the pipeline goes on, nothing is recorded.
    db.batch_execute("UPDATE items SET code = '52' WHERE id = 52")
        .await
        .expect("fix 52");
    let cfg = env.write_config(&cfg_text(&env, "ferry_skip", "skip", "skip"));
    let ferry = env.run_ferry(&cfg);
    env.assert_converges_to("skip", EXPECTED, CONVERGE).await;
    db.batch_execute("INSERT INTO items VALUES (60, 'skipped')")
        .await
        .expect("insert");
    db.batch_execute("INSERT INTO items VALUES (61, '61')")
        .await
        .expect("insert");
    env.assert_converges_to("skip", EXPECTED, CONVERGE).await;
    assert!(env.log().contains("skipped (on_poison = \"skip\")"));
    assert_eq!(ferry.stop(), Some(0));

    // stop: ferry halts naming the document; once the row is fixed, a restart
    // rebuilds the rejected document from the current row and goes on.
    let cfg = env.write_config(&cfg_text(&env, "ferry_stop", "stop", "stop"));
    db.batch_execute("UPDATE items SET code = '60' WHERE id = 60")
        .await
        .expect("fix 60");
    let mut ferry = env.run_ferry(&cfg);
    env.assert_converges_to("stop", EXPECTED, CONVERGE).await;
    db.batch_execute("INSERT INTO items VALUES (70, 'halts')")
        .await
        .expect("insert");
    wait_for(
        "ferry to stop on the poison document",
        CONVERGE,
        async || !ferry.is_running(),
    )
    .await;
    let log = env.log();
    assert!(
        log.contains("rejected document \"70\""),
        "{}",
        env.log_tail()
    );
    db.batch_execute("UPDATE items SET code = '70' WHERE id = 70")
        .await
        .expect("fix 70");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges_to("stop", EXPECTED, CONVERGE).await;
    assert_eq!(ferry.stop(), Some(0));
}

/// A table `t` of `rows` rows and ferry running with its index converged;
/// returns the config path too.
async fn indexed_table(rows: u32) -> (TestEnv, FerryProcess, String) {
    let env = TestEnv::start().await;
    env.db()
        .await
        .batch_execute(&format!(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, {rows}) g;"
        ))
        .await
        .expect("schema");
    let cfg = env.config("t", "t", "");
    let cfg_s = cfg.to_str().expect("utf8").to_string();
    let ferry = env.run_ferry(&cfg);
    env.assert_converges("t", "t", CONVERGE).await;
    (env, ferry, cfg_s)
}

/// Plants a lost, a changed and a stray document in `name` behind ferry's back.
async fn plant_drift(env: &TestEnv, name: &str, lost: u32, changed: u32, stray: u32) {
    env.sink
        .json_request(Method::Delete, &format!("/{name}/_doc/{lost}"), None)
        .await
        .expect("delete");
    env.sink
        .json_request(
            Method::Put,
            &format!("/{name}/_doc/{changed}"),
            Some(json!({"id": changed, "v": "tampered"})),
        )
        .await
        .expect("tamper");
    env.sink
        .json_request(
            Method::Put,
            &format!("/{name}/_doc/{stray}"),
            Some(json!({"id": stray, "v": "stray"})),
        )
        .await
        .expect("stray");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_and_repairs_drift_within_the_tombstone_window() {
    let (env, ferry, cfg_s) = indexed_table(300).await;
    let (code, out, err) = ferry_once(&["verify", "--config", &cfg_s]);
    assert_eq!(code, 0, "clean index verifies clean: {out}{err}");
    assert!(
        out.contains("checked 300, missing 0, different 0, extra 0"),
        "{out}"
    );
    let (code, out, err) = ferry_once(&["verify", "--config", &cfg_s, "--sample", "50"]);
    assert_eq!(code, 0, "a clean index samples clean: {out}{err}");
    assert!(out.contains("missing 0, different 0, extra 0"), "{out}");

    // Plant drift behind ferry's back: a lost, a changed and a stray
    // document. The delete's tombstone is kept for an hour, so however slow
    // the machine, the repair runs inside the tombstone window.
    let name = env.index("t");
    env.sink
        .json_request(
            Method::Put,
            &format!("/{name}/_settings"),
            Some(json!({"index": {"gc_deletes": "1h"}})),
        )
        .await
        .expect("long tombstones");
    plant_drift(&env, &name, 7, 8, 9999).await;
    let (code, out, _) = ferry_once(&["verify", "--config", &cfg_s]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("checked 300, missing 1, different 1, extra 1"),
        "{out}"
    );
    for line in ["missing\t7", "different\t8", "extra\t9999"] {
        assert!(out.contains(line), "{line}: {out}");
    }
    // A sample as large as the table and the index covers all of both: it
    // must find exactly the planted drift, the stray document included.
    let (code, out, _) = ferry_once(&["verify", "--config", &cfg_s, "--sample", "1000"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("checked 301, missing 1, different 1, extra 1"),
        "{out}"
    );
    for line in ["missing\t7", "different\t8", "extra\t9999"] {
        assert!(out.contains(line), "{line}: {out}");
    }
    let (code, out, _) = ferry_once(&["verify", "--config", &cfg_s, "--repair"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("repaired 3, unrepairable 0"), "{out}");
    env.assert_converges("t", "t", CONVERGE).await;
    let (code, out, _) = ferry_once(&["verify", "--config", &cfg_s]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("missing 0, different 0, extra 0"), "{out}");
    let (code, out, _) = ferry_once(&["verify", "--config", &cfg_s, "--sample", "50"]);
    assert_eq!(code, 0, "a repaired index samples clean: {out}");
    assert!(out.contains("missing 0, different 0, extra 0"), "{out}");

    // A document overwritten with an external version beyond the WAL cannot
    // be outbid without making every later change of it lose: verify says
    // so, names the fix, and leaves it (and the streamed changes) alone.
    env.sink
        .json_request(
            Method::Put,
            &format!("/{name}/_doc/10?version=1000000000000000&version_type=external"),
            Some(json!({"id": 10, "v": "from the future"})),
        )
        .await
        .expect("future write");
    let (code, out, _) = ferry_once(&["verify", "--config", &cfg_s, "--repair"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("different 1, extra 0, repaired 0, unrepairable 1")
            && out.contains("unrepairable\t10")
            && out.contains(&format!("ferry reindex {name}")),
        "{out}"
    );
    assert_eq!(ferry.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_walks_in_pages_and_finds_drift_on_every_page() {
    let (env, ferry, cfg_s) = indexed_table(2500).await;
    // 25 table pages and 26 index pages of 100: the drift sits on pages
    // 2 (lost), 13 (changed) and past the table's end (stray).
    plant_drift(&env, &env.index("t"), 150, 1250, 5000).await;
    let (code, out, err) = ferry_once(&["verify", "--config", &cfg_s, "--page-size", "100"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("checked 2500, missing 1, different 1, extra 1"),
        "{out}"
    );
    for line in ["missing\t150", "different\t1250", "extra\t5000"] {
        assert!(out.contains(line), "{line}: {out}");
    }
    let (code, out, _) = ferry_once(&[
        "verify",
        "--config",
        &cfg_s,
        "--page-size",
        "100",
        "--repair",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("repaired 3, unrepairable 0"), "{out}");
    env.assert_converges("t", "t", CONVERGE).await;
    assert_eq!(ferry.stop(), Some(0));
}

/// A document whose id cannot be any row's key (`foo` or `01` for an
/// integer key, written outside ferry) is an extra document: `verify`
/// reports it and `--repair` deletes it, rather than failing on the id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_and_repairs_documents_whose_ids_cannot_be_keys() {
    let (env, ferry, cfg_s) = indexed_table(50).await;
    let name = env.index("t");
    for id in ["foo", "01"] {
        env.sink
            .json_request(
                Method::Put,
                &format!("/{name}/_doc/{id}?refresh=true"),
                Some(json!({"id": 9999, "v": "stray"})),
            )
            .await
            .expect("stray");
    }
    let (code, out, err) = ferry_once(&["verify", "--config", &cfg_s]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("checked 50, missing 0, different 0, extra 2"),
        "{out}{err}"
    );
    for line in ["extra\tfoo", "extra\t01"] {
        assert!(out.contains(line), "{line}: {out}");
    }
    let (code, out, err) = ferry_once(&["verify", "--config", &cfg_s, "--repair"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("repaired 2, unrepairable 0"), "{out}");
    env.assert_converges("t", "t", CONVERGE).await;
    assert_eq!(ferry.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_page_through_more_entries_than_a_page() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, code text);
         INSERT INTO items SELECT g, g::text FROM generate_series(1, 25) g;",
    )
    .await
    .expect("schema");
    let cfg = env.write_config(&cfg_text(&env, "ferry_dlp", "dlp", "dead_letter"));
    let cfg_s = cfg.to_str().expect("utf8").to_string();
    let ferry = env.run_ferry(&cfg);
    env.assert_converges_to("dlp", EXPECTED, CONVERGE).await;
    assert_eq!(ferry.stop(), Some(0));
    let dl = env.index("dead-letters");
    let plant = async || {
        env.sink
            .ensure_dead_letter_index(&dl)
            .await
            .expect("dl index");
        for i in 1..=25 {
            let alias = env.index("dlp");
            env.sink
                .json_request(
                    Method::Put,
                    &format!("/{dl}/_doc/{alias}%2F{i}?refresh=true"),
                    Some(json!({"index": alias, "id": i.to_string(), "status": 400,
                                "reason": "mapper_parsing_exception: planted", "lsn": "0/1"})),
                )
                .await
                .expect("plant");
        }
    };
    plant().await;

    let paged = |action: &str| {
        ferry_once(&[
            "dead-letters",
            "--config",
            &cfg_s,
            "--page-size",
            "10",
            action,
        ])
    };
    let (code, out, err) = paged("list");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("25 dead letter(s)"), "{out}");
    for i in 1..=25 {
        assert!(out.contains(&format!("\t{i}\t400\t")), "{i}: {out}");
    }
    // Every entry's row is fine now: retry heals all 25, page after page.
    let (code, out, _) = paged("retry");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("healed 25, still failing 0"), "{out}");
    assert!(paged("list").1.contains("0 dead letter(s)"));

    plant().await;
    let (code, out, _) = paged("purge");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("purged 25 dead letter(s)"), "{out}");
    assert!(paged("list").1.contains("0 dead letter(s)"));
}
