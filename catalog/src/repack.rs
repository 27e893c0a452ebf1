//! Repacking, for prune: the live blobs of packs mostly unused, and of many small
//! packs, are written again into full packs, and the points that use them are
//! written again to say where their blobs now are. The old packs are then unused,
//! and go the way of every unused pack: condemned, then swept after the grace.
//!
//! A blob reference says in which pack and where a blob is (so that a mount reads
//! it with one ranged GET and no index), so moving a blob means writing again every
//! tree above it, up to the point's manifest, which is replaced under its own name:
//! the point keeps its name, time and handle. A reader that opened the old manifest
//! reads the old packs, which stay for the grace at least. Packs a fragment uses
//! are never chosen: fragments are folded away instead.
//!
//! Order: the new packs, then an index file naming their blobs, then the manifests.
//! A point forgotten meanwhile (its forget record written before its manifest is
//! deleted) is deleted again if replacing it brought it back.

use std::collections::{HashMap, HashSet};

use bytes::{Buf, Bytes, BytesMut};
use serde::Serialize;
use tokio::sync::mpsc::Sender;

use crate::crypto::{compressor, encode_payload, open_in_place};
use crate::error::{BlobError, RepoError};
use crate::id::Id;
use crate::index::encode_for_points;
use crate::object::seal_object_raw;
use crate::pack::{
    blob_aad, fetch_header, pack_name, BlobKind, BlobRef, PackBuilder, PackEntry, HEADER_ENTRY_LEN, PACK_TARGET,
};
use crate::point::{PointRef, RefJson};
use crate::repo::Repository;
use crate::store::NewObject;
use crate::tree::{EntryKind, Extent, Tree};

/// A pack smaller than this is small: many of them are merged. A stream writes
/// packs of a few KiB with each point; a backup's last packs are larger, and
/// merging those would write much to save few objects.
pub const SMALL_PACK: u64 = (PACK_TARGET / 16) as u64;
/// More small packs than this, and they are merged.
pub const SMALL_PACKS_ABOVE: usize = 16;

/// How much unused space prune leaves in packs still used: as a share of all pack
/// space, in percent (like restic's `--max-unused`). Above it, the packs with the
/// largest unused share are repacked until it holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaxUnused(pub f64);

impl Default for MaxUnused {
    fn default() -> MaxUnused {
        MaxUnused(5.0)
    }
}

impl MaxUnused {
    /// Never repack for unused space (small packs are still merged).
    pub const UNLIMITED: MaxUnused = MaxUnused(100.0);

    /// `5`, `5%`, `0.5%` or `unlimited`.
    pub fn parse(s: &str) -> Result<MaxUnused, String> {
        if s == "unlimited" {
            return Ok(MaxUnused::UNLIMITED);
        }
        let v: f64 = s
            .strip_suffix('%')
            .unwrap_or(s)
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a percentage: give e.g. 5, 5% or unlimited"))?;
        if !(0.0..=100.0).contains(&v) {
            return Err(format!("{s:?} is not between 0% and 100%"));
        }
        Ok(MaxUnused(v))
    }

    /// The most unused bytes allowed beside `used` bytes: unused / (used + unused)
    /// stays at most the percentage.
    fn allowed(self, used: u64) -> u64 {
        if self.0 >= 100.0 {
            return u64::MAX;
        }
        (used as f64 * self.0 / (100.0 - self.0)) as u64
    }
}

/// What repacking did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RepackReport {
    /// Packs chosen: mostly unused, or small and many.
    pub packs: u64,
    /// Their stored bytes, and of them the bytes still used (written again).
    pub bytes: u64,
    pub used_bytes: u64,
    /// New packs written, and their bytes (the used blobs, and trees written again).
    pub written_packs: u64,
    pub written_bytes: u64,
    /// Points written again to use the new packs.
    pub rewritten_points: u64,
}

/// A pack's stored size, and what of it points use: their blobs and bytes.
#[derive(Debug, Clone, Copy)]
pub struct PackUse {
    pub id: Id,
    pub size: u64,
    pub used_bytes: u64,
    pub used_blobs: u64,
}

impl PackUse {
    /// What is stored for nothing: beyond the used blobs and what a pack holding
    /// only them would take for its header (an entry, at most, a blob: ids do not
    /// compress), so that a pack just repacked never counts as unused.
    pub fn unused_bytes(&self) -> u64 {
        let header = HEADER_OVERHEAD + HEADER_ENTRY * self.used_blobs;
        self.size.saturating_sub(self.used_bytes + header)
    }
}

/// A pack chosen for repacking, and the (offset, length) of each blob in it that
/// points use, sorted.
#[derive(Clone)]
pub struct Chosen {
    pub pack: PackUse,
    pub used: Vec<(u32, u32)>,
}

/// A pack header's bytes beyond its entries, at most: seal, framing, trailer.
const HEADER_OVERHEAD: u64 = 64;
/// A header entry's bytes, uncompressed.
const HEADER_ENTRY: u64 = HEADER_ENTRY_LEN as u64;

/// The packs to repack, of those that may be (`candidates`, each used by some
/// point): the most unused first while unused space is above `max`, then all the
/// small ones if there are many. `total_used` and `total_unused` count every pack
/// still used, candidates or not.
pub fn choose(candidates: &[PackUse], total_used: u64, total_unused: u64, max: MaxUnused) -> Vec<Id> {
    let mut chosen: Vec<Id> = Vec::new();
    let mut unused = total_unused;
    let allowed = max.allowed(total_used);
    let mut by_waste: Vec<&PackUse> = candidates.iter().collect();
    // The largest share unused first; ties by id, so that two runs choose alike.
    by_waste.sort_by(|a, b| {
        let share = |p: &PackUse| p.unused_bytes() as f64 / p.size.max(1) as f64;
        share(b).total_cmp(&share(a)).then(a.id.0.cmp(&b.id.0))
    });
    for p in by_waste {
        if unused <= allowed {
            break;
        }
        let waste = p.unused_bytes();
        if waste == 0 {
            break;
        }
        unused -= waste.min(unused);
        chosen.push(p.id);
    }
    let taken: HashSet<Id> = chosen.iter().copied().collect();
    if candidates.iter().filter(|p| p.size < SMALL_PACK).count() > SMALL_PACKS_ABOVE {
        chosen.extend(candidates.iter().filter(|p| p.size < SMALL_PACK && !taken.contains(&p.id)).map(|p| p.id));
    }
    chosen
}

/// Writes the used blobs of `chosen` packs into new packs, and every point of
/// `points` that uses them again. Returns the report, and the places (pack,
/// offset) of the trees written again: the chosen packs, and those places, are
/// then used by no point this run saw.
pub async fn repack(
    repo: &Repository,
    chosen: &[Chosen],
    points: &[PointRef],
    progress: &(dyn Fn(&str) + Sync),
) -> Result<(RepackReport, HashSet<(Id, u32)>), RepoError> {
    let mut report = RepackReport {
        packs: chosen.len() as u64,
        bytes: chosen.iter().map(|c| c.pack.size).sum(),
        used_bytes: chosen.iter().map(|c| c.pack.used_bytes).sum(),
        ..RepackReport::default()
    };
    let mut out = Output::new(repo);
    // Each chosen pack by its position in `chosen`.
    let moving: HashMap<Id, u32> = chosen.iter().zip(0..).map(|(c, i)| (c.pack.id, i)).collect();
    // 1. Data blobs, pack by pack. A task reads and opens them a span at a time,
    // a little ahead (so that opening blobs and sealing them again use two cores),
    // and the new packs are written as they are sealed: what is held at once is a
    // few spans, whatever the packs' sizes.
    let mut moved = Moved::default();
    let (tx, mut rx) = tokio::sync::mpsc::channel(SPANS_QUEUED);
    let reader = tokio::spawn(read_used(repo.clone(), chosen.to_vec(), tx));
    let mut at = None;
    while let Some(span) = rx.recv().await {
        let Span { pack: i, blobs } = span?;
        if at != Some(i) {
            at = Some(i);
            progress(&format!("repacking pack {} of {}", i + 1, chosen.len()));
        }
        for (b, payload) in blobs {
            let new = out.add(BlobKind::Data, b.id, b.raw_len, &payload).await?;
            moved.insert(i as u32, b.offset, new);
        }
    }
    reader.await.expect("pack reading task panicked");
    // 2. Trees, from every point down, and the manifests.
    let mut trees = Trees {
        repo,
        moving: &moving,
        moved: &moved,
        new: HashMap::new(),
        clean: HashSet::new(),
        replaced: HashSet::new(),
    };
    let mut replaced: Vec<(PointRef, crate::point::Manifest)> = Vec::new();
    for point in points {
        progress(&format!("point {}", point.name));
        let mut manifest = match repo.manifest(point).await {
            Ok(m) => m,
            Err(RepoError::Store(e)) if e.is_not_found() => continue, // forgotten since
            Err(e) => return Err(e),
        };
        let Some(root) = manifest.root_ref() else { continue };
        if let Some(new) = trees.rewrite(root, &mut out).await? {
            manifest.root = RefJson::from(new);
            replaced.push((point.clone(), manifest));
        }
    }
    let entries = out.finish().await?;
    report.written_packs = out.packs;
    report.written_bytes = out.bytes;
    if !entries.is_empty() {
        let name = Repository::new_index_name();
        // Stored uncompressed, as prune stores every index file it writes (ids do
        // not compress): no compressor's tables beside the entries.
        let plain = encode_for_points(&[], &entries);
        drop(entries);
        repo.store().put_new(&name, Bytes::from(seal_object_raw(repo.keys(), &name, plain))).await?;
    }
    for (point, manifest) in &replaced {
        repo.store().put_overwrite(&point.name, Bytes::from(manifest.seal(repo.keys(), &point.name))).await?;
        report.rewritten_points += 1;
    }
    // A forget that ran meanwhile deleted a manifest this run then wrote again.
    if !replaced.is_empty() {
        let (forgotten, _) = crate::forget::forgotten_points(repo).await?;
        for (point, _) in replaced.iter().filter(|(p, _)| forgotten.contains(&p.name)) {
            repo.store().delete(&point.name).await?;
        }
    }
    Ok((report, trees.replaced))
}

/// Spans read and opened ahead of the one being written again, besides the one
/// being read; and the largest span (a blob larger is read alone).
const SPANS_QUEUED: usize = 1;
const SPAN_MAX: u64 = 256 << 10;
/// Used blobs of a pack this close together are fetched with one ranged read.
const SPAN_GAP: u64 = 64 << 10;

/// The opened data blobs of one ranged read of the `pack`-th chosen pack.
struct Span {
    pack: usize,
    blobs: Vec<(BlobRef, BytesMut)>,
}

/// Reads the used data blobs of each of `chosen`, in order, and sends them opened a
/// span at a time; the first failure is sent last. A pack's header first (two
/// ranged reads): every blob a point uses must be where it says, or it would be
/// lost with the pack.
async fn read_used(repo: Repository, chosen: Vec<Chosen>, tx: Sender<Result<Span, RepoError>>) {
    for (i, c) in chosen.iter().enumerate() {
        match read_pack(&repo, i, c.pack.id, c.pack.size, &c.used, &tx).await {
            Ok(true) => {}
            // The receiver gave up.
            Ok(false) => return,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    }
}

/// `read_used` of one pack: whether the receiver still wants more.
async fn read_pack(
    repo: &Repository,
    i: usize,
    pack: Id,
    size: u64,
    used: &[(u32, u32)],
    tx: &Sender<Result<Span, RepoError>>,
) -> Result<bool, RepoError> {
    let name = pack_name(&pack);
    let damaged = |problem: String| RepoError::DamagedPack { pack: name.clone(), problem };
    let header = fetch_header(repo.store(), repo.keys(), &pack, size).await?.map_err(|e| damaged(e.to_string()))?;
    let by_offset: HashMap<u32, &PackEntry> = header.iter().map(|e| (e.blob.offset, e)).collect();
    let mut wanted: Vec<BlobRef> = Vec::new();
    for (offset, length) in used {
        let e = by_offset
            .get(offset)
            .filter(|e| e.blob.length == *length)
            .ok_or_else(|| damaged(format!("its header does not list the blob a point uses at {offset}")))?;
        // Trees are written again from the points down.
        if e.kind == BlobKind::Data {
            wanted.push(e.blob);
        }
    }
    wanted.sort_by_key(|b| b.offset);
    let cipher = repo.keys().pack_cipher(&pack);
    let mut rest = &wanted[..];
    while let Some(head) = rest.first() {
        let (start, mut end) = (head.range().start, head.range().end);
        let mut n = 1;
        while n < rest.len() && rest[n].range().start <= end + SPAN_GAP && rest[n].range().end - start <= SPAN_MAX {
            end = end.max(rest[n].range().end);
            n += 1;
        }
        // Each blob is opened where it was read: the span is the only copy.
        let mut span = BytesMut::from(repo.store().get_range(&name, start..end).await?);
        let mut at = start;
        let mut blobs = Vec::with_capacity(n);
        for b in &rest[..n] {
            let (skip, len) = (b.range().start.checked_sub(at), b.range().end - b.range().start);
            let Some(skip) = skip.filter(|skip| (span.len() as u64) >= skip + len) else {
                return Err(damaged(format!("the blob at {} overlaps another or lies past its end", b.offset)));
            };
            span.advance(skip as usize);
            let sealed = span.split_to(len as usize);
            at = b.range().end;
            let payload = open_in_place(&cipher, &blob_aad(BlobKind::Data, &b.id), sealed)
                .map_err(|err| damaged(format!("blob at {}: {err}", b.offset)))?;
            blobs.push((*b, payload));
        }
        if tx.send(Ok(Span { pack: i, blobs })).await.is_err() {
            return Ok(false);
        }
        rest = &rest[n..];
    }
    Ok(true)
}

/// Where each data blob repacked now is, by the position of its old pack among
/// those chosen and its offset there: in a few bytes a blob, not two references.
#[derive(Default)]
struct Moved {
    /// (chosen pack, old offset) to (new pack, offset, length).
    places: HashMap<(u32, u32), (u32, u32, u32)>,
    /// The new packs, in the order they were filled.
    packs: Vec<Id>,
}

impl Moved {
    fn insert(&mut self, chosen: u32, offset: u32, new: BlobRef) {
        if self.packs.last() != Some(&new.pack) {
            self.packs.push(new.pack);
        }
        let pack = (self.packs.len() - 1) as u32;
        self.places.insert((chosen, offset), (pack, new.offset, new.length));
    }

    /// The new reference of `old`, a blob of the `chosen`-th pack; `None` if no
    /// blob of its place and length was moved.
    fn get(&self, chosen: u32, old: &BlobRef) -> Option<BlobRef> {
        let &(pack, offset, length) = self.places.get(&(chosen, old.offset)).filter(|p| p.2 == old.length)?;
        Some(BlobRef { id: old.id, pack: self.packs[pack as usize], offset, length, raw_len: old.raw_len })
    }
}

/// Trees being written again, remembered by content id.
struct Trees<'a> {
    repo: &'a Repository,
    moving: &'a HashMap<Id, u32>,
    moved: &'a Moved,
    /// Trees written again: old content id to new reference.
    new: HashMap<Id, BlobRef>,
    /// Trees that need nothing changed below them.
    clean: HashSet<Id>,
    /// The places of the trees written again: every point that used one now uses
    /// its new copy.
    replaced: HashSet<(Id, u32)>,
}

impl Trees<'_> {
    /// The new reference of the tree at `r`, or `None` if it stays as it is.
    async fn rewrite(&mut self, r: BlobRef, out: &mut Output<'_>) -> Result<Option<BlobRef>, RepoError> {
        if let Some(new) = self.new.get(&r.id) {
            self.replaced.insert((r.pack, r.offset));
            return Ok(Some(*new));
        }
        if self.clean.contains(&r.id) && !self.moving.contains_key(&r.pack) {
            return Ok(None);
        }
        let mut tree = self.repo.read_tree(&r).await?;
        let mut changed = false;
        for entry in &mut tree.entries {
            match entry.kind {
                EntryKind::Dir => {
                    if let Some(sub) = entry.subtree {
                        if let Some(new) = Box::pin(self.rewrite(sub, out)).await? {
                            entry.subtree = Some(new);
                            changed = true;
                        }
                    }
                }
                EntryKind::File => {
                    for x in &mut entry.content {
                        if let Extent::Data(b) = x {
                            let Some(&chosen) = self.moving.get(&b.pack) else { continue };
                            // Every blob in a pack being repacked that a point uses was
                            // moved; one that was not would be lost with the pack.
                            let new = self.moved.get(chosen, b).ok_or_else(|| RepoError::DamagedPack {
                                pack: pack_name(&b.pack),
                                problem: format!("a point uses a blob at {} that was not seen before", b.offset),
                            })?;
                            *b = new;
                            changed = true;
                        }
                    }
                }
                _ => {}
            }
        }
        if !changed && !self.moving.contains_key(&r.pack) {
            self.clean.insert(r.id);
            return Ok(None);
        }
        let new = out.add_tree(&r, &tree).await?;
        self.new.insert(r.id, new);
        self.replaced.insert((r.pack, r.offset));
        Ok(Some(new))
    }
}

/// New packs being filled, each written as it is sealed, a piece at a time, and
/// made durable while the next fills.
struct Output<'a> {
    repo: &'a Repository,
    builder: PackBuilder,
    /// The object of the pack being filled, once some of it is written.
    object: Option<NewObject>,
    finishing: Option<tokio::task::JoinHandle<Result<(), crate::store::StoreError>>>,
    entries: Vec<PackEntry>,
    trees: HashMap<Id, BlobRef>,
    compressor: zstd::bulk::Compressor<'static>,
    packs: u64,
    bytes: u64,
}

/// Sealed bytes held before they are written to the pack's object.
const WRITE_PIECE: usize = 256 << 10;

impl<'a> Output<'a> {
    fn new(repo: &'a Repository) -> Output<'a> {
        Output {
            repo,
            builder: PackBuilder::streaming(repo.keys()),
            object: None,
            finishing: None,
            entries: Vec::new(),
            trees: HashMap::new(),
            compressor: compressor(),
            packs: 0,
            bytes: 0,
        }
    }

    async fn add(&mut self, kind: BlobKind, id: Id, raw_len: u32, payload: &[u8]) -> Result<BlobRef, RepoError> {
        let b = self.builder.add(kind, id, raw_len, payload);
        if self.builder.len() >= PACK_TARGET {
            self.flush().await?;
        } else if self.builder.held() >= WRITE_PIECE {
            let piece = self.builder.take_sealed();
            self.write(piece).await?;
        }
        Ok(b)
    }

    async fn add_tree(&mut self, old: &BlobRef, tree: &Tree) -> Result<BlobRef, RepoError> {
        let plain = tree.encode();
        let id = self.repo.keys().content_id(&plain);
        if let Some(b) = self.trees.get(&id) {
            return Ok(*b);
        }
        let raw_len = u32::try_from(plain.len())
            .map_err(|_| BlobError::new(BlobKind::Tree, old, "written again, it would be larger than 4 GiB"))?;
        let payload = encode_payload(&plain, Some(&mut self.compressor));
        let b = self.add(BlobKind::Tree, id, raw_len, &payload).await?;
        self.trees.insert(id, b);
        Ok(b)
    }

    /// Writes `piece` of the pack being filled to its object.
    async fn write(&mut self, piece: Vec<u8>) -> Result<(), RepoError> {
        let object = match &mut self.object {
            Some(object) => object,
            None => self.object.insert(self.repo.store().new_object(&pack_name(&self.builder.id())).await?),
        };
        object.write(piece).await?;
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), RepoError> {
        if self.builder.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.builder, PackBuilder::streaming(self.repo.keys()));
        let (id, tail, entries) = full.finish();
        let mut object = match self.object.take() {
            Some(object) => object,
            None => self.repo.store().new_object(&pack_name(&id)).await?,
        };
        object.write(tail).await?;
        self.packs += 1;
        self.bytes += object.len();
        self.finished().await?;
        self.finishing = Some(tokio::spawn(object.finish()));
        self.entries.extend(entries);
        Ok(())
    }

    /// Waits for the pack being made durable, if any.
    async fn finished(&mut self) -> Result<(), RepoError> {
        if let Some(finishing) = self.finishing.take() {
            finishing.await.expect("pack finishing task panicked")?;
        }
        Ok(())
    }

    /// Every new pack durable: their entries, for the index.
    async fn finish(&mut self) -> Result<Vec<PackEntry>, RepoError> {
        self.flush().await?;
        self.finished().await?;
        Ok(std::mem::take(&mut self.entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Id {
        Id([n; 32])
    }

    #[test]
    fn max_unused_parses_percentages() {
        assert_eq!(MaxUnused::parse("5"), Ok(MaxUnused(5.0)));
        assert_eq!(MaxUnused::parse("0.5%"), Ok(MaxUnused(0.5)));
        assert_eq!(MaxUnused::parse("unlimited"), Ok(MaxUnused::UNLIMITED));
        for bad in ["", "-1", "101%", "five", "5%%", "NaN"] {
            assert!(MaxUnused::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(MaxUnused(0.0).allowed(1000), 0);
        assert_eq!(MaxUnused(50.0).allowed(1000), 1000);
        assert_eq!(MaxUnused::UNLIMITED.allowed(1000), u64::MAX);
    }

    /// The emptiest packs first, only as many as bring unused space within the
    /// limit; a pack whose only unused bytes are its own header never counts.
    #[test]
    fn the_emptiest_packs_are_chosen_until_unused_space_is_within_the_limit() {
        let big = PACK_TARGET as u64;
        let using = |n: u8, used_bytes: u64| PackUse { id: id(n), size: big, used_bytes, used_blobs: 1 };
        let packs = [using(1, big * 9 / 10), using(2, big / 2), using(3, big - 100)];
        let used: u64 = packs.iter().map(|p| p.used_bytes).sum();
        let unused: u64 = packs.iter().map(PackUse::unused_bytes).sum();
        assert_eq!(packs[2].unused_bytes(), 0, "a full pack's header is not unused space");
        assert_eq!(choose(&packs, used, unused, MaxUnused::UNLIMITED), Vec::<Id>::new());
        // 20 % of all pack space is unused.
        assert_eq!(choose(&packs, used, unused, MaxUnused(20.0)), Vec::<Id>::new());
        assert_eq!(choose(&packs, used, unused, MaxUnused(15.0)), vec![id(2)], "half unused goes first");
        assert_eq!(choose(&packs, used, unused, MaxUnused(0.0)), vec![id(2), id(1)]);
        // Unused space elsewhere (in packs that may not be repacked) counts too.
        assert_eq!(choose(&packs[..1], used, unused, MaxUnused(5.0)), vec![id(1)]);
    }

    /// Small packs are merged only when there are more than a few.
    #[test]
    fn small_packs_are_merged_when_there_are_many() {
        let small: Vec<PackUse> = (0..=SMALL_PACKS_ABOVE as u8)
            .map(|n| PackUse { id: id(n), size: 1000 + 100, used_bytes: 1000, used_blobs: 1 })
            .collect();
        let total: u64 = small.iter().map(|p| p.used_bytes).sum();
        let few = &small[..SMALL_PACKS_ABOVE];
        assert!(choose(few, total, 0, MaxUnused::UNLIMITED).is_empty());
        assert_eq!(choose(&small, total, 0, MaxUnused::UNLIMITED).len(), SMALL_PACKS_ABOVE + 1);
    }
}
