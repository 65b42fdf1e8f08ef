//! ferry's vocabulary, free of I/O: log positions, value rendering, table
//! shapes and the document operations the engine hands to a sink.
//!
//! Everything here is synchronous and deterministic so it can be unit- and
//! property-tested without a database or a search cluster.

pub mod ack;
pub mod backoff;
pub mod change;
pub mod copytext;
pub mod doc;
pub mod lsn;
pub mod plan;
pub mod schema;
pub mod stats;
pub mod value;

pub use doc::{DocOp, DocWrite};
pub use lsn::Lsn;
pub use schema::{ColumnShape, TableShape};
pub use value::TypeKind;

/// The `tracing` target of the pipeline's trace spans (`batch`, `resolve`,
/// `build`, `flush`), which `[telemetry]` exports over OTLP.
pub const PIPELINE_TARGET: &str = "ferry::pipeline";
