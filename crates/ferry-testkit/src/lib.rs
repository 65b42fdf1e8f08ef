//! Test fixtures for ferry: throwaway PostgreSQL clusters and OpenSearch
//! endpoints (an in-memory `osmem-server`, or a real cluster chosen through
//! the environment).
//!
//! Everything here cleans up after itself on `Drop`, including when a test
//! panics, so fixtures can be created freely inside tests.

#![warn(missing_docs)]

mod engine;
mod error;
pub mod fastsink;
pub mod faultproxy;
mod osmem;
mod pg;
pub mod relational;
mod sink;
mod util;

pub use engine::{EngineChoice, NodeOptions, OpenSearchNode, DEFAULT_OPENSEARCH_VERSION};
pub use error::{Result, TestkitError};
pub use fastsink::FastSink;
pub use faultproxy::{Fault, FaultProxy};
pub use osmem::Osmem;
pub use pg::{PgCluster, PgOptions};
pub use sink::TestSink;
pub use util::{free_port, try_free_port};
