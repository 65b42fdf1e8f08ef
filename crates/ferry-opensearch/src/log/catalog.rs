//! What a cluster would know about a log's indexes, kept beside the log:
//! each concrete index ferry created (its `_meta.ferry`, mapping and
//! settings) and the index each alias serves. The index lifecycle
//! (`index.rs`) reads and changes it as it does the cluster's, so a log
//! has the same generations, seeded marks, checkpoints, pauses and
//! rebuilds. Consumers find the generation an alias serves here.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// The indexes of a log and its aliases.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Catalog {
    /// Alias → the concrete index it serves.
    aliases: BTreeMap<String, String>,
    /// Concrete index → what it was created with.
    indexes: BTreeMap<String, Stored>,
}

/// One concrete index.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    /// `_meta.ferry`.
    meta: Value,
    /// The mapping's `properties`.
    properties: Map<String, Value>,
    /// The settings it was created with.
    settings: Value,
}

impl Catalog {
    /// Reads the catalog kept at `path` (empty when there is none yet).
    pub(crate) fn load(path: &Path) -> io::Result<Catalog> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} is not ferry's index state ({e}): restore it, or move it away with its log to start over",
                        path.display()
                    ),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Catalog::default()),
            Err(e) => Err(e),
        }
    }

    /// Replaces the file at `path` with this catalog, durably (a new file
    /// renamed over the old one, so a crash leaves one or the other).
    pub(crate) fn save(&self, path: &Path) -> io::Result<()> {
        let mut tmp = PathBuf::from(path.as_os_str().to_owned());
        tmp.as_mut_os_string().push(".tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).map_err(io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        super::sync_dir(path)
    }

    /// Whether an alias or a concrete index has this name.
    pub(crate) fn exists(&self, name: &str) -> bool {
        self.aliases.contains_key(name) || self.indexes.contains_key(name)
    }

    /// The concrete index `alias` serves, as a list (empty or one).
    pub(crate) fn alias_targets(&self, alias: &str) -> Vec<String> {
        self.aliases.get(alias).cloned().into_iter().collect()
    }

    /// The mapping of `concrete` as the cluster returns it (`_meta` and
    /// `properties`); `Null` when there is no such index.
    pub(crate) fn mapping(&self, concrete: &str) -> Value {
        match self.indexes.get(concrete) {
            Some(s) => json!({"_meta": {"ferry": s.meta}, "properties": s.properties}),
            None => Value::Null,
        }
    }

    /// Creates `concrete` from a create-index body (settings and mappings).
    pub(crate) fn create(&mut self, concrete: &str, body: &Value) {
        self.indexes.insert(
            concrete.to_string(),
            Stored {
                meta: body["mappings"]["_meta"]["ferry"].clone(),
                properties: body["mappings"]["properties"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                settings: body["settings"].clone(),
            },
        );
    }

    /// Deletes `concrete` and the alias serving it, if any.
    pub(crate) fn delete(&mut self, concrete: &str) {
        self.indexes.remove(concrete);
        self.aliases.retain(|_, c| c != concrete);
    }

    /// Replaces `_meta.ferry` of `concrete`; false when it does not exist.
    pub(crate) fn set_meta(&mut self, concrete: &str, meta: Value) -> bool {
        match self.indexes.get_mut(concrete) {
            Some(s) => {
                s.meta = meta;
                true
            }
            None => false,
        }
    }

    /// Adds field mappings to `concrete`; false when it does not exist.
    pub(crate) fn extend(&mut self, concrete: &str, properties: Map<String, Value>) -> bool {
        match self.indexes.get_mut(concrete) {
            Some(s) => {
                s.properties.extend(properties);
                true
            }
            None => false,
        }
    }

    /// Points `alias` at `concrete`.
    pub(crate) fn point(&mut self, alias: &str, concrete: &str) {
        self.aliases.insert(alias.to_string(), concrete.to_string());
    }

    /// Concrete indexes whose names start with `prefix`, with their
    /// `_meta.ferry`.
    pub(crate) fn metas_under(&self, prefix: &str) -> Vec<(String, Value)> {
        self.indexes
            .range(prefix.to_string()..)
            .take_while(|(name, _)| name.starts_with(prefix))
            .map(|(name, s)| (name.clone(), s.meta.clone()))
            .collect()
    }

    /// (alias, concrete index) of every alias over an index of `owner`.
    pub(crate) fn owned(&self, owner: &str) -> Vec<(String, String)> {
        self.aliases
            .iter()
            .filter(|(_, c)| {
                self.indexes
                    .get(c.as_str())
                    .is_some_and(|s| s.meta["owner"] == json!(owner))
            })
            .map(|(a, c)| (a.clone(), c.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(owner: &str) -> Value {
        json!({"settings": {"number_of_shards": 1}, "mappings": {
            "_meta": {"ferry": {"alias": "users", "hash": "1a2b3c4d", "owner": owner}},
            "properties": {"id": {"type": "long"}}}})
    }

    #[test]
    fn a_saved_catalog_loads_back_the_same_indexes_and_aliases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.ndjson.ferry.json");
        assert!(!Catalog::load(&path).expect("empty").exists("users"));
        let mut c = Catalog::default();
        c.create("users-1a2b3c4d", &body("slot@db"));
        c.point("users", "users-1a2b3c4d");
        c.save(&path).expect("save");
        let back = Catalog::load(&path).expect("load");
        assert_eq!(
            back.alias_targets("users"),
            vec!["users-1a2b3c4d".to_string()]
        );
        assert_eq!(
            back.mapping("users-1a2b3c4d")["_meta"]["ferry"]["owner"],
            "slot@db"
        );
        assert_eq!(
            back.owned("slot@db"),
            vec![("users".into(), "users-1a2b3c4d".into())]
        );
        assert!(back.owned("other").is_empty());
    }

    #[test]
    fn deleting_an_index_removes_the_alias_serving_it() {
        let mut c = Catalog::default();
        c.create("users-1a2b3c4d", &body("o"));
        c.create("users-1a2b3c4d-g7", &body("o"));
        c.point("users", "users-1a2b3c4d");
        assert_eq!(c.metas_under("users-1a2b3c4d-g").len(), 1);
        c.delete("users-1a2b3c4d");
        assert!(c.alias_targets("users").is_empty());
        assert!(c.exists("users-1a2b3c4d-g7"));
        assert!(!c.set_meta("users-1a2b3c4d", json!({})));
    }

    #[test]
    fn a_damaged_state_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        std::fs::write(&path, "{not json").expect("write");
        let e = Catalog::load(&path).expect_err("damaged");
        assert!(e.to_string().contains("state.json"), "{e}");
    }
}
