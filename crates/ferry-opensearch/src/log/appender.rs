//! The file a `file://` sink appends bulk requests to: each request is
//! written whole and fsynced before `append` returns, and the file is
//! rotated between requests. When the file is opened again after a crash,
//! an unfinished action at its end is cut off; whole actions of a request
//! that was not acknowledged stay, and the replay writes them again with
//! the same versions. After any failed append the owner drops the
//! `Appender` and opens the file again, which makes the same cut.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use super::{check_dir, parent, sync_dir, with_suffix};

/// The open log file.
pub(crate) struct Appender {
    path: PathBuf,
    file: File,
    len: u64,
    rotate_at: u64,
    /// The number the file gets when it is rotated (`<file>.<n>`).
    next_number: u64,
}

impl Appender {
    /// Opens (or creates) the log at `path`, cutting an unfinished request
    /// off its end.
    pub(crate) fn open(path: &Path, rotate_at: u64) -> io::Result<Appender> {
        check_dir(path)?;
        hold_writer_lock(path)?;
        finish_interrupted_rotation(path)?;
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        sync_dir(path)?;
        let len = file.metadata()?.len();
        let whole = whole_requests_len(&file, path)?;
        if whole < len {
            file.set_len(whole)?;
            file.sync_all()?;
            tracing::warn!(
                file = %path.display(),
                cut = len - whole,
                "cut an unfinished request off the end of the log (a crash interrupted it; it was not acknowledged and is written again)"
            );
        }
        Ok(Appender {
            next_number: highest_rotated(path)? + 1,
            path: path.to_path_buf(),
            file,
            len: whole,
            rotate_at,
        })
    }

    /// Changes the size past which the file is rotated.
    pub(crate) fn set_rotate_at(&mut self, rotate_at: u64) {
        self.rotate_at = rotate_at;
    }

    /// Appends one whole request and makes it durable; rotates first when
    /// it would take a non-empty file past the limit. After an error the
    /// `Appender` must not be used again (see the module docs).
    pub(crate) fn append(&mut self, body: &[u8]) -> io::Result<()> {
        if self.len > 0 && self.len + body.len() as u64 > self.rotate_at {
            self.rotate()?;
        }
        self.file.write_all(body)?;
        self.file.sync_data()?;
        self.len += body.len() as u64;
        Ok(())
    }

    /// Gives the full file the name `<file>.<n>` and starts an empty one.
    /// The new name is linked, never renamed over: a file already holding
    /// it (a crash between link and unlink) is an error, not replaced.
    fn rotate(&mut self) -> io::Result<()> {
        let done = numbered(&self.path, self.next_number);
        std::fs::hard_link(&self.path, &done)?;
        self.next_number += 1;
        std::fs::remove_file(&self.path)?;
        sync_dir(&self.path)?;
        self.len = 0;
        self.file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)?;
        sync_dir(&self.path)?;
        tracing::info!(file = %done.display(), "rotated the log");
        Ok(())
    }
}

/// Takes `<file>.lock` for this process, once, and holds it until the
/// process ends: reopening the file after a restart of the pipeline or a
/// failed append never lets another ferry in between.
fn hold_writer_lock(path: &Path) -> io::Result<()> {
    static HELD: OnceLock<Mutex<HashMap<PathBuf, File>>> = OnceLock::new();
    let mut held = HELD
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if held.contains_key(path) {
        return Ok(());
    }
    let lock_path = with_suffix(path, ".lock");
    let lock = open_lock_file(&lock_path)?;
    match lock.try_lock() {
        Ok(()) => {
            held.insert(path.to_path_buf(), lock);
            Ok(())
        }
        Err(std::fs::TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "another process writes this log (it holds {}): stop it or give this ferry its own file",
                lock_path.display()
            ),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(io::Error::new(
            e.kind(),
            format!("cannot lock {}: {e}", lock_path.display()),
        )),
    }
}

/// Opens a lock file, read-only when it exists (a lock file another user
/// created stays usable: `flock` needs no write access), else creates it.
pub(crate) fn open_lock_file(path: &Path) -> io::Result<File> {
    match File::open(path) {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path),
        Err(e) => Err(e),
    }
}

/// A crash between linking the full file to `<file>.<n>` and unlinking
/// `<file>` leaves one file under both names: finish the rotation, so no
/// append lands in a rotated file.
fn finish_interrupted_rotation(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(current) = std::fs::metadata(path) else {
        return Ok(());
    };
    let highest = highest_rotated(path)?;
    if current.nlink() < 2 || highest == 0 {
        return Ok(());
    }
    let rotated = std::fs::metadata(numbered(path, highest))?;
    if rotated.dev() == current.dev() && rotated.ino() == current.ino() {
        std::fs::remove_file(path)?;
        sync_dir(path)?;
        tracing::info!(file = %path.display(), "finished a rotation a crash interrupted");
    }
    Ok(())
}

/// `<file>.<n>`.
fn numbered(path: &Path, n: u64) -> PathBuf {
    with_suffix(path, &format!(".{n}"))
}

/// The highest `n` of the rotated files `<file>.<n>` (0 when none).
fn highest_rotated(path: &Path) -> io::Result<u64> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(0);
    };
    let prefix = format!("{name}.");
    let mut highest = 0;
    for entry in std::fs::read_dir(parent(path))? {
        let entry = entry?;
        if let Some(n) = entry
            .file_name()
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|n| n.parse::<u64>().ok())
        {
            highest = highest.max(n);
        }
    }
    Ok(highest)
}

/// The length of the file's longest prefix made of whole bulk actions (an
/// `index` action and its source line, or a `delete` action). The file
/// starts at a request boundary, so lines pair up unambiguously from the
/// start. A line with NUL bytes where an action must start, with nothing
/// that looks like an action after it, is what a power loss can leave of
/// unsynced data (it is cut then); any other line that is no action means
/// the file is not ferry's log or was changed by something else: an error
/// naming the offset, never a cut.
fn whole_requests_len(file: &File, path: &Path) -> io::Result<u64> {
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut line = Vec::new();
    let mut whole = 0u64;
    let mut at = 0u64;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)? as u64;
        if n == 0 || line.last() != Some(&b'\n') {
            return Ok(whole);
        }
        let needs_source = if line.starts_with(b"{\"index\":") {
            true
        } else if line.starts_with(b"{\"delete\":") {
            false
        } else if line.contains(&0) && !an_action_follows(&mut reader)? {
            return Ok(whole);
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is not a log ferry wrote: byte {at} starts no bulk action; \
                     move the file away (or point sink.url elsewhere) and restart",
                    path.display()
                ),
            ));
        };
        at += n;
        if needs_source {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)? as u64;
            if n == 0 || line.last() != Some(&b'\n') {
                return Ok(whole);
            }
            at += n;
        }
        whole = at;
    }
}

/// Whether a line starting like one of ferry's actions comes later.
fn an_action_follows(reader: &mut impl BufRead) -> io::Result<bool> {
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(false);
        }
        if line.starts_with(b"{\"index\":") || line.starts_with(b"{\"delete\":") {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INDEX: &[u8] = b"{\"index\":{\"_index\":\"u-1\",\"_id\":\"1\",\"version\":5,\"version_type\":\"external_gte\"}}\n{\"id\":1}\n";
    const DELETE: &[u8] =
        b"{\"delete\":{\"_index\":\"u-1\",\"_id\":\"2\",\"version\":6,\"version_type\":\"external_gte\"}}\n";

    #[test]
    fn an_unfinished_request_is_cut_at_the_last_whole_action_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.ndjson");
        let mut body = [INDEX, DELETE].concat();
        let whole = body.len() as u64;
        // A crash after the action line of an index, and one mid-line.
        for torn in [
            &INDEX[..INDEX.iter().position(|b| *b == b'\n').expect("nl") + 1],
            &INDEX[..10],
        ] {
            let mut b = body.clone();
            b.extend_from_slice(torn);
            std::fs::write(&path, &b).expect("write");
            let mut log = Appender::open(&path, 1 << 20).expect("open");
            assert_eq!(std::fs::metadata(&path).expect("meta").len(), whole);
            log.append(DELETE).expect("append");
            body = std::fs::read(&path).expect("read");
            assert!(body.ends_with(&[DELETE, DELETE].concat()));
            std::fs::write(&path, &body[..whole as usize]).expect("reset");
            body.truncate(whole as usize);
        }
    }

    proptest::proptest! {
        /// Whatever the documents hold (lines that look like actions
        /// included), a log cut anywhere keeps exactly its whole actions.
        #[test]
        fn a_log_cut_anywhere_keeps_exactly_its_whole_actions(
            ops in proptest::collection::vec(
                proptest::option::of("(\\{\"index\":\\{|\\{\"delete\":|x)[a-z\"{}:]{0,12}"),
                1..12,
            ),
            cut in 0.0f64..1.0,
        ) {
            let mut log = Vec::new();
            let mut boundaries = vec![0u64];
            for source in &ops {
                match source {
                    Some(doc) => {
                        log.extend_from_slice(b"{\"index\":{\"_id\":\"1\"}}\n");
                        log.extend_from_slice(doc.as_bytes());
                        log.push(b'\n');
                    }
                    None => log.extend_from_slice(b"{\"delete\":{\"_id\":\"1\"}}\n"),
                }
                boundaries.push(log.len() as u64);
            }
            let at = (log.len() as f64 * cut) as usize;
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("log.ndjson");
            std::fs::write(&path, &log[..at]).expect("write");
            let file = File::open(&path).expect("open");
            let kept = whole_requests_len(&file, &path).expect("our own log parses");
            let want = boundaries.iter().copied().filter(|b| *b <= at as u64).max();
            proptest::prop_assert_eq!(Some(kept), want);
        }
    }

    #[test]
    fn garbage_after_the_last_whole_action_is_cut_as_a_crash_leaves_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.ndjson");
        std::fs::write(&path, [INDEX, b"\0\0\0\0\n\0\0"].concat()).expect("write");
        Appender::open(&path, 1 << 20).expect("open");
        assert_eq!(std::fs::read(&path).expect("read"), INDEX);
    }

    #[test]
    fn rotation_never_replaces_a_file_holding_the_next_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.ndjson");
        let mut log = Appender::open(&path, INDEX.len() as u64).expect("open");
        log.append(INDEX).expect("append");
        // Something took the next number after the log was opened.
        std::fs::write(numbered(&path, 1), DELETE).expect("squat");
        assert!(log.append(INDEX).is_err());
        assert_eq!(std::fs::read(numbered(&path, 1)).expect("read"), DELETE);
        assert_eq!(std::fs::read(&path).expect("read"), INDEX);
        drop(log);
        // Opened again, it rotates past it.
        let mut log = Appender::open(&path, INDEX.len() as u64).expect("reopen");
        log.append(DELETE).expect("append");
        assert_eq!(std::fs::read(numbered(&path, 2)).expect("read"), INDEX);
        assert_eq!(std::fs::read(&path).expect("read"), DELETE);
    }

    #[test]
    fn a_file_that_is_not_a_bulk_log_is_refused_not_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.ndjson");
        std::fs::write(&path, [INDEX, b"hello\n", DELETE].concat()).expect("write");
        let e = Appender::open(&path, 1 << 20).err().expect("refused");
        assert!(
            e.to_string().contains(&format!("byte {}", INDEX.len())),
            "{e}"
        );
        assert_eq!(
            std::fs::metadata(&path).expect("meta").len() as usize,
            INDEX.len() + 6 + DELETE.len()
        );
    }

    #[test]
    fn rotation_happens_between_requests_and_numbers_files_upwards() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.ndjson");
        let limit = (INDEX.len() * 2) as u64;
        let mut log = Appender::open(&path, limit).expect("open");
        for _ in 0..5 {
            log.append(INDEX).expect("append");
        }
        drop(log);
        // Reopening continues the numbering.
        let mut log = Appender::open(&path, limit).expect("reopen");
        log.append(INDEX).expect("append");
        log.append(INDEX).expect("append");
        for n in 1..=3 {
            let f = std::fs::read(numbered(&path, n)).expect("rotated file");
            assert_eq!(
                f,
                [INDEX, INDEX].concat(),
                "file {n} holds two whole requests"
            );
        }
        assert!(!numbered(&path, 4).exists());
        assert_eq!(std::fs::read(&path).expect("current"), INDEX);
    }

    #[test]
    fn a_log_locked_by_another_process_is_refused_and_this_process_keeps_its_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.ndjson");
        let lock = with_suffix(&path, ".lock");
        let other = open_lock_file(&lock).expect("lock file");
        other.lock().expect("the other writer's lock");
        let e = Appender::open(&path, 4096).err().expect("refused");
        assert!(e.to_string().contains("another process"), "{e}");
        drop(other);
        drop(Appender::open(&path, 4096).expect("free now"));
        // Closed, the file stays this process's: nobody takes it in between.
        let other = open_lock_file(&lock).expect("lock file");
        assert!(other.try_lock().is_err());
        Appender::open(&path, 4096).expect("reopened by this process");
    }

    #[test]
    fn a_file_without_any_bulk_action_is_refused_not_wiped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let foreign = b"{\n  \"aliases\": {}\n}\n";
        std::fs::write(&path, foreign).expect("write");
        assert!(Appender::open(&path, 4096).is_err());
        assert_eq!(std::fs::read(&path).expect("read"), foreign);
    }

    #[test]
    fn a_rotation_a_crash_interrupted_is_finished_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.ndjson");
        std::fs::write(&path, INDEX).expect("write");
        std::fs::hard_link(&path, numbered(&path, 1)).expect("link");
        let mut log = Appender::open(&path, 1 << 20).expect("open");
        log.append(DELETE).expect("append");
        assert_eq!(std::fs::read(numbered(&path, 1)).expect("read"), INDEX);
        assert_eq!(std::fs::read(&path).expect("read"), DELETE);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_it() {
        let e = Appender::open(Path::new("/nonexistent-ferry-dir/log.ndjson"), 4096)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("/nonexistent-ferry-dir"), "{e}");
    }
}
