//! The target directory: whether a restore may write there, temporary names for
//! files being written, and, when restoring over an existing tree (`overwrite`),
//! what is already there: entries to remove, and files already as the point has them.

use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use super::error::RestoreError;
use crate::crypto::Keys;
use crate::id::random_bytes;
use crate::tree::{Entry, Extent};

/// Makes `target` ready: created if missing; an existing one must be an empty
/// directory unless `overwrite`, when any directory will do.
pub(super) fn prepare(target: &Path, overwrite: bool) -> Result<(), RestoreError> {
    let io = |op, cause| RestoreError::Io { op, path: target.to_path_buf(), cause };
    match fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => {
            if !overwrite && fs::read_dir(target).map_err(|e| io("read", e))?.next().is_some() {
                return Err(RestoreError::TargetNotEmpty(target.to_path_buf()));
            }
            Ok(())
        }
        Ok(_) => Err(RestoreError::TargetNotDirectory(target.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir_all(target).map_err(|e| io("create", e)),
        Err(e) => Err(io("stat", e)),
    }
}

/// Where files live while they are written, in the directory they belong to:
/// unnamed (`O_TMPFILE`) where the filesystem allows it, else under a temporary
/// name, `.ebb-restore-<random>-<n>`. A file gets its real name only once
/// complete, so an interrupted restore leaves no file with wrong bytes under a
/// name of the point: an unnamed file vanishes with the process, and a restore run
/// again over the tree (`overwrite`) removes temporary names, which the point does
/// not have. An unnamed file also costs the directory one entry made instead of a
/// name made and then renamed.
pub(super) struct TempNames {
    run: String,
    next: AtomicU64,
    /// Unnamed files: not tried yet (`UNTRIED`), named through their descriptor
    /// (`BY_FD`) or through /proc (`BY_PROC`), or not made (`NAMED_ONLY`).
    unnamed: AtomicU8,
}

/// A file being written: unnamed, or under a temporary name.
pub(super) enum Temp {
    Unnamed,
    Named(PathBuf),
}

impl TempNames {
    pub fn new() -> TempNames {
        TempNames { run: hex::encode(random_bytes::<4>()), next: AtomicU64::new(0), unnamed: AtomicU8::new(UNTRIED) }
    }

    /// Creates a new file, for writing only, in `dir`.
    pub fn create(&self, dir: &Path) -> io::Result<(Temp, fs::File)> {
        if self.unnamed.load(Ordering::Relaxed) == UNTRIED {
            // Tried once, a file made and named: then every file can be, the same way.
            let how = [BY_FD, BY_PROC].into_iter().find(|&how| self.probe(dir, how).is_ok());
            self.unnamed.store(how.unwrap_or(NAMED_ONLY), Ordering::Relaxed);
        }
        if self.unnamed.load(Ordering::Relaxed) != NAMED_ONLY {
            match unnamed_file(dir) {
                Ok(f) => return Ok((Temp::Unnamed, f)),
                // Another filesystem below the target, perhaps: a name then.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)) => {}
                Err(e) => return Err(e),
            }
        }
        let (path, f) = self.named(dir)?;
        Ok((Temp::Named(path), f))
    }

    /// Gives the complete file `f` (made by `create`) its name `path`, replacing
    /// what is there.
    pub fn name(&self, temp: &Temp, f: &fs::File, path: &Path) -> io::Result<()> {
        match temp {
            Temp::Named(tmp) => fs::rename(tmp, path),
            Temp::Unnamed => match link(f, path, self.unnamed.load(Ordering::Relaxed)) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    // Replaced at once, never missing: a name of its own, then a rename.
                    let dir = path.parent().unwrap_or(Path::new("."));
                    let tmp = self.link_temporary(f, dir, self.unnamed.load(Ordering::Relaxed))?;
                    fs::rename(&tmp, path).inspect_err(|_| {
                        let _ = fs::remove_file(&tmp);
                    })
                }
                other => other,
            },
        }
    }

    /// Drops a file given up.
    pub fn discard(&self, temp: &Temp) {
        if let Temp::Named(tmp) = temp {
            let _ = fs::remove_file(tmp);
        }
    }

    fn named(&self, dir: &Path) -> io::Result<(PathBuf, fs::File)> {
        loop {
            let path = self.next_name(dir);
            match fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
                Ok(f) => return Ok((path, f)),
                // A name of the point itself, restored earlier: take the next.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn next_name(&self, dir: &Path) -> PathBuf {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        dir.join(format!(".ebb-restore-{}-{n:x}", self.run))
    }

    /// Links the unnamed file `f` under a temporary name in `dir`, `how` (`link`).
    fn link_temporary(&self, f: &fs::File, dir: &Path, how: u8) -> io::Result<PathBuf> {
        loop {
            let tmp = self.next_name(dir);
            match link(f, &tmp, how) {
                Ok(()) => return Ok(tmp),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Makes an unnamed file in `dir`, names it `how` and removes it again.
    fn probe(&self, dir: &Path, how: u8) -> io::Result<()> {
        let f = unnamed_file(dir)?;
        let tmp = self.link_temporary(&f, dir, how)?;
        fs::remove_file(tmp)
    }
}

/// A new file without a name in `dir`, for writing only.
fn unnamed_file(dir: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new().write(true).custom_flags(libc::O_TMPFILE).mode(0o600).open(dir)
}

const UNTRIED: u8 = 0;
const BY_FD: u8 = 1;
const BY_PROC: u8 = 2;
const NAMED_ONLY: u8 = 3;

/// Gives the unnamed file `f` the name `path` (which must be free): through its
/// descriptor (`BY_FD`, which needs a capability root has), or through /proc
/// (`BY_PROC`, which needs /proc).
fn link(f: &fs::File, path: &Path, how: u8) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let to = super::meta::cpath(path);
    let rc = if how == BY_FD {
        // SAFETY: an empty C string and a valid NUL-terminated path; linkat reads them.
        unsafe { libc::linkat(f.as_raw_fd(), c"".as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::AT_EMPTY_PATH) }
    } else {
        let from = std::ffi::CString::new(format!("/proc/self/fd/{}", f.as_raw_fd())).expect("no NUL in a number");
        // SAFETY: two valid NUL-terminated paths; linkat reads them.
        unsafe { libc::linkat(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::AT_SYMLINK_FOLLOW) }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes whatever is at `path`, a directory with all it holds.
pub(super) fn remove(path: &Path, meta: &fs::Metadata) -> io::Result<()> {
    if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

/// Whether the regular file `meta` describes has the size and modification time
/// of `e`: the cheap test before `same_content`.
pub(super) fn same_size_and_time(meta: &fs::Metadata, e: &Entry) -> bool {
    meta.file_type().is_file()
        && meta.len() == e.size
        && meta.mtime() == e.mtime.sec
        && meta.mtime_nsec() == i64::from(e.mtime.nsec)
}

/// Whether the file at `path` holds exactly `e`'s content: each chunk's bytes have
/// its content id, and holes are holes (restore makes them so, and the file is not
/// the same if its holes were filled). Reads the local file, which costs far less
/// than fetching and decrypting it.
pub(super) fn same_content(path: &Path, e: &Entry, keys: &Keys) -> bool {
    let check = || -> io::Result<bool> {
        let f = fs::File::open(path)?;
        if f.metadata()?.len() != e.size {
            return Ok(false);
        }
        let mut buf = Vec::new();
        let mut pos = 0u64;
        for ext in &e.content {
            let same = match ext {
                // Chunks are at most a few MiB; a larger one is no chunk ebb made.
                Extent::Data(b) if b.raw_len > MAX_CHUNK => false,
                Extent::Data(b) => {
                    buf.resize(b.raw_len as usize, 0);
                    f.read_exact_at(&mut buf, pos)?;
                    keys.content_id(&buf) == b.id
                }
                Extent::Hole(n) => next_data(&f, pos)?.is_none_or(|d| d >= pos + n),
            };
            if !same {
                return Ok(false);
            }
            pos += ext.len();
        }
        Ok(true)
    };
    check().unwrap_or(false)
}

const MAX_CHUNK: u32 = 64 << 20;

/// Where the first data at or after `pos` is, if any.
fn next_data(f: &fs::File, pos: u64) -> io::Result<Option<u64>> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: lseek only moves the offset of the descriptor we own.
    let at = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
    if at >= 0 {
        return Ok(Some(at as u64));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        n.sort();
        n
    }

    /// Both ways of writing a file before it has its name: it shows up only once
    /// named, with its bytes, over what the name held; a file given up leaves
    /// nothing.
    #[test]
    fn a_file_appears_under_its_name_only_when_named() {
        for unnamed in [BY_FD, BY_PROC, NAMED_ONLY] {
            let dir = tempfile::tempdir().unwrap();
            let temps = TempNames::new();
            temps.unnamed.store(unnamed, Ordering::Relaxed);
            let (temp, mut f) = temps.create(dir.path()).unwrap();
            assert_eq!(matches!(temp, Temp::Unnamed), unnamed != NAMED_ONLY);
            f.write_all(b"new bytes").unwrap();
            let visible = names(dir.path());
            assert!(visible.iter().all(|n| n.starts_with(".ebb-restore-")), "{visible:?}");

            // Over an existing file: replaced, never missing.
            fs::write(dir.path().join("a"), b"old").unwrap();
            temps.name(&temp, &f, &dir.path().join("a")).unwrap();
            assert_eq!(fs::read(dir.path().join("a")).unwrap(), b"new bytes");
            assert_eq!(names(dir.path()), ["a"], "no temporary name is left");

            let (temp, f) = temps.create(dir.path()).unwrap();
            temps.name(&temp, &f, &dir.path().join("b")).unwrap();
            assert_eq!(names(dir.path()), ["a", "b"]);

            let (temp, _f) = temps.create(dir.path()).unwrap();
            temps.discard(&temp);
            drop(_f);
            assert_eq!(names(dir.path()), ["a", "b"], "a file given up leaves nothing");
        }
    }

    /// On a filesystem that has unnamed files, restore uses them.
    #[test]
    fn unnamed_files_are_used_where_the_filesystem_has_them() {
        let dir = tempfile::tempdir().unwrap();
        let supported = unnamed_file(dir.path()).is_ok();
        let temps = TempNames::new();
        let (temp, _) = temps.create(dir.path()).unwrap();
        assert_eq!(matches!(temp, Temp::Unnamed), supported);
        assert!(names(dir.path()).is_empty() || !supported);
    }
}
