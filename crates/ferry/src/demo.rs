//! `ferry demo`: the real pipeline on a throwaway PostgreSQL and a local
//! osmem-server, with sample data, a few live changes and a search.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ferry_config::Config;
use ferry_opensearch::{Method, Sink};
use ferry_throwaway::{Osmem, PgCluster};
use serde_json::{json, Value};

const SCHEMA: &str = "
CREATE TYPE plan AS ENUM ('free', 'pro', 'enterprise');
CREATE TABLE users (
    id          bigint PRIMARY KEY,
    email       text NOT NULL,
    name        text NOT NULL,
    plan        plan NOT NULL DEFAULT 'free',
    balance     numeric(12,2) NOT NULL DEFAULT 0,
    active      boolean NOT NULL DEFAULT true,
    tags        text[] NOT NULL DEFAULT '{}',
    profile     jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);";

macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// Runs the demo; returns the process exit code.
pub async fn run(rows: u32) -> ExitCode {
    match demo(rows).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(rows: u32) -> Result<(), String> {
    say!("ferry demo: starting a throwaway PostgreSQL and a local osmem-server …");
    let pg = tokio::task::spawn_blocking(PgCluster::start)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot start PostgreSQL: {e}"))?;
    let os = tokio::task::spawn_blocking(Osmem::start)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot start osmem-server: {e}"))?;
    pg.create_database("app").await.map_err(|e| e.to_string())?;
    let db = pg.client("app").await.map_err(|e| e.to_string())?;
    db.batch_execute(SCHEMA).await.map_err(|e| e.to_string())?;
    db.execute(
        "INSERT INTO users (id, email, name, plan, balance, tags, profile)
         SELECT g, 'user' || g || '@example.com', (ARRAY['Ada','Grace','Alan','Edsger','Barbara'])[1 + g % 5] || ' ' || g,
                (ARRAY['free','pro','enterprise'])[1 + g % 3]::plan, (g * 7 % 1000) / 10.0,
                ARRAY['demo', 'cohort-' || (g % 4)], jsonb_build_object('visits', g % 17)
         FROM generate_series(1, $1::int) g",
        &[&(rows as i32)],
    )
    .await
    .map_err(|e| e.to_string())?;
    say!(
        "  PostgreSQL at {} with {rows} rows in table users",
        pg.url("app")
    );
    say!("  osmem-server at {}", os.url());

    let toml = format!(
        "[source]\nurl = \"{}\"\nslot = \"ferry_demo\"\npublication = \"ferry_demo\"\n\n[sink]\nurl = \"{}\"\n\n[[index]]\nname = \"users\"\ntable = \"users\"\n",
        pg.url("app"),
        os.url()
    );
    say!("\nconfig:\n{toml}");
    let cfg = Config::from_toml(&toml).map_err(|e| e.to_string())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let engine = tokio::spawn(ferry_engine::run(
        cfg,
        stop_rx,
        std::sync::Arc::new(ferry_engine::Stats::default()),
    ));

    let sink = Sink::new(os.url(), Duration::from_secs(10)).map_err(|e| e.to_string())?;
    let backfilled = wait_count(&sink, u64::from(rows), Duration::from_secs(60)).await?;
    say!("backfill: {backfilled} documents in index users");

    say!("\nlive changes: insert id 0, rename id 1, delete id 2, move id 3 to plan enterprise");
    db.batch_execute(
        "INSERT INTO users (id, email, name, tags) VALUES (0, 'new@example.com', 'Katherine Johnson', '{live}');
         UPDATE users SET name = 'Ada Lovelace', balance = balance + 100 WHERE id = 1;
         DELETE FROM users WHERE id = 2;
         UPDATE users SET plan = 'enterprise' WHERE id = 3;",
    )
    .await
    .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let _ = sink.refresh("users").await;
        let doc = sink.json_request(Method::Get, "/users/_doc/0", None).await;
        let gone = sink.json_request(Method::Get, "/users/_doc/2", None).await;
        if doc.is_ok() && gone.is_err() {
            break;
        }
        if Instant::now() > deadline {
            return Err("live changes did not arrive within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in ["0", "1", "3"] {
        let d = sink
            .json_request(Method::Get, &format!("/users/_doc/{id}"), None)
            .await
            .map_err(|e| e.to_string())?;
        say!("  users/{id}: {}", d["_source"]);
    }
    let gone = sink
        .json_request(Method::Get, "/users/_doc/2", None)
        .await
        .is_err();
    say!("  users/2 deleted: {gone}");
    let q = json!({"query": {"match": {"name": "ada"}}, "size": 3, "sort": [{"id": "asc"}]});
    let res: Value = sink
        .json_request(Method::Post, "/users/_search", Some(q))
        .await
        .map_err(|e| e.to_string())?;
    say!(
        "\nsearch name:ada → {} hits; first: {}",
        res["hits"]["total"]["value"],
        res["hits"]["hits"][0]["_source"]
    );
    let _ = stop_tx.send(true);
    match engine.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.to_string()),
        Err(e) => return Err(e.to_string()),
    }
    say!("\ndone: ferry stopped cleanly; the throwaway servers are removed.");
    Ok(())
}

async fn wait_count(sink: &Sink, want: u64, within: Duration) -> Result<u64, String> {
    let deadline = Instant::now() + within;
    loop {
        let _ = sink.refresh("users").await;
        if let Ok(v) = sink.json_request(Method::Get, "/users/_count", None).await {
            let n = v["count"].as_u64().unwrap_or(0);
            if n >= want {
                return Ok(n);
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "backfill did not reach {want} documents within {within:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
