//! Which point a time resolves to, against a sorted list: random point times in a
//! `memory://` repository, several sources whose names prefix each other, equal
//! and nanosecond-apart times, and moments on, just before and just after them.
//! Failing seeds are kept in `proptest-regressions/point_order.txt`.

use catalog::time::TimeSpec;
use catalog::{Manifest, RepoError, Repository, Secret, Store};
use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;

/// Each a prefix of the next: a listing of one must never show another's points.
const SOURCES: &[&str] = &["db", "db-1", "db-10", "db.x"];

fn base() -> Timestamp {
    Timestamp::from_second(1_780_000_000).unwrap()
}

/// A time on a coarse grid, so that points share times, plus a few nanoseconds.
fn time(ms: u64, ns: u32) -> Timestamp {
    base().checked_add(SignedDuration::from_nanos(ms as i64 * 1_000_000 + ns as i64)).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 200,
        failure_persistence: Some(Box::new(prop::test_runner::FileFailurePersistence::Direct(
            "proptest-regressions/point_order.txt",
        ))),
        ..ProptestConfig::default()
    })]

    /// `point_at(T)` is the newest point at or before T, `points` lists them oldest
    /// first, `resolve` says when T is before the first, and `sources` names the
    /// sources that have points.
    #[test]
    fn the_point_at_t_is_the_newest_at_or_before_t(
        points in prop::collection::vec((0usize..SOURCES.len(), 0u64..400, 0u32..3), 0..40),
        probes in prop::collection::vec((any::<bool>(), any::<usize>(), 0u64..420, -1i64..=1), 1..30),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let repo = Repository::init(Store::memory(), &Secret::KeyFile([3; 32]), catalog::DEFAULT_KDF, "h".into())
                .await
                .unwrap()
                .0;
            let root = catalog::BlobRef {
                id: catalog::Id([1; 32]),
                pack: catalog::Id([2; 32]),
                offset: 0,
                length: 30,
                raw_len: 1,
            };
            let mut model: Vec<Vec<Timestamp>> = vec![Vec::new(); SOURCES.len()];
            for &(s, ms, ns) in &points {
                let t = time(ms, ns);
                let m = Manifest::new(SOURCES[s], t, "h".into(), "dir", "/".into(), root);
                repo.commit_point(&m, t).await.unwrap();
                model[s].push(t);
            }
            model.iter_mut().for_each(|times| times.sort());

            let mut sources = repo.sources().await.unwrap();
            sources.sort();
            let mut want: Vec<String> =
                (0..SOURCES.len()).filter(|&s| !model[s].is_empty()).map(|s| SOURCES[s].to_string()).collect();
            want.sort();
            prop_assert_eq!(sources, want);

            let now = time(100_000, 0);
            for (s, name) in SOURCES.iter().enumerate() {
                let listed: Vec<Timestamp> = repo.points(name).await.unwrap().iter().map(|p| p.time).collect();
                prop_assert_eq!(&listed, &model[s], "points of {}", name);
                prop_assert!(repo.points(name).await.unwrap().iter().all(|p| p.source == *name));
                for &(exact, i, ms, delta) in &probes {
                    // On a point's time (or a nanosecond off it), or anywhere.
                    let t = match (exact, model[s].is_empty()) {
                        (true, false) => model[s][i % model[s].len()]
                            .checked_add(SignedDuration::from_nanos(delta))
                            .unwrap(),
                        _ => time(ms, 1),
                    };
                    let newest = model[s].iter().rev().find(|&&p| p <= t).copied();
                    let got = repo.point_at(name, t).await.unwrap();
                    prop_assert_eq!(got.as_ref().map(|p| p.time), newest, "{} at {}", name, t);
                    prop_assert!(got.iter().all(|p| p.source == *name), "{} at {}: another source's point", name, t);
                    match (repo.resolve(name, TimeSpec::At(t), now).await, newest) {
                        (Ok(p), Some(n)) => prop_assert_eq!(p.time, n),
                        (Err(RepoError::BeforeFirst { earliest, .. }), None) if !model[s].is_empty() => {
                            prop_assert_eq!(earliest, model[s][0])
                        }
                        (Err(RepoError::NoPoints { .. } | RepoError::UnknownSource { .. }), None)
                            if model[s].is_empty() => {}
                        (got, want) => prop_assert!(false, "{} resolved at {}: {:?}, want {:?}", name, t, got, want),
                    }
                }
                let latest = repo.resolve(name, TimeSpec::Latest, now).await.ok().map(|p| p.time);
                prop_assert_eq!(latest, model[s].last().copied(), "latest of {}", name);
            }
            Ok(())
        })?;
    }
}
