//! When a stream does what. Pure: told the time, the changes waiting and what
//! runs, it says whether to start a walk (for a point) and whether to ship appends
//! (fragments), and until when the stream may sleep. It keeps the deadlines: the
//! next full walk, the next fragment, the point that follows appends, the retry
//! after a failure, and the end of the grace given to work under way at a stop.
//!
//! A point follows a change once the tree has been quiet for `SETTLE`, and never
//! later than `Pace::max_delay` after the first change it carries; a full walk
//! follows at least every `rescan`, changes seen or not. Appends wait half the
//! append interval, so that they are shipped within it; while files only grow, a
//! point still follows every `POINT_AFTER_APPENDS`, so that the fragments to apply
//! after a point stay few.

use std::time::{Duration, Instant};

use crate::health::{Backoff, HEARTBEAT};

/// A commit waits for the tree to be quiet this long.
const SETTLE: Duration = Duration::from_millis(500);
/// The longest a change waits for its commit, whatever the RPO.
const MAX_DELAY: Duration = Duration::from_secs(15);
/// While files only grow, a point still follows this long after the first fragment.
const POINT_AFTER_APPENDS: Duration = Duration::from_secs(300);
/// Retries after a failure wait from this long...
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// ...doubling up to this.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// On SIGINT/SIGTERM a commit under way may finish for this long.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(30);

/// How fast a stream ships, from its options.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pace {
    /// The longest a change waits for its commit.
    max_delay: Duration,
    /// A full walk at least this often.
    rescan: Duration,
    /// Appends wait this long for their fragment.
    append_delay: Duration,
}

impl Pace {
    /// A change waits for its commit a quarter of the `rpo`, at most 15 s; appends
    /// are shipped within `append_interval`.
    pub(super) fn new(rpo: Duration, rescan: Duration, append_interval: Duration) -> Pace {
        Pace { max_delay: (rpo / 4).clamp(SETTLE, MAX_DELAY), rescan, append_delay: append_interval / 2 }
    }
}

/// What the schedule decides from, besides the time: the changes waiting and what
/// runs.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Situation {
    /// The first change waiting for a point, and the latest.
    pub(super) first: Option<Instant>,
    pub(super) last: Option<Instant>,
    /// Changes were lost: only a full walk can tell what changed.
    pub(super) overflowed: bool,
    /// The first write to an append-only file not yet shipped.
    pub(super) written: Option<Instant>,
    /// A walk runs.
    pub(super) walking: bool,
    /// Fragments are being shipped.
    pub(super) appending: bool,
    /// A walk has shipped: fragments have a point to extend.
    pub(super) can_append: bool,
}

/// What to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Decision {
    /// Start a walk, for a point.
    pub(super) walk: bool,
    /// Start shipping appends.
    pub(super) appends: bool,
    /// Ask again by then, if nothing happened before.
    pub(super) wake_at: Instant,
}

/// The deadlines of one stream.
#[derive(Debug, Clone)]
pub(super) struct Schedule {
    pace: Pace,
    /// The next full walk, changes seen or not.
    next_walk: Instant,
    /// Fragments start no sooner than this after the last ones started.
    next_fragment: Instant,
    /// The first fragment since the last point: a point follows `POINT_AFTER_APPENDS` later.
    appended_since: Option<Instant>,
    /// After a failure, nothing starts before this.
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// Stopping: the work under way may finish until then.
    stop_by: Option<Instant>,
}

impl Schedule {
    pub(super) fn new(now: Instant, pace: Pace) -> Schedule {
        Schedule {
            pace,
            next_walk: now + pace.rescan,
            next_fragment: now,
            appended_since: None,
            retry_at: None,
            backoff: Backoff::new(BACKOFF_MIN, BACKOFF_MAX),
            stop_by: None,
        }
    }

    /// What to start at `now`; what it says to start counts as started.
    pub(super) fn decide(&mut self, now: Instant, s: &Situation) -> Decision {
        let may_start = self.stop_by.is_none() && self.retry_at.is_none_or(|t| now >= t);
        let walk = may_start && !s.walking && self.walk_due(now, s);
        if walk {
            self.next_walk = now + self.pace.rescan;
        }
        let appends = may_start
            && !s.appending
            && s.can_append
            && s.written.is_some_and(|first| now >= first + self.pace.append_delay)
            && now >= self.next_fragment;
        if appends {
            self.next_fragment = now + self.pace.append_delay;
        }
        let wake_at = self.wake_at(now, s, s.walking || walk, s.appending || appends);
        Decision { walk, appends, wake_at }
    }

    fn walk_due(&self, now: Instant, s: &Situation) -> bool {
        let change_due = s
            .first
            .is_some_and(|first| s.last.is_some_and(|last| now >= last + SETTLE) || now >= first + self.pace.max_delay);
        change_due
            || s.overflowed
            || now >= self.next_walk
            || self.appended_since.is_some_and(|a| now >= a + POINT_AFTER_APPENDS)
    }

    /// When the next walk or fragment that can start is due; the heartbeat wakes the
    /// stream every second anyway, and nothing starts before a retry is due.
    fn wake_at(&self, now: Instant, s: &Situation, walking: bool, appending: bool) -> Instant {
        let mut t = now + HEARTBEAT;
        if !walking {
            t = t.min(self.next_walk);
            if let Some(first) = s.first {
                t = t.min(first + self.pace.max_delay);
                if let Some(last) = s.last {
                    t = t.min(last + SETTLE);
                }
            }
            if let Some(a) = self.appended_since {
                t = t.min(a + POINT_AFTER_APPENDS);
            }
        }
        if let (false, true, Some(first)) = (appending, s.can_append, s.written) {
            t = t.min((first + self.pace.append_delay).max(self.next_fragment));
        }
        self.retry_at.map_or(t, |r| t.max(r))
    }

    /// A walk shipped (a point, or nothing had changed): the fragments so far are
    /// behind a point.
    pub(super) fn walked(&mut self) {
        self.appended_since = None;
    }

    /// Fragments were shipped at `now`: a point follows within `POINT_AFTER_APPENDS`.
    pub(super) fn appended(&mut self, now: Instant) {
        self.appended_since.get_or_insert(now);
    }

    /// Shipping failed at `now`: nothing starts again before the wait this returns,
    /// which backs off, with `random` in [0, 1) as its jitter.
    pub(super) fn failed(&mut self, now: Instant, random: f64) -> Duration {
        let wait = self.backoff.failed(random);
        self.retry_at = Some(now + wait);
        wait
    }

    /// Shipping works: no wait, and the next failure backs off from the start.
    pub(super) fn succeeded(&mut self) {
        self.backoff.reset();
        self.retry_at = None;
    }

    /// Stop at `now`: nothing new starts, and the work under way may finish within
    /// `STOP_GRACE`.
    pub(super) fn stop(&mut self, now: Instant) {
        self.stop_by.get_or_insert(now + STOP_GRACE);
    }

    /// When the work under way is given up, once stopping.
    pub(super) fn stop_by(&self) -> Option<Instant> {
        self.stop_by
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);

    /// A stream with an RPO of 60 s (changes wait at most 15 s), a full walk every
    /// hour and appends shipped within 2 s; and the instant it started.
    fn stream() -> (Schedule, Instant) {
        let t0 = Instant::now();
        (Schedule::new(t0, Pace::new(60 * S, 3600 * S, 2 * S)), t0)
    }

    fn idle() -> Situation {
        Situation { can_append: true, ..Situation::default() }
    }

    #[test]
    fn the_pace_follows_the_rpo_within_bounds() {
        assert_eq!(Pace::new(60 * S, S, 2 * S).max_delay, 15 * S);
        assert_eq!(Pace::new(600 * S, S, 2 * S).max_delay, 15 * S);
        assert_eq!(Pace::new(20 * S, S, 2 * S).max_delay, 5 * S);
        assert_eq!(Pace::new(S, S, 2 * S).max_delay, SETTLE);
        assert_eq!(Pace::new(S, S, 2 * S).append_delay, S);
    }

    #[test]
    fn with_nothing_waiting_nothing_starts_and_the_heartbeat_wakes() {
        let (mut s, t0) = stream();
        let d = s.decide(t0 + S, &idle());
        assert_eq!(d, Decision { walk: false, appends: false, wake_at: t0 + 2 * S });
    }

    #[test]
    fn a_change_is_walked_once_the_tree_is_quiet() {
        let (mut s, t0) = stream();
        let busy = Situation { first: Some(t0), last: Some(t0 + 300 * MS), ..idle() };
        let d = s.decide(t0 + 400 * MS, &busy);
        assert!(!d.walk, "still settling");
        assert_eq!(d.wake_at, t0 + 800 * MS, "woken when quiet long enough");
        assert!(s.decide(t0 + 800 * MS, &busy).walk);
    }

    #[test]
    fn a_change_in_a_tree_that_never_settles_waits_at_most_max_delay() {
        let (mut s, t0) = stream();
        let at = |now: Duration| Situation { first: Some(t0), last: Some(t0 + now - 100 * MS), ..idle() };
        assert!(!s.decide(t0 + 14 * S, &at(14 * S)).walk);
        assert!(s.decide(t0 + 15 * S, &at(15 * S)).walk);
    }

    #[test]
    fn a_walk_starts_once_and_not_while_one_runs() {
        let (mut s, t0) = stream();
        let lost = Situation { overflowed: true, ..idle() };
        assert!(s.decide(t0, &lost).walk, "lost events: walk all at once");
        let running = Situation { walking: true, ..lost };
        let d = s.decide(t0 + S, &running);
        assert!(!d.walk);
        assert_eq!(d.wake_at, t0 + 2 * S, "no walk deadline while one runs");
    }

    #[test]
    fn a_full_walk_follows_every_rescan() {
        let (mut s, t0) = stream();
        assert!(!s.decide(t0 + 3599 * S, &idle()).walk);
        assert_eq!(s.decide(t0 + 3599 * S + 500 * MS, &idle()).wake_at, t0 + 3600 * S);
        assert!(s.decide(t0 + 3600 * S, &idle()).walk);
        // The next one counts from when this one started.
        assert!(!s.decide(t0 + 7199 * S, &idle()).walk);
        assert!(s.decide(t0 + 7200 * S, &idle()).walk);
    }

    #[test]
    fn appends_wait_half_the_interval_and_for_the_first_walk() {
        let (mut s, t0) = stream();
        let written = Situation { written: Some(t0), ..idle() };
        let d = s.decide(t0 + 500 * MS, &written);
        assert!(!d.appends);
        assert_eq!(d.wake_at, t0 + S);
        assert!(!s.decide(t0 + S, &Situation { can_append: false, ..written }).appends, "no point to extend yet");
        assert!(s.decide(t0 + S, &written).appends);
        let d = s.decide(t0 + S + MS, &Situation { appending: true, ..written });
        assert!(!d.appends, "one round at a time");
    }

    #[test]
    fn rounds_of_fragments_are_spaced_by_half_the_interval() {
        let (mut s, t0) = stream();
        assert!(s.decide(t0 + S, &Situation { written: Some(t0), ..idle() }).appends);
        // Written again right after the round started, and the round is done.
        let again = Situation { written: Some(t0 + S), ..idle() };
        let d = s.decide(t0 + 1100 * MS, &again);
        assert!(!d.appends);
        assert_eq!(d.wake_at, t0 + 2 * S);
        assert!(s.decide(t0 + 2 * S, &again).appends);
        // Written long ago: the spacing still holds.
        let old = Situation { written: Some(t0), ..idle() };
        let d = s.decide(t0 + 2500 * MS, &old);
        assert!(!d.appends);
        assert_eq!(d.wake_at, t0 + 3 * S);
    }

    #[test]
    fn a_point_follows_appends_within_point_after_appends() {
        let (mut s, t0) = stream();
        s.appended(t0);
        s.appended(t0 + 10 * S);
        let d = s.decide(t0 + 299 * S, &idle());
        assert!(!d.walk);
        assert_eq!(d.wake_at, t0 + 300 * S);
        assert!(s.decide(t0 + 300 * S, &idle()).walk, "counted from the first fragment");
        s.walked();
        assert!(!s.decide(t0 + 301 * S, &idle()).walk, "a point took the fragments");
    }

    #[test]
    fn after_a_failure_nothing_starts_before_the_retry() {
        let (mut s, t0) = stream();
        let both = Situation { overflowed: true, written: Some(t0), ..idle() };
        // The factor of jitter is 1 with 0.5: waits of 1 s, then 2 s.
        assert_eq!(s.failed(t0, 0.5), S);
        let d = s.decide(t0 + 500 * MS, &both);
        assert_eq!((d.walk, d.appends, d.wake_at), (false, false, t0 + S));
        assert_eq!(s.failed(t0 + S, 0.5), 2 * S);
        let d = s.decide(t0 + 2 * S, &both);
        assert_eq!((d.walk, d.appends, d.wake_at), (false, false, t0 + 3 * S));
        let d = s.decide(t0 + 3 * S, &both);
        assert!(d.walk && d.appends);
        s.succeeded();
        assert_eq!(s.failed(t0 + 4 * S, 0.5), S, "back off from the start after a success");
    }

    #[test]
    fn a_stop_starts_nothing_and_gives_the_work_under_way_its_grace() {
        let (mut s, t0) = stream();
        assert_eq!(s.stop_by(), None);
        s.stop(t0 + S);
        s.stop(t0 + 2 * S);
        assert_eq!(s.stop_by(), Some(t0 + S + STOP_GRACE), "the grace counts from the first stop");
        let both = Situation { overflowed: true, written: Some(t0), ..idle() };
        let d = s.decide(t0 + 3 * S, &both);
        assert!(!d.walk && !d.appends);
    }
}
