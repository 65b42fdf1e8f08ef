//! Parsing `COPY … TO STDOUT` text rows into fields without per-field allocation.

use ferry_core::copytext;

/// One parsed row: unescaped field bytes in one buffer plus their ranges.
#[derive(Debug, Default)]
pub struct RowBuf {
    scratch: Vec<u8>,
    ranges: Vec<Option<(usize, usize)>>,
}

impl RowBuf {
    /// Parses one line (without its newline), replacing the previous row.
    pub fn parse(&mut self, line: &[u8]) {
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
}

/// Splits COPY output chunks into complete lines, carrying partial lines over.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Feeds a chunk and calls `each` for every complete line in it.
    pub fn feed(&mut self, chunk: &[u8], mut each: impl FnMut(&[u8])) {
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

/// Runs `sql` (a `COPY … TO STDOUT`) and calls `each` with every row, parsed.
/// `what` names the operation in errors.
pub async fn copy_rows(
    client: &tokio_postgres::Client,
    sql: &str,
    what: &str,
    mut each: impl FnMut(&RowBuf),
) -> Result<(), ferry_postgres::SourceError> {
    use futures_util::{pin_mut, StreamExt};
    let stream = client
        .copy_out(sql)
        .await
        .map_err(|e| ferry_postgres::SourceError::from_pg(what, e))?;
    pin_mut!(stream);
    let mut row = RowBuf::default();
    let mut lines = LineSplitter::default();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ferry_postgres::SourceError::from_pg(what, e))?;
        lines.feed(&chunk, |line| {
            row.parse(line);
            each(&row);
        });
    }
    Ok(())
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
        let mut r = RowBuf::default();
        r.parse(&lines[2]);
        assert_eq!(r.field(0), Some(&b"3"[..]));
        assert_eq!(r.field(1), None);
        r.parse(b"x\\ty\tz");
        assert_eq!(r.field(0), Some(&b"x\ty"[..]));
        assert_eq!(r.field(1), Some(&b"z"[..]));
    }
}
