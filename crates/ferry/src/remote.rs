//! Commands acting on a running ferry through its control API
//! (`/control/…`, bearer token from `admin.token_file` / `admin.token_env`):
//! `ferry indexes`, `ferry pause`, `ferry resume`, and `ferry reindex` /
//! `ferry dead-letters list|retry` when a token is configured (unless
//! `--direct`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use ferry_config::Config;
use serde_json::Value;

/// Subcommands that only make sense against a running ferry.
#[derive(Debug, Subcommand)]
pub enum RemoteCommand {
    /// List the indexes of a running ferry with their state and counters (control API).
    Indexes {
        /// The configuration file (TOML): admin.listen and the token.
        #[arg(long, short, env = "FERRY_CONFIG")]
        config: PathBuf,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop writing an index; searches keep it as it is (control API).
    Pause {
        /// The configured index name (alias).
        name: String,
        /// The configuration file (TOML): admin.listen and the token.
        #[arg(long, short, env = "FERRY_CONFIG")]
        config: PathBuf,
    },
    /// Write a paused index again: it is rebuilt beside the paused one (control API).
    Resume {
        /// The configured index name (alias).
        name: String,
        /// The configuration file (TOML): admin.listen and the token.
        #[arg(long, short, env = "FERRY_CONFIG")]
        config: PathBuf,
    },
}

macro_rules! out {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// The control API of the ferry a configuration describes.
pub struct Remote {
    base: String,
    token: String,
}

impl Remote {
    /// The API at `admin.listen` with the configured token; `None` when
    /// no token is configured (the API is off).
    pub fn from_config(cfg: &Config) -> Result<Option<Remote>, ExitCode> {
        let token = match cfg.admin.token() {
            Ok(Some(t)) => t,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::error!("{e}");
                return Err(ExitCode::from(2));
            }
        };
        let base = ferry_admin::admin_url(&cfg.admin.listen).ok_or_else(|| {
            tracing::error!(
                "admin.listen: {:?} is not a socket address",
                cfg.admin.listen
            );
            ExitCode::from(2)
        })?;
        Ok(Some(Remote { base, token }))
    }

    /// Like [`Remote::from_config`], failing with the fix when the API is off.
    fn required(cfg: &Config) -> Result<Remote, ExitCode> {
        Remote::from_config(cfg)?.ok_or_else(|| {
            tracing::error!(
                "this command talks to a running ferry through its control API, which is off: \
                 set admin.token_file or admin.token_env (in ferry's configuration and this one) and restart ferry"
            );
            ExitCode::from(2)
        })
    }

    /// Sends `method path` and returns the JSON answer, or logs why not.
    pub async fn call(&self, method: &str, path: &str) -> Result<Value, ExitCode> {
        let url = format!("{}{path}", self.base.trim_end_matches('/'));
        let reply = match ferry_admin::call(method, &url, Some(&self.token)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(
                    "{e} (is ferry running with this admin.listen? --direct acts on the cluster without it where the command allows)"
                );
                return Err(ExitCode::FAILURE);
            }
        };
        let doc: Value = serde_json::from_str(&reply.body).unwrap_or(Value::Null);
        if reply.status != 200 {
            let why = doc["error"].as_str().unwrap_or(reply.body.trim());
            tracing::error!(status = reply.status, "{method} {url}: {why}");
            return Err(if reply.status == 404 || reply.status == 400 {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            });
        }
        Ok(doc)
    }
}

/// Path-segment encoding of an index name.
fn segment(name: &str) -> String {
    url::form_urlencoded::byte_serialize(name.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// `?index=NAME` or nothing.
fn index_query(index: Option<&str>, sep: char) -> String {
    index
        .map(|i| format!("{sep}index={}", segment(i)))
        .unwrap_or_default()
}

/// Runs `ferry indexes|pause|resume`.
pub async fn run(command: RemoteCommand) -> ExitCode {
    let result = match command {
        RemoteCommand::Indexes { config, json } => {
            with_remote(&config, |r| async move {
                let doc = r.call("GET", "/control/indexes").await?;
                if json {
                    out!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
                } else {
                    out!("{:<30} {:<12} {:>10} {:>10} {:>8} {:>8}", "INDEX", "STATE", "WRITTEN", "DELETED", "REJECTED", "DEAD");
                    for ix in doc["indexes"].as_array().into_iter().flatten() {
                        out!(
                            "{:<30} {:<12} {:>10} {:>10} {:>8} {:>8}",
                            ix["name"].as_str().unwrap_or("?"),
                            ix["state"].as_str().unwrap_or("?"),
                            ix["docs_written"],
                            ix["docs_deleted"],
                            ix["docs_rejected"],
                            ix["dead_letters"]
                        );
                    }
                }
                Ok(())
            })
            .await
        }
        RemoteCommand::Pause { name, config } => {
            with_remote(&config, |r| async move {
                let doc = r
                    .call("POST", &format!("/control/indexes/{}/pause", segment(&name)))
                    .await?;
                out!(
                    "paused {name}: searches keep using {} as it is; `ferry resume {name}` rebuilds it",
                    doc["serving"].as_str().unwrap_or("?")
                );
                Ok(())
            })
            .await
        }
        RemoteCommand::Resume { name, config } => {
            with_remote(&config, |r| async move {
                let doc = r
                    .call("POST", &format!("/control/indexes/{}/resume", segment(&name)))
                    .await?;
                out!(
                    "resumed {name}: it is rebuilt in the background; searches keep using {} until the new index is complete",
                    doc["serving"].as_str().unwrap_or("?")
                );
                Ok(())
            })
            .await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

async fn with_remote<F, Fut>(config: &std::path::Path, f: F) -> Result<(), ExitCode>
where
    F: FnOnce(Remote) -> Fut,
    Fut: std::future::Future<Output = Result<(), ExitCode>>,
{
    let cfg = crate::load(config)?;
    let remote = Remote::required(&cfg)?;
    f(remote).await
}

/// `ferry reindex NAME` through the control API: the running ferry marks
/// the index and restarts its pipeline, so the rebuild starts at once.
pub async fn reindex(remote: &Remote, name: &str) -> ExitCode {
    match remote
        .call(
            "POST",
            &format!("/control/indexes/{}/reindex", segment(name)),
        )
        .await
    {
        Ok(doc) => {
            out!(
                "rebuild of {name} started by the running ferry; searches keep using {} until the new index is complete, then the alias moves",
                doc["serving"].as_str().unwrap_or("?")
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// `ferry dead-letters list` through the control API (at most 10,000 entries shown).
pub async fn dead_letters_list(remote: &Remote, index: Option<&str>) -> ExitCode {
    let path = format!(
        "/control/dead-letters?limit={}{}",
        ferry_admin::control::MAX_LIST_LIMIT,
        index_query(index, '&')
    );
    match remote.call("GET", &path).await {
        Ok(doc) => {
            let entries = doc["entries"].as_array().cloned().unwrap_or_default();
            for l in &entries {
                out!(
                    "{}\t{}\t{}\t{}\t{}",
                    l["index"].as_str().unwrap_or(""),
                    l["id"].as_str().unwrap_or(""),
                    l["status"],
                    l["lsn"].as_str().unwrap_or(""),
                    l["reason"].as_str().unwrap_or("")
                );
            }
            let count = doc["count"].as_u64().unwrap_or(0);
            if count > entries.len() as u64 {
                out!("(first {} shown; --direct lists them all)", entries.len());
            }
            out!("{count} dead letter(s)");
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// `ferry dead-letters retry` through the control API.
pub async fn dead_letters_retry(remote: &Remote, index: Option<&str>) -> ExitCode {
    let path = format!("/control/dead-letters/retry{}", index_query(index, '?'));
    match remote.call("POST", &path).await {
        Ok(doc) => {
            out!(
                "healed {}, still failing {}",
                doc["healed"],
                doc["still_failing"]
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}
