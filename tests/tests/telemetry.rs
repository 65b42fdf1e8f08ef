//! End-to-end: `[telemetry] otlp_endpoint` makes the real `ferry` binary
//! export its pipeline spans over OTLP/HTTP. The collector here is a small
//! receiver in the test that decodes the protobuf requests exactly as a
//! collector does (`opentelemetry-proto`), so what is asserted is what a
//! tracing backend would show.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use ferry_e2e::TestEnv;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// Spans received, with the `service.name` of their resource.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// Starts the receiver on a free port: its base URL and what it got.
async fn collector() -> (String, Received) {
    let received: Received = Arc::default();
    let app = axum::Router::new()
        .route("/v1/traces", post(export))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the collector");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

async fn export(State(received): State<Received>, body: Bytes) -> Vec<u8> {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export request");
    let mut got = received.lock().unwrap();
    for rs in request.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| text(&r.attributes, "service.name"))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                got.push((service.clone(), span));
            }
        }
    }
    // An empty ExportTraceServiceResponse.
    Vec::new()
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Any> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn text(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key)? {
        Any::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attrs, key)? {
        Any::IntValue(i) => Some(*i),
        _ => None,
    }
}

/// A change of a related row gives one `batch` span carrying the commit
/// LSN and the counts, with `resolve`, `build` (naming the root table) and
/// `flush` children in the same trace, sent as the configured service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_exported_as_a_span_with_resolve_build_and_flush_children() {
    let (url, received) = collector().await;
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text);
         CREATE TABLE orders (id bigint PRIMARY KEY, user_id bigint REFERENCES users, total int);
         INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, 20) g;
         INSERT INTO orders SELECT g, 1 + g % 20, g FROM generate_series(1, 60) g;",
    )
    .await
    .expect("schema");
    let config = env.config(
        "users",
        "users",
        &format!(
            "\n[[index.has_many]]\nfield = \"orders\"\ntable = \"orders\"\nforeign_key = \"user_id\"\n\n\
             [telemetry]\notlp_endpoint = \"{url}\"\nservice_name = \"ferry-e2e\"\n"
        ),
    );
    let ferry = env.run_ferry(&config);
    let index = env.index("users");
    let seeded = tokio::time::timeout(Duration::from_secs(60), async {
        while env.count("users").await < 20 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    assert!(
        seeded.await.is_ok(),
        "not seeded within 60 s\n{}",
        env.log_tail()
    );
    db.batch_execute("UPDATE orders SET total = total + 1000 WHERE user_id = 7")
        .await
        .expect("update");
    let batch = {
        let find = || {
            received.lock().unwrap().iter().find_map(|(_, s)| {
                (s.name == "batch" && int(&s.attributes, "documents") == Some(1)).then(|| s.clone())
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(b) = find() {
                break b;
            }
            let got: Vec<String> = received
                .lock()
                .unwrap()
                .iter()
                .map(|(_, s)| format!("{} {:?}", s.name, s.attributes))
                .collect();
            assert!(
                std::time::Instant::now() < deadline,
                "no batch span of the update within 60 s; received {got:#?}\n{}",
                env.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let lsn = text(&batch.attributes, "lsn").expect("the batch carries its commit LSN");
    assert!(lsn.contains('/'), "an LSN like 0/16B3A80: {lsn}");
    assert_eq!(
        int(&batch.attributes, "changes"),
        Some(3),
        "three orders changed"
    );
    assert_eq!(int(&batch.attributes, "deletes"), Some(0));
    // The children end before the batch span, so they were exported with or before it.
    let spans = received.lock().unwrap().clone();
    let child = |name: &str| {
        spans
            .iter()
            .find(|(_, s)| s.name == name && s.parent_span_id == batch.span_id)
            .map(|(service, s)| {
                assert_eq!(s.trace_id, batch.trace_id, "{name} is in the batch's trace");
                assert_eq!(service, "ferry-e2e");
                s.clone()
            })
            .unwrap_or_else(|| {
                panic!(
                    "no {name} span under the batch span; got {:?}",
                    names(&spans)
                )
            })
    };
    let resolve = child("resolve");
    assert_eq!(
        int(&resolve.attributes, "roots"),
        Some(1),
        "the orders resolve to user 7"
    );
    let build = child("build");
    assert_eq!(
        text(&build.attributes, "table").as_deref(),
        Some("public.users")
    );
    assert_eq!(
        text(&build.attributes, "index").as_deref(),
        Some(index.as_str())
    );
    assert_eq!(int(&build.attributes, "documents"), Some(1));
    let flush = child("flush");
    assert_eq!(int(&flush.attributes, "documents"), Some(1));
    assert!(flush.end_time_unix_nano >= flush.start_time_unix_nano);
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());
}

fn names(spans: &[(String, Span)]) -> Vec<&str> {
    spans.iter().map(|(_, s)| s.name.as_str()).collect()
}
