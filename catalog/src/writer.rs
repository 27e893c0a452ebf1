//! Writing blobs: deduplication against the repository's index, packing, and uploads.
//!
//! A `Writer` is shared by the threads of one backup; each thread stores blobs through
//! its own `Packer` (compression and encryption run on that thread). Full packs go to
//! one async uploader over a bounded channel, so memory stays bounded whatever the
//! input. `checkpoint` and `finish` wait until every pack is durable, then write the
//! index file; only after that may a manifest reference any of it. A writer that
//! reported an error must be dropped: its dedup map may name blobs never stored.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::crypto::{compressor, encode_payload};
use crate::id::Id;
use crate::index::{seal_index, DedupIndex};
use crate::pack::{pack_name, parse_pack_name, read_header, BlobKind, BlobRef, PackBuilder, PackEntry, PACKS_DIR};
use crate::repo::{RepoError, Repository};
use crate::store::{Store, StoreError};

/// Packs are cut once they reach this size.
pub const PACK_TARGET: usize = 8 << 20;
/// Full packs waiting for the uploader, beyond those being uploaded.
const QUEUED_PACKS: usize = 2;
const CONCURRENT_UPLOADS: usize = 4;
/// Orphan packs read at once when adopting them.
const ADOPT_READS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("the uploader stopped after an error")]
    UploaderStopped,
    #[error("blobs were packed but never handed to the uploader (a packer was not flushed)")]
    Unflushed,
    #[error("a blob of {0} bytes is over the 4 GiB limit of the format")]
    TooLarge(usize),
}

#[derive(Debug, Clone, Default)]
pub struct WriterSummary {
    pub index: Option<String>,
    pub new_blobs: u64,
    pub new_data_blobs: u64,
    pub new_bytes: u64,
    pub packs: u64,
}

pub struct Writer {
    repo: Repository,
    dedup: Mutex<DedupIndex>,
    written: Mutex<Vec<PackEntry>>,
    tx: Mutex<Option<mpsc::Sender<Upload>>>,
    uploader: Mutex<Option<JoinHandle<Result<(), StoreError>>>>,
    new_blobs: AtomicU64,
    new_data_blobs: AtomicU64,
    new_bytes: AtomicU64,
    packs: AtomicU64,
    /// Blobs in packs not yet handed to the uploader: must be zero at `finish`.
    unflushed: AtomicU64,
    lost: AtomicBool,
}

impl Writer {
    /// Loads the repository's index and starts the uploader on the current runtime.
    pub async fn new(repo: Repository) -> Result<Arc<Writer>, RepoError> {
        let dedup = repo.load_index().await?;
        let (tx, rx) = mpsc::channel(QUEUED_PACKS);
        let uploader = tokio::spawn(upload_loop(repo.store().clone(), rx));
        Ok(Arc::new(Writer {
            repo,
            dedup: Mutex::new(dedup),
            written: Mutex::new(Vec::new()),
            tx: Mutex::new(Some(tx)),
            uploader: Mutex::new(Some(uploader)),
            new_blobs: AtomicU64::new(0),
            new_data_blobs: AtomicU64::new(0),
            new_bytes: AtomicU64::new(0),
            packs: AtomicU64::new(0),
            unflushed: AtomicU64::new(0),
            lost: AtomicBool::new(false),
        }))
    }

    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    /// A packer for one thread. Its methods block: call them off the async runtime.
    pub fn packer(self: &Arc<Self>) -> Packer {
        Packer { w: self.clone(), pack: None, zstd: compressor() }
    }

    /// Whether a blob with this content id is already stored (or being stored).
    pub fn known(&self, kind: BlobKind, id: &crate::Id) -> Option<BlobRef> {
        self.dedup.lock().expect("dedup lock").get(kind, id)
    }

    /// Takes durable packs that no index file lists into deduplication, and into the
    /// next index file: those a writer stopped by a crash uploaded but never
    /// indexed. Each is read whole once; one that cannot be read is skipped. Returns
    /// how many it took.
    pub async fn adopt_orphans(&self) -> Result<usize, RepoError> {
        let store = self.repo.store();
        let packs = store.list(PACKS_DIR).await?;
        let orphans: Vec<Id> = {
            let dedup = self.dedup.lock().expect("dedup lock");
            packs.iter().filter_map(|o| parse_pack_name(&o.name)).filter(|p| !dedup.has_pack(p)).collect()
        };
        let reads = orphans.into_iter().map(|pack| async move {
            let bytes = store.get(&pack_name(&pack)).await?;
            Ok::<_, StoreError>(read_header(self.repo.keys(), &pack, &bytes).map_err(|e| (pack, e.to_string())))
        });
        let mut adopted = 0;
        let mut results = futures::stream::iter(reads).buffer_unordered(ADOPT_READS);
        while let Some(r) = results.next().await {
            match r? {
                Ok(entries) => {
                    self.adopt(entries);
                    adopted += 1;
                }
                Err((pack, e)) => tracing::warn!("not adopting {}: {e}", pack_name(&pack)),
            }
        }
        Ok(adopted)
    }

    /// Blobs in packs that are durable already (stored by someone else, such as a
    /// stream's fragments): deduplicated against from now on, and listed in the next
    /// index file.
    pub fn adopt(&self, entries: Vec<PackEntry>) {
        let mut dedup = self.dedup.lock().expect("dedup lock");
        for e in &entries {
            dedup.insert(e.kind, e.blob);
        }
        drop(dedup);
        self.written.lock().expect("written lock").extend(entries);
    }

    /// Waits until every pack is durable, then writes the index file of the new blobs.
    /// Every packer must have been flushed.
    pub async fn finish(&self) -> Result<WriterSummary, WriteError> {
        drop(self.tx.lock().expect("tx lock").take());
        let uploader = self.uploader.lock().expect("uploader lock").take();
        if let Some(handle) = uploader {
            handle.await.expect("uploader panicked")?;
        }
        self.write_index().await
    }

    /// Waits until every pack handed over so far is durable, then writes the index
    /// file of the blobs stored since the last checkpoint. The writer goes on; the
    /// summary counts what was stored since the last checkpoint. Every packer must
    /// have been flushed.
    pub async fn checkpoint(&self) -> Result<WriterSummary, WriteError> {
        let tx = self.tx.lock().expect("tx lock").clone().ok_or(WriteError::UploaderStopped)?;
        let (ack, done) = oneshot::channel();
        if tx.send(Upload::Barrier(ack)).await.is_err() || done.await.is_err() {
            // The uploader stopped: say why.
            let uploader = self.uploader.lock().expect("uploader lock").take();
            if let Some(handle) = uploader {
                handle.await.expect("uploader panicked")?;
            }
            return Err(WriteError::UploaderStopped);
        }
        self.write_index().await
    }

    async fn write_index(&self) -> Result<WriterSummary, WriteError> {
        if self.lost.load(Ordering::SeqCst) || self.unflushed.load(Ordering::SeqCst) != 0 {
            return Err(WriteError::Unflushed);
        }
        let entries = std::mem::take(&mut *self.written.lock().expect("written lock"));
        let mut summary = WriterSummary {
            index: None,
            new_blobs: self.new_blobs.swap(0, Ordering::Relaxed),
            new_data_blobs: self.new_data_blobs.swap(0, Ordering::Relaxed),
            new_bytes: self.new_bytes.swap(0, Ordering::Relaxed),
            packs: self.packs.swap(0, Ordering::Relaxed),
        };
        if !entries.is_empty() {
            let name = Repository::new_index_name();
            let sealed = seal_index(self.repo.keys(), &name, &entries);
            self.repo.store().put_new(&name, Bytes::from(sealed)).await?;
            summary.index = Some(name);
        }
        Ok(summary)
    }

    fn send(&self, name: String, bytes: Vec<u8>) -> Result<(), WriteError> {
        let tx = self.tx.lock().expect("tx lock").clone().ok_or(WriteError::UploaderStopped)?;
        tx.blocking_send(Upload::Pack(name, Bytes::from(bytes))).map_err(|_| WriteError::UploaderStopped)
    }
}

enum Upload {
    Pack(String, Bytes),
    /// Acknowledged once every pack sent before it is durable.
    Barrier(oneshot::Sender<()>),
}

async fn upload_loop(store: Store, mut rx: mpsc::Receiver<Upload>) -> Result<(), StoreError> {
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            Some(done) = in_flight.next(), if !in_flight.is_empty() => done?,
            msg = rx.recv(), if open && in_flight.len() < CONCURRENT_UPLOADS => match msg {
                Some(Upload::Pack(name, bytes)) => {
                    let store = store.clone();
                    in_flight.push(async move { store.put_new(&name, bytes).await });
                }
                Some(Upload::Barrier(ack)) => {
                    while let Some(done) = in_flight.next().await {
                        done?;
                    }
                    let _ = ack.send(());
                }
                None => open = false,
            },
        }
    }
    Ok(())
}

/// One thread's way into a `Writer`: deduplicates, compresses, seals and packs blobs.
pub struct Packer {
    w: Arc<Writer>,
    pack: Option<PackBuilder>,
    zstd: zstd::bulk::Compressor<'static>,
}

impl Packer {
    pub fn content_id(&self, data: &[u8]) -> crate::Id {
        self.w.repo.keys().content_id(data)
    }

    /// Stores `data` unless the repository has it already; returns where it is.
    pub fn store(&mut self, kind: BlobKind, data: &[u8]) -> Result<BlobRef, WriteError> {
        // Leave room for the payload flag and the seal in the 32-bit lengths.
        if data.len() > u32::MAX as usize - 64 {
            return Err(WriteError::TooLarge(data.len()));
        }
        let keys = self.w.repo.keys();
        let id = keys.content_id(data);
        if let Some(b) = self.w.known(kind, &id) {
            return Ok(b);
        }
        let payload = encode_payload(data, Some(&mut self.zstd));
        let pack = self.pack.get_or_insert_with(|| PackBuilder::new(keys));
        let blob = pack.add(kind, id, data.len() as u32, &payload);
        self.w.dedup.lock().expect("dedup lock").insert(kind, blob);
        self.w.unflushed.fetch_add(1, Ordering::SeqCst);
        self.w.new_blobs.fetch_add(1, Ordering::Relaxed);
        if kind == BlobKind::Data {
            self.w.new_data_blobs.fetch_add(1, Ordering::Relaxed);
        }
        self.w.new_bytes.fetch_add(blob.length as u64, Ordering::Relaxed);
        if pack.len() >= PACK_TARGET {
            self.flush()?;
        }
        Ok(blob)
    }

    /// Hands the current pack to the uploader.
    pub fn flush(&mut self) -> Result<(), WriteError> {
        let Some(pack) = self.pack.take() else { return Ok(()) };
        if pack.is_empty() {
            return Ok(());
        }
        let (id, bytes, entries) = pack.finish();
        self.w.unflushed.fetch_sub(entries.len() as u64, Ordering::SeqCst);
        self.w.written.lock().expect("written lock").extend(entries);
        self.w.packs.fetch_add(1, Ordering::Relaxed);
        self.w.send(pack_name(&id), bytes)
    }
}

impl Drop for Packer {
    fn drop(&mut self) {
        if self.pack.as_ref().is_some_and(|p| !p.is_empty()) {
            // Trees may already reference these blobs: the point must not be written.
            self.w.lost.store(true, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyslot::{Secret, DEFAULT_KDF};

    /// A writer stopped after its pack was durable but before its index: the next
    /// writer adopts the pack and stores nothing again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn orphan_packs_are_adopted_not_uploaded_again() {
        let repo = Repository::init(Store::memory(), &Secret::KeyFile([5; 32]), DEFAULT_KDF, "t".into()).await.unwrap();
        let data: Vec<Vec<u8>> = (0..3u8).map(|i| (0..300_000u32).map(|j| (j % 251) as u8 ^ i).collect()).collect();
        let store_all = |w: Arc<Writer>, data: Vec<Vec<u8>>| {
            tokio::task::spawn_blocking(move || {
                let mut p = w.packer();
                for d in &data {
                    p.store(BlobKind::Data, d).unwrap();
                }
                p.flush().unwrap();
            })
        };

        let crashed = Writer::new(repo.clone()).await.unwrap();
        store_all(crashed.clone(), data.clone()).await.unwrap();
        // Its pack lands; its index never does.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while repo.store().list(PACKS_DIR).await.unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "the pack was never uploaded");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        drop(crashed);
        assert!(repo.store().list(crate::index::INDEX_DIR).await.unwrap().is_empty());

        let next = Writer::new(repo.clone()).await.unwrap();
        assert_eq!(next.adopt_orphans().await.unwrap(), 1);
        store_all(next.clone(), data.clone()).await.unwrap();
        let summary = next.finish().await.unwrap();
        assert_eq!((summary.new_blobs, summary.packs), (0, 0), "adopted blobs were stored again");
        assert!(summary.index.is_some(), "the adopted pack goes into an index file");
        assert_eq!(repo.store().list(PACKS_DIR).await.unwrap().len(), 1);

        // Indexed now: nothing left to adopt.
        let third = Writer::new(repo.clone()).await.unwrap();
        assert_eq!(third.adopt_orphans().await.unwrap(), 0);
        third.finish().await.unwrap();
    }
}
