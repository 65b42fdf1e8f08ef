//! The SQL generated from a document plan ([`ferry_core::plan::Node`]):
//! the build statement (documents for a batch of root keys, or a key-ordered
//! backfill chunk) and the resolve statement (root keys whose documents a
//! changed related row feeds).
//!
//! Every statement is a `COPY (…) TO STDOUT` returning PostgreSQL text
//! (nested rows as JSON arrays of text); `ferry_core::plan::assemble` turns
//! a build row into a document. Generated SQL uses fixed aliases (`t0` for
//! the root, `t1`, `t2`, … for related tables); user filters run inside
//! `(SELECT * FROM table WHERE …)` sub-selects so they see only that
//! table's own columns.

use std::fmt::Write as _;

use ferry_core::plan::{CountNode, Link, Node, Probe};
use ferry_core::schema::{quote_ident, quote_literal};

fn soft_clause(n: &Node) -> Option<String> {
    n.soft_delete.as_ref().map(|(col, is_bool)| {
        if *is_bool {
            format!("NOT coalesce({}, false)", quote_ident(col))
        } else {
            format!("{} IS NULL", quote_ident(col))
        }
    })
}

/// `(SELECT * FROM table WHERE filter AND not-deleted)`, or the bare table.
fn source(n: &Node) -> String {
    let mut conds: Vec<String> = Vec::new();
    if let Some(f) = &n.filter {
        conds.push(format!("({f})"));
    }
    if let Some(s) = soft_clause(n) {
        conds.push(s);
    }
    if conds.is_empty() {
        n.table.qualified()
    } else {
        format!(
            "(SELECT * FROM {} WHERE {})",
            n.table.qualified(),
            conds.join(" AND ")
        )
    }
}

/// The `COPY … TO STDOUT` that builds documents: every root (`keys`
/// `None`, for backfill and verify) or the roots with these primary-key
/// texts. Output columns: the root's selected columns, then its key
/// columns, then one JSON value per child and one count per count.
pub fn build_sql(plan: &Node, keys: Option<&[Vec<String>]>) -> String {
    let mut sql = String::from("COPY (SELECT ");
    let mut first = true;
    let mut push = |sql: &mut String, e: &str| {
        if !std::mem::take(&mut first) {
            sql.push_str(", ");
        }
        sql.push_str(e);
    };
    for c in &plan.table.columns {
        push(&mut sql, &format!("t0.{}", quote_ident(&c.name)));
    }
    for k in &plan.table.key {
        push(&mut sql, &format!("t0.{}::text", quote_ident(k)));
    }
    let mut next = 1;
    for c in &plan.children {
        let e = child_expr(c, "t0", &mut next);
        push(&mut sql, &e);
    }
    for c in &plan.counts {
        push(&mut sql, &count_expr(c, "t0", &mut next));
    }
    let _ = write!(sql, " FROM {} t0", source(plan));
    if let Some(keys) = keys {
        sql.push_str(" WHERE ");
        sql.push_str(&key_in("t0", &plan.table.key, keys));
    }
    sql.push_str(") TO STDOUT");
    sql
}

/// Like [`build_sql`] for every root, but one key-ordered chunk:
/// roots whose primary key sorts after `after`, at most `limit` of them.
/// Chunks let a long backfill resume where it stopped.
pub fn build_chunk_sql(plan: &Node, after: Option<&[String]>, limit: usize) -> String {
    let all = build_sql(plan, None);
    let body = all
        .strip_prefix("COPY (")
        .and_then(|s| s.strip_suffix(") TO STDOUT"))
        .unwrap_or(&all);
    let cols = plan
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
pub fn resolve_sql(plan: &Node, probe: &Probe, values: &[String]) -> Option<String> {
    let mut joins = String::new();
    let mut alias = "t0".to_string();
    let mut node = plan;
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
    let keys = plan
        .table
        .key
        .iter()
        .map(|k| format!("t0.{}::text", quote_ident(k)))
        .collect::<Vec<_>>()
        .join(", ");
    Some(format!(
        "COPY (SELECT DISTINCT {keys} FROM {} t0{joins} WHERE {cond}) TO STDOUT",
        plan.table.qualified()
    ))
}

/// The JSON of one node row: `json_build_array(ARRAY[cols…]::text[], children…, counts…)`.
fn row_expr(n: &Node, alias: &str, next: &mut usize) -> String {
    let cols = n
        .table
        .columns
        .iter()
        .map(|c| format!("{alias}.{}::text", quote_ident(&c.name)))
        .collect::<Vec<_>>()
        .join(", ");
    let mut parts = vec![format!("ARRAY[{cols}]::text[]")];
    for c in &n.children {
        parts.push(child_expr(c, alias, next));
    }
    for c in &n.counts {
        parts.push(count_expr(c, alias, next));
    }
    format!("json_build_array({})", parts.join(", "))
}

/// The expression producing this child's value inside its parent `pa`.
fn child_expr(n: &Node, pa: &str, next: &mut usize) -> String {
    let a = format!("t{next}");
    *next += 1;
    let row = row_expr(n, &a, next);
    let src = source(n);
    match &n.link {
        Link::Root => "NULL".into(),
        Link::BelongsTo { fk, references } => format!(
            "(SELECT {row} FROM {src} {a} WHERE {a}.{} = {pa}.{} LIMIT 1)",
            quote_ident(references),
            quote_ident(fk)
        ),
        Link::HasMany { fk, references } => {
            let cond = format!("{a}.{} = {pa}.{}", quote_ident(fk), quote_ident(references));
            array_expr(n, &row, &format!("{src} {a}"), &cond, &a)
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
            array_expr(n, &row, &from, &cond, &a)
        }
    }
}

fn array_expr(n: &Node, row: &str, from: &str, cond: &str, a: &str) -> String {
    let order = match &n.order_by {
        Some(o) => qualify_order(o, a),
        None => n
            .table
            .key
            .iter()
            .map(|k| format!("{a}.{}", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(", "),
    };
    let limit = n.limit.map(|l| format!(" LIMIT {l}")).unwrap_or_default();
    format!(
        "coalesce((SELECT json_agg(s.v ORDER BY s.o) FROM (SELECT {row} AS v, row_number() OVER (ORDER BY {order}) AS o FROM {from} WHERE {cond} ORDER BY {order}{limit}) s), '[]'::json)"
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::plan::sample_users_plan;

    #[test]
    fn builds_one_statement_for_a_batch_of_roots() {
        let plan = sample_users_plan();
        let sql = build_sql(&plan, Some(&[vec!["1".into()], vec!["2".into()]]));
        assert!(
            sql.starts_with("COPY (SELECT t0.\"id\", t0.\"email\", t0.\"id\"::text"),
            "{sql}"
        );
        assert!(sql.contains("WHERE t0.\"id\" IN ('1', '2')"), "{sql}");
        assert!(sql.contains("ORDER BY t2.\"sku\" desc"), "{sql}");
        assert_eq!(sql.matches("json_agg").count(), 2, "{sql}");
    }

    #[test]
    fn resolves_a_grandchild_change_to_roots_in_one_statement() {
        let plan = sample_users_plan();
        let items = plan
            .usages()
            .into_iter()
            .find(|(oid, _)| *oid == 4)
            .map(|(_, u)| u)
            .expect("items");
        let (_, probe) = plan.probe(&items).expect("probe");
        let sql = resolve_sql(&plan, &probe, &["10".into()]).expect("sql");
        assert_eq!(
            sql,
            "COPY (SELECT DISTINCT t0.\"id\"::text FROM \"public\".\"users\" t0 JOIN \"public\".\"orders\" t1 ON t1.\"user_id\" = t0.\"id\" WHERE t1.\"id\" IN ('10')) TO STDOUT"
        );
    }
}
