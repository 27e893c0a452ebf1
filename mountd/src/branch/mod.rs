//! A branch of a point: its files, writable, every change kept on local disk and
//! nothing written to the repository. PostgreSQL recovers and runs on one
//! (`ebb pg serve`): it opens every relation file for writing and writes pages
//! during recovery, so a file is copied on write a block at a time (`blocks`),
//! never whole. Names are kept in memory: a directory's entries are read from the
//! point the first time it is used, and are the branch's own from then on.
//! Nothing of a branch outlives it, however it ends: its scratch files are
//! anonymous. Like `Fs`, it is async and knows nothing of FUSE.

mod blocks;

pub use blocks::MAX_FILE;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use crate::error::FsError;
use crate::fs::{Attr, Fs, Kind, ROOT};
use blocks::Blocks;

/// The longest name of an entry, as most Linux filesystems allow.
const NAME_MAX: usize = 255;

/// A point's files, writable.
pub struct Branch {
    lower: Arc<Fs>,
    scratch: PathBuf,
    /// Shown as the owner of every file of the point, when given (the user a
    /// server runs as, who may not be the one who owned them where they were
    /// backed up).
    owner: Option<(u32, u32)>,
    table: Mutex<Table>,
}

struct Table {
    nodes: HashMap<u64, Node>,
    /// An inode of the point's mount to its inode here: the names of one
    /// hard-linked file share one.
    of_lower: HashMap<u64, u64>,
    next: u64,
}

struct Node {
    kind: Kind,
    perm: u16,
    uid: u32,
    gid: u32,
    rdev: u32,
    nlink: u32,
    mtime: SystemTime,
    /// The point's inode, for its extended attributes; none for what the branch made.
    lower: Option<u64>,
    body: Body,
    /// Open handles: a file unlinked while open keeps its data until the last
    /// is released.
    open: u32,
}

enum Body {
    Dir {
        /// The directory that contains this one (itself for the top).
        parent: u64,
        /// Read from the point on first use; `None` until then.
        entries: Option<BTreeMap<Vec<u8>, u64>>,
    },
    File(Arc<FileData>),
    Symlink(Vec<u8>),
    Special,
}

struct FileData {
    size: AtomicU64,
    blocks: tokio::sync::RwLock<Blocks>,
}

/// What to make in a directory.
#[derive(Debug, Clone)]
pub enum New {
    File { perm: u16 },
    Dir { perm: u16 },
    Symlink { target: Vec<u8> },
    Special { kind: Kind, perm: u16, rdev: u32 },
}

/// What `setattr` changes; `None` leaves it.
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub perm: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub mtime: Option<SystemTime>,
}

/// How `rename` treats a name already there (renameat2's flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    Yes,
    /// `RENAME_NOREPLACE`: fail with EEXIST.
    No,
    /// `RENAME_EXCHANGE`: swap the two.
    Exchange,
}

impl Branch {
    /// A branch of what `lower` shows at its top (a directory), its scratch files
    /// in `scratch`.
    pub async fn new(lower: Arc<Fs>, scratch: PathBuf, owner: Option<(u32, u32)>) -> Result<Branch, FsError> {
        let top = lower.getattr(ROOT).await?;
        if top.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let mut node = Node::of_point(&top, None, ROOT, owner);
        node.body = Body::Dir { parent: ROOT, entries: None };
        let table =
            Table { nodes: HashMap::from([(ROOT, node)]), of_lower: HashMap::from([(ROOT, ROOT)]), next: ROOT + 1 };
        Ok(Branch { lower, scratch, owner, table: Mutex::new(table) })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().expect("branch table")
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        let t = self.lock();
        Ok(t.node(ino)?.attr(ino))
    }

    /// Reads the entries of directory `ino` from the point, the first time.
    async fn entries(&self, ino: u64) -> Result<(), FsError> {
        let lower = {
            let t = self.lock();
            match &t.node(ino)?.body {
                Body::Dir { entries: Some(_), .. } => return Ok(()),
                Body::Dir { entries: None, .. } => {
                    t.node(ino)?.lower.ok_or(FsError::Io("a directory with no entries".into()))?
                }
                _ => return Err(FsError::NotDir),
            }
        };
        let mut children = Vec::new();
        for (child, kind, name) in self.lower.readdir(lower).await? {
            let attr = self.lower.getattr(child).await?;
            let target = if kind == Kind::Symlink { Some(self.lower.readlink(child).await?) } else { None };
            children.push((name, attr, target));
        }
        let mut t = self.lock();
        if let Body::Dir { entries: Some(_), .. } = &t.node(ino)?.body {
            return Ok(()); // read meanwhile
        }
        let mut entries = BTreeMap::new();
        for (name, attr, target) in children {
            let known = t.of_lower.get(&attr.ino).copied().filter(|c| t.nodes.contains_key(c));
            let child = match known {
                Some(c) => c,
                None => {
                    let c = t.new_ino();
                    t.nodes.insert(c, Node::of_point(&attr, target, ino, self.owner));
                    t.of_lower.insert(attr.ino, c);
                    c
                }
            };
            entries.insert(name, child);
        }
        // Links to a directory: its own name, `.`, and each subdirectory's `..`.
        let subdirs = entries.values().filter(|c| t.nodes.get(c).is_some_and(|n| n.kind == Kind::Dir)).count();
        let dir = t.node_mut(ino)?;
        dir.nlink = 2 + subdirs as u32;
        if let Body::Dir { entries: e, .. } = &mut dir.body {
            *e = Some(entries);
        }
        Ok(())
    }

    pub async fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr, FsError> {
        self.entries(parent).await?;
        let t = self.lock();
        let ino = *t.entries(parent)?.get(name).ok_or(FsError::NotFound)?;
        Ok(t.node(ino)?.attr(ino))
    }

    /// The entries of directory `ino` (without `.` and `..`), with their inodes and
    /// kinds; and the inode of its parent.
    pub async fn readdir(&self, ino: u64) -> Result<(u64, Vec<(u64, Kind, Vec<u8>)>), FsError> {
        self.entries(ino).await?;
        let t = self.lock();
        let Body::Dir { parent, .. } = &t.node(ino)?.body else { return Err(FsError::NotDir) };
        let list = t
            .entries(ino)?
            .iter()
            .map(|(name, &c)| Ok((c, t.node(c)?.kind, name.clone())))
            .collect::<Result<_, FsError>>()?;
        Ok((*parent, list))
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        match &self.lock().node(ino)?.body {
            Body::Symlink(target) => Ok(target.clone()),
            _ => Err(FsError::NotSymlink),
        }
    }

    /// Makes `name` in directory `parent`, owned by `uid`/`gid`.
    pub async fn make(&self, parent: u64, name: &[u8], new: New, uid: u32, gid: u32) -> Result<Attr, FsError> {
        check_name(name)?;
        self.entries(parent).await?;
        let mut t = self.lock();
        if t.entries(parent)?.contains_key(name) {
            return Err(FsError::Exists);
        }
        let (kind, perm, rdev, body) = match new {
            New::File { perm } => (Kind::File, perm, 0, Body::File(FileData::new(Blocks::new_file(), 0))),
            New::Dir { perm } => (Kind::Dir, perm, 0, Body::Dir { parent, entries: Some(BTreeMap::new()) }),
            New::Symlink { target } => (Kind::Symlink, 0o777, 0, Body::Symlink(target)),
            New::Special { kind, perm, rdev } => (kind, perm, rdev, Body::Special),
        };
        let nlink = if kind == Kind::Dir { 2 } else { 1 };
        let now = SystemTime::now();
        let node = Node { kind, perm: perm & 0o7777, uid, gid, rdev, nlink, mtime: now, lower: None, body, open: 0 };
        let ino = t.new_ino();
        let attr = node.attr(ino);
        t.nodes.insert(ino, node);
        t.entries_mut(parent)?.insert(name.to_vec(), ino);
        let dir = t.node_mut(parent)?;
        dir.mtime = now;
        if kind == Kind::Dir {
            dir.nlink += 1;
        }
        Ok(attr)
    }

    /// Removes the name of a file, link or special file.
    pub async fn unlink(&self, parent: u64, name: &[u8]) -> Result<(), FsError> {
        self.entries(parent).await?;
        let mut t = self.lock();
        let ino = *t.entries(parent)?.get(name).ok_or(FsError::NotFound)?;
        if t.node(ino)?.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        t.entries_mut(parent)?.remove(name);
        t.node_mut(parent)?.mtime = SystemTime::now();
        t.unlinked(ino);
        Ok(())
    }

    /// Removes an empty directory.
    pub async fn rmdir(&self, parent: u64, name: &[u8]) -> Result<(), FsError> {
        self.entries(parent).await?;
        let ino = *self.lock().entries(parent)?.get(name).ok_or(FsError::NotFound)?;
        self.entries(ino).await?;
        let mut t = self.lock();
        if t.entries(parent)?.get(name) != Some(&ino) {
            return Err(FsError::Os(libc::EBUSY, "the directory changed meanwhile".into()));
        }
        if !t.entries(ino)?.is_empty() {
            return Err(FsError::NotEmpty);
        }
        t.entries_mut(parent)?.remove(name);
        let dir = t.node_mut(parent)?;
        dir.mtime = SystemTime::now();
        dir.nlink = dir.nlink.saturating_sub(1);
        t.nodes.remove(&ino);
        Ok(())
    }

    /// Renames `parent`/`name` to `to`/`to_name`.
    pub async fn rename(
        &self,
        parent: u64,
        name: &[u8],
        to: u64,
        to_name: &[u8],
        replace: Replace,
    ) -> Result<(), FsError> {
        check_name(to_name)?;
        self.entries(parent).await?;
        self.entries(to).await?;
        // A directory replaced must be empty: its entries read first.
        let there = self.lock().entries(to)?.get(to_name).copied();
        if let Some(there) = there.filter(|&d| self.getattr(d).is_ok_and(|a| a.kind == Kind::Dir)) {
            self.entries(there).await?;
        }
        let mut t = self.lock();
        let ino = *t.entries(parent)?.get(name).ok_or(FsError::NotFound)?;
        let existing = t.entries(to)?.get(to_name).copied();
        if existing != there {
            return Err(FsError::Os(libc::EBUSY, "the directory changed meanwhile".into()));
        }
        if existing.is_some() && replace == Replace::No {
            return Err(FsError::Exists);
        }
        if existing == Some(ino) {
            return Ok(()); // two names of one file, or the same name: nothing to do
        }
        let is_dir = t.node(ino)?.kind == Kind::Dir;
        // A directory moved under itself would be cut off from the tree.
        if is_dir && t.is_within(to, ino)? {
            return Err(FsError::Invalid);
        }
        match (existing, replace) {
            (None, Replace::Exchange) => return Err(FsError::NotFound),
            (Some(_), Replace::No) => return Err(FsError::Exists),
            (Some(other), Replace::Exchange) => {
                let other_dir = t.node(other)?.kind == Kind::Dir;
                if other_dir && t.is_within(parent, other)? {
                    return Err(FsError::Invalid);
                }
                t.entries_mut(parent)?.insert(name.to_vec(), other);
                t.entries_mut(to)?.insert(to_name.to_vec(), ino);
                t.moved(other, other_dir, to, parent)?;
                t.moved(ino, is_dir, parent, to)?;
                return Ok(());
            }
            (Some(other), Replace::Yes) => {
                let other_node = t.node(other)?;
                match (is_dir, other_node.kind == Kind::Dir) {
                    (false, true) => return Err(FsError::IsDir),
                    (true, false) => return Err(FsError::NotDir),
                    (true, true) if !t.entries(other)?.is_empty() => return Err(FsError::NotEmpty),
                    _ => {}
                }
                if is_dir {
                    t.nodes.remove(&other);
                    let dir = t.node_mut(to)?;
                    dir.nlink = dir.nlink.saturating_sub(1);
                } else {
                    t.unlinked(other);
                }
            }
            (None, _) => {}
        }
        t.entries_mut(parent)?.remove(name);
        t.entries_mut(to)?.insert(to_name.to_vec(), ino);
        t.moved(ino, is_dir, parent, to)
    }

    /// Another name for file `ino`.
    pub async fn link(&self, ino: u64, to: u64, to_name: &[u8]) -> Result<Attr, FsError> {
        check_name(to_name)?;
        self.entries(to).await?;
        let mut t = self.lock();
        if t.node(ino)?.kind == Kind::Dir {
            return Err(FsError::Os(libc::EPERM, "a directory has one name".into()));
        }
        if t.entries(to)?.contains_key(to_name) {
            return Err(FsError::Exists);
        }
        t.entries_mut(to)?.insert(to_name.to_vec(), ino);
        t.node_mut(to)?.mtime = SystemTime::now();
        let node = t.node_mut(ino)?;
        node.nlink += 1;
        Ok(node.attr(ino))
    }

    pub async fn setattr(&self, ino: u64, set: SetAttr) -> Result<Attr, FsError> {
        if let Some(size) = set.size {
            let file = self.file(ino)?;
            let mut blocks = file.blocks.write().await;
            blocks.truncate(size, file.size.load(Ordering::Acquire))?;
            file.size.store(size, Ordering::Release);
        }
        let mut t = self.lock();
        let node = t.node_mut(ino)?;
        if let Some(perm) = set.perm {
            node.perm = perm & 0o7777;
        }
        node.uid = set.uid.unwrap_or(node.uid);
        node.gid = set.gid.unwrap_or(node.gid);
        if let Some(mtime) = set.mtime {
            node.mtime = mtime;
        } else if set.size.is_some() {
            node.mtime = SystemTime::now();
        }
        Ok(node.attr(ino))
    }

    fn file(&self, ino: u64) -> Result<Arc<FileData>, FsError> {
        match &self.lock().node(ino)?.body {
            Body::File(f) => Ok(f.clone()),
            Body::Dir { .. } => Err(FsError::IsDir),
            _ => Err(FsError::Invalid),
        }
    }

    /// Up to `size` bytes at `offset`.
    pub async fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let file = self.file(ino)?;
        let blocks = file.blocks.read().await;
        let len = file.size.load(Ordering::Acquire);
        let end = offset.saturating_add(size as u64).min(len);
        if offset >= end {
            return Ok(Vec::new());
        }
        blocks.read(&self.lower, offset..end).await
    }

    /// Writes `data` at `offset`, all of it.
    pub async fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        let file = self.file(ino)?;
        let mut blocks = file.blocks.write().await;
        let size = file.size.load(Ordering::Acquire);
        let new = blocks.write(&self.lower, &self.scratch, offset, data, size).await?;
        file.size.store(new, Ordering::Release);
        drop(blocks);
        if let Ok(node) = self.lock().node_mut(ino) {
            node.mtime = SystemTime::now();
        }
        Ok(data.len() as u32)
    }

    /// A handle to `ino` was opened.
    pub fn open(&self, ino: u64) -> Result<(), FsError> {
        self.lock().node_mut(ino)?.open += 1;
        Ok(())
    }

    /// A handle to `ino` was closed: a file with no name left goes with its last.
    pub fn release(&self, ino: u64) {
        let mut t = self.lock();
        if let Ok(node) = t.node_mut(ino) {
            node.open = node.open.saturating_sub(1);
            if node.open == 0 && node.nlink == 0 {
                t.nodes.remove(&ino);
            }
        }
    }

    /// Where the scratch files are: statfs answers for that filesystem.
    pub fn scratch(&self) -> &std::path::Path {
        &self.scratch
    }
}

impl Table {
    fn new_ino(&mut self) -> u64 {
        let ino = self.next;
        self.next += 1;
        ino
    }

    fn node(&self, ino: u64) -> Result<&Node, FsError> {
        self.nodes.get(&ino).ok_or(FsError::BadInode(ino))
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node, FsError> {
        self.nodes.get_mut(&ino).ok_or(FsError::BadInode(ino))
    }

    /// The entries of a directory whose entries were read.
    fn entries(&self, ino: u64) -> Result<&BTreeMap<Vec<u8>, u64>, FsError> {
        match &self.node(ino)?.body {
            Body::Dir { entries: Some(e), .. } => Ok(e),
            Body::Dir { entries: None, .. } => Err(FsError::Io(format!("directory {ino} not read yet"))),
            _ => Err(FsError::NotDir),
        }
    }

    fn entries_mut(&mut self, ino: u64) -> Result<&mut BTreeMap<Vec<u8>, u64>, FsError> {
        match &mut self.node_mut(ino)?.body {
            Body::Dir { entries: Some(e), .. } => Ok(e),
            Body::Dir { entries: None, .. } => Err(FsError::Io(format!("directory {ino} not read yet"))),
            _ => Err(FsError::NotDir),
        }
    }

    /// Whether directory `dir` is `ancestor` or lies under it.
    fn is_within(&self, mut dir: u64, ancestor: u64) -> Result<bool, FsError> {
        loop {
            if dir == ancestor {
                return Ok(true);
            }
            let Body::Dir { parent, .. } = &self.node(dir)?.body else { return Err(FsError::NotDir) };
            if *parent == dir {
                return Ok(false); // the top
            }
            dir = *parent;
        }
    }

    /// `ino` moved from directory `from` to `to`: a directory's parent and the
    /// link counts follow.
    fn moved(&mut self, ino: u64, is_dir: bool, from: u64, to: u64) -> Result<(), FsError> {
        let now = SystemTime::now();
        if is_dir {
            if let Body::Dir { parent, .. } = &mut self.node_mut(ino)?.body {
                *parent = to;
            }
            if from != to {
                self.node_mut(from)?.nlink = self.node(from)?.nlink.saturating_sub(1);
                self.node_mut(to)?.nlink += 1;
            }
        }
        self.node_mut(from)?.mtime = now;
        self.node_mut(to)?.mtime = now;
        Ok(())
    }

    /// A name of non-directory `ino` was removed.
    fn unlinked(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.nlink = node.nlink.saturating_sub(1);
            if node.nlink == 0 && node.open == 0 {
                self.nodes.remove(&ino);
            }
        }
    }
}

impl Node {
    /// A node for what the point holds at `attr` (`target` for a link), in `parent`.
    fn of_point(attr: &Attr, target: Option<Vec<u8>>, parent: u64, owner: Option<(u32, u32)>) -> Node {
        let body = match attr.kind {
            Kind::Dir => Body::Dir { parent, entries: None },
            Kind::File => Body::File(FileData::new(Blocks::of_point(attr.ino, attr.size), attr.size)),
            Kind::Symlink => Body::Symlink(target.unwrap_or_default()),
            _ => Body::Special,
        };
        let (uid, gid) = owner.unwrap_or((attr.uid, attr.gid));
        Node {
            kind: attr.kind,
            perm: attr.perm,
            uid,
            gid,
            rdev: attr.rdev,
            nlink: attr.nlink,
            mtime: attr.mtime,
            lower: Some(attr.ino),
            body,
            open: 0,
        }
    }

    fn attr(&self, ino: u64) -> Attr {
        let size = match &self.body {
            Body::File(f) => f.size.load(Ordering::Acquire),
            Body::Dir { .. } => 4096,
            Body::Symlink(t) => t.len() as u64,
            Body::Special => 0,
        };
        Attr {
            ino,
            kind: self.kind,
            size,
            blocks: size.div_ceil(512),
            perm: self.perm,
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: self.rdev,
            mtime: self.mtime,
            volatile: true,
        }
    }
}

impl FileData {
    fn new(blocks: Blocks, size: u64) -> Arc<FileData> {
        Arc::new(FileData { size: AtomicU64::new(size), blocks: tokio::sync::RwLock::new(blocks) })
    }
}

fn check_name(name: &[u8]) -> Result<(), FsError> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return Err(FsError::Invalid);
    }
    if name.len() > NAME_MAX {
        return Err(FsError::Os(libc::ENAMETOOLONG, "name too long".into()));
    }
    Ok(())
}
