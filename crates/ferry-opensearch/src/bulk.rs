//! Bulk requests: NDJSON encoding, per-item outcome classification, retries.

use std::time::Duration;

use backon::ExponentialBackoff;
use ferry_core::stats::BulkClass;
use ferry_core::value::write_json_str;
use ferry_core::{DocOp, DocWrite};
use serde::Deserialize;

use crate::{is_transient, snippet, Sink, SinkError};

/// What it took to make a batch durable.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BulkOutcome {
    /// Bulk requests sent (including retries and splits).
    pub requests: u64,
    /// Items written or deleted.
    pub written: u64,
    /// Items the cluster already had in a newer version (409 on external versions).
    pub superseded: u64,
    /// Each superseded item, for per-index counts.
    pub superseded_writes: Vec<SupersededWrite>,
    /// Item attempts that failed transiently and were retried.
    pub retried: u64,
    /// Items rejected for good (4xx other than 409): the caller applies its
    /// poison policy. Every other item of the batch is durable.
    pub rejected: Vec<Rejected>,
}

/// A write the cluster already had in a newer version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SupersededWrite {
    /// The write's `index` (its slot in the index names given to `write`).
    pub index: usize,
    /// True for a delete, false for an index operation.
    pub delete: bool,
}

/// A write the cluster refused for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The write.
    pub write: DocWrite,
    /// Item status (400 mapping error, 413 too large, …).
    pub status: u16,
    /// `type: reason` from the response.
    pub reason: String,
}

/// Encodes writes as a `_bulk` NDJSON body, one action line (+ source line) per write.
///
/// Every action carries `version_type=external_gte` with the write's LSN, so
/// replays of the same write are harmless and older writes lose; a routed
/// write carries its `routing`.
pub fn encode_bulk(writes: &[&DocWrite], index_names: &[String], out: &mut Vec<u8>) {
    for w in writes {
        let name = index_names.get(w.index).map(String::as_str).unwrap_or("");
        out.extend_from_slice(match w.op {
            DocOp::Index(_) => b"{\"index\":{\"_index\":",
            DocOp::Delete => b"{\"delete\":{\"_index\":",
        });
        write_json_str(name.as_bytes(), out);
        out.extend_from_slice(b",\"_id\":");
        write_json_str(w.id.as_bytes(), out);
        out.extend_from_slice(b",\"version\":");
        out.extend_from_slice(w.version.0.to_string().as_bytes());
        if let Some(r) = &w.routing {
            out.extend_from_slice(b",\"routing\":");
            write_json_str(r.as_bytes(), out);
        }
        out.extend_from_slice(b",\"version_type\":\"external_gte\"}}\n");
        if let DocOp::Index(body) = &w.op {
            out.extend_from_slice(body);
            out.push(b'\n');
        }
    }
}

#[derive(Deserialize)]
struct Summary {
    errors: bool,
}

#[derive(Deserialize)]
struct Full {
    items: Vec<std::collections::HashMap<String, ItemAnswer>>,
}

/// One item of a `_bulk` answer.
#[derive(Debug, Deserialize)]
pub struct ItemAnswer {
    /// The item's HTTP status.
    pub status: u16,
    /// The error object (`type`, `reason`, …) of a failed item.
    #[serde(default)]
    pub error: Option<serde_json::Value>,
}

impl ItemAnswer {
    /// The error's `type`, e.g. `version_conflict_engine_exception`.
    pub fn error_type(&self) -> Option<&str> {
        self.error.as_ref().and_then(|e| e["type"].as_str())
    }
}

/// Reads a `_bulk` answer: `None` when its `errors` flag is false (every
/// item succeeded, and the items are not parsed at all), otherwise one
/// entry per item in request order (`None` for an item object without an
/// action key).
pub fn parse_bulk_answer(
    body: &[u8],
) -> Result<Option<Vec<Option<ItemAnswer>>>, serde_json::Error> {
    let summary: Summary = serde_json::from_slice(body)?;
    if !summary.errors {
        return Ok(None);
    }
    let full: Full = serde_json::from_slice(body)?;
    Ok(Some(
        full.items
            .into_iter()
            .map(|item| item.into_values().next())
            .collect(),
    ))
}

/// What one bulk item's answer means for its write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemOutcome {
    /// Durable: written, or deleted (a delete of an absent document is done too).
    Written,
    /// The cluster already holds this version or a newer one (409 under
    /// `external_gte`): nothing to do, counted as success.
    Superseded,
    /// Transient (throttled, timed out, server-side failure): send it again.
    Retry,
    /// Refused for good: the caller's poison policy decides.
    Rejected,
    /// The document is fine but the index cannot take it: the index is
    /// missing (404 on a write, or `index_not_found_exception`) or writes are
    /// refused (401/403: missing privileges, or a `cluster_block_exception`
    /// such as `index.blocks.write`). Only an operator can fix it, so the
    /// batch fails: never written, dead-lettered or confirmed.
    Operator,
}

/// Classifies one bulk item from its operation, status and error type.
///
/// A transient status is never `Rejected`: an overload must not become data
/// loss. A 404 is success only for a delete of an absent document in an
/// existing index (`result: not_found`, no error).
pub fn item_outcome(op: &DocOp, status: u16, error_type: Option<&str>) -> ItemOutcome {
    let index_missing = error_type == Some("index_not_found_exception");
    match status {
        200..=299 => ItemOutcome::Written,
        404 if matches!(op, DocOp::Delete) && !index_missing => ItemOutcome::Written,
        404 | 401 | 403 => ItemOutcome::Operator,
        _ if index_missing => ItemOutcome::Operator,
        409 => ItemOutcome::Superseded,
        s if is_transient(s) => ItemOutcome::Retry,
        _ => ItemOutcome::Rejected,
    }
}

/// `type: reason` of a bulk item's error.
fn item_reason(item: &ItemAnswer) -> String {
    item.error
        .as_ref()
        .map(|e| {
            format!(
                "{}: {}",
                e["type"].as_str().unwrap_or("error"),
                e["reason"].as_str().unwrap_or("")
            )
        })
        .unwrap_or_else(|| "no reason given".into())
}

/// How one bulk attempt ended, for the writes it carried.
enum Attempt {
    /// Everything durable (or superseded).
    Done,
    /// These positions (into the attempted slice) must be retried.
    RetryItems(Vec<usize>),
    /// The whole request failed transiently.
    RetryAll(SinkError),
    /// The body was too large: split it.
    TooLarge,
}

/// The first retry step; each further failure doubles it up to the sink's cap.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Retry delays for one run of failures, forever: step `n` doubles from
/// [`FIRST_BACKOFF`] up to `max`, and each delay is drawn at random from
/// `[step / 2, step)` so sinks retrying together spread out.
fn retry_delays(max: Duration) -> ExponentialBackoff {
    ferry_core::backoff::jittered(FIRST_BACKOFF, max)
}

pub(crate) async fn write_all(
    sink: &Sink,
    writes: &[DocWrite],
    index_names: &[String],
) -> Result<BulkOutcome, SinkError> {
    let mut outcome = BulkOutcome::default();
    if writes.is_empty() {
        return Ok(outcome);
    }
    // A stack of pending chunks; a 413 splits a chunk into halves.
    let mut pending: Vec<Vec<&DocWrite>> = vec![writes.iter().collect()];
    let mut delays = retry_delays(sink.max_backoff);
    while let Some(chunk) = pending.pop() {
        let mut body = Vec::with_capacity(chunk.iter().map(|w| w.weight()).sum::<usize>());
        encode_bulk(&chunk, index_names, &mut body);
        let body = bytes::Bytes::from(body);
        outcome.requests += 1;
        let result = attempt(sink, &chunk, index_names, body, &mut outcome).await?;
        if let Some(stats) = sink.stats() {
            match &result {
                Attempt::Done => stats.bulk_completed(),
                Attempt::RetryItems(_) | Attempt::RetryAll(_) => stats.bulk_retried(),
                Attempt::TooLarge => {}
            }
        }
        match result {
            Attempt::Done => delays = retry_delays(sink.max_backoff),
            Attempt::RetryItems(positions) => {
                outcome.retried += positions.len() as u64;
                let backoff = next_delay(&mut delays, sink.max_backoff);
                tracing::warn!(
                    items = positions.len(),
                    backoff_ms = backoff.as_millis() as u64,
                    "bulk items rejected transiently; retrying them"
                );
                pending.push(
                    positions
                        .into_iter()
                        .filter_map(|i| chunk.get(i).copied())
                        .collect(),
                );
                tokio::time::sleep(backoff).await;
            }
            Attempt::RetryAll(err) => {
                let backoff = next_delay(&mut delays, sink.max_backoff);
                tracing::warn!(error = %err, backoff_ms = backoff.as_millis() as u64, "bulk request failed; retrying");
                pending.push(chunk);
                tokio::time::sleep(backoff).await;
            }
            Attempt::TooLarge => {
                if chunk.len() == 1 {
                    outcome.rejected.push(Rejected {
                        write: chunk[0].clone(),
                        status: 413,
                        reason: "the document alone exceeds the cluster's request size limit (http.max_content_length)".into(),
                    });
                    continue;
                }
                let mid = chunk.len() / 2;
                tracing::info!(
                    items = chunk.len(),
                    "bulk request too large (413); splitting it"
                );
                let (a, b) = chunk.split_at(mid);
                // Pop order: first half first.
                pending.push(b.to_vec());
                pending.push(a.to_vec());
            }
        }
    }
    Ok(outcome)
}

/// The next delay; `retry_delays` never runs out, `max` is only a fallback.
fn next_delay(delays: &mut ExponentialBackoff, max: Duration) -> Duration {
    delays.next().unwrap_or(max)
}

async fn attempt(
    sink: &Sink,
    chunk: &[&DocWrite],
    index_names: &[String],
    body: bytes::Bytes,
    outcome: &mut BulkOutcome,
) -> Result<Attempt, SinkError> {
    let answer = sink
        .request(
            opensearch::http::Method::Post,
            "/_bulk",
            Some(body),
            "application/x-ndjson",
        )
        .await;
    if let Some(stats) = sink.stats() {
        stats.bulk_request(BulkClass::of(answer.as_ref().ok().map(|(s, _)| *s)));
    }
    let (status, bytes) = match answer {
        Ok(r) => r,
        Err(e) => return Ok(Attempt::RetryAll(e)),
    };
    if status == 413 {
        return Ok(Attempt::TooLarge);
    }
    if !(200..300).contains(&status) {
        let err = SinkError::Status {
            status,
            what: "POST /_bulk".into(),
            body: snippet(&bytes),
        };
        return if is_transient(status) {
            Ok(Attempt::RetryAll(err))
        } else {
            Err(err)
        };
    }
    let answer = parse_bulk_answer(&bytes).map_err(|e| SinkError::Protocol {
        what: "POST /_bulk".into(),
        reason: e.to_string(),
    })?;
    let Some(items) = answer else {
        outcome.written += chunk.len() as u64;
        return Ok(Attempt::Done);
    };
    if items.len() != chunk.len() {
        return Err(SinkError::Protocol {
            what: "POST /_bulk".into(),
            reason: format!("{} items answered for {} sent", items.len(), chunk.len()),
        });
    }
    let mut retry = Vec::new();
    for (pos, item) in items.iter().enumerate() {
        let Some(item) = item else {
            continue;
        };
        let w = chunk[pos];
        match item_outcome(&w.op, item.status, item.error_type()) {
            ItemOutcome::Written => outcome.written += 1,
            ItemOutcome::Superseded => {
                outcome.superseded += 1;
                outcome.superseded_writes.push(SupersededWrite {
                    index: w.index,
                    delete: matches!(w.op, DocOp::Delete),
                });
            }
            ItemOutcome::Retry => retry.push(pos),
            ItemOutcome::Operator => {
                return Err(SinkError::Refused {
                    index: index_names.get(w.index).cloned().unwrap_or_default(),
                    id: w.id.clone(),
                    status: item.status,
                    reason: item_reason(item),
                });
            }
            ItemOutcome::Rejected => {
                let reason = item_reason(item);
                outcome.rejected.push(Rejected {
                    write: w.clone(),
                    status: item.status,
                    reason,
                });
            }
        }
    }
    if retry.is_empty() {
        Ok(Attempt::Done)
    } else {
        Ok(Attempt::RetryItems(retry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::Lsn;

    #[test]
    fn retry_delays_double_with_jitter_and_stay_under_the_cap() {
        let max = Duration::from_secs(2);
        let mut delays = retry_delays(max);
        let mut step = FIRST_BACKOFF;
        for _ in 0..40 {
            let d = delays.next().expect("retries forever");
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} outside [{:?}, {step:?}]",
                step / 2
            );
            step = (step * 2).min(max);
        }
    }

    #[test]
    fn every_item_status_has_one_outcome() {
        use ItemOutcome::*;
        let index = DocOp::Index(b"{}".to_vec());
        let delete = DocOp::Delete;
        #[rustfmt::skip]
        let table: &[(&DocOp, u16, Option<&str>, ItemOutcome)] = &[
            (&index,  200, None,                                      Written),
            (&index,  201, None,                                      Written),
            (&delete, 200, None,                                      Written),
            // A delete of an absent document in an existing index is done.
            (&delete, 404, None,                                      Written),
            // The index itself is missing: never success, never poison.
            (&index,  404, Some("index_not_found_exception"),         Operator),
            (&index,  404, None,                                      Operator),
            (&delete, 404, Some("index_not_found_exception"),         Operator),
            // Writes refused: privileges, or a write block (index.blocks.write).
            (&index,  403, Some("cluster_block_exception"),           Operator),
            (&delete, 403, Some("cluster_block_exception"),           Operator),
            (&index,  403, Some("security_exception"),                Operator),
            (&index,  401, Some("security_exception"),                Operator),
            (&index,  409, Some("version_conflict_engine_exception"), Superseded),
            (&delete, 409, Some("version_conflict_engine_exception"), Superseded),
            (&index,  429, Some("es_rejected_execution_exception"),   Retry),
            // The disk flood-stage block answers 429: it clears by itself once space is freed.
            (&index,  429, Some("cluster_block_exception"),           Retry),
            (&index,  408, None,                                      Retry),
            (&index,  500, Some("exception"),                         Retry),
            (&delete, 503, Some("unavailable_shards_exception"),      Retry),
            (&index,  400, Some("mapper_parsing_exception"),          Rejected),
            (&index,  400, Some("document_parsing_exception"),        Rejected),
            (&index,  413, None,                                      Rejected),
            (&delete, 400, Some("illegal_argument_exception"),        Rejected),
        ];
        for (op, status, error_type, want) in table {
            assert_eq!(
                item_outcome(op, *status, *error_type),
                *want,
                "{op:?} {status} {error_type:?}"
            );
        }
    }

    #[test]
    fn retry_delays_are_jittered() {
        let firsts: std::collections::HashSet<Duration> = (0..20)
            .map(|_| {
                retry_delays(Duration::from_secs(30))
                    .next()
                    .expect("a delay")
            })
            .collect();
        assert!(firsts.len() > 1, "twenty fresh runs all waited {firsts:?}");
    }

    #[test]
    fn encodes_index_and_delete_actions() {
        let a = DocWrite {
            index: 0,
            id: "1".into(),
            version: Lsn(42),
            op: DocOp::Index(b"{\"a\":1}".to_vec()),
            routing: None,
        };
        let b = DocWrite {
            index: 0,
            id: "x\"y".into(),
            version: Lsn(43),
            op: DocOp::Delete,
            routing: Some("t\"1".into()),
        };
        let mut out = Vec::new();
        encode_bulk(&[&a, &b], &["users-1".to_string()], &mut out);
        let text = String::from_utf8(out).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        for l in &lines {
            serde_json::from_str::<serde_json::Value>(l).expect("each line is JSON");
        }
        assert_eq!(
            lines[0],
            r#"{"index":{"_index":"users-1","_id":"1","version":42,"version_type":"external_gte"}}"#
        );
        assert_eq!(
            lines[2],
            r#"{"delete":{"_index":"users-1","_id":"x\"y","version":43,"routing":"t\"1","version_type":"external_gte"}}"#
        );
    }
}
