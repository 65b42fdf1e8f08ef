//! Operator tools that run beside (or without) a live pipeline:
//! dead-letter management and the drift check.
//!
//! Both are safe against a live deployment and run in bounded memory (a
//! page of rows, documents or entries at a time). A dead-letter retry writes
//! with the WAL position read before the rows were; a verify repair with the
//! consistent point of the snapshot it read the rows in. Either way a newer
//! streamed write wins over the tool's.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use ferry_config::Config;
use ferry_core::schema::{doc_id, split_doc_id};
use ferry_core::{DocOp, DocWrite, Lsn};
use ferry_opensearch::{DeadLetter, DocRef, Hit, Sink};
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
    let sink = Sink::from_config(cfg.sink())?;
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
            sink: 0,
            alias: ix.name.clone(),
            concrete,
            shape: plan.table.clone(),
            fast: !ix.is_relational(),
            plan,
            shadow: None,
            paused: false,
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

/// Pages through the dead letters (of one index, or all), `page` entries
/// at a time, handing each to `each`; returns how many there were.
pub async fn dead_letters_list(
    cfg: &Config,
    index: Option<&str>,
    page: usize,
    mut each: impl FnMut(&DeadLetter),
) -> Result<usize, EngineError> {
    let sink = Sink::from_config(cfg.sink())?;
    let mut scroll = sink
        .dead_letter_pages(&cfg.sink().dead_letter_index, index, page)
        .await?;
    let mut n = 0;
    while let Some(hits) = sink.next_page(&mut scroll).await? {
        for h in &hits {
            each(&DeadLetter::from_hit(h));
        }
        n += hits.len();
    }
    Ok(n)
}

/// Deletes dead letters (of one index, or all), a page at a time; returns
/// how many.
pub async fn dead_letters_purge(
    cfg: &Config,
    index: Option<&str>,
    page: usize,
) -> Result<usize, EngineError> {
    let sink = Sink::from_config(cfg.sink())?;
    let dl = &cfg.sink().dead_letter_index;
    // The scroll reads the entries as they were when it opened, so removing
    // each page as it comes never skips one.
    let mut scroll = sink.dead_letter_pages(dl, index, page).await?;
    let mut n = 0;
    while let Some(hits) = sink.next_page(&mut scroll).await? {
        let letters: Vec<DeadLetter> = hits.iter().map(DeadLetter::from_hit).collect();
        sink.remove_dead_letters(dl, &letters).await?;
        n += letters.len();
    }
    Ok(n)
}

/// Rebuilds every dead-lettered document from its current row and writes
/// it, a page of entries at a time; healed entries are removed, the others
/// keep their (new) reason. Returns (healed, still failing).
pub async fn dead_letters_retry(
    cfg: &Config,
    index: Option<&str>,
    page: usize,
) -> Result<(usize, usize), EngineError> {
    let ops = open(cfg).await?;
    let dl = &cfg.sink().dead_letter_index;
    let mut scroll = ops.sink.dead_letter_pages(dl, index, page).await?;
    let (mut healed_n, mut failing_n) = (0, 0);
    while let Some(hits) = ops.sink.next_page(&mut scroll).await? {
        let letters: Vec<DeadLetter> = hits.iter().map(DeadLetter::from_hit).collect();
        let (healed, failing) = retry_letters(&ops, dl, &letters).await?;
        healed_n += healed;
        failing_n += failing;
    }
    Ok((healed_n, failing_n))
}

/// Retries one page of dead letters; returns (healed, still failing).
async fn retry_letters(
    ops: &Ops,
    dl: &str,
    letters: &[DeadLetter],
) -> Result<(usize, usize), EngineError> {
    let version = current_lsn(&ops.client).await?;
    let mut healed = Vec::new();
    let mut failing = 0;
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
                failing += 1;
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
    Ok((healed.len(), failing))
}

/// How `ferry verify` runs.
#[derive(Debug, Clone, Copy)]
pub struct VerifyOptions {
    /// Check about this many random rows and documents instead of all.
    pub sample: Option<usize>,
    /// Rewrite (or delete) the documents that differ.
    pub repair: bool,
    /// Rows (and documents) read per statement and per request.
    pub page_size: usize,
}

/// A kind of difference between a document and its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drift {
    /// A row without its document.
    Missing,
    /// A document that differs from its row.
    Different,
    /// A document without a row (or whose row is filtered out).
    Extra,
}

impl Drift {
    /// The word the report uses.
    pub fn label(self) -> &'static str {
        match self {
            Drift::Missing => "missing",
            Drift::Different => "different",
            Drift::Extra => "extra",
        }
    }
}

/// Ids kept per kind of drift for the report; the counts are exact.
const EXAMPLES: usize = 20;

/// What `ferry verify` found in one index.
#[derive(Debug, Default, Clone)]
pub struct VerifyReport {
    /// The index (alias).
    pub index: String,
    /// Documents compared.
    pub checked: u64,
    /// Rows without a document.
    pub missing: u64,
    /// Documents that differ from their rows.
    pub different: u64,
    /// Documents without a row.
    pub extra: u64,
    /// Documents rewritten or deleted by `--repair` (and seen right after).
    pub repaired: u64,
    /// Differences `--repair` cannot fix in place: the cluster holds a
    /// version beyond the WAL position (written outside ferry), which a
    /// repair cannot outbid without making every later streamed change of
    /// that document lose. `ferry reindex` rebuilds the index instead.
    pub unrepairable: u64,
    /// The first ids of each kind of drift (at most 20 each).
    pub examples: Vec<(Drift, String)>,
    /// The first unrepairable ids (at most 20).
    pub unrepairable_examples: Vec<String>,
}

impl VerifyReport {
    /// True when nothing differs.
    pub fn is_clean(&self) -> bool {
        self.drift() == 0
    }

    /// Differences found.
    pub fn drift(&self) -> u64 {
        self.missing + self.different + self.extra
    }

    fn record(&mut self, kind: Drift, id: &str) {
        let count = match kind {
            Drift::Missing => &mut self.missing,
            Drift::Different => &mut self.different,
            Drift::Extra => &mut self.extra,
        };
        *count += 1;
        if self.examples.iter().filter(|(k, _)| *k == kind).count() < EXAMPLES {
            self.examples.push((kind, id.to_string()));
        }
    }

    fn record_unrepairable(&mut self, id: &str) {
        self.unrepairable += 1;
        if self.unrepairable_examples.len() < EXAMPLES {
            self.unrepairable_examples.push(id.to_string());
        }
    }
}

/// How long a difference must persist before it counts: a live pipeline
/// may simply not have caught up yet.
const SETTLE: Duration = Duration::from_secs(2);

/// How often the walk logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Compares documents with their rows (every row and every document, or a
/// random sample of both) in bounded memory: the table is walked in key
/// order a page at a time (keyset pagination) and each page's documents are
/// fetched by id; then the index is scrolled a page at a time and each
/// page's ids are looked up in the table, which finds documents whose rows
/// are gone. Differences are checked again after a couple of seconds, so
/// in-flight changes on a live deployment are not reported; with `repair`
/// the persistent ones are rewritten under a consistent snapshot (see
/// ARCHITECTURE.md, "verify and repair").
pub async fn verify(
    cfg: &Config,
    index: Option<&str>,
    opts: VerifyOptions,
) -> Result<Vec<VerifyReport>, EngineError> {
    let ops = open(cfg).await?;
    let mut reports = Vec::new();
    for ix in selected(&ops, index)? {
        let mut check = Check {
            cfg,
            ops: &ops,
            ix,
            opts: VerifyOptions {
                page_size: opts.page_size.max(1),
                ..opts
            },
            report: VerifyReport {
                index: ix.alias.clone(),
                ..Default::default()
            },
            suspects: Vec::new(),
            since: None,
        };
        match opts.sample {
            Some(n) => check.sample(n).await?,
            None => {
                check.walk_table().await?;
                check.walk_index().await?;
            }
        }
        check.settle(true).await?;
        reports.push(check.report);
    }
    Ok(reports)
}

/// One index's check in progress.
struct Check<'a> {
    cfg: &'a Config,
    ops: &'a Ops,
    ix: &'a IndexRuntime,
    opts: VerifyOptions,
    report: VerifyReport,
    /// Stored documents (id, routing) that differed at first sight, at
    /// most about a page of them.
    suspects: Vec<DocRef>,
    /// When the oldest suspect was found.
    since: Option<std::time::Instant>,
}

impl Check<'_> {
    /// Whether the index's writes go through an ingest pipeline.
    fn piped(&self) -> bool {
        self.cfg.indexes[self.ix.pos].pipeline.is_some()
    }

    /// Walks the table in key order, a page of roots per statement.
    async fn walk_table(&mut self) -> Result<(), EngineError> {
        let page = self.opts.page_size;
        let started = std::time::Instant::now();
        let mut logged = started;
        let mut after: Option<Vec<String>> = None;
        loop {
            let rows = self
                .ops
                .client
                .copy_chunk(&self.ix.plan, after.as_deref(), page)
                .await?;
            let mut expected = Vec::with_capacity(page);
            let mut last_key = None;
            let mut malformed = 0usize;
            let mut n = 0usize;
            rows.read_all(|row| {
                n += 1;
                if n == page {
                    last_key = Some(self.ix.plan.row_key(|i| row.field(i)));
                }
                match self
                    .ix
                    .plan
                    .document(|i| row.field(i), self.ix.pos, Lsn::ZERO)
                {
                    Some(doc) => expected.push(doc),
                    None => malformed += 1,
                }
            })
            .await?;
            if malformed > 0 {
                return Err(EngineError::Stream(format!(
                    "verifying index {}: {malformed} rows came back in an unexpected shape",
                    self.ix.alias
                )));
            }
            self.report.checked += expected.len() as u64;
            self.compare(&expected).await?;
            self.settle(false).await?;
            if logged.elapsed() >= PROGRESS_EVERY {
                logged = std::time::Instant::now();
                tracing::info!(
                    index = %self.ix.alias,
                    rows = self.report.checked,
                    rows_per_s = (self.report.checked as f64 / started.elapsed().as_secs_f64()) as u64,
                    drift = self.report.drift(),
                    "verify: walking the table"
                );
            }
            match last_key {
                Some(k) => after = Some(k),
                None => return Ok(()),
            }
        }
    }

    /// Scrolls the index a page at a time and looks each page's ids up in
    /// the table: documents whose rows are gone (or filtered out) are extra.
    async fn walk_index(&mut self) -> Result<(), EngineError> {
        let sink = &self.ops.sink;
        let mut scroll = sink
            .scroll(
                &self.ix.concrete,
                json!({"match_all": {}}),
                self.opts.page_size,
                false,
            )
            .await?;
        let started = std::time::Instant::now();
        let mut logged = started;
        let mut seen = 0u64;
        while let Some(hits) = sink.next_page(&mut scroll).await? {
            seen += hits.len() as u64;
            let keys: Vec<Vec<String>> = hits
                .iter()
                .map(|h| split_doc_id(&h.id, self.ix.plan.table.key.len()))
                .collect();
            let mut rebuilt = Vec::new();
            build::build_docs(&self.ops.client, self.ix, &keys, Lsn::ZERO, &mut rebuilt).await?;
            let stored: Vec<DocRef> = hits.iter().map(Hit::doc_ref).collect();
            self.suspect_unplaced(&stored, &rebuilt);
            self.settle(false).await?;
            if logged.elapsed() >= PROGRESS_EVERY {
                logged = std::time::Instant::now();
                tracing::info!(
                    index = %self.ix.alias,
                    documents = seen,
                    documents_per_s = (seen as f64 / started.elapsed().as_secs_f64()) as u64,
                    drift = self.report.drift(),
                    "verify: walking the index"
                );
            }
        }
        Ok(())
    }

    /// Compares about `n` random rows and `n` random documents (at most
    /// 10,000, the cluster's result window) with each other.
    async fn sample(&mut self, n: usize) -> Result<(), EngineError> {
        let table_keys = self.ops.client.sample_keys(&self.ix.plan.table, n).await?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let docs = self
            .ops
            .sink
            .sample_docs(&self.ix.concrete, n.min(10_000), seed)
            .await?;
        let width = self.ix.plan.table.key.len();
        let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for k in table_keys {
            let parts: Vec<&[u8]> = k.iter().map(|p| p.as_bytes()).collect();
            keys.insert(doc_id(&parts), k);
        }
        for (id, _) in &docs {
            keys.entry(id.clone())
                .or_insert_with(|| split_doc_id(id, width));
        }
        self.report.checked = keys.len() as u64;
        let keys: Vec<Vec<String>> = keys.into_values().collect();
        for chunk in keys.chunks(self.opts.page_size) {
            let mut expected = Vec::new();
            build::build_docs(&self.ops.client, self.ix, chunk, Lsn::ZERO, &mut expected).await?;
            self.compare(&expected).await?;
            // The sampled documents of this chunk, as stored.
            let ids: HashSet<&str> = expected.iter().map(|w| w.id.as_str()).collect();
            let stored: Vec<DocRef> = docs
                .iter()
                .filter(|(id, _)| ids.contains(id.as_str()))
                .cloned()
                .collect();
            self.suspect_unplaced(&stored, &expected);
            self.settle(false).await?;
        }
        Ok(())
    }

    /// Suspects each `stored` document that `built` (the writes its rows
    /// give) does not place: its row is gone (or filtered out), or it is
    /// stored under a routing its row does not give.
    fn suspect_unplaced(&mut self, stored: &[DocRef], built: &[DocWrite]) {
        let expected: HashMap<&str, &DocWrite> = built.iter().map(|w| (w.id.as_str(), w)).collect();
        for (id, routing) in stored {
            if !expected
                .get(id.as_str())
                .is_some_and(|w| places(w, routing))
            {
                self.suspect((id.clone(), routing.clone()));
            }
        }
    }

    fn suspect(&mut self, doc: DocRef) {
        if self.suspects.is_empty() {
            self.since = Some(std::time::Instant::now());
        }
        self.suspects.push(doc);
    }

    /// The stored documents the writes `of` address (by id and routing).
    async fn stored(&self, of: &[DocWrite]) -> Result<BTreeMap<DocRef, Hit>, EngineError> {
        let docs: Vec<(&str, Option<&str>)> = of
            .iter()
            .map(|w| (w.id.as_str(), w.routing.as_deref()))
            .collect();
        Ok(self
            .ops
            .sink
            .get_documents(&self.ix.concrete, &docs)
            .await?)
    }

    /// Marks the documents of `expected` that differ from the cluster.
    async fn compare(&mut self, expected: &[DocWrite]) -> Result<(), EngineError> {
        let actual = self.stored(expected).await?;
        for w in expected {
            let doc = doc_ref(w);
            if differs(w, actual.get(&doc).map(|h| &h.source), self.piped()) {
                self.suspect(doc);
            }
        }
        Ok(())
    }

    /// Checks the suspects again once there is a page of them (or, with
    /// `all`, whatever is left), at least [`SETTLE`] after the oldest was
    /// found.
    async fn settle(&mut self, all: bool) -> Result<(), EngineError> {
        if self.suspects.is_empty() || (!all && self.suspects.len() < self.opts.page_size) {
            return Ok(());
        }
        if let Some(since) = self.since.take() {
            tokio::time::sleep(SETTLE.saturating_sub(since.elapsed())).await;
        }
        let docs = std::mem::take(&mut self.suspects);
        self.recheck(&docs).await
    }

    /// Rebuilds the suspects and compares them again; what still differs is
    /// drift, and with `repair` it is rewritten (or deleted) and read back.
    async fn recheck(&mut self, docs: &[DocRef]) -> Result<(), EngineError> {
        let width = self.ix.plan.table.key.len();
        let ids: BTreeSet<&str> = docs.iter().map(|(id, _)| id.as_str()).collect();
        let keys: Vec<Vec<String>> = ids.iter().map(|id| split_doc_id(id, width)).collect();
        let mut built = Vec::new();
        // A repair is written with the consistent point of a snapshot the
        // rows are read in (a temporary slot's): every change in the
        // snapshot has a version at most that point, every change after it
        // a higher one, so the repair can neither lose to an older stream
        // write nor overwrite a newer one.
        let version = if self.opts.repair {
            let params = PgParams::from_config(&self.cfg.source)?;
            let slot = catalog::seed_snapshot(
                &params,
                &self.cfg.source.slot,
                &self.cfg.source.publication,
            )
            .await?;
            let at = slot.consistent_point;
            let snap = catalog::open_snapshot(&params, Some(&slot.snapshot)).await?;
            // The snapshot is imported: the session that exported it may go.
            drop(slot);
            for chunk in keys.chunks(1000) {
                build::build_docs(&snap, self.ix, chunk, at, &mut built).await?;
            }
            snap.end_snapshot().await;
            at
        } else {
            let at = current_lsn(&self.ops.client).await?;
            for chunk in keys.chunks(1000) {
                build::build_docs(&self.ops.client, self.ix, chunk, at, &mut built).await?;
            }
            at
        };
        // What each suspect copy should be: the built document when it
        // belongs at the copy's routing, else a delete of that copy (its
        // row is gone, or routes the document elsewhere).
        let built: HashMap<&str, &DocWrite> = built.iter().map(|w| (w.id.as_str(), w)).collect();
        let mut again: Vec<DocWrite> = Vec::with_capacity(docs.len());
        let mut checked = HashSet::new();
        for (id, routing) in docs {
            if !checked.insert((id, routing)) {
                continue;
            }
            match built.get(id.as_str()) {
                Some(w) if places(w, routing) => again.push((*w).clone()),
                _ => again.push(DocWrite {
                    index: self.ix.pos,
                    id: id.clone(),
                    version,
                    op: DocOp::Delete,
                    routing: routing.clone(),
                }),
            }
        }
        let actual = self.stored(&again).await?;
        let now = current_lsn(&self.ops.client).await?;
        let mut fixes = Vec::new();
        for w in again {
            let have = actual.get(&doc_ref(&w));
            let seen = have.map(|h| h.version).unwrap_or(0);
            // ferry's own writes carry LSNs no later than `now`; a document
            // newer than our read but not from the future is a live write
            // that overtook the check: not drift.
            if seen > version.0 && seen <= now.0 {
                continue;
            }
            let kind = match (&w.op, have) {
                (DocOp::Index(_), None) => Drift::Missing,
                (DocOp::Index(_), Some(h)) if differs(&w, Some(&h.source), self.piped()) => {
                    Drift::Different
                }
                (DocOp::Delete, Some(_)) => Drift::Extra,
                _ => continue,
            };
            self.report.record(kind, &w.id);
            if !self.opts.repair {
                continue;
            }
            if seen > now.0 {
                // Written outside ferry with a version from the future:
                // outbidding it would make the stream's later writes lose.
                self.report.record_unrepairable(&w.id);
                continue;
            }
            fixes.push(w);
        }
        if fixes.is_empty() {
            return Ok(());
        }
        self.ops.sink.write(&fixes, &self.ops.names).await?;
        // Read the repairs back: a version the write could not beat (a
        // tombstone or document from the future) leaves the drift in place.
        let after = self.stored(&fixes).await?;
        let now = current_lsn(&self.ops.client).await?;
        for w in &fixes {
            let have = after.get(&doc_ref(w));
            let overtaken = have.is_some_and(|h| h.version > version.0 && h.version <= now.0);
            if overtaken || !differs(w, have.map(|h| &h.source), self.piped()) {
                self.report.repaired += 1;
            } else {
                self.report.record_unrepairable(&w.id);
            }
        }
        Ok(())
    }
}

/// The stored document `w` addresses.
fn doc_ref(w: &DocWrite) -> DocRef {
    (w.id.clone(), w.routing.clone())
}

/// Whether `w` writes the document stored under `routing` (rather than its
/// row being gone, or routing it elsewhere).
fn places(w: &DocWrite, routing: &Option<String>) -> bool {
    matches!(w.op, DocOp::Index(_)) && w.routing == *routing
}

/// Whether the stored document `have` differs from the write ferry would
/// make. With `own_fields_only` (an index with an ingest pipeline, which
/// may add fields) fields ferry does not write are not compared.
fn differs(w: &DocWrite, have: Option<&Value>, own_fields_only: bool) -> bool {
    match (&w.op, have) {
        (DocOp::Index(_), None) => true,
        (DocOp::Index(body), Some(doc)) => match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(want)) if own_fields_only => {
                want.iter().any(|(k, v)| doc.get(k) != Some(v))
            }
            Ok(want) => &want != doc,
            Err(_) => true,
        },
        (DocOp::Delete, have) => have.is_some(),
    }
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
