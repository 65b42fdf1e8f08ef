//! The deployment and configuration docs name only things that exist:
//! every `FERRY_*` environment variable is a command-line option's variable
//! or a `FERRY_<SECTION>__<KEY>` override of a real key, every dotted key
//! (`source.sslmode`) is a real key, and every key in `config/*.toml`
//! (commented-out ones included) belongs to its section.
//!
//! The keys come from ferry-config itself: its tables refuse unknown fields,
//! and serde's refusal lists the fields a table accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The tables outside `[[index]]`, which environment variables can reach.
const SECTIONS: [&str; 5] = ["source", "sink", "sink.aws", "engine", "admin"];

/// Names the docs show on purpose as errors.
const DOCUMENTED_AS_INVALID: [&str; 1] = ["FERRY_INDEX__0__NAME"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The keys the `[section]` table accepts (`sink.aws` is `[sink.aws]`).
fn keys_of(section: &str) -> BTreeSet<String> {
    // A lone `[sink.aws]` would be a named sink called aws: give its sink a url.
    let sink = match section {
        "sink.aws" => "[sink]\nurl = \"http://127.0.0.1:9200\"\n",
        _ => "",
    };
    let text = format!("{sink}[{section}]\nzz_not_a_key = 1\n");
    let err = match ferry_config::Config::from_toml(&text) {
        Ok(_) => panic!("[{section}] accepted an unknown key"),
        Err(e) => e.to_string(),
    };
    let listed = err
        .split("expected one of ")
        .nth(1)
        .or_else(|| err.split("expected ").nth(1))
        .unwrap_or_else(|| panic!("no field list in {err:?}"));
    // "`a`, `b`, `c`" or "`a` or `b`": the quoted names.
    listed
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// Every key outside `[[index]]`, dotted (`sink.aws.region`), plus the
/// section names themselves.
fn known_keys() -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for section in SECTIONS {
        all.insert(section.to_string());
        for key in keys_of(section) {
            all.insert(format!("{section}.{key}"));
        }
    }
    all
}

/// The variables the command line reads (`env = "FERRY_…"` in its options).
fn cli_variables() -> BTreeSet<String> {
    let src = std::fs::read_to_string(root().join("crates/ferry/src/lib.rs")).expect("lib.rs");
    src.split("env = \"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_string)
        .collect()
}

/// The deployment and configuration docs: their path and text.
fn docs() -> Vec<(PathBuf, String)> {
    let mut files = vec![root().join("Dockerfile")];
    for dir in ["deploy", "config"] {
        let mut stack = vec![root().join(dir)];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).expect("read docs dir") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else if path
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| ["md", "toml", "yml", "yaml", "service"].contains(&e))
                {
                    files.push(path);
                }
            }
        }
    }
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read doc");
            (p, text)
        })
        .collect()
}

/// Runs of `[A-Za-z0-9_.]` in `text` that start with `prefix`.
fn words_starting<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let before_ok = rest[..at].chars().next_back().is_none_or(|c| !word(c));
        let tail = &rest[at..];
        let end = tail.find(|c: char| !word(c)).unwrap_or(tail.len());
        if before_ok {
            out.push(tail[..end].trim_end_matches('.'));
        }
        rest = &tail[end.max(1)..];
    }
    out
}

#[test]
fn every_ferry_variable_named_in_the_docs_exists() {
    let keys = known_keys();
    let cli = cli_variables();
    assert!(
        cli.contains("FERRY_CONFIG") && cli.contains("FERRY_LOG_FORMAT"),
        "{cli:?}"
    );
    let mut unknown = BTreeMap::new();
    for (path, text) in docs() {
        for name in words_starting(&text, "FERRY_") {
            let rest = &name["FERRY_".len()..];
            // `FERRY_<SECTION>__<KEY>` and a bare `FERRY_` are the pattern, not a name.
            if rest.is_empty() || DOCUMENTED_AS_INVALID.contains(&name) {
                continue;
            }
            let ok = if rest.contains("__") {
                keys.contains(&rest.replace("__", ".").to_ascii_lowercase())
            } else {
                cli.contains(name)
            };
            if !ok {
                unknown
                    .entry(name.to_string())
                    .or_insert_with(|| path.display().to_string());
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "environment variables named in the docs that ferry does not read: {unknown:#?}\nkeys: {keys:?}\ncommand line: {cli:?}"
    );
}

#[test]
fn every_dotted_config_key_named_in_the_docs_exists() {
    let keys = known_keys();
    // Named sinks: `NAME` and every `[sink.X]` table a document writes whose
    // X is no key of a sink stand for a sink's name.
    let mut sink_names: std::collections::BTreeSet<String> = ["NAME".to_string()].into();
    for (_, text) in docs() {
        for (at, _) in text.match_indices("[sink.") {
            let rest = &text[at + "[sink.".len()..];
            let Some(name) = rest.split_once(']').map(|(n, _)| n) else {
                continue;
            };
            if !keys.contains(&format!("sink.{name}")) {
                sink_names.insert(name.to_string());
            }
        }
    }
    let known = |name: &str| {
        keys.contains(name)
            || name.strip_prefix("sink.").is_some_and(|rest| {
                let (sink, key) = rest.split_once('.').unwrap_or((rest, ""));
                sink_names.contains(sink)
                    && (key.is_empty() || keys.contains(&format!("sink.{key}")))
            })
    };
    let mut unknown = BTreeMap::new();
    for (path, text) in docs() {
        for prefix in ["source.", "sink.", "engine.", "admin."] {
            for name in words_starting(&text, prefix) {
                if !known(name) {
                    unknown
                        .entry(name.to_string())
                        .or_insert_with(|| path.display().to_string());
                }
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "keys named in the docs that ferry-config does not know: {unknown:#?}\nknown: {keys:?}"
    );
}

#[test]
fn every_key_in_the_sample_configurations_belongs_to_its_section() {
    let keys = known_keys();
    let mut unknown = Vec::new();
    let mut checked = 0;
    for (path, text) in docs() {
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let mut section: Option<String> = None;
        for line in text.lines() {
            // Commented-out keys document the key too: check them alike.
            let line = line.trim_start_matches('#').trim();
            if let Some(header) = line.strip_prefix('[') {
                let name = header.trim_matches(|c| c == '[' || c == ']').trim();
                section = SECTIONS
                    .contains(&name)
                    .then(|| name.to_string())
                    .filter(|_| header.ends_with(']'));
                continue;
            }
            let Some(section) = &section else { continue };
            let Some((key, _)) = line.split_once('=') else {
                continue;
            };
            let key = key.trim();
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                continue; // prose, not a key
            }
            checked += 1;
            if !keys.contains(&format!("{section}.{key}")) {
                unknown.push(format!("{}: [{section}] {key}", path.display()));
            }
        }
    }
    assert!(checked > 20, "only {checked} keys found in config/*.toml");
    assert!(unknown.is_empty(), "unknown keys: {unknown:#?}");
}
