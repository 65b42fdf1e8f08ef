//! Why a throwaway server could not be started or stopped.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = LaunchError> = std::result::Result<T, E>;

/// Everything that can go wrong while starting or stopping a server.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// An I/O operation failed; `context` says what was being attempted.
    #[error("{context}: {source}")]
    Io {
        /// What was being done when the error happened.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// No usable PostgreSQL installation was found.
    #[error(
        "PostgreSQL binaries not found ({0}); install the postgresql package \
         or point PG_BIN at a directory containing initdb and pg_ctl"
    )]
    PgBinNotFound(String),

    /// Running as root but there is no `postgres` OS user to drop privileges to.
    #[error(
        "running as root, but PostgreSQL refuses to run as root and there is no \
         `postgres` OS user to run it as; install the postgresql package (which \
         creates that user) or create it, e.g. `useradd --system postgres`"
    )]
    NoPostgresUser,

    /// An external helper program exited unsuccessfully.
    #[error("`{command}` failed ({status})\n{output}")]
    Command {
        /// The command line that was run.
        command: String,
        /// Its exit status, rendered for humans.
        status: String,
        /// Its captured stdout and stderr.
        output: String,
    },

    /// `pg_ctl start`/`restart` failed; carries the end of the server log.
    #[error("{message}\n--- last lines of {} ---\n{log_tail}", log_path.display())]
    PgStart {
        /// What failed, including pg_ctl's own output.
        message: String,
        /// The server log file.
        log_path: PathBuf,
        /// The final lines of that log.
        log_tail: String,
    },

    /// A PostgreSQL client operation failed.
    #[error("postgres client error: {0}")]
    Postgres(#[from] tokio_postgres::Error),

    /// The `osmem-server` executable could not be located.
    #[error(
        "osmem-server not found ({0}); run `pip install osmem-server` or set \
         OSMEM_SERVER_BIN to the executable"
    )]
    OsmemNotFound(String),

    /// `osmem-server` started but did not announce itself properly.
    #[error("osmem-server did not start: {0}")]
    OsmemStartup(String),
}

impl LaunchError {
    /// Wraps an I/O error with a description of the failed operation.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        LaunchError::Io {
            context: context.into(),
            source,
        }
    }
}
