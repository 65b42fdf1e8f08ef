//! A sink that is a log of bulk requests rather than a cluster: `file://`
//! (each request appended and fsynced before the write returns, rotated by
//! size, with the index catalog kept beside it in `<file>.ferry.json`) or
//! `stdout:` (each request written and flushed; the catalog lives in memory,
//! so every start writes a full copy of each index first).
//!
//! A log holds exactly the request bodies a cluster would get: the same
//! `_index` (the concrete generation), ids, routing and external versions.
//! Replaying it in order into a cluster, or folding it by version, gives
//! what ferry would have built there. Nothing is refused and nothing can be
//! read back, so the operator tools that read documents need a cluster.

mod appender;
mod catalog;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};

use crate::SinkError;
use appender::Appender;
use catalog::Catalog;

/// A file or stdout log and its index catalog.
pub(crate) struct Log {
    /// `file:///…` or `stdout:`, for messages.
    shown: String,
    out: Arc<Mutex<Output>>,
    catalog: Keeping,
}

enum Output {
    /// Opened (and locked) on the first append, so that tools which only
    /// read or mark the catalog (`check`, `plan`, `reindex`) work beside
    /// the running ferry that writes the file.
    File {
        path: PathBuf,
        rotate_at: u64,
        open: Option<Appender>,
    },
    Stdout,
}

/// Where the catalog lives.
enum Keeping {
    /// In `<file>.ferry.json`, read for every question and rewritten for
    /// every change, so a `ferry reindex` or `pause` run beside the daemon
    /// is seen by it.
    File(PathBuf),
    /// In memory (stdout: every start begins with an empty catalog).
    Memory(Mutex<Catalog>),
}

impl Log {
    /// The log at `path` (rotated past `rotate_at` bytes) and its catalog;
    /// the file itself is opened on the first append.
    pub(crate) fn file(path: &Path, rotate_at: u64) -> Result<Log, SinkError> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        if !dir.is_dir() {
            return Err(SinkError::Conflict(format!(
                "sink.url: directory {} of the log does not exist: create it (writable by ferry's user) or change sink.url",
                dir.display()
            )));
        }
        let state = with_suffix(path, ".ferry.json");
        Catalog::load(&state).map_err(|e| {
            SinkError::Conflict(format!(
                "sink.url: cannot use the log {}: {e}",
                path.display()
            ))
        })?;
        Ok(Log {
            shown: format!("file://{}", path.display()),
            out: Arc::new(Mutex::new(Output::File {
                path: path.to_path_buf(),
                rotate_at,
                open: None,
            })),
            catalog: Keeping::File(state),
        })
    }

    /// A log on standard output.
    pub(crate) fn stdout() -> Log {
        Log {
            shown: "stdout:".into(),
            out: Arc::new(Mutex::new(Output::Stdout)),
            catalog: Keeping::Memory(Mutex::new(Catalog::default())),
        }
    }

    /// `file:///…` or `stdout:`.
    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }

    /// Appends one encoded bulk request and returns once it is durable
    /// (fsynced; for stdout, flushed).
    pub(crate) async fn append(&self, body: Vec<u8>) -> Result<(), SinkError> {
        let out = self.out.clone();
        let shown = self.shown.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
            match &mut *out {
                Output::File {
                    path,
                    rotate_at,
                    open,
                } => {
                    let file = match open {
                        Some(file) => file,
                        None => open.insert(Appender::open(path, *rotate_at)?),
                    };
                    file.append(&body)
                }
                Output::Stdout => {
                    let mut stdout = std::io::stdout().lock();
                    stdout.write_all(&body).and_then(|()| stdout.flush())
                }
            }
        })
        .await
        .map_err(|e| SinkError::Conflict(format!("writing the log {shown} stopped: {e}")))?
        .map_err(|e| SinkError::Unreachable {
            url: self.shown.clone(),
            reason: format!("cannot append to the log: {e}"),
        })
    }

    /// Answers a question about the catalog.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Catalog) -> T) -> Result<T, SinkError> {
        match &self.catalog {
            Keeping::Memory(c) => Ok(f(&c.lock().unwrap_or_else(|p| p.into_inner()))),
            Keeping::File(path) => Ok(f(
                &Catalog::load(path).map_err(|e| self.state_error(path, e))?
            )),
        }
    }

    /// Changes the catalog and keeps it durably (file logs); `f` errs when
    /// the change cannot apply, and nothing is kept then.
    pub(crate) fn change(
        &self,
        f: impl FnOnce(&mut Catalog) -> Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        match &self.catalog {
            Keeping::Memory(c) => f(&mut c.lock().unwrap_or_else(|p| p.into_inner())),
            Keeping::File(path) => {
                let mut catalog = Catalog::load(path).map_err(|e| self.state_error(path, e))?;
                f(&mut catalog)?;
                catalog.save(path).map_err(|e| self.state_error(path, e))
            }
        }
    }

    fn state_error(&self, path: &Path, e: std::io::Error) -> SinkError {
        SinkError::Unreachable {
            url: self.shown.clone(),
            reason: format!("the index state {}: {e}", path.display()),
        }
    }

    /// The error for an index the catalog does not have.
    pub(crate) fn no_index(&self, concrete: &str) -> SinkError {
        SinkError::Conflict(format!(
            "index {concrete:?} is not in the state of the log {}; restart ferry, which creates it again",
            self.shown
        ))
    }

    /// Adds field mappings to `concrete`.
    pub(crate) fn extend(
        &self,
        concrete: &str,
        properties: Map<String, Value>,
    ) -> Result<(), SinkError> {
        self.change(|c| {
            if c.extend(concrete, properties) {
                Ok(())
            } else {
                Err(self.no_index(concrete))
            }
        })
    }
}

/// `<path><suffix>`.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}
