//! Routing: which documents a row change or a TRUNCATE touches. Pure — no
//! I/O; the answers are root keys (documents to rebuild) and probes (values
//! to resolve to root keys with one query per batch).

use std::collections::HashMap;

use ferry_core::change::{Change, Datum, Relation, Tuple};
use ferry_core::doc::routing_of;
use ferry_core::plan::Probe;
use ferry_core::schema::doc_id;

use crate::index::IndexRuntime;
use crate::EngineError;

/// How one index built by query finds the documents a row of one table feeds.
#[derive(Debug, Clone)]
enum Target {
    /// The index's root table: the row's primary key is the document's
    /// (and its routing column, if any, the document's routing).
    Root {
        key: Vec<String>,
        table: String,
        routing: Option<String>,
    },
    /// A related table: `column`'s old and new values select parent rows via `probe`.
    Related { column: String, probe: Probe },
    /// A use of the table no single row change can be traced through
    /// (only a TRUNCATE of it matters).
    Untraced,
}

/// Routes from tables to the documents that read them.
#[derive(Debug, Default)]
pub struct Router {
    /// Root table OID → flat indexes (documents straight from the WAL tuple).
    flat_roots: HashMap<u32, Vec<usize>>,
    /// Table OID → (index, target) for indexes built by query.
    routes: HashMap<u32, Vec<(usize, Target)>>,
}

/// What one row change means for the indexes built by query.
#[derive(Debug, Default, PartialEq)]
pub struct Routed {
    /// (index, root key): documents to rebuild.
    pub roots: Vec<(usize, Vec<String>)>,
    /// (index, probe, values): values to resolve to root keys.
    pub probes: Vec<(usize, Probe, Vec<String>)>,
    /// (index, document id, routing): where each image of a routed root
    /// row puts its document.
    pub routings: Vec<(usize, String, Option<String>)>,
}

/// What a TRUNCATE means, per index position.
#[derive(Debug, Default, PartialEq)]
pub struct Truncation {
    /// Indexes whose root table was emptied: remove every document.
    pub empty: Vec<usize>,
    /// Indexes reading an emptied related table: rebuild every document.
    pub rebuild: Vec<usize>,
}

impl Router {
    /// Derives every route from the index plans.
    pub fn new(indexes: &[IndexRuntime]) -> Router {
        let mut router = Router::default();
        for ix in indexes.iter().filter(|ix| !ix.paused) {
            if ix.fast {
                router
                    .flat_roots
                    .entry(ix.shape.oid)
                    .or_default()
                    .push(ix.pos);
                continue;
            }
            for (oid, usage) in ix.plan.usages() {
                let target = if usage.is_root() {
                    Target::Root {
                        key: ix.plan.table.key.clone(),
                        table: ix.plan.table.qualified(),
                        routing: ix.plan.routing.clone(),
                    }
                } else {
                    match ix.plan.probe(&usage) {
                        Some((column, probe)) => Target::Related { column, probe },
                        None => Target::Untraced,
                    }
                };
                router.routes.entry(oid).or_default().push((ix.pos, target));
            }
        }
        router
    }

    /// Flat indexes whose root table is `rel`.
    pub fn flat_indexes(&self, rel: u32) -> &[usize] {
        self.flat_roots.get(&rel).map(Vec::as_slice).unwrap_or(&[])
    }

    /// True when some index built by query reads `rel`.
    pub fn is_routed(&self, rel: u32) -> bool {
        self.routes.contains_key(&rel)
    }

    /// The documents of indexes built by query that `change` (of `rel`) affects.
    pub fn route(&self, change: &Change, rel: &Relation) -> Result<Routed, EngineError> {
        let mut out = Routed::default();
        let Some(routes) = self.routes.get(&change.rel) else {
            return Ok(out);
        };
        // Both images: an update moving a row selects its old and new parents.
        let images: Vec<&Tuple> = change
            .new
            .iter()
            .chain(change.old.iter().map(|o| &o.tuple))
            .collect();
        let column = |name: &str| rel.columns.iter().position(|c| c.name == name);
        for (index, target) in routes {
            match target {
                Target::Root {
                    key,
                    table,
                    routing,
                } => {
                    let missing = |what: &str| {
                        EngineError::Stream(format!(
                            "{what} of {table} is missing from the replication stream; restart ferry"
                        ))
                    };
                    let Some(key_pos) = key.iter().map(|k| column(k)).collect::<Option<Vec<_>>>()
                    else {
                        return Err(missing("primary key"));
                    };
                    let routing_pos = match routing {
                        None => None,
                        Some(r) => Some(column(r).ok_or_else(|| missing("routing column"))?),
                    };
                    for t in &images {
                        let key: Option<Vec<String>> =
                            key_pos.iter().map(|p| text(t, *p).map(lossy)).collect();
                        let Some(key) = key else { continue };
                        // An unchanged (TOASTed) routing value is the old image's.
                        if let Some(r) =
                            routing_pos.filter(|r| !matches!(t.0.get(*r), Some(Datum::Unchanged)))
                        {
                            let parts: Vec<&[u8]> = key.iter().map(|k| k.as_bytes()).collect();
                            out.routings
                                .push((*index, doc_id(&parts), routing_of(text(t, r))));
                        }
                        out.roots.push((*index, key));
                    }
                }
                Target::Related { column: col, probe } => {
                    let Some(at) = column(col) else {
                        tracing::warn!(table = %rel.name, column = %col, "column used to find documents is missing from the stream");
                        continue;
                    };
                    let values: Vec<String> = images
                        .iter()
                        .filter_map(|t| text(t, at))
                        .map(lossy)
                        .collect();
                    if !values.is_empty() {
                        out.probes.push((*index, probe.clone(), values));
                    }
                }
                Target::Untraced => {}
            }
        }
        Ok(out)
    }

    /// TRUNCATE of `rels`: a root table's index is emptied; an index reading
    /// a truncated related table is rebuilt (unless it is emptied anyway).
    pub fn truncation(&self, rels: &[u32]) -> Truncation {
        let mut t = Truncation::default();
        for r in rels {
            t.empty.extend(self.flat_indexes(*r));
            for (index, target) in self.routes.get(r).into_iter().flatten() {
                match target {
                    Target::Root { .. } => t.empty.push(*index),
                    _ => t.rebuild.push(*index),
                }
            }
        }
        t.empty.sort_unstable();
        t.empty.dedup();
        t.rebuild.sort_unstable();
        t.rebuild.dedup();
        t.rebuild.retain(|i| !t.empty.contains(i));
        t
    }
}

/// Column `i`'s text, `None` for NULL or an unchanged TOAST value.
pub fn text(t: &Tuple, i: usize) -> Option<&[u8]> {
    match t.0.get(i) {
        Some(Datum::Text(b)) | Some(Datum::Binary(b)) => Some(b.as_ref()),
        _ => None,
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use ferry_core::change::{ChangeOp, OldKind, OldTuple, RelationColumn};
    use ferry_core::plan::{Link, Node};
    use ferry_core::{ColumnShape, TableShape, TypeKind};
    use std::sync::Arc;

    pub fn shape(name: &str, oid: u32, cols: &[&str]) -> TableShape {
        TableShape {
            schema: "public".into(),
            name: name.into(),
            oid,
            columns: cols
                .iter()
                .map(|c| ColumnShape {
                    name: (*c).into(),
                    type_oid: 25,
                    kind: TypeKind::Text,
                })
                .collect(),
            key: vec!["id".into()],
        }
    }

    pub fn node(field: &str, table: TableShape, link: Link) -> Node {
        Node {
            field: field.into(),
            fields: table.columns.iter().map(|c| c.name.clone()).collect(),
            table,
            link,
            filter: None,
            soft_delete: None,
            order_by: None,
            limit: None,
            mapping_type: "object",
            mapping: Default::default(),
            children: Vec::new(),
            counts: Vec::new(),
            computed: Vec::new(),
            routing: None,
        }
    }

    pub fn index(pos: usize, plan: Node, flat: bool) -> IndexRuntime {
        IndexRuntime {
            pos,
            sink: 0,
            alias: format!("ix{pos}"),
            concrete: format!("ix{pos}-1"),
            shape: plan.table.clone(),
            plan,
            fast: flat,
            shadow: None,
            paused: false,
        }
    }

    pub fn relation(shape: &TableShape) -> Arc<Relation> {
        Arc::new(Relation {
            oid: shape.oid,
            namespace: shape.schema.clone(),
            name: shape.name.clone(),
            replica_identity: b'f',
            columns: shape
                .columns
                .iter()
                .map(|c| RelationColumn {
                    key: c.name == "id",
                    name: c.name.clone(),
                    type_oid: c.type_oid,
                    type_modifier: -1,
                })
                .collect(),
        })
    }

    pub fn tuple(values: &[&str]) -> Tuple {
        Tuple(
            values
                .iter()
                .map(|v| match *v {
                    "\\N" => Datum::Null,
                    "\\u" => Datum::Unchanged,
                    v => Datum::Text(v.as_bytes().to_vec().into()),
                })
                .collect(),
        )
    }

    pub fn change(rel: u32, op: ChangeOp, old: Option<&[&str]>, new: Option<&[&str]>) -> Change {
        Change {
            rel,
            op,
            old: old.map(|o| OldTuple {
                kind: OldKind::Full,
                tuple: tuple(o),
            }),
            new: new.map(tuple),
        }
    }

    /// users(id, name) with has_many posts(id, user_id, title) and
    /// belongs_to teams(id, label) via users.team_id.
    fn users_plan() -> (IndexRuntime, TableShape, TableShape, TableShape) {
        let users = shape("users", 10, &["id", "name", "team_id"]);
        let posts = shape("posts", 11, &["id", "user_id", "title"]);
        let teams = shape("teams", 12, &["id", "label"]);
        let mut root = node("", users.clone(), Link::Root);
        root.children.push(node(
            "posts",
            posts.clone(),
            Link::HasMany {
                fk: "user_id".into(),
                references: "id".into(),
            },
        ));
        root.children.push(node(
            "team",
            teams.clone(),
            Link::BelongsTo {
                fk: "team_id".into(),
                references: "id".into(),
            },
        ));
        (index(0, root, false), users, posts, teams)
    }

    fn keys(routed: &Routed) -> Vec<Vec<&str>> {
        routed
            .roots
            .iter()
            .map(|(_, k)| k.iter().map(String::as_str).collect())
            .collect()
    }

    #[test]
    fn routes_root_inserts_updates_and_deletes_to_their_own_keys() {
        let (ix, users, ..) = users_plan();
        let router = Router::new(&[ix]);
        let rel = relation(&users);
        let insert = change(10, ChangeOp::Insert, None, Some(&["1", "ann", "5"]));
        assert_eq!(keys(&router.route(&insert, &rel).unwrap()), [["1"]]);
        let update = change(
            10,
            ChangeOp::Update,
            Some(&["1", "ann", "5"]),
            Some(&["2", "ann", "5"]),
        );
        assert_eq!(keys(&router.route(&update, &rel).unwrap()), [["2"], ["1"]]);
        let delete = change(10, ChangeOp::Delete, Some(&["3", "bo", "\\N"]), None);
        let routed = router.route(&delete, &rel).unwrap();
        assert_eq!(keys(&routed), [["3"]]);
        assert!(routed.probes.is_empty());
    }

    #[test]
    fn routes_a_child_fk_move_to_its_old_and_new_parents() {
        let (ix, _, posts, _) = users_plan();
        let router = Router::new(&[ix]);
        let moved = change(
            11,
            ChangeOp::Update,
            Some(&["100", "1", "t"]),
            Some(&["100", "2", "t"]),
        );
        let routed = router.route(&moved, &relation(&posts)).unwrap();
        assert!(routed.roots.is_empty());
        assert_eq!(routed.probes.len(), 1);
        let (index, probe, values) = &routed.probes[0];
        assert_eq!(*index, 0);
        assert_eq!(probe.parent, Vec::<usize>::new());
        assert_eq!(probe.column, "id");
        assert_eq!(values, &["2", "1"]);
    }

    #[test]
    fn routes_a_belongs_to_target_change_through_the_referencing_column() {
        let (ix, _, _, teams) = users_plan();
        let router = Router::new(&[ix]);
        let renamed = change(12, ChangeOp::Update, Some(&["5", "a"]), Some(&["5", "b"]));
        let routed = router.route(&renamed, &relation(&teams)).unwrap();
        let (_, probe, values) = &routed.probes[0];
        assert_eq!(probe.column, "team_id");
        assert_eq!(values, &["5", "5"]);
    }

    #[test]
    fn null_foreign_keys_and_unread_tables_route_nowhere() {
        let (ix, _, posts, _) = users_plan();
        let router = Router::new(&[ix]);
        let orphan = change(11, ChangeOp::Insert, None, Some(&["1", "\\N", "t"]));
        assert_eq!(
            router.route(&orphan, &relation(&posts)).unwrap(),
            Routed::default()
        );
        let other = change(99, ChangeOp::Insert, None, Some(&["1"]));
        assert_eq!(
            router.route(&other, &relation(&posts)).unwrap(),
            Routed::default()
        );
    }

    #[test]
    fn a_paused_index_gets_no_routes_and_no_truncation() {
        let (mut ix, users, posts, _) = users_plan();
        ix.paused = true;
        let flat_users = index(1, node("", users.clone(), Link::Root), true);
        let mut flat = flat_users.clone();
        flat.paused = true;
        let router = Router::new(&[ix, flat]);
        assert!(!router.is_routed(users.oid));
        assert!(!router.is_routed(posts.oid));
        assert!(router.flat_indexes(users.oid).is_empty());
        assert_eq!(
            router.truncation(&[users.oid, posts.oid]),
            Truncation::default()
        );
        // The same indexes unpaused are routed.
        let (ix, ..) = users_plan();
        let router = Router::new(&[ix, flat_users]);
        assert!(router.is_routed(users.oid));
        assert_eq!(router.flat_indexes(users.oid), [1]);
    }

    #[test]
    fn truncating_a_root_empties_its_index_and_a_related_table_rebuilds() {
        let (relational, ..) = users_plan();
        let flat = index(1, node("", shape("events", 20, &["id"]), Link::Root), true);
        let router = Router::new(&[relational, flat]);
        assert_eq!(
            router.truncation(&[11, 20]),
            Truncation {
                empty: vec![1],
                rebuild: vec![0]
            }
        );
        assert_eq!(
            router.truncation(&[10, 11]),
            Truncation {
                empty: vec![0],
                rebuild: vec![]
            }
        );
        assert_eq!(router.flat_indexes(20), [1]);
        assert!(!router.is_routed(20));
    }
}
