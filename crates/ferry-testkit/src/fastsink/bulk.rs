//! Bulk semantics: versioning (internal, `external`, `external_gte`),
//! applying each action to the store and rendering the per-item answer.

use super::*;

/// The version a write gets, or why it is refused, given the stored version.
pub(super) fn next_version(
    meta: &Meta<'_>,
    id: &str,
    current: Option<u64>,
) -> std::result::Result<u64, (ItemOutcome, Fail)> {
    let vt = meta.version_type.as_ref().map(|s| s.0.as_ref());
    let invalid = |reason: String| {
        (
            ItemOutcome::Rejected(400),
            Fail::new(400, "action_request_validation_exception", reason),
        )
    };
    match vt {
        None | Some("internal") => {
            if meta.version.is_some() {
                return Err(invalid(
                    "Validation Failed: 1: internal versioning can not be used for optimistic \
                     concurrency control. Please use `if_seq_no` and `if_primary_term` instead;"
                        .into(),
                ));
            }
            Ok(current.map_or(1, |c| c + 1))
        }
        Some(kind @ ("external" | "external_gte")) => {
            let Some(v) = meta.version else {
                return Err(invalid(format!(
                    "Validation Failed: 1: an external version must be set for version_type [{kind}];"
                )));
            };
            let gte = kind == "external_gte";
            match current {
                Some(c) if (gte && v < c) || (!gte && v <= c) => Err((
                    ItemOutcome::Conflict,
                    Fail::new(
                        409,
                        "version_conflict_engine_exception",
                        format!(
                            "[{id}]: version conflict, current version [{c}] is higher{} than the one provided [{v}]",
                            if gte { "" } else { " or equal to" }
                        ),
                    ),
                )),
                _ => Ok(v),
            }
        }
        Some(other) => Err(invalid(format!(
            "Validation Failed: 1: version type [{other}] is not supported by FastSink;"
        ))),
    }
}

/// Applies one action to the state.
pub(super) fn apply<'a>(
    state: &mut State,
    op: &Op<'a>,
    default_index: Option<&str>,
    memo: &mut Option<(String, Arc<str>)>,
    at: Instant,
) -> Done<'a> {
    let given = op
        .meta
        .index
        .as_ref()
        .map(|s| s.0.as_ref())
        .or(default_index);
    let id: Cow<'a, str> = match &op.meta.id {
        Some(s) => s.0.clone(),
        None if op.kind != OpKind::Delete => {
            state.auto_ids += 1;
            Cow::Owned(format!("fastsink-{}", state.auto_ids))
        }
        None => Cow::Borrowed(""),
    };
    let mut done = Done {
        kind: op.kind,
        index: Arc::from(given.unwrap_or("")),
        id,
        version: 0,
        seq_no: 0,
        outcome: ItemOutcome::Rejected(400),
        error: None,
    };
    let fail = |mut done: Done<'a>, outcome: ItemOutcome, f: Fail| {
        done.outcome = outcome;
        done.error = Some(f);
        done
    };
    let Some(given) = given else {
        let f = Fail::new(
            400,
            "action_request_validation_exception",
            "Validation Failed: 1: index is missing;",
        );
        return fail(done, ItemOutcome::Rejected(400), f);
    };
    if op.kind == OpKind::Delete && done.id.is_empty() {
        let f = Fail::new(
            400,
            "action_request_validation_exception",
            "Validation Failed: 1: id is missing;",
        );
        return fail(done, ItemOutcome::Rejected(400), f);
    }
    if op.kind == OpKind::Update {
        let f = Fail::new(
            400,
            "illegal_argument_exception",
            "FastSink does not implement bulk update actions",
        );
        return fail(done, ItemOutcome::Rejected(400), f);
    }
    if let Some(source) = op.source {
        if let Err(f) = check_source(source) {
            let status = f.status;
            return fail(done, ItemOutcome::Rejected(status), f);
        }
    }

    let concrete = match memo {
        Some((name, arc)) if name == given => Arc::clone(arc),
        _ => match state.write_target(given, op.kind != OpKind::Delete) {
            Ok(arc) => {
                *memo = Some((given.to_owned(), Arc::clone(&arc)));
                arc
            }
            Err(f) => {
                let status = f.status;
                return fail(done, ItemOutcome::Rejected(status), f);
            }
        },
    };
    done.index = Arc::clone(&concrete);
    let Some(ix) = state.indices.get_mut(&*concrete) else {
        let f = Fail::index_not_found(&concrete);
        return fail(done, ItemOutcome::Rejected(404), f);
    };

    let current = ix.docs.get(done.id.as_ref());
    let current_version = current.map(|d| d.version);
    let was_live = current.is_some_and(|d| d.source.is_some());
    if op.kind == OpKind::Create && was_live {
        let f = Fail::new(
            409,
            "version_conflict_engine_exception",
            format!(
                "[{}]: version conflict, document already exists (current version [{}])",
                done.id,
                current_version.unwrap_or(0)
            ),
        );
        return fail(done, ItemOutcome::Conflict, f);
    }
    let version = match next_version(&op.meta, &done.id, current_version) {
        Ok(v) => v,
        Err((outcome, f)) => return fail(done, outcome, f),
    };
    ix.next_seq_no += 1;
    let seq_no = ix.next_seq_no;
    let source: Option<Box<[u8]>> = op.source.map(Box::from);
    let is_delete = source.is_none();
    match ix.docs.get_mut(done.id.as_ref()) {
        Some(doc) => {
            doc.version = version;
            doc.seq_no = seq_no;
            doc.source = source;
            doc.at = at;
        }
        None => {
            ix.docs.insert(
                done.id.clone().into_owned(),
                Doc {
                    version,
                    seq_no,
                    source,
                    at,
                },
            );
        }
    }
    done.outcome = match (is_delete, was_live) {
        (true, true) => {
            ix.live -= 1;
            ItemOutcome::Deleted
        }
        (true, false) => ItemOutcome::NotFound,
        (false, true) => ItemOutcome::Updated,
        (false, false) => {
            ix.live += 1;
            ItemOutcome::Created
        }
    };
    done.version = version;
    done.seq_no = seq_no;
    done
}

pub(super) fn bulk(
    shared: &Shared,
    default_index: Option<&str>,
    body: &Bytes,
    received: Instant,
) -> Reply {
    let started = Instant::now();
    Counters::add(&shared.counters.bulk_requests, 1);
    let ops = match parse_bulk(body) {
        Ok(ops) => ops,
        Err(reply) => return reply,
    };
    let mut done = Vec::with_capacity(ops.len());
    let mut conflicts = 0u64;
    let mut errors = 0u64;
    {
        let mut state = shared.lock();
        let mut memo = None;
        for op in &ops {
            done.push(apply(&mut state, op, default_index, &mut memo, received));
        }
        for d in &done {
            match d.outcome {
                ItemOutcome::Conflict => conflicts += 1,
                ItemOutcome::Rejected(_) => errors += 1,
                _ => {}
            }
        }
        // Counters and subscribers are updated before the state lock is
        // released, so whoever observes the new state also sees them.
        Counters::add(&shared.counters.bulk_items, done.len() as u64);
        Counters::add(&shared.counters.bulk_conflicts, conflicts);
        Counters::add(&shared.counters.bulk_errors, errors);
        if shared.has_subscribers.load(Ordering::Acquire) {
            let items = done
                .iter()
                .map(|d| ItemArrival {
                    index: Arc::clone(&d.index),
                    id: d.id.to_string(),
                    version: d.version,
                    outcome: d.outcome,
                })
                .collect();
            shared.publish(BulkArrival { received, items });
        }
    }
    shared.changed.notify_all();

    let mut out = Vec::with_capacity(64 + done.len() * 200);
    let _ = write!(
        out,
        "{{\"took\":{},\"errors\":{},\"items\":[",
        started.elapsed().as_millis(),
        conflicts + errors > 0
    );
    for (i, d) in done.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        render_item(&mut out, d);
    }
    out.extend_from_slice(b"]}");
    Reply {
        status: 200,
        body: out,
        close: false,
    }
}

pub(super) fn render_item(out: &mut Vec<u8>, d: &Done<'_>) {
    out.extend_from_slice(b"{\"");
    out.extend_from_slice(d.kind.key().as_bytes());
    out.extend_from_slice(b"\":{\"_index\":");
    push_json_str(out, &d.index);
    out.extend_from_slice(b",\"_id\":");
    push_json_str(out, &d.id);
    match &d.error {
        None => {
            let result = match d.outcome {
                ItemOutcome::Created => "created",
                ItemOutcome::Updated => "updated",
                ItemOutcome::Deleted => "deleted",
                _ => "not_found",
            };
            let _ = write!(
                out,
                ",\"_version\":{},\"result\":\"{result}\",\"_shards\":{{\"total\":2,\"successful\":1,\"failed\":0}},\"_seq_no\":{},\"_primary_term\":1,\"status\":{}}}}}",
                d.version,
                d.seq_no,
                d.outcome.status()
            );
        }
        Some(f) => {
            let _ = write!(out, ",\"status\":{},\"error\":{{\"type\":", f.status);
            push_json_str(out, f.kind);
            out.extend_from_slice(b",\"reason\":");
            push_json_str(out, &f.reason);
            out.extend_from_slice(b",\"index\":");
            push_json_str(out, &d.index);
            out.extend_from_slice(b",\"shard\":\"0\",\"index_uuid\":\"fastsink\"}}}");
        }
    }
}

/// Appends `s` as a JSON string literal.
pub(super) fn push_json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    if !bytes.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20) {
        out.extend_from_slice(bytes);
    } else {
        for &b in bytes {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                b if b < 0x20 => {
                    let _ = write!(out, "\\u{b:04x}");
                }
                b => out.push(b),
            }
        }
    }
    out.push(b'"');
}
