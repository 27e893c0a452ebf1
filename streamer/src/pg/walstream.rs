//! `ebb stream pg`: WAL streamed like a replica. WAL arrives over a physical
//! replication connection, is cut into pieces (never across a segment boundary, at
//! the latest half a flush interval after its first byte arrived), and each piece is
//! put in the repository. The slot's flush position is advanced only to the end of
//! the pieces the store has accepted, contiguously: PostgreSQL keeps everything
//! ebb has not made durable.
//!
//! Any failure drops the connection and what was not durable, waits with backoff
//! and starts again from the end of the stored WAL: kill -9, a store outage and a
//! lost connection all recover the same way.
//!
//! A segment received from its first byte (of at most 64 MiB) is also kept whole
//! in memory, and put as one piece once all its pieces are durable: readers
//! (`archive-get`, a restore) then fetch one object a segment, found by its name,
//! and `ebb prune` deletes the small pieces it makes redundant. Nothing waits for
//! that put, and at most `MAX_WHOLE` are under way: one that fails, or is not made
//! (the store is slower than the WAL, the stream stops), leaves the segment to
//! prune, which merges it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use catalog::wal::{Lsn, WalPiece, WalSystem, PIECE_HEADER};
use catalog::{RepoError, Repository};
use jiff::Timestamp;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::history::TimelinePath;
use super::lsn;
use super::names::ArchivedFiles;
use super::wire::{CopyData, CopyEvent, PgError, ReplConn};
use crate::health::{Backoff, Health, HEARTBEAT};
use crate::metrics::Metrics;
use crate::state::StreamState;

/// Pieces uploading at once; past this, reading from the server waits.
const MAX_INFLIGHT: usize = 8;
/// Retries after a failure wait from this long, doubling up to `BACKOFF_MAX`.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// On SIGINT/SIGTERM, uploads under way may finish for this long.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// The largest piece, for clusters with segments larger than this.
const MAX_PIECE: usize = 16 << 20;
/// Whole segments being put at once; past this, one is left to prune.
const MAX_WHOLE: usize = 4;

#[derive(Debug, Clone)]
pub struct PgStreamOptions {
    pub source: String,
    pub dsn: tokio_postgres::Config,
    /// The DSN as shown to people: no password.
    pub dsn_display: String,
    pub slot: String,
    /// Received WAL is durable within this long.
    pub flush_interval: Duration,
    pub rpo: Duration,
    pub repository: String,
    pub state_file: Option<PathBuf>,
}

/// Errors that retrying cannot mend: the stream stops with them.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// Why one session with the server ended.
enum Ended {
    /// Asked to stop.
    Stopped,
    /// The server ended the timeline: reconnect and follow the next one.
    TimelineEnded,
}

enum SessionError {
    Fatal(Fatal),
    Retry(String),
    /// The server has removed WAL that was asked for.
    WalRemoved(String),
}

impl From<PgError> for SessionError {
    fn from(e: PgError) -> SessionError {
        if e.code() == Some("58P01") {
            return SessionError::WalRemoved(e.to_string());
        }
        match classify(&e) {
            Some(msg) => SessionError::Fatal(Fatal::Setup(msg)),
            None => SessionError::Retry(e.to_string()),
        }
    }
}

impl From<RepoError> for SessionError {
    fn from(e: RepoError) -> SessionError {
        match e {
            RepoError::Store(e) => SessionError::Retry(e.to_string()),
            e => SessionError::Fatal(Fatal::Repo(e)),
        }
    }
}

/// A clear message for the server errors that retrying cannot mend.
pub fn classify(e: &PgError) -> Option<String> {
    match e {
        PgError::BadDsn(_) | PgError::UnsupportedAuth(_) | PgError::NoPassword => Some(e.to_string()),
        PgError::Server { code, message, .. } => match code.as_str() {
            "28P01" => Some(format!("{message}: check the user and password in --dsn")),
            "28000" if message.contains("pg_hba.conf") => Some(format!(
                "{message}: PostgreSQL's pg_hba.conf must allow replication connections for this user \
                 (a line `host replication USER ADDRESS scram-sha-256`), then reload PostgreSQL"
            )),
            "28000" | "42501" => Some(format!(
                "{message}: the user needs the REPLICATION privilege (ALTER ROLE ... REPLICATION) or superuser"
            )),
            "53300" => Some(format!(
                "{message}: streaming needs max_wal_senders > 0 and wal_level = replica or logical \
                 (set both in postgresql.conf and restart PostgreSQL)"
            )),
            "3D000" => Some(format!("{message}: check dbname in --dsn")),
            _ => None,
        },
        _ => None,
    }
}

/// How often the stream looks for base backups made by others.
const NEWEST_POINT_EVERY: Duration = Duration::from_secs(60);

/// Stops a background task when the stream ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Streams until `shutdown` completes or a fatal error.
pub async fn stream_pg(
    repo: Repository,
    opts: PgStreamOptions,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Fatal> {
    tokio::pin!(shutdown);
    let state =
        StreamState::starting(opts.source.clone(), opts.repository.clone(), "pg", opts.dsn_display.clone(), opts.rpo);
    // Durable as of a time: all the WAL the server had then is stored. The RPO
    // alarm shows in the metrics and in `ebb status`; this stream does not log it.
    let mut health = Health::new(state, opts.rpo, opts.state_file.clone(), metrics.clone());
    // The newest base backup, for `ebb status`: the stream's own are noted as they
    // are made, others (`ebb pg base-backup`) by looking now and then.
    let newest = {
        let (repo, source, metrics) = (repo.clone(), opts.source.clone(), metrics.clone());
        tokio::spawn(async move {
            loop {
                match repo.point_at(&source, Timestamp::now()).await {
                    Ok(Some(p)) => metrics.newest_point(p.time),
                    Ok(None) => {}
                    Err(e) => tracing::debug!("cannot list the points of {source}: {e}"),
                }
                tokio::time::sleep(NEWEST_POINT_EVERY).await;
            }
        })
    };
    let _stop_looking = AbortOnDrop(newest);
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut connected_once = false;
    // Where to resume after WAL the server removed: past a gap.
    let mut skip_to = None;
    loop {
        let r = session(&repo, &opts, &metrics, &mut health, &mut shutdown, &mut connected_once, &mut skip_to).await;
        match r {
            Ok(Ended::Stopped) => {
                health.beat(Timestamp::now());
                return Ok(());
            }
            Ok(Ended::TimelineEnded) => {
                backoff.reset();
                continue;
            }
            Err(SessionError::Fatal(f)) => {
                health.failed(f.to_string());
                health.beat(Timestamp::now());
                return Err(f);
            }
            Err(SessionError::Retry(msg) | SessionError::WalRemoved(msg)) => {
                tracing::warn!("stream of {}: {msg}; retrying in {:?}", opts.source, backoff.delay());
                metrics.errors.fetch_add(1, Ordering::Relaxed);
                health.failed(msg);
            }
        }
        let until = Instant::now() + backoff.failed(rand::random());
        // Keep the state file fresh while waiting: the lag keeps growing.
        loop {
            health.beat(Timestamp::now());
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep_until(until.min(Instant::now() + HEARTBEAT)) => {}
            }
            if Instant::now() >= until {
                break;
            }
        }
    }
}

/// Connects, finds where to start, and streams until the connection ends.
async fn session(
    repo: &Repository,
    opts: &PgStreamOptions,
    metrics: &Arc<Metrics>,
    health: &mut Health,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    connected_once: &mut bool,
    skip_to: &mut Option<Lsn>,
) -> Result<Ended, SessionError> {
    let mut conn = match ReplConn::connect(&opts.dsn).await {
        Ok(c) => c,
        Err(e) if !*connected_once => {
            return Err(SessionError::Fatal(Fatal::Setup(classify(&e).unwrap_or_else(|| e.to_string()))))
        }
        Err(e) => return Err(e.into()),
    };
    let (system_id, tli, _) = conn.identify_system().await?;
    let segment_size = conn.segment_size().await?;
    let system = WalSystem { system_id, segment_size };
    repo.claim_wal_system(&opts.source, system).await?;
    *connected_once = true;

    // Timeline history files: PostgreSQL asks for them when it recovers.
    let path = if tli > 1 {
        let (name, content) = conn.timeline_history(tli).await?;
        repo.put_wal_file(&opts.source, &name, &content).await?;
        let path = TimelinePath::parse(tli, Some(&String::from_utf8_lossy(&content)))
            .map_err(|e| SessionError::Retry(format!("{name}: {e}")))?;
        for &(t, _, _) in path.0.iter().filter(|(t, _, _)| *t > 1 && *t != tli) {
            if let Ok((name, content)) = conn.timeline_history(t).await {
                repo.put_wal_file(&opts.source, &name, &content).await?;
            }
        }
        path
    } else {
        TimelinePath::parse(1, None).map_err(SessionError::Retry)?
    };

    let restart = match conn.read_slot(&opts.slot).await? {
        None => {
            conn.create_slot(&opts.slot).await?;
            tracing::info!("created replication slot {}", opts.slot);
            conn.read_slot(&opts.slot).await?.flatten()
        }
        Some(None) => {
            return Err(SessionError::Fatal(Fatal::Setup(format!(
                "replication slot {slot} was invalidated: PostgreSQL removed WAL ebb had not received \
                 (max_slot_wal_keep_size), so the restorable time of {source} has a gap from the end of its stored \
                 WAL to now. Drop the slot (SELECT pg_drop_replication_slot('{slot}')), start `ebb stream pg` again \
                 and take a new base backup with `ebb pg base-backup`",
                slot = opts.slot,
                source = opts.source
            ))))
        }
        Some(Some(r)) => Some(r),
    };
    let stored = repo.wal_end(&opts.source, &system, tli).await?;
    let begin = path.0.last().map_or(Lsn(0), |(_, b, _)| *b);
    let mut start = match (stored, restart) {
        (Some(end), _) => end,
        // A new timeline: from where it branched off, if the server still has it.
        (None, _) if tli > 1 => begin,
        (None, Some(r)) => system.segment_start(r),
        (None, None) => return Err(SessionError::Retry(format!("slot {} reserves no WAL", opts.slot))),
    };
    if let Some(skip) = skip_to.take().filter(|s| *s > start) {
        start = skip;
    }
    let streamed = match conn.start_replication(&opts.slot, start, tli).await {
        Ok(()) => {
            tracing::info!("streaming WAL of {} from {} on timeline {tli}", opts.source, lsn::text(start));
            Receiver::new(repo, opts, metrics, system, tli, start).run(&mut conn, health, shutdown).await
        }
        Err(e) => Err(e.into()),
    };
    match streamed {
        // The server no longer has the WAL from `start`: go on from where the slot
        // still has it, and say there is a gap (it shows in `ebb points`).
        Err(SessionError::WalRemoved(msg)) => {
            if let Some(r) = restart.map(|r| system.segment_start(r)).filter(|r| *r > start) {
                let gap = format!(
                    "WAL from {} to {} on timeline {tli} was removed before ebb received it: a gap",
                    lsn::text(start),
                    lsn::text(r)
                );
                tracing::error!("{gap}");
                health.failed(gap);
                *skip_to = Some(r);
            }
            Err(SessionError::Retry(msg))
        }
        other => other,
    }
}

/// WAL received and not yet cut into a piece.
struct Pending {
    start: Lsn,
    buf: Vec<u8>,
    first_at: Instant,
    first_time: Timestamp,
}

/// A segment received from its first byte on, kept to be put whole.
struct Segment {
    start: Lsn,
    /// Room for a piece's header, then the WAL.
    buf: Vec<u8>,
    /// When its first byte arrived.
    first_time: Timestamp,
    /// How many pieces were cut of it: cut as one, it is not put again.
    cuts: usize,
}

impl Segment {
    fn wal_len(&self) -> u64 {
        (self.buf.len() - PIECE_HEADER) as u64
    }
}

struct Receiver<'a> {
    repo: &'a Repository,
    opts: &'a PgStreamOptions,
    metrics: &'a Arc<Metrics>,
    system: WalSystem,
    tli: u32,
    /// The next byte expected from the server.
    received: Lsn,
    pending: Option<Pending>,
    /// Pieces cut, by start: their end, when their first byte arrived, and whether
    /// the store has them.
    inflight: BTreeMap<Lsn, (Lsn, Timestamp, bool)>,
    uploads: JoinSet<Result<Lsn, RepoError>>,
    /// Everything before this is durable.
    durable: Lsn,
    /// Where the server's WAL ended when it last said, and when we heard it.
    server_end: Lsn,
    heard_at: Timestamp,
    caught_up_at: Timestamp,
    /// The segment being received, if from its first byte.
    segment: Option<Segment>,
    /// Segments received whole, until their pieces are durable.
    whole: Vec<Segment>,
    /// Whole segments being put.
    merges: JoinSet<()>,
}

impl<'a> Receiver<'a> {
    fn new(
        repo: &'a Repository,
        opts: &'a PgStreamOptions,
        metrics: &'a Arc<Metrics>,
        system: WalSystem,
        tli: u32,
        start: Lsn,
    ) -> Self {
        Receiver {
            repo,
            opts,
            metrics,
            system,
            tli,
            received: start,
            pending: None,
            inflight: BTreeMap::new(),
            uploads: JoinSet::new(),
            durable: start,
            server_end: start,
            heard_at: Timestamp::now(),
            caught_up_at: Timestamp::now(),
            segment: None,
            whole: Vec::new(),
            merges: JoinSet::new(),
        }
    }

    async fn run(
        mut self,
        conn: &mut ReplConn,
        health: &mut Health,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<Ended, SessionError> {
        // Each heartbeat asks the server where its WAL ends, and rewrites the state file.
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let wait = self.opts.flush_interval / 2;
        loop {
            let cut_at = self.pending.as_ref().map(|p| p.first_at + wait);
            let can_read = self.uploads.len() < MAX_INFLIGHT;
            tokio::select! {
                biased;
                _ = shutdown.as_mut() => {
                    self.cut();
                    let _ = tokio::time::timeout(STOP_GRACE, self.drain(conn)).await;
                    let _ = conn.send_status(self.received, self.durable, false).await;
                    self.update(health);
                    return Ok(Ended::Stopped);
                }
                Some(done) = self.uploads.join_next(), if !self.uploads.is_empty() => {
                    let start = done.map_err(|e| SessionError::Retry(format!("upload task failed: {e}")))??;
                    self.finished(start);
                    conn.send_status(self.received, self.durable, false).await?;
                    self.update(health);
                }
                Some(_) = self.merges.join_next(), if !self.merges.is_empty() => {}
                _ = tokio::time::sleep_until(cut_at.unwrap_or_else(Instant::now)), if cut_at.is_some() => self.cut(),
                _ = heartbeat.tick() => {
                    conn.send_status(self.received, self.durable, true).await?;
                    self.update(health);
                    health.beat(Timestamp::now());
                }
                ev = conn.copy_recv(), if can_read => match ev? {
                    CopyEvent::Data(msg) => {
                        if let Some(reply) = self.message(msg)? {
                            conn.send_status(self.received, self.durable, reply).await?;
                        }
                    }
                    CopyEvent::Done => {
                        // The server ended this timeline: keep what came, then follow.
                        self.cut();
                        self.drain(conn).await?;
                        conn.copy_done().await?;
                        let next = conn.copy_finish().await?;
                        tracing::info!("timeline {} ended; next: {next:?}", self.tli);
                        self.update(health);
                        return Ok(Ended::TimelineEnded);
                    }
                },
            }
        }
    }

    /// Handles one CopyData message; `Some(reply)` when a status update is due.
    fn message(&mut self, msg: Bytes) -> Result<Option<bool>, SessionError> {
        let bad = |what: String| SessionError::Retry(format!("malformed replication message: {what}"));
        self.heard_at = Timestamp::now();
        match super::wire::parse_copy_data(msg).map_err(bad)? {
            CopyData::XLogData { start, end, data } => {
                if start != self.received {
                    return Err(bad(format!("WAL at {}, expected {}", lsn::text(start), lsn::text(self.received))));
                }
                self.server_end = self.server_end.max(end);
                self.take(&data);
                self.metrics.bytes_shipped.fetch_add(data.len() as u64, Ordering::Relaxed);
                Ok(None)
            }
            CopyData::Keepalive { end, reply } => {
                self.server_end = self.server_end.max(end);
                Ok(reply.then_some(false))
            }
        }
    }

    /// Adds received WAL to the pending piece, cutting at segment boundaries.
    fn take(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let p = self.pending.get_or_insert_with(|| Pending {
                start: self.received,
                buf: Vec::new(),
                first_at: Instant::now(),
                first_time: Timestamp::now(),
            });
            let seg_start = self.system.segment_start(self.received);
            let seg_end = seg_start.0 + self.system.segment_size;
            let room = ((seg_end - self.received.0) as usize).min(MAX_PIECE - p.buf.len());
            let n = room.min(data.len());
            p.buf.extend_from_slice(&data[..n]);
            let first_time = p.first_time;
            self.keep_segment(seg_start, first_time, &data[..n]);
            self.received = Lsn(self.received.0 + n as u64);
            data = &data[n..];
            if n == room {
                self.cut();
            }
            if self.received.0 == seg_end {
                // Cut as one piece, it is stored whole already.
                self.whole.extend(self.segment.take().filter(|s| s.cuts > 1));
            }
        }
    }

    /// Adds WAL received at `self.received` to the segment kept whole, starting one
    /// at its first byte.
    fn keep_segment(&mut self, seg_start: Lsn, first_time: Timestamp, data: &[u8]) {
        if self.system.segment_size > catalog::wal::MAX_MERGE {
            return;
        }
        if self.received == seg_start {
            let mut buf = Vec::with_capacity(PIECE_HEADER + self.system.segment_size as usize);
            buf.resize(PIECE_HEADER, 0);
            self.segment = Some(Segment { start: seg_start, buf, first_time, cuts: 0 });
        }
        if let Some(s) = &mut self.segment {
            s.buf.extend_from_slice(data);
        }
    }

    /// Puts the whole segments whose pieces are all durable, each as one piece.
    fn merge_durable(&mut self) {
        let durable = self.durable;
        let (ready, waiting): (Vec<Segment>, Vec<Segment>) =
            std::mem::take(&mut self.whole).into_iter().partition(|s| s.start.0 + s.wal_len() <= durable.0);
        self.whole = waiting;
        for seg in ready {
            if self.merges.len() >= MAX_WHOLE {
                tracing::debug!("segment at {} left to prune to store whole", lsn::text(seg.start));
                continue;
            }
            let piece = WalPiece { tli: self.tli, start: seg.start, end: Lsn(seg.start.0 + seg.wal_len()) };
            let (repo, source) = (self.repo.clone(), self.opts.source.clone());
            self.merges.spawn(async move {
                if let Err(e) = repo.put_wal_buf(&source, &piece, seg.first_time, &seg.buf).await {
                    // Its pieces are durable: prune merges them instead.
                    tracing::warn!("cannot store the segment at {} whole: {e}", lsn::text(piece.start));
                }
            });
        }
    }

    /// Starts uploading the pending piece.
    fn cut(&mut self) {
        let Some(p) = self.pending.take() else { return };
        if p.buf.is_empty() {
            return;
        }
        let piece = WalPiece { tli: self.tli, start: p.start, end: Lsn(p.start.0 + p.buf.len() as u64) };
        if let Some(s) = self.segment.as_mut().filter(|s| s.start <= piece.start) {
            s.cuts += 1;
        }
        self.inflight.insert(piece.start, (piece.end, p.first_time, false));
        let (repo, source) = (self.repo.clone(), self.opts.source.clone());
        self.uploads.spawn(async move {
            repo.put_wal(&source, &piece, p.first_time, &p.buf).await?;
            Ok(piece.start)
        });
    }

    /// Marks a piece durable and advances the durable position over the done prefix.
    fn finished(&mut self, start: Lsn) {
        if let Some(e) = self.inflight.get_mut(&start) {
            e.2 = true;
        }
        while let Some((&s, &(end, _, done))) = self.inflight.first_key_value() {
            if !done || s != self.durable {
                break;
            }
            self.inflight.remove(&s);
            self.durable = end;
        }
        self.merge_durable();
    }

    /// Waits for every upload under way.
    async fn drain(&mut self, conn: &mut ReplConn) -> Result<(), SessionError> {
        while let Some(done) = self.uploads.join_next().await {
            let start = done.map_err(|e| SessionError::Retry(format!("upload task failed: {e}")))??;
            self.finished(start);
        }
        conn.send_status(self.received, self.durable, false).await?;
        Ok(())
    }

    /// Brings the durable time up to date.
    fn update(&mut self, health: &mut Health) {
        let oldest = self.inflight.values().map(|v| v.1).chain(self.pending.as_ref().map(|p| p.first_time)).min();
        let durable_as_of = match oldest {
            Some(t) => t,
            // All the server had when it last spoke is durable: shipping works, and
            // whatever failed before is over (`ebb status` says ok again).
            None if self.durable >= self.server_end => {
                self.caught_up_at = self.heard_at.max(self.caught_up_at);
                if health.recovered() {
                    tracing::info!("streaming works again");
                }
                self.caught_up_at
            }
            None => self.caught_up_at,
        };
        health.durable_as_of(durable_as_of);
    }
}
