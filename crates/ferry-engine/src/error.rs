//! Engine errors, and the one place that decides what the restart loop
//! does about each: [`EngineError::disposition`].

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

/// What the restart loop does about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Rebuild the pipeline after a backoff; it may succeed on its own.
    Retry,
    /// Another consumer holds the slot: wait as a standby and poll it.
    Standby,
    /// Stop: an operator must act, and the message says how.
    Operator,
    /// Stop: nothing ferry or an operator's setting change can do here
    /// (a server error, an undecodable stream, an unexpected answer).
    Fatal,
}

impl EngineError {
    /// Decides, from the error's variant alone, what happens next.
    pub fn disposition(&self) -> Disposition {
        match self {
            EngineError::Source(e) => match e {
                SourceError::Unavailable { .. } => Disposition::Retry,
                SourceError::SlotBusy(_) => Disposition::Standby,
                SourceError::Operator(_)
                | SourceError::SlotDropped { .. }
                | SourceError::SlotInvalidated { .. }
                | SourceError::AuthFailed { .. }
                | SourceError::ReplicationDenied { .. }
                | SourceError::PublicationLost(_)
                | SourceError::RowSecurity(_) => Disposition::Operator,
                SourceError::Server { .. } | SourceError::Decode(_) => Disposition::Fatal,
            },
            EngineError::Sink(e) => match e {
                SinkError::Unreachable { .. } => Disposition::Retry,
                SinkError::Status { status, .. } if ferry_opensearch::is_transient(*status) => {
                    Disposition::Retry
                }
                SinkError::Poison { .. } | SinkError::Conflict(_) => Disposition::Operator,
                SinkError::Status { .. } | SinkError::Protocol { .. } => Disposition::Fatal,
            },
            EngineError::Stream(_) => Disposition::Fatal,
            EngineError::Restart(_) => Disposition::Retry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink_status(status: u16) -> EngineError {
        EngineError::Sink(SinkError::Status {
            status,
            what: "POST /_bulk".into(),
            body: String::new(),
        })
    }

    #[test]
    fn every_error_kind_has_one_disposition() {
        let src = |e: SourceError| EngineError::Source(e).disposition();
        let detail = || ("streaming".to_string(), "x".to_string());
        assert_eq!(
            src(SourceError::Unavailable {
                what: "w".into(),
                reason: "r".into()
            }),
            Disposition::Retry
        );
        assert_eq!(src(SourceError::SlotBusy("x".into())), Disposition::Standby);
        let (what, detail_text) = detail();
        assert_eq!(
            src(SourceError::SlotDropped {
                what,
                detail: detail_text
            }),
            Disposition::Operator
        );
        let (what, detail_text) = detail();
        assert_eq!(
            src(SourceError::SlotInvalidated {
                what,
                detail: detail_text
            }),
            Disposition::Operator
        );
        let (what, detail_text) = detail();
        assert_eq!(
            src(SourceError::AuthFailed {
                what,
                detail: detail_text
            }),
            Disposition::Operator
        );
        assert_eq!(
            src(SourceError::PublicationLost(ferry_postgres::Uncovered {
                publication: "p".into(),
                table: "public.t".into()
            })),
            Disposition::Operator
        );
        assert_eq!(
            src(SourceError::RowSecurity(ferry_postgres::RowSecurityHides {
                table: "public.t".into(),
                table_sql: "public.t".into(),
                role: "r".into(),
                role_sql: "r".into(),
                forced: false,
            })),
            Disposition::Operator
        );
        assert_eq!(
            src(SourceError::Server {
                what: "w".into(),
                code: "XX000".into(),
                message: "m".into()
            }),
            Disposition::Fatal
        );
        assert_eq!(sink_status(503).disposition(), Disposition::Retry);
        assert_eq!(sink_status(429).disposition(), Disposition::Retry);
        assert_eq!(sink_status(400).disposition(), Disposition::Fatal);
        assert_eq!(
            EngineError::Sink(SinkError::Unreachable {
                url: "u".into(),
                reason: "r".into()
            })
            .disposition(),
            Disposition::Retry
        );
        assert_eq!(
            EngineError::Restart("r".into()).disposition(),
            Disposition::Retry
        );
        assert_eq!(
            EngineError::Stream("s".into()).disposition(),
            Disposition::Fatal
        );
    }
}
