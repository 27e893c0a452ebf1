//! What a repository holds, as writers and repairs need to know it: what each
//! index file says is in which pack, and, when asked for, every pack that exists
//! (one listing, with sizes). Deduplicating only against blobs that lie inside a
//! pack that exists stores a lost pack again rather than referencing it; packs
//! that no index file names (left by a writer that stopped before its index) can
//! be adopted.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use futures::stream::{StreamExt, TryStreamExt};

use crate::error::RepoError;
use crate::id::Id;
use crate::index::{open_index, IndexFile, INDEX_DIR};
use crate::index_cache::IndexCache;
use crate::pack::{parse_pack_name, BlobRef, PACKS_DIR};
use crate::repo::Repository;

/// Index files fetched at once.
const CONCURRENT_READS: usize = 16;

pub struct Inventory {
    /// Every pack, by id, with its size; empty unless the packs were listed.
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
        Inventory::load_cached(repo, None, true).await
    }

    /// `load`, taking the index files listed that `cache` holds from it (each still
    /// opened, so authenticated, as if fetched; one that does not open is fetched),
    /// and adding to it those fetched. Lists the packs only if `list_packs`: the
    /// listing grows with the history, the index files a prune merges do not.
    pub async fn load_cached(
        repo: &Repository,
        cache: Option<&IndexCache>,
        list_packs: bool,
    ) -> Result<Inventory, RepoError> {
        let store = repo.store();
        let names = store.list_names(INDEX_DIR).await?;
        let cached = cache.map(IndexCache::load).unwrap_or_default();
        let packs = async {
            if !list_packs {
                return Ok(HashMap::new());
            }
            let listed = store.list(PACKS_DIR).await?;
            Ok::<_, RepoError>(listed.iter().filter_map(|o| Some((parse_pack_name(&o.name)?, o.size))).collect())
        };
        let keys = repo.keys();
        let mut from_cache = Vec::new();
        let mut to_fetch = Vec::new();
        for name in &names {
            match cached.get(name).map(|b| open_index(keys, name, b)) {
                Some(Ok(file)) => from_cache.push((name.clone(), file)),
                _ => to_fetch.push(name.clone()),
            }
        }
        let (packs, fetched) = futures::future::try_join(packs, fetch_index_files(repo, to_fetch)).await?;
        let mut inventory = Inventory { packs, index_files: Vec::new(), unreadable: Vec::new() };
        let mut new = Vec::new();
        for (name, bytes) in fetched {
            match open_index(keys, &name, &bytes) {
                Ok(file) => {
                    inventory.index_files.push((name.clone(), file));
                    new.push((name, bytes));
                }
                Err(e) => inventory.unreadable.push((name, e.to_string())),
            }
        }
        if let Some(cache) = cache {
            // Files the listing no longer names outnumber the rest: start afresh.
            let used = from_cache.len();
            if cached.len() - used.min(cached.len()) > used.max(16) {
                let listed: std::collections::HashSet<&String> = names.iter().collect();
                let mut keep: Vec<(String, bytes::Bytes)> =
                    cached.into_iter().filter(|(n, _)| listed.contains(n)).collect();
                keep.extend(new);
                cache.rewrite(&keep);
            } else {
                cache.append(&new);
            }
        }
        inventory.index_files.extend(from_cache);
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

/// The sealed bytes of the index files `names`, fetched a few at once; those gone
/// since they were listed (merged by prune, replaced by `ebb repair index`) left out.
pub async fn fetch_index_files(repo: &Repository, names: Vec<String>) -> Result<Vec<(String, Bytes)>, RepoError> {
    let store = repo.store();
    let reads = names.into_iter().map(|name| async move {
        match store.get(&name).await {
            Ok(bytes) => Ok(Some((name, bytes))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(RepoError::from(e)),
        }
    });
    let fetched: Vec<_> = futures::stream::iter(reads).buffer_unordered(CONCURRENT_READS).try_collect().await?;
    Ok(fetched.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::keyslot::{Secret, DEFAULT_KDF};
    use crate::pack::BlobKind;
    use crate::store::Store;
    use crate::writer::Writer;

    /// A writer's blobs, each under an index file of its own.
    async fn indexed(repo: &Repository, n: u8) {
        for i in 0..n {
            let w = Writer::new(repo.clone()).await.unwrap();
            let w2 = w.clone();
            tokio::task::spawn_blocking(move || {
                let mut p = w2.packer();
                p.store(BlobKind::Data, &[i; 100]).unwrap();
                p.flush().unwrap();
            })
            .await
            .unwrap();
            w.checkpoint().await.unwrap().write_index(None).await.unwrap();
        }
    }

    /// The cache supplies the index files it holds (a changed object in the store is
    /// not fetched again: index files never change under a name), leaves out those
    /// the listing no longer names, and fetches again one whose cached bytes do not
    /// open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn index_files_come_from_the_cache_and_the_listing_decides() {
        let repo =
            Repository::init(Store::memory(), &Secret::KeyFile([4; 32]), DEFAULT_KDF, "t".into()).await.unwrap().0;
        indexed(&repo, 3).await;
        let dir = tempfile::tempdir().unwrap();
        let cache = IndexCache::at(&dir.path().join("index-x"));
        let first = Inventory::load_cached(&repo, Some(&cache), true).await.unwrap();
        assert_eq!((first.index_files.len(), first.unreadable.len()), (3, 0));
        assert_eq!(cache.load().len(), 3, "what was fetched is cached");

        // Damaged in the store: read from the cache, not fetched again.
        let names: Vec<String> = first.index_files.iter().map(|(n, _)| n.clone()).collect();
        repo.store().delete(&names[0]).await.unwrap();
        repo.store().put_new(&names[0], Bytes::from_static(b"damaged")).await.unwrap();
        let cached = Inventory::load_cached(&repo, Some(&cache), true).await.unwrap();
        assert_eq!((cached.index_files.len(), cached.unreadable.len()), (3, 0));
        let uncached = Inventory::load(&repo).await.unwrap();
        assert_eq!((uncached.index_files.len(), uncached.unreadable.len()), (2, 1), "the store's copy is damaged");

        // Gone from the store (a prune merged it): not taken from the cache.
        repo.store().delete(&names[1]).await.unwrap();
        let after = Inventory::load_cached(&repo, Some(&cache), true).await.unwrap();
        assert_eq!(after.index_files.iter().map(|(n, _)| n).collect::<Vec<_>>(), vec![&names[0], &names[2]]);

        // A cached copy that does not open is fetched again (here: damaged there too).
        cache.rewrite(&[(names[2].clone(), Bytes::from_static(b"not sealed"))]);
        let refetched = Inventory::load_cached(&repo, Some(&cache), true).await.unwrap();
        assert!(refetched.index_files.iter().any(|(n, _)| n == &names[2]), "fetched from the store");
        assert!(refetched.unreadable.iter().any(|(n, _)| n == &names[0]), "no longer cached, so fetched: damaged");
    }
}
