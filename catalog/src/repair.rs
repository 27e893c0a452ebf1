//! `ebb repair index`: makes the index files say what the packs hold. Index files are
//! derived data (every pack carries its own sealed header), so they can always be
//! rebuilt: entries that name a missing or cut-short pack are dropped, so that new
//! backups store that content again instead of referencing it; packs that no index
//! file names are indexed from their headers. Nothing a point references is touched.

use std::collections::HashSet;

use bytes::Bytes;
use futures::stream::{StreamExt, TryStreamExt};

use crate::error::RepoError;
use crate::id::Id;
use crate::index::{seal_for_points, seal_index};
use crate::inventory::Inventory;
use crate::pack::{fetch_header, pack_name, PackEntry};
use crate::repo::Repository;

/// Pack headers read at once.
const CONCURRENT_READS: usize = 8;
/// Entries per index file written for packs that had none.
const ENTRIES_PER_FILE: usize = 100_000;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IndexRepair {
    /// Index files that were right, and kept.
    pub kept: usize,
    /// Index files replaced by one without their missing entries.
    pub rewritten: usize,
    /// Index files removed: unreadable, or naming only missing packs.
    pub removed: usize,
    /// Entries dropped because their pack is missing or too short.
    pub dropped_entries: usize,
    /// Packs that no index file named, now indexed.
    pub indexed_packs: usize,
    /// Packs whose header could not be read: still unindexed, with why.
    pub unreadable_packs: Vec<String>,
}

/// Rebuilds what is wrong in the index (see the module doc). New index files are
/// durable before any old one is deleted, so an interruption leaves at worst
/// both, which is still correct.
pub async fn repair_index(repo: &Repository) -> Result<IndexRepair, RepoError> {
    let inventory = Inventory::load(repo).await?;
    let store = repo.store();
    let mut report = IndexRepair::default();
    let mut obsolete: Vec<String> = inventory.unreadable.iter().map(|(name, _)| name.clone()).collect();
    let mut indexed: HashSet<Id> = HashSet::new();
    for (name, file) in &inventory.index_files {
        let kept: Vec<PackEntry> = file.entries.iter().copied().filter(|e| inventory.holds(&e.blob)).collect();
        indexed.extend(kept.iter().map(|e| e.blob.pack));
        if kept.len() == file.entries.len() {
            report.kept += 1;
            continue;
        }
        report.dropped_entries += file.entries.len() - kept.len();
        obsolete.push(name.clone());
        if kept.is_empty() {
            report.removed += 1;
            continue;
        }
        let new = Repository::new_index_name();
        store.put_new(&new, Bytes::from(seal_for_points(repo.keys(), &new, &file.points, &kept))).await?;
        report.rewritten += 1;
    }
    report.removed += inventory.unreadable.len();

    let mut orphans: Vec<(Id, u64)> = inventory.packs.iter().map(|(p, s)| (*p, *s)).collect();
    orphans.retain(|(p, _)| !indexed.contains(p));
    orphans.sort();
    let headers = orphans.into_iter().map(|(pack, size)| async move {
        Ok::<_, RepoError>((pack, fetch_header(store, repo.keys(), &pack, size).await?))
    });
    let headers: Vec<_> =
        futures::stream::iter(headers).buffer_unordered(CONCURRENT_READS).try_collect::<Vec<_>>().await?;
    let mut entries = Vec::new();
    for (pack, header) in headers {
        match header {
            Ok(h) => {
                entries.extend(h);
                report.indexed_packs += 1;
            }
            Err(e) => report.unreadable_packs.push(format!("{}: {e}", pack_name(&pack))),
        }
    }
    for part in entries.chunks(ENTRIES_PER_FILE) {
        let new = Repository::new_index_name();
        store.put_new(&new, Bytes::from(seal_index(repo.keys(), &new, None, part))).await?;
    }
    let deleting = !obsolete.is_empty();
    for name in obsolete {
        match store.delete(&name).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    if deleting {
        // Hosts' merged copies of the index still hold what was dropped.
        crate::generation::bump(repo).await?;
    }
    report.unreadable_packs.sort();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::INDEX_DIR;
    use crate::keyslot::{Secret, DEFAULT_KDF};
    use crate::pack::{BlobKind, PACKS_DIR};
    use crate::store::Store;
    use crate::writer::Writer;

    async fn stored_pack(repo: &Repository, seed: u8, indexed: bool) -> Id {
        let w = Writer::new(repo.clone()).await.unwrap();
        let w2 = w.clone();
        let blob = tokio::task::spawn_blocking(move || {
            let mut p = w2.packer();
            let b = p.store(BlobKind::Data, &vec![seed; 100_000]).unwrap();
            p.flush().unwrap();
            b
        })
        .await
        .unwrap();
        let durable = w.finish().await.unwrap();
        if indexed {
            durable.write_index(None).await.unwrap();
        }
        blob.pack
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn missing_packs_leave_the_index_and_unindexed_packs_join_it() {
        let repo =
            Repository::init(Store::memory(), &Secret::KeyFile([1; 32]), DEFAULT_KDF, "t".into()).await.unwrap().0;
        let lost = stored_pack(&repo, 1, true).await;
        let kept = stored_pack(&repo, 2, true).await;
        let orphan = stored_pack(&repo, 3, false).await;
        repo.store().delete(&pack_name(&lost)).await.unwrap();

        let before = Inventory::load(&repo).await.unwrap();
        assert_eq!(before.missing().0, 1);
        assert_eq!(before.unindexed(), vec![(orphan, before.packs[&orphan])]);

        let r = repair_index(&repo).await.unwrap();
        assert_eq!((r.kept, r.removed, r.rewritten, r.dropped_entries, r.indexed_packs), (1, 1, 0, 1, 1));
        let after = Inventory::load(&repo).await.unwrap();
        assert_eq!(after.missing().0, 0, "no entry names a missing pack");
        assert!(after.unindexed().is_empty(), "every pack is indexed");
        let named: HashSet<Id> =
            after.index_files.iter().flat_map(|(_, f)| f.entries.iter().map(|e| e.blob.pack)).collect();
        assert_eq!(named, HashSet::from([kept, orphan]));
        assert_eq!(repo.store().list(PACKS_DIR).await.unwrap().len(), 2, "no pack was touched");

        // Run again: nothing left to do.
        let again = repair_index(&repo).await.unwrap();
        assert_eq!((again.kept, again.removed, again.rewritten, again.indexed_packs), (2, 0, 0, 0));
        assert_eq!(repo.store().list(INDEX_DIR).await.unwrap().len(), 2);
    }
}
