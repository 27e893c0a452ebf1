//! What changed in the directory a stream ships, and which directory that is.
//! inotify (through `notify`) reports changes; they are sorted into those that need
//! a point and writes to append-only files, which fragments may ship. PATH is looked
//! up again each time the stream wakes: it may name another directory by now.
//!
//! When a change happened, and up to when every change has been seen, come from
//! markers, not from the clock at which an event is handled (which may be seconds
//! late on a busy host): every `MARK_EVERY` the stream creates a file in a
//! directory of its own, watched by the same inotify instance. One instance queues
//! its events in order, so once marker n is seen, every change made before it was
//! created has been seen (`Changes::drained`), and a change seen after it happened
//! after it.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use notify::event::ModifyKind;
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;

use super::markers::Markers;
use crate::patterns::PathPatterns;

/// A marker is created this often: what is durable is known this late.
const MARK_EVERY: Duration = Duration::from_millis(250);
/// Files with pending appends kept by name; past this, a point takes them all.
const MAX_DIRTY: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot watch {}: {cause}", path.display())]
    Watch { path: PathBuf, cause: notify::Error },
}

/// When a change happened: by the monotonic clock, for deadlines, and by the wall
/// clock, for what is durable.
pub(super) type When = (Instant, Timestamp);

/// What the watcher reports: the first change not yet shipped, and the latest.
pub(super) struct Changes {
    /// Every change made before this has been seen: the time of the last marker
    /// seen (at first, when watching began).
    pub(super) drained: Timestamp,
    /// Markers created and not yet seen, with when they were created.
    marks: VecDeque<(u64, Timestamp)>,
    /// Changes that need a point.
    pub(super) first: Option<When>,
    pub(super) last: Option<Instant>,
    /// inotify lost events: only a full walk can tell what changed.
    pub(super) overflowed: bool,
    /// Files written to, maybe only appended to, and when they first were.
    written: HashMap<PathBuf, When>,
}

impl Changes {
    pub(super) fn new(started: Timestamp) -> Changes {
        Changes {
            drained: started,
            marks: VecDeque::new(),
            first: None,
            last: None,
            overflowed: false,
            written: HashMap::new(),
        }
    }

    /// When a change seen now happened, at the earliest: after the last marker seen.
    fn seen_now(&self) -> When {
        (Instant::now(), self.drained)
    }

    /// Marker `n` was created at `at`.
    fn marked(&mut self, n: u64, at: Timestamp) {
        self.marks.push_back((n, at));
    }

    /// Marker `n` was seen: everything before it was.
    fn marker_seen(&mut self, n: u64) {
        while let Some(&(m, at)) = self.marks.front() {
            if m > n {
                break;
            }
            self.marks.pop_front();
            self.drained = self.drained.max(at);
        }
    }

    pub(super) fn need_point(&mut self, at: When) {
        self.first = Some(match self.first {
            Some(f) if f.0 <= at.0 => f,
            _ => at,
        });
        self.last = Some(self.last.map_or(at.0, |l| l.max(at.0)));
    }

    /// Something changed at `at` that only a full walk can find.
    pub(super) fn walk_all(&mut self, at: When) {
        self.overflowed = true;
        self.need_point(at);
    }

    /// The first write not yet shipped.
    pub(super) fn written_since(&self) -> Option<When> {
        self.written.values().min_by_key(|(i, _)| *i).copied()
    }

    /// The oldest change not yet shipped.
    pub(super) fn oldest(&self) -> Option<Timestamp> {
        [self.first.map(|(_, t)| t), self.written_since().map(|(_, t)| t)].into_iter().flatten().min()
    }

    /// What a walk starting now carries: every change that needs a point, from the
    /// first one on.
    pub(super) fn take_for_walk(&mut self) -> Option<When> {
        self.overflowed = false;
        self.last = None;
        self.first.take()
    }

    /// What fragments starting now carry: the files written to, and when they first were.
    pub(super) fn take_written(&mut self) -> Vec<(PathBuf, When)> {
        self.written.drain().collect()
    }

    /// After a round of fragments that carried these files: those that changed in
    /// ways only a point can hold need one, and those it could not read (being
    /// walked) or could not ship (it `failed`) wait for the next round.
    pub(super) fn appends_ended(
        &mut self,
        carried: Vec<(PathBuf, When)>,
        needs_point: &[PathBuf],
        busy: &[PathBuf],
        failed: bool,
    ) {
        let when: HashMap<PathBuf, When> = carried.into_iter().collect();
        for p in needs_point {
            let seen = self.seen_now();
            self.need_point(when.get(p).copied().unwrap_or(seen));
        }
        let again: Vec<&PathBuf> = match failed {
            false => busy.iter().collect(),
            true => when.keys().filter(|p| !needs_point.contains(p)).collect(),
        };
        for p in again {
            if let Some(t) = when.get(p) {
                let e = self.written.entry(p.clone()).or_insert(*t);
                *e = if e.0 <= t.0 { *e } else { *t };
            }
        }
    }
}

/// What is durable: everything before the oldest change still `pending`. With
/// nothing pending, what happened until every change was seen (`drained`). Never
/// anything after PATH was last `confirmed` to name the directory watched.
pub(super) fn durable_as_of(drained: Timestamp, pending: Option<Timestamp>, confirmed: Timestamp) -> Timestamp {
    let quiet = drained.min(confirmed);
    pending.map_or(quiet, |p| p.min(quiet))
}

/// The directory PATH names, watched: its changes, and whether PATH still names it.
pub(super) struct Watch {
    /// PATH, as given.
    given: PathBuf,
    excludes: Arc<PathPatterns>,
    appends: Arc<PathPatterns>,
    root: Root,
    watcher: Option<notify::RecommendedWatcher>,
    changes: Arc<Mutex<Changes>>,
    wake: Arc<Notify>,
    /// Why nothing can be shipped right now, when PATH is gone.
    gone: Option<String>,
    /// When PATH last named the directory watched: a change of directory after it
    /// may have gone unseen, so nothing after it counts as durable.
    confirmed: Timestamp,
    /// Where markers are created; the task that creates them.
    markers: Markers,
    marking: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.marking.abort();
    }
}

impl Watch {
    /// Starts watching the directory `given` names. Events in `excludes`, and reads,
    /// are ignored; writes to `appends` may be appends.
    pub(super) fn start(
        given: &Path,
        excludes: Arc<PathPatterns>,
        appends: Arc<PathPatterns>,
    ) -> Result<Watch, StreamError> {
        let root = Root::find(given).map_err(|e| StreamError::Watch { path: given.to_path_buf(), cause: e.into() })?;
        let changes = Arc::new(Mutex::new(Changes::new(Timestamp::now())));
        let wake = Arc::new(Notify::new());
        let markers =
            Markers::create().map_err(|e| StreamError::Watch { path: std::env::temp_dir(), cause: e.into() })?;
        let watcher = watch(&root.path, markers.path(), &excludes, &appends, changes.clone(), wake.clone())?;
        let marking = tokio::spawn(mark(markers.path().to_path_buf(), changes.clone()));
        Ok(Watch {
            given: given.to_path_buf(),
            excludes,
            appends,
            root,
            watcher: Some(watcher),
            changes,
            wake,
            gone: None,
            confirmed: Timestamp::now(),
            markers,
            marking,
        })
    }

    /// The directory watched.
    pub(super) fn path(&self) -> &Path {
        &self.root.path
    }

    pub(super) fn changes(&self) -> MutexGuard<'_, Changes> {
        self.changes.lock().expect("changes lock")
    }

    /// Resolves once a change was reported since the last time it resolved.
    pub(super) async fn woken(&self) {
        self.wake.notified().await
    }

    /// Why nothing can be shipped, while PATH names no directory that can be watched.
    pub(super) fn gone(&self) -> Option<&str> {
        self.gone.as_deref()
    }

    /// When PATH last named the directory watched.
    pub(super) fn confirmed(&self) -> Timestamp {
        self.confirmed
    }

    /// Whether PATH still names the directory watched. It may have been deleted and
    /// made again, renamed away and replaced, or (a symlink) pointed elsewhere: then
    /// what it names now is watched, and walked whole, and this says true. While it
    /// names nothing, `gone` says so. (A path lookup and a stat.)
    pub(super) fn check(&mut self) -> bool {
        let checked_at = Timestamp::now();
        match Root::find(&self.given) {
            Ok(now_root) if now_root == self.root && self.gone.is_none() => self.confirmed = checked_at,
            Ok(now_root) => {
                let markers = self.markers.path();
                match watch(
                    &now_root.path,
                    markers,
                    &self.excludes,
                    &self.appends,
                    self.changes.clone(),
                    self.wake.clone(),
                ) {
                    Ok(w) => {
                        tracing::warn!(
                            "{} is another directory now ({}): watching it, and walking it whole",
                            self.given.display(),
                            now_root.path.display()
                        );
                        self.watcher = Some(w);
                        self.root = now_root;
                        self.gone = None;
                        self.changes().walk_all((Instant::now(), self.confirmed));
                        self.confirmed = checked_at;
                        return true;
                    }
                    Err(e) => self.gone = Some(format!("cannot watch {}: {e}", now_root.path.display())),
                }
            }
            Err(e) => {
                if self.gone.is_none() {
                    tracing::error!("{} is gone ({e}): nothing is shipped until it is back", self.given.display());
                    self.changes().need_point((Instant::now(), self.confirmed));
                    self.watcher = None;
                }
                self.gone = Some(format!("{} is gone ({e}): nothing is being shipped", self.given.display()));
            }
        }
        false
    }
}

/// The directory a stream ships: what PATH resolves to, and which inode that is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Root {
    path: PathBuf,
    device: u64,
    inode: u64,
}

impl Root {
    fn find(given: &Path) -> std::io::Result<Root> {
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
    path: &Path,
    markers: &Path,
    excludes: &Arc<PathPatterns>,
    appends: &Arc<PathPatterns>,
    changes: Arc<Mutex<Changes>>,
    wake: Arc<Notify>,
) -> Result<notify::RecommendedWatcher, StreamError> {
    let root = path.to_path_buf();
    let marker_dir = markers.to_path_buf();
    let excludes = excludes.clone();
    let appends = appends.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let mut c = changes.lock().expect("changes lock");
        if let Ok(ev) = &res {
            if ev.paths.first().is_some_and(|p| p.starts_with(&marker_dir)) {
                if matches!(ev.kind, EventKind::Create(_)) {
                    let n = ev.paths[0].file_name().and_then(|n| n.to_str()).and_then(|n| n.parse().ok());
                    if let Some(n) = n {
                        c.marker_seen(n);
                    }
                }
                return;
            }
        }
        let now = c.seen_now();
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
                    ev.paths.into_iter().filter(|p| !excludes.matches(p.strip_prefix(&root).unwrap_or(p))).collect();
                if paths.is_empty() {
                    return;
                }
                // A write to an append-only file may be an append, which a fragment
                // ships; anything else (other writes, create, delete, rename,
                // attributes) needs a point.
                let appended = |p: &PathBuf| appends.matches(p.strip_prefix(&root).unwrap_or(p));
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
        .watch(markers, RecursiveMode::NonRecursive)
        .map_err(|cause| StreamError::Watch { path: markers.to_path_buf(), cause })?;
    watcher
        .watch(path, RecursiveMode::Recursive)
        .map_err(|cause| StreamError::Watch { path: path.to_path_buf(), cause })?;
    Ok(watcher)
}

/// Creates marker `n` in `dir` every `MARK_EVERY`, and removes the one before.
async fn mark(dir: PathBuf, changes: Arc<Mutex<Changes>>) {
    let mut tick = tokio::time::interval(MARK_EVERY);
    for n in 1u64.. {
        tick.tick().await;
        changes.lock().expect("changes lock").marked(n, Timestamp::now());
        if let Err(e) = std::fs::File::create(dir.join(n.to_string())) {
            tracing::warn!("cannot create the stream's marker in {}: {e}", dir.display());
        }
        let _ = std::fs::remove_file(dir.join((n - 1).to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: When, ms: u64) -> When {
        (t0.0 + Duration::from_millis(ms), t0.1 + jiff::SignedDuration::from_millis(ms as i64))
    }

    #[test]
    fn a_walk_carries_the_first_change_and_clears_the_rest() {
        let t0 = (Instant::now(), Timestamp::now());
        let mut c = Changes::new(t0.1);
        for ms in [200, 100, 300] {
            c.need_point(at(t0, ms));
        }
        assert_eq!((c.first, c.last), (Some(at(t0, 100)), Some(at(t0, 300).0)));
        c.walk_all(at(t0, 400));
        assert_eq!(c.oldest(), Some(at(t0, 100).1));
        assert_eq!(c.take_for_walk(), Some(at(t0, 100)));
        assert!(!c.overflowed && c.first.is_none() && c.last.is_none());
        assert_eq!(c.oldest(), None);
    }

    #[test]
    fn after_fragments_what_they_did_not_ship_waits_again() {
        let t0 = (Instant::now(), Timestamp::now());
        let (a, b, d) = (PathBuf::from("a"), PathBuf::from("b"), PathBuf::from("d"));
        let carried = || vec![(a.clone(), at(t0, 10)), (b.clone(), at(t0, 20)), (d.clone(), at(t0, 30))];

        // Shipped: `b` needs a point from when it was written, `d` was being walked.
        let mut c = Changes::new(t0.1);
        c.written.insert(d.clone(), at(t0, 500));
        c.appends_ended(carried(), std::slice::from_ref(&b), std::slice::from_ref(&d), false);
        assert_eq!(c.first, Some(at(t0, 20)));
        assert_eq!(c.take_written(), vec![(d.clone(), at(t0, 30))], "the earlier write counts");

        // Failed: everything but what needs a point is written again.
        let mut c = Changes::new(t0.1);
        c.appends_ended(carried(), std::slice::from_ref(&b), &[], true);
        let mut again = c.take_written();
        again.sort();
        assert_eq!(again, vec![(a, at(t0, 10)), (d, at(t0, 30))]);
        assert_eq!(c.oldest(), Some(at(t0, 20).1));
    }

    #[test]
    fn durable_is_the_oldest_pending_change_or_the_last_marker_never_after_path_was_checked() {
        let now = Timestamp::now();
        let ago = |ms: i64| now - jiff::SignedDuration::from_millis(ms);
        assert_eq!(durable_as_of(ago(250), None, now), ago(250), "until the last marker seen");
        assert_eq!(durable_as_of(now, Some(ago(3000)), now), ago(3000));
        assert_eq!(durable_as_of(now, None, ago(2000)), ago(2000));
        assert_eq!(durable_as_of(now, Some(ago(100)), ago(2000)), ago(2000));
    }

    /// A change seen late (the handler held up, as on a busy host) counts from the
    /// last marker seen before it, and nothing after it is durable until it is
    /// shipped: the handler is held up here by holding the lock it needs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_seen_late_is_never_taken_for_durable() {
        let dir = tempfile::tempdir().unwrap();
        let watch =
            Watch::start(dir.path(), Arc::new(PathPatterns::default()), Arc::new(PathPatterns::default())).unwrap();
        // Markers flow: what is durable follows the clock.
        tokio::time::sleep(MARK_EVERY * 4).await;
        let before = Timestamp::now();
        assert!(watch.changes().drained > before - jiff::SignedDuration::from_secs(1));
        let held = watch.changes();
        let changed = Timestamp::now();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        // Events (the change, then markers) queue while the handler waits.
        std::thread::sleep(Duration::from_millis(1500));
        drop(held);
        let durable = {
            let c = watch.changes();
            durable_as_of(c.drained, c.oldest(), Timestamp::now())
        };
        assert!(durable <= changed, "durable as of {durable}, but a change at {changed} is not shipped");
        // Once seen, it is pending from a time before it really happened.
        let deadline = Instant::now() + Duration::from_secs(10);
        while watch.changes().oldest().is_none() {
            assert!(Instant::now() < deadline, "the change was never seen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let c = watch.changes();
        assert!(c.oldest().unwrap() <= changed);
        assert!(durable_as_of(c.drained, c.oldest(), Timestamp::now()) <= changed);
    }
}
