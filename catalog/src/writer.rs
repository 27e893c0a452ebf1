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
//! files (`Inventory`) whose pack is there and long enough, and its own; and never
//! against a pack a prune condemned (`view`). It confirms a pack the first time it
//! would use it, with a stat, so that starting costs the same however many packs
//! the repository holds; it lists every pack instead when it must look for packs
//! no index file names (`running`: a writer before it left some, or it has no mark
//! to tell). It remembers every pack it uses, looks at what is condemned again
//! every `Timing::refresh` while it runs, rescues any pack it uses that was
//! condemned since, and commits a point only with a view of them younger than
//! `Timing::view_ttl`.

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
use crate::host_index::HostIndex;
use crate::id::Id;
use crate::index::{seal_index, DedupIndex, INDEX_DIR};
use crate::index_cache::cache_dir;
use crate::index_load::{self, Loaded};
use crate::inventory::Inventory;
use crate::pack::PACK_TARGET;
use crate::pack::{fetch_header, pack_name, BlobKind, BlobRef, PackBuilder, PackEntry, PACKS_DIR};
use crate::point::{Manifest, PointRef};
use crate::repo::Repository;
use crate::running::{remove_leftovers, Mark};
use crate::store::{Store, StoreError};
use crate::tree::Tree;
use crate::tree_cache::{Appender, TreeUses};
use crate::view::View;
use crate::wal::{Lsn, WalPiece};

/// Removes the uploads to `packs/` and `index/` that interrupted writers left
/// half-written (on a `file://` store; see `Store::sweep_staged`). Failing to is only
/// a warning.
pub(crate) async fn sweep_staged(repo: &Repository) {
    for dir in [PACKS_DIR, INDEX_DIR] {
        match repo.store().sweep_staged(dir, crate::store::STAGED_AGE).await {
            Ok(0) => {}
            Ok(n) => tracing::info!("removed {n} half-written uploads left in {dir}/ by interrupted runs"),
            Err(e) => tracing::warn!("{e}"),
        }
    }
}

/// Full packs waiting for the uploader, beyond those being uploaded.
const QUEUED_PACKS: usize = 2;
const CONCURRENT_UPLOADS: usize = 4;
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
    /// What the index files read at the start say, and what the writer stored.
    dedup: DedupIndex,
    /// The host's merged copy of the index files before those: looked up when
    /// `dedup` has no entry.
    table: Option<Arc<HostIndex>>,
    /// What the writer knows of the packs it may reference.
    packs: HashMap<Id, PackState>,
    /// Every pack was listed when the writer started: one `packs` does not hold
    /// is lost.
    listed_all: bool,
    /// Lost packs the user was told of.
    lost_told: HashSet<Id>,
    /// Every pack the writer referenced or stored since it started.
    used: HashSet<Id>,
    /// The WAL the point being written needs (a base backup's, from its start).
    wal: Option<WalNeed>,
}

/// What a writer knows of a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PackState {
    /// Stored or adopted by this writer.
    Own,
    /// There, this long, when listed or looked at.
    There(u64),
    /// Not there, though an index file names it: what is needed of it is stored again.
    Lost,
    /// Condemned by a prune: not taken into use again.
    Condemned,
}

impl PackState {
    fn holds(self, blob: &BlobRef) -> bool {
        match self {
            PackState::Own => true,
            PackState::There(size) => blob.range().end <= size,
            PackState::Lost | PackState::Condemned => false,
        }
    }
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
    /// Packs handed to the uploader, and adoptions.
    sent: AtomicU64,
    /// Of `sent`, how many an index file written names (a high-water mark).
    indexed: AtomicU64,
    /// Blobs made durable were never named in an index file.
    unindexed: AtomicBool,
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
            k.packs.extend(added.packs.iter().map(|p| (*p, PackState::Condemned)));
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
    /// The runtime the writer was made on, for the stats of packs its packers use.
    handle: tokio::runtime::Handle,
    guard: Arc<Guard>,
    refresher: JoinHandle<()>,
    /// This writer's mark on the host; `None` without a cache directory.
    mark: Option<Mark>,
    /// Marks of writers that left packs unindexed, removed once those are adopted.
    leftovers: Mutex<Vec<std::path::PathBuf>>,
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
    /// What the trees it stores use, for the host's cache (`tree_cache`): the
    /// cache directory until the first tree, then the file (none once it failed).
    tree_uses: Mutex<TreeFeed>,
}

enum TreeFeed {
    Dir(std::path::PathBuf),
    File(Box<Appender>),
    None,
}

impl Writer {
    /// Loads the repository's index for deduplication (a pack is confirmed when
    /// first used), and starts the uploader on the current runtime.
    pub async fn new(repo: Repository) -> Result<Arc<Writer>, RepoError> {
        Writer::with_timing(repo, crate::condemned::Timing::from_env()).await
    }

    /// `new`, with the clock of deletion given rather than taken from `EBB_GRACE`.
    pub async fn with_timing(repo: Repository, timing: crate::condemned::Timing) -> Result<Arc<Writer>, RepoError> {
        // Not for a repository in memory, which no later writer opens.
        let host = (!repo.store().url().starts_with("memory:")).then(cache_dir).flatten();
        Writer::on_host(repo, timing, host).await
    }

    /// `with_timing`, keeping the host's copy of the index files and the writers'
    /// marks in `host` (none without).
    pub(crate) async fn on_host(
        repo: Repository,
        timing: crate::condemned::Timing,
        host: Option<std::path::PathBuf>,
    ) -> Result<Arc<Writer>, RepoError> {
        let mut view = View::new(timing);
        let condemned = view.refresh(&repo).await?.packs;
        // The host's copy of the index, and its writers' marks.
        let marks = host.as_ref().and_then(|dir| Mark::take(&dir.join(format!("writers-{}", repo.id().to_hex()))));
        // Packs no index file names can only be found by listing them all: done when
        // a writer before this one may have left some.
        let list_packs = marks.as_ref().is_none_or(|m| !m.leftovers.is_empty());
        if list_packs {
            // So may it have left uploads half-written: removed, not kept for ever.
            sweep_staged(&repo).await;
        }
        let loaded = match index_load::load(&repo, host.as_deref(), list_packs).await {
            Ok(i) => i,
            Err(e) => {
                // Nothing was stored: the mark would only send the next writer listing.
                if let Some(m) = marks {
                    m.own.remove();
                }
                return Err(e);
            }
        };
        let (inventory, table) = match loaded {
            Loaded::All(inventory) => (inventory, None),
            Loaded::Merged { table, files, unreadable } => {
                (Inventory { packs: HashMap::new(), index_files: files, unreadable }, Some(table))
            }
        };
        for (name, why) in &inventory.unreadable {
            // A damaged index only costs dedup; `ebb verify` reports it.
            tracing::warn!("skipping index file {name}: {why}");
        }
        let mut packs: HashMap<Id, PackState> = HashMap::new();
        let mut orphans = Vec::new();
        if list_packs {
            // Packs a prune condemned are deleted before the index files naming them
            // are written again: missing, but not lost.
            let (missing, lost) = inventory.missing_except(|p| view.condemns(p));
            if missing > 0 {
                warn_lost(&format!(
                    "the index lists {missing} blobs in {} packs that are missing or cut short",
                    lost.len()
                ));
            }
            orphans = inventory.unindexed().into_iter().filter(|(p, _)| !view.condemns(p)).collect();
            packs.extend(inventory.packs.iter().map(|(p, size)| (*p, PackState::There(*size))));
        }
        packs.extend(condemned.iter().map(|p| (*p, PackState::Condemned)));
        let mut dedup = DedupIndex::with_capacity(inventory.index_files.iter().map(|(_, f)| f.entries.len()).sum());
        for e in inventory.index_files.iter().flat_map(|(_, f)| &f.entries) {
            // Unless listed, a pack is looked at when first used.
            if packs.get(&e.blob.pack).map_or(!list_packs, |s| s.holds(&e.blob)) {
                dedup.insert(e.kind, e.blob);
            }
        }
        drop(inventory);
        let refresh = view.timing.refresh;
        let guard = Arc::new(Guard {
            repo: repo.clone(),
            known: Mutex::new(Known {
                dedup,
                table,
                packs,
                listed_all: list_packs,
                lost_told: HashSet::new(),
                used: HashSet::new(),
                wal: None,
            }),
            view: tokio::sync::Mutex::new(view),
            unrescued: Mutex::new(Rescued::default()),
            poisoned: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            indexed: AtomicU64::new(0),
            unindexed: AtomicBool::new(false),
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
        let (mark, leftovers) = match marks {
            Some(m) => (Some(m.own), m.leftovers),
            None => (None, Vec::new()),
        };
        Ok(Arc::new(Writer {
            repo,
            handle: tokio::runtime::Handle::current(),
            guard,
            refresher,
            mark,
            leftovers: Mutex::new(leftovers),
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
            tree_uses: Mutex::new(host.map_or(TreeFeed::None, TreeFeed::Dir)),
        }))
    }

    /// Adds what the tree just stored at `blob` uses to the host's cache.
    fn feed_tree_cache(&self, blob: &BlobRef, tree: &Tree) {
        let mut feed = self.tree_uses.lock().expect("tree cache lock");
        if let TreeFeed::Dir(dir) = &*feed {
            *feed = Appender::create(dir, &self.repo.id(), self.repo.keys())
                .map_or(TreeFeed::None, |a| TreeFeed::File(Box::new(a)));
        }
        if let TreeFeed::File(file) = &mut *feed {
            if !file.append(blob, &TreeUses::of(tree)) {
                *feed = TreeFeed::None;
            }
        }
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
    /// reference, which the caller then uses. Blocks on a stat of its pack the
    /// first time the writer meets it.
    pub fn known(&self, kind: BlobKind, id: &crate::Id) -> Option<BlobRef> {
        let (found, table) = {
            let k = self.guard.known.lock().expect("known lock");
            (k.dedup.get(kind, id), k.table.clone())
        };
        // The table is read outside the lock: a block may have to be decrypted.
        let found = found.or_else(|| table?.get(kind, id))?;
        if self.take_into_use(&found) {
            return Some(found);
        }
        let mut k = self.guard.known.lock().expect("known lock");
        if k.dedup.get(kind, id) == Some(found) {
            k.dedup.remove(kind, id);
        }
        None
    }

    /// Whether a reference taken from an earlier point may be used again (and then
    /// it counts as used): its pack is there, long enough, and not condemned, or
    /// this writer stored it. Blocks on a stat of the pack the first time the writer
    /// meets it.
    pub fn exists(&self, blob: &BlobRef) -> bool {
        self.take_into_use(blob)
    }

    /// Whether `blob`'s pack holds it, as far as the writer knows or, the first time,
    /// as the store says; if so the pack counts as used. The check and the use are
    /// one step under the lock the view's refresher takes: a pack it condemns
    /// meanwhile is either not used, or used and rescued.
    fn take_into_use(&self, blob: &BlobRef) -> bool {
        {
            let mut k = self.guard.known.lock().expect("known lock");
            let Some(state) = k.packs.get(&blob.pack).copied() else {
                if k.listed_all {
                    return false;
                }
                drop(k);
                return self.look_then_use(blob);
            };
            let ok = state.holds(blob);
            if ok {
                k.used.insert(blob.pack);
            }
            ok
        }
    }

    /// `take_into_use` for a pack the writer has not met: a stat says whether it is
    /// there, and how long.
    fn look_then_use(&self, blob: &BlobRef) -> bool {
        let name = pack_name(&blob.pack);
        let looked = match self.handle.block_on(self.repo.store().size(&name)) {
            Ok(size) => PackState::There(size),
            Err(e) if e.is_not_found() => PackState::Lost,
            Err(e) => {
                // Stored again rather than trusted: the store may be failing anyway.
                tracing::warn!("cannot look at pack {name}, so what is needed of it is stored again: {e}");
                return false;
            }
        };
        let mut k = self.guard.known.lock().expect("known lock");
        // Another thread may have looked, or the refresher condemned it, meanwhile.
        let state = *k.packs.entry(blob.pack).or_insert(looked);
        let ok = state.holds(blob);
        if ok {
            k.used.insert(blob.pack);
        } else if state != PackState::Condemned && k.lost_told.insert(blob.pack) {
            drop(k);
            warn_lost(&format!("pack {name}, which the index lists, is missing or cut short"));
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
        // What they left is this writer's now, and its own mark stands for it.
        remove_leftovers(&std::mem::take(&mut *self.leftovers.lock().expect("leftovers lock")));
        Ok(adopted)
    }

    /// Blobs in packs that are durable already (stored by someone else, such as a
    /// stream's fragments): deduplicated against from now on, and listed in the next
    /// index file.
    /// What a prune condemned since the writer started is left out: it is not
    /// this writer's to use, and no rescue would name it.
    pub fn adopt(&self, mut entries: Vec<PackEntry>) {
        let mut k = self.guard.known.lock().expect("known lock");
        entries.retain(|e| k.packs.get(&e.blob.pack) != Some(&PackState::Condemned));
        if entries.is_empty() {
            return;
        }
        for e in &entries {
            k.dedup.insert(e.kind, e.blob);
            k.packs.insert(e.blob.pack, PackState::Own);
            k.used.insert(e.blob.pack);
        }
        drop(k);
        self.written.lock().expect("written lock").extend(entries);
        self.guard.sent.fetch_add(1, Ordering::SeqCst);
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
        self.durable(jiff::Timestamp::now())
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
        self.checkpoint_as_of(jiff::Timestamp::now()).await
    }

    /// `checkpoint`, naming the index file as of `at` (index names carry the time
    /// they were chosen, §7) rather than now: for a history written with the times
    /// it had, as `examples/history` generates one. Writers name by their clock.
    #[doc(hidden)]
    pub async fn checkpoint_as_of(&self, at: jiff::Timestamp) -> Result<Durable, WriteError> {
        let tx = self.tx.lock().expect("tx lock").clone().ok_or_else(|| self.stopped())?;
        let (ack, done) = oneshot::channel();
        if tx.send(Upload::Barrier(ack)).await.is_err() || done.await.is_err() {
            return Err(self.stopped());
        }
        self.durable(at)
    }

    /// What was stored since the last checkpoint, now durable; its index file is
    /// named as of `at`.
    fn durable(&self, at: jiff::Timestamp) -> Result<Durable, WriteError> {
        if self.lost.load(Ordering::SeqCst) || self.unflushed.load(Ordering::SeqCst) != 0 {
            return Err(WriteError::Unflushed);
        }
        // Before the entries are taken: a pack counted here has its entries among them.
        let upto = self.guard.sent.load(Ordering::SeqCst);
        let entries = std::mem::take(&mut *self.written.lock().expect("written lock"));
        let summary = WriterSummary {
            index: (!entries.is_empty()).then(|| crate::index::index_name(at)),
            new_blobs: self.new_blobs.swap(0, Ordering::Relaxed),
            new_data_blobs: self.new_data_blobs.swap(0, Ordering::Relaxed),
            new_bytes: self.new_bytes.swap(0, Ordering::Relaxed),
            packs: self.packs.swap(0, Ordering::Relaxed),
        };
        Ok(Durable {
            repo: self.repo.clone(),
            guard: self.guard.clone(),
            summary,
            entries,
            upto,
            indexed: AtomicBool::new(false),
        })
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
    /// The writer's `sent` when these entries were taken.
    upto: u64,
    /// An index file names the entries.
    indexed: AtomicBool,
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
        if let Some(name) = &self.summary.index {
            let sealed = seal_index(self.repo.keys(), name, point, &self.entries);
            self.repo.store().put_new(name, Bytes::from(sealed)).await?;
        }
        self.indexed.store(true, Ordering::SeqCst);
        self.guard.indexed.fetch_max(self.upto, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for Durable {
    fn drop(&mut self) {
        if !self.entries.is_empty() && !self.indexed.load(Ordering::SeqCst) {
            // A later writer must look for these packs: no index file names them.
            self.guard.unindexed.store(true, Ordering::SeqCst);
        }
    }
}

/// Tells the user of packs the index names that are lost, and what to do.
fn warn_lost(what: &str) {
    tracing::warn!(
        "{what}: what is needed of them is stored again. \
         Points that use them cannot be restored in full (`ebb verify` names them); \
         `ebb repair index` drops them from the index"
    );
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
            // Another packer's, or the one `known` just confirmed.
            if let Some(b) = k.dedup.get(kind, &id).filter(|b| k.packs.get(&b.pack).is_some_and(|s| s.holds(b))) {
                k.used.insert(b.pack);
                return Ok(b);
            }
            let blob = pack.next_ref(id, data.len() as u32, payload.len());
            k.dedup.insert(kind, blob);
            k.packs.insert(blob.pack, PackState::Own);
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

    /// Stores `tree` (`store`), and what it uses in the host's cache if it is new:
    /// a prune then need not read it from the store.
    pub fn store_tree(&mut self, tree: &Tree) -> Result<BlobRef, WriteError> {
        let data = tree.encode();
        let known = self.w.known(BlobKind::Tree, &self.content_id(&data)).is_some();
        let blob = self.store(BlobKind::Tree, &data)?;
        if !known {
            self.w.feed_tree_cache(&blob, tree);
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
        self.w.guard.sent.fetch_add(1, Ordering::SeqCst);
        self.w.packs.fetch_add(1, Ordering::Relaxed);
        self.w.send(pack_name(&id), bytes)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.refresher.abort();
        let g = &self.guard;
        let all_indexed =
            !g.unindexed.load(Ordering::SeqCst) && g.indexed.load(Ordering::SeqCst) == g.sent.load(Ordering::SeqCst);
        // Otherwise the mark stays, and tells the next writer to look for orphans.
        if let Some(mark) = self.mark.take().filter(|_| all_indexed) {
            mark.remove();
        }
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
        let summary = writer.finish().await.unwrap().summary.clone();
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

    /// A repository in memory behind a fault injector, and a host's cache directory.
    async fn on_a_host(key: u8) -> (crate::faults::Faults, Repository, tempfile::TempDir) {
        let faults = crate::faults::Faults::new();
        let store = Store::memory().with_faults(faults.clone());
        let repo = Repository::init(store, &Secret::KeyFile([key; 32]), DEFAULT_KDF, "t".into()).await.unwrap().0;
        (faults, repo, tempfile::tempdir().unwrap())
    }

    /// A writer lists every pack only when a writer before it on the host left
    /// packs no index file names: otherwise it looks at each pack it uses, once. A
    /// lost pack is found so, and what is needed of it stored again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn packs_are_listed_only_after_a_writer_left_some_unindexed() {
        use crate::faults::{Fault, Op};
        let (faults, repo, host) = on_a_host(3).await;
        let open = || Writer::on_host(repo.clone(), crate::condemned::Timing::from_env(), Some(host.path().into()));
        let blob = |i: u8| vec![i; 200_000];
        // Stores `blobs`, blocking as packers do; what each is stored as.
        let store = |w: &Arc<Writer>, blobs: Vec<Vec<u8>>| {
            let w = w.clone();
            tokio::task::spawn_blocking(move || {
                let mut p = w.packer();
                let refs: Vec<BlobRef> = blobs.iter().map(|b| p.store(BlobKind::Data, b).unwrap()).collect();
                p.flush().unwrap();
                refs
            })
        };
        faults.always(Op::List, "packs", Fault::Fail);

        let first = open().await.expect("no pack listing: the host has no leftover mark");
        let stored = store(&first, vec![blob(1), blob(2)]).await.unwrap();
        first.finish().await.unwrap().write_index(None).await.unwrap();
        drop(first);

        // Known from the index, confirmed by a look at the pack.
        let second = open().await.unwrap();
        let (w, s) = (second.clone(), stored.clone());
        let found =
            tokio::task::spawn_blocking(move || (w.known(BlobKind::Data, &s[0].id), w.exists(&s[1]))).await.unwrap();
        assert_eq!(found, (Some(stored[0]), true));
        second.finish().await.unwrap();
        drop(second);

        // The pack lost: stored again, not referenced.
        repo.store().delete(&pack_name(&stored[0].pack)).await.unwrap();
        let third = open().await.unwrap();
        let again = store(&third, vec![blob(1)]).await.unwrap();
        assert_ne!(again[0].pack, stored[0].pack);
        let (w, s) = (third.clone(), stored[1]);
        assert!(!tokio::task::spawn_blocking(move || w.exists(&s)).await.unwrap(), "the lost pack is not used");
        third.finish().await.unwrap().write_index(None).await.unwrap();
        drop(third);

        // A writer whose pack is durable but never indexed leaves its mark.
        let crashed = open().await.unwrap();
        store(&crashed, vec![blob(3)]).await.unwrap();
        drop(crashed.finish().await.unwrap());
        drop(crashed);
        let marks = host.path().join(format!("writers-{}", repo.id().to_hex()));
        assert_eq!(std::fs::read_dir(&marks).unwrap().count(), 1, "the mark stays");
        assert!(open().await.is_err(), "the next writer lists the packs (here refused)");

        faults.clear();
        let next = open().await.unwrap();
        assert_eq!(next.adopt_orphans().await.unwrap(), 1);
        store(&next, vec![blob(3)]).await.unwrap();
        let durable = next.finish().await.unwrap();
        assert_eq!(durable.summary.new_blobs, 0, "adopted, not stored again");
        durable.write_index(None).await.unwrap();
        faults.always(Op::List, "packs", Fault::Fail);
        assert!(open().await.is_ok(), "the leftover mark went once its packs were adopted");
    }

    /// A writer on a host that keeps a merged copy of the index fetches only the
    /// index files named since it was built, and finds through it what every writer
    /// before stored: here no earlier index file may be fetched at all. An index
    /// file named before the newest one read, but put after it, is still found. A
    /// new generation (a prune) has the copy built again, and so does a host's copy
    /// of the index files that a crash cut short.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_reads_only_the_index_files_named_since_its_hosts_merged_copy() {
        use crate::faults::{Fault, Op};
        let (faults, repo, host) = on_a_host(5).await;
        let open = || Writer::on_host(repo.clone(), crate::condemned::Timing::from_env(), Some(host.path().into()));
        let store = |w: &Arc<Writer>, i: u8| {
            let w = w.clone();
            tokio::task::spawn_blocking(move || {
                let mut p = w.packer();
                let r = p.store(BlobKind::Data, &[i; 1000]).unwrap();
                p.flush().unwrap();
                r
            })
        };
        let known = |w: &Arc<Writer>, refs: &[BlobRef]| {
            let (w, refs) = (w.clone(), refs.to_vec());
            tokio::task::spawn_blocking(move || refs.iter().map(|r| w.known(BlobKind::Data, &r.id)).collect::<Vec<_>>())
        };
        let mut stored = Vec::new();
        for i in 0..5 {
            let w = open().await.unwrap();
            stored.push(store(&w, i).await.unwrap());
            w.finish().await.unwrap().write_index(None).await.unwrap();
        }
        // Named first, put last.
        let late = open().await.unwrap();
        let late_ref = store(&late, 9).await.unwrap();
        let late_durable = late.finish().await.unwrap();
        let w = open().await.unwrap();
        stored.push(store(&w, 5).await.unwrap());
        w.finish().await.unwrap().write_index(None).await.unwrap();
        drop(open().await.unwrap());
        late_durable.write_index(None).await.unwrap();
        drop(open().await.unwrap());
        stored.push(late_ref);

        let table = crate::host_index::table_path(host.path(), &repo.id());
        let built = std::fs::read(&table).unwrap();
        faults.always(Op::Get, "index/", Fault::Fail);
        let w = open().await.expect("no index file is fetched: every one was read before");
        assert_eq!(known(&w, &stored).await.unwrap(), stored.iter().map(|r| Some(*r)).collect::<Vec<_>>());
        drop(w);
        assert_eq!(std::fs::read(&table).unwrap(), built, "the merged copy is used as it is");

        // A prune's marker: built again (from the host's copy of the index files).
        crate::generation::bump(&repo).await.unwrap();
        let w = open().await.unwrap();
        assert_eq!(known(&w, &stored).await.unwrap(), stored.iter().map(|r| Some(*r)).collect::<Vec<_>>());
        drop(w);
        let rebuilt = HostIndex::open(&table, repo.keys()).unwrap();
        assert_ne!(std::fs::read(&table).unwrap(), built);
        assert_eq!(rebuilt.header.generation, crate::generation::current(repo.store()).await.unwrap());
        assert_eq!(rebuilt.header.entries, stored.len() as u64);

        // A record cut short at the end of the host's copy of the index files: the
        // files read since go into the merged copy, and the host's copy is
        // written afresh.
        faults.clear();
        let w = open().await.unwrap();
        stored.push(store(&w, 7).await.unwrap());
        w.finish().await.unwrap().write_index(None).await.unwrap();
        let cache = host.path().join(format!("index-{}", repo.id().to_hex()));
        let mut f = std::fs::OpenOptions::new().append(true).open(&cache).unwrap();
        std::io::Write::write_all(&mut f, &[9, 0, 0, 0, b'x']).unwrap();
        let w = open().await.unwrap();
        drop(w);
        let merged = HostIndex::open(&table, repo.keys()).unwrap();
        assert_eq!(merged.header.entries, stored.len() as u64, "the newest file is merged in");
        let cached = crate::index_cache::IndexCache::in_dir(host.path(), &repo.id()).read().unwrap();
        assert_eq!(cached.len, std::fs::metadata(&cache).unwrap().len(), "written afresh, whole");
        faults.always(Op::Get, "index/", Fault::Fail);
        let w = open().await.unwrap();
        assert_eq!(known(&w, &stored).await.unwrap(), stored.iter().map(|r| Some(*r)).collect::<Vec<_>>());
    }

    /// A pack a prune condemned since the writer started is not adopted: the writer
    /// would use it without a rescue naming it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_was_condemned_meanwhile_is_not_adopted() {
        let repo =
            Repository::init(Store::memory(), &Secret::KeyFile([2; 32]), DEFAULT_KDF, "t".into()).await.unwrap().0;
        let w = Writer::new(repo.clone()).await.unwrap();
        let pack = Id::random();
        let blob = BlobRef { id: Id::random(), pack, offset: 0, length: 100, raw_len: 60 };
        // As the refresher records a set it found.
        w.guard.known.lock().unwrap().packs.insert(pack, PackState::Condemned);
        w.adopt(vec![PackEntry { kind: BlobKind::Data, blob }]);
        assert_eq!(w.known(BlobKind::Data, &blob.id), None);
        assert!(!w.guard.known.lock().unwrap().used.contains(&pack));
        assert!(w.finish().await.unwrap().summary.index.is_none(), "nothing to index");
    }
}
