//! `ebb stream dir`: a directory as a stream of recovery points.
//!
//! inotify (through `notify`) says when something changed (`changes`); a commit
//! follows once the tree has been quiet for a moment, and never later than a
//! fraction of the RPO after the first change it carries (`schedule`). A full walk
//! every `rescan` is the safety net for what inotify cannot see (overflowed queues,
//! changes on other hosts of a network filesystem). Each commit is a walk that reads
//! only files whose size, mtime, ctime or inode changed, a checkpoint of the writer
//! (packs durable, then their index) and then the point (`ship`): a kill at any
//! instant leaves a repository that verifies, and the next run starts from the
//! newest point.
//!
//! A file that was only appended to needs no point: its new bytes go out as a
//! fragment within `append_interval` (see `appends`). Points still follow every
//! other change, and at least every few minutes while files grow, so that the
//! fragments to apply after a point stay few.
//!
//! Store errors are retried with exponential backoff and jitter; nothing is lost
//! meanwhile, because the source itself holds what is pending. The lag (now minus
//! the newest durable state) is kept in the state file, the metrics and the log
//! (`health`); past the RPO the alarm fires, and it clears once caught up.
//!
//! This module runs the loop: wait for the next event, ask the schedule what to
//! do, do it.

mod changes;
mod markers;
mod schedule;
mod ship;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use catalog::{PackEntry, Repository};
use jiff::Timestamp;

use changes::{durable_as_of, Watch};
use schedule::{Decision, Pace, Schedule, Situation, STOP_GRACE};
use ship::{Appended, Committed, Running, Shipped, Shipper, Shipping};

pub use changes::StreamError;

use crate::appends::{LastWalk, Tails};
use crate::health::{Alarm, Health, HEARTBEAT};
use crate::metrics::Metrics;
use crate::snapshot::SnapshotOptions;
use crate::state::StreamState;

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

/// Ships `opts.snapshot.path` until `shutdown` resolves; a commit under way then
/// finishes first. The stream keeps its own `opts.snapshot.tails`.
pub async fn stream_dir(
    repo: Repository,
    opts: StreamOptions,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StreamError> {
    let mut stream = Stream::start(repo, opts, metrics).await?;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    tokio::pin!(shutdown);
    loop {
        let Decision { walk, appends, wake_at } = stream.schedule.decide(Instant::now(), &stream.situation());
        if walk {
            stream.start_walk();
        }
        if appends {
            stream.start_appends();
        }

        let stop_by = stream.schedule.stop_by();
        let outcome = tokio::select! {
            _ = &mut shutdown, if stop_by.is_none() => {
                if stream.idle() {
                    break;
                }
                tracing::info!("stopping once the work under way is done (at most {} s)", STOP_GRACE.as_secs());
                stream.schedule.stop(Instant::now());
                Outcome::Nothing
            }
            _ = tokio::time::sleep_until(stop_by.unwrap_or(wake_at).into()), if stop_by.is_some() => {
                tracing::warn!("stopping without the work under way; the next run redoes it");
                stream.abandon();
                break;
            }
            _ = stream.watch.woken() => Outcome::Nothing,
            _ = tokio::time::sleep_until(wake_at.into()) => Outcome::Nothing,
            _ = heartbeat.tick() => Outcome::Nothing,
            done = Running::ended(&mut stream.running), if stream.running.is_some() => stream.walk_ended(done),
            done = Shipping::ended(&mut stream.shipping), if stream.shipping.is_some() => stream.appends_ended(done),
        };
        stream.settle(outcome);
        if stream.schedule.stop_by().is_some() && stream.idle() {
            break;
        }
        stream.check_root();
        stream.heartbeat();
    }
    Ok(())
}

/// How the event the loop woke for went.
enum Outcome {
    /// Nothing ended.
    Nothing,
    /// Something was shipped (or found to need no shipping).
    Shipped,
    /// Shipping failed, for this reason.
    Failed(String),
}

/// A running stream: what it watches, what it ships, and what it tells.
struct Stream {
    repo: Repository,
    opts: Arc<StreamOptions>,
    metrics: Arc<Metrics>,
    tails: Arc<Tails>,
    watch: Watch,
    schedule: Schedule,
    health: Health,
    /// Home while no commit runs.
    shipper: Option<Shipper>,
    running: Option<Running>,
    shipping: Option<Shipping>,
    /// The newest point as the last walk saw it; fragments wait for the first walk.
    last_walk: Option<Arc<LastWalk>>,
    /// The packs of the fragments shipped since the last commit, for its index file.
    fragment_packs: Arc<Mutex<Vec<PackEntry>>>,
}

impl Stream {
    async fn start(repo: Repository, mut opts: StreamOptions, metrics: Arc<Metrics>) -> Result<Stream, StreamError> {
        let tails = Arc::new(Tails::default());
        opts.snapshot.tails = Some(tails.clone());
        let opts = Arc::new(opts);
        let snapshot = &opts.snapshot;
        let watch = Watch::start(&snapshot.path, snapshot.excludes.clone(), snapshot.appends.clone())?;
        let path = watch.path().to_string_lossy().into_owned();
        let state = StreamState::starting(snapshot.source.clone(), opts.repository.clone(), "dir", path, opts.rpo);
        let started = state.started;
        let mut health = Health::new(state, opts.rpo, opts.state_file.clone(), metrics.clone());
        // Until the first walk is done, whatever changed since the newest point is pending.
        let since = match repo.point_at(&snapshot.source, started).await {
            Ok(Some(p)) => {
                health.newest_point(p.time);
                p.time
            }
            _ => started,
        };
        // The first walk runs at once: only a full walk can tell what changed while stopped.
        watch.changes().walk_all((Instant::now(), since));

        let fragment_packs = Arc::new(Mutex::new(Vec::new()));
        let shipper = Shipper::new(repo.clone(), Arc::new(snapshot.clone()), fragment_packs.clone());
        let schedule = Schedule::new(Instant::now(), Pace::new(opts.rpo, opts.rescan, opts.append_interval));
        Ok(Stream {
            repo,
            opts,
            metrics,
            tails,
            watch,
            schedule,
            health,
            shipper: Some(shipper),
            running: None,
            shipping: None,
            last_walk: None,
            fragment_packs,
        })
    }

    /// What the schedule decides from.
    fn situation(&self) -> Situation {
        let c = self.watch.changes();
        Situation {
            first: c.first.map(|(i, _)| i),
            last: c.last,
            overflowed: c.overflowed,
            written: c.written_since().map(|(i, _)| i),
            walking: self.running.is_some(),
            appending: self.shipping.is_some(),
            can_append: self.last_walk.is_some(),
        }
    }

    fn idle(&self) -> bool {
        self.running.is_none() && self.shipping.is_none()
    }

    /// Starts a commit of every change so far.
    fn start_walk(&mut self) {
        let carried = self.watch.changes().take_for_walk();
        let shipper = self.shipper.take().expect("the shipper is home when no walk runs");
        self.running = Some(Running::start(shipper, carried));
    }

    /// Starts shipping what was appended to the files written so far.
    fn start_appends(&mut self) {
        let last_walk = self.last_walk.clone().expect("fragments wait for the first walk");
        let carried = self.watch.changes().take_written();
        let (source, root) = (self.opts.snapshot.source.clone(), self.watch.path().to_path_buf());
        self.shipping = Some(Shipping::start(self.repo.clone(), source, root, last_walk, self.tails.clone(), carried));
    }

    fn walk_ended(&mut self, done: Committed) -> Outcome {
        let Committed { shipper, result, carried, began } = done;
        let outcome = match result {
            Ok(shipped) => {
                if let Shipped::Point { time, bytes } = shipped {
                    self.health.newest_point(time);
                    self.metrics.points.fetch_add(1, Ordering::Relaxed);
                    self.metrics.bytes_shipped.fetch_add(bytes, Ordering::Relaxed);
                }
                if let Some(last_walk) = shipper.last_walk() {
                    self.last_walk = Some(Arc::new(last_walk));
                }
                self.schedule.walked();
                Outcome::Shipped
            }
            Err(e) => {
                // What the failed walk carried is still pending; a walk that had no
                // change to carry may have had one to find.
                self.watch.changes().need_point(carried.unwrap_or((Instant::now(), began)));
                Outcome::Failed(format!("shipping {} failed: {e}", self.watch.path().display()))
            }
        };
        self.shipper = Some(shipper);
        outcome
    }

    fn appends_ended(&mut self, done: Appended) -> Outcome {
        let Appended { mut round, result, carried } = done;
        round.release(&self.tails, matches!(result, Ok(Some(_))));
        self.watch.changes().appends_ended(carried, &round.needs_point, &round.busy, result.is_err());
        match result {
            Ok(Some(f)) => {
                let files = round.fragment.growths.len();
                tracing::debug!("fragment {}: {} bytes appended to {files} files", f.time, round.bytes);
                self.metrics.fragments.fetch_add(1, Ordering::Relaxed);
                self.fragment_packs.lock().expect("fragment packs lock").extend(round.builder.entries.drain(..));
                self.metrics.bytes_shipped.fetch_add(round.builder.stored, Ordering::Relaxed);
                self.schedule.appended(Instant::now());
                Outcome::Shipped
            }
            Ok(None) => Outcome::Shipped,
            Err(e) => Outcome::Failed(format!("shipping appends to {} failed: {e}", self.watch.path().display())),
        }
    }

    /// Backs off after a failure; after a success, says that shipping works again.
    fn settle(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Failed(why) => {
                self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                let wait = self.schedule.failed(Instant::now(), rand::random());
                tracing::error!("{why}; retrying in {:.1} s", wait.as_secs_f64());
                self.health.failed(why);
            }
            Outcome::Shipped => {
                if self.health.recovered() {
                    tracing::info!("shipping works again");
                }
                self.schedule.succeeded();
            }
            Outcome::Nothing => {}
        }
    }

    /// Follows PATH to the directory it names now; while it names none, the stream
    /// is failing.
    fn check_root(&mut self) {
        if self.watch.check() {
            self.health.set_path(self.watch.path().to_string_lossy().into_owned());
        }
        if let Some(why) = self.watch.gone() {
            self.health.failing(why.to_string());
        }
    }

    /// The lag, the alarm, the state file and the metrics.
    fn heartbeat(&mut self) {
        let now = Timestamp::now();
        // Up to when every change has been seen: read first, so that a change seen
        // after it (and not in `pending` below) happened after it.
        let drained = self.watch.changes().drained;
        // The oldest change not yet durable: the store holds everything before it.
        let pending = [
            self.watch.changes().oldest(),
            self.running.as_ref().and_then(Running::carries),
            self.shipping.as_ref().and_then(Shipping::carries),
        ]
        .into_iter()
        .flatten()
        .min();
        self.health.durable_as_of(durable_as_of(drained, pending, self.watch.confirmed()));
        let source = &self.opts.snapshot.source;
        match self.health.beat(now) {
            Some(Alarm::Raised { lag }) => tracing::error!(
                "{source} is {:.0} s behind, past its RPO of {} s{}",
                lag.as_secs_f64(),
                self.opts.rpo.as_secs(),
                self.health.state().last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
            ),
            Some(Alarm::Cleared { lag }) => {
                tracing::info!("{source} is within its RPO again ({:.1} s behind)", lag.as_secs_f64())
            }
            None => {}
        }
    }

    /// Gives up the work under way: the next run redoes it.
    fn abandon(&mut self) {
        if let Some(r) = self.running.take() {
            r.abort();
        }
        if let Some(s) = self.shipping.take() {
            s.abort();
        }
    }
}
