//! File and stdout sinks: a log of the bulk requests a cluster would get.
//! Folded by version it equals the table, across a kill -9 (an interrupted
//! request is cut, the replay appends it again), rotation and a TRUNCATE
//! (a new generation the state file points the alias at).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_e2e::{
    compare, ferry_bin, ferry_once, parse_bulk, rows_as_json, wait_for, BulkAction, FerryProcess,
    FERRY_DOC,
};
use ferry_testkit::{PgCluster, PgOptions};
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(60);

/// A PostgreSQL with database `app`, `ferry_doc` and table `items`.
async fn database(rows: u32) -> (PgCluster, tokio_postgres::Client) {
    let pg = tokio::task::spawn_blocking(|| PgCluster::start_with(PgOptions::default()))
        .await
        .expect("join")
        .expect("start PostgreSQL");
    pg.create_database("app").await.expect("create database");
    let db = pg.client("app").await.expect("connect");
    db.batch_execute(FERRY_DOC).await.expect("ferry_doc");
    db.batch_execute(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, name text, n int);
         INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, {rows}) g;"
    ))
    .await
    .expect("schema");
    (pg, db)
}

fn config(dir: &Path, pg: &PgCluster, sink_url: &str, extra_sink: &str) -> PathBuf {
    let path = dir.join("ferry.toml");
    std::fs::write(
        &path,
        format!(
            "[source]\nurl = \"{}\"\nslot = \"ferry_test\"\npublication = \"ferry_test\"\n\n\
             [sink]\nurl = \"{sink_url}\"\n{extra_sink}\n\n[engine]\nmax_batch_delay_ms = 20\n\n\
             [[index]]\nname = \"items\"\ntable = \"items\"\n",
            pg.url("app")
        ),
    )
    .expect("write config");
    path
}

/// The documents of `index` after applying `actions` in order with the
/// cluster's `external_gte` rule (a write older than the stored version,
/// deletes included, loses).
fn fold(actions: &[BulkAction], index: &str) -> BTreeMap<String, Value> {
    let mut stored: BTreeMap<&str, (u64, Option<&Value>)> = BTreeMap::new();
    for a in actions.iter().filter(|a| a.index == index) {
        let newer = stored
            .get(a.id.as_str())
            .is_none_or(|(v, _)| a.version >= *v);
        if newer {
            stored.insert(&a.id, (a.version, a.source.as_ref()));
        }
    }
    stored
        .into_iter()
        .filter_map(|(id, (_, doc))| doc.map(|d| (id.to_string(), d.clone())))
        .collect()
}

/// Every rotated file `<log>.<n>` in order, then the log itself.
fn log_files(log: &Path) -> Vec<PathBuf> {
    let name = log.file_name().and_then(|n| n.to_str()).expect("name");
    let mut numbered: Vec<(u64, PathBuf)> = std::fs::read_dir(log.parent().expect("dir"))
        .expect("read dir")
        .filter_map(|e| {
            let e = e.expect("entry");
            let n = e
                .file_name()
                .to_str()?
                .strip_prefix(&format!("{name}."))?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    numbered.sort();
    let mut files: Vec<PathBuf> = numbered.into_iter().map(|(_, p)| p).collect();
    files.push(log.to_path_buf());
    files
}

/// The concrete index the state file says the alias `items` serves.
fn served(log: &Path) -> Option<String> {
    let mut state = log.as_os_str().to_owned();
    state.push(".ferry.json");
    let text = std::fs::read_to_string(PathBuf::from(state)).ok()?;
    let v: Value = serde_json::from_str(&text).expect("state is JSON");
    v["aliases"]["items"].as_str().map(str::to_string)
}

/// The documents the log holds for the index the alias serves.
fn log_documents(log: &Path) -> BTreeMap<String, Value> {
    let Some(index) = served(log) else {
        return BTreeMap::new();
    };
    let text: String = log_files(log)
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("read log"))
        .collect();
    fold(&parse_bulk(&text), &index)
}

async fn assert_log_converges(log: &Path, db: &tokio_postgres::Client, ferry_log: &Path) {
    let mut diff = Vec::new();
    let found = tokio::time::timeout(CONVERGE, async {
        loop {
            let rows = rows_as_json(db, "items").await;
            diff = compare(&rows, &log_documents(log));
            if diff.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "the log never equalled the table: {:?}\nferry's log:\n{}",
        &diff[..diff.len().min(10)],
        std::fs::read_to_string(ferry_log).unwrap_or_default()
    );
}

/// Changes rows in many small transactions until `stop` is set.
async fn churn(db: tokio_postgres::Client, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let mut i = 0u32;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        i += 1;
        db.batch_execute(&format!(
            "BEGIN;
             UPDATE items SET n = n + 1, name = 'changed {i}' WHERE id % 17 = {m};
             DELETE FROM items WHERE id = {del};
             INSERT INTO items VALUES ({ins}, 'new {i}', {i}) ON CONFLICT (id) DO UPDATE SET n = -1;
             COMMIT;",
            m = i % 17,
            del = i * 7 % 400 + 1,
            ins = 1000 + i,
        ))
        .await
        .expect("churn");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_log_folds_to_the_table_across_kill_9_rotation_and_truncate() {
    let (pg, db) = database(400).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("items.ndjson");
    let ferry_log = dir.path().join("ferry.log");
    let cfg = config(
        dir.path(),
        &pg,
        &format!("file://{}", log.display()),
        "rotate_bytes = 16384",
    );

    let ferry = FerryProcess::start(&cfg, &ferry_log);
    assert_log_converges(&log, &db, &ferry_log).await;
    let first = served(&log).expect("the alias is in the state file");
    assert!(first.starts_with("items-"), "{first}");

    // Changes while ferry is killed without warning, and after it restarts.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn(churn(
        pg.client("app").await.expect("connect"),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ferry.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // What a write torn by the crash leaves: half an action. ferry cuts it
    // (a reader of the file would choke on it) and writes it again.
    let mut torn = std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .expect("open the log");
    std::io::Write::write_all(&mut torn, b"{\"index\":{\"_index\":\"it").expect("tear");
    drop(torn);
    let ferry = FerryProcess::start(&cfg, &ferry_log);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.expect("writer");
    assert_log_converges(&log, &db, &ferry_log).await;
    assert_eq!(
        served(&log),
        Some(first.clone()),
        "a restart keeps the generation"
    );
    let files = log_files(&log);
    assert!(files.len() >= 3, "the log rotated at 16 KiB: {files:?}");
    for f in &files {
        // Rotation falls between requests: each file parses on its own
        // (`actions` panics on a source line without its action).
        let text = std::fs::read_to_string(f).expect("read");
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{f:?} ends mid-line"
        );
        parse_bulk(&text);
    }

    // A TRUNCATE cannot be written as bulk actions: the index is rebuilt
    // into a new generation, and the alias moves to it when it is complete.
    db.batch_execute("TRUNCATE items; INSERT INTO items VALUES (1, 'after', 1), (2, 'after', 2);")
        .await
        .expect("truncate");
    assert_log_converges(&log, &db, &ferry_log).await;
    let second = served(&log).expect("alias");
    assert_ne!(second, first, "the truncate started a new generation");

    // Beside the running ferry, the operator tools that only read or mark
    // the state work on a log; those that read documents back say they
    // need a cluster. A second ferry on the same file is refused before it
    // changes anything.
    let cfg_s = cfg.to_str().expect("utf8");
    let (code, out, err) = ferry_once(&["plan", "--config", cfg_s]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = ferry_once(&["verify", "--config", cfg_s]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("only appends to"), "{err}");
    let second_cfg = dir.path().join("second.toml");
    std::fs::write(
        &second_cfg,
        std::fs::read_to_string(&cfg)
            .expect("config")
            .replace("ferry_test", "ferry_second"),
    )
    .expect("second config");
    let second_log = dir.path().join("second.log");
    let intruder = FerryProcess::start(&second_cfg, &second_log);
    wait_for("the second ferry to be refused", CONVERGE, async || {
        std::fs::read_to_string(&second_log)
            .unwrap_or_default()
            .contains("another process writes this log")
    })
    .await;
    assert_eq!(
        served(&log),
        Some(second.clone()),
        "the refused ferry changed nothing"
    );
    // The running ferry keeps the file through its own restart (SIGHUP
    // after `reindex`): the second one, retrying all along, never gets in.
    let (code, out, err) = ferry_once(&["reindex", "items", "--config", cfg_s]);
    assert_eq!(code, 0, "{out}{err}");
    ferry.hangup();
    wait_for("the rebuild to go live", CONVERGE, async || {
        served(&log).is_some_and(|s| s != second)
    })
    .await;
    assert_log_converges(&log, &db, &ferry_log).await;
    let intruder_log = std::fs::read_to_string(&second_log).unwrap_or_default();
    assert!(
        !intruder_log.contains("replication started"),
        "the second ferry streamed into the log: {intruder_log}"
    );
    intruder.kill();
    assert_eq!(ferry.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdout_log_carries_a_full_copy_then_the_stream_and_logs_stay_on_stderr() {
    let (pg, db) = database(50).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), &pg, "stdout:", "");
    let stderr = std::fs::File::create(dir.path().join("ferry.log")).expect("log");
    let mut child = Command::new(ferry_bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .env("FERRY_ADMIN__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .spawn()
        .expect("start ferry");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut text = String::new();
    let mut read = || {
        while let Ok(line) = rx.try_recv() {
            text.push_str(&line);
            text.push('\n');
        }
        text.clone()
    };
    let index = |t: &str| parse_bulk(t).first().map(|a| a.index.clone());
    wait_for("the full copy on stdout", CONVERGE, async || {
        let t = read();
        index(&t).is_some_and(|i| fold(&parse_bulk(&t), &i).len() == 50)
    })
    .await;
    db.batch_execute(
        "UPDATE items SET name = 'streamed' WHERE id = 3; DELETE FROM items WHERE id = 4;",
    )
    .await
    .expect("change");
    let rows = rows_as_json(&db, "items").await;
    wait_for("the stream on stdout", CONVERGE, async || {
        let t = read();
        let i = index(&t).expect("index");
        compare(&rows, &fold(&parse_bulk(&t), &i)).is_empty()
    })
    .await;
    // A TRUNCATE rebuilds the index into a new generation (a new `_index`)
    // even though stdout keeps no state file: the process keeps it.
    let first = index(&read()).expect("index");
    db.batch_execute("TRUNCATE items; INSERT INTO items VALUES (1, 'after', 1);")
        .await
        .expect("truncate");
    let rows = rows_as_json(&db, "items").await;
    wait_for("the new generation on stdout", CONVERGE, async || {
        let t = read();
        let actions = parse_bulk(&t);
        let newest = actions.last().map(|a| a.index.clone()).expect("actions");
        newest != first && compare(&rows, &fold(&actions, &newest)).is_empty()
    })
    .await;
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    // Every line was a bulk action or source: parse_bulk() panics otherwise.
    parse_bulk(&read());
    let log = std::fs::read_to_string(dir.path().join("ferry.log")).expect("log");
    assert!(
        log.contains("stdout:"),
        "ferry logged where it writes: {log}"
    );
}
