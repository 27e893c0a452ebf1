//! Recovery points (`points/<source>/<16 hex>-<16 hex>`): one small encrypted manifest
//! per point. The first 16 hex digits are `u64::MAX - nanoseconds since 1970`, so names
//! sort newest first and "the newest point at or before T" is the first name after
//! `points/<source>/<inverted T>`: one narrow listing. The last 16 are random, so two
//! writers never collide.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::crypto::Keys;
use crate::id::{random_bytes, Id};
use crate::object::{open_object, seal_object, ObjectError};
use crate::pack::BlobRef;
use crate::time::unix_nanos;

pub const POINTS_DIR: &str = "points";
const VERSION: u32 = 1;

/// Source names appear in object names, so they are restricted to a safe alphabet.
pub fn validate_source(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid source name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        ))
    }
}

pub fn source_dir(source: &str) -> String {
    format!("{POINTS_DIR}/{source}")
}

pub(crate) fn time_key(t: Timestamp) -> Option<String> {
    Some(format!("{:016x}", u64::MAX - unix_nanos(t)?))
}

/// `<dir>/<source>/<inverted time>-<random>`: the names of points and fragments.
pub(crate) fn timed_name(dir: &str, source: &str, time: Timestamp) -> Option<String> {
    Some(format!("{dir}/{source}/{}-{}", time_key(time)?, hex::encode(random_bytes::<8>())))
}

/// `<dir>/<source>/<inverted time>-<suffix>`, `suffix` being 16 hex digits.
pub(crate) fn timed_name_with(dir: &str, source: &str, time: Timestamp, suffix: &str) -> Option<String> {
    Some(format!("{dir}/{source}/{}-{suffix}", time_key(time)?))
}

/// The source and time of a name made by `timed_name`.
pub(crate) fn parse_timed(dir: &str, name: &str) -> Option<(String, Timestamp)> {
    let rest = name.strip_prefix(dir)?.strip_prefix('/')?;
    let (source, leaf) = rest.split_once('/')?;
    validate_source(source).ok()?;
    Some((source.to_string(), parse_key_leaf(leaf)?))
}

/// The time of a leaf `<K>-<R>` (16 lowercase hex digits each).
pub(crate) fn parse_key_leaf(leaf: &str) -> Option<Timestamp> {
    let (key, suffix) = leaf.split_once('-')?;
    let lower_hex = |s: &str| s.len() == 16 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !lower_hex(key) || !lower_hex(suffix) {
        return None;
    }
    let inv = u64::from_str_radix(key, 16).ok()?;
    Timestamp::from_nanosecond(i128::from(u64::MAX - inv)).ok()
}

/// The name a new point of `source` at `time` gets.
pub fn point_name(source: &str, time: Timestamp) -> Option<String> {
    timed_name(POINTS_DIR, source, time)
}

/// The listing offset after which the newest point at or before `t` comes first.
pub fn offset_for(source: &str, t: Timestamp) -> Option<String> {
    Some(format!("{}/{}", source_dir(source), time_key(t)?))
}

/// A point known from its name alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointRef {
    pub name: String,
    pub source: String,
    pub time: Timestamp,
}

impl PointRef {
    pub fn parse(name: &str) -> Option<PointRef> {
        let (source, time) = parse_timed(POINTS_DIR, name)?;
        Some(PointRef { name: name.to_string(), source, time })
    }

    /// The random part of the name: a short handle for humans.
    pub fn short_id(&self) -> &str {
        &self.name[self.name.len() - 8..]
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefJson {
    pub id: String,
    pub pack: String,
    pub offset: u32,
    pub length: u32,
    pub raw_len: u32,
}

impl From<BlobRef> for RefJson {
    fn from(b: BlobRef) -> RefJson {
        RefJson { id: b.id.to_hex(), pack: b.pack.to_hex(), offset: b.offset, length: b.length, raw_len: b.raw_len }
    }
}

impl RefJson {
    pub fn to_ref(&self) -> Option<BlobRef> {
        Some(BlobRef {
            id: Id::from_hex(&self.id)?,
            pack: Id::from_hex(&self.pack)?,
            offset: self.offset,
            length: self.length,
            raw_len: self.raw_len,
        })
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Stats {
    pub files: u64,
    pub dirs: u64,
    pub others: u64,
    /// Logical bytes of all files in the point.
    pub bytes: u64,
    /// Bytes read from disk (unchanged files are not read again).
    pub bytes_read: u64,
    /// Blobs this point added to the repository (data blobs among them), and their
    /// stored size.
    pub new_blobs: u64,
    pub new_data_blobs: u64,
    pub new_bytes: u64,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Skipped {
    pub path: String,
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub version: u32,
    pub source: String,
    /// RFC 3339 with nanoseconds: the state of the source at this time.
    pub time: String,
    pub host: String,
    /// `dir` for a directory tree.
    pub kind: String,
    /// The path that was backed up, as the host names it.
    pub path: String,
    /// A tree with one entry: the backed-up file or directory itself.
    pub root: RefJson,
    pub stats: Stats,
    /// Entries that could not be read and are missing from the point.
    pub skipped: Vec<Skipped>,
    /// Files that kept changing while read: stored as last read, which may mix
    /// versions. Empty in manifests written before it existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<String>,
    /// The index file written with this point.
    pub index: Option<String>,
    /// For a PostgreSQL base backup: where its WAL starts and ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg: Option<PgInfo>,
}

/// What a base backup needs of the WAL, and of which cluster it is, as the base
/// backup recorded it. The catalog keeps these fields and reads none of them;
/// `streamer::pg::info` interprets them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PgInfo {
    pub system_id: u64,
    pub timeline: u32,
    /// The checkpoint's redo position, where recovery starts, in PostgreSQL's text.
    pub start_lsn: String,
    /// Recovery must reach this position before the copy is consistent (same text).
    pub stop_lsn: String,
    pub server_version: String,
    pub segment_size: u64,
}

impl Manifest {
    pub fn new(source: &str, time: Timestamp, host: String, kind: &str, path: String, root: BlobRef) -> Manifest {
        Manifest {
            version: VERSION,
            source: source.to_string(),
            time: time.to_string(),
            host,
            kind: kind.to_string(),
            path,
            root: root.into(),
            stats: Stats::default(),
            skipped: Vec::new(),
            changed: Vec::new(),
            index: None,
            pg: None,
        }
    }

    pub fn root_ref(&self) -> Option<BlobRef> {
        self.root.to_ref()
    }

    pub fn seal(&self, keys: &Keys, name: &str) -> Vec<u8> {
        seal_object(keys, name, &serde_json::to_vec(self).expect("manifest serializes"))
    }

    pub fn open(keys: &Keys, name: &str, bytes: &[u8]) -> Result<Manifest, ObjectError> {
        Manifest::decode(name, &open_object(keys, name, bytes)?)
    }

    /// A manifest from its plaintext (the object `name`, opened).
    pub(crate) fn decode(name: &str, plain: &[u8]) -> Result<Manifest, ObjectError> {
        let bad = |problem: String| ObjectError::Decode {
            name: name.to_string(),
            cause: crate::codec::DecodeError::new("point manifest", problem),
        };
        let m: Manifest = serde_json::from_slice(plain).map_err(|e| bad(e.to_string()))?;
        if m.version != VERSION {
            return Err(bad(format!("unknown manifest version {}", m.version)));
        }
        if m.root_ref().is_none() {
            return Err(bad("root reference is not hex".into()));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_newest_first_and_round_trip() {
        let t1: Timestamp = "2026-11-21T10:00:00Z".parse().unwrap();
        let t2: Timestamp = "2026-11-21T10:00:00.000000001Z".parse().unwrap();
        let n1 = point_name("db", t1).unwrap();
        let n2 = point_name("db", t2).unwrap();
        assert!(n2 < n1, "newer must sort first");
        let p = PointRef::parse(&n1).unwrap();
        assert_eq!((p.source.as_str(), p.time), ("db", t1));
        // The offset for T sorts before the point at T and after newer ones.
        let off = offset_for("db", t1).unwrap();
        assert!(n2 < off && off < n1);
        assert!(PointRef::parse("points/db/zz").is_none());
        assert!(PointRef::parse("points/../x-y").is_none());
        assert!(point_name("db", "1969-01-01T00:00:00Z".parse().unwrap()).is_none());
    }

    #[test]
    fn golden_point_name_key() {
        let t = Timestamp::from_second(1_763_720_100).unwrap();
        assert_eq!(offset_for("web", t).unwrap(), "points/web/e78601e9e44897ff");
    }

    #[test]
    fn source_names() {
        for ok in ["db", "web-01", "host.example_2"] {
            assert!(validate_source(ok).is_ok());
        }
        for bad in ["", ".hidden", "-x", "a/b", "sp ace", "é", &"x".repeat(65)] {
            assert!(validate_source(bad).is_err());
        }
    }
}
