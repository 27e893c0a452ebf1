//! What a writer loads of the index when it starts. With a cache directory, from
//! the host's merged copy (`host_index`) and the index files named since: it lists
//! `index/` from a recent name on (index files are named by time, §7), fetches the
//! few it has not read, and looks the rest up in place, so a start costs the same
//! however long the history. Every index file, and a merged copy built again
//! from them, when there is none yet, when a prune or a repair deleted index files
//! or packs since it was built (a new generation marker), or when the writer lists
//! the packs anyway (to adopt the orphans a writer before it left).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use crate::error::RepoError;
use crate::host_index::{sort_entries, table_path, Header, HostIndex, RECENT_NS};
use crate::index::{index_names_from, index_time, open_index, IndexFile, INDEX_DIR};
use crate::index_cache::IndexCache;
use crate::inventory::{fetch_index_files, Inventory};
use crate::pack::PackEntry;
use crate::repo::Repository;

/// The merged copy takes in the index files read since it was built once there
/// are more of them than this, or once they hold more entries than `MERGE_ENTRIES`
/// and a quarter of its own: a start then opens a bounded number of files.
const MERGE_FILES: usize = 256;
const MERGE_ENTRIES: u64 = 50_000;

pub enum Loaded {
    /// Every index file, read (from the host's copy where it has them).
    All(Inventory),
    /// The host's merged copy, and the index files read since.
    Merged { table: Arc<HostIndex>, files: Vec<(String, IndexFile)>, unreadable: Vec<(String, String)> },
}

/// The index as a writer starts with it (see the module doc). Without `host`,
/// every index file, fetched.
pub async fn load(repo: &Repository, host: Option<&Path>, list_packs: bool) -> Result<Loaded, RepoError> {
    let Some(dir) = host else { return Ok(Loaded::All(Inventory::load_cached(repo, None, list_packs).await?)) };
    let cache = IndexCache::in_dir(dir, &repo.id());
    let path = table_path(dir, &repo.id());
    // Before the listing: a prune that deletes after it has added a marker.
    let generation = crate::generation::current(repo.store()).await?;
    if !list_packs {
        if let Some(table) = HostIndex::open(&path, repo.keys()).filter(|t| t.header.generation == generation) {
            if let Some((since, whole)) = cache.read_after(&table.header.cache_id, table.header.cache_len) {
                return since_merged(repo, &cache, &path, table, since, whole).await;
            }
        }
    }
    let inventory = Inventory::load_cached(repo, Some(&cache), list_packs).await?;
    let names = inventory.index_files.iter().map(|(n, _)| n).chain(inventory.unreadable.iter().map(|(n, _)| n));
    let mut entries: Vec<PackEntry> =
        inventory.index_files.iter().flat_map(|(_, f)| f.entries.iter().copied()).collect();
    sort_entries(&mut entries);
    if let Some((cache_id, cache_len)) = cache.head() {
        let header = header(generation, cache_id, cache_len, names.map(String::as_str), 0);
        HostIndex::write(&path, repo.keys(), header, &entries);
    }
    Ok(Loaded::All(inventory))
}

/// A table's header covering `names` (and the names of an earlier one, `newest`).
fn header<'a>(
    generation: String,
    cache_id: [u8; 16],
    cache_len: u64,
    names: impl Iterator<Item = &'a str> + Clone,
    newest: u64,
) -> Header {
    let newest = names.clone().filter_map(index_time).fold(newest, u64::max);
    let from = newest.saturating_sub(RECENT_NS);
    let mut recent: Vec<String> =
        names.filter(|n| index_time(n).is_some_and(|t| t >= from)).map(String::from).collect();
    recent.sort_unstable();
    recent.dedup();
    Header { generation, cache_id, cache_len, newest, recent, entries: 0 }
}

/// The merged copy, and the index files read since: those the host's copy gained
/// after it (`since`), then those listed from a recent name on that neither holds.
async fn since_merged(
    repo: &Repository,
    cache: &IndexCache,
    path: &Path,
    table: HostIndex,
    since: Vec<(String, bytes::Bytes)>,
    whole: bool,
) -> Result<Loaded, RepoError> {
    let keys = repo.keys();
    let store = repo.store();
    let mut covered: HashSet<&str> = table.header.recent.iter().map(String::as_str).collect();
    covered.extend(since.iter().map(|(n, _)| n.as_str()));
    let newest = since.iter().filter_map(|(n, _)| index_time(n)).fold(table.header.newest, u64::max);
    // A name from a clock far ahead does not move the listing past the others.
    let now = crate::time::unix_nanos(jiff::Timestamp::now()).unwrap_or(u64::MAX);
    let from = newest.min(now.saturating_add(RECENT_NS)).saturating_sub(RECENT_NS);
    let listed = store.list_after(INDEX_DIR, &index_names_from(from), usize::MAX).await?;
    // An older repository's random names are read when the copy is built.
    let new: Vec<String> =
        listed.into_iter().filter(|n| index_time(n).is_some() && !covered.contains(n.as_str())).collect();
    let fetched = fetch_index_files(repo, new).await?;
    let mut files = Vec::new();
    let mut unreadable = Vec::new();
    for (name, bytes) in &since {
        match open_index(keys, name, bytes) {
            Ok(file) => files.push((name.clone(), file)),
            Err(e) => unreadable.push((name.clone(), e.to_string())),
        }
    }
    // Only what opens is kept: one that does not is fetched, and reported, again.
    let mut kept = Vec::with_capacity(fetched.len());
    for (name, bytes) in fetched {
        match open_index(keys, &name, &bytes) {
            Ok(file) => {
                files.push((name.clone(), file));
                kept.push((name, bytes));
            }
            Err(e) => unreadable.push((name, e.to_string())),
        }
    }
    let fetched = kept;
    cache.append(&fetched);
    let entries: u64 = files.iter().map(|(_, f)| f.entries.len() as u64).sum();
    let large = since.len() + fetched.len() > MERGE_FILES || entries > MERGE_ENTRIES + table.header.entries / 4;
    // Appended after a record a crash cut short, the files fetched would be read
    // from the store again at every start: the host's copy is written afresh.
    if !large && whole {
        return Ok(Loaded::Merged { table: Arc::new(table), files, unreadable });
    }
    let Some(mut all) = table.all() else { return Ok(Loaded::Merged { table: Arc::new(table), files, unreadable }) };
    all.extend(files.iter().flat_map(|(_, f)| f.entries.iter().copied()));
    sort_entries(&mut all);
    let head = if whole {
        cache.head()
    } else {
        let mut records = cache.read().map(|c| c.records).unwrap_or_default();
        let held: HashSet<String> = records.iter().map(|(n, _)| n.clone()).collect();
        records.extend(fetched.iter().filter(|(n, _)| !held.contains(n)).cloned());
        cache.rewrite(&records)
    };
    let Some((cache_id, cache_len)) = head else {
        return Ok(Loaded::Merged { table: Arc::new(table), files, unreadable });
    };
    let names = table.header.recent.iter().chain(since.iter().map(|(n, _)| n)).chain(fetched.iter().map(|(n, _)| n));
    let header = header(table.header.generation.clone(), cache_id, cache_len, names.map(String::as_str), newest);
    HostIndex::write(path, keys, header, &all);
    drop(all);
    match HostIndex::open(path, keys) {
        Some(merged) => Ok(Loaded::Merged { table: Arc::new(merged), files: Vec::new(), unreadable }),
        None => Ok(Loaded::Merged { table: Arc::new(table), files, unreadable }),
    }
}
