//! Shipping, as tasks the stream waits for: a commit (a walk that reads only what
//! changed, a checkpoint of the writer, then the point) and a round of fragments
//! (the bytes appended to files, between points).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use catalog::tree::Entry;
use catalog::{FragmentRef, Id, PackEntry, RepoError, Repository, Writer};
use jiff::Timestamp;
use tokio::task::JoinHandle;

use super::changes::When;
use crate::appends::{self, LastWalk, Round, Tails};
use crate::snapshot::{capture, Counters, SnapshotError, SnapshotOptions, TreeCache};

/// The part of the stream that a commit runs with, handed to the commit's task and
/// back.
pub(super) struct Shipper {
    repo: Repository,
    opts: Arc<SnapshotOptions>,
    writer: Option<Arc<Writer>>,
    /// The top entry and root tree id of the newest point.
    parent: Option<(Entry, Id)>,
    trees: TreeCache,
    counters: Arc<Counters>,
    /// The blobs of the fragments shipped since the last index file.
    fragment_packs: Arc<Mutex<Vec<PackEntry>>>,
}

/// What a commit did.
pub(super) enum Shipped {
    Point { time: Timestamp, bytes: u64 },
    Unchanged,
}

impl Shipper {
    /// A shipper of `opts.path`; `fragment_packs` are the packs of fragments, which
    /// the next index file lists.
    pub(super) fn new(
        repo: Repository,
        opts: Arc<SnapshotOptions>,
        fragment_packs: Arc<Mutex<Vec<PackEntry>>>,
    ) -> Self {
        Shipper {
            repo,
            opts,
            writer: None,
            parent: None,
            trees: TreeCache::default(),
            counters: Arc::new(Counters::default()),
            fragment_packs,
        }
    }

    /// The newest point as the last walk saw it, for fragments to extend.
    pub(super) fn last_walk(&self) -> Option<LastWalk> {
        self.parent.as_ref().map(|(top, _)| LastWalk { top: top.clone(), trees: self.trees.0.clone() })
    }

    async fn ship(mut self) -> (Shipper, Result<Shipped, SnapshotError>) {
        let r = self.try_ship().await;
        if r.is_err() {
            // Its dedup map may name blobs that never became durable.
            self.writer = None;
            self.trees = TreeCache::default();
        }
        (self, r)
    }

    async fn try_ship(&mut self) -> Result<Shipped, SnapshotError> {
        let writer = match &self.writer {
            Some(w) => w.clone(),
            None => {
                if self.parent.is_none() {
                    self.parent = newest(&self.repo, &self.opts.source).await?;
                }
                let w = Writer::new(self.repo.clone()).await?;
                // What a crash left uploaded but unindexed is not uploaded again.
                let adopted = w.adopt_orphans().await?;
                if adopted > 0 {
                    tracing::info!("adopted {adopted} packs left unindexed by an earlier run");
                }
                self.writer = Some(w.clone());
                w
            }
        };
        // Fragments' packs are durable: the next index file lists them.
        writer.adopt(std::mem::take(&mut *self.fragment_packs.lock().expect("fragment packs lock")));
        let trees = std::mem::take(&mut self.trees);
        let parent = self.parent.as_ref().map(|(e, _)| e.clone());
        let cap = capture(&writer, &self.opts, parent, trees, self.counters.clone()).await?;
        if self.parent.as_ref().is_some_and(|(_, root)| *root == cap.root.id) && cap.changed.is_empty() {
            self.trees = cap.trees;
            return Ok(Shipped::Unchanged);
        }
        let durable = writer.checkpoint().await?;
        let bytes = durable.summary.new_bytes;
        let manifest = cap.manifest(&self.opts, durable.summary.clone());
        let point = durable.commit(&manifest, cap.started).await?;
        tracing::info!(
            "point {} of {}: {} files, {} new bytes, walk {} ms",
            point.time,
            point.source,
            manifest.stats.files,
            bytes,
            manifest.stats.duration_ms
        );
        self.parent = Some((cap.top, cap.root.id));
        self.trees = cap.trees;
        Ok(Shipped::Point { time: cap.started, bytes })
    }
}

/// The top entry and root tree id of the source's newest point.
async fn newest(repo: &Repository, source: &str) -> Result<Option<(Entry, Id)>, SnapshotError> {
    let Some(point) = repo.point_at(source, Timestamp::now()).await? else { return Ok(None) };
    let m = repo.manifest(&point).await?;
    let root = m.root_ref().expect("checked when opened");
    let tree = repo.read_tree(&root).await?;
    Ok(tree.entries.into_iter().next().map(|top| (top, root.id)))
}

/// A commit under way: the first change it carries, and when its walk began.
pub(super) struct Running {
    task: JoinHandle<(Shipper, Result<Shipped, SnapshotError>)>,
    carried: Option<When>,
    began: Timestamp,
}

/// A commit that ended: the shipper, back, and what it carried.
pub(super) struct Committed {
    pub(super) shipper: Shipper,
    pub(super) result: Result<Shipped, SnapshotError>,
    pub(super) carried: Option<When>,
    pub(super) began: Timestamp,
}

impl Running {
    /// Starts a commit that carries the changes since `carried`.
    pub(super) fn start(shipper: Shipper, carried: Option<When>) -> Running {
        Running { task: tokio::spawn(shipper.ship()), carried, began: Timestamp::now() }
    }

    /// The oldest change it carries.
    pub(super) fn carries(&self) -> Option<Timestamp> {
        self.carried.map(|(_, t)| t)
    }

    /// Waits for the commit in `slot` to end, and takes it out. Cancel-safe: until
    /// it ends, the commit stays in `slot`.
    pub(super) async fn ended(slot: &mut Option<Running>) -> Committed {
        let running = slot.as_mut().expect("a commit runs");
        let (shipper, result) = (&mut running.task).await.expect("the walk task panicked");
        let Running { carried, began, .. } = slot.take().expect("a commit runs");
        Committed { shipper, result, carried, began }
    }

    pub(super) fn abort(&self) {
        self.task.abort();
    }
}

/// Fragments being shipped: the files they read, and when each was first written.
pub(super) struct Shipping {
    task: JoinHandle<(Round, Result<Option<FragmentRef>, RepoError>)>,
    carried: Vec<(PathBuf, When)>,
}

/// A round of fragments that ended: the round, its fragment if it made one, and the
/// files it carried.
pub(super) struct Appended {
    pub(super) round: Round,
    pub(super) result: Result<Option<FragmentRef>, RepoError>,
    pub(super) carried: Vec<(PathBuf, When)>,
}

impl Shipping {
    /// Starts shipping what was appended to the `carried` files under `root` since
    /// `last_walk` and the fragments after it.
    pub(super) fn start(
        repo: Repository,
        source: String,
        root: PathBuf,
        last_walk: Arc<LastWalk>,
        tails: Arc<Tails>,
        carried: Vec<(PathBuf, When)>,
    ) -> Shipping {
        let paths = carried.iter().map(|(p, _)| p.clone()).collect();
        let task = tokio::spawn(ship_appends(repo, source, root, last_walk, tails, paths));
        Shipping { task, carried }
    }

    /// The oldest change it carries.
    pub(super) fn carries(&self) -> Option<Timestamp> {
        self.carried.iter().map(|(_, (_, t))| *t).min()
    }

    /// Waits for the round in `slot` to end, and takes it out. Cancel-safe: until it
    /// ends, the round stays in `slot`.
    pub(super) async fn ended(slot: &mut Option<Shipping>) -> Appended {
        let shipping = slot.as_mut().expect("a round of fragments runs");
        let (round, result) = (&mut shipping.task).await.expect("the append task panicked");
        let Shipping { carried, .. } = slot.take().expect("a round of fragments runs");
        Appended { round, result, carried }
    }

    pub(super) fn abort(&self) {
        self.task.abort();
    }
}

/// Reads what was appended to `paths` and commits it as one fragment, if any.
async fn ship_appends(
    repo: Repository,
    source: String,
    root: PathBuf,
    last_walk: Arc<LastWalk>,
    tails: Arc<Tails>,
    paths: Vec<PathBuf>,
) -> (Round, Result<Option<FragmentRef>, RepoError>) {
    let r = repo.clone();
    let mut round = tokio::task::spawn_blocking(move || appends::prepare(&r, &root, &last_walk, &tails, paths))
        .await
        .expect("the append reader panicked");
    if round.fragment.growths.is_empty() {
        return (round, Ok(None));
    }
    // Every byte in it was on disk by now.
    let time = Timestamp::now();
    let fragment = std::mem::take(&mut round.fragment);
    let result = round.builder.commit(&repo, &source, time, &fragment).await;
    round.fragment = fragment;
    (round, result.map(Some))
}
