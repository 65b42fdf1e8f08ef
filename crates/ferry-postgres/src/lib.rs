//! The PostgreSQL source: connections with pinned session settings, catalog
//! checks (wal_level, tables, keys, publication, slot), the consistent
//! backfill snapshot, and the logical replication stream (pgoutput).
//!
//! Values are read as text everywhere (pgoutput text mode and `COPY` text
//! format) on sessions pinned to the same settings, so a value renders the
//! same whether it came from the stream or from a snapshot.

pub mod capture;
pub mod catalog;
mod error;
pub mod pgoutput;

pub use error::SourceError;

use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls};

/// Session settings pinned on every connection ferry opens, replication included.
pub const SESSION_OPTIONS: &str = "-c TimeZone=UTC -c DateStyle=ISO,MDY -c IntervalStyle=postgres \
-c extra_float_digits=3 -c bytea_output=hex -c lc_monetary=C -c client_encoding=UTF8 -c statement_timeout=0";

/// How to reach the source database, parsed once from `source.url`.
#[derive(Clone)]
pub struct PgParams {
    config: tokio_postgres::Config,
    host: String,
    port: u16,
    user: String,
    password: String,
    dbname: String,
}

impl std::fmt::Debug for PgParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.write_str(&self.display())
    }
}

impl PgParams {
    /// Parses a `postgres://` URL; the error names `source.url`.
    pub fn from_url(url: &str) -> Result<PgParams, SourceError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            SourceError::Operator(format!(
                "source.url is not a valid PostgreSQL URL ({e}); expected postgres://user[:password]@host:port/database"
            ))
        })?;
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_string(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config
            .get_user()
            .map(str::to_string)
            .or_else(|| std::env::var("PGUSER").ok())
            .unwrap_or_else(|| "postgres".into());
        let password = config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .or_else(|| std::env::var("PGPASSWORD").ok())
            .unwrap_or_default();
        let dbname = config
            .get_dbname()
            .map(str::to_string)
            .unwrap_or_else(|| user.clone());
        config.user(&user);
        config.dbname(&dbname);
        if !password.is_empty() {
            config.password(password.as_bytes());
        }
        config.options(SESSION_OPTIONS);
        config.application_name("ferry");
        config.connect_timeout(Duration::from_secs(10));
        Ok(PgParams {
            config,
            host,
            port,
            user,
            password,
            dbname,
        })
    }

    /// `user@host:port/db`, without the password.
    pub fn display(&self) -> String {
        format!("{}@{}:{}/{}", self.user, self.host, self.port, self.dbname)
    }

    /// The database name.
    pub fn dbname(&self) -> &str {
        &self.dbname
    }

    /// Opens an ordinary connection with the pinned session settings.
    pub async fn connect(&self) -> Result<Client, SourceError> {
        let (client, conn) =
            self.config.connect(NoTls).await.map_err(|e| {
                SourceError::from_pg(&format!("connecting to {}", self.display()), e)
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "postgres connection ended");
            }
        });
        Ok(client)
    }

    /// Settings for a replication session on `slot` with `publication`.
    pub fn replication(
        &self,
        slot: &str,
        publication: &str,
    ) -> pgwire_replication::ReplicationConfig {
        pgwire_replication::ReplicationConfig::new(
            self.host.clone(),
            self.user.clone(),
            self.password.clone(),
            self.dbname.clone(),
            slot,
            publication,
        )
        .with_port(self.port)
        .with_tls(pgwire_replication::TlsConfig::disabled())
        .with_options(SESSION_OPTIONS)
        .with_application_name("ferry")
        .with_status_interval(Duration::from_millis(100))
        .with_wakeup_interval(Duration::from_secs(10))
        .with_buffer_size(4096)
    }
}
