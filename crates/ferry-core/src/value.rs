//! Rendering PostgreSQL values, given in their text output form, as JSON.
//!
//! Values arrive as the text a type's output function prints, both from the
//! replication stream (pgoutput in text mode) and from `COPY ... TO STDOUT`.
//! The session settings are pinned (`TimeZone=UTC`, `DateStyle=ISO`,
//! `IntervalStyle=postgres`, `extra_float_digits=3`, `bytea_output=hex`), so
//! the forms handled here are the ones those settings produce.
//!
//! Rendering appends straight to a byte buffer and never fails: text that
//! does not have the expected form becomes a JSON string of that text, so
//! the output is always one valid JSON value. It never contains a raw line
//! break either, so a document stays on one line of a bulk request.

#![warn(missing_docs)]

use base64::Engine as _;
use serde_json::json;

/// How a PostgreSQL type renders to JSON and maps in OpenSearch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeKind {
    /// `bool`: `t`/`f` become `true`/`false`.
    Bool,
    /// `int2`: a JSON number.
    Int16,
    /// `int4`: a JSON number.
    Int32,
    /// `int8` and `oid`: a JSON number.
    Int64,
    /// `float4`: a JSON number; `NaN` and the infinities become `null`.
    Float32,
    /// `float8`: a JSON number; `NaN` and the infinities become `null`.
    Float64,
    /// `numeric`: a JSON number with every digit kept; `NaN` and the
    /// infinities become `null`.
    Numeric,
    /// `money`: a JSON number once the currency symbol and digit grouping
    /// are removed.
    Money,
    /// Character types (`text`, `varchar`, `bpchar`, `name`, `"char"`, `xml`):
    /// a JSON string.
    Text,
    /// `uuid`: a JSON string.
    Uuid,
    /// `json` and `jsonb`: the JSON itself, embedded as is.
    Json,
    /// `bytea`: a JSON string holding the bytes in standard, padded base64.
    Bytea,
    /// `date`: an ISO 8601 date string.
    Date,
    /// `time`: a JSON string.
    Time,
    /// `timetz`: a JSON string.
    TimeTz,
    /// `timestamp`: an ISO 8601 local date-time string.
    Timestamp,
    /// `timestamptz`: an RFC 3339 date-time string.
    TimestampTz,
    /// `interval`: a JSON string.
    Interval,
    /// `inet`: a JSON string.
    Inet,
    /// `cidr`: a JSON string.
    Cidr,
    /// `macaddr` and `macaddr8`: a JSON string.
    MacAddr,
    /// An array type: a (nested) JSON array of its elements.
    Array {
        /// How each element renders.
        elem: Box<TypeKind>,
        /// The element type's array delimiter (`pg_type.typdelim`): `,` for
        /// every built-in type except `box`, which uses `;`.
        delim: u8,
    },
    /// Anything else (enums, composites, ranges, geometric types...): a JSON
    /// string of the text.
    Other,
}

impl TypeKind {
    /// Whether `text` can be PostgreSQL's text output of a value of this
    /// kind (a document id part that is not cannot be any row's key). Exact
    /// for integers and uuid; true for every kind whose syntax ferry does
    /// not model.
    pub fn admits(&self, text: &str) -> bool {
        fn int<T: std::str::FromStr + ToString>(text: &str) -> bool {
            text.parse::<T>().is_ok_and(|n| n.to_string() == text)
        }
        match self {
            TypeKind::Int16 => int::<i16>(text),
            TypeKind::Int32 => int::<i32>(text),
            TypeKind::Int64 => int::<i64>(text),
            TypeKind::Uuid => {
                text.len() == 36
                    && text.char_indices().all(|(i, c)| match i {
                        8 | 13 | 18 | 23 => c == '-',
                        _ => matches!(c, '0'..='9' | 'a'..='f'),
                    })
            }
            _ => true,
        }
    }

    /// The kind of a built-in type, from its OID, or `None` for a type that
    /// is not built in (the caller resolves enums, domains and composites
    /// from the catalog).
    ///
    /// Arrays of the built-in types listed here are recognised too.
    pub fn from_builtin_oid(oid: u32) -> Option<TypeKind> {
        if let Some(kind) = scalar_kind(oid) {
            return Some(kind);
        }
        let elem = match oid {
            1000 => 16,
            1005 => 21,
            1007 => 23,
            1016 => 20,
            1028 => 26,
            1021 => 700,
            1022 => 701,
            1231 => 1700,
            791 => 790,
            1009 => 25,
            1015 => 1043,
            1014 => 1042,
            1003 => 19,
            1002 => 18,
            143 => 142,
            2951 => 2950,
            199 => 114,
            3807 => 3802,
            1001 => 17,
            1182 => 1082,
            1183 => 1083,
            1270 => 1266,
            1115 => 1114,
            1185 => 1184,
            1187 => 1186,
            1041 => 869,
            651 => 650,
            1040 => 829,
            775 => 774,
            _ => return None,
        };
        scalar_kind(elem).map(|kind| TypeKind::Array {
            elem: Box::new(kind),
            delim: b',',
        })
    }

    /// The OpenSearch field mapping for values of this kind, for example
    /// `{"type":"long"}`. An array maps like its elements, since OpenSearch
    /// fields take any number of values.
    pub fn mapping(&self) -> serde_json::Value {
        let simple = |t: &str| json!({ "type": t });
        match self {
            TypeKind::Bool => simple("boolean"),
            TypeKind::Int16 => simple("short"),
            TypeKind::Int32 => simple("integer"),
            TypeKind::Int64 => simple("long"),
            TypeKind::Float32 => simple("float"),
            TypeKind::Float64 | TypeKind::Numeric | TypeKind::Money => simple("double"),
            TypeKind::Text | TypeKind::Other => json!({
                "type": "text",
                "fields": { "keyword": { "type": "keyword", "ignore_above": 256 } }
            }),
            TypeKind::Uuid
            | TypeKind::MacAddr
            | TypeKind::Time
            | TypeKind::TimeTz
            | TypeKind::Interval
            | TypeKind::Cidr => simple("keyword"),
            TypeKind::Json => json!({ "type": "object", "enabled": false }),
            TypeKind::Bytea => simple("binary"),
            TypeKind::Date | TypeKind::Timestamp | TypeKind::TimestampTz => json!({
                "type": "date",
                "format": "strict_date_optional_time||epoch_millis"
            }),
            // An inet may carry a netmask (10.1.2.3/24), which `ip` fields
            // refuse; keyword keeps every value (override with `ip` when the
            // column only ever holds plain addresses).
            TypeKind::Inet => simple("keyword"),
            TypeKind::Array { elem, .. } => elem.mapping(),
        }
    }
}

/// The kind of a built-in scalar (non-array) type.
fn scalar_kind(oid: u32) -> Option<TypeKind> {
    Some(match oid {
        16 => TypeKind::Bool,
        21 => TypeKind::Int16,
        23 => TypeKind::Int32,
        20 | 26 => TypeKind::Int64,
        700 => TypeKind::Float32,
        701 => TypeKind::Float64,
        1700 => TypeKind::Numeric,
        790 => TypeKind::Money,
        25 | 1043 | 1042 | 19 | 18 | 142 => TypeKind::Text,
        2950 => TypeKind::Uuid,
        114 | 3802 => TypeKind::Json,
        17 => TypeKind::Bytea,
        1082 => TypeKind::Date,
        1083 => TypeKind::Time,
        1266 => TypeKind::TimeTz,
        1114 => TypeKind::Timestamp,
        1184 => TypeKind::TimestampTz,
        1186 => TypeKind::Interval,
        869 => TypeKind::Inet,
        650 => TypeKind::Cidr,
        829 | 774 => TypeKind::MacAddr,
        _ => return None,
    })
}

/// Appends the JSON rendering of one non-NULL value of kind `kind`, given in
/// PostgreSQL's text output form.
///
/// Never fails: text that does not have the form the kind expects becomes a
/// JSON string of that text. The output is always exactly one JSON value and
/// holds no raw line break.
pub fn write_value(kind: &TypeKind, text: &[u8], out: &mut Vec<u8>) {
    match kind {
        TypeKind::Bool => match text {
            b"t" => out.extend_from_slice(b"true"),
            b"f" => out.extend_from_slice(b"false"),
            _ => write_json_str(text, out),
        },
        TypeKind::Int16 | TypeKind::Int32 | TypeKind::Int64 => {
            if is_json_integer(text) {
                out.extend_from_slice(text);
            } else {
                write_json_str(text, out);
            }
        }
        TypeKind::Float32 | TypeKind::Float64 | TypeKind::Numeric => match text {
            b"NaN" | b"Infinity" | b"-Infinity" => out.extend_from_slice(b"null"),
            _ if is_finite_json_number(text) => out.extend_from_slice(text),
            // A number beyond a double's range (numeric 1e400): no search
            // engine field can hold it, so it is null like NaN.
            _ if std::str::from_utf8(text)
                .ok()
                .and_then(|t| t.parse::<f64>().ok())
                .is_some_and(f64::is_infinite) =>
            {
                out.extend_from_slice(b"null")
            }
            _ => write_json_str(text, out),
        },
        TypeKind::Money => write_money(text, out),
        TypeKind::Json => write_json_text(text, out),
        TypeKind::Bytea => write_bytea(text, out),
        TypeKind::Date => write_datetime(text, Stamp::Date, out),
        TypeKind::Timestamp => write_datetime(text, Stamp::Local, out),
        TypeKind::TimestampTz => write_datetime(text, Stamp::Zoned, out),
        TypeKind::Array { elem, delim } => write_array(elem, *delim, text, out),
        TypeKind::Text
        | TypeKind::Uuid
        | TypeKind::Time
        | TypeKind::TimeTz
        | TypeKind::Interval
        | TypeKind::Inet
        | TypeKind::Cidr
        | TypeKind::MacAddr
        | TypeKind::Other => write_json_str(text, out),
    }
}

/// What a byte turns into inside a JSON string: 0 for itself, `u` for a
/// `\u00XX` escape, otherwise the letter that follows the backslash.
static ESCAPES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        table[i] = b'u';
        i += 1;
    }
    table[0x08] = b'b';
    table[0x09] = b't';
    table[0x0a] = b'n';
    table[0x0c] = b'f';
    table[0x0d] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

/// Lower-case hex digits by value.
const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Appends `s` as a JSON string literal, quotes included, escaped per
/// RFC 8259 (`"`, `\` and every control character). Bytes that are not
/// valid UTF-8 are replaced by U+FFFD, one per invalid sequence, as
/// [`String::from_utf8_lossy`] does.
pub fn write_json_str(s: &[u8], out: &mut Vec<u8>) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    for chunk in s.utf8_chunks() {
        write_escaped(chunk.valid().as_bytes(), out);
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{FFFD}".as_bytes());
        }
    }
    out.push(b'"');
}

/// Appends valid UTF-8 `s` with the escapes a JSON string needs.
fn write_escaped(s: &[u8], out: &mut Vec<u8>) {
    let mut rest = s;
    while let Some(at) = rest.iter().position(|&b| ESCAPES[usize::from(b)] != 0) {
        let (plain, tail) = rest.split_at(at);
        out.extend_from_slice(plain);
        let Some((&b, tail)) = tail.split_first() else {
            break;
        };
        match ESCAPES[usize::from(b)] {
            b'u' => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX_DIGITS[usize::from(b >> 4)]);
                out.push(HEX_DIGITS[usize::from(b & 0x0f)]);
            }
            letter => {
                out.push(b'\\');
                out.push(letter);
            }
        }
        rest = tail;
    }
    out.extend_from_slice(rest);
}

/// Splits `s` after its leading ASCII digits.
fn split_digits(s: &[u8]) -> (&[u8], &[u8]) {
    let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
    s.split_at(n)
}

/// True for an optional `-` and decimal digits without a redundant leading
/// zero: a JSON integer. At most 20 digits, which is more than any integer
/// type prints, so every JSON reader can hold it.
fn is_json_integer(s: &[u8]) -> bool {
    let digits = s.strip_prefix(b"-").unwrap_or(s);
    match digits {
        [b'0'] => true,
        [b'1'..=b'9', ..] => digits.len() <= 20 && digits.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

/// True when `s` is a JSON number (RFC 8259 grammar) whose magnitude a
/// 64-bit float can hold, so readers that convert numbers to `f64` (and
/// OpenSearch's `double` fields) accept it. Precision beyond `f64` is fine:
/// the digits stay in the document source as written.
fn is_finite_json_number(s: &[u8]) -> bool {
    let unsigned = s.strip_prefix(b"-").unwrap_or(s);
    let (int, rest) = split_digits(unsigned);
    if int.is_empty() || (int.len() > 1 && int.first() == Some(&b'0')) {
        return false;
    }
    let rest = match rest.strip_prefix(b".") {
        Some(after_point) => {
            let (frac, rest) = split_digits(after_point);
            if frac.is_empty() {
                return false;
            }
            rest
        }
        None => rest,
    };
    let mut exponent: i64 = 0;
    let rest = match rest {
        [b'e' | b'E', after_e @ ..] => {
            let (negative, unsigned_exp) = match after_e {
                [b'-', r @ ..] => (true, r),
                [b'+', r @ ..] => (false, r),
                r => (false, r),
            };
            let (digits, rest) = split_digits(unsigned_exp);
            if digits.is_empty() {
                return false;
            }
            for &d in digits {
                exponent = exponent
                    .saturating_mul(10)
                    .saturating_add(i64::from(d - b'0'));
            }
            if negative {
                exponent = -exponent;
            }
            rest
        }
        _ => rest,
    };
    if !rest.is_empty() {
        return false;
    }
    // The value is below 10^(integer digits + exponent); only numbers that
    // might come near f64::MAX (about 1.8e308) need a closer look.
    let int_digits = int.iter().skip_while(|&&d| d == b'0').count();
    let int_digits = i64::try_from(int_digits).unwrap_or(i64::MAX);
    if int_digits.saturating_add(exponent) <= 300 {
        return true;
    }
    std::str::from_utf8(s)
        .ok()
        .and_then(|t| t.parse::<f64>().ok())
        .is_some_and(f64::is_finite)
}

/// `money`: drops the currency symbol and digit grouping and writes the
/// number, or a string of the text when it does not read as one.
fn write_money(text: &[u8], out: &mut Vec<u8>) {
    let mark = out.len();
    if money_number(text, out).is_none() {
        out.truncate(mark);
        write_json_str(text, out);
    }
}

/// Writes the number in a `money` text, or returns `None` (having possibly
/// written part of it) when the text does not read as one.
///
/// What `money` prints depends on `lc_monetary`: `$1,234.56` and
/// `-$1,234.56` in the C and English locales, but also `1.234,56 €` or
/// `1 234,56 €`. Everything before the first digit and after the last is
/// symbol or sign (a `-` or `(` there makes the amount negative). Between
/// them, the decimal mark is the last `.` or `,`, unless that character
/// also occurs earlier (then it groups digits) or it is the only mark and
/// three digits follow it (then it groups thousands, as in `¥1,235`).
fn money_number(text: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let first = text.iter().position(u8::is_ascii_digit)?;
    let last = text.iter().rposition(u8::is_ascii_digit)?;
    let (head, from_first) = text.split_at(first);
    let (body, tail) = from_first.split_at(last.checked_sub(first)? + 1);
    let negative = head.iter().chain(tail).any(|&b| b == b'-' || b == b'(');

    let decimal_at = body
        .iter()
        .rposition(|&b| b == b'.' || b == b',')
        .and_then(|at| {
            let mark = *body.get(at)?;
            let other = if mark == b'.' { b',' } else { b'.' };
            let before = body.get(..at)?;
            let after = body.get(at + 1..)?;
            if before.contains(&other) {
                Some(at)
            } else if before.contains(&mark) || after.len() == 3 {
                None
            } else {
                Some(at)
            }
        });
    let (int_part, frac_part) = match decimal_at {
        Some(at) => (body.get(..at)?, Some(body.get(at + 1..)?)),
        None => (body, None),
    };

    if negative {
        out.push(b'-');
    }
    let start = out.len();
    for &b in int_part {
        if b.is_ascii_digit() {
            // Leading zeros are not allowed in a JSON number.
            if b != b'0' || out.len() > start {
                out.push(b);
            }
        } else if b.is_ascii() && !matches!(b, b',' | b'.' | b' ' | b'\'') {
            return None;
        }
    }
    if out.len() - start > 300 {
        return None;
    }
    if out.len() == start {
        out.push(b'0');
    }
    if let Some(frac) = frac_part {
        if frac.is_empty() || !frac.iter().all(u8::is_ascii_digit) {
            return None;
        }
        out.push(b'.');
        out.extend_from_slice(frac);
    }
    Some(())
}

/// `json`/`jsonb`: embeds the text when it is valid JSON, with any line
/// breaks (which valid JSON can only have as whitespace between tokens, and
/// `json` keeps from its input) turned into spaces. A `json` object with
/// duplicate keys (which the cluster refuses) keeps only the last of them,
/// as `jsonb` does.
fn write_json_text(text: &[u8], out: &mut Vec<u8>) {
    let valid = std::str::from_utf8(text)
        .ok()
        .is_some_and(|s| serde_json::from_str::<serde::de::IgnoredAny>(s).is_ok());
    if !valid {
        write_json_str(text, out);
        return;
    }
    if text.contains(&b'{') {
        let mut deduped = Vec::with_capacity(text.len());
        let mut pos = 0;
        if dedup_keys(text, &mut pos, &mut deduped) {
            out.extend_from_slice(&deduped);
            return;
        }
    }
    if text.iter().any(|&b| b == b'\n' || b == b'\r') {
        out.extend(
            text.iter()
                .map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
        );
    } else {
        out.extend_from_slice(text);
    }
}

/// Copies the JSON value at `text[*pos..]` (valid JSON, so at most 128
/// levels deep: serde_json's limit) into `out` without whitespace, keeping
/// only the last member of each object for every key (compared decoded, so
/// `"a"` and `"\u0061"` are one key). Returns whether a duplicate was dropped.
fn dedup_keys(text: &[u8], pos: &mut usize, out: &mut Vec<u8>) -> bool {
    fn skip_ws(text: &[u8], pos: &mut usize) {
        while text.get(*pos).is_some_and(|b| b" \t\r\n".contains(b)) {
            *pos += 1;
        }
    }
    /// The span of the string starting at `*pos` (a quote), quotes included.
    fn string_span<'a>(text: &'a [u8], pos: &mut usize) -> &'a [u8] {
        let start = *pos;
        *pos += 1;
        while let Some(&b) = text.get(*pos) {
            *pos += 1;
            match b {
                b'\\' => *pos += 1,
                b'"' => break,
                _ => {}
            }
        }
        &text[start..(*pos).min(text.len())]
    }
    skip_ws(text, pos);
    let mut dropped = false;
    match text.get(*pos) {
        Some(b'{') => {
            *pos += 1;
            let mut members: Vec<(String, Vec<u8>)> = Vec::new();
            loop {
                skip_ws(text, pos);
                match text.get(*pos) {
                    Some(b'}') | None => {
                        *pos += 1;
                        break;
                    }
                    Some(b',') => *pos += 1,
                    Some(_) => {
                        let raw = string_span(text, pos);
                        let key = serde_json::from_slice::<String>(raw).unwrap_or_default();
                        let mut member = raw.to_vec();
                        member.push(b':');
                        skip_ws(text, pos);
                        *pos += 1; // the colon
                        dropped |= dedup_keys(text, pos, &mut member);
                        members.push((key, member));
                    }
                }
            }
            out.push(b'{');
            let mut first = true;
            for (i, (key, member)) in members.iter().enumerate() {
                if members[i + 1..].iter().any(|(k, _)| k == key) {
                    dropped = true;
                    continue;
                }
                if !first {
                    out.push(b',');
                }
                first = false;
                out.extend_from_slice(member);
            }
            out.push(b'}');
        }
        Some(b'[') => {
            *pos += 1;
            out.push(b'[');
            loop {
                skip_ws(text, pos);
                match text.get(*pos) {
                    Some(b']') | None => {
                        *pos += 1;
                        break;
                    }
                    Some(b',') => {
                        *pos += 1;
                        out.push(b',');
                    }
                    Some(_) => dropped |= dedup_keys(text, pos, out),
                }
            }
            out.push(b']');
        }
        Some(b'"') => out.extend_from_slice(string_span(text, pos)),
        Some(_) => {
            let start = *pos;
            while text.get(*pos).is_some_and(|b| !b" \t\r\n,]}".contains(b)) {
                *pos += 1;
            }
            out.extend_from_slice(&text[start..*pos]);
        }
        None => {}
    }
    dropped
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

/// `bytea` in hex form (`\x0102...`): a base64 string of the bytes,
/// converted in blocks on the stack; anything else is a string of the text.
fn write_bytea(text: &[u8], out: &mut Vec<u8>) {
    let mark = out.len();
    if bytea_base64(text, out).is_none() {
        out.truncate(mark);
        write_json_str(text, out);
    }
}

/// Writes the base64 string for a hex-form `bytea`, or returns `None`
/// (having possibly written part of it) when the text is not in hex form.
fn bytea_base64(text: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    // A multiple of 3 bytes, so only the last block can need padding.
    let mut block = [0u8; 768];
    out.reserve(hex.len() / 3 * 2 + 6);
    out.push(b'"');
    for chunk in hex.chunks(block.len() * 2) {
        let mut n = 0;
        for (byte, pair) in block.iter_mut().zip(chunk.chunks_exact(2)) {
            let [hi, lo] = pair else { return None };
            *byte = (hex_value(*hi)? << 4) | hex_value(*lo)?;
            n += 1;
        }
        let bytes = block.get(..n)?;
        let at = out.len();
        out.resize(at + base64::encoded_len(n, true)?, 0);
        let written = base64::engine::general_purpose::STANDARD
            .encode_slice(bytes, out.get_mut(at..)?)
            .ok()?;
        out.truncate(at + written);
    }
    out.push(b'"');
    Some(())
}

/// Which date/time type a text is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stamp {
    /// `date`.
    Date,
    /// `timestamp` (without time zone).
    Local,
    /// `timestamptz`.
    Zoned,
}

/// A parsed ISO-style date or timestamp.
#[derive(Debug, Clone, Copy)]
struct DateTime<'a> {
    /// Astronomical year: 1 BC is 0, 2 BC is -1.
    year: i64,
    month: u32,
    day: u32,
    /// Time of day, for timestamps.
    time: Option<TimeOfDay<'a>>,
    /// UTC offset in seconds east, for `timestamptz`.
    offset: Option<i64>,
}

/// A time of day with its fraction digits kept as written.
#[derive(Debug, Clone, Copy)]
struct TimeOfDay<'a> {
    hour: u32,
    minute: u32,
    second: u32,
    /// The digits after the decimal point (possibly none).
    fraction: &'a [u8],
}

/// A forward-only reader over ASCII text.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// Consumes `b` if it comes next.
    fn eat(&mut self, b: u8) -> bool {
        match self.rest.split_first() {
            Some((&first, rest)) if first == b => {
                self.rest = rest;
                true
            }
            _ => false,
        }
    }

    /// Consumes `s` if it comes next.
    fn eat_str(&mut self, s: &[u8]) -> bool {
        match self.rest.strip_prefix(s) {
            Some(rest) => {
                self.rest = rest;
                true
            }
            None => false,
        }
    }

    /// Consumes a run of `min..=max` digits and returns them.
    fn digits(&mut self, min: usize, max: usize) -> Option<&'a [u8]> {
        let n = self
            .rest
            .iter()
            .take(max + 1)
            .take_while(|b| b.is_ascii_digit())
            .count();
        if n < min || n > max {
            return None;
        }
        let (digits, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(digits)
    }

    /// Consumes `min..=max` digits (at most 9) and returns their value.
    fn number(&mut self, min: usize, max: usize) -> Option<u32> {
        Some(
            self.digits(min, max)?
                .iter()
                .fold(0, |v, &d| v * 10 + u32::from(d - b'0')),
        )
    }

    /// Consumes `sep` followed by exactly two digits and returns their value.
    fn then_number(&mut self, sep: u8) -> Option<u32> {
        if self.eat(sep) {
            self.number(2, 2)
        } else {
            None
        }
    }
}

/// Parses the ISO output of `date`, `timestamp` or `timestamptz`:
/// `YYYY-MM-DD[ HH:MM:SS[.ffffff][±HH[:MM[:SS]]]][ BC]`.
fn parse_datetime(text: &[u8], stamp: Stamp) -> Option<DateTime<'_>> {
    let mut c = Cursor { rest: text };
    let year = c.number(4, 9)?;
    let month = c.then_number(b'-')?;
    let day = c.then_number(b'-')?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let mut time = None;
    let mut offset = None;
    if stamp != Stamp::Date {
        if !c.eat(b' ') {
            return None;
        }
        let hour = c.number(2, 2)?;
        let minute = c.then_number(b':')?;
        let second = c.then_number(b':')?;
        if hour > 23 || minute > 59 || second > 60 {
            return None;
        }
        let fraction = if c.eat(b'.') { c.digits(1, 9)? } else { &[] };
        time = Some(TimeOfDay {
            hour,
            minute,
            second,
            fraction,
        });
        if stamp == Stamp::Zoned {
            let sign: i64 = if c.eat(b'+') {
                1
            } else if c.eat(b'-') {
                -1
            } else {
                return None;
            };
            let hours = c.number(2, 2)?;
            let minutes = if c.rest.first() == Some(&b':') {
                c.then_number(b':')?
            } else {
                0
            };
            let seconds = if c.rest.first() == Some(&b':') {
                c.then_number(b':')?
            } else {
                0
            };
            if minutes > 59 || seconds > 59 {
                return None;
            }
            offset = Some(sign * i64::from(hours * 3600 + minutes * 60 + seconds));
        }
    }
    let year = if c.eat_str(b" BC") {
        if year == 0 {
            return None;
        }
        1 - i64::from(year)
    } else {
        i64::from(year)
    };
    if !c.rest.is_empty() {
        return None;
    }
    Some(DateTime {
        year,
        month,
        day,
        time,
        offset,
    })
}

/// Dates and timestamps: `null` for the infinities, an ISO 8601 / RFC 3339
/// string when the text parses, else a string of the text.
fn write_datetime(text: &[u8], stamp: Stamp, out: &mut Vec<u8>) {
    if text == b"infinity" || text == b"-infinity" {
        out.extend_from_slice(b"null");
        return;
    }
    match parse_datetime(text, stamp) {
        Some(dt) => write_iso(dt, out),
        None => write_json_str(text, out),
    }
}

/// Appends `n` in decimal, zero-padded to at least `width` digits.
fn push_padded(out: &mut Vec<u8>, n: u64, width: usize) {
    let mut buf = [b'0'; 20];
    let mut n = n;
    let mut used = 0;
    for slot in buf.iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
        used += 1;
        if n == 0 {
            break;
        }
    }
    let used = used.max(width).min(buf.len());
    out.extend_from_slice(buf.get(buf.len() - used..).unwrap_or_default());
}

/// Appends an astronomical year as ISO 8601 does: four digits for 0..=9999,
/// a sign and at least four digits outside that range.
fn push_year(out: &mut Vec<u8>, year: i64) {
    if year < 0 {
        out.push(b'-');
    } else if year > 9999 {
        out.push(b'+');
    }
    push_padded(out, year.unsigned_abs(), 4);
}

/// Writes a parsed date or timestamp as a JSON string.
///
/// An offset with a seconds part cannot be written in RFC 3339, so such a
/// time is shifted to UTC first.
fn write_iso(mut dt: DateTime<'_>, out: &mut Vec<u8>) {
    if let (Some(offset), Some(time)) = (dt.offset, dt.time.as_mut()) {
        if offset % 60 != 0 {
            let local = days_from_civil(dt.year, dt.month, dt.day) * 86_400
                + i64::from(time.hour * 3600 + time.minute * 60 + time.second);
            let utc = local - offset;
            let (year, month, day) = civil_from_days(utc.div_euclid(86_400));
            let secs = utc.rem_euclid(86_400);
            dt.year = year;
            dt.month = month;
            dt.day = day;
            time.hour = u32::try_from(secs / 3600).unwrap_or(0);
            time.minute = u32::try_from(secs % 3600 / 60).unwrap_or(0);
            time.second = u32::try_from(secs % 60).unwrap_or(0);
            dt.offset = Some(0);
        }
    }
    out.push(b'"');
    push_year(out, dt.year);
    out.push(b'-');
    push_padded(out, u64::from(dt.month), 2);
    out.push(b'-');
    push_padded(out, u64::from(dt.day), 2);
    if let Some(time) = dt.time {
        out.push(b'T');
        push_padded(out, u64::from(time.hour), 2);
        out.push(b':');
        push_padded(out, u64::from(time.minute), 2);
        out.push(b':');
        push_padded(out, u64::from(time.second), 2);
        if !time.fraction.is_empty() {
            out.push(b'.');
            out.extend_from_slice(time.fraction);
        }
    }
    match dt.offset {
        None => {}
        Some(0) => out.push(b'Z'),
        Some(offset) => {
            out.push(if offset < 0 { b'-' } else { b'+' });
            let minutes = offset.unsigned_abs() / 60;
            push_padded(out, minutes / 60, 2);
            out.push(b':');
            push_padded(out, minutes % 60, 2);
        }
    }
    out.push(b'"');
}

/// Days since 1970-01-01 of a proleptic Gregorian date (astronomical year).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let (month, day) = (i64::from(month), i64::from(day));
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let shifted_month = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The proleptic Gregorian date (astronomical year) of a day count since
/// 1970-01-01; the inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (
        year,
        u32::try_from(month).unwrap_or(1),
        u32::try_from(day).unwrap_or(1),
    )
}

/// The characters `array_in` skips around elements.
fn is_array_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// `s` without its leading array whitespace.
fn skip_array_space(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&b| is_array_space(b)).count();
    s.split_at(n).1
}

/// Arrays: nested JSON arrays of the rendered elements, or a string of the
/// whole text when it is not a well-formed array literal.
fn write_array(elem: &TypeKind, delim: u8, text: &[u8], out: &mut Vec<u8>) {
    let mark = out.len();
    if parse_array(elem, delim, text, out).is_none() {
        out.truncate(mark);
        write_json_str(text, out);
    }
}

/// Skips a dimension decoration such as `[0:1][1:3]=`.
fn skip_dimensions(s: &[u8]) -> Option<&[u8]> {
    let mut c = Cursor { rest: s };
    while c.eat(b'[') {
        for _ in 0..2 {
            if !c.eat(b'-') {
                c.eat(b'+');
            }
            c.digits(1, 10)?;
            if !c.eat(b':') {
                break;
            }
        }
        if !c.eat(b']') {
            return None;
        }
    }
    let rest = skip_array_space(c.rest);
    rest.strip_prefix(b"=")
}

/// Writes an array literal as nested JSON arrays; `None` (with part of the
/// output possibly written) when the literal is malformed.
fn parse_array(elem: &TypeKind, delim: u8, text: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let mut cur = skip_array_space(text);
    if cur.first() == Some(&b'[') {
        cur = skip_dimensions(cur)?;
        cur = skip_array_space(cur);
    }
    cur = cur.strip_prefix(b"{")?;
    out.push(b'[');
    let mut depth = 1usize;
    let mut first = true;
    // Only elements with backslash escapes are copied, into this buffer.
    let mut scratch = Vec::new();
    'items: loop {
        // At the start of an item, or at the `}` of an empty level.
        cur = skip_array_space(cur);
        match cur.split_first() {
            None => return None,
            Some((b'}', _)) if first => {}
            Some((b'{', rest)) => {
                if !first {
                    out.push(b',');
                }
                out.push(b'[');
                depth += 1;
                first = true;
                cur = rest;
                continue 'items;
            }
            Some(_) => {
                if !first {
                    out.push(b',');
                }
                cur = array_element(elem, delim, cur, out, &mut scratch)?;
            }
        }
        // After an item or a closed level: a delimiter or a `}`.
        loop {
            cur = skip_array_space(cur);
            match cur.split_first() {
                Some((&b, rest)) if b == delim => {
                    cur = rest;
                    first = false;
                    continue 'items;
                }
                Some((b'}', rest)) => {
                    out.push(b']');
                    cur = rest;
                    depth -= 1;
                    if depth == 0 {
                        break 'items;
                    }
                }
                _ => return None,
            }
        }
    }
    skip_array_space(cur).is_empty().then_some(())
}

/// Writes one array element starting at `cur` (which is not whitespace) and
/// returns the text after it.
fn array_element<'a>(
    elem: &TypeKind,
    delim: u8,
    cur: &'a [u8],
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) -> Option<&'a [u8]> {
    if let Some(body) = cur.strip_prefix(b"\"") {
        let mut i = 0;
        let mut escaped = false;
        loop {
            match body.get(i)? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    i += 2;
                }
                _ => i += 1,
            }
        }
        let raw = body.get(..i)?;
        let rest = body.get(i + 1..)?;
        write_element(elem, raw, escaped, out, scratch);
        return Some(rest);
    }
    // Unquoted: up to an unescaped delimiter or `}`; trailing whitespace
    // does not count unless escaped.
    let mut i = 0;
    let mut end = 0;
    let mut escaped = false;
    loop {
        match *cur.get(i)? {
            b if b == delim || b == b'}' => break,
            b'\\' => {
                cur.get(i + 1)?;
                escaped = true;
                i += 2;
                end = i;
            }
            b'{' | b'"' => return None,
            b => {
                i += 1;
                if !is_array_space(b) {
                    end = i;
                }
            }
        }
    }
    if end == 0 {
        return None;
    }
    let raw = cur.get(..end)?;
    if !escaped && raw.eq_ignore_ascii_case(b"NULL") {
        out.extend_from_slice(b"null");
    } else {
        write_element(elem, raw, escaped, out, scratch);
    }
    cur.get(i..)
}

/// Renders one element's raw text, removing backslash escapes if it has any.
fn write_element(
    elem: &TypeKind,
    raw: &[u8],
    escaped: bool,
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) {
    if !escaped {
        write_value(elem, raw, out);
        return;
    }
    scratch.clear();
    let mut bytes = raw.iter();
    while let Some(&b) = bytes.next() {
        if b == b'\\' {
            if let Some(&next) = bytes.next() {
                scratch.push(next);
            }
        } else {
            scratch.push(b);
        }
    }
    write_value(elem, scratch, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_only_what_postgresql_prints_for_integer_and_uuid_keys() {
        assert!(TypeKind::Int32.admits("-42"));
        for bad in ["foo", "", "01", "+1", " 1", "1.0", "2147483648"] {
            assert!(!TypeKind::Int32.admits(bad), "{bad:?}");
        }
        assert!(TypeKind::Int64.admits("2147483648"));
        assert!(!TypeKind::Int16.admits("40000"));
        assert!(TypeKind::Uuid.admits("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"));
        for bad in [
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "foo",
        ] {
            assert!(!TypeKind::Uuid.admits(bad), "{bad:?}");
        }
        assert!(TypeKind::Text.admits("anything at all"));
    }
    use proptest::prelude::*;
    use serde_json::Value;

    fn render(kind: &TypeKind, text: &str) -> String {
        let mut out = Vec::new();
        write_value(kind, text.as_bytes(), &mut out);
        String::from_utf8(out).expect("output is UTF-8")
    }

    fn check(kind: &TypeKind, cases: &[(&str, &str)]) {
        for (text, want) in cases {
            let got = render(kind, text);
            assert_eq!(&got, want, "{kind:?} of {text:?}");
            serde_json::from_str::<Value>(&got)
                .unwrap_or_else(|e| panic!("{kind:?} of {text:?} gave invalid JSON {got}: {e}"));
        }
    }

    fn array(elem: TypeKind) -> TypeKind {
        TypeKind::Array {
            elem: Box::new(elem),
            delim: b',',
        }
    }

    #[test]
    fn booleans() {
        check(
            &TypeKind::Bool,
            &[
                ("t", "true"),
                ("f", "false"),
                ("yes", r#""yes""#),
                ("", r#""""#),
            ],
        );
    }

    #[test]
    fn integers() {
        for kind in [TypeKind::Int16, TypeKind::Int32, TypeKind::Int64] {
            check(
                &kind,
                &[
                    ("0", "0"),
                    ("42", "42"),
                    ("-32768", "-32768"),
                    ("-9223372036854775808", "-9223372036854775808"),
                    ("4294967295", "4294967295"),
                    ("007", r#""007""#),
                    ("1.5", r#""1.5""#),
                    ("-", r#""-""#),
                    ("", r#""""#),
                    (" 1", r#"" 1""#),
                    ("123456789012345678901", r#""123456789012345678901""#),
                ],
            );
        }
    }

    #[test]
    fn floats() {
        for kind in [TypeKind::Float32, TypeKind::Float64] {
            check(
                &kind,
                &[
                    ("1.5", "1.5"),
                    ("-0", "-0"),
                    ("1e-05", "1e-05"),
                    ("1.5e+30", "1.5e+30"),
                    ("1e+30", "1e+30"),
                    ("3.4028235e+38", "3.4028235e+38"),
                    ("1.7976931348623157e+308", "1.7976931348623157e+308"),
                    ("5e-324", "5e-324"),
                    ("NaN", "null"),
                    ("Infinity", "null"),
                    ("-Infinity", "null"),
                    (".5", r#"".5""#),
                    ("1.", r#""1.""#),
                    ("1e", r#""1e""#),
                    ("01", r#""01""#),
                    ("+1", r#""+1""#),
                    // Beyond a double's range: null, like Infinity.
                    ("1e999", "null"),
                ],
            );
        }
    }

    #[test]
    fn numerics_keep_every_digit() {
        let huge = format!("1{}", "0".repeat(400));
        let tiny = format!("0.{}1", "0".repeat(400));
        check(
            &TypeKind::Numeric,
            &[
                (
                    "123456789012345678901234567890.123",
                    "123456789012345678901234567890.123",
                ),
                ("-0.000100", "-0.000100"),
                ("0", "0"),
                ("NaN", "null"),
                ("Infinity", "null"),
                ("-Infinity", "null"),
                (&tiny, &tiny),
                // Beyond a double's range: null, like Infinity.
                (&huge, "null"),
                ("abc", r#""abc""#),
            ],
        );
    }

    #[test]
    fn money() {
        check(
            &TypeKind::Money,
            &[
                ("$1,234.56", "1234.56"),
                ("-$1,234.56", "-1234.56"),
                ("$0.50", "0.50"),
                ("$1,000,000.00", "1000000.00"),
                ("-$92,233,720,368,547,758.08", "-92233720368547758.08"),
                ("($5.00)", "-5.00"),
                ("1.234,56 €", "1234.56"),
                ("-1.234,56 €", "-1234.56"),
                ("1\u{a0}234,56 €", "1234.56"),
                ("Fr. 1'234.56", "1234.56"),
                ("¥1,235", "1235"),
                ("1,5 €", "1.5"),
                ("free", r#""free""#),
                ("$1.2x3", r#""$1.2x3""#),
                ("", r#""""#),
            ],
        );
    }

    #[test]
    fn strings() {
        for kind in [
            TypeKind::Text,
            TypeKind::Uuid,
            TypeKind::Inet,
            TypeKind::Cidr,
            TypeKind::MacAddr,
            TypeKind::Time,
            TypeKind::TimeTz,
            TypeKind::Interval,
            TypeKind::Other,
        ] {
            check(
                &kind,
                &[
                    ("plain", r#""plain""#),
                    ("1 day 02:00:00", r#""1 day 02:00:00""#),
                    ("q\"b\\s/", r#""q\"b\\s/""#),
                    (
                        "\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f}",
                        "\"\\n\\r\\t\\b\\f\\u0001\\u001f\u{7f}\"",
                    ),
                    ("ünï ☃ 𝄞", r#""ünï ☃ 𝄞""#),
                ],
            );
        }
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let mut out = Vec::new();
        write_json_str(b"a\xffb\xe2\x98", &mut out);
        assert_eq!(out, "\"a\u{FFFD}b\u{FFFD}\"".as_bytes());
    }

    #[test]
    fn json_is_embedded() {
        check(
            &TypeKind::Json,
            &[
                (r#"{"a": [1, 2.5, null]}"#, r#"{"a": [1, 2.5, null]}"#),
                ("[]", "[]"),
                ("\"s\"", "\"s\""),
                ("3", "3"),
                ("{\n  \"a\": 1\r\n}", "{   \"a\": 1  }"),
                ("{\"a\":", r#""{\"a\":""#),
                ("nope", r#""nope""#),
                ("{} {}", r#""{} {}""#),
                ("\"\\q\"", r#""\"\\q\"""#),
            ],
        );
        // Duplicate keys: the last one wins at every level, as in jsonb.
        check(
            &TypeKind::Json,
            &[
                (r#"{"a": 1, "a": 2}"#, r#"{"a":2}"#),
                (
                    r#"{"a": 1, "b": {"c": [1, {"d": "x", "d": "y"}]}, "\u0061": 3}"#,
                    r#"{"b":{"c":[1,{"d":"y"}]},"\u0061":3}"#,
                ),
                (
                    r#"[{"k": "a,}\"", "k": 123456789012345678901234567890}]"#,
                    r#"[{"k":123456789012345678901234567890}]"#,
                ),
                (r#"{"a": 1, "b": 2}"#, r#"{"a": 1, "b": 2}"#),
            ],
        );
        // jsonb prints big numbers with all their digits; those stay.
        let big = format!("[1{}]", "0".repeat(400));
        assert_eq!(render(&TypeKind::Json, &big), big);
        let mut out = Vec::new();
        write_value(&TypeKind::Json, b"\"\xff\"", &mut out);
        assert_eq!(out, "\"\\\"\u{FFFD}\\\"\"".as_bytes());
    }

    #[test]
    fn bytea_becomes_base64() {
        let long_hex: String = (0..2000).map(|i| format!("{:02x}", i % 256)).collect();
        let long_bytes: Vec<u8> = (0..2000).map(|i| (i % 256) as u8).collect();
        let long_b64 = base64::engine::general_purpose::STANDARD.encode(&long_bytes);
        check(
            &TypeKind::Bytea,
            &[
                ("\\x", r#""""#),
                ("\\x00", r#""AA==""#),
                ("\\x666f6f", r#""Zm9v""#),
                ("\\x666F6F62", r#""Zm9vYg==""#),
                ("\\x6", r#""\\x6""#),
                ("\\x6g", r#""\\x6g""#),
                ("abc", r#""abc""#),
                (&format!("\\x{long_hex}"), &format!("\"{long_b64}\"")),
            ],
        );
    }

    #[test]
    fn dates() {
        check(
            &TypeKind::Date,
            &[
                ("2024-01-31", r#""2024-01-31""#),
                ("infinity", "null"),
                ("-infinity", "null"),
                ("0044-03-15 BC", r#""-0043-03-15""#),
                ("0001-01-01 BC", r#""0000-01-01""#),
                ("4714-11-24 BC", r#""-4713-11-24""#),
                ("10000-01-01", r#""+10000-01-01""#),
                ("5874897-12-31", r#""+5874897-12-31""#),
                ("2024-13-01", r#""2024-13-01""#),
                ("2024-1-1", r#""2024-1-1""#),
                ("0000-01-01 BC", r#""0000-01-01 BC""#),
                ("2024-01-31 00:00:00", r#""2024-01-31 00:00:00""#),
            ],
        );
    }

    #[test]
    fn timestamps() {
        check(
            &TypeKind::Timestamp,
            &[
                (
                    "2024-01-31 12:34:56.123456",
                    r#""2024-01-31T12:34:56.123456""#,
                ),
                ("2024-01-31 12:34:56", r#""2024-01-31T12:34:56""#),
                ("infinity", "null"),
                ("-infinity", "null"),
                ("0044-03-15 12:00:00 BC", r#""-0043-03-15T12:00:00""#),
                ("10000-01-01 00:00:00", r#""+10000-01-01T00:00:00""#),
                ("2024-01-31", r#""2024-01-31""#),
                ("2024-01-31 25:00:00", r#""2024-01-31 25:00:00""#),
                ("2024-01-31 12:34:56+00", r#""2024-01-31 12:34:56+00""#),
            ],
        );
    }

    #[test]
    fn timestamps_with_time_zone() {
        check(
            &TypeKind::TimestampTz,
            &[
                ("2024-01-31 12:34:56.5+00", r#""2024-01-31T12:34:56.5Z""#),
                ("2024-01-31 12:34:56+00", r#""2024-01-31T12:34:56Z""#),
                (
                    "2024-01-31 12:34:56+05:30",
                    r#""2024-01-31T12:34:56+05:30""#,
                ),
                ("2024-01-31 12:34:56-08", r#""2024-01-31T12:34:56-08:00""#),
                (
                    "2024-01-31 12:34:56.25+00:00:00",
                    r#""2024-01-31T12:34:56.25Z""#,
                ),
                // Local mean time offsets have seconds: shift to UTC.
                ("1900-01-01 00:00:00+00:19:32", r#""1899-12-31T23:40:28Z""#),
                ("2024-12-31 23:59:59-00:00:01", r#""2025-01-01T00:00:00Z""#),
                ("0044-03-15 12:00:00+00 BC", r#""-0043-03-15T12:00:00Z""#),
                ("10000-01-01 00:00:00+00", r#""+10000-01-01T00:00:00Z""#),
                ("infinity", "null"),
                ("-infinity", "null"),
                ("2024-01-31 12:34:56", r#""2024-01-31 12:34:56""#),
                ("2024-01-31 12:34:56+5", r#""2024-01-31 12:34:56+5""#),
            ],
        );
    }

    #[test]
    fn civil_days_round_trip() {
        for days in (-3_000_000..3_000_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(19_753), (2024, 1, 31));
    }

    #[test]
    fn arrays() {
        check(
            &array(TypeKind::Int32),
            &[
                ("{1,2,NULL}", "[1,2,null]"),
                ("{}", "[]"),
                ("{{1,2},{3,4}}", "[[1,2],[3,4]]"),
                ("[0:1]={1,2}", "[1,2]"),
                ("[1:2][-1:0]={{1,2},{3,4}}", "[[1,2],[3,4]]"),
                (" { 1 , 2 } ", "[1,2]"),
                ("{\"1\",nuLL}", "[1,null]"),
                ("{1,x}", r#"[1,"x"]"#),
                ("{1,2", r#""{1,2""#),
                ("{1,,2}", r#""{1,,2}""#),
                ("{1,}", r#""{1,}""#),
                ("{,1}", r#""{,1}""#),
                ("{1}}", r#""{1}}""#),
                ("{1} x", r#""{1} x""#),
                ("1,2", r#""1,2""#),
                ("[0:1{1}", r#""[0:1{1}""#),
                ("{{{{{{{{1}}}}}}}}", "[[[[[[[[1]]]]]]]]"),
            ],
        );
        check(
            &array(TypeKind::Text),
            &[
                (
                    r#"{"a b","with \"quote\"",NULL,"NULL"}"#,
                    r#"["a b","with \"quote\"",null,"NULL"]"#,
                ),
                (r#"{a\,b,c\\d,"e\\f",""}"#, r#"["a,b","c\\d","e\\f",""]"#),
                ("{ a b ,c\\ }", r#"["a b","c "]"#),
                ("{a\"b}", r#""{a\"b}""#),
                (r#"{"unterminated}"#, r#""{\"unterminated}""#),
                ("{\"a\"b}", r#""{\"a\"b}""#),
            ],
        );
        check(
            &array(TypeKind::Bytea),
            &[(r#"{"\\x666f6f",NULL}"#, r#"["Zm9v",null]"#)],
        );
        check(
            &array(TypeKind::TimestampTz),
            &[(
                r#"{"2024-01-31 12:34:56+00",infinity}"#,
                r#"["2024-01-31T12:34:56Z",null]"#,
            )],
        );
        check(
            &array(TypeKind::Json),
            &[(r#"{"{\"a\": 1}","[1, 2]"}"#, r#"[{"a": 1},[1, 2]]"#)],
        );
        check(
            &TypeKind::Array {
                elem: Box::new(TypeKind::Other),
                delim: b';',
            },
            &[(
                "{(1,1),(0,0);(2,2),(1,1)}",
                r#"["(1,1),(0,0)","(2,2),(1,1)"]"#,
            )],
        );
        // An array whose elements are themselves arrays (a domain over an
        // array type, say): each element is the array's own text.
        check(
            &array(array(TypeKind::Int64)),
            &[(r#"{"{1,2}","{}",NULL}"#, "[[1,2],[],null]")],
        );
    }

    #[test]
    fn builtin_oids() {
        assert_eq!(TypeKind::from_builtin_oid(16), Some(TypeKind::Bool));
        assert_eq!(TypeKind::from_builtin_oid(26), Some(TypeKind::Int64));
        assert_eq!(TypeKind::from_builtin_oid(1043), Some(TypeKind::Text));
        assert_eq!(TypeKind::from_builtin_oid(3802), Some(TypeKind::Json));
        assert_eq!(TypeKind::from_builtin_oid(774), Some(TypeKind::MacAddr));
        assert_eq!(
            TypeKind::from_builtin_oid(1184),
            Some(TypeKind::TimestampTz)
        );
        assert_eq!(
            TypeKind::from_builtin_oid(1007),
            Some(array(TypeKind::Int32))
        );
        assert_eq!(
            TypeKind::from_builtin_oid(1028),
            Some(array(TypeKind::Int64))
        );
        assert_eq!(
            TypeKind::from_builtin_oid(3807),
            Some(array(TypeKind::Json))
        );
        assert_eq!(
            TypeKind::from_builtin_oid(1002),
            Some(array(TypeKind::Text))
        );
        assert_eq!(
            TypeKind::from_builtin_oid(1185),
            Some(array(TypeKind::TimestampTz))
        );
        assert_eq!(TypeKind::from_builtin_oid(603), None); // box
        assert_eq!(TypeKind::from_builtin_oid(123_456), None);
        let scalars = [
            16, 21, 23, 20, 26, 700, 701, 1700, 790, 25, 1043, 1042, 19, 18, 2950, 114, 3802, 17,
            1082, 1083, 1266, 1114, 1184, 1186, 869, 650, 829, 774, 142,
        ];
        let arrays = [
            1000, 1005, 1007, 1016, 1009, 1015, 1014, 1021, 1022, 1231, 2951, 199, 3807, 1182,
            1115, 1185, 1183, 1270, 1187, 1001, 1041, 651, 1040, 791, 1028, 1003, 1002,
        ];
        for oid in scalars {
            let kind = TypeKind::from_builtin_oid(oid);
            assert!(
                kind.as_ref()
                    .is_some_and(|k| !matches!(k, TypeKind::Array { .. })),
                "{oid}: {kind:?}"
            );
        }
        for oid in arrays {
            let kind = TypeKind::from_builtin_oid(oid);
            assert!(
                matches!(kind, Some(TypeKind::Array { delim: b',', .. })),
                "{oid}: {kind:?}"
            );
        }
    }

    #[test]
    fn mappings() {
        let text = json!({
            "type": "text",
            "fields": { "keyword": { "type": "keyword", "ignore_above": 256 } }
        });
        let date = json!({ "type": "date", "format": "strict_date_optional_time||epoch_millis" });
        let cases = [
            (TypeKind::Bool, json!({"type": "boolean"})),
            (TypeKind::Int16, json!({"type": "short"})),
            (TypeKind::Int32, json!({"type": "integer"})),
            (TypeKind::Int64, json!({"type": "long"})),
            (TypeKind::Float32, json!({"type": "float"})),
            (TypeKind::Float64, json!({"type": "double"})),
            (TypeKind::Numeric, json!({"type": "double"})),
            (TypeKind::Money, json!({"type": "double"})),
            (TypeKind::Text, text.clone()),
            (TypeKind::Other, text.clone()),
            (TypeKind::Uuid, json!({"type": "keyword"})),
            (TypeKind::MacAddr, json!({"type": "keyword"})),
            (TypeKind::Time, json!({"type": "keyword"})),
            (TypeKind::TimeTz, json!({"type": "keyword"})),
            (TypeKind::Interval, json!({"type": "keyword"})),
            (TypeKind::Cidr, json!({"type": "keyword"})),
            (TypeKind::Inet, json!({"type": "keyword"})),
            (TypeKind::Json, json!({"type": "object", "enabled": false})),
            (TypeKind::Bytea, json!({"type": "binary"})),
            (TypeKind::Date, date.clone()),
            (TypeKind::Timestamp, date.clone()),
            (TypeKind::TimestampTz, date.clone()),
            (array(TypeKind::Int64), json!({"type": "long"})),
            (array(array(TypeKind::Text)), text),
        ];
        for (kind, want) in cases {
            assert_eq!(kind.mapping(), want, "{kind:?}");
        }
    }

    fn all_kinds() -> Vec<TypeKind> {
        let scalars = vec![
            TypeKind::Bool,
            TypeKind::Int16,
            TypeKind::Int32,
            TypeKind::Int64,
            TypeKind::Float32,
            TypeKind::Float64,
            TypeKind::Numeric,
            TypeKind::Money,
            TypeKind::Text,
            TypeKind::Uuid,
            TypeKind::Json,
            TypeKind::Bytea,
            TypeKind::Date,
            TypeKind::Time,
            TypeKind::TimeTz,
            TypeKind::Timestamp,
            TypeKind::TimestampTz,
            TypeKind::Interval,
            TypeKind::Inet,
            TypeKind::Cidr,
            TypeKind::MacAddr,
            TypeKind::Other,
        ];
        let mut kinds = scalars.clone();
        kinds.extend(scalars.into_iter().map(array));
        kinds.push(TypeKind::Array {
            elem: Box::new(TypeKind::Other),
            delim: b';',
        });
        kinds.push(array(array(TypeKind::Int32)));
        kinds
    }

    /// Inputs that are arbitrary bytes or near-misses of what PostgreSQL
    /// prints, so the parsers' edges get exercised too.
    fn value_text() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..40),
            "[-+0-9.eE,$€ ()NaInfity]{0,16}".prop_map(String::into_bytes),
            concat!(
                "[0-9]{1,6}-[0-9]{1,2}-[0-9]{1,2}",
                "( [0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{0,7})?([+-][0-9]{1,2}(:[0-9]{2}){0,2})?)?",
                "( BC)?"
            )
            .prop_map(String::into_bytes),
            "\\\\x[0-9a-fA-Fg]{0,12}".prop_map(String::into_bytes),
            "[\\[\\]0-9:=]{0,6}[{}\",\\\\; a-zA-Z0-9\n]{0,24}".prop_map(String::into_bytes),
            "[{}\\[\\]\":, \n\r\t0-9a-z.eE+\\\\-]{0,24}".prop_map(String::into_bytes),
        ]
    }

    /// Formats one array element the way `array_out` does.
    fn pg_element(s: &Option<String>, pad: bool) -> String {
        let Some(s) = s else {
            return "NULL".to_owned();
        };
        let needs_quotes = s.is_empty()
            || s.eq_ignore_ascii_case("NULL")
            || s.chars().any(|c| {
                matches!(c, '{' | '}' | ',' | '"' | '\\') || c.is_ascii_whitespace() || c == '\x0b'
            });
        let body = if needs_quotes {
            let mut q = String::from("\"");
            for c in s.chars() {
                if c == '"' || c == '\\' {
                    q.push('\\');
                }
                q.push(c);
            }
            q.push('"');
            q
        } else {
            s.clone()
        };
        if pad {
            format!(" {body} ")
        } else {
            body
        }
    }

    proptest! {
        #[test]
        fn every_kind_always_renders_valid_json(text in value_text()) {
            for kind in all_kinds() {
                let mut out = Vec::new();
                write_value(&kind, &text, &mut out);
                let parsed = serde_json::from_slice::<Value>(&out);
                prop_assert!(
                    parsed.is_ok(),
                    "{:?} of {:?} gave {:?}",
                    kind,
                    String::from_utf8_lossy(&text),
                    String::from_utf8_lossy(&out)
                );
                prop_assert!(!out.contains(&b'\n') && !out.contains(&b'\r'));
            }
        }

        #[test]
        fn text_arrays_round_trip(
            rows in proptest::collection::vec(
                proptest::collection::vec(proptest::option::of(".{0,8}"), 1..5),
                0..5,
            ),
            pad in any::<bool>(),
            one_dimensional in any::<bool>(),
        ) {
            let kind = array(TypeKind::Text);
            let (literal, want) = if one_dimensional {
                let flat: Vec<Option<String>> = rows.into_iter().flatten().collect();
                let parts: Vec<String> = flat.iter().map(|e| pg_element(e, pad)).collect();
                (format!("{{{}}}", parts.join(",")), json!(flat))
            } else {
                let parts: Vec<String> = rows
                    .iter()
                    .map(|row| {
                        let inner: Vec<String> = row.iter().map(|e| pg_element(e, pad)).collect();
                        format!("{{{}}}", inner.join(","))
                    })
                    .collect();
                (format!("{{{}}}", parts.join(",")), json!(rows))
            };
            let mut out = Vec::new();
            write_value(&kind, literal.as_bytes(), &mut out);
            let got: Value = serde_json::from_slice(&out).map_err(|e| {
                TestCaseError::fail(format!("{literal:?} gave invalid JSON: {e}"))
            })?;
            prop_assert_eq!(got, want, "literal {:?}", literal);
        }

        #[test]
        fn text_is_quoted_losslessly(s in any::<String>()) {
            let mut out = Vec::new();
            write_json_str(s.as_bytes(), &mut out);
            let got: String = serde_json::from_slice(&out)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(got, s);
        }

        #[test]
        fn bytea_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let mut text = b"\\x".to_vec();
            for b in &bytes {
                text.extend_from_slice(format!("{b:02x}").as_bytes());
            }
            let mut out = Vec::new();
            write_value(&TypeKind::Bytea, &text, &mut out);
            let b64: String = serde_json::from_slice(&out)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(decoded, bytes);
        }
    }
}
