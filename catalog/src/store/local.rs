//! The local filesystem's fast paths of a `file://` store: ranged reads that
//! bypass the page cache and are bounded by the file's size, listings that read
//! names without a stat each, and directory fsyncs.

use std::ops::Range;
use std::path::PathBuf;

use bytes::Bytes;

use super::error::StoreError;

/// Whether a file name is a put in progress on the local filesystem (`<name>#<n>`),
/// which listings do not show.
pub(super) fn is_staged(name: &str) -> bool {
    name.rsplit_once('#').is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Reads `range` of a local file without the page cache (O_DIRECT), into a buffer of
/// its own that the result slices: no copy out of the page cache, and pack bytes do
/// not crowd the cache of what a mount decrypted from them. The disk reads straight
/// into memory. Filesystems without O_DIRECT (tmpfs) are read the ordinary way.
pub(super) fn read_range_direct(path: &std::path::Path, range: Range<u64>) -> std::io::Result<Bytes> {
    use std::os::unix::fs::OpenOptionsExt;
    const ALIGN: u64 = 4096;
    let file = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return read_range_buffered(path, range),
        r => r?,
    };
    let range = within(&file, range)?;
    if range.is_empty() {
        return Ok(Bytes::new());
    }
    let start = range.start & !(ALIGN - 1);
    let end = range.end.div_ceil(ALIGN) * ALIGN;
    // Zeroed memory fresh from the system (calloc), aligned within for the device.
    let mut buf = vec![0u8; (end - start + ALIGN) as usize];
    let skew = buf.as_ptr().align_offset(ALIGN as usize);
    let got = match read_full_at(&file, &mut buf[skew..skew + (end - start) as usize], start) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return read_range_buffered(path, range),
        r => r?,
    };
    let from = skew + (range.start - start) as usize;
    let to = (skew + got).min(from + (range.end - range.start) as usize);
    Ok(Bytes::from(buf).slice(from..to.max(from)))
}

fn read_range_buffered(path: &std::path::Path, range: Range<u64>) -> std::io::Result<Bytes> {
    let file = std::fs::File::open(path)?;
    let range = within(&file, range)?;
    let mut buf = vec![0u8; (range.end - range.start) as usize];
    let got = read_full_at(&file, &mut buf, range.start)?;
    buf.truncate(got);
    Ok(Bytes::from(buf))
}

/// The part of `range` the file has: memory is sized by what is there, never by
/// what a (possibly damaged) reference asks for.
fn within(file: &std::fs::File, range: Range<u64>) -> std::io::Result<Range<u64>> {
    let len = file.metadata()?.len();
    Ok(range.start.min(len)..range.end.min(len))
}

/// Fills `buf` from `offset`, short only at the end of the file; returns how much.
fn read_full_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// `list_after` for a flat directory on the local filesystem: object_store's local
/// backend stats every entry of the directory (several times), which made finding a
/// point cost a stat per point. This reads names and entry types only. It still
/// reads the whole directory: a directory has no order to start from.
pub(super) async fn list_after_local(
    path: PathBuf,
    dir: &str,
    after: &str,
    limit: usize,
) -> Result<Vec<String>, StoreError> {
    let dir = dir.to_string();
    let after = after.to_string();
    tokio::task::spawn_blocking(move || {
        let io = |cause| StoreError::Io { op: "list", name: dir.clone(), cause };
        let entries = match std::fs::read_dir(&path) {
            Ok(it) => it,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(e)),
        };
        // The `limit` smallest names after `after`, without sorting all of them.
        let mut kept = std::collections::BinaryHeap::new();
        for e in entries {
            let e = e.map_err(io)?;
            let Ok(leaf) = e.file_name().into_string() else { continue };
            if is_staged(&leaf) {
                continue;
            }
            let name = format!("{dir}/{leaf}");
            if name.as_str() <= after.as_str() || kept.len() >= limit && kept.peek().is_some_and(|max| &name >= max) {
                continue;
            }
            match e.file_type() {
                Ok(t) if t.is_file() => {}
                Ok(_) => continue,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue, // deleted meanwhile
                Err(err) => return Err(io(err)),
            }
            kept.push(name);
            if kept.len() > limit {
                kept.pop();
            }
        }
        Ok(kept.into_sorted_vec())
    })
    .await
    .expect("listing task panicked")
}

/// `list` on the local filesystem: every file below `dir/`, each stated once
/// (object_store's local backend stats each several times), without the puts in
/// progress.
pub(super) async fn list_local(
    root: PathBuf,
    dir: &str,
) -> Result<Vec<(String, u64, Option<jiff::Timestamp>)>, StoreError> {
    let dir = dir.to_string();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        walk_files(&root, &dir, |name, e| {
            match e.metadata() {
                Ok(m) => {
                    let modified = m.modified().ok().and_then(|t| jiff::Timestamp::try_from(t).ok());
                    out.push((name, m.len(), modified));
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {} // deleted meanwhile
                Err(err) => return Err(err),
            }
            Ok(())
        })?;
        Ok(out)
    })
    .await
    .expect("listing task panicked")
}

/// The names of the files below `dir/`, without a stat each, without the puts in
/// progress.
pub(super) async fn list_local_names(root: PathBuf, dir: &str) -> Result<Vec<String>, StoreError> {
    let dir = dir.to_string();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        walk_files(&root, &dir, |name, _| {
            out.push(name);
            Ok(())
        })?;
        Ok(out)
    })
    .await
    .expect("listing task panicked")
}

/// Calls `each` with the name and directory entry of every file below `dir/`, but
/// puts in progress. It stats nothing itself: the entries' types say what is a
/// directory.
fn walk_files(
    root: &std::path::Path,
    dir: &str,
    mut each: impl FnMut(String, &std::fs::DirEntry) -> std::io::Result<()>,
) -> Result<(), StoreError> {
    let io = |cause| StoreError::Io { op: "list", name: dir.to_string(), cause };
    let mut stack = vec![(root.join(dir), dir.to_string())];
    while let Some((path, name)) = stack.pop() {
        let entries = match std::fs::read_dir(&path) {
            Ok(it) => it,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(e)),
        };
        for e in entries {
            let e = e.map_err(io)?;
            let Ok(leaf) = e.file_name().into_string() else { continue };
            let child = format!("{name}/{leaf}");
            let kind = match e.file_type() {
                Ok(t) => t,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue, // deleted meanwhile
                Err(err) => return Err(io(err)),
            };
            if kind.is_dir() {
                stack.push((e.path(), child));
            } else if kind.is_file() && !is_staged(&leaf) {
                each(child, &e).map_err(io)?;
            }
        }
    }
    Ok(())
}

pub(super) async fn sync_dir(dir: PathBuf, name: &str) -> Result<(), StoreError> {
    let owned = name.to_string();
    tokio::task::spawn_blocking(move || {
        std::fs::File::open(&dir).and_then(|f| f.sync_all()).map_err(|cause| StoreError::Io {
            op: "fsync directory of",
            name: owned,
            cause,
        })
    })
    .await
    .expect("fsync task panicked")
}
