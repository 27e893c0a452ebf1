//! Metadata of restored entries: extended attributes, ownership, mode and times,
//! by path or, for a file still open, by its descriptor; and inode flags, set last.

use std::ffi::{CString, OsStr};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::tree::{Entry, EntryKind, Timestamp};

/// Applies `e`'s metadata to `path`; what cannot be applied becomes a warning.
/// Inode flags are not set here (see `set_inode_flags`).
pub(super) fn apply(path: &Path, e: &Entry, warnings: &mut Vec<String>) {
    for (k, v) in &e.xattrs {
        if let Err(err) = xattr::set(path, OsStr::from_bytes(k), v) {
            warnings.push(format!("{}: extended attribute {}: {err}", path.display(), String::from_utf8_lossy(k)));
        }
    }
    let c = cpath(path);
    // SAFETY: valid NUL-terminated path; lchown does not follow symlinks.
    if unsafe { libc::lchown(c.as_ptr(), e.uid, e.gid) } != 0 {
        chown_failed(path, e, std::io::Error::last_os_error(), warnings);
    }
    if e.kind != EntryKind::Symlink {
        if let Err(err) = fs::set_permissions(path, fs::Permissions::from_mode(e.mode)) {
            warnings.push(format!("{}: chmod {:o}: {err}", path.display(), e.mode));
        }
    }
    let ts = times(e.mtime);
    // SAFETY: valid path and a two-element timespec array, as utimensat requires.
    if unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        warnings.push(format!("{}: set times: {}", path.display(), std::io::Error::last_os_error()));
    }
}

/// `apply` for a regular file still open for writing (`path` names it in warnings):
/// no path lookups, which count when a restore makes a million small files.
/// `made_as`: the user and group the file was created with, when known (its
/// directory has no setgid bit): it needs no chown to have them.
pub(super) fn apply_to_file(
    f: &fs::File,
    path: &Path,
    e: &Entry,
    made_as: Option<(u32, u32)>,
    warnings: &mut Vec<String>,
) {
    use xattr::FileExt;
    for (k, v) in &e.xattrs {
        if let Err(err) = f.set_xattr(OsStr::from_bytes(k), v) {
            warnings.push(format!("{}: extended attribute {}: {err}", path.display(), String::from_utf8_lossy(k)));
        }
    }
    let fd = f.as_raw_fd();
    // SAFETY: fchown, fchmod and futimens only act on the descriptor we own and read
    // the two-element timespec array we pass.
    if made_as != Some((e.uid, e.gid)) && unsafe { libc::fchown(fd, e.uid, e.gid) } != 0 {
        chown_failed(path, e, std::io::Error::last_os_error(), warnings);
    }
    if unsafe { libc::fchmod(fd, e.mode as libc::mode_t) } != 0 {
        warnings.push(format!("{}: chmod {:o}: {}", path.display(), e.mode, std::io::Error::last_os_error()));
    }
    let ts = times(e.mtime);
    if unsafe { libc::futimens(fd, ts.as_ptr()) } != 0 {
        warnings.push(format!("{}: set times: {}", path.display(), std::io::Error::last_os_error()));
    }
}

fn chown_failed(path: &Path, e: &Entry, err: std::io::Error, warnings: &mut Vec<String>) {
    // Without root, files are restored as the user's own: not worth a warning each.
    if nix::unistd::geteuid().is_root() {
        warnings.push(format!("{}: chown {}:{}: {err}", path.display(), e.uid, e.gid));
    }
}

fn times(t: Timestamp) -> [libc::timespec; 2] {
    let ts = libc::timespec { tv_sec: t.sec as libc::time_t, tv_nsec: t.nsec as libc::c_long };
    [ts, ts]
}

/// Sets the inode flags of `path` to `flags` (within `KEPT_FLAGS`), keeping those
/// the target's filesystem manages.
pub(super) fn set_inode_flags(path: &Path, flags: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW).open(path)?;
    let mut current: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes at most a long into `current`, which we own.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut current) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let new: libc::c_long = (current & !(crate::tree::KEPT_FLAGS as libc::c_long)) | flags as libc::c_long;
    // SAFETY: FS_IOC_SETFLAGS reads a long from `new`.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &new) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub(super) fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("paths built from tree names have no NUL")
}
