//! The fetch stage: files come from the walk in batches; the chunks of a batch,
//! each once however many files use it, are ordered by pack and offset, and
//! neighbours in a pack are fetched with one ranged GET (a span). Spans run
//! concurrently within the memory budget; each is decrypted and written on the
//! blocking pool. A chunk the cache holds is not fetched again.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::ctx::Ctx;
use super::error::FileFailure;
use super::target;
use super::write::{FileJob, FileState};
use crate::id::Id;
use crate::pack::{pack_name, BlobKind, BlobRef};

/// A span reads over gaps of up to this many bytes between chunks it wants:
/// cheaper than another request on any store.
const SPAN_GAP: u64 = 256 << 10;
/// Spans are at most this long (one chunk may make a longer one).
const SPAN_BYTES: u64 = 8 << 20;
/// At most this many spans (or groups of empty files) at once.
const MAX_RUNNING: usize = 32;
/// A batch is launched before it is full when fewer than this many spans are
/// still running, so that the stage never waits for it.
const LOW_WATER: usize = 4;
/// A batch holds at most this many files...
const BATCH_FILES: usize = 4096;
/// ...and files of at most this many bytes in all (one file may be larger).
const BATCH_BYTES: u64 = 64 << 20;
/// Chunks stored uncompressed are cached (copied out of their span) only up to
/// this size: small files are the ones that recur.
const CACHED_COPY: usize = 256 << 10;
/// Files with nothing to fetch are made this many per task.
const EMPTY_PER_TASK: usize = 64;

/// The places a chunk goes: files and offsets.
type Dests = Vec<(Arc<FileState>, u64)>;

/// One unit of work of the fetch stage.
enum Work {
    /// Neighbouring chunks of one pack, fetched with one ranged GET.
    Span { pack: Id, start: u64, end: u64, chunks: Vec<(BlobRef, Dests)> },
    /// Chunks the cache had.
    Cached(Vec<(Bytes, Dests)>),
    /// Files with no chunk to write (empty, or holes only).
    Empty(Vec<Arc<FileState>>),
}

impl Work {
    /// What it holds in memory at most, in KiB: the sealed span and the largest
    /// chunk decrypted from it.
    fn cost_kib(&self) -> u64 {
        match self {
            Work::Span { start, end, chunks, .. } => {
                let largest = chunks.iter().map(|(b, _)| u64::from(b.raw_len)).max().unwrap_or(0);
                (end - start + largest).div_ceil(1024)
            }
            Work::Cached(_) | Work::Empty(_) => 0,
        }
    }
}

/// Restores the files the walk sends, until it is done (or the restore stops).
pub(super) async fn run(ctx: Arc<Ctx>, mut files: mpsc::Receiver<FileJob>) {
    // Sealed spans and the chunks decrypted from them: half the budget.
    let budget_kib = (ctx.memory / 2 / 1024).max(1);
    let budget_kib = budget_kib.min(Semaphore::MAX_PERMITS);
    let memory = Arc::new(Semaphore::new(budget_kib));
    let mut running = FuturesUnordered::new();
    let mut batch = Vec::new();
    let mut bytes = 0;
    let mut walked = false;
    while !walked || !batch.is_empty() {
        // A batch grows while the work launched before keeps the stage busy: the
        // more files it has, the more of their chunks share a request.
        let full = batch.len() >= BATCH_FILES || bytes >= BATCH_BYTES;
        let idle = !batch.is_empty() && running.len() < LOW_WATER;
        if !(walked || full || idle) {
            tokio::select! {
                job = files.recv() => match job {
                    Some(job) => {
                        bytes += job.entry.size;
                        batch.push(job);
                    }
                    None => walked = true,
                },
                Some(()) = running.next(), if !running.is_empty() => {}
            }
            continue;
        }
        if ctx.stopped() {
            break;
        }
        let jobs = std::mem::take(&mut batch);
        bytes = 0;
        let jobs = if ctx.overwrite { without_unchanged(&ctx, jobs).await } else { jobs };
        for work in plan(&ctx, jobs) {
            while running.len() >= MAX_RUNNING {
                running.next().await;
            }
            let kib = (work.cost_kib() as usize).clamp(1, budget_kib) as u32;
            let permit = memory.clone().acquire_many_owned(kib).await.expect("the semaphore is never closed");
            running.push(perform_task(ctx.clone(), work, permit));
        }
    }
    // Whatever the walk still sends after a stop is dropped, which lets it end.
    drop(files);
    while running.next().await.is_some() {}
}

/// `perform` started on the runtime now (it holds memory the next work may wait
/// for), as a future that ends with it.
fn perform_task(ctx: Arc<Ctx>, work: Work, permit: OwnedSemaphorePermit) -> impl Future<Output = ()> {
    let task = tokio::spawn(perform(ctx, work, permit));
    async move { task.await.expect("restore fetch task panicked") }
}

/// Takes out of `batch` the files already at their path with the point's content
/// (restoring over a tree), which only get their metadata.
async fn without_unchanged(ctx: &Arc<Ctx>, batch: Vec<FileJob>) -> Vec<FileJob> {
    let (check, mut rest): (Vec<FileJob>, Vec<FileJob>) = batch.into_iter().partition(|j| j.check_existing);
    if check.is_empty() {
        return rest;
    }
    // Reading and hashing local files: on as many threads as there are cores.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per = check.len().div_ceil(threads);
    let mut tasks = Vec::new();
    let mut check = check.into_iter();
    loop {
        let part: Vec<FileJob> = check.by_ref().take(per).collect();
        if part.is_empty() {
            break;
        }
        let ctx = ctx.clone();
        tasks.push(tokio::task::spawn_blocking(move || {
            let mut changed = Vec::new();
            for job in part {
                if target::same_content(&job.path, &job.entry, ctx.repo.keys()) {
                    FileState::new(job, 0).unchanged(&ctx);
                } else {
                    changed.push(job);
                }
            }
            changed
        }));
    }
    for t in tasks {
        rest.extend(t.await.expect("checking files panicked"));
    }
    rest
}

/// The work that restores `batch`: its chunks, each once, in pack order.
fn plan(ctx: &Ctx, batch: Vec<FileJob>) -> Vec<Work> {
    let mut wanted: HashMap<Id, (BlobRef, Dests)> = HashMap::new();
    let mut empty = Vec::new();
    for job in batch {
        let chunks: Vec<(u64, BlobRef)> = job.chunks().collect();
        let file = FileState::new(job, chunks.len());
        if chunks.is_empty() {
            empty.push(file);
            continue;
        }
        for (offset, blob) in chunks {
            wanted.entry(blob.id).or_insert_with(|| (blob, Vec::new())).1.push((file.clone(), offset));
        }
    }
    let mut work = Vec::new();
    let mut cached = Vec::new();
    let mut fetch: Vec<(BlobRef, Dests)> = Vec::new();
    for (id, (blob, dests)) in wanted {
        match ctx.cache.get(&id) {
            Some(data) => cached.push((data, dests)),
            None => fetch.push((blob, dests)),
        }
    }
    if !cached.is_empty() {
        work.push(Work::Cached(cached));
    }
    fetch.sort_by_key(|(b, _)| (b.pack, b.offset));
    let mut span: Vec<(BlobRef, Dests)> = Vec::new();
    for (blob, dests) in fetch {
        if let (Some((head, _)), Some((last, _))) = (span.first(), span.last()) {
            if !blob.joins_span(head, last, SPAN_GAP, SPAN_BYTES) {
                work.push(span_work(std::mem::take(&mut span)));
            }
        }
        span.push((blob, dests));
    }
    if !span.is_empty() {
        work.push(span_work(span));
    }
    for group in empty.chunks(EMPTY_PER_TASK) {
        work.push(Work::Empty(group.to_vec()));
    }
    work
}

fn span_work(chunks: Vec<(BlobRef, Dests)>) -> Work {
    let head = chunks.first().expect("a span has chunks").0;
    let last = chunks.last().expect("a span has chunks").0;
    Work::Span {
        pack: head.pack,
        start: u64::from(head.offset),
        end: u64::from(last.offset) + u64::from(last.length),
        chunks,
    }
}

async fn perform(ctx: Arc<Ctx>, work: Work, _permit: OwnedSemaphorePermit) {
    match work {
        Work::Span { pack, start, end, chunks } => span(ctx, pack, start, end, chunks).await,
        Work::Cached(chunks) => {
            blocking(move || {
                for (data, dests) in chunks {
                    for (file, offset) in dests {
                        file.write(&ctx, offset, &data);
                    }
                }
            })
            .await
        }
        Work::Empty(files) => {
            blocking(move || {
                for f in files {
                    f.finish(&ctx);
                }
            })
            .await
        }
    }
}

async fn blocking(f: impl FnOnce() + Send + 'static) {
    tokio::task::spawn_blocking(f).await.expect("restore writer panicked")
}

/// Fetches a span, then decrypts and writes each chunk. A chunk the span did not
/// bring intact (the request failed, came back short, or the chunk does not open)
/// is fetched again on its own, once; a chunk that fails twice costs the files
/// that use it.
async fn span(ctx: Arc<Ctx>, pack: Id, start: u64, end: u64, chunks: Vec<(BlobRef, Dests)>) {
    let sealed = ctx.repo.store().get_range(&pack_name(&pack), start..end).await;
    if let Ok(b) = &sealed {
        ctx.count_fetched(b.len() as u64);
    }
    let c = ctx.clone();
    let retry = tokio::task::spawn_blocking(move || {
        let ctx = c;
        let mut all = match sealed {
            Ok(all) => all.try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..])),
            Err(e) => {
                tracing::debug!("span {start}..{end} of pack {pack} failed: {e}; fetching its chunks one by one");
                return chunks;
            }
        };
        let mut retry = Vec::new();
        let mut at = start;
        for (blob, dests) in chunks {
            let skip = (u64::from(blob.offset) - at) as usize;
            if all.len() < skip + blob.length as usize {
                retry.push((blob, dests));
                all.clear();
                continue;
            }
            all.advance(skip);
            at = u64::from(blob.offset) + u64::from(blob.length);
            let mine = all.split_to(blob.length as usize);
            let sealed_at = mine.as_ptr() as usize..mine.as_ptr() as usize + mine.len();
            // Authenticated by AES-GCM, bound to its id by the AAD, as the mount
            // reads: recomputing the content id would be a sixth of the work.
            match ctx.repo.open_blob_in_place(BlobKind::Data, &blob, mine) {
                Ok(plain) => {
                    let shared = sealed_at.contains(&(plain.as_ptr() as usize));
                    deliver(&ctx, blob.id, plain, dests, shared)
                }
                Err(e) => {
                    tracing::debug!("{e}; fetching it again on its own");
                    retry.push((blob, dests));
                }
            }
        }
        retry
    })
    .await
    .expect("restore writer panicked");
    for (blob, dests) in retry {
        let fetched = ctx.repo.read_blob(BlobKind::Data, &blob).await;
        if fetched.is_ok() {
            ctx.count_fetched(u64::from(blob.length));
        }
        let c = ctx.clone();
        blocking(move || match fetched {
            Ok(plain) => deliver(&c, blob.id, plain, dests, false),
            Err(e) => {
                let why = FileFailure::Repository(e.to_string());
                for (file, _) in dests {
                    file.fail(&c, why.clone());
                }
            }
        })
        .await;
    }
}

/// Writes a chunk into every file that has it, and keeps it for later files.
/// `shared`: the chunk lies in the span's buffer (it was stored uncompressed).
fn deliver(ctx: &Ctx, id: Id, plain: Bytes, dests: Dests, shared: bool) {
    for (file, offset) in dests {
        file.write(ctx, offset, &plain);
    }
    if !shared {
        ctx.cache.insert(id, plain);
    } else if plain.len() <= CACHED_COPY {
        // A copy of its own: the span's buffer must not stay alive in the cache.
        ctx.cache.insert(id, Bytes::copy_from_slice(&plain));
    }
}
