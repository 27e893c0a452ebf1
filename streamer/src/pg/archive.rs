//! `ebb pg archive-push` and `ebb pg archive-get`: drop-in `archive_command` and
//! `restore_command`. A segment pushed is one WAL piece covering the whole segment,
//! so it joins what `ebb stream pg` stored; a segment fetched is assembled from
//! whatever pieces cover it, along the timeline's history.

use std::io::Write;
use std::path::Path;

use catalog::wal::{segment_file_name, Lsn, WalFile, WalPiece, WalSystem};
use catalog::{RepoError, Repository};
use jiff::Timestamp;

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
}

/// What a segment's first page says about it.
struct SegmentHeader {
    tli: u32,
    pageaddr: u64,
    system_id: u64,
    segment_size: u64,
}

fn segment_header(b: &[u8]) -> Option<SegmentHeader> {
    let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().expect("2 bytes"));
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    if b.len() < 40 || u16_at(0) != XLOG_PAGE_MAGIC || u16_at(2) & XLP_LONG_HEADER == 0 {
        return None;
    }
    Some(SegmentHeader {
        tli: u32_at(4),
        pageaddr: u64_at(8),
        system_id: u64_at(24),
        segment_size: u64::from(u32_at(32)),
    })
}

/// Segments pushed ahead of PostgreSQL's calls: one file per segment in `dir`, saying
/// which file (device, inode, size, mtime) was made durable. PostgreSQL archives one
/// segment at a time; pushing the next ready ones at once, in parallel, and answering
/// their own calls from here, keeps both cores busy (pgBackRest's async mode does the
/// same).
pub struct ReadAhead {
    pub dir: std::path::PathBuf,
    /// How many ready segments after the one asked for are pushed with it.
    pub segments: usize,
}

fn identity(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(format!("{} {} {} {}.{}", m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// Stores the file at `path` and, with `ahead`, the next segments PostgreSQL has
/// ready. Returns once `path` is durable. The same content again is success;
/// different content under the same name fails.
pub async fn archive_push_ahead(
    repo: &Repository,
    source: &str,
    path: &Path,
    ahead: Option<&ReadAhead>,
) -> Result<String, ArchiveError> {
    let Some(ra) = ahead else { return archive_push(repo, source, path).await };
    let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
        return archive_push(repo, source, path).await;
    };
    let marker = |n: &str| ra.dir.join(n);
    let pushed = |p: &Path, n: &str| identity(p).is_some_and(|id| std::fs::read_to_string(marker(n)).ok() == Some(id));
    if pushed(path, &name) {
        return Ok(format!("{name} was already archived (pushed ahead)"));
    }
    // The ready segments after this one, in order.
    let status = path.parent().map(|d| d.join("archive_status"));
    let mut next: Vec<String> = status
        .and_then(|d| std::fs::read_dir(d).ok())
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok()?.strip_suffix(".ready").map(str::to_string))
        .filter(|n| n.len() == 24 && n.as_str() > name.as_str() && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    next.sort();
    let parent = path.parent().unwrap_or(Path::new("."));
    let batch: Vec<std::path::PathBuf> = std::iter::once(path.to_path_buf())
        .chain(
            next.iter()
                .map(|n| parent.join(n))
                .filter(|p| !pushed(p, &p.file_name().unwrap_or_default().to_string_lossy())),
        )
        .take(ra.segments + 1)
        .collect();
    let _ = std::fs::create_dir_all(&ra.dir);
    let pushes = batch.iter().map(|p| async move {
        let id = identity(p);
        let r = archive_push(repo, source, p).await;
        if let (Ok(_), Some(id), Some(n)) = (&r, id, p.file_name()) {
            // Only what is durable is marked, and only as the file it was.
            let tmp = ra.dir.join(format!(".{}.tmp", n.to_string_lossy()));
            if std::fs::write(&tmp, id).and_then(|()| std::fs::rename(&tmp, ra.dir.join(n))).is_err() {
                tracing::debug!("cannot mark {} as pushed in {}", p.display(), ra.dir.display());
            }
        }
        r
    });
    let mut results = futures::future::join_all(pushes).await;
    // Markers of segments PostgreSQL has archived since (no .ready, no file) go.
    if let Ok(entries) = std::fs::read_dir(&ra.dir) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.len() == 24 && n.as_str() < name.as_str() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    results.swap_remove(0)
}

/// Stores the file at `path` (named as PostgreSQL names it). Returns once durable.
/// The same content again is success; different content under the same name fails.
pub async fn archive_push(repo: &Repository, source: &str, path: &Path) -> Result<String, ArchiveError> {
    let shown = path.display().to_string();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ArchiveError::Bad(format!("{shown}: not a WAL file name")))?
        .to_string();
    let data = tokio::fs::read(path).await.map_err(|cause| ArchiveError::Io { path: shown.clone(), cause })?;
    if let Some(h) = (name.len() == 24).then(|| segment_header(&data)).flatten() {
        let system = WalSystem { system_id: h.system_id, segment_size: h.segment_size };
        let Some(WalFile::Segment { tli, segno }) = WalFile::parse(&name, h.segment_size) else {
            return Err(ArchiveError::Bad(format!("{shown}: not a WAL segment name")));
        };
        let start = Lsn(segno * h.segment_size);
        if h.tli != tli || h.pageaddr != start.0 || data.len() as u64 != h.segment_size {
            return Err(ArchiveError::Bad(format!(
                "{shown} is not segment {name}: its first page is of timeline {} at {}, and it holds {} bytes",
                h.tli,
                Lsn(h.pageaddr),
                data.len()
            )));
        }
        repo.claim_wal_system(source, system).await?;
        let piece = WalPiece { tli, start, end: Lsn(start.0 + h.segment_size) };
        // What the repository already holds of this segment must be the same WAL.
        let path = catalog::wal::TimelinePath(vec![(tli, Lsn(0), None)]);
        let stored = repo.wal_bytes(source, &system, &path, piece.start, piece.end).await?;
        if stored.as_slice() != &data[..stored.len()] {
            return Err(ArchiveError::Bad(format!(
                "{name} is already archived for source {source:?} with different content: refusing to replace it"
            )));
        }
        if stored.len() as u64 == h.segment_size {
            return Ok(format!("{name} was already archived, with the same content"));
        }
        repo.put_wal(source, &piece, Timestamp::now(), &data).await?;
        return Ok(format!("archived {name}"));
    }
    match WalFile::parse(&name, 16 << 20) {
        Some(WalFile::History { .. }) | Some(WalFile::Other) => {
            repo.put_wal_file(source, &name, &data).await?;
            Ok(format!("archived {name}"))
        }
        _ => Err(ArchiveError::Bad(format!(
            "{shown} is not a WAL segment, history, .backup or .partial file of PostgreSQL 15"
        ))),
    }
}

/// Fetches `name` into `dest`. `Ok(false)` when the repository does not have it
/// (what PostgreSQL expects to hear at the end of the archive).
pub async fn archive_get(repo: &Repository, source: &str, name: &str, dest: &Path) -> Result<bool, ArchiveError> {
    let Some(system) = repo.wal_system(source).await? else { return Ok(false) };
    let data = match WalFile::parse(name, system.segment_size) {
        Some(WalFile::Segment { tli, segno }) => {
            let path = match repo.timeline_path(source, tli).await {
                Ok(p) => p,
                Err(RepoError::BadSource { .. }) => return Ok(false),
                Err(e) => return Err(e.into()),
            };
            let start = Lsn(segno * system.segment_size);
            let end = Lsn(start.0 + system.segment_size);
            let mut wal = repo.wal_bytes(source, &system, &path, start, end).await?;
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
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dest)
    };
    write().map_err(|cause| ArchiveError::Io { path: dest.display().to_string(), cause })?;
    Ok(true)
}
