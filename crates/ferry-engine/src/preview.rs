//! `ferry preview`: the documents ferry would write for some roots, built by
//! the same statements and encoded as the same `_bulk` lines as a real run,
//! without touching the cluster. Read-only on PostgreSQL too.

use ferry_config::Config;
use ferry_core::schema::split_doc_id;
use ferry_core::{DocWrite, Lsn};
use ferry_opensearch::{concrete_name, encode_bulk};
use ferry_postgres::catalog::TypeResolver;
use ferry_postgres::PgParams;
use serde_json::Value;

use crate::index::IndexRuntime;
use crate::{build, docplan, setup, EngineError};

/// Which roots to preview.
#[derive(Debug, Clone)]
pub enum Roots {
    /// These document ids (a composite key's parts joined as in `_id`).
    Ids(Vec<String>),
    /// The first `n` rows in key order.
    First(usize),
}

/// What `ferry preview` prints.
#[derive(Debug)]
pub struct Preview {
    /// The `_bulk` body ferry would send: an action line and a source line
    /// per document, a delete action for an id whose row is gone or
    /// filtered out.
    pub bulk: Vec<u8>,
    /// The body ferry creates the concrete index with (settings, mapping).
    pub index_body: Value,
    /// The concrete index name this configuration maps to.
    pub concrete: String,
}

/// Builds the documents of `roots` for the configured index `name`, with
/// the server's current WAL position as their version.
pub async fn preview(cfg: &Config, name: &str, roots: Roots) -> Result<Preview, EngineError> {
    let (pos, ix) = cfg
        .indexes
        .iter()
        .enumerate()
        .find(|(_, ix)| ix.name == name)
        .ok_or_else(|| {
            EngineError::Stream(format!(
                "no [[index]] named {name:?} in the configuration (names: {})",
                cfg.indexes
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    let client = PgParams::from_config(&cfg.source)?.session().await?;
    let mut types = TypeResolver::default();
    let plan = docplan::build(&client, &mut types, pos, ix).await?;
    let index_plan = setup::index_plan(&ix.name, &plan, ix, &setup::owner(cfg));
    let concrete = concrete_name(&index_plan);
    let version = client.current_wal_lsn().await?;
    let runtime = IndexRuntime {
        pos,
        sink: 0,
        alias: ix.name.clone(),
        concrete: concrete.clone(),
        shape: plan.table.clone(),
        fast: !ix.is_relational(),
        plan,
        shadow: None,
        paused: false,
    };
    let mut writes = Vec::new();
    match roots {
        Roots::Ids(ids) => {
            let parts = runtime.plan.table.key.len();
            let keys: Vec<Vec<String>> = ids.iter().map(|id| split_doc_id(id, parts)).collect();
            build::build_docs(&client, &runtime, &keys, version, &mut writes).await?;
            // Keep the order the ids were asked in.
            writes.sort_by_key(|w: &DocWrite| ids.iter().position(|id| *id == w.id));
        }
        Roots::First(n) => first_rows(&client, &runtime, n, version, &mut writes).await?,
    }
    let mut names = vec![String::new(); pos + 1];
    names[pos] = concrete.clone();
    let mut bulk = Vec::new();
    encode_bulk(&writes.iter().collect::<Vec<_>>(), &names, &mut bulk);
    Ok(Preview {
        bulk,
        index_body: index_plan.create_body(),
        concrete,
    })
}

/// The documents of the first `n` roots in key order, read the way a
/// backfill reads a chunk.
async fn first_rows(
    client: &ferry_postgres::Session,
    ix: &IndexRuntime,
    n: usize,
    version: Lsn,
    writes: &mut Vec<DocWrite>,
) -> Result<(), EngineError> {
    if n == 0 {
        return Ok(());
    }
    let rows = client.copy_chunk(&ix.plan, None, n).await?;
    let mut malformed = 0usize;
    rows.read_all(
        |row| match ix.plan.document(|i| row.field(i), ix.pos, version) {
            Some(w) => writes.push(w),
            None => malformed += 1,
        },
    )
    .await?;
    if malformed > 0 {
        return Err(EngineError::Stream(format!(
            "previewing index {}: {malformed} rows came back in an unexpected shape",
            ix.alias
        )));
    }
    Ok(())
}
