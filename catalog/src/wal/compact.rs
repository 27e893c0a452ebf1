//! What of a source's WAL is still needed, and the compaction of its pieces
//! (FORMAT.md §13): the rules `prune` applies, as pure functions of names, and
//! the merge of a finished segment's pieces into one.
//!
//! - A piece is *needed* when it holds WAL at or after `WalKeep::from` (every moment
//!   from the base backup the `pitr_within` window starts from, or the newest one,
//!   onward) or in one of `WalKeep::spans` (what each kept base backup needs to be
//!   consistent). Timelines are not told apart: positions only grow across a
//!   promotion, so this keeps at least what each timeline path needs.
//! - A piece is *redundant* when another piece of its timeline holds all of its
//!   positions: the same timeline and positions always hold the same bytes.
//! - A segment is *mergeable* when its pieces hold all of it and none holds it
//!   alone: once merged, the small pieces are redundant.

use jiff::Timestamp;

use super::format::{Lsn, PieceTimes, WalPiece, WalSystem};
use crate::error::RepoError;
use crate::repo::Repository;

/// Segments larger than this are not merged: a merge holds one in memory.
pub const MAX_MERGE: u64 = 64 << 20;

/// The WAL a source's kept base backups need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalKeep {
    /// Every position from here on.
    pub from: Lsn,
    /// And each `[start, stop]`.
    pub spans: Vec<(Lsn, Lsn)>,
}

impl WalKeep {
    pub fn needs(&self, p: &WalPiece) -> bool {
        p.end > self.from || self.spans.iter().any(|&(a, b)| p.start <= b && p.end > a)
    }
}

/// The pieces of one timeline that another of its pieces holds entirely.
pub fn redundant(pieces: &[WalPiece]) -> Vec<WalPiece> {
    let mut sorted: Vec<&WalPiece> = pieces.iter().collect();
    // By start, the longest first: a piece is held by one before it that reaches
    // as far.
    sorted.sort_by_key(|p| (p.start, std::cmp::Reverse(p.end)));
    let mut reach: Option<Lsn> = None;
    let mut out = Vec::new();
    for p in sorted {
        if reach.is_some_and(|r| p.end <= r) {
            out.push(p.clone());
        } else {
            reach = Some(p.end);
        }
    }
    out
}

/// The segments of one timeline that its pieces hold all of, in more than one
/// piece and none alone: `(start, end)` of each, in order.
pub fn mergeable(pieces: &[WalPiece], segment_size: u64) -> Vec<(Lsn, Lsn)> {
    if segment_size > MAX_MERGE {
        return Vec::new();
    }
    let mut sorted: Vec<&WalPiece> = pieces.iter().collect();
    sorted.sort_by_key(|p| (p.start, std::cmp::Reverse(p.end)));
    let mut out = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let seg = sorted[i].start.0 - sorted[i].start.0 % segment_size;
        let seg_end = seg + segment_size;
        // Pieces never cross a segment's end: those of this segment follow in a run.
        let mut j = i;
        let (mut at, mut count, mut whole) = (seg, 0, false);
        while j < sorted.len() && sorted[j].start.0 < seg_end {
            let p = sorted[j];
            whole |= p.start.0 == seg && p.end.0 == seg_end;
            if p.start.0 <= at && p.end.0 > at {
                at = p.end.0;
                count += 1;
            }
            j += 1;
        }
        if at == seg_end && count > 1 && !whole {
            out.push((Lsn(seg), Lsn(seg_end)));
        }
        i = j;
    }
    out
}

impl Repository {
    /// Writes the WAL of timeline `tli` in `[start, end)` (a segment its pieces hold
    /// all of) as one piece, with the first piece's time of receipt and the last
    /// one's of storage. Returns the new piece, or none if the pieces no longer
    /// hold it all (deleted meanwhile).
    pub async fn merge_wal(
        &self,
        source: &str,
        system: &WalSystem,
        tli: u32,
        start: Lsn,
        end: Lsn,
    ) -> Result<Option<WalPiece>, RepoError> {
        let plan = self.wal_plan(source, system, &[(tli, Lsn(0), None)], start, end).await?;
        if plan.last().is_none_or(|(_, _, to)| *to != end) {
            return Ok(None);
        }
        let mut merged = Vec::with_capacity((end.0 - start.0) as usize);
        let mut times: Option<PieceTimes> = None;
        for (p, lo, hi) in &plan {
            let (t, wal) = match self.read_wal(source, p).await {
                Ok(x) => x,
                Err(RepoError::Store(e)) if e.is_not_found() => return Ok(None),
                Err(e) => return Err(e),
            };
            times = Some(match times {
                None => t,
                Some(first) => PieceTimes { received: first.received, stored: first.stored.max(t.stored) },
            });
            merged.extend_from_slice(&wal[(lo.0 - p.start.0) as usize..(hi.0 - p.start.0) as usize]);
        }
        let times = times.unwrap_or(PieceTimes { received: Timestamp::now(), stored: Timestamp::now() });
        let piece = WalPiece { tli, start, end };
        self.put_wal_with_times(source, &piece, times, &merged).await?;
        Ok(Some(piece))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::faults::{Fault, Faults, Op};
    use crate::keyslot::{Secret, DEFAULT_KDF};
    use crate::store::Store;

    fn p(start: u64, end: u64) -> WalPiece {
        WalPiece { tli: 1, start: Lsn(start), end: Lsn(end) }
    }

    #[test]
    fn a_piece_another_holds_is_redundant() {
        let pieces = [p(0, 10), p(10, 16), p(0, 16), p(16, 20), p(18, 20), p(17, 19), p(19, 25)];
        let mut got = redundant(&pieces);
        got.sort_by_key(|x| x.start);
        assert_eq!(got, [p(0, 10), p(10, 16), p(17, 19), p(18, 20)]);
        assert!(redundant(&[p(0, 10), p(5, 15)]).is_empty(), "overlapping, neither holds the other");
    }

    #[test]
    fn a_segment_held_in_several_pieces_is_mergeable() {
        const SEG: u64 = 16;
        let pieces = [
            // Segment 0: three pieces, overlapping: mergeable.
            p(0, 5),
            p(3, 9),
            p(9, 16),
            // Segment 1: already one piece beside the small ones.
            p(16, 20),
            p(20, 32),
            p(16, 32),
            // Segment 2: a hole.
            p(32, 40),
            p(41, 48),
            // Segment 3: one piece only.
            p(48, 64),
            // Segment 4: not finished.
            p(64, 70),
            p(70, 75),
        ];
        assert_eq!(mergeable(&pieces, SEG), [(Lsn(0), Lsn(16))]);
        assert!(mergeable(&pieces, MAX_MERGE * 2).is_empty(), "segments too large to hold");
    }

    #[test]
    fn the_wal_kept_is_from_the_anchor_and_each_base_backups_span() {
        let keep = WalKeep { from: Lsn(100), spans: vec![(Lsn(20), Lsn(30))] };
        assert!(keep.needs(&p(90, 101)));
        assert!(keep.needs(&p(100, 110)));
        assert!(!keep.needs(&p(90, 100)));
        assert!(keep.needs(&p(30, 31)), "the stop position itself");
        assert!(keep.needs(&p(10, 21)));
        assert!(!keep.needs(&p(10, 20)));
        assert!(!keep.needs(&p(31, 40)));
    }

    /// A merged piece holds the bytes of the pieces it replaces, with their times;
    /// a reader that listed a small piece deleted before it read it lists again and
    /// reads the merged one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_merged_segment_reads_the_same_and_a_reader_lists_again() {
        let faults = Faults::new();
        let store = Store::memory().with_faults(faults.clone());
        let repo = Repository::init(store, &Secret::KeyFile([4; 32]), DEFAULT_KDF, "t".into()).await.unwrap().0;
        const SEG: u64 = 1 << 20;
        let system = WalSystem { system_id: 7, segment_size: SEG };
        repo.claim_wal_system("db", system).await.unwrap();
        let wal: Vec<u8> = (0..SEG + 100).map(|i| (i * 7 % 251) as u8).collect();
        let t0: Timestamp = "2026-11-26T10:00:00Z".parse().unwrap();
        let cuts = [0, 1000, 400_000, 400_500, SEG, SEG + 100];
        for w in cuts.windows(2) {
            let piece = WalPiece { tli: 1, start: Lsn(w[0]), end: Lsn(w[1]) };
            let received = t0 + jiff::SignedDuration::from_secs(w[0] as i64);
            repo.put_wal("db", &piece, received, &wal[w[0] as usize..w[1] as usize]).await.unwrap();
        }
        let path = [(1, Lsn(0), None)];
        let pieces = repo.wal_pieces("db", &system, 1, Lsn(0), Lsn(u64::MAX)).await.unwrap();
        assert_eq!(mergeable(&pieces, SEG), [(Lsn(0), Lsn(SEG))]);

        // A reader plans with the small pieces; its first read waits while the
        // segment is merged and the small pieces deleted.
        let first_small = WalPiece { tli: 1, start: Lsn(0), end: Lsn(1000) }.name("db");
        faults.nth(Op::Get, &first_small, 1, Fault::Delay(Duration::from_secs(5)));
        let reader = {
            let repo = repo.clone();
            tokio::spawn(async move { repo.wal_bytes("db", &system, &path, Lsn(10), Lsn(SEG + 50)).await })
        };
        // The reader's read of the piece is held from here on.
        while faults.fired() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let merged = repo.merge_wal("db", &system, 1, Lsn(0), Lsn(SEG)).await.unwrap().unwrap();
        for w in cuts[..cuts.len() - 1].windows(2) {
            repo.store().delete(&WalPiece { tli: 1, start: Lsn(w[0]), end: Lsn(w[1]) }.name("db")).await.unwrap();
        }
        assert_eq!(reader.await.unwrap().unwrap(), wal[10..(SEG + 50) as usize]);

        let (times, bytes) = repo.read_wal("db", &merged).await.unwrap();
        assert_eq!(bytes.as_ref(), &wal[..SEG as usize]);
        assert_eq!(times.received, t0, "received: the first piece's");
        let left = repo.wal_pieces("db", &system, 1, Lsn(0), Lsn(u64::MAX)).await.unwrap();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(redundant(&left).is_empty());
        assert!(mergeable(&left, SEG).is_empty());
    }
}
