//! End-to-end: the control API of a running `ferry` (`/control/…`, bearer
//! token) and the CLI commands that use it: pause and resume lose nothing,
//! reindex starts at once, dead letters are listed and retried.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_e2e::{ferry_bin, ferry_once, output_of, wait_for, TestEnv};
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(90);
const TOKEN: &str = "control-test-token-9d1c";

/// A config with the control API on (token in a file) at a free port.
struct Setup {
    cfg: PathBuf,
    port: u16,
}

fn setup(env: &TestEnv, slot: &str, indexes: &str, sink_extra: &str) -> Setup {
    let port = ferry_testkit::free_port();
    let token = env.dir.path().join(format!("{slot}.token"));
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token file");
    let text = format!(
        "[source]\nurl = \"{}\"\nslot = \"{slot}\"\npublication = \"{slot}\"\n\n[sink]\nurl = \"{}\"\n{sink_extra}\n\n\
         [engine]\nmax_batch_delay_ms = 20\n\n[admin]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"{}\"\n\n{indexes}",
        env.pg.url("app"),
        env.os.url(),
        token.display()
    );
    Setup {
        cfg: env.write_config(&text),
        port,
    }
}

impl Setup {
    /// Runs `ferry <command> --config <cfg> <args…>`: (exit code, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        output_of(
            Command::new(ferry_bin())
                .arg(args[0])
                .arg("--config")
                .arg(&self.cfg)
                .args(&args[1..]),
        )
    }

    /// The state of `alias` as the running ferry reports it (`ferry indexes --json`).
    fn state(&self, alias: &str) -> Option<String> {
        let (code, out, _) = self.cli(&["indexes", "--json"]);
        if code != 0 {
            return None;
        }
        let doc: Value = serde_json::from_str(&out).ok()?;
        doc["indexes"]
            .as_array()?
            .iter()
            .find(|i| i["name"] == alias)
            .and_then(|i| i["state"].as_str().map(String::from))
    }
}

/// The server's current WAL position.
async fn current_wal(db: &tokio_postgres::Client) -> String {
    db.query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("wal position")
        .get(0)
}

async fn slot_passed(db: &tokio_postgres::Client, slot: &str, lsn: &str) -> bool {
    db.query_one(
        "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot, &lsn],
    )
    .await
    .map(|r| r.get::<_, bool>(0))
    .unwrap_or(false)
}

/// Pause means: stop writing the index (searches keep it as it was) while
/// the slot still advances, across a restart too; resume rebuilds it beside
/// the paused one, and every change made meanwhile arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_index_is_not_written_yet_loses_nothing_once_resumed() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE x (id int PRIMARY KEY, v text);
         INSERT INTO x SELECT g, 'x' || g FROM generate_series(1, 2000) g;",
    )
    .await
    .expect("schema");
    let alias = env.index("x");
    let s = setup(
        &env,
        "ferry_pause",
        &format!("[[index]]\nname = \"{alias}\"\ntable = \"x\"\n"),
        "",
    );
    let ferry = env.run_ferry(&s.cfg);
    env.assert_converges("x", "x", CONVERGE).await;
    wait_for("streaming", CONVERGE, async || {
        s.state(&alias).as_deref() == Some("streaming")
    })
    .await;
    let served = env.sink.alias_targets(&alias).await.expect("alias");

    let (code, out, err) = s.cli(&["pause", &alias]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("paused"), "{out}");
    wait_for("paused", CONVERGE, async || {
        s.state(&alias).as_deref() == Some("paused")
    })
    .await;
    let frozen = env.documents("x").await;
    let (code, out, err) = s.cli(&["pause", &alias]);
    assert_ne!(code, 0, "pausing twice is refused: {out}{err}");
    assert!(err.contains("already paused"), "{err}");

    db.batch_execute(
        "UPDATE x SET v = 'changed while paused' WHERE id <= 300;
         DELETE FROM x WHERE id BETWEEN 1000 AND 1100;
         INSERT INTO x SELECT g, 'new ' || g FROM generate_series(3001, 3200) g;",
    )
    .await
    .expect("changes while paused");
    let after_changes = current_wal(&db).await;
    wait_for(
        "the slot to pass the changes made while paused",
        CONVERGE,
        async || slot_passed(&db, "ferry_pause", &after_changes).await,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        env.documents("x").await,
        frozen,
        "a paused index receives no writes"
    );
    // `ferry plan` says the paused index waits for its resume, even with a
    // configuration that would rebuild it.
    let changed = std::fs::read_to_string(&s.cfg)
        .expect("config")
        .replace("table = \"x\"\n", "table = \"x\"\ncolumns = [\"id\"]\n");
    let changed = env.write_config(&changed);
    let (code, out, err) = ferry_once(&["plan", "--config", changed.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "nothing happens to a paused index: {out}{err}");
    assert!(
        out.contains(&format!(
            "index {alias}: paused; nothing to do until it is resumed"
        )),
        "{out}"
    );

    // A pause survives a restart.
    assert_eq!(ferry.stop(), Some(0));
    let ferry = env.run_ferry(&s.cfg);
    wait_for("paused after a restart", CONVERGE, async || {
        s.state(&alias).as_deref() == Some("paused")
    })
    .await;
    db.batch_execute("UPDATE x SET v = 'changed after the restart' WHERE id BETWEEN 301 AND 400")
        .await
        .expect("more changes");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.documents("x").await,
        frozen,
        "still paused after a restart"
    );

    let (code, out, err) = s.cli(&["resume", &alias]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("resumed"), "{out}");
    env.assert_converges("x", "x", CONVERGE).await;
    wait_for("the alias to move", CONVERGE, async || {
        env.sink.alias_targets(&alias).await.expect("alias") != served
    })
    .await;
    db.batch_execute("UPDATE x SET v = 'after resume' WHERE id <= 10")
        .await
        .expect("after resume");
    env.assert_converges("x", "x", CONVERGE).await;
    let (code, _, err) = s.cli(&["resume", &alias]);
    assert_ne!(code, 0, "resuming an index that is not paused is refused");
    assert!(err.contains("not paused"), "{err}");
    assert_eq!(ferry.stop(), Some(0));
}

/// `ferry reindex` with a token goes through the running ferry, which
/// starts the rebuild at once (no SIGHUP) and moves the alias when done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reindex_through_the_control_api_swaps_the_alias_without_sighup() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE r (id int PRIMARY KEY, v text);
         INSERT INTO r SELECT g, 'r' || g FROM generate_series(1, 2000) g;",
    )
    .await
    .expect("schema");
    let alias = env.index("r");
    let s = setup(
        &env,
        "ferry_creindex",
        &format!("[[index]]\nname = \"{alias}\"\ntable = \"r\"\n"),
        "",
    );
    let ferry = env.run_ferry(&s.cfg);
    env.assert_converges("r", "r", CONVERGE).await;
    let old = env.sink.alias_targets(&alias).await.expect("alias");

    let (code, out, err) = s.cli(&["reindex", &alias]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("started by the running ferry"), "{out}");
    let mut round = 0;
    wait_for("the alias to move", CONVERGE, async || {
        round += 1;
        db.batch_execute(&format!(
            "UPDATE r SET v = 'during {round}' WHERE id = {round}"
        ))
        .await
        .expect("live change");
        env.sink.alias_targets(&alias).await.expect("alias") != old
    })
    .await;
    env.assert_converges("r", "r", CONVERGE).await;
    let (code, _, err) = s.cli(&["reindex", "no-such-index"]);
    assert_eq!(code, 2, "an unknown index is a usage error: {err}");
    assert_eq!(ferry.stop(), Some(0));
}

/// Dead letters are listed and retried through the running ferry, and the
/// API refuses a wrong token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_retried_through_the_control_api() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, code text);
         INSERT INTO items SELECT g, g::text FROM generate_series(1, 50) g;
         INSERT INTO items VALUES (51, 'not-a-number'), (52, 'bad too');",
    )
    .await
    .expect("schema");
    let alias = env.index("cdl");
    let s = setup(
        &env,
        "ferry_cdl",
        &format!(
            "[[index]]\nname = \"{alias}\"\ntable = \"items\"\nmapping = {{ code = {{ type = \"integer\" }} }}\n"
        ),
        &format!("dead_letter_index = \"{}\"", env.index("cdl-dead-letters")),
    );
    let ferry = env.run_ferry(&s.cfg);
    let expected = "SELECT id::text, to_jsonb(i)::text FROM items i WHERE code ~ '^[0-9]+$'";
    env.assert_converges_to("cdl", expected, CONVERGE).await;
    let deadline = Instant::now() + CONVERGE;
    loop {
        let (_, out, err) = s.cli(&["dead-letters", "list"]);
        if out.contains("2 dead letter(s)") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "two dead letters never listed: {out}{err}\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (code, listed, err) = s.cli(&["dead-letters", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        listed.contains("\t51\t") && listed.contains("\t52\t") && listed.contains("mapper_parsing"),
        "{listed}"
    );

    db.batch_execute("UPDATE items SET code = '5100' WHERE id = 51")
        .await
        .expect("fix");
    env.assert_converges_to("cdl", expected, CONVERGE).await;
    let (code, out, err) = s.cli(&["dead-letters", "retry"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("healed 1, still failing 1"), "{out}");
    let (_, listed, _) = s.cli(&["dead-letters", "list"]);
    assert!(
        listed.contains("1 dead letter(s)") && listed.contains("\t52\t"),
        "{listed}"
    );
    // A verify started through the API reports the one row whose document
    // the cluster still refuses.
    let base = format!("http://127.0.0.1:{}", s.port);
    let http = reqwest::Client::new();
    let started = http
        .post(format!("{base}/control/verify"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("start verify");
    assert_eq!(started.status().as_u16(), 200);
    let mut report = Value::Null;
    wait_for("the verify to finish", CONVERGE, async || {
        let r = http
            .get(format!("{base}/control/verify"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("verify status");
        report = serde_json::from_str(&r.text().await.expect("body")).expect("json");
        report["state"] != "running"
    })
    .await;
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["reports"][0]["missing"], 1, "{report}");
    assert_eq!(report["reports"][0]["examples"][0]["id"], "52", "{report}");
    let unauthenticated = http
        .get(format!("{base}/control/verify"))
        .send()
        .await
        .expect("answer");
    assert_eq!(unauthenticated.status().as_u16(), 401);

    // The log names the actions done through the API.
    assert!(
        env.log().contains("control API: done"),
        "{}",
        env.log_tail()
    );

    // A wrong token is refused by the running ferry.
    std::fs::write(env.dir.path().join("ferry_cdl.token"), "wrong").expect("token");
    let (code, _, err) = s.cli(&["dead-letters", "list"]);
    assert_ne!(code, 0);
    assert!(err.contains("wrong bearer token"), "{err}");
    assert_eq!(ferry.stop(), Some(0));
}
