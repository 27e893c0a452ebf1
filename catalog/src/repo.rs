//! The repository handle: opening and unlocking, key slots, and reading points,
//! trees and blobs.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use jiff::Timestamp;

use crate::config::{Config, CONFIG_NAME};
use crate::crypto::{decode_payload, open_in_place, Keys, MasterKey, PayloadError};
use crate::error::{BlobError, RepoError};
use crate::id::Id;
use crate::index::index_name;
use crate::keyslot::{slot_name, KdfParams, KeySlot, Secret, KEYS_DIR};
use crate::pack::{blob_aad, pack_name, BlobKind, BlobRef};
use crate::point::{offset_for, source_dir, Manifest, PointRef, POINTS_DIR};
use crate::store::{Store, StoreError};
use crate::time::TimeSpec;
use crate::tree::Tree;

/// A point whose manifest opened (`Repository::readable_point_at`).
#[derive(Debug, Clone)]
pub struct Readable {
    pub point: PointRef,
    pub manifest: Manifest,
    /// Newer points that could not be read, and why, newest first.
    pub damaged: Vec<(PointRef, String)>,
}

/// An unlocked repository. Cheap to clone.
#[derive(Clone)]
pub struct Repository {
    store: Store,
    config: Arc<Config>,
    keys: Arc<Keys>,
    /// Kept to wrap it in new key slots.
    master: Arc<MasterKey>,
    slot: String,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository").field("url", &self.store.url()).field("slot", &self.slot).finish()
    }
}

impl Repository {
    pub async fn read_config(store: &Store) -> Result<Config, RepoError> {
        match store.get(CONFIG_NAME).await {
            Ok(b) => Ok(Config::decode(&b)?),
            Err(e) if e.is_not_found() => Err(crate::contents::missing_config(store).await),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the repository's header: it is there and sound. Nothing needs a key yet,
    /// so a password is asked for only after this.
    pub async fn find(store: Store) -> Result<Found, RepoError> {
        let config = Self::read_config(&store).await?;
        Ok(Found { store, config })
    }

    /// Opens the repository with the first key slot the secret unlocks.
    pub async fn open(store: Store, secret: &Secret) -> Result<Repository, RepoError> {
        Self::find(store).await?.unlock(secret).await
    }

    /// The unlocked key, to hand to a process of ebb's own over a pipe (the mount
    /// daemon) so that it need not derive it again: the master key, then the id of
    /// the slot that unlocked it. Never to be stored or shown.
    pub fn handoff(&self) -> Vec<u8> {
        let mut out = self.master.0.to_vec();
        out.extend_from_slice(self.slot.as_bytes());
        out
    }

    /// Every key slot that parses, and a message for each that does not.
    async fn load_slots(store: &Store, repo_id: &Id) -> Result<(Vec<KeySlot>, Vec<String>), RepoError> {
        let mut names: Vec<_> = store.list(KEYS_DIR).await?.into_iter().map(|o| o.name).collect();
        names.sort();
        let mut slots = Vec::new();
        let mut problems = Vec::new();
        for name in names {
            let bytes = match store.get(&name).await {
                Ok(b) => b,
                // Removed since the listing (`ebb key remove` elsewhere): no slot.
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e.into()),
            };
            match KeySlot::decode(&name, repo_id, &bytes) {
                Ok(s) => slots.push(s),
                Err(e) => problems.push(e.to_string()),
            }
        }
        Ok((slots, problems))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
    pub fn keys(&self) -> &Keys {
        &self.keys
    }
    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn id(&self) -> Id {
        self.config.repo_id()
    }
    /// The key slot this handle was opened with.
    pub fn slot(&self) -> &str {
        &self.slot
    }

    pub async fn key_slots(&self) -> Result<(Vec<KeySlot>, Vec<String>), RepoError> {
        Self::load_slots(&self.store, &self.id()).await
    }

    /// Adds a key slot for `secret`; the master key, and so all data, stay as they are.
    pub async fn add_slot(&self, secret: Secret, kdf: KdfParams, host: String) -> Result<KeySlot, RepoError> {
        let master = (*self.master).clone();
        let id = self.id();
        let slot = tokio::task::spawn_blocking(move || {
            KeySlot::create(&master, &id, &secret, kdf, Timestamp::now().to_string(), host)
        })
        .await
        .expect("key derivation panicked")?;
        self.store.put_new(&slot.name(), Bytes::from(slot.encode())).await?;
        Ok(slot)
    }

    /// Removes a key slot, never the last one that works. Removals may run at once
    /// (on several hosts): each looks again after its delete, and one that finds no
    /// slot left puts its own back. Of the removals whose second look comes last,
    /// the last either sees a slot or puts one back, so some slot always remains.
    pub async fn remove_slot(&self, slot: &str) -> Result<(), RepoError> {
        let (slots, _) = self.key_slots().await?;
        if !slots.iter().any(|s| s.slot == slot) {
            return Err(RepoError::NoSuchSlot { slot: slot.to_string() });
        }
        if slots.len() == 1 {
            return Err(RepoError::LastSlot { slot: slot.to_string() });
        }
        let name = slot_name(slot);
        let bytes = self.store.get(&name).await?;
        self.store.delete(&name).await?;
        let (left, _) = self.key_slots().await?;
        if left.is_empty() {
            match self.store.put_new(&name, bytes).await {
                Ok(()) | Err(StoreError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            return Err(RepoError::RemovalRace { slot: slot.to_string() });
        }
        Ok(())
    }

    /// Fetches one blob with one ranged GET, authenticates it, checks its content id,
    /// and returns its plaintext. Never returns bytes that fail any of these checks.
    /// Like `read_blob`, with `open_blob_authenticated`.
    pub async fn read_blob_authenticated(&self, kind: BlobKind, blob: &BlobRef) -> Result<Bytes, RepoError> {
        let sealed = self.store.get_range(&pack_name(&blob.pack), blob.range()).await?;
        let sealed = sealed.try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..]));
        Ok(self.open_blob_in_place(kind, blob, sealed)?)
    }

    pub async fn read_blob(&self, kind: BlobKind, blob: &BlobRef) -> Result<Bytes, RepoError> {
        let name = pack_name(&blob.pack);
        let sealed = self.store.get_range(&name, blob.range()).await?;
        Ok(self.open_blob(kind, blob, &sealed)?)
    }

    /// Opens a blob's sealed bytes already fetched (e.g. from a whole pack), and
    /// checks its content id too.
    pub fn open_blob(&self, kind: BlobKind, blob: &BlobRef, sealed: &[u8]) -> Result<Bytes, BlobError> {
        let plain = self.open_blob_authenticated(kind, blob, sealed)?;
        if self.keys.content_id(&plain) != blob.id {
            return Err(BlobError::new(kind, blob, "content does not match its id"));
        }
        Ok(plain)
    }

    /// Opens a blob relying on AES-GCM alone: the tag authenticates the bytes and the
    /// AAD binds them to this kind and content id, so nothing altered, swapped or
    /// foreign gets through. It skips recomputing the content id (a check against a
    /// writer's own mistakes, which `open_blob`, restore and `ebb verify` make), for
    /// the mount's read path, where that hash is a sixth of the work.
    pub fn open_blob_authenticated(&self, kind: BlobKind, blob: &BlobRef, sealed: &[u8]) -> Result<Bytes, BlobError> {
        self.open_blob_in_place(kind, blob, BytesMut::from(sealed))
    }

    /// `open_blob_authenticated` on bytes the caller gives up: decrypted in place.
    pub fn open_blob_in_place(&self, kind: BlobKind, blob: &BlobRef, sealed: BytesMut) -> Result<Bytes, BlobError> {
        let payload = open_in_place(&self.keys.pack_cipher(&blob.pack), &blob_aad(kind, &blob.id), sealed)
            .map_err(|e| BlobError::new(kind, blob, e.to_string()))?;
        let plain = decode_payload(payload.freeze(), blob.raw_len as usize)
            .map_err(|e: PayloadError| BlobError::new(kind, blob, e.to_string()))?;
        if plain.len() != blob.raw_len as usize {
            return Err(BlobError::new(kind, blob, "content has the wrong length"));
        }
        Ok(plain)
    }

    pub async fn read_tree(&self, blob: &BlobRef) -> Result<Tree, RepoError> {
        let plain = self.read_blob(BlobKind::Tree, blob).await?;
        Tree::decode(&plain).map_err(|e| BlobError::new(BlobKind::Tree, blob, e.to_string()).into())
    }

    /// The points, known from their names: no key needed.
    pub fn point_names(&self) -> PointNames<'_> {
        PointNames { store: &self.store }
    }

    pub async fn sources(&self) -> Result<Vec<String>, RepoError> {
        self.point_names().sources().await
    }

    pub async fn points(&self, source: &str) -> Result<Vec<PointRef>, RepoError> {
        self.point_names().points(source).await
    }

    pub async fn point_at(&self, source: &str, t: Timestamp) -> Result<Option<PointRef>, RepoError> {
        self.point_names().point_at(source, t).await
    }

    pub async fn resolve(&self, source: &str, spec: TimeSpec, now: Timestamp) -> Result<PointRef, RepoError> {
        self.point_names().resolve(source, spec, now).await
    }

    pub async fn manifest(&self, point: &PointRef) -> Result<Manifest, RepoError> {
        let bytes = self.store.get(&point.name).await?;
        Ok(Manifest::open(&self.keys, &point.name, &bytes)?)
    }

    /// The newest point of `source` at or before `t` whose manifest can be read,
    /// and the newer ones at or before `t` that cannot (damaged, foreign or gone),
    /// so that one bad object does not hide the whole history. `None` if no point
    /// at or before `t` can be read.
    pub async fn readable_point_at(&self, source: &str, t: Timestamp) -> Result<Option<Readable>, RepoError> {
        let mut at = t;
        let mut damaged = Vec::new();
        while let Some(point) = self.point_at(source, at).await? {
            match self.manifest(&point).await {
                Ok(manifest) => return Ok(Some(Readable { point, manifest, damaged })),
                Err(e) if e.is_damage() => {
                    tracing::warn!("point {} cannot be read, so the one before it is used: {e}", point.name);
                    at = point
                        .time
                        .checked_sub(jiff::SignedDuration::from_nanos(1))
                        .map_err(|_| RepoError::BadTime { time: point.time.to_string() })?;
                    damaged.push((point, e.to_string()));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Writes a point's manifest, which makes the point visible. Everything it
    /// references must already be durable (see `Writer::finish`).
    pub async fn commit_point(&self, manifest: &Manifest, time: Timestamp) -> Result<PointRef, RepoError> {
        crate::point::validate_source(&manifest.source).map_err(|problem| RepoError::InvalidSource { problem })?;
        let name = crate::point::point_name(&manifest.source, time)
            .ok_or_else(|| RepoError::BadTime { time: time.to_string() })?;
        self.store.put_new(&name, Bytes::from(manifest.seal(&self.keys, &name))).await?;
        Ok(PointRef::parse(&name).expect("a name we just built parses"))
    }

    pub fn new_index_name() -> String {
        index_name(jiff::Timestamp::now())
    }
}

/// A repository whose header has been read, still locked: what `ebb mount` holds
/// while the key is derived (or, in its daemon, handed over).
pub struct Found {
    store: Store,
    config: Config,
}

impl Found {
    pub(crate) fn new(store: Store, config: Config) -> Found {
        Found { store, config }
    }

    /// The points, known from their names: no key needed.
    pub fn point_names(&self) -> PointNames<'_> {
        PointNames { store: &self.store }
    }

    /// Unlocks with the first key slot the secret opens.
    pub async fn unlock(self, secret: &Secret) -> Result<Repository, RepoError> {
        let repo_id = self.config.repo_id();
        let (slots, problems) = Repository::load_slots(&self.store, &repo_id).await?;
        if slots.is_empty() {
            let problems = if problems.is_empty() { "no objects under keys/".to_string() } else { problems.join("; ") };
            return Err(RepoError::NoSlots { url: self.store.url().to_string(), problems });
        }
        let mut problems = problems;
        for slot in &slots {
            let s = slot.clone();
            let secret = clone_secret(secret);
            let unwrapped = tokio::task::spawn_blocking(move || s.unwrap_key(&repo_id, &secret))
                .await
                .expect("key derivation panicked");
            let unwrapped = match unwrapped {
                Ok(u) => u,
                Err(e) => {
                    problems.push(e.to_string());
                    continue;
                }
            };
            if let Some(master) = unwrapped {
                return Ok(self.with_key(master, slot.slot.clone()));
            }
        }
        if let Some(p) = problems.first() {
            // A damaged slot could be the one this secret was meant for: say so.
            tracing::warn!("{p}");
        }
        Err(RepoError::WrongSecret { url: self.store.url().to_string(), slots: slots.len() + problems.len() })
    }

    /// Unlocks with the key another ebb process unlocked (`Repository::handoff`).
    pub fn unlock_handed(self, handoff: &[u8]) -> Result<Repository, RepoError> {
        let bad = || RepoError::Handoff;
        let (key, slot) = handoff.split_first_chunk::<32>().ok_or_else(bad)?;
        let slot = std::str::from_utf8(slot).map_err(|_| bad())?.to_string();
        Ok(self.with_key(MasterKey(*key), slot))
    }

    /// The repository, unlocked with `master` from key slot `slot`.
    pub(crate) fn with_key(self, master: MasterKey, slot: String) -> Repository {
        Repository {
            keys: Arc::new(Keys::derive(&master, &self.config.repo_id())),
            master: Arc::new(master),
            config: Arc::new(self.config),
            store: self.store,
            slot,
        }
    }
}

/// The sources and points of a repository, from object names alone: what a locked
/// repository can already answer.
#[derive(Clone, Copy)]
pub struct PointNames<'a> {
    pub(crate) store: &'a Store,
}

impl PointNames<'_> {
    /// Source names, from one delimited listing of `points/`.
    pub async fn sources(&self) -> Result<Vec<String>, RepoError> {
        Ok(self.store.list_dirs(POINTS_DIR).await?)
    }

    /// Every point of a source, oldest first, known from names alone.
    pub async fn points(&self, source: &str) -> Result<Vec<PointRef>, RepoError> {
        let mut out: Vec<PointRef> =
            self.store.list(&source_dir(source)).await?.iter().filter_map(|o| PointRef::parse(&o.name)).collect();
        out.sort_by(|a, b| a.time.cmp(&b.time).then_with(|| a.name.cmp(&b.name)));
        Ok(out)
    }

    /// The newest point of `source` at or before `t`: one narrow listing.
    pub async fn point_at(&self, source: &str, t: Timestamp) -> Result<Option<PointRef>, RepoError> {
        let Some(offset) = offset_for(source, t) else { return Ok(None) };
        // A few names, in case a stray object sorts first.
        let found = self.store.list_after(&source_dir(source), &offset, 16).await?;
        Ok(found.iter().find_map(|o| PointRef::parse(o)))
    }

    /// "The state at T": the newest point of `source` at or before `spec`.
    pub async fn resolve(&self, source: &str, spec: TimeSpec, now: Timestamp) -> Result<PointRef, RepoError> {
        let at = spec.instant(now);
        if at > now {
            return Err(RepoError::Future { at, now });
        }
        if let Some(p) = self.point_at(source, at).await? {
            return Ok(p);
        }
        // Nothing at or before T: name the earliest point, or say there is none.
        match self.points(source).await?.first() {
            Some(first) => Err(RepoError::BeforeFirst { name: source.to_string(), at, earliest: first.time }),
            None => {
                let sources = self.sources().await?;
                let listed = sources.iter().any(|s| s == source);
                let known = if sources.is_empty() { "none yet".to_string() } else { sources.join(", ") };
                if listed {
                    Err(RepoError::NoPoints { name: source.to_string(), known })
                } else {
                    Err(RepoError::UnknownSource { name: source.to_string(), known })
                }
            }
        }
    }
}

pub(crate) fn clone_secret(s: &Secret) -> Secret {
    match s {
        Secret::Password(p) => Secret::Password(p.clone()),
        Secret::KeyFile(k) => Secret::KeyFile(*k),
    }
}
