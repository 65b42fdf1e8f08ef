//! Document plans: how a search document is assembled from a root row and
//! the related rows folded into it.
//!
//! The plan is a tree of [`Node`]s (this file); [`route`] derives, for a
//! changed row of any table the tree reads, which parent rows (and so which
//! roots) it affects; [`assemble`] turns one row of the build query into a
//! document. The SQL that builds and resolves documents is generated from
//! this tree by `ferry-postgres` (`docsql`), the only crate holding SQL.
//!
//! Every build row carries values as PostgreSQL text (nested rows as JSON
//! arrays of text), and documents are rendered by the same [`crate::value`]
//! code as the flat stream path, so a value looks the same however it was read.

use serde_json::{json, Map, Value};

use crate::value::TypeKind;
use crate::TableShape;

pub mod assemble;
pub mod route;

pub use route::{Lookup, Probe, Role, Usage};

/// How a related node hangs off its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// The root of the document.
    Root,
    /// `child.fk = parent.references`: an array.
    HasMany {
        /// Child column pointing at the parent.
        fk: String,
        /// Parent column it points at.
        references: String,
    },
    /// `parent.fk = target.references`: an object or null.
    BelongsTo {
        /// Parent column pointing at the target.
        fk: String,
        /// Target column it points at.
        references: String,
    },
    /// `parent.references = join.fk AND join.other_key = target.target_ref`: an array.
    Through {
        /// Quoted, qualified join table.
        join: String,
        /// The join table's OID.
        join_oid: u32,
        /// Join column pointing at the parent.
        fk: String,
        /// Parent column it points at.
        references: String,
        /// Join column pointing at the target.
        other_key: String,
        /// Target column it points at.
        target_ref: String,
    },
}

/// A count of related rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountNode {
    /// Document field.
    pub field: String,
    /// Quoted, qualified table.
    pub table: String,
    /// The table's OID.
    pub oid: u32,
    /// Column of the counted table pointing at the parent.
    pub fk: String,
    /// Parent column it points at.
    pub references: String,
    /// Optional SQL filter.
    pub filter: Option<String>,
}

/// One table's part of a document.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Field holding this node in its parent (empty for the root).
    pub field: String,
    /// The table and its selected columns.
    pub table: TableShape,
    /// Output field name per selected column (after renames).
    pub fields: Vec<String>,
    /// How it attaches to its parent.
    pub link: Link,
    /// SQL filter over the table's columns.
    pub filter: Option<String>,
    /// Soft-delete column and whether it is boolean.
    pub soft_delete: Option<(String, bool)>,
    /// has_many ordering (validated `col [asc|desc]` list).
    pub order_by: Option<String>,
    /// has_many row limit.
    pub limit: Option<u32>,
    /// `nested` or `object` for has_many/through arrays and belongs_to objects.
    pub mapping_type: &'static str,
    /// Field → mapping overrides.
    pub mapping: Map<String, Value>,
    /// Related nodes, in document field order after the columns.
    pub children: Vec<Node>,
    /// Counts, after the children.
    pub counts: Vec<CountNode>,
    /// Computed fields: (name, SQL expression over the table's columns).
    /// The build reads each as an extra column of the table under its name,
    /// and its shape is among `table.columns` (after the real ones).
    pub computed: Vec<(String, String)>,
    /// The root's routing column (`routing = "…"`): its text is each
    /// document's `_routing`. Always `None` below the root.
    pub routing: Option<String>,
}

/// Types whose cast to text differs from their text output: `boolean`
/// (`true` / `t`), `char(n)` (padding dropped), `inet` and `cidr` (`/32`
/// added to an `inet` host).
const CAST_DIFFERS: [u32; 4] = [16, 1042, 869, 650];

impl Node {
    /// True when the documents of this tree hold text read in two forms by
    /// ferry versions before every statement read values in their output
    /// form: a root key or routing column (document id and `_routing`), or
    /// a related table's column, of a type in [`CAST_DIFFERS`]. The
    /// generation identity records it, so such an index is rebuilt once.
    pub fn reads_cast_sensitive_text(&self) -> bool {
        let sensitive = |n: &Node, name: &str| {
            n.table
                .columns
                .iter()
                .any(|c| c.name == name && CAST_DIFFERS.contains(&c.type_oid))
        };
        fn related(n: &Node) -> bool {
            n.children.iter().any(|c| {
                c.table
                    .columns
                    .iter()
                    .any(|col| CAST_DIFFERS.contains(&col.type_oid))
                    || related(c)
            })
        }
        self.table.key.iter().any(|k| sensitive(self, k))
            || self.routing.as_ref().is_some_and(|r| sensitive(self, r))
            || related(self)
    }

    /// Looks up the node at `path`.
    pub fn at(&self, path: &[usize]) -> Option<&Node> {
        let mut n = self;
        for &i in path {
            n = n.children.get(i)?;
        }
        Some(n)
    }

    /// The OpenSearch `properties` of this node.
    pub fn properties(&self) -> Map<String, Value> {
        let mut props = Map::new();
        for (c, f) in self.table.columns.iter().zip(&self.fields) {
            let m = self
                .mapping
                .get(f)
                .cloned()
                .unwrap_or_else(|| c.kind.mapping());
            props.insert(f.clone(), m);
        }
        for c in &self.children {
            let m =
                self.mapping.get(&c.field).cloned().unwrap_or_else(
                    || json!({"type": c.mapping_type, "properties": c.properties()}),
                );
            props.insert(c.field.clone(), m);
        }
        for c in &self.counts {
            props.insert(c.field.clone(), json!({"type": "long"}));
        }
        props
    }
}

/// A node's kind for a column, used by tests and callers that build shapes by hand.
pub fn column(name: &str, kind: TypeKind) -> crate::ColumnShape {
    crate::ColumnShape {
        name: name.into(),
        type_oid: 0,
        kind,
    }
}

/// A table shape for tests: `public.name` keyed by `id`.
#[doc(hidden)]
pub fn sample_shape(name: &str, oid: u32, cols: &[(&str, TypeKind)]) -> TableShape {
    TableShape {
        schema: "public".into(),
        name: name.into(),
        oid,
        columns: cols.iter().map(|(n, k)| column(n, k.clone())).collect(),
        key: vec!["id".into()],
    }
}

/// A node for tests: every column under its own name, no filter, no children.
#[doc(hidden)]
pub fn sample_node(field: &str, t: TableShape, link: Link) -> Node {
    Node {
        field: field.into(),
        fields: t.columns.iter().map(|c| c.name.clone()).collect(),
        table: t,
        link,
        filter: None,
        soft_delete: None,
        order_by: None,
        limit: None,
        mapping_type: "nested",
        mapping: Map::new(),
        children: vec![],
        counts: vec![],
        computed: vec![],
        routing: None,
    }
}

/// A sample plan for tests (here and in the crates generating SQL from plans):
/// users (id, email) → orders (id, total; has_many by `user_id`, each with
/// line items (id, sku; has_many by `order_id`, ordered `sku desc`)),
/// company (belongs_to by `company_id`) and `order_count` (count of orders).
/// Table OIDs: users 1, orders 2, companies 3, line_items 4.
#[doc(hidden)]
pub fn sample_users_plan() -> Node {
    let (shape, node) = (sample_shape, sample_node);
    let mut items = node(
        "items",
        shape(
            "line_items",
            4,
            &[("id", TypeKind::Int64), ("sku", TypeKind::Text)],
        ),
        Link::HasMany {
            fk: "order_id".into(),
            references: "id".into(),
        },
    );
    items.order_by = Some("sku desc".into());
    let mut orders = node(
        "orders",
        shape(
            "orders",
            2,
            &[("id", TypeKind::Int64), ("total", TypeKind::Numeric)],
        ),
        Link::HasMany {
            fk: "user_id".into(),
            references: "id".into(),
        },
    );
    orders.children.push(items);
    let mut company = node(
        "company",
        shape(
            "companies",
            3,
            &[("id", TypeKind::Int64), ("name", TypeKind::Text)],
        ),
        Link::BelongsTo {
            fk: "company_id".into(),
            references: "id".into(),
        },
    );
    company.mapping_type = "object";
    let mut root = node(
        "",
        shape(
            "users",
            1,
            &[("id", TypeKind::Int64), ("email", TypeKind::Text)],
        ),
        Link::Root,
    );
    root.children = vec![orders, company];
    root.counts.push(CountNode {
        field: "order_count".into(),
        table: "\"public\".\"orders\"".into(),
        oid: 2,
        fk: "user_id".into(),
        references: "id".into(),
        filter: None,
    });
    root
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boolean_char_or_inet_key_routing_or_related_value_is_cast_sensitive() {
        let plan = sample_users_plan(); // type OIDs are 0 in samples
        assert!(!plan.reads_cast_sensitive_text());
        let mut key = plan.clone();
        key.table.columns[0].type_oid = 1042; // users.id char(n)
        assert!(key.reads_cast_sensitive_text());
        let mut value = plan.clone();
        value.table.columns[1].type_oid = 16; // users.email, a root value: read raw always
        assert!(!value.reads_cast_sensitive_text());
        value.routing = Some("email".into());
        assert!(value.reads_cast_sensitive_text(), "the routing column");
        let mut nested = plan.clone();
        nested.children[0].children[0].table.columns[1].type_oid = 869; // line_items.sku inet
        assert!(nested.reads_cast_sensitive_text());
    }
}
