//! A snapshot of a directory tree as one recovery point (`ebb backup`).
//!
//! One thread walks the tree in name order and writes the trees; a small pool of
//! workers reads, chunks, compresses and encrypts file contents. A file whose size,
//! mtime, ctime and inode match the previous point of the source is not read again:
//! its extents are reused, so an unchanged tree costs a walk and a few tree lookups.
//!
//! A file that changes while it is read is read again (up to `READ_ATTEMPTS` times);
//! one that never holds still is stored as read and listed in the manifest's
//! `changed`, never passed off as a consistent state. A file that only grew while
//! read is stored as it was when the walk saw it: the bytes up to that size.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use catalog::tree::{Entry, EntryKind, Extent, Timestamp as TreeTime, Tree};
use catalog::{
    BlobKind, Manifest, Packer, PointRef, RepoError, Repository, Skipped, Stats, WriteError, Writer, WriterSummary,
};
use jiff::Timestamp;
use tokio::runtime::Handle;

use crate::appends::{Tail, Tails};
use crate::exclude::Excludes;
use crate::metadata::{
    data_regions, entry_from, entry_from_stat, inode_flags, name_bytes, open_dir, open_file, stat_at,
};
use crate::prefetch::Prefetch;
use catalog::chunker::{ChunkError, Chunker};

/// Files queued for the workers beyond those being read.
const QUEUED_FILES: usize = 256;
/// Threads reading metadata ahead of the walker.
const PREFETCH_THREADS: usize = 4;
/// Reads of a file that keeps changing before it is stored as read and listed.
const READ_ATTEMPTS: usize = 3;

#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    pub source: String,
    pub path: PathBuf,
    pub host: String,
    /// Threads reading files; at least one. More than the cores pays on a cold disk,
    /// which answers several reads at once.
    pub workers: usize,
    /// Paths left out, and not descended into.
    pub excludes: Arc<Excludes>,
    /// Append-only files (logs): when one grew, only its new bytes are read. Nothing
    /// else is assumed to only grow.
    pub appends: Arc<Excludes>,
    /// Shared with the fragments of a stream: files they extend are stored at least
    /// up to where the fragments have them.
    pub tails: Option<Arc<Tails>>,
}

/// Live progress, for a progress bar.
#[derive(Debug, Default)]
pub struct Counters {
    pub files: AtomicU64,
    pub bytes: AtomicU64,
    pub bytes_read: AtomicU64,
}

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

/// The trees of the last walk by content id, so that the next walk compares with
/// them without fetching them from the store.
#[derive(Default, Clone)]
pub struct TreeCache(pub Arc<HashMap<catalog::Id, Arc<Tree>>>);

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
        tokio::task::spawn_blocking(move || run_walk(writer, handle, &walk_path, parent, &walk_opts, trees, counters))
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

enum FileError {
    /// The file could not be read: skip it and say so.
    Io(std::io::Error),
    /// The repository could not take it: the snapshot fails.
    Write(WriteError),
}

struct Job {
    path: PathBuf,
    /// Device and inode.
    ident: (u64, u64),
    /// What the walk saw: what the content read must still match.
    seen: Seen,
    /// An append-only file (`SnapshotOptions::appends`).
    append: bool,
    /// The previous point's content, if the file may only have grown since.
    grown: Option<Grown>,
    reply: SyncSender<Result<FileRead, FileError>>,
}

/// An append-only file's content in the previous point, when the file is the same
/// inode and longer: only its last chunk (cut where the file ended, not by content) and what
/// follows are read again, once that chunk is found unchanged.
struct Grown {
    /// Every extent but the last chunk.
    prefix: Vec<Extent>,
    /// Where the last chunk starts, and its content id.
    start: u64,
    last: catalog::BlobRef,
}

impl Grown {
    fn of(prev: &Entry, now: &Entry) -> Option<Grown> {
        let same = prev.kind == EntryKind::File && (prev.device, prev.inode) == (now.device, now.inode);
        if !same || now.size <= prev.size {
            return None;
        }
        let Some((Extent::Data(last), prefix)) = prev.content.split_last() else { return None };
        Some(Grown { prefix: prefix.to_vec(), start: prev.size - last.raw_len as u64, last: *last })
    }
}

/// A file's size, mtime and ctime: what tells its versions apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    size: u64,
    mtime: TreeTime,
    ctime: TreeTime,
}

impl Seen {
    fn of(e: &Entry) -> Seen {
        Seen { size: e.size, mtime: e.mtime, ctime: e.ctime }
    }

    fn of_file(f: &File) -> std::io::Result<Seen> {
        use std::os::unix::fs::MetadataExt;
        let m = f.metadata()?;
        let t = |sec: i64, nsec: i64| TreeTime { sec, nsec: nsec as u32 };
        Ok(Seen { size: m.len(), mtime: t(m.mtime(), m.mtime_nsec()), ctime: t(m.ctime(), m.ctime_nsec()) })
    }
}

/// A file's content as read, and the state it belongs to.
struct FileRead {
    extents: Vec<Extent>,
    seen: Seen,
    /// Its inode flags (`chattr`), read from the file as it was read.
    flags: u32,
    /// It kept changing while read: stored as read, and listed.
    changed: bool,
}

struct Walked {
    root: catalog::BlobRef,
    top: Entry,
    stats: Stats,
    skipped: Vec<Skipped>,
    changed: Vec<String>,
    trees: TreeCache,
}

#[allow(clippy::too_many_arguments)]
fn run_walk(
    writer: Arc<Writer>,
    handle: Handle,
    path: &Path,
    parent: Option<Entry>,
    opts: &SnapshotOptions,
    trees: TreeCache,
    counters: Arc<Counters>,
) -> Result<Walked, SnapshotError> {
    let (workers, excludes, tails) = (opts.workers.max(1), opts.excludes.clone(), opts.tails.clone());
    let appends = opts.appends.clone();
    let (tx, rx) = mpsc::sync_channel::<Job>(QUEUED_FILES);
    let rx = Arc::new(Mutex::new(rx));
    let seed = writer.repo().keys().chunker_seed;
    let _read_ahead = Prefetch::start(path.to_path_buf(), PREFETCH_THREADS);
    let pool: Vec<_> = (0..workers)
        .map(|_| {
            let rx = rx.clone();
            let mut packer = writer.packer();
            let mut chunker = Chunker::new(seed);
            let counters = counters.clone();
            let tails = tails.clone();
            std::thread::spawn(move || -> Result<(), WriteError> {
                loop {
                    let job = match rx.lock().expect("job queue lock").recv() {
                        Ok(job) => job,
                        Err(_) => break,
                    };
                    let r = read_job(&job, tails.as_deref(), &mut chunker, &mut packer, &counters);
                    let fatal = matches!(r, Err(FileError::Write(_)));
                    let _ = job.reply.send(r);
                    if fatal {
                        break;
                    }
                }
                packer.flush()
            })
        })
        .collect();
    // Only the workers hold the queue: once they have all stopped (after a
    // repository error), the walk's next send fails, and the files left in the
    // queue drop their reply channels, so the walk never waits on a file that no
    // worker will read.
    drop(rx);

    let mut walk = Walk {
        repo: writer.repo().clone(),
        writer: writer.clone(),
        handle,
        trees: writer.packer(),
        jobs: Some(tx),
        links: HashMap::new(),
        stats: Stats::default(),
        skipped: Vec::new(),
        changed: Vec::new(),
        counters,
        root: path.to_path_buf(),
        excludes,
        appends,
        prev: trees,
        next: HashMap::new(),
    };
    let result = walk.top(path, parent);
    walk.jobs = None; // lets the workers finish
    let mut worker_error = None;
    for w in pool {
        if let Err(e) = w.join().expect("file worker panicked") {
            worker_error.get_or_insert(e);
        }
    }
    let (root, top) = result?;
    if let Some(e) = worker_error {
        return Err(e.into());
    }
    walk.trees.flush()?;
    let trees = TreeCache(Arc::new(walk.next));
    Ok(Walked { root, top, stats: walk.stats, skipped: walk.skipped, changed: walk.changed, trees })
}

struct Walk {
    repo: Repository,
    writer: Arc<Writer>,
    handle: Handle,
    trees: Packer,
    jobs: Option<SyncSender<Job>>,
    /// (device, inode) of multiply-linked files -> their link group in this point.
    links: HashMap<(u64, u64), u64>,
    stats: Stats,
    skipped: Vec<Skipped>,
    changed: Vec<String>,
    counters: Arc<Counters>,
    /// The walked path, which excludes are relative to.
    root: PathBuf,
    excludes: Arc<Excludes>,
    appends: Arc<Excludes>,
    /// The trees of the last walk, and those of this one.
    prev: TreeCache,
    next: HashMap<catalog::Id, Arc<Tree>>,
}

enum Pending {
    Ready(Entry),
    Dir(Entry, PathBuf),
    File(Entry, PathBuf, Receiver<Result<FileRead, FileError>>),
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
                    Some(Pending::File(e, p, rx)) => self.collect(e, &p, rx)?,
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
        let blob = self.trees.store(BlobKind::Tree, &tree.encode())?;
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
            if self.excludes.excludes(child.strip_prefix(&self.root).unwrap_or(&child)) {
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
                Pending::File(e, child, rx) => entries.extend(self.collect(e, &child, rx)?),
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
                let append = self.appends.excludes(path.strip_prefix(&self.root).unwrap_or(path));
                let (reply, rx) = mpsc::sync_channel(1);
                let job = Job {
                    path: path.to_path_buf(),
                    ident: (e.device, e.inode),
                    seen: Seen::of(&e),
                    append,
                    grown: prev.filter(|_| append).and_then(|p| Grown::of(p, &e)),
                    reply,
                };
                let jobs = self.jobs.as_ref().expect("jobs open while walking");
                if jobs.send(job).is_err() {
                    // Every worker stopped: one of them hit a repository error.
                    return Err(self.writer.stopped().into());
                }
                Ok(Some(Pending::File(e, path.to_path_buf(), rx)))
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
            Extent::Data(b) => self.writer.exists(BlobKind::Data, b),
            Extent::Hole(_) => true,
        })
    }

    /// Waits for a worker's result; `None` if the file could not be read.
    fn collect(
        &mut self,
        mut e: Entry,
        path: &Path,
        rx: Receiver<Result<FileRead, FileError>>,
    ) -> Result<Option<Entry>, SnapshotError> {
        match rx.recv() {
            Ok(Ok(read)) => {
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
            Ok(Err(FileError::Io(err))) => {
                self.skip(path, err);
                Ok(None)
            }
            Ok(Err(FileError::Write(err))) => Err(err.into()),
            Err(_) => Err(self.writer.stopped().into()),
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

/// Reads a job's file. In a stream, the file is claimed from the fragments first, and
/// stored at least up to where they have it (see `appends`).
fn read_job(
    job: &Job,
    tails: Option<&Tails>,
    chunker: &mut Chunker,
    packer: &mut Packer,
    counters: &Counters,
) -> Result<FileRead, FileError> {
    let Some(tails) = tails.filter(|_| job.append) else {
        return read_consistent(&job.path, job.seen, job.grown.as_ref(), chunker, packer, counters);
    };
    let tail = tails.claim(job.ident);
    let mut seen = job.seen;
    // Fragments shipped since the walk looked: the point must have those bytes too.
    if let Some(t) = tail.filter(|t| t.size > seen.size) {
        if fs::symlink_metadata(&job.path).is_ok_and(|m| t.size <= m.len()) {
            seen.size = t.size;
        }
    }
    let r = read_consistent(&job.path, seen, job.grown.as_ref(), chunker, packer, counters);
    let after = match &r {
        Ok(read) if !read.changed => Tail::of(&read.extents),
        Ok(_) => None,
        Err(_) => tail,
    };
    tails.release(job.ident, after);
    r
}

/// Reads a file until what was read matches one state of it (see the module doc).
fn read_consistent(
    path: &Path,
    mut seen: Seen,
    grown: Option<&Grown>,
    chunker: &mut Chunker,
    packer: &mut Packer,
    counters: &Counters,
) -> Result<FileRead, FileError> {
    for attempt in 1..=READ_ATTEMPTS {
        let mut f = open_file(path).map_err(FileError::Io)?;
        let extents = read_content(&mut f, seen.size, grown, chunker, packer, counters)?;
        let after = Seen::of_file(&f).map_err(FileError::Io)?;
        let read: u64 = extents.iter().map(Extent::len).sum();
        // Unchanged; or it only grew, and the bytes up to the size seen are stored.
        let grew_only = after.size > seen.size && read == seen.size;
        if after == seen || grew_only {
            return Ok(FileRead { extents, seen, flags: inode_flags(&f), changed: false });
        }
        if attempt == READ_ATTEMPTS {
            return Ok(FileRead { extents, seen: after, flags: inode_flags(&f), changed: true });
        }
        seen = after;
    }
    unreachable!("the last attempt returns")
}

/// A file's first `size` bytes as extents: read from the start, or, when it only
/// grew since the previous point, from that point's last chunk on.
fn read_content(
    f: &mut File,
    size: u64,
    grown: Option<&Grown>,
    chunker: &mut Chunker,
    packer: &mut Packer,
    counters: &Counters,
) -> Result<Vec<Extent>, FileError> {
    if let Some(g) = grown.filter(|g| size >= g.start + g.last.raw_len as u64) {
        let mut last = vec![0; g.last.raw_len as usize];
        let read = f.seek(SeekFrom::Start(g.start)).and_then(|_| f.read_exact(&mut last));
        if read.is_ok() && packer.content_id(&last) == g.last.id {
            let mut extents = g.prefix.clone();
            extents.extend(read_file(f, g.start, size, chunker, packer, counters)?);
            return Ok(extents);
        }
    }
    read_file(f, 0, size, chunker, packer, counters)
}

/// Bytes `from..size` of a file as extents.
fn read_file(
    f: &mut File,
    from: u64,
    size: u64,
    chunker: &mut Chunker,
    packer: &mut Packer,
    counters: &Counters,
) -> Result<Vec<Extent>, FileError> {
    let regions = data_regions(f, from, size).map_err(FileError::Io)?;
    let mut extents = Vec::new();
    let mut pos = from;
    for (start, len) in regions {
        if start > pos {
            extents.push(Extent::Hole(start - pos));
        }
        f.seek(SeekFrom::Start(start)).map_err(FileError::Io)?;
        let read = chunker
            .run(f.take(len), |chunk| {
                counters.bytes_read.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                counters.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                extents.push(Extent::Data(packer.store(BlobKind::Data, chunk)?));
                #[cfg(test)]
                if extents.len() == 1 {
                    tests::mid_read();
                }
                Ok(())
            })
            .map_err(|e| match e {
                ChunkError::Read(e) => FileError::Io(e),
                ChunkError::Emit(e) => FileError::Write(e),
            })?;
        pos = start + read;
        if read < len {
            break; // the file shrank while being read
        }
    }
    if pos < size && from + extents.iter().map(Extent::len).sum::<u64>() == pos {
        // A trailing hole, unless the file shrank (then the data simply ended).
        let now = f.metadata().map(|m| m.len()).unwrap_or(pos);
        if now > pos {
            extents.push(Extent::Hole(now - pos));
        }
    }
    counters.files.fetch_add(1, Ordering::Relaxed);
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// The content ids of `data` as the writer would chunk it.
    fn ids(repo: &Repository, data: &[u8]) -> Vec<catalog::Id> {
        let mut out = Vec::new();
        Chunker::new(repo.keys().chunker_seed)
            .run(data, |c| -> Result<(), ()> {
                out.push(repo.keys().content_id(c));
                Ok(())
            })
            .unwrap();
        out
    }

    thread_local! {
        /// What a test does in the middle of a read, on the reading thread: after a
        /// read's first chunk, while the rest of the file is still to be read.
        static MID_READ: std::cell::RefCell<Option<Box<dyn FnMut()>>> = const { std::cell::RefCell::new(None) };
    }

    pub(super) fn mid_read() {
        MID_READ.with_borrow_mut(|hook| {
            if let Some(h) = hook {
                h()
            }
        });
    }

    /// Item 0 of issue 15: a file rewritten in place while it is read is stored
    /// either as one whole version, or marked as changed: never a silent mix. Which
    /// reads overlap a rewrite is decided here, not by timing: a hook rewrites the
    /// file after the first chunk of chosen attempts, when most of it is still to
    /// be read (it is longer than the chunker's window, so the rest comes from the
    /// new version).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_rewritten_while_read_is_never_a_silent_mix() {
        let secret = catalog::Secret::KeyFile([3; 32]);
        let repo =
            Repository::init(catalog::Store::memory(), &secret, catalog::DEFAULT_KDF, "t".into()).await.unwrap().0;
        let writer = Writer::new(repo.clone()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let versions: Vec<Vec<u8>> = (0..2u8).map(|v| (0..10 << 20).map(|i| (i % 251) as u8 ^ v).collect()).collect();
        let wanted: Vec<Vec<catalog::Id>> = versions.iter().map(|v| ids(&repo, v)).collect();
        std::fs::write(&path, &versions[0]).unwrap();

        // For each read, the attempts (1 to 3) during which the file is rewritten.
        let schedules: Vec<Vec<usize>> =
            vec![vec![], vec![1], vec![], vec![1, 2], vec![2], vec![1, 2, 3], vec![], vec![1, 2, 3], vec![3], vec![1]];
        let mut current = 0usize;
        let mut stamp = 1_000_000i64;
        for (n, schedule) in schedules.iter().enumerate() {
            let (writer, path2, versions2) = (writer.clone(), path.clone(), versions.clone());
            let schedule2 = schedule.clone();
            let (read, now) = tokio::task::spawn_blocking(move || {
                let mut attempt = 0;
                let mut version = current;
                let hook_path = path2.clone();
                let state = std::rc::Rc::new(std::cell::Cell::new(version));
                let seen_state = state.clone();
                MID_READ.with_borrow_mut(|h| {
                    *h = Some(Box::new(move || {
                        attempt += 1;
                        if schedule2.contains(&attempt) {
                            let v = seen_state.get() ^ 1;
                            let f = fs::OpenOptions::new().write(true).open(&hook_path).unwrap();
                            f.write_all_at(&versions2[v], 0).unwrap();
                            // A distinct mtime, whatever the clock's granularity.
                            stamp += 1;
                            let t = std::fs::FileTimes::new()
                                .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(stamp as u64));
                            f.set_times(t).unwrap();
                            seen_state.set(v);
                        }
                    }))
                });
                let seen = Seen::of_file(&File::open(&path2).unwrap()).unwrap();
                let mut packer = writer.packer();
                let mut chunker = Chunker::new(writer.repo().keys().chunker_seed);
                let r = read_consistent(&path2, seen, None, &mut chunker, &mut packer, &Counters::default());
                packer.flush().unwrap();
                MID_READ.with_borrow_mut(|h| *h = None);
                version = state.get();
                (r, version)
            })
            .await
            .unwrap();
            stamp += 10;
            current = now;
            let Ok(read) = read else { panic!("read {n} failed") };
            let got: Vec<catalog::Id> = read
                .extents
                .iter()
                .map(|x| match x {
                    Extent::Data(b) => b.id,
                    Extent::Hole(_) => panic!("no holes here"),
                })
                .collect();
            if schedule.len() == READ_ATTEMPTS {
                // Rewritten during every attempt: it never held still, and says so.
                assert!(read.changed, "read {n} overlapped a rewrite in every attempt but is not marked changed");
                assert!(
                    !wanted.contains(&got),
                    "read {n}: every attempt was disturbed, yet one whole version was read"
                );
            } else {
                // Some attempt ran undisturbed: that one is stored, the version then.
                assert!(!read.changed, "read {n} had an undisturbed attempt");
                assert!(got == wanted[current], "read {n} is not the file's version {current}");
            }
        }
        writer.finish().await.unwrap();
    }
}
