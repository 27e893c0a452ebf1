//! What a writer knows of deletion: the packs condemned sets name (`condemned`),
//! as of when it last looked. A writer never takes a condemned pack into
//! deduplication or reuse; when it looks again and finds a pack it already uses
//! newly condemned, it rescues it (`rescued/<K>-<R>`) before going on, so prune
//! spares it. A condemned set that cannot be read is left out: prune never sweeps
//! one it cannot read either.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use jiff::Timestamp;

use crate::condemned::{object_name, Condemned, Rescued, Timing, CONDEMNED_DIR, RESCUED_DIR};
use crate::error::RepoError;
use crate::id::Id;
use crate::object::{open_object, seal_object};
use crate::repo::Repository;
use crate::wal::Lsn;

/// Condemned sets read at once.
const READS: usize = 8;

/// The condemned packs as of `at`.
#[derive(Debug)]
pub struct View {
    pub timing: Timing,
    /// When the listing this view comes from started; `None` before the first, or
    /// when the view must not be trusted (a rescue not yet durable).
    pub at: Option<Instant>,
    /// The condemned sets read (or found unreadable), by name.
    seen: HashSet<String>,
    packs: HashSet<Id>,
    /// The WAL pieces condemned (the only objects other than packs a writer may
    /// need: a base backup being taken needs the WAL from its start).
    names: HashSet<String>,
}

/// What a look at the condemned sets found condemned since the last.
#[derive(Debug, Default)]
pub struct Added {
    pub packs: HashSet<Id>,
    pub names: HashSet<String>,
}

impl View {
    /// An empty view, as old as can be: the first `refresh` fills it.
    pub fn new(timing: Timing) -> View {
        View { timing, at: None, seen: HashSet::new(), packs: HashSet::new(), names: HashSet::new() }
    }

    pub fn condemns(&self, pack: &Id) -> bool {
        self.packs.contains(pack)
    }

    /// Whether a writer may commit with this view.
    pub fn fresh(&self) -> bool {
        self.younger_than(self.timing.view_ttl)
    }

    pub fn younger_than(&self, age: std::time::Duration) -> bool {
        self.at.is_some_and(|at| at.elapsed() < age)
    }

    /// The WAL pieces condemned.
    pub fn condemned_names(&self) -> &HashSet<String> {
        &self.names
    }

    /// Looks at the condemned sets again; returns what was condemned since.
    pub async fn refresh(&mut self, repo: &Repository) -> Result<Added, RepoError> {
        let started = Instant::now();
        let listed = repo.store().list(CONDEMNED_DIR).await?;
        let new: Vec<String> = listed.into_iter().map(|o| o.name).filter(|n| !self.seen.contains(n)).collect();
        let reads = new.into_iter().map(|name| async move {
            match repo.store().get(&name).await {
                Ok(bytes) => Ok((name.clone(), open(repo, &name, &bytes))),
                // Swept meanwhile: its packs are gone, or spared.
                Err(e) if e.is_not_found() => Ok((name, Ok(Condemned::default()))),
                Err(e) => Err(RepoError::from(e)),
            }
        });
        let read: Vec<(String, Result<Condemned, String>)> =
            stream::iter(reads).buffer_unordered(READS).try_collect().await?;
        let mut added = Added::default();
        for (name, set) in read {
            match set {
                Ok(set) => {
                    added.packs.extend(set.packs.into_iter().filter(|p| !self.packs.contains(p)));
                    added
                        .names
                        .extend(set.names.into_iter().filter(|n| n.starts_with("wal/") && !self.names.contains(n)));
                }
                Err(e) => tracing::warn!("condemned set {name} cannot be read, and is left out: {e}"),
            }
            self.seen.insert(name);
        }
        self.packs.extend(added.packs.iter().copied());
        self.names.extend(added.names.iter().cloned());
        self.at = Some(started);
        Ok(added)
    }
}

fn open(repo: &Repository, name: &str, bytes: &[u8]) -> Result<Condemned, String> {
    let plain = open_object(repo.keys(), name, bytes).map_err(|e| e.to_string())?;
    Condemned::decode(&plain).map_err(|e| e.to_string())
}

/// Names `what` in a new rescue, durable when this returns.
pub async fn rescue(repo: &Repository, what: &Rescued) -> Result<(), RepoError> {
    let now = Timestamp::now();
    let name = object_name(RESCUED_DIR, now).ok_or(RepoError::BadTime { time: now.to_string() })?;
    repo.store().put_new(&name, Bytes::from(seal_object(repo.keys(), &name, &what.encode()))).await?;
    tracing::info!(
        "rescued {} packs and {} objects a prune condemned while this writer used them ({name})",
        what.packs.len(),
        what.names.len()
    );
    Ok(())
}

/// Which of `used` still exist, by a listing of every pack: what a writer whose view
/// lapsed checks before it commits.
pub async fn missing_packs(repo: &Repository, used: &HashSet<Id>) -> Result<Vec<Id>, RepoError> {
    let listed: HashMap<Id, u64> = repo
        .store()
        .list(crate::pack::PACKS_DIR)
        .await?
        .iter()
        .filter_map(|o| Some((crate::pack::parse_pack_name(&o.name)?, o.size)))
        .collect();
    Ok(used.iter().filter(|p| !listed.contains_key(p)).copied().collect())
}

/// Whether the stored WAL of `source` on timeline `tli` has a hole after `from`:
/// pieces further on, but not all of the WAL between. What a base backup whose
/// writer stalled checks before it commits: a prune may have deleted WAL it needs.
pub async fn wal_has_hole(repo: &Repository, source: &str, tli: u32, from: Lsn) -> Result<bool, RepoError> {
    let Some(system) = repo.wal_system(source).await? else { return Ok(false) };
    let Some(end) = repo.wal_end(source, &system, tli).await? else { return Ok(false) };
    let covered = repo.wal_covered(source, &system, &[(tli, Lsn(0), None)], from, end).await?;
    Ok(covered < end && end > from)
}
