//! Convergence check run at the end of every workload: the index must hold
//! exactly the table's primary keys, and a random sample of documents must
//! equal their rows column by column (compared by PostgreSQL itself, by
//! casting each document field back to the column's type).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::harness::{Harness, INDEX};

/// How many random rows are compared with their documents.
const SAMPLE: i64 = 300;

/// Checks the index against `table`; `Ok(summary)` when they agree,
/// `Err(reason)` when they do not (or the check itself failed).
pub async fn converged(h: &Harness, table: &str, timeout: Duration) -> Result<String, String> {
    check(h, table, timeout)
        .await
        .map_err(|e| format!("{e:#}"))?
}

async fn check(h: &Harness, table: &str, timeout: Duration) -> Result<Result<String, String>> {
    // Let any tail of the stream land first: the counts must meet.
    let deadline = Instant::now() + timeout;
    let rows = loop {
        let rows: i64 =
            h.db.query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await?
                .get(0);
        let docs = h.sink.settled_count(INDEX).await?;
        if usize::try_from(rows).ok() == Some(docs) {
            break rows;
        }
        if Instant::now() >= deadline {
            return Ok(Err(format!(
                "table has {rows} rows but the index holds {docs} documents"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Same set of ids.
    let pg_ids: HashSet<String> =
        h.db.query(&format!("SELECT id::text FROM {table}"), &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
    let sink_ids: HashSet<String> = h.sink.ids(INDEX).await?.into_iter().collect();
    let missing: Vec<&String> = pg_ids.difference(&sink_ids).take(5).collect();
    let extra: Vec<&String> = sink_ids.difference(&pg_ids).take(5).collect();
    if !missing.is_empty() || !extra.is_empty() {
        return Ok(Err(format!(
            "ids differ: rows without a document (first 5) {missing:?}, documents without a row {extra:?}"
        )));
    }

    // Sampled documents equal their rows.
    let sample: Vec<i64> =
        h.db.query(
            &format!(
                "(SELECT id FROM {table} ORDER BY random() LIMIT {SAMPLE}) \
                 UNION (SELECT max(id) FROM {table}) UNION (SELECT min(id) FROM {table})"
            ),
            &[],
        )
        .await?
        .iter()
        .filter_map(|r| r.get::<_, Option<i64>>(0))
        .collect();
    if let Err(why) = compare_ids(h, table, &sample).await? {
        return Ok(Err(why));
    }
    Ok(Ok(format!(
        "{rows} rows = {rows} docs, {} sampled equal",
        sample.len()
    )))
}

/// Checks that the documents of rows `ids` equal those rows, column by
/// column; `Err(reason)` names the first one that does not.
pub async fn documents_equal_rows(h: &Harness, table: &str, ids: &[i64]) -> Result<(), String> {
    compare_ids(h, table, ids)
        .await
        .map_err(|e| format!("{e:#}"))?
}

async fn compare_ids(h: &Harness, table: &str, ids: &[i64]) -> Result<Result<(), String>> {
    let columns: Vec<(String, String)> =
        h.db.query(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&table],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let compare_sql = compare_query(table, &columns);
    let compare =
        h.db.prepare(&compare_sql)
            .await
            .with_context(|| format!("preparing {compare_sql}"))?;
    for id in ids {
        let Some((version, source)) = h.sink.get(INDEX, &id.to_string()).await? else {
            return Ok(Err(format!("document {id} vanished during the check")));
        };
        if version == 0 {
            return Ok(Err(format!("document {id} has version 0")));
        }
        let text =
            String::from_utf8(source).map_err(|_| anyhow::anyhow!("document {id} is not UTF-8"))?;
        let row = match h.db.query_opt(&compare, &[id, &text]).await {
            Ok(Some(row)) => row,
            Ok(None) => return Ok(Err(format!("row {id} vanished during the check"))),
            Err(e) => {
                return Ok(Err(format!(
                    "document {id} does not fit its columns ({e}): {text}"
                )))
            }
        };
        let keys: i64 = row.get(columns.len());
        let wrong: Vec<&str> = columns
            .iter()
            .enumerate()
            .filter(|(i, _)| !row.get::<_, bool>(*i))
            .map(|(_, (name, _))| name.as_str())
            .collect();
        if !wrong.is_empty() || keys != columns.len() as i64 {
            return Ok(Err(format!(
                "document {id} differs from its row (columns {wrong:?}, {keys} fields for {} columns): {text}",
                columns.len()
            )));
        }
    }
    Ok(Ok(()))
}

/// `SELECT <field == column>…, <field count> FROM table WHERE id = $1`, with
/// the document as `$2`.
fn compare_query(table: &str, columns: &[(String, String)]) -> String {
    let mut parts: Vec<String> = columns
        .iter()
        .map(|(name, ty)| {
            format!(
                "((($2::text)::jsonb ->> {}))::{ty} IS NOT DISTINCT FROM t.{}",
                quote_literal(name),
                quote_ident(name)
            )
        })
        .collect();
    parts.push("(SELECT count(*) FROM jsonb_object_keys(($2::text)::jsonb))".to_owned());
    format!("SELECT {} FROM {table} t WHERE t.id = $1", parts.join(", "))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_comparison() {
        let sql = compare_query(
            "items",
            &[
                ("id".into(), "bigint".into()),
                ("it's".into(), "timestamp with time zone".into()),
            ],
        );
        assert!(sql.contains("->> 'id'))::bigint IS NOT DISTINCT FROM t.\"id\""));
        assert!(sql.contains("->> 'it''s'))::timestamp with time zone"));
        assert!(sql.ends_with("FROM items t WHERE t.id = $1"));
    }
}
