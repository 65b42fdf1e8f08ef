//! Throwaway local servers: a private PostgreSQL cluster built with `initdb`
//! + `pg_ctl`, and an in-memory `osmem-server` standing in for OpenSearch.
//!
//! `ferry demo` runs on these, and `ferry-testkit` re-exports them for the
//! tests, so the production binary links only this small crate and not the
//! test kit. Every server is stopped and its files removed on `Drop`,
//! including when the owner panics.

#![warn(missing_docs)]

mod error;
mod osmem;
mod pg;
pub mod process;

pub use error::{LaunchError, Result};
pub use osmem::Osmem;
pub use pg::{PgCluster, PgOptions};
pub use process::try_free_port;
