//! The `fuser` adapter: translates kernel requests into calls on the async core and
//! its results into replies. Each request is answered from a tokio task, so slow
//! fetches never hold up other requests. Mounted read-only: the kernel answers every
//! write with EROFS.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    AccessFlags, BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use tokio::runtime::Handle;

use crate::error::FsError;
use crate::fs::{Attr, Fs, Kind};

/// Points never change: the kernel may cache what they show for long.
const TTL_FIXED: Duration = Duration::from_secs(3600);
/// Timeline directories gain points while mounted.
const TTL_VOLATILE: Duration = Duration::from_secs(1);

struct Adapter {
    fs: Arc<Fs>,
    rt: Handle,
}

pub(crate) fn ttl(a: &Attr) -> Duration {
    if a.volatile {
        TTL_VOLATILE
    } else {
        TTL_FIXED
    }
}

pub(crate) fn file_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
    }
}

pub(crate) fn attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 128 * 1024,
        flags: 0,
    }
}

pub(crate) fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

/// Replies to a getxattr/listxattr: the size when asked for it, ERANGE when the
/// caller's buffer is too small.
pub(crate) fn xattr_reply(reply: ReplyXattr, size: u32, r: Result<Vec<u8>, FsError>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(&e)),
    }
}

impl Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(1 << 20);
        // Not FUSE_CACHE_SYMLINKS: `<source>/latest` must follow new points.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_READ);
        // Listings carry every entry's attributes, so that reading each file of a
        // tree needs no lookup of its own.
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        // Answered here when nothing needs fetching: a task hand-off costs more.
        if let Some(r) = self.fs.lookup_now(parent.0, name.as_bytes()) {
            return match r {
                Ok(a) => reply.entry(&ttl(&a), &attr(&a), Generation(0)),
                Err(e) => reply.error(errno(&e)),
            };
        }
        let (fs, name) = (self.fs.clone(), name.as_bytes().to_vec());
        self.rt.spawn(async move {
            match fs.lookup(parent.0, &name).await {
                Ok(a) => reply.entry(&ttl(&a), &attr(&a), Generation(0)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if let Some(r) = self.fs.getattr_now(ino.0) {
            return match r {
                Ok(a) => reply.attr(&ttl(&a), &attr(&a)),
                Err(e) => reply.error(errno(&e)),
            };
        }
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            match fs.getattr(ino.0).await {
                Ok(a) => reply.attr(&ttl(&a), &attr(&a)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            match fs.readlink(ino.0).await {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Contents never change, so the kernel may keep what it cached across opens.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
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
        if let Some(r) = self.fs.read_now(ino.0, offset, size) {
            return match r {
                Ok(data) => data.with_slice(|d| reply.data(d)),
                Err(e) => reply.error(errno(&e)),
            };
        }
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            match fs.read(ino.0, offset, size).await {
                Ok(data) => data.with_slice(|d| reply.data(d)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: fuser::LockOwner, reply: ReplyEmpty) {
        // Nothing is ever written: ENOSYS tells the kernel not to send flush again,
        // which saves a round trip on every close.
        reply.error(Errno::ENOSYS);
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
        self.fs.forget_position(ino.0);
        reply.ok();
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            let entries = match fs.readdir(ino.0).await {
                Ok(e) => e,
                Err(e) => return reply.error(errno(&e)),
            };
            let dots = [(ino.0, Kind::Dir, b".".to_vec()), (crate::fs::ROOT, Kind::Dir, b"..".to_vec())];
            for (i, (child, kind, name)) in dots.into_iter().chain(entries).enumerate().skip(offset as usize) {
                if reply.add(INodeNo(child), (i + 1) as u64, file_type(kind), OsStr::from_bytes(&name)) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            let entries = match fs.readdir_plus(ino.0).await {
                Ok(e) => e,
                Err(e) => return reply.error(errno(&e)),
            };
            for (i, (a, name)) in entries.iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(a.ino), (i + 1) as u64, OsStr::from_bytes(name), &ttl(a), &attr(a), Generation(0))
                {
                    break;
                }
            }
            reply.ok();
        });
    }

    /// `lsattr`: FS_IOC_GETFLAGS gives the stored inode flags. Nothing else.
    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        if cmd != libc::FS_IOC_GETFLAGS as u32 {
            return reply.error(Errno::from_i32(libc::ENOTTY));
        }
        match self.fs.inode_flags(ino.0) {
            // As the kernel asks: an int, or a long.
            Ok(flags) => reply.ioctl(0, &u64::from(flags).to_ne_bytes()[..(out_size as usize).min(8)]),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn lseek(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        let r = match (u64::try_from(offset), whence) {
            (Ok(offset), libc::SEEK_DATA) => self.fs.seek(ino.0, offset, true),
            (Ok(offset), libc::SEEK_HOLE) => self.fs.seek(ino.0, offset, false),
            (Err(_), libc::SEEK_DATA | libc::SEEK_HOLE) => Err(FsError::NoSuchOffset),
            _ => Err(FsError::Invalid),
        };
        match r {
            Ok(at) => reply.offset(at as i64),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, self.fs.inodes(), 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let (fs, name) = (self.fs.clone(), name.as_bytes().to_vec());
        self.rt.spawn(async move { xattr_reply(reply, size, fs.getxattr(ino.0, &name).await) });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let fs = self.fs.clone();
        self.rt.spawn(async move { xattr_reply(reply, size, fs.listxattr(ino.0).await) });
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }
}

/// A mounted filesystem; dropping it unmounts.
pub struct MountHandle {
    session: Option<BackgroundSession>,
}

impl MountHandle {
    pub(crate) fn new(session: BackgroundSession) -> MountHandle {
        MountHandle { session: Some(session) }
    }

    /// Whether the kernel side has gone away (e.g. `ebb umount` or `fusermount3 -u`).
    pub fn finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// Unmounts, unless someone did already (`ebb umount`): the kernel may have let
    /// go of the mountpoint before the session's threads have noticed, and then the
    /// unmount finds nothing there (EINVAL), which is the outcome wanted.
    pub fn unmount(mut self) -> std::io::Result<()> {
        match self.session.take() {
            Some(s) if !s.guard.is_finished() => match s.umount_and_join() {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
                r => r,
            },
            _ => Ok(()),
        }
    }
}

impl MountHandle {
    /// Ends once the mount is no longer at its path (unmounted, or detached by a
    /// lazy unmount) without unmounting anything: what is mounted at the path now
    /// may be a newer mount, which an unmount by path would take away. The session
    /// is left to end with the process.
    pub fn abandon(mut self) {
        if let Some(s) = self.session.take() {
            std::mem::forget(s);
        }
    }
}

/// Mounts `fs` read-only at `mountpoint`; requests are served on `rt`.
pub fn mount(fs: Arc<Fs>, rt: Handle, mountpoint: &Path, fsname: &str) -> std::io::Result<MountHandle> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(fsname.to_string()),
        MountOption::Subtype("ebb".to_string()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    // Two threads read requests (each with its own fd), so that requests answered
    // on the spot do not wait for each other.
    config.n_threads = Some(2);
    config.clone_fd = true;
    let session = fuser::spawn_mount(Adapter { fs, rt }, mountpoint, &config)?;
    Ok(MountHandle::new(session))
}
