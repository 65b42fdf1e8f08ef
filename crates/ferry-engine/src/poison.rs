//! The poison policy: what happens to documents the cluster refuses for good.

use std::sync::atomic::Ordering::Relaxed;

use ferry_config::PoisonPolicy;
use ferry_core::stats::Stats;
use ferry_opensearch::{DeadLetter, Rejected, Sink, SinkError};

use crate::EngineError;

/// Applies each index's policy to `rejected` (index position → (alias,
/// policy) in `indexes`): `stop` fails with the first document, `skip` logs
/// and counts, `dead_letter` stores them durably before returning.
pub async fn apply(
    sink: &Sink,
    dead_letter_index: &str,
    stats: &Stats,
    indexes: &[(String, PoisonPolicy)],
    rejected: Vec<Rejected>,
) -> Result<(), EngineError> {
    let letters: Vec<DeadLetter> = triage(stats, indexes, rejected)?
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    if !letters.is_empty() {
        sink.store_dead_letters(dead_letter_index, &letters).await?;
    }
    Ok(())
}

/// The policy without the storing: `stop` fails with the first document,
/// `skip` logs and counts, `dead_letter` returns the letters the caller
/// must store durably before it confirms anything, each with its index's
/// position.
pub fn triage(
    stats: &Stats,
    indexes: &[(String, PoisonPolicy)],
    rejected: Vec<Rejected>,
) -> Result<Vec<(usize, DeadLetter)>, EngineError> {
    let mut letters = Vec::new();
    for r in rejected {
        let Some((alias, policy)) = indexes.get(r.write.index) else {
            // Confirming past it would lose the write silently.
            return Err(EngineError::Stream(format!(
                "the cluster rejected document {:?} of unknown index position {}: {}",
                r.write.id, r.write.index, r.reason
            )));
        };
        if let Some(st) = stats.index(r.write.index) {
            st.docs_rejected.fetch_add(1, Relaxed);
            st.set_error(&format!(
                "document {:?} rejected with {}: {}",
                r.write.id, r.status, r.reason
            ));
        }
        match policy {
            PoisonPolicy::Stop => {
                return Err(SinkError::Poison {
                    index: alias.clone(),
                    id: r.write.id,
                    status: r.status,
                    reason: r.reason,
                }
                .into())
            }
            PoisonPolicy::Skip => {
                tracing::warn!(index = %alias, id = %r.write.id, status = r.status, reason = %r.reason,
                    "document rejected by the cluster; skipped (on_poison = \"skip\")");
            }
            PoisonPolicy::DeadLetter => {
                tracing::warn!(index = %alias, id = %r.write.id, status = r.status, reason = %r.reason,
                    "document rejected by the cluster; stored as a dead letter (see `ferry dead-letters list`)");
                if let Some(st) = stats.index(r.write.index) {
                    st.dead_letters.fetch_add(1, Relaxed);
                }
                letters.push((
                    r.write.index,
                    DeadLetter {
                        index: alias.clone(),
                        id: r.write.id,
                        status: r.status,
                        reason: r.reason,
                        lsn: r.write.version,
                    },
                ));
            }
        }
    }
    Ok(letters)
}
