//! FastSink over a real socket, with a tiny blocking HTTP/1.1 client.

use super::*;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream as StdStream;

/// A tiny blocking HTTP/1.1 client over one connection.
struct Client {
    reader: BufReader<StdStream>,
}

impl Client {
    fn connect(sink: &FastSink) -> Client {
        let addr = sink.url().trim_start_matches("http://");
        let stream = StdStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Client {
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, method: &str, path: &str, body: &str) {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        self.reader
            .get_mut()
            .write_all(req.as_bytes())
            .expect("write");
    }

    fn send_raw(&mut self, raw: &str) {
        self.reader
            .get_mut()
            .write_all(raw.as_bytes())
            .expect("write");
    }

    /// Reads one response: status, headers (lowercased names), body.
    fn read(&mut self, head_only: bool) -> (u16, Vec<(String, String)>, String) {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut headers = Vec::new();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h).expect("header");
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').expect("header colon");
            let (k, v) = (k.to_ascii_lowercase(), v.trim().to_owned());
            if k == "content-length" {
                len = v.parse().expect("length");
            }
            headers.push((k, v));
        }
        let mut body = vec![0u8; if head_only { 0 } else { len }];
        self.reader.read_exact(&mut body).expect("body");
        (status, headers, String::from_utf8(body).expect("utf8"))
    }

    fn call(&mut self, method: &str, path: &str, body: &str) -> (u16, Value) {
        self.send(method, path, body);
        let (status, _, text) = self.read(method == "HEAD");
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
        };
        (status, v)
    }
}

fn statuses(resp: &Value) -> Vec<u64> {
    resp["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| {
            let (_, v) = item.as_object().expect("obj").iter().next().expect("one");
            v["status"].as_u64().expect("status")
        })
        .collect()
}

#[test]
fn bulk_applies_external_gte_versions() {
    let sink = FastSink::start().expect("start");
    let mut c = Client::connect(&sink);
    let (s, _) = c.call(
        "PUT",
        "/idx-1",
        r#"{"mappings":{"properties":{"a":{"type":"long"}}}}"#,
    );
    assert_eq!(s, 200);
    let line = |op: &str, id: &str, v: u64| {
        format!(
            r#"{{"{op}":{{"_index":"idx-1","_id":"{id}","version":{v},"version_type":"external_gte"}}}}"#
        )
    };
    let mut body = String::new();
    for (op, id, v, src) in [
        ("index", "1", 10, Some(r#"{"a":1}"#)),
        ("index", "2", 10, Some(r#"{"a":2}"#)),
        ("index", "1", 5, Some(r#"{"a":"old"}"#)), // lower: 409
        ("index", "1", 10, Some(r#"{"a":11}"#)),   // equal: applied
        ("delete", "2", 9, None),                  // lower: 409
        ("delete", "2", 11, None),                 // deleted
        ("delete", "3", 1, None),                  // missing: 404
        ("index", "2", 10, Some(r#"{"a":"zombie"}"#)), // below the tombstone: 409
        ("index", "3", 2, Some(r#"{"a":3}"#)),     // above the tombstone: created
    ] {
        body.push_str(&line(op, id, v));
        body.push('\n');
        if let Some(src) = src {
            body.push_str(src);
            body.push('\n');
        }
    }
    let (s, resp) = c.call("POST", "/_bulk", &body);
    assert_eq!(s, 200, "{resp}");
    assert_eq!(resp["errors"], json!(true));
    assert_eq!(
        statuses(&resp),
        vec![201, 201, 409, 200, 409, 200, 404, 409, 201]
    );
    assert_eq!(
        resp["items"][2]["index"]["error"]["type"],
        json!("version_conflict_engine_exception")
    );
    assert_eq!(resp["items"][6]["delete"]["result"], json!("not_found"));
    assert_eq!(resp["items"][3]["index"]["result"], json!("updated"));

    assert_eq!(sink.doc_count("idx-1"), 2);
    assert_eq!(sink.ids("idx-1"), vec!["1".to_string(), "3".to_string()]);
    assert_eq!(sink.get("idx-1", "1"), Some((10, br#"{"a":11}"#.to_vec())));
    assert_eq!(sink.get("idx-1", "2"), None);
    assert!(
        sink.last_write("idx-1", "2").is_some(),
        "tombstone keeps its arrival"
    );

    let st = sink.stats();
    assert_eq!(st.bulk_requests, 1);
    assert_eq!(st.bulk_items, 9);
    assert_eq!(st.bulk_conflicts, 3);
    assert_eq!(st.bulk_errors, 0);

    // All good: errors is false, and _doc reads the raw source back.
    let ok = format!("{}\n{{\"a\":4}}\n", line("index", "4", 20));
    let (_, resp) = c.call("POST", "/_bulk", &ok);
    assert_eq!(resp["errors"], json!(false));
    let (s, doc) = c.call("GET", "/idx-1/_doc/4", "");
    assert_eq!(s, 200);
    assert_eq!(doc["_source"], json!({"a": 4}));
    assert_eq!(doc["_version"], json!(20));
}

#[test]
fn bulk_rejects_bad_input_clearly() {
    let sink = FastSink::start().expect("start");
    let mut c = Client::connect(&sink);
    let (s, v) = c.call(
        "POST",
        "/_bulk",
        "{\"index\":{\"_index\":\"a\",\"_id\":\"1\"}}\n{}",
    );
    assert_eq!(s, 400, "missing final newline: {v}");
    let (s, _) = c.call("POST", "/_bulk", "{\"frobnicate\":{}}\n");
    assert_eq!(s, 400);
    let (s, _) = c.call(
        "POST",
        "/_bulk",
        "{\"index\":{\"_index\":\"a\",\"_id\":\"1\"}}\n",
    );
    assert_eq!(s, 400, "index without a source line");
    // Per-item failures: broken source, missing index, delete on a missing index.
    let body = "{\"index\":{\"_index\":\"a\",\"_id\":\"1\"}}\n{\"x\":\n\
                {\"index\":{\"_id\":\"2\"}}\n{}\n\
                {\"delete\":{\"_index\":\"nope\",\"_id\":\"3\"}}\n\
                {\"index\":{\"_index\":\"a\",\"_id\":\"q\\\"1\"}}\n{\"ok\":true}\n";
    let (s, v) = c.call("POST", "/_bulk", body);
    assert_eq!(s, 200);
    assert_eq!(statuses(&v), vec![400, 400, 404, 201]);
    assert_eq!(
        v["items"][3]["index"]["_id"],
        json!("q\"1"),
        "escaped ids round-trip"
    );
    assert_eq!(sink.stats().bulk_errors, 3);
    assert_eq!(sink.doc_count("a"), 1, "index auto-created");
}

#[test]
fn aliases_resolve_for_reads_and_writes() {
    let sink = FastSink::start().expect("start");
    let mut c = Client::connect(&sink);
    let (s, v) = c.call("GET", "/_alias/docs", "");
    assert_eq!(s, 404, "{v}");
    let (s, _) = c.call("HEAD", "/docs", "");
    assert_eq!(s, 404);
    c.call(
        "PUT",
        "/docs-aaaa",
        r#"{"mappings":{"_meta":{"ferry":{"hash":"aaaa"}},"properties":{}}}"#,
    );
    let (s, _) = c.call(
        "POST",
        "/_aliases",
        r#"{"actions":[{"add":{"index":"docs-aaaa","alias":"docs"}}]}"#,
    );
    assert_eq!(s, 200);
    let (s, v) = c.call("GET", "/_alias/docs", "");
    assert_eq!(s, 200);
    assert_eq!(v, json!({"docs-aaaa": {"aliases": {"docs": {}}}}));
    assert_eq!(c.call("HEAD", "/docs", "").0, 200);
    assert_eq!(c.call("HEAD", "/docs-aaaa", "").0, 200);

    // Writes through the alias land in the concrete index.
    let body = "{\"index\":{\"_index\":\"docs\",\"_id\":\"7\",\"version\":3,\"version_type\":\"external_gte\"}}\n{\"n\":7}\n";
    let (_, v) = c.call("POST", "/_bulk", body);
    assert_eq!(v["items"][0]["index"]["_index"], json!("docs-aaaa"));
    assert_eq!(sink.doc_count("docs"), 1);
    assert_eq!(sink.doc_count("docs-aaaa"), 1);
    assert_eq!(sink.resolve("docs"), vec!["docs-aaaa".to_string()]);
    assert_eq!(sink.get("docs", "7"), Some((3, b"{\"n\":7}".to_vec())));

    // _meta is replaced by PUT _mapping, properties are merged.
    let (s, _) = c.call(
        "PUT",
        "/docs-aaaa/_mapping",
        r#"{"_meta":{"ferry":{"hash":"aaaa","seeded_lsn":"0/10"}},"properties":{"n":{"type":"long"}}}"#,
    );
    assert_eq!(s, 200);
    let (_, m) = c.call("GET", "/docs/_mapping", "");
    assert_eq!(
        m["docs-aaaa"]["mappings"]["_meta"]["ferry"]["seeded_lsn"],
        json!("0/10")
    );
    assert_eq!(
        m["docs-aaaa"]["mappings"]["properties"]["n"]["type"],
        json!("long")
    );
    assert_eq!(c.call("POST", "/docs/_refresh", "").0, 200);
    assert_eq!(c.call("GET", "/docs/_count", "").1["count"], json!(1));

    // Moving the alias is atomic; deleting the old index leaves the alias on the new one.
    c.call("PUT", "/docs-bbbb", "{}");
    let (s, _) = c.call(
        "POST",
        "/_aliases",
        r#"{"actions":[{"add":{"index":"docs-bbbb","alias":"docs"}},{"remove":{"index":"docs-aaaa","alias":"docs"}}]}"#,
    );
    assert_eq!(s, 200);
    assert_eq!(sink.resolve("docs"), vec!["docs-bbbb".to_string()]);
    assert_eq!(sink.doc_count("docs"), 0);
    assert_eq!(
        c.call("DELETE", "/docs", "").0,
        400,
        "deleting through an alias is refused"
    );
    assert_eq!(c.call("DELETE", "/docs-aaaa", "").0, 200);
    assert_eq!(c.call("DELETE", "/docs-aaaa", "").0, 404);
    assert_eq!(sink.indices(), vec!["docs-bbbb".to_string()]);

    // delete_by_query empties the index, leaving tombstones behind.
    let body = "{\"index\":{\"_index\":\"docs\",\"_id\":\"1\"}}\n{}\n{\"index\":{\"_index\":\"docs\",\"_id\":\"2\"}}\n{}\n";
    c.call("POST", "/_bulk", body);
    assert_eq!(sink.doc_count("docs"), 2);
    let (s, v) = c.call(
        "POST",
        "/docs-bbbb/_delete_by_query?conflicts=proceed&refresh=true",
        r#"{"query":{"match_all":{}}}"#,
    );
    assert_eq!(s, 200);
    assert_eq!(v["deleted"], json!(2));
    assert_eq!(sink.doc_count("docs"), 0);
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let sink = FastSink::start().expect("start");
    let mut c = Client::connect(&sink);
    let (s, v) = c.call("GET", "/", "");
    assert_eq!(s, 200);
    assert_eq!(v["version"]["distribution"], json!("opensearch"));
    assert_eq!(v["version"]["number"], json!(VERSION_NUMBER));
    let (s, _) = c.call("PUT", "/one", "{}");
    assert_eq!(s, 200);
    // Two pipelined requests in one write are answered in order.
    c.send_raw("HEAD /one HTTP/1.1\r\nhost: x\r\n\r\nGET /_alias/none HTTP/1.1\r\nhost: x\r\n\r\n");
    assert_eq!(c.read(true).0, 200);
    assert_eq!(c.read(false).0, 404);
    assert_eq!(sink.stats().requests, 4);

    // `Connection: close` is honoured.
    c.send_raw("GET / HTTP/1.1\r\nconnection: close\r\n\r\n");
    let (s, headers, _) = c.read(false);
    assert_eq!(s, 200);
    assert!(headers
        .iter()
        .any(|(k, v)| k == "connection" && v == "close"));
    let mut rest = Vec::new();
    let n = c.reader.read_to_end(&mut rest).expect("eof");
    assert_eq!(n, 0, "connection closed after the response");
}

#[test]
fn chunked_and_malformed_requests_get_clear_errors() {
    let sink = FastSink::start().expect("start");
    let mut c = Client::connect(&sink);
    c.send_raw("POST /_bulk HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    let (s, _, body) = c.read(false);
    assert_eq!(s, 411);
    assert!(body.contains("Content-Length"), "{body}");

    let mut c = Client::connect(&sink);
    c.send_raw("NONSENSE\r\n\r\n");
    let (s, _, _) = c.read(false);
    assert_eq!(s, 400);

    let mut c = Client::connect(&sink);
    let (s, v) = c.call("GET", "/idx/_search", "{}");
    assert_eq!(s, 400);
    assert!(
        v["error"].as_str().unwrap_or("").contains("no handler"),
        "{v}"
    );
}

#[test]
fn subscribers_and_waiters_see_every_write() {
    let sink = FastSink::start().expect("start");
    let rx = sink.subscribe();
    let mut c = Client::connect(&sink);
    let body = "{\"index\":{\"_index\":\"w\",\"_id\":\"a\",\"version\":2,\"version_type\":\"external_gte\"}}\n{}\n\
                {\"delete\":{\"_index\":\"w\",\"_id\":\"b\",\"version\":2,\"version_type\":\"external_gte\"}}\n";
    let before = Instant::now();
    c.call("POST", "/_bulk", body);
    assert!(sink.wait_for_doc("w", "a", Duration::from_secs(5)));
    assert!(sink.wait_for_count("w", 1, Duration::from_secs(5)));
    assert!(!sink.wait_for_count("w", 2, Duration::from_millis(20)));
    let arrival = rx.recv_timeout(Duration::from_secs(5)).expect("arrival");
    assert!(arrival.received >= before);
    let got: Vec<(&str, u64, ItemOutcome)> = arrival
        .items
        .iter()
        .map(|i| (i.id.as_str(), i.version, i.outcome))
        .collect();
    assert_eq!(
        got,
        vec![
            ("a", 2, ItemOutcome::Created),
            ("b", 2, ItemOutcome::NotFound)
        ]
    );
    assert_eq!(&*arrival.items[0].index, "w");
    drop(rx);
    // With the receiver gone, the next bulk unsubscribes it quietly.
    c.call("POST", "/_bulk", body);
    assert!(!sink.shared.has_subscribers.load(Ordering::Acquire));
}

#[test]
fn helpers() {
    assert!(glob("docs-*", "docs-1"));
    assert!(!glob("docs-*", "doc"));
    assert!(glob("*", "x"));
    assert!(glob("a*c*e", "abcde"));
    assert_eq!(percent_decode("a%2Cb"), "a,b");
    assert_eq!(percent_decode("100%"), "100%");
    let mut out = Vec::new();
    push_json_str(&mut out, "a\"b\\c\n\u{1}");
    assert_eq!(out, br#""a\"b\\c\n\u0001""#.to_vec());
}
