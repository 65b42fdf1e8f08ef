//! End-to-end: the admin endpoint of the real `ferry` binary (health,
//! readiness, Prometheus metrics, status JSON), `ferry status`, systemd
//! notifications and a taken admin port.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_e2e::{ferry_bin, ferry_once, get, sample, TestEnv};
use serde_json::Value;

/// A value that must never show up on the admin endpoint.
const ROW_SECRET: &str = "row-secret-7f3a";

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

    // Ready means streaming; the copy may still be running beside the
    // stream. Let it finish first, so it copies exactly the 40 rows.
    let deadline = Instant::now() + Duration::from_secs(60);
    let streaming = format!("ferry_index_state{{index=\"{index}\",state=\"streaming\"}}");
    loop {
        if let Ok((200, _, body)) = get(port, "/metrics").await {
            if sample(&body, &streaming) == Some(1.0) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the index never finished seeding\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

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

/// PostgreSQL, the test search engine, a fault proxy in front of it, and
/// an admin port.
struct ProxiedRig {
    env: TestEnv,
    proxy: ferry_testkit::FaultProxy,
    port: u16,
}

impl ProxiedRig {
    /// Starts everything and runs `schema` on database `app`; returns a client on it.
    async fn start(schema: &str) -> (ProxiedRig, tokio_postgres::Client) {
        let env = TestEnv::start().await;
        let proxy = ferry_testkit::FaultProxy::start(env.os.url())
            .await
            .expect("start the fault proxy");
        let db = env.db().await;
        db.batch_execute(schema).await.expect("schema");
        let rig = ProxiedRig {
            env,
            proxy,
            port: ferry_testkit::free_port(),
        };
        (rig, db)
    }

    /// A fake systemd notify socket in the test directory: the socket and
    /// the `NOTIFY_SOCKET` value naming it.
    fn notify_socket(&self) -> (UnixDatagram, String) {
        let path = self.env.dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("notify socket");
        sock.set_nonblocking(true).expect("nonblocking");
        (sock, path.to_str().expect("utf-8 path").to_string())
    }

    /// A config with one index over `table`, writing through the proxy;
    /// `sections` are extra lines for `[sink]`, `[engine]` and `[admin]`.
    fn config(&self, slot: &str, table: &str, sink: &str, engine: &str, admin: &str) -> PathBuf {
        let text = format!(
            "[source]\nurl = \"{}\"\nslot = \"{slot}\"\npublication = \"ferry_admin\"\n\n\
             [sink]\nurl = \"{}\"\n{sink}\n\n[engine]\nmax_batch_delay_ms = 20\n{engine}\n\n\
             [admin]\nlisten = \"127.0.0.1:{}\"\n{admin}\n\n\
             [[index]]\nname = \"{}\"\ntable = \"{table}\"\n",
            self.env.pg.url("app"),
            self.proxy.url(),
            self.port,
            self.env.index(table),
        );
        self.env.write_config(&text)
    }

    fn log(&self) -> PathBuf {
        self.env.dir.path().join("ferry.log")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// Waits until `path` answers `code` (the body), at most `within`.
    async fn wait_for(&self, path: &str, code: u16, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Ok((c, _, body)) = get(self.port, path).await {
                if c == code {
                    return body;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{path} did not answer {code} within {within:?}\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn metrics(&self) -> String {
        let (code, _, body) = get(self.port, "/metrics").await.expect("metrics");
        assert_eq!(code, 200);
        body
    }
}

use std::path::PathBuf;

/// The cluster going away turns `/readyz` not-ready within seconds (even
/// with nothing to write: ferry probes it), and ready again once it is
/// back; the change made meanwhile lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_within_seconds_while_the_cluster_is_down_and_recovers() {
    let (rig, db) = ProxiedRig::start(
        "CREATE TABLE items (id bigint PRIMARY KEY, name text);
         INSERT INTO items SELECT g, 'n' || g FROM generate_series(1, 10) g;",
    )
    .await;
    let cfg = rig.config("ferry_down_up", "items", "request_timeout_secs = 5", "", "");
    let _ferry = Ferry::start(&cfg, &rig.log(), &[]);
    rig.wait_for("/readyz", 200, Duration::from_secs(120)).await;
    // Seeded and idle: nothing is left to write, so only a probe can tell.
    rig.env
        .assert_converges("items", "items", Duration::from_secs(60))
        .await;
    let streaming = format!(
        "ferry_index_state{{index=\"{}\",state=\"streaming\"}}",
        rig.env.index("items")
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while sample(&rig.metrics().await, &streaming) != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "never seeded\n{}",
            rig.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let requests = rig.proxy.requests();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Every request to the cluster is dropped unanswered.
    rig.proxy.set_path_filter("");
    rig.proxy
        .set(ferry_testkit::Fault::DropConnection { times: None });
    let down = Instant::now();
    let body = rig.wait_for("/readyz", 503, Duration::from_secs(30)).await;
    let took = down.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "/readyz turned 503 after {took:?}"
    );
    assert!(body.contains("search cluster is unreachable"), "{body}");
    assert!(rig.proxy.requests() > requests, "ferry asked the cluster");
    let metrics = rig.metrics().await;
    assert_eq!(sample(&metrics, "ferry_sink_up"), Some(0.0), "{metrics}");
    assert_eq!(sample(&metrics, "ferry_ready"), Some(0.0), "{metrics}");
    // Alive all along: an outage is not a wedge (within stall_timeout_secs).
    let (code, _, _) = get(rig.port, "/healthz").await.expect("healthz");
    assert_eq!(code, 200);
    db.execute("INSERT INTO items VALUES (11, 'during the outage')", &[])
        .await
        .expect("insert");

    rig.proxy.clear();
    let back = Instant::now();
    rig.wait_for("/readyz", 200, Duration::from_secs(60)).await;
    assert!(
        back.elapsed() < Duration::from_secs(20),
        "ready again {:?} after the cluster came back",
        back.elapsed()
    );
    rig.env
        .assert_converges("items", "items", Duration::from_secs(60))
        .await;
    assert_eq!(sample(&rig.metrics().await, "ferry_ready"), Some(1.0));
}

/// Each metric moves under the condition it reports: an index reads
/// `seeding` (not `streaming`) while its slow backfill runs beside the
/// stream, then `streaming`; the capture queue fills while bulk requests
/// are slow; a 503 is counted as a 5xx bulk request and a retry; changes
/// are counted per table; batch sizes land in the histogram.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_seeding_queue_depth_and_5xx_bulks_as_they_happen() {
    let (rig, db) = ProxiedRig::start(
        "CREATE TABLE items (id bigint PRIMARY KEY, name text);
         INSERT INTO items SELECT g, 'n' || g FROM generate_series(1, 600) g;",
    )
    .await;
    let index = rig.env.index("items");
    // 30 backfill requests of 20 rows, each held 250 ms by the proxy.
    rig.proxy
        .set(ferry_testkit::Fault::Delay(Duration::from_millis(250)));
    // Streaming batches of 50 changes, one bulk request at a time: under
    // the load below the worker waits for the cluster while changes keep
    // arriving, however fast the machine.
    let cfg = rig.config(
        "ferry_metrics",
        "items",
        "",
        "backfill_batch_rows = 20\nmax_batch_changes = 50\nmax_in_flight_bulks = 1",
        "",
    );
    let _ferry = Ferry::start(&cfg, &rig.log(), &[]);

    let state = |m: &str, st: &str| {
        sample(
            m,
            &format!("ferry_index_state{{index=\"{index}\",state=\"{st}\"}}"),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seeding_while_streaming = false;
    loop {
        if let Ok((200, _, m)) = get(rig.port, "/metrics").await {
            if state(&m, "seeding") == Some(1.0) && sample(&m, "ferry_streaming") == Some(1.0) {
                assert_eq!(
                    state(&m, "streaming"),
                    Some(0.0),
                    "one state at a time\n{m}"
                );
                seeding_while_streaming = true;
            }
            if state(&m, "streaming") == Some(1.0) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "never streaming\n{}",
            rig.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seeding_while_streaming,
        "the index never read `seeding` during its backfill\n{}",
        rig.log_text()
    );

    // Load while every bulk request takes 250 ms: 2,000 one-row
    // transactions over at least 2 s.
    let load = tokio::spawn({
        let db = rig.env.db().await;
        async move {
            db.batch_execute(
                "DO $$ BEGIN FOR i IN 1001..3000 LOOP \
                 INSERT INTO items VALUES (i, 'load'); COMMIT; PERFORM pg_sleep(0.001); END LOOP; END $$",
            )
            .await
            .expect("load")
        }
    });
    let mut deepest = 0.0f64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while deepest == 0.0 && Instant::now() < deadline {
        if let Ok((200, _, m)) = get(rig.port, "/metrics").await {
            deepest = deepest.max(sample(&m, "ferry_queue_depth").unwrap_or(0.0));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    load.await.expect("load task");
    assert!(
        deepest > 0.0,
        "the queue never held an event under load\n{}\n{}",
        rig.log_text(),
        rig.metrics().await
    );
    rig.proxy.clear();
    rig.env
        .assert_converges("items", "items", Duration::from_secs(120))
        .await;

    // Two 503s, then the cluster answers.
    let before = rig.metrics().await;
    let injected = rig.proxy.injected();
    let fivexx = |m: &str| sample(m, "ferry_bulk_requests_total{class=\"5xx\"}").unwrap_or(0.0);
    let retries = |m: &str| sample(m, "ferry_retries_total").unwrap_or(0.0);
    rig.proxy.set(ferry_testkit::Fault::Status {
        status: 503,
        times: Some(2),
    });
    db.execute("INSERT INTO items VALUES (5000, 'after 503s')", &[])
        .await
        .expect("insert");
    rig.env
        .assert_converges("items", "items", Duration::from_secs(60))
        .await;
    assert_eq!(
        rig.proxy.injected() - injected,
        2,
        "two bulk requests answered 503"
    );
    let after = rig.metrics().await;
    assert_eq!(fivexx(&after) - fivexx(&before), 2.0, "{after}");
    assert_eq!(retries(&after) - retries(&before), 2.0, "{after}");
    assert!(
        sample(
            &after,
            "ferry_table_changes_total{table=\"public.items\",op=\"insert\"}"
        )
        .unwrap_or(0.0)
            >= 2001.0,
        "{after}"
    );
    assert!(
        sample(&after, "ferry_flush_batch_documents_bucket{le=\"+Inf\"}").unwrap_or(0.0) > 0.0,
        "{after}"
    );
    assert_eq!(sample(&after, "ferry_ready"), Some(1.0), "{after}");
}

/// Writes the cluster already holds in a newer version are counted as
/// superseded: a second slot, created before three updates of one row,
/// replays them one batch each; two are older than the document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superseded_writes_are_counted_when_older_changes_are_replayed() {
    let (rig, db) = ProxiedRig::start(
        "CREATE TABLE r (id int PRIMARY KEY, v text);
         INSERT INTO r SELECT g, 'v' || g FROM generate_series(1, 3) g;",
    )
    .await;
    let index = rig.env.index("r");
    let first = rig.config("ferry_first", "r", "", "", "");
    let mut ferry = Ferry::start(&first, &rig.log(), &[]);
    rig.wait_for("/readyz", 200, Duration::from_secs(120)).await;
    // A slot that will replay everything from here on.
    db.batch_execute("SELECT pg_create_logical_replication_slot('ferry_replay', 'pgoutput')")
        .await
        .expect("second slot");
    for v in ["a", "b", "c"] {
        db.execute("UPDATE r SET v = $1 WHERE id = 1", &[&v])
            .await
            .expect("update");
    }
    rig.env
        .assert_converges("r", "r", Duration::from_secs(60))
        .await;
    assert_eq!(ferry.stop(), Some(0), "{}", rig.log_text());

    let replay = rig.config("ferry_replay", "r", "", "max_batch_changes = 1", "");
    let _replay = Ferry::start(&replay, &rig.log(), &[]);
    let result = |m: &str, r: &str| {
        sample(
            m,
            &format!("ferry_documents_total{{index=\"{index}\",result=\"{r}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let m = loop {
        if let Ok((200, _, m)) = get(rig.port, "/metrics").await {
            if result(&m, "written") + result(&m, "superseded") >= 3.0 {
                break m;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the replay never landed\n{}",
            rig.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m = get(rig.port, "/metrics").await.map(|r| r.2).unwrap_or(m);
    assert_eq!(result(&m, "superseded"), 2.0, "{m}");
    assert_eq!(
        result(&m, "written"),
        1.0,
        "the newest replayed write is equal, not older\n{m}"
    );
    rig.env
        .assert_converges("r", "r", Duration::from_secs(10))
        .await;
}

/// Every metric name a query of the Grafana dashboard uses (besides
/// Prometheus' own `up`) is served at `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_grafana_dashboard_queries_is_served() {
    let (rig, _db) = ProxiedRig::start(
        "CREATE TABLE items (id bigint PRIMARY KEY, name text); INSERT INTO items VALUES (1, 'a');",
    )
    .await;
    let cfg = rig.config("ferry_grafana", "items", "", "", "");
    let _ferry = Ferry::start(&cfg, &rig.log(), &[]);
    rig.wait_for("/readyz", 200, Duration::from_secs(120)).await;
    let served = rig.metrics().await;
    // Families (from # TYPE) and sample names.
    let mut names = std::collections::BTreeSet::new();
    for line in served.lines() {
        let name = match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split(' ').next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        };
        names.extend(name.map(str::to_string));
    }

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/ferry-dashboard.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 20, "too few queries found: {exprs:?}");
    let mut queried = std::collections::BTreeSet::new();
    for e in &exprs {
        let mut word = String::new();
        for c in e.chars().chain([' ']) {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                word.push(c);
            } else {
                if word.starts_with("ferry_") {
                    queried.insert(std::mem::take(&mut word));
                }
                word.clear();
            }
        }
    }
    let missing: Vec<&String> = queried.iter().filter(|n| !names.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, not served:\n{served}"
    );
    for must in [
        "ferry_ready",
        "ferry_standby",
        "ferry_confirmed_lsn",
        "ferry_sql_statements_total",
    ] {
        assert!(queried.contains(must), "no panel queries {must}");
    }
}

/// Every `expr` string in a Grafana dashboard, however deep.
fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The systemd watchdog follows the pipeline: an idle pipeline keeps
/// pinging past the stall limit; a pipeline holding a change the cluster
/// never answers stops pinging (and `/healthz` fails) once the limit
/// passes; pings resume when the change lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_pipeline_stops_the_watchdog_pings_and_an_idle_one_keeps_them() {
    let (rig, db) = ProxiedRig::start(
        "CREATE TABLE items (id bigint PRIMARY KEY, name text); INSERT INTO items VALUES (1, 'a');",
    )
    .await;
    let cfg = rig.config(
        "ferry_wedge",
        "items",
        "request_timeout_secs = 12",
        "",
        "stall_timeout_secs = 3",
    );
    let (notify, notify_name) = rig.notify_socket();
    let _ferry = Ferry::start(
        &cfg,
        &rig.log(),
        &[
            ("NOTIFY_SOCKET", notify_name.as_str()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    rig.wait_for("/readyz", 200, Duration::from_secs(120)).await;
    let pings = |m: &[String]| m.iter().filter(|m| m.trim_end() == "WATCHDOG=1").count();
    let mut seen = Vec::new();

    // Idle for longer than the stall limit: pings every 0.5 s go on.
    drain(&notify, &mut seen);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut idle = Vec::new();
    drain(&notify, &mut idle);
    assert!(
        pings(&idle) >= 7,
        "an idle pipeline keeps pinging: {idle:?}"
    );
    let (code, _, _) = get(rig.port, "/healthz").await.expect("healthz");
    assert_eq!(code, 200);

    // A change whose bulk request the cluster never answers.
    rig.proxy.set(ferry_testkit::Fault::Blackhole);
    db.execute("INSERT INTO items VALUES (2, 'wedged')", &[])
        .await
        .expect("insert");
    let body = rig.wait_for("/healthz", 503, Duration::from_secs(10)).await;
    assert!(body.contains("stalled"), "{body}");
    drain(&notify, &mut seen);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut wedged = Vec::new();
    drain(&notify, &mut wedged);
    assert_eq!(
        pings(&wedged),
        0,
        "a wedged pipeline must not feed the watchdog: {wedged:?}"
    );
    assert!(rig.proxy.injected() >= 1, "the bulk request was held");

    // The held request times out, the retry lands: progress, pings again.
    rig.proxy.clear();
    rig.env
        .assert_converges("items", "items", Duration::from_secs(60))
        .await;
    rig.wait_for("/healthz", 200, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut again = Vec::new();
    drain(&notify, &mut again);
    assert!(pings(&again) >= 2, "pings resume with progress: {again:?}");
}

/// After a wait (here: PostgreSQL down), systemd's `STATUS=` does not keep
/// the wait's reason through the next start: while ferry prepares again
/// (held 2 s by a slow cluster), it reads `starting`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_starting_again_after_retrying_once_postgres_is_back() {
    let (rig, db) = ProxiedRig::start(
        "CREATE TABLE items (id bigint PRIMARY KEY, name text); INSERT INTO items VALUES (1, 'a');",
    )
    .await;
    drop(db);
    // `GET /` (ferry's version check while it prepares) takes 2 s.
    rig.proxy.set_path_filter("/");
    rig.proxy
        .set(ferry_testkit::Fault::Delay(Duration::from_secs(2)));
    let cfg = rig.config("ferry_status", "items", "", "", "");
    let pg = &rig.env.pg;
    pg.stop().expect("stop PostgreSQL");
    let (notify, notify_name) = rig.notify_socket();
    let mut ferry = Ferry::start(
        &cfg,
        &rig.log(),
        &[
            ("NOTIFY_SOCKET", notify_name.as_str()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let mut seen = wait_for_notifications(&notify, "STATUS=retrying: ", 2).await;
    pg.restart().expect("start PostgreSQL again");
    let deadline = Instant::now() + Duration::from_secs(60);
    let phases = loop {
        drain(&notify, &mut seen);
        let phases: Vec<&String> = seen.iter().filter(|m| m.contains("STATUS=")).collect();
        if phases
            .iter()
            .any(|m| m.contains("STATUS=streaming") || m.contains("STATUS=seeding"))
        {
            break phases;
        }
        assert!(
            Instant::now() < deadline,
            "never streaming: {seen:?}\n{}",
            rig.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let running = phases
        .iter()
        .position(|m| m.contains("STATUS=streaming") || m.contains("STATUS=seeding"))
        .expect("a running phase");
    assert!(
        phases[running - 1].contains("STATUS=starting"),
        "the phase before streaming must be `starting`, not the last wait's reason: {phases:?}"
    );
    assert_eq!(ferry.stop(), Some(0), "{}", rig.log_text());
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
