//! systemd service notifications (the `sd_notify` datagram protocol),
//! spoken directly over a Unix datagram socket instead of linking libsystemd.
//!
//! With `Type=notify` systemd waits for `READY=1` before it considers the
//! unit started; with `WatchdogSec=` it expects `WATCHDOG=1` at least once
//! per `WATCHDOG_USEC` and restarts the service otherwise; `STOPPING=1`
//! tells it a stop is under way. Outside systemd (`NOTIFY_SOCKET` unset)
//! nothing is sent.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::stats::Stats;
use tokio::sync::watch;

/// Sends notifications to the socket systemd named in `NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    #[cfg(unix)]
    socket: std::os::unix::net::UnixDatagram,
    #[cfg(unix)]
    target: std::os::unix::net::SocketAddr,
}

impl Notifier {
    /// The notifier for `NOTIFY_SOCKET`, `Ok(None)` when the variable is
    /// unset or empty (not started by systemd with `Type=notify`).
    pub fn from_env() -> std::io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(name) if !name.is_empty() => Notifier::new(&name).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for a socket name in `NOTIFY_SOCKET` syntax: an absolute
    /// path, or `@name` for a Linux abstract socket.
    #[cfg(unix)]
    pub fn new(name: &std::ffi::OsStr) -> std::io::Result<Notifier> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};

        let bytes = name.as_bytes();
        let target = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
            abstract_addr(abstract_name)?
        } else if bytes.starts_with(b"/") {
            SocketAddr::from_pathname(std::path::Path::new(name))?
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("NOTIFY_SOCKET {name:?} is neither an absolute path nor @abstract"),
            ));
        };
        let socket = UnixDatagram::unbound()?;
        // A full receive queue must not stall the runtime thread.
        socket.set_nonblocking(true)?;
        Ok(Notifier { socket, target })
    }

    /// Without Unix sockets there is nothing to notify.
    #[cfg(not(unix))]
    pub fn new(name: &std::ffi::OsStr) -> std::io::Result<Notifier> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("NOTIFY_SOCKET {name:?}: Unix sockets are not available"),
        ))
    }

    /// Sends one datagram of newline-separated `KEY=value` assignments.
    pub fn notify(&self, state: &str) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            self.socket.send_to_addr(state.as_bytes(), &self.target)?;
        }
        #[cfg(not(unix))]
        let _ = state;
        Ok(())
    }
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &[u8]) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    // The address is the name after a leading NUL byte; std adds the NUL.
    std::os::unix::net::SocketAddr::from_abstract_name(name)
}

#[cfg(all(unix, not(target_os = "linux")))]
fn abstract_addr(_name: &[u8]) -> std::io::Result<std::os::unix::net::SocketAddr> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract Unix socket names exist on Linux only",
    ))
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, when systemd
/// asked this process (`WATCHDOG_PID` unset or ours) for watchdog pings.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(me) {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// How often readiness and the shutdown flag are looked at.
const POLL: Duration = Duration::from_millis(200);

/// Reports to systemd for the life of the process: `READY=1` once
/// `stats.streaming` first turns true, `WATCHDOG=1` every `watchdog` while
/// the runtime keeps running this task, and `STOPPING=1` once `shutdown`
/// turns true. Runs until aborted (watchdog pings continue during the
/// drain after a stop request). The caller keeps a handle on `notifier`
/// to send a last `STOPPING=1` when ferry ends without a stop request.
pub async fn supervise(
    notifier: Arc<Notifier>,
    stats: Arc<Stats>,
    mut shutdown: watch::Receiver<bool>,
    watchdog: Option<Duration>,
) {
    let send = |state: &str| {
        if let Err(e) = notifier.notify(state) {
            tracing::warn!(error = %e, state, "cannot notify systemd");
        }
    };
    send("STATUS=starting: preparing indexes and backfilling");
    let mut ready = false;
    let mut stopping = false;
    let mut shutdown_open = true;
    let mut last_ping: Option<tokio::time::Instant> = None;
    loop {
        if !stopping && *shutdown.borrow() {
            stopping = true;
            send("STOPPING=1\nSTATUS=stopping: flushing the batch in flight");
        }
        if !ready && !stopping && stats.streaming.load(Relaxed) {
            ready = true;
            send("READY=1\nSTATUS=streaming changes");
            tracing::debug!("told systemd the service is ready");
        }
        if let Some(every) = watchdog {
            if last_ping.is_none_or(|t| t.elapsed() >= every) {
                send("WATCHDOG=1");
                last_ping = Some(tokio::time::Instant::now());
            }
        }
        let nap = watchdog.map_or(POLL, |w| w.min(POLL));
        if shutdown_open {
            tokio::select! {
                changed = shutdown.changed() => shutdown_open = changed.is_ok(),
                _ = tokio::time::sleep(nap) => {}
            }
        } else {
            tokio::time::sleep(nap).await;
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier::new(path.as_os_str()).expect("notifier");
        n.notify("READY=1").expect("send");
        assert_eq!(recv(&server), "READY=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("ferry-admin-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract addr");
        let server = UnixDatagram::bind_addr(&addr).expect("bind");
        let n = Notifier::new(std::ffi::OsStr::new(&format!("@{name}"))).expect("notifier");
        n.notify("WATCHDOG=1").expect("send");
        assert_eq!(recv(&server), "WATCHDOG=1");
    }

    #[test]
    fn relative_names_are_refused() {
        assert!(Notifier::new(std::ffi::OsStr::new("notify.sock")).is_err());
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout_for_our_pid() {
        assert_eq!(
            watchdog_interval_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("x"), None, 7), None);
        assert_eq!(watchdog_interval_from(None, None, 7), None);
    }

    // Multi-threaded: the test thread blocks on the socket while the task runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn supervise_reports_ready_watchdog_and_stopping() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).expect("bind");
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let stats = Arc::new(Stats::default());
        let (tx, rx) = watch::channel(false);
        let n = Arc::new(Notifier::new(path.as_os_str()).expect("notifier"));
        let task = tokio::spawn(supervise(
            n,
            stats.clone(),
            rx,
            Some(Duration::from_millis(50)),
        ));
        let mut seen = Vec::new();
        let mut next = |want: &str| loop {
            let m = recv(&server);
            seen.push(m.clone());
            if m.starts_with(want) {
                return;
            }
            assert!(seen.len() < 200, "no {want} in {seen:?}");
        };
        next("STATUS=starting");
        next("WATCHDOG=1");
        next("WATCHDOG=1");
        stats.streaming.store(true, Relaxed);
        next("READY=1");
        tx.send(true).expect("shutdown");
        next("STOPPING=1");
        // The watchdog keeps going while ferry drains.
        next("WATCHDOG=1");
        task.abort();
        assert_eq!(seen.iter().filter(|m| m.starts_with("READY=1")).count(), 1);
        assert!(
            seen.iter().position(|m| m.starts_with("READY=1"))
                < seen.iter().position(|m| m.starts_with("STOPPING=1"))
        );
    }
}
