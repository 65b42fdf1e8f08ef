//! `ferry dead-letters …` and `ferry verify`: operator commands printing
//! plain-text reports on stdout.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

/// What to do with dead letters.
#[derive(Debug, Clone, Subcommand)]
pub enum DeadLetterAction {
    /// List rejected documents (index, id, status, reason, LSN).
    List,
    /// Rebuild each from its current row and write it; healed entries are removed.
    Retry,
    /// Delete the entries (the documents stay absent until their rows change).
    Purge,
}

macro_rules! out {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// Which sink an operator command acts on, and whether it goes around
/// the running ferry's control API.
pub struct At {
    /// `--sink NAME`.
    pub sink: Option<String>,
    /// `--direct`.
    pub direct: bool,
}

impl At {
    /// The configuration the command sees, and whether it acts directly:
    /// always with several sinks, whose daemon cannot be told which one.
    fn load(&self, config: &Path) -> Result<(ferry_config::Config, bool), ExitCode> {
        let all = crate::load(config)?;
        let several = all.sinks.list.len() > 1;
        let cfg = all.for_sink(self.sink.as_deref()).map_err(|e| {
            tracing::error!("{e}");
            ExitCode::from(2)
        })?;
        Ok((cfg, self.direct || several))
    }
}

/// Runs a dead-letter command.
pub async fn dead_letters(
    config: &Path,
    action: DeadLetterAction,
    index: Option<String>,
    page_size: usize,
    at: At,
) -> ExitCode {
    let (cfg, direct) = match at.load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let index = index.as_deref();
    if !direct && !matches!(action, DeadLetterAction::Purge) {
        match crate::remote::Remote::from_config(&cfg) {
            Err(code) => return code,
            Ok(Some(remote)) if matches!(action, DeadLetterAction::List) => {
                return crate::remote::dead_letters_list(&remote, index).await
            }
            Ok(Some(remote)) => return crate::remote::dead_letters_retry(&remote, index).await,
            Ok(None) => {}
        }
    }
    let result = match action {
        DeadLetterAction::List => {
            // Entries are printed as they are paged in; the count comes last.
            ferry_engine::ops::dead_letters_list(&cfg, index, page_size, |l| {
                out!(
                    "{}\t{}\t{}\t{}\t{}",
                    l.index,
                    l.id,
                    l.status,
                    l.lsn,
                    l.reason
                );
            })
            .await
            .map(|n| out!("{n} dead letter(s)"))
        }
        DeadLetterAction::Retry => ferry_engine::ops::dead_letters_retry(&cfg, index, page_size)
            .await
            .map(|(healed, failing)| out!("healed {healed}, still failing {failing}")),
        DeadLetterAction::Purge => ferry_engine::ops::dead_letters_purge(&cfg, index, page_size)
            .await
            .map(|n| out!("purged {n} dead letter(s)")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "dead-letters failed");
            ExitCode::FAILURE
        }
    }
}

/// What to do with the replication slot.
#[derive(Debug, Clone, Subcommand)]
pub enum SlotAction {
    /// Show the slot: state, positions, retained WAL.
    Info,
    /// Drop the slot (ferry must be stopped); the next run re-seeds every index.
    Drop {
        /// Confirm: dropping the slot discards its position.
        #[arg(long)]
        yes: bool,
    },
}

/// Runs `ferry slot info|drop`.
pub async fn slot(config: &Path, action: SlotAction) -> ExitCode {
    let cfg = match crate::load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = match action {
        SlotAction::Info => ferry_engine::ops::slot_info(&cfg).await.map(|info| match info {
            Some(lines) => {
                for (k, v) in lines {
                    out!("{k:<20} {v}");
                }
            }
            None => out!("slot {:?} does not exist (ferry run creates it)", cfg.source.slot),
        }),
        SlotAction::Drop { yes: false } => {
            out!("dropping the slot discards its position and makes the next `ferry run` re-seed every index; repeat with --yes");
            return ExitCode::from(2);
        }
        SlotAction::Drop { yes: true } => ferry_engine::ops::slot_drop(&cfg).await.map(|dropped| {
            if dropped {
                out!("dropped slot {:?}; the next `ferry run` creates a new one and re-seeds every index", cfg.source.slot)
            } else {
                out!("slot {:?} does not exist", cfg.source.slot)
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "slot command failed");
            ExitCode::FAILURE
        }
    }
}

/// Runs `ferry reindex NAME`: through the running ferry's control API when
/// a token is configured (the rebuild starts at once), else (or with
/// `--direct`) marks the index for a rebuild that the running ferry
/// performs on its next pipeline start (SIGHUP or restart).
pub async fn reindex(config: &Path, name: &str, at: At) -> ExitCode {
    let (cfg, direct) = match at.load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if !cfg.indexes.iter().any(|i| i.name == name) {
        tracing::error!("no [[index]] named {name:?} in the configuration");
        return ExitCode::from(2);
    }
    if !direct {
        match crate::remote::Remote::from_config(&cfg) {
            Err(code) => return code,
            Ok(Some(remote)) => return crate::remote::reindex(&remote, name).await,
            Ok(None) => {}
        }
    }
    let sink = match ferry_opensearch::Sink::from_config(cfg.sink()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "reindex failed");
            return ExitCode::FAILURE;
        }
    };
    match sink.request_reindex(name).await {
        Ok(cur) => {
            out!(
                "rebuild of {name} requested: send SIGHUP to ferry (systemctl reload ferry) or restart it; \
                 searches keep using {cur} until the new index is complete, then the alias moves"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "reindex failed");
            ExitCode::FAILURE
        }
    }
}

/// Runs `ferry verify`; exits 1 when differences remain.
pub async fn verify(
    config: &Path,
    index: Option<String>,
    sink: Option<String>,
    opts: ferry_engine::ops::VerifyOptions,
) -> ExitCode {
    let cfg = match crate::load_for(config, sink.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match ferry_engine::ops::verify(&cfg, index.as_deref(), opts).await {
        Ok(reports) => {
            let mut clean = true;
            for r in &reports {
                out!(
                    "{}: checked {}, missing {}, different {}, extra {}{}",
                    r.index,
                    r.checked,
                    r.missing,
                    r.different,
                    r.extra,
                    if opts.repair {
                        format!(", repaired {}, unrepairable {}", r.repaired, r.unrepairable)
                    } else {
                        String::new()
                    }
                );
                for (kind, id) in &r.examples {
                    out!("  {}\t{id}", kind.label());
                }
                for id in &r.unrepairable_examples {
                    out!("  unrepairable\t{id}");
                }
                if r.unrepairable > 0 {
                    out!(
                        "{}: {} document(s) could not be repaired in place: the cluster holds a version beyond \
                         PostgreSQL's WAL position (written outside ferry); rebuild the index with \
                         `ferry reindex {}`",
                        r.index,
                        r.unrepairable,
                        r.index
                    );
                }
                let fixed = opts.repair && r.unrepairable == 0 && r.repaired == r.drift();
                if !(r.is_clean() || fixed) {
                    clean = false;
                }
            }
            if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "verify failed");
            ExitCode::FAILURE
        }
    }
}
