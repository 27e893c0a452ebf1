//! Read planning, free of I/O: which bytes of which chunks (or zeros) a read
//! needs, where `SEEK_DATA` and `SEEK_HOLE` land, how far ahead of a sequential
//! reader chunks are fetched, and how a read's pieces reach the kernel.

use std::ops::Range;

use bytes::Bytes;
use catalog::tree::{Entry, Extent};
use catalog::BlobRef;

use crate::error::FsError;

/// A sequential reader has this many bytes fetched or in flight ahead of it, enough
/// to keep the store busy and every core decrypting while the reader copies.
const READ_AHEAD_BYTES: u64 = 32 << 20;
/// A read this close to where the last one ended continues it.
const SEQUENTIAL_SLACK: u64 = 1 << 20;

/// What a read returns, piece by piece.
pub(crate) enum Piece {
    Zeros(usize),
    /// These bytes of this chunk.
    Chunk(BlobRef, Range<usize>),
}

pub(crate) struct ReadPlan {
    pub pieces: Vec<Piece>,
    pub len: usize,
    /// The index of the extent the read starts in.
    pub first: usize,
}

/// Where each extent of a file starts.
pub(crate) fn extent_starts(entry: &Entry) -> Vec<u64> {
    let mut pos = 0;
    entry
        .content
        .iter()
        .map(|x| {
            let s = pos;
            pos += x.len();
            s
        })
        .collect()
}

/// The pieces of `size` bytes at `offset` of the file `entry`, whose extents start
/// at `starts`.
pub(crate) fn read_plan(entry: &Entry, starts: &[u64], offset: u64, size: u32) -> ReadPlan {
    let end = (offset + size as u64).min(entry.size);
    let mut idx = starts.partition_point(|&s| s <= offset).saturating_sub(1);
    let mut plan = ReadPlan { pieces: Vec::new(), len: 0, first: idx };
    let mut pos = offset;
    while pos < end && idx < entry.content.len() {
        let ext = &entry.content[idx];
        let (s, e) = (starts[idx], starts[idx] + ext.len());
        let (from, to) = (pos.max(s), end.min(e));
        plan.pieces.push(match ext {
            Extent::Hole(_) => Piece::Zeros((to - from) as usize),
            Extent::Data(b) => Piece::Chunk(*b, (from - s) as usize..(to - s) as usize),
        });
        plan.len += (to - from) as usize;
        pos = to;
        idx += 1;
    }
    plan
}

/// Where the next data (`data`) or hole is at or after `offset`, from the stored
/// extents, so that `cp --sparse`, `rsync -S` and `tar -S` skip holes instead of
/// reading zeros. The end of the file counts as a hole, as on every filesystem.
pub(crate) fn seek(entry: &Entry, starts: &[u64], offset: u64, data: bool) -> Result<u64, FsError> {
    if offset >= entry.size {
        return Err(FsError::NoSuchOffset);
    }
    let first = starts.partition_point(|&s| s <= offset).saturating_sub(1);
    for (i, ext) in entry.content.iter().enumerate().skip(first) {
        let is_data = matches!(ext, Extent::Data(_)) && !ext.is_empty();
        if is_data == data {
            return Ok(starts[i].max(offset));
        }
    }
    if data {
        Err(FsError::NoSuchOffset)
    } else {
        Ok(entry.size)
    }
}

/// Where a file's reader is: where its reads ended, how many in a row were
/// sequential, and the first extent not yet read ahead.
#[derive(Default)]
pub(crate) struct Reader {
    end: u64,
    streak: u32,
    ahead: usize,
}

impl Reader {
    /// A read of `offset..end`, starting in extent `first`, has come: the extents to
    /// fetch ahead now, if any. A sequential reader is kept `READ_AHEAD_BYTES`
    /// ahead, refilled when half of it is used, so that whole runs of chunks come in
    /// one ranged GET each. A seek drops the read-ahead: nothing more is fetched
    /// until reads are sequential again.
    pub fn advance(&mut self, entry: &Entry, starts: &[u64], offset: u64, end: u64, first: usize) -> Range<usize> {
        let pos = |i: usize| starts.get(i).copied().unwrap_or(entry.size);
        // The kernel sends a reader's requests in order, but they may be served out
        // of order: near the last end counts as going on from it.
        if offset.abs_diff(self.end) <= SEQUENTIAL_SLACK {
            self.streak += 1;
            self.end = self.end.max(end);
        } else {
            (self.streak, self.end, self.ahead) = (0, end, first);
        }
        // Reading from the start is reading through; elsewhere it takes two reads in
        // a row, so that random readers do not start read-ahead by chance.
        if offset != 0 && self.streak < 2 {
            self.ahead = first;
            return first..first;
        }
        self.ahead = self.ahead.max(first);
        if pos(self.ahead) >= offset + READ_AHEAD_BYTES / 2 {
            return self.ahead..self.ahead;
        }
        let from = self.ahead;
        let mut to = from;
        while to < entry.content.len() && pos(to) < offset + READ_AHEAD_BYTES {
            to += 1;
        }
        self.ahead = to;
        from..to
    }
}

/// The bytes of one read, as the pieces they lie in: a read within one chunk, the
/// usual case, is one slice of the cached chunk and copies nothing; a read across
/// chunks or holes has several, joined only when replying (`with_slice`).
#[derive(Debug, Default)]
pub struct Data {
    pieces: Vec<Bytes>,
}

thread_local! {
    /// Where this thread joins the pieces of a read, kept from one read to the next.
    static JOINED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Data {
    pub(crate) fn zeros(&mut self, n: usize) {
        self.pieces.push(Bytes::from(vec![0; n]));
    }

    pub(crate) fn push(&mut self, piece: Bytes) {
        self.pieces.push(piece);
    }

    /// Calls `f` with the bytes in one slice: the piece itself, or the pieces copied
    /// into a buffer this thread keeps. A buffer of its own for each read (mapped
    /// afresh, reads being large) had every page faulted in and zeroed every time.
    pub fn with_slice<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        match self.pieces.as_slice() {
            [] => f(&[]),
            [one] => f(one),
            pieces => JOINED.with_borrow_mut(|buf| {
                buf.clear();
                pieces.iter().for_each(|p| buf.extend_from_slice(p));
                f(buf)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog::tree::EntryKind;
    use catalog::Id;

    const MIB: u32 = 1 << 20;

    /// A file of `n` chunks of 1 MiB each.
    fn file(n: usize) -> (Entry, Vec<u64>) {
        let mut e = Entry::new(b"f".to_vec(), EntryKind::File);
        e.content = (0..n)
            .map(|i| {
                let b = BlobRef { id: Id([i as u8; 32]), pack: Id([0; 32]), offset: 0, length: MIB + 29, raw_len: MIB };
                Extent::Data(b)
            })
            .collect();
        e.size = n as u64 * MIB as u64;
        let starts = extent_starts(&e);
        (e, starts)
    }

    #[test]
    fn a_reader_from_the_start_is_kept_ahead_and_refilled_at_half() {
        let (e, starts) = file(100);
        let mut r = Reader::default();
        let step = 128 << 10;
        assert_eq!(r.advance(&e, &starts, 0, step, 0), 0..32);
        // Nothing more until half of the read-ahead is used.
        let mut offset = step;
        while offset <= 16 * MIB as u64 {
            let first = (offset / MIB as u64) as usize;
            assert!(r.advance(&e, &starts, offset, offset + step, first).is_empty(), "refilled early at {offset}");
            offset += step;
        }
        // Refilled to 32 MiB beyond the read.
        assert_eq!(r.advance(&e, &starts, offset, offset + step, 16), 32..49);
    }

    #[test]
    fn random_reads_start_no_read_ahead_and_a_seek_drops_it() {
        let (e, starts) = file(100);
        let mut r = Reader::default();
        assert!(r.advance(&e, &starts, 50 * MIB as u64, 50 * MIB as u64 + 4096, 50).is_empty());
        assert!(r.advance(&e, &starts, 10 * MIB as u64, 10 * MIB as u64 + 4096, 10).is_empty());
        assert!(r.advance(&e, &starts, 70 * MIB as u64, 70 * MIB as u64 + 4096, 70).is_empty());
        // Two more reads in a row make it sequential.
        let at = 70 * MIB as u64 + 4096;
        assert!(r.advance(&e, &starts, at, at + 4096, 70).is_empty());
        assert_eq!(r.advance(&e, &starts, at + 4096, at + 8192, 70), 70..100);
        // A seek back to the start reads through again, from the start.
        assert_eq!(r.advance(&e, &starts, 0, 4096, 0), 0..32);
    }

    #[test]
    fn plans_cross_chunks_and_holes_and_stop_at_the_end() {
        let (mut e, _) = file(2);
        e.content.insert(1, Extent::Hole(10));
        e.size += 10;
        let starts = extent_starts(&e);
        let plan = read_plan(&e, &starts, MIB as u64 - 5, 20);
        let lens: Vec<usize> = plan
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Zeros(n) => *n,
                Piece::Chunk(_, r) => r.len(),
            })
            .collect();
        assert_eq!((plan.first, lens), (0, vec![5, 10, 5]));
        assert_eq!(read_plan(&e, &starts, e.size - 3, 100).len, 3);
        assert_eq!(read_plan(&e, &starts, e.size + 3, 100).len, 0);
        assert_eq!(seek(&e, &starts, MIB as u64 + 2, true).unwrap(), MIB as u64 + 10);
        assert_eq!(seek(&e, &starts, 3, false).unwrap(), MIB as u64);
        assert!(seek(&e, &starts, e.size, false).is_err());
    }
}
