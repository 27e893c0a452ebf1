//! Reading a source's WAL back: its system, the pieces of a timeline that cover a
//! range (a segment's whole piece looked for by name, else its pieces listed), the
//! contiguous bytes along a path of timelines, and the history and other files
//! kept beside them.

use bytes::Bytes;
use jiff::Timestamp;

use super::format::{
    history_dir, history_name, open_piece, other_file_name, parse_history_name, piece_times, system_name, tli_dir, Lsn,
    PieceTimes, WalPiece, WalSystem, PIECE_TIMES_PREFIX,
};
use crate::error::RepoError;
use crate::object::{open_object, ObjectError};
use crate::repo::Repository;

/// Names asked for by the first listing of pieces (`Store::list_after_while`).
const LIST_PAGE: usize = 1000;
/// Segments whose whole piece is looked for at once, ahead of the one planned:
/// on an object store each look is a request.
const WHOLE_AHEAD: usize = 16;

/// Which timeline holds the WAL of each range of positions, in order: `(tli, begin,
/// end)`, the last one with no end. Reads along it take each range from its
/// timeline; `streamer::pg::history` makes one from a timeline's history file.
pub type TimelineSpans = [(u32, Lsn, Option<Lsn>)];

impl Repository {
    /// The cluster of `source`'s WAL, if any was stored.
    pub async fn wal_system(&self, source: &str) -> Result<Option<WalSystem>, RepoError> {
        let name = system_name(source);
        match self.store().get(&name).await {
            Ok(b) => {
                let plain = open_object(self.keys(), &name, &b)?;
                let s = WalSystem::decode(&plain).map_err(|cause| ObjectError::Decode { name: name.clone(), cause })?;
                Ok(Some(s))
            }
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The bytes of a piece and its times.
    pub async fn read_wal(&self, source: &str, piece: &WalPiece) -> Result<(PieceTimes, Bytes), RepoError> {
        let name = piece.name(source);
        let bytes = self.store().get(&name).await?;
        open_piece(self.keys(), &name, bytes, piece.len())
    }

    /// A piece's times: from its first bytes (one range read) when it keeps them
    /// apart (version 2), else from the whole piece (version 1).
    pub async fn wal_times(&self, source: &str, piece: &WalPiece) -> Result<PieceTimes, RepoError> {
        match self.wal_times_apart(source, piece).await? {
            Some(times) => Ok(times),
            None => Ok(self.read_wal(source, piece).await?.0),
        }
    }

    /// `piece`'s times if a range read of its first bytes tells them.
    async fn wal_times_apart(&self, source: &str, piece: &WalPiece) -> Result<Option<PieceTimes>, RepoError> {
        let name = piece.name(source);
        let prefix = self.store().get_range(&name, 0..PIECE_TIMES_PREFIX).await?;
        Ok(piece_times(self.keys(), &name, &prefix)?)
    }

    /// The pieces of timeline `tli` that hold WAL in `[from, to)`, by start. Pieces
    /// never cross a segment boundary, so the listing starts at `from`'s segment.
    pub async fn wal_pieces(
        &self,
        source: &str,
        system: &WalSystem,
        tli: u32,
        from: Lsn,
        to: Lsn,
    ) -> Result<Vec<WalPiece>, RepoError> {
        let dir = tli_dir(source, tli);
        let offset = format!("{dir}/{:016x}", system.segment_start(from).0);
        let mut out = Vec::new();
        self.store()
            .list_after_while(&dir, &offset, LIST_PAGE, |name| {
                let Some(p) = WalPiece::parse(tli, name) else { return true };
                if p.start >= to {
                    return false;
                }
                if p.end > from {
                    out.push(p);
                }
                true
            })
            .await?;
        Ok(out)
    }

    /// Where the stored WAL of timeline `tli` ends: the end of the piece that starts
    /// last, found with about 64 one-name listings (a binary search on names).
    pub async fn wal_end(&self, source: &str, system: &WalSystem, tli: u32) -> Result<Option<Lsn>, RepoError> {
        let dir = tli_dir(source, tli);
        // Whether some piece starts at or after `at`.
        let starts_from = |at: u64| {
            let dir = dir.clone();
            async move {
                let offset = format!("{dir}/{at:016x}");
                Ok::<_, RepoError>(!self.store().list_after(&dir, &offset, 1).await?.is_empty())
            }
        };
        if !starts_from(0).await? {
            return Ok(None);
        }
        let (mut lo, mut hi) = (0u64, u64::MAX);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if starts_from(mid).await? {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let seg = system.segment_start(Lsn(lo));
        let pieces = self.wal_pieces(source, system, tli, seg, Lsn(seg.0 + system.segment_size)).await?;
        Ok(pieces.iter().map(|p| p.end).max())
    }

    /// Which pieces hold the contiguous WAL along `path` from `from` up to at most
    /// `to`, and which range of each (`(piece, from, to)`, in order): segment by
    /// segment, the piece holding it whole if there is one (looked for by name, a
    /// few segments ahead at once), else from a listing of its pieces. Shorter
    /// when a piece is missing. Each range comes from the timeline
    /// the path has there. A range that starts at a segment's start is its piece's
    /// first byte, since pieces never cross a segment boundary.
    pub async fn wal_plan(
        &self,
        source: &str,
        system: &WalSystem,
        path: &TimelineSpans,
        from: Lsn,
        to: Lsn,
    ) -> Result<Vec<(WalPiece, Lsn, Lsn)>, RepoError> {
        let mut plan = Vec::new();
        let mut at = from;
        for &(tli, begin, end) in path {
            let (lo, hi) = (at.max(begin), end.map_or(to, |e| e.min(to)));
            if lo >= hi || lo != at {
                continue;
            }
            let size = system.segment_size;
            let first = system.segment_start(at).0;
            let mut segments =
                (0u64..).map_while(move |k| Some(first.checked_add(k.checked_mul(size)?)?).filter(|s| *s < hi.0));
            // The whole pieces of the next segments, looked for a few at once.
            let mut wholes = std::collections::VecDeque::new();
            while at < hi {
                let seg = system.segment_start(at);
                let seg_to = Lsn(seg.0.saturating_add(size)).min(hi);
                if wholes.is_empty() {
                    let segs: Vec<u64> = segments.by_ref().take(WHOLE_AHEAD).collect();
                    wholes.extend(self.whole_segments(source, system, tli, &segs).await);
                }
                // A segment's look failing fails the plan only once the plan needs it.
                if let Some(p) = wholes.pop_front().transpose()?.flatten() {
                    plan.push((p, at, seg_to));
                    at = seg_to;
                    continue;
                }
                let pieces = self.wal_pieces(source, system, tli, at, seg_to).await?;
                // Every piece starting at or before `at` holds it if it ends after
                // it, so the one reaching furthest among them is taken, until a gap.
                let (mut i, mut best): (usize, Option<&WalPiece>) = (0, None);
                while at < seg_to {
                    while i < pieces.len() && pieces[i].start <= at {
                        if best.is_none_or(|b| pieces[i].end > b.end) {
                            best = Some(&pieces[i]);
                        }
                        i += 1;
                    }
                    let Some(p) = best.filter(|b| b.end > at) else { return Ok(plan) };
                    let take_to = p.end.min(seg_to);
                    plan.push((p.clone(), at, take_to));
                    at = take_to;
                }
            }
        }
        Ok(plan)
    }

    /// When the first byte of the WAL at `piece`'s start was received, `piece`
    /// starting a segment, or a later time (an archived segment's, when a stream
    /// received its first bytes earlier): never an earlier one. A piece keeping its
    /// times apart (version 2) tells them from its first bytes, with nothing listed.
    /// Of a version-1 piece, which may hold the whole segment (16 MiB by default),
    /// the time is read from the smallest piece starting there (the first one a
    /// stream cut, a few KiB), when there is one.
    pub async fn segment_received(&self, source: &str, piece: &WalPiece) -> Result<Timestamp, RepoError> {
        if let Some(times) = self.wal_times_apart(source, piece).await? {
            return Ok(times.received);
        }
        let dir = tli_dir(source, piece.tli);
        let first = self.store().list_after(&dir, &format!("{dir}/{:016x}", piece.start.0), 1).await?;
        let smaller = first
            .first()
            .and_then(|n| WalPiece::parse(piece.tli, n))
            .filter(|p| p.start == piece.start && p.end < piece.end);
        if let Some(p) = smaller {
            match self.wal_times(source, &p).await {
                Ok(times) => return Ok(times.received),
                // Deleted since the listing (prune): the piece given holds the time too.
                Err(RepoError::Store(e)) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(self.read_wal(source, piece).await?.0.received)
    }

    /// Of each segment starting at one of `segs`, the piece of timeline `tli` that
    /// holds it whole (a stream stores each segment it received whole, prune merges
    /// the others, archive-push stores segments whole), if there is one: its name
    /// is known, so one look at it, not a listing of the segment's pieces; on
    /// `file://` all of them looked at on one task. Each answer in its place.
    async fn whole_segments(
        &self,
        source: &str,
        system: &WalSystem,
        tli: u32,
        segs: &[u64],
    ) -> Vec<Result<Option<WalPiece>, RepoError>> {
        let pieces: Vec<WalPiece> = segs
            .iter()
            .map(|&seg| WalPiece { tli, start: Lsn(seg), end: Lsn(seg.saturating_add(system.segment_size)) })
            .collect();
        let names: Vec<String> = pieces.iter().map(|p| p.name(source)).collect();
        let sizes = self.store().sizes(&names).await;
        pieces
            .into_iter()
            .zip(sizes)
            .map(|(piece, size)| match size {
                Ok(_) => Ok(Some(piece)),
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(e.into()),
            })
            .collect()
    }

    /// The contiguous WAL along `path` from `from` up to at most `to`: shorter when
    /// a piece is missing. A piece listed but gone when read (`ebb prune` deleted
    /// it, once a merged piece held its WAL) makes it list again, once.
    pub async fn wal_bytes(
        &self,
        source: &str,
        system: &WalSystem,
        path: &TimelineSpans,
        from: Lsn,
        to: Lsn,
    ) -> Result<Vec<u8>, RepoError> {
        let mut relisted = false;
        'plan: loop {
            let plan = self.wal_plan(source, system, path, from, to).await?;
            let mut out = Vec::new();
            for (p, lo, hi) in &plan {
                let wal = match self.read_wal(source, p).await {
                    Ok((_, wal)) => wal,
                    Err(RepoError::Store(e)) if e.is_not_found() && !relisted => {
                        relisted = true;
                        continue 'plan;
                    }
                    Err(e) => return Err(e),
                };
                let span = (lo.0 - p.start.0) as usize..(hi.0 - p.start.0) as usize;
                if plan.len() == 1 {
                    // One piece (a whole segment, most often): its own buffer, not a
                    // copy (a Bytes that owns its Vec alone gives it back).
                    let mut wal = Vec::from(wal);
                    wal.truncate(span.end);
                    wal.drain(..span.start);
                    return Ok(wal);
                }
                if out.is_empty() {
                    out.reserve((to.0 - from.0).min(super::MAX_MERGE) as usize);
                }
                out.extend_from_slice(&wal[span]);
            }
            return Ok(out);
        }
    }

    /// How far the contiguous WAL along `path` reaches from `from` (up to `to`),
    /// from listings alone: nothing is read.
    pub async fn wal_covered(
        &self,
        source: &str,
        system: &WalSystem,
        path: &TimelineSpans,
        from: Lsn,
        to: Lsn,
    ) -> Result<Lsn, RepoError> {
        Ok(self.wal_plan(source, system, path, from, to).await?.last().map_or(from, |(_, _, hi)| *hi))
    }

    /// The timelines of `source` that have a history stored, in no order.
    pub async fn wal_history_timelines(&self, source: &str) -> Result<Vec<u32>, RepoError> {
        let listed = self.store().list(&history_dir(source)).await?;
        Ok(listed.iter().filter_map(|o| parse_history_name(&o.name)).collect())
    }

    /// The history of timeline `tli` of `source`, as archived, if stored.
    pub async fn wal_history(&self, source: &str, tli: u32) -> Result<Option<Vec<u8>>, RepoError> {
        self.get_wal_object(&history_name(source, tli)).await
    }

    /// Another file archived for `source` under `name`, as it was, if stored.
    pub async fn wal_other_file(&self, source: &str, name: &str) -> Result<Option<Vec<u8>>, RepoError> {
        self.get_wal_object(&other_file_name(source, name)).await
    }

    /// The plaintext of a history or other file's object, if stored.
    pub(super) async fn get_wal_object(&self, object: &str) -> Result<Option<Vec<u8>>, RepoError> {
        match self.store().get(object).await {
            Ok(b) => Ok(Some(open_object(self.keys(), object, &b)?)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use jiff::Timestamp;

    use super::*;

    #[tokio::test]
    async fn wal_bytes_follow_the_timeline_path_and_stop_at_a_gap() {
        follow_the_timeline_path(crate::Store::open("memory://", true).unwrap()).await;
    }

    /// The same on the local filesystem, whose listings go through shard directories.
    #[tokio::test]
    async fn wal_bytes_follow_the_timeline_path_on_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::Store::open(&format!("file://{}", dir.path().display()), true).unwrap();
        follow_the_timeline_path(store).await;
    }

    async fn follow_the_timeline_path(store: crate::Store) {
        let secret = crate::Secret::Password(b"pw".to_vec());
        let kdf = crate::KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };
        let repo = Repository::init(store, &secret, kdf, "h".into()).await.unwrap().0;
        let system = WalSystem { system_id: 1, segment_size: 1 << 20 };
        repo.claim_wal_system("db", system).await.unwrap();
        let other = WalSystem { system_id: 2, ..system };
        assert!(repo.claim_wal_system("db", other).await.is_err(), "another cluster in the same source");
        let now = Timestamp::now();
        let bytes = |n: u8, len: usize| vec![n; len];
        let put = |tli, s: u64, e: u64, n| {
            let repo = repo.clone();
            async move {
                let p = WalPiece { tli, start: Lsn(s), end: Lsn(e) };
                repo.put_wal("db", &p, now, &bytes(n, (e - s) as usize)).await
            }
        };
        put(1, 0, 100, 1).await.unwrap();
        put(1, 50, 300, 1).await.unwrap();
        put(1, 300, 400, 1).await.unwrap();
        put(1, 500, 600, 1).await.unwrap();
        put(2, 200, 450, 2).await.unwrap();
        // The same bytes again are fine; others under the same name are refused.
        put(1, 300, 400, 1).await.unwrap();
        assert!(put(1, 300, 400, 9).await.is_err());
        let one = [(1, Lsn(0), None)];
        let wal = repo.wal_bytes("db", &system, &one, Lsn(10), Lsn(1000)).await.unwrap();
        assert_eq!(wal, bytes(1, 390), "from 10 to the gap at 400");
        // Timeline 2 branched off timeline 1 at 0xC8.
        let two = [(1, Lsn(0), Some(Lsn(0xC8))), (2, Lsn(0xC8), None)];
        let wal = repo.wal_bytes("db", &system, &two, Lsn(100), Lsn(1000)).await.unwrap();
        assert_eq!(wal, [bytes(1, 100), bytes(2, 250)].concat(), "timeline 1 to 0xC8, then timeline 2");
        assert_eq!(repo.wal_covered("db", &system, &one, Lsn(10), Lsn(u64::MAX)).await.unwrap(), Lsn(400));
        assert_eq!(repo.wal_covered("db", &system, &two, Lsn(100), Lsn(u64::MAX)).await.unwrap(), Lsn(450));
        assert_eq!(repo.wal_end("db", &system, 1).await.unwrap(), Some(Lsn(600)));
        assert_eq!(repo.wal_end("db", &system, 2).await.unwrap(), Some(Lsn(450)));
        assert_eq!(repo.wal_end("db", &system, 3).await.unwrap(), None);
    }

    /// A segment stored whole besides its pieces is read from that one piece, found
    /// without listing the segment: here listings fail. The segment after it, in
    /// pieces only, is listed, and where its WAL ends the WAL ends.
    #[tokio::test]
    async fn a_segment_stored_whole_is_read_without_a_listing() {
        use crate::faults::{Fault, Faults, Op};
        const SEG: u64 = 1 << 20;
        let faults = Faults::new();
        let secret = crate::Secret::KeyFile([6; 32]);
        let repo = Repository::init(
            crate::Store::memory().with_faults(faults.clone()),
            &secret,
            crate::DEFAULT_KDF,
            "h".into(),
        )
        .await
        .unwrap()
        .0;
        let system = WalSystem { system_id: 1, segment_size: SEG };
        repo.claim_wal_system("db", system).await.unwrap();
        let wal: Vec<u8> = (0..2 * SEG).map(|i| (i % 251) as u8).collect();
        let put = |s: u64, e: u64| {
            let (repo, bytes) = (repo.clone(), wal[s as usize..e as usize].to_vec());
            async move {
                repo.put_wal("db", &WalPiece { tli: 1, start: Lsn(s), end: Lsn(e) }, Timestamp::now(), &bytes).await
            }
        };
        for (s, e) in [(0, 1000), (1000, SEG), (0, SEG), (SEG, SEG + 5000), (SEG + 5000, SEG + 9000)] {
            put(s, e).await.unwrap();
        }
        let one = [(1, Lsn(0), None)];
        faults.always(Op::List, "wal/", Fault::Fail);
        let plan = repo.wal_plan("db", &system, &one, Lsn(10), Lsn(SEG)).await.unwrap();
        let whole = WalPiece { tli: 1, start: Lsn(0), end: Lsn(SEG) };
        assert_eq!(plan, vec![(whole.clone(), Lsn(10), Lsn(SEG))]);
        assert_eq!(repo.wal_bytes("db", &system, &one, Lsn(10), Lsn(SEG)).await.unwrap(), wal[10..SEG as usize]);
        faults.clear();
        let got = repo.wal_bytes("db", &system, &one, Lsn(500), Lsn(2 * SEG)).await.unwrap();
        assert_eq!(got, wal[500..(SEG + 9000) as usize]);
        // The time the segment's first byte came: the whole piece keeps its times
        // apart, so they are read from its first bytes, with nothing listed and the
        // rest of it not read (here damaged: the WAL would not open).
        let first = WalPiece { tli: 1, start: Lsn(0), end: Lsn(1000) };
        let came = repo.read_wal("db", &first).await.unwrap().0.received;
        let whole_came = repo.read_wal("db", &whole).await.unwrap().0.received;
        assert!(whole_came > came, "put after its first piece");
        let name = whole.name("db");
        let mut damaged = repo.store().get(&name).await.unwrap().to_vec();
        *damaged.last_mut().unwrap() ^= 1;
        repo.store().delete(&name).await.unwrap();
        repo.store().put_new(&name, damaged.into()).await.unwrap();
        assert!(repo.read_wal("db", &whole).await.unwrap_err().is_damage());
        faults.always(Op::List, "wal/", Fault::Fail);
        assert_eq!(repo.segment_received("db", &whole).await.unwrap(), whole_came);
        assert_eq!(repo.wal_times("db", &whole).await.unwrap().received, whole_came);
        faults.clear();

        // Pieces a version-1 writer stored keep their times with their WAL: the time
        // is read from the smallest piece starting the segment, and from the whole
        // one once that is gone.
        let (keys, times) = (repo.keys().clone(), |s: i64| PieceTimes {
            received: Timestamp::from_second(s).unwrap(),
            stored: Timestamp::from_second(s + 1).unwrap(),
        });
        let old_first = WalPiece { tli: 1, start: Lsn(2 * SEG), end: Lsn(2 * SEG + 1000) };
        let old_whole = WalPiece { tli: 1, start: Lsn(2 * SEG), end: Lsn(3 * SEG) };
        for (p, at) in [(&old_first, 1_000), (&old_whole, 2_000)] {
            let name = p.name("db");
            let v1 = super::super::format::tests::seal_piece_v1(&keys, &name, times(at), &vec![7; p.len() as usize]);
            repo.store().put_new(&name, v1.into()).await.unwrap();
        }
        assert_eq!(repo.read_wal("db", &old_whole).await.unwrap().0, times(2_000), "version 1 read whole");
        assert_eq!(repo.segment_received("db", &old_whole).await.unwrap(), times(1_000).received);
        repo.store().delete(&old_first.name("db")).await.unwrap();
        assert_eq!(repo.segment_received("db", &old_whole).await.unwrap(), times(2_000).received);
        let got = repo.wal_bytes("db", &system, &one, Lsn(500), Lsn(2 * SEG)).await.unwrap_err();
        assert!(got.is_damage(), "the damaged whole piece is an error, never other bytes");
    }

    #[tokio::test]
    async fn history_and_other_files_are_kept_apart() {
        let store = crate::Store::open("memory://", true).unwrap();
        let secret = crate::Secret::Password(b"pw".to_vec());
        let kdf = crate::KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };
        let repo = Repository::init(store, &secret, kdf, "h".into()).await.unwrap().0;
        repo.put_wal_history("db", 10, b"history").await.unwrap();
        repo.put_wal_history("db", 10, b"history").await.unwrap();
        assert!(repo.put_wal_history("db", 10, b"other").await.is_err(), "other content under the same name");
        repo.put_wal_other_file("db", "x.backup", b"label").await.unwrap();
        assert_eq!(repo.wal_history("db", 10).await.unwrap().as_deref(), Some(&b"history"[..]));
        assert_eq!(repo.wal_history("db", 11).await.unwrap(), None);
        assert_eq!(repo.wal_other_file("db", "x.backup").await.unwrap().as_deref(), Some(&b"label"[..]));
        assert_eq!(repo.wal_history_timelines("db").await.unwrap(), vec![10]);
    }
}
