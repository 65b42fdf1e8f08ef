//! Bad configuration and bad environments fail fast, name the problem and the fix, and exit non-zero.

use ferry_e2e::{ferry_once, TestEnv};
use ferry_testkit::PgOptions;

fn write(dir: &std::path::Path, text: &str) -> String {
    let p = dir.join("bad.toml");
    std::fs::write(&p, text).expect("write");
    p.display().to_string()
}

const GOOD_SINK: &str = "http://127.0.0.1:9";

#[test]
fn unknown_key_is_rejected_with_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write(
        dir.path(),
        &format!("[source]\nurl = \"postgres://x@127.0.0.1/app\"\nslot = \"s\"\npublication = \"p\"\n[sink]\nurl = \"{GOOD_SINK}\"\nurll = \"typo\"\n[[index]]\nname = \"users\"\ntable = \"users\"\n"),
    );
    let (code, _out, err) = ferry_once(&["run", "--config", &cfg]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("urll") && err.contains("sink"), "{err}");
}

#[test]
fn invalid_values_are_all_reported_with_their_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write(
        dir.path(),
        "[source]\nurl = \"mysql://x@127.0.0.1/app\"\nslot = \"Bad-Slot\"\npublication = \"p\"\n[sink]\nurl = \"not a url\"\n[[index]]\nname = \"Users\"\ntable = \"users\"\n",
    );
    let (code, _out, err) = ferry_once(&["check", "--config", &cfg]);
    assert_eq!(code, 2, "{err}");
    for key in ["source.url", "source.slot", "sink.url", "index[0].name"] {
        assert!(err.contains(key), "{key} not named in: {err}");
    }
}

#[test]
fn missing_config_file_is_named() {
    let (code, _out, err) = ferry_once(&["run", "--config", "/nonexistent/ferry.toml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent/ferry.toml"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_problems_fail_with_the_fix() {
    let env = TestEnv::start().await;
    let port = env.pg.port();

    // A table that does not exist names the config key.
    let cfg = env.config("users", "no_such_table", "");
    let (code, _o, err) = ferry_once(&["run", "--config", cfg.to_str().expect("utf8")]);
    assert_ne!(code, 0);
    assert!(
        err.contains("index[0].table") && err.contains("does not exist"),
        "{err}"
    );

    // A malformed URL names source.url.
    let text = format!(
        "[source]\nurl = \"postgres://postgres@127.0.0.1:notaport/app\"\nslot = \"s\"\npublication = \"p\"\n[sink]\nurl = \"{}\"\n[[index]]\nname = \"users\"\ntable = \"users\"\n",
        env.os.url()
    );
    let cfg = env.write_config(&text);
    let (code, _o, err) = ferry_once(&["run", "--config", cfg.to_str().expect("utf8")]);
    assert_ne!(code, 0);
    assert!(err.contains("source.url"), "{err}");

    // A database that does not exist says so.
    let text = format!(
        "[source]\nurl = \"postgres://postgres@127.0.0.1:{port}/nope\"\nslot = \"s\"\npublication = \"p\"\n[sink]\nurl = \"{}\"\n[[index]]\nname = \"users\"\ntable = \"users\"\n",
        env.os.url()
    );
    let cfg = env.write_config(&text);
    let (code, _o, err) = ferry_once(&["run", "--config", cfg.to_str().expect("utf8")]);
    assert_ne!(code, 0);
    assert!(err.contains("database") && err.contains("nope"), "{err}");

    // ferry check passes once the table exists, and wrote nothing.
    env.db()
        .await
        .batch_execute("CREATE TABLE users (id int PRIMARY KEY)")
        .await
        .expect("table");
    let cfg = env.config("users", "users", "");
    let (code, out, err) = ferry_once(&["check", "--config", cfg.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}\n{err}");
    let slots: i64 = env
        .db()
        .await
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .expect("slots")
        .get(0);
    assert_eq!(slots, 0, "check created nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_not_logical_is_explained() {
    let env = TestEnv::start_with(PgOptions {
        wal_level: "replica".into(),
        extra_conf: vec![],
    })
    .await;
    env.db()
        .await
        .batch_execute("CREATE TABLE users (id int PRIMARY KEY)")
        .await
        .expect("table");
    let cfg = env.config("users", "users", "");
    let (code, _o, err) = ferry_once(&["run", "--config", cfg.to_str().expect("utf8")]);
    assert_ne!(code, 0);
    assert!(
        err.contains("wal_level") && err.contains("logical"),
        "{err}"
    );
    let (code, out, _e) = ferry_once(&["check", "--config", cfg.to_str().expect("utf8")]);
    assert_ne!(code, 0);
    assert!(out.contains("wal_level = logical"), "{out}");
}

/// `where` and `order_by` are checked against the database by `check` (and
/// at start-up), and the error names the config key and the server's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_where_and_order_by_fail_check_naming_the_key() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY, active bool);
         CREATE TABLE orders (id int PRIMARY KEY, user_id int, total int);",
    )
    .await
    .expect("schema");
    let cfg = env.config("users", "users", "where = \"no_such_column > 0\"\n");
    let (code, out, err) = ferry_once(&["check", "--config", cfg.to_str().expect("utf8")]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        out.contains(r#"index[0].where: column "no_such_column" does not exist"#),
        "{out}{err}"
    );
    let cfg = env.config(
        "users",
        "users",
        "where = \"active\"\n\n[[index.has_many]]\nfield = \"orders\"\ntable = \"orders\"\nforeign_key = \"user_id\"\norder_by = \"placed_at desc\"\n",
    );
    let (code, out, err) = ferry_once(&["check", "--config", cfg.to_str().expect("utf8")]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        out.contains(r#"index[0].has_many[0].order_by: column "placed_at" does not exist"#),
        "{out}{err}"
    );
    // run refuses the same way before it creates anything.
    let (code, _o, err) = ferry_once(&["run", "--config", cfg.to_str().expect("utf8")]);
    assert_ne!(code, 0);
    assert!(err.contains("index[0].has_many[0].order_by"), "{err}");
}
