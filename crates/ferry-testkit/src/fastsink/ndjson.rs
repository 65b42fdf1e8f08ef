//! Parsing bulk bodies: action lines into small borrowed structs; sources
//! are only checked to be JSON objects.

use super::*;

/// A string from an action line, borrowed from the body unless it had escapes.
pub(super) struct Str<'a>(pub(super) Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct StrVisitor;
        impl<'de> Visitor<'de> for StrVisitor {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(
                self,
                v: &'de str,
            ) -> std::result::Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<Self::Value, E> {
                Ok(Cow::Owned(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_string()))
            }
        }
        d.deserialize_any(StrVisitor).map(Str)
    }
}

/// The metadata object of an action line.
#[derive(Deserialize)]
pub(super) struct Meta<'a> {
    #[serde(borrow, default, rename = "_index")]
    pub(super) index: Option<Str<'a>>,
    #[serde(borrow, default, rename = "_id")]
    pub(super) id: Option<Str<'a>>,
    #[serde(default)]
    pub(super) version: Option<u64>,
    #[serde(borrow, default)]
    pub(super) version_type: Option<Str<'a>>,
}

/// One action line: `{"index": {...}}`, `{"delete": {...}}`, …
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum ActionLine<'a> {
    Index(#[serde(borrow)] Meta<'a>),
    Create(#[serde(borrow)] Meta<'a>),
    Update(#[serde(borrow)] Meta<'a>),
    Delete(#[serde(borrow)] Meta<'a>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OpKind {
    Index,
    Create,
    Update,
    Delete,
}

impl OpKind {
    pub(super) fn key(self) -> &'static str {
        match self {
            OpKind::Index => "index",
            OpKind::Create => "create",
            OpKind::Update => "update",
            OpKind::Delete => "delete",
        }
    }
}

/// A parsed action with its source line.
pub(super) struct Op<'a> {
    pub(super) kind: OpKind,
    pub(super) meta: Meta<'a>,
    pub(super) source: Option<&'a [u8]>,
}

/// What applying one action produced, for the response.
pub(super) struct Done<'a> {
    pub(super) kind: OpKind,
    pub(super) index: Arc<str>,
    pub(super) id: Cow<'a, str>,
    pub(super) version: u64,
    pub(super) seq_no: u64,
    pub(super) outcome: ItemOutcome,
    pub(super) error: Option<Fail>,
}

/// Splits the body into lines (without `\n` or a trailing `\r`).
pub(super) struct Lines<'a> {
    pub(super) data: &'a [u8],
    pub(super) pos: usize,
    /// 1-based number of the line returned last.
    pub(super) number: usize,
}

impl<'a> Iterator for Lines<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        if self.pos >= self.data.len() {
            return None;
        }
        let rest = self.data.get(self.pos..)?;
        let len = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        self.pos += len + 1;
        self.number += 1;
        let line = rest.get(..len)?;
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    }
}

pub(super) fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// Parses the NDJSON body into actions; an error answers the whole request.
pub(super) fn parse_bulk(body: &[u8]) -> std::result::Result<Vec<Op<'_>>, Reply> {
    if is_blank(body) {
        return Err(Reply::error(
            400,
            "action_request_validation_exception",
            "Validation Failed: 1: no requests added;",
        ));
    }
    if !body.ends_with(b"\n") {
        return Err(Reply::error(
            400,
            "illegal_argument_exception",
            "The bulk request must be terminated by a newline [\\n]",
        ));
    }
    let mut ops = Vec::with_capacity(body.len() / 128 + 1);
    let mut lines = Lines {
        data: body,
        pos: 0,
        number: 0,
    };
    while let Some(line) = lines.next() {
        if is_blank(line) {
            continue;
        }
        let action: ActionLine<'_> = serde_json::from_slice(line).map_err(|e| {
            Reply::error(
                400,
                "illegal_argument_exception",
                format!(
                    "Malformed action/metadata line [{}], expected one of [create, delete, index, update] with an object: {e}",
                    lines.number
                ),
            )
        })?;
        let (kind, meta) = match action {
            ActionLine::Index(m) => (OpKind::Index, m),
            ActionLine::Create(m) => (OpKind::Create, m),
            ActionLine::Update(m) => (OpKind::Update, m),
            ActionLine::Delete(m) => (OpKind::Delete, m),
        };
        let source = if kind == OpKind::Delete {
            None
        } else {
            let at = lines.number;
            Some(lines.next().ok_or_else(|| {
                Reply::error(
                    400,
                    "illegal_argument_exception",
                    format!(
                        "the {} action on line [{at}] has no source line",
                        kind.key()
                    ),
                )
            })?)
        };
        ops.push(Op { kind, meta, source });
    }
    Ok(ops)
}

/// Checks that a source line is one well-formed JSON object, without building it.
pub(super) fn check_source(source: &[u8]) -> std::result::Result<(), Fail> {
    let starts_object = source
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{');
    if !starts_object {
        return Err(Fail::new(
            400,
            "mapper_parsing_exception",
            "failed to parse, document is empty or not a JSON object",
        ));
    }
    serde_json::from_slice::<IgnoredAny>(source)
        .map(|_| ())
        .map_err(|e| {
            Fail::new(
                400,
                "mapper_parsing_exception",
                format!("failed to parse: {e}"),
            )
        })
}
