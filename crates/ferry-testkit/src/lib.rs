//! Test fixtures for ferry: throwaway PostgreSQL clusters and OpenSearch
//! endpoints (an in-memory `osmem-server`, or a real cluster chosen through
//! the environment).
//!
//! Everything here cleans up after itself on `Drop`, including when a test
//! panics, so fixtures can be created freely inside tests.

#![warn(missing_docs)]

mod error;
mod osmem;
mod pg;
mod sink;
mod util;

pub use error::{Result, TestkitError};
pub use osmem::Osmem;
pub use pg::{PgCluster, PgOptions};
pub use sink::TestSink;
pub use util::{free_port, try_free_port};
