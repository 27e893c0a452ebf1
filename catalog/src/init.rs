//! Creating a repository, and getting its header back. `ebb init` writes the first
//! key slot, then `config`: the repository exists once `config` does, and an init
//! interrupted between the two leaves only a key slot, which the next `ebb init`
//! with the same secret finishes. A prefix that holds data is never initialised
//! again: a repository that lost its `config` gets it back from its key slots
//! (`ebb repair config`), since each slot names the repository id and the secret
//! that opens one proves it.

use bytes::Bytes;
use jiff::Timestamp;

use crate::config::{Config, CONFIG_NAME};
use crate::contents::{contents, Contents};
use crate::crypto::MasterKey;
use crate::error::RepoError;
use crate::id::Id;
use crate::keyslot::{KdfParams, KeySlot, Secret, KEYS_DIR};
use crate::repo::{clone_secret, Found, Repository};
use crate::store::{Store, StoreError};

/// What `init` will do at a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitPlan {
    /// Nothing is there.
    Fresh,
    /// A `config` with no key slot and no data: made again from scratch.
    StartOver,
    /// Key slots only: an interrupted init, finished with the slot the secret opens.
    Finish,
}

/// What `init` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    New,
    /// An init interrupted after its key slot was finished with that slot.
    Finished,
}

impl Repository {
    /// Creates a repository at an empty prefix, or finishes an init that was
    /// interrupted there (with the secret it was begun with). Refuses a prefix that
    /// holds a repository or any data.
    pub async fn init(
        store: Store,
        secret: &Secret,
        kdf: KdfParams,
        host: String,
    ) -> Result<(Repository, Created), RepoError> {
        let url = store.url().to_string();
        match Self::init_plan(&store).await? {
            InitPlan::Fresh => {}
            InitPlan::StartOver => match store.delete(CONFIG_NAME).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            },
            InitPlan::Finish => {
                return match recover(&store, secret).await? {
                    Some(repo) => Ok((repo, Created::Finished)),
                    None => Err(RepoError::InterruptedInitOtherSecret { url }),
                }
            }
        }

        let id = Id::random();
        let now = Timestamp::now().to_string();
        let master = MasterKey::generate();
        let slot = {
            let (master, secret, now) = (master.clone(), clone_secret(secret), now.clone());
            tokio::task::spawn_blocking(move || KeySlot::create(&master, &id, &secret, kdf, now, host))
                .await
                .expect("key derivation panicked")?
        };
        // The slot first: until `config` exists there is no repository, and a slot
        // without `config` is an init to finish, never a repository no key opens.
        store.put_new(&slot.name(), Bytes::from(slot.encode())).await?;
        let config = Config::new(id, now);
        match store.put_new(CONFIG_NAME, Bytes::from(config.encode())).await {
            Ok(()) => {}
            Err(StoreError::AlreadyExists { .. }) => {
                // Another init wrote `config` first: with this slot's repository id if
                // it finished this init (it found the slot and the same secret), and
                // then this repository stands; else its own, without this slot.
                if Repository::read_config(&store).await?.repo_id() == id {
                    return Ok((with_key(store, config, master, slot.slot), Created::New));
                }
                let _ = store.delete(&slot.name()).await;
                return Err(RepoError::AlreadyExists { url });
            }
            Err(e) => return Err(e.into()),
        }
        Ok((with_key(store, config, master, slot.slot), Created::New))
    }

    /// What `init` would do at `store`, or why it refuses: asked before a password
    /// is, so that a refusal needs none.
    pub async fn init_plan(store: &Store) -> Result<InitPlan, RepoError> {
        let url = store.url().to_string();
        let has_config = match store.get(CONFIG_NAME).await {
            Ok(_) => true,
            Err(e) if e.is_not_found() => false,
            Err(e) => return Err(e.into()),
        };
        match (has_config, contents(store).await?) {
            // A `config` with nothing else: what an init of an earlier version left when
            // interrupted before its key slot. No key wraps its master key: start over.
            (true, Contents::Empty) => Ok(InitPlan::StartOver),
            (true, _) => Err(RepoError::AlreadyExists { url }),
            (false, Contents::Empty) => Ok(InitPlan::Fresh),
            (false, Contents::KeysOnly) => Ok(InitPlan::Finish),
            (false, Contents::Data(holds)) => Err(RepoError::ConfigMissing { url, holds: holds.join(", ") }),
        }
    }

    /// Writes `config` again for a repository that lost it, from the key slot that
    /// `secret` opens (`ebb repair config`).
    pub async fn repair_config(store: Store, secret: &Secret) -> Result<Repository, RepoError> {
        let url = store.url().to_string();
        match store.get(CONFIG_NAME).await {
            Ok(_) => return Err(RepoError::ConfigPresent { url }),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        recover(&store, secret).await?.ok_or(RepoError::WrongSecretForSlots { url })
    }
}

/// Writes `config` for the repository of the key slot that `secret` opens; `None`
/// if it opens none. The slots say the repository's id, and unwrapping proves it:
/// a slot's wrapping is bound to that id.
async fn recover(store: &Store, secret: &Secret) -> Result<Option<Repository>, RepoError> {
    let mut names: Vec<String> = store.list(KEYS_DIR).await?.into_iter().map(|o| o.name).collect();
    names.sort();
    for name in names {
        let bytes = match store.get(&name).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        let Some(id) = KeySlot::claimed_repo(&bytes) else { continue };
        let Ok(slot) = KeySlot::decode(&name, &id, &bytes) else { continue };
        let (s, secret) = (slot.clone(), clone_secret(secret));
        let opened =
            tokio::task::spawn_blocking(move || s.unwrap_key(&id, &secret)).await.expect("key derivation panicked");
        let Ok(Some(master)) = opened else { continue };
        let config = Config::new(id, slot.created.clone());
        match store.put_new(CONFIG_NAME, Bytes::from(config.encode())).await {
            Ok(()) => {}
            // Written meanwhile, by the same recovery run elsewhere: it must be ours.
            Err(StoreError::AlreadyExists { .. }) => {
                let other = Repository::read_config(store).await?;
                if other.repo_id() != id {
                    return Err(RepoError::AlreadyExists { url: store.url().to_string() });
                }
            }
            Err(e) => return Err(e.into()),
        }
        return Ok(Some(with_key(store.clone(), config, master, slot.slot)));
    }
    Ok(None)
}

fn with_key(store: Store, config: Config, master: MasterKey, slot: String) -> Repository {
    Found::new(store, config).with_key(master, slot)
}
