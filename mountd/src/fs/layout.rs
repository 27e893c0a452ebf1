//! What the made-up directories hold: the sources of a moment or of every point,
//! `<source>/latest`, `<source>/points/<time>/` and `<source>/at/<T>/`, and the
//! node of a point shown in one of them.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use catalog::time::{parse_time, TimeSpec};
use catalog::{PointRef, Repository};
use jiff::Timestamp;

use super::attr::Kind;
use super::node::{Node, Synth};
use crate::error::FsError;

/// How long the newest point of a source, once listed, is taken as still the newest.
/// One `ls <source>/latest/` asks for it several times (the source, the link, its
/// target); the kernel keeps made-up entries for as long, so new points still
/// appear within seconds.
const NEWEST_TTL: Duration = Duration::from_secs(1);

/// What the mount shows.
#[derive(Debug, Clone)]
pub enum Scope {
    /// The state at one moment: the point of each source at or before it, with the
    /// appends shipped after that point up to the moment. Shown directly when there
    /// is one source, under `<source>/` otherwise.
    Moment(Vec<PointRef>, Timestamp),
    /// Every point: `<source>/latest`, `<source>/points/<time>/`, `<source>/at/<T>/`.
    /// `Some(source)` limits it to one source.
    EveryPoint(Option<String>),
}

/// What a made-up directory holds.
pub(crate) enum Listing {
    /// Sources, each looked up in turn (which may fetch its point).
    Sources(Vec<String>),
    /// Entries, and the node of each.
    Entries(Vec<(Vec<u8>, Kind, Node)>),
    /// Points, each a directory named by its time.
    Points(Vec<PointRef>),
}

pub(crate) struct Layout {
    repo: Repository,
    scope: Scope,
    /// source -> its newest point, and when that was listed.
    newest: Mutex<HashMap<String, (Instant, Option<PointRef>)>>,
    /// Points whose manifest was read: candidates for `latest` without a read.
    readable: Mutex<HashSet<String>>,
}

impl Layout {
    pub fn new(repo: Repository, scope: Scope) -> Layout {
        Layout { repo, scope, newest: Mutex::new(HashMap::new()), readable: Mutex::new(HashSet::new()) }
    }

    /// The top of the mount: with one point in a `Moment` scope, that point's top
    /// directory, which costs one manifest and one tree fetch.
    pub async fn root(&self) -> Result<Node, FsError> {
        match &self.scope {
            Scope::Moment(points, at) if points.len() == 1 => self.point_node(&points[0], Some(*at)).await,
            _ => Ok(Node::synthetic(Synth::Root)),
        }
    }

    /// The newest point of `src` if it was listed less than `NEWEST_TTL` ago.
    fn newest_known(&self, src: &str) -> Option<Option<PointRef>> {
        let newest = self.newest.lock().expect("newest points");
        newest.get(src).filter(|(when, _)| when.elapsed() < NEWEST_TTL).map(|(_, p)| p.clone())
    }

    /// The newest point of `src` that can be read, listed at most `NEWEST_TTL` ago.
    /// Each point is read once to know that: `latest` never leads to a damaged one.
    async fn newest(&self, src: &str) -> Result<Option<PointRef>, FsError> {
        if let Some(p) = self.newest_known(src) {
            return Ok(p);
        }
        let mut at = Timestamp::now();
        let p = loop {
            let Some(p) = self.repo.point_at(src, at).await? else { break None };
            if self.readable.lock().expect("readable points").contains(&p.name) {
                break Some(p);
            }
            match self.repo.manifest(&p).await {
                Ok(_) => {
                    self.readable.lock().expect("readable points").insert(p.name.clone());
                    break Some(p);
                }
                Err(e) if e.is_damage() => {
                    tracing::error!("{} is not shown as latest: {e}", p.name);
                    at = p
                        .time
                        .checked_sub(jiff::SignedDuration::from_nanos(1))
                        .map_err(|e| FsError::Io(e.to_string()))?;
                }
                Err(e) => return Err(e.into()),
            }
        };
        self.newest.lock().expect("newest points").insert(src.to_string(), (Instant::now(), p.clone()));
        Ok(p)
    }

    /// Where `<src>/latest` leads.
    pub async fn latest_target(&self, src: &str) -> Result<Vec<u8>, FsError> {
        let p = self.newest(src).await?.ok_or(FsError::NotFound)?;
        Ok(format!("points/{}", p.time).into_bytes())
    }

    /// The node of a point shown under `points/` or `at/`: a damaged one is shown
    /// as such, so that it does not hide the others.
    pub async fn point_or_damaged(&self, point: &PointRef, at: Option<Timestamp>) -> Result<Node, FsError> {
        match self.point_node(point, at).await {
            Ok(n) => Ok(n),
            Err(FsError::Damaged(why)) => {
                tracing::error!("point {} cannot be read: {why}", point.name);
                Ok(Node::synthetic(Synth::Damaged(why)))
            }
            Err(e) => Err(e),
        }
    }

    /// The node for the backed-up entry of a point (the one entry of its root tree):
    /// as of `at` if given, else as the point has it.
    async fn point_node(&self, point: &PointRef, at: Option<Timestamp>) -> Result<Node, FsError> {
        let m = self.repo.manifest(point).await?;
        let root = m.root_ref().ok_or_else(|| FsError::Damaged(format!("{}: bad root reference", point.name)))?;
        let tree = self.repo.read_tree(&root).await?;
        let [entry] = tree.entries.as_slice() else {
            return Err(FsError::Damaged(format!("{}: the root tree does not hold one entry", point.name)));
        };
        let overlay = match at {
            Some(at) => Some(self.repo.overlay(point, at).await?).filter(|o| !o.is_empty()).map(std::sync::Arc::new),
            None => None,
        };
        Ok(Node::entry(entry, &overlay))
    }

    fn sources_in_scope(&self) -> Option<Vec<String>> {
        match &self.scope {
            Scope::Moment(points, _) => Some(points.iter().map(|p| p.source.clone()).collect()),
            Scope::EveryPoint(Some(s)) => Some(vec![s.clone()]),
            Scope::EveryPoint(None) => None,
        }
    }

    /// `name` in the made-up directory `s`: the name to key its inode by, and its node.
    pub async fn lookup(&self, s: &Synth, name: &[u8]) -> Result<(Vec<u8>, Node), FsError> {
        let name_str = std::str::from_utf8(name).map_err(|_| FsError::NotFound)?;
        match s {
            Synth::Root => match &self.scope {
                Scope::Moment(points, at) => {
                    let p = points.iter().find(|p| p.source == name_str).ok_or(FsError::NotFound)?;
                    Ok((name.to_vec(), self.point_node(p, Some(*at)).await?))
                }
                Scope::EveryPoint(only) => {
                    if only.as_deref().is_some_and(|o| o != name_str) || catalog::validate_source(name_str).is_err() {
                        return Err(FsError::NotFound);
                    }
                    if self.newest(name_str).await?.is_none() {
                        return Err(FsError::NotFound);
                    }
                    Ok((name.to_vec(), Node::synthetic(Synth::Source(name_str.to_string()))))
                }
            },
            Synth::Source(src) => {
                let s = match name {
                    b"latest" => Synth::Latest(src.clone()),
                    b"points" => Synth::Points(src.clone()),
                    b"at" => Synth::At(src.clone()),
                    _ => return Err(FsError::NotFound),
                };
                Ok((name.to_vec(), Node::synthetic(s)))
            }
            Synth::Points(src) => {
                let t: Timestamp = name_str.parse().map_err(|_| FsError::NotFound)?;
                // Usually the target of `latest`, just read.
                let p = match self.newest_known(src).flatten().filter(|p| p.time == t) {
                    Some(p) => p,
                    None => self.repo.point_at(src, t).await?.filter(|p| p.time == t).ok_or(FsError::NotFound)?,
                };
                Ok((name.to_vec(), self.point_or_damaged(&p, None).await?))
            }
            Synth::At(src) => {
                let now = Timestamp::now();
                let spec = parse_time(name_str, now, jiff::tz::TimeZone::system).map_err(|_| FsError::NotFound)?;
                let p = match self.repo.resolve(src, spec, now).await {
                    Ok(p) => p,
                    Err(catalog::RepoError::BeforeFirst { .. } | catalog::RepoError::Future { .. }) => {
                        return Err(FsError::NotFound)
                    }
                    Err(e) => return Err(e.into()),
                };
                // `latest` moves: key it by the point it resolves to now.
                let key =
                    if spec == TimeSpec::Latest { format!("latest@{}", p.name).into_bytes() } else { name.to_vec() };
                Ok((key, self.point_or_damaged(&p, Some(spec.instant(now))).await?))
            }
            Synth::Latest(_) => Err(FsError::NotDir),
            Synth::Damaged(why) => Err(FsError::Damaged(why.clone())),
        }
    }

    /// What the made-up directory `s` holds.
    pub async fn list(&self, s: &Synth) -> Result<Listing, FsError> {
        match s {
            Synth::Root => Ok(Listing::Sources(match self.sources_in_scope() {
                Some(s) => s,
                None => self.repo.sources().await?,
            })),
            Synth::Source(src) => Ok(Listing::Entries(vec![
                (b"latest".to_vec(), Kind::Symlink, Node::synthetic(Synth::Latest(src.clone()))),
                (b"points".to_vec(), Kind::Dir, Node::synthetic(Synth::Points(src.clone()))),
                (b"at".to_vec(), Kind::Dir, Node::synthetic(Synth::At(src.clone()))),
            ])),
            Synth::Points(src) => Ok(Listing::Points(self.repo.points(src).await?)),
            Synth::At(_) => Ok(Listing::Entries(Vec::new())),
            Synth::Latest(_) => Err(FsError::NotDir),
            Synth::Damaged(why) => Err(FsError::Damaged(why.clone())),
        }
    }
}
