//! Source errors, classified where they enter.

/// A failure on the PostgreSQL side.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The database is unreachable or the session broke; retry with backoff.
    #[error("PostgreSQL is unavailable while {what}: {reason}")]
    Unavailable {
        /// What ferry was doing.
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// Another session (typically the active ferry) holds the slot: wait as a standby.
    #[error(
        "replication slot is in use by another consumer ({0}); waiting as a standby to take over"
    )]
    SlotBusy(String),
    /// Something only an operator can fix; the message says how.
    #[error("{0}")]
    Operator(String),
    /// A server error that retrying will not fix.
    #[error("PostgreSQL error while {what}: {message} (SQLSTATE {code})")]
    Server {
        /// What ferry was doing.
        what: String,
        /// SQLSTATE.
        code: String,
        /// Server message.
        message: String,
    },
    /// The publication stopped covering a table an index reads, so its
    /// changes are no longer streamed.
    #[error(
        "publication {:?} no longer covers table {}, so its changes are not streamed: \
         add it back (ALTER PUBLICATION … ADD TABLE {}, or restart ferry, which extends the publication) \
         and run `ferry reindex` for the indexes that read it, since changes made meanwhile were missed",
        .0.publication, .0.table, .0.table
    )]
    PublicationLost(crate::Uncovered),
    /// The replication stream carried bytes ferry could not decode.
    #[error("cannot decode the replication stream: {0}")]
    Decode(#[from] crate::pgoutput::DecodeError),
}

impl SourceError {
    /// True when retrying later may succeed without anyone's help.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SourceError::Unavailable { .. } | SourceError::SlotBusy(_)
        )
    }

    /// Classifies a tokio-postgres error by SQLSTATE.
    pub fn from_pg(what: &str, e: tokio_postgres::Error) -> SourceError {
        let Some(db) = e.as_db_error() else {
            return SourceError::Unavailable {
                what: what.to_string(),
                reason: chain(&e),
            };
        };
        classify(what, db.code().code(), db.message())
    }

    /// Classifies a replication-session error.
    pub fn from_replication(what: &str, e: pgwire_replication::PgWireError) -> SourceError {
        let text = e.to_string();
        // The library reports server errors as text that starts with the SQLSTATE
        // in some versions; look for the well-known ones.
        if text.contains("55006") || text.contains("is active for PID") {
            return SourceError::SlotBusy(text);
        }
        if text.contains("does not exist") && text.contains("replication slot") {
            return SourceError::Operator(format!(
                "{what}: {text}; the slot was dropped: restart ferry to recreate it and re-seed the indexes"
            ));
        }
        if text.contains("can no longer get changes") || text.contains("has been invalidated") {
            return SourceError::Operator(format!(
                "{what}: {text}; the slot was invalidated (max_slot_wal_keep_size?): drop it (ferry recreates it and re-seeds the indexes)"
            ));
        }
        if text.contains("28P01")
            || text.contains("28000")
            || text.contains("password authentication")
        {
            return SourceError::Operator(format!("{what}: {text}"));
        }
        if text.contains("42501")
            || text.contains("must be superuser or replication role")
            || text.contains("permission denied")
        {
            return SourceError::Operator(format!(
                "{what}: {text}; grant it with ALTER ROLE <user> REPLICATION"
            ));
        }
        SourceError::Unavailable {
            what: what.to_string(),
            reason: text,
        }
    }
}

fn classify(what: &str, code: &str, message: &str) -> SourceError {
    let what_s = what.to_string();
    let retry = code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("40")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "55006" | "55P03" | "57014"
        );
    if retry {
        return SourceError::Unavailable {
            what: what_s,
            reason: format!("{message} (SQLSTATE {code})"),
        };
    }
    let hint = match code {
        "3D000" => Some("the database does not exist: fix the database name in source.url"),
        "28P01" | "28000" => Some("authentication failed: fix the user or password in source.url"),
        "42501" => Some("insufficient privilege: grant the role what the message names"),
        "42P01" => Some("a table does not exist: fix the [[index]] table"),
        _ => None,
    };
    match hint {
        Some(h) => SourceError::Operator(format!("{what}: {message} (SQLSTATE {code}); {h}")),
        None => SourceError::Server {
            what: what_s,
            code: code.to_string(),
            message: message.to_string(),
        },
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
