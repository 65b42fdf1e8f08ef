//! End-to-end: the admin endpoint of the real `ferry` binary (health,
//! readiness, Prometheus metrics, status JSON), `ferry status`, systemd
//! notifications and a taken admin port.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_e2e::{ferry_bin, ferry_once, TestEnv};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A value that must never show up on the admin endpoint.
const ROW_SECRET: &str = "row-secret-7f3a";

/// One HTTP/1.0 GET: (status, head, body).
async fn get(port: u16, path: &str) -> std::io::Result<(u16, String, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("no answer within 10 s"))??;
    let text = String::from_utf8(raw).map_err(std::io::Error::other)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no head in {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    Ok((status, head.to_string(), body.to_string()))
}

/// The value of the sample line starting with `series` (name and labels).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// `ferry run` with a chosen environment; killed on drop.
struct Ferry(Child);

impl Ferry {
    fn start(config: &Path, log: &Path, env: &[(&str, &str)]) -> Ferry {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let mut cmd = Command::new(ferry_bin());
        cmd.args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            // The file's [admin] listen is the one under test.
            .env_remove("FERRY_ADMIN__LISTEN")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        for (k, v) in env {
            cmd.env(k, v);
        }
        Ferry(cmd.spawn().expect("start ferry"))
    }

    /// Waits up to `within` for the process to exit on its own.
    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGTERM, then the exit code.
    fn stop(&mut self) -> Option<i32> {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        self.wait_exit(Duration::from_secs(30))
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every datagram received so far on the notify socket.
fn drain(sock: &UnixDatagram, into: &mut Vec<String>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        into.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
}

/// Collects notifications until one starts with `status` and at least
/// `pings` `WATCHDOG=1` followed it (60 s at most); all of them, in order.
async fn wait_for_notifications(sock: &UnixDatagram, status: &str, pings: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        drain(sock, &mut seen);
        if let Some(at) = seen.iter().position(|m| m.contains(status)) {
            let after = seen[at..]
                .iter()
                .filter(|m| m.trim_end() == "WATCHDOG=1")
                .count();
            if after >= pings {
                return seen;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {status} followed by {pings} watchdog pings: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A start while PostgreSQL is down must not hold up `systemctl start` (or
/// boot): ferry reports READY=1 as soon as its admin endpoint listens,
/// `STATUS=retrying: …` while it cannot connect, and pings the watchdog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_while_postgres_is_down_reports_ready_retrying_and_pings_the_watchdog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (db_port, search_port, admin_port) = (
        ferry_testkit::free_port(),
        ferry_testkit::free_port(),
        ferry_testkit::free_port(),
    );
    let cfg = dir.path().join("ferry.toml");
    std::fs::write(
        &cfg,
        format!(
            "[source]\nurl = \"postgres://ferry@127.0.0.1:{db_port}/app\"\nslot = \"ferry_down\"\n\
             publication = \"ferry_down\"\n\n[sink]\nurl = \"http://127.0.0.1:{search_port}\"\n\n\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n[[index]]\nname = \"items\"\ntable = \"items\"\n"
        ),
    )
    .expect("config");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify.set_nonblocking(true).expect("nonblocking");
    let log = dir.path().join("ferry.log");
    let mut ferry = Ferry::start(
        &cfg,
        &log,
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().expect("utf-8 path")),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let seen = wait_for_notifications(&notify, "STATUS=retrying: ", 3).await;
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        seen[0].starts_with("READY=1\nSTATUS=starting"),
        "{seen:?}\n{}",
        log_text()
    );
    assert_eq!(
        seen.iter().filter(|m| m.starts_with("READY=1")).count(),
        1,
        "{seen:?}"
    );
    // Alive, not ready: the healthcheck passes, /readyz says why not.
    let (code, _, _) = get(admin_port, "/healthz").await.expect("healthz");
    assert_eq!(code, 200);
    let (code, _, _) = get(admin_port, "/readyz").await.expect("readyz");
    assert_eq!(code, 503);
    assert_eq!(ferry.stop(), Some(0), "ferry exits 0\n{}", log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoint_reports_health_metrics_and_status() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(&format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL);
         INSERT INTO items SELECT g, '{ROW_SECRET}-' || g FROM generate_series(1, 40) g;"
    ))
    .await
    .expect("schema");

    let port = ferry_testkit::free_port();
    let index = env.index("items");
    let slot = "ferry_admin_e2e";
    let text = format!(
        "[source]\nurl = \"{}\"\nslot = \"{slot}\"\npublication = \"ferry_admin_e2e\"\n\n\
         [sink]\nurl = \"{}\"\n\n[engine]\nmax_batch_delay_ms = 20\n\n\
         [admin]\nlisten = \"127.0.0.1:{port}\"\n\n[[index]]\nname = \"{index}\"\ntable = \"items\"\n",
        env.pg.url("app"),
        env.os.url(),
    );
    let cfg = env.write_config(&text);
    let log = env.dir.path().join("ferry.log");

    // systemd's side of Type=notify: a datagram socket ferry reports to.
    let notify_path = env.dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify.set_nonblocking(true).expect("nonblocking");
    let notify_name = notify_path.to_str().expect("utf-8 path").to_string();
    let mut ferry = Ferry::start(
        &cfg,
        &log,
        &[
            ("NOTIFY_SOCKET", notify_name.as_str()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );

    // Ready once backfilled and streaming; 503 (never anything else) before.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match get(port, "/readyz").await {
            Ok((200, _, body)) => {
                assert_eq!(body, "ready\n");
                break;
            }
            Ok((503, _, body)) => assert!(body.starts_with("not ready: "), "{body}"),
            Ok((code, _, body)) => panic!("/readyz answered {code}: {body}"),
            Err(_) => {} // not listening yet
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never turned 200\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        env.log().contains(&format!("127.0.0.1:{port}")),
        "the admin address is logged\n{}",
        env.log_tail()
    );

    // Live changes: 25 inserts (one transaction of 20, five single ones),
    // 5 updates, 3 deletes.
    db.batch_execute(&format!(
        "INSERT INTO items SELECT g, '{ROW_SECRET}-' || g FROM generate_series(101, 120) g;"
    ))
    .await
    .expect("insert batch");
    for id in 121..126 {
        db.execute("INSERT INTO items VALUES ($1, 'single')", &[&(id as i64)])
            .await
            .expect("insert");
    }
    db.batch_execute(
        "UPDATE items SET name = 'renamed' WHERE id BETWEEN 1 AND 5;
         DELETE FROM items WHERE id IN (6, 7, 8);",
    )
    .await
    .expect("update and delete");
    env.assert_converges("items", "items", Duration::from_secs(60))
        .await;

    // /metrics: counters catch up with what was done (the flush that made
    // the documents visible may be counted a moment later).
    let series =
        |result: &str| format!("ferry_documents_total{{index=\"{index}\",result=\"{result}\"}}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let (head, metrics) = loop {
        let (code, head, body) = get(port, "/metrics").await.expect("metrics");
        assert_eq!(code, 200);
        let done = sample(&body, "ferry_changes_total{op=\"insert\"}").unwrap_or(0.0) >= 25.0
            && sample(&body, "ferry_changes_total{op=\"update\"}").unwrap_or(0.0) >= 5.0
            && sample(&body, "ferry_changes_total{op=\"delete\"}").unwrap_or(0.0) >= 3.0
            && sample(&body, &series("written")).unwrap_or(0.0) >= 30.0
            && sample(&body, &series("deleted")).unwrap_or(0.0) >= 3.0;
        if done {
            break (head, body);
        }
        assert!(
            Instant::now() < deadline,
            "metrics did not catch up:\n{body}\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    // One transaction for the insert batch, five single inserts, and one for
    // the update+delete query string (a simple query is one transaction).
    assert!(
        sample(&metrics, "ferry_transactions_total").unwrap_or(0.0) >= 7.0,
        "{metrics}"
    );
    assert!(sample(&metrics, "ferry_flush_duration_seconds_count").unwrap_or(0.0) >= 1.0);
    assert!(sample(&metrics, "ferry_confirmed_lsn").unwrap_or(0.0) > 0.0);
    assert_eq!(
        sample(
            &metrics,
            &format!("ferry_index_state{{index=\"{index}\",state=\"streaming\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            &format!("ferry_backfill_rows{{index=\"{index}\"}}")
        ),
        Some(40.0)
    );
    assert!(metrics.contains("# TYPE ferry_flush_duration_seconds histogram"));

    // /status.
    let (code, head, body) = get(port, "/status").await.expect("status");
    assert_eq!(code, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let status: Value = serde_json::from_str(&body).expect("status is JSON");
    assert_eq!(status["slot"], slot);
    assert_eq!(status["ready"], true);
    let ix = &status["indexes"][0];
    assert_eq!(ix["name"], index.as_str());
    assert_eq!(ix["state"], "streaming");
    assert!(
        ix["documents"]["written"].as_u64().unwrap_or(0) > 0,
        "{status:#}"
    );
    assert_eq!(ix["backfill"]["rows"], 40);
    for key in ["confirmed_lsn", "received_lsn"] {
        let lsn = status[key].as_str().unwrap_or_default();
        let ok = lsn.split_once('/').is_some_and(|(a, b)| {
            u32::from_str_radix(a, 16).is_ok() && u32::from_str_radix(b, 16).is_ok()
        });
        assert!(ok, "{key} = {lsn:?}");
    }
    assert!(status["lag"]["bytes"].is_u64(), "{status:#}");
    assert!(status["lag"]["seconds"].is_number(), "{status:#}");

    // No row values, connection strings or credentials on the endpoint.
    for page in [&metrics, &body] {
        assert!(!page.contains(ROW_SECRET), "row value leaked");
        assert!(!page.contains("postgres://"), "source URL leaked");
        assert!(!page.contains(env.os.url()), "sink URL leaked");
    }

    // `ferry status`.
    let url = format!("http://127.0.0.1:{port}");
    let (code, out, err) = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || ferry_once(&["status", "--url", &url, "--json"]))
            .await
            .expect("join")
    };
    assert_eq!(code, 0, "ferry status --json failed: {err}");
    let printed: Value = serde_json::from_str(&out).expect("ferry status --json prints JSON");
    assert_eq!(printed["slot"], slot);
    assert_eq!(printed["indexes"][0]["name"], index.as_str());
    // `ferry health` (the container healthcheck) probes /healthz.
    let (code, _, err) = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || ferry_once(&["health", "--url", &url]))
            .await
            .expect("join")
    };
    assert_eq!(code, 0, "ferry health failed: {err}");
    let (code, _, _) =
        tokio::task::spawn_blocking(|| ferry_once(&["health", "--url", "http://127.0.0.1:9"]))
            .await
            .expect("join");
    assert_ne!(code, 0, "ferry health fails when nothing answers");
    // `ferry health --config` probes the file's admin.listen (a non-default
    // port here); 0.0.0.0 is probed on loopback; a file naming an address
    // where nothing listens is unhealthy.
    let health = |cfg: std::path::PathBuf| async move {
        let out = tokio::process::Command::new(ferry_bin())
            .args(["health", "--config"])
            .arg(&cfg)
            .env_remove("FERRY_ADMIN__LISTEN")
            .env_remove("FERRY_CONFIG")
            .output()
            .await
            .expect("run ferry health");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = health(cfg.clone()).await;
    assert_eq!(code, Some(0), "ferry health --config failed: {err}");
    let any_addr = env.write_config(&text.replace(
        &format!("listen = \"127.0.0.1:{port}\""),
        &format!("listen = \"0.0.0.0:{port}\""),
    ));
    let (code, err) = health(any_addr).await;
    assert_eq!(code, Some(0), "0.0.0.0 is probed on loopback: {err}");
    let idle = ferry_testkit::free_port();
    let wrong = env.write_config(&text.replace(
        &format!("listen = \"127.0.0.1:{port}\""),
        &format!("listen = \"127.0.0.1:{idle}\""),
    ));
    let (code, err) = health(wrong).await;
    assert_eq!(code, Some(1), "nothing listens on {idle}: {err}");
    assert!(err.contains(&format!("127.0.0.1:{idle}")), "{err}");
    // With --config the address comes from the file (an inherited
    // FERRY_ADMIN__LISTEN would override it, so it is removed).
    let out = tokio::process::Command::new(ferry_bin())
        .args(["status", "--config"])
        .arg(&cfg)
        .env_remove("FERRY_ADMIN__LISTEN")
        .output()
        .await
        .expect("run ferry status");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ferry status --config failed: {err}");
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains(&index) && out.contains("streaming"), "{out}");

    // /healthz.
    let (code, _, body) = get(port, "/healthz").await.expect("healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    // A second ferry on the same admin address stops at once, naming the key.
    let mut second = Ferry::start(&cfg, &env.dir.path().join("second.log"), &[]);
    let code = second.wait_exit(Duration::from_secs(30));
    let second_log = std::fs::read_to_string(env.dir.path().join("second.log")).unwrap_or_default();
    assert!(
        matches!(code, Some(c) if c != 0),
        "second ferry exit {code:?}\n{second_log}"
    );
    assert!(second_log.contains("admin.listen"), "{second_log}");

    // A standby (the slot is held by the first ferry) tells systemd it is
    // ready, names the phase and keeps the watchdog fed.
    let standby_port = ferry_testkit::free_port();
    let standby_cfg = env.write_config(&text.replace(
        &format!("listen = \"127.0.0.1:{port}\""),
        &format!("listen = \"127.0.0.1:{standby_port}\""),
    ));
    let standby_path = env.dir.path().join("standby-notify.sock");
    let standby_notify = UnixDatagram::bind(&standby_path).expect("standby notify socket");
    standby_notify.set_nonblocking(true).expect("nonblocking");
    let mut standby = Ferry::start(
        &standby_cfg,
        &env.dir.path().join("standby.log"),
        &[
            ("NOTIFY_SOCKET", standby_path.to_str().expect("utf-8 path")),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let standby_seen = wait_for_notifications(&standby_notify, "STATUS=standby", 3).await;
    assert!(standby_seen[0].starts_with("READY=1\n"), "{standby_seen:?}");
    let (code, _, body) = get(standby_port, "/readyz").await.expect("standby readyz");
    assert_eq!(code, 503, "a standby is not ready to serve: {body}");
    let _ = standby.stop();

    // systemd: ready once, watchdog pings, then stopping on SIGTERM.
    let mut seen = Vec::new();
    drain(&notify, &mut seen);
    assert_eq!(ferry.stop(), Some(0), "ferry exits 0\n{}", env.log_tail());
    drain(&notify, &mut seen);
    let first = |prefix: &str| seen.iter().position(|m| m.starts_with(prefix));
    assert_eq!(
        seen.iter().filter(|m| m.starts_with("READY=1")).count(),
        1,
        "{seen:?}"
    );
    assert!(
        seen.iter().filter(|m| m.trim_end() == "WATCHDOG=1").count() >= 2,
        "{seen:?}"
    );
    assert!(first("READY=1") < first("STOPPING=1"), "{seen:?}");
    assert!(first("STOPPING=1").is_some(), "{seen:?}");
}

/// The bytes `ferry check`'s line for slot `name` says it retains.
fn reported_retention(stderr: &str, name: &str) -> Option<i64> {
    let line = stderr
        .lines()
        .find(|l| l.contains(&format!("\"{name}\"")) && l.contains("retains"))?;
    line.split("retains ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `ferry check` shows the operator what ferry's slot costs and which other
/// slots share the server: each with the WAL it retains
/// (`pg_current_wal_lsn() - restart_lsn`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_wal_every_slot_retains() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    // One statement each: a slot cannot be created in a transaction that wrote.
    for sql in [
        "CREATE TABLE docs (id int PRIMARY KEY, v text)",
        "SELECT pg_create_logical_replication_slot('ferry_test', 'pgoutput')",
        "SELECT pg_create_physical_replication_slot('some_standby', true)",
    ] {
        db.batch_execute(sql).await.expect(sql);
    }
    let start: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    // About 4 MB of WAL that neither slot has consumed.
    db.batch_execute(
        "INSERT INTO docs SELECT g, repeat('x', 200) FROM generate_series(1, 15000) g;",
    )
    .await
    .expect("write WAL");
    let generated: i64 = db
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::int8",
            &[&start],
        )
        .await
        .expect("diff")
        .get(0);
    assert!(generated > 1_000_000, "only {generated} bytes of WAL");
    let cfg = env.config("docs", "docs", "");
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        ferry_once(&["check", "--config", cfg.to_str().expect("utf8")])
    })
    .await
    .expect("join");
    assert_eq!(code, 0, "ferry check failed:\n{out}\n{err}");
    let ours = reported_retention(&err, "ferry_test");
    let other = reported_retention(&err, "some_standby");
    assert!(
        ours.is_some_and(|b| b >= generated) && err.contains("ferry's slot \"ferry_test\""),
        "ferry's slot line missing or below the {generated} bytes written since it was created:\n{err}"
    );
    assert!(
        other.is_some_and(|b| b >= generated)
            && err.contains("other slot on this server \"some_standby\""),
        "the other slot's line missing or below {generated} bytes:\n{err}"
    );
}
