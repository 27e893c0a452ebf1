//! Generations of the index: `ebb prune` and `ebb repair index` write a marker,
//! `generations/<K>-<R>` (`<K>` the inverted time, as for points), before they
//! delete packs or index files and again once they are done. A host's merged copy
//! of the index (`host_index`) records the markers there were when it was built
//! (a digest of their names): other markers mean entries may name packs or index
//! files deleted since, and the copy is built again from the index files listed.
//! The set, not the newest by time, so that clocks that disagree change nothing.

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::condemned::object_name;
use crate::object::seal_object;
use crate::repo::Repository;
use crate::store::{Store, StoreError};

pub const GENERATIONS_DIR: &str = "generations";
/// The payload: a version byte. Only the name is read.
const VERSION: u8 = 1;
/// Markers a run leaves: older ones are deleted.
const KEPT: usize = 2;

/// The markers there are, as a digest of their names (empty for none): one
/// listing of a few names (each run leaves two).
pub async fn current(store: &Store) -> Result<String, StoreError> {
    let mut names = store.list_names(GENERATIONS_DIR).await?;
    if names.is_empty() {
        return Ok(String::new());
    }
    names.sort_unstable();
    let mut digest = Sha256::new();
    for n in &names {
        digest.update(n.as_bytes());
        digest.update(b"\n");
    }
    Ok(hex::encode(digest.finalize()))
}

/// Writes a new marker.
pub async fn bump(repo: &Repository) -> Result<(), StoreError> {
    let name = object_name(GENERATIONS_DIR, jiff::Timestamp::now()).expect("now is a time a name can carry");
    let sealed = seal_object(repo.keys(), &name, &[VERSION]);
    repo.store().put_new(&name, Bytes::from(sealed)).await
}

/// The markers but the newest few: what a run deletes.
pub async fn superseded(store: &Store) -> Result<Vec<String>, StoreError> {
    let mut names = store.list_names(GENERATIONS_DIR).await?;
    names.sort_unstable();
    Ok(names.into_iter().skip(KEPT).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyslot::{Secret, DEFAULT_KDF};

    /// Every marker written changes the generation, and so does every one deleted;
    /// a run keeps the newest two.
    #[tokio::test]
    async fn every_marker_written_or_deleted_changes_the_generation() {
        let repo =
            Repository::init(Store::memory(), &Secret::KeyFile([4; 32]), DEFAULT_KDF, "t".into()).await.unwrap().0;
        let mut seen = vec![current(repo.store()).await.unwrap()];
        assert_eq!(seen[0], "");
        for _ in 0..4 {
            bump(&repo).await.unwrap();
            seen.push(current(repo.store()).await.unwrap());
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let gone = superseded(repo.store()).await.unwrap();
        assert_eq!(gone.len(), 2);
        let mut names = repo.store().list_names(GENERATIONS_DIR).await.unwrap();
        names.sort();
        assert_eq!(&names[2..], &gone[..], "the oldest two go");
        repo.store().delete(&gone[0]).await.unwrap();
        seen.push(current(repo.store()).await.unwrap());
        let mut distinct = seen.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), seen.len(), "{seen:?}");
    }
}
