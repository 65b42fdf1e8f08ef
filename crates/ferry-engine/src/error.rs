//! Engine errors: a source or sink error, classified for the restart loop.

use ferry_opensearch::SinkError;
use ferry_postgres::SourceError;

/// Why the pipeline stopped.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A PostgreSQL-side failure.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// An OpenSearch-side failure.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The stream carried something the engine cannot apply; the message says what.
    #[error("{0}")]
    Stream(String),
    /// The pipeline must start again to apply a change (e.g. a table's shape).
    #[error("{0}")]
    Restart(String),
}

impl EngineError {
    /// True when rebuilding the pipeline later may succeed on its own.
    pub fn is_retryable(&self) -> bool {
        match self {
            EngineError::Source(e) => e.is_retryable(),
            EngineError::Sink(e) => e.is_retryable(),
            EngineError::Stream(_) => false,
            EngineError::Restart(_) => true,
        }
    }
}
