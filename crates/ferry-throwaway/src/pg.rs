//! Throwaway PostgreSQL clusters built with `initdb` + `pg_ctl`.

use std::ffi::{CString, OsStr, OsString};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tempfile::TempDir;

use crate::error::{LaunchError, Result};
use crate::process::{
    file_tail, find_on_path, is_executable, render_output, shell_quote, try_free_port,
};

/// How many times `start` picks a new port when the chosen one turns out to
/// be taken by the time the server binds it.
const START_ATTEMPTS: usize = 3;
/// Seconds `pg_ctl` may wait for start/stop to complete.
const PG_CTL_TIMEOUT_SECS: &str = "60";
/// Lines of the server log quoted in start errors.
const LOG_TAIL_LINES: usize = 40;
/// The OS account PostgreSQL runs under when we are root.
const PG_OS_USER: &str = "postgres";

/// Settings for a [`PgCluster`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Value for `wal_level` (default `"logical"`).
    pub wal_level: String,
    /// Extra lines appended verbatim to `postgresql.conf` after this crate's own
    /// settings (so they override them).
    pub extra_conf: Vec<String>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            wal_level: "logical".to_owned(),
            extra_conf: Vec::new(),
        }
    }
}

/// A way to run a program as another OS user.
#[derive(Debug)]
enum Launcher {
    /// `runuser -u USER -- PROGRAM ARGS...` (util-linux).
    Runuser(PathBuf),
    /// `su USER -s /bin/sh -c 'PROGRAM ARGS...'`.
    Su(PathBuf),
}

/// The unprivileged account used for PostgreSQL when we run as root.
#[derive(Debug)]
struct RunAs {
    user: String,
    uid: u32,
    gid: u32,
    launcher: Launcher,
}

/// A private PostgreSQL server living in a temporary directory.
///
/// It listens on 127.0.0.1 on a free port, trusts every local connection
/// (including replication), and is configured for logical decoding by
/// default. Dropping it shuts the server down immediately and deletes all of
/// its files; this also happens when the owning test panics.
#[derive(Debug)]
pub struct PgCluster {
    bin_dir: PathBuf,
    run_as: Option<RunAs>,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    // Declared last: removed only after `Drop::drop` has stopped the server.
    root: TempDir,
}

impl PgCluster {
    /// Creates and starts a cluster with default [`PgOptions`].
    pub fn start() -> Result<PgCluster> {
        Self::start_with(PgOptions::default())
    }

    /// Creates and starts a cluster with the given options.
    pub fn start_with(opts: PgOptions) -> Result<PgCluster> {
        let bin_dir = find_bin_dir()?;
        let run_as = if running_as_root() {
            Some(resolve_run_as()?)
        } else {
            None
        };

        let root = make_root_dir(run_as.as_ref())?;
        let data_dir = root.path().join("data");
        let socket_dir = root.path().join("sock");
        let log_path = root.path().join("postgres.log");
        std::fs::create_dir(&socket_dir)
            .map_err(|e| LaunchError::io(format!("creating {}", socket_dir.display()), e))?;
        if let Some(ra) = &run_as {
            give_to(&socket_dir, ra)?;
        }

        let mut cluster = PgCluster {
            bin_dir,
            run_as,
            data_dir,
            socket_dir,
            log_path,
            port: 0,
            root,
        };
        cluster.init(&opts)?;
        cluster.first_start()?;
        tracing::debug!(
            port = cluster.port,
            data_dir = %cluster.data_dir.display(),
            "ferry-throwaway: PostgreSQL cluster started"
        );
        Ok(cluster)
    }

    /// TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Host the server listens on (always `127.0.0.1`).
    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    /// Connection URL for database `db` as the `postgres` superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@{}:{}/{}", self.host(), self.port, db)
    }

    /// The cluster's data directory (`PGDATA`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log file written by `pg_ctl -l`.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Directory holding the server's Unix-domain socket.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// Directory of the PostgreSQL binaries in use (`initdb`, `pg_ctl`, `psql`, ...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Whether a postmaster appears to be running (its pid file exists).
    pub fn is_running(&self) -> bool {
        self.data_dir.join("postmaster.pid").exists()
    }

    /// Connects to database `db` and drives the connection on a spawned
    /// tokio task. Must be called inside a tokio runtime.
    pub async fn client(&self, db: &str) -> Result<tokio_postgres::Client> {
        let (client, connection) =
            tokio_postgres::connect(&self.url(db), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "ferry-throwaway: postgres connection ended with error");
            }
        });
        Ok(client)
    }

    /// Creates database `name` (quoted as an identifier, so any name works).
    pub async fn create_database(&self, name: &str) -> Result<()> {
        let client = self.client("postgres").await?;
        client
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(name)))
            .await?;
        Ok(())
    }

    /// Shuts the server down cleanly (`pg_ctl stop -m fast`).
    pub fn stop(&self) -> Result<()> {
        self.pg_ctl_stop("fast")
    }

    /// Shuts the server down without a checkpoint (`pg_ctl stop -m immediate`),
    /// so the next start performs crash recovery.
    pub fn stop_immediate(&self) -> Result<()> {
        self.pg_ctl_stop("immediate")
    }

    /// Restarts the server on the same port (`pg_ctl restart -m fast`).
    /// Also starts a server that was previously stopped.
    pub fn restart(&self) -> Result<()> {
        let out = self.run_pg_ctl(
            &[
                "restart",
                "-m",
                "fast",
                "-w",
                "-t",
                PG_CTL_TIMEOUT_SECS,
                "-l",
            ],
            Some(&self.log_path),
        )?;
        if out.status.success() {
            Ok(())
        } else {
            Err(self.start_error("pg_ctl restart failed", &out))
        }
    }

    /// Runs `initdb` and writes our server configuration.
    fn init(&mut self, opts: &PgOptions) -> Result<()> {
        let initdb = self.bin_dir.join("initdb");
        let args: Vec<OsString> = vec![
            "-D".into(),
            self.data_dir.clone().into(),
            "-A".into(),
            "trust".into(),
            "-U".into(),
            "postgres".into(),
            "--no-sync".into(),
            "-E".into(),
            "UTF8".into(),
            "--locale=C".into(),
        ];
        let out = self.run_tool(&initdb, &args)?;
        if !out.status.success() {
            return Err(command_error(&initdb, &args, &out));
        }

        let mut conf = String::from("\n# --- added by ferry-throwaway ---\n");
        let settings: [(&str, String); 11] = [
            ("listen_addresses", conf_str("127.0.0.1")),
            (
                "unix_socket_directories",
                conf_str(&self.socket_dir.to_string_lossy()),
            ),
            ("wal_level", conf_str(&opts.wal_level)),
            ("max_replication_slots", "10".into()),
            ("max_wal_senders", "10".into()),
            ("fsync", "off".into()),
            ("synchronous_commit", "off".into()),
            ("full_page_writes", "off".into()),
            ("shared_buffers", conf_str("128MB")),
            ("max_connections", "100".into()),
            ("wal_sender_timeout", conf_str("60s")),
        ];
        for (key, value) in settings {
            // Writing to a String cannot fail.
            let _ = writeln!(conf, "{key} = {value}");
        }
        for line in &opts.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        self.append_conf(&conf)?;

        let hba = "\
# written by ferry-throwaway: trust everything local
# TYPE  DATABASE     USER  ADDRESS        METHOD
local   all          all                  trust
host    all          all   127.0.0.1/32   trust
local   replication  all                  trust
host    replication  all   127.0.0.1/32   trust
";
        let hba_path = self.data_dir.join("pg_hba.conf");
        // Truncating an existing file keeps its owner (the postgres user).
        std::fs::write(&hba_path, hba)
            .map_err(|e| LaunchError::io(format!("writing {}", hba_path.display()), e))?;
        Ok(())
    }

    /// Starts the server for the first time, picking a fresh port again if
    /// another process grabbed ours in the meantime.
    fn first_start(&mut self) -> Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.port = try_free_port()?;
            // Later settings win, so retries simply append a new port line.
            self.append_conf(&format!("port = {}\n", self.port))?;
            let out = self.run_pg_ctl(
                &["start", "-w", "-t", PG_CTL_TIMEOUT_SECS, "-l"],
                Some(&self.log_path),
            )?;
            if out.status.success() {
                return Ok(());
            }
            let log = file_tail(&self.log_path, LOG_TAIL_LINES);
            let port_taken =
                log.contains("could not bind") || log.contains("Address already in use");
            if port_taken && attempt < START_ATTEMPTS && !self.is_running() {
                tracing::debug!(port = self.port, "ferry-throwaway: port taken, retrying");
                continue;
            }
            return Err(self.start_error("pg_ctl start failed", &out));
        }
    }

    /// Builds a start failure error carrying pg_ctl's output and the log tail.
    fn start_error(&self, what: &str, out: &Output) -> LaunchError {
        LaunchError::PgStart {
            message: format!("{what} ({}): {}", out.status, render_output(out)),
            log_path: self.log_path.clone(),
            log_tail: file_tail(&self.log_path, LOG_TAIL_LINES),
        }
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<()> {
        let args = ["stop", "-m", mode, "-w", "-t", PG_CTL_TIMEOUT_SECS];
        let out = self.run_pg_ctl(&args, None)?;
        if out.status.success() {
            Ok(())
        } else {
            let mut full: Vec<OsString> = vec!["-D".into(), self.data_dir.clone().into()];
            full.extend(args.iter().map(OsString::from));
            Err(command_error(&self.bin_dir.join("pg_ctl"), &full, &out))
        }
    }

    /// Runs `pg_ctl -D <data> <args> [<log>]`; `log`, when given, is appended
    /// right after `args` (which should end in `-l`).
    fn run_pg_ctl(&self, args: &[&str], log: Option<&Path>) -> Result<Output> {
        let mut full: Vec<OsString> = vec!["-D".into(), self.data_dir.clone().into()];
        full.extend(args.iter().map(OsString::from));
        if let Some(log) = log {
            full.push(log.into());
        }
        self.run_tool(&self.bin_dir.join("pg_ctl"), &full)
    }

    /// Runs a PostgreSQL tool, as the `postgres` user when we are root, and
    /// collects its output.
    fn run_tool(&self, program: &Path, args: &[OsString]) -> Result<Output> {
        let mut cmd = match &self.run_as {
            None => {
                let mut c = Command::new(program);
                c.args(args);
                c
            }
            Some(RunAs {
                user,
                launcher: Launcher::Runuser(runuser),
                ..
            }) => {
                let mut c = Command::new(runuser);
                c.arg("-u").arg(user).arg("--").arg(program).args(args);
                c
            }
            Some(RunAs {
                user,
                launcher: Launcher::Su(su),
                ..
            }) => {
                let script = std::iter::once(program.as_os_str())
                    .chain(args.iter().map(OsString::as_os_str))
                    .map(|w| shell_quote(&w.to_string_lossy()))
                    .collect::<Vec<_>>()
                    .join(" ");
                let mut c = Command::new(su);
                c.arg(user).arg("-s").arg("/bin/sh").arg("-c").arg(script);
                c
            }
        };
        // Run from a directory the postgres user can read, and keep libpq-style
        // variables from the caller's environment out of the way.
        cmd.current_dir(self.root.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for var in [
            "PGDATA",
            "PGPORT",
            "PGHOST",
            "PGUSER",
            "PGDATABASE",
            "PGOPTIONS",
        ] {
            cmd.env_remove(var);
        }
        tracing::trace!(?cmd, "ferry-throwaway: running");
        cmd.output()
            .map_err(|e| LaunchError::io(format!("running {}", program.display()), e))
    }

    fn append_conf(&self, text: &str) -> Result<()> {
        let path = self.data_dir.join("postgresql.conf");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| LaunchError::io(format!("opening {}", path.display()), e))?;
        file.write_all(text.as_bytes())
            .map_err(|e| LaunchError::io(format!("writing {}", path.display()), e))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.is_running() {
            if let Err(e) = self.stop_immediate() {
                tracing::warn!(error = %e, "ferry-throwaway: failed to stop PostgreSQL on drop");
            }
        }
        // `root` (the TempDir) is removed after this when the fields drop.
    }
}

/// Locates the directory with `initdb` and `pg_ctl`.
fn find_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN").filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        return if has_pg_tools(&dir) {
            Ok(dir)
        } else {
            Err(LaunchError::PgBinNotFound(format!(
                "PG_BIN={} does not contain executable initdb and pg_ctl",
                dir.display()
            )))
        };
    }

    if let Some(dir) = newest_debian_bin_dir() {
        return Ok(dir);
    }

    if let Some(initdb) = find_on_path("initdb") {
        // Follow symlinks (e.g. /usr/local/bin/initdb -> .../15/bin/initdb)
        // so pg_ctl and postgres are found next to the real binary.
        let real = std::fs::canonicalize(&initdb).unwrap_or_else(|_| initdb.clone());
        for candidate in [real.parent(), initdb.parent()].into_iter().flatten() {
            if has_pg_tools(candidate) {
                return Ok(candidate.to_path_buf());
            }
        }
    }

    Err(LaunchError::PgBinNotFound(
        "PG_BIN unset, no /usr/lib/postgresql/*/bin/initdb, no initdb on PATH".to_owned(),
    ))
}

fn has_pg_tools(dir: &Path) -> bool {
    is_executable(&dir.join("initdb")) && is_executable(&dir.join("pg_ctl"))
}

/// The `bin` directory of the highest PostgreSQL version installed in the
/// Debian/Ubuntu layout.
fn newest_debian_bin_dir() -> Option<PathBuf> {
    let entries = std::fs::read_dir("/usr/lib/postgresql").ok()?;
    entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = parse_version(&entry.file_name())?;
            let bin = entry.path().join("bin");
            has_pg_tools(&bin).then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

/// Parses a directory name like `15` or `9.6` into comparable numbers.
fn parse_version(name: &OsStr) -> Option<Vec<u32>> {
    name.to_str()?
        .split('.')
        .map(|part| part.parse().ok())
        .collect()
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Finds the `postgres` account and a tool to switch to it.
fn resolve_run_as() -> Result<RunAs> {
    let (uid, gid) = lookup_user(PG_OS_USER).ok_or(LaunchError::NoPostgresUser)?;
    let find = |name: &str| {
        ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| is_executable(p))
            .or_else(|| find_on_path(name))
    };
    let launcher = if let Some(p) = find("runuser") {
        Launcher::Runuser(p)
    } else if let Some(p) = find("su") {
        Launcher::Su(p)
    } else {
        return Err(LaunchError::io(
            "running as root: need `runuser` (util-linux) or `su` to start PostgreSQL as the postgres user",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    };
    Ok(RunAs {
        user: PG_OS_USER.to_owned(),
        uid,
        gid,
        launcher,
    })
}

/// Returns the uid and primary gid of an OS user, if it exists.
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    let mut buf_len = 4096usize;
    loop {
        let mut buf: Vec<libc::c_char> = vec![0; buf_len];
        // SAFETY: an all-zero passwd is a valid (if meaningless) value; it is
        // only read after getpwnam_r reports success.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer refers to live, correctly sized storage owned
        // by this frame for the duration of the call.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buf_len < 1 << 20 {
            buf_len *= 4;
            continue;
        }
        if rc != 0 || found.is_null() {
            return None;
        }
        return Some((pwd.pw_uid, pwd.pw_gid));
    }
}

/// Creates the cluster's temporary root directory. As root it lives under
/// `/tmp` (always traversable) and belongs to the postgres user.
fn make_root_dir(run_as: Option<&RunAs>) -> Result<TempDir> {
    let base = if run_as.is_some() {
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    };
    let dir = tempfile::Builder::new()
        .prefix("ferry-pg-")
        .tempdir_in(&base)
        .map_err(|e| LaunchError::io(format!("creating a temp dir in {}", base.display()), e))?;
    if let Some(ra) = run_as {
        give_to(dir.path(), ra)?;
    }
    Ok(dir)
}

/// Hands `path` to the postgres user and makes it world-traversable.
fn give_to(path: &Path, ra: &RunAs) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(path, Some(ra.uid), Some(ra.gid))
        .map_err(|e| LaunchError::io(format!("chown {} to {}", path.display(), ra.user), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| LaunchError::io(format!("chmod 0755 {}", path.display()), e))
}

fn command_error(program: &Path, args: &[OsString], out: &Output) -> LaunchError {
    let command = std::iter::once(program.as_os_str())
        .chain(args.iter().map(OsString::as_os_str))
        .map(|w| shell_quote(&w.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ");
    LaunchError::Command {
        command,
        status: out.status.to_string(),
        output: render_output(out),
    }
}

/// A single-quoted postgresql.conf string value.
fn conf_str(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A double-quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        let v = |s: &str| parse_version(OsStr::new(s));
        assert!(v("10") > v("9.6"));
        assert!(v("15") > v("9"));
        assert_eq!(v("main"), None);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(conf_str("it's"), "'it''s'");
    }
}
