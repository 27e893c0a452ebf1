//! Reads WAL records far enough to find transaction ends (commits and aborts) and
//! their times: what `recovery_target_time` stops at. PostgreSQL 13 and later
//! refuse to finish a recovery whose target time is never passed, so `ebb pg
//! restore` sets the target only when the WAL holds a transaction end after it;
//! otherwise every transaction in the WAL ended at or before T, and recovery to
//! the end of the WAL is recovery to T.
//!
//! The layout is PostgreSQL 15's (`access/xlogrecord.h`, `access/xlog_internal.h`):
//! pages with a short header (a long one at the start of a segment), records
//! aligned to 8 bytes that may span pages, block references before the main data.
//! A scan starts at a record start, or at a segment start: there the page headers
//! say how much of a record begun in the segment before continues into it
//! (`xlp_rem_len`), and the scan skips it, as PostgreSQL's `XLogFindNextRecord` does.

use catalog::wal::Lsn;

const SHORT_HEADER: u64 = 24;
const LONG_HEADER: u64 = 40;
const RECORD_HEADER: usize = 24;
const XLOG_PAGE_MAGIC: u16 = 0xD110;
const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const RM_XLOG_ID: u8 = 0;
const RM_XACT_ID: u8 = 1;
const XLOG_SWITCH: u8 = 0x40;
const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_COMMIT: u8 = 0x00;
const XLOG_XACT_ABORT: u8 = 0x20;
const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;
const XLR_MAX_BLOCK_ID: u8 = 32;
const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;
const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
const BKPBLOCK_SAME_REL: u8 = 0x80;
const BKPIMAGE_HAS_HOLE: u8 = 0x01;
const BKPIMAGE_COMPRESSED: u8 = 0x04 | 0x08 | 0x10;
/// Records are never this long; a length past it is garbage, the end of the WAL.
const MAX_RECORD: usize = 1 << 30;

/// A transaction end: where its record starts, and its time in microseconds since
/// 2000-01-01 (PostgreSQL's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XactEnd {
    pub lsn: Lsn,
    pub time: i64,
}

pub enum Step {
    /// A transaction end.
    End(XactEnd),
    /// Some other record.
    Other,
    /// More WAL is needed, from `buffered_end()` on.
    NeedMore,
    /// The WAL ends here (zeros or a torn record).
    Finished,
}

/// WAL bytes from a record start on, read record by record.
pub struct Scanner {
    buf: Vec<u8>,
    /// The LSN of `buf[0]`.
    base: u64,
    /// The next record starts at or after this (before alignment and page headers).
    pos: u64,
    segment_size: u64,
    page_size: u64,
    /// No more WAL will be pushed.
    eof: bool,
    /// `pos` is a segment start, and the first record starting in that segment
    /// is still to be found.
    find_first: bool,
}

impl Scanner {
    /// Starts at `start`, which must be a record start (a checkpoint's redo point).
    pub fn new(start: Lsn, segment_size: u64) -> Scanner {
        Scanner {
            buf: Vec::new(),
            base: start.0,
            pos: start.0,
            segment_size,
            page_size: 8192,
            eof: false,
            find_first: false,
        }
    }

    /// Starts at `segment`, the first byte of a segment: the first record is the
    /// first one that starts in it.
    pub fn at_segment(segment: Lsn, segment_size: u64) -> Scanner {
        Scanner { find_first: true, ..Scanner::new(segment, segment_size) }
    }

    /// Where the buffered WAL ends: the next push must start here.
    pub fn buffered_end(&self) -> Lsn {
        Lsn(self.base + self.buf.len() as u64)
    }

    /// Adds the WAL that follows; `last` when there is none after it.
    pub fn push(&mut self, wal: &[u8], last: bool) {
        // Drop what lies before the current record.
        let keep_from = (self.pos.saturating_sub(self.base) as usize).min(self.buf.len());
        if keep_from > (64 << 20) {
            self.buf.drain(..keep_from);
            self.base += keep_from as u64;
        }
        self.buf.extend_from_slice(wal);
        self.eof |= last;
    }

    fn header_at(&self, page: u64) -> u64 {
        if page.is_multiple_of(self.segment_size) {
            LONG_HEADER
        } else {
            SHORT_HEADER
        }
    }

    /// `n` bytes of record data from `at`, skipping page headers; `None` when not
    /// buffered yet. Returns the bytes and the position after them.
    fn read(&self, mut at: u64, n: usize) -> Option<(Vec<u8>, u64)> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let in_page = at % self.page_size;
            if in_page == 0 {
                at += self.header_at(at);
                continue;
            }
            let page_end = at - in_page + self.page_size;
            let take = ((page_end - at) as usize).min(n - out.len());
            let from = at.checked_sub(self.base)? as usize;
            out.extend_from_slice(self.buf.get(from..from + take)?);
            at += take as u64;
        }
        Some((out, at))
    }

    /// Where the first record that starts in the segment at `self.pos` begins:
    /// after the part of a record that continues from the segment before, which
    /// may span pages. `Err` when a page header is not one (not WAL, or the end of
    /// it); `Ok(None)` when more WAL is needed.
    fn first_record(&self) -> Result<Option<u64>, ()> {
        let mut page = self.pos;
        loop {
            let header = self.header_at(page);
            let Some(from) = page.checked_sub(self.base) else { return Err(()) };
            let Some(h) = usize::try_from(from).ok().and_then(|f| self.buf.get(f..f + header as usize)) else {
                return Ok(None);
            };
            let magic = u16::from_le_bytes([h[0], h[1]]);
            let info = u16::from_le_bytes([h[2], h[3]]);
            let pageaddr = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
            let rem_len = u64::from(u32::from_le_bytes(h[16..20].try_into().expect("4 bytes")));
            if magic != XLOG_PAGE_MAGIC || pageaddr != page {
                return Err(());
            }
            if info & XLP_FIRST_IS_CONTRECORD == 0 {
                return page.checked_add(header).ok_or(()).map(Some);
            }
            let rest = rem_len.div_ceil(8) * 8;
            if rest < self.page_size - header {
                return page.checked_add(header + rest).ok_or(()).map(Some);
            }
            // The record goes on past this page; the next page's header says how far.
            page = page.checked_add(self.page_size).ok_or(())?;
        }
    }

    /// The next record.
    pub fn next_record(&mut self) -> Step {
        if self.find_first {
            match self.first_record() {
                Ok(Some(at)) => {
                    self.pos = at;
                    self.find_first = false;
                }
                Ok(None) => return self.more(),
                Err(()) => return Step::Finished,
            }
        }
        let mut at = self.pos.div_ceil(8) * 8;
        if at.is_multiple_of(self.page_size) {
            at += self.header_at(at);
        }
        let Some((head, _)) = self.read(at, 4) else { return self.more() };
        let total = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        if !(RECORD_HEADER..=MAX_RECORD).contains(&total) {
            return Step::Finished;
        }
        let Some((rec, end)) = self.read(at, total) else { return self.more() };
        self.pos = end;
        let (info, rmid) = (rec[16], rec[17]);
        if rmid == RM_XLOG_ID && info & 0xF0 == XLOG_SWITCH {
            // The rest of the segment is unused.
            let seg_end = (end - 1) / self.segment_size * self.segment_size + self.segment_size;
            self.pos = seg_end;
            return Step::Other;
        }
        if rmid != RM_XACT_ID {
            return Step::Other;
        }
        let op = info & XLOG_XACT_OPMASK;
        if !matches!(op, XLOG_XACT_COMMIT | XLOG_XACT_ABORT | XLOG_XACT_COMMIT_PREPARED | XLOG_XACT_ABORT_PREPARED) {
            return Step::Other;
        }
        match main_data(&rec) {
            Some(main) if main.len() >= 8 => {
                let time = i64::from_le_bytes(main[..8].try_into().expect("8 bytes"));
                Step::End(XactEnd { lsn: Lsn(at), time })
            }
            _ => Step::Finished,
        }
    }

    fn more(&self) -> Step {
        if self.eof {
            Step::Finished
        } else {
            Step::NeedMore
        }
    }
}

/// The main data of a record: the last bytes, after the block headers say how many.
fn main_data(rec: &[u8]) -> Option<&[u8]> {
    let mut off = RECORD_HEADER;
    let len = loop {
        let id = *rec.get(off)?;
        match id {
            XLR_BLOCK_ID_DATA_SHORT => break *rec.get(off + 1)? as usize,
            XLR_BLOCK_ID_DATA_LONG => break u32::from_le_bytes(rec.get(off + 1..off + 5)?.try_into().ok()?) as usize,
            XLR_BLOCK_ID_ORIGIN => off += 3,
            XLR_BLOCK_ID_TOPLEVEL_XID => off += 5,
            id if id <= XLR_MAX_BLOCK_ID => {
                let flags = *rec.get(off + 1)?;
                off += 4;
                if flags & BKPBLOCK_HAS_IMAGE != 0 {
                    let info = *rec.get(off + 4)?;
                    off += 5;
                    if info & BKPIMAGE_HAS_HOLE != 0 && info & BKPIMAGE_COMPRESSED != 0 {
                        off += 2;
                    }
                }
                if flags & BKPBLOCK_SAME_REL == 0 {
                    off += 12;
                }
                off += 4;
            }
            _ => return None,
        }
    };
    rec.len().checked_sub(len).map(|start| &rec[start..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::testwal::MadeUp;

    /// From every segment's start, the scan finds the first record that starts in
    /// it, past a record continued from the segment before over one page or many,
    /// and then every commit after it, as a scan from the beginning does.
    #[test]
    fn a_scan_from_a_segment_start_skips_the_record_continued_into_it() {
        let seg = 1u64 << 20;
        let mut made = MadeUp::new(seg);
        let mut time = 1_000_000;
        let mut i = 0;
        while (made.wal.len() as u64) < 12 * seg {
            // Records of up to 100 KB: some continue over more than a page.
            match i % 5 {
                0 => made.other(100_000 + i * 37 % 5000),
                1 | 3 => made.other(i * 131 % 9000),
                _ => {
                    time += 1;
                    made.commit(time);
                }
            }
            i += 1;
        }
        let commits_from = |at: u64| -> Vec<(u64, i64)> {
            made.records.iter().filter(|(r, _)| *r >= at).filter_map(|(r, t)| Some((*r, (*t)?))).collect()
        };
        let mut continued = 0;
        for s in 1..12 {
            let start = s * seg;
            let first = made.records.iter().map(|(r, _)| *r).find(|r| *r >= start).unwrap();
            continued += usize::from(first > start + 40);
            let mut scanner = Scanner::at_segment(Lsn(start), seg);
            scanner.push(&made.wal[start as usize..], true);
            let mut ends = Vec::new();
            loop {
                match scanner.next_record() {
                    Step::End(x) => ends.push((x.lsn.0, x.time)),
                    Step::Other => {}
                    Step::NeedMore | Step::Finished => break,
                }
            }
            assert_eq!(ends, commits_from(first), "from segment {s}");
        }
        assert!(continued >= 8, "only {continued} segments begin inside a record");
    }

    #[test]
    fn a_segment_start_that_is_not_wal_ends_the_scan() {
        let mut scanner = Scanner::at_segment(Lsn(1 << 20), 1 << 20);
        scanner.push(&[0u8; 8192], false);
        assert!(matches!(scanner.next_record(), Step::Finished));
        // Too little to read the header yet.
        let mut scanner = Scanner::at_segment(Lsn(1 << 20), 1 << 20);
        scanner.push(&[0x10, 0xD1], false);
        assert!(matches!(scanner.next_record(), Step::NeedMore));
    }
}
