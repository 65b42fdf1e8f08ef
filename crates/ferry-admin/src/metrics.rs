//! `/metrics`: the [`Stats`] in Prometheus text exposition format 0.0.4.
//!
//! Names follow `ferry_<noun>_<unit>[_total]`. Labels are index names,
//! operations and states only; their cardinality is bounded by the config.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use ferry_core::stats::{IndexState, Stats, FLUSH_BUCKETS_MS};

/// Every index state, for the `ferry_index_state` enumeration.
const STATES: [IndexState; 4] = [
    IndexState::Starting,
    IndexState::Backfilling,
    IndexState::Streaming,
    IndexState::Stopped,
];

/// Renders every metric as Prometheus text (format 0.0.4), as of now.
pub fn render_metrics(stats: &Stats) -> String {
    render_at(stats, crate::now_pg_micros())
}

/// Renders every metric as of `now_us` (µs since 2000-01-01).
pub(crate) fn render_at(stats: &Stats, now_us: i64) -> String {
    let mut w = Writer::default();
    let indexes = stats.indexes.lock().map(|g| g.clone()).unwrap_or_default();

    w.family(
        "ferry_changes_total",
        "counter",
        "Row changes received from PostgreSQL, by operation.",
    );
    for (op, v) in ["insert", "update", "delete"].iter().zip(&stats.changes) {
        w.sample("ferry_changes_total", &[("op", op)], v.load(Relaxed));
    }
    w.single(
        "ferry_transactions_total",
        "counter",
        "Transactions received from PostgreSQL.",
        stats.transactions.load(Relaxed),
    );

    w.family(
        "ferry_documents_total",
        "counter",
        "Document writes acknowledged by the search cluster, by index and result.",
    );
    for ix in &indexes {
        for (result, v) in [
            ("written", &ix.docs_written),
            ("deleted", &ix.docs_deleted),
            ("superseded", &ix.docs_superseded),
            ("rejected", &ix.docs_rejected),
        ] {
            w.sample(
                "ferry_documents_total",
                &[("index", &ix.name), ("result", result)],
                v.load(Relaxed),
            );
        }
    }
    w.family(
        "ferry_dead_letters_total",
        "counter",
        "Rejected documents stored as dead letters, by index.",
    );
    for ix in &indexes {
        w.sample(
            "ferry_dead_letters_total",
            &[("index", &ix.name)],
            ix.dead_letters.load(Relaxed),
        );
    }

    w.family(
        "ferry_bulk_requests_total",
        "counter",
        "Bulk requests sent to the search cluster, by response class (transport errors count as 5xx).",
    );
    for (class, v) in ["2xx", "4xx", "5xx"].iter().zip(&stats.bulk_requests) {
        w.sample(
            "ferry_bulk_requests_total",
            &[("class", class)],
            v.load(Relaxed),
        );
    }
    w.single(
        "ferry_retries_total",
        "counter",
        "Bulk attempts retried (whole requests or single items).",
        stats.retries.load(Relaxed),
    );
    w.single(
        "ferry_sql_statements_total",
        "counter",
        "SQL statements the worker issued to build or resolve documents.",
        stats.sql_statements.load(Relaxed),
    );
    w.single(
        "ferry_reconnects_total",
        "counter",
        "Pipeline restarts after a retryable failure.",
        stats.reconnects.load(Relaxed),
    );
    w.single(
        "ferry_queue_depth",
        "gauge",
        "Changes waiting between capture and the worker.",
        stats.queue_depth.load(Relaxed),
    );

    w.single(
        "ferry_confirmed_lsn",
        "gauge",
        "WAL position confirmed to PostgreSQL (everything before it is durable in the index).",
        stats.confirmed_lsn.load(Relaxed),
    );
    w.single(
        "ferry_received_lsn",
        "gauge",
        "Highest commit WAL position received from PostgreSQL.",
        stats.received_lsn.load(Relaxed),
    );
    let lag = crate::lag(stats, now_us);
    w.single(
        "ferry_replication_lag_bytes",
        "gauge",
        "Received minus confirmed WAL position, in bytes.",
        lag.bytes,
    );
    w.single(
        "ferry_replication_lag_seconds",
        "gauge",
        "Seconds since the commit of the last transaction made durable, while changes are pending; 0 when caught up.",
        lag.seconds,
    );

    // Cumulative buckets; the count is their total so that the +Inf bucket
    // and _count agree even while a flush is being recorded.
    w.family(
        "ferry_flush_duration_seconds",
        "histogram",
        "Time to write one batch to the search cluster.",
    );
    let mut cumulative = 0u64;
    for (i, bucket) in stats.flush_buckets.iter().enumerate() {
        cumulative += bucket.load(Relaxed);
        let le = match FLUSH_BUCKETS_MS.get(i) {
            Some(ms) => (*ms as f64 / 1000.0).to_string(),
            None => "+Inf".to_string(),
        };
        w.sample(
            "ferry_flush_duration_seconds_bucket",
            &[("le", &le)],
            cumulative,
        );
    }
    w.sample(
        "ferry_flush_duration_seconds_sum",
        &[],
        stats.flush_micros.load(Relaxed) as f64 / 1e6,
    );
    w.sample("ferry_flush_duration_seconds_count", &[], cumulative);

    w.family(
        "ferry_flush_batch_documents",
        "summary",
        "Document writes per flushed batch.",
    );
    w.sample(
        "ferry_flush_batch_documents_sum",
        &[],
        stats.flush_docs.load(Relaxed),
    );
    w.sample(
        "ferry_flush_batch_documents_count",
        &[],
        stats.flushes.load(Relaxed),
    );

    w.family(
        "ferry_backfill_rows",
        "gauge",
        "Rows copied by the backfill of each index.",
    );
    for ix in &indexes {
        w.sample(
            "ferry_backfill_rows",
            &[("index", &ix.name)],
            ix.backfill_rows.load(Relaxed),
        );
    }
    w.family(
        "ferry_backfill_rows_estimate",
        "gauge",
        "PostgreSQL's row estimate for each backfill (absent while unknown).",
    );
    for ix in &indexes {
        let total = ix.backfill_total.load(Relaxed);
        if total >= 0 {
            w.sample(
                "ferry_backfill_rows_estimate",
                &[("index", &ix.name)],
                total,
            );
        }
    }
    w.family(
        "ferry_index_state",
        "gauge",
        "Pipeline state of each index: 1 for the current state, 0 for the others.",
    );
    for ix in &indexes {
        let current = ix.state();
        for st in STATES {
            w.sample(
                "ferry_index_state",
                &[("index", &ix.name), ("state", st.as_str())],
                u8::from(st == current),
            );
        }
    }
    w.single(
        "ferry_streaming",
        "gauge",
        "1 once ferry follows the replication stream.",
        u8::from(stats.streaming.load(Relaxed)),
    );
    w.single(
        "ferry_sink_up",
        "gauge",
        "1 while the search cluster answers.",
        u8::from(stats.sink_ok.load(Relaxed)),
    );
    w.out
}

/// Accumulates exposition text.
#[derive(Default)]
struct Writer {
    out: String,
}

impl Writer {
    /// `# HELP` and `# TYPE` lines of a family.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample line.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A family with one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// Escapes a label value: backslash, double quote and line feed.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Escapes help text: backslash and line feed.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{sample, NOW};

    /// The value of the sample line starting with `series` (name plus labels).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn counters_and_gauges_are_rendered() {
        let t = render_at(&sample(), NOW);
        assert_eq!(value(&t, "ferry_changes_total{op=\"insert\"}"), Some(10.0));
        assert_eq!(value(&t, "ferry_changes_total{op=\"update\"}"), Some(4.0));
        assert_eq!(value(&t, "ferry_changes_total{op=\"delete\"}"), Some(1.0));
        assert_eq!(value(&t, "ferry_transactions_total"), Some(7.0));
        assert_eq!(
            value(
                &t,
                "ferry_documents_total{index=\"users\",result=\"written\"}"
            ),
            Some(12.0)
        );
        assert_eq!(
            value(
                &t,
                "ferry_documents_total{index=\"users\",result=\"superseded\"}"
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &t,
                "ferry_documents_total{index=\"orders\",result=\"rejected\"}"
            ),
            Some(0.0)
        );
        assert_eq!(
            value(&t, "ferry_dead_letters_total{index=\"users\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "ferry_bulk_requests_total{class=\"2xx\"}"),
            Some(3.0)
        );
        assert_eq!(value(&t, "ferry_retries_total"), Some(2.0));
        assert_eq!(value(&t, "ferry_reconnects_total"), Some(1.0));
        assert_eq!(value(&t, "ferry_queue_depth"), Some(5.0));
        assert_eq!(value(&t, "ferry_confirmed_lsn"), Some(4_294_967_552.0));
        assert_eq!(value(&t, "ferry_replication_lag_bytes"), Some(128.0));
        assert_eq!(value(&t, "ferry_replication_lag_seconds"), Some(2.5));
        assert_eq!(
            value(&t, "ferry_backfill_rows{index=\"orders\"}"),
            Some(5.0)
        );
        assert_eq!(
            value(&t, "ferry_backfill_rows_estimate{index=\"users\"}"),
            Some(120.0)
        );
        // Unknown estimate: no sample rather than -1.
        assert_eq!(
            value(&t, "ferry_backfill_rows_estimate{index=\"orders\"}"),
            None
        );
        assert_eq!(
            value(&t, "ferry_index_state{index=\"users\",state=\"streaming\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                "ferry_index_state{index=\"users\",state=\"backfilling\"}"
            ),
            Some(0.0)
        );
        assert_eq!(
            value(
                &t,
                "ferry_index_state{index=\"orders\",state=\"backfilling\"}"
            ),
            Some(1.0)
        );
        assert_eq!(value(&t, "ferry_streaming"), Some(1.0));
        assert_eq!(value(&t, "ferry_sink_up"), Some(1.0));
    }

    #[test]
    fn flush_histogram_is_cumulative() {
        let t = render_at(&sample(), NOW);
        let b = |le: &str| {
            value(
                &t,
                &format!("ferry_flush_duration_seconds_bucket{{le=\"{le}\"}}"),
            )
        };
        assert_eq!(b("0.005"), Some(1.0));
        assert_eq!(b("0.025"), Some(1.0));
        assert_eq!(b("0.05"), Some(2.0));
        assert_eq!(b("2.5"), Some(2.0));
        assert_eq!(b("+Inf"), Some(3.0));
        assert_eq!(value(&t, "ferry_flush_duration_seconds_count"), Some(3.0));
        assert_eq!(value(&t, "ferry_flush_duration_seconds_sum"), Some(4.033));
        assert_eq!(value(&t, "ferry_flush_batch_documents_sum"), Some(60.0));
        assert_eq!(value(&t, "ferry_flush_batch_documents_count"), Some(3.0));
        let buckets = t
            .lines()
            .filter(|l| l.starts_with("ferry_flush_duration_seconds_bucket"))
            .count();
        assert_eq!(buckets, FLUSH_BUCKETS_MS.len() + 1);
    }

    #[test]
    fn exposition_is_well_formed() {
        let t = render_at(&sample(), NOW);
        let mut typed = std::collections::HashSet::new();
        for line in t.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("type line");
                assert!(
                    ["counter", "gauge", "histogram", "summary"].contains(&kind),
                    "{line}"
                );
                assert!(
                    typed.insert(name.to_string()),
                    "family {name} declared twice"
                );
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "{name}");
                }
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            // Every sample belongs to a declared family and has a numeric value.
            let (series, v) = line.rsplit_once(' ').expect("sample line");
            let name = series.split('{').next().unwrap_or_default();
            assert!(name.starts_with("ferry_"), "{line}");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                .unwrap_or(name);
            assert!(typed.contains(family), "undeclared family in {line}");
            assert!(v.parse::<f64>().is_ok(), "{line}");
        }
        assert!(t.ends_with('\n'));
    }

    #[test]
    fn empty_stats_render_without_samples_per_index() {
        let t = render_at(&Stats::default(), NOW);
        assert!(t.contains("# TYPE ferry_documents_total counter"));
        assert!(!t.contains("ferry_documents_total{"));
        assert_eq!(value(&t, "ferry_replication_lag_seconds"), Some(0.0));
        assert_eq!(value(&t, "ferry_streaming"), Some(0.0));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_help("x\\y\nz"), "x\\\\y\\nz");
    }
}
