//! The `ferry` command line: `run`, `check`, `status`, `demo`.
//!
//! This is the only crate that names concrete backends; it wires the
//! config, the PostgreSQL source and the OpenSearch sink into the engine.

mod control;
mod demo;
mod ops;
mod plan;
mod preview;
mod remote;
mod schema;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use ferry_config::Config;
use tokio::sync::watch;

/// Keeps OpenSearch indexes in sync with PostgreSQL through logical replication.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, long_about = None)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "FERRY_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// `reindex` and `dead-letters`: act on the database and the cluster
    /// directly, not through the running ferry's control API (the default
    /// when admin.token_file / admin.token_env is set).
    #[arg(long, global = true)]
    pub direct: bool,
    /// `plan`, `verify`, `reindex` and `dead-letters`: the named sink
    /// (`[sink.NAME]`) to act on; needed when the configuration has several
    /// (`plan` covers every sink without it).
    #[arg(long, global = true, value_name = "NAME")]
    pub sink: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// ferry's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create indexes, backfill them, then stream changes until stopped (SIGINT/SIGTERM).
    Run {
        /// The configuration file (TOML); FERRY_* environment variables override keys.
        #[arg(long, short, env = "FERRY_CONFIG")]
        config: PathBuf,
    },
    /// Check the configuration, the database and the cluster without changing anything.
    Check {
        /// The configuration file (TOML).
        #[arg(long, short, env = "FERRY_CONFIG")]
        config: PathBuf,
    },
    /// Show what applying a configuration (start, restart, `systemctl reload`) will do to each
    /// index, the publication and replica identities, without changing anything. Exit code 0:
    /// nothing changes; 2: something changes; 1: the plan could not be made.
    Plan {
        /// The new configuration file (TOML); FERRY_* environment variables override keys.
        #[arg(long, short, env = "FERRY_CONFIG")]
        config: PathBuf,
    },
    /// Show what a running ferry is doing, read from its admin endpoint (`/status`).
    Status {
        /// Base URL of the admin endpoint [default: http://127.0.0.1:9187].
        #[arg(long, conflicts_with = "config")]
        url: Option<String>,
        /// Take the endpoint from `admin.listen` in this configuration file instead.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the status document as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Manage documents the cluster rejected for good (`on_poison = "dead_letter"`).
    DeadLetters {
        /// The configuration file (TOML).
        #[arg(long, short, env = "FERRY_CONFIG")]
        config: PathBuf,
        /// Only this index (its configured name).
        #[arg(long, global = true)]
        index: Option<String>,
        /// Entries read (and retried or purged) per request.
        #[arg(long, global = true, default_value_t = 1000)]
        page_size: usize,
        /// list, retry or purge.
        #[command(subcommand)]
        action: ops::DeadLetterAction,
    },
    /// Probe a running ferry's `/healthz` (exit 0 when alive); the container healthcheck.
    Health {
        /// Base URL of the admin endpoint; wins over --config [default: http://127.0.0.1:9187].
        #[arg(long)]
        url: Option<String>,
        /// Take the endpoint from `admin.listen` in this configuration file
        /// (FERRY_* overrides applied; 0.0.0.0 and [::] are probed on loopback).
        #[arg(long, short, env = "FERRY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Inspect or drop the replication slot.
    Slot {
        /// The configuration file (TOML).
        #[arg(long, short, env = "FERRY_CONFIG")]
        config: PathBuf,
        /// info or drop.
        #[command(subcommand)]
        action: ops::SlotAction,
    },
    /// Rebuild an index into a new one in the background (the alias moves when it is complete).
    Reindex {
        /// The configured index name (alias).
        name: String,
        /// The configuration file (TOML).
        #[arg(long, short, env = "FERRY_CONFIG")]
        config: PathBuf,
    },
    /// Rebuild documents from PostgreSQL and compare them with the cluster; safe on a live deployment.
    Verify {
        /// The configuration file (TOML).
        #[arg(long, short, env = "FERRY_CONFIG")]
        config: PathBuf,
        /// Only this index (its configured name).
        #[arg(long)]
        index: Option<String>,
        /// Check a random sample of this many rows instead of every row.
        #[arg(long)]
        sample: Option<usize>,
        /// Rewrite (or delete) the documents that differ.
        #[arg(long)]
        repair: bool,
        /// Rows and documents compared per statement and per request (memory stays bounded by it).
        #[arg(long, default_value_t = 1000)]
        page_size: usize,
    },
    /// Print the documents ferry would write for some rows, as its bulk request carries them; read-only, needs no cluster.
    Preview {
        /// The configured index name (alias).
        index: String,
        /// The configuration file (TOML).
        #[arg(long, short, env = "FERRY_CONFIG")]
        config: PathBuf,
        /// Document ids to build (repeatable; a composite key as in `_id`, parts joined by `,`); an id without a row prints the delete ferry would send.
        #[arg(long = "id", value_name = "KEY")]
        ids: Vec<String>,
        /// Without --id: how many rows, first in key order.
        #[arg(long, default_value_t = 10)]
        limit: usize,
        /// Also print the concrete index's settings and mapping (as a console script: PUT, then POST /_bulk).
        #[arg(long)]
        mapping: bool,
    },
    /// Run the whole pipeline on a throwaway PostgreSQL and a local osmem-server, with sample data.
    Demo {
        /// Rows of sample data.
        #[arg(long, default_value_t = 1000)]
        rows: u32,
    },
    /// The configuration format: `ferry config schema` prints its JSON Schema.
    Config {
        /// schema.
        #[command(subcommand)]
        action: schema::ConfigAction,
    },
    /// Commands of the control API (indexes, pause, resume).
    #[command(flatten)]
    Remote(remote::RemoteCommand),
}

/// Entry point shared by the binary (and callable from tests).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Trace export is set up before the subscriber (it is one of its layers)
    // and outside the async runtime (its HTTP client blocks).
    let telemetry = match &cli.command {
        Command::Run { config } => start_telemetry(config),
        _ => Ok(None),
    };
    let (telemetry, telemetry_error, otel_layer) = match telemetry {
        Ok(Some((t, layer))) => (Some(t), None, Some(layer)),
        Ok(None) => (None, None, None),
        Err(e) => (None, Some(e), None),
    };
    init_logging(cli.log_format, otel_layer);
    if let Some(e) = telemetry_error {
        tracing::error!("{e}");
        return ExitCode::from(2);
    }
    let code = run_cli(cli);
    if let Some(t) = telemetry {
        t.shutdown();
    }
    code
}

/// A layer of the subscriber, boxed.
type BoxedLayer = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

/// The OTLP exporter and its layer, when the configuration at `path` sets
/// `telemetry.otlp_endpoint` (a configuration that does not load is
/// reported by the command itself).
fn start_telemetry(
    path: &std::path::Path,
) -> Result<
    Option<(ferry_admin::telemetry::Telemetry, BoxedLayer)>,
    ferry_admin::telemetry::TelemetryError,
> {
    let Ok(cfg) = Config::load(path) else {
        return Ok(None);
    };
    let Some(url) = cfg.telemetry.traces_url() else {
        return Ok(None);
    };
    let (t, layer) = ferry_admin::telemetry::Telemetry::start(&url, &cfg.telemetry.service_name)?;
    Ok(Some((t, Box::new(layer))))
}

fn run_cli(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let direct = cli.direct;
    let sink = cli.sink;
    if sink.is_some()
        && !matches!(
            cli.command,
            Command::Plan { .. }
                | Command::Verify { .. }
                | Command::Reindex { .. }
                | Command::DeadLetters { .. }
        )
    {
        tracing::error!(
            "--sink names the sink for plan, verify, reindex and dead-letters; this command covers every sink: drop --sink"
        );
        return ExitCode::from(2);
    }
    runtime.block_on(async move {
        match cli.command {
            Command::Run { config } => run(config).await,
            Command::Check { config } => check(config).await,
            Command::Plan { config } => plan::plan(config, sink).await,
            Command::Status { url, config, json } => status(url, config, json).await,
            Command::Demo { rows } => demo::run(rows).await,
            Command::DeadLetters {
                config,
                index,
                page_size,
                action,
            } => {
                let at = ops::At { sink, direct };
                ops::dead_letters(&config, action, index, page_size, at).await
            }
            Command::Reindex { name, config } => {
                ops::reindex(&config, &name, ops::At { sink, direct }).await
            }
            Command::Remote(command) => remote::run(command).await,
            Command::Config { action } => schema::run(action),
            Command::Slot { config, action } => ops::slot(&config, action).await,
            Command::Health { url, config } => health(url, config).await,
            Command::Preview {
                index,
                config,
                ids,
                limit,
                mapping,
            } => preview::run(&config, &index, ids, limit, mapping).await,
            Command::Verify {
                config,
                index,
                sample,
                repair,
                page_size,
            } => {
                let opts = ferry_engine::ops::VerifyOptions {
                    sample,
                    repair,
                    page_size,
                };
                ops::verify(&config, index, sink, opts).await
            }
        }
    })
}

fn init_logging(format: LogFormat, telemetry: Option<BoxedLayer>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(use_colour(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .with_writer(std::io::stderr);
    let fmt: BoxedLayer = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => {
            // Machine-read output: no progress bar between the JSON lines.
            ferry_engine::set_progress_bar(false);
            fmt.json().with_filter(filter).boxed()
        }
    };
    let layers: Vec<BoxedLayer> = std::iter::once(fmt).chain(telemetry).collect();
    tracing_subscriber::registry().with(layers).init();
}

/// Colour codes in log lines only on a terminal, and never when `NO_COLOR`
/// is set to a non-empty value (<https://no-color.org>).
fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Loads `path` as one sink sees it ([`Config::for_sink`]); exit code 2
/// with the sink names when `sink` is needed or unknown.
pub(crate) fn load_for(path: &std::path::Path, sink: Option<&str>) -> Result<Config, ExitCode> {
    load(path)?.for_sink(sink).map_err(|e| {
        tracing::error!("{e}");
        ExitCode::from(2)
    })
}

pub(crate) fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        tracing::error!("{e}");
        ExitCode::from(2)
    })
}

/// A watch that turns true on SIGINT or SIGTERM.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stop requested");
        let _ = tx.send(true);
        // A second signal forces exit.
        wait_for_signal().await;
        tracing::warn!("second stop request: exiting at once");
        std::process::exit(130);
    });
    rx
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run(path: PathBuf) -> ExitCode {
    let cfg = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Open the admin endpoint before anything else so that a taken port
    // fails fast, naming the key to change.
    let admin = match cfg.admin.listen.parse() {
        Ok(addr) => ferry_admin::AdminServer::bind(addr).await,
        Err(e) => {
            tracing::error!(
                "admin.listen: {:?} is not a socket address: {e}",
                cfg.admin.listen
            );
            return ExitCode::from(2);
        }
    };
    let admin = match admin {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(
                "admin.listen: {e}; set [admin] listen (or FERRY_ADMIN__LISTEN) to a free address"
            );
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        address = %admin.local_addr(),
        "admin endpoint listening: /healthz /readyz /metrics /status"
    );
    let token = match cfg.admin.token() {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let shutdown = shutdown_signal();
    let stats = std::sync::Arc::new(ferry_engine::Stats::default());
    let limits = ferry_admin::HealthLimits {
        flush_failure: cfg.admin.flush_failure(),
        stall: cfg.admin.stall_timeout(),
    };
    let (config_tx, configs) = watch::channel(cfg.clone());
    let config_tx = std::sync::Arc::new(config_tx);
    let admin = match token {
        Some(token) => {
            let actions = control::spawn(configs.clone(), config_tx.clone(), stats.clone());
            tracing::info!(
                "control API on: /control/… (bearer token from admin.token_file / admin.token_env)"
            );
            admin.with_control(ferry_admin::ControlApi::new(&token, actions))
        }
        None => admin,
    };
    let info = ferry_admin::AdminInfo {
        slot: cfg.source.slot.clone(),
        version: env!("CARGO_PKG_VERSION"),
        limits,
    };
    let admin_task = tokio::spawn({
        let stats = stats.clone();
        async move {
            if let Err(e) = admin.run(stats, info).await {
                tracing::error!(error = %e, "admin endpoint stopped; replication goes on");
            }
        }
    });
    let notifier = systemd_notifier();
    let notify_task = notifier.clone().map(|n| {
        tokio::spawn(ferry_admin::systemd::supervise(
            n,
            stats.clone(),
            shutdown.clone(),
            ferry_admin::systemd::watchdog_interval(),
            limits,
        ))
    });
    reload_on_sighup(path, config_tx);
    let result = ferry_engine::run_reloadable(configs, shutdown, stats).await;
    if let Some(n) = &notifier {
        // Also when the engine ended on its own (an error, not a signal).
        let _ = n.notify(&[ferry_admin::systemd::NotifyState::Stopping]);
    }
    if let Some(t) = notify_task {
        t.abort();
    }
    admin_task.abort();
    match result {
        Ok(()) => {
            tracing::info!("stopped cleanly");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "ferry stopped");
            ExitCode::from(e.exit_code())
        }
    }
}

/// A watch of the configuration, re-read from `path` on SIGHUP. A new
/// configuration is published only when it parses and validates as a whole
/// and changes nothing that needs a process restart (`admin.listen`);
/// otherwise the running one stays and the log says why.
fn reload_on_sighup(path: PathBuf, tx: std::sync::Arc<watch::Sender<Config>>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; configuration reload is off");
            return;
        };
        while hup.recv().await.is_some() {
            let current = tx.borrow().clone();
            match Config::load(&path) {
                Err(e) => tracing::error!("SIGHUP: configuration reload refused, the running configuration stays: {e}"),
                Ok(new) if new == current => {
                    // Still restart the pipeline: it picks up rebuild requests (`ferry reindex`).
                    tracing::info!("SIGHUP: configuration unchanged; restarting the pipeline to pick up index rebuild requests");
                    let _ = tx.send(new);
                }
                Ok(new) if new.admin != current.admin => tracing::error!(
                    "SIGHUP: configuration reload refused: [admin] (listen, flush_failure_secs, stall_timeout_secs, token_file, token_env) cannot change while running; restart ferry to apply it"
                ),
                Ok(new) if new.telemetry != current.telemetry => tracing::error!(
                    "SIGHUP: configuration reload refused: [telemetry] (otlp_endpoint, service_name) cannot change while running; restart ferry to apply it"
                ),
                Ok(new) => match ferry_engine::check(&new).await {
                    // The new configuration must work against the database and
                    // the cluster as they are, or nothing of it is applied.
                    Ok(problems) if problems.is_empty() => {
                        tracing::info!("SIGHUP: configuration reloaded; the pipeline restarts with it after flushing what is in flight");
                        let _ = tx.send(new);
                    }
                    Ok(problems) => tracing::error!(
                        "SIGHUP: configuration reload refused, the running configuration stays: {}",
                        problems.join("; ")
                    ),
                    Err(e) => tracing::error!(
                        "SIGHUP: configuration reload refused, the running configuration stays: {e}"
                    ),
                },
            }
        }
    });
    #[cfg(not(unix))]
    let _ = (path, tx);
}

/// The systemd notifier when started by systemd with `Type=notify`.
fn systemd_notifier() -> Option<std::sync::Arc<ferry_admin::systemd::Notifier>> {
    match ferry_admin::systemd::Notifier::from_env() {
        Ok(n) => n.map(std::sync::Arc::new),
        Err(e) => {
            tracing::warn!(error = %e, "NOTIFY_SOCKET is set but unusable; not notifying systemd");
            None
        }
    }
}

/// The admin endpoint's base URL: `--url`, else `admin.listen` from the
/// configuration file, else the default address.
fn admin_base(url: Option<String>, config: Option<PathBuf>) -> Result<String, ExitCode> {
    match (url, config) {
        (Some(u), _) => Ok(u),
        (None, Some(path)) => {
            let cfg = load(&path)?;
            ferry_admin::admin_url(&cfg.admin.listen).ok_or_else(|| {
                tracing::error!(
                    "admin.listen: {:?} is not a socket address",
                    cfg.admin.listen
                );
                ExitCode::from(2)
            })
        }
        (None, None) => Ok(DEFAULT_ADMIN_URL.to_string()),
    }
}

/// Where the admin endpoint listens unless `admin.listen` says otherwise.
const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:9187";

/// `ferry health`: exit 0 when `/healthz` answers 200.
async fn health(url: Option<String>, config: Option<PathBuf>) -> ExitCode {
    let base = match admin_base(url, config) {
        Ok(b) => b,
        Err(code) => return code,
    };
    let target = format!("{}/healthz", base.trim_end_matches('/'));
    match ferry_admin::fetch(&target).await {
        Ok(r) if r.status == 200 => ExitCode::SUCCESS,
        Ok(r) => {
            tracing::error!(status = r.status, "{target} is not healthy");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!(error = %e, "{target} did not answer");
            ExitCode::FAILURE
        }
    }
}

/// `ferry status`: fetches `/status` and prints it as a table or JSON.
async fn status(url: Option<String>, config: Option<PathBuf>, json: bool) -> ExitCode {
    let base = match admin_base(url, config) {
        Ok(b) => b,
        Err(code) => return code,
    };
    let target = format!("{}/status", base.trim_end_matches('/'));
    let mut err = std::io::stderr().lock();
    let reply = match ferry_admin::fetch(&target).await {
        Ok(r) if r.status == 200 => r,
        Ok(r) => {
            let _ = writeln!(
                err,
                "{target} answered HTTP {}: {}",
                r.status,
                r.body.trim()
            );
            return ExitCode::FAILURE;
        }
        Err(e @ ferry_admin::AdminError::Request { .. }) => {
            let _ = writeln!(
                err,
                "{e}\n(is ferry running, and is this its admin.listen address?)"
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            let _ = writeln!(err, "{e}");
            return ExitCode::FAILURE;
        }
    };
    let doc: serde_json::Value = match serde_json::from_str(&reply.body) {
        Ok(v) => v,
        Err(e) => {
            let _ = writeln!(
                err,
                "{target} did not answer JSON ({e}); is it a ferry admin endpoint?"
            );
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    let text = if json {
        serde_json::to_string_pretty(&doc).unwrap_or_else(|_| reply.body.clone())
    } else {
        ferry_admin::status_table(&doc)
    };
    let _ = writeln!(out, "{}", text.trim_end());
    ExitCode::SUCCESS
}

async fn check(path: PathBuf) -> ExitCode {
    let cfg = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut out = std::io::stdout().lock();
    match ferry_engine::check(&cfg).await {
        Ok(problems) if problems.is_empty() => {
            let _ = writeln!(
                out,
                "ok: configuration, database and search cluster are ready"
            );
            ExitCode::SUCCESS
        }
        Ok(problems) => {
            for p in &problems {
                let _ = writeln!(out, "problem: {p}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            let _ = writeln!(out, "problem: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::use_colour;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_a_non_empty_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))));
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(true, Some(OsStr::new("0"))));
        assert!(!use_colour(false, None));
        assert!(!use_colour(false, Some(OsStr::new("1"))));
    }
}
