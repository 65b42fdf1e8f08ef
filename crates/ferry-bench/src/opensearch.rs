//! The real OpenSearch node behind `--sink opensearch`: started once per
//! bench run through the test kit with JVM settings fit for measuring
//! ([`NodeOptions::benchmark`]), warmed up, cleaned between workloads, and
//! read back by the convergence checks and the ceilings.

use anyhow::{bail, Context, Result};
use ferry_testkit::{NodeOptions, Product, SearchNode};
use serde::Deserialize;
use serde_json::{json, value::RawValue, Value};

use crate::http::Client;
use crate::loader::{self, Op};
use crate::report::thousands;

/// Documents per page when reading an index back.
const PAGE: usize = 5_000;

/// A running node and an HTTP client for it; the JVM stops when this is
/// dropped.
pub struct Node {
    http: Client,
    options: NodeOptions,
    node: SearchNode,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("url", &self.url())
            .field("options", &self.options)
            .finish()
    }
}

impl Node {
    /// Starts OpenSearch `version` with [`NodeOptions::benchmark`].
    pub async fn start(version: &str) -> Result<Node> {
        let options = NodeOptions::benchmark();
        let (v, o) = (version.to_owned(), options.clone());
        let node =
            tokio::task::spawn_blocking(move || SearchNode::start(Product::OpenSearch, &v, &o))
                .await
                .context("joining the OpenSearch start-up task")?
                .with_context(|| format!("starting OpenSearch {version} for --sink opensearch"))?;
        Ok(Node {
            http: Client::new(node.url()),
            options,
            node,
        })
    }

    /// Base URL of the node.
    pub fn url(&self) -> &str {
        self.node.url()
    }

    /// The HTTP client.
    pub fn http(&self) -> &Client {
        &self.http
    }

    /// `opensearch-<version>`, as reports name the sink.
    pub fn name(&self) -> String {
        format!("opensearch-{}", self.node.version())
    }

    /// What the report says about the node.
    pub fn describe(&self) -> Value {
        json!({
            "version": self.node.version(),
            "heap_mib": self.options.heap_mb,
            "jvm": if self.options.fast_start { "quick-start flags (C1 only, serial GC)" } else { "full JIT, G1" },
            "shards": 1,
            "replicas": 0,
        })
    }

    /// Indexes `docs` synthetic narrow documents (twice), then deletes them:
    /// the JIT has compiled the indexing path before anything is measured.
    pub async fn warm_up(&self, docs: u64) -> Result<String> {
        let mut rates = Vec::new();
        for round in 0..2 {
            let index = format!("warmup-{round}");
            self.http
                .json(
                    "PUT",
                    &format!("/{index}"),
                    Some(&json!({"settings": {"number_of_replicas": 0, "refresh_interval": "-1"}})),
                )
                .await?;
            let ops: Vec<Op> = (1..=docs)
                .map(|id| Op {
                    id: id.to_string(),
                    version: 1,
                    doc: Some(warm_doc(id)),
                })
                .collect();
            let load = loader::send(
                self.url(),
                loader::batches(&index, &ops),
                crate::ceiling::CONCURRENCY,
            )
            .await?;
            rates.push(docs as f64 / load.took.as_secs_f64());
            self.http.send("DELETE", &format!("/{index}"), b"").await?;
        }
        let shown: Vec<String> = rates.iter().map(|r| thousands(*r)).collect();
        Ok(format!(
            "warm-up: 2 × {} synthetic documents at {} docs/s",
            thousands(docs as f64),
            shown.join(" and ")
        ))
    }

    /// Deletes every index (not the hidden ones): each workload starts on an
    /// empty node.
    pub async fn delete_all_indexes(&self) -> Result<()> {
        let list = self
            .http
            .json("GET", "/_cat/indices?format=json&h=index", None)
            .await?;
        for entry in list.as_array().into_iter().flatten() {
            if let Some(name) = entry["index"].as_str().filter(|n| !n.starts_with('.')) {
                self.delete_index(name).await?;
            }
        }
        Ok(())
    }

    /// Deletes index `name` (not an alias); fine when it does not exist.
    pub async fn delete_index(&self, name: &str) -> Result<()> {
        let r = self.http.send("DELETE", &format!("/{name}"), b"").await?;
        if !(200..300).contains(&r.status) && r.status != 404 {
            bail!("deleting index {name}: HTTP {}: {}", r.status, r.snippet());
        }
        Ok(())
    }

    /// Searchable documents of `index` (0 when it does not exist yet). No
    /// refresh: during a measurement this reads what the node shows anyway.
    pub async fn count(&self, index: &str) -> Result<usize> {
        let r = self
            .http
            .send("GET", &format!("/{index}/_count"), b"")
            .await?;
        if r.status == 404 {
            return Ok(0);
        }
        let v = r.json(&format!("counting {index}"))?;
        v["count"]
            .as_u64()
            .map(|c| c as usize)
            .with_context(|| format!("counting {index}: no count in {v}"))
    }

    /// Makes every write to `index` searchable.
    pub async fn refresh(&self, index: &str) -> Result<()> {
        self.http
            .json("POST", &format!("/{index}/_refresh"), None)
            .await
            .map(|_| ())
    }

    /// Documents of `index` once everything written is searchable.
    pub async fn settled_count(&self, index: &str) -> Result<usize> {
        let r = self
            .http
            .send("POST", &format!("/{index}/_refresh"), b"")
            .await?;
        if r.status == 404 {
            return Ok(0);
        }
        self.count(index).await
    }

    /// Whether document `id` exists (a real-time get: no refresh needed).
    pub async fn exists(&self, index: &str, id: &str) -> Result<bool> {
        let r = self
            .http
            .send(
                "GET",
                &format!("/{index}/_doc/{}?_source=false", escape(id)),
                b"",
            )
            .await?;
        match r.status {
            200 => Ok(true),
            404 => Ok(false),
            s => bail!("GET {index}/_doc/{id}: HTTP {s}: {}", r.snippet()),
        }
    }

    /// A document's version and its source exactly as stored.
    pub async fn get(&self, index: &str, id: &str) -> Result<Option<(u64, Vec<u8>)>> {
        let r = self
            .http
            .send(
                "GET",
                &format!("/{index}/_doc/{}?_source=false", escape(id)),
                b"",
            )
            .await?;
        if r.status == 404 {
            return Ok(None);
        }
        let meta = r.json(&format!("GET {index}/_doc/{id}"))?;
        let version = meta["_version"].as_u64().unwrap_or(0);
        let r = self
            .http
            .send("GET", &format!("/{index}/_source/{}", escape(id)), b"")
            .await?;
        match r.status {
            200 => Ok(Some((version, r.body))),
            404 => Ok(None),
            s => bail!("GET {index}/_source/{id}: HTTP {s}: {}", r.snippet()),
        }
    }

    /// Every document id of `index`.
    pub async fn ids(&self, index: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        self.scan(index, false, |hit| {
            out.push(hit.id);
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// Every document of `index` as an index operation carrying its stored
    /// version and its source bytes as stored, in id order (numeric ids by
    /// value): the documents ferry wrote, ready to be written again.
    pub async fn documents(&self, index: &str) -> Result<Vec<Op>> {
        let mut out = Vec::new();
        self.scan(index, true, |hit| {
            let doc = hit
                .source
                .with_context(|| format!("document {} came back without its source", hit.id))?;
            out.push(Op {
                id: hit.id,
                version: hit.version.unwrap_or(1),
                doc: Some(doc.get().as_bytes().to_vec()),
            });
            Ok(())
        })
        .await?;
        out.sort_by(|a, b| match (a.id.parse::<i64>(), b.id.parse::<i64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => a.id.cmp(&b.id),
        });
        Ok(out)
    }

    /// Pages through every document of `index` with a scroll.
    async fn scan(
        &self,
        index: &str,
        with_source: bool,
        mut each: impl FnMut(Hit) -> Result<()>,
    ) -> Result<()> {
        let query =
            json!({"size": PAGE, "sort": ["_doc"], "_source": with_source, "version": true});
        let mut r = self
            .http
            .send(
                "POST",
                &format!("/{index}/_search?scroll=2m"),
                &serde_json::to_vec(&query)?,
            )
            .await?;
        let mut scroll_id: Option<String> = None;
        loop {
            if !(200..300).contains(&r.status) {
                bail!("reading {index} back: HTTP {}: {}", r.status, r.snippet());
            }
            let page: Page =
                serde_json::from_slice(&r.body).with_context(|| format!("reading {index} back"))?;
            scroll_id = page.scroll_id.or(scroll_id);
            let n = page.hits.hits.len();
            for hit in page.hits.hits {
                each(hit)?;
            }
            let Some(id) = scroll_id.as_deref().filter(|_| n > 0) else {
                break;
            };
            r = self
                .http
                .send(
                    "POST",
                    "/_search/scroll",
                    &serde_json::to_vec(&json!({"scroll": "2m", "scroll_id": id}))?,
                )
                .await?;
        }
        if let Some(id) = scroll_id {
            let _ = self
                .http
                .send(
                    "DELETE",
                    "/_search/scroll",
                    &serde_json::to_vec(&json!({"scroll_id": id}))?,
                )
                .await;
        }
        Ok(())
    }

    /// The concrete index an alias (or index) name stands for.
    pub async fn concrete(&self, name: &str) -> Result<String> {
        let v = self
            .http
            .json("GET", &format!("/{name}/_mapping"), None)
            .await?;
        v.as_object()
            .and_then(|o| o.keys().next().cloned())
            .with_context(|| format!("{name} resolves to no index"))
    }

    /// Creates `new` with the mapping and shard count of `like` and the
    /// settings `settings` (on top of `number_of_replicas: 0`).
    pub async fn create_like(&self, like: &str, new: &str, settings: &Value) -> Result<()> {
        let concrete = self.concrete(like).await?;
        let m = self
            .http
            .json("GET", &format!("/{concrete}/_mapping"), None)
            .await?;
        let s = self
            .http
            .json("GET", &format!("/{concrete}/_settings"), None)
            .await?;
        let shards = s[&concrete]["settings"]["index"]["number_of_shards"].clone();
        let mut index_settings = json!({"number_of_shards": shards, "number_of_replicas": 0});
        if let (Some(dst), Some(src)) = (index_settings.as_object_mut(), settings.as_object()) {
            dst.extend(src.clone());
        }
        self.http
            .json(
                "PUT",
                &format!("/{new}"),
                Some(&json!({"settings": index_settings, "mappings": m[&concrete]["mappings"]})),
            )
            .await?;
        Ok(())
    }

    /// Indexing, refresh and merge figures of `index` so far.
    pub async fn index_stats(&self, index: &str) -> Result<IndexFigures> {
        let v = self
            .http
            .json(
                "GET",
                &format!("/{index}/_stats/indexing,refresh,merge,flush"),
                None,
            )
            .await?;
        let p = &v["_all"]["primaries"];
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        Ok(IndexFigures {
            indexed: n(&p["indexing"]["index_total"]),
            deleted: n(&p["indexing"]["delete_total"]),
            index_ms: n(&p["indexing"]["index_time_in_millis"]),
            refreshes: n(&p["refresh"]["total"]),
            flushes: n(&p["flush"]["total"]),
            merges: n(&p["merges"]["total"]),
            merge_ms: n(&p["merges"]["total_time_in_millis"]),
        })
    }

    /// The health of `index` (`green`, `yellow`, `red`).
    pub async fn health(&self, index: &str) -> Result<String> {
        let v = self
            .http
            .json("GET", &format!("/_cluster/health/{index}"), None)
            .await?;
        Ok(v["status"].as_str().unwrap_or("unknown").to_owned())
    }

    /// Bulk shard requests the node's write thread pool has rejected (429)
    /// since it started.
    pub async fn write_rejections(&self) -> Result<u64> {
        let v = self
            .http
            .json(
                "GET",
                "/_nodes/stats/thread_pool?filter_path=nodes.*.thread_pool.write.rejected",
                None,
            )
            .await?;
        Ok(v["nodes"]
            .as_object()
            .map(|nodes| {
                nodes
                    .values()
                    .map(|n| n["thread_pool"]["write"]["rejected"].as_u64().unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0))
    }
}

/// What `_stats` says about an index's work (primaries).
#[derive(Debug, Clone, Copy, Default)]
pub struct IndexFigures {
    /// Index operations.
    pub indexed: u64,
    /// Delete operations.
    pub deleted: u64,
    /// Milliseconds spent indexing (all threads).
    pub index_ms: u64,
    /// Refreshes (scheduled, explicit and internal).
    pub refreshes: u64,
    /// Flushes (Lucene commits).
    pub flushes: u64,
    /// Merges.
    pub merges: u64,
    /// Milliseconds spent merging.
    pub merge_ms: u64,
}

impl IndexFigures {
    /// One line for the notes.
    pub fn describe(&self) -> String {
        format!(
            "{} index + {} delete operations, {:.1} s indexing, {} refreshes, {} flushes, {} merges ({:.1} s)",
            self.indexed,
            self.deleted,
            self.index_ms as f64 / 1e3,
            self.refreshes,
            self.flushes,
            self.merges,
            self.merge_ms as f64 / 1e3
        )
    }
}

#[derive(Deserialize)]
struct Page {
    #[serde(rename = "_scroll_id")]
    scroll_id: Option<String>,
    hits: Hits,
}

#[derive(Deserialize)]
struct Hits {
    hits: Vec<Hit>,
}

#[derive(Deserialize)]
struct Hit {
    #[serde(rename = "_id")]
    id: String,
    #[serde(rename = "_version")]
    version: Option<u64>,
    #[serde(rename = "_source")]
    source: Option<Box<RawValue>>,
}

/// A document id as a URL path segment.
fn escape(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A narrow document like the bench's tables hold, for the warm-up.
fn warm_doc(id: u64) -> Vec<u8> {
    format!(
        "{{\"id\":{id},\"a\":{},\"b\":{},\"label\":\"label-{}\",\"note\":\"{:032x}\",\"created_at\":\"2024-01-01T00:00:00Z\"}}",
        id % 1000,
        (id * 7) % 100_000,
        id % 97,
        u128::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_ids_for_paths() {
        assert_eq!(escape("12"), "12");
        assert_eq!(escape("-1"), "-1");
        assert_eq!(escape("a,b/c"), "a%2Cb%2Fc");
    }

    #[test]
    fn reads_scroll_pages_with_raw_sources() {
        let page: Page = serde_json::from_str(
            r#"{"_scroll_id":"s1","hits":{"hits":[{"_id":"7","_version":3,"_source":{"b":1, "a":"x"}}]}}"#,
        )
        .expect("page");
        assert_eq!(page.scroll_id.as_deref(), Some("s1"));
        let hit = &page.hits.hits[0];
        assert_eq!((hit.id.as_str(), hit.version), ("7", Some(3)));
        assert_eq!(
            hit.source.as_ref().map(|s| s.get()),
            Some(r#"{"b":1, "a":"x"}"#)
        );
    }
}
