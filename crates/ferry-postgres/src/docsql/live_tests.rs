//! The generated build and resolve statements against a real PostgreSQL on a
//! schema with no index on any foreign key: each related table is read at
//! most once per statement whatever the number of roots (measured with
//! `EXPLAIN (ANALYZE)`: the executions of every sequential scan), and the
//! documents keep each relation's `order_by`, `limit`, `where` and
//! `soft_delete`.

use std::collections::HashMap;

use ferry_core::plan::{sample_node as node, sample_shape as shape, CountNode, Link, Node};
use ferry_core::{Lsn, TypeKind};
use ferry_testkit::PgCluster;

use super::{build_chunk_sql, build_sql, resolve_sql};
use crate::CopyReader;
use serde_json::{json, Value};

/// users → orders (where, order_by, limit; item count) → line items (soft
/// delete); tags through user_tags; company (belongs_to); order count. No
/// foreign key has an index (user_tags' key leads with `tag_id`).
const DDL: &str = "
CREATE TABLE companies (id int PRIMARY KEY, name text);
CREATE TABLE users (id int PRIMARY KEY, email text, company_id int, deleted_at timestamptz);
CREATE TABLE orders (id int PRIMARY KEY, user_id int, total numeric(10,2), status text);
CREATE TABLE line_items (id int PRIMARY KEY, order_id int, sku text, removed boolean);
CREATE TABLE tags (id int PRIMARY KEY, label text);
CREATE TABLE user_tags (tag_id int, user_id int, PRIMARY KEY (tag_id, user_id));";

fn plan() -> Node {
    let mut items = node(
        "items",
        shape(
            "line_items",
            4,
            &[("id", TypeKind::Int32), ("sku", TypeKind::Text)],
        ),
        Link::HasMany {
            fk: "order_id".into(),
            references: "id".into(),
        },
    );
    items.soft_delete = Some(("removed".into(), true));
    let mut orders = node(
        "orders",
        shape(
            "orders",
            2,
            &[("id", TypeKind::Int32), ("total", TypeKind::Numeric)],
        ),
        Link::HasMany {
            fk: "user_id".into(),
            references: "id".into(),
        },
    );
    orders.filter = Some("status <> 'cancelled'".into());
    orders.order_by = Some("total desc, id".into());
    orders.limit = Some(2);
    orders.children.push(items);
    orders.counts.push(CountNode {
        field: "item_count".into(),
        table: "\"public\".\"line_items\"".into(),
        oid: 4,
        fk: "order_id".into(),
        references: "id".into(),
        filter: None,
    });
    let tags = node(
        "tags",
        shape(
            "tags",
            5,
            &[("id", TypeKind::Int32), ("label", TypeKind::Text)],
        ),
        Link::Through {
            join: "\"public\".\"user_tags\"".into(),
            join_oid: 6,
            fk: "user_id".into(),
            references: "id".into(),
            other_key: "tag_id".into(),
            target_ref: "id".into(),
        },
    );
    let company = node(
        "company",
        shape(
            "companies",
            3,
            &[("id", TypeKind::Int32), ("name", TypeKind::Text)],
        ),
        Link::BelongsTo {
            fk: "company_id".into(),
            references: "id".into(),
        },
    );
    let mut root = node(
        "",
        shape(
            "users",
            1,
            &[("id", TypeKind::Int32), ("email", TypeKind::Text)],
        ),
        Link::Root,
    );
    root.soft_delete = Some(("deleted_at".into(), false));
    root.children = vec![orders, tags, company];
    root.counts.push(CountNode {
        field: "order_count".into(),
        table: "\"public\".\"orders\"".into(),
        oid: 2,
        fk: "user_id".into(),
        references: "id".into(),
        filter: None,
    });
    root
}

async fn cluster() -> (PgCluster, tokio_postgres::Client) {
    let pg = tokio::task::spawn_blocking(PgCluster::start)
        .await
        .expect("join")
        .expect("start PostgreSQL");
    let client = pg.client("postgres").await.expect("connect");
    client.batch_execute(DDL).await.expect("schema");
    (pg, client)
}

/// The start of a statement, for failure messages.
fn short(sql: &str) -> &str {
    &sql[..sql.char_indices().nth(600).map_or(sql.len(), |(i, _)| i)]
}

/// The statement inside `COPY (…) TO STDOUT`.
fn query(copy: &str) -> &str {
    copy.strip_prefix("COPY (")
        .and_then(|s| s.strip_suffix(") TO STDOUT"))
        .expect("a COPY statement")
}

/// Per table: how many times a sequential scan of it ran (the sum of the
/// actual loops of every `Seq Scan` node naming it).
async fn seq_scan_runs(client: &tokio_postgres::Client, copy: &str) -> HashMap<String, u64> {
    let answer = client
        .simple_query(&format!("EXPLAIN (ANALYZE, FORMAT JSON) {}", query(copy)))
        .await
        .unwrap_or_else(|e| panic!("explain: {e}\n{copy}"));
    let text = answer
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a plan");
    let plan: Value = serde_json::from_str(&text).expect("plan json");
    fn walk(n: &Value, out: &mut HashMap<String, u64>) {
        if n["Node Type"] == "Seq Scan" {
            let rel = n["Relation Name"].as_str().unwrap_or("?").to_string();
            *out.entry(rel).or_default() += n["Actual Loops"].as_u64().unwrap_or(0);
        }
        for c in n["Plans"].as_array().into_iter().flatten() {
            walk(c, out);
        }
    }
    let mut out = HashMap::new();
    walk(&plan[0]["Plan"], &mut out);
    out
}

async fn documents(client: &tokio_postgres::Client, copy: &str, plan: &Node) -> Vec<Value> {
    let mut out = Vec::new();
    let mut malformed = 0;
    CopyReader::start(client, copy, "test build")
        .await
        .expect("build")
        .read_all(|row| match plan.document(|i| row.field(i), 0, Lsn(1)) {
            Some(w) => match w.op {
                ferry_core::DocOp::Index(b) => out.push(serde_json::from_slice(&b).expect("json")),
                ferry_core::DocOp::Delete => malformed += 1,
            },
            None => malformed += 1,
        })
        .await
        .expect("read");
    assert_eq!(malformed, 0, "{copy}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_related_table_is_scanned_at_most_once_per_statement_without_fk_indexes() {
    let (_pg, client) = cluster().await;
    client
        .batch_execute(
            "INSERT INTO companies SELECT g, 'c' || g FROM generate_series(1, 50) g;
             INSERT INTO users SELECT g, 'u' || g || '@x', g % 50 + 1, NULL FROM generate_series(1, 5000) g;
             INSERT INTO orders SELECT g, g % 5000 + 1, g % 97, CASE WHEN g % 5 = 0 THEN 'cancelled' ELSE 'paid' END
               FROM generate_series(1, 15000) g;
             INSERT INTO line_items SELECT g, g % 15000 + 1, 'sku' || g, g % 7 = 0 FROM generate_series(1, 45000) g;
             INSERT INTO tags SELECT g, 't' || g FROM generate_series(1, 20) g;
             INSERT INTO user_tags SELECT t, u FROM generate_series(1, 5000) u, generate_series(1, 20) t WHERE (u + t) % 7 = 0;
             ANALYZE;",
        )
        .await
        .expect("rows");
    let plan = plan();
    // How many times the plan reads each table (orders: the relation and a count).
    let mut uses: HashMap<String, u64> = HashMap::new();
    for (oid, _) in plan.usages() {
        let name = match oid {
            1 => "users",
            2 => "orders",
            3 => "companies",
            4 => "line_items",
            5 => "tags",
            _ => "user_tags",
        };
        *uses.entry(name.into()).or_default() += 1;
    }
    let keys: Vec<Vec<String>> = (1..=1000).map(|k| vec![(k * 3).to_string()]).collect();
    let statements = [
        ("build", build_sql(&plan, Some(&keys))),
        ("build every root", build_sql(&plan, None)),
        ("first chunk", build_chunk_sql(&plan, None, 1000)),
        (
            "later chunk",
            build_chunk_sql(&plan, Some(&["2500".into()]), 1000),
        ),
    ];
    for (what, sql) in &statements {
        let runs = seq_scan_runs(&client, sql).await;
        for (table, n) in &runs {
            let allowed = uses.get(table).copied().unwrap_or(0);
            assert!(
                *n <= allowed,
                "{what}: {table} sequentially scanned {n} times (the plan reads it {allowed} times): {runs:?}\n{}", short(sql)
            );
        }
    }
    // Resolve: a line item, a tag, a company and a user_tags row changing.
    let values: Vec<String> = (1..=1000).map(|v| (v * 7).to_string()).collect();
    for (oid, usage) in plan.usages() {
        let Some((_, probe)) = plan.probe(&usage) else {
            continue;
        };
        let Some(sql) = resolve_sql(&plan, &probe, &values) else {
            continue;
        };
        let runs = seq_scan_runs(&client, &sql).await;
        for (table, n) in &runs {
            assert!(
                *n <= 1,
                "resolving table {oid}: {table} sequentially scanned {n} times: {runs:?}\n{}",
                short(&sql)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_keep_order_limit_where_and_soft_delete_per_parent() {
    let (_pg, client) = cluster().await;
    client
        .batch_execute(
            "INSERT INTO companies VALUES (1, 'ACME');
             INSERT INTO users VALUES (1, 'a@x', 1, NULL), (2, 'b@x', 9, NULL), (3, 'gone@x', 1, now()), (4, 'd@x', NULL, NULL);
             -- user 1: three paid orders (two highest totals kept, ties by id), one cancelled.
             INSERT INTO orders VALUES (10, 1, 5.00, 'paid'), (11, 1, 9.00, 'paid'), (12, 1, 9.00, 'paid'),
                                       (13, 1, 99.00, 'cancelled'), (20, 2, 1.00, 'paid'), (30, 3, 1.00, 'paid');
             INSERT INTO line_items VALUES (100, 11, 'b', false), (101, 11, 'a', NULL), (102, 11, 'x', true),
                                           (103, 12, 'c', false), (104, 10, 'd', false), (200, 20, 'e', false);
             INSERT INTO tags VALUES (1, 'red'), (2, 'blue');
             INSERT INTO user_tags VALUES (2, 1), (1, 1), (1, 2);",
        )
        .await
        .expect("rows");
    let plan = plan();
    let keys: Vec<Vec<String>> = ["1", "2", "3", "4", "5"]
        .iter()
        .map(|k| vec![k.to_string()])
        .collect();
    let mut docs = documents(&client, &build_sql(&plan, Some(&keys)), &plan).await;
    docs.sort_by_key(|d| d["id"].as_i64());
    let expected = vec![
        json!({"id": 1, "email": "a@x",
               "orders": [
                   {"id": 11, "total": 9.00, "items": [{"id": 100, "sku": "b"}, {"id": 101, "sku": "a"}], "item_count": 3},
                   {"id": 12, "total": 9.00, "items": [{"id": 103, "sku": "c"}], "item_count": 1}],
               "tags": [{"id": 1, "label": "red"}, {"id": 2, "label": "blue"}],
               "company": {"id": 1, "name": "ACME"},
               "order_count": 4}),
        json!({"id": 2, "email": "b@x",
               "orders": [{"id": 20, "total": 1.00, "items": [{"id": 200, "sku": "e"}], "item_count": 1}],
               "tags": [{"id": 1, "label": "red"}],
               "company": null,
               "order_count": 1}),
        json!({"id": 4, "email": "d@x", "orders": [], "tags": [], "company": null, "order_count": 0}),
    ];
    assert_eq!(docs, expected);
    // Chunks: key order, resuming after a key, bounded.
    let first = documents(&client, &build_chunk_sql(&plan, None, 2), &plan).await;
    let ids: Vec<i64> = first.iter().filter_map(|d| d["id"].as_i64()).collect();
    assert_eq!(ids, [1, 2]);
    assert_eq!(first[0], expected[0]);
    let rest = documents(
        &client,
        &build_chunk_sql(&plan, Some(&["2".into()]), 2),
        &plan,
    )
    .await;
    let ids: Vec<i64> = rest.iter().filter_map(|d| d["id"].as_i64()).collect();
    assert_eq!(ids, [4]);
}
