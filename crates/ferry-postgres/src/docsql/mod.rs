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

use ferry_core::plan::{Link, Node, Probe};
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

/// `(SELECT *, computed AS field… FROM table WHERE filter AND
/// not-deleted)`, or the bare table when there is nothing to add.
fn source(n: &Node) -> String {
    let mut conds: Vec<String> = Vec::new();
    if let Some(f) = &n.filter {
        conds.push(format!("({f})"));
    }
    if let Some(s) = soft_clause(n) {
        conds.push(s);
    }
    if conds.is_empty() && n.computed.is_empty() {
        return n.table.qualified();
    }
    let mut select = "*".to_string();
    for (field, sql) in &n.computed {
        let _ = write!(select, ", ({sql}) AS {}", quote_ident(field));
    }
    let mut out = format!("(SELECT {select} FROM {}", n.table.qualified());
    if !conds.is_empty() {
        let _ = write!(out, " WHERE {}", conds.join(" AND "));
    }
    out.push(')');
    out
}

/// Which roots a build statement reads.
enum Roots<'a> {
    /// Every root.
    All,
    /// The roots with these primary-key texts.
    Keys(&'a [Vec<String>]),
    /// At most `limit` roots in key order, after key `after`.
    Chunk {
        after: Option<&'a [String]>,
        limit: usize,
    },
    /// The roots whose key sorts after `after` and up to `upto` (both
    /// optional), in key order.
    Range {
        after: Option<&'a [String]>,
        upto: Option<&'a [String]>,
    },
}

/// The `COPY … TO STDOUT` that builds documents: every root (`keys`
/// `None`, for backfill and verify) or the roots with these primary-key
/// texts. Output columns: the root's selected columns, then its key
/// columns, then one JSON value per child and one count per count, then
/// the routing column's text when the index is routed.
///
/// The statement is set-based: the roots are read first (`ferry_r0`),
/// then every related table once for the whole batch, restricted to the
/// join values of the rows read at the level above (`ferry_r1`, …), and
/// aggregated per join value (`ferry_a1`, …; counts `ferry_n1`, …) before
/// being joined to their parents. Its cost grows with the rows involved,
/// never with roots × table size, even where no index covers a foreign key.
pub fn build_sql(plan: &Node, keys: Option<&[Vec<String>]>) -> String {
    build(
        plan,
        match keys {
            Some(k) => Roots::Keys(k),
            None => Roots::All,
        },
    )
}

/// Like [`build_sql`] for every root, but one key-ordered chunk:
/// roots whose primary key sorts after `after`, at most `limit` of them.
/// Chunks let a long backfill resume where it stopped.
pub fn build_chunk_sql(plan: &Node, after: Option<&[String]>, limit: usize) -> String {
    build(plan, Roots::Chunk { after, limit })
}

/// Like [`build_chunk_sql`] for a key range: the roots whose primary key
/// sorts after `after` and not after `upto` (`None`: unbounded), in key
/// order. Parallel backfill chunks are such ranges, so every key falls in
/// exactly one chunk whatever snapshot each chunk reads.
pub fn build_range_sql(plan: &Node, after: Option<&[String]>, upto: Option<&[String]>) -> String {
    build(plan, Roots::Range { after, upto })
}

/// The key `rows` keys after `after` in the root table (all its rows,
/// whatever the index's filters), or nothing when fewer rows follow: the
/// upper end of the next backfill chunk. An index-only walk of `rows`
/// entries of the primary key, so its cost grows with the chunk, not with
/// the table.
pub fn chunk_end_sql(plan: &Node, after: Option<&[String]>, rows: usize) -> String {
    let key_cols = key_list(plan);
    let texts = plan
        .table
        .key
        .iter()
        .map(|k| format!("t0.{}", quote_ident(k)))
        .collect::<Vec<_>>()
        .join(", ");
    let mut sql = format!("COPY (SELECT {texts} FROM {} t0", plan.table.qualified());
    if let Some(after) = after {
        let _ = write!(sql, " WHERE ({key_cols}) > ({})", literals(after));
    }
    let _ = write!(
        sql,
        " ORDER BY {key_cols} OFFSET {} LIMIT 1) TO STDOUT",
        rows.max(1) - 1
    );
    sql
}

/// `t0.k1, t0.k2, …`: the root's key columns.
fn key_list(plan: &Node) -> String {
    plan.table
        .key
        .iter()
        .map(|k| format!("t0.{}", quote_ident(k)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Key texts as SQL literals, comma-separated.
fn literals(key: &[String]) -> String {
    key.iter()
        .map(|v| quote_literal(v))
        .collect::<Vec<_>>()
        .join(", ")
}

fn build(plan: &Node, roots: Roots<'_>) -> String {
    let key_cols = key_list(plan);
    let mut r0 = format!("SELECT * FROM {} t0", source(plan));
    match roots {
        Roots::All => {}
        Roots::Keys(keys) => {
            let _ = write!(r0, " WHERE {}", key_in("t0", &plan.table.key, keys));
        }
        Roots::Chunk { after, limit } => {
            if let Some(after) = after {
                let _ = write!(r0, " WHERE ({key_cols}) > ({})", literals(after));
            }
            let _ = write!(r0, " ORDER BY {key_cols} LIMIT {limit}");
        }
        Roots::Range { after, upto } => {
            let mut conds = Vec::new();
            if let Some(after) = after {
                conds.push(format!("({key_cols}) > ({})", literals(after)));
            }
            if let Some(upto) = upto {
                conds.push(format!("({key_cols}) <= ({})", literals(upto)));
            }
            if !conds.is_empty() {
                let _ = write!(r0, " WHERE {}", conds.join(" AND "));
            }
        }
    }
    let mut g = Gen {
        ctes: vec![format!("ferry_r0 AS ({r0})")],
        next: 1,
    };
    let (values, joins) = g.relations(plan, 0);
    let mut cols: Vec<String> = plan
        .table
        .columns
        .iter()
        .map(|c| format!("t0.{}", quote_ident(&c.name)))
        .collect();
    cols.extend(
        plan.table
            .key
            .iter()
            .map(|k| format!("t0.{}", quote_ident(k))),
    );
    cols.extend(values);
    if let Some(r) = &plan.routing {
        cols.push(format!("t0.{}", quote_ident(r)));
    }
    let mut sql = format!(
        "COPY (WITH {} SELECT {} FROM ferry_r0 t0{joins}",
        g.ctes.join(", "),
        cols.join(", ")
    );
    if let Roots::Chunk { .. } | Roots::Range { .. } = roots {
        let _ = write!(sql, " ORDER BY {key_cols}");
    }
    sql.push_str(") TO STDOUT");
    sql
}

/// The common table expressions of one build statement, in dependency order.
struct Gen {
    ctes: Vec<String>,
    /// Number of the next related node or count (`t1`, `ferry_r1`, …).
    next: usize,
}

impl Gen {
    /// Adds the CTEs of `node`'s children and counts, whose rows
    /// `ferry_r{at}` (alias `t{at}`) holds; returns the value expressions
    /// for `node`'s row (one per child, one per count) and the joins they need.
    fn relations(&mut self, node: &Node, at: usize) -> (Vec<String>, String) {
        let pa = format!("t{at}");
        let parent = format!("ferry_r{at}");
        let mut values = Vec::new();
        let mut joins = String::new();
        for c in &node.children {
            let i = self.next;
            self.next += 1;
            let Some(parent_col) = self.child(c, i, &parent) else {
                values.push("NULL".into());
                continue;
            };
            let _ = write!(
                joins,
                " LEFT JOIN ferry_a{i} ON ferry_a{i}.k = {pa}.{}",
                quote_ident(&parent_col)
            );
            values.push(match c.link {
                Link::BelongsTo { .. } => format!("ferry_a{i}.v"),
                _ => format!("coalesce(ferry_a{i}.v, '[]'::json)"),
            });
        }
        for c in &node.counts {
            let i = self.next;
            self.next += 1;
            let a = format!("t{i}");
            let src = match &c.filter {
                Some(f) => format!("(SELECT * FROM {} WHERE ({f}))", c.table),
                None => c.table.clone(),
            };
            let fk = quote_ident(&c.fk);
            let refs = quote_ident(&c.references);
            self.ctes.push(format!(
                "ferry_n{i} AS (SELECT {a}.{fk} AS k, count(*) AS n FROM {src} {a} WHERE {a}.{fk} IN (SELECT {refs} FROM {parent}) GROUP BY {a}.{fk})"
            ));
            let _ = write!(joins, " LEFT JOIN ferry_n{i} ON ferry_n{i}.k = {pa}.{refs}");
            values.push(format!("coalesce(ferry_n{i}.n, 0)"));
        }
        (values, joins)
    }

    /// Adds the CTEs of child `c` (number `i`) under the rows `parent`:
    /// `ferry_r{i}`, its rows for those parents (with `ferry_k`, the parent's
    /// join value, and `ferry_o`, the position among that parent's rows),
    /// then its children's, then `ferry_a{i}` (`k`, `v`: the JSON value per
    /// join value). Returns the parent column `k` matches.
    fn child(&mut self, c: &Node, i: usize, parent: &str) -> Option<String> {
        let a = format!("t{i}");
        let src = source(c);
        let order = match &c.order_by {
            Some(o) => qualify_order(o, &a),
            None => c
                .table
                .key
                .iter()
                .map(|k| format!("{a}.{}", quote_ident(k)))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let (rows, parent_col) = match &c.link {
            Link::Root => return None,
            Link::BelongsTo { fk, references } => {
                let r = quote_ident(references);
                (
                    format!(
                        "SELECT DISTINCT ON ({a}.{r}) {a}.*, {a}.{r} AS ferry_k, 1 AS ferry_o FROM {src} {a} WHERE {a}.{r} IN (SELECT {} FROM {parent})",
                        quote_ident(fk)
                    ),
                    fk.clone(),
                )
            }
            Link::HasMany { fk, references } => {
                let f = quote_ident(fk);
                (
                    format!(
                        "SELECT {a}.*, {a}.{f} AS ferry_k, row_number() OVER (PARTITION BY {a}.{f} ORDER BY {order}) AS ferry_o FROM {src} {a} WHERE {a}.{f} IN (SELECT {} FROM {parent})",
                        quote_ident(references)
                    ),
                    references.clone(),
                )
            }
            Link::Through {
                join,
                fk,
                references,
                other_key,
                target_ref,
                ..
            } => {
                let f = quote_ident(fk);
                (
                    format!(
                        "SELECT {a}.*, j{a}.{f} AS ferry_k, row_number() OVER (PARTITION BY j{a}.{f} ORDER BY {order}) AS ferry_o FROM {src} {a} JOIN {join} j{a} ON j{a}.{} = {a}.{} WHERE j{a}.{f} IN (SELECT {} FROM {parent})",
                        quote_ident(other_key),
                        quote_ident(target_ref),
                        quote_ident(references)
                    ),
                    references.clone(),
                )
            }
        };
        let rows = match c.limit {
            Some(l) => format!("SELECT * FROM ({rows}) {a} WHERE {a}.ferry_o <= {l}"),
            None => rows,
        };
        self.ctes.push(format!("ferry_r{i} AS ({rows})"));
        let (values, joins) = self.relations(c, i);
        let cols = c
            .table
            .columns
            .iter()
            // Each value's own text output, as the root's columns and the
            // stream give it (a cast to text differs for some types:
            // `char(n)` drops its padding, `boolean` prints `true`, `inet`
            // adds `/32`); concat() prints with the output function.
            .map(|col| {
                let c = format!("{a}.{}", quote_ident(&col.name));
                format!("CASE WHEN {c} IS NULL THEN NULL ELSE concat({c}) END")
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut parts = vec![format!("ARRAY[{cols}]::text[]")];
        parts.extend(values);
        let row = format!("json_build_array({})", parts.join(", "));
        self.ctes.push(match c.link {
            Link::BelongsTo { .. } => format!(
                "ferry_a{i} AS (SELECT {a}.ferry_k AS k, {row} AS v FROM ferry_r{i} {a}{joins})"
            ),
            _ => format!(
                "ferry_a{i} AS (SELECT {a}.ferry_k AS k, json_agg({row} ORDER BY {a}.ferry_o) AS v FROM ferry_r{i} {a}{joins} GROUP BY {a}.ferry_k)"
            ),
        });
        Some(parent_col)
    }
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
        .map(|k| format!("t0.{}", quote_ident(k)))
        .collect::<Vec<_>>()
        .join(", ");
    Some(format!(
        "COPY (SELECT DISTINCT {keys} FROM {} t0{joins} WHERE {cond}) TO STDOUT",
        plan.table.qualified()
    ))
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
mod live_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::plan::sample_users_plan;

    #[test]
    fn builds_one_statement_for_a_batch_of_roots() {
        let plan = sample_users_plan();
        let sql = build_sql(&plan, Some(&[vec!["1".into()], vec!["2".into()]]));
        assert!(
            sql.starts_with(
                "COPY (WITH ferry_r0 AS (SELECT * FROM \"public\".\"users\" t0 WHERE t0.\"id\" IN ('1', '2')), "
            ),
            "{sql}"
        );
        assert!(
            sql.contains(" SELECT t0.\"id\", t0.\"email\", t0.\"id\", "),
            "{sql}"
        );
        assert!(sql.contains("ORDER BY t2.\"sku\" desc"), "{sql}");
        assert_eq!(sql.matches("json_agg").count(), 2, "{sql}");
        assert!(sql.ends_with(") TO STDOUT"), "{sql}");
    }

    #[test]
    fn a_routed_build_returns_the_routing_text_last() {
        let mut plan = sample_users_plan();
        plan.routing = Some("email".into());
        let sql = build_sql(&plan, None);
        assert!(sql.contains(", t0.\"email\" FROM ferry_r0 t0"), "{sql}");
    }

    #[test]
    fn computed_fields_are_read_as_columns_of_their_table() {
        let mut plan = sample_users_plan();
        plan.computed = vec![("domain".into(), "split_part(email, '@', 2)".into())];
        plan.filter = Some("id > 0".into());
        let sql = build_sql(&plan, None);
        assert!(
            sql.contains(
                "(SELECT *, (split_part(email, '@', 2)) AS \"domain\" FROM \"public\".\"users\" WHERE (id > 0)) t0"
            ),
            "{sql}"
        );
    }

    #[test]
    fn a_build_statement_names_each_table_once_per_use() {
        let plan = sample_users_plan();
        for sql in [
            build_sql(&plan, Some(&[vec!["1".into()]])),
            build_sql(&plan, None),
            build_chunk_sql(&plan, Some(&["9".into()]), 100),
        ] {
            // users, companies and line_items once; orders as a relation and a count.
            for (table, uses) in [
                ("\"users\"", 1),
                ("\"orders\"", 2),
                ("\"companies\"", 1),
                ("\"line_items\"", 1),
            ] {
                assert_eq!(sql.matches(table).count(), uses, "{table} in {sql}");
            }
        }
    }

    #[test]
    fn a_chunk_reads_roots_after_the_last_key_in_key_order() {
        let plan = sample_users_plan();
        let sql = build_chunk_sql(&plan, Some(&["9".into()]), 100);
        assert!(
            sql.starts_with(
                "COPY (WITH ferry_r0 AS (SELECT * FROM \"public\".\"users\" t0 WHERE (t0.\"id\") > ('9') ORDER BY t0.\"id\" LIMIT 100), "
            ),
            "{sql}"
        );
        assert!(sql.ends_with(" ORDER BY t0.\"id\") TO STDOUT"), "{sql}");
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
            "COPY (SELECT DISTINCT t0.\"id\" FROM \"public\".\"users\" t0 JOIN \"public\".\"orders\" t1 ON t1.\"user_id\" = t0.\"id\" WHERE t1.\"id\" IN ('10')) TO STDOUT"
        );
    }
}
