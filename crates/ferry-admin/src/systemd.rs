//! systemd service notifications through the `sd-notify` crate.
//!
//! With `Type=notify` systemd waits for `READY=1` before it considers the
//! unit started; with `WatchdogSec=` it expects `WATCHDOG=1` at least once
//! per `WATCHDOG_USEC` and restarts the service otherwise; `STOPPING=1`
//! tells it a stop is under way. Outside systemd (`NOTIFY_SOCKET` unset)
//! nothing is sent.
//!
//! `WATCHDOG=1` follows the pipeline, not a timer: it is sent only while
//! [`crate::liveness`] holds — the pipeline progresses, or has nothing
//! pending (idle, starting, retrying, standby). A pipeline that holds work
//! without progress for `admin.stall_timeout_secs` stops the pings, and
//! systemd restarts the process `WatchdogSec` later.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::stats::{mono_us, Stats};

use crate::HealthLimits;
pub use sd_notify::NotifyState;
use tokio::sync::watch;

/// Proof that systemd asked for notifications: `NOTIFY_SOCKET` names a
/// socket `sd-notify` can reach.
#[derive(Debug)]
pub struct Notifier(());

impl Notifier {
    /// The notifier for `NOTIFY_SOCKET`, `Ok(None)` when the variable is
    /// unset or empty (not started by systemd with `Type=notify`), an error
    /// when it is not an absolute path (`sd-notify` does not reach Linux
    /// abstract `@name` sockets).
    pub fn from_env() -> std::io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(name) if !name.is_empty() => check_name(&name).map(|()| Some(Notifier(()))),
            _ => Ok(None),
        }
    }

    /// Sends the states in one datagram.
    pub fn notify(&self, states: &[NotifyState<'_>]) -> std::io::Result<()> {
        sd_notify::notify(states)
    }
}

fn check_name(name: &std::ffi::OsStr) -> std::io::Result<()> {
    if std::path::Path::new(name).is_absolute() {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("NOTIFY_SOCKET {name:?} is not an absolute path (abstract @ sockets are not supported)"),
        ))
    }
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, when systemd
/// asked this process (`WATCHDOG_PID` unset or ours) for watchdog pings.
pub fn watchdog_interval() -> Option<Duration> {
    ping_interval(sd_notify::watchdog_enabled())
}

/// Half the watchdog timeout, so that one late ping is not fatal.
fn ping_interval(timeout: Option<Duration>) -> Option<Duration> {
    timeout.filter(|t| !t.is_zero()).map(|t| t / 2)
}

/// How often the phase and the shutdown flag are looked at.
const POLL: Duration = Duration::from_millis(200);

/// The phase for systemd's `STATUS=` line: `streaming: …` once changes
/// flow (`seeding: … while streaming` while an index is still backfilled),
/// otherwise why the pipeline waits (`standby: …`, `retrying: …`), else
/// `seeding: …` or `starting: …`.
pub fn phase(stats: &Stats) -> String {
    let seeding = stats
        .indexes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|i| i.state().is_copying())
        .count();
    let indexes = |n: usize| format!("{n} index{}", if n == 1 { "" } else { "es" });
    if stats.streaming.load(Relaxed) {
        return if seeding > 0 {
            format!("seeding: backfilling {} while streaming", indexes(seeding))
        } else {
            "streaming: changes flow to the cluster".into()
        };
    }
    let waiting = stats
        .waiting
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    match waiting {
        Some(why) => why,
        None if seeding > 0 => format!("seeding: backfilling {}", indexes(seeding)),
        None => "starting: connecting and preparing indexes".into(),
    }
}

/// Reports to systemd for the life of the process: `READY=1` at once (the
/// caller starts this task once the admin endpoint listens, so `systemctl
/// start` never waits on the database, a backfill or a standby), `STATUS=`
/// with the [`phase`] (or why the pipeline is stalled) whenever it changes,
/// `WATCHDOG=1` every `watchdog` while [`crate::liveness`] holds under
/// `limits`, in every phase, and `STOPPING=1` once `shutdown` turns true.
/// Runs until aborted (watchdog pings continue during the drain after a
/// stop request, as long as the drain progresses). The caller keeps a
/// handle on `notifier` to send a last `STOPPING=1` when ferry ends without
/// a stop request.
pub async fn supervise(
    notifier: Arc<Notifier>,
    stats: Arc<Stats>,
    mut shutdown: watch::Receiver<bool>,
    watchdog: Option<Duration>,
    limits: HealthLimits,
) {
    let send = |states: &[NotifyState<'_>]| {
        if let Err(e) = notifier.notify(states) {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    };
    let mut status = phase(&stats);
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
    tracing::debug!("told systemd the service is ready");
    let mut stopping = false;
    let mut shutdown_open = true;
    let mut last_ping: Option<tokio::time::Instant> = None;
    let mut was_live = true;
    loop {
        if !stopping && *shutdown.borrow() {
            stopping = true;
            send(&[
                NotifyState::Stopping,
                NotifyState::Status("stopping: flushing the batch in flight"),
            ]);
        }
        let live = crate::liveness(&stats, &limits, mono_us());
        if let Err(why) = &live {
            if was_live {
                tracing::error!(reason = %why, "the pipeline is stalled: /healthz fails and the systemd watchdog is no longer fed");
            }
        } else if !was_live {
            tracing::info!("the pipeline progresses again");
        }
        was_live = live.is_ok();
        if !stopping {
            let now = live.err().unwrap_or_else(|| phase(&stats));
            if now != status {
                status = now;
                send(&[NotifyState::Status(&status)]);
            }
        }
        if let Some(every) = watchdog {
            if was_live && last_ping.is_none_or(|t| t.elapsed() >= every) {
                send(&[NotifyState::Watchdog]);
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
    use ferry_core::stats::IndexState;
    use std::os::unix::net::UnixDatagram;

    /// The tests share the process environment: one fake systemd socket,
    /// named in `NOTIFY_SOCKET`, used by one test at a time.
    fn fake_systemd() -> (
        std::sync::MutexGuard<'static, ()>,
        tempfile::TempDir,
        UnixDatagram,
    ) {
        static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let guard = ENV.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).expect("bind");
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        std::env::set_var("NOTIFY_SOCKET", &path);
        (guard, dir, server)
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_the_notify_socket() {
        let (_env, _dir, server) = fake_systemd();
        let n = Notifier::from_env().expect("usable").expect("set");
        n.notify(&[NotifyState::Ready]).expect("send");
        assert_eq!(recv(&server), "READY=1\n");
    }

    #[test]
    fn relative_and_abstract_names_are_refused() {
        assert!(check_name(std::ffi::OsStr::new("notify.sock")).is_err());
        assert!(check_name(std::ffi::OsStr::new("@ferry")).is_err());
        assert!(check_name(std::ffi::OsStr::new("/run/systemd/notify")).is_ok());
    }

    #[test]
    fn watchdog_pings_at_half_the_timeout() {
        assert_eq!(
            ping_interval(Some(Duration::from_secs(30))),
            Some(Duration::from_secs(15))
        );
        assert_eq!(ping_interval(Some(Duration::ZERO)), None);
        assert_eq!(ping_interval(None), None);
    }

    // Multi-threaded: the test thread blocks on the socket while the task runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn supervise_reports_ready_at_once_then_each_phase_pings_and_stopping() {
        let (_env, _dir, server) = fake_systemd();
        let stats = Arc::new(Stats::default());
        let (tx, rx) = watch::channel(false);
        let n = Arc::new(Notifier::from_env().expect("usable").expect("set"));
        let task = tokio::spawn(supervise(
            n,
            stats.clone(),
            rx,
            Some(Duration::from_millis(50)),
            HealthLimits::default(),
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
        // Ready at once, before any phase is reached; pings in every phase.
        next("READY=1\nSTATUS=starting");
        next("WATCHDOG=1");
        next("WATCHDOG=1");
        *stats.waiting.lock().expect("lock") = Some("retrying: PostgreSQL is down".into());
        next("STATUS=retrying: PostgreSQL is down");
        next("WATCHDOG=1");
        *stats.waiting.lock().expect("lock") = Some("standby: slot busy".into());
        next("STATUS=standby: slot busy");
        next("WATCHDOG=1");
        *stats.waiting.lock().expect("lock") = None;
        stats.register(&[("items".into(), None)])[0].set_state(IndexState::Seeding);
        next("STATUS=seeding: backfilling 1 index");
        next("WATCHDOG=1");
        stats.set_streaming(true);
        next("STATUS=seeding: backfilling 1 index while streaming");
        stats
            .index(0)
            .expect("index")
            .set_state(IndexState::Streaming);
        next("STATUS=streaming");
        next("WATCHDOG=1");
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

    // Multi-threaded: the test thread blocks on the socket while the task runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watchdog_pings_stop_while_pending_work_makes_no_progress() {
        let (_env, _dir, server) = fake_systemd();
        server
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let stats = Arc::new(Stats::default());
        stats.register(&[("items".into(), None)])[0].set_state(IndexState::Streaming);
        stats.set_streaming(true);
        let (_tx, rx) = watch::channel(false);
        let n = Arc::new(Notifier::from_env().expect("usable").expect("set"));
        let limits = HealthLimits {
            stall: Duration::from_millis(300),
            ..HealthLimits::default()
        };
        let task = tokio::spawn(supervise(
            n,
            stats.clone(),
            rx,
            Some(Duration::from_millis(20)),
            limits,
        ));
        // Messages received during `span`.
        let during = |span: Duration| {
            let until = std::time::Instant::now() + span;
            let mut got = Vec::new();
            let mut buf = [0u8; 512];
            while std::time::Instant::now() < until {
                if let Ok(n) = server.recv(&mut buf) {
                    got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
            got
        };
        let pings = |m: &[String]| m.iter().filter(|m| m.trim_end() == "WATCHDOG=1").count();
        // Idle for longer than the stall limit: pings go on.
        let idle = during(Duration::from_millis(600));
        assert!(
            pings(&idle) >= 10,
            "an idle pipeline keeps pinging: {idle:?}"
        );
        // Work arrives and nothing progresses: pings stop after the limit.
        stats.transaction_began(100);
        let _ = during(Duration::from_millis(400));
        let wedged = during(Duration::from_millis(500));
        assert_eq!(
            pings(&wedged),
            0,
            "a stalled pipeline must not ping: {wedged:?}"
        );
        // Progress (the transaction is confirmed): pings resume.
        stats.transaction_committed(120, 1);
        stats.confirmed(120);
        let again = during(Duration::from_millis(400));
        assert!(pings(&again) >= 5, "pings resume with progress: {again:?}");
        task.abort();
    }
}
