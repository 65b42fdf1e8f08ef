//! The control API's actor: carries out the [`Action`]s the admin endpoint
//! receives (`/control/…`) against the running ferry.
//!
//! Marks live with the data, as `ferry reindex` leaves them: a reindex or a
//! pause marks the index the alias serves (`_meta.ferry`), then the actor
//! restarts the pipeline (as SIGHUP does: the batch in flight is flushed
//! and confirmed first), which applies the mark at start-up.
//!
//! **Pause** means "stop writing, rebuild on resume": the paused index keeps
//! answering searches as it was, none of its changes are routed (no SQL, no
//! writes), and the slot is confirmed as usual, so a pause never holds WAL
//! back. Resuming rebuilds it beside the paused one from a fresh snapshot
//! (what it missed is read from the rows again) and moves the alias when the
//! copy is complete. A pause survives restarts, and a copy that was being
//! built when the index was paused is deleted (it lacks the skipped changes).

use std::sync::{Arc, Mutex};

use ferry_admin::{Action, ControlError, ControlRequest};
use ferry_config::Config;
use ferry_engine::ops::{VerifyOptions, VerifyReport};
use ferry_engine::{EngineError, Stats};
use ferry_opensearch::{Sink, SinkError};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

/// Entries read per request while listing or retrying dead letters.
const PAGE: usize = 1000;

/// The running or last verify started through the API.
#[derive(Debug, Default)]
enum VerifyRun {
    #[default]
    Never,
    Running(Value),
    Done(Value, Vec<VerifyReport>),
    Failed(Value, String),
}

#[derive(Clone)]
struct Actor {
    configs: watch::Receiver<Config>,
    restart: Arc<watch::Sender<Config>>,
    stats: Arc<Stats>,
    verify: Arc<Mutex<VerifyRun>>,
}

/// Starts the actor; the returned sender goes to
/// [`ferry_admin::ControlApi::new`]. `restart` is the configuration watch
/// the engine restarts its pipeline on.
pub fn spawn(
    configs: watch::Receiver<Config>,
    restart: Arc<watch::Sender<Config>>,
    stats: Arc<Stats>,
) -> mpsc::Sender<ControlRequest> {
    let (tx, mut rx) = mpsc::channel::<ControlRequest>(16);
    let actor = Actor {
        configs,
        restart,
        stats,
        verify: Arc::default(),
    };
    tokio::spawn(async move {
        while let Some(req) = rx.recv().await {
            let actor = actor.clone();
            // Its own task: a request whose connection closes (the admin
            // endpoint's 10 s limit) still finishes what it started.
            tokio::spawn(async move {
                let what = format!("{:?}", req.action);
                let answer = actor.act(req.action).await;
                match &answer {
                    Ok(_) => tracing::info!(action = %what, "control API: done"),
                    Err(e) => tracing::warn!(action = %what, error = %e, "control API: refused"),
                }
                let _ = req.reply.send(answer);
            });
        }
    });
    tx
}

fn failed(e: impl std::fmt::Display) -> ControlError {
    ControlError::Failed(e.to_string())
}

fn sink_error(e: SinkError) -> ControlError {
    match e {
        SinkError::Conflict(m) => ControlError::Conflict(m),
        e => failed(e),
    }
}

impl Actor {
    fn config(&self) -> Config {
        self.configs.borrow().clone()
    }

    /// Restarts the pipeline with the running configuration.
    fn restart_pipeline(&self) {
        self.restart.send_modify(|_| {});
    }

    async fn act(&self, action: Action) -> Result<Value, ControlError> {
        let cfg = self.config();
        match action {
            Action::Indexes => Ok(self.indexes()),
            Action::Reindex(name) => {
                let done = on_each_sink(&cfg, &name, |sink, n| async move {
                    sink.request_reindex(&n).await
                })
                .await?;
                self.restart_pipeline();
                Ok(with_sinks(
                    json!({"index": name, "serving": done.serving, "rebuilding": true}),
                    done.sinks,
                ))
            }
            Action::Pause(name) => {
                let done = on_each_sink(&cfg, &name, |sink, n| async move {
                    sink.set_paused(&n, true).await
                })
                .await?;
                self.restart_pipeline();
                Ok(with_sinks(
                    json!({"index": name, "serving": done.serving, "paused": true}),
                    done.sinks,
                ))
            }
            Action::Resume(name) => {
                let done = on_each_sink(&cfg, &name, |sink, n| async move {
                    sink.set_paused(&n, false).await
                })
                .await?;
                self.restart_pipeline();
                Ok(with_sinks(
                    json!({"index": name, "serving": done.serving, "paused": false, "rebuilding": true}),
                    done.sinks,
                ))
            }
            Action::DeadLetters { index, limit } => {
                known(&cfg, index.as_deref())?;
                one_sink(&cfg)?;
                let mut entries = Vec::new();
                let count =
                    ferry_engine::ops::dead_letters_list(&cfg, index.as_deref(), PAGE, |l| {
                        if entries.len() < limit {
                            entries.push(json!({
                                "index": l.index, "id": l.id, "status": l.status,
                                "reason": l.reason, "lsn": l.lsn.to_string(),
                            }));
                        }
                    })
                    .await
                    .map_err(failed)?;
                Ok(json!({"count": count, "entries": entries}))
            }
            Action::RetryDeadLetters { index } => {
                known(&cfg, index.as_deref())?;
                one_sink(&cfg)?;
                let (healed, failing) =
                    ferry_engine::ops::dead_letters_retry(&cfg, index.as_deref(), PAGE)
                        .await
                        .map_err(failed)?;
                Ok(json!({"healed": healed, "still_failing": failing}))
            }
            Action::StartVerify {
                index,
                sample,
                repair,
            } => {
                known(&cfg, index.as_deref())?;
                one_sink(&cfg)?;
                self.start_verify(cfg, index, sample, repair)
            }
            Action::VerifyStatus => Ok(self.verify_status()),
        }
    }

    /// Every index with its state and counters, from the engine's stats.
    fn indexes(&self) -> Value {
        use std::sync::atomic::Ordering::Relaxed;
        let list = self
            .stats
            .indexes
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default();
        let indexes: Vec<Value> = list
            .iter()
            .map(|ix| {
                json!({
                    "name": ix.name,
                    "sink": ix.sink,
                    "state": ix.state().as_str(),
                    "docs_written": ix.docs_written.load(Relaxed),
                    "docs_deleted": ix.docs_deleted.load(Relaxed),
                    "docs_superseded": ix.docs_superseded.load(Relaxed),
                    "docs_rejected": ix.docs_rejected.load(Relaxed),
                    "dead_letters": ix.dead_letters.load(Relaxed),
                    "backfill_rows": ix.backfill_rows.load(Relaxed),
                    "backfill_total": ix.backfill_total.load(Relaxed),
                    "last_error": ix.last_error.lock().ok().and_then(|e| e.clone()),
                })
            })
            .collect();
        json!({ "indexes": indexes })
    }

    fn start_verify(
        &self,
        cfg: Config,
        index: Option<String>,
        sample: Option<usize>,
        repair: bool,
    ) -> Result<Value, ControlError> {
        let started = json!({
            "index": index, "sample": sample, "repair": repair,
            "started_at": unix_now(),
        });
        {
            let mut run = self.verify.lock().unwrap_or_else(|p| p.into_inner());
            if matches!(*run, VerifyRun::Running(_)) {
                return Err(ControlError::Conflict(
                    "a verify is already running; GET /control/verify shows it".into(),
                ));
            }
            *run = VerifyRun::Running(started.clone());
        }
        let slot = self.verify.clone();
        let params = started.clone();
        tokio::spawn(async move {
            let opts = VerifyOptions {
                sample,
                repair,
                page_size: PAGE,
            };
            let result = ferry_engine::ops::verify(&cfg, index.as_deref(), opts).await;
            let mut run = slot.lock().unwrap_or_else(|p| p.into_inner());
            *run = match result {
                Ok(reports) => VerifyRun::Done(params, reports),
                Err(e) => VerifyRun::Failed(params, e.to_string()),
            };
        });
        Ok(json!({"state": "running", "run": started}))
    }

    fn verify_status(&self) -> Value {
        let run = self.verify.lock().unwrap_or_else(|p| p.into_inner());
        match &*run {
            VerifyRun::Never => json!({"state": "never"}),
            VerifyRun::Running(p) => json!({"state": "running", "run": p}),
            VerifyRun::Failed(p, e) => json!({"state": "failed", "run": p, "error": e}),
            VerifyRun::Done(p, reports) => json!({
                "state": "done",
                "run": p,
                "clean": reports.iter().all(|r| r.is_clean()
                    || (r.unrepairable == 0 && r.repaired == r.drift() && p["repair"] == json!(true))),
                "reports": reports.iter().map(report_json).collect::<Vec<_>>(),
            }),
        }
    }
}

fn report_json(r: &VerifyReport) -> Value {
    json!({
        "index": r.index,
        "checked": r.checked,
        "missing": r.missing,
        "different": r.different,
        "extra": r.extra,
        "repaired": r.repaired,
        "unrepairable": r.unrepairable,
        "examples": r.examples.iter().map(|(k, id)| json!({"kind": k.label(), "id": id})).collect::<Vec<_>>(),
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `NotFound` unless `name` (when given) is a configured index.
fn known(cfg: &Config, name: Option<&str>) -> Result<(), ControlError> {
    match name {
        Some(n) if !cfg.indexes.iter().any(|i| i.name == n) => Err(ControlError::NotFound(
            format!("no [[index]] named {n:?} in the running configuration"),
        )),
        _ => Ok(()),
    }
}

/// What an action on an index did on its sinks.
struct OnSinks {
    /// The index the alias serves, on the first sink that took the action.
    serving: String,
    /// With named sinks: each sink's answer (the index served, or why not).
    sinks: Option<serde_json::Map<String, Value>>,
}

/// Runs `act` on every sink index `name` goes to, each one whatever the
/// others answered (a sink already in the asked state refuses with a
/// conflict, and the others must still follow). Fails only when every sink
/// refused, with the first refusal.
async fn on_each_sink<F, Fut>(cfg: &Config, name: &str, act: F) -> Result<OnSinks, ControlError>
where
    F: Fn(Sink, String) -> Fut,
    Fut: std::future::Future<Output = Result<String, SinkError>>,
{
    known(cfg, Some(name))?;
    let Some(ix) = cfg.indexes.iter().find(|i| i.name == name) else {
        return Err(ControlError::NotFound(format!(
            "no [[index]] named {name:?}"
        )));
    };
    let mut serving = None;
    let mut first_error = None;
    let mut answers = serde_json::Map::new();
    for pos in cfg.sinks_of(ix) {
        let named = &cfg.sinks.list[pos];
        let sink = Sink::from_config(&named.config).map_err(|e| failed(EngineError::from(e)))?;
        match act(sink, name.to_string()).await {
            Ok(now) => {
                answers.insert(named.name.clone(), json!({"serving": now}));
                serving.get_or_insert(now);
            }
            Err(e) => {
                answers.insert(named.name.clone(), json!({"error": e.to_string()}));
                first_error.get_or_insert(e);
            }
        }
    }
    match (serving, first_error) {
        (Some(serving), _) => Ok(OnSinks {
            serving,
            sinks: cfg.sinks.named.then_some(answers),
        }),
        (None, Some(e)) => Err(sink_error(e)),
        (None, None) => Err(ControlError::NotFound(format!(
            "index {name:?} goes to no sink"
        ))),
    }
}

/// `body` with a `sinks` member when there are named sinks.
fn with_sinks(mut body: Value, sinks: Option<serde_json::Map<String, Value>>) -> Value {
    if let Some(s) = sinks {
        body["sinks"] = Value::Object(s);
    }
    body
}

/// `BadRequest` when the running configuration has several sinks: the
/// action reads one cluster, which the request cannot name.
fn one_sink(cfg: &Config) -> Result<(), ControlError> {
    match cfg.for_sink(None) {
        Ok(_) => Ok(()),
        Err(e) => Err(ControlError::BadRequest(format!(
            "{e} (run the command beside the daemon with --direct --sink NAME)"
        ))),
    }
}
