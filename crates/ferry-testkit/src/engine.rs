//! A real search engine node for tests: OpenSearch, started from the launcher
//! kept in `tests/engines/opensearch` (server and modules from Maven Central;
//! built by `tests/engines/build-opensearch VERSION`, which `scripts/setup`
//! runs), or Elasticsearch, started by the `start-node` script that
//! `tests/engines/build-elasticsearch VERSION` writes.
//!
//! One node is shared by every test of a test binary: it starts on first use
//! and ends when the binary exits (both launchers stop the node when their
//! stdin closes).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::error::{Result, TestkitError};
use ferry_throwaway::process::{announced_url, first_stdout_line, is_executable};

/// The OpenSearch version tests run on unless `FERRY_TEST_ENGINE` names one.
pub const DEFAULT_OPENSEARCH_VERSION: &str = "2.19.6";

/// The Elasticsearch version `FERRY_TEST_ENGINE=elasticsearch` runs on.
pub const DEFAULT_ELASTICSEARCH_VERSION: &str = "8.19.21";

/// The search engine products the test kit can start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Product {
    /// OpenSearch, from `tests/engines/opensearch`.
    OpenSearch,
    /// Elasticsearch, from `tests/engines/elasticsearch`.
    Elasticsearch,
}

impl Product {
    /// Lowercase name, as in `FERRY_TEST_ENGINE` values.
    pub fn name(self) -> &'static str {
        match self {
            Product::OpenSearch => "opensearch",
            Product::Elasticsearch => "elasticsearch",
        }
    }
}

/// How long a node may take to print its address (JIT warm-up on 2 cores).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(240);

/// How long a dropped node may take to shut down after its stdin closed
/// before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How the JVM of a node is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeOptions {
    /// Java heap (`-Xms` = `-Xmx`), in MiB.
    pub heap_mb: u32,
    /// Keep the start-up flags the launcher build chose (C1 only, serial
    /// GC): quick to start, slow to run. Off, the JIT compiles fully and
    /// G1 collects, as in an OpenSearch distribution; the class data
    /// sharing archive is kept either way.
    pub fast_start: bool,
}

impl NodeOptions {
    /// What tests use: a 512 MiB heap and the quick-start flags.
    pub fn tests() -> NodeOptions {
        NodeOptions {
            heap_mb: 512,
            fast_start: true,
        }
    }

    /// For measurements: a 2 GiB heap, full JIT and G1.
    pub fn benchmark() -> NodeOptions {
        NodeOptions {
            heap_mb: 2048,
            fast_start: false,
        }
    }

    /// The JVM flags for these options, given the launcher's start-up flags.
    fn jvm_args(&self, launcher_args: &[String]) -> Vec<String> {
        let mut args: Vec<String> = if self.fast_start {
            launcher_args.to_vec()
        } else {
            let mut kept: Vec<String> = launcher_args
                .iter()
                .filter(|a| !a.starts_with("-XX:TieredStopAtLevel=") && *a != "-XX:+UseSerialGC")
                .cloned()
                .collect();
            // The collector settings of OpenSearch's own config/jvm.options.
            kept.extend(
                [
                    "-XX:+UseG1GC",
                    "-XX:G1ReservePercent=25",
                    "-XX:InitiatingHeapOccupancyPercent=30",
                ]
                .map(str::to_owned),
            );
            kept
        };
        args.push(format!("-Xms{}m", self.heap_mb));
        args.push(format!("-Xmx{}m", self.heap_mb));
        // A node out of memory ends (and its test fails with the reason)
        // rather than answering errors or hanging.
        args.push("-XX:+ExitOnOutOfMemoryError".to_owned());
        args
    }
}

impl NodeOptions {
    /// `ES_JAVA_OPTS` for an Elasticsearch node (`start-node` appends them to
    /// its own quick-start flags, so later flags win).
    fn elasticsearch_java_opts(&self) -> String {
        let mut opts = format!("-Xms{0}m -Xmx{0}m", self.heap_mb);
        if !self.fast_start {
            opts.push_str(" -XX:TieredStopAtLevel=4");
        }
        opts
    }
}

impl Default for NodeOptions {
    fn default() -> NodeOptions {
        NodeOptions::tests()
    }
}

/// Which search engine the tests of this process write to, from the
/// environment: `FERRY_TEST_OPENSEARCH_URL` (a cluster someone else runs),
/// else `FERRY_TEST_ENGINE` = `osmem` (the default), `opensearch[-VERSION]`
/// or `elasticsearch[-VERSION]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineChoice {
    /// A private `osmem-server` per test.
    Osmem,
    /// A real node of this product and version, shared by the test binary.
    Node(Product, String),
    /// A cluster at this URL, run outside the test kit.
    External(String),
}

impl EngineChoice {
    /// Reads the choice from the environment.
    pub fn from_env() -> Result<EngineChoice> {
        let url = std::env::var("FERRY_TEST_OPENSEARCH_URL").unwrap_or_default();
        let url = url.trim().trim_end_matches('/');
        if !url.is_empty() {
            return Ok(EngineChoice::External(url.to_owned()));
        }
        let engine = std::env::var("FERRY_TEST_ENGINE").unwrap_or_default();
        Self::parse(engine.trim())
    }

    /// Parses a `FERRY_TEST_ENGINE` value.
    pub fn parse(value: &str) -> Result<EngineChoice> {
        let node = |product, version: &str| EngineChoice::Node(product, version.to_owned());
        match value {
            "" | "osmem" => return Ok(EngineChoice::Osmem),
            "opensearch" => return Ok(node(Product::OpenSearch, DEFAULT_OPENSEARCH_VERSION)),
            "elasticsearch" => {
                return Ok(node(Product::Elasticsearch, DEFAULT_ELASTICSEARCH_VERSION))
            }
            _ => {}
        }
        for product in [Product::OpenSearch, Product::Elasticsearch] {
            let version = value
                .strip_prefix(product.name())
                .and_then(|rest| rest.strip_prefix('-'));
            if let Some(v) = version {
                if !v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.') {
                    return Ok(node(product, v));
                }
            }
        }
        Err(TestkitError::EngineMissing(format!(
            "FERRY_TEST_ENGINE={value:?} is not one of `osmem`, `opensearch[-<version>]`, \
             `elasticsearch[-<version>]` (e.g. opensearch-{DEFAULT_OPENSEARCH_VERSION}, \
             elasticsearch-{DEFAULT_ELASTICSEARCH_VERSION})"
        )))
    }
}

/// A running OpenSearch or Elasticsearch node started by the test kit.
#[derive(Debug)]
pub struct SearchNode {
    product: Product,
    url: String,
    version: String,
    home: PathBuf,
    // Held open: the launcher stops the node when its stdin reaches EOF
    // (taken on drop to close it).
    stdin: Mutex<Option<ChildStdin>>,
    child: Mutex<Child>,
}

impl SearchNode {
    /// The node of `product` and `version` shared by this process, started
    /// on first use. A start that failed is reported again to every later
    /// caller.
    pub fn shared(product: Product, version: &str) -> Result<&'static SearchNode> {
        static NODE: OnceLock<std::result::Result<SearchNode, String>> = OnceLock::new();
        let node = NODE.get_or_init(|| {
            Self::start(product, version, &NodeOptions::tests()).map_err(|e| e.to_string())
        });
        match node {
            Ok(n) if n.product == product && n.version == version => Ok(n),
            Ok(n) => Err(TestkitError::EngineMissing(format!(
                "this process already runs {} {}; {} {version} was asked for",
                n.product.name(),
                n.version,
                product.name()
            ))),
            Err(e) => Err(TestkitError::EngineStartup(e.clone())),
        }
    }

    /// Starts a node of `product` and `version` with its data in a fresh
    /// directory and its JVM set up as `options` say. The node stops when
    /// the returned value is dropped (or this process exits).
    pub fn start(product: Product, version: &str, options: &NodeOptions) -> Result<SearchNode> {
        let mut command = match product {
            Product::OpenSearch => {
                let launcher = Launcher::find(version)?;
                let mut c = Command::new(&launcher.java);
                c.args(options.jvm_args(&launcher.jvm_args))
                    .arg("-cp")
                    .arg(&launcher.classpath)
                    .arg("dev.ferry.engines.FerryNode");
                c
            }
            Product::Elasticsearch => {
                let mut c = Command::new(elasticsearch_launcher(version)?);
                c.env("ES_JAVA_OPTS", options.elasticsearch_java_opts());
                c
            }
        };
        remove_stale_homes();
        let home = std::env::temp_dir().join(format!(
            "{HOME_PREFIX}{}-{}",
            std::process::id(),
            ferry_throwaway::try_free_port()?
        ));
        std::fs::create_dir_all(&home)
            .map_err(|e| TestkitError::io(format!("creating {}", home.display()), e))?;
        let mut stderr_log = tempfile::tempfile()
            .map_err(|e| TestkitError::io("creating a temp file for the node's stderr", e))?;
        let stderr_for_child = stderr_log
            .try_clone()
            .map_err(|e| TestkitError::io("duplicating the node's stderr file", e))?;
        let started = Instant::now();
        let program = command.get_program().to_owned();
        let mut child = command
            .arg("--home")
            .arg(&home)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr_for_child))
            .spawn()
            .map_err(|e| {
                TestkitError::io(format!("spawning {}", Path::new(&program).display()), e)
            })?;
        let Some(stdin) = child.stdin.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(TestkitError::EngineStartup("stdin was not captured".into()));
        };
        let outcome = first_stdout_line(&mut child, product.name(), STARTUP_TIMEOUT)
            .and_then(|line| announced_url(&line));
        match outcome {
            Ok(url) => {
                tracing::info!(%url, product = product.name(), version, secs = started.elapsed().as_secs_f32(), "ferry-testkit: search node started");
                Ok(SearchNode {
                    product,
                    url,
                    version: version.to_owned(),
                    home,
                    stdin: Mutex::new(Some(stdin)),
                    child: Mutex::new(child),
                })
            }
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_dir_all(&home);
                let mut text = String::new();
                let _ = stderr_log.seek(SeekFrom::Start(0));
                let _ = stderr_log.read_to_string(&mut text);
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                Err(TestkitError::EngineStartup(format!(
                    "{} {version}: {why}; stderr:\n{}",
                    product.name(),
                    tail.join("\n")
                )))
            }
        }
    }

    /// Base URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The version the node runs.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The product the node runs.
    pub fn product(&self) -> Product {
        self.product
    }
}

impl Drop for SearchNode {
    /// Closes the launcher's stdin (it shuts the node down), waits up to
    /// ten seconds, kills the JVM if it is still there, reaps it and
    /// deletes the data directory.
    fn drop(&mut self) {
        drop(
            self.stdin
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
        let child = self
            .child
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(Some(_)) => break,
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

/// The built launcher: the Java to run and its classpath.
struct Launcher {
    java: PathBuf,
    jvm_args: Vec<String>,
    classpath: String,
}

impl Launcher {
    /// Reads what `tests/engines/build-opensearch VERSION` wrote.
    fn find(version: &str) -> Result<Launcher> {
        let dir = engines_dir().join("opensearch/target").join(version);
        let cp_file = dir.join("classpath.txt");
        let fix = format!(
            "run `tests/engines/build-opensearch {version}` (scripts/setup does it; needs Java \
             and Maven with Maven Central reachable)"
        );
        let classpath = std::fs::read_to_string(&cp_file).map_err(|e| {
            TestkitError::EngineMissing(format!(
                "OpenSearch {version} launcher not built ({}: {e}); {fix}",
                cp_file.display()
            ))
        })?;
        let java = match std::fs::read_to_string(dir.join("java.txt")) {
            Ok(p) if !p.trim().is_empty() => PathBuf::from(p.trim()),
            _ => PathBuf::from("java"),
        };
        if java.is_absolute() && !is_executable(&java) {
            return Err(TestkitError::EngineMissing(format!(
                "OpenSearch {version} needs the Java at {}, which is not there; {fix}",
                java.display()
            )));
        }
        // Start-up flags the build chose (class data sharing archive, C1 only).
        let jvm_args = std::fs::read_to_string(dir.join("jvm-args.txt"))
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        Ok(Launcher {
            java,
            jvm_args,
            classpath: classpath.trim().to_owned(),
        })
    }
}

/// The `start-node` script `tests/engines/build-elasticsearch VERSION` wrote
/// (its contract, the same as FerryNode's, is in
/// `tests/engines/elasticsearch/start-node.sh`).
fn elasticsearch_launcher(version: &str) -> Result<PathBuf> {
    let path = engines_dir()
        .join("elasticsearch/target")
        .join(version)
        .join("start-node");
    if is_executable(&path) {
        Ok(path)
    } else {
        Err(TestkitError::EngineMissing(format!(
            "Elasticsearch {version} node not built ({} is missing); run \
             `tests/engines/build-elasticsearch {version}` (scripts/setup --tests does it; needs \
             Java 17+ for 8.x, 21+ for 9.x, and Maven with Maven Central reachable)",
            path.display()
        )))
    }
}

/// Data directories are `<tmp>/ferry-node-<pid of the test>-<n>`.
const HOME_PREFIX: &str = "ferry-node-";

/// Deletes the data directories of nodes whose test process has exited (a
/// node outlives no test binary, but its directory does: statics never drop).
fn remove_stale_homes() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(HOME_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// `tests/engines` of this workspace, or `$FERRY_TEST_ENGINES_DIR`.
fn engines_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERRY_TEST_ENGINES_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/engines")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_names_parse_and_typos_are_refused() {
        assert_eq!(EngineChoice::parse("").unwrap(), EngineChoice::Osmem);
        assert_eq!(EngineChoice::parse("osmem").unwrap(), EngineChoice::Osmem);
        assert_eq!(
            EngineChoice::parse("opensearch").unwrap(),
            EngineChoice::Node(Product::OpenSearch, DEFAULT_OPENSEARCH_VERSION.into())
        );
        assert_eq!(
            EngineChoice::parse("opensearch-3.3.2").unwrap(),
            EngineChoice::Node(Product::OpenSearch, "3.3.2".into())
        );
        assert_eq!(
            EngineChoice::parse("elasticsearch").unwrap(),
            EngineChoice::Node(Product::Elasticsearch, DEFAULT_ELASTICSEARCH_VERSION.into())
        );
        assert_eq!(
            EngineChoice::parse("elasticsearch-9.5.3").unwrap(),
            EngineChoice::Node(Product::Elasticsearch, "9.5.3".into())
        );
        assert!(EngineChoice::parse("opensearh").is_err());
        assert!(EngineChoice::parse("opensearch-").is_err());
        assert!(EngineChoice::parse("opensearch3").is_err());
        assert!(EngineChoice::parse("elasticsearch-9.x").is_err());
    }

    #[test]
    fn missing_launcher_names_the_build_command() {
        let err = Launcher::find("0.0.0-not-built")
            .err()
            .expect("no launcher");
        assert!(err
            .to_string()
            .contains("tests/engines/build-opensearch 0.0.0-not-built"));
        let err = elasticsearch_launcher("0.0.0-not-built").expect_err("no launcher");
        assert!(err
            .to_string()
            .contains("tests/engines/build-elasticsearch 0.0.0-not-built"));
    }

    #[test]
    fn benchmark_options_drop_the_quick_start_flags() {
        let launcher: Vec<String> = [
            "-XX:SharedArchiveFile=/x/cds.jsa",
            "-XX:TieredStopAtLevel=1",
            "-XX:+UseSerialGC",
            "-Xlog:disable",
        ]
        .map(str::to_owned)
        .to_vec();
        let tests = NodeOptions::tests().jvm_args(&launcher);
        assert_eq!(&tests[..4], &launcher[..]);
        assert_eq!(
            &tests[4..],
            ["-Xms512m", "-Xmx512m", "-XX:+ExitOnOutOfMemoryError"]
        );
        let bench = NodeOptions::benchmark().jvm_args(&launcher);
        assert!(bench.contains(&"-XX:SharedArchiveFile=/x/cds.jsa".to_owned()));
        assert!(bench.contains(&"-XX:+UseG1GC".to_owned()));
        assert!(!bench
            .iter()
            .any(|a| a.starts_with("-XX:TieredStopAtLevel") || a == "-XX:+UseSerialGC"));
        assert!(bench.ends_with(&[
            "-Xms2048m".to_owned(),
            "-Xmx2048m".to_owned(),
            "-XX:+ExitOnOutOfMemoryError".to_owned()
        ]));
    }

    #[test]
    fn announcement_gives_the_url() {
        assert_eq!(
            announced_url(r#"{"url":"http://127.0.0.1:9300/","version":"2.19.6"}"#).as_deref(),
            Ok("http://127.0.0.1:9300")
        );
        assert!(announced_url("[2026] starting").is_err());
    }
}
