//! Writing restored entries: a file's chunks land with `pwrite` in a file without
//! a name yet (`target::TempNames`), in whatever order they arrive; once the last one is in, the file gets its
//! metadata and its real name, and the names that are hard links to it are made.
//! A directory gets its metadata once all its children are done.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::ctx::{Ctx, DirState};
use super::error::{no_space, FileFailure, RestoreError};
use super::meta;
use super::target::Temp;
use crate::tree::{Entry, Extent};

/// A file for the fetch stage to restore.
pub(super) struct FileJob {
    pub path: PathBuf,
    /// With the appends up to the moment restored.
    pub entry: Entry,
    pub parent: Arc<DirState>,
    /// A file is already at `path` with the entry's size and time: it may need
    /// nothing but its metadata (`target::same_content`).
    pub check_existing: bool,
}

impl FileJob {
    /// The chunks of the file and where each goes.
    pub fn chunks(&self) -> impl Iterator<Item = (u64, crate::pack::BlobRef)> + '_ {
        let mut pos = 0u64;
        self.entry.content.iter().filter_map(move |ext| {
            let at = pos;
            pos += ext.len();
            match ext {
                Extent::Data(b) => Some((at, *b)),
                Extent::Hole(_) => None,
            }
        })
    }
}

/// Files of this size and more, without holes, get their space at once: a full
/// target is found before their chunks are fetched, and the chunks, which arrive
/// out of order from concurrent spans, land in space already laid out.
const PREALLOCATE: u64 = 8 << 20;

/// Reserves `len` bytes for `f` (and sets its length); a filesystem that cannot
/// preallocate just gets the length.
fn preallocate(f: &fs::File, len: u64) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: fallocate only acts on the descriptor we own.
    if unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => f.set_len(len),
        _ => Err(err),
    }
}

/// A file being written.
pub(super) struct FileState {
    job: FileJob,
    /// Created on the first write: where it is until complete, and the open file.
    file: Mutex<Option<(Temp, Arc<fs::File>)>>,
    /// Chunks still to write.
    pending: AtomicUsize,
    failure: Mutex<Option<FileFailure>>,
}

impl FileState {
    pub fn new(job: FileJob, chunks: usize) -> Arc<FileState> {
        Arc::new(FileState {
            job,
            file: Mutex::new(None),
            pending: AtomicUsize::new(chunks),
            failure: Mutex::new(None),
        })
    }

    fn failed(&self) -> bool {
        self.failure.lock().expect("file failure").is_some()
    }

    /// The file under its temporary name, created on first use.
    fn open(&self, ctx: &Ctx) -> Result<Arc<fs::File>, FileFailure> {
        let mut slot = self.file.lock().expect("file slot");
        if let Some((_, f)) = &*slot {
            return Ok(f.clone());
        }
        let dir = self.job.path.parent().unwrap_or(Path::new("."));
        let (tmp, f) = ctx.temp.create(dir).map_err(FileFailure::target)?;
        let f = Arc::new(f);
        *slot = Some((tmp, f.clone()));
        drop(slot);
        let e = &self.job.entry;
        if e.size >= PREALLOCATE && e.content.iter().all(|x| matches!(x, Extent::Data(_))) {
            preallocate(&f, e.size).map_err(FileFailure::target)?;
        } else if !matches!(e.content.last(), Some(Extent::Data(_))) {
            // Holes are never written: the length leaves them as holes. A file that
            // ends with data gets its length from the last write.
            f.set_len(e.size).map_err(FileFailure::target)?;
        }
        Ok(f)
    }

    /// Writes one chunk at `offset`; the last chunk in completes the file.
    pub fn write(&self, ctx: &Ctx, offset: u64, data: &[u8]) {
        if !self.failed() {
            let written = if ctx.stopped() {
                Err(FileFailure::target(std::io::Error::other("the restore stopped")))
            } else {
                self.open(ctx).and_then(|f| f.write_all_at(data, offset).map_err(FileFailure::target))
            };
            if let Err(e) = written {
                self.fail(ctx, e);
                return;
            }
        }
        self.piece_done(ctx);
    }

    /// One chunk could not be had: the file is given up, and reported once complete.
    pub fn fail(&self, ctx: &Ctx, why: FileFailure) {
        if let FileFailure::Target(e) = &why {
            if no_space(e) {
                ctx.stop(RestoreError::TargetFull {
                    path: self.job.path.clone(),
                    cause: std::io::Error::new(e.kind(), e.to_string()),
                });
            }
        }
        self.failure.lock().expect("file failure").get_or_insert(why);
        self.piece_done(ctx);
    }

    fn piece_done(&self, ctx: &Ctx) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish(ctx);
        }
    }

    /// Every chunk is written (or the file failed): metadata, then the real name.
    pub fn finish(&self, ctx: &Ctx) {
        let job = &self.job;
        let e = &job.entry;
        let mut outcome = self.failure.lock().expect("file failure").take().map_or(Ok(()), Err);
        let opened = match outcome {
            Ok(()) => self.open(ctx).map(Some),
            Err(_) => Ok(None),
        };
        let slot = self.file.lock().expect("file slot").take();
        match opened {
            Ok(Some(f)) => {
                let mut warnings = Vec::new();
                meta::apply_to_file(&f, &job.path, e, ctx.made_as, &mut warnings);
                if ctx.write_back {
                    start_write_back(&f);
                }
                ctx.warn(warnings);
                if let Some((temp, _)) = &slot {
                    if let Err(err) = ctx.temp.name(temp, &f, &job.path) {
                        outcome = Err(FileFailure::target(err));
                    }
                }
                drop(f);
            }
            Ok(None) => {}
            Err(err) => outcome = Err(err),
        }
        match outcome {
            Ok(()) => {
                ctx.flag(&job.path, e);
                ctx.count_file(e.size);
                ctx.linked(e, &job.path, Ok(()));
            }
            Err(why) => {
                if let Some((temp, _)) = &slot {
                    ctx.temp.discard(temp);
                }
                ctx.file_failed(&job.path, &why);
                ctx.linked(e, &job.path, Err(why));
            }
        }
        job.parent.done(ctx);
    }

    /// The file is already at its path with the point's content: only its metadata.
    pub fn unchanged(&self, ctx: &Ctx) {
        let (path, e) = (&self.job.path, &self.job.entry);
        let mut warnings = Vec::new();
        meta::apply(path, e, &mut warnings);
        ctx.warn(warnings);
        ctx.flag(path, e);
        ctx.count_unchanged(e.size);
        ctx.linked(e, path, Ok(()));
        self.job.parent.done(ctx);
    }
}

/// Starts writing the file's dirty pages to disk, without waiting for them (a
/// sync later finds them written, or being written). Only a hint: a failure
/// changes nothing.
fn start_write_back(f: &fs::File) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: sync_file_range only acts on the descriptor we own.
    unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}
