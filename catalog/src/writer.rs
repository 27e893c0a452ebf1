//! Writing blobs: deduplication against the repository's index, packing, and uploads.
//!
//! A `Writer` is shared by the threads of one backup; each thread stores blobs through
//! its own `Packer` (compression and encryption run on that thread). Full packs go to
//! one async uploader over a bounded channel, so memory stays bounded whatever the
//! input. `checkpoint` and `finish` wait until every pack is durable; only after that
//! may a manifest reference any of it. The point's manifest goes first, then the
//! index file that names it (`Durable::commit`). A writer that reported an error
//! must be dropped: its dedup map may name blobs never stored.
//!
//! A writer deduplicates only against blobs it has confirmed exist: those of index
//! files whose pack is listed and long enough (`Inventory`), and its own; and never
//! against a pack a prune condemned (`view`). It remembers every pack it uses, looks
//! at what is condemned again every `Timing::refresh` while it runs, rescues any
//! pack it uses that was condemned since, and commits a point only with a view of
//! them younger than `Timing::view_ttl`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::condemned::Rescued;
use crate::crypto::{compressor, encode_payload};
use crate::error::RepoError;
use crate::id::Id;
use crate::index::{seal_index, DedupIndex, INDEX_DIR};
use crate::index_cache::IndexCache;
use crate::inventory::Inventory;
use crate::pack::PACK_TARGET;
use crate::pack::{fetch_header, pack_name, BlobKind, BlobRef, PackBuilder, PackEntry, PACKS_DIR};
use crate::point::{Manifest, PointRef};
use crate::repo::Repository;
use crate::store::{Store, StoreError};
use crate::view::View;
use crate::wal::{Lsn, WalPiece};

/// Full packs waiting for the uploader, beyond those being uploaded.
const QUEUED_PACKS: usize = 2;
const CONCURRENT_UPLOADS: usize = 4;
/// Staged uploads older than this were left by a writer that was killed.
const STAGED_AGE: std::time::Duration = std::time::Duration::from_secs(600);
/// Orphan packs read at once when adopting them.
const ADOPT_READS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// An upload failed: the store's error, which every later call reports too.
    #[error("{0}")]
    Upload(Arc<StoreError>),
    #[error("the uploader stopped")]
    UploaderStopped,
    #[error("blobs were packed but never handed to the uploader (a packer was not flushed)")]
    Unflushed,
    #[error("a blob of {0} bytes is over the 4 GiB limit of the format")]
    TooLarge(usize),
}

impl WriteError {
    /// Whether the store's filesystem is full.
    pub fn is_no_space(&self) -> bool {
        match self {
            WriteError::Store(e) | WriteError::Repo(RepoError::Store(e)) => e.is_no_space(),
            WriteError::Upload(e) => e.is_no_space(),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct WriterSummary {
    /// The index file the point's blobs go into, written after its manifest.
    pub index: Option<String>,
    pub new_blobs: u64,
    pub new_data_blobs: u64,
    pub new_bytes: u64,
    pub packs: u64,
}

/// What a writer may reference, and what it did: shared with its view's refresher.
#[derive(Default)]
struct Known {
    dedup: DedupIndex,
    /// Packs listed when the writer started: what existed then, and how long.
    listed: HashMap<Id, u64>,
    /// Every pack the writer referenced or stored since it started.
    used: HashSet<Id>,
    /// The WAL the point being written needs (a base backup's, from its start).
    wal: Option<WalNeed>,
}

/// The WAL a base backup being taken needs: from its start on, whatever prune
/// makes of the base backups already kept.
#[derive(Debug, Clone)]
struct WalNeed {
    source: String,
    /// `wal/<source>/`.
    prefix: String,
    tli: u32,
    from: Lsn,
}

impl WalNeed {
    /// Whether the WAL piece `name` holds some of it (on any timeline: the start
    /// may lie on an ancestor's).
    fn covers(&self, name: &str) -> bool {
        let Some(rest) = name.strip_prefix(&self.prefix) else { return false };
        let Some((tli, _)) = rest.split_once('/') else { return false };
        let Ok(tli) = u32::from_str_radix(tli, 16) else { return false };
        WalPiece::parse(tli, name).is_some_and(|p| p.end > self.from)
    }
}

/// The writer's part of deletion in two phases (`view`): what it knows is
/// condemned, kept fresh in the background, and the gate before a commit.
struct Guard {
    repo: Repository,
    known: Mutex<Known>,
    view: tokio::sync::Mutex<View>,
    /// What was condemned while used, not yet named in a rescue (a put that failed).
    unrescued: Mutex<Rescued>,
    /// Packs it uses were condemned while it was not looking: it commits nothing more.
    poisoned: AtomicBool,
}

impl Guard {
    /// Looks at the condemned sets again; stops using what was condemned since, and
    /// rescues what it used of it.
    async fn refresh(&self, view: &mut View) -> Result<(), RepoError> {
        // A writer that went longer than a view may live without looking cannot
        // rescue what it finds condemned: a prune may be deleting it already.
        let lapsed = !view.fresh();
        let added = view.refresh(&self.repo).await?;
        let mut rescue = std::mem::take(&mut *self.unrescued.lock().expect("unrescued lock"));
        if !added.packs.is_empty() || !added.names.is_empty() {
            let mut k = self.known.lock().expect("known lock");
            k.dedup.forget_packs(&added.packs);
            k.listed.retain(|p, _| !added.packs.contains(p));
            let hit: Vec<Id> = added.packs.iter().filter(|p| k.used.contains(p)).copied().collect();
            let hit_wal: Vec<String> = match &k.wal {
                Some(need) => added.names.iter().filter(|n| need.covers(n)).cloned().collect(),
                None => Vec::new(),
            };
            if lapsed && !hit_wal.is_empty() {
                self.poisoned.store(true, Ordering::SeqCst);
                let source_name = k.wal.as_ref().map(|w| w.source.clone()).unwrap_or_default();
                return Err(RepoError::PrunedWal { source_name });
            }
            if lapsed && !hit.is_empty() {
                self.poisoned.store(true, Ordering::SeqCst);
                return Err(RepoError::Pruned { packs: hit.len() });
            }
            rescue.packs.extend(hit);
            rescue.names.extend(hit_wal);
        }
        self.send_rescue(view, rescue).await
    }

    /// Names `rescue` in a rescue; until that is durable the view is not fresh.
    async fn send_rescue(&self, view: &mut View, rescue: Rescued) -> Result<(), RepoError> {
        if rescue.is_empty() {
            return Ok(());
        }
        if let Err(e) = crate::view::rescue(&self.repo, &rescue).await {
            // Not fresh until the rescue is durable: no commit meanwhile.
            let mut u = self.unrescued.lock().expect("unrescued lock");
            u.packs.extend(rescue.packs);
            u.names.extend(rescue.names);
            view.at = None;
            return Err(e);
        }
        Ok(())
    }

    /// Before a commit: a view young enough, and if it had lapsed (the writer was
    /// stalled, or could not reach the store), every pack used still there.
    async fn ready(&self) -> Result<(), RepoError> {
        let mut view = self.view.lock().await;
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(RepoError::Pruned { packs: 0 });
        }
        let recent = view.timing.refresh.min(view.timing.view_ttl);
        if view.younger_than(recent) && self.unrescued.lock().expect("unrescued lock").is_empty() {
            return Ok(());
        }
        let lapsed = !view.fresh();
        self.refresh(&mut view).await?;
        if lapsed {
            let (used, wal) = {
                let k = self.known.lock().expect("known lock");
                (k.used.clone(), k.wal.clone())
            };
            let missing = crate::view::missing_packs(&self.repo, &used).await?;
            if !missing.is_empty() {
                return Err(RepoError::Pruned { packs: missing.len() });
            }
            if let Some(need) = wal {
                if crate::view::wal_has_hole(&self.repo, &need.source, need.tli, need.from).await? {
                    return Err(RepoError::PrunedWal { source_name: need.source });
                }
            }
        }
        Ok(())
    }
}

pub struct Writer {
    repo: Repository,
    guard: Arc<Guard>,
    refresher: JoinHandle<()>,
    /// Listed packs that no index file names, not yet adopted.
    orphans: Mutex<Vec<(Id, u64)>>,
    written: Mutex<Vec<PackEntry>>,
    tx: Mutex<Option<mpsc::Sender<Upload>>>,
    uploader: Mutex<Option<JoinHandle<()>>>,
    /// The first upload that failed; the uploader stops there.
    failure: Arc<OnceLock<Arc<StoreError>>>,
    new_blobs: AtomicU64,
    new_data_blobs: AtomicU64,
    new_bytes: AtomicU64,
    packs: AtomicU64,
    /// Blobs in packs not yet handed to the uploader: must be zero at `finish`.
    unflushed: AtomicU64,
    lost: AtomicBool,
}

impl Writer {
    /// Loads the repository's index, keeps what exists of it for deduplication, and
    /// starts the uploader on the current runtime.
    pub async fn new(repo: Repository) -> Result<Arc<Writer>, RepoError> {
        Writer::with_timing(repo, crate::condemned::Timing::from_env()).await
    }

    /// `new`, with the clock of deletion given rather than taken from `EBB_GRACE`.
    pub async fn with_timing(repo: Repository, timing: crate::condemned::Timing) -> Result<Arc<Writer>, RepoError> {
        // What a killed writer left half-written is removed, not kept for ever.
        for dir in [PACKS_DIR, INDEX_DIR] {
            match repo.store().sweep_staged(dir, STAGED_AGE).await {
                Ok(0) => {}
                Ok(n) => tracing::info!("removed {n} half-written uploads left in {dir}/ by interrupted runs"),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        let mut view = View::new(timing);
        view.refresh(&repo).await?;
        // A host's copy of the index files it read before (not for a repository
        // in memory, which no later writer opens).
        let cache = (!repo.store().url().starts_with("memory:")).then(|| IndexCache::for_repo(&repo.id())).flatten();
        let inventory = Inventory::load_cached(&repo, cache.as_ref()).await?;
        for (name, why) in &inventory.unreadable {
            // A damaged index only costs dedup; `ebb verify` reports it.
            tracing::warn!("skipping index file {name}: {why}");
        }
        // Packs a prune condemned are deleted before the index files naming them
        // are written again: missing, but not lost.
        let (missing, lost) = inventory.missing_except(|p| view.condemns(p));
        if missing > 0 {
            tracing::warn!(
                "the index lists {missing} blobs in {} packs that are missing or cut short: they are stored again. \
                 Points that use them cannot be restored in full (`ebb verify` names them); \
                 `ebb repair index` drops them from the index",
                lost.len()
            );
        }
        let mut dedup = DedupIndex::default();
        for e in inventory.index_files.iter().flat_map(|(_, f)| &f.entries) {
            if inventory.holds(&e.blob) && !view.condemns(&e.blob.pack) {
                dedup.insert(e.kind, e.blob);
            }
        }
        let orphans: Vec<(Id, u64)> = inventory.unindexed().into_iter().filter(|(p, _)| !view.condemns(p)).collect();
        let mut listed = inventory.packs;
        listed.retain(|p, _| !view.condemns(p));
        let refresh = view.timing.refresh;
        let guard = Arc::new(Guard {
            repo: repo.clone(),
            known: Mutex::new(Known { dedup, listed, used: HashSet::new(), wal: None }),
            view: tokio::sync::Mutex::new(view),
            unrescued: Mutex::new(Rescued::default()),
            poisoned: AtomicBool::new(false),
        });
        let refresher = tokio::spawn({
            let guard = guard.clone();
            async move {
                loop {
                    tokio::time::sleep(refresh).await;
                    let mut view = guard.view.lock().await;
                    if let Err(e) = guard.refresh(&mut view).await {
                        tracing::warn!("cannot look at what prune condemned: {e}");
                    }
                }
            }
        });
        let (tx, rx) = mpsc::channel(QUEUED_PACKS);
        let failure = Arc::new(OnceLock::new());
        let uploader = tokio::spawn(upload_loop(repo.store().clone(), rx, failure.clone()));
        Ok(Arc::new(Writer {
            repo,
            guard,
            refresher,
            orphans: Mutex::new(orphans),
            written: Mutex::new(Vec::new()),
            tx: Mutex::new(Some(tx)),
            uploader: Mutex::new(Some(uploader)),
            failure,
            new_blobs: AtomicU64::new(0),
            new_data_blobs: AtomicU64::new(0),
            new_bytes: AtomicU64::new(0),
            packs: AtomicU64::new(0),
            unflushed: AtomicU64::new(0),
            lost: AtomicBool::new(false),
        }))
    }

    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    /// The point this writer is writing needs `source`'s WAL from `from` on (a base
    /// backup started there, on timeline `tli`): until it commits, prune deletes
    /// none of it. What is condemned of it already is rescued now.
    pub async fn need_wal(&self, source: &str, tli: u32, from: Lsn) -> Result<(), RepoError> {
        let need = WalNeed { source: source.to_string(), prefix: format!("wal/{source}/"), tli, from };
        let mut view = self.guard.view.lock().await;
        if !view.fresh() {
            self.guard.refresh(&mut view).await?;
        }
        let names = view.condemned_names().iter().filter(|n| need.covers(n)).cloned().collect();
        self.guard.known.lock().expect("known lock").wal = Some(need);
        self.guard.send_rescue(&mut view, Rescued { packs: Default::default(), names }).await
    }

    /// A packer for one thread. Its methods block: call them off the async runtime.
    pub fn packer(self: &Arc<Self>) -> Packer {
        Packer { w: self.clone(), pack: None, zstd: compressor() }
    }

    /// Whether a blob with this content id is already stored (or being stored): its
    /// reference, which the caller then uses.
    pub fn known(&self, kind: BlobKind, id: &crate::Id) -> Option<BlobRef> {
        let mut k = self.guard.known.lock().expect("known lock");
        let found = k.dedup.get(kind, id);
        if let Some(b) = found {
            k.used.insert(b.pack);
        }
        found
    }

    /// Whether a reference taken from an earlier point may be used again (and then
    /// it counts as used): its pack was listed, long enough, when the writer started
    /// and is not condemned, or this writer stored it.
    pub fn exists(&self, kind: BlobKind, blob: &BlobRef) -> bool {
        let mut k = self.guard.known.lock().expect("known lock");
        let ok = k.listed.get(&blob.pack).is_some_and(|&size| blob.range().end <= size)
            || k.dedup.get(kind, &blob.id) == Some(*blob);
        if ok {
            k.used.insert(blob.pack);
        }
        ok
    }

    /// Takes durable packs that no index file lists into deduplication, and into the
    /// next index file: those a writer stopped by a crash or a failure uploaded but
    /// never indexed. Each pack's header is read (two ranged reads); one that cannot
    /// be read is skipped. Returns how many it took.
    pub async fn adopt_orphans(&self) -> Result<usize, RepoError> {
        let store = self.repo.store();
        let orphans = std::mem::take(&mut *self.orphans.lock().expect("orphans lock"));
        let reads = orphans.into_iter().map(|(pack, size)| async move {
            let header = fetch_header(store, self.repo.keys(), &pack, size).await?;
            Ok::<_, StoreError>(header.map_err(|e| (pack, e.to_string())))
        });
        let mut adopted = 0;
        let mut results = futures::stream::iter(reads).buffer_unordered(ADOPT_READS);
        while let Some(r) = results.next().await {
            match r? {
                Ok(entries) => {
                    self.adopt(entries);
                    adopted += 1;
                }
                Err((pack, e)) => tracing::warn!("not adopting {}: {e}", pack_name(&pack)),
            }
        }
        Ok(adopted)
    }

    /// Blobs in packs that are durable already (stored by someone else, such as a
    /// stream's fragments): deduplicated against from now on, and listed in the next
    /// index file.
    pub fn adopt(&self, entries: Vec<PackEntry>) {
        let mut k = self.guard.known.lock().expect("known lock");
        for e in &entries {
            k.dedup.insert(e.kind, e.blob);
            k.used.insert(e.blob.pack);
        }
        drop(k);
        self.written.lock().expect("written lock").extend(entries);
    }

    /// Waits until every pack is durable. Every packer must have been flushed.
    pub async fn finish(&self) -> Result<Durable, WriteError> {
        drop(self.tx.lock().expect("tx lock").take());
        let uploader = self.uploader.lock().expect("uploader lock").take();
        if let Some(handle) = uploader {
            handle.await.expect("uploader panicked");
        }
        if let Some(e) = self.failure.get() {
            return Err(WriteError::Upload(e.clone()));
        }
        self.durable()
    }

    /// Why the writer stopped taking blobs: the upload that failed, if one did.
    pub fn stopped(&self) -> WriteError {
        match self.failure.get() {
            Some(e) => WriteError::Upload(e.clone()),
            None => WriteError::UploaderStopped,
        }
    }

    /// Waits until every pack handed over so far is durable. The writer goes on; the
    /// summary counts what was stored since the last checkpoint. Every packer must
    /// have been flushed.
    pub async fn checkpoint(&self) -> Result<Durable, WriteError> {
        let tx = self.tx.lock().expect("tx lock").clone().ok_or_else(|| self.stopped())?;
        let (ack, done) = oneshot::channel();
        if tx.send(Upload::Barrier(ack)).await.is_err() || done.await.is_err() {
            return Err(self.stopped());
        }
        self.durable()
    }

    /// What was stored since the last checkpoint, now durable.
    fn durable(&self) -> Result<Durable, WriteError> {
        if self.lost.load(Ordering::SeqCst) || self.unflushed.load(Ordering::SeqCst) != 0 {
            return Err(WriteError::Unflushed);
        }
        let entries = std::mem::take(&mut *self.written.lock().expect("written lock"));
        let summary = WriterSummary {
            index: (!entries.is_empty()).then(Repository::new_index_name),
            new_blobs: self.new_blobs.swap(0, Ordering::Relaxed),
            new_data_blobs: self.new_data_blobs.swap(0, Ordering::Relaxed),
            new_bytes: self.new_bytes.swap(0, Ordering::Relaxed),
            packs: self.packs.swap(0, Ordering::Relaxed),
        };
        Ok(Durable { repo: self.repo.clone(), guard: self.guard.clone(), summary, entries })
    }

    fn send(&self, name: String, bytes: Vec<u8>) -> Result<(), WriteError> {
        let tx = self.tx.lock().expect("tx lock").clone().ok_or_else(|| self.stopped())?;
        tx.blocking_send(Upload::Pack(name, Bytes::from(bytes))).map_err(|_| self.stopped())
    }
}

/// Blobs that are durable: what a point may now reference (`Writer::finish`,
/// `Writer::checkpoint`).
pub struct Durable {
    repo: Repository,
    guard: Arc<Guard>,
    pub summary: WriterSummary,
    entries: Vec<PackEntry>,
}

impl Durable {
    /// Writes `manifest` as a point at `time`, which makes it visible, then the
    /// index file of the blobs stored for it (`summary.index`), naming the point.
    /// The manifest must say `summary.index`. A point whose index file could not
    /// be written is whole all the same: its packs are adopted by a later writer.
    pub async fn commit(self, manifest: &Manifest, time: jiff::Timestamp) -> Result<PointRef, RepoError> {
        self.guard.ready().await?;
        let point = self.repo.commit_point(manifest, time).await?;
        // The point now holds what it uses, where prune sees it; what the writer
        // uses from here on is its next work.
        {
            let mut k = self.guard.known.lock().expect("known lock");
            k.used.clear();
            k.wal = None;
        }
        if let Err(e) = self.write_index(Some(&point.name)).await {
            tracing::warn!("point {} is saved, but not its index file: {e}", point.name);
        }
        Ok(point)
    }

    /// Writes the index file of these blobs, naming `point` if they belong to one.
    pub(crate) async fn write_index(&self, point: Option<&str>) -> Result<(), StoreError> {
        let Some(name) = &self.summary.index else { return Ok(()) };
        let sealed = seal_index(self.repo.keys(), name, point, &self.entries);
        self.repo.store().put_new(name, Bytes::from(sealed)).await
    }
}

enum Upload {
    Pack(String, Bytes),
    /// Acknowledged once every pack sent before it is durable.
    Barrier(oneshot::Sender<()>),
}

/// Uploads packs until the channel closes or a put fails; a failure is recorded in
/// `failure` and ends the loop, so that every sender learns of it at once.
async fn upload_loop(store: Store, rx: mpsc::Receiver<Upload>, failure: Arc<OnceLock<Arc<StoreError>>>) {
    if let Err(e) = upload_all(store, rx).await {
        let _ = failure.set(Arc::new(e));
    }
}

async fn upload_all(store: Store, mut rx: mpsc::Receiver<Upload>) -> Result<(), StoreError> {
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            Some(done) = in_flight.next(), if !in_flight.is_empty() => done?,
            msg = rx.recv(), if open && in_flight.len() < CONCURRENT_UPLOADS => match msg {
                Some(Upload::Pack(name, bytes)) => {
                    let store = store.clone();
                    in_flight.push(async move { store.put_new(&name, bytes).await });
                }
                Some(Upload::Barrier(ack)) => {
                    while let Some(done) = in_flight.next().await {
                        done?;
                    }
                    let _ = ack.send(());
                }
                None => open = false,
            },
        }
    }
    Ok(())
}

/// One thread's way into a `Writer`: deduplicates, compresses, seals and packs blobs.
pub struct Packer {
    w: Arc<Writer>,
    pack: Option<PackBuilder>,
    zstd: zstd::bulk::Compressor<'static>,
}

impl Packer {
    pub fn content_id(&self, data: &[u8]) -> crate::Id {
        self.w.repo.keys().content_id(data)
    }

    /// Stores `data` unless the repository has it already; returns where it is.
    pub fn store(&mut self, kind: BlobKind, data: &[u8]) -> Result<BlobRef, WriteError> {
        // Leave room for the payload flag and the seal in the 32-bit lengths.
        if data.len() > u32::MAX as usize - 64 {
            return Err(WriteError::TooLarge(data.len()));
        }
        let keys = self.w.repo.keys();
        let id = keys.content_id(data);
        if let Some(b) = self.w.known(kind, &id) {
            return Ok(b);
        }
        let payload = encode_payload(data, Some(&mut self.zstd));
        let pack = self.pack.get_or_insert_with(|| PackBuilder::new(keys));
        // Claim the content id before sealing: of several threads that meet the same
        // content at once (identical files read in parallel), one stores it and the
        // others take its reference.
        let blob = {
            let mut k = self.w.guard.known.lock().expect("known lock");
            if let Some(b) = k.dedup.get(kind, &id) {
                k.used.insert(b.pack);
                return Ok(b);
            }
            let blob = pack.next_ref(id, data.len() as u32, payload.len());
            k.dedup.insert(kind, blob);
            k.used.insert(blob.pack);
            self.w.unflushed.fetch_add(1, Ordering::SeqCst);
            blob
        };
        let added = pack.add(kind, id, data.len() as u32, &payload);
        debug_assert_eq!(added, blob);
        self.w.new_blobs.fetch_add(1, Ordering::Relaxed);
        if kind == BlobKind::Data {
            self.w.new_data_blobs.fetch_add(1, Ordering::Relaxed);
        }
        self.w.new_bytes.fetch_add(blob.length as u64, Ordering::Relaxed);
        if pack.len() >= PACK_TARGET {
            self.flush()?;
        }
        Ok(blob)
    }

    /// Hands the current pack to the uploader.
    pub fn flush(&mut self) -> Result<(), WriteError> {
        let Some(pack) = self.pack.take() else { return Ok(()) };
        if pack.is_empty() {
            return Ok(());
        }
        let (id, bytes, entries) = pack.finish();
        self.w.unflushed.fetch_sub(entries.len() as u64, Ordering::SeqCst);
        self.w.written.lock().expect("written lock").extend(entries);
        self.w.packs.fetch_add(1, Ordering::Relaxed);
        self.w.send(pack_name(&id), bytes)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

impl Drop for Packer {
    fn drop(&mut self) {
        if self.pack.as_ref().is_some_and(|p| !p.is_empty()) {
            // Trees may already reference these blobs: the point must not be written.
            self.w.lost.store(true, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyslot::{Secret, DEFAULT_KDF};

    /// Item 23 of issue 15: threads that meet the same content at the same moment
    /// (identical files read in parallel) store it once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_same_content_met_by_parallel_packers_is_stored_once() {
        let repo =
            Repository::init(Store::memory(), &Secret::KeyFile([6; 32]), DEFAULT_KDF, "t".into()).await.unwrap().0;
        let writer = Writer::new(repo.clone()).await.unwrap();
        let blobs: Arc<Vec<Vec<u8>>> = Arc::new(
            (0..64u32).map(|i| (0..65_536u32).map(|j| (j.wrapping_mul(i + 7) % 253) as u8).collect()).collect(),
        );
        let start = Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (w, blobs, start) = (writer.clone(), blobs.clone(), start.clone());
                tokio::task::spawn_blocking(move || {
                    let mut p = w.packer();
                    start.wait();
                    let refs: Vec<BlobRef> = blobs.iter().map(|b| p.store(BlobKind::Data, b).unwrap()).collect();
                    p.flush().unwrap();
                    refs
                })
            })
            .collect();
        let mut seen = Vec::new();
        for t in threads {
            seen.push(t.await.unwrap());
        }
        let summary = writer.finish().await.unwrap().summary;
        assert_eq!(summary.new_blobs, 64, "content stored more than once");
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "every thread got the one stored copy");
    }

    /// A writer stopped after its pack was durable but before its index: the next
    /// writer adopts the pack and stores nothing again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn orphan_packs_are_adopted_not_uploaded_again() {
        let repo =
            Repository::init(Store::memory(), &Secret::KeyFile([5; 32]), DEFAULT_KDF, "t".into()).await.unwrap().0;
        let data: Vec<Vec<u8>> = (0..3u8).map(|i| (0..300_000u32).map(|j| (j % 251) as u8 ^ i).collect()).collect();
        let store_all = |w: Arc<Writer>, data: Vec<Vec<u8>>| {
            tokio::task::spawn_blocking(move || {
                let mut p = w.packer();
                for d in &data {
                    p.store(BlobKind::Data, d).unwrap();
                }
                p.flush().unwrap();
            })
        };

        let crashed = Writer::new(repo.clone()).await.unwrap();
        store_all(crashed.clone(), data.clone()).await.unwrap();
        // Its pack lands; its index never does.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while repo.store().list(crate::pack::PACKS_DIR).await.unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "the pack was never uploaded");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        drop(crashed);
        assert!(repo.store().list(crate::index::INDEX_DIR).await.unwrap().is_empty());

        let next = Writer::new(repo.clone()).await.unwrap();
        assert_eq!(next.adopt_orphans().await.unwrap(), 1);
        store_all(next.clone(), data.clone()).await.unwrap();
        let durable = next.finish().await.unwrap();
        let summary = &durable.summary;
        assert_eq!((summary.new_blobs, summary.packs), (0, 0), "adopted blobs were stored again");
        assert!(summary.index.is_some(), "the adopted pack goes into an index file");
        durable.write_index(None).await.unwrap();
        assert_eq!(repo.store().list(crate::pack::PACKS_DIR).await.unwrap().len(), 1);

        // Indexed now: nothing left to adopt.
        let third = Writer::new(repo.clone()).await.unwrap();
        assert_eq!(third.adopt_orphans().await.unwrap(), 0);
        third.finish().await.unwrap();
    }
}
