//! `ebb pg base-backup`: BASE_BACKUP over the replication protocol (PostgreSQL 15's
//! format: one COPY stream of typed messages carrying tar archives, then the backup
//! manifest). The files are chunked into the repository like any backup, so a
//! second base backup of a mostly unchanged database stores little. The point
//! records the timeline, the start and stop LSN, and keeps the backup manifest as
//! the file `backup_manifest`, as pg_basebackup writes it.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use catalog::chunker::{ChunkError, Chunker};
use catalog::tree::{Entry, EntryKind, Extent, Timestamp as TreeTime, Tree};
use catalog::wal::{Lsn, WalSystem};
use catalog::{BlobKind, BlobRef, Manifest, PointRef, RepoError, Repository, Stats, WriteError, Writer};
use jiff::Timestamp;
use tokio::sync::mpsc;

use super::wire::{CopyEvent, PgError, ReplConn};
use super::{info, lsn};

#[derive(Debug, thiserror::Error)]
pub enum BaseBackupError {
    #[error("{0}")]
    Pg(String),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("reading the base backup's tar stream: {0}")]
    Tar(std::io::Error),
    #[error("{0}")]
    Unsupported(String),
}

impl From<PgError> for BaseBackupError {
    fn from(e: PgError) -> Self {
        BaseBackupError::Pg(super::walstream::classify(&e).unwrap_or_else(|| e.to_string()))
    }
}

pub struct BaseBackupOptions {
    pub source: String,
    pub dsn: tokio_postgres::Config,
    /// The DSN as shown to people: no password.
    pub dsn_display: String,
    pub host: String,
}

/// What the tar reader hands back: the data directory's entries, stored.
pub(crate) struct Stored {
    pub(crate) root: BlobRef,
    stats: Stats,
}

pub async fn base_backup(repo: &Repository, opts: &BaseBackupOptions) -> Result<(PointRef, Manifest), BaseBackupError> {
    let started = std::time::Instant::now();
    let mut conn = ReplConn::connect(&opts.dsn).await?;
    let (system_id, _, _) = conn.identify_system().await?;
    let segment_size = conn.segment_size().await?;
    repo.claim_wal_system(&opts.source, WalSystem { system_id, segment_size }).await?;
    let server_version = conn.server_version.clone();

    conn.send_query("BASE_BACKUP (LABEL 'ebb base backup', CHECKPOINT 'fast', MANIFEST 'yes', WAIT true)").await?;
    let start = conn.next_result().await?;
    let (start_lsn, tli) = lsn_and_tli(&start)?;
    let spaces = conn.next_result().await?;
    if spaces.iter().any(|r| r.first().cloned().flatten().is_some()) {
        return Err(BaseBackupError::Unsupported(
            "the cluster has tablespaces outside its data directory, which ebb does not back up yet".into(),
        ));
    }
    conn.expect_copy_out().await?;

    let writer = Writer::new(repo.clone()).await?;
    // Until it commits, prune keeps the WAL from its start, whatever it makes of
    // the base backups kept.
    writer.need_wal(&opts.source, tli, start_lsn).await?;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let (manifest_tx, manifest_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let reader = {
        let writer = writer.clone();
        tokio::task::spawn_blocking(move || read_archive(&writer, ChannelReader { rx, cur: Bytes::new() }, manifest_rx))
    };
    let mut tx = Some(tx);
    let mut manifest: Option<Vec<u8>> = None;
    let received = async {
        loop {
            match conn.copy_recv().await? {
                CopyEvent::Done => break,
                CopyEvent::Data(msg) => match msg.first() {
                    Some(b'n') => {
                        let mut parts = msg[1..].split(|&b| b == 0);
                        let (name, location) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
                        if !location.is_empty() || manifest.is_some() || name != b"base.tar" {
                            return Err(BaseBackupError::Unsupported(format!(
                                "the server sent archive {} (tablespaces are not backed up yet)",
                                String::from_utf8_lossy(name)
                            )));
                        }
                    }
                    Some(b'd') => match (&mut manifest, &tx) {
                        (Some(m), _) => m.extend_from_slice(&msg[1..]),
                        (None, Some(t)) => {
                            if t.send(msg.slice(1..)).await.is_err() {
                                break; // the reader failed; its error is reported below
                            }
                        }
                        (None, None) => {}
                    },
                    Some(b'm') => {
                        tx = None;
                        manifest = Some(Vec::new());
                    }
                    Some(b'p') => {}
                    _ => return Err(BaseBackupError::Pg("unknown message in the base backup stream".into())),
                },
            }
        }
        drop(tx.take());
        let end = conn.next_result().await?;
        conn.copy_finish().await?;
        Ok::<_, BaseBackupError>(end)
    }
    .await;
    drop(tx);
    if let Some(m) = manifest.take() {
        let _ = manifest_tx.send(m);
    }
    drop(manifest_tx);
    let stored = reader.await.expect("base backup reader panicked");
    let durable = writer.finish().await;
    let end = received?;
    let stored = stored?;
    let durable = durable?;
    let summary = durable.summary.clone();
    let (stop_lsn, _) = lsn_and_tli(&end)?;
    conn.close().await;

    let time = Timestamp::now();
    let mut manifest =
        Manifest::new(&opts.source, time, opts.host.clone(), "pg", opts.dsn_display.clone(), stored.root);
    manifest.stats = stored.stats;
    manifest.stats.new_blobs = summary.new_blobs;
    manifest.stats.new_data_blobs = summary.new_data_blobs;
    manifest.stats.new_bytes = summary.new_bytes;
    manifest.stats.duration_ms = started.elapsed().as_millis() as u64;
    manifest.index = summary.index;
    manifest.pg = Some(info::record(system_id, tli, start_lsn, stop_lsn, server_version, segment_size));
    let point = durable.commit(&manifest, time).await?;
    Ok((point, manifest))
}

fn lsn_and_tli(rows: &super::wire::Rows) -> Result<(Lsn, u32), BaseBackupError> {
    let row = rows.first().ok_or_else(|| BaseBackupError::Pg("BASE_BACKUP sent no position".into()))?;
    let text = row.first().cloned().flatten().ok_or_else(|| BaseBackupError::Pg("BASE_BACKUP: no LSN".into()))?;
    let lsn = lsn::parse(&text).map_err(BaseBackupError::Pg)?;
    let tli = row.get(1).cloned().flatten().and_then(|t| t.parse().ok()).unwrap_or(0);
    Ok((lsn, tli))
}

/// The archive's bytes as they arrive, for the tar reader on its own thread.
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur.advance(n);
        Ok(n)
    }
}

#[derive(Default)]
struct DirNode {
    meta: Option<Entry>,
    children: BTreeMap<Vec<u8>, Child>,
}

enum Child {
    Leaf(Entry),
    Dir(DirNode),
}

impl DirNode {
    fn insert(&mut self, path: &[&[u8]], entry: Entry) {
        match path {
            [] => {}
            [name] => {
                if entry.kind == EntryKind::Dir {
                    match self.children.entry(name.to_vec()).or_insert_with(|| Child::Dir(DirNode::default())) {
                        Child::Dir(d) => d.meta = Some(entry),
                        leaf => *leaf = Child::Dir(DirNode { meta: Some(entry), children: BTreeMap::new() }),
                    }
                } else {
                    self.children.insert(name.to_vec(), Child::Leaf(entry));
                }
            }
            [first, rest @ ..] => {
                let child = self.children.entry(first.to_vec()).or_insert_with(|| Child::Dir(DirNode::default()));
                if let Child::Leaf(_) = child {
                    *child = Child::Dir(DirNode::default());
                }
                if let Child::Dir(d) = child {
                    d.insert(rest, entry);
                }
            }
        }
    }

    /// Stores this directory's tree (and its subdirectories' first) and returns its entry.
    fn store(self, name: Vec<u8>, packer: &mut catalog::Packer, stats: &mut Stats) -> Result<Entry, WriteError> {
        let mut tree = Tree::default();
        for (child_name, child) in self.children {
            tree.entries.push(match child {
                Child::Leaf(e) => e,
                Child::Dir(d) => d.store(child_name, packer, stats)?,
            });
        }
        tree.sort();
        let mut entry = self.meta.unwrap_or_else(|| {
            let mut e = Entry::new(Vec::new(), EntryKind::Dir);
            e.mode = 0o700;
            e
        });
        entry.name = name;
        entry.kind = EntryKind::Dir;
        entry.subtree = Some(packer.store_tree(&tree)?);
        stats.dirs += 1;
        Ok(entry)
    }
}

/// Chunks what `content` yields into the repository as the content of `e`.
fn store_content(
    e: &mut Entry,
    content: impl Read,
    chunker: &mut Chunker,
    packer: &mut catalog::Packer,
) -> Result<(), BaseBackupError> {
    let mut extents = Vec::new();
    let size = chunker
        .run(content, |chunk| {
            extents.push(Extent::Data(packer.store(BlobKind::Data, chunk)?));
            Ok::<(), WriteError>(())
        })
        .map_err(|e| match e {
            ChunkError::Read(e) => BaseBackupError::Tar(e),
            ChunkError::Emit(e) => BaseBackupError::Write(e),
        })?;
    e.content = extents;
    e.size = size;
    Ok(())
}

/// Reads the tar archive of the data directory, storing file contents as they
/// come, then the manifest, then the trees.
pub(crate) fn read_archive(
    writer: &Arc<Writer>,
    input: impl std::io::Read,
    manifest: std::sync::mpsc::Receiver<Vec<u8>>,
) -> Result<Stored, BaseBackupError> {
    let mut packer = writer.packer();
    let mut chunker = Chunker::new(writer.repo().keys().chunker_seed);
    let mut stats = Stats::default();
    let mut root = DirNode::default();
    let mut archive = tar::Archive::new(input);
    let (mut uid, mut gid) = (0, 0);
    for entry in archive.entries().map_err(BaseBackupError::Tar)? {
        let mut entry = entry.map_err(BaseBackupError::Tar)?;
        let path = entry.path_bytes().into_owned();
        let h = entry.header();
        let kind = match h.entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => EntryKind::Symlink,
            other => {
                return Err(BaseBackupError::Unsupported(format!(
                    "{}: tar entry type {other:?}",
                    String::from_utf8_lossy(&path)
                )))
            }
        };
        let name = path.rsplit(|&b| b == b'/').find(|c| !c.is_empty()).unwrap_or_default().to_vec();
        let mut e = Entry::new(name, kind);
        e.mode = h.mode().map_err(BaseBackupError::Tar)? & 0o7777;
        e.uid = h.uid().map_err(BaseBackupError::Tar)? as u32;
        e.gid = h.gid().map_err(BaseBackupError::Tar)? as u32;
        (uid, gid) = (e.uid, e.gid);
        let mtime = h.mtime().map_err(BaseBackupError::Tar)? as i64;
        e.mtime = TreeTime { sec: mtime, nsec: 0 };
        e.ctime = e.mtime;
        match kind {
            EntryKind::File => {
                store_content(&mut e, &mut entry, &mut chunker, &mut packer)?;
                stats.files += 1;
                stats.bytes += e.size;
                stats.bytes_read += e.size;
            }
            EntryKind::Symlink => {
                e.target = entry.link_name_bytes().map(|l| l.into_owned()).unwrap_or_default();
                stats.others += 1;
            }
            _ => {}
        }
        let comps: Vec<&[u8]> = path.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".").collect();
        // A name a tree cannot hold: the server sent something no data directory has.
        if comps.iter().any(|c| *c == b".." || c.contains(&0)) {
            return Err(BaseBackupError::Unsupported(format!(
                "the server sent a path with `..` or NUL in it: {}",
                String::from_utf8_lossy(&path)
            )));
        }
        root.insert(&comps, e);
    }
    // The manifest comes after the archive: kept as pg_basebackup keeps it.
    if let Ok(m) = manifest.recv() {
        let mut e = Entry::new(b"backup_manifest".to_vec(), EntryKind::File);
        e.mode = 0o600;
        (e.uid, e.gid) = (uid, gid);
        let now = Timestamp::now();
        e.mtime = TreeTime { sec: now.as_second(), nsec: 0 };
        e.ctime = e.mtime;
        store_content(&mut e, m.as_slice(), &mut chunker, &mut packer)?;
        stats.files += 1;
        stats.bytes += e.size;
        root.insert(&[b"backup_manifest"], e);
    }
    if root.meta.is_none() {
        let mut e = Entry::new(Vec::new(), EntryKind::Dir);
        e.mode = 0o700;
        (e.uid, e.gid) = (uid, gid);
        root.meta = Some(e);
    }
    let top = root.store(b"data".to_vec(), &mut packer, &mut stats)?;
    let mut tree = Tree { entries: vec![top] };
    tree.sort();
    let root_ref = packer.store_tree(&tree)?;
    packer.flush()?;
    Ok(Stored { root: root_ref, stats })
}
