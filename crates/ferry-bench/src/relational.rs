//! The relational workloads: one document per user holding the user's
//! orders (each with its line items: nested two levels), tags (many-to-many
//! through `user_tags`), company (belongs_to) and order count. Schema, index
//! and oracle query are those of `tests/tests/relations.rs`, scaled up.
//!
//! * `backfill-nested`: every user's document built from tables loaded
//!   before ferry starts.
//! * `stream-relational`: writers change only child rows (line items and
//!   orders); every change must rebuild its user's document.
//! * `nested-nofk-backfill`, `nested-nofk-stream`: the same two on a schema
//!   with no index on any foreign key (the join table's key leads with the
//!   other column), as many databases have: the build and resolve statements
//!   must stay set-based.
//!
//! The convergence check compares documents with an independent SQL query
//! (jsonb functions, not ferry's), semantically: numbers by value.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tokio_postgres::Client;

use crate::harness::{Harness, INDEX};
use crate::pgcpu::{CpuReport, CpuSampler, Role};
use crate::report::{thousands, Outcome};
use crate::workloads::{
    copy_out, finish, limit, rows_touched, Check, Ctx, Phase, SplitMix, Workload, TARGET_RSS_MIB,
};

/// Goals.
const TARGET_NESTED_DOCS_S: f64 = 25_000.0;
const TARGET_CHILD_CHANGES_S: f64 = 15_000.0;
/// Goals without foreign-key indexes.
const TARGET_NOFK_DOCS_S: f64 = 10_000.0;
const TARGET_NOFK_CHANGES_S: f64 = 5_000.0;

/// Random users compared with the oracle at the end (plus the lowest and
/// highest id, plus any the workload names).
const SAMPLE: usize = 300;

// The index block after `name` and `table = "users"`.
use ferry_testkit::relational::INDEX as INDEX_CONFIG;

// Every live user's expected document (id text, JSON text).
use ferry_testkit::relational::EXPECTED;

/// [`EXPECTED`] with the text-based `json` functions instead of `jsonb`:
/// the same documents, the kind of functions ferry's own queries use. Timed
/// next to the ceiling to tell the cost of `jsonb` from the cost of the joins.
fn expected_json() -> String {
    EXPECTED.replace("jsonb", "json")
}

/// The tables (as in the test, foreign keys added after the load) and the
/// indexes any real schema has on the foreign keys.
const DDL: &str = "
CREATE TABLE companies (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL, name text, company_id int,
                    deleted_at timestamptz);
CREATE TABLE orders (id int PRIMARY KEY, user_id int, total numeric(10,2), status text NOT NULL,
                     created_at timestamptz DEFAULT now());
CREATE TABLE line_items (id int PRIMARY KEY, order_id int, sku text, qty int);
CREATE TABLE tags (id int PRIMARY KEY, label text NOT NULL);
CREATE TABLE user_tags (user_id int, tag_id int, PRIMARY KEY (user_id, tag_id));";

/// Constraints, created once the rows are in (much faster than checking
/// every inserted row).
const CONSTRAINTS: &str = "
ALTER TABLE users ADD FOREIGN KEY (company_id) REFERENCES companies;
ALTER TABLE orders ADD FOREIGN KEY (user_id) REFERENCES users;
ALTER TABLE line_items ADD FOREIGN KEY (order_id) REFERENCES orders ON DELETE CASCADE;
ALTER TABLE user_tags ADD FOREIGN KEY (user_id) REFERENCES users, ADD FOREIGN KEY (tag_id) REFERENCES tags;";

/// The foreign-key indexes a well-kept schema has.
const FK_INDEXES: &str = "
CREATE INDEX orders_user_id ON orders (user_id);
CREATE INDEX line_items_order_id ON line_items (order_id);";

/// Without foreign-key indexes, the join table's key must not lead with
/// `user_id` either.
const NO_FK_JOIN_KEY: &str = "
ALTER TABLE user_tags DROP CONSTRAINT user_tags_pkey, ADD PRIMARY KEY (tag_id, user_id);";

/// Orders of user `u`: ids `8u + 1 ..= 8u + u % 7` (0 to 6, 3 on average).
fn orders_of(u: i32) -> std::ops::RangeInclusive<i32> {
    8 * u + 1..=8 * u + u % 7
}

/// Rows for `users` users: 100 companies (every 50th user has none), 20
/// tags (about 2.9 per user), 0–6 orders per user (a third of them
/// cancelled, so left out of the document but counted), 0–4 line items
/// per order (2 on average).
fn rows(users: u64) -> String {
    format!(
        "INSERT INTO companies SELECT g, 'company ' || g FROM generate_series(1, 100) g;
         INSERT INTO tags SELECT g, 'tag ' || g FROM generate_series(1, 20) g;
         INSERT INTO users SELECT g, 'u' || g || '@example.com', 'User ' || g,
             CASE WHEN g % 50 = 0 THEN NULL ELSE 1 + g % 100 END, NULL
           FROM generate_series(1, {users}) g;
         INSERT INTO orders (id, user_id, total, status)
           SELECT 8 * u + k, u, ((8 * u + k) * 37 % 100000) / 100.0,
                  (ARRAY['new', 'paid', 'cancelled'])[1 + (8 * u + k) % 3]
           FROM generate_series(1, {users}) u, generate_series(1, u % 7) k;
         INSERT INTO line_items SELECT 8 * o.id + j, o.id, 'sku-' || ((o.id + j) % 500), 1 + (o.id + j) % 9
           FROM orders o, generate_series(1, o.id % 5) j;
         INSERT INTO user_tags SELECT u, t FROM generate_series(1, {users}) u, generate_series(1, 20) t
           WHERE (u + t) % 7 = 0;"
    )
}

/// Creates and fills the schema; returns a note describing it.
/// With `fk_indexes` false, no foreign key has an index.
async fn load(db: &Client, users: u64, fk_indexes: bool) -> Result<String> {
    let started = Instant::now();
    db.batch_execute(DDL).await.context("creating the tables")?;
    db.batch_execute(&rows(users))
        .await
        .context("loading the rows")?;
    db.batch_execute(CONSTRAINTS)
        .await
        .context("adding foreign keys")?;
    db.batch_execute(if fk_indexes {
        FK_INDEXES
    } else {
        NO_FK_JOIN_KEY
    })
    .await
    .context("setting up the foreign-key indexes")?;
    db.batch_execute("VACUUM (ANALYZE)").await?;
    let row = db
        .query_one(
            "SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM line_items), \
             (SELECT count(*) FROM user_tags), \
             pg_size_pretty(sum(pg_total_relation_size(c.oid))) FROM pg_class c \
             WHERE c.relname IN ('companies', 'users', 'orders', 'line_items', 'tags', 'user_tags')",
            &[],
        )
        .await?;
    let (orders, items, tags): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let size: String = row.get(3);
    Ok(format!(
        "{} users, {} orders, {} line items, {} user_tags rows, 100 companies, 20 tags ({size} with indexes); \
         {}; loaded in {:.1} s before ferry started",
        thousands(users as f64),
        thousands(orders as f64),
        thousands(items as f64),
        thousands(tags as f64),
        if fk_indexes {
            "indexes on orders(user_id) and line_items(order_id)"
        } else {
            "no index on any foreign key (user_tags keyed (tag_id, user_id))"
        },
        started.elapsed().as_secs_f64()
    ))
}

/// `'{1,2,3}'::int[]`.
fn int_array(ids: &[i32]) -> String {
    let items: Vec<String> = ids.iter().map(i32::to_string).collect();
    format!("'{{{}}}'::int[]", items.join(","))
}

/// Semantic equality of an oracle value and a document value: numbers by
/// value (`3.50` = `3.5`), timestamps by instant, arrays in order, objects
/// with the same keys.
fn same(expected: &Value, doc: &Value) -> bool {
    match (expected, doc) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::String(a), Value::String(b)) => a == b || norm_time(a) == norm_time(b),
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(x, y))
        }
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len() && a.iter().all(|(k, v)| b.get(k).is_some_and(|w| same(v, w)))
        }
        _ => expected == doc,
    }
}

/// `2024-01-01 00:00:00+00:00` and `2024-01-01T00:00:00Z` alike.
fn norm_time(s: &str) -> String {
    let s = s.replacen(' ', "T", 1);
    match s.strip_suffix("+00:00") {
        Some(p) => format!("{p}Z"),
        None => s,
    }
}

/// At most `n` characters of `text`.
fn clip(text: &str, n: usize) -> String {
    match text.char_indices().nth(n) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// Users among `ids` whose document differs from the oracle, described.
async fn differences(h: &Harness, ids: &[i32]) -> Result<Vec<String>> {
    let rows =
        h.db.query(&format!("{EXPECTED} AND u.id = ANY($1)"), &[&ids])
            .await
            .context("running the oracle query")?;
    let mut expected: HashMap<String, Value> = HashMap::with_capacity(rows.len());
    for r in &rows {
        let id: String = r.get(0);
        let text: String = r.get(1);
        expected.insert(id, serde_json::from_str(&text)?);
    }
    let mut out = Vec::new();
    for id in ids {
        let key = id.to_string();
        let doc = h
            .sink
            .get(INDEX, &key)
            .await?
            .map(|(_, source)| serde_json::from_slice::<Value>(&source));
        match (expected.get(&key), doc) {
            (None, None) => {}
            (Some(_), None) => out.push(format!("user {id} has no document")),
            (None, Some(_)) => out.push(format!("user {id} is not live but has a document")),
            (Some(_), Some(Err(e))) => out.push(format!("document {id} is not JSON: {e}")),
            (Some(want), Some(Ok(got))) => {
                if !same(want, &got) {
                    out.push(format!(
                        "document {id} differs: oracle {} / document {}",
                        clip(&want.to_string(), 700),
                        clip(&got.to_string(), 700)
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// The convergence check of the relational index: exactly the live users'
/// ids, and a random sample (plus the lowest and highest id and `focus`)
/// equal to the oracle's documents. `Err(reason)` when they disagree.
pub async fn converged(h: &Harness, focus: &[i32], timeout: Duration) -> Result<String, String> {
    check(h, focus, timeout)
        .await
        .map_err(|e| format!("{e:#}"))?
}

async fn check(h: &Harness, focus: &[i32], timeout: Duration) -> Result<Result<String, String>> {
    let deadline = Instant::now() + timeout;
    let live = loop {
        let live: i64 =
            h.db.query_one("SELECT count(*) FROM users WHERE deleted_at IS NULL", &[])
                .await?
                .get(0);
        let docs = h.sink.settled_count(INDEX).await?;
        if usize::try_from(live).ok() == Some(docs) {
            break live;
        }
        if Instant::now() >= deadline {
            return Ok(Err(format!(
                "{live} live users but the index holds {docs} documents"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let pg_ids: HashSet<String> =
        h.db.query("SELECT id::text FROM users WHERE deleted_at IS NULL", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
    let sink_ids: HashSet<String> = h.sink.ids(INDEX).await?.into_iter().collect();
    let missing: Vec<&String> = pg_ids.difference(&sink_ids).take(5).collect();
    let extra: Vec<&String> = sink_ids.difference(&pg_ids).take(5).collect();
    if !missing.is_empty() || !extra.is_empty() {
        return Ok(Err(format!(
            "ids differ: users without a document (first 5) {missing:?}, documents without a live user {extra:?}"
        )));
    }

    let mut sample: Vec<i32> =
        h.db.query(
            &format!(
                "(SELECT id FROM users WHERE deleted_at IS NULL ORDER BY random() LIMIT {SAMPLE}) \
                 UNION (SELECT min(id) FROM users WHERE deleted_at IS NULL) \
                 UNION (SELECT max(id) FROM users WHERE deleted_at IS NULL)"
            ),
            &[],
        )
        .await?
        .iter()
        .filter_map(|r| r.get::<_, Option<i32>>(0))
        .collect();
    sample.extend_from_slice(focus);
    sample.sort_unstable();
    sample.dedup();
    // Everything has arrived by now, but a late rebuild is a delay, not a
    // wrong document: retry until the deadline before calling it one.
    loop {
        let diffs = differences(h, &sample).await?;
        if diffs.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return Ok(Err(format!(
                "{} of {} sampled documents differ from the oracle query; first: {}",
                diffs.len(),
                sample.len(),
                diffs[0]
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(Ok(format!(
        "{live} live users = {live} docs; {} sampled documents ({} of them named by the workload) equal the oracle query",
        sample.len(),
        focus.len()
    )))
}

/// Adds the CPU breakdown of the measured phase to the notes.
fn cpu_notes(o: &mut Outcome, report: &CpuReport, start: &Phase, end: &Phase) {
    let ferry = start.cpu.zip(end.cpu).map(|(a, b)| b - a);
    o.notes.push(report.describe(ferry));
    let sql = report.postgres(Role::FerrySql);
    if let Some(f) = ferry {
        o.notes.push(format!(
            "per 1,000 {}: ferry {:.0} ms CPU, PostgreSQL running ferry's queries {:.0} ms, \
             decoding for ferry {:.0} ms",
            o.unit,
            f * 1e6 / o.size.max(1) as f64,
            sql * 1e6 / o.size.max(1) as f64,
            report.postgres(Role::FerryWalsender) * 1e6 / o.size.max(1) as f64
        ));
    }
}

/// The ceiling of `backfill-nested`: PostgreSQL alone building the same
/// documents in one statement (the oracle query).
async fn ceiling_nested(h: &Harness, o: &mut Outcome, n: u64) -> Result<()> {
    // Ceiling: PostgreSQL alone building the same documents in one statement.
    let sql = format!("COPY ({EXPECTED}) TO STDOUT");
    let mut runs = Vec::new();
    for _ in 0..2 {
        runs.push(copy_out(&h.db, &sql).await?);
    }
    let best = runs
        .iter()
        .map(|(t, _)| t.as_secs_f64())
        .fold(f64::INFINITY, f64::min);
    o.ceiling = Some(n as f64 / best);
    let shown: Vec<String> = runs
        .iter()
        .map(|(t, _)| format!("{:.2} s", t.as_secs_f64()))
        .collect();
    o.ceiling_method = Some(format!(
        "the oracle query (jsonb_build_object/jsonb_agg, correlated subqueries) building every user's document \
         in one statement, COPY … TO STDOUT into nothing, best of {}: {} ({:.1} MiB)",
        runs.len(),
        shown.join(", "),
        runs[0].1 as f64 / (1024.0 * 1024.0)
    ));
    let (json_time, _) = copy_out(&h.db, &format!("COPY ({}) TO STDOUT", expected_json())).await?;
    o.notes.push(format!(
        "for comparison, the same query with json instead of jsonb functions took {:.2} s ({} docs/s): \
         ferry's own build query is of that kind, so it can beat the jsonb ceiling",
        json_time.as_secs_f64(),
        thousands(n as f64 / json_time.as_secs_f64())
    ));

    Ok(())
}

/// `backfill-nested` (or, `w` = `nested-nofk-backfill`, without
/// foreign-key indexes): the users' documents built from preloaded tables.
pub async fn backfill_nested(ctx: &Ctx, w: Workload) -> Result<Outcome> {
    let name = w.name();
    let fk_indexes = w == Workload::BackfillNested;
    let n = ctx.sizes.nested_users;
    let mut o = Outcome::new(name, n, "docs");
    let mut h = Harness::start(ctx, name).await?;
    o.notes.push(load(&h.db, n, fk_indexes).await?);

    if fk_indexes {
        ceiling_nested(&h, &mut o, n).await?;
    } else {
        o.notes.push(
            "no ceiling: the oracle query's correlated subqueries would read the child tables once per user \
             without foreign-key indexes (the slowness this workload guards against)"
                .to_owned(),
        );
    }

    let start = Phase::before_ferry(&h).await;
    let sampler = CpuSampler::start(&h).await?;
    let t0 = h.start_ferry_with("users", INDEX_CONFIG)?;
    let t1 = h.wait_count(n as usize, limit(n, 1_000.0)).await?;
    let end = Phase::read(&h).await;
    let report = sampler.stop().await?;
    let secs = (t1 - t0).as_secs_f64();
    o.seconds = Some(secs);
    o.rate = Some(n as f64 / secs);
    o.notes.push(
        "measured from spawning ferry until every user had a document (slot creation, REPLICA IDENTITY \
         and index set-up included)"
            .to_owned(),
    );
    o.notes.push(format!(
        "SQL/1k is not measured here: ferry_sql_statements_total counts the streaming worker's statements \
         only; the backfill builds documents with one COPY statement per key-ordered chunk of \
         engine.backfill_chunk_rows (default 250,000) roots, {} for these users",
        n.div_ceil(250_000)
    ));
    if h.sink.node().is_some() {
        o.notes.push(
            "on the node, completion = the index's _count (polled every 100 ms, no forced refresh) shows every user: \
             ferry pauses refreshes while it seeds and refreshes once at the end"
                .to_owned(),
        );
    }
    cpu_notes(&mut o, &report, &start, &end);
    finish(&mut h, &mut o, Check::Relational(&[]), &start, &end).await;
    if h.sink.node().is_some() {
        crate::ceiling::backfill(&h, &mut o).await;
    }
    o.target_rate(if fk_indexes {
        TARGET_NESTED_DOCS_S
    } else {
        TARGET_NOFK_DOCS_S
    });
    o.target_rss(TARGET_RSS_MIB);
    Ok(o)
}

/// User whose order the probe and the sentinel change (no writer owns it).
const SENTINEL_USER: i32 = 1;
/// That user's only order (`orders_of(1)`).
const SENTINEL_ORDER: i32 = 9;
/// Totals no generated order has (those stay below 1,000 plus the updates).
const PROBE_TOTAL: f64 = 7_777_777.77;
const SENTINEL_TOTAL: f64 = 12_345_678.91;

/// Whether a user document lists order `order` with `total`.
fn carries(source: &[u8], order: i32, total: f64) -> bool {
    let Ok(doc) = serde_json::from_slice::<Value>(source) else {
        return false;
    };
    doc["orders"].as_array().is_some_and(|orders| {
        orders.iter().any(|o| {
            o["id"].as_i64() == Some(i64::from(order)) && o["total"].as_f64() == Some(total)
        })
    })
}

/// Sets the sentinel order's total (and makes it visible: `paid`), then
/// waits until the user's document carries it; returns when that write
/// arrived at the sink.
async fn mark(h: &mut Harness, total: f64, timeout: Duration) -> Result<Instant> {
    h.db.batch_execute(&format!(
        "UPDATE orders SET total = {total:.2}, status = 'paid' WHERE id = {SENTINEL_ORDER}"
    ))
    .await?;
    let id = SENTINEL_USER.to_string();
    let seen = h
        .wait_sink(
            &format!("user {SENTINEL_USER}'s order {SENTINEL_ORDER} to carry total {total:.2}"),
            timeout,
            |s, slice| {
                let until = Instant::now() + slice;
                loop {
                    if s.get(INDEX, &id)
                        .is_some_and(|(_, src)| carries(&src, SENTINEL_ORDER, total))
                    {
                        return true;
                    }
                    if Instant::now() >= until {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            },
        )
        .await?;
    Ok(h.sink.last_write(INDEX, &id).unwrap_or(seen))
}

/// Writers of child rows, each owning every user `u` with `u % WRITERS == w`.
const WRITERS: usize = 3;
/// Users one transaction changes; each gets [`CHANGES_PER_USER`] changes.
const USERS_PER_TX: usize = 25;
/// A line item inserted, one updated, one deleted, and an order updated.
const CHANGES_PER_USER: u64 = 4;
/// Where writer `w`'s new line-item ids start.
fn first_new_item(w: usize) -> i32 {
    1_000_000_000 + 100_000_000 * w as i32
}

/// What one child-row writer did.
#[derive(Debug, Default)]
struct WriterLog {
    first_commit: Option<Instant>,
    changes: u64,
    transactions: u64,
    /// Sum over transactions of the distinct users each one changed.
    user_changes: u64,
    touched: HashSet<i32>,
}

/// One writer: `txs` transactions, each picking [`USERS_PER_TX`] distinct
/// users it owns and, per user, inserting a line item into one of their
/// orders, updating one of their line items, deleting another (the writer
/// keeps the live item ids of its users in `items`), and updating one of
/// their orders (total + 1, status rotating new → paid → cancelled → new,
/// so orders also leave and re-enter the document's filtered array).
async fn child_writer(
    db: Client,
    w: usize,
    mut items: HashMap<i32, Vec<i32>>,
    txs: u64,
) -> Result<WriterLog> {
    let mut users: Vec<i32> = items.keys().copied().collect();
    users.sort_unstable();
    if users.len() < USERS_PER_TX {
        bail!("writer {w} owns only {} users", users.len());
    }
    let mut rng = SplitMix(0x0DE1_7A00 + w as u64);
    let mut next_id = first_new_item(w);
    let mut log = WriterLog::default();
    for _ in 0..txs {
        let mut chosen: Vec<i32> = Vec::with_capacity(USERS_PER_TX);
        while chosen.len() < USERS_PER_TX {
            let u = users[rng.below(users.len() as u64) as usize];
            if !chosen.contains(&u) {
                chosen.push(u);
            }
        }
        let mut inserts = Vec::with_capacity(USERS_PER_TX);
        let mut updates = Vec::with_capacity(USERS_PER_TX);
        let mut deletes = Vec::with_capacity(USERS_PER_TX);
        let mut orders = Vec::with_capacity(USERS_PER_TX);
        for &u in &chosen {
            let own = orders_of(u);
            let count = u64::try_from(own.end() - own.start() + 1).unwrap_or(0);
            let pick = |rng: &mut SplitMix| own.start() + rng.below(count) as i32;
            let id = next_id;
            next_id += 1;
            inserts.push(format!(
                "({id}, {}, 'new-{id}', {})",
                pick(&mut rng),
                1 + id % 9
            ));
            let live = items
                .get_mut(&u)
                .context("a chosen user the writer does not own")?;
            live.push(id);
            let upd = rng.below(live.len() as u64) as usize;
            let del = if live.len() == 1 {
                0
            } else {
                (upd + 1 + rng.below(live.len() as u64 - 1) as usize) % live.len()
            };
            updates.push(live[upd]);
            deletes.push(live.swap_remove(del));
            orders.push(pick(&mut rng));
        }
        let sql = format!(
            "BEGIN; \
             INSERT INTO line_items (id, order_id, sku, qty) VALUES {}; \
             UPDATE line_items SET qty = qty + 1, sku = 'changed-' || id WHERE id = ANY({}); \
             DELETE FROM line_items WHERE id = ANY({}); \
             UPDATE orders SET total = total + 1, status = CASE status WHEN 'new' THEN 'paid' \
               WHEN 'paid' THEN 'cancelled' ELSE 'new' END WHERE id = ANY({}); \
             COMMIT;",
            inserts.join(", "),
            int_array(&updates),
            int_array(&deletes),
            int_array(&orders)
        );
        let messages = db.simple_query(&sql).await?;
        log.first_commit.get_or_insert_with(Instant::now);
        log.changes += rows_touched(&messages);
        log.transactions += 1;
        log.user_changes += chosen.len() as u64;
        log.touched.extend(chosen);
    }
    Ok(log)
}

/// `stream-relational` (or, `w` = `nested-nofk-stream`, without
/// foreign-key indexes): writers change line items and orders of preloaded
/// users; every change must rebuild its user's document.
pub async fn stream_relational(ctx: &Ctx, w: Workload) -> Result<Outcome> {
    let name = w.name();
    let fk_indexes = w == Workload::StreamRelational;
    let n = ctx.sizes.relational_users;
    let planned = ctx.sizes.relational_changes;
    let mut h = Harness::start(ctx, name).await?;
    let loaded = load(&h.db, n, fk_indexes).await?;
    let spawned = h.start_ferry_with("users", INDEX_CONFIG)?;
    let all_in = h.wait_count(n as usize, limit(n, 200.0)).await?;
    let caught_up = mark(&mut h, PROBE_TOTAL, Duration::from_secs(120)).await?;

    // Each writer's users (those with orders, except the sentinel's) and
    // their live line items.
    let mut owned: Vec<HashMap<i32, Vec<i32>>> = vec![HashMap::new(); WRITERS];
    for u in 1..=i32::try_from(n)? {
        if u != SENTINEL_USER && u % 7 != 0 {
            owned[u as usize % WRITERS].insert(u, Vec::new());
        }
    }
    for row in
        h.db.query(
            "SELECT o.user_id, li.id FROM line_items li JOIN orders o ON o.id = li.order_id",
            &[],
        )
        .await?
    {
        let (u, id): (i32, i32) = (row.get(0), row.get(1));
        if let Some(live) = owned[u as usize % WRITERS].get_mut(&u) {
            live.push(id);
        }
    }
    let per_tx = USERS_PER_TX as u64 * CHANGES_PER_USER;
    let txs = planned.div_ceil(WRITERS as u64 * per_tx);
    let mut clients = Vec::new();
    for _ in 0..WRITERS {
        clients.push(h.connect().await?);
    }

    let start = Phase::read(&h).await;
    let sampler = CpuSampler::start(&h).await?;
    let began = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .zip(owned)
        .enumerate()
        .map(|(w, (db, items))| tokio::spawn(child_writer(db, w, items, txs)))
        .collect();
    let mut logs = Vec::new();
    for t in tasks {
        logs.push(t.await.context("joining a writer")??);
    }
    let writers_done = began.elapsed();
    let arrived = mark(&mut h, SENTINEL_TOTAL, limit(planned, 500.0)).await?;
    let end = Phase::read(&h).await;
    let report = sampler.stop().await?;

    let written: u64 = logs.iter().map(|l| l.changes).sum();
    let transactions: u64 = logs.iter().map(|l| l.transactions).sum();
    let user_changes: u64 = logs.iter().map(|l| l.user_changes).sum();
    let first = logs
        .iter()
        .filter_map(|l| l.first_commit)
        .min()
        .context("no writer committed")?;
    let changes = written + 1;
    let mut o = Outcome::new(name, changes, "changes");
    o.notes.push(loaded);
    o.notes.push(format!(
        "ferry had every user's document {:.1} s after it was spawned; a probe change on user \
         {SENTINEL_USER} reached the sink {:.2} s after that; then the writers started",
        (all_in - spawned).as_secs_f64(),
        caught_up.saturating_duration_since(all_in).as_secs_f64()
    ));
    let secs = (arrived - first).as_secs_f64();
    o.seconds = Some(secs);
    o.rate = Some(changes as f64 / secs);
    let per_user = written as f64 / user_changes.max(1) as f64;
    o.notes.push(format!(
        "{WRITERS} writers, {} transactions of {per_tx} child changes: {USERS_PER_TX} distinct users each, per user \
         1 line item inserted, 1 updated, 1 deleted and 1 order updated (total + 1, status rotating through \
         'cancelled', which the orders array filters out); PostgreSQL absorbed them in {:.2} s ({} changes/s); \
         rate = from the first COMMIT until the sink held the sentinel order update committed after the rest",
        thousands(transactions as f64),
        writers_done.as_secs_f64(),
        thousands(written as f64 / writers_done.as_secs_f64())
    ));

    // Ceiling: the oracle building 1,000 affected users' documents in one
    // statement, scaled by the child changes behind each rebuilt document.
    let mut touched: Vec<i32> = logs
        .iter()
        .flat_map(|l| l.touched.iter().copied())
        .collect();
    touched.sort_unstable();
    let mut rng = SplitMix(0xCE11_0000);
    if fk_indexes {
        let mut batch_runs = Vec::new();
        let mut json_runs = Vec::new();
        for _ in 0..5 {
            let mut batch: HashSet<i32> = HashSet::with_capacity(1_000);
            while batch.len() < touched.len().min(1_000) {
                batch.insert(touched[rng.below(touched.len() as u64) as usize]);
            }
            let batch: Vec<i32> = batch.into_iter().collect();
            let (took, _) = copy_out(
                &h.db,
                &format!(
                    "COPY ({EXPECTED} AND u.id = ANY({})) TO STDOUT",
                    int_array(&batch)
                ),
            )
            .await?;
            let (json_took, _) = copy_out(
                &h.db,
                &format!(
                    "COPY ({} AND u.id = ANY({})) TO STDOUT",
                    expected_json(),
                    int_array(&batch)
                ),
            )
            .await?;
            batch_runs.push((batch.len(), took.as_secs_f64()));
            json_runs.push(batch.len() as f64 / json_took.as_secs_f64());
        }
        let docs_per_s = batch_runs
            .iter()
            .map(|(docs, secs)| *docs as f64 / secs)
            .fold(0.0, f64::max);
        o.ceiling = Some(docs_per_s * per_user);
        let shown: Vec<String> = batch_runs
            .iter()
            .map(|(docs, secs)| format!("{docs} in {:.1} ms", secs * 1e3))
            .collect();
        o.ceiling_method = Some(format!(
            "ceiling = D × C: D = {} documents/s, the best of 5 runs of the oracle query building a batch of 1,000 \
             random users the writers touched in one statement (COPY … TO STDOUT into nothing: {}); C = {per_user:.2} child \
             changes per rebuilt document = {} changes / {} (transaction, distinct user) pairs — documents touched \
             by several transactions of one ferry batch would need fewer rebuilds, so C is a lower bound",
            thousands(docs_per_s),
            shown.join(", "),
            thousands(written as f64),
            thousands(user_changes as f64)
        ));
        o.notes.push(format!(
            "for comparison, the same batches built with json instead of jsonb functions: best {} documents/s \
             (× C = {} changes/s)",
            thousands(json_runs.iter().copied().fold(0.0, f64::max)),
            thousands(json_runs.iter().copied().fold(0.0, f64::max) * per_user)
        ));
    } else {
        o.notes.push(
            "no ceiling: the oracle query's correlated subqueries would read the child tables once per user \
             without foreign-key indexes (the slowness this workload guards against)"
                .to_owned(),
        );
    }
    cpu_notes(&mut o, &report, &start, &end);

    // Convergence: a sample of the touched users on top of the random one.
    let mut focus: Vec<i32> = (0..SAMPLE)
        .map(|_| touched[rng.below(touched.len() as u64) as usize])
        .collect();
    focus.push(SENTINEL_USER);
    focus.sort_unstable();
    focus.dedup();
    finish(&mut h, &mut o, Check::Relational(&focus), &start, &end).await;
    o.target_rate(if fk_indexes {
        TARGET_CHILD_CHANGES_S
    } else {
        TARGET_NOFK_CHANGES_S
    });
    o.target_rss(TARGET_RSS_MIB);
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn compares_documents_semantically() {
        let want = json!({"id": 1, "orders": [{"total": 3.50, "items": []}], "company": null});
        let got: Value = serde_json::from_str(
            r#"{"company":null,"orders":[{"items":[],"total":3.5}],"id":1.0}"#,
        )
        .expect("json");
        assert!(same(&want, &got));
        assert!(!same(
            &want,
            &json!({"id": 1, "orders": [], "company": null})
        ));
        assert!(!same(
            &want,
            &json!({"id": 1, "orders": [{"total": 3.50, "items": []}]})
        ));
        assert!(same(
            &json!("2024-01-01 00:00:00+00:00"),
            &json!("2024-01-01T00:00:00Z")
        ));
    }

    #[test]
    fn reads_the_sentinel_and_builds_literals() {
        let doc = br#"{"id":1,"orders":[{"id":9,"total":12345678.91,"status":"paid","items":[]}]}"#;
        assert!(carries(doc, 9, SENTINEL_TOTAL));
        assert!(!carries(doc, 9, PROBE_TOTAL));
        assert!(!carries(doc, 10, SENTINEL_TOTAL));
        assert_eq!(int_array(&[3, 7]), "'{3,7}'::int[]");
        assert_eq!(orders_of(9).collect::<Vec<_>>(), vec![73, 74]);
        assert_eq!(
            orders_of(SENTINEL_USER).collect::<Vec<_>>(),
            vec![SENTINEL_ORDER]
        );
        assert!(orders_of(7).is_empty());
        // New line-item ids stay clear of the generated ones (1M users at
        // most) and of each other, within int.
        assert!(first_new_item(0) > 8 * (8 * 1_000_000 + 7) + 5);
        assert!(i64::from(first_new_item(WRITERS - 1)) + 100_000_000 <= i64::from(i32::MAX));
    }
}
