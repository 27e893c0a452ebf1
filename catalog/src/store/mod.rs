//! Where a repository's objects live: a prefix in an `object_store` backend.
//!
//! URLs: `file:///path` (the local filesystem; every put, and every directory it
//! creates, is fsynced before it returns), `s3://bucket/prefix` (credentials, region and an optional endpoint for
//! S3-compatible servers come from the usual `AWS_*` variables, e.g.
//! `AWS_ENDPOINT_URL=http://127.0.0.1:9000`), and `memory://` for unit tests.
//! Object names are relative to the repository's prefix and use only the characters
//! `[A-Za-z0-9._/-]`.

mod error;
mod local;

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

pub use error::StoreError;
use local::{list_after_local, list_between_local, read_range_direct};

/// Gets `get_many` sends an object store at once, and blocking tasks it reads
/// local files on.
const GETS_IN_FLIGHT: usize = 16;
const LOCAL_READERS: usize = 2;
/// Deletes `delete_many` sends an object store at once.
const DELETES_IN_FLIGHT: usize = 16;
/// Names of one batch of `delete_many` on `file://`, and batches at once: the
/// fsyncs of several directories overlap, as the deletes of one object each did.
const LOCAL_DELETE_BATCH: usize = 256;
const LOCAL_DELETE_BATCHES: usize = 8;
pub use local::{local_name, local_path};

/// An object being written (`Store::new_object`): on `file://` its bytes go to a
/// staged file as they come, published with a hard link that fails if the name is
/// taken; elsewhere they are gathered and written with one `put_new`. Dropped
/// unfinished, it leaves nothing.
pub struct NewObject {
    name: String,
    len: u64,
    to: Sink,
}

enum Sink {
    Staged(local::Staged),
    Gathered(Store, Vec<u8>),
}

impl NewObject {
    /// Appends `bytes`.
    pub async fn write(&mut self, bytes: Vec<u8>) -> Result<(), StoreError> {
        self.len += bytes.len() as u64;
        match &mut self.to {
            Sink::Staged(staged) => {
                let file = staged.file();
                tokio::task::spawn_blocking(move || std::io::Write::write_all(&mut &*file, &bytes))
                    .await
                    .expect("write task panicked")
                    .map_err(|cause| StoreError::Io { op: "write", name: self.name.clone(), cause })
            }
            Sink::Gathered(_, gathered) => {
                gathered.extend_from_slice(&bytes);
                Ok(())
            }
        }
    }

    /// The bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes the object visible under its name once durable; `AlreadyExists` if
    /// the name is taken.
    pub async fn finish(self) -> Result<(), StoreError> {
        let name = self.name;
        match self.to {
            Sink::Staged(staged) => tokio::task::spawn_blocking(move || staged.publish())
                .await
                .expect("publish task panicked")
                .map_err(|cause| match cause.kind() {
                    std::io::ErrorKind::AlreadyExists => StoreError::AlreadyExists { name },
                    _ => StoreError::Io { op: "put", name, cause },
                }),
            Sink::Gathered(store, gathered) => store.put_new(&name, Bytes::from(gathered)).await,
        }
    }
}

/// The one spelling of a repository URL: `file:///r`, `file:///r/` and
/// `file:///r//x/..` name one directory (resolved, symlinks too, when it exists),
/// `s3://b/p/` and `s3://b//p` one prefix. State kept per repository is keyed by it.
pub fn canonical_url(url: &str) -> String {
    let squash = |path: &str| {
        let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
        parts.join("/")
    };
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return url.to_string();
        }
        return match std::fs::canonicalize(path) {
            Ok(p) => format!("file://{}", p.display()),
            Err(_) => format!("file:///{}", squash(path)),
        };
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = squash(prefix);
        return if prefix.is_empty() { format!("s3://{bucket}") } else { format!("s3://{bucket}/{prefix}") };
    }
    url.to_string()
}

/// A staged upload (`Store::sweep_staged`) this old was left by a put that was
/// interrupted: no put takes this long.
pub const STAGED_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// One object found by a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub name: String,
    pub size: u64,
    /// When the store says the object was written (`list` gives it; `list_after`
    /// on a local store does not).
    pub modified: Option<jiff::Timestamp>,
}

/// A listing's time of an object, as the store gives it.
fn modified(m: &object_store::ObjectMeta) -> Option<jiff::Timestamp> {
    jiff::Timestamp::new(m.last_modified.timestamp(), m.last_modified.timestamp_subsec_nanos() as i32).ok()
}

/// A repository's objects: a backend and the prefix inside it.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: String,
    /// For `file://`: the directory, so that deletes can be fsynced.
    local_root: Option<PathBuf>,
    /// Whether objects live in the `file://` layout (`local_path`), which
    /// `local_root` alone does not say once faults are injected.
    local_layout: bool,
    url: String,
    /// Bytes read from the store so far (whole objects and ranges), by this
    /// store and its clones.
    fetched: Arc<std::sync::atomic::AtomicU64>,
}

impl Store {
    /// Opens the store a URL names. For `file://` the directory is created when
    /// `create` is set, and must exist otherwise. An S3 endpoint other than AWS's
    /// comes from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`.
    pub fn open(url: &str, create: bool) -> Result<Store, StoreError> {
        let endpoint = std::env::var("AWS_ENDPOINT_URL_S3").or_else(|_| std::env::var("AWS_ENDPOINT_URL")).ok();
        Store::open_with(url, create, endpoint.as_deref())
    }

    /// Like `open`, with the S3 endpoint given (`None`: AWS's own, unless the other
    /// `AWS_*` variables the S3 client reads say otherwise).
    pub fn open_with(url: &str, create: bool, s3_endpoint: Option<&str>) -> Result<Store, StoreError> {
        let bad = |problem: &str| StoreError::BadUrl { url: url.to_string(), problem: problem.to_string() };
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad("a file:// URL needs an absolute path, like file:///srv/ebb"));
            }
            let dir = PathBuf::from(path);
            if create {
                std::fs::create_dir_all(&dir).map_err(|cause| StoreError::Io {
                    op: "create directory",
                    name: path.to_string(),
                    cause,
                })?;
            } else if !dir.is_dir() {
                return Err(StoreError::NotFound { name: format!("{url} (no such directory)") });
            }
            // fsync every written file and every directory it creates before a put returns.
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| StoreError::from_backend("open", path, e))?
                .with_fsync(true);
            return Ok(Store {
                inner: Arc::new(fs),
                prefix: String::new(),
                local_root: Some(dir),
                local_layout: true,
                url: url.to_string(),
                fetched: Default::default(),
            });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("an s3:// URL names a bucket, like s3://bucket/prefix"));
            }
            // Every request is bounded: 30 s each, retried with backoff and jitter for at
            // most a minute, after which the caller sees the error (and a stream
            // retries on its own, for as long as it takes).
            let retry = object_store::RetryConfig {
                backoff: object_store::BackoffConfig::default(),
                max_retries: 6,
                retry_timeout: std::time::Duration::from_secs(60),
            };
            let client = object_store::ClientOptions::new()
                .with_timeout(std::time::Duration::from_secs(30))
                .with_connect_timeout(std::time::Duration::from_secs(5));
            let mut builder = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry)
                .with_client_options(client);
            if let Some(endpoint) = s3_endpoint {
                builder = builder.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
            }
            let s3 = builder.build().map_err(|e| StoreError::from_backend("open", url, e))?;
            return Ok(Store {
                inner: Arc::new(s3),
                prefix: prefix.trim_matches('/').to_string(),
                local_root: None,
                local_layout: false,
                url: url.to_string(),
                fetched: Default::default(),
            });
        }
        if url == "memory://" {
            return Ok(Store::memory());
        }
        Err(bad("expected file:///path, s3://bucket/prefix or memory://"))
    }

    /// A fresh in-memory store, for tests.
    /// A `file://` store in `dir` (created) that never fsyncs: only for generating
    /// repositories to measure (`examples/history.rs`), never for data to keep.
    pub fn open_unsynced(dir: &std::path::Path) -> Result<Store, StoreError> {
        let path = dir.display().to_string();
        std::fs::create_dir_all(dir).map_err(|cause| StoreError::Io {
            op: "create directory",
            name: path.clone(),
            cause,
        })?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| StoreError::from_backend("open", &path, e))?;
        Ok(Store {
            inner: Arc::new(fs),
            prefix: String::new(),
            local_root: None,
            local_layout: true,
            url: format!("file://{path}"),
            fetched: Default::default(),
        })
    }

    pub fn memory() -> Store {
        Store {
            inner: Arc::new(object_store::memory::InMemory::new()),
            prefix: String::new(),
            local_root: None,
            local_layout: false,
            url: "memory://".to_string(),
            fetched: Default::default(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// This store, with `faults` injected into its requests (for tests: see
    /// `crate::faults`). Both share the objects; only requests made through the
    /// returned one meet the faults.
    pub fn with_faults(&self, faults: crate::faults::Faults) -> Store {
        Store {
            inner: Arc::new(crate::faults::Faulty::new(self.inner.clone(), &self.prefix, faults)),
            prefix: self.prefix.clone(),
            local_root: None,
            local_layout: self.local_layout,
            url: self.url.clone(),
            fetched: self.fetched.clone(),
        }
    }

    fn path(&self, name: &str) -> Path {
        let name = if self.local_layout { local_path(name) } else { name.into() };
        if self.prefix.is_empty() {
            Path::from(name.as_ref())
        } else {
            Path::from(format!("{}/{}", self.prefix, name))
        }
    }

    /// Where a `file://` store written before its layout holds `name`, when that is
    /// not `path(name)`.
    fn flat_path(&self, name: &str) -> Option<Path> {
        (self.local_layout && local_path(name) != name).then(|| Path::from(name))
    }

    fn name_of(&self, path: &Path) -> String {
        let s = path.as_ref();
        let s = if self.prefix.is_empty() {
            s
        } else {
            s.strip_prefix(&self.prefix).map(|r| r.trim_start_matches('/')).unwrap_or(s)
        };
        if self.local_layout {
            local_name(s).into_owned()
        } else {
            s.to_string()
        }
    }

    pub async fn get(&self, name: &str) -> Result<Bytes, StoreError> {
        let b = self.get_whole(name).await?;
        self.count(b.len());
        Ok(b)
    }

    /// Bytes read from the store so far by this store and its clones (whole objects
    /// and ranges; `pg serve` says how much of a base backup it fetched).
    pub fn fetched(&self) -> u64 {
        self.fetched.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count(&self, bytes: usize) {
        self.fetched.fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }

    async fn get_whole(&self, name: &str) -> Result<Bytes, StoreError> {
        if let Some(root) = &self.local_root {
            let (root, owned) = (root.clone(), name.to_string());
            return tokio::task::spawn_blocking(move || local::read_object(&root, &owned))
                .await
                .expect("read task panicked")
                .map_err(|cause| StoreError::from_io("get", name, cause));
        }
        let r = match self.inner.get(&self.path(name)).await {
            Err(object_store::Error::NotFound { .. }) if self.flat_path(name).is_some() => {
                self.inner.get(&Path::from(name)).await
            }
            r => r,
        };
        let r = r.map_err(|e| StoreError::from_backend("get", name, e))?;
        r.bytes().await.map_err(|e| StoreError::from_backend("get", name, e))
    }

    /// The bytes of each of `names`, in order, each as `get` gives it. On
    /// `file://` a few blocking tasks read them in turn (not a task each: handing
    /// a small read to another thread costs more than the read), elsewhere
    /// several requests are in flight.
    pub async fn get_many(&self, names: &[String]) -> Vec<Result<Bytes, StoreError>> {
        use futures::StreamExt;
        let Some(root) = &self.local_root else {
            return futures::stream::iter(names.iter().map(|n| self.get(n))).buffered(GETS_IN_FLIGHT).collect().await;
        };
        let chunk = names.len().div_ceil(LOCAL_READERS).max(1);
        let reads = names.chunks(chunk).map(|names| {
            let (root, names) = (root.clone(), names.to_vec());
            tokio::task::spawn_blocking(move || {
                names
                    .iter()
                    .map(|name| {
                        local::read_object(&root, name).map_err(|cause| StoreError::from_io("get", name, cause))
                    })
                    .collect::<Vec<_>>()
            })
        });
        let mut out = Vec::with_capacity(names.len());
        for read in futures::stream::iter(reads).buffered(LOCAL_READERS).collect::<Vec<_>>().await {
            out.extend(read.expect("read task panicked"));
        }
        self.count(out.iter().map(|r| r.as_ref().map_or(0, |b| b.len())).sum());
        out
    }

    /// The bytes of `range` of an object, exactly: an object that ends before the
    /// range does is `Short` (a truncated object is damage, never a shorter answer),
    /// on every backend. An empty range of an object that exists is empty.
    pub async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        if range.start >= range.end {
            let size = self.size(name).await?;
            return if range.start == range.end && range.start <= size {
                Ok(Bytes::new())
            } else {
                Err(StoreError::Short { name: name.to_string(), range, size })
            };
        }
        let want = range.end - range.start;
        let b = match &self.local_root {
            Some(root) => {
                let (path, flat, r) = (root.join(local_path(name).as_ref()), root.join(name), range.clone());
                tokio::task::spawn_blocking(move || match read_range_direct(&path, r.clone()) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && flat != path => read_range_direct(&flat, r),
                    read => read,
                })
                .await
                .expect("read task panicked")
                .map_err(|cause| StoreError::from_io("read range of", name, cause))?
            }
            None => match self.get_range_backend(name, range.clone()).await {
                Ok(b) => b,
                Err(e) => {
                    let e = StoreError::from_backend("read range of", name, e);
                    // A range that starts at or past the end is refused by the backend
                    // (HTTP 416): tell that apart from other failures.
                    return match self.size(name).await {
                        Ok(size) if size < range.end => Err(StoreError::Short { name: name.to_string(), range, size }),
                        _ => Err(e),
                    };
                }
            },
        };
        self.count(b.len());
        if b.len() as u64 != want {
            let size = self.size(name).await?;
            return Err(StoreError::Short { name: name.to_string(), range, size });
        }
        Ok(b)
    }

    async fn get_range_backend(&self, name: &str, range: Range<u64>) -> object_store::Result<Bytes> {
        match self.inner.get_range(&self.path(name), range.clone()).await {
            Err(object_store::Error::NotFound { .. }) if self.flat_path(name).is_some() => {
                self.inner.get_range(&Path::from(name), range).await
            }
            r => r,
        }
    }

    pub async fn size(&self, name: &str) -> Result<u64, StoreError> {
        if let Some(root) = &self.local_root {
            let (root, owned) = (root.clone(), name.to_string());
            return tokio::task::spawn_blocking(move || local::object_size(&root, &owned))
                .await
                .expect("stat task panicked")
                .map_err(|cause| StoreError::from_io("stat", name, cause));
        }
        let m = match self.inner.head(&self.path(name)).await {
            Err(object_store::Error::NotFound { .. }) if self.flat_path(name).is_some() => {
                self.inner.head(&Path::from(name)).await
            }
            r => r,
        };
        Ok(m.map_err(|e| StoreError::from_backend("stat", name, e))?.size)
    }

    /// The size of each of `names`, in order, each as `size` gives it: on `file://`
    /// one blocking task looks at them all, elsewhere several requests are in
    /// flight.
    pub async fn sizes(&self, names: &[String]) -> Vec<Result<u64, StoreError>> {
        use futures::StreamExt;
        let Some(root) = &self.local_root else {
            let looks: Vec<_> = names.iter().map(|n| self.size(n)).collect();
            return futures::stream::iter(looks).buffered(GETS_IN_FLIGHT).collect().await;
        };
        let (root, names) = (root.clone(), names.to_vec());
        tokio::task::spawn_blocking(move || {
            names
                .iter()
                .map(|name| local::object_size(&root, name).map_err(|cause| StoreError::from_io("stat", name, cause)))
                .collect()
        })
        .await
        .expect("stat task panicked")
    }

    /// Writes a new object; fails with `AlreadyExists` if the name is taken, so two
    /// writers can never overwrite each other. Returns once the object is durable.
    pub async fn put_new(&self, name: &str, data: Bytes) -> Result<(), StoreError> {
        // The name may be taken by a file a repository written before the layout holds flat.
        if let (Some(root), Some(_)) = (&self.local_root, self.flat_path(name)) {
            if std::fs::symlink_metadata(root.join(name)).is_ok_and(|m| m.is_file()) {
                return Err(StoreError::AlreadyExists { name: name.to_string() });
            }
        }
        let path = self.path(name);
        let put = || {
            let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
            self.inner.put_opts(&path, PutPayload::from(data.clone()), opts)
        };
        let r = match put().await {
            // A delete removed the shard directory it emptied just as this put made
            // it (`local::delete`): the second try makes it again.
            Err(e)
                if self.local_root.is_some()
                    && self.flat_path(name).is_some()
                    && !matches!(e, object_store::Error::AlreadyExists { .. }) =>
            {
                put().await
            }
            r => r,
        };
        r.map_err(|e| StoreError::from_backend("put", name, e))?;
        Ok(())
    }

    /// A new object to be written a piece at a time (`NewObject`), for objects too
    /// large to hold whole in memory: made visible by `NewObject::finish`, as
    /// `put_new` makes one (never over another of the same name). For packs: the
    /// directories of time-keyed names, which deletes remove when they empty them,
    /// are `put_new`'s (it makes one again if a delete took it meanwhile).
    pub async fn new_object(&self, name: &str) -> Result<NewObject, StoreError> {
        let Some(root) = self.local_root.clone() else {
            return Ok(NewObject { name: name.to_string(), len: 0, to: Sink::Gathered(self.clone(), Vec::new()) });
        };
        // The name may be taken by a file a repository written before the layout holds flat.
        if self.flat_path(name).is_some() && std::fs::symlink_metadata(root.join(name)).is_ok_and(|m| m.is_file()) {
            return Err(StoreError::AlreadyExists { name: name.to_string() });
        }
        let path = root.join(local_path(name).as_ref());
        let staged = tokio::task::spawn_blocking(move || local::Staged::create(&root, path))
            .await
            .expect("create task panicked")
            .map_err(|cause| StoreError::Io { op: "create", name: name.to_string(), cause })?;
        Ok(NewObject { name: name.to_string(), len: 0, to: Sink::Staged(staged) })
    }

    /// Replaces an object that only this writer owns (key slots being rewritten are
    /// never replaced; this is for local state kept in the store).
    pub async fn put_overwrite(&self, name: &str, data: Bytes) -> Result<(), StoreError> {
        self.inner
            .put(&self.path(name), PutPayload::from(data))
            .await
            .map_err(|e| StoreError::from_backend("put", name, e))?;
        // An older copy held flat is not left behind to be read as this object.
        if let Some(flat) = self.flat_path(name) {
            match self.inner.delete(&flat).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(StoreError::from_backend("delete", name, e)),
            }
        }
        Ok(())
    }

    /// Removes `names`, each as `delete` does; those not removed, with why. On
    /// `file://`, in batches of names that follow one another (those of one
    /// directory, when they are sorted), each directory a batch leaves fsynced
    /// once, a few batches at once.
    pub async fn delete_many(&self, names: &[&str]) -> Vec<(String, StoreError)> {
        use futures::StreamExt;
        let mut failed = Vec::new();
        if let Some(root) = &self.local_root {
            // By index: a closure taking a borrowed batch would make this future
            // not `Send`, which `stream --prune-every` needs.
            let mut batches = futures::stream::iter((0..names.len()).step_by(LOCAL_DELETE_BATCH).map(|start| {
                let end = names.len().min(start + LOCAL_DELETE_BATCH);
                let batch: Vec<String> = names[start..end].iter().map(|n| n.to_string()).collect();
                let root = root.clone();
                tokio::task::spawn_blocking(move || local::delete_batch(&root, &batch))
            }))
            .buffer_unordered(LOCAL_DELETE_BATCHES);
            while let Some(batch) = batches.next().await {
                failed.extend(batch.expect("delete task panicked"));
            }
            return failed;
        }
        // Owned, by index: a closure taking a borrowed name would make this future
        // not `Send`, which `stream --prune-every` needs.
        let mut results = futures::stream::iter(0..names.len())
            .map(|i| {
                let (store, name) = (self.clone(), names[i].to_string());
                async move {
                    let r = store.delete(&name).await;
                    (name, r)
                }
            })
            .buffer_unordered(DELETES_IN_FLIGHT);
        while let Some((name, r)) = results.next().await {
            if let Err(e) = r {
                failed.push((name, e));
            }
        }
        failed
    }

    /// Removes an object. Removing one that is not there succeeds, on every backend:
    /// S3 cannot tell the two apart, so no caller may rely on the difference.
    pub async fn delete(&self, name: &str) -> Result<(), StoreError> {
        if let Some(root) = &self.local_root {
            return local::delete(root.clone(), name).await;
        }
        for path in std::iter::once(self.path(name)).chain(self.flat_path(name)) {
            match self.inner.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(StoreError::from_backend("delete", name, e)),
            }
        }
        Ok(())
    }

    /// Every object whose name starts with `dir/`, in no particular order.
    pub async fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        if let Some(root) = &self.local_root {
            let found = local::list_local(root.clone(), dir).await?;
            return Ok(found.into_iter().map(|(name, size, modified)| ObjectInfo { name, size, modified }).collect());
        }
        let prefix = self.path(dir);
        let metas: Vec<_> =
            self.inner.list(Some(&prefix)).try_collect().await.map_err(|e| StoreError::from_backend("list", dir, e))?;
        let mut found: Vec<ObjectInfo> = metas
            .into_iter()
            .map(|m| ObjectInfo { name: self.name_of(&m.location), size: m.size, modified: modified(&m) })
            .collect();
        if self.local_layout {
            found.sort_unstable_by(|a, b| a.name.cmp(&b.name));
            found.dedup_by(|a, b| a.name == b.name);
        }
        Ok(found)
    }

    /// The names of every object under `dir/`, in no particular order: `list`
    /// without what a local listing would stat each file for.
    pub async fn list_names(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        match &self.local_root {
            Some(root) => local::list_local_names(root.clone(), dir).await,
            None => Ok(self.list(dir).await?.into_iter().map(|o| o.name).collect()),
        }
    }

    /// Removes what interrupted puts left on a file:// store under `dir/`: staged
    /// files (`<name>#<n>`) older than `min_age`. A writer still using one loses
    /// nothing: its put fails to publish it, and says so. Returns how many went.
    pub async fn sweep_staged(&self, dir: &str, min_age: std::time::Duration) -> Result<usize, StoreError> {
        let Some(root) = &self.local_root else { return Ok(0) };
        local::sweep_staged(root.clone(), dir, min_age).await
    }

    /// At most `limit` object names from anywhere in the repository: enough to tell
    /// an empty prefix from one that holds something.
    pub async fn sample(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        let prefix = (!self.prefix.is_empty()).then(|| Path::from(self.prefix.as_str()));
        let mut stream = self.inner.list(prefix.as_ref());
        let mut out = Vec::new();
        while out.len() < limit {
            match stream.try_next().await.map_err(|e| StoreError::from_backend("list", "", e))? {
                Some(m) => out.push(self.name_of(&m.location)),
                None => break,
            }
        }
        Ok(out)
    }

    /// The names `list_after` gives, one after the other to `visit` until it
    /// returns false or there are no more: listed a page at a time, the first of
    /// `first_page` names and each next one twice as large. A span of a few names
    /// costs one small listing (on `file://` a listing reads every shard directory
    /// it needs to fill its page), and a long one a few listings, not one per
    /// thousand names.
    pub async fn list_after_while(
        &self,
        dir: &str,
        after: &str,
        first_page: usize,
        mut visit: impl FnMut(&str) -> bool,
    ) -> Result<(), StoreError> {
        let mut after = after.to_string();
        let mut limit = first_page.max(1);
        loop {
            let page = self.list_after(dir, &after, limit).await?;
            let full = page.len() == limit;
            limit = limit.saturating_mul(2);
            for name in &page {
                if !visit(name) {
                    return Ok(());
                }
            }
            match page.last() {
                Some(last) if full => after = last.clone(),
                _ => return Ok(()),
            }
        }
    }

    /// The names of the objects directly under `dir/` that sort after `after` and
    /// not after `upto`, in name order. On `file://` each shard directory in that
    /// range is read once; elsewhere pages of `first_page` names, then twice as many
    /// each time, until one goes past `upto`.
    pub async fn list_between(
        &self,
        dir: &str,
        after: &str,
        upto: &str,
        first_page: usize,
    ) -> Result<Vec<String>, StoreError> {
        if let Some(root) = &self.local_root {
            return list_between_local(root.clone(), dir, after, upto).await;
        }
        let mut out = Vec::new();
        self.list_after_while(dir, after, first_page, |name| {
            let within = name <= upto;
            if within {
                out.push(name.to_string());
            }
            within
        })
        .await?;
        Ok(out)
    }

    /// The names of the objects directly under `dir/` (not in its subdirectories)
    /// that sort after `after`, in name order, at most `limit` of them: one narrow
    /// listing, not a scan of the repository.
    pub async fn list_after(&self, dir: &str, after: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        if let Some(root) = &self.local_root {
            return list_after_local(root.clone(), dir, after, limit).await;
        }
        if self.local_layout {
            // The local backend's listings are not in name order (only with faults
            // injected does a file:// store come here).
            let mut names: Vec<String> = self.list_names(dir).await?;
            names.retain(|n| {
                n.as_str() > after
                    && n.strip_prefix(dir).and_then(|r| r.strip_prefix('/')).is_some_and(|l| !l.contains('/'))
            });
            names.sort_unstable();
            names.dedup();
            names.truncate(limit);
            return Ok(names);
        }
        let prefix = self.path(dir);
        let offset = self.path(after);
        let mut stream = self.inner.list_with_offset(Some(&prefix), &offset);
        let mut out = Vec::new();
        // Object stores list in name order: the first `limit` are the ones wanted.
        while let Some(m) = stream.try_next().await.map_err(|e| StoreError::from_backend("list", dir, e))? {
            let name = self.name_of(&m.location);
            // Only what is directly under `dir/`, as on the local filesystem.
            if name.strip_prefix(dir).and_then(|r| r.strip_prefix('/')).is_none_or(|leaf| leaf.contains('/')) {
                continue;
            }
            out.push(name);
            if out.len() >= limit {
                break;
            }
        }
        out.sort();
        out.truncate(limit);
        Ok(out)
    }

    /// The names directly below `dir/` that are themselves directories.
    pub async fn list_dirs(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        let r = self
            .inner
            .list_with_delimiter(Some(&self.path(dir)))
            .await
            .map_err(|e| StoreError::from_backend("list", dir, e))?;
        let mut out: Vec<String> =
            r.common_prefixes.iter().filter_map(|p| p.filename().map(|s| s.to_string())).collect();
        out.sort();
        Ok(out)
    }
}
