//! What a repository holds, as writers and repairs need to know it: every pack that
//! exists (one listing, with sizes) and what each index file says is in them. A
//! writer deduplicates only against blobs that lie inside a pack that exists, so a
//! lost pack is stored again rather than referenced; packs that no index file names
//! (left by a writer that stopped before its index) can be adopted.

use std::collections::{HashMap, HashSet};

use futures::stream::{StreamExt, TryStreamExt};

use crate::error::RepoError;
use crate::id::Id;
use crate::index::{open_index, IndexFile, INDEX_DIR};
use crate::pack::{parse_pack_name, BlobRef, PACKS_DIR};
use crate::repo::Repository;

/// Index files fetched at once.
const CONCURRENT_READS: usize = 16;

pub struct Inventory {
    /// Every pack, by id, with its size.
    pub packs: HashMap<Id, u64>,
    /// The index files that opened, by name.
    pub index_files: Vec<(String, IndexFile)>,
    /// The index files that could not be opened, and why.
    pub unreadable: Vec<(String, String)>,
}

impl Inventory {
    /// Lists the index files, then the packs while reading the index files. In that
    /// order: every index file is written after its packs were durable, so the packs
    /// of every index file listed are in the pack listing, unless they are lost.
    pub async fn load(repo: &Repository) -> Result<Inventory, RepoError> {
        let store = repo.store();
        let names = store.list(INDEX_DIR).await?;
        let packs = async {
            let listed = store.list(PACKS_DIR).await?;
            Ok::<_, RepoError>(listed.iter().filter_map(|o| Some((parse_pack_name(&o.name)?, o.size))).collect())
        };
        let index = async {
            let reads = names.into_iter().map(|o| async move {
                match store.get(&o.name).await {
                    Ok(bytes) => Ok(Some((o.name.clone(), open_index(repo.keys(), &o.name, &bytes)))),
                    // Replaced by `ebb repair index` since the listing.
                    Err(e) if e.is_not_found() => Ok(None),
                    Err(e) => Err(RepoError::from(e)),
                }
            });
            futures::stream::iter(reads).buffer_unordered(CONCURRENT_READS).try_collect::<Vec<_>>().await
        };
        let (packs, opened) = futures::future::try_join(packs, index).await?;
        let mut inventory = Inventory { packs, index_files: Vec::new(), unreadable: Vec::new() };
        for (name, r) in opened.into_iter().flatten() {
            match r {
                Ok(file) => inventory.index_files.push((name, file)),
                Err(e) => inventory.unreadable.push((name, e.to_string())),
            }
        }
        inventory.index_files.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(inventory)
    }

    /// Whether `blob` lies inside a pack that exists.
    pub fn holds(&self, blob: &BlobRef) -> bool {
        self.packs.get(&blob.pack).is_some_and(|&size| blob.range().end <= size)
    }

    /// Packs that no readable index file names, by name order.
    pub fn unindexed(&self) -> Vec<(Id, u64)> {
        let named: HashSet<Id> =
            self.index_files.iter().flat_map(|(_, f)| f.entries.iter().map(|e| e.blob.pack)).collect();
        let mut out: Vec<(Id, u64)> =
            self.packs.iter().filter(|(p, _)| !named.contains(p)).map(|(p, s)| (*p, *s)).collect();
        out.sort();
        out
    }

    /// Index entries whose blob is not where they say, and the packs they name.
    #[cfg(test)]
    pub fn missing(&self) -> (usize, HashSet<Id>) {
        self.missing_except(|_| false)
    }

    /// `missing`, leaving out the packs `expected` says may be gone.
    pub fn missing_except(&self, expected: impl Fn(&Id) -> bool) -> (usize, HashSet<Id>) {
        let mut blobs = 0;
        let mut packs = HashSet::new();
        for e in self.index_files.iter().flat_map(|(_, f)| &f.entries) {
            if !self.holds(&e.blob) && !expected(&e.blob.pack) {
                blobs += 1;
                packs.insert(e.blob.pack);
            }
        }
        (blobs, packs)
    }
}
