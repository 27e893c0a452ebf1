//! A host's copy of a repository's index files, so that a writer fetches from the
//! store only the index files it has not read before: starting a backup then costs
//! one listing of `index/` and the new files, however long the history.
//!
//! The listing stays the truth: a cached file the listing no longer names (prune
//! merged or deleted it) is not used, and is dropped from the cache. The cache
//! holds the index files as stored, sealed: each is opened (authenticated under its
//! name) like one fetched, so a damaged or altered cache costs a fetch, never a
//! wrong entry; one that does not open is fetched again.
//!
//! File: `<cache dir>/index-<repository id hex>`: `EBIC2\n`, 16 random bytes (the
//! file's id, new each time it is written afresh), then records, each `u32` LE
//! name length (1 to 1024), the name (UTF-8), `u32` LE length (at most 64 MiB),
//! the sealed bytes. Records are appended; reading stops at the first one that is
//! cut short or malformed (a write a crash interrupted). The file is written
//! again, with only the files listed, once those it holds for nothing outnumber
//! them. A host's merged index (`host_index`) covers the file up to an offset: the
//! records after it are the index files read since. (`EBIC1` files, without an
//! id, are read as empty.)

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use bytes::Bytes;

use crate::id::Id;

const MAGIC: &[u8] = b"EBIC2\n";
/// The file's id, after the magic.
pub const ID_LEN: usize = 16;
const MAX_NAME: usize = 1024;
const MAX_OBJECT: usize = 64 << 20;

/// This host's cache directory: `EBB_CACHE_DIR`, else `$XDG_CACHE_HOME/ebb`, else
/// `~/.cache/ebb`; `None` when there is none of these (or it is set empty).
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    match std::env::var_os("EBB_CACHE_DIR") {
        Some(d) if d.is_empty() => None,
        Some(d) => Some(PathBuf::from(d)),
        None => Some(var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|h| h.join(".cache")))?.join("ebb")),
    }
}

/// The cache file of one repository on this host.
#[derive(Debug, Clone)]
pub struct IndexCache {
    path: PathBuf,
}

impl IndexCache {
    /// The cache of repository `repo` in `dir`.
    pub fn in_dir(dir: &std::path::Path, repo: &Id) -> IndexCache {
        IndexCache { path: dir.join(format!("index-{}", repo.to_hex())) }
    }

    #[cfg(test)]
    pub fn at(path: &std::path::Path) -> IndexCache {
        IndexCache { path: path.to_path_buf() }
    }

    /// What the cache holds, by name; empty when it cannot be read.
    pub fn load(&self) -> HashMap<String, Bytes> {
        self.read().map(|c| c.records.into_iter().collect()).unwrap_or_default()
    }

    /// The whole file: its id, records, and the length of the records read.
    pub fn read(&self) -> Option<Cached> {
        decode_file(&std::fs::read(&self.path).ok()?)
    }

    /// The file's id and length, as it is now.
    pub fn head(&self) -> Option<([u8; ID_LEN], u64)> {
        use std::io::Read;
        let mut f = std::fs::File::open(&self.path).ok()?;
        let mut head = [0u8; MAGIC.len() + ID_LEN];
        f.read_exact(&mut head).ok()?;
        let id = head.strip_prefix(MAGIC)?.try_into().ok()?;
        Some((id, f.metadata().ok()?.len()))
    }

    /// The records from byte `offset` on, if the file is still the one of id `id`;
    /// also whether they reach the end of the file (none is cut short or malformed).
    pub fn read_after(&self, id: &[u8; ID_LEN], offset: u64) -> Option<(Vec<(String, Bytes)>, bool)> {
        use std::io::{Read, Seek};
        let mut f = std::fs::File::open(&self.path).ok()?;
        let mut head = [0u8; MAGIC.len() + ID_LEN];
        f.read_exact(&mut head).ok()?;
        if head[..MAGIC.len()] != *MAGIC || head[MAGIC.len()..] != id[..] || offset < head.len() as u64 {
            return None;
        }
        f.seek(std::io::SeekFrom::Start(offset)).ok()?;
        let mut rest = Vec::new();
        f.read_to_end(&mut rest).ok()?;
        let (records, used) = decode_records(&rest);
        Some((records, used == rest.len()))
    }

    /// Adds `files` (name, sealed bytes). Failing to is only a warning: the next
    /// writer fetches them again. A file that is missing, or of another version,
    /// is written afresh (renamed into place: two writers creating it at once
    /// leave one of theirs, whole).
    pub fn append(&self, files: &[(String, Bytes)]) {
        if files.is_empty() {
            return;
        }
        if self.head().is_none() {
            let mut kept = self.read().map(|c| c.records).unwrap_or_default();
            kept.extend_from_slice(files);
            self.rewrite(&kept);
            return;
        }
        let r = (|| {
            let mut f = std::fs::OpenOptions::new().append(true).open(&self.path)?;
            let mut buf = Vec::new();
            files.iter().for_each(|(name, data)| encode_record(&mut buf, name, data));
            f.write_all(&buf)
        })();
        if let Err(e) = r {
            tracing::warn!("cannot add to the index cache {}: {e}", self.path.display());
        }
    }

    /// Writes the cache again holding only `files`, under a new id; returns it and
    /// the file's length, or `None` if it could not.
    pub fn rewrite(&self, files: &[(String, Bytes)]) -> Option<([u8; ID_LEN], u64)> {
        let id = crate::id::random_bytes::<ID_LEN>();
        let tmp = self.path.with_extension(format!("tmp{}", hex::encode(id)));
        let r = (|| {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut buf = MAGIC.to_vec();
            buf.extend_from_slice(&id);
            files.iter().for_each(|(name, data)| encode_record(&mut buf, name, data));
            std::fs::write(&tmp, &buf)?;
            std::fs::rename(&tmp, &self.path)?;
            Ok::<_, std::io::Error>(buf.len() as u64)
        })();
        match r {
            Ok(len) => Some((id, len)),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!("cannot write the index cache {}: {e}", self.path.display());
                None
            }
        }
    }
}

/// A cache file read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub id: [u8; ID_LEN],
    pub records: Vec<(String, Bytes)>,
    /// Bytes from the file's start to the end of the last record read.
    pub len: u64,
}

pub(crate) fn encode_record(buf: &mut Vec<u8>, name: &str, data: &[u8]) {
    buf.extend_from_slice(&(name.len() as u32).to_le_bytes());
    buf.extend_from_slice(name.as_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
    buf.extend_from_slice(data);
}

/// The records of a cache file, up to the first that is cut short or malformed.
#[cfg(test)]
pub fn decode(bytes: &[u8]) -> Vec<(String, Bytes)> {
    decode_file(bytes).map(|c| c.records).unwrap_or_default()
}

/// A cache file's id and records; `None` without the magic and id.
pub fn decode_file(bytes: &[u8]) -> Option<Cached> {
    let rest = bytes.strip_prefix(MAGIC)?;
    let id: [u8; ID_LEN] = rest.get(..ID_LEN)?.try_into().ok()?;
    let (records, used) = decode_records(&rest[ID_LEN..]);
    Some(Cached { id, records, len: (MAGIC.len() + ID_LEN + used) as u64 })
}

/// Records up to the first that is cut short or malformed, and the bytes they take.
fn decode_records(bytes: &[u8]) -> (Vec<(String, Bytes)>, usize) {
    let take = |rest: &mut &[u8], n: usize| -> Option<Vec<u8>> {
        let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
        *rest = tail;
        Some(head.to_vec())
    };
    let len = |rest: &mut &[u8], max: usize| -> Option<usize> {
        let b: [u8; 4] = take(rest, 4)?.try_into().ok()?;
        Some(u32::from_le_bytes(b) as usize).filter(|n| *n <= max)
    };
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let mut r = rest;
        let record = (|| {
            let n = len(&mut r, MAX_NAME).filter(|n| *n > 0)?;
            let name = String::from_utf8(take(&mut r, n)?).ok()?;
            let n = len(&mut r, MAX_OBJECT)?;
            Some((name, Bytes::from(take(&mut r, n)?)))
        })();
        match record {
            Some(rec) => {
                rest = r;
                out.push(rec);
            }
            None => break,
        }
    }
    (out, bytes.len() - rest.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_cut_tail_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let cache = IndexCache::at(&dir.path().join("sub/index-x"));
        assert!(cache.load().is_empty(), "no file yet");
        cache.append(&[("index/a".into(), Bytes::from_static(b"one")), ("index/b".into(), Bytes::new())]);
        cache.append(&[("index/c".into(), Bytes::from_static(b"three"))]);
        let loaded = cache.load();
        assert_eq!(loaded.len(), 3);
        assert_eq!(loaded["index/c"], Bytes::from_static(b"three"));
        let mut bytes = std::fs::read(&cache.path).unwrap();
        bytes.truncate(bytes.len() - 2);
        assert_eq!(decode(&bytes).len(), 2, "the cut record is left out");
        cache.rewrite(&[("index/c".into(), Bytes::from_static(b"three"))]);
        assert_eq!(cache.load().keys().collect::<Vec<_>>(), vec!["index/c"]);
        assert!(decode(b"not a cache").is_empty());
        assert!(decode(b"EBIC2\n0123456789abcdef\x00\x00\x00\x00").is_empty(), "an empty name is malformed");
        assert!(decode(b"EBIC1\n\x01\x00\x00\x00a\x00\x00\x00\x00").is_empty(), "the first version is not read");

        // A file of the first version is written afresh at the first addition.
        std::fs::write(&cache.path, b"EBIC1\n\x07\x00\x00\x00index/x\x01\x00\x00\x00z").unwrap();
        assert!(cache.head().is_none());
        cache.append(&[("index/d".into(), Bytes::from_static(b"four"))]);
        let read = cache.read().unwrap();
        assert_eq!(read.records, vec![("index/d".to_string(), Bytes::from_static(b"four"))]);
        assert_eq!(cache.head(), Some((read.id, read.len)));
    }
}
