//! `osmem-server`: an in-memory, OpenSearch-compatible server for tests.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::error::{LaunchError, Result};
use crate::process::{announced_url, find_on_path, first_stdout_line, is_executable};

/// How long to wait for the server's startup line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Python snippet printing where pip put the `osmem-server` executable.
const PY_LOCATE: &str = "import osmem_server,os;\
print(os.path.join(os.path.dirname(osmem_server.__file__),\"bin\",\"osmem-server\"))";

/// A running `osmem-server` child process. Killed on drop.
#[derive(Debug)]
pub struct Osmem {
    child: Child,
    url: String,
}

impl Osmem {
    /// Locates `osmem-server`, starts it on a free port on 127.0.0.1 and
    /// waits (up to ~20 s) for it to report its URL.
    pub fn start() -> Result<Osmem> {
        let bin = find_osmem()?;
        // Anonymous file collecting the server's stderr, quoted on failure.
        let mut stderr_log = tempfile::tempfile()
            .map_err(|e| LaunchError::io("creating a temp file for osmem-server stderr", e))?;
        let stderr_for_child = stderr_log
            .try_clone()
            .map_err(|e| LaunchError::io("duplicating the osmem-server stderr file", e))?;

        let mut child = Command::new(&bin)
            .args(["-addr", "127.0.0.1:0", "-no-stdin-watch", "-parent-pid"])
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr_for_child))
            .spawn()
            .map_err(|e| LaunchError::io(format!("spawning {}", bin.display()), e))?;

        let outcome = first_stdout_line(&mut child, "osmem", STARTUP_TIMEOUT)
            .and_then(|line| announced_url(&line));

        match outcome {
            Ok(url) => {
                tracing::debug!(%url, pid = child.id(), "ferry-throwaway: osmem-server started");
                Ok(Osmem { child, url })
            }
            Err(why) => {
                kill_and_reap(&mut child);
                let mut stderr_text = String::new();
                let _ = stderr_log.seek(SeekFrom::Start(0));
                let _ = stderr_log.read_to_string(&mut stderr_text);
                Err(LaunchError::OsmemStartup(format!(
                    "{} {why}; stderr:\n{}",
                    bin.display(),
                    stderr_text.trim_end()
                )))
            }
        }
    }

    /// Base URL of the server, e.g. `http://127.0.0.1:40123` (no trailing slash).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Process id of the server.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Osmem {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Finds the executable: `$OSMEM_SERVER_BIN`, then `PATH`, then the copy
/// inside the pip-installed `osmem_server` Python package.
fn find_osmem() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("OSMEM_SERVER_BIN").filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        return if is_executable(&bin) {
            Ok(bin)
        } else {
            Err(LaunchError::OsmemNotFound(format!(
                "OSMEM_SERVER_BIN={} is not an executable file",
                bin.display()
            )))
        };
    }
    if let Some(bin) = find_on_path("osmem-server") {
        return Ok(bin);
    }
    if let Some(bin) = ask_python() {
        return Ok(bin);
    }
    Err(LaunchError::OsmemNotFound(
        "not in OSMEM_SERVER_BIN, not on PATH, and python3 cannot import osmem_server".into(),
    ))
}

fn ask_python() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", PY_LOCATE])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let path = Path::new(text.trim());
    is_executable(path).then(|| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_startup_line() {
        let line = r#"{"url":"http://127.0.0.1:40123","pid":2027,"version":"3.8.0"}"#;
        assert_eq!(announced_url(line).as_deref(), Ok("http://127.0.0.1:40123"));
        assert!(announced_url("not json").is_err());
        assert!(announced_url(r#"{"pid":1}"#).is_err());
    }
}
