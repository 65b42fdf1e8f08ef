//! Routes: every table a plan reads, and for a changed row of one of them
//! which column's values select which parent rows (a [`Probe`]), resolved to
//! root keys by one query per batch.

use super::{Link, Node};

/// Where a table appears in a plan: what to read from its changed rows to
/// find the affected roots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// Path of child positions from the root to the node concerned.
    pub path: Vec<usize>,
    /// What role the table plays there.
    pub role: Role,
}

/// The role of a table at a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The node's own table.
    Node,
    /// The join table of a through node.
    Join,
    /// The table of count `j` of the node.
    Count(usize),
}

/// Rows of a parent node to rebuild: `parent.column IN (values)` or, for a
/// through target, via the join table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Probe {
    /// Path to the parent node whose rows are affected.
    pub parent: Vec<usize>,
    /// Parent column to match.
    pub column: String,
    /// Match through the join table (`column IN (SELECT fk FROM join WHERE other_key IN values)`).
    pub via_join: Option<(String, String, String)>,
}

/// A column the build statement finds related rows by: the child side of
/// a relation (a has_many's or count's foreign key, a through's join
/// column pointing at the parent, a belongs_to target's referenced column).
/// Without an index leading with it, every statement reads the whole table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// The table's OID.
    pub oid: u32,
    /// The column.
    pub column: String,
    /// The relation's document field path (`orders.items`).
    pub field: String,
}

impl Usage {
    /// True for the root table's own rows: their primary key is the document's.
    pub fn is_root(&self) -> bool {
        self.path.is_empty() && self.role == Role::Node
    }
}

impl Node {
    /// True when `probe`'s values are themselves root keys (a direct child of
    /// the root pointing at a single-column primary key), so they need no
    /// resolve query.
    pub fn probe_gives_root_keys(&self, probe: &Probe) -> bool {
        probe.parent.is_empty()
            && probe.via_join.is_none()
            && self.table.key.len() == 1
            && self.table.key[0] == probe.column
    }

    /// The columns of related tables that related rows are found by, one per
    /// relation and count, in document order.
    pub fn lookups(&self) -> Vec<Lookup> {
        let mut out = Vec::new();
        self.collect_lookups("", &mut out);
        out
    }

    fn collect_lookups(&self, prefix: &str, out: &mut Vec<Lookup>) {
        for c in &self.children {
            let field = format!("{prefix}{}", c.field);
            let (oid, column) = match &c.link {
                Link::Root => continue,
                Link::HasMany { fk, .. } => (c.table.oid, fk.clone()),
                Link::BelongsTo { references, .. } => (c.table.oid, references.clone()),
                Link::Through { join_oid, fk, .. } => (*join_oid, fk.clone()),
            };
            out.push(Lookup {
                oid,
                column,
                field: field.clone(),
            });
            c.collect_lookups(&format!("{field}."), out);
        }
        for c in &self.counts {
            out.push(Lookup {
                oid: c.oid,
                column: c.fk.clone(),
                field: format!("{prefix}{}", c.field),
            });
        }
    }

    /// Every table this plan reads and its role, for routing changes.
    pub fn usages(&self) -> Vec<(u32, Usage)> {
        let mut out = Vec::new();
        self.collect_usages(&mut Vec::new(), &mut out);
        out
    }

    fn collect_usages(&self, path: &mut Vec<usize>, out: &mut Vec<(u32, Usage)>) {
        out.push((
            self.table.oid,
            Usage {
                path: path.clone(),
                role: Role::Node,
            },
        ));
        if let Link::Through { join_oid, .. } = &self.link {
            out.push((
                *join_oid,
                Usage {
                    path: path.clone(),
                    role: Role::Join,
                },
            ));
        }
        for (j, c) in self.counts.iter().enumerate() {
            out.push((
                c.oid,
                Usage {
                    path: path.clone(),
                    role: Role::Count(j),
                },
            ));
        }
        for (i, c) in self.children.iter().enumerate() {
            path.push(i);
            c.collect_usages(path, out);
            path.pop();
        }
    }

    /// For a changed row of a table used as `usage`: which column of that
    /// row to read, and which parent rows the values select. `None` for the
    /// root table itself (its own key is the document id).
    pub fn probe(&self, usage: &Usage) -> Option<(String, Probe)> {
        let node = self.at(&usage.path)?;
        match usage.role {
            Role::Count(j) => {
                let c = node.counts.get(j)?;
                Some((
                    c.fk.clone(),
                    Probe {
                        parent: usage.path.clone(),
                        column: c.references.clone(),
                        via_join: None,
                    },
                ))
            }
            Role::Join => match &node.link {
                Link::Through { fk, references, .. } => Some((
                    fk.clone(),
                    Probe {
                        parent: usage.path[..usage.path.len().saturating_sub(1)].to_vec(),
                        column: references.clone(),
                        via_join: None,
                    },
                )),
                _ => None,
            },
            Role::Node => {
                let parent = usage.path.get(..usage.path.len().checked_sub(1)?)?.to_vec();
                match &node.link {
                    Link::Root => None,
                    Link::HasMany { fk, references } => Some((
                        fk.clone(),
                        Probe {
                            parent,
                            column: references.clone(),
                            via_join: None,
                        },
                    )),
                    Link::BelongsTo { fk, references } => Some((
                        references.clone(),
                        Probe {
                            parent,
                            column: fk.clone(),
                            via_join: None,
                        },
                    )),
                    Link::Through {
                        join,
                        fk,
                        references,
                        other_key,
                        target_ref,
                        ..
                    } => Some((
                        target_ref.clone(),
                        Probe {
                            parent,
                            column: references.clone(),
                            via_join: Some((join.clone(), fk.clone(), other_key.clone())),
                        },
                    )),
                }
            }
        }
    }

    /// Columns whose old values resolution needs (beyond the primary key):
    /// tables listed here need `REPLICA IDENTITY FULL`. A routing column
    /// outside the key is one: a delete or a move must name the shard
    /// holding the old copy.
    pub fn needs_full_identity(&self) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        if let Some(r) = &self.routing {
            if !self.table.key.contains(r) {
                out.push((self.table.oid, r.clone()));
            }
        }
        for (oid, usage) in self.usages() {
            if let Some((col, _)) = self.probe(&usage) {
                let is_pk = self
                    .at(&usage.path)
                    .map(|n| usage.role == Role::Node && n.table.key == [col.clone()])
                    .unwrap_or(false);
                if !is_pk {
                    out.push((oid, col));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::plan::sample_users_plan;

    #[test]
    fn routes_every_related_table_to_the_parent_rows_it_selects() {
        let plan = sample_users_plan();
        let usages = plan.usages();
        let root: Vec<_> = usages.iter().filter(|(_, u)| u.is_root()).collect();
        assert_eq!(root.len(), 1);
        assert_eq!(root[0].0, 1);
        assert_eq!(plan.probe(&root[0].1), None);
        let items = usages
            .iter()
            .find(|(oid, _)| *oid == 4)
            .map(|(_, u)| u.clone())
            .expect("items");
        let (col, probe) = plan.probe(&items).expect("probe");
        assert_eq!(col, "order_id");
        assert_eq!(probe.parent, [0]);
        assert_eq!(probe.column, "id");
        assert!(!plan.probe_gives_root_keys(&probe));
        let company = usages
            .iter()
            .find(|(oid, _)| *oid == 3)
            .map(|(_, u)| u.clone())
            .expect("company");
        let (col, probe) = plan.probe(&company).expect("probe");
        assert_eq!(col, "id");
        assert_eq!(probe.column, "company_id");
        assert!(probe.parent.is_empty());
        assert!(!plan.probe_gives_root_keys(&probe));
        let full: Vec<u32> = plan.needs_full_identity().iter().map(|(o, _)| *o).collect();
        assert!(full.contains(&2), "{full:?}");
        assert!(full.contains(&4), "{full:?}");
        assert!(!full.contains(&3), "{full:?}");
        assert!(!full.contains(&1), "{full:?}");
    }

    #[test]
    fn a_routing_column_outside_the_key_needs_old_rows_whole() {
        let mut plan = sample_users_plan();
        plan.routing = Some("email".into());
        assert!(plan.needs_full_identity().contains(&(1, "email".into())));
        plan.routing = Some("id".into());
        assert!(!plan.needs_full_identity().iter().any(|(o, _)| *o == 1));
    }

    #[test]
    fn lists_the_column_each_relation_finds_its_rows_by() {
        let plan = sample_users_plan();
        let got: Vec<(u32, String, String)> = plan
            .lookups()
            .into_iter()
            .map(|l| (l.oid, l.column, l.field))
            .collect();
        let want = [
            (2, "user_id", "orders"),
            (4, "order_id", "orders.items"),
            (3, "id", "company"),
            (2, "user_id", "order_count"),
        ];
        let want: Vec<(u32, String, String)> = want
            .iter()
            .map(|(o, c, f)| (*o, c.to_string(), f.to_string()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_direct_child_of_the_root_names_root_keys_itself() {
        let plan = sample_users_plan();
        let orders = plan
            .usages()
            .into_iter()
            .find(|(oid, u)| *oid == 2 && u.path == [0])
            .map(|(_, u)| u)
            .expect("orders");
        let (col, probe) = plan.probe(&orders).expect("probe");
        assert_eq!(col, "user_id");
        assert!(plan.probe_gives_root_keys(&probe));
    }
}
