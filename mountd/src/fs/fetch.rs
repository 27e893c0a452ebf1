//! Fetching chunks: from memory, the disk cache or the store, each fetched once
//! however many readers ask at once, neighbours in one pack with one ranged GET,
//! and read-ahead and listing prefetch in the background.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use catalog::tree::{EntryKind, Extent, Tree};
use catalog::{BlobKind, BlobRef, ChunkCache, Id, Repository};
use futures::future::{BoxFuture, FutureExt, Shared};

use crate::cache::DiskCache;
use crate::error::FsError;

/// One fetch of a chunk, shared by every reader that asks while it runs.
type Fetch = Shared<BoxFuture<'static, Result<Bytes, String>>>;
/// Read-ahead and listing prefetch fetch neighbouring chunks of one pack with one
/// ranged GET of at most this many bytes, reading over gaps of up to `SPAN_GAP`.
const SPAN_BYTES: u64 = 8 << 20;
const SPAN_GAP: u64 = 64 << 10;
/// A fetch that takes longer than this fails the read with EIO instead of hanging.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Listing a directory prefetches its small files (one chunk each), since tools that
/// list a tree (`find | xargs cat`, `cp -r`, `grep -r`) read them next: at most this
/// many per directory.
const LISTING_PREFETCH_FILES: usize = 1024;
/// Store requests that read ahead or prefetch run at most this many at once, so
/// that a burst of them holds neither many threads nor much memory; reads that a
/// reader waits for do not queue behind them.
const BACKGROUND_REQUESTS: usize = 16;

pub(crate) struct Fetcher {
    repo: Repository,
    cache: ChunkCache,
    disk: Option<DiskCache>,
    inflight: Mutex<HashMap<Id, Fetch>>,
    background: tokio::sync::Semaphore,
    /// Where background fetches run (read-ahead may be started from a FUSE thread).
    rt: tokio::runtime::Handle,
}

impl Fetcher {
    /// A fetcher keeping `cache_bytes` of plaintext chunks in memory, and sealed
    /// ones in `disk` if given. Runs its background fetches on the current runtime.
    pub fn new(repo: Repository, cache_bytes: usize, disk: Option<DiskCache>) -> Arc<Fetcher> {
        Arc::new(Fetcher {
            repo,
            cache: ChunkCache::new(cache_bytes),
            disk,
            inflight: Mutex::new(HashMap::new()),
            background: tokio::sync::Semaphore::new(BACKGROUND_REQUESTS),
            rt: tokio::runtime::Handle::current(),
        })
    }

    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    /// A chunk's plaintext if it is in memory.
    pub fn cached(&self, id: &Id) -> Option<Bytes> {
        self.cache.get(id)
    }

    /// Starts fetching the small files of a directory just listed.
    pub fn prefetch_small_files(self: &Arc<Self>, tree: &Tree) {
        let mut blobs: Vec<BlobRef> = tree
            .entries
            .iter()
            .filter_map(|e| match e.content.as_slice() {
                [Extent::Data(b)] if e.kind == EntryKind::File => Some(*b),
                _ => None,
            })
            .take(LISTING_PREFETCH_FILES)
            .collect();
        blobs.sort_by_key(|b| (b.pack, b.offset));
        blobs.dedup_by_key(|b| b.id);
        self.fetch_ahead(blobs.into_iter());
    }

    /// Starts fetching `blobs` in the background, each run of neighbours in one pack
    /// with one ranged GET; those cached, in flight or on the disk cache are skipped
    /// or fetched alone.
    pub fn fetch_ahead(self: &Arc<Self>, blobs: impl Iterator<Item = BlobRef>) {
        let mut run: Vec<BlobRef> = Vec::new();
        for b in blobs {
            if self.cache.contains(&b.id) || self.inflight.lock().expect("in-flight fetches").contains_key(&b.id) {
                continue;
            }
            if self.disk.as_ref().is_some_and(|d| d.contains(&b)) {
                let f = self.clone();
                self.rt.spawn(async move { f.chunk(&b).await });
                continue;
            }
            if let (Some(head), Some(last)) = (run.first(), run.last()) {
                if !b.joins_span(head, last, SPAN_GAP, SPAN_BYTES) {
                    self.fetch_span(std::mem::take(&mut run));
                }
            }
            run.push(b);
        }
        if !run.is_empty() {
            self.fetch_span(run);
        }
    }

    /// Fetches neighbouring chunks of one pack with one ranged GET, in the
    /// background, and decrypts each where it landed. Readers that want one of them
    /// meanwhile wait for this fetch.
    fn fetch_span(self: &Arc<Self>, mut blobs: Vec<BlobRef>) {
        let mut inflight = self.inflight.lock().expect("in-flight fetches");
        blobs.retain(|b| !inflight.contains_key(&b.id));
        let (Some(head), Some(last)) = (blobs.first(), blobs.last()) else { return };
        let (pack, start, end) = (head.pack, head.offset as u64, last.offset as u64 + last.length as u64);
        let (f, todo) = (self.clone(), blobs.clone());
        let span = async move {
            let sealed = async {
                let _permit = f.background.acquire().await.map_err(|e| e.to_string())?;
                f.bounded(&pack, f.repo.store().get_range(&catalog::pack_name(&pack), start..end)).await
            };
            let mut all = match sealed.await {
                Ok(all) => all.try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..])),
                Err(e) => return Arc::new(todo.iter().map(|b| f.settle(b, Err(e.clone()))).collect()),
            };
            let mut at = start;
            let opened = todo.iter().map(|b| {
                all.advance((b.offset as u64 - at) as usize);
                at = b.offset as u64 + b.length as u64;
                let mine = all.split_to(b.length as usize);
                if let Some(d) = &f.disk {
                    d.put(b, &mine);
                }
                let plain = f.repo.open_blob_in_place(BlobKind::Data, b, mine).map_err(|e| e.to_string());
                f.settle(b, plain)
            });
            Arc::new(opened.collect::<Vec<_>>())
        }
        .boxed()
        .shared();
        for (i, b) in blobs.iter().enumerate() {
            inflight.insert(b.id, span.clone().map(move |all| all[i].clone()).boxed().shared());
        }
        drop(inflight);
        self.rt.spawn(span);
    }

    /// A chunk's plaintext, from the cache or fetched once however many ask at once.
    pub async fn chunk(self: &Arc<Self>, b: &BlobRef) -> Result<Bytes, FsError> {
        if let Some(c) = self.cache.get(&b.id) {
            return Ok(c);
        }
        let fetch = {
            let mut inflight = self.inflight.lock().expect("in-flight fetches");
            // A fetch that just ended put its chunk in the cache before leaving.
            if let Some(c) = self.cache.get(&b.id) {
                return Ok(c);
            }
            inflight
                .entry(b.id)
                .or_insert_with(|| {
                    let (f, b) = (self.clone(), *b);
                    async move {
                        let result = f.bounded(&b.pack, f.fetch(&b)).await;
                        f.settle(&b, result)
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        fetch.await.map_err(FsError::Io)
    }

    /// Runs a store request against `FETCH_TIMEOUT`.
    async fn bounded<T, E: std::fmt::Display>(
        &self,
        pack: &Id,
        request: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(FETCH_TIMEOUT, request).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("read of {} timed out after {FETCH_TIMEOUT:?}", catalog::pack_name(pack))),
        }
    }

    /// A fetch has ended: keep its chunk, or log why it failed, then let the next
    /// reader start afresh.
    fn settle(&self, b: &BlobRef, result: Result<Bytes, String>) -> Result<Bytes, String> {
        match &result {
            Ok(data) => self.cache.insert(b.id, data.clone()),
            Err(e) => tracing::error!("read failed: {e}"),
        }
        self.inflight.lock().expect("in-flight fetches").remove(&b.id);
        result
    }

    /// A chunk's plaintext from the disk cache if it is there and authentic, else
    /// from the store (and then kept on disk).
    async fn fetch(&self, b: &BlobRef) -> Result<Bytes, catalog::RepoError> {
        let Some(disk) = &self.disk else { return self.repo.read_blob_authenticated(BlobKind::Data, b).await };
        if let Some(sealed) = disk.get(b) {
            match self.repo.open_blob_authenticated(BlobKind::Data, b, &sealed) {
                Ok(plain) => return Ok(plain),
                Err(e) => {
                    tracing::warn!("dropping a damaged entry of the disk cache: {e}");
                    disk.remove(b);
                }
            }
        }
        let sealed = self.repo.store().get_range(&catalog::pack_name(&b.pack), b.range()).await?;
        disk.put(b, &sealed);
        let sealed = sealed.try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..]));
        Ok(self.repo.open_blob_in_place(BlobKind::Data, b, sealed)?)
    }
}
