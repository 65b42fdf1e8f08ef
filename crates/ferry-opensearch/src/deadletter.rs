//! Dead letters: documents the cluster rejected for good, stored durably in
//! an index of their own so an operator can list, retry or purge them.
//!
//! One entry per (index, document id): a document that fails again
//! overwrites its entry. Entries hold the id, the error and the LSN, never
//! the document body (which may hold personal data and can be rebuilt).

use ferry_core::Lsn;
use opensearch::http::Method;
use serde_json::{json, Value};

use crate::scan::{Hit, Scroll};
use crate::{Sink, SinkError};

/// One stored dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The alias (configured index name).
    pub index: String,
    /// The document id.
    pub id: String,
    /// Item status the cluster answered.
    pub status: u16,
    /// `type: reason` from the cluster.
    pub reason: String,
    /// LSN of the write that failed.
    pub lsn: Lsn,
}

impl DeadLetter {
    /// The entry a dead-letter index hit holds.
    pub fn from_hit(hit: &Hit) -> DeadLetter {
        let s = &hit.source;
        DeadLetter {
            index: s["index"].as_str().unwrap_or_default().to_string(),
            id: s["id"].as_str().unwrap_or_default().to_string(),
            status: s["status"].as_u64().unwrap_or(0) as u16,
            reason: s["reason"].as_str().unwrap_or_default().to_string(),
            lsn: s["lsn"]
                .as_str()
                .and_then(|l| l.parse().ok())
                .unwrap_or(Lsn::ZERO),
        }
    }

    fn entry_id(&self) -> String {
        format!("{}/{}", self.index, self.id)
    }
}

impl Sink {
    /// Makes the dead-letter index exist (keyword fields, one shard).
    pub async fn ensure_dead_letter_index(&self, name: &str) -> Result<(), SinkError> {
        let (status, _) = self
            .request(Method::Head, &format!("/{name}"), None, "application/json")
            .await?;
        if status == 200 {
            return Ok(());
        }
        let body = json!({
            "settings": {"number_of_shards": 1},
            "mappings": {"properties": {
                "index": {"type": "keyword"}, "id": {"type": "keyword"},
                "status": {"type": "integer"}, "reason": {"type": "text"},
                "lsn": {"type": "keyword"}, "failed_at": {"type": "date"}
            }}
        });
        match self
            .json_request(Method::Put, &format!("/{name}"), Some(body))
            .await
        {
            Ok(_) => Ok(()),
            // Created concurrently by another instance: fine.
            Err(SinkError::Status {
                status: 400,
                ref body,
                ..
            }) if body.contains("already_exists") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Stores dead letters durably (refresh=wait_for, so `list` sees them).
    pub async fn store_dead_letters(
        &self,
        name: &str,
        letters: &[DeadLetter],
    ) -> Result<(), SinkError> {
        if letters.is_empty() {
            return Ok(());
        }
        self.ensure_dead_letter_index(name).await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut body = Vec::new();
        for l in letters {
            let action = json!({"index": {"_index": name, "_id": l.entry_id()}});
            let doc = json!({"index": l.index, "id": l.id, "status": l.status, "reason": l.reason,
                             "lsn": l.lsn.to_string(), "failed_at": now});
            body.extend_from_slice(action.to_string().as_bytes());
            body.push(b'\n');
            body.extend_from_slice(doc.to_string().as_bytes());
            body.push(b'\n');
        }
        self.dead_letter_bulk(body, &format!("dead letters into {name}"), |_| false)
            .await
    }

    /// Sends a bulk request on the dead-letter index, visible to searches on
    /// return; an item error other than those `ignore` accepts (by status)
    /// fails it.
    async fn dead_letter_bulk(
        &self,
        body: Vec<u8>,
        what: &str,
        ignore: impl Fn(u64) -> bool,
    ) -> Result<(), SinkError> {
        let (status, resp) = self
            .request(
                Method::Post,
                "/_bulk?refresh=wait_for",
                Some(bytes::Bytes::from(body)),
                "application/x-ndjson",
            )
            .await?;
        let v: Value = serde_json::from_slice(&resp).unwrap_or(Value::Null);
        let failed = v["items"].as_array().is_none_or(|items| {
            items.iter().any(|item| {
                let st = item
                    .as_object()
                    .and_then(|o| o.values().next())
                    .and_then(|r| r["status"].as_u64())
                    .unwrap_or(0);
                !(200..300).contains(&st) && !ignore(st)
            })
        });
        if !(200..300).contains(&status) || failed {
            return Err(SinkError::Status {
                status,
                what: format!("POST /_bulk ({what})"),
                body: crate::snippet(&resp),
            });
        }
        Ok(())
    }

    /// Pages through the dead letters (of one index, or all), `page` at a
    /// time: read each page with [`Sink::next_page`] and turn its hits into
    /// entries with [`DeadLetter::from_hit`]. Any number of entries.
    pub async fn dead_letter_pages(
        &self,
        name: &str,
        index: Option<&str>,
        page: usize,
    ) -> Result<Scroll, SinkError> {
        let query = match index {
            Some(i) => json!({"term": {"index": i}}),
            None => json!({"match_all": {}}),
        };
        self.scroll(name, query, page, true).await
    }

    /// Removes these dead letters (one bulk request).
    pub async fn remove_dead_letters(
        &self,
        name: &str,
        letters: &[DeadLetter],
    ) -> Result<(), SinkError> {
        if letters.is_empty() {
            return Ok(());
        }
        let mut body = Vec::new();
        for l in letters {
            let action = json!({"delete": {"_index": name, "_id": l.entry_id()}});
            body.extend_from_slice(action.to_string().as_bytes());
            body.push(b'\n');
        }
        // A delete of an entry already gone answers 404 per item: fine.
        self.dead_letter_bulk(body, &format!("removing dead letters from {name}"), |st| {
            st == 404
        })
        .await
    }
}
