//! Which points a reading command works on: the source when none is named, the
//! points within a span of time, the point of each source at a moment, and their
//! manifests with the damaged ones told apart. Sources and points come from object
//! names alone (`PointNames`), so a repository still locked can answer.

use jiff::Timestamp;

use crate::error::RepoError;
use crate::point::{Manifest, PointRef};
use crate::repo::{PointNames, Repository};
use crate::time::TimeSpec;

/// Names asked for by the first listing when walking a span of points back from
/// its end; each next listing asks for twice as many. On `file://` a listing reads
/// every shard directory it needs to fill its page: a first page of a thousand
/// read fifty directories for the ten points of ten minutes.
const FIRST_PAGE: usize = 64;

/// The times a listing keeps: from `since` to `until`, both included; either end
/// may be open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
}

/// A span that ends before it starts: no point can be in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{since} is after {until}: no point can be both")]
pub struct InvertedSpan {
    pub since: Timestamp,
    pub until: Timestamp,
}

impl Span {
    /// The span between two times as given (`latest` being `now`).
    pub fn new(since: Option<TimeSpec>, until: Option<TimeSpec>, now: Timestamp) -> Result<Span, InvertedSpan> {
        let (since, until) = (since.map(|s| s.instant(now)), until.map(|u| u.instant(now)));
        if let (Some(since), Some(until)) = (since, until) {
            if since > until {
                return Err(InvertedSpan { since, until });
            }
        }
        Ok(Span { since, until })
    }

    pub fn contains(&self, t: Timestamp) -> bool {
        self.since.is_none_or(|s| t >= s) && self.until.is_none_or(|u| t <= u)
    }
}

/// The source a reading command works on, of those the repository holds: the one
/// named, or the only one there is.
pub fn only_source(named: Option<String>, all: &[String]) -> Result<String, RepoError> {
    if let Some(s) = named {
        return Ok(s);
    }
    match all {
        [] => Err(RepoError::NoSources),
        [one] => Ok(one.clone()),
        many => Err(RepoError::SeveralSources { known: many.join(", ") }),
    }
}

impl PointNames<'_> {
    /// `only_source`, listing the sources only when none is named.
    pub async fn pick_source(&self, named: Option<String>) -> Result<String, RepoError> {
        let all = if named.is_some() { Vec::new() } else { self.sources().await? };
        only_source(named, &all)
    }

    /// The points of `source` (of every source when `None`) within `span`, oldest
    /// first.
    pub async fn points_within(&self, source: Option<&str>, span: Span) -> Result<Vec<PointRef>, RepoError> {
        let sources = match source {
            Some(s) => vec![s.to_string()],
            None => self.sources().await?,
        };
        let mut selected = Vec::new();
        for s in &sources {
            if span == Span::default() {
                selected.extend(self.points(s).await?);
            } else {
                selected.extend(self.points_between(s, span).await?);
            }
        }
        selected.sort_by_key(|p| p.time);
        Ok(selected)
    }

    /// The points of `source` within `span`, oldest first: listed from the end of
    /// the span back to its start, a page at a time, so a day of a long history
    /// costs what a day costs.
    async fn points_between(&self, source: &str, span: Span) -> Result<Vec<PointRef>, RepoError> {
        let dir = crate::point::source_dir(source);
        let after = match span.until.and_then(|u| crate::point::offset_for(source, u)) {
            Some(offset) => offset,
            // After every point (or before 1970, which no point can be at or before).
            None if span.until.is_none() => format!("{dir}/"),
            None => return Ok(Vec::new()),
        };
        let mut out = Vec::new();
        let keep = |out: &mut Vec<PointRef>, name: &str| {
            let Some(p) = PointRef::parse(name) else { return true };
            if span.since.is_some_and(|s| p.time < s) {
                return false;
            }
            out.push(p);
            true
        };
        match span.since.and_then(|s| crate::point::offset_for(source, s)) {
            // Names sort newest first: those of points at or after `since` come up
            // to its offset's (`.` sorts after the `-` that ends a time's digits).
            Some(upto) => {
                for name in self.store.list_between(&dir, &after, &format!("{upto}."), FIRST_PAGE).await? {
                    if !keep(&mut out, &name) {
                        break;
                    }
                }
            }
            None => self.store.list_after_while(&dir, &after, FIRST_PAGE, |name| keep(&mut out, name)).await?,
        }
        // Oldest first, and points at one instant in name order, as `points` has them.
        out.sort_by(|a, b| a.time.cmp(&b.time).then_with(|| a.name.cmp(&b.name)));
        Ok(out)
    }

    /// The point of each selected source at `spec`: of `source`, or of every source
    /// that has one then. At least one must be found.
    pub async fn points_at(
        &self,
        spec: TimeSpec,
        source: Option<&str>,
        now: Timestamp,
    ) -> Result<Vec<PointRef>, RepoError> {
        if let Some(s) = source {
            return Ok(vec![self.resolve(s, spec, now).await?]);
        }
        let sources = self.sources().await?;
        if sources.is_empty() {
            return Err(RepoError::NoSources);
        }
        let mut out = Vec::new();
        let mut last_err = None;
        for s in &sources {
            match self.resolve(s, spec, now).await {
                Ok(p) => out.push(p),
                // A source with nothing then is left out, unless none has anything.
                Err(
                    e @ (RepoError::BeforeFirst { .. } | RepoError::NoPoints { .. } | RepoError::UnknownSource { .. }),
                ) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        match (out.is_empty(), last_err) {
            (true, Some(e)) => Err(e),
            _ => Ok(out),
        }
    }
}

impl Repository {
    /// The manifest of each point, in order. One that cannot be read (damaged,
    /// foreign, gone) is an `Err` in its place, so the others can still be listed;
    /// any other failure (the store cannot be asked) fails the whole.
    pub async fn manifests_of(&self, points: &[PointRef]) -> Result<Vec<Result<Manifest, RepoError>>, RepoError> {
        let names: Vec<String> = points.iter().map(|p| p.name.clone()).collect();
        let fetched = self.store().get_many(&names).await;
        fetched
            .into_iter()
            .zip(points)
            .map(|(got, p)| -> Result<Manifest, RepoError> { Ok(Manifest::open(self.keys(), &p.name, &got?)?) })
            .map(|r| match r {
                Err(e) if !e.is_damage() => Err(e),
                r => Ok(r),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::point::point_name;
    use crate::{KdfParams, Secret, Store};
    use bytes::Bytes;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_span_keeps_both_ends_and_refuses_to_end_before_it_starts() {
        let now = at("2026-11-22T12:00:00Z");
        let (a, b) = (at("2026-11-21T10:00:00Z"), at("2026-11-21T11:00:00Z"));
        let span = Span::new(Some(TimeSpec::At(a)), Some(TimeSpec::At(b)), now).unwrap();
        assert!(span.contains(a) && span.contains(b) && span.contains(at("2026-11-21T10:30:00Z")));
        assert!(!span.contains(at("2026-11-21T09:59:59Z")) && !span.contains(at("2026-11-21T11:00:01Z")));
        assert!(Span::default().contains(a), "an open span keeps everything");
        let latest = Span::new(Some(TimeSpec::At(a)), Some(TimeSpec::Latest), now).unwrap();
        assert_eq!(latest.until, Some(now), "latest is now");
        assert_eq!(
            Span::new(Some(TimeSpec::At(b)), Some(TimeSpec::At(a)), now),
            Err(InvertedSpan { since: b, until: a })
        );
        assert!(Span::new(Some(TimeSpec::Latest), Some(TimeSpec::At(a)), now).is_err(), "since latest, until before");
    }

    #[test]
    fn the_source_named_or_the_only_one() {
        let all = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(only_source(Some("x".into()), &[]).unwrap(), "x", "a named source is taken as named");
        assert_eq!(only_source(None, &all(&["db"])).unwrap(), "db");
        assert!(matches!(only_source(None, &[]), Err(RepoError::NoSources)));
        match only_source(None, &all(&["a", "b"])) {
            Err(RepoError::SeveralSources { known }) => assert_eq!(known, "a, b"),
            other => panic!("{other:?}"),
        }
    }

    /// A repository holding point names (no manifests) of two sources.
    async fn repo_with_points(points: &[(&str, &str)]) -> Repository {
        let store = Store::open("memory://", true).unwrap();
        let kdf = KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };
        let repo = Repository::init(store, &Secret::Password(b"pw".to_vec()), kdf, "h".into()).await.unwrap().0;
        for (source, time) in points {
            let name = point_name(source, at(time)).unwrap();
            repo.store().put_new(&name, Bytes::from_static(b"not a manifest")).await.unwrap();
        }
        repo
    }

    #[tokio::test]
    async fn points_within_a_span_and_at_a_moment() {
        let repo = repo_with_points(&[
            ("a", "2026-11-21T10:00:00Z"),
            ("a", "2026-11-21T12:00:00Z"),
            ("b", "2026-11-21T11:00:00Z"),
            ("b", "2026-11-21T13:00:00Z"),
        ])
        .await;
        let t = repo.point_names();
        let times = |ps: Vec<PointRef>| ps.iter().map(|p| (p.source.clone(), p.time.to_string())).collect::<Vec<_>>();
        let span = Span { since: Some(at("2026-11-21T11:00:00Z")), until: Some(at("2026-11-21T12:00:00Z")) };
        assert_eq!(
            times(t.points_within(None, span).await.unwrap()),
            [("b".into(), "2026-11-21T11:00:00Z".into()), ("a".into(), "2026-11-21T12:00:00Z".into())],
            "every source, oldest first, both ends kept"
        );
        assert_eq!(t.points_within(Some("a"), Span::default()).await.unwrap().len(), 2);

        let now = at("2026-11-22T00:00:00Z");
        let spec = TimeSpec::At(at("2026-11-21T10:30:00Z"));
        assert_eq!(
            times(t.points_at(spec, None, now).await.unwrap()),
            [("a".into(), "2026-11-21T10:00:00Z".into())],
            "a source with nothing yet is left out"
        );
        let before = TimeSpec::At(at("2026-11-20T00:00:00Z"));
        assert!(matches!(t.points_at(before, None, now).await, Err(RepoError::BeforeFirst { .. })));
        assert!(matches!(t.points_at(before, Some("b"), now).await, Err(RepoError::BeforeFirst { .. })));
        assert_eq!(t.points_at(TimeSpec::Latest, None, now).await.unwrap().len(), 2);
        assert!(matches!(t.pick_source(None).await, Err(RepoError::SeveralSources { .. })));

        // Their manifests are garbage: each is listed as damaged, none fails the whole.
        let all = t.points_within(None, Span::default()).await.unwrap();
        let manifests = repo.manifests_of(&all).await.unwrap();
        assert_eq!(manifests.len(), 4);
        assert!(manifests.iter().all(|m| m.as_ref().is_err_and(|e| e.is_damage())));
    }

    /// Listing a span from its end back, a page at a time, finds exactly the points
    /// a filter of the whole listing finds, across pages and at both ends.
    #[tokio::test]
    async fn a_span_listed_narrowly_equals_the_whole_listing_filtered() {
        let base = at("2026-11-21T00:00:00Z");
        let times: Vec<String> =
            (0..2_500i64).map(|m| (base + jiff::SignedDuration::from_secs(m * 60 + m % 7)).to_string()).collect();
        // Some instants hold two points.
        let points: Vec<(&str, &str)> =
            times.iter().chain(times.iter().step_by(97)).map(|t| ("s", t.as_str())).collect();
        let repo = repo_with_points(&points).await;
        let t = repo.point_names();
        let all = t.points("s").await.unwrap();
        assert_eq!(all.len(), 2_500 + 26);
        let edge = |i: usize| Some(all[i].time);
        let later = |i: usize, ns: i64| Some(all[i].time + jiff::SignedDuration::from_nanos(ns));
        for (since, until) in [
            (None, edge(1_700)),
            (edge(3), None),
            (edge(10), edge(1_500)),
            (later(10, 1), later(1_500, -1)),
            (edge(0), edge(2_525)),
            (edge(42), edge(42)),
            (later(42, 1), later(43, -1)),
            (Some(at("2020-01-01T00:00:00Z")), Some(at("2020-01-02T00:00:00Z"))),
            (Some(at("2030-01-01T00:00:00Z")), None),
        ] {
            let span = Span { since, until };
            let want: Vec<PointRef> = all.iter().filter(|p| span.contains(p.time)).cloned().collect();
            assert_eq!(t.points_within(Some("s"), span).await.unwrap(), want, "{span:?}");
        }
    }

    #[tokio::test]
    async fn an_empty_repository_has_no_source_to_pick() {
        let repo = repo_with_points(&[]).await;
        let t = repo.point_names();
        assert!(matches!(t.pick_source(None).await, Err(RepoError::NoSources)));
        assert!(matches!(t.points_at(TimeSpec::Latest, None, Timestamp::now()).await, Err(RepoError::NoSources)));
        assert_eq!(t.pick_source(Some("db".into())).await.unwrap(), "db");
    }
}
