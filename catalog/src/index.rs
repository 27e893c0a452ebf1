//! Index files (`index/<T>-<R>`): which blobs each pack holds. Writers load them to
//! deduplicate; readers never need them, since every reference in a tree already says
//! where its blob is. A writer writes one index file per recovery point, just after
//! the point's manifest, naming the point: an index file whose point does not exist
//! tells `ebb verify` that a manifest was deleted. `ebb repair index` writes index
//! files of no point, for packs that no index file lists.

use std::collections::HashMap;

use crate::codec::{Decoder, Encoder};
use crate::crypto::Keys;
use crate::id::Id;
use crate::object::{open_object, open_object_owned, seal_object, seal_object_raw, ObjectError};
use crate::pack::{BlobKind, BlobRef, PackEntry, BLOB_REF_LEN};

pub const INDEX_DIR: &str = "index";
/// Version 1 lists entries only; version 2 also names the point it was written
/// with; version 3 (a merge of several, by `ebb prune`) names any number.
const VERSION_1: u8 = 1;
const VERSION_2: u8 = 2;
const VERSION_3: u8 = 3;
/// Point names are `points/<source>/<33 chars>`, well under this.
const MAX_POINT_NAME: usize = 256;

/// A new index file's name, `index/<T>-<R>`: `<T>` the time `at` in nanoseconds
/// since the epoch (16 hex, so names sort oldest first), `<R>` 8 random bytes.
/// Repositories from before hold `index/<64 hex>`, random, which stay valid.
pub fn index_name(at: jiff::Timestamp) -> String {
    let ns = crate::time::unix_nanos(at).unwrap_or(0);
    format!("{INDEX_DIR}/{ns:016x}-{}", hex::encode(crate::id::random_bytes::<8>()))
}

/// The name from which a listing of `index/` holds every index file named at or
/// after `ns` nanoseconds since the epoch (and the older repositories' random
/// names that sort after it).
pub fn index_names_from(ns: u64) -> String {
    format!("{INDEX_DIR}/{ns:016x}")
}

/// The time, in nanoseconds since the epoch, of an index file named by `index_name`;
/// `None` for any other name (an older repository's random one).
pub fn index_time(name: &str) -> Option<u64> {
    let (t, r) = name.strip_prefix(INDEX_DIR)?.strip_prefix('/')?.split_once('-')?;
    let lower_hex = |s: &str| s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    (lower_hex(t) && lower_hex(r)).then(|| u64::from_str_radix(t, 16).ok()).flatten()
}

/// One index file's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexFile {
    /// The points written with the blobs it lists: one for a writer's, none for
    /// version 1 and for `ebb repair index`, any number for a merge.
    pub points: Vec<String>,
    pub entries: Vec<PackEntry>,
}

/// A writer's index file: version 2, naming at most one point.
pub fn encode_index(point: Option<&str>, entries: &[PackEntry]) -> Vec<u8> {
    let mut e = Encoder { buf: Vec::with_capacity(entries_len(entries) + 16 + point.map_or(0, str::len)) };
    e.u8(VERSION_2);
    e.bytes(point.unwrap_or_default().as_bytes());
    encode_entries(&mut e, entries);
    e.buf
}

/// A merge of index files: version 3, naming every point of the files merged.
pub fn encode_merged(points: &[String], entries: &[PackEntry]) -> Vec<u8> {
    let names: usize = points.iter().map(|p| 8 + p.len()).sum();
    let mut e = Encoder { buf: Vec::with_capacity(entries_len(entries) + 16 + names) };
    e.u8(VERSION_3);
    e.u32(u32::try_from(points.len()).expect("fewer than 2^32 points"));
    for p in points {
        e.bytes(p.as_bytes());
    }
    encode_entries(&mut e, entries);
    e.buf
}

/// An entry as a merged file stores it: its kind, then its blob reference.
pub const ENTRY_LEN: usize = 1 + BLOB_REF_LEN;

#[cfg(test)]
fn entry_record(entry: &PackEntry) -> [u8; ENTRY_LEN] {
    let mut e = Encoder { buf: Vec::with_capacity(ENTRY_LEN) };
    e.u8(entry.kind as u8);
    entry.blob.encode(&mut e);
    e.buf.try_into().expect("an entry encodes to ENTRY_LEN bytes")
}

/// What `encode_merged` makes of `points` and the entries `records` hold (each as
/// an index file stores it: its kind, then its blob reference), built in the records' own buffer: a merge of many
/// files holds its entries once, not also as a copy being encoded.
pub fn encode_merged_records(points: &[String], records: Vec<[u8; ENTRY_LEN]>) -> Vec<u8> {
    let mut head = Encoder::default();
    head.u8(VERSION_3);
    head.u32(u32::try_from(points.len()).expect("fewer than 2^32 points"));
    for p in points {
        head.bytes(p.as_bytes());
    }
    head.u32(records.len() as u32);
    let mut out = records.into_flattened();
    let len = out.len();
    out.resize(len + head.buf.len(), 0);
    out.copy_within(..len, head.buf.len());
    out[..head.buf.len()].copy_from_slice(&head.buf);
    out
}

/// The bytes `encode_entries` writes, so that the buffer is made once at its size
/// (a merged file's entries take megabytes: grown by doubling, two copies would be
/// held while it grows).
fn entries_len(entries: &[PackEntry]) -> usize {
    4 + entries.len() * (1 + BLOB_REF_LEN)
}

fn encode_entries(e: &mut Encoder, entries: &[PackEntry]) {
    e.u32(entries.len() as u32);
    for entry in entries {
        e.u8(entry.kind as u8);
        entry.blob.encode(e);
    }
}

fn point_name(d: &mut Decoder) -> Result<String, crate::codec::DecodeError> {
    let name = d.bytes()?;
    if name.len() > MAX_POINT_NAME {
        return Err(d.error("the point name is too long"));
    }
    Ok(std::str::from_utf8(name).map_err(|_| d.error("the point name is not UTF-8"))?.to_string())
}

pub fn decode_index(bytes: &[u8]) -> Result<IndexFile, crate::codec::DecodeError> {
    let mut d = Decoder::new("index", bytes);
    let points = decode_points(&mut d)?;
    let n = d.count(ENTRY_LEN)?;
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        entries.push(decode_entry(&mut d)?);
    }
    d.finish()?;
    Ok(IndexFile { points, entries })
}

fn decode_entry(d: &mut Decoder) -> Result<PackEntry, crate::codec::DecodeError> {
    let kind = BlobKind::from_u8(d.u8()?).ok_or_else(|| d.error("unknown blob kind"))?;
    Ok(PackEntry { kind, blob: BlobRef::decode(d)? })
}

/// An index file's version and the points it names.
fn decode_points(d: &mut Decoder) -> Result<Vec<String>, crate::codec::DecodeError> {
    let v = d.u8()?;
    let points = match v {
        VERSION_1 => Vec::new(),
        VERSION_2 => Some(point_name(d)?).filter(|n| !n.is_empty()).into_iter().collect(),
        VERSION_3 => {
            let n = d.count(4)?;
            let mut points = Vec::with_capacity(n);
            for _ in 0..n {
                let name = point_name(d)?;
                if name.is_empty() {
                    return Err(d.error("an empty point name"));
                }
                points.push(name);
            }
            points
        }
        _ => return Err(d.error(format!("unknown index version {v}"))),
    };
    Ok(points)
}

/// An index file with its entries left as they are stored (`ENTRY_LEN` bytes
/// each), in the buffer it was opened in: prune filters and merges files of
/// hundreds of thousands of entries with no decoded copy beside them.
pub struct IndexRecords {
    pub points: Vec<String>,
    buf: bytes::BytesMut,
    /// Where the first entry starts in `buf`, and how many there are.
    at: usize,
    n: usize,
}

/// `open_index` on bytes the caller gives up (`open_object_owned`), the entries
/// checked as `decode_index` checks them but left as records.
pub fn open_index_records(keys: &Keys, name: &str, bytes: bytes::Bytes) -> Result<IndexRecords, ObjectError> {
    let plain = open_object_owned(keys, name, bytes)?;
    let decode_error = |cause| ObjectError::Decode { name: name.to_string(), cause };
    let mut d = Decoder::new("index", &plain);
    let points = decode_points(&mut d).map_err(decode_error)?;
    let n = d.count(ENTRY_LEN).map_err(decode_error)?;
    let at = plain.len() - d.remaining();
    for _ in 0..n {
        decode_entry(&mut d).map_err(decode_error)?;
    }
    d.finish().map_err(decode_error)?;
    let buf = plain.try_into_mut().unwrap_or_else(|shared| bytes::BytesMut::from(&shared[..]));
    Ok(IndexRecords { points, buf, at, n })
}

impl IndexRecords {
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The entries, each as stored: its kind, then its blob reference.
    pub fn records(&self) -> impl Iterator<Item = &[u8; ENTRY_LEN]> + '_ {
        let (chunks, _) = self.buf[self.at..self.at + self.n * ENTRY_LEN].as_chunks::<ENTRY_LEN>();
        chunks.iter()
    }

    /// Keeps the entries of the packs `keep` says, in place.
    pub fn retain_packs(&mut self, mut keep: impl FnMut(&Id) -> bool) {
        let mut kept = 0;
        for i in 0..self.n {
            let from = self.at + i * ENTRY_LEN;
            if keep(&record_pack(&self.buf[from..from + ENTRY_LEN])) {
                if kept != i {
                    self.buf.copy_within(from..from + ENTRY_LEN, self.at + kept * ENTRY_LEN);
                }
                kept += 1;
            }
        }
        self.n = kept;
    }

    /// The file `encode_for_points` would make of its points and entries, sealed
    /// uncompressed (`seal_object_raw`) in this buffer.
    pub fn seal(self, keys: &Keys, name: &str) -> Vec<u8> {
        let IndexRecords { points, mut buf, at, n } = self;
        let mut head = Encoder::default();
        match &points[..] {
            [] => {
                head.u8(VERSION_2);
                head.bytes(&[]);
            }
            [one] => {
                head.u8(VERSION_2);
                head.bytes(one.as_bytes());
            }
            many => {
                head.u8(VERSION_3);
                head.u32(u32::try_from(many.len()).expect("fewer than 2^32 points"));
                for p in many {
                    head.bytes(p.as_bytes());
                }
            }
        }
        head.u32(n as u32);
        buf.truncate(at + n * ENTRY_LEN);
        let mut plain: Vec<u8> = buf.into();
        splice_head(&mut plain, at, &head.buf);
        seal_object_raw(keys, name, plain)
    }
}

/// The pack of an entry record: after its kind and blob id.
fn record_pack(record: &[u8]) -> Id {
    Id(record[1 + 32..1 + 64].try_into().expect("a record holds a pack id"))
}

/// Replaces the first `old` bytes of `buf` with `head`, moving what follows.
fn splice_head(buf: &mut Vec<u8>, old: usize, head: &[u8]) {
    if head.len() > old {
        let grow = head.len() - old;
        let len = buf.len();
        buf.resize(len + grow, 0);
        buf.copy_within(old..len, head.len());
    } else {
        buf.copy_within(old.., head.len());
        buf.truncate(buf.len() - (old - head.len()));
    }
    buf[..head.len()].copy_from_slice(head);
}

pub fn seal_index(keys: &Keys, name: &str, point: Option<&str>, entries: &[PackEntry]) -> Vec<u8> {
    seal_object(keys, name, &encode_index(point, entries))
}

/// Seals what `encode_for_points` makes.
pub fn seal_for_points(keys: &Keys, name: &str, points: &[String], entries: &[PackEntry]) -> Vec<u8> {
    seal_object(keys, name, &encode_for_points(points, entries))
}

/// What `encode_merged` makes, or a writer's version for at most one point.
pub fn encode_for_points(points: &[String], entries: &[PackEntry]) -> Vec<u8> {
    match points {
        [] => encode_index(None, entries),
        [one] => encode_index(Some(one), entries),
        _ => encode_merged(points, entries),
    }
}

pub fn open_index(keys: &Keys, name: &str, bytes: &[u8]) -> Result<IndexFile, ObjectError> {
    let plain = open_object(keys, name, bytes)?;
    decode_index(&plain).map_err(|e| ObjectError::Decode { name: name.to_string(), cause: e })
}

/// The writer's dedup map: content id to where that content already is.
#[derive(Default)]
pub struct DedupIndex {
    map: HashMap<(BlobKind, Id), BlobRef>,
}

impl DedupIndex {
    /// An empty map with room for `n` entries: loading a long history's index
    /// files then never grows it again.
    pub fn with_capacity(n: usize) -> DedupIndex {
        DedupIndex { map: HashMap::with_capacity(n) }
    }
    pub fn insert(&mut self, kind: BlobKind, blob: BlobRef) {
        self.map.entry((kind, blob.id)).or_insert(blob);
    }
    pub fn get(&self, kind: BlobKind, id: &Id) -> Option<BlobRef> {
        self.map.get(&(kind, *id)).copied()
    }
    pub fn remove(&mut self, kind: BlobKind, id: &Id) {
        self.map.remove(&(kind, *id));
    }
    /// Drops every entry in one of `packs`.
    pub fn forget_packs(&mut self, packs: &std::collections::HashSet<Id>) {
        self.map.retain(|_, b| !packs.contains(&b.pack));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_index_name() {
        let t = jiff::Timestamp::from_second(1763720100).unwrap();
        let name = index_name(t);
        assert_eq!(&name[..23], "index/1879fe161bb76800-");
        assert_eq!(name.len(), 39);
        assert_eq!(index_time(&name), Some(1763720100 * 1_000_000_000));
        assert_eq!(index_names_from(1763720100 * 1_000_000_000), "index/1879fe161bb76800");
        assert!(index_names_from(1763720100 * 1_000_000_000) < name);
        // An older repository's random name: valid, with no time.
        assert_eq!(index_time(&format!("index/{}", "ab".repeat(32))), None);
        assert_eq!(index_time("index/1879fe161bb76800-0123"), None);
        assert_eq!(index_time("index/1879FE161BB76800-0123456789abcdef"), None);
    }

    #[test]
    fn golden_index() {
        // Version 1, as repositories before version 2 hold them: still read.
        let entries = vec![PackEntry {
            kind: BlobKind::Tree,
            blob: BlobRef { id: Id([1; 32]), pack: Id([2; 32]), offset: 3, length: 4, raw_len: 5 },
        }];
        let mut v1 = vec![1u8, 1, 0, 0, 0, 1];
        v1.extend([1u8; 32]);
        v1.extend([2u8; 32]);
        v1.extend([3, 0, 0, 0, 4, 0, 0, 0, 5, 0, 0, 0]);
        assert_eq!(decode_index(&v1).unwrap(), IndexFile { points: vec![], entries: entries.clone() });
        assert!(decode_index(&v1[..v1.len() - 1]).is_err());

        // Version 2: the point's name (u32 length and bytes), then as version 1.
        let bytes = encode_index(Some("points/db/x"), &entries);
        let mut v2 = vec![2u8, 11, 0, 0, 0];
        v2.extend(b"points/db/x");
        v2.extend(&v1[1..]);
        assert_eq!(bytes, v2);
        assert_eq!(
            decode_index(&bytes).unwrap(),
            IndexFile { points: vec!["points/db/x".into()], entries: entries.clone() }
        );
        for cut in 0..bytes.len() {
            assert!(decode_index(&bytes[..cut]).is_err(), "an index cut at {cut} decoded");
        }
        let none = encode_index(None, &[]);
        assert_eq!(none, [2, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(decode_index(&none).unwrap(), IndexFile { points: vec![], entries: vec![] });

        // Version 3: a count of point names, each as in version 2, then as version 1.
        let points = vec!["points/a/x".to_string(), "points/b/y".to_string()];
        let bytes = encode_merged(&points, &entries);
        let mut v3 = vec![3u8, 2, 0, 0, 0, 10, 0, 0, 0];
        v3.extend(b"points/a/x");
        v3.extend([10, 0, 0, 0]);
        v3.extend(b"points/b/y");
        v3.extend(&v1[1..]);
        assert_eq!(bytes, v3);
        let records: Vec<[u8; ENTRY_LEN]> = entries.iter().map(entry_record).collect();
        assert_eq!(encode_merged_records(&points, records), v3, "built in the records' buffer, the same");
        assert_eq!(decode_index(&bytes).unwrap(), IndexFile { points, entries });
        for cut in 0..bytes.len() {
            assert!(decode_index(&bytes[..cut]).is_err(), "a merged index cut at {cut} decoded");
        }
        assert!(decode_index(&[3, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err(), "an empty point name");
        assert!(decode_index(&[4, 0, 0, 0, 0]).is_err(), "version 4");
    }

    /// Opened as records, filtered in place and sealed again (uncompressed), an
    /// index file of each version reads as the same file with those entries.
    #[test]
    fn index_records_filter_in_place_and_seal_what_encode_for_points_makes() {
        let keys = Keys::derive(&crate::crypto::MasterKey([7; 32]), &Id([9; 32]));
        let entries: Vec<PackEntry> = (0..200u32)
            .map(|i| PackEntry {
                kind: if i % 3 == 0 { BlobKind::Tree } else { BlobKind::Data },
                blob: BlobRef {
                    id: Id([i as u8; 32]),
                    pack: Id([(i % 7) as u8; 32]),
                    offset: i,
                    length: 9,
                    raw_len: 11,
                },
            })
            .collect();
        let many = vec!["points/a/x".to_string(), "points/b/y".to_string(), "points/c/z".to_string()];
        for points in [vec![], vec!["points/db/x".to_string()], many] {
            let name = "index/0000000000000001-0000000000000002";
            let sealed = seal_for_points(&keys, name, &points, &entries);
            let mut records = open_index_records(&keys, name, bytes::Bytes::from(sealed.clone())).unwrap();
            assert_eq!(records.points, points);
            assert_eq!(records.len(), entries.len());
            let as_stored: Vec<[u8; ENTRY_LEN]> = entries.iter().map(entry_record).collect();
            assert!(records.records().eq(as_stored.iter()));
            let keep = |pack: &Id| pack.0[0].is_multiple_of(2);
            records.retain_packs(keep);
            let left: Vec<PackEntry> = entries.iter().filter(|e| keep(&e.blob.pack)).cloned().collect();
            assert_eq!(records.len(), left.len());
            let again = records.seal(&keys, name);
            assert_eq!(
                open_index(&keys, name, &again).unwrap(),
                IndexFile { points: points.clone(), entries: left.clone() }
            );
            let plain = crate::object::open_object(&keys, name, &again).unwrap();
            assert_eq!(plain, encode_for_points(&points, &left), "{points:?}");
            // Nothing left: the file says so.
            let mut none = open_index_records(&keys, name, bytes::Bytes::from(sealed)).unwrap();
            none.retain_packs(|_| false);
            assert!(none.is_empty());
            assert_eq!(
                open_index(&keys, name, &none.seal(&keys, name)).unwrap(),
                IndexFile { points, entries: vec![] }
            );
        }
        // What `decode_index` refuses, this refuses too.
        let mut bad = encode_index(None, &entries);
        bad[9] = 9; // the first entry's kind
        let sealed = crate::object::seal_object(&keys, "index/x", &bad);
        assert!(matches!(open_index_records(&keys, "index/x", sealed.into()), Err(ObjectError::Decode { .. })));
        let short = crate::object::seal_object(&keys, "index/x", &bad[..bad.len() - 1]);
        assert!(open_index_records(&keys, "index/x", short.into()).is_err());
    }
}
