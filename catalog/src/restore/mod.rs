//! Restore: writes a point's tree (or one path of it) to the local filesystem with its
//! metadata: holes stay holes, hard links stay links, and ownership, modes, times and
//! extended attributes are applied after content (directories after their children).
//! Inode flags (`chattr`) come last of all, once nothing more is written: an
//! immutable file could not be linked to, an immutable directory not filled.
//! A file whose data cannot be read is reported and removed, never left with wrong
//! bytes; the rest of the restore goes on.
//!
//! The work runs in two stages joined by a bounded queue: `walk` goes through the
//! tree on one thread (trees fetched ahead, siblings' with one ranged GET: `trees`)
//! and `fetch` restores files in batches,
//! chunks in pack order, neighbours with one ranged GET, many at once, decrypted
//! and written on the blocking pool (`write`). Memory stays within a budget
//! (`RestoreOptions::memory`) whatever the tree's size: half of it for data in
//! flight, an eighth for the chunk cache, a sixteenth for trees fetched lately, and
//! the rest for the trees being walked and bookkeeping,
//! which grow with the width of directories, not with the number of files.
//!
//! Files are written under temporary names and renamed into place once complete,
//! so an interrupted restore leaves no file with wrong bytes. Restoring over an
//! existing tree (`overwrite`) keeps the files that already have the point's
//! size, time and content (checked against the chunks' content ids), rewrites the
//! others and removes what the point does not have; run again after an
//! interruption, it fetches only what is missing.

mod ctx;
mod error;
mod fetch;
mod meta;
mod options;
mod report;
mod target;
mod trees;
mod walk;
mod write;

pub use error::RestoreError;
pub use options::{RestoreOptions, DEFAULT_MEMORY};
pub use report::{Progress, RestoreReport};

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::runtime::Handle;

use crate::point::Manifest;
use crate::repo::Repository;
use crate::tree::EntryKind;
use ctx::Ctx;

/// Files handed from the walk to the fetch stage and not yet taken.
const QUEUED_FILES: usize = 1024;
/// The part of the memory budget for trees fetched lately: one in this many bytes.
const TREES_KEPT: usize = 16;

pub async fn restore(
    repo: &Repository,
    manifest: &Manifest,
    opts: RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    let root_ref = manifest.root_ref().ok_or_else(|| RestoreError::BadRoot("unreadable reference".into()))?;
    let root = repo.read_tree(&root_ref).await?;
    let [top] = root.entries.as_slice() else {
        return Err(RestoreError::BadRoot(format!("{} entries instead of one", root.entries.len())));
    };
    let mut top = top.clone();
    if let Some(path) = &opts.path {
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".") {
            let missing = || RestoreError::NoSuchPath { path: String::from_utf8_lossy(path).into_owned() };
            if top.kind != EntryKind::Dir || comp == b".." {
                return Err(missing());
            }
            let subtree = top.subtree.as_ref().ok_or_else(missing)?;
            top = repo.read_tree(subtree).await?.find(comp).cloned().ok_or_else(missing)?;
        }
    } else {
        let p = &opts.progress;
        p.total_files.store(manifest.stats.files, Ordering::Relaxed);
        p.total_bytes.store(manifest.stats.bytes, Ordering::Relaxed);
    }
    target::prepare(&opts.target, opts.overwrite)?;
    // Restoring a whole point, the target is made 0700 until the end (`walk`), so
    // new files take our group; one path lands in the target as it is.
    let plain_target =
        opts.path.is_none() || std::fs::metadata(&opts.target).is_ok_and(|m| m.permissions().mode() & 0o2000 == 0);
    let me = (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw());
    let ctx = Ctx::new(repo.clone(), &opts, plain_target.then_some(me));
    let ctx = Arc::new(ctx);
    let (files_tx, files_rx) = tokio::sync::mpsc::channel(QUEUED_FILES);
    let fetching = tokio::spawn(fetch::run(ctx.clone(), files_rx));
    let trees = Arc::new(trees::Trees::new(repo.clone(), Handle::current(), opts.memory / TREES_KEPT));
    let walker = walk::Walker { ctx: ctx.clone(), handle: Handle::current(), trees, files: files_tx };
    let whole = opts.path.is_none();
    let target = opts.target.clone();
    let walked =
        tokio::task::spawn_blocking(move || walker.run(top, whole, &target)).await.expect("restore walk panicked");
    fetching.await.expect("restore fetch stage panicked");
    if let Err(e) = walked {
        ctx.stop(e);
    }
    let ctx = Arc::into_inner(ctx).expect("every stage of the restore is done");
    ctx.finish()
}
