//! The filesystem core: async, and free of FUSE types so it can be tested without a
//! mount. Everything is lazy: a tree is fetched when a directory is first looked
//! into, a chunk when a read needs it, and nothing proportional to the repository
//! is loaded at mount time. `Fs` answers each request from its parts: the inode
//! table (`inodes`), the made-up directories that show points (`layout`), read
//! planning (`read`) and chunk fetching (`fetch`).

mod attr;
mod fetch;
mod inodes;
mod layout;
mod node;
mod read;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use catalog::tree::{EntryKind, Extent, Tree};
use catalog::Repository;
use futures::{StreamExt, TryStreamExt};

pub use attr::{Attr, Kind};
pub use inodes::ROOT;
pub use layout::Scope;
pub use read::Data;

use crate::cache::DiskCache;
use crate::error::FsError;
use attr::Owner;
use fetch::Fetcher;
use inodes::Inodes;
use layout::{Layout, Listing};
use node::{Node, NodeKind, Synth};
use read::{Piece, Reader};

/// Listing `<source>/points/` fetches this many points' manifests and trees at once.
const POINT_FETCHES: usize = 16;

pub struct Fs {
    layout: Layout,
    inodes: Inodes,
    fetcher: Arc<Fetcher>,
    /// inode -> its reader's position and read-ahead.
    readers: Mutex<HashMap<u64, Reader>>,
    owner: Owner,
}

impl Fs {
    /// Prepares a mount of what `scope` shows, keeping `cache_bytes` of chunks in
    /// memory and, if given, sealed chunks in `disk`.
    pub async fn new(
        repo: Repository,
        scope: Scope,
        cache_bytes: usize,
        disk: Option<DiskCache>,
    ) -> Result<Arc<Fs>, FsError> {
        let fetcher = Fetcher::new(repo.clone(), cache_bytes, disk);
        let layout = Layout::new(repo, scope);
        let root = layout.root().await?;
        Ok(Arc::new(Fs {
            layout,
            inodes: Inodes::new(root),
            fetcher,
            readers: Mutex::new(HashMap::new()),
            owner: Owner { uid: unsafe { libc::geteuid() }, gid: unsafe { libc::getegid() }, since: SystemTime::now() },
        }))
    }

    async fn tree<'a>(&self, node: &'a Node) -> Result<&'a Arc<Tree>, FsError> {
        let NodeKind::Entry { entry, tree, .. } = &node.kind else { return Err(FsError::NotDir) };
        if entry.kind != EntryKind::Dir {
            return Err(FsError::NotDir);
        }
        let blob = entry.subtree.ok_or_else(|| FsError::Io("directory without a tree".into()))?;
        tree.get_or_try_init(|| async { Ok(Arc::new(self.fetcher.repo().read_tree(&blob).await?)) }).await
    }

    /// `lookup` when the parent's tree is already here. `None`: use the async path.
    pub fn lookup_now(&self, parent: u64, name: &[u8]) -> Option<Result<Attr, FsError>> {
        let node = self.inodes.get(parent).ok()?;
        let NodeKind::Entry { tree, overlay, .. } = &node.kind else { return None };
        let tree = tree.get()?;
        let Some(entry) = tree.find(name) else { return Some(Err(FsError::NotFound)) };
        let ino = self.inodes.intern(parent, name, || Node::entry(entry, overlay));
        self.getattr_now(ino)
    }

    pub async fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr, FsError> {
        if let Some(r) = self.lookup_now(parent, name) {
            return r;
        }
        let node = self.inodes.get(parent)?;
        let ino = match &node.kind {
            NodeKind::Entry { overlay, .. } => {
                let tree = self.tree(&node).await?;
                let entry = tree.find(name).ok_or(FsError::NotFound)?;
                self.inodes.intern(parent, name, || Node::entry(entry, overlay))
            }
            NodeKind::Synthetic(s) => {
                let (key, child) = self.layout.lookup(s, name).await?;
                self.inodes.intern(parent, &key, || child)
            }
        };
        self.getattr(ino).await
    }

    pub async fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        if let Some(r) = self.getattr_now(ino) {
            return r;
        }
        let node = self.inodes.get(ino)?;
        match &node.kind {
            NodeKind::Synthetic(Synth::Latest(src)) => {
                let target = self.layout.latest_target(src).await?;
                Ok(self.owner.synthetic(ino, Kind::Symlink, target.len() as u64))
            }
            _ => Err(FsError::Io(format!("inode {ino} has no attributes"))),
        }
    }

    /// Attributes that need no fetch: every node but `latest`. `None` means "use
    /// the async path".
    pub fn getattr_now(&self, ino: u64) -> Option<Result<Attr, FsError>> {
        let node = match self.inodes.get(ino) {
            Ok(n) => n,
            Err(e) => return Some(Err(e)),
        };
        Some(match &node.kind {
            NodeKind::Synthetic(Synth::Latest(_)) => return None,
            NodeKind::Synthetic(_) => Ok(self.owner.synthetic(ino, Kind::Dir, 0)),
            NodeKind::Entry { entry, .. } => Ok(attr::of_entry(ino, entry)),
        })
    }

    pub async fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let node = self.inodes.get(ino)?;
        match &node.kind {
            NodeKind::Synthetic(Synth::Latest(src)) => self.layout.latest_target(src).await,
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
        let node = self.inodes.get(ino)?;
        let s = match &node.kind {
            NodeKind::Entry { prefetched, overlay, .. } => {
                let tree = self.tree(&node).await?.clone();
                if !prefetched.swap(true, Ordering::Relaxed) {
                    self.fetcher.prefetch_small_files(&tree);
                }
                return Ok(tree
                    .entries
                    .iter()
                    .map(|e| {
                        let child = self.inodes.intern(ino, &e.name, || Node::entry(e, overlay));
                        (child, attr::kind_of(e.kind), e.name.clone())
                    })
                    .collect());
            }
            NodeKind::Synthetic(s) => s,
        };
        match self.layout.list(s).await? {
            Listing::Sources(sources) => {
                let mut out = Vec::new();
                for s in sources {
                    // Interning needs the node: look it up properly (it may fetch a point).
                    let attr = self.lookup(ino, s.as_bytes()).await?;
                    out.push((attr.ino, attr.kind, s.into_bytes()));
                }
                Ok(out)
            }
            Listing::Entries(entries) => Ok(entries
                .into_iter()
                .map(|(name, kind, node)| (self.inodes.intern(ino, &name, || node), kind, name))
                .collect()),
            Listing::Points(points) => {
                let children = futures::stream::iter(points)
                    .map(|p| async move {
                        let name = p.time.to_string().into_bytes();
                        let child = match self.inodes.known(ino, &name) {
                            Some(c) => c,
                            None => {
                                let n = self.layout.point_or_damaged(&p, None).await?;
                                self.inodes.intern(ino, &name, || n)
                            }
                        };
                        Ok::<_, FsError>((child, Kind::Dir, name))
                    })
                    .buffered(POINT_FETCHES);
                children.try_collect().await
            }
        }
    }

    /// `read` when every chunk it needs is cached. `None`: use the async path.
    pub fn read_now(self: &Arc<Self>, ino: u64, offset: u64, size: u32) -> Option<Result<Data, FsError>> {
        let node = self.inodes.get(ino).ok()?;
        let (entry, starts) = node.file().ok()?;
        let plan = read::read_plan(entry, starts, offset, size);
        let mut out = Data::default();
        for piece in &plan.pieces {
            match piece {
                Piece::Zeros(n) => out.zeros(*n),
                Piece::Chunk(b, range) => out.push(self.fetcher.cached(&b.id)?.slice(range.clone())),
            }
        }
        self.read_ahead(ino, &node, offset, offset + plan.len as u64, plan.first);
        Some(Ok(out))
    }

    /// Reads up to `size` bytes at `offset`, fetching only the chunks they lie in.
    pub async fn read(self: &Arc<Self>, ino: u64, offset: u64, size: u32) -> Result<Data, FsError> {
        let node = self.inodes.get(ino)?;
        let (entry, starts) = node.file()?;
        let plan = read::read_plan(entry, starts, offset, size);
        // Before waiting: the read-ahead also fetches this read's own chunks, in the
        // same ranged GETs as the ones after them.
        self.read_ahead(ino, &node, offset, offset + plan.len as u64, plan.first);
        let mut out = Data::default();
        for piece in &plan.pieces {
            match piece {
                Piece::Zeros(n) => out.zeros(*n),
                Piece::Chunk(b, range) => out.push(self.fetcher.chunk(b).await?.slice(range.clone())),
            }
        }
        Ok(out)
    }

    /// Fetches ahead of the reader of `ino` as its position says (`read::Reader`).
    fn read_ahead(&self, ino: u64, node: &Node, offset: u64, end: u64, first: usize) {
        let Ok((entry, starts)) = node.file() else { return };
        let ahead = self
            .readers
            .lock()
            .expect("read positions")
            .entry(ino)
            .or_default()
            .advance(entry, starts, offset, end, first);
        let blobs = entry.content[ahead].iter().filter_map(|x| if let Extent::Data(b) = x { Some(*b) } else { None });
        self.fetcher.fetch_ahead(blobs);
    }

    /// Where the next data (`SEEK_DATA`) or hole (`SEEK_HOLE`) is at or after
    /// `offset` (see `read::seek`).
    pub fn seek(&self, ino: u64, offset: u64, data: bool) -> Result<u64, FsError> {
        let node = self.inodes.get(ino)?;
        let (entry, starts) = node.file().map_err(|_| FsError::Invalid)?;
        read::seek(entry, starts, offset, data)
    }

    /// The inode flags (`lsattr`) of an entry; none for made-up directories.
    pub fn inode_flags(&self, ino: u64) -> Result<u32, FsError> {
        Ok(self.inodes.get(ino)?.stored().map_or(0, |e| e.flags))
    }

    pub async fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, FsError> {
        let node = self.inodes.get(ino)?;
        let entry = node.stored().ok_or(FsError::NoAttr)?;
        entry.xattrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).ok_or(FsError::NoAttr)
    }

    /// Attribute names, each followed by a NUL, as listxattr(2) returns them.
    pub async fn listxattr(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let node = self.inodes.get(ino)?;
        let mut out = Vec::new();
        for (k, _) in node.stored().map_or(&[][..], |e| &e.xattrs[..]) {
            out.extend_from_slice(k);
            out.push(0);
        }
        Ok(out)
    }

    /// A file was closed: forget where its reader was.
    pub fn forget_position(&self, ino: u64) {
        self.readers.lock().expect("read positions").remove(&ino);
    }

    /// Inodes handed out so far (for statfs).
    pub fn inodes(&self) -> u64 {
        self.inodes.count()
    }
}
