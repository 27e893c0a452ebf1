//! A snapshot of a directory tree as one recovery point (`ebb backup`).
//!
//! One thread walks the tree in name order and writes the trees (`walk`); a small
//! pool of workers reads, chunks, compresses and encrypts file contents (`workers`).
//! A file whose size, mtime, ctime and inode match the previous point of the source
//! is not read again: its extents are reused, so an unchanged tree costs a walk and a
//! few tree lookups.
//!
//! A file that changes while it is read is read again (up to `READ_ATTEMPTS` times);
//! one that never holds still is stored as read and listed in the manifest's
//! `changed`, never passed off as a consistent state. A file that only grew while
//! read is stored as it was when the walk saw it: the bytes up to that size (`read`).
//!
//! This module is the public face: one point (`snapshot`), or one walk for a stream
//! to commit (`capture`).

mod progress;
mod read;
mod walk;
mod workers;

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use catalog::tree::Entry;
use catalog::{Manifest, PointRef, RepoError, Repository, Skipped, Stats, Writer, WriterSummary};
use jiff::Timestamp;
use tokio::runtime::Handle;

pub use progress::Counters;
pub use walk::{SnapshotError, SnapshotOptions, TreeCache};

/// Backs up `opts.path` as a new point of `opts.source` and returns it.
pub async fn snapshot(
    repo: &Repository,
    opts: &SnapshotOptions,
    counters: Arc<Counters>,
) -> Result<(PointRef, Manifest), SnapshotError> {
    let parent = previous_top(repo, &opts.source, Timestamp::now()).await;
    let writer = Writer::new(repo.clone()).await?;
    // What an interrupted or failed backup made durable is taken, not stored again.
    let adopted = writer.adopt_orphans().await?;
    if adopted > 0 {
        tracing::info!("adopted {adopted} packs left unindexed by an earlier run");
    }
    let captured = match capture(&writer, opts, parent, TreeCache::default(), counters).await {
        Ok(c) => c,
        Err(e) => {
            // Stop the uploader; what it already stored is unreferenced, and the
            // next writer adopts it.
            let _ = writer.finish().await;
            return Err(e);
        }
    };
    let durable = writer.finish().await?;
    let manifest = captured.manifest(opts, durable.summary.clone());
    let point = durable.commit(&manifest, captured.started).await?;
    Ok((point, manifest))
}

/// What one walk of the tree stored: everything a point needs but the manifest.
pub struct Capture {
    /// When the walk began: the point's time.
    pub started: Timestamp,
    pub path: PathBuf,
    pub root: catalog::BlobRef,
    /// The top entry, to compare the next walk with.
    pub top: Entry,
    pub stats: Stats,
    pub skipped: Vec<Skipped>,
    pub changed: Vec<String>,
    /// The trees of this walk, for the next one.
    pub trees: TreeCache,
    pub elapsed: std::time::Duration,
}

impl Capture {
    /// The manifest of a point made of this capture, once `summary`'s blobs are durable.
    pub fn manifest(&self, opts: &SnapshotOptions, summary: WriterSummary) -> Manifest {
        let mut stats = self.stats.clone();
        stats.new_blobs = summary.new_blobs;
        stats.new_data_blobs = summary.new_data_blobs;
        stats.new_bytes = summary.new_bytes;
        stats.duration_ms = self.elapsed.as_millis() as u64;
        let path = self.path.to_string_lossy().into_owned();
        let mut manifest = Manifest::new(&opts.source, self.started, opts.host.clone(), "dir", path, self.root);
        manifest.stats = stats;
        manifest.skipped = self.skipped.clone();
        manifest.changed = self.changed.clone();
        manifest.index = summary.index;
        manifest
    }
}

/// Walks `opts.path` and stores, through `writer`, what differs from `parent` (the
/// top entry of the previous point). Nothing is durable until the writer's next
/// checkpoint or finish.
pub async fn capture(
    writer: &Arc<Writer>,
    opts: &SnapshotOptions,
    parent: Option<Entry>,
    trees: TreeCache,
    counters: Arc<Counters>,
) -> Result<Capture, SnapshotError> {
    let started = Timestamp::now();
    let clock = Instant::now();
    let path = fs::canonicalize(&opts.path).map_err(|cause| SnapshotError::Root { path: opts.path.clone(), cause })?;
    let writer = writer.clone();
    let walk_path = path.clone();
    let handle = Handle::current();
    let walk_opts = opts.clone();
    let walked =
        tokio::task::spawn_blocking(move || walk::run(writer, handle, &walk_path, parent, &walk_opts, trees, counters))
            .await
            .expect("snapshot walker panicked")?;
    Ok(Capture {
        started,
        path,
        root: walked.root,
        top: walked.top,
        stats: walked.stats,
        skipped: walked.skipped,
        changed: walked.changed,
        trees: walked.trees,
        elapsed: clock.elapsed(),
    })
}

/// The backed-up entry of the source's newest point, to skip unchanged files.
pub async fn previous_top(repo: &Repository, source: &str, t: Timestamp) -> Option<Entry> {
    let load = async {
        let Some(point) = repo.point_at(source, t).await? else { return Ok(None) };
        let m = repo.manifest(&point).await?;
        let root = repo.read_tree(&m.root_ref().expect("checked when opened")).await?;
        Ok::<_, RepoError>(root.entries.into_iter().next())
    };
    match load.await {
        Ok(top) => top,
        Err(e) => {
            tracing::warn!("cannot read the previous point, so every file is read again: {e}");
            None
        }
    }
}
