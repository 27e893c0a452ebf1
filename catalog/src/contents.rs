//! What a prefix holds when it has no `config`: nothing, an interrupted init's key
//! slots, or a repository's data whose header was lost. `init` decides with it, and
//! opening a repository says with it why it cannot.

use crate::config::CONFIG_NAME;
use crate::error::RepoError;
use crate::keyslot::KEYS_DIR;
use crate::store::Store;

/// Objects sampled to tell what a prefix without `config` holds.
const SAMPLE: usize = 100;

/// What a prefix holds besides `config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contents {
    Empty,
    /// Key slots and nothing else: an init that did not finish.
    KeysOnly,
    /// Data: the top-level names found (`packs`, `points`, ...).
    Data(Vec<String>),
}

/// What the prefix holds, from a listing of a few names.
pub async fn contents(store: &Store) -> Result<Contents, RepoError> {
    let names = store.sample(SAMPLE).await?;
    let mut tops: Vec<String> = names
        .iter()
        .filter(|n| n.as_str() != CONFIG_NAME)
        .map(|n| n.split('/').next().unwrap_or_default().to_string())
        .collect();
    tops.sort();
    tops.dedup();
    Ok(match tops.as_slice() {
        [] => Contents::Empty,
        [k] if k == KEYS_DIR => Contents::KeysOnly,
        _ => Contents::Data(tops.into_iter().filter(|t| t != KEYS_DIR).collect()),
    })
}

/// Why a prefix without `config` cannot be opened, for the user.
pub async fn missing_config(store: &Store) -> RepoError {
    let url = store.url().to_string();
    match contents(store).await {
        Ok(Contents::Empty) => RepoError::NoRepository { url },
        Ok(Contents::KeysOnly) => RepoError::InterruptedInit { url },
        Ok(Contents::Data(holds)) => RepoError::ConfigMissing { url, holds: holds.join(", ") },
        Err(e) => e,
    }
}
