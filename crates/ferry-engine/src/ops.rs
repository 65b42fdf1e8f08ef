//! Operator tools that run beside (or without) a live pipeline:
//! dead-letter management and the drift check.
//!
//! Both are safe against a live deployment: they only write documents with
//! an external version equal to the WAL position read before the rows were,
//! so a newer streamed write always wins over a repair.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use ferry_config::Config;
use ferry_core::schema::split_doc_id;
use ferry_core::{DocOp, DocWrite, Lsn};
use ferry_opensearch::{DeadLetter, Method, Sink};
use ferry_postgres::catalog::{self, TypeResolver};
use ferry_postgres::{PgParams, Session};
use serde_json::{json, Value};

use crate::index::IndexRuntime;
use crate::{build, docplan, EngineError};

/// Connections and resolved indexes for an operator command.
struct Ops {
    client: Session,
    sink: Sink,
    indexes: Vec<IndexRuntime>,
    names: Vec<String>,
}

async fn open(cfg: &Config) -> Result<Ops, EngineError> {
    let params = PgParams::from_config(&cfg.source)?;
    let client = params.session().await?;
    let sink = Sink::from_config(&cfg.sink)?;
    let mut types = TypeResolver::default();
    let mut indexes = Vec::new();
    for (pos, ix) in cfg.indexes.iter().enumerate() {
        let plan = docplan::build(&client, &mut types, pos, ix).await?;
        let concrete = sink
            .alias_targets(&ix.name)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| {
                EngineError::Stream(format!(
                    "index {:?} does not exist yet: start `ferry run` first",
                    ix.name
                ))
            })?;
        indexes.push(IndexRuntime {
            pos,
            alias: ix.name.clone(),
            concrete,
            shape: plan.table.clone(),
            fast: !ix.is_relational(),
            plan,
            shadow: None,
        });
    }
    let names = indexes.iter().map(|i| i.concrete.clone()).collect();
    Ok(Ops {
        client,
        sink,
        indexes,
        names,
    })
}

async fn current_lsn(client: &Session) -> Result<Lsn, EngineError> {
    Ok(client.current_wal_lsn().await?)
}

fn selected<'a>(ops: &'a Ops, index: Option<&str>) -> Result<Vec<&'a IndexRuntime>, EngineError> {
    let list: Vec<&IndexRuntime> = ops
        .indexes
        .iter()
        .filter(|i| index.is_none_or(|n| n == i.alias))
        .collect();
    if list.is_empty() {
        return Err(EngineError::Stream(format!(
            "no [[index]] named {:?} in the configuration",
            index.unwrap_or_default()
        )));
    }
    Ok(list)
}

/// Lists dead letters (of one index, or all).
pub async fn dead_letters_list(
    cfg: &Config,
    index: Option<&str>,
) -> Result<Vec<DeadLetter>, EngineError> {
    let sink = Sink::from_config(&cfg.sink)?;
    Ok(sink
        .list_dead_letters(&cfg.sink.dead_letter_index, index, 10_000)
        .await?)
}

/// Deletes dead letters (of one index, or all); returns how many.
pub async fn dead_letters_purge(cfg: &Config, index: Option<&str>) -> Result<usize, EngineError> {
    let sink = Sink::from_config(&cfg.sink)?;
    let letters = sink
        .list_dead_letters(&cfg.sink.dead_letter_index, index, 10_000)
        .await?;
    sink.remove_dead_letters(&cfg.sink.dead_letter_index, &letters)
        .await?;
    Ok(letters.len())
}

/// Rebuilds every dead-lettered document from its current row and writes
/// it; healed entries are removed, the others keep their (new) reason.
/// Returns (healed, still failing).
pub async fn dead_letters_retry(
    cfg: &Config,
    index: Option<&str>,
) -> Result<(usize, usize), EngineError> {
    let ops = open(cfg).await?;
    let dl = &cfg.sink.dead_letter_index;
    let letters = ops.sink.list_dead_letters(dl, index, 10_000).await?;
    let version = current_lsn(&ops.client).await?;
    let mut healed = Vec::new();
    let mut failing = Vec::new();
    for ix in &ops.indexes {
        let mine: Vec<&DeadLetter> = letters.iter().filter(|l| l.index == ix.alias).collect();
        if mine.is_empty() {
            continue;
        }
        let keys: Vec<Vec<String>> = mine
            .iter()
            .map(|l| split_doc_id(&l.id, ix.plan.table.key.len()))
            .collect();
        let mut writes = Vec::new();
        for chunk in keys.chunks(1000) {
            build::build_docs(&ops.client, ix, chunk, version, &mut writes).await?;
        }
        let outcome = ops.sink.write(&writes, &ops.names).await?;
        let refused: HashSet<&str> = outcome
            .rejected
            .iter()
            .map(|r| r.write.id.as_str())
            .collect();
        for l in mine {
            if refused.contains(l.id.as_str()) {
                failing.push(l.clone());
            } else {
                healed.push(l.clone());
            }
        }
        let still: Vec<DeadLetter> = outcome
            .rejected
            .iter()
            .map(|r| DeadLetter {
                index: ix.alias.clone(),
                id: r.write.id.clone(),
                status: r.status,
                reason: r.reason.clone(),
                lsn: version,
            })
            .collect();
        ops.sink.store_dead_letters(dl, &still).await?;
    }
    ops.sink.remove_dead_letters(dl, &healed).await?;
    Ok((healed.len(), failing.len()))
}

/// What `ferry verify` found in one index.
#[derive(Debug, Default, Clone)]
pub struct VerifyReport {
    /// The index (alias).
    pub index: String,
    /// Documents compared.
    pub checked: usize,
    /// Rows without a document.
    pub missing: Vec<String>,
    /// Documents that differ from their rows.
    pub different: Vec<String>,
    /// Documents without a row.
    pub extra: Vec<String>,
    /// Documents rewritten or deleted by `--repair`.
    pub repaired: usize,
}

impl VerifyReport {
    /// True when nothing differs.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.different.is_empty() && self.extra.is_empty()
    }
}

/// Rebuilds documents from PostgreSQL and compares them with the cluster
/// (all rows, or a random sample of `sample` roots). Differences are checked
/// twice, a couple of seconds apart, so in-flight changes on a live
/// deployment are not reported; with `repair` the persistent ones are fixed.
pub async fn verify(
    cfg: &Config,
    index: Option<&str>,
    sample: Option<usize>,
    repair: bool,
) -> Result<Vec<VerifyReport>, EngineError> {
    let ops = open(cfg).await?;
    let mut reports = Vec::new();
    for ix in selected(&ops, index)? {
        let version = current_lsn(&ops.client).await?;
        let expected = match sample {
            Some(n) => {
                let keys = ops.client.sample_keys(&ix.plan.table, n).await?;
                let mut writes = Vec::new();
                for chunk in keys.chunks(1000) {
                    build::build_docs(&ops.client, ix, chunk, version, &mut writes).await?;
                }
                writes
            }
            None => all_docs(&ops.client, ix, version).await?,
        };
        let mut report = VerifyReport {
            index: ix.alias.clone(),
            checked: expected.len(),
            ..Default::default()
        };
        let mut suspects = compare(&ops.sink, &ix.concrete, &expected).await?;
        if sample.is_none() {
            let want: HashSet<&str> = expected
                .iter()
                .filter(|w| matches!(w.op, DocOp::Index(_)))
                .map(|w| w.id.as_str())
                .collect();
            for id in all_ids(&ops.sink, &ix.concrete).await? {
                if !want.contains(id.as_str()) {
                    suspects.insert(id);
                }
            }
        }
        if !suspects.is_empty() {
            // Second look: a live pipeline may simply not have caught up yet.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let version = current_lsn(&ops.client).await?;
            let keys: Vec<Vec<String>> = suspects
                .iter()
                .map(|id| split_doc_id(id, ix.plan.table.key.len()))
                .collect();
            let mut again = Vec::new();
            for chunk in keys.chunks(1000) {
                build::build_docs(&ops.client, ix, chunk, version, &mut again).await?;
            }
            let actual = fetch(&ops.sink, &ix.concrete, &again).await?;
            let now = current_lsn(&ops.client).await?;
            let mut fixes = Vec::new();
            for mut w in again {
                let have = actual.get(&w.id);
                // ferry's own writes carry LSNs no later than `now`; a document
                // newer than our read but not from the future is a live write
                // that overtook the check: not drift.
                let seen = have.map(|(_, v)| *v).unwrap_or(0);
                if seen > version.0 && seen <= now.0 {
                    continue;
                }
                match (&w.op, have) {
                    (DocOp::Index(_), None) => report.missing.push(w.id.clone()),
                    (DocOp::Index(body), Some((doc, _))) => {
                        if serde_json::from_slice::<Value>(body).ok().as_ref() != Some(doc) {
                            report.different.push(w.id.clone());
                        } else {
                            continue;
                        }
                    }
                    (DocOp::Delete, Some(_)) => report.extra.push(w.id.clone()),
                    (DocOp::Delete, None) => continue,
                }
                // A foreign write may carry a version beyond the WAL: outbid it.
                if seen > now.0 {
                    w.version = Lsn(seen + 1);
                }
                fixes.push(w);
            }
            if repair && !fixes.is_empty() {
                let outcome = ops.sink.write(&fixes, &ops.names).await?;
                report.repaired = outcome.written as usize;
            }
        }
        reports.push(report);
    }
    Ok(reports)
}

/// Every document of an index as the rows say, versioned `version`.
async fn all_docs(
    client: &Session,
    ix: &IndexRuntime,
    version: Lsn,
) -> Result<Vec<DocWrite>, EngineError> {
    let mut out = Vec::new();
    let rows = client.build_documents(&ix.plan, None, &ix.alias).await?;
    rows.read_all(|row| out.extend(ix.plan.document(|i| row.field(i), ix.pos, version)))
        .await?;
    Ok(out)
}

/// Ids whose document differs from (or should not exist per) `expected`.
async fn compare(
    sink: &Sink,
    concrete: &str,
    expected: &[DocWrite],
) -> Result<HashSet<String>, EngineError> {
    let mut suspects = HashSet::new();
    for chunk in expected.chunks(1000) {
        let actual = fetch(sink, concrete, chunk).await?;
        for w in chunk {
            let differs = match (&w.op, actual.get(&w.id)) {
                (DocOp::Index(_), None) => true,
                (DocOp::Index(body), Some((doc, _))) => {
                    serde_json::from_slice::<Value>(body).ok().as_ref() != Some(doc)
                }
                (DocOp::Delete, have) => have.is_some(),
            };
            if differs {
                suspects.insert(w.id.clone());
            }
        }
    }
    Ok(suspects)
}

/// `_source` and version of these documents, by id (absent ones left out).
async fn fetch(
    sink: &Sink,
    concrete: &str,
    writes: &[DocWrite],
) -> Result<BTreeMap<String, (Value, u64)>, EngineError> {
    let mut out = BTreeMap::new();
    for chunk in writes.chunks(1000) {
        let ids: Vec<&str> = chunk.iter().map(|w| w.id.as_str()).collect();
        let v = sink
            .json_request(
                Method::Post,
                &format!("/{concrete}/_mget"),
                Some(json!({ "ids": ids })),
            )
            .await?;
        for d in v["docs"].as_array().cloned().unwrap_or_default() {
            if d["found"].as_bool() == Some(true) {
                if let Some(id) = d["_id"].as_str() {
                    let version = d["_version"].as_u64().unwrap_or(0);
                    out.insert(id.to_string(), (d["_source"].clone(), version));
                }
            }
        }
    }
    Ok(out)
}

/// Every document id of an index (scroll API).
async fn all_ids(sink: &Sink, concrete: &str) -> Result<Vec<String>, EngineError> {
    let _ = sink.refresh(concrete).await;
    let mut out = Vec::new();
    let mut v = sink
        .json_request(
            Method::Post,
            &format!("/{concrete}/_search?scroll=1m"),
            Some(json!({"size": 5000, "_source": false, "query": {"match_all": {}}})),
        )
        .await?;
    loop {
        let hits = v["hits"]["hits"].as_array().cloned().unwrap_or_default();
        if hits.is_empty() {
            break;
        }
        out.extend(
            hits.iter()
                .filter_map(|h| h["_id"].as_str().map(str::to_string)),
        );
        let Some(scroll_id) = v["_scroll_id"].as_str().map(str::to_string) else {
            break;
        };
        v = sink
            .json_request(
                Method::Post,
                "/_search/scroll",
                Some(json!({"scroll": "1m", "scroll_id": scroll_id})),
            )
            .await?;
    }
    Ok(out)
}

/// `ferry slot info`: the slot's state as (label, value) lines, or `None`
/// when it does not exist.
pub async fn slot_info(cfg: &Config) -> Result<Option<Vec<(String, String)>>, EngineError> {
    let params = PgParams::from_config(&cfg.source)?;
    let client = params.session().await?;
    Ok(client.slot_report(&cfg.source.slot).await?)
}

/// `ferry slot drop`: drops the slot when no session holds it. The next
/// `ferry run` creates a new slot and re-seeds every index.
pub async fn slot_drop(cfg: &Config) -> Result<bool, EngineError> {
    let params = PgParams::from_config(&cfg.source)?;
    let client = params.session().await?;
    let Some(info) = catalog::slot_info(&client, &cfg.source.slot).await? else {
        return Ok(false);
    };
    if info.active {
        return Err(EngineError::Stream(format!(
            "slot {:?} is in use (a running ferry holds it): stop ferry first",
            cfg.source.slot
        )));
    }
    client.drop_slot(&cfg.source.slot).await?;
    Ok(true)
}
