//! `ferry plan -c NEW.toml`: prints what applying a configuration will do.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

/// Prints one line per step; exit code 0 when nothing changes, 2 when
/// something does, 1 when the plan could not be made.
/// With named sinks, each sink's steps (or `--sink NAME`'s alone) are
/// prefixed with `sink NAME:`.
pub(crate) async fn plan(path: PathBuf, sink: Option<String>) -> ExitCode {
    let cfg = match crate::load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let names = match &sink {
        Some(n) => vec![n.clone()],
        None if cfg.sinks.named => cfg.sinks.names(),
        None => Vec::new(),
    };
    let mut views = Vec::new();
    if names.is_empty() {
        views.push((String::new(), cfg));
    } else {
        for n in names {
            match cfg.for_sink(Some(&n)) {
                Ok(one) => views.push((format!("sink {n}: "), one)),
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::from(2);
                }
            }
        }
    }
    let mut out = std::io::stdout().lock();
    let mut all = Vec::new();
    for (prefix, one) in &views {
        match ferry_engine::configplan::plan(one).await {
            Ok(steps) => {
                for step in &steps {
                    let _ = writeln!(out, "{prefix}{step}");
                }
                all.extend(steps);
            }
            Err(e) => {
                let _ = writeln!(out, "problem: {prefix}{e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if all.iter().any(|s| s.changes()) {
        let _ = writeln!(out, "plan: applying {} changes the above", path.display());
        ExitCode::from(2)
    } else {
        let _ = writeln!(out, "plan: applying {} changes nothing", path.display());
        ExitCode::SUCCESS
    }
}
