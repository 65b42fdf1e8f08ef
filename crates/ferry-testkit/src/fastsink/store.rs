//! FastSink's state: concrete indexes with their documents (versions,
//! tombstones), aliases, name resolution, counters and subscribers.

use super::*;

/// One stored document, or the tombstone of a deleted one.
pub(super) struct Doc {
    pub(super) version: u64,
    pub(super) seq_no: u64,
    /// `None` for a tombstone.
    pub(super) source: Option<Box<[u8]>>,
    /// When the write that produced this state arrived.
    pub(super) at: Instant,
}

/// One concrete index.
pub(super) struct Index {
    pub(super) name: Arc<str>,
    pub(super) docs: HashMap<String, Doc>,
    /// Documents with a source (tombstones excluded).
    pub(super) live: usize,
    pub(super) next_seq_no: u64,
    /// The `mappings` object (`properties`, `_meta`, …).
    pub(super) mappings: Map<String, Value>,
    pub(super) settings: Value,
}

impl Index {
    pub(super) fn new(name: &str, mappings: Map<String, Value>, settings: Value) -> Index {
        Index {
            name: Arc::from(name),
            docs: HashMap::new(),
            live: 0,
            next_seq_no: 0,
            mappings,
            settings,
        }
    }
}

#[derive(Default)]
pub(super) struct State {
    pub(super) indices: BTreeMap<String, Index>,
    /// Alias → its concrete indexes.
    pub(super) aliases: BTreeMap<String, BTreeSet<String>>,
    /// Counter for generated document ids.
    pub(super) auto_ids: u64,
}

impl State {
    /// Concrete indexes a read (count, get, refresh, …) of `expr` touches.
    /// Unknown names contribute nothing.
    pub(super) fn read_targets(&self, expr: &str) -> Vec<String> {
        self.resolve(expr).unwrap_or_default()
    }

    /// Concrete indexes named by a comma-separated list of names, aliases and
    /// `*` patterns; `Err(name)` for the first name matching nothing.
    pub(super) fn resolve(&self, expr: &str) -> std::result::Result<Vec<String>, String> {
        let mut out = BTreeSet::new();
        for part in expr.split(',').filter(|p| !p.is_empty()) {
            if part == "_all" {
                out.extend(self.indices.keys().cloned());
            } else if part.contains('*') {
                out.extend(
                    self.indices
                        .keys()
                        .filter(|n| glob(part, n))
                        .cloned()
                        .chain(
                            self.aliases
                                .iter()
                                .filter(|(a, _)| glob(part, a))
                                .flat_map(|(_, t)| t.iter().cloned()),
                        ),
                );
            } else if self.indices.contains_key(part) {
                out.insert(part.to_owned());
            } else if let Some(targets) = self.aliases.get(part) {
                out.extend(targets.iter().cloned());
            } else {
                return Err(part.to_owned());
            }
        }
        Ok(out.into_iter().collect())
    }

    pub(super) fn aliases_of(&self, index: &str) -> Vec<&str> {
        self.aliases
            .iter()
            .filter(|(_, t)| t.contains(index))
            .map(|(a, _)| a.as_str())
            .collect()
    }

    /// The concrete index a write to `name` lands in, creating it when
    /// nothing has that name (OpenSearch's automatic index creation).
    pub(super) fn write_target(
        &mut self,
        name: &str,
        create: bool,
    ) -> std::result::Result<Arc<str>, Fail> {
        if let Some(ix) = self.indices.get(name) {
            return Ok(Arc::clone(&ix.name));
        }
        if let Some(targets) = self.aliases.get(name) {
            let mut it = targets.iter();
            return match (it.next(), it.next()) {
                (Some(only), None) => self
                    .indices
                    .get(only)
                    .map(|ix| Arc::clone(&ix.name))
                    .ok_or_else(|| Fail::index_not_found(name)),
                _ => Err(Fail::new(
                    400,
                    "illegal_argument_exception",
                    format!(
                        "no write index is defined for alias [{name}]. The write request \
                         cannot be executed because the alias points to multiple indices"
                    ),
                )),
            };
        }
        if !create {
            return Err(Fail::index_not_found(name));
        }
        if let Some(why) = invalid_index_name(name) {
            return Err(Fail::new(
                400,
                "invalid_index_name_exception",
                format!("Invalid index name [{name}], {why}"),
            ));
        }
        let ix = Index::new(name, Map::new(), json!({}));
        let arc = Arc::clone(&ix.name);
        self.indices.insert(name.to_owned(), ix);
        Ok(arc)
    }
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) requests: AtomicU64,
    pub(super) bulk_requests: AtomicU64,
    pub(super) bulk_items: AtomicU64,
    pub(super) bulk_conflicts: AtomicU64,
    pub(super) bulk_errors: AtomicU64,
    pub(super) bytes_received: AtomicU64,
}

impl Counters {
    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self) -> FastSinkStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FastSinkStats {
            requests: get(&self.requests),
            bulk_requests: get(&self.bulk_requests),
            bulk_items: get(&self.bulk_items),
            bulk_conflicts: get(&self.bulk_conflicts),
            bulk_errors: get(&self.bulk_errors),
            bytes_received: get(&self.bytes_received),
        }
    }
}

#[derive(Default)]
pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    /// Signalled after every change of `state`.
    pub(super) changed: Condvar,
    pub(super) counters: Counters,
    pub(super) subscribers: Mutex<Vec<mpsc::Sender<BulkArrival>>>,
    pub(super) has_subscribers: AtomicBool,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub(super) fn publish(&self, arrival: BulkArrival) {
        let mut subs = lock(&self.subscribers);
        subs.retain(|tx| tx.send(arrival.clone()).is_ok());
        if subs.is_empty() {
            self.has_subscribers.store(false, Ordering::Release);
        }
    }
}

/// Locks a mutex, carrying on when a panicking holder poisoned it.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An OpenSearch-style failure: status, error type and reason.
#[derive(Debug, Clone)]
pub(super) struct Fail {
    pub(super) status: u16,
    pub(super) kind: &'static str,
    pub(super) reason: String,
}

impl Fail {
    pub(super) fn new(status: u16, kind: &'static str, reason: impl Into<String>) -> Fail {
        Fail {
            status,
            kind,
            reason: reason.into(),
        }
    }

    pub(super) fn index_not_found(name: &str) -> Fail {
        Fail::new(
            404,
            "index_not_found_exception",
            format!("no such index [{name}]"),
        )
    }
}

/// OpenSearch's index-name rules; the reason when `name` breaks one.
pub(super) fn invalid_index_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("must not be empty");
    }
    if name.len() > 255 {
        return Some("index name is too long, (> 255)");
    }
    if name.starts_with(['_', '-', '+']) {
        return Some("must not start with '_', '-', or '+'");
    }
    if name == "." || name == ".." {
        return Some("must not be '.' or '..'");
    }
    if name.chars().any(|c| c.is_uppercase()) {
        return Some("must be lowercase");
    }
    if name.chars().any(|c| {
        matches!(
            c,
            '\\' | '/' | '*' | '?' | '"' | '<' | '>' | '|' | ' ' | ',' | '#' | ':'
        )
    }) {
        return Some(
            "must not contain the following characters [ , \", *, \\, <, |, ,, >, /, ?, #, :]",
        );
    }
    None
}

/// Matches `text` against a pattern where `*` stands for any run of characters.
pub(super) fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let mut rest = text;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(p) => rest = &rest[p + part.len()..],
                None => return false,
            }
        }
    }
    rest.is_empty()
}
