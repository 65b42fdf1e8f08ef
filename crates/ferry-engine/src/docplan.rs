//! Turns an `[[index]]` (with its relations) into a document plan, reading
//! every table it touches from the catalog and checking every key it names.

use ferry_config::{ComputedConfig, CountConfig, IndexConfig, MappingType, RelationConfig};
use ferry_core::plan::{CountNode, Link, Node};
use ferry_core::schema::quote_ident;
use ferry_core::{ColumnShape, TableShape, TypeKind};
use ferry_postgres::catalog::{self, TableInfo, TypeResolver};
use ferry_postgres::{Session, SourceError};
use serde_json::Map;

fn qualified(table: &str) -> String {
    match table.split_once('.') {
        Some((s, t)) => format!("{}.{}", quote_ident(s), quote_ident(t)),
        None => format!("{}.{}", quote_ident("public"), quote_ident(table)),
    }
}

/// The single primary-key column of a table, or an error naming `key`.
fn single_pk(info: &TableInfo, key: &str, what: &str) -> Result<String, SourceError> {
    match info.shape.key.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(SourceError::Operator(format!(
            "{key}: {what} {}.{} has no single-column primary key; set `references` to the column to join on",
            info.shape.schema, info.shape.name
        ))),
    }
}

fn fields_of(
    shape: &TableShape,
    rename: &std::collections::BTreeMap<String, String>,
) -> Vec<String> {
    shape
        .columns
        .iter()
        .map(|c| {
            rename
                .get(&c.name)
                .cloned()
                .unwrap_or_else(|| c.name.clone())
        })
        .collect()
}

fn soft_delete(
    info: &TableInfo,
    key: &str,
    col: &Option<String>,
) -> Result<Option<(String, bool)>, SourceError> {
    match col {
        None => Ok(None),
        Some(c) => {
            let column = info
                .column(c)
                .ok_or_else(|| info.missing(&format!("{key}.soft_delete"), c))?;
            Ok(Some((c.clone(), column.kind == TypeKind::Bool)))
        }
    }
}

fn to_map(
    m: &std::collections::BTreeMap<String, serde_json::Value>,
) -> Map<String, serde_json::Value> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Builds the plan of index `pos`.
pub async fn build(
    client: &Session,
    types: &mut TypeResolver,
    pos: usize,
    ix: &IndexConfig,
) -> Result<Node, SourceError> {
    let at = format!("index[{pos}]");
    let info =
        catalog::read_table(client, types, &at, &ix.table, ix.columns.as_deref(), true).await?;
    client
        .check_clauses(&at, &info.shape, ix.filter.as_deref(), None)
        .await?;
    let mut root = Node {
        field: String::new(),
        fields: fields_of(&info.shape, &ix.rename),
        table: info.shape.clone(),
        link: Link::Root,
        filter: ix.filter.clone(),
        soft_delete: soft_delete(&info, &at, &ix.soft_delete)?,
        order_by: None,
        limit: None,
        mapping_type: "object",
        mapping: to_map(&ix.mapping),
        children: Vec::new(),
        counts: Vec::new(),
        computed: Vec::new(),
        routing: match &ix.routing {
            None => None,
            // A real column: the WAL's row images carry it, a computed field they do not.
            Some(r) if info.column(r).is_some() => Some(r.clone()),
            Some(r) => return Err(info.missing(&format!("{at}.routing"), r)),
        },
    };
    computed(client, types, &at, &info, &ix.computed, &mut root).await?;
    root.children = children(client, types, &at, &info, &ix.has_many, &ix.belongs_to).await?;
    root.counts = counts(client, types, &at, &info, &ix.count).await?;
    Ok(root)
}

/// Adds the computed fields of a block to its node: each expression is
/// checked against the table, its type read (and resolved) from the
/// prepared statement, and it becomes a column of the node named after its
/// field (with the configured mapping type, if any).
async fn computed(
    client: &Session,
    types: &mut TypeResolver,
    at: &str,
    info: &TableInfo,
    list: &[ComputedConfig],
    node: &mut Node,
) -> Result<(), SourceError> {
    for (j, c) in list.iter().enumerate() {
        let key = format!("{at}.computed[{j}]");
        if info.column(&c.field).is_some() || node.fields.contains(&c.field) {
            return Err(SourceError::Operator(format!(
                "{key}.field: {:?} is already a column or field of {}.{}; name the computed field differently",
                c.field, info.shape.schema, info.shape.name
            )));
        }
        let type_oid = client.expression_type(&key, &info.shape, &c.sql).await?;
        let kind = types.resolve(client, type_oid).await?;
        node.table.columns.push(ColumnShape {
            name: c.field.clone(),
            type_oid,
            kind,
        });
        node.fields.push(c.field.clone());
        node.computed.push((c.field.clone(), c.sql.clone()));
        if let Some(t) = &c.mapping_type {
            node.mapping
                .entry(c.field.clone())
                .or_insert_with(|| serde_json::json!({ "type": t }));
        }
    }
    Ok(())
}

async fn counts(
    client: &Session,
    types: &mut TypeResolver,
    at: &str,
    parent: &TableInfo,
    list: &[CountConfig],
) -> Result<Vec<CountNode>, SourceError> {
    let mut out = Vec::with_capacity(list.len());
    for (j, c) in list.iter().enumerate() {
        let key = format!("{at}.count[{j}]");
        let info = catalog::read_table(client, types, &key, &c.table, Some(&[]), false).await?;
        if info.column(&c.foreign_key).is_none() {
            return Err(info.missing(&format!("{key}.foreign_key"), &c.foreign_key));
        }
        client
            .check_clauses(&key, &info.shape, c.filter.as_deref(), None)
            .await?;
        let references = match &c.references {
            Some(r) => {
                parent
                    .column(r)
                    .ok_or_else(|| parent.missing(&format!("{key}.references"), r))?;
                r.clone()
            }
            None => single_pk(parent, &key, "the parent table")?,
        };
        out.push(CountNode {
            field: c.field.clone(),
            table: qualified(&c.table),
            oid: info.shape.oid,
            fk: c.foreign_key.clone(),
            references,
            filter: c.filter.clone(),
        });
    }
    Ok(out)
}

fn children<'a>(
    client: &'a Session,
    types: &'a mut TypeResolver,
    at: &'a str,
    parent: &'a TableInfo,
    has_many: &'a [RelationConfig],
    belongs_to: &'a [RelationConfig],
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Node>, SourceError>> + Send + 'a>>
{
    Box::pin(async move {
        let mut out = Vec::new();
        for (kind, list) in [("has_many", has_many), ("belongs_to", belongs_to)] {
            for (j, r) in list.iter().enumerate() {
                let key = format!("{at}.{kind}[{j}]");
                let info =
                    catalog::read_table(client, types, &key, &r.table, r.columns.as_deref(), true)
                        .await?;
                client
                    .check_clauses(
                        &key,
                        &info.shape,
                        r.filter.as_deref(),
                        r.order_by.as_deref(),
                    )
                    .await?;
                let link = if kind == "belongs_to" {
                    if parent.column(&r.foreign_key).is_none() {
                        return Err(parent.missing(&format!("{key}.foreign_key"), &r.foreign_key));
                    }
                    let references = match &r.references {
                        Some(c) => {
                            info.column(c)
                                .ok_or_else(|| info.missing(&format!("{key}.references"), c))?;
                            c.clone()
                        }
                        None => single_pk(&info, &key, "the related table")?,
                    };
                    Link::BelongsTo {
                        fk: r.foreign_key.clone(),
                        references,
                    }
                } else {
                    let references = match &r.references {
                        Some(c) => {
                            parent
                                .column(c)
                                .ok_or_else(|| parent.missing(&format!("{key}.references"), c))?;
                            c.clone()
                        }
                        None => single_pk(parent, &key, "the parent table")?,
                    };
                    match &r.through {
                        None => {
                            if info.column(&r.foreign_key).is_none() {
                                return Err(
                                    info.missing(&format!("{key}.foreign_key"), &r.foreign_key)
                                );
                            }
                            Link::HasMany {
                                fk: r.foreign_key.clone(),
                                references,
                            }
                        }
                        Some(t) => {
                            let tkey = format!("{key}.through");
                            let join = catalog::read_table(
                                client,
                                types,
                                &tkey,
                                &t.table,
                                Some(&[]),
                                false,
                            )
                            .await?;
                            if join.column(&r.foreign_key).is_none() {
                                return Err(
                                    join.missing(&format!("{key}.foreign_key"), &r.foreign_key)
                                );
                            }
                            if join.column(&t.other_key).is_none() {
                                return Err(
                                    join.missing(&format!("{tkey}.other_key"), &t.other_key)
                                );
                            }
                            Link::Through {
                                join: join.shape.qualified(),
                                join_oid: join.shape.oid,
                                fk: r.foreign_key.clone(),
                                references,
                                other_key: t.other_key.clone(),
                                target_ref: single_pk(&info, &key, "the related table")?,
                            }
                        }
                    }
                };
                let mapping_type = match (r.mapping_type, kind) {
                    (Some(MappingType::Nested), _) => "nested",
                    (Some(MappingType::Object), _) => "object",
                    (None, "has_many") => "nested",
                    (None, _) => "object",
                };
                let mut node = Node {
                    field: r.field.clone(),
                    fields: fields_of(&info.shape, &r.rename),
                    table: info.shape.clone(),
                    link,
                    filter: r.filter.clone(),
                    soft_delete: soft_delete(&info, &key, &r.soft_delete)?,
                    order_by: r.order_by.clone(),
                    limit: r.limit,
                    mapping_type,
                    mapping: to_map(&r.mapping),
                    children: Vec::new(),
                    counts: Vec::new(),
                    computed: Vec::new(),
                    routing: None,
                };
                computed(client, types, &key, &info, &r.computed, &mut node).await?;
                node.children =
                    children(client, types, &key, &info, &r.has_many, &r.belongs_to).await?;
                node.counts = counts(client, types, &key, &info, &r.count).await?;
                out.push(node);
            }
        }
        Ok(out)
    })
}
