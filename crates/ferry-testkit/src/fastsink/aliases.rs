//! `POST /_aliases` (applied atomically) and alias reads.

use super::*;

/// Names of one alias action field that may be a string or an array of strings.
pub(super) fn names_field(action: &Map<String, Value>, one: &str, many: &str) -> Vec<String> {
    let mut out = Vec::new();
    for key in [one, many] {
        match action.get(key) {
            Some(Value::String(s)) => out.push(s.clone()),
            Some(Value::Array(a)) => {
                out.extend(a.iter().filter_map(|v| v.as_str().map(str::to_owned)))
            }
            _ => {}
        }
    }
    out
}

pub(super) fn update_aliases(shared: &Shared, body: &[u8]) -> Reply {
    let req = match object_body(body) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let Some(Value::Array(actions)) = req.get("actions") else {
        return Reply::error(
            400,
            "action_request_validation_exception",
            "Validation Failed: 1: no actions;",
        );
    };
    let mut state = shared.lock();
    // Work on a copy and commit it only if every action is valid: atomic, like OpenSearch.
    let mut aliases = state.aliases.clone();
    let mut drop_indices = Vec::new();
    for action in actions {
        let Some((kind, Value::Object(spec))) = action.as_object().and_then(|o| o.iter().next())
        else {
            return Reply::error(
                400,
                "illegal_argument_exception",
                format!("malformed alias action {action}"),
            );
        };
        let indices = names_field(spec, "index", "indices");
        let names = names_field(spec, "alias", "aliases");
        let mut concrete = Vec::new();
        for ix in &indices {
            match state.resolve(ix) {
                Ok(v) if !v.is_empty() => concrete.extend(v),
                Ok(_) | Err(_) => return Reply::fail(&Fail::index_not_found(ix), Some(ix)),
            }
        }
        match kind.as_str() {
            "add" => {
                if concrete.is_empty() || names.is_empty() {
                    return Reply::error(
                        400,
                        "action_request_validation_exception",
                        "Validation Failed: 1: [index] and [alias] are required for add;",
                    );
                }
                for alias in &names {
                    if state.indices.contains_key(alias) {
                        return Reply::error(
                            400,
                            "invalid_alias_name_exception",
                            format!("Invalid alias name [{alias}]: an index or data stream exists with the same name as the alias"),
                        );
                    }
                    aliases
                        .entry(alias.clone())
                        .or_default()
                        .extend(concrete.iter().cloned());
                }
            }
            "remove" => {
                for alias in &names {
                    let removed = aliases.get_mut(alias).is_some_and(|targets| {
                        let before = targets.len();
                        targets.retain(|t| !concrete.contains(t));
                        targets.len() < before
                    });
                    if !removed {
                        return Reply::error(
                            404,
                            "aliases_not_found_exception",
                            format!("aliases [{alias}] missing"),
                        );
                    }
                }
            }
            "remove_index" => drop_indices.extend(concrete),
            other => {
                let why =
                    format!("unknown alias action [{other}]; use add, remove or remove_index");
                return Reply::error(400, "illegal_argument_exception", why);
            }
        }
    }
    for name in &drop_indices {
        state.indices.remove(name);
        for targets in aliases.values_mut() {
            targets.remove(name);
        }
    }
    aliases.retain(|_, t| !t.is_empty());
    state.aliases = aliases;
    drop(state);
    shared.changed.notify_all();
    Reply::ok()
}

pub(super) fn get_aliases(shared: &Shared, index: Option<&str>, names: Option<&str>) -> Reply {
    let state = shared.lock();
    let indices: Option<Vec<String>> = match index.map(|i| state.resolve(i)) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(missing)) => return Reply::fail(&Fail::index_not_found(&missing), Some(&missing)),
    };
    let wanted: Option<Vec<&str>> = names.map(|n| n.split(',').collect());
    let mut out: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut missing: Vec<&str> = Vec::new();
    if let Some(w) = &wanted {
        for name in w {
            let known = state.aliases.iter().any(|(a, _)| {
                if name.contains('*') {
                    glob(name, a)
                } else {
                    a == name
                }
            });
            if !known {
                missing.push(name);
            }
        }
    }
    for (alias, targets) in &state.aliases {
        if let Some(w) = &wanted {
            if !w.iter().any(|p| {
                if p.contains('*') {
                    glob(p, alias)
                } else {
                    p == alias
                }
            }) {
                continue;
            }
        }
        for t in targets {
            if indices.as_ref().is_some_and(|ix| !ix.contains(t)) {
                continue;
            }
            out.entry(t.clone())
                .or_default()
                .insert(alias.clone(), json!({}));
        }
    }
    if let (Some(ix), None) = (&indices, &wanted) {
        for i in ix {
            out.entry(i.clone()).or_default();
        }
    }
    let body: Map<String, Value> = out
        .into_iter()
        .map(|(k, v)| (k, json!({"aliases": v})))
        .collect();
    if !missing.is_empty() {
        let what = missing.join(",");
        let mut v = Value::Object(body);
        v["error"] = json!(format!("alias [{what}] missing"));
        v["status"] = json!(404);
        return Reply::json(404, &v);
    }
    Reply::json(200, &Value::Object(body))
}
