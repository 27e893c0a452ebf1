//! The local filesystem's side of a `file://` store: where each object lives (its
//! layout), ranged reads that bypass the page cache and are bounded by the file's
//! size, listings that read names without a stat each and only the directories
//! they need, and directory fsyncs.
//!
//! **Layout.** An object is the file of its name below the store's directory,
//! except in the directories that fill up with time: the leaves of
//! `points/<source>/`, `frags/<source>/` and `index/` (16 hex digits of time
//! first; in `index/`, only names `<T>-<R>`) go two directories deeper, named by
//! their first 4 and next 2 characters, and the WAL
//! pieces of `wal/<source>/<TLI>/` (16 hex digits of LSN first) three deeper, by
//! their first 6, next 2 and next 2: `points/web/e786/01/e78601e9e44897ff-<R>`,
//! `wal/db/00000001/000000/01/00/0000000100000000-…`. A directory then holds a
//! bounded number of entries (a shard of points spans about 18 minutes, one of
//! WAL 16 MiB of LSNs), and a listing from a name on reads only the directories
//! from that name on, as an object store's listing does. Names are unchanged:
//! only their files move. Files a repository written before this layout holds flat
//! in those directories are still found, listed and deleted, and a name held both
//! ways is listed once.

use std::borrow::Cow;
use std::collections::{BinaryHeap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::error::StoreError;

/// Whether a file name is a put in progress on the local filesystem (`<name>#<n>`),
/// which listings do not show.
fn is_staged(name: &str) -> bool {
    name.rsplit_once('#').is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Reads `range` of a local file without the page cache (O_DIRECT), into a buffer of
/// its own that the result slices: no copy out of the page cache, and pack bytes do
/// not crowd the cache of what a mount decrypted from them. The disk reads straight
/// into memory. Filesystems without O_DIRECT (tmpfs) are read the ordinary way.
pub(super) fn read_range_direct(path: &std::path::Path, range: Range<u64>) -> std::io::Result<Bytes> {
    use std::os::unix::fs::OpenOptionsExt;
    const ALIGN: u64 = 4096;
    if range.end.saturating_sub(range.start) < DIRECT_FROM {
        return read_range_buffered(path, range);
    }
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

/// Ranges shorter than this are read through the page cache: trees and pack
/// headers, read again and again by prune, backup and a mount, and too small to
/// crowd it.
const DIRECT_FROM: u64 = 256 << 10;

fn read_range_buffered(path: &std::path::Path, range: Range<u64>) -> std::io::Result<Bytes> {
    let file = std::fs::File::open(path)?;
    let range = within(&file, range)?;
    let mut buf = vec![0u8; (range.end - range.start) as usize];
    let got = read_full_at(&file, &mut buf, range.start)?;
    buf.truncate(got);
    Ok(Bytes::from(buf))
}

/// The bytes of object `name` of the store in `root`: its file where the layout
/// puts it, else where a repository written before the layout holds it flat.
pub(super) fn read_object(root: &Path, name: &str) -> std::io::Result<Bytes> {
    let sharded = local_path(name);
    match read_whole(&root.join(sharded.as_ref())) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && sharded != name => read_whole(&root.join(name)),
        read => read,
    }
}

/// The size of object `name` of the store in `root`, found as `read_object` finds
/// its bytes; a directory is not an object.
pub(super) fn object_size(root: &Path, name: &str) -> std::io::Result<u64> {
    let size = |path: &std::path::Path| {
        let meta = std::fs::metadata(path)?;
        if meta.is_dir() {
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "a directory, not an object"));
        }
        Ok(meta.len())
    };
    let sharded = local_path(name);
    match size(&root.join(sharded.as_ref())) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && sharded != name => size(&root.join(name)),
        found => found,
    }
}

/// The whole of a local file, in one read sized by its length; a directory is not
/// an object (`NotFound`, as object stores say).
fn read_whole(path: &std::path::Path) -> std::io::Result<Bytes> {
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "a directory, not an object"));
    }
    // One read at known offsets (`read_to_end` would ask the file's size and
    // position again): objects are written whole and never change.
    let mut buf = vec![0; meta.len() as usize];
    let got = read_full_at(&file, &mut buf, 0)?;
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

/// Where the leaves of directory `dir` are split into shard directories: the
/// position in the leaf at which each shard directory's name ends.
fn shard_cuts(dir: &str) -> Option<&'static [usize]> {
    let mut parts = dir.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("index"), None, None, None) => Some(&[4, 6]),
        (Some("points" | "frags"), Some(source), None, None) if !source.is_empty() => Some(&[4, 6]),
        (Some("wal"), Some(source), Some(tli), None) if !source.is_empty() && tli.len() == 8 && is_hex(tli) => {
            Some(&[6, 8, 10])
        }
        _ => None,
    }
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The path, relative to a `file://` store's directory, of the file that holds
/// object `name` (see the layout above).
pub fn local_path(name: &str) -> Cow<'_, str> {
    let Some((dir, leaf)) = name.rsplit_once('/') else { return name.into() };
    let Some(cuts) = shard_cuts(dir) else { return name.into() };
    let last = cuts[cuts.len() - 1];
    // Index files sharded are those named by time (`<T>-<R>`), not an older
    // repository's random names.
    let timed = dir != "index" || leaf.as_bytes().get(16) == Some(&b'-');
    if !timed || !leaf.get(..last).is_some_and(is_hex) {
        return name.into();
    }
    let mut path = String::with_capacity(name.len() + last + cuts.len());
    path.push_str(dir);
    let mut from = 0;
    for &cut in cuts {
        path.push('/');
        path.push_str(&leaf[from..cut]);
        from = cut;
    }
    path.push('/');
    path.push_str(leaf);
    path.into()
}

/// The object a file at `path` (relative to a `file://` store's directory) holds:
/// the inverse of `local_path`.
pub fn local_name(path: &str) -> Cow<'_, str> {
    let parts: Vec<&str> = path.split('/').collect();
    for depth in [1, 2, 3] {
        let Some(cuts) = parts.get(..depth).and_then(|d| shard_cuts(&d.join("/"))) else { continue };
        if parts.len() != depth + cuts.len() + 1 {
            continue;
        }
        let name = format!("{}/{}", parts[..depth].join("/"), parts[parts.len() - 1]);
        if local_path(&name) == path {
            return name.into();
        }
    }
    path.into()
}

/// Where the leaves of a directory are cut into shard directories (`shard_cuts`).
struct Shards {
    cuts: &'static [usize],
}

/// `list_after` on the local filesystem: the `limit` smallest names after `after`
/// directly under `dir/`, reading names and entry types only (object_store's local
/// backend stats every entry, several times). In a sharded directory it reads the
/// top directory, then the shard directories in name order from `after`'s on, and
/// stops once no later shard can hold a name it keeps.
pub(super) async fn list_after_local(
    root: PathBuf,
    dir: &str,
    after: &str,
    limit: usize,
) -> Result<Vec<String>, StoreError> {
    list_names_local(root, dir, after, None, limit).await
}

/// `Store::list_between` on the local filesystem: the names after `after` and not
/// after `upto` directly under `dir/`, each shard directory in between read once.
pub(super) async fn list_between_local(
    root: PathBuf,
    dir: &str,
    after: &str,
    upto: &str,
) -> Result<Vec<String>, StoreError> {
    list_names_local(root, dir, after, Some(upto), usize::MAX).await
}

/// `list_blocking`'s names, on a blocking task.
async fn list_names_local(
    root: PathBuf,
    dir: &str,
    after: &str,
    upto: Option<&str>,
    limit: usize,
) -> Result<Vec<String>, StoreError> {
    let (dir, after, upto) = (dir.to_string(), after.to_string(), upto.map(str::to_string));
    tokio::task::spawn_blocking(move || {
        list_blocking(&root, &dir, &after, upto.as_deref(), limit)
            .map(|(names, _)| names)
            .map_err(|cause| StoreError::Io { op: "list", name: dir.clone(), cause })
    })
    .await
    .expect("listing task panicked")
}

/// The `limit` smallest names after `after` (and not after `upto`, if given), and
/// how many directories were read for them.
fn list_blocking(
    root: &Path,
    dir: &str,
    after: &str,
    upto: Option<&str>,
    limit: usize,
) -> std::io::Result<(Vec<String>, usize)> {
    let mut listing = ListAfter {
        dir,
        after,
        upto,
        limit,
        shards: Shards { cuts: shard_cuts(dir).unwrap_or(&[]) },
        kept: BinaryHeap::new(),
        flat: HashSet::new(),
        read: 0,
    };
    listing.visit(&root.join(dir), 0, "")?;
    Ok((listing.kept.into_sorted_vec(), listing.read))
}

struct ListAfter<'a> {
    dir: &'a str,
    after: &'a str,
    /// No name after this one is kept, nor a shard whose names all sort after it read.
    upto: Option<&'a str>,
    limit: usize,
    shards: Shards,
    /// The `limit` smallest names found after `after`, largest on top.
    kept: BinaryHeap<String>,
    /// Names found flat (as written before the layout) where they would be
    /// sharded: a copy of one in its shard is not listed twice.
    flat: HashSet<String>,
    /// How many directories it read.
    read: usize,
}

impl ListAfter<'_> {
    /// Reads the directory at shard depth `level` whose leaves start with `prefix`.
    fn visit(&mut self, path: &Path, level: usize, prefix: &str) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(path) {
            Ok(it) => it,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        self.read += 1;
        let mut below = Vec::new();
        for e in entries {
            let e = e?;
            let Ok(leaf) = e.file_name().into_string() else { continue };
            if is_staged(&leaf) {
                continue;
            }
            let kind = match e.file_type() {
                Ok(t) => t,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue, // deleted meanwhile
                Err(err) => return Err(err),
            };
            if kind.is_dir() && self.shards.is_shard(level, &leaf) {
                below.push(leaf);
            } else if kind.is_file() && leaf.starts_with(prefix) {
                self.offer(format!("{}/{leaf}", self.dir), level == 0 && !self.shards.cuts.is_empty());
            }
        }
        below.sort_unstable();
        for shard in below {
            let prefix = format!("{prefix}{shard}");
            // Every name in this shard, and in those after it, starts with `lowest`
            // or sorts after it.
            let lowest = format!("{}/{prefix}", self.dir);
            if self.after > lowest.as_str() && !self.after.starts_with(&lowest) {
                continue;
            }
            if self.kept.len() >= self.limit && self.kept.peek().is_some_and(|max| *max <= lowest) {
                break;
            }
            if self.upto.is_some_and(|u| lowest.as_str() > u) {
                break;
            }
            self.visit(&path.join(&shard), level + 1, &prefix)?;
        }
        Ok(())
    }

    fn offer(&mut self, name: String, flat: bool) {
        let full = self.kept.len() >= self.limit;
        if name.as_str() <= self.after
            || self.upto.is_some_and(|u| name.as_str() > u)
            || full && self.kept.peek().is_some_and(|max| &name >= max)
        {
            return;
        }
        if flat && local_path(&name) != name {
            self.flat.insert(name.clone());
        } else if !flat && self.flat.contains(&name) {
            return;
        }
        self.kept.push(name);
        if self.kept.len() > self.limit {
            self.kept.pop();
        }
    }
}

impl Shards {
    /// Whether `leaf`, a directory at shard depth `level`, is a shard directory.
    fn is_shard(&self, level: usize, leaf: &str) -> bool {
        let Some(&cut) = self.cuts.get(level) else { return false };
        let from = if level == 0 { 0 } else { self.cuts[level - 1] };
        leaf.len() == cut - from && is_hex(leaf)
    }
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
        let twice = walk_files(&root, &dir, |name, e| {
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
        if twice {
            out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            out.dedup_by(|a, b| a.0 == b.0);
        }
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
        let twice = walk_files(&root, &dir, |name, _| {
            out.push(name);
            Ok(())
        })?;
        if twice {
            out.sort_unstable();
            out.dedup();
        }
        Ok(out)
    })
    .await
    .expect("listing task panicked")
}

/// Calls `each` with the name and directory entry of every file below `dir/`, but
/// puts in progress. Returns whether a name may have come twice (held both flat
/// and in its shard, see the layout).
fn walk_files(
    root: &Path,
    dir: &str,
    mut each: impl FnMut(String, &std::fs::DirEntry) -> std::io::Result<()>,
) -> Result<bool, StoreError> {
    let mut twice = false;
    walk(root, dir, "list", |name, leaf, level, e| {
        if is_staged(leaf) {
            return Ok(());
        }
        twice |= level == 0 && local_path(&name) != name;
        each(name, e)
    })?;
    Ok(twice)
}

/// Calls `each` with the name, leaf, shard depth and directory entry of every file
/// below `dir/`, puts in progress too. It stats nothing itself: the entries' types
/// say what is a directory.
fn walk(
    root: &Path,
    dir: &str,
    op: &'static str,
    mut each: impl FnMut(String, &str, usize, &std::fs::DirEntry) -> std::io::Result<()>,
) -> Result<(), StoreError> {
    let io = |cause| StoreError::Io { op, name: dir.to_string(), cause };
    let join = |name: &str, leaf: &str| if name.is_empty() { leaf.to_string() } else { format!("{name}/{leaf}") };
    // (path, the directory of the names it holds, shard depth, leaf prefix)
    let mut stack = vec![(root.join(local_path(dir).as_ref()), dir.to_string(), 0, String::new())];
    while let Some((path, name, level, prefix)) = stack.pop() {
        let shards = Shards { cuts: shard_cuts(&name).unwrap_or(&[]) };
        let entries = match std::fs::read_dir(&path) {
            Ok(it) => it,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(e)),
        };
        for e in entries {
            let e = e.map_err(io)?;
            let Ok(leaf) = e.file_name().into_string() else { continue };
            let kind = match e.file_type() {
                Ok(t) => t,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue, // deleted meanwhile
                Err(err) => return Err(io(err)),
            };
            if kind.is_dir() && shards.is_shard(level, &leaf) {
                stack.push((e.path(), name.clone(), level + 1, format!("{prefix}{leaf}")));
            } else if kind.is_dir() && level == 0 {
                stack.push((e.path(), join(&name, &leaf), 0, String::new()));
            } else if kind.is_file() && leaf.starts_with(&prefix) {
                each(join(&name, &leaf), &leaf, level, &e).map_err(io)?;
            }
        }
    }
    Ok(())
}

/// `Store::sweep_staged` on the local filesystem: removes the staged files
/// (`<name>#<n>`) below `dir/` older than `min_age`; returns how many went.
pub(super) async fn sweep_staged(root: PathBuf, dir: &str, min_age: std::time::Duration) -> Result<usize, StoreError> {
    let dir = dir.to_string();
    tokio::task::spawn_blocking(move || {
        let mut removed = 0;
        walk(&root, &dir, "sweep staged uploads in", |_, leaf, _, e| {
            // Only a staged name is looked at further: the others are most of the
            // files walked.
            if !is_staged(leaf) {
                return Ok(());
            }
            let old = e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
            if old.is_some_and(|age| age >= min_age) && std::fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
            Ok(())
        })?;
        Ok(removed)
    })
    .await
    .expect("sweep task panicked")
}

/// Deletes the file of object `name`, and the one a repository written before the
/// layout holds flat, fsyncing each directory a file left, then removes the shard
/// directories that became empty. A put into a shard directory removed meanwhile
/// makes it again (`Store::put_new`).
pub(super) async fn delete(root: PathBuf, name: &str) -> Result<(), StoreError> {
    let names = vec![name.to_string()];
    let failed = tokio::task::spawn_blocking(move || delete_batch(&root, &names)).await.expect("delete task panicked");
    failed.into_iter().next().map_or(Ok(()), |(_, e)| Err(e))
}

/// Removes the file of each of `names` (sharded, and flat), then fsyncs each
/// directory they left once (not once a file: a prune deletes hundreds from one),
/// then removes the shard directories they emptied. The names not deleted, with
/// why: a name whose directory could not be fsynced is not known to be deleted.
pub(super) fn delete_batch(root: &Path, names: &[String]) -> Vec<(String, StoreError)> {
    let io = |name: &str, cause| (name.to_string(), StoreError::Io { op: "delete", name: name.to_string(), cause });
    let mut failed = Vec::new();
    // Each directory a file left, and the names whose files they were.
    let mut left: std::collections::BTreeMap<PathBuf, Vec<&str>> = std::collections::BTreeMap::new();
    // Each shard directory a file left, and how many levels of them are above it.
    let mut shards: std::collections::BTreeSet<(PathBuf, usize)> = std::collections::BTreeSet::new();
    'names: for name in names {
        let sharded = local_path(name).into_owned();
        let paths = if sharded == *name { vec![root.join(name)] } else { vec![root.join(&sharded), root.join(name)] };
        for path in &paths {
            match std::fs::remove_file(path) {
                Ok(()) => left.entry(path.parent().unwrap_or(root).to_path_buf()).or_default().push(name),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    failed.push(io(name, e));
                    continue 'names;
                }
            }
        }
        let levels = sharded.matches('/').count() - name.matches('/').count();
        if let Some(dir) = paths[0].parent().filter(|_| levels > 0) {
            shards.insert((dir.to_path_buf(), levels));
        }
    }
    for (dir, removed) in &left {
        if let Err(e) = sync_dir_or_nearest(dir) {
            failed.extend(removed.iter().map(|name| io(name, std::io::Error::new(e.kind(), e.to_string()))));
        }
    }
    // Deepest first, so that a directory emptied of its shard directories goes too.
    for (dir, levels) in shards.iter().rev() {
        let mut dir = Some(dir.as_path());
        for _ in 0..*levels {
            match dir {
                Some(d) if std::fs::remove_dir(d).is_ok() => dir = d.parent(),
                _ => break,
            }
        }
    }
    failed
}

/// An object being written to a staged file (`<path>#<n>`, which listings do not
/// show and `sweep_staged` removes if the writer dies), published by `publish`.
pub(super) struct Staged {
    file: std::sync::Arc<std::fs::File>,
    staged: PathBuf,
    path: PathBuf,
    /// The highest directory `create` made, whose parent must be fsynced too.
    made: Option<PathBuf>,
    published: bool,
}

impl Staged {
    /// Creates the staged file of the object at `path` below `root`, and the
    /// directories it needs.
    pub(super) fn create(root: &Path, path: PathBuf) -> std::io::Result<Staged> {
        let dir = path.parent().unwrap_or(root);
        let mut made = None;
        let mut missing = Some(dir);
        while let Some(d) = missing.filter(|d| *d != root && !d.exists()) {
            made = Some(d.to_path_buf());
            missing = d.parent();
        }
        if made.is_some() {
            std::fs::create_dir_all(dir)?;
        }
        let n = u64::from_le_bytes(crate::id::random_bytes());
        let staged = PathBuf::from(format!("{}#{n}", path.display()));
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&staged)?;
        Ok(Staged { file: std::sync::Arc::new(file), staged, path, made, published: false })
    }

    /// The file, for a blocking task to append to.
    pub(super) fn file(&self) -> std::sync::Arc<std::fs::File> {
        self.file.clone()
    }

    /// Makes the object durable under its name, unless the name is taken
    /// (`AlreadyExists`): the file, then its name, then the directories made for it.
    pub(super) fn publish(mut self) -> std::io::Result<()> {
        self.file.sync_all()?;
        std::fs::hard_link(&self.staged, &self.path)?;
        self.published = true;
        // The staged name goes; a crash before leaves it for `sweep_staged`.
        let _ = std::fs::remove_file(&self.staged);
        let dir = self.path.parent().unwrap_or(&self.path);
        std::fs::File::open(dir)?.sync_all()?;
        if let Some(made) = &self.made {
            let mut d = dir;
            while let Some(parent) = d.parent() {
                std::fs::File::open(parent)?.sync_all()?;
                if d == made.as_path() {
                    break;
                }
                d = parent;
            }
        }
        Ok(())
    }
}

impl Drop for Staged {
    /// A write given up leaves nothing behind.
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.staged);
        }
    }
}

/// Fsyncs `dir`, which a file was removed from; when a delete of another file
/// removed that directory meanwhile (it became empty), the nearest one still
/// there, which the removal of the directory changed.
fn sync_dir_or_nearest(dir: &Path) -> std::io::Result<()> {
    let mut dir = Some(dir);
    while let Some(d) = dir {
        match std::fs::File::open(d) {
            Ok(f) => return f.sync_all(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => dir = d.parent(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_local_layout() {
        let cases = [
            ("points/web/e78601e9e44897ff-0123456789abcdef", "points/web/e786/01/e78601e9e44897ff-0123456789abcdef"),
            ("frags/web/e78601e9e44897ff-0123456789abcdef", "frags/web/e786/01/e78601e9e44897ff-0123456789abcdef"),
            ("index/187b2c9a00000000-0123456789abcdef", "index/187b/2c/187b2c9a00000000-0123456789abcdef"),
            (
                "wal/db/00000001/0000000123000000-0000000123001000",
                "wal/db/00000001/000000/01/23/0000000123000000-0000000123001000",
            ),
        ];
        for (name, path) in cases {
            assert_eq!(local_path(name), path);
            assert_eq!(local_name(path), name);
        }
        // Everything else lives under its own name.
        for name in [
            "config",
            "packs/ab/ab01",
            "index/0123456789abcdef0123",
            "index/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "points/web",
            "points/web/e786",
            "points/web/E78601e9e44897ff-x",
            "points/web/zz",
            "leases/web/e78601e9e44897ff-0123",
            "wal/db/system",
            "wal/db/history/00000002",
            "wal/db/files/000000010000000000000002.00000028.backup",
            "wal/db/0000001/0000000123000000-0000000123001000",
        ] {
            assert_eq!(local_path(name), name);
            assert_eq!(local_name(name), name);
        }
        assert_eq!(local_name("points/web/e786/01/f0000000-x"), "points/web/e786/01/f0000000-x", "not its shard");
    }

    fn touch(root: &Path, rel: &str) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, rel).unwrap();
    }

    #[test]
    fn a_listing_from_a_name_reads_only_the_directories_from_its_shard_on() {
        let dir = tempfile::tempdir().unwrap();
        // 3,000 points a minute apart, newest first as their inverted times sort.
        let names: Vec<String> = (0..3_000u64)
            .map(|i| format!("points/s/{:016x}-{i:016x}", u64::MAX - 1_763_720_100_000_000_000 - i * 60_000_000_000))
            .collect();
        names.iter().for_each(|n| touch(dir.path(), &local_path(n)));
        touch(dir.path(), "points/s/zz");
        let mut sorted = names.clone();
        sorted.push("points/s/zz".into());
        sorted.sort();
        let shards = std::fs::read_dir(dir.path().join("points/s")).unwrap().count();
        assert!(shards < 10, "a few top shards, not a file per point: {shards}");
        for (after, limit) in
            [("points/s/", 1), ("points/s/", 5000), (sorted[1234].as_str(), 1), (sorted[1234].as_str(), 40)]
        {
            let (got, read) = list_blocking(dir.path(), "points/s", after, None, limit).unwrap();
            let want: Vec<String> = sorted.iter().filter(|n| n.as_str() > after).take(limit).cloned().collect();
            assert_eq!(got, want, "after {after}, limit {limit}");
            if limit < 100 {
                assert!(read <= 6, "{read} directories read for {limit} names after {after}");
            }
        }
        let (got, _) = list_blocking(dir.path(), "points/s", &sorted[2999], None, 10).unwrap();
        assert_eq!(got, ["points/s/zz"]);
    }

    /// A batch (what prune deletes) removes every file, fsyncs each directory
    /// once, removes the shard directories it emptied, and fails only the names
    /// that failed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_of_deletes_removes_each_name_and_reports_only_what_failed() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::Store::open(&format!("file://{}", dir.path().display()), true).unwrap();
        let mut names: Vec<String> =
            (0..300u32).map(|i| format!("points/s/{:08x}9e44897ff-{i:016x}", 0xe786_0000u32 + i % 7)).collect();
        names.extend((0..50).map(|i| format!("packs/ab/ab{i:062x}")));
        for n in &names {
            store.put_new(n, Bytes::from_static(b"m")).await.unwrap();
        }
        // One that is not there, and one the filesystem refuses (a directory).
        names.push("packs/ab/not-there".into());
        std::fs::create_dir_all(dir.path().join("packs/cd/a-directory/inside")).unwrap();
        names.push("packs/cd/a-directory".into());
        let failed = store.delete_many(&names.iter().map(String::as_str).collect::<Vec<_>>()).await;
        assert_eq!(failed.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["packs/cd/a-directory"]);
        assert!(store.list_names("points/s").await.unwrap().is_empty());
        assert_eq!(store.list_names("packs").await.unwrap(), Vec::<String>::new());
        // The shard directories they emptied went with them.
        assert!(std::fs::read_dir(dir.path().join("points/s")).unwrap().next().is_none());
    }

    /// Deletes of the files of one shard at once: each may find the shard
    /// directory gone, removed by another that emptied it, and still succeeds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_deletes_in_one_shard_all_succeed() {
        use futures::{StreamExt, TryStreamExt};
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::Store::open(&format!("file://{}", dir.path().display()), true).unwrap();
        for round in 0..20 {
            let names: Vec<String> = (0..16).map(|i| format!("points/s/e78601e9e44897ff-{round:08x}{i:08x}")).collect();
            for n in &names {
                store.put_new(n, Bytes::from_static(b"m")).await.unwrap();
            }
            futures::stream::iter(names.iter().map(|n| store.delete(n)))
                .buffer_unordered(16)
                .try_collect::<Vec<()>>()
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert!(store.list_names("points/s").await.unwrap().is_empty());
        }
    }

    /// A repository written before the layout holds these files flat: they are
    /// still read, listed once, refused as taken, and deleted.
    #[tokio::test]
    async fn files_held_flat_by_an_older_repository_still_count() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::Store::open(&format!("file://{}", dir.path().display()), true).unwrap();
        let [old, both, new] = [
            "0000000100000000-0000000100000010",
            "0000000100000010-0000000100000020",
            "0000000100000020-0000000100000030",
        ]
        .map(|k| format!("wal/db/00000001/{k}"));
        touch(dir.path(), &old);
        touch(dir.path(), &both);
        touch(dir.path(), &local_path(&both));
        store.put_new(&new, Bytes::from(new.clone())).await.unwrap();
        assert!(dir.path().join(local_path(&new).as_ref()).is_file(), "new files go to their shard");
        let all = vec![old.clone(), both.clone(), new.clone()];
        let mut listed = store.list_names("wal/db").await.unwrap();
        listed.sort();
        assert_eq!(listed, all, "each name once");
        assert_eq!(store.list("wal/db").await.unwrap().len(), 3);
        assert_eq!(store.list_after("wal/db/00000001", "wal/db/00000001/", 10).await.unwrap(), all);
        assert_eq!(store.list_after("wal/db/00000001", &old, 1).await.unwrap(), std::slice::from_ref(&both));
        assert_eq!(store.get(&old).await.unwrap(), old.as_bytes());
        assert_eq!(store.get_many(std::slice::from_ref(&old)).await[0].as_ref().unwrap(), old.as_bytes());
        assert_eq!(store.size(&old).await.unwrap(), old.len() as u64);
        assert_eq!(store.sizes(std::slice::from_ref(&old)).await[0].as_ref().unwrap(), &(old.len() as u64));
        assert_eq!(store.get_range(&old, 1..4).await.unwrap(), old.as_bytes()[1..4]);
        let taken = store.put_new(&old, Bytes::from_static(b"other")).await.unwrap_err();
        assert!(matches!(taken, StoreError::AlreadyExists { .. }), "{taken}");
        store.put_overwrite(&old, Bytes::from_static(b"replaced")).await.unwrap();
        assert!(!dir.path().join(&old).exists(), "the flat copy does not outlive its replacement");
        assert_eq!(store.get(&old).await.unwrap(), &b"replaced"[..]);
        for name in &all {
            store.delete(name).await.unwrap();
        }
        assert!(store.list_names("wal/db").await.unwrap().is_empty());
        let left: Vec<_> = std::fs::read_dir(dir.path().join("wal/db/00000001")).unwrap().collect();
        assert!(left.is_empty(), "empty shard directories go with their last file: {left:?}");
    }
}
