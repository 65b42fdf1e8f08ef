//! Test fixtures for ferry: throwaway PostgreSQL clusters and OpenSearch
//! endpoints (an in-memory `osmem-server`, or a real cluster chosen through
//! the environment). The PostgreSQL and osmem-server launchers live in
//! `ferry-throwaway` (so `ferry demo` can use them without this crate) and
//! are re-exported here unchanged.
//!
//! Everything here cleans up after itself on `Drop`, including when a test
//! panics, so fixtures can be created freely inside tests.

#![warn(missing_docs)]

mod engine;
mod error;
pub mod fastsink;
pub mod faultproxy;
pub mod relational;
mod sink;
mod util;

pub use engine::{
    EngineChoice, NodeOptions, Product, SearchNode, DEFAULT_ELASTICSEARCH_VERSION,
    DEFAULT_OPENSEARCH_VERSION,
};
pub use error::{Result, TestkitError};
pub use fastsink::FastSink;
pub use faultproxy::{Fault, FaultProxy};
pub use ferry_throwaway::{try_free_port, LaunchError, Osmem, PgCluster, PgOptions};
pub use sink::TestSink;
pub use util::free_port;
