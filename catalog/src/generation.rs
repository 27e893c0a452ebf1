//! Generations of the index: `ebb prune` and `ebb repair index` write a marker,
//! `generations/<K>-<R>` (`<K>` the inverted time, as for points, so the newest
//! sorts first), before they delete packs or index files and again once they are
//! done. A host's merged copy of the index (`host_index`) records the newest marker
//! it was built under: a different one means entries may name packs or index files
//! deleted since, and the copy is built again from the index files listed.

use bytes::Bytes;

use crate::condemned::object_name;
use crate::object::seal_object;
use crate::repo::Repository;
use crate::store::{Store, StoreError};

pub const GENERATIONS_DIR: &str = "generations";
/// The payload: a version byte. Only the name is read.
const VERSION: u8 = 1;
/// Markers a run leaves: older ones are deleted.
const KEPT: usize = 2;

/// The newest marker, if any: one narrow listing.
pub async fn newest(store: &Store) -> Result<Option<String>, StoreError> {
    Ok(store.list_after(GENERATIONS_DIR, "", 1).await?.into_iter().next())
}

/// Writes a new marker.
pub async fn bump(repo: &Repository) -> Result<(), StoreError> {
    let Some(name) = object_name(GENERATIONS_DIR, jiff::Timestamp::now()) else { return Ok(()) };
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

    /// The newest marker is the one a listing gives first, and a run keeps the
    /// newest two.
    #[tokio::test]
    async fn the_newest_marker_lists_first() {
        let repo =
            Repository::init(Store::memory(), &Secret::KeyFile([4; 32]), DEFAULT_KDF, "t".into()).await.unwrap().0;
        assert_eq!(newest(repo.store()).await.unwrap(), None);
        let mut written = Vec::new();
        for _ in 0..4 {
            bump(&repo).await.unwrap();
            written.push(newest(repo.store()).await.unwrap().unwrap());
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let mut distinct = written.clone();
        distinct.dedup();
        assert_eq!(distinct.len(), 4, "each marker is newer than the one before");
        let gone = superseded(repo.store()).await.unwrap();
        assert_eq!(gone, vec![written[1].clone(), written[0].clone()]);
    }
}
