//! `ferry plan`: what applying a configuration (a start, a restart or
//! `systemctl reload`) will do, worked out read-only from the database
//! catalog and the cluster's indexes, the same things start-up compares.

use ferry_config::Config;
use ferry_opensearch::{concrete_name, Standing};
use ferry_postgres::catalog::{self, TypeResolver};
use ferry_postgres::{PgParams, SourceError};

use crate::setup::{full_identity_needs, index_plan, owner, plan_oids, plans};
use crate::EngineError;

/// One thing applying the configuration does (or leaves as it is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The alias serves the index this configuration describes, seeded.
    Unchanged {
        /// Configured index name (alias).
        index: String,
        /// The concrete index served.
        concrete: String,
    },
    /// No such index yet: it is created and seeded from the tables.
    Create {
        /// Configured index name.
        index: String,
        /// The concrete index created.
        concrete: String,
    },
    /// The index exists but its seeding did not complete: it resumes.
    ResumeSeed {
        /// Configured index name.
        index: String,
        /// The concrete index being seeded.
        concrete: String,
    },
    /// Mapping, settings or row selection differ from the served index: a
    /// new index is built in the background and the alias moves to it when
    /// it is complete (the old one is then deleted).
    Rebuild {
        /// Configured index name.
        index: String,
        /// The concrete index served now.
        from: String,
        /// The concrete index built.
        to: String,
        /// What differs.
        why: String,
    },
    /// Paused through the control API: nothing happens to it until it is
    /// resumed, which rebuilds it from the tables with this configuration.
    Paused {
        /// Configured index name (alias).
        index: String,
        /// The concrete index served, as it is.
        concrete: String,
    },
    /// An index that is not ferry's holds the name: start-up stops.
    Blocked {
        /// Configured index name.
        index: String,
    },
    /// In the cluster (created by this ferry) but no longer configured:
    /// nothing updates it any more; it stays until deleted.
    Unmaintained {
        /// The alias.
        index: String,
        /// The concrete index behind it.
        concrete: String,
    },
    /// The publication must change (what to run, or what ferry runs).
    Publication(String),
    /// A table's replica identity must change.
    ReplicaIdentity(String),
}

impl Step {
    /// Whether applying the configuration changes anything for this step.
    pub fn changes(&self) -> bool {
        !matches!(self, Step::Unchanged { .. } | Step::Paused { .. })
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Unchanged { index, concrete } => {
                write!(f, "index {index}: nothing to do (serves {concrete})")
            }
            Step::Paused { index, concrete } => write!(
                f,
                "index {index}: paused; nothing to do until it is resumed (searches use {concrete} as it is), then it is rebuilt from the tables with this configuration"
            ),
            Step::Create { index, concrete } => write!(
                f,
                "index {index}: create and seed {concrete} (copies every row, then streams)"
            ),
            Step::ResumeSeed { index, concrete } => write!(
                f,
                "index {index}: resume seeding {concrete} (its backfill did not complete)"
            ),
            Step::Rebuild {
                index,
                from,
                to,
                why,
            } => write!(
                f,
                "index {index}: rebuild in the background into {to} ({why}); searches use {from} until {to} is complete, then the alias moves and {from} is deleted"
            ),
            Step::Blocked { index } => write!(
                f,
                "index {index}: blocked: an index named {index:?} exists and is not a ferry alias; start-up stops until it is deleted or the index renamed"
            ),
            Step::Unmaintained { index, concrete } => write!(
                f,
                "index {index}: left unmaintained: {concrete} stays in the cluster but is no longer in the configuration, so nothing updates it (delete it with DELETE /{concrete} when unused)"
            ),
            Step::Publication(what) => write!(f, "publication: {what}"),
            Step::ReplicaIdentity(what) => write!(f, "replica identity: {what}"),
        }
    }
}

/// What applying `cfg` does, index by index (configuration order, then the
/// indexes it no longer names), then publication and replica identities.
/// Reads only: catalog queries and GET / HEAD requests.
pub async fn plan(cfg: &Config) -> Result<Vec<Step>, EngineError> {
    let params = PgParams::from_config(&cfg.source)?;
    let client = params.session().await?;
    let mut types = TypeResolver::default();
    let doc_plans = plans(&client, &mut types, cfg).await?;
    let sink = ferry_opensearch::Sink::from_config(cfg.sink())?;
    let owner = owner(cfg);
    let mut steps = Vec::new();
    for (ix, doc_plan) in cfg.indexes.iter().zip(&doc_plans) {
        let plan = index_plan(&ix.name, doc_plan, ix, &owner);
        let index = ix.name.clone();
        steps.push(match sink.standing(&plan).await? {
            Standing::Missing => Step::Create {
                index,
                concrete: concrete_name(&plan),
            },
            Standing::Foreign => Step::Blocked { index },
            Standing::Paused { concrete } => Step::Paused { index, concrete },
            Standing::Current {
                concrete,
                seeded: false,
                ..
            } => Step::ResumeSeed { index, concrete },
            Standing::Current {
                concrete,
                reindex_requested: true,
                ..
            } => Step::Rebuild {
                index,
                to: format!("a new generation of {}", concrete_name(&plan)),
                from: concrete,
                why: "`ferry reindex` asked for it".into(),
            },
            Standing::Current { concrete, .. } => Step::Unchanged { index, concrete },
            Standing::Other {
                serving,
                fields,
                target,
                building,
            } => {
                let mut why = field_changes(&fields, &plan.properties);
                if why.is_empty() {
                    why = "index settings, the ingest pipeline, relation joins, the routing column or the row selection (where, soft_delete, order_by, limit) changed".into();
                }
                if building {
                    why.push_str("; the unfinished rebuild resumes");
                }
                Step::Rebuild {
                    index,
                    from: serving,
                    to: target,
                    why,
                }
            }
        });
    }
    for (alias, concrete) in sink.owned_aliases(&owner).await? {
        if !cfg.indexes.iter().any(|ix| ix.name == alias) {
            steps.push(Step::Unmaintained {
                index: alias,
                concrete,
            });
        }
    }
    let oids = plan_oids(&doc_plans);
    let tables = client.table_names(&oids).await?;
    let managed = |manage: bool, key: &str, e: SourceError| match e {
        SourceError::Operator(m) if manage => Ok(format!(
            "ferry does this itself ({key} = true): {}",
            m.replace(&format!(" and {key} is false"), "")
        )),
        SourceError::Operator(m) => Ok(m),
        other => Err(other),
    };
    if let Err(e) =
        catalog::ensure_publication(&client, &cfg.source.publication, &tables, false).await
    {
        steps.push(Step::Publication(managed(
            cfg.source.manage_publication,
            "source.manage_publication",
            e,
        )?));
    }
    if let Err(e) = client
        .ensure_full_identities(&full_identity_needs(&doc_plans), false)
        .await
    {
        steps.push(Step::ReplicaIdentity(managed(
            cfg.source.manage_replica_identity,
            "source.manage_replica_identity",
            e,
        )?));
    }
    Ok(steps)
}

/// Fields added, removed or mapped differently, e.g.
/// `fields added: w; fields changed: v`; empty when the fields agree.
fn field_changes(
    served: &serde_json::Map<String, serde_json::Value>,
    wanted: &serde_json::Map<String, serde_json::Value>,
) -> String {
    let added: Vec<&str> = wanted
        .keys()
        .filter(|k| !served.contains_key(*k))
        .map(String::as_str)
        .collect();
    let removed: Vec<&str> = served
        .keys()
        .filter(|k| !wanted.contains_key(*k))
        .map(String::as_str)
        .collect();
    // The cluster adds defaults to what it stores: a wanted definition is
    // the same when each of its settings is stored with that value.
    let changed: Vec<&str> = wanted
        .iter()
        .filter(|(k, want)| served.get(*k).is_some_and(|have| !covers(have, want)))
        .map(|(k, _)| k.as_str())
        .collect();
    let mut parts = Vec::new();
    for (label, list) in [
        ("fields added", added),
        ("fields removed", removed),
        ("fields mapped differently", changed),
    ] {
        if !list.is_empty() {
            parts.push(format!("{label}: {}", list.join(", ")));
        }
    }
    parts.join("; ")
}

/// Whether `have` holds every setting of `want` with the same value.
fn covers(have: &serde_json::Value, want: &serde_json::Value) -> bool {
    match (have, want) {
        (serde_json::Value::Object(h), serde_json::Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| h.get(k).is_some_and(|hv| covers(hv, wv))),
        (h, w) => h == w || h.to_string().trim_matches('"') == w.to_string().trim_matches('"'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn field_changes_name_added_removed_and_remapped_fields_and_ignore_stored_defaults() {
        let served = json!({
            "id": {"type": "long"},
            "v": {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}},
            "gone": {"type": "long"},
            "n": {"type": "integer"},
        });
        let wanted = json!({
            "id": {"type": "long"},
            "v": {"type": "text"},
            "w": {"type": "keyword"},
            "n": {"type": "long"},
        });
        let got = field_changes(
            served.as_object().expect("object"),
            wanted.as_object().expect("object"),
        );
        assert_eq!(
            got,
            "fields added: w; fields removed: gone; fields mapped differently: n"
        );
        assert_eq!(
            field_changes(
                served.as_object().expect("object"),
                served.as_object().expect("object")
            ),
            ""
        );
    }
}
