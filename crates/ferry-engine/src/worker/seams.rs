//! The worker's two seams. The worker owns the rules (what to write, when a
//! position may be confirmed); these traits own the I/O. The real
//! implementations are in `adapters.rs`; the unit tests use in-memory fakes.

use std::collections::HashSet;
use std::future::Future;

use ferry_core::plan::Probe;
use ferry_core::{DocWrite, Lsn};
use ferry_opensearch::{BulkOutcome, DeadLetter, SinkError};

use crate::EngineError;

/// Where documents become durable.
///
/// Contract: at-least-once and idempotent — every write carries its
/// version, and a write older than the stored document must not replace it.
pub trait DocSink: Clone + Send + Sync + 'static {
    /// Makes `writes` durable, retrying transient failures itself. Each
    /// write's `index` is its index's position (`IndexId`); which concrete
    /// indexes that means (see `Target`) is the sink's business. `Err`
    /// means nothing may be assumed durable; `Ok` means every write is
    /// durable except those listed in `rejected` (refused for good).
    /// Called once per batch, in stream order, and again for poison
    /// documents rebuilt from their rows.
    fn write(
        &self,
        writes: &[DocWrite],
    ) -> impl Future<Output = Result<BulkOutcome, SinkError>> + Send;

    /// Stores `letters` (each with its index's position) durably; called
    /// before the batch holding their documents is confirmed.
    fn store_dead_letters(
        &self,
        letters: &[(usize, DeadLetter)],
    ) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// Where documents built by query come from: the source's current rows.
///
/// Contract: answers reflect at least every transaction the worker has
/// read so far (the worker versions the results with the newest one).
pub trait RowSource: Send {
    /// Root keys of index `index` whose documents `values` select through
    /// `probe`. Called once per probe per batch, before [`RowSource::build`].
    fn resolve(
        &mut self,
        index: usize,
        probe: &Probe,
        values: HashSet<String>,
    ) -> impl Future<Output = Result<Vec<Vec<String>>, EngineError>> + Send;

    /// Appends to `out` the documents of these roots of index `index`,
    /// versioned `version`; roots gone (or filtered out) become deletes.
    /// Called with at most 1,000 keys per call, per batch and to rebuild
    /// poison documents.
    fn build(
        &mut self,
        index: usize,
        keys: &[Vec<String>],
        version: Lsn,
        out: &mut Vec<DocWrite>,
    ) -> impl Future<Output = Result<(), EngineError>> + Send;
}
