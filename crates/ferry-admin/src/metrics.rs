//! `/metrics`: the [`Stats`] in Prometheus text exposition format 0.0.4,
//! encoded by `prometheus-client`.
//!
//! The engine counts in `ferry-core`'s atomics, which know nothing about
//! Prometheus; a [`Collector`] reads them at every scrape. Names follow
//! `ferry_<noun>_<unit>[_total]` (the library appends `_total` to counters).
//! Labels are index names, operations and states only; their cardinality is
//! bounded by the config.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use ferry_core::stats::{IndexState, IndexStats, Stats, BATCH_BUCKETS, FLUSH_BUCKETS_MS};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
    MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::HealthLimits;

/// The `Content-Type` of the exposition served at `/metrics`.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// A Prometheus registry over one process's [`Stats`].
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// The registry that reads `stats` at every scrape; `limits` decide
    /// `ferry_ready` and `ferry_healthy` as they do `/readyz` and `/healthz`.
    pub fn new(stats: Arc<Stats>, limits: HealthLimits) -> Metrics {
        Metrics::with_clock(stats, limits, crate::now_pg_micros)
    }

    /// As [`Metrics::new`], with `now` giving µs since 2000-01-01 (for the lag).
    pub(crate) fn with_clock(stats: Arc<Stats>, limits: HealthLimits, now: fn() -> i64) -> Metrics {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(StatsCollector { stats, limits, now }));
        Metrics { registry }
    }

    /// Every metric as Prometheus text (format 0.0.4), as of now.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_text::encode(&mut out, &self.registry) {
            // Writing to a String fails only if an encoder refused a value.
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        out
    }
}

/// Reads [`Stats`] into metric families when scraped.
#[derive(Debug)]
struct StatsCollector {
    stats: Arc<Stats>,
    limits: HealthLimits,
    now: fn() -> i64,
}

impl Collector for StatsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = &*self.stats;
        let indexes = s.indexes.lock().map(|g| g.clone()).unwrap_or_default();

        let ops = ["insert", "update", "delete"].iter().zip(&s.changes);
        family(
            &mut enc,
            "ferry_changes",
            "Row changes received from PostgreSQL, by operation.",
            MetricType::Counter,
            ops.map(|(op, v)| ([("op", *op)], counter(v.load(Relaxed)))),
        )?;
        let tables = s.tables();
        let per_table = tables.iter().flat_map(|t| {
            ["insert", "update", "delete"]
                .iter()
                .zip(&t.changes)
                .map(|(op, v)| {
                    let labels = [("table", t.name.as_str()), ("op", *op)];
                    (labels, counter(v.load(Relaxed)))
                })
        });
        family(
            &mut enc,
            "ferry_table_changes",
            "Row changes received from PostgreSQL, by table (schema.table) and operation.",
            MetricType::Counter,
            per_table,
        )?;
        single(
            &mut enc,
            "ferry_transactions",
            "Transactions received from PostgreSQL.",
            counter(s.transactions.load(Relaxed)),
        )?;

        let documents = indexes.iter().flat_map(|ix| {
            [
                ("written", &ix.docs_written),
                ("deleted", &ix.docs_deleted),
                ("superseded", &ix.docs_superseded),
                ("rejected", &ix.docs_rejected),
            ]
            .map(|(result, v)| {
                let mut labels = index_labels(ix);
                labels.push(("result", result));
                (labels, counter(v.load(Relaxed)))
            })
        });
        family(
            &mut enc,
            "ferry_documents",
            "Document writes acknowledged by the search cluster, by index and result.",
            MetricType::Counter,
            documents,
        )?;
        family(
            &mut enc,
            "ferry_dead_letters",
            "Rejected documents stored as dead letters, by index.",
            MetricType::Counter,
            indexes.iter().map(|ix| {
                let v = ix.dead_letters.load(Relaxed);
                (index_labels(ix), counter(v))
            }),
        )?;

        let classes = ["2xx", "4xx", "5xx"].iter().zip(&s.bulk_requests);
        family(
            &mut enc,
            "ferry_bulk_requests",
            "Bulk requests sent to the search cluster, retries included, by response class (no answer at all counts as 5xx).",
            MetricType::Counter,
            classes.map(|(class, v)| ([("class", *class)], counter(v.load(Relaxed)))),
        )?;
        single(
            &mut enc,
            "ferry_retries",
            "Bulk requests sent again after a transient failure (the whole request, or the items the cluster asked to retry).",
            counter(s.retries.load(Relaxed)),
        )?;
        single(
            &mut enc,
            "ferry_sql_statements",
            "SQL statements the worker issued to build or resolve documents.",
            counter(s.sql_statements.load(Relaxed)),
        )?;
        single(
            &mut enc,
            "ferry_reconnects",
            "Pipeline restarts after a retryable failure.",
            counter(s.reconnects.load(Relaxed)),
        )?;
        single(
            &mut enc,
            "ferry_restarts_requested",
            "Pipeline restarts ferry asked for itself (a rebuild to start, a table's new shape); not failures.",
            counter(s.restarts_requested.load(Relaxed)),
        )?;
        single(
            &mut enc,
            "ferry_queue_depth",
            "Changes waiting between capture and the worker.",
            gauge(s.queue_depth()),
        )?;

        single(
            &mut enc,
            "ferry_confirmed_lsn",
            "WAL position confirmed to PostgreSQL (everything before it is durable in the index).",
            gauge(s.confirmed_lsn.load(Relaxed)),
        )?;
        single(
            &mut enc,
            "ferry_received_lsn",
            "Highest commit WAL position received from PostgreSQL.",
            gauge(s.received_lsn.load(Relaxed)),
        )?;
        let lag = crate::lag(s, (self.now)());
        single(
            &mut enc,
            "ferry_replication_lag_bytes",
            "Received minus confirmed WAL position, in bytes.",
            gauge(lag.bytes),
        )?;
        single(
            &mut enc,
            "ferry_replication_lag_seconds",
            "Seconds since the commit of the oldest transaction received and not yet confirmed; 0 when caught up.",
            gauge(lag.seconds),
        )?;

        single(
            &mut enc,
            "ferry_flush_duration_seconds",
            "Time to write one batch to the search cluster.",
            flush_durations(s),
        )?;
        single(
            &mut enc,
            "ferry_flush_batch_documents",
            "Document writes per flushed batch.",
            batch_sizes(s),
        )?;

        family(
            &mut enc,
            "ferry_backfill_rows",
            "Rows copied by the backfill of each index.",
            MetricType::Gauge,
            indexes.iter().map(|ix| {
                let v = ix.backfill_rows.load(Relaxed);
                (index_labels(ix), gauge(v))
            }),
        )?;
        family(
            &mut enc,
            "ferry_backfill_rows_estimate",
            "PostgreSQL's row estimate for each backfill (absent while unknown).",
            MetricType::Gauge,
            indexes.iter().filter_map(|ix| {
                let total = ix.backfill_total.load(Relaxed);
                (total >= 0).then(|| (index_labels(ix), gauge(total)))
            }),
        )?;
        let states = indexes.iter().flat_map(|ix| {
            let current = ix.state();
            IndexState::ALL.map(|st| {
                let mut labels = index_labels(ix);
                labels.push(("state", st.as_str()));
                (labels, gauge(u32::from(st == current)))
            })
        });
        family(
            &mut enc,
            "ferry_index_state",
            "Pipeline state of each index: 1 for the current state, 0 for the others.",
            MetricType::Gauge,
            states,
        )?;
        single(
            &mut enc,
            "ferry_streaming",
            "1 once ferry follows the replication stream.",
            gauge(u32::from(s.streaming.load(Relaxed))),
        )?;
        single(
            &mut enc,
            "ferry_sink_up",
            "1 while the search cluster answers HTTP requests (with named sinks: while every sink does).",
            gauge(u32::from(s.sink_ok.load(Relaxed))),
        )?;
        let now = ferry_core::stats::mono_us();
        let sinks = s.sinks();
        family(
            &mut enc,
            "ferry_named_sink_up",
            "1 while the named sink ([sink.NAME]) answers; ferry_sink_up is 1 only when every sink does.",
            MetricType::Gauge,
            sinks
                .iter()
                .map(|k| ([("sink", k.name.as_str())], gauge(u32::from(k.ok.load(Relaxed))))),
        )?;
        family(
            &mut enc,
            "ferry_named_sink_failing_seconds",
            "Seconds the named sink's bulk writes have failed in a row (the slot holds its position meanwhile); 0 when not failing.",
            MetricType::Gauge,
            sinks.iter().map(|k| {
                let secs = k.failing_for(now).map_or(0.0, |d| d.as_secs_f64());
                ([("sink", k.name.as_str())], gauge(secs))
            }),
        )?;
        single(
            &mut enc,
            "ferry_source_up",
            "1 once PostgreSQL was reached, 0 after the pipeline failed because it was unreachable.",
            gauge(u32::from(s.source_ok.load(Relaxed))),
        )?;
        single(
            &mut enc,
            "ferry_standby",
            "1 while another consumer holds the replication slot and this ferry waits to take over.",
            gauge(u32::from(s.standby.load(Relaxed))),
        )?;
        let mono = ferry_core::stats::mono_us();
        single(
            &mut enc,
            "ferry_ready",
            "1 while /readyz answers 200 (streaming, source and cluster reachable, bulk writes not failing, not a standby).",
            gauge(u32::from(crate::readiness(s, &self.limits, mono).is_ok())),
        )?;
        single(
            &mut enc,
            "ferry_healthy",
            "1 while /healthz answers 200 (no work pending without progress beyond admin.stall_timeout_secs).",
            gauge(u32::from(crate::liveness(s, &self.limits, mono).is_ok())),
        )?;
        single(
            &mut enc,
            "ferry_stalled_seconds",
            "Seconds work has been pending without progress; 0 when nothing is pending.",
            gauge(s.stalled_for(mono).map_or(0.0, |d| d.as_secs_f64())),
        )
    }
}

/// The labels of an index's series: `index`, and `sink` with named sinks.
fn index_labels(ix: &IndexStats) -> Vec<(&'static str, &str)> {
    let mut labels = vec![("index", ix.name.as_str())];
    if let Some(sink) = &ix.sink {
        labels.push(("sink", sink.as_str()));
    }
    labels
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn gauge<N: EncodeGaugeValue>(v: N) -> ConstGauge<N> {
    ConstGauge::new(v)
}

/// A family of one unlabelled sample.
fn single<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: M,
) -> fmt::Result {
    metric.encode(enc.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// A family of labelled samples; its `# HELP` and `# TYPE` lines are written
/// even when it has no sample yet.
fn family<L, M>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result
where
    L: EncodeLabelSet,
    M: EncodeMetric,
{
    let mut encoder = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in samples {
        metric.encode(encoder.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The flush-time histogram from the per-bucket counts in [`Stats`].
fn flush_durations(s: &Stats) -> Histogram {
    let counts: Vec<u64> = s.flush_buckets.iter().map(|b| b.load(Relaxed)).collect();
    let bounds = FLUSH_BUCKETS_MS
        .iter()
        .map(|ms| *ms as f64 / 1000.0)
        .chain([f64::INFINITY]);
    Histogram {
        sum: s.flush_micros.load(Relaxed) as f64 / 1e6,
        // The total of the buckets, so that `+Inf` and `_count` agree even
        // while a flush is being recorded.
        count: counts.iter().sum(),
        buckets: bounds.zip(counts).collect(),
    }
}

/// The batch-size histogram from the per-bucket counts in [`Stats`].
fn batch_sizes(s: &Stats) -> Histogram {
    let counts: Vec<u64> = s.batch_buckets.iter().map(|b| b.load(Relaxed)).collect();
    let bounds = BATCH_BUCKETS
        .iter()
        .map(|n| *n as f64)
        .chain([f64::INFINITY]);
    Histogram {
        sum: s.flush_docs.load(Relaxed) as f64,
        count: counts.iter().sum(),
        buckets: bounds.zip(counts).collect(),
    }
}

/// A histogram whose buckets were counted elsewhere: `(upper bound, count
/// in that bucket alone)`; the encoder makes them cumulative and adds
/// `+Inf` when the last bound is finite.
#[derive(Debug, Default)]
struct Histogram {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        let no_exemplars: Option<&HashMap<usize, Exemplar<NoLabelSet, f64>>> = None;
        encoder.encode_histogram(self.sum, self.count, &self.buckets, no_exemplars)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{sample, NOW};

    fn render_at_now(stats: Stats) -> String {
        Metrics::with_clock(Arc::new(stats), HealthLimits::default(), || NOW).render()
    }

    /// The value of the sample line starting with `series` (name plus labels).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn counters_and_gauges_are_rendered() {
        let t = render_at_now(sample());
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
        assert_eq!(value(&t, "ferry_restarts_requested_total"), Some(4.0));
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
            value(&t, "ferry_index_state{index=\"users\",state=\"seeding\"}"),
            Some(0.0)
        );
        assert_eq!(
            value(&t, "ferry_index_state{index=\"orders\",state=\"seeding\"}"),
            Some(1.0)
        );
        for state in ["starting", "rebuilding", "stopped", "failed"] {
            let series = format!("ferry_index_state{{index=\"orders\",state=\"{state}\"}}");
            assert_eq!(value(&t, &series), Some(0.0), "{series}");
        }
        assert_eq!(
            value(
                &t,
                "ferry_table_changes_total{table=\"public.users\",op=\"insert\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "ferry_bulk_requests_total{class=\"5xx\"}"),
            Some(1.0)
        );
        assert_eq!(value(&t, "ferry_ready"), Some(1.0));
        assert_eq!(value(&t, "ferry_healthy"), Some(1.0));
        assert_eq!(value(&t, "ferry_standby"), Some(0.0));
        assert_eq!(value(&t, "ferry_source_up"), Some(1.0));
        assert_eq!(value(&t, "ferry_streaming"), Some(1.0));
        assert_eq!(value(&t, "ferry_sink_up"), Some(1.0));
    }

    #[test]
    fn help_and_type_lines_name_the_exported_series() {
        let t = render_at_now(sample());
        for line in [
            "# HELP ferry_changes_total Row changes received from PostgreSQL, by operation.",
            "# TYPE ferry_changes_total counter",
            "# TYPE ferry_queue_depth gauge",
            "# TYPE ferry_flush_duration_seconds histogram",
            "# HELP ferry_streaming 1 once ferry follows the replication stream.",
        ] {
            assert!(t.lines().any(|l| l == line), "no {line:?} in\n{t}");
        }
    }

    #[test]
    fn flush_histogram_is_cumulative() {
        let t = render_at_now(sample());
        let bucket = |family: &str, le: &str| value(&t, &format!("{family}_bucket{{le=\"{le}\"}}"));
        let b = |le: &str| bucket("ferry_flush_duration_seconds", le);
        assert_eq!(b("0.005"), Some(1.0));
        assert_eq!(b("0.025"), Some(1.0));
        assert_eq!(b("0.05"), Some(2.0));
        assert_eq!(b("1"), Some(2.0));
        assert_eq!(b("2.5"), Some(2.0));
        assert_eq!(b("+Inf"), Some(3.0));
        assert_eq!(value(&t, "ferry_flush_duration_seconds_count"), Some(3.0));
        assert_eq!(value(&t, "ferry_flush_duration_seconds_sum"), Some(4.033));
        assert_eq!(value(&t, "ferry_flush_batch_documents_sum"), Some(60.0));
        assert_eq!(value(&t, "ferry_flush_batch_documents_count"), Some(3.0));
        let docs = |le: &str| bucket("ferry_flush_batch_documents", le);
        // Batches of 10, 20 and 30 writes.
        assert_eq!(docs("1"), Some(0.0));
        assert_eq!(docs("10"), Some(1.0));
        assert_eq!(docs("50"), Some(3.0));
        assert_eq!(docs("+Inf"), Some(3.0));
        let buckets = t
            .lines()
            .filter(|l| l.starts_with("ferry_flush_duration_seconds_bucket"))
            .count();
        assert_eq!(buckets, FLUSH_BUCKETS_MS.len() + 1);
    }

    #[test]
    fn exposition_is_well_formed() {
        let t = render_at_now(sample());
        let mut typed = std::collections::HashSet::new();
        for line in t.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("type line");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
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
        let t = render_at_now(Stats::default());
        assert!(t.contains("# TYPE ferry_documents_total counter"));
        assert!(!t.contains("ferry_documents_total{"));
        assert_eq!(value(&t, "ferry_replication_lag_seconds"), Some(0.0));
        assert_eq!(value(&t, "ferry_streaming"), Some(0.0));
    }

    #[test]
    fn label_values_are_escaped() {
        let s = Stats::default();
        s.register(&[("we\"ird\\na\nme".into(), None)]);
        let t = render_at_now(s);
        assert!(
            t.contains("ferry_dead_letters_total{index=\"we\\\"ird\\\\na\\nme\"} 0\n"),
            "{t}"
        );
    }
}
