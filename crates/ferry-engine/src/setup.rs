//! Start-up: everything between reading the config and streaming.
//!
//! Order matters for consistency. The slot is created (exporting a
//! snapshot) *before* any row is copied, and every copied chunk reads a
//! snapshot that contains that one, so every change after the slot's
//! consistent point is in the slot and every change before it is in the
//! copy. Backfill writes carry the consistent point as their version and
//! streamed writes carry their commit LSN, which is higher, so a late copy
//! never overwrites a streamed change (ARCHITECTURE.md, "Parallel seeding").

use std::sync::Arc;

use ferry_config::{Config, SlotLostPolicy};
use ferry_core::plan::Node;
use ferry_core::stats::{IndexState, Stats};
use ferry_opensearch::{IndexPlan, PreparedIndex, Sink};
use ferry_postgres::catalog::{self, TypeResolver};
use ferry_postgres::{PgParams, Session, SourceError};

use crate::index::{IndexId, IndexRuntime, RunSink};
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
    /// The sinks, by position (`cfg.sinks.list`'s order).
    pub sinks: Vec<RunSink>,
    /// The indexes, in config order.
    pub indexes: Vec<IndexRuntime>,
    /// Indexes to seed while streaming runs.
    pub seeding: Option<Seeding>,
    /// Leaf partitions of the partitioned tables the indexes read, as
    /// (table OID, leaf OID), read before any snapshot: the worker rebuilds
    /// when they change.
    pub partitions: Vec<(u32, u32)>,
}

/// Builds every index's document plan; errors name the config key.
pub(crate) async fn plans(
    client: &Session,
    types: &mut TypeResolver,
    cfg: &Config,
) -> Result<Vec<Node>, SourceError> {
    let mut out = Vec::with_capacity(cfg.indexes.len());
    let mut names: Vec<&str> = Vec::new();
    for ix in &cfg.indexes {
        // Errors name the index's position in the file, also when the run
        // fanned it out to several sinks (`Config::fan_out`).
        let at = match names.iter().position(|n| *n == ix.name) {
            Some(at) => at,
            None => {
                names.push(&ix.name);
                names.len() - 1
            }
        };
        out.push(docplan::build(client, types, at, ix).await?);
    }
    Ok(out)
}

/// Who maintains the indexes of `cfg` (recorded in their `_meta`): the slot
/// and the source database, without user, password or parameters.
pub(crate) fn owner(cfg: &Config) -> String {
    let source = match url::Url::parse(&cfg.source.url) {
        Ok(u) => format!(
            "{}:{}{}",
            u.host_str().unwrap_or_default(),
            u.port().unwrap_or(5432),
            u.path()
        ),
        Err(_) => String::new(),
    };
    format!("{}@{source}", cfg.source.slot)
}

/// The index the alias serves during a rebuild, which gets a copy of every
/// write, if the copies can be placed there: a copy carries the routing of
/// the index being built, so an index the alias serves that was routed
/// otherwise (or by id) would get a second copy of a moved document and
/// miss deletes. It is then left as it is until the alias moves.
fn shadow_of(alias: &str, prepared: &PreparedIndex, routing: Option<&str>) -> Option<String> {
    let previous = prepared.previous.clone()?;
    if prepared.previous_routing.as_deref() == routing {
        return Some(previous);
    }
    tracing::warn!(
        index = %alias,
        serving = %previous,
        from = prepared.previous_routing.as_deref().unwrap_or("the document id"),
        to = routing.unwrap_or("the document id"),
        "the routing changed: the index searches use now is not updated while its replacement seeds; searches see changes again when the alias moves"
    );
    None
}

/// What ferry wants index `alias`'s concrete index to look like.
pub(crate) fn index_plan(
    alias: &str,
    plan: &Node,
    ix: &ferry_config::IndexConfig,
    owner: &str,
) -> IndexPlan {
    IndexPlan {
        owner: owner.to_string(),
        alias: alias.to_string(),
        properties: plan.properties(),
        settings: ix
            .settings
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .chain(
                ix.pipeline
                    .iter()
                    .map(|p| ("index.default_pipeline".to_string(), p.clone().into())),
            )
            .collect(),
        selection: {
            let mut s = selection(ix);
            if plan.reads_cast_sensitive_text() {
                // Built before values were read in their output form, its
                // documents hold other ids or values: rebuild it once.
                s.insert("text".into(), "output".into());
            }
            s
        },
    }
}

/// The config keys that choose which rows (and related rows) documents are
/// built from, with their values: `where`, `soft_delete`, `order_by`,
/// `limit` at every level, how each relation and count joins (`table`,
/// `foreign_key`, `references`, `through`), each count's `where`, each
/// computed field's SQL, and the routing column. Keyed
/// by the relations' field paths, so reordering relations changes nothing.
fn selection(ix: &ferry_config::IndexConfig) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::Value;
    fn put(out: &mut serde_json::Map<String, Value>, key: String, v: Option<Value>) {
        if let Some(v) = v {
            out.insert(key, v);
        }
    }
    /// How a relation or count joins: its table, foreign key and referenced column.
    fn join(
        out: &mut serde_json::Map<String, Value>,
        at: &str,
        table: &str,
        foreign_key: &str,
        references: &Option<String>,
    ) {
        put(out, format!("{at}table"), Some(Value::from(table)));
        put(
            out,
            format!("{at}foreign_key"),
            Some(Value::from(foreign_key)),
        );
        put(
            out,
            format!("{at}references"),
            references.clone().map(Value::from),
        );
    }
    fn counts(
        out: &mut serde_json::Map<String, Value>,
        at: &str,
        list: &[ferry_config::CountConfig],
    ) {
        for c in list {
            let at = format!("{at}{}.", c.field);
            join(out, &at, &c.table, &c.foreign_key, &c.references);
            put(out, format!("{at}where"), c.filter.clone().map(Value::from));
        }
    }
    fn computed(
        out: &mut serde_json::Map<String, Value>,
        at: &str,
        list: &[ferry_config::ComputedConfig],
    ) {
        for c in list {
            put(
                out,
                format!("{at}computed[{}]", c.field),
                Some(Value::from(c.sql.clone())),
            );
        }
    }
    fn relations(
        out: &mut serde_json::Map<String, Value>,
        at: &str,
        list: &[ferry_config::RelationConfig],
    ) {
        for r in list {
            let at = format!("{at}{}.", r.field);
            join(out, &at, &r.table, &r.foreign_key, &r.references);
            if let Some(t) = &r.through {
                put(
                    out,
                    format!("{at}through.table"),
                    Some(Value::from(t.table.clone())),
                );
                put(
                    out,
                    format!("{at}through.other_key"),
                    Some(Value::from(t.other_key.clone())),
                );
            }
            put(out, format!("{at}where"), r.filter.clone().map(Value::from));
            put(
                out,
                format!("{at}soft_delete"),
                r.soft_delete.clone().map(Value::from),
            );
            put(
                out,
                format!("{at}order_by"),
                r.order_by.clone().map(Value::from),
            );
            put(out, format!("{at}limit"), r.limit.map(Value::from));
            computed(out, &at, &r.computed);
            relations(out, &at, &r.has_many);
            relations(out, &at, &r.belongs_to);
            counts(out, &at, &r.count);
        }
    }
    let mut out = serde_json::Map::new();
    put(&mut out, "where".into(), ix.filter.clone().map(Value::from));
    put(
        &mut out,
        "soft_delete".into(),
        ix.soft_delete.clone().map(Value::from),
    );
    put(
        &mut out,
        "routing".into(),
        ix.routing.clone().map(Value::from),
    );
    computed(&mut out, "", &ix.computed);
    relations(&mut out, "", &ix.has_many);
    relations(&mut out, "", &ix.belongs_to);
    counts(&mut out, "", &ix.count);
    out
}

/// OIDs of every table any plan reads.
pub(crate) fn plan_oids(plans: &[Node]) -> Vec<u32> {
    let mut oids: Vec<u32> = plans
        .iter()
        .flat_map(|p| p.usages().into_iter().map(|(oid, _)| oid))
        .collect();
    oids.sort_unstable();
    oids.dedup();
    oids
}

/// Tables (OID, column) whose old values resolving related changes needs.
pub(crate) fn full_identity_needs(plans: &[Node]) -> Vec<(u32, String)> {
    plans.iter().flat_map(|p| p.needs_full_identity()).collect()
}

/// Connects to every sink of `cfg` (not yet asked anything).
pub(crate) fn sinks_for(cfg: &Config) -> Result<Vec<RunSink>, EngineError> {
    cfg.sinks
        .list
        .iter()
        .map(|s| {
            Ok(RunSink {
                sink: Sink::from_config(&s.config)?,
                dead_letter_index: s.config.dead_letter_index.clone(),
            })
        })
        .collect()
}

/// Checks the database, the slot and the cluster, creates what is missing,
/// and backfills indexes that are not seeded.
pub async fn prepare(cfg: &Config, stats: &Arc<Stats>) -> Result<Prepared, EngineError> {
    let params = PgParams::from_config(&cfg.source)?;
    let client = params.session().await?;
    stats
        .source_ok
        .store(true, std::sync::atomic::Ordering::Relaxed);
    catalog::check_wal_level(&client).await?;
    let mut types = TypeResolver::default();
    let plans = plans(&client, &mut types, cfg).await?;
    let names: Vec<(String, Option<String>)> = cfg
        .indexes
        .iter()
        .map(|i| (i.name.clone(), cfg.sinks.label(cfg.sink_of(i))))
        .collect();
    let index_stats = stats.register(&names);
    let mut sinks = sinks_for(cfg)?;
    let own = match cfg.sinks.named {
        true => stats.register_sinks(&cfg.sinks.names()),
        false => stats.register_sinks(&[]),
    };
    for (pos, s) in sinks.iter_mut().enumerate() {
        let label = cfg.sinks.label(pos);
        s.sink = s
            .sink
            .clone()
            .observed_by(stats.clone(), own.get(pos).cloned());
        let sink = &s.sink;
        let name = label.unwrap_or_default();
        let version = sink.version().await?;
        sink.claim().await?;
        if sink.is_log() {
            tracing::info!(sink = %sink.url(), name, "writing bulk requests to a log, not to a search cluster");
        } else {
            tracing::info!(sink = %sink.url(), name, %version, "connected to the search cluster");
        }
        if let Some(missing) = missing_pipelines(cfg, pos, sink).await?.into_iter().next() {
            return Err(EngineError::Stream(missing));
        }
    }

    let oids = plan_oids(&plans);
    let tables = client.table_names(&oids).await?;
    // A copy under a narrowing policy would silently hold a subset of what
    // the stream delivers: refuse.
    if let Some(hides) = client.row_security_hides(&oids).await?.into_iter().next() {
        return Err(SourceError::RowSecurity(hides).into());
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

    let partitions = client.partition_leaves(&oids).await?;
    let slot = &cfg.source.slot;
    let existing = catalog::slot_info(&client, slot).await?;
    let mut new_slot = None;
    match &existing {
        Some(info) => match catalog::check_slot(info, slot, params.dbname()) {
            Err(e @ SourceError::SlotInvalidated { .. })
                if cfg.source.on_slot_lost == SlotLostPolicy::Reseed =>
            {
                tracing::warn!(error = %e, slot, "dropping the invalidated slot: source.on_slot_lost = \"reseed\" recreates it and rebuilds every index beside the live one");
                client.drop_slot(slot).await?;
                new_slot =
                    Some(catalog::create_slot(&params, slot, &cfg.source.publication).await?);
            }
            Err(e) => return Err(e.into()),
            Ok(()) => {
                tracing::info!(slot, confirmed_flush = %info.confirmed_flush, "resuming replication slot");
            }
        },
        None => {
            // No slot while an alias already serves an index: it was lost
            // (a first start has nothing to serve yet).
            let mut served = Vec::new();
            for ix in &cfg.indexes {
                let sink = &sinks[cfg.sink_of(ix)].sink;
                if !sink.alias_targets(&ix.name).await?.is_empty() {
                    served.push(ix.name.clone());
                }
            }
            if !served.is_empty() {
                let lost = SourceError::SlotDropped {
                    what: format!("starting from replication slot {slot:?}"),
                    detail: format!(
                        "it does not exist although ferry already serves {}",
                        served.join(", ")
                    ),
                };
                if cfg.source.on_slot_lost == SlotLostPolicy::Stop {
                    return Err(lost.into());
                }
                tracing::warn!(error = %lost, "source.on_slot_lost = \"reseed\": creating the slot and rebuilding every index beside the live one");
            }
            let created = catalog::create_slot(&params, slot, &cfg.source.publication).await?;
            new_slot = Some(created);
        }
    }

    let mut indexes = Vec::with_capacity(plans.len());
    let mut jobs = Vec::new();
    let owner = owner(cfg);
    for (pos, (ix, doc_plan)) in cfg.indexes.iter().zip(plans).enumerate() {
        let plan = index_plan(&ix.name, &doc_plan, ix, &owner);
        let sink_pos = cfg.sink_of(ix);
        let prepared = sinks[sink_pos]
            .sink
            .prepare_index(&plan, new_slot.is_some())
            .await?;
        let seeded = new_slot.is_none() && prepared.seeded.is_some();
        if prepared.paused {
            tracing::info!(index = %ix.name, concrete = %prepared.concrete, "index is paused: not written until resumed (then rebuilt)");
            if let Some(st) = index_stats.get(pos) {
                st.set_state(IndexState::Paused);
            }
        } else if seeded {
            tracing::info!(index = %ix.name, concrete = %prepared.concrete, seeded_at = ?prepared.seeded, "index is seeded");
            if let Some(st) = index_stats.get(pos) {
                st.set_state(IndexState::Streaming);
            }
        } else if let Some(st) = index_stats.get(pos) {
            st.set_state(match prepared.previous {
                Some(_) => IndexState::Rebuilding,
                None => IndexState::Seeding,
            });
        }
        let shadow = if seeded {
            None
        } else {
            shadow_of(&ix.name, &prepared, doc_plan.routing.as_deref())
        };
        indexes.push(IndexRuntime {
            pos,
            sink: sink_pos,
            alias: ix.name.clone(),
            concrete: prepared.concrete,
            shape: doc_plan.table.clone(),
            fast: !ix.is_relational(),
            plan: doc_plan,
            shadow,
            paused: prepared.paused,
        });
        if !seeded && !prepared.paused {
            jobs.push(Job {
                index: IndexId(pos),
                plan,
                previous: prepared.previous,
                resume_after: if new_slot.is_some() {
                    None
                } else {
                    prepared.checkpoint
                },
                holds_since: if new_slot.is_some() {
                    None
                } else {
                    prepared.checkpoint_version
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
        // Import the exported snapshot only to read what it contains (the
        // floor every chunk snapshot is checked against), then let it go:
        // no snapshot is held longer than one chunk.
        let snap_client = catalog::open_snapshot(&params, Some(&snapshot_slot.snapshot)).await?;
        let floor = snap_client.current_snapshot().await?;
        snap_client.end_snapshot().await;
        drop(snap_client);
        drop(snapshot_slot);
        seeding = Some(Seeding {
            params: params.clone(),
            floor,
            version,
            jobs,
        });
    }
    Ok(Prepared {
        params,
        client,
        types,
        sinks,
        indexes,
        seeding,
        partitions,
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
    problems.extend(
        client
            .row_security_hides(&oids)
            .await?
            .into_iter()
            .map(|h| SourceError::RowSecurity(h).to_string()),
    );
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
    // The WAL cost of ferry's slot and of every slot sharing the server.
    for s in client.slots_wal().await? {
        let whose = if s.name == cfg.source.slot {
            "ferry's slot"
        } else {
            "other slot on this server"
        };
        tracing::info!(
            "{whose} {:?} ({}{}, {}, wal_status {}) retains {} bytes ({}) of WAL",
            s.name,
            s.kind,
            if s.database.is_empty() {
                String::new()
            } else {
                format!(" on database {}", s.database)
            },
            if s.active { "active" } else { "inactive" },
            if s.wal_status.is_empty() {
                "-"
            } else {
                &s.wal_status
            },
            s.retained_bytes,
            s.retained,
        );
    }
    for (pos, s) in sinks_for(cfg)?.iter().enumerate() {
        let sink = &s.sink;
        let name = cfg.sinks.label(pos).unwrap_or_default();
        match sink.version().await {
            Ok(v) => {
                tracing::info!(sink = %sink.url(), name, version = %v, "sink usable");
                problems.extend(missing_pipelines(cfg, pos, sink).await?);
            }
            Err(e) if cfg.sinks.named => problems.push(format!("sink.{name}: {e}")),
            Err(e) => problems.push(e.to_string()),
        }
    }
    Ok(problems)
}

/// One problem per `[[index]] pipeline` sink `pos` does not have, with the fix.
async fn missing_pipelines(
    cfg: &Config,
    pos: usize,
    sink: &Sink,
) -> Result<Vec<String>, EngineError> {
    let mut out = Vec::new();
    for (i, ix) in cfg.indexes.iter().enumerate() {
        if !cfg.sinks_of(ix).contains(&pos) {
            continue;
        }
        if let Some(p) = &ix.pipeline {
            if !sink.pipeline_exists(p).await? {
                let (key, cluster) = match cfg.sinks.label(pos) {
                    Some(s) => (
                        format!("index {:?}", ix.name),
                        format!("the cluster of sink.{s}"),
                    ),
                    None => (format!("index[{i}]"), "the cluster".into()),
                };
                out.push(format!(
                    "{key}.pipeline: ingest pipeline {p:?} does not exist in {cluster}: \
                     create it (PUT _ingest/pipeline/{p}) or remove the key"
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(toml: &str) -> ferry_config::IndexConfig {
        let cfg = Config::from_toml(&format!(
            "[source]\nurl = \"postgres://u@h/db\"\nslot = \"s\"\npublication = \"p\"\n[sink]\nurl = \"http://h:9200\"\n{toml}"
        ))
        .expect("config");
        cfg.indexes[0].clone()
    }

    #[test]
    fn row_selection_names_every_filter_and_join_by_its_relation_path() {
        let ix = index(
            "[[index]]\nname = \"users\"\ntable = \"users\"\nwhere = \"active\"\n\
             [[index.has_many]]\nfield = \"orders\"\ntable = \"orders\"\nforeign_key = \"user_id\"\norder_by = \"id desc\"\nlimit = 5\n\
             [[index.has_many.count]]\nfield = \"n\"\ntable = \"items\"\nforeign_key = \"order_id\"\nwhere = \"qty > 0\"\n",
        );
        let got = serde_json::Value::Object(selection(&ix));
        assert_eq!(
            got,
            serde_json::json!({
                "where": "active",
                "orders.table": "orders",
                "orders.foreign_key": "user_id",
                "orders.order_by": "id desc",
                "orders.limit": 5,
                "orders.n.table": "items",
                "orders.n.foreign_key": "order_id",
                "orders.n.where": "qty > 0",
            })
        );
        let tags = index(
            "[[index]]\nname = \"users\"\ntable = \"users\"\n\
             [[index.has_many]]\nfield = \"tags\"\ntable = \"tags\"\nforeign_key = \"user_id\"\nreferences = \"uid\"\n\
             through = { table = \"user_tags\", other_key = \"tag_id\" }\n",
        );
        assert_eq!(
            serde_json::Value::Object(selection(&tags)),
            serde_json::json!({
                "tags.table": "tags",
                "tags.foreign_key": "user_id",
                "tags.references": "uid",
                "tags.through.table": "user_tags",
                "tags.through.other_key": "tag_id",
            })
        );
        let plain = index("[[index]]\nname = \"users\"\ntable = \"users\"\n");
        assert!(
            selection(&plain).is_empty(),
            "no selection keeps the old hash"
        );
    }
}
