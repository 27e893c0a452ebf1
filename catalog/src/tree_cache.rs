//! What each tree uses, kept on this host by the tree's place (pack, offset), so
//! that prune reads, opens and decodes a tree from the store once, not on every
//! run. A tree never changes where it lies (packs are written once, under random
//! ids, and deleted whole), so what it uses there never changes either.
//!
//! Directory `<cache dir>/trees-<repository id hex>/`, one file per run that wrote
//! one, named by its 16-byte id in hex. File: `EBTC1\n`, the id, then records: the
//! tree's pack (32 bytes) and offset (`u32` LE), `u32` LE length (at most
//! `MAX_RECORD`), then that many sealed bytes: AES-256-GCM under the key derived
//! for the file (label `"ebb v1 tree cache\0"`, info the file id), the record's
//! number in the file as the nonce counter, pack ‖ offset as AAD. The plaintext:
//! `u32` count and that many `BlobRef`s (76 bytes each, §8) of its subtrees; `u32`
//! count and that many pack ids (32 bytes each) its data blobs are in, each once,
//! in the order first used; `u32` count and that many data blobs it uses, each the
//! number of its pack in that list, offset and length (`u32` LE). Reading stops at the first record cut short (a write a
//! crash interrupted).
//!
//! The cache is never the truth about the repository, only about trees: a record
//! that does not open or decode (damaged, altered, of another repository) is a
//! miss, and the tree is read from the store. A run writes a new file holding
//! every tree it reached, then deletes the files it read: trees of forgotten
//! points go with them.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::codec::{Decoder, Encoder};
use crate::crypto::{open, seal_into, Keys};
use crate::id::Id;
use crate::pack::{BlobRef, BLOB_REF_LEN};
use crate::tree::{EntryKind, Extent, Tree};

const MAGIC: &[u8] = b"EBTC1\n";
const ID_LEN: usize = 16;
/// A record's place: pack and offset.
const PLACE_LEN: usize = 32 + 4;
/// A tree of a million files takes about 40 MiB here; nothing larger is read.
pub const MAX_RECORD: usize = 64 << 20;
/// A data blob a tree uses: the number of its pack in the record's list, offset,
/// length.
const DATA_LEN: usize = 4 + 4 + 4;

/// What one tree uses: the trees below it, and the data blobs of its files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeUses {
    pub subtrees: Vec<BlobRef>,
    /// (pack, offset, length) of each data extent, in the tree's order.
    pub data: Vec<(Id, u32, u32)>,
}

impl TreeUses {
    pub fn of(tree: &Tree) -> TreeUses {
        let mut uses = TreeUses::default();
        for entry in &tree.entries {
            match entry.kind {
                EntryKind::Dir => uses.subtrees.extend(entry.subtree),
                EntryKind::File => uses.data.extend(entry.content.iter().filter_map(|x| match x {
                    Extent::Data(b) => Some((b.pack, b.offset, b.length)),
                    _ => None,
                })),
                _ => {}
            }
        }
        uses
    }

    /// Subtrees, then the packs the data blobs are in (each once, in the order
    /// first used), then each data blob as the number of its pack in that list,
    /// its offset and length: the blobs of a tree lie in a few packs.
    pub fn encode(&self) -> Vec<u8> {
        let mut packs: HashMap<Id, u32> = HashMap::new();
        let mut order: Vec<&Id> = Vec::new();
        let numbers: Vec<u32> = self
            .data
            .iter()
            .map(|(pack, _, _)| {
                *packs.entry(*pack).or_insert_with(|| {
                    order.push(pack);
                    order.len() as u32 - 1
                })
            })
            .collect();
        let len = 12 + self.subtrees.len() * BLOB_REF_LEN + order.len() * 32 + self.data.len() * DATA_LEN;
        let mut e = Encoder { buf: Vec::with_capacity(len) };
        e.u32(self.subtrees.len() as u32);
        for b in &self.subtrees {
            b.encode(&mut e);
        }
        e.u32(order.len() as u32);
        for pack in order {
            e.id(pack);
        }
        e.u32(self.data.len() as u32);
        for (n, (_, offset, length)) in numbers.iter().zip(&self.data) {
            e.u32(*n);
            e.u32(*offset);
            e.u32(*length);
        }
        e.buf
    }

    pub fn decode(bytes: &[u8]) -> Result<TreeUses, crate::codec::DecodeError> {
        let mut d = Decoder::new("tree uses", bytes);
        let n = d.count(BLOB_REF_LEN)?;
        let mut subtrees = Vec::with_capacity(n);
        for _ in 0..n {
            subtrees.push(BlobRef::decode(&mut d)?);
        }
        let n = d.count(32)?;
        let mut packs = Vec::with_capacity(n);
        for _ in 0..n {
            packs.push(d.id()?);
        }
        let n = d.count(DATA_LEN)?;
        let mut data = Vec::with_capacity(n);
        for _ in 0..n {
            let pack = *packs.get(d.u32()? as usize).ok_or_else(|| d.error("a data blob in no pack listed"))?;
            data.push((pack, d.u32()?, d.u32()?));
        }
        d.finish()?;
        Ok(TreeUses { subtrees, data })
    }
}

fn place(pack: &Id, offset: u32) -> [u8; PLACE_LEN] {
    let mut p = [0u8; PLACE_LEN];
    p[..32].copy_from_slice(&pack.0);
    p[32..].copy_from_slice(&offset.to_le_bytes());
    p
}

/// A hash of a place, as the key of the map of what the files hold: two places
/// that share one are told apart by the record's AAD (the other's does not open).
fn place_key(pack: &Id, offset: u32) -> u64 {
    let mut k = [0u8; 8];
    k.copy_from_slice(&pack.0[..8]);
    u64::from_le_bytes(k) ^ u64::from(offset).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Reads a cache file's id, then calls `each` with every record's head (place,
/// where its sealed bytes start, their length), up to the first record cut short or
/// malformed; `None` when `r` (of `len` bytes) is not a cache file. What the
/// records say is read when a tree is asked for.
pub fn read_heads<R: std::io::Read + std::io::Seek>(
    mut r: R,
    len: u64,
    mut each: impl FnMut([u8; PLACE_LEN], u64, u32),
) -> Option<[u8; ID_LEN]> {
    let mut head = [0u8; MAGIC.len() + ID_LEN];
    r.read_exact(&mut head).ok()?;
    let id: [u8; ID_LEN] = head.strip_prefix(MAGIC)?.try_into().ok()?;
    let mut at = head.len() as u64;
    let mut rec = [0u8; PLACE_LEN + 4];
    while r.read_exact(&mut rec).is_ok() {
        let place: [u8; PLACE_LEN] = rec[..PLACE_LEN].try_into().ok()?;
        let n = u32::from_le_bytes(rec[PLACE_LEN..].try_into().ok()?);
        let start = at + rec.len() as u64;
        if n as usize > MAX_RECORD || len.saturating_sub(start) < u64::from(n) || r.seek_relative(i64::from(n)).is_err()
        {
            break;
        }
        each(place, start, n);
        at = start + u64::from(n);
    }
    Some(id)
}

/// A file read: where it is, and the key of its records.
struct Source {
    path: PathBuf,
    file: std::fs::File,
    cipher: aes_gcm::Aes256Gcm,
}

/// The cache of one repository on this host, for one run: the files there when it
/// began, and the file it is writing.
pub struct TreeCache {
    dir: PathBuf,
    sources: Vec<Source>,
    /// `place_key` to (source, start, length).
    held: HashMap<u64, (u32, u64, u32)>,
    out: Option<Output>,
    /// Records read from the cache, and trees added to it.
    pub hits: u64,
    pub misses: u64,
}

/// A file being written: a prune's (every tree the run reached, under a temporary
/// name until it is renamed into place) or a writer's.
struct Output {
    temp: Option<PathBuf>,
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    cipher: aes_gcm::Aes256Gcm,
    records: u64,
    buf: Vec<u8>,
}

impl TreeCache {
    /// The cache of repository `repo` in `dir`: the files there read (their
    /// records' heads only). Nothing is held if the directory cannot be made or
    /// read; a file that cannot be written is no cache written.
    pub fn open(dir: &Path, repo: &Id, keys: &Keys) -> TreeCache {
        let dir = dir.join(format!("trees-{}", repo.to_hex()));
        let mut cache = TreeCache { dir, sources: Vec::new(), held: HashMap::new(), out: None, hits: 0, misses: 0 };
        let _ = std::fs::create_dir_all(&cache.dir);
        let mut names: Vec<PathBuf> = std::fs::read_dir(&cache.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(is_file_name))
            .collect();
        names.sort();
        cache.remove_stale_temps();
        for path in names {
            let Ok(file) = std::fs::File::open(&path) else { continue };
            let Ok(len) = file.metadata().map(|m| m.len()) else { continue };
            let source = cache.sources.len() as u32;
            let held = &mut cache.held;
            // The heads only: a file's records are read when their trees are asked for.
            let reader = std::io::BufReader::with_capacity(64 << 10, &file);
            let Some(id) = read_heads(reader, len, |place, start, n| {
                let pack = Id(place[..32].try_into().expect("32 bytes"));
                let offset = u32::from_le_bytes(place[32..].try_into().expect("4 bytes"));
                held.entry(place_key(&pack, offset)).or_insert((source, start, n));
            }) else {
                continue;
            };
            cache.sources.push(Source { path, file, cipher: keys.cache_cipher(&id) });
        }
        cache.out = Output::create(&cache.dir, keys, true);
        cache
    }

    /// Files a run killed before it finished left under their temporary names.
    fn remove_stale_temps(&self) {
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name();
            let temp = name.to_str().is_some_and(|n| n.starts_with('.') && n.ends_with(".tmp"));
            if temp && e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < hour_ago) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// What the tree at `tree` uses, if a file read holds it. Kept for the file
    /// being written.
    pub fn get(&mut self, tree: &BlobRef) -> Option<TreeUses> {
        let &(source, start, len) = self.held.get(&place_key(&tree.pack, tree.offset))?;
        let s = &self.sources[source as usize];
        let mut sealed = vec![0u8; len as usize];
        s.file.read_exact_at(&mut sealed, start).ok()?;
        let plain = open(&s.cipher, &place(&tree.pack, tree.offset), &sealed).ok()?;
        let uses = TreeUses::decode(&plain).ok()?;
        self.hits += 1;
        self.write(tree, &plain);
        Some(uses)
    }

    /// Adds what the tree at `tree`, read from the store, uses.
    pub fn put(&mut self, tree: &BlobRef, uses: &TreeUses) {
        self.misses += 1;
        self.write(tree, &uses.encode());
    }

    fn write(&mut self, tree: &BlobRef, plain: &[u8]) {
        if self.out.as_mut().is_some_and(|out| !out.append(tree, plain)) {
            // Given up: nothing of this run is kept.
            self.out = None;
        }
    }

    /// Once every tree the run needed was reached: the file written takes the
    /// place of those read. Without this (a run that failed) it is removed.
    pub fn finish(mut self) {
        let Some(mut out) = self.out.take() else { return };
        let Some(temp) = out.temp.take() else { return };
        if out.file.flush().is_err() || std::fs::rename(&temp, &out.path).is_err() {
            let _ = std::fs::remove_file(&temp);
            return;
        }
        for s in &self.sources {
            let _ = std::fs::remove_file(&s.path);
        }
    }
}

/// A writer's file of the trees it stores, written as it goes under its final
/// name: a prune reads what is there (a record cut short ends it), and deletes it
/// once its own file holds what it reached.
pub struct Appender {
    out: Output,
}

/// Writers add no file to a cache that holds this many already (no prune has run
/// on this host for long): the trees they store are then read from the store once.
const MAX_FILES: usize = 1024;

impl Appender {
    /// A new file in the cache of repository `repo` in `dir`; `None` when it
    /// cannot be made, or the cache holds `MAX_FILES` files.
    pub fn create(dir: &Path, repo: &Id, keys: &Keys) -> Option<Appender> {
        let dir = dir.join(format!("trees-{}", repo.to_hex()));
        std::fs::create_dir_all(&dir).ok()?;
        if std::fs::read_dir(&dir).ok()?.count() >= MAX_FILES {
            return None;
        }
        Some(Appender { out: Output::create(&dir, keys, false)? })
    }

    /// Adds what the tree just stored at `tree` uses; `false` once the file cannot
    /// be written (nothing more is then added).
    pub fn append(&mut self, tree: &BlobRef, uses: &TreeUses) -> bool {
        self.out.append(tree, &uses.encode())
    }
}

impl Drop for TreeCache {
    fn drop(&mut self) {
        if let Some(temp) = self.out.as_ref().and_then(|out| out.temp.as_ref()) {
            let _ = std::fs::remove_file(temp);
        }
    }
}

/// A cache file's name: its id in hex.
fn is_file_name(name: &str) -> bool {
    name.len() == 2 * ID_LEN && name.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Output {
    /// A new file in `dir`, under a temporary name until it is finished if `temp`.
    fn create(dir: &Path, keys: &Keys, temp: bool) -> Option<Output> {
        let id: [u8; ID_LEN] = crate::id::random_bytes();
        let name = hex::encode(id);
        let path = dir.join(&name);
        let temp = temp.then(|| dir.join(format!(".{name}.tmp")));
        let at = temp.as_ref().unwrap_or(&path);
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(at).ok()?;
        let mut file = std::io::BufWriter::with_capacity(64 << 10, file);
        let mut head = MAGIC.to_vec();
        head.extend_from_slice(&id);
        if file.write_all(&head).is_err() {
            let _ = std::fs::remove_file(at);
            return None;
        }
        Some(Output { temp, path, file, cipher: keys.cache_cipher(&id), records: 0, buf: Vec::new() })
    }

    /// Adds a record of the tree at `tree`; `false` (and the file removed) once it
    /// cannot.
    fn append(&mut self, tree: &BlobRef, plain: &[u8]) -> bool {
        let at = place(&tree.pack, tree.offset);
        self.buf.clear();
        self.buf.extend_from_slice(&at);
        self.buf.extend_from_slice(&[0; 4]);
        seal_into(&self.cipher, self.records, &at, plain, &mut self.buf);
        let len = (self.buf.len() - PLACE_LEN - 4) as u32;
        self.buf[PLACE_LEN..PLACE_LEN + 4].copy_from_slice(&len.to_le_bytes());
        self.records += 1;
        // A large record is not kept in memory: this one goes.
        if self.buf.capacity() > 1 << 20 {
            self.buf = Vec::new();
        }
        if len as usize <= MAX_RECORD && self.file.write_all(&self.buf[..]).is_ok() {
            return true;
        }
        let _ = std::fs::remove_file(self.temp.as_ref().unwrap_or(&self.path));
        false
    }
}

impl Drop for Output {
    /// A writer's file: what is buffered goes to it.
    fn drop(&mut self) {
        if self.temp.is_none() {
            let _ = self.file.flush();
        }
    }
}

/// A cache file of two trees, as a run writes it: a fuzzing seed.
pub fn sample_file(keys: &Keys) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut out = Output::create(dir.path(), keys, true).expect("a file");
    let tree = BlobRef { id: Id([1; 32]), pack: Id([2; 32]), offset: 10, length: 40, raw_len: 12 };
    let uses = TreeUses { subtrees: vec![tree], data: vec![(Id([3; 32]), 0, 40)] };
    out.append(&tree, &uses.encode());
    out.append(&BlobRef { offset: 50, ..tree }, &TreeUses::default().encode());
    out.file.flush().expect("written");
    std::fs::read(out.temp.as_ref().expect("a run's file")).expect("read back")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    fn keys(n: u8) -> Keys {
        Keys::derive(&MasterKey([n; 32]), &Id([9; 32]))
    }

    fn tree_at(pack: u8, offset: u32) -> BlobRef {
        BlobRef { id: Id([offset as u8; 32]), pack: Id([pack; 32]), offset, length: 100 + offset, raw_len: 300 }
    }

    fn uses(n: u32) -> TreeUses {
        TreeUses {
            subtrees: (0..n % 3).map(|i| tree_at(7, 1000 + i)).collect(),
            data: (0..n).map(|i| (Id([i as u8; 32]), i * 10, 5 + i)).collect(),
        }
    }

    /// What one run put, the next gets, and only that; a run's file takes the place
    /// of those it read, holding every tree it reached.
    #[test]
    fn what_a_run_puts_the_next_gets_and_the_files_read_go() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Id([4; 32]);
        let mut first = TreeCache::open(dir.path(), &repo, &keys(1));
        for n in 0..50 {
            assert_eq!(first.get(&tree_at(1, n)), None);
            first.put(&tree_at(1, n), &uses(n));
        }
        first.finish();
        let mut second = TreeCache::open(dir.path(), &repo, &keys(1));
        for n in 0..50 {
            assert_eq!(second.get(&tree_at(1, n)), Some(uses(n)), "tree {n}");
        }
        assert_eq!(second.get(&tree_at(2, 0)), None, "another pack");
        assert_eq!(second.get(&tree_at(1, 50)), None, "another offset");
        // The second run reached only the first ten: the next holds only those.
        second.finish();
        let files = |d: &Path| std::fs::read_dir(d.join(format!("trees-{}", repo.to_hex()))).unwrap().count();
        assert_eq!(files(dir.path()), 1);
        let mut third = TreeCache::open(dir.path(), &repo, &keys(1));
        assert_eq!(third.get(&tree_at(1, 3)), Some(uses(3)));
        // Another repository's key opens nothing.
        let mut other = TreeCache::open(dir.path(), &repo, &keys(2));
        assert_eq!(other.get(&tree_at(1, 3)), None);
        // A run that does not finish leaves the files as they were.
        drop(other);
        third.put(&tree_at(1, 99), &uses(1));
        drop(third);
        assert_eq!(files(dir.path()), 1);
    }

    /// A flipped byte anywhere costs the records it touches, never a wrong answer;
    /// a file cut short keeps the records before the cut.
    #[test]
    fn damage_is_a_miss_never_a_wrong_use() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Id([4; 32]);
        let mut c = TreeCache::open(dir.path(), &repo, &keys(1));
        for n in 0..4 {
            c.put(&tree_at(1, n), &uses(n + 1));
        }
        c.finish();
        let sub = dir.path().join(format!("trees-{}", repo.to_hex()));
        let path = std::fs::read_dir(&sub).unwrap().next().unwrap().unwrap().path();
        let good = std::fs::read(&path).unwrap();
        for at in (0..good.len()).step_by(7) {
            let mut bad = good.clone();
            bad[at] ^= 0x20;
            std::fs::write(&path, &bad).unwrap();
            let mut c = TreeCache::open(dir.path(), &repo, &keys(1));
            for n in 0..4 {
                let got = c.get(&tree_at(1, n));
                assert!(got.is_none() || got == Some(uses(n + 1)), "flip at {at}, tree {n}: {got:?}");
            }
        }
        for cut in [good.len() - 1, good.len() / 2, 10] {
            std::fs::write(&path, &good[..cut]).unwrap();
            let mut heads = 0;
            read_heads(std::io::Cursor::new(&good[..cut]), cut as u64, |_, _, _| heads += 1);
            let mut c = TreeCache::open(dir.path(), &repo, &keys(1));
            let found = (0..4).filter(|&n| c.get(&tree_at(1, n)) == Some(uses(n + 1))).count();
            assert_eq!(found, heads, "cut at {cut}");
            assert!(found < 4);
        }
    }

    #[test]
    fn tree_uses_round_trip_and_refuse_what_does_not_fit() {
        for n in [0, 1, 5] {
            let u = uses(n);
            assert_eq!(TreeUses::decode(&u.encode()).unwrap(), u);
            let bytes = u.encode();
            for cut in 0..bytes.len() {
                assert!(TreeUses::decode(&bytes[..cut]).is_err(), "cut at {cut}");
            }
            assert!(TreeUses::decode(&[bytes.clone(), vec![0]].concat()).is_err(), "a trailing byte");
        }
        assert!(TreeUses::decode(&[0xff, 0xff, 0xff, 0xff]).is_err(), "a count past the end");
        // Blobs of few packs: each pack written once.
        let few = TreeUses { subtrees: vec![], data: (0..100u32).map(|i| (Id([(i % 3) as u8; 32]), i, 7)).collect() };
        let bytes = few.encode();
        assert_eq!(bytes.len(), 4 + 4 + 3 * 32 + 4 + 100 * 12);
        assert_eq!(TreeUses::decode(&bytes).unwrap(), few);
        let mut stray = bytes.clone();
        stray[4 + 4 + 3 * 32 + 4] = 3; // the first blob's pack number: past the list
        assert!(TreeUses::decode(&stray).is_err(), "a pack number past the list");
    }
}
