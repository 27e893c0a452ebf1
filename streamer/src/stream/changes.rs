//! What changed in the directory a stream ships, and which directory that is.
//! inotify (through `notify`) reports changes; they are sorted into those that need
//! a point and writes to append-only files, which fragments may ship. PATH is looked
//! up again each time the stream wakes: it may name another directory by now.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use notify::event::ModifyKind;
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;

use crate::patterns::PathPatterns;

/// inotify events reach the stream within this long of the change.
const EVENT_SLACK: Duration = Duration::from_millis(500);
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
#[derive(Default)]
pub(super) struct Changes {
    /// Changes that need a point.
    pub(super) first: Option<When>,
    pub(super) last: Option<Instant>,
    /// inotify lost events: only a full walk can tell what changed.
    pub(super) overflowed: bool,
    /// Files written to, maybe only appended to, and when they first were.
    written: HashMap<PathBuf, When>,
}

impl Changes {
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
            self.need_point(when.get(p).copied().unwrap_or((Instant::now(), Timestamp::now())));
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

/// What is durable at `now`: everything before the oldest change still `pending`.
/// With nothing pending, what happened until just now; events take a moment to
/// arrive, so "just now" is `EVENT_SLACK` ago. Never anything after PATH was last
/// `confirmed` to name the directory watched.
pub(super) fn durable_as_of(now: Timestamp, pending: Option<Timestamp>, confirmed: Timestamp) -> Timestamp {
    let quiet = now.checked_sub(jiff::SignedDuration::try_from(EVENT_SLACK).expect("small")).unwrap_or(now);
    let quiet = quiet.min(confirmed);
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
        let changes = Arc::new(Mutex::new(Changes::default()));
        let wake = Arc::new(Notify::new());
        let watcher = watch(&root.path, &excludes, &appends, changes.clone(), wake.clone())?;
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
                match watch(&now_root.path, &self.excludes, &self.appends, self.changes.clone(), self.wake.clone()) {
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
    excludes: &Arc<PathPatterns>,
    appends: &Arc<PathPatterns>,
    changes: Arc<Mutex<Changes>>,
    wake: Arc<Notify>,
) -> Result<notify::RecommendedWatcher, StreamError> {
    let root = path.to_path_buf();
    let excludes = excludes.clone();
    let appends = appends.clone();
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
        .watch(path, RecursiveMode::Recursive)
        .map_err(|cause| StreamError::Watch { path: path.to_path_buf(), cause })?;
    Ok(watcher)
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
        let mut c = Changes::default();
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
        let mut c = Changes::default();
        c.written.insert(d.clone(), at(t0, 500));
        c.appends_ended(carried(), std::slice::from_ref(&b), std::slice::from_ref(&d), false);
        assert_eq!(c.first, Some(at(t0, 20)));
        assert_eq!(c.take_written(), vec![(d.clone(), at(t0, 30))], "the earlier write counts");

        // Failed: everything but what needs a point is written again.
        let mut c = Changes::default();
        c.appends_ended(carried(), std::slice::from_ref(&b), &[], true);
        let mut again = c.take_written();
        again.sort();
        assert_eq!(again, vec![(a, at(t0, 10)), (d, at(t0, 30))]);
        assert_eq!(c.oldest(), Some(at(t0, 20).1));
    }

    #[test]
    fn durable_is_the_oldest_pending_change_or_just_now_never_after_path_was_checked() {
        let now = Timestamp::now();
        let ago = |ms: i64| now - jiff::SignedDuration::from_millis(ms);
        assert_eq!(durable_as_of(now, None, now), ago(500), "events take a moment to arrive");
        assert_eq!(durable_as_of(now, Some(ago(3000)), now), ago(3000));
        assert_eq!(durable_as_of(now, None, ago(2000)), ago(2000));
        assert_eq!(durable_as_of(now, Some(ago(100)), ago(2000)), ago(2000));
    }
}
