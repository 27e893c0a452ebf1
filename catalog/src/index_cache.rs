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
//! File: `<cache dir>/index-<repository id hex>`: `EBIC1\n`, then records, each
//! `u32` LE name length (1 to 1024), the name (UTF-8), `u32` LE length (at most
//! 64 MiB), the sealed bytes. Records are appended; reading stops at the first
//! one that is cut short or malformed (a write a crash interrupted). The file is
//! written again, with only the files listed, once those it holds for nothing
//! outnumber them.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use bytes::Bytes;

use crate::id::Id;

const MAGIC: &[u8] = b"EBIC1\n";
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
        match std::fs::read(&self.path) {
            Ok(bytes) => decode(&bytes).into_iter().collect(),
            Err(_) => HashMap::new(),
        }
    }

    /// Adds `files` (name, sealed bytes). Failing to is only a warning: the next
    /// writer fetches them again.
    pub fn append(&self, files: &[(String, Bytes)]) {
        if files.is_empty() {
            return;
        }
        let r = (|| {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
            let mut buf = Vec::new();
            if f.metadata()?.len() == 0 {
                buf.extend_from_slice(MAGIC);
            }
            files.iter().for_each(|(name, data)| encode_record(&mut buf, name, data));
            f.write_all(&buf)
        })();
        if let Err(e) = r {
            tracing::warn!("cannot add to the index cache {}: {e}", self.path.display());
        }
    }

    /// Writes the cache again holding only `files`.
    pub fn rewrite(&self, files: &[(String, Bytes)]) {
        let tmp = self.path.with_extension(format!("tmp{}", std::process::id()));
        let r = (|| {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut buf = MAGIC.to_vec();
            files.iter().for_each(|(name, data)| encode_record(&mut buf, name, data));
            std::fs::write(&tmp, &buf)?;
            std::fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!("cannot write the index cache {}: {e}", self.path.display());
        }
    }
}

pub(crate) fn encode_record(buf: &mut Vec<u8>, name: &str, data: &[u8]) {
    buf.extend_from_slice(&(name.len() as u32).to_le_bytes());
    buf.extend_from_slice(name.as_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
    buf.extend_from_slice(data);
}

/// The records of a cache file, up to the first that is cut short or malformed.
pub fn decode(bytes: &[u8]) -> Vec<(String, Bytes)> {
    let mut out = Vec::new();
    let Some(mut rest) = bytes.strip_prefix(MAGIC) else { return out };
    let take = |rest: &mut &[u8], n: usize| -> Option<Vec<u8>> {
        let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
        *rest = tail;
        Some(head.to_vec())
    };
    let len = |rest: &mut &[u8], max: usize| -> Option<usize> {
        let b: [u8; 4] = take(rest, 4)?.try_into().ok()?;
        Some(u32::from_le_bytes(b) as usize).filter(|n| *n <= max)
    };
    while !rest.is_empty() {
        let record = (|| {
            let n = len(&mut rest, MAX_NAME).filter(|n| *n > 0)?;
            let name = String::from_utf8(take(&mut rest, n)?).ok()?;
            let n = len(&mut rest, MAX_OBJECT)?;
            Some((name, Bytes::from(take(&mut rest, n)?)))
        })();
        match record {
            Some(r) => out.push(r),
            None => break,
        }
    }
    out
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
        assert!(decode(b"EBIC1\n\x00\x00\x00\x00").is_empty(), "an empty name is malformed");
    }
}
