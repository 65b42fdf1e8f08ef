//! End-to-end: `[[index.computed]]` fields (an SQL expression over the
//! block's own table, at the root and in a relation) are in the documents
//! and the mapping, follow the columns they are computed from, and a bad
//! expression is refused by `check` naming its key.

use std::time::Duration;

use ferry_e2e::{ferry_once, TestEnv};
use serde_json::{json, Value};

const SCHEMA: &str = "
CREATE TABLE people (id bigint PRIMARY KEY, first_name text, last_name text, email text);
CREATE TABLE orders (id bigint PRIMARY KEY, person_id bigint, price numeric, qty int);
INSERT INTO people VALUES (1, 'Ada', 'Lovelace', 'ada@example.com'), (2, 'Alan', 'Turing', NULL);
INSERT INTO orders VALUES (10, 1, 2.50, 4), (11, 1, 1.25, 2), (12, 2, 3.00, 1);";

/// PostgreSQL with [`SCHEMA`] and the test search engine.
async fn start() -> (TestEnv, tokio_postgres::Client) {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(SCHEMA).await.expect("schema");
    (env, db)
}

fn relations(root_sql: &str) -> String {
    format!(
        "columns = [\"id\", \"email\"]\n\n\
         [[index.computed]]\nfield = \"full_name\"\nsql = \"{root_sql}\"\ntype = \"keyword\"\n\n\
         [[index.has_many]]\nfield = \"orders\"\ntable = \"orders\"\nforeign_key = \"person_id\"\n\
         columns = [\"id\"]\norder_by = \"id\"\n\n\
         [[index.has_many.computed]]\nfield = \"amount\"\nsql = \"price * qty\"\n"
    )
}

/// One document's computed values: id, full_name, [(order id, amount)].
type Fields = (String, Value, Vec<(i64, f64)>);

/// The documents of `people`, as their computed values.
async fn computed_fields(env: &TestEnv) -> Vec<Fields> {
    env.documents("people")
        .await
        .into_iter()
        .map(|(id, doc)| {
            let orders = doc["orders"]
                .as_array()
                .map(|os| {
                    os.iter()
                        .map(|o| (o["id"].as_i64().unwrap_or(-1), number(&o["amount"])))
                        .collect()
                })
                .unwrap_or_default();
            (id, doc["full_name"].clone(), orders)
        })
        .collect()
}

/// A numeric field's value, whether rendered as a JSON number or string.
fn number(v: &Value) -> f64 {
    v.as_f64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(f64::NAN)
}

async fn wait_for_fields(env: &TestEnv, want: &[Fields]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = computed_fields(env).await;
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "computed fields did not converge: got {got:?}, want {want:?}\n{}",
            env.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn computed_fields_follow_their_columns_at_the_root_and_in_relations() {
    let (env, db) = start().await;
    let config = env.config(
        "people",
        "people",
        &relations("first_name || ' ' || last_name"),
    );
    let ferry = env.run_ferry(&config);
    let row = |id: &str, name: &str, orders: &[(i64, f64)]| {
        (id.to_string(), json!(name), orders.to_vec())
    };
    wait_for_fields(
        &env,
        &[
            row("1", "Ada Lovelace", &[(10, 10.0), (11, 2.5)]),
            row("2", "Alan Turing", &[(12, 3.0)]),
        ],
    )
    .await;
    let props = env.mapping_properties("people").await;
    assert_eq!(
        props["full_name"]["type"], "keyword",
        "the configured type: {props}"
    );
    assert!(
        props["orders"]["properties"]["amount"].is_object(),
        "the relation's computed field is mapped: {props}"
    );
    let docs = env.documents("people").await;
    assert!(
        docs["1"].get("first_name").is_none(),
        "only the listed columns and the computed field: {}",
        docs["1"]
    );
    // Changes of the columns an expression reads move the field, at the
    // root and in the relation.
    db.batch_execute(
        "UPDATE people SET first_name = 'Augusta Ada' WHERE id = 1;
         UPDATE orders SET qty = 10 WHERE id = 12;
         INSERT INTO orders VALUES (13, 2, 0.5, 3);",
    )
    .await
    .expect("updates");
    wait_for_fields(
        &env,
        &[
            row("1", "Augusta Ada Lovelace", &[(10, 10.0), (11, 2.5)]),
            row("2", "Alan Turing", &[(12, 30.0), (13, 1.5)]),
        ],
    )
    .await;
    assert_eq!(ferry.stop(), Some(0), "{}", env.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_a_computed_field_its_table_cannot_evaluate() {
    let (env, _db) = start().await;
    let config = env.config(
        "people",
        "people",
        &relations("first_name || ' ' || surname"),
    );
    let (code, out, err) = ferry_once(&["check", "--config", config.to_str().expect("utf-8")]);
    let err = format!("{out}{err}");
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("index[0].computed[0].sql") && err.contains("surname"),
        "names the key and what PostgreSQL said: {err}"
    );
    for (sql, refused) in [
        ("count(*)", "aggregate"),
        ("rank() OVER (ORDER BY id)", "window"),
        ("unnest(ARRAY[first_name, last_name])", "set-returning"),
    ] {
        let config = env.config("people", "people", &relations(sql));
        let (code, out, err) = ferry_once(&["check", "--config", config.to_str().expect("utf-8")]);
        let err = format!("{out}{err}");
        assert_ne!(code, 0, "{sql}: {err}");
        assert!(
            err.contains("index[0].computed[0].sql") && err.contains(refused),
            "{sql} is refused as not one value per row: {err}"
        );
    }
    let config = env.config(
        "people",
        "people",
        &relations("first_name").replace("full_name", "email"),
    );
    let (code, out, err) = ferry_once(&["check", "--config", config.to_str().expect("utf-8")]);
    let err = format!("{out}{err}");
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("index[0].computed[0].field") && err.contains("\"email\""),
        "a computed field may not shadow a column: {err}"
    );
}
