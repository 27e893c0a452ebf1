//! A file of a branch, copied on write a block at a time: the blocks written since
//! the branch began are in an anonymous scratch file (sparse, the same offsets),
//! the others come from the file as the point holds it, fetched only when read.
//! A block partly written is first filled from the point's bytes, so that a block
//! is either wholly the point's or wholly the scratch file's.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::error::FsError;
use crate::fs::Fs;

/// The unit of copying on write: a page of the kernel's cache (PostgreSQL writes
/// pages of 8 KiB, two blocks each, whole).
pub const BLOCK: u64 = 4096;
/// The largest file a branch writes (EFBIG past it): a bit a block of it is kept
/// in memory, 32 MiB at most.
pub const MAX_FILE: u64 = 1 << 40;

/// Where the bytes of one part of a read come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// The point's file, at the same offsets.
    Point(Range<u64>),
    /// The scratch file: a block written, or past what the point's file still
    /// shows (a hole there reads as zeros, as a file grown by truncate does).
    Scratch(Range<u64>),
}

/// The content of one regular file of a branch. Its size is kept by the caller.
pub struct Blocks {
    /// The point's file (an inode of the read-only mount), if the file was there.
    lower: Option<u64>,
    /// Bytes before this offset not written since come from the point's file; a
    /// truncate below it lowers it, so that what was cut off never comes back.
    lower_len: u64,
    /// One bit a block: written since the branch began.
    written: Vec<u64>,
    /// The scratch file, made on the first write: anonymous, so that nothing of
    /// it outlives the branch, whatever ends the process.
    scratch: Option<File>,
}

impl Blocks {
    /// A file as the point holds it: `lower` of `len` bytes.
    pub fn of_point(lower: u64, len: u64) -> Blocks {
        Blocks { lower: Some(lower), lower_len: len, written: Vec::new(), scratch: None }
    }

    /// A file made in the branch: empty.
    pub fn new_file() -> Blocks {
        Blocks { lower: None, lower_len: 0, written: Vec::new(), scratch: None }
    }

    fn is_written(&self, block: u64) -> bool {
        let (word, bit) = ((block / 64) as usize, block % 64);
        self.written.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    fn mark_written(&mut self, block: u64) {
        let (word, bit) = ((block / 64) as usize, block % 64);
        if self.written.len() <= word {
            self.written.resize(word + 1, 0);
        }
        self.written[word] |= 1 << bit;
    }

    /// Where the bytes of `range` come from, in order, consecutive parts of one
    /// source joined.
    fn plan(&self, range: Range<u64>) -> Vec<Source> {
        let mut out: Vec<Source> = Vec::new();
        let mut at = range.start;
        while at < range.end {
            let block = at / BLOCK;
            let block_end = ((block + 1) * BLOCK).min(range.end);
            let (part, end) = if !self.is_written(block) && self.lower.is_some() && at < self.lower_len {
                let end = block_end.min(self.lower_len);
                (Source::Point(at..end), end)
            } else {
                (Source::Scratch(at..block_end), block_end)
            };
            match (out.last_mut(), &part) {
                (Some(Source::Point(r)), Source::Point(p)) if r.end == p.start => r.end = p.end,
                (Some(Source::Scratch(r)), Source::Scratch(p)) if r.end == p.start => r.end = p.end,
                _ => out.push(part),
            }
            at = end;
        }
        out
    }

    /// The bytes of `range` (within the file's size).
    pub async fn read(&self, lower: &Arc<Fs>, range: Range<u64>) -> Result<Vec<u8>, FsError> {
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        for part in self.plan(range) {
            match part {
                Source::Point(r) => {
                    let ino = self.lower.ok_or_else(|| FsError::Io("a block of no point's file".into()))?;
                    read_point(lower, ino, r, &mut out).await?;
                }
                Source::Scratch(r) => {
                    let start = out.len();
                    out.resize(start + (r.end - r.start) as usize, 0);
                    if let Some(f) = &self.scratch {
                        read_full_at(f, &mut out[start..], r.start)?;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Writes `data` at `offset`; the file was `size` bytes long. The blocks it
    /// covers in part are first filled as they read now. Returns the new size.
    pub async fn write(
        &mut self,
        lower: &Arc<Fs>,
        scratch_dir: &Path,
        offset: u64,
        data: &[u8],
        size: u64,
    ) -> Result<u64, FsError> {
        let end = offset.checked_add(data.len() as u64).ok_or(FsError::Invalid)?;
        if data.is_empty() {
            return Ok(size);
        }
        if end > MAX_FILE {
            return Err(FsError::Os(libc::EFBIG, format!("a branch's files end at {MAX_FILE} bytes")));
        }
        if self.scratch.is_none() {
            self.scratch = Some(tempfile::tempfile_in(scratch_dir).map_err(os)?);
        }
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        for block in [first, last] {
            let whole = block * BLOCK >= offset && (block + 1) * BLOCK <= end;
            if self.is_written(block) || whole {
                continue;
            }
            // What the block holds now, within the file's size: the rest is zeros.
            let span = block * BLOCK..((block + 1) * BLOCK).min(size);
            if span.start < span.end && self.lower.is_some() && span.start < self.lower_len {
                let now = self.read(lower, span.clone()).await?;
                self.scratch()?.write_all_at(&now, span.start).map_err(os)?;
            }
            self.mark_written(block);
            if first == last {
                break;
            }
        }
        if let Err(e) = self.scratch()?.write_all_at(data, offset) {
            // What part of it was written past the end must not show later, when
            // the file grows: past `size` a file reads as zeros.
            if end > size {
                let _ = self.scratch()?.set_len(size);
            }
            return Err(os(e));
        }
        for block in first..=last {
            self.mark_written(block);
        }
        Ok(size.max(end))
    }

    /// The file cut or grown to `new` bytes from `size`: what lies past `new` is
    /// gone, and reads as zeros if the file grows again.
    pub fn truncate(&mut self, new: u64, size: u64) -> Result<(), FsError> {
        if new < size {
            self.lower_len = self.lower_len.min(new);
            // Blocks wholly past `new` are no longer written; one cut in part keeps
            // its bytes before `new` (the scratch file is cut below).
            let keep = new.div_ceil(BLOCK);
            let (word, bit) = ((keep / 64) as usize, keep % 64);
            if word < self.written.len() {
                self.written[word] &= (1u64 << bit) - 1;
                self.written.truncate(word + 1);
            }
        }
        if let Some(f) = &self.scratch {
            f.set_len(new).map_err(os)?;
        }
        Ok(())
    }

    fn scratch(&self) -> Result<&File, FsError> {
        self.scratch.as_ref().ok_or_else(|| FsError::Io("no scratch file".into()))
    }
}

/// Appends the point's bytes of `range` of inode `ino` to `out`.
async fn read_point(lower: &Arc<Fs>, ino: u64, range: Range<u64>, out: &mut Vec<u8>) -> Result<(), FsError> {
    let mut at = range.start;
    while at < range.end {
        let want = (range.end - at).min(1 << 20) as u32;
        let data = lower.read(ino, at, want).await?;
        let got = data.with_slice(|b| {
            out.extend_from_slice(b);
            b.len() as u64
        });
        if got == 0 {
            // The point's file is shorter than its size says: never make bytes up.
            return Err(FsError::Damaged(format!("inode {ino} ends at {at}, before its size")));
        }
        at += got;
    }
    Ok(())
}

/// Fills `buf` from `offset`; past the end of the file, zeros.
fn read_full_at(f: &File, buf: &mut [u8], offset: u64) -> Result<(), FsError> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(os(e)),
        }
    }
    Ok(())
}

/// A scratch file's error, as its errno (ENOSPC, EIO).
pub fn os(e: std::io::Error) -> FsError {
    FsError::Os(e.raw_os_error().unwrap_or(libc::EIO), e.to_string())
}
