//! A host's merged copy of the repository's index, looked up in place, so that a
//! writer's start costs the same at 100,000 points as at 10: it reads a header,
//! lists `index/` from a recent name on, and opens the index files its host's copy
//! of them (`index_cache`) gained since the merge; a lookup then finds the one
//! block that may hold an entry among the blocks' first keys, held in memory (half
//! a byte an entry), and decrypts that block alone. A writer that runs for months
//! holds no more than that and a few blocks, however many it has looked in.
//!
//! It is derived data, never part of the repository, and never trusted more than
//! the index files it came from: the header and every block are sealed with a key
//! derived from the repository's keys and a random nonce of each build, under
//! additional data naming the block, so a damaged, truncated or altered table
//! fails to open (and is built again) rather than answering with a wrong entry.
//!
//! File `<cache dir>/dedup-<repository id hex>`:
//!
//! ```text
//! "EBHI2\n" || nonce (16 bytes) || u32 LE header length (at most 64 MiB) || header
//!           || fences || block 0 || block 1 || ...
//! ```
//!
//! Each part is `seal(object key of "hostindex/<nonce hex>", counter, AAD, plain)`:
//! the header with counter 0 and AAD `hostindex/<nonce hex>/header`, the fences
//! with counter `u64::MAX` and AAD `hostindex/<nonce hex>/fences`, block `i` with
//! counter `i + 1` and AAD `hostindex/<nonce hex>/<i>`. The fences' plaintext is
//! the key of each block's first entry, block by block: content id (32 bytes) then
//! kind (`u8`), strictly increasing; its length follows from the header's count of
//! entries. (`EBHI1` tables, without fences, do not open: they are built again.)
//! The header's plaintext:
//! `u8` version 1; `bytes` the digest of the generation markers when it was
//! built (`generation::current`, §13; empty for none); 16 bytes, the id of the host's copy of the index files it
//! covers, and `u64` how many of that file's bytes; `u64` the time of the newest
//! index name covered (`index::index_time`); `u32` count and that many `bytes`
//! names: the index files covered named within `RECENT` of that time; `u64` the
//! number of entries. Blocks hold `BLOCK` entries each (the last one fewer): kind
//! (`u8`) then a `BlobRef` (76 bytes), strictly increasing by content id then
//! kind, each content id and kind once.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aes_gcm::Aes256Gcm;

use crate::codec::{Decoder, Encoder};
use crate::crypto::{open, seal, Keys, SEAL_OVERHEAD};
use crate::id::{random_bytes, Id};
use crate::pack::{BlobKind, BlobRef, PackEntry, BLOB_REF_LEN};

const MAGIC: &[u8] = b"EBHI2\n";
const VERSION: u8 = 1;
const NONCE: usize = 16;
const MAX_HEADER: usize = 64 << 20;
const MAX_NAME: usize = 1024;
/// Entries a block holds.
pub const BLOCK: usize = 64;
const ENTRY: usize = 1 + BLOB_REF_LEN;
/// A fence: the key of a block's first entry.
const FENCE: usize = 32 + 1;
/// Blocks a table keeps opened, for lookups of the same entries again: at most
/// about 1.3 MiB.
const OPENED_BLOCKS: usize = 256;
/// Index files named this long before the newest one covered are looked for again
/// at each start: a writer names its index file before it puts it, and hosts'
/// clocks disagree (by at most 9 minutes, §13). One that lands later is missed
/// until the table is built again: it costs only deduplication.
pub const RECENT_NS: u64 = 15 * 60 * 1_000_000_000;

/// What a table says of itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    /// The generation markers when it was built (`generation::current`).
    pub generation: String,
    /// The host's copy of the index files (`index_cache`) it covers: its id, and
    /// how many of its bytes; the records after are newer.
    pub cache_id: [u8; 16],
    pub cache_len: u64,
    /// The time of the newest index name covered, 0 for none.
    pub newest: u64,
    /// The index files covered named within `RECENT_NS` of `newest`.
    pub recent: Vec<String>,
    /// How many entries its blocks hold.
    pub entries: u64,
}

impl Header {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.u8(VERSION);
        e.bytes(self.generation.as_bytes());
        e.buf.extend_from_slice(&self.cache_id);
        e.u64(self.cache_len);
        e.u64(self.newest);
        e.u32(u32::try_from(self.recent.len()).expect("fewer than 2^32 names"));
        for n in &self.recent {
            e.bytes(n.as_bytes());
        }
        e.u64(self.entries);
        e.buf
    }

    pub fn decode(bytes: &[u8]) -> Result<Header, crate::codec::DecodeError> {
        let mut d = Decoder::new("host index header", bytes);
        let v = d.u8()?;
        if v != VERSION {
            return Err(d.error(format!("unknown version {v}")));
        }
        let name = |d: &mut Decoder| -> Result<String, crate::codec::DecodeError> {
            let b = d.bytes()?;
            if b.len() > MAX_NAME {
                return Err(d.error("a name is too long"));
            }
            Ok(std::str::from_utf8(b).map_err(|_| d.error("a name is not UTF-8"))?.to_string())
        };
        let generation = name(&mut d)?;
        let mut cache_id = [0u8; 16];
        for b in &mut cache_id {
            *b = d.u8()?;
        }
        let cache_len = d.u64()?;
        let newest = d.u64()?;
        let n = d.count(4)?;
        let mut recent = Vec::with_capacity(n);
        for _ in 0..n {
            recent.push(name(&mut d)?);
        }
        let entries = d.u64()?;
        d.finish()?;
        Ok(Header { generation, cache_id, cache_len, newest, recent, entries })
    }
}

/// The entries of one block: `count` of them, sorted and each key once.
pub fn decode_block(bytes: &[u8], count: usize) -> Result<Vec<PackEntry>, crate::codec::DecodeError> {
    let mut d = Decoder::new("host index block", bytes);
    let mut out: Vec<PackEntry> = Vec::with_capacity(count.min(BLOCK));
    for _ in 0..count {
        let kind = BlobKind::from_u8(d.u8()?).ok_or_else(|| d.error("unknown blob kind"))?;
        let e = PackEntry { kind, blob: BlobRef::decode(&mut d)? };
        if out.last().is_some_and(|last| key(last) >= key(&e)) {
            return Err(d.error("entries out of order"));
        }
        out.push(e);
    }
    d.finish()?;
    Ok(out)
}

/// The first key of each of `blocks` blocks: strictly increasing.
pub fn decode_fences(bytes: &[u8], blocks: usize) -> Result<Vec<Key>, crate::codec::DecodeError> {
    let mut d = Decoder::new("host index fences", bytes);
    let mut out: Vec<Key> = Vec::with_capacity(blocks.min(bytes.len() / FENCE));
    for _ in 0..blocks {
        let mut id = [0u8; 32];
        for b in &mut id {
            *b = d.u8()?;
        }
        let kind = d.u8()?;
        BlobKind::from_u8(kind).ok_or_else(|| d.error("unknown blob kind"))?;
        if out.last().is_some_and(|last| *last >= (id, kind)) {
            return Err(d.error("fences out of order"));
        }
        out.push((id, kind));
    }
    d.finish()?;
    Ok(out)
}

fn encode_fences(entries: &[PackEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len().div_ceil(BLOCK) * FENCE);
    for block in entries.chunks(BLOCK) {
        let (id, kind) = key(&block[0]);
        out.extend_from_slice(&id);
        out.push(kind);
    }
    out
}

/// A table's order: content id, then kind.
pub type Key = ([u8; 32], u8);

fn key(e: &PackEntry) -> Key {
    (e.blob.id.0, e.kind as u8)
}

fn cipher(keys: &Keys, nonce: &[u8; NONCE]) -> (Aes256Gcm, String) {
    let base = format!("hostindex/{}", hex::encode(nonce));
    (keys.object_cipher(&base), base)
}

/// A table opened for lookups.
pub struct HostIndex {
    file: std::fs::File,
    path: PathBuf,
    cipher: Aes256Gcm,
    base: String,
    pub header: Header,
    /// The key of each block's first entry.
    fences: Vec<Key>,
    /// Where block 0 starts.
    blocks_at: u64,
    /// Blocks opened lately, by number: at most `OPENED_BLOCKS`.
    opened: Mutex<HashMap<u64, Arc<[PackEntry]>>>,
    /// A block failed to open: the table is no longer used.
    damaged: std::sync::atomic::AtomicBool,
}

impl HostIndex {
    /// The table at `path`, if it opens under these keys.
    pub fn open(path: &Path, keys: &Keys) -> Option<HostIndex> {
        let file = std::fs::File::open(path).ok()?;
        let mut head = [0u8; MAGIC.len() + NONCE + 4];
        file.read_exact_at(&mut head, 0).ok()?;
        if &head[..MAGIC.len()] != MAGIC {
            return None;
        }
        let nonce: [u8; NONCE] = head[MAGIC.len()..MAGIC.len() + NONCE].try_into().ok()?;
        let len = u32::from_le_bytes(head[MAGIC.len() + NONCE..].try_into().ok()?) as usize;
        let size = file.metadata().ok()?.len();
        if !(SEAL_OVERHEAD..=MAX_HEADER).contains(&len) || (head.len() + len) as u64 > size {
            return None;
        }
        let mut sealed = vec![0u8; len];
        file.read_exact_at(&mut sealed, head.len() as u64).ok()?;
        let (cipher, base) = cipher(keys, &nonce);
        let plain = open(&cipher, format!("{base}/header").as_bytes(), &sealed).ok()?;
        let header = Header::decode(&plain).ok()?;
        // The fences and the blocks it says it has are all there.
        let fences_at = (head.len() + len) as u64;
        let blocks = usize::try_from(header.entries.div_ceil(BLOCK as u64)).ok()?;
        let fences_len = blocks.checked_mul(FENCE)?.checked_add(SEAL_OVERHEAD)?;
        let blocks_at = fences_at.checked_add(fences_len as u64)?;
        if size != blocks_at.checked_add(sealed_size(header.entries)?)? {
            return None;
        }
        let mut sealed = vec![0u8; fences_len];
        file.read_exact_at(&mut sealed, fences_at).ok()?;
        let plain = open(&cipher, format!("{base}/fences").as_bytes(), &sealed).ok()?;
        let fences = decode_fences(&plain, blocks).ok()?;
        Some(HostIndex {
            file,
            path: path.to_path_buf(),
            cipher,
            base,
            header,
            fences,
            blocks_at,
            opened: Mutex::new(HashMap::new()),
            damaged: Default::default(),
        })
    }

    /// Writes a table of `entries` (sorted by `sort_entries`) at `path`, replacing
    /// any. Failing to is only a warning: the next writer builds it again.
    pub fn write(path: &Path, keys: &Keys, mut header: Header, entries: &[PackEntry]) {
        header.entries = entries.len() as u64;
        let nonce: [u8; NONCE] = random_bytes();
        let (cipher, base) = cipher(keys, &nonce);
        let tmp = path.with_extension(format!("tmp{}", hex::encode(nonce)));
        let r = (|| {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            let sealed = seal(&cipher, 0, format!("{base}/header").as_bytes(), &header.encode());
            out.write_all(MAGIC)?;
            out.write_all(&nonce)?;
            out.write_all(&(sealed.len() as u32).to_le_bytes())?;
            out.write_all(&sealed)?;
            out.write_all(&seal(&cipher, u64::MAX, format!("{base}/fences").as_bytes(), &encode_fences(entries)))?;
            let mut plain = Vec::with_capacity(BLOCK * ENTRY);
            for (i, block) in entries.chunks(BLOCK).enumerate() {
                plain.clear();
                let mut e = Encoder { buf: std::mem::take(&mut plain) };
                for entry in block {
                    e.u8(entry.kind as u8);
                    entry.blob.encode(&mut e);
                }
                plain = e.buf;
                out.write_all(&seal(&cipher, i as u64 + 1, format!("{base}/{i}").as_bytes(), &plain))?;
            }
            out.into_inner().map_err(|e| e.into_error())?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!("cannot write the host's merged index {}: {e}", path.display());
        }
    }

    fn blocks(&self) -> u64 {
        self.fences.len() as u64
    }

    /// Block `i`, opened and decoded; `None`, and the table given up, if it does
    /// not open or does not start with its fence.
    fn block(&self, i: u64) -> Option<Arc<[PackEntry]>> {
        if let Some(b) = self.opened.lock().expect("host index lock").get(&i) {
            return Some(b.clone());
        }
        let count = (self.header.entries - i * BLOCK as u64).min(BLOCK as u64) as usize;
        let mut sealed = vec![0u8; count * ENTRY + SEAL_OVERHEAD];
        let read = self.file.read_exact_at(&mut sealed, self.blocks_at + i * (BLOCK * ENTRY + SEAL_OVERHEAD) as u64);
        let entries = read
            .ok()
            .and_then(|()| open(&self.cipher, format!("{}/{i}", self.base).as_bytes(), &sealed).ok())
            .and_then(|plain| decode_block(&plain, count).ok())
            .filter(|entries| entries.first().map(key) == self.fences.get(i as usize).copied());
        let Some(entries) = entries else {
            if !self.damaged.swap(true, std::sync::atomic::Ordering::SeqCst) {
                tracing::warn!("the host's merged index {} is damaged: it is built again", self.path.display());
                let _ = std::fs::remove_file(&self.path);
            }
            return None;
        };
        let entries: Arc<[PackEntry]> = entries.into();
        let mut opened = self.opened.lock().expect("host index lock");
        if opened.len() >= OPENED_BLOCKS {
            opened.clear();
        }
        opened.insert(i, entries.clone());
        Some(entries)
    }

    /// Where the blob of this kind and content id is, as far as the table says.
    pub fn get(&self, kind: BlobKind, id: &Id) -> Option<BlobRef> {
        if self.damaged.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        let want = (id.0, kind as u8);
        // The last block whose first entry is at or before `want`.
        let after = self.fences.partition_point(|f| *f <= want);
        let block = self.block(after.checked_sub(1)? as u64)?;
        block.binary_search_by(|e| key(e).cmp(&want)).ok().map(|i| block[i].blob)
    }

    /// Every entry, block by block; `None` if a block does not open.
    pub fn all(&self) -> Option<Vec<PackEntry>> {
        let mut out = Vec::with_capacity(self.header.entries as usize);
        for i in 0..self.blocks() {
            out.extend_from_slice(&self.block(i)?);
            // Read once: not kept for lookups.
            self.opened.lock().expect("host index lock").remove(&i);
        }
        Some(out)
    }
}

/// The bytes of the blocks of `entries` entries.
fn sealed_size(entries: u64) -> Option<u64> {
    let full = entries / BLOCK as u64;
    let rest = entries % BLOCK as u64;
    let last = if rest > 0 { rest * ENTRY as u64 + SEAL_OVERHEAD as u64 } else { 0 };
    full.checked_mul((BLOCK * ENTRY + SEAL_OVERHEAD) as u64)?.checked_add(last)
}

/// Sorts entries into a table's order and keeps the first of each key: the first
/// entry seen wins, as in a writer's map.
pub fn sort_entries(entries: &mut Vec<PackEntry>) {
    // Stable: of equal keys, the first given stays first.
    entries.sort_by_key(key);
    entries.dedup_by_key(|e| key(e));
}

/// The table's file in a cache directory.
pub fn table_path(dir: &Path, repo: &Id) -> PathBuf {
    dir.join(format!("dedup-{}", repo.to_hex()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    fn entry(i: u32) -> PackEntry {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&i.to_be_bytes());
        PackEntry {
            kind: if i.is_multiple_of(3) { BlobKind::Tree } else { BlobKind::Data },
            blob: BlobRef { id: Id(id), pack: Id([7; 32]), offset: i, length: 10, raw_len: 20 },
        }
    }

    fn keys() -> Keys {
        Keys::derive(&MasterKey([3; 32]), &Id([1; 32]))
    }

    /// Every entry is found, under its kind only, in tables of many sizes; an
    /// entry given twice keeps its first place.
    #[test]
    fn every_entry_is_found_where_it_was_given() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dedup-x");
        for n in [0u32, 1, 63, 64, 65, 200, 1000] {
            let mut entries: Vec<PackEntry> = (0..n).rev().map(|i| entry(i * 2)).collect();
            if n > 0 {
                let mut again = entry(0);
                again.blob.offset = 999_999;
                entries.push(again);
            }
            sort_entries(&mut entries);
            let header =
                Header { generation: "g".into(), newest: 5, recent: vec!["index/a".into()], ..Header::default() };
            HostIndex::write(&path, &keys(), header.clone(), &entries);
            let t = HostIndex::open(&path, &keys()).unwrap();
            assert_eq!(t.header, Header { entries: n as u64, ..header });
            for i in 0..n {
                let e = entry(i * 2);
                assert_eq!(t.get(e.kind, &e.blob.id), Some(e.blob), "entry {i} of {n}");
                let other = if e.kind == BlobKind::Tree { BlobKind::Data } else { BlobKind::Tree };
                assert_eq!(t.get(other, &e.blob.id), None);
                let missing = entry(i * 2 + 1);
                assert_eq!(t.get(missing.kind, &missing.blob.id), None);
            }
            assert_eq!(t.all().unwrap().len(), n as usize);
        }
    }

    /// A table altered anywhere, cut short, or opened under other keys gives no
    /// entry; one whose block fails is given up and removed.
    #[test]
    fn an_altered_table_answers_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dedup-x");
        let mut entries: Vec<PackEntry> = (0..300).map(entry).collect();
        sort_entries(&mut entries);
        HostIndex::write(&path, &keys(), Header::default(), &entries);
        let good = std::fs::read(&path).unwrap();
        let other = Keys::derive(&MasterKey([4; 32]), &Id([1; 32]));
        assert!(HostIndex::open(&path, &other).is_none());
        assert!(HostIndex::open(&path.with_extension("none"), &keys()).is_none());
        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert!(HostIndex::open(&path, &keys()).is_none(), "cut short");
        let header_end = MAGIC.len() + NONCE + 4 + 10;
        let mut bad = good.clone();
        bad[header_end] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(HostIndex::open(&path, &keys()).is_none(), "header altered");
        // A block altered: found out at the lookup that reads it.
        let mut bad = good.clone();
        let last = bad.len() - 5;
        bad[last] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let t = HostIndex::open(&path, &keys()).unwrap();
        let e = entry(299);
        assert_eq!(t.get(e.kind, &e.blob.id), None);
        assert!(!path.exists(), "a damaged table is removed");
        let e = entry(0);
        assert_eq!(t.get(e.kind, &e.blob.id), None, "nor used any more");
        // The fences altered.
        let mut bad = good.clone();
        let fences_at =
            MAGIC.len() + NONCE + 4 + u32::from_le_bytes(good[MAGIC.len() + NONCE..][..4].try_into().unwrap()) as usize;
        bad[fences_at + 20] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(HostIndex::open(&path, &keys()).is_none(), "fences altered");
        // A table of the version before, without fences, is built again.
        let mut old = good;
        old[..MAGIC.len()].copy_from_slice(b"EBHI1\n");
        std::fs::write(&path, &old).unwrap();
        assert!(HostIndex::open(&path, &keys()).is_none(), "EBHI1");
    }

    /// Fences sealed under the table's key that do not match its blocks (a table
    /// written wrong) send a lookup to a block that does not start where they
    /// say: the table is given up, and no entry is given.
    #[test]
    fn a_block_that_does_not_start_at_its_fence_gives_no_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dedup-x");
        let mut entries: Vec<PackEntry> = (0..200).map(|i| entry(i * 2)).collect();
        sort_entries(&mut entries);
        HostIndex::write(&path, &keys(), Header::default(), &entries);
        let mut bytes = std::fs::read(&path).unwrap();
        let nonce: [u8; NONCE] = bytes[MAGIC.len()..][..NONCE].try_into().unwrap();
        let len = u32::from_le_bytes(bytes[MAGIC.len() + NONCE..][..4].try_into().unwrap()) as usize;
        let fences_at = MAGIC.len() + NONCE + 4 + len;
        // Every fence one entry later than its block's first.
        let shifted: Vec<PackEntry> = (0..200).map(|i| entry(i * 2 + 1)).collect();
        let (cipher, base) = cipher(&keys(), &nonce);
        let sealed = seal(&cipher, u64::MAX, format!("{base}/fences").as_bytes(), &encode_fences(&shifted));
        bytes[fences_at..fences_at + sealed.len()].copy_from_slice(&sealed);
        std::fs::write(&path, &bytes).unwrap();
        let t = HostIndex::open(&path, &keys()).unwrap();
        let e = entry(130);
        assert_eq!(t.get(e.kind, &e.blob.id), None);
        assert!(!path.exists(), "the table is removed");
    }

    /// A lookup decrypts one block at most, and a table looked up everywhere
    /// keeps only a few blocks opened: a writer's memory does not grow with the
    /// lookups it makes.
    #[test]
    fn a_lookup_opens_one_block_and_few_stay_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dedup-x");
        let n = (4 * OPENED_BLOCKS * BLOCK) as u32;
        let mut entries: Vec<PackEntry> = (0..n).map(|i| entry(i * 2)).collect();
        sort_entries(&mut entries);
        HostIndex::write(&path, &keys(), Header::default(), &entries);
        let t = HostIndex::open(&path, &keys()).unwrap();
        assert_eq!(t.blocks(), 4 * OPENED_BLOCKS as u64);
        let opened = || t.opened.lock().unwrap().len();
        let missing = entry(2 * n / 3 * 2 + 1);
        assert_eq!(t.get(missing.kind, &missing.blob.id), None);
        assert_eq!(opened(), 1, "one block for a lookup");
        let before = entry(0);
        assert_eq!(t.get(BlobKind::Data, &Id([0; 32])), None, "before the first entry: no block");
        assert_eq!(opened(), 1);
        for i in 0..n {
            let e = entry(i * 2);
            assert_eq!(t.get(e.kind, &e.blob.id), Some(e.blob), "entry {i}");
            assert!(opened() <= OPENED_BLOCKS);
        }
        assert_eq!(t.get(before.kind, &before.blob.id), Some(before.blob));
    }
}
