//! FastSink on its own: how many documents per second it absorbs from one
//! keep-alive connection sending ferry-shaped bulk requests. Proves the sink
//! is far from being the bottleneck of the other workloads.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_testkit::FastSink;

use crate::report::{thousands, Outcome, Target};

/// Documents per bulk request, like ferry's default batch.
const BATCH: u64 = 5_000;

/// Sends `docs` documents in bulk requests and reports the rate.
pub async fn run(docs: u64, min_rate: f64) -> Result<Outcome> {
    let sink = FastSink::start()?;
    let url = sink.url().to_owned();
    let (took, requests, bytes) = tokio::task::spawn_blocking(move || blast(&url, docs))
        .await
        .context("joining the self-test client")??;
    let mut o = Outcome::new("sink-selftest", docs, "docs");
    let secs = took.as_secs_f64();
    o.seconds = Some(secs);
    o.rate = Some(docs as f64 / secs);
    let stored = sink.doc_count("selftest");
    o.ok = stored as u64 == docs;
    o.check = if o.ok {
        format!("{stored} documents stored")
    } else {
        format!("FAIL: {stored} documents stored, {docs} sent")
    };
    o.notes.push(format!(
        "{requests} bulk requests of {BATCH} index actions ({:.1} MiB) over one keep-alive connection, client on the same machine",
        bytes as f64 / (1024.0 * 1024.0)
    ));
    if let Some(rate) = o.rate {
        o.targets.push(Target {
            goal: format!("FastSink >= {} docs/s", thousands(min_rate)),
            measured: thousands(rate),
            met: rate >= min_rate,
        });
    }
    Ok(o)
}

/// One ferry-shaped bulk body for ids `lo..hi`.
fn body(lo: u64, hi: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(((hi - lo) * 240) as usize);
    for id in lo..hi {
        let _ = writeln!(
            out,
            "{{\"index\":{{\"_index\":\"selftest\",\"_id\":\"{id}\",\"version\":{},\"version_type\":\"external_gte\"}}}}",
            1_000_000 + id
        );
        let _ = writeln!(
            out,
            "{{\"id\":{id},\"a\":{},\"b\":{},\"label\":\"label-{}\",\"note\":\"{:032x}\",\"created_at\":\"2024-01-01T00:00:00Z\"}}",
            id % 1000,
            (id * 7) % 100_000,
            id % 97,
            u128::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
        );
    }
    out
}

/// Sends every request on one connection; returns time, requests and bytes.
fn blast(url: &str, docs: u64) -> Result<(Duration, u64, u64)> {
    let bodies: Vec<Vec<u8>> = (0..docs)
        .step_by(BATCH as usize)
        .map(|lo| body(lo, (lo + BATCH).min(docs)))
        .collect();
    let bytes = bodies.iter().map(|b| b.len() as u64).sum();
    let addr = url.trim_start_matches("http://");
    let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream);
    let started = Instant::now();
    for b in &bodies {
        let head = format!(
            "POST /_bulk HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/x-ndjson\r\ncontent-length: {}\r\n\r\n",
            b.len()
        );
        let sock = reader.get_mut();
        sock.write_all(head.as_bytes())?;
        sock.write_all(b)?;
        let (status, answer) = read_response(&mut reader)?;
        let clean: &[u8] = b"\"errors\":false";
        if status != 200 || !answer.windows(clean.len()).any(|w| w == clean) {
            bail!(
                "FastSink answered {status}: {}",
                String::from_utf8_lossy(&answer[..answer.len().min(300)])
            );
        }
    }
    Ok((started.elapsed(), bodies.len() as u64, bytes))
}

fn read_response(reader: &mut BufReader<TcpStream>) -> Result<(u16, Vec<u8>)> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {line:?}"))?;
    let mut len = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            bail!("connection closed in the response head");
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                len = value.trim().parse()?;
            }
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_ndjson() {
        let b = body(3, 5);
        let text = String::from_utf8(b).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        for l in lines {
            serde_json::from_str::<serde_json::Value>(l).expect("json line");
        }
        assert!(text.ends_with('\n'));
    }
}
