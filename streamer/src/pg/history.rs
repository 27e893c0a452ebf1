//! Timeline histories: the syntax of PostgreSQL's `<TLI>.history` files (lines
//! `parent<TAB>switchpoint<TAB>reason`), and the path of timelines they give, along
//! which WAL is read from the repository.

use catalog::wal::Lsn;
use catalog::{RepoError, Repository};

use super::lsn;

/// Why the path of a timeline could not be had. A missing history means its WAL
/// was not archived (yet); a malformed one is an error that stops a recovery.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("source {source_name:?} has no history file for timeline {tli}")]
    Missing { source_name: String, tli: u32 },
    #[error("the history file of timeline {tli} of source {source_name:?} is malformed: {problem}")]
    Malformed { source_name: String, tli: u32, problem: String },
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// The timelines a timeline descends from: `(tli, begin, end)`, oldest first, the
/// last one `tli` itself with no end. `&path.0` is what the repository reads along.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelinePath(pub Vec<(u32, Lsn, Option<Lsn>)>);

impl TimelinePath {
    /// From the content of `<tli>.history`; timeline 1 has no history file.
    pub fn parse(tli: u32, history: Option<&str>) -> Result<TimelinePath, String> {
        let mut out = Vec::new();
        let mut begin = Lsn(0);
        for line in history.unwrap_or_default().lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut f = line.split_whitespace();
            let parent: u32 = f.next().and_then(|s| s.parse().ok()).ok_or(format!("bad history line {line:?}"))?;
            let switch = lsn::parse(f.next().ok_or(format!("bad history line {line:?}"))?)?;
            out.push((parent, begin, Some(switch)));
            begin = switch;
        }
        out.push((tli, begin, None));
        Ok(TimelinePath(out))
    }

    /// The timeline whose WAL is at `lsn` when following this path.
    pub fn tli_at(&self, lsn: Lsn) -> u32 {
        self.0.iter().find(|(_, b, e)| *b <= lsn && e.is_none_or(|e| lsn < e)).map_or(0, |(t, _, _)| *t)
    }

    /// Where on the path a later timeline branches off, if after `lsn`.
    pub fn end_of(&self, tli: u32) -> Option<Lsn> {
        self.0.iter().find(|(t, _, _)| *t == tli).and_then(|(_, _, e)| *e)
    }
}

/// The path that leads to timeline `tli` of `source`, from its stored history file.
pub async fn timeline_path(repo: &Repository, source: &str, tli: u32) -> Result<TimelinePath, HistoryError> {
    let history = if tli == 1 { None } else { repo.wal_history(source, tli).await? };
    let text = history.map(|h| String::from_utf8_lossy(&h).into_owned());
    if tli != 1 && text.is_none() {
        return Err(HistoryError::Missing { source_name: source.to_string(), tli });
    }
    TimelinePath::parse(tli, text.as_deref()).map_err(|problem| HistoryError::Malformed {
        source_name: source.to_string(),
        tli,
        problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_history() {
        let path =
            TimelinePath::parse(3, Some("1\t0/3001430\tno recovery target specified\n\n2\t0/5000000\tbefore 2026\n"))
                .unwrap();
        assert_eq!(
            path.0,
            vec![
                (1, Lsn(0), Some(Lsn(0x3001430))),
                (2, Lsn(0x3001430), Some(Lsn(0x5000000))),
                (3, Lsn(0x5000000), None)
            ]
        );
        assert_eq!((path.tli_at(Lsn(0x3001429)), path.tli_at(Lsn(0x3001430)), path.tli_at(Lsn(0x6000000))), (1, 2, 3));
        assert_eq!((path.end_of(2), path.end_of(3)), (Some(Lsn(0x5000000)), None));
        assert!(TimelinePath::parse(2, Some("x\t0/1\n")).is_err());
        assert_eq!(TimelinePath::parse(1, None).unwrap().0, vec![(1, Lsn(0), None)]);
    }
}
