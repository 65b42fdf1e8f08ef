//! A sink that is a log of bulk requests rather than a cluster: `file://`
//! (each request appended and fsynced before the write returns, rotated by
//! size, with the index catalog kept beside it in `<file>.ferry.json`) or
//! `stdout:` (each request written and flushed; the catalog lives in the
//! process's memory, so every start of ferry writes a full copy of each
//! index first).
//!
//! A log holds exactly the request bodies a cluster would get: the same
//! `_index` (the concrete generation), ids, routing and external versions.
//! Replaying it in order into a cluster, or folding it by version, gives
//! what ferry would have built there. Nothing is refused and nothing can be
//! read back, so the operator tools that read documents need a cluster.
//!
//! Every `Sink` of one log in a process (a restarted pipeline's, the
//! control API's) shares one open file and one catalog, so a restart does
//! not trip over its own lock and stdout keeps its catalog across restarts.

mod appender;
mod catalog;

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use serde_json::{Map, Value};

use ferry_core::stats::BulkClass;
use ferry_core::DocWrite;

use crate::{encode_bulk, BulkOutcome, SinkError};
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
    /// Opened (and locked) by [`Log::claim`] when ferry starts streaming,
    /// or by the first append, so that tools which only read or mark the
    /// catalog (`check`, `plan`, `reindex`) work beside the running ferry.
    File {
        path: PathBuf,
        rotate_at: u64,
        open: Option<Appender>,
    },
    Stdout,
}

/// Where the catalog lives.
enum Keeping {
    /// In `<file>.ferry.json`, read for every question and changed under
    /// an exclusive lock of `<file>.ferry.json.lock`, so changes from the
    /// daemon's tasks and from `ferry reindex` or `pause` beside it never
    /// overwrite one another.
    File(PathBuf),
    /// In memory, for the life of the process (stdout).
    Memory(Arc<Mutex<Catalog>>),
}

impl Log {
    /// The log at `path` (rotated past `rotate_at` bytes) and its catalog;
    /// the file itself is opened by [`Log::claim`] or the first append.
    pub(crate) fn file(path: &Path, rotate_at: u64) -> Result<Log, SinkError> {
        let shown = format!("file://{}", path.display());
        if path.is_dir() {
            return Err(SinkError::Conflict(format!(
                "sink.url: {} is a directory; name a file in it (e.g. file://{}/ferry.ndjson)",
                path.display(),
                path.display()
            )));
        }
        check_dir(path).map_err(|e| SinkError::Conflict(format!("sink.url: {e}")))?;
        let dir = parent(path);
        // One spelling per file, so every `Sink` of it shares one output.
        let path = &match (dir.canonicalize(), path.file_name()) {
            (Ok(dir), Some(name)) => dir.join(name),
            _ => path.to_path_buf(),
        };
        let state = with_suffix(path, ".ferry.json");
        Catalog::load(&state).map_err(|e| log_error(&shown, "read its index state", e))?;
        Ok(Log {
            out: shared_file(path, rotate_at),
            catalog: Keeping::File(state),
            shown,
        })
    }

    /// The log on standard output.
    pub(crate) fn stdout() -> Log {
        static CATALOG: OnceLock<Arc<Mutex<Catalog>>> = OnceLock::new();
        static OUT: OnceLock<Arc<Mutex<Output>>> = OnceLock::new();
        Log {
            shown: "stdout:".into(),
            out: OUT
                .get_or_init(|| Arc::new(Mutex::new(Output::Stdout)))
                .clone(),
            catalog: Keeping::Memory(CATALOG.get_or_init(Default::default).clone()),
        }
    }

    /// `file:///…` or `stdout:`.
    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }

    /// Opens the file now: takes its lock (a second ferry on the same
    /// file is refused before it changes anything) and cuts an unfinished
    /// action off its end.
    pub(crate) async fn claim(&self) -> Result<(), SinkError> {
        self.with_output(|_| Ok(())).await
    }

    /// Appends `writes` as one bulk request, encoded as a cluster would get
    /// it (`index_names[w.index]` is the concrete index of `w`), and
    /// returns once it is durable. Versions are for the log's reader to
    /// apply, so every write counts as written. A failure is counted as a
    /// retried bulk attempt: the pipeline restarts and writes it again, and
    /// failing writes in a row turn readiness off as a cluster's would.
    pub(crate) async fn write(
        &self,
        writes: &[DocWrite],
        index_names: &[String],
        stats: Option<&crate::Observer>,
    ) -> Result<BulkOutcome, SinkError> {
        if writes.is_empty() {
            return Ok(BulkOutcome::default());
        }
        let mut body = Vec::with_capacity(writes.iter().map(DocWrite::weight).sum::<usize>());
        encode_bulk(&writes.iter().collect::<Vec<_>>(), index_names, &mut body);
        let appended = self.append(body).await;
        if let Some(stats) = stats {
            stats.bulk_request(BulkClass::of(appended.as_ref().ok().map(|()| 200)));
            match &appended {
                Ok(()) => stats.bulk_completed(),
                Err(_) => stats.bulk_retried(),
            }
        }
        appended?;
        Ok(BulkOutcome {
            requests: 1,
            written: writes.len() as u64,
            ..BulkOutcome::default()
        })
    }

    /// Appends one encoded bulk request and returns once it is durable
    /// (fsynced; for stdout, flushed).
    async fn append(&self, body: Vec<u8>) -> Result<(), SinkError> {
        self.with_output(move |out| match out {
            Some(file) => file.append(&body),
            None => {
                let mut stdout = io::stdout().lock();
                stdout.write_all(&body).and_then(|()| stdout.flush())
            }
        })
        .await
    }

    /// Runs `f` on the open file (`None` for stdout), opening it first.
    /// After a failure the file is closed, so the next use opens it again
    /// and cuts whatever the failure left at its end.
    async fn with_output(
        &self,
        f: impl FnOnce(Option<&mut Appender>) -> io::Result<()> + Send + 'static,
    ) -> Result<(), SinkError> {
        let out = self.out.clone();
        let done = tokio::task::spawn_blocking(move || {
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
                    let done = f(Some(file));
                    if done.is_err() {
                        *open = None;
                    }
                    done
                }
                Output::Stdout => f(None),
            }
        })
        .await
        .map_err(|e| SinkError::Conflict(format!("writing the log {} stopped: {e}", self.shown)))?;
        done.map_err(|e| log_error(&self.shown, "append to it", e))
    }

    /// Answers a question about the catalog.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Catalog) -> T) -> Result<T, SinkError> {
        match &self.catalog {
            Keeping::Memory(c) => Ok(f(&c.lock().unwrap_or_else(|p| p.into_inner()))),
            Keeping::File(path) => Ok(f(&Catalog::load(path)
                .map_err(|e| log_error(&self.shown, "read its index state", e))?)),
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
                let fail = |e| log_error(&self.shown, "change its index state", e);
                let lock = appender::open_lock_file(&with_suffix(path, ".lock")).map_err(fail)?;
                lock.lock().map_err(fail)?;
                let mut catalog = Catalog::load(path).map_err(fail)?;
                f(&mut catalog)?;
                catalog.save(path).map_err(fail)
            }
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

    /// Changes `_meta.ferry` of `concrete` with `change`, in one change
    /// of the catalog.
    pub(crate) fn modify_meta(
        &self,
        concrete: &str,
        change: impl FnOnce(&mut Value) -> Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        self.change(|c| {
            let mut meta = c.mapping(concrete)["_meta"]["ferry"].clone();
            change(&mut meta)?;
            if c.set_meta(concrete, meta) {
                Ok(())
            } else {
                Err(self.no_index(concrete))
            }
        })
    }
}

/// The one output of the file at `path` in this process.
fn shared_file(path: &Path, rotate_at: u64) -> Arc<Mutex<Output>> {
    type Open = Mutex<HashMap<PathBuf, Weak<Mutex<Output>>>>;
    static OPEN: OnceLock<Open> = OnceLock::new();
    let mut open = OPEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    open.retain(|_, out| out.strong_count() > 0);
    if let Some(out) = open.get(path).and_then(Weak::upgrade) {
        // A reloaded configuration may change the rotation size.
        if let Output::File {
            rotate_at: at,
            open: file,
            ..
        } = &mut *out.lock().unwrap_or_else(|p| p.into_inner())
        {
            *at = rotate_at;
            if let Some(file) = file {
                file.set_rotate_at(rotate_at);
            }
        }
        return out;
    }
    let out = Arc::new(Mutex::new(Output::File {
        path: path.to_path_buf(),
        rotate_at,
        open: None,
    }));
    open.insert(path.to_path_buf(), Arc::downgrade(&out));
    out
}

/// A failed use of the log, retried when waiting can help (a full disk,
/// another process holding the file) and left to the operator otherwise.
fn log_error(shown: &str, what: &str, e: io::Error) -> SinkError {
    use io::ErrorKind::*;
    SinkError::Log {
        log: shown.to_string(),
        reason: format!("cannot {what}: {e}"),
        retry: matches!(
            e.kind(),
            StorageFull | QuotaExceeded | WouldBlock | Interrupted | TimedOut | ResourceBusy
        ),
    }
}

/// `<path><suffix>`.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The directory `path` is in (`.` for a bare name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Makes the creation, renaming or removal of `path` durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    std::fs::File::open(parent(path))?.sync_all()
}

/// An error naming the directory of `path` when it does not exist.
fn check_dir(path: &Path) -> io::Result<()> {
    let dir = parent(path);
    if dir.is_dir() {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "directory {} of the log does not exist: create it (writable by ferry's user) or change sink.url",
            dir.display()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_changes_of_the_index_state_all_land() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.ndjson");
        std::thread::scope(|s| {
            for t in 0..4 {
                let path = &path;
                s.spawn(move || {
                    // Each thread with its own `Log`, as separate processes.
                    let log = Log::file(path, 1 << 20).expect("log");
                    for i in 0..50 {
                        log.change(|c| {
                            c.create(&format!("i-{t}-{i}"), &Value::Null);
                            Ok(())
                        })
                        .expect("change");
                    }
                });
            }
        });
        let log = Log::file(&path, 1 << 20).expect("log");
        let names = log.read(|c| c.metas_under("i-")).expect("read");
        assert_eq!(names.len(), 200);
    }

    #[test]
    fn a_directory_is_refused_as_the_log_naming_a_file_in_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = Log::file(dir.path(), 4096).err().expect("refused");
        assert!(e.to_string().contains("is a directory"), "{e}");
    }
}
