//! `ferry plan`: per index what applying a configuration will do (nothing,
//! rebuild in the background, create and seed, leave unmaintained), plus
//! publication and replica-identity changes, exit code 0 / 2, and nothing
//! changed by asking.

use std::time::Duration;

use ferry_e2e::{ferry_once, TestEnv};

const CONVERGE: Duration = Duration::from_secs(120);

fn config(env: &TestEnv, indexes: &str) -> String {
    format!(
        "[source]\nurl = \"{}\"\nslot = \"ferry_test\"\npublication = \"ferry_test\"\n\n[sink]\nurl = \"{}\"\n\n[engine]\nmax_batch_delay_ms = 20\n\n{indexes}",
        env.pg.url("app"),
        env.os.url(),
    )
}

fn plan(cfg: &std::path::Path) -> (i32, String) {
    let (code, out, err) = ferry_once(&["plan", "--config", cfg.to_str().expect("utf8")]);
    (code, format!("{out}\n--- stderr:\n{err}"))
}

/// What ferry may have changed: aliases, the publication, replica identities, the slot.
async fn footprint(env: &TestEnv, db: &tokio_postgres::Client, aliases: &[&str]) -> String {
    let mut out = String::new();
    for a in aliases {
        out.push_str(&format!(
            "{a} -> {:?}\n",
            env.sink.alias_targets(&env.index(a)).await.expect("alias")
        ));
    }
    let row = db
        .query_one(
            "SELECT (SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_publication_tables WHERE pubname = 'ferry_test'), \
                    (SELECT string_agg(relname::text || '=' || relreplident::text, ',' ORDER BY relname) FROM pg_class WHERE relname IN ('a', 'b', 'c', 'd')), \
                    (SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'ferry_test')",
            &[],
        )
        .await
        .expect("catalog");
    let tables: Option<String> = row.get(0);
    let idents: Option<String> = row.get(1);
    let slots: i64 = row.get(2);
    out.push_str(&format!(
        "publication {tables:?}; identities {idents:?}; slots {slots}"
    ));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_names_each_kind_of_change_exits_2_for_changes_0_for_none_and_changes_nothing() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE a (id int PRIMARY KEY, v text, w int);
         INSERT INTO a SELECT g, 'v' || g, g FROM generate_series(1, 200) g;
         CREATE TABLE b (id int PRIMARY KEY, v text);
         INSERT INTO b SELECT g, 'b' || g FROM generate_series(1, 50) g;
         CREATE TABLE c (id int PRIMARY KEY, v text);
         CREATE TABLE d (id int PRIMARY KEY, c_id int, v text);",
    )
    .await
    .expect("schema");
    let (a, b, c) = (env.index("a"), env.index("b"), env.index("c"));
    let all = ["a", "b", "c"];
    let v1 = env.write_config(&config(
        &env,
        &format!(
            "[[index]]\nname = \"{a}\"\ntable = \"a\"\ncolumns = [\"id\", \"v\"]\n\n[[index]]\nname = \"{b}\"\ntable = \"b\"\n"
        ),
    ));

    // Nothing exists yet: both indexes are created, the publication too.
    let before = footprint(&env, &db, &all).await;
    let (code, out) = plan(&v1);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!("index {a}: create and seed {a}-")),
        "{out}"
    );
    assert!(
        out.contains(&format!("index {b}: create and seed {b}-")),
        "{out}"
    );
    assert!(
        out.contains("publication: ferry does this itself (source.manage_publication = true)")
            && out.contains("CREATE PUBLICATION"),
        "{out}"
    );
    assert_eq!(
        footprint(&env, &db, &all).await,
        before,
        "plan changed something"
    );

    // Applied and seeded: nothing to do, exit 0.
    let ferry = env.run_ferry(&v1);
    env.assert_converges_to(
        "a",
        "SELECT id::text, jsonb_build_object('id', id, 'v', v)::text FROM a",
        CONVERGE,
    )
    .await;
    env.assert_converges("b", "b", CONVERGE).await;
    let (code, out) = plan(&v1);
    let served_a = env.sink.alias_targets(&a).await.expect("alias")[0].clone();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("index {a}: nothing to do (serves {served_a})")),
        "{out}"
    );
    assert!(out.contains(&format!("index {b}: nothing to do")), "{out}");
    assert!(out.contains("plan: applying"), "{out}");
    assert_eq!(ferry.stop(), Some(0));

    // A new column for a, b dropped from the configuration, c created with
    // a relation whose old rows ferry needs (REPLICA IDENTITY FULL on d).
    let v2 = env.write_config(&config(
        &env,
        &format!(
            "[[index]]\nname = \"{a}\"\ntable = \"a\"\ncolumns = [\"id\", \"v\", \"w\"]\n\n\
             [[index]]\nname = \"{c}\"\ntable = \"c\"\n\n[[index.has_many]]\nfield = \"ds\"\ntable = \"d\"\nforeign_key = \"c_id\"\n"
        ),
    ));
    let before = footprint(&env, &db, &all).await;
    let (code, out) = plan(&v2);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!("index {a}: rebuild in the background into {a}-"))
            && out.contains("(fields added: w)")
            && out.contains(&format!("searches use {served_a} until")),
        "{out}"
    );
    assert!(
        out.contains(&format!("index {c}: create and seed {c}-")),
        "{out}"
    );
    assert!(
        out.contains(&format!("index {b}: left unmaintained: {b}-")),
        "{out}"
    );
    assert!(
        out.contains("publication: ferry does this itself") && out.contains("ALTER PUBLICATION"),
        "{out}"
    );
    assert!(
        out.contains(
            "replica identity: ferry does this itself (source.manage_replica_identity = true)"
        ) && out.contains("REPLICA IDENTITY FULL"),
        "{out}"
    );
    assert_eq!(
        footprint(&env, &db, &all).await,
        before,
        "plan changed something"
    );

    // Only the row selection differs: still a background rebuild, said so.
    let v3 = env.write_config(&config(
        &env,
        &format!(
            "[[index]]\nname = \"{a}\"\ntable = \"a\"\ncolumns = [\"id\", \"v\"]\nwhere = \"id > 10\"\n\n[[index]]\nname = \"{b}\"\ntable = \"b\"\n"
        ),
    ));
    let (code, out) = plan(&v3);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!("index {a}: rebuild in the background"))
            && out.contains("the row selection (where, soft_delete, order_by, limit) changed"),
        "{out}"
    );
    assert!(out.contains(&format!("index {b}: nothing to do")), "{out}");
    assert!(!out.contains("publication:"), "{out}");
}
