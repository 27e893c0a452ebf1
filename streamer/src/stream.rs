//! `ebb stream dir`: a directory as a stream of recovery points.
//!
//! inotify (through `notify`) says when something changed; a commit follows once
//! the tree has been quiet for `SETTLE`, and never later than `max_delay` after the
//! first change it carries, a fraction of the RPO. A full walk every `rescan` is the
//! safety net for what inotify cannot see (overflowed queues, changes on other
//! hosts of a network filesystem). Each commit is a walk that reads only files whose
//! size, mtime, ctime or inode changed, a checkpoint of the writer (packs durable,
//! then their index) and then the point: a kill at any instant leaves a repository
//! that verifies, and the next run starts from the newest point.
//!
//! A file that was only appended to needs no point: its new bytes go out as a
//! fragment within `append_interval` (see `appends`). Points still follow every
//! other change, and at least every `POINT_AFTER_APPENDS` while files grow, so that
//! the fragments to apply after a point stay few.
//!
//! Store errors are retried with exponential backoff and jitter; nothing is lost
//! meanwhile, because the source itself holds what is pending. The lag (now minus
//! the newest durable state) is kept in the state file, the metrics and the log
//! (`health`); past the RPO the alarm fires, and it clears once caught up.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use catalog::tree::Entry;
use catalog::{FragmentRef, Id, PackEntry, RepoError, Repository, Writer};
use jiff::Timestamp;
use notify::event::ModifyKind;
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::appends::{self, Round, Tails, View};
use crate::health::{Alarm, Backoff, Health, HEARTBEAT};
use crate::metrics::Metrics;
use crate::snapshot::{capture, Counters, SnapshotError, SnapshotOptions, TreeCache};
use crate::state::StreamState;

/// A commit waits for the tree to be quiet this long.
const SETTLE: Duration = Duration::from_millis(500);
/// Retries after a failure wait from this long...
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// ...doubling up to this.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// On SIGINT/SIGTERM a commit under way may finish for this long.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// While files only grow, a point still follows this long after the first fragment.
const POINT_AFTER_APPENDS: Duration = Duration::from_secs(300);
/// inotify events reach the stream within this long of the change.
const EVENT_SLACK: Duration = Duration::from_millis(500);
/// Files with pending appends kept by name; past this, a point takes them all.
const MAX_DIRTY: usize = 10_000;

#[derive(Debug, Clone)]
pub struct StreamOptions {
    pub snapshot: SnapshotOptions,
    /// The repository URL, for the state file.
    pub repository: String,
    pub rpo: Duration,
    /// A full walk at least this often, changes seen or not.
    pub rescan: Duration,
    /// Appended bytes are shipped within this long.
    pub append_interval: Duration,
    /// The state file; none to keep no state.
    pub state_file: Option<PathBuf>,
}

impl StreamOptions {
    /// The longest a change waits for its commit: a quarter of the RPO, at most 15 s.
    fn max_delay(&self) -> Duration {
        (self.rpo / 4).clamp(SETTLE, Duration::from_secs(15))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot watch {}: {cause}", path.display())]
    Watch { path: PathBuf, cause: notify::Error },
}

/// What the watcher reports: the first change not yet shipped, and the latest.
#[derive(Default)]
struct Changes {
    /// Changes that need a point.
    first: Option<(Instant, Timestamp)>,
    last: Option<Instant>,
    /// inotify lost events: only a full walk can tell what changed.
    overflowed: bool,
    /// Files written to, maybe only appended to, and when they first were.
    written: HashMap<PathBuf, (Instant, Timestamp)>,
}

impl Changes {
    fn need_point(&mut self, at: (Instant, Timestamp)) {
        self.first = Some(match self.first {
            Some(f) if f.0 <= at.0 => f,
            _ => at,
        });
        self.last = Some(self.last.map_or(at.0, |l| l.max(at.0)));
    }

    fn written_since(&self) -> Option<(Instant, Timestamp)> {
        self.written.values().min_by_key(|(i, _)| *i).copied()
    }
}

/// The part of the stream that a commit runs with, handed to the commit's task and
/// back.
struct Shipper {
    repo: Repository,
    opts: Arc<StreamOptions>,
    writer: Option<Arc<Writer>>,
    /// The top entry and root tree id of the newest point.
    parent: Option<(Entry, Id)>,
    trees: TreeCache,
    counters: Arc<Counters>,
    /// The blobs of the fragments shipped since the last index file.
    fragment_packs: Arc<Mutex<Vec<PackEntry>>>,
}

/// A commit under way: the first change it carries, and when its walk began.
struct Running {
    task: JoinHandle<(Shipper, Result<Shipped, SnapshotError>)>,
    carried: Option<(Instant, Timestamp)>,
    began: Timestamp,
}

enum Shipped {
    Point { time: Timestamp, bytes: u64 },
    Unchanged,
}

impl Shipper {
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
                    self.parent = newest(&self.repo, &self.opts.snapshot.source).await?;
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
        let cap = capture(&writer, &self.opts.snapshot, parent, trees, self.counters.clone()).await?;
        if self.parent.as_ref().is_some_and(|(_, root)| *root == cap.root.id) && cap.changed.is_empty() {
            self.trees = cap.trees;
            return Ok(Shipped::Unchanged);
        }
        let durable = writer.checkpoint().await?;
        let bytes = durable.summary.new_bytes;
        let manifest = cap.manifest(&self.opts.snapshot, durable.summary.clone());
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

/// Fragments being shipped: the files they read, and when each was first written.
struct Shipping {
    task: JoinHandle<(Round, Result<Option<FragmentRef>, RepoError>)>,
    carried: Vec<(PathBuf, (Instant, Timestamp))>,
}

/// Reads what was appended to `paths` and commits it as one fragment, if any.
async fn ship_appends(
    repo: Repository,
    source: String,
    root: PathBuf,
    view: Arc<View>,
    tails: Arc<Tails>,
    paths: Vec<PathBuf>,
) -> (Round, Result<Option<FragmentRef>, RepoError>) {
    let r = repo.clone();
    let mut round = tokio::task::spawn_blocking(move || appends::prepare(&r, &root, &view, &tails, paths))
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

/// Ships `opts.snapshot.path` until `shutdown` resolves; a commit under way then
/// finishes first. The stream keeps its own `opts.snapshot.tails`.
pub async fn stream_dir(
    repo: Repository,
    mut opts: StreamOptions,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StreamError> {
    let tails = Arc::new(Tails::default());
    opts.snapshot.tails = Some(tails.clone());
    let opts = Arc::new(opts);
    let mut root = Root::find(&opts.snapshot.path)
        .map_err(|e| StreamError::Watch { path: opts.snapshot.path.clone(), cause: e.into() })?;
    let mut path = root.path.clone();
    let changes = Arc::new(Mutex::new(Changes::default()));
    let wake = Arc::new(Notify::new());
    let mut _watcher = Some(watch(&path, &opts, changes.clone(), wake.clone())?);
    // Why nothing can be shipped right now, when PATH is gone.
    let mut root_gone: Option<String> = None;
    // When PATH last named the directory watched: a change of directory after it
    // may have gone unseen, so nothing after it counts as durable.
    let mut root_confirmed = Timestamp::now();

    let state = StreamState::starting(
        opts.snapshot.source.clone(),
        opts.repository.clone(),
        "dir",
        path.to_string_lossy().into_owned(),
        opts.rpo,
    );
    let started = state.started;
    let mut health = Health::new(state, opts.rpo, opts.state_file.clone(), metrics.clone());
    // Until the first walk is done, whatever changed since the newest point is pending.
    let since = match repo.point_at(&opts.snapshot.source, started).await {
        Ok(Some(p)) => {
            health.newest_point(p.time);
            p.time
        }
        _ => started,
    };
    {
        // The first walk runs at once: only a full walk can tell what changed while stopped.
        let mut c = changes.lock().expect("changes lock");
        c.need_point((Instant::now(), since));
        c.overflowed = true;
    }

    let fragment_packs = Arc::new(Mutex::new(Vec::new()));
    let mut shipper = Some(Shipper {
        repo: repo.clone(),
        opts: opts.clone(),
        writer: None,
        parent: None,
        trees: TreeCache::default(),
        counters: Arc::new(Counters::default()),
        fragment_packs: fragment_packs.clone(),
    });
    let mut running: Option<Running> = None;
    let mut shipping: Option<Shipping> = None;
    // The newest point as the last walk saw it; fragments wait for the first walk.
    let mut view: Option<Arc<View>> = None;
    let mut next_walk = Instant::now() + opts.rescan;
    // The first fragment since the last point: a point follows `POINT_AFTER_APPENDS` later.
    let mut appended_since: Option<Instant> = None;
    let mut next_fragment = Instant::now();
    let append_delay = opts.append_interval / 2;
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut retry_at: Option<Instant> = None;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    tokio::pin!(shutdown);
    let mut stopping = false;
    let mut stop_by = Instant::now();

    loop {
        let now = Instant::now();
        let may_retry = retry_at.is_none_or(|t| now >= t);
        // Start a walk when one is due and none is running.
        if running.is_none() && !stopping && may_retry {
            let due = {
                let c = changes.lock().expect("changes lock");
                let change_due = c.first.is_some_and(|(first, _)| {
                    c.last.is_some_and(|last| now >= last + SETTLE) || now >= first + opts.max_delay()
                });
                change_due
                    || c.overflowed
                    || now >= next_walk
                    || appended_since.is_some_and(|a| now >= a + POINT_AFTER_APPENDS)
            };
            if due {
                let carried = {
                    let mut c = changes.lock().expect("changes lock");
                    c.overflowed = false;
                    c.last = None;
                    c.first.take()
                };
                let s = shipper.take().expect("the shipper is home when no walk runs");
                running = Some(Running { task: tokio::spawn(s.ship()), carried, began: Timestamp::now() });
                next_walk = now + opts.rescan;
            }
        }
        // Ship appends when the oldest has waited `append_delay`.
        if let (None, Some(v), false, true) = (&shipping, &view, stopping, may_retry) {
            let mut c = changes.lock().expect("changes lock");
            if c.written_since().is_some_and(|(first, _)| now >= first + append_delay) && now >= next_fragment {
                let carried: Vec<_> = c.written.drain().collect();
                drop(c);
                let paths = carried.iter().map(|(p, _)| p.clone()).collect();
                let task = tokio::spawn(ship_appends(
                    repo.clone(),
                    opts.snapshot.source.clone(),
                    path.clone(),
                    v.clone(),
                    tails.clone(),
                    paths,
                ));
                shipping = Some(Shipping { task, carried });
                next_fragment = now + append_delay;
            }
        }

        // When the next walk or fragment that can start is due; the heartbeat wakes
        // the loop every second anyway.
        let wait_until = {
            let c = changes.lock().expect("changes lock");
            let mut t = Instant::now() + HEARTBEAT;
            if running.is_none() {
                t = t.min(next_walk);
                if let Some((first, _)) = c.first {
                    t = t.min(first + opts.max_delay()).min(c.last.map_or(t, |l| l + SETTLE));
                }
                if let Some(a) = appended_since {
                    t = t.min(a + POINT_AFTER_APPENDS);
                }
            }
            if let (None, Some(_), Some((first, _))) = (&shipping, &view, c.written_since()) {
                t = t.min((first + append_delay).max(next_fragment));
            }
            retry_at.map_or(t, |r| t.max(r))
        };

        let mut failure: Option<String> = None;
        let mut succeeded = false;
        tokio::select! {
            _ = &mut shutdown, if !stopping => {
                stopping = true;
                if running.is_none() && shipping.is_none() {
                    break;
                }
                tracing::info!("stopping once the work under way is done (at most {} s)", STOP_GRACE.as_secs());
                stop_by = Instant::now() + STOP_GRACE;
            }
            _ = tokio::time::sleep_until(stop_by.into()), if stopping => {
                tracing::warn!("stopping without the work under way; the next run redoes it");
                if let Some(r) = running.take() {
                    r.task.abort();
                }
                if let Some(s) = shipping.take() {
                    s.task.abort();
                }
                break;
            }
            _ = wake.notified() => {}
            _ = tokio::time::sleep_until(wait_until.into()) => {}
            _ = heartbeat.tick() => {}
            done = async { (&mut running.as_mut().expect("guarded").task).await }, if running.is_some() => {
                let Running { carried, began, .. } = running.take().expect("guarded");
                let (s, result) = done.expect("the walk task panicked");
                match result {
                    Ok(shipped) => {
                        if let Shipped::Point { time, bytes } = shipped {
                            health.newest_point(time);
                            metrics.points.fetch_add(1, Ordering::Relaxed);
                            metrics.bytes_shipped.fetch_add(bytes, Ordering::Relaxed);
                        }
                        if let Some((top, _)) = &s.parent {
                            view = Some(Arc::new(View { top: top.clone(), trees: s.trees.0.clone() }));
                        }
                        appended_since = None;
                        succeeded = true;
                    }
                    Err(e) => {
                        failure = Some(format!("shipping {} failed: {e}", path.display()));
                        // What the failed walk carried is still pending; a walk that
                        // had no change to carry may have had one to find.
                        let carried = carried.unwrap_or((Instant::now(), began));
                        changes.lock().expect("changes lock").need_point(carried);
                    }
                }
                shipper = Some(s);
            }
            done = async { (&mut shipping.as_mut().expect("guarded").task).await }, if shipping.is_some() => {
                let Shipping { carried, .. } = shipping.take().expect("guarded");
                let (mut round, result) = done.expect("the append task panicked");
                let shipped = matches!(result, Ok(Some(_)));
                round.release(&tails, shipped);
                let when: HashMap<PathBuf, (Instant, Timestamp)> = carried.into_iter().collect();
                let mut c = changes.lock().expect("changes lock");
                for p in &round.needs_point {
                    c.need_point(when.get(p).copied().unwrap_or((Instant::now(), Timestamp::now())));
                }
                let again: Vec<&PathBuf> = match &result {
                    Ok(_) => round.busy.iter().collect(),
                    Err(_) => when.keys().filter(|p| !round.needs_point.contains(p)).collect(),
                };
                for p in again {
                    if let Some(t) = when.get(p) {
                        let e = c.written.entry(p.clone()).or_insert(*t);
                        *e = if e.0 <= t.0 { *e } else { *t };
                    }
                }
                drop(c);
                match result {
                    Ok(Some(f)) => {
                        tracing::debug!("fragment {}: {} bytes appended to {} files", f.time, round.bytes, round.fragment.growths.len());
                        metrics.fragments.fetch_add(1, Ordering::Relaxed);
                        fragment_packs.lock().expect("fragment packs lock").extend(round.builder.entries.drain(..));
                        metrics.bytes_shipped.fetch_add(round.builder.stored, Ordering::Relaxed);
                        appended_since.get_or_insert(Instant::now());
                    }
                    Ok(None) => {}
                    Err(e) => failure = Some(format!("shipping appends to {} failed: {e}", path.display())),
                }
                if failure.is_none() {
                    succeeded = true;
                }
            }
        }
        match failure {
            Some(why) => {
                metrics.errors.fetch_add(1, Ordering::Relaxed);
                let wait = backoff.failed(rand::random());
                tracing::error!("{why}; retrying in {:.1} s", wait.as_secs_f64());
                health.failed(why);
                retry_at = Some(Instant::now() + wait);
            }
            None if succeeded => {
                if health.recovered() {
                    tracing::info!("shipping works again");
                }
                backoff.reset();
                retry_at = None;
            }
            None => {}
        }
        if stopping && running.is_none() && shipping.is_none() {
            break;
        }

        // PATH still names the directory watched? It may have been deleted and made
        // again, renamed away and replaced, or (a symlink) pointed elsewhere: watch
        // what it names now, and walk it whole. While it names nothing, say so.
        // (A path lookup and a stat, each time the loop wakes.)
        let checked_at = Timestamp::now();
        match Root::find(&opts.snapshot.path) {
            Ok(now_root) if now_root == root && root_gone.is_none() => root_confirmed = checked_at,
            Ok(now_root) => match watch(&now_root.path, &opts, changes.clone(), wake.clone()) {
                Ok(w) => {
                    tracing::warn!(
                        "{} is another directory now ({}): watching it, and walking it whole",
                        opts.snapshot.path.display(),
                        now_root.path.display()
                    );
                    _watcher = Some(w);
                    path = now_root.path.clone();
                    health.set_path(path.to_string_lossy().into_owned());
                    root = now_root;
                    root_gone = None;
                    let mut c = changes.lock().expect("changes lock");
                    c.overflowed = true;
                    c.need_point((Instant::now(), root_confirmed));
                    root_confirmed = checked_at;
                }
                Err(e) => root_gone = Some(format!("cannot watch {}: {e}", now_root.path.display())),
            },
            Err(e) => {
                if root_gone.is_none() {
                    tracing::error!(
                        "{} is gone ({e}): nothing is shipped until it is back",
                        opts.snapshot.path.display()
                    );
                    changes.lock().expect("changes lock").need_point((Instant::now(), root_confirmed));
                    _watcher = None;
                }
                root_gone = Some(format!("{} is gone ({e}): nothing is being shipped", opts.snapshot.path.display()));
            }
        }
        if let Some(why) = &root_gone {
            health.failing(why.clone());
        }

        // Heartbeat: the lag, the alarm, the state file and the metrics.
        let now = Timestamp::now();
        // The oldest change not yet durable: the store holds everything before it.
        let pending = {
            let c = changes.lock().expect("changes lock");
            [
                c.first.map(|(_, t)| t),
                c.written_since().map(|(_, t)| t),
                running.as_ref().and_then(|r| r.carried.map(|(_, t)| t)),
                shipping.as_ref().and_then(|s| s.carried.iter().map(|(_, (_, t))| *t).min()),
            ]
            .into_iter()
            .flatten()
            .min()
        };
        // With nothing pending, what happened until just now is durable; events take
        // a moment to arrive, so "just now" is `EVENT_SLACK` ago.
        let quiet = now.checked_sub(jiff::SignedDuration::try_from(EVENT_SLACK).expect("small")).unwrap_or(now);
        let quiet = quiet.min(root_confirmed);
        health.durable_as_of(pending.map_or(quiet, |p| p.min(quiet)));
        match health.beat(now) {
            Some(Alarm::Raised { lag }) => tracing::error!(
                "{} is {:.0} s behind, past its RPO of {} s{}",
                opts.snapshot.source,
                lag.as_secs_f64(),
                opts.rpo.as_secs(),
                health.state().last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
            ),
            Some(Alarm::Cleared { lag }) => {
                tracing::info!("{} is within its RPO again ({:.1} s behind)", opts.snapshot.source, lag.as_secs_f64())
            }
            None => {}
        }
    }
    Ok(())
}

/// The directory a stream ships: what PATH resolves to, and which inode that is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Root {
    path: PathBuf,
    device: u64,
    inode: u64,
}

impl Root {
    fn find(given: &std::path::Path) -> std::io::Result<Root> {
        use std::os::unix::fs::MetadataExt;
        let path = std::fs::canonicalize(given)?;
        let m = std::fs::metadata(&path)?;
        if !m.is_dir() {
            return Err(std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"));
        }
        Ok(Root { path, device: m.dev(), inode: m.ino() })
    }
}

/// Starts watching `path`. Events in excluded paths, and reads, are ignored.
fn watch(
    path: &std::path::Path,
    opts: &StreamOptions,
    changes: Arc<Mutex<Changes>>,
    wake: Arc<Notify>,
) -> Result<notify::RecommendedWatcher, StreamError> {
    let root = path.to_path_buf();
    let excludes = opts.snapshot.excludes.clone();
    let appends = opts.snapshot.appends.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let now = (Instant::now(), Timestamp::now());
        let mut c = changes.lock().expect("changes lock");
        match res {
            Ok(ev) if ev.need_rescan() || ev.paths.is_empty() => {
                c.overflowed = true;
                c.need_point(now);
            }
            Ok(ev) => {
                if matches!(ev.kind, EventKind::Access(_)) {
                    return;
                }
                let paths: Vec<PathBuf> =
                    ev.paths.into_iter().filter(|p| !excludes.excludes(p.strip_prefix(&root).unwrap_or(p))).collect();
                if paths.is_empty() {
                    return;
                }
                // A write to an append-only file may be an append, which a fragment
                // ships; anything else (other writes, create, delete, rename,
                // attributes) needs a point.
                let appended = |p: &PathBuf| appends.excludes(p.strip_prefix(&root).unwrap_or(p));
                if matches!(ev.kind, EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any))
                    && paths.iter().all(appended)
                {
                    for p in paths {
                        if c.written.len() >= MAX_DIRTY && !c.written.contains_key(&p) {
                            c.need_point(now);
                            break;
                        }
                        c.written.entry(p).or_insert(now);
                    }
                } else {
                    c.need_point(now);
                }
            }
            Err(_) => {
                c.overflowed = true;
                c.need_point(now);
            }
        }
        drop(c);
        wake.notify_one();
    })
    .map_err(|cause| StreamError::Watch { path: path.to_path_buf(), cause })?;
    watcher
        .watch(path, RecursiveMode::Recursive)
        .map_err(|cause| StreamError::Watch { path: path.to_path_buf(), cause })?;
    Ok(watcher)
}
