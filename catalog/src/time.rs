//! The time grammar every `--at`, `--since` and `--until` accepts (DESIGN.md section 3).

use jiff::{civil, tz::TimeZone, Span, Timestamp};

pub const ACCEPTED_FORMS: &str = "accepted forms of a time:
  2026-11-21T10:15:00Z, 2026-11-21T10:15:00.250+01:00   RFC 3339
  2026-11-21 10:15, 2026-11-21 10:15:07                 local time
  @1763720100                                           Unix time
  15m ago, 2h30m ago, 3 days ago                        relative to now
  latest                                                the newest point";

/// A parsed time argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSpec {
    Latest,
    At(Timestamp),
}

impl TimeSpec {
    /// The moment meant: `latest` is `now`.
    pub fn instant(self, now: Timestamp) -> Timestamp {
        match self {
            TimeSpec::Latest => now,
            TimeSpec::At(t) => t,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot read {input:?} as a time\n{ACCEPTED_FORMS}")]
pub struct TimeError {
    pub input: String,
}

/// Parses `input` against the clock `now`, in the time zone `tz` gives for local times
/// and calendar spans. `tz` is called only for those: finding the system's time zone
/// reads the time zone database, which costs a start-up that needs none.
pub fn parse_time(input: &str, now: Timestamp, tz: impl FnOnce() -> TimeZone) -> Result<TimeSpec, TimeError> {
    let s = input.trim();
    let err = || TimeError { input: input.to_string() };
    if s == "latest" {
        return Ok(TimeSpec::Latest);
    }
    if let Some(unix) = s.strip_prefix('@') {
        return parse_unix(unix).map(TimeSpec::At).ok_or_else(err);
    }
    if let Some(span) = s.strip_suffix("ago") {
        let span: Span = span.trim().parse().map_err(|_| err())?;
        if span.is_negative() {
            return Err(err());
        }
        let then = now.to_zoned(tz()).checked_sub(span).map_err(|_| err())?;
        return Ok(TimeSpec::At(then.timestamp()));
    }
    if let Ok(t) = s.parse::<Timestamp>() {
        return Ok(TimeSpec::At(t));
    }
    // Local time: a date and a time of day without an offset.
    if s.len() >= 16 && (s.as_bytes()[10] == b' ' || s.as_bytes()[10] == b'T') {
        if let Ok(dt) = s.replacen(' ', "T", 1).parse::<civil::DateTime>() {
            let z = dt.to_zoned(tz()).map_err(|_| err())?;
            return Ok(TimeSpec::At(z.timestamp()));
        }
    }
    Err(err())
}

fn parse_unix(s: &str) -> Option<Timestamp> {
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if frac.len() > 9 {
        return None;
    }
    let nanos: i32 = if frac.is_empty() { 0 } else { format!("{frac:0<9}").parse().ok()? };
    Timestamp::new(secs.parse().ok()?, nanos).ok()
}

/// Nanoseconds since the Unix epoch, for times from 1970 on.
pub fn unix_nanos(t: Timestamp) -> Option<u64> {
    u64::try_from(t.as_nanosecond()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn every_form() {
        let now = at("2026-11-22T12:00:00Z");
        let tz = TimeZone::fixed(jiff::tz::offset(1));
        let p = |s: &str| parse_time(s, now, || tz.clone());
        assert_eq!(p("latest"), Ok(TimeSpec::Latest));
        assert_eq!(p("2026-11-21T10:15:00Z"), Ok(TimeSpec::At(at("2026-11-21T10:15:00Z"))));
        assert_eq!(p("2026-11-21T10:15:00.250+01:00"), Ok(TimeSpec::At(at("2026-11-21T09:15:00.25Z"))));
        assert_eq!(p("2026-11-21 10:15"), Ok(TimeSpec::At(at("2026-11-21T09:15:00Z"))));
        assert_eq!(p("2026-11-21 10:15:07"), Ok(TimeSpec::At(at("2026-11-21T09:15:07Z"))));
        assert_eq!(p("@1763720100"), Ok(TimeSpec::At(Timestamp::from_second(1763720100).unwrap())));
        assert_eq!(p("@1763720100.5"), Ok(TimeSpec::At(Timestamp::new(1763720100, 500_000_000).unwrap())));
        assert_eq!(p("15m ago"), Ok(TimeSpec::At(at("2026-11-22T11:45:00Z"))));
        assert_eq!(p("2h30m ago"), Ok(TimeSpec::At(at("2026-11-22T09:30:00Z"))));
        assert_eq!(p("3 days ago"), Ok(TimeSpec::At(at("2026-11-19T12:00:00Z"))));
        for bad in ["", "yesterday", "2026-11-21", "@", "@12x", "10:15", "ago", "-5m ago", "2026-13-01 10:00"] {
            assert!(p(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(p("nonsense").unwrap_err().to_string().contains("RFC 3339"));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A time written in any accepted form reads back as that time.
        #[test]
        fn every_form_reads_back_the_time_written(
            secs in 0i64..4_102_444_800,
            nanos in prop_oneof![Just(0), 0i32..1_000_000_000],
            offset_minutes in -14 * 60i32..=14 * 60,
            ago in 0i64..100_000_000,
        ) {
            let t = Timestamp::new(secs, nanos).unwrap();
            let now = Timestamp::from_second(4_102_444_800).unwrap();
            let tz = TimeZone::fixed(jiff::tz::Offset::from_seconds(offset_minutes * 60).unwrap());
            let p = |s: &str| parse_time(s, now, || tz.clone());
            let zoned = t.to_zoned(tz.clone());
            prop_assert_eq!(p(&t.to_string()), Ok(TimeSpec::At(t)));
            let rfc3339 = zoned.strftime("%Y-%m-%dT%H:%M:%S%.9f%:z").to_string();
            prop_assert_eq!(p(&rfc3339), Ok(TimeSpec::At(t)), "{}", rfc3339);
            let local = zoned.strftime("%Y-%m-%d %H:%M:%S%.9f").to_string();
            prop_assert_eq!(p(&local), Ok(TimeSpec::At(t)), "{}", local);
            let unix = format!("@{}.{:09}", t.as_second(), t.subsec_nanosecond());
            prop_assert_eq!(p(&unix), Ok(TimeSpec::At(t)), "{}", unix);
            let then = now.checked_sub(jiff::SignedDuration::from_secs(ago)).unwrap();
            prop_assert_eq!(p(&format!("{ago}s ago")), Ok(TimeSpec::At(then)));
            prop_assert_eq!(p(&format!("  {t}  ")), Ok(TimeSpec::At(t)));
        }
    }
}
