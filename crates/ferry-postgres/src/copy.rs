//! Reading `COPY … TO STDOUT` output (text format) row by row.
//!
//! Every document ferry builds by query, and every backfill chunk, arrives
//! this way: one `COPY` statement, its rows parsed without allocating per
//! field, handed to the caller as [`CopyRow`]s. Values are PostgreSQL text
//! output, rendered by the same code as the replication stream.

use std::pin::Pin;

use ferry_core::copytext;
use futures_util::StreamExt;
use tokio_postgres::{Client, CopyOutStream};

use crate::SourceError;

/// One parsed row: unescaped field bytes in one buffer plus their ranges.
#[derive(Debug, Default)]
pub struct CopyRow {
    scratch: Vec<u8>,
    ranges: Vec<Option<(usize, usize)>>,
}

impl CopyRow {
    /// Parses one line (without its newline), replacing the previous row.
    fn parse(&mut self, line: &[u8]) {
        self.scratch.clear();
        self.ranges.clear();
        for f in copytext::split_fields(line) {
            let range = f.map(|raw| {
                let at = self.scratch.len();
                if !copytext::is_plain(raw) {
                    copytext::unescape(raw, &mut self.scratch);
                } else {
                    self.scratch.extend_from_slice(raw);
                }
                (at, self.scratch.len())
            });
            self.ranges.push(range);
        }
    }

    /// Field `i`'s text, `None` for NULL (or a missing field).
    pub fn field(&self, i: usize) -> Option<&[u8]> {
        self.ranges
            .get(i)
            .copied()
            .flatten()
            .and_then(|(a, b)| self.scratch.get(a..b))
    }

    /// The first `n` fields as strings (a key; NULL reads as empty).
    pub fn texts(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| String::from_utf8_lossy(self.field(i).unwrap_or(b"")).into_owned())
            .collect()
    }
}

/// Splits COPY output chunks into complete lines, carrying partial lines over.
#[derive(Debug, Default)]
struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Feeds a chunk and calls `each` for every complete line in it.
    fn feed(&mut self, chunk: &[u8], mut each: impl FnMut(&[u8])) {
        if self.pending.is_empty() {
            // Fast path: COPY sends whole rows per message.
            let mut start = 0;
            while let Some(nl) = chunk[start..].iter().position(|b| *b == b'\n') {
                each(&chunk[start..start + nl]);
                start += nl + 1;
            }
            self.pending.extend_from_slice(&chunk[start..]);
            return;
        }
        self.pending.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(nl) = self.pending[start..].iter().position(|b| *b == b'\n') {
            each(&self.pending[start..start + nl]);
            start += nl + 1;
        }
        self.pending.drain(..start);
    }
}

/// The rows of one running `COPY … TO STDOUT`, read a server message at a
/// time so the caller may await (e.g. hand a full batch on) between reads.
pub struct CopyReader {
    stream: Pin<Box<CopyOutStream>>,
    lines: LineSplitter,
    row: CopyRow,
    what: String,
}

impl CopyReader {
    /// Starts `sql` (a `COPY … TO STDOUT`); `what` names the operation in errors.
    pub(crate) async fn start(client: &Client, sql: &str, what: &str) -> Result<Self, SourceError> {
        let stream = client
            .copy_out(sql)
            .await
            .map_err(|e| SourceError::from_pg(what, e))?;
        Ok(CopyReader {
            stream: Box::pin(stream),
            lines: LineSplitter::default(),
            row: CopyRow::default(),
            what: what.to_string(),
        })
    }

    /// Reads the next piece of output and calls `each` for every complete
    /// row in it; `false` once the output is exhausted.
    pub async fn read(&mut self, mut each: impl FnMut(&CopyRow)) -> Result<bool, SourceError> {
        let Some(chunk) = self.stream.next().await else {
            return Ok(false);
        };
        let chunk = chunk.map_err(|e| SourceError::from_pg(&self.what, e))?;
        let row = &mut self.row;
        self.lines.feed(&chunk, |line| {
            row.parse(line);
            each(row);
        });
        Ok(true)
    }

    /// Reads every remaining row.
    pub async fn read_all(mut self, mut each: impl FnMut(&CopyRow)) -> Result<(), SourceError> {
        while self.read(&mut each).await? {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_rows_across_chunks() {
        let mut s = LineSplitter::default();
        let mut lines = Vec::new();
        s.feed(b"1\ta\n2\tb", |l| lines.push(l.to_vec()));
        s.feed(b"b\n3\t\\N\n", |l| lines.push(l.to_vec()));
        assert_eq!(
            lines,
            vec![b"1\ta".to_vec(), b"2\tbb".to_vec(), b"3\t\\N".to_vec()]
        );
        let mut r = CopyRow::default();
        r.parse(&lines[2]);
        assert_eq!(r.field(0), Some(&b"3"[..]));
        assert_eq!(r.field(1), None);
        r.parse(b"x\\ty\tz");
        assert_eq!(r.field(0), Some(&b"x\ty"[..]));
        assert_eq!(r.field(1), Some(&b"z"[..]));
        assert_eq!(r.texts(2), vec!["x\ty".to_string(), "z".to_string()]);
    }
}
