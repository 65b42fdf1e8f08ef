//! Process and port helpers for launching local servers (also used by the
//! test kit's OpenSearch node launcher).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::sync::mpsc;
use std::time::Duration;

use crate::error::{LaunchError, Result};

/// Asks the OS for a currently unused TCP port on 127.0.0.1.
///
/// The port is released before returning, so another process could grab it
/// in the meantime; callers that bind it later should be ready to retry.
pub fn try_free_port() -> Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| LaunchError::io("binding 127.0.0.1:0 to find a free port", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| LaunchError::io("reading the address of a probe socket", e))?;
    Ok(addr.port())
}

/// Looks `name` up in the directories listed in `$PATH`.
pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// True if `path` is a regular file with an execute bit set.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Joins a process's stdout and stderr into one readable string.
pub(crate) fn render_output(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut text = String::new();
    if !stdout.trim().is_empty() {
        text.push_str(stdout.trim_end());
    }
    if !stderr.trim().is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(stderr.trim_end());
    }
    text
}

/// Returns at most the last `lines` lines of a text file (or a note saying
/// why it could not be read).
pub(crate) fn file_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            all[start..].join("\n")
        }
        Err(e) => format!("<could not read {}: {e}>", path.display()),
    }
}

/// Quotes one word for a POSIX shell.
pub(crate) fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Waits up to `timeout` for the first stdout line of `child` (a server
/// announcing itself), then keeps draining its stdout on a helper thread so
/// it never blocks on a full pipe. `Err` says why there was no line.
pub fn first_stdout_line(
    child: &mut Child,
    what: &str,
    timeout: Duration,
) -> std::result::Result<String, String> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| "stdout was not captured".to_owned())?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("{what}-stdout"))
        .spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let first = reader.read_line(&mut line).map(|_| line);
            let _ = tx.send(first);
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        })
        .map_err(|e| format!("spawning its stdout reader failed: {e}"))?;
    match rx.recv_timeout(timeout) {
        Ok(Ok(line)) if !line.trim().is_empty() => Ok(line),
        Ok(Ok(_)) => Err("exited without printing its startup line".to_owned()),
        Ok(Err(e)) => Err(format!("reading its stdout failed: {e}")),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            Err(format!("no startup line within {} s", timeout.as_secs()))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Err("stdout reader stopped unexpectedly".to_owned())
        }
    }
}

/// The `url` field of a server's JSON startup line, without a trailing slash.
pub fn announced_url(line: &str) -> std::result::Result<String, String> {
    let value: serde_json::Value = serde_json::from_str(line.trim())
        .map_err(|e| format!("startup line is not JSON ({e}): {}", line.trim()))?;
    value
        .get("url")
        .and_then(serde_json::Value::as_str)
        .map(|u| u.trim_end_matches('/').to_owned())
        .ok_or_else(|| format!("startup line has no \"url\": {}", line.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("abc/def-1"), "abc/def-1");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn free_port_is_nonzero() {
        assert_ne!(try_free_port().expect("a free port"), 0);
    }
}
