//! Dead letters: documents the cluster rejected for good, stored durably in
//! an index of their own so an operator can list, retry or purge them.
//!
//! One entry per (index, document id): a document that fails again
//! overwrites its entry. Entries hold the id, the error and the LSN, never
//! the document body (which may hold personal data and can be rebuilt).

use ferry_core::Lsn;
use opensearch::http::Method;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{json, Value};

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
        let (status, resp) = self
            .request(
                Method::Post,
                "/_bulk?refresh=wait_for",
                Some(bytes::Bytes::from(body)),
                "application/x-ndjson",
            )
            .await?;
        let v: Value = serde_json::from_slice(&resp).unwrap_or(Value::Null);
        if !(200..300).contains(&status) || v["errors"].as_bool() != Some(false) {
            return Err(SinkError::Status {
                status,
                what: format!("POST /_bulk (dead letters into {name})"),
                body: crate::snippet(&resp),
            });
        }
        Ok(())
    }

    /// Lists dead letters, optionally of one index (at most `limit`).
    pub async fn list_dead_letters(
        &self,
        name: &str,
        index: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, SinkError> {
        let (status, _) = self
            .request(Method::Head, &format!("/{name}"), None, "application/json")
            .await?;
        if status == 404 {
            return Ok(Vec::new());
        }
        let _ = self.refresh(name).await;
        let query = match index {
            Some(i) => json!({"term": {"index": i}}),
            None => json!({"match_all": {}}),
        };
        let v = self
            .json_request(
                Method::Post,
                &format!("/{name}/_search"),
                Some(json!({"size": limit, "query": query})),
            )
            .await?;
        let hits = v["hits"]["hits"].as_array().cloned().unwrap_or_default();
        Ok(hits
            .iter()
            .map(|h| {
                let s = &h["_source"];
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
            })
            .collect())
    }

    /// Removes these dead letters.
    pub async fn remove_dead_letters(
        &self,
        name: &str,
        letters: &[DeadLetter],
    ) -> Result<(), SinkError> {
        for l in letters {
            let path = format!(
                "/{name}/_doc/{}?refresh=wait_for",
                utf8_percent_encode(&l.entry_id(), PATH_SEGMENT)
            );
            let (status, body) = self
                .request(Method::Delete, &path, None, "application/json")
                .await?;
            if !(200..300).contains(&status) && status != 404 {
                return Err(SinkError::Status {
                    status,
                    what: format!("DELETE {path}"),
                    body: crate::snippet(&body),
                });
            }
        }
        Ok(())
    }
}

/// Everything but RFC 3986's unreserved characters is escaped in a path segment.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_are_escaped_as_one_path_segment() {
        let escaped = utf8_percent_encode("users:1,a/b c?~é", PATH_SEGMENT).to_string();
        assert_eq!(escaped, "users%3A1%2Ca%2Fb%20c%3F~%C3%A9");
    }
}
