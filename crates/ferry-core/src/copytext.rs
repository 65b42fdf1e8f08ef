//! Reading rows of PostgreSQL's `COPY ... TO STDOUT` text format.
//!
//! A row is one line (the caller strips the trailing newline). Fields are
//! separated by TAB, `\N` alone is NULL, and inside a field a backslash
//! escapes the byte after it: `COPY` writes a data TAB, newline or
//! backslash as `\t`, `\n` or `\\`, so a raw TAB always separates fields.
//!
//! Two ways to read a row, neither allocating per row:
//! * [`split_fields`] yields the raw fields; use a field as is when
//!   [`is_plain`] says it has no escapes, otherwise [`unescape`] it into a
//!   buffer.
//! * [`RowDecoder`] does both for a whole row, reusing its buffers, and
//!   hands back a [`Row`] to index by column.
//!
//! The end-of-data marker line `\.` is not special here; it only appears in
//! data sent *to* the server.

#![warn(missing_docs)]

use std::iter::FusedIterator;

/// The raw form of a NULL field.
const NULL_FIELD: &[u8] = b"\\N";

/// Length of the raw field at the start of `line`: up to the first TAB not
/// escaped by a backslash, or the whole line.
///
/// As in PostgreSQL's reader, a backslash also escapes a following TAB
/// (which then is data). `COPY TO` never writes that, but input written by
/// other tools may.
fn field_len(line: &[u8]) -> usize {
    let mut i = 0;
    while let Some(&b) = line.get(i) {
        match b {
            b'\t' => return i,
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    line.len()
}

/// Splits one COPY text-format line (without its newline) into raw fields:
/// `None` for a NULL (`\N`), otherwise `Some` of the field's still-escaped
/// bytes, which borrow from `line`.
///
/// Every line has at least one field: an empty line is one empty field, and
/// a line ending in a TAB ends with an empty field.
pub fn split_fields(line: &[u8]) -> Fields<'_> {
    Fields { rest: Some(line) }
}

/// Iterator over the raw fields of one COPY text line; see [`split_fields`].
#[derive(Debug, Clone)]
pub struct Fields<'a> {
    /// The text from the current field on; `None` once the last field has
    /// been returned.
    rest: Option<&'a [u8]>,
}

impl<'a> Iterator for Fields<'a> {
    type Item = Option<&'a [u8]>;

    fn next(&mut self) -> Option<Self::Item> {
        let line = self.rest?;
        let (raw, tail) = line.split_at(field_len(line));
        // `tail` is empty or starts with the separating TAB.
        self.rest = tail.split_first().map(|(_, after)| after);
        Some((raw != NULL_FIELD).then_some(raw))
    }
}

impl FusedIterator for Fields<'_> {}

/// True when the raw field has no backslash, so its bytes are the value as
/// is and need no [`unescape`].
pub fn is_plain(raw: &[u8]) -> bool {
    !raw.contains(&b'\\')
}

/// Appends the value of a raw (non-NULL) field to `out`, removing the COPY
/// escapes: `\b` `\f` `\n` `\r` `\t` `\v` for those control characters,
/// `\` and one to three octal digits for that byte (modulo 256), `\x` and
/// one or two hex digits for that byte, and a backslash before any other
/// byte for that byte (`\\` is a backslash). A `\x` without a hex digit is
/// an `x`; a lone backslash at the very end is dropped, as PostgreSQL does.
pub fn unescape(raw: &[u8], out: &mut Vec<u8>) {
    out.reserve(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.iter().position(|&b| b == b'\\') {
        let (plain, tail) = rest.split_at(at);
        out.extend_from_slice(plain);
        let Some((&code, after)) = tail.get(1..).and_then(<[u8]>::split_first) else {
            return;
        };
        rest = after;
        let byte = match code {
            b'0'..=b'7' => {
                let mut value = code - b'0';
                for _ in 0..2 {
                    match rest.split_first() {
                        Some((&d @ b'0'..=b'7', more)) => {
                            value = value.wrapping_mul(8).wrapping_add(d - b'0');
                            rest = more;
                        }
                        _ => break,
                    }
                }
                value
            }
            b'x' => match rest
                .split_first()
                .and_then(|(&d, more)| Some((hex_value(d)?, more)))
            {
                Some((high, more)) => {
                    rest = more;
                    match rest
                        .split_first()
                        .and_then(|(&d, more)| Some((hex_value(d)?, more)))
                    {
                        Some((low, more)) => {
                            rest = more;
                            (high << 4) | low
                        }
                        None => high,
                    }
                }
                None => b'x',
            },
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 0x0b,
            other => other,
        };
        out.push(byte);
    }
    out.extend_from_slice(rest);
}

/// The value of one hex digit.
fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Where one decoded field's bytes are.
#[derive(Debug, Clone, Copy)]
enum Span {
    /// The field is NULL.
    Null,
    /// `line[start..end]`: the field had no escapes.
    Line(usize, usize),
    /// `buf[start..end]`: the field's unescaped copy.
    Buf(usize, usize),
}

/// Splits and unescapes COPY text rows into reusable buffers, so decoding a
/// row allocates nothing once the buffers have grown to the row size.
///
/// Fields without escapes are not copied: the [`Row`] points into the line.
#[derive(Debug, Default, Clone)]
pub struct RowDecoder {
    spans: Vec<Span>,
    buf: Vec<u8>,
}

impl RowDecoder {
    /// A decoder with empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes one line (without its newline); the row borrows both the
    /// line and the decoder until it is dropped.
    pub fn decode<'a>(&'a mut self, line: &'a [u8]) -> Row<'a> {
        self.spans.clear();
        self.buf.clear();
        let mut start = 0;
        loop {
            let rest = line.get(start..).unwrap_or_default();
            let len = field_len(rest);
            let raw = rest.get(..len).unwrap_or_default();
            let span = if raw == NULL_FIELD {
                Span::Null
            } else if is_plain(raw) {
                Span::Line(start, start + len)
            } else {
                let from = self.buf.len();
                unescape(raw, &mut self.buf);
                Span::Buf(from, self.buf.len())
            };
            self.spans.push(span);
            // Past the separating TAB, if there was one.
            start += len + 1;
            if start > line.len() {
                break;
            }
        }
        Row {
            line,
            buf: &self.buf,
            spans: &self.spans,
        }
    }
}

/// One decoded COPY row, from [`RowDecoder::decode`].
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    line: &'a [u8],
    buf: &'a [u8],
    spans: &'a [Span],
}

impl<'a> Row<'a> {
    /// Number of fields in the row (at least one).
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// True when the row has no fields (never, for a decoded line).
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Field `i`: `None` when there is no such field, `Some(None)` for NULL,
    /// otherwise `Some(Some(value))` with the unescaped bytes.
    pub fn get(&self, i: usize) -> Option<Option<&'a [u8]>> {
        let span = *self.spans.get(i)?;
        Some(match span {
            Span::Null => None,
            Span::Line(start, end) => Some(self.line.get(start..end).unwrap_or_default()),
            Span::Buf(start, end) => Some(self.buf.get(start..end).unwrap_or_default()),
        })
    }

    /// Field `i`'s unescaped bytes, or `None` when it is NULL or the row has
    /// no such field (check [`Row::len`] to tell them apart).
    pub fn field(&self, i: usize) -> Option<&'a [u8]> {
        self.get(i).flatten()
    }

    /// The fields in order, `None` for NULL.
    pub fn iter(&self) -> impl Iterator<Item = Option<&'a [u8]>> + 'a {
        let row = *self;
        (0..row.len()).map(move |i| row.get(i).flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn unescaped(raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        unescape(raw, &mut out);
        out
    }

    #[test]
    fn splits_fields() {
        type Case<'a> = (&'a [u8], &'a [Option<&'a [u8]>]);
        let cases: &[Case] = &[
            (b"", &[Some(b"")]),
            (b"a", &[Some(b"a")]),
            (b"a\tb", &[Some(b"a"), Some(b"b")]),
            (b"\t", &[Some(b""), Some(b"")]),
            (b"1\t\\N\tx", &[Some(b"1"), None, Some(b"x")]),
            (b"\\N", &[None]),
            (b"\\\\N", &[Some(b"\\\\N")]),
            (b"\\Nx\t\\n", &[Some(b"\\Nx"), Some(b"\\n")]),
            (b"a\\\tb\tc", &[Some(b"a\\\tb"), Some(b"c")]),
            (b"a\\\\\tb", &[Some(b"a\\\\"), Some(b"b")]),
            (b"end\\", &[Some(b"end\\")]),
        ];
        for (line, want) in cases {
            let got: Vec<_> = split_fields(line).collect();
            assert_eq!(&got, want, "{:?}", String::from_utf8_lossy(line));
            let mut decoder = RowDecoder::new();
            let row = decoder.decode(line);
            assert_eq!(row.len(), want.len());
            let want_values: Vec<Option<Vec<u8>>> = want.iter().map(|f| f.map(unescaped)).collect();
            let got_values: Vec<Option<Vec<u8>>> =
                row.iter().map(|f| f.map(<[u8]>::to_vec)).collect();
            assert_eq!(got_values, want_values);
            assert_eq!(row.get(want.len()), None);
        }
    }

    #[test]
    fn unescapes() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"plain", b"plain"),
            (b"", b""),
            (b"\\b\\f\\n\\r\\t\\v\\\\", b"\x08\x0c\n\r\t\x0b\\"),
            (b"a\\tb", b"a\tb"),
            (b"\\101\\1012", b"AA2"),
            (b"\\0", b"\0"),
            (b"\\12x", b"\nx"),
            (b"\\377\\777", b"\xff\xff"),
            (b"\\x41\\x4a\\x4A", b"AJJ"),
            (b"\\x4", b"\x04"),
            (b"\\x4g", b"\x04g"),
            (b"\\x414", b"A4"),
            (b"\\xg", b"xg"),
            (b"\\x", b"x"),
            (b"\\N", b"N"),
            (b"\\q\\.\\\"", b"q.\""),
            (b"\\8\\9", b"89"),
            (b"tail\\", b"tail"),
            (b"\xff\\\xfe", b"\xff\xfe"),
        ];
        for (raw, want) in cases {
            assert_eq!(
                unescaped(raw),
                want.to_vec(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
            assert_eq!(is_plain(raw), !raw.contains(&b'\\'));
        }
        assert!(is_plain(b"a\tb"));
        assert!(!is_plain(b"a\\tb"));
    }

    #[test]
    fn decoder_reuses_buffers() {
        let mut decoder = RowDecoder::new();
        {
            let row = decoder.decode(b"a\\tb\t\\N\tc");
            assert_eq!(row.field(0), Some(&b"a\tb"[..]));
            assert_eq!(row.get(1), Some(None));
            assert_eq!(row.field(2), Some(&b"c"[..]));
        }
        let row = decoder.decode(b"x");
        assert_eq!(row.len(), 1);
        assert_eq!(row.field(0), Some(&b"x"[..]));
        assert!(!row.is_empty());
    }

    /// Escapes `data` for COPY, picking per byte (by `style`) among the
    /// escape forms a reader must accept.
    fn escape(data: &[(u8, u8)], out: &mut Vec<u8>) {
        for &(b, style) in data {
            match style % 4 {
                1 => out.extend_from_slice(format!("\\{b:03o}").as_bytes()),
                2 => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
                3 if !b"bfnrtvxN01234567".contains(&b) => out.extend_from_slice(&[b'\\', b]),
                // What `COPY TO` itself writes.
                _ => match b {
                    0x08 => out.extend_from_slice(b"\\b"),
                    0x0c => out.extend_from_slice(b"\\f"),
                    b'\n' => out.extend_from_slice(b"\\n"),
                    b'\r' => out.extend_from_slice(b"\\r"),
                    b'\t' => out.extend_from_slice(b"\\t"),
                    0x0b => out.extend_from_slice(b"\\v"),
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    _ => out.push(b),
                },
            }
        }
    }

    proptest! {
        #[test]
        fn escaped_rows_round_trip(
            row in proptest::collection::vec(
                proptest::option::of(proptest::collection::vec(any::<(u8, u8)>(), 0..12)),
                1..8,
            ),
        ) {
            let mut line = Vec::new();
            for (i, field) in row.iter().enumerate() {
                if i > 0 {
                    line.push(b'\t');
                }
                match field {
                    None => line.extend_from_slice(b"\\N"),
                    Some(data) => escape(data, &mut line),
                }
            }
            let want: Vec<Option<Vec<u8>>> = row
                .iter()
                .map(|f| f.as_ref().map(|data| data.iter().map(|&(b, _)| b).collect()))
                .collect();

            let mut got = Vec::new();
            for raw in split_fields(&line) {
                got.push(raw.map(|raw| {
                    if is_plain(raw) {
                        raw.to_vec()
                    } else {
                        unescaped(raw)
                    }
                }));
            }
            prop_assert_eq!(&got, &want);

            let mut decoder = RowDecoder::new();
            let decoded: Vec<Option<Vec<u8>>> = decoder
                .decode(&line)
                .iter()
                .map(|f| f.map(<[u8]>::to_vec))
                .collect();
            prop_assert_eq!(&decoded, &want);
        }

        #[test]
        fn splitting_never_loses_bytes(line in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut decoder = RowDecoder::new();
            let row = decoder.decode(&line);
            let fields: Vec<_> = split_fields(&line).collect();
            prop_assert_eq!(row.len(), fields.len());
            let mut joined = Vec::new();
            for (i, raw) in fields.iter().enumerate() {
                if i > 0 {
                    joined.push(b'\t');
                }
                joined.extend_from_slice(raw.unwrap_or(b"\\N"));
            }
            prop_assert_eq!(joined, line);
        }
    }
}
