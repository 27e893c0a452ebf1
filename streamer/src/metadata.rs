//! Reading an entry's metadata and content layout from the local filesystem.

use std::ffi::{CString, OsStr};
use std::fs::{File, Metadata};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use catalog::tree::{Entry, EntryKind, Timestamp};

/// Builds an entry from `lstat` data; content and subtree are filled in later.
/// `None` for a file type the format cannot hold.
pub fn entry_from(name: &[u8], path: &Path, m: &Metadata) -> Option<Entry> {
    let st = Stat {
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        size: m.size(),
        mtime: Timestamp { sec: m.mtime(), nsec: m.mtime_nsec() as u32 },
        ctime: Timestamp { sec: m.ctime(), nsec: m.ctime_nsec() as u32 },
        ino: m.ino(),
        dev: m.dev(),
        nlink: m.nlink(),
        rdev: m.rdev(),
    };
    entry_from_stat(name, path, &st)
}

/// The `lstat` fields an entry keeps.
pub struct Stat {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: Timestamp,
    ctime: Timestamp,
    ino: u64,
    dev: u64,
    nlink: u64,
    rdev: u64,
}

/// `lstat` of `name` in the open directory `dir`: no walk of the whole path, which
/// on a deep tree costs more than the stat itself.
pub fn stat_at(dir: &File, name: &OsStr) -> std::io::Result<Stat> {
    let c = CString::new(name.as_bytes()).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: a valid directory fd, a NUL-terminated name, and room for one stat.
    let rc = unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), st.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fstatat succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Ok(Stat {
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u64,
        mtime: Timestamp { sec: st.st_mtime, nsec: st.st_mtime_nsec as u32 },
        ctime: Timestamp { sec: st.st_ctime, nsec: st.st_ctime_nsec as u32 },
        ino: st.st_ino,
        dev: st.st_dev,
        nlink: st.st_nlink,
        rdev: st.st_rdev,
    })
}

impl Stat {
    pub fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }
}

pub fn entry_from_stat(name: &[u8], path: &Path, st: &Stat) -> Option<Entry> {
    let kind = match st.mode & libc::S_IFMT {
        libc::S_IFREG => EntryKind::File,
        libc::S_IFDIR => EntryKind::Dir,
        libc::S_IFLNK => EntryKind::Symlink,
        libc::S_IFIFO => EntryKind::Fifo,
        libc::S_IFSOCK => EntryKind::Socket,
        libc::S_IFCHR => EntryKind::CharDevice,
        libc::S_IFBLK => EntryKind::BlockDevice,
        _ => return None,
    };
    let mut e = Entry::new(name.to_vec(), kind);
    e.mode = st.mode & 0o7777;
    e.uid = st.uid;
    e.gid = st.gid;
    // Files: the content length. Directories: what the host's filesystem reports, so a
    // mount can show it (`du --apparent-size`). Other kinds: 0.
    e.size = if matches!(kind, EntryKind::File | EntryKind::Dir) { st.size } else { 0 };
    e.mtime = st.mtime;
    e.ctime = st.ctime;
    e.inode = st.ino;
    e.device = st.dev;
    e.nlink = u32::try_from(st.nlink).unwrap_or(u32::MAX);
    if matches!(kind, EntryKind::CharDevice | EntryKind::BlockDevice) {
        e.rdev = st.rdev;
    }
    e.xattrs = read_xattrs(path);
    Some(e)
}

/// Extended attributes, without following symlinks. A filesystem without xattr
/// support simply has none.
fn read_xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let Ok(names) = xattr::list(path) else { return Vec::new() };
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = names
        .filter_map(|n| {
            let v = xattr::get(path, &n).ok().flatten()?;
            Some((n.as_bytes().to_vec(), v))
        })
        .collect();
    out.sort();
    out
}

/// Opens a regular file for reading without ever blocking in `open` (a FIFO or a
/// device put where a file was would), and without touching its access time where
/// the process may ask that. Anything but a regular file is refused.
pub fn open_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |flags| std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | flags).open(path);
    // O_NOATIME is for the owner (or root) only.
    let f = open(libc::O_NOATIME).or_else(|_| open(0))?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file (any more)"));
    }
    Ok(f)
}

/// Opens a directory, refusing anything else without blocking on it.
pub fn open_dir(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_NONBLOCK).open(path)
}

/// The inode flags of an open file or directory (`FS_IOC_GETFLAGS`, what `lsattr`
/// shows) that a tree keeps; 0 where the filesystem has none.
pub fn inode_flags(f: &File) -> u32 {
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes at most a long into `flags`, which we own.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    if rc == 0 {
        flags as u32 & catalog::tree::KEPT_FLAGS
    } else {
        0
    }
}

pub fn name_bytes(name: &OsStr) -> &[u8] {
    name.as_bytes()
}

/// The data regions of a file from `from` on, as (offset, length), found with SEEK_DATA/SEEK_HOLE;
/// everything between them is a hole. Filesystems without hole support report one
/// region covering the whole file.
pub fn data_regions(f: &File, from: u64, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = from as i64;
    let end = size as i64;
    while pos < end {
        // SAFETY: lseek on a file descriptor we own; it does not touch memory.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENXIO) => Ok(out), // only a hole remains
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) if out.is_empty() => Ok(vec![(from, size - from)]),
                _ => Err(err),
            };
        }
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = hole.min(end);
        out.push((data as u64, (hole - data) as u64));
        pos = hole;
    }
    Ok(out)
}
