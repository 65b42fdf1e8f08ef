//! The raw bulk loader behind the node's ingest ceiling: bulk bodies built
//! before the clock starts, sent straight to the node by several concurrent
//! keep-alive connections, with ferry's wire format and batch limits, and
//! answers read by ferry's own parser and per-item rules
//! (`ferry_opensearch::parse_bulk_answer`, `item_outcome`: 408, 429 and 5xx
//! again, 409 is success).

use std::collections::VecDeque;
use std::io::Write as _;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_core::DocOp;
use ferry_opensearch::{item_outcome, parse_bulk_answer, ItemOutcome};

use crate::http::Conn;

/// Operations per bulk request: ferry's default `engine.max_batch_changes`
/// and `engine.backfill_batch_rows`.
pub const BATCH_OPS: usize = 5_000;
/// Bytes per bulk request at most: ferry's default `engine.max_batch_bytes`.
pub const BATCH_BYTES: usize = 8 * 1024 * 1024;

/// One write: index `doc` (or delete when `None`) as document `id` with
/// external version `version`.
#[derive(Debug, Clone)]
pub struct Op {
    /// Document id.
    pub id: String,
    /// External version (`version_type=external_gte`).
    pub version: u64,
    /// The source; `None` deletes the document.
    pub doc: Option<Vec<u8>>,
}

/// A ready bulk body and where each operation's lines lie in it (to resend
/// single items).
#[derive(Debug, Clone)]
pub struct Batch {
    body: Vec<u8>,
    items: Vec<Range<usize>>,
}

impl Batch {
    /// A batch of some of this batch's operations.
    fn subset(&self, positions: &[usize]) -> Batch {
        let mut out = Batch {
            body: Vec::new(),
            items: Vec::with_capacity(positions.len()),
        };
        for &p in positions {
            let at = out.body.len();
            out.body
                .extend_from_slice(&self.body[self.items[p].clone()]);
            out.items.push(at..out.body.len());
        }
        out
    }
}

/// `window`'s operations as ferry's streaming worker batches them: the
/// last write of each document replaces the earlier ones, in the place of
/// the first.
pub fn compact(window: &[Op]) -> Vec<Op> {
    let mut at: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut out: Vec<Op> = Vec::with_capacity(window.len());
    for op in window {
        match at.get(op.id.as_str()) {
            Some(&i) => out[i] = op.clone(),
            None => {
                at.insert(&op.id, out.len());
                out.push(op.clone());
            }
        }
    }
    out
}

/// `ops` as bulk bodies for `index`, encoded as ferry encodes them, at
/// most [`BATCH_OPS`] operations and (past the first) [`BATCH_BYTES`] each.
pub fn batches(index: &str, ops: &[Op]) -> Vec<Batch> {
    let mut out = Vec::new();
    let mut cur = Batch {
        body: Vec::new(),
        items: Vec::new(),
    };
    for op in ops {
        let size = 120 + op.id.len() + op.doc.as_ref().map_or(0, Vec::len);
        if cur.items.len() >= BATCH_OPS
            || (!cur.items.is_empty() && cur.body.len() + size > BATCH_BYTES)
        {
            out.push(std::mem::replace(
                &mut cur,
                Batch {
                    body: Vec::new(),
                    items: Vec::new(),
                },
            ));
        }
        let at = cur.body.len();
        let kind = if op.doc.is_some() { "index" } else { "delete" };
        let id = serde_json::to_string(&op.id).unwrap_or_default();
        let _ = writeln!(
            cur.body,
            "{{\"{kind}\":{{\"_index\":\"{index}\",\"_id\":{id},\"version\":{},\"version_type\":\"external_gte\"}}}}",
            op.version
        );
        if let Some(doc) = &op.doc {
            cur.body.extend_from_slice(doc);
            cur.body.push(b'\n');
        }
        cur.items.push(at..cur.body.len());
    }
    if !cur.items.is_empty() {
        out.push(cur);
    }
    out
}

/// What a load did.
#[derive(Debug, Clone, Default)]
pub struct Load {
    /// From the first request sent to the last answer read.
    pub took: Duration,
    /// Operations sent (first attempts).
    pub ops: u64,
    /// Bulk requests sent, retries included.
    pub requests: u64,
    /// Bytes of bulk bodies sent, retries included.
    pub bytes: u64,
    /// Items refused as older than the stored version (409): success.
    pub conflicts: u64,
    /// Items sent again after a 429 or 5xx.
    pub retried_items: u64,
    /// Whole requests sent again after a 429, 5xx or transport error.
    pub retried_requests: u64,
    /// Items refused for good (other 4xx).
    pub errors: u64,
    /// The first such refusal.
    pub first_error: Option<String>,
}

impl Load {
    /// One line for the notes.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} operations in {} bulk requests ({:.1} MiB) in {:.2} s",
            self.ops,
            self.requests,
            self.bytes as f64 / (1024.0 * 1024.0),
            self.took.as_secs_f64()
        );
        if self.conflicts > 0 {
            s.push_str(&format!("; {} items superseded (409)", self.conflicts));
        }
        if self.retried_items + self.retried_requests > 0 {
            s.push_str(&format!(
                "; {} items and {} whole requests retried after 429/5xx",
                self.retried_items, self.retried_requests
            ));
        }
        if self.errors > 0 {
            s.push_str(&format!(
                "; {} items REFUSED, first: {}",
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            ));
        }
        s
    }
}

/// Shared state of the senders.
struct Work {
    queue: Mutex<VecDeque<Batch>>,
    /// Batches queued or in flight; 0 means done.
    open: AtomicUsize,
    requests: AtomicU64,
    bytes: AtomicU64,
    conflicts: AtomicU64,
    retried_items: AtomicU64,
    retried_requests: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// Sends every batch to the node at `url` over `concurrency` connections,
/// each one request at a time; returns when every operation was answered
/// with success (including 409) or a permanent refusal.
pub async fn send(url: &str, batches: Vec<Batch>, concurrency: usize) -> Result<Load> {
    let ops = batches.iter().map(|b| b.items.len() as u64).sum();
    let work = Arc::new(Work {
        open: AtomicUsize::new(batches.len()),
        queue: Mutex::new(batches.into()),
        requests: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        conflicts: AtomicU64::new(0),
        retried_items: AtomicU64::new(0),
        retried_requests: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
    });
    let started = Instant::now();
    let senders: Vec<_> = (0..concurrency.max(1))
        .map(|_| tokio::spawn(sender(Conn::new(url), Arc::clone(&work))))
        .collect();
    for s in senders {
        s.await.context("joining a bulk sender")??;
    }
    let took = started.elapsed();
    let first_error = lock(&work.first_error).clone();
    Ok(Load {
        took,
        ops,
        requests: work.requests.load(Ordering::Relaxed),
        bytes: work.bytes.load(Ordering::Relaxed),
        conflicts: work.conflicts.load(Ordering::Relaxed),
        retried_items: work.retried_items.load(Ordering::Relaxed),
        retried_requests: work.retried_requests.load(Ordering::Relaxed),
        errors: work.errors.load(Ordering::Relaxed),
        first_error,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One connection's loop: take a batch, send it, settle its items.
async fn sender(mut conn: Conn, work: Arc<Work>) -> Result<()> {
    let mut failures = 0u32;
    loop {
        let next = lock(&work.queue).pop_front();
        let Some(batch) = next else {
            if work.open.load(Ordering::Acquire) == 0 {
                return Ok(());
            }
            // Another sender may still queue retries.
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        };
        work.requests.fetch_add(1, Ordering::Relaxed);
        work.bytes
            .fetch_add(batch.body.len() as u64, Ordering::Relaxed);
        let answer = conn
            .request("POST", "/_bulk", "application/x-ndjson", &batch.body)
            .await;
        let retry_all = match &answer {
            Err(_) => true,
            Ok(r) => r.status == 429 || r.status >= 500,
        };
        if retry_all {
            failures += 1;
            if failures > 50 {
                let why = match answer {
                    Err(e) => format!("{e:#}"),
                    Ok(r) => format!("HTTP {}: {}", r.status, r.snippet()),
                };
                bail!("the node kept failing bulk requests: {why}");
            }
            work.retried_requests.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50 * u64::from(failures.min(20)))).await;
            lock(&work.queue).push_back(batch);
            continue;
        }
        failures = 0;
        let r = answer?;
        if !(200..300).contains(&r.status) {
            bail!("bulk request refused: HTTP {}: {}", r.status, r.snippet());
        }
        let retry = settle(&batch, &r.body, &work)?;
        if !retry.is_empty() {
            work.retried_items
                .fetch_add(retry.len() as u64, Ordering::Relaxed);
            work.open.fetch_add(1, Ordering::AcqRel);
            lock(&work.queue).push_back(batch.subset(&retry));
        }
        work.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a bulk response's outcomes (by ferry's own per-item rules);
/// returns the positions to send again.
fn settle(batch: &Batch, body: &[u8], work: &Work) -> Result<Vec<usize>> {
    let Some(items) = parse_bulk_answer(body).context("reading a bulk response")? else {
        return Ok(Vec::new());
    };
    if items.len() != batch.items.len() {
        bail!(
            "{} items answered for {} sent",
            items.len(),
            batch.items.len()
        );
    }
    let mut retry = Vec::new();
    for (pos, item) in items.iter().enumerate() {
        let Some(item) = item else {
            continue;
        };
        let op = if batch.body[batch.items[pos].clone()].starts_with(b"{\"delete\"") {
            DocOp::Delete
        } else {
            DocOp::Index(Vec::new())
        };
        match item_outcome(&op, item.status, item.error_type()) {
            ItemOutcome::Written => {}
            ItemOutcome::Superseded => {
                work.conflicts.fetch_add(1, Ordering::Relaxed);
            }
            ItemOutcome::Retry => retry.push(pos),
            ItemOutcome::Rejected | ItemOutcome::Operator => {
                work.errors.fetch_add(1, Ordering::Relaxed);
                let mut first = lock(&work.first_error);
                if first.is_none() {
                    *first = Some(format!(
                        "{} {}",
                        item.status,
                        item.error
                            .as_ref()
                            .map(|e| e.to_string())
                            .unwrap_or_default()
                    ));
                }
            }
        }
    }
    Ok(retry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(id: u64, doc: Option<&str>) -> Op {
        Op {
            id: id.to_string(),
            version: 7,
            doc: doc.map(|d| d.as_bytes().to_vec()),
        }
    }

    #[test]
    fn encodes_like_ferry_and_splits_by_count() {
        let ops: Vec<Op> = (0..(BATCH_OPS as u64 + 1))
            .map(|i| op(i, if i == 1 { None } else { Some("{\"a\":1}") }))
            .collect();
        let bs = batches("ix", &ops);
        assert_eq!(bs.len(), 2);
        assert_eq!(bs[0].items.len(), BATCH_OPS);
        let text = String::from_utf8(bs[0].body.clone()).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            r#"{"index":{"_index":"ix","_id":"0","version":7,"version_type":"external_gte"}}"#
        );
        assert_eq!(lines[1], r#"{"a":1}"#);
        assert_eq!(
            lines[2],
            r#"{"delete":{"_index":"ix","_id":"1","version":7,"version_type":"external_gte"}}"#
        );
        let again = bs[0].subset(&[1, 2]);
        let text = String::from_utf8(again.body).expect("utf8");
        assert!(text.starts_with(r#"{"delete""#));
        assert_eq!(text.lines().count(), 3);
    }

    #[test]
    fn compacts_like_ferry() {
        let mut later = op(1, None);
        later.version = 9;
        let out = compact(&[op(1, Some("{}")), op(2, Some("{}")), later]);
        assert_eq!(out.len(), 2);
        assert_eq!(
            (out[0].id.as_str(), out[0].version, out[0].doc.is_none()),
            ("1", 9, true)
        );
        assert_eq!(out[1].id, "2");
    }

    #[test]
    fn splits_by_bytes() {
        let big = "x".repeat(BATCH_BYTES / 3);
        let doc = format!("{{\"t\":\"{big}\"}}");
        let ops: Vec<Op> = (0..4).map(|i| op(i, Some(&doc))).collect();
        let bs = batches("ix", &ops);
        assert_eq!(
            bs.iter().map(|b| b.items.len()).collect::<Vec<_>>(),
            vec![2, 2]
        );
        assert!(bs.iter().all(|b| b.body.len() <= BATCH_BYTES));
    }

    #[test]
    fn settles_items_by_status() {
        let batch = batches(
            "ix",
            &[
                op(1, Some("{}")),
                op(2, Some("{}")),
                op(3, None),
                op(4, Some("{}")),
            ],
        )
        .remove(0);
        let work = Work {
            queue: Mutex::new(VecDeque::new()),
            open: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            retried_items: AtomicU64::new(0),
            retried_requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
        };
        let body = br#"{"errors":true,"items":[{"index":{"status":201}},{"index":{"status":409}},{"delete":{"status":404}},{"index":{"status":429,"error":{"type":"rejected_execution_exception"}}}]}"#;
        assert_eq!(settle(&batch, body, &work).expect("settle"), vec![3]);
        assert_eq!(work.conflicts.load(Ordering::Relaxed), 1);
        assert_eq!(work.errors.load(Ordering::Relaxed), 0);
    }
}
