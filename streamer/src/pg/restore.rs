//! `ebb pg restore --at T`: the newest base backup at or before T, written to a data
//! directory configured to recover to exactly T: `restore_command` through `ebb pg
//! archive-get`, `recovery_target_time`, and `recovery.signal`.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};

use catalog::wal::{Lsn, WalPiece, WalSystem};
use catalog::{Manifest, PointRef, RepoError, Repository, RestoreOptions};
use jiff::Timestamp;

use super::history::{timeline_path, HistoryError, TimelinePath};
use super::walscan::{Scanner, Step, XactEnd};
use super::wire::PG_EPOCH_MICROS;
use super::{info, lsn};

#[derive(Debug, thiserror::Error)]
pub enum PgRestoreError {
    #[error("{0}")]
    Bad(String),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error(transparent)]
    Restore(#[from] catalog::RestoreError),
    #[error("{path}: {cause}")]
    Io { path: String, cause: std::io::Error },
}

pub struct PgRestoreOptions {
    pub source: String,
    pub at: Timestamp,
    pub target: PathBuf,
    /// The command PostgreSQL runs to fetch WAL, up to ` %f %p`.
    pub archive_get: String,
}

pub struct PgRestoreReport {
    pub point: PointRef,
    pub manifest: Manifest,
    pub timeline: u32,
    /// Whether recovery stops at T (a transaction ended after T), or replays all the
    /// WAL there is (every transaction in it ended at or before T).
    pub target_time: bool,
    /// How far the stored WAL reaches from the backup on, contiguously: where it
    /// ends when `target_time` is false; else at least past the backup's stop
    /// (the WAL was listed only as far as recovery to T needs).
    pub wal_end: Lsn,
    pub files: catalog::RestoreReport,
}

/// The timeline `source` was on at `at`: the newest one whose first WAL was
/// received at or before `at`. A timeline born later (a copy restored and promoted
/// after `at`) is not the history of that moment.
pub async fn timeline_at(
    repo: &Repository,
    source: &str,
    system: &WalSystem,
    at: Timestamp,
) -> Result<u32, HistoryError> {
    let mut tlis = repo.wal_history_timelines(source).await?;
    tlis.sort_unstable_by(|a, b| b.cmp(a));
    for tli in tlis {
        let path = timeline_path(repo, source, tli).await?;
        let begin = path.0.last().map_or(Lsn(0), |(_, b, _)| *b);
        let first = repo.wal_pieces(source, system, tli, begin, Lsn(begin.0 + 1)).await?;
        let Some(piece) = first.first() else { continue };
        // Born when its first WAL reached ebb, or when its first transaction ended.
        let times = repo.wal_times(source, piece).await?;
        if times.received <= at {
            return Ok(tli);
        }
        // WAL streamed only after the promotion: the first transaction on the
        // timeline says when it was already there.
        let scanner = Scanner::new(begin, system.segment_size);
        let (first_end, _) = scan(repo, source, system, &path, scanner, |_| true).await?;
        if first_end.is_some_and(|x| x.time + PG_EPOCH_MICROS <= at.as_microsecond()) {
            return Ok(tli);
        }
    }
    Ok(1)
}

/// What recovering `source` to `at` takes: the base backup to start from, the
/// timeline, and whether recovery stops at T or replays all the WAL there is.
pub struct RecoveryPlan {
    pub point: PointRef,
    pub manifest: Manifest,
    /// Base backups newer than `point` at or before T that cannot be read, and why.
    pub damaged: Vec<(PointRef, String)>,
    pub timeline: u32,
    /// Where the base backup's WAL starts and where it becomes consistent.
    pub start: Lsn,
    pub stop: Lsn,
    /// Whether a transaction ended after T (recovery stops there), or every one
    /// in the stored WAL ended at or before T (recovery replays it all).
    pub target_time: bool,
    /// How far the stored WAL reaches from the backup on, contiguously: where it
    /// ends when `target_time` is false; else at least past `stop`.
    pub wal_end: Lsn,
    /// How far recovery replays: to the end of the first transaction after T, or
    /// of the stored WAL (never short of `stop`).
    pub replay_to: Lsn,
}

/// The plan to recover `source` to `at`; nothing is written.
pub async fn recovery_plan(repo: &Repository, source: &str, at: Timestamp) -> Result<RecoveryPlan, PgRestoreError> {
    let named = match repo.resolve(source, catalog::time::TimeSpec::At(at), Timestamp::now()).await {
        Ok(p) => p,
        Err(RepoError::BeforeFirst { earliest, .. }) => {
            return Err(PgRestoreError::Bad(format!(
                "{at} is before the earliest moment source {source} can be restored to: {earliest}, its first base backup"
            )))
        }
        Err(e @ (RepoError::NoPoints { .. } | RepoError::UnknownSource { .. })) => {
            return Err(match repo.wal_system(source).await? {
                Some(_) => PgRestoreError::Bad(format!(
                    "source {source} has WAL but no base backup yet: take one with `ebb pg base-backup --source {source}`"
                )),
                None => e.into(),
            })
        }
        Err(e) => return Err(e.into()),
    };
    // A base backup that cannot be read is passed over for the one before it.
    let catalog::Readable { point, manifest, damaged } =
        repo.readable_point_at(source, named.time).await?.ok_or_else(|| {
            PgRestoreError::Bad(format!(
                "no base backup of source {source} at or before {at} can be read (`ebb verify` says what is damaged)"
            ))
        })?;
    for (p, why) in &damaged {
        tracing::warn!("base backup {} cannot be read ({why}); using the one before it, {}", p.time, point.time);
    }
    let pg = manifest.pg.clone().ok_or_else(|| {
        PgRestoreError::Bad(format!("source {source} is not a PostgreSQL source (its points are not base backups)"))
    })?;
    let (start, stop) = info::wal_range(&pg).map_err(|e| PgRestoreError::Bad(format!("point {}: {e}", point.name)))?;
    let system =
        repo.wal_system(source).await?.unwrap_or(WalSystem { system_id: pg.system_id, segment_size: pg.segment_size });
    let tli = timeline_at(repo, source, &system, at).await?;
    let path = timeline_path(repo, source, tli).await?;
    if path.tli_at(start) != pg.timeline {
        let start = lsn::text(start);
        return Err(PgRestoreError::Bad(format!(
            "the base backup of {} is on timeline {}, which timeline {tli} does not descend from at {start}",
            point.time, pg.timeline
        )));
    }
    let (target_end, wal_end) = ends_after(repo, source, &system, &path, start, stop, at).await?;
    if wal_end < stop {
        let (start, stop, wal_end) = (lsn::text(start), lsn::text(stop), lsn::text(wal_end));
        return Err(PgRestoreError::Bad(format!(
            "the base backup of {} needs the WAL from {start} to {stop}, and the repository has it only to {wal_end}: \
             is `ebb stream pg` or archive_command shipping WAL for source {source}?",
            point.time
        )));
    }
    let target_time = target_end.is_some();
    let replay_to = target_end.unwrap_or(wal_end).max(stop);
    Ok(RecoveryPlan { point, manifest, damaged, timeline: tli, start, stop, target_time, wal_end, replay_to })
}

pub async fn pg_restore(repo: &Repository, opts: &PgRestoreOptions) -> Result<PgRestoreReport, PgRestoreError> {
    let plan = recovery_plan(repo, &opts.source, opts.at).await?;
    // PostgreSQL syncs the data directory when it starts (recovery_init_sync_method):
    // writing each file back as soon as it is complete leaves that sync little to do.
    let restore = RestoreOptions { target: opts.target.clone(), write_back: true, ..Default::default() };
    let files = catalog::restore(repo, &plan.manifest, restore).await?;
    configure(&opts.target, opts, &plan)?;
    let RecoveryPlan { point, manifest, timeline, target_time, wal_end, .. } = plan;
    Ok(PgRestoreReport { point, manifest, timeline, target_time, wal_end, files })
}

/// How far ahead of the clock of the host that stored the WAL (`ebb stream pg`,
/// `archive-push`) PostgreSQL's clock may be. `ends_after` skips the WAL stored
/// more than this long before T without reading it.
pub const CLOCK_MARGIN: jiff::SignedDuration = jiff::SignedDuration::from_secs(60);

/// Where the first transaction that ended after `at` ends in the WAL from `start`
/// along `path`, if one did; and
/// where the contiguous WAL ends or, when one did, how far it reaches at least
/// (past `need`, if it does). Reads the WAL from the start of the last segment
/// stored more than `CLOCK_MARGIN` before `at` (`scan_from`), not all of it, and
/// lists the WAL only as far as that segment and `need`, not to its end: in
/// windows that double, each ending with a look at the time its last segment was
/// received.
async fn ends_after(
    repo: &Repository,
    source: &str,
    system: &WalSystem,
    path: &TimelinePath,
    start: Lsn,
    need: Lsn,
    at: Timestamp,
) -> Result<(Option<Lsn>, Lsn), PgRestoreError> {
    let at_pg = at.as_microsecond() - PG_EPOCH_MICROS;
    let cutoff = at.checked_sub(CLOCK_MARGIN).unwrap_or(Timestamp::MIN);
    let mut plan: Vec<(WalPiece, Lsn, Lsn)> = Vec::new();
    let mut covered = start;
    // The start of a segment known to have been received by the cutoff.
    let mut early: Option<Lsn> = None;
    let mut width = system.segment_size;
    loop {
        let to = Lsn(covered.0.saturating_add(width)).max(need);
        plan.extend(repo.wal_plan(source, system, &path.0, covered, to).await?);
        let reached = plan.last().map_or(start, |(_, _, end)| *end);
        if reached < to {
            // A gap, or the end of what is stored.
            covered = reached;
            break;
        }
        covered = reached;
        let last_first = plan.iter().rev().find(|(p, from, _)| is_first(system, start, p, *from)).map(|(p, _, _)| p);
        if let Some(p) = last_first.filter(|p| early.is_none_or(|e| p.start > e)) {
            if repo.segment_received(source, p).await? > cutoff {
                break;
            }
            early = Some(p.start);
        }
        if to.0 == u64::MAX {
            break;
        }
        width = width.saturating_mul(2);
    }
    let scanner = scan_from(repo, source, system, &plan, start, early, cutoff).await?;
    match scan(repo, source, system, path, scanner, |x| x.time > at_pg).await? {
        // The plan is contiguous from `start`: the WAL reaches at least as far as
        // it does (or the scan read further: WAL stored since).
        (Some(x), next) => Ok((Some(x.lsn), covered.max(next))),
        (None, end) => Ok((None, end)),
    }
}

/// Whether `(piece, from)` of a plan from `start` is the first piece of a segment
/// after `start`'s.
fn is_first(system: &WalSystem, start: Lsn, piece: &WalPiece, from: Lsn) -> bool {
    from > start && from.0.is_multiple_of(system.segment_size) && piece.start == from
}

/// Where a scan for the first transaction end after T may start: at the start of
/// the last segment whose first piece (in `plan`, the contiguous WAL from `start`)
/// was received at or before `cutoff`, found by a binary search that reads a
/// piece per step among those after `early` (one known to be); at `start` when
/// there is none.
///
/// WAL is sent, archived or streamed, only once written, and a transaction's time
/// is taken before its record is written: every record before a piece received at
/// R (ebb's clock) is of a transaction that ended by R on PostgreSQL's clock, so
/// none of them ended after T when R is at least `CLOCK_MARGIN` before T. A
/// segment picked is always such a one; the search finds the last one when the
/// times grow with the positions, as they do unless old WAL was archived late.
async fn scan_from(
    repo: &Repository,
    source: &str,
    system: &WalSystem,
    plan: &[(WalPiece, Lsn, Lsn)],
    start: Lsn,
    early: Option<Lsn>,
    cutoff: Timestamp,
) -> Result<Scanner, RepoError> {
    let firsts: Vec<&WalPiece> = plan
        .iter()
        .filter(|(p, from, _)| is_first(system, start, p, *from) && early.is_none_or(|e| p.start > e))
        .map(|(p, _, _)| p)
        .collect();
    let (mut lo, mut hi, mut best) = (0, firsts.len(), early);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if repo.segment_received(source, firsts[mid]).await? <= cutoff {
            best = Some(firsts[mid].start);
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(match best {
        Some(segment) => Scanner::at_segment(segment, system.segment_size),
        None => Scanner::new(start, system.segment_size),
    })
}

/// Reads the WAL along `path` from where `scanner` starts until a transaction end
/// that `stop` accepts: returns it, or none at the end of the contiguous WAL, and
/// how far the WAL was read.
async fn scan(
    repo: &Repository,
    source: &str,
    system: &WalSystem,
    path: &TimelinePath,
    mut scanner: Scanner,
    mut stop: impl FnMut(&XactEnd) -> bool,
) -> Result<(Option<XactEnd>, Lsn), RepoError> {
    let mut next = scanner.buffered_end();
    let mut ahead = Ahead { repo, source, system, path, fetching: VecDeque::new() };
    loop {
        match scanner.next_record() {
            Step::End(x) if stop(&x) => return Ok((Some(x), next)),
            Step::End(_) | Step::Other => {}
            Step::Finished => return Ok((None, scanner.buffered_end())),
            Step::NeedMore => {
                let seg_end = Lsn(system.segment_start(next).0 + system.segment_size);
                let wal = ahead.segment(next).await?;
                let full = next.0 + wal.len() as u64 == seg_end.0;
                next = Lsn(next.0 + wal.len() as u64);
                scanner.push(&wal, !full);
            }
        }
    }
}

/// How many segments `scan` fetches ahead of the one it reads: fetching one
/// (reading, decrypting, decompressing it) costs several times what reading its
/// records does, and two fetches keep two cores busy. Where the scan stops, at
/// most that many were fetched for nothing.
const SCAN_AHEAD: u64 = 2;

/// The WAL from a position to the end of its segment, being fetched.
type Fetch = tokio::task::JoinHandle<Result<Vec<u8>, RepoError>>;

/// The WAL `scan` reads, fetched ahead of it: the rest of the segment from a
/// position, then whole segments. What is still being fetched when it is
/// dropped is abandoned.
struct Ahead<'a> {
    repo: &'a Repository,
    source: &'a str,
    system: &'a WalSystem,
    path: &'a TimelinePath,
    /// Where each fetch starts, in order.
    fetching: VecDeque<(Lsn, Fetch)>,
}

impl Ahead<'_> {
    /// The WAL from `from` to the end of its segment (shorter where the stored WAL
    /// ends), with the `SCAN_AHEAD` segments after it being fetched meanwhile.
    async fn segment(&mut self, from: Lsn) -> Result<Vec<u8>, RepoError> {
        let size = self.system.segment_size;
        let seg_end = Lsn(self.system.segment_start(from).0 + size);
        if self.fetching.front().is_some_and(|(at, _)| *at != from) {
            self.abandon();
        }
        let task = match self.fetching.pop_front() {
            Some((_, task)) => task,
            None => self.fetch(from),
        };
        while (self.fetching.len() as u64) < SCAN_AHEAD {
            let at = self.fetching.back().map_or(seg_end, |(at, _)| Lsn(at.0 + size));
            let task = self.fetch(at);
            self.fetching.push_back((at, task));
        }
        match task.await {
            Ok(wal) => wal,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Not abandoned while awaited: only a runtime shutting down cancels it.
            Err(_) => self.repo.wal_bytes(self.source, self.system, &self.path.0, from, seg_end).await,
        }
    }

    /// The WAL from `at` to the end of its segment, fetched on a task of its own.
    fn fetch(&self, at: Lsn) -> Fetch {
        let (repo, source, system, path) =
            (self.repo.clone(), self.source.to_string(), *self.system, self.path.0.clone());
        let to = Lsn(system.segment_start(at).0 + system.segment_size);
        tokio::spawn(async move { repo.wal_bytes(&source, &system, &path, at, to).await })
    }

    fn abandon(&mut self) {
        for (_, task) in self.fetching.drain(..) {
            task.abort();
        }
    }
}

impl Drop for Ahead<'_> {
    fn drop(&mut self) {
        self.abandon();
    }
}

/// `recovery_target_time` as PostgreSQL reads it: UTC, microseconds, truncated so
/// that a transaction at T itself is included.
pub fn pg_time(t: Timestamp) -> String {
    let micros = t.as_microsecond();
    let t = Timestamp::from_microsecond(micros).unwrap_or(t);
    format!("{}+00", t.strftime("%Y-%m-%d %H:%M:%S%.6f"))
}

/// The restore_command's cap when every transaction in the stored WAL ended by
/// T: WAL stored after the plan was made is never replayed, and a recovery with
/// no target to stop at stops where the WAL the plan saw ends.
pub fn until(plan: &RecoveryPlan) -> String {
    if plan.target_time {
        String::new()
    } else {
        format!(" --until {}", lsn::text(plan.wal_end))
    }
}

fn configure(dir: &Path, opts: &PgRestoreOptions, plan: &RecoveryPlan) -> Result<(), PgRestoreError> {
    let (tli, target_time) = (plan.timeline, plan.target_time);
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |cause| PgRestoreError::Io { path, cause }
    };
    let conf = dir.join("postgresql.auto.conf");
    // A copy that archived into the source it came from would start a timeline
    // there, which later restores would take for the source's history.
    let mut text = format!(
        "\n# Added by `ebb pg restore`: recover source {} to {}.\nrestore_command = '{}{} %f %p'\n\
         recovery_target_timeline = '{tli}'\n\
         # Not archiving into the source this copy came from; to make this copy a new primary,\n\
         # enable archiving again or run `ebb stream pg` on it.\narchive_mode = 'off'\n\
         # The restored files are not synced yet: PostgreSQL syncs them as it starts, with one\n\
         # syncfs rather than an fsync per file.\nrecovery_init_sync_method = 'syncfs'\n",
        opts.source,
        opts.at,
        opts.archive_get.replace('\'', "''"),
        until(plan)
    );
    if target_time {
        text.push_str(&format!(
            "recovery_target_time = '{}'\nrecovery_target_inclusive = on\nrecovery_target_action = 'promote'\n",
            pg_time(opts.at)
        ));
    } else {
        text.push_str("# Every transaction in the repository's WAL ended at or before that time: recover it all,\n# and nothing stored after it (restore_command --until).\n");
    }
    let mut f = std::fs::OpenOptions::new().append(true).create(true).open(&conf).map_err(io(&conf))?;
    f.write_all(text.as_bytes()).map_err(io(&conf))?;
    let signal = dir.join("recovery.signal");
    std::fs::write(&signal, b"").map_err(io(&signal))?;
    let _ = std::fs::remove_file(dir.join("standby.signal"));
    // The new files belong to whoever owns the data directory.
    let meta = std::fs::metadata(dir).map_err(io(dir))?;
    for p in [&conf, &signal] {
        use std::os::unix::fs::MetadataExt;
        let _ = std::os::unix::fs::chown(p, Some(meta.uid()), Some(meta.gid()));
    }
    let wal = dir.join("pg_wal");
    if !wal.exists() {
        std::fs::create_dir(&wal).map_err(io(&wal))?;
    }
    Ok(())
}

/// What of a PostgreSQL source can be restored: from its oldest base backup to
/// the newest stored WAL, except across gaps in the WAL.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Restorable {
    pub source: String,
    pub timeline: u32,
    /// The oldest base backup's time.
    pub from: Option<Timestamp>,
    /// When the newest stored WAL was received.
    pub to: Option<Timestamp>,
    pub wal_end: Option<String>,
    /// WAL that is missing (a lost slot, a store emptied by hand): restores to times
    /// after a gap need a base backup taken after it.
    pub gaps: Vec<Gap>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Gap {
    pub timeline: u32,
    pub from: String,
    pub to: String,
    /// When the WAL after the gap was received.
    pub until: Option<Timestamp>,
}

/// When the newest WAL of `source` was stored, if it has any: how far behind the
/// repository is for a PostgreSQL source, whose points (base backups) are rare.
/// About 64 one-name listings and one read.
pub async fn wal_newest(repo: &Repository, source: &str) -> Result<Option<Timestamp>, HistoryError> {
    let Some(system) = repo.wal_system(source).await? else { return Ok(None) };
    let tli = timeline_at(repo, source, &system, Timestamp::now()).await?;
    let Some(end) = repo.wal_end(source, &system, tli).await? else { return Ok(None) };
    let seg = system.segment_start(Lsn(end.0 - 1));
    let pieces = repo.wal_pieces(source, &system, tli, seg, end).await?;
    let Some(last) = pieces.iter().max_by_key(|p| p.end) else { return Ok(None) };
    Ok(Some(repo.wal_times(source, last).await?.stored))
}

/// The restorable range of `source`, from listings and a read of the pieces at its
/// ends and around each gap.
pub async fn restorable(
    repo: &Repository,
    source: &str,
    backups: &[(Timestamp, Lsn)],
) -> Result<Restorable, HistoryError> {
    let mut r = Restorable {
        source: source.to_string(),
        timeline: 1,
        from: backups.iter().map(|b| b.0).min(),
        to: None,
        wal_end: None,
        gaps: Vec::new(),
    };
    let Some(system) = repo.wal_system(source).await? else { return Ok(r) };
    r.timeline = timeline_at(repo, source, &system, Timestamp::now()).await?;
    let path = timeline_path(repo, source, r.timeline).await?;
    let Some(start) = backups.iter().map(|b| b.1).min() else { return Ok(r) };
    let mut at = start;
    let mut last = None;
    for &(tli, begin, end) in &path.0 {
        let hi = end.unwrap_or(Lsn(u64::MAX));
        if hi <= at {
            continue;
        }
        let lo = at.max(begin);
        let mut pieces = repo.wal_pieces(source, &system, tli, lo, hi).await?;
        pieces.sort_by_key(|p| p.start);
        for p in pieces {
            if p.end <= at {
                continue;
            }
            if p.start > at {
                let times = repo.wal_times(source, &p).await?;
                r.gaps.push(Gap {
                    timeline: tli,
                    from: lsn::text(at).to_string(),
                    to: lsn::text(p.start).to_string(),
                    until: Some(times.received),
                });
            }
            at = p.end.min(hi);
            last = Some(p);
        }
    }
    if let Some(p) = last {
        let times = repo.wal_times(source, &p).await?;
        r.to = Some(times.stored);
        r.wal_end = Some(lsn::text(at).to_string());
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use catalog::faults::{Fault, Faults, Op};
    use catalog::{KdfParams, Secret, Store};

    use super::*;
    use crate::pg::testwal::MadeUp;

    const SEG: u64 = 1 << 20;
    const SYSTEM: WalSystem = WalSystem { system_id: 7, segment_size: SEG };

    fn unix(pg_micros: i64) -> Timestamp {
        Timestamp::from_microsecond(pg_micros + PG_EPOCH_MICROS).unwrap()
    }

    /// A base backup's WAL and `segments` segments after it, the last one partial:
    /// records of many sizes (some spanning pages and segments), a commit every 8
    /// records, 10 s apart. Each segment is stored as a piece, every fifth as two,
    /// received half a second after the last commit before it. `late` segments
    /// were archived a day late.
    struct Wal {
        repo: Repository,
        gets: Faults,
        made: MadeUp,
        start: Lsn,
        path: TimelinePath,
    }

    async fn stored_wal(segments: u64, late: &[u64], missing: &[u64]) -> Wal {
        let mut made = MadeUp::new(SEG);
        let mut time = 800_000_000_000_000i64;
        let sizes = [100, 3000, 20_000, 50, 9000, 700, 40, 12_000];
        let mut i = 0;
        while (made.wal.len() as u64) < segments * SEG + SEG / 2 {
            if i % 8 == 7 {
                time += 10_000_000;
                made.commit(time);
            } else {
                made.other(sizes[i % sizes.len()]);
            }
            i += 1;
        }
        let start = Lsn(made.records.iter().find(|(at, _)| *at > SEG + 5000).unwrap().0);

        let store = Store::memory();
        let secret = Secret::Password(b"pw".to_vec());
        let kdf = KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };
        let plain = Repository::init(store.clone(), &secret, kdf, "h".into()).await.unwrap().0;
        plain.claim_wal_system("db", SYSTEM).await.unwrap();
        let last_commit_before =
            |at: u64| made.records.iter().take_while(|(r, _)| *r < at).filter_map(|(_, t)| *t).last().unwrap_or(time);
        let end = made.wal.len() as u64;
        for seg in 0..=end / SEG {
            if missing.contains(&seg) {
                continue;
            }
            let (from, to) = (seg * SEG, ((seg + 1) * SEG).min(end));
            let cuts: Vec<u64> = if seg % 5 == 0 { vec![from, from + 300_001, to] } else { vec![from, to] };
            for w in cuts.windows(2) {
                let piece = WalPiece { tli: 1, start: Lsn(w[0]), end: Lsn(w[1]) };
                let mut received = unix(last_commit_before(w[0])) + jiff::SignedDuration::from_millis(500);
                if late.contains(&seg) {
                    received += jiff::SignedDuration::from_hours(24);
                }
                plain.put_wal("db", &piece, received, &made.wal[w[0] as usize..w[1] as usize]).await.unwrap();
            }
        }
        let gets = Faults::new();
        // A rule whose fault changes nothing: it only counts the reads of pieces.
        gets.always(Op::Get, "wal/db/00000001/", Fault::Delay(Duration::ZERO));
        let repo = Repository::open(store.with_faults(gets.clone()), &secret).await.unwrap();
        Wal { repo, gets, made, start, path: TimelinePath::parse(1, None).unwrap() }
    }

    impl Wal {
        /// `ends_after` needing the WAL to `need`, and how many pieces it read.
        async fn lookup_to(&self, at: Timestamp, need: Lsn) -> ((bool, Lsn), usize) {
            let before = self.gets.fired();
            let r = ends_after(&self.repo, "db", &SYSTEM, &self.path, self.start, need, at).await.unwrap();
            let r = (r.0.is_some(), r.1);
            (r, self.gets.fired() - before)
        }

        async fn lookup(&self, at: Timestamp) -> ((bool, Lsn), usize) {
            self.lookup_to(at, self.start).await
        }

        /// Whether `fast` answers as `full` does: the same, but where a transaction
        /// end was found, the WAL's reach at least to `need` (if it goes so far)
        /// rather than its end.
        fn agrees(fast: (bool, Lsn), full: (bool, Lsn), need: Lsn) -> bool {
            fast.0 == full.0 && if fast.0 { fast.1 <= full.1 && fast.1 >= need.min(full.1) } else { fast.1 == full.1 }
        }

        /// What `ends_after` answered before it jumped: every record from the
        /// base backup on read, until a transaction end after `at`.
        async fn full_scan(&self, at: Timestamp) -> ((bool, Lsn), usize) {
            let before = self.gets.fired();
            let at_pg = at.as_microsecond() - PG_EPOCH_MICROS;
            let (repo, path) = (&self.repo, &self.path);
            let scanner = Scanner::new(self.start, SEG);
            let r = match scan(repo, "db", &SYSTEM, path, scanner, |x| x.time > at_pg).await.unwrap() {
                (Some(_), end) => (true, repo.wal_covered("db", &SYSTEM, &path.0, end, Lsn(u64::MAX)).await.unwrap()),
                (None, end) => (false, end),
            };
            (r, self.gets.fired() - before)
        }

        fn commits(&self) -> Vec<i64> {
            self.made.records.iter().filter(|(at, _)| *at >= self.start.0).filter_map(|(_, t)| *t).collect()
        }
    }

    /// The moments the answers are compared at: before every commit, at commits
    /// and a microsecond either side, within the clock margin of the end, after
    /// the last.
    fn moments(commits: &[i64], picks: &[usize]) -> Vec<Timestamp> {
        let n = commits.len();
        let mut out = vec![unix(commits[0] - 3_600_000_000), unix(commits[n - 1] + 3_600_000_000)];
        for k in picks.iter().map(|&k| k.min(n - 1)) {
            out.extend([unix(commits[k] - 1), unix(commits[k]), unix(commits[k] + 1), unix(commits[k] + 5_000_000)]);
        }
        out
    }

    /// The pieces a scan may read ahead of what it needs: `SCAN_AHEAD` segments of
    /// at most two pieces each.
    const AHEAD: usize = 2 * SCAN_AHEAD as usize;

    #[tokio::test]
    async fn the_time_lookup_reads_few_pieces_and_answers_as_the_full_scan_does() {
        let wal = stored_wal(128, &[], &[]).await;
        let commits = wal.commits();
        assert!(commits.len() > 500, "{} commits", commits.len());
        let n = commits.len();
        let needs = [wal.start, Lsn(wal.start.0 + 40 * SEG + 5), Lsn(u64::MAX)];
        for at in moments(&commits, &[0, 1, n / 7, n / 3, n / 2, 2 * n / 3, n - 8, n - 2, n - 1]) {
            let (full, read_all) = wal.full_scan(at).await;
            for need in needs {
                let (fast, _) = wal.lookup_to(at, need).await;
                assert!(Wal::agrees(fast, full, need), "at {at}, needing {need:?}: {fast:?}, the full scan {full:?}");
            }
            let (fast, read) = wal.lookup(at).await;
            assert!(Wal::agrees(fast, full, wal.start), "at {at}: {fast:?}, the full scan {full:?}");
            // Near the base backup there is little to skip; further on, most of it.
            assert!(read <= read_all.max(9 + AHEAD), "at {at}: {read} pieces read, {read_all} by the full scan");
            if at > unix(commits[n / 3]) {
                assert!(
                    read.saturating_sub(AHEAD) * 4 < read_all,
                    "at {at}: {read} pieces read, {read_all} by the full scan"
                );
            }
        }
        // A moment in the middle: windows doubling to it (7 looks), a binary search
        // over the last one's 64 segments (6), and the segment or two before the
        // moment, where the full scan reads half the WAL; and what the scan fetched
        // ahead.
        let (_, read) = wal.lookup(unix(commits[commits.len() / 2])).await;
        let (_, read_all) = wal.full_scan(unix(commits[commits.len() / 2])).await;
        assert!(read <= 16 + AHEAD, "{read} pieces read, {read_all} by the full scan");
        assert!(read_all >= 70, "{read_all}");
    }

    #[tokio::test]
    async fn late_archived_segments_and_gaps_give_the_full_scans_answers() {
        // Segments received out of order (archived a day late) mislead the binary
        // search only into reading more; a missing segment ends the WAL there.
        for (late, missing) in [(vec![10, 30, 31, 50], vec![]), (vec![3], vec![45]), (vec![], vec![2])] {
            let wal = stored_wal(64, &late, &missing).await;
            let n = wal.commits().len();
            for at in moments(&wal.commits(), &[0, n / 3, n / 2, n - 2]) {
                let (fast, full) = (wal.lookup(at).await.0, wal.full_scan(at).await.0);
                assert!(Wal::agrees(fast, full, wal.start), "at {at}, late {late:?}, missing {missing:?}");
            }
        }
    }
}
