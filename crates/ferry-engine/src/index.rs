//! The configured indexes as a running pipeline knows them, and the
//! concrete indexes a write goes to.
//!
//! A configured index (an alias) is written through one or two concrete
//! indexes: its [`Target::Primary`], the concrete index of the current
//! mapping, and during a rebuild its [`Target::Shadow`], the older concrete
//! index the alias still serves until the rebuilt one is seeded. The sink
//! addresses concrete indexes by position in a flat name list
//! (`DocWrite::index`); [`Target::names`], [`Target::slot`] and
//! [`Target::of`] are the only code that knows that list's layout.

use ferry_core::plan::Node;
use ferry_core::TableShape;
use ferry_opensearch::Sink;

/// One sink of the run (`[sink]` or a `[sink.NAME]`): its connection and
/// where documents it refuses are recorded.
#[derive(Clone)]
pub struct RunSink {
    /// The cluster or log.
    pub sink: Sink,
    /// `dead_letter_index` of its configuration.
    pub dead_letter_index: String,
}

/// An index's id for the run: its position in the configuration, which
/// stats, poison policies and writes are keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IndexId(pub usize);

/// One configured index, resolved against the database and the cluster.
#[derive(Debug, Clone)]
pub struct IndexRuntime {
    /// Position in the run's configuration (the [`IndexId`]'s value); with
    /// named sinks, that is the fanned-out one (`Config::fan_out`), one
    /// entry per index and sink.
    pub pos: usize,
    /// Position of the sink it goes to in the run's sinks.
    pub sink: usize,
    /// The alias users query.
    pub alias: String,
    /// The concrete index written to (its primary target).
    pub concrete: String,
    /// The root table's shape.
    pub shape: TableShape,
    /// How documents are built (root, relations, filters).
    pub plan: Node,
    /// Documents come straight from the replicated root row (no relations,
    /// filter, soft delete, renames or computed fields); otherwise they are
    /// built by query.
    pub fast: bool,
    /// The concrete index the alias serves while this one is rebuilt (its
    /// shadow target): it receives every write too, until the alias moves.
    pub shadow: Option<String>,
    /// Paused through the control API: the worker routes none of its
    /// changes (it is rebuilt on resume).
    pub paused: bool,
}

impl IndexRuntime {
    /// This index's id.
    pub fn id(&self) -> IndexId {
        IndexId(self.pos)
    }
}

/// Which concrete index of a configured index a write goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The concrete index of the current mapping.
    Primary,
    /// The older concrete index the alias still serves while the primary
    /// is rebuilt.
    Shadow,
}

impl Target {
    /// The sink's concrete-index name list for `indexes`: every primary,
    /// then every shadow (`""` where there is none).
    pub fn names(indexes: &[IndexRuntime]) -> Vec<String> {
        let mut names: Vec<String> = indexes.iter().map(|i| i.concrete.clone()).collect();
        names.extend(indexes.iter().map(|i| i.shadow.clone().unwrap_or_default()));
        names
    }

    /// Where index `id`'s target sits in the name list of `count` indexes.
    pub fn slot(self, id: IndexId, count: usize) -> usize {
        match self {
            Target::Primary => id.0,
            Target::Shadow => count + id.0,
        }
    }

    /// The index and target at `slot` of the name list of `count` indexes.
    pub fn of(slot: usize, count: usize) -> (IndexId, Target) {
        if slot < count {
            (IndexId(slot), Target::Primary)
        } else {
            (IndexId(slot - count), Target::Shadow)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_slot_maps_back_to_its_index_and_target() {
        let count = 3;
        for i in 0..count {
            for t in [Target::Primary, Target::Shadow] {
                let slot = t.slot(IndexId(i), count);
                assert_eq!(Target::of(slot, count), (IndexId(i), t));
            }
        }
        assert_eq!(Target::Shadow.slot(IndexId(0), count), 3);
    }
}
