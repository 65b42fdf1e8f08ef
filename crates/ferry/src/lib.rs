//! The `ferry` command line: `run`, `check`, `demo`.
//!
//! This is the only crate that names concrete backends; it wires the
//! config, the PostgreSQL source and the OpenSearch sink into the engine.

mod demo;

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
    /// Run the whole pipeline on a throwaway PostgreSQL and a local osmem-server, with sample data.
    Demo {
        /// Rows of sample data.
        #[arg(long, default_value_t = 1000)]
        rows: u32,
    },
}

/// Entry point shared by the binary (and callable from tests).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // One TLS crypto provider for every client in the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
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
    runtime.block_on(async move {
        match cli.command {
            Command::Run { config } => run(config).await,
            Command::Check { config } => check(config).await,
            Command::Demo { rows } => demo::run(rows).await,
        }
    })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
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
    let shutdown = shutdown_signal();
    let stats = std::sync::Arc::new(ferry_engine::Stats::default());
    match ferry_engine::run(cfg, shutdown, stats).await {
        Ok(()) => {
            tracing::info!("stopped cleanly");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "ferry stopped");
            ExitCode::FAILURE
        }
    }
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
