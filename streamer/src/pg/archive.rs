//! `ebb pg archive-push` and `ebb pg archive-get`: drop-in `archive_command` and
//! `restore_command`. A segment pushed is one WAL piece covering the whole segment,
//! so it joins what `ebb stream pg` stored; a segment fetched is assembled from
//! whatever pieces cover it, along the timeline's history.

use std::io::Write;
use std::path::{Path, PathBuf};

use catalog::wal::{Lsn, WalPiece, WalSystem, PIECE_HEADER};
use catalog::{RepoError, Repository};
use jiff::Timestamp;

use super::background::{self, PUSHER_IDLE};
use super::history::{timeline_path, HistoryError, TimelinePath};
use super::lsn;
use super::names::{is_segment_name, segment_file_name, ArchivedFiles, WalFile};

/// PostgreSQL 15's WAL page magic (`XLOG_PAGE_MAGIC`).
const XLOG_PAGE_MAGIC: u16 = 0xD110;
const XLP_LONG_HEADER: u16 = 0x0002;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    #[error("{0}")]
    Bad(String),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    History(#[from] HistoryError),
}

/// What a segment's first page says about it.
pub(crate) struct SegmentHeader {
    pub tli: u32,
    pub pageaddr: u64,
    pub system_id: u64,
    pub segment_size: u64,
}

pub(crate) fn segment_header(b: &[u8]) -> Option<SegmentHeader> {
    let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().expect("2 bytes"));
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    if b.len() < 40 || u16_at(0) != XLOG_PAGE_MAGIC || u16_at(2) & XLP_LONG_HEADER == 0 {
        return None;
    }
    let h = SegmentHeader {
        tli: u32_at(4),
        pageaddr: u64_at(8),
        system_id: u64_at(24),
        segment_size: u64::from(u32_at(32)),
    };
    // A size no cluster has (a damaged or foreign file) is not a segment header.
    catalog::wal::valid_segment_size(h.segment_size).then_some(h)
}

/// Pushing ahead of PostgreSQL's calls, as pgBackRest's async mode does. PostgreSQL
/// archives one segment at a time; a background pusher (one per repository and
/// source, under a lock) pushes the segments PostgreSQL has ready, several at once,
/// and notes each in `dir` once durable, by file identity (device, inode, size,
/// mtime). PostgreSQL's call for a segment returns as soon as its note is there. A
/// failure is noted too, and that call reports it.
#[derive(Debug, Clone)]
pub struct ReadAhead {
    pub dir: PathBuf,
    /// How many segments the pusher pushes at once.
    pub segments: usize,
}

/// How a call that left its segment to the pusher ended.
pub enum Delegated {
    Pushed,
    Failed(String),
    /// The pusher exited without pushing it: the call pushes it itself.
    PusherGone,
}

impl ReadAhead {
    /// Whether the file at `path` was pushed ahead, and is durable, as the file it is
    /// now. Needs no repository: the call PostgreSQL makes for it returns at once.
    pub fn pushed(&self, path: &Path) -> bool {
        let Some(name) = path.file_name() else { return false };
        identity(path).is_some_and(|id| std::fs::read_to_string(self.dir.join(name)).ok() == Some(id))
    }

    /// Whether the pusher takes `path`: a segment PostgreSQL has marked ready.
    pub fn takes(&self, path: &Path) -> bool {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        self.segments > 0
            && is_segment_name(name)
            && path.parent().is_some_and(|d| d.join("archive_status").join(format!("{name}.ready")).exists())
    }

    /// Whether a pusher holds the lock.
    pub fn pusher_running(&self) -> bool {
        background::running(&self.dir)
    }

    fn error_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.error"))
    }

    /// Waits until the pusher has pushed `path`, or failed to. `pusher` is the one
    /// this call started, if it did.
    pub async fn wait(&self, path: &Path, mut pusher: Option<std::process::Child>) -> Delegated {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let mut polls = 0u32;
        loop {
            if self.pushed(path) {
                return Delegated::Pushed;
            }
            if let Ok(said) = std::fs::read_to_string(self.error_file(&name)) {
                // Said once: PostgreSQL's next try starts afresh.
                let _ = std::fs::remove_file(self.error_file(&name));
                return Delegated::Failed(said);
            }
            polls += 1;
            if polls.is_multiple_of(100) {
                let gone = match &mut pusher {
                    Some(child) => !matches!(child.try_wait(), Ok(None)),
                    None => !self.pusher_running(),
                };
                if gone && !self.pushed(path) {
                    return Delegated::PusherGone;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Notes why pushing `name` failed, for the call PostgreSQL makes for it. The
    /// note appears whole (written aside, then renamed), since that call reads and
    /// removes it as soon as it is there.
    fn note_failure(&self, name: &str, why: &str) -> std::io::Result<()> {
        background::write_note(&self.dir, &format!("{name}.error"), why.as_bytes())
    }

    /// Notes that the file at `path`, as it was when `id` was taken, is durable.
    fn mark(&self, path: &Path, id: String) {
        let Some(name) = path.file_name() else { return };
        if background::write_note(&self.dir, &name.to_string_lossy(), id.as_bytes()).is_err() {
            tracing::warn!("cannot note {} as pushed in {}", path.display(), self.dir.display());
        }
    }

    /// The segments PostgreSQL has ready in `wal_dir`, oldest first.
    fn ready(&self, wal_dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(wal_dir.join("archive_status"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok()?.strip_suffix(".ready").map(str::to_string))
            .filter(|n| is_segment_name(n))
            .collect();
        names.sort();
        names
    }

    /// Notes of segments before `oldest` go: PostgreSQL has archived them.
    fn forget_before(&self, oldest: &str) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.len() >= 24 && is_segment_name(&n[..24]) && &n[..24] < oldest {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn identity(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(format!("{} {} {} {}.{}", m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// The background pusher: pushes the segments ready in `wal_dir`, `ra.segments` at a
/// time, each on a task of its own (compressing and sealing is CPU work), until none
/// has been ready for a while. Returns at once if another pusher holds the lock.
pub async fn run_pusher(repo: &Repository, source: &str, wal_dir: &Path, ra: &ReadAhead) -> Result<(), ArchiveError> {
    let io = |cause| ArchiveError::Io { path: ra.dir.display().to_string(), cause };
    let Some(_lock) = background::lock(&ra.dir).map_err(io)? else { return Ok(()) };
    // Buffers of a segment each, used again: a fresh 16 MiB is 4,096 page faults.
    let buffers = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
    let mut tasks = tokio::task::JoinSet::new();
    let mut busy = std::collections::HashSet::new();
    // Segments pushed, by this pusher or before it: not looked at again while
    // PostgreSQL works through its calls for them.
    let mut settled = std::collections::HashSet::new();
    let mut oldest = String::new();
    let mut idle_since = std::time::Instant::now();
    loop {
        let ready = ra.ready(wal_dir);
        if let Some(first) = ready.first().filter(|&first| *first != oldest) {
            ra.forget_before(first);
            settled.retain(|name: &String| name >= first);
            oldest.clone_from(first);
        }
        for name in ready {
            if tasks.len() >= ra.segments.max(1) {
                break;
            }
            if busy.contains(&name) || settled.contains(&name) {
                continue;
            }
            let path = wal_dir.join(&name);
            if ra.pushed(&path) {
                settled.insert(name);
                continue;
            }
            // Tried again once PostgreSQL's call has taken the failure.
            if ra.error_file(&name).exists() {
                continue;
            }
            busy.insert(name.clone());
            let (repo, source, ra, buffers) = (repo.clone(), source.to_string(), ra.clone(), buffers.clone());
            tasks.spawn(async move {
                let mut buf = buffers.lock().expect("buffer pool").pop().unwrap_or_default();
                let id = identity(&path);
                let pushed = match (archive_push_buf(&repo, &source, &path, &mut buf).await, id) {
                    (Ok(_), Some(id)) => {
                        ra.mark(&path, id);
                        true
                    }
                    (Ok(_), None) => false,
                    (Err(e), _) => {
                        tracing::warn!("{e}");
                        if ra.note_failure(&name, &e.to_string()).is_err() {
                            tracing::warn!("cannot note the failure of {name} in {}", ra.dir.display());
                        }
                        false
                    }
                };
                buffers.lock().expect("buffer pool").push(buf);
                (name, pushed)
            });
        }
        if tasks.is_empty() {
            if idle_since.elapsed() > PUSHER_IDLE {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        }
        idle_since = std::time::Instant::now();
        if let Some(done) = tasks.join_next().await {
            let (name, pushed) = done.expect("an archive push panicked");
            busy.remove(&name);
            if pushed {
                settled.insert(name);
            }
        }
    }
}

/// Stores the file at `path` (named as PostgreSQL names it). Returns once durable.
/// The same content again is success; different content under the same name fails.
pub async fn archive_push(repo: &Repository, source: &str, path: &Path) -> Result<String, ArchiveError> {
    archive_push_buf(repo, source, path, &mut Vec::new()).await
}

/// `archive_push`, reading the file into `buf`, which is kept for the next one.
async fn archive_push_buf(
    repo: &Repository,
    source: &str,
    path: &Path,
    buf: &mut Vec<u8>,
) -> Result<String, ArchiveError> {
    use std::io::Read;
    let shown = path.display().to_string();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ArchiveError::Bad(format!("{shown}: not a WAL file name")))?
        .to_string();
    // Room for a WAL piece's header, then the file.
    buf.clear();
    buf.resize(PIECE_HEADER, 0);
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(buf))
        .map_err(|cause| ArchiveError::Io { path: shown.clone(), cause })?;
    let data = &buf[PIECE_HEADER..];
    if let Some(h) = (name.len() == 24).then(|| segment_header(data)).flatten() {
        let system = WalSystem { system_id: h.system_id, segment_size: h.segment_size };
        let Some(WalFile::Segment { tli, segno }) = WalFile::parse(&name, h.segment_size) else {
            return Err(ArchiveError::Bad(format!("{shown}: not a WAL segment name")));
        };
        let start = Lsn(segno * h.segment_size);
        if h.tli != tli || h.pageaddr != start.0 || data.len() as u64 != h.segment_size {
            return Err(ArchiveError::Bad(format!(
                "{shown} is not segment {name}: its first page is of timeline {} at {}, and it holds {} bytes",
                h.tli,
                lsn::text(Lsn(h.pageaddr)),
                data.len()
            )));
        }
        repo.claim_wal_system(source, system).await?;
        let piece = WalPiece { tli, start, end: Lsn(start.0 + h.segment_size) };
        // What the repository already holds of this segment must be the same WAL.
        let path = [(tli, Lsn(0), None)];
        let stored = repo.wal_bytes(source, &system, &path, piece.start, piece.end).await?;
        if stored.as_slice() != &data[..stored.len()] {
            return Err(ArchiveError::Bad(format!(
                "{name} is already archived for source {source:?} with different content: refusing to replace it"
            )));
        }
        if stored.len() as u64 == h.segment_size {
            return Ok(format!("{name} was already archived, with the same content"));
        }
        repo.put_wal_buf(source, &piece, Timestamp::now(), buf).await?;
        return Ok(format!("archived {name}"));
    }
    match WalFile::parse(&name, 16 << 20) {
        Some(WalFile::History { .. }) | Some(WalFile::Other) => {
            repo.put_wal_file(source, &name, data).await?;
            Ok(format!("archived {name}"))
        }
        _ => Err(ArchiveError::Bad(format!(
            "{shown} is not a WAL segment, history, .backup or .partial file of PostgreSQL 15"
        ))),
    }
}

/// Fetches `name` into `dest`. `Ok(false)` when the repository does not have it
/// (what PostgreSQL expects to hear at the end of the archive).
pub async fn archive_get(
    repo: &Repository,
    source: &str,
    name: &str,
    dest: &Path,
    until: Option<Lsn>,
) -> Result<bool, ArchiveError> {
    let Some(system) = repo.wal_system(source).await? else { return Ok(false) };
    let data = match WalFile::parse(name, system.segment_size) {
        Some(WalFile::Segment { tli, segno }) => {
            let path = match timeline_path(repo, source, tli).await {
                Ok(p) => p,
                // Missing, so not archived (yet); a malformed one is an error, which
                // stops recovery rather than ending it early.
                Err(HistoryError::Missing { .. }) => return Ok(false),
                Err(e) => return Err(e.into()),
            };
            let mut wal = segment_wal(repo, source, &system, &path, segno, until).await?;
            if wal.is_empty() {
                return Ok(false);
            }
            // The last, partial segment: what was streamed, then zeros, as
            // PostgreSQL's own partial segments are.
            wal.resize(system.segment_size as usize, 0);
            debug_assert_eq!(segment_file_name(tli, segno, system.segment_size), name);
            wal
        }
        Some(WalFile::History { .. }) | Some(WalFile::Other) => match repo.wal_file(source, name).await? {
            Some(d) => d,
            None => return Ok(false),
        },
        None => return Err(ArchiveError::Bad(format!("{name} is not a name PostgreSQL archives"))),
    };
    let tmp = dest.with_extension("ebb-partial");
    write_synced(&tmp, &data)
        .and_then(|()| std::fs::rename(&tmp, dest))
        .map_err(|cause| ArchiveError::Io { path: dest.display().to_string(), cause })?;
    Ok(true)
}

/// The contiguous WAL of segment `segno` along `path`, as far as the repository
/// has it from the segment's start, and not past `until`: whole, shorter, or empty.
pub(crate) async fn segment_wal(
    repo: &Repository,
    source: &str,
    system: &WalSystem,
    path: &TimelinePath,
    segno: u64,
    until: Option<Lsn>,
) -> Result<Vec<u8>, RepoError> {
    let start = Lsn(segno * system.segment_size);
    let end = Lsn(start.0 + system.segment_size).min(until.unwrap_or(Lsn(u64::MAX)));
    if end <= start {
        return Ok(Vec::new());
    }
    repo.wal_bytes(source, system, &path.0, start, end).await
}

/// Writes `data` as the file `path` and makes it durable.
pub(crate) fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}
