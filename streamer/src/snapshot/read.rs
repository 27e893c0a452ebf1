//! Reading one file's content while it may change. The read is checked against the
//! state the walk saw (size, mtime, ctime): a file rewritten while read is read
//! again, up to `READ_ATTEMPTS` times, and one that never holds still is stored as
//! read and marked `changed`. A file that only grew while read is stored as it was
//! when the walk saw it. An append-only file that grew since the previous point is
//! read from that point's last chunk on.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::Ordering;

use catalog::chunker::{ChunkError, Chunker};
use catalog::tree::{Entry, EntryKind, Extent, Timestamp as TreeTime};
use catalog::{BlobKind, Packer, WriteError};

use super::progress::Counters;
use crate::metadata::{data_regions, inode_flags, open_file};

/// Reads of a file that keeps changing before it is stored as read and listed.
const READ_ATTEMPTS: usize = 3;

pub(super) enum FileError {
    /// The file could not be read: skip it and say so.
    Io(std::io::Error),
    /// The repository could not take it: the snapshot fails.
    Write(WriteError),
}

/// An append-only file's content in the previous point, when the file is the same
/// inode and longer: only its last chunk (cut where the file ended, not by content) and what
/// follows are read again, once that chunk is found unchanged.
pub(super) struct Grown {
    /// Every extent but the last chunk.
    prefix: Vec<Extent>,
    /// Where the last chunk starts, and its content id.
    start: u64,
    last: catalog::BlobRef,
}

impl Grown {
    pub(super) fn of(prev: &Entry, now: &Entry) -> Option<Grown> {
        let same = prev.kind == EntryKind::File && (prev.device, prev.inode) == (now.device, now.inode);
        if !same || now.size <= prev.size {
            return None;
        }
        let Some((Extent::Data(last), prefix)) = prev.content.split_last() else { return None };
        Some(Grown { prefix: prefix.to_vec(), start: prev.size - last.raw_len as u64, last: *last })
    }
}

/// A file's size, mtime and ctime: what tells its versions apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Seen {
    pub(super) size: u64,
    pub(super) mtime: TreeTime,
    pub(super) ctime: TreeTime,
}

impl Seen {
    pub(super) fn of(e: &Entry) -> Seen {
        Seen { size: e.size, mtime: e.mtime, ctime: e.ctime }
    }

    pub(super) fn of_file(f: &File) -> std::io::Result<Seen> {
        use std::os::unix::fs::MetadataExt;
        let m = f.metadata()?;
        let t = |sec: i64, nsec: i64| TreeTime { sec, nsec: nsec as u32 };
        Ok(Seen { size: m.len(), mtime: t(m.mtime(), m.mtime_nsec()), ctime: t(m.ctime(), m.ctime_nsec()) })
    }
}

/// A file's content as read, and the state it belongs to.
pub(super) struct FileRead {
    pub(super) extents: Vec<Extent>,
    pub(super) seen: Seen,
    /// Its inode flags (`chattr`), read from the file as it was read.
    pub(super) flags: u32,
    /// It kept changing while read: stored as read, and listed.
    pub(super) changed: bool,
}

/// Reads a file until what was read matches one state of it (see the module doc).
pub(super) fn read_consistent(
    path: &Path,
    mut seen: Seen,
    grown: Option<&Grown>,
    chunker: &mut Chunker,
    packer: &mut Packer,
    counters: &Counters,
) -> Result<FileRead, FileError> {
    for attempt in 1..=READ_ATTEMPTS {
        let mut f = open_file(path).map_err(FileError::Io)?;
        let extents = read_content(&mut f, seen.size, grown, chunker, packer, counters)?;
        let after = Seen::of_file(&f).map_err(FileError::Io)?;
        let read: u64 = extents.iter().map(Extent::len).sum();
        // Unchanged; or it only grew, and the bytes up to the size seen are stored.
        let grew_only = after.size > seen.size && read == seen.size;
        if after == seen || grew_only {
            return Ok(FileRead { extents, seen, flags: inode_flags(&f), changed: false });
        }
        if attempt == READ_ATTEMPTS {
            return Ok(FileRead { extents, seen: after, flags: inode_flags(&f), changed: true });
        }
        seen = after;
    }
    unreachable!("the last attempt returns")
}

/// A file's first `size` bytes as extents: read from the start, or, when it only
/// grew since the previous point, from that point's last chunk on.
fn read_content(
    f: &mut File,
    size: u64,
    grown: Option<&Grown>,
    chunker: &mut Chunker,
    packer: &mut Packer,
    counters: &Counters,
) -> Result<Vec<Extent>, FileError> {
    if let Some(g) = grown.filter(|g| size >= g.start + g.last.raw_len as u64) {
        let mut last = vec![0; g.last.raw_len as usize];
        let read = f.seek(SeekFrom::Start(g.start)).and_then(|_| f.read_exact(&mut last));
        if read.is_ok() && packer.content_id(&last) == g.last.id {
            let mut extents = g.prefix.clone();
            extents.extend(read_file(f, g.start, size, chunker, packer, counters)?);
            return Ok(extents);
        }
    }
    read_file(f, 0, size, chunker, packer, counters)
}

/// Bytes `from..size` of a file as extents.
fn read_file(
    f: &mut File,
    from: u64,
    size: u64,
    chunker: &mut Chunker,
    packer: &mut Packer,
    counters: &Counters,
) -> Result<Vec<Extent>, FileError> {
    let regions = data_regions(f, from, size).map_err(FileError::Io)?;
    let mut extents = Vec::new();
    let mut pos = from;
    for (start, len) in regions {
        if start > pos {
            extents.push(Extent::Hole(start - pos));
        }
        f.seek(SeekFrom::Start(start)).map_err(FileError::Io)?;
        let read = chunker
            .run(f.take(len), |chunk| {
                counters.bytes_read.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                counters.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                extents.push(Extent::Data(packer.store(BlobKind::Data, chunk)?));
                #[cfg(test)]
                if extents.len() == 1 {
                    tests::mid_read();
                }
                Ok(())
            })
            .map_err(|e| match e {
                ChunkError::Read(e) => FileError::Io(e),
                ChunkError::Emit(e) => FileError::Write(e),
            })?;
        pos = start + read;
        if read < len {
            break; // the file shrank while being read
        }
    }
    if pos < size && from + extents.iter().map(Extent::len).sum::<u64>() == pos {
        // A trailing hole, unless the file shrank (then the data simply ended).
        let now = f.metadata().map(|m| m.len()).unwrap_or(pos);
        if now > pos {
            extents.push(Extent::Hole(now - pos));
        }
    }
    counters.files.fetch_add(1, Ordering::Relaxed);
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog::{Repository, Writer};
    use std::fs;
    use std::os::unix::fs::FileExt;

    /// The content ids of `data` as the writer would chunk it.
    fn ids(repo: &Repository, data: &[u8]) -> Vec<catalog::Id> {
        let mut out = Vec::new();
        Chunker::new(repo.keys().chunker_seed)
            .run(data, |c| -> Result<(), ()> {
                out.push(repo.keys().content_id(c));
                Ok(())
            })
            .unwrap();
        out
    }

    thread_local! {
        /// What a test does in the middle of a read, on the reading thread: after a
        /// read's first chunk, while the rest of the file is still to be read.
        static MID_READ: std::cell::RefCell<Option<Box<dyn FnMut()>>> = const { std::cell::RefCell::new(None) };
    }

    pub(super) fn mid_read() {
        MID_READ.with_borrow_mut(|hook| {
            if let Some(h) = hook {
                h()
            }
        });
    }

    /// Item 0 of issue 15: a file rewritten in place while it is read is stored
    /// either as one whole version, or marked as changed: never a silent mix. Which
    /// reads overlap a rewrite is decided here, not by timing: a hook rewrites the
    /// file after the first chunk of chosen attempts, when most of it is still to
    /// be read (it is longer than the chunker's window, so the rest comes from the
    /// new version).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_rewritten_while_read_is_never_a_silent_mix() {
        let secret = catalog::Secret::KeyFile([3; 32]);
        let repo =
            Repository::init(catalog::Store::memory(), &secret, catalog::DEFAULT_KDF, "t".into()).await.unwrap().0;
        let writer = Writer::new(repo.clone()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let versions: Vec<Vec<u8>> = (0..2u8).map(|v| (0..10 << 20).map(|i| (i % 251) as u8 ^ v).collect()).collect();
        let wanted: Vec<Vec<catalog::Id>> = versions.iter().map(|v| ids(&repo, v)).collect();
        std::fs::write(&path, &versions[0]).unwrap();

        // For each read, the attempts (1 to 3) during which the file is rewritten.
        let schedules: Vec<Vec<usize>> =
            vec![vec![], vec![1], vec![], vec![1, 2], vec![2], vec![1, 2, 3], vec![], vec![1, 2, 3], vec![3], vec![1]];
        let mut current = 0usize;
        let mut stamp = 1_000_000i64;
        for (n, schedule) in schedules.iter().enumerate() {
            let (writer, path2, versions2) = (writer.clone(), path.clone(), versions.clone());
            let schedule2 = schedule.clone();
            let (read, now) = tokio::task::spawn_blocking(move || {
                let mut attempt = 0;
                let mut version = current;
                let hook_path = path2.clone();
                let state = std::rc::Rc::new(std::cell::Cell::new(version));
                let seen_state = state.clone();
                MID_READ.with_borrow_mut(|h| {
                    *h = Some(Box::new(move || {
                        attempt += 1;
                        if schedule2.contains(&attempt) {
                            let v = seen_state.get() ^ 1;
                            let f = fs::OpenOptions::new().write(true).open(&hook_path).unwrap();
                            f.write_all_at(&versions2[v], 0).unwrap();
                            // A distinct mtime, whatever the clock's granularity.
                            stamp += 1;
                            let t = std::fs::FileTimes::new()
                                .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(stamp as u64));
                            f.set_times(t).unwrap();
                            seen_state.set(v);
                        }
                    }))
                });
                let seen = Seen::of_file(&File::open(&path2).unwrap()).unwrap();
                let mut packer = writer.packer();
                let mut chunker = Chunker::new(writer.repo().keys().chunker_seed);
                let r = read_consistent(&path2, seen, None, &mut chunker, &mut packer, &Counters::default());
                packer.flush().unwrap();
                MID_READ.with_borrow_mut(|h| *h = None);
                version = state.get();
                (r, version)
            })
            .await
            .unwrap();
            stamp += 10;
            current = now;
            let Ok(read) = read else { panic!("read {n} failed") };
            let got: Vec<catalog::Id> = read
                .extents
                .iter()
                .map(|x| match x {
                    Extent::Data(b) => b.id,
                    Extent::Hole(_) => panic!("no holes here"),
                })
                .collect();
            if schedule.len() == READ_ATTEMPTS {
                // Rewritten during every attempt: it never held still, and says so.
                assert!(read.changed, "read {n} overlapped a rewrite in every attempt but is not marked changed");
                assert!(
                    !wanted.contains(&got),
                    "read {n}: every attempt was disturbed, yet one whole version was read"
                );
            } else {
                // Some attempt ran undisturbed: that one is stored, the version then.
                assert!(!read.changed, "read {n} had an undisturbed attempt");
                assert!(got == wanted[current], "read {n} is not the file's version {current}");
            }
        }
        writer.finish().await.unwrap();
    }
}
