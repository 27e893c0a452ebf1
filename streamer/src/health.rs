//! How a stream is doing, and what it does about failures; shared by `stream dir`
//! and `stream pg`. On each heartbeat the lag behind the source, the RPO alarm, the
//! last error and the newest point go to the metrics and the state file (`state`),
//! so `ebb status` knows them even while the store is unreachable. After a failure
//! the stream retries with exponential backoff and jitter (`Backoff`).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;

use crate::metrics::Metrics;
use crate::state::{self, StreamState};

/// How often the state file, the metrics and the alarm are brought up to date.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// Delays between retries: from `min`, doubling after each failure up to `max`, and
/// back to `min` after a success. Each wait is scaled by a random factor in
/// [0.5, 1.5), so that many streams that failed together do not retry together.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max, next: min }
    }

    /// What the next failure waits, before jitter.
    pub fn delay(&self) -> Duration {
        self.next
    }

    /// A failure: how long to wait before retrying, given `random` in [0, 1) (see
    /// `jitter`). The failure after it waits twice as long, up to `max`.
    pub fn failed(&mut self, random: f64) -> Duration {
        let wait = jitter(self.next, random);
        self.next = (self.next * 2).min(self.max);
        wait
    }

    /// A success: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// `d` scaled by `0.5 + random`: a factor in [0.5, 1.5) for `random` in [0, 1).
pub fn jitter(d: Duration, random: f64) -> Duration {
    d.mul_f64(0.5 + random)
}

/// A change of the RPO alarm, seen at a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alarm {
    /// The lag went past the RPO.
    Raised { lag: Duration },
    /// The lag is within the RPO again.
    Cleared { lag: Duration },
}

/// What a stream tells the rest of the host: its state file and its metrics.
pub struct Health {
    state: StreamState,
    rpo: Duration,
    /// The state file; none to keep no state.
    file: Option<PathBuf>,
    metrics: Arc<Metrics>,
    /// The lag was past the RPO at the last heartbeat.
    breached: bool,
}

impl Health {
    pub fn new(state: StreamState, rpo: Duration, file: Option<PathBuf>, metrics: Arc<Metrics>) -> Health {
        Health { state, rpo, file, metrics, breached: false }
    }

    /// What the state file says (as of the last heartbeat, for `updated`).
    pub fn state(&self) -> &StreamState {
        &self.state
    }

    /// What is shipped now (a directory that PATH names anew).
    pub fn set_path(&mut self, path: String) {
        self.state.path = path;
    }

    /// The stream made or found a point of this time.
    pub fn newest_point(&mut self, time: Timestamp) {
        self.state.newest_point = Some(time);
    }

    /// Everything the source held at `t` is durable in the repository.
    pub fn durable_as_of(&mut self, t: Timestamp) {
        self.state.durable_as_of = t;
    }

    /// A failure, now: `ebb status` says failing, with `why`, until a success.
    pub fn failed(&mut self, why: String) {
        self.state.last_error = Some(why);
        self.state.last_error_at = Some(Timestamp::now());
    }

    /// A failure that goes on: `why` now, and the time it began (kept from an error
    /// not yet cleared).
    pub fn failing(&mut self, why: String) {
        self.state.last_error = Some(why);
        self.state.last_error_at.get_or_insert_with(Timestamp::now);
    }

    /// Shipping works: the last error is over. Whether there was one.
    pub fn recovered(&mut self) -> bool {
        self.state.last_error_at = None;
        self.state.last_error.take().is_some()
    }

    /// The heartbeat at `now`: the lag and the alarm go to the metrics, and the state
    /// to its file. Says when the alarm was raised or cleared.
    pub fn beat(&mut self, now: Timestamp) -> Option<Alarm> {
        self.state.updated = now;
        // A point that others made (a base backup) is known to the metrics only.
        self.state.newest_point = self.state.newest_point.max(self.metrics.newest_point_time());
        self.state.last_prune = self.metrics.last_prune.lock().expect("last prune lock").clone();
        let lag = self.state.lag(now);
        let over = lag > self.rpo;
        let alarm = match (over, self.breached) {
            (true, false) => Some(Alarm::Raised { lag }),
            (false, true) => Some(Alarm::Cleared { lag }),
            _ => None,
        };
        self.breached = over;
        self.metrics.lag_ms.store(lag.as_millis() as u64, Ordering::Relaxed);
        self.metrics.breached.store(over, Ordering::Relaxed);
        self.metrics.durable_ms.store(self.state.durable_as_of.as_millisecond().max(0) as u64, Ordering::Relaxed);
        if let Some(f) = &self.file {
            if let Err(e) = state::write(f, &self.state) {
                tracing::warn!("cannot write the state file {}: {e}", f.display());
            }
        }
        alarm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn backoff_doubles_up_to_its_max_and_resets() {
        let mut b = Backoff::new(S, 30 * S);
        // With `random` 0.5 the factor is 1: the waits are the delays themselves.
        let waits: Vec<u64> = (0..7).map(|_| b.failed(0.5).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(b.delay(), 30 * S);
        b.reset();
        assert_eq!(b.delay(), S);
        assert_eq!(b.failed(0.5), S);
        assert_eq!(b.delay(), 2 * S);
    }

    #[test]
    fn backoff_max_need_not_be_a_power_of_two_of_min() {
        let mut b = Backoff::new(S, 60 * S);
        let waits: Vec<u64> = (0..8).map(|_| b.failed(0.5).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn jitter_spreads_a_wait_over_half_to_one_and_a_half_times() {
        assert_eq!(jitter(10 * S, 0.0), 5 * S);
        assert_eq!(jitter(10 * S, 0.5), 10 * S);
        assert!(jitter(10 * S, 0.999_999) < 15 * S);
        assert!(jitter(10 * S, 0.999_999) > 14 * S);
        // The jitter scales the wait, never the delay that doubles.
        let mut b = Backoff::new(S, 60 * S);
        assert_eq!(b.failed(0.0), S / 2);
        assert_eq!(b.failed(0.0), S);
        assert_eq!(b.delay(), 4 * S);
    }

    fn health(rpo: Duration) -> (Health, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        let state = StreamState::starting("s".into(), "file:///r".into(), "dir", "/d".into(), rpo);
        (Health::new(state, rpo, None, metrics.clone()), metrics)
    }

    #[test]
    fn the_alarm_is_raised_once_past_the_rpo_and_cleared_once_within() {
        let (mut h, metrics) = health(10 * S);
        let t0 = h.state().started;
        let at = |secs: i64| t0 + jiff::SignedDuration::from_secs(secs);
        assert_eq!(h.beat(at(5)), None);
        assert!(!metrics.breached.load(Ordering::Relaxed));
        assert_eq!(h.beat(at(11)), Some(Alarm::Raised { lag: 11 * S }));
        assert!(metrics.breached.load(Ordering::Relaxed));
        assert_eq!(metrics.lag_ms.load(Ordering::Relaxed), 11_000);
        assert_eq!(h.beat(at(12)), None, "raised once");
        h.durable_as_of(at(10));
        assert_eq!(h.beat(at(12)), Some(Alarm::Cleared { lag: 2 * S }));
        assert!(!metrics.breached.load(Ordering::Relaxed));
        assert_eq!(metrics.durable_ms.load(Ordering::Relaxed), at(10).as_millisecond() as u64);
        assert_eq!(h.state().updated, at(12));
    }

    #[test]
    fn an_error_lasts_until_a_success_and_a_lasting_one_keeps_its_start() {
        let (mut h, _) = health(10 * S);
        assert!(!h.recovered(), "nothing failed");
        h.failing("gone".into());
        let began = h.state().last_error_at.expect("failing");
        h.failing("still gone".into());
        assert_eq!(h.state().last_error.as_deref(), Some("still gone"));
        assert_eq!(h.state().last_error_at, Some(began));
        assert!(h.recovered());
        assert_eq!((h.state().last_error.as_deref(), h.state().last_error_at), (None, None));
        h.failed("store down".into());
        assert_eq!(h.state().last_error.as_deref(), Some("store down"));
        assert!(h.state().last_error_at.is_some());
    }

    #[test]
    fn the_newest_point_is_the_streams_own_or_one_the_metrics_know() {
        let (mut h, metrics) = health(10 * S);
        let t0 = h.state().started;
        h.beat(t0);
        assert_eq!(h.state().newest_point, None);
        h.newest_point(t0);
        h.beat(t0);
        assert_eq!(h.state().newest_point, Some(t0));
        let later = t0 + jiff::SignedDuration::from_secs(60);
        metrics.newest_point(later);
        h.beat(t0);
        assert_eq!(h.state().newest_point, Some(later));
    }
}
