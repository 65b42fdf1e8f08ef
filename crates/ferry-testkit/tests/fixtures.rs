//! Exercises the fixtures against real PostgreSQL and osmem-server binaries.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use ferry_testkit::{Osmem, PgCluster, PgOptions, TestSink};

/// Minimal HTTP/1.0 GET returning (status code, body).
fn http_get(base_url: &str, path: &str) -> (u16, String) {
    let authority = base_url
        .strip_prefix("http://")
        .expect("test helper only speaks plain http");
    let mut stream = TcpStream::connect(authority).expect("connect to HTTP server");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set read timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("response has a header/body separator");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status line has a numeric code");
    (status, body.to_owned())
}

async fn show(cluster: &PgCluster, db: &str, setting: &str) -> String {
    let client = cluster.client(db).await.expect("connect");
    let row = client
        .query_one(&format!("SHOW {setting}"), &[])
        .await
        .expect("SHOW");
    row.get(0)
}

#[tokio::test]
async fn pg_cluster_lifecycle() {
    let cluster = PgCluster::start().expect("start PostgreSQL");
    assert!(cluster.is_running());
    assert!(cluster.data_dir().join("PG_VERSION").exists());
    assert!(cluster.log_path().exists());
    assert_eq!(
        cluster.url("postgres"),
        format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port())
    );

    assert_eq!(show(&cluster, "postgres", "wal_level").await, "logical");
    assert_eq!(
        show(&cluster, "postgres", "max_replication_slots").await,
        "10"
    );
    assert_eq!(show(&cluster, "postgres", "fsync").await, "off");

    cluster
        .create_database("Ferry Test")
        .await
        .expect("create database");
    let client = cluster
        .client("Ferry Test")
        .await
        .expect("connect to new db");
    client
        .batch_execute("CREATE TABLE t (id int primary key); INSERT INTO t VALUES (1);")
        .await
        .expect("create table");
    drop(client);

    let port = cluster.port();
    cluster.restart().expect("restart");
    assert_eq!(cluster.port(), port);
    let client = cluster
        .client("Ferry Test")
        .await
        .expect("reconnect after restart");
    let n: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1);
    drop(client);

    cluster.stop().expect("stop");
    assert!(!cluster.is_running());
    assert!(cluster.client("postgres").await.is_err());
    cluster.restart().expect("start again after stop");
    assert_eq!(show(&cluster, "postgres", "wal_level").await, "logical");
}

#[tokio::test]
async fn pg_options_are_applied() {
    let cluster = PgCluster::start_with(PgOptions {
        wal_level: "replica".into(),
        extra_conf: vec!["max_replication_slots = 4".into()],
    })
    .expect("start PostgreSQL");
    assert_eq!(show(&cluster, "postgres", "wal_level").await, "replica");
    assert_eq!(
        show(&cluster, "postgres", "max_replication_slots").await,
        "4"
    );
}

#[test]
fn replication_connection_is_allowed() {
    // tokio-postgres 0.7 has no `replication` option, so use psql for this.
    let cluster = PgCluster::start().expect("start PostgreSQL");
    let conninfo = format!(
        "host={} port={} user=postgres dbname=postgres replication=database",
        cluster.host(),
        cluster.port()
    );
    let out = std::process::Command::new(cluster.bin_dir().join("psql"))
        .args(["-X", "-A", "-t", "-d", &conninfo, "-c", "IDENTIFY_SYSTEM"])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.is_empty());
}

#[test]
fn pg_cluster_is_cleaned_up_when_a_test_panics() {
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let cluster = PgCluster::start().expect("start PostgreSQL");
        tx.send((cluster.data_dir().to_path_buf(), cluster.port()))
            .expect("send");
        panic!("deliberate panic to test cleanup on unwind");
    })
    .join();
    assert!(outcome.is_err(), "the thread should have panicked");
    let (data_dir, port) = rx.recv().expect("cluster details");
    assert!(!data_dir.exists(), "{} still exists", data_dir.display());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "PostgreSQL still listening on {port}"
    );
}

#[test]
fn osmem_serves_http() {
    let osmem = Osmem::start().expect("start osmem-server");
    let url = osmem.url().to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let (status, body) = http_get(&url, "/");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("cluster_name"), "{body}");

    drop(osmem);
    let authority = url.trim_start_matches("http://");
    assert!(
        TcpStream::connect(authority).is_err(),
        "osmem-server still listening after drop"
    );
}

#[test]
fn test_sinks_have_distinct_prefixes() {
    let a = TestSink::start().expect("sink a");
    let b = TestSink::start().expect("sink b");
    assert_ne!(a.index_prefix(), b.index_prefix());
    assert_eq!(a.index_name("docs"), format!("{}docs", a.index_prefix()));
    for sink in [&a, &b] {
        let (status, body) = http_get(sink.url(), "/");
        assert_eq!(status, 200, "{body}");
    }
}
