//! Table shapes: which columns of a root table make up a document, how each
//! renders, and which columns identify the row.

use crate::value::{write_json_str, write_value, TypeKind};

/// One column that becomes one field of the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnShape {
    /// Column name in PostgreSQL (also the document field name).
    pub name: String,
    /// The column's type OID.
    pub type_oid: u32,
    /// How its values render and map.
    pub kind: TypeKind,
}

/// The document-relevant shape of a root table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableShape {
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// The table's OID (`pg_class.oid`), which pgoutput relation ids equal.
    pub oid: u32,
    /// Document columns, in document field order.
    pub columns: Vec<ColumnShape>,
    /// Primary-key column names, in key order.
    pub key: Vec<String>,
}

impl TableShape {
    /// `"schema"."name"`, quoted for SQL.
    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// `schema.name` unquoted, as configs write it.
    pub fn qualified_plain(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// Quotes an SQL identifier (doubling embedded quotes).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal (doubling embedded quotes).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Derives a document id from the text of the primary-key values.
///
/// A single-column key is its text as is, so ids look like what users
/// expect (`42`, a uuid). Composite keys join the parts with `,` after
/// escaping `\` and `,` in each part, so distinct keys never collide.
pub fn doc_id(parts: &[&[u8]]) -> String {
    if let [one] = parts {
        return String::from_utf8_lossy(one).into_owned();
    }
    let mut id = String::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            id.push(',');
        }
        for ch in String::from_utf8_lossy(part).chars() {
            if ch == '\\' || ch == ',' {
                id.push('\\');
            }
            id.push(ch);
        }
    }
    id
}

/// Splits a document id back into primary-key texts (the inverse of
/// [`doc_id`] for a key of `parts` columns).
pub fn split_doc_id(id: &str, parts: usize) -> Vec<String> {
    if parts <= 1 {
        return vec![id.to_string()];
    }
    let mut out = vec![String::new()];
    let mut chars = id.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let (Some(next), Some(last)) = (chars.next(), out.last_mut()) {
                    last.push(next);
                }
            }
            ',' => out.push(String::new()),
            c => {
                if let Some(last) = out.last_mut() {
                    last.push(c);
                }
            }
        }
    }
    out
}

/// Writes documents as JSON objects from a row's text values.
///
/// The field-name prefixes are rendered once; writing a row then only
/// appends bytes to a reusable buffer.
#[derive(Debug, Clone)]
pub struct DocumentWriter {
    prefixes: Vec<Vec<u8>>,
    kinds: Vec<TypeKind>,
}

impl DocumentWriter {
    /// A writer for these columns, in this order.
    pub fn new(columns: &[ColumnShape]) -> Self {
        let mut prefixes = Vec::with_capacity(columns.len());
        for (i, c) in columns.iter().enumerate() {
            let mut p = Vec::with_capacity(c.name.len() + 4);
            p.push(if i == 0 { b'{' } else { b',' });
            write_json_str(c.name.as_bytes(), &mut p);
            p.push(b':');
            prefixes.push(p);
        }
        DocumentWriter {
            prefixes,
            kinds: columns.iter().map(|c| c.kind.clone()).collect(),
        }
    }

    /// Number of columns the writer expects.
    pub fn len(&self) -> usize {
        self.kinds.len()
    }

    /// True when the writer has no columns.
    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }

    /// Appends one document; `value(i)` gives column `i`'s text or `None` for NULL.
    pub fn write<'a>(&self, mut value: impl FnMut(usize) -> Option<&'a [u8]>, out: &mut Vec<u8>) {
        if self.kinds.is_empty() {
            out.extend_from_slice(b"{}");
            return;
        }
        for (i, (prefix, kind)) in self.prefixes.iter().zip(&self.kinds).enumerate() {
            out.extend_from_slice(prefix);
            match value(i) {
                Some(text) => write_value(kind, text, out),
                None => out.extend_from_slice(b"null"),
            }
        }
        out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_ids_never_collide() {
        let a = doc_id(&[b"a,b", b"c"]);
        let b = doc_id(&[b"a", b"b,c"]);
        assert_ne!(a, b);
        assert_eq!(doc_id(&[b"42"]), "42");
        assert_eq!(doc_id(&[b"1", b"2"]), "1,2");
    }

    #[test]
    fn composite_ids_split_back() {
        for parts in [vec!["a,b", "c"], vec!["x\\y", ",", ""], vec!["1", "2"]] {
            let bytes: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
            assert_eq!(split_doc_id(&doc_id(&bytes), parts.len()), parts);
        }
        assert_eq!(split_doc_id("a,b", 1), vec!["a,b"]);
    }

    #[test]
    fn writes_a_document_with_nulls() {
        let cols = vec![
            ColumnShape {
                name: "id".into(),
                type_oid: 20,
                kind: TypeKind::Int64,
            },
            ColumnShape {
                name: "na\"me".into(),
                type_oid: 25,
                kind: TypeKind::Text,
            },
            ColumnShape {
                name: "ok".into(),
                type_oid: 16,
                kind: TypeKind::Bool,
            },
        ];
        let w = DocumentWriter::new(&cols);
        let vals: [Option<&[u8]>; 3] = [Some(b"7"), None, Some(b"t")];
        let mut out = Vec::new();
        w.write(|i| vals[i], &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid json");
        assert_eq!(v, serde_json::json!({"id": 7, "na\"me": null, "ok": true}));
    }
}
