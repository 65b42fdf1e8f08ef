//! End-to-end: every common PostgreSQL type, edge values included, through
//! both paths ferry reads rows on — the backfill (`COPY` text) and the
//! replication stream (pgoutput text) — into OpenSearch documents.
//!
//! Each value is checked against the JSON stated here, each streamed
//! document against its backfilled twin (byte for byte), and each column's
//! index mapping against the type stated here. `docs/types.md` describes the
//! same table for users.
//!
//! Edge values that once made the index refuse a document (inet with a
//! netmask, numeric beyond a double, int2vector) have their own tests below.
//! `json` with duplicate keys, which OpenSearch refuses, keeps the last key
//! like `jsonb`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_e2e::{FerryProcess, TestEnv};
use ferry_opensearch::Method;
use serde_json::Value;

/// One column of table `typed`: its SQL type, the OpenSearch field type
/// its mapping must have, and the values it takes (SQL literal, expected
/// JSON text), one per row.
struct Column {
    name: &'static str,
    sql_type: &'static str,
    mapping: &'static str,
    cases: Vec<(String, String)>,
}

fn col(
    name: &'static str,
    sql_type: &'static str,
    mapping: &'static str,
    cases: &[(&str, &str)],
) -> Column {
    Column {
        name,
        sql_type,
        mapping,
        cases: cases
            .iter()
            .map(|(lit, json)| ((*lit).to_owned(), (*json).to_owned()))
            .collect(),
    }
}

const TYPES: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'it''s "complicated"');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TYPE pair AS (x integer, label text);
"#;

/// The table, value by value. Row `r` (id `r + 1`) takes each column's
/// `r`-th case, or NULL when the column has fewer cases.
fn columns() -> Vec<Column> {
    // numeric 1e300: 301 digits, still inside a double's range.
    let e300 = format!("1{}", "0".repeat(300));
    let mut numeric = col(
        "num",
        "numeric",
        "double",
        &[
            // 30 significant digits, every one kept in the document.
            (
                "12345678901234567890.1234567890",
                "12345678901234567890.1234567890",
            ),
            ("-0.000100", "-0.000100"),
            ("0", "0"),
            ("'NaN'", "null"),
            ("'Infinity'", "null"),
            ("'-Infinity'", "null"),
        ],
    );
    numeric.cases.push(("1e300".into(), e300));
    vec![
        col(
            "i2",
            "smallint",
            "short",
            &[("-32768", "-32768"), ("32767", "32767"), ("0", "0")],
        ),
        col(
            "i4",
            "integer",
            "integer",
            &[("-2147483648", "-2147483648"), ("2147483647", "2147483647")],
        ),
        col(
            "i8",
            "bigint",
            "long",
            &[
                ("-9223372036854775808", "-9223372036854775808"),
                ("9223372036854775807", "9223372036854775807"),
            ],
        ),
        numeric,
        col(
            "n2",
            "numeric(12,2)",
            "double",
            &[("0.1", "0.10"), ("-1234567890.5", "-1234567890.50")],
        ),
        col(
            "f4",
            "real",
            "float",
            &[
                ("1.5", "1.5"),
                ("0.1", "0.1"),
                ("3.4028235e38", "3.4028235e+38"),
                ("1e-45", "1e-45"),
                ("'-0'", "-0"),
                ("'NaN'", "null"),
                ("'Infinity'", "null"),
                ("'-Infinity'", "null"),
            ],
        ),
        col(
            "f8",
            "double precision",
            "double",
            &[
                ("0.1", "0.1"),
                ("1.7976931348623157e308", "1.7976931348623157e+308"),
                ("5e-324", "5e-324"),
                ("-123.456", "-123.456"),
                ("1e22", "1e+22"),
                ("'NaN'", "null"),
                ("'Infinity'", "null"),
                ("'-Infinity'", "null"),
            ],
        ),
        col(
            "cash",
            "money",
            "double",
            &[
                ("1234.56", "1234.56"),
                ("0.5", "0.50"),
                ("-92233720368547758.08", "-92233720368547758.08"),
                ("92233720368547758.07", "92233720368547758.07"),
            ],
        ),
        col(
            "txt",
            "text",
            "text",
            &[
                ("'plain'", r#""plain""#),
                ("'ünïcødé ✓ 日本語 🚀 👩‍👩‍👧'", r#""ünïcødé ✓ 日本語 🚀 👩‍👩‍👧""#),
                (
                    r#"E'tab\there "quoted" back\\slash\nnext line\r\x01'"#,
                    r#""tab\there \"quoted\" back\\slash\nnext line\r\u0001""#,
                ),
                ("''", r#""""#),
                ("'NULL'", r#""NULL""#),
                ("'{\"not\": \"json\"}'", r#""{\"not\": \"json\"}""#),
            ],
        ),
        col(
            "ch",
            "char(5)",
            "text",
            &[
                ("'ab'", r#""ab   ""#),
                ("'abcde'", r#""abcde""#),
                ("'ü'", r#""ü    ""#),
            ],
        ),
        col(
            "vc",
            "varchar(20)",
            "text",
            &[("'hello'", r#""hello""#), ("''", r#""""#)],
        ),
        col(
            "b",
            "boolean",
            "boolean",
            &[("true", "true"), ("false", "false")],
        ),
        col(
            "d",
            "date",
            "date",
            &[
                ("'2024-02-29'", r#""2024-02-29""#),
                ("'infinity'", "null"),
                ("'-infinity'", "null"),
                // Astronomical years: 44 BC is -0043, 1 BC is 0000.
                ("'0044-03-15 BC'", r#""-0043-03-15""#),
                ("'0001-12-31 BC'", r#""0000-12-31""#),
                ("'4714-11-24 BC'", r#""-4713-11-24""#),
                ("'5874897-12-31'", r#""+5874897-12-31""#),
                ("'0001-01-01'", r#""0001-01-01""#),
            ],
        ),
        col(
            "tm",
            "time",
            "keyword",
            &[
                ("'00:00:00'", r#""00:00:00""#),
                ("'23:59:59.999999'", r#""23:59:59.999999""#),
                ("'24:00:00'", r#""24:00:00""#),
                ("'12:34:56.5'", r#""12:34:56.5""#),
            ],
        ),
        col(
            "ttz",
            "timetz",
            "keyword",
            &[
                ("'12:34:56.789+05:30'", r#""12:34:56.789+05:30""#),
                ("'00:00:00-15:59'", r#""00:00:00-15:59""#),
                ("'23:59:59+00'", r#""23:59:59+00""#),
            ],
        ),
        col(
            "ts",
            "timestamp",
            "date",
            &[
                (
                    "'2024-01-31 12:34:56.123456'",
                    r#""2024-01-31T12:34:56.123456""#,
                ),
                ("'infinity'", "null"),
                ("'-infinity'", "null"),
                ("'0044-03-15 12:00:00 BC'", r#""-0043-03-15T12:00:00""#),
                (
                    "'294276-12-31 23:59:59.999999'",
                    r#""+294276-12-31T23:59:59.999999""#,
                ),
                ("'1970-01-01 00:00:00'", r#""1970-01-01T00:00:00""#),
                ("'4714-11-24 00:00:00 BC'", r#""-4713-11-24T00:00:00""#),
            ],
        ),
        col(
            "tstz",
            "timestamptz",
            "date",
            &[
                // Sessions run in UTC: the offset is applied, `Z` written.
                (
                    "'2024-01-31 12:34:56.5+05:30'",
                    r#""2024-01-31T07:04:56.5Z""#,
                ),
                ("'infinity'", "null"),
                ("'-infinity'", "null"),
                ("'0044-03-15 12:00:00+00 BC'", r#""-0043-03-15T12:00:00Z""#),
                (
                    "'294276-12-31 23:59:59.999999+00'",
                    r#""+294276-12-31T23:59:59.999999Z""#,
                ),
                ("'1900-01-01 00:00:00+00'", r#""1900-01-01T00:00:00Z""#),
                (
                    "'2024-06-30 23:59:59.000001-07'",
                    r#""2024-07-01T06:59:59.000001Z""#,
                ),
            ],
        ),
        col(
            "iv",
            "interval",
            "keyword",
            &[
                (
                    "'1 year 2 months 3 days 04:05:06.789'",
                    r#""1 year 2 mons 3 days 04:05:06.789""#,
                ),
                ("'-1 day'", r#""-1 days""#),
                ("'0'", r#""00:00:00""#),
                ("'-178000000 years'", r#""-178000000 years""#),
                ("'1 day -00:00:01'", r#""1 day -00:00:01""#),
            ],
        ),
        col(
            "u",
            "uuid",
            "keyword",
            &[
                (
                    "'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'",
                    r#""a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11""#,
                ),
                (
                    "'00000000-0000-0000-0000-000000000000'",
                    r#""00000000-0000-0000-0000-000000000000""#,
                ),
            ],
        ),
        col(
            "js",
            "json",
            "object",
            &[
                // `json` keeps its input text: key order, spacing, 2.50.
                (
                    r#"'{"b": 1,  "a": [1, 2.50, null]}'"#,
                    r#"{"b": 1,  "a": [1, 2.50, null]}"#,
                ),
                (
                    r#"'[1, "two", {"three": 3}]'"#,
                    r#"[1, "two", {"three": 3}]"#,
                ),
                (r#"'"scalar string"'"#, r#""scalar string""#),
                ("'42'", "42"),
                (r#"E'{"multi":\n  "line"}'"#, r#"{"multi":   "line"}"#),
                // A JSON null is indistinguishable from SQL NULL.
                ("'null'", "null"),
            ],
        ),
        col(
            "jb",
            "jsonb",
            "object",
            &[
                // `jsonb` normalises: keys sorted, one space after `:`/`,`.
                (
                    r#"'{"b": 1, "a": [1, 2.50, null], "nested": {"x": true}}'"#,
                    r#"{"a": [1, 2.50, null], "b": 1, "nested": {"x": true}}"#,
                ),
                (r#"'[1, "two"]'"#, r#"[1, "two"]"#),
                (r#"'"scalar"'"#, r#""scalar""#),
                ("'3.14159'", "3.14159"),
                (
                    "'12345678901234567890123456789012345'",
                    "12345678901234567890123456789012345",
                ),
                ("'{}'", "{}"),
            ],
        ),
        col(
            "ia",
            "integer[]",
            "integer",
            &[
                ("'{{1,2,NULL},{4,NULL,6}}'", "[[1,2,null],[4,null,6]]"),
                ("'{}'", "[]"),
                ("'[0:1]={7,8}'", "[7,8]"),
                ("'{NULL}'", "[null]"),
            ],
        ),
        col(
            "ta",
            "text[]",
            "text",
            &[
                (
                    r#"ARRAY['with "quotes"', 'a,b', NULL, 'NULL', '', 'ünï 🚀', E'back\\slash', ' spaced ', '{braces}']"#,
                    r#"["with \"quotes\"","a,b",null,"NULL","","ünï 🚀","back\\slash"," spaced ","{braces}"]"#,
                ),
                ("'{{a,b},{c,d}}'", r#"[["a","b"],["c","d"]]"#),
            ],
        ),
        col(
            "e",
            "mood",
            "text",
            &[
                ("'sad'", r#""sad""#),
                (r#"'it''s "complicated"'"#, r#""it's \"complicated\"""#),
            ],
        ),
        col(
            "ea",
            "mood[]",
            "text",
            &[(
                r#"ARRAY['happy', NULL, 'it''s "complicated"']::mood[]"#,
                r#"["happy",null,"it's \"complicated\""]"#,
            )],
        ),
        col(
            "dom",
            "posint",
            "integer",
            &[("1", "1"), ("2147483647", "2147483647")],
        ),
        col(
            "comp",
            "pair",
            "text",
            &[
                (
                    r#"ROW(1, 'a "quoted", label')::pair"#,
                    r#""(1,\"a \"\"quoted\"\", label\")""#,
                ),
                ("ROW(NULL, NULL)::pair", r#""(,)""#),
            ],
        ),
        col(
            "by",
            "bytea",
            "binary",
            &[
                (r"'\x00ff10'", r#""AP8Q""#),
                (r"'\x'", r#""""#),
                ("'hello'::bytea", r#""aGVsbG8=""#),
            ],
        ),
        col(
            "ip",
            "inet",
            "keyword",
            &[
                ("'192.168.0.1'", r#""192.168.0.1""#),
                ("'::1'", r#""::1""#),
                ("'2001:db8::ff00:42:8329'", r#""2001:db8::ff00:42:8329""#),
                ("'::ffff:10.0.0.1'", r#""::ffff:10.0.0.1""#),
                // A /32 host prints without its prefix length.
                ("'10.1.2.3/32'", r#""10.1.2.3""#),
            ],
        ),
        col(
            "cd",
            "cidr",
            "keyword",
            &[
                ("'10.0.0.0/8'", r#""10.0.0.0/8""#),
                ("'2001:db8::/32'", r#""2001:db8::/32""#),
            ],
        ),
        col(
            "mac",
            "macaddr",
            "keyword",
            &[("'08-00-2B-01-02-03'", r#""08:00:2b:01:02:03""#)],
        ),
        col(
            "mac8",
            "macaddr8",
            "keyword",
            &[("'08:00:2b:01:02:03:04:05'", r#""08:00:2b:01:02:03:04:05""#)],
        ),
        col(
            "r4",
            "int4range",
            "text",
            &[
                ("'[1,10)'", r#""[1,10)""#),
                ("'empty'", r#""empty""#),
                ("'(,5]'", r#""(,6)""#),
            ],
        ),
        col(
            "rtz",
            "tstzrange",
            "text",
            &[
                (
                    "'[2024-01-01 00:00:00+00,2024-02-01 00:00:00+00)'",
                    r#""[\"2024-01-01 00:00:00+00\",\"2024-02-01 00:00:00+00\")""#,
                ),
                ("'(,)'", r#""(,)""#),
            ],
        ),
        col(
            "tv",
            "tsvector",
            "text",
            &[
                ("'the fat cat sat'", r#""'cat' 'fat' 'sat' 'the'""#),
                (r#"$$'it''s' a:1A b:2$$"#, r#""'a':1A 'b':2 'it''s'""#),
            ],
        ),
        col("pt", "point", "text", &[("'(1.5,-2)'", r#""(1.5,-2)""#)]),
        col(
            "bx",
            "box",
            "text",
            &[("'(0,0),(1,1)'", r#""(1,1),(0,0)""#)],
        ),
        col(
            "bxa",
            "box[]",
            "text",
            &[(
                "'{(0,0),(1,1);(2,2),(3,3)}'",
                r#"["(1,1),(0,0)","(3,3),(2,2)"]"#,
            )],
        ),
        col("ln", "line", "text", &[("'{1,-1,0}'", r#""{1,-1,0}""#)]),
        col(
            "ci",
            "circle",
            "text",
            &[("'<(0,0),1.5>'", r#""<(0,0),1.5>""#)],
        ),
        col(
            "x",
            "xml",
            "text",
            &[(
                r#"'<a href="x">t &amp; ü</a>'"#,
                r#""<a href=\"x\">t &amp; ü</a>""#,
            )],
        ),
        col("bits", "varbit", "text", &[("B'1011'", r#""1011""#)]),
        col(
            "lsn",
            "pg_lsn",
            "text",
            &[("'16/B374D848'", r#""16/B374D848""#)],
        ),
        col(
            "tsa",
            "timestamptz[]",
            "date",
            &[(
                r#"'{"2024-01-31 12:34:56+00",infinity,NULL}'"#,
                r#"["2024-01-31T12:34:56Z",null,null]"#,
            )],
        ),
        col(
            "numa",
            "numeric[]",
            "double",
            &[("'{1.50,NaN,NULL,-Infinity}'", "[1.50,null,null,null]")],
        ),
        col(
            "bya",
            "bytea[]",
            "binary",
            &[(r#"ARRAY['\x666f6f'::bytea, NULL]"#, r#"["Zm9v",null]"#)],
        ),
    ]
}

/// Rows with values: ids `offset + 1 ..= offset + rows`, then one row of
/// NULLs only (id `offset + rows + 1`).
fn insert_sql(cols: &[Column], offset: usize) -> String {
    let rows = row_count(cols);
    let names: Vec<&str> = cols.iter().map(|c| c.name).collect();
    let mut values = Vec::new();
    for r in 0..=rows {
        let mut v = vec![(offset + r + 1).to_string()];
        for c in cols {
            v.push(
                c.cases
                    .get(r)
                    .map_or_else(|| "NULL".to_owned(), |(lit, _)| lit.clone()),
            );
        }
        values.push(format!("({})", v.join(", ")));
    }
    format!(
        "INSERT INTO typed (id, {}) VALUES\n{}",
        names.join(", "),
        values.join(",\n")
    )
}

/// Rows that carry values (the all-NULL row comes after them).
fn row_count(cols: &[Column]) -> usize {
    cols.iter().map(|c| c.cases.len()).max().unwrap_or(0)
}

/// The document row `r` of a batch must be, column by column (`id` aside).
fn expected_doc(cols: &[Column], r: usize) -> BTreeMap<&'static str, (String, Value)> {
    cols.iter()
        .map(|c| {
            let (lit, text) = c
                .cases
                .get(r)
                .cloned()
                .unwrap_or_else(|| ("NULL".to_owned(), "null".to_owned()));
            let want: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("expected JSON for {} {lit}: {e}: {text}", c.name));
            (c.name, (lit, want))
        })
        .collect()
}

/// Waits until the index holds `n` documents; panics with ferry's log if
/// ferry exits first (a poison document stops it) or time runs out.
async fn wait_for_count(
    env: &TestEnv,
    ferry: &mut FerryProcess,
    index: &str,
    n: u64,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let have = env.count(index).await;
        if have == n {
            return;
        }
        if !ferry.is_running() {
            panic!(
                "ferry exited with {have} of {n} documents in {index}\n--- ferry log ---\n{}",
                env.log_tail()
            );
        }
        if Instant::now() > deadline {
            panic!(
                "{index} has {have} of {n} documents after {within:?}\n--- ferry log ---\n{}",
                env.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A document's `_source` exactly as stored (`GET /<index>/_source/<id>`);
/// `None` when the endpoint is not `http://`.
async fn raw_source(base_url: &str, index: &str, id: usize) -> Option<String> {
    let base = base_url.trim_end_matches('/');
    if !base.starts_with("http://") {
        return None;
    }
    let response = reqwest::get(format!("{base}/{index}/_source/{id}"))
        .await
        .expect("GET a document's _source");
    let status = response.status();
    let body = response.text().await.expect("read response");
    assert_eq!(status.as_u16(), 200, "GET /{index}/_source/{id}: {body}");
    Some(body)
}

/// The field mappings of the concrete index behind `alias`.
async fn mapping_properties(env: &TestEnv, alias: &str) -> serde_json::Map<String, Value> {
    let res = env
        .sink
        .json_request(Method::Get, &format!("/{alias}/_mapping"), None)
        .await
        .expect("GET _mapping");
    let by_index = res.as_object().expect("mapping response is an object");
    assert_eq!(
        by_index.len(),
        1,
        "the alias points at one concrete index: {res}"
    );
    let (concrete, body) = by_index.iter().next().expect("one index");
    assert_ne!(
        concrete, alias,
        "the name users query is an alias over a concrete index"
    );
    body["mappings"]["properties"]
        .as_object()
        .cloned()
        .expect("mapping properties")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_common_type_round_trips_through_backfill_and_stream() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    let cols = columns();
    let defs: Vec<String> = cols
        .iter()
        .map(|c| format!("{} {}", c.name, c.sql_type))
        .collect();
    db.batch_execute(&format!(
        "{TYPES}\nCREATE TABLE typed (id integer PRIMARY KEY, {});",
        defs.join(", ")
    ))
    .await
    .expect("schema");

    // Batch 1 exists before ferry starts: it arrives by the backfill (COPY).
    let rows = row_count(&cols);
    let batch = rows as u64 + 1;
    const STREAM_OFFSET: usize = 1000;
    db.batch_execute(&insert_sql(&cols, 0))
        .await
        .expect("backfill rows");
    let cfg = env.config("typed", "typed", "");
    let mut ferry = env.run_ferry(&cfg);
    wait_for_count(&env, &mut ferry, "typed", batch, Duration::from_secs(90)).await;

    // Batch 2, the same values under other ids, arrives by the stream.
    db.batch_execute(&insert_sql(&cols, STREAM_OFFSET))
        .await
        .expect("streamed rows");
    wait_for_count(
        &env,
        &mut ferry,
        "typed",
        2 * batch,
        Duration::from_secs(90),
    )
    .await;

    let docs = env.documents("typed").await;
    let alias = env.index("typed");
    let raw = |id: usize| raw_source(env.os.url(), &alias, id);
    let mut problems = Vec::new();
    for r in 0..=rows {
        let backfilled = r + 1;
        let streamed = STREAM_OFFSET + r + 1;
        let want = expected_doc(&cols, r);
        for (id, path) in [(backfilled, "backfill"), (streamed, "stream")] {
            let Some(doc) = docs.get(&id.to_string()) else {
                problems.push(format!("{path}: document {id} is missing"));
                continue;
            };
            let obj = doc.as_object().expect("document is an object");
            if obj.get("id") != Some(&Value::from(id)) {
                problems.push(format!("{path}: document {id} has id {:?}", obj.get("id")));
            }
            if obj.len() != cols.len() + 1 {
                problems.push(format!(
                    "{path}: document {id} has {} fields, want {}: {doc}",
                    obj.len(),
                    cols.len() + 1
                ));
            }
            for (name, (lit, value)) in &want {
                let got = obj.get(*name).unwrap_or(&Value::Null);
                if got != value {
                    problems.push(format!(
                        "{path}: {name} = {lit} rendered {got}, want {value} (document {id})"
                    ));
                }
            }
        }
        // The streamed document is its backfilled twin, field by field ...
        if let (Some(a), Some(b)) = (
            docs.get(&backfilled.to_string()),
            docs.get(&streamed.to_string()),
        ) {
            for c in &cols {
                if a.get(c.name) != b.get(c.name) {
                    problems.push(format!(
                        "{}: backfill rendered {:?} but stream {:?} (row {r})",
                        c.name,
                        a.get(c.name),
                        b.get(c.name)
                    ));
                }
            }
        }
        // ... and byte for byte: the same JSON text after the id.
        if let (Some(a), Some(b)) = (raw(backfilled).await, raw(streamed).await) {
            let after_id = |s: &str| s.split_once(',').map(|(_, rest)| rest.to_owned());
            if after_id(&a) != after_id(&b) {
                problems.push(format!(
                    "row {r}: backfill and stream sources differ:\n  {a}\n  {b}"
                ));
            }
            // Numbers keep every digit PostgreSQL printed.
            for c in &cols {
                let Some((lit, text)) = c.cases.get(r) else {
                    continue;
                };
                let is_number = text.starts_with(|ch: char| ch == '-' || ch.is_ascii_digit());
                if !is_number {
                    continue;
                }
                let field = format!("\"{}\":{text}", c.name);
                let whole = [",", "}"]
                    .iter()
                    .any(|end| a.contains(&format!("{field}{end}")));
                if !whole {
                    problems.push(format!(
                        "{}: {lit} is not written as {text} in the source: {a}",
                        c.name
                    ));
                }
            }
        }
    }

    // The index mapping: one field per column, typed as stated.
    let props = mapping_properties(&env, &alias).await;
    if props.get("id").map(|m| &m["type"]) != Some(&Value::from("integer")) {
        problems.push(format!("id maps as {:?}", props.get("id")));
    }
    for c in &cols {
        let Some(m) = props.get(c.name) else {
            problems.push(format!("{} ({}) has no mapping", c.name, c.sql_type));
            continue;
        };
        let ty = m["type"].as_str().unwrap_or("object");
        if ty != c.mapping {
            problems.push(format!(
                "{} ({}) maps as {m}, want type {}",
                c.name, c.sql_type, c.mapping
            ));
        }
        match c.mapping {
            "text" if m["fields"]["keyword"]["type"] != "keyword" => problems.push(format!(
                "{} ({}) has no keyword sub-field: {m}",
                c.name, c.sql_type
            )),
            "object" if m["enabled"] != Value::Bool(false) => problems.push(format!(
                "{} ({}) is not a disabled object: {m}",
                c.name, c.sql_type
            )),
            _ => {}
        }
    }
    if props.len() != cols.len() + 1 {
        problems.push(format!(
            "the mapping has {} fields, want {}",
            props.len(),
            cols.len() + 1
        ));
    }

    assert!(
        problems.is_empty(),
        "{} problems:\n{}\n--- ferry log ---\n{}",
        problems.len(),
        problems.join("\n"),
        env.log_tail()
    );
    assert!(ferry.is_running(), "ferry still runs\n{}", env.log_tail());
    assert_eq!(ferry.stop(), Some(0), "clean stop\n{}", env.log_tail());
}

/// Puts one `sql_type` value into a fresh table twice, once before ferry
/// starts (backfill) and once while it streams, and checks that both
/// documents are indexed with `want` as their `v` — or, for `want: None`,
/// with any value. Panics with ferry's log when ferry stops instead.
async fn lone_value_is_indexed(sql_type: &str, literal: &str, want: Value) {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(&format!(
        "CREATE TABLE lone (id integer PRIMARY KEY, v {sql_type});
         INSERT INTO lone VALUES (1, {literal});"
    ))
    .await
    .expect("schema");
    let cfg = env.config("lone", "lone", "");
    let mut ferry = env.run_ferry(&cfg);
    wait_for_count(&env, &mut ferry, "lone", 1, Duration::from_secs(60)).await;
    db.batch_execute(&format!("INSERT INTO lone VALUES (2, {literal})"))
        .await
        .expect("streamed row");
    wait_for_count(&env, &mut ferry, "lone", 2, Duration::from_secs(60)).await;
    let docs = env.documents("lone").await;
    for id in ["1", "2"] {
        assert_eq!(docs[id]["v"], want, "{sql_type} {literal} (document {id})");
    }
    assert_eq!(ferry.stop(), Some(0), "clean stop\n{}", env.log_tail());
}

/// An address with a prefix length prints as `10.1.2.3/24`, which an `ip`
/// field would refuse: `inet` maps as `keyword`, so every value is indexed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inet_with_prefix_length_is_indexed() {
    lone_value_is_indexed("inet", "'10.1.2.3/24'", Value::from("10.1.2.3/24")).await;
}

/// A `numeric` beyond a double's range (about 1.8e308) cannot live in a
/// `double` field: it is written as null, like NaN and Infinity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_beyond_double_range_is_indexed() {
    lone_value_is_indexed("numeric", "'1e400'", Value::Null).await;
}

/// `json` keeps duplicate keys (`{"a": 1, "a": 2}`), which OpenSearch
/// refuses anywhere in a source: ferry keeps the last one, as `jsonb` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_with_duplicate_keys_keeps_the_last_key_like_jsonb() {
    lone_value_is_indexed(
        "json",
        r#"'{"a": 1, "b": {"c": 1, "c": [2]}, "a": 2}'"#,
        serde_json::json!({"a": 2, "b": {"c": [2]}}),
    )
    .await;
}

/// `int2vector` and `oidvector` are catalogued as arrays but print
/// space-separated (`1 2 3`): they are kept as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn int2vector_is_indexed() {
    lone_value_is_indexed("int2vector", "'1 2 3'", Value::from("1 2 3")).await;
}

/// A key whose text PostgreSQL prints differently from its cast to `text`
/// (`char(n)` keeps its padding, `boolean` prints `t`): the backfill and
/// the stream must give its document the same id, flat and built by query,
/// or one row becomes two documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn padded_and_boolean_keys_give_one_document_from_backfill_and_stream() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE codes (id char(4) PRIMARY KEY, v text);
         CREATE TABLE code_notes (nid int PRIMARY KEY, code char(4), n text, flag boolean, tag char(4), addr inet);
         CREATE TABLE flags (id boolean PRIMARY KEY, v text);
         INSERT INTO codes VALUES ('ab', 'backfilled');
         INSERT INTO flags VALUES (true, 'backfilled');",
    )
    .await
    .expect("schema");
    // `documents()` sorts by id: char(n) maps as text, which cannot sort.
    let keyword = "mapping = { id = { type = \"keyword\" } }\n";
    let extra = format!(
        "{keyword}\n[[index]]\nname = \"{}\"\ntable = \"codes\"\n{keyword}\
         [[index.has_many]]\nfield = \"notes\"\ntable = \"code_notes\"\nforeign_key = \"code\"\n\n\
         [[index]]\nname = \"{}\"\ntable = \"flags\"\n",
        env.index("codes_rel"),
        env.index("flags"),
    );
    let cfg = env.config("codes", "codes", &extra);
    let mut ferry = env.run_ferry(&cfg);
    for index in ["codes", "codes_rel", "flags"] {
        wait_for_count(&env, &mut ferry, index, 1, Duration::from_secs(60)).await;
    }
    db.batch_execute(
        "UPDATE codes SET v = 'streamed' WHERE id = 'ab';
         INSERT INTO code_notes VALUES (1, 'ab', 'note', true, 'x', '10.0.0.1');
         UPDATE flags SET v = 'streamed';",
    )
    .await
    .expect("streamed changes");
    for index in ["codes", "codes_rel", "flags"] {
        ferry_e2e::wait_for(
            &format!("{index}: the streamed change on the backfilled document"),
            Duration::from_secs(60),
            async || {
                env.documents(index)
                    .await
                    .values()
                    .any(|d| d["v"] == "streamed")
            },
        )
        .await;
        let docs = env.documents(index).await;
        assert_eq!(docs.len(), 1, "{index}: one row, one document: {docs:?}");
    }
    // Related rows render each value as the root and the stream do (their
    // text output), not as a cast to text would.
    let doc = env.documents("codes_rel").await;
    let note = &doc.values().next().expect("a document")["notes"][0];
    assert_eq!(note["n"], "note");
    assert_eq!(note["flag"], Value::Bool(true), "{note}");
    assert_eq!(note["tag"], "x   ", "{note}");
    assert_eq!(note["addr"], "10.0.0.1", "{note}");
    assert_eq!(ferry.stop(), Some(0), "clean stop\n{}", env.log_tail());
}
