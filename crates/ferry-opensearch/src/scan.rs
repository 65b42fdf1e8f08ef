//! Reading documents back for operator tools: by id (`_mget`), page by page
//! over a whole index (scroll), and a random sample.
//!
//! Why scroll and not `search_after` with a point in time: the walk needs no
//! order on the cluster side (the table side is walked in key order and the
//! cluster side is only checked for documents whose rows are gone), scroll
//! sorted by `_doc` is the cheapest full read and speaks the same API on
//! OpenSearch 1.x–3.x and Elasticsearch 7–9, whereas the point-in-time API
//! differs between them (`_search/point_in_time` vs `_pit`) and sorting on
//! `_id` needs fielddata that newer versions disable. Memory stays bounded
//! by one page.

use std::collections::BTreeMap;

use opensearch::http::Method;
use serde_json::{json, Value};

use crate::{Sink, SinkError};

/// How long the cluster keeps a scroll context between two pages.
const KEEP_ALIVE: &str = "5m";

/// One document as the cluster holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// The document id.
    pub id: String,
    /// Its (external) version.
    pub version: u64,
    /// Its `_source` (`Null` when not asked for).
    pub source: Value,
    /// Its `_routing`, if it was written with one.
    pub routing: Option<String>,
}

/// A stored document's identity within an index: its id and routing.
pub type DocRef = (String, Option<String>);

impl Hit {
    fn from_json(h: &Value) -> Option<Hit> {
        Some(Hit {
            id: h["_id"].as_str()?.to_string(),
            version: h["_version"].as_u64().unwrap_or(0),
            source: h.get("_source").cloned().unwrap_or(Value::Null),
            routing: h["_routing"].as_str().map(str::to_string),
        })
    }

    /// Its id and routing.
    pub fn doc_ref(&self) -> DocRef {
        (self.id.clone(), self.routing.clone())
    }
}

/// A scroll over an index, one page at a time (see [`Sink::scroll`]).
#[derive(Debug)]
pub struct Scroll {
    id: Option<String>,
    first: Option<Vec<Hit>>,
    done: bool,
}

impl Scroll {
    fn empty() -> Scroll {
        Scroll {
            id: None,
            first: None,
            done: true,
        }
    }
}

fn hits_of(v: &Value) -> Vec<Hit> {
    v["hits"]["hits"]
        .as_array()
        .map(|a| a.iter().filter_map(Hit::from_json).collect())
        .unwrap_or_default()
}

impl Sink {
    /// `_source` and version of these documents (by id and routing;
    /// absent ones left out); one `_mget` per 1,000. Real-time: no refresh
    /// needed.
    pub async fn get_documents(
        &self,
        concrete: &str,
        docs: &[(&str, Option<&str>)],
    ) -> Result<BTreeMap<DocRef, Hit>, SinkError> {
        let mut out = BTreeMap::new();
        for chunk in docs.chunks(1000) {
            let wanted: Vec<Value> = chunk
                .iter()
                .map(|(id, routing)| match routing {
                    Some(r) => json!({"_id": id, "routing": r}),
                    None => json!({"_id": id}),
                })
                .collect();
            let v = self
                .request_json(
                    Method::Post,
                    &format!("/{concrete}/_mget"),
                    Some(json!({ "docs": wanted })),
                )
                .await?;
            for d in v["docs"].as_array().map(Vec::as_slice).unwrap_or_default() {
                if d["found"].as_bool() == Some(true) {
                    if let Some(hit) = Hit::from_json(d) {
                        out.insert(hit.doc_ref(), hit);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Opens a scroll over the documents of `index` matching `query`, `page`
    /// at a time, in the cheapest order (`_doc`); with `source` false only
    /// ids and versions come back. The index is refreshed first so recent
    /// writes are seen. A missing index scrolls nothing.
    pub async fn scroll(
        &self,
        index: &str,
        query: Value,
        page: usize,
        source: bool,
    ) -> Result<Scroll, SinkError> {
        let (status, _) = self
            .request(Method::Head, &format!("/{index}"), None, "application/json")
            .await?;
        if status == 404 {
            return Ok(Scroll::empty());
        }
        self.refresh(index).await?;
        let v = self
            .request_json(
                Method::Post,
                &format!("/{index}/_search?scroll={KEEP_ALIVE}"),
                Some(json!({
                    "size": page.max(1), "_source": source, "version": true,
                    "sort": ["_doc"], "query": query
                })),
            )
            .await?;
        Ok(Scroll {
            id: v["_scroll_id"].as_str().map(str::to_string),
            first: Some(hits_of(&v)),
            done: false,
        })
    }

    /// The next page of a scroll; `None` once it is exhausted (the scroll
    /// context is then released).
    pub async fn next_page(&self, scroll: &mut Scroll) -> Result<Option<Vec<Hit>>, SinkError> {
        if scroll.done {
            return Ok(None);
        }
        let hits = match scroll.first.take() {
            Some(hits) => hits,
            None => match scroll.id.clone() {
                Some(id) => {
                    let v = self
                        .request_json(
                            Method::Post,
                            "/_search/scroll",
                            Some(json!({"scroll": KEEP_ALIVE, "scroll_id": id})),
                        )
                        .await?;
                    if let Some(next) = v["_scroll_id"].as_str() {
                        scroll.id = Some(next.to_string());
                    }
                    hits_of(&v)
                }
                None => Vec::new(),
            },
        };
        if hits.is_empty() {
            scroll.done = true;
            if let Some(id) = scroll.id.take() {
                // Best effort: an unreleased context expires after KEEP_ALIVE anyway.
                let _ = self
                    .request_json(
                        Method::Delete,
                        "/_search/scroll",
                        Some(json!({"scroll_id": [id]})),
                    )
                    .await;
            }
            return Ok(None);
        }
        Ok(Some(hits))
    }

    /// The ids and routings of up to `n` documents of `index` chosen at
    /// random (a seeded `random_score`; the cluster scores every document,
    /// only `n` ids travel).
    pub async fn sample_docs(
        &self,
        index: &str,
        n: usize,
        seed: u64,
    ) -> Result<Vec<DocRef>, SinkError> {
        self.refresh(index).await?;
        let v = self
            .request_json(
                Method::Post,
                &format!("/{index}/_search"),
                Some(json!({
                    "size": n, "_source": false,
                    "query": {"function_score": {
                        "query": {"match_all": {}},
                        "random_score": {"seed": seed, "field": "_seq_no"},
                        "boost_mode": "replace"
                    }}
                })),
            )
            .await?;
        Ok(hits_of(&v).iter().map(Hit::doc_ref).collect())
    }
}
