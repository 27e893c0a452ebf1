//! `ebb forget`: each source's policy applied to its points, and the manifests of
//! the points it does not keep removed. Only manifests go: the data they
//! referenced stays until `ebb prune` finds that no kept point needs it, so a
//! mount or restore already reading a forgotten point reads on.
//!
//! Before removing anything, forget writes a record of what it removes
//! (`forgotten/<source>/<K>-<R>`), so that `ebb verify` tells a forgotten point
//! from a lost one.

use std::collections::HashSet;

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::error::RepoError;
use crate::object::{open_object, seal_object, ObjectError};
use crate::point::{parse_timed, timed_name, PointRef};
use crate::policy::StoredPolicy;
use crate::repo::Repository;
use crate::retention::Reason;

pub const FORGOTTEN_DIR: &str = "forgotten";
const VERSION: u32 = 1;
/// Manifests removed at once.
const DELETES_IN_FLIGHT: usize = 16;

/// One point and what the policy says of it.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub point: PointRef,
    /// The rules that keep it; empty when the policy removes it (or when there is
    /// no policy, which keeps everything).
    pub reasons: Vec<Reason>,
    pub keep: bool,
}

/// A source's points, oldest first, and the policy that judged them.
#[derive(Debug, Clone)]
pub struct SourceVerdicts {
    pub source: String,
    /// `None`: no policy was set, and every point is kept.
    pub policy: Option<StoredPolicy>,
    pub points: Vec<Verdict>,
}

impl SourceVerdicts {
    pub fn removed(&self) -> impl Iterator<Item = &PointRef> {
        self.points.iter().filter(|v| !v.keep).map(|v| &v.point)
    }
}

/// The record forget writes before it removes points.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForgetRecord {
    pub version: u32,
    pub source: String,
    pub time: String,
    pub host: String,
    /// The names of the points removed.
    pub points: Vec<String>,
}

impl ForgetRecord {
    pub fn open(keys: &crate::Keys, name: &str, bytes: &[u8]) -> Result<ForgetRecord, ObjectError> {
        ForgetRecord::decode(name, &open_object(keys, name, bytes)?)
    }

    pub(crate) fn decode(name: &str, plain: &[u8]) -> Result<ForgetRecord, ObjectError> {
        let bad = |problem: String| ObjectError::Decode {
            name: name.to_string(),
            cause: crate::codec::DecodeError::new("forget record", problem),
        };
        let r: ForgetRecord = serde_json::from_slice(plain).map_err(|e| bad(e.to_string()))?;
        if r.version != VERSION {
            return Err(bad(format!("unknown forget record version {}", r.version)));
        }
        match parse_timed(FORGOTTEN_DIR, name) {
            Some((source, _)) if source == r.source => {}
            _ => return Err(bad(format!("it names source {:?}, its object name another", r.source))),
        }
        Ok(r)
    }
}

/// What each selected source's policy says of its points: of `source`, or of
/// every source with points.
pub async fn judge(repo: &Repository, source: Option<&str>) -> Result<Vec<SourceVerdicts>, RepoError> {
    let sources = match source {
        Some(s) => vec![s.to_string()],
        None => repo.sources().await?,
    };
    let mut out = Vec::with_capacity(sources.len());
    for source in sources {
        let points = repo.points(&source).await?;
        let stored = repo.policy(&source).await?;
        let verdicts = match stored.as_ref().filter(|s| !s.policy.is_empty()) {
            None => points.into_iter().map(|point| Verdict { point, reasons: Vec::new(), keep: true }).collect(),
            Some(s) => {
                let times: Vec<Timestamp> = points.iter().map(|p| p.time).collect();
                // Points come oldest first: the first of those at one instant counts as
                // the newer, which is as good a tie-break as any, and stable.
                let reasons = s.policy.verdicts(&s.policy.zone()?, &times);
                points
                    .into_iter()
                    .zip(reasons)
                    .map(|(point, reasons)| Verdict { keep: !reasons.is_empty(), point, reasons })
                    .collect()
            }
        };
        out.push(SourceVerdicts { source, policy: stored, points: verdicts });
    }
    Ok(out)
}

/// What `forget` removed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Forgotten {
    pub points: u64,
    pub records: Vec<String>,
}

/// Removes the points the verdicts do not keep: per source, first a record of
/// them, then their manifests. Run again after an interruption, it finishes.
pub async fn forget(repo: &Repository, verdicts: &[SourceVerdicts], host: &str) -> Result<Forgotten, RepoError> {
    let mut done = Forgotten::default();
    for sv in verdicts {
        let removed: Vec<String> = sv.removed().map(|p| p.name.clone()).collect();
        if removed.is_empty() {
            continue;
        }
        let now = Timestamp::now();
        let name = timed_name(FORGOTTEN_DIR, &sv.source, now).ok_or(RepoError::BadTime { time: now.to_string() })?;
        let record = ForgetRecord {
            version: VERSION,
            source: sv.source.clone(),
            time: now.to_string(),
            host: host.to_string(),
            points: removed.clone(),
        };
        let sealed = seal_object(repo.keys(), &name, &serde_json::to_vec(&record).expect("record serializes"));
        repo.store().put_new(&name, Bytes::from(sealed)).await?;
        done.records.push(name);
        stream::iter(removed.iter().cloned().map(|name| async move {
            repo.store().delete(&name).await.map_err(|cause| RepoError::CannotDelete { name, cause: Box::new(cause) })
        }))
        .buffer_unordered(DELETES_IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
        done.points += removed.len() as u64;
    }
    Ok(done)
}

/// The names of every point a forget record says was removed, and the records
/// that could not be read.
pub async fn forgotten_points(repo: &Repository) -> Result<(HashSet<String>, Vec<String>), RepoError> {
    let mut names = HashSet::new();
    let mut problems = Vec::new();
    for obj in repo.store().list(FORGOTTEN_DIR).await? {
        let opened = match repo.store().get(&obj.name).await {
            Ok(bytes) => ForgetRecord::open(repo.keys(), &obj.name, &bytes).map_err(|e| e.to_string()),
            Err(e) if e.is_not_found() => continue,
            Err(e) => Err(e.to_string()),
        };
        match opened {
            Ok(r) => names.extend(r.points),
            Err(e) => problems.push(e),
        }
    }
    Ok((names, problems))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_forget_record() {
        let name = "forgotten/db/e78601e9e44897ff-0123456789abcdef";
        let json = r#"{"version":1,"source":"db","time":"2025-11-21T10:15:00Z","host":"h","points":["points/db/e78601e9e44897ff-0000000000000001"]}"#;
        let r = ForgetRecord::decode(name, json.as_bytes()).unwrap();
        assert_eq!(r.points, ["points/db/e78601e9e44897ff-0000000000000001"]);
        assert_eq!(serde_json::to_string(&r).unwrap(), json);
        assert!(ForgetRecord::decode("forgotten/web/e78601e9e44897ff-0123456789abcdef", json.as_bytes()).is_err());
    }
}
