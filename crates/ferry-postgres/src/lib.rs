//! The PostgreSQL source: connections with pinned session settings, catalog
//! checks (wal_level, tables, keys, publication, slot), the consistent
//! backfill snapshot, the logical replication stream (pgoutput, decoded into
//! `ferry-core::change` events), and the query [`Session`] through which the
//! engine reads documents, related roots and backfill chunks. This is the
//! only crate that runs SQL.
//!
//! Values are read as text everywhere (pgoutput text mode and `COPY` text
//! format) on sessions pinned to the same settings, so a value renders the
//! same whether it came from the stream or from a snapshot.

pub mod capture;
pub mod catalog;
mod copy;
pub mod docsql;
mod error;
pub mod pgoutput;
mod session;

pub use copy::{CopyReader, CopyRow};
pub use error::SourceError;
pub use session::{RowSecurityHides, Session, Uncovered};

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_config::SourceConfig;
pub use ferry_config::SslMode;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Session settings pinned on every connection ferry opens, replication included.
pub const SESSION_OPTIONS: &str = "-c TimeZone=UTC -c DateStyle=ISO,MDY -c IntervalStyle=postgres \
-c extra_float_digits=3 -c bytea_output=hex -c lc_monetary=C -c client_encoding=UTF8 -c statement_timeout=0";

/// How to reach the source database: parsed once from `[source]` (URL,
/// password indirection, TLS settings), with every secret already resolved.
#[derive(Clone)]
pub struct PgParams {
    config: tokio_postgres::Config,
    host: String,
    port: u16,
    user: String,
    password: String,
    password_from: PasswordFrom,
    dbname: String,
    tls: TlsSettings,
}

impl std::fmt::Debug for PgParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.write_str(&self.display())
    }
}

/// Where the password came from, so that an authentication failure names
/// the key to fix.
#[derive(Clone, Debug, PartialEq, Eq)]
enum PasswordFrom {
    Nowhere,
    Url,
    File(PathBuf),
    Env(String),
    PgPassword,
}

impl PasswordFrom {
    fn hint(&self) -> String {
        match self {
            PasswordFrom::Nowhere => {
                "no password was given: set source.password_file or source.password_env".into()
            }
            PasswordFrom::Url => "fix the user or password in source.url".into(),
            PasswordFrom::File(p) => format!(
                "fix the user in source.url or the password in source.password_file ({})",
                p.display()
            ),
            PasswordFrom::Env(v) => {
                format!("fix the user in source.url or the password in ${v} (source.password_env)")
            }
            PasswordFrom::PgPassword => {
                "fix the user in source.url or the password in $PGPASSWORD".into()
            }
        }
    }
}

/// The TLS half of [`PgParams`].
#[derive(Clone)]
struct TlsSettings {
    mode: SslMode,
    /// CA file for verify-ca/verify-full; `None` means the Mozilla roots.
    root_cert: Option<PathBuf>,
    /// The client for ordinary connections; `None` when TLS is disabled.
    connector: Option<MakeRustlsConnect>,
    /// verify-ca only: a name the server's (chain-verified) certificate is
    /// valid for, learnt on an ordinary connection. The replication library
    /// checks the host name even in verify-ca mode (it does not recognise the
    /// error rustls 0.23 reports for a name mismatch), so the replication
    /// session asks for this name instead of the host; the chain is still
    /// verified against the same CA, which is all verify-ca promises.
    verified_name: Arc<Mutex<Option<String>>>,
}

/// The `[source]` settings [`PgParams`] needs beyond the URL.
#[derive(Debug, Clone, Default)]
struct SourceExtras {
    sslmode: Option<SslMode>,
    ssl_root_cert: Option<PathBuf>,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
}

impl PgParams {
    /// Parses a `postgres://` URL alone (libpq's `sslmode` and `sslrootcert`
    /// query parameters included); errors name `source.url`.
    pub fn from_url(url: &str) -> Result<PgParams, SourceError> {
        Self::build(url, SourceExtras::default())
    }

    /// Resolves the whole `[source]` section: the URL, the password from
    /// `password_file` / `password_env`, and the TLS settings. Files and
    /// variables are read here, once; errors name the key to fix and never
    /// contain the password.
    pub fn from_config(source: &SourceConfig) -> Result<PgParams, SourceError> {
        Self::build(
            &source.url,
            SourceExtras {
                sslmode: source.sslmode,
                ssl_root_cert: source.ssl_root_cert.clone(),
                password_file: source.password_file.clone(),
                password_env: source.password_env.clone(),
            },
        )
    }

    fn build(url: &str, extras: SourceExtras) -> Result<PgParams, SourceError> {
        let (url, from_url) = take_tls_params(url)?;
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
        let (password, password_from) = resolve_password(
            config
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            &extras,
        )?;
        let dbname = config
            .get_dbname()
            .map(str::to_string)
            .unwrap_or_else(|| user.clone());
        let tls = resolve_tls(&extras, from_url)?;
        config.user(&user);
        config.dbname(&dbname);
        if !password.is_empty() {
            config.password(password.as_bytes());
        }
        config.ssl_mode(match tls.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        config.options(SESSION_OPTIONS);
        config.application_name("ferry");
        config.connect_timeout(Duration::from_secs(10));
        Ok(PgParams {
            config,
            host,
            port,
            user,
            password,
            password_from,
            dbname,
            tls,
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

    /// The TLS mode in force (after the key, the URL and `PGSSLMODE`).
    pub fn sslmode(&self) -> SslMode {
        self.tls.mode
    }

    /// Opens a query session with the pinned session settings.
    pub async fn session(&self) -> Result<Session, SourceError> {
        Ok(Session {
            client: self.connect().await?,
        })
    }

    /// Opens an ordinary connection with the pinned session settings.
    pub(crate) async fn connect(&self) -> Result<Client, SourceError> {
        let what = || format!("connecting to {}", self.display());
        let client = match &self.tls.connector {
            None => {
                let (client, conn) = self
                    .config
                    .connect(NoTls)
                    .await
                    .map_err(|e| self.connect_error(&what(), e))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "postgres connection ended");
                    }
                });
                client
            }
            Some(tls) => {
                let (client, conn) = self
                    .config
                    .connect(tls.clone())
                    .await
                    .map_err(|e| self.connect_error(&what(), e))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "postgres connection ended");
                    }
                });
                client
            }
        };
        Ok(client)
    }

    /// Classifies a failed connection attempt, naming the keys an operator
    /// has to fix for authentication and certificate problems.
    fn connect_error(&self, what: &str, e: tokio_postgres::Error) -> SourceError {
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            let message = db.message();
            let hint = match code {
                "28P01" => self.password_from.hint(),
                "28000" if message.contains("no encryption") => format!(
                    "the server accepts this user only over TLS: set source.sslmode to \"require\", \"verify-ca\" or \"verify-full\" (it is \"{}\")",
                    self.tls.mode
                ),
                "28000" if message.contains("pg_hba.conf") => {
                    "the server's pg_hba.conf has no entry letting this user in from here: add one, or connect as another user".into()
                }
                _ => return SourceError::from_pg(what, e),
            };
            return SourceError::Operator(format!("{what}: {message} (SQLSTATE {code}); {hint}"));
        }
        let text = error_text(&e);
        if text.contains("password missing") {
            return SourceError::Operator(format!(
                "{what}: the server asks for a password and none was given; set source.password_file or source.password_env"
            ));
        }
        if let Some(hint) = tls_hint(&text, self.tls.mode) {
            return SourceError::Operator(format!("{what}: {text}; {hint}"));
        }
        SourceError::from_pg(what, e)
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
        .with_tls(self.replication_tls())
        .with_options(SESSION_OPTIONS)
        .with_application_name("ferry")
        .with_status_interval(Duration::from_millis(100))
        .with_wakeup_interval(Duration::from_secs(10))
        .with_buffer_size(4096)
    }

    /// The replication library's TLS settings for the same mode and CA.
    fn replication_tls(&self) -> pgwire_replication::TlsConfig {
        use pgwire_replication::TlsConfig;
        let ca = self.tls.root_cert.clone();
        match self.tls.mode {
            SslMode::Disable => TlsConfig::disabled(),
            SslMode::Prefer => TlsConfig {
                mode: pgwire_replication::SslMode::Prefer,
                ..TlsConfig::default()
            },
            SslMode::Require => TlsConfig::require(),
            SslMode::VerifyCa => {
                let learnt = self.tls.verified_name.lock().ok().and_then(|n| n.clone());
                match learnt {
                    Some(name) => TlsConfig::verify_ca(ca).with_sni_hostname(name),
                    None => TlsConfig::verify_ca(ca),
                }
            }
            SslMode::VerifyFull => {
                // The library refuses verify-full towards an IP address
                // unless the name to check is given explicitly; rustls then
                // checks the certificate's IP address entries, like libpq.
                if self.host.parse::<std::net::IpAddr>().is_ok() {
                    TlsConfig::verify_full(ca).with_sni_hostname(self.host.clone())
                } else {
                    TlsConfig::verify_full(ca)
                }
            }
        }
    }
}

/// The error and its sources on one line.
fn error_text(e: &dyn std::error::Error) -> String {
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

/// What to do about a TLS failure, if `text` describes one.
fn tls_hint(text: &str, mode: SslMode) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    if lower.contains("server does not support tls")
        || lower.contains("server does not support ssl")
    {
        return Some(format!(
            "the server does not accept TLS: turn on ssl in postgresql.conf, or lower source.sslmode (it is \"{mode}\")"
        ));
    }
    if lower.contains("certificate") {
        let what = if lower.contains("notvalidforname") || lower.contains("not valid for name") {
            "the server's certificate is not valid for the host in source.url: connect by a name the certificate lists, or use source.sslmode = \"verify-ca\""
        } else {
            "the server's certificate was not accepted: point source.ssl_root_cert at the CA that signed it"
        };
        return Some(format!("{what} (source.sslmode is \"{mode}\")"));
    }
    if lower.contains("tls") || lower.contains("handshake") {
        return Some(format!(
            "TLS could not be set up (source.sslmode is \"{mode}\"); check source.sslmode and source.ssl_root_cert"
        ));
    }
    None
}

/// The `sslmode` / `sslrootcert` query parameters of a URL, which
/// tokio-postgres does not understand (`verify-ca`, `verify-full`) or know.
#[derive(Debug, Default, PartialEq, Eq)]
struct UrlTls {
    sslmode: Option<SslMode>,
    sslrootcert: Option<String>,
}

/// Removes `sslmode` and `sslrootcert` from the URL's query and returns them.
fn take_tls_params(url: &str) -> Result<(String, UrlTls), SourceError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), UrlTls::default()));
    };
    let mut out = UrlTls::default();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslmode" => {
                let v = percent_decode(value);
                out.sslmode = Some(SslMode::parse(&v).ok_or_else(|| {
                    SourceError::Operator(format!(
                        "source.url: sslmode={v:?} is not one of disable, prefer, require, verify-ca, verify-full"
                    ))
                })?);
            }
            "sslrootcert" => out.sslrootcert = Some(percent_decode(value)),
            _ => kept.push(pair),
        }
    }
    let rebuilt = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rebuilt, out))
}

/// Decodes `%XX` escapes (libpq URIs use no `+` for spaces; a `%` not
/// followed by two hex digits stays as it is).
fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

/// Picks the password from exactly one of: the URL, `password_file`,
/// `password_env`; `PGPASSWORD` when none is given.
fn resolve_password(
    in_url: Option<String>,
    extras: &SourceExtras,
) -> Result<(String, PasswordFrom), SourceError> {
    let op = |m: String| SourceError::Operator(m);
    match (&in_url, &extras.password_file, &extras.password_env) {
        (_, Some(_), Some(_)) => {
            return Err(op(
                "source.password_file and source.password_env both give the password; keep one"
                    .into(),
            ))
        }
        (Some(_), Some(_), None) => {
            return Err(op(
                "source.password_file gives the password that source.url also carries; keep one"
                    .into(),
            ))
        }
        (Some(_), None, Some(_)) => {
            return Err(op(
                "source.password_env gives the password that source.url also carries; keep one"
                    .into(),
            ))
        }
        _ => {}
    }
    if let Some(path) = &extras.password_file {
        let password = ferry_config::read_secret_file(path).map_err(|reason| {
            op(format!(
                "source.password_file: cannot use {}: {reason}",
                path.display()
            ))
        })?;
        return Ok((password, PasswordFrom::File(path.clone())));
    }
    if let Some(name) = &extras.password_env {
        return match ferry_config::read_secret_env(name) {
            Ok(v) => Ok((v, PasswordFrom::Env(name.clone()))),
            Err(reason) => Err(op(format!("source.password_env: {reason}"))),
        };
    }
    if let Some(p) = in_url {
        return Ok((p, PasswordFrom::Url));
    }
    match std::env::var("PGPASSWORD") {
        Ok(p) if !p.is_empty() => Ok((p, PasswordFrom::PgPassword)),
        _ => Ok((String::new(), PasswordFrom::Nowhere)),
    }
}

/// Combines the `sslmode` / root-certificate settings from the keys, the URL
/// and libpq's variables, and builds the TLS client.
fn resolve_tls(extras: &SourceExtras, url: UrlTls) -> Result<TlsSettings, SourceError> {
    let op = |m: String| SourceError::Operator(m);
    if let (Some(k), Some(u)) = (extras.sslmode, url.sslmode) {
        if k != u {
            return Err(op(format!(
                "source.sslmode = \"{k}\" and sslmode={u} in source.url disagree; keep one"
            )));
        }
    }
    let env_mode = match std::env::var("PGSSLMODE") {
        Ok(v) if !v.is_empty() => Some(SslMode::parse(&v).ok_or_else(|| {
            op(format!(
                "PGSSLMODE={v:?} is not one of disable, prefer, require, verify-ca, verify-full"
            ))
        })?),
        _ => None,
    };
    let mode = extras
        .sslmode
        .or(url.sslmode)
        .or(env_mode)
        .unwrap_or(SslMode::Prefer);

    let url_root = url.sslrootcert.map(PathBuf::from);
    if let (Some(k), Some(u)) = (&extras.ssl_root_cert, &url_root) {
        if k != u {
            return Err(op(format!(
                "source.ssl_root_cert ({}) and sslrootcert={} in source.url disagree; keep one",
                k.display(),
                u.display()
            )));
        }
    }
    let explicit_root = extras.ssl_root_cert.clone().or(url_root);
    if explicit_root.is_some() && !mode.verifies() {
        return Err(op(format!(
            "source.ssl_root_cert is used only with sslmode verify-ca or verify-full, but source.sslmode is \"{mode}\"; set source.sslmode = \"verify-full\" (or \"verify-ca\") or remove the certificate"
        )));
    }
    // PGSSLROOTCERT only matters where a certificate is checked.
    let root = explicit_root.or_else(|| {
        std::env::var_os("PGSSLROOTCERT")
            .filter(|v| !v.is_empty() && mode.verifies())
            .map(PathBuf::from)
    });
    // libpq's "system": the well-known roots, which is the default here.
    let root = root.filter(|p| p.as_os_str() != "system");

    let verified_name = Arc::new(Mutex::new(None));
    let connector = match mode {
        SslMode::Disable => None,
        _ => Some(MakeRustlsConnect::new(client_config(
            mode,
            root.as_deref(),
            &verified_name,
        )?)),
    };
    Ok(TlsSettings {
        mode,
        root_cert: root,
        connector,
        verified_name,
    })
}

/// A rustls client for `mode`, trusting `root` (PEM) or the Mozilla roots.
fn client_config(
    mode: SslMode,
    root: Option<&Path>,
    verified_name: &Arc<Mutex<Option<String>>>,
) -> Result<rustls::ClientConfig, SourceError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| SourceError::Operator(format!("cannot set up TLS: {e}")))?;
    if !mode.verifies() {
        // prefer / require: encrypted, certificate not checked (libpq's rules).
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth());
    }
    let roots = Arc::new(root_store(root)?);
    if mode == SslMode::VerifyFull {
        return Ok(builder.with_root_certificates(roots).with_no_client_auth());
    }
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|e| SourceError::Operator(format!("source.ssl_root_cert: {e}")))?;
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly {
            inner,
            verified_name: verified_name.clone(),
        }))
        .with_no_client_auth())
}

/// The trust anchors: every certificate in `path`, or the Mozilla roots.
fn root_store(path: Option<&Path>) -> Result<rustls::RootCertStore, SourceError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let Some(path) = path else {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok(roots);
    };
    let bad = |reason: String| {
        SourceError::Operator(format!(
            "source.ssl_root_cert: cannot use {}: {reason}",
            path.display()
        ))
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file ({e})")))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(bad("it holds no usable certificate".into()));
    }
    Ok(roots)
}

/// prefer / require: any certificate, but the handshake signatures are
/// still checked so the session key really belongs to that certificate.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// verify-ca: the chain must lead to a trusted root; the host name may differ.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    verified_name: Arc<Mutex<Option<String>>>,
}

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(NotValidForName))
            | Err(rustls::Error::InvalidCertificate(NotValidForNameContext { .. })) => {
                // Only a name mismatch is forgiven: the chain checks passed.
                if let Some(name) = certificate_names(end_entity).into_iter().next() {
                    if let Ok(mut slot) = self.verified_name.lock() {
                        *slot = Some(name);
                    }
                }
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The DNS names and IP addresses a certificate is issued for, usable as a
/// rustls server name (a wildcard becomes a concrete name under it).
fn certificate_names(der: &[u8]) -> Vec<String> {
    use x509_cert::der::Decode;
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::SubjectAltName;
    let Ok(cert) = x509_cert::Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some((_, san))) = cert.tbs_certificate.get::<SubjectAltName>() else {
        return Vec::new();
    };
    san.0
        .iter()
        .filter_map(|name| match name {
            GeneralName::DnsName(d) => {
                let d = d.to_string();
                Some(match d.strip_prefix("*.") {
                    Some(rest) => format!("ferry-verify-ca.{rest}"),
                    None => d,
                })
            }
            GeneralName::IpAddress(ip) => match ip.as_bytes().len() {
                4 => <[u8; 4]>::try_from(ip.as_bytes())
                    .ok()
                    .map(|b| std::net::IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(ip.as_bytes())
                    .ok()
                    .map(|b| std::net::IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .filter(|n| rustls::pki_types::ServerName::try_from(n.clone()).is_ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(url: &str) -> SourceConfig {
        let text = format!(
            "[source]\nurl = \"{url}\"\nslot = \"s\"\npublication = \"p\"\n[sink]\nurl = \"http://127.0.0.1:9\"\n[[index]]\nname = \"i\"\ntable = \"t\"\n"
        );
        ferry_config::Config::from_toml(&text)
            .expect("config")
            .source
    }

    #[test]
    fn tls_parameters_leave_the_url_for_tokio_postgres() {
        let (url, tls) = take_tls_params(
            "postgres://u@h:5432/db?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        )
        .expect("url");
        assert_eq!(url, "postgres://u@h:5432/db?application_name=x");
        assert_eq!(tls.sslmode, Some(SslMode::VerifyFull));
        assert_eq!(tls.sslrootcert.as_deref(), Some("/etc/ca.pem"));

        let (url, tls) = take_tls_params("postgres://u@h/db?sslmode=require").expect("url");
        assert_eq!(url, "postgres://u@h/db");
        assert_eq!(tls.sslmode, Some(SslMode::Require));

        let e = take_tls_params("postgres://u@h/db?sslmode=verify_full")
            .expect_err("bad mode")
            .to_string();
        assert!(e.contains("source.url") && e.contains("verify_full"), "{e}");
    }

    #[test]
    fn percent_decoding_keeps_malformed_escapes() {
        assert_eq!(percent_decode("a%20b"), "a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("a+b"), "a+b");
        assert_eq!(percent_decode("a%20"), "a ");
    }

    #[test]
    fn verify_full_in_the_url_is_understood() {
        let p = PgParams::from_url("postgres://u@db.example:5433/app?sslmode=verify-full")
            .expect("params");
        assert_eq!(p.sslmode(), SslMode::VerifyFull);
        assert_eq!(p.display(), "u@db.example:5433/app");
        let tls = p.replication_tls();
        assert_eq!(tls.mode, pgwire_replication::SslMode::VerifyFull);
        assert_eq!(tls.sni_hostname, None);
    }

    #[test]
    fn verify_full_towards_an_ip_checks_the_ip() {
        let mut s = source("postgres://u@127.0.0.1:5433/app");
        s.sslmode = Some(SslMode::VerifyFull);
        let p = PgParams::from_config(&s).expect("params");
        let tls = p.replication_tls();
        assert_eq!(tls.sni_hostname.as_deref(), Some("127.0.0.1"));
    }

    #[test]
    fn sslmode_key_and_url_must_agree() {
        let mut s = source("postgres://u@h/app?sslmode=require");
        s.sslmode = Some(SslMode::VerifyFull);
        let e = PgParams::from_config(&s).expect_err("conflict").to_string();
        assert!(
            e.contains("source.sslmode") && e.contains("source.url"),
            "{e}"
        );
        s.sslmode = Some(SslMode::Require);
        assert_eq!(
            PgParams::from_config(&s).expect("same").sslmode(),
            SslMode::Require
        );
    }

    #[test]
    fn root_certificate_needs_a_verifying_mode() {
        let mut s = source("postgres://u@h/app");
        s.sslmode = Some(SslMode::Require);
        s.ssl_root_cert = Some("/nonexistent/ca.pem".into());
        let e = PgParams::from_config(&s)
            .expect_err("require + ca")
            .to_string();
        assert!(e.contains("source.ssl_root_cert"), "{e}");
        s.sslmode = Some(SslMode::VerifyCa);
        let e = PgParams::from_config(&s)
            .expect_err("missing ca")
            .to_string();
        assert!(
            e.contains("source.ssl_root_cert") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
    }

    #[test]
    fn password_file_is_read_and_never_shown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("pg-password");
        std::fs::write(&f, "hunter2-from-file\n").expect("write");
        let mut s = source("postgres://ferry@h/app");
        s.password_file = Some(f.clone());
        let p = PgParams::from_config(&s).expect("params");
        assert_eq!(p.password, "hunter2-from-file");
        assert_eq!(p.password_from, PasswordFrom::File(f.clone()));
        assert_eq!(
            p.config.get_password(),
            Some("hunter2-from-file".as_bytes())
        );
        let shown = format!("{p:?} {}", p.display());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(p.password_from.hint().contains("source.password_file"));

        let mut s = source("postgres://ferry:inline-pw@h/app");
        s.password_file = Some(f);
        let e = PgParams::from_config(&s)
            .expect_err("two passwords")
            .to_string();
        assert!(
            e.contains("source.password_file") && e.contains("source.url"),
            "{e}"
        );
        assert!(!e.contains("inline-pw") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn password_env_names_the_variable_when_unset() {
        let mut s = source("postgres://ferry@h/app");
        s.password_env = Some("FERRY_TEST_UNSET_PG_PASSWORD_VAR".into());
        let e = PgParams::from_config(&s).expect_err("unset").to_string();
        assert!(
            e.contains("source.password_env") && e.contains("FERRY_TEST_UNSET_PG_PASSWORD_VAR"),
            "{e}"
        );
        // A variable only this test uses.
        std::env::set_var("FERRY_TEST_PG_PASSWORD_VAR_1", "from-env");
        s.password_env = Some("FERRY_TEST_PG_PASSWORD_VAR_1".into());
        let p = PgParams::from_config(&s).expect("params");
        assert_eq!(p.password, "from-env");
        assert!(p.password_from.hint().contains("source.password_env"));
    }

    #[test]
    fn tls_failures_say_which_key_to_fix() {
        let h = tls_hint(
            "error performing TLS handshake: invalid peer certificate: UnknownIssuer",
            SslMode::VerifyFull,
        )
        .expect("tls");
        assert!(h.contains("source.ssl_root_cert"), "{h}");
        let h = tls_hint(
            "error performing TLS handshake: invalid peer certificate: certificate not valid for name \"127.0.0.1\"",
            SslMode::VerifyFull,
        )
        .expect("tls");
        assert!(h.contains("verify-ca"), "{h}");
        let h = tls_hint(
            "error performing TLS handshake: server does not support TLS",
            SslMode::Require,
        )
        .expect("tls");
        assert!(h.contains("source.sslmode"), "{h}");
        assert_eq!(tls_hint("connection refused", SslMode::Prefer), None);
    }
}

/// Against a throwaway cluster: SCRAM passwords from a file, and every TLS
/// mode on both the ordinary and the replication connections. Certificates
/// are made with the `openssl` command.
#[cfg(test)]
mod live_tests {
    use super::*;
    use ferry_testkit::PgCluster;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::process::Command;

    const PASSWORD: &str = "correct-horse-battery";

    struct Certs {
        _dir: tempfile::TempDir,
        ca: PathBuf,
        other_ca: PathBuf,
        server_crt: PathBuf,
        server_key: PathBuf,
    }

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("the openssl command is needed to make test certificates");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A CA, a server certificate for `localhost` only signed by it, and an unrelated CA.
    fn make_certs() -> Certs {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        for ca in ["ca", "other-ca"] {
            openssl(
                d,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=ferry test {ca}"),
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                ],
            );
        }
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                "/CN=localhost",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
            ],
        );
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write ext");
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "server.ext",
                "-out",
                "server.crt",
            ],
        );
        Certs {
            ca: d.join("ca.pem"),
            other_ca: d.join("other-ca.pem"),
            server_crt: d.join("server.crt"),
            server_key: d.join("server.key"),
            _dir: dir,
        }
    }

    /// Copies a file into the data directory, owned like the directory, mode 0600.
    fn install(pg: &PgCluster, from: &Path, name: &str) {
        let to = pg.data_dir().join(name);
        std::fs::copy(from, &to).expect("copy into the data directory");
        let meta = std::fs::metadata(pg.data_dir()).expect("data dir");
        std::os::unix::fs::chown(&to, Some(meta.uid()), Some(meta.gid())).expect("chown");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }

    fn append_conf(pg: &PgCluster, text: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(pg.data_dir().join("postgresql.conf"))
            .expect("postgresql.conf");
        f.write_all(text.as_bytes()).expect("append");
    }

    /// SCRAM for `secure_user` (ordinary and replication), trust for the rest.
    fn require_scram(pg: &PgCluster) {
        std::fs::write(
            pg.data_dir().join("pg_hba.conf"),
            "local all all trust\n\
             host all secure_user 127.0.0.1/32 scram-sha-256\n\
             host replication secure_user 127.0.0.1/32 scram-sha-256\n\
             host all all 127.0.0.1/32 trust\n\
             host replication all 127.0.0.1/32 trust\n",
        )
        .expect("pg_hba.conf");
    }

    async fn cluster(ssl: Option<&Certs>) -> PgCluster {
        let pg = tokio::task::spawn_blocking(PgCluster::start)
            .await
            .expect("join")
            .expect("start PostgreSQL");
        let admin = pg.client("postgres").await.expect("admin");
        admin
            .batch_execute(&format!(
                "SET password_encryption = 'scram-sha-256'; \
                 CREATE ROLE secure_user LOGIN REPLICATION PASSWORD '{PASSWORD}'"
            ))
            .await
            .expect("create role");
        drop(admin);
        require_scram(&pg);
        if let Some(c) = ssl {
            install(&pg, &c.server_crt, "server.crt");
            install(&pg, &c.server_key, "server.key");
            append_conf(
                &pg,
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
            );
        }
        pg.restart().expect("restart with the new settings");
        pg
    }

    fn params(pg: &PgCluster, host: &str, tweak: impl FnOnce(&mut SourceConfig)) -> PgParams {
        let text = format!(
            "[source]\nurl = \"postgres://secure_user@{host}:{}/postgres\"\nslot = \"s\"\npublication = \"p\"\n[sink]\nurl = \"http://127.0.0.1:9\"\n[[index]]\nname = \"i\"\ntable = \"t\"\n",
            pg.port()
        );
        let mut source = ferry_config::Config::from_toml(&text)
            .expect("config")
            .source;
        tweak(&mut source);
        PgParams::from_config(&source).expect("params")
    }

    fn password_file(dir: &Path, content: &str) -> PathBuf {
        let f = dir.join(format!("pw-{}", content.len()));
        std::fs::write(&f, content).expect("write password file");
        f
    }

    async fn uses_tls(p: &PgParams) -> bool {
        let c = p.connect().await.expect("connect");
        c.query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0)
    }

    /// Creates and drops a slot over the replication protocol.
    async fn replication_works(p: &PgParams, slot: &str) -> Result<(), SourceError> {
        let created = catalog::create_slot(p, slot, "p").await?;
        drop(created);
        let c = p.connect().await?;
        // The session may take a moment to release the slot.
        for _ in 0..50 {
            if c.batch_execute(&format!("SELECT pg_drop_replication_slot('{slot}')"))
                .await
                .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("could not drop slot {slot}");
    }

    #[tokio::test]
    async fn password_file_authenticates_and_a_wrong_one_names_the_key() {
        let pg = cluster(None).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let right = password_file(dir.path(), &format!("{PASSWORD}\n"));
        let p = params(&pg, "127.0.0.1", |s| s.password_file = Some(right.clone()));
        assert!(!uses_tls(&p).await, "prefer falls back to plain TCP");
        replication_works(&p, "pw_file_slot")
            .await
            .expect("SCRAM on the replication session");

        let wrong = password_file(dir.path(), "not-the-password-at-all\n");
        let p = params(&pg, "127.0.0.1", |s| s.password_file = Some(wrong.clone()));
        let e = p.connect().await.expect_err("wrong password").to_string();
        eprintln!("{e}");
        assert!(e.contains("source.password_file"), "{e}");
        assert!(e.contains("28P01"), "{e}");
        assert!(!e.contains("not-the-password"), "the password leaked: {e}");

        let p = params(&pg, "127.0.0.1", |s| s.sslmode = Some(SslMode::Require));
        let e = p
            .connect()
            .await
            .expect_err("no TLS on the server")
            .to_string();
        assert!(e.contains("does not accept TLS"), "{e}");
    }

    #[tokio::test]
    async fn tls_modes_verify_what_they_promise_on_both_sessions() {
        let certs = make_certs();
        let pg = cluster(Some(&certs)).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let pw = password_file(dir.path(), PASSWORD);
        let with = |host: &str, mode: SslMode, ca: Option<&Path>| {
            params(&pg, host, |s| {
                s.sslmode = Some(mode);
                s.ssl_root_cert = ca.map(Path::to_path_buf);
                s.password_file = Some(pw.clone());
            })
        };

        // verify-full: right CA, a name the certificate lists.
        let p = with("localhost", SslMode::VerifyFull, Some(&certs.ca));
        assert!(uses_tls(&p).await);
        replication_works(&p, "full_slot")
            .await
            .expect("verify-full replication");

        // verify-full: the certificate does not list 127.0.0.1.
        let p = with("127.0.0.1", SslMode::VerifyFull, Some(&certs.ca));
        let e = p.connect().await.expect_err("wrong host").to_string();
        eprintln!("{e}");
        assert!(e.contains("not valid for the host"), "{e}");
        let e = replication_works(&p, "never")
            .await
            .expect_err("the replication session must refuse the host too");
        eprintln!("replication: {e}");

        // verify-full and verify-ca: a CA that did not sign the certificate.
        for mode in [SslMode::VerifyFull, SslMode::VerifyCa] {
            let p = with("localhost", mode, Some(&certs.other_ca));
            let e = p.connect().await.expect_err("wrong CA").to_string();
            eprintln!("{e}");
            assert!(e.contains("source.ssl_root_cert"), "{mode}: {e}");
            assert!(replication_works(&p, "never").await.is_err(), "{mode}");
        }

        // verify-ca: any host name, as long as the chain is right.
        let p = with("127.0.0.1", SslMode::VerifyCa, Some(&certs.ca));
        assert!(uses_tls(&p).await);
        replication_works(&p, "ca_slot")
            .await
            .expect("verify-ca replication towards an IP address");

        // require: encrypted, nothing checked.
        let p = with("127.0.0.1", SslMode::Require, None);
        assert!(uses_tls(&p).await);
        replication_works(&p, "require_slot")
            .await
            .expect("require replication");

        // The default (prefer) takes TLS when offered.
        let p = params(&pg, "127.0.0.1", |s| s.password_file = Some(pw.clone()));
        assert_eq!(p.sslmode(), SslMode::Prefer);
        assert!(uses_tls(&p).await);
    }
}
