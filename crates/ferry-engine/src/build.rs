//! Building documents by query and resolving related changes to roots,
//! shared by the streaming worker, dead-letter retries and `verify`.

use std::collections::HashSet;

use ferry_core::plan::Probe;
use ferry_core::schema::doc_id;
use ferry_core::{DocOp, DocWrite, Lsn};
use ferry_postgres::Session;

use crate::index::IndexRuntime;
use crate::EngineError;

/// Builds the documents of these roots with one query; roots gone (or
/// filtered out) become deletes.
pub async fn build_docs(
    client: &Session,
    ix: &IndexRuntime,
    keys: &[Vec<String>],
    version: Lsn,
    writes: &mut Vec<DocWrite>,
) -> Result<(), EngineError> {
    let index = ix.pos;
    let plan = &ix.plan;
    let mut wanted: HashSet<String> = keys
        .iter()
        .map(|k| {
            let parts: Vec<&[u8]> = k.iter().map(|p| p.as_bytes()).collect();
            doc_id(&parts)
        })
        .collect();
    // A key that no row can have (`"foo"` for an integer key, from an id
    // written outside ferry) has no document: left out of the statement,
    // where its literal would fail the whole batch, it is deleted below.
    let kinds: Vec<Option<&ferry_core::TypeKind>> = plan
        .table
        .key
        .iter()
        .map(|k| {
            plan.table
                .columns
                .iter()
                .find(|c| &c.name == k)
                .map(|c| &c.kind)
        })
        .collect();
    let possible = |k: &&Vec<String>| {
        k.len() == kinds.len()
            && k.iter()
                .zip(&kinds)
                .all(|(part, kind)| kind.is_none_or(|kind| kind.admits(part)))
    };
    // Every key is possible (as any key read from the database): no copy.
    let keys: std::borrow::Cow<'_, [Vec<String>]> = if keys.iter().all(|k| possible(&k)) {
        keys.into()
    } else {
        keys.iter()
            .filter(possible)
            .cloned()
            .collect::<Vec<_>>()
            .into()
    };
    let mut malformed = 0usize;
    let rows = client.build_documents(plan, Some(&keys), &ix.alias).await?;
    rows.read_all(
        |row| match plan.document(|i| row.field(i), index, version) {
            Some(w) => {
                wanted.remove(&w.id);
                writes.push(w);
            }
            None => malformed += 1,
        },
    )
    .await?;
    if malformed > 0 {
        return Err(EngineError::Stream(format!(
            "building documents of index {}: {malformed} rows came back in an unexpected shape",
            ix.alias
        )));
    }
    for id in wanted {
        writes.push(DocWrite {
            index,
            id,
            version,
            op: DocOp::Delete,
            // Unknown here: the pipeline completes it for routed indexes.
            routing: None,
        });
    }
    Ok(())
}

/// Root keys whose documents a probe's values affect.
pub async fn resolve(
    client: &Session,
    ix: &IndexRuntime,
    probe: &Probe,
    values: HashSet<String>,
) -> Result<Vec<Vec<String>>, EngineError> {
    let plan = &ix.plan;
    // A direct child of the root pointing at the root's key: the values are the keys.
    if plan.probe_gives_root_keys(probe) {
        return Ok(values.into_iter().map(|v| vec![v]).collect());
    }
    let values: Vec<String> = values.into_iter().collect();
    let mut out = Vec::new();
    for chunk in values.chunks(1000) {
        out.extend(client.resolve_roots(plan, probe, chunk, &ix.alias).await?);
    }
    Ok(out)
}
