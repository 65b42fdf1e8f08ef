//! `ferry preview`: the documents it prints are the ones a run writes, and
//! it needs neither the cluster nor anything created beforehand.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_e2e::{ferry_once, parse_bulk, TestEnv};
use ferry_opensearch::Method;
use ferry_testkit::relational::{self, EXPECTED, INDEX};
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(90);

/// The relational fixture with 30 users, user 7 soft-deleted.
fn schema() -> String {
    relational::schema(30) + "UPDATE users SET deleted_at = now() WHERE id = 7;"
}

/// A mapping without `"type": "object"`, which the cluster leaves out.
fn without_object_type(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        if o.get("type").and_then(Value::as_str) == Some("object") {
            o.remove("type");
        }
        for child in o.values_mut() {
            *child = without_object_type(child.take());
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previewed_documents_and_mapping_equal_what_a_run_writes() {
    let env = TestEnv::start().await;
    env.db()
        .await
        .batch_execute(&schema())
        .await
        .expect("schema");
    let cfg = env.config("users", "users", INDEX);
    let cfg_s = cfg.to_str().expect("utf8");
    let ferry = env.run_ferry(&cfg);
    env.assert_converges_to("users", EXPECTED, CONVERGE).await;
    assert_eq!(ferry.stop(), Some(0));

    let alias = env.index("users");
    let docs: BTreeMap<String, Value> = env.documents("users").await;
    let (code, out, err) = ferry_once(&[
        "preview", &alias, "-c", cfg_s, "--id", "3", "--id", "1", "--id", "7", "--id", "99999",
    ]);
    assert_eq!(code, 0, "{err}");
    let actions = parse_bulk(&out);
    let ids: Vec<&str> = actions.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["3", "1", "7", "99999"], "in the order asked: {out}");

    let aliases = env
        .sink
        .json_request(Method::Get, &format!("/_alias/{alias}"), None)
        .await
        .expect("alias");
    let concrete = aliases
        .as_object()
        .and_then(|o| o.keys().next().cloned())
        .expect("concrete index");
    for a in &actions {
        assert_eq!(
            a.index, concrete,
            "written to the concrete index the alias serves"
        );
        assert!(a.version > 0, "versioned by a WAL position");
    }
    for a in &actions[..2] {
        assert_eq!(a.op, "index");
        assert_eq!(
            a.source.as_ref(),
            docs.get(&a.id),
            "document {} as the run wrote it",
            a.id
        );
    }
    // A soft-deleted row and a missing one: the deletes a run would send.
    assert_eq!(
        (actions[2].op.as_str(), actions[3].op.as_str()),
        ("delete", "delete")
    );
    assert!(!docs.contains_key("7"));

    // The mapping ferry would create is the one the cluster holds.
    let (code, out, err) =
        ferry_once(&["preview", &alias, "-c", cfg_s, "--limit", "0", "--mapping"]);
    assert_eq!(code, 0, "{err}");
    let (head, body) = out.split_once('\n').expect("a PUT line");
    assert_eq!(head, format!("PUT /{concrete}"));
    let (create, rest) = body.split_once("\n\n").expect("blank line after the body");
    assert_eq!(rest, "POST /_bulk\n", "no rows asked for");
    let create: Value = serde_json::from_str(create).expect("index body is JSON");
    let held = env
        .sink
        .json_request(Method::Get, &format!("/{concrete}/_mapping"), None)
        .await
        .expect("mapping");
    // The cluster stores `"type": "object"` as the default it is, unwritten.
    assert_eq!(
        without_object_type(create["mappings"]["properties"].clone()),
        held[&concrete]["mappings"]["properties"],
        "previewed mapping equals the created one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_needs_no_cluster_and_creates_nothing() {
    let env = TestEnv::start().await;
    env.db()
        .await
        .batch_execute(&schema())
        .await
        .expect("schema");
    // A sink nobody listens on: preview must not need it.
    let text = std::fs::read_to_string(env.config("users", "users", INDEX)).expect("config");
    let offline = text.replace(env.os.url(), "http://127.0.0.1:9");
    assert_ne!(offline, text);
    let cfg = env.write_config(&offline);
    let (code, out, err) = ferry_once(&[
        "preview",
        &env.index("users"),
        "-c",
        cfg.to_str().expect("utf8"),
        "--limit",
        "4",
    ]);
    assert_eq!(code, 0, "{err}");
    let actions = parse_bulk(&out);
    let ids: Vec<&str> = actions.iter().map(|a| a.id.as_str()).collect();
    // Key order, the soft-deleted row 7 is not among the first rows.
    assert_eq!(ids, ["1", "2", "3", "4"], "{out}");
    let expected =
        ferry_e2e::expected_json(&env.db().await, &format!("{EXPECTED} AND u.id <= 4")).await;
    for a in &actions {
        assert_eq!(a.op, "index");
        let want = expected.get(&a.id).expect("expected document");
        let got = a.source.as_ref().expect("source");
        assert!(
            ferry_e2e::compare(
                &BTreeMap::from([(a.id.clone(), want.clone())]),
                &BTreeMap::from([(a.id.clone(), got.clone())])
            )
            .is_empty(),
            "{} differs: {got} vs {want}",
            a.id
        );
    }
    // Nothing was created: no slot, no publication.
    let db = env.db().await;
    let slots: i64 = db
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .expect("slots")
        .get(0);
    let pubs: i64 = db
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .expect("pubs")
        .get(0);
    assert_eq!((slots, pubs), (0, 0), "preview is read-only");
}
