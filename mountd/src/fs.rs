//! The filesystem core: async, and free of FUSE types so it can be tested without a
//! mount. Everything is lazy: a tree is fetched when a directory is first looked
//! into, a chunk when a read needs it, and nothing proportional to the repository
//! is loaded at mount time. Inode numbers are handed out on first sight, keyed by
//! (parent, name), so they stay stable for the life of the mount; the names of one
//! hard-linked file share one inode.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use catalog::time::{parse_time, TimeSpec};
use catalog::tree::{Entry, EntryKind, Extent, Timestamp as TreeTime, Tree};
use catalog::{BlobKind, BlobRef, Id, Overlay, PointRef, Repository};
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use tokio::sync::OnceCell;

use crate::cache::{ChunkCache, DiskCache};
use crate::error::FsError;

pub const ROOT: u64 = 1;
/// One fetch of a chunk, shared by every reader that asks while it runs.
type Fetch = Shared<BoxFuture<'static, Result<Bytes, String>>>;
/// A sequential reader has this many bytes fetched or in flight ahead of it, enough
/// to keep the store busy and every core decrypting while the reader copies.
const READ_AHEAD_BYTES: u64 = 32 << 20;
/// Read-ahead and listing prefetch fetch neighbouring chunks of one pack with one
/// ranged GET of at most this many bytes, reading over gaps of up to `SPAN_GAP`.
const SPAN_BYTES: u64 = 8 << 20;
const SPAN_GAP: u64 = 64 << 10;
/// A read this close to where the last one ended continues it.
const SEQUENTIAL_SLACK: u64 = 1 << 20;
/// A fetch that takes longer than this fails the read with EIO instead of hanging.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Listing a directory prefetches its small files (one chunk each), since tools that
/// list a tree (`find | xargs cat`, `cp -r`, `grep -r`) read them next: at most this
/// many per directory, this many fetches at once.
const LISTING_PREFETCH_FILES: usize = 1024;
/// Store requests that read ahead or prefetch run at most this many at once, so
/// that a burst of them holds neither many threads nor much memory; reads that a
/// reader waits for do not queue behind them.
const BACKGROUND_REQUESTS: usize = 16;
/// How long the newest point of a source, once listed, is taken as still the newest.
/// One `ls <source>/latest/` asks for it several times (the source, the link, its
/// target); the kernel keeps timeline entries for as long, so new points still
/// appear within seconds.
const NEWEST_TTL: Duration = Duration::from_secs(1);
/// Listing `<source>/points/` fetches this many points' manifests and trees at once.
const POINT_FETCHES: usize = 16;

/// What the mount shows.
#[derive(Debug, Clone)]
pub enum View {
    /// The state at one moment: the point of each source at or before it, with the
    /// appends shipped after that point up to the moment. Shown directly when there
    /// is one source, under `<source>/` otherwise.
    At(Vec<PointRef>, Timestamp),
    /// Every point: `<source>/latest`, `<source>/points/<time>/`, `<source>/at/<T>/`.
    /// `Some(source)` limits it to one source.
    Timeline(Option<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// The attributes of an inode, as `stat` shows them.
#[derive(Debug, Clone)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    /// 512-byte blocks that hold data (holes take none).
    pub blocks: u64,
    /// Permission bits, setuid, setgid and sticky included.
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub mtime: SystemTime,
    /// Whether the attributes can change while mounted (synthetic timeline entries).
    pub volatile: bool,
}

enum Synth {
    Root,
    Source(String),
    Points(String),
    At(String),
    Latest(String),
    /// A point whose manifest or root cannot be read: listed, so that the others
    /// are, and EIO inside.
    Damaged(String),
}

enum NodeKind {
    Synthetic(Synth),
    Entry {
        entry: Arc<Entry>,
        /// The appends after the point, up to the moment shown (none for a point
        /// shown as it is).
        overlay: Option<Arc<Overlay>>,
        /// The tree of a directory, fetched on first use.
        tree: OnceCell<Arc<Tree>>,
        /// Where each extent of a file starts.
        starts: OnceLock<Vec<u64>>,
        /// Whether listing this directory already prefetched its small files.
        prefetched: std::sync::atomic::AtomicBool,
    },
}

struct Node {
    kind: NodeKind,
}

impl Node {
    /// The node of a tree entry, as of the overlay's moment.
    fn entry(e: &Entry, overlay: &Option<Arc<Overlay>>) -> Node {
        let entry = match overlay {
            Some(o) => o.applied(e).into_owned(),
            None => e.clone(),
        };
        Node {
            kind: NodeKind::Entry {
                entry: Arc::new(entry),
                overlay: overlay.clone(),
                tree: OnceCell::new(),
                starts: OnceLock::new(),
                prefetched: Default::default(),
            },
        }
    }
}

/// Where a file's reader is: where its reads ended, how many in a row were
/// sequential, and the first extent not yet read ahead.
#[derive(Default)]
struct Reader {
    end: u64,
    streak: u32,
    ahead: usize,
}

#[derive(Default)]
struct Table {
    nodes: HashMap<u64, Arc<Node>>,
    names: HashMap<(u64, Vec<u8>), u64>,
    /// (inode of the point's root, link group) -> inode
    links: HashMap<(u64, u64), u64>,
    /// inode of an entry -> inode of the root of the point it belongs to (each point
    /// shown, under `points/`, `at/` or a source, is a point of its own)
    point_of: HashMap<u64, u64>,
    next: u64,
}

pub struct Fs {
    repo: Repository,
    view: View,
    table: Mutex<Table>,
    cache: ChunkCache,
    disk: Option<DiskCache>,
    inflight: Mutex<HashMap<Id, Fetch>>,
    /// inode -> its reader's position and read-ahead.
    readers: Mutex<HashMap<u64, Reader>>,
    background: tokio::sync::Semaphore,
    /// source -> its newest point, and when that was listed.
    newest: Mutex<HashMap<String, (std::time::Instant, Option<PointRef>)>>,
    /// Points whose manifest was read: candidates for `latest` without a read.
    readable: Mutex<std::collections::HashSet<String>>,
    mounted: SystemTime,
    /// Where background fetches run (read-ahead may be started from a FUSE thread).
    rt: tokio::runtime::Handle,
    uid: u32,
    gid: u32,
}

fn to_system(t: TreeTime) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + Duration::from_nanos(t.nsec as u64)
    }
}

/// What a read returns, piece by piece.
enum Piece {
    Zeros(usize),
    /// These bytes of this chunk.
    Chunk(BlobRef, std::ops::Range<usize>),
}

struct ReadPlan {
    pieces: Vec<Piece>,
    len: usize,
    /// The index of the extent the read starts in.
    first: usize,
}

/// The pieces of `size` bytes at `offset` of the file `node`.
fn read_plan(node: &Node, offset: u64, size: u32) -> Result<(&Entry, ReadPlan), FsError> {
    let NodeKind::Entry { entry, starts, .. } = &node.kind else { return Err(FsError::IsDir) };
    if entry.kind != EntryKind::File {
        return Err(FsError::IsDir);
    }
    let starts = starts.get_or_init(|| extent_starts(entry));
    let end = (offset + size as u64).min(entry.size);
    let mut idx = starts.partition_point(|&s| s <= offset).saturating_sub(1);
    let mut plan = ReadPlan { pieces: Vec::new(), len: 0, first: idx };
    let mut pos = offset;
    while pos < end && idx < entry.content.len() {
        let ext = &entry.content[idx];
        let (s, e) = (starts[idx], starts[idx] + ext.len());
        let (from, to) = (pos.max(s), end.min(e));
        plan.pieces.push(match ext {
            Extent::Hole(_) => Piece::Zeros((to - from) as usize),
            Extent::Data(b) => Piece::Chunk(*b, (from - s) as usize..(to - s) as usize),
        });
        plan.len += (to - from) as usize;
        pos = to;
        idx += 1;
    }
    Ok((entry, plan))
}

/// The bytes of one read, as the pieces they lie in: a read within one chunk, the
/// usual case, is one slice of the cached chunk and copies nothing; a read across
/// chunks or holes has several, joined only when replying (`with_slice`).
#[derive(Debug, Default)]
pub struct Data {
    pieces: Vec<Bytes>,
}

thread_local! {
    /// Where this thread joins the pieces of a read, kept from one read to the next.
    static JOINED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Data {
    fn zeros(&mut self, n: usize) {
        self.pieces.push(Bytes::from(vec![0; n]));
    }

    /// Calls `f` with the bytes in one slice: the piece itself, or the pieces copied
    /// into a buffer this thread keeps. A buffer of its own for each read (mapped
    /// afresh, reads being large) had every page faulted in and zeroed every time.
    pub fn with_slice<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        match self.pieces.as_slice() {
            [] => f(&[]),
            [one] => f(one),
            pieces => JOINED.with_borrow_mut(|buf| {
                buf.clear();
                pieces.iter().for_each(|p| buf.extend_from_slice(p));
                f(buf)
            }),
        }
    }
}

/// Where each extent of a file starts.
fn extent_starts(entry: &Entry) -> Vec<u64> {
    let mut pos = 0;
    entry
        .content
        .iter()
        .map(|x| {
            let s = pos;
            pos += x.len();
            s
        })
        .collect()
}

fn kind_of(k: EntryKind) -> Kind {
    match k {
        EntryKind::File => Kind::File,
        EntryKind::Dir => Kind::Dir,
        EntryKind::Symlink => Kind::Symlink,
        EntryKind::Fifo => Kind::Fifo,
        EntryKind::Socket => Kind::Socket,
        EntryKind::CharDevice => Kind::CharDevice,
        EntryKind::BlockDevice => Kind::BlockDevice,
    }
}

impl Fs {
    /// Prepares a mount. With one point in an `At` view, that point's top directory
    /// is the root, which costs one manifest and one tree fetch.
    pub async fn new(
        repo: Repository,
        view: View,
        cache_bytes: usize,
        disk: Option<DiskCache>,
    ) -> Result<Arc<Fs>, FsError> {
        let fs = Arc::new(Fs {
            repo,
            view: view.clone(),
            table: Mutex::new(Table { next: ROOT + 1, ..Default::default() }),
            cache: ChunkCache::new(cache_bytes),
            disk,
            inflight: Mutex::new(HashMap::new()),
            readers: Mutex::new(HashMap::new()),
            background: tokio::sync::Semaphore::new(BACKGROUND_REQUESTS),
            newest: Mutex::new(HashMap::new()),
            readable: Mutex::new(Default::default()),
            mounted: SystemTime::now(),
            rt: tokio::runtime::Handle::current(),
            uid: unsafe { libc::geteuid() },
            gid: unsafe { libc::getegid() },
        });
        let root = match &view {
            View::At(points, at) if points.len() == 1 => fs.point_node(&points[0], Some(*at)).await?,
            _ => Node { kind: NodeKind::Synthetic(Synth::Root) },
        };
        let mut t = fs.table.lock().expect("inode table");
        if matches!(root.kind, NodeKind::Entry { .. }) {
            t.point_of.insert(ROOT, ROOT);
        }
        t.nodes.insert(ROOT, Arc::new(root));
        drop(t);
        Ok(fs)
    }

    fn node(&self, ino: u64) -> Result<Arc<Node>, FsError> {
        self.table.lock().expect("inode table").nodes.get(&ino).cloned().ok_or(FsError::BadInode(ino))
    }

    /// The newest point of `src` if it was listed less than `NEWEST_TTL` ago.
    fn newest_known(&self, src: &str) -> Option<Option<PointRef>> {
        let newest = self.newest.lock().expect("newest points");
        newest.get(src).filter(|(when, _)| when.elapsed() < NEWEST_TTL).map(|(_, p)| p.clone())
    }

    /// The newest point of `src` that can be read, listed at most `NEWEST_TTL` ago.
    /// Each point is read once to know that: `latest` never leads to a damaged one.
    async fn newest(&self, src: &str) -> Result<Option<PointRef>, FsError> {
        if let Some(p) = self.newest_known(src) {
            return Ok(p);
        }
        let mut at = Timestamp::now();
        let p = loop {
            let Some(p) = self.repo.point_at(src, at).await? else { break None };
            if self.readable.lock().expect("readable points").contains(&p.name) {
                break Some(p);
            }
            match self.repo.manifest(&p).await {
                Ok(_) => {
                    self.readable.lock().expect("readable points").insert(p.name.clone());
                    break Some(p);
                }
                Err(e) if e.is_damage() => {
                    tracing::error!("{} is not shown as latest: {e}", p.name);
                    at = p
                        .time
                        .checked_sub(jiff::SignedDuration::from_nanos(1))
                        .map_err(|e| FsError::Io(e.to_string()))?;
                }
                Err(e) => return Err(e.into()),
            }
        };
        self.newest.lock().expect("newest points").insert(src.to_string(), (std::time::Instant::now(), p.clone()));
        Ok(p)
    }

    /// The node of a point shown under `points/` or `at/`: a damaged one is shown
    /// as such, so that it does not hide the others.
    async fn point_or_damaged(&self, point: &PointRef, at: Option<Timestamp>) -> Result<Node, FsError> {
        match self.point_node(point, at).await {
            Ok(n) => Ok(n),
            Err(FsError::Damaged(why)) => {
                tracing::error!("point {} cannot be read: {why}", point.name);
                Ok(Node { kind: NodeKind::Synthetic(Synth::Damaged(why)) })
            }
            Err(e) => Err(e),
        }
    }

    /// The node for the backed-up entry of a point (the one entry of its root tree):
    /// as of `at` if given, else as the point has it.
    async fn point_node(&self, point: &PointRef, at: Option<Timestamp>) -> Result<Node, FsError> {
        let m = self.repo.manifest(point).await?;
        let root = m.root_ref().ok_or_else(|| FsError::Damaged(format!("{}: bad root reference", point.name)))?;
        let tree = self.repo.read_tree(&root).await?;
        let [entry] = tree.entries.as_slice() else {
            return Err(FsError::Damaged(format!("{}: the root tree does not hold one entry", point.name)));
        };
        let overlay = match at {
            Some(at) => Some(self.repo.overlay(point, at).await?).filter(|o| !o.is_empty()).map(Arc::new),
            None => None,
        };
        Ok(Node::entry(entry, &overlay))
    }

    /// The inode of `name` in `parent`, made with `make` on first sight.
    fn intern(&self, parent: u64, name: &[u8], make: impl FnOnce() -> Node) -> u64 {
        let mut t = self.table.lock().expect("inode table");
        if let Some(&ino) = t.names.get(&(parent, name.to_vec())) {
            return ino;
        }
        let node = make();
        // The point an entry belongs to: its parent's, or, below a synthetic
        // directory (`points/`, `at/`, the root of several sources), its own.
        let point = t.point_of.get(&parent).copied();
        // Names of one inode within one point share the inode number; link groups
        // are numbered afresh in every point, so they mean nothing across points.
        let link = match (&node.kind, point) {
            (NodeKind::Entry { entry, .. }, Some(p)) if entry.kind == EntryKind::File && entry.link_group != 0 => {
                Some((p, entry.link_group))
            }
            _ => None,
        };
        if let Some(key) = link {
            if let Some(&ino) = t.links.get(&key) {
                t.names.insert((parent, name.to_vec()), ino);
                return ino;
            }
        }
        let ino = t.next;
        t.next += 1;
        let is_entry = matches!(node.kind, NodeKind::Entry { .. });
        t.nodes.insert(ino, Arc::new(node));
        t.names.insert((parent, name.to_vec()), ino);
        if is_entry {
            t.point_of.insert(ino, point.unwrap_or(ino));
        }
        if let Some(key) = link {
            t.links.insert(key, ino);
        }
        ino
    }

    async fn tree<'a>(&self, node: &'a Node) -> Result<&'a Arc<Tree>, FsError> {
        let NodeKind::Entry { entry, tree, .. } = &node.kind else { return Err(FsError::NotDir) };
        if entry.kind != EntryKind::Dir {
            return Err(FsError::NotDir);
        }
        let blob = entry.subtree.ok_or_else(|| FsError::Io("directory without a tree".into()))?;
        tree.get_or_try_init(|| async { Ok(Arc::new(self.repo.read_tree(&blob).await?)) }).await
    }

    fn sources_of_view(&self) -> Option<Vec<String>> {
        match &self.view {
            View::At(points, _) => Some(points.iter().map(|p| p.source.clone()).collect()),
            View::Timeline(Some(s)) => Some(vec![s.clone()]),
            View::Timeline(None) => None,
        }
    }

    /// `lookup` when the parent's tree is already here. `None`: use the async path.
    pub fn lookup_now(&self, parent: u64, name: &[u8]) -> Option<Result<Attr, FsError>> {
        let node = self.node(parent).ok()?;
        let NodeKind::Entry { tree, overlay, .. } = &node.kind else { return None };
        let tree = tree.get()?;
        let Some(entry) = tree.find(name) else { return Some(Err(FsError::NotFound)) };
        let ino = self.intern(parent, name, || Node::entry(entry, overlay));
        self.getattr_now(ino)
    }

    pub async fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr, FsError> {
        if let Some(r) = self.lookup_now(parent, name) {
            return r;
        }
        let node = self.node(parent)?;
        let ino = match &node.kind {
            NodeKind::Entry { overlay, .. } => {
                let tree = self.tree(&node).await?;
                let entry = tree.find(name).ok_or(FsError::NotFound)?;
                self.intern(parent, name, || Node::entry(entry, overlay))
            }
            NodeKind::Synthetic(s) => self.lookup_synthetic(parent, s, name).await?,
        };
        self.getattr(ino).await
    }

    async fn lookup_synthetic(&self, parent: u64, s: &Synth, name: &[u8]) -> Result<u64, FsError> {
        let name_str = std::str::from_utf8(name).map_err(|_| FsError::NotFound)?;
        let synth = |s: Synth| move || Node { kind: NodeKind::Synthetic(s) };
        match s {
            Synth::Root => match &self.view {
                View::At(points, at) => {
                    let p = points.iter().find(|p| p.source == name_str).ok_or(FsError::NotFound)?;
                    let node = self.point_node(p, Some(*at)).await?;
                    Ok(self.intern(parent, name, || node))
                }
                View::Timeline(only) => {
                    if only.as_deref().is_some_and(|o| o != name_str) || catalog::validate_source(name_str).is_err() {
                        return Err(FsError::NotFound);
                    }
                    if self.newest(name_str).await?.is_none() {
                        return Err(FsError::NotFound);
                    }
                    Ok(self.intern(parent, name, synth(Synth::Source(name_str.to_string()))))
                }
            },
            Synth::Source(src) => {
                let s = match name {
                    b"latest" => Synth::Latest(src.clone()),
                    b"points" => Synth::Points(src.clone()),
                    b"at" => Synth::At(src.clone()),
                    _ => return Err(FsError::NotFound),
                };
                Ok(self.intern(parent, name, synth(s)))
            }
            Synth::Points(src) => {
                let t: Timestamp = name_str.parse().map_err(|_| FsError::NotFound)?;
                // Usually the target of `latest`, just read.
                let p = match self.newest_known(src).flatten().filter(|p| p.time == t) {
                    Some(p) => p,
                    None => self.repo.point_at(src, t).await?.filter(|p| p.time == t).ok_or(FsError::NotFound)?,
                };
                let node = self.point_or_damaged(&p, None).await?;
                Ok(self.intern(parent, name, || node))
            }
            Synth::At(src) => {
                let now = Timestamp::now();
                let spec = parse_time(name_str, now, jiff::tz::TimeZone::system).map_err(|_| FsError::NotFound)?;
                let p = match self.repo.resolve(src, spec, now).await {
                    Ok(p) => p,
                    Err(catalog::RepoError::BeforeFirst { .. } | catalog::RepoError::Future { .. }) => {
                        return Err(FsError::NotFound)
                    }
                    Err(e) => return Err(e.into()),
                };
                // `latest` moves: key it by the point it resolves to now.
                let key =
                    if spec == TimeSpec::Latest { format!("latest@{}", p.name).into_bytes() } else { name.to_vec() };
                let node = self.point_or_damaged(&p, Some(spec.instant(now))).await?;
                Ok(self.intern(parent, &key, || node))
            }
            Synth::Latest(_) => Err(FsError::NotDir),
            Synth::Damaged(why) => Err(FsError::Damaged(why.clone())),
        }
    }

    fn synthetic_attr(&self, ino: u64, kind: Kind, size: u64) -> Attr {
        Attr {
            ino,
            kind,
            size,
            blocks: 0,
            perm: if kind == Kind::Dir { 0o555 } else { 0o777 },
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            mtime: self.mounted,
            volatile: true,
        }
    }

    pub async fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        if let Some(r) = self.getattr_now(ino) {
            return r;
        }
        let node = self.node(ino)?;
        match &node.kind {
            NodeKind::Synthetic(Synth::Latest(src)) => {
                let target = self.latest_target(src).await?;
                Ok(self.synthetic_attr(ino, Kind::Symlink, target.len() as u64))
            }
            _ => unreachable!("getattr_now answers every other node"),
        }
    }

    /// Attributes that need no fetch: every node but `latest`. `None` means "use
    /// the async path".
    pub fn getattr_now(&self, ino: u64) -> Option<Result<Attr, FsError>> {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return Some(Err(e)),
        };
        Some(match &node.kind {
            NodeKind::Synthetic(Synth::Latest(_)) => return None,
            NodeKind::Synthetic(_) => Ok(self.synthetic_attr(ino, Kind::Dir, 0)),
            NodeKind::Entry { entry: e, .. } => {
                let data: u64 =
                    e.content.iter().map(|x| if let Extent::Data(b) = x { b.raw_len as u64 } else { 0 }).sum();
                let (size, blocks) = match e.kind {
                    EntryKind::File => (e.size, data.div_ceil(512)),
                    EntryKind::Dir => {
                        let size = if e.size == 0 { 4096 } else { e.size };
                        (size, size.div_ceil(512))
                    }
                    EntryKind::Symlink => (e.target.len() as u64, 0),
                    _ => (0, 0),
                };
                Ok(Attr {
                    ino,
                    kind: kind_of(e.kind),
                    size,
                    blocks,
                    perm: (e.mode & 0o7777) as u16,
                    nlink: e.nlink.max(1),
                    uid: e.uid,
                    gid: e.gid,
                    rdev: e.rdev as u32,
                    mtime: to_system(e.mtime),
                    volatile: false,
                })
            }
        })
    }

    async fn latest_target(&self, src: &str) -> Result<Vec<u8>, FsError> {
        let p = self.newest(src).await?.ok_or(FsError::NotFound)?;
        Ok(format!("points/{}", p.time).into_bytes())
    }

    pub async fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let node = self.node(ino)?;
        match &node.kind {
            NodeKind::Synthetic(Synth::Latest(src)) => self.latest_target(src).await,
            NodeKind::Entry { entry, .. } if entry.kind == EntryKind::Symlink => Ok(entry.target.clone()),
            _ => Err(FsError::NotSymlink),
        }
    }

    /// A directory's entries with their attributes, `.` and `..` first.
    pub async fn readdir_plus(self: &Arc<Self>, ino: u64) -> Result<Vec<(Attr, Vec<u8>)>, FsError> {
        let entries = self.readdir(ino).await?;
        let mut out = Vec::with_capacity(entries.len() + 2);
        out.push((self.getattr(ino).await?, b".".to_vec()));
        out.push((self.getattr(ROOT).await?, b"..".to_vec()));
        for (child, _, name) in entries {
            out.push((self.getattr(child).await?, name));
        }
        Ok(out)
    }

    /// A directory's entries (without `.` and `..`), with their inodes and kinds.
    pub async fn readdir(self: &Arc<Self>, ino: u64) -> Result<Vec<(u64, Kind, Vec<u8>)>, FsError> {
        let node = self.node(ino)?;
        let synth = |s: Synth| move || Node { kind: NodeKind::Synthetic(s) };
        match &node.kind {
            NodeKind::Entry { prefetched, overlay, .. } => {
                let tree = self.tree(&node).await?.clone();
                if !prefetched.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    self.prefetch_small_files(&tree);
                }
                Ok(tree
                    .entries
                    .iter()
                    .map(|e| {
                        let child = self.intern(ino, &e.name, || Node::entry(e, overlay));
                        (child, kind_of(e.kind), e.name.clone())
                    })
                    .collect())
            }
            NodeKind::Synthetic(Synth::Root) => {
                let sources = match self.sources_of_view() {
                    Some(s) => s,
                    None => self.repo.sources().await?,
                };
                let mut out = Vec::new();
                for s in sources {
                    // Interning needs the node: look it up properly (it may fetch a point).
                    let attr = self.lookup(ino, s.as_bytes()).await?;
                    out.push((attr.ino, attr.kind, s.into_bytes()));
                }
                Ok(out)
            }
            NodeKind::Synthetic(Synth::Source(src)) => Ok(vec![
                (self.intern(ino, b"latest", synth(Synth::Latest(src.clone()))), Kind::Symlink, b"latest".to_vec()),
                (self.intern(ino, b"points", synth(Synth::Points(src.clone()))), Kind::Dir, b"points".to_vec()),
                (self.intern(ino, b"at", synth(Synth::At(src.clone()))), Kind::Dir, b"at".to_vec()),
            ]),
            NodeKind::Synthetic(Synth::Points(src)) => {
                let points = self.repo.points(src).await?;
                let children = futures::stream::iter(points)
                    .map(|p| async move {
                        let name = p.time.to_string().into_bytes();
                        let existing = self.table.lock().expect("inode table").names.get(&(ino, name.clone())).copied();
                        let child = match existing {
                            Some(c) => c,
                            None => {
                                let n = self.point_or_damaged(&p, None).await?;
                                self.intern(ino, &name, || n)
                            }
                        };
                        Ok::<_, FsError>((child, Kind::Dir, name))
                    })
                    .buffered(POINT_FETCHES);
                children.try_collect().await
            }
            NodeKind::Synthetic(Synth::At(_)) => Ok(Vec::new()),
            NodeKind::Synthetic(Synth::Latest(_)) => Err(FsError::NotDir),
            NodeKind::Synthetic(Synth::Damaged(why)) => Err(FsError::Damaged(why.clone())),
        }
    }

    /// `read` when every chunk it needs is cached. `None`: use the async path.
    pub fn read_now(self: &Arc<Self>, ino: u64, offset: u64, size: u32) -> Option<Result<Data, FsError>> {
        let node = self.node(ino).ok()?;
        let (entry, plan) = read_plan(&node, offset, size).ok()?;
        let mut out = Data::default();
        for piece in &plan.pieces {
            match piece {
                Piece::Zeros(n) => out.zeros(*n),
                Piece::Chunk(b, range) => out.pieces.push(self.cache.get(&b.id)?.slice(range.clone())),
            }
        }
        self.read_ahead(ino, &node, entry, offset, offset + plan.len as u64, plan.first);
        Some(Ok(out))
    }

    /// Reads up to `size` bytes at `offset`, fetching only the chunks they lie in.
    pub async fn read(self: &Arc<Self>, ino: u64, offset: u64, size: u32) -> Result<Data, FsError> {
        let node = self.node(ino)?;
        let (entry, plan) = read_plan(&node, offset, size)?;
        // Before waiting: the read-ahead also fetches this read's own chunks, in the
        // same ranged GETs as the ones after them.
        self.read_ahead(ino, &node, entry, offset, offset + plan.len as u64, plan.first);
        let mut out = Data::default();
        for piece in &plan.pieces {
            match piece {
                Piece::Zeros(n) => out.zeros(*n),
                Piece::Chunk(b, range) => out.pieces.push(self.chunk(b).await?.slice(range.clone())),
            }
        }
        Ok(out)
    }

    /// Keeps a sequential reader `READ_AHEAD_BYTES` ahead, refilling when half of it
    /// is used, so that whole runs of chunks come in one ranged GET each. A seek
    /// drops the read-ahead: nothing more is started until reads are sequential
    /// again. `first` is the extent the read at `offset` starts in.
    fn read_ahead(self: &Arc<Self>, ino: u64, node: &Node, entry: &Entry, offset: u64, end: u64, first: usize) {
        let NodeKind::Entry { starts, .. } = &node.kind else { return };
        let Some(starts) = starts.get() else { return };
        let pos = |i: usize| starts.get(i).copied().unwrap_or(entry.size);
        let (from, to) = {
            let mut readers = self.readers.lock().expect("read positions");
            let r = readers.entry(ino).or_default();
            // The kernel sends a reader's requests in order, but they may be served
            // out of order: near the last end counts as going on from it.
            if offset.abs_diff(r.end) <= SEQUENTIAL_SLACK {
                r.streak += 1;
                r.end = r.end.max(end);
            } else {
                (r.streak, r.end) = (0, end);
            }
            // Reading from the start is reading through; elsewhere it takes two reads in
            // a row, so that random readers do not start read-ahead by chance.
            if offset != 0 && r.streak < 2 {
                r.ahead = first;
                return;
            }
            r.ahead = r.ahead.max(first);
            if pos(r.ahead) >= offset + READ_AHEAD_BYTES / 2 {
                return;
            }
            let from = r.ahead;
            let mut to = from;
            while to < entry.content.len() && pos(to) < offset + READ_AHEAD_BYTES {
                to += 1;
            }
            r.ahead = to;
            (from, to)
        };
        let blobs =
            entry.content[from..to].iter().filter_map(|x| if let Extent::Data(b) = x { Some(*b) } else { None });
        self.fetch_ahead(blobs);
    }

    fn prefetch_small_files(self: &Arc<Self>, tree: &Tree) {
        let mut blobs: Vec<BlobRef> = tree
            .entries
            .iter()
            .filter_map(|e| match e.content.as_slice() {
                [Extent::Data(b)] if e.kind == EntryKind::File => Some(*b),
                _ => None,
            })
            .take(LISTING_PREFETCH_FILES)
            .collect();
        blobs.sort_by_key(|b| (b.pack, b.offset));
        blobs.dedup_by_key(|b| b.id);
        self.fetch_ahead(blobs.into_iter());
    }

    /// Starts fetching `blobs` in the background, each run of neighbours in one pack
    /// with one ranged GET; those cached, in flight or on the disk cache are skipped
    /// or fetched alone.
    fn fetch_ahead(self: &Arc<Self>, blobs: impl Iterator<Item = BlobRef>) {
        let mut run: Vec<BlobRef> = Vec::new();
        for b in blobs {
            if self.cache.contains(&b.id) || self.inflight.lock().expect("in-flight fetches").contains_key(&b.id) {
                continue;
            }
            if self.disk.as_ref().is_some_and(|d| d.contains(&b)) {
                let fs = self.clone();
                self.rt.spawn(async move { fs.chunk(&b).await });
                continue;
            }
            if let (Some(head), Some(last)) = (run.first(), run.last()) {
                let last_end = last.offset as u64 + last.length as u64;
                let joins = b.pack == last.pack
                    && (last_end..=last_end + SPAN_GAP).contains(&(b.offset as u64))
                    && b.offset as u64 + b.length as u64 - head.offset as u64 <= SPAN_BYTES;
                if !joins {
                    self.fetch_span(std::mem::take(&mut run));
                }
            }
            run.push(b);
        }
        if !run.is_empty() {
            self.fetch_span(run);
        }
    }

    /// Fetches neighbouring chunks of one pack with one ranged GET, in the
    /// background, and decrypts each where it landed. Readers that want one of them
    /// meanwhile wait for this fetch.
    fn fetch_span(self: &Arc<Self>, mut blobs: Vec<BlobRef>) {
        let mut inflight = self.inflight.lock().expect("in-flight fetches");
        blobs.retain(|b| !inflight.contains_key(&b.id));
        let (Some(head), Some(last)) = (blobs.first(), blobs.last()) else { return };
        let (pack, start, end) = (head.pack, head.offset as u64, last.offset as u64 + last.length as u64);
        let (fs, todo) = (self.clone(), blobs.clone());
        let span = async move {
            let sealed = async {
                let _permit = fs.background.acquire().await.map_err(|e| e.to_string())?;
                fs.bounded(&pack, fs.repo.store().get_range(&catalog::pack_name(&pack), start..end)).await
            };
            let mut all = match sealed.await {
                Ok(all) => all.try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..])),
                Err(e) => return Arc::new(todo.iter().map(|b| fs.settle(b, Err(e.clone()))).collect()),
            };
            let mut at = start;
            let opened = todo.iter().map(|b| {
                all.advance((b.offset as u64 - at) as usize);
                at = b.offset as u64 + b.length as u64;
                let mine = all.split_to(b.length as usize);
                if let Some(d) = &fs.disk {
                    d.put(b, &mine);
                }
                let plain = fs.repo.open_blob_in_place(BlobKind::Data, b, mine).map_err(|e| e.to_string());
                fs.settle(b, plain)
            });
            Arc::new(opened.collect::<Vec<_>>())
        }
        .boxed()
        .shared();
        for (i, b) in blobs.iter().enumerate() {
            inflight.insert(b.id, span.clone().map(move |all| all[i].clone()).boxed().shared());
        }
        drop(inflight);
        self.rt.spawn(span);
    }

    /// A chunk's plaintext, from the cache or fetched once however many ask at once.
    async fn chunk(self: &Arc<Self>, b: &BlobRef) -> Result<Bytes, FsError> {
        if let Some(c) = self.cache.get(&b.id) {
            return Ok(c);
        }
        let fetch = {
            let mut inflight = self.inflight.lock().expect("in-flight fetches");
            // A fetch that just ended put its chunk in the cache before leaving.
            if let Some(c) = self.cache.get(&b.id) {
                return Ok(c);
            }
            inflight
                .entry(b.id)
                .or_insert_with(|| {
                    let (fs, b) = (self.clone(), *b);
                    async move {
                        let result = fs.bounded(&b.pack, fs.fetch(&b)).await;
                        fs.settle(&b, result)
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        fetch.await.map_err(FsError::Io)
    }

    /// Runs a store request against `FETCH_TIMEOUT`.
    async fn bounded<T, E: std::fmt::Display>(
        &self,
        pack: &Id,
        request: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(FETCH_TIMEOUT, request).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("read of {} timed out after {FETCH_TIMEOUT:?}", catalog::pack_name(pack))),
        }
    }

    /// A fetch has ended: keep its chunk, or log why it failed, then let the next
    /// reader start afresh.
    fn settle(&self, b: &BlobRef, result: Result<Bytes, String>) -> Result<Bytes, String> {
        match &result {
            Ok(data) => self.cache.insert(b.id, data.clone()),
            Err(e) => tracing::error!("read failed: {e}"),
        }
        self.inflight.lock().expect("in-flight fetches").remove(&b.id);
        result
    }

    /// A chunk's plaintext from the disk cache if it is there and authentic, else
    /// from the store (and then kept on disk).
    async fn fetch(&self, b: &BlobRef) -> Result<Bytes, catalog::RepoError> {
        let Some(disk) = &self.disk else { return self.repo.read_blob_authenticated(BlobKind::Data, b).await };
        if let Some(sealed) = disk.get(b) {
            match self.repo.open_blob_authenticated(BlobKind::Data, b, &sealed) {
                Ok(plain) => return Ok(plain),
                Err(e) => {
                    tracing::warn!("dropping a damaged entry of the disk cache: {e}");
                    disk.remove(b);
                }
            }
        }
        let sealed = self.repo.store().get_range(&catalog::pack_name(&b.pack), b.range()).await?;
        disk.put(b, &sealed);
        let sealed = sealed.try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..]));
        Ok(self.repo.open_blob_in_place(BlobKind::Data, b, sealed)?)
    }

    /// Where the next data (`SEEK_DATA`) or hole (`SEEK_HOLE`) is at or after
    /// `offset`, from the stored extents, so that `cp --sparse`, `rsync -S` and
    /// `tar -S` skip holes instead of reading zeros. The end of the file counts as
    /// a hole, as on every filesystem.
    pub fn seek(&self, ino: u64, offset: u64, data: bool) -> Result<u64, FsError> {
        let node = self.node(ino)?;
        let NodeKind::Entry { entry, starts, .. } = &node.kind else { return Err(FsError::Invalid) };
        if entry.kind != EntryKind::File {
            return Err(FsError::Invalid);
        }
        if offset >= entry.size {
            return Err(FsError::NoSuchOffset);
        }
        let starts = starts.get_or_init(|| extent_starts(entry));
        let first = starts.partition_point(|&s| s <= offset).saturating_sub(1);
        for (i, ext) in entry.content.iter().enumerate().skip(first) {
            let is_data = matches!(ext, Extent::Data(_)) && !ext.is_empty();
            if is_data == data {
                return Ok(starts[i].max(offset));
            }
        }
        if data {
            Err(FsError::NoSuchOffset)
        } else {
            Ok(entry.size)
        }
    }

    /// The inode flags (`lsattr`) of an entry; none for synthetic directories.
    pub fn inode_flags(&self, ino: u64) -> Result<u32, FsError> {
        let node = self.node(ino)?;
        Ok(match &node.kind {
            NodeKind::Entry { entry, .. } => entry.flags,
            NodeKind::Synthetic(_) => 0,
        })
    }

    pub async fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, FsError> {
        let node = self.node(ino)?;
        let NodeKind::Entry { entry, .. } = &node.kind else { return Err(FsError::NoAttr) };
        entry.xattrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).ok_or(FsError::NoAttr)
    }

    /// Attribute names, each followed by a NUL, as listxattr(2) returns them.
    pub async fn listxattr(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let node = self.node(ino)?;
        let mut out = Vec::new();
        if let NodeKind::Entry { entry, .. } = &node.kind {
            for (k, _) in &entry.xattrs {
                out.extend_from_slice(k);
                out.push(0);
            }
        }
        Ok(out)
    }

    /// A file was closed: forget where its reader was.
    pub fn forget_position(&self, ino: u64) {
        self.readers.lock().expect("read positions").remove(&ino);
    }

    /// Inodes handed out so far (for statfs).
    pub fn inodes(&self) -> u64 {
        self.table.lock().expect("inode table").next - 1
    }
}
