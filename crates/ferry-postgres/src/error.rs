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
    /// The replication slot ferry streams from no longer exists.
    #[error("{what}: {detail}; the replication slot was dropped, so changes were missed")]
    SlotDropped {
        /// What ferry was doing.
        what: String,
        /// The server's message.
        detail: String,
    },
    /// The slot lost WAL it needed and can no longer stream.
    #[error("{what}: {detail}; the replication slot was invalidated (PostgreSQL removed WAL it still needed, see max_slot_wal_keep_size), so changes were missed")]
    SlotInvalidated {
        /// What ferry was doing.
        what: String,
        /// The server's message.
        detail: String,
    },
    /// The server refused the replication session's credentials.
    #[error("{what}: {detail}")]
    AuthFailed {
        /// What ferry was doing.
        what: String,
        /// The server's message.
        detail: String,
    },
    /// The role may not open replication sessions.
    #[error("{what}: {detail}; grant it with ALTER ROLE <user> REPLICATION")]
    ReplicationDenied {
        /// What ferry was doing.
        what: String,
        /// The server's message.
        detail: String,
    },
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
    /// Row-level security applies to ferry's role on a table an index
    /// reads: the copy would see a subset while the stream delivers every
    /// change, so the index would silently hold a subset.
    #[error(
        "table {} has row-level security that applies to role {} (not its owner, not superuser, no BYPASSRLS{}), \
         so ferry's copy would silently miss the rows its policies hide: run `ALTER ROLE {} BYPASSRLS;`, \
         or grant the role every row with `CREATE POLICY ferry_reads_all ON {} FOR SELECT TO {} USING (true);`",
        .0.table, .0.role, if .0.forced { "; FORCE ROW LEVEL SECURITY is set" } else { "" },
        .0.role_sql, .0.table_sql, .0.role_sql
    )]
    RowSecurity(crate::RowSecurityHides),
    /// The replication stream carried bytes ferry could not decode.
    #[error("cannot decode the replication stream: {0}")]
    Decode(#[from] crate::pgoutput::DecodeError),
}

impl SourceError {
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

    /// Classifies a replication-session error into a typed variant.
    ///
    /// The replication library hands server errors over as text (message
    /// plus `(SQLSTATE …)`), so this is the one place that reads it.
    pub fn from_replication(what: &str, e: pgwire_replication::PgWireError) -> SourceError {
        let detail = e.to_string();
        let has = |needle: &str| detail.contains(needle);
        let (what, detail_owned) = (what.to_string(), detail.clone());
        if has("55006") || has("is active for PID") {
            return SourceError::SlotBusy(detail_owned);
        }
        if has("does not exist") && has("replication slot") {
            return SourceError::SlotDropped {
                what,
                detail: detail_owned,
            };
        }
        if has("can no longer get changes") || has("has been invalidated") {
            return SourceError::SlotInvalidated {
                what,
                detail: detail_owned,
            };
        }
        if has("28P01") || has("28000") || has("password authentication") {
            return SourceError::AuthFailed {
                what,
                detail: detail_owned,
            };
        }
        if has("42501") || has("must be superuser or replication role") || has("permission denied")
        {
            return SourceError::ReplicationDenied {
                what,
                detail: detail_owned,
            };
        }
        SourceError::Unavailable {
            what,
            reason: detail_owned,
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

#[cfg(test)]
mod tests {
    use super::*;
    use pgwire_replication::PgWireError;

    fn server(text: &str) -> SourceError {
        SourceError::from_replication("streaming", PgWireError::Server(text.to_string()))
    }

    #[test]
    fn replication_errors_become_typed_variants() {
        assert!(matches!(
            server("replication slot \"s\" is active for PID 7 (SQLSTATE 55006)"),
            SourceError::SlotBusy(_)
        ));
        assert!(matches!(
            server("replication slot \"s\" does not exist (SQLSTATE 42704)"),
            SourceError::SlotDropped { .. }
        ));
        assert!(matches!(
            server("can no longer get changes from replication slot \"s\" (SQLSTATE 55000)"),
            SourceError::SlotInvalidated { .. }
        ));
        assert!(matches!(
            server("password authentication failed for user \"u\" (SQLSTATE 28P01)"),
            SourceError::AuthFailed { .. }
        ));
        assert!(matches!(
            server("permission denied to start WAL sender (SQLSTATE 42501)"),
            SourceError::ReplicationDenied { .. }
        ));
        assert!(matches!(
            server("terminating connection due to administrator command (SQLSTATE 57P01)"),
            SourceError::Unavailable { .. }
        ));
        let dropped = server("replication slot \"s\" does not exist").to_string();
        assert!(
            dropped.contains("the replication slot was dropped"),
            "{dropped}"
        );
    }
}
