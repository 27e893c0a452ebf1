//! PostgreSQL WAL in the repository, as opaque bytes by timeline (a `u32`) and
//! position range (`u64`s) (FORMAT.md §9b). What the bytes and names mean to
//! PostgreSQL is `streamer::pg`'s business. Object-name grammar, with `<TLI>` = 8
//! lowercase hex digits and positions 16:
//!
//! - `wal/<source>/system`: the cluster's system identifier and WAL segment size,
//!   written by the first writer; every later writer must match it.
//! - `wal/<source>/<TLI>/<start>-<end>`: the WAL bytes of `[start, end)` on that
//!   timeline, with when its first byte was received and when it was sent to the
//!   store. Pieces never cross a segment boundary, so one segment's pieces are one
//!   narrow listing.
//! - `wal/<source>/history/<TLI>`: the history of timeline `TLI`, as archived.
//! - `wal/<source>/files/<name>`: another archived file, kept under its own name.
//!
//! The same timeline and position always hold the same bytes, so a piece stored
//! twice (a restart after a crash) is stored once; different bytes under one name
//! are an error, never an overwrite.

use bytes::Bytes;
use jiff::Timestamp;

use crate::codec::{DecodeError, Decoder, Encoder};
use crate::error::RepoError;
use crate::object::{open_object, seal_object, seal_object_with, ObjectError};
use crate::repo::Repository;
use crate::store::StoreError;
use crate::time::unix_nanos;

const WAL_DIR: &str = "wal";
const VERSION: u8 = 1;
const LIST_PAGE: usize = 1000;
/// PostgreSQL allows segments of 1 MiB to 1 GiB.
const MAX_SEGMENT: u64 = 1 << 30;

/// A WAL position: a byte offset in the cluster's WAL, as a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

/// Whether the system object may hold this segment size: a power of two from 1 MiB
/// to 1 GiB, the sizes PostgreSQL allows. Positions are cut into segments of it.
pub fn valid_segment_size(size: u64) -> bool {
    size.is_power_of_two() && (1 << 20..=MAX_SEGMENT).contains(&size)
}

/// One stored piece of WAL, known from its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalPiece {
    pub tli: u32,
    pub start: Lsn,
    pub end: Lsn,
}

/// The directory of timeline `tli`'s pieces.
fn tli_dir(source: &str, tli: u32) -> String {
    format!("{WAL_DIR}/{source}/{tli:08x}")
}

/// The name of the system object of `source`.
fn system_name(source: &str) -> String {
    format!("{WAL_DIR}/{source}/system")
}

/// The directory of the history objects of `source`.
fn history_dir(source: &str) -> String {
    format!("{WAL_DIR}/{source}/history")
}

/// The name of the history object of timeline `tli`.
fn history_name(source: &str, tli: u32) -> String {
    format!("{}/{tli:08x}", history_dir(source))
}

/// The timeline a name in `history_dir` is the history of.
fn parse_history_name(name: &str) -> Option<u32> {
    name.rsplit('/').next().and_then(|n| u32::from_str_radix(n, 16).ok())
}

/// The name of the object holding the archived file `name`.
fn other_file_name(source: &str, name: &str) -> String {
    format!("{WAL_DIR}/{source}/files/{name}")
}

impl WalPiece {
    pub fn name(&self, source: &str) -> String {
        format!("{}/{:016x}-{:016x}", tli_dir(source, self.tli), self.start.0, self.end.0)
    }

    pub(crate) fn parse(tli: u32, name: &str) -> Option<WalPiece> {
        let leaf = name.rsplit('/').next()?;
        let (s, e) = leaf.split_once('-')?;
        let hex16 = |x: &str| (x.len() == 16).then(|| u64::from_str_radix(x, 16).ok()).flatten();
        let (start, end) = (hex16(s)?, hex16(e)?);
        (start < end).then_some(WalPiece { tli, start: Lsn(start), end: Lsn(end) })
    }

    pub fn len(&self) -> u64 {
        self.end.0 - self.start.0
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// The cluster a source's WAL comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalSystem {
    pub system_id: u64,
    pub segment_size: u64,
}

impl WalSystem {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.u8(VERSION);
        e.u64(self.system_id);
        e.u64(self.segment_size);
        e.buf
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<WalSystem, DecodeError> {
        let mut d = Decoder::new("WAL system", bytes);
        if d.u8()? != VERSION {
            return Err(d.error("unknown version"));
        }
        let s = WalSystem { system_id: d.u64()?, segment_size: d.u64()? };
        d.finish()?;
        if !valid_segment_size(s.segment_size) {
            return Err(DecodeError::new("WAL system", format!("bad segment size {}", s.segment_size)));
        }
        Ok(s)
    }

    pub fn segment_start(&self, lsn: Lsn) -> Lsn {
        Lsn(lsn.0 - lsn.0 % self.segment_size)
    }
}

/// When a piece's first byte reached ebb, and when the piece was sent to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PieceTimes {
    pub received: Timestamp,
    pub stored: Timestamp,
}

/// Bytes before the WAL in a piece's plaintext: a version, then when its first byte
/// was received and when it was stored.
pub const PIECE_HEADER: usize = 17;

fn write_piece_header(plain: &mut [u8], times: PieceTimes) {
    plain[0] = VERSION;
    plain[1..9].copy_from_slice(&unix_nanos(times.received).unwrap_or(0).to_le_bytes());
    plain[9..17].copy_from_slice(&unix_nanos(times.stored).unwrap_or(0).to_le_bytes());
}

pub(crate) fn decode_piece(name: &str, plain: Vec<u8>, len: u64) -> Result<(PieceTimes, Bytes), RepoError> {
    let bad = |p: &str| ObjectError::Decode { name: name.into(), cause: DecodeError::new("WAL piece", p) };
    if plain.len() < PIECE_HEADER || plain[0] != VERSION {
        return Err(bad("bad header").into());
    }
    let time = |at: usize| {
        let nanos = u64::from_le_bytes(plain[at..at + 8].try_into().expect("8 bytes"));
        Timestamp::from_nanosecond(i128::from(nanos)).map_err(|_| bad("bad time"))
    };
    let times = PieceTimes { received: time(1)?, stored: time(9)? };
    let wal = Bytes::from(plain).slice(PIECE_HEADER..);
    if wal.len() as u64 != len {
        return Err(bad("length does not match the name").into());
    }
    Ok((times, wal))
}

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
        decode_piece(&name, open_object(self.keys(), &name, &bytes)?, piece.len())
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
        let mut offset = format!("{dir}/{:016x}", system.segment_start(from).0);
        let mut out = Vec::new();
        loop {
            let page = self.store().list_after(&dir, &offset, LIST_PAGE).await?;
            let full = page.len() == LIST_PAGE;
            for o in &page {
                let Some(p) = WalPiece::parse(tli, &o.name) else { continue };
                if p.start >= to {
                    return Ok(out);
                }
                if p.end > from {
                    out.push(p);
                }
            }
            match page.last() {
                Some(last) if full => offset = last.name.clone(),
                _ => return Ok(out),
            }
        }
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
    /// `to`, and which range of each: from listings alone. Shorter when a piece is
    /// missing. Each range comes from the timeline the path has there.
    async fn wal_plan(
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
            let pieces = self.wal_pieces(source, system, tli, lo, hi).await?;
            // Every piece starting at or before `at` holds it if it ends after it, so
            // the one reaching furthest among them is taken, until a gap.
            let (mut i, mut best): (usize, Option<&WalPiece>) = (0, None);
            while at < hi {
                while i < pieces.len() && pieces[i].start <= at {
                    if best.is_none_or(|b| pieces[i].end > b.end) {
                        best = Some(&pieces[i]);
                    }
                    i += 1;
                }
                let Some(p) = best.filter(|b| b.end > at) else { return Ok(plan) };
                let take_to = p.end.min(hi);
                plan.push((p.clone(), at, take_to));
                at = take_to;
            }
        }
        Ok(plan)
    }

    /// The contiguous WAL along `path` from `from` up to at most `to`: shorter when
    /// a piece is missing.
    pub async fn wal_bytes(
        &self,
        source: &str,
        system: &WalSystem,
        path: &TimelineSpans,
        from: Lsn,
        to: Lsn,
    ) -> Result<Vec<u8>, RepoError> {
        let mut out = Vec::with_capacity((to.0 - from.0) as usize);
        for (p, lo, hi) in self.wal_plan(source, system, path, from, to).await? {
            let (_, wal) = self.read_wal(source, &p).await?;
            out.extend_from_slice(&wal[(lo.0 - p.start.0) as usize..(hi.0 - p.start.0) as usize]);
        }
        Ok(out)
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
    async fn get_wal_object(&self, object: &str) -> Result<Option<Vec<u8>>, RepoError> {
        match self.store().get(object).await {
            Ok(b) => Ok(Some(open_object(self.keys(), object, &b)?)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

thread_local! {
    /// Each thread's WAL compressor, kept from piece to piece: a context made per
    /// piece costs its allocation and set-up every time.
    static WAL_COMPRESSOR: std::cell::RefCell<zstd::bulk::Compressor<'static>> =
        std::cell::RefCell::new(crate::crypto::wal_compressor());
}

impl Repository {
    /// Records the cluster of `source`'s WAL, or checks that it is the one recorded.
    pub async fn claim_wal_system(&self, source: &str, system: WalSystem) -> Result<(), RepoError> {
        let name = system_name(source);
        if self.wal_system(source).await?.is_none() {
            let sealed = seal_object(self.keys(), &name, &system.encode());
            match self.store().put_new(&name, sealed.into()).await {
                Ok(()) => return Ok(()),
                Err(StoreError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        match self.wal_system(source).await? {
            Some(s) if s == system => Ok(()),
            Some(s) => Err(RepoError::OtherCluster {
                source_name: source.to_string(),
                stored: (s.system_id, s.segment_size),
                given: (system.system_id, system.segment_size),
            }),
            None => Err(StoreError::NotFound { name }.into()),
        }
    }

    /// Stores `wal` as the piece `piece` of `source`, whose first byte was received
    /// at `received`. A piece already stored with the same bytes is success; with
    /// other bytes, an error.
    pub async fn put_wal(
        &self,
        source: &str,
        piece: &WalPiece,
        received: Timestamp,
        wal: &[u8],
    ) -> Result<(), RepoError> {
        let mut plain = Vec::with_capacity(PIECE_HEADER + wal.len());
        plain.resize(PIECE_HEADER, 0);
        plain.extend_from_slice(wal);
        self.put_wal_buf(source, piece, received, &mut plain).await
    }

    /// `put_wal` for WAL already in a buffer after `PIECE_HEADER` bytes of room, where
    /// the header is written: no copy of the WAL, and the buffer can be used again.
    pub async fn put_wal_buf(
        &self,
        source: &str,
        piece: &WalPiece,
        received: Timestamp,
        plain: &mut [u8],
    ) -> Result<(), RepoError> {
        assert_eq!(piece.len(), (plain.len() - PIECE_HEADER) as u64, "a piece's name gives its length");
        let name = piece.name(source);
        write_piece_header(plain, PieceTimes { received, stored: Timestamp::now() });
        let sealed = WAL_COMPRESSOR.with_borrow_mut(|c| seal_object_with(self.keys(), &name, plain, c));
        match self.store().put_new(&name, sealed.into()).await {
            Ok(()) => Ok(()),
            Err(StoreError::AlreadyExists { .. }) => {
                let (_, stored) = self.read_wal(source, piece).await?;
                if stored.as_ref() == &plain[PIECE_HEADER..] {
                    Ok(())
                } else {
                    Err(RepoError::WalConflict {
                        name,
                        source_name: source.to_string(),
                        what: format!("WAL of timeline {} at {:#x}..{:#x}", piece.tli, piece.start.0, piece.end.0),
                    })
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Stores the history of timeline `tli` of `source`. The same content again is
    /// success; other content is an error.
    pub async fn put_wal_history(&self, source: &str, tli: u32, data: &[u8]) -> Result<(), RepoError> {
        self.put_wal_object(source, &history_name(source, tli), &format!("history of timeline {tli}"), data).await
    }

    /// Stores another file archived for `source` under `name`, as it is. The same
    /// content again is success; other content under the same name is an error.
    pub async fn put_wal_other_file(&self, source: &str, name: &str, data: &[u8]) -> Result<(), RepoError> {
        self.put_wal_object(source, &other_file_name(source, name), name, data).await
    }

    /// Puts `data` as `object` unless it exists; then what it holds must be `data`.
    async fn put_wal_object(&self, source: &str, object: &str, what: &str, data: &[u8]) -> Result<(), RepoError> {
        let sealed = seal_object(self.keys(), object, data);
        match self.store().put_new(object, sealed.into()).await {
            Ok(()) => Ok(()),
            Err(StoreError::AlreadyExists { .. }) => match self.get_wal_object(object).await? {
                Some(stored) if stored == data => Ok(()),
                _ => Err(RepoError::WalConflict {
                    name: object.to_string(),
                    source_name: source.to_string(),
                    what: what.to_string(),
                }),
            },
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_wal() {
        let piece = WalPiece { tli: 2, start: Lsn(0x1_0300_0028), end: Lsn(0x1_0300_1000) };
        assert_eq!(piece.name("db"), "wal/db/00000002/0000000103000028-0000000103001000");
        assert_eq!(WalPiece::parse(2, &piece.name("db")), Some(piece.clone()));
        assert_eq!(WalPiece::parse(2, "wal/db/00000002/0000000103001000-0000000103001000"), None);
        let times = PieceTimes {
            received: Timestamp::from_second(1_763_720_100).unwrap(),
            stored: Timestamp::from_second(1_763_720_101).unwrap(),
        };
        let mut plain = [0u8; PIECE_HEADER].to_vec();
        plain.extend_from_slice(b"wal");
        write_piece_header(&mut plain, times);
        // Cross-checked with Python's struct.pack('<Q', ...) of the nanoseconds.
        assert_eq!(hex::encode(&plain), "010068b71b16fe79180032525716fe791877616c");
        let (t, wal) = decode_piece("x", plain.clone(), 3).unwrap();
        assert_eq!((t, wal.as_ref()), (times, &b"wal"[..]));
        assert!(decode_piece("x", plain.clone(), 4).is_err(), "the length comes from the name");
        assert!(decode_piece("x", plain[..10].to_vec(), 3).is_err());

        let system = WalSystem { system_id: 7_300_000_000_000_000_001, segment_size: 16 << 20 };
        assert_eq!(hex::encode(system.encode()), "0101005aac52cf4e650000000100000000");
        assert_eq!(WalSystem::decode(&system.encode()).unwrap(), system);
        assert!(WalSystem::decode(&WalSystem { segment_size: 3 << 20, ..system }.encode()).is_err());
    }

    #[test]
    fn object_names_round_trip() {
        assert_eq!(system_name("db"), "wal/db/system");
        assert_eq!(history_name("db", 10), "wal/db/history/0000000a");
        assert_eq!(parse_history_name(&history_name("db", 10)), Some(10));
        assert_eq!(parse_history_name("wal/db/history/zz"), None);
        assert_eq!(
            other_file_name("db", "000000010000000100000003.00000028.backup"),
            "wal/db/files/000000010000000100000003.00000028.backup"
        );
    }

    #[tokio::test]
    async fn wal_bytes_follow_the_timeline_path_and_stop_at_a_gap() {
        let store = crate::Store::open("memory://", true).unwrap();
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
