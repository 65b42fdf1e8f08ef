//! `/status`: a JSON summary for humans and scripts (`ferry status`).

use std::sync::atomic::Ordering::Relaxed;

use ferry_core::stats::Stats;
use ferry_core::Lsn;
use serde_json::{json, Value};

use crate::AdminInfo;

/// The status document, as of now.
///
/// Shape: `version`, `slot`, `ready`, `not_ready_reason`, `healthy`,
/// `unhealthy_reason`, `streaming`, `standby`, `source_ok`, `sink_ok`, `confirmed_lsn` and `received_lsn` (`X/Y` text), `lag`
/// (`bytes`, `seconds`), `queue_depth`, `transactions`, `changes`
/// (`insert`, `update`, `delete`) and `indexes`: a list of `name`, `state`,
/// `backfill` (`rows`, `estimate` or null), `documents` (`written`,
/// `deleted`, `superseded`, `rejected`), `dead_letters` and `last_error`.
pub fn status_json(stats: &Stats, info: &AdminInfo) -> Value {
    status_at(stats, info, crate::now_pg_micros())
}

/// The status document as of `now_us` (µs since 2000-01-01).
pub(crate) fn status_at(stats: &Stats, info: &AdminInfo, now_us: i64) -> Value {
    let lag = crate::lag(stats, now_us);
    let mono = ferry_core::stats::mono_us();
    let ready = crate::readiness(stats, &info.limits, mono);
    let live = crate::liveness(stats, &info.limits, mono);
    // Named sinks: each one's reachability and how long its writes have
    // failed (the slot holds its position while any sink fails).
    let sinks: Vec<Value> = stats
        .sinks()
        .iter()
        .map(|k| {
            json!({
                "name": k.name,
                "ok": k.ok.load(Relaxed),
                "failing_seconds": k.failing_for(mono).map(|d| (d.as_secs_f64() * 10.0).round() / 10.0),
            })
        })
        .collect();
    let indexes: Vec<Value> = stats
        .indexes
        .lock()
        .map(|g| g.clone())
        .unwrap_or_default()
        .iter()
        .map(|ix| {
            let estimate = ix.backfill_total.load(Relaxed);
            let last_error = ix.last_error.lock().ok().and_then(|e| e.clone());
            json!({
                "name": ix.name,
                "sink": ix.sink,
                "state": ix.state().as_str(),
                "backfill": {
                    "rows": ix.backfill_rows.load(Relaxed),
                    "estimate": (estimate >= 0).then_some(estimate),
                },
                "documents": {
                    "written": ix.docs_written.load(Relaxed),
                    "deleted": ix.docs_deleted.load(Relaxed),
                    "superseded": ix.docs_superseded.load(Relaxed),
                    "rejected": ix.docs_rejected.load(Relaxed),
                },
                "dead_letters": ix.dead_letters.load(Relaxed),
                "last_error": last_error,
            })
        })
        .collect();
    json!({
        "version": info.version,
        "slot": info.slot,
        "ready": ready.is_ok(),
        "not_ready_reason": ready.err(),
        "healthy": live.is_ok(),
        "unhealthy_reason": live.err(),
        "streaming": stats.streaming.load(Relaxed),
        "standby": stats.standby.load(Relaxed),
        "source_ok": stats.source_ok.load(Relaxed),
        "sink_ok": stats.sink_ok.load(Relaxed),
        "confirmed_lsn": Lsn(stats.confirmed_lsn.load(Relaxed)).to_string(),
        "received_lsn": Lsn(stats.received_lsn.load(Relaxed)).to_string(),
        "lag": {
            "bytes": lag.bytes,
            "seconds": (lag.seconds * 1000.0).round() / 1000.0,
        },
        "queue_depth": stats.queue_depth(),
        "transactions": stats.transactions.load(Relaxed),
        "changes": {
            "insert": stats.changes[0].load(Relaxed),
            "update": stats.changes[1].load(Relaxed),
            "delete": stats.changes[2].load(Relaxed),
        },
        "sinks": sinks,
        "indexes": indexes,
    })
}

/// Renders a status document (as served at `/status`) as a few summary
/// lines and a table of indexes, for `ferry status`. Missing fields show
/// as `?` so that a newer or older server still prints.
pub fn status_table(v: &Value) -> String {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "?".to_string(),
        other => other.to_string(),
    };
    let num = |v: &Value| {
        v.as_u64()
            .map_or_else(|| "?".to_string(), |n| n.to_string())
    };
    let mut out = String::new();
    let ready = match (v["ready"].as_bool(), v["not_ready_reason"].as_str()) {
        (Some(true), _) => "ready".to_string(),
        (Some(false), Some(why)) => format!("NOT READY: {why}"),
        _ => "readiness unknown".to_string(),
    };
    out.push_str(&format!(
        "ferry {}  slot {}  {ready}\n",
        text(&v["version"]),
        text(&v["slot"])
    ));
    let seconds = v["lag"]["seconds"]
        .as_f64()
        .map_or_else(|| "?".to_string(), |s| format!("{s:.1}"));
    out.push_str(&format!(
        "position  confirmed {}  received {}  lag {} bytes, {seconds} s  queue {}\n",
        text(&v["confirmed_lsn"]),
        text(&v["received_lsn"]),
        num(&v["lag"]["bytes"]),
        v["queue_depth"]
            .as_i64()
            .map_or_else(|| "?".to_string(), |n| n.to_string()),
    ));
    out.push_str(&format!(
        "changes   {} inserts, {} updates, {} deletes in {} transactions\n\n",
        num(&v["changes"]["insert"]),
        num(&v["changes"]["update"]),
        num(&v["changes"]["delete"]),
        num(&v["transactions"]),
    ));
    let mut rows = vec![[
        "INDEX",
        "STATE",
        "BACKFILL",
        "WRITTEN",
        "DELETED",
        "REJECTED",
        "DEAD LETTERS",
    ]
    .map(String::from)];
    let mut errors = Vec::new();
    let empty = Vec::new();
    for k in v["sinks"].as_array().unwrap_or(&empty) {
        let state = match (k["ok"].as_bool(), k["failing_seconds"].as_f64()) {
            (_, Some(secs)) => format!("writes failing for {secs:.1} s (the slot waits for it)"),
            (Some(true), None) => "reachable".to_string(),
            _ => "NOT REACHABLE (the slot waits for it)".to_string(),
        };
        out.push_str(&format!("sink      {}  {state}\n", text(&k["name"])));
    }
    if v["sinks"].as_array().is_some_and(|a| !a.is_empty()) {
        out.push('\n');
    }
    for ix in v["indexes"].as_array().unwrap_or(&empty) {
        let name = match ix["sink"].as_str() {
            Some(sink) => format!("{}@{sink}", text(&ix["name"])),
            None => text(&ix["name"]),
        };
        let backfill = format!(
            "{}/{}",
            num(&ix["backfill"]["rows"]),
            num(&ix["backfill"]["estimate"])
        );
        if let Some(e) = ix["last_error"].as_str() {
            errors.push(format!("last error in {name}: {e}"));
        }
        rows.push([
            name,
            text(&ix["state"]),
            backfill,
            num(&ix["documents"]["written"]),
            num(&ix["documents"]["deleted"]),
            num(&ix["documents"]["rejected"]),
            num(&ix["dead_letters"]),
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i < 3 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if rows.len() == 1 {
        out.push_str("(no index registered yet)\n");
    }
    for e in errors {
        out.push('\n');
        out.push_str(&e);
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// The base URL to reach an admin endpoint listening on `listen`
/// (`ip:port`): a wildcard address is reached through loopback.
pub fn admin_url(listen: &str) -> Option<String> {
    let mut addr: std::net::SocketAddr = listen.parse().ok()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Some(format!("http://{addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{sample, NOW};

    fn info() -> AdminInfo {
        AdminInfo {
            slot: "ferry_app".into(),
            version: "9.9.9",
            limits: crate::HealthLimits::default(),
        }
    }

    #[test]
    fn status_has_positions_lag_and_indexes() {
        let v = status_at(&sample(), &info(), NOW);
        assert_eq!(v["slot"], "ferry_app");
        assert_eq!(v["version"], "9.9.9");
        assert_eq!(v["ready"], true);
        assert_eq!(v["not_ready_reason"], Value::Null);
        assert_eq!(v["healthy"], true);
        assert_eq!(v["queue_depth"], 5);
        assert_eq!(v["confirmed_lsn"], "1/100");
        assert_eq!(v["received_lsn"], "1/180");
        assert_eq!(v["lag"]["bytes"], 128);
        assert_eq!(v["lag"]["seconds"], 2.5);
        assert_eq!(v["changes"]["insert"], 10);
        let users = &v["indexes"][0];
        assert_eq!(users["name"], "users");
        assert_eq!(users["state"], "streaming");
        assert_eq!(users["backfill"]["rows"], 100);
        assert_eq!(users["backfill"]["estimate"], 120);
        assert_eq!(users["documents"]["written"], 12);
        assert_eq!(users["documents"]["deleted"], 1);
        assert_eq!(users["documents"]["rejected"], 1);
        assert_eq!(users["dead_letters"], 1);
        assert_eq!(
            users["last_error"],
            "mapper_parsing_exception on field \"age\""
        );
        let orders = &v["indexes"][1];
        assert_eq!(orders["state"], "seeding");
        assert_eq!(orders["backfill"]["estimate"], Value::Null);
        assert_eq!(orders["last_error"], Value::Null);
    }

    #[test]
    fn table_lists_indexes_and_errors() {
        let v = status_at(&sample(), &info(), NOW);
        let t = status_table(&v);
        eprintln!("{t}");
        assert!(t.contains("slot ferry_app  ready"), "{t}");
        assert!(t.contains("lag 128 bytes, 2.5 s"), "{t}");
        let lines: Vec<&str> = t.lines().collect();
        let header = lines
            .iter()
            .position(|l| l.starts_with("INDEX"))
            .expect("header");
        let users: Vec<&str> = lines[header + 1].split_whitespace().collect();
        assert_eq!(
            users,
            ["users", "streaming", "100/120", "12", "1", "1", "1"]
        );
        let orders: Vec<&str> = lines[header + 2].split_whitespace().collect();
        assert_eq!(orders, ["orders", "seeding", "5/?", "0", "0", "0", "0"]);
        assert!(
            t.contains("last error in users: mapper_parsing_exception"),
            "{t}"
        );
        // Anything unexpected still prints.
        let odd = status_table(&json!({"indexes": [{"name": 3}]}));
        assert!(odd.contains("readiness unknown"), "{odd}");
        assert!(status_table(&json!({})).contains("no index registered"));
    }

    #[test]
    fn admin_url_reaches_wildcards_through_loopback() {
        assert_eq!(
            admin_url("127.0.0.1:9187").as_deref(),
            Some("http://127.0.0.1:9187")
        );
        assert_eq!(
            admin_url("0.0.0.0:9187").as_deref(),
            Some("http://127.0.0.1:9187")
        );
        assert_eq!(admin_url("[::]:1").as_deref(), Some("http://[::1]:1"));
        assert_eq!(admin_url("localhost:1"), None);
    }

    #[test]
    fn status_before_start_is_not_ready() {
        let v = status_at(&Stats::default(), &info(), NOW);
        assert_eq!(v["ready"], false);
        assert!(v["not_ready_reason"].is_string());
        assert_eq!(v["confirmed_lsn"], "0/0");
        assert_eq!(v["indexes"], json!([]));
    }
}
