//! Fragments (`frags/<source>/<16 hex>-<16 hex>`): the bytes appended to files since
//! the newest point, shipped within seconds without a new point.
//!
//! A fragment lists, per file it extends, the file's identity (device and inode),
//! the offset the new bytes start at, and the chunks holding them. Its chunks live
//! in packs of its own, written before the fragment itself; a stream lists them in
//! the index file of its next point.
//! Names sort like point names (newest first), so the fragments between a point
//! and T are one narrow listing.
//!
//! The state at T is the newest point at or before T, extended by the fragments
//! after that point and at or before T, oldest first (`Overlay`). A fragment
//! extends a file only where it continues it exactly: same identity, starting at or
//! before the file's current end and ending after it on a chunk boundary at that
//! end. Anything else is ignored, so a fragment can make a file shorter than it was
//! at T, never wrong.

use std::borrow::Cow;
use std::collections::HashMap;

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use jiff::Timestamp;

use crate::codec::{DecodeError, Decoder, Encoder};
use crate::crypto::{compressor, encode_payload, Keys};
use crate::error::RepoError;
use crate::object::{open_object, seal_object, ObjectError};
use crate::pack::PACK_TARGET;
use crate::pack::{pack_name, BlobKind, BlobRef, PackBuilder, PackEntry};
use crate::point::{parse_timed, time_key, timed_name, PointRef};
use crate::repo::Repository;
use crate::tree::{Entry, EntryKind, Extent, Timestamp as TreeTime};

pub const FRAGS_DIR: &str = "frags";
const VERSION: u8 = 1;
/// Fragments fetched at once when building an overlay.
const CONCURRENT_FETCHES: usize = 16;
/// Names asked for by the first listing request; each next one asks for twice as
/// many. Few fragments lie between a point and a moment after it (a stream makes
/// a point a minute, a fragment every few seconds), and on `file://` a listing
/// reads every shard directory it needs to fill its page: a first page of a
/// thousand read half a day of directories for a restore at a point's time.
const FIRST_PAGE: usize = 64;

/// One file's appended bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Growth {
    pub device: u64,
    pub inode: u64,
    /// The offset the first chunk starts at.
    pub from: u64,
    /// The file's modification time once these bytes were written.
    pub mtime: TreeTime,
    pub chunks: Vec<BlobRef>,
}

impl Growth {
    pub fn end(&self) -> u64 {
        self.from + self.chunks.iter().map(|b| b.raw_len as u64).sum::<u64>()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fragment {
    pub growths: Vec<Growth>,
}

impl Fragment {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder { buf: Vec::new() };
        e.u8(VERSION);
        e.u32(self.growths.len() as u32);
        for g in &self.growths {
            e.u64(g.device);
            e.u64(g.inode);
            e.u64(g.from);
            e.i64(g.mtime.sec);
            e.u32(g.mtime.nsec);
            e.u32(g.chunks.len() as u32);
            for b in &g.chunks {
                b.encode(&mut e);
            }
        }
        e.buf
    }

    pub fn decode(bytes: &[u8]) -> Result<Fragment, DecodeError> {
        let mut d = Decoder::new("fragment", bytes);
        let version = d.u8()?;
        if version != VERSION {
            return Err(d.error(format!("unknown fragment version {version}")));
        }
        let n = d.count(40)?;
        let mut growths = Vec::with_capacity(n);
        for _ in 0..n {
            let (device, inode, from) = (d.u64()?, d.u64()?, d.u64()?);
            let mtime = TreeTime { sec: d.i64()?, nsec: d.u32()? };
            if mtime.nsec >= 1_000_000_000 {
                return Err(d.error("nanoseconds out of range"));
            }
            let count = d.count(76)?;
            if count == 0 {
                return Err(d.error("a growth without chunks"));
            }
            let chunks = (0..count).map(|_| BlobRef::decode(&mut d)).collect::<Result<Vec<_>, _>>()?;
            let len = chunks.iter().map(|b| b.raw_len as u64).sum::<u64>();
            if from.checked_add(len).is_none() {
                return Err(d.error("a growth past 2^64 bytes"));
            }
            growths.push(Growth { device, inode, from, mtime, chunks });
        }
        d.finish()?;
        Ok(Fragment { growths })
    }

    pub fn seal(&self, keys: &Keys, name: &str) -> Vec<u8> {
        seal_object(keys, name, &self.encode())
    }

    pub fn open(keys: &Keys, name: &str, bytes: &[u8]) -> Result<Fragment, ObjectError> {
        let plain = open_object(keys, name, bytes)?;
        Fragment::decode(&plain).map_err(|cause| ObjectError::Decode { name: name.to_string(), cause })
    }
}

/// A fragment known from its name alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FragmentRef {
    pub name: String,
    pub source: String,
    pub time: Timestamp,
}

impl FragmentRef {
    pub fn parse(name: &str) -> Option<FragmentRef> {
        let (source, time) = parse_timed(FRAGS_DIR, name)?;
        Some(FragmentRef { name: name.to_string(), source, time })
    }
}

/// Builds one fragment's chunks into packs of its own. No deduplication: a fragment
/// may reference only what it made durable itself. Its methods block.
pub struct FragmentBuilder {
    keys: Keys,
    pack: Option<PackBuilder>,
    packs: Vec<(String, Vec<u8>)>,
    /// The blobs of its packs, for an index file once they are durable.
    pub entries: Vec<PackEntry>,
    zstd: zstd::bulk::Compressor<'static>,
    /// Sealed bytes stored so far.
    pub stored: u64,
}

impl FragmentBuilder {
    pub fn new(repo: &Repository) -> FragmentBuilder {
        FragmentBuilder {
            keys: repo.keys().clone(),
            pack: None,
            packs: Vec::new(),
            entries: Vec::new(),
            zstd: compressor(),
            stored: 0,
        }
    }

    pub fn store(&mut self, data: &[u8]) -> BlobRef {
        let id = self.keys.content_id(data);
        let payload = encode_payload(data, Some(&mut self.zstd));
        let keys = &self.keys;
        let pack = self.pack.get_or_insert_with(|| PackBuilder::new(keys));
        let blob = pack.add(BlobKind::Data, id, data.len() as u32, &payload);
        self.stored += blob.length as u64;
        if pack.len() >= PACK_TARGET {
            self.cut();
        }
        blob
    }

    fn cut(&mut self) {
        if let Some(pack) = self.pack.take().filter(|p| !p.is_empty()) {
            let (id, bytes, entries) = pack.finish();
            self.packs.push((pack_name(&id), bytes));
            self.entries.extend(entries);
        }
    }

    /// Uploads the packs, then the fragment: once this returns, it is durable.
    pub async fn commit(
        &mut self,
        repo: &Repository,
        source: &str,
        time: Timestamp,
        fragment: &Fragment,
    ) -> Result<FragmentRef, RepoError> {
        crate::point::validate_source(source).map_err(|problem| RepoError::InvalidSource { problem })?;
        let name = timed_name(FRAGS_DIR, source, time).ok_or_else(|| RepoError::BadTime { time: time.to_string() })?;
        self.cut();
        let store = repo.store();
        // Prune condemns no pack younger than its grace: if uploading these took
        // longer than a writer's view may live, they are looked for before the
        // fragment refers to them.
        let started = std::time::Instant::now();
        let packs = std::mem::take(&mut self.packs);
        let ids: std::collections::HashSet<crate::Id> =
            packs.iter().filter_map(|(name, _)| crate::pack::parse_pack_name(name)).collect();
        stream::iter(
            packs.into_iter().map(|(name, bytes)| async move { store.put_new(&name, Bytes::from(bytes)).await }),
        )
        .buffer_unordered(4)
        .try_collect::<Vec<()>>()
        .await?;
        if started.elapsed() >= crate::condemned::Timing::from_env().view_ttl {
            let missing = crate::view::missing_packs(repo, &ids).await?;
            if !missing.is_empty() {
                return Err(RepoError::Pruned { packs: missing.len() });
            }
        }
        store.put_new(&name, Bytes::from(fragment.seal(repo.keys(), &name))).await?;
        Ok(FragmentRef::parse(&name).expect("a name we just built parses"))
    }
}

/// The appends of the fragments between a point and T, by file identity.
#[derive(Debug, Clone, Default)]
pub struct Overlay {
    growths: HashMap<(u64, u64), Vec<Growth>>,
    /// Fragments that could not be read: the overlay stops before the first of them.
    pub problems: Vec<String>,
}

impl Overlay {
    /// Adds a fragment's growths after those already there.
    pub(crate) fn add(&mut self, fragment: Fragment) {
        for g in fragment.growths {
            self.growths.entry((g.device, g.inode)).or_default().push(g);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.growths.is_empty()
    }

    /// `e` as it was at T (see `apply`), copied only if the fragments change it.
    pub fn applied<'a>(&self, e: &'a Entry) -> Cow<'a, Entry> {
        if e.kind == EntryKind::File && self.growths.contains_key(&(e.device, e.inode)) {
            let mut grown = e.clone();
            self.apply(&mut grown);
            Cow::Owned(grown)
        } else {
            Cow::Borrowed(e)
        }
    }

    /// `e` as it was at T: a file the fragments continue gets their chunks.
    pub fn apply(&self, e: &mut Entry) {
        if e.kind != EntryKind::File {
            return;
        }
        let Some(growths) = self.growths.get(&(e.device, e.inode)) else { return };
        let mut end = e.size;
        for g in growths {
            if g.end() <= end {
                continue;
            }
            // The chunks from the file's end on, if one starts exactly there.
            let mut at = g.from;
            let mut chunks = g.chunks.iter();
            while at < end {
                match chunks.next() {
                    Some(b) => at += b.raw_len as u64,
                    None => break,
                }
            }
            if at != end {
                break;
            }
            e.content.extend(chunks.map(|b| Extent::Data(*b)));
            end = g.end();
            e.mtime = g.mtime;
        }
        e.size = end;
    }
}

impl Repository {
    /// The fragments of `source` after `point` and at or before `at`, oldest first.
    pub async fn fragments(&self, point: &PointRef, at: Timestamp) -> Result<Vec<FragmentRef>, RepoError> {
        let dir = format!("{FRAGS_DIR}/{}", point.source);
        let Some(key) = time_key(at) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        // Newest first: names count time down.
        self.store()
            .list_after_while(&dir, &format!("{dir}/{key}"), FIRST_PAGE, |name| {
                let Some(f) = FragmentRef::parse(name) else { return true };
                if f.time <= point.time {
                    return false;
                }
                out.push(f);
                true
            })
            .await?;
        out.reverse();
        Ok(out)
    }

    pub async fn fragment(&self, f: &FragmentRef) -> Result<Fragment, RepoError> {
        let bytes = self.store().get(&f.name).await?;
        Ok(Fragment::open(self.keys(), &f.name, &bytes)?)
    }

    /// The state of `point`'s source at `at`, beyond the point: its fragments.
    pub async fn overlay(&self, point: &PointRef, at: Timestamp) -> Result<Overlay, RepoError> {
        let refs = self.fragments(point, at).await?;
        let fetches = refs.iter().cloned().map(|f| {
            let repo = self.clone();
            async move { repo.fragment(&f).await }
        });
        let fetched: Vec<Result<Fragment, RepoError>> =
            stream::iter(fetches).buffered(CONCURRENT_FETCHES).collect().await;
        let mut overlay = Overlay::default();
        for (f, r) in refs.iter().zip(fetched) {
            match r {
                Ok(frag) => overlay.add(frag),
                Err(RepoError::Store(e)) if !e.is_not_found() => return Err(RepoError::Store(e)),
                Err(e) => {
                    tracing::warn!("ignoring {} and the fragments after it: {e}", f.name);
                    overlay.problems.push(e.to_string());
                    break;
                }
            }
        }
        Ok(overlay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Id;

    fn blob(n: u8, raw_len: u32) -> BlobRef {
        BlobRef { id: Id([n; 32]), pack: Id([n.wrapping_add(100); 32]), offset: 0, length: raw_len + 29, raw_len }
    }

    fn growth(from: u64, lens: &[u32], mtime: i64) -> Growth {
        Growth {
            device: 1,
            inode: 7,
            from,
            mtime: TreeTime { sec: mtime, nsec: 0 },
            chunks: lens.iter().enumerate().map(|(i, &l)| blob(i as u8 + from as u8, l)).collect(),
        }
    }

    fn file(size: u64) -> Entry {
        let mut e = Entry::new(b"log".to_vec(), EntryKind::File);
        (e.device, e.inode, e.size) = (1, 7, size);
        e.content = vec![Extent::Data(blob(200, size as u32))];
        e
    }

    #[test]
    fn golden_fragment() {
        let f = Fragment { growths: vec![growth(5, &[3], 9)] };
        let bytes = f.encode();
        let mut want = vec![1u8, 1, 0, 0, 0];
        for v in [1u64, 7, 5] {
            want.extend(v.to_le_bytes());
        }
        want.extend(9i64.to_le_bytes());
        want.extend(0u32.to_le_bytes());
        want.extend(1u32.to_le_bytes());
        want.extend([5u8; 32]);
        want.extend([105u8; 32]);
        want.extend(0u32.to_le_bytes());
        want.extend(32u32.to_le_bytes());
        want.extend(3u32.to_le_bytes());
        assert_eq!(bytes, want);
        assert_eq!(Fragment::decode(&bytes).unwrap(), f);
        for cut in 0..bytes.len() {
            assert!(Fragment::decode(&bytes[..cut]).is_err(), "a fragment cut at {cut} decoded");
        }
    }

    #[test]
    fn overlay_continues_files_exactly() {
        let mut o = Overlay::default();
        // 10..20 in two chunks, then 20..25, then a gap (30..40) that must stop it.
        o.growths.insert((1, 7), vec![growth(10, &[4, 6], 1), growth(20, &[5], 2), growth(30, &[10], 3)]);

        let mut e = file(10);
        o.apply(&mut e);
        assert_eq!((e.size, e.content.len(), e.mtime.sec), (25, 4, 2));

        // The point already has the first chunk: the rest continues it.
        let mut e = file(14);
        o.apply(&mut e);
        assert_eq!((e.size, e.content.len()), (25, 3));

        // The point's end falls inside a chunk: nothing can continue it.
        let mut e = file(12);
        o.apply(&mut e);
        assert_eq!((e.size, e.content.len()), (12, 1));

        // Another file, or another inode: untouched.
        let mut e = file(10);
        e.inode = 8;
        o.apply(&mut e);
        assert_eq!(e.size, 10);
    }

    /// The fragments between a point and a moment are found across listing pages
    /// (the first is small, each next one twice as large) and shard directories,
    /// oldest first, and none outside the span.
    #[tokio::test]
    async fn the_fragments_between_a_point_and_a_moment_are_found_across_pages() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::Store::open(&format!("file://{}", dir.path().display()), true).unwrap();
        let kdf = crate::KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };
        let secret = crate::Secret::Password(b"pw".to_vec());
        let repo = Repository::init(store, &secret, kdf, "h".into()).await.unwrap().0;
        let base: Timestamp = "2026-11-21T10:00:00Z".parse().unwrap();
        // One every 20 s over more than two hours: many shard directories.
        let times: Vec<Timestamp> = (0..400i64).map(|i| base + jiff::SignedDuration::from_secs(i * 20)).collect();
        for t in &times {
            let name = crate::point::timed_name(FRAGS_DIR, "s", *t).unwrap();
            repo.store().put_new(&name, bytes::Bytes::from_static(b"not read")).await.unwrap();
        }
        let point = PointRef { name: "points/s/x".into(), source: "s".into(), time: times[10] };
        for (at, want) in [(times[10], 0..0), (times[11], 11..12), (times[300], 11..301), (times[399], 11..400)] {
            let found: Vec<Timestamp> = repo.fragments(&point, at).await.unwrap().iter().map(|f| f.time).collect();
            assert_eq!(found, times[want.clone()], "fragments after the point up to {at}");
        }
    }
}
