//! Keeps the cluster's reachability current while the pipeline runs, even
//! when no change needs writing: `/readyz` must turn not-ready within
//! seconds of the cluster going away, not at the next bulk request.

use std::time::Duration;

use ferry_opensearch::Sink;

/// How often the cluster is asked `GET /` while the pipeline runs.
pub const SINK_PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// A probe unanswered this long counts as the cluster unreachable.
pub const SINK_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Probes every sink at once, each every [`SINK_PROBE_INTERVAL`], until
/// aborted.
pub async fn probe_sinks(sinks: Vec<Sink>) {
    futures_util::future::join_all(sinks.into_iter().map(probe_sink)).await;
}

/// Probes one cluster every [`SINK_PROBE_INTERVAL`] until aborted. The
/// sink (observed by the run's stats) records each answer or failure; a
/// probe that outlives [`SINK_PROBE_TIMEOUT`] is recorded as unreachable
/// here.
async fn probe_sink(sink: Sink) {
    let mut every = tokio::time::interval(SINK_PROBE_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match tokio::time::timeout(SINK_PROBE_TIMEOUT, sink.version()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(sink = %sink.url(), error = %e, "the search cluster failed a health probe")
            }
            Err(_) => {
                tracing::debug!(sink = %sink.url(), "the search cluster did not answer a health probe within 5 s");
                sink.report_unreachable();
            }
        }
    }
}
