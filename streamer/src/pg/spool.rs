//! Fetching WAL ahead of PostgreSQL's calls, as pgBackRest's asynchronous
//! archive-get does. PostgreSQL runs `restore_command` once per segment and waits
//! for each; a background fetcher (one per spool directory, under a lock) fetches
//! the segments after the one asked for, several at once, into the spool, so that
//! the next calls find them there and only move them into place.
//!
//! The spool directory holds:
//! - `<segment>`: a whole segment, as the repository had it when fetched. Written
//!   aside (`.<segment>.tmp`), made durable, then renamed: a file under a
//!   segment's name is always all of it. Partial segments (the end of the WAL)
//!   are never spooled: the call for one fetches it itself.
//! - `<segment>.fetching`: the fetcher is fetching it; the call for it waits.
//! - `next`: the segment PostgreSQL asked for last. The fetcher keeps the
//!   `segments` after it (along the timeline PostgreSQL follows) and drops the rest.
//! - `timeline`: the newest timeline whose history PostgreSQL fetched, the one it
//!   recovers along.
//! - `lock`, `fetcher.log`: the fetcher's lock and messages.
//!
//! The fetcher only ever says "here it is". A segment it did not find is not
//! noted: the call for it asks the repository itself, so that "not found" is
//! always as fresh as the call.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use catalog::wal::{Lsn, WalSystem};
use catalog::Repository;

use super::archive::{segment_header, segment_wal, write_synced, ArchiveError};
use super::background::{self, FETCHER_IDLE};
use super::history::{timeline_path, HistoryError, TimelinePath};
use super::names::{is_segment_name, segment_file_name, WalFile};

/// How many segments the fetcher fetches at once: enough to hide a store's
/// latency, few enough that their buffers (a segment each) stay small.
const FETCHES_AT_ONCE: usize = 4;
/// A segment the repository did not have yet is looked for again after this long
/// (a standby following a live source).
const RETRY_MISSING: Duration = Duration::from_secs(1);

/// The long page header a segment begins with, which says what segment it is.
const PAGE_HEADER: usize = 40;
const NEXT: &str = "next";
const TIMELINE: &str = "timeline";
const FETCHING: &str = ".fetching";

/// Where segments fetched ahead wait for PostgreSQL's calls, and how many.
#[derive(Debug, Clone)]
pub struct Spool {
    pub dir: PathBuf,
    /// How many segments after the one asked for are fetched ahead.
    pub segments: usize,
    /// No WAL at or past this position is fetched (`archive-get --until`).
    pub until: Option<Lsn>,
}

impl Spool {
    /// Moves the spooled segment `name` to `dest`: true when it was there and is
    /// that segment. Taken by a rename first, so that no other call or fetcher
    /// changes it while it is checked; a file that is not the segment its name
    /// says is dropped.
    pub fn take(&self, name: &str, dest: &Path) -> std::io::Result<bool> {
        let (spooled, held) = (self.dir.join(name), dest.with_extension("ebb-partial"));
        match std::fs::rename(&spooled, &held) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            // Another filesystem than PostgreSQL's: copied, then made durable.
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                let data = match std::fs::read(&spooled) {
                    Ok(d) => d,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                    Err(e) => return Err(e),
                };
                std::fs::remove_file(&spooled)?;
                if !is_segment(name, &data[..data.len().min(PAGE_HEADER)], data.len() as u64) {
                    return Ok(false);
                }
                write_synced(&held, &data)?;
                std::fs::rename(&held, dest)?;
                return Ok(true);
            }
            Err(e) => return Err(e),
        }
        let f = std::fs::File::open(&held)?;
        let len = f.metadata()?.len();
        let mut header = Vec::with_capacity(PAGE_HEADER);
        f.take(PAGE_HEADER as u64).read_to_end(&mut header)?;
        if !is_segment(name, &header, len) {
            tracing::warn!("{} in {} is not that segment; fetching it again", name, self.dir.display());
            std::fs::remove_file(&held)?;
            return Ok(false);
        }
        std::fs::rename(&held, dest)?;
        Ok(true)
    }

    /// Notes that PostgreSQL asked for segment `name`: the fetcher moves on to the
    /// segments after it.
    pub fn ask(&self, name: &str) -> std::io::Result<()> {
        background::write_note(&self.dir, NEXT, name.as_bytes())
    }

    /// Notes that PostgreSQL fetched the file `name`: the history of a timeline
    /// says which one it recovers along.
    pub fn served(&self, name: &str) {
        let Some(WalFile::History { tli }) = WalFile::parse(name, 16 << 20) else { return };
        if self.noted_timeline().is_some_and(|noted| noted >= tli) {
            return;
        }
        // PostgreSQL fetches the history first, before any segment.
        let noted = crate::state::private_dir(&self.dir)
            .and_then(|_| background::write_note(&self.dir, TIMELINE, tli.to_string().as_bytes()));
        if let Err(e) = noted {
            tracing::warn!("cannot note timeline {tli} in {}: {e}", self.dir.display());
        }
    }

    fn noted_timeline(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join(TIMELINE)).ok()?.trim().parse().ok()
    }

    fn asked(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join(NEXT)).ok().filter(|n| is_segment_name(n))
    }

    fn marker(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}{FETCHING}"))
    }

    /// Whether the fetcher is fetching `name` now.
    pub fn fetching(&self, name: &str) -> bool {
        self.marker(name).exists()
    }

    /// Whether a fetcher holds the lock.
    pub fn fetcher_running(&self) -> bool {
        background::running(&self.dir)
    }

    /// Waits while the fetcher fetches `name`, then takes it: false when the
    /// fetcher did not spool it (the repository does not have all of it, or the
    /// fetcher went away). `fetcher` is the one this call started, if it did.
    pub async fn wait(
        &self,
        name: &str,
        dest: &Path,
        mut fetcher: Option<std::process::Child>,
    ) -> std::io::Result<bool> {
        let mut polls = 0u32;
        loop {
            if self.take(name, dest)? {
                return Ok(true);
            }
            // The fetcher spools a segment before it drops its marker: with the
            // marker gone, the segment is there or will not be.
            if !self.fetching(name) {
                return self.take(name, dest);
            }
            polls += 1;
            if polls.is_multiple_of(100) {
                let gone = match &mut fetcher {
                    Some(child) => !matches!(child.try_wait(), Ok(None)),
                    None => !self.fetcher_running(),
                };
                if gone {
                    return self.take(name, dest);
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Spooled segments, markers and segments being written, by name, each with
    /// the segment it is of.
    fn entries(&self) -> Vec<(String, String)> {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| {
                let segment = n.trim_start_matches('.').get(..24).filter(|s| is_segment_name(s))?.to_string();
                Some((n, segment))
            })
            .collect()
    }

    /// Drops every spooled segment, marker and segment being written except
    /// those of the segments in `keep`.
    fn keep_only(&self, keep: &HashSet<String>) {
        for (n, segment) in self.entries() {
            if !keep.contains(&segment) {
                let _ = std::fs::remove_file(self.dir.join(&n));
            }
        }
    }

    /// Drops the markers and the segments being written that a fetcher killed
    /// before left; what it spooled is whole, and stays.
    fn drop_leftovers(&self) {
        for (n, segment) in self.entries() {
            if n != segment {
                let _ = std::fs::remove_file(self.dir.join(&n));
            }
        }
    }
}

/// Whether a file that begins with `header` and holds `len` bytes is the whole
/// segment `name`: a first page that says so (of any timeline: a timeline's first
/// segment begins with its parent's WAL), and the size that page gives.
fn is_segment(name: &str, header: &[u8], len: u64) -> bool {
    let Some(h) = segment_header(header) else { return false };
    match WalFile::parse(name, h.segment_size) {
        Some(WalFile::Segment { segno, .. }) => {
            len == h.segment_size && segno.checked_mul(h.segment_size) == Some(h.pageaddr)
        }
        _ => false,
    }
}

/// A segment to fetch: its name, timeline and number.
type Ahead = (String, u32, u64);

/// The segments PostgreSQL will ask for after `asked`: the `n` that follow it,
/// each named for the timeline `path` has at its end, as PostgreSQL names them
/// (the newest timeline that began at or before that segment).
fn ahead(asked: u64, n: usize, path: &TimelinePath, segment_size: u64) -> Vec<Ahead> {
    (1..=n as u64)
        .map_while(|i| {
            let segno = asked.checked_add(i)?;
            let last = segno.checked_add(1)?.checked_mul(segment_size)? - 1;
            let tli = path.tli_at(Lsn(last));
            let name = segment_file_name(tli, segno, segment_size);
            // Past the last segment PostgreSQL can name.
            (WalFile::parse(&name, segment_size) == Some(WalFile::Segment { tli, segno })).then_some((name, tli, segno))
        })
        .collect()
}

/// What one fetch came to.
#[derive(Debug)]
enum Fetched {
    Spooled,
    /// The repository does not have all of it (yet).
    Missing,
    Failed(String),
}

/// The background fetcher: keeps the `spool.segments` segments after the one
/// PostgreSQL asked for last in the spool, `FETCHES_AT_ONCE` at a time, until
/// PostgreSQL has asked for nothing for a while; then empties the spool. Returns
/// at once if another fetcher holds the lock.
pub async fn run_fetcher(repo: &Repository, source: &str, spool: &Spool) -> Result<(), ArchiveError> {
    let io = |cause| ArchiveError::Io { path: spool.dir.display().to_string(), cause };
    let Some(_lock) = background::lock(&spool.dir).map_err(io)? else { return Ok(()) };
    let Some(system) = repo.wal_system(source).await? else { return Ok(()) };
    let mut paths: HashMap<u32, Option<TimelinePath>> = HashMap::new();
    let mut asked: Option<(String, Option<u32>)> = None;
    // The segments to have, in the order PostgreSQL will ask for them.
    let mut window: Vec<Ahead> = Vec::new();
    let mut spooled: HashSet<String> = HashSet::new();
    let mut missing: HashMap<String, Instant> = HashMap::new();
    let mut busy: HashSet<String> = HashSet::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut idle_since = Instant::now();
    spool.drop_leftovers();
    loop {
        if !spool.dir.is_dir() {
            // The data directory went away.
            return Ok(());
        }
        let now = spool.asked().map(|name| (name, spool.noted_timeline()));
        if let Some((name, noted)) = now.clone().filter(|now| Some(now) != asked.as_ref()) {
            asked = now;
            idle_since = Instant::now();
            window = match WalFile::parse(&name, system.segment_size) {
                Some(WalFile::Segment { tli, segno }) => {
                    match follow(repo, source, &mut paths, tli, noted, segno, &system).await? {
                        Some(path) => ahead(segno, spool.segments, &path, system.segment_size),
                        None => Vec::new(),
                    }
                }
                _ => Vec::new(),
            };
            tracing::debug!("asked for {name}: fetching ahead {:?}", window.iter().map(|w| &w.0).collect::<Vec<_>>());
            let keep: HashSet<String> =
                window.iter().map(|w| w.0.clone()).chain([name]).chain(busy.iter().cloned()).collect();
            spool.keep_only(&keep);
            spooled.retain(|n| keep.contains(n));
            missing.retain(|n, _| keep.contains(n));
        }
        for (name, tli, segno) in &window {
            if tasks.len() >= FETCHES_AT_ONCE.min(spool.segments).max(1) {
                break;
            }
            if busy.contains(name) || spooled.contains(name) {
                continue;
            }
            // The end of what the repository has: nothing after it is looked for
            // until it is there.
            if missing.get(name).is_some_and(|t| t.elapsed() < RETRY_MISSING) {
                break;
            }
            if spool.dir.join(name).exists() {
                spooled.insert(name.clone());
                continue;
            }
            let Some(path) = timeline(repo, source, &mut paths, *tli).await? else { break };
            if let Err(e) = std::fs::write(spool.marker(name), b"") {
                tracing::warn!("cannot mark {name} as being fetched in {}: {e}", spool.dir.display());
                break;
            }
            busy.insert(name.clone());
            let (repo, source, spool, name, segno) =
                (repo.clone(), source.to_string(), spool.clone(), name.clone(), *segno);
            tasks.spawn(async move {
                let fetched = fetch(&repo, &source, &system, &path, segno, &spool, &name).await;
                // Only after the segment is in place: a call that sees no marker
                // finds the segment, or knows the fetcher does not have it.
                let _ = std::fs::remove_file(spool.marker(&name));
                (name, fetched)
            });
        }
        if tasks.is_empty() {
            if idle_since.elapsed() > FETCHER_IDLE {
                spool.keep_only(&HashSet::new());
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        // Woken by a fetch that ended, or soon anyway, to see what PostgreSQL asks.
        tokio::select! {
            done = tasks.join_next() => {
                let Some(done) = done else { continue };
                let (name, fetched) = done.expect("a WAL fetch panicked");
                busy.remove(&name);
                tracing::debug!("{name}: {fetched:?}");
                match fetched {
                    Fetched::Spooled => {
                        spooled.insert(name);
                    }
                    Fetched::Missing => {
                        missing.insert(name, Instant::now());
                    }
                    Fetched::Failed(why) => {
                        tracing::warn!("cannot fetch {name} ahead: {why}");
                        missing.insert(name, Instant::now());
                    }
                }
            }
            () = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
}

/// The path of timeline `tli`, read once; `None` when its history is missing or
/// malformed (the call for a segment of it says so to PostgreSQL).
async fn timeline(
    repo: &Repository,
    source: &str,
    paths: &mut HashMap<u32, Option<TimelinePath>>,
    tli: u32,
) -> Result<Option<TimelinePath>, ArchiveError> {
    if let Some(p) = paths.get(&tli) {
        return Ok(p.clone());
    }
    let path = match timeline_path(repo, source, tli).await {
        Ok(p) => Some(p),
        Err(e @ (HistoryError::Missing { .. } | HistoryError::Malformed { .. })) => {
            tracing::warn!("{e}");
            None
        }
        Err(HistoryError::Repo(e)) => return Err(e.into()),
    };
    paths.insert(tli, path.clone());
    Ok(path)
}

/// The path PostgreSQL recovers along after asking for segment `segno` of `tli`:
/// the timeline whose history it fetched last, when that leads through `tli`
/// there, else `tli`'s own.
async fn follow(
    repo: &Repository,
    source: &str,
    paths: &mut HashMap<u32, Option<TimelinePath>>,
    tli: u32,
    noted: Option<u32>,
    segno: u64,
    system: &WalSystem,
) -> Result<Option<TimelinePath>, ArchiveError> {
    if let Some(target) = noted.filter(|&t| t > tli) {
        let last = segno.saturating_add(1).saturating_mul(system.segment_size).saturating_sub(1);
        if let Some(path) = timeline(repo, source, paths, target).await? {
            if path.tli_at(Lsn(last)) == tli {
                return Ok(Some(path));
            }
        }
    }
    timeline(repo, source, paths, tli).await
}

/// Fetches segment `segno` along `path` into the spool as `name`, if the
/// repository has all of it.
async fn fetch(
    repo: &Repository,
    source: &str,
    system: &WalSystem,
    path: &TimelinePath,
    segno: u64,
    spool: &Spool,
    name: &str,
) -> Fetched {
    let wal = match segment_wal(repo, source, system, path, segno, spool.until).await {
        Ok(w) => w,
        Err(e) => return Fetched::Failed(e.to_string()),
    };
    if wal.len() as u64 != system.segment_size {
        return Fetched::Missing;
    }
    let (tmp, to) = (spool.dir.join(format!(".{name}.tmp")), spool.dir.join(name));
    let written = tokio::task::spawn_blocking(move || {
        write_synced(&tmp, &wal).and_then(|()| std::fs::rename(&tmp, &to)).map_err(|e| (tmp, e))
    })
    .await;
    match written {
        Ok(Ok(())) => Fetched::Spooled,
        Ok(Err((tmp, e))) => {
            let _ = std::fs::remove_file(&tmp);
            Fetched::Failed(format!("{}: {e}", tmp.display()))
        }
        Err(e) => Fetched::Failed(e.to_string()),
    }
}
