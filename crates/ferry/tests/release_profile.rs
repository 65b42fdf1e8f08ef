//! The release binary (and so the container image) stays lean: the root
//! manifest's release profile builds no debug info and strips it. Checked on
//! the manifest, so CI needs no release build; set `FERRY_RELEASE_BINARY` to
//! a built binary to also check its size.

use std::path::Path;

/// The release binary measured 16.6 MB with its debug info stripped (the
/// symbol table kept, as `strip = "debuginfo"` does; 14.1 MB fully
/// stripped) against 87.2 MB with `debug = 1` (x86_64, 2026-12). The
/// bound leaves room to grow without letting debug info back in.
const MAX_RELEASE_BYTES: u64 = 30 * 1024 * 1024;

/// `key = value` lines of the `[name]` table in the root Cargo.toml.
fn profile(name: &str) -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let text = std::fs::read_to_string(&path).expect("root Cargo.toml");
    let header = format!("[{name}]");
    text.lines()
        .skip_while(|l| l.trim() != header)
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with('['))
        .filter_map(|l| {
            let l = l.split('#').next().unwrap_or_default();
            let (k, v) = l.split_once('=')?;
            Some((k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        })
        .collect()
}

fn value(table: &[(String, String)], key: &str) -> Option<String> {
    table.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

#[test]
fn release_profile_builds_no_debug_info_and_strips_it() {
    let release = profile("profile.release");
    assert!(!release.is_empty(), "no [profile.release] in Cargo.toml");
    let debug = value(&release, "debug");
    assert!(
        matches!(debug.as_deref(), Some("false" | "0" | "none")),
        "[profile.release] debug = {debug:?}: release binaries must carry no debug info \
         (use the release-debug profile for symbols)"
    );
    let strip = value(&release, "strip");
    assert!(
        matches!(strip.as_deref(), Some("debuginfo" | "symbols" | "true")),
        "[profile.release] strip = {strip:?}: set strip = \"debuginfo\" so the standard \
         library's debug info is dropped too"
    );
}

#[test]
fn a_profile_with_symbols_exists_for_debugging() {
    let p = profile("profile.release-debug");
    assert_eq!(value(&p, "inherits").as_deref(), Some("release"), "{p:?}");
    assert_eq!(value(&p, "debug").as_deref(), Some("1"), "{p:?}");
}

#[test]
fn a_built_release_binary_is_under_the_size_bound() {
    let Some(path) = std::env::var_os("FERRY_RELEASE_BINARY") else {
        eprintln!("FERRY_RELEASE_BINARY is unset: the binary size is not checked");
        return;
    };
    let len = std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("{path:?}: {e}"))
        .len();
    assert!(
        len <= MAX_RELEASE_BYTES,
        "{path:?} is {len} bytes, over {MAX_RELEASE_BYTES}: is debug info back in the release profile?"
    );
}
