//! Figures of one workload, the printed table and the JSON file.

use std::fmt::Write as _;

use serde::Serialize;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Lag {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Changes measured.
    pub samples: usize,
}

impl Lag {
    /// Percentiles of `values` (milliseconds); `None` when empty.
    pub fn from_ms(mut values: Vec<f64>) -> Option<Lag> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let pick = |q: f64| {
            let rank = (q * values.len() as f64).ceil() as usize;
            values[rank.clamp(1, values.len()) - 1]
        };
        Some(Lag {
            p50: pick(0.50),
            p95: pick(0.95),
            p99: pick(0.99),
            max: values[values.len() - 1],
            samples: values.len(),
        })
    }
}

/// The machine's load average (`/proc/loadavg`): the bench shares the
/// machine, so every figure carries it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LoadAverage {
    /// Over 1 minute.
    pub one: f64,
    /// Over 5 minutes.
    pub five: f64,
    /// Over 15 minutes.
    pub fifteen: f64,
}

impl LoadAverage {
    /// The load average now; `None` where `/proc/loadavg` is unreadable.
    pub fn now() -> Option<LoadAverage> {
        Self::parse(&std::fs::read_to_string("/proc/loadavg").ok()?)
    }

    fn parse(text: &str) -> Option<LoadAverage> {
        let mut f = text.split_whitespace().map(|v| v.parse::<f64>().ok());
        Some(LoadAverage {
            one: f.next()??,
            five: f.next()??,
            fifteen: f.next()??,
        })
    }
}

impl std::fmt::Display for LoadAverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2}, {:.2}, {:.2}", self.one, self.five, self.fifteen)
    }
}

/// One goal and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is measured, with the goal, e.g. `rate >= 300,000 rows/s`.
    pub goal: String,
    /// The measured value, formatted.
    pub measured: String,
    /// Whether the goal was met.
    pub met: bool,
}

/// Everything measured for one workload.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Workload name.
    pub workload: String,
    /// Rows, changes or documents the workload moved.
    pub size: u64,
    /// What `size` and `rate` count: `rows`, `changes` or `docs`.
    pub unit: &'static str,
    /// Seconds the measured phase took.
    pub seconds: Option<f64>,
    /// `unit`s per second end to end.
    pub rate: Option<f64>,
    /// The same volume through the fastest path the source (FastSink runs)
    /// or the OpenSearch node (`--sink opensearch`) offers, per second.
    pub ceiling: Option<f64>,
    /// How the ceiling was measured.
    pub ceiling_method: Option<String>,
    /// End-to-end lag per change.
    pub lag_ms: Option<Lag>,
    /// ferry's peak resident set size, MiB.
    pub peak_rss_mib: Option<f64>,
    /// ferry's CPU seconds per 100,000 `unit`s.
    pub cpu_s_per_100k: Option<f64>,
    /// Bulk requests ferry sent per 1,000 `unit`s.
    pub bulk_per_1k: Option<f64>,
    /// SQL statements ferry issued to build or resolve documents per 1,000
    /// `unit`s (its `ferry_sql_statements_total` counter).
    pub sql_per_1k: Option<f64>,
    /// WAL ferry's slot retained at the end, bytes.
    pub wal_retained_bytes: Option<i64>,
    /// True when the index converged to the table.
    pub ok: bool,
    /// What the convergence check found (or why the workload failed).
    pub check: String,
    /// Goals for this workload.
    pub targets: Vec<Target>,
    /// Extra observations.
    pub notes: Vec<String>,
    /// The machine's load average when the workload started and ended.
    pub load_average: Option<(LoadAverage, LoadAverage)>,
}

impl Outcome {
    /// An empty outcome for `workload`, filled in as figures arrive.
    pub fn new(workload: &str, size: u64, unit: &'static str) -> Outcome {
        Outcome {
            workload: workload.to_owned(),
            size,
            unit,
            seconds: None,
            rate: None,
            ceiling: None,
            ceiling_method: None,
            lag_ms: None,
            peak_rss_mib: None,
            cpu_s_per_100k: None,
            bulk_per_1k: None,
            sql_per_1k: None,
            wal_retained_bytes: None,
            ok: false,
            check: "not run".to_owned(),
            targets: Vec::new(),
            notes: Vec::new(),
            load_average: None,
        }
    }

    /// A workload that could not complete.
    pub fn failed(workload: &str, size: u64, unit: &'static str, why: String) -> Outcome {
        let mut o = Outcome::new(workload, size, unit);
        o.check = format!("FAIL: {why}");
        o
    }

    /// Moves the ceiling measured so far into the notes as `what`, with
    /// the rate's ratio to it: another ceiling takes its place.
    pub fn demote_ceiling(&mut self, what: &str) {
        if let Some(c) = self.ceiling.take() {
            let ratio = self.ratio_to(c);
            let method = self.ceiling_method.take().unwrap_or_default();
            self.notes.push(format!(
                "{what}: {} {}/s{} ({method})",
                thousands(c),
                self.unit,
                ratio
                    .map(|r| format!(", ferry at {r:.2} of it"))
                    .unwrap_or_default()
            ));
        }
    }

    fn ratio_to(&self, ceiling: f64) -> Option<f64> {
        self.rate.filter(|_| ceiling > 0.0).map(|r| r / ceiling)
    }

    /// `rate / ceiling`.
    pub fn ratio(&self) -> Option<f64> {
        match (self.rate, self.ceiling) {
            (Some(r), Some(c)) if c > 0.0 => Some(r / c),
            _ => None,
        }
    }

    /// Adds the goal "rate ≥ `min`".
    pub fn target_rate(&mut self, min: f64) {
        if let Some(rate) = self.rate {
            self.targets.push(Target {
                goal: format!("rate >= {} {}/s", thousands(min), self.unit),
                measured: thousands(rate),
                met: rate >= min,
            });
        }
    }

    /// Adds the goal "`what` ≥ `min`" for a ratio measured in the same run.
    pub fn target_ratio(&mut self, what: &str, ratio: f64, min: f64) {
        self.targets.push(Target {
            goal: format!("{what} >= {min:.1}x"),
            measured: format!("{ratio:.2}x"),
            met: ratio >= min,
        });
    }

    /// Adds the goal "peak RSS ≤ `max_mib`".
    pub fn target_rss(&mut self, max_mib: f64) {
        if let Some(rss) = self.peak_rss_mib {
            self.targets.push(Target {
                goal: format!("peak RSS <= {max_mib:.0} MiB"),
                measured: format!("{rss:.1} MiB"),
                met: rss <= max_mib,
            });
        }
    }

    /// Adds the goals on lag percentiles.
    pub fn target_lag(&mut self, p50_ms: f64, p99_ms: f64) {
        if let Some(lag) = self.lag_ms {
            self.targets.push(Target {
                goal: format!("lag p50 <= {p50_ms:.0} ms"),
                measured: format!("{:.1} ms", lag.p50),
                met: lag.p50 <= p50_ms,
            });
            self.targets.push(Target {
                goal: format!("lag p99 <= {p99_ms:.0} ms"),
                measured: format!("{:.1} ms", lag.p99),
                met: lag.p99 <= p99_ms,
            });
        }
    }
}

/// `1234567.8` → `1,234,568`.
pub fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    // Digits are ASCII, so splitting at byte positions is safe.
    let (head, rest) = digits.split_at(digits.len() % 3);
    let mut groups: Vec<&str> = Vec::new();
    if !head.is_empty() {
        groups.push(head);
    }
    groups.extend(
        rest.as_bytes()
            .chunks(3)
            .filter_map(|c| std::str::from_utf8(c).ok()),
    );
    let out = groups.join(",");
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// A byte count for humans.
pub fn bytes(n: i64) -> String {
    let abs = n.unsigned_abs() as f64;
    if abs >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
    } else if abs >= 1024.0 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".to_owned())
}

/// The results as a fixed-width table followed by the goals.
pub fn table(outcomes: &[Outcome]) -> String {
    let header = [
        "workload",
        "size",
        "rate /s",
        "ceiling /s",
        "ratio",
        "lag p50/p95/p99 ms",
        "peak RSS",
        "CPU s/100k",
        "bulk/1k",
        "SQL/1k",
        "WAL retained",
        "check",
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    for o in outcomes {
        rows.push(vec![
            o.workload.clone(),
            format!("{} {}", thousands(o.size as f64), o.unit),
            opt(o.rate, thousands),
            opt(o.ceiling, thousands),
            opt(o.ratio(), |r| format!("{r:.2}")),
            o.lag_ms
                .map(|l| format!("{:.1}/{:.1}/{:.1}", l.p50, l.p95, l.p99))
                .unwrap_or_else(|| "-".to_owned()),
            opt(o.peak_rss_mib, |m| format!("{m:.1} MiB")),
            opt(o.cpu_s_per_100k, |c| format!("{c:.2}")),
            opt(o.bulk_per_1k, |b| format!("{b:.2}")),
            opt(o.sql_per_1k, |q| format!("{q:.2}")),
            o.wal_retained_bytes
                .map(bytes)
                .unwrap_or_else(|| "-".to_owned()),
            if o.ok {
                "ok".to_owned()
            } else {
                "FAIL".to_owned()
            },
        ]);
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: &[String], out: &mut String| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 0 || i == cells.len() - 1 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(
        &header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>(),
        &mut out,
    );
    line(
        &widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>(),
        &mut out,
    );
    for row in &rows {
        line(row, &mut out);
    }

    let _ = writeln!(out, "\ntargets:");
    for o in outcomes {
        for t in &o.targets {
            let _ = writeln!(
                out,
                "  {:<17} {:<28} measured {:>14}  {}",
                o.workload,
                t.goal,
                t.measured,
                if t.met { "met" } else { "MISSED" }
            );
        }
    }
    let _ = writeln!(out, "\nchecks and notes:");
    for o in outcomes {
        let _ = writeln!(out, "  {:<17} {}", o.workload, o.check);
        if let Some(m) = &o.ceiling_method {
            let _ = writeln!(out, "  {:<17} ceiling: {m}", "");
        }
        if let Some((start, end)) = &o.load_average {
            let _ = writeln!(
                out,
                "  {:<17} load average (1, 5, 15 min): {start} at the start, {end} at the end",
                ""
            );
        }
        for n in &o.notes {
            let _ = writeln!(out, "  {:<17} {n}", "");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_nearest_rank() {
        let lag = Lag::from_ms((1..=100).map(f64::from).collect()).expect("lag");
        assert_eq!(
            (lag.p50, lag.p95, lag.p99, lag.max, lag.samples),
            (50.0, 95.0, 99.0, 100.0, 100)
        );
        assert!(Lag::from_ms(Vec::new()).is_none());
        let one = Lag::from_ms(vec![7.0]).expect("one");
        assert_eq!(one.p50, 7.0);
    }

    #[test]
    fn reads_load_averages_and_demotes_ceilings() {
        let l = LoadAverage::parse("3.10 4.05 4.07 2/345 6789\n").expect("load");
        assert_eq!((l.one, l.five, l.fifteen), (3.1, 4.05, 4.07));
        assert!(LoadAverage::parse("garbage").is_none());
        let mut o = Outcome::new("backfill", 10, "rows");
        o.rate = Some(50.0);
        o.ceiling = Some(100.0);
        o.ceiling_method = Some("COPY".into());
        o.demote_ceiling("PostgreSQL ceiling");
        assert_eq!(o.ceiling, None);
        assert_eq!(
            o.notes,
            vec!["PostgreSQL ceiling: 100 rows/s, ferry at 0.50 of it (COPY)".to_owned()]
        );
    }

    #[test]
    fn formats_numbers() {
        assert_eq!(thousands(1_234_567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(-1000.0), "-1,000");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(2048), "2.0 KiB");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn table_lists_rows_and_targets() {
        let mut o = Outcome::new("backfill", 1000, "rows");
        o.rate = Some(500.0);
        o.ceiling = Some(1000.0);
        o.ok = true;
        o.check = "fine".into();
        o.target_rate(300.0);
        let t = table(&[o]);
        assert!(t.contains("backfill"));
        assert!(t.contains("0.50"));
        assert!(t.contains("rate >= 300 rows/s"));
        assert!(t.contains("met"));
    }
}
