//! Index lifecycle and mappings: `GET /`, cluster health, create, exists,
//! get, delete, `_mapping` and `_settings`.

use super::*;

pub(super) fn info() -> Value {
    json!({
        "name": "fastsink",
        "cluster_name": "fastsink",
        "cluster_uuid": "fastsink-0000000000000000",
        "version": {
            "distribution": "opensearch",
            "number": VERSION_NUMBER,
            "build_type": "tar",
            "build_hash": "fastsink",
            "build_date": "2025-01-01T00:00:00.000000Z",
            "build_snapshot": false,
            "lucene_version": "9.12.1",
            "minimum_wire_compatibility_version": "7.10.0",
            "minimum_index_compatibility_version": "7.0.0"
        },
        "tagline": "The OpenSearch Project: https://opensearch.org/"
    })
}

pub(super) fn health() -> Value {
    json!({
        "cluster_name": "fastsink",
        "status": "green",
        "timed_out": false,
        "number_of_nodes": 1,
        "number_of_data_nodes": 1,
        "active_primary_shards": 0,
        "active_shards": 0,
        "relocating_shards": 0,
        "initializing_shards": 0,
        "unassigned_shards": 0,
        "active_shards_percent_as_number": 100.0
    })
}

pub(super) fn shards() -> Value {
    json!({"total": 1, "successful": 1, "failed": 0})
}

/// Parses a JSON object body; an empty body is an empty object.
pub(super) fn object_body(body: &[u8]) -> std::result::Result<Map<String, Value>, Reply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Reply::error(
            400,
            "parse_exception",
            "request body must be a JSON object",
        )),
        Err(e) => Err(Reply::error(
            400,
            "parse_exception",
            format!("request body is not valid JSON: {e}"),
        )),
    }
}

pub(super) fn exists(shared: &Shared, expr: &str) -> Reply {
    let state = shared.lock();
    match state.resolve(expr) {
        Ok(v) if !v.is_empty() => Reply::json(200, &json!({})),
        _ => Reply::json(404, &json!({})),
    }
}

pub(super) fn create_index(shared: &Shared, name: &str, body: &[u8]) -> Reply {
    let mut req = match object_body(body) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let mut state = shared.lock();
    if state.indices.contains_key(name) {
        return Reply::fail(
            &Fail::new(
                400,
                "resource_already_exists_exception",
                format!("index [{name}/fastsink] already exists"),
            ),
            Some(name),
        );
    }
    if state.aliases.contains_key(name) {
        return Reply::fail(
            &Fail::new(
                400,
                "invalid_index_name_exception",
                format!("Invalid index name [{name}], already exists as alias"),
            ),
            Some(name),
        );
    }
    if let Some(why) = invalid_index_name(name) {
        return Reply::fail(
            &Fail::new(
                400,
                "invalid_index_name_exception",
                format!("Invalid index name [{name}], {why}"),
            ),
            Some(name),
        );
    }
    let mappings = match req.remove("mappings") {
        Some(Value::Object(m)) => m,
        None | Some(Value::Null) => Map::new(),
        Some(_) => {
            return Reply::error(
                400,
                "mapper_parsing_exception",
                "mappings must be an object",
            )
        }
    };
    let settings = req.remove("settings").unwrap_or_else(|| json!({}));
    let aliases: Vec<String> = match req.remove("aliases") {
        Some(Value::Object(a)) => a.keys().cloned().collect(),
        _ => Vec::new(),
    };
    state
        .indices
        .insert(name.to_owned(), Index::new(name, mappings, settings));
    for alias in aliases {
        state
            .aliases
            .entry(alias)
            .or_default()
            .insert(name.to_owned());
    }
    drop(state);
    shared.changed.notify_all();
    Reply::json(
        200,
        &json!({"acknowledged": true, "shards_acknowledged": true, "index": name}),
    )
}

pub(super) fn get_index(shared: &Shared, expr: &str) -> Reply {
    let state = shared.lock();
    let names = match state.resolve(expr) {
        Ok(n) => n,
        Err(missing) => return Reply::fail(&Fail::index_not_found(&missing), Some(&missing)),
    };
    let mut out = Map::new();
    for name in names {
        if let Some(ix) = state.indices.get(&name) {
            let aliases: Map<String, Value> = state
                .aliases_of(&name)
                .into_iter()
                .map(|a| (a.to_owned(), json!({})))
                .collect();
            out.insert(
                name.clone(),
                json!({"aliases": aliases, "mappings": ix.mappings, "settings": ix.settings}),
            );
        }
    }
    Reply::json(200, &Value::Object(out))
}

pub(super) fn delete_index(shared: &Shared, name: &str) -> Reply {
    let mut state = shared.lock();
    if state.aliases.contains_key(name) && !state.indices.contains_key(name) {
        return Reply::error(
            400,
            "illegal_argument_exception",
            format!(
                "The provided expression [{name}] matches an alias, specify the corresponding concrete indices instead."
            ),
        );
    }
    let names = match state.resolve(name) {
        Ok(n) if !n.is_empty() => n,
        Ok(_) => return Reply::ok(),
        Err(missing) => return Reply::fail(&Fail::index_not_found(&missing), Some(&missing)),
    };
    for n in &names {
        state.indices.remove(n);
        for targets in state.aliases.values_mut() {
            targets.remove(n);
        }
    }
    state.aliases.retain(|_, t| !t.is_empty());
    drop(state);
    shared.changed.notify_all();
    Reply::ok()
}

pub(super) fn get_mapping(shared: &Shared, expr: &str) -> Reply {
    let state = shared.lock();
    let names = match state.resolve(expr) {
        Ok(n) => n,
        Err(missing) => return Reply::fail(&Fail::index_not_found(&missing), Some(&missing)),
    };
    let mut out = Map::new();
    for name in names {
        if let Some(ix) = state.indices.get(&name) {
            out.insert(name, json!({"mappings": ix.mappings}));
        }
    }
    Reply::json(200, &Value::Object(out))
}

/// Dynamic settings are accepted and ignored (the double has no refresh or
/// tombstone expiry to tune); a missing index is an error as in OpenSearch.
pub(super) fn put_settings(shared: &Shared, expr: &str) -> Reply {
    let state = shared.lock();
    match state.resolve(expr) {
        Ok(_) => Reply::json(200, &json!({"acknowledged": true})),
        Err(missing) => Reply::fail(&Fail::index_not_found(&missing), Some(&missing)),
    }
}

pub(super) fn put_mapping(shared: &Shared, expr: &str, body: &[u8]) -> Reply {
    let req = match object_body(body) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let mut state = shared.lock();
    let names = match state.resolve(expr) {
        Ok(n) => n,
        Err(missing) => return Reply::fail(&Fail::index_not_found(&missing), Some(&missing)),
    };
    for name in names {
        let Some(ix) = state.indices.get_mut(&name) else {
            continue;
        };
        for (key, value) in &req {
            match (key.as_str(), value) {
                ("properties", Value::Object(props)) => {
                    let slot = ix.mappings.entry("properties").or_insert_with(|| json!({}));
                    if let Value::Object(existing) = slot {
                        for (field, mapping) in props {
                            existing.insert(field.clone(), mapping.clone());
                        }
                    } else {
                        *slot = Value::Object(props.clone());
                    }
                }
                _ => {
                    ix.mappings.insert(key.clone(), value.clone());
                }
            }
        }
    }
    drop(state);
    shared.changed.notify_all();
    Reply::ok()
}
