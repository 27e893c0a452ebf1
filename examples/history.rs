//! Generates a repository with a long history, quickly, for `scripts/bench scale`:
//! what a host streaming with the defaults leaves behind, made up through the
//! catalog rather than lived through. Never fsyncs: for measuring only.
//!
//!     history REPO_DIR KEY_FILE POINTS
//!
//! REPO_DIR must hold a repository (`ebb init`) that KEY_FILE unlocks. It adds,
//! one minute apart and ending a minute ago:
//! - source `web` (a directory stream): POINTS points of a small tree (a log that
//!   grows and is rotated every hour, a file that changes, twenty that never do),
//!   each with its pack and index file (named as of the point's time), and two
//!   fragments between each point and
//!   the next, each growing the log, with a pack of its own (in the next point's
//!   index file);
//! - source `db` (PostgreSQL): WAL on timeline 1 in 1 MiB segments, four pieces of
//!   8 KiB a minute with a commit record every 512 bytes, received when their
//!   commits were made, and each finished segment whole besides, as `ebb stream
//!   pg` stores it; and a base backup (a small made-up data directory) every
//!   1,440 points (a day), at the first point, and at the last.
//!
//! So POINTS points make about 9 × POINTS objects.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use catalog::tree::{Entry, EntryKind, Extent, Tree};
use catalog::wal::{Lsn, WalPiece, WalSystem};
use catalog::{
    BlobKind, BlobRef, Fragment, FragmentBuilder, Growth, Manifest, Packer, PgInfo, Repository, Secret, Store,
    WriteError, Writer,
};
use jiff::{SignedDuration, Timestamp};
use streamer::pg::testwal::MadeUp;

const SEGMENT: u64 = 1 << 20;
const PIECE: u64 = 8 << 10;
const PIECES_A_MINUTE: u64 = 4;
const FRAGMENTS_A_MINUTE: u64 = 2;
const BASE_BACKUP_EVERY: u64 = 1440;
const SYSTEM_ID: u64 = 7;
/// The log's device and inode, as a stream records them.
const LOG: (u64, u64) = (1, 2);
/// Microseconds from 1970 to 2000, PostgreSQL's epoch.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, key, points] = &args[..] else { bail!("usage: history REPO_DIR KEY_FILE POINTS") };
    let points: u64 = points.parse().context("POINTS")?;
    let text = std::fs::read_to_string(key).context("reading the key file")?;
    let key = catalog::decode_key_file(&text).context("not a key file")?;
    let store = Store::open_unsynced(std::path::Path::new(dir))?;
    let repo = Repository::open(store, &Secret::KeyFile(key)).await?;
    let start = Timestamp::now() - SignedDuration::from_mins(points as i64 + 1);
    let at = |minute: u64| start + SignedDuration::from_secs(minute as i64 * 60);

    let writer = Writer::new(repo.clone()).await?;
    let statics: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 4096]).collect();
    let mut log: Vec<BlobRef> = Vec::new();
    let mut log_len = 0u64;
    let mut wal = Wal::new(&repo).await?;
    let mut bases = 0;
    for minute in 0..points {
        // The point: the log as far as it is (rotated every hour), the changing
        // file, the others.
        if minute % 60 == 0 {
            (log, log_len) = (Vec::new(), 0);
        }
        let grown = format!("minute {minute}: {}\n", "line ".repeat(40)).into_bytes();
        log_len += grown.len() as u64;
        let root = packing(&writer, |p| {
            log.push(p.store(BlobKind::Data, &grown)?);
            let state = p.store(BlobKind::Data, format!("state {minute}").as_bytes())?;
            let mut entries = vec![file(b"app.log", log.clone(), LOG), file(b"state", vec![state], (1, 3))];
            for (i, data) in statics.iter().enumerate() {
                let b = p.store(BlobKind::Data, data)?;
                entries.push(file(format!("static-{i:02}").as_bytes(), vec![b], (1, 10 + i as u64)));
            }
            wrap(p, b"web", entries)
        })?;
        commit(&writer, "web", at(minute), root, None).await?;
        // The fragments until the next point, each growing the log.
        for k in 1..=FRAGMENTS_A_MINUTE {
            let t = at(minute) + SignedDuration::from_secs((60 * k / (FRAGMENTS_A_MINUTE + 1)) as i64);
            let bytes = format!("fragment {minute}.{k}\n").into_bytes();
            let mut fb = FragmentBuilder::new(&repo);
            let chunk = fb.store(&bytes);
            let growth =
                Growth { device: LOG.0, inode: LOG.1, from: log_len, mtime: tree_time(t), chunks: vec![chunk] };
            fb.commit(&repo, "web", t, &Fragment { growths: vec![growth] }).await?;
            // As a stream does, its packs go into the next point's index file.
            writer.adopt(std::mem::take(&mut fb.entries));
        }
        // The WAL of the minute, and a base backup once a day.
        let begin = wal.minute(&repo, at(minute)).await?;
        if minute % BASE_BACKUP_EVERY == 0 || minute + 1 == points {
            base_backup(&writer, at(minute) + SignedDuration::from_secs(30), begin, wal.stored).await?;
            bases += 1;
        }
        if minute % 10_000 == 0 {
            eprintln!("{minute} of {points} points");
        }
    }
    eprintln!("{points} points of web, {bases} base backups of db, WAL to {}", wal.made.pos());
    Ok(())
}

/// Runs `f` with a packer, then flushes it: packers block (on uploads), so this
/// runs where the runtime allows it.
fn packing<T>(w: &Arc<Writer>, f: impl FnOnce(&mut Packer) -> Result<T, WriteError>) -> Result<T> {
    tokio::task::block_in_place(|| {
        let mut p = w.packer();
        let out = f(&mut p)?;
        p.flush()?;
        Ok(out)
    })
}

fn tree_time(t: Timestamp) -> catalog::tree::Timestamp {
    catalog::tree::Timestamp { sec: t.as_second(), nsec: t.subsec_nanosecond() as u32 }
}

fn file(name: &[u8], chunks: Vec<BlobRef>, (device, inode): (u64, u64)) -> Entry {
    let mut e = Entry::new(name.to_vec(), EntryKind::File);
    e.content = chunks.into_iter().map(Extent::Data).collect();
    e.size = e.content.iter().map(Extent::len).sum();
    (e.mode, e.device, e.inode, e.nlink) = (0o644, device, inode, 1);
    e
}

/// The root wrapper tree: one directory entry, `name`, holding `entries`.
fn wrap(p: &mut Packer, name: &[u8], mut entries: Vec<Entry>) -> Result<BlobRef, WriteError> {
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let sub = p.store(BlobKind::Tree, &Tree { entries }.encode())?;
    let mut dir = Entry::new(name.to_vec(), EntryKind::Dir);
    dir.mode = 0o755;
    dir.subtree = Some(sub);
    p.store(BlobKind::Tree, &Tree { entries: vec![dir] }.encode())
}

async fn commit(w: &Arc<Writer>, source: &str, time: Timestamp, root: BlobRef, pg: Option<PgInfo>) -> Result<()> {
    // Its index file named at the point's time, as when the history was written.
    let durable = w.checkpoint_as_of(time).await?;
    let kind = if pg.is_some() { "pg" } else { "dir" };
    let mut m = Manifest::new(source, time, "bench".into(), kind, format!("/{source}"), root);
    m.index = durable.summary.index.clone();
    m.pg = pg;
    durable.commit(&m, time).await?;
    Ok(())
}

async fn base_backup(w: &Arc<Writer>, time: Timestamp, start: u64, stop: u64) -> Result<()> {
    let files = [("PG_VERSION", b"15\n".to_vec()), ("postgresql.conf", b"# made up\n".to_vec())];
    let root = packing(w, |p| {
        let mut entries = Vec::new();
        for (n, d) in files {
            entries.push(file(n.as_bytes(), vec![p.store(BlobKind::Data, &d)?], (1, 100)));
        }
        wrap(p, b"data", entries)
    })?;
    let pg = PgInfo {
        system_id: SYSTEM_ID,
        timeline: 1,
        start_lsn: streamer::pg::lsn::text(Lsn(start)).to_string(),
        stop_lsn: streamer::pg::lsn::text(Lsn(stop)).to_string(),
        server_version: "15".into(),
        segment_size: SEGMENT,
    };
    commit(w, "db", time, root, Some(pg)).await
}

/// The WAL of `db`, made a minute at a time and stored in pieces.
struct Wal {
    made: MadeUp,
    /// Where the pieces stored so far end.
    stored: u64,
    /// When the first piece of the segment being stored was received.
    segment_received: Option<Timestamp>,
}

impl Wal {
    async fn new(repo: &Repository) -> Result<Wal> {
        repo.claim_wal_system("db", WalSystem { system_id: SYSTEM_ID, segment_size: SEGMENT }).await?;
        Ok(Wal { made: MadeUp::new(SEGMENT), stored: 0, segment_received: None })
    }

    /// A minute of WAL from `t`: a commit every 0.9 s, then its pieces, each
    /// received after the commits in it. Returns where its first record starts.
    async fn minute(&mut self, repo: &Repository, t: Timestamp) -> Result<u64> {
        let begin = self.stored;
        let until = begin + PIECES_A_MINUTE * PIECE;
        let micros = t.as_microsecond() - PG_EPOCH_MICROS;
        let mut first = None;
        let mut k = 0;
        while self.made.pos() < until {
            self.made.other(440);
            first = first.or(self.made.records.last().map(|(at, _)| *at));
            self.made.commit(micros + k * 900_000);
            k += 1;
        }
        while self.stored + PIECE <= self.made.pos() {
            let (from, to) = (self.stored, self.stored + PIECE);
            let offset = (from - self.made.base) as usize;
            let bytes = self.made.wal[offset..offset + PIECE as usize].to_vec();
            let received = t + SignedDuration::from_secs(15 * ((to - begin).div_ceil(PIECE)) as i64);
            repo.put_wal("db", &WalPiece { tli: 1, start: Lsn(from), end: Lsn(to) }, received, &bytes).await?;
            if from % SEGMENT == 0 {
                self.segment_received = Some(received);
            }
            self.stored = to;
        }
        while self.made.base + SEGMENT <= self.stored {
            // Stored whole too, as `ebb stream pg` does once its pieces are durable.
            let (start, end) = (self.made.base, self.made.base + SEGMENT);
            if let Some(received) = self.segment_received.take() {
                let whole = WalPiece { tli: 1, start: Lsn(start), end: Lsn(end) };
                repo.put_wal("db", &whole, received, &self.made.wal[..SEGMENT as usize]).await?;
            }
            self.made.take_segment();
        }
        Ok(first.unwrap_or(begin))
    }
}
