//! Retention rules: which points of a source a policy keeps, and by which rule.
//! Pure: times in, verdicts out. Storing policies is `policy`, acting on verdicts
//! is `forget`.
//!
//! The rules are those restic and borg users know. Calendar rules (`hourly` to
//! `yearly`) keep the newest point of each of the N most recent periods that hold
//! a point; periods are civil hours, days, ISO weeks, months and years in the
//! policy's time zone, so an hour repeated at a DST change is one period and an
//! hour skipped is none. `within` keeps every point not older than the span before
//! the newest point; `pitr` keeps as much and also the newest point at or before
//! the window's start, so that every moment of the window stays restorable. The
//! newest point is always kept, whatever the rules. Spans are measured back from
//! the newest point, not from now: a source that stopped writing keeps its history.

use std::cmp::Reverse;

use jiff::{tz::TimeZone, Span, Timestamp, Zoned};
use serde::{Deserialize, Serialize};

/// The rules of one source. A count of 0 and an absent span turn a rule off.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Policy {
    pub keep_last: u32,
    pub keep_within: Option<Span>,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub keep_yearly: u32,
    /// Every moment of this span before the newest point stays restorable.
    pub pitr_within: Option<Span>,
    /// Where the calendar rules' periods begin: an IANA name or a POSIX TZ string.
    pub time_zone: String,
}

/// Why a point is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    Newest,
    Last,
    Within,
    Pitr,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Newest => "newest",
            Reason::Last => "last",
            Reason::Within => "within",
            Reason::Pitr => "pitr",
            Reason::Hourly => "hourly",
            Reason::Daily => "daily",
            Reason::Weekly => "weekly",
            Reason::Monthly => "monthly",
            Reason::Yearly => "yearly",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("unknown time zone {0:?}: use an IANA name such as Europe/Paris or UTC, or a POSIX TZ string")]
    TimeZone(String),
    #[error("--{rule} must be a positive span such as 7d, 36h or 1y6mo, not {span}")]
    Span { rule: &'static str, span: String },
}

/// How a calendar rule cuts time into periods: a number that grows with time.
type Period = fn(&Zoned) -> i64;

/// The calendar rules, shortest period first.
const CALENDAR: [(Reason, Period); 5] = [
    (Reason::Hourly, |z| days(z) * 24 + i64::from(z.hour())),
    (Reason::Daily, days),
    (Reason::Weekly, |z| {
        let w = z.date().iso_week_date();
        i64::from(w.year()) * 53 + i64::from(w.week())
    }),
    (Reason::Monthly, |z| i64::from(z.year()) * 12 + i64::from(z.month())),
    (Reason::Yearly, |z| i64::from(z.year())),
];

/// A civil date as a day number: increasing with the date.
fn days(z: &Zoned) -> i64 {
    i64::from(z.year()) * 366 + i64::from(z.date().day_of_year())
}

impl Policy {
    /// Whether any rule is on. A policy without one removes nothing.
    pub fn is_empty(&self) -> bool {
        let counts = [self.keep_last, self.keep_hourly, self.keep_daily, self.keep_weekly, self.keep_monthly];
        counts.iter().all(|&n| n == 0)
            && self.keep_yearly == 0
            && self.keep_within.is_none()
            && self.pitr_within.is_none()
    }

    /// The policy's time zone.
    pub fn zone(&self) -> Result<TimeZone, PolicyError> {
        zone(&self.time_zone)
    }

    /// Refuses spans that are zero or negative, and unknown time zones.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for (rule, span) in [("keep-within", &self.keep_within), ("pitr-within", &self.pitr_within)] {
            if let Some(s) = span {
                if !s.is_positive() {
                    return Err(PolicyError::Span { rule, span: format!("{s:#}") });
                }
            }
        }
        self.zone().map(drop)
    }

    /// The rules in force, as `ebb policy show` prints them.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        let counts = [
            ("last", self.keep_last),
            ("hourly", self.keep_hourly),
            ("daily", self.keep_daily),
            ("weekly", self.keep_weekly),
            ("monthly", self.keep_monthly),
            ("yearly", self.keep_yearly),
        ];
        out.extend(counts.iter().filter(|(_, n)| *n > 0).map(|(rule, n)| format!("keep-{rule} {n}")));
        out.extend(self.keep_within.map(|s| format!("keep-within {s:#}")));
        out.extend(self.pitr_within.map(|s| format!("pitr-within {s:#}")));
        out
    }

    /// For each of `times` (in any order), the rules that keep it; empty for a point
    /// the policy removes. Among points at the same instant the first given counts
    /// as the newer.
    pub fn verdicts(&self, tz: &TimeZone, times: &[Timestamp]) -> Vec<Vec<Reason>> {
        let mut out = vec![Vec::new(); times.len()];
        let mut order: Vec<usize> = (0..times.len()).collect();
        order.sort_by_key(|&i| (Reverse(times[i]), i));
        let Some(&newest) = order.first() else { return out };
        out[newest].push(Reason::Newest);
        for &i in order.iter().take(self.keep_last as usize) {
            out[i].push(Reason::Last);
        }
        let zoned: Vec<Zoned> = times.iter().map(|t| t.to_zoned(tz.clone())).collect();
        let start = |span: Option<Span>| span.map(|s| window_start(&zoned[newest], s));
        if let Some(from) = start(self.keep_within) {
            for &i in &order {
                if times[i] >= from {
                    out[i].push(Reason::Within);
                }
            }
        }
        if let Some(from) = start(self.pitr_within) {
            // The window, and the point the window's first moments are restored from.
            let mut base = true;
            for &i in &order {
                let inside = times[i] >= from;
                let is_base = times[i] <= from && std::mem::take(&mut base);
                if inside || is_base {
                    out[i].push(Reason::Pitr);
                }
            }
        }
        let counts = [self.keep_hourly, self.keep_daily, self.keep_weekly, self.keep_monthly, self.keep_yearly];
        for ((reason, period), n) in CALENDAR.into_iter().zip(counts) {
            let mut last = None;
            let mut taken = 0;
            for &i in &order {
                if taken == n {
                    break;
                }
                let p = period(&zoned[i]);
                if last != Some(p) {
                    last = Some(p);
                    taken += 1;
                    out[i].push(reason);
                }
            }
        }
        for reasons in &mut out {
            reasons.sort();
        }
        out
    }
}

/// `newest − span` in the policy's zone (calendar units count as the calendar
/// says); a span reaching before any representable time keeps everything.
fn window_start(newest: &Zoned, span: Span) -> Timestamp {
    newest.checked_sub(span).map_or(Timestamp::MIN, |z| z.timestamp())
}

/// A time zone by IANA name (from the system's time zone database) or POSIX TZ
/// string (`CET-1CEST,M3.5.0,M10.5.0/3`, which needs no database).
pub fn zone(name: &str) -> Result<TimeZone, PolicyError> {
    if name.is_empty() || name == "UTC" {
        return Ok(TimeZone::UTC);
    }
    TimeZone::get(name).or_else(|_| TimeZone::posix(name)).map_err(|_| PolicyError::TimeZone(name.to_string()))
}

/// The system's time zone as a policy names it: its IANA name, or UTC when the
/// system does not say.
pub fn system_zone_name() -> String {
    TimeZone::system().iana_name().unwrap_or("UTC").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn span(s: &str) -> Span {
        s.parse().unwrap()
    }

    /// Central Europe with its DST rules, without a time zone database.
    const BERLIN: &str = "CET-1CEST,M3.5.0,M10.5.0/3";

    /// The times kept, and by which rules, as `name: reasons`.
    fn kept(policy: &Policy, times: &[&str]) -> Vec<String> {
        let ts: Vec<Timestamp> = times.iter().map(|t| at(t)).collect();
        let v = policy.verdicts(&policy.zone().unwrap(), &ts);
        times
            .iter()
            .zip(v)
            .filter(|(_, r)| !r.is_empty())
            .map(|(t, r)| format!("{t}: {}", r.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(",")))
            .collect()
    }

    #[test]
    fn the_newest_point_is_always_kept() {
        let p = Policy::default();
        assert!(p.is_empty());
        assert_eq!(kept(&p, &["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"]), ["2026-01-02T00:00:00Z: newest"]);
        assert!(kept(&p, &[]).is_empty());
    }

    #[test]
    fn last_and_within_count_back_from_the_newest_point() {
        let p = Policy { keep_last: 2, keep_within: Some(span("1h")), ..Policy::default() };
        let times = ["2026-01-01T10:00:00Z", "2026-01-01T09:00:00Z", "2026-01-01T08:59:59Z", "2026-01-01T07:00:00Z"];
        assert_eq!(
            kept(&p, &times),
            [
                "2026-01-01T10:00:00Z: newest,last,within",
                "2026-01-01T09:00:00Z: last,within",
                // Ten minutes old or ten years: the span counts from the newest point.
            ]
        );
    }

    #[test]
    fn pitr_keeps_the_point_the_window_starts_from() {
        let p = Policy { pitr_within: Some(span("2h")), ..Policy::default() };
        let times = ["2026-01-01T10:00:00Z", "2026-01-01T09:00:00Z", "2026-01-01T07:30:00Z", "2026-01-01T06:00:00Z"];
        assert_eq!(
            kept(&p, &times),
            [
                "2026-01-01T10:00:00Z: newest,pitr",
                "2026-01-01T09:00:00Z: pitr",
                "2026-01-01T07:30:00Z: pitr", // 08:00 is restored from it
            ]
        );
        // A point exactly at the window's start is the window's base; none older is needed.
        let times = ["2026-01-01T10:00:00Z", "2026-01-01T08:00:00Z", "2026-01-01T07:00:00Z"];
        assert_eq!(kept(&p, &times), ["2026-01-01T10:00:00Z: newest,pitr", "2026-01-01T08:00:00Z: pitr"]);
    }

    #[test]
    fn points_in_the_same_hour_keep_only_the_newest() {
        let p = Policy { keep_hourly: 3, time_zone: "UTC".into(), ..Policy::default() };
        let times = [
            "2026-01-01T10:59:59Z",
            "2026-01-01T10:00:00Z",
            "2026-01-01T09:30:00Z",
            "2026-01-01T09:10:00Z",
            "2026-01-01T07:05:00Z", // 8h has none: the third hour with a point is 7h
            "2026-01-01T06:05:00Z",
        ];
        assert_eq!(
            kept(&p, &times),
            ["2026-01-01T10:59:59Z: newest,hourly", "2026-01-01T09:30:00Z: hourly", "2026-01-01T07:05:00Z: hourly"]
        );
    }

    #[test]
    fn days_begin_at_midnight_in_the_policy_time_zone() {
        // 23:30 UTC on the 1st is 00:30 on the 2nd in Berlin (winter, +01:00).
        let times = ["2026-01-02T10:00:00Z", "2026-01-01T23:30:00Z", "2026-01-01T22:30:00Z"];
        let utc = Policy { keep_daily: 2, time_zone: "UTC".into(), ..Policy::default() };
        assert_eq!(kept(&utc, &times), ["2026-01-02T10:00:00Z: newest,daily", "2026-01-01T23:30:00Z: daily"]);
        let berlin = Policy { keep_daily: 2, time_zone: BERLIN.into(), ..Policy::default() };
        assert_eq!(kept(&berlin, &times), ["2026-01-02T10:00:00Z: newest,daily", "2026-01-01T22:30:00Z: daily"]);
        // Tokyo (+09:00): 19:00, 08:30 and 07:30, all on the 2nd: one day with points.
        let tokyo = Policy { keep_daily: 2, time_zone: "JST-9".into(), ..Policy::default() };
        assert_eq!(kept(&tokyo, &times), ["2026-01-02T10:00:00Z: newest,daily"]);
    }

    #[test]
    fn the_hour_repeated_when_clocks_go_back_is_one_hour() {
        // Berlin, 2026-10-25: 03:00 CEST becomes 02:00 CET. 00:10Z and 00:50Z are
        // 02:10 and 02:50 CEST; 01:10Z is 02:10 CET: one civil hour, 02:00 to 03:00.
        let p = Policy { keep_hourly: 2, time_zone: BERLIN.into(), ..Policy::default() };
        let times = ["2026-10-25T01:10:00Z", "2026-10-25T00:50:00Z", "2026-10-25T00:10:00Z", "2026-10-24T23:50:00Z"];
        assert_eq!(kept(&p, &times), ["2026-10-25T01:10:00Z: newest,hourly", "2026-10-24T23:50:00Z: hourly"]);
    }

    #[test]
    fn the_hour_skipped_when_clocks_go_forward_is_no_hour() {
        // Berlin, 2026-03-29: 02:00 CET becomes 03:00 CEST. 00:59Z is 01:59 CET,
        // 01:00Z is 03:00 CEST: consecutive hours with a point.
        let p = Policy { keep_hourly: 2, time_zone: BERLIN.into(), ..Policy::default() };
        let times = ["2026-03-29T01:30:00Z", "2026-03-29T01:00:00Z", "2026-03-29T00:59:00Z", "2026-03-29T00:10:00Z"];
        assert_eq!(kept(&p, &times), ["2026-03-29T01:30:00Z: newest,hourly", "2026-03-29T00:59:00Z: hourly"]);
        // A day that has 23 hours is still one day.
        let d = Policy { keep_daily: 1, keep_within: Some(span("1d")), time_zone: BERLIN.into(), ..Policy::default() };
        // One calendar day before 2026-03-30 00:30 CEST is 2026-03-29 00:30 CET: 23 hours.
        let times = ["2026-03-29T22:30:00Z", "2026-03-28T23:30:00Z", "2026-03-28T23:29:00Z"];
        assert_eq!(kept(&d, &times), ["2026-03-29T22:30:00Z: newest,within,daily", "2026-03-28T23:30:00Z: within"]);
    }

    #[test]
    fn weeks_are_iso_weeks_and_years_are_calendar_years() {
        let p = Policy { keep_weekly: 2, keep_yearly: 2, time_zone: "UTC".into(), ..Policy::default() };
        // 2027-01-01 is a Friday in ISO week 53 of 2026, which starts on Monday 2026-12-28.
        let times = ["2027-01-01T12:00:00Z", "2026-12-28T00:00:00Z", "2026-12-27T23:59:59Z", "2025-06-01T00:00:00Z"];
        assert_eq!(
            kept(&p, &times),
            [
                "2027-01-01T12:00:00Z: newest,weekly,yearly",
                "2026-12-28T00:00:00Z: yearly",
                "2026-12-27T23:59:59Z: weekly",
            ]
        );
    }

    #[test]
    fn monthly_keeps_the_newest_of_each_month() {
        let p = Policy { keep_monthly: 3, time_zone: "UTC".into(), ..Policy::default() };
        let times = ["2026-03-01T00:00:00Z", "2026-02-28T23:00:00Z", "2026-02-01T00:00:00Z", "2025-12-31T23:59:59Z"];
        assert_eq!(
            kept(&p, &times),
            ["2026-03-01T00:00:00Z: newest,monthly", "2026-02-28T23:00:00Z: monthly", "2025-12-31T23:59:59Z: monthly"]
        );
    }

    #[test]
    fn bad_spans_and_zones_are_refused() {
        let p = Policy { keep_within: Some(span("-1d")), ..Policy::default() };
        assert!(matches!(p.validate(), Err(PolicyError::Span { rule: "keep-within", .. })));
        let p = Policy { pitr_within: Some(Span::new()), ..Policy::default() };
        assert!(matches!(p.validate(), Err(PolicyError::Span { rule: "pitr-within", .. })));
        let p = Policy { time_zone: "Mars/Olympus_Mons".into(), ..Policy::default() };
        assert_eq!(p.validate(), Err(PolicyError::TimeZone("Mars/Olympus_Mons".into())));
        assert!(Policy { time_zone: BERLIN.into(), ..Policy::default() }.validate().is_ok());
    }
}

#[cfg(test)]
mod model {
    //! The policy against a reference written the other way round: as sets of
    //! periods rather than one pass over the points.
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use proptest::prelude::*;

    /// The indexes kept by `policy`, computed rule by rule from first principles.
    fn reference(policy: &Policy, tz: &TimeZone, times: &[Timestamp]) -> BTreeSet<usize> {
        let mut kept = BTreeSet::new();
        if times.is_empty() {
            return kept;
        }
        // "Newer" = later time, then earlier index.
        let newer = |a: usize, b: usize| (times[a], Reverse(a)) > (times[b], Reverse(b));
        let newest = (0..times.len()).reduce(|a, b| if newer(a, b) { a } else { b }).unwrap();
        kept.insert(newest);
        for i in 0..times.len() {
            // Kept by keep-last when fewer than N points are newer.
            if (0..times.len()).filter(|&j| newer(j, i)).count() < policy.keep_last as usize {
                kept.insert(i);
            }
        }
        let from = |s: Span| {
            times[newest].to_zoned(tz.clone()).checked_sub(s).map(|z| z.timestamp()).unwrap_or(Timestamp::MIN)
        };
        if let Some(s) = policy.keep_within {
            kept.extend((0..times.len()).filter(|&i| times[i] >= from(s)));
        }
        if let Some(s) = policy.pitr_within {
            let start = from(s);
            kept.extend((0..times.len()).filter(|&i| times[i] >= start));
            let before = (0..times.len()).filter(|&i| times[i] <= start);
            if let Some(base) = before.reduce(|a, b| if newer(a, b) { a } else { b }) {
                kept.insert(base);
            }
        }
        let counts =
            [policy.keep_hourly, policy.keep_daily, policy.keep_weekly, policy.keep_monthly, policy.keep_yearly];
        for ((_, period), n) in CALENDAR.into_iter().zip(counts) {
            // Each period with a point, and its newest point; the N latest periods.
            let mut newest_in: BTreeMap<i64, usize> = BTreeMap::new();
            for (i, t) in times.iter().enumerate() {
                let p = period(&t.to_zoned(tz.clone()));
                let e = newest_in.entry(p).or_insert(i);
                if newer(i, *e) {
                    *e = i;
                }
            }
            kept.extend(newest_in.values().rev().take(n as usize));
        }
        kept
    }

    fn policies() -> impl Strategy<Value = Policy> {
        let count = || prop_oneof![Just(0u32), 0u32..6];
        let span = || {
            proptest::option::of((1i64..400, 0usize..4).prop_map(|(n, unit)| match unit {
                0 => Span::new().minutes(n * 7),
                1 => Span::new().hours(n),
                2 => Span::new().days(n % 60),
                _ => Span::new().months(n % 14),
            }))
        };
        let zones = prop_oneof![
            Just("UTC"),
            Just("CET-1CEST,M3.5.0,M10.5.0/3"),
            Just("EST5EDT,M3.2.0,M11.1.0"),
            Just("NPT-5:45")
        ];
        (count(), span(), count(), count(), count(), count(), count(), span(), zones).prop_map(
            |(last, within, hourly, daily, weekly, monthly, yearly, pitr, zone)| Policy {
                keep_last: last,
                keep_within: within.filter(|s| s.is_positive()),
                keep_hourly: hourly,
                keep_daily: daily,
                keep_weekly: weekly,
                keep_monthly: monthly,
                keep_yearly: yearly,
                pitr_within: pitr.filter(|s| s.is_positive()),
                time_zone: zone.to_string(),
            },
        )
    }

    /// Point times: clustered (many in an hour, across DST changes) or spread over
    /// years, with repeats.
    fn times() -> impl Strategy<Value = Vec<Timestamp>> {
        let base = 1_774_700_000i64; // 2026-03-28, a day before Europe's clocks go forward
        let scale = prop_oneof![Just(600i64), Just(86_400), Just(86_400 * 400)];
        (scale, proptest::collection::vec(0i64..1_000_000, 0..60)).prop_map(move |(scale, xs)| {
            xs.into_iter().map(|x| Timestamp::from_second(base + x * scale / 1000).unwrap()).collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]
        #[test]
        fn the_kept_set_equals_the_reference(policy in policies(), times in times()) {
            let tz = policy.zone().unwrap();
            let verdicts = policy.verdicts(&tz, &times);
            let kept: BTreeSet<usize> = (0..times.len()).filter(|&i| !verdicts[i].is_empty()).collect();
            prop_assert_eq!(kept, reference(&policy, &tz, &times));
        }
    }
}
