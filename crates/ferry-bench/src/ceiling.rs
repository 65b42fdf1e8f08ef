//! Ceilings on the real node (`--sink opensearch`): how fast the node
//! itself ingests the same writes ferry made, sent by the raw loader
//! ([`loader`]) as ready bulk bodies at full concurrency. It runs after
//! ferry has stopped, on a fresh index with the mapping of ferry's index,
//! and its rate replaces the PostgreSQL-side ceiling in the report (which
//! moves to the notes).
//!
//! * Backfills: the documents ferry wrote, read back from its index (the
//!   node keeps each source as the bytes it was sent) with their versions,
//!   loaded under the settings ferry seeds with (`refresh_interval: -1`,
//!   `gc_deletes: 12h`), which are restored and the index refreshed inside
//!   the timing, as ferry does when its copy ends.
//! * `stream-simple`: the writers' changes in transaction order (inserts,
//!   updates, deletes, then the sentinel), every row rendered by PostgreSQL
//!   as ferry renders it (checked byte for byte against ferry's stored
//!   documents), one version per transaction, compacted per 5,000 changes
//!   as ferry's worker compacts a full batch (the last write of a document
//!   wins), default index settings as ferry streams with.
//!
//! While the loader runs, the bench reads the ceiling's index as it reads
//! ferry's while ferry runs (a real-time get of the sentinel every 10 ms,
//! or `_count` every 100 ms): reads keep a shard out of "search idle", so
//! both indexes refresh on the same schedule.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::harness::{Harness, INDEX};
use crate::loader::{self, Batch, Op};
use crate::opensearch::Node;
use crate::report::{thousands, Outcome};
use crate::workloads::{unpaced_tx, SplitMix, NARROW_ROW, UNPACED_WRITERS};

/// Bulk requests the loader keeps in flight: the node has two write
/// threads on two cores; a third request keeps them busy while an answer
/// travels.
pub const CONCURRENCY: usize = 3;

/// The index the loader writes to.
const CEILING_INDEX: &str = "bench-ceiling";

/// Documents whose rendering is compared with ferry's stored bytes.
const RENDER_SAMPLE: usize = 300;

/// A narrow-table row `r` as ferry's document: columns in table order,
/// integers as numbers, text as JSON strings, timestamptz in RFC 3339 UTC.
const NARROW_DOC: &str = r#"concat('{"id":', r.id, ',"a":', r.a, ',"b":', coalesce(r.b::text, 'null'),
    ',"label":', coalesce(to_json(r.label)::text, 'null'), ',"note":', coalesce(to_json(r.note)::text, 'null'),
    ',"created_at":', coalesce(to_json(to_char(r.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'))::text, 'null'),
    '}')"#;

/// How the ceiling index is set up while it loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settings {
    /// As ferry seeds: refreshes paused, tombstones kept 12 h; restored
    /// and refreshed at the end, inside the timing.
    Seeding,
    /// Defaults, as ferry streams.
    Streaming,
}

/// Sets the backfill's ceiling to the node's ingest of the documents
/// ferry wrote; a failure fails the workload.
pub async fn backfill(h: &Harness, o: &mut Outcome) {
    let result = async {
        let node = h.sink.node().context("the sink is not a node")?;
        let read = Instant::now();
        let ops = node.documents(INDEX).await?;
        let what = format!(
            "the {} documents ferry wrote, read back from its index ({:.1} s) with their versions and \
             exact source bytes, in id order",
            thousands(ops.len() as f64),
            read.elapsed().as_secs_f64()
        );
        let batches = loader::batches(CEILING_INDEX, &ops);
        measure(node, o, batches, ops.len(), Settings::Seeding, &what).await
    }
    .await;
    if let Err(e) = result {
        fail(o, e);
    }
}

/// Sets `stream-simple`'s ceiling to the node's ingest of the writers'
/// operations (`txs` transactions per writer); a failure fails the
/// workload.
pub async fn stream_simple(h: &Harness, o: &mut Outcome, txs: i64) {
    let result = async {
        let node = h.sink.node().context("the sink is not a node")?;
        let (ops, finals) = stream_ops(h, txs).await?;
        let rendering = compare_rendering(node, &finals).await?;
        let mut writes = 0;
        let batches: Vec<Batch> = ops
            .chunks(loader::BATCH_OPS)
            .flat_map(|window| {
                let compacted = loader::compact(window);
                writes += compacted.len();
                loader::batches(CEILING_INDEX, &compacted)
            })
            .collect();
        let what = format!(
            "the writers' {} changes in transaction order (per transaction 60 index, 30 index, \
             10 delete; then the sentinel), version = transaction number, compacted per {} changes \
             as ferry's worker compacts a full batch into {} writes; documents rendered by \
             PostgreSQL from the rows ({rendering})",
            thousands(ops.len() as f64),
            thousands(loader::BATCH_OPS as f64),
            thousands(writes as f64)
        );
        measure(node, o, batches, ops.len(), Settings::Streaming, &what).await
    }
    .await;
    if let Err(e) = result {
        fail(o, e);
    }
}

fn fail(o: &mut Outcome, e: anyhow::Error) {
    o.ok = false;
    o.check = format!("FAIL: node ceiling: {e:#}; {}", o.check);
}

/// Loads `batches` (`changes` of the outcome's units) into a fresh copy
/// of ferry's index, times it and records it as the outcome's ceiling.
async fn measure(
    node: &Arc<Node>,
    o: &mut Outcome,
    batches: Vec<Batch>,
    changes: usize,
    settings: Settings,
    what: &str,
) -> Result<()> {
    let expected = node.settled_count(INDEX).await?;
    let ferry_index = node.concrete(INDEX).await?;
    let extra = match settings {
        Settings::Seeding => json!({"refresh_interval": "-1", "gc_deletes": "12h"}),
        Settings::Streaming => json!({}),
    };
    node.delete_index(CEILING_INDEX).await?;
    node.create_like(INDEX, CEILING_INDEX, &extra).await?;
    // ferry's index is done with: its merges must not compete.
    node.delete_index(&ferry_index).await?;
    // ferry's index had been searched just before ferry's measured phase.
    node.count(CEILING_INDEX).await?;
    let requests = batches.len();
    let rejected_before = node.write_rejections().await?;

    let stop = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(read_while_loading(
        Arc::clone(node),
        settings,
        Arc::clone(&stop),
    ));
    let started = Instant::now();
    let load = loader::send(node.url(), batches, CONCURRENCY).await;
    stop.store(true, Ordering::Release);
    let _ = reader.await;
    let load = load?;
    if settings == Settings::Seeding {
        node.http()
            .json(
                "PUT",
                &format!("/{CEILING_INDEX}/_settings"),
                Some(&json!({"index": {"refresh_interval": null, "gc_deletes": null}})),
            )
            .await?;
        node.refresh(CEILING_INDEX).await?;
    }
    let took = started.elapsed();

    let rejected = node
        .write_rejections()
        .await?
        .saturating_sub(rejected_before);
    let figures = node.index_stats(CEILING_INDEX).await?;
    let stored = node.settled_count(CEILING_INDEX).await?;
    node.delete_index(CEILING_INDEX).await?;
    if load.errors > 0 {
        bail!("the loader's writes were refused: {}", load.describe());
    }
    if stored != expected {
        bail!("the loader left {stored} documents where ferry left {expected}");
    }
    if changes as u64 != o.size {
        o.notes.push(format!(
            "the ceiling moved {changes} {} for ferry's {}",
            o.unit, o.size
        ));
    }

    o.demote_ceiling("PostgreSQL-side ceiling");
    o.ceiling = Some(changes as f64 / took.as_secs_f64());
    o.ceiling_method = Some(format!(
        "the node's own ingest: {what}; {requests} bulk bodies of <= {} operations / <= {} MiB encoded as \
         ferry encodes them (external_gte versions), built before the clock started, sent over {CONCURRENCY} \
         concurrent keep-alive connections to a fresh index with ferry's mapping, 1 shard, 0 replicas{}: {:.2} s \
         ({}); ended with {stored} documents, as ferry's index",
        loader::BATCH_OPS,
        loader::BATCH_BYTES / (1024 * 1024),
        match settings {
            Settings::Seeding => {
                ", refresh_interval -1 and gc_deletes 12h as ferry seeds (restored and refreshed inside the timing), \
                 _count polled every 100 ms as for ferry's"
            }
            Settings::Streaming => {
                ", default refresh_interval as ferry streams, real-time gets of the sentinel every 10 ms as for ferry's"
            }
        },
        took.as_secs_f64(),
        load.describe()
    ));
    o.notes.push(format!(
        "the ceiling's index on the node: {}",
        figures.describe()
    ));
    if rejected > 0 {
        o.notes.push(format!(
            "the node's write thread pool rejected {rejected} bulk shard requests (429) during the ceiling load"
        ));
    }
    Ok(())
}

/// Reads the ceiling's index the way the bench reads ferry's while it
/// waits for ferry (see the module notes), until `stop`.
async fn read_while_loading(node: Arc<Node>, settings: Settings, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        let every = match settings {
            Settings::Seeding => {
                let _ = node.count(CEILING_INDEX).await;
                Duration::from_millis(100)
            }
            Settings::Streaming => {
                let _ = node.exists(CEILING_INDEX, "0").await;
                Duration::from_millis(10)
            }
        };
        tokio::time::sleep(every).await;
    }
}

/// `stream-simple`'s operations, and the final document of every row the
/// table still holds (to check the rendering against ferry's).
async fn stream_ops(h: &Harness, txs: i64) -> Result<(Vec<Op>, HashMap<i64, Vec<u8>>)> {
    // Every row as inserted, from the writers' own row expression.
    let mut inserted: HashMap<i64, Vec<u8>> = HashMap::new();
    let mut ranges: Vec<(i64, i64)> = (0..UNPACED_WRITERS)
        .map(|w| {
            (
                *unpaced_tx(w, 0).inserted.start(),
                *unpaced_tx(w, txs - 1).inserted.end(),
            )
        })
        .collect();
    ranges.push((0, 0));
    for (lo, hi) in ranges {
        let sql = format!(
            "SELECT r.id, {NARROW_DOC} FROM (SELECT {NARROW_ROW} FROM generate_series({lo}::bigint, {hi}::bigint) g) \
             AS r(id, a, b, label, note, created_at)"
        );
        for row in h.db.query(&sql, &[]).await? {
            inserted.insert(row.get(0), row.get::<_, String>(1).into_bytes());
        }
    }
    // Every row as it is now: the updated rows were not changed again.
    let mut finals: HashMap<i64, Vec<u8>> = HashMap::new();
    for row in
        h.db.query(&format!("SELECT r.id, {NARROW_DOC} FROM items r"), &[])
            .await?
    {
        finals.insert(row.get(0), row.get::<_, String>(1).into_bytes());
    }

    let writers = UNPACED_WRITERS;
    let mut ops = Vec::with_capacity(inserted.len() * 100 / 60);
    let doc = |map: &HashMap<i64, Vec<u8>>, id: i64| {
        map.get(&id)
            .cloned()
            .with_context(|| format!("row {id} is not where the writers left it"))
    };
    for k in 0..txs {
        for w in 0..writers {
            let tx = unpaced_tx(w, k);
            let version = (1 + k * writers + w) as u64;
            for id in tx.inserted {
                ops.push(Op {
                    id: id.to_string(),
                    version,
                    doc: Some(doc(&inserted, id)?),
                });
            }
            for id in tx.updated {
                ops.push(Op {
                    id: id.to_string(),
                    version,
                    doc: Some(doc(&finals, id)?),
                });
            }
            for id in tx.deleted {
                ops.push(Op {
                    id: id.to_string(),
                    version,
                    doc: None,
                });
            }
        }
    }
    ops.push(Op {
        id: "0".to_owned(),
        version: (txs * writers + 1) as u64,
        doc: Some(doc(&inserted, 0)?),
    });
    Ok((ops, finals))
}

/// Compares a sample of rendered documents with the bytes ferry stored;
/// describes the result.
async fn compare_rendering(node: &Node, finals: &HashMap<i64, Vec<u8>>) -> Result<String> {
    let mut ids: Vec<i64> = finals.keys().copied().collect();
    ids.sort_unstable();
    let mut rng = SplitMix(0x5EED_0F00);
    let mut same = 0usize;
    let mut first_diff = None;
    let n = ids.len().min(RENDER_SAMPLE);
    for _ in 0..n {
        let id = ids[rng.below(ids.len() as u64) as usize];
        let stored = node.get(INDEX, &id.to_string()).await?.map(|(_, s)| s);
        if stored.as_deref() == finals.get(&id).map(Vec::as_slice) {
            same += 1;
        } else if first_diff.is_none() {
            first_diff = Some(format!(
                "document {id}: ferry stored {:?}, the loader sends {:?}",
                stored.map(|s| String::from_utf8_lossy(&s).into_owned()),
                finals
                    .get(&id)
                    .map(|s| String::from_utf8_lossy(s).into_owned())
            ));
        }
    }
    Ok(match first_diff {
        None => format!("{same} of {n} sampled documents byte-equal to ferry's"),
        Some(diff) => format!(
            "only {same} of {n} sampled documents byte-equal to ferry's; first difference: {diff}"
        ),
    })
}
