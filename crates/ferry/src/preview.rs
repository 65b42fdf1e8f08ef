//! `ferry preview INDEX`: prints the documents ferry would write, exactly as
//! its `_bulk` request would carry them, without touching the cluster.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use ferry_engine::preview::{preview, Roots};

/// Runs `ferry preview`. Without `mapping` stdout is the bare `_bulk` body
/// (pipe it to `curl --data-binary @-`); with it, a console script that
/// creates the concrete index and then writes the documents, as the Dev
/// Tools consoles of OpenSearch Dashboards and Kibana accept.
pub async fn run(
    config: &Path,
    index: &str,
    ids: Vec<String>,
    limit: usize,
    mapping: bool,
) -> ExitCode {
    let cfg = match crate::load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let roots = if ids.is_empty() {
        Roots::First(limit)
    } else {
        Roots::Ids(ids)
    };
    let p = match preview(&cfg, index, roots).await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "preview failed");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    let written = if mapping {
        let body = serde_json::to_string_pretty(&p.index_body).unwrap_or_default();
        write!(out, "PUT /{}\n{body}\n\nPOST /_bulk\n", p.concrete)
            .and_then(|()| out.write_all(&p.bulk))
    } else {
        out.write_all(&p.bulk)
    };
    match written.and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`| head`) is not ferry's failure to report loudly.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "preview: writing to stdout failed");
            ExitCode::FAILURE
        }
    }
}
