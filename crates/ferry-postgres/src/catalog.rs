//! Catalog checks and set-up: wal_level, table shapes, publication, slot.

use std::collections::HashMap;

use crate::{PgParams, Session, SourceError};
use ferry_core::schema::{quote_ident, quote_literal};
use ferry_core::{ColumnShape, Lsn, TableShape, TypeKind};

/// Fails unless `wal_level` is `logical`, with the fix in the message.
pub async fn check_wal_level(db: &Session) -> Result<(), SourceError> {
    let client = &db.client;
    let row = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(|e| SourceError::from_pg("reading wal_level", e))?;
    let level: String = row.get(0);
    if level != "logical" {
        return Err(SourceError::Operator(format!(
            "PostgreSQL has wal_level = {level}, but logical replication needs wal_level = logical: \
             run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL"
        )));
    }
    Ok(())
}

/// Resolves type OIDs to render kinds, consulting `pg_type` for enums,
/// domains and arrays of them; remembers what it learned.
#[derive(Debug, Default, Clone)]
pub struct TypeResolver {
    known: HashMap<u32, TypeKind>,
}

impl TypeResolver {
    /// The kind of `oid` if it was resolved before (or is built in).
    pub fn get(&self, oid: u32) -> TypeKind {
        self.known
            .get(&oid)
            .cloned()
            .or_else(|| TypeKind::from_builtin_oid(oid))
            .unwrap_or(TypeKind::Other)
    }

    /// Resolves `oid` with catalog look-ups as needed.
    pub async fn resolve(&mut self, db: &Session, oid: u32) -> Result<TypeKind, SourceError> {
        let client = &db.client;
        if let Some(k) = TypeKind::from_builtin_oid(oid) {
            return Ok(k);
        }
        // int2vector and oidvector are catalogued as arrays but print as
        // space-separated lists: keep them as text.
        if oid == 22 || oid == 30 {
            return Ok(TypeKind::Text);
        }
        if let Some(k) = self.known.get(&oid) {
            return Ok(k.clone());
        }
        let mut cur = oid;
        // Follow domains to their base type and arrays to their element,
        // at most a few levels deep.
        let mut array_delims = Vec::new();
        let mut kind = TypeKind::Other;
        for _ in 0..8 {
            if let Some(k) = TypeKind::from_builtin_oid(cur) {
                kind = k;
                break;
            }
            let row = client
                .query_opt(
                    "SELECT t.typtype::text, t.typbasetype::oid::int8, t.typelem::oid::int8, \
                     t.typcategory::text, (SELECT e.typdelim::text FROM pg_type e WHERE e.oid = t.typelem) \
                     FROM pg_type t WHERE t.oid = $1::int8::oid",
                    &[&i64::from(cur)],
                )
                .await
                .map_err(|e| SourceError::from_pg("reading pg_type", e))?;
            let Some(row) = row else { break };
            let typtype: String = row.get(0);
            let base: i64 = row.get(1);
            let elem: i64 = row.get(2);
            let category: String = row.get(3);
            let delim: Option<String> = row.get(4);
            match (typtype.as_str(), category.as_str()) {
                ("d", _) => cur = base as u32,
                (_, "A") if elem != 0 => {
                    array_delims.push(delim.and_then(|d| d.bytes().next()).unwrap_or(b','));
                    cur = elem as u32;
                }
                ("e", _) => {
                    kind = TypeKind::Text;
                    break;
                }
                _ => break,
            }
        }
        for delim in array_delims.into_iter().rev() {
            kind = TypeKind::Array {
                elem: Box::new(kind),
                delim,
            };
        }
        self.known.insert(oid, kind.clone());
        Ok(kind)
    }
}

/// A table as the catalog describes it.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// The selected columns and the primary key.
    pub shape: TableShape,
    /// Every column.
    pub all: Vec<ColumnShape>,
    /// `relreplident`: `d` default, `f` full, `n` nothing, `i` index.
    pub replica_identity: char,
}

impl TableInfo {
    /// The column named `name`, if the table has it.
    pub fn column(&self, name: &str) -> Option<&ColumnShape> {
        self.all.iter().find(|c| c.name == name)
    }

    /// An error naming `key` for a column the table lacks.
    pub fn missing(&self, key: &str, name: &str) -> SourceError {
        SourceError::Operator(format!(
            "{key}: table {}.{} has no column {name:?}; existing columns: {}",
            self.shape.schema,
            self.shape.name,
            self.all
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

/// Reads a table (`table` or `schema.table`): OID, every column with its
/// kind, the `columns` selection (all when `None`), the primary key
/// (required when `need_pk`). `at` is the config key prefix for errors.
pub async fn read_table(
    db: &Session,
    types: &mut TypeResolver,
    at: &str,
    table: &str,
    columns: Option<&[String]>,
    need_pk: bool,
) -> Result<TableInfo, SourceError> {
    let client = &db.client;
    let (schema, table) = match table.split_once('.') {
        Some((s, t)) => (s, t),
        None => ("public", table),
    };
    let key = format!("{at}.table");
    let row = client
        .query_opt(
            "SELECT c.oid::int8, c.relkind::text, c.relreplident::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &table],
        )
        .await
        .map_err(|e| SourceError::from_pg("looking up tables", e))?;
    let Some(row) = row else {
        return Err(SourceError::Operator(format!(
            "{key}: table {schema}.{table} does not exist in the source database; create it or fix {key}"
        )));
    };
    let oid: i64 = row.get(0);
    let relkind: String = row.get(1);
    let replident: String = row.get(2);
    if relkind != "r" && relkind != "p" {
        return Err(SourceError::Operator(format!(
            "{key}: {schema}.{table} is not a table (relkind {relkind}); logical replication covers ordinary tables only"
        )));
    }
    let cols = client
        .query(
            "SELECT a.attname::text, a.atttypid::int8 FROM pg_attribute a \
             WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(|e| SourceError::from_pg("reading columns", e))?;
    let mut all = Vec::with_capacity(cols.len());
    for c in &cols {
        let name: String = c.get(0);
        let type_oid: i64 = c.get(1);
        let kind = types.resolve(db, type_oid as u32).await?;
        all.push(ColumnShape {
            name,
            type_oid: type_oid as u32,
            kind,
        });
    }
    let key_rows = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1::int8::oid AND i.indisprimary \
             ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&oid],
        )
        .await
        .map_err(|e| SourceError::from_pg("reading the primary key", e))?;
    let pk: Vec<String> = key_rows.iter().map(|r| r.get(0)).collect();
    if pk.is_empty() && need_pk {
        return Err(SourceError::Operator(format!(
            "{key}: table {schema}.{table} has no primary key; ferry derives document ids from it: \
             run ALTER TABLE {} ADD PRIMARY KEY (...)",
            qualified(schema, table)
        )));
    }
    let selected = match columns {
        None => all.clone(),
        Some(wanted) => {
            let mut picked = Vec::with_capacity(wanted.len());
            for w in wanted {
                match all.iter().find(|c| &c.name == w) {
                    Some(c) => picked.push(c.clone()),
                    None => {
                        return Err(SourceError::Operator(format!(
                            "{at}.columns: table {schema}.{table} has no column {w:?}; existing columns: {}",
                            all.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
                        )))
                    }
                }
            }
            picked
        }
    };
    Ok(TableInfo {
        shape: TableShape {
            schema: schema.to_string(),
            name: table.to_string(),
            oid: oid as u32,
            columns: selected,
            key: pk,
        },
        all,
        replica_identity: replident.chars().next().unwrap_or('d'),
    })
}

/// Makes sure `table` logs whole old rows (REPLICA IDENTITY FULL), which
/// resolving related changes needs; with `manage` false, an error carries the SQL.
pub async fn ensure_full_identity(
    db: &Session,
    shape: &TableShape,
    why: &str,
    manage: bool,
) -> Result<(), SourceError> {
    let client = &db.client;
    let sql = format!("ALTER TABLE {} REPLICA IDENTITY FULL", shape.qualified());
    if !manage {
        return Err(SourceError::Operator(format!(
            "table {} needs REPLICA IDENTITY FULL ({why}) and source.manage_replica_identity is false: run {sql}",
            shape.qualified()
        )));
    }
    client.batch_execute(&sql).await.map_err(|e| {
        SourceError::Operator(format!(
            "table {} needs REPLICA IDENTITY FULL ({why}) but ferry could not set it ({e}): run {sql} as the table owner",
            shape.qualified()
        ))
    })?;
    tracing::info!(table = %shape.qualified(), why, "set REPLICA IDENTITY FULL");
    Ok(())
}

fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// Makes sure `publication` exists and covers every table in `tables`.
///
/// With `manage` false nothing is changed and a missing piece is an error
/// carrying the SQL to run.
pub async fn ensure_publication(
    db: &Session,
    publication: &str,
    tables: &[(String, String)],
    manage: bool,
) -> Result<(), SourceError> {
    let client = &db.client;
    // A partitioned table's changes are logged by its leaf partitions; only
    // `publish_via_partition_root` makes pgoutput report them (and list the
    // table in pg_publication_tables) under the table itself.
    let (schemas, names): (Vec<&str>, Vec<&str>) =
        tables.iter().map(|(s, t)| (s.as_str(), t.as_str())).unzip();
    let partitioned: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN unnest($1::text[], $2::text[]) AS t(s, r) ON n.nspname = t.s AND c.relname = t.r \
             WHERE c.relkind = 'p')",
            &[&schemas, &names],
        )
        .await
        .map_err(|e| SourceError::from_pg("reading table kinds", e))?
        .get(0);
    let via_root = if partitioned {
        " WITH (publish_via_partition_root = true)"
    } else {
        ""
    };
    let row = client
        .query_opt(
            "SELECT puballtables, pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| SourceError::from_pg("reading publications", e))?;
    let list = |ts: &[&(String, String)]| {
        ts.iter()
            .map(|(s, t)| qualified(s, t))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(row) = row else {
        let all: Vec<&(String, String)> = tables.iter().collect();
        let sql = format!(
            "CREATE PUBLICATION {} FOR TABLE {}{via_root}",
            quote_ident(publication),
            list(&all)
        );
        if !manage {
            return Err(SourceError::Operator(format!(
                "publication {publication:?} does not exist and source.manage_publication is false: run {sql}"
            )));
        }
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| SourceError::from_pg(&format!("creating the publication ({sql})"), e))?;
        tracing::info!(publication, "created publication");
        return Ok(());
    };
    let all_tables: bool = row.get(0);
    let publishes_via_root: bool = row.get(1);
    if partitioned && !publishes_via_root {
        let sql = format!(
            "ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
            quote_ident(publication)
        );
        if !manage {
            return Err(SourceError::Operator(format!(
                "publication {publication:?} reports a partitioned table's changes under its partitions \
                 and source.manage_publication is false: run {sql}"
            )));
        }
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| SourceError::from_pg(&format!("altering the publication ({sql})"), e))?;
        tracing::info!(
            publication,
            "publication now publishes via the partition root"
        );
    }
    if all_tables {
        return Ok(());
    }
    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| SourceError::from_pg("reading publication tables", e))?;
    let covered: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut missing: Vec<&(String, String)> =
        tables.iter().filter(|t| !covered.contains(t)).collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "ALTER PUBLICATION {} ADD TABLE {}",
        quote_ident(publication),
        list(&missing)
    );
    if !manage {
        return Err(SourceError::Operator(format!(
            "publication {publication:?} does not cover {} and source.manage_publication is false: run {sql}",
            list(&missing)
        )));
    }
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| SourceError::from_pg(&format!("extending the publication ({sql})"), e))?;
    tracing::info!(publication, tables = %list(&missing), "extended publication");
    Ok(())
}

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// Output plugin.
    pub plugin: String,
    /// Database the slot belongs to.
    pub database: String,
    /// Whether a session streams from it now.
    pub active: bool,
    /// Position up to which the consumer confirmed.
    pub confirmed_flush: Lsn,
    /// `wal_status` (`reserved`, `extended`, `unreserved`, `lost`).
    pub wal_status: Option<String>,
}

/// Reads the slot, if it exists.
pub async fn slot_info(db: &Session, slot: &str) -> Result<Option<SlotInfo>, SourceError> {
    let client = &db.client;
    let row = client
        .query_opt(
            "SELECT coalesce(plugin::text, ''), coalesce(database::text, ''), active, \
             coalesce(confirmed_flush_lsn::text, '0/0'), wal_status::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| SourceError::from_pg("reading pg_replication_slots", e))?;
    Ok(row.map(|r| SlotInfo {
        plugin: r.get(0),
        database: r.get(1),
        active: r.get(2),
        confirmed_flush: r.get::<_, String>(3).parse().unwrap_or(Lsn::ZERO),
        wal_status: r.get(4),
    }))
}

/// Validates an existing slot against what ferry needs.
pub fn check_slot(info: &SlotInfo, slot: &str, dbname: &str) -> Result<(), SourceError> {
    if info.plugin != "pgoutput" {
        return Err(SourceError::Operator(format!(
            "source.slot: slot {slot:?} uses plugin {:?}, ferry needs pgoutput: drop it (SELECT pg_drop_replication_slot({})) or choose another slot name",
            info.plugin,
            quote_literal(slot)
        )));
    }
    if info.database != dbname {
        return Err(SourceError::Operator(format!(
            "source.slot: slot {slot:?} belongs to database {:?}, not {dbname:?}: choose another slot name",
            info.database
        )));
    }
    if info.wal_status.as_deref() == Some("lost") {
        return Err(SourceError::SlotInvalidated {
            what: format!("checking replication slot {slot:?}"),
            detail: "its wal_status is 'lost'".into(),
        });
    }
    Ok(())
}

/// A slot ferry just created, with the snapshot it exported.
///
/// The snapshot stays importable only while `session` is open and idle:
/// import it (see [`open_snapshot`]) before dropping this value.
pub struct NewSlot {
    /// The slot's consistent point: the stream starts right after it.
    pub consistent_point: Lsn,
    /// The exported snapshot's name.
    pub snapshot: String,
    /// The replication session that created the slot.
    pub session: pgwire_replication::ReplicationClient,
}

/// Creates a pgoutput slot and exports the snapshot it is consistent with.
pub async fn create_slot(
    params: &PgParams,
    slot: &str,
    publication: &str,
) -> Result<NewSlot, SourceError> {
    create_slot_with(params, slot, publication, false).await
}

/// A snapshot for seeding an index while the main slot streams: a
/// temporary slot (dropped when its session ends) exports a snapshot whose
/// consistent point splits changes exactly into "in the snapshot" and "after
/// it", which makes that point the right version for the copied documents.
pub async fn seed_snapshot(
    params: &PgParams,
    slot: &str,
    publication: &str,
) -> Result<NewSlot, SourceError> {
    let name = format!("{slot}_seed_{}", std::process::id());
    create_slot_with(params, &name, publication, true).await
}

async fn create_slot_with(
    params: &PgParams,
    slot: &str,
    publication: &str,
    temporary: bool,
) -> Result<NewSlot, SourceError> {
    let cfg = params.replication(slot, publication);
    let mut session = pgwire_replication::ReplicationClient::connect_gated(cfg)
        .await
        .map_err(|e| SourceError::from_replication("opening a replication session", e))?;
    let rows = session
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote_ident(slot),
            if temporary { " TEMPORARY" } else { "" }
        ))
        .await
        .map_err(|e| {
            SourceError::from_replication(&format!("creating replication slot {slot:?}"), e)
        })?;
    let row = rows.into_iter().next().ok_or_else(|| SourceError::Server {
        what: "creating the replication slot".into(),
        code: "XX000".into(),
        message: "CREATE_REPLICATION_SLOT returned no row".into(),
    })?;
    let text = |i: usize| -> String {
        row.get(i)
            .and_then(|v| v.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    };
    let consistent_point: Lsn = text(1).parse().map_err(|_| SourceError::Server {
        what: "creating the replication slot".into(),
        code: "XX000".into(),
        message: format!("unexpected consistent point {:?}", text(1)),
    })?;
    let snapshot = text(2);
    tracing::info!(slot, %consistent_point, "created replication slot");
    Ok(NewSlot {
        consistent_point,
        snapshot,
        session,
    })
}

/// Opens a connection inside a `REPEATABLE READ READ ONLY` transaction,
/// importing `snapshot` when given, for consistent backfill reads.
pub async fn open_snapshot(
    params: &PgParams,
    snapshot: Option<&str>,
) -> Result<Session, SourceError> {
    let client = params.connect().await?;
    let mut sql = String::from("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;");
    if let Some(s) = snapshot {
        sql.push_str(&format!("SET TRANSACTION SNAPSHOT {};", quote_literal(s)));
    }
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| SourceError::from_pg("opening the backfill snapshot", e))?;
    Ok(Session { client })
}
