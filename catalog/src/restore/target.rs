//! The target directory: whether a restore may write there, temporary names for
//! files being written, and, when restoring over an existing tree (`overwrite`),
//! what is already there: entries to remove, and files already as the point has them.

use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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

/// Names for files while they are written, in the directory they belong to:
/// `.ebb-restore-<random>-<n>`. A file gets its real name only once complete, so an
/// interrupted restore leaves no file with wrong bytes under a name of the point,
/// and a restore run again over it (`overwrite`) removes these, which the point
/// does not have.
pub(super) struct TempNames {
    run: String,
    next: AtomicU64,
}

impl TempNames {
    pub fn new() -> TempNames {
        TempNames { run: hex::encode(random_bytes::<4>()), next: AtomicU64::new(0) }
    }

    /// Creates a new file, for writing only, under a temporary name in `dir`.
    pub fn create(&self, dir: &Path) -> io::Result<(PathBuf, fs::File)> {
        loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!(".ebb-restore-{}-{n:x}", self.run));
            match fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
                Ok(f) => return Ok((path, f)),
                // A name of the point itself, restored earlier: take the next.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
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
