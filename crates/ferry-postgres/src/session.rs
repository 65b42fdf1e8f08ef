//! The source's query session: everything the engine asks PostgreSQL over
//! an ordinary connection once start-up has resolved the catalog.
//!
//! The engine never writes or runs SQL itself. It names what it wants —
//! the documents of these roots, the roots a related change affects, the
//! next backfill chunk, whether the publication still covers the tables it
//! reads — and [`Session`] runs the statement (generated from the document
//! plan by `ferry-core`) and hands back parsed rows or typed answers.
//!
//! Cost: every statement here reads only the rows its arguments name (keys,
//! values, OIDs, one chunk), so its cost grows with those rows, never with
//! the whole table, except the explicit full reads (`build_documents` with
//! no keys) and the growing block sample of `sample_keys` when a table is
//! smaller than its estimate says.

use ferry_core::plan::{Lookup, Node, Probe};
use ferry_core::schema::quote_ident;
use ferry_core::{Lsn, TableShape};
use tokio_postgres::Client;

use crate::copy::CopyReader;
use crate::{catalog, SourceError};

/// An ordinary connection to the source database, with the pinned session
/// settings (see [`crate::SESSION_OPTIONS`]).
pub struct Session {
    pub(crate) client: Client,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

/// A table whose row-level security would hide rows from ferry's role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowSecurityHides {
    /// `schema.table`, for the message.
    pub table: String,
    /// The table quoted for SQL.
    pub table_sql: String,
    /// ferry's role.
    pub role: String,
    /// The role quoted for SQL.
    pub role_sql: String,
    /// FORCE ROW LEVEL SECURITY is set (the owner is subject too).
    pub forced: bool,
}

/// A replication slot on the server and the WAL it keeps from being removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotWal {
    /// `slot_name`.
    pub name: String,
    /// `logical` or `physical`.
    pub kind: String,
    /// The database of a logical slot (empty for a physical one).
    pub database: String,
    /// Whether a consumer holds it now.
    pub active: bool,
    /// `pg_current_wal_lsn() - restart_lsn` in bytes (0 without a restart LSN).
    pub retained_bytes: i64,
    /// The same, as `pg_size_pretty` writes it.
    pub retained: String,
    /// `wal_status` (`reserved`, `extended`, `unreserved`, `lost`; empty if unknown).
    pub wal_status: String,
}

/// A table a publication no longer covers, though an index reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uncovered {
    /// The publication.
    pub publication: String,
    /// `schema.table`.
    pub table: String,
}

/// One table of a lookup's partition tree (names quoted for SQL).
struct TreeTable {
    /// The lookup's position.
    lookup: usize,
    table: String,
    partitioned: bool,
    column: String,
    /// The table's schema.
    schema: String,
    /// The index ferry's advice names for this table (unqualified).
    index: String,
    /// The parent's index of that name (none for the lookup's own table).
    parent_index: Option<String>,
    /// A valid, non-partial index leads with the column.
    indexed: bool,
    /// An existing one-column index on it that can be attached to the parent's.
    attachable: Option<String>,
}

impl TreeTable {
    fn from_row(r: &tokio_postgres::Row) -> TreeTable {
        let i: i64 = r.get(0);
        TreeTable {
            lookup: usize::try_from(i - 1).unwrap_or(0),
            table: r.get(1),
            partitioned: r.get(2),
            column: r.get(3),
            schema: r.get(4),
            index: r.get(5),
            parent_index: r.get(6),
            indexed: r.get(7),
            attachable: r.get(8),
        }
    }
}

/// The statements that index a lookup's column, given its partition tree
/// (parents first); `None` when every table that holds rows has an index.
fn index_advice(tree: &[TreeTable]) -> Option<(usize, String)> {
    let root = tree.first()?;
    if !root.partitioned {
        return (!root.indexed).then(|| {
            let sql = format!(
                "CREATE INDEX CONCURRENTLY ON {} ({});",
                root.table, root.column
            );
            (root.lookup, sql)
        });
    }
    if tree.iter().all(|t| t.partitioned || t.indexed) {
        return None;
    }
    let mut sql = Vec::new();
    for t in tree {
        let index = if t.partitioned {
            sql.push(format!(
                "CREATE INDEX {} ON ONLY {} ({});",
                t.index, t.table, t.column
            ));
            format!("{}.{}", t.schema, t.index)
        } else if let Some(existing) = &t.attachable {
            existing.clone()
        } else {
            sql.push(format!(
                "CREATE INDEX CONCURRENTLY {} ON {} ({});",
                t.index, t.table, t.column
            ));
            format!("{}.{}", t.schema, t.index)
        };
        if let Some(parent) = &t.parent_index {
            sql.push(format!("ALTER INDEX {parent} ATTACH PARTITION {index};"));
        }
    }
    Some((root.lookup, sql.join("\n")))
}

fn oids_param(oids: &[u32]) -> Vec<i64> {
    let mut v: Vec<i64> = oids.iter().map(|o| i64::from(*o)).collect();
    v.sort_unstable();
    v.dedup();
    v
}

impl Session {
    /// `(schema, table)` of each of these tables, sorted, for the publication.
    pub async fn table_names(&self, oids: &[u32]) -> Result<Vec<(String, String)>, SourceError> {
        let rows = self
            .client
            .query(
                "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.oid::int8 = ANY($1) ORDER BY 1, 2",
                &[&oids_param(oids)],
            )
            .await
            .map_err(|e| SourceError::from_pg("reading table names", e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Tables among these whose row-level security applies to ferry's role
    /// (enabled, and the role is neither owner, superuser nor BYPASSRLS; or
    /// FORCE ROW LEVEL SECURITY) and whose policies do not plainly grant the
    /// role every row (a permissive `USING (true)` for SELECT or ALL, and no
    /// restrictive policy that narrows it). Such a table's copy would be a
    /// subset of what the stream delivers.
    pub async fn row_security_hides(
        &self,
        oids: &[u32],
    ) -> Result<Vec<RowSecurityHides>, SourceError> {
        let rows = self
            .client
            .query(
                "WITH me AS (SELECT oid, rolname, rolbypassrls OR rolsuper AS bypass FROM pg_roles WHERE rolname = current_user) \
                 SELECT n.nspname::text, c.relname::text, me.rolname::text, c.relforcerowsecurity \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, me \
                 WHERE c.oid::int8 = ANY($1) AND c.relrowsecurity AND NOT me.bypass \
                   AND (c.relforcerowsecurity OR NOT pg_has_role(me.oid, c.relowner, 'USAGE')) \
                   AND NOT ( \
                     EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid AND p.polpermissive \
                             AND p.polcmd IN ('r', '*') AND pg_get_expr(p.polqual, p.polrelid) = 'true' \
                             AND EXISTS (SELECT 1 FROM unnest(p.polroles) g WHERE g = 0 OR pg_has_role(me.oid, g, 'MEMBER'))) \
                     AND NOT EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid AND NOT p.polpermissive \
                             AND p.polcmd IN ('r', '*') AND coalesce(pg_get_expr(p.polqual, p.polrelid), 'true') <> 'true' \
                             AND EXISTS (SELECT 1 FROM unnest(p.polroles) g WHERE g = 0 OR pg_has_role(me.oid, g, 'MEMBER')))) \
                 ORDER BY 1, 2",
                &[&oids_param(oids)],
            )
            .await
            .map_err(|e| SourceError::from_pg("checking row-level security", e))?;
        Ok(rows
            .iter()
            .map(|r| {
                let (schema, table, role): (String, String, String) =
                    (r.get(0), r.get(1), r.get(2));
                RowSecurityHides {
                    table: format!("{schema}.{table}"),
                    table_sql: format!("{}.{}", quote_ident(&schema), quote_ident(&table)),
                    role_sql: quote_ident(&role),
                    role,
                    forced: r.get(3),
                }
            })
            .collect())
    }

    /// Prepares (never runs) `SELECT 1 FROM table WHERE (filter) ORDER BY
    /// order_by` so a bad expression fails at start-up and in `check`, with
    /// the config key (`key.where`, `key.order_by`) and the server's reason.
    pub async fn check_clauses(
        &self,
        key: &str,
        table: &TableShape,
        filter: Option<&str>,
        order_by: Option<&str>,
    ) -> Result<(), SourceError> {
        let clauses = [
            ("where", filter.map(|f| format!(" WHERE ({f})"))),
            ("order_by", order_by.map(|o| format!(" ORDER BY {o}"))),
        ];
        for (name, clause) in clauses {
            let Some(clause) = clause else { continue };
            let sql = format!("SELECT 1 FROM {}{clause}", table.qualified());
            if let Err(e) = self.client.prepare(&sql).await {
                let Some(db) = e.as_db_error() else {
                    return Err(SourceError::from_pg("checking filters", e));
                };
                return Err(SourceError::Operator(format!(
                    "{key}.{name}: {} (on table {}); fix {key}.{name}",
                    db.message(),
                    table.qualified_plain()
                )));
            }
        }
        Ok(())
    }

    /// The type OID of computed field `sql`, an expression over `table`'s
    /// columns, giving one value per row: it is prepared in a `WHERE`
    /// first, where PostgreSQL refuses aggregates, window functions and
    /// set-returning functions (each would change the rows a build reads),
    /// then as `SELECT (sql) FROM table` for its type. An error names `key`
    /// and what PostgreSQL said.
    pub async fn expression_type(
        &self,
        key: &str,
        table: &TableShape,
        sql: &str,
    ) -> Result<u32, SourceError> {
        let per_row = format!("SELECT 1 FROM {} WHERE ({sql}) IS NULL", table.qualified());
        if let Err(e) = self.client.prepare(&per_row).await {
            return Err(match e.as_db_error() {
                Some(db) => SourceError::Operator(format!(
                    "{key}.sql: {} (in {sql:?}, on table {}); a computed field must be one value \
                     per row of its table (no aggregate, window or set-returning function); fix {key}.sql",
                    db.message(),
                    table.qualified_plain()
                )),
                None => SourceError::from_pg("checking computed fields", e),
            });
        }
        let stmt = format!("SELECT ({sql}) FROM {}", table.qualified());
        match self.client.prepare(&stmt).await {
            Ok(s) => match s.columns() {
                [one] => Ok(one.type_().oid()),
                _ => Err(SourceError::Operator(format!(
                    "{key}.sql: {sql:?} is not one expression (on table {}); fix {key}.sql",
                    table.qualified_plain()
                ))),
            },
            Err(e) => match e.as_db_error() {
                Some(db) => Err(SourceError::Operator(format!(
                    "{key}.sql: {} (in {sql:?}, on table {}); fix {key}.sql",
                    db.message(),
                    table.qualified_plain()
                ))),
                None => Err(SourceError::from_pg("checking computed fields", e)),
            },
        }
    }

    /// The lookups among these that no valid, non-partial index leads with,
    /// each as (its position in `lookups`, the statements that add one).
    /// A plain table gets `CREATE INDEX CONCURRENTLY`. PostgreSQL refuses
    /// that on a partitioned table, whose lookups use each leaf's own
    /// index: it counts as unindexed when a leaf lacks one, and gets an
    /// invalid index `ON ONLY` the root (and each partitioned level), then
    /// per leaf an index built concurrently, or an existing one-column
    /// index, attached to its parent's with `ALTER INDEX … ATTACH
    /// PARTITION` (the root's index turns valid with the last one).
    pub async fn unindexed_lookups(
        &self,
        lookups: &[Lookup],
    ) -> Result<Vec<(usize, String)>, SourceError> {
        let oids: Vec<i64> = lookups.iter().map(|l| i64::from(l.oid)).collect();
        let cols: Vec<&str> = lookups.iter().map(|l| l.column.as_str()).collect();
        // One row per table of each lookup's partition tree (the table
        // alone when it is not partitioned), parents before children.
        let rows = self
            .client
            .query(
                "SELECT w.i, format('%I.%I', n.nspname, c.relname), c.relkind = 'p', format('%I', w.col),
                   format('%I', n.nspname), format('%I', left(c.relname || '_' || w.col, 59) || '_idx'),
                   CASE WHEN pc.oid IS NOT NULL
                     THEN format('%I.%I', pn.nspname, left(pc.relname || '_' || w.col, 59) || '_idx') END,
                   EXISTS (SELECT 1 FROM pg_index x
                     JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
                     WHERE x.indrelid = c.oid AND a.attname = w.col AND x.indisvalid AND x.indpred IS NULL),
                   (SELECT format('%I.%I', n.nspname, ic.relname) FROM pg_index x
                     JOIN pg_class ic ON ic.oid = x.indexrelid
                     JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
                     WHERE x.indrelid = c.oid AND a.attname = w.col AND x.indnatts = 1 AND x.indisvalid
                       AND NOT x.indisunique AND x.indpred IS NULL AND x.indexprs IS NULL
                       AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = x.indexrelid)
                     ORDER BY ic.relname LIMIT 1)
                 FROM unnest($1::int8[], $2::text[]) WITH ORDINALITY AS w(oid, col, i)
                 CROSS JOIN LATERAL (
                   SELECT t.relid, t.parentrelid, t.level FROM pg_partition_tree(w.oid::oid) t
                   UNION ALL SELECT w.oid::oid, NULL::oid, 0
                     WHERE NOT EXISTS (SELECT 1 FROM pg_partition_tree(w.oid::oid))) t
                 JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
                 LEFT JOIN pg_class pc ON pc.oid = t.parentrelid AND t.level > 0
                 LEFT JOIN pg_namespace pn ON pn.oid = pc.relnamespace
                 ORDER BY w.i, t.level, c.relname",
                &[&oids, &cols],
            )
            .await
            .map_err(|e| SourceError::from_pg("checking indexes on foreign keys", e))?;
        let mut out: Vec<(usize, String)> = Vec::new();
        let mut tree: Vec<TreeTable> = Vec::new();
        let mut at = None;
        for r in rows.iter().map(TreeTable::from_row) {
            if at.is_some_and(|i| i != r.lookup) {
                out.extend(index_advice(&tree));
                tree.clear();
            }
            at = Some(r.lookup);
            tree.push(r);
        }
        out.extend(index_advice(&tree));
        Ok(out)
    }

    /// Sets (with `manage`, else asks for) REPLICA IDENTITY FULL on each
    /// table in `needs` (OID, the column whose old values are needed). A
    /// partitioned table's old rows are logged by its leaf partitions, so
    /// each leaf gets it too (PostgreSQL does not pass it down, not even to
    /// partitions created or attached later).
    pub async fn ensure_full_identities(
        &self,
        needs: &[(u32, String)],
        manage: bool,
    ) -> Result<(), SourceError> {
        let mut done = std::collections::HashSet::new();
        for (oid, column) in needs {
            if !done.insert(*oid) {
                continue;
            }
            let rows = self
                .client
                .query(
                    "SELECT n.nspname::text, c.relname::text, c.relreplident::text, c.oid::int8 FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE c.oid = $1::int8::oid OR c.oid IN (SELECT relid FROM pg_partition_tree($1::int8::oid)) \
                     ORDER BY c.oid <> $1::int8::oid, 1, 2",
                    &[&i64::from(*oid)],
                )
                .await
                .map_err(|e| SourceError::from_pg("reading replica identities", e))?;
            for row in rows {
                let ident: String = row.get(2);
                if ident == "f" {
                    continue;
                }
                let table_oid: i64 = row.get(3);
                let shape = TableShape {
                    schema: row.get(0),
                    name: row.get(1),
                    oid: table_oid as u32,
                    columns: Vec::new(),
                    key: Vec::new(),
                };
                let why =
                    format!("old values of {column:?} find the documents a changed row leaves");
                catalog::ensure_full_identity(self, &shape, &why, manage).await?;
            }
        }
        Ok(())
    }

    /// The leaf partitions of every partitioned table among these, as
    /// (partitioned table OID, leaf OID), sorted: what the worker compares
    /// to notice partitions attached or detached while it runs.
    pub async fn partition_leaves(&self, oids: &[u32]) -> Result<Vec<(u32, u32)>, SourceError> {
        let rows = self
            .client
            .query(
                "SELECT c.oid::int8, t.relid::oid::int8 FROM pg_class c, pg_partition_tree(c.oid) t \
                 WHERE c.oid::int8 = ANY($1) AND c.relkind = 'p' AND t.isleaf ORDER BY 1, 2",
                &[&oids_param(oids)],
            )
            .await
            .map_err(|e| SourceError::from_pg("reading partitions", e))?;
        Ok(rows
            .iter()
            .map(|r| {
                let (root, leaf): (i64, i64) = (r.get(0), r.get(1));
                (root as u32, leaf as u32)
            })
            .collect())
    }

    /// Whether table `oid` holds at least one row (reads at most one);
    /// `None` when the table no longer exists.
    pub async fn has_rows(&self, oid: u32) -> Result<Option<bool>, SourceError> {
        let name = self
            .client
            .query_opt(
                "SELECT n.nspname::text, c.relname::text FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1::int8::oid",
                &[&i64::from(oid)],
            )
            .await
            .map_err(|e| SourceError::from_pg("looking up a partition", e))?;
        let Some(name) = name else { return Ok(None) };
        let (schema, table): (String, String) = (name.get(0), name.get(1));
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {}.{})",
            quote_ident(&schema),
            quote_ident(&table)
        );
        let row = self
            .client
            .query_one(&sql, &[])
            .await
            .map_err(|e| SourceError::from_pg("reading a partition", e))?;
        Ok(Some(row.get(0)))
    }

    /// Fails with [`SourceError::PublicationLost`] when `publication` no
    /// longer covers one of these tables: its changes are no longer
    /// streamed, so an index reading it would silently drift.
    pub async fn check_coverage(&self, publication: &str, oids: &[u32]) -> Result<(), SourceError> {
        let rows = self
            .client
            .query(
                "SELECT n.nspname::text || '.' || c.relname::text FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.oid::int8 = ANY($1) AND NOT EXISTS ( \
                   SELECT 1 FROM pg_publication p WHERE p.pubname = $2 AND (p.puballtables OR EXISTS ( \
                     SELECT 1 FROM pg_publication_tables t WHERE t.pubname = p.pubname \
                       AND t.schemaname = n.nspname AND t.tablename = c.relname)))",
                &[&oids_param(oids), &publication],
            )
            .await
            .map_err(|e| SourceError::from_pg("checking publication coverage", e))?;
        match rows.first() {
            Some(row) => Err(SourceError::PublicationLost(Uncovered {
                publication: publication.to_string(),
                table: row.get(0),
            })),
            None => Ok(()),
        }
    }

    /// Writes a transactional logical message so an idle slot still
    /// advances (its Begin/Commit arrive and are confirmed like any
    /// transaction).
    pub async fn emit_heartbeat(&self) -> Result<(), SourceError> {
        self.client
            .execute(
                "SELECT pg_logical_emit_message(true, 'ferry_heartbeat', '')",
                &[],
            )
            .await
            .map_err(|e| SourceError::from_pg("writing a heartbeat", e))?;
        Ok(())
    }

    /// The server's current WAL write position.
    pub async fn current_wal_lsn(&self) -> Result<Lsn, SourceError> {
        let row = self
            .client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(|e| SourceError::from_pg("reading the WAL position", e))?;
        let text: String = row.get(0);
        text.parse().map_err(|e| SourceError::Server {
            what: "reading the WAL position".into(),
            code: "XX000".into(),
            message: format!("unexpected WAL position: {e}"),
        })
    }

    /// `ferry slot info`: the slot's state as (label, value) lines, or
    /// `None` when it does not exist.
    pub async fn slot_report(
        &self,
        slot: &str,
    ) -> Result<Option<Vec<(String, String)>>, SourceError> {
        let row = self
            .client
            .query_opt(
                "SELECT coalesce(plugin::text, ''), coalesce(database::text, ''), active, \
                        coalesce(active_pid::text, '-'), coalesce(restart_lsn::text, '-'), \
                        coalesce(confirmed_flush_lsn::text, '-'), coalesce(wal_status::text, '-'), \
                        coalesce(pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)), '-'), \
                        coalesce(pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)), '-') \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| SourceError::from_pg("reading pg_replication_slots", e))?;
        Ok(row.map(|r| {
            let active: bool = r.get(2);
            vec![
                ("slot".into(), slot.to_string()),
                ("plugin".into(), r.get(0)),
                ("database".into(), r.get(1)),
                ("active".into(), active.to_string()),
                ("active pid".into(), r.get(3)),
                ("restart lsn".into(), r.get(4)),
                ("confirmed flush lsn".into(), r.get(5)),
                ("wal status".into(), r.get(6)),
                ("retained wal".into(), r.get(7)),
                ("unconfirmed wal".into(), r.get(8)),
            ]
        }))
    }

    /// Every replication slot on the server with the WAL it retains, most first.
    pub async fn slots_wal(&self) -> Result<Vec<SlotWal>, SourceError> {
        let rows = self
            .client
            .query(
                "SELECT slot_name::text, slot_type, coalesce(database::text, ''), active, \
                        coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::int8, \
                        coalesce(wal_status, ''), \
                        pg_size_pretty(coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)) \
                 FROM pg_replication_slots ORDER BY 5 DESC, 1",
                &[],
            )
            .await
            .map_err(|e| SourceError::from_pg("reading pg_replication_slots", e))?;
        Ok(rows
            .iter()
            .map(|r| SlotWal {
                name: r.get(0),
                kind: r.get(1),
                database: r.get(2),
                active: r.get(3),
                retained_bytes: r.get(4),
                wal_status: r.get(5),
                retained: r.get(6),
            })
            .collect())
    }

    /// Drops the replication slot `slot` (it must not be in use).
    pub async fn drop_slot(&self, slot: &str) -> Result<(), SourceError> {
        self.client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .map_err(|e| SourceError::from_pg("dropping the replication slot", e))?;
        Ok(())
    }

    /// The planner's row estimate for `table` (-1 when unknown).
    pub async fn estimate_rows(&self, table: &TableShape) -> i64 {
        let sql = format!(
            "SELECT (CASE WHEN reltuples < 0 THEN -1 ELSE reltuples END)::int8 FROM pg_class WHERE oid = '{}'::regclass",
            table.qualified().replace('\'', "''")
        );
        match self.client.query_one(sql.as_str(), &[]).await {
            Ok(row) => row.get(0),
            Err(_) => -1,
        }
    }

    /// The primary keys of about `n` random rows of `table`, read from a
    /// `TABLESAMPLE SYSTEM` block sample sized from the planner's estimate
    /// (about three times `n` rows), so the cost grows with `n`, not with the
    /// table; the sample is enlarged (fourfold per try, up to the whole
    /// table) while it holds fewer than `n` rows. Blocks are sampled whole,
    /// so rows stored together are sampled together.
    pub async fn sample_keys(
        &self,
        table: &TableShape,
        n: usize,
    ) -> Result<Vec<Vec<String>>, SourceError> {
        let keys = table
            .key
            .iter()
            .map(|k| quote_ident(k))
            .collect::<Vec<_>>()
            .join(", ");
        let estimate = self.estimate_rows(table).await;
        let mut percent = if estimate > 0 {
            n as f64 * 300.0 / estimate as f64
        } else {
            1.0
        };
        let width = table.key.len();
        loop {
            percent = percent.clamp(0.001, 100.0);
            let sql = format!(
                "COPY (SELECT {keys} FROM {} TABLESAMPLE SYSTEM ({percent:.3}) ORDER BY random() LIMIT {n}) TO STDOUT",
                table.qualified()
            );
            let mut out = Vec::new();
            CopyReader::start(&self.client, &sql, "sampling rows")
                .await?
                .read_all(|row| out.push(row.texts(width)))
                .await?;
            if out.len() >= n || percent >= 100.0 {
                return Ok(out);
            }
            percent *= 4.0;
        }
    }

    /// The rows `plan` builds documents from, for these root keys (every
    /// root when `None`); `index` names the index in errors.
    pub async fn build_documents(
        &self,
        plan: &Node,
        keys: Option<&[Vec<String>]>,
        index: &str,
    ) -> Result<CopyReader, SourceError> {
        let sql = crate::docsql::build_sql(plan, keys);
        CopyReader::start(
            &self.client,
            &sql,
            &format!("building documents of index {index}"),
        )
        .await
    }

    /// The next backfill chunk of `plan`'s documents: at most `limit` roots
    /// in key order, after key `after` (from the start when `None`).
    pub async fn copy_chunk(
        &self,
        plan: &Node,
        after: Option<&[String]>,
        limit: usize,
    ) -> Result<CopyReader, SourceError> {
        let sql = crate::docsql::build_chunk_sql(plan, after, limit);
        CopyReader::start(
            &self.client,
            &sql,
            &format!("reading {}", plan.table.qualified()),
        )
        .await
    }

    /// The upper key of the next parallel backfill chunk: the key `rows`
    /// keys after `after` (from the start when `None`), or `None` when fewer
    /// rows follow (the last chunk is open-ended). Runs outside any snapshot:
    /// chunk ranges only partition the key space.
    pub async fn chunk_end(
        &self,
        plan: &Node,
        after: Option<&[String]>,
        rows: usize,
    ) -> Result<Option<Vec<String>>, SourceError> {
        let sql = crate::docsql::chunk_end_sql(plan, after, rows);
        let width = plan.table.key.len();
        let mut out = None;
        CopyReader::start(
            &self.client,
            &sql,
            &format!("splitting {} into chunks", plan.table.qualified()),
        )
        .await?
        .read_all(|row| out = Some(row.texts(width)))
        .await?;
        Ok(out)
    }

    /// One parallel backfill chunk of `plan`'s documents: the roots after
    /// `after` up to `upto` (inclusive), in key order. Run it inside
    /// [`Session::begin_chunk`].
    pub async fn copy_range(
        &self,
        plan: &Node,
        after: Option<&[String]>,
        upto: Option<&[String]>,
    ) -> Result<CopyReader, SourceError> {
        let sql = crate::docsql::build_range_sql(plan, after, upto);
        CopyReader::start(
            &self.client,
            &sql,
            &format!("reading {}", plan.table.qualified()),
        )
        .await
    }

    /// The current transaction's snapshot as `pg_snapshot` text
    /// (`xmin:xmax:xip,…`): read inside the seeding's exported snapshot, it is
    /// the *floor* every chunk snapshot must contain (see [`Session::begin_chunk`]).
    pub async fn current_snapshot(&self) -> Result<String, SourceError> {
        let row = self
            .client
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await
            .map_err(|e| SourceError::from_pg("reading the backfill snapshot", e))?;
        Ok(row.get(0))
    }

    /// Opens a `REPEATABLE READ READ ONLY` transaction for one backfill
    /// chunk and checks that its snapshot contains `floor` (the snapshot
    /// exported at the seeding's consistent point): every transaction
    /// `floor` sees must be visible here too. A transaction whose commit
    /// record is written can still look in progress to a new snapshot for a
    /// moment (it leaves the proc array after its WAL flush, and after a
    /// synchronous standby's answer), so `false` (the transaction is
    /// rolled back) means "try again shortly". End the chunk with
    /// [`Session::end_snapshot`].
    pub async fn begin_chunk(&self, floor: &str) -> Result<bool, SourceError> {
        self.client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(|e| SourceError::from_pg("opening a backfill chunk's snapshot", e))?;
        // The first statement takes the transaction's snapshot.
        let row = self
            .client
            .query_one(
                "SELECT pg_snapshot_xmax(pg_current_snapshot()) >= pg_snapshot_xmax($1::text::pg_snapshot) \
                 AND NOT EXISTS (SELECT 1 FROM pg_snapshot_xip(pg_current_snapshot()) AS x \
                                 WHERE pg_visible_in_snapshot(x, $1::text::pg_snapshot))",
                &[&floor],
            )
            .await
            .map_err(|e| SourceError::from_pg("checking a backfill chunk's snapshot", e))?;
        let contains: bool = row.get(0);
        if !contains {
            self.client
                .batch_execute("ROLLBACK")
                .await
                .map_err(|e| SourceError::from_pg("retrying a backfill chunk's snapshot", e))?;
        }
        Ok(contains)
    }

    /// The root keys of `plan` whose documents read the parent rows that
    /// `probe` selects with `values` (one statement); `index` names the
    /// index in errors.
    pub async fn resolve_roots(
        &self,
        plan: &Node,
        probe: &Probe,
        values: &[String],
        index: &str,
    ) -> Result<Vec<Vec<String>>, SourceError> {
        let Some(sql) = crate::docsql::resolve_sql(plan, probe, values) else {
            return Ok(Vec::new());
        };
        let width = plan.table.key.len();
        let mut out = Vec::new();
        CopyReader::start(
            &self.client,
            &sql,
            &format!("finding documents of index {index} to rebuild"),
        )
        .await?
        .read_all(|row| out.push(row.texts(width)))
        .await?;
        Ok(out)
    }

    /// Ends the snapshot transaction a seeding session reads under.
    pub async fn end_snapshot(&self) {
        let _ = self.client.batch_execute("COMMIT").await;
    }

    /// Ends a backfill chunk's transaction; an error means the session is
    /// unusable.
    pub async fn end_chunk(&self) -> Result<(), SourceError> {
        self.client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| SourceError::from_pg("ending a backfill chunk's snapshot", e))
    }
}

#[cfg(test)]
mod live_tests {
    use super::*;
    use ferry_testkit::PgCluster;

    /// A plain table and a two-level partitioned one, no index on the
    /// looked-up columns but one on a single leaf.
    const DDL: &str = "
CREATE TABLE plain (id int PRIMARY KEY, user_id int);
CREATE TABLE events (id int, region text, account_id int, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us') PARTITION BY RANGE (id);
CREATE TABLE events_us_low PARTITION OF events_us FOR VALUES FROM (0) TO (1000);
CREATE TABLE events_us_high PARTITION OF events_us FOR VALUES FROM (1000) TO (MAXVALUE);
CREATE INDEX events_us_high_by_account ON events_us_high (account_id);";

    #[tokio::test]
    async fn unindexed_lookup_advice_runs_on_postgresql_for_plain_and_partitioned_tables() {
        let pg = tokio::task::spawn_blocking(PgCluster::start)
            .await
            .expect("join")
            .expect("start PostgreSQL");
        let client = pg.client("postgres").await.expect("connect");
        client.batch_execute(DDL).await.expect("schema");
        let oid = |r: tokio_postgres::Row| -> u32 { r.get(0) };
        let plain = oid(client
            .query_one("SELECT 'plain'::regclass::oid", &[])
            .await
            .expect("oid"));
        let events = oid(client
            .query_one("SELECT 'events'::regclass::oid", &[])
            .await
            .expect("oid"));
        let lookups = [
            Lookup {
                oid: plain,
                column: "user_id".into(),
                field: "a".into(),
            },
            Lookup {
                oid: events,
                column: "account_id".into(),
                field: "b".into(),
            },
        ];
        let session = Session { client };
        let advice = session.unindexed_lookups(&lookups).await.expect("advice");
        assert_eq!(
            advice,
            vec![
                (0, "CREATE INDEX CONCURRENTLY ON public.plain (user_id);".to_string()),
                (
                    1,
                    "CREATE INDEX events_account_id_idx ON ONLY public.events (account_id);\n\
                     CREATE INDEX CONCURRENTLY events_eu_account_id_idx ON public.events_eu (account_id);\n\
                     ALTER INDEX public.events_account_id_idx ATTACH PARTITION public.events_eu_account_id_idx;\n\
                     CREATE INDEX events_us_account_id_idx ON ONLY public.events_us (account_id);\n\
                     ALTER INDEX public.events_account_id_idx ATTACH PARTITION public.events_us_account_id_idx;\n\
                     ALTER INDEX public.events_us_account_id_idx ATTACH PARTITION public.events_us_high_by_account;\n\
                     CREATE INDEX CONCURRENTLY events_us_low_account_id_idx ON public.events_us_low (account_id);\n\
                     ALTER INDEX public.events_us_account_id_idx ATTACH PARTITION public.events_us_low_account_id_idx;"
                        .to_string()
                ),
            ]
        );
        // Run as advised, one statement at a time (CONCURRENTLY refuses a
        // transaction block): PostgreSQL accepts every statement, the root's
        // index turns valid, and nothing is left to advise.
        for (_, statements) in &advice {
            for statement in statements.lines() {
                session
                    .client
                    .batch_execute(statement)
                    .await
                    .unwrap_or_else(|e| panic!("{statement}: {e:?}"));
            }
        }
        let valid: bool = session
            .client
            .query_one(
                "SELECT indisvalid FROM pg_index WHERE indexrelid = 'events_account_id_idx'::regclass",
                &[],
            )
            .await
            .expect("root index")
            .get(0);
        assert!(
            valid,
            "the partitioned root's index is valid once every leaf's is attached"
        );
        let left = session.unindexed_lookups(&lookups).await.expect("advice");
        assert_eq!(left, Vec::<(usize, String)>::new());
    }
}
