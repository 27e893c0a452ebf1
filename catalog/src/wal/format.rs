//! The stored format of WAL (FORMAT.md §9b): object names by timeline and position,
//! the system object, and a piece's object: its times sealed apart from its WAL, so
//! that one short range read tells them (version 2), or both in one `EBO1` object
//! (version 1, still read). Object-name grammar, with
//! `<TLI>` = 8 lowercase hex digits and positions 16:
//!
//! - `wal/<source>/system`: the cluster's system identifier and WAL segment size.
//! - `wal/<source>/<TLI>/<start>-<end>`: a piece, the WAL bytes of `[start, end)`.
//! - `wal/<source>/history/<TLI>`: the history of timeline `TLI`, as archived.
//! - `wal/<source>/files/<name>`: another archived file, kept under its own name.
//!
//! Positions are plain numbers here; PostgreSQL's text for them and for its file
//! names lives in `streamer::pg`.

use aes_gcm::Aes256Gcm;
use bytes::{Buf, Bytes};
use jiff::Timestamp;

use crate::codec::{DecodeError, Decoder, Encoder};
use crate::crypto::{decode_payload, open, open_in_place, seal_into, seal_payload, Keys, NONCE_LEN, TAG_LEN};
use crate::error::RepoError;
use crate::object::{open_object_owned, ObjectError};
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

/// Bytes of a piece's times: a version, then when its first byte was received and
/// when it was stored (nanoseconds since the epoch, little-endian). In a version-1
/// piece they come before the WAL in one plaintext.
pub const PIECE_HEADER: usize = 17;

/// The first bytes of a version-2 piece: then its times frame and its WAL frame.
const PIECE_MAGIC: &[u8; 4] = b"EBW2";
const PIECE_VERSION: u8 = 2;
/// The times sealed: nonce, the 17 bytes, tag.
const TIMES_FRAME: usize = NONCE_LEN + PIECE_HEADER + TAG_LEN;
/// The bytes of a version-2 piece that hold its times: what one range read asks for.
pub const PIECE_TIMES_PREFIX: u64 = (PIECE_MAGIC.len() + TIMES_FRAME) as u64;

fn encode_times(version: u8, times: PieceTimes) -> [u8; PIECE_HEADER] {
    let mut out = [0u8; PIECE_HEADER];
    out[0] = version;
    out[1..9].copy_from_slice(&unix_nanos(times.received).unwrap_or(0).to_le_bytes());
    out[9..17].copy_from_slice(&unix_nanos(times.stored).unwrap_or(0).to_le_bytes());
    out
}

fn bad_piece(name: &str, problem: &str) -> ObjectError {
    ObjectError::Decode { name: name.into(), cause: DecodeError::new("WAL piece", problem) }
}

fn decode_times(name: &str, header: &[u8], version: u8) -> Result<PieceTimes, ObjectError> {
    if header.len() < PIECE_HEADER || header[0] != version {
        return Err(bad_piece(name, "bad header"));
    }
    let time = |at: usize| {
        let nanos = u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
        Timestamp::from_nanosecond(i128::from(nanos)).map_err(|_| bad_piece(name, "bad time"))
    };
    Ok(PieceTimes { received: time(1)?, stored: time(9)? })
}

/// The object of piece `name` (version 2): `EBW2`, the times sealed with the
/// object's key (FORMAT.md §7) and the name as AAD, then the WAL framed as a
/// payload (zstd or raw) and sealed with the name and the times' tag as AAD, which
/// binds the two. Each frame's nonce is 4 zero bytes and 8 random ones: a piece's
/// name comes from its positions, and a piece deleted by prune may be written
/// again, with other times, under the same key.
pub(crate) fn seal_piece(
    keys: &Keys,
    name: &str,
    times: PieceTimes,
    wal: &[u8],
    compressor: &mut zstd::bulk::Compressor<'static>,
) -> Vec<u8> {
    let times_nonce = u64::from_le_bytes(crate::id::random_bytes());
    let mut wal_nonce = u64::from_le_bytes(crate::id::random_bytes());
    while wal_nonce == times_nonce {
        wal_nonce = u64::from_le_bytes(crate::id::random_bytes());
    }
    seal_piece_with(keys, name, times, wal, compressor, [times_nonce, wal_nonce])
}

/// `seal_piece` with the nonces' counters given.
pub(crate) fn seal_piece_with(
    keys: &Keys,
    name: &str,
    times: PieceTimes,
    wal: &[u8],
    compressor: &mut zstd::bulk::Compressor<'static>,
    nonces: [u64; 2],
) -> Vec<u8> {
    let cipher = keys.object_cipher(name);
    let mut head = Vec::with_capacity(PIECE_TIMES_PREFIX as usize);
    head.extend_from_slice(PIECE_MAGIC);
    seal_into(&cipher, nonces[0], name.as_bytes(), &encode_times(PIECE_VERSION, times), &mut head);
    let aad = wal_aad(name, &head);
    seal_payload(&cipher, nonces[1], &aad, &head, wal, Some(compressor))
}

/// The WAL frame's AAD: the name, then the tag that ends the times frame in `head`.
fn wal_aad(name: &str, head: &[u8]) -> Vec<u8> {
    [name.as_bytes(), &head[head.len() - TAG_LEN..]].concat()
}

/// A piece's times from the first bytes of its object (at least
/// `PIECE_TIMES_PREFIX` of them): `None` for a version-1 piece, whose times are
/// sealed with its WAL (read it whole).
pub(crate) fn piece_times(keys: &Keys, name: &str, prefix: &[u8]) -> Result<Option<PieceTimes>, ObjectError> {
    if prefix.starts_with(crate::object::MAGIC) {
        return Ok(None);
    }
    open_times(&keys.object_cipher(name), name, prefix).map(Some)
}

/// The times of a version-2 piece from its first bytes, under its object's cipher.
fn open_times(cipher: &Aes256Gcm, name: &str, prefix: &[u8]) -> Result<PieceTimes, ObjectError> {
    if !prefix.starts_with(PIECE_MAGIC) {
        return Err(ObjectError::Magic { name: name.to_string() });
    }
    let Some(frame) = prefix.get(PIECE_MAGIC.len()..PIECE_TIMES_PREFIX as usize) else {
        return Err(bad_piece(name, "shorter than its times"));
    };
    let plain = open(cipher, name.as_bytes(), frame).map_err(|_| ObjectError::Auth { name: name.to_string() })?;
    decode_times(name, &plain, PIECE_VERSION)
}

/// A piece's times and WAL from its object, of either version; `len`, the length
/// its name gives, is the only length accepted. The WAL is decrypted where it lies
/// (the object's buffer is not copied), and the object's key derived once.
pub(crate) fn open_piece(keys: &Keys, name: &str, object: Bytes, len: u64) -> Result<(PieceTimes, Bytes), RepoError> {
    if object.starts_with(crate::object::MAGIC) {
        return decode_piece(name, open_object_owned(keys, name, object)?, len);
    }
    let cipher = keys.object_cipher(name);
    let times = open_times(&cipher, name, &object)?;
    let head = PIECE_TIMES_PREFIX as usize;
    let aad = wal_aad(name, &object[..head]);
    let mut frame = object;
    frame.advance(head);
    let frame = frame.try_into_mut().unwrap_or_else(|shared| bytes::BytesMut::from(&shared[..]));
    let payload = open_in_place(&cipher, &aad, frame).map_err(|_| ObjectError::Auth { name: name.to_string() })?;
    let limit = len.min(MAX_SEGMENT) as usize;
    let wal = decode_payload(payload.freeze(), limit)
        .map_err(|cause| ObjectError::Payload { name: name.to_string(), cause })?;
    if wal.len() as u64 != len {
        return Err(bad_piece(name, "length does not match the name").into());
    }
    Ok((times, wal))
}

/// A version-1 piece's times and WAL from its plaintext (an `EBO1` object's).
pub(crate) fn decode_piece(name: &str, plain: Bytes, len: u64) -> Result<(PieceTimes, Bytes), RepoError> {
    let times = decode_times(name, &plain, VERSION)?;
    let wal = plain.slice(PIECE_HEADER..);
    if wal.len() as u64 != len {
        return Err(bad_piece(name, "length does not match the name").into());
    }
    Ok((times, wal))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What the writer of version 1 stored: the times, then the WAL, in one `EBO1`
    /// object. Readers still read it.
    pub(crate) fn seal_piece_v1(keys: &Keys, name: &str, times: PieceTimes, wal: &[u8]) -> Vec<u8> {
        let mut plain = encode_times(VERSION, times).to_vec();
        plain.extend_from_slice(wal);
        crate::object::seal_object(keys, name, &plain)
    }

    fn times() -> PieceTimes {
        PieceTimes {
            received: Timestamp::from_second(1_763_720_100).unwrap(),
            stored: Timestamp::from_second(1_763_720_101).unwrap(),
        }
    }

    fn keys() -> Keys {
        Keys::derive(&crate::crypto::MasterKey([7; 32]), &crate::id::Id([9; 32]))
    }

    #[test]
    fn golden_wal() {
        let piece = WalPiece { tli: 2, start: Lsn(0x1_0300_0028), end: Lsn(0x1_0300_1000) };
        assert_eq!(piece.name("db"), "wal/db/00000002/0000000103000028-0000000103001000");
        assert_eq!(WalPiece::parse(2, &piece.name("db")), Some(piece.clone()));
        assert_eq!(WalPiece::parse(2, "wal/db/00000002/0000000103001000-0000000103001000"), None);
        let mut plain = encode_times(VERSION, times()).to_vec();
        plain.extend_from_slice(b"wal");
        // Cross-checked with Python's struct.pack('<Q', ...) of the nanoseconds.
        assert_eq!(hex::encode(&plain), "010068b71b16fe79180032525716fe791877616c");
        let (t, wal) = decode_piece("x", Bytes::from(plain.clone()), 3).unwrap();
        assert_eq!((t, wal.as_ref()), (times(), &b"wal"[..]));
        assert!(decode_piece("x", Bytes::from(plain.clone()), 4).is_err(), "the length comes from the name");
        assert!(decode_piece("x", Bytes::from(plain[..10].to_vec()), 3).is_err());

        let system = WalSystem { system_id: 7_300_000_000_000_000_001, segment_size: 16 << 20 };
        assert_eq!(hex::encode(system.encode()), "0101005aac52cf4e650000000100000000");
        assert_eq!(WalSystem::decode(&system.encode()).unwrap(), system);
        assert!(WalSystem::decode(&WalSystem { segment_size: 3 << 20, ..system }.encode()).is_err());
    }

    /// Version 2, pinned: the times frame is readable alone, the WAL frame is bound
    /// to it, and version 1 is read as before.
    #[test]
    fn golden_piece_v2_and_v1_still_read() {
        let (keys, name) = (keys(), "wal/db/00000001/0000000001000000-0000000001000003");
        let sealed = seal_piece_with(&keys, name, times(), b"wal", &mut crate::crypto::wal_compressor(), [0, 1]);
        // Cross-checked with Python's `cryptography` (HKDF-SHA256 as FORMAT.md §7
        // derives the object key, then AESGCM with the nonces of counters 0 and 1).
        assert_eq!(
            hex::encode(&sealed),
            "45425732000000000000000000000000d0ecb818d4f272236ba17424f7868a2a3da76daf43ca3f76e0a9ace2df0f2482cd000000000000000000000001ac6b2b5718b1d31e677b6aae38d5b4aaad50aa83"
        );
        assert_eq!(sealed.len(), PIECE_TIMES_PREFIX as usize + NONCE_LEN + 1 + 3 + TAG_LEN);
        let prefix = &sealed[..PIECE_TIMES_PREFIX as usize];
        assert_eq!(piece_times(&keys, name, prefix).unwrap(), Some(times()), "the times from the prefix alone");
        let (t, wal) = open_piece(&keys, name, Bytes::from(sealed.clone()), 3).unwrap();
        assert_eq!((t, wal.as_ref()), (times(), &b"wal"[..]));
        assert!(open_piece(&keys, name, Bytes::from(sealed.clone()), 4).is_err(), "the length comes from the name");
        let other = "wal/db/00000001/0000000001000003-0000000001000006";
        assert!(matches!(piece_times(&keys, other, prefix), Err(ObjectError::Auth { .. })), "renamed");
        assert!(open_piece(&keys, other, Bytes::from(sealed.clone()), 3).is_err());

        // A WAL frame sealed after other times is refused: the frames are bound.
        let later = PieceTimes { received: times().stored, ..times() };
        let relabelled = seal_piece(&keys, name, later, b"wal", &mut crate::crypto::wal_compressor());
        let mut spliced = relabelled[..PIECE_TIMES_PREFIX as usize].to_vec();
        spliced.extend_from_slice(&sealed[PIECE_TIMES_PREFIX as usize..]);
        assert!(matches!(
            open_piece(&keys, name, Bytes::from(spliced), 3),
            Err(RepoError::Object(ObjectError::Auth { .. }))
        ));
        // Written again (random nonces): other bytes, the same piece.
        let again = seal_piece(&keys, name, times(), b"wal", &mut crate::crypto::wal_compressor());
        assert_ne!(again, sealed);
        assert_eq!(open_piece(&keys, name, Bytes::from(again), 3).unwrap().0, times());
        // The times frame where the WAL frame goes (or the reverse) is refused: their
        // AADs differ.
        let mut swapped = sealed[..PIECE_TIMES_PREFIX as usize].to_vec();
        swapped.extend_from_slice(&sealed[PIECE_MAGIC.len()..PIECE_TIMES_PREFIX as usize]);
        assert!(open_piece(&keys, name, Bytes::from(swapped), 17).is_err());
        for cut in [0, 3, 10, PIECE_TIMES_PREFIX as usize - 1, PIECE_TIMES_PREFIX as usize + 5, sealed.len() - 1] {
            assert!(open_piece(&keys, name, Bytes::from(sealed[..cut].to_vec()), 3).is_err(), "cut at {cut}");
        }
        assert!(piece_times(&keys, name, &sealed[..PIECE_TIMES_PREFIX as usize - 1]).is_err());

        let v1 = seal_piece_v1(&keys, name, times(), b"wal");
        assert_eq!(
            piece_times(&keys, name, &v1[..PIECE_TIMES_PREFIX as usize]).unwrap(),
            None,
            "version 1: read whole"
        );
        let (t, wal) = open_piece(&keys, name, Bytes::from(v1), 3).unwrap();
        assert_eq!((t, wal.as_ref()), (times(), &b"wal"[..]));
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
