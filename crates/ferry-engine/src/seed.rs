//! Seeding indexes while the stream runs.
//!
//! Streaming starts at once for every index; an index that is new, was
//! interrupted, or gets a new mapping is copied in the background under a
//! snapshot whose consistent point is the copy's version. While it seeds:
//!
//! * the stream writes its changes to the new index too, with higher
//!   versions than the copy, so a late copy never overwrites a live change;
//! * `index.gc_deletes` is raised, so a row deleted by the stream is not
//!   resurrected by a copy that reaches it more than a minute later (the
//!   default tombstone lifetime is 60 s), and refreshes are paused;
//! * an older index the alias still serves keeps receiving every write, so
//!   searches stay current until the alias moves atomically to the new one.

use std::sync::Arc;

use ferry_config::Config;
use ferry_core::stats::{IndexState, Stats};
use ferry_core::Lsn;
use ferry_opensearch::{IndexPlan, Sink};
use ferry_postgres::Session;
use serde_json::json;
use tokio::sync::mpsc;

use crate::index::{IndexId, IndexRuntime};
use crate::{backfill, EngineError, Shutdown};

/// One index to seed.
#[derive(Debug, Clone)]
pub struct Job {
    /// The index.
    pub index: IndexId,
    /// Its mapping and settings.
    pub plan: IndexPlan,
    /// The concrete index the alias serves now, replaced when seeding ends.
    pub previous: Option<String>,
    /// Resume after this key (an interrupted backfill's checkpoint).
    pub resume_after: Option<Vec<String>>,
}

/// The indexes to seed and the snapshot to read.
pub struct Seeding {
    /// A session inside the snapshot transaction.
    pub client: Session,
    /// The snapshot's consistent point: the copy's version.
    pub version: Lsn,
    /// What to seed.
    pub jobs: Vec<Job>,
}

/// Seeds every job in turn; after each, tells the worker (through
/// `swapped`) that the alias moved so it stops writing to the old index.
pub async fn run(
    seeding: Seeding,
    sink: Sink,
    indexes: Vec<IndexRuntime>,
    cfg: Config,
    shutdown: Shutdown,
    stats: Arc<Stats>,
    swapped: mpsc::Sender<(usize, String)>,
) -> Result<(), EngineError> {
    let names: Vec<String> = indexes.iter().map(|i| i.concrete.clone()).collect();
    for job in &seeding.jobs {
        let ix = &indexes[job.index.0];
        sink.update_settings(
            &ix.concrete,
            json!({"gc_deletes": "12h", "refresh_interval": "-1"}),
        )
        .await?;
        let index_stats = stats.index(job.index.0);
        let ctx = backfill::Ctx {
            cfg: &cfg,
            shutdown: &shutdown,
            stats: index_stats.as_deref(),
            all_stats: stats.clone(),
            checkpoint: Some(&job.plan),
            resume_after: job.resume_after.clone(),
        };
        backfill::run(&seeding.client, &sink, ix, &names, seeding.version, &ctx).await?;
        if *shutdown.borrow() {
            return Ok(());
        }
        sink.mark_seeded(&job.plan, &ix.concrete, seeding.version)
            .await?;
        sink.update_settings(
            &ix.concrete,
            json!({"gc_deletes": null, "refresh_interval": null}),
        )
        .await?;
        let _ = sink.refresh(&ix.concrete).await;
        if let Some(prev) = &job.previous {
            sink.swap_alias(&ix.alias, &ix.concrete, Some(prev)).await?;
            tracing::info!(alias = %ix.alias, from = %prev, to = %ix.concrete, "moved the alias to the rebuilt index");
            let _ = swapped.send((job.index.0, prev.clone())).await;
        }
        if let Some(st) = &index_stats {
            st.set_state(IndexState::Streaming);
        }
    }
    seeding.client.end_snapshot().await;
    Ok(())
}
