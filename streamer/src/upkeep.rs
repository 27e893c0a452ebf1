//! Forget and prune from a stream (`--prune-every`), so that a host needs no cron
//! job: every so often, the stream's own source is forgotten by its policy, and the
//! repository pruned. What happened goes into the stream's metrics and state file
//! (`ebb status`); a failure is logged and tried again next time, and never stops
//! the stream.

use std::sync::Arc;
use std::time::Duration;

use catalog::{PruneError, PruneOptions, RepoError, Repository, Timing};
use jiff::Timestamp;

use crate::metrics::Metrics;
use crate::state::PruneStatus;

/// Runs forget (of `source`) and prune every `every`, the first time `every` after
/// it starts, until dropped.
pub async fn prune_every(repo: Repository, source: String, host: String, every: Duration, metrics: Arc<Metrics>) {
    loop {
        tokio::time::sleep(every).await;
        let status = match once(&repo, &source, &host).await {
            Ok(summary) => {
                tracing::info!("{summary}");
                PruneStatus { at: Timestamp::now(), summary, error: None }
            }
            Err(e) => {
                tracing::warn!("forget and prune failed (tried again in {} s): {e}", every.as_secs());
                PruneStatus { at: Timestamp::now(), summary: String::new(), error: Some(e.to_string()) }
            }
        };
        *metrics.last_prune.lock().expect("last prune lock") = Some(status);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpkeepError {
    #[error("forget: {0}")]
    Forget(#[from] RepoError),
    #[error("prune: {0}")]
    Prune(#[from] PruneError),
}

/// One forget and prune; what they did, in a line.
pub async fn once(repo: &Repository, source: &str, host: &str) -> Result<String, UpkeepError> {
    let verdicts = catalog::judge(repo, Some(source)).await?;
    let forgotten = catalog::forget(repo, &verdicts, host).await?;
    let opts = PruneOptions {
        dry_run: false,
        timing: Timing::from_env(),
        wal_positions: Some(crate::pg::info::wal_positions),
        max_unused: catalog::MaxUnused::default(),
        max_memory: catalog::PRUNE_MAX_MEMORY,
    };
    let r = catalog::prune(repo, opts, &|_| {}).await?;
    Ok(format!(
        "forgot {} points of {source}; pruned: {} packs deleted, {} condemned, {} fragments folded, {} WAL pieces \
         deleted, {} segments merged, {} packs repacked",
        forgotten.points,
        r.deleted_packs,
        r.condemned_packs,
        r.folded_fragments,
        r.deleted_wal_pieces,
        r.merged_segments,
        r.repack.packs
    ))
}
