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
use ferry_core::TableShape;
use ferry_opensearch::{IndexPlan, Sink};
use ferry_postgres::catalog::{self, TypeResolver};
use ferry_postgres::{PgParams, SourceError};
use tokio_postgres::Client;

use crate::{docplan, EngineError};

/// One configured index, resolved against the database and the cluster.
#[derive(Debug, Clone)]
pub struct IndexRuntime {
    /// Position in the config.
    pub pos: usize,
    /// The alias users query.
    pub alias: String,
    /// The concrete index written to.
    pub concrete: String,
    /// The root table's shape.
    pub shape: TableShape,
    /// How documents are built (root, relations, filters).
    pub plan: Node,
    /// Documents come straight from the replicated root row (no relations,
    /// filter, soft delete or renames); otherwise they are built by query.
    pub fast: bool,
    /// The concrete index the alias serves while this one is rebuilt: it
    /// receives every write too, until the alias moves.
    pub shadow: Option<String>,
}

/// Everything the streaming loop needs, ready.
pub struct Prepared {
    /// Source connection parameters.
    pub params: PgParams,
    /// An ordinary connection (catalog look-ups, re-reads).
    pub client: Client,
    /// Type kinds learned so far.
    pub types: TypeResolver,
    /// The sink.
    pub sink: Sink,
    /// The indexes, in config order.
    pub indexes: Vec<IndexRuntime>,
    /// Indexes to seed while streaming runs.
    pub seeding: Option<crate::seed::Seeding>,
}

/// Builds every index's document plan; errors name the config key.
async fn plans(
    client: &Client,
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

/// (schema, table) of every table any plan reads, for the publication.
async fn plan_tables(
    client: &Client,
    plans: &[Node],
) -> Result<Vec<(String, String)>, SourceError> {
    let mut oids: Vec<i64> = plans
        .iter()
        .flat_map(|p| p.usages().into_iter().map(|(oid, _)| i64::from(oid)))
        .collect();
    oids.sort_unstable();
    oids.dedup();
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid::int8 = ANY($1) ORDER BY 1, 2",
            &[&oids],
        )
        .await
        .map_err(|e| SourceError::from_pg("reading table names", e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Tables whose row-level security would hide rows from ferry's queries,
/// with what to grant.
async fn rls_problems(client: &Client, plans: &[Node]) -> Result<Vec<String>, SourceError> {
    let mut oids: Vec<i64> = plans
        .iter()
        .flat_map(|p| p.usages().into_iter().map(|(oid, _)| i64::from(oid)))
        .collect();
    oids.sort_unstable();
    oids.dedup();
    let rows = client
        .query(
            "SELECT n.nspname::text || '.' || c.relname::text, current_user::text \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, pg_roles r \
             WHERE r.rolname = current_user AND c.oid::int8 = ANY($1) AND c.relrowsecurity \
               AND NOT (r.rolbypassrls OR r.rolsuper) \
               AND (c.relowner <> r.oid OR c.relforcerowsecurity) ORDER BY 1",
            &[&oids],
        )
        .await
        .map_err(|e| SourceError::from_pg("checking row-level security", e))?;
    Ok(rows
        .iter()
        .map(|r| {
            let table: String = r.get(0);
            let role: String = r.get(1);
            format!(
                "table {table} has row-level security enabled: ferry's queries as role {role} may silently miss rows; \
                 run ALTER ROLE {role} BYPASSRLS, or add a policy letting {role} read every row"
            )
        })
        .collect())
}

/// Sets (or asks for) REPLICA IDENTITY FULL where resolving related changes
/// needs old values beyond the primary key.
async fn ensure_identities(
    client: &Client,
    plans: &[Node],
    manage: bool,
) -> Result<(), SourceError> {
    let mut done = std::collections::HashSet::new();
    for plan in plans {
        for (oid, column) in plan.needs_full_identity() {
            if !done.insert(oid) {
                continue;
            }
            let row = client
                .query_one(
                    "SELECT n.nspname::text, c.relname::text, c.relreplident::text FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid::int8 = $1",
                    &[&i64::from(oid)],
                )
                .await
                .map_err(|e| SourceError::from_pg("reading replica identities", e))?;
            let ident: String = row.get(2);
            if ident == "f" {
                continue;
            }
            let shape = TableShape {
                schema: row.get(0),
                name: row.get(1),
                oid,
                columns: Vec::new(),
                key: Vec::new(),
            };
            let why = format!("old values of {column:?} find the documents a changed row leaves");
            catalog::ensure_full_identity(client, &shape, &why, manage).await?;
        }
    }
    Ok(())
}

fn sink_for(cfg: &Config) -> Result<Sink, EngineError> {
    Ok(Sink::from_config(&cfg.sink)?)
}

/// Checks the database, the slot and the cluster, creates what is missing,
/// and backfills indexes that are not seeded.
pub async fn prepare(cfg: &Config, stats: &Arc<Stats>) -> Result<Prepared, EngineError> {
    let params = PgParams::from_config(&cfg.source)?;
    let client = params.connect().await?;
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

    let tables = plan_tables(&client, &plans).await?;
    for problem in rls_problems(&client, &plans).await? {
        // A policy may well grant every row: warn rather than refuse.
        tracing::warn!("{problem}");
    }
    ensure_identities(&client, &plans, cfg.source.manage_replica_identity).await?;
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
            jobs.push(crate::seed::Job {
                pos,
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
        seeding = Some(crate::seed::Seeding {
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
    let client = params.connect().await?;
    if let Err(e) = catalog::check_wal_level(&client).await {
        problems.push(e.to_string());
    }
    let mut types = TypeResolver::default();
    let mut plans_ok = Vec::new();
    for (i, ix) in cfg.indexes.iter().enumerate() {
        match docplan::build(&client, &mut types, i, ix).await {
            Ok(p) => plans_ok.push(p),
            Err(e) => problems.push(e.to_string()),
        }
    }
    let tables = plan_tables(&client, &plans_ok).await?;
    problems.extend(rls_problems(&client, &plans_ok).await?);
    if let Err(e) = ensure_identities(&client, &plans_ok, false).await {
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
