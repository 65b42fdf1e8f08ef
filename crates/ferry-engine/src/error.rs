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
    /// The replication slot was lost and `source.on_slot_lost = "stop"`.
    #[error(
        "{cause}. ferry stops because source.on_slot_lost = \"stop\" and leaves every index as it is: \
         to recreate replication slot {slot:?} and rebuild every index beside the one searches use, \
         start ferry with source.on_slot_lost = \"reseed\" (or FERRY_SOURCE__ON_SLOT_LOST=reseed)"
    )]
    SlotLost {
        /// The slot's name.
        slot: String,
        /// How it was found lost.
        cause: Box<EngineError>,
    },
}

/// The process exit code of a run that ended because the replication slot
/// was lost under `source.on_slot_lost = "stop"`.
pub const EXIT_SLOT_LOST: u8 = 3;

/// What the restart loop does about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Rebuild the pipeline after a backoff; it may succeed on its own.
    Retry,
    /// Another consumer holds the slot: wait as a standby and poll it.
    Standby,
    /// Stop: an operator must act, and the message says how.
    Operator,
    /// The replication slot is gone (dropped or invalidated) and changes
    /// were missed: `source.on_slot_lost` decides (reseed beside, or stop).
    SlotLost,
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
                SourceError::SlotDropped { .. } | SourceError::SlotInvalidated { .. } => {
                    Disposition::SlotLost
                }
                SourceError::Operator(_)
                | SourceError::AuthFailed { .. }
                | SourceError::ReplicationDenied { .. }
                | SourceError::PublicationLost(_)
                | SourceError::RowSecurity(_) => Disposition::Operator,
                SourceError::Server { .. } | SourceError::Decode(_) => Disposition::Fatal,
            },
            EngineError::Sink(e) => match e {
                SinkError::Unreachable { .. } | SinkError::Log { retry: true, .. } => {
                    Disposition::Retry
                }
                SinkError::Log { retry: false, .. } => Disposition::Operator,
                SinkError::Status { status, .. } if ferry_opensearch::is_transient(*status) => {
                    Disposition::Retry
                }
                SinkError::Poison { .. } | SinkError::Conflict(_) | SinkError::Refused { .. } => {
                    Disposition::Operator
                }
                // Credentials or privileges refused for the whole request.
                SinkError::Status {
                    status: 401 | 403, ..
                } => Disposition::Operator,
                SinkError::Status { .. } | SinkError::Protocol { .. } => Disposition::Fatal,
            },
            EngineError::Stream(_) => Disposition::Fatal,
            EngineError::Restart(_) => Disposition::Retry,
            EngineError::SlotLost { .. } => Disposition::Operator,
        }
    }

    /// The process exit code for a run that ended with this error:
    /// [`EXIT_SLOT_LOST`] for a lost slot under `on_slot_lost = "stop"`, else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            EngineError::SlotLost { .. } => EXIT_SLOT_LOST,
            _ => 1,
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
            Disposition::SlotLost
        );
        let (what, detail_text) = detail();
        assert_eq!(
            src(SourceError::SlotInvalidated {
                what,
                detail: detail_text
            }),
            Disposition::SlotLost
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
        assert_eq!(sink_status(401).disposition(), Disposition::Operator);
        let log = |retry| {
            EngineError::Sink(SinkError::Log {
                log: "file:///var/lib/ferry/x.ndjson".into(),
                reason: "cannot append to it".into(),
                retry,
            })
            .disposition()
        };
        assert_eq!(log(true), Disposition::Retry, "a full disk is waited out");
        assert_eq!(
            log(false),
            Disposition::Operator,
            "a missing directory is not"
        );
        assert_eq!(sink_status(403).disposition(), Disposition::Operator);
        assert_eq!(
            EngineError::Sink(SinkError::Refused {
                index: "users-1".into(),
                id: "7".into(),
                status: 403,
                reason: "cluster_block_exception: blocked".into(),
            })
            .disposition(),
            Disposition::Operator
        );
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
        let lost = EngineError::SlotLost {
            slot: "ferry_app".into(),
            cause: Box::new(EngineError::Source(SourceError::SlotDropped {
                what: "streaming".into(),
                detail: "gone".into(),
            })),
        };
        assert_eq!(lost.disposition(), Disposition::Operator);
        assert_eq!(lost.exit_code(), EXIT_SLOT_LOST);
        let text = lost.to_string();
        assert!(
            text.contains("\"ferry_app\"") && text.contains("source.on_slot_lost"),
            "{text}"
        );
    }
}
