//! The `fuser` adapter of a branch: kernel requests, writes included, as calls on
//! `Branch`; those that may wait (for a fetch, a lock) are answered from a tokio
//! task. Mounted read-write with
//! `default_permissions`, so that the kernel checks access against the
//! attributes shown, and, when asked, `allow_other` (a server started as another
//! user than the one who mounted).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    Config, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, MountOption,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;

use crate::branch::{Branch, New, Replace, SetAttr};
use crate::error::FsError;
use crate::fs::Kind;
use crate::fuse::{attr, errno, file_type, ttl, MountHandle};

/// The largest write the kernel sends at once.
const MAX_WRITE: u32 = 1 << 20;

/// A directory's entries as they were when it was opened, `.` and `..` first.
type Listing = Vec<(u64, Kind, Vec<u8>)>;

struct Adapter {
    branch: Arc<Branch>,
    rt: Handle,
    /// Each open directory's listing, by handle: reading it in several calls while
    /// names come and go (PostgreSQL lists a directory and unlinks as it goes)
    /// neither skips nor repeats an entry.
    dirs: Arc<std::sync::Mutex<std::collections::HashMap<u64, Arc<Listing>>>>,
    next_dir: std::sync::atomic::AtomicU64,
}

/// Answers `reply` with the attributes of what `r` made or found.
fn entry(reply: ReplyEntry, r: Result<crate::fs::Attr, FsError>) {
    match r {
        Ok(a) => reply.entry(&ttl(&a), &attr(&a), Generation(0)),
        Err(e) => reply.error(errno(&e)),
    }
}

fn empty(reply: ReplyEmpty, r: Result<(), FsError>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

/// What `mknod` makes of `mode`'s file type.
fn special(mode: u32) -> Result<Kind, FsError> {
    match mode & libc::S_IFMT {
        libc::S_IFREG => Ok(Kind::File),
        libc::S_IFIFO => Ok(Kind::Fifo),
        libc::S_IFSOCK => Ok(Kind::Socket),
        libc::S_IFCHR => Ok(Kind::CharDevice),
        libc::S_IFBLK => Ok(Kind::BlockDevice),
        _ => Err(FsError::Invalid),
    }
}

fn perm(mode: u32, umask: u32) -> u16 {
    (mode & !umask & 0o7777) as u16
}

impl Filesystem for Adapter {
    /// With the kernel's writeback cache: a write lands in the page cache and
    /// reaches the branch later, in the background, as it does on a disk (each
    /// 8 KiB page PostgreSQL wrote back was a round trip to this process, and
    /// took a quarter of a recovery). Only this mount changes its files, so the
    /// kernel's own idea of their sizes and times is right.
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(1 << 20);
        // A symlink never changes (a new one is a new inode): the kernel keeps its
        // target rather than asking on every path through it (pg_wal).
        let _ = config.add_capabilities(
            InitFlags::FUSE_ASYNC_READ
                | InitFlags::FUSE_BIG_WRITES
                | InitFlags::FUSE_WRITEBACK_CACHE
                | InitFlags::FUSE_CACHE_SYMLINKS,
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (b, name) = (self.branch.clone(), name.as_bytes().to_vec());
        self.rt.spawn(async move { entry(reply, b.lookup(parent.0, &name).await) });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.branch.getattr(ino.0) {
            Ok(a) => reply.attr(&ttl(&a), &attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            perm: mode.map(|m| (m & 0o7777) as u16),
            uid,
            gid,
            size,
            mtime: mtime.map(|t| match t {
                TimeOrNow::SpecificTime(t) => t,
                TimeOrNow::Now => SystemTime::now(),
            }),
        };
        let b = self.branch.clone();
        self.rt.spawn(async move {
            match b.setattr(ino.0, set).await {
                Ok(a) => reply.attr(&ttl(&a), &attr(&a)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.branch.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let new = match special(mode) {
            Ok(Kind::File) => New::File { perm: perm(mode, umask) },
            Ok(kind) => New::Special { kind, perm: perm(mode, umask), rdev },
            Err(e) => return reply.error(errno(&e)),
        };
        self.make(req, parent, name, new, reply);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        self.make(req, parent, name, New::Dir { perm: perm(mode, umask) }, reply);
    }

    fn symlink(&self, req: &Request, parent: INodeNo, name: &OsStr, target: &Path, reply: ReplyEntry) {
        self.make(req, parent, name, New::Symlink { target: target.as_os_str().as_bytes().to_vec() }, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (b, name) = (self.branch.clone(), name.as_bytes().to_vec());
        self.rt.spawn(async move { empty(reply, b.unlink(parent.0, &name).await) });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (b, name) = (self.branch.clone(), name.as_bytes().to_vec());
        self.rt.spawn(async move { empty(reply, b.rmdir(parent.0, &name).await) });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let replace = if flags.is_empty() {
            Replace::Yes
        } else if flags == RenameFlags::RENAME_NOREPLACE {
            Replace::No
        } else if flags == RenameFlags::RENAME_EXCHANGE {
            Replace::Exchange
        } else {
            return reply.error(Errno::from_i32(libc::EINVAL));
        };
        let (b, name, newname) = (self.branch.clone(), name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        self.rt.spawn(async move { empty(reply, b.rename(parent.0, &name, newparent.0, &newname, replace).await) });
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let (b, name) = (self.branch.clone(), newname.as_bytes().to_vec());
        self.rt.spawn(async move { entry(reply, b.link(ino.0, newparent.0, &name).await) });
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.branch.open(ino.0) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let (b, name) = (self.branch.clone(), name.as_bytes().to_vec());
        let (uid, gid, new) = (req.uid(), req.gid(), New::File { perm: perm(mode, umask) });
        self.rt.spawn(async move {
            match b.make(parent.0, &name, new, uid, gid).await.and_then(|a| b.open(a.ino).map(|()| a)) {
                Ok(a) => reply.created(&ttl(&a), &attr(&a), Generation(0), FileHandle(0), FopenFlags::empty()),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let b = self.branch.clone();
        self.rt.spawn(async move {
            match b.read(ino.0, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let (b, data) = (self.branch.clone(), data.to_vec());
        self.rt.spawn(async move {
            match b.write(ino.0, offset, &data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: fuser::LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.branch.release(ino.0);
        reply.ok();
    }

    /// A branch is thrown away when it ends: there is nothing to make durable.
    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let (b, dirs) = (self.branch.clone(), self.dirs.clone());
        let fh = self.next_dir.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.rt.spawn(async move {
            match b.readdir(ino.0).await {
                Ok((parent, entries)) => {
                    let mut all = vec![(ino.0, Kind::Dir, b".".to_vec()), (parent, Kind::Dir, b"..".to_vec())];
                    all.extend(entries);
                    dirs.lock().expect("open directories").insert(fh, Arc::new(all));
                    reply.opened(FileHandle(fh), FopenFlags::empty());
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(listing) = self.dirs.lock().expect("open directories").get(&fh.0).cloned() else {
            return reply.error(Errno::from_i32(libc::EBADF));
        };
        for (i, (child, kind, name)) in listing.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*child), (i + 1) as u64, file_type(*kind), OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.dirs.lock().expect("open directories").remove(&fh.0);
        reply.ok();
    }

    /// The filesystem of the scratch files: what can still be written.
    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match statvfs(self.branch.scratch()) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                255,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))),
        }
    }

    /// No extended attributes: before every write to a file the kernel asks for
    /// its `security.capability` (to drop it), a round trip each unless told
    /// once that there are none to ask for (ENOSYS, which it remembers). It was
    /// 42,000 round trips, each holding up a write, in a minute of replay.
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::from_i32(libc::ENOSYS));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::from_i32(libc::ENOSYS));
    }
}

impl Adapter {
    fn make(&self, req: &Request, parent: INodeNo, name: &OsStr, new: New, reply: ReplyEntry) {
        let (b, name, uid, gid) = (self.branch.clone(), name.as_bytes().to_vec(), req.uid(), req.gid());
        self.rt.spawn(async move { entry(reply, b.make(parent.0, &name, new, uid, gid).await) });
    }
}

fn statvfs(path: &Path) -> std::io::Result<libc::statvfs> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `s` is written in full on success.
    if unsafe { libc::statvfs(c.as_ptr(), s.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded.
    Ok(unsafe { s.assume_init() })
}

/// Mounts `branch` read-write at `mountpoint`; requests are served on `rt`.
/// `allow_other` lets users other than the one mounting in (the kernel still
/// checks each file's permissions).
pub fn mount_branch(
    branch: Arc<Branch>,
    rt: Handle,
    mountpoint: &Path,
    fsname: &str,
    allow_other: bool,
) -> std::io::Result<MountHandle> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RW,
        MountOption::FSName(fsname.to_string()),
        MountOption::Subtype("ebb".to_string()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    if allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(2);
    config.clone_fd = true;
    let adapter = Adapter { branch, rt, dirs: Default::default(), next_dir: Default::default() };
    let session = fuser::spawn_mount(adapter, mountpoint, &config)?;
    Ok(MountHandle::new(session))
}
