//! Where ferry writes during a workload: the in-process FastSink double
//! (`--sink fast`, the default) or the real OpenSearch node the bench
//! started (`--sink opensearch`). The convergence checks read either one
//! through [`Sink`].

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use ferry_testkit::fastsink::FastSinkStats;
use ferry_testkit::FastSink;

use crate::opensearch::Node;

/// The `--sink` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkChoice {
    /// FastSink, the in-process bulk-API double: shows ferry's own limits.
    Fast,
    /// A real OpenSearch node started by the bench (through the test kit).
    Opensearch,
}

/// The sink of one workload.
pub enum Sink {
    /// A FastSink of its own.
    Fast(FastSink),
    /// The node shared by the whole run (emptied before each workload).
    Node(Arc<Node>),
}

impl Sink {
    /// The URL ferry is configured with.
    pub fn url(&self) -> &str {
        match self {
            Sink::Fast(s) => s.url(),
            Sink::Node(n) => n.url(),
        }
    }

    /// The FastSink, for what only it can tell (arrival times, per-request
    /// counters); workloads that need it are refused with `--sink opensearch`.
    pub fn fast(&self) -> Result<&FastSink> {
        match self {
            Sink::Fast(s) => Ok(s),
            Sink::Node(_) => bail!("this workload needs FastSink (run it with --sink fast)"),
        }
    }

    /// The node, when the sink is one.
    pub fn node(&self) -> Option<&Arc<Node>> {
        match self {
            Sink::Fast(_) => None,
            Sink::Node(n) => Some(n),
        }
    }

    /// FastSink's request counters (`None` on the node).
    pub fn stats(&self) -> Option<FastSinkStats> {
        match self {
            Sink::Fast(s) => Some(s.stats()),
            Sink::Node(_) => None,
        }
    }

    /// When the latest write of `id` arrived, if the sink records it.
    pub fn last_write(&self, index: &str, id: &str) -> Option<Instant> {
        match self {
            Sink::Fast(s) => s.last_write(index, id),
            Sink::Node(_) => None,
        }
    }

    /// Documents of `index` once every acknowledged write counts (the node
    /// is refreshed first: for checks, not for timed phases).
    pub async fn settled_count(&self, index: &str) -> Result<usize> {
        match self {
            Sink::Fast(s) => Ok(s.doc_count(index)),
            Sink::Node(n) => n.settled_count(index).await,
        }
    }

    /// A document's version and source bytes.
    pub async fn get(&self, index: &str, id: &str) -> Result<Option<(u64, Vec<u8>)>> {
        match self {
            Sink::Fast(s) => Ok(s.get(index, id)),
            Sink::Node(n) => n.get(index, id).await,
        }
    }

    /// Every document id of `index`.
    pub async fn ids(&self, index: &str) -> Result<Vec<String>> {
        match self {
            Sink::Fast(s) => Ok(s.ids(index)),
            Sink::Node(n) => n.ids(index).await,
        }
    }
}
