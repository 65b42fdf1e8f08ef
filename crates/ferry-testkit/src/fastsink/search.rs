//! Reads and clean-ups: `_refresh`, `_count`, `_doc/{id}` and
//! `_delete_by_query` (`match_all` only).

use super::*;

pub(super) fn refresh(shared: &Shared, expr: &str) -> Reply {
    let state = shared.lock();
    match state.resolve(expr) {
        Ok(_) => Reply::json(200, &json!({"_shards": shards()})),
        Err(missing) => Reply::fail(&Fail::index_not_found(&missing), Some(&missing)),
    }
}

/// True when a search body is absent or asks for every document.
pub(super) fn matches_all(body: &[u8]) -> std::result::Result<bool, Reply> {
    let req = object_body(body)?;
    Ok(match req.get("query") {
        None => true,
        Some(q) => q.get("match_all").is_some(),
    })
}

pub(super) fn count(shared: &Shared, expr: &str, body: &[u8]) -> Reply {
    match matches_all(body) {
        Ok(true) => {}
        Ok(false) => {
            return Reply::error(
                400,
                "illegal_argument_exception",
                "FastSink counts only with match_all (or no query)",
            )
        }
        Err(r) => return r,
    }
    let state = shared.lock();
    match state.resolve(expr) {
        Ok(names) => {
            let n: usize = names
                .iter()
                .filter_map(|n| state.indices.get(n))
                .map(|ix| ix.live)
                .sum();
            Reply::json(200, &json!({"count": n, "_shards": shards()}))
        }
        Err(missing) => Reply::fail(&Fail::index_not_found(&missing), Some(&missing)),
    }
}

pub(super) fn delete_by_query(shared: &Shared, expr: &str, body: &[u8]) -> Reply {
    let started = Instant::now();
    match matches_all(body) {
        Ok(true) => {}
        Ok(false) => {
            return Reply::error(
                400,
                "illegal_argument_exception",
                "FastSink deletes by query only with match_all",
            )
        }
        Err(r) => return r,
    }
    let mut state = shared.lock();
    let names = match state.resolve(expr) {
        Ok(n) => n,
        Err(missing) => return Reply::fail(&Fail::index_not_found(&missing), Some(&missing)),
    };
    let now = Instant::now();
    let mut deleted = 0u64;
    for name in names {
        let Some(ix) = state.indices.get_mut(&name) else {
            continue;
        };
        for doc in ix.docs.values_mut() {
            if doc.source.take().is_some() {
                // Internal versioning: the delete bumps the version by one.
                doc.version += 1;
                ix.next_seq_no += 1;
                doc.seq_no = ix.next_seq_no;
                doc.at = now;
                deleted += 1;
            }
        }
        ix.live = 0;
    }
    drop(state);
    shared.changed.notify_all();
    Reply::json(
        200,
        &json!({
            "took": started.elapsed().as_millis() as u64,
            "timed_out": false,
            "total": deleted,
            "deleted": deleted,
            "batches": u64::from(deleted > 0),
            "version_conflicts": 0,
            "noops": 0,
            "retries": {"bulk": 0, "search": 0},
            "throttled_millis": 0,
            "requests_per_second": -1.0,
            "throttled_until_millis": 0,
            "failures": []
        }),
    )
}

pub(super) fn get_doc(shared: &Shared, expr: &str, id: &str) -> Reply {
    let state = shared.lock();
    let names = match state.resolve(expr) {
        Ok(n) => n,
        Err(missing) => return Reply::fail(&Fail::index_not_found(&missing), Some(&missing)),
    };
    for name in &names {
        let Some(ix) = state.indices.get(name) else {
            continue;
        };
        if let Some(doc) = ix.docs.get(id) {
            if let Some(source) = &doc.source {
                let mut body = Vec::with_capacity(source.len() + 160);
                body.extend_from_slice(b"{\"_index\":");
                push_json_str(&mut body, name);
                body.extend_from_slice(b",\"_id\":");
                push_json_str(&mut body, id);
                let _ = write!(
                    body,
                    ",\"_version\":{},\"_seq_no\":{},\"_primary_term\":1,\"found\":true,\"_source\":",
                    doc.version, doc.seq_no
                );
                body.extend_from_slice(source);
                body.push(b'}');
                return Reply {
                    status: 200,
                    body,
                    close: false,
                };
            }
        }
    }
    let index = names.first().map(String::as_str).unwrap_or(expr);
    Reply::json(404, &json!({"_index": index, "_id": id, "found": false}))
}
