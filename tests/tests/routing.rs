//! End-to-end: `routing = "column"` gives each document its row's value as
//! `_routing`, in a flat index (documents from the WAL tuple) and in one
//! built by query; a routing value change moves the document and leaves no
//! copy under the old routing; `verify` finds and repairs a copy stored
//! under a routing its row does not give; dropping the routing rebuilds the
//! index; `check` names a bad column.

use std::time::Duration;

use ferry_e2e::{ferry_once, wait_for, TestEnv};
use ferry_opensearch::Method;
use serde_json::{json, Value};

const SCHEMA: &str = "
CREATE TABLE docs (id bigint PRIMARY KEY, tenant text, body text);
CREATE TABLE notes (id bigint PRIMARY KEY, doc_id bigint, note text);
INSERT INTO docs SELECT g, 'seed' || (g % 3), 'doc ' || g FROM generate_series(1, 30) g;
INSERT INTO notes VALUES (100, 1, 'first'), (101, 2, 'second');";

const WAIT: Duration = Duration::from_secs(60);

/// Both indexes routed by `tenant` over four shards: `flat` takes the WAL
/// tuple, `built` folds in the notes (built by query).
fn extra(env: &TestEnv, routing: &str) -> String {
    let settings = "settings = { number_of_shards = 4, number_of_replicas = 0 }";
    format!(
        "routing = \"{routing}\"\n{settings}\n\n\
         [[index]]\nname = \"{}\"\ntable = \"docs\"\nrouting = \"{routing}\"\n{settings}\n\n\
         [[index.has_many]]\nfield = \"notes\"\ntable = \"notes\"\nforeign_key = \"doc_id\"\n",
        env.index("built")
    )
}

/// The `_routing` of every stored copy of document `id` (all shards).
async fn copies(env: &TestEnv, index: &str, id: &str) -> Vec<Option<String>> {
    let name = env.index(index);
    env.sink.refresh(&name).await.expect("refresh");
    let res = env
        .sink
        .json_request(
            Method::Post,
            &format!("/{name}/_search"),
            Some(json!({"query": {"ids": {"values": [id]}}, "size": 10})),
        )
        .await
        .expect("search");
    let mut out: Vec<Option<String>> = res["hits"]["hits"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|h| h["_routing"].as_str().map(str::to_string))
        .collect();
    out.sort();
    out
}

/// The shard a routing value selects in `index`.
async fn shard_of(env: &TestEnv, index: &str, routing: &str) -> i64 {
    let name = env.index(index);
    let res: Value = env
        .sink
        .json_request(
            Method::Get,
            &format!("/{name}/_search_shards?routing={routing}"),
            None,
        )
        .await
        .expect("search shards");
    res["shards"][0][0]["shard"].as_i64().expect("a shard")
}

/// Two routing values on different shards of `index`: a copy left under
/// the old one would be a second document, not overwritten.
async fn two_shards(env: &TestEnv, index: &str) -> (String, String) {
    let mut by_shard = std::collections::BTreeMap::new();
    for i in 0..64 {
        let t = format!("t{i}");
        by_shard.entry(shard_of(env, index, &t).await).or_insert(t);
    }
    assert!(by_shard.len() >= 2, "routing spreads over shards");
    let mut v = by_shard.into_values();
    (v.next().unwrap(), v.next().unwrap())
}

async fn wait_copies(env: &TestEnv, index: &str, id: &str, want: &[Option<&str>]) {
    let want: Vec<Option<String>> = want.iter().map(|r| r.map(str::to_string)).collect();
    wait_for(
        &format!("{index}/{id} stored only under {want:?}"),
        WAIT,
        async || copies(env, index, id).await == want,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routing_change_moves_the_document_and_verify_repairs_a_stray_copy() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(SCHEMA).await.expect("schema");
    let config = env.config("flat", "docs", &extra(&env, "tenant"));
    let cfg_s = config.to_str().expect("utf-8").to_string();
    let ferry = env.run_ferry(&config);
    for index in ["flat", "built"] {
        wait_for(&format!("{index} seeded"), WAIT, async || {
            env.count(index).await == 30
        })
        .await;
        // Seeding writes each document under its row's routing.
        assert_eq!(copies(&env, index, "4").await, [Some("seed1".into())]);
    }
    let (a, b) = two_shards(&env, "flat").await;
    db.batch_execute(&format!("UPDATE docs SET tenant = '{a}' WHERE id = 1"))
        .await
        .expect("move to a");
    for index in ["flat", "built"] {
        wait_copies(&env, index, "1", &[Some(&a)]).await;
    }
    // A move and a change of a related row in one transaction; a delete;
    // a NULL routing (routes by id).
    db.batch_execute(&format!(
        "BEGIN; UPDATE docs SET tenant = '{b}', body = 'moved' WHERE id = 1;
         UPDATE notes SET note = 'edited' WHERE id = 100; COMMIT;
         DELETE FROM docs WHERE id = 2;
         UPDATE docs SET tenant = NULL WHERE id = 3;
         UPDATE docs SET tenant = '' WHERE id = 5;"
    ))
    .await
    .expect("changes");
    for index in ["flat", "built"] {
        wait_copies(&env, index, "1", &[Some(&b)]).await;
        wait_copies(&env, index, "2", &[]).await;
        wait_copies(&env, index, "3", &[None]).await;
        // The cluster treats an empty routing as none.
        wait_copies(&env, index, "5", &[None]).await;
    }
    let built = env.documents("built").await;
    assert_eq!(built["1"]["body"], "moved");
    assert_eq!(built["1"]["notes"][0]["note"], "edited");
    // The routing column is outside the key: ferry made the table log
    // whole old rows, which is how it knows the old routing.
    let ident: String = db
        .query_one(
            "SELECT relreplident::text FROM pg_class WHERE oid = 'docs'::regclass",
            &[],
        )
        .await
        .expect("replica identity")
        .get(0);
    assert_eq!(ident, "f");

    let (code, out, err) = ferry_once(&["verify", "--config", &cfg_s]);
    assert_eq!(code, 0, "routed documents verify clean: {out}{err}");
    assert!(
        out.contains("checked 29, missing 0, different 0, extra 0"),
        "{out}"
    );

    // A stale copy under the old routing, written behind ferry's back.
    let name = env.index("flat");
    env.sink
        .json_request(
            Method::Put,
            &format!("/{name}/_doc/1?routing={a}"),
            Some(json!({"id": 1, "tenant": a, "body": "stale"})),
        )
        .await
        .expect("plant a stray copy");
    assert_eq!(copies(&env, "flat", "1").await.len(), 2);
    let (code, out, _) = ferry_once(&["verify", "--config", &cfg_s, "--index", &name]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("extra\t1"), "{out}");
    // A sample as large as the index sees the stray copy too.
    let (code, out, _) = ferry_once(&[
        "verify", "--config", &cfg_s, "--index", &name, "--sample", "1000",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("extra\t1"), "{out}");
    let (code, out, _) = ferry_once(&["verify", "--config", &cfg_s, "--repair"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("repaired 1, unrepairable 0"), "{out}");
    assert_eq!(copies(&env, "flat", "1").await, [Some(b.clone())]);
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());

    // Dropping the routing rebuilds the index beside the served one, which
    // gets no copies of new writes meanwhile (they would be placed by id
    // next to its routed documents), and the alias moves to the new one.
    let text =
        std::fs::read_to_string(&config)
            .expect("config")
            .replacen("routing = \"tenant\"\n", "", 1);
    let config = env.write_config(&text);
    let ferry = env.run_ferry(&config);
    wait_copies(&env, "flat", "1", &[None]).await;
    wait_for("the rebuilt index serves every row", WAIT, async || {
        env.count("flat").await == 29
    })
    .await;
    assert!(
        env.log().contains("the routing changed"),
        "{}",
        env.log_tail()
    );
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_a_routing_column_the_table_lacks_and_the_sql_for_old_rows() {
    let env = TestEnv::start().await;
    env.db().await.batch_execute(SCHEMA).await.expect("schema");
    let config = env.config("flat", "docs", "routing = \"tenant_id\"\n");
    let (code, out, err) = ferry_once(&["check", "--config", config.to_str().expect("utf-8")]);
    let err = format!("{out}{err}");
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("index[0].routing") && err.contains("\"tenant_id\""),
        "names the key and the column: {err}"
    );
    // Without leave to set it, the replica identity the old routing needs
    // is an error carrying the SQL to run.
    let text = std::fs::read_to_string(&config)
        .expect("config")
        .replace("tenant_id", "tenant")
        .replace("[sink]", "manage_replica_identity = false\n\n[sink]");
    let config = env.write_config(&text);
    let (code, out, err) = ferry_once(&["check", "--config", config.to_str().expect("utf-8")]);
    let err = format!("{out}{err}");
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("ALTER TABLE \"public\".\"docs\" REPLICA IDENTITY FULL"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routing_column_in_the_primary_key_needs_no_full_replica_identity() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE items (tenant text, id int, v text, PRIMARY KEY (tenant, id));
         INSERT INTO items VALUES ('a', 1, 'x'), ('a', 2, 'y');",
    )
    .await
    .expect("schema");
    let config = env.config(
        "items",
        "items",
        "routing = \"tenant\"\nsettings = { number_of_shards = 4, number_of_replicas = 0 }\n",
    );
    let ferry = env.run_ferry(&config);
    wait_for("items seeded", WAIT, async || env.count("items").await == 2).await;
    let (a, b) = two_shards(&env, "items").await;
    // Moving a row to another tenant changes its key: the old-key tuple
    // (replica identity DEFAULT) names the old routing.
    db.batch_execute(&format!(
        "UPDATE items SET tenant = '{a}' WHERE id = 1;
         UPDATE items SET tenant = '{b}' WHERE id = 1;
         DELETE FROM items WHERE id = 2;"
    ))
    .await
    .expect("moves");
    wait_copies(&env, "items", &format!("{b},1"), &[Some(&b)]).await;
    for gone in ["a,1", "a,2", &format!("{a},1")] {
        wait_copies(&env, "items", gone, &[]).await;
    }
    assert_eq!(env.count("items").await, 1);
    let ident: String = db
        .query_one(
            "SELECT relreplident::text FROM pg_class WHERE oid = 'items'::regclass",
            &[],
        )
        .await
        .expect("replica identity")
        .get(0);
    assert_eq!(ident, "d", "ferry left the replica identity alone");
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());
}
