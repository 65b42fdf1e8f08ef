//! `ferry-bench`: end-to-end figures for the real `ferry` binary.
//!
//! Every workload starts a throwaway PostgreSQL, a sink and `ferry run
//! --config …` as a child process, drives load, measures throughput, lag,
//! CPU, memory and retained WAL, and finally checks that the index
//! converged to the table. The sink is an in-process OpenSearch double
//! ([`ferry_testkit::FastSink`], `--sink fast`, the default) or a real
//! OpenSearch node started through the test kit (`--sink opensearch`),
//! where each workload's ceiling is the node's own ingest of the same
//! writes.
//!
//! ```text
//! cargo run --release -p ferry-bench -- [--quick] [--sink fast|opensearch] [--json PATH] [WORKLOAD…]
//! ```

mod ceiling;
mod harness;
mod http;
mod loader;
mod opensearch;
mod pgcpu;
mod relational;
mod report;
mod selftest;
mod sink;
mod verify;
mod workloads;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;

use crate::opensearch::Node;
use crate::report::{LoadAverage, Outcome};
use crate::sink::SinkChoice;
use crate::workloads::{Ctx, Sizes, Workload};

/// Benchmarks the real ferry binary end to end.
#[derive(Debug, Parser)]
#[command(
    name = "ferry-bench",
    about = "Benchmarks the real ferry binary against a throwaway PostgreSQL and an in-memory OpenSearch double or a real OpenSearch node",
    after_help = "Workloads: sink-selftest, backfill, backfill-live, backfill-wide, stream-simple, stream-1k, stream-5k, stream-20k, big-transaction, backfill-nested, stream-relational, nested-nofk-backfill, nested-nofk-stream (both: nested-nofk), backfill-parallel, stream-in-flight, backfill-file (default: all)\n\
                  Production sizes, only when named (never in CI): backfill-10m, backfill-live-10m, nested-1m, verify-10m (--quick: a hundredth)\n\
                  With --sink opensearch: backfill, stream-simple, backfill-nested, nested-nofk-backfill, backfill-parallel (the default there; also backfill-10m, nested-1m, verify-10m, which needs the node); the others need FastSink."
)]
struct Args {
    /// Workloads to run, in order (default: all that the sink supports).
    workloads: Vec<String>,
    /// Small sizes: proves everything works in a couple of minutes.
    #[arg(long)]
    quick: bool,
    /// Where ferry writes: `fast` (FastSink, an in-process bulk-API double)
    /// or `opensearch` (a real node started by the bench; needs
    /// `tests/engines/build-opensearch VERSION` once).
    #[arg(long, value_enum, default_value = "fast")]
    sink: SinkChoice,
    /// The OpenSearch version `--sink opensearch` starts.
    #[arg(long, value_name = "VERSION", default_value = ferry_testkit::DEFAULT_OPENSEARCH_VERSION)]
    opensearch_version: String,
    /// Where to write the results as JSON (default: <target>/ferry-bench.json).
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// The ferry binary (default: <target>/release/ferry, built when missing).
    #[arg(long, value_name = "PATH")]
    ferry: Option<PathBuf>,
    /// Run `cargo build --release -p ferry` first even if the binary exists.
    #[arg(long)]
    build: bool,
    /// Copy each workload's ferry log and config into this directory.
    #[arg(long, value_name = "DIR")]
    keep_logs: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry-bench: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("ferry-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the selected workloads; `Ok(false)` when one of them failed.
async fn run(args: Args) -> Result<bool> {
    let on_node = args.sink == SinkChoice::Opensearch;
    let selected: Vec<Workload> = if args.workloads.is_empty() {
        Workload::ALL
            .into_iter()
            .filter(|w| !on_node || w.runs_on_node())
            .collect()
    } else {
        args.workloads
            .iter()
            .flat_map(|name| match name.as_str() {
                // Both halves of the workload without foreign-key indexes.
                "nested-nofk" => vec![
                    Ok(Workload::NestedNofkBackfill),
                    Ok(Workload::NestedNofkStream),
                ],
                _ => vec![Workload::parse(name).with_context(|| {
                    let known: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
                    format!(
                        "unknown workload {name:?}; known: {}, nested-nofk",
                        known.join(", ")
                    )
                })],
            })
            .collect::<Result<_>>()?
    };
    if on_node {
        let refused: Vec<&str> = selected
            .iter()
            .filter(|w| !w.runs_on_node())
            .map(|w| w.name())
            .collect();
        if !refused.is_empty() {
            let supported: Vec<&str> = Workload::ALL
                .iter()
                .filter(|w| w.runs_on_node())
                .map(|w| w.name())
                .collect();
            bail!(
                "--sink opensearch runs {} only; run {} with --sink fast (they need FastSink's arrival \
                 time of every write, or measure FastSink itself)",
                supported.join(", "),
                refused.join(", ")
            );
        }
    }
    let target_dir = target_dir()?;
    let ferry_bin = if selected.iter().any(|w| w.needs_ferry()) {
        locate_ferry(&args, &target_dir)?
    } else {
        PathBuf::from("ferry")
    };
    if cfg!(debug_assertions) && !args.quick {
        eprintln!(
            "ferry-bench: warning: this is a debug build of the bench; FastSink and the load \
             generators run slowly (use cargo run --release -p ferry-bench)"
        );
    }
    let sizes = if args.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    let load_at_start = LoadAverage::now();
    let node = if on_node {
        Some(Arc::new(
            start_node(&args.opensearch_version, args.quick).await?,
        ))
    } else {
        None
    };
    let sink_name = node
        .as_ref()
        .map(|n| n.name())
        .unwrap_or_else(|| "fast".to_owned());
    let ctx = Ctx {
        ferry_bin: ferry_bin.clone(),
        sizes,
        keep_logs: args.keep_logs.clone(),
        node: node.clone(),
    };

    let started = Instant::now();
    let mut outcomes: Vec<Outcome> = Vec::new();
    for w in &selected {
        let t = Instant::now();
        eprintln!("ferry-bench: running {} …", w.name());
        let outcome = workloads::run(*w, &ctx).await;
        eprintln!(
            "ferry-bench: {} finished in {:.1} s: {}",
            w.name(),
            t.elapsed().as_secs_f64(),
            outcome.check
        );
        outcomes.push(outcome);
    }

    println!("sink: {sink_name}\n{}", report::table(&outcomes));
    let json_path = args
        .json
        .clone()
        .unwrap_or_else(|| target_dir.join("ferry-bench.json"));
    let doc = json!({
        "generated_unix_s": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "quick": args.quick,
        "sink": sink_name,
        "node": node.as_ref().map(|n| n.describe()),
        "load_average": {"start": load_at_start, "end": LoadAverage::now()},
        "ferry_binary": ferry_bin.display().to_string(),
        "ferry_binary_modified_unix_s": modified_unix_s(&ferry_bin),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "total_seconds": started.elapsed().as_secs_f64(),
        "targets": {
            "backfill_rows_per_s": 300_000,
            "stream_simple_changes_per_s": 50_000,
            "lag_at_5k_p50_ms": 50,
            "lag_at_5k_p99_ms": 150,
            "peak_rss_mib": 128,
            "backfill_nested_docs_per_s": 25_000,
            "stream_relational_changes_per_s": 15_000,
        },
        "workloads": outcomes,
    });
    if let Some(dir) = json_path.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("results written to {}", json_path.display());
    Ok(outcomes.iter().all(|o| o.ok))
}

/// Starts the OpenSearch node for `--sink opensearch` and warms it up.
async fn start_node(version: &str, quick: bool) -> Result<Node> {
    eprintln!("ferry-bench: starting OpenSearch {version} (2 GiB heap, full JIT, G1) …");
    let t = Instant::now();
    let node = Node::start(version).await?;
    eprintln!(
        "ferry-bench: OpenSearch {version} answers at {} after {:.1} s",
        node.url(),
        t.elapsed().as_secs_f64()
    );
    let docs = if quick { 50_000 } else { 250_000 };
    let note = node.warm_up(docs).await.context("warming the node up")?;
    eprintln!("ferry-bench: {note}");
    Ok(node)
}

/// The cargo target directory this program was built into.
fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the ferry-bench executable")?;
    // target/<profile>/ferry-bench → target
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("the executable has no parent directory")
}

/// The workspace root, when this program was built from the source tree.
fn workspace_root() -> Option<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.parent()?.parent()?;
    root.join("Cargo.toml")
        .is_file()
        .then(|| root.to_path_buf())
}

/// Finds (and if needed builds) the release ferry binary.
fn locate_ferry(args: &Args, target_dir: &Path) -> Result<PathBuf> {
    if let Some(path) = &args.ferry {
        if !path.is_file() {
            bail!("--ferry {} is not a file", path.display());
        }
        return Ok(path.clone());
    }
    let bin = target_dir.join("release").join("ferry");
    if args.build || !bin.is_file() {
        let root = workspace_root().context(
            "the ferry binary is missing and the source tree is not available to build it; pass --ferry PATH",
        )?;
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        eprintln!("ferry-bench: building ferry (cargo build --release -p ferry) …");
        let status = Command::new(cargo)
            .args(["build", "--release", "-p", "ferry", "--bin", "ferry"])
            .current_dir(&root)
            .env("CARGO_TARGET_DIR", target_dir)
            .status()
            .context("running cargo build")?;
        if !status.success() {
            bail!("cargo build --release -p ferry failed ({status})");
        }
    }
    if !bin.is_file() {
        bail!("{} does not exist after the build", bin.display());
    }
    eprintln!("ferry-bench: using {}", bin.display());
    Ok(bin)
}

fn modified_unix_s(path: &Path) -> Option<u64> {
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(
        modified
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs(),
    )
}
