//! Document plans: how a search document is assembled from a root row and
//! the related rows folded into it, and the SQL that builds, re-builds and
//! resolves such documents in batches.
//!
//! Every query returns values as PostgreSQL text (nested rows as JSON arrays
//! of text), and documents are rendered by the same [`crate::value`] code as
//! the flat stream path, so a value looks the same however it was read.
//!
//! Generated SQL uses fixed aliases (`t0` for the root, `t1`, `t2`, … for
//! related tables); user filters run inside `(SELECT * FROM table WHERE …)`
//! sub-selects so they see only that table's own columns.

use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use crate::schema::{quote_ident, quote_literal};
use crate::value::{write_json_str, write_value, TypeKind};
use crate::TableShape;

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
}

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

impl Node {
    fn soft_clause(&self) -> Option<String> {
        self.soft_delete.as_ref().map(|(col, is_bool)| {
            if *is_bool {
                format!("NOT coalesce({}, false)", quote_ident(col))
            } else {
                format!("{} IS NULL", quote_ident(col))
            }
        })
    }

    /// `(SELECT * FROM table WHERE filter AND not-deleted)`, or the bare table.
    fn source(&self) -> String {
        let mut conds: Vec<String> = Vec::new();
        if let Some(f) = &self.filter {
            conds.push(format!("({f})"));
        }
        if let Some(s) = self.soft_clause() {
            conds.push(s);
        }
        if conds.is_empty() {
            self.table.qualified()
        } else {
            format!(
                "(SELECT * FROM {} WHERE {})",
                self.table.qualified(),
                conds.join(" AND ")
            )
        }
    }

    /// Looks up the node at `path`.
    pub fn at(&self, path: &[usize]) -> Option<&Node> {
        let mut n = self;
        for &i in path {
            n = n.children.get(i)?;
        }
        Some(n)
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
    /// tables listed here need `REPLICA IDENTITY FULL`.
    pub fn needs_full_identity(&self) -> Vec<(u32, String)> {
        let mut out = Vec::new();
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

    /// The `COPY … TO STDOUT` that builds documents: every root (`keys`
    /// `None`, for backfill and verify) or the roots with these primary-key
    /// texts. Output columns: the root's selected columns, then its key
    /// columns, then one JSON value per child and one count per count.
    pub fn build_sql(&self, keys: Option<&[Vec<String>]>) -> String {
        let mut sql = String::from("COPY (SELECT ");
        let mut first = true;
        let mut push = |sql: &mut String, e: &str| {
            if !std::mem::take(&mut first) {
                sql.push_str(", ");
            }
            sql.push_str(e);
        };
        for c in &self.table.columns {
            push(&mut sql, &format!("t0.{}", quote_ident(&c.name)));
        }
        for k in &self.table.key {
            push(&mut sql, &format!("t0.{}::text", quote_ident(k)));
        }
        let mut next = 1;
        for c in &self.children {
            let e = c.child_expr("t0", &mut next);
            push(&mut sql, &e);
        }
        for c in &self.counts {
            push(&mut sql, &count_expr(c, "t0", &mut next));
        }
        let _ = write!(sql, " FROM {} t0", self.source());
        if let Some(keys) = keys {
            sql.push_str(" WHERE ");
            sql.push_str(&key_in("t0", &self.table.key, keys));
        }
        sql.push_str(") TO STDOUT");
        sql
    }

    /// Like [`Node::build_sql`] for every root, but one key-ordered chunk:
    /// roots whose primary key sorts after `after`, at most `limit` of them.
    /// Chunks let a long backfill resume where it stopped.
    pub fn build_chunk_sql(&self, after: Option<&[String]>, limit: usize) -> String {
        let all = self.build_sql(None);
        let body = all
            .strip_prefix("COPY (")
            .and_then(|s| s.strip_suffix(") TO STDOUT"))
            .unwrap_or(&all);
        let cols = self
            .table
            .key
            .iter()
            .map(|k| format!("t0.{}", quote_ident(k)))
            .collect::<Vec<_>>();
        let mut sql = format!("COPY ({body}");
        if let Some(after) = after {
            let lits: Vec<String> = after.iter().map(|v| quote_literal(v)).collect();
            let _ = write!(sql, " WHERE ({}) > ({})", cols.join(", "), lits.join(", "));
        }
        let _ = write!(
            sql,
            " ORDER BY {} LIMIT {limit}) TO STDOUT",
            cols.join(", ")
        );
        sql
    }

    /// The `COPY … TO STDOUT` listing the root keys (as text) of roots whose
    /// node at `probe.parent` has `probe.column` in `values`.
    pub fn resolve_sql(&self, probe: &Probe, values: &[String]) -> Option<String> {
        let mut joins = String::new();
        let mut alias = "t0".to_string();
        let mut node = self;
        for (depth, &i) in probe.parent.iter().enumerate() {
            let child = node.children.get(i)?;
            let a = format!("t{}", depth + 1);
            let table = child.table.qualified();
            match &child.link {
                Link::Root => return None,
                Link::HasMany { fk, references } => {
                    let _ = write!(
                        joins,
                        " JOIN {table} {a} ON {a}.{} = {alias}.{}",
                        quote_ident(fk),
                        quote_ident(references)
                    );
                }
                Link::BelongsTo { fk, references } => {
                    let _ = write!(
                        joins,
                        " JOIN {table} {a} ON {a}.{} = {alias}.{}",
                        quote_ident(references),
                        quote_ident(fk)
                    );
                }
                Link::Through {
                    join,
                    fk,
                    references,
                    other_key,
                    target_ref,
                    ..
                } => {
                    let _ = write!(
                        joins,
                        " JOIN {join} j{a} ON j{a}.{} = {alias}.{} JOIN {table} {a} ON {a}.{} = j{a}.{}",
                        quote_ident(fk),
                        quote_ident(references),
                        quote_ident(target_ref),
                        quote_ident(other_key)
                    );
                }
            }
            alias = a;
            node = child;
        }
        let list = values
            .iter()
            .map(|v| quote_literal(v))
            .collect::<Vec<_>>()
            .join(", ");
        let cond = match &probe.via_join {
            None => format!("{alias}.{} IN ({list})", quote_ident(&probe.column)),
            Some((join, fk, other)) => format!(
                "{alias}.{} IN (SELECT {} FROM {join} WHERE {} IN ({list}))",
                quote_ident(&probe.column),
                quote_ident(fk),
                quote_ident(other)
            ),
        };
        let keys = self
            .table
            .key
            .iter()
            .map(|k| format!("t0.{}::text", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(", ");
        Some(format!(
            "COPY (SELECT DISTINCT {keys} FROM {} t0{joins} WHERE {cond}) TO STDOUT",
            self.table.qualified()
        ))
    }

    /// The JSON of one node row: `json_build_array(ARRAY[cols…]::text[], children…, counts…)`.
    fn row_expr(&self, alias: &str, next: &mut usize) -> String {
        let cols = self
            .table
            .columns
            .iter()
            .map(|c| format!("{alias}.{}::text", quote_ident(&c.name)))
            .collect::<Vec<_>>()
            .join(", ");
        let mut parts = vec![format!("ARRAY[{cols}]::text[]")];
        for c in &self.children {
            parts.push(c.child_expr(alias, next));
        }
        for c in &self.counts {
            parts.push(count_expr(c, alias, next));
        }
        format!("json_build_array({})", parts.join(", "))
    }

    /// The expression producing this child's value inside its parent `pa`.
    fn child_expr(&self, pa: &str, next: &mut usize) -> String {
        let a = format!("t{next}");
        *next += 1;
        let row = self.row_expr(&a, next);
        let src = self.source();
        match &self.link {
            Link::Root => "NULL".into(),
            Link::BelongsTo { fk, references } => format!(
                "(SELECT {row} FROM {src} {a} WHERE {a}.{} = {pa}.{} LIMIT 1)",
                quote_ident(references),
                quote_ident(fk)
            ),
            Link::HasMany { fk, references } => {
                let cond = format!("{a}.{} = {pa}.{}", quote_ident(fk), quote_ident(references));
                self.array_expr(&row, &format!("{src} {a}"), &cond, &a)
            }
            Link::Through {
                join,
                fk,
                references,
                other_key,
                target_ref,
                ..
            } => {
                let from = format!(
                    "{src} {a} JOIN {join} j{a} ON j{a}.{} = {a}.{}",
                    quote_ident(other_key),
                    quote_ident(target_ref)
                );
                let cond = format!(
                    "j{a}.{} = {pa}.{}",
                    quote_ident(fk),
                    quote_ident(references)
                );
                self.array_expr(&row, &from, &cond, &a)
            }
        }
    }

    fn array_expr(&self, row: &str, from: &str, cond: &str, a: &str) -> String {
        let order = match &self.order_by {
            Some(o) => qualify_order(o, a),
            None => self
                .table
                .key
                .iter()
                .map(|k| format!("{a}.{}", quote_ident(k)))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let limit = self
            .limit
            .map(|l| format!(" LIMIT {l}"))
            .unwrap_or_default();
        format!(
            "coalesce((SELECT json_agg(s.v ORDER BY s.o) FROM (SELECT {row} AS v, row_number() OVER (ORDER BY {order}) AS o FROM {from} WHERE {cond} ORDER BY {order}{limit}) s), '[]'::json)"
        )
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

    /// Number of COPY fields [`Node::build_sql`] returns per root.
    pub fn field_count(&self) -> usize {
        self.table.columns.len() + self.table.key.len() + self.children.len() + self.counts.len()
    }

    /// Positions of the key texts among the COPY fields.
    pub fn key_positions(&self) -> std::ops::Range<usize> {
        let start = self.table.columns.len();
        start..start + self.table.key.len()
    }

    /// Writes the document of one root row; `field(i)` gives COPY field `i`.
    ///
    /// Returns `false` (and writes nothing) if a nested value is not the
    /// JSON the query produces.
    pub fn write_root<'a>(
        &self,
        field: impl Fn(usize) -> Option<&'a [u8]>,
        out: &mut Vec<u8>,
    ) -> bool {
        let mark = out.len();
        out.push(b'{');
        let mut first = true;
        for (i, (c, f)) in self.table.columns.iter().zip(&self.fields).enumerate() {
            name(out, &mut first, f);
            match field(i) {
                Some(t) => write_value(&c.kind, t, out),
                None => out.extend_from_slice(b"null"),
            }
        }
        let mut at = self.table.columns.len() + self.table.key.len();
        for c in &self.children {
            name(out, &mut first, &c.field);
            let ok = match field(at) {
                None => {
                    out.extend_from_slice(b"null");
                    true
                }
                Some(text) => match serde_json::from_slice::<Value>(text) {
                    Ok(v) => c.write_value(&v, out),
                    Err(_) => false,
                },
            };
            if !ok {
                out.truncate(mark);
                return false;
            }
            at += 1;
        }
        for c in &self.counts {
            name(out, &mut first, &c.field);
            match field(at) {
                Some(t) if !t.is_empty() && t.iter().all(u8::is_ascii_digit) => {
                    out.extend_from_slice(t)
                }
                _ => out.extend_from_slice(b"0"),
            }
            at += 1;
        }
        out.push(b'}');
        true
    }

    /// Writes this child's value (array for has_many/through, object or null
    /// for belongs_to) from the JSON the query produced.
    fn write_value(&self, v: &Value, out: &mut Vec<u8>) -> bool {
        match (&self.link, v) {
            (_, Value::Null) => {
                out.extend_from_slice(if matches!(self.link, Link::BelongsTo { .. }) {
                    b"null"
                } else {
                    b"[]"
                });
                true
            }
            (Link::BelongsTo { .. }, row) => self.write_row(row, out),
            (_, Value::Array(rows)) => {
                out.push(b'[');
                for (i, row) in rows.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    if !self.write_row(row, out) {
                        return false;
                    }
                }
                out.push(b']');
                true
            }
            _ => false,
        }
    }

    /// One row: `[[col texts…], child values…, counts…]`.
    fn write_row(&self, row: &Value, out: &mut Vec<u8>) -> bool {
        let Some(parts) = row.as_array() else {
            return false;
        };
        let Some(cols) = parts.first().and_then(Value::as_array) else {
            return false;
        };
        out.push(b'{');
        let mut first = true;
        for (i, (c, f)) in self.table.columns.iter().zip(&self.fields).enumerate() {
            name(out, &mut first, f);
            match cols.get(i).and_then(Value::as_str) {
                Some(t) => write_value(&c.kind, t.as_bytes(), out),
                None => out.extend_from_slice(b"null"),
            }
        }
        let mut at = 1;
        for c in &self.children {
            name(out, &mut first, &c.field);
            if !c.write_value(parts.get(at).unwrap_or(&Value::Null), out) {
                return false;
            }
            at += 1;
        }
        for c in &self.counts {
            name(out, &mut first, &c.field);
            let n = parts.get(at).and_then(Value::as_u64).unwrap_or(0);
            out.extend_from_slice(n.to_string().as_bytes());
            at += 1;
        }
        out.push(b'}');
        true
    }
}

fn name(out: &mut Vec<u8>, first: &mut bool, field: &str) {
    if !std::mem::take(first) {
        out.push(b',');
    }
    write_json_str(field.as_bytes(), out);
    out.push(b':');
}

fn count_expr(c: &CountNode, pa: &str, next: &mut usize) -> String {
    let a = format!("t{next}");
    *next += 1;
    let src = match &c.filter {
        Some(f) => format!("(SELECT * FROM {} WHERE ({f}))", c.table),
        None => c.table.clone(),
    };
    format!(
        "(SELECT count(*) FROM {src} {a} WHERE {a}.{} = {pa}.{})",
        quote_ident(&c.fk),
        quote_ident(&c.references)
    )
}

/// `(t0.k1, t0.k2) IN (('1','a'), …)` or `t0.k IN ('1', …)`.
pub fn key_in(alias: &str, key: &[String], keys: &[Vec<String>]) -> String {
    if keys.is_empty() {
        return "false".into();
    }
    let cols = key
        .iter()
        .map(|k| format!("{alias}.{}", quote_ident(k)))
        .collect::<Vec<_>>();
    let tuples = keys
        .iter()
        .map(|parts| {
            let lits: Vec<String> = parts.iter().map(|p| quote_literal(p)).collect();
            if lits.len() == 1 {
                lits.join("")
            } else {
                format!("({})", lits.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    if cols.len() == 1 {
        format!("{} IN ({tuples})", cols.join(""))
    } else {
        format!("({}) IN ({tuples})", cols.join(", "))
    }
}

/// Prefixes each column of a validated `col [asc|desc] …` list with `alias.`.
fn qualify_order(order: &str, alias: &str) -> String {
    order
        .split(',')
        .map(|part| {
            let mut words = part.split_whitespace();
            let col = words.next().unwrap_or("1");
            let rest: Vec<&str> = words.collect();
            let mut s = format!("{alias}.{}", quote_ident(col));
            for w in rest {
                s.push(' ');
                s.push_str(w);
            }
            s
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A node's kind for a column, used by tests and callers that build shapes by hand.
pub fn column(name: &str, kind: TypeKind) -> crate::ColumnShape {
    crate::ColumnShape {
        name: name.into(),
        type_oid: 0,
        kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(name: &str, oid: u32, cols: &[(&str, TypeKind)]) -> TableShape {
        TableShape {
            schema: "public".into(),
            name: name.into(),
            oid,
            columns: cols.iter().map(|(n, k)| column(n, k.clone())).collect(),
            key: vec!["id".into()],
        }
    }

    fn node(field: &str, t: TableShape, link: Link) -> Node {
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
        }
    }

    fn users_plan() -> Node {
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

    #[test]
    fn assembles_nested_documents_from_query_output() {
        let plan = users_plan();
        let orders = r#"[[["10","9.50"],[[["100","b"]],[["101","a"]]]],[["11","1e3"],[]]]"#;
        let company = r#"[["7","ACME \"Inc\""]]"#;
        let fields: Vec<Option<&[u8]>> = vec![
            Some(b"1"),
            Some(b"a@x"),
            Some(b"1"),
            Some(orders.as_bytes()),
            Some(company.as_bytes()),
            Some(b"2"),
        ];
        let mut out = Vec::new();
        assert!(plan.write_root(|i| fields.get(i).copied().flatten(), &mut out));
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(
            v,
            json!({"id": 1, "email": "a@x",
                   "orders": [{"id": 10, "total": 9.50, "items": [{"id": 100, "sku": "b"}, {"id": 101, "sku": "a"}]},
                              {"id": 11, "total": 1e3, "items": []}],
                   "company": {"id": 7, "name": "ACME \"Inc\""},
                   "order_count": 2})
        );
        // A missing belongs_to is null, an empty has_many is [].
        let fields: Vec<Option<&[u8]>> =
            vec![Some(b"2"), None, Some(b"2"), Some(b"[]"), None, Some(b"0")];
        let mut out = Vec::new();
        assert!(plan.write_root(|i| fields.get(i).copied().flatten(), &mut out));
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["orders"], json!([]));
        assert_eq!(v["company"], Value::Null);
    }

    #[test]
    fn builds_one_statement_for_a_batch_of_roots() {
        let plan = users_plan();
        let sql = plan.build_sql(Some(&[vec!["1".into()], vec!["2".into()]]));
        assert!(
            sql.starts_with("COPY (SELECT t0.\"id\", t0.\"email\", t0.\"id\"::text"),
            "{sql}"
        );
        assert!(sql.contains("WHERE t0.\"id\" IN ('1', '2')"), "{sql}");
        assert!(sql.contains("ORDER BY t2.\"sku\" desc"), "{sql}");
        assert_eq!(sql.matches("json_agg").count(), 2, "{sql}");
    }

    #[test]
    fn resolves_changes_to_roots() {
        let plan = users_plan();
        let usages = plan.usages();
        let items = usages
            .iter()
            .find(|(oid, _)| *oid == 4)
            .map(|(_, u)| u.clone())
            .expect("items");
        let (col, probe) = plan.probe(&items).expect("probe");
        assert_eq!(col, "order_id");
        let sql = plan.resolve_sql(&probe, &["10".into()]).expect("sql");
        assert_eq!(
            sql,
            "COPY (SELECT DISTINCT t0.\"id\"::text FROM \"public\".\"users\" t0 JOIN \"public\".\"orders\" t1 ON t1.\"user_id\" = t0.\"id\" WHERE t1.\"id\" IN ('10')) TO STDOUT"
        );
        let company = usages
            .iter()
            .find(|(oid, _)| *oid == 3)
            .map(|(_, u)| u.clone())
            .expect("company");
        let (col, probe) = plan.probe(&company).expect("probe");
        assert_eq!(col, "id");
        assert_eq!(probe.column, "company_id");
        assert!(probe.parent.is_empty());
        let full: Vec<u32> = plan.needs_full_identity().iter().map(|(o, _)| *o).collect();
        assert!(
            full.contains(&2) && full.contains(&4) && !full.contains(&3),
            "{full:?}"
        );
    }
}
