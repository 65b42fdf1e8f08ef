//! The OpenSearch endpoint tests write to.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::engine::{EngineChoice, SearchNode};
use crate::error::Result;
use ferry_throwaway::Osmem;

/// A search endpoint for one test, chosen by [`EngineChoice::from_env`]:
/// a private `osmem-server` (the default), a real OpenSearch or
/// Elasticsearch node shared by the test binary
/// (`FERRY_TEST_ENGINE=opensearch` / `elasticsearch`), or a cluster at
/// `FERRY_TEST_OPENSEARCH_URL`.
///
/// Each instance carries a unique index-name prefix so tests sharing a
/// cluster do not step on each other's indices.
#[derive(Debug)]
pub struct TestSink {
    url: String,
    prefix: String,
    engine: String,
    _osmem: Option<Osmem>,
}

impl TestSink {
    /// Starts (or joins) the endpoint the environment chooses.
    pub fn start() -> Result<TestSink> {
        let (url, engine, osmem) = match EngineChoice::from_env()? {
            EngineChoice::External(url) => (url, "external".to_owned(), None),
            EngineChoice::Node(product, version) => {
                let node = SearchNode::shared(product, &version)?;
                let engine = format!("{}-{version}", product.name());
                (node.url().to_owned(), engine, None)
            }
            EngineChoice::Osmem => {
                let osmem = Osmem::start()?;
                (osmem.url().to_owned(), "osmem".to_owned(), Some(osmem))
            }
        };
        Ok(TestSink {
            url,
            prefix: next_prefix(),
            engine,
            _osmem: osmem,
        })
    }

    /// Base URL of the endpoint (no trailing slash).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Lowercase prefix unique to this instance, e.g. `t1234_k3x9a_0_`.
    pub fn index_prefix(&self) -> &str {
        &self.prefix
    }

    /// `name` with this instance's prefix prepended.
    pub fn index_name(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }

    /// True when the endpoint is shared with other tests (a real node or
    /// an external cluster), not a private `osmem-server`.
    pub fn is_external(&self) -> bool {
        self._osmem.is_none()
    }

    /// True when the endpoint is a real engine (not `osmem-server`).
    pub fn is_real(&self) -> bool {
        self.engine != "osmem"
    }

    /// `osmem`, `opensearch-<version>`, `elasticsearch-<version>` or `external`.
    pub fn engine(&self) -> &str {
        &self.engine
    }
}

/// Builds `t{pid}_{run}_{n}_`: the pid and a per-process start-time tag keep
/// separate test runs apart, the counter keeps instances within a run apart.
fn next_prefix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static RUN_TAG: OnceLock<String> = OnceLock::new();
    let tag = RUN_TAG.get_or_init(|| {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        // Base 36 of the low bits: short, lowercase, changes every millisecond.
        to_base36((millis % 36u128.pow(6)) as u64)
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("t{}_{}_{}_", std::process::id(), tag, n)
}

fn to_base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_unique_and_lowercase() {
        let a = next_prefix();
        let b = next_prefix();
        assert_ne!(a, b);
        for p in [&a, &b] {
            assert!(p.starts_with('t') && p.ends_with('_'));
            assert_eq!(p.to_lowercase(), *p);
        }
    }

    #[test]
    fn base36() {
        assert_eq!(to_base36(0), "0");
        assert_eq!(to_base36(35), "z");
        assert_eq!(to_base36(36), "10");
    }
}
