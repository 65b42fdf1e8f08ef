//! Where the CPU went during a measured phase: PostgreSQL's processes by
//! role (ferry's SQL sessions, ferry's walsender, the bench's own sessions,
//! background processes), this bench process (FastSink and the load
//! generators) and the machine as a whole.
//!
//! PostgreSQL's processes are found in `pg_stat_activity` every 200 ms and
//! their CPU read from `/proc/<pid>/stat`; a process that ends between two
//! samples loses at most its last 200 ms.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::harness::{clock_ticks, cpu_from_stat, Harness};

/// How often PostgreSQL's processes are listed.
const EVERY: Duration = Duration::from_millis(200);

/// The role of one PostgreSQL process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A client backend opened by ferry (document queries, backfill copies).
    FerrySql,
    /// A walsender streaming to ferry (logical decoding).
    FerryWalsender,
    /// Any other client backend: the bench's writers and checks.
    Bench,
    /// Checkpointer, WAL writer, other walsenders, …
    Other,
}

impl Role {
    fn of(backend_type: &str, application: &str) -> Role {
        match (backend_type, application == "ferry") {
            ("walsender", true) => Role::FerryWalsender,
            ("client backend", true) => Role::FerrySql,
            ("client backend", false) => Role::Bench,
            _ => Role::Other,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Role::FerrySql => "ferry's SQL sessions",
            Role::FerryWalsender => "ferry's walsender",
            Role::Bench => "the bench's sessions",
            Role::Other => "other PostgreSQL processes",
        }
    }
}

/// One PostgreSQL process seen by the sampler.
#[derive(Debug, Clone, Copy)]
struct Proc {
    role: Role,
    /// CPU seconds when the phase began (0 for processes started later).
    base: f64,
    /// CPU seconds at the last sample.
    last: f64,
}

/// CPU seconds spent during one phase.
#[derive(Debug, Clone)]
pub struct CpuReport {
    /// Wall-clock seconds of the phase.
    pub wall: f64,
    /// Busy CPU seconds of the whole machine (`/proc/stat`).
    pub machine: Option<f64>,
    /// CPUs the machine has.
    pub cpus: usize,
    /// CPU seconds of this process (FastSink, writers, checks).
    pub bench: Option<f64>,
    /// CPU seconds of PostgreSQL's processes, by role.
    pub postgres: Vec<(Role, f64)>,
}

impl CpuReport {
    /// CPU seconds of PostgreSQL processes with `role`.
    pub fn postgres(&self, role: Role) -> f64 {
        self.postgres
            .iter()
            .filter(|(r, _)| *r == role)
            .map(|(_, s)| *s)
            .sum()
    }

    /// One line for the notes, with ferry's own CPU seconds.
    pub fn describe(&self, ferry: Option<f64>) -> String {
        let mut parts = Vec::new();
        if let Some(m) = self.machine {
            parts.push(format!(
                "machine busy {m:.1} s of {:.1} s available ({:.0}%)",
                self.wall * self.cpus as f64,
                100.0 * m / (self.wall * self.cpus as f64).max(1e-9)
            ));
        }
        if let Some(f) = ferry {
            parts.push(format!("ferry {f:.1} s"));
        }
        let pg_total: f64 = self.postgres.iter().map(|(_, s)| s).sum();
        let roles: Vec<String> = self
            .postgres
            .iter()
            .map(|(r, s)| format!("{} {s:.1} s", r.label()))
            .collect();
        parts.push(format!(
            "PostgreSQL {pg_total:.1} s ({})",
            if roles.is_empty() {
                "no processes seen".to_owned()
            } else {
                roles.join(", ")
            }
        ));
        if let Some(b) = self.bench {
            parts.push(format!("ferry-bench itself (FastSink, writers) {b:.1} s"));
        }
        format!(
            "CPU over the {:.1} s measured: {}",
            self.wall,
            parts.join("; ")
        )
    }
}

/// A running sampler; [`stop`](CpuSampler::stop) returns the report.
pub struct CpuSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<HashMap<i32, Proc>>>,
    started: Instant,
    machine: Option<f64>,
    bench: Option<f64>,
}

impl CpuSampler {
    /// Starts sampling on a connection of its own.
    pub async fn start(h: &Harness) -> Result<CpuSampler> {
        let db = h.connect().await?;
        let me: i32 = db.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let machine = machine_busy();
        let bench = own_cpu();
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let mut procs: HashMap<i32, Proc> = HashMap::new();
            let mut first = true;
            loop {
                let last_round = flag.load(Ordering::Acquire);
                let rows = db
                    .query(
                        "SELECT pid, coalesce(backend_type, ''), coalesce(application_name, '') \
                         FROM pg_stat_activity",
                        &[],
                    )
                    .await
                    .context("listing PostgreSQL's processes")?;
                let ticks = clock_ticks();
                for row in rows {
                    let pid: i32 = row.get(0);
                    if pid == me {
                        continue;
                    }
                    let Some(cpu) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .ok()
                        .and_then(|s| cpu_from_stat(&s, ticks))
                    else {
                        continue;
                    };
                    let backend_type: String = row.get(1);
                    let application: String = row.get(2);
                    procs
                        .entry(pid)
                        .or_insert(Proc {
                            role: Role::of(&backend_type, &application),
                            base: if first { cpu } else { 0.0 },
                            last: cpu,
                        })
                        .last = cpu;
                }
                first = false;
                if last_round {
                    return Ok(procs);
                }
                tokio::time::sleep(EVERY).await;
            }
        });
        Ok(CpuSampler {
            stop,
            task,
            started,
            machine,
            bench,
        })
    }

    /// Takes a last sample and sums up.
    pub async fn stop(self) -> Result<CpuReport> {
        self.stop.store(true, Ordering::Release);
        let wall = self.started.elapsed().as_secs_f64();
        let machine = machine_busy();
        let bench = own_cpu();
        let procs = self.task.await.context("joining the CPU sampler")??;
        let mut by_role: HashMap<Role, f64> = HashMap::new();
        for p in procs.values() {
            *by_role.entry(p.role).or_default() += (p.last - p.base).max(0.0);
        }
        let mut postgres: Vec<(Role, f64)> = by_role.into_iter().collect();
        postgres.sort_by_key(|(r, _)| *r);
        Ok(CpuReport {
            wall,
            machine: self.machine.zip(machine).map(|(a, b)| b - a),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            bench: self.bench.zip(bench).map(|(a, b)| b - a),
            postgres,
        })
    }
}

/// CPU seconds of this process so far.
fn own_cpu() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    cpu_from_stat(&stat, clock_ticks())
}

/// Busy CPU seconds of the machine since boot (everything but idle and iowait).
fn machine_busy() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    busy_from_proc_stat(&text, clock_ticks())
}

fn busy_from_proc_stat(text: &str, ticks: f64) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]:
    // guest time is already counted in user, so only the first eight count.
    let total: f64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0.0);
    Some((total - idle) / ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_machine_busy_time() {
        let text = "cpu  100 5 50 1000 20 3 2 0 7 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(busy_from_proc_stat(text, 100.0), Some(1.6));
        assert!(machine_busy().is_some());
    }

    #[test]
    fn classifies_processes() {
        assert_eq!(Role::of("walsender", "ferry"), Role::FerryWalsender);
        assert_eq!(Role::of("client backend", "ferry"), Role::FerrySql);
        assert_eq!(Role::of("client backend", ""), Role::Bench);
        assert_eq!(Role::of("walsender", "pg_recvlogical"), Role::Other);
        assert_eq!(Role::of("checkpointer", ""), Role::Other);
    }
}
