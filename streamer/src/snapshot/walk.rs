//! The walk: one thread visits the tree in name order, takes files unchanged since
//! the previous point (same size, mtime, ctime and inode, still stored) as they
//! were, hands the others to the workers, and stores a tree per directory.

use std::collections::HashMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use catalog::tree::{Entry, EntryKind, Extent, Tree};
use catalog::{Packer, RepoError, Repository, Skipped, Stats, WriteError, Writer};
use tokio::runtime::Handle;

use super::progress::Counters;
use super::read::{FileError, Grown, Seen};
use super::workers::{Job, Reading, Workers};
use crate::appends::Tails;
use crate::metadata::{entry_from, entry_from_stat, inode_flags, name_bytes, open_dir, stat_at};
use crate::patterns::PathPatterns;
use crate::prefetch::Prefetch;

/// Threads reading metadata ahead of the walker.
const PREFETCH_THREADS: usize = 4;

/// What to back up, as which source, and with how many readers.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    pub source: String,
    pub path: PathBuf,
    pub host: String,
    /// Threads reading files; at least one. More than the cores pays on a cold disk,
    /// which answers several reads at once.
    pub workers: usize,
    /// Paths left out, and not descended into.
    pub excludes: Arc<PathPatterns>,
    /// Append-only files (logs): when one grew, only its new bytes are read. Nothing
    /// else is assumed to only grow.
    pub appends: Arc<PathPatterns>,
    /// Shared with the fragments of a stream: files they extend are stored at least
    /// up to where the fragments have them.
    pub tails: Option<Arc<Tails>>,
}

/// Why a snapshot failed: its root could not be read, or the repository could not
/// take it. A file that cannot be read is not an error: it is skipped, and listed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot back up {}: {cause}", path.display())]
    Root { path: PathBuf, cause: std::io::Error },
    #[error("{0} is not a file, directory or symlink")]
    RootKind(PathBuf),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Write(#[from] WriteError),
}

impl SnapshotError {
    /// Whether the repository's filesystem is full.
    pub fn is_no_space(&self) -> bool {
        match self {
            SnapshotError::Write(e) => e.is_no_space(),
            SnapshotError::Repo(RepoError::Store(e)) => e.is_no_space(),
            _ => false,
        }
    }
}

/// The trees of the last walk by content id, so that the next walk compares with
/// them without fetching them from the store.
#[derive(Default, Clone)]
pub struct TreeCache(pub Arc<HashMap<catalog::Id, Arc<Tree>>>);

/// What the walk stored: the root tree, the top entry, and what it found.
pub(super) struct Walked {
    pub(super) root: catalog::BlobRef,
    pub(super) top: Entry,
    pub(super) stats: Stats,
    pub(super) skipped: Vec<Skipped>,
    pub(super) changed: Vec<String>,
    pub(super) trees: TreeCache,
}

/// Walks `path` and stores, through `writer`, its trees and whatever differs from
/// `parent` (the top entry of the previous point). Blocks.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    writer: Arc<Writer>,
    handle: Handle,
    path: &Path,
    parent: Option<Entry>,
    opts: &SnapshotOptions,
    trees: TreeCache,
    counters: Arc<Counters>,
) -> Result<Walked, SnapshotError> {
    let _read_ahead = Prefetch::start(path.to_path_buf(), PREFETCH_THREADS);
    let workers = Workers::start(&writer, opts.workers, opts.tails.clone(), &counters);
    let mut walk = Walk {
        repo: writer.repo().clone(),
        writer: writer.clone(),
        handle,
        trees: writer.packer(),
        workers,
        links: HashMap::new(),
        stats: Stats::default(),
        skipped: Vec::new(),
        changed: Vec::new(),
        counters,
        root: path.to_path_buf(),
        excludes: opts.excludes.clone(),
        appends: opts.appends.clone(),
        prev: trees,
        next: HashMap::new(),
    };
    let result = walk.top(path, parent);
    let workers_done = walk.workers.finish();
    let (root, top) = result?;
    workers_done?;
    walk.trees.flush()?;
    let trees = TreeCache(Arc::new(walk.next));
    Ok(Walked { root, top, stats: walk.stats, skipped: walk.skipped, changed: walk.changed, trees })
}

struct Walk {
    repo: Repository,
    writer: Arc<Writer>,
    handle: Handle,
    trees: Packer,
    workers: Workers,
    /// (device, inode) of multiply-linked files -> their link group in this point.
    links: HashMap<(u64, u64), u64>,
    stats: Stats,
    skipped: Vec<Skipped>,
    changed: Vec<String>,
    counters: Arc<Counters>,
    /// The walked path, which excludes are relative to.
    root: PathBuf,
    excludes: Arc<PathPatterns>,
    appends: Arc<PathPatterns>,
    /// The trees of the last walk, and those of this one.
    prev: TreeCache,
    next: HashMap<catalog::Id, Arc<Tree>>,
}

enum Pending {
    Ready(Entry),
    Dir(Entry, PathBuf),
    File(Entry, PathBuf, Reading),
}

impl Walk {
    /// Backs up the root path and stores the one-entry tree that wraps it.
    fn top(&mut self, path: &Path, parent: Option<Entry>) -> Result<(catalog::BlobRef, Entry), SnapshotError> {
        let m = fs::symlink_metadata(path).map_err(|cause| SnapshotError::Root { path: path.to_path_buf(), cause })?;
        let name = path.file_name().map(name_bytes).unwrap_or(b"root").to_vec();
        let entry = entry_from(&name, path, &m).ok_or_else(|| SnapshotError::RootKind(path.to_path_buf()))?;
        let entry = match entry.kind {
            EntryKind::Dir => {
                let mut e = entry;
                self.dir(path, &mut e, parent.as_ref())?;
                e
            }
            _ => {
                let done = match self.leaf(entry, path, parent.as_ref())? {
                    Some(Pending::Ready(e)) => Some(e),
                    Some(Pending::File(e, p, reading)) => self.collect(e, &p, reading)?,
                    Some(Pending::Dir(..)) => unreachable!("directories are handled above"),
                    None => None,
                };
                done.ok_or_else(|| {
                    let why = self.skipped.last().map(|s| s.error.clone()).unwrap_or_default();
                    SnapshotError::Root { path: path.to_path_buf(), cause: std::io::Error::other(why) }
                })?
            }
        };
        let root = self.store_tree(Tree { entries: vec![entry.clone()] })?;
        Ok((root, entry))
    }

    fn store_tree(&mut self, tree: Tree) -> Result<catalog::BlobRef, SnapshotError> {
        let blob = self.trees.store_tree(&tree)?;
        self.next.insert(blob.id, Arc::new(tree));
        Ok(blob)
    }

    /// The tree of the previous point at this place: from the last walk, else fetched.
    fn previous_tree(&mut self, blob: &catalog::BlobRef) -> Option<Arc<Tree>> {
        if let Some(t) = self.prev.0.get(&blob.id) {
            return Some(t.clone());
        }
        self.handle.block_on(self.repo.read_tree(blob)).ok().map(Arc::new)
    }

    fn skip(&mut self, path: &Path, err: impl std::fmt::Display) {
        tracing::warn!("skipping {}: {err}", path.display());
        self.skipped.push(Skipped { path: path.to_string_lossy().into_owned(), error: err.to_string() });
    }

    /// Fills in `entry.subtree` for the directory at `path`.
    fn dir(&mut self, path: &Path, entry: &mut Entry, parent: Option<&Entry>) -> Result<(), SnapshotError> {
        let parent_tree =
            parent.filter(|p| p.kind == EntryKind::Dir).and_then(|p| p.subtree).and_then(|b| self.previous_tree(&b));
        let mut names: Vec<_> = fs::read_dir(path)
            .and_then(|it| it.map(|e| e.map(|e| e.file_name())).collect::<Result<Vec<_>, _>>())
            .map_err(|cause| SnapshotError::Root { path: path.to_path_buf(), cause })?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));

        let dir_fd = open_dir(path).map_err(|cause| SnapshotError::Root { path: path.to_path_buf(), cause })?;
        entry.flags = inode_flags(&dir_fd);
        let mut pending = Vec::with_capacity(names.len());
        for name in &names {
            let child = path.join(name);
            if self.excludes.matches(child.strip_prefix(&self.root).unwrap_or(&child)) {
                continue;
            }
            let st = match stat_at(&dir_fd, name) {
                Ok(st) => st,
                Err(e) => {
                    self.skip(&child, e);
                    continue;
                }
            };
            let Some(e) = entry_from_stat(name.as_bytes(), &child, &st) else {
                self.skip(&child, "unsupported file type");
                continue;
            };
            let prev = parent_tree.as_ref().and_then(|t| t.find(name.as_bytes()));
            match e.kind {
                EntryKind::Dir => pending.push(Pending::Dir(e, child)),
                _ => pending.extend(self.leaf(e, &child, prev)?),
            }
        }

        let mut entries = Vec::with_capacity(pending.len());
        // Subdirectories first, while the workers read this directory's files.
        let mut files = Vec::new();
        for p in pending {
            match p {
                Pending::Dir(mut e, child) => {
                    let prev = parent_tree.as_ref().and_then(|t| t.find(&e.name));
                    match self.dir(&child, &mut e, prev) {
                        Ok(()) => {
                            self.stats.dirs += 1;
                            entries.push(e);
                        }
                        Err(SnapshotError::Root { path, cause }) => self.skip(&path, cause),
                        Err(other) => return Err(other),
                    }
                }
                other => files.push(other),
            }
        }
        for p in files {
            match p {
                Pending::Ready(e) => entries.push(e),
                Pending::File(e, child, reading) => entries.extend(self.collect(e, &child, reading)?),
                Pending::Dir(..) => unreachable!("directories were handled above"),
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        entry.subtree = Some(self.store_tree(Tree { entries })?);
        Ok(())
    }

    /// Everything but directories: files are queued for a worker unless unchanged.
    /// `None` if the entry could not be read (it is reported as skipped).
    fn leaf(&mut self, mut e: Entry, path: &Path, prev: Option<&Entry>) -> Result<Option<Pending>, SnapshotError> {
        match e.kind {
            EntryKind::File => {
                if e.nlink > 1 {
                    let next = self.links.len() as u64 + 1;
                    e.link_group = *self.links.entry((e.device, e.inode)).or_insert(next);
                }
                // Only what is still stored may be used again: a lost pack's chunks
                // are read and stored anew.
                let prev = prev.filter(|p| self.all_stored(&p.content));
                if let Some(prev) = prev.filter(|p| unchanged(p, &e)) {
                    e.content = prev.content.clone();
                    // Changing them changes the ctime: the same ctime, the same flags.
                    e.flags = prev.flags;
                    self.stats.files += 1;
                    self.stats.bytes += e.size;
                    self.counters.files.fetch_add(1, Ordering::Relaxed);
                    self.counters.bytes.fetch_add(e.size, Ordering::Relaxed);
                    return Ok(Some(Pending::Ready(e)));
                }
                let append = self.appends.matches(path.strip_prefix(&self.root).unwrap_or(path));
                let job = Job {
                    path: path.to_path_buf(),
                    ident: (e.device, e.inode),
                    seen: Seen::of(&e),
                    append,
                    grown: prev.filter(|_| append).and_then(|p| Grown::of(p, &e)),
                };
                let Some(reading) = self.workers.read(job) else {
                    // Every worker stopped: one of them hit a repository error.
                    return Err(self.writer.stopped().into());
                };
                Ok(Some(Pending::File(e, path.to_path_buf(), reading)))
            }
            EntryKind::Symlink => {
                match fs::read_link(path) {
                    Ok(t) => e.target = t.as_os_str().as_bytes().to_vec(),
                    Err(err) => {
                        self.skip(path, err);
                        return Ok(None);
                    }
                }
                self.stats.others += 1;
                Ok(Some(Pending::Ready(e)))
            }
            _ => {
                self.stats.others += 1;
                Ok(Some(Pending::Ready(e)))
            }
        }
    }

    /// Whether every chunk of these extents is in a pack that exists.
    fn all_stored(&self, content: &[Extent]) -> bool {
        content.iter().all(|x| match x {
            Extent::Data(b) => self.writer.exists(b),
            Extent::Hole(_) => true,
        })
    }

    /// Waits for a worker's result; `None` if the file could not be read.
    fn collect(&mut self, mut e: Entry, path: &Path, reading: Reading) -> Result<Option<Entry>, SnapshotError> {
        match reading.wait() {
            Some(Ok(read)) => {
                if read.changed {
                    tracing::warn!("{} kept changing while read: stored as read", path.display());
                    self.changed.push(path.to_string_lossy().into_owned());
                }
                (e.mtime, e.ctime) = (read.seen.mtime, read.seen.ctime);
                e.flags = read.flags;
                e.size = read.extents.iter().map(Extent::len).sum();
                e.content = read.extents;
                self.stats.files += 1;
                self.stats.bytes += e.size;
                self.stats.bytes_read += e.size;
                Ok(Some(e))
            }
            Some(Err(FileError::Io(err))) => {
                self.skip(path, err);
                Ok(None)
            }
            Some(Err(FileError::Write(err))) => Err(err.into()),
            None => Err(self.writer.stopped().into()),
        }
    }
}

fn unchanged(prev: &Entry, now: &Entry) -> bool {
    prev.kind == EntryKind::File
        && prev.size == now.size
        && prev.mtime == now.mtime
        && prev.ctime == now.ctime
        && prev.inode == now.inode
}
