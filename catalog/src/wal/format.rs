//! The stored format of WAL (FORMAT.md §9b): object names by timeline and position,
//! the system object, and a piece's plaintext header. Object-name grammar, with
//! `<TLI>` = 8 lowercase hex digits and positions 16:
//!
//! - `wal/<source>/system`: the cluster's system identifier and WAL segment size.
//! - `wal/<source>/<TLI>/<start>-<end>`: a piece, the WAL bytes of `[start, end)`.
//! - `wal/<source>/history/<TLI>`: the history of timeline `TLI`, as archived.
//! - `wal/<source>/files/<name>`: another archived file, kept under its own name.
//!
//! Positions are plain numbers here; PostgreSQL's text for them and for its file
//! names lives in `streamer::pg`.

use bytes::Bytes;
use jiff::Timestamp;

use crate::codec::{DecodeError, Decoder, Encoder};
use crate::error::RepoError;
use crate::object::ObjectError;
use crate::time::unix_nanos;

pub(crate) const WAL_DIR: &str = "wal";
const VERSION: u8 = 1;
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
pub(crate) fn tli_dir(source: &str, tli: u32) -> String {
    format!("{WAL_DIR}/{source}/{tli:08x}")
}

/// The name of the system object of `source`.
pub(crate) fn system_name(source: &str) -> String {
    format!("{WAL_DIR}/{source}/system")
}

/// The directory of the history objects of `source`.
pub(crate) fn history_dir(source: &str) -> String {
    format!("{WAL_DIR}/{source}/history")
}

/// The name of the history object of timeline `tli`.
pub(crate) fn history_name(source: &str, tli: u32) -> String {
    format!("{}/{tli:08x}", history_dir(source))
}

/// The timeline a name in `history_dir` is the history of.
pub(crate) fn parse_history_name(name: &str) -> Option<u32> {
    name.rsplit('/').next().and_then(|n| u32::from_str_radix(n, 16).ok())
}

/// The name of the object holding the archived file `name`.
pub(crate) fn other_file_name(source: &str, name: &str) -> String {
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

pub(crate) fn write_piece_header(plain: &mut [u8], times: PieceTimes) {
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
}
