//! Assembly: one row of the build query (the root's columns, its key texts,
//! one JSON value per child and one count per count) turned into the
//! document's JSON, and the document write carrying it.

use serde_json::Value;

use super::{Link, Node};
use crate::doc::routing_of;
use crate::schema::doc_id;
use crate::value::{write_json_str, write_value};
use crate::{DocOp, DocWrite, Lsn};

impl Node {
    /// Number of fields the build query returns per root.
    pub fn field_count(&self) -> usize {
        self.routing_position() + usize::from(self.routing.is_some())
    }

    /// Position of the routing text among a build row's fields (when the
    /// index is routed): after the columns, key texts, children and counts.
    fn routing_position(&self) -> usize {
        self.table.columns.len() + self.table.key.len() + self.children.len() + self.counts.len()
    }

    /// Positions of the root key texts among a build row's fields.
    fn key_positions(&self) -> std::ops::Range<usize> {
        let start = self.table.columns.len();
        start..start + self.table.key.len()
    }

    /// The root key texts of a build row (`field(i)` gives field `i`), in key order.
    pub fn row_key<'a>(&self, field: impl Fn(usize) -> Option<&'a [u8]>) -> Vec<String> {
        self.key_positions()
            .map(|p| String::from_utf8_lossy(field(p).unwrap_or(b"")).into_owned())
            .collect()
    }

    /// The write indexing the document of one build row (`field(i)` gives
    /// field `i`) into index `index` at `version`; its id is the root key's
    /// [`doc_id`], its routing the routing column's text (none when NULL
    /// or empty). `None` if a nested value is not the JSON the build query
    /// produces (the row came back in an unexpected shape).
    pub fn document<'a>(
        &self,
        field: impl Fn(usize) -> Option<&'a [u8]>,
        index: usize,
        version: Lsn,
    ) -> Option<DocWrite> {
        let mut body = Vec::with_capacity(256);
        if !self.write_root(&field, &mut body) {
            return None;
        }
        let parts: Vec<&[u8]> = self
            .key_positions()
            .map(|p| field(p).unwrap_or(b""))
            .collect();
        let routing = self
            .routing
            .as_ref()
            .and_then(|_| routing_of(field(self.routing_position())));
        Some(DocWrite {
            index,
            id: doc_id(&parts),
            version,
            op: DocOp::Index(body),
            routing,
        })
    }

    /// Writes the document of one root row; `field(i)` gives COPY field `i`.
    ///
    /// Returns `false` (and writes nothing) if a nested value is not the
    /// JSON the query produces.
    fn write_root<'a>(
        &self,
        field: &impl Fn(usize) -> Option<&'a [u8]>,
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

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::plan::sample_users_plan;
    use crate::{DocOp, Lsn};

    fn body(op: &DocOp) -> Value {
        match op {
            DocOp::Index(b) => serde_json::from_slice(b).expect("json"),
            DocOp::Delete => panic!("a build row always indexes"),
        }
    }

    #[test]
    fn assembles_nested_documents_from_build_rows() {
        let plan = sample_users_plan();
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
        let w = plan
            .document(|i| fields.get(i).copied().flatten(), 3, Lsn(7))
            .expect("document");
        assert_eq!((w.index, w.id.as_str(), w.version), (3, "1", Lsn(7)));
        assert_eq!(
            body(&w.op),
            json!({"id": 1, "email": "a@x",
                   "orders": [{"id": 10, "total": 9.50, "items": [{"id": 100, "sku": "b"}, {"id": 101, "sku": "a"}]},
                              {"id": 11, "total": 1e3, "items": []}],
                   "company": {"id": 7, "name": "ACME \"Inc\""},
                   "order_count": 2})
        );
        // A missing belongs_to is null, an empty has_many is [].
        let fields: Vec<Option<&[u8]>> =
            vec![Some(b"2"), None, Some(b"2"), Some(b"[]"), None, Some(b"0")];
        let w = plan
            .document(|i| fields.get(i).copied().flatten(), 0, Lsn(1))
            .expect("document");
        let v = body(&w.op);
        assert_eq!(v["orders"], json!([]));
        assert_eq!(v["company"], Value::Null);
        assert_eq!(plan.row_key(|i| fields.get(i).copied().flatten()), ["2"]);
    }

    #[test]
    fn a_build_row_in_an_unexpected_shape_gives_no_document() {
        let plan = sample_users_plan();
        let fields: Vec<Option<&[u8]>> = vec![
            Some(b"1"),
            Some(b"a@x"),
            Some(b"1"),
            Some(b"not json"),
            None,
            Some(b"0"),
        ];
        assert_eq!(
            plan.document(|i| fields.get(i).copied().flatten(), 0, Lsn(1)),
            None
        );
    }

    #[test]
    fn the_document_id_is_the_root_key_escaped_when_composite() {
        let mut plan = sample_users_plan();
        plan.children.clear();
        plan.counts.clear();
        plan.table.key = vec!["id".into(), "email".into()];
        // columns id, email; key texts id, email.
        let fields: Vec<Option<&[u8]>> = vec![Some(b"1"), Some(b"a,b"), Some(b"1"), Some(b"a,b")];
        let w = plan
            .document(|i| fields.get(i).copied().flatten(), 0, Lsn(1))
            .expect("document");
        assert_eq!(w.id, "1,a\\,b");
        assert_eq!(plan.field_count(), 4);
    }

    #[test]
    fn a_routed_document_takes_the_last_build_field_as_its_routing() {
        let mut plan = sample_users_plan();
        plan.children.clear();
        plan.counts.clear();
        plan.routing = Some("email".into());
        assert_eq!(plan.field_count(), 4);
        let row: Vec<Option<&[u8]>> = vec![Some(b"1"), Some(b"a@x"), Some(b"1"), Some(b"t7")];
        let w = plan
            .document(|i| row.get(i).copied().flatten(), 0, Lsn(1))
            .expect("document");
        assert_eq!(w.routing.as_deref(), Some("t7"));
        assert_eq!(body(&w.op), json!({"id": 1, "email": "a@x"}));
        let null: Vec<Option<&[u8]>> = vec![Some(b"1"), None, Some(b"1"), None];
        let w = plan
            .document(|i| null.get(i).copied().flatten(), 0, Lsn(1))
            .expect("document");
        assert_eq!(w.routing, None, "a NULL routing column routes by id");
    }
}
