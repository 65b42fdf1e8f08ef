//! Start-up: everything between reading the config and streaming.
//!
//! Order matters for consistency. The slot is created (exporting a
//! snapshot) *before* any row is copied, and the copy reads under that
//! snapshot, so every change after the copy's view is in the slot and every
//! change before it is in the copy. Backfill writes carry the slot's
//! consistent point as their version and streamed writes carry their commit
//! LSN, which is higher, so a late copy never overwrites a streamed change.

use std::sync::Arc;

use ferry_config::Config;
use ferry_core::plan::Node;
use ferry_core::stats::{IndexState, Stats};
use ferry_opensearch::{IndexPlan, Sink};
use ferry_postgres::catalog::{self, TypeResolver};
use ferry_postgres::{PgParams, Session, SourceError};

use crate::index::{IndexId, IndexRuntime};
use crate::seed::{Job, Seeding};
use crate::{docplan, EngineError};

/// Everything the streaming loop needs, ready.
pub struct Prepared {
    /// Source connection parameters.
    pub params: PgParams,
    /// A query session (catalog look-ups, re-reads).
    pub client: Session,
    /// Type kinds learned so far.
    pub types: TypeResolver,
    /// The sink.
    pub sink: Sink,
    /// The indexes, in config order.
    pub indexes: Vec<IndexRuntime>,
    /// Indexes to seed while streaming runs.
    pub seeding: Option<Seeding>,
}

/// Builds every index's document plan; errors name the config key.
async fn plans(
    client: &Session,
    types: &mut TypeResolver,
    cfg: &Config,
) -> Result<Vec<Node>, SourceError> {
    let mut out = Vec::with_capacity(cfg.indexes.len());
    for (i, ix) in cfg.indexes.iter().enumerate() {
        out.push(docplan::build(client, types, i, ix).await?);
    }
    Ok(out)
}

fn index_plan(alias: &str, plan: &Node, ix: &ferry_config::IndexConfig) -> IndexPlan {
    IndexPlan {
        alias: alias.to_string(),
        properties: plan.properties(),
        settings: ix
            .settings
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// OIDs of every table any plan reads.
fn plan_oids(plans: &[Node]) -> Vec<u32> {
    let mut oids: Vec<u32> = plans
        .iter()
        .flat_map(|p| p.usages().into_iter().map(|(oid, _)| oid))
        .collect();
    oids.sort_unstable();
    oids.dedup();
    oids
}

/// Tables (OID, column) whose old values resolving related changes needs.
fn full_identity_needs(plans: &[Node]) -> Vec<(u32, String)> {
    plans.iter().flat_map(|p| p.needs_full_identity()).collect()
}

fn sink_for(cfg: &Config) -> Result<Sink, EngineError> {
    Ok(Sink::from_config(&cfg.sink)?)
}

/// Checks the database, the slot and the cluster, creates what is missing,
/// and backfills indexes that are not seeded.
pub async fn prepare(cfg: &Config, stats: &Arc<Stats>) -> Result<Prepared, EngineError> {
    let params = PgParams::from_config(&cfg.source)?;
    let client = params.session().await?;
    catalog::check_wal_level(&client).await?;
    let mut types = TypeResolver::default();
    let plans = plans(&client, &mut types, cfg).await?;
    let names: Vec<String> = cfg.indexes.iter().map(|i| i.name.clone()).collect();
    let index_stats = stats.register(&names);
    let sink = sink_for(cfg)?;
    let version = sink.version().await?;
    stats
        .sink_ok
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(sink = %sink.url(), %version, "connected to the search cluster");

    let oids = plan_oids(&plans);
    let tables = client.table_names(&oids).await?;
    for problem in client.row_security_problems(&oids).await? {
        // A policy may well grant every row: warn rather than refuse.
        tracing::warn!("{problem}");
    }
    client
        .ensure_full_identities(
            &full_identity_needs(&plans),
            cfg.source.manage_replica_identity,
        )
        .await?;
    catalog::ensure_publication(
        &client,
        &cfg.source.publication,
        &tables,
        cfg.source.manage_publication,
    )
    .await?;

    let slot = &cfg.source.slot;
    let existing = catalog::slot_info(&client, slot).await?;
    let mut new_slot = None;
    match &existing {
        Some(info) => {
            catalog::check_slot(info, slot, params.dbname())?;
            tracing::info!(slot, confirmed_flush = %info.confirmed_flush, "resuming replication slot");
        }
        None => {
            let created = catalog::create_slot(&params, slot, &cfg.source.publication).await?;
            new_slot = Some(created);
        }
    }

    let mut indexes = Vec::with_capacity(plans.len());
    let mut jobs = Vec::new();
    for (pos, (ix, doc_plan)) in cfg.indexes.iter().zip(plans).enumerate() {
        let plan = index_plan(&ix.name, &doc_plan, ix);
        let prepared = sink.prepare_index(&plan, new_slot.is_some()).await?;
        let seeded = new_slot.is_none() && prepared.seeded.is_some();
        if seeded {
            tracing::info!(index = %ix.name, concrete = %prepared.concrete, seeded_at = ?prepared.seeded, "index is seeded");
            if let Some(st) = index_stats.get(pos) {
                st.set_state(IndexState::Streaming);
            }
        } else if let Some(st) = index_stats.get(pos) {
            st.set_state(IndexState::Backfilling);
        }
        indexes.push(IndexRuntime {
            pos,
            alias: ix.name.clone(),
            concrete: prepared.concrete,
            shape: doc_plan.table.clone(),
            fast: !ix.is_relational(),
            plan: doc_plan,
            shadow: if seeded {
                None
            } else {
                prepared.previous.clone()
            },
        });
        if !seeded {
            jobs.push(Job {
                index: IndexId(pos),
                plan,
                previous: prepared.previous,
                resume_after: if new_slot.is_some() {
                    None
                } else {
                    prepared.checkpoint
                },
            });
        }
    }

    let mut seeding = None;
    if !jobs.is_empty() {
        // The snapshot the copy reads: the one exported with a new slot, or
        // a temporary slot's when the main slot already streams.
        let (snapshot_slot, version) = match new_slot.take() {
            Some(s) => {
                let at = s.consistent_point;
                (s, at)
            }
            None => {
                let s = catalog::seed_snapshot(&params, slot, &cfg.source.publication).await?;
                let at = s.consistent_point;
                (s, at)
            }
        };
        let snap_client = catalog::open_snapshot(&params, Some(&snapshot_slot.snapshot)).await?;
        // The snapshot is imported: the session that exported it may go.
        drop(snapshot_slot);
        seeding = Some(Seeding {
            client: snap_client,
            version,
            jobs,
        });
    }
    Ok(Prepared {
        params,
        client,
        types,
        sink,
        indexes,
        seeding,
    })
}

/// `ferry check`: every read-only check, returning the problems found (empty = healthy).
pub async fn check(cfg: &Config) -> Result<Vec<String>, EngineError> {
    let mut problems = Vec::new();
    let params = PgParams::from_config(&cfg.source)?;
    let client = params.session().await?;
    if let Err(e) = catalog::check_wal_level(&client).await {
        problems.push(e.to_string());
    }
    let mut types = TypeResolver::default();
    let mut plans_ok = Vec::new();
    let mut names_ok = Vec::new();
    for (i, ix) in cfg.indexes.iter().enumerate() {
        match docplan::build(&client, &mut types, i, ix).await {
            Ok(p) => {
                plans_ok.push(p);
                names_ok.push(ix.name.as_str());
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    let oids = plan_oids(&plans_ok);
    let tables = client.table_names(&oids).await?;
    problems.extend(client.row_security_problems(&oids).await?);
    // Advice, not a problem: relations whose rows are found without an index.
    for (plan, name) in plans_ok.iter().zip(&names_ok) {
        let lookups = plan.lookups();
        for (i, create) in client.unindexed_lookups(&lookups).await? {
            let l = &lookups[i];
            tracing::warn!(
                "index {name}, relation {}: no index on the column its rows are found by, so every batch reads the whole table; \
                 add one with: {create}",
                l.field
            );
        }
    }
    if let Err(e) = client
        .ensure_full_identities(&full_identity_needs(&plans_ok), false)
        .await
    {
        if cfg.source.manage_replica_identity {
            tracing::info!(
                "{e} (ferry run will do this itself: source.manage_replica_identity is true)"
            );
        } else {
            problems.push(e.to_string());
        }
    }
    // Publication coverage, read-only.
    if let Err(e) =
        catalog::ensure_publication(&client, &cfg.source.publication, &tables, false).await
    {
        if cfg.source.manage_publication {
            tracing::info!(
                "{e} (ferry run will do this itself: source.manage_publication is true)"
            );
        } else {
            problems.push(e.to_string());
        }
    }
    match catalog::slot_info(&client, &cfg.source.slot).await? {
        Some(info) => {
            if let Err(e) = catalog::check_slot(&info, &cfg.source.slot, params.dbname()) {
                problems.push(e.to_string());
            }
        }
        None => {
            tracing::info!(slot = %cfg.source.slot, "slot does not exist yet; ferry run creates it")
        }
    }
    let sink = sink_for(cfg)?;
    match sink.version().await {
        Ok(v) => tracing::info!(sink = %sink.url(), version = %v, "search cluster reachable"),
        Err(e) => problems.push(e.to_string()),
    }
    Ok(problems)
}
