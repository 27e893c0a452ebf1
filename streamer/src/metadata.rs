//! Reading an entry's metadata and content layout from the local filesystem.

use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use catalog::tree::{Entry, EntryKind, Timestamp};

/// Builds an entry from `lstat` data; content and subtree are filled in later.
pub fn entry_from(name: &[u8], path: &Path, m: &Metadata) -> Option<Entry> {
    let ft = m.file_type();
    let kind = if ft.is_file() {
        EntryKind::File
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_fifo() {
        EntryKind::Fifo
    } else if ft.is_socket() {
        EntryKind::Socket
    } else if ft.is_char_device() {
        EntryKind::CharDevice
    } else if ft.is_block_device() {
        EntryKind::BlockDevice
    } else {
        return None;
    };
    let mut e = Entry::new(name.to_vec(), kind);
    e.mode = m.mode() & 0o7777;
    e.uid = m.uid();
    e.gid = m.gid();
    e.size = if kind == EntryKind::File { m.size() } else { 0 };
    e.mtime = Timestamp { sec: m.mtime(), nsec: m.mtime_nsec() as u32 };
    e.ctime = Timestamp { sec: m.ctime(), nsec: m.ctime_nsec() as u32 };
    e.inode = m.ino();
    e.device = m.dev();
    e.nlink = m.nlink() as u32;
    if matches!(kind, EntryKind::CharDevice | EntryKind::BlockDevice) {
        e.rdev = m.rdev();
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

pub fn name_bytes(name: &OsStr) -> &[u8] {
    name.as_bytes()
}

/// The data regions of a file, as (offset, length), found with SEEK_DATA/SEEK_HOLE;
/// everything between them is a hole. Filesystems without hole support report one
/// region covering the whole file.
pub fn data_regions(f: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let end = size as i64;
    while pos < end {
        // SAFETY: lseek on a file descriptor we own; it does not touch memory.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENXIO) => Ok(out), // only a hole remains
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) if out.is_empty() => Ok(vec![(0, size)]),
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
