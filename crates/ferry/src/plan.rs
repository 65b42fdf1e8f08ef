//! `ferry plan -c NEW.toml`: prints what applying a configuration will do.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

/// Prints one line per step; exit code 0 when nothing changes, 2 when
/// something does, 1 when the plan could not be made.
pub(crate) async fn plan(path: PathBuf) -> ExitCode {
    let cfg = match crate::load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut out = std::io::stdout().lock();
    match ferry_engine::configplan::plan(&cfg).await {
        Ok(steps) => {
            for step in &steps {
                let _ = writeln!(out, "{step}");
            }
            if steps.iter().any(|s| s.changes()) {
                let _ = writeln!(out, "plan: applying {} changes the above", path.display());
                ExitCode::from(2)
            } else {
                let _ = writeln!(out, "plan: applying {} changes nothing", path.display());
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            let _ = writeln!(out, "problem: {e}");
            ExitCode::FAILURE
        }
    }
}
