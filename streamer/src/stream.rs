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
//! Store errors are retried with exponential backoff and jitter; nothing is lost
//! meanwhile, because the source itself holds what is pending. The lag (now minus
//! the newest durable state) is kept in the state file, the metrics and the log;
//! past the RPO the alarm fires, and it clears once caught up.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use catalog::tree::Entry;
use catalog::{Id, Repository, Writer};
use jiff::Timestamp;
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::snapshot::{capture, Counters, SnapshotError, SnapshotOptions, TreeCache};
use crate::state::{self, StreamState};

/// A commit waits for the tree to be quiet this long.
const SETTLE: Duration = Duration::from_millis(500);
/// Retries after a failure wait from this long...
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// ...doubling up to this.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How often the state file, the metrics and the alarm are brought up to date.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// On SIGINT/SIGTERM a commit under way may finish for this long.
const STOP_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct StreamOptions {
    pub snapshot: SnapshotOptions,
    /// The repository URL, for the state file.
    pub repository: String,
    pub rpo: Duration,
    /// A full walk at least this often, changes seen or not.
    pub rescan: Duration,
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
    first: Option<(Instant, Timestamp)>,
    last: Option<Instant>,
    /// inotify lost events: only a full walk can tell what changed.
    overflowed: bool,
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
                self.writer = Some(w.clone());
                w
            }
        };
        let trees = std::mem::take(&mut self.trees);
        let parent = self.parent.as_ref().map(|(e, _)| e.clone());
        let cap = capture(&writer, &self.opts.snapshot, parent, trees, self.counters.clone()).await?;
        if self.parent.as_ref().is_some_and(|(_, root)| *root == cap.root.id) && cap.changed.is_empty() {
            self.trees = cap.trees;
            return Ok(Shipped::Unchanged);
        }
        let summary = writer.checkpoint().await?;
        let bytes = summary.new_bytes;
        let manifest = cap.manifest(&self.opts.snapshot, summary);
        let point = self.repo.commit_point(&manifest, cap.started).await?;
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

/// Ships `opts.snapshot.path` until `shutdown` resolves; a commit under way then
/// finishes first.
pub async fn stream_dir(
    repo: Repository,
    opts: StreamOptions,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StreamError> {
    let opts = Arc::new(opts);
    let path = std::fs::canonicalize(&opts.snapshot.path)
        .map_err(|e| StreamError::Watch { path: opts.snapshot.path.clone(), cause: e.into() })?;
    let changes = Arc::new(Mutex::new(Changes::default()));
    let wake = Arc::new(Notify::new());
    let _watcher = watch(&path, &opts, changes.clone(), wake.clone())?;

    let started = Timestamp::now();
    let mut state = StreamState {
        source: opts.snapshot.source.clone(),
        repository: opts.repository.clone(),
        kind: "dir".into(),
        path: path.to_string_lossy().into_owned(),
        pid: std::process::id(),
        rpo_secs: opts.rpo.as_secs(),
        started,
        updated: started,
        // Nothing is known to be durable until the first walk says so.
        durable_as_of: started,
        newest_point: None,
        last_error: None,
        last_error_at: None,
    };
    if let Some(p) = repo.point_at(&opts.snapshot.source, started).await.ok().flatten() {
        state.durable_as_of = p.time;
        state.newest_point = Some(p.time);
    }

    let mut shipper = Some(Shipper {
        repo,
        opts: opts.clone(),
        writer: None,
        parent: None,
        trees: TreeCache::default(),
        counters: Arc::new(Counters::default()),
    });
    let mut running: Option<Running> = None;
    // The first walk runs at once: it catches up with whatever changed while stopped.
    let mut next_walk = Instant::now();
    let mut backoff = BACKOFF_MIN;
    let mut retry_at: Option<Instant> = None;
    let mut breached = false;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    tokio::pin!(shutdown);
    let mut stopping = false;
    let mut stop_by = Instant::now();

    loop {
        // Start a commit when one is due and none is running.
        if running.is_none() && !stopping {
            let now = Instant::now();
            let due = {
                let c = changes.lock().expect("changes lock");
                let change_due = c.first.is_some_and(|(first, _)| {
                    c.last.is_some_and(|last| now >= last + SETTLE) || now >= first + opts.max_delay()
                });
                change_due || c.overflowed || now >= next_walk
            };
            if due && retry_at.is_none_or(|t| now >= t) {
                let carried = {
                    let mut c = changes.lock().expect("changes lock");
                    c.overflowed = false;
                    c.last = None;
                    c.first.take()
                };
                let s = shipper.take().expect("the shipper is home when no commit runs");
                running = Some(Running { task: tokio::spawn(s.ship()), carried, began: Timestamp::now() });
                next_walk = now + opts.rescan;
            }
        }

        let wait_until = {
            let c = changes.lock().expect("changes lock");
            let mut t = next_walk;
            if let Some((first, _)) = c.first {
                t = t.min(first + opts.max_delay()).min(c.last.map_or(t, |l| l + SETTLE));
            }
            retry_at.map_or(t, |r| t.max(r))
        };

        tokio::select! {
            _ = &mut shutdown, if !stopping => {
                stopping = true;
                if running.is_none() {
                    break;
                }
                tracing::info!("stopping once the commit under way is done (at most {} s)", STOP_GRACE.as_secs());
                stop_by = Instant::now() + STOP_GRACE;
            }
            _ = tokio::time::sleep_until(stop_by.into()), if stopping => {
                tracing::warn!("stopping without the commit under way; the next run redoes it");
                if let Some(r) = running.take() {
                    r.task.abort();
                }
                break;
            }
            _ = wake.notified() => {}
            _ = tokio::time::sleep_until(wait_until.into()), if running.is_none() => {}
            _ = heartbeat.tick() => {}
            done = async { (&mut running.as_mut().expect("guarded").task).await }, if running.is_some() => {
                let Running { carried, began, .. } = running.take().expect("guarded");
                let (s, result) = done.expect("the commit task panicked");
                shipper = Some(s);
                match result {
                    Ok(shipped) => {
                        // Everything the source held when the walk began is durable now.
                        state.durable_as_of = state.durable_as_of.max(began);
                        if let Shipped::Point { time, bytes } = shipped {
                            state.newest_point = Some(time);
                            metrics.points.fetch_add(1, Ordering::Relaxed);
                            metrics.bytes_shipped.fetch_add(bytes, Ordering::Relaxed);
                        }
                        if state.last_error.is_some() {
                            tracing::info!("shipping works again");
                        }
                        state.last_error = None;
                        backoff = BACKOFF_MIN;
                        retry_at = None;
                    }
                    Err(e) => {
                        metrics.errors.fetch_add(1, Ordering::Relaxed);
                        let wait = jitter(backoff);
                        tracing::error!("shipping {} failed, retrying in {:.1} s: {e}", path.display(), wait.as_secs_f64());
                        state.last_error = Some(e.to_string());
                        state.last_error_at = Some(Timestamp::now());
                        retry_at = Some(Instant::now() + wait);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        // What the failed commit carried is still pending; a walk that
                        // had no change to carry may have had one to find.
                        let carried = carried.or(Some((Instant::now(), began)));
                        let mut c = changes.lock().expect("changes lock");
                        c.first = match (carried, c.first) {
                            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
                            (a, b) => a.or(b),
                        };
                    }
                }
                if stopping {
                    break;
                }
            }
        }

        // Heartbeat: the lag, the alarm, the state file and the metrics.
        let now = Timestamp::now();
        let pending = changes.lock().expect("changes lock").first.map(|(_, t)| t);
        // Caught up: nothing pending and nothing being shipped, so the store holds the
        // source as it is now.
        if pending.is_none() && running.is_none() && state.last_error.is_none() {
            state.durable_as_of = now;
        }
        state.updated = now;
        let lag = state.lag(now);
        let over = lag > opts.rpo;
        if over && !breached {
            tracing::error!(
                "{} is {:.0} s behind, past its RPO of {} s{}",
                opts.snapshot.source,
                lag.as_secs_f64(),
                opts.rpo.as_secs(),
                state.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
            );
        } else if !over && breached {
            tracing::info!("{} is within its RPO again ({:.1} s behind)", opts.snapshot.source, lag.as_secs_f64());
        }
        breached = over;
        metrics.lag_ms.store(lag.as_millis() as u64, Ordering::Relaxed);
        metrics.breached.store(over, Ordering::Relaxed);
        metrics.durable_ms.store((state.durable_as_of.as_millisecond()).max(0) as u64, Ordering::Relaxed);
        if let Some(f) = &opts.state_file {
            if let Err(e) = state::write(f, &state) {
                tracing::warn!("cannot write the state file {}: {e}", f.display());
            }
        }
    }
    Ok(())
}

/// `d` scaled by a random factor in [0.5, 1.5), so that many streams that failed
/// together do not retry together.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + rand::random::<f64>())
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
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let relevant = match &res {
            Ok(ev) => {
                if matches!(ev.kind, EventKind::Access(_)) {
                    return;
                }
                ev.need_rescan()
                    || ev.paths.is_empty()
                    || ev.paths.iter().any(|p| !excludes.excludes(p.strip_prefix(&root).unwrap_or(p)))
            }
            Err(_) => true,
        };
        if !relevant {
            return;
        }
        let mut c = changes.lock().expect("changes lock");
        let now = Instant::now();
        if res.as_ref().map_or(true, |ev| ev.need_rescan()) {
            c.overflowed = true;
        }
        c.first.get_or_insert((now, Timestamp::now()));
        c.last = Some(now);
        drop(c);
        wake.notify_one();
    })
    .map_err(|cause| StreamError::Watch { path: path.to_path_buf(), cause })?;
    watcher
        .watch(path, RecursiveMode::Recursive)
        .map_err(|cause| StreamError::Watch { path: path.to_path_buf(), cause })?;
    Ok(watcher)
}
