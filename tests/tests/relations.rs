//! Relational documents: joins folded in and kept exact as any related row
//! changes. The oracle is an independent SQL query building the expected
//! documents with jsonb functions.

use std::time::Duration;

use ferry_e2e::TestEnv;

const CONVERGE: Duration = Duration::from_secs(90);

use ferry_testkit::relational::{self, EXPECTED, INDEX};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn related_rows_rebuild_exactly_the_documents_they_feed() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(&relational::schema(300))
        .await
        .expect("schema");
    let cfg = env.config("users", "users", INDEX);
    let ferry = env.run_ferry(&cfg);
    env.assert_converges_to("users", EXPECTED, CONVERGE).await;

    // ferry set REPLICA IDENTITY FULL where it needs old values.
    let full: Vec<String> = db
        .query(
            "SELECT relname::text FROM pg_class WHERE relreplident = 'f' ORDER BY 1",
            &[],
        )
        .await
        .expect("identities")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(full, ["line_items", "orders", "user_tags"], "{full:?}");

    let steps: [(&str, &str); 9] = [
        (
            "child rows: insert, update, delete (orders and nested line items)",
            "INSERT INTO orders VALUES (5000, 1, 12.34, 'new');
             INSERT INTO line_items VALUES (9000, 5000, 'fresh', 2);
             UPDATE orders SET total = total + 1 WHERE id IN (2, 5);
             UPDATE line_items SET qty = 99 WHERE id = 7;
             DELETE FROM line_items WHERE id = 8;
             DELETE FROM line_items WHERE order_id = 4; DELETE FROM orders WHERE id = 4;",
        ),
        (
            "a foreign key moves: both the old and the new parent are rebuilt",
            "UPDATE orders SET user_id = 3 WHERE id = 2;
             UPDATE line_items SET order_id = 10 WHERE id = 11;",
        ),
        (
            "a parent-side change rebuilds every root pointing at it",
            "UPDATE companies SET name = 'ACME renamed' WHERE id = 2;",
        ),
        (
            "many-to-many: join rows and the related table",
            "INSERT INTO user_tags VALUES (1, 1), (1, 2) ON CONFLICT DO NOTHING;
             DELETE FROM user_tags WHERE user_id = 6;
             UPDATE tags SET label = 'relabelled' WHERE id = 3;",
        ),
        (
            "filters: a related row leaving and joining the filter",
            "UPDATE orders SET status = 'cancelled' WHERE id = 1;
             UPDATE orders SET status = 'paid' WHERE id = 3;",
        ),
        (
            "soft delete: the root leaves the index, and comes back",
            "UPDATE users SET deleted_at = now() WHERE id IN (10, 11);
             UPDATE users SET deleted_at = now() WHERE id = 12;
             UPDATE users SET deleted_at = NULL WHERE id = 12;",
        ),
        (
            "root rows: update, insert, delete, belongs_to to null",
            "UPDATE users SET email = 'changed@example.com', company_id = NULL WHERE id = 20;
             INSERT INTO users VALUES (1000, 'new@example.com', 'Newcomer', 5, NULL);
             DELETE FROM user_tags WHERE user_id = 21; DELETE FROM line_items WHERE order_id IN (SELECT id FROM orders WHERE user_id = 21);
             DELETE FROM orders WHERE user_id = 21; DELETE FROM users WHERE id = 21;",
        ),
        (
            "one transaction touching many tables",
            "BEGIN;
             UPDATE companies SET name = name || '!' WHERE id = 3;
             INSERT INTO orders VALUES (5001, 30, 1, 'new');
             INSERT INTO line_items VALUES (9001, 5001, 'x', 1);
             UPDATE users SET name = 'In txn' WHERE id = 31;
             COMMIT;",
        ),
        (
            "TRUNCATE of a related table rebuilds every document",
            "TRUNCATE line_items;",
        ),
    ];
    for (i, (what, sql)) in steps.into_iter().enumerate() {
        db.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        env.assert_converges_to("users", EXPECTED, CONVERGE).await;
        if i == 2 {
            // Spot checks, independent of the oracle query.
            let docs = env.documents("users").await;
            let u1 = &docs["1"];
            assert_eq!(u1["company"]["name"], "ACME renamed", "{u1}");
            let orders = u1["orders"].as_array().expect("orders array");
            assert!(
                orders
                    .iter()
                    .any(|o| o["id"] == 5000 && o["items"][0]["sku"] == "fresh"),
                "{u1}"
            );
            assert_eq!(u1["full_name"], "User 1");
            assert!(u1.get("name").is_none());
        }
    }
    assert_eq!(ferry.stop(), Some(0));
}

/// Reads one counter from ferry's `/metrics` (HTTP/1.0 GET on loopback).
async fn metric(port: u16, name: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the admin endpoint");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .expect("request");
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("response");
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_1000_child_changes_costs_a_bounded_number_of_statements() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(&relational::schema(300))
        .await
        .expect("schema");
    let port = ferry_testkit::free_port();
    let cfg = env.config("users", "users", INDEX);
    let text = std::fs::read_to_string(&cfg).expect("read config");
    // A batch closes on max_batch_delay_ms even inside a transaction; at the
    // harness's 20 ms a loaded machine can cut the transaction into three or
    // more batches. Give the batch two seconds so the count measures the
    // statements per batch, not the machine's speed.
    let text = text.replace("max_batch_delay_ms = 20", "max_batch_delay_ms = 2000");
    let cfg = env.write_config(&format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n\n{text}"));
    let ferry = env.run_ferry(&cfg);
    env.assert_converges_to("users", EXPECTED, CONVERGE).await;
    let before = metric(port, "ferry_sql_statements_total").await;
    // 1,000 grandchild changes spread over many orders and users, one transaction.
    db.batch_execute("UPDATE line_items SET qty = qty + 1 WHERE id <= 1000")
        .await
        .expect("1000 changes");
    env.assert_converges_to("users", EXPECTED, CONVERGE).await;
    let after = metric(port, "ferry_sql_statements_total").await;
    let used = after - before;
    // One statement to find the affected users, one to build them, per
    // batch; the transaction may straddle two batches.
    assert!(
        (1.0..=4.0).contains(&used),
        "1,000 child changes took {used} statements"
    );
    assert_eq!(ferry.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_row_level_security_that_would_hide_rows() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE secrets (id int PRIMARY KEY, v text);
         ALTER TABLE secrets ENABLE ROW LEVEL SECURITY;
         CREATE ROLE reader LOGIN REPLICATION;
         GRANT SELECT ON secrets TO reader;
         CREATE PUBLICATION ferry_test FOR TABLE secrets;",
    )
    .await
    .expect("schema");
    let url = env.pg.url("app").replace("postgres@", "reader@");
    let cfg = env.write_config(&format!(
        "[source]\nurl = \"{url}\"\nslot = \"ferry_test\"\npublication = \"ferry_test\"\n\n[sink]\nurl = \"{}\"\n\n[[index]]\nname = \"{}\"\ntable = \"secrets\"\n",
        env.os.url(),
        env.index("secrets")
    ));
    let (code, out, err) =
        ferry_e2e::ferry_once(&["check", "--config", cfg.to_str().expect("utf8")]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        out.contains("row-level security") && out.contains("BYPASSRLS"),
        "{out}"
    );
    db.batch_execute("ALTER ROLE reader BYPASSRLS")
        .await
        .expect("grant");
    let (code, out, err) =
        ferry_e2e::ferry_once(&["check", "--config", cfg.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_per_relation_whose_foreign_key_has_no_index_with_the_statement_to_add_it() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    // PostgreSQL indexes no foreign key by itself: orders.user_id and
    // line_items.order_id have none; user_tags' primary key leads with
    // user_id and companies.id is a primary key.
    db.batch_execute(&relational::schema(300))
        .await
        .expect("schema");
    let cfg = env.config("users", "users", INDEX);
    let cfg = cfg.to_str().expect("utf8");
    let (code, out, err) = ferry_e2e::ferry_once(&["check", "--config", cfg]);
    assert_eq!(
        code, 0,
        "a missing index is advice, not a problem:\n{out}{err}"
    );
    let warnings: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("no index on the column"))
        .collect();
    let expect = [
        (
            "relation orders:",
            "CREATE INDEX CONCURRENTLY ON public.orders (user_id);",
        ),
        (
            "relation orders.items:",
            "CREATE INDEX CONCURRENTLY ON public.line_items (order_id);",
        ),
        (
            "relation order_count:",
            "CREATE INDEX CONCURRENTLY ON public.orders (user_id);",
        ),
    ];
    assert_eq!(warnings.len(), expect.len(), "{err}");
    for ((relation, statement), line) in expect.iter().zip(&warnings) {
        assert!(line.contains(relation), "{relation} in {line}");
        assert!(line.contains(statement), "{statement} in {line}");
    }
    // The statements as given (one at a time: CONCURRENTLY refuses a transaction block).
    for (_, statement) in &expect[..2] {
        db.batch_execute(statement).await.expect("create index");
    }
    let (code, out, err) = ferry_e2e::ferry_once(&["check", "--config", cfg]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!err.contains("no index on the column"), "{err}");
}
