//! Error type shared by every fixture in the crate.

/// Result alias used throughout the test kit.
pub type Result<T, E = TestkitError> = std::result::Result<T, E>;

/// Everything that can go wrong while setting up or tearing down a fixture.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// An I/O operation failed; `context` says what was being attempted.
    #[error("{context}: {source}")]
    Io {
        /// What the kit was doing when the error happened.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A throwaway PostgreSQL cluster or osmem-server did not start or stop.
    #[error(transparent)]
    Launch(#[from] ferry_throwaway::LaunchError),

    /// The search engine the environment asks for is not available.
    #[error("test search engine not available: {0}")]
    EngineMissing(String),

    /// A real search engine node did not start.
    #[error("test search engine did not start: {0}")]
    EngineStartup(String),
}

impl TestkitError {
    /// Wraps an I/O error with a description of the failed operation.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TestkitError::Io {
            context: context.into(),
            source,
        }
    }
}
