//! Index lifecycle: each configured name is an alias over a concrete index
//! whose name carries a hash of its mapping, so a changed mapping gets a new
//! concrete index and the alias moves only when it is complete.

use ferry_core::Lsn;
use opensearch::http::Method;
use serde_json::{json, Map, Value};

use crate::{Sink, SinkError};

/// What ferry wants an index to look like.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexPlan {
    /// The name users query (an alias).
    pub alias: String,
    /// Field mappings (`properties`).
    pub properties: Map<String, Value>,
    /// Index settings (may be empty).
    pub settings: Map<String, Value>,
    /// What selects the rows documents are built from and which related
    /// rows they hold (`where`, `soft_delete`, `order_by`, `limit`, and how
    /// each relation joins: `table`, `foreign_key`, `references`, `through`,
    /// by config key): part of the generation identity, so changing it rebuilds the
    /// index like a mapping change does. Empty leaves the hash as it was
    /// before this existed.
    pub selection: Map<String, Value>,
    /// Which ferry maintains the index (its slot and database, no
    /// credentials), recorded in `_meta` but not part of the hash: `ferry
    /// plan` finds the indexes a configuration no longer names by it.
    pub owner: String,
}

impl IndexPlan {
    /// A stable hash of mapping, settings and row selection (FNV-1a over
    /// canonical JSON).
    pub fn hash(&self) -> String {
        let mut identity = json!({"properties": self.properties, "settings": self.settings});
        if !self.selection.is_empty() {
            identity["selection"] = Value::Object(self.selection.clone());
        }
        let canonical = identity.to_string();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in canonical.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{:08x}", h >> 32)
    }

    /// The body the concrete index is created with: settings, and the
    /// mapping with ferry's `_meta` (alias, generation hash, owner, and the
    /// routing column when the index is routed).
    pub fn create_body(&self) -> Value {
        json!({
            "settings": self.settings,
            "mappings": {
                "_meta": {"ferry": self.meta()},
                "properties": self.properties,
            }
        })
    }

    /// ferry's `_meta` identifying the generation: alias, hash, owner, and
    /// the routing column when the index is routed.
    fn meta(&self) -> Value {
        let mut meta = json!({"alias": self.alias, "hash": self.hash(), "owner": self.owner});
        if let Some(r) = self.selection.get("routing") {
            meta["routing"] = r.clone();
        }
        meta
    }
}

/// What the cluster holds under an index's name ([`Sink::standing`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Standing {
    /// Neither an alias nor an index of that name exists.
    Missing,
    /// An index that is not a ferry alias holds the name.
    Foreign,
    /// The index is paused through the control API: the alias keeps
    /// serving `concrete` as it is, and ferry neither writes nor rebuilds it
    /// until it is resumed (then it is rebuilt from the tables).
    Paused {
        /// The concrete index served.
        concrete: String,
    },
    /// The alias serves the generation the plan describes.
    Current {
        /// The concrete index served.
        concrete: String,
        /// Its backfill completed.
        seeded: bool,
        /// `ferry reindex` asked for a rebuild.
        reindex_requested: bool,
    },
    /// The alias serves another generation (other mapping, settings or row
    /// selection).
    Other {
        /// The concrete index served.
        serving: String,
        /// Its field mappings.
        fields: Map<String, Value>,
        /// The concrete index the plan builds.
        target: String,
        /// `target` exists already (an unfinished rebuild resumes).
        building: bool,
    },
}

/// The concrete index name for a plan: `<alias>-<hash>`.
pub fn concrete_name(plan: &IndexPlan) -> String {
    format!("{}-{}", plan.alias, plan.hash())
}

/// The completed backfill's LSN recorded in ferry's `_meta`.
fn seeded_lsn(meta: &Value) -> Option<Lsn> {
    meta["seeded_lsn"]
        .as_str()
        .and_then(|s| s.parse::<Lsn>().ok())
}

/// Where an index stands after [`Sink::prepare_index`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedIndex {
    /// The concrete index documents are written to.
    pub concrete: String,
    /// The LSN its backfill completed at, if it was completed.
    pub seeded: Option<Lsn>,
    /// Another concrete index the alias points at now (an older mapping).
    pub previous: Option<String>,
    /// The routing column `previous` was written with (from its `_meta`;
    /// `None`: routed by id, as every index from before routing existed).
    pub previous_routing: Option<String>,
    /// Primary key of the last row an interrupted backfill made durable.
    pub checkpoint: Option<Vec<String>>,
    /// The oldest snapshot position whose rows the checkpointed part of
    /// the copy holds (`None` with no checkpoint; `Some(Lsn(0))`, unknown,
    /// for a checkpoint recorded before ferry kept it).
    pub checkpoint_version: Option<Lsn>,
    /// The index is paused (`_meta.ferry.paused`): nothing is written to
    /// it, `concrete` is the index the alias serves, and it is rebuilt when
    /// resumed.
    pub paused: bool,
}

// The rules below run over a few primitives (an index or alias exists, an
// alias's targets, an index's `_meta.ferry` and mapping, create, delete,
// point an alias, change `_meta`), each answered by the cluster or, for a
// log, by its catalog (`log/catalog.rs`).
impl Sink {
    /// Whether an index or alias named `name` exists.
    async fn exists(&self, name: &str) -> Result<bool, SinkError> {
        if let Some(log) = self.as_log() {
            return log.read(|c| c.exists(name));
        }
        let path = format!("/{name}");
        let (status, body) = self
            .request(Method::Head, &path, None, "application/json")
            .await?;
        match status {
            200 => Ok(true),
            404 => Ok(false),
            s => Err(SinkError::Status {
                status: s,
                what: format!("HEAD {path}"),
                body: crate::snippet(&body),
            }),
        }
    }

    /// Concrete indexes the alias points to now (empty when it does not exist).
    pub async fn alias_targets(&self, alias: &str) -> Result<Vec<String>, SinkError> {
        if let Some(log) = self.as_log() {
            return log.read(|c| c.alias_targets(alias));
        }
        let (status, body) = self
            .request(
                Method::Get,
                &format!("/_alias/{alias}"),
                None,
                "application/json",
            )
            .await?;
        if status == 404 {
            return Ok(Vec::new());
        }
        if !(200..300).contains(&status) {
            return Err(SinkError::Status {
                status,
                what: format!("GET /_alias/{alias}"),
                body: crate::snippet(&body),
            });
        }
        let v: Value = serde_json::from_slice(&body).map_err(|e| SinkError::Protocol {
            what: format!("GET /_alias/{alias}"),
            reason: e.to_string(),
        })?;
        Ok(v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default())
    }

    /// Whether the ingest pipeline `name` exists.
    pub async fn pipeline_exists(&self, name: &str) -> Result<bool, SinkError> {
        if let Some(log) = self.as_log() {
            return Err(SinkError::Conflict(format!(
                "ingest pipeline {name:?}: the log {} runs no pipelines; remove `pipeline` or send the index to a cluster",
                log.shown()
            )));
        }
        let path = format!(
            "/_ingest/pipeline/{}",
            percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC)
        );
        let (status, body) = self
            .request(Method::Get, &path, None, "application/json")
            .await?;
        match status {
            200..=299 => Ok(true),
            404 => Ok(false),
            _ => Err(SinkError::Status {
                status,
                what: format!("GET {path}"),
                body: crate::snippet(&body),
            }),
        }
    }

    /// Makes sure the concrete index for `plan` exists (created with its
    /// mapping before anything is written) and reports whether it is seeded.
    ///
    /// With `fresh` (the replication slot is new, so no existing copy can be
    /// trusted) the index is built anew: beside the one the alias serves
    /// (a new generation; the alias keeps serving the old one until the
    /// caller moves it), or in place of an unfinished, unserved copy.
    pub async fn prepare_index(
        &self,
        plan: &IndexPlan,
        fresh: bool,
    ) -> Result<PreparedIndex, SinkError> {
        let base = concrete_name(plan);
        let targets = self.alias_targets(&plan.alias).await?;
        if let Some(served) = targets.first() {
            let meta = self.ferry_meta(served).await?;
            if meta["paused"] == json!(true) {
                // Paused: keep serving it as it is, and drop any copy being
                // built, which lacks the changes skipped while paused.
                self.discard_unserved(&plan.alias, &targets).await?;
                return Ok(PreparedIndex {
                    concrete: served.clone(),
                    seeded: meta["seeded_lsn"].as_str().and_then(|s| s.parse().ok()),
                    previous: None,
                    previous_routing: None,
                    checkpoint: None,
                    checkpoint_version: None,
                    paused: true,
                });
            }
        }
        let mut concrete = base.clone();
        // The alias may serve a rebuilt generation of the same mapping
        // (`<alias>-<hash>-g<n>`, from `ferry reindex`).
        if let Some(cur) = targets
            .iter()
            .find(|t| **t == base || t.starts_with(&format!("{base}-g")))
        {
            concrete = cur.clone();
            if self.ferry_meta(cur).await?["reindex_requested"] == json!(true) {
                concrete = self.next_generation(&base, cur).await?;
                tracing::info!(alias = %plan.alias, from = %cur, to = %concrete, "rebuild requested: building a new index");
            }
        }
        if targets.is_empty() && self.exists(&plan.alias).await? {
            return Err(SinkError::Conflict(format!(
                "an index named {:?} already exists and is not an alias managed by ferry; \
                 delete it (DELETE /{}) or choose another index name",
                plan.alias, plan.alias
            )));
        }
        let mut exists = self.exists(&concrete).await?;
        if exists && fresh && targets.contains(&concrete) {
            // Searches use it: build the new copy beside it; the alias
            // moves when that copy is complete.
            let next = self.next_generation(&base, &concrete).await?;
            tracing::info!(alias = %plan.alias, serving = %concrete, building = %next, "replication slot is new: building the index anew beside the one searches use");
            concrete = next;
            exists = self.exists(&concrete).await?;
        }
        if exists && fresh {
            // Not served (an unfinished copy): nothing in it can be trusted.
            tracing::info!(index = %concrete, "replication slot is new: recreating the unfinished index from scratch");
            self.delete_index(&concrete).await?;
            exists = false;
        }
        let mut seeded = None;
        let mut checkpoint = None;
        let mut checkpoint_version = None;
        if exists {
            let meta = self.ferry_meta(&concrete).await?;
            seeded = seeded_lsn(&meta);
            checkpoint = meta["backfill_after"].as_array().map(|a| {
                a.iter()
                    .map(|v| v.as_str().unwrap_or_default().to_string())
                    .collect()
            });
            if checkpoint.is_some() {
                checkpoint_version = Some(
                    meta["backfill_version"]
                        .as_str()
                        .and_then(|s| s.parse::<Lsn>().ok())
                        .unwrap_or(Lsn(0)),
                );
            }
        } else {
            self.create_index(&concrete, plan.create_body()).await?;
            tracing::info!(index = %concrete, alias = %plan.alias, "created index");
        }
        let previous = targets.iter().find(|t| **t != concrete).cloned();
        let previous_routing = match &previous {
            Some(p) => self.ferry_meta(p).await?["routing"]
                .as_str()
                .map(str::to_string),
            None => None,
        };
        if targets.is_empty() {
            // First index for this name: let searches reach it at once.
            self.swap_alias(&plan.alias, &concrete, None).await?;
        }
        Ok(PreparedIndex {
            concrete,
            seeded,
            previous,
            previous_routing,
            checkpoint,
            checkpoint_version,
            paused: false,
        })
    }

    /// ferry's `_meta` of a concrete index's mapping (`Null` when none).
    async fn ferry_meta(&self, concrete: &str) -> Result<Value, SinkError> {
        Ok(self.mapping(concrete).await?["_meta"]["ferry"].clone())
    }

    /// A concrete index's mapping (`_meta`, `properties`).
    async fn mapping(&self, concrete: &str) -> Result<Value, SinkError> {
        if let Some(log) = self.as_log() {
            return log.read(|c| c.mapping(concrete));
        }
        let mut m = self
            .request_json(Method::Get, &format!("/{concrete}/_mapping"), None)
            .await?;
        Ok(m[concrete]["mappings"].take())
    }

    /// Creates a concrete index with `body` (settings and mappings).
    async fn create_index(&self, concrete: &str, body: Value) -> Result<(), SinkError> {
        if let Some(log) = self.as_log() {
            return log.change(|c| {
                c.create(concrete, &body);
                Ok(())
            });
        }
        self.request_json(Method::Put, &format!("/{concrete}"), Some(body))
            .await
            .map(|_| ())
    }

    /// Changes `_meta.ferry` of a concrete index with `change` (`Null`
    /// when there is none); a log does it in one locked change of its
    /// catalog, a cluster by reading the mapping and writing it back.
    async fn modify_meta(
        &self,
        concrete: &str,
        change: impl FnOnce(&mut Value) -> Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        if let Some(log) = self.as_log() {
            return log.modify_meta(concrete, change);
        }
        let mut ferry = self.ferry_meta(concrete).await?;
        change(&mut ferry)?;
        let body = json!({"_meta": {"ferry": ferry}});
        self.request_json(Method::Put, &format!("/{concrete}/_mapping"), Some(body))
            .await
            .map(|_| ())
    }

    /// Concrete indexes whose names start with `prefix`, with their
    /// `_meta.ferry` (none when the cluster answers the listing with an
    /// error: nothing matched).
    async fn metas_under(&self, prefix: &str) -> Result<Vec<(String, Value)>, SinkError> {
        if let Some(log) = self.as_log() {
            return log.read(|c| c.metas_under(prefix));
        }
        let (status, body) = self
            .request(
                Method::Get,
                &format!("/{prefix}*/_mapping"),
                None,
                "application/json",
            )
            .await?;
        if !(200..300).contains(&status) {
            return Ok(Vec::new());
        }
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok(v.as_object()
            .into_iter()
            .flatten()
            .map(|(name, m)| (name.clone(), m["mappings"]["_meta"]["ferry"].clone()))
            .collect())
    }

    /// The LSN a concrete index's backfill completed at (`None`: it did not
    /// complete).
    pub async fn seeded_lsn(&self, concrete: &str) -> Result<Option<Lsn>, SinkError> {
        Ok(seeded_lsn(&self.ferry_meta(concrete).await?))
    }

    /// The index to rebuild `cur` into: an unfinished earlier attempt if one
    /// exists (it resumes from its checkpoint), else a new generation name.
    async fn next_generation(&self, base: &str, cur: &str) -> Result<String, SinkError> {
        let mut names: Vec<String> = self
            .metas_under(&format!("{base}-g"))
            .await?
            .into_iter()
            .map(|(name, _)| name)
            .filter(|name| name != cur)
            .collect();
        names.sort();
        if let Some(last) = names.pop() {
            return Ok(last);
        }
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // Never the current one, even when it was made within this second.
        let after_cur = cur
            .strip_prefix(&format!("{base}-g"))
            .and_then(|n| n.parse::<u64>().ok())
            .map_or(0, |n| n + 1);
        Ok(format!("{base}-g{}", secs.max(after_cur)))
    }

    /// Asks the running ferry to rebuild `alias` into a new index: marks the
    /// index it serves; the rebuild starts when ferry restarts its pipeline
    /// (SIGHUP or a restart). Returns the index currently served.
    pub async fn request_reindex(&self, alias: &str) -> Result<String, SinkError> {
        self.update_served_meta(alias, |meta| {
            meta["reindex_requested"] = json!(true);
            Ok(())
        })
        .await
    }

    /// Rewrites `_meta.ferry` of the index `alias` serves with `change`;
    /// returns that index.
    async fn update_served_meta(
        &self,
        alias: &str,
        change: impl FnOnce(&mut Value) -> Result<(), SinkError>,
    ) -> Result<String, SinkError> {
        let cur = self
            .alias_targets(alias)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| SinkError::Conflict(format!("there is no index {alias:?} yet")))?;
        self.modify_meta(&cur, |meta| {
            if !meta.is_object() {
                return Err(SinkError::Conflict(format!(
                    "index {cur:?} behind {alias:?} was not created by ferry"
                )));
            }
            change(meta)
        })
        .await?;
        Ok(cur)
    }

    /// Where the cluster stands for `plan`, read-only (`ferry plan`): what
    /// [`Sink::prepare_index`] would find.
    pub async fn standing(&self, plan: &IndexPlan) -> Result<Standing, SinkError> {
        let base = concrete_name(plan);
        let targets = self.alias_targets(&plan.alias).await?;
        if targets.is_empty() {
            if self.exists(&plan.alias).await? {
                return Ok(Standing::Foreign);
            }
            return Ok(Standing::Missing);
        }
        if self.ferry_meta(&targets[0]).await?["paused"] == json!(true) {
            return Ok(Standing::Paused {
                concrete: targets[0].clone(),
            });
        }
        let current = targets
            .iter()
            .find(|t| **t == base || t.starts_with(&format!("{base}-g")));
        let serving = current.unwrap_or(&targets[0]).clone();
        let mapping = self.mapping(&serving).await?;
        let meta = &mapping["_meta"]["ferry"];
        if current.is_some() {
            return Ok(Standing::Current {
                seeded: meta["seeded_lsn"].is_string(),
                reindex_requested: meta["reindex_requested"] == json!(true),
                concrete: serving,
            });
        }
        let fields = mapping["properties"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        Ok(Standing::Other {
            building: self.exists(&base).await?,
            serving,
            fields,
            target: base,
        })
    }

    /// Aliases over indexes ferry created for `owner` (see
    /// [`IndexPlan::owner`]), as (alias, concrete index), sorted.
    pub async fn owned_aliases(&self, owner: &str) -> Result<Vec<(String, String)>, SinkError> {
        if let Some(log) = self.as_log() {
            return log.read(|c| c.owned(owner));
        }
        let all = self.request_json(Method::Get, "/_alias", None).await?;
        // ferry's concrete names are `<alias>-<8 hex>` (then `-g<n>`).
        let mut candidates: Vec<(String, String)> = Vec::new();
        for (index, v) in all.as_object().into_iter().flatten() {
            for alias in v["aliases"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(a, _)| a)
            {
                let hashed = index
                    .strip_prefix(alias.as_str())
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|rest| {
                        rest.len() >= 8 && rest[..8].bytes().all(|b| b.is_ascii_hexdigit())
                    });
                if hashed {
                    candidates.push((alias.clone(), index.clone()));
                }
            }
        }
        let mut owned = Vec::new();
        for chunk in candidates.chunks(50) {
            let names: Vec<&str> = chunk.iter().map(|(_, i)| i.as_str()).collect();
            let m = self
                .request_json(Method::Get, &format!("/{}/_mapping", names.join(",")), None)
                .await?;
            for (alias, index) in chunk {
                if m[index.as_str()]["mappings"]["_meta"]["ferry"]["owner"] == json!(owner) {
                    owned.push((alias.clone(), index.clone()));
                }
            }
        }
        owned.sort();
        Ok(owned)
    }

    /// Pauses (`true`) or resumes (`false`) `alias`, marking the index it
    /// serves. A paused index is neither written nor rebuilt by the running
    /// ferry once its pipeline restarts; pausing also requests a rebuild,
    /// which starts on resume, so the changes skipped while paused are read
    /// from the rows again. Returns the index served.
    pub async fn set_paused(&self, alias: &str, paused: bool) -> Result<String, SinkError> {
        self.update_served_meta(alias, |meta| {
            if (meta["paused"] == json!(true)) == paused {
                let state = if paused {
                    "already paused"
                } else {
                    "not paused"
                };
                return Err(SinkError::Conflict(format!("index {alias:?} is {state}")));
            }
            meta["paused"] = json!(paused);
            if paused {
                meta["reindex_requested"] = json!(true);
            }
            Ok(())
        })
        .await
    }

    /// Deletes every index ferry built for `alias` (`_meta.ferry.alias`)
    /// that the alias does not serve (`served`): unfinished copies.
    async fn discard_unserved(&self, alias: &str, served: &[String]) -> Result<(), SinkError> {
        for (name, meta) in self.metas_under(&format!("{alias}-")).await? {
            let mine = meta["alias"] == json!(alias);
            if mine && !served.contains(&name) {
                self.delete_index(&name).await?;
                tracing::info!(index = %name, %alias, "index paused: deleted the unfinished copy, which lacks the skipped changes");
            }
        }
        Ok(())
    }

    /// Records in the index's mapping metadata that its backfill completed at `lsn`.
    pub async fn mark_seeded(
        &self,
        plan: &IndexPlan,
        concrete: &str,
        lsn: Lsn,
    ) -> Result<(), SinkError> {
        let mut ferry = plan.meta();
        ferry["seeded_lsn"] = json!(lsn.to_string());
        self.put_ferry_meta(concrete, ferry).await
    }

    /// Records that a backfill made every row up to primary key `after`
    /// durable, from snapshots no older than `since` (the oldest version
    /// those rows carry: a copy resumed across restarts holds rows of each
    /// run's snapshot, and a change between them must still reach it).
    pub async fn set_checkpoint(
        &self,
        plan: &IndexPlan,
        concrete: &str,
        after: &[String],
        since: Lsn,
    ) -> Result<(), SinkError> {
        let mut ferry = plan.meta();
        ferry["backfill_after"] = json!(after);
        ferry["backfill_version"] = json!(since.to_string());
        self.put_ferry_meta(concrete, ferry).await
    }

    /// Writes `_meta.ferry` of `concrete` (the cluster replaces `_meta`
    /// whole), keeping the operator's marks already there: a pause and a
    /// requested rebuild, set through the control API or `ferry reindex`.
    async fn put_ferry_meta(&self, concrete: &str, mut ferry: Value) -> Result<(), SinkError> {
        self.modify_meta(concrete, |now| {
            for mark in ["paused", "reindex_requested"] {
                if now[mark] == json!(true) {
                    ferry[mark] = json!(true);
                }
            }
            *now = ferry;
            Ok(())
        })
        .await
    }

    /// Updates dynamic index settings (`null` resets one to its default);
    /// a log has none to update.
    pub async fn update_settings(&self, concrete: &str, settings: Value) -> Result<(), SinkError> {
        if self.is_log() {
            return Ok(());
        }
        self.request_json(
            Method::Put,
            &format!("/{concrete}/_settings"),
            Some(json!({ "index": settings })),
        )
        .await
        .map(|_| ())
    }

    /// Points `alias` at `concrete` atomically, removing it from `previous`.
    pub async fn swap_alias(
        &self,
        alias: &str,
        concrete: &str,
        previous: Option<&str>,
    ) -> Result<(), SinkError> {
        if let Some(log) = self.as_log() {
            return log.change(|c| {
                c.point(alias, concrete);
                Ok(())
            });
        }
        let mut actions = vec![json!({"add": {"index": concrete, "alias": alias}})];
        if let Some(p) = previous {
            actions.push(json!({"remove": {"index": p, "alias": alias}}));
        }
        self.request_json(
            Method::Post,
            "/_aliases",
            Some(json!({ "actions": actions })),
        )
        .await
        .map(|_| ())
    }

    /// Removes every document of a concrete index, keeping the index (TRUNCATE).
    /// A log cannot ([`Sink::is_log`]).
    pub async fn delete_all(&self, concrete: &str) -> Result<(), SinkError> {
        if let Some(log) = self.as_log() {
            return Err(SinkError::Conflict(format!(
                "the log {} cannot remove the documents of {concrete:?} in place; it is rebuilt into a new generation instead",
                log.shown()
            )));
        }
        self.refresh(concrete).await?;
        self.request_json(
            Method::Post,
            &format!("/{concrete}/_delete_by_query?conflicts=proceed&refresh=true"),
            Some(json!({"query": {"match_all": {}}})),
        )
        .await
        .map(|_| ())
    }

    /// Adds field mappings to a concrete index (new columns).
    pub async fn extend_mapping(
        &self,
        concrete: &str,
        properties: Map<String, Value>,
    ) -> Result<(), SinkError> {
        if let Some(log) = self.as_log() {
            return log.extend(concrete, properties);
        }
        self.request_json(
            Method::Put,
            &format!("/{concrete}/_mapping"),
            Some(json!({ "properties": properties })),
        )
        .await
        .map(|_| ())
    }

    /// Deletes a concrete index.
    pub async fn delete_index(&self, concrete: &str) -> Result<(), SinkError> {
        if let Some(log) = self.as_log() {
            return log.change(|c| {
                c.delete(concrete);
                Ok(())
            });
        }
        self.request_json(Method::Delete, &format!("/{concrete}"), None)
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_changes_with_mapping() {
        let mut p = IndexPlan {
            alias: "users".into(),
            properties: Map::new(),
            settings: Map::new(),
            selection: Map::new(),
            owner: String::new(),
        };
        let h1 = p.hash();
        assert_eq!(h1, p.hash());
        p.properties.insert("id".into(), json!({"type": "long"}));
        assert_ne!(h1, p.hash());
        assert!(concrete_name(&p).starts_with("users-"));
    }

    #[test]
    fn hash_changes_with_row_selection_and_ignores_an_empty_one() {
        let mut p = IndexPlan {
            alias: "users".into(),
            properties: Map::new(),
            settings: Map::new(),
            selection: Map::new(),
            owner: String::new(),
        };
        // The pre-selection hash of the same mapping: no rebuild on upgrade.
        assert_eq!(p.hash(), "48a1a86c");
        p.selection.insert("where".into(), json!("active"));
        let h1 = p.hash();
        p.selection.insert("where".into(), json!("not active"));
        assert_ne!(h1, p.hash());
    }
}
